//! Metrics: OpenTelemetry instruments, read two ways: a Prometheus scrape
//! (`GET /metrics` on the probe port, see [`crate::probe`]) and, when
//! OTEL_EXPORTER_OTLP_ENDPOINT is set, OTLP export beside the traces.
//!
//! What is measured, and where (`ramsnap_` prefix in Prometheus):
//! - `rpc_server_duration_seconds{rpc_method, rpc_grpc_status_code}`: every
//!   RPC of every server, with its outcome (the audit layer; its count is
//!   the RPC count);
//! - `saga_duration_seconds{saga, outcome}`: the coordinator's sagas
//!   (succeeded, unwound, failed);
//! - `vms{status}`: the coordinator's VMs by status;
//! - `memory_dump_duration_seconds{mode}`, `memory_dumped_bytes_total`,
//!   `guest_pause_seconds{mode}`, `memory_restore_duration_seconds`: the
//!   host agent's snapshots with memory and restores;
//! - `volume_copied_bytes_total`, `volume_copy_duration_seconds`: the
//!   storage agent's copies (their ratio is the throughput).
use opentelemetry::metrics::{Counter, Histogram, Meter};
use opentelemetry::KeyValue;
use std::sync::OnceLock;

static REGISTRY: OnceLock<prometheus::Registry> = OnceLock::new();

/// Seconds: 5 ms to 20 minutes.
const SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0,
];

/// Builds the process's meter provider (Prometheus reader, and OTLP when
/// configured) and makes it the global one. Once per process; later calls
/// return None.
pub fn init(service: &'static str) -> Option<opentelemetry_sdk::metrics::SdkMeterProvider> {
    let registry = prometheus::Registry::new();
    if REGISTRY.set(registry.clone()).is_err() {
        return None;
    }
    let prometheus = match opentelemetry_prometheus::exporter()
        .with_registry(registry)
        .build()
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ramsnap: metrics disabled: {e}");
            return None;
        }
    };
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(format!("ramsnap-{service}"))
        .build();
    let mut builder = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
        .with_reader(prometheus)
        .with_resource(resource);
    if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() {
        match opentelemetry_otlp::MetricExporter::builder().with_tonic().build() {
            Ok(exporter) => {
                builder = builder
                    .with_reader(opentelemetry_sdk::metrics::PeriodicReader::builder(exporter).build());
            }
            Err(e) => eprintln!("ramsnap: OTLP metrics export disabled: {e}"),
        }
    }
    let provider = builder.build();
    opentelemetry::global::set_meter_provider(provider.clone());
    let _ = I.set(instruments());
    Some(provider)
}

/// The Prometheus text exposition of every instrument (empty before
/// [`init`]).
pub fn render() -> String {
    use prometheus::Encoder;
    let Some(registry) = REGISTRY.get() else {
        return String::new();
    };
    let mut out = Vec::new();
    if prometheus::TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .is_err()
    {
        return String::new();
    }
    String::from_utf8(out).unwrap_or_default()
}

/// The meter every ramsnap instrument comes from.
pub fn meter() -> Meter {
    opentelemetry::global::meter("ramsnap")
}

fn seconds(m: &Meter, name: &'static str, what: &'static str) -> Histogram<f64> {
    m.f64_histogram(name)
        .with_unit("s")
        .with_description(what)
        .with_boundaries(SECONDS.to_vec())
        .build()
}

struct Instruments {
    rpc: Histogram<f64>,
    saga: Histogram<f64>,
    dump: Histogram<f64>,
    dump_bytes: Counter<u64>,
    pause: Histogram<f64>,
    restore: Histogram<f64>,
    copy_bytes: Counter<u64>,
    copy: Histogram<f64>,
}

/// Made by [`init`], from the provider it installs: before it (in a test
/// that never calls it) nothing is recorded.
static I: OnceLock<Instruments> = OnceLock::new();

fn instruments() -> Instruments {
    let m = meter();
    Instruments {
        rpc: seconds(
            &m,
            "ramsnap.rpc.server.duration",
            "RPCs served, by method and gRPC status code",
        ),
        saga: seconds(&m, "ramsnap.saga.duration", "Sagas, by name and outcome"),
        dump: seconds(
            &m,
            "ramsnap.memory.dump.duration",
            "Snapshots with memory on a host: libvirt's dump",
        ),
        dump_bytes: m
            .u64_counter("ramsnap.memory.dumped")
            .with_unit("By")
            .with_description("Bytes of memory dumps written")
            .build(),
        pause: seconds(
            &m,
            "ramsnap.guest.pause",
            "How long guests were paused by snapshots with memory",
        ),
        restore: seconds(
            &m,
            "ramsnap.memory.restore.duration",
            "Runs that restored memory: the host's step",
        ),
        copy_bytes: m
            .u64_counter("ramsnap.volume.copied")
            .with_unit("By")
            .with_description("Bytes of volumes copied")
            .build(),
        copy: seconds(&m, "ramsnap.volume.copy.duration", "Volume copies"),
    }
}

pub fn record_rpc(method: &str, code: i32, secs: f64) {
    let Some(i) = I.get() else { return };
    i.rpc.record(
        secs,
        &[
            KeyValue::new("rpc.method", method.to_string()),
            KeyValue::new("rpc.grpc.status_code", i64::from(code)),
        ],
    );
}

pub fn record_saga(saga: &str, outcome: &'static str, secs: f64) {
    let Some(i) = I.get() else { return };
    i.saga.record(
        secs,
        &[
            KeyValue::new("saga", saga.to_string()),
            KeyValue::new("outcome", outcome),
        ],
    );
}

pub fn record_dump(mode: &'static str, secs: f64, bytes: u64, pause_secs: f64) {
    let Some(i) = I.get() else { return };
    let mode = [KeyValue::new("mode", mode)];
    i.dump.record(secs, &mode);
    i.dump_bytes.add(bytes, &[]);
    i.pause.record(pause_secs, &mode);
}

pub fn record_restore(secs: f64) {
    let Some(i) = I.get() else { return };
    i.restore.record(secs, &[]);
}

pub fn record_copy(bytes: u64, secs: f64) {
    let Some(i) = I.get() else { return };
    i.copy_bytes.add(bytes, &[]);
    i.copy.record(secs, &[]);
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_scrape_shows_what_was_recorded() {
        super::init("test").expect("the first init");
        assert!(super::init("test").is_none(), "once per process");
        super::record_rpc("/ramsnap.snapshot.v1.VmService/GetVm", 5, 0.002);
        super::record_saga("snapshot_create", "succeeded", 3.5);
        super::record_copy(1 << 20, 0.5);
        let text = super::render();
        assert!(
            text.contains("ramsnap_rpc_server_duration_seconds_count{")
                && text.contains("rpc_method=\"/ramsnap.snapshot.v1.VmService/GetVm\"")
                && text.contains("rpc_grpc_status_code=\"5\""),
            "{text}"
        );
        assert!(
            text.contains(
                "ramsnap_saga_duration_seconds_bucket{outcome=\"succeeded\",saga=\"snapshot_create\""
            ),
            "{text}"
        );
        assert!(
            text.contains("ramsnap_volume_copied_bytes_total{otel_scope_name=\"ramsnap\"} 1048576"),
            "{text}"
        );
    }
}
