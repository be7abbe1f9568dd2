//! Change notification: what the store tells an [`Observer`] of the writes and removals in the
//! namespaces marked watched ([`Engine::set_watched`]).
//!
//! Every change is reported while the entry's shard lock is held, after the write is certain
//! to happen (its room reserved) and before the lock is released: two changes of one key are
//! reported in the order they happened, whatever threads made them. The observer therefore
//! runs on the write path and must only hand the change on (the provider queues it). In a
//! namespace nobody watches, a write pays one relaxed atomic load.
//!
//! What is reported:
//! - [`What::Set`] for every entry written: `set`, each distinct key of `set-many` (with its
//!   last value), `increment` (the counter's new decimal text, also when it creates it).
//! - [`What::Deleted`] for an entry a `delete` or `delete-many` removed (a key that was not
//!   there is no change); [`What::Expired`] for an expired entry removed (by a read, the sweep,
//!   a write replacing it, or a write making room); [`What::Evicted`] for an entry evicted.

use std::sync::atomic::Ordering;

use crate::engine::Namespace;
use crate::Engine;

/// One change of one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change<'a> {
    pub namespace: &'a str,
    pub bucket: &'a str,
    pub key: &'a str,
    pub what: What<'a>,
}

/// What happened to the entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum What<'a> {
    /// Written, now holding this value.
    Set(&'a [u8]),
    /// Removed by a delete.
    Deleted,
    /// Removed because its TTL passed.
    Expired,
    /// Evicted to make room.
    Evicted,
}

/// Told of every change in a watched namespace, under the entry's shard lock: it must not
/// block, take long, or call back into the store.
pub trait Observer: Send + Sync {
    fn changed(&self, change: Change<'_>);
}

/// Reports the changes of one bucket, or nothing when its namespace is not watched.
pub(crate) struct Notifier<'a> {
    observer: Option<&'a dyn Observer>,
    namespace: &'a str,
    bucket: &'a str,
}

impl<'a> Notifier<'a> {
    pub(crate) fn set(&self, key: &str, value: &[u8]) {
        self.report(key, What::Set(value));
    }

    /// A write over an existing entry: an expired one goes first (its removal is told), then
    /// the new value.
    pub(crate) fn overwrite(&self, key: &str, value: &[u8], expired: bool) {
        if expired {
            self.report(key, What::Expired);
        }
        self.set(key, value);
    }

    pub(crate) fn report(&self, key: &str, what: What<'_>) {
        if let Some(observer) = self.observer {
            observer.changed(Change {
                namespace: self.namespace,
                bucket: self.bucket,
                key,
                what,
            });
        }
    }
}

impl Engine {
    /// Sets the observer told of changes in watched namespaces. There is one per store: answers
    /// `false` (and changes nothing) if one was set already.
    pub fn set_observer(&self, observer: std::sync::Arc<dyn Observer>) -> bool {
        self.observer.set(observer).is_ok()
    }

    /// Marks namespace `ns` watched (its changes go to the observer) or not.
    pub fn set_watched(&self, ns: &str, on: bool) {
        self.set_flag(ns, on, |n| &n.watched);
    }

    /// Whether namespace `ns` is watched.
    pub fn watched(&self, ns: &str) -> bool {
        (self.namespaces.get(ns)).is_some_and(|n| n.watched.load(Ordering::Relaxed))
    }

    /// The notifier of the changes of `bucket` in namespace `ns_ref` (named `ns`).
    pub(crate) fn notifier<'a>(
        &'a self,
        ns_ref: &Namespace,
        ns: &'a str,
        bucket: &'a str,
    ) -> Notifier<'a> {
        let watched = ns_ref.watched.load(Ordering::Relaxed) && !crate::replica::is_quiet();
        let observer = match watched {
            true => self.observer.get().map(|o| &**o),
            false => None,
        };
        Notifier {
            observer,
            namespace: ns,
            bucket,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Limits;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// (key, what, value) of one change.
    type Seen = (String, &'static str, Vec<u8>);

    /// Records the changes of bucket `b` of the namespaces `n` and `n2`; any other fails.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<Seen>>);

    impl Observer for Recorder {
        fn changed(&self, c: Change<'_>) {
            let (what, value) = match c.what {
                What::Set(v) => ("set", v.to_vec()),
                What::Deleted => ("deleted", Vec::new()),
                What::Expired => ("expired", Vec::new()),
                What::Evicted => ("evicted", Vec::new()),
            };
            assert!(
                ["n", "n2"].contains(&c.namespace) && c.bucket == "b",
                "{c:?}"
            );
            self.0.lock().unwrap().push((c.key.into(), what, value));
        }
    }

    impl Recorder {
        fn take(&self) -> Vec<Seen> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    fn watched(limits: Limits) -> (Engine, Arc<Recorder>) {
        let e = Engine::new(limits);
        let seen = Arc::new(Recorder::default());
        assert!(e.set_observer(seen.clone()));
        assert!(!e.set_observer(seen.clone()), "one observer per store");
        e.set_watched("n", true);
        (e, seen)
    }

    fn ev(key: &str, what: &'static str, value: &[u8]) -> Seen {
        (key.into(), what, value.to_vec())
    }

    #[test]
    fn every_write_and_removal_of_a_watched_namespace_is_reported_once() {
        let (e, seen) = watched(crate::testing::limits());
        e.set("n", "b", "k", b"v1").unwrap();
        e.set("n", "b", "k", b"v2").unwrap();
        e.increment("n", "b", "c", 5).unwrap();
        e.increment("n", "b", "c", 1).unwrap();
        e.set_many("n", "b", [("x", &b"1"[..]), ("y", b"2"), ("x", b"3")])
            .unwrap();
        e.delete("n", "b", "k");
        e.delete("n", "b", "k");
        e.delete_many("n", "b", ["x", "missing", "y"]);
        let mut got = seen.take();
        // set-many's pairs are reported in no particular order.
        got[4..6].sort();
        assert_eq!(
            got,
            [
                ev("k", "set", b"v1"),
                ev("k", "set", b"v2"),
                ev("c", "set", b"5"),
                ev("c", "set", b"6"),
                ev("x", "set", b"3"),
                ev("y", "set", b"2"),
                ev("k", "deleted", b""),
                ev("x", "deleted", b""),
                ev("y", "deleted", b""),
            ]
        );
        // A refused write is no change.
        assert!(e.increment("n", "b", "c", u64::MAX).is_err());
        assert!(seen.take().is_empty());
    }

    /// Changes of one key are reported in the order they happened: the counter's values come
    /// out strictly increasing, however the threads interleave.
    #[test]
    fn changes_of_one_key_are_reported_in_order_across_threads() {
        let (e, seen) = watched(crate::testing::limits());
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..500 {
                        e.increment("n", "b", "c", 1).unwrap();
                    }
                });
            }
        });
        let values: Vec<u64> = (seen.take().into_iter())
            .map(|(_, _, v)| String::from_utf8(v).unwrap().parse().unwrap())
            .collect();
        assert_eq!(values, (1..=2000).collect::<Vec<u64>>());
    }

    #[test]
    fn other_namespaces_and_unwatched_ones_report_nothing() {
        let (e, seen) = watched(crate::testing::limits());
        e.set("other", "b", "k", b"v").unwrap();
        e.set("n", "b", "k", b"v").unwrap();
        e.set_watched("n", false);
        e.set("n", "b", "k2", b"v").unwrap();
        e.delete("n", "b", "k");
        assert_eq!(seen.take(), [ev("k", "set", b"v")]);
        assert!(e.watched("other") == e.watched("n") && !e.watched("n"));
        // Watching a namespace before its first write works too.
        e.set_watched("n2", true);
        e.set("n2", "b", "k", b"v").unwrap();
        assert_eq!(seen.take(), [ev("k", "set", b"v")]);
    }

    #[test]
    fn expired_keys_are_reported_however_they_go() {
        let (e, seen) = watched(crate::testing::limits());
        let ttl = Some(Duration::from_secs(1));
        for key in ["read", "swept", "rewritten", "counter"] {
            e.set_expiring("n", "b", key, b"v", ttl).unwrap();
        }
        seen.take();
        e.skip_time(Duration::from_secs(2));
        assert_eq!(e.get("n", "b", "read"), None);
        e.set("n", "b", "rewritten", b"new").unwrap();
        e.increment("n", "b", "counter", 1).unwrap();
        assert_eq!(
            seen.take(),
            [
                ev("read", "expired", b""),
                ev("rewritten", "expired", b""),
                ev("rewritten", "set", b"new"),
                ev("counter", "expired", b""),
                ev("counter", "set", b"1"),
            ]
        );
        e.sweep(usize::MAX);
        assert_eq!(seen.take(), [ev("swept", "expired", b"")]);
    }

    #[test]
    fn evicted_keys_are_reported() {
        let limits = Limits {
            max_keys: 2,
            ..crate::testing::limits()
        };
        let (e, seen) = watched(limits);
        e.set_eviction("n", true);
        e.set("n", "b", "old", b"1").unwrap();
        e.set("n", "b", "new", b"2").unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert!(e.get("n", "b", "new").is_some());
        e.set("n", "b", "newest", b"3").unwrap();
        let seen = seen.take();
        // Sampling is approximate: with two keys, either may be the one evicted.
        let gone = if e.exists("n", "b", "old") {
            "new"
        } else {
            "old"
        };
        assert_eq!(
            seen,
            [
                ev("old", "set", b"1"),
                ev("new", "set", b"2"),
                ev(gone, "evicted", b""),
                ev("newest", "set", b"3"),
            ]
        );
    }
}
