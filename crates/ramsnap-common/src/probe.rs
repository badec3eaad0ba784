//! Plain-HTTP probes for Kubernetes: `GET /livez` (the process answers)
//! and `GET /readyz` (what the service's own check says); and `GET /metrics`
//! for Prometheus (see [`crate::metrics`]). The gRPC port
//! speaks only mutual TLS, which the kubelet's probes cannot; this port
//! tells nothing but ready or not, and why, so it needs no TLS.
//!
//! A deliberately small HTTP/1.1 responder: one request per connection,
//! the request line read within [`READ_TIMEOUT`] and at most
//! [`MAX_REQUEST`] bytes, anything but those two GETs answered 404 (or
//! 400).
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The service's readiness: Ok(what holds) or Err(why not).
pub type ReadyCheck = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

const READ_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_REQUEST: usize = 4096;

/// Binds `addr` (when given) and serves the probes there until `stop`,
/// ready whenever the process serves (an agent has no lease to hold).
pub async fn serve_agent(addr: Option<std::net::SocketAddr>, stop: CancellationToken) -> anyhow::Result<()> {
    let Some(addr) = addr else {
        return Ok(());
    };
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for probes and metrics on {addr}: {e}"))?;
    tracing::info!(addr = %listener.local_addr()?, "serving /livez, /readyz and /metrics");
    tokio::spawn(serve(listener, Arc::new(|| Ok("serving".into())), stop));
    Ok(())
}

/// Serves the probes on `listener` until `stop`.
pub async fn serve(listener: TcpListener, ready: ReadyCheck, stop: CancellationToken) {
    loop {
        let conn = tokio::select! {
            _ = stop.cancelled() => return,
            c = listener.accept() => c,
        };
        match conn {
            Ok((stream, _)) => {
                let ready = ready.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(READ_TIMEOUT, answer(stream, &ready)).await;
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "probe listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(mut stream: TcpStream, ready: &ReadyCheck) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let (code, body) = respond(&buf, ready);
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Service Unavailable",
    };
    let response = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// The status code and body for a raw request.
fn respond(request: &[u8], ready: &ReadyCheck) -> (u16, String) {
    let line = request
        .split(|b| *b == b'\r' || *b == b'\n')
        .next()
        .unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return (400, "bad request\n".into());
    };
    let path = target.split('?').next().unwrap_or_default();
    match (method, path) {
        ("GET", "/livez") => (200, "alive\n".into()),
        // Prometheus's text format; counts and durations only, no secret.
        ("GET", "/metrics") => (200, crate::metrics::render()),
        ("GET", "/readyz") => match ready() {
            Ok(what) => (200, format!("ready: {what}\n")),
            Err(why) => (503, format!("not ready: {why}\n")),
        },
        _ => (404, "not found: GET /livez, /readyz or /metrics\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    async fn get(addr: std::net::SocketAddr, raw: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(raw.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn readiness_follows_the_check_and_nothing_else_is_served() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let flag = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        let check: ReadyCheck = Arc::new(move || {
            if f.load(Ordering::SeqCst) {
                Ok("lease held".into())
            } else {
                Err("no lease".into())
            }
        });
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, check, stop.clone()));

        let r = get(addr, "GET /readyz HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 503 "), "{r}");
        assert!(r.ends_with("not ready: no lease\n"), "{r}");
        flag.store(true, Ordering::SeqCst);
        let r = get(addr, "GET /readyz?verbose HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200 OK"), "{r}");
        assert!(r.ends_with("ready: lease held\n"), "{r}");
        assert!(get(addr, "GET /livez HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 200 "));
        assert!(get(addr, "POST /readyz HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 404 "));
        assert!(get(addr, "GET /../etc/passwd HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 404 "));
        assert!(get(addr, "garbage\r\n\r\n").await.starts_with("HTTP/1.1 400 "));
        // A request that never ends is cut off; the server goes on.
        let huge = "GET /readyz HTTP/1.1\r\nx: ".to_string() + &"a".repeat(100_000);
        let mut s = TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(huge.as_bytes()).await;
        assert!(get(addr, "GET /livez HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 200 "));
        stop.cancel();
    }
}
