//! The snapshot file: the whole store in one file, written atomically and read back only
//! whole. When to write one and when to read it is the provider's business.
//!
//! # File format (version 3)
//!
//! ```text
//! magic    8 bytes  "KVINMEM1"
//! version  u32 LE   3
//! records  …        tag u8, then
//!                     1 namespace: len u32 LE, UTF-8 name   (following buckets belong to it)
//!                     2 bucket:    len u32 LE, UTF-8 name   (following entries belong to it)
//!                     3 entry:     len u32 LE, UTF-8 key, len u32 LE, value bytes
//!                     4 expiring entry: as 3, then its deadline: Unix milliseconds u64 LE
//!                     0 end:       entries u64 LE, then the checksum
//! checksum u32 LE   CRC-32 (IEEE) of every byte before it
//! ```
//!
//! A file is accepted only whole: right magic and version, every length inside the file,
//! UTF-8 names, the entry count and the checksum matching, nothing after the checksum. The
//! file is read into memory once at start (a transient copy of its size) and its checksum
//! verified before any entry is loaded.
//!
//! Version 3 is version 2 with expiring entries (tag 4): a key keeps its deadline across a
//! restart, as an absolute time, and a key whose deadline passed meanwhile is not loaded.
//! Versions 1 and 2 have no tag 4 and load as before.
//!
//! Version 2 is version 1 with the engine's tagged namespace names (`named:<name>`,
//! `component:<id>`, named by the provider's links). Version 1 did not tell a component's own namespace from
//! one that link config names, so a version 1 file loads every namespace `<n>` as the own
//! namespace of a component `<n>` (`component:<n>`): a component's private data stays
//! private and its own. Data of a version 1 named namespace is then reached by no link (a
//! named namespace never reaches a component's own, by design): it stays in the store and in
//! later snapshots, but is no longer served.
//!
//! # Writing
//!
//! To a new temporary file beside it, `<path>.tmp-<pid>-<random hex>`, created exclusively (a
//! file or symlink already there is never followed nor reused: another name is tried) and
//! readable by the provider's user only (0600: it holds every tenant's values), fsync'd,
//! renamed over `<path>`, then the directory fsync'd: a crash leaves either the old snapshot
//! or the new one, and a leftover temporary file, which the next start removes. The walk takes no global lock: per bucket it copies
//! the key list (DashMap holds one shard's read lock while that shard's keys are copied;
//! readers never wait, writers to that shard wait for the copy), then reads values a key at a
//! time, and writes to the file with no lock held. A snapshot is therefore not a point in
//! time: a key written while it runs may or may not be in it; a key unchanged throughout is.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::{Engine, Limits};

/// The first bytes of a snapshot file.
pub const MAGIC: &[u8; 8] = b"KVINMEM1";
/// The format version this provider writes (it reads 1 and 2 as well).
pub const VERSION: u32 = 3;

const TAG_END: u8 = 0;
const TAG_NAMESPACE: u8 = 1;
const TAG_BUCKET: u8 = 2;
const TAG_ENTRY: u8 = 3;
const TAG_EXPIRING_ENTRY: u8 = 4;

/// Why a snapshot file was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot read it: {0}")]
    Io(#[from] io::Error),
    #[error("not a keyvalue-inmemory snapshot (bad magic)")]
    BadMagic,
    #[error("written in format version {0}; this provider reads versions 1 to {VERSION}")]
    Version(u32),
    #[error("truncated (it ends before its checksum)")]
    Truncated,
    #[error("checksum mismatch: the file is damaged")]
    Checksum,
    #[error("malformed at byte {offset}: {what}")]
    Malformed { offset: u64, what: &'static str },
}

/// What a load or a write handled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub entries: u64,
    pub bytes: u64,
}

/// One snapshot write at a time in this process: a periodic write still running on its
/// blocking thread when the provider stops must finish before the final one starts, or it
/// could rename an older snapshot over the final one.
static WRITING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Writes the whole store to `path` atomically.
pub fn write(engine: &Engine, path: &Path) -> io::Result<Stats> {
    let _one_at_a_time = WRITING.lock().unwrap_or_else(|poison| poison.into_inner());
    // A name nobody can guess, tried again if taken: a planted file or symlink only costs a
    // retry, never the snapshot.
    let (tmp, file) = {
        let mut attempt = 0;
        loop {
            let tmp = tmp_path(
                path,
                &format!("{}-{:016x}", std::process::id(), unguessable()),
            );
            match create_private(&tmp) {
                Ok(file) => break (tmp, file),
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists && attempt < 16 => {
                    attempt += 1;
                }
                Err(err) => return Err(err),
            }
        }
    };
    let result = write_to(engine, file).and_then(|stats| {
        fs::rename(&tmp, path)?;
        sync_dir(path)?;
        Ok(stats)
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// `<path>.tmp-<unique>`.
fn tmp_path(path: &Path, unique: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp-");
    name.push(unique);
    path.with_file_name(name)
}

/// What [`remove_leftovers`] removed, and what it could not remove and why.
pub type Leftovers = (Vec<PathBuf>, Vec<(PathBuf, io::Error)>);

/// Removes what a write that never finished left beside `path`: files or symlinks named
/// `<path>.tmp-<digits>-<hex>` (and the `<path>.tmp` of earlier versions), never what a
/// symlink points at, nor anything else. Answers what was removed and what could not be (a
/// file another user planted in a shared directory, say): neither stops the provider.
pub fn remove_leftovers(path: &Path) -> io::Result<Leftovers> {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok((Vec::new(), Vec::new()));
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let prefix = format!("{name}.tmp");
    let ours = |file_name: &str| {
        if file_name == prefix {
            return true;
        }
        let Some(rest) = file_name.strip_prefix(&format!("{prefix}-")) else {
            return false;
        };
        let Some((pid, unique)) = rest.split_once('-') else {
            return false;
        };
        !pid.is_empty()
            && pid.bytes().all(|b| b.is_ascii_digit())
            && !unique.is_empty()
            && unique.bytes().all(|b| b.is_ascii_hexdigit())
    };
    let (mut removed, mut failed) = (Vec::new(), Vec::new());
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok((removed, failed)),
        Err(err) => return Err(err),
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        if !file_name.to_str().is_some_and(ours) {
            continue;
        }
        // Not followed: a symlink is a symlink here.
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if !(kind.is_file() || kind.is_symlink()) {
            continue;
        }
        // `remove_file` unlinks a symlink itself.
        match fs::remove_file(entry.path()) {
            Ok(()) => removed.push(entry.path()),
            Err(err) => failed.push((entry.path(), err)),
        }
    }
    Ok((removed, failed))
}

/// Makes an existing snapshot file private (0600): files written before snapshots were made
/// private kept the mode they were created with.
pub fn make_private(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o077 != 0 => {
            fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        }
        Ok(_) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err),
    }
}

fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// A writer that keeps the CRC of what went through it.
struct Checksummed<W> {
    inner: W,
    crc: crc32fast::Hasher,
}

impl<W: Write> Checksummed<W> {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.crc.update(bytes);
        self.inner.write_all(bytes)
    }

    fn put_bytes(&mut self, tag: u8, bytes: &[u8]) -> io::Result<()> {
        let len = u32::try_from(bytes.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "over 4 GiB"))?;
        self.put(&[tag])?;
        self.put(&len.to_le_bytes())?;
        self.put(bytes)
    }
}

/// A random 64-bit number (the standard library's per-process random hash keys).
fn unguessable() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}

/// Creates `tmp` for writing, readable by our user only. Exclusive: fails on anything
/// already there, a planted symlink included.
fn create_private(tmp: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
}

fn write_to(engine: &Engine, file: File) -> io::Result<Stats> {
    let mut out = Checksummed {
        inner: BufWriter::with_capacity(1 << 20, file),
        crc: crc32fast::Hasher::new(),
    };
    out.put(MAGIC)?;
    out.put(&VERSION.to_le_bytes())?;
    let mut stats = Stats::default();
    for ns in engine.namespaces(usize::MAX) {
        out.put_bytes(TAG_NAMESPACE, ns.as_bytes())?;
        for bucket in engine.bucket_names(&ns) {
            let keys = engine.bucket_keys(&ns, &bucket);
            if keys.is_empty() {
                continue;
            }
            out.put_bytes(TAG_BUCKET, bucket.as_bytes())?;
            for key in keys {
                // Deleted or expired since the key list was taken: left out.
                let Some((value, deadline)) = engine.get_with_deadline(&ns, &bucket, &key) else {
                    continue;
                };
                let tag = match deadline {
                    0 => TAG_ENTRY,
                    _ => TAG_EXPIRING_ENTRY,
                };
                out.put_bytes(tag, key.as_bytes())?;
                let len = u32::try_from(value.len())
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "over 4 GiB"))?;
                out.put(&len.to_le_bytes())?;
                out.put(&value)?;
                if deadline != 0 {
                    out.put(&deadline.to_le_bytes())?;
                }
                stats.entries += 1;
                stats.bytes += (key.len() + value.len()) as u64;
            }
        }
    }
    out.put(&[TAG_END])?;
    out.put(&stats.entries.to_le_bytes())?;
    let crc = out.crc.clone().finalize();
    let mut inner = out.inner;
    inner.write_all(&crc.to_le_bytes())?;
    let file = inner.into_inner().map_err(io::IntoInnerError::into_error)?;
    file.sync_all()?;
    Ok(stats)
}

/// One decoded record.
#[derive(Debug, PartialEq, Eq)]
pub enum Record<'a> {
    Entry {
        namespace: &'a str,
        bucket: &'a str,
        key: &'a str,
        value: &'a [u8],
        /// Unix milliseconds; 0 for none.
        deadline: u64,
    },
}

/// Verifies and decodes a whole snapshot, handing each entry to `sink`. Nothing reaches `sink`
/// unless the checksum matched; a malformed body can still fail half-way, so callers load into
/// a store they discard on error (the provider only loads at start, into an empty store).
pub fn decode(
    mut reader: impl Read,
    mut sink: impl FnMut(Record<'_>),
) -> Result<Stats, SnapshotError> {
    let mut data = Vec::new();
    reader.read_to_end(&mut data)?;
    decode_bytes(&data, &mut sink)
}

fn decode_bytes(data: &[u8], sink: &mut impl FnMut(Record<'_>)) -> Result<Stats, SnapshotError> {
    if data.len() < MAGIC.len() || &data[..MAGIC.len()] != MAGIC {
        return Err(if MAGIC.starts_with(data) {
            SnapshotError::Truncated
        } else {
            SnapshotError::BadMagic
        });
    }
    let mut header = Cursor {
        data,
        at: MAGIC.len(),
    };
    let version = header.u32()?;
    if !(1..=VERSION).contains(&version) {
        return Err(SnapshotError::Version(version));
    }
    let Some(split) = data.len().checked_sub(4) else {
        return Err(SnapshotError::Truncated);
    };
    let (body, stored) = data.split_at(split);
    let stored = u32::from_le_bytes(stored.try_into().map_err(|_| SnapshotError::Truncated)?);
    if split < header.at || crc32fast::hash(body) != stored {
        // A file cut short fails its checksum too: say "truncated" when its records run out
        // before their end record.
        return Err(match records(data, &mut |_| ()) {
            Err(SnapshotError::Truncated) => SnapshotError::Truncated,
            Ok((_, end)) if end + 4 > data.len() => SnapshotError::Truncated,
            _ => SnapshotError::Checksum,
        });
    }
    let (stats, end) = records(body, sink)?;
    if end != body.len() {
        return Err(SnapshotError::Malformed {
            offset: end as u64,
            what: "bytes after the end record",
        });
    }
    Ok(stats)
}

/// Parses the records after the header up to the end record; answers where it ends.
fn records(
    data: &[u8],
    sink: &mut impl FnMut(Record<'_>),
) -> Result<(Stats, usize), SnapshotError> {
    let mut at = Cursor {
        data,
        at: MAGIC.len() + 4,
    };
    let malformed = |at: &Cursor<'_>, what| SnapshotError::Malformed {
        offset: at.at as u64,
        what,
    };
    let mut namespace: Option<&str> = None;
    let mut bucket: Option<&str> = None;
    let mut stats = Stats::default();
    loop {
        match at.u8()? {
            TAG_NAMESPACE => {
                namespace = Some(
                    at.str()?
                        .ok_or_else(|| malformed(&at, "namespace not UTF-8"))?,
                );
                bucket = None;
            }
            TAG_BUCKET => {
                if namespace.is_none() {
                    return Err(malformed(&at, "bucket outside a namespace"));
                }
                bucket = Some(
                    at.str()?
                        .ok_or_else(|| malformed(&at, "bucket name not UTF-8"))?,
                );
            }
            tag @ (TAG_ENTRY | TAG_EXPIRING_ENTRY) => {
                let (Some(ns), Some(b)) = (namespace, bucket) else {
                    return Err(malformed(&at, "entry outside a bucket"));
                };
                let key = at.str()?.ok_or_else(|| malformed(&at, "key not UTF-8"))?;
                let value = at.bytes()?;
                let deadline = match tag {
                    TAG_EXPIRING_ENTRY => at.u64()?,
                    _ => 0,
                };
                if tag == TAG_EXPIRING_ENTRY && deadline == 0 {
                    return Err(malformed(&at, "expiring entry without a deadline"));
                }
                stats.entries += 1;
                stats.bytes += (key.len() + value.len()) as u64;
                sink(Record::Entry {
                    namespace: ns,
                    bucket: b,
                    key,
                    value,
                    deadline,
                });
            }
            TAG_END => {
                let count = at.u64()?;
                if count != stats.entries {
                    return Err(malformed(&at, "entry count differs from the end record"));
                }
                return Ok((stats, at.at));
            }
            _ => return Err(malformed(&at, "unknown record tag")),
        }
    }
}

struct Cursor<'a> {
    data: &'a [u8],
    at: usize,
}

/// Reads past the end of the data are [`SnapshotError::Truncated`].
impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        let end = self.at.checked_add(n).ok_or(SnapshotError::Truncated)?;
        let slice = self
            .data
            .get(self.at..end)
            .ok_or(SnapshotError::Truncated)?;
        self.at = end;
        Ok(slice)
    }
    fn u8(&mut self) -> Result<u8, SnapshotError> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Result<u32, SnapshotError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, SnapshotError> {
        let b = self.take(8)?;
        let mut a = [0; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self) -> Result<&'a [u8], SnapshotError> {
        let len = self.u32()? as usize;
        self.take(len)
    }
    /// `Ok(None)` for bytes that are not UTF-8.
    fn str(&mut self) -> Result<Option<&'a str>, SnapshotError> {
        Ok(std::str::from_utf8(self.bytes()?).ok())
    }
}

/// Decodes a snapshot into `engine`; entries its limits refuse are left out (restore lifts
/// the limits while it loads).
pub fn load(mut reader: impl Read, engine: &Engine) -> Result<Stats, SnapshotError> {
    let mut data = Vec::new();
    reader.read_to_end(&mut data)?;
    let version_1 = data.get(8..12) == Some(&1u32.to_le_bytes()[..]);
    // Version 1 names are untagged: they load as components' own namespaces (see the module
    // docs).
    let mut migrated: (String, String) = Default::default();
    decode_bytes(&data, &mut |Record::Entry {
                                  namespace,
                                  bucket,
                                  key,
                                  value,
                                  deadline,
                              }| {
        let namespace = if version_1 {
            if migrated.0 != namespace {
                migrated = (namespace.to_owned(), version_1_namespace(namespace));
            }
            migrated.1.as_str()
        } else {
            namespace
        };
        // A deadline passed meanwhile stores nothing.
        let _ = engine.set_with_deadline(namespace, bucket, key, value, deadline);
    })
}

/// The namespace a version 1 file's namespace `name` loads as: the own namespace of a
/// component `name`, as the provider names it (a test of the provider's checks they agree).
pub fn version_1_namespace(name: &str) -> String {
    format!("component:{name}")
}

/// What happened at start.
#[derive(Debug)]
pub enum Restored {
    /// No snapshot file yet.
    Missing,
    Loaded(Stats),
    /// The file could not be used and was moved to `moved_to`; the store starts empty.
    MovedAside {
        error: SnapshotError,
        moved_to: PathBuf,
    },
}

/// Loads the snapshot at `path` into `engine` (which must be empty), ignoring the limits
/// (data over a lowered limit stays, as with a live config change). An unusable file is moved
/// aside to `<path>.corrupt-<unix seconds>` and the store starts empty, unless `required`
/// (config `snapshot_required`), which makes it an error.
pub fn restore(engine: &Engine, path: &Path, required: bool) -> anyhow::Result<Restored> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Restored::Missing),
        Err(err) => {
            anyhow::bail!("cannot open snapshot {}: {err}", path.display())
        }
    };
    let limits = engine.limits();
    engine.set_limits(Limits::UNLIMITED);
    let decoded = load(BufReader::new(file), engine);
    engine.set_limits(limits);
    match decoded {
        Ok(stats) => Ok(Restored::Loaded(stats)),
        Err(error) => {
            engine.clear();
            if required {
                anyhow::bail!(
                    "snapshot {} is unusable ({error}) and snapshot_required=true: not starting",
                    path.display()
                );
            }
            let stamp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let mut name = path.file_name().unwrap_or_default().to_os_string();
            name.push(format!(".corrupt-{stamp}"));
            let moved_to = path.with_file_name(name);
            fs::rename(path, &moved_to).map_err(|err| {
                anyhow::anyhow!(
                    "snapshot {} is unusable ({error}) and cannot be moved aside: {err}",
                    path.display()
                )
            })?;
            Ok(Restored::MovedAside { error, moved_to })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> Engine {
        let e = Engine::new(Limits::UNLIMITED);
        e.set("a", "b1", "k1", b"v1").unwrap();
        e.set("a", "b1", "empty", b"").unwrap();
        e.set("a", "", "k", b"in the unnamed bucket").unwrap();
        e.set("other", "b1", "k1", &[0, 255, 7]).unwrap();
        e.increment("other", "counters", "hits", 41).unwrap();
        e
    }

    fn encoded(e: &Engine) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap");
        write(e, &path).unwrap();
        fs::read(&path).unwrap()
    }

    fn contents(e: &Engine) -> Vec<(String, String, String, Vec<u8>)> {
        let mut all = Vec::new();
        for ns in e.namespaces(usize::MAX) {
            for b in e.bucket_names(&ns) {
                for k in e.bucket_keys(&ns, &b) {
                    let v = e.get(&ns, &b, &k).unwrap();
                    all.push((ns.clone(), b.to_string(), k.to_string(), v.to_vec()));
                }
            }
        }
        all.sort();
        all
    }

    #[test]
    fn a_written_snapshot_loads_back_identically() {
        let e = engine();
        let bytes = encoded(&e);
        let loaded = Engine::new(Limits::UNLIMITED);
        let stats = load(&bytes[..], &loaded).unwrap();
        assert_eq!(stats.entries, 5);
        assert_eq!(contents(&loaded), contents(&e));
        assert_eq!(loaded.usage(), e.usage());
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_is_refused() {
        let bytes = encoded(&engine());
        for len in 0..bytes.len() {
            let mut n = 0;
            let result = decode(&bytes[..len], |_| n += 1);
            assert!(result.is_err(), "a file cut at {len} was accepted");
            assert_eq!(n, 0, "entries of a file cut at {len} were loaded");
        }
        for i in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x10;
            let mut n = 0;
            assert!(
                decode(&damaged[..], |_| n += 1).is_err(),
                "a flipped byte at {i} was accepted"
            );
            assert_eq!(n, 0);
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(&longer[..], |_| ()).is_err());
    }

    #[test]
    fn another_version_is_named() {
        let mut bytes = encoded(&engine());
        bytes[8..12].copy_from_slice(&4u32.to_le_bytes());
        let err = decode(&bytes[..], |_| ()).unwrap_err();
        assert!(matches!(err, SnapshotError::Version(4)), "{err}");
        assert!(err.to_string().contains("version 4"), "{err}");
    }

    #[test]
    fn deadlines_survive_a_restore_and_keys_expired_meanwhile_do_not_come_back() {
        let e = engine();
        let minute = Some(std::time::Duration::from_secs(60));
        e.set_expiring("a", "b1", "later", b"v", minute).unwrap();
        let brief = Some(std::time::Duration::from_millis(150));
        e.set_expiring("a", "b1", "soon", b"v", brief).unwrap();
        let (_, deadline) = e.get_with_deadline("a", "b1", "later").unwrap();
        let bytes = encoded(&e);
        std::thread::sleep(std::time::Duration::from_millis(300));
        let loaded = Engine::new(Limits::UNLIMITED);
        let stats = load(&bytes[..], &loaded).unwrap();
        assert_eq!(stats.entries, 7, "both expiring entries are in the file");
        assert_eq!(loaded.get("a", "b1", "soon"), None, "expired meanwhile");
        let (value, restored) = loaded.get_with_deadline("a", "b1", "later").unwrap();
        assert_eq!(&value[..], b"v");
        assert!(
            restored.abs_diff(deadline) <= 250,
            "{restored} vs {deadline}"
        );
        assert_eq!(loaded.get_with_deadline("a", "b1", "k1").unwrap().1, 0);
        assert_eq!(loaded.usage().keys, 6);
    }

    #[test]
    fn a_version_1_file_loads_its_namespaces_as_components_own() {
        let mut bytes = encoded(&engine());
        bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
        let body = bytes.len() - 4;
        let crc = crc32fast::hash(&bytes[..body]);
        bytes[body..].copy_from_slice(&crc.to_le_bytes());
        let e = Engine::new(Limits::UNLIMITED);
        load(&bytes[..], &e).unwrap();
        assert_eq!(
            e.get("component:a", "b1", "k1").as_deref(),
            Some(&b"v1"[..])
        );
        assert_eq!(e.get("a", "b1", "k1"), None);
        // A file of the current version loads as written.
        let e = Engine::new(Limits::UNLIMITED);
        load(&encoded(&engine())[..], &e).unwrap();
        assert_eq!(e.get("a", "b1", "k1").as_deref(), Some(&b"v1"[..]));
    }

    #[test]
    fn the_file_is_private_and_a_planted_symlink_is_never_followed() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap");
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        // An old snapshot, readable by all.
        fs::write(&path, b"old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        make_private(&path).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // What an attacker could plant: the old fixed temporary name, names of the new form,
        // and a file that only looks alike (not ours to remove).
        std::os::unix::fs::symlink(&victim, dir.path().join("snap.tmp")).unwrap();
        for n in 0..4 {
            let name = format!("snap.tmp-{}-{n:016x}", std::process::id());
            std::os::unix::fs::symlink(&victim, dir.path().join(name)).unwrap();
        }
        fs::write(dir.path().join("snap.tmp-notes"), b"mine").unwrap();
        // A name is tried exclusively: no write goes through a planted link.
        let name = tmp_path(&path, "1-00");
        std::os::unix::fs::symlink(&victim, &name).unwrap();
        assert_eq!(
            create_private(&name).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        let e = engine();
        for _ in 0..4 {
            write(&e, &path).unwrap();
        }
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
        // The next start removes the leftovers (the links, not what they point at), and
        // nothing else.
        let (removed, failed) = remove_leftovers(&path).unwrap();
        assert_eq!(removed.len(), 6, "{removed:?}");
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert!(path.exists());
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["snap", "snap.tmp-notes", "victim"]);
        // A directory where a leftover would be is not removed, and does not stop a start.
        fs::create_dir(dir.path().join("snap.tmp")).unwrap();
        let (removed, failed) = remove_leftovers(&path).unwrap();
        assert!(removed.is_empty() && failed.is_empty());
    }

    #[test]
    fn restore_moves_an_unusable_file_aside_or_refuses_when_required() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap");
        let mut bytes = encoded(&engine());
        bytes.truncate(bytes.len() - 3);
        fs::write(&path, &bytes).unwrap();
        let e = Engine::new(Limits::UNLIMITED);
        let err = restore(&e, &path, true).unwrap_err();
        assert!(err.to_string().contains("snapshot_required"), "{err}");
        assert!(path.exists(), "a required snapshot stays where it is");

        match restore(&e, &path, false).unwrap() {
            Restored::MovedAside { moved_to, error } => {
                assert!(matches!(error, SnapshotError::Truncated), "{error}");
                assert!(moved_to.exists() && !path.exists());
                assert!(moved_to.to_string_lossy().contains("snap.corrupt-"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(e.usage().keys, 0);
        assert!(matches!(
            restore(&e, &path, false).unwrap(),
            Restored::Missing
        ));
    }
}
