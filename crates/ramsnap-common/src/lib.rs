//! What every ramsnap service shares: how a server starts and stops
//! ([`server`]), telemetry ([`telemetry`]), rich gRPC error details
//! ([`status`]) and id parsing ([`ids`]).

pub mod ids;
pub mod ready;
pub mod server;
pub mod status;
pub mod telemetry;
