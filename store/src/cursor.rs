//! A list-keys cursor: where the next page of an open listing starts.

use std::fmt;

/// Where the next page of a listing starts: the listing (32 bits) and the offset of the page's
/// first key in it (32 bits). On the wire it is the `u64` cursor of `list-keys`,
/// `listing << 32 | offset`; any `u64` converts into one, and one this store did not hand out
/// is refused as [`EngineError::UnknownCursor`](crate::EngineError::UnknownCursor).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cursor(u64);

impl Cursor {
    /// `offset` fits in 32 bits: a listing of more keys is refused before it is opened.
    pub(crate) fn new(listing: u32, offset: usize) -> Cursor {
        Cursor(u64::from(listing) << 32 | offset as u64)
    }

    pub(crate) fn listing(self) -> u32 {
        (self.0 >> 32) as u32
    }

    pub(crate) fn offset(self) -> usize {
        (self.0 & 0xffff_ffff) as usize
    }

    /// The cursor of the same listing at `offset`.
    pub(crate) fn at(self, offset: usize) -> Cursor {
        Cursor::new(self.listing(), offset)
    }
}

impl From<u64> for Cursor {
    fn from(wire: u64) -> Cursor {
        Cursor(wire)
    }
}

impl From<Cursor> for u64 {
    fn from(cursor: Cursor) -> u64 {
        cursor.0
    }
}

impl fmt::Display for Cursor {
    /// As the caller sent it: the wire's `u64`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
