#!/usr/bin/env bash
# Checks the protobuf API under proto/ (module declared in buf.yaml, v2, at
# the repository root):
#   buf build                          - every .proto compiles, imports resolve
#   buf lint                           - STANDARD rules (buf.yaml)
#   buf format --diff --exit-code      - canonical formatting; prints the diff
# Exits non-zero if any step fails. Fix formatting with `buf format -w`.
# Needs buf (scripts/setup/tools.sh installs it).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if ! command -v buf >/dev/null 2>&1; then
    echo "check-proto: buf not installed (run scripts/setup/tools.sh)" >&2
    exit 2
fi

fail=0
run() {
    local name="$1"; shift
    if "$@"; then
        echo "ok   $name"
    else
        echo "FAIL $name"
        fail=1
    fi
}

echo "check-proto: buf $(buf --version), $(find proto -name '*.proto' | wc -l) proto files"
run "buf build" buf build -o /dev/null
run "buf lint" buf lint
run "buf format --diff --exit-code" buf format --diff --exit-code
# buf.gen.yaml generates (into a scratch directory), when its local plugins
# are installed (scripts/setup/packages.sh installs them).
if command -v protoc >/dev/null 2>&1 && [ -x /usr/bin/grpc_python_plugin ]; then
    gen="$(mktemp -d)"
    run "buf generate (buf.gen.yaml)" buf generate -o "$gen"
    rm -rf "$gen"
fi

if [ "$fail" -ne 0 ]; then
    echo "check-proto: FAILED" >&2
    exit 1
fi
echo "check-proto: all checks passed"
