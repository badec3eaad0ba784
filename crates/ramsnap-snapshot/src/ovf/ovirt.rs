//! oVirt's own OVF (engine 3.3's OvfVmWriter, issue 14): the same envelope
//! without ramsnap's extensions. What ramsnap's descriptor states, oVirt's
//! implies:
//!
//! - a disk is an image: `DiskSection/Disk` elements grouped by the image
//!   of their `ovf:fileRef` (`<image>/<volume>`), the chain from each
//!   volume's `rasd:Parent` (its VirtualHardwareSection Item) or else its
//!   `ovf:parentRef`;
//! - the volume a snapshot shows of a disk is the one whose
//!   `ovf:vm_snapshot_id` is that snapshot;
//! - the VM id is the OperatingSystemSection's `ovf:id`; memory in MiB,
//!   vcpus as sockets × cores per socket;
//! - a memory has no checksum (oVirt records none): the import computes it;
//! - a capacity is in whole GiB (`ovf:size`): the import takes the exact one
//!   from the volume's `.meta`.
//!
//! Direct LUN disks (no image) are left out, with a warning.
use super::{
    chain_order, child, echo, err, esc, image_volume, number, ovirt_date, uuid_attr, OvfDisk, OvfError,
    OvfMemory, OvfSnapshot, OvfVm, OvfVolume, SnapshotKind, VolumeFormat, OVF_NS, RASD_NS, XSI_NS,
};
use roxmltree::{Document, Node};
use std::collections::BTreeMap;
use uuid::Uuid;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// What an oVirt OVF says, and what of it was left out.
#[derive(Debug)]
pub struct Parsed {
    pub vm: OvfVm,
    pub warnings: Vec<String>,
}

/// Reads an OVF as oVirt 3.3 writes it; `export_domain` is the domain it
/// was read from.
pub fn parse(xml: &str, export_domain: Uuid) -> Result<Parsed, OvfError> {
    let doc = Document::parse(xml).map_err(|e| OvfError(format!("not well-formed XML: {e}")))?;
    let root = doc.root_element();
    if root.tag_name().name() != "Envelope" || root.tag_name().namespace() != Some(OVF_NS) {
        return err("the root element is not an ovf:Envelope");
    }
    let version = root.attribute((OVF_NS, "version")).unwrap_or_default();
    let compatibility_version = version.split('.').take(2).collect::<Vec<_>>().join(".");
    let content = child(root, "Content")?;
    let text = |n: Node, name: &str| {
        n.children()
            .find(|c| c.is_element() && c.tag_name().name() == name)
            .and_then(|c| c.text())
            .map(str::trim)
            .map(str::to_string)
    };
    let sections: Vec<Node> = content
        .children()
        .filter(|n| n.is_element() && n.tag_name().name() == "Section")
        .collect();
    let section = |kind: &str| {
        sections
            .iter()
            .copied()
            .find(|n| n.attribute((XSI_NS, "type")) == Some(kind))
            .ok_or_else(|| OvfError(format!("no {kind} section")))
    };
    let os = section("ovf:OperatingSystemSection_Type")?;
    let vm_id = uuid_attr(os, (OVF_NS, "id"), "OperatingSystemSection ovf:id")?;
    let name = text(content, "Name").ok_or_else(|| OvfError("no Name".into()))?;
    let stateless = text(content, "IsStateless").as_deref() == Some("true");
    let exported_at = match text(content, "ExportDate") {
        Some(d) => parse_date(&d)?,
        None => 0,
    };

    // Hardware: CPU, memory, and each disk volume's parent.
    let hardware = section("ovf:VirtualHardwareSection_Type")?;
    let mut vcpus = None;
    let mut memory_bytes = None;
    let mut parents: BTreeMap<Uuid, Option<Uuid>> = BTreeMap::new();
    for item in hardware
        .children()
        .filter(|n| n.is_element() && n.tag_name().name() == "Item")
    {
        let rasd = |name: &str| {
            item.children()
                .find(|c| {
                    c.is_element() && c.tag_name().name() == name && c.tag_name().namespace() == Some(RASD_NS)
                })
                .and_then(|c| c.text())
                .map(str::trim)
        };
        match rasd("ResourceType") {
            Some("3") => {
                let sockets = number::<u32>(rasd("num_of_sockets").unwrap_or("1"), "rasd:num_of_sockets")?;
                let cores = number::<u32>(rasd("cpu_per_socket").unwrap_or("1"), "rasd:cpu_per_socket")?;
                vcpus = Some(
                    sockets
                        .checked_mul(cores)
                        .ok_or_else(|| OvfError("too many vcpus".into()))?,
                );
            }
            Some("4") => {
                let mib = number::<u64>(
                    rasd("VirtualQuantity")
                        .ok_or_else(|| OvfError("the memory item has no VirtualQuantity".into()))?,
                    "rasd:VirtualQuantity",
                )?;
                memory_bytes = Some(
                    mib.checked_mul(MIB)
                        .ok_or_else(|| OvfError("too much memory".into()))?,
                );
            }
            Some("17") => {
                let volume = Uuid::parse_str(rasd("InstanceId").unwrap_or_default())
                    .map_err(|_| OvfError("a disk item's rasd:InstanceId is not a UUID".into()))?;
                let parent = match rasd("Parent") {
                    Some(p) => {
                        let p = Uuid::parse_str(p)
                            .map_err(|_| OvfError(format!("rasd:Parent {} is not a UUID", echo(p))))?;
                        (!p.is_nil()).then_some(p)
                    }
                    None => None,
                };
                parents.insert(volume, parent);
            }
            _ => {}
        }
    }
    let vcpus = vcpus.ok_or_else(|| OvfError("no CPU item".into()))?;
    let memory_bytes = memory_bytes.ok_or_else(|| OvfError("no memory item".into()))?;

    // Disks, by image.
    let disk_section = root
        .children()
        .find(|n| n.is_element() && n.attribute((XSI_NS, "type")) == Some("ovf:DiskSection_Type"))
        .ok_or_else(|| OvfError("no ovf:DiskSection_Type section".into()))?;
    let mut warnings = Vec::new();
    let mut images: BTreeMap<Uuid, OvfDisk> = BTreeMap::new();
    // (snapshot, image) -> volume.
    let mut shown: BTreeMap<(Uuid, Uuid), Uuid> = BTreeMap::new();
    for d in disk_section
        .children()
        .filter(|n| n.is_element() && n.tag_name().name() == "Disk")
    {
        let file_ref = d.attribute((OVF_NS, "fileRef")).unwrap_or_default();
        if !file_ref.contains('/') {
            warnings.push(format!(
                "disk {} is not an image (a direct LUN?): left out",
                echo(d.attribute((OVF_NS, "disk-alias")).unwrap_or(file_ref))
            ));
            continue;
        }
        let (image, volume) = image_volume(file_ref, "Disk ovf:fileRef")?;
        let snapshot = uuid_attr(d, (OVF_NS, "vm_snapshot_id"), "Disk ovf:vm_snapshot_id")?;
        let format = match d.attribute((OVF_NS, "volume-format")) {
            Some("COW") => VolumeFormat::Cow,
            Some("RAW") => VolumeFormat::Raw,
            other => {
                return err(format!(
                    "Disk {volume}: ovf:volume-format {:?}",
                    other.unwrap_or_default()
                ))
            }
        };
        let gib = number::<u64>(d.attribute((OVF_NS, "size")).unwrap_or("0"), "Disk ovf:size")?;
        let actual = number::<u64>(
            d.attribute((OVF_NS, "actual_size")).unwrap_or("0"),
            "Disk ovf:actual_size",
        )?;
        let parent = match parents.get(&volume) {
            Some(p) => *p,
            None => match d.attribute((OVF_NS, "parentRef")).filter(|p| !p.is_empty()) {
                Some(p) => Some(
                    p.rsplit('/')
                        .next()
                        .and_then(|v| Uuid::parse_str(v).ok())
                        .ok_or_else(|| {
                            OvfError(format!(
                                "Disk {volume}: ovf:parentRef {} names no volume",
                                echo(p)
                            ))
                        })?,
                )
                .filter(|p| !p.is_nil()),
                None => None,
            },
        };
        let disk = images.entry(image).or_insert_with(|| OvfDisk {
            disk_id: image,
            image_id: image,
            capacity_bytes: 0,
            volumes: Vec::new(),
        });
        disk.capacity_bytes = disk.capacity_bytes.max(gib.saturating_mul(GIB));
        disk.volumes.push(OvfVolume {
            volume_id: volume,
            parent_id: parent,
            format,
            actual_bytes: actual.saturating_mul(GIB),
        });
        if shown.insert((snapshot, image), volume).is_some() {
            return err(format!("snapshot {snapshot} names two volumes of image {image}"));
        }
    }
    let mut disks: Vec<OvfDisk> = Vec::new();
    for (_, mut d) in images {
        d.volumes = chain_order(&d)?;
        disks.push(d);
    }

    // Snapshots.
    let snapshots_section = section("ovf:SnapshotsSection_Type")?;
    let mut snapshots = Vec::new();
    for s in snapshots_section
        .children()
        .filter(|n| n.is_element() && n.tag_name().name() == "Snapshot")
    {
        let snapshot_id = uuid_attr(s, (OVF_NS, "id"), "Snapshot ovf:id")?;
        let kind = match text(s, "Type").as_deref() {
            Some("ACTIVE") => SnapshotKind::Active,
            Some("REGULAR") => SnapshotKind::Regular,
            other => {
                return err(format!(
                    "snapshot {snapshot_id} is {:?}: only ACTIVE and REGULAR snapshots are imported (commit or undo a preview in oVirt first)",
                    other.unwrap_or_default()
                ))
            }
        };
        let created_at = match text(s, "CreationDate") {
            Some(d) => parse_date(&d)?,
            None => 0,
        };
        let memory = match text(s, "Memory").filter(|m| !m.is_empty()) {
            Some(m) => Some(parse_memory(&m, snapshot_id)?),
            None => None,
        };
        let mut disk_volumes = Vec::new();
        for d in &disks {
            let Some(v) = shown.get(&(snapshot_id, d.image_id)) else {
                return err(format!(
                    "snapshot {snapshot_id} has no volume of disk {}: no Disk names it",
                    d.disk_id
                ));
            };
            disk_volumes.push((d.disk_id, *v));
        }
        snapshots.push(OvfSnapshot {
            snapshot_id,
            kind,
            description: text(s, "Description").unwrap_or_default(),
            created_at,
            disks: disk_volumes,
            memory,
        });
    }
    snapshots.sort_by_key(|s| (s.kind != SnapshotKind::Active, s.created_at));
    if snapshots
        .iter()
        .filter(|s| s.kind == SnapshotKind::Active)
        .count()
        != 1
    {
        return err("the OVF has no single ACTIVE snapshot");
    }
    Ok(Parsed {
        vm: OvfVm {
            vm_id,
            name,
            memory_bytes,
            vcpus,
            stateless,
            // Direct kernel boot, as oVirt's VmBase has it (empty: boot
            // from disk); checked as CreateVm checks them on import.
            kernel: text(content, "KernelUrl").unwrap_or_default(),
            initrd: text(content, "InitrdUrl").unwrap_or_default(),
            cmdline: text(content, "KernelParams").unwrap_or_default(),
            compatibility_version,
            exported_at,
            collapsed: false,
            export_domain_id: export_domain,
            disks,
            snapshots,
        },
        warnings,
    })
}

/// oVirt's six-field Memory: `domain,pool,dump image,dump volume,metadata
/// image,metadata volume`; no checksum.
fn parse_memory(m: &str, snapshot: Uuid) -> Result<OvfMemory, OvfError> {
    let ids: Vec<Uuid> = m
        .split(',')
        .map(|p| Uuid::parse_str(p.trim()))
        .collect::<Result<_, _>>()
        .map_err(|_| {
            OvfError(format!(
                "snapshot {snapshot}: Memory {} is not six UUIDs",
                echo(m)
            ))
        })?;
    let [_, _, dump_image_id, dump_volume_id, metadata_image_id, metadata_volume_id] = ids[..] else {
        return err(format!(
            "snapshot {snapshot}: Memory {} is not six UUIDs",
            echo(m)
        ));
    };
    Ok(OvfMemory {
        dump_image_id,
        dump_volume_id,
        metadata_image_id,
        metadata_volume_id,
        checksum: String::new(),
    })
}

/// "yyyy/MM/dd HH:mm:ss" (UTC) to Unix milliseconds.
fn parse_date(s: &str) -> Result<i64, OvfError> {
    let bad = || OvfError(format!("date {} is not yyyy/MM/dd HH:mm:ss", echo(s)));
    let (date, time) = s.trim().split_once(' ').ok_or_else(bad)?;
    let d: Vec<i64> = date
        .split('/')
        .map(|p| p.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let t: Vec<i64> = time
        .split(':')
        .map(|p| p.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let (&[y, m, day], &[hh, mm, ss]) = (&d[..], &t[..]) else {
        return Err(bad());
    };
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return Err(bad());
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000)
}

/// Why a VM cannot be written in oVirt's OVF: oVirt gives each volume to
/// exactly one snapshot (`ovf:vm_snapshot_id`), and every snapshot shows
/// one volume of each disk.
pub fn expressible(vm: &OvfVm) -> Result<(), OvfError> {
    let mut owner: BTreeMap<Uuid, Uuid> = BTreeMap::new();
    for s in &vm.snapshots {
        for (_, v) in &s.disks {
            if let Some(other) = owner.insert(*v, s.snapshot_id) {
                return err(format!(
                    "snapshots {other} and {} show the same volume {v}; oVirt gives each volume to one snapshot \
                     (export with collapse_snapshots, or to a ramsnap export domain)",
                    s.snapshot_id
                ));
            }
        }
    }
    for d in &vm.disks {
        if let Some(v) = d.volumes.iter().find(|v| !owner.contains_key(&v.volume_id)) {
            return err(format!(
                "volume {} of disk {} belongs to no snapshot; oVirt's OVF names a snapshot for every volume \
                 (export with collapse_snapshots)",
                v.volume_id, d.disk_id
            ));
        }
    }
    Ok(())
}

/// The VM as oVirt 3.3's engine writes an exported VM's OVF (OvfVmWriter):
/// the literal `ovf:`, `rasd:`, `vssd:` and `xsi:` prefixes its reader
/// looks attributes up by; a File and a Disk per volume, each Disk naming
/// its snapshot (`ovf:vm_snapshot_id`), a disk Item per volume with its
/// `rasd:Parent`; each Snapshot with its six-field Memory, the memory
/// volumes outside References and DiskSection. Capacities in whole GiB
/// (rounded up), as oVirt writes them; dates in UTC. Checksums are not
/// written (oVirt has no place for them): an import computes them.
pub fn write(vm: &OvfVm) -> Result<String, OvfError> {
    expressible(vm)?;
    let nil = Uuid::nil();
    let gib = |b: u64| b.div_ceil(GIB);
    let mib = vm.memory_bytes.div_ceil(MIB);
    let snapshot_of: BTreeMap<Uuid, &OvfSnapshot> = vm
        .snapshots
        .iter()
        .flat_map(|s| s.disks.iter().map(move |(_, v)| (*v, s)))
        .collect();
    let created = vm
        .snapshots
        .iter()
        .map(|s| s.created_at)
        .min()
        .unwrap_or(vm.exported_at);
    let mut x = String::new();
    x.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    x.push_str(&format!(
        "<ovf:Envelope xmlns:ovf=\"{OVF_NS}\" xmlns:rasd=\"{RASD_NS}\" xmlns:vssd=\"{VSSD_NS}\" xmlns:xsi=\"{XSI_NS}\" ovf:version=\"{}\">\n",
        super::OVF_VERSION
    ));
    x.push_str("  <References>\n");
    for d in &vm.disks {
        for v in &d.volumes {
            let snap = snapshot_of[&v.volume_id];
            x.push_str(&format!(
                "    <File ovf:href=\"{}/{}\" ovf:id=\"{}\" ovf:size=\"{}\" ovf:description=\"{}\" />\n",
                d.image_id,
                v.volume_id,
                v.volume_id,
                d.capacity_bytes,
                esc(&snap.description)
            ));
        }
    }
    x.push_str("  </References>\n");
    x.push_str(
        "  <Section xsi:type=\"ovf:NetworkSection_Type\">\n    <Info>List of networks</Info>\n  </Section>\n",
    );
    x.push_str("  <Section xsi:type=\"ovf:DiskSection_Type\">\n    <Info>List of Virtual Disks</Info>\n");
    for (n, d) in vm.disks.iter().enumerate() {
        for v in &d.volumes {
            let snap = snapshot_of[&v.volume_id];
            x.push_str(&format!(
                "    <Disk ovf:diskId=\"{vol}\" ovf:size=\"{size}\" ovf:actual_size=\"{actual}\" ovf:vm_snapshot_id=\"{snap}\" ovf:parentRef=\"{parent}\" ovf:fileRef=\"{img}/{vol}\" ovf:format=\"http://www.vmware.com/specifications/vmdk.html#sparse\" ovf:volume-format=\"{format}\" ovf:volume-type=\"Sparse\" ovf:disk-interface=\"VirtIO\" ovf:boot=\"{boot}\" ovf:disk-alias=\"{alias}\" ovf:wipe-after-delete=\"false\" />\n",
                vol = v.volume_id,
                size = gib(d.capacity_bytes),
                actual = gib(v.actual_bytes),
                snap = snap.snapshot_id,
                parent = v.parent_id.map(|p| format!("{}/{p}", d.image_id)).unwrap_or_default(),
                img = d.image_id,
                format = match v.format {
                    VolumeFormat::Cow => "COW",
                    VolumeFormat::Raw => "RAW",
                },
                boot = n == 0,
                alias = esc(&format!("{}_Disk{}", vm.name, n + 1)),
            ));
        }
    }
    x.push_str("  </Section>\n");
    x.push_str("  <Content ovf:id=\"out\" xsi:type=\"ovf:VirtualSystem_Type\">\n");
    for (tag, value) in [
        ("Name", esc(&vm.name)),
        ("TemplateId", nil.to_string()),
        ("TemplateName", "Blank".into()),
        ("Description", String::new()),
        ("Domain", String::new()),
        ("CreationDate", ovirt_date(created)),
        ("ExportDate", ovirt_date(vm.exported_at)),
        ("IsAutoSuspend", "false".into()),
        ("TimeZone", String::new()),
        ("IsStateless", vm.stateless.to_string()),
        ("KernelUrl", esc(&vm.kernel)),
        ("KernelParams", esc(&vm.cmdline)),
        ("InitrdUrl", esc(&vm.initrd)),
        ("Origin", "0".into()),
        ("VmType", "0".into()),
        ("DefaultDisplayType", "1".into()),
        ("MinAllocatedMem", mib.to_string()),
    ] {
        x.push_str(&format!("    <{tag}>{value}</{tag}>\n"));
    }
    x.push_str(&format!(
        "    <Section ovf:id=\"{}\" ovf:required=\"false\" xsi:type=\"ovf:OperatingSystemSection_Type\">\n      <Info>Guest Operating System</Info>\n      <Description>Other</Description>\n    </Section>\n",
        vm.vm_id
    ));
    x.push_str(&format!(
        "    <Section xsi:type=\"ovf:VirtualHardwareSection_Type\">\n      <Info>{vcpus} CPU, {mib} Memeory</Info>\n      <System>\n        <vssd:VirtualSystemType>ENGINE {ver}</vssd:VirtualSystemType>\n      </System>\n",
        vcpus = vm.vcpus,
        ver = super::OVF_VERSION
    ));
    x.push_str(&format!(
        "      <Item>\n        <rasd:Caption>{n} virtual cpu</rasd:Caption>\n        <rasd:Description>Number of virtual CPU</rasd:Description>\n        <rasd:InstanceId>1</rasd:InstanceId>\n        <rasd:ResourceType>3</rasd:ResourceType>\n        <rasd:num_of_sockets>{n}</rasd:num_of_sockets>\n        <rasd:cpu_per_socket>1</rasd:cpu_per_socket>\n      </Item>\n",
        n = vm.vcpus
    ));
    x.push_str(&format!(
        "      <Item>\n        <rasd:Caption>{mib} MB of memory</rasd:Caption>\n        <rasd:Description>Memory Size</rasd:Description>\n        <rasd:InstanceId>2</rasd:InstanceId>\n        <rasd:ResourceType>4</rasd:ResourceType>\n        <rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits>\n        <rasd:VirtualQuantity>{mib}</rasd:VirtualQuantity>\n      </Item>\n"
    ));
    for (n, d) in vm.disks.iter().enumerate() {
        for v in &d.volumes {
            let date = ovirt_date(snapshot_of[&v.volume_id].created_at);
            x.push_str(&format!(
                "      <Item>\n        <rasd:Caption>{alias}</rasd:Caption>\n        <rasd:InstanceId>{vol}</rasd:InstanceId>\n        <rasd:ResourceType>17</rasd:ResourceType>\n        <rasd:HostResource>{img}/{vol}</rasd:HostResource>\n        <rasd:Parent>{parent}</rasd:Parent>\n        <rasd:Template>{nil}</rasd:Template>\n        <rasd:ApplicationList></rasd:ApplicationList>\n        <rasd:StorageId>{domain}</rasd:StorageId>\n        <rasd:StoragePoolId>{nil}</rasd:StoragePoolId>\n        <rasd:CreationDate>{date}</rasd:CreationDate>\n        <rasd:LastModified>{date}</rasd:LastModified>\n        <rasd:last_modified_date>{date}</rasd:last_modified_date>\n        <Type>disk</Type>\n        <Device>disk</Device>\n        <rasd:Address></rasd:Address>\n        <BootOrder>{boot}</BootOrder>\n        <IsPlugged>true</IsPlugged>\n        <IsReadOnly>false</IsReadOnly>\n        <Alias></Alias>\n      </Item>\n",
                alias = esc(&format!("{}_Disk{}", vm.name, n + 1)),
                vol = v.volume_id,
                img = d.image_id,
                parent = v.parent_id.unwrap_or(nil),
                domain = vm.export_domain_id,
                boot = if n == 0 { 1 } else { 0 },
            ));
        }
    }
    x.push_str("    </Section>\n");
    x.push_str("    <Section xsi:type=\"ovf:SnapshotsSection_Type\">\n");
    for s in &vm.snapshots {
        x.push_str(&format!("      <Snapshot ovf:id=\"{}\">\n", s.snapshot_id));
        let kind = match s.kind {
            SnapshotKind::Active => "ACTIVE",
            SnapshotKind::Regular => "REGULAR",
        };
        x.push_str(&format!("        <Type>{kind}</Type>\n"));
        x.push_str(&format!(
            "        <Description>{}</Description>\n",
            esc(&s.description)
        ));
        x.push_str(&format!(
            "        <CreationDate>{}</CreationDate>\n",
            ovirt_date(s.created_at)
        ));
        if let Some(m) = &s.memory {
            x.push_str(&format!(
                "        <Memory>{},{nil},{},{},{},{}</Memory>\n",
                vm.export_domain_id,
                m.dump_image_id,
                m.dump_volume_id,
                m.metadata_image_id,
                m.metadata_volume_id
            ));
        }
        x.push_str("        <ApplicationList></ApplicationList>\n      </Snapshot>\n");
    }
    x.push_str("    </Section>\n  </Content>\n</ovf:Envelope>\n");
    Ok(x)
}

/// The CIM schema of virtual system settings (the `vssd:` prefix).
const VSSD_NS: &str = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData";

#[cfg(test)]
mod tests {
    use super::*;

    /// ovirt-engine's real 3.3 OVF (backend/manager/modules/bll/src/test/
    /// resources/vmOvfData.xml), cut to what this reader looks at, with its
    /// REGULAR snapshot's own volume added below the ACTIVE one (the
    /// original lists only the ACTIVE leaf and a direct LUN).
    const SAMPLE: &str = include_str!("../../../../tests/data/ovirt-3.3-vmOvfData.xml");

    fn id(s: &str) -> Uuid {
        Uuid::parse_str(s).unwrap()
    }

    #[test]
    fn reads_ovirt_33s_ovf() {
        let domain = Uuid::new_v4();
        let p = parse(SAMPLE, domain).unwrap();
        let vm = &p.vm;
        assert_eq!(vm.vm_id, id("70f24c82-a7b8-4e0b-9192-cffd5705cf5c"));
        assert_eq!(vm.name, "exporttedVM");
        assert_eq!((vm.vcpus, vm.memory_bytes), (1, 1024 * MIB));
        assert_eq!(vm.compatibility_version, "3.3");
        assert_eq!(vm.export_domain_id, domain);
        assert_eq!(vm.exported_at, 1_369_666_036_000, "2013-05-27T14:47:16Z");
        assert_eq!(
            p.warnings.len(),
            1,
            "the direct LUN is left out: {:?}",
            p.warnings
        );
        assert!(
            p.warnings[0].contains("MAorTestOnlyLun_Disk1"),
            "{:?}",
            p.warnings
        );
        let image = id("8c634412-1e8b-4ef3-bc40-b67a456e9d2f");
        let (base, leaf) = (
            id("0d7bd2b4-3c1d-4b8e-9d44-63d87ee3a0f1"),
            id("f934b12c-1e22-4ad8-bbce-ec0b2a5defa4"),
        );
        assert_eq!(vm.disks.len(), 1);
        let d = &vm.disks[0];
        assert_eq!((d.disk_id, d.image_id, d.capacity_bytes), (image, image, GIB));
        let chain: Vec<(Uuid, Option<Uuid>, VolumeFormat)> = d
            .volumes
            .iter()
            .map(|v| (v.volume_id, v.parent_id, v.format))
            .collect();
        assert_eq!(
            chain,
            vec![
                (base, None, VolumeFormat::Raw),
                (leaf, Some(base), VolumeFormat::Cow)
            ]
        );
        assert_eq!(vm.snapshots.len(), 2);
        let (active, snap) = (&vm.snapshots[0], &vm.snapshots[1]);
        assert_eq!(
            (active.kind, active.disks.clone()),
            (SnapshotKind::Active, vec![(image, leaf)])
        );
        assert!(active.memory.is_none());
        assert_eq!(
            (snap.kind, snap.description.as_str()),
            (SnapshotKind::Regular, "snap")
        );
        assert_eq!(snap.disks, vec![(image, base)]);
        let m = snap.memory.as_ref().unwrap();
        assert_eq!(m.dump_image_id, id("478f4e8d-48e1-4265-82dd-a7844b61d6cb"));
        assert_eq!(m.dump_volume_id, id("903d4392-0001-446f-9cdb-d0cade8b44a0"));
        assert_eq!(m.metadata_image_id, id("1fc95389-c167-42c5-8ef6-720f4f369331"));
        assert_eq!(m.metadata_volume_id, id("878da22e-6d07-4f38-aa55-8f698e678421"));
        assert!(m.checksum.is_empty(), "oVirt records no checksum");
    }

    #[test]
    fn refuses_what_it_cannot_import() {
        let d = Uuid::new_v4();
        for (bad, says) in [
            (
                SAMPLE.replace("<Type>REGULAR</Type>", "<Type>PREVIEW</Type>"),
                "PREVIEW",
            ),
            (
                SAMPLE.replace(",878da22e-6d07-4f38-aa55-8f698e678421", ""),
                "six UUIDs",
            ),
            (
                SAMPLE.replace("ovf:id=\"70f24c82-a7b8-4e0b-9192-cffd5705cf5c\"", "ovf:id=\"x\""),
                "OperatingSystemSection",
            ),
            (
                SAMPLE.replace(
                    "ovf:vm_snapshot_id=\"22eab740-c6ec-4edb-b417-c4ad9efe628a\"",
                    "ovf:vm_snapshot_id=\"b60fcbad-d65a-4248-ae32-7f9411276df0\"",
                ),
                "two volumes",
            ),
            (
                SAMPLE.replace(
                    "<ExportDate>2013/05/27 14:47:16",
                    "<ExportDate>2013/13/27 14:47:16",
                ),
                "date",
            ),
            (
                SAMPLE.replace("ovf:volume-format=\"COW\"", "ovf:volume-format=\"QCOW\""),
                "volume-format",
            ),
            (
                SAMPLE.replace("<rasd:Parent>0d7bd2b4", "<rasd:Parent>1d7bd2b4"),
                "one chain",
            ),
            (SAMPLE.replace("ovf:Envelope", "Envelope"), ""),
        ] {
            let e = parse(&bad, d).expect_err(says);
            assert!(e.0.contains(says), "{says}: {e}");
        }
    }

    #[test]
    fn dates_are_utc() {
        assert_eq!(parse_date("1970/01/01 00:00:00").unwrap(), 0);
        assert_eq!(parse_date("2000/03/01 12:00:01").unwrap(), 951_912_001_000);
        assert_eq!(super::super::ovirt_date(951_912_001_000), "2000/03/01 12:00:01");
        assert!(parse_date("2000-03-01 12:00:01").is_err());
    }

    #[test]
    fn what_it_writes_ovirts_reader_takes_back() {
        let p = parse(SAMPLE, Uuid::new_v4()).unwrap();
        let mut vm = p.vm;
        vm.kernel = "vmlinuz".into();
        vm.cmdline = "console=ttyS0 a<b".into();
        vm.name = "vm & co".into();
        let xml = write(&vm).unwrap();
        for literal in [
            "<ovf:Envelope",
            "xsi:type=\"ovf:DiskSection_Type\"",
            "<rasd:Parent>",
            "ovf:vm_snapshot_id=",
        ] {
            assert!(xml.contains(literal), "{literal}");
        }
        let memory = vm.snapshots[1].memory.clone().unwrap();
        assert!(
            !xml.contains(&format!("ovf:id=\"{}\"", memory.dump_volume_id)),
            "memory volumes are not in References or DiskSection"
        );
        let back = parse(&xml, vm.export_domain_id).unwrap();
        assert!(back.warnings.is_empty(), "{:?}", back.warnings);
        let back = back.vm;
        assert_eq!(
            back,
            OvfVm {
                exported_at: back.exported_at,
                ..vm.clone()
            }
        );
        assert_eq!(ovirt_date(1_369_666_036_000), "2013/05/27 14:47:16");
        assert_eq!(
            parse_date(&ovirt_date(951_782_400_000)).unwrap(),
            951_782_400_000,
            "2000-02-29"
        );
        // Two snapshots showing one volume: oVirt cannot say so.
        let mut shared = vm.clone();
        let v = shared.snapshots[0].disks[0].1;
        shared.snapshots[1].disks[0].1 = v;
        assert!(write(&shared).unwrap_err().0.contains("same volume"));
    }
}
