//! `cargo xtask bench`: the provider against its floors, in one run, as ratios.
//!
//! Builds release binaries, then (in the release build of this tool, so the load generator is
//! not the bottleneck) starts a nats-server, the provider, a minimal wRPC server of the same
//! WIT on the host's stack and a raw NATS echo, each a process of its own, and drives each
//! workload at each concurrency against the provider and its floor in turn, alternating
//! which goes first, over several rounds. Each figure is the median of the rounds. Then it
//! measures memory per key and a full list-keys pass at 1M keys.
//!
//! The load generator is the host's client stack (wrpc-transport-nats 0.29 and the bindings
//! wit-bindgen-wrpc 0.10 generates); calls it loses (CONTRACT.md §7) are counted per phase as
//! `lost`, each one stalling its worker for the call timeout.

mod floor;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use keyvalue_inmemory::client::{atomics, batch, component_headers, store, Transport};
use keyvalue_inmemory::transport::Figures;
use serde_json::json;

use crate::{cargo, nats, root, run, run_command};

/// Options of `cargo xtask bench`.
#[derive(clap::Args, Clone)]
pub struct Args {
    /// Seconds per phase.
    #[arg(long, default_value_t = 1.5)]
    seconds: f64,
    /// Rounds of each (workload, concurrency) pair; figures are medians.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Fewer workloads and concurrencies, for a quick look.
    #[arg(long)]
    quick: bool,
    /// Keys for the memory and list-keys measurement (0 skips it).
    #[arg(long, default_value_t = 1_000_000)]
    memory_keys: usize,
    /// Another provider binary to drive through the same client (e.g. keyvalue-redis).
    #[arg(long)]
    compare: Option<PathBuf>,
    /// Turn the provider's OTLP traces and metrics on, exporting to a sink in this process
    /// (to measure what telemetry costs).
    #[arg(long)]
    otel: bool,
    /// Provider config for --compare, `key=value`, repeatable.
    #[arg(long = "compare-config", value_name = "KEY=VALUE")]
    compare_config: Vec<String>,
    /// The link's target config for --compare, `key=value`, repeatable (e.g. keyvalue-nats:
    /// `bucket=…`, `cluster_uri=…`, `enable_bucket_auto_create=true`); `{nats}` in a value is
    /// replaced by the benchmark's NATS URL.
    #[arg(long = "compare-link-config", value_name = "KEY=VALUE")]
    compare_link_config: Vec<String>,
    /// For --compare with wasmCloud's keyvalue-redis provider: start a redis-server (Debian's,
    /// installed when missing, as root) on a free loopback port, persistence off, and pass its
    /// address as the provider's `URL` config.
    #[arg(long, requires = "compare")]
    redis: bool,
    /// Only the workloads whose name contains this (e.g. "get-many"), to profile one.
    #[arg(long)]
    only: Option<String>,
    /// Only this concurrency.
    #[arg(long)]
    in_flight: Option<usize>,
    /// list_page_size of the provider the list-keys pass runs against.
    #[arg(long, default_value_t = 1000)]
    list_page_size: usize,
    /// Sample the provider with `perf record` (cpu-clock, so it works without hardware
    /// counters) during the workload phases; the profile's top goes to
    /// target/bench/profile.txt. Installs Debian's linux-perf when missing (as root).
    #[arg(long)]
    perf: bool,
}

/// The lattice all benchmark processes join.
const LATTICE: &str = "bench";
/// The bucket every call names: the link's name, which is what wasmCloud's keyvalue-nats
/// provider takes a bucket to be (ours and keyvalue-redis accept any).
const BUCKET: &str = "default";
/// Per-call timeout: a call not answered by then counts as lost.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Entry from `cargo xtask bench`: builds release binaries and re-runs itself in release.
pub fn run(_checked: Args) -> anyhow::Result<ExitCode> {
    run_command(cargo().current_dir(root()).args([
        "build",
        "--release",
        "--package",
        "keyvalue-inmemory",
        "--package",
        "xtask",
    ]))?;
    // The release build parses the same options: hand it this command's, as given (clap has
    // already checked them here).
    let mut command = Command::new(root().join("target/release/xtask"));
    command
        .arg("bench-run")
        .args(std::env::args().skip_while(|arg| arg != "bench").skip(1));
    run_command(&mut command)?;
    Ok(ExitCode::SUCCESS)
}

/// One workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Workload {
    Get(usize),
    Set(usize),
    Increment,
    /// get-many of this many keys.
    GetMany(usize),
    /// set-many of this many 16 B values.
    SetMany(usize),
    Echo,
}

impl Workload {
    fn name(self) -> String {
        match self {
            Workload::Get(size) => format!("get {}", size_name(size)),
            Workload::Set(size) => format!("set {}", size_name(size)),
            Workload::Increment => "increment (16 hot keys)".into(),
            Workload::GetMany(n) => format!("get-many {n}"),
            Workload::SetMany(n) => format!("set-many {n}"),
            Workload::Echo => "NATS request/reply".into(),
        }
    }

    /// Key operations per call.
    fn keys_per_call(self) -> u64 {
        match self {
            Workload::GetMany(n) | Workload::SetMany(n) => n as u64,
            _ => 1,
        }
    }
}

fn size_name(size: usize) -> String {
    if size >= 1024 {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}

/// Keys preloaded for the get workloads of a value size.
fn preloaded(size: usize) -> usize {
    if size > 4096 {
        1000
    } else {
        10_000
    }
}

/// What a phase measured.
#[derive(Clone, Default)]
struct Phase {
    calls: u64,
    errors: u64,
    lost: u64,
    /// Handshakes and other messages the client dropped during the phase (see drops.rs).
    client_drops: (u64, u64),
    /// What our provider's transport counted in the phase (from its health figures), when
    /// the target was ours.
    covered: Option<Figures>,
    seconds: f64,
    latencies_us: Vec<u32>,
}

impl Phase {
    fn calls_per_sec(&self) -> f64 {
        self.calls as f64 / self.seconds
    }

    fn percentile(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        // `drive` leaves the latencies sorted.
        let i = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        f64::from(self.latencies_us[i])
    }
}

/// Where calls go: a provider (ours, the floor, --compare) or the echo.
#[derive(Clone)]
enum Target {
    Wrpc(Arc<wrpc_transport_nats::Client>),
    Echo(async_nats::Client),
}

fn cx() -> Option<async_nats::HeaderMap> {
    Some(component_headers("bench-component", "default"))
}

async fn one_call(target: &Target, workload: Workload, i: u64) -> anyhow::Result<bool> {
    let wrpc = match target {
        Target::Wrpc(wrpc) => wrpc.as_ref(),
        Target::Echo(nats) => {
            nats.request("bench.echo", Bytes::from_static(b"0123456789abcdef"))
                .await?;
            return Ok(true);
        }
    };
    Ok(match workload {
        Workload::Get(size) => {
            let key = format!("s{size}-k{}", i % preloaded(size) as u64);
            store::get(wrpc, cx(), BUCKET, &key).await?.is_ok()
        }
        Workload::Set(size) => {
            let key = format!("s{size}-k{}", i % preloaded(size) as u64);
            store::set(wrpc, cx(), BUCKET, &key, &Bytes::from(vec![b'v'; size]))
                .await?
                .is_ok()
        }
        Workload::Increment => {
            let key = format!("hot-{}", i % 16);
            atomics::increment(wrpc, cx(), BUCKET, &key, 1)
                .await?
                .is_ok()
        }
        Workload::GetMany(n) => {
            let n = n as u64;
            let keys: Vec<String> = (0..n)
                .map(|j| format!("s16-k{}", (i * n + j) % 10_000))
                .collect();
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            batch::get_many(wrpc, cx(), BUCKET, &keys).await?.is_ok()
        }
        Workload::SetMany(n) => {
            let n = n as u64;
            let keys: Vec<String> = (0..n)
                .map(|j| format!("many-{}", (i * n + j) % 10_000))
                .collect();
            let value = Bytes::from_static(b"0123456789abcdef");
            let pairs: Vec<(&str, &Bytes)> = keys.iter().map(|k| (k.as_str(), &value)).collect();
            batch::set_many(wrpc, cx(), BUCKET, &pairs).await?.is_ok()
        }
        Workload::Echo => unreachable!(),
    })
}

/// Our provider's transport figures, from its health message.
async fn covered(nats: &async_nats::Client) -> Option<Figures> {
    let subject = format!("wasmbus.rpc.{LATTICE}.ours.health");
    let reply = tokio::time::timeout(Duration::from_secs(2), nats.request(subject, "{}".into()))
        .await
        .ok()?
        .ok()?;
    let health: serde_json::Value = serde_json::from_slice(&reply.payload).ok()?;
    Figures::read(health["message"].as_str()?)
}

/// `inflight` workers calling for `seconds`.
async fn drive(target: &Target, workload: Workload, inflight: usize, seconds: f64) -> Phase {
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

fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// A helper process of this binary (`bench-floor` / `bench-echo`), up once it prints "ready".
fn helper(args: &[&str]) -> anyhow::Result<Child> {
    use std::io::BufRead as _;
    let mut child = Command::new(std::env::current_exe()?)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start a benchmark helper")?;
    let stdout = child.stdout.take().context("helper stdout")?;
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    anyhow::ensure!(line.trim() == "ready", "helper {args:?} did not start");
    Ok(child)
}

struct Killed(Vec<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Entry of the release build: measures and writes the report.
pub fn run_release(args: Args) -> anyhow::Result<ExitCode> {
    keyvalue_inmemory::client::drops::install();
    tokio::runtime::Runtime::new()?.block_on(measure(args))
}

async fn measure(args: Args) -> anyhow::Result<ExitCode> {
    let server = nats::Server::start()?;
    let url = server.url();
    let binary = root().join("target/release/keyvalue-inmemory");
    let limits = json!({
        "max_keys": "10000000",
        "max_total_bytes": "8589934592",
        "list_page_size": "1000",
    });
    let nats = async_nats::connect(&url).await?;
    let mut children = Killed(Vec::new());
    let config = limits.as_object().cloned().unwrap_or_default();
    let links = [("bench-component", "bench")];
    let otel = if args.otel {
        let sink = otlp_sink().await?;
        json!({ "otel_config": { "enable_observability": true, "observability_endpoint": sink, "protocol": "Http" } })
    } else {
        json!({})
    };
    let mut ours = run::start_provider(&binary, &url, LATTICE, "ours", config, &links, otel)?;
    let health = run::wait_for_health(&nats, LATTICE, "ours", &mut ours).await;
    let ours_pid = ours.id();
    children.0.push(ours);
    health?;
    children.0.push(helper(&[
        "bench-floor",
        "--nats",
        &url,
        "--prefix",
        &format!("{LATTICE}.floor"),
    ])?);
    children.0.push(helper(&[
        "bench-echo",
        "--nats",
        &url,
        "--subject",
        "bench.echo",
    ])?);
    let mut targets: Vec<(&str, String)> = vec![
        ("ours", format!("{LATTICE}.ours")),
        ("floor", format!("{LATTICE}.floor")),
    ];
    if let Some(bin) = &args.compare {
        let mut config = serde_json::Map::new();
        if args.redis {
            let port = nats::free_port()?;
            let redis = crate::tools::apt("redis-server", "redis-server")?;
            children.0.push(
                Command::new(redis)
                    .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                    .args(["--save", "", "--appendonly", "no"])
                    .stdout(Stdio::null())
                    .spawn()
                    .context("cannot start redis-server")?,
            );
            wait_for_port(port).await?;
            config.insert("URL".into(), format!("redis://127.0.0.1:{port}/").into());
        }
        for pair in &args.compare_config {
            let (k, v) = pair
                .split_once('=')
                .context("--compare-config takes KEY=VALUE")?;
            config.insert(k.into(), v.into());
        }
        let mut host_data = json!({ "log_level": "error" });
        if !args.compare_link_config.is_empty() {
            let mut target_config = serde_json::Map::new();
            for pair in &args.compare_link_config {
                let (k, v) = pair
                    .split_once('=')
                    .context("--compare-link-config takes KEY=VALUE")?;
                target_config.insert(k.into(), v.replace("{nats}", &url).into());
            }
            host_data["link_definitions"] = json!([run::link_definition(
                links[0].0,
                "compare",
                target_config.into()
            )]);
        }
        // keyvalue-redis 0.30 logs a WARN on every call that names a bucket; at that rate the
        // logging alone would cost it throughput, so its level is `error` (ours logs nothing
        // per call at its default level).
        let mut compare =
            run::start_provider(bin, &url, LATTICE, "compare", config, &links, host_data)?;
        let health = run::wait_for_health(&nats, LATTICE, "compare", &mut compare).await;
        children.0.push(compare);
        health?;
        targets.push(("compare", format!("{LATTICE}.compare")));
    }
    let mut clients = BTreeMap::new();
    for (name, prefix) in &targets {
        let client = wrpc_transport_nats::Client::new(nats.clone(), prefix.clone(), None).await?;
        clients.insert(*name, Target::Wrpc(Arc::new(client)));
    }
    let echo = Target::Echo(nats.clone());

    // Preload the keys the get workloads read, through the race-free client.
    let sizes: &[usize] = if args.quick {
        &[16]
    } else {
        &[16, 1024, 65536]
    };
    for (name, prefix) in &targets {
        let kv = Transport {
            nats: nats.clone(),
            prefix: prefix.clone(),
        };
        for &size in sizes {
            let per_call = (256 * 1024 / size).clamp(1, 1000);
            let value = Bytes::from(vec![b'v'; size]);
            let keys: Vec<String> = (0..preloaded(size))
                .map(|i| format!("s{size}-k{i}"))
                .collect();
            for chunk in keys.chunks(per_call) {
                let pairs: Vec<(&str, &Bytes)> =
                    chunk.iter().map(|k| (k.as_str(), &value)).collect();
                tokio::time::timeout(
                    Duration::from_secs(10),
                    batch::set_many(&kv, cx(), BUCKET, &pairs),
                )
                .await
                .with_context(|| format!("preloading {name} timed out"))??
                .map_err(|e| anyhow::anyhow!("preloading {name}: {e:?}"))?;
            }
        }
    }

    let inflights: &[usize] = if args.quick {
        &[1, 256]
    } else {
        &[1, 16, 64, 256]
    };
    let mut plan: Vec<(Workload, usize)> = Vec::new();
    for &size in sizes {
        for &k in inflights {
            plan.push((Workload::Get(size), k));
            plan.push((Workload::Set(size), k));
        }
    }
    for &k in inflights {
        plan.push((Workload::Increment, k));
        plan.push((Workload::GetMany(100), k));
        plan.push((Workload::SetMany(100), k));
        plan.push((Workload::Echo, k));
    }
    // Per-call overhead against per-key work: the same batch calls, 10× the keys.
    for &k in inflights.iter().filter(|&&k| k >= 16) {
        plan.push((Workload::GetMany(1000), k));
        plan.push((Workload::SetMany(1000), k));
    }
    if let Some(only) = &args.only {
        plan.retain(|(w, _)| w.name().contains(only.as_str()));
        anyhow::ensure!(!plan.is_empty(), "--only {only:?} matches no workload");
    }
    if let Some(k) = args.in_flight {
        plan.retain(|&(_, inflight)| inflight == k);
        anyhow::ensure!(
            !plan.is_empty(),
            "--in-flight {k}: not one of the concurrencies run"
        );
    }
    let total = plan.len() * args.rounds;
    let profiler = if args.perf {
        Some(Profiler::start(ours_pid)?)
    } else {
        None
    };
    let mut results: BTreeMap<(Workload, usize), BTreeMap<&str, Vec<Phase>>> = BTreeMap::new();
    let mut done = 0;
    for round in 0..args.rounds {
        for &(workload, k) in &plan {
            done += 1;
            let mut order: Vec<&str> = if workload == Workload::Echo {
                vec!["echo"]
            } else {
                targets.iter().map(|(n, _)| *n).collect()
            };
            if round % 2 == 1 {
                order.reverse();
            }
            for name in order {
                let target = if name == "echo" {
                    &echo
                } else {
                    &clients[name]
                };
                let before = if name == "ours" {
                    covered(&nats).await
                } else {
                    None
                };
                let mut phase = drive(target, workload, k, args.seconds).await;
                if let Some(before) = before {
                    phase.covered = covered(&nats).await.map(|after| after.since(before));
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

    if let Some(profiler) = profiler {
        profiler.finish()?;
    }
    let memory = if args.memory_keys > 0 {
        Some(memory_and_listing(&binary, &url, &nats, args.memory_keys, args.list_page_size).await?)
    } else {
        None
    };
    drop(children);
    report(&args, &results, memory)?;
    Ok(ExitCode::SUCCESS)
}

/// Waits until something listens on a loopback port.
async fn wait_for_port(port: u16) -> anyhow::Result<()> {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("nothing listens on 127.0.0.1:{port} after 5 s")
}

/// `perf record` attached to the provider.
struct Profiler {
    perf: PathBuf,
    record: Child,
    data: PathBuf,
}

impl Profiler {
    fn start(pid: u32) -> anyhow::Result<Self> {
        let perf = crate::tools::apt("perf", "linux-perf")?;
        let dir = root().join("target/bench");
        std::fs::create_dir_all(&dir)?;
        let data = dir.join("perf.data");
        let record = Command::new(&perf)
            .args([
                "record",
                "-F",
                "999",
                "-e",
                "cpu-clock",
                "-p",
                &pid.to_string(),
                "-o",
            ])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start perf record")?;
        Ok(Self { perf, record, data })
    }

    /// Stops recording (SIGINT, so perf writes its file) and writes the profile's top:
    /// samples by binary, then by function.
    fn finish(mut self) -> anyhow::Result<()> {
        run_command(Command::new("kill").args(["-INT", &self.record.id().to_string()]))?;
        self.record.wait()?;
        let mut text = String::new();
        for (sort, limit) in [("dso", "1"), ("dso,sym", "0.4")] {
            let out = Command::new(&self.perf)
                .args(["report", "--stdio", "--no-children", "--sort", sort])
                .args(["--percent-limit", limit, "-i"])
                .arg(&self.data)
                .stderr(Stdio::null())
                .output()
                .context("cannot run perf report")?;
            text.push_str(&String::from_utf8_lossy(&out.stdout));
        }
        let path = root().join("target/bench/profile.txt");
        std::fs::write(&path, text)?;
        eprintln!("provider profile: {}", path.display());
        Ok(())
    }
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")?;
    Ok(kib * 1024)
}

struct Memory {
    keys: usize,
    rss_before: u64,
    rss_after: u64,
    list_seconds: f64,
    /// The first call: it snapshots and sorts the bucket's keys.
    first_page_seconds: f64,
    page_size: usize,
    listed: usize,
}

/// RSS per key after loading `keys` keys (16 B keys, 100 B values) into a fresh provider, and
/// the time of one full list-keys pass over them.
async fn memory_and_listing(
    binary: &std::path::Path,
    url: &str,
    nats: &async_nats::Client,
    keys: usize,
    page_size: usize,
) -> anyhow::Result<Memory> {
    let config = json!({ "max_keys": "100000000", "max_total_bytes": "17179869184", "list_page_size": page_size.to_string() });
    // Killed on every way out, errors included.
    let mut provider = Killed(vec![run::start_provider(
        binary,
        url,
        LATTICE,
        "memory",
        config.as_object().cloned().unwrap_or_default(),
        &[("bench-component", "bench")],
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
    eprintln!("loading {keys} keys (16 B keys, 100 B values)…");
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
        keys,
        rss_before,
        rss_after,
        list_seconds,
        first_page_seconds: first_page.unwrap_or(list_seconds),
        page_size,
        listed,
    })
}

fn report(
    args: &Args,
    results: &BTreeMap<(Workload, usize), BTreeMap<&str, Vec<Phase>>>,
    memory: Option<Memory>,
) -> anyhow::Result<()> {
    let mut md = String::new();
    let mut rows = Vec::new();
    md.push_str(&format!(
        "Command: `cargo xtask bench {}` ({} s a phase, {} rounds, medians; machine: {} cores).\n\n",
        // The options `cargo xtask bench` was given (and passed on to `bench-run`).
        std::env::args().skip(2).collect::<Vec<_>>().join(" "),
        args.seconds,
        args.rounds,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    ));
    md.push_str("| workload | in flight | ours calls/s | floor calls/s | ours / floor | ours p50 / p99 / p999 µs | floor p50 / p99 / p999 µs | key-ops/s (ours) | lost (ours, floor) | handshakes the client dropped (ours, floor) | ours resent / recovered / spurious | other messages the client dropped (ours, floor) |\n");
    md.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for ((workload, k), by_target) in results {
        let stat = |name: &str, f: &dyn Fn(&Phase) -> f64| {
            by_target
                .get(name)
                .map(|v| median(v.iter().map(f).collect()))
        };
        // Median of the per-round ratios of two targets' rates.
        let ratio_of = |a: &str, b: &str| match (by_target.get(a), by_target.get(b)) {
            (Some(a), Some(b)) => Some(median(
                a.iter()
                    .zip(b)
                    .map(|(x, y)| x.calls_per_sec() / y.calls_per_sec())
                    .collect(),
            )),
            _ => None,
        };
        let ratio = ratio_of("ours", "floor");
        let main = if *workload == Workload::Echo {
            "echo"
        } else {
            "ours"
        };
        let rate = stat(main, &|p| p.calls_per_sec()).unwrap_or(f64::NAN);
        let floor_rate = stat("floor", &|p| p.calls_per_sec());
        let pct = |name: &str| {
            let p = |q: f64| stat(name, &|ph| ph.percentile(q)).unwrap_or(f64::NAN);
            (p(0.5), p(0.99), p(0.999))
        };
        let (o50, o99, o999) = pct(main);
        let (f50, f99, f999) = pct("floor");
        let sum = |name: &str, f: fn(&Phase) -> u64| {
            by_target
                .get(name)
                .map_or(0, |v| v.iter().map(f).sum::<u64>())
        };
        let lost = |name: &str| sum(name, |p| p.lost);
        let drops = |name: &str| {
            (
                sum(name, |p| p.client_drops.0),
                sum(name, |p| p.client_drops.1),
            )
        };
        // What our provider covered for, over the rounds.
        let covered = (by_target.get(main).into_iter().flatten())
            .filter_map(|p| p.covered)
            .fold(Figures::default(), |total, p| total + p);
        let covered_cell = if *workload == Workload::Echo {
            String::new()
        } else {
            format!(
                "{} / {} / {}",
                covered.resent, covered.recovered, covered.spurious
            )
        };
        md.push_str(&format!(
            "| {} | {k} | {rate:.0} | {} | {} | {o50:.0} / {o99:.0} / {o999:.0} | {} | {:.0} | {}, {} | {}, {} | {covered_cell} | {}, {} |\n",
            workload.name(),
            floor_rate.map_or("".into(), |r| format!("{r:.0}")),
            ratio.map_or("".into(), |r| format!("{r:.2}")),
            if floor_rate.is_some() { format!("{f50:.0} / {f99:.0} / {f999:.0}") } else { String::new() },
            rate * workload.keys_per_call() as f64,
            lost(main),
            lost("floor"),
            drops(main).0,
            drops("floor").0,
            drops(main).1,
            drops("floor").1,
        ));
        let compare = stat("compare", &|p| p.calls_per_sec());
        rows.push(json!({
            "workload": workload.name(), "in_flight": k, "calls_per_sec": rate, "floor_calls_per_sec": floor_rate,
            "ratio_to_floor": ratio, "p50_us": o50, "p99_us": o99, "p999_us": o999,
            "floor_p50_us": f50, "key_ops_per_sec": rate * workload.keys_per_call() as f64,
            "lost": lost(main), "floor_lost": lost("floor"), "compare_calls_per_sec": compare, "ratio_to_compare": ratio_of("ours", "compare"),
            "client_dropped_handshakes": drops(main).0, "floor_client_dropped_handshakes": drops("floor").0,
            "client_dropped_others": drops(main).1, "floor_client_dropped_others": drops("floor").1,
            "handshakes_resent": covered.resent, "calls_recovered": covered.recovered,
            "resends_spurious": covered.spurious,
        }));
        if let Some(c) = compare {
            let (c50, c99, c999) = pct("compare");
            md.push_str(&format!(
                "| ↳ --compare | {k} | {c:.0} | | ours / compare: **{:.2}** | {c50:.0} / {c99:.0} / {c999:.0} | | {:.0} | {} | | | |\n",
                ratio_of("ours", "compare").unwrap_or(f64::NAN),
                c * workload.keys_per_call() as f64,
                lost("compare")
            ));
        }
    }
    let mut memory_json = serde_json::Value::Null;
    if let Some(m) = memory {
        let per_key = (m.rss_after.saturating_sub(m.rss_before)) as f64 / m.keys as f64;
        md.push_str(&format!(
            "\nMemory: {} keys of 16 B with 100 B values: RSS {:.1} MiB → {:.1} MiB, **{per_key:.0} B per key**.  \n\
             list-keys full pass over them (page {}): **{:.2} s** ({} keys listed; first page {:.0} ms, \
             then {:.2} ms a page).\n",
            m.keys,
            m.rss_before as f64 / 1048576.0,
            m.rss_after as f64 / 1048576.0,
            m.page_size,
            m.list_seconds,
            m.listed,
            m.first_page_seconds * 1e3,
            (m.list_seconds - m.first_page_seconds) * 1e3
                / (m.listed.div_ceil(m.page_size).saturating_sub(1).max(1)) as f64,
        ));
        memory_json = json!({ "keys": m.keys, "rss_before": m.rss_before, "rss_after": m.rss_after, "bytes_per_key": per_key, "list_keys_full_pass_seconds": m.list_seconds, "list_keys_first_page_seconds": m.first_page_seconds, "list_page_size": m.page_size, "listed": m.listed });
    }
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("report.md"), &md)?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&json!({ "rows": rows, "memory": memory_json }))?,
    )?;
    println!("{md}");
    eprintln!("written to target/bench/report.md and report.json");
    Ok(())
}

/// An OTLP/HTTP sink: answers every request 200 and keeps nothing. Enough for an exporter to
/// do all its work, and cheap. Answers its endpoint URL.
async fn otlp_sink() -> anyhow::Result<String> {
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut stream = tokio::io::BufReader::new(stream);
                loop {
                    let mut length = 0usize;
                    loop {
                        let mut line = String::new();
                        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some((name, value)) = line.split_once(':') {
                            if name.eq_ignore_ascii_case("content-length") {
                                length = value.trim().parse().unwrap_or(0);
                            }
                        }
                    }
                    let mut body = vec![0; length];
                    if stream.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                    if stream.get_mut().write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(endpoint)
}

/// Entry of the `bench-floor` helper.
pub fn floor(nats: &str, prefix: &str) -> anyhow::Result<ExitCode> {
    tokio::runtime::Runtime::new()?.block_on(floor::serve_wrpc(nats, prefix))?;
    Ok(ExitCode::SUCCESS)
}

/// Entry of the `bench-echo` helper.
pub fn echo(nats: &str, subject: &str) -> anyhow::Result<ExitCode> {
    tokio::runtime::Runtime::new()?.block_on(floor::serve_echo(nats, subject))?;
    Ok(ExitCode::SUCCESS)
}
