//! Waiting for a gRPC server to answer its health service.
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Returns once the server at `addr` (a wildcard address means loopback)
/// reports SERVING for `service` ("" for the server as a whole), or fails
/// after `timeout`.
pub async fn wait_serving(mut addr: SocketAddr, service: &str, timeout: Duration) -> anyhow::Result<()> {
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        match check(addr, service).await {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("{addr} did not report SERVING within {timeout:?}: {last}")
}

async fn check(addr: SocketAddr, service: &str) -> Result<(), String> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let r = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .map_err(|s| s.message().to_string())?;
    match r.into_inner().status() {
        ServingStatus::Serving => Ok(()),
        s => Err(format!("status {s:?}")),
    }
}

/// As [`wait_serving`], over `transport` (TLS with the caller's certificate,
/// or plain text): for servers started with TLS.
pub async fn wait_serving_over(
    transport: &crate::tls::ClientTransport,
    mut addr: SocketAddr,
    service: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let endpoint = transport
        .endpoint(&addr.to_string())?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(2));
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        let answer = match transport.connect(&endpoint).await {
            Ok(channel) => HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: service.to_string(),
                })
                .await
                .map_err(|s| format!("{:?}: {}", s.code(), s.message())),
            Err(e) => Err(e.to_string()),
        };
        match answer.map(|r| r.into_inner().status()) {
            Ok(ServingStatus::Serving) => return Ok(()),
            Ok(s) => last = format!("status {s:?}"),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("{addr} did not report SERVING within {timeout:?}: {last}")
}
