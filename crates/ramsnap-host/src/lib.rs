//! HostService: one per hypervisor host. Runs VMs through libvirt (booting
//! them, or restoring their memory), stops them, reports their status, and
//! takes snapshots with or without memory, as oVirt 3.3's RAM snapshots do.
//!
//! Layers, outermost first:
//! - [`service`]: the tonic handler; converts requests into [`model`] types
//!   (rejecting bad input there) and results back.
//! - [`host`]: the domain layer: the VM table, run/restore, stop, status,
//!   snapshot jobs, the monitor that notices VMs going away.
//! - [`libvirt`]: every libvirt call, on the blocking pool with a timeout;
//!   [`volumes`]: the host's StorageService over gRPC (ids in, paths out).
//! - [`xml`]: domain and snapshot XML, the restore rewrite;
//!   [`metadata`]: the memory metadata volume's format and the dump checksum.

pub mod args;
pub mod capabilities;
pub mod error;
pub mod failpoint;
pub mod host;
pub mod libvirt;
pub mod metadata;
pub mod model;
pub mod ovirt;
pub mod service;
pub mod volumes;
pub mod xml;

pub use error::HostError;
pub use host::{Config, Host, HostInfo};
