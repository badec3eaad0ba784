"""A small typed wrapper over ramsnap's generated gRPC stubs.

Every call that changes something returns an Operation at once; `wait`
follows it (WatchOperation) to its end and raises `OperationFailed` when it
failed or was cancelled. `run` also follows the VM (WatchVm) until it is UP,
and says which statuses it went through (RESTORING_STATE when it resumed
from saved memory, POWERING_UP when it booted).

    from ramsnap_client import Client
    with Client("127.0.0.1:50051", tls_dir="/var/lib/ramsnap/tls") as c:
        vm = c.vm_by_name("demo")
        snap = c.snapshot(vm.vm_id, memory=True, description="before upgrade")

Generate the stubs first: `bash clients/python/generate.sh`.
"""
from __future__ import annotations

import dataclasses
import os
import uuid
from typing import Iterator, List, Optional

import grpc

from ramsnap.snapshot.v1 import snapshot_pb2 as pb
from ramsnap.snapshot.v1 import snapshot_pb2_grpc as rpc

TERMINAL = {
    pb.OPERATION_STATE_SUCCEEDED,
    pb.OPERATION_STATE_FAILED,
    pb.OPERATION_STATE_CANCELLED,
}


class OperationFailed(Exception):
    """An operation that ended FAILED or CANCELLED."""

    def __init__(self, op: pb.Operation):
        self.operation = op
        state = pb.OperationState.Name(op.state)
        super().__init__(f"{op.kind} {op.operation_id} {state}: {op.error_code} {op.error_message}")


@dataclasses.dataclass
class Run:
    """A run that reached UP: the statuses on the way, first to last."""

    statuses: List[str]

    @property
    def restored(self) -> bool:
        return "VM_STATUS_RESTORING_STATE" in self.statuses


class Client:
    """The coordinator's services over one channel: mutual TLS with the
    certificates of `tls_dir` (ca.pem, and <identity>.pem/.key), or plain
    text with `insecure=True`."""

    def __init__(self, target: str, tls_dir: Optional[str] = None, identity: str = "admin",
                 insecure: bool = False, timeout: float = 600.0):
        if insecure:
            self.channel = grpc.insecure_channel(target)
        else:
            tls_dir = tls_dir or "/var/lib/ramsnap/tls"
            read = lambda name: open(os.path.join(tls_dir, name), "rb").read()
            creds = grpc.ssl_channel_credentials(
                root_certificates=read("ca.pem"),
                private_key=read(f"{identity}.key"),
                certificate_chain=read(f"{identity}.pem"),
            )
            self.channel = grpc.secure_channel(target, creds)
        self.timeout = timeout
        self.clusters = rpc.ClusterServiceStub(self.channel)
        self.vms = rpc.VmServiceStub(self.channel)
        self.snapshots = rpc.SnapshotServiceStub(self.channel)
        self.operations = rpc.OperationServiceStub(self.channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.channel.close()

    # --- operations -------------------------------------------------------

    def wait(self, op: pb.Operation) -> pb.Operation:
        """Follows `op` to its end; raises OperationFailed unless it succeeded."""
        last = op
        if last.state not in TERMINAL:
            stream = self.operations.WatchOperation(
                pb.WatchOperationRequest(operation_id=op.operation_id), timeout=self.timeout)
            for event in stream:
                last = event.operation
                if last.state in TERMINAL:
                    break
        if last.state != pb.OPERATION_STATE_SUCCEEDED:
            raise OperationFailed(last)
        return last

    @staticmethod
    def _rid() -> str:
        return str(uuid.uuid4())

    # --- lists, every page --------------------------------------------------

    def list_vms(self) -> Iterator[pb.Vm]:
        token = ""
        while True:
            page = self.vms.ListVms(pb.ListVmsRequest(page_token=token), timeout=self.timeout)
            yield from page.vms
            if not page.next_page_token:
                return
            token = page.next_page_token

    def list_snapshots(self, vm_id: str) -> List[pb.Snapshot]:
        out, token = [], ""
        while True:
            page = self.snapshots.ListSnapshots(
                pb.ListSnapshotsRequest(vm_id=vm_id, page_token=token), timeout=self.timeout)
            out.extend(page.snapshots)
            if not page.next_page_token:
                return out
            token = page.next_page_token

    def vm_by_name(self, name: str) -> pb.Vm:
        hits = [v for v in self.list_vms() if v.name == name]
        if len(hits) != 1:
            raise LookupError(f"{len(hits)} VMs are named {name!r}")
        return hits[0]

    def cluster_by_name(self, name: str) -> pb.Cluster:
        hits = [c for c in self.clusters.ListClusters(pb.ListClustersRequest()).clusters
                if c.name == name]
        if len(hits) != 1:
            raise LookupError(f"{len(hits)} clusters are named {name!r}")
        return hits[0]

    def vm(self, vm_id: str) -> pb.Vm:
        return self.vms.GetVm(pb.GetVmRequest(vm_id=vm_id), timeout=self.timeout).vm

    # --- the flows ------------------------------------------------------------

    def create_vm(self, name: str, cluster_id: str, memory_bytes: int, disks: List[pb.DiskSpec],
                  kernel: str = "", initrd: str = "", cmdline: str = "") -> pb.Vm:
        op = self.vms.CreateVm(pb.CreateVmRequest(
            request_id=self._rid(), name=name, cluster_id=cluster_id, memory_bytes=memory_bytes,
            vcpus=1, disks=disks, kernel=kernel, initrd=initrd, cmdline=cmdline),
            timeout=self.timeout).operation
        done = self.wait(op)
        return self.vm(done.result_vm_id or done.vm_id)

    def run(self, vm_id: str) -> Run:
        """Runs the VM and follows it until it is UP."""
        watch = self.vms.WatchVm(pb.WatchVmRequest(vm_id=vm_id), timeout=self.timeout)
        first = next(watch)
        statuses = [pb.VmStatus.Name(first.status)]
        self.wait(self.vms.RunVm(pb.RunVmRequest(request_id=self._rid(), vm_id=vm_id),
                                 timeout=self.timeout).operation)
        for event in watch:
            name = pb.VmStatus.Name(event.status)
            if name != statuses[-1]:
                statuses.append(name)
            if event.status == pb.VM_STATUS_UP:
                watch.cancel()
                return Run(statuses)
            if event.status == pb.VM_STATUS_DOWN and len(statuses) > 2:
                raise RuntimeError(f"VM {vm_id} went down while it started: {statuses}")
        raise RuntimeError(f"the status stream of VM {vm_id} ended: {statuses}")

    def stop(self, vm_id: str) -> None:
        self.wait(self.vms.StopVm(pb.StopVmRequest(request_id=self._rid(), vm_id=vm_id),
                                  timeout=self.timeout).operation)

    def snapshot(self, vm_id: str, memory: bool, description: str, live: bool = False) -> pb.Snapshot:
        mode = (pb.MEMORY_MODE_LIVE if live else pb.MEMORY_MODE_PAUSED) if memory \
            else pb.MEMORY_MODE_UNSPECIFIED
        op = self.snapshots.CreateSnapshot(pb.CreateSnapshotRequest(
            request_id=self._rid(), vm_id=vm_id, description=description, save_memory=memory,
            memory_mode=mode), timeout=self.timeout).operation
        done = self.wait(op)
        return self.snapshots.GetSnapshot(
            pb.GetSnapshotRequest(snapshot_id=done.snapshot_id), timeout=self.timeout).snapshot

    def preview(self, vm_id: str, snapshot_id: str, restore_memory: bool) -> List[str]:
        r = self.snapshots.PreviewSnapshot(pb.PreviewSnapshotRequest(
            request_id=self._rid(), vm_id=vm_id, snapshot_id=snapshot_id,
            restore_memory=restore_memory), timeout=self.timeout)
        self.wait(r.operation)
        return list(r.warnings)

    def commit(self, vm_id: str) -> None:
        self.wait(self.snapshots.CommitSnapshot(pb.CommitSnapshotRequest(
            request_id=self._rid(), vm_id=vm_id), timeout=self.timeout).operation)

    def remove_vm(self, vm_id: str) -> None:
        self.wait(self.vms.RemoveVm(pb.RemoveVmRequest(request_id=self._rid(), vm_id=vm_id),
                                    timeout=self.timeout).operation)
