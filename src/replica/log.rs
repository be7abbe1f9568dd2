//! What one replicated write looks like in the stream: its subject and its record.
//!
//! Every entry `(namespace, bucket, key)` has one subject, `{root}.{digest}`, where the digest
//! is the SHA-256 of the three names (each length-prefixed), in unpadded base64url: 43
//! characters of JetStream's subject charset whatever the names hold (`""`, dots, multi-byte
//! text, 4 KiB keys). The stream keeps one message per subject, so it holds each live entry
//! once. The names themselves travel in the record, which says what to do with the entry.
//!
//! A record (all integers big-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 4 | `KVR1` |
//! | 1 | op: 1 set, 2 delete |
//! | 8 | origin: the writing instance |
//! | 8 | batch: the `set-many`/`delete-many` it belongs to, 0 for none |
//! | 4 | how many records that batch has |
//! | 4 | this record's place in it, from 0 |
//! | 8 | deadline, Unix ms, 0 for none |
//! | 4 + n | namespace |
//! | 4 + n | bucket |
//! | 4 + n | key |
//! | rest | value (a set) |
//!
//! Anyone allowed to publish on the stream's subjects can write a record: decoding trusts no
//! length and never panics; what does not decode is skipped with a warning.

use base64::Engine as _;
use sha2::Digest as _;

const MAGIC: &[u8; 4] = b"KVR1";
const HEADER: usize = 4 + 1 + 8 + 8 + 4 + 4 + 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Set,
    Delete,
}

/// One replicated write of one entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub op: Op,
    pub origin: u64,
    pub batch: u64,
    pub batch_len: u32,
    pub batch_index: u32,
    pub deadline_ms: u64,
    pub namespace: &'a str,
    pub bucket: &'a str,
    pub key: &'a str,
    pub value: &'a [u8],
}

impl<'a> Record<'a> {
    pub fn encode(&self) -> bytes::Bytes {
        let names = self.namespace.len() + self.bucket.len() + self.key.len();
        let mut out = Vec::with_capacity(HEADER + 12 + names + self.value.len());
        out.extend_from_slice(MAGIC);
        out.push(match self.op {
            Op::Set => 1,
            Op::Delete => 2,
        });
        out.extend_from_slice(&self.origin.to_be_bytes());
        out.extend_from_slice(&self.batch.to_be_bytes());
        out.extend_from_slice(&self.batch_len.to_be_bytes());
        out.extend_from_slice(&self.batch_index.to_be_bytes());
        out.extend_from_slice(&self.deadline_ms.to_be_bytes());
        for name in [self.namespace, self.bucket, self.key] {
            // Names are bounded by max_key_bytes (and namespaces by the link config), far
            // below 4 GiB.
            out.extend_from_slice(&(name.len() as u32).to_be_bytes());
            out.extend_from_slice(name.as_bytes());
        }
        out.extend_from_slice(self.value);
        out.into()
    }

    /// The record in `bytes`, or why it is not one.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, &'static str> {
        let mut rest = bytes.strip_prefix(MAGIC).ok_or("not a record")?;
        let op = match take(&mut rest, 1)?[0] {
            1 => Op::Set,
            2 => Op::Delete,
            _ => return Err("unknown op"),
        };
        let origin = u64::from_be_bytes(array(take(&mut rest, 8)?));
        let batch = u64::from_be_bytes(array(take(&mut rest, 8)?));
        let batch_len = u32::from_be_bytes(array(take(&mut rest, 4)?));
        let batch_index = u32::from_be_bytes(array(take(&mut rest, 4)?));
        let deadline_ms = u64::from_be_bytes(array(take(&mut rest, 8)?));
        let mut name = || -> Result<&'a str, &'static str> {
            let len = u32::from_be_bytes(array(take(&mut rest, 4)?)) as usize;
            std::str::from_utf8(take(&mut rest, len)?).map_err(|_| "a name is not UTF-8")
        };
        let (namespace, bucket, key) = (name()?, name()?, name()?);
        if op == Op::Delete && !rest.is_empty() {
            return Err("a delete with a value");
        }
        Ok(Record {
            op,
            origin,
            batch,
            batch_len,
            batch_index,
            deadline_ms,
            namespace,
            bucket,
            key,
            value: rest,
        })
    }
}

fn take<'a>(rest: &mut &'a [u8], n: usize) -> Result<&'a [u8], &'static str> {
    if rest.len() < n {
        return Err("truncated");
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Ok(head)
}

fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0; N];
    out.copy_from_slice(bytes);
    out
}

/// The subject of entry `(namespace, bucket, key)` under `root`.
pub fn subject(root: &str, namespace: &str, bucket: &str, key: &str) -> String {
    let mut digest = sha2::Sha256::new();
    for name in [namespace, bucket, key] {
        digest.update((name.len() as u64).to_be_bytes());
        digest.update(name.as_bytes());
    }
    let digest = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.finalize());
    format!("{root}.{digest}")
}

/// Whether `text` is a non-empty run of letters, digits, `-` and `_`: a name JetStream takes
/// in a stream name and as a subject token.
pub fn is_plain(text: &str) -> bool {
    !text.is_empty() && (text.bytes()).all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A name JetStream takes as a stream name and a subject token: `text` itself when it is
/// letters, digits, `-` and `_` only, else a digest of it.
pub fn token(text: &str) -> String {
    if text.len() <= 64 && is_plain(text) {
        return text.to_owned();
    }
    let digest = sha2::Sha256::digest(text.as_bytes());
    format!(
        "h{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(&digest[..16])
            .replace('-', "_")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record<'a>(
        op: Op,
        ns: &'a str,
        bucket: &'a str,
        key: &'a str,
        value: &'a [u8],
    ) -> Record<'a> {
        Record {
            op,
            origin: 7,
            batch: 9,
            batch_len: 3,
            batch_index: 2,
            deadline_ms: 1_700_000_000_000,
            namespace: ns,
            bucket,
            key,
            value,
        }
    }

    #[test]
    fn any_names_and_values_round_trip() {
        let long = "k".repeat(4096);
        for (ns, bucket, key, value) in [
            ("named:a", "", "", &b""[..]),
            ("component:x", "b.c*>", "ключ 🔑", &b"\x00\xff"[..]),
            ("n", "b", &long, &[7u8; 1000][..]),
        ] {
            let set = record(Op::Set, ns, bucket, key, value);
            assert_eq!(Record::decode(&set.encode()), Ok(set));
            let delete = record(Op::Delete, ns, bucket, key, b"");
            assert_eq!(Record::decode(&delete.encode()), Ok(delete));
        }
    }

    #[test]
    fn hostile_bytes_are_refused_without_panicking() {
        let good = record(Op::Set, "ns", "b", "k", b"v").encode();
        for cut in 0..good.len() - 1 {
            // Every prefix short of the value is refused (one that ends in the value is a
            // shorter value).
            let decoded = Record::decode(&good[..cut]);
            assert!(
                cut >= good.len() - 1 || decoded.is_err(),
                "{cut}: {decoded:?}"
            );
        }
        let mut huge = good.to_vec();
        huge[HEADER..HEADER + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(Record::decode(&huge), Err("truncated"));
        let mut op = good.to_vec();
        op[4] = 3;
        assert_eq!(Record::decode(&op), Err("unknown op"));
        let mut utf8 = good.to_vec();
        utf8[HEADER + 4] = 0xff;
        assert_eq!(Record::decode(&utf8), Err("a name is not UTF-8"));
        assert_eq!(Record::decode(b"nope"), Err("not a record"));
    }

    #[test]
    fn subjects_are_in_the_jetstream_charset_and_tell_entries_apart() {
        let ok = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_=./".contains(&b))
        };
        let a = subject("KV.lat", "ns", "b", "ключ.*>");
        assert!(ok(&a) && a.starts_with("KV.lat.") && a.len() == "KV.lat.".len() + 43);
        // The names are length-prefixed: moving a byte from one name to the next is another
        // entry.
        assert_ne!(subject("r", "ns", "ab", "c"), subject("r", "ns", "a", "bc"));
        assert_ne!(subject("r", "ns", "", "k"), subject("r", "ns", "k", ""));
        assert_eq!(token("default"), "default");
        let t = token("lattice.with spaces");
        assert!(t.starts_with('h') && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
        assert_ne!(token(""), "");
    }
}
