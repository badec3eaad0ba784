#!/usr/bin/env bash
# Runs ramsnap's embedded default on this machine: ramsnapd (snapshot, storage
# and host services in one process) with a local FILE domain, a FILE EXPORT
# domain and a BLOCK domain on a loop device over a sparse file, all three attached by ramsnapd
# itself at start (--domain). Safe to run again: what exists is reused, and a domain found at its
# location is adopted.
#
#   scripts/run-embedded.sh [extra ramsnapd flags]     # Ctrl-C stops it
#
# Environment (defaults in brackets):
#   RAMSNAP_DATA_DIR          data root [/var/lib/ramsnap]
#   RAMSNAP_BLOCK_SIZE        size of the sparse file behind the BLOCK domain [20G]
#   RAMSNAP_SNAPSHOT_LISTEN   [127.0.0.1:50051]
#   RAMSNAP_STORAGE_LISTEN    [127.0.0.1:50052]
#   RAMSNAP_HOST_LISTEN       [127.0.0.1:50053]
#   RAMSNAP_BUILD_PROFILE     cargo profile of the binaries it builds and runs [release]
#   RAMSNAP_PREBUILT          1: run the binaries already in target/ without building
set -euo pipefail

log() { printf 'run-embedded: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (loop devices, LVM, libvirt)"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA_DIR="${RAMSNAP_DATA_DIR:-/var/lib/ramsnap}"
FILE_DOMAIN="$DATA_DIR/domains/local"
EXPORT_DOMAIN="$DATA_DIR/domains/export"
BLOCK_FILE="$DATA_DIR/block/default.img"
BLOCK_SIZE="${RAMSNAP_BLOCK_SIZE:-20G}"
SNAPSHOT_LISTEN="${RAMSNAP_SNAPSHOT_LISTEN:-127.0.0.1:50051}"
STORAGE_LISTEN="${RAMSNAP_STORAGE_LISTEN:-127.0.0.1:50052}"
HOST_LISTEN="${RAMSNAP_HOST_LISTEN:-127.0.0.1:50053}"
export LVM_SUPPRESS_FD_WARNINGS=1

# 1. What the host needs.
for part in packages libvirt; do
    if [ -f "$ROOT/scripts/setup/$part.sh" ]; then
        log "running scripts/setup/$part.sh"
        bash "$ROOT/scripts/setup/$part.sh" >&2
    fi
done

# 2. The binaries.
PROFILE="${RAMSNAP_BUILD_PROFILE:-release}"
case "$PROFILE" in
    release) DIR=release ;;
    dev | debug) PROFILE=dev DIR=debug ;;
    *) die "RAMSNAP_BUILD_PROFILE must be release or debug, not $PROFILE" ;;
esac
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (https://rustup.rs), then run this again"
RAMSNAPD="$ROOT/target/$DIR/ramsnapd"
if [ "${RAMSNAP_PREBUILT:-}" = 1 ] && [ -x "$RAMSNAPD" ] && [ -x "$ROOT/target/$DIR/ramsnap" ]; then
    log "using the binaries in target/$DIR as they are (RAMSNAP_PREBUILT=1)"
else
    log "building ramsnapd and the ramsnap CLI ($PROFILE)"
    (cd "$ROOT" && cargo build --profile "$PROFILE" -p ramsnapd -p ramsnap-cli)
fi

# The demo guest (tests/guest/) in the host's boot-image directory:
# vmlinux + initramfs.img, named by VmSpec.kernel / initrd.
log "building the demo guest into $DATA_DIR/boot"
mkdir -p "$DATA_DIR/boot"
bash "$ROOT/tests/guest/build.sh" "$DATA_DIR/boot" >&2

# 3. The storage behind the two domains.
mkdir -p "$FILE_DOMAIN" "$EXPORT_DOMAIN" "$(dirname "$BLOCK_FILE")"
if [ ! -f "$BLOCK_FILE" ]; then
    log "creating sparse $BLOCK_FILE ($BLOCK_SIZE)"
    truncate -s "$BLOCK_SIZE" "$BLOCK_FILE"
fi
LOOP="$(losetup -j "$BLOCK_FILE" | head -n1 | cut -d: -f1)"
if [ -z "$LOOP" ]; then
    # Direct I/O to the file: a PV on a real device has no page cache
    # beneath it (the storage agent attaches its LVs the same way).
    LOOP="$(losetup --direct-io=on --find --show "$BLOCK_FILE")"
    log "attached $BLOCK_FILE as $LOOP"
fi

RAMSNAP="$ROOT/target/$DIR/ramsnap"

cat >&2 <<EOF
run-embedded: starting ramsnapd ($RAMSNAPD)
  snapshot service  $SNAPSHOT_LISTEN
  storage service   $STORAGE_LISTEN
  host service      $HOST_LISTEN
  data              $DATA_DIR (storage state in $DATA_DIR/storage)
  FILE domain       local-file  at $FILE_DOMAIN
  BLOCK domain      local-block on $LOOP (backed by $BLOCK_FILE)
  EXPORT domain     local-export at $EXPORT_DOMAIN (for vm export / vm import)
  TLS               mutual TLS; a local CA and certificates in $DATA_DIR/tls (the CLI uses them)
  try               $RAMSNAP domain list   (the quick tour in README.md)
  grpcurl           grpcurl -cacert $DATA_DIR/tls/ca.pem -cert $DATA_DIR/tls/admin.pem -key $DATA_DIR/tls/admin.key $SNAPSHOT_LISTEN list
  stop              Ctrl-C, or kill -TERM $$ (ramsnapd keeps this PID)
  clean up after    losetup -d $LOOP; rm -rf $DATA_DIR
EOF

# ramsnapd replaces this shell, so Ctrl-C and SIGTERM reach it directly.
exec "$RAMSNAPD" \
    --snapshot-listen "$SNAPSHOT_LISTEN" \
    --storage-listen "$STORAGE_LISTEN" \
    --host-listen "$HOST_LISTEN" \
    --data-dir "$DATA_DIR" \
    --block-device "$LOOP" \
    --domain "local-file=file:$FILE_DOMAIN" \
    --domain "local-block=block:$LOOP" \
    --domain "local-export=export:$EXPORT_DOMAIN" \
    "$@"
