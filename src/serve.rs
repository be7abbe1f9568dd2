//! The data plane: accepting wRPC invocations and running each in a task of its own.
//!
//! The routing table ([`routes`]) is the one list of served functions: each with the generated
//! `Handler` trait method it goes to, and the operation name its spans and metrics carry (a
//! test compares it with the exports of the WIT world); the wire under it is ours ([`crate::transport`]), not
//! `wrpc-transport-nats`'s. The accept loop only accepts: each invocation's handshake,
//! parameter reading (bounded in time by `request_timeout_ms` and in size by
//! `max_request_bytes`), handler and answer run in the invocation's own task, so one caller
//! that never completes its parameters holds up no one else (the generated `serve` decodes
//! inside the accept stream and stops serving a function for good after one such caller). On a
//! stop, accepting ends, then in-flight calls finish.
//!
//! A reader following one `set`: NATS subject `{lattice}.{provider}.wrpc.0.0.1.
//! wrpc:keyvalue/store@0.2.0-draft.set` → [`Server::run`] accepts → the route's task
//! ([`serve_call`]) handshakes and decodes `(bucket, key, value)` → `store::Handler::set` in
//! `provider.rs` → `Engine::set` in the store crate (`store/src/engine.rs`) → results published
//! on the caller's `….results` subject.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt as _};
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tokio_util::codec::Encoder as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn, Instrument as _, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use wasmcloud_provider_sdk::Context;
use wrpc_transport::TupleEncode;

use crate::bindings::exports::wrpc::keyvalue::{atomics, batch, store};
use crate::client::NoAsync;
use crate::config::Serving;
use crate::provider::KvProvider;
use crate::telemetry::{self, CALL_TARGET};
use crate::transport::{self, Invocation, Transport};
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

/// Invocations that may be between their arrival and their admission at once.
const MAX_ACCEPTING: usize = 1024;

type Call = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;
/// Runs one invocation of a route's function, under the config it arrived with.
type Serve = Arc<dyn Fn(Arrived, Serving) -> Call + Send + Sync>;
type Invocations = Pin<Box<dyn Stream<Item = (usize, async_nats::Message)> + Send>>;

/// An invocation as it arrived: its message, the transport it came through, and its place
/// among those being accepted (given back once it is accepted).
struct Arrived {
    via: Arc<Transport>,
    msg: async_nats::Message,
    permit: tokio::sync::OwnedSemaphorePermit,
}

/// One served function.
struct Route {
    instance: &'static str,
    func: &'static str,
    serve: Serve,
}

/// The subscribed functions, ready to serve.
pub struct Server {
    provider: KvProvider,
    transport: Arc<Transport>,
    /// The task routing parameters to invocations.
    routing: tokio::task::JoinHandle<()>,
    routes: Arc<[Route]>,
    invocations: futures::stream::SelectAll<Invocations>,
}

impl Server {
    /// Subscribes to every function of store, atomics and batch under `prefix`
    /// (`{lattice}.{provider_key}`), in the queue group `prefix` as every instance of this
    /// provider does. Calls that arrive before [`Server::run`] wait in their subscriptions.
    pub async fn subscribe(
        nats: async_nats::Client,
        prefix: &str,
        provider: KvProvider,
    ) -> anyhow::Result<Self> {
        let routes = routes(&provider);
        let (transport, routing) = Transport::start(nats.clone()).await?;
        let mut invocations = Vec::with_capacity(routes.len());
        for (index, route) in routes.iter().enumerate() {
            let subject = transport::invocation_subject(prefix, route.instance, route.func);
            let sub = nats
                .queue_subscribe(subject.clone(), prefix.to_string())
                .await
                .with_context(|| format!("failed to subscribe to {subject}"))?;
            invocations.push(Box::pin(sub.map(move |msg| (index, msg))) as Invocations);
        }
        Ok(Self {
            provider,
            transport,
            routing,
            routes,
            invocations: futures::stream::select_all(invocations),
        })
    }

    /// Serves until [`Shutdown::stop`](crate::shutdown::Shutdown::stop), then stops accepting, waits up to [`DRAIN_GRACE`]
    /// for in-flight calls and answers.
    pub async fn run(self) -> anyhow::Result<()> {
        let Self {
            provider,
            transport,
            routing,
            routes,
            mut invocations,
        } = self;
        info!("serving {STORE}, {ATOMICS} and {BATCH}");
        let calls = TaskTracker::new();
        // Cancelled when the grace period is over: a call still running then is dropped at
        // its next await, before the final snapshot, so no call is answered after it.
        let abandon = CancellationToken::new();
        // Invocations between arrival and admission hold their first message and a task:
        // at most MAX_ACCEPTING of them; past that the loop waits (and NATS buffers).
        let accepting = Arc::new(tokio::sync::Semaphore::new(MAX_ACCEPTING));
        let start = |accepted: Option<(usize, async_nats::Message)>,
                     permit: tokio::sync::OwnedSemaphorePermit| {
            let Some((index, msg)) = accepted else {
                return false;
            };
            let (abandon, transport, provider) =
                (abandon.clone(), transport.clone(), provider.clone());
            let routes = Arc::clone(&routes);
            calls.spawn(async move {
                let route = &routes[index];
                let (instance, func) = (route.instance, route.func);
                // This task stays small: the route's one boxed future holds the rest (its
                // accepting, reading, handling and answering, one after another).
                let arrived = Arrived {
                    via: transport,
                    msg,
                    permit,
                };
                let call = (route.serve)(arrived, provider.serving());
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
        };
        let ended = loop {
            tokio::select! {
                biased;
                () = provider.shutdown_handle().stopping() => break false,
                accepted = invocations.next() => {
                    let Ok(permit) = Arc::clone(&accepting).acquire_owned().await else {
                        break true;
                    };
                    if !start(accepted, permit) {
                        break true;
                    }
                }
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
                let Ok(permit) = Arc::clone(&accepting).acquire_owned().await else {
                    break;
                };
                if !start(accepted, permit) {
                    break;
                }
            }
        }
        // Dropping the subscriptions unsubscribes: no new calls reach us from here on, and
        // other instances in the queue group take them.
        drop(invocations);
        transport.hurry();
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
        routing.abort();
        let figures = transport::stats().figures();
        info!(
            handshakes_resent = figures.resent,
            recovered = figures.recovered,
            spurious = figures.spurious,
            unconfirmed = figures.unconfirmed,
            "covered for callers that lost handshakes"
        );
        provider.shutdown_handle().mark_drained();
        if ended {
            error!("every invocation subscription ended; the NATS connection is gone");
            return Err(anyhow!("invocation subscriptions ended"));
        }
        Ok(())
    }
}

/// The routing table: every function we serve, the generated `Handler` method it calls, and
/// its operation name (`keyvalue.<function>`, on spans and metrics).
fn routes(provider: &KvProvider) -> Arc<[Route]> {
    // `served!(instance, "function", handler, (params))` is one row. A macro only because each
    // row's parameters are a different tuple type, destructured into the handler's arguments.
    // The handlers answer a bare `Result`; the wire's answer is the function's results as a
    // tuple, and these functions have one result each: hence the 1-tuple `(r,)`.
    macro_rules! served {
        ($instance:expr, $func:literal, $handler:path, ($($param:ident),+)) => {
            Route::new(
                provider,
                ($instance, $func, concat!("keyvalue.", $func)),
                |p, cx, ($($param),+)| async move { $handler(&p, cx, $($param),+).await.map(|r| (r,)) },
            )
        };
    }
    Arc::from([
        served!(STORE, "get", store::Handler::get, (bucket, key)),
        served!(STORE, "set", store::Handler::set, (bucket, key, value)),
        served!(STORE, "delete", store::Handler::delete, (bucket, key)),
        served!(STORE, "exists", store::Handler::exists, (bucket, key)),
        served!(
            STORE,
            "list-keys",
            store::Handler::list_keys,
            (bucket, cursor)
        ),
        served!(
            ATOMICS,
            "increment",
            atomics::Handler::increment,
            (bucket, key, delta)
        ),
        served!(BATCH, "get-many", batch::Handler::get_many, (bucket, keys)),
        served!(BATCH, "set-many", batch::Handler::set_many, (bucket, pairs)),
        served!(
            BATCH,
            "delete-many",
            batch::Handler::delete_many,
            (bucket, keys)
        ),
    ])
}

impl Route {
    /// The route of one function: how its accepted invocations are served.
    fn new<P, R, F, Fut>(
        provider: &KvProvider,
        (instance, func, operation): (&'static str, &'static str, &'static str),
        handle: F,
    ) -> Route
    where
        P: wire::Params,
        R: Encoded + Answer + Send + 'static,
        F: Fn(KvProvider, Option<Context>, P) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<R>> + Send + 'static,
    {
        let provider = provider.clone();
        let shape = Arc::new(P::shape());
        Route {
            instance,
            func,
            serve: Arc::new(move |arrived, config| {
                let call = serve_call(
                    provider.clone(),
                    arrived,
                    config,
                    Arc::clone(&shape),
                    handle.clone(),
                    (operation, instance, func),
                );
                Box::pin(call) as Call
            }),
        }
    }
}

/// Serves one invocation: handshake, admit it into the in-flight budget, read and decode the
/// parameters within the request bounds, run `handle`, answer.
async fn serve_call<P, R, F, Fut>(
    provider: KvProvider,
    Arrived { via, msg, permit }: Arrived,
    config: Serving,
    shape: Arc<wire::Shape>,
    handle: F,
    (operation, instance, func): (&'static str, &'static str, &'static str),
) -> anyhow::Result<()>
where
    P: wire::Params,
    R: Encoded + Answer + Send + 'static,
    F: Fn(KvProvider, Option<Context>, P) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<R>> + Send + 'static,
{
    // A linearizable replicated read learns how far to catch up while its handshake runs.
    let early = match func {
        "get" | "exists" | "get-many" | "list-keys" => {
            provider.replica().and_then(|replica| replica.begin_read())
        }
        _ => None,
    };
    let accepted = via
        .accept(
            msg,
            config.max_request_bytes,
            config.request_timeout,
            config.handshake_retry_min,
        )
        .await;
    drop(permit);
    let Some(mut invocation) = accepted else {
        debug!(instance, func, "invocation without a reply subject ignored");
        return Ok(());
    };
    let cx = invocation.headers().map(transport::context);
    let started = Instant::now();
    let span = call_span(operation, instance, func, &cx);
    let answered = span.clone();
    // Records how the call went and encodes the answer.
    let finish = move |results: R, outcome: Outcome| {
        outcome.record(&answered);
        let encoded = results.encoded();
        telemetry::metrics().call(operation, outcome.label(), started.elapsed());
        encoded
    };
    async move {
        // Refused before admission: answered holding nothing of the budget.
        let caller = match provider.budget_share(&cx) {
            Ok(caller) => caller,
            Err(denied) => {
                let results = R::denied(denied);
                let outcome = results.outcome();
                // Boxed, as the other refusal: rare paths keep every call's future small.
                Box::pin(invocation.answer_refused(finish(results, outcome)?)).await;
                return Ok(());
            }
        };
        let mut call = match provider.budget().admit(&caller) {
            Ok(call) => call,
            Err(refusal) => {
                telemetry::metrics().rejection(refusal.limit());
                let message = refusal.to_string();
                let answer = finish(R::refused(message.clone()), Outcome::Error(message))?;
                Box::pin(invocation.answer_refused(answer)).await;
                return Ok(());
            }
        };
        let params = read_params::<P>(&mut invocation, &shape, config.max_request_bytes, &mut call)
            .await
            .map_err(|err| match invocation.expired() {
                true => anyhow!(
                    "parameters did not arrive within request_timeout_ms={}",
                    config.request_timeout.as_millis()
                ),
                false => err,
            });
        // The call's bytes and its slot stay taken until its caller has its answer.
        budget::scope(call, async move {
            let (results, outcome) = match params {
                Ok(params) => {
                    let handled = handle(provider, cx, params);
                    let results = crate::replica::with_early_barrier(early, handled).await?;
                    let outcome = results.outcome();
                    (results, outcome)
                }
                // Tell the caller why, as an error value, rather than leave it to time out.
                Err(err) => {
                    if let Some(refusal) = err.downcast_ref::<budget::Refusal>() {
                        telemetry::metrics().rejection(refusal.limit());
                    }
                    let refusal = format!("invalid {instance}.{func} invocation: {err:#}");
                    warn_invalid(&refusal);
                    (R::refused(refusal.clone()), Outcome::Invalid(refusal))
                }
            };
            let answer = finish(results, outcome)?;
            // While its caller confirms, the call holds its slot and the answer it may send
            // again, not its parameters.
            budget::keep_only(answer.len());
            invocation.answer(answer).await;
            Ok(())
        })
        .await
    }
    .instrument(span)
    .await
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

/// Reads one invocation's parameters within `max_bytes`, taking what they hold from the call's
/// budget: those that came with the invocation are decoded in place when they are complete
/// (the usual case); otherwise they are gathered, as they arrive, into a buffer that grows with
/// what arrived (never with what the parameters declare). Decodes them once [`wire::Scanner`]
/// finds them complete, without waiting for the caller's end of parameters.
async fn read_params<P: wire::Params>(
    invocation: &mut Invocation,
    shape: &wire::Shape,
    max_bytes: usize,
    call: &mut budget::Call,
) -> anyhow::Result<P> {
    let too_large = || anyhow!("parameters are larger than max_request_bytes={max_bytes}");
    let mut scanner = wire::Scanner::new(shape, max_bytes);
    let Some(first) = invocation.params().await? else {
        return Err(anyhow!("parameters ended before they were complete"));
    };
    if first.len() > max_bytes {
        return Err(too_large());
    }
    call.take(first.len())?;
    if scanner.advance(&first)? {
        return decode(first, &scanner, call);
    }
    let mut charged = first.len();
    let mut buf: Vec<u8> = Vec::with_capacity(charged);
    buf.extend_from_slice(&first);
    drop(first);
    loop {
        let Some(chunk) = invocation.params().await? else {
            return Err(anyhow!("parameters ended before they were complete"));
        };
        let needs = buf.len().saturating_add(chunk.len());
        if needs > max_bytes {
            return Err(too_large());
        }
        if needs > buf.capacity() {
            // Double, from 4 KiB, up to the bound.
            let grown = needs
                .max(buf.capacity().saturating_mul(2))
                .max(4096)
                .min(max_bytes);
            call.take(grown.saturating_sub(charged))?;
            buf.reserve_exact(grown - buf.len());
            charged = charged.max(grown);
        }
        buf.extend_from_slice(&chunk);
        if scanner.advance(&buf)? {
            return decode(Bytes::from(buf), &scanner, call);
        }
    }
}

/// Decodes complete parameters, first taking what decoding them costs besides their bytes.
fn decode<P: wire::Params>(
    buf: Bytes,
    scanner: &wire::Scanner<'_>,
    call: &mut budget::Call,
) -> anyhow::Result<P> {
    // Decoding turns each list element into a struct of its own: take that too.
    let structs = scanner.elements().saturating_mul(DECODED_ELEMENT_BYTES);
    call.take(usize::try_from(structs).unwrap_or(usize::MAX))?;
    Ok(wire::decode::<P>(buf)?)
}

/// What a decoded list element costs besides its bytes: a `String` or `(String, Bytes)`
/// (24 to 56 bytes), its allocation's header, and the engine's per-key work (a `set-many`'s
/// map of the latest value of each key, a `get-many`'s answer slot).
const DECODED_ELEMENT_BYTES: u64 = 128;

/// An answer encoded for the wire (the keyvalue functions have no asynchronous results).
pub trait Encoded {
    /// The encoded bytes.
    fn encoded(self) -> anyhow::Result<Bytes>;
}

impl<R> Encoded for R
where
    R: TupleEncode<NoAsync>,
    <R::Encoder as tokio_util::codec::Encoder<R>>::Error: std::error::Error + Send + Sync + 'static,
{
    fn encoded(self) -> anyhow::Result<Bytes> {
        let mut buf = BytesMut::new();
        R::Encoder::default()
            .encode(self, &mut buf)
            .context("failed to encode results")?;
        Ok(buf.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every function the WIT world `provider` exports is served, and nothing else: a function
    /// added to `wit/` cannot go unserved.
    #[test]
    fn the_routing_table_serves_exactly_the_worlds_exports() {
        let mut resolve = wit_parser::Resolve::default();
        let wit = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("wit");
        let (package, _) = resolve.push_path(wit).expect("wit/ parses");
        let world = resolve
            .select_world(&[package], Some("provider"))
            .expect("wit/ has the world `provider`");
        let mut exported = Vec::new();
        for item in resolve.worlds[world].exports.values() {
            let wit_parser::WorldItem::Interface { id, .. } = item else {
                panic!("the world exports something that is not an interface");
            };
            let instance = resolve.id_of(*id).expect("exported interfaces are named");
            for func in resolve.interfaces[*id].functions.keys() {
                exported.push(format!("{instance}.{func}"));
            }
        }
        let served: Vec<String> = routes(&KvProvider::default())
            .iter()
            .map(|route| format!("{}.{}", route.instance, route.func))
            .collect();
        exported.sort();
        let mut sorted = served.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), served.len(), "a function is routed twice");
        assert_eq!(sorted, exported);
    }
}
