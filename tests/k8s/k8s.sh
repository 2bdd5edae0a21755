#!/usr/bin/env bash
# tests/k8s/k8s.sh - Stockade's own Kubernetes control-plane harness: a real etcd and kube-apiserver on loopback.
#
# Usage:
#   tests/k8s/k8s.sh build [node] [install]   build etcd + kube-apiserver (+ kubelet with 'node'; + kube-controller-
#                                     manager, kube-scheduler and helm with 'install') from Go modules into the
#                                     cache (skips binaries present)
#   tests/k8s/k8s.sh start-controllers RUN_DIR   kube-controller-manager + kube-scheduler against the running apiserver
#                                     (the install test: a DaemonSet needs the daemonset controller)
#   tests/k8s/k8s.sh start RUN_DIR    fresh etcd data + PKI in RUN_DIR, start both, wait for /readyz, write RUN_DIR/env
#   tests/k8s/k8s.sh stop RUN_DIR     stop the processes whose PIDs 'start' saved in RUN_DIR (and nothing else)
#   tests/k8s/k8s.sh restart-apiserver RUN_DIR   stop and start the apiserver only (etcd keeps running)
#
# Environment:
#   STOCKADE_K8S_CACHE   binaries + Go caches, outside the clone (default /var/cache/stockade/k8s)
#   K8S_ETCD_PORT K8S_ETCD_PEER_PORT K8S_API_PORT   loopback ports (defaults 23791 23801 26444)
#   STOCKADE_K8S_GOCACHE_KEEP=1   keep the Go build/module caches after a build (default: deleted, ~4 GB)
#
# --allow-privileged: the DaemonSet of `stockade k8s manifests` is privileged (as real clusters allow).
# The cluster has no kubelet, scheduler or controller-manager: tests play the kubelet by patching pods/NAME/status.
# Hence: no 'default' ServiceAccount (the ServiceAccount admission plugin is disabled) and, because the apiserver
# advertises 127.0.0.1, the endpoint reconciler is off. etcd runs with --unsafe-no-fsync: test data only.
set -euo pipefail

readonly ETCD_V=3.7.3
readonly KUBE_V=1.37.2
# Helm 4: its go.mod requires k8s.io/client-go v0.37.2, the apiserver's own release (one build cache for all)
readonly HELM_V=4.3.2
CACHE=${STOCKADE_K8S_CACHE:-/var/cache/stockade/k8s}
BIN_DIR=$CACHE/bin-etcd$ETCD_V-kube$KUBE_V
HELM_DIR=$CACHE/bin-helm$HELM_V
ETCD_PORT=${K8S_ETCD_PORT:-23791}
ETCD_PEER_PORT=${K8S_ETCD_PEER_PORT:-23801}
API_PORT=${K8S_API_PORT:-26444}

say() { printf '[k8s.sh %s] %s\n' "$(date -u +%T)" "$*" >&2; }
die() { say "error: $*"; exit 1; }

go_env() {
  [[ -x /usr/local/go/bin/go ]] && PATH=/usr/local/go/bin:$PATH
  command -v go >/dev/null || die "go is not installed"
  # GOTOOLCHAIN=auto lets an older go (Debian's) fetch go1.26 through the module proxy.
  export GOMODCACHE=$CACHE/go/mod GOCACHE=$CACHE/go/build GOTOOLCHAIN=${GOTOOLCHAIN:-local} GOFLAGS=-buildvcs=false
}

# A throw-away wrapper module per binary: both upstream modules carry replace directives, so 'go install m@v'
# is refused; requiring them from a module of our own (with the replaces it needs) builds them reproducibly.
build_etcd() {
  [[ -x $BIN_DIR/etcd ]] && { say "etcd present"; return 0; }
  local w=$CACHE/work/etcd
  rm -rf "$w"; mkdir -p "$w" "$BIN_DIR"
  printf 'module stockade.local/etcd\n\ngo 1.26.0\n\nrequire go.etcd.io/etcd/server/v3 v%s\n' "$ETCD_V" > "$w/go.mod"
  say "building etcd v$ETCD_V"
  (cd "$w" && go get "go.etcd.io/etcd/server/v3@v$ETCD_V" && nice -n 15 go build -trimpath -ldflags '-s -w' -o "$BIN_DIR/etcd.part" go.etcd.io/etcd/server/v3)
  mv "$BIN_DIR/etcd.part" "$BIN_DIR/etcd"
}

kube_wrapper() {  # one wrapper module for every k8s.io/kubernetes command (one go.sum, one build cache)
  local w=$CACHE/work/kube
  [[ -f $w/go.mod && -f $w/.ok ]] && return 0
  rm -rf "$w"; mkdir -p "$w" "$BIN_DIR"
  # k8s.io/kubernetes points each staging module (k8s.io/api, k8s.io/apimachinery, ...) at ./staging/...;
  # read that list from its own go.mod and point each one at the published v0.<minor>.<patch> release.
  local upstream
  upstream=$(cd /tmp && go mod download -json "k8s.io/kubernetes@v$KUBE_V" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
  [[ -f $upstream ]] || die "cannot download k8s.io/kubernetes@v$KUBE_V"
  {
    printf 'module stockade.local/kube\n\ngo 1.26.0\n\ngodebug default=go1.26\n\nrequire k8s.io/kubernetes v%s\n\n' "$KUBE_V"
    awk -v rel="v0.${KUBE_V#1.}" '
      /^replace \(/ {inside = 1; next}
      inside && /^\)/ {inside = 0}
      inside && $2 == "=>" && $3 ~ /^\.\/staging\// {printf "replace %s => %s %s\n", $1, $1, rel}
    ' "$upstream"
  } > "$w/go.mod"
  grep -q '^replace k8s.io/api ' "$w/go.mod" || die "no staging replaces found in $upstream"
  touch "$w/.ok"
}

build_kube_cmd() {  # build_kube_cmd NAME: k8s.io/kubernetes/cmd/NAME -> $BIN_DIR/NAME (skipped when present)
  local name=$1 minor=${KUBE_V#1.}; minor=${minor%%.*}
  [[ -x $BIN_DIR/$name ]] && { say "$name present"; return 0; }
  kube_wrapper
  local w=$CACHE/work/kube ld="-s -w" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $pkg.gitVersion=v$KUBE_V -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  done
  say "building $name v$KUBE_V"
  (cd "$w" && go get "k8s.io/kubernetes/cmd/$name@v$KUBE_V" && nice -n 15 go build -trimpath -ldflags "$ld" -o "$BIN_DIR/$name.part" "k8s.io/kubernetes/cmd/$name")
  mv "$BIN_DIR/$name.part" "$BIN_DIR/$name"
}

build_apiserver() { build_kube_cmd kube-apiserver; }

build_helm() {  # helm has no replace directives: 'go install module@version' builds it as released
  [[ -x $HELM_DIR/helm ]] && { say "helm present"; return 0; }
  mkdir -p "$HELM_DIR"
  say "building helm v$HELM_V"
  local x=helm.sh/helm/v4/internal/version
  GOBIN=$HELM_DIR/part nice -n 15 go install -trimpath \
    -ldflags "-s -w -X $x.version=v$HELM_V -X $x.gitTreeState=clean" "helm.sh/helm/v4/cmd/helm@v$HELM_V"
  mv "$HELM_DIR/part/helm" "$HELM_DIR/helm"; rmdir "$HELM_DIR/part"
}

bin_path() {  # bin_path NAME: where the cache keeps it
  if [[ $1 == helm ]]; then echo "$HELM_DIR/helm"; else echo "$BIN_DIR/$1"; fi
}

cmd_build() {  # cmd_build [node] [install]: etcd + kube-apiserver; 'node' adds kubelet (the node tests);
  mkdir -p "$CACHE"  # 'install' adds kube-controller-manager, kube-scheduler and helm (the install test)
  local want="etcd kube-apiserver" b missing="" a
  for a in "$@"; do
    case $a in
      node) want+=" kubelet" ;;
      install) want+=" kube-controller-manager kube-scheduler helm" ;;
      *) die "build: unknown target '$a'" ;;
    esac
  done
  for b in $want; do [[ -x $(bin_path "$b") ]] || missing+=" $b"; done
  if [[ -z $missing ]]; then say "cached in $BIN_DIR and $HELM_DIR"; return 0; fi
  go_env
  for b in $missing; do
    case $b in etcd) build_etcd ;; helm) build_helm ;; *) build_kube_cmd "$b" ;; esac
  done
  [[ ${STOCKADE_K8S_GOCACHE_KEEP:-} ]] || { chmod -R u+w "$CACHE/go" 2>/dev/null || true; rm -rf "$CACHE/go" "$CACHE/work"; }
  say "built into $BIN_DIR"
}

make_pki() {  # make_pki DIR: CA, serving cert for 127.0.0.1, service-account key pair, one admin bearer token
  local d=$1
  mkdir -p "$d"; chmod 700 "$d"
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=stockade-test-ca \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    -keyout "$d/ca.key" -out "$d/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj /CN=kube-apiserver -keyout "$d/api.key" -out "$d/api.csr" 2>/dev/null
  cat > "$d/api.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc
EXT
  openssl x509 -req -in "$d/api.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial -days 30 \
    -extfile "$d/api.ext" -out "$d/api.crt" 2>/dev/null
  openssl genrsa -out "$d/sa.key" 2048 2>/dev/null
  openssl rsa -in "$d/sa.key" -pubout -out "$d/sa.pub" 2>/dev/null
  openssl rand -hex 32 > "$d/token"
  printf '%s,stockade-admin,stockade-admin,"system:masters"\n' "$(cat "$d/token")" > "$d/tokens.csv"
  chmod 600 "$d"/*
}

ready() {  # ready URL CA TOKEN
  curl -fsS --max-time 2 --cacert "$2" -H "Authorization: Bearer $3" "$1/readyz" >/dev/null 2>&1
}

run_etcd() {  # run_etcd RUN_DIR
  local run=$1
  "$BIN_DIR/etcd" --name stockade-test --data-dir "$run/etcd" --unsafe-no-fsync --log-level warn \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "stockade-test=http://127.0.0.1:$ETCD_PEER_PORT" --listen-metrics-urls "" \
    >>"$run/etcd.log" 2>&1 &
  echo $! > "$run/etcd.pid"
}

run_apiserver() {  # run_apiserver RUN_DIR: start it and wait for /readyz (60 s)
  local run=$1 pki=$1/pki url=https://127.0.0.1:$API_PORT token
  token=$(cat "$pki/token")
  "$BIN_DIR/kube-apiserver" --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" \
    --endpoint-reconciler-type none --service-cluster-ip-range 10.255.0.0/24 \
    --cert-dir "$run/api-certs" --tls-cert-file "$pki/api.crt" --tls-private-key-file "$pki/api.key" \
    --client-ca-file "$pki/ca.crt" --token-auth-file "$pki/tokens.csv" --authorization-mode RBAC \
    --service-account-issuer https://kubernetes.default.svc --service-account-key-file "$pki/sa.pub" \
    --service-account-signing-key-file "$pki/sa.key" --disable-admission-plugins ServiceAccount \
    --kubelet-preferred-address-types InternalIP,Hostname --profiling=false --allow-privileged=true \
    >>"$run/apiserver.log" 2>&1 &
  echo $! > "$run/apiserver.pid"
  local i
  for i in $(seq 1 300); do
    ready "$url" "$pki/ca.crt" "$token" && break
    kill -0 "$(cat "$run/apiserver.pid")" 2>/dev/null || { tail -20 "$run/apiserver.log" >&2; cmd_stop "$run"; die "kube-apiserver exited"; }
    kill -0 "$(cat "$run/etcd.pid")" 2>/dev/null || { tail -20 "$run/etcd.log" >&2; cmd_stop "$run"; die "etcd exited"; }
    sleep 0.2
  done
  ready "$url" "$pki/ca.crt" "$token" || { cmd_stop "$run"; die "kube-apiserver not ready in 60 s"; }
}

cmd_start() {
  local run=${1:?usage: k8s.sh start RUN_DIR}
  [[ -x $BIN_DIR/etcd && -x $BIN_DIR/kube-apiserver ]] || die "binaries missing: run '$0 build' first"
  mkdir -p "$run"; run=$(cd "$run" && pwd)
  [[ -f $run/pki/token ]] || make_pki "$run/pki"
  rm -rf "$run/etcd"  # a fresh cluster every time: deleted namespaces never finish terminating here
  local pki=$run/pki url=https://127.0.0.1:$API_PORT
  run_etcd "$run"
  run_apiserver "$run"
  printf 'K8S_API=%s\nK8S_CA=%s\nK8S_TOKEN_FILE=%s\n' "$url" "$pki/ca.crt" "$pki/token" > "$run/env"
  cat > "$run/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: stockade-test
  cluster: {server: "$url", certificate-authority: "$pki/ca.crt"}
users:
- name: stockade-admin
  user: {token: "$(cat "$pki/token")"}
contexts:
- name: stockade-test
  context: {cluster: stockade-test, user: stockade-admin}
current-context: stockade-test
KC
  chmod 600 "$run/kubeconfig"
  say "ready at $url (run dir $run)"
}

cmd_restart_apiserver() {  # the apiserver only; etcd and its data stay (watch clients must resume)
  local run=${1:?usage: k8s.sh restart-apiserver RUN_DIR}
  stop_pid "$run/apiserver.pid"
  run_apiserver "$run"
  say "kube-apiserver restarted"
}

stop_pid() {  # stop_pid PIDFILE: TERM, wait up to 10 s, then KILL; only the PID this script recorded
  local f=$1 pid
  [[ -f $f ]] || return 0
  pid=$(cat "$f")
  if kill -TERM "$pid" 2>/dev/null; then
    local i
    for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

# The install test's control plane on top of 'start': the daemonset controller (a DaemonSet's pods) and the
# root-ca-cert-publisher (ConfigMap kube-root-ca.crt in every namespace: the CA of the pods' projected API
# token volume), and the scheduler (it binds a DaemonSet's pods to their node). No serving ports (0), no leader
# election; they use the admin kubeconfig. Other tests play these parts themselves and never start them.
cmd_start_controllers() {
  local run=${1:?usage: k8s.sh start-controllers RUN_DIR} b
  for b in kube-controller-manager kube-scheduler; do
    [[ -x $BIN_DIR/$b ]] || die "$b missing: run '$0 build install' first"
  done
  "$BIN_DIR/kube-controller-manager" --kubeconfig "$run/kubeconfig" --secure-port 0 --leader-elect=false \
    --controllers daemonset,root-ca-cert-publisher --root-ca-file "$run/pki/ca.crt" \
    --use-service-account-credentials=false --v 1 >>"$run/controller-manager.log" 2>&1 &
  echo $! > "$run/controller-manager.pid"
  "$BIN_DIR/kube-scheduler" --kubeconfig "$run/kubeconfig" --secure-port 0 --leader-elect=false --v 1 \
    >>"$run/scheduler.log" 2>&1 &
  echo $! > "$run/scheduler.pid"
  sleep 1
  for b in controller-manager scheduler; do
    kill -0 "$(cat "$run/$b.pid")" 2>/dev/null || { tail -20 "$run/$b.log" >&2; cmd_stop_controllers "$run"; die "$b exited"; }
  done
  say "controller-manager + scheduler running"
}

cmd_stop_controllers() {
  local run=${1:?usage: k8s.sh stop-controllers RUN_DIR}
  stop_pid "$run/scheduler.pid"
  stop_pid "$run/controller-manager.pid"
}

cmd_stop() {
  local run=${1:?usage: k8s.sh stop RUN_DIR}
  cmd_stop_controllers "$run"
  stop_pid "$run/apiserver.pid"
  stop_pid "$run/etcd.pid"
  say "stopped ($run)"
}

case ${1:-} in
  build) shift; cmd_build "$@" ;;
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  restart-apiserver) shift; cmd_restart_apiserver "$@" ;;
  start-controllers) shift; cmd_start_controllers "$@" ;;
  stop-controllers) shift; cmd_stop_controllers "$@" ;;
  bin-dir) echo "$BIN_DIR" ;;
  helm-path) echo "$HELM_DIR/helm" ;;
  *) sed -n '2,18p' "$0" >&2; exit 2 ;;
esac
