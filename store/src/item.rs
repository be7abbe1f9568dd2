//! How one entry lives in memory: key and value in a single allocation, looked up by key.

use dashmap::DashMap;

/// Entries of one bucket: a set of [`Item`]s, looked up by key.
pub(crate) type Entries = DashMap<Item, ()>;

/// One entry in one heap allocation: `[key length: u32 LE][key][value]`. It hashes, compares
/// and borrows as its key, so a bucket is looked up by `&str`. One allocation instead of a
/// boxed key and a boxed value saves a malloc header and a 16-byte slot per key (see
/// BENCHMARKS.md, memory per key).
pub(crate) struct Item(Box<[u8]>);

impl Item {
    pub(crate) fn new(key: &str, value: &[u8]) -> Item {
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

    pub(crate) fn key(&self) -> &str {
        // SAFETY: `Item::new` is the only constructor and copies these bytes from a `&str`.
        unsafe { std::str::from_utf8_unchecked(&self.0[4..4 + self.key_len()]) }
    }

    pub(crate) fn value(&self) -> &[u8] {
        &self.0[4 + self.key_len()..]
    }

    /// Key plus value bytes, what the accounting counts.
    pub(crate) fn size(&self) -> u64 {
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
