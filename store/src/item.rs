//! How one entry lives in memory: key and value in a single allocation behind a thin pointer,
//! looked up by key, beside the entry's [`Stamp`] (its expiry deadline and when it was last
//! used).

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use dashmap::DashMap;

/// Entries of one bucket: a map of [`Item`]s, looked up by key, to their [`Stamp`]s.
pub(crate) type Entries = DashMap<Item, Stamp>;

/// One entry in one heap allocation: `[key length: LEB128][value length: LEB128][key][value]`,
/// behind a thin (8-byte) pointer. It hashes, compares and borrows as its key, so a bucket is
/// looked up by `&str`.
///
/// Why not a `Box<[u8]>`: a map slot holds the item and its stamp. A fat pointer (16 bytes)
/// plus the 8-byte stamp would make every slot 24 bytes; a thin pointer keeps it at 16, the
/// size a slot had before entries carried a stamp. The lengths move into the allocation,
/// where one byte each is enough for keys and values under 128 bytes (BENCHMARKS.md, memory
/// per key).
pub(crate) struct Item(NonNull<u8>);

// SAFETY: an `Item` owns its allocation and never hands out mutable access to it: it is as
// thread-safe as the `Box<[u8]>` it was made from.
unsafe impl Send for Item {}
unsafe impl Sync for Item {}

/// Appends `n` as LEB128 (7 bits a byte, low first).
fn put_len(buf: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        buf.push((n as u8) | 0x80);
        n >>= 7;
    }
    buf.push(n as u8);
}

impl Item {
    pub(crate) fn new(key: &str, value: &[u8]) -> Item {
        let mut buf = Vec::with_capacity(4 + key.len() + value.len());
        put_len(&mut buf, key.len());
        put_len(&mut buf, value.len());
        buf.extend_from_slice(key.as_bytes());
        buf.extend_from_slice(value);
        // Never empty (two length bytes at least), so never a dangling zero-size pointer.
        let raw = Box::into_raw(buf.into_boxed_slice()) as *mut u8;
        Item(NonNull::new(raw).expect("Box::into_raw is never null"))
    }

    /// Reads the LEB128 length at `*at`, moving `at` past it.
    fn len_at(&self, at: &mut usize) -> usize {
        let (mut n, mut shift) = (0usize, 0);
        loop {
            // SAFETY: `Item::new` wrote two complete LEB128 numbers at the start of the
            // allocation; reads stay within them.
            let byte = unsafe { *self.0.as_ptr().add(*at) };
            *at += 1;
            n |= ((byte & 0x7f) as usize) << shift;
            if byte < 0x80 {
                return n;
            }
            shift += 7;
        }
    }

    /// `(header length, key length, value length)`.
    fn layout(&self) -> (usize, usize, usize) {
        let mut at = 0;
        let key = self.len_at(&mut at);
        let value = self.len_at(&mut at);
        (at, key, value)
    }

    fn bytes(&self) -> &[u8] {
        let (header, key, value) = self.layout();
        // SAFETY: the allocation holds exactly the header, the key and the value.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr(), header + key + value) }
    }

    pub(crate) fn key(&self) -> &str {
        let (header, key, _) = self.layout();
        // SAFETY: `Item::new` is the only constructor and copies these bytes from a `&str`.
        unsafe { std::str::from_utf8_unchecked(&self.bytes()[header..header + key]) }
    }

    pub(crate) fn value(&self) -> &[u8] {
        let (header, key, _) = self.layout();
        &self.bytes()[header + key..]
    }

    /// Key plus value bytes, what the accounting counts.
    pub(crate) fn size(&self) -> u64 {
        let (_, key, value) = self.layout();
        (key + value) as u64
    }
}

impl Drop for Item {
    fn drop(&mut self) {
        let len = self.bytes().len();
        // SAFETY: the pointer and length of the boxed slice `Item::new` leaked, rebuilt once.
        unsafe {
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.0.as_ptr(),
                len,
            )))
        };
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

/// What an entry carries besides its bytes, in its map slot (8 bytes): its expiry deadline and
/// when it was last read or written, both on the engine's clock (`clock.rs`). Atomics, so a
/// read can mark an entry used while holding only its shard's read lock.
#[derive(Default)]
pub(crate) struct Stamp {
    /// Deadline in ticks ([`crate::clock::TICK`]); 0 for none.
    deadline: AtomicU32,
    /// Milliseconds, wrapping (see `Clock::now`).
    used: AtomicU32,
}

impl Stamp {
    pub(crate) fn new(deadline: u32, used: u32) -> Stamp {
        Stamp {
            deadline: AtomicU32::new(deadline),
            used: AtomicU32::new(used),
        }
    }

    pub(crate) fn deadline(&self) -> u32 {
        self.deadline.load(Ordering::Relaxed)
    }

    /// Whether the entry's deadline has passed at tick `now`.
    pub(crate) fn expired(&self, now: u32) -> bool {
        let deadline = self.deadline();
        deadline != 0 && deadline <= now
    }

    pub(crate) fn used(&self) -> u32 {
        self.used.load(Ordering::Relaxed)
    }

    /// Marks the entry used at `now_ms`; skips the store when it already says so, so that a
    /// hot key read from every core does not bounce its cache line on each read.
    pub(crate) fn touch(&self, now_ms: u32) {
        if self.used.load(Ordering::Relaxed) != now_ms {
            self.used.store(now_ms, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values_of_any_length_round_trip() {
        for key_len in [0, 1, 127, 128, 300, 20_000] {
            for value_len in [0, 1, 127, 128, 16_383, 16_384, 70_000] {
                let key = "k".repeat(key_len);
                let value = vec![7u8; value_len];
                let item = Item::new(&key, &value);
                assert_eq!(item.key(), key);
                assert_eq!(item.value(), &value[..]);
                assert_eq!(item.size(), (key_len + value_len) as u64);
            }
        }
        let item = Item::new("ключ🔑", b"");
        assert_eq!(item.key(), "ключ🔑");
    }

    #[test]
    fn a_slot_stays_16_bytes() {
        assert_eq!(std::mem::size_of::<Item>(), 8);
        assert_eq!(std::mem::size_of::<(Item, Stamp)>(), 16);
    }

    #[test]
    fn expiry_is_by_tick_and_zero_means_never() {
        let stamp = Stamp::new(10, 0);
        assert!(!stamp.expired(9));
        assert!(stamp.expired(10));
        assert!(!Stamp::new(0, 0).expired(u32::MAX));
    }
}
