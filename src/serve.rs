//! The data plane: accepting wRPC invocations and running each in a task of its own.
//!
//! This replaces the `serve` function that `wit_bindgen_wrpc::generate!` writes (and the SDK's
//! `serve_provider_exports` that drives it), keeping its shape: one accept stream per exported
//! function, each routed to the generated `Handler` trait method. We do not use the generated
//! one because of what it does with a bad invocation (../shared/CONTRACT.md §7): it decodes
//! parameters *inside* the accept stream (`wrpc_transport::ServeExt::serve_values` uses
//! `and_then`), so an invocation whose parameters never complete stops that function's stream
//! for good, and every later call to it hangs. Here the accept stream only accepts; decoding
//! happens in the invocation's own task, bounded in time (`request_timeout_ms`) and size
//! (`max_request_bytes`). The SDK's loop also aborts in-flight calls when it stops; ours stops
//! accepting, then lets them finish.
//!
//! A reader following one `set`: NATS subject `{lattice}.{provider}.wrpc.0.0.1.
//! wrpc:keyvalue/store@0.2.0-draft.set` → [`Server::run`] accepts → [`route`]'s task decodes
//! `(bucket, key, value)` → `store::Handler::set` in `provider.rs` → `Engine::set` in
//! `engine.rs` → result encoded back on the caller's `….results` subject.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use futures::{SinkExt as _, Stream, StreamExt as _, TryStreamExt as _};
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn, Instrument as _, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use wasmcloud_provider_sdk::Context;
use wrpc_transport::{Serve, TupleDecode, TupleEncode};

use crate::bindings::exports::wrpc::keyvalue::{atomics, batch, store};
use crate::provider::KvProvider;
use crate::telemetry::{self, CALL_TARGET};

/// WIT instance names of what we export.
pub const STORE: &str = "wrpc:keyvalue/store@0.2.0-draft";
/// See [`STORE`].
pub const ATOMICS: &str = "wrpc:keyvalue/atomics@0.2.0-draft";
/// See [`STORE`].
pub const BATCH: &str = "wrpc:keyvalue/batch@0.2.0-draft";

/// How long a stop waits for in-flight calls.
pub const DRAIN_GRACE: Duration = Duration::from_secs(8);

type Call = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;
type Accepted = (&'static str, &'static str, anyhow::Result<Call>);
type Invocations = Pin<Box<dyn Stream<Item = Accepted> + Send>>;

/// The subscribed functions, ready to serve.
pub struct Server {
    provider: KvProvider,
    invocations: futures::stream::SelectAll<Invocations>,
}

impl Server {
    /// Subscribes to every function of store, atomics and batch. Calls that arrive before
    /// [`Server::run`] wait in their subscriptions.
    pub async fn subscribe<C>(client: &C, provider: KvProvider) -> anyhow::Result<Self>
    where
        C: Serve<Context = Option<Context>>,
    {
        // One accept stream per function, each routed to its generated `Handler` method.
        macro_rules! route {
            ($instance:expr, $func:literal, $handler:path, ($($param:ident),+)) => {
                route(client, &provider, $instance, $func, |p, cx, ($($param),+)| async move {
                    $handler(&p, cx, $($param),+).await.map(|r| (r,))
                })
                .await?
            };
        }
        let routes = vec![
            route!(STORE, "get", store::Handler::get, (bucket, key)),
            route!(STORE, "set", store::Handler::set, (bucket, key, value)),
            route!(STORE, "delete", store::Handler::delete, (bucket, key)),
            route!(STORE, "exists", store::Handler::exists, (bucket, key)),
            route!(
                STORE,
                "list-keys",
                store::Handler::list_keys,
                (bucket, cursor)
            ),
            route!(
                ATOMICS,
                "increment",
                atomics::Handler::increment,
                (bucket, key, delta)
            ),
            route!(BATCH, "get-many", batch::Handler::get_many, (bucket, keys)),
            route!(BATCH, "set-many", batch::Handler::set_many, (bucket, pairs)),
            route!(
                BATCH,
                "delete-many",
                batch::Handler::delete_many,
                (bucket, keys)
            ),
        ];
        Ok(Self {
            invocations: futures::stream::select_all(routes),
            provider,
        })
    }

    /// Serves until [`KvProvider::stop`], then stops accepting, waits up to [`DRAIN_GRACE`]
    /// for in-flight calls and answers.
    pub async fn run(self) -> anyhow::Result<()> {
        let Self {
            provider,
            mut invocations,
        } = self;
        info!("serving {STORE}, {ATOMICS} and {BATCH}");
        let calls = TaskTracker::new();
        let ended = loop {
            tokio::select! {
                biased;
                () = provider.stopping() => break false,
                accepted = invocations.next() => match accepted {
                    Some((instance, func, Ok(call))) => {
                        calls.spawn(async move {
                            if let Err(err) = call.await {
                                warn!(instance, func, "invocation failed: {err:#}");
                            }
                        });
                    }
                    // No reply subject, or the transport could not set the call up.
                    Some((instance, func, Err(err))) => {
                        debug!(instance, func, "invocation refused: {err:#}");
                    }
                    None => break true,
                },
            }
        };
        // Dropping the accept streams unsubscribes: no new calls reach us from here on, and
        // other instances in the queue group take them.
        drop(invocations);
        calls.close();
        if !calls.is_empty() {
            info!(in_flight = calls.len(), "waiting for in-flight calls");
        }
        if tokio::time::timeout(DRAIN_GRACE, calls.wait())
            .await
            .is_err()
        {
            warn!(
                left = calls.len(),
                "in-flight calls did not finish within {DRAIN_GRACE:?}"
            );
        }
        provider.mark_drained();
        if ended {
            error!("every invocation subscription ended; the NATS connection is gone");
            return Err(anyhow!("invocation subscriptions ended"));
        }
        Ok(())
    }
}

/// Subscribes to one function and turns each invocation into a [`Call`]: decode the
/// parameters within the request bounds, run `handle`, encode the results.
async fn route<C, P, R, F, Fut>(
    client: &C,
    provider: &KvProvider,
    instance: &'static str,
    func: &'static str,
    handle: F,
) -> anyhow::Result<Invocations>
where
    C: Serve<Context = Option<Context>>,
    P: TupleDecode<C::Incoming> + Send + 'static,
    <P::Decoder as tokio_util::codec::Decoder>::Error: std::error::Error + Send + Sync + 'static,
    R: TupleEncode<C::Outgoing> + Answer + Send + 'static,
    <R::Encoder as tokio_util::codec::Encoder<R>>::Error: std::error::Error + Send + Sync + 'static,
    F: Fn(KvProvider, Option<Context>, P) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<R>> + Send + 'static,
{
    let no_async_params: Arc<[Box<[Option<usize>]>]> = Arc::from([]);
    let accepted = client
        .serve(instance, func, no_async_params)
        .await
        .with_context(|| format!("failed to subscribe to {instance}.{func}"))?;
    let provider = provider.clone();
    let operation = operation_name(func);
    Ok(Box::pin(accepted.map(move |accepted| {
        let call = accepted.map(|(cx, outgoing, incoming)| {
            let (provider, handle) = (provider.clone(), handle.clone());
            let started = Instant::now();
            let span = call_span(operation, instance, func, &cx);
            let answered = span.clone();
            Box::pin(
                async move {
                    let config = provider.config();
                    let params = tokio::time::timeout(
                        config.request_timeout,
                        read_params::<C, P>(incoming, config.max_request_bytes),
                    )
                    .await
                    .unwrap_or_else(|_| {
                        Err(anyhow!(
                            "parameters did not arrive within request_timeout_ms={}",
                            config.request_timeout.as_millis()
                        ))
                    });
                    let (results, outcome) = match params {
                        Ok(params) => {
                            let results = handle(provider, cx, params).await?;
                            let outcome = results.outcome();
                            (results, outcome)
                        }
                        // Tell the caller why, as an error value, rather than leave it to time out.
                        Err(err) => {
                            let refusal = format!("invalid {instance}.{func} invocation: {err:#}");
                            warn!("{refusal}");
                            let outcome = Outcome::Invalid(refusal.clone());
                            (R::refused(refusal), outcome)
                        }
                    };
                    outcome.record(&answered);
                    let sent = write_results::<C, R>(outgoing, results).await;
                    telemetry::metrics().call(operation, outcome.label(), started.elapsed());
                    sent
                }
                .instrument(span),
            ) as Call
        });
        (instance, func, call)
    })))
}

/// What every keyvalue function answers: `result<_, error>`.
pub trait Answer {
    /// The answer to an invocation we could not read.
    fn refused(message: String) -> Self;
    /// How the call went, for its span and metrics.
    fn outcome(&self) -> Outcome;
}

impl<T> Answer for (Result<T, store::Error>,) {
    fn refused(message: String) -> Self {
        (Err(store::Error::Other(message)),)
    }

    fn outcome(&self) -> Outcome {
        match &self.0 {
            Ok(_) => Outcome::Ok,
            Err(store::Error::AccessDenied) => Outcome::Denied,
            Err(store::Error::NoSuchStore) => Outcome::Error("no such store".into()),
            Err(store::Error::Other(message)) => Outcome::Error(message.clone()),
        }
    }
}

/// How a call went.
pub enum Outcome {
    /// Answered `ok`.
    Ok,
    /// Answered `access-denied`.
    Denied,
    /// Answered with an error, with the message the caller got.
    Error(String),
    /// Its parameters could not be read; answered with an error saying why.
    Invalid(String),
}

impl Outcome {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Denied => "denied",
            Outcome::Error(_) => "error",
            Outcome::Invalid(_) => "invalid",
        }
    }

    /// Puts the outcome on the call's span: an error status carries the caller's message.
    fn record(&self, span: &Span) {
        span.record("keyvalue.outcome", self.label());
        let message = match self {
            Outcome::Ok => return,
            Outcome::Denied => "access denied",
            Outcome::Error(message) | Outcome::Invalid(message) => message,
        };
        span.record("otel.status_code", "error");
        span.record("otel.status_description", message);
    }
}

/// The span name of a function: `keyvalue.get`, `keyvalue.set-many`, ….
fn operation_name(func: &str) -> &'static str {
    match func {
        "get" => "keyvalue.get",
        "set" => "keyvalue.set",
        "delete" => "keyvalue.delete",
        "exists" => "keyvalue.exists",
        "list-keys" => "keyvalue.list-keys",
        "increment" => "keyvalue.increment",
        "get-many" => "keyvalue.get-many",
        "set-many" => "keyvalue.set-many",
        "delete-many" => "keyvalue.delete-many",
        _ => "keyvalue.unknown",
    }
}

/// The span of one call, child of the caller's span when the invocation carries a W3C
/// `traceparent`. The parent is set before the span is first entered: with
/// tracing-opentelemetry 0.32 entering starts the span, and a started span's parent cannot be
/// changed any more.
fn call_span(
    operation: &'static str,
    instance: &'static str,
    func: &'static str,
    cx: &Option<Context>,
) -> Span {
    let span = tracing::info_span!(
        target: CALL_TARGET,
        "keyvalue",
        otel.name = operation,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
        rpc.system = "wrpc",
        rpc.service = instance,
        rpc.method = func,
        keyvalue.namespace = tracing::field::Empty,
        keyvalue.bucket = tracing::field::Empty,
        keyvalue.keys = tracing::field::Empty,
        keyvalue.bytes_in = tracing::field::Empty,
        keyvalue.bytes_out = tracing::field::Empty,
        keyvalue.outcome = tracing::field::Empty,
    );
    if !span.is_disabled() {
        if let Some(headers) = cx.as_ref().map(|cx| &cx.tracing) {
            if headers.contains_key("traceparent") {
                let parent = TraceContextPropagator::new().extract(headers);
                if let Err(err) = span.set_parent(parent) {
                    debug!(%err, "cannot parent the call span");
                }
            }
        }
    }
    span
}

/// Reads one invocation's parameters, refusing more than `max_bytes`.
async fn read_params<C, P>(incoming: C::Incoming, max_bytes: usize) -> anyhow::Result<P>
where
    C: Serve,
    P: TupleDecode<C::Incoming>,
    <P::Decoder as tokio_util::codec::Decoder>::Error: std::error::Error + Send + Sync + 'static,
{
    let limit = u64::try_from(max_bytes).unwrap_or(u64::MAX);
    let mut params = FramedRead::new(incoming.take(limit), P::Decoder::default());
    let decoded = params.try_next().await;
    if params.get_ref().limit() == 0 {
        return Err(anyhow!(
            "parameters are larger than max_request_bytes={max_bytes}"
        ));
    }
    decoded
        .context("failed to decode parameters")?
        .context("parameters ended before they were complete")
}

/// Writes the results and closes the result stream.
async fn write_results<C, R>(outgoing: C::Outgoing, results: R) -> anyhow::Result<()>
where
    C: Serve,
    R: TupleEncode<C::Outgoing>,
    <R::Encoder as tokio_util::codec::Encoder<R>>::Error: std::error::Error + Send + Sync + 'static,
{
    let mut framed = FramedWrite::new(outgoing, R::Encoder::default());
    framed
        .send(results)
        .await
        .context("failed to send results")?;
    framed
        .into_inner()
        .shutdown()
        .await
        .context("failed to close the result stream")
}
