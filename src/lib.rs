//! keyvalue-inmemory: a wasmCloud 1.x capability provider serving an in-memory key-value store
//! over wRPC (`wrpc:keyvalue/{store,atomics,batch}@0.2.0-draft`).
//!
//! The host starts the binary with host data on stdin; we join the lattice over NATS, take
//! links and config on the SDK's control subjects, and answer `wasi:keyvalue` calls that the
//! host forwards from components.
//!
//! # Layout
//!
//! The store itself is the workspace's `keyvalue-store` crate (`store/`): namespaces of
//! buckets of keys, limits, paged listings and the snapshot file format, with no wRPC, NATS or
//! SDK in its tree. This crate serves it:
//!
//! - [`run`] (here): start-up and the order of a stop, called by `main.rs`.
//! - [`config`]: every configuration key, its default and how maps merge.
//! - [`provider`]: the SDK's control-plane callbacks and the generated wRPC handler traits.
//! - [`links`]: active links and the namespace each one's calls use.
//! - [`serve`]: the routing table of served functions; accepting invocations, one task each,
//!   with bounded parameter reading; the span and metrics of each call.
//! - [`transport`]: our serving side of wRPC over NATS, which covers for the handshakes and
//!   results the host's client drops.
//! - [`wire`]: reading parameters without trusting the lengths they declare.
//! - [`budget`]: what calls in flight may hold (bytes, calls), in all and per component.
//! - [`snapshots`]: when snapshots are restored and written; [`expiry`]: when expired keys are
//!   swept.
//! - [`replica`]: several instances as one store, through NATS JetStream (`replication =
//!   "jetstream"`): the stream, replicated writes, read barriers, the applier.
//! - [`watch`]: components told of the changes in their namespace (`wasi:keyvalue/watcher`):
//!   the `watch` rules, each watcher's bounded queue, delivery.
//! - [`shutdown`]: stopping: the stop request, the drain, the final snapshot.
//! - [`telemetry`]: logs, OTLP traces and metrics as the host configures them; a leaf, handed
//!   what it observes.
//! - [`client`]: a race-free wRPC client of the same interfaces, for tests and tools.
//! - [`bindings`]: what `wit_bindgen_wrpc::generate!` makes of `wit/` (world `provider`).

pub mod budget;
pub mod client;
pub mod config;
pub mod expiry;
pub mod links;
pub mod provider;
pub mod replica;
pub mod serve;
pub mod shutdown;
pub mod snapshots;
pub mod telemetry;
pub mod transport;
pub mod watch;
pub mod wire;

/// Bindings generated from `wit/` (world `provider`).
pub mod bindings {
    wit_bindgen_wrpc::generate!({ world: "provider", generate_all });
}

use std::time::Duration;

use anyhow::Context as _;
use tracing::{info, warn};

pub use provider::KvProvider;

/// The name the provider reports to the lattice (its package name).
pub const NAME: &str = env!("CARGO_PKG_NAME");

/// Runs the provider as the host starts it: host data from stdin, control plane through the
/// SDK, data plane through [`serve::Server`]. Answers after a host shutdown request, SIGTERM or
/// SIGINT, once in-flight calls finished.
pub async fn run() -> anyhow::Result<()> {
    let host_data = check_host_data()?;
    let (mut snapshots, mut problems) = config::Snapshots::from_map(&host_data.config);
    let (replication, more) = config::Replication::from_map(&host_data.config)
        .map_err(|refused| anyhow::anyhow!("refusing to start: {refused}"))?;
    problems.extend(more);
    let otel = config::otel_config(&host_data.otel_config, &host_data.config);
    let telemetry = telemetry::init(host_data, &otel)?;
    for problem in problems {
        warn!("{problem}");
    }
    if replication.is_some() && snapshots.take().is_some() {
        warn!("snapshot_path is ignored with replication = jetstream: the stream keeps the data");
    }
    let (served, snapshot_finished) = serve_until_stopped(snapshots, replication).await;
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
async fn serve_until_stopped(
    snapshots: Option<config::Snapshots>,
    replication: Option<config::Replication>,
) -> (anyhow::Result<()>, bool) {
    match serve(snapshots, replication).await {
        Ok((served, provider)) => {
            let finished = provider.shutdown_handle().final_snapshot().await;
            (served, finished)
        }
        Err(err) => (Err(err), true),
    }
}

/// Starts, serves until stopped, and hands back the provider for its final snapshot.
async fn serve(
    snapshots: Option<config::Snapshots>,
    replication: Option<config::Replication>,
) -> anyhow::Result<(anyhow::Result<()>, KvProvider)> {
    let provider = KvProvider::new(config::Config::default(), snapshots);
    let host_data = wasmcloud_provider_sdk::load_host_data()?;
    let url = match host_data.lattice_rpc_url.as_str() {
        "" => "nats://127.0.0.1:4222",
        url => url,
    };
    // Restore, or catch up with the other instances, before the SDK answers its first health
    // check.
    if let Some(snapshots) = provider.snapshots() {
        snapshots.restore().await?;
    }
    if let Some(replication) = replication {
        // The provider config applies to the limits checked before replicated writes.
        provider.apply_config(&host_data.config);
        let nats = connect(
            url,
            &host_data.lattice_rpc_user_jwt,
            &host_data.lattice_rpc_user_seed,
            &format!("{NAME} replication"),
            "replication connection",
        )
        .await
        .context("replication: cannot connect to NATS")?;
        let replica = replica::Replica::start(
            nats,
            (
                &host_data.lattice_rpc_prefix,
                &host_data.provider_key,
                &host_data.instance_id,
            ),
            replication,
            std::sync::Arc::clone(provider.engine()),
        )
        .await?;
        provider.replicate(replica);
    }
    telemetry::register_usage_gauges(std::sync::Arc::clone(provider.engine()));
    let watching = provider.clone();
    telemetry::register_watch_counter(move || watching.watchers().totals());
    let control = wasmcloud_provider_sdk::run_provider(provider.clone(), NAME)
        .await
        .context("failed to start the provider")?;
    let connection = wasmcloud_provider_sdk::get_connection();
    // Subscribe the data plane before the control loop first runs: the host (and our tests)
    // take the first health answer to mean calls can be sent.
    let watch_nats = watch::delivery::connect(
        url,
        &host_data.lattice_rpc_user_jwt,
        &host_data.lattice_rpc_user_seed,
        &format!("{NAME} watch delivery"),
    )
    .await
    .unwrap_or_else(|err| {
        warn!("watch delivery shares the serving connection: its own failed: {err:#}");
        (*connection.nats).clone()
    });
    provider.connect_watchers(watch::delivery::Outbound {
        nats: watch_nats,
        lattice: connection.lattice.to_string(),
        provider_key: connection.provider_key().to_owned(),
    });
    let prefix = format!("{}.{}", connection.lattice, connection.provider_key());
    let server =
        serve::Server::subscribe((*connection.nats).clone(), &prefix, provider.clone()).await?;
    connection
        .nats
        .flush()
        .await
        .context("failed to flush the data-plane subscriptions")?;
    let periodic = (provider.snapshots())
        .map(|snapshots| tokio::spawn(std::sync::Arc::clone(snapshots).periodically()));
    let sweeping = tokio::spawn(expiry::sweep_periodically(std::sync::Arc::clone(
        provider.engine(),
    )));
    let stop = provider.shutdown_handle();
    let serving = server.run();
    tokio::pin!(control, serving);
    let served = tokio::select! {
        () = &mut control => { info!("control loop ended"); None }
        () = shutdown::signal() => { info!("stop signal received"); None }
        // Serving ends on its own only after a host's shutdown request (through `control`):
        // let the SDK send its reply (after the final snapshot, which
        // `Shutdown::host_request` waits for) before the process goes.
        served = &mut serving => {
            let wait = shutdown::FINAL_SNAPSHOT_WAIT + Duration::from_secs(5);
            if tokio::time::timeout(wait, &mut control).await.is_err() {
                warn!("control loop did not end after shutdown");
            }
            Some(served)
        }
    };
    let served = match served {
        Some(served) => served,
        None => {
            stop.stop();
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
    // request, `Shutdown::host_request` already wrote it).
    if let Some(periodic) = periodic {
        periodic.abort();
        let _ = periodic.await;
    }
    sweeping.abort();
    Ok((served, provider))
}

/// A NATS connection of the provider's own (besides the SDK's), made as the SDK makes its own:
/// the lattice URL, and the JWT and seed when host data has them. `what` names it in logs.
pub async fn connect(
    url: &str,
    jwt: &str,
    seed: &str,
    name: &str,
    what: &'static str,
) -> anyhow::Result<async_nats::Client> {
    let options = match (jwt.trim(), seed.trim()) {
        ("", "") => async_nats::ConnectOptions::default(),
        (jwt, seed) => {
            let key = std::sync::Arc::new(nkeys::KeyPair::from_seed(seed)?);
            async_nats::ConnectOptions::with_jwt(jwt.to_owned(), move |nonce| {
                let key = std::sync::Arc::clone(&key);
                async move { key.sign(&nonce).map_err(async_nats::AuthError::new) }
            })
        }
    };
    // Not the SDK's event logging: it logs the close at the end of every clean stop as an
    // error.
    let options = options
        .event_callback(move |event| async move {
            match event {
                async_nats::Event::Connected | async_nats::Event::Closed => {
                    tracing::debug!("{what}: {event}");
                }
                event => warn!("{what}: {event}"),
            }
        })
        .name(name);
    Ok(options.connect(url).await?)
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
