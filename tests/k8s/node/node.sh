#!/usr/bin/env bash
# tests/k8s/node/node.sh - one real Kubernetes node for Stockade's tests: Debian's containerd + runc + CNI bridge
# and a kubelet built from Go modules (tests/k8s/k8s.sh build node), registered with the harness's apiserver.
#
#   node.sh images                  build the pause + busybox images (docker-archive tars) into the cache (once)
#   node.sh start RUN_DIR           bridge, CNI config (bridge + host-local + stockade-default-deny), containerd,
#                                   image import, kubelet; waits for the Node to be Ready; writes RUN_DIR/node/env
#   node.sh stop RUN_DIR            deletes what 'start' made: pods' sandboxes, kubelet, containerd, its shims (by
#                                   our socket path), netns, bridge, mounts, cgroups, KUBE-* iptables chains, sysctls
#
# Environment (start): K8S_RUN (the apiserver's run dir: kubeconfig, pki), NODE_NAME, NODE_V4 (a /24: .1 is the
# bridge = node IP), NODE_V6 (a /64), KUBELET_PORT, KUBELET_HEALTHZ_PORT, STOCKADE_PYTHON (runs the CNI plugin),
# STOCKADE_SRC (its PYTHONPATH); STOCKADE_CNI_DEFAULT_DENY=0 leaves the default-deny plugin out of the chain. Only one node per machine (kubelet has hard-coded host paths): the caller holds a
# lock. Facts behind the two settings marked 'required': ../shared/design.md (restrict_oom_score_adj, failCgroupV1).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${STOCKADE_K8S_CACHE:-/var/cache/stockade/k8s}
BIN_DIR=${KUBE_BIN_DIR:-$("$HERE/../k8s.sh" bin-dir)}
IMAGES=$CACHE/images
PAUSE_IMAGE=stockade.local/pause:1
BUSYBOX_IMAGE=stockade.local/busybox:1
CNI_PLUGINS=/usr/lib/cni
HOST_PATHS="/var/log/containers /var/lib/kubelet /var/lib/cni /run/containerd"

say() { printf '[node.sh %s] %s\n' "$(date -u +%T)" "$*" >&2; }
die() { say "error: $*"; exit 1; }

mkimage() {  # mkimage NAME ROOTFS ENTRYPOINT_JSON CMD_JSON OUT: a one-layer docker-archive, reproducible
  local name=$1 rootfs=$2 ep=$3 cmd=$4 out=$5 w diff cfg
  w=$(mktemp -d -p "$IMAGES")
  tar --numeric-owner --owner=0 --group=0 --sort=name --mtime=@0 -C "$rootfs" -cf "$w/layer.tar" .
  diff=$(sha256sum "$w/layer.tar" | cut -d' ' -f1)
  printf '{"architecture":"amd64","os":"linux","config":{"Entrypoint":%s,"Cmd":%s,"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
    "$ep" "$cmd" "$diff" > "$w/config.json"
  cfg=$(sha256sum "$w/config.json" | cut -d' ' -f1); mv "$w/config.json" "$w/$cfg.json"
  printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["layer.tar"]}]' "$cfg" "$name" > "$w/manifest.json"
  tar -C "$w" -cf "$out.part" manifest.json "$cfg.json" layer.tar
  mv "$out.part" "$out"; rm -rf "$w"
}

cmd_images() {
  [[ -s $IMAGES/pause.tar && -s $IMAGES/busybox.tar ]] && { say "images present"; return 0; }
  command -v gcc >/dev/null || die "gcc is needed for the pause image"
  [[ -x /bin/busybox ]] && /bin/busybox --list | grep -qx nc || die "busybox-static is needed"
  mkdir -p "$IMAGES"
  local r=$IMAGES/rootfs a
  rm -rf "$r"; mkdir -p "$r/pause" "$r/busybox/bin" "$r/busybox/tmp" "$r/busybox/etc"
  gcc -Os -static -o "$r/pause/pause" "$HERE/pause.c"; strip "$r/pause/pause"
  mkimage "$PAUSE_IMAGE" "$r/pause" '["/pause"]' 'null' "$IMAGES/pause.tar"
  cp /bin/busybox "$r/busybox/bin/busybox"
  for a in $("$r/busybox/bin/busybox" --list); do [[ $a == busybox ]] || ln -sf busybox "$r/busybox/bin/$a"; done
  echo 'root:x:0:0:root:/:/bin/sh' > "$r/busybox/etc/passwd"; echo 'root:x:0:' > "$r/busybox/etc/group"
  mkimage "$BUSYBOX_IMAGE" "$r/busybox" '["/bin/sh"]' '["-c","sleep 3600"]' "$IMAGES/busybox.tar"
  rm -rf "$r"
  say "images built in $IMAGES"
}

write_configs() {  # write_configs NODE_DIR
  local d=$1 sock=$1/state/containerd.sock gw4=${NODE_V4%.*/*}.1 v6net=${NODE_V6%/*}
  local gw6=${v6net%::*}::1
  mkdir -p "$d"/{net.d,cni-bin,ipam,root,state,opt,kubelet,pod-logs}
  for p in bridge host-local loopback; do ln -sf "$CNI_PLUGINS/$p" "$d/cni-bin/$p"; done
  # the chained default-deny plugin: every sandbox starts closed until its pod agent applies (stockade.k8s.cni)
  printf '#!/bin/sh\nPYTHONPATH=%q exec %q -m stockade.k8s.cni\n' "${STOCKADE_SRC:-}" "${STOCKADE_PYTHON:-python3}" \
    > "$d/cni-bin/stockade-default-deny"
  chmod 755 "$d/cni-bin/stockade-default-deny"
  local DEFAULT_DENY=',
  {"type": "stockade-default-deny", "table": "stockade"}'
  [[ ${STOCKADE_CNI_DEFAULT_DENY:-1} == 0 ]] && DEFAULT_DENY=""  # only to show the tests fail without it
  cat > "$d/net.d/10-stockade-test.conflist" <<JSON
{"cniVersion": "1.0.0", "name": "stockade-test-$NODE_NAME", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": false, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$d/ipam", "routes": [],
            "ranges": [[{"subnet": "$NODE_V4", "rangeStart": "${NODE_V4%.*/*}.10", "gateway": "$gw4"}],
                       [{"subnet": "$NODE_V6", "rangeStart": "${v6net}a", "gateway": "$gw6"}]]}}$DEFAULT_DENY
]}
JSON
  cat > "$d/containerd.toml" <<TOML
version = 2
root = "$d/root"
state = "$d/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "$sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$d/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  restrict_oom_score_adj = true  # required: no CAP_SYS_RESOURCE here (runc: "can't get final child's PID")
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$d/cni-bin"
    conf_dir = "$d/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$d/state/runc"
TOML
  echo "nameserver $gw4" > "$d/resolv.conf"  # nothing listens there: pods can't reach the host's resolver
  cat > "$d/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $gw4
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
authentication: {anonymous: {enabled: false}, webhook: {enabled: false}, x509: {clientCAFile: $K8S_RUN/pki/ca.crt}}
authorization: {mode: AlwaysAllow}
containerRuntimeEndpoint: unix://$sock
cgroupDriver: cgroupfs
failCgroupV1: false  # required: this machine has cgroup v1 only
failSwapOn: false
resolvConf: $d/resolv.conf
podLogsDir: $d/pod-logs
volumePluginDir: $d/volume-plugins
maxPods: 120
serializeImagePulls: false
evictionHard: {"memory.available": "50Mi", "nodefs.available": "1%", "imagefs.available": "1%"}
imageGCHighThresholdPercent: 100
YAML
  printf '%s\n' "$sock" > "$d/sock"
}

cmd_start() {
  local run=${1:?usage: node.sh start RUN_DIR}; run=$(cd "$run" && pwd)
  local d=$run/node
  [[ $(id -u) == 0 ]] || die "must run as root"
  [[ -x $BIN_DIR/kubelet ]] || die "kubelet missing: run 'tests/k8s/k8s.sh build node' first"
  for b in containerd runc ctr nft; do command -v "$b" >/dev/null || die "$b is not installed"; done
  [[ -x $CNI_PLUGINS/bridge ]] || die "containernetworking-plugins is not installed"
  cmd_images
  mkdir -p "$d"
  BRIDGE=stkn$(printf '%s' "$NODE_NAME" | sha256sum | cut -c1-8)
  echo "$BRIDGE" > "$d/bridge"
  sysctl -e vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys \
    kernel.keys.root_maxbytes net.ipv4.ip_forward > "$d/sysctl-before"
  { for p in $HOST_PATHS; do [[ -e $p ]] && echo "$p"; done; mountpoint -q /run/netns && echo "mount:/run/netns"; } \
    > "$d/hostpaths-before" || true
  ls /run/netns 2>/dev/null | sort > "$d/netns-before" || true
  iptables-save > "$d/iptables-before"; ip6tables-save > "$d/ip6tables-before"
  write_configs "$d"
  # /run/netns a shared mount (as `ip netns add` makes it): the node agent's DaemonSet pod mounts it with
  # Bidirectional propagation (its pins must reach the host), which containerd refuses on a private mount
  mkdir -p /run/netns
  mountpoint -q /run/netns || mount --bind /run/netns /run/netns
  mount --make-shared /run/netns
  ip link add "$BRIDGE" type bridge
  ip addr add "${NODE_V4%.*/*}.1/24" dev "$BRIDGE"
  local v6net=${NODE_V6%/*}; ip -6 addr add "${v6net%::*}::1/64" dev "$BRIDGE" nodad
  ip link set "$BRIDGE" up
  containerd --config "$d/containerd.toml" > "$d/containerd.log" 2>&1 &
  echo $! > "$d/containerd.pid"
  local sock i
  sock=$(cat "$d/sock")
  for i in $(seq 1 100); do ctr --address "$sock" version >/dev/null 2>&1 && break; sleep 0.1; done
  ctr --address "$sock" version >/dev/null 2>&1 || { tail -20 "$d/containerd.log" >&2; die "containerd did not start"; }
  for img in pause busybox; do ctr --address "$sock" -n k8s.io images import "$IMAGES/$img.tar" >/dev/null; done
  local kubeconfig=$d/kubeconfig
  cp "$K8S_RUN/kubeconfig" "$kubeconfig"
  "$BIN_DIR/kubelet" --config "$d/kubelet.yaml" --kubeconfig "$kubeconfig" --hostname-override "$NODE_NAME" \
    --node-ip "${NODE_V4%.*/*}.1" --root-dir "$d/kubelet" --cert-dir "$d/kubelet/pki" --v 1 \
    > "$d/kubelet.log" 2>&1 &
  echo $! > "$d/kubelet.pid"
  local token url
  token=$(cat "$K8S_RUN/pki/token"); url=$(sed -n 's/^K8S_API=//p' "$K8S_RUN/env")
  for i in $(seq 1 240); do
    if curl -fsS --cacert "$K8S_RUN/pki/ca.crt" -H "Authorization: Bearer $token" "$url/api/v1/nodes/$NODE_NAME" 2>/dev/null \
        | tr -d ' \n' | grep -q '"type":"Ready","status":"True"'; then
      say "node $NODE_NAME Ready"; printf 'NODE_DIR=%s\nBRIDGE=%s\n' "$d" "$BRIDGE" > "$d/env"; return 0
    fi
    kill -0 "$(cat "$d/kubelet.pid")" 2>/dev/null || break
    sleep 0.5
  done
  tail -30 "$d/kubelet.log" >&2
  die "node $NODE_NAME not Ready"
}

stop_pid() {  # stop_pid PIDFILE: TERM, wait up to 10 s, then KILL; only the PID this script recorded
  local f=$1 pid i
  [[ -f $f ]] || return 0
  pid=$(cat "$f")
  if kill -TERM "$pid" 2>/dev/null; then
    for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

cmd_stop() {
  local run=${1:?usage: node.sh stop RUN_DIR}; run=$(cd "$run" && pwd)
  local d=$run/node sock
  [[ -d $d ]] || return 0
  set +e
  sock=$(cat "$d/sock" 2>/dev/null)
  stop_pid "$d/kubelet.pid"
  if [[ -S $sock ]]; then  # every container, sandboxes included (their CNI DEL ran when kubelet stopped pods)
    local t
    for t in $(ctr --address "$sock" -n k8s.io tasks ls -q 2>/dev/null); do ctr --address "$sock" -n k8s.io tasks kill -s SIGKILL "$t" >/dev/null 2>&1; done
    sleep 0.5
    for t in $(ctr --address "$sock" -n k8s.io tasks ls -q 2>/dev/null); do ctr --address "$sock" -n k8s.io tasks delete -f "$t" >/dev/null 2>&1; done
    for t in $(ctr --address "$sock" -n k8s.io containers ls -q 2>/dev/null); do ctr --address "$sock" -n k8s.io containers delete "$t" >/dev/null 2>&1; done
  fi
  stop_pid "$d/containerd.pid"
  # shims of our containerd: found by our own socket path in their command line, stopped one by one
  local pid
  for pid in $(pgrep -f -- "-address $sock" 2>/dev/null); do kill "$pid" 2>/dev/null; done
  sleep 0.3
  for pid in $(pgrep -f -- "-address $sock" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
  awk '{print $5}' /proc/self/mountinfo | grep -E "^$d(/|$)" | sort -r | while read -r m; do umount -l "$m"; done
  # pod namespaces containerd pinned (cni-*) since 'start' (one node per machine: the caller holds the lock)
  local ns
  if [[ -f $d/netns-before ]]; then
    for ns in $(comm -13 "$d/netns-before" <(ls /run/netns 2>/dev/null | sort)); do
      [[ $ns == cni-* ]] && { umount "/run/netns/$ns" 2>/dev/null; rm -f "/run/netns/$ns"; }
    done
  fi
  [[ -f $d/bridge ]] && ip link del "$(cat "$d/bridge")" 2>/dev/null
  find /var/log/containers -maxdepth 1 -type l -lname "$d/*" -delete 2>/dev/null
  rm -f /var/lib/cni/results/stockade-test-"$NODE_NAME"-* 2>/dev/null
  if [[ -f $d/hostpaths-before ]]; then
    for p in $HOST_PATHS; do
      grep -qx "$p" "$d/hostpaths-before" && continue
      [[ -d $p ]] && find "$p" -depth \( -type d -o -type s \) \( -type s -delete -o -empty -delete \) 2>/dev/null
    done
  fi
  for p in /sys/fs/cgroup/*/kubepods; do [[ -d $p ]] && find "$p" -depth -type d -exec rmdir {} \; 2>/dev/null; done
  local ipt t ch rule
  for ipt in iptables ip6tables; do
    [[ -f $d/$ipt-before ]] || continue
    for t in mangle nat filter; do
      for ch in $($ipt-save -t "$t" 2>/dev/null | sed -n 's/^:\(KUBE-[^ ]*\) .*/\1/p'); do
        grep -q "^:$ch " "$d/$ipt-before" && continue
        $ipt-save -t "$t" | grep -E "^-A [^ ]+ .*-j $ch( |\$)" | sed 's/^-A /-D /' | while read -r rule; do
          # shellcheck disable=SC2086
          $ipt -t "$t" $rule
        done
        $ipt -t "$t" -F "$ch" 2>/dev/null; $ipt -t "$t" -X "$ch" 2>/dev/null
      done
    done
  done
  if [[ -f $d/sysctl-before ]]; then
    while read -r k _ v; do [[ -n $k ]] && sysctl -qw "$k=$v"; done < "$d/sysctl-before"
  fi
  rm -rf "$d/root" "$d/state" "$d/kubelet" "$d/ipam"
  say "node $NODE_NAME stopped"
}

case ${1:-} in
  images) cmd_images ;;
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  *) sed -n '2,16p' "$0" >&2; exit 2 ;;
esac
