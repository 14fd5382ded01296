#!/usr/bin/env bash
# Installs the peer tools `cargo xtask bench` compares Cairn against: libvirt 11
# and virtnbdbackup from bookworm-backports (matching QEMU 10), and starts the
# libvirt daemons by hand (no systemd on these machines). Idempotent; never part
# of `cargo xtask test`.
set -euo pipefail

have() { command -v virtnbdbackup >/dev/null && command -v libvirtd >/dev/null && command -v virsh >/dev/null; }

if ! have; then
  if [ "$(id -u)" != 0 ]; then
    echo "install-bench-packages: need root to apt-get install libvirt and virtnbdbackup" >&2
    exit 1
  fi
  . "$(dirname "$0")/enable-backports.sh"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  # A temporary policy-rc.d keeps the package scripts from starting services.
  had_policy=0; [ -e /usr/sbin/policy-rc.d ] && had_policy=1
  [ "$had_policy" = 1 ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; }
  apt-get install -y -q -t bookworm-backports libvirt-daemon-system libvirt-clients virtnbdbackup >&2
  [ "$had_policy" = 1 ] || rm -f /usr/sbin/policy-rc.d
  have || { echo "install-bench-packages: virtnbdbackup/libvirtd missing after install" >&2; exit 1; }
fi

# Daemons, started by hand (idempotent).
start() { pgrep -x "$1" >/dev/null || "$@" -d; }
if [ "$(id -u)" = 0 ]; then
  mkdir -p /run/libvirt
  start virtlogd
  start virtlockd
  start libvirtd
  for _ in $(seq 1 50); do
    virsh -c qemu:///system version >/dev/null 2>&1 && break
    sleep 0.2
  done
  virsh -c qemu:///system version >&2
fi
