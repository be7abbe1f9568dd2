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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use anyhow::{anyhow, Context as _};
use futures::{SinkExt as _, Stream, StreamExt as _};
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::codec::FramedWrite;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn, Instrument as _, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use wasmcloud_provider_sdk::Context;
use wrpc_transport::{Serve, TupleEncode};

use crate::bindings::exports::wrpc::keyvalue::{atomics, batch, store};
use crate::provider::KvProvider;
use crate::telemetry::{self, CALL_TARGET};
use crate::{budget, wire};

/// WIT instance names of what we export.
pub const STORE: &str = "wrpc:keyvalue/store@0.2.0-draft";
/// See [`STORE`].
pub const ATOMICS: &str = "wrpc:keyvalue/atomics@0.2.0-draft";
/// See [`STORE`].
pub const BATCH: &str = "wrpc:keyvalue/batch@0.2.0-draft";

/// How long a stop waits for in-flight calls.
pub const DRAIN_GRACE: Duration = Duration::from_secs(8);

/// After a stop, invocations are still taken until none arrived for this long…
const DRAIN_QUIET: Duration = Duration::from_millis(20);
/// …or for this long in all: the host kills a provider 300 ms after asking it to stop.
const DRAIN_ACCEPT: Duration = Duration::from_millis(100);

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
        // Cancelled when the grace period is over: a call still running then is dropped at
        // its next await, before the final snapshot, so no call is answered after it.
        let abandon = CancellationToken::new();
        let start = |accepted: Option<Accepted>| match accepted {
            Some((instance, func, Ok(call))) => {
                let abandon = abandon.clone();
                calls.spawn(async move {
                    tokio::select! {
                        biased;
                        () = abandon.cancelled() => {
                            warn!(instance, func, "call abandoned: it did not finish before the stop");
                        }
                        done = call => if let Err(err) = done {
                            warn!(instance, func, "invocation failed: {err:#}");
                        }
                    }
                });
                true
            }
            // No reply subject, or the transport could not set the call up.
            Some((instance, func, Err(err))) => {
                debug!(instance, func, "invocation refused: {err:#}");
                true
            }
            None => false,
        };
        let ended = loop {
            tokio::select! {
                biased;
                () = provider.stopping() => break false,
                accepted = invocations.next() => if !start(accepted) { break true },
            }
        };
        // Invocations NATS already delivered to this process would be lost with the
        // subscriptions: take what keeps arriving until it pauses for DRAIN_QUIET (bounded by
        // DRAIN_ACCEPT, since callers may not pause).
        if !ended {
            let until = tokio::time::Instant::now() + DRAIN_ACCEPT;
            while let Ok(Ok(accepted)) = tokio::time::timeout_at(
                until,
                tokio::time::timeout(DRAIN_QUIET, invocations.next()),
            )
            .await
            {
                if !start(accepted) {
                    break;
                }
            }
        }
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
                "in-flight calls did not finish within {DRAIN_GRACE:?}; abandoning them"
            );
            abandon.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(1), calls.wait()).await;
        }
        provider.mark_drained();
        if ended {
            error!("every invocation subscription ended; the NATS connection is gone");
            return Err(anyhow!("invocation subscriptions ended"));
        }
        Ok(())
    }
}

/// Subscribes to one function and turns each invocation into a [`Call`]: admit it into the
/// in-flight budget, read and decode the parameters within the request bounds, run `handle`,
/// encode the results.
async fn route<C, P, R, F, Fut>(
    client: &C,
    provider: &KvProvider,
    instance: &'static str,
    func: &'static str,
    handle: F,
) -> anyhow::Result<Invocations>
where
    C: Serve<Context = Option<Context>>,
    P: wire::Params,
    R: TupleEncode<C::Outgoing> + Answer + Send + 'static,
    <R::Encoder as tokio_util::codec::Encoder<R>>::Error: std::error::Error + Send + Sync + 'static,
    F: Fn(KvProvider, Option<Context>, P) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<R>> + Send + 'static,
{
    // The keyvalue functions take no `future`/`stream` parameters: no async parameter paths.
    let no_async_params: Arc<[Box<[Option<usize>]>]> = Arc::from([]);
    let accepted = client
        .serve(instance, func, no_async_params)
        .await
        .with_context(|| format!("failed to subscribe to {instance}.{func}"))?;
    let provider = provider.clone();
    let operation = operation_name(func);
    let shape = Arc::new(P::shape());
    Ok(Box::pin(accepted.map(move |accepted| {
        let call = accepted.map(|(cx, outgoing, incoming)| {
            let (provider, handle, shape) = (provider.clone(), handle.clone(), shape.clone());
            let started = Instant::now();
            let span = call_span(operation, instance, func, &cx);
            let answered = span.clone();
            Box::pin(
                async move {
                    let finish = |results: R, outcome: Outcome| async move {
                        outcome.record(&answered);
                        let sent = write_results::<C, R>(outgoing, results).await;
                        telemetry::metrics().call(operation, outcome.label(), started.elapsed());
                        sent
                    };
                    let caller = match provider.budget_share(&cx) {
                        Ok(caller) => caller,
                        Err(denied) => {
                            let results = R::denied(denied);
                            let outcome = results.outcome();
                            return finish(results, outcome).await;
                        }
                    };
                    let mut call = match provider.budget().admit(&caller) {
                        Ok(call) => call,
                        Err(refusal) => {
                            telemetry::metrics().rejection(refusal.limit());
                            let message = refusal.to_string();
                            return finish(R::refused(message.clone()), Outcome::Error(message))
                                .await;
                        }
                    };
                    let config = provider.config();
                    let params = tokio::time::timeout(
                        config.request_timeout,
                        read_params::<P, _>(incoming, &shape, config.max_request_bytes, &mut call),
                    )
                    .await
                    .unwrap_or_else(|_| {
                        Err(anyhow!(
                            "parameters did not arrive within request_timeout_ms={}",
                            config.request_timeout.as_millis()
                        ))
                    });
                    // The call's bytes stay taken until its answer is sent.
                    budget::scope(call, async move {
                        match params {
                            Ok(params) => {
                                let results = handle(provider, cx, params).await?;
                                let outcome = results.outcome();
                                finish(results, outcome).await
                            }
                            // Tell the caller why, as an error value, rather than leave it to
                            // time out.
                            Err(err) => {
                                if let Some(refusal) = err.downcast_ref::<budget::Refusal>() {
                                    telemetry::metrics().rejection(refusal.limit());
                                }
                                let refusal =
                                    format!("invalid {instance}.{func} invocation: {err:#}");
                                warn_invalid(&refusal);
                                finish(R::refused(refusal.clone()), Outcome::Invalid(refusal)).await
                            }
                        }
                    })
                    .await
                }
                .instrument(span),
            ) as Call
        });
        (instance, func, call)
    })))
}

/// Logs an unreadable invocation: a warning at most once a second (saying how many were not
/// logged since), the rest at debug. A flood of garbage must not become a flood of logs.
fn warn_invalid(refusal: &str) {
    static LAST_WARNED_MS: AtomicU64 = AtomicU64::new(0);
    static SUPPRESSED: AtomicU64 = AtomicU64::new(0);
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let now = EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1000;
    let last = LAST_WARNED_MS.load(Ordering::Relaxed);
    if now >= last + 1000
        && LAST_WARNED_MS
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        let suppressed = SUPPRESSED.swap(0, Ordering::Relaxed);
        if suppressed > 0 {
            warn!("{refusal} ({suppressed} more unreadable invocations since the last warning)");
        } else {
            warn!("{refusal}");
        }
    } else {
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
        debug!("{refusal}");
    }
}

/// What every keyvalue function answers: `result<_, error>`.
pub trait Answer {
    /// The answer to an invocation we could not read.
    fn refused(message: String) -> Self;
    /// The answer to a caller refused before its parameters were read.
    fn denied(error: store::Error) -> Self;
    /// How the call went, for its span and metrics.
    fn outcome(&self) -> Outcome;
}

impl<T> Answer for (Result<T, store::Error>,) {
    fn refused(message: String) -> Self {
        (Err(store::Error::Other(message)),)
    }

    fn denied(error: store::Error) -> Self {
        (Err(error),)
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

/// Reads one invocation's parameters: as they arrive, into a buffer that grows with what
/// arrived (never with what the parameters declare), taking each growth from the call's
/// budget; refuses more than `max_bytes`. Decodes them once [`wire::Scanner`] finds them
/// complete, without waiting for the caller's end of parameters.
async fn read_params<P, I>(
    mut incoming: I,
    shape: &wire::Shape,
    max_bytes: usize,
    call: &mut budget::Call,
) -> anyhow::Result<P>
where
    P: wire::Params,
    I: tokio::io::AsyncRead + Unpin,
{
    let mut buf: Vec<u8> = Vec::new();
    let mut scanner = wire::Scanner::new(shape, max_bytes);
    loop {
        if buf.len() == buf.capacity() {
            // Double, from 4 KiB, up to one byte past the bound (which tells "too large").
            let capacity = buf.capacity();
            let grown = (capacity.saturating_mul(2).max(4096)).min(max_bytes.saturating_add(1));
            call.take(grown - capacity)?;
            buf.reserve_exact(grown - buf.len());
        }
        let read = incoming
            .read_buf(&mut buf)
            .await
            .context("failed to read parameters")?;
        if buf.len() > max_bytes {
            return Err(anyhow!(
                "parameters are larger than max_request_bytes={max_bytes}"
            ));
        }
        if scanner.advance(&buf)? {
            // Decoding turns each list element into a struct of its own: take that too.
            let structs = scanner.elements().saturating_mul(DECODED_ELEMENT_BYTES);
            call.take(usize::try_from(structs).unwrap_or(usize::MAX))?;
            return Ok(wire::decode::<P>(Bytes::from(buf))?);
        }
        if read == 0 {
            return Err(anyhow!("parameters ended before they were complete"));
        }
    }
}

/// What a decoded list element costs besides its bytes: a `String` or `(String, Bytes)`
/// (24 to 56 bytes), its allocation's header, and the engine's per-key work (a `set-many`'s
/// map of the latest value of each key, a `get-many`'s answer slot).
const DECODED_ELEMENT_BYTES: u64 = 128;

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
