//! Memory snapshots oVirt 3.3 made (issue 14), as ramsnap adopts them.
//!
//! oVirt keeps a memory snapshot as two volumes: the dump, libvirt's
//! memory file as VDSM had libvirt write it (a save image, the format
//! ramsnap's own dumps have), and a metadata volume holding a Python pickle
//! VDSM wrote: a dict with the domain XML the guest ran with
//! (`_srcDomXML`), `restoreFromSnapshot` and `elapsedTimeOffset`. ramsnap
//! reads that pickle with `ramsnap_common::ovirt::pickle`, which builds
//! plain values only, and then:
//!
//! - a pickle that is not the dict VDSM writes (a refused opcode, another
//!   type where a string, bool or number belongs, no `_srcDomXML`) is
//!   refused: whoever wrote it did not write a memory snapshot;
//! - a memory that is well formed but cannot be restored here (the dump is
//!   not a raw libvirt save image, the saved guest is another VM, or its
//!   disks are not the VM's `vda`, `vdb`, ...) is reported unusable, and
//!   the import leaves it out with a warning;
//! - a usable one gets ramsnap's metadata in place of the pickle (see
//!   [`crate::metadata`]), with the dump's checksum computed on import.
use crate::model::disk_dev;
use crate::xml;
use ramsnap_common::ovirt::pickle::{self, PickleError, Value};
use uuid::Uuid;

/// What the pickle in an oVirt metadata volume says.
#[derive(Debug, Clone, PartialEq)]
pub enum Pickled {
    /// VDSM's dict: the domain XML the guest ran with.
    Memory { domain_xml: String },
    /// Not a pickle at all (another format): the memory is unusable.
    Unknown(String),
}

/// Reads the metadata volume's bytes (the pickle, then padding). Err: a
/// pickle that is not what VDSM writes, which is refused.
pub fn read_pickle(bytes: &[u8]) -> Result<Pickled, String> {
    let bytes = &bytes[..bytes.len().min(pickle::MAX_BYTES)];
    let value = match pickle::read(bytes) {
        Ok(v) => v,
        Err(e @ (PickleError::Refused { .. } | PickleError::TooBig | PickleError::TooLarge(_))) => {
            return Err(format!("its metadata pickle is refused: {e}"))
        }
        Err(e) => {
            return Ok(Pickled::Unknown(format!(
                "its metadata is not a pickle VDSM wrote: {e}"
            )))
        }
    };
    let Value::Dict(items) = &value else {
        return Err("its metadata pickle holds something other than VDSM's dict".into());
    };
    for (k, v) in items {
        let Some(key) = k.as_str() else {
            return Err("its metadata pickle has a key that is not a string".into());
        };
        let fits = match key {
            "_srcDomXML" => v.as_str().is_some(),
            "restoreFromSnapshot" => matches!(v, Value::Bool(_) | Value::Int(_)),
            "elapsedTimeOffset" => matches!(v, Value::Int(_) | Value::Float(_)),
            // Other keys of plain values are VDSM's own; not used.
            _ => true,
        };
        if !fits {
            return Err(format!(
                "its metadata pickle's {key} is not of the type VDSM writes"
            ));
        }
    }
    let domain_xml = value
        .get("_srcDomXML")
        .and_then(Value::as_str)
        .ok_or("its metadata pickle has no _srcDomXML (the domain XML)")?;
    Ok(Pickled::Memory {
        domain_xml: domain_xml.to_string(),
    })
}

/// Why the saved guest cannot be restored as VM `vm_id` with `disks`
/// disks, or None when it can: the XML in the dump's save header (and the
/// pickle's) names the VM, and its disks are exactly the VM's, by target.
pub fn unfit(vm_id: Uuid, disks: usize, header_xml: &str, pickled_xml: &str) -> Option<String> {
    for (what, xml) in [
        ("the dump's save header", header_xml),
        ("the metadata's domain XML", pickled_xml),
    ] {
        match xml::domain_uuid(xml).map(|u| Uuid::parse_str(&u)) {
            Ok(Ok(u)) if u == vm_id => {}
            Ok(Ok(u)) => return Some(format!("{what} is of VM {u}, not {vm_id}")),
            Ok(Err(_)) | Err(_) => return Some(format!("{what} names no VM (no <uuid>)")),
        }
    }
    let targets = match xml::disk_targets(header_xml) {
        Ok(t) => t,
        Err(e) => return Some(format!("the dump's save header cannot be read: {e}")),
    };
    let mut saved: Vec<String> = targets.into_iter().map(Option::unwrap_or_default).collect();
    saved.sort();
    let mut want: Vec<String> = (0..disks).map(disk_dev).collect();
    want.sort();
    if saved != want {
        return Some(format!(
            "the guest was saved with disks [{}], the VM has [{}]",
            saved.join(", "),
            want.join(", ")
        ));
    }
    None
}

/// The domain XML in a save image's header (`metadata::read_save_head`):
/// the NUL-terminated text after libvirt's 92-byte header.
pub fn header_xml(head: &[u8]) -> Option<String> {
    let data = head.get(crate::metadata::SAVE_HEADER_BYTES as usize..)?;
    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    String::from_utf8(data[..end].to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A protocol-2 pickle of a dict of text keys: what Python's
    /// `pickle.dumps(d, 2)` writes for strings, a bool and a float.
    fn dict_pickle(items: &[(&str, Value)]) -> Vec<u8> {
        let mut b = vec![0x80, 2, b'}', b'('];
        let text = |b: &mut Vec<u8>, s: &str| {
            b.push(b'X');
            b.extend((s.len() as u32).to_le_bytes());
            b.extend(s.as_bytes());
        };
        for (k, v) in items {
            text(&mut b, k);
            match v {
                Value::Text(s) => text(&mut b, s),
                Value::Bool(true) => b.push(0x88),
                Value::Bool(false) => b.push(0x89),
                Value::Float(f) => {
                    b.push(b'G');
                    b.extend(f.to_be_bytes());
                }
                _ => unreachable!(),
            }
        }
        b.extend([b'u', b'.']);
        b.extend([0u8; 64]);
        b
    }

    fn domain(vm: Uuid, devs: &[&str]) -> String {
        let disks: String = devs
            .iter()
            .map(|d| format!("<disk type='file' device='disk'><source file='/x/{d}'/><target dev='{d}' bus='virtio'/></disk>"))
            .collect();
        format!("<domain type='kvm'><name>vm1</name><uuid>{vm}</uuid><devices>{disks}</devices></domain>")
    }

    #[test]
    fn reads_vdsms_dict_and_refuses_anything_else() {
        let vm = Uuid::new_v4();
        let xml = domain(vm, &["vda"]);
        let good = dict_pickle(&[
            ("restoreFromSnapshot", Value::Bool(true)),
            ("_srcDomXML", Value::Text(xml.clone())),
            ("elapsedTimeOffset", Value::Float(12.5)),
        ]);
        assert_eq!(
            read_pickle(&good),
            Ok(Pickled::Memory {
                domain_xml: xml.clone()
            })
        );
        // Wrong types where VDSM writes plain ones.
        let e = read_pickle(&dict_pickle(&[("_srcDomXML", Value::Bool(true))])).unwrap_err();
        assert!(e.contains("_srcDomXML"), "{e}");
        let e = read_pickle(&dict_pickle(&[("restoreFromSnapshot", Value::Text("x".into()))])).unwrap_err();
        assert!(e.contains("restoreFromSnapshot"), "{e}");
        assert!(
            read_pickle(&dict_pickle(&[("other", Value::Bool(true))])).is_err(),
            "no _srcDomXML"
        );
        // os.system by GLOBAL + REDUCE: refused before it is built.
        let evil = b"cos\nsystem\n(S'touch /tmp/pwned'\ntR.".to_vec();
        let e = read_pickle(&evil).unwrap_err();
        assert!(e.contains("GLOBAL"), "{e}");
        // Not a pickle: unusable, not refused.
        assert!(matches!(read_pickle(b"<domain/>"), Ok(Pickled::Unknown(_))));
        assert!(matches!(read_pickle(&[0u8; 10240]), Ok(Pickled::Unknown(_))));
    }

    #[test]
    fn reads_what_python_2s_protocol_0_wrote() {
        // pickle.dumps({...}) in VDSM 3.3 (Python 2): STRING literals in
        // repr's escaping, True as I01, a float as F.
        let vm = Uuid::new_v4();
        let pickled = format!(
            "(dp0\nS'restoreFromSnapshot'\np1\nI01\nsS'_srcDomXML'\np2\nS'<domain type=\\'kvm\\'><uuid>{vm}</uuid>\\n</domain>'\np3\nsS'elapsedTimeOffset'\np4\nF12.5\ns."
        );
        let mut bytes = pickled.into_bytes();
        bytes.resize(10240, 0);
        assert_eq!(
            read_pickle(&bytes),
            Ok(Pickled::Memory {
                domain_xml: format!("<domain type='kvm'><uuid>{vm}</uuid>\n</domain>")
            })
        );
    }

    #[test]
    fn fits_only_its_own_vm_with_the_same_disks() {
        let vm = Uuid::new_v4();
        let two = domain(vm, &["vda", "vdb"]);
        assert_eq!(unfit(vm, 2, &two, &two), None);
        assert!(unfit(vm, 1, &two, &two).unwrap().contains("[vda, vdb]"));
        let other = Uuid::new_v4();
        assert!(unfit(other, 2, &two, &two).unwrap().contains("not"));
        let ide = domain(vm, &["hda"]);
        assert!(unfit(vm, 1, &ide, &ide).unwrap().contains("hda"));
        assert!(unfit(vm, 2, &two, "<domain/>").unwrap().contains("no VM"));
        let mut head = vec![0u8; 92];
        head.extend(two.as_bytes());
        head.extend([0u8; 8]);
        assert_eq!(header_xml(&head).as_deref(), Some(two.as_str()));
    }
}
