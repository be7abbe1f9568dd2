//! Every task of `cargo xtask` and its options, declared in one place; each task's module
//! (`run.rs`, `bench/`, …) takes its options from here.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Tasks for building, running and testing keyvalue-inmemory.
#[derive(Parser)]
#[command(name = "cargo xtask", version)]
pub struct Cli {
    #[command(subcommand)]
    pub task: Task,
}

#[derive(Subcommand)]
pub enum Task {
    /// Run the provider as a wasmCloud host would, against a real nats-server.
    Run(Run),
    /// Run the whole test suite (provisions nats-server first).
    Test(Test),
    /// Everything CI checks, in CI's order: formatting, lints, config files, the test suite,
    /// the fuzz targets, the provider archive.
    Ci(Ci),
    /// Call a running provider over wRPC, as a linked component would.
    Call(Call),
    /// Build a signed provider archive (build/keyvalue-inmemory.par.gz) and check it.
    Par(Par),
    /// Refresh wit/deps from wit/deps.toml (network), or `--check` it against wit/deps.lock.
    Wit(Wit),
    /// Validate wit/, wasmcloud.toml, wadm.yaml, docker-compose.yml, Dockerfile, flake.nix.
    Check(Check),
    /// Bounded cargo-fuzz runs of the snapshot decoder and the engine (nightly).
    Fuzz(Fuzz),
    /// Start the docker-compose demo lattice and deploy wadm.yaml.
    Up(Up),
    /// Undeploy and stop the docker-compose demo lattice.
    Down(Up),
    /// Measure the provider against a minimal wRPC server and raw NATS (release builds).
    Bench(Bench),
    /// Print the path of a nats-server binary, installing one if none is found.
    NatsServer,
    /// Steps other tasks start as processes of their own; not for people.
    #[command(hide = true, subcommand)]
    Internal(Internal),
}

/// The hidden steps (`cargo xtask internal …`).
#[derive(Subcommand)]
pub enum Internal {
    /// The measuring part of `bench`, run from the release build.
    #[command(name = "bench-run")]
    Measure(Bench),
    /// The minimal wRPC server `bench` compares against.
    #[command(name = "bench-floor")]
    Floor {
        #[arg(long)]
        nats: String,
        #[arg(long)]
        prefix: String,
    },
    /// The raw NATS echo `bench` compares against.
    #[command(name = "bench-echo")]
    Echo {
        #[arg(long)]
        nats: String,
        #[arg(long)]
        subject: String,
    },
    /// Stand-ins for watching components (`bench`'s watch measurement): `watcher-0` … of
    /// `lattice`, each answering every call.
    #[command(name = "bench-watchers")]
    Watchers {
        #[arg(long)]
        nats: String,
        #[arg(long)]
        lattice: String,
        #[arg(long)]
        count: usize,
    },
}

/// Options of `cargo xtask ci`.
#[derive(clap::Args)]
pub struct Ci {
    /// Seconds each fuzz target runs.
    #[arg(long, default_value_t = 20)]
    pub fuzz_seconds: u64,
}

/// Simulates the host: host data on stdin, links, health, shutdown.
#[derive(clap::Args)]
pub struct Run {
    /// Use this NATS server instead of starting one (e.g. nats://127.0.0.1:4222).
    #[arg(long)]
    pub nats: Option<String>,
    /// Build and run the release binary.
    #[arg(long)]
    pub release: bool,
    /// Run this provider binary instead of building one (the Docker image does).
    #[arg(long, conflicts_with = "release")]
    pub binary: Option<std::path::PathBuf>,
    /// Lattice name (the host's `lattice_rpc_prefix`).
    #[arg(long, default_value = "default")]
    pub lattice: String,
    /// The provider's key in the lattice.
    #[arg(long, default_value = "keyvalue-inmemory")]
    pub provider_key: String,
    /// The component the demo link comes from.
    #[arg(long, default_value = "demo-component")]
    pub source: String,
    /// The `namespace` of the demo link.
    #[arg(long, default_value = "demo")]
    pub namespace: String,
    /// Provider config, `key=value`, repeatable (see README's config table).
    #[arg(long = "config", value_name = "KEY=VALUE")]
    pub config: Vec<String>,
}

/// Runs `cargo test --workspace` in the provider's workspace, then in e2e's (with
/// NATS_SERVER_BIN and KEYVALUE_PAR set).
#[derive(clap::Args)]
pub struct Test {
    /// Run only the real-lattice test (the e2e workspace); the arguments after `--` go to it.
    #[arg(long)]
    pub e2e_only: bool,
    /// Extra arguments for cargo test (after `--`), e.g. a test name filter.
    #[arg(last = true)]
    pub cargo_args: Vec<String>,
}

/// Calls the provider; prints the answer.
#[derive(clap::Args)]
pub struct Call {
    /// The NATS server of the lattice.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub nats: String,
    /// Lattice name.
    #[arg(long, default_value = "default")]
    pub lattice: String,
    /// The provider's key in the lattice.
    #[arg(long, default_value = "keyvalue-inmemory")]
    pub provider_key: String,
    /// The calling component (the `source-id` header).
    #[arg(long, default_value = "demo-component")]
    pub source: String,
    /// The link name (the `link-name` header).
    #[arg(long, default_value = "default")]
    pub link_name: String,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 5)]
    pub timeout: u64,
    #[command(subcommand)]
    pub op: Op,
}

/// Builds and checks the provider archive.
#[derive(clap::Args)]
pub struct Par {
    /// Package the release build (a debug binary is ~400 MB and slow to compress).
    #[arg(long)]
    pub release: bool,
    /// Directory the archive is written to.
    #[arg(long, default_value = "build")]
    pub out: PathBuf,
    /// Directory of the signing keys (issuer.nk, subject.nk), made on first use.
    #[arg(long, default_value = ".keys")]
    pub keys: PathBuf,
    /// Write `.par` instead of `.par.gz`.
    #[arg(long)]
    pub uncompressed: bool,
    /// Package this binary instead of building one (CI passes the one its tests built).
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Skip starting the extracted binary.
    #[arg(long)]
    pub no_start: bool,
}

#[derive(clap::Args)]
pub struct Wit {
    /// Verify offline instead of refreshing.
    #[arg(long)]
    pub check: bool,
}

#[derive(clap::Args)]
pub struct Check {}

#[derive(clap::Args)]
pub struct Fuzz {
    /// Seconds per target.
    #[arg(long, default_value_t = 30)]
    pub seconds: u64,
    /// Targets to run (default: all).
    pub targets: Vec<String>,
}

#[derive(clap::Args)]
pub struct Up {}

/// Options of `cargo xtask bench`.
#[derive(clap::Args, Clone)]
pub struct Bench {
    /// Seconds per phase.
    #[arg(long, default_value_t = 1.5)]
    pub seconds: f64,
    /// Rounds of each (workload, concurrency) pair; figures are medians.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Fewer workloads and concurrencies, for a quick look.
    #[arg(long)]
    pub quick: bool,
    /// Keys for the memory and list-keys measurement (0 skips it).
    #[arg(long, default_value_t = 1_000_000)]
    pub memory_keys: usize,
    /// Another provider binary to drive through the same client (e.g. keyvalue-redis).
    #[arg(long)]
    pub compare: Option<PathBuf>,
    /// Turn the provider's OTLP traces and metrics on, exporting to a sink in this process
    /// (to measure what telemetry costs).
    #[arg(long)]
    pub otel: bool,
    /// Provider config for --compare, `key=value`, repeatable.
    #[arg(long = "compare-config", value_name = "KEY=VALUE")]
    pub compare_config: Vec<String>,
    /// The link's target config for --compare, `key=value`, repeatable (e.g. keyvalue-nats:
    /// `bucket=…`, `cluster_uri=…`, `enable_bucket_auto_create=true`); `{nats}` in a value is
    /// replaced by the benchmark's NATS URL.
    #[arg(long = "compare-link-config", value_name = "KEY=VALUE")]
    pub compare_link_config: Vec<String>,
    /// For --compare with wasmCloud's keyvalue-redis provider: start a redis-server (Debian's,
    /// installed when missing, as root) on a free loopback port, persistence off, and pass its
    /// address as the provider's `URL` config.
    #[arg(long, requires = "compare")]
    pub redis: bool,
    /// Only the workloads whose name contains this (e.g. "get-many"), or the one named exactly
    /// so ("get-many 100"), to profile one.
    #[arg(long)]
    pub only: Option<String>,
    /// Only this concurrency.
    #[arg(long)]
    pub in_flight: Option<usize>,
    /// Sets of the cache workload (the store alone, eviction=lru, Zipf reads; 0 skips it).
    #[arg(long, default_value_t = 10_000_000)]
    pub cache_sets: u64,
    /// Keys that expire at once for the expiry-sweep measurement (0 skips it).
    #[arg(long, default_value_t = 1_000_000)]
    pub expiry_keys: usize,
    /// Rounds of the watch measurement (sets with 0, 1 and 16 watchers; 0 skips it).
    #[arg(long, default_value_t = 3)]
    pub watch_rounds: usize,
    /// Leave out the replicated targets (ours with `replication = "jetstream"`, with each
    /// read consistency) and the catch-up measurement.
    #[arg(long)]
    pub no_replication: bool,
    /// Keys a new replicated instance catches up on (0 skips it; `--quick`: at most 100,000).
    #[arg(long, default_value_t = 1_000_000)]
    pub catchup_keys: usize,
    /// list_page_size of the provider the list-keys pass runs against.
    #[arg(long, default_value_t = 1000)]
    pub list_page_size: usize,
    /// Sample the provider with `perf record` (cpu-clock, so it works without hardware
    /// counters) during the workload phases; the profile's top goes to
    /// target/bench/profile.txt. Installs Debian's linux-perf when missing (as root).
    #[arg(long)]
    pub perf: bool,
}

#[derive(clap::Subcommand)]
pub enum Op {
    /// store.get BUCKET KEY
    Get { bucket: String, key: String },
    /// store.set BUCKET KEY VALUE (the value as UTF-8 text)
    Set {
        bucket: String,
        key: String,
        value: String,
    },
    /// store.delete BUCKET KEY
    Delete { bucket: String, key: String },
    /// store.exists BUCKET KEY
    Exists { bucket: String, key: String },
    /// store.list-keys BUCKET [CURSOR]
    ListKeys { bucket: String, cursor: Option<u64> },
    /// atomics.increment BUCKET KEY DELTA
    Increment {
        bucket: String,
        key: String,
        delta: u64,
    },
    /// batch.get-many BUCKET KEY...
    GetMany { bucket: String, keys: Vec<String> },
    /// The provider's health answer
    Health,
}
