//! Storage messages for people and for scripts.
//!
//! JSON keeps the proto field names; enums become the lower-case words the
//! flags take (`VOLUME_PURPOSE_MEMORY_DUMP` is `"memory-dump"`); an empty
//! optional id (no parent) is `null`; sizes are plain byte counts.
use crate::args::ref_text;
use crate::output::{dash_if_empty, human_bytes, labels, non_empty, utc_time, Table};
use ramsnap_proto::common::v1 as common;
use ramsnap_proto::storage::v1 as pb;
use serde_json::{json, Value};

labels! {
    domain_type: pb::DomainType, "DOMAIN_TYPE_";
    domain_role: pb::DomainRole, "DOMAIN_ROLE_";
    domain_format: pb::DomainFormat, "DOMAIN_FORMAT_";
    format: pb::VolumeFormat, "VOLUME_FORMAT_";
    allocation: pb::VolumeAllocation, "VOLUME_ALLOCATION_";
    purpose: pb::VolumePurpose, "VOLUME_PURPOSE_";
    legality: pb::VolumeLegality, "VOLUME_LEGALITY_";
}

pub fn domain_json(d: &pb::StorageDomain) -> Value {
    json!({
        "domain_id": d.domain_id,
        "name": d.name,
        "type": domain_type(d.r#type),
        "role": domain_role(d.role),
        "capacity_bytes": d.capacity_bytes,
        "free_bytes": d.free_bytes,
        "location": d.location,
        "metadata_version": d.metadata_version,
        "format": domain_format(d.format),
        "read_only": d.read_only,
    })
}

pub fn ref_json(r: &common::VolumeRef) -> Value {
    json!({
        "domain_id": r.domain_id,
        "image_id": r.image_id,
        "volume_id": r.volume_id,
    })
}

pub fn volume_json(v: &pb::Volume) -> Value {
    json!({
        "ref": v.r#ref.as_ref().map(ref_json),
        "parent_volume_id": non_empty(&v.parent_volume_id),
        "format": format(v.format),
        "allocation": allocation(v.allocation),
        "purpose": purpose(v.purpose),
        "legality": legality(v.legality),
        "capacity_bytes": v.capacity_bytes,
        "allocated_bytes": v.allocated_bytes,
        "description": v.description,
        "created_at": v.created_at,
    })
}

pub fn domain_table(domains: &[pb::StorageDomain]) -> Table {
    let mut t = Table::new(&["ID", "NAME", "TYPE", "CAPACITY", "FREE", "LOCATION"]);
    for d in domains {
        t.row(vec![
            d.domain_id.clone(),
            d.name.clone(),
            domain_type(d.r#type),
            human_bytes(d.capacity_bytes),
            human_bytes(d.free_bytes),
            d.location.clone(),
        ]);
    }
    t
}

pub fn domain_fields(d: &pb::StorageDomain) -> Vec<(&'static str, String)> {
    vec![
        ("id", d.domain_id.clone()),
        ("name", d.name.clone()),
        ("type", domain_type(d.r#type)),
        ("role", domain_role(d.role)),
        ("location", d.location.clone()),
        ("capacity", sized(d.capacity_bytes)),
        ("free", sized(d.free_bytes)),
        ("metadata version", d.metadata_version.to_string()),
        ("format", domain_format(d.format)),
        ("read only", if d.read_only { "yes" } else { "no" }.to_string()),
    ]
}

pub fn volume_table<'a>(volumes: impl IntoIterator<Item = &'a pb::Volume>) -> Table {
    let mut t = Table::new(&[
        "IMAGE",
        "VOLUME",
        "PARENT",
        "FORMAT",
        "ALLOCATION",
        "PURPOSE",
        "LEGALITY",
        "CAPACITY",
        "ALLOCATED",
    ]);
    for v in volumes {
        let r = v.r#ref.clone().unwrap_or_default();
        t.row(vec![
            r.image_id,
            r.volume_id,
            dash_if_empty(&v.parent_volume_id),
            format(v.format),
            allocation(v.allocation),
            purpose(v.purpose),
            legality(v.legality),
            human_bytes(v.capacity_bytes),
            human_bytes(v.allocated_bytes),
        ]);
    }
    t
}

pub fn volume_fields(v: &pb::Volume) -> Vec<(&'static str, String)> {
    vec![
        ("ref", v.r#ref.as_ref().map(ref_text).unwrap_or_default()),
        ("parent", dash_if_empty(&v.parent_volume_id)),
        ("format", format(v.format)),
        ("allocation", allocation(v.allocation)),
        ("purpose", purpose(v.purpose)),
        ("legality", legality(v.legality)),
        ("capacity", sized(v.capacity_bytes)),
        ("allocated", sized(v.allocated_bytes)),
        ("description", dash_if_empty(&v.description)),
        ("created", utc_time(v.created_at)),
    ]
}

/// A descriptor without its document: `domain descriptors` lists VMs, and
/// an OVF can be megabytes of XML.
pub fn descriptor_json(d: &pb::VmDescriptor) -> Value {
    json!({
        "vm_id": d.vm_id,
        "updated_at": d.updated_at,
        "ovf_bytes": d.ovf.len(),
    })
}

pub fn descriptor_table(descriptors: &[pb::VmDescriptor]) -> Table {
    let mut t = Table::new(&["VM", "UPDATED", "OVF"]);
    for d in descriptors {
        t.row(vec![
            d.vm_id.clone(),
            utc_time(d.updated_at),
            human_bytes(d.ovf.len() as u64),
        ]);
    }
    t
}

/// `10 GiB (10737418240 bytes)`: readable, and exact for copying.
fn sized(bytes: u64) -> String {
    if bytes < 1024 {
        human_bytes(bytes)
    } else {
        format!("{} ({bytes} bytes)", human_bytes(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume() -> pb::Volume {
        pb::Volume {
            r#ref: Some(common::VolumeRef {
                domain_id: "d".into(),
                image_id: "i".into(),
                volume_id: "v".into(),
            }),
            parent_volume_id: String::new(),
            format: pb::VolumeFormat::Cow as i32,
            allocation: pb::VolumeAllocation::Sparse as i32,
            purpose: pb::VolumePurpose::MemoryDump as i32,
            legality: pb::VolumeLegality::Legal as i32,
            capacity_bytes: 1 << 30,
            allocated_bytes: 4096,
            description: "ram".into(),
            created_at: 1_700_000_000,
        }
    }

    #[test]
    fn enum_labels() {
        assert_eq!(domain_type(pb::DomainType::File as i32), "file");
        assert_eq!(domain_type(pb::DomainType::Block as i32), "block");
        assert_eq!(domain_type(0), "unspecified");
        assert_eq!(
            purpose(pb::VolumePurpose::MemoryMetadata as i32),
            "memory-metadata"
        );
        assert_eq!(
            allocation(pb::VolumeAllocation::Preallocated as i32),
            "preallocated"
        );
        assert_eq!(legality(pb::VolumeLegality::Illegal as i32), "illegal");
        assert_eq!(format(42), "unknown(42)");
    }

    #[test]
    fn volume_to_json() {
        let v = volume_json(&volume());
        assert_eq!(
            v,
            json!({
                "ref": {"domain_id": "d", "image_id": "i", "volume_id": "v"},
                "parent_volume_id": null,
                "format": "cow",
                "allocation": "sparse",
                "purpose": "memory-dump",
                "legality": "legal",
                "capacity_bytes": 1073741824u64,
                "allocated_bytes": 4096,
                "description": "ram",
                "created_at": 1_700_000_000,
            })
        );
        let child = pb::Volume {
            parent_volume_id: "p".into(),
            ..volume()
        };
        assert_eq!(volume_json(&child)["parent_volume_id"], "p");
        let no_ref = pb::Volume {
            r#ref: None,
            ..volume()
        };
        assert_eq!(volume_json(&no_ref)["ref"], Value::Null);
    }

    #[test]
    fn domain_to_json() {
        let d = pb::StorageDomain {
            domain_id: "d".into(),
            name: "files".into(),
            r#type: pb::DomainType::File as i32,
            capacity_bytes: 10,
            free_bytes: 5,
            location: "/srv/nfs1".into(),
            metadata_version: 1,
            role: pb::DomainRole::Export as i32,
            format: pb::DomainFormat::Ovirt as i32,
            read_only: false,
        };
        assert_eq!(
            domain_json(&d),
            json!({
                "domain_id": "d", "name": "files", "type": "file", "role": "export",
                "capacity_bytes": 10, "free_bytes": 5, "location": "/srv/nfs1",
                "metadata_version": 1, "format": "ovirt", "read_only": false,
            })
        );
        assert!(domain_fields(&d).contains(&("role", "export".to_string())));
        assert!(domain_fields(&d).contains(&("format", "ovirt".to_string())));
        let table = domain_table(&[d]).render();
        assert!(
            table.starts_with("ID  NAME   TYPE  CAPACITY  FREE  LOCATION\n"),
            "{table}"
        );
        assert!(
            table.contains("d   files  file  10 B      5 B   /srv/nfs1"),
            "{table}"
        );
    }

    #[test]
    fn descriptors_list_without_their_documents() {
        let d = pb::VmDescriptor {
            vm_id: "v".into(),
            ovf: "<ovf/>".into(),
            updated_at: 1_700_000_000,
        };
        assert_eq!(
            descriptor_json(&d),
            json!({"vm_id": "v", "updated_at": 1_700_000_000, "ovf_bytes": 6})
        );
        let table = descriptor_table(&[d]).render();
        let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(row[0], "v");
        assert_eq!(row[row.len() - 2..], ["6", "B"]);
        assert_eq!(domain_role(0), "unspecified");
    }

    #[test]
    fn volume_rows_and_fields() {
        let table = volume_table(&[volume()]).render();
        let row = table.lines().nth(1).unwrap();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "i",
                "v",
                "-",
                "cow",
                "sparse",
                "memory-dump",
                "legal",
                "1",
                "GiB",
                "4",
                "KiB"
            ]
        );
        let fields = volume_fields(&volume());
        assert_eq!(fields[0], ("ref", "d/i/v".to_string()));
        assert!(fields.contains(&("capacity", "1 GiB (1073741824 bytes)".to_string())));
    }
}
