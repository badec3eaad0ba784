//! Builders for `tonic::Status` with google.rpc error details, so that a
//! client in any language learns which field was wrong, which precondition
//! failed, or which resource was missing.
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// INVALID_ARGUMENT with a BadRequest field violation.
pub fn invalid_argument(field: &str, description: impl Into<String>) -> Status {
    let description = description.into();
    Status::with_error_details(
        Code::InvalidArgument,
        format!("{field}: {description}"),
        ErrorDetails::with_bad_request_violation(field, description),
    )
}

/// FAILED_PRECONDITION with a PreconditionFailure violation.
/// `kind` is a short upper-case category (e.g. `VOLUME_IN_USE`), `subject`
/// names what it is about.
pub fn failed_precondition(kind: &str, subject: &str, description: impl Into<String>) -> Status {
    let description = description.into();
    Status::with_error_details(
        Code::FailedPrecondition,
        description.clone(),
        ErrorDetails::with_precondition_failure_violation(kind, subject, description),
    )
}

/// NOT_FOUND with ResourceInfo naming the missing resource.
pub fn not_found(resource_type: &str, resource_name: &str) -> Status {
    Status::with_error_details(
        Code::NotFound,
        format!("{resource_type} {resource_name} not found"),
        ErrorDetails::with_resource_info(resource_type, resource_name, "", "not found"),
    )
}

/// ALREADY_EXISTS with ResourceInfo.
pub fn already_exists(resource_type: &str, resource_name: &str, description: impl Into<String>) -> Status {
    let description = description.into();
    Status::with_error_details(
        Code::AlreadyExists,
        format!("{resource_type} {resource_name}: {description}"),
        ErrorDetails::with_resource_info(resource_type, resource_name, "", description),
    )
}

/// RESOURCE_EXHAUSTED with a QuotaFailure violation naming the subject.
pub fn resource_exhausted(subject: &str, description: impl Into<String>) -> Status {
    let description = description.into();
    Status::with_error_details(
        Code::ResourceExhausted,
        description.clone(),
        ErrorDetails::with_quota_failure_violation(subject, description),
    )
}

/// INTERNAL: something outside the caller's control failed (a tool, the
/// disk). The message keeps the cause for operators.
pub fn internal(description: impl std::fmt::Display) -> Status {
    Status::internal(description.to_string())
}

/// The canonical upper-case name of a gRPC code (`PERMISSION_DENIED`), as
/// every gRPC tool prints it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_round_trip() {
        let st = invalid_argument("capacity_bytes", "must be greater than 0");
        let details = st.get_error_details();
        let br = details.bad_request().expect("bad request details");
        assert_eq!(br.field_violations[0].field, "capacity_bytes");
        let st = not_found("volume", "abc");
        assert_eq!(st.code(), Code::NotFound);
        assert_eq!(
            st.get_error_details().resource_info().unwrap().resource_name,
            "abc"
        );
    }
}
