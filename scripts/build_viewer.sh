#!/usr/bin/env bash
# Build the NiiVue bundle from npm (git ignores it; `make` runs this; the package ships it).
#   scripts/build_viewer.sh [VERSION]     default 0.69.0
set -euo pipefail
version=${1:-0.69.0}
dest="$(cd "$(dirname "$0")/.." && pwd)/src/medseg/serve/static"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "@niivue/niivue@$version" >/dev/null && tar xzf ./*.tgz)
cp "$tmp/package/dist/niivue.umd.js" "$dest/niivue.umd.js"
grep -q '"license": "BSD-2-Clause"' "$tmp/package/package.json" || {
    echo "NiiVue $version is no longer BSD-2-Clause: update NIIVUE-LICENSE.txt" >&2
    exit 1
}
sed -i "s/@niivue\/niivue [0-9.]*/@niivue\/niivue $version/" "$dest/NIIVUE-LICENSE.txt"
echo "NiiVue $version -> $dest/niivue.umd.js"
