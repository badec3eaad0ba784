#!/usr/bin/env bash
# Installs the Debian packages the build and the storage tests need, when
# missing: LVM (block domains), pkg-config (for libvirt-dev, see libvirt.sh),
# e2fsprogs (tests put a file system on a device to see it refused) and
# protobuf-free build tools. Idempotent; root.
set -euo pipefail

need=()
command -v lvcreate >/dev/null 2>&1 || need+=(lvm2)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v mkfs.ext4 >/dev/null 2>&1 || need+=(e2fsprogs)
command -v losetup >/dev/null 2>&1 || need+=(mount)
command -v cc >/dev/null 2>&1 || need+=(gcc libc6-dev)
command -v qemu-img >/dev/null 2>&1 || need+=(qemu-utils)
# The end-to-end tests' guest (tests/guest/build.sh) extracts vmlinux from
# the xz-compressed Debian kernel.
command -v xz >/dev/null 2>&1 || need+=(xz-utils)
# The Python client (clients/python): its stubs' generator and runtime.
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
[ -x /usr/bin/grpc_python_plugin ] || need+=(protobuf-compiler-grpc)
/usr/bin/python3 -c 'import grpc, google.protobuf' 2>/dev/null || need+=(python3-grpcio python3-protobuf)

if ((${#need[@]})); then
  echo "packages: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Loop devices: the block-domain tests attach several at once.
[ -e /dev/loop-control ] || modprobe loop 2>/dev/null || true
echo "packages: ok (lvm $(lvm version 2>/dev/null | awk '/LVM version/{print $3}'))" >&2
