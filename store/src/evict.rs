//! Eviction: how a namespace with eviction on makes room at a usage limit, by evicting its
//! least recently used entries, approximately, as Redis's `allkeys-lru` does.
//!
//! Exact LRU would need a list threaded through every entry (16 more bytes a key, and a lock
//! every read would take). Instead each eviction looks at [`SAMPLES`] entries of the namespace
//! picked at random and evicts the one used longest ago; an expired entry found on the way
//! goes first. A namespace of up to 32 buckets is sampled in proportion to each bucket's keys;
//! in one with more, each sample first picks a bucket at random, so the entries of small
//! buckets are looked at more often than those of large ones. A batch refused under the
//! shared gate (which reserves as if every pair were new) makes room for all its pairs: a
//! `set-many` overwriting keys of a full cache may evict a few more than it needed. The bench
//! (`cargo xtask bench`, "Cache workload") prints the hit ratio this gives beside exact LRU's
//! on the same trace.
//!
//! A namespace without eviction but with expiring entries takes the same path with expired
//! entries only: a write refused at a limit first removes expired entries the sweep has not
//! reached yet (found the same way), so a session store full of expired sessions takes new
//! ones at once. If the samples find none expired, the write is refused as before.
//!
//! Only the writing namespace is ever evicted: at `max_total_bytes`, which is store-wide, a
//! namespace evicts its own entries, never another tenant's. A write that cannot fit even
//! when its namespace is empty is refused with [`EngineError::WontFit`]; when that is clear
//! from the counts (the write alone passes the limit, or what other namespaces hold leaves it
//! too little), before anything is evicted for it.

use std::sync::atomic::Ordering;

use crate::engine::drop_empty;
use crate::error::EngineError;
use crate::item::Entries;
use crate::raw::sample;
use crate::watch::What;
use crate::Engine;

/// Entries looked at per eviction.
pub const SAMPLES: usize = 16;

/// A key eviction must leave, in a bucket: `(bucket, Some(key))` (an increment's own counter,
/// which the write would otherwise recreate from zero), or `(_, None)`.
pub(crate) type Spare<'a> = (&'a str, Option<&'a str>);

/// Milliseconds after the eviction read its clock within which an entry's last use is taken as
/// "just now" (it was used meanwhile); an older `used` is an age, up to the clock's 49.7-day
/// wrap.
const FUTURE_MS: u32 = 60_000;

/// Namespaces with at most this many buckets are sampled in proportion to each bucket's keys;
/// with more, each sample picks a bucket at random first.
const WEIGHED_BUCKETS: usize = 32;

/// Most entries one write evicts. A write needing more (a limit lowered far below what the
/// namespace holds) is refused with the limit's error after evicting these; the next writes go
/// on from there. About 100 ms of work at most.
const MAX_EVICTIONS_PER_WRITE: u32 = 65_536;

/// Evictions in a row that may find nothing to evict before a write gives up (they only
/// happen while other writers empty the namespace's buckets at the same time).
const MAX_RACES: u32 = 1000;

/// What one eviction did.
enum Evicted {
    /// An entry of this many bytes went.
    Freed(u64),
    /// The entry chosen was used or removed meanwhile: look again.
    Raced,
    /// The namespace holds nothing.
    Empty,
    /// Only expired entries were wanted, and the samples found none.
    NoneExpired,
}

/// The oldest entry seen so far: whether it expired, its age in ms, bucket, key and last use.
struct Candidate {
    expired: bool,
    age: u32,
    bucket: Box<str>,
    key: Box<str>,
    used: u32,
}

impl Engine {
    /// Evicts entries of `ns` (only expired ones, if `ns` does not evict) until the write that
    /// `refused` reports fits, or says why it cannot: [`EngineError::WontFit`] in an evicting
    /// namespace, else `refused` itself. `alone`: the caller holds the gate exclusively
    /// (removals then do not take it).
    pub(crate) fn make_room(
        &self,
        ns: &str,
        refused: &EngineError,
        spare: Spare<'_>,
        alone: bool,
    ) -> Result<(), EngineError> {
        let evicting = self.evicts(ns);
        let (held_keys, held_bytes) = self.namespace_usage(ns);
        let (keys, adding, limit, need) = match *refused {
            EngineError::TooManyKeys {
                held,
                adding,
                limit,
            } => (true, adding, limit, (held + adding).saturating_sub(limit)),
            EngineError::OutOfSpace {
                held,
                adding,
                limit,
            } => (
                false,
                adding,
                limit,
                held.saturating_add(adding).saturating_sub(limit),
            ),
            _ => return Err(refused.clone()),
        };
        let wont_fit = || match evicting {
            true => EngineError::WontFit {
                limit_key: if keys { "max_keys" } else { "max_total_bytes" },
                unit: if keys { "keys" } else { "bytes" },
                adding,
                evictable: if keys { held_keys } else { held_bytes },
                limit,
            },
            false => refused.clone(),
        };
        // What other namespaces hold, which this one may not evict, counts against bytes.
        let others = match keys {
            true => 0,
            false => self.usage_bytes().saturating_sub(held_bytes),
        };
        if adding.saturating_add(others) > limit {
            return Err(wont_fit());
        }
        let (need_keys, need_bytes) = match keys {
            true => (need.max(1), 0),
            false => (0, need.max(1)),
        };
        match self.evict_until(ns, need_keys, need_bytes, !evicting, spare, alone) {
            Ok(()) => Ok(()),
            Err(Evicted::Empty) => Err(wont_fit()),
            // Races that kept going, no expired entry found, or the per-write cap (a limit
            // lowered far below what the namespace holds: later writes evict more).
            Err(_) => Err(refused.clone()),
        }
    }

    /// Evicts (with `only_expired`, removes expired) entries of `ns` until `need_keys` keys
    /// and `need_bytes` bytes are free; answers what stopped it short. Races (a chosen entry
    /// used or removed meanwhile, samples that found only buckets being emptied) are retried,
    /// a bounded number of times in a row.
    fn evict_until(
        &self,
        ns: &str,
        mut need_keys: u64,
        mut need_bytes: u64,
        only_expired: bool,
        spare: Spare<'_>,
        alone: bool,
    ) -> Result<(), Evicted> {
        let (mut races, mut evicted) = (0, 0);
        while need_keys > 0 || need_bytes > 0 {
            if evicted == MAX_EVICTIONS_PER_WRITE {
                return Err(Evicted::Raced);
            }
            match self.evict_one(ns, only_expired, spare, alone) {
                Evicted::Freed(bytes) => {
                    need_keys = need_keys.saturating_sub(1);
                    need_bytes = need_bytes.saturating_sub(bytes);
                    races = 0;
                    evicted += 1;
                }
                Evicted::Raced if races < MAX_RACES => races += 1,
                stop => return Err(stop),
            }
        }
        Ok(())
    }

    /// Evicts the oldest of [`SAMPLES`] random entries of `ns`; with `only_expired`, only if
    /// it has expired.
    fn evict_one(&self, ns: &str, only_expired: bool, spare: Spare<'_>, alone: bool) -> Evicted {
        let (now, now_ms) = self.clock.now();
        let mut oldest: Option<Candidate> = None;
        let mut spared = false;
        // Looks at one random entry of `entries` (bucket `bucket`), keeping it if it is the
        // oldest so far; `false` if the bucket is empty.
        let mut consider = |bucket: &str, entries: &Entries, seed: u64| {
            // Only the stamp (in the map's slot) is read for each sample; the entry itself (a
            // cache miss away) only for one older than the oldest so far.
            let seen = sample(entries, seed, |item, stamp| {
                // Used after `now_ms` was read (the age wraps to just under 2^32): just now.
                let age = match now_ms.wrapping_sub(stamp.used()) {
                    age if age > u32::MAX - FUTURE_MS => 0,
                    age => age,
                };
                // Expired entries go before any live one.
                let expired = stamp.expired(now);
                if matches!(&oldest, Some(best) if (best.expired, best.age) >= (expired, age)) {
                    return None;
                }
                if spare.1.is_some() && spare == (bucket, Some(item.key())) {
                    spared = true;
                    return None;
                }
                Some(Candidate {
                    expired,
                    age,
                    bucket: bucket.into(),
                    key: item.key().into(),
                    used: stamp.used(),
                })
            });
            let found = seen.is_some();
            if let Some(Some(better)) = seen {
                oldest = Some(better);
            }
            found
        };
        {
            let Some(ns_ref) = self.namespaces.get(ns) else {
                return Evicted::Empty;
            };
            let buckets = &ns_ref.buckets;
            let count = buckets.len();
            if count == 0 {
                return Evicted::Empty;
            }
            if count == 1 {
                if let Some(only) = buckets.iter().next() {
                    for _ in 0..SAMPLES {
                        consider(only.key(), only.value(), self.next_seed());
                    }
                }
            } else if count <= WEIGHED_BUCKETS {
                // Each bucket gets samples in proportion to its keys: SAMPLES points drawn
                // over all the namespace's keys, then found bucket by bucket.
                let total: u64 = buckets.iter().map(|b| b.len() as u64).sum();
                if total == 0 {
                    return Evicted::Raced;
                }
                let mut points: Vec<(u64, u64)> = (0..SAMPLES)
                    .map(|_| {
                        let seed = self.next_seed();
                        (seed % total, seed.rotate_left(29))
                    })
                    .collect();
                points.sort_unstable();
                let (mut start, mut next) = (0u64, 0);
                for bucket in buckets.iter() {
                    let end = start + bucket.len() as u64;
                    while next < points.len() && points[next].0 < end {
                        consider(bucket.key(), bucket.value(), points[next].1);
                        next += 1;
                    }
                    start = end;
                }
            } else {
                // Many buckets: a random bucket for each sample (each bucket equally likely,
                // whatever its size: an approximation, see the module docs).
                for _ in 0..SAMPLES {
                    let seed = self.next_seed();
                    let bucket_seed = seed.rotate_left(29);
                    sample(buckets, seed, |bucket, entries| {
                        consider(bucket, entries, bucket_seed)
                    });
                }
            }
        }
        match oldest {
            Some(victim) if only_expired && !victim.expired => Evicted::NoneExpired,
            Some(victim) => self.evict_entry(ns, &victim, alone),
            // Nothing but the key being written was found.
            None if spared => Evicted::Empty,
            // Only buckets being emptied were sampled.
            None => Evicted::Raced,
        }
    }

    /// Removes the chosen entry if it was not used since it was chosen; counts it as expired
    /// if it had expired, else as evicted.
    fn evict_entry(&self, ns: &str, victim: &Candidate, alone: bool) -> Evicted {
        // Shared, as a delete takes it; not again when the caller holds it alone (a std lock
        // is not re-entrant).
        let _shared = (!alone).then(|| self.gate.read().unwrap_or_else(|p| p.into_inner()));
        let Some(ns_ref) = self.namespaces.get(ns) else {
            return Evicted::Empty;
        };
        let (freed, emptied) = {
            let Some(entries) = ns_ref.buckets.get(&*victim.bucket) else {
                return Evicted::Raced;
            };
            let space = ns_ref.space(&self.total_bytes);
            let notify = self.notifier(&ns_ref, ns, &victim.bucket);
            let mut freed = None;
            entries.remove_if(&*victim.key, |item, stamp| {
                let unused = stamp.used() == victim.used;
                if unused {
                    space.release(1, item.size());
                    freed = Some(item.size());
                    let what = match victim.expired {
                        true => What::Expired,
                        false => What::Evicted,
                    };
                    notify.report(&victim.key, what);
                }
                unused
            });
            (freed, entries.is_empty())
        };
        if emptied {
            drop_empty(&ns_ref.buckets, &victim.bucket);
        }
        match freed {
            Some(bytes) => {
                let counter = match victim.expired {
                    true => &ns_ref.expired,
                    false => &ns_ref.evicted,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                self.removals.fetch_add(1, Ordering::SeqCst);
                self.changes.fetch_add(1, Ordering::Relaxed);
                Evicted::Freed(bytes)
            }
            None => Evicted::Raced,
        }
    }

    /// A well-mixed 64-bit number (SplitMix64 over a counter).
    fn next_seed(&self) -> u64 {
        let mut z = self
            .samples
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::testing::{limits, recount};
    use crate::{Engine, EngineError, Limits};

    fn evicting(limits: Limits, ns: &str) -> Engine {
        let e = Engine::new(limits);
        e.set_eviction(ns, true);
        e
    }

    #[test]
    fn a_full_namespace_evicts_its_least_recently_used_keys_instead_of_refusing() {
        let e = evicting(limits(), "n");
        for i in 0..100 {
            e.set("n", "b", &format!("k{i}"), b"v").unwrap();
        }
        e.skip_time(Duration::from_millis(50));
        for i in 0..10 {
            assert!(e.get("n", "b", &format!("k{i}")).is_some());
        }
        e.skip_time(Duration::from_millis(50));
        // Half the keys stay older than the read ones: a sample of 16 misses them all with odds
        // of 2^-16 (approximate LRU).
        for i in 100..140 {
            e.set("n", "b", &format!("k{i}"), b"v").unwrap();
        }
        assert_eq!(e.namespace_usage("n").0, 100);
        assert_eq!(e.namespace_churn("n"), (0, 40));
        for i in 0..10 {
            assert!(
                e.exists("n", "b", &format!("k{i}")),
                "recently read k{i} evicted"
            );
        }
        for i in 100..140 {
            assert!(e.exists("n", "b", &format!("k{i}")), "new k{i} evicted");
        }
        assert_eq!(e.namespace_usage("n"), recount(&e, "n"));
    }

    #[test]
    fn a_big_bucket_of_old_keys_is_evicted_before_many_small_buckets_of_new_ones() {
        let e = evicting(limits(), "n");
        for i in 0..80 {
            e.set("n", "big", &format!("k{i}"), b"v").unwrap();
        }
        e.skip_time(Duration::from_millis(50));
        for b in 0..20 {
            e.set("n", &format!("small{b}"), "k", b"v").unwrap();
        }
        e.skip_time(Duration::from_millis(50));
        for i in 80..100 {
            e.set("n", "big", &format!("k{i}"), b"v").unwrap();
        }
        for b in 0..20 {
            assert!(e.exists("n", &format!("small{b}"), "k"), "small{b} evicted");
        }
        assert_eq!(e.namespace_churn("n"), (0, 20));
    }

    #[test]
    fn eviction_never_touches_another_namespace_and_off_keeps_refusing() {
        let e = evicting(
            Limits {
                max_total_bytes: 1000,
                ..limits()
            },
            "cache",
        );
        for i in 0..40 {
            e.set("plain", "b", &format!("k{i:02}"), &[0; 7]).unwrap(); // 10 bytes each
        }
        for i in 0..500 {
            e.set("cache", "b", &format!("k{i:03}"), &[0; 16]).unwrap(); // 20 bytes each
        }
        assert_eq!(e.namespace_usage("plain"), (40, 400));
        assert_eq!(e.namespace_usage("cache"), (30, 600));
        assert_eq!(e.namespace_churn("plain"), (0, 0));
        let err = e.set("plain", "b", "more", &[0; 20]).unwrap_err();
        assert!(matches!(err, EngineError::OutOfSpace { .. }), "{err}");
        assert_eq!(e.namespace_usage("cache"), recount(&e, "cache"));
    }

    #[test]
    fn what_cannot_fit_even_after_eviction_is_refused_and_evicts_nothing() {
        let e = evicting(
            Limits {
                max_total_bytes: 1000,
                max_value_bytes: 10_000,
                ..limits()
            },
            "cache",
        );
        e.set("plain", "b", "k", &[0; 499]).unwrap(); // 500 bytes no eviction can free
        for i in 0..10 {
            e.set("cache", "b", &format!("k{i}"), &[0; 8]).unwrap();
        }
        let err = e.set("cache", "b", "big", &[0; 600]).unwrap_err();
        assert!(matches!(err, EngineError::WontFit { .. }), "{err}");
        assert!(err.to_string().contains("even after evicting"), "{err}");
        assert!(err.to_string().contains("max_total_bytes"), "{err}");
        assert_eq!(e.namespace_usage("cache").0, 10, "nothing evicted for it");
        let pairs: Vec<(String, Vec<u8>)> = (0..101).map(|i| (format!("n{i}"), vec![])).collect();
        let err = e
            .set_many(
                "cache",
                "b",
                pairs.iter().map(|(k, v)| (k.as_str(), &v[..])),
            )
            .unwrap_err();
        assert!(err.to_string().contains("max_keys"), "{err}");
        assert_eq!(e.namespace_usage("cache").0, 10);
    }

    #[test]
    fn a_batch_that_evicts_writes_every_pair() {
        let e = evicting(limits(), "n");
        for i in 0..100 {
            e.set("n", "b", &format!("old{i}"), b"v").unwrap();
        }
        let pairs: Vec<String> = (0..60).map(|i| format!("new{i}")).collect();
        e.set_many("n", "b", pairs.iter().map(|k| (k.as_str(), &b"w"[..])))
            .unwrap();
        for k in &pairs {
            assert_eq!(e.get("n", "b", k).as_deref(), Some(&b"w"[..]), "{k}");
        }
        assert_eq!(e.namespace_usage("n"), (100, recount(&e, "n").1));
    }

    #[test]
    fn a_namespace_full_of_expired_keys_takes_new_ones_without_eviction() {
        let e = Engine::new(limits());
        for i in 0..100 {
            let ttl = Some(Duration::from_secs(1));
            e.set_expiring("n", "b", &format!("k{i}"), b"v", ttl)
                .unwrap();
        }
        let err = e.set("n", "b", "new", b"v").unwrap_err();
        assert!(
            err.to_string().contains("max_keys"),
            "nothing expired yet: {err}"
        );
        e.skip_time(Duration::from_millis(1200));
        for i in 0..50 {
            e.set("n", "b", &format!("new{i}"), b"v").unwrap();
        }
        assert_eq!(e.namespace_churn("n"), (50, 0), "expired, not evicted");
        assert_eq!(e.namespace_usage("n"), (100, recount_all(&e, "n")));
    }

    /// Bytes of every entry of `ns`, expired or not.
    fn recount_all(e: &Engine, ns: &str) -> u64 {
        let mut bytes = 0;
        for bucket in e.bucket_names(ns) {
            e.read_bucket(ns, &bucket, |entries| {
                for entry in entries.iter() {
                    bytes += entry.key().size();
                }
            });
        }
        bytes
    }

    #[test]
    fn an_increment_never_evicts_its_own_counter() {
        let e = evicting(
            Limits {
                max_total_bytes: 100,
                ..limits()
            },
            "n",
        );
        e.set("other", "b", "k", &[0; 96]).unwrap(); // 97 bytes no eviction may free
        e.set("n", "b", "c", b"99").unwrap(); // 3 bytes: the store is full
        let err = e.increment("n", "b", "c", 1).unwrap_err();
        assert!(matches!(err, EngineError::WontFit { .. }), "{err}");
        assert_eq!(
            e.get("n", "b", "c").as_deref(),
            Some(&b"99"[..]),
            "not reset"
        );
    }

    #[test]
    fn a_batch_overwriting_a_full_namespace_with_deadlines_is_not_refused() {
        // Under the shared gate a batch reserves as if every pair were new; with no expired
        // entry to reclaim, it must still be tried alone with exact counts.
        let e = Engine::new(limits());
        let hour = Some(Duration::from_secs(3600));
        for i in 0..100 {
            e.set_expiring("n", "b", &format!("k{i}"), b"v", hour)
                .unwrap();
        }
        e.set_many_expiring("n", "b", [("k1", &b"w"[..]), ("k2", b"w")], hour)
            .unwrap();
        assert_eq!(e.get("n", "b", "k2").as_deref(), Some(&b"w"[..]));
        let err = e.set("n", "b", "new", b"v").unwrap_err();
        assert!(err.to_string().contains("max_keys"), "{err}");
    }

    #[test]
    fn racing_evictions_of_a_tiny_namespace_never_refuse() {
        let e = evicting(
            Limits {
                max_keys: 1,
                ..limits()
            },
            "n",
        );
        let refused = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for t in 0..4 {
                let (e, refused) = (&e, &refused);
                s.spawn(move || {
                    for i in 0..2000 {
                        if e.set("n", &format!("b{t}"), &format!("{i}"), b"v").is_err() {
                            refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(refused.into_inner(), 0);
        assert_eq!(e.namespace_usage("n").0, 1);
    }

    #[test]
    fn racing_writers_of_an_evicting_namespace_are_never_refused() {
        let e = evicting(
            Limits {
                max_keys: 200,
                max_total_bytes: 3000,
                ..limits()
            },
            "n",
        );
        let refused = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for t in 0..4 {
                let (e, refused) = (&e, &refused);
                s.spawn(move || {
                    for i in 0..3000 {
                        let key = format!("t{t}-{i}");
                        let written = match i % 5 {
                            0 => {
                                e.set_many("n", "b", [(key.as_str(), &b"xy"[..]), ("shared", b"z")])
                            }
                            1 => e.increment("n", "c", &key, 1).map(drop),
                            _ => e.set("n", "b", &key, &[1; 7]),
                        };
                        if written.is_err() {
                            refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        if i % 7 == 0 {
                            e.delete("n", "b", &format!("t{t}-{}", i / 2));
                        }
                    }
                });
            }
        });
        assert_eq!(refused.into_inner(), 0);
        let usage = e.namespace_usage("n");
        assert!(usage.0 <= 200 && usage.1 <= 3000, "{usage:?}");
        assert_eq!(usage, recount(&e, "n"));
        assert!(e.namespace_churn("n").1 > 10_000);
    }
}
