//! Properties of the engine under concurrency and churn, beyond the sequential model test in
//! `src/engine.rs` of this crate:
//! - histories of concurrent set / delete / increment / get on one key are linearizable;
//! - list-keys paging under random churn lists every key that exists for the whole listing
//!   exactly once, never lists a key twice, and never lists a key that was never written;
//! - under limits, concurrent histories of sets, batches, increments and deletes never pass a
//!   limit, not even for a moment, end with exact usage figures, and never refuse a write that
//!   no serial order refuses (an overwrite that adds neither a key nor a byte).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Barrier};
use std::time::Instant;

use keyvalue_store::{Engine, Limits};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Set(Vec<u8>),
    Delete,
    Increment(u64),
    Get,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Ret {
    Done,
    Value(Option<Vec<u8>>),
    Count(Result<u64, ()>),
}

/// The sequential specification of one key.
fn apply(state: &Option<Vec<u8>>, op: &Op) -> (Option<Vec<u8>>, Ret) {
    match op {
        Op::Set(v) => (Some(v.clone()), Ret::Done),
        Op::Delete => (None, Ret::Done),
        Op::Get => (state.clone(), Ret::Value(state.clone())),
        Op::Increment(d) => {
            let current = match state {
                None => Some(0),
                Some(v) => std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok()),
            };
            match current.and_then(|c| c.checked_add(*d)) {
                Some(n) => (Some(n.to_string().into_bytes()), Ret::Count(Ok(n))),
                None => (state.clone(), Ret::Count(Err(()))),
            }
        }
    }
}

struct Event {
    op: Op,
    ret: Ret,
    start: Instant,
    end: Instant,
}

/// Wing & Gong: is there an order of the events, respecting real time (an event that ended
/// before another started comes first), in which the specification gives every result seen?
fn linearizable(events: &[Event], done: &mut Vec<bool>, state: &Option<Vec<u8>>) -> bool {
    if done.iter().all(|d| *d) {
        return true;
    }
    // Candidates: not done, and no pending event ended before it started.
    let earliest_end = events
        .iter()
        .zip(done.iter())
        .filter(|(_, d)| !**d)
        .map(|(e, _)| e.end)
        .min()
        .expect("some event is pending");
    for i in 0..events.len() {
        if done[i] || events[i].start > earliest_end {
            continue;
        }
        let (next, ret) = apply(state, &events[i].op);
        if ret != events[i].ret {
            continue;
        }
        done[i] = true;
        if linearizable(events, done, &next) {
            return true;
        }
        done[i] = false;
    }
    false
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        // Values that are counters and values that are not, so increments meet both.
        prop_oneof![
            Just(b"7".to_vec()),
            Just(b"x".to_vec()),
            Just(b"18446744073709551615".to_vec())
        ]
        .prop_map(Op::Set),
        Just(Op::Delete),
        (0..5u64).prop_map(Op::Increment),
        Just(Op::Get),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn single_key_histories_are_linearizable(
        threads in proptest::collection::vec(proptest::collection::vec(op(), 1..5), 2..4)
    ) {
        let engine = Arc::new(Engine::new(Limits::UNLIMITED));
        let barrier = Arc::new(Barrier::new(threads.len()));
        let handles: Vec<_> = threads
            .into_iter()
            .map(|ops| {
                let (engine, barrier) = (engine.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    ops.into_iter()
                        .map(|op| {
                            let start = Instant::now();
                            let ret = match &op {
                                Op::Set(v) => {
                                    engine.set("ns", "b", "k", v).unwrap();
                                    Ret::Done
                                }
                                Op::Delete => {
                                    engine.delete("ns", "b", "k");
                                    Ret::Done
                                }
                                Op::Get => Ret::Value(engine.get("ns", "b", "k").map(|v| v.to_vec())),
                                Op::Increment(d) => {
                                    Ret::Count(engine.increment("ns", "b", "k", *d).map_err(|_| ()))
                                }
                            };
                            Event { op, ret, start, end: Instant::now() }
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let events: Vec<Event> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
        let mut done = vec![false; events.len()];
        prop_assert!(
            linearizable(&events, &mut done, &None),
            "not linearizable: {:?}",
            events.iter().map(|e| (&e.op, &e.ret)).collect::<Vec<_>>()
        );
    }
}

#[derive(Clone, Debug)]
enum Churn {
    Page,
    Insert(u16),
    Delete(u16),
}

fn churn() -> impl Strategy<Value = Churn> {
    prop_oneof![
        3 => Just(Churn::Page),
        2 => (0..400u16).prop_map(Churn::Insert),
        2 => (0..400u16).prop_map(Churn::Delete),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn paging_under_churn_lists_stable_keys_exactly_once(
        initial in proptest::collection::btree_set(0..400u16, 0..120),
        page_size in 1..20usize,
        steps in proptest::collection::vec(churn(), 0..200),
    ) {
        let engine = Engine::new(Limits { list_page_size: page_size, ..Limits::UNLIMITED });
        let key = |n: u16| format!("key-{n:03}");
        for &n in &initial {
            engine.set("ns", "b", &key(n), b"v").unwrap();
        }
        // Keys touched (inserted or deleted) during the listing may or may not be listed.
        let mut touched = BTreeSet::new();
        let mut ever = initial.iter().map(|&n| key(n)).collect::<BTreeSet<_>>();
        let mut listed: HashMap<String, usize> = HashMap::new();
        let mut cursor = None;
        let mut finished = false;
        let mut first = true;
        let mut steps = steps.into_iter();
        while !finished {
            match steps.next().unwrap_or(Churn::Page) {
                Churn::Page => {
                    let page = engine.list_keys("ns", "b", if first { None } else { cursor }).unwrap();
                    first = false;
                    prop_assert!(page.keys.len() <= page_size);
                    prop_assert!(page.keys.windows(2).all(|w| w[0] < w[1]), "page not sorted");
                    for k in page.keys {
                        *listed.entry(k).or_default() += 1;
                    }
                    cursor = page.cursor;
                    finished = cursor.is_none();
                }
                Churn::Insert(n) => {
                    engine.set("ns", "b", &key(n), b"new").unwrap();
                    touched.insert(key(n));
                    ever.insert(key(n));
                }
                Churn::Delete(n) => {
                    engine.delete("ns", "b", &key(n));
                    touched.insert(key(n));
                }
            }
        }
        for (k, count) in &listed {
            prop_assert_eq!(*count, 1, "{} listed {} times", k, count);
            prop_assert!(ever.contains(k), "{} listed but never written", k);
        }
        for n in &initial {
            let k = key(*n);
            if !touched.contains(&k) {
                prop_assert!(listed.contains_key(&k), "{} existed throughout but was not listed", k);
            }
        }
    }
}

/// One writer's step in the limits property.
#[derive(Clone, Debug)]
enum LimitOp {
    /// Overwrite a permanent key with a value of its size: no serial order refuses it.
    Overwrite(u8),
    Set(u8, u8),
    SetMany(Vec<(u8, u8)>),
    Delete(u8),
    Increment(u8),
}

fn limit_op() -> impl Strategy<Value = LimitOp> {
    prop_oneof![
        2 => (0u8..2).prop_map(LimitOp::Overwrite),
        3 => (0u8..4, 0u8..6).prop_map(|(k, n)| LimitOp::Set(k, n)),
        2 => prop::collection::vec((0u8..4, 0u8..6), 1..4).prop_map(LimitOp::SetMany),
        3 => (0u8..4).prop_map(LimitOp::Delete),
        1 => (0u8..4).prop_map(LimitOp::Increment),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn concurrent_histories_never_pass_a_limit_nor_refuse_what_fits(
        threads in prop::collection::vec(prop::collection::vec(limit_op(), 50..200), 2..4),
    ) {
        // Two permanent keys of 4 bytes (p0, p1, values of 2 bytes), up to four more keys.
        let limits = Limits { max_keys: 4, max_total_bytes: 24, ..Limits::UNLIMITED };
        let engine = Arc::new(Engine::new(limits));
        for p in 0..2 {
            engine.set("ns", "b", &format!("p{p}"), b"00").unwrap();
        }
        let barrier = Arc::new(Barrier::new(threads.len() + 1));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let monitor = {
            let (engine, stop) = (engine.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut worst = (0, 0);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (keys, bytes) = engine.namespace_usage("ns");
                    worst = (worst.0.max(keys), worst.1.max(bytes.max(engine.usage().bytes)));
                }
                worst
            })
        };
        let handles: Vec<_> = threads
            .into_iter()
            .map(|ops| {
                let (engine, barrier) = (engine.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let mut wrongly_refused = Vec::new();
                    for op in ops {
                        let key = |k: u8| format!("k{k}");
                        let value = |n: u8| vec![b'v'; n as usize];
                        match &op {
                            LimitOp::Overwrite(p) => {
                                if let Err(err) = engine.set("ns", "b", &format!("p{p}"), b"11") {
                                    wrongly_refused.push(format!("{op:?}: {err}"));
                                }
                            }
                            LimitOp::Set(k, n) => drop(engine.set("ns", "b", &key(*k), &value(*n))),
                            LimitOp::SetMany(pairs) => {
                                let pairs: Vec<(String, Vec<u8>)> =
                                    pairs.iter().map(|(k, n)| (key(*k), value(*n))).collect();
                                drop(engine.set_many(
                                    "ns",
                                    "b",
                                    pairs.iter().map(|(k, v)| (k.as_str(), &v[..])),
                                ));
                            }
                            LimitOp::Delete(k) => engine.delete("ns", "b", &key(*k)),
                            LimitOp::Increment(k) => drop(engine.increment("ns", "b", &key(*k), 1)),
                        }
                    }
                    wrongly_refused
                })
            })
            .collect();
        barrier.wait();
        let mut wrongly_refused = Vec::new();
        for handle in handles {
            wrongly_refused.extend(handle.join().unwrap());
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let worst = monitor.join().unwrap();
        prop_assert!(wrongly_refused.is_empty(), "{:?}", wrongly_refused);
        prop_assert!(worst.0 <= 4 && worst.1 <= 24, "usage passed a limit: {:?}", worst);
        // Exact figures once the writers are done.
        let mut keys = 0;
        let mut bytes = 0;
        for key in engine.bucket_keys("ns", "b") {
            if let Some(v) = engine.get("ns", "b", &key) {
                keys += 1;
                bytes += (key.len() + v.len()) as u64;
            }
        }
        prop_assert_eq!(engine.namespace_usage("ns"), (keys, bytes));
        prop_assert_eq!(engine.usage().bytes, bytes);
    }
}
