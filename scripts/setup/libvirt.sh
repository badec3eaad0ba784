#!/usr/bin/env bash
# Install (when missing), configure and start libvirtd + QEMU on a Debian 12 machine without
# systemd, running as root. Idempotent: safe to run again while libvirtd is already running.
#
#   scripts/setup/libvirt.sh            # install if needed, configure, start, wait until it answers
#
# Environment:
#   RAMSNAP_LIBVIRT_WAIT_SECS   how long to wait for `virsh -c qemu:///system version` (default 30)
#
# Facts behind this script (see /work/shared/ENVIRONMENT.md and tests/guest/README.md):
# - nested KVM hangs guests on these machines: domains must use TCG (<domain type='qemu'>);
# - the machine may ship a newer qemu-utils (backports) than bookworm's qemu-system-x86, which then
#   conflicts: qemu-utils is pinned to qemu-system-x86's candidate version (--allow-downgrades);
# - the QEMU driver looks up the system user `libvirt-qemu` at start even when qemu.conf says root,
#   and fails to initialise without it.
set -euo pipefail

log() { printf 'libvirt-setup: %s\n' "$*" >&2; }
die() { printf 'libvirt-setup: ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"

WAIT_SECS="${RAMSNAP_LIBVIRT_WAIT_SECS:-30}"
URI="qemu:///system"

# --------------------------------------------------------------------------------------------
# 1. Install packages when something is missing.
# --------------------------------------------------------------------------------------------
have_all() {
    command -v virsh >/dev/null 2>&1 || return 1
    command -v libvirtd >/dev/null 2>&1 || [ -x /usr/sbin/libvirtd ] || return 1
    command -v virtlogd >/dev/null 2>&1 || [ -x /usr/sbin/virtlogd ] || return 1
    command -v qemu-system-x86_64 >/dev/null 2>&1 || return 1
    command -v qemu-img >/dev/null 2>&1 || return 1
    command -v cpio >/dev/null 2>&1 || return 1
    [ -x /bin/busybox ] || return 1
    [ -f /usr/share/pkgconfig/libvirt.pc ] || [ -f /usr/lib/x86_64-linux-gnu/pkgconfig/libvirt.pc ] \
        || return 1
    compgen -G '/boot/vmlinuz-*' >/dev/null || return 1
    # the kernel's modules must be there too (the guest initramfs needs virtio_blk & co.)
    local k
    k="$(ls -1 /boot/vmlinuz-* | sed 's#^/boot/vmlinuz-##' | sort -V | tail -n1)"
    [ -d "/lib/modules/$k/kernel" ] || return 1
    return 0
}

if have_all; then
    log "packages already present"
else
    log "installing libvirt, QEMU and guest material (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null || apt-get update
    QEMU_V="$(apt-cache policy qemu-system-x86 | awk '/Candidate:/{print $2}')"
    if [ -z "$QEMU_V" ] || [ "$QEMU_V" = "(none)" ]; then
        die "apt has no candidate for qemu-system-x86"
    fi
    # ONE install command: qemu-utils pinned to qemu-system-x86's version so that a newer
    # (backports) qemu-utils does not block it; --allow-downgrades for that pin.
    apt-get install -y -q --allow-downgrades --no-install-recommends \
        libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev \
        qemu-system-x86 "qemu-utils=$QEMU_V" \
        linux-image-amd64 busybox-static cpio \
        || die "apt-get install failed"
    have_all || die "packages installed but some tool is still missing (virsh/libvirtd/qemu/kernel/busybox)"
fi

# --------------------------------------------------------------------------------------------
# 2. Configure (no systemd: directories, groups, the libvirt-qemu user, qemu.conf).
# --------------------------------------------------------------------------------------------
mkdir -p /var/log/libvirt/qemu /var/lib/libvirt/qemu /var/lib/libvirt/images /var/cache/libvirt \
    /run/libvirt /etc/libvirt

getent group kvm >/dev/null || groupadd --system kvm
getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
if ! getent passwd libvirt-qemu >/dev/null; then
    useradd --system --no-create-home --home-dir /var/lib/libvirt --shell /usr/sbin/nologin \
        --gid libvirt-qemu --groups kvm libvirt-qemu
fi

QEMU_CONF=/etc/libvirt/qemu.conf
set_conf() { # key value: replace an uncommented `key = ...` line, else append one
    local key="$1" value="$2"
    touch "$QEMU_CONF"
    if grep -qE "^[[:space:]]*${key}[[:space:]]*=" "$QEMU_CONF"; then
        local cur
        cur="$(grep -E "^[[:space:]]*${key}[[:space:]]*=" "$QEMU_CONF" | tail -n1)"
        if [ "$cur" != "${key} = ${value}" ]; then
            sed -i -E "s|^[[:space:]]*${key}[[:space:]]*=.*$|${key} = ${value}|" "$QEMU_CONF"
            CONF_CHANGED=1
        fi
    else
        printf '%s = %s\n' "$key" "$value" >>"$QEMU_CONF"
        CONF_CHANGED=1
    fi
}
CONF_CHANGED=0
set_conf user '"root"'
set_conf group '"root"'
set_conf security_driver '"none"'
set_conf cgroup_controllers '[ ]'
set_conf remember_owner '0'

# --------------------------------------------------------------------------------------------
# 3. Start virtlogd and libvirtd unless they already run, then wait until libvirt answers.
# --------------------------------------------------------------------------------------------
running() { pgrep -x "$1" >/dev/null 2>&1; }

if ! running virtlogd; then
    log "starting virtlogd"
    virtlogd -d
fi
if running libvirtd && [ "$CONF_CHANGED" = 1 ]; then
    log "WARNING: qemu.conf changed while libvirtd runs; it is not restarted (restart it by hand if needed)"
fi
if ! running libvirtd; then
    log "starting libvirtd"
    libvirtd -d
fi

deadline=$(( $(date +%s) + WAIT_SECS ))
until timeout 10 virsh -c "$URI" version >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
        log "virsh -c $URI version says:"
        timeout 10 virsh -c "$URI" version >&2 || true
        die "libvirtd did not answer on $URI within ${WAIT_SECS}s (is libvirtd running? see /var/log/libvirt)"
    fi
    sleep 0.5
done
log "libvirtd answers on $URI ($(virsh -c "$URI" version 2>/dev/null | awk '/hypervisor:/{print $0}'))"
