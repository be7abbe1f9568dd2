//! Several instances, one store: replication through NATS JetStream (`replication =
//! "jetstream"`).
//!
//! Every instance of the provider in a lattice takes calls from one wRPC queue group, so a
//! component's calls land on any of them. With replication on, a write is not made in memory
//! by the instance that took it: it is published to one JetStream stream, and acknowledged to
//! the caller once JetStream has stored it (durable, replicated as the stream is) and, with
//! local reads, this instance has applied it. Every instance applies the whole stream, in the stream's order,
//! to its own memory (`apply.rs`); reads are served from memory.
//!
//! - **The stream** (`{prefix}_{lattice}_{provider}`, subjects `{prefix}.{lattice}.{provider}.>`;
//!   the instances of one provider in one lattice share it) keeps one message
//!   per entry (`max_msgs_per_subject = 1`; `log.rs` names an entry's subject), so it holds
//!   the live data: a delete is a marker that JetStream removes after `jetstream_tombstone_secs`
//!   (`Nats-TTL`), and an expiring value goes from the stream when it expires.
//! - **Reads** (`read_consistency = "linearizable"`, the default) first learn the stream's last
//!   sequence, then wait until this instance applied that far ([`Replica::read_barrier`]):
//!   every write acknowledged before the read began, on any instance, is seen. Barriers of
//!   reads that wait together share one request. `local` reads skip the barrier.
//! - **`increment`** reads the counter's last message from JetStream and writes the sum only
//!   if no other write came in between (`Nats-Expected-Last-Subject-Sequence`), reading again
//!   until it wins: exact under any contention, bounded by the call's time only. Increments
//!   of one key that wait on one instance go as one write.
//! - **`set-many` and `delete-many`** are one atomic batch (JetStream's `Nats-Batch-*`
//!   headers): stored whole or not at all, and applied at once.
//! - **Limits** are checked by the instance that takes a write, against what it has applied
//!   ([`Engine::admits`]); every instance applies every stored write. Instances racing at a
//!   limit can pass it together, by at most what they have in flight at that moment.
//! - **list-keys** pages: a listing lives on the instance that answered its first page; the
//!   next page's call, wherever it lands, is answered from there (`listings.rs`).
//! - **Catch-up**: a starting instance applies the stream up to its last message before the
//!   provider answers health. One that lost touch with JetStream for longer than half a
//!   delete marker's life, or whose oldest write not yet applied is that old, or whose stream
//!   was created anew, reloads the stream from its start.

mod apply;
mod counters;
mod lag;
mod listings;
pub mod log;

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use async_nats::jetstream;
use async_nats::HeaderMap;
use bytes::Bytes;
use keyvalue_store::Engine;
use tokio::sync::{oneshot, watch, Notify};
use tracing::{info, warn};

use crate::config::{ReadConsistency, Replication};
use log::{Op, Record};

/// Most entries of one `set-many` or `delete-many`: JetStream's limit on an atomic batch.
pub const MAX_BATCH: usize = 1000;
/// Atomic batches one instance has open at once (JetStream allows 50 a stream).
const BATCHES_IN_FLIGHT: usize = 12;
/// How often a start that catches up says how far it is.
const CATCH_UP_REPORT: Duration = Duration::from_secs(10);
/// How often the applier's progress is checked against the stream while nothing happens.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Checks in a row without progress while the stream has more, before the applier's consumer
/// is made again.
const STALLED_CHECKS: u32 = 3;
/// How long a wait for the applier goes before it asks JetStream whether the messages it
/// waits for still exist (an expired one never arrives).
const GAP_CHECK_AFTER: Duration = Duration::from_millis(200);

/// What a replicated write failed with.
#[derive(Debug)]
enum WriteError {
    /// `Nats-Expected-Last-Subject-Sequence` did not hold: someone wrote first.
    Conflict,
    Failed(String),
}

/// One message to publish.
struct Outgoing {
    subject: String,
    payload: Bytes,
    /// `Nats-TTL`, in seconds.
    ttl: Option<u64>,
}

/// This instance's share of the replicated store. Cheap to clone.
#[derive(Clone)]
pub struct Replica {
    inner: Arc<Shared>,
}

struct Shared {
    nats: async_nats::Client,
    js: jetstream::Context,
    stream: jetstream::stream::Stream,
    /// The stream's name, and the root of its subjects.
    name: String,
    root: String,
    /// The host's instance id of this provider, in health.
    instance: String,
    settings: Replication,
    /// This instance, in the records it writes.
    origin: u64,
    engine: Arc<Engine>,
    /// Every message of the stream up to here is applied (or known gone).
    applied: watch::Sender<u64>,
    /// The last sequence the applier was delivered (ahead of `applied` while it waits).
    delivered: AtomicU64,
    /// When a waiter last asked whether what it waits for is gone from the stream.
    gap_checked: Mutex<Instant>,
    /// Read barriers waiting for the stream's last sequence.
    barriers: Mutex<Vec<oneshot::Sender<Result<u64, String>>>>,
    barrier_wanted: Notify,
    /// Asks the applier to drop everything and apply the stream again from its start.
    reload: Notify,
    /// Asks the applier to make its consumer again, from where it is.
    restart: Notify,
    /// Run after a reload emptied the store (the provider marks its watched namespaces
    /// again).
    after_reload: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
    reloads: AtomicU64,
    /// The reloads asked for (`reloads`) when the applier last began one.
    reloads_begun: AtomicU64,
    /// From stored in JetStream to applied here, once caught up at the start.
    lag: lag::Lag,
    caught_up: std::sync::atomic::AtomicBool,
    batches: tokio::sync::Semaphore,
    next_batch: AtomicU64,
    counters: counters::Counters,
}

impl Replica {
    /// Creates the stream if need be, starts applying it to `engine`, and answers once every
    /// message the stream held at the start is applied.
    pub async fn start(
        nats: async_nats::Client,
        (lattice, provider, instance): (&str, &str, &str),
        settings: Replication,
        engine: Arc<Engine>,
    ) -> anyhow::Result<Self> {
        let mut js = jetstream::new(nats.clone());
        js.set_timeout(settings.timeout);
        let (lattice, provider) = (log::token(lattice), log::token(provider));
        let name = format!("{}_{lattice}_{provider}", settings.prefix);
        let root = format!("{}.{lattice}.{provider}", settings.prefix);
        ensure_stream(&js, &name, &root, &settings).await?;
        let mut stream = js
            .get_stream(&name)
            .await
            .with_context(|| format!("cannot open JetStream stream {name}"))?;
        let info = stream.info().await?.clone();
        let max_payload = nats.server_info().max_payload;
        let max_value = engine.limits().max_value_bytes;
        if max_value.saturating_add(1024) > max_payload {
            warn!(
                max_value_bytes = max_value,
                max_payload,
                "replication: values near max_value_bytes do not fit one NATS message and are \
                 refused; set max_value_bytes below the server's max_payload"
            );
        }
        let origin = RandomState::new().hash_one(std::process::id()) | 1;
        let replica = Replica {
            inner: Arc::new(Shared {
                nats,
                js,
                stream,
                name,
                root,
                instance: instance.to_owned(),
                settings,
                origin,
                engine,
                applied: watch::Sender::new(0),
                delivered: AtomicU64::new(0),
                gap_checked: Mutex::new(Instant::now()),
                barriers: Mutex::default(),
                barrier_wanted: Notify::new(),
                reload: Notify::new(),
                restart: Notify::new(),
                after_reload: std::sync::OnceLock::new(),
                reloads: AtomicU64::new(0),
                reloads_begun: AtomicU64::new(0),
                lag: lag::Lag::default(),
                caught_up: std::sync::atomic::AtomicBool::new(false),
                batches: tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT),
                next_batch: AtomicU64::new(1),
                counters: counters::Counters::default(),
            }),
        };
        tokio::spawn(apply::run(replica.clone()));
        tokio::spawn(listings::serve(replica.clone()));
        tokio::spawn(replica.clone().answer_barriers());
        tokio::spawn(
            replica
                .clone()
                .watch_stream(info.created.unix_timestamp_nanos()),
        );
        let last = info.state.last_sequence;
        let began = Instant::now();
        info!(
            stream = %replica.inner.name,
            messages = info.state.messages,
            last,
            "replication: catching up"
        );
        // Progress is logged every 10 s; a minute without any is a failed start (the
        // applier's warnings say why).
        let mut progress = 0;
        let mut still = 0;
        while replica
            .wait_applied(last, Instant::now() + CATCH_UP_REPORT)
            .await
            .is_err()
        {
            let at = replica.inner.delivered.load(Ordering::Relaxed);
            still = if at == progress { still + 1 } else { 0 };
            progress = at;
            info!(applied = at, last, "replication: still catching up");
            anyhow::ensure!(
                still < 6,
                "replication: no progress catching up with stream {} for a minute (at {at} of \
                 {last})",
                replica.inner.name
            );
        }
        replica.inner.caught_up.store(true, Ordering::Relaxed);
        info!(
            stream = %replica.inner.name,
            took_ms = began.elapsed().as_millis() as u64,
            keys = replica.inner.engine.usage().keys,
            "replication: caught up"
        );
        Ok(replica)
    }

    /// Sets what runs after a reload emptied the store (once).
    pub fn after_reload(&self, then: impl Fn() + Send + Sync + 'static) {
        let _ = self.inner.after_reload.set(Box::new(then));
    }

    /// How reads are served.
    pub fn reads(&self) -> ReadConsistency {
        self.inner.settings.reads
    }

    /// For the health message.
    pub fn figures(&self) -> String {
        format!(
            "jetstream {}, instance {}, applied {}, {} reloads, apply lag {}",
            self.inner.name,
            self.inner.instance,
            *self.inner.applied.borrow(),
            self.inner.reloads.load(Ordering::Relaxed),
            self.inner.lag.figures(),
        )
    }

    /// When a call that begins now must be answered by: `jetstream_timeout_ms` from now.
    pub fn call_deadline(&self) -> Instant {
        Instant::now() + self.inner.settings.timeout
    }

    /// Stores `value` under `key`, expiring at `deadline_ms` (0: never); by `until`.
    pub async fn set(
        &self,
        (ns, bucket, key): (&str, &str, &str),
        value: &[u8],
        deadline_ms: u64,
        until: Instant,
    ) -> Result<(), String> {
        let records = self.records(Op::Set, (ns, bucket), vec![(key, value)], deadline_ms)?;
        self.store(records, until).await
    }

    /// Stores every pair or none, in one atomic batch; by `until`.
    pub async fn set_many(
        &self,
        (ns, bucket): (&str, &str),
        pairs: &[(String, Bytes)],
        deadline_ms: u64,
        until: Instant,
    ) -> Result<(), String> {
        let latest: std::collections::HashMap<&str, &[u8]> = (pairs.iter())
            .map(|(k, v)| (k.as_str(), v.as_ref()))
            .collect();
        let records = self.records(
            Op::Set,
            (ns, bucket),
            latest.into_iter().collect(),
            deadline_ms,
        )?;
        self.store(records, until).await
    }

    /// Removes every key named that exists (after a barrier: a key that no write acknowledged
    /// before the call left there is not there), in one atomic batch; by `until`. A key that
    /// does not exist costs no delete marker.
    pub async fn delete_many(
        &self,
        (ns, bucket): (&str, &str),
        keys: &[&str],
        until: Instant,
    ) -> Result<(), String> {
        self.barrier(until).await?;
        let engine = &self.inner.engine;
        let keys: std::collections::BTreeSet<&str> = (keys.iter().copied())
            .filter(|key| engine.exists(ns, bucket, key))
            .collect();
        let entries = keys.into_iter().map(|key| (key, &b""[..])).collect();
        let records = self.records(Op::Delete, (ns, bucket), entries, 0)?;
        self.store(records, until).await
    }

    /// Adds `delta` to the counter under `key` and answers the new value (see `counters.rs`);
    /// by `until`.
    pub async fn increment(
        &self,
        names: (&str, &str, &str),
        delta: u64,
        deadline_ms: u64,
        until: Instant,
    ) -> Result<u64, crate::bindings::exports::wrpc::keyvalue::store::Error> {
        counters::increment(self, names, delta, deadline_ms, until).await
    }

    /// The list-keys page `cursor` names, from the instance that holds its listing (see
    /// `listings.rs`); `None` when no instance does.
    pub async fn page_elsewhere(
        &self,
        ns: &str,
        bucket: &str,
        cursor: u64,
        max_bytes: usize,
    ) -> Option<Result<keyvalue_store::KeyPage, String>> {
        listings::ask(self, ns, bucket, cursor, max_bytes).await
    }

    /// Waits until this instance applied every write acknowledged before the call, on any
    /// instance (nothing with `read_consistency = "local"`). The barrier [`Replica::begin_read`]
    /// started for this call when it arrived, if any, else one from now.
    pub async fn read_barrier(&self) -> Result<(), String> {
        if self.reads() == ReadConsistency::Local {
            return Ok(());
        }
        let until = self.call_deadline();
        let early = EARLY_BARRIER
            .try_with(|early| early.borrow_mut().take())
            .ok()
            .flatten();
        match early {
            Some(asked) => self.barrier_with(asked, until).await,
            None => self.barrier(until).await,
        }
    }

    /// Waits until this instance applied every write acknowledged before now, on any instance,
    /// whatever `read_consistency` says (a write near a limit checks it against that); by
    /// `until`.
    pub async fn catch_up(&self, until: Instant) -> Result<(), String> {
        self.barrier(until).await
    }

    /// Starts a read's barrier as its invocation arrives, so that learning the stream's last
    /// sequence overlaps the call's handshake: the read began before it arrived, so what the
    /// barrier finds is at least what was acknowledged before the read. The read's handler
    /// picks it up when it runs inside [`with_early_barrier`].
    /// Nothing is spawned: the barrier is one more waiter for the next stream info request
    /// (which every waiter shares), answered whether or not the call goes on.
    pub fn begin_read(&self) -> Option<EarlyBarrier> {
        if self.reads() == ReadConsistency::Local {
            return None;
        }
        Some(self.ask_last_sequence())
    }

    /// Learns the stream's last sequence (one request for every barrier waiting when it goes),
    /// then waits until this instance applied that far; by `until`.
    async fn barrier(&self, until: Instant) -> Result<(), String> {
        self.barrier_with(self.ask_last_sequence(), until).await
    }

    /// Joins the waiters of the next stream info request.
    fn ask_last_sequence(&self) -> EarlyBarrier {
        let (tx, rx) = oneshot::channel();
        self.inner
            .barriers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tx);
        self.inner.barrier_wanted.notify_one();
        rx
    }

    /// The rest of a barrier, once the stream's last sequence was asked for.
    async fn barrier_with(&self, asked: EarlyBarrier, until: Instant) -> Result<(), String> {
        let last = tokio::time::timeout_at(until.into(), asked)
            .await
            .map_err(|_| unavailable("did not answer in time"))?
            .map_err(|_| unavailable("the barrier task ended"))??;
        self.wait_applied(last, until).await
    }

    /// The messages of one write of `entries` (distinct keys of one bucket, with their values):
    /// one record, or an atomic batch of them, or why it cannot be one.
    fn records(
        &self,
        op: Op,
        (ns, bucket): (&str, &str),
        entries: Vec<(&str, &[u8])>,
        deadline_ms: u64,
    ) -> Result<Vec<Outgoing>, String> {
        let n = entries.len();
        if n > MAX_BATCH {
            return Err(format!(
                "replication: a batch of {n} keys is over JetStream's limit of {MAX_BATCH} for \
                 an atomic write; send fewer at once"
            ));
        }
        let batch = match n {
            0 | 1 => 0,
            _ => self.inner.next_batch.fetch_add(1, Ordering::Relaxed),
        };
        let records = (entries.into_iter().enumerate())
            .map(|(i, (key, value))| {
                let place = (batch, n as u32, i as u32);
                self.record(op, (ns, bucket, key), value, deadline_ms, place)
            })
            .collect();
        Ok(records)
    }

    /// Writes `records` (nothing expected of their subjects) and answers as a call does; by
    /// `until`.
    async fn store(&self, records: Vec<Outgoing>, until: Instant) -> Result<(), String> {
        self.write(records, None, until)
            .await
            .map(drop)
            .map_err(failed)
    }

    /// The message of one record: `place` is its batch, the batch's size and its place in it.
    fn record(
        &self,
        op: Op,
        (ns, bucket, key): (&str, &str, &str),
        value: &[u8],
        deadline_ms: u64,
        (batch, batch_len, batch_index): (u64, u32, u32),
    ) -> Outgoing {
        let record = Record {
            op,
            origin: self.inner.origin,
            batch,
            batch_len,
            batch_index,
            deadline_ms,
            namespace: ns,
            bucket,
            key,
            value,
        };
        let tombstone = self.inner.settings.tombstone.as_secs();
        let ttl = match op {
            Op::Delete => Some(tombstone),
            Op::Set if deadline_ms == 0 => None,
            // Gone from the stream once expired everywhere, and a marker's life later: an
            // instance out of touch for less than that still sees that it replaced the value
            // before it (one out of touch for longer reloads).
            Op::Set => {
                let now = unix_now().as_millis() as u64;
                Some(deadline_ms.saturating_sub(now).div_ceil(1000) + tombstone)
            }
        };
        Outgoing {
            subject: log::subject(&self.inner.root, ns, bucket, key),
            payload: record.encode(),
            ttl,
        }
    }

    /// Publishes `records` (one message, or an atomic batch), then waits until this instance
    /// applied them; by `until`. `expected`: the sequence the subject's last message must have
    /// (a single record only).
    async fn write(
        &self,
        records: Vec<Outgoing>,
        expected: Option<u64>,
        until: Instant,
    ) -> Result<u64, WriteError> {
        let max_payload = self.inner.nats.server_info().max_payload;
        for out in &records {
            // Headers and framing take well under 256 bytes; a message over the server's
            // max_payload would make it close the connection.
            let size = out.payload.len() + out.subject.len() + 256;
            if size > max_payload {
                return Err(WriteError::Failed(format!(
                    "replication: a write of {size} bytes is over the NATS server's max_payload \
                     ({max_payload}): lower max_value_bytes below it, or raise max_payload"
                )));
            }
        }
        if self.inner.nats.connection_state() != async_nats::connection::State::Connected {
            // A publish made now would wait in the client and go out whenever it reconnects:
            // refused instead, its outcome certain.
            return Err(WriteError::Failed(unavailable("not connected to NATS")));
        }
        let seq = match records.len() {
            0 => return Ok(0),
            1 => self.publish_one(&records[0], expected, until).await?,
            _ => {
                let _slot = tokio::time::timeout_at(until.into(), self.inner.batches.acquire())
                    .await
                    .map_err(|_| WriteError::Failed(unavailable("too many batches waiting")))?;
                self.publish_batch(&records, until).await?
            }
        };
        // Linearizable reads wait for what they must see themselves; local ones see this
        // instance's own writes because the write waits here.
        if self.reads() == ReadConsistency::Local {
            self.wait_applied(seq, until).await.map_err(|_| {
                WriteError::Failed(format!(
                    "replication: the write is stored in JetStream (sequence {seq}) but this \
                     instance has not applied it in time"
                ))
            })?;
        }
        Ok(seq)
    }

    async fn publish_one(
        &self,
        out: &Outgoing,
        expected: Option<u64>,
        until: Instant,
    ) -> Result<u64, WriteError> {
        let mut publish = jetstream::context::Publish::build().payload(out.payload.clone());
        if let Some(ttl) = out.ttl {
            publish = publish.header("Nats-TTL", format!("{ttl}s").as_str());
        }
        if let Some(expected) = expected {
            publish = publish.expected_last_subject_sequence(expected);
        }
        let refused = |err: jetstream::context::PublishError| match err.kind() {
            jetstream::context::PublishErrorKind::WrongLastSequence => WriteError::Conflict,
            _ => WriteError::Failed(unknown(&err.to_string())),
        };
        let published = async {
            let ack = self
                .inner
                .js
                .send_publish(out.subject.clone(), publish)
                .await
                .map_err(refused)?;
            Ok(ack.await.map_err(refused)?.sequence)
        };
        tokio::time::timeout_at(until.into(), published)
            .await
            .map_err(|_| WriteError::Failed(unknown("JetStream did not acknowledge it in time")))?
    }

    /// One atomic batch: the first message opens it (the server answers it empty), the last
    /// commits it (the server answers with the stream's acknowledgement of the whole batch).
    async fn publish_batch(&self, records: &[Outgoing], until: Instant) -> Result<u64, WriteError> {
        let id = format!(
            "{:x}-{:x}",
            self.inner.origin,
            self.inner.next_batch.fetch_add(1, Ordering::Relaxed)
        );
        let last = records.len() - 1;
        let late = || WriteError::Failed(unknown("JetStream did not acknowledge it in time"));
        for (i, out) in records.iter().enumerate() {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Batch-Id", id.as_str());
            headers.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
            if let Some(ttl) = out.ttl {
                headers.insert("Nats-TTL", format!("{ttl}s").as_str());
            }
            if i == last {
                headers.insert("Nats-Batch-Commit", "1");
            }
            let (subject, payload) = (out.subject.clone(), out.payload.clone());
            if i == 0 || i == last {
                let asked = self
                    .inner
                    .nats
                    .request_with_headers(subject, headers, payload);
                let answer = tokio::time::timeout_at(until.into(), asked)
                    .await
                    .map_err(|_| late())?
                    .map_err(|err| WriteError::Failed(unknown(&err.to_string())))?;
                let ack = batch_answer(&answer.payload).map_err(WriteError::Failed)?;
                if i == last {
                    return ack.ok_or_else(|| {
                        WriteError::Failed(unknown("the batch's commit was not acknowledged"))
                    });
                }
            } else {
                let sent = self
                    .inner
                    .nats
                    .publish_with_headers(subject, headers, payload);
                tokio::time::timeout_at(until.into(), sent)
                    .await
                    .map_err(|_| late())?
                    .map_err(|err| WriteError::Failed(unavailable(&err.to_string())))?;
            }
        }
        Err(WriteError::Failed(unavailable("an empty batch")))
    }

    /// Waits until every message up to `seq` is applied here, or known gone from the stream,
    /// by `until`.
    async fn wait_applied(&self, seq: u64, until: Instant) -> Result<(), String> {
        let mut applied = self.inner.applied.subscribe();
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(unavailable(&format!(
                    "this instance has not applied the stream up to {seq} in time (it is at {})",
                    *applied.borrow()
                )));
            }
            let wait = applied.wait_for(|&at| at >= seq);
            match tokio::time::timeout(left.min(GAP_CHECK_AFTER), wait).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(_)) => return Err(unavailable("the applier stopped")),
                Err(_) => {}
            }
            // The messages still missing may be gone: a message replaced by a later write of
            // its key is followed by that write, which the applier reaches; but an expired one
            // (a delete marker, an expiring value) at the end of the stream is followed by
            // nothing. When no message at all exists past the applied one, there is nothing
            // left to wait for.
            // One waiter at a time asks (every waiter would otherwise ask every 200 ms).
            let ask = {
                let mut last = (self.inner.gap_checked)
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                let due = last.elapsed() >= GAP_CHECK_AFTER;
                if due {
                    *last = Instant::now();
                }
                due
            };
            if !ask {
                continue;
            }
            let from = *applied.borrow() + 1;
            let next = tokio::time::timeout_at(until.into(), self.next_exists(from)).await;
            if let Ok(Ok(false)) = next {
                self.inner.applied.send_if_modified(|at| {
                    // Unless the applier moved meanwhile, or a reload reset it.
                    let moved = *at < seq && *at + 1 == from;
                    if moved {
                        *at = seq;
                    }
                    moved
                });
            }
        }
    }

    /// Whether the stream holds a message at `from` or after, asked of the stream's leader
    /// (a direct get may be answered by a replica that is behind).
    async fn next_exists(&self, from: u64) -> Result<bool, String> {
        Ok(self.next_stored::<serde_json::Value>(from).await?.is_some())
    }

    /// The sequence of the stream's first message at `from` or after, and when it was stored
    /// (Unix nanoseconds), if there is one; asked of the stream's leader.
    async fn next_message(&self, from: u64) -> Result<Option<(u64, i128)>, String> {
        let message = self
            .next_stored::<jetstream::stream::RawMessage>(from)
            .await?;
        Ok(message.map(|m| (m.sequence, m.time.unix_timestamp_nanos())))
    }

    /// The stream's first message at `from` or after, read as `M`, if there is one; asked of
    /// the stream's leader.
    async fn next_stored<M: serde::de::DeserializeOwned>(
        &self,
        from: u64,
    ) -> Result<Option<M>, String> {
        #[derive(serde::Deserialize)]
        struct Answer<M> {
            message: Option<M>,
            error: Option<serde_json::Value>,
        }
        let request =
            serde_json::json!({ "seq": from, "next_by_subj": format!("{}.>", self.inner.root) });
        let answer: Answer<M> = (self.inner.js)
            .request(format!("STREAM.MSG.GET.{}", self.inner.name), &request)
            .await
            .map_err(|err| unavailable(&err.to_string()))?;
        match answer.error {
            None => Ok(answer.message),
            // 10037: no message found.
            Some(error) if error.get("err_code").and_then(|c| c.as_u64()) == Some(10037) => {
                Ok(None)
            }
            Some(error) => Err(unavailable(&error.to_string())),
        }
    }

    /// Answers read barriers: one stream info request for every barrier waiting when it goes.
    async fn answer_barriers(self) {
        loop {
            self.inner.barrier_wanted.notified().await;
            let waiting = std::mem::take(
                &mut *self
                    .inner
                    .barriers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
            );
            if waiting.is_empty() {
                continue;
            }
            let last = self.last_sequence().await;
            for tx in waiting {
                let _ = tx.send(last.clone());
            }
        }
    }

    /// The stream's last sequence (only that is read of the stream's info).
    async fn last_sequence(&self) -> Result<u64, String> {
        #[derive(serde::Deserialize)]
        struct State {
            last_seq: u64,
        }
        #[derive(serde::Deserialize)]
        struct Info {
            state: Option<State>,
            error: Option<serde_json::Value>,
        }
        let empty = serde_json::json!({});
        let asked = (self.inner.js)
            .request::<_, _, Info>(format!("STREAM.INFO.{}", self.inner.name), &empty);
        let info = tokio::time::timeout(self.inner.settings.timeout, asked)
            .await
            .map_err(|_| unavailable("did not answer in time"))?
            .map_err(|err| unavailable(&err.to_string()))?;
        match (info.state, info.error) {
            (Some(state), None) => Ok(state.last_seq),
            (_, error) => Err(unavailable(&format!("stream info: {error:?}"))),
        }
    }

    /// Whether this instance lags so far behind the stream that it should reload it: the first
    /// message it has not delivered (it did not reach the stream's last sequence of a look
    /// ago) was stored more than half a marker's life ago, so a marker at or after it may
    /// expire before it is applied, and the value it deleted stay here. Not while the start,
    /// or a reload, replays into an empty store (what that applies no earlier marker can
    /// outdate; one slower than half a marker's life is reported), and not twice within a
    /// marker's life (a replay that slow would follow itself).
    async fn lagging(&self, lag: &mut LagWatch, last: u64) -> bool {
        let settings = &self.inner.settings;
        let caught_up = self.inner.caught_up.load(Ordering::Relaxed);
        // Read after which reloads the applier began (it resets `delivered` before it says so).
        let begun = self.inner.reloads_begun.load(Ordering::Acquire);
        let delivered = self.inner.delivered.load(Ordering::Relaxed);
        let look = lag.look(caught_up, begun, delivered, last, Instant::now(), settings);
        let from = match look {
            Look::Nothing => return false,
            Look::SlowReplay { until } => {
                warn!(
                    delivered,
                    until,
                    "replication: replaying the stream takes longer than half of \
                     jetstream_tombstone_secs; a delete made meanwhile may be missed if its \
                     marker expires first: raise jetstream_tombstone_secs"
                );
                return false;
            }
            Look::Ask(from) => from,
        };
        let next = tokio::time::timeout(settings.timeout, self.next_message(from));
        let age = match next.await {
            Ok(Ok(Some((_, stored)))) => {
                let age = unix_now().as_nanos() as i128 - stored;
                Some(Duration::from_nanos(u64::try_from(age).unwrap_or(0)))
            }
            Ok(Ok(None)) => None,
            _ => return false,
        };
        match lag.judge(delivered, last, age, Instant::now(), settings) {
            Verdict::Fine => false,
            Verdict::Reload => true,
            Verdict::StillBehind => {
                warn!(
                    delivered,
                    last,
                    "replication: this instance stays behind the stream by more than half of \
                     jetstream_tombstone_secs though it reloaded; a delete may be missed if its \
                     marker expires first: raise jetstream_tombstone_secs, or give it more CPU"
                );
                false
            }
        }
    }

    /// Asks the applier to reload the stream when this instance may have missed deletes: it
    /// was out of touch with JetStream for longer than half a marker's life, or lags that far
    /// behind the stream while in touch ([`Replica::lagging`]), or the stream was created anew
    /// (a memory stream after a nats-server restart).
    async fn watch_stream(self, mut created: i128) {
        let mut last_contact = Instant::now();
        let mut warned = false;
        let (mut stalled, mut seen_delivered) = (0u32, 0u64);
        let mut lag = LagWatch::default();
        loop {
            tokio::time::sleep(CHECK_EVERY).await;
            let info =
                tokio::time::timeout(self.inner.settings.timeout, self.inner.stream.get_info())
                    .await;
            let info = match info {
                Ok(Ok(info)) => info,
                Ok(Err(err)) => {
                    if !warned {
                        warn!("replication: JetStream unavailable: {err}");
                        warned = true;
                    }
                    // The stream may be gone (a memory stream after a restart): make it again
                    // (creating one that exists changes nothing).
                    let _ = ensure_stream(
                        &self.inner.js,
                        &self.inner.name,
                        &self.inner.root,
                        &self.inner.settings,
                    )
                    .await;
                    continue;
                }
                Err(_) => {
                    if !warned {
                        warn!("replication: JetStream did not answer");
                        warned = true;
                    }
                    continue;
                }
            };
            if warned {
                info!("replication: JetStream is back");
                warned = false;
            }
            let out_of_touch = last_contact.elapsed() > self.inner.settings.tombstone / 2;
            last_contact = Instant::now();
            // A consumer that stopped delivering without a word (seen after an outage): the
            // stream has messages past the applied one, and nothing moved since the last look.
            let delivered = self.inner.delivered.load(Ordering::Relaxed);
            let last = info.state.last_sequence;
            let has_more = last > delivered;
            stalled = match has_more && delivered == seen_delivered {
                true => stalled + 1,
                false => 0,
            };
            seen_delivered = delivered;
            if stalled >= STALLED_CHECKS {
                stalled = 0;
                // Unless what is left expired.
                let left = tokio::time::timeout(
                    self.inner.settings.timeout,
                    self.next_exists(delivered + 1),
                );
                if matches!(left.await, Ok(Ok(true))) {
                    warn!(
                        delivered,
                        "replication: the stream's consumer stalled; making it again"
                    );
                    self.inner.restart.notify_one();
                }
            }
            let lagging = self.lagging(&mut lag, last).await;
            let recreated = info.created.unix_timestamp_nanos() != created;
            if recreated || out_of_touch || lagging {
                warn!(
                    recreated,
                    out_of_touch,
                    lagging,
                    delivered,
                    last,
                    "replication: reloading the stream from its start"
                );
                created = info.created.unix_timestamp_nanos();
                let asked = self.inner.reloads.fetch_add(1, Ordering::AcqRel) + 1;
                lag.reloaded(last, asked, lagging, Instant::now());
                self.inner.reload.notify_one();
            }
        }
    }
}

/// What the stream watcher keeps to tell whether this instance lags ([`Replica::lagging`]).
#[derive(Default)]
struct LagWatch {
    /// The stream's last sequence at the previous look.
    seen_last: u64,
    /// The stream's last sequence when this instance last asked for a reload, when, and which
    /// reload it was (`Shared::reloads`): the replay is over once the applier began it and
    /// delivered that far.
    replay: Option<(u64, Instant, u64)>,
    /// `delivered` and the stream's last sequence when nothing followed `delivered`.
    nothing_after: Option<(u64, u64)>,
    /// When a lag last made this instance reload.
    lag_reload: Option<Instant>,
    /// This replay was said to be slow.
    said_slow: bool,
    /// A lag that the last reload did not cure was said.
    said_behind: bool,
}

/// What a look at the stream asks of the stream watcher.
#[derive(Debug, PartialEq)]
enum Look {
    Nothing,
    /// Say that a replay is slow (once a replay).
    SlowReplay {
        until: u64,
    },
    /// Ask the stream for its first message from this sequence on.
    Ask(u64),
}

/// What the first message this instance has not delivered tells.
#[derive(Debug, PartialEq)]
enum Verdict {
    Fine,
    Reload,
    /// Behind, though it reloaded for that lately: say so (once).
    StillBehind,
}

impl LagWatch {
    /// A look at `now`: the applier began reload `begun` (the count of reloads asked for when it
    /// began its last) and delivered up to `delivered`; the stream's last sequence is `last`.
    fn look(
        &mut self,
        caught_up: bool,
        begun: u64,
        delivered: u64,
        last: u64,
        now: Instant,
        settings: &Replication,
    ) -> Look {
        let seen_last = std::mem::replace(&mut self.seen_last, last);
        if !caught_up {
            return Look::Nothing;
        }
        if let Some((until, since, asked)) = self.replay {
            if begun < asked || delivered < until {
                let slow = now.saturating_duration_since(since) > settings.tombstone / 2;
                if slow && !self.said_slow {
                    self.said_slow = true;
                    return Look::SlowReplay { until };
                }
                return Look::Nothing;
            }
            self.replay = None;
        }
        if delivered >= seen_last || self.nothing_after == Some((delivered, last)) {
            return Look::Nothing;
        }
        Look::Ask(delivered + 1)
    }

    /// The first message after `delivered` was stored `age` ago (`None`: there is none; what
    /// was waited for expired), seen at `now`.
    fn judge(
        &mut self,
        delivered: u64,
        last: u64,
        age: Option<Duration>,
        now: Instant,
        settings: &Replication,
    ) -> Verdict {
        let Some(age) = age else {
            // Nothing to ask again until either moves.
            self.nothing_after = Some((delivered, last));
            return Verdict::Fine;
        };
        if age <= settings.tombstone / 2 {
            return Verdict::Fine;
        }
        let lately = |at: Instant| now.saturating_duration_since(at) < settings.tombstone;
        if self.lag_reload.is_some_and(lately) {
            if self.said_behind {
                return Verdict::Fine;
            }
            self.said_behind = true;
            return Verdict::StillBehind;
        }
        Verdict::Reload
    }

    /// Reload `asked` is asked for at `now` (`lagging`: because this instance lagged); the
    /// stream's last sequence is `last`.
    fn reloaded(&mut self, last: u64, asked: u64, lagging: bool, now: Instant) {
        self.replay = Some((last, now, asked));
        (self.said_slow, self.said_behind) = (false, false);
        if lagging {
            self.lag_reload = Some(now);
        }
    }
}

/// A read's request for the stream's last sequence, made as its invocation arrived.
pub type EarlyBarrier = oneshot::Receiver<Result<u64, String>>;

tokio::task_local! {
    /// The barrier started for the call this task serves ([`Replica::begin_read`]).
    static EARLY_BARRIER: std::cell::RefCell<Option<EarlyBarrier>>;
}

/// Runs a call's handler with the barrier started when the call arrived, if any.
pub async fn with_early_barrier<F: std::future::Future>(
    early: Option<EarlyBarrier>,
    handler: F,
) -> F::Output {
    EARLY_BARRIER
        .scope(std::cell::RefCell::new(early), handler)
        .await
}

/// The time since the Unix epoch, as records and JetStream's timestamps tell it.
fn unix_now() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// The write's error as the caller reads it.
fn failed(err: WriteError) -> String {
    match err {
        WriteError::Conflict => unavailable("a conflicting write"),
        WriteError::Failed(message) => message,
    }
}

fn unavailable(why: &str) -> String {
    format!("replication: JetStream did not take the call: {why}")
}

/// A write that may or may not have been stored.
fn unknown(why: &str) -> String {
    format!("replication: the write's outcome is unknown (it may still be applied): {why}")
}

/// What the server answered a message of a batch: `Ok(None)` for the empty answer to its
/// first message, `Ok(Some(seq))` for the acknowledgement of its commit.
fn batch_answer(payload: &[u8]) -> Result<Option<u64>, String> {
    if payload.is_empty() {
        return Ok(None);
    }
    let answer: serde_json::Value = serde_json::from_slice(payload)
        .map_err(|_| unavailable("an unreadable answer to a batch"))?;
    if let Some(error) = answer.get("error") {
        let description = error
            .get("description")
            .and_then(|d| d.as_str())
            .unwrap_or("unknown error");
        return Err(unavailable(&format!(
            "the batch was refused: {description}"
        )));
    }
    Ok(answer.get("seq").and_then(|s| s.as_u64()))
}

/// Creates the stream, or checks that the one there can serve.
async fn ensure_stream(
    js: &jetstream::Context,
    name: &str,
    root: &str,
    settings: &Replication,
) -> anyhow::Result<()> {
    // The stream config as JSON: async-nats 0.39 predates the fields for per-message TTLs and
    // atomic batches (nats-server 2.11 and 2.12).
    let config = serde_json::json!({
        "name": name,
        "subjects": [format!("{root}.>")],
        "retention": "limits",
        "max_msgs_per_subject": 1,
        "max_bytes": settings.max_bytes.map_or(-1, |b| b as i64),
        // Full: refuse writes; never drop live entries.
        "discard": "new",
        "storage": if settings.file_storage { "file" } else { "memory" },
        "num_replicas": settings.replicas,
        "allow_direct": true,
        "allow_msg_ttl": true,
        "allow_atomic": true,
    });
    let answer: serde_json::Value = js
        .request(format!("STREAM.CREATE.{name}"), &config)
        .await
        .with_context(|| format!("cannot create JetStream stream {name}: is JetStream on?"))?;
    let Some(error) = answer.get("error") else {
        // A server that does not know a field ignores it: read back what it made.
        return check_stream(js, name, root, settings).await;
    };
    // 10058: a stream of that name exists with another config: used if it can serve.
    // 10074: more than one replica asked of a server without clustering, answered before it
    // looks for the stream: one that exists is used the same way.
    let code = error.get("err_code").and_then(|c| c.as_u64());
    let exists = || async {
        let info = js
            .request::<_, _, serde_json::Value>(
                format!("STREAM.INFO.{name}"),
                &serde_json::json!({}),
            )
            .await;
        info.is_ok_and(|info| info.get("error").is_none())
    };
    if code == Some(10058) || (code == Some(10074) && exists().await) {
        return check_stream(js, name, root, settings).await;
    }
    Err(anyhow!(
        "cannot create JetStream stream {name} (replication needs nats-server 2.12 or later, \
         with JetStream): {}",
        error
            .get("description")
            .and_then(|d| d.as_str())
            .unwrap_or("unknown error")
    ))
}

/// `Ok` when stream `name` has what replication relies on (an older server, or a stream made
/// by hand or for something else, may not), and keeps its entries where `settings` say (a
/// stream's storage cannot change). A size limit or replica count other than `settings`' is
/// the stream's to keep, and said in a warning: instances of an older and a newer config would
/// otherwise undo each other's.
async fn check_stream(
    js: &jetstream::Context,
    name: &str,
    root: &str,
    settings: &Replication,
) -> anyhow::Result<()> {
    let info: serde_json::Value = js
        .request(format!("STREAM.INFO.{name}"), &serde_json::json!({}))
        .await
        .with_context(|| format!("cannot read JetStream stream {name}'s config"))?;
    let config = &info["config"];
    let subjects = format!("{root}.>");
    let mut missing = Vec::new();
    if config["max_msgs_per_subject"].as_i64() != Some(1) {
        missing.push("max_msgs_per_subject 1");
    }
    for flag in ["allow_atomic", "allow_msg_ttl"] {
        if config[flag].as_bool() != Some(true) {
            missing.push(flag);
        }
    }
    let subjects_ok = config["subjects"]
        .as_array()
        .is_some_and(|s| s.len() == 1 && s[0].as_str() == Some(&subjects));
    if !subjects_ok {
        missing.push("the subjects");
    }
    if config["discard"].as_str() != Some("new") {
        missing.push("discard new");
    }
    if config["retention"].as_str() != Some("limits") {
        missing.push("retention limits");
    }
    if config["max_age"].as_i64().unwrap_or(0) != 0 {
        missing.push("no max_age");
    }
    if config["allow_direct"].as_bool() != Some(true) {
        missing.push("allow_direct");
    }
    if config["sealed"].as_bool() == Some(true) || !config["mirror"].is_null() {
        missing.push("writes (it is sealed or a mirror)");
    }
    anyhow::ensure!(
        missing.is_empty(),
        "JetStream stream {name} cannot serve replication: it lacks {} (replication needs \
         nats-server 2.12 or later; a stream of that name made otherwise must be removed, or \
         another jetstream_prefix chosen)",
        missing.join(", ")
    );
    let storage = if settings.file_storage {
        "file"
    } else {
        "memory"
    };
    let has = config["storage"].as_str().unwrap_or("unknown");
    anyhow::ensure!(
        has == storage,
        "JetStream stream {name} keeps its entries in {has} storage, but jetstream_storage = \
         {storage}, and a stream's storage cannot change: go back to {has}, or choose another \
         jetstream_prefix (a new, empty stream), or remove the stream (its entries with it)"
    );
    let max_bytes = settings.max_bytes.map_or(-1, |b| b as i64);
    let replicas = settings.replicas as i64;
    let (has_bytes, has_replicas) = (
        config["max_bytes"].as_i64().unwrap_or(-1),
        config["num_replicas"].as_i64().unwrap_or(1),
    );
    if (has_bytes, has_replicas) != (max_bytes, replicas) {
        warn!(
            stream = name,
            max_bytes = has_bytes,
            replicas = has_replicas,
            jetstream_max_bytes = max_bytes,
            jetstream_replicas = replicas,
            "replication: the stream keeps the size limit and replicas it was made with; this \
             config's differ (change them on the stream, e.g. `nats stream edit`)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replication settings with markers living `tombstone_secs`.
    fn settings(tombstone_secs: &str) -> Replication {
        let map = std::collections::HashMap::from([
            ("replication".to_owned(), "jetstream".to_owned()),
            (
                "jetstream_tombstone_secs".to_owned(),
                tombstone_secs.to_owned(),
            ),
        ]);
        let (settings, problems) = Replication::from_map(&map).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        settings.unwrap()
    }

    #[test]
    fn an_instance_reloads_when_its_oldest_unapplied_write_is_half_a_markers_life_old() {
        let settings = settings("60");
        assert_eq!(settings.tombstone, Duration::from_secs(60));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let old = Some(Duration::from_secs(31));
        let mut lag = LagWatch::default();
        // Before the start caught up: nothing is asked.
        assert_eq!(lag.look(false, 0, 0, 100, at(0), &settings), Look::Nothing);
        // Keeping up: it reached the last sequence of the previous look.
        assert_eq!(lag.look(true, 0, 100, 150, at(1), &settings), Look::Nothing);
        assert_eq!(lag.look(true, 0, 150, 200, at(2), &settings), Look::Nothing);
        // Behind it: the first message it lacks is asked about; young is fine, old reloads.
        assert_eq!(
            lag.look(true, 0, 180, 300, at(3), &settings),
            Look::Ask(181)
        );
        let young = Some(Duration::from_secs(5));
        assert_eq!(lag.judge(180, 300, young, at(3), &settings), Verdict::Fine);
        assert_eq!(
            lag.look(true, 0, 250, 400, at(4), &settings),
            Look::Ask(251)
        );
        assert_eq!(lag.judge(250, 400, old, at(4), &settings), Verdict::Reload);
        lag.reloaded(400, 1, true, at(4));
        // The replay: nothing asked before the applier began it, nor until it reached 400 (its
        // delivered mark from before does not count); a slow one is said once.
        assert_eq!(lag.look(true, 0, 260, 500, at(5), &settings), Look::Nothing);
        assert_eq!(lag.look(true, 1, 10, 600, at(6), &settings), Look::Nothing);
        let slow = lag.look(true, 1, 300, 700, at(40), &settings);
        assert_eq!(slow, Look::SlowReplay { until: 400 });
        assert_eq!(
            lag.look(true, 1, 350, 800, at(41), &settings),
            Look::Nothing
        );
        // Replayed, and behind by more than half a marker's life again (the replay was that
        // slow): reloading would follow itself, so it is said once instead, within a marker's
        // life of the last lag reload.
        assert_eq!(
            lag.look(true, 1, 450, 900, at(42), &settings),
            Look::Ask(451)
        );
        assert_eq!(
            lag.judge(450, 900, old, at(42), &settings),
            Verdict::StillBehind
        );
        assert_eq!(
            lag.look(true, 1, 460, 950, at(43), &settings),
            Look::Ask(461)
        );
        assert_eq!(lag.judge(460, 950, old, at(43), &settings), Verdict::Fine);
        // After a marker's life it may reload again.
        assert_eq!(
            lag.look(true, 1, 470, 990, at(70), &settings),
            Look::Ask(471)
        );
        assert_eq!(lag.judge(470, 990, old, at(70), &settings), Verdict::Reload);
    }

    #[test]
    fn an_expired_tail_is_asked_about_once_until_the_stream_or_the_instance_moves() {
        let settings = settings("3600");
        let t0 = Instant::now();
        let mut lag = LagWatch::default();
        assert_eq!(lag.look(true, 0, 90, 100, t0, &settings), Look::Nothing);
        assert_eq!(lag.look(true, 0, 90, 100, t0, &settings), Look::Ask(91));
        // Nothing after 90: the messages up to 100 expired.
        assert_eq!(lag.judge(90, 100, None, t0, &settings), Verdict::Fine);
        assert_eq!(lag.look(true, 0, 90, 100, t0, &settings), Look::Nothing);
        // The stream grew: asked again.
        assert_eq!(lag.look(true, 0, 90, 101, t0, &settings), Look::Ask(91));
    }

    #[test]
    fn batch_answers_are_read() {
        assert_eq!(batch_answer(b""), Ok(None));
        assert_eq!(
            batch_answer(br#"{"stream":"S","seq":42,"batch":"b","count":3}"#),
            Ok(Some(42))
        );
        let refused = batch_answer(br#"{"error":{"code":400,"description":"batch too large"}}"#);
        assert!(refused.unwrap_err().contains("batch too large"));
        assert!(batch_answer(b"\xff").is_err());
    }
}
