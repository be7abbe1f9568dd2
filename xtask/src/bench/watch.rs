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
use keyvalue_inmemory::watch::Totals;
use serde_json::json;

use super::driver::{drive, Phase};
use super::shared::{Killed, LATTICE};
use super::workload::{Target, Workload};
use crate::run;

/// Who watches, in a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Watching {
    /// `n` stand-ins answering every call.
    Answering(usize),
    /// `n` stand-ins that never answer: their queues fill and every later event is dropped
    /// at the write, which is then all that watching costs the write path.
    Stalled(usize),
}

impl Watching {
    pub fn label(self) -> String {
        match self {
            Watching::Answering(n) => n.to_string(),
            Watching::Stalled(n) => format!("{n} stalled"),
        }
    }

    /// The stand-in components linked as watchers, and their watch link config.
    fn components(self) -> Vec<(String, serde_json::Value)> {
        match self {
            Watching::Answering(n) => (0..n)
                .map(|i| (format!("watcher-{i}"), json!({ "watch": "SET@*" })))
                .collect(),
            Watching::Stalled(n) => (0..n)
                .map(|i| {
                    let config = json!({ "watch": "SET@*", "watch_timeout_ms": "600000" });
                    (format!("stalled-{i}"), config)
                })
                .collect(),
        }
    }
}

/// The rows of each round, and calls in flight.
pub const WATCHING: [Watching; 4] = [
    Watching::Answering(0),
    Watching::Answering(1),
    Watching::Answering(16),
    Watching::Stalled(16),
];
pub const IN_FLIGHT: [usize; 2] = [1, 256];
const STAND_INS: usize = 16;

const PROVIDER: &str = "watch";

/// The stand-ins' CPU priority: they play the host the watching components run on, which a
/// lattice runs beside the provider's, not in its place; on this bench's 2 cores at the same
/// priority, their share of the CPU would be measured as the provider's write path.
const STAND_IN_NICE: i32 = 10;

/// One phase, and what the events of its sets came to.
pub struct Row {
    pub watching: Watching,
    pub in_flight: usize,
    pub phase: Phase,
    /// (delivered, dropped, failed) during the phase and until its queues drained (a stalled
    /// row's: during the phase).
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
    let mut components: Vec<String> = Vec::new();
    for i in 0..STAND_INS {
        components.push(format!("watcher-{i}"));
        components.push(format!("stalled-{i}"));
    }
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
    let count = STAND_INS.to_string();
    provider.0.push(super::targets::helper_niced(
        &[
            "internal",
            "bench-watchers",
            "--nats",
            url,
            "--lattice",
            LATTICE,
            "--count",
            &count,
        ],
        STAND_IN_NICE,
    )?);
    let prefix = format!("{LATTICE}.{PROVIDER}");
    let client = wrpc_transport_nats::Client::new(nats.clone(), prefix, None).await?;
    let target = Target::Wrpc(std::sync::Arc::new(client));
    let mut linked = Vec::new();
    let mut rows = Vec::new();
    for round in 0..rounds {
        for in_flight in IN_FLIGHT {
            let mut order = WATCHING.to_vec();
            if round % 2 == 1 {
                order.reverse();
            }
            for watching in order {
                relink(nats, &mut linked, watching).await?;
                let before = events(nats).await?;
                let phase = drive(&target, Workload::Set(16), in_flight, seconds).await;
                let after = match watching {
                    // Delivery of the phase's events ends before the next phase starts.
                    Watching::Answering(_) => wait_until_drained(nats).await?,
                    // Its calls never end; relinking for the next row halts them.
                    Watching::Stalled(_) => events(nats).await?,
                };
                let row = Row {
                    watching,
                    in_flight,
                    events: (after.0 - before.0, after.1 - before.1, after.2 - before.2),
                    phase,
                };
                eprintln!(
                    "watch round {} K={in_flight:<3} {:>10} watchers {:>9.0} sets/s  p50 {:>6.0} µs  lost {}  events delivered {} dropped {} failed {}",
                    round + 1,
                    watching.label(),
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
    relink(nats, &mut linked, Watching::Answering(0)).await?;
    Ok(rows)
}

/// The helper process: `count` answering stand-ins (`watcher-0` …) and `count` stalled ones
/// (`stalled-0` …), serving until killed.
pub async fn serve_stand_ins(nats: &str, lattice: &str, count: usize) -> anyhow::Result<()> {
    let nats = async_nats::connect(nats).await?;
    let mut stand_ins = Vec::with_capacity(2 * count);
    for i in 0..count {
        let answering = format!("watcher-{i}");
        stand_ins.push(Watcher::serve_counting(nats.clone(), lattice, &answering).await?);
        let stalled =
            Watcher::serve_counting(nats.clone(), lattice, &format!("stalled-{i}")).await?;
        stalled.stall(true);
        stand_ins.push(stalled);
    }
    println!("ready");
    std::future::pending::<()>().await;
    Ok(())
}

/// Puts and deletes watch links until exactly the components of `watching` watch.
async fn relink(
    nats: &async_nats::Client,
    linked: &mut Vec<String>,
    watching: Watching,
) -> anyhow::Result<()> {
    let subject = |op: &str| format!("wasmbus.rpc.{LATTICE}.{PROVIDER}.linkdefs.{op}");
    let wanted = watching.components();
    // Deletes first, counted, then puts, counted: a health answer can overtake link changes
    // queued before it, and 16 stalled for 16 answering keeps the count.
    let kept: Vec<String> = (linked.iter())
        .filter(|c| wanted.iter().any(|(w, _)| w == *c))
        .cloned()
        .collect();
    for component in linked.iter().filter(|c| !kept.contains(c)) {
        let link = test_support::host::watch_link(PROVIDER, component, "default", json!({}));
        nats.publish(subject("del"), link.to_string().into())
            .await?;
    }
    wait_for_watchers(nats, kept.len()).await?;
    for (component, config) in &wanted {
        if !kept.contains(component) {
            let link =
                test_support::host::watch_link(PROVIDER, component, "default", config.clone());
            nats.publish(subject("put"), link.to_string().into())
                .await?;
        }
    }
    *linked = wanted.into_iter().map(|(c, _)| c).collect();
    wait_for_watchers(nats, linked.len()).await?;
    // A deleted watcher's queue is counted (as dropped) once it halted, just after.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

/// Waits (up to 10 s) until the provider counts `n` watchers.
async fn wait_for_watchers(nats: &async_nats::Client, n: usize) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while totals(nats).await?.watchers != n {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the provider never counted {n} watchers"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Waits (up to 60 s) until no event is queued; answers the event figures then.
async fn wait_until_drained(nats: &async_nats::Client) -> anyhow::Result<(u64, u64, u64)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let t = totals(nats).await?;
        if t.queued == 0 {
            return Ok((t.delivered, t.dropped, t.failed));
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
    let t = totals(nats).await?;
    Ok((t.delivered, t.dropped, t.failed))
}

/// The watch figures of the provider's health.
async fn totals(nats: &async_nats::Client) -> anyhow::Result<Totals> {
    let message = super::shared::health(nats, PROVIDER).await?;
    Totals::read(&message).with_context(|| format!("no watch figures in health: {message}"))
}
