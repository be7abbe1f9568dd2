//! Writes that come from a replicated log (the provider's JetStream replication), and the
//! check the writing instance makes before the log takes them.
//!
//! Every instance applies the log in its order, so every instance must apply every entry the
//! same way: a replicated write is applied whatever the local limits say (the instance that
//! wrote it checked them, with [`Engine::admits`], before the log took it). A replicated
//! write is told to the observer only where [`quietly`] does not wrap it: the provider tells
//! watchers of a change once, on the instance that made it.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::engine::Removal;
use crate::error::EngineError;
use crate::limits::{check_key, check_value, Limits};
use crate::Engine;

thread_local! {
    /// Set while [`quietly`] runs: changes made then are not told to the observer.
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with the observer deaf to the changes it makes on this thread.
pub fn quietly<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            QUIET.with(|quiet| quiet.set(self.0));
        }
    }
    let _restore = Restore(QUIET.with(|quiet| quiet.replace(true)));
    f()
}

/// Whether changes on this thread go untold now.
pub(crate) fn is_quiet() -> bool {
    QUIET.with(Cell::get)
}

impl Engine {
    /// The deadline `ttl` from now, as Unix milliseconds (0 for none): how a replicated write
    /// carries it, so that every instance expires the entry at the same moment.
    pub fn deadline_unix_ms(&self, ttl: Option<Duration>) -> u64 {
        match self.clock.deadline(ttl) {
            0 => 0,
            deadline => self.clock.to_unix_ms(deadline).max(1),
        }
    }

    /// `Ok` when writing `pairs` (a key named twice counts with its last value) to `bucket` of
    /// namespace `ns` fits every limit now, else the error the write itself would give. Nothing
    /// is reserved: writers racing on other instances can pass a limit together (by what they
    /// have in flight), which the next check then refuses.
    pub fn admits<'a>(
        &self,
        ns: &str,
        bucket: &str,
        pairs: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<(), EngineError> {
        let limits = self.limits();
        check_key(&limits, "bucket name", bucket)?;
        let mut latest: HashMap<&str, usize> = HashMap::new();
        for (key, value) in pairs {
            check_key(&limits, "key", key)?;
            check_value(&limits, value)?;
            latest.insert(key, value.len());
        }
        let (mut adding_keys, mut adding_bytes) = (0u64, 0u64);
        for (key, len) in latest {
            match self.stored_len(ns, bucket, key) {
                Some(old) => adding_bytes += len.saturating_sub(old) as u64,
                None => {
                    adding_keys += 1;
                    adding_bytes += (key.len() + len) as u64;
                }
            }
        }
        let held = self
            .namespaces
            .get(ns)
            .map_or(0, |n| n.keys.load(Ordering::Relaxed));
        if adding_keys > 0 && held.saturating_add(adding_keys) > limits.max_keys {
            return Err(EngineError::TooManyKeys {
                held,
                adding: adding_keys,
                limit: limits.max_keys,
            });
        }
        let held = self.total_bytes.load(Ordering::Relaxed);
        if adding_bytes > 0 && held.saturating_add(adding_bytes) > limits.max_total_bytes {
            return Err(EngineError::OutOfSpace {
                held,
                adding: adding_bytes,
                limit: limits.max_total_bytes,
            });
        }
        Ok(())
    }

    /// Whether namespace `ns` (or the store) is near a usage limit: within a tenth of it, or
    /// within 64 keys or 1 MiB. There, a replicated write first catches up with the stream, so
    /// that [`Engine::admits`] counts every write acknowledged before it, wherever.
    pub fn near_limits(&self, ns: &str) -> bool {
        let limits = self.limits();
        let keys = (self.namespaces.get(ns)).map_or(0, |n| n.keys.load(Ordering::Relaxed));
        let bytes = self.total_bytes.load(Ordering::Relaxed);
        let near =
            |held: u64, limit: u64, floor: u64| held.saturating_add(floor.max(limit / 10)) >= limit;
        near(keys, limits.max_keys, 64) || near(bytes, limits.max_total_bytes, 1 << 20)
    }

    /// The value length of a live entry.
    fn stored_len(&self, ns: &str, bucket: &str, key: &str) -> Option<usize> {
        let ns_ref = self.namespaces.get(ns)?;
        let entries = ns_ref.buckets.get(bucket)?;
        let (now, _) = self.clock.now();
        let entry = entries.get(key)?;
        (!entry.value().expired(now)).then(|| entry.key().value().len())
    }

    /// Applies a replicated set of `key` to `value`, expiring at `unix_ms` (0: never). A
    /// deadline already passed removes what the key held: the write replaced it.
    pub fn apply_set(&self, ns: &str, bucket: &str, key: &str, value: &[u8], unix_ms: u64) {
        match self.clock.deadline_of_unix_ms(unix_ms) {
            // Unlimited: nothing here can refuse.
            Some(deadline) => {
                let _ = self.set_at_within(Limits::UNLIMITED, ns, bucket, key, value, deadline);
            }
            None => {
                self.remove(ns, bucket, [key], Removal::Deleted);
            }
        }
    }

    /// Applies a replicated `set-many` (or the part of it the log still holds) at once.
    pub fn apply_set_many<'a>(
        &self,
        ns: &str,
        bucket: &str,
        pairs: impl IntoIterator<Item = (&'a str, &'a [u8])>,
        unix_ms: u64,
    ) {
        let latest: HashMap<&str, &[u8]> = pairs.into_iter().collect();
        match self.clock.deadline_of_unix_ms(unix_ms) {
            Some(deadline) => {
                // Unlimited: nothing here can refuse.
                let _ = self.set_many_at(Limits::UNLIMITED, ns, bucket, latest, deadline);
            }
            None => {
                self.remove(ns, bucket, latest.into_keys(), Removal::Deleted);
            }
        }
    }

    /// Applies a replicated delete of `keys`.
    pub fn apply_delete<'a>(
        &self,
        ns: &str,
        bucket: &str,
        keys: impl IntoIterator<Item = &'a str>,
    ) {
        self.remove(ns, bucket, keys, Removal::Deleted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::limits;

    #[test]
    fn a_replicated_write_passes_the_local_limits_and_admits_checks_them() {
        let engine = Engine::new(Limits {
            max_keys: 2,
            ..limits()
        });
        engine.set("ns", "b", "a", b"1").unwrap();
        engine.set("ns", "b", "b", b"2").unwrap();
        assert!(matches!(
            engine.admits("ns", "b", [("c", &b"3"[..])]),
            Err(EngineError::TooManyKeys { held: 2, .. })
        ));
        // An overwrite adds no key.
        engine.admits("ns", "b", [("a", &b"9"[..])]).unwrap();
        // The log says it was admitted elsewhere: every instance applies it.
        engine.apply_set("ns", "b", "c", b"3", 0);
        assert_eq!(engine.get("ns", "b", "c").as_deref(), Some(&b"3"[..]));
        engine.apply_set_many("ns", "b", [("d", &b"4"[..]), ("a", &b"5"[..])], 0);
        assert_eq!(engine.get("ns", "b", "a").as_deref(), Some(&b"5"[..]));
        assert_eq!(engine.usage().keys, 4);
        engine.apply_delete("ns", "b", ["a", "c", "missing"]);
        assert_eq!(engine.usage().keys, 2);
        // A deadline already passed removes the old value.
        engine.apply_set("ns", "b", "d", b"x", 1);
        assert_eq!(engine.get("ns", "b", "d"), None);
    }

    #[test]
    fn near_limits_is_a_tenth_of_a_limit_or_a_floor() {
        let engine = Engine::new(Limits {
            max_keys: 1000,
            max_total_bytes: 100 << 20,
            ..limits()
        });
        assert!(!engine.near_limits("ns"));
        for i in 0..899 {
            engine.set("ns", "b", &format!("k{i}"), b"v").unwrap();
        }
        assert!(!engine.near_limits("ns"));
        engine.set("ns", "b", "one-more", b"v").unwrap();
        assert!(engine.near_limits("ns"), "900 of 1000 keys");
        assert!(!engine.near_limits("other"));
        // A small limit is always near.
        engine.set_limits(Limits {
            max_keys: 10,
            ..engine.limits()
        });
        assert!(engine.near_limits("other"));
    }

    #[test]
    fn a_replicated_deadline_round_trips_through_unix_time() {
        let engine = Engine::new(Limits::UNLIMITED);
        assert_eq!(engine.deadline_unix_ms(None), 0);
        let at = engine.deadline_unix_ms(Some(Duration::from_secs(60)));
        engine.apply_set("ns", "b", "k", b"v", at);
        let (_, back) = engine.get_with_deadline("ns", "b", "k").unwrap();
        assert!(back.abs_diff(at) <= 200, "{back} vs {at}");
    }
}
