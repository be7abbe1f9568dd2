//! `increment` across instances: exact under any contention.
//!
//! The counter's last message is read from JetStream (a direct get: the stream's own state,
//! not this instance's), the sum is published on condition that the subject's last message
//! is still that one (`Nats-Expected-Last-Subject-Sequence`), and on a conflict the counter
//! is read again: there is no retry budget, only the call's time. Increments of one key that
//! wait on one instance are summed into one write (each caller gets the value after its own
//! delta, as if they had run one after the other), so a hot key costs one round of JetStream
//! per batch of callers, not per caller.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::stream::{DirectGetErrorKind, LastRawMessageErrorKind};
use dashmap::DashMap;
use keyvalue_store::EngineError;
use tokio::sync::oneshot;

use super::log::{self, Op, Record};
use super::{unavailable, unknown, Replica, WriteError};
use crate::bindings::exports::wrpc::keyvalue::store::Error;

/// The counters with increments waiting, by subject.
#[derive(Default)]
pub(super) struct Counters {
    keys: DashMap<String, Arc<Counter>>,
}

#[derive(Default)]
struct Counter {
    waiting: Mutex<Vec<Waiting>>,
    /// A task is writing this counter's waiting increments.
    running: AtomicBool,
}

struct Waiting {
    delta: u64,
    deadline_ms: u64,
    /// When its caller stops waiting.
    until: Instant,
    answer: oneshot::Sender<Result<u64, Error>>,
}

/// Where one counter is.
struct Names {
    subject: String,
    ns: String,
    bucket: String,
    key: String,
}

pub(super) async fn increment(
    replica: &Replica,
    (ns, bucket, key): (&str, &str, &str),
    delta: u64,
    deadline_ms: u64,
    until: Instant,
) -> Result<u64, Error> {
    let subject = log::subject(&replica.inner.root, ns, bucket, key);
    let counter = Arc::clone(
        &*replica
            .inner
            .counters
            .keys
            .entry(subject.clone())
            .or_default(),
    );
    let (answer, answered) = oneshot::channel();
    lock(&counter.waiting).push(Waiting {
        delta,
        deadline_ms,
        until,
        answer,
    });
    if !counter.running.swap(true, Ordering::AcqRel) {
        let names = Names {
            subject,
            ns: ns.to_owned(),
            bucket: bucket.to_owned(),
            key: key.to_owned(),
        };
        tokio::spawn(lead(replica.clone(), names, counter));
    }
    // The leader answers by its round's deadline, which ends before ours.
    match tokio::time::timeout_at(until.into(), answered).await {
        Ok(Ok(answer)) => answer,
        _ => Err(Error::Other(unknown("it was not answered in time"))),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Writes the counter's waiting increments, a batch at a time, until none wait.
async fn lead(replica: Replica, names: Names, counter: Arc<Counter>) {
    loop {
        let mut batch = std::mem::take(&mut *lock(&counter.waiting));
        // A caller that stopped waiting, or cannot get its answer in time, is not counted.
        let now = Instant::now();
        batch.retain(|waiting| !waiting.answer.is_closed() && waiting.until > now + MARGIN);
        if batch.is_empty() {
            counter.running.store(false, Ordering::Release);
            // An increment queued after the take may have seen us running: look again, unless
            // it already started a leader of its own.
            if lock(&counter.waiting).is_empty() || counter.running.swap(true, Ordering::AcqRel) {
                break;
            }
            continue;
        }
        let answers = add(&replica, &names, &batch).await;
        for (waiting, answer) in batch.into_iter().zip(answers) {
            let _ = waiting.answer.send(answer);
        }
    }
    (replica.inner.counters.keys).remove_if(&names.subject, |_, c| {
        Arc::ptr_eq(c, &counter)
            && !c.running.load(Ordering::Acquire)
            && lock(&c.waiting).is_empty()
    });
}

/// How long before its first caller stops waiting a round gives up: room for its answer.
const MARGIN: Duration = Duration::from_millis(50);

/// Adds the batch's deltas in one conditional write; answers each caller's value. A round
/// ends [`MARGIN`] before the first of its callers stops waiting.
async fn add(replica: &Replica, names: &Names, batch: &[Waiting]) -> Vec<Result<u64, Error>> {
    let all = |err: Error| batch.iter().map(|_| Err(err.clone())).collect();
    let first = batch.iter().map(|w| w.until).min();
    let until = first.unwrap_or_else(Instant::now) - MARGIN;
    let mut leader = false;
    loop {
        if Instant::now() >= until {
            return all(Error::Other(unavailable(
                "the counter kept changing for the whole of jetstream_timeout_ms",
            )));
        }
        let read = tokio::time::timeout_at(until.into(), current(replica, names, leader)).await;
        let (current, last_seq) = match read {
            Ok(Ok(found)) => found,
            Ok(Err(err)) => return all(Error::Other(err)),
            Err(_) => return all(Error::Other(unavailable("did not answer in time"))),
        };
        let base = match current {
            None => 0,
            Some(value) => match keyvalue_store::parse_counter(&value) {
                Some(n) => n,
                None => {
                    return all(Error::Other(
                        EngineError::NotACounter {
                            key: names.key.clone(),
                        }
                        .to_string(),
                    ))
                }
            },
        };
        let mut total = base;
        let answers: Vec<Result<u64, Error>> = batch
            .iter()
            .map(|w| match total.checked_add(w.delta) {
                Some(next) => {
                    total = next;
                    Ok(next)
                }
                None => Err(Error::Other(
                    EngineError::Overflow {
                        key: names.key.clone(),
                        delta: w.delta,
                    }
                    .to_string(),
                )),
            })
            .collect();
        if answers.iter().all(Result::is_err) {
            return answers;
        }
        let text = total.to_string();
        let engine = &replica.inner.engine;
        if let Err(refused) =
            engine.admits(&names.ns, &names.bucket, [(&*names.key, text.as_bytes())])
        {
            if let Some(limit) = refused.limit() {
                crate::telemetry::metrics().rejection(limit);
            }
            return all(Error::Other(refused.to_string()));
        }
        // The TTL of the last increment that counts, as a local increment renews it.
        let deadline_ms = (batch.iter().zip(&answers))
            .filter(|(_, a)| a.is_ok())
            .map(|(w, _)| w.deadline_ms)
            .next_back()
            .unwrap_or(0);
        let entry = vec![(names.key.as_str(), text.as_bytes())];
        let out = match replica.records(Op::Set, (&names.ns, &names.bucket), entry, deadline_ms) {
            Ok(out) => out,
            Err(message) => return all(Error::Other(message)),
        };
        match replica.write(out, Some(last_seq), until).await {
            Ok(_) => return answers,
            // Read again, from the leader: a replica that is behind would lose again.
            Err(WriteError::Conflict) => leader = true,
            Err(WriteError::Failed(message)) => return all(Error::Other(message)),
        }
    }
}

/// The counter's live value in the stream (`None`: missing, deleted or expired) and the
/// sequence of the subject's last message (0: none): a direct get (any replica answers, the
/// cheapest read), or asked of the stream's leader. A stale answer only costs a conflict.
async fn current(
    replica: &Replica,
    names: &Names,
    leader: bool,
) -> Result<(Option<Vec<u8>>, u64), String> {
    let stream = &replica.inner.stream;
    let found = if leader {
        match stream.get_last_raw_message_by_subject(&names.subject).await {
            Ok(msg) => Some((msg.payload, msg.sequence)),
            Err(err) if err.kind() == LastRawMessageErrorKind::NoMessageFound => None,
            Err(err) => return Err(unavailable(&err.to_string())),
        }
    } else {
        match stream.direct_get_last_for_subject(&names.subject).await {
            Ok(msg) => Some((msg.payload, msg.sequence)),
            Err(err) if err.kind() == DirectGetErrorKind::NotFound => None,
            Err(err) => return Err(unavailable(&err.to_string())),
        }
    };
    let Some((payload, sequence)) = found else {
        return Ok((None, 0));
    };
    let now_ms = super::unix_now().as_millis() as u64;
    let value = match Record::decode(&payload) {
        Ok(r)
            if r.op == Op::Set
                && (r.namespace, r.bucket, r.key)
                    == (names.ns.as_str(), names.bucket.as_str(), names.key.as_str())
                && (r.deadline_ms == 0 || r.deadline_ms > now_ms) =>
        {
            Some(r.value.to_vec())
        }
        // A delete, an expired value, or a message that is not ours: no counter.
        _ => None,
    };
    Ok((value, sequence))
}
