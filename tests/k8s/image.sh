#!/usr/bin/env bash
# tests/k8s/image.sh - the Stockade image for the install test, cached outside the clone by its inputs' hash.
#
#   tests/k8s/image.sh path     print the cached tar's path (it may not exist yet)
#   tests/k8s/image.sh build    build it with deploy/image/build.sh unless that tar exists; print the path
#
# The key is a hash of everything the image is made of here: deploy/image/build.sh, pyproject.toml and every
# file under src/ (caches and egg-info left out). CI rebuilds the image only when one of them changed; older
# tars of this cache are removed after a build. The tag names the key too: stockade.local/stockade:test-<key>.
# Environment: STOCKADE_K8S_CACHE (default /var/cache/stockade/k8s; the tar goes to its images/).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${STOCKADE_K8S_CACHE:-/var/cache/stockade/k8s}
DIR=$CACHE/images

key() {
  (cd "$REPO" && find src deploy/image pyproject.toml -type f ! -path '*/__pycache__/*' ! -path '*.egg-info/*' \
     ! -name '*.pyc' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
}

k=$(key)
tar=$DIR/stockade-$k.tar
case ${1:-} in
  path) echo "$tar" ;;
  tag) echo "stockade.local/stockade:test-$k" ;;
  build)
    if [[ ! -s $tar ]]; then
      mkdir -p "$DIR"
      "$REPO/deploy/image/build.sh" "$tar.part" "stockade.local/stockade:test-$k" >&2
      mv "$tar.part" "$tar"
      find "$DIR" -maxdepth 1 -name 'stockade-*.tar*' ! -name "stockade-$k.tar" -delete
    else
      printf '[image.sh] cached: %s\n' "$tar" >&2
    fi
    echo "$tar" ;;
  *) sed -n '2,10p' "$0" >&2; exit 2 ;;
esac
