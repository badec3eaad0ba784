//! The coordinator's sagas, one module per saga (`resource_verb.rs`). Each
//! holds its serde `Params`, its nodes (forward and undo actions, stable
//! names) and its definition. Steps are "ensure" operations keyed by ids
//! derived from the saga id, so a replayed step asks for the same thing.
use crate::app::App;
use crate::saga::SagaDef;

pub mod common;
pub mod snapshot_create;

pub fn all() -> Vec<SagaDef<App>> {
    vec![snapshot_create::definition()]
}
