#!/usr/bin/env bash
# Builds the tiny real test guest (e2e/src/guest.rs) from Debian bookworm
# packages only: the cloud kernel that `linux-image-cloud-amd64` depends on,
# `busybox-static` and `qemu-guest-agent` (with the libraries `ldd` lists).
# The initramfs carries busybox, qemu-ga, six virtio modules,
# e2e/tools/guest-init.sh as /init and the static benchmark writer
# e2e/tools/iowriter.c as /bin/cairn-iowriter. The result is cached in a directory named
# by the package versions and the hash of the init script and writer:
#
#   <cache>/guest-<kernel>-bb<busybox>-qga<qemu-ga>-init<sha>/{vmlinuz,initrd.img}
#
# and its path is printed on stdout. When that directory exists nothing else
# happens; the key is found with `apt-cache` only (no download). Built in a
# temporary directory and renamed into place, so a half-built guest is never
# seen. GuestImage::ensure runs it with CAIRN_TOOLS_CACHE set.
#
#   cache: $CAIRN_TOOLS_CACHE, else /var/cache/cairn-tools as root,
#          else ${XDG_CACHE_HOME:-$HOME/.cache}/cairn-tools
set -euo pipefail
if [ -n "${CAIRN_TOOLS_CACHE:-}" ]; then
  cache=$CAIRN_TOOLS_CACHE
elif [ "$(id -u)" = 0 ]; then
  cache=/var/cache/cairn-tools
else
  cache=${XDG_CACHE_HOME:-$HOME/.cache}/cairn-tools
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
init="$here/guest-init.sh"
writer="$here/iowriter.c"

# The candidate versions, as apt would install them (bookworm and
# bookworm-security; backports only when pinned, which they are not); one
# apt-cache call, as each takes about half a second.
meta=linux-image-cloud-amd64
policy=$(apt-cache policy "$meta" busybox-static qemu-guest-agent)
candidate() { awk -v p="$1:" '/^[^ ]/ {cur=$1} cur==p && /Candidate:/ {print $2}' <<<"$policy"; }
meta_version=$(candidate "$meta")
if [ -z "$meta_version" ] || [ "$meta_version" = "(none)" ]; then
  echo "build-guest: apt knows no $meta; run apt-get update" >&2
  exit 1
fi
# The exact kernel package the metapackage depends on, e.g. linux-image-6.1.0-57-cloud-amd64.
kernel_pkg=$(apt-cache show "$meta=$meta_version" |
  sed -n 's/^Depends:.*\(linux-image-[0-9][^ ,]*-cloud-amd64\).*/\1/p' | head -n1)
[ -n "$kernel_pkg" ] || { echo "build-guest: cannot resolve the kernel of $meta $meta_version" >&2; exit 1; }
kernel_release=${kernel_pkg#linux-image-}
bb_version=$(candidate busybox-static)
qga_version=$(candidate qemu-guest-agent)
for v in "$bb_version" "$qga_version"; do
  if [ -z "$v" ] || [ "$v" = "(none)" ]; then
    echo "build-guest: busybox-static or qemu-guest-agent unknown to apt; run apt-get update" >&2
    exit 1
  fi
done
# Versions like 1:1.35.0-4+deb12u1+b1 -> 1.35.0-4+deb12u1+b1 (no epoch, path-safe).
clean() { echo "${1#*:}" | tr -c 'A-Za-z0-9.+\n-' '_'; }
init_sum=$(cat "$init" "$writer" | sha256sum | cut -c1-12)
name="guest-${kernel_release}-bb$(clean "$bb_version")-qga$(clean "$qga_version")-init${init_sum}"
out="$cache/$name"
if [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ]; then
  echo "$out"
  exit 0
fi

echo "build-guest: building $name (kernel $kernel_pkg, busybox-static $bb_version, qemu-guest-agent $qga_version)" >&2
mkdir -p "$cache"
tmp=$(mktemp -d "$cache/$name.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
(
  cd "$tmp"
  # apt drops privileges to _apt for downloads; let it write here.
  chmod 0777 "$tmp"
  apt-get download -q "$kernel_pkg" "busybox-static=$bb_version" "qemu-guest-agent=$qga_version" >&2
  chmod 0700 "$tmp"
)
mkdir "$tmp/pkgs"
for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$tmp/pkgs"; done
pkgs=$tmp/pkgs
busybox=$pkgs/bin/busybox
qga=$pkgs/usr/sbin/qemu-ga
[ -x "$busybox" ] && [ -x "$qga" ] || { echo "build-guest: busybox or qemu-ga missing from the packages" >&2; exit 1; }

rootfs=$tmp/rootfs
mkdir -p "$rootfs"/{bin,sbin,usr/bin,usr/sbin,lib,lib64,dev,proc,sys,run,tmp,data,etc,modules}
mkdir -p "$rootfs/var"
ln -s ../run "$rootfs/var/run"
cp "$busybox" "$rootfs/bin/busybox"
cp "$qga" "$rootfs/usr/bin/qemu-ga"
# qemu-ga is dynamically linked: its libraries (as resolved on this bookworm
# host, the same distribution) and the loader.
missing=$(ldd "$qga" | awk '/not found/ {print $1}')
[ -z "$missing" ] || { echo "build-guest: qemu-ga needs libraries this host lacks: $missing" >&2; exit 1; }
for lib in $(ldd "$qga" | awk '/=> \// {print $3}'); do
  cp -L "$lib" "$rootfs/lib/"
done
cp -L /lib64/ld-linux-x86-64.so.2 "$rootfs/lib64/"
# The virtio modules, in load order (ext4 and the 8250 serial are built in).
moddir=$pkgs/lib/modules/$kernel_release/kernel/drivers
for m in virtio/virtio_ring virtio/virtio virtio/virtio_pci_legacy_dev virtio/virtio_pci_modern_dev virtio/virtio_pci block/virtio_blk; do
  cp "$moddir/$m.ko" "$rootfs/modules/"
done
# The guest-impact benchmark's writer, static (no loader or libc in the guest needed).
if ! command -v gcc >/dev/null || [ ! -f /usr/lib/x86_64-linux-gnu/libc.a ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q gcc libc6-dev >&2
fi
gcc -static -O2 -o "$rootfs/bin/cairn-iowriter" "$writer"
cp "$init" "$rootfs/init"
chmod 0755 "$rootfs/init"
printf '%s\n' "$kernel_pkg $meta_version" "busybox-static $bb_version" "qemu-guest-agent $qga_version" > "$rootfs/etc/cairn-guest-versions"

mkdir "$tmp/out"
cp "$pkgs/boot/vmlinuz-$kernel_release" "$tmp/out/vmlinuz"
# busybox's cpio writes newc archives (the host's cpio is not installed by default).
(cd "$rootfs" && find . | LC_ALL=C sort | "$busybox" cpio -o -H newc 2>/dev/null | gzip -9) > "$tmp/out/initrd.img"
cp "$rootfs/etc/cairn-guest-versions" "$tmp/out/versions"
rm -rf "$out"
mv "$tmp/out" "$out"
echo "build-guest: ready in $out ($(du -sh "$out" | cut -f1))" >&2
echo "$out"
