//! Connections to the services: one channel per invocation, to the address
//! given by a global flag (or its environment variable).
use anyhow::Context;
use ramsnap_common::security::ClientSecurityArgs;
use std::time::Duration;
use tonic::transport::Channel;

/// Connects to `service` at `addr`; `how_to_set` names the flag and the
/// variable that set the address, for the error when it cannot be reached.
/// Mutual TLS with the client certificate the security flags name (by
/// default the `admin` dev certificate of `/var/lib/ramsnap/tls`), or plain
/// text with `--insecure`.
pub async fn connect(
    addr: &str,
    service: &str,
    how_to_set: &str,
    security: &ClientSecurityArgs,
) -> anyhow::Result<Channel> {
    // Bearer tokens are for scripts with their own gRPC client; the CLI
    // authenticates with its client certificate only (for now).
    anyhow::ensure!(
        security.token.is_none(),
        "--token (RAMSNAP_TOKEN) is not supported by the ramsnap CLI: it presents a client \
         certificate (--tls-dir and --as, or --tls-cert, --tls-key and --tls-ca)"
    );
    let transport = security.transport()?;
    let uri = with_scheme(addr);
    let endpoint = transport
        .endpoint(&uri)
        .with_context(|| format!("invalid {service} service address {addr:?}"))?
        .connect_timeout(Duration::from_secs(10));
    transport
        .connect(&endpoint)
        .await
        .with_context(|| format!("cannot reach the {service} service at {uri} (set {how_to_set})"))
}

/// Every page of a List call: `fetch` is called with each page token ("" for
/// the first) and returns that page's response; `next` reads its
/// next_page_token. The responses, in order.
pub async fn all_pages<R, Fut>(
    mut fetch: impl FnMut(String) -> Fut,
    next: impl Fn(&R) -> &str,
) -> Result<Vec<R>, tonic::Status>
where
    Fut: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
{
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = fetch(token).await?.into_inner();
        token = next(&page).to_string();
        pages.push(page);
        if token.is_empty() {
            return Ok(pages);
        }
    }
}

/// `host:port` is taken as `http://host:port`: with TLS on (the default)
/// the connection is TLS all the same.
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
