//! Stopping, with one owner: the stop request (the host's, or a signal's), the drain of the
//! calls in flight, and the final snapshot that must hold every answered write.
//!
//! Two paths can stop the provider and both end here: the host's shutdown request (through
//! the SDK's `Provider::shutdown`, [`Shutdown::host_request`]) and SIGTERM/SIGINT
//! ([`signal`], handled by `lib.rs`). Whichever comes first starts the final snapshot; both
//! wait for the same one.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt as _, Shared};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tracing::{info, warn};

use crate::snapshots::Snapshotter;
use crate::telemetry;

/// How long a host's shutdown request waits for in-flight calls before the SDK replies.
pub const DRAIN_WAIT: Duration = Duration::from_secs(10);

/// How long a stop waits for the final snapshot. A write cut short by the process's end only
/// leaves a temporary file (removed at the next start): the last complete snapshot stays.
pub const FINAL_SNAPSHOT_WAIT: Duration = Duration::from_secs(60);

/// The provider's stop: cheap to clone, clones share it.
#[derive(Clone)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Cancelled to stop taking calls.
    stop: CancellationToken,
    /// Cancelled by the serving loop once in-flight calls have finished.
    drained: CancellationToken,
    /// Where the final snapshot goes, when snapshots are on.
    snapshots: Option<Arc<Snapshotter>>,
    /// The final snapshot: one task, started by whichever stop path comes first and awaited
    /// (with a bound) by both. A task, not a future behind a lock: a stop path that gives up
    /// waiting cannot leave it half-polled with the other path waiting on it forever.
    final_snapshot: OnceLock<Shared<BoxFuture<'static, ()>>>,
}

impl Shutdown {
    /// A stop that ends with a snapshot by `snapshots`, when given.
    pub fn new(snapshots: Option<Arc<Snapshotter>>) -> Self {
        Self {
            inner: Arc::new(Inner {
                snapshots,
                ..Inner::default()
            }),
        }
    }

    /// Asks the serving loop to stop taking calls and finish the ones in flight.
    pub fn stop(&self) {
        telemetry::stopping();
        self.inner.stop.cancel();
    }

    /// Whether a stop was asked for.
    pub fn is_stopping(&self) -> bool {
        self.inner.stop.is_cancelled()
    }

    /// Resolves once a stop was asked for.
    pub fn stopping(&self) -> WaitForCancellationFuture<'_> {
        self.inner.stop.cancelled()
    }

    /// Called by the serving loop when nothing is in flight any more after a stop.
    pub fn mark_drained(&self) {
        self.inner.drained.cancel();
    }

    /// Waits up to `wait` for the serving loop to drain; answers whether it did.
    pub async fn drained(&self, wait: Duration) -> bool {
        tokio::time::timeout(wait, self.inner.drained.cancelled())
            .await
            .is_ok()
    }

    /// The snapshot of a stop, once in-flight calls are done: one task, started by whichever
    /// stop path comes first; each waits for it up to [`FINAL_SNAPSHOT_WAIT`]. Answers whether
    /// it finished in that time (with snapshots off: at once, `true`).
    pub async fn final_snapshot(&self) -> bool {
        let Some(snapshots) = &self.inner.snapshots else {
            return true;
        };
        let task = self.inner.final_snapshot.get_or_init(|| {
            let snapshots = Arc::clone(snapshots);
            let task = tokio::spawn(async move { snapshots.write("final").await });
            async move {
                if let Err(err) = task.await {
                    tracing::error!("final snapshot task failed: {err}");
                }
            }
            .boxed()
            .shared()
        });
        let finished = tokio::time::timeout(FINAL_SNAPSHOT_WAIT, task.clone())
            .await
            .is_ok();
        if !finished {
            tracing::error!(
                "the final snapshot did not finish within {FINAL_SNAPSHOT_WAIT:?}; \
                 the last complete snapshot stays in place"
            );
        }
        finished
    }

    /// The host asked us to stop: stop taking calls, let in-flight ones finish, then write the
    /// final snapshot, all before the SDK replies (the 1.x host kills the process as soon as
    /// the reply arrives: it drops the child, spawned with `kill_on_drop`).
    pub async fn host_request(&self) {
        // The SDK calls this again when its control loop sees its own subscriptions end
        // after the host's request: a stop already under way is not a second request. A stop
        // a signal began also ends here: answer the host only once the final snapshot (the
        // same task the signal path awaits) is written.
        if self.is_stopping() {
            self.drained(DRAIN_WAIT).await;
            self.final_snapshot().await;
            return;
        }
        info!("shutdown requested by the host");
        self.stop();
        if !self.drained(DRAIN_WAIT).await {
            warn!("in-flight calls did not finish within {DRAIN_WAIT:?}");
        }
        self.final_snapshot().await;
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            warn!(%err, "cannot listen for SIGTERM; only SIGINT stops the provider");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Snapshots;
    use keyvalue_store::{Engine, Limits};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_path_that_stops_polling_cannot_hang_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let settings = Snapshots {
            path: dir.path().join("snap"),
            interval: Duration::from_secs(3600),
            required: false,
        };
        let engine = Arc::new(Engine::new(Limits::UNLIMITED));
        let snapshots = Snapshotter::new(Arc::clone(&engine), settings.clone());
        let stop = Shutdown::new(Some(Arc::clone(&snapshots)));
        let value = vec![7u8; 64 << 10];
        for i in 0..512 {
            engine.set("n", "b", &format!("{i}"), &value).unwrap();
        }
        // The host's path starts the final snapshot, then is never polled again (the main
        // task gave up waiting for it), but stays alive.
        let mut host_path = Box::pin(stop.final_snapshot());
        assert!(
            tokio::time::timeout(Duration::from_millis(1), &mut host_path)
                .await
                .is_err(),
            "32 MiB written in a millisecond: the test needs a slower snapshot"
        );
        // The signal path must still see it finish.
        let finished = tokio::time::timeout(Duration::from_secs(30), stop.final_snapshot())
            .await
            .expect("the second stop path hung");
        assert!(finished);
        assert!(settings.path.exists());
        drop(host_path);
        // Nothing changed since: the next snapshot writes nothing.
        let before = std::fs::metadata(&settings.path)
            .unwrap()
            .modified()
            .unwrap();
        snapshots.write("periodic").await;
        let after = std::fs::metadata(&settings.path)
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(before, after);
    }
}
