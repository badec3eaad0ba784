//! One error type for the storage domain layer, and the single place that
//! decides which gRPC status each error becomes.
use crate::model::VolumeRef;
use ramsnap_common::status;
use tonic::Status;
use uuid::Uuid;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("storage domain {0} not found")]
    DomainNotFound(Uuid),
    #[error("volume {0} not found")]
    VolumeNotFound(VolumeRef),
    #[error("no descriptor of VM {vm} on storage domain {domain}")]
    VmDescriptorNotFound { domain: Uuid, vm: Uuid },
    #[error("storage domain {domain}: {requested} bytes requested, {free} free")]
    NoSpace { domain: Uuid, requested: u64, free: u64 },
    #[error("{resource} {id} already exists: {reason}")]
    AlreadyExists {
        resource: &'static str,
        id: String,
        reason: String,
    },
    /// A precondition on the current state of the system failed.
    #[error("{reason}")]
    Precondition {
        kind: &'static str,
        subject: String,
        reason: String,
    },
    /// The caller may not use this resource: a device the service's
    /// configuration does not allow. `reason_code` is the ErrorInfo reason.
    #[error("{reason}")]
    PermissionDenied {
        resource: &'static str,
        name: String,
        reason_code: &'static str,
        reason: String,
    },
    /// A metadata change made under a domain-writer generation lower than
    /// the one recorded on the domain (see `Storage::admit_writer`).
    #[error(
        "this host was the metadata writer of storage domain {domain} under generation {generation}; \
         generation {recorded} has replaced it"
    )]
    StaleWriter {
        domain: Uuid,
        generation: i64,
        recorded: i64,
    },
    #[error("{cmd} failed: {stderr}")]
    Tool { cmd: String, stderr: String },
    #[error("on-domain metadata of {subject} is unreadable: {reason}")]
    CorruptMetadata { subject: String, reason: String },
    #[error("I/O error: {0}")]
    Io(std::sync::Arc<std::io::Error>),
}

impl From<std::io::Error> for StorageError {
    fn from(e: std::io::Error) -> Self {
        StorageError::Io(std::sync::Arc::new(e))
    }
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

impl StorageError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        StorageError::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    pub fn precondition(kind: &'static str, subject: impl ToString, reason: impl Into<String>) -> Self {
        StorageError::Precondition {
            kind,
            subject: subject.to_string(),
            reason: reason.into(),
        }
    }
}

impl From<StorageError> for Status {
    fn from(err: StorageError) -> Status {
        match err {
            StorageError::InvalidArgument { field, reason } => status::invalid_argument(field, reason),
            StorageError::DomainNotFound(id) => status::not_found("storage_domain", &id.to_string()),
            StorageError::VolumeNotFound(r) => status::not_found("volume", &r.to_string()),
            StorageError::VmDescriptorNotFound { domain, vm } => {
                status::not_found("vm_descriptor", &format!("{domain}/{vm}"))
            }
            e @ StorageError::NoSpace { domain, .. } => {
                status::resource_exhausted(&format!("storage_domain/{domain}"), e.to_string())
            }
            StorageError::AlreadyExists { resource, id, reason } => {
                status::already_exists(resource, &id, reason)
            }
            StorageError::Precondition {
                kind,
                subject,
                reason,
            } => status::failed_precondition(kind, &subject, reason),
            e @ StorageError::StaleWriter { domain, recorded, .. } => {
                // The recorded generation, for a coordinator whose own is
                // behind it (set outside the coordinator) to go past.
                use tonic_types::{ErrorDetails, StatusExt};
                let mut details = ErrorDetails::with_precondition_failure_violation(
                    "STALE_WRITER",
                    format!("storage_domain/{domain}"),
                    e.to_string(),
                );
                details.set_error_info(
                    "STALE_WRITER",
                    "ramsnap.storage",
                    std::collections::HashMap::from([(
                        "recorded_generation".to_string(),
                        recorded.to_string(),
                    )]),
                );
                Status::with_error_details(tonic::Code::FailedPrecondition, e.to_string(), details)
            }
            StorageError::PermissionDenied {
                resource,
                name,
                reason_code,
                reason,
            } => {
                use tonic_types::{ErrorDetails, StatusExt};
                let mut details = ErrorDetails::with_error_info(
                    reason_code,
                    "ramsnap.storage",
                    std::collections::HashMap::from([(resource.to_string(), name.clone())]),
                );
                details.set_resource_info(resource, name, "", reason.clone());
                Status::with_error_details(tonic::Code::PermissionDenied, reason, details)
            }
            e @ (StorageError::Tool { .. } | StorageError::CorruptMetadata { .. } | StorageError::Io(_)) => {
                tracing::error!(error = %e, "storage operation failed");
                status::internal(e)
            }
        }
    }
}
