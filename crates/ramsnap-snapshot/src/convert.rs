//! Conversions between the repository's types and the wire's.
use crate::db;
use ramsnap_proto::common::v1 as common;
use tonic::Status;
use uuid::Uuid;

pub fn to_wire_ref(r: &db::VolumeRef) -> common::VolumeRef {
    common::VolumeRef {
        domain_id: r.domain_id.to_string(),
        image_id: r.image_id.to_string(),
        volume_id: r.volume_id.to_string(),
    }
}

pub fn from_wire_ref(r: Option<&common::VolumeRef>) -> Result<db::VolumeRef, Status> {
    let r = r.ok_or_else(|| Status::internal("a service answered without a volume reference"))?;
    let p =
        |s: &str| Uuid::parse_str(s).map_err(|_| Status::internal(format!("bad id {s:?} from a service")));
    Ok(db::VolumeRef {
        domain_id: p(&r.domain_id)?,
        image_id: p(&r.image_id)?,
        volume_id: p(&r.volume_id)?,
    })
}

pub fn to_wire_memory(m: &db::MemoryVolume) -> common::MemoryVolumeRef {
    common::MemoryVolumeRef {
        dump: Some(to_wire_ref(&m.dump)),
        metadata: Some(to_wire_ref(&m.metadata)),
    }
}

/// A status from a downstream service, as this service passes it on.
pub fn downstream(what: &str, s: Status) -> Status {
    // A status that tonic made from a transport error (the agent died
    // mid-call, the connection broke) carries that error as its source; an
    // agent's own answer never does. Whatever its code, no answer came.
    let code = if std::error::Error::source(&s).is_some() {
        tonic::Code::Unavailable
    } else {
        s.code()
    };
    Status::with_details(
        code,
        format!("{what}: {}", s.message()),
        s.details().to_vec().into(),
    )
}
