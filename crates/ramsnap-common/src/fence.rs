//! Fencing of the agents' side effects by saga ownership.
//!
//! A coordinator replica owns a saga under a generation that goes up each
//! time another replica adopts it. The database refuses the log writes of
//! an owner whose generation is stale; this module does the same for the
//! calls that owner makes to the agents, which the database cannot see.
//!
//! - The coordinator runs each saga node inside [`scope`]; the channel it
//!   calls the agents through ([`Stamp`]) adds the saga's id and
//!   generation to every request as the metadata [`SAGA_HEADER`] and
//!   [`GENERATION_HEADER`].
//! - An agent ([`Fences`], checked by the auth layer on mutating calls
//!   only) remembers the highest generation it has seen for each saga and
//!   refuses a lower one with FAILED_PRECONDITION `STALE_OWNER` before the
//!   call reaches its handler. A call without the headers (an operator's,
//!   a host agent's, one made outside a saga) is not fenced.
//!
//! Fenced by saga, not by VM or volume: generations are counted per saga,
//! so two sagas' generations say nothing about each other, while every
//! side effect of a saga is made under its id. The table is in memory: an
//! agent that restarts forgets it, and the first call of each generation
//! after that is let through; the stale owner's next log write is still
//! refused by the database, so at most the calls of one node leak, as
//! when the stale owner calls before the adopter does.
use crate::status;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tonic::metadata::MetadataValue;
use tonic::{Request, Status};
use uuid::Uuid;

pub const SAGA_HEADER: &str = "ramsnap-saga";
pub const GENERATION_HEADER: &str = "ramsnap-saga-generation";

/// Whose side effect a call is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fence {
    pub saga: Uuid,
    pub generation: i64,
}

tokio::task_local! {
    static CURRENT: Fence;
}

/// Runs `fut` with every agent call it makes stamped with `fence`.
pub async fn scope<F: std::future::Future>(fence: Fence, fut: F) -> F::Output {
    CURRENT.scope(fence, fut).await
}

/// The fence of the saga node being run, if any.
pub fn current() -> Option<Fence> {
    CURRENT.try_with(|f| *f).ok()
}

/// The metadata that carries the domain-writer generation a storage call
/// is made under (see [`Stamp::writer`]).
pub const WRITER_HEADER: &str = "ramsnap-domain-writer";

/// The coordinator's client interceptor: stamps each request with the
/// current fence (see [`scope`]); requests made outside a saga go as they
/// are. A client made for a storage domain's metadata writer
/// ([`Stamp::writer`]) also stamps the writer generation it was chosen
/// under, which the storage agent checks against the one recorded on the
/// domain.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stamp {
    writer: Option<i64>,
}

impl Stamp {
    /// Stamps the domain-writer generation too.
    pub fn writer(generation: i64) -> Stamp {
        Stamp {
            writer: Some(generation),
        }
    }
}

impl tonic::service::Interceptor for Stamp {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        crate::tracecontext::inject(req.metadata_mut());
        if let Some(g) = self.writer {
            req.metadata_mut().insert(WRITER_HEADER, MetadataValue::from(g));
        }
        if let Some(f) = current() {
            let md = req.metadata_mut();
            md.insert(
                SAGA_HEADER,
                MetadataValue::try_from(f.saga.to_string()).expect("a uuid is ASCII"),
            );
            md.insert(GENERATION_HEADER, MetadataValue::from(f.generation));
        }
        Ok(req)
    }
}

/// Reads a request's fence: None without one; INVALID_ARGUMENT when the
/// headers are malformed or only one of them is there.
pub fn from_headers(headers: &http::HeaderMap) -> Result<Option<Fence>, Status> {
    let saga = headers.get(SAGA_HEADER);
    let generation = headers.get(GENERATION_HEADER);
    let (saga, generation) = match (saga, generation) {
        (None, None) => return Ok(None),
        (Some(s), Some(g)) => (s, g),
        (Some(_), None) => {
            return Err(status::invalid_argument(
                GENERATION_HEADER,
                format!("{SAGA_HEADER} is set but {GENERATION_HEADER} is not"),
            ))
        }
        (None, Some(_)) => {
            return Err(status::invalid_argument(
                SAGA_HEADER,
                format!("{GENERATION_HEADER} is set but {SAGA_HEADER} is not"),
            ))
        }
    };
    let saga = saga
        .to_str()
        .ok()
        .and_then(|s| Uuid::parse_str(s).ok())
        .ok_or_else(|| status::invalid_argument(SAGA_HEADER, "not a UUID"))?;
    let generation = generation
        .to_str()
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .filter(|g| *g >= 0)
        .ok_or_else(|| {
            status::invalid_argument(GENERATION_HEADER, "not a generation (an integer of at least 0)")
        })?;
    Ok(Some(Fence { saga, generation }))
}

/// Reads a storage call's domain-writer generation: None without one;
/// INVALID_ARGUMENT naming the header when it is not an integer of at
/// least 0.
pub fn writer_from(metadata: &tonic::metadata::MetadataMap) -> Result<Option<i64>, Status> {
    let Some(v) = metadata.get(WRITER_HEADER) else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .filter(|g| *g >= 0)
        .map(Some)
        .ok_or_else(|| {
            status::invalid_argument(
                WRITER_HEADER,
                "not a writer generation (an integer of at least 0)",
            )
        })
}

/// An agent's table: the highest generation seen per saga.
#[derive(Debug, Default)]
pub struct Fences {
    seen: Mutex<HashMap<Uuid, (i64, Instant)>>,
}

/// Entries kept before the oldest are dropped; a saga not heard of for
/// [`FORGET_AFTER`] has ended or is owned by a replica that has called
/// since (each call refreshes its entry).
const CAPACITY: usize = 65_536;
const FORGET_AFTER: Duration = Duration::from_secs(3600);

impl Fences {
    /// Admits `fence` (and remembers it) unless a higher generation of its
    /// saga was seen: FAILED_PRECONDITION STALE_OWNER.
    pub fn admit(&self, fence: Fence) -> Result<(), Status> {
        let now = Instant::now();
        let mut seen = self.seen.lock().expect("poisoned");
        if let Some((highest, _)) = seen.get(&fence.saga) {
            if fence.generation < *highest {
                return Err(stale(fence, *highest));
            }
        }
        if seen.len() >= CAPACITY && !seen.contains_key(&fence.saga) {
            seen.retain(|_, (_, at)| now.duration_since(*at) < FORGET_AFTER);
            if seen.len() >= CAPACITY {
                let mut ages: Vec<Instant> = seen.values().map(|(_, at)| *at).collect();
                ages.sort_unstable();
                let cut = ages[ages.len() / 2];
                seen.retain(|_, (_, at)| *at > cut);
            }
        }
        seen.insert(fence.saga, (fence.generation, now));
        Ok(())
    }
}

/// FAILED_PRECONDITION STALE_OWNER: the caller's generation of the saga is
/// lower than one already seen.
pub fn stale(fence: Fence, highest: i64) -> Status {
    status::failed_precondition(
        "STALE_OWNER",
        &format!("saga/{}", fence.saga),
        format!(
            "saga {} is owned by another coordinator now (generation {} was seen; this call has {})",
            fence.saga, highest, fence.generation
        ),
    )
}

/// True for a STALE_OWNER refusal, from the database or an agent.
pub fn is_stale_owner(s: &Status) -> bool {
    use tonic_types::StatusExt;
    s.code() == tonic::Code::FailedPrecondition
        && s.get_error_details()
            .precondition_failure()
            .is_some_and(|p| p.violations.iter().any(|v| v.r#type == "STALE_OWNER"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fence(saga: Uuid, generation: i64) -> Fence {
        Fence { saga, generation }
    }

    #[test]
    fn a_lower_generation_is_refused_after_a_higher_one() {
        let t = Fences::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        t.admit(fence(a, 1)).unwrap();
        t.admit(fence(a, 1)).unwrap();
        t.admit(fence(b, 7)).unwrap();
        t.admit(fence(a, 2)).unwrap();
        let refused = t.admit(fence(a, 1)).unwrap_err();
        assert!(is_stale_owner(&refused), "{refused:?}");
        assert!(
            refused.message().contains("generation 2"),
            "{}",
            refused.message()
        );
        t.admit(fence(a, 2)).unwrap();
        t.admit(fence(a, 3)).unwrap();
        // Another saga's generations are its own.
        t.admit(fence(b, 7)).unwrap();
        t.admit(fence(Uuid::new_v4(), 1)).unwrap();
    }

    #[test]
    fn headers_round_trip_and_bad_ones_name_the_field() {
        use tonic::service::Interceptor;
        let saga = Uuid::new_v4();
        let outside = Stamp::default().call(Request::new(())).unwrap();
        assert!(from_headers(&outside.metadata().clone().into_headers())
            .unwrap()
            .is_none());
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let stamped = rt.block_on(scope(fence(saga, 4), async {
            Stamp::default().call(Request::new(())).unwrap()
        }));
        let got = from_headers(&stamped.metadata().clone().into_headers()).unwrap();
        assert_eq!(got, Some(fence(saga, 4)));
        assert_eq!(writer_from(stamped.metadata()).unwrap(), None);

        // The domain-writer generation, on its own or beside the fence.
        let writer = Stamp::writer(9).call(Request::new(())).unwrap();
        assert_eq!(writer_from(writer.metadata()).unwrap(), Some(9));
        for bad in ["-1", "x", "99999999999999999999"] {
            let mut r = Request::new(());
            r.metadata_mut().insert(WRITER_HEADER, bad.parse().unwrap());
            let s = writer_from(r.metadata()).unwrap_err();
            assert_eq!(s.code(), tonic::Code::InvalidArgument, "{bad}");
            use tonic_types::StatusExt;
            assert_eq!(
                s.get_error_details().bad_request().unwrap().field_violations[0].field,
                WRITER_HEADER
            );
        }

        let field = |pairs: &[(&'static str, &'static str)]| {
            let mut h = http::HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, http::HeaderValue::from_static(v));
            }
            let s = from_headers(&h).unwrap_err();
            assert_eq!(s.code(), tonic::Code::InvalidArgument);
            use tonic_types::StatusExt;
            s.get_error_details().bad_request().unwrap().field_violations[0]
                .field
                .clone()
        };
        assert_eq!(
            field(&[(SAGA_HEADER, "nope"), (GENERATION_HEADER, "1")]),
            SAGA_HEADER
        );
        assert_eq!(
            field(&[
                (SAGA_HEADER, "6b9f7f4e-8f0a-4d39-9d43-1d7f4f1e0b8a"),
                (GENERATION_HEADER, "-1")
            ]),
            GENERATION_HEADER
        );
        assert_eq!(
            field(&[
                (SAGA_HEADER, "6b9f7f4e-8f0a-4d39-9d43-1d7f4f1e0b8a"),
                (GENERATION_HEADER, "x")
            ]),
            GENERATION_HEADER
        );
        assert_eq!(
            field(&[(SAGA_HEADER, "6b9f7f4e-8f0a-4d39-9d43-1d7f4f1e0b8a")]),
            GENERATION_HEADER
        );
        assert_eq!(field(&[(GENERATION_HEADER, "3")]), SAGA_HEADER);
    }
}
