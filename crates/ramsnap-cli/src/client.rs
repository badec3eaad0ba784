//! Connections to the services: one channel per invocation, to the address
//! given by a global flag (or its environment variable).
use anyhow::Context;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// Connects to `service` at `addr`; `how_to_set` names the flag and the
/// variable that set the address, for the error when it cannot be reached.
pub async fn connect(addr: &str, service: &str, how_to_set: &str) -> anyhow::Result<Channel> {
    let uri = with_scheme(addr);
    let endpoint = Endpoint::from_shared(uri.clone())
        .with_context(|| format!("invalid {service} service address {addr:?}"))?
        .connect_timeout(Duration::from_secs(10));
    endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach the {service} service at {uri} (set {how_to_set})"))
}

/// `host:port` is taken as plain-text gRPC, like grpcurl's `-plaintext`.
fn with_scheme(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_default_to_plain_http() {
        assert_eq!(with_scheme("127.0.0.1:50052"), "http://127.0.0.1:50052");
        assert_eq!(with_scheme("https://storage:443"), "https://storage:443");
    }
}
