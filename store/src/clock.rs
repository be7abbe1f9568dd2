//! The engine's clock: expiry deadlines and last use, in the 32-bit units an entry's
//! [`Stamp`](crate::item::Stamp) holds.
//!
//! - Deadlines are in ticks of [`TICK`] since the engine started, rounded up: a key lives at
//!   least its TTL and at most one tick more. 32 bits of 100 ms span 13.6 years of uptime;
//!   later deadlines are clamped there. Tick 0 means "no deadline".
//! - Use is in milliseconds since the engine started, wrapping every 49.7 days: eviction
//!   compares ages (`now - used`, wrapping), so an entry idle for longer than that looks
//!   recent again. Eviction is approximate anyway (see `evict.rs`).
//!
//! Snapshots store deadlines as Unix milliseconds ([`Clock::to_unix_ms`],
//! [`Clock::deadline_of_unix_ms`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The unit of expiry deadlines.
pub const TICK: Duration = Duration::from_millis(100);
const TICK_MS: u64 = TICK.as_millis() as u64;

/// The longest TTL the engine keeps exactly (longer ones are clamped to it): ten years.
pub const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

pub(crate) struct Clock {
    start: Instant,
    /// Time added to the real clock, by tests that skip ahead.
    skipped_ms: AtomicU64,
}

impl Clock {
    pub(crate) fn new() -> Clock {
        Clock {
            start: Instant::now(),
            skipped_ms: AtomicU64::new(0),
        }
    }

    fn elapsed_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64 + self.skipped_ms.load(Ordering::Relaxed)
    }

    /// The current tick (never 0: tick 0 means "no deadline", and nothing expires at it).
    pub(crate) fn now_tick(&self) -> u32 {
        self.now().0
    }

    /// The current tick and millisecond (wrapping), from one reading of the clock: what a
    /// call needs to check deadlines and mark entries used.
    pub(crate) fn now(&self) -> (u32, u32) {
        let ms = self.elapsed_ms();
        ((ms / TICK_MS + 1).min(u32::MAX as u64) as u32, ms as u32)
    }

    /// The deadline of an entry written now that lives `ttl`: 0 (none) for `None`.
    pub(crate) fn deadline(&self, ttl: Option<Duration>) -> u32 {
        let Some(ttl) = ttl else { return 0 };
        let ttl = ttl.min(MAX_TTL).as_millis() as u64;
        // Rounded up: expired once `now_tick()` reaches it, never before `ttl` has passed.
        let at = (self.elapsed_ms() + ttl).div_ceil(TICK_MS) + 1;
        at.min(u32::MAX as u64) as u32
    }

    /// A deadline as Unix milliseconds, for a snapshot (0 for none).
    pub(crate) fn to_unix_ms(&self, deadline: u32) -> u64 {
        if deadline == 0 {
            return 0;
        }
        let left_ms = (u64::from(deadline) - 1) * TICK_MS;
        let left = Duration::from_millis(left_ms.saturating_sub(self.elapsed_ms()));
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            + left;
        (unix.as_millis() as u64).max(1)
    }

    /// A snapshot's Unix-milliseconds deadline on this clock: `None` when it has passed, `Some(0)`
    /// for none.
    pub(crate) fn deadline_of_unix_ms(&self, unix_ms: u64) -> Option<u32> {
        if unix_ms == 0 {
            return Some(0);
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let left = Duration::from_millis(unix_ms).checked_sub(now)?;
        if left.is_zero() {
            return None;
        }
        Some(self.deadline(Some(left)))
    }

    /// Moves the clock `by` ahead (tests).
    #[cfg(test)]
    pub(crate) fn skip(&self, by: Duration) {
        self.skipped_ms
            .fetch_add(by.as_millis() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_passes_after_its_ttl_and_not_before() {
        let clock = Clock::new();
        let deadline = clock.deadline(Some(Duration::from_secs(1)));
        assert!(clock.now_tick() < deadline);
        clock.skip(Duration::from_millis(900));
        assert!(clock.now_tick() < deadline);
        clock.skip(Duration::from_millis(250));
        assert!(clock.now_tick() >= deadline);
        assert_eq!(clock.deadline(None), 0);
        assert!(clock.now_tick() > 0);
    }

    #[test]
    fn unix_deadlines_round_trip_within_a_tick() {
        let clock = Clock::new();
        let deadline = clock.deadline(Some(Duration::from_secs(60)));
        let unix = clock.to_unix_ms(deadline);
        let back = clock.deadline_of_unix_ms(unix).unwrap();
        assert!(back.abs_diff(deadline) <= 2, "{back} vs {deadline}");
        assert_eq!(clock.deadline_of_unix_ms(0), Some(0));
        assert_eq!(clock.deadline_of_unix_ms(1), None, "long passed");
        // A TTL past MAX_TTL is clamped to it, without overflow.
        let far = clock.deadline(Some(Duration::from_secs(u64::MAX)));
        assert!(far.abs_diff(clock.deadline(Some(MAX_TTL))) <= 1);
        assert!(far > clock.deadline(Some(Duration::from_secs(86_400 * 365))));
    }
}
