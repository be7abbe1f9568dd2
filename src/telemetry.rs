//! Logs, traces and metrics, configured the way a wasmCloud host configures providers.
//!
//! Sources, later ones winning: the host's `otel_config` and `log_level` in host data; the
//! `OTEL_*` environment the host passes through (read by `opentelemetry-otlp` for whatever is
//! not set explicitly); `OTEL_*` keys in the provider config (the same overrides the SDK's
//! `initialize_observability!` honours).
//!
//! We do not use `initialize_observability!`, for three reasons measured on this stack (SDK
//! 0.17 with the 1.x host): its global level filter drops every span below the host's
//! `log_level` before the OpenTelemetry layer sees it; it never flushes spans or metrics at
//! exit; and it leaves the parenting of spans to `propagate_trace_for_ctx!`, which cannot
//! parent a span that is already entered. Here each call's span gets its parent from the
//! invocation's `traceparent` before it is first entered (see `serve.rs`), exporters run on the
//! Tokio runtime (`*_with_async_runtime` processors: the thread-based batch processor with the
//! async reqwest client that the SDK's features switch on panics with "no reactor running"),
//! and [`Telemetry::shutdown`] flushes both signals.
//!
//! With telemetry off (the host's default) the per-call spans are disabled at their callsite
//! (target [`CALL_TARGET`] is filtered out) and the metric instruments are no-ops.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use opentelemetry::metrics::{AsyncInstrument, Counter, Histogram, Meter};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};
use wasmcloud_provider_sdk::core::logging::Level;
use wasmcloud_provider_sdk::core::{OtelConfig, OtelProtocol};
use wasmcloud_provider_sdk::HostData;

use keyvalue_store::{Engine, Usage};

/// The name telemetry reports the provider by (its package name).
const SERVICE: &str = env!("CARGO_PKG_NAME");

/// The tracing target of the per-call spans.
pub const CALL_TARGET: &str = "keyvalue_inmemory::call";

/// Exporters to flush at exit.
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
}

/// Sets up logging to stderr and, when the host enables them, OTLP traces and metrics.
/// Call from within the Tokio runtime: the exporters run on it.
pub fn init(host_data: &HostData, otel: &OtelConfig) -> anyhow::Result<Telemetry> {
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(SERVICE)
        .with_attribute(KeyValue::new(
            "service.instance.id",
            host_data.instance_id.clone(),
        ))
        .build();

    let tracer = otel
        .traces_enabled()
        .then(|| tracer_provider(otel, resource.clone()))
        .transpose()?;
    let meter = otel
        .metrics_enabled()
        .then(|| meter_provider(otel, resource))
        .transpose()?;
    if let Some(meter) = &meter {
        opentelemetry::global::set_meter_provider(meter.clone());
    }

    let traces = tracer.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(SERVICE))
            .with_filter(level_filter(&otel.trace_level))
    });
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    use tracing_subscriber::filter::FilterExt as _;
    let quiet = SdkStopNoise;
    let fmt = if host_data.structured_logging {
        fmt.json()
            .with_filter(log_filter(host_data.log_level.as_ref()).and(quiet))
            .boxed()
    } else {
        fmt.with_filter(log_filter(host_data.log_level.as_ref()).and(quiet))
            .boxed()
    };
    tracing_subscriber::registry()
        .with(fmt)
        .with(traces)
        .try_init()
        .context("failed to install the tracing subscriber")?;
    Ok(Telemetry { tracer, meter })
}

impl Telemetry {
    /// Exports what is still buffered and stops the exporters (bounded: 5 s).
    pub async fn shutdown(self) {
        let Self { tracer, meter } = self;
        if tracer.is_none() && meter.is_none() {
            return;
        }
        // The providers' shutdown blocks until their runtime tasks finish: keep it off the
        // async workers.
        let flush = tokio::task::spawn_blocking(move || {
            if let Some(tracer) = tracer {
                if let Err(err) = tracer.shutdown() {
                    eprintln!("failed to flush traces: {err}");
                }
            }
            if let Some(meter) = meter {
                if let Err(err) = meter.shutdown() {
                    eprintln!("failed to flush metrics: {err}");
                }
            }
        });
        if tokio::time::timeout(Duration::from_secs(5), flush)
            .await
            .is_err()
        {
            eprintln!("telemetry did not flush within 5 s");
        }
    }
}

/// Set once the provider stops.
static STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Tells the log filter that the provider is stopping.
pub fn stopping() {
    STOPPING.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Drops one message of the SDK 0.17's control loop: on every clean stop it logs `ERROR failed
/// to handle health check, shutdown` (or another of its channels), because the host's
/// shutdown request ends its subscriptions and its loop reads an ended channel before its
/// quit signal. Only that message, only once we are stopping: the SDK's other errors show.
struct SdkStopNoise;

impl SdkStopNoise {
    fn may_drop(meta: &tracing::Metadata<'_>) -> bool {
        *meta.level() == tracing::Level::ERROR
            && meta.target().starts_with("wasmcloud_provider_sdk")
    }
}

impl<S> tracing_subscriber::layer::Filter<S> for SdkStopNoise {
    fn enabled(
        &self,
        _: &tracing::Metadata<'_>,
        _: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        true
    }

    /// Only the SDK's error callsites are looked at event by event; the rest is left to the
    /// level filter, whose static answers (and max level) stay in force. Without this, the
    /// combined filter had no max level: every trace-level span of the wRPC stack (one per
    /// encoded list element) was created and formatted, and get-many ran at half speed.
    fn callsite_enabled(
        &self,
        meta: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        if Self::may_drop(meta) {
            tracing::subscriber::Interest::sometimes()
        } else {
            tracing::subscriber::Interest::always()
        }
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
    }

    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        _: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        if !Self::may_drop(event.metadata()) || !STOPPING.load(std::sync::atomic::Ordering::Relaxed)
        {
            return true;
        }
        /// Whether the event's message is "failed to handle <channel>, shutdown".
        struct EndedChannel(bool);
        impl tracing::field::Visit for EndedChannel {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    let text = format!("{value:?}");
                    self.0 = text.starts_with("failed to handle ") && text.ends_with(", shutdown");
                }
            }
        }
        let mut ended = EndedChannel(false);
        event.record(&mut ended);
        !ended.0
    }
}

fn tracing_level(level: &Level) -> tracing::Level {
    match level {
        Level::Error | Level::Critical => tracing::Level::ERROR,
        Level::Warn => tracing::Level::WARN,
        Level::Info => tracing::Level::INFO,
        Level::Debug => tracing::Level::DEBUG,
        Level::Trace => tracing::Level::TRACE,
    }
}

/// Logs at the host's level (default info), `RUST_LOG` on top; call spans are for traces only.
fn log_filter(level: Option<&Level>) -> EnvFilter {
    let level = tracing_level(level.unwrap_or(&Level::Info));
    let base = format!("{level},async_nats=info,{CALL_TARGET}=off");
    let directives = match std::env::var("RUST_LOG") {
        Ok(extra) if !extra.trim().is_empty() => format!("{base},{extra}"),
        _ => base,
    };
    EnvFilter::try_new(&directives).unwrap_or_else(|err| {
        eprintln!("RUST_LOG is not a valid filter ({err}); logging at {level}");
        EnvFilter::new(level.to_string())
    })
}

/// Spans at the host's `trace_level` (default info, which includes the call spans).
fn level_filter(level: &Level) -> tracing_subscriber::filter::LevelFilter {
    tracing_level(level).into()
}

fn sampler(otel: &OtelConfig) -> Sampler {
    let ratio = || {
        otel.traces_sampler_arg
            .as_deref()
            .and_then(|r| r.parse::<f64>().ok())
            .unwrap_or(1.0)
    };
    match otel.traces_sampler.as_deref() {
        Some("always_on") => Sampler::AlwaysOn,
        Some("always_off") => Sampler::AlwaysOff,
        Some("traceidratio") => Sampler::TraceIdRatioBased(ratio()),
        Some("parentbased_always_off") => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        Some("parentbased_traceidratio") => {
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio())))
        }
        _ => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
    }
}

fn tracer_provider(
    otel: &OtelConfig,
    resource: opentelemetry_sdk::Resource,
) -> anyhow::Result<SdkTracerProvider> {
    let endpoint = otel.traces_endpoint();
    let exporter = match otel.protocol {
        OtelProtocol::Http => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(reqwest::Client::new())
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(endpoint)
            .build(),
        OtelProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build(),
    }
    .context("failed to build the OTLP span exporter")?;
    let mut batch = opentelemetry_sdk::trace::BatchConfigBuilder::default();
    if let Some(size) = otel.max_batch_queue_size {
        batch = batch.with_max_queue_size(size);
    }
    if let Some(n) = otel.concurrent_exports {
        batch = batch.with_max_concurrent_exports(n);
    }
    let processor =
        opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .with_batch_config(batch.build())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_sampler(sampler(otel))
        .with_resource(resource)
        .with_span_processor(processor)
        .build())
}

fn meter_provider(
    otel: &OtelConfig,
    resource: opentelemetry_sdk::Resource,
) -> anyhow::Result<SdkMeterProvider> {
    let endpoint = otel.metrics_endpoint();
    let exporter = match otel.protocol {
        OtelProtocol::Http => opentelemetry_otlp::MetricExporter::builder()
            .with_http()
            .with_http_client(reqwest::Client::new())
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(endpoint)
            .build(),
        OtelProtocol::Grpc => opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build(),
    }
    .context("failed to build the OTLP metric exporter")?;
    let reader =
        opentelemetry_sdk::metrics::periodic_reader_with_async_runtime::PeriodicReader::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
    Ok(SdkMeterProvider::builder()
        .with_resource(resource)
        .with_reader(reader)
        .build())
}

/// The metric instruments, made once from the global meter (a no-op one when metrics are off).
pub struct Metrics {
    calls: Counter<u64>,
    duration: Histogram<f64>,
    rejections: Counter<u64>,
}

/// The instruments.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let meter = meter();
        Metrics {
            calls: meter
                .u64_counter("keyvalue.calls")
                .with_description("wRPC calls served, by operation and outcome")
                .build(),
            duration: meter
                .f64_histogram("keyvalue.call.duration")
                .with_unit("s")
                .with_description("Time from accepting a call to sending its answer")
                .build(),
            rejections: meter
                .u64_counter("keyvalue.limit.rejections")
                .with_description("Writes refused by a configured limit, by limit")
                .build(),
        }
    })
}

fn meter() -> Meter {
    opentelemetry::global::meter(SERVICE)
}

impl Metrics {
    /// One call served.
    pub fn call(&self, operation: &'static str, outcome: &'static str, elapsed: Duration) {
        let attributes = [
            KeyValue::new("operation", operation),
            KeyValue::new("outcome", outcome),
        ];
        self.calls.add(1, &attributes);
        self.duration
            .record(elapsed.as_secs_f64(), &attributes[..1]);
    }

    /// One write refused by the limit named by `config_key`.
    pub fn rejection(&self, config_key: &'static str) {
        self.rejections
            .add(1, &[KeyValue::new("limit", config_key)]);
    }
}

/// Most namespaces reported one by one in the per-namespace gauges (the store-wide figures
/// always cover all of them).
const NAMESPACE_GAUGE_LIMIT: usize = 64;

/// Registers the live gauges, keys and bytes in the store, and the counters of keys that
/// expired and were evicted: in all, and per namespace.
pub fn register_usage_gauges(engine: Arc<Engine>) {
    let meter = meter();
    meter
        .u64_observable_counter("keyvalue.expired")
        .with_description("Keys removed because their TTL passed, in all and per namespace")
        .with_callback(in_all_and_per_namespace(
            &engine,
            |all| all.expired,
            |e, ns| e.namespace_churn(ns).0,
        ))
        .build();
    meter
        .u64_observable_counter("keyvalue.evicted")
        .with_description("Keys evicted to make room (eviction=lru), in all and per namespace")
        .with_callback(in_all_and_per_namespace(
            &engine,
            |all| all.evicted,
            |e, ns| e.namespace_churn(ns).1,
        ))
        .build();
    meter
        .u64_observable_gauge("keyvalue.keys")
        .with_description("Live keys, in all and per namespace")
        .with_callback(in_all_and_per_namespace(
            &engine,
            |all| all.keys,
            |e, ns| e.namespace_usage(ns).0,
        ))
        .build();
    meter
        .u64_observable_gauge("keyvalue.bytes")
        .with_unit("By")
        .with_description("Key plus value bytes, in all and per namespace")
        .with_callback(in_all_and_per_namespace(
            &engine,
            |all| all.bytes,
            |e, ns| e.namespace_usage(ns).1,
        ))
        .build();
}

/// Registers the counter of watch events, by outcome: `delivered`, `dropped` (the watcher's
/// queue was full) and `failed` (the call failed or timed out), from `totals` (what
/// [`Watchers::totals`](crate::watch::Watchers::totals) answers).
pub fn register_watch_counter(totals: impl Fn() -> crate::watch::Totals + Send + Sync + 'static) {
    meter()
        .u64_observable_counter("keyvalue.watch.events")
        .with_description("Watch events, by outcome: delivered, dropped (queue full), failed")
        .with_callback(move |instrument| {
            let t = totals();
            for (outcome, n) in [
                ("delivered", t.delivered),
                ("dropped", t.dropped),
                ("failed", t.failed),
            ] {
                instrument.observe(n, &[KeyValue::new("outcome", outcome)]);
            }
        })
        .build();
}

/// The callback of an instrument reporting one figure of the store: `all` of its usage, with
/// no attribute, then `per` namespace for up to [`NAMESPACE_GAUGE_LIMIT`] namespaces.
fn in_all_and_per_namespace(
    engine: &Arc<Engine>,
    all: fn(&Usage) -> u64,
    per: fn(&Engine, &str) -> u64,
) -> impl Fn(&dyn AsyncInstrument<u64>) + Send + Sync + 'static {
    let engine = Arc::clone(engine);
    move |instrument| {
        instrument.observe(all(&engine.usage()), &[]);
        for ns in engine.namespaces(NAMESPACE_GAUGE_LIMIT) {
            let figure = per(&engine, &ns);
            instrument.observe(figure, &[KeyValue::new("namespace", ns)]);
        }
    }
}
