//! Bounding an answer before it is copied: readers ask for room as they copy, and a refusal
//! says how large the whole answer would have been.

/// Bytes an answer is charged per element besides its keys and values (the encoding's length
/// prefixes and the element's own struct).
pub const ANSWER_ELEMENT_BYTES: usize = 32;

/// An answer refused before it was copied: it would have been larger than the room given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerRefused {
    /// The bytes the whole answer would have held (values, keys and
    /// [`ANSWER_ELEMENT_BYTES`] per element).
    pub asked: u64,
}
