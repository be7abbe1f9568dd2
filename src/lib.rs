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
//! - [`serve`]: accepting invocations, one task each, with bounded parameter decoding; the
//!   span and metrics of each call.
//! - [`telemetry`]: logs, OTLP traces and metrics as the host configures them.
//! - [`client`]: a race-free wRPC client of the same interfaces, for tests and tools.
//! - [`bindings`]: what `wit_bindgen_wrpc::generate!` makes of `wit/` (world `provider`).
//! - [`run`]: start-up and shutdown, called by `main.rs`.

pub mod client;
pub mod config;
pub mod engine;
pub mod links;
pub mod provider;
pub mod serve;
pub mod telemetry;

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
    let telemetry = telemetry::init(host_data)?;
    let served = serve_until_stopped().await;
    if let Err(err) = &served {
        tracing::error!("{err:#}");
    }
    telemetry.shutdown().await;
    served
}

async fn serve_until_stopped() -> anyhow::Result<()> {
    let provider = KvProvider::default();
    telemetry::register_usage_gauges(&provider);
    let control = wasmcloud_provider_sdk::run_provider(provider.clone(), NAME)
        .await
        .context("failed to start the provider")?;
    let connection = wasmcloud_provider_sdk::get_connection();
    let client = connection
        .get_wrpc_client(connection.provider_key())
        .await
        .context("failed to create the wRPC server")?;
    // Subscribe the data plane before the control loop first runs: the host (and our tests)
    // take the first health answer to mean calls can be sent.
    let server = serve::Server::subscribe(&client, provider.clone()).await?;
    connection
        .nats
        .flush()
        .await
        .context("failed to flush the data-plane subscriptions")?;
    let serving = server.run();
    tokio::pin!(control, serving);
    tokio::select! {
        () = &mut control => info!("control loop ended"),
        () = stop_signal() => info!("stop signal received"),
        // Serving ends on its own only after `Provider::shutdown` (a host request, through
        // `control`): let the SDK send its reply before the process goes.
        served = &mut serving => {
            if tokio::time::timeout(Duration::from_secs(5), &mut control).await.is_err() {
                warn!("control loop did not end after shutdown");
            }
            return served;
        }
    }
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
