#!/usr/bin/env bash
# Builds the container image of image/Containerfile with buildah (root):
#   1. the base, localhost/ramsnap-base:bookworm, from Debian packages with
#      debootstrap (once; no registry needed);
#   2. the release binaries with the host's cargo, into image/bin;
#   3. buildah bud (vfs storage, chroot isolation: works in a VM or a
#      container without user namespaces).
# Environment: RAMSNAP_IMAGE [ghcr.io/ramsnap/ramsnap:0.1.0],
# RAMSNAP_DEBIAN_MIRROR [http://deb.debian.org/debian].
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGE="${RAMSNAP_IMAGE:-ghcr.io/ramsnap/ramsnap:0.1.0}"
MIRROR="${RAMSNAP_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
log() { printf 'build-image: %s\n' "$*" >&2; }
need=()
command -v buildah >/dev/null 2>&1 || need+=(buildah)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
if ((${#need[@]})); then
    log "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
B=(buildah --storage-driver vfs)

if ! "${B[@]}" inspect --type image localhost/ramsnap-base:bookworm >/dev/null 2>&1; then
    rootfs="$(mktemp -d)"
    trap 'rm -rf "$rootfs"' EXIT
    log "debootstrap bookworm (minbase) from $MIRROR"
    debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >/dev/null
    ctr="$("${B[@]}" from scratch)"
    mnt="$("${B[@]}" mount "$ctr")"
    cp -a "$rootfs/." "$mnt/"
    "${B[@]}" umount "$ctr" >/dev/null
    "${B[@]}" commit --quiet "$ctr" localhost/ramsnap-base:bookworm >/dev/null
    "${B[@]}" rm "$ctr" >/dev/null
fi

log "building the release binaries"
(cd "$ROOT" && cargo build --release --bins)
rm -rf "$ROOT/image/bin" && mkdir -p "$ROOT/image/bin"
for b in ramsnapd ramsnap ramsnap-snapshot ramsnap-storage ramsnap-host; do
    install -m 0755 "$ROOT/target/release/$b" "$ROOT/image/bin/$b"
done

log "buildah bud -> $IMAGE"
"${B[@]}" bud --isolation chroot --layers=false -t "$IMAGE" -f "$ROOT/image/Containerfile" "$ROOT/image"
"${B[@]}" images "$IMAGE"

# What the image must hold, checked inside it: every binary runs, as the
# non-root user, with qemu-img, lvm2 and the libvirt client library.
log "checking the image"
ctr="$("${B[@]}" from "$IMAGE")"
out="$("${B[@]}" run --isolation chroot "$ctr" -- sh -c '
    set -e
    id -u
    for b in ramsnapd ramsnap ramsnap-snapshot ramsnap-storage ramsnap-host; do "$b" --version; done
    qemu-img --version | head -n1
    LVM_SUPPRESS_FD_WARNINGS=1 lvm version 2>/dev/null | head -n1
    ldd /usr/local/bin/ramsnap-host | grep -c "libvirt.so.0 => /"
')"
"${B[@]}" rm "$ctr" >/dev/null
printf '%s\n' "$out" >&2
[ "$(printf '%s\n' "$out" | head -n1)" = 10001 ] || { log "ERROR: the image does not run as uid 10001"; exit 1; }
for want in "ramsnapd 0.1.0" "ramsnap 0.1.0" "qemu-img version" "LVM version"; do
    grep -q "$want" <<<"$out" || { log "ERROR: '$want' missing in the image"; exit 1; }
done
log "image $IMAGE ok"
