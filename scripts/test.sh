#!/usr/bin/env bash
# The README's test command: installs and starts what the tests need (apt
# packages, libvirtd, PostgreSQL, buf/grpcurl/kubernetes-validate), builds
# every binary (the end-to-end tests run the real ones), then runs the whole
# workspace's tests against real LVM on loop devices, real SQLite and a real
# PostgreSQL. Root.
#
# The test binaries run two at a time: two workers take them from one
# queue, the longest first (the real-guest suites and the crash tests),
# so that both stay busy to the end. Each binary runs as `cargo test`
# would run it (in its package's directory, its tests on parallel
# threads); its output is printed whole when it ends, with its time, and
# a summary follows.
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
# The queue: the binaries known to take longest first, then the rest in
# cargo's order.
: > "$logs/queue"
for slow in crash_restart export_import acceptance guest crash_agents crash_guest sagas_sim \
    ovirt_import domains shared_domain fork replicas suspend saga_executor live_merge two_hosts; do
    grep -E "/deps/${slow}-[0-9a-f]+\$" "$logs/binaries" >> "$logs/queue" || true
done
grep -v -F -x -f "$logs/queue" "$logs/binaries" >> "$logs/queue" || true

# Takes the next binary off the queue ("" when it is empty).
next() {
    flock "$logs/queue.lock" sh -c '
        n=$(wc -l < "$1")
        if [ "$n" -gt 0 ]; then head -1 "$1"; tail -n +2 "$1" > "$1.tmp"; mv "$1.tmp" "$1"; fi' _ "$logs/queue"
}

# Runs binaries off the queue until it is empty; records each result.
worker() {
    local name=$1 line dir exe log t0 rc
    while line=$(next) && [ -n "$line" ]; do
        read -r dir exe <<< "$line"
        log="$logs/$(basename "$exe").log"
        t0=$(date +%s)
        rc=0
        (cd "$dir" && "$exe") > "$log" 2>&1 || rc=$?
        # Whole, under a lock, so that the two workers' outputs do not interleave.
        {
            echo "     Running $(basename "$exe") [worker $name, $(($(date +%s) - t0))s, rc=$rc] in $dir"
            cat "$log"
        } | flock "$logs/print.lock" cat
        echo "$rc $(($(date +%s) - t0))s $name $(basename "$exe")" >> "$logs/results"
    done
}

start=$(date +%s)
worker 1 &
first=$!
worker 2
wait "$first"
# The documentation examples, as `cargo test` runs them after the binaries.
rc=0
t0=$(date +%s)
cargo test --workspace --doc > "$logs/doc.log" 2>&1 || rc=$?
cat "$logs/doc.log"
echo "$rc $(($(date +%s) - t0))s - doc-tests" >> "$logs/results"

echo
echo "== test binaries: $(($(wc -l < "$logs/results") - 1)) of $total ran, and the doc tests, in $(($(date +%s) - start))s (two at a time)"
sort -k2 -n -r "$logs/results" | head -12 | sed 's/^/   /'
failed=$(awk '$1 != 0' "$logs/results")
if [ "$(wc -l < "$logs/results")" -ne "$((total + 1))" ] || [ -n "$failed" ]; then
    echo "FAILED:"
    echo "$failed"
    exit 1
fi
echo "all passed"
