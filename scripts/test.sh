#!/usr/bin/env bash
# The README's test command: installs and starts what the tests need (apt
# packages, libvirtd, PostgreSQL, buf/grpcurl/kubernetes-validate), builds
# every binary (the end-to-end tests run the real ones), then runs the whole
# workspace's tests against real LVM on loop devices, real SQLite and a real
# PostgreSQL. Root. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
export RAMSNAP_TEST_PG_URL="${RAMSNAP_TEST_PG_URL:-postgres://ramsnap:ramsnap@127.0.0.1:5432/ramsnap}"
export LVM_SUPPRESS_FD_WARNINGS=1
export PATH="/usr/local/bin:$PATH"

cargo build --workspace --bins
cargo test --workspace --no-fail-fast "$@"
