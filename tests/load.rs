//! Under load, against the real binary: a soak of mixed calls checked against a model, a
//! graceful stop (signal or host request) in the middle of a write flood, and the memory a
//! flood against `max_total_bytes` leaves the process holding.
//!
//! The soak's size is `SOAK_CALLS` (default 1,000,000); it prints its figures.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;

const C1: &str = "load-component";

/// xorshift64*: enough randomness for an op mix, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn headers() -> Option<async_nats::HeaderMap> {
    let mut h = async_nats::HeaderMap::new();
    h.insert("source-id", C1);
    h.insert("link-name", "default");
    Some(h)
}

#[derive(Default)]
struct Tally {
    calls: AtomicU64,
    timeouts: AtomicU64,
    failures: AtomicU64,
    wrong: AtomicU64,
}

/// One call with a timeout: `None` (counted) when it timed out or the transport failed.
async fn timed<T>(
    tally: &Tally,
    latencies: &mut Vec<u32>,
    call: impl std::future::Future<Output = anyhow::Result<T>>,
) -> Option<T> {
    let started = Instant::now();
    let result = tokio::time::timeout(CALL_TIMEOUT, call).await;
    latencies.push(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
    tally.calls.fetch_add(1, Ordering::Relaxed);
    match result {
        Err(_) => {
            tally.timeouts.fetch_add(1, Ordering::Relaxed);
            None
        }
        Ok(Err(err)) => {
            eprintln!("transport failure: {err:#}");
            tally.failures.fetch_add(1, Ordering::Relaxed);
            None
        }
        Ok(Ok(value)) => Some(value),
    }
}

fn check(tally: &Tally, ok: bool, what: impl FnOnce() -> String) {
    if !ok {
        let n = tally.wrong.fetch_add(1, Ordering::Relaxed);
        if n < 10 {
            eprintln!("wrong answer: {}", what());
        }
    }
}

/// One worker: its own keys (so its model is exact), plus a shared counter.
async fn worker(
    wrpc: Transport,
    id: u64,
    calls: u64,
    tally: Arc<Tally>,
    shared_increments: Arc<AtomicU64>,
) -> Vec<u32> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (id + 1).wrapping_mul(0x1234_5678_9abc_def1));
    let mut model: HashMap<String, Bytes> = HashMap::new();
    let mut counter = 0u64;
    let mut latencies = Vec::with_capacity(calls as usize);
    let key = |n: u64| format!("w{id}-k{n}");
    let counter_key = format!("w{id}-counter");
    let t = &*tally;
    for i in 0..calls {
        let n = rng.below(16);
        match rng.below(100) {
            0..=29 => {
                let k = key(n);
                if let Some(got) =
                    timed(t, &mut latencies, store::get(&wrpc, headers(), "soak", &k)).await
                {
                    let want = model.get(&k).cloned();
                    check(t, got.as_ref().ok() == Some(&want), || {
                        format!("get {k}: {got:?}, model {want:?}")
                    });
                }
            }
            30..=54 => {
                let k = key(n);
                let value =
                    Bytes::from(format!("{id}:{i}:{}", rng.next()).repeat(1 + (n as usize % 4)));
                if let Some(got) = timed(
                    t,
                    &mut latencies,
                    store::set(&wrpc, headers(), "soak", &k, &value),
                )
                .await
                {
                    check(t, got.is_ok(), || format!("set {k}: {got:?}"));
                    model.insert(k, value);
                }
            }
            55..=64 => {
                let k = key(n);
                if let Some(got) = timed(
                    t,
                    &mut latencies,
                    store::delete(&wrpc, headers(), "soak", &k),
                )
                .await
                {
                    check(t, got.is_ok(), || format!("delete {k}: {got:?}"));
                    model.remove(&k);
                }
            }
            65..=74 => {
                let k = key(n);
                if let Some(got) = timed(
                    t,
                    &mut latencies,
                    store::exists(&wrpc, headers(), "soak", &k),
                )
                .await
                {
                    let want = model.contains_key(&k);
                    check(t, got == Ok(want), || {
                        format!("exists {k}: {got:?}, model {want}")
                    });
                }
            }
            75..=84 => {
                let delta = 1 + rng.below(5);
                if let Some(got) = timed(
                    t,
                    &mut latencies,
                    atomics::increment(&wrpc, headers(), "soak", &counter_key, delta),
                )
                .await
                {
                    counter += delta;
                    check(t, got == Ok(counter), || {
                        format!("increment {counter_key}: {got:?}, model {counter}")
                    });
                }
            }
            85..=89 => {
                if let Some(got) = timed(
                    t,
                    &mut latencies,
                    atomics::increment(&wrpc, headers(), "soak", "shared-counter", 1),
                )
                .await
                {
                    check(t, got.is_ok(), || format!("shared increment: {got:?}"));
                    shared_increments.fetch_add(1, Ordering::Relaxed);
                }
            }
            90..=94 => {
                let keys: Vec<String> = (0..4).map(|j| key((n + j) % 16)).collect();
                let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
                if let Some(got) = timed(
                    t,
                    &mut latencies,
                    batch::get_many(&wrpc, headers(), "soak", &refs),
                )
                .await
                {
                    let want: Vec<Option<(String, Bytes)>> = keys
                        .iter()
                        .map(|k| model.get(k).map(|v| (k.clone(), v.clone())))
                        .collect();
                    check(t, got.as_ref().ok() == Some(&want), || {
                        format!("get-many {keys:?}: {got:?}")
                    });
                }
            }
            _ => {
                let pairs: Vec<(String, Bytes)> = (0..3)
                    .map(|j| (key((n + j) % 16), Bytes::from(format!("many {id} {i} {j}"))))
                    .collect();
                let refs: Vec<(&str, &Bytes)> =
                    pairs.iter().map(|(k, v)| (k.as_str(), v)).collect();
                if let Some(got) = timed(
                    t,
                    &mut latencies,
                    batch::set_many(&wrpc, headers(), "soak", &refs),
                )
                .await
                {
                    check(t, got.is_ok(), || format!("set-many: {got:?}"));
                    model.extend(pairs);
                }
            }
        }
    }
    latencies
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_of_mixed_calls_gets_every_answer_right() {
    let total: u64 = std::env::var("SOAK_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    const IN_FLIGHT: u64 = 256;
    let server = NatsServer::start();
    let p = Provider::start(&server, &[], &[(C1, "default", None)]).await;
    let tally = Arc::new(Tally::default());
    let shared = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..IN_FLIGHT)
        .map(|id| {
            let calls = total / IN_FLIGHT + u64::from(id < total % IN_FLIGHT);
            tokio::spawn(worker(
                p.wrpc.clone(),
                id,
                calls,
                tally.clone(),
                shared.clone(),
            ))
        })
        .collect();
    // A hang guard, far above the expected run time (minutes on a 2-core debug build).
    let all = tokio::time::timeout(
        Duration::from_secs(30 * 60),
        futures::future::join_all(workers),
    )
    .await
    .expect("the soak did not finish in 30 minutes");
    let elapsed = started.elapsed();
    let mut latencies: Vec<u32> = all
        .into_iter()
        .flat_map(|w| w.expect("worker panicked"))
        .collect();
    latencies.sort_unstable();

    let c = p.as_component(C1, "default");
    let shared_now = c.get("soak", "shared-counter").await.unwrap();
    let want = shared.load(Ordering::Relaxed);
    let calls = tally.calls.load(Ordering::Relaxed);
    eprintln!(
        "soak: {calls} calls at {IN_FLIGHT} in flight in {:.1} s = {:.0} calls/s; \
         latency p50 {} µs, p99 {} µs, p999 {} µs, max {} µs; timeouts {}, transport failures {}, wrong answers {}",
        elapsed.as_secs_f64(),
        calls as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 0.999),
        latencies.last().unwrap(),
        tally.timeouts.load(Ordering::Relaxed),
        tally.failures.load(Ordering::Relaxed),
        tally.wrong.load(Ordering::Relaxed),
    );
    assert_eq!(calls, total);
    assert_eq!(tally.timeouts.load(Ordering::Relaxed), 0, "calls timed out");
    assert_eq!(
        tally.failures.load(Ordering::Relaxed),
        0,
        "calls failed in transport"
    );
    assert_eq!(
        tally.wrong.load(Ordering::Relaxed),
        0,
        "answers differed from the model"
    );
    assert_eq!(
        shared_now,
        (want > 0).then(|| want.to_string().into_bytes()),
        "the shared counter lost or gained increments"
    );
}

/// Writes until told to stop; answers the keys whose `set` was answered Ok.
async fn write_flood(wrpc: Transport, id: usize, stop: Arc<AtomicBool>) -> Vec<String> {
    let mut acknowledged = Vec::new();
    let value = Bytes::from_static(b"v");
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("flood-{id}-{i}");
        i += 1;
        let call = store::set(&wrpc, headers(), "flood", &key, &value);
        match tokio::time::timeout(Duration::from_secs(3), call).await {
            Ok(Ok(Ok(()))) => acknowledged.push(key),
            // Sent after the provider stopped taking calls: no answer. That is the contract of
            // a stop; what matters is that nothing answered is lost.
            _ => break,
        }
    }
    acknowledged
}

async fn stop_during_flood(by_host_request: bool) {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv.snapshot");
    let path_str = path.to_str().unwrap().to_string();
    let config = [
        ("snapshot_path", path_str.as_str()),
        ("snapshot_interval_secs", "3600"),
    ];
    let mut p = Provider::start(&server, &config, &[(C1, "default", None)]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let floods: Vec<_> = (0..64)
        .map(|id| tokio::spawn(write_flood(p.wrpc.clone(), id, stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stopping = Instant::now();
    if by_host_request {
        let reply = p.request_shutdown().await;
        assert!(reply.contains("shutting down"), "{reply}");
    } else {
        p.signal("TERM");
    }
    let status = p.wait_exit().await;
    let stopped_in = stopping.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut acknowledged = Vec::new();
    for flood in floods {
        acknowledged.extend(flood.await.unwrap());
    }
    assert!(status.success(), "exit status {status}");
    assert!(
        acknowledged.len() > 100,
        "the flood barely ran: {}",
        acknowledged.len()
    );

    // Every write the provider answered is in its final snapshot.
    let p = Provider::start(&server, &config, &[(C1, "default", None)]).await;
    let listed: std::collections::HashSet<String> = p
        .as_component(C1, "default")
        .list_all("flood", 1000)
        .await
        .into_iter()
        .collect();
    let lost: Vec<_> = acknowledged
        .iter()
        .filter(|k| !listed.contains(*k))
        .collect();
    eprintln!(
        "stop by {}: {} writes acknowledged, stopped in {stopped_in:?}, {} lost",
        if by_host_request {
            "host request"
        } else {
            "SIGTERM"
        },
        acknowledged.len(),
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "acknowledged writes lost: {:?}",
        &lost[..lost.len().min(10)]
    );
}

#[tokio::test]
async fn the_host_shutdown_request_during_a_flood_is_answered_and_loses_no_answered_write() {
    stop_during_flood(true).await;
}

#[tokio::test]
async fn sigterm_during_a_flood_finishes_in_flight_calls_and_loses_no_answered_write() {
    stop_during_flood(false).await;
}

#[tokio::test]
async fn a_write_flood_against_max_total_bytes_keeps_rss_bounded() {
    const LIMIT: u64 = 64 << 20;
    let server = NatsServer::start();
    let limit = LIMIT.to_string();
    let p = Provider::start(
        &server,
        &[
            ("max_total_bytes", limit.as_str()),
            ("max_value_bytes", "65536"),
        ],
        &[(C1, "default", None)],
    )
    .await;
    let pid = p.pid();
    let idle = rss_bytes(pid);
    let value = Bytes::from(vec![7u8; 60 * 1024]);
    let refused = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    // 16 writers × 200 distinct keys × 60 KiB ≈ 188 MiB offered: three times the limit.
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let (wrpc, value, refused, accepted) = (
                p.wrpc.clone(),
                value.clone(),
                refused.clone(),
                accepted.clone(),
            );
            tokio::spawn(async move {
                for i in 0..200 {
                    let key = format!("big-{w}-{i}");
                    let call = store::set(&wrpc, headers(), "flood", &key, &value);
                    match tokio::time::timeout(CALL_TIMEOUT, call).await {
                        Ok(Ok(Ok(()))) => accepted.fetch_add(1, Ordering::Relaxed),
                        Ok(Ok(Err(_))) => refused.fetch_add(1, Ordering::Relaxed),
                        other => panic!("call failed: {other:?}"),
                    };
                }
            })
        })
        .collect();
    let mut peak = idle;
    let sampler = {
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let handle = tokio::spawn(async move {
            let mut peak = 0;
            while !d.load(Ordering::Relaxed) {
                peak = peak.max(rss_bytes(pid));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            peak
        });
        (done, handle)
    };
    for w in writers {
        w.await.unwrap();
    }
    sampler.0.store(true, Ordering::Relaxed);
    peak = peak.max(sampler.1.await.unwrap()).max(rss_bytes(pid));
    let health = p.wait_for_health(|_| true).await;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "max_total_bytes flood: {} accepted, {} refused; RSS idle {:.1} MiB, peak {:.1} MiB = \
         idle + limit + {:.1} MiB; {health}",
        accepted.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        mib(idle),
        mib(peak),
        mib(peak.saturating_sub(idle + LIMIT)),
    );
    assert!(
        refused.load(Ordering::Relaxed) > 0,
        "the limit was never reached"
    );
    // The bound README documents: idle + max_total_bytes + 64 MiB (request buffers of the
    // calls in flight, allocator slack).
    assert!(
        peak <= idle + LIMIT + (64 << 20),
        "RSS peaked at {:.1} MiB, over idle {:.1} + limit {:.1} + 64 MiB",
        mib(peak),
        mib(idle),
        mib(LIMIT)
    );
}
