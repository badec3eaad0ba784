//! libvirt XML: the domain of a VM spec, the snapshot request, and the
//! rewrite of a saved domain XML for a restore (VDSM does the same): disk
//! sources point at the VM's current leaves, every `<backingStore>` goes
//! (libvirt would otherwise trust it instead of the qcow2 headers and open
//! an overlay without its backing chain), the console log and boot images
//! are this host's.
use quick_xml::events::{BytesEnd, BytesStart, BytesText, Event};
use quick_xml::{Reader, Writer};
use std::borrow::Cow;
use std::path::Path;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskKind {
    File,
    Block,
}

impl DiskKind {
    fn as_str(self) -> &'static str {
        match self {
            DiskKind::File => "file",
            DiskKind::Block => "block",
        }
    }

    /// The attribute of `<source>` that holds the path.
    fn source_attr(self) -> &'static str {
        match self {
            DiskKind::File => "file",
            DiskKind::Block => "dev",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// Where a disk's image is on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSource {
    /// Target device: vda, vdb, ...
    pub dev: String,
    pub kind: DiskKind,
    pub path: String,
    pub format: DiskFormat,
}

#[derive(Debug, thiserror::Error)]
#[error("domain XML: {0}")]
pub struct XmlError(pub String);

impl From<quick_xml::Error> for XmlError {
    fn from(e: quick_xml::Error) -> Self {
        XmlError(e.to_string())
    }
}

impl From<quick_xml::events::attributes::AttrError> for XmlError {
    fn from(e: quick_xml::events::attributes::AttrError) -> Self {
        XmlError(e.to_string())
    }
}

impl From<std::io::Error> for XmlError {
    fn from(e: std::io::Error) -> Self {
        XmlError(e.to_string())
    }
}

fn esc(s: &str) -> Cow<'_, str> {
    quick_xml::escape::escape(s)
}

/// A path as XML needs it: UTF-8.
pub fn path_str(p: &Path) -> Result<&str, XmlError> {
    p.to_str()
        .ok_or_else(|| XmlError(format!("path {} is not UTF-8", p.display())))
}

/// How to run a domain, as far as the domain XML is concerned.
pub struct DomainDef<'a> {
    /// libvirt's domain type: "qemu" (TCG), "kvm", or "test".
    pub virt_type: &'a str,
    pub name: &'a str,
    pub uuid: Uuid,
    pub memory_bytes: u64,
    pub vcpus: u32,
    pub kernel: Option<&'a str>,
    pub initrd: Option<&'a str>,
    pub cmdline: &'a str,
    pub disks: &'a [DiskSource],
    pub console_log: Option<&'a str>,
    /// The host agent's metadata element (see [`metadata_element`]).
    pub metadata: &'a str,
}

impl DomainDef<'_> {
    pub fn to_xml(&self) -> String {
        let mut x = String::new();
        x.push_str(&format!("<domain type='{}'>\n", esc(self.virt_type)));
        x.push_str(&format!("  <name>{}</name>\n", esc(self.name)));
        x.push_str(&format!("  <uuid>{}</uuid>\n", self.uuid));
        x.push_str(&format!("  <metadata>\n    {}\n  </metadata>\n", self.metadata));
        x.push_str(&format!(
            "  <memory unit='KiB'>{}</memory>\n",
            self.memory_bytes / 1024
        ));
        x.push_str(&format!("  <vcpu>{}</vcpu>\n", self.vcpus));
        match self.virt_type {
            // TCG: a CPU model every host can emulate; rdrand seeds the
            // guest's RNG at once (without it, the first read of
            // /dev/urandom waits about a second).
            "qemu" => x.push_str(
                "  <cpu mode='custom' match='exact'>\n    <model fallback='forbid'>qemu64</model>\n    \
                 <feature policy='require' name='rdrand'/>\n  </cpu>\n",
            ),
            "kvm" => x.push_str("  <cpu mode='host-model'/>\n"),
            _ => {}
        }
        x.push_str("  <os>\n    <type arch='x86_64' machine='pc'>hvm</type>\n");
        match self.kernel {
            Some(k) => {
                x.push_str(&format!("    <kernel>{}</kernel>\n", esc(k)));
                if let Some(i) = self.initrd {
                    x.push_str(&format!("    <initrd>{}</initrd>\n", esc(i)));
                }
                if !self.cmdline.is_empty() {
                    x.push_str(&format!("    <cmdline>{}</cmdline>\n", esc(self.cmdline)));
                }
            }
            None => x.push_str("    <boot dev='hd'/>\n"),
        }
        x.push_str("  </os>\n");
        // A guest that powers off, reboots or crashes stops: the host
        // reports it Down and the engine decides what runs next.
        x.push_str("  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>destroy</on_reboot>\n");
        x.push_str("  <on_crash>destroy</on_crash>\n  <devices>\n");
        for d in self.disks {
            x.push_str(&format!(
                "    <disk type='{}' device='disk'>\n      <driver name='qemu' type='{}'/>\n      \
                 <source {}='{}'/>\n      <target dev='{}' bus='virtio'/>\n    </disk>\n",
                d.kind.as_str(),
                d.format.as_str(),
                d.kind.source_attr(),
                esc(&d.path),
                esc(&d.dev)
            ));
        }
        if let Some(log) = self.console_log {
            // append='on': without it QEMU truncates the log at every start,
            // a restore included.
            x.push_str(&format!(
                "    <serial type='file'>\n      <source path='{0}' append='on'/>\n      \
                 <target port='0'/>\n    </serial>\n    <console type='file'>\n      \
                 <source path='{0}' append='on'/>\n      <target type='serial' port='0'/>\n    </console>\n",
                esc(log)
            ));
        }
        if self.virt_type != "test" {
            x.push_str("    <memballoon model='none'/>\n");
        }
        x.push_str("  </devices>\n</domain>\n");
        x
    }
}

/// The host agent's element in a domain's `<metadata>`: a JSON document.
pub fn metadata_element(json: &str) -> String {
    format!(
        "<ramsnap:vm xmlns:ramsnap='{}'>{}</ramsnap:vm>",
        crate::libvirt::METADATA_NS,
        esc(json)
    )
}

/// The same element without its namespace, as virDomainSetMetadata takes
/// it (libvirt adds the namespace, with its key as the prefix).
pub fn metadata_body(json: &str) -> String {
    format!("<vm>{}</vm>", esc(json))
}

/// The text inside a metadata element as libvirt returns it.
pub fn metadata_text(element: &str) -> Result<String, XmlError> {
    let mut reader = Reader::from_str(element);
    let mut text = String::new();
    let mut depth = 0usize;
    loop {
        match reader.read_event()? {
            Event::Start(_) => depth += 1,
            Event::End(_) => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    break;
                }
            }
            Event::Text(t) if depth == 1 => text.push_str(&t.unescape()?),
            Event::CData(t) if depth == 1 => text.push_str(&String::from_utf8_lossy(&t)),
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(text)
}

/// The snapshot request: external overlays (pre-created, reused) and,
/// with `memory`, the RAM into that file or device.
pub fn snapshot_xml(name: &str, memory: Option<&str>, overlays: &[DiskSource]) -> String {
    let mut x = format!("<domainsnapshot>\n  <name>{}</name>\n", esc(name));
    if let Some(m) = memory {
        x.push_str(&format!("  <memory snapshot='external' file='{}'/>\n", esc(m)));
    }
    x.push_str("  <disks>\n");
    for d in overlays {
        x.push_str(&format!(
            "    <disk name='{}' snapshot='external' type='{}'>\n      <driver type='{}'/>\n      \
             <source {}='{}'/>\n    </disk>\n",
            esc(&d.dev),
            d.kind.as_str(),
            d.format.as_str(),
            d.kind.source_attr(),
            esc(&d.path)
        ));
    }
    x.push_str("  </disks>\n</domainsnapshot>\n");
    x
}

/// What a restore changes in the saved domain XML: host-side paths only,
/// never the guest ABI.
pub struct RestoreRewrite<'a> {
    /// The VM's current leaves, by target device.
    pub disks: &'a [DiskSource],
    pub console_log: &'a str,
    /// This host's boot images; None keeps the saved ones.
    pub kernel: Option<&'a str>,
    pub initrd: Option<&'a str>,
    /// Replaces the host agent's metadata element.
    pub metadata: &'a str,
}

fn local(name: &[u8]) -> &[u8] {
    match name.iter().position(|&b| b == b':') {
        Some(i) => &name[i + 1..],
        None => name,
    }
}

fn attr(e: &BytesStart, key: &str) -> Result<Option<String>, XmlError> {
    for a in e.attributes() {
        let a = a?;
        if a.key.as_ref() == key.as_bytes() {
            return Ok(Some(a.unescape_value()?.into_owned()));
        }
    }
    Ok(None)
}

/// A copy of the start tag with `set` attributes replaced or added and
/// `drop` attributes removed.
fn restart(e: &BytesStart, set: &[(&str, &str)], drop: &[&str]) -> Result<BytesStart<'static>, XmlError> {
    let mut out = BytesStart::new(String::from_utf8_lossy(e.name().as_ref()).into_owned());
    let mut done = vec![false; set.len()];
    for a in e.attributes() {
        let a = a?;
        let key = a.key.as_ref();
        if drop.iter().any(|d| d.as_bytes() == key) {
            continue;
        }
        match set.iter().position(|(k, _)| k.as_bytes() == key) {
            Some(i) => {
                out.push_attribute((set[i].0, set[i].1));
                done[i] = true;
            }
            None => out.push_attribute(a),
        }
    }
    for (i, (k, v)) in set.iter().enumerate() {
        if !done[i] {
            out.push_attribute((*k, *v));
        }
    }
    Ok(out)
}

fn is_ramsnap_element(e: &BytesStart) -> Result<bool, XmlError> {
    for a in e.attributes() {
        let a = a?;
        let k = a.key.as_ref();
        if (k == b"xmlns" || k.starts_with(b"xmlns:"))
            && a.value.as_ref() == crate::libvirt::METADATA_NS.as_bytes()
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Target devices of the `<disk device='disk'>` elements under
/// `<devices>`, in document order (None for a disk without a target).
pub(crate) fn disk_targets(xml: &str) -> Result<Vec<Option<String>>, XmlError> {
    let mut reader = Reader::from_str(xml);
    let mut path: Vec<Vec<u8>> = Vec::new();
    let mut out: Vec<Option<String>> = Vec::new();
    let mut in_disk: Option<usize> = None;
    loop {
        let ev = reader.read_event()?;
        let (e, empty) = match &ev {
            Event::Start(e) => (Some(e), false),
            Event::Empty(e) => (Some(e), true),
            Event::End(_) => {
                path.pop();
                if in_disk.is_some_and(|d| path.len() < d) {
                    in_disk = None;
                }
                continue;
            }
            Event::Eof => break,
            _ => continue,
        };
        let Some(e) = e else { continue };
        let name = e.name().as_ref().to_vec();
        if name == b"disk" && path == [b"domain".to_vec(), b"devices".to_vec()] {
            let device = attr(e, "device")?.unwrap_or_else(|| "disk".into());
            if device == "disk" {
                out.push(None);
                in_disk = Some(path.len() + 1);
            }
        } else if name == b"target" && in_disk == Some(path.len()) {
            if let Some(last) = out.last_mut() {
                *last = attr(e, "dev")?;
            }
        }
        if !empty {
            path.push(name);
        }
    }
    Ok(out)
}

/// Rewrites a saved domain XML (from the memory image) for a restore on
/// this host; see the module doc.
pub fn rewrite_for_restore(saved: &str, rw: &RestoreRewrite) -> Result<String, XmlError> {
    let targets = disk_targets(saved)?;
    let mut used = vec![false; rw.disks.len()];
    let mut replacement_of = Vec::new();
    for t in &targets {
        let dev = t
            .as_deref()
            .ok_or_else(|| XmlError("a saved disk has no target device".into()))?;
        let i = rw
            .disks
            .iter()
            .position(|d| d.dev == dev)
            .ok_or_else(|| XmlError(format!("the saved domain has disk {dev}, the VM has none")))?;
        used[i] = true;
        replacement_of.push(i);
    }
    if let Some(i) = used.iter().position(|u| !u) {
        return Err(XmlError(format!(
            "the VM has disk {}, the saved domain has none",
            rw.disks[i].dev
        )));
    }

    let mut reader = Reader::from_str(saved);
    let mut w = Writer::new(Vec::new());
    let mut path: Vec<Vec<u8>> = Vec::new();
    // Depth at which a skipped subtree started (backingStore, old source).
    let mut skip: Option<usize> = None;
    let mut disk_no = 0usize;
    // (depth of the disk's children, replacement) while inside a disk.
    let mut disk: Option<(usize, &DiskSource)> = None;
    // Inside a file-type serial or console.
    let mut chardev: Option<usize> = None;
    let mut saw_metadata = false;
    // Replace the text of <kernel>/<initrd>.
    let mut replace_text: Option<&str> = None;

    loop {
        let ev = reader.read_event()?;
        if let Some(depth) = skip {
            match &ev {
                Event::Start(_) => path.push(Vec::new()),
                Event::End(_) => {
                    path.pop();
                    if path.len() == depth {
                        skip = None;
                    }
                }
                Event::Eof => return Err(XmlError("unexpected end of document".into())),
                _ => {}
            }
            continue;
        }
        match ev {
            Event::Eof => break,
            Event::Start(ref e) | Event::Empty(ref e) => {
                let empty = matches!(ev, Event::Empty(_));
                let name = e.name().as_ref().to_vec();
                let depth = path.len();
                let parent_is =
                    |p: &[&[u8]]| path.len() == p.len() && path.iter().zip(p).all(|(a, b)| a == b);
                let mut out: Option<BytesStart<'static>> = None;
                let mut drop_subtree = false;

                if local(&name) == b"backingStore" {
                    drop_subtree = true;
                } else if name == b"disk" && parent_is(&[b"domain", b"devices"]) {
                    let device = attr(e, "device")?.unwrap_or_else(|| "disk".into());
                    if device == "disk" {
                        let d = &rw.disks[replacement_of[disk_no]];
                        disk_no += 1;
                        disk = Some((depth + 1, d));
                        out = Some(restart(e, &[("type", d.kind.as_str())], &[])?);
                    }
                } else if let Some((d_depth, d)) = disk {
                    if depth == d_depth && name == b"source" {
                        // A new source, without the old one's index or children.
                        let mut s = BytesStart::new("source");
                        s.push_attribute((d.kind.source_attr(), d.path.as_str()));
                        w.write_event(Event::Empty(s))?;
                        if !empty {
                            skip = Some(depth);
                            path.push(name);
                        }
                        continue;
                    } else if depth == d_depth && name == b"driver" {
                        out = Some(restart(e, &[("type", d.format.as_str())], &[])?);
                    }
                } else if (name == b"serial" || name == b"console") && parent_is(&[b"domain", b"devices"]) {
                    if attr(e, "type")?.as_deref() == Some("file") {
                        chardev = Some(depth + 1);
                    }
                } else if chardev == Some(depth) && name == b"source" {
                    out = Some(restart(e, &[("path", rw.console_log), ("append", "on")], &[])?);
                } else if parent_is(&[b"domain", b"os"]) && (name == b"kernel" || name == b"initrd") {
                    // None keeps the saved image.
                    replace_text = if name == b"kernel" { rw.kernel } else { rw.initrd };
                } else if parent_is(&[b"domain", b"metadata"]) && is_ramsnap_element(e)? {
                    drop_subtree = true;
                } else if name == b"metadata" && parent_is(&[b"domain"]) {
                    saw_metadata = true;
                }

                if drop_subtree {
                    if !empty {
                        skip = Some(depth);
                        path.push(name);
                    }
                    continue;
                }
                let start = match out {
                    Some(s) => s,
                    None => e.clone().into_owned(),
                };
                if empty {
                    w.write_event(Event::Empty(start))?;
                } else {
                    w.write_event(Event::Start(start))?;
                    path.push(name);
                }
            }
            Event::End(ref e) => {
                let name = e.name().as_ref().to_vec();
                if name == b"metadata" && path.len() == 2 {
                    w.write_event(Event::Text(BytesText::from_escaped(rw.metadata)))?;
                }
                if name == b"domain" && path.len() == 1 && !saw_metadata {
                    w.write_event(Event::Text(BytesText::from_escaped(format!(
                        "  <metadata>{}</metadata>\n",
                        rw.metadata
                    ))))?;
                }
                path.pop();
                if disk.is_some_and(|(d, _)| path.len() < d) {
                    disk = None;
                }
                if chardev.is_some_and(|d| path.len() < d) {
                    chardev = None;
                }
                replace_text = None;
                w.write_event(Event::End(BytesEnd::new(
                    String::from_utf8_lossy(&name).into_owned(),
                )))?;
            }
            Event::Text(ref t) => match replace_text {
                Some(p) => w.write_event(Event::Text(BytesText::new(p)))?,
                None => w.write_event(Event::Text(t.clone()))?,
            },
            other => w.write_event(other)?,
        }
    }
    String::from_utf8(w.into_inner()).map_err(|e| XmlError(e.to_string()))
}

/// The `<name>` of a domain XML.
pub fn domain_name(xml: &str) -> Result<String, XmlError> {
    domain_child_text(xml, b"name")
}

/// The text of `<domain><tag>`.
fn domain_child_text(xml: &str, tag: &[u8]) -> Result<String, XmlError> {
    let mut reader = Reader::from_str(xml);
    let mut path: Vec<Vec<u8>> = Vec::new();
    let want = [b"domain".to_vec(), tag.to_vec()];
    loop {
        match reader.read_event()? {
            Event::Start(e) => path.push(e.name().as_ref().to_vec()),
            Event::End(_) => {
                path.pop();
            }
            Event::Text(t) if path == want => return Ok(t.unescape()?.trim().to_string()),
            Event::Eof => {
                return Err(XmlError(format!(
                    "no <{}> in the domain XML",
                    String::from_utf8_lossy(tag)
                )))
            }
            _ => {}
        }
    }
}

/// The `<uuid>` of a domain XML.
pub fn domain_uuid(xml: &str) -> Result<String, XmlError> {
    domain_child_text(xml, b"uuid")
}

/// (target dev, source path) of each disk in a domain XML: what the
/// domain runs on now.
pub fn disk_sources(xml: &str) -> Result<Vec<(String, String)>, XmlError> {
    let mut reader = Reader::from_str(xml);
    let mut path: Vec<Vec<u8>> = Vec::new();
    let mut out = Vec::new();
    let mut cur: Option<(usize, Option<String>, Option<String>)> = None;
    loop {
        let ev = reader.read_event()?;
        let (e, empty) = match &ev {
            Event::Start(e) => (e, false),
            Event::Empty(e) => (e, true),
            Event::End(_) => {
                path.pop();
                if cur.as_ref().is_some_and(|(d, _, _)| path.len() < *d) {
                    let (_, dev, src) = cur.take().expect("checked");
                    out.push((dev.unwrap_or_default(), src.unwrap_or_default()));
                }
                continue;
            }
            Event::Eof => break,
            _ => continue,
        };
        let name = e.name().as_ref().to_vec();
        if name == b"disk" && path == [b"domain".to_vec(), b"devices".to_vec()] {
            cur = Some((path.len() + 1, None, None));
        } else if let Some((d, dev, src)) = cur.as_mut() {
            if path.len() == *d && name == b"target" {
                *dev = attr(e, "dev")?;
            } else if path.len() == *d && name == b"source" {
                *src = match attr(e, "file")? {
                    Some(f) => Some(f),
                    None => attr(e, "dev")?,
                };
            }
        }
        if !empty {
            path.push(name);
        }
    }
    Ok(out)
}

/// Each disk's (target dev, backing chain), the chain leaf first: the
/// `source` path of the disk, then of each nested `backingStore`, as the
/// live XML reports them.
pub fn disk_chains(xml: &str) -> Result<Vec<(String, Vec<String>)>, XmlError> {
    let mut reader = Reader::from_str(xml);
    let mut path: Vec<Vec<u8>> = Vec::new();
    let mut out = Vec::new();
    // The open disk: its depth, target dev and chain so far.
    let mut cur: Option<(usize, Option<String>, Vec<String>)> = None;
    loop {
        let ev = reader.read_event()?;
        let (e, empty) = match &ev {
            Event::Start(e) => (e, false),
            Event::Empty(e) => (e, true),
            Event::End(_) => {
                path.pop();
                if cur.as_ref().is_some_and(|(d, _, _)| path.len() < *d) {
                    let (_, dev, chain) = cur.take().expect("checked");
                    out.push((dev.unwrap_or_default(), chain));
                }
                continue;
            }
            Event::Eof => break,
            _ => continue,
        };
        let name = e.name().as_ref().to_vec();
        if name == b"disk" && path == [b"domain".to_vec(), b"devices".to_vec()] {
            cur = Some((path.len() + 1, None, Vec::new()));
        } else if let Some((d, dev, chain)) = cur.as_mut() {
            let in_disk_or_backing = path.len() >= *d
                && path[*d - 1..].iter().enumerate().all(|(i, n)| {
                    if i == 0 {
                        n == b"disk"
                    } else {
                        n == b"backingStore"
                    }
                });
            if path.len() == *d && name == b"target" {
                *dev = attr(e, "dev")?;
            } else if name == b"source" && in_disk_or_backing {
                if let Some(p) = attr(e, "file")?.or(attr(e, "dev")?) {
                    chain.push(p);
                }
            }
        }
        if !empty {
            path.push(name);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_chains_follow_the_backing_stores() {
        let chains = disk_chains(SAVED).unwrap();
        assert_eq!(
            chains,
            vec![
                (
                    "vda".to_string(),
                    vec!["/old/images/base".to_string(), "/old/images/older".to_string()]
                ),
                ("hdc".to_string(), vec![]),
                ("vdb".to_string(), vec!["/old/images/data".to_string()]),
            ]
        );
    }

    const SAVED: &str = r#"<domain type='qemu'>
  <name>ramsnap-b6425bc1-16d4-492a-98af-b47000084aa3</name>
  <uuid>b6425bc1-16d4-492a-98af-b47000084aa3</uuid>
  <metadata>
    <ramsnap:vm xmlns:ramsnap="https://ramsnap.dev/xmlns/host/1">{"old":true}</ramsnap:vm>
    <other:x xmlns:other="urn:other">keep</other:x>
  </metadata>
  <memory unit='KiB'>262144</memory>
  <os>
    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    <kernel>/old/boot/vmlinux</kernel>
    <initrd>/old/boot/initramfs.img</initrd>
    <cmdline>console=ttyS0 loglevel=0 panic=-1</cmdline>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/old/images/base' index='2'/>
      <backingStore type='file' index='3'>
        <format type='qcow2'/>
        <source file='/old/images/older'/>
        <backingStore/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>
    </disk>
    <disk type='file' device='cdrom'>
      <target dev='hdc' bus='ide'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/old/images/data'>
        <seclabel model='none'/>
      </source>
      <backingStore/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path='/old/run/console.log'/>
      <target type='isa-serial' port='0'>
        <model name='isa-serial'/>
      </target>
    </serial>
    <console type='file'>
      <source path='/old/run/console.log' append='on'/>
      <target type='serial' port='0'/>
    </console>
    <memballoon model='none'/>
  </devices>
</domain>
"#;

    fn rewrite() -> Vec<DiskSource> {
        vec![
            DiskSource {
                dev: "vdb".into(),
                kind: DiskKind::Block,
                path: "/run/ramsnap/storage/d/images/i/b".into(),
                format: DiskFormat::Qcow2,
            },
            DiskSource {
                dev: "vda".into(),
                kind: DiskKind::File,
                path: "/new/images/leaf".into(),
                format: DiskFormat::Qcow2,
            },
        ]
    }

    #[test]
    fn restore_rewrite_points_disks_at_current_leaves_and_strips_backing_stores() {
        let disks = rewrite();
        let meta = metadata_element(r#"{"new":true}"#);
        let out = rewrite_for_restore(
            SAVED,
            &RestoreRewrite {
                disks: &disks,
                console_log: "/run/ramsnap/host/x/console.log",
                kernel: Some("/boot/dir/vmlinux"),
                initrd: Some("/boot/dir/initramfs.img"),
                metadata: &meta,
            },
        )
        .unwrap();
        assert!(!out.contains("backingStore"), "{out}");
        assert!(!out.contains("/old/images"), "{out}");
        assert!(!out.contains("/old/run"), "{out}");
        assert!(!out.contains("/old/boot"), "{out}");
        assert!(!out.contains(r#"{"old":true}"#), "{out}");
        assert!(
            out.contains(r#"{&quot;new&quot;:true}"#) || out.contains(r#"{"new":true}"#),
            "{out}"
        );
        assert!(out.contains("urn:other"), "other metadata is kept: {out}");
        assert!(out.contains("<kernel>/boot/dir/vmlinux</kernel>"), "{out}");
        assert_eq!(
            out.matches("append=\"on\"").count() + out.matches("append='on'").count(),
            2,
            "{out}"
        );
        assert_eq!(
            disk_sources(&out).unwrap(),
            vec![
                ("vda".to_string(), "/new/images/leaf".to_string()),
                ("hdc".to_string(), String::new()),
                ("vdb".to_string(), "/run/ramsnap/storage/d/images/i/b".to_string()),
            ]
        );
        // vdb became a block disk with a qcow2 driver; the ABI parts stay.
        assert!(out.contains(r#"<disk type="block" device="disk">"#), "{out}");
        assert!(out.contains(r#"<driver name="qemu" type="qcow2"/>"#), "{out}");
        assert!(out.contains("<address type='pci'"), "{out}");
        assert!(out.contains("machine='pc-i440fx-7.2'"), "{out}");
        assert_eq!(
            domain_name(&out).unwrap(),
            "ramsnap-b6425bc1-16d4-492a-98af-b47000084aa3"
        );
    }

    #[test]
    fn restore_rewrite_refuses_a_disk_set_that_differs() {
        let mut disks = rewrite();
        disks.pop();
        let r = RestoreRewrite {
            disks: &disks,
            console_log: "/c",
            kernel: None,
            initrd: None,
            metadata: "",
        };
        assert!(rewrite_for_restore(SAVED, &r).is_err());
        let mut disks = rewrite();
        disks.push(DiskSource {
            dev: "vdc".into(),
            kind: DiskKind::File,
            path: "/x".into(),
            format: DiskFormat::Raw,
        });
        let r = RestoreRewrite { disks: &disks, ..r };
        assert!(rewrite_for_restore(SAVED, &r).is_err());
        assert!(rewrite_for_restore("<domain><devices><disk", &r).is_err());
    }

    #[test]
    fn domain_xml_escapes_caller_text_and_round_trips_disks() {
        let disks = rewrite();
        let meta = metadata_element(r#"{"name":"<a & b>"}"#);
        let def = DomainDef {
            virt_type: "qemu",
            name: "ramsnap-x",
            uuid: Uuid::nil(),
            memory_bytes: 256 << 20,
            vcpus: 2,
            kernel: Some("/boot/vmlinux"),
            initrd: Some("/boot/initrd"),
            cmdline: "console=ttyS0 x='<&>'",
            disks: &disks,
            console_log: Some("/run/c.log"),
            metadata: &meta,
        };
        let xml = def.to_xml();
        assert!(xml.contains("<memory unit='KiB'>262144</memory>"));
        assert!(!xml.contains("x='<&>'"));
        let mut reader = Reader::from_str(&xml);
        loop {
            match reader.read_event() {
                Ok(Event::Eof) => break,
                Ok(_) => {}
                Err(e) => panic!("not well-formed: {e}\n{xml}"),
            }
        }
        assert_eq!(disk_sources(&xml).unwrap().len(), 2);
        let element = xml
            .split("<metadata>")
            .nth(1)
            .and_then(|s| s.split("</metadata>").next())
            .unwrap();
        assert_eq!(metadata_text(element.trim()).unwrap(), r#"{"name":"<a & b>"}"#);
    }

    #[test]
    fn snapshot_xml_names_memory_and_overlays() {
        let x = snapshot_xml("s", Some("/dev/loop7"), &rewrite());
        assert!(x.contains("<memory snapshot='external' file='/dev/loop7'/>"));
        assert!(x.contains("<source dev='/run/ramsnap/storage/d/images/i/b'/>"));
        assert!(x.contains("<source file='/new/images/leaf'/>"));
        let x = snapshot_xml("s", None, &rewrite());
        assert!(!x.contains("<memory"));
    }
}
