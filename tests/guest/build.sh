#!/usr/bin/env bash
# Build the ramsnap test guest from Debian packages (linux-image-amd64, busybox-static):
#
#   tests/guest/build.sh OUTDIR
#
# writes OUTDIR/vmlinuz (the newest /boot/vmlinuz-*), OUTDIR/vmlinux (the same kernel uncompressed,
# an ELF that QEMU boots via PVH: boots ~2.5 s faster under TCG; use it as <kernel> when present)
# and OUTDIR/initramfs.img (cpio newc, gzip: busybox-static, the virtio modules the kernel needs for
# /dev/vda, and tests/guest/init.sh as /init). The output is reproducible (fixed mtimes/owners, sorted, gzip -n); files whose content
# did not change are left untouched, so their mtimes stay stable. Takes well under a second.
#
# Environment: RAMSNAP_GUEST_KVER  kernel version to use (default: newest in /boot).
# Install the inputs with scripts/setup/libvirt.sh.
set -euo pipefail

die() { printf 'guest-build: ERROR: %s\n' "$*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 OUTDIR"
OUT="$1"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
INIT="$HERE/init.sh"
BUSYBOX=/bin/busybox

[ -f "$INIT" ] || die "missing $INIT"
[ -x "$BUSYBOX" ] || die "missing $BUSYBOX (apt-get install busybox-static)"
# busybox-static must really be static: the initramfs has no libc.
if command -v file >/dev/null 2>&1 && ! file -L "$BUSYBOX" | grep -q 'statically linked'; then
    die "$BUSYBOX is not statically linked (install busybox-static)"
fi
command -v cpio >/dev/null || die "missing cpio"

if [ -n "${RAMSNAP_GUEST_KVER:-}" ]; then
    KVER="$RAMSNAP_GUEST_KVER"
else
    KVER="$(ls -1 /boot/vmlinuz-* 2>/dev/null | sed 's#^/boot/vmlinuz-##' | sort -V | tail -n1)"
fi
[ -n "$KVER" ] && [ -f "/boot/vmlinuz-$KVER" ] || die "no kernel in /boot (apt-get install linux-image-amd64)"
MODDIR="/lib/modules/$KVER"
[ -f "$MODDIR/modules.dep" ] || die "missing $MODDIR/modules.dep"

mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/rsguest-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
ROOT="$WORK/root"
mkdir -p "$ROOT/bin" "$ROOT/dev" "$ROOT/proc" "$ROOT/sys" "$ROOT/tmp" "$ROOT/fill" "$ROOT/lib/modules"

cp "$BUSYBOX" "$ROOT/bin/busybox"
cp "$INIT" "$ROOT/init"
chmod 0755 "$ROOT/bin/busybox" "$ROOT/init"

# --- virtio modules: whatever of these is a module (=m) goes in, with its dependencies, in order.
WANTED="virtio_pci virtio_blk"
declare -A SEEN=()
ORDER=()
dep_of() { # module path relative to MODDIR -> its dependencies (space separated)
    awk -v m="$1:" '$1 == m { $1 = ""; print; exit }' "$MODDIR/modules.dep"
}
add_mod() { # relative path
    local rel="$1" d
    [ -n "${SEEN[$rel]:-}" ] && return 0
    SEEN[$rel]=1
    for d in $(dep_of "$rel"); do add_mod "$d"; done
    ORDER+=("$rel")
}
for name in $WANTED; do
    # modules.dep names files with '-' or '_' as in the source tree; match both spellings
    rel="$(awk -F: -v a="$name" '{ n = $1; sub(/.*\//, "", n); sub(/\.ko(\..*)?$/, "", n);
            gsub(/-/, "_", n); if (n == a) { print $1; exit } }' "$MODDIR/modules.dep")"
    if [ -z "$rel" ]; then
        # not a module: must be built in (modules.builtin), else the guest cannot see /dev/vda
        grep -q "/${name}.ko\$" "$MODDIR/modules.builtin" 2>/dev/null \
            || die "$name is neither a module nor built into kernel $KVER"
        continue
    fi
    add_mod "$rel"
done
: >"$ROOT/lib/modules/load-order"
for rel in "${ORDER[@]}"; do
    base="$(basename "$rel")"
    case "$base" in
        *.ko)     cp "$MODDIR/$rel" "$ROOT/lib/modules/$base" ;;
        *.ko.xz)  base="${base%.xz}"; xz -dc "$MODDIR/$rel" >"$ROOT/lib/modules/$base" ;;
        *.ko.zst) base="${base%.zst}"; zstd -qdc "$MODDIR/$rel" >"$ROOT/lib/modules/$base" ;;
        *.ko.gz)  base="${base%.gz}"; gzip -dc "$MODDIR/$rel" >"$ROOT/lib/modules/$base" ;;
        *) die "unknown module file $rel" ;;
    esac
    echo "$base" >>"$ROOT/lib/modules/load-order"
done

# --- reproducible cpio newc + gzip
find "$ROOT" -exec touch -h -d @0 {} +
(cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort \
    | cpio --quiet -o -H newc -R 0:0 --reproducible) | gzip -n -6 >"$WORK/initramfs.img"

install_if_changed() { # src dst
    if [ -f "$2" ] && cmp -s "$1" "$2"; then return 0; fi
    cp "$1" "$2.tmp.$$" && mv -f "$2.tmp.$$" "$2"
}
install_if_changed "$WORK/initramfs.img" "$OUT/initramfs.img"

# --- the kernel: vmlinuz as packaged, plus vmlinux = the same kernel uncompressed (an ELF with a
# PVH entry note, CONFIG_PVH=y). QEMU boots that ELF directly, skipping the bzImage's in-guest
# decompression, which under TCG takes ~2.5 s of a ~5.5 s boot. Re-extracted only when vmlinuz
# changed.
extract_vmlinux() { # bzImage out: find the compressed payload by its magic, decompress it
    local img="$1" out="$2" i magic tool off
    local magics=($'\xfd7zXZ' $'\x28\xb5\x2f\xfd' $'\x1f\x8b\x08')
    local tools=("xz -dc" "zstd -qdc" "gzip -dc")
    for i in 0 1 2; do
        magic="${magics[$i]}"; tool="${tools[$i]}"
        command -v "${tool%% *}" >/dev/null 2>&1 || continue
        for off in $(LC_ALL=C grep -abo "$magic" "$img" 2>/dev/null | cut -d: -f1 | head -n 5); do
            # the payload is followed by other data: the decompressor complains but has written it
            tail -c "+$((off + 1))" "$img" | $tool >"$out" 2>/dev/null || true
            if [ "$(head -c 4 "$out" 2>/dev/null | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; then
                return 0
            fi
        done
    done
    rm -f "$out"
    return 1
}
if [ -f "$OUT/vmlinux" ] && [ -f "$OUT/vmlinuz" ] && cmp -s "/boot/vmlinuz-$KVER" "$OUT/vmlinuz"; then
    : # unchanged
else
    rm -f "$OUT/vmlinux"
    if extract_vmlinux "/boot/vmlinuz-$KVER" "$WORK/vmlinux"; then
        mv -f "$WORK/vmlinux" "$OUT/vmlinux"
    else
        echo "guest-build: WARNING: could not extract an ELF vmlinux; use vmlinuz (slower boot)" >&2
    fi
fi
install_if_changed "/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
chmod 0644 "$OUT/initramfs.img" "$OUT/vmlinuz"
[ -f "$OUT/vmlinux" ] && chmod 0644 "$OUT/vmlinux"
echo "guest-build: $OUT/vmlinuz ($KVER)$([ -f "$OUT/vmlinux" ] && echo " $OUT/vmlinux") $OUT/initramfs.img ($(stat -c %s "$OUT/initramfs.img") bytes;" \
    "modules: $(tr '\n' ' ' <"$ROOT/lib/modules/load-order"))" >&2
