#!/usr/bin/env bash
# Builds etcd and kube-apiserver / kube-controller-manager / kubectl from the Go
# module proxy into a cache directory keyed by version, outside the work tree.
# Idempotent: a cached version is reused as is.
#
#   build-control-plane.sh <cache-dir>
#
# Versions come from the environment (defaults below) so CI and developers
# share one cache.
set -euo pipefail

CACHE=${1:?usage: build-control-plane.sh <cache-dir>}
K8S_VERSION=${CAIRN_K8S_VERSION:-v1.34.4}
ETCD_VERSION=${CAIRN_ETCD_VERSION:-v3.6.16}
STAGING_VERSION="v0.${K8S_VERSION#v1.}"
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false

build_etcd() {
  local out="$CACHE/etcd-$ETCD_VERSION"
  [ -x "$out/etcd" ] && return 0
  local work; work=$(mktemp -d)
  cd "$work"
  cat > go.mod <<MOD
module cairn.dev/etcd-wrapper

go 1.24
MOD
  go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" "go.etcd.io/etcd/etcdctl/v3@$ETCD_VERSION" >&2
  mkdir -p "$out.tmp"
  go build -trimpath -o "$out.tmp/etcd" go.etcd.io/etcd/server/v3
  go build -trimpath -o "$out.tmp/etcdctl" go.etcd.io/etcd/etcdctl/v3
  rm -rf "$out"; mv "$out.tmp" "$out"
  cd /; rm -rf "$work"
}

build_k8s() {
  local out="$CACHE/kubernetes-$K8S_VERSION"
  [ -x "$out/kube-apiserver" ] && [ -x "$out/kubectl" ] && [ -x "$out/kube-controller-manager" ] && return 0
  local work; work=$(mktemp -d)
  cd "$work"
  local staging=(api apiextensions-apiserver apimachinery apiserver cli-runtime client-go
    cloud-provider cluster-bootstrap code-generator component-base component-helpers
    controller-manager cri-api cri-client csi-translation-lib dynamic-resource-allocation
    endpointslice externaljwt kms kube-aggregator kube-controller-manager kube-proxy
    kube-scheduler kubectl kubelet metrics mount-utils pod-security-admission
    sample-apiserver sample-cli-plugin sample-controller)
  {
    echo "module cairn.dev/kubernetes-wrapper"
    echo
    echo "go 1.24.0"
    echo
    echo "godebug default=go1.24"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "replace ("
    for m in "${staging[@]}"; do echo "	k8s.io/$m => k8s.io/$m $STAGING_VERSION"; done
    echo ")"
  } > go.mod
  go get "k8s.io/kubernetes/cmd/kube-apiserver@$K8S_VERSION" \
         "k8s.io/kubernetes/cmd/kube-controller-manager@$K8S_VERSION" \
         "k8s.io/kubernetes/cmd/kubectl@$K8S_VERSION" >&2
  local ld="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2)"
  ld="$ld -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"
  mkdir -p "$out.tmp"
  for cmd in kube-apiserver kube-controller-manager kubectl; do
    echo "building $cmd $K8S_VERSION" >&2
    go build -trimpath -ldflags "$ld" -o "$out.tmp/$cmd" "k8s.io/kubernetes/cmd/$cmd"
  done
  rm -rf "$out"; mv "$out.tmp" "$out"
  cd /; rm -rf "$work"
}

mkdir -p "$CACHE"
build_etcd
build_k8s
echo "etcd $ETCD_VERSION and kubernetes $K8S_VERSION ready in $CACHE" >&2
