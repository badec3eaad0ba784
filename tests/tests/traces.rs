//! Traces across the services: ramsnapd exports its spans over OTLP to a
//! receiver in this test (an OTLP/gRPC TraceService), and one snapshot with
//! memory of a running guest makes one trace that holds the client's
//! CreateSnapshot call, the saga that carries it out, the host agent's
//! SnapshotVm and the storage agent's calls (W3C trace context in the gRPC
//! metadata, and in the saga's parameters).
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use ramsnap_e2e::cluster::{Cluster, Db, DomainKind};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One received span: its trace, name and `path` attribute (the gRPC
/// method of a "grpc" span).
#[derive(Clone, Debug)]
struct Span {
    trace: Vec<u8>,
    name: String,
    path: String,
}

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            for ss in rs.scope_spans {
                for s in ss.spans {
                    let path = s
                        .attributes
                        .iter()
                        .find(|a| a.key == "path")
                        .and_then(|a| a.value.as_ref()?.value.as_ref())
                        .map(|v| match v {
                            Value::StringValue(s) => s.clone(),
                            other => format!("{other:?}"),
                        })
                        .unwrap_or_default();
                    got.push(Span {
                        trace: s.trace_id.clone(),
                        name: s.name.clone(),
                        path,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_snapshot_is_one_trace_across_the_services() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let receiver = Receiver::default();
    let serving = receiver.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(serving))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    let c = Cluster::start_embedded(
        Db::Sqlite,
        "3.3",
        "traces",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    )
    .await;
    let vm = c.create_vm("traced", DomainKind::File).await;
    c.boot(&vm).await;
    c.take_snapshot(&vm, true, "traced").await;

    let wanted = [
        "/ramsnap.snapshot.v1.SnapshotService/CreateSnapshot",
        "/ramsnap.storage.v1.StorageService/CreateMemoryVolumes",
        "/ramsnap.host.v1.HostService/SnapshotVm",
        "/ramsnap.storage.v1.StorageService/PrepareVolume",
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let spans = receiver.0.lock().unwrap().clone();
        let create = spans.iter().find(|s| s.name == "grpc" && s.path == wanted[0]);
        if let Some(create) = create {
            let in_trace: Vec<&Span> = spans.iter().filter(|s| s.trace == create.trace).collect();
            let has = |path: &str| in_trace.iter().any(|s| s.name == "grpc" && s.path == path);
            let saga = in_trace.iter().any(|s| s.name == "saga");
            if wanted.iter().all(|p| has(p)) && saga {
                eprintln!(
                    "trace {}: {} spans, {} of them served calls",
                    create
                        .trace
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<String>(),
                    in_trace.len(),
                    in_trace.iter().filter(|s| s.name == "grpc").count()
                );
                return;
            }
            if Instant::now() > deadline {
                let paths: Vec<String> = in_trace
                    .iter()
                    .map(|s| format!("{} {}", s.name, s.path))
                    .collect();
                panic!("the CreateSnapshot trace lacks some of {wanted:?} or the saga: {paths:#?}");
            }
        } else if Instant::now() > deadline {
            let logs = c.logs();
            let otel: Vec<&str> = logs
                .lines()
                .filter(|l| {
                    l.to_lowercase().contains("otel")
                        || l.to_lowercase().contains("otlp")
                        || l.contains("export")
                })
                .take(20)
                .collect();
            panic!(
                "no CreateSnapshot span received; {} spans in all; logs: {otel:#?}",
                spans.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
