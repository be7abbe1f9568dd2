//! Reading an invocation's parameters from the wire without trusting anything they declare.
//!
//! wRPC encodes parameters as the component model's value encoding: `string` and `list<u8>`
//! are a LEB128 `u32` byte length then the bytes, `list<T>` a LEB128 `u32` count then the
//! elements, `option<T>` one byte (0 or 1) then `T` when 1, `u64` LEB128, tuples back to back.
//! wrpc-transport 0.28's decoders size their buffers from the declared count
//! (`Vec::with_capacity(len)`): six bytes declaring a list of 2^32 elements abort the process
//! on allocation failure. Here nothing is allocated for what is declared, only for what arrived:
//!
//! 1. [`Scanner`] walks the bytes as they arrive against the function's [`Shape`], keeping its
//!    place between chunks (each byte is looked at once, whatever the chunking), and says when
//!    the parameters are complete, or that they can never be.
//! 2. [`Params::decode`] then reads the complete bytes. Every length was checked against the
//!    bytes present, so no allocation can be larger than the request itself, which the caller
//!    has already bounded (`max_request_bytes` and the shared in-flight budget).
//!
//! The keyvalue functions have no `future`/`stream` parameters, so no nested (async) parameter
//! paths exist; the transport is never asked for any.

use bytes::Bytes;

/// The type of a parameter, as far as its encoding goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    /// `string`: length, then UTF-8.
    Str,
    /// `list<u8>`: length, then bytes.
    Bytes,
    /// `u64`: LEB128.
    U64,
    /// `option<T>`.
    Option(Box<Shape>),
    /// `list<T>` of anything but `u8`.
    List(Box<Shape>),
    /// `tuple<…>`, and a function's parameter list.
    Tuple(Vec<Shape>),
}

impl Shape {
    /// The fewest bytes a value of this shape takes on the wire.
    pub fn min_bytes(&self) -> u64 {
        match self {
            Shape::Str | Shape::Bytes | Shape::U64 | Shape::Option(_) | Shape::List(_) => 1,
            Shape::Tuple(fields) => fields.iter().map(Shape::min_bytes).sum(),
        }
    }
}

/// Why parameters cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Malformed at a byte offset.
    #[error("malformed at byte {offset}: {what}")]
    Malformed {
        /// Where.
        offset: usize,
        /// What was wrong.
        what: &'static str,
    },
    /// A declared length or count that cannot fit in the request bound, whatever follows.
    #[error(
        "at byte {offset}, {what} {declared} declares at least {needs} bytes of parameters, \
         over max_request_bytes={limit}"
    )]
    TooLarge {
        /// Where.
        offset: usize,
        /// "a string of length" or "a list of count".
        what: &'static str,
        /// The declared length or count.
        declared: u32,
        /// The least the parameters would then be.
        needs: u64,
        /// The bound.
        limit: usize,
    },
    /// Complete parameters followed by more bytes.
    #[error("{extra} bytes follow the parameters")]
    Trailing {
        /// How many.
        extra: usize,
    },
}

/// What the scanner still has to see, innermost last.
#[derive(Debug)]
enum Step<'s> {
    /// A whole value of this shape.
    Value(&'s Shape),
    /// The rest of a list: `left` more elements of `elem`.
    Elements { elem: &'s Shape, left: u32 },
    /// `left` more bytes of a string or byte list (UTF-8 is checked when decoding).
    Skip { left: usize },
}

/// Walks arriving bytes against a [`Shape`], resuming where it stopped.
#[derive(Debug)]
pub struct Scanner<'s> {
    todo: Vec<Step<'s>>,
    pos: usize,
    elements: u64,
    limit: usize,
}

impl<'s> Scanner<'s> {
    /// A scanner for one value of `shape` (a function's parameter tuple) of at most `limit`
    /// bytes: a length or count that declares more is refused as soon as it is read.
    pub fn new(shape: &'s Shape, limit: usize) -> Self {
        Self {
            todo: vec![Step::Value(shape)],
            pos: 0,
            elements: 0,
            limit,
        }
    }

    /// Refuses a declaration of `n` items of at least `each` bytes at `offset`.
    fn declared(
        &self,
        offset: usize,
        what: &'static str,
        n: u32,
        each: u64,
    ) -> Result<(), WireError> {
        let needs = (self.pos as u64).saturating_add(u64::from(n).saturating_mul(each));
        if needs > self.limit as u64 {
            return Err(WireError::TooLarge {
                offset,
                what,
                declared: n,
                needs,
                limit: self.limit,
            });
        }
        Ok(())
    }

    /// Looks at what arrived since the last call (`buf` is everything so far). `Ok(true)` once
    /// the parameters are complete; `Ok(false)` while more bytes are needed.
    pub fn advance(&mut self, buf: &[u8]) -> Result<bool, WireError> {
        while let Some(step) = self.todo.pop() {
            match step {
                Step::Skip { left } => {
                    let have = buf.len() - self.pos;
                    if have < left {
                        self.pos = buf.len();
                        self.todo.push(Step::Skip { left: left - have });
                        return Ok(false);
                    }
                    self.pos += left;
                }
                Step::Elements { left: 0, .. } => {}
                Step::Elements { elem, left } => {
                    self.elements += 1;
                    self.todo.push(Step::Elements {
                        elem,
                        left: left - 1,
                    });
                    self.todo.push(Step::Value(elem));
                }
                Step::Value(shape) => {
                    let ready = match shape {
                        Shape::Str | Shape::Bytes => match self.length(buf)? {
                            Some(left) => {
                                self.declared(
                                    self.pos,
                                    "a string or byte list of length",
                                    left,
                                    1,
                                )?;
                                self.todo.push(Step::Skip {
                                    left: left as usize,
                                });
                                true
                            }
                            None => false,
                        },
                        Shape::U64 => match leb128(buf, self.pos, 10)? {
                            Some((_, used)) => {
                                self.pos += used;
                                true
                            }
                            None => false,
                        },
                        Shape::Option(inner) => match buf.get(self.pos) {
                            None => false,
                            Some(0) => {
                                self.pos += 1;
                                true
                            }
                            Some(1) => {
                                self.pos += 1;
                                self.todo.push(Step::Value(inner));
                                true
                            }
                            Some(_) => {
                                return Err(WireError::Malformed {
                                    offset: self.pos,
                                    what: "an option's tag is neither 0 nor 1",
                                })
                            }
                        },
                        Shape::List(elem) => match self.length(buf)? {
                            Some(left) => {
                                self.declared(self.pos, "a list of count", left, elem.min_bytes())?;
                                self.todo.push(Step::Elements { elem, left });
                                true
                            }
                            None => false,
                        },
                        Shape::Tuple(fields) => {
                            self.todo.extend(fields.iter().rev().map(Step::Value));
                            true
                        }
                    };
                    if !ready {
                        self.todo.push(Step::Value(shape));
                        return Ok(false);
                    }
                }
            }
        }
        if buf.len() > self.pos {
            return Err(WireError::Trailing {
                extra: buf.len() - self.pos,
            });
        }
        Ok(true)
    }

    /// List elements seen so far: what decoding them costs beyond their bytes (each becomes a
    /// struct of its own) is in proportion to this.
    pub fn elements(&self) -> u64 {
        self.elements
    }

    /// A LEB128 `u32` length or count at the current position, consumed; `None` until all
    /// its bytes arrived.
    fn length(&mut self, buf: &[u8]) -> Result<Option<u32>, WireError> {
        let Some((n, used)) = leb128(buf, self.pos, 5)? else {
            return Ok(None);
        };
        let n = u32::try_from(n).map_err(|_| WireError::Malformed {
            offset: self.pos,
            what: "a length does not fit in 32 bits",
        })?;
        self.pos += used;
        Ok(Some(n))
    }
}

/// An unsigned LEB128 of at most `max_bytes` bytes at `at`: its value and length, `None` when
/// it is not complete yet.
fn leb128(buf: &[u8], at: usize, max_bytes: usize) -> Result<Option<(u64, usize)>, WireError> {
    let mut value = 0u64;
    for i in 0..max_bytes {
        let Some(&byte) = buf.get(at + i) else {
            return Ok(None);
        };
        let bits = u64::from(byte & 0x7f);
        let shift = 7 * i as u32;
        if shift == 63 && bits > 1 {
            return Err(WireError::Malformed {
                offset: at,
                what: "an integer does not fit in 64 bits",
            });
        }
        value |= bits << shift;
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    Err(WireError::Malformed {
        offset: at,
        what: "an integer is longer than its type allows",
    })
}

/// Reads values out of complete, scanned parameter bytes.
pub struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    /// A reader of `buf`, which a [`Scanner`] found complete.
    pub fn new(buf: Bytes) -> Self {
        Self { buf, pos: 0 }
    }

    fn malformed(&self, what: &'static str) -> WireError {
        WireError::Malformed {
            offset: self.pos,
            what,
        }
    }

    fn byte(&mut self) -> Result<u8, WireError> {
        let byte = *self
            .buf
            .get(self.pos)
            .ok_or_else(|| self.malformed("the parameters end early"))?;
        self.pos += 1;
        Ok(byte)
    }

    fn leb128(&mut self, max_bytes: usize) -> Result<u64, WireError> {
        let (value, used) = leb128(&self.buf, self.pos, max_bytes)?
            .ok_or_else(|| self.malformed("the parameters end early"))?;
        self.pos += used;
        Ok(value)
    }

    /// A length or count, checked against the bytes left: each element takes at least one
    /// byte, so a count can never be more than what is left.
    fn length(&mut self) -> Result<usize, WireError> {
        let n = self.leb128(5)?;
        let n = usize::try_from(n).map_err(|_| self.malformed("a length is too large"))?;
        if n > self.buf.len() - self.pos {
            return Err(self.malformed("a length runs past the end of the parameters"));
        }
        Ok(n)
    }

    fn bytes(&mut self) -> Result<Bytes, WireError> {
        let n = self.length()?;
        let bytes = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(bytes)
    }
}

/// A value that parameters are made of.
pub trait Decode: Sized {
    /// Its shape on the wire.
    fn shape() -> Shape;
    /// Reads one value.
    fn decode(r: &mut Reader) -> Result<Self, WireError>;
}

impl Decode for String {
    fn shape() -> Shape {
        Shape::Str
    }

    fn decode(r: &mut Reader) -> Result<Self, WireError> {
        let at = r.pos;
        let bytes = r.bytes()?;
        String::from_utf8(bytes.to_vec()).map_err(|_| WireError::Malformed {
            offset: at,
            what: "a string is not UTF-8",
        })
    }
}

impl Decode for Bytes {
    fn shape() -> Shape {
        Shape::Bytes
    }

    /// A slice of the request: no copy.
    fn decode(r: &mut Reader) -> Result<Self, WireError> {
        r.bytes()
    }
}

impl Decode for u64 {
    fn shape() -> Shape {
        Shape::U64
    }

    fn decode(r: &mut Reader) -> Result<Self, WireError> {
        r.leb128(10)
    }
}

impl<T: Decode> Decode for Option<T> {
    fn shape() -> Shape {
        Shape::Option(Box::new(T::shape()))
    }

    fn decode(r: &mut Reader) -> Result<Self, WireError> {
        match r.byte()? {
            0 => Ok(None),
            1 => T::decode(r).map(Some),
            _ => Err(r.malformed("an option's tag is neither 0 nor 1")),
        }
    }
}

/// `list<T>` for `T` other than `u8` (which is [`Bytes`]).
impl<T: Decode + ListElement> Decode for Vec<T> {
    fn shape() -> Shape {
        Shape::List(Box::new(T::shape()))
    }

    fn decode(r: &mut Reader) -> Result<Self, WireError> {
        // Bounded by the bytes left (see `Reader::length`), never by a bare declaration.
        let n = r.length()?;
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            items.push(T::decode(r)?);
        }
        Ok(items)
    }
}

/// Marks the element types of the lists the keyvalue functions take (a `Vec<u8>` would be
/// encoded as `list<u8>` with a different shape: it is [`Bytes`] here).
pub trait ListElement {}
impl ListElement for String {}
impl<A, B> ListElement for (A, B) {}

macro_rules! tuple_decode {
    ($($t:ident),+) => {
        impl<$($t: Decode),+> Decode for ($($t,)+) {
            fn shape() -> Shape {
                Shape::Tuple(vec![$($t::shape()),+])
            }

            fn decode(r: &mut Reader) -> Result<Self, WireError> {
                Ok(($($t::decode(r)?,)+))
            }
        }
    };
}
tuple_decode!(A, B);
tuple_decode!(A, B, C);

/// A function's parameters: a tuple of [`Decode`] values.
pub trait Params: Decode + Send + 'static {}
impl<T: Decode + Send + 'static> Params for T {}

/// Decodes complete parameters (the [`Scanner`] said so).
pub fn decode<P: Params>(buf: Bytes) -> Result<P, WireError> {
    let mut r = Reader::new(buf);
    let params = P::decode(&mut r)?;
    if r.pos != r.buf.len() {
        return Err(WireError::Trailing {
            extra: r.buf.len() - r.pos,
        });
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type SetMany = (String, Vec<(String, Bytes)>);

    fn put_len(out: &mut Vec<u8>, mut n: u64) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
        put_len(out, bytes.len() as u64);
        out.extend_from_slice(bytes);
    }

    fn set_many(bucket: &str, pairs: &[(String, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        put_bytes(&mut out, bucket.as_bytes());
        put_len(&mut out, pairs.len() as u64);
        for (k, v) in pairs {
            put_bytes(&mut out, k.as_bytes());
            put_bytes(&mut out, v);
        }
        out
    }

    /// Feeds `bytes` to a scanner in chunks of `chunk`; the outcome after the last one.
    fn scan(shape: &Shape, bytes: &[u8], chunk: usize) -> Result<bool, WireError> {
        let mut scanner = Scanner::new(shape, usize::MAX);
        let mut seen = Vec::new();
        let mut done = false;
        for piece in bytes.chunks(chunk.max(1)) {
            // After completion, more bytes are trailing bytes: an error.
            seen.extend_from_slice(piece);
            done = scanner.advance(&seen)?;
        }
        if bytes.is_empty() {
            done = scanner.advance(&seen)?;
        }
        Ok(done)
    }

    #[test]
    fn a_huge_declared_list_is_only_ever_incomplete() {
        // An empty bucket name, then a list declaring 4,294,967,295 pairs.
        let frame = [0x00, 0xff, 0xff, 0xff, 0xff, 0x0f];
        let shape = SetMany::shape();
        assert_eq!(scan(&shape, &frame, 1), Ok(false));
        // Even if a caller claims it is complete, decoding allocates nothing for the claim.
        assert!(decode::<SetMany>(Bytes::copy_from_slice(&frame)).is_err());
        for shape in [
            <(String, Vec<String>)>::shape(),
            <(String, String)>::shape(),
        ] {
            assert_eq!(scan(&shape, &frame, 6), Ok(false));
        }
        // Under a bound, the declaration is refused as soon as it is read.
        let mut scanner = Scanner::new(&shape, 1 << 20);
        let err = scanner.advance(&frame).unwrap_err();
        assert!(
            matches!(
                err,
                WireError::TooLarge {
                    declared: u32::MAX,
                    ..
                }
            ),
            "{err}"
        );
        let text = err.to_string();
        assert!(text.contains("max_request_bytes=1048576"), "{text}");
        // A pair takes at least two bytes: after 4 bytes, 0x80000 pairs need 1 MiB + 4 bytes.
        let mut scanner = Scanner::new(&shape, 1 << 20);
        assert!(scanner.advance(&[0x00, 0x80, 0x80, 0x20]).is_err());
        let mut scanner = Scanner::new(&shape, (1 << 20) + 4);
        assert_eq!(scanner.advance(&[0x00, 0x80, 0x80, 0x20]), Ok(false));
    }

    #[test]
    fn malformed_integers_and_tags_are_refused() {
        let shape = <(String, Option<u64>)>::shape();
        assert!(matches!(
            scan(&shape, &[0, 2], 2),
            Err(WireError::Malformed { offset: 1, .. })
        ));
        // A length of six LEB128 bytes.
        assert!(scan(&shape, &[0x80, 0x80, 0x80, 0x80, 0x80, 0x01], 6).is_err());
        // A length over u32.
        assert!(scan(&shape, &[0xff, 0xff, 0xff, 0xff, 0x1f], 5).is_err());
        // A u64 of eleven bytes, and one over 64 bits.
        let inc = <(String, String, u64)>::shape();
        let mut long = vec![0, 0];
        long.extend([0xff; 10]);
        long.push(0);
        assert!(scan(&inc, &long, 3).is_err());
        let mut over = vec![0, 0];
        over.extend([0xff; 9]);
        over.push(0x02);
        assert!(scan(&inc, &over, 3).is_err());
        let mut max = vec![0, 0];
        max.extend([0xff; 9]);
        max.push(0x01);
        assert_eq!(scan(&inc, &max, 3), Ok(true));
        assert_eq!(
            decode::<(String, String, u64)>(Bytes::from(max)).unwrap().2,
            u64::MAX
        );
        assert_eq!(
            scan(&inc, &[0, 0, 1, 9], 4),
            Err(WireError::Trailing { extra: 1 })
        );
        // Not UTF-8: scanned whole, refused by the decoder.
        let bad = [1, 0xff, 0];
        assert_eq!(scan(&<(String, String)>::shape(), &bad, 1), Ok(true));
        assert!(decode::<(String, String)>(Bytes::copy_from_slice(&bad)).is_err());
    }

    proptest! {
        #[test]
        fn any_chunking_of_valid_parameters_scans_and_decodes_them(
            bucket in ".{0,8}",
            pairs in proptest::collection::vec((".{0,6}", proptest::collection::vec(any::<u8>(), 0..300)), 0..6),
            chunk in 1usize..64,
        ) {
            let bytes = set_many(&bucket, &pairs);
            let shape = SetMany::shape();
            prop_assert_eq!(scan(&shape, &bytes, chunk), Ok(true));
            // Every strict prefix is incomplete, never an error.
            for cut in 0..bytes.len() {
                prop_assert_eq!(scan(&shape, &bytes[..cut], chunk), Ok(false));
            }
            let (b, p) = decode::<SetMany>(Bytes::from(bytes)).unwrap();
            prop_assert_eq!(b, bucket);
            let p: Vec<(String, Vec<u8>)> = p.into_iter().map(|(k, v)| (k, v.to_vec())).collect();
            prop_assert_eq!(p, pairs);
        }

        #[test]
        fn arbitrary_bytes_never_panic_or_over_allocate(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            for shape in [SetMany::shape(), <(String, Vec<String>)>::shape(), <(String, Option<u64>)>::shape(), <(String, String, u64)>::shape()] {
                if let Ok(true) = scan(&shape, &bytes, 7) {
                    // Complete by the scanner: the decoder reads it (or refuses UTF-8).
                    let _ = decode::<SetMany>(Bytes::from(bytes.clone()));
                }
            }
            let _ = decode::<(String, Vec<String>)>(Bytes::from(bytes));
        }
    }
}
