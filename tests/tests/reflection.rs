//! Every ramsnap binary, run for real: gRPC reflection (v1 and v1alpha),
//! health, and a clean stop on SIGTERM.
//!
//! Needs the binaries and grpcurl:
//! `cargo build --workspace --bins && cargo test -p ramsnap-e2e`.
use ramsnap_e2e::{
    grpcurl, grpcurl_health_check, grpcurl_list, grpcurl_ok, health_check, reflection_list, spawn_ramsnapd,
    spawn_service, spawn_snapshot, spawn_storage, Reflection, Running, ServingStatus, STOP_TIMEOUT,
};
use std::net::SocketAddr;
use std::time::Instant;

const HEALTH: &str = "grpc.health.v1.Health";
const REFLECTION_V1: &str = "grpc.reflection.v1.ServerReflection";
const REFLECTION_V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";
const STORAGE: &str = "ramsnap.storage.v1.StorageService";

fn assert_lists(listed: &[String], wanted: &[&str], by: &str) {
    for name in wanted {
        assert!(
            listed.iter().any(|s| s == name),
            "{by} does not list {name}; it lists {listed:?}"
        );
    }
}

// The tests run on the multi-threaded runtime: a test thread that blocks (on
// grpcurl, or waiting for an exit) must not starve the tonic clients'
// connection tasks, which answer the server's PING during graceful shutdown.

/// What every ramsnap endpoint serves, seen from each kind of client.
async fn assert_endpoint(addr: SocketAddr, own_services: &[&str]) {
    let mut wanted = vec![HEALTH];
    wanted.extend_from_slice(own_services);

    // grpcurl 1.8.6 (the version scripts/setup/tools.sh installs) speaks only
    // the old v1alpha reflection API (v1 came with 1.8.8), so this `list`
    // passing proves that old clients are served. Each API lists the
    // descriptors registered with it, so this one lists v1alpha, not v1.
    let listed = grpcurl_list(addr);
    assert_lists(&listed, &wanted, "grpcurl list");
    assert!(
        listed
            .iter()
            .any(|s| s == REFLECTION_V1ALPHA || s == REFLECTION_V1),
        "grpcurl list shows no reflection service: {listed:?}"
    );
    // The two APIs one by one, each through its own generated client, so the
    // proof does not depend on which API a given grpcurl happens to prefer.
    let v1 = reflection_list(addr, Reflection::V1).await;
    assert_lists(&v1, &[&wanted[..], &[REFLECTION_V1]].concat(), "reflection v1");
    let v1alpha = reflection_list(addr, Reflection::V1Alpha).await;
    assert_lists(
        &v1alpha,
        &[&wanted[..], &[REFLECTION_V1ALPHA]].concat(),
        "reflection v1alpha",
    );

    // "" is the server as a whole.
    for service in std::iter::once("").chain(own_services.iter().copied()) {
        assert_eq!(
            grpcurl_health_check(addr, service),
            "SERVING",
            "grpcurl health of {service:?} at {addr}"
        );
        assert_eq!(
            health_check(addr, service).await,
            ServingStatus::Serving,
            "health of {service:?} at {addr}"
        );
    }
}

/// SIGTERM: the process drains and exits 0 within [`STOP_TIMEOUT`].
fn assert_stops_cleanly(mut running: Running) {
    let started = Instant::now();
    let status = running.terminate(STOP_TIMEOUT);
    match status {
        Some(s) => assert!(
            s.success(),
            "exit after SIGTERM was {s}, not 0\n{}",
            running.logs()
        ),
        None => panic!(
            "no exit within {STOP_TIMEOUT:?} of SIGTERM; killed\n{}",
            running.logs()
        ),
    }
    assert!(started.elapsed() < STOP_TIMEOUT);
}

#[tokio::test(flavor = "multi_thread")]
async fn storage_serves_its_service_health_and_both_reflection_apis() {
    let storage = spawn_storage();
    assert_endpoint(storage.addr, &[STORAGE]).await;

    // Reflection is complete enough for grpcurl to describe the service.
    let described = grpcurl_ok(&[&storage.addr.to_string(), "describe", STORAGE]);
    assert!(
        described.contains("rpc RegisterDomain") && described.contains("rpc CopyVolume"),
        "grpcurl describe {STORAGE} printed:\n{described}"
    );
    assert_stops_cleanly(storage);
}

#[tokio::test(flavor = "multi_thread")]
async fn host_serves_health_and_both_reflection_apis() {
    let host = spawn_service("ramsnap-host", &[]);
    assert_endpoint(host.addr, &[]).await;
    assert_stops_cleanly(host);
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_serves_health_and_both_reflection_apis() {
    let snapshot = spawn_snapshot();
    assert_endpoint(snapshot.addr, &[]).await;
    assert_stops_cleanly(snapshot);
}

#[tokio::test(flavor = "multi_thread")]
async fn ramsnapd_serves_the_three_services_on_ports_of_their_own() {
    let all = spawn_ramsnapd();
    let (snapshot, storage, host) = (
        all.addr_of("snapshot"),
        all.addr_of("storage"),
        all.addr_of("host"),
    );
    assert!(snapshot != storage && storage != host && host != snapshot);
    assert_endpoint(snapshot, &[]).await;
    assert_endpoint(storage, &[STORAGE]).await;
    assert_endpoint(host, &[]).await;
    // Reflection describes every ramsnap proto on every port, but the storage
    // API is served on the storage port only.
    for addr in [snapshot, host] {
        let out = grpcurl(&[
            "-d",
            "{}",
            &addr.to_string(),
            "ramsnap.storage.v1.StorageService/ListDomains",
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("Unimplemented"),
            "ListDomains at {addr}: {stderr}"
        );
    }
    // One SIGTERM stops all three.
    assert_stops_cleanly(all);
}
