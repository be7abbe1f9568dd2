//! Slot-level walks of a DashMap's shards, which its safe API does not offer: a random entry
//! (eviction's samples) and a bounded run of slots (the expiry sweep, which must be able to
//! stop half-way through a shard and go on later, holding the shard's lock for a bounded
//! time only).
//!
//! Every walk holds the shard's lock for as long as it looks at the shard's slots, and checks
//! each slot index against the table's current size under that lock.

use std::hash::{BuildHasher, Hash};

use dashmap::DashMap;

/// Calls `f` on one entry of `map` picked at random from `seed` (a random shard, then the
/// first full slot from a random index), under the shard's read lock; `None` if the map is
/// empty.
pub(crate) fn sample<K, V, R>(
    map: &DashMap<K, V>,
    seed: u64,
    f: impl FnOnce(&K, &V) -> R,
) -> Option<R>
where
    K: Eq + Hash,
{
    let shards = map.shards();
    let first = seed as usize % shards.len();
    for i in 0..shards.len() {
        let shard = shards[(first + i) % shards.len()].read();
        if shard.is_empty() {
            continue;
        }
        let slots = shard.buckets();
        let start = (seed >> 20) as usize & (slots - 1);
        for step in 0..slots {
            let index = (start + step) & (slots - 1);
            // SAFETY: `index` is below `buckets()` of this table, read under its lock, and
            // the reference does not outlive the lock (`f` returns owned data only through
            // `R`, which cannot borrow from the table).
            unsafe {
                if shard.is_bucket_full(index) {
                    let (key, value) = shard.bucket(index).as_ref();
                    return Some(f(key, value.get()));
                }
            }
        }
    }
    None
}

/// Most entries a table may hold to be shrunk by the sweep (a rehash of them under the lock
/// costs about what a run of the sweep does).
const SHRINK_AT_MOST: usize = 4096;

/// What one [`sweep_slots`] did.
pub(crate) struct Walked<K> {
    /// Slots looked at.
    pub(crate) slots: usize,
    /// Removed entries: dropped by the caller, after the lock is released.
    pub(crate) removed: Vec<K>,
    /// Whether the walk reached the shard's end.
    pub(crate) shard_done: bool,
}

/// Looks at slots `from..from + count` of shard `shard` under its write lock and removes the
/// entries `remove` says to (it sees each entry before it goes). When the walk ends the shard,
/// a table that became mostly empty, with at most [`SHRINK_AT_MOST`] entries left, is shrunk
/// to fit, so memory comes back without waiting for the bucket to empty.
pub(crate) fn sweep_slots<K, V>(
    map: &DashMap<K, V>,
    shard: usize,
    from: usize,
    count: usize,
    mut remove: impl FnMut(&K, &V) -> bool,
) -> Walked<K>
where
    K: Eq + Hash,
{
    let Some(lock) = map.shards().get(shard) else {
        return Walked {
            slots: 0,
            removed: Vec::new(),
            shard_done: true,
        };
    };
    let mut table = lock.write();
    let slots = table.buckets();
    let end = from.saturating_add(count).min(slots);
    let mut removed = Vec::new();
    for index in from.min(end)..end {
        // SAFETY: `index` is below `buckets()` of this table, under its write lock; a removed
        // slot is not touched again.
        unsafe {
            if !table.is_bucket_full(index) {
                continue;
            }
            let bucket = table.bucket(index);
            let (key, value) = bucket.as_ref();
            if remove(key, value.get()) {
                let ((key, _), _) = table.remove(bucket);
                removed.push(key);
            }
        }
    }
    let shard_done = end == slots;
    // Rehashing holds the lock for as long as the entries left take: only for a few.
    if shard_done && slots > 64 && table.len() * 8 < slots && table.len() <= SHRINK_AT_MOST {
        let hasher = map.hasher();
        // The hash DashMap itself uses for the entry's slot: the key through the map's hasher.
        let len = table.len();
        table.shrink_to(len, |(key, _)| hasher.hash_one(key));
    }
    Walked {
        slots: end.saturating_sub(from),
        removed,
        shard_done,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_in_runs_removes_what_it_is_told_and_a_shrunk_table_still_finds_the_rest() {
        let map: DashMap<String, u32> = DashMap::new();
        for i in 0..10_000u32 {
            map.insert(format!("k{i}"), i);
        }
        let mut removed = 0;
        for shard in 0..map.shards().len() {
            let mut from = 0;
            loop {
                let walked = sweep_slots(&map, shard, from, 100, |_, v| v % 10 != 0);
                removed += walked.removed.len();
                from += walked.slots;
                if walked.shard_done {
                    break;
                }
            }
        }
        assert_eq!(removed, 9_000);
        assert_eq!(map.len(), 1_000);
        for i in (0..10_000u32).step_by(10) {
            assert_eq!(map.get(&format!("k{i}")).map(|v| *v), Some(i), "k{i}");
        }
        let slots: usize = map.shards().iter().map(|s| s.read().buckets()).sum();
        assert!(
            slots < 4 * 1_000,
            "tables shrank: {slots} slots for 1000 entries"
        );
        map.insert("new".into(), 1);
        assert_eq!(map.get("new").map(|v| *v), Some(1));
    }

    #[test]
    fn samples_land_on_entries_and_spread() {
        let map: DashMap<u32, ()> = DashMap::new();
        assert!(sample(&map, 7, |_, _| ()).is_none());
        for i in 0..1000 {
            map.insert(i, ());
        }
        let mut seen = std::collections::HashSet::new();
        let mut seed = 1u64;
        for _ in 0..2000 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            seen.insert(sample(&map, seed, |k, _| *k).unwrap());
        }
        assert!(seen.len() > 500, "{} distinct of 1000", seen.len());
    }
}
