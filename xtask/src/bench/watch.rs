//! Set throughput while components watch the written keys: one provider, sets of 16 B values
//! at 1 and 256 in flight with 0, 1 and 16 watchers (each a stand-in component,
//! `client::watcher`, linked with `watch=SET@*`, answering every call as the host does; all of
//! them in one helper process, the watchers' host), in turn, the order reversed every other
//! round. Each watcher is told of every set, so 16
//! watchers mean 16 calls out for each call in. Reports each row's median rate, its median
//! ratio to the same round's rate with no watcher, and what became of the events.

use std::time::Duration;

use anyhow::Context as _;
use keyvalue_inmemory::client::watcher::Watcher;
use serde_json::json;

use super::driver::{drive, Phase};
use super::shared::{Killed, LATTICE};
use super::workload::{Target, Workload};
use crate::run;

/// Watchers of each row, and calls in flight.
pub const WATCHERS: [usize; 3] = [0, 1, 16];
pub const IN_FLIGHT: [usize; 2] = [1, 256];

const PROVIDER: &str = "watch";

/// One phase, and what the events of its sets came to.
pub struct Row {
    pub watchers: usize,
    pub in_flight: usize,
    pub phase: Phase,
    /// (delivered, dropped, failed) during the phase and until its queues drained.
    pub events: (u64, u64, u64),
}

pub async fn measure(
    binary: &std::path::Path,
    url: &str,
    nats: &async_nats::Client,
    seconds: f64,
    rounds: usize,
) -> anyhow::Result<Vec<Row>> {
    let config = json!({ "max_keys": "10000000", "max_total_bytes": "8589934592" });
    let components: Vec<String> = (0..WATCHERS[2]).map(|i| format!("watcher-{i}")).collect();
    // The writer and every watcher share the namespace `bench`.
    let mut links = vec![("bench-component", "bench")];
    links.extend(components.iter().map(|c| (c.as_str(), "bench")));
    let mut provider = Killed(vec![run::start_provider(
        binary,
        url,
        LATTICE,
        PROVIDER,
        config.as_object().cloned().unwrap_or_default(),
        &links,
        json!({}),
    )?]);
    run::wait_for_health(nats, LATTICE, PROVIDER, &mut provider.0[0]).await?;
    let count = WATCHERS[2].to_string();
    provider.0.push(super::targets::helper(&[
        "internal",
        "bench-watchers",
        "--nats",
        url,
        "--lattice",
        LATTICE,
        "--count",
        &count,
    ])?);
    let prefix = format!("{LATTICE}.{PROVIDER}");
    let client = wrpc_transport_nats::Client::new(nats.clone(), prefix, None).await?;
    let target = Target::Wrpc(std::sync::Arc::new(client));
    let mut linked = 0;
    let mut rows = Vec::new();
    for round in 0..rounds {
        for in_flight in IN_FLIGHT {
            let mut order = WATCHERS.to_vec();
            if round % 2 == 1 {
                order.reverse();
            }
            for watchers in order {
                relink(nats, &components, &mut linked, watchers).await?;
                let before = events(nats).await?;
                let phase = drive(&target, Workload::Set(16), in_flight, seconds).await;
                // Delivery of the phase's events ends before the next phase starts.
                let after = wait_until_drained(nats).await?;
                let row = Row {
                    watchers,
                    in_flight,
                    events: (after.0 - before.0, after.1 - before.1, after.2 - before.2),
                    phase,
                };
                eprintln!(
                    "watch round {} K={in_flight:<3} {watchers:>2} watchers {:>9.0} sets/s  p50 {:>6.0} µs  lost {}  events delivered {} dropped {} failed {}",
                    round + 1,
                    row.phase.calls_per_sec(),
                    row.phase.percentile(0.5),
                    row.phase.lost,
                    row.events.0,
                    row.events.1,
                    row.events.2,
                );
                rows.push(row);
            }
        }
    }
    Ok(rows)
}

/// The helper process: `count` stand-ins, serving until killed.
pub async fn serve_stand_ins(nats: &str, lattice: &str, count: usize) -> anyhow::Result<()> {
    let nats = async_nats::connect(nats).await?;
    let mut stand_ins = Vec::with_capacity(count);
    for i in 0..count {
        let component = format!("watcher-{i}");
        stand_ins.push(Watcher::serve_counting(nats.clone(), lattice, &component).await?);
    }
    println!("ready");
    std::future::pending::<()>().await;
    Ok(())
}

/// Puts or deletes watch links until `want` of the components watch.
async fn relink(
    nats: &async_nats::Client,
    components: &[String],
    linked: &mut usize,
    want: usize,
) -> anyhow::Result<()> {
    let subject = |op: &str| format!("wasmbus.rpc.{LATTICE}.{PROVIDER}.linkdefs.{op}");
    while *linked < want {
        let link = test_support::host::watch_link(
            PROVIDER,
            &components[*linked],
            "default",
            json!({ "watch": "SET@*" }),
        );
        nats.publish(subject("put"), link.to_string().into())
            .await?;
        *linked += 1;
    }
    while *linked > want {
        *linked -= 1;
        let link =
            test_support::host::watch_link(PROVIDER, &components[*linked], "default", json!({}));
        nats.publish(subject("del"), link.to_string().into())
            .await?;
    }
    let expect = format!(" {want} watchers,");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !health(nats).await?.contains(&expect) {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the provider never counted {want} watchers"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Waits (up to 60 s) until no event is queued; answers the event figures then.
async fn wait_until_drained(nats: &async_nats::Client) -> anyhow::Result<(u64, u64, u64)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if health(nats).await?.contains(" 0 queued;") {
            return events(nats).await;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "watch queues did not drain in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// (delivered, dropped, failed) events so far, from health.
async fn events(nats: &async_nats::Client) -> anyhow::Result<(u64, u64, u64)> {
    let message = health(nats).await?;
    let figure = |what: &str| {
        let events = message
            .split_once("watch events: ")
            .map_or("", |(_, rest)| rest);
        events
            .split([',', ';'])
            .find_map(|part| part.trim().strip_suffix(what)?.trim().parse::<u64>().ok())
            .with_context(|| format!("no{what} events in health: {message}"))
    };
    Ok((
        figure(" delivered")?,
        figure(" dropped")?,
        figure(" failed")?,
    ))
}

async fn health(nats: &async_nats::Client) -> anyhow::Result<String> {
    let subject = format!("wasmbus.rpc.{LATTICE}.{PROVIDER}.health");
    let reply = tokio::time::timeout(Duration::from_secs(2), nats.request(subject, "{}".into()))
        .await
        .context("health timed out")??;
    let health: serde_json::Value = serde_json::from_slice(&reply.payload)?;
    Ok(health["message"].as_str().unwrap_or_default().to_owned())
}
