//! Why the store refused an operation.

use crate::cursor::Cursor;

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
    /// A write to a namespace with eviction on that cannot fit even after eviction: it alone
    /// is larger than the limit, or the rest of the store (other namespaces, which are never
    /// evicted for it) leaves it too little room.
    #[error(
        "{adding} {unit} cannot fit under {limit_key}={limit} even after evicting this \
         namespace's keys ({evictable} {unit} of them evictable)"
    )]
    WontFit {
        /// The config key of the limit.
        limit_key: &'static str,
        /// "keys" or "bytes".
        unit: &'static str,
        /// What the write adds.
        adding: u64,
        /// What this namespace holds, all of which eviction could free.
        evictable: u64,
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
    UnknownCursor(Cursor),
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
            EngineError::WontFit { limit_key, .. } => Some(limit_key),
            _ => None,
        }
    }

    /// Whether a store-wide usage limit refused the write (the ones a concurrent batch's
    /// worst-case reservation can trip).
    pub(crate) fn is_usage_limit(&self) -> bool {
        matches!(
            self,
            EngineError::TooManyKeys { .. } | EngineError::OutOfSpace { .. }
        )
    }
}
