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
//! wit-bindgen-wrpc 0.10 generates); calls it loses (the host's client drops some under load: README, "Known upstream problems") are counted per phase as
//! `lost`, each one stalling its worker for the call timeout.
//!
//! One file a part: `workload.rs` (what is asked), `targets.rs` (the processes asked),
//! `driver.rs` (the workers and the rounds), `memory.rs` (memory per key, a full listing),
//! `profile.rs` (`--perf`), `report.rs` (the tables), `floor.rs` (the floor and the echo),
//! `cache.rs`, `expiry.rs` and `watch.rs` (eviction, the expiry sweep, sets under watchers),
//! `catchup.rs` (replication's staleness and a new instance's catch-up),
//! `shared.rs` (what they share).

mod cache;
mod catchup;
mod driver;
mod expiry;
mod floor;
mod memory;
mod profile;
mod report;
mod shared;
mod targets;
mod watch;
mod workload;

use std::process::{Command, ExitCode};

use serde_json::json;

use crate::process::{cargo, root, run_command};
use crate::{flags, nats};

/// Entry from `cargo xtask bench`: builds release binaries and re-runs itself in release.
pub fn run(_checked: flags::Bench) -> anyhow::Result<ExitCode> {
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
        .args(["internal", "bench-run"])
        .args(std::env::args().skip_while(|arg| arg != "bench").skip(1));
    run_command(&mut command)?;
    Ok(ExitCode::SUCCESS)
}

/// Entry of the release build: measures and writes the report.
pub fn run_release(args: flags::Bench) -> anyhow::Result<ExitCode> {
    keyvalue_inmemory::client::drops::install();
    tokio::runtime::Runtime::new()?.block_on(measure(args))
}

async fn measure(args: flags::Bench) -> anyhow::Result<ExitCode> {
    let server = nats::start_server()?;
    let url = server.url();
    let binary = root().join("target/release/keyvalue-inmemory");
    let nats = async_nats::connect(&url).await?;
    let targets = targets::start(&args, &url, &nats, &binary).await?;
    let sizes = workload::sizes(&args);
    workload::preload(&nats, &targets.prefixes, sizes).await?;
    let plan = workload::plan(&args, sizes)?;
    let profiler = match args.perf {
        true => Some(profile::Profiler::start(targets.ours_pid)?),
        false => None,
    };
    let order: Vec<&str> = targets.prefixes.iter().map(|(name, _)| *name).collect();
    let results =
        driver::rounds(&args, &plan, &order, &targets.clients, &targets.echo, &nats).await;
    if let Some(profiler) = profiler {
        profiler.finish()?;
    }
    let lags = catchup::lags(&nats).await;
    drop(targets.children);
    let mut memory = Vec::new();
    if args.memory_keys > 0 {
        let (keys, page) = (args.memory_keys, args.list_page_size);
        let off = ("off", json!({ "namespace": "bench" }));
        let on = (
            "ttl_secs + eviction=lru",
            json!({ "namespace": "bench", "ttl_secs": "3600", "eviction": "lru" }),
        );
        for link in [off, on] {
            memory.push(memory::measure(&binary, &url, &nats, keys, page, link).await?);
        }
    }
    let cache = match args.cache_sets {
        0 => None,
        // `--quick`: a million sets, enough to fill the cache twice.
        sets => Some(cache::run(if args.quick {
            sets.min(1_000_000)
        } else {
            sets
        })),
    };
    let expiry = match args.expiry_keys {
        0 => None,
        keys => Some(expiry::measure(&binary, &url, &nats, keys).await?),
    };
    let watch = match (args.watch_rounds, args.quick) {
        (0, _) => Vec::new(),
        (rounds, quick) => {
            let rounds = if quick { 1 } else { rounds };
            watch::measure(&binary, &url, &nats, args.seconds, rounds).await?
        }
    };
    let catchup = match (args.no_replication, args.catchup_keys) {
        (true, _) | (_, 0) => None,
        (false, keys) => {
            let keys = if args.quick { keys.min(100_000) } else { keys };
            Some(catchup::measure(&binary, &url, &nats, keys).await?)
        }
    };
    report::write(
        &args,
        &results,
        &memory,
        cache.as_ref(),
        expiry.as_ref(),
        &watch,
        (&lags, catchup.as_ref()),
    )?;
    Ok(ExitCode::SUCCESS)
}

/// Entry of the `internal bench-floor` helper.
pub fn floor(nats: &str, prefix: &str) -> anyhow::Result<ExitCode> {
    tokio::runtime::Runtime::new()?.block_on(floor::serve_wrpc(nats, prefix))?;
    Ok(ExitCode::SUCCESS)
}

/// Entry of the `internal bench-watchers` helper.
pub fn watchers(nats: &str, lattice: &str, count: usize) -> anyhow::Result<ExitCode> {
    tokio::runtime::Runtime::new()?.block_on(watch::serve_stand_ins(nats, lattice, count))?;
    Ok(ExitCode::SUCCESS)
}

/// Entry of the `internal bench-echo` helper.
pub fn echo(nats: &str, subject: &str) -> anyhow::Result<ExitCode> {
    tokio::runtime::Runtime::new()?.block_on(floor::serve_echo(nats, subject))?;
    Ok(ExitCode::SUCCESS)
}
