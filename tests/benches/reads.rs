//! Unary reads through the coordinator, the way a client makes them: the
//! embedded default (`ramsnapd`, release build, SQLite) over mutual TLS on
//! loopback, one connection, calls one after another. 110 VMs (the issue's
//! figure), each with one disk and one snapshot besides its ACTIVE one.
//!
//! Reported per RPC: p50, p90 and p99 of 500 calls (after 50 to warm up),
//! and for ListVms the same for all 110 VMs in one reply.
//!
//! Run: `cargo build --release --bins && cargo bench -p ramsnap-e2e --bench reads`
//! (root, libvirtd up: see tests/guest/README.md).
use ramsnap_e2e::cluster::{Cluster, Db, DomainKind};
use ramsnap_proto::snapshot::v1 as pb;
use std::time::{Duration, Instant};

const VMS: usize = 110;
const CALLS: usize = 500;
const WARM_UP: usize = 50;

fn percentiles(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)].as_secs_f64() * 1000.0;
    (at(0.50), at(0.90), at(0.99))
}

async fn measure<F, Fut>(what: &str, mut call: F)
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for i in 0..WARM_UP {
        call(i).await;
    }
    let mut times = Vec::with_capacity(CALLS);
    for i in 0..CALLS {
        let t = Instant::now();
        call(i).await;
        times.push(t.elapsed());
    }
    let (p50, p90, p99) = percentiles(times);
    println!("| {what} | {p50:.2} | {p90:.2} | {p99:.2} |");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let c = Cluster::start_embedded(Db::Sqlite, "3.3", "bench-reads", &[]).await;
    let mut vms = Vec::with_capacity(VMS);
    for i in 0..VMS {
        let vm = c.create_vm(&format!("reads-{i:03}"), DomainKind::File).await;
        let r = c
            .create_snapshot_call(&vm, false, "one")
            .await
            .expect("CreateSnapshot");
        c.succeed(r.operation, "CreateSnapshot").await;
        vms.push(vm);
    }
    println!("\n{VMS} VMs, {CALLS} calls each after {WARM_UP} to warm up, one TLS connection (ms)\n");
    println!("| call | p50 | p90 | p99 |");
    println!("|---|---|---|---|");
    let client = c.vms();
    let snaps = c.snapshots_api();
    let clusters = c.clusters();
    measure("ListClusters", |_| {
        let mut clusters = clusters.clone();
        async move {
            clusters
                .list_clusters(pb::ListClustersRequest::default())
                .await
                .expect("ListClusters");
        }
    })
    .await;
    measure("GetVm", |i| {
        let mut client = client.clone();
        let vm = vms[i % VMS].clone();
        async move {
            client
                .get_vm(pb::GetVmRequest { vm_id: vm })
                .await
                .expect("GetVm");
        }
    })
    .await;
    measure("ListSnapshots (2 snapshots)", |i| {
        let mut snaps = snaps.clone();
        let vm = vms[i % VMS].clone();
        async move {
            snaps
                .list_snapshots(pb::ListSnapshotsRequest {
                    vm_id: vm,
                    ..Default::default()
                })
                .await
                .expect("ListSnapshots");
        }
    })
    .await;
    measure(&format!("ListVms ({VMS} VMs)"), |_| {
        let mut client = client.clone();
        async move {
            let n = client
                .list_vms(pb::ListVmsRequest::default())
                .await
                .expect("ListVms")
                .into_inner()
                .vms
                .len();
            assert_eq!(n, VMS);
        }
    })
    .await;
}
