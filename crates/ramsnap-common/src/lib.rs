//! What every ramsnap service shares: how a server starts and stops
//! ([`server`]), telemetry ([`telemetry`]), rich gRPC error details
//! ([`status`]) and id parsing ([`ids`]); and the security machinery:
//! mutual TLS with reloadable certificates ([`tls`], [`reload`]), caller
//! identities ([`authn`]), the RPC table and roles ([`rpcs`]),
//! authorization ([`authz`]), the fencing of stale saga owners
//! ([`fence`]), the audit trail ([`audit`]), call limits
//! ([`limits`]), dev certificates ([`devcerts`]), and the flags that
//! build them for a binary ([`security`]).

pub mod audit;
pub mod authn;
pub mod authz;
pub mod checksum;
pub mod config;
pub mod devcerts;
pub mod fence;
pub mod ids;
pub mod limits;
pub mod metrics;
pub mod ovirt;
pub mod paging;
pub mod probe;
pub mod ready;
pub mod reload;
pub mod rpcs;
pub mod security;
pub mod server;
pub mod status;
pub mod telemetry;
pub mod text;
pub mod tls;
pub mod tracecontext;
