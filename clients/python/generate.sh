#!/usr/bin/env bash
# Generates the Python stubs of ramsnap's API from proto/ into
# clients/python/ramsnap/ (the `ramsnap.<service>.v1` packages):
# messages (protoc --python_out) and gRPC stubs (gRPC's Python plugin, the
# generator grpcio-tools bundles). Uses Debian's protobuf-compiler and
# protobuf-compiler-grpc (installed when missing, as root): the grpcio-tools
# that Debian 12 packages (1.14) predates proto3 `optional`, which the API
# uses. Idempotent; the output is not committed.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
[ -x /usr/bin/grpc_python_plugin ] || need+=(protobuf-compiler-grpc)
/usr/bin/python3 -c 'import grpc, google.protobuf' 2>/dev/null || need+=(python3-grpcio python3-protobuf)
if ((${#need[@]})); then
    echo "python client: installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
rm -rf "$HERE/ramsnap"
mkdir -p "$HERE/ramsnap"
protoc -I "$ROOT/proto" \
    --python_out="$HERE" \
    --grpc_python_out="$HERE" \
    --plugin=protoc-gen-grpc_python=/usr/bin/grpc_python_plugin \
    $(cd "$ROOT/proto" && find ramsnap -name '*.proto' | sort)
echo "python client: stubs in $HERE/ramsnap" >&2
