//! keyvalue-inmemory: a wasmCloud 1.x capability provider serving an in-memory key-value store
//! over wRPC (`wrpc:keyvalue/{store,atomics,batch}@0.2.0-draft`).
//!
//! The host starts the binary with host data on stdin; we join the lattice over NATS, take
//! links and config on the SDK's control subjects, and answer `wasi:keyvalue` calls that the
//! host forwards from components.
//!
//! # Layout
//!
//! - [`engine`]: the store itself: namespaces → buckets → keys in DashMaps, limits, counters,
//!   paged listing. No wRPC or NATS types.
//! - [`config`]: provider config keys, defaults and parsing.
//! - [`links`]: active links and the namespace each one's calls use.
//! - [`provider`]: the SDK control-plane callbacks and the generated wRPC handler traits.
//! - [`serve`]: the routing table of served functions; accepting invocations, one task each,
//!   with bounded parameter reading; the span and metrics of each call.
//! - [`transport`]: our serving side of wRPC over NATS, which covers for the handshakes and
//!   results the host's client drops.
//! - [`wire`]: reading parameters without trusting the lengths they declare.
//! - [`budget`]: what calls in flight may hold (bytes, calls), in all and per component.
//! - [`snapshot`]: the snapshot file format, writer, verifying reader and restore.
//! - [`telemetry`]: logs, OTLP traces and metrics as the host configures them.
//! - [`client`]: a race-free wRPC client of the same interfaces, for tests and tools.
//! - [`bindings`]: what `wit_bindgen_wrpc::generate!` makes of `wit/` (world `provider`).
//! - [`run`]: start-up and shutdown, called by `main.rs`.

pub mod budget;
pub mod client;
pub mod config;
pub mod engine;
pub mod links;
pub mod provider;
pub mod serve;
pub mod snapshot;
pub mod telemetry;
pub mod transport;
pub mod wire;

/// Bindings generated from `wit/` (world `provider`).
pub mod bindings {
    wit_bindgen_wrpc::generate!({ world: "provider", generate_all });
}

use std::time::Duration;

use anyhow::Context as _;
use tracing::{info, warn};

pub use provider::KvProvider;

/// The name the provider reports to the lattice.
pub const NAME: &str = "keyvalue-inmemory";

/// Runs the provider as the host starts it: host data from stdin, control plane through the
/// SDK, data plane through [`serve::Server`]. Answers after a host shutdown request, SIGTERM or
/// SIGINT, once in-flight calls finished.
pub async fn run() -> anyhow::Result<()> {
    let host_data = check_host_data()?;
    let (snapshots, problems) = snapshot::Settings::from_config(&host_data.config);
    let telemetry = telemetry::init(host_data)?;
    for problem in problems {
        warn!("{problem}");
    }
    let (served, snapshot_finished) = serve_until_stopped(snapshots).await;
    if let Err(err) = &served {
        tracing::error!("{err:#}");
    }
    telemetry.shutdown().await;
    if !snapshot_finished {
        // The write still runs on a blocking thread, which the runtime would wait for on its
        // way out, without bound (a hung filesystem): leave now; the last complete snapshot
        // stays in place.
        std::process::exit(1);
    }
    served
}

/// Serves until stopped; answers how serving ended and whether the final snapshot (if any)
/// finished in time.
async fn serve_until_stopped(snapshots: Option<snapshot::Settings>) -> (anyhow::Result<()>, bool) {
    match serve(snapshots).await {
        Ok((served, provider)) => {
            let finished = provider.write_final_snapshot().await;
            (served, finished)
        }
        Err(err) => (Err(err), true),
    }
}

/// Starts, serves until stopped, and hands back the provider for its final snapshot.
async fn serve(
    snapshots: Option<snapshot::Settings>,
) -> anyhow::Result<(anyhow::Result<()>, KvProvider)> {
    let provider = KvProvider::new(config::Config::default(), snapshots);
    // Restore before the SDK answers its first health check.
    if let Some(settings) = provider.snapshots() {
        restore(&provider, settings).await?;
        provider.mark_snapshot_current();
    }
    telemetry::register_usage_gauges(&provider);
    let control = wasmcloud_provider_sdk::run_provider(provider.clone(), NAME)
        .await
        .context("failed to start the provider")?;
    let connection = wasmcloud_provider_sdk::get_connection();
    // Subscribe the data plane before the control loop first runs: the host (and our tests)
    // take the first health answer to mean calls can be sent.
    let prefix = format!("{}.{}", connection.lattice, connection.provider_key());
    let server =
        serve::Server::subscribe((*connection.nats).clone(), &prefix, provider.clone()).await?;
    connection
        .nats
        .flush()
        .await
        .context("failed to flush the data-plane subscriptions")?;
    let periodic = provider
        .snapshots()
        .map(|settings| tokio::spawn(snapshot_periodically(provider.clone(), settings.interval)));
    let serving = server.run();
    tokio::pin!(control, serving);
    let served = tokio::select! {
        () = &mut control => { info!("control loop ended"); None }
        () = stop_signal() => { info!("stop signal received"); None }
        // Serving ends on its own only after `Provider::shutdown` (a host request, through
        // `control`): let the SDK send its reply (after the final snapshot, which
        // `Provider::shutdown` waits for) before the process goes.
        served = &mut serving => {
            let wait = provider::FINAL_SNAPSHOT_WAIT + Duration::from_secs(5);
            if tokio::time::timeout(wait, &mut control).await.is_err() {
                warn!("control loop did not end after shutdown");
            }
            Some(served)
        }
    };
    let served = match served {
        Some(served) => served,
        None => {
            provider.stop();
            let served = serving.await;
            if tokio::time::timeout(Duration::from_secs(2), connection.nats.flush())
                .await
                .is_err()
            {
                warn!("NATS flush timed out");
            }
            served
        }
    };
    // In-flight calls are done: the final snapshot holds every answered write (after a host
    // request, `Provider::shutdown` already wrote it).
    if let Some(periodic) = periodic {
        periodic.abort();
        let _ = periodic.await;
    }
    Ok((served, provider))
}

async fn restore(provider: &KvProvider, settings: &snapshot::Settings) -> anyhow::Result<()> {
    // Neither a leftover nor a file's mode stops a start: the next write uses a fresh name.
    match snapshot::remove_leftovers(&settings.path) {
        Ok((removed, failed)) => {
            for leftover in removed {
                info!(
                    "removed {}, left by a snapshot write that never finished",
                    leftover.display()
                );
            }
            for (leftover, err) in failed {
                warn!("cannot remove {}: {err}", leftover.display());
            }
        }
        Err(err) => warn!(
            "cannot look for leftovers of snapshot writes beside {}: {err}",
            settings.path.display()
        ),
    }
    if let Err(err) = snapshot::make_private(&settings.path) {
        warn!(
            "cannot make {} readable by this user only: {err}",
            settings.path.display()
        );
    }
    let (p, s) = (provider.clone(), settings.clone());
    let restored = tokio::task::spawn_blocking(move || snapshot::restore(p.engine(), &s))
        .await
        .context("snapshot restore panicked")??;
    let path = settings.path.display();
    match restored {
        snapshot::Restored::Missing => info!("no snapshot at {path} yet: starting empty"),
        snapshot::Restored::Loaded(stats) => info!(
            entries = stats.entries,
            bytes = stats.bytes,
            "restored snapshot {path}"
        ),
        snapshot::Restored::MovedAside { error, moved_to } => tracing::error!(
            "snapshot {path} is unusable ({error}); moved it to {} and starting empty",
            moved_to.display()
        ),
    }
    Ok(())
}

async fn snapshot_periodically(provider: KvProvider, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await; // the first tick is immediate: nothing new to write yet
    loop {
        ticks.tick().await;
        provider.write_snapshot("periodic").await;
    }
}

/// Loads host data; fails with a clear message where the SDK would panic on what it holds.
fn check_host_data() -> anyhow::Result<&'static wasmcloud_provider_sdk::HostData> {
    let host_data = wasmcloud_provider_sdk::load_host_data().context("failed to load host data")?;
    let seed = host_data.lattice_rpc_user_seed.trim();
    if !seed.is_empty() {
        nkeys::KeyPair::from_seed(seed)
            .context("host data field lattice_rpc_user_seed is not a valid NATS nkey seed")?;
    }
    Ok(host_data)
}

async fn stop_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            warn!(%err, "cannot listen for SIGTERM; only SIGINT stops the provider");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
