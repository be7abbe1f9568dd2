//! The store's API, [`Engine`]: reads and writes of namespaces of buckets of keys.
//!
//! Every method is short and never blocks on I/O; callers on an async runtime may call it
//! directly (but see [`Engine::list_keys_within`] for the first page of a large bucket).
//!
//! # Shape
//!
//! `namespaces → buckets → entries`, each level a [`DashMap`]. A write holds a read guard on
//! its namespace and on its bucket while it takes the entry's shard lock, always in that order,
//! so an empty bucket can be dropped (which needs the bucket map's write lock) without racing a
//! writer that is about to fill it. No method takes a second guard on a map it already holds a
//! guard of: DashMap's locks are not re-entrant.
//!
//! # Expiry and eviction
//!
//! Each entry carries a [`Stamp`]: its deadline (from the TTL its write asked for) and when it
//! was last used. An expired entry is gone for every operation at once: reads treat it as
//! missing and remove it, writes replace it as if it were missing; what no call touches, the
//! incremental sweep (`expiry.rs`) reclaims. A namespace with eviction on
//! ([`Engine::set_eviction`]) makes room at a usage limit by evicting its own least recently
//! used entries, approximately (`evict.rs`), instead of refusing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

use crate::answer::{AnswerRefused, ANSWER_ELEMENT_BYTES};
use crate::clock::Clock;
use crate::cursor::Cursor;
use crate::error::EngineError;
use crate::expiry::SweepState;
use crate::item::{Entries, Item, Stamp};
use crate::limits::{check_key, check_value, Limits};
use crate::listing::{
    page_end, KeyPage, Listing, Listings, SortedKeys, UnsortedKeys, LISTING_OVERHEAD,
};
use crate::usage::{Space, Usage};
use crate::watch::{Notifier, Observer, What};

/// Bytes of values get-many copies into one shared allocation before starting another.
const GET_MANY_BUFFER: usize = 64 * 1024;

/// Tries of a write that makes room under the shared gate before it makes room alone.
const SHARED_ROOM_ROUNDS: u32 = 4;

/// One tenant's data: its buckets, what it holds (see `usage.rs`), its eviction setting and
/// what left it by expiry and eviction.
#[derive(Default)]
pub(crate) struct Namespace {
    pub(crate) buckets: DashMap<Box<str>, Entries>,
    pub(crate) keys: AtomicU64,
    pub(crate) bytes: AtomicU64,
    /// Evict least recently used entries at a usage limit instead of refusing.
    pub(crate) evicts: AtomicBool,
    /// An entry with a deadline was written here once: the sweep and listings look for
    /// expired entries only in such namespaces.
    pub(crate) expires: AtomicBool,
    pub(crate) expired: AtomicU64,
    pub(crate) evicted: AtomicU64,
    /// Its changes go to the store's observer (`watch.rs`).
    pub(crate) watched: AtomicBool,
}

impl Namespace {
    pub(crate) fn space<'a>(&'a self, total: &'a AtomicU64) -> Space<'a> {
        Space::new(total, &self.keys, &self.bytes)
    }
}

/// Why entries are removed: the counters differ.
#[derive(Clone, Copy)]
pub(crate) enum Removal {
    /// A delete: whatever is there goes.
    Deleted,
    /// Expiry: only entries expired at this tick go.
    Expired(u32),
}

/// The in-memory store. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct Engine {
    pub(crate) namespaces: DashMap<Box<str>, Namespace>,
    pub(crate) total_bytes: AtomicU64,
    pub(crate) clock: Clock,
    /// Where the expiry sweep is (`expiry.rs`).
    pub(crate) sweep: Mutex<SweepState>,
    /// Seeds eviction's random samples (`evict.rs`).
    pub(crate) samples: AtomicU64,
    // Read on every write, written on a config update: a plain `RwLock` around a `Copy` value,
    // never held across anything but a copy.
    limits: RwLock<Limits>,
    listings: Listings,
    /// Keys removed so far, anywhere. A listing page re-checks its keys against the bucket
    /// only when this moved since the listing's snapshot: a page of 1,000 keys of a 1M-key
    /// bucket is otherwise 1,000 cache-missing lookups for nothing.
    pub(crate) removals: AtomicU64,
    /// Successful writes and removals so far: a snapshot is only needed when this moved.
    pub(crate) changes: AtomicU64,
    /// Batches that began writing under the shared gate, and those still writing: a
    /// single-key refusal is retried alone in the store only when one may have caused it.
    batches_begun: AtomicU64,
    batches_pending: AtomicU64,
    /// Writes hold it shared; a write refused at a usage limit retries holding it alone (see
    /// `usage.rs`). A std lock: never held across an await.
    pub(crate) gate: RwLock<()>,
    /// Told of the changes in watched namespaces (`watch.rs`).
    pub(crate) observer: OnceLock<Arc<dyn Observer>>,
}

impl Engine {
    /// An empty store enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            namespaces: DashMap::new(),
            total_bytes: AtomicU64::new(0),
            clock: Clock::new(),
            sweep: Mutex::default(),
            samples: AtomicU64::new(0),
            limits: RwLock::new(limits),
            listings: Listings::default(),
            removals: AtomicU64::new(0),
            changes: AtomicU64::new(0),
            batches_begun: AtomicU64::new(0),
            batches_pending: AtomicU64::new(0),
            gate: RwLock::new(()),
            observer: OnceLock::new(),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        *self
            .limits
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Replaces the limits. Data over a lowered limit stays; only new writes are refused.
    pub fn set_limits(&self, limits: Limits) {
        *self
            .limits
            .write()
            .unwrap_or_else(|poison| poison.into_inner()) = limits;
    }

    /// The value of `key`, `None` when it does not exist.
    pub fn get(&self, ns: &str, bucket: &str, key: &str) -> Option<Bytes> {
        self.get_within(ns, bucket, key, |_| true).unwrap_or(None)
    }

    /// Like [`Engine::get`], asking `room` for the value's size before copying it.
    pub fn get_within(
        &self,
        ns: &str,
        bucket: &str,
        key: &str,
        room: impl FnOnce(usize) -> bool,
    ) -> Result<Option<Bytes>, AnswerRefused> {
        self.read_entry(ns, bucket, key, true, |item, _| {
            let value = item.value();
            if !room(value.len()) {
                return Err(AnswerRefused {
                    asked: value.len() as u64,
                });
            }
            Ok(Bytes::copy_from_slice(value))
        })
        .transpose()
    }

    /// Looks `key` up as every read does: an expired entry is missing (and removed, after the
    /// look-up); a live one is marked used, when `touch`, and handed to `f` under its shard's
    /// read lock.
    fn read_entry<T>(
        &self,
        ns: &str,
        bucket: &str,
        key: &str,
        touch: bool,
        f: impl FnOnce(&Item, &Stamp) -> T,
    ) -> Option<T> {
        let (now, now_ms) = self.clock.now();
        let mut expired = false;
        let found = self
            .read_bucket(ns, bucket, |entries| {
                let entry = entries.get(key)?;
                let stamp = entry.value();
                if stamp.expired(now) {
                    expired = true;
                    return None;
                }
                if touch {
                    stamp.touch(now_ms);
                }
                Some(f(entry.key(), stamp))
            })
            .flatten();
        if expired {
            self.remove(ns, bucket, [key], Removal::Expired(now));
        }
        found
    }

    /// The value of `key` and its deadline as Unix milliseconds (0 for none), for a snapshot:
    /// it does not count as a use (eviction's order stays the components').
    pub fn get_with_deadline(&self, ns: &str, bucket: &str, key: &str) -> Option<(Bytes, u64)> {
        let (value, deadline) = self.read_entry(ns, bucket, key, false, |item, stamp| {
            (Bytes::copy_from_slice(item.value()), stamp.deadline())
        })?;
        Some((value, self.clock.to_unix_ms(deadline)))
    }

    /// Stores `value` under `key` with a deadline given as Unix milliseconds (0 for none), as
    /// a snapshot holds it; a deadline already passed stores nothing.
    pub fn set_with_deadline(
        &self,
        ns: &str,
        bucket: &str,
        key: &str,
        value: &[u8],
        unix_ms: u64,
    ) -> Result<(), EngineError> {
        match self.clock.deadline_of_unix_ms(unix_ms) {
            None => Ok(()),
            Some(deadline) => self.set_at(ns, bucket, key, value, deadline),
        }
    }

    /// `Err` when `bucket` or `key` is longer than `max_key_bytes`. Writes check this
    /// themselves; `get` checks it first so that a component learns of the limit instead of
    /// reading "none" for a key it could never have written.
    pub fn check_key_limits(&self, bucket: &str, key: &str) -> Result<(), EngineError> {
        let limits = self.limits();
        check_key(&limits, "bucket name", bucket)?;
        check_key(&limits, "key", key)
    }

    /// Whether `key` exists. Not a use of it, for eviction (as Redis's `EXISTS`).
    pub fn exists(&self, ns: &str, bucket: &str, key: &str) -> bool {
        self.read_entry(ns, bucket, key, false, |_, _| ()).is_some()
    }

    /// Stores `value` under `key`, with no deadline.
    pub fn set(&self, ns: &str, bucket: &str, key: &str, value: &[u8]) -> Result<(), EngineError> {
        self.set_expiring(ns, bucket, key, value, None)
    }

    /// Stores `value` under `key`, expiring `ttl` from now (`None`: never).
    pub fn set_expiring(
        &self,
        ns: &str,
        bucket: &str,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), EngineError> {
        self.set_at(ns, bucket, key, value, self.clock.deadline(ttl))
    }

    fn set_at(
        &self,
        ns: &str,
        bucket: &str,
        key: &str,
        value: &[u8],
        deadline: u32,
    ) -> Result<(), EngineError> {
        self.set_at_within(self.limits(), ns, bucket, key, value, deadline)
    }

    /// [`Engine::set_at`] under `limits` (the store's, or none for a replicated write).
    pub(crate) fn set_at_within(
        &self,
        limits: Limits,
        ns: &str,
        bucket: &str,
        key: &str,
        value: &[u8],
        deadline: u32,
    ) -> Result<(), EngineError> {
        check_key(&limits, "bucket name", bucket)?;
        check_key(&limits, "key", key)?;
        check_value(&limits, value)?;
        let expired = self.limited_write(
            ns,
            bucket,
            false,
            deadline,
            None,
            |space, entries, notify, _| {
                let (now, now_ms) = self.clock.now();
                // Exact: the old entry cannot change while its shard lock is held.
                match entries.entry(Item::new(key, value)) {
                    Entry::Occupied(old) => {
                        let old_len = old.key().value().len();
                        let grow = value.len().saturating_sub(old_len) as u64;
                        let reservation = space.reserve(&limits, 0, grow)?;
                        let was_expired = old.get().expired(now);
                        notify.overwrite(key, value, was_expired);
                        old.replace_entry(Stamp::new(deadline, now_ms));
                        space.settle(reservation, 0, value.len() as i64 - old_len as i64);
                        Ok(u64::from(was_expired))
                    }
                    Entry::Vacant(vacant) => {
                        let size = (key.len() + value.len()) as u64;
                        let reservation = space.reserve(&limits, 1, size)?;
                        notify.set(key, value);
                        vacant.insert(Stamp::new(deadline, now_ms));
                        space.settle(reservation, 1, size as i64);
                        Ok(0)
                    }
                }
            },
        )?;
        self.count_expired(ns, expired);
        Ok(())
    }

    /// Counts entries that writes found expired and replaced.
    fn count_expired(&self, ns: &str, expired: u64) {
        if expired > 0 {
            if let Some(ns_ref) = self.namespaces.get(ns) {
                ns_ref.expired.fetch_add(expired, Ordering::Relaxed);
            }
        }
    }

    /// Stores every pair, or none of them, with no deadline (see
    /// [`Engine::set_many_expiring`]).
    pub fn set_many<'a, I>(&self, ns: &str, bucket: &str, pairs: I) -> Result<(), EngineError>
    where
        I: IntoIterator<Item = (&'a str, &'a [u8])>,
    {
        self.set_many_expiring(ns, bucket, pairs, None)
    }

    /// Stores every pair, or none of them, expiring `ttl` from now: every limit is checked
    /// before anything is written. A key named twice ends with its last value.
    pub fn set_many_expiring<'a, I>(
        &self,
        ns: &str,
        bucket: &str,
        pairs: I,
        ttl: Option<Duration>,
    ) -> Result<(), EngineError>
    where
        I: IntoIterator<Item = (&'a str, &'a [u8])>,
    {
        let limits = self.limits();
        check_key(&limits, "bucket name", bucket)?;
        let mut latest: HashMap<&str, &[u8]> = HashMap::new();
        for (key, value) in pairs {
            check_key(&limits, "key", key)?;
            check_value(&limits, value)?;
            latest.insert(key, value);
        }
        self.set_many_at(limits, ns, bucket, latest, self.clock.deadline(ttl))
    }

    /// Stores every pair of `latest` (distinct keys, checked), or none of them, under
    /// `limits`, expiring at `deadline`.
    pub(crate) fn set_many_at(
        &self,
        limits: Limits,
        ns: &str,
        bucket: &str,
        latest: HashMap<&str, &[u8]>,
        deadline: u32,
    ) -> Result<(), EngineError> {
        if latest.len() == 1 {
            let (key, value) = latest.into_iter().next().unwrap_or_default();
            return self.set_at_within(limits, ns, bucket, key, value, deadline);
        }
        if latest.is_empty() {
            return Ok(());
        }
        let expired = self.limited_write(
            ns,
            bucket,
            true,
            deadline,
            None,
            |space, entries, notify, exclusive| {
                let (now, now_ms) = self.clock.now();
                let (mut new_keys, mut change) = (0u64, 0i64);
                for (key, value) in &latest {
                    match entries.get(*key).filter(|_| exclusive) {
                        // Alone in the store: what the batch changes is exact (shrinking values
                        // make room for growing ones in the same batch).
                        Some(old) => change += value.len() as i64 - old.key().value().len() as i64,
                        // Shared: the worst case, every key new.
                        None => {
                            new_keys += 1;
                            change += (key.len() + value.len()) as i64;
                        }
                    }
                }
                let reservation = space.reserve(&limits, new_keys, change.max(0) as u64)?;
                let (mut added, mut delta, mut expired) = (0u64, 0i64, 0u64);
                let stamp = || Stamp::new(deadline, now_ms);
                for (key, value) in &latest {
                    let (was_new, change, was_expired) =
                        put(entries, notify, key, value, stamp, now);
                    added += u64::from(was_new);
                    delta += change;
                    expired += u64::from(was_expired);
                }
                space.settle(reservation, added, delta);
                Ok(expired)
            },
        )?;
        self.count_expired(ns, expired);
        Ok(())
    }

    /// Removes `key`; a missing key is not an error.
    pub fn delete(&self, ns: &str, bucket: &str, key: &str) {
        self.delete_many(ns, bucket, [key]);
    }

    /// Removes every key named; missing keys are ignored.
    pub fn delete_many<'a>(&self, ns: &str, bucket: &str, keys: impl IntoIterator<Item = &'a str>) {
        self.remove(ns, bucket, keys, Removal::Deleted);
    }

    /// Removes the keys named, all of them or (`Removal::Expired`) those expired; answers how
    /// many went.
    pub(crate) fn remove<'a>(
        &self,
        ns: &str,
        bucket: &str,
        keys: impl IntoIterator<Item = &'a str>,
        why: Removal,
    ) -> u64 {
        let _shared = self
            .gate
            .read()
            .unwrap_or_else(|poison| poison.into_inner());
        let Some(ns_ref) = self.namespaces.get(ns) else {
            return 0;
        };
        let (emptied, removed) = {
            let Some(entries) = ns_ref.buckets.get(bucket) else {
                return 0;
            };
            let space = ns_ref.space(&self.total_bytes);
            let notify = self.notifier(&ns_ref, ns, bucket);
            let (mut removed, mut expired) = (0u64, 0u64);
            for key in keys {
                // The counters go down under the entry's shard lock, as the entry goes: a
                // writer of the same key cannot see it gone while it is still counted (and be
                // refused at a limit the delete already made room under).
                let released = entries.remove_if(key, |item, stamp| {
                    let goes = match why {
                        Removal::Deleted => true,
                        Removal::Expired(now) => stamp.expired(now),
                    };
                    if goes {
                        space.release(1, item.size());
                        notify.report(
                            key,
                            match why {
                                Removal::Deleted => What::Deleted,
                                Removal::Expired(_) => What::Expired,
                            },
                        );
                    }
                    goes
                });
                removed += u64::from(released.is_some());
                if matches!(why, Removal::Expired(_)) {
                    expired += u64::from(released.is_some());
                }
            }
            if removed > 0 {
                self.removals.fetch_add(removed, Ordering::SeqCst);
                self.changes.fetch_add(1, Ordering::Relaxed);
                ns_ref.expired.fetch_add(expired, Ordering::Relaxed);
            }
            (entries.is_empty(), removed)
        };
        if emptied {
            drop_empty(&ns_ref.buckets, bucket);
        }
        removed
    }

    /// Adds `delta` to the decimal counter under `key` and answers the new value, with no
    /// deadline (see [`Engine::increment_expiring`]).
    pub fn increment(
        &self,
        ns: &str,
        bucket: &str,
        key: &str,
        delta: u64,
    ) -> Result<u64, EngineError> {
        self.increment_expiring(ns, bucket, key, delta, None)
    }

    /// Adds `delta` to the decimal counter under `key` and answers the new value; a missing
    /// (or expired) key is created holding `delta`. The counter then expires `ttl` from now.
    /// Atomic: the read, the check and the write happen under the key's shard lock.
    pub fn increment_expiring(
        &self,
        ns: &str,
        bucket: &str,
        key: &str,
        delta: u64,
        ttl: Option<Duration>,
    ) -> Result<u64, EngineError> {
        let limits = self.limits();
        check_key(&limits, "bucket name", bucket)?;
        check_key(&limits, "key", key)?;
        let deadline = self.clock.deadline(ttl);
        let (next, expired) = self.limited_write(
            ns,
            bucket,
            false,
            deadline,
            Some(key),
            |space, entries, notify, _| loop {
                let (now, now_ms) = self.clock.now();
                // Read, compute, then write only if the value is still the one read: a
                // compare-and-swap under the key's shard lock (an item is replaced whole, so the
                // read cannot keep the lock across the new allocation). An expired value counts
                // from zero.
                // Marked used as it is read: eviction making room for this write never picks it.
                let seen: Option<(Box<[u8]>, bool)> = entries.get(key).map(|e| {
                    e.value().touch(now_ms);
                    (e.key().value().into(), e.value().expired(now))
                });
                let next = match &seen {
                    None | Some((_, true)) => delta,
                    Some((value, false)) => {
                        let current =
                            parse_counter(value).ok_or_else(|| EngineError::NotACounter {
                                key: key.to_owned(),
                            })?;
                        current
                            .checked_add(delta)
                            .ok_or_else(|| EngineError::Overflow {
                                key: key.to_owned(),
                                delta,
                            })?
                    }
                };
                let text = next.to_string();
                match (entries.entry(Item::new(key, text.as_bytes())), &seen) {
                    (Entry::Occupied(found), Some((old, was_expired)))
                        if found.key().value() == &old[..]
                            && found.get().expired(now) == *was_expired =>
                    {
                        let grow = (text.len() as u64).saturating_sub(old.len() as u64);
                        let reservation = space.reserve(&limits, 0, grow)?;
                        notify.overwrite(key, text.as_bytes(), *was_expired);
                        found.replace_entry(Stamp::new(deadline, now_ms));
                        space.settle(reservation, 0, text.len() as i64 - old.len() as i64);
                        return Ok((next, u64::from(*was_expired)));
                    }
                    (Entry::Vacant(vacant), None) => {
                        let size = (key.len() + text.len()) as u64;
                        let reservation = space.reserve(&limits, 1, size)?;
                        notify.set(key, text.as_bytes());
                        vacant.insert(Stamp::new(deadline, now_ms));
                        space.settle(reservation, 1, size as i64);
                        return Ok((delta, 0));
                    }
                    // Another writer got there between the read and the write: read again.
                    _ => continue,
                }
            },
        )?;
        self.count_expired(ns, expired);
        Ok(next)
    }

    /// Runs a write under the gate: shared, then, if a usage limit refused it, once more
    /// alone in the store (`exclusive` tells `write` which). Drops the bucket if the write
    /// created it and then failed.
    ///
    /// A single-key write reserves exactly, so its refusal is only retried when a batch's
    /// worst-case reservation may have caused it: a batch was under way when it began, or
    /// began while it ran. A tenant refused at its own `max_keys` therefore does not take the
    /// store-wide lock from every other tenant on each refused write.
    ///
    /// In a namespace that may make room (eviction on, or expiring entries), a usage refusal
    /// evicts what the write needs (`evict.rs`) and tries again under the shared gate: a full
    /// cache, whose every new key needs an eviction, takes no store-wide lock. The write goes
    /// alone in the store, making its room there, where counts are exact and no one can take
    /// the room it made (so it always ends): after [`SHARED_ROOM_ROUNDS`] rounds whose room
    /// other writers took first; when making room failed on counts a batch may have inflated;
    /// and, in an evicting namespace, whenever making room failed among other writers (a
    /// namespace emptied by racing evictions, say). Only a refusal found alone is final there.
    /// `spare`: a key of `bucket` that eviction must leave (an increment's own counter).
    fn limited_write<R>(
        &self,
        ns: &str,
        bucket: &str,
        batch: bool,
        deadline: u32,
        spare: Option<&str>,
        write: impl Fn(&Space<'_>, &Entries, &Notifier<'_>, bool) -> Result<R, EngineError>,
    ) -> Result<R, EngineError> {
        let makes_room = self.may_make_room(ns);
        let mut rounds = 0;
        let result = loop {
            let batches_before = self.batches_begun.load(Ordering::SeqCst);
            let pending_before = self.batches_pending.load(Ordering::SeqCst);
            let shared = self.write_shared(ns, bucket, batch, deadline, &write);
            let batch_may_have_refused = || {
                batch
                    || pending_before > 0
                    || self.batches_pending.load(Ordering::SeqCst) > 0
                    || self.batches_begun.load(Ordering::SeqCst) != batches_before
            };
            let err = match shared {
                Err(err) if err.is_usage_limit() => err,
                done => break done,
            };
            if makes_room && rounds < SHARED_ROOM_ROUNDS {
                rounds += 1;
                match self.make_room(ns, &err, (bucket, spare), false) {
                    Ok(()) => continue,
                    Err(_) if self.evicts(ns) || batch_may_have_refused() => {}
                    Err(refused) => break Err(refused),
                }
            } else if !(makes_room || batch_may_have_refused()) {
                break Err(err);
            }
            let _alone = self
                .gate
                .write()
                .unwrap_or_else(|poison| poison.into_inner());
            break loop {
                let written = self.write_bucket(ns, bucket, deadline, |space, entries, notify| {
                    write(space, entries, notify, true)
                });
                match written {
                    Err(err) if err.is_usage_limit() && makes_room => {
                        if let Err(refused) = self.make_room(ns, &err, (bucket, spare), true) {
                            break Err(refused);
                        }
                    }
                    done => break done,
                }
            };
        };
        match result {
            Ok(_) => {
                self.changes.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => self.drop_bucket_if_empty(ns, bucket),
        }
        result
    }

    /// One try of a write under the shared gate, counted as a batch under way if it is one.
    fn write_shared<R>(
        &self,
        ns: &str,
        bucket: &str,
        batch: bool,
        deadline: u32,
        write: &impl Fn(&Space<'_>, &Entries, &Notifier<'_>, bool) -> Result<R, EngineError>,
    ) -> Result<R, EngineError> {
        let _shared = self
            .gate
            .read()
            .unwrap_or_else(|poison| poison.into_inner());
        if batch {
            self.batches_begun.fetch_add(1, Ordering::SeqCst);
            self.batches_pending.fetch_add(1, Ordering::SeqCst);
        }
        let written = self.write_bucket(ns, bucket, deadline, |space, entries, notify| {
            write(space, entries, notify, false)
        });
        if batch {
            self.batches_pending.fetch_sub(1, Ordering::SeqCst);
        }
        written
    }

    /// How many writes and removals the store has seen: equal values mean an unchanged store.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::SeqCst)
    }

    /// `(key, value)` for each key asked, in the order asked; `None` for a missing key.
    pub fn get_many(
        &self,
        ns: &str,
        bucket: &str,
        keys: Vec<String>,
    ) -> Vec<Option<(String, Bytes)>> {
        let asked = keys.len();
        self.get_many_within(ns, bucket, keys, |_| true)
            .unwrap_or_else(|_| vec![None; asked])
    }

    /// Like [`Engine::get_many`], asking `room` before each value is copied (with the bytes
    /// its element adds to the answer: key, value and [`ANSWER_ELEMENT_BYTES`]). Once `room`
    /// says no, nothing more is copied; the rest is only measured, to say how large the
    /// answer would have been.
    ///
    /// Allocation-lean, since a batch is the bulk path: the keys move into the answer, and the
    /// values are copied into shared buffers (`Bytes` slices of a few allocations), not one
    /// allocation each.
    pub fn get_many_within(
        &self,
        ns: &str,
        bucket: &str,
        keys: Vec<String>,
        mut room: impl FnMut(usize) -> bool,
    ) -> Result<Vec<Option<(String, Bytes)>>, AnswerRefused> {
        let asked = keys.len();
        let (now, now_ms) = self.clock.now();
        let mut expired: Vec<String> = Vec::new();
        let found = self.read_bucket(ns, bucket, |entries| {
            let mut buffer = bytes::BytesMut::new();
            let mut answer = Vec::with_capacity(asked);
            let mut refused: Option<u64> = None;
            for (i, key) in keys.into_iter().enumerate() {
                let (entry, gone) = match entries.get(key.as_str()) {
                    Some(entry) if entry.value().expired(now) => (None, true),
                    found => (found, false),
                };
                let Some(entry) = entry else {
                    if gone {
                        expired.push(key);
                    }
                    if refused.is_none() {
                        answer.push(None);
                    }
                    continue;
                };
                entry.value().touch(now_ms);
                let value = entry.key().value();
                let cost = value.len() + key.len() + ANSWER_ELEMENT_BYTES;
                if let Some(total) = &mut refused {
                    *total += cost as u64;
                    continue;
                }
                if !room(cost) {
                    let copied: usize = answer
                        .iter()
                        .flatten()
                        .map(|(k, v): &(String, Bytes)| k.len() + v.len() + ANSWER_ELEMENT_BYTES)
                        .sum();
                    refused = Some((copied + cost) as u64);
                    answer.clear();
                    continue;
                }
                if buffer.capacity() < value.len() {
                    // Room for this value and, guessing the rest are alike, the ones
                    // after it, up to GET_MANY_BUFFER: a one-key batch allocates its
                    // value's size, not 64 KiB.
                    let guess = value.len().saturating_mul(asked - i);
                    buffer.reserve(guess.min(GET_MANY_BUFFER).max(value.len()));
                }
                buffer.extend_from_slice(value);
                answer.push(Some((key, buffer.split().freeze())));
            }
            match refused {
                Some(asked) => Err(AnswerRefused { asked }),
                None => Ok(answer),
            }
        });
        if !expired.is_empty() {
            let keys = expired.iter().map(String::as_str);
            self.remove(ns, bucket, keys, Removal::Expired(now));
        }
        found.unwrap_or_else(|| Ok(vec![None; asked]))
    }

    /// How many keys `bucket` holds.
    pub fn bucket_len(&self, ns: &str, bucket: &str) -> usize {
        self.read_bucket(ns, bucket, |entries| entries.len())
            .unwrap_or(0)
    }

    /// One page of the bucket's keys, in lexicographic order.
    pub fn list_keys(
        &self,
        ns: &str,
        bucket: &str,
        cursor: Option<Cursor>,
    ) -> Result<KeyPage, EngineError> {
        self.list_keys_within(ns, bucket, cursor, usize::MAX)
    }

    /// One page of the bucket's keys, in lexicographic order, of at most `list_page_size` keys
    /// and at most `max_bytes` (keys plus [`ANSWER_ELEMENT_BYTES`] each; a page always holds
    /// at least one key).
    ///
    /// The first call (no cursor) takes a sorted copy of the bucket's keys, O(N log N): the
    /// copy is made one shard's read lock at a time and sorted with no lock held, counted
    /// against `max_listing_bytes` as it grows. Later pages are slices of it, so a key that
    /// exists for the whole listing is listed exactly once. Keys deleted since the copy are
    /// left out of later pages; keys added since may be missing. Callers on an async runtime
    /// should make the first call of a large bucket ([`Engine::bucket_len`]) on a blocking
    /// thread.
    ///
    /// A cursor names the listing and the offset of its page, so a retried call with the same
    /// cursor answers the same page, the last one included, until the listing is dropped
    /// (idle for [`CURSOR_IDLE_TTL`](crate::CURSOR_IDLE_TTL), or to make room for other
    /// listings within `max_listing_bytes`: see `listing.rs`).
    pub fn list_keys_within(
        &self,
        ns: &str,
        bucket: &str,
        cursor: Option<Cursor>,
        max_bytes: usize,
    ) -> Result<KeyPage, EngineError> {
        let page_size = self.limits().list_page_size.max(1);
        let Some(cursor) = cursor else {
            // Read before the copy: a removal racing with it makes pages re-check.
            let removals = self.removals.load(Ordering::SeqCst);
            let limit = self.limits().max_listing_bytes;
            let mut held = self.listings.reserve(ns, LISTING_OVERHEAD, limit)?;
            let now = self.clock.now_tick();
            let copied = self.read_bucket(ns, bucket, |entries| {
                UnsortedKeys::copy(entries, now, |n| held.grow(n))
            });
            let keys = match copied {
                None => SortedKeys::default(),
                Some(copied) => copied?.sort(),
            };
            // A cursor holds a page's offset in 32 bits.
            if keys.len() > u32::MAX as usize {
                return Err(EngineError::ListingTooLarge { limit, held: 0 });
            }
            let end = page_end(&keys, 0, page_size, max_bytes);
            let first = keys.strings(0..end);
            if end == keys.len() {
                return Ok(KeyPage {
                    keys: first,
                    cursor: None,
                });
            }
            let cursor = self.listings.open(
                Listing {
                    namespace: ns.into(),
                    bucket: bucket.into(),
                    keys,
                    page_size,
                    removals,
                    last_used: Instant::now(),
                },
                held,
            );
            return Ok(KeyPage {
                keys: first,
                cursor: Some(cursor.at(end)),
            });
        };
        let (mut keys, next, removals) = self.listings.page(ns, bucket, cursor, max_bytes)?;
        // Leave out what was deleted since the copy, or has expired by now.
        let expires = self.namespace(ns, |n| n.expires.load(Ordering::Relaxed)) == Some(true);
        if expires || self.removals.load(Ordering::SeqCst) != removals {
            let now = self.clock.now_tick();
            self.read_bucket(ns, bucket, |entries| {
                keys.retain(|k| {
                    entries
                        .get(k.as_str())
                        .is_some_and(|e| !e.value().expired(now))
                });
            })
            .unwrap_or_else(|| keys.clear());
        }
        Ok(KeyPage { keys, cursor: next })
    }

    /// Live figures.
    pub fn usage(&self) -> Usage {
        let mut usage = Usage {
            namespaces: 0,
            bytes: self.total_bytes.load(Ordering::Relaxed),
            ..Usage::default()
        };
        for ns in &self.namespaces {
            usage.namespaces += 1;
            usage.buckets += ns.buckets.len();
            usage.keys += ns.keys.load(Ordering::Relaxed);
            usage.expired += ns.expired.load(Ordering::Relaxed);
            usage.evicted += ns.evicted.load(Ordering::Relaxed);
        }
        usage
    }

    /// Key plus value bytes the whole store holds.
    pub(crate) fn usage_bytes(&self) -> u64 {
        self.total_bytes.load(Ordering::Relaxed)
    }

    /// Keys that left namespace `ns` by expiry and by eviction so far: `(expired, evicted)`.
    pub fn namespace_churn(&self, ns: &str) -> (u64, u64) {
        self.namespace(ns, |n| {
            (
                n.expired.load(Ordering::Relaxed),
                n.evicted.load(Ordering::Relaxed),
            )
        })
        .unwrap_or_default()
    }

    /// Turns eviction on or off for namespace `ns`: on, a write that would pass `max_keys` or
    /// `max_total_bytes` evicts least recently used entries of `ns` (never of another
    /// namespace) instead of being refused.
    pub fn set_eviction(&self, ns: &str, on: bool) {
        self.set_flag(ns, on, |n| &n.evicts);
    }

    /// Sets one flag of namespace `ns`; turning one on makes the namespace if it is new (its
    /// first write then finds the flag), turning one off leaves a missing namespace missing.
    pub(crate) fn set_flag(&self, ns: &str, on: bool, flag: fn(&Namespace) -> &AtomicBool) {
        if !on && !self.namespaces.contains_key(ns) {
            return;
        }
        flag(&self.namespaces.entry(ns.into()).or_default()).store(on, Ordering::Relaxed);
    }

    /// Whether a write refused at a usage limit in `ns` may make room: by eviction, or by
    /// removing expired entries the sweep has not reached yet.
    fn may_make_room(&self, ns: &str) -> bool {
        self.namespace(ns, |n| {
            n.evicts.load(Ordering::Relaxed) || n.expires.load(Ordering::Relaxed)
        }) == Some(true)
    }

    /// Whether namespace `ns` evicts at a usage limit.
    pub fn evicts(&self, ns: &str) -> bool {
        self.namespace(ns, |n| n.evicts.load(Ordering::Relaxed)) == Some(true)
    }

    /// Moves the engine's clock ahead (tests of expiry).
    #[cfg(test)]
    pub(crate) fn skip_time(&self, by: Duration) {
        self.clock.skip(by);
    }

    fn namespace<R>(&self, ns: &str, f: impl FnOnce(&Namespace) -> R) -> Option<R> {
        self.namespaces.get(ns).map(|n| f(&n))
    }

    /// Names of up to `limit` namespaces, in no particular order.
    pub fn namespaces(&self, limit: usize) -> Vec<String> {
        self.namespaces
            .iter()
            .take(limit)
            .map(|ns| ns.key().to_string())
            .collect()
    }

    /// Names of the buckets of `ns` that hold keys, in no particular order.
    pub fn bucket_names(&self, ns: &str) -> Vec<String> {
        self.namespaces.get(ns).map_or_else(Vec::new, |n| {
            n.buckets.iter().map(|b| b.key().to_string()).collect()
        })
    }

    /// The keys of one bucket, in no particular order. Holds one shard's read lock at a time
    /// while that shard's keys are copied.
    pub fn bucket_keys(&self, ns: &str, bucket: &str) -> Vec<Box<str>> {
        let now = self.clock.now_tick();
        self.read_bucket(ns, bucket, |entries| {
            entries
                .iter()
                .filter(|e| !e.value().expired(now))
                .map(|e| Box::from(e.key().key()))
                .collect()
        })
        .unwrap_or_default()
    }

    /// Drops everything (a snapshot that failed half-way through loading).
    pub fn clear(&self) {
        self.namespaces.clear();
        self.total_bytes.store(0, Ordering::Relaxed);
        self.removals.fetch_add(1, Ordering::SeqCst);
        self.changes.fetch_add(1, Ordering::Relaxed);
    }

    /// Keys and bytes of one namespace; zeros for one never written.
    pub fn namespace_usage(&self, ns: &str) -> (u64, u64) {
        self.namespaces.get(ns).map_or((0, 0), |n| {
            (
                n.keys.load(Ordering::Relaxed),
                n.bytes.load(Ordering::Relaxed),
            )
        })
    }

    /// The open listings, for the listing module's tests.
    #[cfg(test)]
    pub(crate) fn listings(&self) -> &Listings {
        &self.listings
    }

    pub(crate) fn read_bucket<R>(
        &self,
        ns: &str,
        bucket: &str,
        f: impl FnOnce(&Entries) -> R,
    ) -> Option<R> {
        let ns_ref = self.namespaces.get(ns)?;
        let entries = ns_ref.buckets.get(bucket)?;
        Some(f(&entries))
    }

    /// Runs `f` on the bucket, creating it if need be; a write of an entry with a deadline
    /// marks its namespace as one the sweep visits.
    fn write_bucket<R>(
        &self,
        ns: &str,
        bucket: &str,
        deadline: u32,
        f: impl FnOnce(&Space<'_>, &Entries, &Notifier<'_>) -> R,
    ) -> R {
        let ns_ref = match self.namespaces.get(ns) {
            Some(found) => found,
            None => self.namespaces.entry(ns.into()).or_default().downgrade(),
        };
        if deadline != 0 && !ns_ref.expires.load(Ordering::Relaxed) {
            ns_ref.expires.store(true, Ordering::Relaxed);
        }
        let entries = match ns_ref.buckets.get(bucket) {
            Some(found) => found,
            None => ns_ref.buckets.entry(bucket.into()).or_default().downgrade(),
        };
        let notify = self.notifier(&ns_ref, ns, bucket);
        f(&ns_ref.space(&self.total_bytes), &entries, &notify)
    }

    fn drop_bucket_if_empty(&self, ns: &str, bucket: &str) {
        if let Some(ns_ref) = self.namespaces.get(ns) {
            drop_empty(&ns_ref.buckets, bucket);
        }
    }
}

/// Drops a bucket that holds no keys. Takes the bucket map's write lock, so it cannot run while
/// a writer holds the bucket (writers hold a read guard on it while they write).
pub(crate) fn drop_empty(buckets: &DashMap<Box<str>, Entries>, bucket: &str) {
    buckets.remove_if(bucket, |_, entries| entries.is_empty());
}

/// Writes one entry and reports it; answers whether the key is new, by how many bytes the store
/// changed and whether it replaced an entry expired at tick `now`.
fn put(
    entries: &Entries,
    notify: &Notifier<'_>,
    key: &str,
    value: &[u8],
    stamp: impl FnOnce() -> Stamp,
    now: u32,
) -> (bool, i64, bool) {
    match entries.entry(Item::new(key, value)) {
        Entry::Occupied(old) => {
            let change = value.len() as i64 - old.key().value().len() as i64;
            let was_expired = old.get().expired(now);
            notify.overwrite(key, value, was_expired);
            old.replace_entry(stamp());
            (false, change, was_expired)
        }
        Entry::Vacant(vacant) => {
            notify.set(key, value);
            vacant.insert(stamp());
            (true, (key.len() + value.len()) as i64, false)
        }
    }
}

/// A decimal `u64` with no sign, no spaces and no leading `+`; leading zeros are accepted.
/// A counter's value: decimal ASCII digits that fit a `u64`.
pub fn parse_counter(value: &[u8]) -> Option<u64> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{limits, list_all, strings};
    use std::collections::BTreeMap;
    use std::sync::Arc;

    #[test]
    fn never_written_bucket_is_empty() {
        let e = Engine::new(limits());
        assert_eq!(e.get("ns", "b", "k"), None);
        assert!(!e.exists("ns", "b", "k"));
        e.delete("ns", "b", "k");
        e.delete_many("ns", "b", ["k", "l"]);
        assert_eq!(
            e.list_keys("ns", "b", None).unwrap(),
            KeyPage {
                keys: vec![],
                cursor: None
            }
        );
        assert_eq!(
            e.get_many("ns", "b", strings(&["a", "b"])),
            vec![None, None]
        );
        assert_eq!(e.usage(), Usage::default());
    }

    #[test]
    fn empty_value_and_empty_bucket_name_round_trip() {
        let e = Engine::new(limits());
        e.set("ns", "", "k", b"").unwrap();
        assert_eq!(e.get("ns", "", "k"), Some(Bytes::new()));
        assert!(e.exists("ns", "", "k"));
    }

    #[test]
    fn namespaces_are_isolated() {
        let e = Engine::new(limits());
        e.set("a", "b", "k", b"1").unwrap();
        assert_eq!(e.get("b", "b", "k"), None);
        assert_eq!(e.get("a", "b", "k").as_deref(), Some(&b"1"[..]));
    }

    #[test]
    fn increment_counts_and_refuses_non_counters_and_overflow() {
        let e = Engine::new(limits());
        assert_eq!(e.increment("n", "b", "c", 5).unwrap(), 5);
        assert_eq!(e.increment("n", "b", "c", 0).unwrap(), 5);
        assert_eq!(e.increment("n", "b", "c", 7).unwrap(), 12);
        assert_eq!(e.get("n", "b", "c").as_deref(), Some(&b"12"[..]));
        e.set("n", "b", "t", b"hello").unwrap();
        assert!(matches!(
            e.increment("n", "b", "t", 1),
            Err(EngineError::NotACounter { .. })
        ));
        e.set("n", "b", "neg", b"-1").unwrap();
        assert!(matches!(
            e.increment("n", "b", "neg", 1),
            Err(EngineError::NotACounter { .. })
        ));
        e.set("n", "b", "max", u64::MAX.to_string().as_bytes())
            .unwrap();
        assert!(matches!(
            e.increment("n", "b", "max", 1),
            Err(EngineError::Overflow { .. })
        ));
        assert_eq!(
            e.get("n", "b", "max").as_deref(),
            Some(u64::MAX.to_string().as_bytes())
        );
        assert_eq!(e.get("n", "b", "t").as_deref(), Some(&b"hello"[..]));
    }

    #[test]
    fn increment_is_atomic_across_threads() {
        let e = Arc::new(Engine::new(limits()));
        std::thread::scope(|s| {
            for _ in 0..8 {
                let e = &e;
                s.spawn(move || {
                    for _ in 0..1000 {
                        e.increment("n", "b", "c", 1).unwrap();
                    }
                });
            }
        });
        assert_eq!(e.get("n", "b", "c").as_deref(), Some(&b"8000"[..]));
        assert_eq!(e.usage().bytes, 5);
    }

    #[test]
    fn limits_name_the_config_key_and_write_nothing() {
        let e = Engine::new(limits());
        let long = "k".repeat(65);
        let err = e.set("n", "b", &long, b"v").unwrap_err();
        assert!(err.to_string().contains("max_key_bytes"), "{err}");
        let err = e.set("n", &long, "k", b"v").unwrap_err();
        assert!(err.to_string().contains("bucket name"), "{err}");
        let err = e.set("n", "b", "k", &[0; 1025]).unwrap_err();
        assert!(err.to_string().contains("max_value_bytes"), "{err}");
        assert_eq!(e.usage(), Usage::default());
        // What `get` checks before reading.
        let err = e.check_key_limits("b", &long).unwrap_err();
        assert!(err.to_string().contains("max_key_bytes"), "{err}");
        assert!(e.check_key_limits(&long, "k").is_err());
        e.check_key_limits("b", &"k".repeat(64)).unwrap();

        for i in 0..100 {
            e.set("n", "b", &format!("{i}"), b"").unwrap();
        }
        let err = e.set("n", "b", "one-more", b"").unwrap_err();
        assert!(err.to_string().contains("max_keys"), "{err}");
        // Overwrites do not grow the count, so they pass.
        e.set("n", "b", "7", b"x").unwrap();
        // Another namespace has its own count.
        e.set("m", "b", "one-more", b"").unwrap();
        assert!(!e.exists("n", "b", "one-more"));
        assert_eq!(e.namespace_usage("n").0, 100);
    }

    #[test]
    fn max_total_bytes_is_store_wide_and_exact() {
        let e = Engine::new(Limits {
            max_total_bytes: 100,
            ..limits()
        });
        e.set("a", "b", "k", &[1; 49]).unwrap(); // 50 bytes
        e.set("c", "b", "k", &[1; 49]).unwrap(); // 100 bytes
        let err = e.set("d", "b", "k", b"").unwrap_err();
        assert!(err.to_string().contains("max_total_bytes"), "{err}");
        // A shrinking overwrite frees room, a growing one within room passes.
        e.set("a", "b", "k", &[1; 9]).unwrap();
        assert_eq!(e.usage().bytes, 60);
        e.set("d", "b", "kk", &[1; 38]).unwrap();
        assert_eq!(e.usage().bytes, 100);
        e.delete("a", "b", "k");
        assert_eq!(e.usage().bytes, 90);
        assert_eq!(e.usage().buckets, 2, "the emptied bucket is dropped");
    }

    #[test]
    fn set_many_is_all_or_nothing() {
        let e = Engine::new(Limits {
            max_keys: 3,
            ..limits()
        });
        e.set("n", "b", "a", b"1").unwrap();
        let err = e
            .set_many("n", "b", [("b", &b"2"[..]), ("c", b"3"), ("d", b"4")])
            .unwrap_err();
        assert!(err.to_string().contains("max_keys"));
        assert_eq!(
            e.get_many("n", "b", strings(&["a", "b", "c", "d"]))
                .iter()
                .flatten()
                .count(),
            1
        );
        let err = e
            .set_many("n", "b", [("b", &b"2"[..]), ("c", &[0; 2000][..])])
            .unwrap_err();
        assert!(err.to_string().contains("max_value_bytes"));
        assert!(!e.exists("n", "b", "b"));
        // A key named twice counts once and keeps the last value.
        e.set_many("n", "b", [("b", &b"2"[..]), ("b", b"22"), ("c", b"3")])
            .unwrap();
        assert_eq!(e.get("n", "b", "b").as_deref(), Some(&b"22"[..]));
        assert_eq!(e.namespace_usage("n"), (3, 2 + 3 + 2));
    }

    #[test]
    fn get_many_answers_in_the_order_asked() {
        let e = Engine::new(limits());
        e.set_many("n", "b", [("x", &b"1"[..]), ("y", b"2")])
            .unwrap();
        let got = e.get_many("n", "b", strings(&["y", "missing", "x", "y"]));
        assert_eq!(
            got,
            vec![
                Some(("y".into(), Bytes::from_static(b"2"))),
                None,
                Some(("x".into(), Bytes::from_static(b"1"))),
                Some(("y".into(), Bytes::from_static(b"2"))),
            ]
        );
    }

    #[test]
    fn get_many_values_survive_the_shared_buffers() {
        // Values are copied into shared buffers of up to GET_MANY_BUFFER bytes: mixed sizes,
        // empty values, values larger than a buffer and many buffers' worth must each come
        // back whole and unchanged.
        let e = Engine::new(Limits::UNLIMITED);
        let value = |i: usize| -> Vec<u8> {
            let len = match i % 5 {
                0 => 0,
                1 => 1,
                2 => 1000 + i,
                3 => GET_MANY_BUFFER + 7 * i,
                _ => 3 * GET_MANY_BUFFER,
            };
            (0..len).map(|j| (i * 31 + j) as u8).collect()
        };
        let keys: Vec<String> = (0..60).map(|i| format!("k{i}")).collect();
        for (i, k) in keys.iter().enumerate() {
            e.set("n", "b", k, &value(i)).unwrap();
        }
        let mut asked = keys.clone();
        asked.reverse();
        let got = e.get_many("n", "b", asked.clone());
        assert_eq!(got.len(), 60);
        for (key, answer) in asked.iter().zip(got) {
            let i: usize = key[1..].parse().unwrap();
            let (k, v) = answer.expect("every key was set");
            assert_eq!(&k, key);
            assert_eq!(v, Bytes::from(value(i)), "value of {key}");
        }
    }

    /// One step of a random workload, for the model test below.
    #[derive(Debug, Clone)]
    enum Op {
        Set(u8, u8, Vec<u8>),
        Delete(u8, u8),
        Increment(u8, u8, u64),
        SetMany(u8, Vec<(u8, Vec<u8>)>),
        DeleteMany(u8, Vec<u8>),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        let value = prop::collection::vec(any::<u8>(), 0..24);
        prop_oneof![
            (0..3u8, 0..12u8, value.clone()).prop_map(|(b, k, v)| Op::Set(b, k, v)),
            (0..3u8, 0..12u8).prop_map(|(b, k)| Op::Delete(b, k)),
            (0..3u8, 0..12u8, 0..1000u64).prop_map(|(b, k, d)| Op::Increment(b, k, d)),
            (0..3u8, prop::collection::vec((0..12u8, value), 0..6))
                .prop_map(|(b, kv)| Op::SetMany(b, kv)),
            (0..3u8, prop::collection::vec(0..12u8, 0..6)).prop_map(|(b, k)| Op::DeleteMany(b, k)),
        ]
    }

    proptest::proptest! {
        /// The engine agrees with a BTreeMap model on every read, the usage figures and the
        /// limits, for random workloads under tight limits.
        #[test]
        fn engine_matches_a_model(ops in proptest::collection::vec(op(), 1..120)) {
            let limits = Limits { max_keys: 20, max_total_bytes: 300, max_value_bytes: 20, ..limits() };
            let e = Engine::new(limits);
            let mut model: BTreeMap<(String, String), Vec<u8>> = BTreeMap::new();
            let size = |m: &BTreeMap<(String, String), Vec<u8>>| -> u64 {
                m.iter().map(|((_, k), v)| (k.len() + v.len()) as u64).sum()
            };
            for op in ops {
                match op {
                    Op::Set(b, k, v) => {
                        let (b, k) = (b.to_string(), format!("k{k}"));
                        let mut next = model.clone();
                        next.insert((b.clone(), k.clone()), v.clone());
                        let ok = v.len() <= 20 && next.len() <= 20 && size(&next) <= 300;
                        proptest::prop_assert_eq!(e.set("n", &b, &k, &v).is_ok(), ok);
                        if ok { model = next; }
                    }
                    Op::Delete(b, k) => {
                        e.delete("n", &b.to_string(), &format!("k{k}"));
                        model.remove(&(b.to_string(), format!("k{k}")));
                    }
                    Op::Increment(b, k, d) => {
                        let (b, k) = (b.to_string(), format!("k{k}"));
                        let current = match model.get(&(b.clone(), k.clone())) {
                            None => Some(0),
                            Some(v) => parse_counter(v),
                        };
                        let expect = current.and_then(|c| c.checked_add(d)).and_then(|n| {
                            let mut next = model.clone();
                            next.insert((b.clone(), k.clone()), n.to_string().into_bytes());
                            (next.len() <= 20 && size(&next) <= 300).then_some((n, next))
                        });
                        let got = e.increment("n", &b, &k, d);
                        proptest::prop_assert_eq!(got.as_ref().ok().copied(), expect.as_ref().map(|(n, _)| *n));
                        if let Some((_, next)) = expect { model = next; }
                    }
                    Op::SetMany(b, kv) => {
                        let b = b.to_string();
                        let pairs: Vec<(String, Vec<u8>)> = kv.into_iter().map(|(k, v)| (format!("k{k}"), v)).collect();
                        let mut next = model.clone();
                        for (k, v) in &pairs { next.insert((b.clone(), k.clone()), v.clone()); }
                        let ok = pairs.iter().all(|(_, v)| v.len() <= 20) && next.len() <= 20 && size(&next) <= 300;
                        let got = e.set_many("n", &b, pairs.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
                        proptest::prop_assert_eq!(got.is_ok(), ok);
                        if ok { model = next; }
                    }
                    Op::DeleteMany(b, keys) => {
                        let keys: Vec<String> = keys.into_iter().map(|k| format!("k{k}")).collect();
                        e.delete_many("n", &b.to_string(), keys.iter().map(String::as_str));
                        for k in keys { model.remove(&(b.to_string(), k)); }
                    }
                }
                let usage = e.usage();
                proptest::prop_assert_eq!(usage.keys, model.len() as u64);
                proptest::prop_assert_eq!(usage.bytes, size(&model));
            }
            for b in 0..3u8 {
                let b = b.to_string();
                let want: Vec<String> = model.keys().filter(|(mb, _)| *mb == b).map(|(_, k)| k.clone()).collect();
                proptest::prop_assert_eq!(list_all(&e, "n", &b), want.clone());
                for k in want {
                    proptest::prop_assert_eq!(e.get("n", &b, &k).map(|v| v.to_vec()), model.get(&(b.clone(), k.clone())).cloned());
                }
            }
            let buckets = model.keys().map(|(b, _)| b.clone()).collect::<std::collections::BTreeSet<_>>().len();
            proptest::prop_assert_eq!(e.usage().buckets, buckets);
        }
    }
}
