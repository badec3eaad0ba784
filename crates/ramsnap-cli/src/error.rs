//! Prints a failed command for an operator: the gRPC code and message, then
//! one line per google.rpc detail (which field was wrong, which precondition
//! failed, which resource is missing), since those say what to fix.
use crate::output::printable;
use std::fmt;
use tonic::{Code, Status};
use tonic_types::StatusExt;
use uuid::Uuid;

/// The request id a failed idempotent call was sent with, kept as the
/// error's context so that the operator can retry it safely.
#[derive(Debug, Clone, Copy)]
pub struct RequestId(pub Uuid);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request {}", self.0)
    }
}

/// What to do after a failed call, printed below its details: kept as the
/// error's context (e.g. how to follow an operation whose watch broke).
#[derive(Debug, Clone)]
pub struct Hint(pub String);

impl fmt::Display for Hint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A failed call, with a hint for the operator.
pub fn with_hint(status: Status, hint: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(status).context(Hint(hint.into()))
}

/// A failed call made with `request_id`.
pub fn with_request_id(status: Status, request_id: Uuid) -> anyhow::Error {
    anyhow::Error::new(status).context(RequestId(request_id))
}

/// Prints `err` on stderr. A gRPC status anywhere in the chain is printed
/// with its details; anything else as its context chain.
pub fn report(err: &anyhow::Error) {
    match err.chain().find_map(|e| e.downcast_ref::<Status>()) {
        Some(status) => {
            for line in status_lines(status) {
                eprintln!("{}", printable(&line));
            }
            if let Some(RequestId(id)) = err.downcast_ref::<RequestId>() {
                if outcome_unknown(status.code()) {
                    eprintln!("  the call may or may not have taken effect: retry it with --request-id {id}");
                }
            }
            if let Some(Hint(hint)) = err.downcast_ref::<Hint>() {
                eprintln!("  {}", printable(hint));
            }
        }
        // An operation's error, a stream that broke: text from a server too.
        None => eprintln!("error: {}", printable(&format!("{err:#}"))),
    }
}

/// Codes after which the caller cannot tell whether the service acted.
fn outcome_unknown(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Unknown
            | Code::Aborted
            | Code::Internal
    )
}

/// `error: <CODE>: <message>` and the detail lines, indented by two spaces.
pub fn status_lines(status: &Status) -> Vec<String> {
    let mut lines = vec![if status.message().is_empty() {
        format!("error: {}", code_name(status.code()))
    } else {
        format!("error: {}: {}", code_name(status.code()), status.message())
    }];
    let details = status.get_error_details();
    if let Some(bad) = details.bad_request() {
        for v in &bad.field_violations {
            lines.push(format!("  field {}: {}", v.field, v.description));
        }
    }
    if let Some(pre) = details.precondition_failure() {
        for v in &pre.violations {
            lines.push(format!(
                "  precondition {} on {}: {}",
                v.r#type, v.subject, v.description
            ));
        }
    }
    if let Some(res) = details.resource_info() {
        let mut line = format!("  resource {} {}", res.resource_type, res.resource_name);
        if !res.owner.is_empty() {
            line.push_str(&format!(" (owner {})", res.owner));
        }
        if !res.description.is_empty() {
            line.push(' ');
            line.push_str(&res.description);
        }
        lines.push(line);
    }
    if let Some(quota) = details.quota_failure() {
        for v in &quota.violations {
            lines.push(format!("  quota {}: {}", v.subject, v.description));
        }
    }
    if let Some(delay) = details.retry_info().and_then(|r| r.retry_delay) {
        lines.push(format!("  retry after {:.1}s", delay.as_secs_f64()));
    }
    if let Some(info) = details.error_info() {
        lines.push(format!("  reason {} ({})", info.reason, info.domain));
    }
    if let Some(request) = details.request_info() {
        lines.push(format!("  request {}", request.request_id));
    }
    if let Some(help) = details.help() {
        for link in &help.links {
            lines.push(format!("  see {}: {}", link.description, link.url));
        }
    }
    if let Some(localized) = details.localized_message() {
        lines.push(format!("  {}", localized.message));
    }
    if let Some(debug) = details.debug_info() {
        if !debug.detail.is_empty() {
            lines.push(format!("  debug: {}", debug.detail));
        }
    }
    lines
}

pub use ramsnap_common::status::code_name;

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::ErrorDetails;

    #[test]
    fn field_violations() {
        let st = Status::with_error_details(
            Code::InvalidArgument,
            "capacity_bytes: must be greater than 0",
            ErrorDetails::with_bad_request_violation("capacity_bytes", "must be greater than 0"),
        );
        assert_eq!(
            status_lines(&st),
            [
                "error: INVALID_ARGUMENT: capacity_bytes: must be greater than 0",
                "  field capacity_bytes: must be greater than 0",
            ]
        );
    }

    #[test]
    fn precondition_and_resource() {
        let st = Status::with_error_details(
            Code::FailedPrecondition,
            "volume has children",
            ErrorDetails::with_precondition_failure_violation("VOLUME_HAS_CHILDREN", "d/i/v", "in use"),
        );
        assert_eq!(
            status_lines(&st)[1],
            "  precondition VOLUME_HAS_CHILDREN on d/i/v: in use"
        );
        let st = Status::with_error_details(
            Code::NotFound,
            "volume d/i/v not found",
            ErrorDetails::with_resource_info("volume", "d/i/v", "", "not found"),
        );
        assert_eq!(
            status_lines(&st),
            [
                "error: NOT_FOUND: volume d/i/v not found",
                "  resource volume d/i/v not found"
            ]
        );
    }

    #[test]
    fn plain_status() {
        assert_eq!(status_lines(&Status::unavailable("")), ["error: UNAVAILABLE"]);
        assert_eq!(
            status_lines(&Status::internal("qemu-img failed")),
            ["error: INTERNAL: qemu-img failed"]
        );
    }

    #[test]
    fn status_and_request_id_found_through_context() {
        let id = Uuid::new_v4();
        let err = with_request_id(Status::unavailable("down"), id);
        assert!(err.chain().any(|e| e.downcast_ref::<Status>().is_some()));
        assert_eq!(err.downcast_ref::<RequestId>().unwrap().0, id);
        assert!(outcome_unknown(Code::Unavailable));
        let err = with_hint(Status::unavailable("down"), "follow it");
        assert_eq!(err.downcast_ref::<Hint>().unwrap().0, "follow it");
        assert!(err.chain().any(|e| e.downcast_ref::<Status>().is_some()));
        assert!(!outcome_unknown(Code::InvalidArgument));
    }
}
