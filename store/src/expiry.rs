//! The expiry sweep: reclaims expired entries that no call touches, a bounded run of slots at
//! a time, as Redis's active expiry does.
//!
//! Reads already treat an expired entry as missing and remove it; the sweep is for the rest. A
//! pass visits every bucket of every namespace that was ever written with a deadline, shard by
//! shard, slot by slot, [`SWEEP_RUN`] slots under one shard write lock at a time: no call waits
//! for more than one run, whatever the store's size. [`Engine::sweep`] does up to a budget of
//! slots and remembers where it stopped; the provider calls it on a timer (its README says how
//! often, and so how long a pass of a given store takes).

use std::sync::atomic::Ordering;

use crate::engine::drop_empty;
use crate::raw::sweep_slots;
use crate::watch::What;
use crate::Engine;

/// Slots looked at under one shard lock.
pub const SWEEP_RUN: usize = 4096;

/// Where the sweep is: the buckets left in this pass, and the shard and slot of the first.
#[derive(Default)]
pub(crate) struct SweepState {
    /// `(namespace, bucket)`, the next one last.
    left: Vec<(Box<str>, Box<str>)>,
    shard: usize,
    slot: usize,
}

/// What one [`Engine::sweep`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Slots looked at.
    pub slots: usize,
    /// Expired entries removed.
    pub expired: u64,
    /// Whether a pass over the store ended in this call.
    pub pass_done: bool,
}

impl Engine {
    /// Removes expired entries, looking at up to `budget` slots (at least one run), from where
    /// the last call stopped. Call it often enough that a pass (the store's slots, about 2× its
    /// keys, over the budget) takes as long as expired memory may linger.
    pub fn sweep(&self, budget: usize) -> Swept {
        let mut state = self.sweep.lock().unwrap_or_else(|p| p.into_inner());
        let mut swept = Swept::default();
        if state.left.is_empty() {
            *state = SweepState {
                left: self.expiring_buckets(),
                ..SweepState::default()
            };
        }
        while swept.slots < budget.max(1) {
            let Some((ns, bucket)) = state.left.last() else {
                swept.pass_done = true;
                break;
            };
            let now = self.clock.now_tick();
            let run = SWEEP_RUN.min(budget.max(1) - swept.slots).max(1);
            let walked = {
                // Lock order as writers: the gate, the namespace, the bucket, the shard.
                let _shared = self.gate.read().unwrap_or_else(|p| p.into_inner());
                let ns_ref = self.namespaces.get(&**ns);
                let entries = match &ns_ref {
                    Some(n) => n.buckets.get(&**bucket),
                    None => None,
                };
                let found = match (&ns_ref, entries) {
                    (Some(ns_ref), Some(entries)) => {
                        let space = ns_ref.space(&self.total_bytes);
                        let notify = self.notifier(ns_ref, ns, bucket);
                        let walked =
                            sweep_slots(&entries, state.shard, state.slot, run, |item, stamp| {
                                let goes = stamp.expired(now);
                                if goes {
                                    space.release(1, item.size());
                                    notify.report(item.key(), What::Expired);
                                }
                                goes
                            });
                        let removed = walked.removed.len() as u64;
                        if removed > 0 {
                            ns_ref.expired.fetch_add(removed, Ordering::Relaxed);
                            self.removals.fetch_add(removed, Ordering::SeqCst);
                            self.changes.fetch_add(1, Ordering::Relaxed);
                        }
                        let bucket_done =
                            walked.shard_done && state.shard + 1 >= entries.shards().len();
                        let emptied = bucket_done && entries.is_empty();
                        drop(entries);
                        if emptied {
                            drop_empty(&ns_ref.buckets, bucket);
                        }
                        Some((walked, bucket_done))
                    }
                    _ => None,
                };
                found
            };
            match walked {
                Some((walked, bucket_done)) => {
                    swept.slots += walked.slots.max(1);
                    swept.expired += walked.removed.len() as u64;
                    // The entries' memory is freed here, with no lock held.
                    drop(walked.removed);
                    if bucket_done {
                        state.left.pop();
                        (state.shard, state.slot) = (0, 0);
                    } else if walked.shard_done {
                        (state.shard, state.slot) = (state.shard + 1, 0);
                    } else {
                        state.slot += walked.slots;
                    }
                }
                None => {
                    state.left.pop();
                    (state.shard, state.slot) = (0, 0);
                }
            }
        }
        swept
    }

    /// Every bucket of the namespaces that were ever written with a deadline.
    fn expiring_buckets(&self) -> Vec<(Box<str>, Box<str>)> {
        let mut found = Vec::new();
        for ns in self.namespaces.iter() {
            if ns.expires.load(Ordering::Relaxed) {
                for bucket in ns.buckets.iter() {
                    found.push((ns.key().clone(), bucket.key().clone()));
                }
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::testing::{limits, list_all};
    use crate::{Engine, Limits};

    const SECOND: Option<Duration> = Some(Duration::from_secs(1));

    fn unlimited() -> Engine {
        Engine::new(Limits {
            list_page_size: 10,
            ..Limits::UNLIMITED
        })
    }

    #[test]
    fn an_expired_key_is_gone_for_every_operation_at_once() {
        let e = Engine::new(limits());
        e.set_expiring("n", "b", "k", b"v", SECOND).unwrap();
        e.set_expiring("n", "b", "c", b"7", SECOND).unwrap();
        e.set("n", "b", "stays", b"v").unwrap();
        assert_eq!(e.get("n", "b", "k").as_deref(), Some(&b"v"[..]));
        e.skip_time(Duration::from_millis(1150));
        assert_eq!(e.get("n", "b", "k"), None);
        assert!(!e.exists("n", "b", "k"));
        let many = e.get_many("n", "b", vec!["k".into(), "stays".into()]);
        assert!(many[0].is_none() && many[1].is_some());
        assert_eq!(list_all(&e, "n", "b"), ["stays"]);
        // An expired counter counts from zero.
        assert_eq!(e.increment("n", "b", "c", 5).unwrap(), 5);
        assert_eq!(e.usage().keys, 2, "k was removed on access, c rewritten");
        assert_eq!(e.usage().expired, 2);
        assert_eq!(e.namespace_churn("n"), (2, 0));
        assert_eq!(e.namespace_usage("n"), (2, 8));
    }

    #[test]
    fn a_key_expires_its_ttl_after_its_last_write_and_a_write_without_ttl_keeps_it() {
        let e = Engine::new(limits());
        e.set_expiring("n", "b", "k", b"1", SECOND).unwrap();
        e.skip_time(Duration::from_millis(800));
        e.set_expiring("n", "b", "k", b"2", SECOND).unwrap();
        e.skip_time(Duration::from_millis(800));
        assert_eq!(e.get("n", "b", "k").as_deref(), Some(&b"2"[..]));
        e.increment_expiring("n", "b", "c", 1, SECOND).unwrap();
        e.skip_time(Duration::from_millis(800));
        e.increment_expiring("n", "b", "c", 1, SECOND).unwrap();
        e.skip_time(Duration::from_millis(800));
        assert_eq!(e.get("n", "b", "c").as_deref(), Some(&b"2"[..]));
        e.set_many_expiring("n", "b", [("k", &b"3"[..]), ("m", b"4")], SECOND)
            .unwrap();
        e.set("n", "b", "m", b"forever").unwrap();
        e.skip_time(Duration::from_secs(5));
        assert_eq!(e.get("n", "b", "k"), None);
        assert_eq!(e.get("n", "b", "c"), None);
        assert_eq!(e.get("n", "b", "m").as_deref(), Some(&b"forever"[..]));
    }

    #[test]
    fn a_key_that_expires_during_a_listing_is_not_on_a_later_page() {
        let e = unlimited();
        for i in 0..30 {
            let ttl = if i == 25 { SECOND } else { None };
            e.set_expiring("n", "b", &format!("k{i:02}"), b"", ttl)
                .unwrap();
        }
        let first = e.list_keys("n", "b", None).unwrap();
        assert_eq!(first.keys.len(), 10);
        e.skip_time(Duration::from_secs(2));
        let mut rest = Vec::new();
        let mut cursor = first.cursor;
        while let Some(c) = cursor {
            let page = e.list_keys("n", "b", Some(c)).unwrap();
            rest.extend(page.keys);
            cursor = page.cursor;
        }
        assert_eq!(rest.len(), 19);
        assert!(!rest.contains(&"k25".to_string()));
    }

    #[test]
    fn the_sweep_reclaims_what_no_call_touches_in_bounded_runs() {
        let e = unlimited();
        for i in 0..20_000 {
            e.set_expiring("n", "b", &format!("k{i}"), &[0; 10], SECOND)
                .unwrap();
        }
        e.set("n", "kept", "k", b"v").unwrap();
        e.set_expiring("other", "b", "k", b"v", SECOND).unwrap();
        let before = e.sweep(usize::MAX);
        assert_eq!(before.expired, 0, "nothing has expired yet");
        e.skip_time(Duration::from_millis(1200));
        let mut swept = crate::Swept::default();
        let mut calls = 0;
        while !swept.pass_done {
            swept = e.sweep(1000);
            assert!(swept.slots <= 1000, "{swept:?}");
            calls += 1;
            assert!(calls < 10_000);
        }
        let usage = e.usage();
        assert_eq!((usage.keys, usage.bytes, usage.expired), (1, 2, 20_001));
        assert_eq!(usage.buckets, 1, "the emptied buckets are dropped");
        assert_eq!(e.get("n", "kept", "k").as_deref(), Some(&b"v"[..]));
        assert!(calls > 20, "the pass was cut into runs: {calls} calls");
    }

    #[test]
    fn the_sweep_leaves_namespaces_without_deadlines_alone() {
        let e = unlimited();
        e.set("n", "b", "k", b"v").unwrap();
        assert_eq!(
            e.sweep(usize::MAX),
            crate::Swept {
                slots: 0,
                expired: 0,
                pass_done: true
            }
        );
    }
}
