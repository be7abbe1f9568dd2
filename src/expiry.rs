//! When the store's expiry sweep runs: every [`SWEEP_INTERVAL`], on a blocking thread, up to
//! [`SWEEP_BUDGET`] slots (the store crate's `expiry.rs` says what a sweep does).
//!
//! A store's tables have about two slots per key, so a pass over N keys takes about
//! N / 1.3M seconds: expired memory comes back within about a second per million keys after
//! the deadline, whether or not anything reads those keys. Each run of the sweep holds one
//! shard's lock for at most `SWEEP_RUN` (4096) slots, so no call waits longer than that.

use std::sync::Arc;
use std::time::Duration;

use keyvalue_store::Engine;
use tracing::debug;

/// How often the sweep runs.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// Slots the sweep looks at per run (about 1 ms of one core).
pub const SWEEP_BUDGET: usize = 256 * 1024;

/// Sweeps `engine` every [`SWEEP_INTERVAL`] until the task is aborted.
pub async fn sweep_periodically(engine: Arc<Engine>) {
    let mut ticks = tokio::time::interval(SWEEP_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let engine = Arc::clone(&engine);
        match tokio::task::spawn_blocking(move || engine.sweep(SWEEP_BUDGET)).await {
            Ok(swept) if swept.expired > 0 => {
                debug!(expired = swept.expired, slots = swept.slots, "expiry sweep");
            }
            Ok(_) => {}
            Err(err) => tracing::error!("expiry sweep failed: {err}"),
        }
    }
}
