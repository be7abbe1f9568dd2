//! Driving a workload: `inflight` workers calling a target for a phase's seconds, each call
//! under a timeout, and the rounds that alternate which target goes first.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use keyvalue_inmemory::transport::Figures;

use super::shared::CALL_TIMEOUT;
use super::workload::{one_call, Target, Workload};
use crate::flags;

/// What a phase measured.
#[derive(Clone, Default)]
pub struct Phase {
    pub calls: u64,
    pub errors: u64,
    pub lost: u64,
    /// Handshakes and other messages the client dropped during the phase (see drops.rs).
    pub client_drops: (u64, u64),
    /// What our provider's transport counted in the phase (from its health figures), when
    /// the target was ours.
    pub covered: Option<Figures>,
    pub seconds: f64,
    pub latencies_us: Vec<u32>,
}

impl Phase {
    pub fn calls_per_sec(&self) -> f64 {
        self.calls as f64 / self.seconds
    }

    pub fn percentile(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        // `drive` leaves the latencies sorted.
        let i = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        f64::from(self.latencies_us[i])
    }
}

/// Each phase of a run, by (workload, concurrency) and target name.
pub type Results<'a> = BTreeMap<(Workload, usize), BTreeMap<&'a str, Vec<Phase>>>;

/// Runs `plan` `args.rounds` times against every target in `order_of` (the echo workload
/// against the echo only), reversing that order every other round; prints each phase as it
/// ends.
pub async fn rounds<'a>(
    args: &flags::Bench,
    plan: &[(Workload, usize)],
    order_of: &[&'a str],
    targets: &'a BTreeMap<&'a str, Target>,
    echo: &Target,
    nats: &async_nats::Client,
) -> Results<'a> {
    let total = plan.len() * args.rounds;
    let mut results: Results<'a> = BTreeMap::new();
    let mut done = 0;
    for round in 0..args.rounds {
        for &(workload, k) in plan {
            done += 1;
            let mut order: Vec<&str> = if workload == Workload::Echo {
                vec!["echo"]
            } else {
                order_of.to_vec()
            };
            if round % 2 == 1 {
                order.reverse();
            }
            for name in order.into_iter().filter(|name| runs(name, workload, k)) {
                let target = if name == "echo" { echo } else { &targets[name] };
                let before = if name == "ours" {
                    covered(nats).await
                } else {
                    None
                };
                let mut phase = drive(target, workload, k, args.seconds).await;
                if let Some(before) = before {
                    phase.covered = covered(nats).await.map(|after| after.since(before));
                }
                let figures = phase.covered.unwrap_or_default();
                eprintln!(
                    "[{done}/{total}] round {} {:<24} K={k:<3} {name:<7} {:>9.0} calls/s  p50 {:>6.0} µs  lost {}  client dropped {} handshakes, {} others  provider resent {}: {} recovered, {} spurious",
                    round + 1,
                    workload.name(),
                    phase.calls_per_sec(),
                    phase.percentile(0.5),
                    phase.lost,
                    phase.client_drops.0,
                    phase.client_drops.1,
                    figures.resent,
                    figures.recovered,
                    figures.spurious,
                );
                results
                    .entry((workload, k))
                    .or_default()
                    .entry(name)
                    .or_default()
                    .push(phase);
            }
        }
    }
    results
}

/// Whether target `name` runs `workload` at `k` in flight: ours with expiry and eviction on
/// ("cache") runs only get and set at 1 and 256, against ours with them off; ours replicated
/// runs 16 B gets and sets, increments and get-many 100 at 1 and 256 (with local reads: the
/// reads only, its writes being the same).
fn runs(name: &str, workload: Workload, k: usize) -> bool {
    use super::targets::{REPLICATED, REPLICATED_LOCAL};
    let ends = k == 1 || k == 256;
    match name {
        "cache" => matches!(workload, Workload::Get(_) | Workload::Set(_)) && ends,
        REPLICATED => {
            let write = matches!(workload, Workload::Set(16) | Workload::Increment);
            ends && (write || matches!(workload, Workload::Get(16) | Workload::GetMany(100)))
        }
        REPLICATED_LOCAL => ends && matches!(workload, Workload::Get(16) | Workload::GetMany(100)),
        _ => true,
    }
}

/// Our provider's transport figures, from its health message.
async fn covered(nats: &async_nats::Client) -> Option<Figures> {
    Figures::read(&super::shared::health(nats, "ours").await.ok()?)
}

/// `inflight` workers calling for `seconds`.
pub async fn drive(target: &Target, workload: Workload, inflight: usize, seconds: f64) -> Phase {
    let duration = Duration::from_secs_f64(seconds);
    let drops_before = keyvalue_inmemory::client::drops::dropped();
    let start = Instant::now();
    let deadline = start + duration;
    let workers: Vec<_> = (0..inflight)
        .map(|w| {
            let target = target.clone();
            tokio::spawn(async move {
                let mut phase = Phase::default();
                let mut i = w as u64 * 7919;
                while Instant::now() < deadline {
                    let t0 = Instant::now();
                    match tokio::time::timeout(CALL_TIMEOUT, one_call(&target, workload, i)).await {
                        Ok(Ok(true)) => {
                            phase.calls += 1;
                            phase
                                .latencies_us
                                .push(t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                        }
                        Ok(_) => phase.errors += 1,
                        Err(_) => phase.lost += 1,
                    }
                    i += 1;
                }
                phase
            })
        })
        .collect();
    let mut total = Phase::default();
    for worker in workers {
        if let Ok(phase) = worker.await {
            total.calls += phase.calls;
            total.errors += phase.errors;
            total.lost += phase.lost;
            total.latencies_us.extend(phase.latencies_us);
        }
    }
    total.seconds = start.elapsed().as_secs_f64();
    total.latencies_us.sort_unstable();
    // Late answers to calls already counted lost also land here; phases run one at a time.
    let drops_after = keyvalue_inmemory::client::drops::dropped();
    total.client_drops = (
        drops_after.0 - drops_before.0,
        drops_after.1 - drops_before.1,
    );
    total
}
