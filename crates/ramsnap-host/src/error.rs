//! One error enum per operation area, combined into [`HostError`], and the
//! single place that decides which gRPC status each becomes.
use crate::model::{VmStatus, VolumeRef};
use ramsnap_common::status;
use std::sync::Arc;
use std::time::Duration;
use tonic::{Code, Status};
use uuid::Uuid;

/// How a libvirt failure is classified; decides the gRPC code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LibvirtErrorKind {
    /// No such domain (VIR_ERR_NO_DOMAIN).
    NoDomain,
    /// The domain is not in a state that allows the operation
    /// (VIR_ERR_OPERATION_INVALID: not running, already active, no job).
    OperationInvalid,
    /// A block job is not ready to pivot yet (VIR_ERR_BLOCK_COPY_ACTIVE:
    /// libvirt 8 and later say so where older ones said OPERATION_INVALID).
    BlockJobNotReady,
    /// libvirt timed out (state-change lock, agent).
    Timeout,
    /// The job was aborted (VIR_ERR_OPERATION_ABORTED).
    Aborted,
    /// The driver cannot do this (test driver, old libvirt).
    Unsupported,
    /// libvirtd is unreachable or the connection broke.
    Unavailable,
    /// A domain with that name or UUID exists.
    AlreadyExists,
    Other,
}

/// A failed libvirt call: which call, libvirt's code and message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("libvirt {op}: {message}")]
pub struct LibvirtError {
    pub op: &'static str,
    pub kind: LibvirtErrorKind,
    /// libvirt's virErrorNumber.
    pub code: i32,
    pub message: String,
}

impl LibvirtError {
    pub fn from_virt(op: &'static str, e: &virt::error::Error) -> LibvirtError {
        use virt::error::ErrorNumber as N;
        let kind = match e.code() {
            virt::enumutil::Enum::Known(n) => match n {
                N::NoDomain => LibvirtErrorKind::NoDomain,
                N::OperationInvalid => LibvirtErrorKind::OperationInvalid,
                N::BlockCopyActive => LibvirtErrorKind::BlockJobNotReady,
                N::OperationTimeout | N::AgentUnresponsive | N::AgentCommandTimeout => {
                    LibvirtErrorKind::Timeout
                }
                N::OperationAborted => LibvirtErrorKind::Aborted,
                N::NoSupport | N::ArgumentUnsupported | N::OperationUnsupported | N::ConfigUnsupported => {
                    LibvirtErrorKind::Unsupported
                }
                N::NoConnect | N::InvalidConn | N::Rpc => LibvirtErrorKind::Unavailable,
                N::DomExist => LibvirtErrorKind::AlreadyExists,
                _ => LibvirtErrorKind::Other,
            },
            virt::enumutil::Enum::Unknown(_) => LibvirtErrorKind::Other,
        };
        LibvirtError {
            op,
            kind,
            code: e.code().to_raw() as i32,
            message: e.message().to_string(),
        }
    }
}

/// A StorageService call failed; its status (code, details) is passed on.
#[derive(Debug, Clone, thiserror::Error)]
#[error("storage {op}: {message}")]
pub struct StorageCallError {
    pub op: &'static str,
    pub code: Code,
    pub message: String,
    pub details: tonic::codegen::Bytes,
}

impl StorageCallError {
    pub fn from_status(op: &'static str, s: &Status) -> StorageCallError {
        StorageCallError {
            op,
            code: s.code(),
            message: s.message().to_string(),
            details: tonic::codegen::Bytes::copy_from_slice(s.details()),
        }
    }
}

/// Starting a VM (boot or restore).
#[derive(Debug, Clone, thiserror::Error)]
pub enum RunError {
    #[error("vm {0} is already running on this host")]
    AlreadyRunning(Uuid),
    #[error("boot image {0:?} is not in the host's boot directory")]
    BootImageMissing(String),
    #[error("volume {volume} has purpose {actual}, expected {expected}")]
    WrongPurpose {
        volume: VolumeRef,
        expected: &'static str,
        actual: String,
    },
}

/// Verifying a memory volume before a restore.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RestoreError {
    #[error("memory metadata on {volume} is unreadable: {reason}")]
    MetadataInvalid { volume: VolumeRef, reason: String },
    #[error("memory metadata on {volume} has version {version}; this host reads up to {supported}")]
    MetadataVersion {
        volume: VolumeRef,
        version: u32,
        supported: u32,
    },
    #[error("the memory belongs to vm {recorded}, not to vm {requested}")]
    WrongVm { recorded: Uuid, requested: Uuid },
    #[error("the VM's disks do not match the memory snapshot: {reason}")]
    DisksMismatch { reason: String },
    #[error("memory dump {volume} is corrupt: checksum {actual}, recorded {expected}")]
    DumpCorrupt {
        volume: VolumeRef,
        expected: String,
        actual: String,
    },
    #[error("memory dump {volume} cannot be given to another VM: {reason}")]
    NotGivable { volume: VolumeRef, reason: String },
    /// Not a fault of the memory: this host cannot run the saved guest.
    #[error("this host cannot take the saved guest: {}", .gaps.join("; "))]
    HostCannotTake { gaps: Vec<String> },
    /// An oVirt memory whose metadata is not what VDSM writes.
    #[error("the oVirt memory on {volume} is refused: {reason}")]
    OvirtMemoryRefused { volume: VolumeRef, reason: String },
}

/// Taking (or cancelling) a snapshot.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SnapshotError {
    #[error("vm {0} is not running")]
    VmNotRunning(Uuid),
    #[error("vm {0} is busy with another operation")]
    VmBusy(Uuid),
    #[error("the snapshot's disks do not match the VM's: {0}")]
    DisksMismatch(String),
    #[error("overlay {overlay} is not a COW child of {current}")]
    OverlayNotChild { overlay: VolumeRef, current: VolumeRef },
    #[error("the memory dump needs more than the {capacity} bytes of volume {volume}")]
    DumpTooLarge { volume: VolumeRef, capacity: u64 },
    #[error("job {0} was used for another snapshot")]
    JobConflict(Uuid),
    /// Says how it was undone: before the dump, the dump aborted, or the
    /// disks merged back after libvirt had finished.
    #[error("the snapshot was cancelled: {0}")]
    Cancelled(&'static str),
    #[error("the snapshot's metadata ({size} bytes) does not fit the {capacity}-byte metadata volume")]
    MetadataTooLarge { size: usize, capacity: u64 },
}

/// Forgetting a VM (ForgetVm).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ForgetError {
    #[error("vm {vm} is not down on this host ({status:?}); stop it first")]
    Running { vm: Uuid, status: VmStatus },
    #[error("vm {0} has an operation in progress on this host")]
    Busy(Uuid),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum HostError {
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error("vm {0} not found")]
    VmNotFound(Uuid),
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error(transparent)]
    Storage(#[from] StorageCallError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Forget(#[from] ForgetError),
    /// CommitVolume's `top` and `base` are not two adjacent volumes of
    /// one of the VM's running disks, top right above base.
    #[error("{0}")]
    NotInChain(String),
    #[error("{what} did not finish within {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: Arc<std::io::Error>,
    },
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = HostError> = std::result::Result<T, E>;

impl HostError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> HostError {
        HostError::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn io(what: impl Into<String>, e: std::io::Error) -> HostError {
        HostError::Io {
            what: what.into(),
            source: Arc::new(e),
        }
    }

    /// True for libvirt's "no such domain".
    pub fn is_no_domain(&self) -> bool {
        matches!(self, HostError::Libvirt(e) if e.kind == LibvirtErrorKind::NoDomain)
    }
}

/// INTERNAL without the detail, which is logged with a reference the
/// message gives: libvirt's and QEMU's messages, I/O errors and the storage
/// agent's internal errors name host paths and carry command lines, which
/// are not the caller's business (and on hostile input would be a leak).
fn internal_logged(what: &str, detail: &dyn std::fmt::Display) -> Status {
    let reference = Uuid::new_v4().simple().to_string();
    let reference = &reference[..12];
    tracing::error!(error_ref = reference, error = %detail, "{what} failed");
    Status::internal(format!(
        "{what} failed on the host; the host agent's log has the details under error_ref={reference}"
    ))
}

impl From<HostError> for Status {
    fn from(err: HostError) -> Status {
        match err {
            HostError::InvalidArgument { field, reason } => status::invalid_argument(&field, reason),
            HostError::VmNotFound(id) => status::not_found("vm", &id.to_string()),
            HostError::Libvirt(e) => libvirt_status(e),
            HostError::Storage(e) => match e.code {
                Code::Internal | Code::Unknown | Code::DataLoss => {
                    internal_logged(&format!("storage {}", e.op), &e)
                }
                code => {
                    let message = e.to_string();
                    Status::with_details(code, message, e.details)
                }
            },
            HostError::Run(e) => match e {
                RunError::AlreadyRunning(id) => {
                    status::already_exists("vm", &id.to_string(), "is already running on this host")
                }
                e @ RunError::BootImageMissing(_) => {
                    status::failed_precondition("BOOT_IMAGE_MISSING", "boot_dir", e.to_string())
                }
                ref w @ RunError::WrongPurpose { volume, .. } => {
                    status::failed_precondition("VOLUME_PURPOSE", &volume.to_string(), w.to_string())
                }
            },
            HostError::Restore(e) => {
                let (kind, subject) = match &e {
                    RestoreError::MetadataInvalid { volume, .. } => {
                        ("MEMORY_METADATA_INVALID", volume.to_string())
                    }
                    RestoreError::MetadataVersion { volume, .. } => {
                        ("MEMORY_METADATA_VERSION", volume.to_string())
                    }
                    RestoreError::WrongVm { recorded, .. } => ("MEMORY_VM_MISMATCH", recorded.to_string()),
                    RestoreError::DisksMismatch { .. } => ("MEMORY_DISKS_MISMATCH", "spec.disks".to_string()),
                    RestoreError::DumpCorrupt { volume, .. } => ("MEMORY_DUMP_CORRUPT", volume.to_string()),
                    RestoreError::NotGivable { volume, .. } => ("MEMORY_NOT_GIVABLE", volume.to_string()),
                    RestoreError::HostCannotTake { .. } => ("HOST_CANNOT_TAKE_GUEST", "host".to_string()),
                    RestoreError::OvirtMemoryRefused { volume, .. } => {
                        ("OVIRT_MEMORY_REFUSED", volume.to_string())
                    }
                };
                status::failed_precondition(kind, &subject, e.to_string())
            }
            HostError::Snapshot(e) => match &e {
                SnapshotError::VmNotRunning(id) => {
                    status::failed_precondition("VM_NOT_RUNNING", &id.to_string(), e.to_string())
                }
                SnapshotError::VmBusy(id) => {
                    status::failed_precondition("VM_BUSY", &id.to_string(), e.to_string())
                }
                SnapshotError::DisksMismatch(_) => {
                    status::failed_precondition("SNAPSHOT_DISKS_MISMATCH", "disks", e.to_string())
                }
                SnapshotError::OverlayNotChild { overlay, .. } => {
                    status::failed_precondition("OVERLAY_NOT_CHILD", &overlay.to_string(), e.to_string())
                }
                SnapshotError::DumpTooLarge { volume, .. } => {
                    status::resource_exhausted(&format!("volume/{volume}"), e.to_string())
                }
                SnapshotError::JobConflict(id) => {
                    status::already_exists("job", &id.to_string(), e.to_string())
                }
                SnapshotError::Cancelled(_) => Status::cancelled(e.to_string()),
                SnapshotError::MetadataTooLarge { .. } => status::internal(&e),
            },
            HostError::Forget(e) => match &e {
                ForgetError::Running { vm, .. } | ForgetError::Busy(vm) => {
                    status::failed_precondition("VM_RUNNING", &vm.to_string(), e.to_string())
                }
            },
            e @ HostError::NotInChain(_) => {
                status::failed_precondition("VOLUME_NOT_IN_CHAIN", "top", e.to_string())
            }
            e @ HostError::Timeout { .. } => Status::deadline_exceeded(e.to_string()),
            e @ HostError::Io { .. } => internal_logged("a file operation", &e),
            e @ HostError::Internal(_) => internal_logged("an internal step", &e),
        }
    }
}

fn libvirt_status(e: LibvirtError) -> Status {
    let message = e.to_string();
    match e.kind {
        LibvirtErrorKind::NoDomain => Status::not_found(message),
        LibvirtErrorKind::OperationInvalid => {
            status::failed_precondition("LIBVIRT_OPERATION_INVALID", e.op, message)
        }
        LibvirtErrorKind::BlockJobNotReady => {
            status::failed_precondition("BLOCK_JOB_NOT_READY", e.op, message)
        }
        LibvirtErrorKind::Timeout => Status::deadline_exceeded(message),
        LibvirtErrorKind::Aborted => Status::aborted(message),
        // The hypervisor cannot do it (a driver or configuration without
        // the feature): a precondition of this host, not a missing RPC.
        LibvirtErrorKind::Unsupported => status::failed_precondition("HYPERVISOR_UNSUPPORTED", e.op, message),
        LibvirtErrorKind::Unavailable => Status::unavailable(message),
        LibvirtErrorKind::AlreadyExists => Status::already_exists(message),
        LibvirtErrorKind::Other => internal_logged(&format!("libvirt {} (code {})", e.op, e.code), &message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::StatusExt;

    fn lv(kind: LibvirtErrorKind) -> HostError {
        HostError::Libvirt(LibvirtError {
            op: "destroy",
            kind,
            code: 0,
            message: "x".into(),
        })
    }

    #[test]
    fn libvirt_errors_map_to_precise_codes() {
        let code = |k| Status::from(lv(k)).code();
        assert_eq!(code(LibvirtErrorKind::NoDomain), Code::NotFound);
        assert_eq!(code(LibvirtErrorKind::OperationInvalid), Code::FailedPrecondition);
        assert_eq!(code(LibvirtErrorKind::BlockJobNotReady), Code::FailedPrecondition);
        assert_eq!(code(LibvirtErrorKind::Timeout), Code::DeadlineExceeded);
        assert_eq!(code(LibvirtErrorKind::Unsupported), Code::FailedPrecondition);
        assert_eq!(code(LibvirtErrorKind::Unavailable), Code::Unavailable);
        assert_eq!(code(LibvirtErrorKind::Other), Code::Internal);
    }

    #[test]
    fn restore_refusals_carry_their_kind() {
        let st = Status::from(HostError::Restore(RestoreError::DisksMismatch {
            reason: "disk 0".into(),
        }));
        assert_eq!(st.code(), Code::FailedPrecondition);
        let details = st.get_error_details();
        let pf = details
            .precondition_failure()
            .expect("precondition failure details");
        assert_eq!(pf.violations[0].r#type, "MEMORY_DISKS_MISMATCH");
    }

    #[test]
    fn internal_errors_keep_paths_and_command_lines_out() {
        let secret = "/var/lib/ramsnap/boot/x: qemu-system-x86_64 -drive file=/dev/loop7";
        let cases = [
            HostError::Libvirt(LibvirtError {
                op: "create",
                kind: LibvirtErrorKind::Other,
                code: 1,
                message: secret.into(),
            }),
            HostError::io(secret, std::io::Error::other("denied")),
            HostError::Internal(secret.into()),
            HostError::Storage(StorageCallError::from_status(
                "prepare",
                &Status::internal(secret),
            )),
        ];
        for e in cases {
            let st = Status::from(e.clone());
            assert_eq!(st.code(), Code::Internal, "{e:?}");
            assert!(
                !st.message().contains("/var")
                    && !st.message().contains("qemu")
                    && !st.message().contains("loop"),
                "{e:?} -> {st:?}"
            );
            assert!(st.message().contains("error_ref="), "{st:?}");
        }
        assert!(Status::from(lv(LibvirtErrorKind::Other))
            .message()
            .contains("libvirt destroy"));
    }

    #[test]
    fn forget_refusals_are_vm_running() {
        let id = Uuid::new_v4();
        for e in [
            ForgetError::Running {
                vm: id,
                status: VmStatus::Up,
            },
            ForgetError::Busy(id),
        ] {
            let st = Status::from(HostError::from(e));
            assert_eq!(st.code(), Code::FailedPrecondition);
            let pf = st.get_error_details().precondition_failure().cloned().unwrap();
            assert_eq!(pf.violations[0].r#type, "VM_RUNNING");
            assert_eq!(pf.violations[0].subject, id.to_string());
        }
    }

    #[test]
    fn storage_status_is_passed_on() {
        let original = status::not_found("volume", "abc");
        let st = Status::from(HostError::Storage(StorageCallError::from_status(
            "prepare", &original,
        )));
        assert_eq!(st.code(), Code::NotFound);
        assert_eq!(
            st.get_error_details().resource_info().unwrap().resource_name,
            "abc"
        );
    }
}
