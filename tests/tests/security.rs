//! Mutual TLS and roles on the real binaries, deployed as three processes
//! (the coordinator, the storage agent, the host agent), every one serving
//! TLS with the dev certificates of this test process: no certificate is
//! refused; a viewer reads but cannot stop a VM; an operator cannot delete a
//! volume on an agent directly; the agents obey only the coordinator (the
//! admin included is refused). Certificate rotation is tested on a real TLS
//! server in `crates/ramsnap-common/tests/security.rs` (the dev certificates
//! here are shared by the whole test process).
use ramsnap_e2e::cluster::{Cluster, Db, DomainKind};
use ramsnap_e2e::{connect_as, tls_dir};
use ramsnap_proto::host::v1 as hpb;
use ramsnap_proto::host::v1::host_service_client::HostServiceClient;
use ramsnap_proto::snapshot::v1 as pb;
use ramsnap_proto::snapshot::v1::vm_service_client::VmServiceClient;
use ramsnap_proto::storage::v1 as spb;
use ramsnap_proto::storage::v1::storage_service_client::StorageServiceClient;
use std::sync::Arc;
use tonic::Code;
use tonic_types::StatusExt;

/// A client that trusts the dev CA and presents no certificate.
fn without_certificate(addr: &str) -> tonic::transport::Channel {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(tls_dir().join("ca.pem")).expect("the dev CA") {
        roots.add(c.expect("a CA certificate")).expect("a valid CA");
    }
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let transport =
        ramsnap_common::tls::ClientTransport::Tls(ramsnap_common::tls::ClientTls::from_config(config));
    let ep = transport.endpoint(addr).expect("an address");
    transport.connect_lazy(&ep)
}

/// PERMISSION_DENIED with an ErrorInfo ROLE_REQUIRED naming `role`.
fn assert_role_required(s: &tonic::Status, role: &str, what: &str) {
    assert_eq!(s.code(), Code::PermissionDenied, "{what}: {s:?}");
    let info = s
        .get_error_details()
        .error_info()
        .cloned()
        .unwrap_or_else(|| panic!("{what}: no ErrorInfo in {s:?}"));
    assert_eq!(info.reason, "ROLE_REQUIRED", "{what}: {info:?}");
    assert_eq!(
        info.metadata.get("required_role").map(String::as_str),
        Some(role),
        "{what}: {info:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_services_require_a_certificate_and_the_right_role() {
    let c = Cluster::start(Db::Sqlite, "3.3", "security").await;
    let vm = c.create_vm("security", DomainKind::File).await;
    let disk = c.active_snapshot(&vm).await.disks[0]
        .volume
        .clone()
        .expect("the disk's volume");

    // No client certificate: nothing is served, on any of the three.
    for (name, addr) in [
        ("coordinator", &c.coordinator_url),
        ("storage", &c.storage_url),
        ("host", &c.host_url),
    ] {
        let err = tonic_health::pb::health_client::HealthClient::new(without_certificate(addr))
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .expect_err("a call without a client certificate");
        // The handshake is refused: the client sees the connection fail
        // (how it reports that depends on when the alert arrives). Never an
        // answer.
        assert!(
            matches!(
                err.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Unauthenticated
            ),
            "{name} without a certificate: {err:?}"
        );
    }

    // A viewer reads, and cannot stop a VM.
    let mut viewer = VmServiceClient::new(connect_as(&c.coordinator_url, "viewer").await);
    viewer
        .get_vm(pb::GetVmRequest { vm_id: vm.clone() })
        .await
        .expect("a viewer reads a VM");
    let err = viewer
        .stop_vm(pb::StopVmRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            vm_id: vm.clone(),
            graceful_timeout_seconds: 0,
        })
        .await
        .expect_err("a viewer stops a VM");
    assert_role_required(&err, "operator", "StopVm as viewer");

    // An operator cannot delete a volume on the storage agent directly,
    // nor can the admin: only the coordinator may.
    for identity in ["operator", "admin"] {
        let mut storage = StorageServiceClient::new(connect_as(&c.storage_url, identity).await);
        let err = storage
            .delete_volume(spb::DeleteVolumeRequest {
                request_id: uuid::Uuid::new_v4().to_string(),
                r#ref: Some(disk.clone()),
            })
            .await
            .expect_err("DeleteVolume on the agent");
        assert_role_required(&err, "coordinator", &format!("DeleteVolume as {identity}"));
    }
    // The disk is still there.
    c.volume(&disk).await;

    // The host agent obeys the coordinator only.
    for identity in ["viewer", "operator", "admin"] {
        let mut host = HostServiceClient::new(connect_as(&c.host_url, identity).await);
        let err = host
            .stop_vm(hpb::StopVmRequest {
                vm_id: vm.clone(),
                graceful_timeout_seconds: 0,
            })
            .await
            .expect_err("StopVm on the host agent");
        assert_role_required(&err, "coordinator", &format!("host StopVm as {identity}"));
    }

    // And the coordinator, through them, still does its work.
    c.boot(&vm).await;
    c.stop_vm(&vm).await;
}
