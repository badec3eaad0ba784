//! Crash and restart at every saga node, with the REAL coordinator binary
//! (`ramsnap-snapshot`, a process of its own, on a SQLite file or, for a
//! few sagas, on a PostgreSQL database of its own), the real StorageService
//! and the simulated HostService in the test process (`support/`: they
//! outlive every coordinator restart, as real agents would).
//!
//! For each saga, each of its nodes, and both failpoint actions (`crash`:
//! the process exits once the node's start is logged; `crash_after`: once
//! its action ran, before its success is logged), a fresh environment:
//!
//! 1. the saga's scenario is set up through the coordinator's gRPC API, with
//!    a coordinator started without failpoints;
//! 2. the coordinator is restarted with `RAMSNAP_FAILPOINTS=<saga>.<node>=<action>`
//!    and the flow is started (its reply may be lost in the crash: the call
//!    is retried with the same request id after the restart);
//! 3. the process must exit with code 86 (the failpoint fired);
//! 4. the coordinator is started again, without failpoints, on the same
//!    database: it resumes the saga from its log;
//! 5. the operation must end SUCCEEDED (a crash is not a failure: the saga
//!    completes), the VMs unlocked and their status settled, matching the
//!    host's, the database in the flow's end state (checked per flow, and
//!    compared with the end state of the same scenario run without a
//!    crash), and the storage inventory with no orphan volume and no
//!    missing one.
//!
//! The coordinator binary is the one cargo builds beside the test binaries
//! (`target/debug/ramsnap-snapshot`).
mod support;

use ramsnap_proto::host::v1 as host;
use ramsnap_proto::snapshot::v1 as pb;
use ramsnap_proto::storage::v1 as storage;
use ramsnap_snapshot::sagas;
use std::collections::{BTreeSet, HashMap};
use std::ops::{Deref, DerefMut};
use std::process::ExitStatus;
use std::time::Duration;
use support::process::{tail, Backend, CoordinatorProcess, CRASH_EXIT_CODE};
use support::{act_with, setup, state, Agents, Env, HostCall, State};
use uuid::Uuid;

// ---------------------------------------------------------------------------
// One environment: the agents in-process, the coordinator a process.

struct CrashSim {
    env: Env,
    db_url: String,
    coordinator: Option<CoordinatorProcess>,
    /// Coordinator processes started so far (each logs to a file of its own).
    starts: usize,
}

impl Deref for CrashSim {
    type Target = Env;
    fn deref(&self) -> &Env {
        &self.env
    }
}

impl DerefMut for CrashSim {
    fn deref_mut(&mut self) -> &mut Env {
        &mut self.env
    }
}

impl CrashSim {
    async fn start(backend: &Backend) -> CrashSim {
        let agents = Agents::start().await;
        let db_url = backend.fresh_database(agents.dir.path()).await;
        let log = agents.dir.path().join("coordinator-0.log");
        let coordinator = CoordinatorProcess::start(&db_url, None, log).await;
        let env = Env::new(agents, &coordinator.addr, "3.3").await;
        CrashSim {
            env,
            db_url,
            coordinator: Some(coordinator),
            starts: 1,
        }
    }

    /// Kills the coordinator (if it runs) and starts it again on the same
    /// database, with these failpoints.
    async fn restart(&mut self, failpoints: Option<&str>) {
        if let Some(c) = self.coordinator.take() {
            c.kill().await;
        }
        let log = self.dir.path().join(format!("coordinator-{}.log", self.starts));
        self.starts += 1;
        let c = CoordinatorProcess::start(&self.db_url, failpoints, log).await;
        self.env.reconnect(&c.addr).await;
        self.coordinator = Some(c);
    }

    /// Waits for the coordinator to exit by itself.
    async fn exited(&mut self) -> ExitStatus {
        let c = self.coordinator.take().expect("a coordinator runs");
        let log = c.log.clone();
        let status = c.exited().await;
        assert_eq!(
            status.code(),
            Some(CRASH_EXIT_CODE),
            "the coordinator exited with {status} instead of the failpoint's code; log:\n{}",
            tail(&log)
        );
        status
    }

    /// Waits until no VM is in a transitional status and each VM's status
    /// is what the host says.
    async fn settle(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let vms = self
                .vms
                .list_vms(pb::ListVmsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .vms;
            let unsettled: Vec<(String, i32, i32)> = vms
                .iter()
                .map(|v| (v.name.clone(), v.status, self.host.status(&v.vm_id)))
                .filter(|(_, status, on_host)| !settled(*status, *on_host))
                .collect();
            if unsettled.is_empty() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "VM status does not settle (name, coordinator's status, host's status): {unsettled:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The logs of every coordinator process of this environment.
    fn logs(&self) -> String {
        (0..self.starts)
            .map(|i| {
                let path = self.dir.path().join(format!("coordinator-{i}.log"));
                format!("--- coordinator-{i}.log (last lines)\n{}", tail(&path))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for CrashSim {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// A coordinator status that is final and agrees with the host's.
fn settled(status: i32, on_host: i32) -> bool {
    let on_host = host::VmStatus::try_from(on_host).unwrap_or(host::VmStatus::Down);
    match pb::VmStatus::try_from(status) {
        Ok(pb::VmStatus::Down) => on_host == host::VmStatus::Down,
        Ok(pb::VmStatus::Up) => on_host == host::VmStatus::Up,
        Ok(pb::VmStatus::Suspended) => on_host == host::VmStatus::Down,
        _ => false,
    }
}

// ---------------------------------------------------------------------------
// The end state, without ids: two runs of a scenario end in the same shape.

#[derive(Debug, PartialEq)]
struct Shape {
    vms: Vec<VmShape>,
    /// (label, parent's label, format, purpose, capacity) of every volume
    /// on the domain, by label.
    volumes: Vec<(usize, Option<usize>, i32, i32, u64)>,
    /// The same of every volume on the export domain (an export keeps the
    /// ids: a volume there has the label of its source).
    exported: Vec<(usize, Option<usize>, i32, i32, u64)>,
    /// (name, collapsed, snapshots, snapshots with memory) of every VM the
    /// export domain holds, by name.
    descriptors: Vec<(String, bool, usize, usize)>,
}

#[derive(Debug, PartialEq)]
struct VmShape {
    name: String,
    status: i32,
    locked: bool,
    snapshots: Vec<SnapshotShape>,
}

#[derive(Debug, PartialEq)]
struct SnapshotShape {
    snapshot_type: i32,
    status: i32,
    description: String,
    has_memory: bool,
    /// Labels of the disk volumes, and of the memory's dump and metadata.
    disks: Vec<usize>,
    memory: Option<(usize, usize)>,
}

/// Volume ids labelled in the order they are first met.
#[derive(Default)]
struct Labels {
    ids: Vec<String>,
    index: HashMap<String, usize>,
}

impl Labels {
    fn of(&mut self, id: &str) -> usize {
        if let Some(i) = self.index.get(id) {
            return *i;
        }
        self.ids.push(id.to_string());
        self.index.insert(id.to_string(), self.ids.len() - 1);
        self.ids.len() - 1
    }
}

async fn shape(sim: &mut Env) -> Shape {
    let mut vms = sim
        .vms
        .list_vms(pb::ListVmsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .vms;
    vms.sort_by(|a, b| a.name.cmp(&b.name));
    let mut labels = Labels::default();
    let mut out = Vec::new();
    for vm in vms {
        let mut snapshots = Vec::new();
        for s in sim.snapshots(&vm.vm_id).await {
            let disks = s
                .disks
                .iter()
                .map(|d| labels.of(&d.volume.as_ref().unwrap().volume_id))
                .collect();
            let memory = s.memory.as_ref().map(|m| {
                (
                    labels.of(&m.dump.as_ref().unwrap().volume_id),
                    labels.of(&m.metadata.as_ref().unwrap().volume_id),
                )
            });
            snapshots.push(SnapshotShape {
                snapshot_type: s.r#type,
                status: s.status,
                description: s.description.clone(),
                has_memory: s.has_memory,
                disks,
                memory,
            });
        }
        out.push(VmShape {
            name: vm.name,
            status: vm.status,
            locked: !vm.locked_by_operation_id.is_empty(),
            snapshots,
        });
    }
    let mut inventory = sim.inventory().await;
    // Volumes no snapshot reaches (none, if the inventory is right) last.
    inventory.sort_by(|a, b| a.description.cmp(&b.description));
    let by_id: HashMap<String, &storage::Volume> = inventory
        .iter()
        .map(|v| (v.r#ref.as_ref().unwrap().volume_id.clone(), v))
        .collect();
    let mut i = 0;
    while i < labels.ids.len() {
        if let Some(v) = by_id.get(&labels.ids[i]) {
            if !v.parent_volume_id.is_empty() {
                labels.of(&v.parent_volume_id);
            }
        }
        i += 1;
    }
    for v in &inventory {
        labels.of(&v.r#ref.as_ref().unwrap().volume_id);
    }
    let mut exported = sim.export_volumes().await;
    exported.sort_by(|a, b| {
        (&a.description, a.purpose, a.capacity_bytes).cmp(&(&b.description, b.purpose, b.capacity_bytes))
    });
    for v in &exported {
        labels.of(&v.r#ref.as_ref().unwrap().volume_id);
    }
    let described = |labels: &mut Labels, volumes: &[storage::Volume]| {
        let mut out: Vec<(usize, Option<usize>, i32, i32, u64)> = volumes
            .iter()
            .map(|v| {
                let parent = (!v.parent_volume_id.is_empty()).then(|| labels.of(&v.parent_volume_id));
                (
                    labels.of(&v.r#ref.as_ref().unwrap().volume_id),
                    parent,
                    v.format,
                    v.purpose,
                    v.capacity_bytes,
                )
            })
            .collect();
        out.sort();
        out
    };
    let volumes = described(&mut labels, &inventory);
    let exported = described(&mut labels, &exported);
    let listed = sim.exported_vms().await;
    assert!(listed.unreadable.is_empty(), "{listed:?}");
    let mut descriptors: Vec<(String, bool, usize, usize)> = listed
        .vms
        .iter()
        .map(|e| {
            let with_memory = e.snapshots.iter().filter(|s| s.has_memory).count();
            (e.name.clone(), e.collapsed, e.snapshots.len(), with_memory)
        })
        .collect();
    descriptors.sort();
    Shape {
        vms: out,
        volumes,
        exported,
        descriptors,
    }
}

// ---------------------------------------------------------------------------
// What each flow must have done.

fn snapshots_of<'a>(s: &'a State, vm: &str) -> Vec<&'a pb::Snapshot> {
    s.snapshots
        .iter()
        .filter(|(name, _)| name == vm)
        .map(|(_, s)| s)
        .collect()
}

fn of_type<'a>(s: &'a State, vm: &str, t: pb::SnapshotType) -> Option<&'a pb::Snapshot> {
    snapshots_of(s, vm).into_iter().find(|s| s.r#type == t as i32)
}

fn by_id<'a>(s: &'a State, id: &str) -> Option<&'a pb::Snapshot> {
    s.snapshots.iter().map(|(_, s)| s).find(|s| s.snapshot_id == id)
}

fn vm_row<'a>(s: &'a State, name: &str) -> Option<&'a (String, String, i32, String)> {
    s.vms.iter().find(|v| v.0 == name)
}

fn disk_volumes(s: &pb::Snapshot) -> Vec<String> {
    s.disks
        .iter()
        .map(|d| d.volume.as_ref().unwrap().volume_id.clone())
        .collect()
}

fn memory_volumes(s: &pb::Snapshot) -> Vec<String> {
    s.memory
        .iter()
        .flat_map(|m| [m.dump.as_ref().unwrap(), m.metadata.as_ref().unwrap()])
        .map(|r| r.volume_id.clone())
        .collect()
}

fn with(set: &BTreeSet<String>, added: &[String], removed: &[String]) -> BTreeSet<String> {
    let mut out = set.clone();
    out.extend(added.iter().cloned());
    for r in removed {
        out.remove(r);
    }
    out
}

/// The scenario's objects, as `setup` made them.
struct Scenario<'a> {
    vm: &'a str,
    snapshot: &'a str,
    before: &'a State,
    after: &'a State,
    op: &'a pb::Operation,
    /// What the host was asked since the setup.
    calls: &'a [HostCall],
    /// The failpoint the flow crashed at (`<node>=<action>`), if any.
    fault: Option<String>,
    parents: HashMap<String, String>,
}

const SUBJECT: &str = "subject";

/// Asserts the end state of each flow (its scenario is `support::setup`'s).
fn check_flow(saga: &str, c: &Scenario) {
    let (before, after) = (c.before, c.after);
    let active_before = of_type(before, SUBJECT, pb::SnapshotType::Active);
    let active = of_type(after, SUBJECT, pb::SnapshotType::Active);
    match saga {
        "vm_create" => {
            let created = vm_row(after, "created").expect("the VM is created");
            assert_eq!(created.1, c.op.result_vm_id);
            assert_eq!(created.2, pb::VmStatus::Down as i32);
            let snaps = snapshots_of(after, "created");
            assert_eq!(snaps.len(), 1, "{snaps:?}");
            assert_eq!(snaps[0].r#type, pb::SnapshotType::Active as i32);
            assert!(!snaps[0].has_memory);
            let disks = disk_volumes(snaps[0]);
            assert_eq!(disks.len(), 2);
            assert_eq!(after.volumes, with(&before.volumes, &disks, &[]));
        }
        "vm_remove" => {
            assert!(vm_row(after, SUBJECT).is_none(), "{:?}", after.vms);
            assert!(after.snapshots.is_empty());
            assert!(after.volumes.is_empty(), "{:?}", after.volumes);
        }
        "vm_run" => {
            // A stateless run of a VM whose ACTIVE snapshot holds s1's memory.
            let (active_before, active) = (active_before.unwrap(), active.unwrap());
            assert_eq!(vm_row(after, SUBJECT).unwrap().2, pb::VmStatus::Up as i32);
            let s1 = by_id(after, c.snapshot).unwrap();
            assert!(s1.has_memory);
            let stateless = of_type(after, SUBJECT, pb::SnapshotType::Stateless).expect("STATELESS");
            assert_eq!(stateless.snapshot_id, active_before.snapshot_id);
            assert_eq!(stateless.disks, active_before.disks);
            assert_eq!(stateless.memory, s1.memory, "STATELESS keeps the memory");
            assert!(!active.has_memory, "the run's ACTIVE drops the memory");
            for (d, s) in active.disks.iter().zip(&stateless.disks) {
                let (d, s) = (d.volume.as_ref().unwrap(), s.volume.as_ref().unwrap());
                assert_eq!(c.parents[&d.volume_id], s.volume_id, "the run's overlays");
            }
            assert_eq!(after.volumes, with(&before.volumes, &disk_volumes(active), &[]));
            let runs: Vec<&HostCall> = c
                .calls
                .iter()
                .filter(|h| matches!(h, HostCall::Run { .. }))
                .collect();
            assert_eq!(runs.len(), 1, "the host ran the VM once: {runs:?}");
            let HostCall::Run {
                restore_memory,
                disks,
                ..
            } = runs[0]
            else {
                unreachable!()
            };
            assert_eq!(*restore_memory, s1.memory, "the run restores s1's memory");
            let on: Vec<String> = disks.iter().map(|d| d.volume_id.clone()).collect();
            assert_eq!(on, disk_volumes(active));
        }
        "vm_update" => {
            // A down VM committed to s1's memory gets another machine.
            let (active_before, active) = (active_before.unwrap(), active.unwrap());
            assert!(active_before.has_memory);
            assert!(!active.has_memory, "the ACTIVE snapshot's memory is dropped");
            assert_eq!(active.snapshot_id, active_before.snapshot_id);
            assert!(by_id(after, c.snapshot).unwrap().has_memory, "s1 keeps it");
            assert_eq!(vm_row(after, SUBJECT).unwrap().2, pb::VmStatus::Down as i32);
            // s1 still refers to the memory: no volume goes.
            assert_eq!(after.volumes, before.volumes);
            assert_eq!(c.op.warnings.len(), 1, "{:?}", c.op);
        }
        "vm_stop" => {
            // The end of a stateless run: back to the STATELESS snapshot.
            let stateless = of_type(before, SUBJECT, pb::SnapshotType::Stateless).expect("STATELESS");
            let active = active.unwrap();
            assert_eq!(vm_row(after, SUBJECT).unwrap().2, pb::VmStatus::Down as i32);
            assert!(of_type(after, SUBJECT, pb::SnapshotType::Stateless).is_none());
            assert_eq!(active.snapshot_id, stateless.snapshot_id);
            assert_eq!(active.disks, stateless.disks);
            assert_eq!(active.memory, stateless.memory);
            let overlays = disk_volumes(active_before.unwrap());
            assert_eq!(after.volumes, with(&before.volumes, &[], &overlays));
            assert!(c.calls.iter().any(|h| matches!(h, HostCall::Stop { .. })));
        }
        "snapshot_create" => {
            let (active_before, active) = (active_before.unwrap(), active.unwrap());
            assert_eq!(vm_row(after, SUBJECT).unwrap().2, pb::VmStatus::Up as i32);
            let taken = by_id(after, &c.op.snapshot_id).expect("the new snapshot");
            assert_eq!(taken.r#type, pb::SnapshotType::Regular as i32);
            assert_eq!(taken.status, pb::SnapshotStatus::Ok as i32);
            assert_eq!(taken.description, "fault");
            assert!(taken.has_memory, "{taken:?}");
            assert_eq!(taken.disks, active_before.disks, "it freezes the leaves");
            assert_eq!(active.snapshot_id, active_before.snapshot_id);
            assert!(!active.has_memory);
            for (d, t) in active.disks.iter().zip(&taken.disks) {
                let (d, t) = (d.volume.as_ref().unwrap(), t.volume.as_ref().unwrap());
                assert_eq!(c.parents[&d.volume_id], t.volume_id, "the ACTIVE's overlays");
            }
            let added: Vec<String> = [disk_volumes(active), memory_volumes(taken)].concat();
            assert_eq!(after.volumes, with(&before.volumes, &added, &[]));
            let taken_on_host: Vec<&HostCall> = c
                .calls
                .iter()
                .filter(|h| matches!(h, HostCall::Snapshot { .. }))
                .collect();
            assert_eq!(taken_on_host.len(), 1, "one snapshot job: {:?}", c.calls);
            assert!(matches!(
                taken_on_host[0],
                HostCall::Snapshot {
                    memory: true,
                    memory_saved: true,
                    ..
                }
            ));
            // Replayed after the host took it: the same job id, joined.
            let joins = c
                .calls
                .iter()
                .filter(|h| matches!(h, HostCall::SnapshotJoin { .. }))
                .count();
            let replayed = c.fault.as_deref() == Some("host_snapshot=crash_after");
            assert_eq!(joins, usize::from(replayed), "{:?}", c.calls);
        }
        "vm_suspend" => {
            // A running VM, suspended: its memory on the ACTIVE snapshot,
            // the disks as they were.
            let (active_before, active) = (active_before.unwrap(), active.unwrap());
            assert_eq!(vm_row(after, SUBJECT).unwrap().2, pb::VmStatus::Suspended as i32);
            assert_eq!(active.snapshot_id, active_before.snapshot_id);
            assert_eq!(active.disks, active_before.disks, "no overlay");
            assert!(active.has_memory, "{active:?}");
            let memory = memory_volumes(active);
            assert_eq!(memory.len(), 2);
            assert_eq!(after.volumes, with(&before.volumes, &memory, &[]));
            let suspends: Vec<&HostCall> = c
                .calls
                .iter()
                .filter(|h| matches!(h, HostCall::Suspend { .. }))
                .collect();
            let replayed = c.fault.as_deref() == Some("host_suspend=crash_after");
            assert_eq!(suspends.len(), 1 + usize::from(replayed), "{:?}", c.calls);
            for s in suspends {
                let HostCall::Suspend { disks, memory, .. } = s else {
                    unreachable!()
                };
                let on: Vec<String> = disks.iter().map(|d| d.volume_id.clone()).collect();
                assert_eq!(on, disk_volumes(active), "the leaves");
                assert_eq!(memory, &active.memory, "into the ACTIVE's memory");
            }
        }
        "snapshot_remove" => {
            let s1 = by_id(before, c.snapshot).unwrap();
            assert!(by_id(after, c.snapshot).is_none(), "s1 is removed");
            assert_eq!(c.op.snapshot_id, c.snapshot);
            // The others are as they were (a merge repoints nothing).
            let others: Vec<&pb::Snapshot> = snapshots_of(before, SUBJECT)
                .into_iter()
                .filter(|s| s.snapshot_id != c.snapshot)
                .collect();
            assert_eq!(snapshots_of(after, SUBJECT), others);
            let gone: Vec<String> = [disk_volumes(s1), memory_volumes(s1)].concat();
            assert_eq!(gone.len(), 4);
            assert_eq!(after.volumes, with(&before.volumes, &[], &gone));
        }
        "snapshot_remove_live" => {
            // s1 goes while the VM runs: s2's volumes are committed into
            // s1's, s2 points at those, the ACTIVE is unchanged.
            let s1 = by_id(before, c.snapshot).unwrap();
            assert!(by_id(after, c.snapshot).is_none(), "s1 is removed");
            assert_eq!(c.op.snapshot_id, c.snapshot);
            assert_eq!(vm_row(after, SUBJECT).unwrap().2, pb::VmStatus::Up as i32);
            let s2_before = snapshots_of(before, SUBJECT)
                .into_iter()
                .find(|s| s.description == "s2")
                .expect("s2");
            let s2 = by_id(after, &s2_before.snapshot_id).expect("s2 stays");
            assert_eq!(s2.disks, s1.disks, "s2 now points at s1's volumes");
            assert_eq!(s2.memory, s2_before.memory, "s2 keeps its memory");
            assert_eq!(active, active_before, "the ACTIVE is unchanged");
            let gone: Vec<String> = [disk_volumes(s2_before), memory_volumes(s1)].concat();
            assert_eq!(after.volumes, with(&before.volumes, &[], &gone));
            let commits: Vec<&HostCall> = c
                .calls
                .iter()
                .filter(|h| matches!(h, HostCall::Commit { .. }))
                .collect();
            assert!(!commits.is_empty(), "{:?}", c.calls);
            for h in commits {
                let HostCall::Commit { top, base, .. } = h else {
                    unreachable!()
                };
                assert!(disk_volumes(s2_before).contains(&top.volume_id), "{h:?}");
                assert!(disk_volumes(s1).contains(&base.volume_id), "{h:?}");
            }
        }
        "snapshot_preview" => {
            let (active_before, active) = (active_before.unwrap(), active.unwrap());
            let s1_before = by_id(before, c.snapshot).unwrap();
            let s1 = by_id(after, c.snapshot).unwrap();
            assert_eq!(s1.status, pb::SnapshotStatus::InPreview as i32);
            assert_eq!(s1.memory, s1_before.memory);
            let preview = of_type(after, SUBJECT, pb::SnapshotType::Preview).expect("PREVIEW");
            assert_eq!(preview.snapshot_id, active_before.snapshot_id);
            assert_eq!(preview.disks, active_before.disks);
            assert_ne!(active.snapshot_id, active_before.snapshot_id);
            assert_eq!(active.memory, s1.memory, "restore memory: the ACTIVE holds s1's");
            for (d, s) in active.disks.iter().zip(&s1.disks) {
                let (d, s) = (d.volume.as_ref().unwrap(), s.volume.as_ref().unwrap());
                assert_eq!(c.parents[&d.volume_id], s.volume_id, "leaves branch off s1");
            }
            assert_eq!(after.volumes, with(&before.volumes, &disk_volumes(active), &[]));
        }
        "snapshot_undo" => {
            let preview = of_type(before, SUBJECT, pb::SnapshotType::Preview).expect("PREVIEW");
            let active = active.unwrap();
            assert!(of_type(after, SUBJECT, pb::SnapshotType::Preview).is_none());
            assert_eq!(active.snapshot_id, preview.snapshot_id);
            assert_eq!(active.disks, preview.disks);
            assert_eq!(active.memory, preview.memory);
            for s in snapshots_of(after, SUBJECT) {
                if s.r#type == pb::SnapshotType::Regular as i32 {
                    assert_eq!(s.status, pb::SnapshotStatus::Ok as i32, "{s:?}");
                    let was = by_id(before, &s.snapshot_id).unwrap();
                    assert_eq!((&s.disks, &s.memory), (&was.disks, &was.memory));
                }
            }
            assert_eq!(snapshots_of(after, SUBJECT).len(), 3, "s1, s2, ACTIVE");
            let leaves = disk_volumes(active_before.unwrap());
            assert_eq!(after.volumes, with(&before.volumes, &[], &leaves));
        }
        "snapshot_commit" => {
            let (active_before, active) = (active_before.unwrap(), active.unwrap());
            let preview = of_type(before, SUBJECT, pb::SnapshotType::Preview).expect("PREVIEW");
            let s1 = by_id(after, c.snapshot).unwrap();
            assert_eq!(s1.status, pb::SnapshotStatus::Ok as i32);
            assert!(of_type(after, SUBJECT, pb::SnapshotType::Preview).is_none());
            assert_eq!(
                active, active_before,
                "the ACTIVE keeps its leaves and s1's memory"
            );
            assert_eq!(active.memory, s1.memory);
            // s2 (newer than s1) is gone, with its volume and its memory.
            let newer: Vec<&pb::Snapshot> = snapshots_of(before, SUBJECT)
                .into_iter()
                .filter(|s| s.r#type == pb::SnapshotType::Regular as i32 && s.snapshot_id != c.snapshot)
                .collect();
            assert_eq!(newer.len(), 1);
            assert!(by_id(after, &newer[0].snapshot_id).is_none());
            assert_eq!(snapshots_of(after, SUBJECT).len(), 2, "s1, ACTIVE");
            let gone: Vec<String> = [
                disk_volumes(preview),
                disk_volumes(newer[0]),
                memory_volumes(newer[0]),
            ]
            .concat();
            assert_eq!(after.volumes, with(&before.volumes, &[], &gone));
        }
        "vm_clone" => {
            let cloned = vm_row(after, "cloned").expect("the clone");
            assert_eq!(cloned.1, c.op.result_vm_id);
            assert_eq!(cloned.2, pb::VmStatus::Down as i32);
            let snaps = snapshots_of(after, "cloned");
            assert_eq!(snaps.len(), 1);
            assert_eq!(snaps[0].r#type, pb::SnapshotType::Active as i32);
            // A fork (keep_memory): its own copy of s1's memory.
            assert!(snaps[0].has_memory, "a fork keeps the memory");
            let copies = disk_volumes(snaps[0]);
            assert_eq!(copies.len(), 2);
            for v in &copies {
                assert!(!c.parents.contains_key(v), "a standalone copy");
            }
            let memory = memory_volumes(snaps[0]);
            assert_eq!(memory.len(), 2);
            assert!(
                memory.iter().all(|v| !before.volumes.contains(v)),
                "the fork's memory is a copy"
            );
            assert_eq!(
                snapshots_of(after, SUBJECT),
                snapshots_of(before, SUBJECT),
                "the source is unchanged"
            );
            assert_eq!(
                after.volumes,
                with(&before.volumes, &[copies, memory].concat(), &[])
            );
        }
        "vm_export" => {
            // A down VM, s1 and the ACTIVE snapshot sharing s1's memory.
            assert_eq!(c.op.result_vm_id, c.vm);
            assert_eq!(vm_row(after, SUBJECT).unwrap().2, pb::VmStatus::Down as i32);
            assert_eq!(
                snapshots_of(after, SUBJECT),
                snapshots_of(before, SUBJECT),
                "the source is unchanged"
            );
            assert_eq!(
                after.volumes, before.volumes,
                "the source's volumes are unchanged"
            );
            assert!(before.export.is_empty(), "{:?}", before.export);
            // Every volume of the VM, ids kept (its chains and the memory,
            // once), and the descriptor.
            let mut expected = before.volumes.clone();
            expected.insert(format!("ovf:{}", c.vm));
            assert_eq!(after.export, expected);
            assert_eq!(before.volumes.len(), 6, "4 disk volumes, 1 memory pair");
            let dump = memory_volumes(active.unwrap())[0].clone();
            let verified: Vec<&HostCall> = c
                .calls
                .iter()
                .filter(|h| matches!(h, HostCall::Verify { .. }))
                .collect();
            assert!(!verified.is_empty(), "the memory was checksummed: {:?}", c.calls);
            for v in verified {
                let HostCall::Verify {
                    dump: d,
                    rebind_disk_domain_id,
                    rebind_disks,
                } = v
                else {
                    unreachable!()
                };
                assert_eq!(d.volume_id, dump, "{v:?}");
                assert!(
                    rebind_disk_domain_id.is_empty() && rebind_disks.is_empty(),
                    "{v:?}"
                );
            }
            assert!(!c.calls.iter().any(|h| matches!(h, HostCall::Run { .. })));
        }
        "vm_import" => {
            // Exported, then removed: imported back with its ids.
            assert!(before.vms.is_empty() && before.volumes.is_empty(), "{before:?}");
            assert_eq!(c.op.result_vm_id, c.vm);
            assert_eq!(vm_row(after, SUBJECT).unwrap().2, pb::VmStatus::Down as i32);
            let snaps = snapshots_of(after, SUBJECT);
            assert_eq!(snaps.len(), 2, "{snaps:?}");
            assert!(snaps.iter().all(|s| s.has_memory), "{snaps:?}");
            let (s1, active) = (by_id(after, c.snapshot).expect("s1"), active.expect("ACTIVE"));
            assert_eq!(s1.r#type, pb::SnapshotType::Regular as i32);
            assert_eq!(active.memory, s1.memory, "they share the memory again");
            for (d, s) in active.disks.iter().zip(&s1.disks) {
                let (d, s) = (d.volume.as_ref().unwrap(), s.volume.as_ref().unwrap());
                assert_eq!(c.parents[&d.volume_id], s.volume_id, "the chains, layer by layer");
            }
            let exported: BTreeSet<String> = before
                .export
                .iter()
                .filter(|v| !v.starts_with("ovf:"))
                .cloned()
                .collect();
            assert_eq!(after.volumes, exported, "the exported volumes, ids kept");
            assert_eq!(after.export, before.export, "the export is unchanged");
            let dump = memory_volumes(s1)[0].clone();
            let verified: Vec<&HostCall> = c
                .calls
                .iter()
                .filter(|h| matches!(h, HostCall::Verify { .. }))
                .collect();
            assert!(!verified.is_empty(), "the memory was checksummed: {:?}", c.calls);
            for v in verified {
                let HostCall::Verify {
                    dump: d,
                    rebind_disk_domain_id,
                    ..
                } = v
                else {
                    unreachable!()
                };
                assert_eq!(d.volume_id, dump, "{v:?}");
                assert_eq!(
                    *rebind_disk_domain_id, d.domain_id,
                    "rebound to the data domain: {v:?}"
                );
            }
        }
        other => panic!("no end state for saga {other}"),
    }
    if !matches!(saga, "vm_create" | "vm_remove") {
        assert_eq!(vm_row(after, SUBJECT).map(|v| v.1.as_str()), Some(c.vm));
    }
}

// ---------------------------------------------------------------------------
// The scenarios.

/// One run of the saga's scenario in a fresh environment; with a fault, the
/// coordinator runs the flow with that failpoint, crashes, and a new one
/// finishes it. Returns the end state's shape.
async fn run_scenario(saga: &str, backend: &Backend, fault: Option<(&str, &str)>) -> Shape {
    let what = match fault {
        Some((node, action)) => format!("{saga}.{node}={action}"),
        None => format!("{saga} without a crash"),
    };
    let mut sim = CrashSim::start(backend).await;
    let (vm, snapshot) = setup(&mut sim, saga).await;
    sim.assert_no_orphans().await;
    let before = state(&mut sim).await;
    let calls_before = sim.host.calls().len();
    let request_id = Uuid::new_v4().to_string();
    let op = match fault {
        None => {
            // Restarted all the same, so that the only difference is the crash.
            sim.restart(None).await;
            act_with(&mut sim, saga, &vm, &snapshot, &request_id)
                .await
                .unwrap_or_else(|e| panic!("{what}: starting the flow: {e:?}"))
                .expect("an operation")
        }
        Some(_) => {
            sim.restart(Some(&what)).await;
            // The reply is lost when the crash comes first.
            let first = act_with(&mut sim, saga, &vm, &snapshot, &request_id).await;
            sim.exited().await;
            sim.restart(None).await;
            let op = act_with(&mut sim, saga, &vm, &snapshot, &request_id)
                .await
                .unwrap_or_else(|e| panic!("{what}: the retried request after the restart: {e:?}"))
                .expect("an operation");
            if let Ok(Some(first)) = first {
                assert_eq!(
                    first.operation_id, op.operation_id,
                    "{what}: the retry is another operation"
                );
            }
            op
        }
    };
    let op = sim.wait(Some(op)).await;
    assert_eq!(
        op.state,
        pb::OperationState::Succeeded as i32,
        "{what}: the operation did not complete: {op:?}"
    );
    sim.settle().await;
    let after = state(&mut sim).await;
    for (name, _, status, locked) in &after.vms {
        assert!(locked.is_empty(), "{what}: VM {name} is still locked by {locked}");
        assert_ne!(*status, pb::VmStatus::ImageLocked as i32, "{what}: VM {name}");
    }
    let parents: HashMap<String, String> = sim
        .inventory()
        .await
        .into_iter()
        .filter(|v| !v.parent_volume_id.is_empty())
        .map(|v| (v.r#ref.unwrap().volume_id, v.parent_volume_id))
        .collect();
    let calls = sim.host.calls()[calls_before..].to_vec();
    let scenario = Scenario {
        vm: &vm,
        snapshot: &snapshot,
        before: &before,
        after: &after,
        op: &op,
        calls: &calls,
        fault: fault.map(|(node, action)| format!("{node}={action}")),
        parents,
    };
    check_flow(saga, &scenario);
    sim.assert_no_orphans().await;
    let shape = shape(&mut sim).await;
    if let Some(c) = sim.coordinator.take() {
        c.kill().await;
    }
    shape
}

/// The saga's scenario without a crash, then with each failpoint action at
/// each of its nodes, one after the other.
async fn crash_at_every_node(saga_name: &str, backend: Backend) {
    let def = sagas::all()
        .into_iter()
        .find(|d| d.name == saga_name)
        .expect("a saga of that name");
    let nodes: Vec<&'static str> = def.nodes.iter().map(|n| n.name).collect();
    let reference = run_scenario(saga_name, &backend, None).await;
    for node in &nodes {
        for action in ["crash", "crash_after"] {
            let end = run_scenario(saga_name, &backend, Some((node, action))).await;
            assert_eq!(
                end, reference,
                "{saga_name}.{node}={action}: the end state differs from the run without a crash"
            );
        }
    }
}

async fn on_sqlite(saga: &str) {
    crash_at_every_node(saga, Backend::Sqlite).await;
}

/// On PostgreSQL: a database of its own for each run, all dropped at the end
/// whatever the outcome.
async fn on_postgres(saga: &'static str) {
    let backend = Backend::postgres();
    let outcome = tokio::spawn(crash_at_every_node(saga, backend.clone())).await;
    backend.drop_databases().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// One test per saga: `<module>::<saga>`, and the module's list of them.
macro_rules! crash_tests {
    ($module:ident => $run:ident: $($saga:ident),+ $(,)?) => {
        mod $module {
            pub const SAGAS: &[&str] = &[$(stringify!($saga)),+];
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $saga() {
                    crate::$run(stringify!($saga)).await
                }
            )+
        }
    };
}

crash_tests!(sqlite => on_sqlite:
    vm_create,
    vm_remove,
    vm_run,
    vm_stop,
    vm_suspend,
    vm_update,
    snapshot_create,
    snapshot_remove,
    snapshot_remove_live,
    snapshot_preview,
    snapshot_undo,
    snapshot_commit,
    vm_clone,
    vm_export,
    vm_import,
);

// The flows that drive the host, merge volumes and end a preview, and the
// export and import (they drive the host, and the import reserves its VM
// row against concurrent imports), on PostgreSQL too.
crash_tests!(postgres => on_postgres:
    snapshot_create,
    vm_suspend,
    snapshot_remove_live,
    snapshot_remove,
    vm_run,
    snapshot_commit,
    vm_export,
    vm_import,
);

/// Every saga has its test on SQLite (a saga added later needs one).
#[test]
fn every_saga_is_covered() {
    let all: BTreeSet<&str> = sagas::all().iter().map(|d| d.name).collect();
    let covered: BTreeSet<&str> = sqlite::SAGAS.iter().copied().collect();
    assert_eq!(all, covered);
    assert!(postgres::SAGAS.iter().all(|s| all.contains(s)));
}
