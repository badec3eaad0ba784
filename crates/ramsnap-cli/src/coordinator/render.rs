//! Coordinator messages for people and for scripts, as the storage ones:
//! JSON keeps the proto field names; enums become the lower-case words the
//! flags take (`SNAPSHOT_TYPE_REGULAR` is `"regular"`, `VM_STATUS_POWERING_UP`
//! is `"powering-up"`); an empty optional id is `null`; sizes are byte
//! counts and times are the proto's Unix milliseconds.
use crate::output::{dash_if_empty, human_bytes, labels, non_empty, utc_time_ms, Table};
use crate::storage::render::ref_json;
use ramsnap_proto::common::v1 as common;
use ramsnap_proto::snapshot::v1 as pb;
use serde_json::{json, Value};

labels! {
    vm_status: pb::VmStatus, "VM_STATUS_";
    snapshot_type: pb::SnapshotType, "SNAPSHOT_TYPE_";
    snapshot_status: pb::SnapshotStatus, "SNAPSHOT_STATUS_";
    operation_state: pb::OperationState, "OPERATION_STATE_";
}

/// The check-box columns (the Snapshots tab's Memory column): `yes`/`no`.
pub fn yes_no(value: bool) -> String {
    if value { "yes" } else { "no" }.to_string()
}

fn ref_text(r: Option<&common::VolumeRef>) -> String {
    r.map(crate::args::ref_text).unwrap_or_else(|| "-".into())
}

// Clusters and hosts.

pub fn cluster_json(c: &pb::Cluster) -> Value {
    json!({
        "cluster_id": c.cluster_id,
        "name": c.name,
        "compatibility_version": c.compatibility_version,
        "memory_snapshots_supported": c.memory_snapshots_supported,
    })
}

pub fn cluster_table(clusters: &[pb::Cluster]) -> Table {
    let mut t = Table::new(&["ID", "NAME", "VERSION", "MEMORY-SNAPSHOTS"]);
    for c in clusters {
        t.row(vec![
            c.cluster_id.clone(),
            c.name.clone(),
            c.compatibility_version.clone(),
            yes_no(c.memory_snapshots_supported),
        ]);
    }
    t
}

pub fn cluster_fields(c: &pb::Cluster) -> Vec<(&'static str, String)> {
    vec![
        ("id", c.cluster_id.clone()),
        ("name", c.name.clone()),
        ("compatibility version", c.compatibility_version.clone()),
        ("memory snapshots", yes_no(c.memory_snapshots_supported)),
    ]
}

pub fn host_json(h: &pb::Host) -> Value {
    json!({
        "host_id": h.host_id,
        "name": h.name,
        "cluster_id": h.cluster_id,
        "host_address": h.host_address,
        "storage_address": h.storage_address,
    })
}

pub fn host_table(hosts: &[pb::Host]) -> Table {
    let mut t = Table::new(&["ID", "NAME", "CLUSTER", "HOST-ADDRESS", "STORAGE-ADDRESS"]);
    for h in hosts {
        t.row(vec![
            h.host_id.clone(),
            h.name.clone(),
            h.cluster_id.clone(),
            h.host_address.clone(),
            h.storage_address.clone(),
        ]);
    }
    t
}

pub fn host_fields(h: &pb::Host) -> Vec<(&'static str, String)> {
    vec![
        ("id", h.host_id.clone()),
        ("name", h.name.clone()),
        ("cluster", h.cluster_id.clone()),
        ("host address", h.host_address.clone()),
        ("storage address", h.storage_address.clone()),
    ]
}

// VMs.

pub fn vm_json(v: &pb::Vm) -> Value {
    json!({
        "vm_id": v.vm_id,
        "name": v.name,
        "cluster_id": v.cluster_id,
        "host_id": non_empty(&v.host_id),
        "memory_bytes": v.memory_bytes,
        "vcpus": v.vcpus,
        "stateless": v.stateless,
        "status": vm_status(v.status),
        "disks": v.disks.iter().map(disk_json).collect::<Vec<_>>(),
        "kernel": v.kernel,
        "initrd": v.initrd,
        "cmdline": v.cmdline,
        "locked_by_operation_id": non_empty(&v.locked_by_operation_id),
    })
}

fn disk_json(d: &pb::Disk) -> Value {
    json!({
        "disk_id": d.disk_id,
        "domain_id": d.domain_id,
        "image_id": d.image_id,
        "capacity_bytes": d.capacity_bytes,
        "leaf_volume_id": non_empty(&d.leaf_volume_id),
    })
}

pub fn vm_table(vms: &[pb::Vm]) -> Table {
    let mut t = Table::new(&[
        "ID",
        "NAME",
        "STATUS",
        "MEMORY",
        "VCPUS",
        "STATELESS",
        "HOST",
        "LOCKED-BY",
    ]);
    for v in vms {
        t.row(vec![
            v.vm_id.clone(),
            v.name.clone(),
            vm_status(v.status),
            human_bytes(v.memory_bytes),
            v.vcpus.to_string(),
            yes_no(v.stateless),
            dash_if_empty(&v.host_id),
            dash_if_empty(&v.locked_by_operation_id),
        ]);
    }
    t
}

pub fn vm_fields(v: &pb::Vm) -> Vec<(&'static str, String)> {
    let mut fields = vec![
        ("id", v.vm_id.clone()),
        ("name", v.name.clone()),
        ("cluster", v.cluster_id.clone()),
        ("status", vm_status(v.status)),
        ("memory", human_bytes(v.memory_bytes)),
        ("vcpus", v.vcpus.to_string()),
        ("stateless", yes_no(v.stateless)),
        ("host", dash_if_empty(&v.host_id)),
        ("locked by", dash_if_empty(&v.locked_by_operation_id)),
    ];
    if !v.kernel.is_empty() {
        fields.push(("kernel", v.kernel.clone()));
        fields.push(("initrd", dash_if_empty(&v.initrd)));
        fields.push(("cmdline", dash_if_empty(&v.cmdline)));
    }
    for d in &v.disks {
        fields.push((
            "disk",
            format!(
                "{} {}/{}/{} ({})",
                d.disk_id,
                d.domain_id,
                d.image_id,
                dash_if_empty(&d.leaf_volume_id),
                human_bytes(d.capacity_bytes)
            ),
        ));
    }
    fields
}

/// One line of `vm watch`: when, and the status the VM entered.
pub fn vm_event_line(e: &pb::WatchVmResponse) -> String {
    format!("{}  {}", utc_time_ms(e.at_unix_ms), vm_status(e.status))
}

pub fn vm_event_json(vm_id: &str, e: &pb::WatchVmResponse) -> Value {
    json!({
        "vm_id": vm_id,
        "status": vm_status(e.status),
        "at_unix_ms": e.at_unix_ms,
    })
}

// VMs on export domains.

/// How many of an exported VM's snapshots (the active one included) hold
/// memory.
pub fn exported_with_memory(v: &pb::ExportedVm) -> usize {
    v.snapshots.iter().filter(|s| s.has_memory).count()
}

pub fn exported_vm_json(v: &pb::ExportedVm) -> Value {
    json!({
        "vm_id": v.vm_id,
        "name": v.name,
        "memory_bytes": v.memory_bytes,
        "vcpus": v.vcpus,
        "stateless": v.stateless,
        "disk_count": v.disk_count,
        "collapsed": v.collapsed,
        "exported_at": v.exported_at,
        "compatibility_version": v.compatibility_version,
        "snapshots": v.snapshots.iter().map(|s| json!({
            "snapshot_id": s.snapshot_id,
            "type": snapshot_type(s.r#type),
            "description": s.description,
            "created_at": s.created_at,
            "has_memory": s.has_memory,
        })).collect::<Vec<_>>(),
        "warnings": v.warnings,
    })
}

/// The export domain's VM Import tab: SNAPSHOTS counts the active snapshot
/// too, WITH-MEMORY those of them that hold memory.
pub fn exported_vm_table(vms: &[pb::ExportedVm]) -> Table {
    let mut t = Table::new(&[
        "ID",
        "NAME",
        "MEMORY",
        "DISKS",
        "SNAPSHOTS",
        "WITH-MEMORY",
        "COLLAPSED",
        "EXPORTED",
    ]);
    for v in vms {
        t.row(vec![
            v.vm_id.clone(),
            v.name.clone(),
            human_bytes(v.memory_bytes),
            v.disk_count.to_string(),
            v.snapshots.len().to_string(),
            exported_with_memory(v).to_string(),
            yes_no(v.collapsed),
            utc_time_ms(v.exported_at),
        ]);
    }
    t
}

// Snapshots.

pub fn snapshot_json(s: &pb::Snapshot) -> Value {
    json!({
        "snapshot_id": s.snapshot_id,
        "vm_id": s.vm_id,
        "type": snapshot_type(s.r#type),
        "status": snapshot_status(s.status),
        "description": s.description,
        "created_at": s.created_at,
        "has_memory": s.has_memory,
        "memory": s.memory.as_ref().map(|m| json!({
            "dump": m.dump.as_ref().map(ref_json),
            "metadata": m.metadata.as_ref().map(ref_json),
        })),
        "disks": s.disks.iter().map(|d| json!({
            "disk_id": d.disk_id,
            "volume": d.volume.as_ref().map(ref_json),
        })).collect::<Vec<_>>(),
    })
}

/// The Snapshots tab: oldest first, the active one last (the service's
/// order), with the Memory column.
pub fn snapshot_table(snapshots: &[pb::Snapshot]) -> Table {
    let mut t = Table::new(&["ID", "TYPE", "STATUS", "MEMORY", "CREATED", "DESCRIPTION"]);
    for s in snapshots {
        t.row(vec![
            s.snapshot_id.clone(),
            snapshot_type(s.r#type),
            snapshot_status(s.status),
            yes_no(s.has_memory),
            utc_time_ms(s.created_at),
            dash_if_empty(&s.description),
        ]);
    }
    t
}

pub fn snapshot_fields(s: &pb::Snapshot) -> Vec<(&'static str, String)> {
    let mut fields = vec![
        ("id", s.snapshot_id.clone()),
        ("vm", s.vm_id.clone()),
        ("type", snapshot_type(s.r#type)),
        ("status", snapshot_status(s.status)),
        ("memory", yes_no(s.has_memory)),
    ];
    if let Some(m) = &s.memory {
        fields.push(("memory dump", ref_text(m.dump.as_ref())));
        fields.push(("memory metadata", ref_text(m.metadata.as_ref())));
    }
    fields.push(("created", utc_time_ms(s.created_at)));
    fields.push(("description", dash_if_empty(&s.description)));
    for d in &s.disks {
        fields.push(("disk", format!("{} {}", d.disk_id, ref_text(d.volume.as_ref()))));
    }
    fields
}

// Operations.

pub fn operation_json(o: &pb::Operation) -> Value {
    let p = o.progress.unwrap_or_default();
    json!({
        "operation_id": o.operation_id,
        "kind": o.kind,
        "vm_id": non_empty(&o.vm_id),
        "request_id": non_empty(&o.request_id),
        "state": operation_state(o.state),
        "progress": {"processed_bytes": p.processed_bytes, "total_bytes": p.total_bytes},
        "error_code": non_empty(&o.error_code),
        "error_message": non_empty(&o.error_message),
        "error_precondition": non_empty(&o.error_precondition),
        "error_subject": non_empty(&o.error_subject),
        "snapshot_id": non_empty(&o.snapshot_id),
        "result_vm_id": non_empty(&o.result_vm_id),
        "warnings": o.warnings,
        "created_at": o.created_at,
        "updated_at": o.updated_at,
    })
}

/// `40%` of the bytes the operation moves, or `-` when it counts none.
pub fn progress_text(p: Option<&common::Progress>) -> String {
    match p {
        Some(p) if p.total_bytes > 0 => {
            let percent = u128::from(p.processed_bytes.min(p.total_bytes)) * 100 / u128::from(p.total_bytes);
            format!("{percent}%")
        }
        _ => "-".into(),
    }
}

/// `CODE: message` of a failed or cancelled operation.
pub fn operation_error(o: &pb::Operation) -> String {
    match (o.error_code.is_empty(), o.error_message.is_empty()) {
        (true, true) => String::new(),
        (false, true) => o.error_code.clone(),
        (true, false) => o.error_message.clone(),
        (false, false) => format!("{}: {}", o.error_code, o.error_message),
    }
}

pub fn operation_table(operations: &[pb::Operation]) -> Table {
    let mut t = Table::new(&["ID", "KIND", "VM", "STATE", "PROGRESS", "CREATED", "ERROR"]);
    for o in operations {
        t.row(vec![
            o.operation_id.clone(),
            o.kind.clone(),
            dash_if_empty(&o.vm_id),
            operation_state(o.state),
            progress_text(o.progress.as_ref()),
            utc_time_ms(o.created_at),
            operation_error(o),
        ]);
    }
    t
}

pub fn operation_fields(o: &pb::Operation) -> Vec<(&'static str, String)> {
    let p = o.progress.unwrap_or_default();
    let progress = if p.total_bytes > 0 {
        format!(
            "{} of {} ({})",
            human_bytes(p.processed_bytes),
            human_bytes(p.total_bytes),
            progress_text(Some(&p))
        )
    } else {
        "-".into()
    };
    let mut fields = vec![
        ("id", o.operation_id.clone()),
        ("kind", o.kind.clone()),
        ("vm", dash_if_empty(&o.vm_id)),
        ("state", operation_state(o.state)),
        ("progress", progress),
    ];
    let error = operation_error(o);
    if !error.is_empty() {
        fields.push(("error", error));
    }
    if !o.snapshot_id.is_empty() {
        fields.push(("snapshot", o.snapshot_id.clone()));
    }
    if !o.result_vm_id.is_empty() {
        fields.push(("result vm", o.result_vm_id.clone()));
    }
    for w in &o.warnings {
        fields.push(("warning", w.clone()));
    }
    fields.push(("request", dash_if_empty(&o.request_id)));
    fields.push(("created", utc_time_ms(o.created_at)));
    fields.push(("updated", utc_time_ms(o.updated_at)));
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vref(v: &str) -> common::VolumeRef {
        common::VolumeRef {
            domain_id: "d".into(),
            image_id: "i".into(),
            volume_id: v.into(),
        }
    }

    fn snapshot(id: &str, kind: pb::SnapshotType, memory: bool) -> pb::Snapshot {
        pb::Snapshot {
            snapshot_id: id.into(),
            vm_id: "vm".into(),
            r#type: kind as i32,
            status: pb::SnapshotStatus::Ok as i32,
            description: if kind == pb::SnapshotType::Active {
                "Active VM".into()
            } else {
                "before upgrade".into()
            },
            created_at: 1_700_000_000_123,
            has_memory: memory,
            memory: memory.then(|| common::MemoryVolumeRef {
                dump: Some(vref("dump")),
                metadata: Some(vref("meta")),
            }),
            disks: vec![pb::SnapshotDisk {
                disk_id: "disk".into(),
                volume: Some(vref("v")),
            }],
        }
    }

    #[test]
    fn enum_labels() {
        assert_eq!(vm_status(pb::VmStatus::Up as i32), "up");
        assert_eq!(vm_status(pb::VmStatus::RestoringState as i32), "restoring-state");
        assert_eq!(vm_status(pb::VmStatus::ImageLocked as i32), "image-locked");
        assert_eq!(snapshot_type(pb::SnapshotType::Regular as i32), "regular");
        assert_eq!(
            snapshot_status(pb::SnapshotStatus::InPreview as i32),
            "in-preview"
        );
        assert_eq!(operation_state(pb::OperationState::Succeeded as i32), "succeeded");
        assert_eq!(vm_status(99), "unknown(99)");
    }

    /// The Memory column of the Snapshots tab: a check box per snapshot.
    #[test]
    fn memory_column() {
        let table = snapshot_table(&[
            snapshot("s1", pb::SnapshotType::Regular, true),
            snapshot("s2", pb::SnapshotType::Regular, false),
            snapshot("act", pb::SnapshotType::Active, false),
        ])
        .render();
        let mut lines = table.lines();
        let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(
            header,
            ["ID", "TYPE", "STATUS", "MEMORY", "CREATED", "DESCRIPTION"]
        );
        let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(
            rows[0],
            [
                "s1",
                "regular",
                "ok",
                "yes",
                "2023-11-14",
                "22:13:20.123",
                "UTC",
                "before",
                "upgrade"
            ]
        );
        assert_eq!(rows[1][..4], ["s2", "regular", "ok", "no"]);
        assert_eq!(rows[2][..4], ["act", "active", "ok", "no"]);
        assert_eq!(rows[2][7..], ["Active", "VM"]);
        // The column lines up under its header.
        let at = table.lines().next().unwrap().find("MEMORY").unwrap();
        assert_eq!(&table.lines().nth(1).unwrap()[at..at + 3], "yes");
        assert_eq!(&table.lines().nth(2).unwrap()[at..at + 2], "no");
    }

    #[test]
    fn snapshot_to_json() {
        let s = snapshot_json(&snapshot("s1", pb::SnapshotType::Regular, true));
        assert_eq!(
            s,
            json!({
                "snapshot_id": "s1",
                "vm_id": "vm",
                "type": "regular",
                "status": "ok",
                "description": "before upgrade",
                "created_at": 1_700_000_000_123i64,
                "has_memory": true,
                "memory": {
                    "dump": {"domain_id": "d", "image_id": "i", "volume_id": "dump"},
                    "metadata": {"domain_id": "d", "image_id": "i", "volume_id": "meta"},
                },
                "disks": [{"disk_id": "disk", "volume": {"domain_id": "d", "image_id": "i", "volume_id": "v"}}],
            })
        );
        let without = snapshot_json(&snapshot("s2", pb::SnapshotType::Active, false));
        assert_eq!(without["has_memory"], false);
        assert_eq!(without["memory"], Value::Null);
        assert_eq!(without["type"], "active");
    }

    #[test]
    fn snapshot_fields_show_memory_volumes() {
        let fields = snapshot_fields(&snapshot("s1", pb::SnapshotType::Regular, true));
        assert!(fields.contains(&("memory", "yes".to_string())));
        assert!(fields.contains(&("memory dump", "d/i/dump".to_string())));
        assert!(fields.contains(&("disk", "disk d/i/v".to_string())));
        let fields = snapshot_fields(&snapshot("s2", pb::SnapshotType::Regular, false));
        assert!(fields.contains(&("memory", "no".to_string())));
        assert!(!fields.iter().any(|(k, _)| *k == "memory dump"));
    }

    fn vm() -> pb::Vm {
        pb::Vm {
            vm_id: "vm".into(),
            name: "web".into(),
            cluster_id: "c".into(),
            host_id: String::new(),
            memory_bytes: 256 << 20,
            vcpus: 2,
            stateless: true,
            status: pb::VmStatus::Down as i32,
            disks: vec![pb::Disk {
                disk_id: "disk".into(),
                domain_id: "d".into(),
                image_id: "i".into(),
                capacity_bytes: 1 << 30,
                leaf_volume_id: "v".into(),
            }],
            kernel: String::new(),
            initrd: String::new(),
            cmdline: String::new(),
            locked_by_operation_id: "op".into(),
        }
    }

    #[test]
    fn vm_rows_and_json() {
        let table = vm_table(&[vm()]).render();
        let mut lines = table.lines();
        let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(
            header,
            [
                "ID",
                "NAME",
                "STATUS",
                "MEMORY",
                "VCPUS",
                "STATELESS",
                "HOST",
                "LOCKED-BY"
            ]
        );
        let cells: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(cells, ["vm", "web", "down", "256", "MiB", "2", "yes", "-", "op"]);
        let j = vm_json(&vm());
        assert_eq!(j["status"], "down");
        assert_eq!(j["host_id"], Value::Null);
        assert_eq!(j["locked_by_operation_id"], "op");
        assert_eq!(j["memory_bytes"], 256u64 << 20);
        assert_eq!(j["disks"][0]["leaf_volume_id"], "v");
        let fields = vm_fields(&vm());
        assert!(fields.contains(&("disk", "disk d/i/v (1 GiB)".to_string())));
        assert!(!fields.iter().any(|(k, _)| *k == "kernel"));
    }

    #[test]
    fn vm_events() {
        let e = pb::WatchVmResponse {
            status: pb::VmStatus::RestoringState as i32,
            at_unix_ms: 1_700_000_000_005,
        };
        assert_eq!(vm_event_line(&e), "2023-11-14 22:13:20.005 UTC  restoring-state");
        assert_eq!(
            vm_event_json("vm", &e),
            json!({"vm_id": "vm", "status": "restoring-state", "at_unix_ms": 1_700_000_000_005i64})
        );
    }

    fn exported() -> pb::ExportedVm {
        let snap = |id: &str, kind: pb::SnapshotType, memory: bool| pb::ExportedSnapshot {
            snapshot_id: id.into(),
            r#type: kind as i32,
            description: id.into(),
            created_at: 1_700_000_000_000,
            has_memory: memory,
        };
        pb::ExportedVm {
            vm_id: "vm".into(),
            name: "web".into(),
            memory_bytes: 256 << 20,
            vcpus: 2,
            stateless: false,
            disk_count: 2,
            collapsed: false,
            exported_at: 1_700_000_000_123,
            compatibility_version: "3.3".into(),
            snapshots: vec![
                snap("s1", pb::SnapshotType::Regular, true),
                snap("s2", pb::SnapshotType::Regular, false),
                snap("act", pb::SnapshotType::Active, true),
            ],
            warnings: vec!["disk lun1 is not an image (a direct LUN?): left out".into()],
        }
    }

    #[test]
    fn exported_vms() {
        let table = exported_vm_table(&[exported()]).render();
        let mut lines = table.lines();
        let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(
            header,
            [
                "ID",
                "NAME",
                "MEMORY",
                "DISKS",
                "SNAPSHOTS",
                "WITH-MEMORY",
                "COLLAPSED",
                "EXPORTED"
            ]
        );
        let cells: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "vm",
                "web",
                "256",
                "MiB",
                "2",
                "3",
                "2",
                "no",
                "2023-11-14",
                "22:13:20.123",
                "UTC"
            ]
        );
        let j = exported_vm_json(&exported());
        assert_eq!(j["memory_bytes"], 256u64 << 20);
        assert_eq!(j["disk_count"], 2);
        assert_eq!(j["collapsed"], false);
        assert_eq!(j["compatibility_version"], "3.3");
        assert_eq!(j["exported_at"], 1_700_000_000_123i64);
        assert_eq!(
            j["warnings"][0],
            "disk lun1 is not an image (a direct LUN?): left out"
        );
        assert_eq!(
            j["snapshots"][2],
            json!({"snapshot_id": "act", "type": "active", "description": "act",
                   "created_at": 1_700_000_000_000i64, "has_memory": true})
        );
    }

    #[test]
    fn operations() {
        let op = pb::Operation {
            operation_id: "op".into(),
            kind: "create_snapshot".into(),
            vm_id: "vm".into(),
            request_id: String::new(),
            state: pb::OperationState::Failed as i32,
            progress: Some(common::Progress {
                processed_bytes: 1 << 29,
                total_bytes: 1 << 30,
            }),
            error_code: "FAILED_PRECONDITION".into(),
            error_message: "VM web is down".into(),
            error_precondition: "VM_NOT_DOWN".into(),
            error_subject: "vm/vm".into(),
            snapshot_id: String::new(),
            result_vm_id: String::new(),
            warnings: vec!["careful".into()],
            created_at: 1_700_000_000_000,
            updated_at: 1_700_000_001_000,
        };
        let j = operation_json(&op);
        assert_eq!(j["state"], "failed");
        assert_eq!(j["request_id"], Value::Null);
        assert_eq!(j["snapshot_id"], Value::Null);
        assert_eq!(j["error_code"], "FAILED_PRECONDITION");
        assert_eq!(j["progress"]["total_bytes"], 1u64 << 30);
        assert_eq!(j["warnings"], json!(["careful"]));
        let table = operation_table(std::slice::from_ref(&op)).render();
        let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(row[..5], ["op", "create_snapshot", "vm", "failed", "50%"]);
        assert!(
            table.ends_with("FAILED_PRECONDITION: VM web is down\n"),
            "{table}"
        );
        let fields = operation_fields(&op);
        assert!(fields.contains(&("progress", "512 MiB of 1 GiB (50%)".to_string())));
        assert!(fields.contains(&("warning", "careful".to_string())));
        assert_eq!(progress_text(None), "-");
        assert_eq!(
            progress_text(Some(&common::Progress {
                processed_bytes: 5,
                total_bytes: 0
            })),
            "-"
        );
    }

    #[test]
    fn clusters_and_hosts() {
        let c = pb::Cluster {
            cluster_id: "c".into(),
            name: "prod".into(),
            compatibility_version: "3.2".into(),
            memory_snapshots_supported: false,
        };
        assert_eq!(
            cluster_json(&c),
            json!({"cluster_id": "c", "name": "prod", "compatibility_version": "3.2",
                   "memory_snapshots_supported": false})
        );
        let table = cluster_table(&[c]).render();
        assert_eq!(
            table.lines().nth(1).unwrap().split_whitespace().last(),
            Some("no")
        );
        let h = pb::Host {
            host_id: "h".into(),
            name: "hv1".into(),
            cluster_id: "c".into(),
            host_address: "http://a:1".into(),
            storage_address: "http://a:2".into(),
        };
        assert_eq!(host_json(&h)["storage_address"], "http://a:2");
        let table = host_table(&[h]).render();
        let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(row, ["h", "hv1", "c", "http://a:1", "http://a:2"]);
    }
}
