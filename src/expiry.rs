//! When the store's expiry sweep runs: every [`SWEEP_INTERVAL`], on a blocking thread, up to
//! [`SWEEP_BUDGET`] slots (the store crate's `expiry.rs` says what a sweep does).
//!
//! A store's tables have about two slots per key, so a pass over N keys takes about
//! N / 1.3M seconds: expired memory comes back within about a second per million keys after
//! the deadline, whether or not anything reads those keys. Each run of the sweep holds one
//! shard's lock for at most `SWEEP_RUN` (4096) slots, or for the rehash of a table shrunk to
//! its last 4096 entries or fewer, so no call waits longer than that.
//!
//! The memory of reclaimed entries goes back to the allocator at once, for new writes to use.
//! glibc's allocator keeps freed memory in its arenas rather than returning it to the system,
//! so after a pass that reclaimed at least [`TRIM_AFTER`] entries the sweep asks it to
//! (`malloc_trim`): RSS falls back too, not only the store's figures.

use std::sync::Arc;
use std::time::Duration;

use keyvalue_store::Engine;
use tracing::debug;

/// How often the sweep runs.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// Slots the sweep looks at per run (about 1 ms of one core).
pub const SWEEP_BUDGET: usize = 256 * 1024;

/// Entries a sweep pass must reclaim before the freed memory is handed back to the system.
pub const TRIM_AFTER: u64 = 64 * 1024;

/// Sweeps `engine` every [`SWEEP_INTERVAL`] until the task is aborted.
pub async fn sweep_periodically(engine: Arc<Engine>) {
    let mut ticks = tokio::time::interval(SWEEP_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut this_pass = 0;
    loop {
        ticks.tick().await;
        let engine = Arc::clone(&engine);
        let swept = match tokio::task::spawn_blocking(move || engine.sweep(SWEEP_BUDGET)).await {
            Ok(swept) => swept,
            Err(err) => {
                tracing::error!("expiry sweep failed: {err}");
                continue;
            }
        };
        if swept.expired > 0 {
            debug!(expired = swept.expired, slots = swept.slots, "expiry sweep");
        }
        this_pass += swept.expired;
        if swept.pass_done {
            if this_pass >= TRIM_AFTER {
                let _ = tokio::task::spawn_blocking(give_back_memory).await;
            }
            this_pass = 0;
        }
    }
}

/// Returns the allocator's free memory to the system, where the allocator allows it.
fn give_back_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only releases free memory; it is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
