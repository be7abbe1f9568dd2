//! The storage engine: namespaces of buckets of keys, in memory, with limits.
//!
//! Plain synchronous Rust with no wRPC or NATS types, so it can be unit-tested, fuzzed and
//! benchmarked alone. Every method is short and never blocks on I/O; callers on an async
//! runtime may call it directly.
//!
//! # Shape
//!
//! `namespaces → buckets → entries`, each level a [`DashMap`]. A write holds a read guard on
//! its namespace and on its bucket while it takes the entry's shard lock, always in that order,
//! so an empty bucket can be dropped (which needs the bucket map's write lock) without racing a
//! writer that is about to fill it. No method takes a second guard on a map it already holds a
//! guard of: DashMap's locks are not re-entrant.
//!
//! # Accounting
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
//! a limit, and holds the gate for one write.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

/// Entries of one bucket: a set of [`Item`]s, looked up by key.
type Entries = DashMap<Item, ()>;

/// One entry in one heap allocation: `[key length: u32 LE][key][value]`. It hashes, compares
/// and borrows as its key, so a bucket is looked up by `&str`. One allocation instead of a
/// boxed key and a boxed value saves a malloc header and a 16-byte slot per key (see
/// BENCHMARKS.md, memory per key).
struct Item(Box<[u8]>);

impl Item {
    fn new(key: &str, value: &[u8]) -> Item {
        let len = u32::try_from(key.len()).expect("keys are bounded far below 4 GiB");
        let mut buf = Vec::with_capacity(4 + key.len() + value.len());
        buf.extend_from_slice(&len.to_le_bytes());
        buf.extend_from_slice(key.as_bytes());
        buf.extend_from_slice(value);
        Item(buf.into_boxed_slice())
    }

    fn key_len(&self) -> usize {
        u32::from_le_bytes([self.0[0], self.0[1], self.0[2], self.0[3]]) as usize
    }

    fn key(&self) -> &str {
        // SAFETY: `Item::new` is the only constructor and copies these bytes from a `&str`.
        unsafe { std::str::from_utf8_unchecked(&self.0[4..4 + self.key_len()]) }
    }

    fn value(&self) -> &[u8] {
        &self.0[4 + self.key_len()..]
    }

    /// Key plus value bytes, what the accounting counts.
    fn size(&self) -> u64 {
        (self.0.len() - 4) as u64
    }
}

impl std::borrow::Borrow<str> for Item {
    fn borrow(&self) -> &str {
        self.key()
    }
}

impl std::hash::Hash for Item {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}

impl PartialEq for Item {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Item {}

/// Bytes of values get-many copies into one shared allocation before starting another.
const GET_MANY_BUFFER: usize = 64 * 1024;

/// How long a list-keys cursor lives after its last use.
pub const CURSOR_IDLE_TTL: Duration = Duration::from_secs(300);

/// How many unfinished listings one namespace keeps at once; opening another drops that
/// namespace's least recently used one (never another namespace's).
pub const MAX_LISTINGS_PER_NAMESPACE: usize = 64;

/// What an open listing costs besides its keys, counted against `max_listing_bytes`.
const LISTING_OVERHEAD: u64 = 1024;

/// Bytes an answer is charged per element besides its keys and values (the encoding's length
/// prefixes and the element's own struct).
pub const ANSWER_ELEMENT_BYTES: usize = 32;

/// The limits a store enforces. Set from provider config (see `config.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest key, and largest bucket name, in bytes.
    pub max_key_bytes: usize,
    /// Largest value in bytes.
    pub max_value_bytes: usize,
    /// Most keys one namespace may hold, over all its buckets.
    pub max_keys: u64,
    /// Most key plus value bytes the whole store may hold.
    pub max_total_bytes: u64,
    /// Most keys one list-keys page answers.
    pub list_page_size: usize,
    /// Most bytes all open listings (sorted copies of keys that later pages are cut from)
    /// may hold together.
    pub max_listing_bytes: u64,
}

impl Limits {
    /// No limit at all (restoring a snapshot; tests).
    pub const UNLIMITED: Limits = Limits {
        max_key_bytes: usize::MAX,
        max_value_bytes: usize::MAX,
        max_keys: u64::MAX,
        max_total_bytes: u64::MAX,
        list_page_size: 1000,
        max_listing_bytes: u64::MAX,
    };
}

/// Why the engine refused an operation. The message is what the caller reads; every limit
/// error names the config key that was hit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// A key or bucket name is longer than `max_key_bytes`.
    #[error("{what} is {len} bytes, over the limit max_key_bytes={limit}")]
    KeyTooLarge {
        /// "key" or "bucket name".
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit in force.
        limit: usize,
    },
    /// A value is longer than `max_value_bytes`.
    #[error("value of {len} bytes is over the limit max_value_bytes={limit}")]
    ValueTooLarge {
        /// Its length.
        len: usize,
        /// The limit in force.
        limit: usize,
    },
    /// The namespace already holds `max_keys` keys.
    #[error("namespace holds {held} keys; adding {adding} more would pass max_keys={limit}")]
    TooManyKeys {
        /// Keys the namespace holds.
        held: u64,
        /// Keys the call would add.
        adding: u64,
        /// The limit in force.
        limit: u64,
    },
    /// The store would hold more than `max_total_bytes`.
    #[error("store holds {held} bytes; adding {adding} more would pass max_total_bytes={limit}")]
    OutOfSpace {
        /// Bytes the store holds.
        held: u64,
        /// Bytes the call would add.
        adding: u64,
        /// The limit in force.
        limit: u64,
    },
    /// `increment` on a value that is not a decimal `u64`.
    #[error("cannot increment key {key:?}: its value is not a decimal u64 counter")]
    NotACounter {
        /// The key.
        key: String,
    },
    /// `increment` would pass `u64::MAX`. The message leaves the counter's value out: it is
    /// stored data, and this message also goes on the call's span.
    #[error("cannot increment key {key:?} by {delta}: the counter would overflow u64")]
    Overflow {
        /// The key.
        key: String,
        /// The increment asked for.
        delta: u64,
    },
    /// A list-keys cursor this store did not hand out for this bucket, or one that expired.
    #[error("unknown or expired list-keys cursor {0}: start the listing again without a cursor")]
    UnknownCursor(u64),
    /// The sorted copy of a bucket's keys that a listing needs does not fit in
    /// `max_listing_bytes`, even after dropping other listings.
    #[error(
        "listing this bucket needs more than max_listing_bytes={limit} bytes for its sorted keys \
         ({held} held by other listings of the same namespace)"
    )]
    ListingTooLarge {
        /// The limit in force.
        limit: u64,
        /// What the caller's namespace's other listings hold.
        held: u64,
    },
}

impl EngineError {
    /// The config key of the limit this error reports, if it reports one.
    pub fn limit(&self) -> Option<&'static str> {
        match self {
            EngineError::KeyTooLarge { .. } => Some("max_key_bytes"),
            EngineError::ValueTooLarge { .. } => Some("max_value_bytes"),
            EngineError::TooManyKeys { .. } => Some("max_keys"),
            EngineError::OutOfSpace { .. } => Some("max_total_bytes"),
            EngineError::ListingTooLarge { .. } => Some("max_listing_bytes"),
            _ => None,
        }
    }

    /// Whether a store-wide usage limit refused the write (the ones a concurrent batch's
    /// worst-case reservation can trip).
    fn is_usage_limit(&self) -> bool {
        matches!(
            self,
            EngineError::TooManyKeys { .. } | EngineError::OutOfSpace { .. }
        )
    }
}

/// An answer refused before it was copied: it would have been larger than the room given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerRefused {
    /// The bytes the whole answer would have held (values, keys and
    /// [`ANSWER_ELEMENT_BYTES`] per element).
    pub asked: u64,
}

/// One page of a key listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPage {
    /// Keys of this page, in lexicographic order.
    pub keys: Vec<String>,
    /// Where the next page starts, `None` after the last page.
    pub cursor: Option<u64>,
}

/// Live figures of the store, for health and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Namespaces that were ever written.
    pub namespaces: usize,
    /// Buckets holding at least one key (an emptied bucket is dropped).
    pub buckets: usize,
    /// Live keys.
    pub keys: u64,
    /// Key plus value bytes of live keys.
    pub bytes: u64,
}

#[derive(Default)]
struct Namespace {
    buckets: DashMap<Box<str>, Entries>,
    keys: AtomicU64,
    bytes: AtomicU64,
}

/// The in-memory store. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct Engine {
    namespaces: DashMap<Box<str>, Namespace>,
    total_bytes: AtomicU64,
    // Read on every write, written on a config update: a plain `RwLock` around a `Copy` value,
    // never held across anything but a copy.
    limits: RwLock<Limits>,
    listings: Listings,
    /// Keys removed so far, anywhere. A listing page re-checks its keys against the bucket
    /// only when this moved since the listing's snapshot: a page of 1,000 keys of a 1M-key
    /// bucket is otherwise 1,000 cache-missing lookups for nothing.
    removals: AtomicU64,
    /// Successful writes and removals so far: a snapshot is only needed when this moved.
    changes: AtomicU64,
    /// Batches that began writing under the shared gate, and those still writing: a
    /// single-key refusal is retried alone in the store only when one may have caused it.
    batches_begun: AtomicU64,
    batches_pending: AtomicU64,
    /// Writes hold it shared; a write refused at a usage limit retries holding it alone (see
    /// the module docs, "Accounting"). A std lock: never held across an await.
    gate: RwLock<()>,
}

impl Engine {
    /// An empty store enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            namespaces: DashMap::new(),
            total_bytes: AtomicU64::new(0),
            limits: RwLock::new(limits),
            listings: Listings::default(),
            removals: AtomicU64::new(0),
            changes: AtomicU64::new(0),
            batches_begun: AtomicU64::new(0),
            batches_pending: AtomicU64::new(0),
            gate: RwLock::new(()),
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
        self.read_bucket(ns, bucket, |entries| {
            let Some(entry) = entries.get(key) else {
                return Ok(None);
            };
            let value = entry.key().value();
            if !room(value.len()) {
                return Err(AnswerRefused {
                    asked: value.len() as u64,
                });
            }
            Ok(Some(Bytes::copy_from_slice(value)))
        })
        .unwrap_or(Ok(None))
    }

    /// `Err` when `bucket` or `key` is longer than `max_key_bytes`. Writes check this
    /// themselves; `get` checks it first so that a component learns of the limit instead of
    /// reading "none" for a key it could never have written.
    pub fn check_key_limits(&self, bucket: &str, key: &str) -> Result<(), EngineError> {
        let limits = self.limits();
        check_key(&limits, "bucket name", bucket)?;
        check_key(&limits, "key", key)
    }

    /// Whether `key` exists.
    pub fn exists(&self, ns: &str, bucket: &str, key: &str) -> bool {
        self.read_bucket(ns, bucket, |entries| entries.contains_key(key))
            .unwrap_or(false)
    }

    /// Stores `value` under `key`.
    pub fn set(&self, ns: &str, bucket: &str, key: &str, value: &[u8]) -> Result<(), EngineError> {
        let limits = self.limits();
        check_key(&limits, "bucket name", bucket)?;
        check_key(&limits, "key", key)?;
        check_value(&limits, value)?;
        self.limited_write(ns, bucket, false, |space, entries, _| {
            // Exact: the old entry cannot change while its shard lock is held.
            match entries.entry(Item::new(key, value)) {
                Entry::Occupied(old) => {
                    let old_len = old.key().value().len();
                    let grow = value.len().saturating_sub(old_len) as u64;
                    let reservation = space.reserve(&limits, 0, grow)?;
                    old.replace_entry(());
                    space.settle(reservation, 0, value.len() as i64 - old_len as i64);
                }
                Entry::Vacant(vacant) => {
                    let size = (key.len() + value.len()) as u64;
                    let reservation = space.reserve(&limits, 1, size)?;
                    vacant.insert(());
                    space.settle(reservation, 1, size as i64);
                }
            }
            Ok(())
        })
    }

    /// Stores every pair, or none of them: every limit is checked before anything is written.
    /// A key named twice ends with its last value.
    pub fn set_many<'a, I>(&self, ns: &str, bucket: &str, pairs: I) -> Result<(), EngineError>
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
        if latest.len() == 1 {
            let (key, value) = latest.into_iter().next().unwrap_or_default();
            return self.set(ns, bucket, key, value);
        }
        if latest.is_empty() {
            return Ok(());
        }
        self.limited_write(ns, bucket, true, |space, entries, exclusive| {
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
            let (mut added, mut delta) = (0u64, 0i64);
            for (key, value) in &latest {
                let (was_new, change) = put(entries, key, value);
                added += u64::from(was_new);
                delta += change;
            }
            space.settle(reservation, added, delta);
            Ok(())
        })
    }

    /// Removes `key`; a missing key is not an error.
    pub fn delete(&self, ns: &str, bucket: &str, key: &str) {
        self.delete_many(ns, bucket, [key]);
    }

    /// Removes every key named; missing keys are ignored.
    pub fn delete_many<'a>(&self, ns: &str, bucket: &str, keys: impl IntoIterator<Item = &'a str>) {
        let _shared = self
            .gate
            .read()
            .unwrap_or_else(|poison| poison.into_inner());
        let Some(ns_ref) = self.namespaces.get(ns) else {
            return;
        };
        let emptied = {
            let Some(entries) = ns_ref.buckets.get(bucket) else {
                return;
            };
            let space = Space::new(&self.total_bytes, &ns_ref);
            let mut removed = 0u64;
            for key in keys {
                // The counters go down under the entry's shard lock, as the entry goes: a
                // writer of the same key cannot see it gone while it is still counted (and be
                // refused at a limit the delete already made room under).
                let released = entries.remove_if(key, |item, ()| {
                    space.release(1, item.size());
                    true
                });
                removed += u64::from(released.is_some());
            }
            if removed > 0 {
                self.removals.fetch_add(removed, Ordering::SeqCst);
                self.changes.fetch_add(1, Ordering::Relaxed);
            }
            entries.is_empty()
        };
        if emptied {
            drop_empty(&ns_ref.buckets, bucket);
        }
    }

    /// Adds `delta` to the decimal counter under `key` and answers the new value; a missing
    /// key is created holding `delta`. Atomic: the read, the check and the write happen under
    /// the key's shard lock.
    pub fn increment(
        &self,
        ns: &str,
        bucket: &str,
        key: &str,
        delta: u64,
    ) -> Result<u64, EngineError> {
        let limits = self.limits();
        check_key(&limits, "bucket name", bucket)?;
        check_key(&limits, "key", key)?;
        self.limited_write(ns, bucket, false, |space, entries, _| loop {
            // Read, compute, then write only if the value is still the one read: a
            // compare-and-swap under the key's shard lock (an item is replaced whole, so the
            // read cannot keep the lock across the new allocation).
            let seen: Option<Box<[u8]>> = entries.get(key).map(|e| e.key().value().into());
            let next = match &seen {
                None => delta,
                Some(value) => {
                    let current = parse_counter(value).ok_or_else(|| EngineError::NotACounter {
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
                (Entry::Occupied(found), Some(old)) if found.key().value() == &old[..] => {
                    let grow = (text.len() as u64).saturating_sub(old.len() as u64);
                    let reservation = space.reserve(&limits, 0, grow)?;
                    found.replace_entry(());
                    space.settle(reservation, 0, text.len() as i64 - old.len() as i64);
                    return Ok(next);
                }
                (Entry::Vacant(vacant), None) => {
                    let size = (key.len() + text.len()) as u64;
                    let reservation = space.reserve(&limits, 1, size)?;
                    vacant.insert(());
                    space.settle(reservation, 1, size as i64);
                    return Ok(delta);
                }
                // Another writer got there between the read and the write: read again.
                _ => continue,
            }
        })
    }

    /// Runs a write under the gate: shared, then, if a usage limit refused it, once more
    /// alone in the store (`exclusive` tells `write` which). Drops the bucket if the write
    /// created it and then failed.
    ///
    /// A single-key write reserves exactly, so its refusal is only retried when a batch's
    /// worst-case reservation may have caused it: a batch was under way when it began, or
    /// began while it ran. A tenant refused at its own `max_keys` therefore does not take the
    /// store-wide lock from every other tenant on each refused write.
    fn limited_write<R>(
        &self,
        ns: &str,
        bucket: &str,
        batch: bool,
        write: impl Fn(&Space<'_>, &Entries, bool) -> Result<R, EngineError>,
    ) -> Result<R, EngineError> {
        let batches_before = self.batches_begun.load(Ordering::SeqCst);
        let pending_before = self.batches_pending.load(Ordering::SeqCst);
        let shared = {
            let _shared = self
                .gate
                .read()
                .unwrap_or_else(|poison| poison.into_inner());
            if batch {
                self.batches_begun.fetch_add(1, Ordering::SeqCst);
                self.batches_pending.fetch_add(1, Ordering::SeqCst);
            }
            let written =
                self.write_bucket(ns, bucket, |space, entries| write(space, entries, false));
            if batch {
                self.batches_pending.fetch_sub(1, Ordering::SeqCst);
            }
            written
        };
        let batch_may_have_refused = || {
            batch
                || pending_before > 0
                || self.batches_pending.load(Ordering::SeqCst) > 0
                || self.batches_begun.load(Ordering::SeqCst) != batches_before
        };
        let result = match shared {
            Err(err) if err.is_usage_limit() && batch_may_have_refused() => {
                let _alone = self
                    .gate
                    .write()
                    .unwrap_or_else(|poison| poison.into_inner());
                self.write_bucket(ns, bucket, |space, entries| write(space, entries, true))
            }
            done => done,
        };
        match result {
            Ok(_) => {
                self.changes.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => self.drop_bucket_if_empty(ns, bucket),
        }
        result
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
        let found = self.read_bucket(ns, bucket, |entries| {
            let mut buffer = bytes::BytesMut::new();
            let mut answer = Vec::with_capacity(asked);
            let mut refused: Option<u64> = None;
            for (i, key) in keys.into_iter().enumerate() {
                let Some(entry) = entries.get(key.as_str()) else {
                    if refused.is_none() {
                        answer.push(None);
                    }
                    continue;
                };
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
        cursor: Option<u64>,
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
    /// (idle for [`CURSOR_IDLE_TTL`], or to make room: see [`Listings::reserve`]).
    pub fn list_keys_within(
        &self,
        ns: &str,
        bucket: &str,
        cursor: Option<u64>,
        max_bytes: usize,
    ) -> Result<KeyPage, EngineError> {
        let page_size = self.limits().list_page_size.max(1);
        let Some(cursor) = cursor else {
            // Read before the copy: a removal racing with it makes pages re-check.
            let removals = self.removals.load(Ordering::SeqCst);
            let limit = self.limits().max_listing_bytes;
            let mut held = self.listings.reserve(ns, LISTING_OVERHEAD, limit)?;
            let copied = self.read_bucket(ns, bucket, |entries| {
                UnsortedKeys::copy(entries, |n| held.grow(n))
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
                cursor: Some(cursor | end as u64),
            });
        };
        let (mut keys, next, removals) = self.listings.page(ns, bucket, cursor, max_bytes)?;
        // Leave out what was deleted since the copy.
        if self.removals.load(Ordering::SeqCst) != removals {
            self.read_bucket(ns, bucket, |entries| {
                keys.retain(|k| entries.contains_key(k.as_str()));
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
        }
        usage
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
        self.read_bucket(ns, bucket, |entries| {
            entries.iter().map(|e| Box::from(e.key().key())).collect()
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

    fn read_bucket<R>(&self, ns: &str, bucket: &str, f: impl FnOnce(&Entries) -> R) -> Option<R> {
        let ns_ref = self.namespaces.get(ns)?;
        let entries = ns_ref.buckets.get(bucket)?;
        Some(f(&entries))
    }

    fn write_bucket<R>(
        &self,
        ns: &str,
        bucket: &str,
        f: impl FnOnce(&Space<'_>, &Entries) -> R,
    ) -> R {
        let ns_ref = match self.namespaces.get(ns) {
            Some(found) => found,
            None => self.namespaces.entry(ns.into()).or_default().downgrade(),
        };
        let entries = match ns_ref.buckets.get(bucket) {
            Some(found) => found,
            None => ns_ref.buckets.entry(bucket.into()).or_default().downgrade(),
        };
        f(&Space::new(&self.total_bytes, &ns_ref), &entries)
    }

    fn drop_bucket_if_empty(&self, ns: &str, bucket: &str) {
        if let Some(ns_ref) = self.namespaces.get(ns) {
            drop_empty(&ns_ref.buckets, bucket);
        }
    }
}

/// Drops a bucket that holds no keys. Takes the bucket map's write lock, so it cannot run while
/// a writer holds the bucket (writers hold a read guard on it while they write).
fn drop_empty(buckets: &DashMap<Box<str>, Entries>, bucket: &str) {
    buckets.remove_if(bucket, |_, entries| entries.is_empty());
}

fn check_value(limits: &Limits, value: &[u8]) -> Result<(), EngineError> {
    if value.len() > limits.max_value_bytes {
        return Err(EngineError::ValueTooLarge {
            len: value.len(),
            limit: limits.max_value_bytes,
        });
    }
    Ok(())
}

fn check_key(limits: &Limits, what: &'static str, key: &str) -> Result<(), EngineError> {
    if key.len() > limits.max_key_bytes {
        return Err(EngineError::KeyTooLarge {
            what,
            len: key.len(),
            limit: limits.max_key_bytes,
        });
    }
    Ok(())
}

/// Writes one entry; answers whether the key is new and by how many bytes the store changed.
fn put(entries: &Entries, key: &str, value: &[u8]) -> (bool, i64) {
    match entries.entry(Item::new(key, value)) {
        Entry::Occupied(old) => {
            let change = value.len() as i64 - old.key().value().len() as i64;
            old.replace_entry(());
            (false, change)
        }
        Entry::Vacant(vacant) => {
            vacant.insert(());
            (true, (key.len() + value.len()) as i64)
        }
    }
}

/// A decimal `u64` with no sign, no spaces and no leading `+`; leading zeros are accepted.
fn parse_counter(value: &[u8]) -> Option<u64> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// The counters one write touches: the store's bytes and its namespace's keys and bytes.
struct Space<'a> {
    total: &'a AtomicU64,
    keys: &'a AtomicU64,
    bytes: &'a AtomicU64,
}

/// What a write reserved before writing.
#[must_use]
struct Reservation {
    keys: u64,
    bytes: u64,
}

impl<'a> Space<'a> {
    fn new(total: &'a AtomicU64, ns: &'a Namespace) -> Self {
        Self {
            total,
            keys: &ns.keys,
            bytes: &ns.bytes,
        }
    }

    /// Reserves room for `keys` more keys and `bytes` more bytes, or refuses with the limit hit.
    fn reserve(&self, limits: &Limits, keys: u64, bytes: u64) -> Result<Reservation, EngineError> {
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
    fn settle(&self, reservation: Reservation, keys: u64, bytes: i64) {
        adjust(self.keys, keys as i64 - reservation.keys as i64);
        let byte_change = bytes - reservation.bytes as i64;
        adjust(self.total, byte_change);
        adjust(self.bytes, byte_change);
    }

    fn release(&self, keys: u64, bytes: u64) {
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

/// Bytes a listing is charged per key beyond twice the key's bytes (the unsorted and the
/// sorted copy): the sort entry and the key's end offset.
const LISTING_BYTES_PER_KEY: usize = std::mem::size_of::<Unsorted>() + std::mem::size_of::<usize>();

/// Room taken from `max_listing_bytes` at a time while a listing is copied.
const LISTING_GROW_BLOCK: u64 = 256 * 1024;

/// A key of [`UnsortedKeys`]: its first 16 bytes (zero-padded, big-endian, so comparing them
/// orders keys as comparing the bytes does, up to ties) and where it is in `bytes`.
struct Unsorted {
    prefix: u128,
    start: usize,
    end: usize,
}

/// A bucket's keys as copied out of it, before sorting.
#[derive(Default)]
struct UnsortedKeys {
    bytes: Vec<u8>,
    keys: Vec<Unsorted>,
}

impl UnsortedKeys {
    /// Copies the keys of `entries`, one shard's read lock at a time (DashMap's iterator),
    /// asking `grow` for room before the copy passes what it was granted.
    fn copy(
        entries: &Entries,
        mut grow: impl FnMut(u64) -> Result<(), EngineError>,
    ) -> Result<UnsortedKeys, EngineError> {
        let mut out = UnsortedKeys::default();
        // The least the copy can take, asked first: a bucket that can never fit is refused
        // before its copy makes anyone else's listings give way.
        let least = entries.len() as u64 * (LISTING_BYTES_PER_KEY as u64 + 2);
        grow(least)?;
        let (mut granted, mut used) = (least, 0u64);
        for item in entries.iter() {
            let key = item.key().key().as_bytes();
            let cost = (2 * key.len() + LISTING_BYTES_PER_KEY) as u64;
            if used + cost > granted {
                let block = cost.max(LISTING_GROW_BLOCK);
                grow(block)?;
                granted += block;
            }
            used += cost;
            let mut prefix = [0u8; 16];
            let n = key.len().min(16);
            prefix[..n].copy_from_slice(&key[..n]);
            let start = out.bytes.len();
            out.bytes.extend_from_slice(key);
            out.keys.push(Unsorted {
                prefix: u128::from_be_bytes(prefix),
                start,
                end: out.bytes.len(),
            });
        }
        Ok(out)
    }

    /// Sorts the keys into a [`SortedKeys`]. Takes no lock: run it after the copy.
    fn sort(mut self) -> SortedKeys {
        let bytes = &self.bytes;
        // Equal prefixes need the full comparison: "a" and "a\0" pad to the same prefix.
        self.keys.sort_unstable_by(|a, b| {
            a.prefix
                .cmp(&b.prefix)
                .then_with(|| bytes[a.start..a.end].cmp(&bytes[b.start..b.end]))
        });
        let mut sorted = SortedKeys {
            bytes: Vec::with_capacity(bytes.len()),
            ends: Vec::with_capacity(self.keys.len()),
        };
        for key in &self.keys {
            sorted.bytes.extend_from_slice(&bytes[key.start..key.end]);
            sorted.ends.push(sorted.bytes.len());
        }
        sorted
    }
}

/// A bucket's keys in lexicographic order, in two allocations: the key bytes back to back
/// and where each key ends. A listing of 1M keys holds no per-key allocations, and sorting
/// reads the keys' first 16 bytes from one contiguous array instead of chasing a pointer per
/// comparison.
#[derive(Default)]
struct SortedKeys {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl SortedKeys {
    fn len(&self) -> usize {
        self.ends.len()
    }

    fn key(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        // SAFETY: the bytes between two ends are one key copied from a `str`.
        unsafe { std::str::from_utf8_unchecked(&self.bytes[start..self.ends[i]]) }
    }

    fn strings(&self, range: std::ops::Range<usize>) -> Vec<String> {
        range.map(|i| self.key(i).to_owned()).collect()
    }

    /// What it holds in memory.
    fn footprint(&self) -> u64 {
        (self.bytes.capacity() + self.ends.capacity() * std::mem::size_of::<usize>()) as u64
    }
}

/// Where the page that starts at `start` ends: at most `page_size` keys and `max_bytes` of
/// answer, but at least one key.
fn page_end(keys: &SortedKeys, start: usize, page_size: usize, max_bytes: usize) -> usize {
    let (mut end, mut bytes) = (start, 0usize);
    while end < keys.len() && end - start < page_size {
        let cost = keys.key(end).len() + ANSWER_ELEMENT_BYTES;
        if end > start && bytes.saturating_add(cost) > max_bytes {
            break;
        }
        bytes = bytes.saturating_add(cost);
        end += 1;
    }
    end
}

/// A sorted copy of a bucket's keys that later pages are cut from.
struct Listing {
    namespace: Box<str>,
    bucket: Box<str>,
    keys: SortedKeys,
    page_size: usize,
    /// `Engine::removals` when the copy was taken.
    removals: u64,
    last_used: Instant,
}

/// Open listings by id, and the bytes counted against `max_listing_bytes`.
#[derive(Default)]
struct ListingTable {
    open: HashMap<u32, (Listing, u64)>,
    /// Bytes of open listings and of listings being copied.
    held: u64,
    /// Bytes of listings being copied, by namespace.
    building: HashMap<Box<str>, u64>,
}

impl ListingTable {
    fn remove(&mut self, id: u32) {
        if let Some((_, bytes)) = self.open.remove(&id) {
            self.held -= bytes;
        }
    }

    /// The least recently used listing of `ns`.
    fn oldest_of(&self, ns: &str) -> Option<u32> {
        (self.open.iter())
            .filter(|(_, (l, _))| &*l.namespace == ns)
            .min_by_key(|(_, (l, _))| l.last_used)
            .map(|(id, _)| *id)
    }

    /// Makes room for `need` more bytes for a listing of namespace `ns` being copied, or
    /// refuses without dropping anything. Listings are dropped least recently used first,
    /// from the namespace whose open listings hold the most, but another namespace's only
    /// while it holds more than `ns` does (open and being copied): one tenant cannot push out
    /// the listings of a tenant that holds less than it does.
    fn make_room(&mut self, ns: &str, need: u64, limit: u64) -> Result<(), EngineError> {
        let building = self.building.get(ns).copied().unwrap_or(0);
        if self.held.saturating_add(need) > limit {
            // Plan first: drop nothing unless dropping makes enough room.
            let mut by_namespace: HashMap<&str, Vec<(Instant, u32, u64)>> = HashMap::new();
            for (id, (listing, bytes)) in &self.open {
                (by_namespace.entry(&*listing.namespace).or_default()).push((
                    listing.last_used,
                    *id,
                    *bytes,
                ));
            }
            let mut totals: HashMap<&str, u64> = (by_namespace.iter())
                .map(|(name, listings)| (*name, listings.iter().map(|l| l.2).sum()))
                .collect();
            for listings in by_namespace.values_mut() {
                // Newest first, so that `pop` takes the oldest.
                listings.sort_by_key(|l| std::cmp::Reverse(l.0));
            }
            let (mut held, mut victims) = (self.held, Vec::new());
            while held.saturating_add(need) > limit {
                let mine = totals.get(ns).copied().unwrap_or(0) + building;
                let other = (totals.iter())
                    .filter(|(name, bytes)| **name != ns && **bytes > mine)
                    .max_by_key(|(_, bytes)| **bytes)
                    .map(|(name, _)| *name);
                let from = other.unwrap_or(ns);
                let Some((_, id, bytes)) = by_namespace.get_mut(from).and_then(Vec::pop) else {
                    return Err(EngineError::ListingTooLarge { limit, held: mine });
                };
                victims.push(id);
                held -= bytes;
                if let Some(total) = totals.get_mut(from) {
                    *total -= bytes;
                }
            }
            for id in victims {
                self.remove(id);
            }
        }
        self.held += need;
        *self.building.entry(ns.into()).or_default() += need;
        Ok(())
    }

    /// Gives back `bytes` of a listing of `ns` being copied.
    fn release_building(&mut self, ns: &str, bytes: u64) {
        self.held -= bytes;
        if let Some(building) = self.building.get_mut(ns) {
            *building -= bytes;
            if *building == 0 {
                self.building.remove(ns);
            }
        }
    }
}

/// Bytes taken from `max_listing_bytes` for a listing being copied; given back on drop
/// unless [`Listings::open`] takes them over.
struct Held<'a> {
    listings: &'a Listings,
    namespace: &'a str,
    bytes: u64,
    limit: u64,
}

impl Held<'_> {
    fn grow(&mut self, n: u64) -> Result<(), EngineError> {
        let mut table = self.listings.lock();
        table.make_room(self.namespace, n, self.limit)?;
        self.bytes += n;
        Ok(())
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        (self.listings.lock()).release_building(self.namespace, self.bytes);
    }
}

/// Unfinished listings by id. A cursor is `id << 32 | offset of the page's first key`, so a
/// retried call with the same cursor answers the same page.
struct Listings {
    table: Mutex<ListingTable>,
    next_id: AtomicU64,
}

impl Default for Listings {
    fn default() -> Self {
        // Start ids at an arbitrary point so a cursor from before a restart is not mistaken
        // for one of ours.
        let seed = std::collections::hash_map::RandomState::new();
        let start = std::hash::BuildHasher::hash_one(&seed, Instant::now());
        Self {
            table: Mutex::new(ListingTable::default()),
            next_id: AtomicU64::new(start),
        }
    }
}

impl Listings {
    fn lock(&self) -> std::sync::MutexGuard<'_, ListingTable> {
        self.table
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Takes `n` bytes of `max_listing_bytes` (`limit`) for a listing of `ns` about to be
    /// copied, dropping idle listings, then listings as [`ListingTable::make_room`] says.
    fn reserve<'a>(&'a self, ns: &'a str, n: u64, limit: u64) -> Result<Held<'a>, EngineError> {
        let mut table = self.lock();
        let now = Instant::now();
        let idle: Vec<u32> = (table.open.iter())
            .filter(|(_, (l, _))| now.duration_since(l.last_used) >= CURSOR_IDLE_TTL)
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            table.remove(id);
        }
        table.make_room(ns, n, limit)?;
        Ok(Held {
            listings: self,
            namespace: ns,
            bytes: n,
            limit,
        })
    }

    /// Stores a listing whose first page was served, keeping of `held` what it occupies;
    /// answers its cursor with offset 0.
    fn open(&self, listing: Listing, mut held: Held<'_>) -> u64 {
        let footprint = (listing.keys.footprint() + LISTING_OVERHEAD).min(held.bytes);
        let mut table = self.lock();
        // From being copied to open: `footprint` stays counted, the rest goes back.
        table.release_building(&listing.namespace, held.bytes);
        table.held += footprint;
        held.bytes = 0;
        let oldest = table.oldest_of(&listing.namespace);
        let count = (table.open.values())
            .filter(|(l, _)| l.namespace == listing.namespace)
            .count();
        if count >= MAX_LISTINGS_PER_NAMESPACE {
            if let Some(id) = oldest {
                table.remove(id);
            }
        }
        let id = loop {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed) as u32;
            if !table.open.contains_key(&id) {
                break id;
            }
        };
        table.open.insert(id, (listing, footprint));
        drop(table);
        drop(held);
        u64::from(id) << 32
    }

    /// The keys of the page `cursor` points at, the cursor of the page after it, and the
    /// listing's removal count.
    fn page(
        &self,
        ns: &str,
        bucket: &str,
        cursor: u64,
        max_bytes: usize,
    ) -> Result<(Vec<String>, Option<u64>, u64), EngineError> {
        let id = (cursor >> 32) as u32;
        let start = (cursor & 0xffff_ffff) as usize;
        let mut table = self.lock();
        let (listing, _) = (table.open.get_mut(&id))
            .filter(|(l, _)| &*l.namespace == ns && &*l.bucket == bucket)
            .filter(|(l, _)| Instant::now().duration_since(l.last_used) < CURSOR_IDLE_TTL)
            .ok_or(EngineError::UnknownCursor(cursor))?;
        if start == 0 || start >= listing.keys.len() {
            return Err(EngineError::UnknownCursor(cursor));
        }
        let end = page_end(&listing.keys, start, listing.page_size, max_bytes);
        let keys = listing.keys.strings(start..end);
        listing.last_used = Instant::now();
        let next = (end < listing.keys.len()).then(|| (u64::from(id) << 32) | end as u64);
        Ok((keys, next, listing.removals))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    fn limits() -> Limits {
        Limits {
            max_key_bytes: 64,
            max_value_bytes: 1024,
            max_keys: 100,
            max_total_bytes: 10_000,
            list_page_size: 10,
            max_listing_bytes: 1 << 20,
        }
    }

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

    fn strings(keys: &[&str]) -> Vec<String> {
        keys.iter().map(|k| k.to_string()).collect()
    }

    fn list_all(e: &Engine, ns: &str, bucket: &str) -> Vec<String> {
        let mut all = Vec::new();
        let mut cursor = None;
        loop {
            let page = e.list_keys(ns, bucket, cursor).unwrap();
            assert!(page.keys.len() <= e.limits().list_page_size);
            all.extend(page.keys);
            match page.cursor {
                Some(c) => cursor = Some(c),
                None => return all,
            }
        }
    }

    #[test]
    fn listing_pages_through_every_key_once() {
        let e = Engine::new(limits());
        let mut want: Vec<String> = (0..95).map(|i| format!("key-{i:03}")).collect();
        for k in &want {
            e.set("n", "b", k, b"").unwrap();
        }
        want.sort();
        assert_eq!(list_all(&e, "n", "b"), want);
        // Exactly one page: no cursor.
        e.set("n", "small", "k", b"").unwrap();
        assert_eq!(e.list_keys("n", "small", None).unwrap().cursor, None);
    }

    #[test]
    fn listing_orders_keys_by_their_bytes_beyond_the_sort_prefix() {
        // The sort compares 16-byte prefixes first: keys that tie there (long shared
        // prefixes, a trailing NUL that pads like the end of a key, multi-byte characters
        // across the 16th byte) must still come out in byte order.
        let e = Engine::new(Limits {
            list_page_size: 4,
            ..limits()
        });
        let long = "0123456789abcdef";
        let mut want: Vec<String> = vec![
            "a".into(),
            "a\0".into(),
            "a\0\0".into(),
            "".into(),
            "\u{1}".into(),
            long.into(),
            format!("{long}\0"),
            format!("{long}z"),
            format!("{long}a"),
            format!("{long}aa"),
            "0123456789abcdeé".into(),
            "0123456789abcde\u{7f}".into(),
            "ÿ".into(),
            "\u{10ffff}".into(),
            "b".into(),
        ];
        for k in &want {
            e.set("n", "b", k, b"").unwrap();
        }
        want.sort();
        assert_eq!(list_all(&e, "n", "b"), want);
    }

    #[test]
    fn cursors_are_scoped_retriable_and_expire_at_the_end() {
        let e = Engine::new(limits());
        for i in 0..25 {
            e.set("n", "b", &format!("{i:02}"), b"").unwrap();
        }
        let first = e.list_keys("n", "b", None).unwrap();
        let cursor = first.cursor.unwrap();
        // Another namespace or bucket cannot use it.
        assert_eq!(
            e.list_keys("m", "b", Some(cursor)),
            Err(EngineError::UnknownCursor(cursor))
        );
        assert_eq!(
            e.list_keys("n", "c", Some(cursor)),
            Err(EngineError::UnknownCursor(cursor))
        );
        let second = e.list_keys("n", "b", Some(cursor)).unwrap();
        assert_eq!(
            e.list_keys("n", "b", Some(cursor)).unwrap(),
            second,
            "retry answers the same page"
        );
        let last = e.list_keys("n", "b", second.cursor).unwrap();
        assert_eq!(last.keys.len(), 5);
        assert_eq!(last.cursor, None);
        assert_eq!(
            e.list_keys("n", "b", second.cursor).unwrap(),
            last,
            "the last page's cursor can be retried too"
        );
        let id = cursor & !0xffff_ffff;
        for offset in [0, 25, 26, u32::MAX as u64] {
            let err = e.list_keys("n", "b", Some(id | offset)).unwrap_err();
            assert!(err.to_string().contains("unknown or expired"), "{err}");
        }
        assert!(e.list_keys("n", "b", Some(12345)).is_err());
    }

    #[test]
    fn pages_are_cut_to_the_answer_bound_and_go_on_from_there() {
        let e = Engine::new(limits());
        for i in 0..30 {
            e.set("n", "b", &format!("{i:02}{}", "x".repeat(30)), b"")
                .unwrap();
        }
        // Each key costs 32 bytes plus ANSWER_ELEMENT_BYTES: three fit in 200 bytes.
        let max = 3 * (32 + ANSWER_ELEMENT_BYTES) + 10;
        let (mut all, mut cursor, mut pages) = (Vec::new(), None, 0);
        loop {
            let page = e.list_keys_within("n", "b", cursor, max).unwrap();
            assert!(page.keys.len() <= 3, "{}", page.keys.len());
            all.extend(page.keys);
            pages += 1;
            cursor = page.cursor;
            if cursor.is_none() {
                break;
            }
        }
        assert_eq!(pages, 10);
        let mut want = all.clone();
        want.sort();
        want.dedup();
        assert_eq!(all, want);
        assert_eq!(all.len(), 30);
        // A bound below one key still makes progress: one key a page.
        assert_eq!(e.list_keys_within("n", "b", None, 1).unwrap().keys.len(), 1);
    }

    #[test]
    fn get_many_refuses_before_copying_and_says_how_much_was_asked() {
        let e = Engine::new(limits());
        e.set("n", "b", "k", &[7; 1000]).unwrap();
        let keys = vec!["k".to_string(); 100];
        let mut granted = 0;
        let refused = e
            .get_many_within("n", "b", keys.clone(), |n| {
                if granted + n > 5_000 {
                    return false;
                }
                granted += n;
                true
            })
            .unwrap_err();
        let each = (1000 + 1 + ANSWER_ELEMENT_BYTES) as u64;
        assert_eq!(refused.asked, 100 * each);
        assert!(granted <= 5_000);
        let all = e.get_many_within("n", "b", keys, |_| true).unwrap();
        assert_eq!(all.len(), 100);
        assert!(e.get_within("n", "b", "k", |n| n < 1000).is_err());
        assert_eq!(e.get_within("n", "b", "missing", |_| false), Ok(None));
    }

    #[test]
    fn keys_deleted_during_a_listing_are_left_out() {
        let e = Engine::new(limits());
        for i in 0..30 {
            e.set("n", "b", &format!("{i:02}"), b"").unwrap();
        }
        let first = e.list_keys("n", "b", None).unwrap();
        e.delete("n", "b", "15");
        let second = e.list_keys("n", "b", first.cursor).unwrap();
        assert_eq!(second.keys.len(), 9);
        assert!(!second.keys.contains(&"15".to_string()));
    }

    #[test]
    fn a_namespace_opening_listings_never_evicts_another_namespaces() {
        let e = Engine::new(limits());
        for ns in ["a", "b"] {
            for i in 0..20 {
                e.set(ns, "b", &format!("{i:02}"), b"").unwrap();
            }
        }
        let theirs = e.list_keys("b", "b", None).unwrap().cursor.unwrap();
        let first = e.list_keys("a", "b", None).unwrap().cursor.unwrap();
        for _ in 0..MAX_LISTINGS_PER_NAMESPACE {
            e.list_keys("a", "b", None).unwrap();
        }
        assert_eq!(e.listings.lock().open.len(), MAX_LISTINGS_PER_NAMESPACE + 1);
        assert!(
            e.list_keys("a", "b", Some(first)).is_err(),
            "a's oldest was evicted"
        );
        assert_eq!(e.list_keys("b", "b", Some(theirs)).unwrap().keys.len(), 10);
    }

    #[test]
    fn listings_are_bounded_in_bytes_and_the_largest_holder_gives_way() {
        // Each listing of 100 keys of 8 bytes takes one 256 KiB block while it is copied and
        // keeps ~1.8 KiB once open.
        let e = Engine::new(Limits {
            max_listing_bytes: LISTING_GROW_BLOCK + 20_000,
            max_keys: 100_000,
            max_total_bytes: u64::MAX,
            ..limits()
        });
        for ns in ["big", "small"] {
            for i in 0..100 {
                e.set(ns, "b", &format!("key{i:05}"), b"").unwrap();
            }
        }
        let open = |ns| e.list_keys(ns, "b", None).unwrap().cursor.unwrap();
        let big: Vec<u64> = (0..8).map(|_| open("big")).collect();
        let held = e.listings.lock().held;
        assert!(held <= LISTING_GROW_BLOCK + 20_000, "{held}");
        // Copying the next one needs a block: "big" holds the most, so its oldest make room,
        // and "small" can still list.
        let small = open("small");
        assert!(e.list_keys("big", "b", Some(big[0])).is_err());
        assert!(e.list_keys("big", "b", Some(big[7])).is_ok());
        // "big" opening more evicts its own, never "small"'s smaller holding.
        for _ in 0..20 {
            open("big");
        }
        assert!(e.list_keys("small", "b", Some(small)).is_ok());
        // A bucket whose keys can never fit is refused with the key to raise, and its attempt
        // drops nobody's listing.
        for i in 0..20_000 {
            e.set("huge", "b", &format!("key{i:05}"), b"").unwrap();
        }
        let open_before = e.listings.lock().open.len();
        let err = e.list_keys("huge", "b", None).unwrap_err();
        assert_eq!(err.limit(), Some("max_listing_bytes"), "{err}");
        assert_eq!(e.listings.lock().open.len(), open_before);
        assert!(e.list_keys("small", "b", Some(small)).is_ok());
        // Nothing leaks: every byte held belongs to an open listing.
        let table = e.listings.lock();
        let open_bytes: u64 = table.open.values().map(|(_, bytes)| bytes).sum();
        assert_eq!(table.held, open_bytes);
        assert!(table.building.is_empty());
    }

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

    fn recount(e: &Engine, ns: &str) -> (u64, u64) {
        let mut keys = 0;
        let mut bytes = 0;
        for bucket in e.bucket_names(ns) {
            for key in e.bucket_keys(ns, &bucket) {
                if let Some(v) = e.get(ns, &bucket, &key) {
                    keys += 1;
                    bytes += (key.len() + v.len()) as u64;
                }
            }
        }
        (keys, bytes)
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
