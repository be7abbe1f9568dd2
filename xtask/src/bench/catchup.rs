//! Replication beyond call rates: how stale the replicated targets' memory was (their health's
//! apply lag, from stored in JetStream to applied), and how long a new instance takes to catch
//! up with a stream of many keys before it answers health.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use keyvalue_inmemory::client::{batch, Transport};
use serde_json::json;

use super::shared::{health, Killed, BUCKET, LATTICE};
use super::targets::{REPLICATED, REPLICATED_LOCAL};
use super::workload::cx;
use crate::run;

/// The apply lag each replicated target reports (`p50 … µs, p99 … µs`), by target.
pub async fn lags(nats: &async_nats::Client) -> Vec<(&'static str, String)> {
    let mut lags = Vec::new();
    for name in [REPLICATED, REPLICATED_LOCAL] {
        if let Ok(message) = health(nats, name).await {
            if let Some((_, lag)) = message.split_once("apply lag ") {
                let lag = lag.split(';').next().unwrap_or_default().trim().to_owned();
                lags.push((name, lag));
            }
        }
    }
    lags
}

/// What the catch-up measurement found.
pub struct CatchUp {
    pub keys: usize,
    /// Loading them through the first instance.
    pub load_seconds: f64,
    /// From the second instance's start to its first health answer.
    pub seconds: f64,
}

/// Loads `keys` keys (16 B values) into a replicated provider, then starts a second instance
/// of it and times its catch-up.
pub async fn measure(
    binary: &Path,
    url: &str,
    nats: &async_nats::Client,
    keys: usize,
) -> anyhow::Result<CatchUp> {
    const NAME: &str = "catchup";
    let config = json!({
        "max_keys": "10000000",
        "max_total_bytes": "8589934592",
        "replication": "jetstream",
    });
    let config = config.as_object().cloned().unwrap_or_default();
    let links = [("bench-component", "bench")];
    let mut children = Killed(Vec::new());
    let mut first = run::start_provider(
        binary,
        url,
        LATTICE,
        NAME,
        config.clone(),
        &links,
        json!({}),
    )?;
    let ready = run::wait_for_health(nats, LATTICE, NAME, &mut first).await;
    children.0.push(first);
    ready?;
    let kv = Transport {
        nats: nats.clone(),
        prefix: format!("{LATTICE}.{NAME}"),
    };
    let value = Bytes::from_static(b"0123456789abcdef");
    let began = Instant::now();
    let names: Vec<String> = (0..keys).map(|i| format!("catchup-{i:08}")).collect();
    let chunks: Vec<&[String]> = names.chunks(1000).collect();
    // Eight batches in flight.
    for group in chunks.chunks(8) {
        let calls = group.iter().map(|chunk| {
            let pairs: Vec<(&str, &Bytes)> = chunk.iter().map(|k| (k.as_str(), &value)).collect();
            let kv = &kv;
            async move {
                tokio::time::timeout(
                    Duration::from_secs(30),
                    batch::set_many(kv, cx(), BUCKET, &pairs),
                )
                .await
                .context("loading timed out")??
                .map_err(|e| anyhow::anyhow!("loading: {e:?}"))
            }
        });
        for loaded in futures::future::join_all(calls).await {
            loaded?;
        }
    }
    let load_seconds = began.elapsed().as_secs_f64();
    // The first instance applies its own writes as they come back from the stream: let it
    // finish, so that the second one's catch-up is measured alone.
    let settled = Instant::now();
    while !health(nats, NAME)
        .await
        .is_ok_and(|h| h.contains(&format!(" {keys} keys,")))
    {
        anyhow::ensure!(
            settled.elapsed() < Duration::from_secs(300),
            "the first instance did not apply its writes within 300 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = Instant::now();
    let mut second = run::start_provider(
        binary,
        url,
        LATTICE,
        NAME,
        config,
        &links,
        json!({ "instance_id": "second" }),
    )?;
    // Both instances answer health: ask until the second one does.
    let seconds = loop {
        if let Ok(message) = health(nats, NAME).await {
            if message.contains("instance second,") {
                anyhow::ensure!(
                    message.contains(&format!(" {keys} keys,")),
                    "the second instance answered health before catching up: {message}"
                );
                break started.elapsed().as_secs_f64();
            }
        }
        anyhow::ensure!(second.try_wait()?.is_none(), "the second instance exited");
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(300),
            "the second instance did not answer health within 300 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    children.0.push(second);
    Ok(CatchUp {
        keys,
        load_seconds,
        seconds,
    })
}
