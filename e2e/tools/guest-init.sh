#!/bin/busybox sh
# /init of Cairn's tiny test guest (built by build-guest.sh, driven by
# e2e/src/guest.rs). Mounts the data disk /dev/vda (ext4) on /data, starts
# qemu-ga on /dev/ttyS1 and prints markers on the console (ttyS0):
#
#   CAIRN-GUEST-READY        /data is mounted (per the mode) and qemu-ga runs
#   CAIRN-DATA-OK records=N  (cairn.mode=check) /data mounted and records.log read
#   CAIRN-DATA-FAIL <why>    (cairn.mode=check) it did not
#   CAIRN-GUEST-FAIL <why>   boot failed before READY
#
# Kernel command line:
#   cairn.mode=idle      (default) mount /data and wait
#   cairn.mode=workload  append records to /data/records.log, fsync after each
#   cairn.mode=check     mount /data read-only and check records.log is readable
#   cairn.interval=SECS  pause between records (default 0.1)
#
# A record is one line "<seq> <sum> <payload>\n" with seq = 0, 1, 2, ...,
# payload = "rec-<seq>-<filler>" and sum = the first 16 hex digits of the
# sha256 of "<seq> <payload>". Each record is one write(2) followed by
# fsync(2) (busybox `sync FILE` calls fsync), so every record whose seq the
# guest has reported is on the disk.
/bin/busybox mkdir -p /proc /sys /dev /run /tmp
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp

fail() {
  echo "CAIRN-GUEST-FAIL $*"
  while :; do sleep 3600; done
}

mode=idle
interval=0.1
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    cairn.mode=*) mode=${arg#cairn.mode=} ;;
    cairn.interval=*) interval=${arg#cairn.interval=} ;;
  esac
done
echo "cairn-guest: mode=$mode interval=$interval $(cat /etc/cairn-guest-versions | tr '\n' ';')"

for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
  insmod /modules/$m.ko || fail "insmod $m"
done
i=0
while [ ! -b /dev/vda ]; do
  i=$((i + 1))
  [ $i -gt 100 ] && fail "no /dev/vda"
  sleep 0.1
done

case "$mode" in
  check)
    if ! mount -t ext4 -o ro /dev/vda /data; then
      echo "CAIRN-DATA-FAIL mount"
    elif [ ! -r /data/records.log ]; then
      echo "CAIRN-DATA-FAIL no /data/records.log"
    elif ! n=$(wc -l </data/records.log); then
      echo "CAIRN-DATA-FAIL read /data/records.log"
    else
      echo "CAIRN-DATA-OK records=$n last=$(tail -n 1 /data/records.log | cut -d' ' -f1)"
    fi
    ;;
  idle | workload)
    mount -t ext4 /dev/vda /data || fail "mount /dev/vda"
    ;;
  *) fail "unknown cairn.mode=$mode" ;;
esac

qemu-ga -m isa-serial -p /dev/ttyS1 -d -t /run -l /run/qemu-ga.log || fail "qemu-ga"
i=0
while ! pidof qemu-ga >/dev/null; do
  i=$((i + 1))
  [ $i -gt 100 ] && fail "qemu-ga did not start"
  sleep 0.1
done
echo "CAIRN-GUEST-READY mode=$mode"

if [ "$mode" = workload ]; then
  [ -e /data/records.log ] && fail "/data/records.log exists already"
  filler=abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ
  seq=0
  while :; do
    payload="rec-$seq-$filler"
    sum=$(printf '%s %s' "$seq" "$payload" | sha256sum | cut -c1-16)
    printf '%s %s %s\n' "$seq" "$sum" "$payload" >>/data/records.log
    sync /data/records.log || fail "fsync /data/records.log"
    seq=$((seq + 1))
    sleep "$interval"
  done
fi
while :; do sleep 3600; done
