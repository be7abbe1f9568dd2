//! The expiry sweep under load: `--expiry-keys` keys (16 B, 100 B values) that all expire at
//! the same instant, in a provider serving get and set meanwhile. Reports the calls' p99 in
//! the seconds before the deadline and in the seconds after it (while the sweep reclaims
//! them), how long until every expired key was reclaimed, and the memory before and after.
//!
//! The keys reach the provider through a snapshot file written here (the store crate's own
//! writer), all with one deadline, in the bucket the measured calls use: loading a million
//! keys through wRPC takes longer than the deadline spread this measures. The window before
//! the deadline is the reference: the same store, the sweep already walking the keys.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use keyvalue_store::{snapshot, Engine, Limits};
use serde_json::json;

use super::driver::{drive, Phase};
use super::shared::{Killed, BUCKET, LATTICE};
use super::workload::{preload, Target, Workload};
use crate::run;

/// Calls in flight of each workload (get and set) during the windows.
const IN_FLIGHT: usize = 32;
/// Length of the window before and of the window after the deadline.
const WINDOW: Duration = Duration::from_secs(3);

pub struct Expiry {
    pub keys: usize,
    pub before: (Phase, Phase),
    pub after: (Phase, Phase),
    /// From the deadline until health showed every expired key reclaimed.
    pub reclaimed_seconds: f64,
    pub rss_loaded: u64,
    pub rss_reclaimed: u64,
    pub bytes_loaded: u64,
    pub bytes_reclaimed: u64,
}

pub async fn measure(
    binary: &std::path::Path,
    url: &str,
    nats: &async_nats::Client,
    keys: usize,
) -> anyhow::Result<Expiry> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("expiring.snapshot");
    // Time to start the provider, restore the file and preload the workload's keys.
    let lead = Duration::from_secs(15) + Duration::from_micros(keys as u64 * 5);
    let deadline = SystemTime::now() + lead;
    let deadline_ms = deadline.duration_since(UNIX_EPOCH)?.as_millis() as u64;
    eprintln!("expiry sweep: writing {keys} keys expiring at once…");
    {
        let engine = Engine::new(Limits::UNLIMITED);
        let value = [b'x'; 100];
        for i in 0..keys {
            let key = format!("exp-{i:012}");
            // In the bucket the measured calls use: the sweep walks the shards they lock.
            engine.set_with_deadline("named:bench", BUCKET, &key, &value, deadline_ms)?;
        }
        snapshot::write(&engine, &path)?;
    }
    let config = json!({
        "max_keys": "100000000",
        "max_total_bytes": "17179869184",
        "snapshot_path": path.to_string_lossy(),
        "snapshot_interval_secs": "86400",
    });
    let mut provider = Killed(vec![run::start_provider(
        binary,
        url,
        LATTICE,
        "expiry",
        config.as_object().cloned().unwrap_or_default(),
        &[("bench-component", "bench")],
        json!({}),
    )?]);
    let child = &mut provider.0[0];
    run::wait_for_health(nats, LATTICE, "expiry", child).await?;
    let pid = child.id();
    let prefix = format!("{LATTICE}.expiry");
    preload(nats, &[("expiry", prefix.clone())], &[16]).await?;
    let (keys_loaded, bytes_loaded) = usage(nats).await?;
    anyhow::ensure!(
        keys_loaded as usize >= keys,
        "the provider restored {keys_loaded} keys of {keys}"
    );
    let base_keys = keys_loaded - keys as u64;
    let rss_loaded = super::memory::rss(pid)?;
    let client = wrpc_transport_nats::Client::new(nats.clone(), prefix.clone(), None).await?;
    let target = Target::Wrpc(std::sync::Arc::new(client));
    let until = |at: SystemTime| at.duration_since(SystemTime::now()).unwrap_or_default();
    let start_before = deadline - WINDOW - Duration::from_millis(300);
    anyhow::ensure!(
        SystemTime::now() < start_before,
        "the provider took too long to start: the deadline is too close"
    );
    tokio::time::sleep(until(start_before)).await;
    let before = window(&target).await;
    tokio::time::sleep(until(deadline)).await;
    let at_deadline = Instant::now();
    let watch = tokio::spawn({
        let nats = nats.clone();
        async move {
            loop {
                if let Ok((keys, _)) = usage(&nats).await {
                    if keys <= base_keys {
                        return at_deadline.elapsed().as_secs_f64();
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let after = window(&target).await;
    let reclaimed_seconds = tokio::time::timeout(Duration::from_secs(60), watch)
        .await
        .context("expired keys not reclaimed within 60 s")??;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, bytes_reclaimed) = usage(nats).await?;
    let rss_reclaimed = super::memory::rss(pid)?;
    Ok(Expiry {
        keys,
        before,
        after,
        reclaimed_seconds,
        rss_loaded,
        rss_reclaimed,
        bytes_loaded,
        bytes_reclaimed,
    })
}

/// Get and set at [`IN_FLIGHT`] each, at once, for [`WINDOW`].
async fn window(target: &Target) -> (Phase, Phase) {
    let seconds = WINDOW.as_secs_f64();
    tokio::join!(
        drive(target, Workload::Get(16), IN_FLIGHT, seconds),
        drive(target, Workload::Set(16), IN_FLIGHT, seconds),
    )
}

/// Keys and bytes the provider holds, from its health message.
async fn usage(nats: &async_nats::Client) -> anyhow::Result<(u64, u64)> {
    let message = super::shared::health(nats, "expiry").await?;
    let figure = |unit: &str| {
        message
            .split([',', ';'])
            .find_map(|part| part.trim().strip_suffix(unit)?.trim().parse::<u64>().ok())
            .with_context(|| format!("no {unit} in health: {message}"))
    };
    Ok((figure(" keys")?, figure(" bytes")?))
}
