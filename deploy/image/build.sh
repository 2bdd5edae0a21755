#!/usr/bin/env bash
# deploy/image/build.sh - the Stockade container image (node agent, CNI plugin, sync), assembled locally:
# a Debian root filesystem from Debian packages (mmdebstrap: python3, nftables, iproute2, util-linux), Stockade's
# wheel and its dependencies' wheels (built on this host by pip) installed offline into /opt/stockade (a venv), as a
# docker-archive tar that `ctr -n k8s.io images import` (or `docker load`) takes. No registry, no Dockerfile.
#
#   deploy/image/build.sh OUT.tar [TAG]        TAG default stockade.local/stockade:<version>
#   SUITE=bookworm MIRROR=http://deb.debian.org/debian deploy/image/build.sh ...
#
# Needs root (mmdebstrap's root mode), mmdebstrap, python3 with pip (to build the wheel). Reproducible layer
# (sorted, numeric owners, mtime 0); the image's entrypoint is /opt/stockade/bin/stockade.
set -euo pipefail

OUT=${1:?usage: build.sh OUT.tar [TAG]}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
VERSION=$(cd "$REPO" && python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])')
TAG=${2:-stockade.local/stockade:$VERSION}
# The image's Debian release is the host's by default, so its python3 is the version the wheels are
# built for (binary wheels such as pydantic-core's are per Python version).
SUITE=${SUITE:-$( (. /etc/os-release 2>/dev/null; echo "${VERSION_CODENAME:-bookworm}") )}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PY=${PYTHON:-python3}

say() { printf '[image %s] %s\n' "$(date -u +%T)" "$*" >&2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
command -v mmdebstrap >/dev/null || { say "mmdebstrap is needed (apt-get install mmdebstrap)"; exit 1; }

say "wheels: Stockade's and its dependencies' (on this host, with its package index settings)"
"$PY" -m pip wheel -q -w "$work/dist" "$REPO"
ls "$work"/dist/stockade-*.whl >/dev/null

say "Debian $SUITE root filesystem"
mmdebstrap --quiet --variant=apt --include=python3,python3-venv,nftables,iproute2,util-linux,ca-certificates \
  --dpkgopt='path-exclude=/usr/share/{doc,man,info,locale}/*' "$SUITE" "$work/rootfs" "$MIRROR"

say "Stockade into /opt/stockade"
want=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
have=$(chroot "$work/rootfs" /usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [[ $want != "$have" ]]; then
  say "the wheels are for Python $want but Debian $SUITE has Python $have: set SUITE to a release with Python $want, or PYTHON to a python$have"
  exit 1
fi
cp -r "$work/dist" "$work/rootfs/tmp/wheels"
chroot "$work/rootfs" /usr/bin/python3 -m venv /opt/stockade
env -u PIP_FIND_LINKS chroot "$work/rootfs" /opt/stockade/bin/pip install -q --no-cache-dir --no-index --find-links /tmp/wheels stockade
rm -rf "$work/rootfs/tmp/wheels"
rm -rf "$work/rootfs/var/cache/apt/"* "$work/rootfs/var/lib/apt/lists/"*
chroot "$work/rootfs" /opt/stockade/bin/stockade --version

say "docker archive $OUT ($TAG)"
tar --numeric-owner --sort=name --mtime=@0 -C "$work/rootfs" -cf "$work/layer.tar" .
diff=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
printf '{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/opt/stockade/bin/stockade"],"Env":["PATH=/opt/stockade/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
  "$diff" > "$work/config.json"
cfg=$(sha256sum "$work/config.json" | cut -d' ' -f1)
mv "$work/config.json" "$work/$cfg.json"
printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["layer.tar"]}]' "$cfg" "$TAG" > "$work/manifest.json"
tar -C "$work" -cf "$OUT" manifest.json "$cfg.json" layer.tar
say "done: $OUT $(du -h "$OUT" | cut -f1)"
