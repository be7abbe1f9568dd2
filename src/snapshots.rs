//! When the store is written to its snapshot file: restored at start before the first health
//! answer, written periodically, and once more on a stop (through [`crate::shutdown`]). The
//! file format, the writer and the verifying reader are the store's
//! (`keyvalue_store::snapshot`); the settings are in [`crate::config::Snapshots`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use keyvalue_store::{snapshot, Engine};
use tracing::{debug, info, warn};

use crate::config::Snapshots;

/// Writes snapshots of one store as its settings say. One per provider.
pub struct Snapshotter {
    engine: Arc<Engine>,
    settings: Snapshots,
    /// [`Engine::changes`] when the last snapshot that succeeded began its walk: a write with
    /// nothing changed since writes nothing.
    saved_at: AtomicU64,
}

impl Snapshotter {
    pub fn new(engine: Arc<Engine>, settings: Snapshots) -> Arc<Self> {
        Arc::new(Self {
            engine,
            settings,
            saved_at: AtomicU64::new(0),
        })
    }

    /// Loads the snapshot into the (empty) store, first removing what unfinished writes left
    /// and making an old file private. Neither a leftover nor a file's mode stops a start;
    /// an unreadable file does only with `snapshot_required`.
    pub async fn restore(&self) -> anyhow::Result<()> {
        let path = &self.settings.path;
        match snapshot::remove_leftovers(path) {
            Ok((removed, failed)) => {
                for leftover in removed {
                    info!(
                        "removed {}, left by a snapshot write that never finished",
                        leftover.display()
                    );
                }
                for (leftover, err) in failed {
                    warn!("cannot remove {}: {err}", leftover.display());
                }
            }
            Err(err) => warn!(
                "cannot look for leftovers of snapshot writes beside {}: {err}",
                path.display()
            ),
        }
        if let Err(err) = snapshot::make_private(path) {
            warn!(
                "cannot make {} readable by this user only: {err}",
                path.display()
            );
        }
        let (engine, file, required) = (
            Arc::clone(&self.engine),
            path.clone(),
            self.settings.required,
        );
        let restored =
            tokio::task::spawn_blocking(move || snapshot::restore(&engine, &file, required))
                .await
                .context("snapshot restore panicked")??;
        let path = path.display();
        match restored {
            snapshot::Restored::Missing => info!("no snapshot at {path} yet: starting empty"),
            snapshot::Restored::Loaded(stats) => info!(
                entries = stats.entries,
                bytes = stats.bytes,
                "restored snapshot {path}"
            ),
            snapshot::Restored::MovedAside { error, moved_to } => tracing::error!(
                "snapshot {path} is unusable ({error}); moved it to {} and starting empty",
                moved_to.display()
            ),
        }
        // The file holds the store as it stands.
        (self.saved_at).store(self.engine.changes(), Ordering::SeqCst);
        Ok(())
    }

    /// Writes a snapshot now (on a blocking thread), logging the outcome; writes nothing when
    /// the store did not change since the last one.
    pub async fn write(&self, which: &str) {
        // Read before the walk: a write racing with it makes the next snapshot happen.
        let changes = self.engine.changes();
        if changes == self.saved_at.load(Ordering::SeqCst) {
            debug!("{which} snapshot skipped: nothing changed since the last one");
            return;
        }
        let (engine, path) = (Arc::clone(&self.engine), self.settings.path.clone());
        let started = Instant::now();
        let written = tokio::task::spawn_blocking(move || snapshot::write(&engine, &path)).await;
        let path = self.settings.path.display();
        match written {
            Ok(Ok(stats)) => {
                self.saved_at.store(changes, Ordering::SeqCst);
                info!(
                    entries = stats.entries,
                    bytes = stats.bytes,
                    millis = started.elapsed().as_millis() as u64,
                    "{which} snapshot written to {path}"
                )
            }
            Ok(Err(err)) => tracing::error!("{which} snapshot to {path} failed: {err}"),
            Err(err) => tracing::error!("{which} snapshot task failed: {err}"),
        }
    }

    /// Writes a snapshot every `snapshot_interval_secs`, until the task is aborted.
    pub async fn periodically(self: Arc<Self>) {
        let mut ticks = tokio::time::interval(self.settings.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await; // the first tick is immediate: nothing new to write yet
        loop {
            ticks.tick().await;
            self.write("periodic").await;
        }
    }
}
