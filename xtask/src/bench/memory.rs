//! Memory per key and a full list-keys pass: a fresh provider loaded with `--memory-keys` keys.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use keyvalue_inmemory::client::{batch, store, Transport};
use serde_json::json;

use super::shared::{Killed, LATTICE};
use super::workload::cx;
use crate::run;

/// Resident memory of a process, in bytes.
pub fn rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")?;
    Ok(kib * 1024)
}

pub struct Memory {
    /// What the link asked for ("off", or expiry and eviction on).
    pub label: &'static str,
    pub keys: usize,
    pub rss_before: u64,
    pub rss_after: u64,
    pub list_seconds: f64,
    /// The first call: it snapshots and sorts the bucket's keys.
    pub first_page_seconds: f64,
    pub page_size: usize,
    pub listed: usize,
}

/// RSS per key after loading `keys` keys (16 B keys, 100 B values) into a fresh provider
/// through a link with `link_config`, and the time of one full list-keys pass over them.
pub async fn measure(
    binary: &std::path::Path,
    url: &str,
    nats: &async_nats::Client,
    keys: usize,
    page_size: usize,
    (label, link_config): (&'static str, serde_json::Value),
) -> anyhow::Result<Memory> {
    let config = json!({ "max_keys": "100000000", "max_total_bytes": "17179869184", "list_page_size": page_size.to_string() });
    // Killed on every way out, errors included.
    let mut provider = Killed(vec![run::start_provider_linked(
        binary,
        url,
        LATTICE,
        "memory",
        config.as_object().cloned().unwrap_or_default(),
        vec![run::link_definition(
            "bench-component",
            "memory",
            link_config,
        )],
        json!({}),
    )?]);
    let child = &mut provider.0[0];
    run::wait_for_health(nats, LATTICE, "memory", child).await?;
    let kv = Transport {
        nats: nats.clone(),
        prefix: format!("{LATTICE}.memory"),
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = rss(child.id())?;
    let value = Bytes::from(vec![b'x'; 100]);
    eprintln!("loading {keys} keys (16 B keys, 100 B values), {label}…");
    for start in (0..keys).step_by(1000) {
        let names: Vec<String> = (start..(start + 1000).min(keys))
            .map(|i| format!("key-{i:012}"))
            .collect();
        let pairs: Vec<(&str, &Bytes)> = names.iter().map(|k| (k.as_str(), &value)).collect();
        tokio::time::timeout(
            Duration::from_secs(10),
            batch::set_many(&kv, cx(), "mem", &pairs),
        )
        .await
        .context("load timed out")??
        .map_err(|e| anyhow::anyhow!("load: {e:?}"))?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_after = rss(child.id())?;
    eprintln!("listing every key…");
    let started = Instant::now();
    let mut cursor = None;
    let mut listed = 0;
    let mut first_page = None;
    loop {
        let page = tokio::time::timeout(
            Duration::from_secs(30),
            store::list_keys(&kv, cx(), "mem", cursor),
        )
        .await
        .context("list-keys timed out")??
        .map_err(|e| anyhow::anyhow!("list-keys: {e:?}"))?;
        listed += page.keys.len();
        first_page.get_or_insert_with(|| started.elapsed().as_secs_f64());
        match page.cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    let list_seconds = started.elapsed().as_secs_f64();
    drop(provider);
    Ok(Memory {
        label,
        keys,
        rss_before,
        rss_after,
        list_seconds,
        first_page_seconds: first_page.unwrap_or(list_seconds),
        page_size,
        listed,
    })
}
