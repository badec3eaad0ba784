//! Load on the coordinator's database (issue 9, item 3): a burst of 500
//! concurrent CreateVm through the real gRPC API, on SQLite (a file, the
//! embedded default) and on PostgreSQL. Every call must succeed (no
//! "database is locked", no serialization failure passed on to the user),
//! every operation must end SUCCEEDED, and nothing is left behind or made
//! twice: each VM exists once, with its disk, and the domain holds exactly
//! one volume per VM. The burst's time is printed, not asserted (it
//! depends on the machine's load: 30-50 s here, most of it the storage
//! making 500 qcow2 volumes one after another).
mod support;

use ramsnap_proto::snapshot::v1 as pb;
use std::collections::HashSet;
use std::time::{Duration, Instant};
use support::inproc::{Db, InProc};
use support::MIB;
use uuid::Uuid;

const BURST: usize = 500;

async fn burst_of_create_vm(db: Db) {
    let sim = InProc::start(db).await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..BURST {
        let mut vms = sim.vms.clone();
        let mut ops = sim.ops.clone();
        let req = pb::CreateVmRequest {
            request_id: Uuid::new_v4().to_string(),
            name: format!("burst-{i:03}"),
            cluster_id: sim.cluster_id.clone(),
            memory_bytes: 64 * MIB,
            vcpus: 1,
            stateless: false,
            disks: vec![pb::DiskSpec {
                domain_id: sim.domain.clone(),
                capacity_bytes: MIB,
            }],
            kernel: String::new(),
            initrd: String::new(),
            cmdline: String::new(),
        };
        tasks.push(tokio::spawn(async move {
            let op = vms
                .create_vm(req)
                .await
                .map_err(|s| format!("CreateVm: {:?}: {}", s.code(), s.message()))?
                .into_inner()
                .operation
                .ok_or("no operation")?;
            let mut stream = ops
                .watch_operation(pb::WatchOperationRequest {
                    operation_id: op.operation_id.clone(),
                })
                .await
                .map_err(|s| format!("WatchOperation: {s:?}"))?
                .into_inner();
            let mut last = op;
            while last.state == pb::OperationState::Running as i32 {
                match tokio::time::timeout(Duration::from_secs(120), stream.message()).await {
                    Ok(Ok(Some(m))) => last = m.operation.ok_or("no operation")?,
                    Ok(Ok(None)) => break,
                    Ok(Err(s)) => return Err(format!("WatchOperation: {s:?}")),
                    Err(_) => return Err(format!("operation {} did not end", last.operation_id)),
                }
            }
            if last.state != pb::OperationState::Succeeded as i32 {
                return Err(format!(
                    "operation {} ended {}: {} {}",
                    last.operation_id, last.state, last.error_code, last.error_message
                ));
            }
            Ok::<String, String>(last.result_vm_id)
        }));
    }
    let mut failures = Vec::new();
    let mut made = Vec::new();
    for t in tasks {
        match t.await.expect("the task ran") {
            Ok(vm) => made.push(vm),
            Err(e) => failures.push(e),
        }
    }
    let elapsed = started.elapsed();
    eprintln!(
        "{db:?}: {BURST} concurrent CreateVm in {:.1} s ({} failed)",
        elapsed.as_secs_f64(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {BURST} failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let mut sim = sim;
    let vms = sim
        .vms
        .list_vms(pb::ListVmsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .vms;
    assert_eq!(vms.len(), BURST);
    let ids: HashSet<&str> = vms.iter().map(|v| v.vm_id.as_str()).collect();
    let names: HashSet<&str> = vms.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(ids.len(), BURST);
    assert_eq!(names.len(), BURST);
    assert_eq!(ids, made.iter().map(String::as_str).collect::<HashSet<_>>());
    for v in &vms {
        assert_eq!(v.disks.len(), 1, "{v:?}");
        assert!(v.locked_by_operation_id.is_empty(), "{v:?}");
        assert_eq!(v.status, pb::VmStatus::Down as i32, "{v:?}");
    }
    let volumes = sim.inventory().await;
    assert_eq!(
        volumes.len(),
        BURST,
        "one volume per VM, none twice, none left over"
    );
    sim.assert_no_orphans().await;
    sim.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_500_create_vm_on_sqlite() {
    burst_of_create_vm(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_500_create_vm_on_postgres() {
    burst_of_create_vm(Db::Postgres).await;
}
