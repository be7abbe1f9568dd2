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
    loop {
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
        loop {
            let next = tokio::select! {
                () = shared.restart.notified() => {
                    failures = 1;
                    break;
                }
                () = shared.reload.notified() => {
                    shared.engine.clear();
                    shared.applied.send_replace(0);
                    replaying = true;
                    break;
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
            progress.delivered_one(seq, pending);
            let stored = info.published.unix_timestamp_nanos();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos() as i128;
            // How stale this instance was for this write (not while it catches up at its
            // start: that measures the backlog).
            if shared.caught_up.load(std::sync::atomic::Ordering::Relaxed) && !replaying {
                let lag = u64::try_from(now - stored).unwrap_or(0);
                shared.lag.record(Duration::from_nanos(lag));
            }
            let tell = !replaying;
            let record = (msg.message.subject.clone(), msg.message.payload.clone());
            let tag = Record::decode(&record.1).map(|r| (r.origin, r.batch, r.batch_len));
            match tag {
                Err(why) => {
                    warn!(
                        seq,
                        "replication: skipped a message that is no record: {why}"
                    );
                    batch.flush(&replica, tell);
                    progress.applied_through(seq);
                }
                Ok((_, 0, _)) => {
                    batch.flush(&replica, tell);
                    apply(&replica, std::slice::from_ref(&record), tell);
                    progress.applied_through(seq);
                }
                Ok((origin, id, len)) => {
                    if batch.id != (origin, id) {
                        if let Some(last) = batch.flush(&replica, tell) {
                            progress.applied_through(last);
                        }
                        batch.id = (origin, id);
                    }
                    batch.records.push(record);
                    batch.last = seq;
                    // Complete, or the rest of it is gone from the stream (replaced).
                    if batch.records.len() >= len as usize || pending == 0 {
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

/// Where the applier is in the stream.
struct Progress {
    /// The last sequence delivered.
    delivered: u64,
    /// Every message up to here is applied.
    applied: u64,
    /// After a jump in the delivered sequences, the watermark stays where the jump began until
    /// `left` more messages are applied: the messages that were skipped are gone from the
    /// stream, and one replaced by a later write of its key (not yet delivered) must not be
    /// seen as applied before that write is.
    hold: Option<(u64, u64)>,
}

impl Progress {
    fn new(applied: u64) -> Self {
        Self {
            delivered: applied,
            applied,
            hold: None,
        }
    }

    /// Message `seq` arrived, `pending` more being in the stream after it.
    fn delivered_one(&mut self, seq: u64, pending: u64) {
        if seq > self.delivered + 1 {
            // The replacing writes are among the `pending` messages after this one.
            let (at, left) = self.hold.unwrap_or((self.delivered, 0));
            self.hold = Some((at.min(self.delivered), left.max(pending + 1)));
        }
        self.delivered = seq;
        if let Some((at, left)) = self.hold {
            let left = left.saturating_sub(1);
            self.hold = (left > 0 && pending > 0).then_some((at, left));
        }
    }

    fn applied_through(&mut self, seq: u64) {
        self.applied = self.applied.max(seq);
    }

    fn watermark(&self) -> u64 {
        self.hold
            .map_or(self.applied, |(at, _)| self.applied.min(at))
    }
}

/// The records of one atomic batch seen so far.
#[derive(Default)]
struct Batch {
    id: (u64, u64),
    records: Vec<(async_nats::Subject, bytes::Bytes)>,
    last: u64,
}

impl Batch {
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
        // 100 (K=1) was replaced by 102 (K=2) before delivery: 101 arrives, 102 pending.
        p.delivered_one(101, 1);
        p.applied_through(101);
        assert_eq!(
            p.watermark(),
            99,
            "K=1 is not applied: 100 may not count as done"
        );
        p.delivered_one(102, 0);
        p.applied_through(102);
        assert_eq!(p.watermark(), 102);
        // Contiguous deliveries move it at once.
        p.delivered_one(103, 5);
        p.applied_through(103);
        assert_eq!(p.watermark(), 103);
        // A second jump while holding keeps the earliest point and the longest wait.
        p.delivered_one(110, 3);
        p.applied_through(110);
        p.delivered_one(112, 1);
        p.applied_through(112);
        assert_eq!(p.watermark(), 103);
        p.delivered_one(113, 0);
        p.applied_through(113);
        assert_eq!(p.watermark(), 113);
    }
}
