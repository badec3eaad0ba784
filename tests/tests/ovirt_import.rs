//! Issue 14: VMs brought in from an oVirt 3.3 export domain, memory
//! snapshots included, end to end: the three real binaries, real
//! libvirt/QEMU running the test guest, FILE and LVM-on-loop BLOCK data
//! domains, SQLite and PostgreSQL, over gRPC.
//!
//! The export domain is written the way oVirt 3.3 writes one
//! (`ramsnap_e2e::ovirt`: VDSM's metadata and `.meta` files, the engine's
//! real 3.3 sample OVF with this test's ids), from volumes made in the
//! test: a VM runs the test guest, takes a live snapshot with memory and
//! stops; its volumes (exported by ramsnap, then rewritten as oVirt keeps
//! them) and a metadata volume holding the pickle VDSM writes make the
//! oVirt export. The VM is removed, the oVirt domain registered as it is,
//! and the VM imported from it: its disks and both snapshots come back,
//! the snapshot's memory restores (RESTORING_STATE, then UP, the guest
//! resuming where the snapshot froze it), and the oVirt domain is
//! unchanged to the byte.
//!
//! The bad-input cases (one database, one data domain kind: the checks are
//! the storage and host agents'): a domain whose metadata checksum is
//! broken is not registered; a `.meta` without `EOF`, an OVF without what
//! oVirt's reader requires and a pickle that calls a function are refused
//! with a precise error, and nothing is copied; a memory saved with other
//! disks is left out with a warning and the rest imports.
use ramsnap_e2e::cluster::{request_id, Cluster, Db, DomainKind, Taken, VmStatus};
use ramsnap_e2e::ovirt::{save_header_xml, vdsm_memory_pickle, Ovf, OvirtDomain};
use ramsnap_proto::common::v1::VolumeRef;
use ramsnap_proto::snapshot::v1 as pb;
use ramsnap_proto::storage::v1 as spb;
use std::path::PathBuf;
use std::time::Instant;
use uuid::Uuid;

/// oVirt's memory metadata volume: 10 KiB.
const OVIRT_METADATA_BYTES: u64 = 10 * 1024;

/// What the oVirt export was made of.
struct Made {
    vm: String,
    taken: Taken,
    domain: OvirtDomain,
    image: Uuid,
    base: Uuid,
    leaf: Uuid,
    snapshot: Uuid,
    dump: (Uuid, Uuid),
    metadata: (Uuid, Uuid),
    ovf: String,
}

fn id(s: &str) -> Uuid {
    Uuid::parse_str(s).unwrap()
}

/// The path of a volume on this cluster's (ramsnap) export domain.
fn exported_path(c: &Cluster, r: &VolumeRef) -> PathBuf {
    c.file_root
        .join("export")
        .join(&c.export_domain)
        .join("images")
        .join(&r.image_id)
        .join(&r.volume_id)
}

/// Runs a VM, takes a live snapshot with memory, stops it, exports it with
/// ramsnap and writes the same VM as oVirt 3.3 would have exported it into
/// a new oVirt export domain under the file root; removes the VM.
async fn make_ovirt_export(c: &Cluster, label: &str, kind: DomainKind, pool: Option<Uuid>) -> Made {
    let vm = c.create_vm(&format!("vm-{label}"), kind).await;
    c.boot(&vm).await;
    let taken = c.take_snapshot(&vm, true, &format!("{label} with memory")).await;
    c.wait_counter(&vm, 0, taken.counter_after + 5).await;
    c.stop_vm(&vm).await;
    c.export_vm(&vm, false).await;
    let v = c.get_vm(&vm).await;
    let snaps = c.list_snapshots(&vm).await;
    let snap = snaps.iter().find(|s| s.snapshot_id == taken.snapshot_id).unwrap();
    let active = snaps
        .iter()
        .find(|s| s.r#type() == pb::SnapshotType::Active)
        .unwrap();
    let base_ref = snap.disks[0].volume.clone().unwrap();
    let leaf_ref = active.disks[0].volume.clone().unwrap();
    let memory = snap.memory.clone().unwrap();
    let (dump_ref, meta_ref) = (memory.dump.unwrap(), memory.metadata.unwrap());
    // The same volumes on the export domain (an export keeps the ids).
    let on_export = |r: &VolumeRef| VolumeRef {
        domain_id: c.export_domain.clone(),
        ..r.clone()
    };
    let base = c.volume(&on_export(&base_ref)).await;
    let leaf = c.volume(&on_export(&leaf_ref)).await;
    let dump = c.volume(&on_export(&dump_ref)).await;
    assert_eq!(
        leaf.parent_volume_id, base_ref.volume_id,
        "the leaf is on the snapshot's volume"
    );
    c.remove_vm(&vm).await;

    let domain = OvirtDomain::create_in_pool(&c.file_root.join(format!("ovirt-{label}")), "export1", pool);
    let image = id(&base_ref.image_id);
    let (b, l) = (id(&base_ref.volume_id), id(&leaf_ref.volume_id));
    let base_cow = base.format() == spb::VolumeFormat::Cow;
    domain.add_volume(
        image,
        b,
        None,
        base_cow,
        base.capacity_bytes,
        &exported_path(c, &on_export(&base_ref)),
    );
    domain.mark_internal(image, b);
    let base_format = if base_cow { "qcow2" } else { "raw" };
    domain.add_volume(
        image,
        l,
        Some((b, base_format)),
        true,
        leaf.capacity_bytes,
        &exported_path(c, &on_export(&leaf_ref)),
    );
    // The memory: libvirt's save image as it is, and VDSM's pickle of the
    // domain XML the guest ran with, in oVirt's 10 KiB metadata volume.
    let dump_path = exported_path(c, &on_export(&dump_ref));
    let dump_ids = (id(&dump_ref.image_id), id(&dump_ref.volume_id));
    let meta_ids = (id(&meta_ref.image_id), id(&meta_ref.volume_id));
    domain.add_volume(
        dump_ids.0,
        dump_ids.1,
        None,
        false,
        dump.capacity_bytes,
        &dump_path,
    );
    let header = save_header_xml(&dump_path);
    domain.add_raw_bytes(
        meta_ids.0,
        meta_ids.1,
        OVIRT_METADATA_BYTES,
        &vdsm_memory_pickle(&header),
    );
    let snapshot = id(&taken.snapshot_id);
    let ovf = Ovf {
        vm: id(&vm),
        name: &v.name,
        memory_mib: v.memory_bytes >> 20,
        image,
        base: b,
        base_format: if base_cow { "COW" } else { "RAW" },
        leaf: l,
        snapshot,
        active: id(&active.snapshot_id),
        memory: format!(
            "{},{},{},{},{},{}",
            domain.id,
            Uuid::new_v4(),
            dump_ids.0,
            dump_ids.1,
            meta_ids.0,
            meta_ids.1
        ),
        kernel: &v.kernel,
        initrd: &v.initrd,
        cmdline: &v.cmdline,
    }
    .xml();
    domain.put_ovf(id(&vm), &ovf);
    Made {
        vm,
        taken,
        domain,
        image,
        base: b,
        leaf: l,
        snapshot,
        dump: dump_ids,
        metadata: meta_ids,
        ovf,
    }
}

async fn register_ovirt(c: &Cluster, m: &Made, name: &str) -> Result<spb::StorageDomain, tonic::Status> {
    c.storage()
        .register_domain(spb::RegisterDomainRequest {
            name: name.into(),
            r#type: spb::DomainType::File as i32,
            location: m.domain.location.display().to_string(),
            ..Default::default()
        })
        .await
        .map(|r| {
            let r = r.into_inner();
            assert!(r.adopted, "an oVirt domain is adopted as it is: {r:?}");
            r.domain.unwrap()
        })
}

fn import_request(c: &Cluster, domain: &str, vm: &str, kind: DomainKind) -> pb::ImportVmRequest {
    pb::ImportVmRequest {
        request_id: request_id(),
        export_domain_id: domain.to_string(),
        vm_id: vm.to_string(),
        cluster_id: c.cluster_id.clone(),
        target_domain_id: c.domain(kind).to_string(),
        ..Default::default()
    }
}

async fn import(c: &Cluster, domain: &str, vm: &str, kind: DomainKind) -> Vec<String> {
    let resp = c
        .vms()
        .import_vm(import_request(c, domain, vm, kind))
        .await
        .unwrap_or_else(|e| c.fail(&format!("ImportVm from the oVirt domain: {e}")))
        .into_inner();
    c.track_vm(vm);
    c.succeed(resp.operation, "ImportVm from the oVirt domain").await;
    resp.warnings
}

fn reason_of(err: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    err.get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .or_else(|| {
            err.get_error_details()
                .precondition_failure()
                .and_then(|p| p.violations.first().map(|v| v.r#type.clone()))
        })
        .unwrap_or_default()
}

/// Writes the disk target `from` as `to` (same length) in the domain XML
/// of a libvirt save image's header, in place.
fn patch_save_header(dump: &std::path::Path, from: &str, to: &str) {
    use std::os::unix::fs::FileExt;
    assert_eq!(from.len(), to.len());
    let xml = save_header_xml(dump);
    let mut patched = xml.clone();
    for q in ['\'', '"'] {
        patched = patched.replace(&format!("dev={q}{from}{q}"), &format!("dev={q}{to}{q}"));
    }
    assert_ne!(patched, xml, "the saved XML names {from}");
    let f = std::fs::OpenOptions::new().write(true).open(dump).unwrap();
    f.write_all_at(patched.as_bytes(), 92).unwrap();
}

/// Lists, imports and runs: the snapshot's memory restores.
async fn imports_and_restores(db: Db, kind: DomainKind, label: &str) {
    let t = Instant::now();
    let c = Cluster::start(db, "3.3", label).await;
    // Still attached to its oVirt data center: ramsnap only reads it.
    let m = make_ovirt_export(&c, label, kind, Some(Uuid::new_v4())).await;
    let before = m.domain.fingerprint();
    let d = register_ovirt(&c, &m, &format!("ovirt-{label}"))
        .await
        .unwrap_or_else(|e| c.fail(&format!("RegisterDomain of the oVirt export domain: {e}")));
    assert_eq!(d.domain_id, m.domain.id.to_string());
    assert_eq!(
        (d.role(), d.format()),
        (spb::DomainRole::Export, spb::DomainFormat::Ovirt),
        "{d:?}"
    );
    assert_eq!(d.name, "export1", "the DESCRIPTION names it");
    assert!(d.read_only, "attached to an oVirt data center: {d:?}");
    // What oVirt's export tab shows.
    let listed = c
        .vms()
        .list_exported_vms(pb::ListExportedVmsRequest {
            export_domain_id: d.domain_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.unreadable.is_empty(), "{listed:?}");
    let e = listed
        .vms
        .iter()
        .find(|v| v.vm_id == m.vm)
        .expect("the VM is listed");
    assert_eq!(e.disk_count, 1, "the direct LUN of the sample is left out: {e:?}");
    assert!(
        e.warnings.iter().any(|w| w.contains("direct LUN")),
        "the listing says so: {e:?}"
    );
    assert_eq!(e.snapshots.len(), 2, "{e:?}");
    assert_eq!(e.snapshots.iter().filter(|s| s.has_memory).count(), 1, "{e:?}");
    assert_eq!(e.compatibility_version, "3.3");
    let warnings = import(&c, &d.domain_id, &m.vm, kind).await;
    assert!(
        warnings.iter().any(|w| w.contains("direct LUN")),
        "the import says what it left out: {warnings:?}"
    );
    let v = c.get_vm(&m.vm).await;
    assert_eq!(v.disks.len(), 1);
    assert!(v.disks.iter().all(|x| x.domain_id == c.domain(kind)), "{v:?}");
    let snaps = c.list_snapshots(&m.vm).await;
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    let snap = snaps
        .iter()
        .find(|s| s.snapshot_id == m.snapshot.to_string())
        .expect("the REGULAR snapshot keeps its id");
    assert!(snap.has_memory, "its memory came with it: {snap:?}");
    c.assert_memory_volumes(snap).await;
    let mem = snap.memory.clone().unwrap();
    let (dump, meta) = (mem.dump.unwrap(), mem.metadata.unwrap());
    assert_eq!(
        (id(&dump.volume_id), id(&meta.volume_id)),
        (m.dump.1, m.metadata.1),
        "the memory volumes keep their ids"
    );
    assert_eq!(
        (c.volume(&dump).await.purpose(), c.volume(&meta).await.purpose()),
        (spb::VolumePurpose::MemoryDump, spb::VolumePurpose::MemoryMetadata),
        "recorded as disks on the oVirt domain, memory volumes once imported"
    );
    // Disks intact: the chain with its ids, base under the leaf.
    let leaf = c
        .volume(&VolumeRef {
            domain_id: c.domain(kind).to_string(),
            image_id: m.image.to_string(),
            volume_id: m.leaf.to_string(),
        })
        .await;
    assert_eq!(leaf.parent_volume_id, m.base.to_string(), "{leaf:?}");
    // And each shows what it showed on the oVirt domain (the leaf through
    // its chain).
    let mut storage = c.storage_as_host().await;
    for v in [m.base, m.leaf] {
        let r = VolumeRef {
            domain_id: c.domain(kind).to_string(),
            image_id: m.image.to_string(),
            volume_id: v.to_string(),
        };
        let path = storage
            .prepare_volume(spb::PrepareVolumeRequest {
                r#ref: Some(r.clone()),
                ..Default::default()
            })
            .await
            .expect("PrepareVolume of an imported disk volume")
            .into_inner()
            .path;
        let out = std::process::Command::new("qemu-img")
            .args(["compare", "-U"])
            .arg(m.domain.volume_path(m.image, v))
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "volume {v} differs from oVirt's: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        storage
            .teardown_volume(spb::TeardownVolumeRequest { r#ref: Some(r) })
            .await
            .expect("TeardownVolume");
    }
    assert_eq!(
        m.domain.fingerprint(),
        before,
        "the import changed nothing on the oVirt domain"
    );
    // Attached to oVirt, the domain takes nothing.
    let err = c
        .vms()
        .export_vm(pb::ExportVmRequest {
            request_id: request_id(),
            vm_id: m.vm.clone(),
            export_domain_id: d.domain_id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("ExportVm to an oVirt domain");
    assert_eq!(
        (err.code(), reason_of(&err).as_str()),
        (tonic::Code::FailedPrecondition, "DOMAIN_READ_ONLY"),
        "{err:?}"
    );

    c.assert_no_orphans().await;

    // The snapshot's memory restores: preview it, run.
    c.preview(&m.vm, &m.snapshot.to_string(), true).await;
    let run = c.run_vm(&m.vm, false).await;
    c.assert_restored(&m.vm, &run, &m.taken).await;
    run.assert_started_as(VmStatus::RestoringState);
    c.stop_vm(&m.vm).await;
    c.assert_no_orphans().await;
    eprintln!("[{label}] passed in {:.1}s", t.elapsed().as_secs_f64());
}

/// Every way the oVirt domain can be wrong, refused before anything is
/// copied; a memory of other disks left out with a warning.
async fn bad_input(db: Db, kind: DomainKind, label: &str) {
    let t = Instant::now();
    let c = Cluster::start(db, "3.3", label).await;
    let m = make_ovirt_export(&c, label, kind, None).await;
    let data_before = c.volumes(c.domain(kind)).await.len();

    // A broken checksum: not registered.
    let md = m.domain.dir.join("dom_md/metadata");
    let good_md = std::fs::read_to_string(&md).unwrap();
    std::fs::write(&md, good_md.replace("DESCRIPTION=export1", "DESCRIPTION=export2")).unwrap();
    let err = register_ovirt(&c, &m, "tampered")
        .await
        .expect_err("a broken checksum");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("checksum"), "{err:?}");
    assert_eq!(reason_of(&err), "OVIRT_DOMAIN_INVALID", "{err:?}");
    let domains = c
        .storage()
        .list_domains(spb::ListDomainsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(domains.domains.len(), 3, "nothing registered: {domains:?}");
    std::fs::write(&md, good_md).unwrap();
    let d = register_ovirt(&c, &m, "ovirt-bad").await.unwrap().domain_id;

    let refused = |what: &'static str, want: &'static str| {
        let c = &c;
        let d = d.clone();
        let vm = m.vm.clone();
        async move {
            let err = c
                .vms()
                .import_vm(import_request(c, &d, &vm, kind))
                .await
                .expect_err(what);
            assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{what}: {err:?}");
            assert_eq!(reason_of(&err), want, "{what}: {err:?}");
            assert!(
                c.vms()
                    .get_vm(pb::GetVmRequest { vm_id: vm.clone() })
                    .await
                    .is_err(),
                "{what}: no VM"
            );
            assert_eq!(
                c.volumes(c.domain(kind)).await.len(),
                data_before,
                "{what}: nothing copied"
            );
            err
        }
    };

    // A .meta without EOF.
    let leaf_meta = m.domain.meta_path(m.image, m.leaf);
    let good_meta = std::fs::read_to_string(&leaf_meta).unwrap();
    std::fs::write(&leaf_meta, good_meta.replace("EOF\n", "")).unwrap();
    let err = refused("a .meta without EOF", "OVIRT_VOLUME_INVALID").await;
    assert!(err.message().contains("EOF"), "{err:?}");
    std::fs::write(&leaf_meta, &good_meta).unwrap();

    // A qcow2 leaf whose backing file is a host file.
    let leaf_path = m.domain.volume_path(m.image, m.leaf);
    let rebase = |backing: &str| {
        let out = std::process::Command::new("qemu-img")
            .args(["rebase", "-u", "-b", backing, "-F", "raw"])
            .arg(&leaf_path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    rebase("/etc/hostname");
    let err = refused("a backing file outside the image", "OVIRT_VOLUME_INVALID").await;
    assert!(err.message().contains("backing file"), "{err:?}");
    let parent_format = if c
        .volume(&VolumeRef {
            domain_id: d.clone(),
            image_id: m.image.to_string(),
            volume_id: m.base.to_string(),
        })
        .await
        .format()
        == spb::VolumeFormat::Cow
    {
        "qcow2"
    } else {
        "raw"
    };
    let out = std::process::Command::new("qemu-img")
        .args([
            "rebase",
            "-u",
            "-b",
            &format!("../{}/{}", m.image, m.base),
            "-F",
            parent_format,
        ])
        .arg(&leaf_path)
        .output()
        .unwrap();
    assert!(out.status.success());

    // An OVF without the snapshot ids oVirt's import requires.
    let ovf_path = m.domain.dir.join(format!("master/vms/{0}/{0}.ovf", m.vm));
    std::fs::write(&ovf_path, m.ovf.replace("ovf:vm_snapshot_id=", "ovf:snapshot=")).unwrap();
    let listed = c
        .vms()
        .list_exported_vms(pb::ListExportedVmsRequest {
            export_domain_id: d.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.unreadable.iter().any(|u| u.contains("vm_snapshot_id")),
        "{listed:?}"
    );
    refused("an OVF without vm_snapshot_id", "OVF_INVALID").await;
    std::fs::write(&ovf_path, &m.ovf).unwrap();

    // A pickle that calls os.system: refused, never run.
    let meta_path = m.domain.volume_path(m.metadata.0, m.metadata.1);
    let good_pickle = std::fs::read(&meta_path).unwrap();
    let mut evil = b"cos\nsystem\n(S'touch /tmp/ramsnap-pwned'\ntR.".to_vec();
    evil.resize(OVIRT_METADATA_BYTES as usize, 0);
    std::fs::write(&meta_path, &evil).unwrap();
    let err = refused("a pickle with GLOBAL and REDUCE", "OVIRT_MEMORY_REFUSED").await;
    assert!(err.message().contains("GLOBAL"), "{err:?}");
    assert!(!std::path::Path::new("/tmp/ramsnap-pwned").exists());

    // A memory saved with other disks (the guest's was hda): left out,
    // with a warning; the VM and both snapshots import.
    std::fs::write(&meta_path, &good_pickle).unwrap();
    patch_save_header(&m.domain.volume_path(m.dump.0, m.dump.1), "vda", "hda");
    let warnings = import(&c, &d, &m.vm, kind).await;
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("its memory is left out") && w.contains("hda")),
        "{warnings:?}"
    );
    let snaps = c.list_snapshots(&m.vm).await;
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    assert!(snaps.iter().all(|s| !s.has_memory), "no memory: {snaps:?}");
    c.assert_no_orphans().await;
    eprintln!("[{label}] passed in {:.1}s", t.elapsed().as_secs_f64());
}

/// Item 3: a VM exported in oVirt's format to a new oVirt export domain
/// (what oVirt 3.3 reads: VDSM's metadata and `.meta` files, its OVF, its
/// pickle in the memory metadata volume), removed, and imported back: both
/// snapshots and the memory; the first run restores.
async fn round_trip(db: Db, kind: DomainKind, label: &str) {
    use ramsnap_common::ovirt::meta;
    use std::os::unix::fs::MetadataExt;
    let t = Instant::now();
    let c = Cluster::start(db, "3.3", label).await;
    let vm = c.create_vm(&format!("vm-{label}"), kind).await;
    c.boot(&vm).await;
    let taken = c.take_snapshot(&vm, true, &format!("{label} with memory")).await;
    c.wait_counter(&vm, 0, taken.counter_after + 5).await;
    c.stop_vm(&vm).await;
    let before = c.list_snapshots(&vm).await;
    let snap = before
        .iter()
        .find(|s| s.snapshot_id == taken.snapshot_id)
        .unwrap();
    let mem = snap.memory.clone().unwrap();
    let (dump, meta_ref) = (mem.dump.unwrap(), mem.metadata.unwrap());

    let location = c.file_root.join(format!("ovirt-{label}"));
    std::fs::create_dir_all(&location).unwrap();
    let resp = c
        .storage()
        .register_domain(spb::RegisterDomainRequest {
            name: format!("ovirt-{label}"),
            r#type: spb::DomainType::File as i32,
            location: location.display().to_string(),
            role: spb::DomainRole::Export as i32,
            format: spb::DomainFormat::Ovirt as i32,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| c.fail(&format!("RegisterDomain (format OVIRT): {e}")))
        .into_inner();
    assert!(!resp.adopted);
    let d = resp.domain.unwrap();
    assert_eq!(
        (d.format(), d.role(), d.read_only),
        (spb::DomainFormat::Ovirt, spb::DomainRole::Export, false)
    );
    let dir = location.join(&d.domain_id);
    let md = meta::parse_domain(&std::fs::read(dir.join("dom_md/metadata")).unwrap())
        .expect("VDSM's domain metadata with a valid _SHA_CKSUM");
    assert_eq!(
        (
            md["CLASS"].as_str(),
            md["SDUUID"].as_str(),
            md["POOL_UUID"].as_str()
        ),
        ("Backup", d.domain_id.as_str(), "")
    );
    for f in ["ids", "leases", "inbox", "outbox"] {
        assert!(dir.join("dom_md").join(f).is_file(), "dom_md/{f}");
    }
    assert!(dir.join("master/vms").is_dir() && dir.join("master/tasks").is_dir());

    let resp = c
        .vms()
        .export_vm(pb::ExportVmRequest {
            request_id: request_id(),
            vm_id: vm.clone(),
            export_domain_id: d.domain_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| c.fail(&format!("ExportVm to the oVirt domain: {e}")))
        .into_inner();
    c.succeed(resp.operation, "ExportVm to the oVirt domain").await;

    // What oVirt 3.3 finds there.
    let ovf = std::fs::read_to_string(dir.join(format!("master/vms/{vm}/{vm}.ovf"))).unwrap();
    for literal in [
        "<ovf:Envelope",
        "xsi:type=\"ovf:DiskSection_Type\"",
        "ovf:vm_snapshot_id=",
        "<rasd:Parent>",
        "xsi:type=\"ovf:SnapshotsSection_Type\"",
    ] {
        assert!(ovf.contains(literal), "the OVF has {literal}: {ovf}");
    }
    assert!(!ovf.contains("ramsnap:"), "no ramsnap extensions: {ovf}");
    assert!(
        ovf.contains(&format!(
            "<Memory>{},{},{},{},{},{}</Memory>",
            d.domain_id,
            Uuid::nil(),
            dump.image_id,
            dump.volume_id,
            meta_ref.image_id,
            meta_ref.volume_id
        )),
        "the six-field Memory: {ovf}"
    );
    assert!(
        !ovf.contains(&format!("ovf:diskId=\"{}\"", dump.volume_id)),
        "memory volumes are not disks in the OVF"
    );
    let mut metas = 0;
    for image in std::fs::read_dir(dir.join("images")).unwrap() {
        for f in std::fs::read_dir(image.unwrap().path()).unwrap() {
            let p = f.unwrap().path();
            if p.extension().is_some_and(|e| e == "meta") {
                metas += 1;
                let keys =
                    meta::parse(&std::fs::read(&p).unwrap(), true).expect("KEY=VALUE lines ending with EOF");
                let size: u64 = keys["SIZE"].parse().expect("SIZE in sectors");
                assert!(
                    size > 0 && keys["DOMAIN"] == d.domain_id && keys.contains_key("DISKTYPE"),
                    "{keys:?}"
                );
                assert_eq!(std::fs::metadata(&p).unwrap().uid(), 36, "owned by vdsm");
            }
        }
    }
    assert_eq!(metas, 4, "two disk volumes and the memory pair");
    let pickled =
        std::fs::read(dir.join(format!("images/{}/{}", meta_ref.image_id, meta_ref.volume_id))).unwrap();
    assert!(
        pickled.starts_with(b"(dp0\nS'restoreFromSnapshot'"),
        "VDSM's pickle in the metadata volume"
    );
    let leaf = c.active_snapshot(&vm).await.disks[0].volume.clone().unwrap();
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(dir.join(format!("images/{}/{}", leaf.image_id, leaf.volume_id)))
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.contains(&format!("\"backing-filename\": \"../{}/", leaf.image_id)),
        "a child names its parent as VDSM 3.3 does: {info}"
    );

    c.remove_vm(&vm).await;
    let warnings = import(&c, &d.domain_id, &vm, kind).await;
    assert!(warnings.is_empty(), "{warnings:?}");
    let after = c.list_snapshots(&vm).await;
    assert_eq!(after.len(), 2, "{after:?}");
    let back = after
        .iter()
        .find(|s| s.snapshot_id == taken.snapshot_id)
        .expect("the snapshot");
    assert!(back.has_memory, "{back:?}");
    c.assert_memory_volumes(back).await;
    c.assert_no_orphans().await;
    c.preview(&vm, &taken.snapshot_id, true).await;
    let run = c.run_vm(&vm, false).await;
    c.assert_restored(&vm, &run, &taken).await;
    run.assert_started_as(VmStatus::RestoringState);
    c.stop_vm(&vm).await;
    eprintln!("[{label}] passed in {:.1}s", t.elapsed().as_secs_f64());
}

mod sqlite {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn ovirt_export_imports_onto_file_and_its_memory_restores() {
        imports_and_restores(Db::Sqlite, DomainKind::File, "ovf-sf").await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_bad_ovirt_export_is_refused_and_nothing_is_copied() {
        bad_input(Db::Sqlite, DomainKind::File, "ovf-bad").await;
    }
}

mod postgres {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn ovirt_export_imports_onto_block_and_its_memory_restores() {
        imports_and_restores(Db::Postgres, DomainKind::Block, "ovf-pb").await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn exported_in_ovirts_format_imports_back_and_restores() {
        round_trip(Db::Postgres, DomainKind::Block, "ovf-rt").await;
    }
}
