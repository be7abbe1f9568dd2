//! Properties of the engine under concurrency and churn, beyond the sequential model test in
//! `src/engine.rs`:
//! - histories of concurrent set / delete / increment / get on one key are linearizable;
//! - list-keys paging under random churn lists every key that exists for the whole listing
//!   exactly once, never lists a key twice, and never lists a key that was never written.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Barrier};
use std::time::Instant;

use keyvalue_inmemory::engine::{Engine, Limits};
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
