//! Mutual TLS and roles on the real binaries, deployed as three processes
//! (the coordinator, the storage agent, the host agent), every one serving
//! TLS with the dev certificates of this test process: no certificate is
//! refused; a viewer reads but cannot stop a VM; an operator cannot delete a
//! volume on an agent directly; the agents obey only the coordinator (the
//! admin included is refused); a binary serving certificates that are
//! replaced on disk (a new CA, a new server certificate and key) picks them
//! up without a restart. The client side of a rotation (the coordinator's
//! own certificate) is tested on a real TLS server in
//! `crates/ramsnap-common/tests/security.rs`.
use ramsnap_e2e::cluster::{Cluster, Db, DomainKind};
use ramsnap_e2e::{connect_as, spawn_storage_with, tls_dir};
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

/// A channel to `addr` presenting `identity`'s certificate from `dir` and
/// trusting `dir`'s CA.
fn client_from(dir: &std::path::Path, identity: &str, addr: &str) -> tonic::transport::Channel {
    let files = ramsnap_common::tls::TlsFiles::in_dir(dir, identity);
    let transport = ramsnap_common::tls::ClientTransport::Tls(
        ramsnap_common::tls::ClientTls::new(files).expect("a client certificate"),
    );
    let ep = transport.endpoint(addr).expect("an address");
    transport.connect_lazy(&ep)
}

async fn list_domains(dir: &std::path::Path, addr: &str) -> Result<(), tonic::Status> {
    StorageServiceClient::new(client_from(dir, "admin", addr))
        .list_domains(spb::ListDomainsRequest::default())
        .await
        .map(|_| ())
}

/// The storage agent's CA, certificate and key are replaced on disk (a
/// Kubernetes Secret update, a cert-manager renewal with a new CA): within
/// the reload interval, the same process serves the new certificate and
/// accepts clients of the new CA only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_picked_up_without_a_restart() {
    let served = tempfile::tempdir().expect("a dir for the served certificates");
    let old = tempfile::tempdir().expect("a dir for the old certificates");
    let new = tempfile::tempdir().expect("a dir for the new certificates");
    ramsnap_common::devcerts::ensure_dev_certs(served.path()).expect("the first CA");
    ramsnap_common::devcerts::ensure_dev_certs(new.path()).expect("a second CA");
    for f in std::fs::read_dir(served.path()).expect("the served dir") {
        let f = f.expect("an entry").path();
        std::fs::copy(&f, old.path().join(f.file_name().expect("a name"))).expect("keeping the old files");
    }
    let served_dir = served.path().display().to_string();
    let mut storage = spawn_storage_with(&["--tls-dir", &served_dir]);
    let addr = format!("https://{}", storage.addr);

    list_domains(old.path(), &addr)
        .await
        .expect("a client of the first CA");
    assert!(
        list_domains(new.path(), &addr).await.is_err(),
        "a client of the second CA is refused before the rotation"
    );

    // The rotation: each file renamed into place, as a Secret update does.
    for name in ["ca.pem", "storage.key", "storage.pem"] {
        let staged = served.path().join(format!(".{name}.new"));
        std::fs::copy(new.path().join(name), &staged).expect("staging a new file");
        std::fs::rename(&staged, served.path().join(name)).expect("renaming it into place");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match list_domains(new.path(), &addr).await {
            Ok(()) => break,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("not yet: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => panic!(
                "the rotated certificates were not picked up in 30 s: {e}\n{}",
                storage.logs()
            ),
        }
    }
    assert!(
        list_domains(old.path(), &addr).await.is_err(),
        "a client of the first CA is refused after the rotation"
    );
    assert!(
        storage.exited_within(std::time::Duration::ZERO).is_none(),
        "the same process serves on (no restart)"
    );
    assert!(
        storage.logs().contains("reloaded after a file changed"),
        "the agent logs the reload\n{}",
        storage.logs()
    );
}
