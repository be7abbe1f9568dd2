//! Traces and metrics as an OpenTelemetry collector receives them: a real OTLP/HTTP receiver
//! (hyper, decoding the OTLP protobuf messages) in the test process, the real provider binary
//! pointed at it through host data.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use http_body_util::BodyExt as _;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use opentelemetry_proto::tonic::trace::v1::{status, Span};
use prost::Message as _;

const C1: &str = "component-one";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN_ID: &str = "00f067aa0ba902b7";

/// What the receiver got.
#[derive(Default)]
struct Received {
    requests: usize,
    traces: Vec<ExportTraceServiceRequest>,
    metrics: Vec<ExportMetricsServiceRequest>,
}

/// An OTLP/HTTP receiver on a free loopback port: `POST /v1/traces` and `/v1/metrics` with
/// protobuf bodies, as the OpenTelemetry collector takes them.
struct Receiver {
    addr: SocketAddr,
    received: Arc<Mutex<Received>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Received::default()));
        let task = tokio::spawn({
            let received = Arc::clone(&received);
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let received = Arc::clone(&received);
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(
                            move |request: hyper::Request<hyper::body::Incoming>| {
                                let received = Arc::clone(&received);
                                async move {
                                    let path = request.uri().path().to_owned();
                                    let body = match request.into_body().collect().await {
                                        Ok(body) => body.to_bytes(),
                                        Err(_) => bytes::Bytes::new(),
                                    };
                                    let mut received = received.lock().unwrap();
                                    received.requests += 1;
                                    let status = match path.as_str() {
                                        "/v1/traces" => {
                                            match ExportTraceServiceRequest::decode(body) {
                                                Ok(request) => {
                                                    received.traces.push(request);
                                                    200
                                                }
                                                Err(_) => 400,
                                            }
                                        }
                                        "/v1/metrics" => {
                                            match ExportMetricsServiceRequest::decode(body) {
                                                Ok(request) => {
                                                    received.metrics.push(request);
                                                    200
                                                }
                                                Err(_) => 400,
                                            }
                                        }
                                        _ => 404,
                                    };
                                    hyper::Response::builder()
                                        .status(status)
                                        .header("content-type", "application/x-protobuf")
                                        .body(http_body_util::Full::new(bytes::Bytes::new()))
                                }
                            },
                        );
                        let io = hyper_util::rt::TokioIo::new(stream);
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await;
                    });
                }
            }
        });
        Self {
            addr,
            received,
            task,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attributes(attrs: &[KeyValue]) -> HashMap<String, String> {
    attrs
        .iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                Some(Value::IntValue(i)) => i.to_string(),
                Some(Value::BoolValue(b)) => b.to_string(),
                Some(Value::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

async fn telemetry_provider(receiver: &Receiver, enabled: bool) -> (NatsServer, Provider) {
    let server = NatsServer::start();
    let otel = serde_json::json!({
        "otel_config": {
            "enable_observability": enabled,
            "observability_endpoint": receiver.endpoint(),
            "protocol": "Http",
        },
    });
    let provider = Provider::start_with(
        &server,
        otel,
        &[("max_value_bytes", "8"), ("max_keys", "3")],
        &[(C1, "default", Some("team"))],
    )
    .await;
    (server, provider)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_call_is_one_span_in_the_callers_trace_and_metrics_count_them() {
    let receiver = Receiver::start().await;
    let (_server, mut p) = telemetry_provider(&receiver, true).await;
    let traceparent = format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01");
    let c = || {
        p.as_component(C1, "default")
            .with_header("traceparent", &traceparent)
    };
    c().set("b", "k", b"SECRET").await.unwrap();
    assert_eq!(c().get("b", "k").await, Ok(Some(b"SECRET".to_vec())));
    let refused = other_message(c().set("b", "big", b"far too long").await);
    let denied = p
        .as_component("stranger", "default")
        .with_header("traceparent", &traceparent);
    assert!(is_denied(&denied.get("b", "k").await));
    c().set_many("b", &[("x", &b"1"[..]), ("y", &b"22"[..])])
        .await
        .unwrap();
    // A cache: four writes into a namespace of three keys evict one; then all expire.
    let cache = [
        ("namespace", "cache"),
        ("ttl_secs", "1"),
        ("eviction", "lru"),
    ];
    p.put_link_config("cacher", "default", &cache, 2).await;
    let cacher = p.as_component("cacher", "default");
    for key in ["a", "b", "c", "d"] {
        cacher.set("b", key, b"v").await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        cacher
            .get_many("b", &["a", "b", "c", "d"])
            .await
            .unwrap()
            .iter()
            .flatten()
            .count(),
        0
    );

    // The host's shutdown request flushes what is buffered.
    p.request_shutdown().await;
    assert!(p.wait_exit().await.success());

    let received = receiver.received.lock().unwrap();
    let spans: Vec<&Span> = received
        .traces
        .iter()
        .flat_map(|r| &r.resource_spans)
        .flat_map(|r| &r.scope_spans)
        .flat_map(|s| &s.spans)
        .filter(|s| hex(&s.trace_id) == TRACE_ID)
        .collect();
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "keyvalue.set",
            "keyvalue.get",
            "keyvalue.set",
            "keyvalue.get",
            "keyvalue.set-many"
        ],
        "one span per call, in the caller's trace"
    );
    for span in &spans {
        assert_eq!(
            hex(&span.parent_span_id),
            PARENT_SPAN_ID,
            "{}: parent is the caller's span",
            span.name
        );
        assert_eq!(span.kind, 2, "server span");
    }
    let attrs: Vec<HashMap<String, String>> =
        spans.iter().map(|s| attributes(&s.attributes)).collect();
    assert_eq!(attrs[0]["keyvalue.namespace"], "named:team");
    assert_eq!(attrs[0]["keyvalue.bucket"], "b");
    assert_eq!(attrs[0]["keyvalue.keys"], "1");
    assert_eq!(attrs[0]["keyvalue.bytes_in"], "6");
    assert_eq!(attrs[0]["keyvalue.outcome"], "ok");
    assert_eq!(attrs[1]["keyvalue.bytes_out"], "6");
    assert_eq!(attrs[4]["keyvalue.keys"], "2");
    assert_eq!(attrs[4]["keyvalue.bytes_in"], "3");
    for a in &attrs {
        assert!(
            a.values().all(|v| !v.contains("SECRET")),
            "no values on spans: {a:?}"
        );
    }
    // Refused calls are error spans carrying the message the caller got.
    let status = |i: usize| spans[i].status.clone().unwrap_or_default();
    assert_eq!(status(0).code, status::StatusCode::Unset as i32);
    assert_eq!(status(2).code, status::StatusCode::Error as i32);
    assert_eq!(status(2).message, refused);
    assert_eq!(attrs[2]["keyvalue.outcome"], "error");
    assert_eq!(status(3).code, status::StatusCode::Error as i32);
    assert_eq!(status(3).message, "access denied");
    assert!(!attrs[3].contains_key("keyvalue.namespace"));

    // The last export holds the final, cumulative figures.
    let last = received.metrics.last().expect("metrics were exported");
    let mut calls = HashMap::new();
    let mut rejections = HashMap::new();
    let mut keys = None;
    let mut durations = 0;
    let mut churn = HashMap::new();
    for metric in last
        .resource_metrics
        .iter()
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics)
    {
        match (metric.name.as_str(), metric.data.as_ref()) {
            ("keyvalue.calls", Some(metric::Data::Sum(sum))) => {
                for point in &sum.data_points {
                    let a = attributes(&point.attributes);
                    let Some(number_data_point::Value::AsInt(n)) = point.value else {
                        panic!("{point:?}")
                    };
                    calls.insert((a["operation"].clone(), a["outcome"].clone()), n);
                }
            }
            ("keyvalue.limit.rejections", Some(metric::Data::Sum(sum))) => {
                for point in &sum.data_points {
                    let Some(number_data_point::Value::AsInt(n)) = point.value else {
                        panic!("{point:?}")
                    };
                    rejections.insert(attributes(&point.attributes)["limit"].clone(), n);
                }
            }
            ("keyvalue.keys", Some(metric::Data::Gauge(gauge))) => {
                for point in &gauge.data_points {
                    let a = attributes(&point.attributes);
                    if a.get("namespace").map(String::as_str) == Some("named:team") {
                        let Some(number_data_point::Value::AsInt(n)) = point.value else {
                            panic!("{point:?}")
                        };
                        keys = Some(n);
                    }
                }
            }
            (name @ ("keyvalue.expired" | "keyvalue.evicted"), Some(metric::Data::Sum(sum))) => {
                for point in &sum.data_points {
                    let a = attributes(&point.attributes);
                    let Some(number_data_point::Value::AsInt(n)) = point.value else {
                        panic!("{point:?}")
                    };
                    let ns = a.get("namespace").cloned().unwrap_or_default();
                    churn.insert((name.to_string(), ns), n);
                }
            }
            ("keyvalue.call.duration", Some(metric::Data::Histogram(h))) => {
                durations = h.data_points.iter().map(|p| p.count).sum();
            }
            _ => {}
        }
    }
    let count =
        |op: &str, outcome: &str| calls.get(&(op.to_string(), outcome.to_string())).copied();
    assert_eq!(count("keyvalue.set", "ok"), Some(5), "{calls:?}");
    assert_eq!(count("keyvalue.get", "ok"), Some(1), "{calls:?}");
    assert_eq!(count("keyvalue.set", "error"), Some(1), "{calls:?}");
    assert_eq!(count("keyvalue.get", "denied"), Some(1), "{calls:?}");
    assert_eq!(count("keyvalue.set-many", "ok"), Some(1), "{calls:?}");
    assert_eq!(
        rejections.get("max_value_bytes"),
        Some(&1),
        "{rejections:?}"
    );
    assert_eq!(keys, Some(3), "live keys of namespace team");
    assert_eq!(durations, 10);
    let churn = |name: &str, ns: &str| churn.get(&(name.to_string(), ns.to_string())).copied();
    assert_eq!(churn("keyvalue.evicted", "named:cache"), Some(1));
    assert_eq!(churn("keyvalue.expired", "named:cache"), Some(3));
    assert_eq!(churn("keyvalue.expired", "named:team"), Some(0));
    assert_eq!(churn("keyvalue.evicted", ""), Some(1), "in all");
}

#[tokio::test]
async fn with_telemetry_off_nothing_is_exported() {
    let receiver = Receiver::start().await;
    let (_server, mut p) = telemetry_provider(&receiver, false).await;
    let traceparent = format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01");
    let c = p
        .as_component(C1, "default")
        .with_header("traceparent", &traceparent);
    c.set("b", "k", b"v").await.unwrap();
    c.get("b", "k").await.unwrap();
    p.request_shutdown().await;
    assert!(p.wait_exit().await.success());
    assert_eq!(receiver.received.lock().unwrap().requests, 0);
}

/// A watch event carries the trace of the write that caused it: its `traceparent` names the
/// write's own span (a child of the caller's), and the event counter counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_event_carries_the_trace_of_the_write_that_caused_it() {
    let receiver = Receiver::start().await;
    let (_server, mut p) = telemetry_provider(&receiver, true).await;
    p.put_link("watcher", "default", Some("team"), 2).await;
    let mut w =
        keyvalue_inmemory::client::watcher::Watcher::serve(p.nats.clone(), LATTICE, "watcher")
            .await
            .unwrap();
    p.put_watch_link("watcher", "default", &[("watch", "SET@*")], 1)
        .await;
    let traceparent = format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01");
    p.as_component(C1, "default")
        .with_header("traceparent", &traceparent)
        .set("b", "k", b"v")
        .await
        .unwrap();
    let heard = w.next(CALL_TIMEOUT).await.expect("the event");
    let event_parent = heard
        .header("traceparent")
        .expect("a traceparent")
        .to_owned();
    p.wait_for_health(|m| m.contains(": 1 delivered")).await;
    p.request_shutdown().await;
    assert!(p.wait_exit().await.success());

    let received = receiver.received.lock().unwrap();
    let set = (received.traces.iter())
        .flat_map(|r| &r.resource_spans)
        .flat_map(|r| &r.scope_spans)
        .flat_map(|s| &s.spans)
        .find(|s| hex(&s.trace_id) == TRACE_ID && s.name == "keyvalue.set")
        .expect("the write's span");
    assert_eq!(
        event_parent,
        format!("00-{TRACE_ID}-{}-01", hex(&set.span_id)),
        "the event is a child of the write's span"
    );
    let last = received.metrics.last().expect("metrics were exported");
    let mut events = HashMap::new();
    for metric in (last.resource_metrics.iter())
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics)
    {
        if let ("keyvalue.watch.events", Some(metric::Data::Sum(sum))) =
            (metric.name.as_str(), metric.data.as_ref())
        {
            for point in &sum.data_points {
                let Some(number_data_point::Value::AsInt(n)) = point.value else {
                    panic!("{point:?}")
                };
                events.insert(attributes(&point.attributes)["outcome"].clone(), n);
            }
        }
    }
    let expect: HashMap<String, i64> = [("delivered", 1), ("dropped", 0), ("failed", 0)]
        .into_iter()
        .map(|(k, n)| (k.to_owned(), n))
        .collect();
    assert_eq!(events, expect);
}
