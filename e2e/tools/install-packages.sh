#!/usr/bin/env bash
# Installs the Debian packages Cairn's tests and demo need: QEMU 10 from
# bookworm-backports (matching qemu-img), NBD tools, socat. Idempotent and quick
# when everything is present.
set -euo pipefail

want_qemu=10
have_qemu() {
  command -v qemu-system-x86_64 >/dev/null &&
    qemu-system-x86_64 --version | grep -q "version ${want_qemu}\." &&
    command -v qemu-img >/dev/null && command -v nbdinfo >/dev/null &&
    command -v nbdcopy >/dev/null && command -v socat >/dev/null && command -v qemu-nbd >/dev/null
}
have_qemu && exit 0

if [ "$(id -u)" != 0 ]; then
  echo "install-packages: need root to apt-get install QEMU 10, libnbd-bin, socat" >&2
  exit 1
fi

. "$(dirname "$0")/enable-backports.sh"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >&2
apt-get install -y -q --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-utils >&2
apt-get install -y -q --no-install-recommends libnbd-bin nbdkit socat qemu-block-extra >&2 || \
  apt-get install -y -q --no-install-recommends libnbd-bin nbdkit socat >&2
have_qemu || { echo "install-packages: QEMU $want_qemu not available after install" >&2; exit 1; }
