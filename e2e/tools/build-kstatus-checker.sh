#!/usr/bin/env bash
# Builds kstatus-checker (e2e/tools/kstatus-checker/main.go) against the real
# health libraries of GitOps tools: kstatus from sigs.k8s.io/cli-utils (Flux,
# kpt, Config Sync) and gopher-lua (the Lua interpreter Argo CD embeds), from
# the Go module proxy into a cache directory keyed by version, outside the work
# tree. Idempotent: a cached version is reused as is.
#
#   build-kstatus-checker.sh <cache-dir>
set -euo pipefail

CACHE=${1:?usage: build-kstatus-checker.sh <cache-dir>}
CLI_UTILS_VERSION=${CAIRN_CLI_UTILS_VERSION:-v0.37.2}
GOPHER_LUA_VERSION=${CAIRN_GOPHER_LUA_VERSION:-v1.1.1}
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/kstatus-checker/main.go"
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false

out="$CACHE/kstatus-checker-$CLI_UTILS_VERSION"
# The source is part of the key too: a changed checker is rebuilt.
sum=$(sha256sum "$SRC" | cut -c1-16)
[ -x "$out/kstatus-checker" ] && [ "$(cat "$out/source.sha256" 2>/dev/null)" = "$sum" ] && exit 0

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
cat > go.mod <<MOD
module cairn.dev/kstatus-checker

go 1.24
MOD
cp "$SRC" main.go
go get "sigs.k8s.io/cli-utils@$CLI_UTILS_VERSION" "github.com/yuin/gopher-lua@$GOPHER_LUA_VERSION" >&2
go mod tidy >&2
mkdir -p "$CACHE"
rm -rf "$out.tmp"; mkdir -p "$out.tmp"
go build -trimpath -ldflags "-s -w" -o "$out.tmp/kstatus-checker" .
echo "$sum" > "$out.tmp/source.sha256"
rm -rf "$out"; mv "$out.tmp" "$out"
echo "kstatus-checker (cli-utils $CLI_UTILS_VERSION, gopher-lua $GOPHER_LUA_VERSION) ready in $out" >&2
