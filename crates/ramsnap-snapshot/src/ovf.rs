//! The OVF descriptor of an exported VM, modeled on oVirt's (ovf:Envelope
//! with References, a DiskSection, and a VirtualSystem whose
//! SnapshotsSection has one Snapshot element per snapshot, each with a
//! Memory element naming its memory volumes).
//!
//! oVirt writes the memory as `domain,pool,dump image,dump volume,metadata
//! image,metadata volume`; ramsnap writes the same string (the pool is the
//! nil UUID: ramsnap has no storage pools) and adds, in its own namespace,
//! what oVirt's OVF leaves out and an import needs: the dump's SHA-256 and
//! the volume each snapshot points at for each disk (oVirt derives that from
//! its images' chains; ramsnap's snapshots can share volumes). Elements and
//! attributes an import does not need (OperatingSystemSection, rasd items)
//! are written for other OVF readers and ignored when read.
pub mod ovirt;

use ramsnap_common::checksum::Checksum;
use roxmltree::{Document, Node};
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use uuid::Uuid;

pub const OVF_NS: &str = "http://schemas.dmtf.org/ovf/envelope/1/";
pub const RASD_NS: &str =
    "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData";
pub const XSI_NS: &str = "http://www.w3.org/2001/XMLSchema-instance";
pub const RAMSNAP_NS: &str = "urn:ramsnap:ovf:1";
/// The OVF version oVirt 3.3 writes.
pub const OVF_VERSION: &str = "3.3.0.0";

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VolumeFormat {
    Raw,
    Cow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SnapshotKind {
    Active,
    Regular,
}

/// One volume of a disk's chain on the export domain.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OvfVolume {
    pub volume_id: Uuid,
    pub parent_id: Option<Uuid>,
    pub format: VolumeFormat,
    /// Bytes the volume's file takes on the export domain (informational).
    pub actual_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OvfDisk {
    pub disk_id: Uuid,
    pub image_id: Uuid,
    pub capacity_bytes: u64,
    /// The chain, base first: each volume's parent comes before it.
    pub volumes: Vec<OvfVolume>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OvfMemory {
    pub dump_image_id: Uuid,
    pub dump_volume_id: Uuid,
    pub metadata_image_id: Uuid,
    pub metadata_volume_id: Uuid,
    /// The dump volume's checksum in its text form (`blake3-4m:<hex>`, or
    /// `sha256:<hex>` for memory saved by version 1 hosts), verified on the
    /// export domain when it was written. (`sha256`: what saga records
    /// written before the rename call it.)
    #[serde(alias = "sha256")]
    pub checksum: String,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OvfSnapshot {
    pub snapshot_id: Uuid,
    pub kind: SnapshotKind,
    pub description: String,
    /// Unix milliseconds.
    pub created_at: i64,
    /// (disk id, volume id) for every disk.
    pub disks: Vec<(Uuid, Uuid)>,
    pub memory: Option<OvfMemory>,
}

/// An exported VM as its descriptor has it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OvfVm {
    pub vm_id: Uuid,
    pub name: String,
    pub memory_bytes: u64,
    pub vcpus: u32,
    pub stateless: bool,
    pub kernel: String,
    pub initrd: String,
    pub cmdline: String,
    pub compatibility_version: String,
    /// Unix milliseconds.
    pub exported_at: i64,
    /// Exported with "collapse snapshots": one volume per disk, one snapshot.
    pub collapsed: bool,
    /// The export domain the volumes were written to.
    pub export_domain_id: Uuid,
    /// Ordered by disk id (the order the host attaches them in).
    pub disks: Vec<OvfDisk>,
    /// The ACTIVE snapshot first, then REGULAR ones by creation time.
    pub snapshots: Vec<OvfSnapshot>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct OvfError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, OvfError> {
    Err(OvfError(msg.into()))
}

impl OvfVm {
    pub fn active(&self) -> &OvfSnapshot {
        self.snapshots
            .iter()
            .find(|s| s.kind == SnapshotKind::Active)
            .expect("a validated descriptor has an active snapshot")
    }

    /// Each distinct memory pair (snapshots may share one), in snapshot order.
    pub fn memories(&self) -> Vec<&OvfMemory> {
        let mut seen = HashSet::new();
        self.snapshots
            .iter()
            .filter_map(|s| s.memory.as_ref())
            .filter(|m| seen.insert(m.dump_volume_id))
            .collect()
    }

    /// The structural rules every descriptor must meet; a parsed document
    /// that breaks one is refused as OVF_INVALID.
    pub fn validate(&self) -> Result<(), OvfError> {
        self.validate_with(true)
    }

    /// [`OvfVm::validate`] for another system's OVF (oVirt's), whose
    /// memories have no checksum: the import computes it.
    pub fn validate_foreign(&self) -> Result<(), OvfError> {
        self.validate_with(false)
    }

    fn validate_with(&self, checksums: bool) -> Result<(), OvfError> {
        if self.name.is_empty() {
            return err("the VM has no name");
        }
        if self.disks.is_empty() {
            return err("the VM has no disks");
        }
        if self.vcpus == 0 || self.memory_bytes == 0 {
            return err("the VM has no CPUs or no memory");
        }
        let mut disk_ids = HashSet::new();
        let mut volume_ids = HashSet::new();
        let mut chains: HashMap<Uuid, HashSet<Uuid>> = HashMap::new();
        for d in &self.disks {
            if !disk_ids.insert(d.disk_id) {
                return err(format!("disk {} appears twice", d.disk_id));
            }
            if d.volumes.is_empty() {
                return err(format!("disk {} has no volumes", d.disk_id));
            }
            let mut seen = HashSet::new();
            for (i, v) in d.volumes.iter().enumerate() {
                if !volume_ids.insert(v.volume_id) {
                    return err(format!("volume {} appears twice", v.volume_id));
                }
                match (i, v.parent_id) {
                    (0, None) => {}
                    (0, Some(p)) => {
                        return err(format!(
                            "disk {}: its base volume {} has a parent {p}",
                            d.disk_id, v.volume_id
                        ))
                    }
                    (_, None) => {
                        return err(format!(
                            "disk {}: volume {} has no parent but is not the base",
                            d.disk_id, v.volume_id
                        ))
                    }
                    (_, Some(p)) if !seen.contains(&p) => {
                        return err(format!(
                            "disk {}: volume {}'s parent {p} is not before it in the chain",
                            d.disk_id, v.volume_id
                        ))
                    }
                    _ => {}
                }
                if v.parent_id.is_some() && v.format != VolumeFormat::Cow {
                    return err(format!("volume {} has a parent but is not COW", v.volume_id));
                }
                seen.insert(v.volume_id);
            }
            chains.insert(d.disk_id, seen);
        }
        let actives = self
            .snapshots
            .iter()
            .filter(|s| s.kind == SnapshotKind::Active)
            .count();
        if actives != 1 {
            return err(format!("{actives} active snapshots; there must be exactly one"));
        }
        let mut snapshot_ids = HashSet::new();
        for s in &self.snapshots {
            if !snapshot_ids.insert(s.snapshot_id) {
                return err(format!("snapshot {} appears twice", s.snapshot_id));
            }
            if s.disks.len() != self.disks.len() {
                return err(format!(
                    "snapshot {} names {} disks, the VM has {}",
                    s.snapshot_id,
                    s.disks.len(),
                    self.disks.len()
                ));
            }
            for (disk, volume) in &s.disks {
                match chains.get(disk) {
                    Some(chain) if chain.contains(volume) => {}
                    Some(_) => {
                        return err(format!(
                            "snapshot {}: volume {volume} is not in disk {disk}'s chain",
                            s.snapshot_id
                        ))
                    }
                    None => return err(format!("snapshot {}: no disk {disk}", s.snapshot_id)),
                }
            }
            if let Some(m) = &s.memory {
                // A foreign OVF records none; ramsnap's always one.
                let foreign_without = !checksums && m.checksum.is_empty();
                if let (false, Err(e)) = (foreign_without, m.checksum.parse::<Checksum>()) {
                    return err(format!("snapshot {}: the memory's checksum: {e}", s.snapshot_id));
                }
                if volume_ids.contains(&m.dump_volume_id) || volume_ids.contains(&m.metadata_volume_id) {
                    return err(format!(
                        "snapshot {}: a memory volume is also a disk volume",
                        s.snapshot_id
                    ));
                }
            }
        }
        if self.collapsed && (self.snapshots.len() != 1 || self.disks.iter().any(|d| d.volumes.len() != 1)) {
            return err("a collapsed export has one snapshot and one volume per disk");
        }
        Ok(())
    }

    /// The descriptor as XML.
    pub fn to_xml(&self) -> String {
        let mut x = String::with_capacity(8192);
        let nil = Uuid::nil();
        let sd = self.export_domain_id;
        x.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        let _ = writeln!(
            x,
            "<ovf:Envelope xmlns:ovf=\"{OVF_NS}\" xmlns:rasd=\"{RASD_NS}\" xmlns:xsi=\"{XSI_NS}\" \
             xmlns:ramsnap=\"{RAMSNAP_NS}\" ovf:version=\"{OVF_VERSION}\">"
        );
        x.push_str("  <References>\n");
        for d in &self.disks {
            for v in &d.volumes {
                let _ = writeln!(
                    x,
                    "    <File ovf:href=\"{}/{}\" ovf:id=\"{}\" ovf:size=\"{}\" ovf:description=\"{}\"/>",
                    d.image_id,
                    v.volume_id,
                    v.volume_id,
                    v.actual_bytes,
                    esc(&format!("disk {} of VM {}", d.disk_id, self.name))
                );
            }
        }
        for m in self.memories() {
            for (img, vol, what) in [
                (m.dump_image_id, m.dump_volume_id, "memory dump"),
                (m.metadata_image_id, m.metadata_volume_id, "memory metadata"),
            ] {
                let _ = writeln!(
                    x,
                    "    <File ovf:href=\"{img}/{vol}\" ovf:id=\"{vol}\" ovf:description=\"{what}\"/>"
                );
            }
        }
        x.push_str("  </References>\n");
        x.push_str("  <Section xsi:type=\"ovf:DiskSection_Type\">\n    <Info>List of Virtual Disks</Info>\n");
        let owner: HashMap<Uuid, Uuid> = self
            .snapshots
            .iter()
            .rev()
            .flat_map(|s| s.disks.iter().map(move |(_, v)| (*v, s.snapshot_id)))
            .collect();
        for (i, d) in self.disks.iter().enumerate() {
            for v in &d.volumes {
                let (format, vformat) = match v.format {
                    VolumeFormat::Cow => ("http://www.gnome.org/~markmc/qcow-image-format.html", "COW"),
                    VolumeFormat::Raw => ("http://www.vmware.com/specifications/vmdk.html#sparse", "RAW"),
                };
                let _ = writeln!(
                    x,
                    "    <Disk ovf:diskId=\"{}\" ovf:size=\"{}\" ovf:actual_size=\"{}\" ovf:vm_snapshot_id=\"{}\" \
                     ovf:parentRef=\"{}\" ovf:fileRef=\"{}/{}\" ovf:format=\"{format}\" ovf:volume-format=\"{vformat}\" \
                     ovf:volume-type=\"Sparse\" ovf:disk-interface=\"VirtIO\" ovf:boot=\"{}\" ovf:disk-alias=\"{}\" \
                     ramsnap:disk-id=\"{}\" ramsnap:capacity-bytes=\"{}\"/>",
                    v.volume_id,
                    d.capacity_bytes.div_ceil(1 << 30),
                    v.actual_bytes.div_ceil(1 << 30),
                    owner.get(&v.volume_id).map(|s| s.to_string()).unwrap_or_default(),
                    v.parent_id.map(|p| format!("{}/{p}", d.image_id)).unwrap_or_default(),
                    d.image_id,
                    v.volume_id,
                    i == 0,
                    esc(&format!("{}_Disk{}", self.name, i + 1)),
                    d.disk_id,
                    d.capacity_bytes,
                );
            }
        }
        x.push_str("  </Section>\n");
        x.push_str("  <Content ovf:id=\"out\" xsi:type=\"ovf:VirtualSystem_Type\">\n");
        let _ = writeln!(x, "    <Name>{}</Name>", esc(&self.name));
        let _ = writeln!(x, "    <TemplateId>{nil}</TemplateId>");
        let _ = writeln!(x, "    <ExportDate>{}</ExportDate>", ovirt_date(self.exported_at));
        let _ = writeln!(x, "    <IsStateless>{}</IsStateless>", self.stateless);
        let _ = writeln!(
            x,
            "    <ClusterCompatibilityVersion>{}</ClusterCompatibilityVersion>",
            esc(&self.compatibility_version)
        );
        let _ = writeln!(
            x,
            "    <ramsnap:Export vm-id=\"{}\" exported-at-ms=\"{}\" collapsed=\"{}\" domain-id=\"{sd}\"/>",
            self.vm_id, self.exported_at, self.collapsed
        );
        let _ = writeln!(
            x,
            "    <ramsnap:Boot kernel=\"{}\" initrd=\"{}\" cmdline=\"{}\"/>",
            esc(&self.kernel),
            esc(&self.initrd),
            esc(&self.cmdline)
        );
        let _ = writeln!(
            x,
            "    <Section ovf:id=\"{}\" ovf:required=\"false\" xsi:type=\"ovf:OperatingSystemSection_Type\">\n      \
             <Info>Guest Operating System</Info>\n      <Description>other_linux</Description>\n    </Section>",
            self.vm_id
        );
        x.push_str("    <Section xsi:type=\"ovf:VirtualHardwareSection_Type\">\n");
        let mib = self.memory_bytes.div_ceil(1 << 20);
        let _ = writeln!(x, "      <Info>{} CPU, {mib} Memory</Info>", self.vcpus);
        let _ = writeln!(
            x,
            "      <Item>\n        <rasd:Caption>{} virtual cpu</rasd:Caption>\n        \
             <rasd:InstanceId>1</rasd:InstanceId>\n        <rasd:ResourceType>3</rasd:ResourceType>\n        \
             <rasd:num_of_sockets>1</rasd:num_of_sockets>\n        <rasd:cpu_per_socket>{}</rasd:cpu_per_socket>\n      </Item>",
            self.vcpus, self.vcpus
        );
        let _ = writeln!(
            x,
            "      <Item>\n        <rasd:Caption>{mib} MB of memory</rasd:Caption>\n        \
             <rasd:InstanceId>2</rasd:InstanceId>\n        <rasd:ResourceType>4</rasd:ResourceType>\n        \
             <rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits>\n        \
             <rasd:VirtualQuantity>{mib}</rasd:VirtualQuantity>\n        \
             <ramsnap:Bytes>{}</ramsnap:Bytes>\n      </Item>",
            self.memory_bytes
        );
        let active = self.snapshots.iter().find(|s| s.kind == SnapshotKind::Active);
        for (i, d) in self.disks.iter().enumerate() {
            let leaf = active
                .and_then(|a| a.disks.iter().find(|(disk, _)| *disk == d.disk_id))
                .map(|(_, v)| *v)
                .unwrap_or(nil);
            let _ = writeln!(
                x,
                "      <Item>\n        <rasd:Caption>Drive {}</rasd:Caption>\n        \
                 <rasd:InstanceId>{leaf}</rasd:InstanceId>\n        <rasd:ResourceType>17</rasd:ResourceType>\n        \
                 <rasd:HostResource>{}/{leaf}</rasd:HostResource>\n        <rasd:Parent>{nil}</rasd:Parent>\n        \
                 <rasd:Template>{nil}</rasd:Template>\n        <rasd:StorageId>{sd}</rasd:StorageId>\n        \
                 <rasd:StoragePoolId>{nil}</rasd:StoragePoolId>\n      </Item>",
                i + 1,
                d.image_id
            );
        }
        x.push_str("    </Section>\n");
        x.push_str("    <Section xsi:type=\"ovf:SnapshotsSection_Type\">\n");
        for s in &self.snapshots {
            let _ = writeln!(x, "      <Snapshot ovf:id=\"{}\">", s.snapshot_id);
            let kind = match s.kind {
                SnapshotKind::Active => "ACTIVE",
                SnapshotKind::Regular => "REGULAR",
            };
            let _ = writeln!(x, "        <Type>{kind}</Type>");
            let _ = writeln!(x, "        <Description>{}</Description>", esc(&s.description));
            let _ = writeln!(
                x,
                "        <CreationDate>{}</CreationDate>",
                ovirt_date(s.created_at)
            );
            let _ = writeln!(x, "        <ramsnap:Created ms=\"{}\"/>", s.created_at);
            for (disk, volume) in &s.disks {
                let _ = writeln!(
                    x,
                    "        <ramsnap:Disk disk-id=\"{disk}\" volume-id=\"{volume}\"/>"
                );
            }
            if let Some(m) = &s.memory {
                let _ = writeln!(
                    x,
                    "        <Memory ramsnap:checksum=\"{}\">{sd},{nil},{},{},{},{}</Memory>",
                    m.checksum, m.dump_image_id, m.dump_volume_id, m.metadata_image_id, m.metadata_volume_id
                );
            }
            x.push_str("      </Snapshot>\n");
        }
        x.push_str("    </Section>\n  </Content>\n</ovf:Envelope>\n");
        x
    }

    /// Reads and validates a descriptor.
    pub fn parse(xml: &str) -> Result<OvfVm, OvfError> {
        let doc = Document::parse(xml).map_err(|e| OvfError(format!("not well-formed XML: {e}")))?;
        let root = doc.root_element();
        if root.tag_name().name() != "Envelope" || root.tag_name().namespace() != Some(OVF_NS) {
            return err("the root element is not an ovf:Envelope");
        }
        let content = child(root, "Content")?;
        let export = rs_child(content, "Export")?;
        let boot = rs_child(content, "Boot")?;
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
        let hardware = section("ovf:VirtualHardwareSection_Type")?;
        let snapshots_section = section("ovf:SnapshotsSection_Type")?;
        let disk_section = root
            .children()
            .find(|n| n.is_element() && n.attribute((XSI_NS, "type")) == Some("ovf:DiskSection_Type"))
            .ok_or_else(|| OvfError("no ovf:DiskSection_Type section".into()))?;

        let mut vcpus = None;
        let mut memory_bytes = None;
        for item in hardware
            .children()
            .filter(|n| n.is_element() && n.tag_name().name() == "Item")
        {
            let rtype = item
                .children()
                .find(|n| n.tag_name().name() == "ResourceType")
                .and_then(|n| n.text());
            match rtype {
                Some("3") => {
                    let n = item
                        .children()
                        .find(|n| n.tag_name().name() == "cpu_per_socket")
                        .and_then(|n| n.text())
                        .ok_or_else(|| OvfError("the CPU item has no cpu_per_socket".into()))?;
                    vcpus = Some(number::<u32>(n, "cpu_per_socket")?);
                }
                Some("4") => {
                    let n = item
                        .children()
                        .find(|n| {
                            n.tag_name().name() == "Bytes" && n.tag_name().namespace() == Some(RAMSNAP_NS)
                        })
                        .and_then(|n| n.text());
                    memory_bytes = Some(match n {
                        Some(b) => number::<u64>(b, "ramsnap:Bytes")?,
                        None => {
                            let mib = item
                                .children()
                                .find(|n| n.tag_name().name() == "VirtualQuantity")
                                .and_then(|n| n.text())
                                .ok_or_else(|| OvfError("the memory item has no VirtualQuantity".into()))?;
                            number::<u64>(mib, "VirtualQuantity")?
                                .checked_mul(1 << 20)
                                .ok_or_else(|| OvfError(format!("VirtualQuantity {mib} MiB is too large")))?
                        }
                    });
                }
                _ => {}
            }
        }

        // Disks: every Disk element is one volume; ramsnap:disk-id groups them.
        let mut disks: Vec<OvfDisk> = Vec::new();
        for d in disk_section
            .children()
            .filter(|n| n.is_element() && n.tag_name().name() == "Disk")
        {
            let volume_id = uuid_attr(d, (OVF_NS, "diskId"), "Disk ovf:diskId")?;
            let file_ref = attr(d, (OVF_NS, "fileRef"), "Disk ovf:fileRef")?;
            let (image, volume) = image_volume(file_ref, "Disk ovf:fileRef")?;
            if volume != volume_id {
                return err(format!("Disk {volume_id}: ovf:fileRef names volume {volume}"));
            }
            let parent_id = match d.attribute((OVF_NS, "parentRef")).unwrap_or("") {
                "" => None,
                p => {
                    let (pimg, pvol) = image_volume(p, "Disk ovf:parentRef")?;
                    if pimg != image {
                        return err(format!("Disk {volume_id}: its parent is in another image"));
                    }
                    Some(pvol)
                }
            };
            let format = match attr(d, (OVF_NS, "volume-format"), "Disk ovf:volume-format")? {
                "COW" => VolumeFormat::Cow,
                "RAW" => VolumeFormat::Raw,
                other => {
                    return err(format!(
                        "Disk {volume_id}: unknown ovf:volume-format {}",
                        echo(other)
                    ))
                }
            };
            let disk_id = uuid_attr(d, (RAMSNAP_NS, "disk-id"), "Disk ramsnap:disk-id")?;
            let capacity_bytes = number::<u64>(
                attr(d, (RAMSNAP_NS, "capacity-bytes"), "Disk ramsnap:capacity-bytes")?,
                "ramsnap:capacity-bytes",
            )?;
            let actual_bytes = d
                .attribute((OVF_NS, "actual_size"))
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0)
                << 30;
            let volume = OvfVolume {
                volume_id,
                parent_id,
                format,
                actual_bytes,
            };
            match disks.iter_mut().find(|x| x.disk_id == disk_id) {
                Some(x) if x.image_id != image || x.capacity_bytes != capacity_bytes => {
                    return err(format!(
                        "disk {disk_id}: its volumes disagree on image or capacity"
                    ))
                }
                Some(x) => x.volumes.push(volume),
                None => disks.push(OvfDisk {
                    disk_id,
                    image_id: image,
                    capacity_bytes,
                    volumes: vec![volume],
                }),
            }
        }
        for d in &mut disks {
            d.volumes = chain_order(d)?;
        }
        disks.sort_by_key(|d| d.disk_id);

        // Sizes from References, where they were written.
        let sizes: HashMap<Uuid, u64> = child(root, "References")?
            .children()
            .filter(|n| n.is_element() && n.tag_name().name() == "File")
            .filter_map(|f| {
                let id = Uuid::parse_str(f.attribute((OVF_NS, "id"))?).ok()?;
                Some((id, f.attribute((OVF_NS, "size"))?.parse().ok()?))
            })
            .collect();
        for v in disks.iter_mut().flat_map(|d| d.volumes.iter_mut()) {
            if let Some(s) = sizes.get(&v.volume_id) {
                v.actual_bytes = *s;
            }
        }

        let mut snapshots = Vec::new();
        for s in snapshots_section
            .children()
            .filter(|n| n.is_element() && n.tag_name().name() == "Snapshot")
        {
            let snapshot_id = uuid_attr(s, (OVF_NS, "id"), "Snapshot ovf:id")?;
            let text = |name: &str| {
                s.children()
                    .find(|n| {
                        n.is_element()
                            && n.tag_name().name() == name
                            && n.tag_name().namespace() != Some(RAMSNAP_NS)
                    })
                    .map(|n| n.text().unwrap_or("").to_string())
            };
            let kind = match text("Type").as_deref() {
                Some("ACTIVE") => SnapshotKind::Active,
                Some("REGULAR") => SnapshotKind::Regular,
                other => {
                    return err(format!(
                        "Snapshot {snapshot_id}: type {} cannot be imported",
                        other.map(echo).unwrap_or_else(|| "(none)".into())
                    ))
                }
            };
            let created_at = match s
                .children()
                .find(|n| n.tag_name().namespace() == Some(RAMSNAP_NS) && n.tag_name().name() == "Created")
            {
                Some(c) => number::<i64>(attr(c, "ms", "ramsnap:Created ms")?, "ramsnap:Created ms")?,
                None => 0,
            };
            let mut sdisks = Vec::new();
            for d in s
                .children()
                .filter(|n| n.tag_name().namespace() == Some(RAMSNAP_NS) && n.tag_name().name() == "Disk")
            {
                sdisks.push((
                    uuid_attr(d, "disk-id", "ramsnap:Disk disk-id")?,
                    uuid_attr(d, "volume-id", "ramsnap:Disk volume-id")?,
                ));
            }
            sdisks.sort();
            let memory = match s
                .children()
                .find(|n| n.is_element() && n.tag_name().name() == "Memory")
            {
                None => None,
                Some(m) => Some(parse_memory(m, snapshot_id)?),
            };
            snapshots.push(OvfSnapshot {
                snapshot_id,
                kind,
                description: text("Description").unwrap_or_default(),
                created_at,
                disks: sdisks,
                memory,
            });
        }

        let vm = OvfVm {
            vm_id: uuid_attr(export, "vm-id", "ramsnap:Export vm-id")?,
            name: child(content, "Name")?.text().unwrap_or("").to_string(),
            memory_bytes: memory_bytes.ok_or_else(|| OvfError("no memory item".into()))?,
            vcpus: vcpus.ok_or_else(|| OvfError("no CPU item".into()))?,
            stateless: child(content, "IsStateless")
                .ok()
                .and_then(|n| n.text())
                .map(|t| t == "true")
                .unwrap_or(false),
            kernel: boot.attribute("kernel").unwrap_or("").to_string(),
            initrd: boot.attribute("initrd").unwrap_or("").to_string(),
            cmdline: boot.attribute("cmdline").unwrap_or("").to_string(),
            compatibility_version: child(content, "ClusterCompatibilityVersion")
                .ok()
                .and_then(|n| n.text())
                .unwrap_or("")
                .to_string(),
            exported_at: number::<i64>(
                attr(export, "exported-at-ms", "ramsnap:Export exported-at-ms")?,
                "exported-at-ms",
            )?,
            collapsed: attr(export, "collapsed", "ramsnap:Export collapsed")? == "true",
            export_domain_id: uuid_attr(export, "domain-id", "ramsnap:Export domain-id")?,
            disks,
            snapshots,
        };
        vm.validate()?;
        Ok(vm)
    }
}

fn parse_memory(m: Node, snapshot_id: Uuid) -> Result<OvfMemory, OvfError> {
    let text = m.text().unwrap_or("").trim();
    let parts: Vec<&str> = text.split(',').collect();
    if parts.len() != 6 {
        return err(format!(
            "Snapshot {snapshot_id}: Memory must be domain,pool,image,volume,image,volume; found {} fields",
            parts.len()
        ));
    }
    let id = |i: usize| {
        Uuid::parse_str(parts[i]).map_err(|_| {
            OvfError(format!(
                "Snapshot {snapshot_id}: Memory field {} is not a UUID",
                i + 1
            ))
        })
    };
    Ok(OvfMemory {
        dump_image_id: id(2)?,
        dump_volume_id: id(3)?,
        metadata_image_id: id(4)?,
        metadata_volume_id: id(5)?,
        // Exports written by version 1 name a bare hex SHA-256 `sha256`.
        checksum: match (
            m.attribute((RAMSNAP_NS, "checksum")),
            m.attribute((RAMSNAP_NS, "sha256")),
        ) {
            (Some(c), _) => c.to_string(),
            (None, Some(hex)) => format!("sha256:{hex}"),
            (None, None) => {
                return Err(OvfError(format!(
                    "Snapshot {snapshot_id}: Memory has no ramsnap:checksum"
                )))
            }
        },
    })
}

/// The disk's volumes base first, following parents.
fn chain_order(d: &OvfDisk) -> Result<Vec<OvfVolume>, OvfError> {
    let mut rest: Vec<OvfVolume> = d.volumes.clone();
    let mut out: Vec<OvfVolume> = Vec::new();
    let mut last: Option<Uuid> = None;
    while !rest.is_empty() {
        let pos = rest.iter().position(|v| v.parent_id == last).ok_or_else(|| {
            OvfError(format!(
                "disk {}: its volumes do not form one chain (nothing follows {})",
                d.disk_id,
                last.map(|l| l.to_string()).unwrap_or_else(|| "the base".into())
            ))
        })?;
        let v = rest.remove(pos);
        last = Some(v.volume_id);
        out.push(v);
    }
    Ok(out)
}

fn child<'a, 'i>(n: Node<'a, 'i>, name: &str) -> Result<Node<'a, 'i>, OvfError> {
    n.children()
        .find(|c| {
            c.is_element() && c.tag_name().name() == name && c.tag_name().namespace() != Some(RAMSNAP_NS)
        })
        .ok_or_else(|| OvfError(format!("no {name} element in {}", n.tag_name().name())))
}

fn rs_child<'a, 'i>(n: Node<'a, 'i>, name: &str) -> Result<Node<'a, 'i>, OvfError> {
    n.children()
        .find(|c| c.tag_name().namespace() == Some(RAMSNAP_NS) && c.tag_name().name() == name)
        .ok_or_else(|| OvfError(format!("no ramsnap:{name} element")))
}

fn attr<'a, 'n: 'a, 'm: 'a>(
    n: Node<'a, 'm>,
    name: impl Into<roxmltree::ExpandedName<'n, 'n>>,
    what: &str,
) -> Result<&'a str, OvfError> {
    n.attribute(name)
        .ok_or_else(|| OvfError(format!("{what} is missing")))
}

fn uuid_attr<'a, 'n: 'a, 'm: 'a>(
    n: Node<'a, 'm>,
    name: impl Into<roxmltree::ExpandedName<'n, 'n>>,
    what: &str,
) -> Result<Uuid, OvfError> {
    let s = attr(n, name, what)?;
    Uuid::parse_str(s).map_err(|_| OvfError(format!("{what} {} is not a UUID", echo(s))))
}

/// A value from the descriptor quoted in an error: cut, so that an error
/// about a huge attribute is not huge itself.
fn echo(s: &str) -> String {
    ramsnap_common::text::echo(s)
}

fn number<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, OvfError> {
    s.trim()
        .parse()
        .map_err(|_| OvfError(format!("{what} {} is not a number", echo(s))))
}

/// "image/volume".
fn image_volume(s: &str, what: &str) -> Result<(Uuid, Uuid), OvfError> {
    let (i, v) = s
        .split_once('/')
        .ok_or_else(|| OvfError(format!("{what} {} is not image/volume", echo(s))))?;
    match (Uuid::parse_str(i), Uuid::parse_str(v)) {
        (Ok(i), Ok(v)) => Ok((i, v)),
        _ => err(format!("{what} {} is not image/volume", echo(s))),
    }
}

/// oVirt's OVF date format ("yyyy/MM/dd HH:mm:ss", UTC).
fn ovirt_date(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}/{m:02}/{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> Uuid {
        Uuid::from_bytes([n; 16])
    }

    fn sample() -> OvfVm {
        let memory = OvfMemory {
            dump_image_id: id(20),
            dump_volume_id: id(21),
            metadata_image_id: id(22),
            metadata_volume_id: id(23),
            checksum: format!("blake3-4m:{}", "ab".repeat(32)),
        };
        OvfVm {
            vm_id: id(1),
            name: "web <1> & \"db\"".into(),
            memory_bytes: 1 << 30,
            vcpus: 2,
            stateless: false,
            kernel: "vmlinux".into(),
            initrd: "initramfs.img".into(),
            cmdline: "console=ttyS0 ramsnap.fill=600".into(),
            compatibility_version: "3.3".into(),
            exported_at: 1_764_165_600_123,
            collapsed: false,
            export_domain_id: id(9),
            disks: vec![OvfDisk {
                disk_id: id(2),
                image_id: id(3),
                capacity_bytes: 64 << 20,
                volumes: vec![
                    OvfVolume {
                        volume_id: id(4),
                        parent_id: None,
                        format: VolumeFormat::Cow,
                        actual_bytes: 200_704,
                    },
                    OvfVolume {
                        volume_id: id(5),
                        parent_id: Some(id(4)),
                        format: VolumeFormat::Cow,
                        actual_bytes: 196_608,
                    },
                ],
            }],
            snapshots: vec![
                OvfSnapshot {
                    snapshot_id: id(10),
                    kind: SnapshotKind::Active,
                    description: "Active VM".into(),
                    created_at: 1_764_165_000_000,
                    disks: vec![(id(2), id(5))],
                    memory: Some(memory.clone()),
                },
                OvfSnapshot {
                    snapshot_id: id(11),
                    kind: SnapshotKind::Regular,
                    description: "before upgrade".into(),
                    created_at: 1_764_164_000_000,
                    disks: vec![(id(2), id(4))],
                    memory: Some(memory),
                },
            ],
        }
    }

    #[test]
    fn round_trips() {
        let vm = sample();
        vm.validate().unwrap();
        let xml = vm.to_xml();
        let back = OvfVm::parse(&xml).unwrap();
        assert_eq!(back, vm);
        assert_eq!(vm.memories().len(), 1, "two snapshots share one memory");
        assert!(xml.contains("<Memory ramsnap:checksum=\"blake3-4m:"));
        // What version 1 exports wrote reads as a SHA-256.
        let old = xml.replace(
            &format!("ramsnap:checksum=\"blake3-4m:{}\"", "ab".repeat(32)),
            &format!("ramsnap:sha256=\"{}\"", "cd".repeat(32)),
        );
        assert_ne!(old, xml);
        let old = OvfVm::parse(&old).unwrap();
        assert_eq!(old.memories()[0].checksum, format!("sha256:{}", "cd".repeat(32)));
        assert!(xml.contains("xsi:type=\"ovf:SnapshotsSection_Type\""));
        assert!(
            xml.contains("<ExportDate>2025/11/26 14:00:00</ExportDate>"),
            "{xml}"
        );
    }

    #[test]
    fn memory_uses_ovirts_six_field_string() {
        let xml = sample().to_xml();
        let line = xml.lines().find(|l| l.contains("<Memory")).unwrap();
        let inner = line.split('>').nth(1).unwrap().split('<').next().unwrap();
        let fields: Vec<&str> = inner.split(',').collect();
        assert_eq!(fields.len(), 6);
        assert_eq!(fields[0], id(9).to_string());
        assert_eq!(fields[1], Uuid::nil().to_string());
        assert_eq!(fields[3], id(21).to_string());
    }

    #[test]
    fn refuses_malformed_documents() {
        let good = sample().to_xml();
        let cases: Vec<(String, &str)> = vec![
            ("<not xml".into(), "well-formed"),
            ("<a/>".into(), "ovf:Envelope"),
            (good.replace("<ramsnap:Export", "<ramsnap:Exp"), "ramsnap:Export"),
            (
                good.replace(
                    &format!("ovf:parentRef=\"{}/{}\"", id(3), id(4)),
                    "ovf:parentRef=\"\"",
                ),
                "one chain",
            ),
            (
                good.replace("<Type>ACTIVE</Type>", "<Type>REGULAR</Type>"),
                "active snapshots",
            ),
            (
                good.replace("<Type>ACTIVE</Type>", "<Type>PREVIEW</Type>"),
                "cannot be imported",
            ),
            (good.replace(&"ab".repeat(32), "xyz"), "checksum"),
            (good.replace("blake3-4m:", "md5:"), "checksum"),
            (
                good.replace("ramsnap:checksum=", "ramsnap:digest="),
                "no ramsnap:checksum",
            ),
            (
                good.replace(
                    &format!("volume-id=\"{}\"", id(5)),
                    &format!("volume-id=\"{}\"", id(7)),
                ),
                "not in disk",
            ),
            (
                good.replace("ramsnap:disk-id=", "ramsnap:diskid="),
                "ramsnap:disk-id",
            ),
            (
                good.replace(",00000000-0000-0000-0000-000000000000,", ","),
                "found 5 fields",
            ),
            (
                good.replace("<rasd:ResourceType>3</rasd:ResourceType>", ""),
                "no CPU",
            ),
        ];
        for (xml, needle) in cases {
            let e = OvfVm::parse(&xml).expect_err(needle);
            assert!(e.0.contains(needle), "{needle:?} not in {:?}", e.0);
        }
    }

    #[test]
    fn collapsed_exports_have_one_volume_per_disk() {
        let mut vm = sample();
        vm.collapsed = true;
        assert!(vm.validate().is_err());
        vm.snapshots.truncate(1);
        vm.disks[0].volumes = vec![OvfVolume {
            volume_id: id(5),
            parent_id: None,
            format: VolumeFormat::Cow,
            actual_bytes: 1,
        }];
        vm.validate().unwrap();
        assert_eq!(OvfVm::parse(&vm.to_xml()).unwrap().disks[0].volumes.len(), 1);
    }
}
