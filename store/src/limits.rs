//! The limits a store enforces, and the checks every write makes before it touches the store.

use crate::error::EngineError;

/// The limits a store enforces. The provider sets them from its config (`max_*` keys and
/// `list_page_size`, named as these fields are).
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

/// `Err` when `value` is longer than `max_value_bytes`.
pub(crate) fn check_value(limits: &Limits, value: &[u8]) -> Result<(), EngineError> {
    if value.len() > limits.max_value_bytes {
        return Err(EngineError::ValueTooLarge {
            len: value.len(),
            limit: limits.max_value_bytes,
        });
    }
    Ok(())
}

/// `Err` when `key` (or a bucket name: `what` says which) is longer than `max_key_bytes`.
pub(crate) fn check_key(limits: &Limits, what: &'static str, key: &str) -> Result<(), EngineError> {
    if key.len() > limits.max_key_bytes {
        return Err(EngineError::KeyTooLarge {
            what,
            len: key.len(),
            limit: limits.max_key_bytes,
        });
    }
    Ok(())
}
