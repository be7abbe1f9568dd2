//! Paged key listings: a sorted copy of a bucket's keys taken by the first page, later pages
//! cut from it by a [`Cursor`], every copy counted against `max_listing_bytes`. The engine's
//! `list_keys` (in `engine.rs`) takes and serves them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::answer::ANSWER_ELEMENT_BYTES;
use crate::cursor::Cursor;
use crate::error::EngineError;
use crate::item::Entries;

/// How long a list-keys cursor lives after its last use.
pub const CURSOR_IDLE_TTL: Duration = Duration::from_secs(300);

/// How many unfinished listings one namespace keeps at once; opening another drops that
/// namespace's least recently used one (never another namespace's).
pub const MAX_LISTINGS_PER_NAMESPACE: usize = 64;

/// What an open listing costs besides its keys, counted against `max_listing_bytes`.
pub(crate) const LISTING_OVERHEAD: u64 = 1024;

/// One page of a key listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPage {
    /// Keys of this page, in lexicographic order.
    pub keys: Vec<String>,
    /// Where the next page starts, `None` after the last page.
    pub cursor: Option<Cursor>,
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
pub(crate) struct UnsortedKeys {
    bytes: Vec<u8>,
    keys: Vec<Unsorted>,
}

impl UnsortedKeys {
    /// Copies the keys of `entries`, one shard's read lock at a time (DashMap's iterator),
    /// asking `grow` for room before the copy passes what it was granted.
    pub(crate) fn copy(
        entries: &Entries,
        now: u32,
        mut grow: impl FnMut(u64) -> Result<(), EngineError>,
    ) -> Result<UnsortedKeys, EngineError> {
        let mut out = UnsortedKeys::default();
        // The least the copy can take, asked first: a bucket that can never fit is refused
        // before its copy makes anyone else's listings give way.
        let least = entries.len() as u64 * (LISTING_BYTES_PER_KEY as u64 + 2);
        grow(least)?;
        let (mut granted, mut used) = (least, 0u64);
        for item in entries.iter() {
            if item.value().expired(now) {
                continue;
            }
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
    pub(crate) fn sort(mut self) -> SortedKeys {
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
pub(crate) struct SortedKeys {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl SortedKeys {
    pub(crate) fn len(&self) -> usize {
        self.ends.len()
    }

    fn key(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        // SAFETY: the bytes between two ends are one key copied from a `str`.
        unsafe { std::str::from_utf8_unchecked(&self.bytes[start..self.ends[i]]) }
    }

    pub(crate) fn strings(&self, range: std::ops::Range<usize>) -> Vec<String> {
        range.map(|i| self.key(i).to_owned()).collect()
    }

    /// What it holds in memory.
    fn footprint(&self) -> u64 {
        (self.bytes.capacity() + self.ends.capacity() * std::mem::size_of::<usize>()) as u64
    }
}

/// Where the page that starts at `start` ends: at most `page_size` keys and `max_bytes` of
/// answer, but at least one key.
pub(crate) fn page_end(
    keys: &SortedKeys,
    start: usize,
    page_size: usize,
    max_bytes: usize,
) -> usize {
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
pub(crate) struct Listing {
    pub(crate) namespace: Box<str>,
    pub(crate) bucket: Box<str>,
    pub(crate) keys: SortedKeys,
    pub(crate) page_size: usize,
    /// `Engine::removals` when the copy was taken.
    pub(crate) removals: u64,
    pub(crate) last_used: Instant,
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
pub(crate) struct Held<'a> {
    listings: &'a Listings,
    namespace: &'a str,
    bytes: u64,
    limit: u64,
}

impl Held<'_> {
    pub(crate) fn grow(&mut self, n: u64) -> Result<(), EngineError> {
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

/// Unfinished listings by id. A [`Cursor`] names a listing and the offset of a page in it, so
/// a retried call with the same cursor answers the same page.
pub(crate) struct Listings {
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
    pub(crate) fn reserve<'a>(
        &'a self,
        ns: &'a str,
        n: u64,
        limit: u64,
    ) -> Result<Held<'a>, EngineError> {
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
    pub(crate) fn open(&self, listing: Listing, mut held: Held<'_>) -> Cursor {
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
        Cursor::new(id, 0)
    }

    /// The keys of the page `cursor` points at, the cursor of the page after it, and the
    /// listing's removal count.
    pub(crate) fn page(
        &self,
        ns: &str,
        bucket: &str,
        cursor: Cursor,
        max_bytes: usize,
    ) -> Result<(Vec<String>, Option<Cursor>, u64), EngineError> {
        let (id, start) = (cursor.listing(), cursor.offset());
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
        let next = (end < listing.keys.len()).then(|| Cursor::new(id, end));
        Ok((keys, next, listing.removals))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Limits;
    use crate::testing::{limits, list_all};
    use crate::Engine;

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
        for offset in [0, 25, 26, u32::MAX as usize] {
            let err = e.list_keys("n", "b", Some(cursor.at(offset))).unwrap_err();
            assert!(err.to_string().contains("unknown or expired"), "{err}");
        }
        assert!(e.list_keys("n", "b", Some(Cursor::from(12345))).is_err());
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
        assert_eq!(
            e.listings().lock().open.len(),
            MAX_LISTINGS_PER_NAMESPACE + 1
        );
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
        let big: Vec<Cursor> = (0..8).map(|_| open("big")).collect();
        let held = e.listings().lock().held;
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
        let open_before = e.listings().lock().open.len();
        let err = e.list_keys("huge", "b", None).unwrap_err();
        assert_eq!(err.limit(), Some("max_listing_bytes"), "{err}");
        assert_eq!(e.listings().lock().open.len(), open_before);
        assert!(e.list_keys("small", "b", Some(small)).is_ok());
        // Nothing leaks: every byte held belongs to an open listing.
        let table = e.listings().lock();
        let open_bytes: u64 = table.open.values().map(|(_, bytes)| bytes).sum();
        assert_eq!(table.held, open_bytes);
        assert!(table.building.is_empty());
    }
}
