//! The applier: every instance applies the whole stream, in its order, to its own memory.
//!
//! An ordered push consumer (ephemeral, flow-controlled, recreated by async-nats where it left
//! off after a lost heartbeat) delivers the stream from where this instance is. Records of one
//! atomic batch arrive one after the other; they are applied together, once the batch is
//! complete or the next message is not part of it (the stream may have dropped some of its
//! records, replaced by later writes of the same keys). A change is told to watchers on the
//! instance that wrote it only ([`keyvalue_store::quietly`] elsewhere).

use std::time::Duration;

use async_nats::jetstream::consumer::{push, DeliverPolicy};
use futures::StreamExt as _;
use tracing::{debug, warn};

use super::log::{Op, Record};
use super::Replica;

/// Runs for the life of the process.
pub(super) async fn run(replica: Replica) {
    let shared = &replica.inner;
    let mut failures = 0u32;
    loop {
        let start = *shared.applied.borrow() + 1;
        let config = push::OrderedConfig {
            deliver_subject: shared.nats.new_inbox(),
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
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        failures = 0;
        let mut batch = Batch::default();
        loop {
            let next = tokio::select! {
                () = shared.reload.notified() => {
                    batch.flush(&replica);
                    shared.engine.clear();
                    shared.applied.send_replace(0);
                    break;
                }
                next = messages.next() => next,
            };
            let msg = match next {
                None => {
                    batch.flush(&replica);
                    break;
                }
                Some(Err(err)) => {
                    debug!("replication: consumer: {err}");
                    continue;
                }
                Some(Ok(msg)) => msg,
            };
            let Ok(info) = msg.info() else {
                continue;
            };
            let (seq, pending) = (info.stream_sequence, info.pending);
            let tag = Record::decode(&msg.payload).map(|r| (r.origin, r.batch, r.batch_len));
            match tag {
                Err(why) => {
                    warn!(
                        seq,
                        "replication: skipped a message that is no record: {why}"
                    );
                    batch.flush(&replica);
                    mark(&replica, seq);
                }
                Ok((_, 0, _)) => {
                    batch.flush(&replica);
                    apply(&replica, std::slice::from_ref(&msg.message.payload));
                    mark(&replica, seq);
                }
                Ok((origin, id, len)) => {
                    if batch.id != (origin, id) {
                        batch.flush(&replica);
                        batch.id = (origin, id);
                    }
                    batch.records.push(msg.message.payload.clone());
                    batch.last = seq;
                    if batch.records.len() >= len as usize || pending == 0 {
                        batch.flush(&replica);
                    }
                }
            }
        }
    }
}

/// The records of one atomic batch seen so far.
#[derive(Default)]
struct Batch {
    id: (u64, u64),
    records: Vec<bytes::Bytes>,
    last: u64,
}

impl Batch {
    fn flush(&mut self, replica: &Replica) {
        if !self.records.is_empty() {
            apply(replica, &self.records);
            mark(replica, self.last);
        }
        self.records.clear();
        self.id = (0, 0);
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

/// Applies records (one, or one batch's: one namespace and bucket, one op) at once.
fn apply(replica: &Replica, records: &[bytes::Bytes]) {
    let records: Vec<Record<'_>> = records
        .iter()
        .filter_map(|bytes| Record::decode(bytes).ok())
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
    if first.origin == replica.inner.origin {
        run();
    } else {
        keyvalue_store::quietly(run);
    }
}
