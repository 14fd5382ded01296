#!/usr/bin/env bash
# Builds the S3-compatible server versitygw (Apache-2.0) from the Go module
# proxy into a versioned cache directory and prints the binary's path.
# A no-op when the binary is already cached. Tools::ensure (e2e/src/tools.rs)
# runs it with CAIRN_VERSITYGW_VERSION and CAIRN_TOOLS_CACHE set.
#
#   cache: $CAIRN_TOOLS_CACHE, else /var/cache/cairn-tools as root,
#          else ${XDG_CACHE_HOME:-$HOME/.cache}/cairn-tools
set -euo pipefail
version=${CAIRN_VERSITYGW_VERSION:-v1.8.0}
if [ -n "${CAIRN_TOOLS_CACHE:-}" ]; then
  cache=$CAIRN_TOOLS_CACHE
elif [ "$(id -u)" = 0 ]; then
  cache=/var/cache/cairn-tools
else
  cache=${XDG_CACHE_HOME:-$HOME/.cache}/cairn-tools
fi
dir=$cache/versitygw-$version
bin=$dir/versitygw
if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi
command -v go >/dev/null || { echo "install-versitygw: go is not installed" >&2; exit 1; }
mkdir -p "$cache"
tmp=$(mktemp -d "$cache/versitygw-$version.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "install-versitygw: building versitygw $version (about a minute on 2 cores)" >&2
GOBIN=$tmp GOFLAGS=-mod=mod go install "github.com/versity/versitygw/cmd/versitygw@$version" >&2
mkdir -p "$dir"
mv "$tmp/versitygw" "$bin.partial"
mv "$bin.partial" "$bin"
echo "$bin"
