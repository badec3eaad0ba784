#!/bin/busybox sh
# /init of the ramsnap test guest (busybox-static + a few virtio modules from the Debian kernel).
# See tests/guest/README.md for the console-log contract. Everything the tests parse starts with
# "RAMSNAP-"; the kernel is kept quiet with loglevel=0 on the command line.
/bin/busybox mkdir -p /bin /sbin /dev /proc /sys /tmp /fill
/bin/busybox --install -s /bin
export PATH=/bin:/sbin

mount -t devtmpfs dev /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
# From here on the console is /dev/console (console=ttyS0 on the kernel command line).
exec </dev/console >/dev/console 2>&1

err() { echo "RAMSNAP-ERROR $*"; }
debug=0
grep -q 'ramsnap.debug=1' /proc/cmdline && debug=1
dbg() { [ "$debug" = 1 ] && echo "RAMSNAP-DEBUG uptime=$(cut -d' ' -f1 /proc/uptime) $*"; return 0; }
dbg "init started"

# virtio modules, in dependency order (written by build.sh); some may be built in on other kernels.
if [ -f /lib/modules/load-order ]; then
    while read -r ko; do
        [ -n "$ko" ] || continue
        insmod "/lib/modules/$ko" 2>/dev/null || true
    done </lib/modules/load-order
fi

dbg "modules loaded"

# Kernel command-line options.
fill=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        ramsnap.fill=*) fill="${arg#ramsnap.fill=}" ;;
    esac
done
case "$fill" in ''|*[!0-9]*) err "bad ramsnap.fill=$fill"; fill=0 ;; esac

# A fresh random token per boot: a restored guest keeps it, a rebooted one gets a new one.
token="$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')"
dbg "token read"
echo "RAMSNAP-BOOT token=$token"

# Fill RAM with random (non-zero, incompressible) data held in a tmpfs file.
if [ "$fill" -gt 0 ]; then
    mount -t tmpfs -o "size=$((fill + 8))m,mode=0700" fill /fill
    if dd if=/dev/urandom of=/fill/data bs=1M count="$fill" 2>/dev/null; then
        echo "RAMSNAP-FILLED mib=$fill"
    else
        err "fill of ${fill} MiB failed"
    fi
fi

# The first disk appears asynchronously after virtio_blk is loaded: if there is a virtio block
# device (virtio device id 2), wait up to ~3 s for /dev/vda.
disk=""
i=30
cat /sys/bus/virtio/devices/*/device 2>/dev/null | grep -q '^0x0002$' && i=0
while [ $i -lt 30 ]; do
    if [ -b /dev/vda ]; then disk=/dev/vda; break; fi
    i=$((i + 1))
    sleep 0.1
done

# Disk contract (when /dev/vda exists):
#   sector 0: "RAMSNAP token=<t> counter=<n>\n", NUL-padded, rewritten every tick;
#   sector 1: "RAMSNAP-BOOTSTAMP token=<t>\n", NUL-padded, written once at boot.
# Every tick, before writing, the guest reads both sectors back with O_DIRECT (bypassing its page
# cache) and compares them with what it wrote: after a restore whose disk does not hold the
# snapshot-time state (overlay opened without its backing file, wrong chain) it prints
# RAMSNAP-DISK-MISMATCH. (Sector 1 catches a lost backing file deterministically; sector 0 catches
# a stale disk unless the snapshot fell between the read and the write of a tick.)
stamp=""
if [ -n "$disk" ]; then
    stamp="RAMSNAP-BOOTSTAMP token=$token"
    printf '%s\n' "$stamp" | dd of="$disk" bs=512 seek=1 count=1 conv=sync,notrunc,fsync 2>/dev/null \
        || err "disk write failed"
fi
dbg "disk=${disk:-none}"
n=0
last=""
while :; do
    n=$((n + 1))
    echo "RAMSNAP-TICK token=$token counter=$n"
    if [ -n "$disk" ]; then
        f0="$(dd if="$disk" bs=512 count=1 iflag=direct 2>/dev/null | tr -d '\000' | head -n1)"
        f1="$(dd if="$disk" bs=512 skip=1 count=1 iflag=direct 2>/dev/null | tr -d '\000' | head -n1)"
        if [ "$f1" != "$stamp" ] || { [ -n "$last" ] && [ "$f0" != "$last" ]; }; then
            echo "RAMSNAP-DISK-MISMATCH counter=$n expected=\"$last|$stamp\" found=\"$f0|$f1\""
        fi
        last="RAMSNAP token=$token counter=$n"
        printf '%s\n' "$last" \
            | dd of="$disk" bs=512 count=1 conv=sync,notrunc,fsync 2>/dev/null \
            || err "disk write failed"
    fi
    sleep 0.2
done
