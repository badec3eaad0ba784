//! SnapshotService: the coordinator.

pub mod db;
