//! Usage accounting: what the store holds, and how a write reserves room before it writes.
//!
//! `bytes` counts the key and value bytes of live entries (not bucket names, not allocator
//! overhead); `keys` counts live entries per namespace. A write first *reserves* what it will
//! add against the limits, with a compare-and-swap, and only then writes; afterwards the
//! reservation is corrected down to what the write really changed. A reservation is never
//! smaller than what the write adds, so the counters never pass a limit and never wrap, even
//! for a moment.
//!
//! Writes run under a store-wide gate (a `RwLock<()>`), shared in the common case:
//! - a single-key write reserves exactly, under its entry's shard lock (it sees the old entry);
//! - a batch reserves the worst case (every key new, every byte added), since it cannot hold
//!   all its keys' locks at once.
//!
//! A worst-case reservation can make a concurrent write see a fuller store than any serial
//! order would. So a batch refused for `max_keys` or `max_total_bytes` under the shared gate,
//! or a single-key write so refused while a batch was under way, is tried once more under the
//! exclusive gate, where no other write is in flight, the counters are exact and a batch
//! reserves exactly what it changes. A refusal therefore always means
//! that the store, as it stood at one instant between other writes, had no room: every
//! accepted history has a serial order that explains it. The exclusive path is only taken at
//! a limit, and holds the gate for one write (`Engine::limited_write` in `engine.rs`), and in
//! a namespace that makes room (eviction, or expired entries) for the evictions that write
//! needs, up to `MAX_EVICTIONS_PER_WRITE` (`evict.rs`). A full evicting namespace normally
//! makes room under the shared gate; it goes alone only when other writers keep taking the
//! room it made, or making room failed on counts they may have inflated.

use crate::error::EngineError;
use crate::limits::Limits;
use std::sync::atomic::{AtomicU64, Ordering};

/// Live figures of the store, for health and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Namespaces that were ever written.
    pub namespaces: usize,
    /// Buckets holding at least one key (an emptied bucket is dropped).
    pub buckets: usize,
    /// Keys held, those expired but not yet reclaimed included.
    pub keys: u64,
    /// Key plus value bytes of live keys.
    pub bytes: u64,
    /// Keys removed because they expired, so far.
    pub expired: u64,
    /// Keys evicted to make room, so far.
    pub evicted: u64,
}

/// The counters one write touches: the store's bytes and its namespace's keys and bytes.
pub(crate) struct Space<'a> {
    total: &'a AtomicU64,
    keys: &'a AtomicU64,
    bytes: &'a AtomicU64,
}

/// What a write reserved before writing.
#[must_use]
pub(crate) struct Reservation {
    keys: u64,
    bytes: u64,
}

impl<'a> Space<'a> {
    /// The counters of the store (`total`) and of one namespace (`keys`, `bytes`).
    pub(crate) fn new(total: &'a AtomicU64, keys: &'a AtomicU64, bytes: &'a AtomicU64) -> Self {
        Self { total, keys, bytes }
    }

    /// Reserves room for `keys` more keys and `bytes` more bytes, or refuses with the limit hit.
    pub(crate) fn reserve(
        &self,
        limits: &Limits,
        keys: u64,
        bytes: u64,
    ) -> Result<Reservation, EngineError> {
        try_add(self.keys, keys, limits.max_keys).map_err(|held| EngineError::TooManyKeys {
            held,
            adding: keys,
            limit: limits.max_keys,
        })?;
        if let Err(held) = try_add(self.total, bytes, limits.max_total_bytes) {
            self.keys.fetch_sub(keys, Ordering::Relaxed);
            return Err(EngineError::OutOfSpace {
                held,
                adding: bytes,
                limit: limits.max_total_bytes,
            });
        }
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        Ok(Reservation { keys, bytes })
    }

    /// Replaces a reservation by what the write really did.
    pub(crate) fn settle(&self, reservation: Reservation, keys: u64, bytes: i64) {
        adjust(self.keys, keys as i64 - reservation.keys as i64);
        let byte_change = bytes - reservation.bytes as i64;
        adjust(self.total, byte_change);
        adjust(self.bytes, byte_change);
    }

    pub(crate) fn release(&self, keys: u64, bytes: u64) {
        self.keys.fetch_sub(keys, Ordering::Relaxed);
        self.total.fetch_sub(bytes, Ordering::Relaxed);
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// Adds `n` to `counter` unless that would pass `limit`; on refusal answers the counter's value.
fn try_add(counter: &AtomicU64, n: u64, limit: u64) -> Result<(), u64> {
    if n == 0 {
        return Ok(());
    }
    counter
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
            held.checked_add(n).filter(|&after| after <= limit)
        })
        .map(drop)
}

fn adjust(counter: &AtomicU64, change: i64) {
    if change >= 0 {
        counter.fetch_add(change as u64, Ordering::Relaxed);
    } else {
        counter.fetch_sub(change.unsigned_abs(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{limits, recount};
    use crate::Engine;

    /// Runs `threads` closures at once, `rounds` times, each round started together; answers
    /// how many calls answered `false` (a failing call must not leave the others waiting at
    /// the barrier).
    fn race(rounds: usize, threads: usize, f: impl Fn(usize, usize) -> bool + Sync) -> usize {
        let barrier = std::sync::Barrier::new(threads);
        let failed = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for t in 0..threads {
                let (f, barrier, failed) = (&f, &barrier, &failed);
                s.spawn(move || {
                    for round in 0..rounds {
                        barrier.wait();
                        if !f(round, t) {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        failed.into_inner()
    }

    #[test]
    fn concurrent_sets_of_one_new_key_at_the_last_free_slot_all_succeed() {
        let e = Engine::new(Limits {
            max_keys: 10,
            ..limits()
        });
        for i in 0..9 {
            e.set("n", "b", &format!("{i}"), b"").unwrap();
        }
        let refused = race(2000, 4, |round, t| {
            // Whatever the order, these add at most the one key there is room for: no serial
            // order refuses any of them.
            let written = if t == 3 && round % 2 == 0 {
                e.set_many("n", "b", [("new", &b"x"[..]), ("0", b"")])
            } else {
                e.set("n", "b", "new", b"x")
            };
            if t == 0 {
                e.delete("n", "b", "new");
            }
            written.is_ok()
        });
        assert_eq!(refused, 0, "writes refused although they fit");
        let (keys, _) = e.namespace_usage("n");
        assert!(keys <= 10, "{keys}");
        assert_eq!((keys, e.namespace_usage("n").1), recount(&e, "n"));
    }

    #[test]
    fn racing_writes_and_deletes_never_pass_a_limit_and_leave_exact_counters() {
        let e = Engine::new(Limits {
            max_keys: 2,
            max_total_bytes: 30,
            ..limits()
        });
        e.set("n", "b", "b", &[0; 9]).unwrap();
        let over = std::sync::atomic::AtomicBool::new(false);
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            // Watches the counters while the writers race.
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let (keys, _) = e.namespace_usage("n");
                    if keys > 2 || e.usage().bytes > 30 {
                        over.store(true, Ordering::Relaxed);
                    }
                }
            });
            // set(a), delete(a) and set(c) racing: the history the hardening issue names.
            race(20_000, 3, |round, t| {
                let v = [b'v'; 9];
                match (t, round % 3) {
                    (0, _) => drop(e.set("n", "b", "a", &v)),
                    (1, _) => e.delete("n", "b", "a"),
                    (_, 0) => drop(e.set("n", "b", "c", &v)),
                    (_, 1) => drop(e.set_many("n", "b", [("c", &v[..]), ("d", &v[..])])),
                    _ => e.delete_many("n", "b", ["c", "d"]),
                }
                true
            });
            stop.store(true, Ordering::Relaxed);
        });
        assert!(!over.load(Ordering::Relaxed), "a counter passed its limit");
        let usage = e.namespace_usage("n");
        assert!(usage.0 <= 2 && usage.1 <= 30, "{usage:?}");
        assert_eq!(usage, recount(&e, "n"));
        assert_eq!(e.usage().bytes, usage.1);
    }

    #[test]
    fn a_full_store_still_takes_overwrites_while_batches_race() {
        let e = Engine::new(Limits {
            max_keys: 4,
            max_total_bytes: 4 * 11,
            ..limits()
        });
        for k in ["a", "b", "c", "d"] {
            e.set("n", "b", k, &[0; 10]).unwrap();
        }
        // Every write replaces a value by one of the same size: the store stays exactly full
        // and no serial order refuses any of them, whatever the batches reserve meanwhile.
        let refused = race(1000, 3, |round, t| {
            let v = [round as u8; 10];
            match t {
                0 => e.set("n", "b", "a", &v),
                1 => e.set_many("n", "b", [("b", &v[..]), ("c", &v[..])]),
                _ => e.set_many("n", "b", [("c", &v[..]), ("d", &v[..]), ("a", &v[..])]),
            }
            .is_ok()
        });
        assert_eq!(refused, 0, "overwrites refused in a full store");
        assert_eq!(e.namespace_usage("n"), (4, 44));
    }
}
