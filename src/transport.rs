//! The serving side of wRPC over NATS (protocol `wrpc.0.0.1`), on the NATS connection the SDK
//! gives us. It replaces `wrpc-transport-nats` 0.29's `Serve`, and covers for what that
//! version's client (the one inside every wasmCloud 1.x host) loses.
//!
//! # The protocol, as the 0.29 and 0.31 clients speak it
//! 1. The caller subscribes its reply subject `R` (the handshake) and `R.results`, then
//!    publishes the invocation to `{prefix}.wrpc.0.0.1.{instance}.{func}` with reply subject
//!    `R`, its headers (`source-id`, `link-name`, `traceparent`) and as much of the encoded
//!    parameters as fits one message.
//! 2. The server answers the *handshake*: an empty message to `R` whose reply subject is the
//!    server's own subject `S`.
//! 3. On the handshake, the caller publishes the rest of the parameters to `S.params` and
//!    closes them with an empty message there (*end of parameters*).
//! 4. The server publishes the encoded results to `R.results`, closed by an empty message.
//!
//! Asynchronous (`future`/`stream`) parameters and results travel on indexed subjects
//! (`S.params.0`, `R.results.1.2`); no keyvalue function has any, so a chunk on such a subject
//! fails the call with an error saying so.
//!
//! # What the host's client drops, and how we cover for it
//! The 0.29 client routes everything that arrives on its inbox through one task that takes
//! "subscribe `R`" commands and inbox messages in an unbiased `select!`: a handshake that
//! arrives before that task applied the command for `R` is thrown away ("drop message with no
//! subscriber" at debug level), and results published right after it can go the same way. The
//! caller then waits on its handshake until it gives up (10 s in the host), holding a
//! component instance all that time. Messages on one connection arrive in the order they were
//! published, and the caller's task applies its subscriptions in one batch, so of what we send
//! a prefix may be lost, never a message in the middle. Hence:
//!
//! - The results go out as soon as they are ready (no added latency), in one message when they
//!   fit; only the closing empty message waits for the caller's end of parameters, which
//!   proves its subscriptions are live (a lost closing message before lost results would
//!   otherwise read as "no results").
//! - If nothing has come back from the caller after a retransmission timeout (adaptive:
//!   smoothed handshake round trip plus four deviations, as TCP computes it, at least
//!   `handshake_retry_min_ms`, doubling on each retry, bounded by the call's
//!   `request_timeout_ms`), the handshake is published again, followed by a copy of the
//!   one-message results when they are ready (marked with a `keyvalue-copy` header, which
//!   wRPC readers ignore). A caller that missed the first handshake proceeds on the copy and
//!   reads the results. A caller that had them already has read exactly one value (the
//!   keyvalue functions have no asynchronous results, and a wRPC result stream carries one
//!   value) and left; a copy it never reads is dropped with its subscription. Results too
//!   large for one message are held until the end of parameters, so no copy of them exists.
//! - Each handshake copy names its own reply subject, so what the caller answers tells which
//!   copy it got: a caller answering copy 1 or later lost the first handshake (counted as
//!   recovered), one answering copy 0 after we resent was only slow (counted as spurious),
//!   and its round trip is a clean sample for the timeout.
//! - The cost of a copy the caller did not need: the 0.29 client keeps one handshake in its
//!   queue, and its inbox task waits while a second one arrives before the caller took the
//!   first. That is why the shortest timeout is well above a busy host's scheduling delay.
//!
//! On our side the same race cannot happen: an invocation's `S.params` is entered in the
//! routing table before its handshake is published, and one task routes `{inbox}.>` without
//! ever waiting on a call. `S` carries a per-call secret, so nobody who did not get the
//! handshake can send parameters (or an end of parameters) into someone else's call.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use async_nats::{HeaderMap, Message, Subject};
use bytes::Bytes;
use dashmap::DashMap;
use futures::StreamExt as _;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// The wRPC protocol version in every invocation subject.
pub const PROTOCOL: &str = "wrpc.0.0.1";

/// The longest wait between two handshakes.
const MAX_RTO: Duration = Duration::from_secs(1);
/// Handshakes sent again at most this many times per call. With one results message per
/// handshake, a caller's result queue (16 messages in 0.29) never fills.
const MAX_RESENDS: u32 = 8;
/// Calls refused before admission hold nothing of the budget; at most this many of them wait
/// for their callers' confirmations at once (the rest are answered without waiting).
const MAX_REFUSED_WAITING: usize = 1024;
/// The header that marks a copy of results sent again with a repeated handshake.
pub const COPY_HEADER: &str = "keyvalue-copy";

/// What the transport did to cover for callers, since the process started.
#[derive(Debug, Default)]
pub struct Stats {
    /// Handshakes published again because the caller's end of parameters was late.
    pub handshakes_resent: AtomicU64,
    /// Calls whose caller answered a resent handshake: it had lost the first.
    pub recovered: AtomicU64,
    /// Calls whose caller answered the first handshake after we had resent it.
    pub spurious: AtomicU64,
    /// Calls whose caller never confirmed the handshake within the call's deadline.
    pub unconfirmed: AtomicU64,
}

static STATS: Stats = Stats {
    handshakes_resent: AtomicU64::new(0),
    recovered: AtomicU64::new(0),
    spurious: AtomicU64::new(0),
    unconfirmed: AtomicU64::new(0),
};

/// The transport's counters.
pub fn stats() -> &'static Stats {
    &STATS
}

/// The transport's counters at one moment. Shown in the health message as "N handshakes
/// resent, N calls recovered, N spurious, N unconfirmed" (its `Display`), and read back from it
/// by tools and tests ([`Figures::read`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Figures {
    pub resent: u64,
    pub recovered: u64,
    pub spurious: u64,
    pub unconfirmed: u64,
}

/// The words after each figure in the health message, in the order of [`Figures::values`].
const FIGURE_WORDS: [&str; 4] = [
    "handshakes resent",
    "calls recovered",
    "spurious",
    "unconfirmed",
];

impl Stats {
    /// The counters now.
    pub fn figures(&self) -> Figures {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Figures {
            resent: load(&self.handshakes_resent),
            recovered: load(&self.recovered),
            spurious: load(&self.spurious),
            unconfirmed: load(&self.unconfirmed),
        }
    }
}

impl Figures {
    fn values(self) -> [u64; 4] {
        [self.resent, self.recovered, self.spurious, self.unconfirmed]
    }

    fn from_values([resent, recovered, spurious, unconfirmed]: [u64; 4]) -> Self {
        Self {
            resent,
            recovered,
            spurious,
            unconfirmed,
        }
    }

    /// Reads the figures out of a health message.
    pub fn read(health: &str) -> Option<Self> {
        let (_, figures) = health.split_once("transport: ")?;
        let mut parts = figures.split(", ");
        let mut values = [0; 4];
        for (value, what) in values.iter_mut().zip(FIGURE_WORDS) {
            *value = parts.next()?.strip_suffix(what)?.trim().parse().ok()?;
        }
        Some(Self::from_values(values))
    }

    /// What was counted between `earlier` and these (none where a counter went back, as when
    /// the provider restarted).
    pub fn since(self, earlier: Self) -> Self {
        let (now, then) = (self.values(), earlier.values());
        Self::from_values(std::array::from_fn(|i| now[i].saturating_sub(then[i])))
    }
}

impl std::ops::Add for Figures {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        let (a, b) = (self.values(), other.values());
        Self::from_values(std::array::from_fn(|i| a[i].saturating_add(b[i])))
    }
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (value, what)) in self.values().iter().zip(FIGURE_WORDS).enumerate() {
            let separator = if i == 0 { "" } else { ", " };
            write!(f, "{separator}{value} {what}")?;
        }
        Ok(())
    }
}

/// The invocation subject of `instance.func` under `prefix` (`{lattice}.{provider_key}`).
pub fn invocation_subject(prefix: &str, instance: &str, func: &str) -> String {
    format!("{prefix}.{PROTOCOL}.{instance}.{func}")
}

/// Parameters that arrived for one invocation after its handshake.
#[derive(Debug)]
enum Chunk {
    Data(Bytes),
    /// The caller's end of parameters.
    End,
    /// More bytes than the invocation may receive arrived; the rest are dropped.
    Overflow,
    /// A chunk on an indexed (asynchronous) parameter subject.
    Nested,
}

/// A chunk, the handshake copy the caller answered, and when it arrived.
#[derive(Debug)]
struct Arrival {
    chunk: Chunk,
    copy: u32,
    at: Instant,
}

/// What the routing task hands one invocation: a queue it never waits on, and a wake-up. (A
/// tokio channel allocates a block of 32 slots when it is made, 2 KiB of these on every call,
/// where most calls receive one message: large enough to take malloc's slow path each time,
/// as a profile of small sets showed.)
#[derive(Debug, Default)]
struct Arrivals {
    queue: std::sync::Mutex<VecDeque<Arrival>>,
    ready: tokio::sync::Notify,
}

impl Arrivals {
    fn push(&self, arrival: Arrival) {
        self.queue
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .push_back(arrival);
        self.ready.notify_one();
    }

    /// The next arrival, waiting for one. Cancel-safe: an arrival is only taken when returned.
    async fn next(&self) -> Arrival {
        // A caller streaming many small chunks keeps the queue full: spend the task's budget as
        // a channel's `recv` does, so that its task yields now and then instead of holding its
        // worker thread (and the timers and calls queued on it).
        tokio::task::coop::consume_budget().await;
        loop {
            let next = self
                .queue
                .lock()
                .unwrap_or_else(|poison| poison.into_inner())
                .pop_front();
            if let Some(arrival) = next {
                return arrival;
            }
            // A push between the check and here leaves a permit: this returns at once.
            self.ready.notified().await;
        }
    }
}

/// An open invocation in the routing table.
#[derive(Debug)]
struct Open {
    chunks: Arc<Arrivals>,
    /// The secret in the invocation's subjects.
    secret: u64,
    /// Bytes this invocation may still receive.
    room: usize,
    /// An overflow or an indexed chunk was passed on: nothing more is.
    failed: bool,
    /// The end of parameters was passed on: nothing more is.
    ended: bool,
}

/// What one queued parameter message costs besides its bytes: its `Arrival` (56 bytes) in a
/// queue that grows by doubling and keeps its capacity while the call lasts.
const CHUNK_COST: usize = 128;

/// The transport shared by the routing task and every invocation.
#[derive(Debug)]
pub struct Transport {
    nats: async_nats::Client,
    /// Our inbox: invocation `n` with secret `s` receives its parameters on
    /// `{inbox}.{n}.{s}.{copy}.params`, `copy` naming the handshake the caller answered.
    inbox: String,
    open: DashMap<u64, Open>,
    next_id: AtomicU64,
    /// Keys of the per-call secrets (random for each process).
    secrets: std::collections::hash_map::RandomState,
    rto: Rto,
    /// Calls refused before admission now waiting for their callers' confirmation.
    refused_waiting: AtomicUsize,
    /// Cancelled when the provider stops: answered calls then wait at most [`STOP_WAIT`] more
    /// for their caller's confirmation.
    hurry: CancellationToken,
}

/// After a stop, how long an answered call still waits for its caller's end of parameters.
const STOP_WAIT: Duration = Duration::from_millis(50);

impl Transport {
    /// Subscribes our inbox and starts routing what arrives on it. The routing task ends when
    /// the subscription does (the connection closed) or when the returned handle is aborted.
    pub async fn start(
        nats: async_nats::Client,
    ) -> anyhow::Result<(Arc<Self>, tokio::task::JoinHandle<()>)> {
        let inbox = nats.new_inbox();
        let mut sub = nats
            .subscribe(format!("{inbox}.>"))
            .await
            .context("failed to subscribe to the parameter inbox")?;
        let transport = Arc::new(Self {
            nats,
            inbox,
            open: DashMap::new(),
            next_id: AtomicU64::new(0),
            secrets: std::collections::hash_map::RandomState::new(),
            rto: Rto::default(),
            refused_waiting: AtomicUsize::new(0),
            hurry: CancellationToken::new(),
        });
        let routing = Arc::clone(&transport);
        let task = tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                routing.route(msg);
            }
        });
        Ok((transport, task))
    }

    /// Tells answered calls to stop waiting for their callers' confirmations (soon).
    pub fn hurry(&self) {
        self.hurry.cancel();
    }

    /// Hands a message on our inbox to its invocation. Never waits: one slow call must not
    /// hold up another's parameters.
    fn route(&self, msg: Message) {
        let Some(rest) = msg
            .subject
            .strip_prefix(self.inbox.as_str())
            .and_then(|s| s.strip_prefix('.'))
        else {
            return;
        };
        let mut tokens = rest.splitn(4, '.');
        let (Some(id), Some(secret), Some(copy), Some(path)) =
            (tokens.next(), tokens.next(), tokens.next(), tokens.next())
        else {
            debug!(subject = %msg.subject, "message on the inbox without a parameter path");
            return;
        };
        let (Ok(id), Ok(secret), Ok(copy)) = (
            id.parse::<u64>(),
            u64::from_str_radix(secret, 16),
            copy.parse::<u32>(),
        ) else {
            debug!(subject = %msg.subject, "message on the inbox for no invocation");
            return;
        };
        let chunk = match path {
            "params" if msg.payload.is_empty() => Chunk::End,
            "params" => Chunk::Data(msg.payload),
            _ if path.starts_with("params.") => Chunk::Nested,
            _ => return,
        };
        let at = Instant::now();
        let Some(mut open) = self.open.get_mut(&id) else {
            debug!(subject = %msg.subject, "parameters for an invocation that has ended");
            return;
        };
        if open.secret != secret {
            debug!(subject = %msg.subject, "parameters with a wrong secret dropped");
            return;
        }
        // Each invocation gets at most its room in bytes (counting each message's own cost),
        // one failure and one end: a flood of small messages cannot queue without bound.
        let chunk = match chunk {
            Chunk::End if open.ended => return,
            Chunk::End => {
                open.ended = true;
                Chunk::End
            }
            _ if open.failed || open.ended => return,
            Chunk::Data(data) if data.len().saturating_add(CHUNK_COST) <= open.room => {
                open.room -= data.len() + CHUNK_COST;
                Chunk::Data(data)
            }
            Chunk::Data(_) | Chunk::Overflow => {
                open.failed = true;
                Chunk::Overflow
            }
            Chunk::Nested => {
                open.failed = true;
                Chunk::Nested
            }
        };
        open.chunks.push(Arrival { chunk, copy, at });
    }

    /// Accepts an invocation message: enters its parameter subject in the routing table, then
    /// publishes the handshake. `max_params` bounds the bytes it may receive, `timeout` how
    /// long it may take from now, `min_rto` how soon the handshake may be sent again. `None`
    /// when the message has no reply subject (no caller waits for an answer).
    pub async fn accept(
        self: &Arc<Self>,
        msg: Message,
        max_params: usize,
        timeout: Duration,
        min_rto: Duration,
    ) -> Option<Invocation> {
        let caller = msg.reply?;
        let started = Instant::now();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let secret = self.secrets.hash_one(id);
        let chunks = Arc::new(Arrivals::default());
        // Room for the rest of the parameters and each message's cost: an eighth more than the
        // bytes, so that a caller's large messages never run out of it; the reader refuses
        // parameters past `max_params` itself.
        let room = max_params
            .saturating_sub(msg.payload.len())
            .saturating_add(max_params / 8 + 4096);
        self.open.insert(
            id,
            Open {
                chunks: Arc::clone(&chunks),
                secret,
                room,
                failed: false,
                ended: false,
            },
        );
        let results = Subject::from(format!("{caller}.results"));
        let rto = self.rto.timeout(min_rto);
        let mut invocation = Invocation {
            transport: Arc::clone(self),
            own: format!("{}.{id}.{secret:016x}", self.inbox),
            id,
            headers: msg.headers,
            first: Some(msg.payload),
            chunks,
            caller,
            results,
            handshake_at: started,
            deadline: started + timeout,
            resend_at: started + rto,
            rto,
            resends: 0,
            heard: false,
            confirmed: false,
            answer: None,
            answered: false,
            hurried: false,
        };
        invocation.handshake().await;
        Some(invocation)
    }
}

/// One accepted invocation, from its handshake to its closing results message. Dropping it
/// takes it out of the routing table.
#[derive(Debug)]
pub struct Invocation {
    transport: Arc<Transport>,
    id: u64,
    headers: Option<HeaderMap>,
    /// The parameters that came with the invocation.
    first: Option<Bytes>,
    chunks: Arc<Arrivals>,
    /// The caller's reply subject, where handshakes go.
    caller: Subject,
    /// Ours: handshake copy `n` names `{own}.{n}` as its reply, and the caller sends
    /// parameters to `{own}.{n}.params`.
    own: String,
    results: Subject,
    handshake_at: Instant,
    deadline: Instant,
    resend_at: Instant,
    rto: Duration,
    resends: u32,
    /// Something came back from the caller: it has a handshake, no more are sent.
    heard: bool,
    /// The caller's end of parameters arrived.
    confirmed: bool,
    /// The one-message results, published again after each resent handshake.
    answer: Option<Bytes>,
    /// The results are out (or held): only the confirmation is awaited.
    answered: bool,
    /// Its wait was shortened for a stop.
    hurried: bool,
}

impl Drop for Invocation {
    fn drop(&mut self) {
        self.transport.open.remove(&self.id);
    }
}

impl Invocation {
    /// The invocation's NATS headers.
    pub fn headers(&self) -> Option<&HeaderMap> {
        self.headers.as_ref()
    }

    /// The call's deadline has passed.
    pub fn expired(&self) -> bool {
        Instant::now() >= self.deadline
    }

    /// Publishes handshake copy `self.resends`.
    async fn handshake(&mut self) {
        let reply = Subject::from(format!("{}.{}", self.own, self.resends));
        let nats = &self.transport.nats;
        if let Err(err) = nats
            .publish_with_reply(self.caller.clone(), reply, Bytes::new())
            .await
        {
            debug!(%err, "failed to publish a handshake");
        }
    }

    /// The next parameter bytes: first those that came with the invocation, then what the
    /// caller sends after the handshake. `Ok(None)` at the caller's end of parameters. Resends
    /// the handshake while waiting; fails at the call's deadline.
    pub async fn params(&mut self) -> anyhow::Result<Option<Bytes>> {
        if let Some(first) = self.first.take() {
            if !first.is_empty() {
                return Ok(Some(first));
            }
        }
        if self.confirmed {
            return Ok(None);
        }
        match self.next_chunk().await {
            Some(Chunk::Data(data)) => Ok(Some(data)),
            Some(Chunk::End) => Ok(None),
            Some(Chunk::Overflow) => Err(anyhow!("more parameters arrived than may be read")),
            Some(Chunk::Nested) => Err(anyhow!(
                "asynchronous parameters (indexed parameter subjects) are not part of the \
                 keyvalue interfaces"
            )),
            None => Err(anyhow!("the caller's parameters did not end in time")),
        }
    }

    /// Waits for the next chunk, resending the handshake (and the results, once there are
    /// any) on each retransmission timeout until the caller is heard from. `None` at the
    /// deadline.
    async fn next_chunk(&mut self) -> Option<Chunk> {
        loop {
            let wake = if self.heard {
                self.deadline
            } else {
                self.resend_at.min(self.deadline)
            };
            tokio::select! {
                biased;
                arrival = self.chunks.next() => {
                    let Arrival { chunk, copy, at } = arrival;
                    if !self.heard {
                        self.heard = true;
                        self.heard_from(copy, at);
                    }
                    if matches!(chunk, Chunk::End) {
                        self.confirmed = true;
                    }
                    return Some(chunk);
                }
                () = self.transport.hurry.cancelled(), if self.answered && !self.hurried => {
                    // Stopping: a caller not heard from gets one more handshake now, then the
                    // call closes soon.
                    self.hurried = true;
                    if !self.heard {
                        Box::pin(self.resend()).await;
                    }
                    self.deadline = self.deadline.min(Instant::now() + STOP_WAIT);
                }
                () = tokio::time::sleep_until(wake) => {
                    if Instant::now() >= self.deadline {
                        return None;
                    }
                    // Boxed: resending is rare, and every call's future holds this one.
                    Box::pin(self.resend()).await;
                }
            }
        }
    }

    /// The caller answered handshake copy `copy`, its first message arriving at `at`.
    fn heard_from(&self, copy: u32, at: Instant) {
        if copy == 0 {
            // The first handshake reached it: a clean round trip, however late.
            self.transport
                .rto
                .sample(at.saturating_duration_since(self.handshake_at));
            if self.resends > 0 {
                STATS.spurious.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            STATS.recovered.fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn resend(&mut self) {
        if self.resends >= MAX_RESENDS {
            self.resend_at = self.deadline;
            return;
        }
        self.resends += 1;
        STATS.handshakes_resent.fetch_add(1, Ordering::Relaxed);
        self.handshake().await;
        if let Some(answer) = &self.answer {
            let mut headers = HeaderMap::new();
            headers.insert(COPY_HEADER, self.resends.to_string().as_str());
            if let Err(err) = self
                .transport
                .nats
                .publish_with_headers(self.results.clone(), headers, answer.clone())
                .await
            {
                debug!(%err, "failed to publish a copy of the results");
            }
        }
        self.rto = (self.rto * 2).min(MAX_RTO);
        self.resend_at = Instant::now() + self.rto;
    }

    async fn publish_results(&self, payload: Bytes) {
        if let Err(err) = self
            .transport
            .nats
            .publish(self.results.clone(), payload)
            .await
        {
            debug!(%err, "failed to publish results");
        }
    }

    /// Sends the encoded results and closes them, once the caller has confirmed the handshake
    /// (or the call's deadline passed; the closing message then goes anyway). Results that fit
    /// one message go out at once.
    pub async fn answer(mut self, results: Bytes) {
        let max_payload = self.transport.nats.server_info().max_payload;
        let whole = results.len() <= max_payload;
        self.answered = true;
        if whole {
            self.publish_results(results.clone()).await;
            self.answer = Some(results.clone());
        }
        while !self.confirmed {
            match self.next_chunk().await {
                Some(_) => {}
                None => {
                    STATS.unconfirmed.fetch_add(1, Ordering::Relaxed);
                    debug!(
                        resends = self.resends,
                        "the caller never confirmed the handshake; closing its results anyway"
                    );
                    break;
                }
            }
        }
        if !whole {
            let mut rest = results;
            while !rest.is_empty() {
                let chunk = rest.split_to(rest.len().min(max_payload.max(1)));
                self.publish_results(chunk).await;
            }
        }
        self.publish_results(Bytes::new()).await;
    }

    /// Answers a call refused before it was admitted (it holds nothing of the budget): like
    /// [`Invocation::answer`] while fewer than [`MAX_REFUSED_WAITING`] such calls wait for their
    /// callers, else at once, without waiting (and without resending a lost handshake).
    pub async fn answer_refused(self, results: Bytes) {
        let waiting = &self.transport.refused_waiting;
        let admitted = waiting
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < MAX_REFUSED_WAITING).then_some(n + 1)
            })
            .is_ok();
        if admitted {
            // Given back however the wait ends, also when the call is abandoned at a stop.
            let _place = RefusedPlace(Arc::clone(&self.transport));
            self.answer(results).await;
        } else {
            self.publish_results(results).await;
            self.publish_results(Bytes::new()).await;
        }
    }
}

/// A refused call's place among those waiting for their callers; dropping it gives it back.
struct RefusedPlace(Arc<Transport>);

impl Drop for RefusedPlace {
    fn drop(&mut self) {
        self.0.refused_waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The SDK's view of an invocation's headers: every header by name (the last value of a
/// repeated one), the calling component from `source-id`.
pub fn context(headers: &HeaderMap) -> wasmcloud_provider_sdk::Context {
    let tracing: HashMap<String, String> = headers
        .iter()
        .flat_map(|(name, values)| {
            values
                .iter()
                .map(move |value| (name.to_string(), value.to_string()))
        })
        .collect();
    wasmcloud_provider_sdk::Context {
        component: Some(
            tracing
                .get("source-id")
                .cloned()
                .unwrap_or_else(|| "<unknown>".into()),
        ),
        tracing,
    }
}

/// The retransmission timeout, from handshake round trips (RFC 6298's estimator).
#[derive(Debug, Default)]
struct Rto {
    /// Smoothed round trip, in microseconds; 0 before the first sample.
    srtt_us: AtomicU64,
    /// Its mean deviation, in microseconds.
    rttvar_us: AtomicU64,
}

impl Rto {
    /// The timeout for a new handshake: at least `min`, at most [`MAX_RTO`] (or `min`, if
    /// that is longer).
    fn timeout(&self, min: Duration) -> Duration {
        let srtt = self.srtt_us.load(Ordering::Relaxed);
        let rttvar = self.rttvar_us.load(Ordering::Relaxed);
        Duration::from_micros(srtt.saturating_add(rttvar.saturating_mul(4)))
            .min(MAX_RTO)
            .max(min)
    }

    /// Folds in one round trip. Concurrent samples may overwrite each other: an estimate
    /// needs no exactness.
    fn sample(&self, rtt: Duration) {
        let rtt = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX);
        let srtt = self.srtt_us.load(Ordering::Relaxed);
        if srtt == 0 {
            self.srtt_us.store(rtt.max(1), Ordering::Relaxed);
            self.rttvar_us.store(rtt / 2, Ordering::Relaxed);
            return;
        }
        let rttvar = self.rttvar_us.load(Ordering::Relaxed);
        let deviation = srtt.abs_diff(rtt);
        self.rttvar_us
            .store(rttvar - rttvar / 4 + deviation / 4, Ordering::Relaxed);
        self.srtt_us
            .store((srtt - srtt / 8 + rtt / 8).max(1), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeout_follows_round_trips_within_its_bounds() {
        const MIN: Duration = Duration::from_millis(10);
        let rto = Rto::default();
        assert_eq!(rto.timeout(MIN), MIN, "no sample yet");
        for _ in 0..50 {
            rto.sample(Duration::from_millis(40));
        }
        let steady = rto.timeout(MIN);
        assert!(
            steady >= Duration::from_millis(40) && steady < Duration::from_millis(60),
            "{steady:?}"
        );
        assert_eq!(
            rto.timeout(Duration::from_millis(100)),
            Duration::from_millis(100)
        );
        rto.sample(Duration::from_secs(30));
        assert_eq!(rto.timeout(MIN), MAX_RTO);
        for _ in 0..200 {
            rto.sample(Duration::from_micros(100));
        }
        assert_eq!(rto.timeout(MIN), MIN);
    }

    fn arrival(n: u8) -> Arrival {
        Arrival {
            chunk: Chunk::Data(Bytes::from(vec![n])),
            copy: 0,
            at: Instant::now(),
        }
    }

    fn data(arrival: Arrival) -> u8 {
        match arrival.chunk {
            Chunk::Data(data) => data[0],
            other => panic!("{other:?}"),
        }
    }

    /// What the routing task pushes is taken in order, whether it came before the invocation
    /// waited, while it waited, or while a wait was given up (as `select!` does when a timer
    /// wins): nothing is lost and no wait sleeps past an arrival.
    #[tokio::test]
    async fn arrivals_are_taken_in_order_however_waits_and_pushes_interleave() {
        let arrivals = Arc::new(Arrivals::default());
        arrivals.push(arrival(1));
        arrivals.push(arrival(2));
        assert_eq!(data(arrivals.next().await), 1);
        assert_eq!(data(arrivals.next().await), 2);
        // Pushed while the invocation waits.
        let pusher = Arc::clone(&arrivals);
        let push = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            pusher.push(arrival(3));
        });
        let got = tokio::time::timeout(Duration::from_secs(5), arrivals.next()).await;
        assert_eq!(data(got.expect("woken by the push")), 3);
        push.await.unwrap();
        // A wait given up before the push, then a new one.
        assert!(
            tokio::time::timeout(Duration::from_millis(10), arrivals.next())
                .await
                .is_err(),
            "nothing has arrived"
        );
        arrivals.push(arrival(4));
        arrivals.push(arrival(5));
        let got = tokio::time::timeout(Duration::from_secs(5), arrivals.next()).await;
        assert_eq!(data(got.expect("the queued arrival")), 4);
        let got = tokio::time::timeout(Duration::from_secs(5), arrivals.next()).await;
        assert_eq!(data(got.expect("the queued arrival")), 5);
    }

    /// The health message shows the figures in words a person reads, and tools read them back
    /// from it exactly.
    #[test]
    fn the_health_figures_read_back_as_written() {
        let figures = Figures {
            resent: 7,
            recovered: 5,
            spurious: 2,
            unconfirmed: 1,
        };
        let health = format!("3 links, 1 keys; transport: {figures}");
        assert_eq!(
            health,
            "3 links, 1 keys; transport: 7 handshakes resent, 5 calls recovered, 2 spurious, \
             1 unconfirmed"
        );
        assert_eq!(Figures::read(&health), Some(figures));
        assert_eq!(Figures::read("3 links; no figures"), None);
        let later = figures + figures;
        assert_eq!(later.since(figures), figures);
        assert_eq!(figures.since(later), Figures::default(), "never below zero");
    }

    #[test]
    fn the_context_carries_every_header_and_the_caller() {
        let mut headers = HeaderMap::new();
        headers.insert("source-id", "comp");
        headers.insert("traceparent", "00-01-02-01");
        let cx = context(&headers);
        assert_eq!(cx.component.as_deref(), Some("comp"));
        assert_eq!(cx.tracing["traceparent"], "00-01-02-01");
        assert_eq!(
            context(&HeaderMap::new()).component.as_deref(),
            Some("<unknown>")
        );
    }
}
