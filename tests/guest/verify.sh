#!/usr/bin/env bash
# Hand verification of the test guest under real libvirt/QEMU (TCG): boot, live external snapshot
# with memory, destroy, restore onto a fresh overlay (same token, counter continues), a non-live
# snapshot + restore, a negative check (restore XML that keeps the embedded <backingStore/> => the
# guest reports RAMSNAP-DISK-MISMATCH), and a cold boot (new token). Prints timings and a closing
# "1 passed, 0 failed" line. Cleans up its domain and files on exit (even on failure).
#
#   tests/guest/verify.sh                                   # 256 MiB guest
#   RSGUEST_MEM_MIB=1024 RSGUEST_FILL_MIB=600 tests/guest/verify.sh   # benchmark-size guest
#
# Environment: RSGUEST_MEM_MIB (256), RSGUEST_FILL_MIB (0), RSGUEST_NEGATIVE (1 = run the
# negative check), RSGUEST_KERNEL (vmlinux = PVH ELF, default; or vmlinuz), RSGUEST_KEEP (1 = keep
# the work dir), TMPDIR. Takes ~35 s (256 MiB) or ~65 s (1 GiB, fill 600) on 2 cores.
# Needs libvirtd running (scripts/setup/libvirt.sh). Uses domain names prefixed "rsguest-".
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export LIBVIRT_DEFAULT_URI=qemu:///system
MEM_MIB="${RSGUEST_MEM_MIB:-256}"
FILL_MIB="${RSGUEST_FILL_MIB:-0}"
NEGATIVE="${RSGUEST_NEGATIVE:-1}"
NAME="rsguest-verify-$$"
W="$(mktemp -d "${TMPDIR:-/tmp}/rsguest-verify.XXXXXX")"
LOG="$W/console.log"

say() { printf '[verify %s] %s\n' "$(date +%T)" "$*" >&2; }
fail() { say "FAIL: $*"; [ -f "$LOG" ] && { say "console tail:"; tail -n 5 "$LOG" | tr -d '\r' >&2; }; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

cleanup() {
    virsh destroy "$NAME" >/dev/null 2>&1 || true
    virsh undefine "$NAME" --snapshots-metadata >/dev/null 2>&1 || true
    rm -f "/var/log/libvirt/qemu/$NAME.log"
    if [ "${RSGUEST_KEEP:-0}" = 1 ]; then say "kept $W"; else rm -rf "$W"; fi
}
trap cleanup EXIT

# ---- console-log helpers (lines end in \r\n: the guest writes to a tty) ----
lines() { tr -d '\r' <"$LOG" 2>/dev/null || true; }
lines_after_mark() { lines | awk -v m="$1" 'found { print } $0 == m { found = 1 }'; }
mark() { echo "$1" >>"$LOG"; }     # our own marker lines in the log (append='on' keeps them)
wait_for() { # SECS MARK REGEX: wait until a line after MARK (or anywhere, MARK="") matches REGEX
    local secs="$1" m="$2" re="$3" deadline
    deadline=$(( $(date +%s) + secs ))
    while :; do
        if [ -n "$m" ]; then lines_after_mark "$m"; else lines; fi | grep -qE "$re" && return 0
        [ "$(date +%s)" -ge "$deadline" ] && return 1
        sleep 0.1
    done
}
last_tick() { # MARK -> "token counter" of the last TICK after MARK
    { if [ -n "$1" ]; then lines_after_mark "$1"; else lines; fi; } \
        | sed -n 's/^RAMSNAP-TICK token=\([0-9a-f]*\) counter=\([0-9]*\)$/\1 \2/p' | tail -n1
}
first_tick() {
    { if [ -n "$1" ]; then lines_after_mark "$1"; else lines; fi; } \
        | sed -n 's/^RAMSNAP-TICK token=\([0-9a-f]*\) counter=\([0-9]*\)$/\1 \2/p' | head -n1
}
disk_counter() { # qcow2 image -> counter written in its sector 0 (reads through the backing chain)
    local hex
    hex="$(qemu-io -r -U -f qcow2 -c 'read -v 0 64' "$1" 2>/dev/null \
        | sed -n 's/^[0-9a-f]*: *\(\([0-9a-f][0-9a-f] \)*\).*/\1/p' | tr -d '\n' \
        | sed -e 's/ *$//' -e 's/ 00//g' -e 's/^00//' -e 's/\([0-9a-f][0-9a-f]\) */\\x\1/g')"
    printf '%b' "$hex" | sed -n 's/^RAMSNAP token=[0-9a-f]* counter=\([0-9]*\)$/\1/p'
}

# ---- build + define ----
"$HERE/build.sh" "$W/guest" 2>/dev/null
KERNEL="$W/guest/${RSGUEST_KERNEL:-vmlinux}"
[ -f "$KERNEL" ] || KERNEL="$W/guest/vmlinuz"
qemu-img create -q -f qcow2 "$W/base.qcow2" 64M
CMDLINE="console=ttyS0 loglevel=0 panic=-1"
[ "$FILL_MIB" -gt 0 ] && CMDLINE="$CMDLINE ramsnap.fill=$FILL_MIB"
sed -e "s#@NAME@#$NAME#" -e "s#@MEMORY_MIB@#$MEM_MIB#" -e "s#@KERNEL@#$KERNEL#" \
    -e "s#@INITRD@#$W/guest/initramfs.img#" -e "s#@CMDLINE@#$CMDLINE#" \
    -e "s#@DISK@#$W/base.qcow2#" -e "s#@CONSOLE_LOG@#$LOG#g" "$HERE/domain.xml.in" >"$W/domain.xml"
virsh define "$W/domain.xml" >/dev/null

snapxml() { # NAME MEMFILE OVERLAY OUT
    sed -e "s#@SNAPSHOT_NAME@#$1#" -e "s#@MEMORY_FILE@#$2#" -e "s#@OVERLAY@#$3#" \
        "$HERE/snapshot.xml.in" >"$4"
}
restore_xml() { # MEMFILE OLD_DISK NEW_OVERLAY OUT: embedded XML, chain stripped, disk -> overlay
    virsh save-image-dumpxml "$1" --security-info | awk -f "$HERE/strip-backing.awk" \
        | sed -e "s#<source file='$2'/>#<source file='$3'/>#" >"$4"
    grep -q "<source file='$3'/>" "$4" || fail "disk $2 not found in the XML of $1"
}

snapshot_timed() { # XMLFILE [virsh flags...]: sets SNAP_S (command) and PAUSE_S (guest paused)
    local xml="$1"; shift
    virsh event --domain "$NAME" --event lifecycle --loop --timestamp --timeout 60 >"$W/events" 2>&1 &
    local evpid=$! t0 t1
    sleep 0.5
    t0=$(now); virsh snapshot-create "$NAME" "$xml" "$@" >/dev/null; t1=$(now)
    sleep 0.3; kill "$evpid" 2>/dev/null || true; wait "$evpid" 2>/dev/null || true
    SNAP_S=$(elapsed "$t0" "$t1")
    # "2026-11-26 10:54:52.297+0000: event 'lifecycle' for domain 'x': Suspended Paused"
    PAUSE_S=$(sed -e 's/^[0-9-]* \([0-9:.]*\)+[0-9]*: /\1 /' "$W/events" \
        | awk '/Suspended/ && !s { s = $1 } /Resumed/ && s && !r { r = $1 }
            END { if (s && r) { split(s, a, ":"); split(r, b, ":");
                  printf "%.3f", (b[1]*3600 + b[2]*60 + b[3]) - (a[1]*3600 + a[2]*60 + a[3]) }
                  else print "0" }')
}

# ---- 1. cold boot ----
t0=$(now); virsh start "$NAME" >/dev/null
wait_for 300 "" '^RAMSNAP-TICK ' || fail "no TICK within 300 s of start"
t1=$(now); BOOT_S=$(elapsed "$t0" "$t1")
TOKEN=$(lines | sed -n 's/^RAMSNAP-BOOT token=\([0-9a-f]*\)$/\1/p' | head -n1)
[ -n "$TOKEN" ] || fail "no BOOT line"
say "booted ($(basename "$KERNEL")): token=$TOKEN, start->first TICK ${BOOT_S}s"
if [ "$FILL_MIB" -gt 0 ]; then
    # the fill runs before the first TICK, so it is included in BOOT_S
    lines | grep -q "^RAMSNAP-FILLED mib=$FILL_MIB\$" || fail "no FILLED line"
fi
wait_for 60 "" ' counter=(1[0-9]|[2-9][0-9]|[0-9]{3,})$' || fail "counter did not reach 10"

# ---- 2. live external snapshot with memory ----
snapxml s1 "$W/s1.mem" "$W/s1-overlay.qcow2" "$W/s1.xml"
snapshot_timed "$W/s1.xml" --live
SNAP_LIVE_S=$SNAP_S; LIVE_PAUSE_S=$PAUSE_S
after=$(last_tick "" | cut -d' ' -f2)
S1_DISK=$(disk_counter "$W/base.qcow2")   # base is frozen at the snapshot: its last write
SNAP_LIVE_BYTES=$(stat -c %s "$W/s1.mem")
say "live snapshot: ${SNAP_LIVE_S}s (guest paused ${LIVE_PAUSE_S}s), memory file ${SNAP_LIVE_BYTES} bytes, disk counter at snapshot $S1_DISK"
[ "$(virsh domstate "$NAME")" = running ] || fail "not running after live snapshot"
wait_for 30 "" " counter=$((after + 5))\$" || fail "guest did not go on after the snapshot"
virsh destroy "$NAME" >/dev/null

# ---- 3. restore onto a fresh overlay over the snapshot's base ----
qemu-img create -q -f qcow2 -F qcow2 -b "$W/base.qcow2" "$W/r1.qcow2"
restore_xml "$W/s1.mem" "$W/base.qcow2" "$W/r1.qcow2" "$W/r1.xml"
mark "### restore-1"
t0=$(now); virsh restore "$W/s1.mem" --xml "$W/r1.xml" >/dev/null; t1=$(now)
RESTORE_S=$(elapsed "$t0" "$t1")
wait_for 30 "### restore-1" '^RAMSNAP-TICK ' || fail "no TICK after restore"
t2=$(now); RESTORE_TICK_S=$(elapsed "$t0" "$t2")
sleep 2
read -r rtok rfirst < <(first_tick "### restore-1")
lines_after_mark "### restore-1" | grep -q '^RAMSNAP-BOOT' && fail "guest rebooted on restore"
lines_after_mark "### restore-1" | grep -q '^RAMSNAP-DISK-MISMATCH' && fail "disk mismatch after restore"
[ "$rtok" = "$TOKEN" ] || fail "token after restore $rtok != $TOKEN"
[ "$rfirst" -gt "$S1_DISK" ] && [ "$rfirst" -le $((S1_DISK + 2)) ] \
    || fail "first counter after restore $rfirst, disk at snapshot $S1_DISK"
say "restore: ${RESTORE_S}s (virsh restore), ${RESTORE_TICK_S}s to first TICK; same token, counter resumed at $rfirst"

# ---- 4. non-live snapshot (guest paused during the dump), no metadata, then restore ----
snapxml s2 "$W/s2.mem" "$W/s2-overlay.qcow2" "$W/s2.xml"
snapshot_timed "$W/s2.xml" --no-metadata
SNAP_PAUSED_S=$SNAP_S; NONLIVE_PAUSE_S=$PAUSE_S
S2_DISK=$(disk_counter "$W/r1.qcow2")
say "non-live snapshot: ${SNAP_PAUSED_S}s, memory file $(stat -c %s "$W/s2.mem") bytes, guest paused ${NONLIVE_PAUSE_S}s (Suspended->Resumed events)"
sleep 1
virsh destroy "$NAME" >/dev/null
qemu-img create -q -f qcow2 -F qcow2 -b "$W/r1.qcow2" "$W/r2.qcow2"
restore_xml "$W/s2.mem" "$W/r1.qcow2" "$W/r2.qcow2" "$W/r2.xml"
mark "### restore-2"
t0=$(now); virsh restore "$W/s2.mem" --xml "$W/r2.xml" >/dev/null; t1=$(now)
RESTORE2_S=$(elapsed "$t0" "$t1")
wait_for 30 "### restore-2" '^RAMSNAP-TICK .*' || fail "no TICK after restore 2"
sleep 2
read -r rtok rfirst < <(first_tick "### restore-2")
lines_after_mark "### restore-2" | grep -qE '^RAMSNAP-(BOOT|DISK-MISMATCH)' && fail "reboot or mismatch after restore 2"
[ "$rtok" = "$TOKEN" ] && [ "$rfirst" -gt "$S2_DISK" ] && [ "$rfirst" -le $((S2_DISK + 2)) ] \
    || fail "restore 2: token $rtok counter $rfirst (disk at snapshot $S2_DISK)"
say "restore of non-live snapshot: ${RESTORE2_S}s; counter resumed at $rfirst"
virsh destroy "$NAME" >/dev/null

# ---- 5. negative: only the disk source rewritten, the embedded <backingStore/> kept => libvirt opens
#      the new overlay WITHOUT its backing file and the guest sees an empty disk (MISMATCH line).
if [ "$NEGATIVE" = 1 ]; then
    qemu-img create -q -f qcow2 -F qcow2 -b "$W/base.qcow2" "$W/bad.qcow2"
    virsh save-image-dumpxml "$W/s1.mem" --security-info \
        | sed -e "s#<source file='$W/base.qcow2'/>#<source file='$W/bad.qcow2'/>#" >"$W/bad.xml"
    grep -q '<backingStore/>' "$W/bad.xml" || say "note: no <backingStore/> in the embedded XML"
    mark "### restore-bad"
    virsh restore "$W/s1.mem" --xml "$W/bad.xml" >/dev/null
    if wait_for 15 "### restore-bad" '^RAMSNAP-DISK-MISMATCH'; then
        say "negative check: embedded <backingStore/> kept => $(lines_after_mark '### restore-bad' | grep -m1 '^RAMSNAP-DISK-MISMATCH')"
    else
        fail "negative check: expected RAMSNAP-DISK-MISMATCH when the overlay is opened without backing"
    fi
    virsh destroy "$NAME" >/dev/null
fi

# ---- 6. cold boot again: a new token ----
mark "### cold-boot"
virsh start "$NAME" >/dev/null
wait_for 120 "### cold-boot" '^RAMSNAP-TICK ' || fail "no TICK after cold boot"
NEW_TOKEN=$(lines_after_mark "### cold-boot" | sed -n 's/^RAMSNAP-BOOT token=\([0-9a-f]*\)$/\1/p' | head -n1)
[ -n "$NEW_TOKEN" ] && [ "$NEW_TOKEN" != "$TOKEN" ] || fail "cold boot token '$NEW_TOKEN' (old $TOKEN)"
say "cold boot: new token $NEW_TOKEN"

echo "RESULT kernel=$(basename "$KERNEL") mem_mib=$MEM_MIB fill_mib=$FILL_MIB boot_to_tick_s=$BOOT_S snapshot_live_s=$SNAP_LIVE_S" \
     "snapshot_live_bytes=$SNAP_LIVE_BYTES restore_s=$RESTORE_S restore_to_tick_s=$RESTORE_TICK_S" \
     "live_pause_s=$LIVE_PAUSE_S snapshot_nonlive_s=$SNAP_PAUSED_S nonlive_pause_s=$NONLIVE_PAUSE_S restore2_s=$RESTORE2_S"
echo "1 passed, 0 failed"
