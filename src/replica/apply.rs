//! The applier: every instance applies the whole stream, in its order, to its own memory.
//!
//! An ordered pull consumer (ephemeral, 500 messages a fetch: a new instance catches up on a
//! million keys about a quarter faster than with a push consumer) delivers the stream from
//! where this instance is. It is made again from there on any error (async-nats's own
//! re-creation gives up after a few tries), and when it stops delivering while the stream has
//! more (`Replica::watch_stream`; seen after a 20 s outage). Records of one
//! atomic batch arrive one after the other; they are applied together, once the batch is
//! complete or the next message is not part of it (the stream may have dropped some of its
//! records, replaced by later writes of the same keys). A change is told to watchers on the
//! instance that wrote it only ([`keyvalue_store::quietly`] elsewhere).

use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use futures::StreamExt as _;
use tracing::{debug, warn};

use super::log::{self, Op, Record};
use super::Replica;

/// Runs for the life of the process.
pub(super) async fn run(replica: Replica) {
    let shared = &replica.inner;
    let mut failures = 0u32;
    // After a reload, until the stream is applied again: changes are not told to watchers a
    // second time.
    let mut replaying = false;
    // The stream's last sequence, asked for when a jump needs it: (the consumer it was asked
    // for, jumps seen when asked, the answer).
    let (asked_tx, mut asked_rx) =
        tokio::sync::mpsc::unbounded_channel::<(u64, u64, Option<u64>)>();
    let mut session = 0u64;
    loop {
        session += 1;
        if failures > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let start = *shared.applied.borrow() + 1;
        let config = pull::OrderedConfig {
            filter_subject: format!("{}.>", shared.root),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ..Default::default()
        };
        let messages = match shared.stream.create_consumer(config).await {
            Ok(consumer) => consumer.messages().await.map_err(|e| e.to_string()),
            Err(err) => Err(err.to_string()),
        };
        let mut messages = match messages {
            Ok(messages) => messages,
            Err(err) => {
                if failures % 30 == 0 {
                    warn!("replication: cannot read the stream (trying again): {err}");
                }
                failures += 1;
                continue;
            }
        };
        failures = 0;
        let mut batch = Batch::default();
        let mut progress = Progress::new(start - 1);
        shared.delivered.store(start - 1, Ordering::Relaxed);
        let mut asking = false;
        let mut idle = tokio::time::interval(IDLE_CHECK);
        idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // A jump waits for the stream's last sequence learned after it.
            if !asking && progress.wants_target() {
                asking = true;
                let (replica, tx, jumps) = (replica.clone(), asked_tx.clone(), progress.jumps);
                tokio::spawn(async move {
                    let last = replica.last_sequence().await.ok();
                    if last.is_none() {
                        // JetStream is away: not asked again at once.
                        tokio::time::sleep(IDLE_CHECK).await;
                    }
                    let _ = tx.send((session, jumps, last));
                });
            }
            let next = tokio::select! {
                () = shared.restart.notified() => {
                    failures = 1;
                    break;
                }
                () = shared.reload.notified() => {
                    shared.applied.send_replace(0);
                    // From the start again (the stream watcher reads both).
                    shared.delivered.store(0, Ordering::Relaxed);
                    let asked = shared.reloads.load(Ordering::Acquire);
                    shared.reloads_begun.store(asked, Ordering::Release);
                    shared.engine.clear();
                    if let Some(then) = shared.after_reload.get() {
                        then();
                    }
                    replaying = true;
                    break;
                }
                Some((asked_in, jumps, last)) = asked_rx.recv() => {
                    if asked_in != session {
                        // Asked for a consumer made again since: its jumps are not these.
                        continue;
                    }
                    asking = false;
                    if let Some(last) = last {
                        progress.target(jumps, last);
                    }
                    mark(&replica, progress.watermark());
                    continue;
                }
                _ = idle.tick(), if progress.waiting() || batch.open() => {
                    // Nothing more arrived: the rest of what is waited for may be gone (the
                    // end of the stream expired, or a batch's last records were replaced).
                    let delivered = progress.delivered;
                    if replica.next_exists(delivered + 1).await == Ok(false) {
                        if let Some(last) = batch.flush(&replica, !replaying) {
                            progress.applied_through(last);
                        }
                        progress.nothing_after();
                        mark(&replica, progress.watermark());
                    }
                    continue;
                }
                next = messages.next() => next,
            };
            let msg = match next {
                Some(Ok(msg)) => msg,
                // Made again from where this instance is (what was delivered of an unfinished
                // batch is delivered again): the ordered consumer gives up re-creating itself
                // after a few tries, and then only answers errors.
                Some(Err(err)) => {
                    debug!("replication: consumer: {err}; making it again");
                    failures = 1;
                    break;
                }
                None => break,
            };
            let Ok(info) = msg.info() else {
                continue;
            };
            let (seq, pending) = (info.stream_sequence, info.pending);
            if seq <= progress.delivered {
                continue;
            }
            // A batch whose end this message is past is complete, or the rest of it is gone.
            if batch.ends_before(seq) {
                if let Some(last) = batch.flush(&replica, !replaying) {
                    progress.applied_through(last);
                }
            }
            progress.delivered_one(seq);
            shared.delivered.store(seq, Ordering::Relaxed);
            let stored = info.published.unix_timestamp_nanos();
            let now = super::unix_now().as_nanos() as i128;
            // How stale this instance was for this write (not while it catches up at its
            // start: that measures the backlog).
            if shared.caught_up.load(Ordering::Relaxed) && !replaying {
                let lag = u64::try_from(now - stored).unwrap_or(0);
                shared.lag.record(Duration::from_nanos(lag));
            }
            let tell = !replaying;
            let record = (msg.message.subject.clone(), msg.message.payload.clone());
            match Record::decode(&record.1) {
                Err(why) => {
                    warn!(
                        seq,
                        "replication: skipped a message that is no record: {why}"
                    );
                    batch.flush(&replica, tell);
                    progress.applied_through(seq);
                }
                Ok(r) if r.batch == 0 => {
                    batch.flush(&replica, tell);
                    apply(&replica, std::slice::from_ref(&record), tell);
                    progress.applied_through(seq);
                }
                Ok(r) => {
                    if batch.id != (r.origin, r.batch) {
                        if let Some(last) = batch.flush(&replica, tell) {
                            progress.applied_through(last);
                        }
                        batch.id = (r.origin, r.batch);
                        // The batch's records have consecutive sequences.
                        let first = seq.saturating_sub(u64::from(r.batch_index));
                        batch.end = first.saturating_add(u64::from(r.batch_len.max(1)) - 1);
                    }
                    batch.records.push(record);
                    batch.last = seq;
                    // A batch we write has at most MAX_BATCH records; a record claiming a
                    // larger one is not ours, and holds no more than that.
                    if seq >= batch.end || batch.records.len() >= super::MAX_BATCH {
                        if let Some(last) = batch.flush(&replica, tell) {
                            progress.applied_through(last);
                        }
                    }
                }
            }
            if pending == 0 {
                replaying = false;
            }
            mark(&replica, progress.watermark());
        }
    }
}

/// How long the applier waits for more before it asks whether what it waits for is gone.
const IDLE_CHECK: Duration = Duration::from_millis(100);

/// Where the applier is in the stream.
///
/// A jump in the delivered sequences means the messages between are gone from the stream:
/// replaced by later writes of their keys (or expired). A read must not take such a message as
/// applied before the write that replaced it is, and that write may not be delivered yet. So
/// after a jump the watermark stays where the jump began until a sequence learned from the
/// stream after the jump (its last, then) is delivered: the replacing write is at or before it.
struct Progress {
    /// The last sequence delivered.
    delivered: u64,
    /// Every message up to here is applied (but for the jumps' holds).
    applied: u64,
    /// Jumps seen so far.
    jumps: u64,
    /// The unresolved jumps, oldest first: where each began, the jumps seen when it was seen,
    /// and the sequence to deliver before it is resolved, once learned.
    holds: std::collections::VecDeque<(u64, u64, Option<u64>)>,
}

impl Progress {
    fn new(applied: u64) -> Self {
        Self {
            delivered: applied,
            applied,
            jumps: 0,
            holds: std::collections::VecDeque::new(),
        }
    }

    fn delivered_one(&mut self, seq: u64) {
        if seq > self.delivered + 1 {
            self.jumps += 1;
            self.holds.push_back((self.delivered, self.jumps, None));
        }
        self.delivered = seq;
        self.release();
    }

    /// Some jump waits for a sequence to be learned.
    fn wants_target(&self) -> bool {
        self.holds.iter().any(|(_, _, target)| target.is_none())
    }

    /// Holds (or anything else) are waited on: worth checking whether the rest is gone.
    fn waiting(&self) -> bool {
        !self.holds.is_empty()
    }

    /// The stream's last sequence was `last` when asked, `jumps` jumps having been seen: it
    /// resolves those jumps once delivered.
    fn target(&mut self, jumps: u64, last: u64) {
        for (_, seen, target) in &mut self.holds {
            if *seen <= jumps && target.is_none() {
                *target = Some(last);
            }
        }
        self.release();
    }

    /// Nothing exists in the stream past the delivered sequence: every jump seen is resolved
    /// (what replaced the skipped messages, stored before the jump was seen, is delivered).
    fn nothing_after(&mut self) {
        self.holds.clear();
    }

    fn release(&mut self) {
        while let Some(&(_, _, Some(target))) = self.holds.front() {
            if self.delivered < target {
                break;
            }
            self.holds.pop_front();
        }
    }

    fn applied_through(&mut self, seq: u64) {
        self.applied = self.applied.max(seq);
    }

    fn watermark(&self) -> u64 {
        self.holds
            .front()
            .map_or(self.applied, |&(at, _, _)| self.applied.min(at))
    }
}

/// The records of one atomic batch seen so far.
#[derive(Default)]
struct Batch {
    id: (u64, u64),
    records: Vec<(async_nats::Subject, bytes::Bytes)>,
    /// The last sequence seen of it, and the last it can have.
    last: u64,
    end: u64,
}

impl Batch {
    fn open(&self) -> bool {
        !self.records.is_empty()
    }

    /// Message `seq` is past this batch.
    fn ends_before(&self, seq: u64) -> bool {
        self.open() && seq > self.end
    }

    /// Applies what the batch holds; answers the last sequence it applied.
    fn flush(&mut self, replica: &Replica, tell: bool) -> Option<u64> {
        let applied = (!self.records.is_empty()).then(|| {
            apply(replica, &self.records, tell);
            self.last
        });
        self.records.clear();
        self.id = (0, 0);
        applied
    }
}

/// Everything up to `seq` is applied.
fn mark(replica: &Replica, seq: u64) {
    replica.inner.applied.send_if_modified(|at| {
        let moved = *at < seq;
        if moved {
            *at = seq;
        }
        moved
    });
}

/// Applies records (one, or one batch's: one namespace and bucket, one op) at once. A record
/// on a subject that is not its entry's (published there by someone else) is skipped: it would
/// outlive the entry's later writes. `tell`: changes this instance made go to its watchers.
fn apply(replica: &Replica, records: &[(async_nats::Subject, bytes::Bytes)], tell: bool) {
    let root = &replica.inner.root;
    let records: Vec<Record<'_>> = records
        .iter()
        .filter_map(|(subject, bytes)| {
            let record = Record::decode(bytes).ok()?;
            let own =
                subject.as_str() == log::subject(root, record.namespace, record.bucket, record.key);
            if !own {
                warn!(%subject, "replication: skipped a record on a subject not its own");
            }
            own.then_some(record)
        })
        .collect();
    let Some(first) = records.first() else {
        return;
    };
    let engine = &replica.inner.engine;
    let same = |r: &Record<'_>| {
        (r.namespace, r.bucket, r.op, r.deadline_ms)
            == (first.namespace, first.bucket, first.op, first.deadline_ms)
    };
    let run = || {
        if records.iter().all(same) {
            match first.op {
                Op::Set => engine.apply_set_many(
                    first.namespace,
                    first.bucket,
                    records.iter().map(|r| (r.key, r.value)),
                    first.deadline_ms,
                ),
                Op::Delete => engine.apply_delete(
                    first.namespace,
                    first.bucket,
                    records.iter().map(|r| r.key),
                ),
            }
        } else {
            // Not a batch we write: one record at a time.
            for r in &records {
                match r.op {
                    Op::Set => {
                        engine.apply_set(r.namespace, r.bucket, r.key, r.value, r.deadline_ms)
                    }
                    Op::Delete => engine.apply_delete(r.namespace, r.bucket, [r.key]),
                }
            }
        }
    };
    if tell && first.origin == replica.inner.origin {
        run();
    } else {
        keyvalue_store::quietly(run);
    }
}

#[cfg(test)]
mod tests {
    use super::Progress;

    #[test]
    fn the_watermark_waits_for_the_writes_that_replaced_skipped_messages() {
        let mut p = Progress::new(99);
        // 100 (K=1) was replaced by 102 (K=2) before delivery: 101 arrives.
        p.delivered_one(101);
        p.applied_through(101);
        assert_eq!(
            p.watermark(),
            99,
            "K=1 is not applied: 100 may not count as done"
        );
        assert!(p.wants_target());
        // The stream's last sequence, learned after the jump, is 102.
        p.target(1, 102);
        assert_eq!(p.watermark(), 99);
        p.delivered_one(102);
        p.applied_through(102);
        assert_eq!(p.watermark(), 102);
        // Contiguous deliveries move it at once.
        p.delivered_one(103);
        p.applied_through(103);
        assert_eq!(p.watermark(), 103);
        // A sequence learned before a jump was seen does not resolve it.
        p.delivered_one(110);
        p.applied_through(110);
        p.target(1, 110);
        assert_eq!(p.watermark(), 103);
        p.target(2, 112);
        p.delivered_one(111);
        p.applied_through(111);
        assert_eq!(p.watermark(), 103);
        p.delivered_one(112);
        p.applied_through(112);
        assert_eq!(p.watermark(), 112);
        // A jump at the end of the stream: nothing after it is resolved by looking.
        p.delivered_one(120);
        p.applied_through(120);
        assert_eq!(p.watermark(), 112);
        p.nothing_after();
        assert_eq!(p.watermark(), 120);
    }
}
