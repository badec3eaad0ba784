#!/usr/bin/env bash
# The one entry point that installs and starts everything the tests need, by
# running the parts under scripts/setup/ in order, each when present:
#   packages.sh   Debian packages
#   libvirt.sh    libvirtd + QEMU, started without systemd
#   postgres.sh   a local PostgreSQL 15 with the ramsnap role and database
#   tools.sh      buf, grpcurl, kubernetes-validate
# Every part is idempotent, so this is too. Run as root. The parts log to
# stderr; this prints one summary line per part on stdout (with what the part
# printed on its stdout, such as the database URL).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

for part in packages libvirt postgres tools; do
    script="scripts/setup/$part.sh"
    if [ ! -f "$script" ]; then
        echo "setup: $part: skipped (no $script)"
        continue
    fi
    started=$(date +%s)
    out="$(bash "$script")" || {
        status=$?
        echo "setup: $part: FAILED (exit $status after $(($(date +%s) - started))s; see its messages above)"
        exit "$status"
    }
    # One line, whatever the part printed on stdout.
    detail="$(printf '%s' "$out" | paste -sd ';' - | sed 's/;/; /g')"
    echo "setup: $part: ok in $(($(date +%s) - started))s${detail:+ ($detail)}"
done
