//! `server::serve` stopping, in process over real gRPC: open server streams
//! end at once, calls in flight get the grace period and no more.
use ramsnap_common::server::{self, ServiceSet};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tonic::body::Body;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A unary call (posing as StorageService.ListDomains) that answers after `delay` (or never)
/// with `reply_bytes` bytes (a google.protobuf.BytesValue).
#[derive(Clone)]
struct Sleepy {
    delay: Option<Duration>,
    reply_bytes: usize,
}

impl tonic::server::NamedService for Sleepy {
    // A name and method of the RPC table (a unary viewer call): the auth
    // layer fails closed on anything else.
    const NAME: &'static str = "ramsnap.storage.v1.StorageService";
}

struct Call(Sleepy);

impl tonic::server::UnaryService<()> for Call {
    type Response = Vec<u8>;
    type Future = BoxFuture<Result<tonic::Response<Vec<u8>>, tonic::Status>>;

    fn call(&mut self, _req: tonic::Request<()>) -> Self::Future {
        let Sleepy { delay, reply_bytes } = self.0.clone();
        Box::pin(async move {
            match delay {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
            Ok(tonic::Response::new(vec![7; reply_bytes]))
        })
    }
}

impl tower_service::Service<http::Request<Body>> for Sleepy {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let call = Call(self.clone());
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<Vec<u8>, ()>::default());
            Ok(grpc.unary(call, req).await)
        })
    }
}

async fn call_sleepy(channel: Channel) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    grpc.unary(
        tonic::Request::new(()),
        http::uri::PathAndQuery::from_static("/ramsnap.storage.v1.StorageService/ListDomains"),
        tonic_prost::ProstCodec::<(), Vec<u8>>::default(),
    )
    .await
    .map(|r| r.into_inner())
}

struct Server {
    channel: Channel,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start(delay: Option<Duration>, grace: Duration) -> Server {
    start_with(
        Sleepy {
            delay,
            reply_bytes: 0,
        },
        grace,
    )
    .await
}

async fn start_with(sleepy: Sleepy, grace: Duration) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = oneshot::channel::<()>();
    let set = ServiceSet::new("ramsnap.storage.v1.StorageService", sleepy);
    let security = server::loopback_security(listener.local_addr().unwrap()).unwrap();
    let task = tokio::spawn(server::serve_with_grace(
        listener,
        vec![set],
        async move {
            let _ = rx.await;
        },
        grace,
        security,
    ));
    let channel = tonic::transport::Endpoint::from_shared(addr)
        .unwrap()
        .connect()
        .await
        .unwrap();
    Server {
        channel,
        stop: Some(tx),
        task,
    }
}

impl Server {
    fn shutdown(&mut self) -> Instant {
        let _ = self.stop.take().unwrap().send(());
        Instant::now()
    }

    /// How long after `since` the server returned (fails past `limit`).
    async fn returned(&mut self, since: Instant, limit: Duration) -> Duration {
        match tokio::time::timeout(limit, &mut self.task).await {
            Ok(r) => {
                r.unwrap().unwrap();
                since.elapsed()
            }
            Err(_) => panic!("serve did not return within {limit:?} of the shutdown"),
        }
    }
}

/// A health Watch (a server stream that never ends by itself) sees
/// NOT_SERVING, then ends with UNAVAILABLE, at once; serve returns at once
/// although the grace period is long.
#[tokio::test]
async fn open_streams_end_at_once_and_serve_returns() {
    let mut server = start(Some(Duration::ZERO), Duration::from_secs(30)).await;
    let mut health = HealthClient::new(server.channel.clone());
    let mut watches = Vec::new();
    for service in ["", "ramsnap.storage.v1.StorageService"] {
        let mut w = health
            .watch(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = w.message().await.unwrap().unwrap();
        assert_eq!(first.status(), ServingStatus::Serving);
        watches.push(w);
    }
    let since = server.shutdown();
    for mut w in watches {
        let mut seen = Vec::new();
        let end = loop {
            match tokio::time::timeout(Duration::from_secs(3), w.message()).await {
                Ok(Ok(Some(m))) => seen.push(m.status()),
                Ok(Ok(None)) => break Code::Ok,
                Ok(Err(st)) => break st.code(),
                Err(_) => panic!("the stream is still open 3 s after the shutdown (seen {seen:?})"),
            }
        };
        assert_eq!(end, Code::Unavailable);
        assert_eq!(seen, vec![ServingStatus::NotServing]);
    }
    let took = server.returned(since, Duration::from_secs(5)).await;
    assert!(took < Duration::from_secs(3), "serve took {took:?}");
}

/// A unary call in flight when the shutdown begins finishes, and its
/// answer reaches the client.
#[tokio::test]
async fn a_call_in_flight_finishes_within_the_grace() {
    let mut server = start(Some(Duration::from_millis(800)), Duration::from_secs(30)).await;
    let call = tokio::spawn(call_sleepy(server.channel.clone()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let since = server.shutdown();
    call.await.unwrap().expect("the call in flight is answered");
    let took = server.returned(since, Duration::from_secs(5)).await;
    assert!(
        took >= Duration::from_millis(400),
        "serve returned after {took:?}, before the call ended"
    );
    assert!(took < Duration::from_secs(3), "serve took {took:?}");
}

/// A call that never ends holds the server for the grace period, no more.
#[tokio::test]
async fn a_stuck_call_holds_the_server_only_for_the_grace() {
    let grace = Duration::from_millis(1500);
    let mut server = start(None, grace).await;
    let call = tokio::spawn(call_sleepy(server.channel.clone()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let since = server.shutdown();
    let took = server.returned(since, grace + Duration::from_secs(5)).await;
    assert!(took >= grace, "serve returned after {took:?}, within the grace");
    assert!(took < grace + Duration::from_secs(2), "serve took {took:?}");
    assert!(!call.is_finished() || call.await.unwrap().is_err());
}

/// Sequential unary calls with a few KiB of answer, on one connection,
/// answer in about a millisecond: no Nagle/delayed-ACK stall (without
/// TCP_NODELAY on the accepted socket, every one took ~44 ms).
#[tokio::test]
async fn unary_calls_do_not_wait_for_delayed_acks() {
    let sleepy = Sleepy {
        delay: Some(Duration::ZERO),
        reply_bytes: 16 << 10,
    };
    let server = start_with(sleepy, Duration::from_secs(1)).await;
    let mut times = Vec::new();
    for _ in 0..40 {
        let t = Instant::now();
        let reply = call_sleepy(server.channel.clone()).await.unwrap();
        times.push(t.elapsed());
        assert_eq!(reply.len(), 16 << 10);
    }
    times.sort();
    let median = times[times.len() / 2];
    eprintln!(
        "unary call latency: median {median:?}, min {:?}, max {:?}",
        times[0],
        times[times.len() - 1]
    );
    assert!(median < Duration::from_millis(20), "median {median:?}: {times:?}");
}
