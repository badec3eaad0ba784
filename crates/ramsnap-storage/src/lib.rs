//! StorageService: memory and disk volumes on FILE (NFS) and BLOCK (LVM)
//! storage domains.
//!
//! Layers, outermost first:
//! - [`service`]: the tonic handler; converts requests into domain types
//!   (rejecting bad input there) and results back.
//! - [`storage`]: the domain layer: the attached domains, request-id
//!   idempotency, per-domain serialization of metadata changes, copies.
//! - [`backend`]: one [`backend::Backend`] per domain type, synchronous,
//!   run on the blocking pool: [`file`] and [`block`] (through [`lvm`]).
//! - [`descriptor`]: VM descriptors (OVF documents) on EXPORT domains.
//! - [`copy`]: moving volume data, natively for RAW and via qemu-img otherwise.
//! - [`holds`]: which volumes are in use on this host (prepared, or under a
//!   copy), so that none is deleted or merged under its user.
//! - [`limits`]: every bound on caller input, in one place.

pub mod args;
pub mod backend;
pub mod block;
pub mod copy;
pub mod descriptor;
pub mod error;
pub mod file;
pub mod holds;
pub mod limits;
pub mod lvm;
pub mod model;
pub mod ovirt;
pub mod qcow2;
pub mod service;
pub mod storage;
pub mod tool;

pub use error::StorageError;
pub use storage::{Config, Storage};
