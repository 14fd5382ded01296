#!/usr/bin/env bash
# Sourced by the install scripts: enables Debian bookworm-backports (QEMU 10,
# libvirt 11) in the existing Debian source, or as a list of its own.
src=/etc/apt/sources.list.d/debian.sources
if [ -f "$src" ] && ! grep -q bookworm-backports "$src"; then
  sed -i '0,/^Suites: bookworm bookworm-updates$/s//Suites: bookworm bookworm-updates bookworm-backports/' "$src"
fi
if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "deb http://deb.debian.org/debian bookworm-backports main" > /etc/apt/sources.list.d/cairn-backports.list
fi
