#!/usr/bin/env bash
# The README's test command: installs and starts what the tests need (apt
# packages, libvirtd, PostgreSQL, buf/grpcurl/kubernetes-validate), builds
# every binary (the end-to-end tests run the real ones), then runs the whole
# workspace's tests against real LVM on loop devices, real SQLite and a real
# PostgreSQL. Root.
#
# The test binaries run in two lanes at once: the suites that drive a real
# guest (the `tests` package and ramsnap-host's guest tests), and the rest
# (unit tests, simulated hosts, the coordinator's crash and replica tests,
# the storage domains). Each binary runs as `cargo test` would run it (in
# its package's directory, its tests on parallel threads); its output is
# printed whole when it ends, with its time, and a summary follows.
#
# Extra arguments go to `cargo test` instead, in one lane:
#   bash scripts/test.sh -p ramsnap-storage --test domains
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
export RAMSNAP_TEST_PG_URL="${RAMSNAP_TEST_PG_URL:-postgres://ramsnap:ramsnap@127.0.0.1:5432/ramsnap}"
export LVM_SUPPRESS_FD_WARNINGS=1
export PATH="/usr/local/bin:$PATH"

cargo build --workspace --bins
if [ $# -gt 0 ]; then
    exec cargo test --workspace --no-fail-fast "$@"
fi

logs=$(mktemp -d /tmp/ramsnap-test-lanes.XXXXXX)
# "<package dir> <executable>" for every test binary, in cargo's order.
cargo test --workspace --no-run --message-format=json |
    sed -n 's/.*"manifest_path":"\([^"]*\)".*"profile":{[^}]*"test":true}.*"executable":"\([^"]*\)".*/\1 \2/p' |
    while read -r manifest exe; do echo "$(dirname "$manifest") $exe"; done > "$logs/binaries"
total=$(wc -l < "$logs/binaries")
if [ "$total" -lt 30 ]; then
    echo "test.sh: found only $total test binaries; the list is wrong" >&2
    cat "$logs/binaries" >&2
    exit 1
fi
grep -E '^'"$PWD"'/tests |/ramsnap-host .*/deps/guest-' "$logs/binaries" > "$logs/guest" || true
grep -v -F -x -f "$logs/guest" "$logs/binaries" > "$logs/rest" || true

# Runs the binaries listed in $1, one after another; records each result.
lane() {
    local list=$1 name=$2 dir exe log t0 rc
    while read -r dir exe; do
        log="$logs/$(basename "$exe").log"
        t0=$(date +%s)
        rc=0
        (cd "$dir" && "$exe") > "$log" 2>&1 || rc=$?
        # Whole, under a lock, so that the two lanes' outputs do not interleave.
        {
            echo "     Running $(basename "$exe") [$name lane, $(($(date +%s) - t0))s, rc=$rc] in $dir"
            cat "$log"
        } | flock "$logs/print.lock" cat
        echo "$rc $(($(date +%s) - t0))s $name $(basename "$exe")" >> "$logs/results"
    done < "$list"
}

start=$(date +%s)
lane "$logs/guest" guest &
guest_pid=$!
lane "$logs/rest" rest
# The documentation examples, as `cargo test` runs them after the binaries.
rc=0
cargo test --workspace --doc > "$logs/doc.log" 2>&1 || rc=$?
flock "$logs/print.lock" cat "$logs/doc.log"
echo "$rc 0s rest doc-tests" >> "$logs/results"
wait "$guest_pid"

echo
echo "== test binaries: $(($(wc -l < "$logs/results") - 1)) of $total ran, and the doc tests, in $(($(date +%s) - start))s (two lanes)"
sort -k2 -n -r "$logs/results" | head -12 | sed 's/^/   /'
failed=$(awk '$1 != 0' "$logs/results")
if [ "$(wc -l < "$logs/results")" -ne "$((total + 1))" ] || [ -n "$failed" ]; then
    echo "FAILED:"
    echo "$failed"
    exit 1
fi
echo "all passed"
