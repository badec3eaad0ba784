#!/usr/bin/python3
"""The specification's flow from Python, against running ramsnap services:
create a VM, run it, take a snapshot with its memory, stop it, preview the
snapshot with Restore Memory, commit, and run it again: it must resume
(RESTORING_STATE, then UP) instead of booting. Exits non-zero otherwise.

    bash clients/python/generate.sh
    /usr/bin/python3 clients/python/example.py --target 127.0.0.1:50051 \
        --tls-dir /var/lib/ramsnap/tls --cluster default --domain-id DOMAIN_ID

The data domain is given by id (the storage service's ListDomains has the
names; this example talks to the coordinator only).
"""
import argparse
import sys
import time

from ramsnap_client import Client
from ramsnap.snapshot.v1 import snapshot_pb2 as pb


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="127.0.0.1:50051")
    ap.add_argument("--tls-dir", default="/var/lib/ramsnap/tls")
    ap.add_argument("--cluster", default="default", help="the cluster's name")
    ap.add_argument("--domain-id", required=True, help="the data domain of the VM's disk")
    ap.add_argument("--name", default="py-demo")
    ap.add_argument("--kernel", default="vmlinux")
    ap.add_argument("--initrd", default="initramfs.img")
    args = ap.parse_args()

    with Client(args.target, tls_dir=args.tls_dir) as c:
        cluster = c.cluster_by_name(args.cluster)
        vm = c.create_vm(args.name, cluster.cluster_id, 256 << 20,
                         [pb.DiskSpec(domain_id=args.domain_id, capacity_bytes=64 << 20)],
                         kernel=args.kernel, initrd=args.initrd, cmdline="console=ttyS0")
        print(f"created VM {vm.vm_id} ({vm.name})")
        first = c.run(vm.vm_id)
        print(f"first run: {' -> '.join(first.statuses)}")
        if first.restored:
            print("error: a new VM resumed instead of booting", file=sys.stderr)
            return 1
        # Let the guest run a little, so that its memory is its own.
        time.sleep(1)
        snap = c.snapshot(vm.vm_id, memory=True, description="from python")
        print(f"snapshot {snap.snapshot_id}: memory {snap.has_memory}")
        if not snap.has_memory:
            print("error: the snapshot holds no memory", file=sys.stderr)
            return 1
        c.stop(vm.vm_id)
        warnings = c.preview(vm.vm_id, snap.snapshot_id, restore_memory=True)
        for w in warnings:
            print(f"warning: {w}")
        c.commit(vm.vm_id)
        again = c.run(vm.vm_id)
        print(f"run after commit: {' -> '.join(again.statuses)}")
        if not again.restored or again.statuses[-1] != "VM_STATUS_UP":
            print("error: the VM did not resume from its memory", file=sys.stderr)
            return 1
        listed = [s.description for s in c.list_snapshots(vm.vm_id)]
        print(f"snapshots: {listed}")
        c.stop(vm.vm_id)
        c.remove_vm(vm.vm_id)
        print("resumed from memory: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
