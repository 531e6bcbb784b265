//! The OTLP/HTTP (protobuf) span exporter and the process's tracer.
//!
//! One tracer per process, installed by [`start`] and removed by
//! [`Telemetry::shutdown`]: spans are made deep inside the runtime and
//! dispatch, and threading a handle through every layer would cost the
//! untraced hot path too. Spans leave in batches from a task on the tokio
//! runtime (the HTTP client is hyper's, which needs one), every
//! `export_interval` or when a batch fills; a collector that is down
//! loses spans, never events.

use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::runtime::Tokio;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{BatchConfigBuilder, SdkTracer, SdkTracerProvider};
use tracing::{info, warn};

use crate::config::TelemetryConfig;

/// How long one export may take before it is given up.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long stopping waits for the last spans to leave.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Set while a tracer is installed: the one check the untraced path pays.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// The installed tracer. A lock rather than a `OnceLock`: a process (a
/// test) may start and stop hosts one after another.
static TRACER: RwLock<Option<SdkTracer>> = RwLock::new(None);

/// Why traces cannot be exported as configured.
#[derive(Debug, thiserror::Error)]
#[error("telemetry: {0}")]
pub struct TelemetryError(#[from] opentelemetry_otlp::ExporterBuildError);

/// Whether spans are being made (a tracer is installed).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The installed tracer, when tracing is on.
pub(super) fn tracer() -> Option<SdkTracer> {
    if !enabled() {
        return None;
    }
    TRACER.read().ok()?.clone()
}

/// The running exporter; [`shutdown`](Telemetry::shutdown) sends the spans
/// still waiting and uninstalls the tracer.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

/// Starts exporting as `config` says: `Ok(None)` when it names no
/// endpoint (tracing stays off). Must run inside the tokio runtime.
pub fn start(config: &TelemetryConfig) -> Result<Option<Telemetry>, TelemetryError> {
    let Some(endpoint) = &config.otlp_endpoint else {
        return Ok(None);
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(endpoint.clone())
        .with_timeout(EXPORT_TIMEOUT)
        .build()?;
    let batch = BatchConfigBuilder::default()
        .with_scheduled_delay(config.export_interval)
        .build();
    let processor = BatchSpanProcessor::builder(exporter, Tokio)
        .with_batch_config(batch)
        .build();
    let resource = Resource::builder()
        .with_service_name(config.service_name.clone())
        .with_attributes(
            (config.resource.iter()).map(|(key, value)| KeyValue::new(key.clone(), value.clone())),
        )
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("hookmesh");
    if let Ok(mut installed) = TRACER.write() {
        *installed = Some(tracer);
    }
    ENABLED.store(true, Ordering::Relaxed);
    info!(%endpoint, service_name = %config.service_name, "traces: exporting over OTLP/HTTP");
    Ok(Some(Telemetry { provider }))
}

impl Telemetry {
    /// Uninstalls the tracer and sends the spans still waiting (bounded).
    pub async fn shutdown(self) {
        ENABLED.store(false, Ordering::Relaxed);
        if let Ok(mut installed) = TRACER.write() {
            *installed = None;
        }
        // The provider's shutdown blocks until the exporting task answers,
        // which runs on this runtime: off the async workers.
        let provider = self.provider;
        let stopped =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT));
        match stopped.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => warn!(%error, "traces: the last spans may not have been sent"),
            Err(error) => warn!(%error, "traces: stopping the exporter failed"),
        }
    }
}
