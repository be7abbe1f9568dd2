//! `cargo xtask run`: the provider as a wasmCloud 1.x host runs it, without a host.
//!
//! Starts (or reuses) a nats-server, builds the provider, starts the binary with complete host
//! data on stdin (environment cleared but for `RUST_LOG` and `OTEL_*`, as the host does), waits
//! for its health answer, and prints how to call it. Ctrl-C sends the host's shutdown request,
//! then stops nats-server.

use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::json;

use crate::process::{cargo, echo, root, run_command};
use crate::{flags, nats};

/// Builds the provider binary (debug, or release); answers its path.
pub fn build_provider(release: bool) -> anyhow::Result<std::path::PathBuf> {
    let mut build = cargo();
    build.current_dir(root()).args([
        "build",
        "--locked",
        "--package",
        "keyvalue-inmemory",
        "--bin",
        "keyvalue-inmemory",
    ]);
    if release {
        build.arg("--release");
    }
    run_command(&mut build)?;
    Ok(root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("keyvalue-inmemory"))
}

/// The host id in the host data we write; shutdown requests must name it.
pub const HOST_ID: &str = "NXTASKRUNHOST";

/// Starts a provider binary as the host does: complete host data (both required keys, plus
/// the fields of `extra_host_data`, e.g. `otel_config`) as one base64 line on stdin,
/// environment cleared but for `RUST_LOG` and `OTEL_*`, in a process group of its own.
/// `links` are (source component, namespace) pairs.
pub fn start_provider(
    binary: &std::path::Path,
    nats_url: &str,
    lattice: &str,
    provider_key: &str,
    config: serde_json::Map<String, serde_json::Value>,
    links: &[(&str, &str)],
    extra_host_data: serde_json::Value,
) -> anyhow::Result<std::process::Child> {
    let links = (links.iter())
        .map(|(source, namespace)| {
            link_definition(source, provider_key, json!({ "namespace": namespace }))
        })
        .collect();
    start_provider_linked(
        binary,
        nats_url,
        lattice,
        provider_key,
        config,
        links,
        extra_host_data,
    )
}

/// Like [`start_provider`], with the link definitions given whole ([`link_definition`]).
pub fn start_provider_linked(
    binary: &std::path::Path,
    nats_url: &str,
    lattice: &str,
    provider_key: &str,
    config: serde_json::Map<String, serde_json::Value>,
    links: Vec<serde_json::Value>,
    extra_host_data: serde_json::Value,
) -> anyhow::Result<std::process::Child> {
    let host_data = test_support::host::HostData {
        host_id: HOST_ID,
        lattice,
        nats_url,
        provider_key,
        instance_id: &format!("xtask-{provider_key}"),
        config,
        links,
        extra: extra_host_data,
    };
    let mut command = Command::new(binary);
    command.env_clear();
    for (key, value) in std::env::vars() {
        if key == "RUST_LOG" || key.starts_with("OTEL_") {
            command.env(key, value);
        }
    }
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    echo(&command);
    test_support::host::spawn_provider(command, &host_data.to_json().to_string())
}

/// A `wasi:keyvalue` link named `default` from `source` to provider `target`, as host data
/// carries it.
pub fn link_definition(
    source: &str,
    target: &str,
    target_config: serde_json::Value,
) -> serde_json::Value {
    test_support::host::link(source, target, "default", target_config)
}

/// Waits up to 30 s for the provider's first health answer.
pub async fn wait_for_health(
    nats: &async_nats::Client,
    lattice: &str,
    provider_key: &str,
    provider: &mut std::process::Child,
) -> anyhow::Result<String> {
    let health = format!("wasmbus.rpc.{lattice}.{provider_key}.health");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Ok(reply)) = tokio::time::timeout(
            Duration::from_millis(500),
            nats.request(health.clone(), "{}".into()),
        )
        .await
        {
            return Ok(String::from_utf8_lossy(&reply.payload).into_owned());
        }
        anyhow::ensure!(
            provider.try_wait()?.is_none(),
            "the provider exited during start-up"
        );
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the provider did not answer health within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn run(args: flags::Run) -> anyhow::Result<ExitCode> {
    let mut config = serde_json::Map::new();
    for pair in &args.config {
        let (k, v) = pair
            .split_once('=')
            .with_context(|| format!("--config {pair:?} is not KEY=VALUE"))?;
        config.insert(k.to_owned(), v.into());
    }
    let server = match &args.nats {
        Some(_) => None,
        None => Some(nats::start_server()?),
    };
    let url = args
        .nats
        .clone()
        .or_else(|| server.as_ref().map(nats::NatsServer::url))
        .unwrap_or_default();

    let binary = match &args.binary {
        Some(binary) => binary.clone(),
        None => build_provider(args.release)?,
    };

    let links = [(args.source.as_str(), args.namespace.as_str())];
    let mut provider = start_provider(
        &binary,
        &url,
        &args.lattice,
        &args.provider_key,
        config,
        &links,
        json!({}),
    )?;

    let runtime = tokio::runtime::Runtime::new()?;
    let outcome = runtime.block_on(async {
        let nats = async_nats::connect(&url).await.with_context(|| format!("cannot connect to {url}"))?;
        let answer = wait_for_health(&nats, &args.lattice, &args.provider_key, &mut provider).await?;
        let call = format!(
            "cargo xtask call --nats {url} --lattice {} --provider-key {} --source {}",
            args.lattice, args.provider_key, args.source
        );
        println!(
            "\nkeyvalue-inmemory is up.\n  NATS:    {url}\n  health:  {answer}\n\
             It serves {source}'s calls in namespace {ns:?}. Try, in another terminal:\n  \
             {call} set greetings hello world\n  {call} get greetings hello\n  \
             {call} increment counters hits 1\n  {call} list-keys greetings\n  {call} health\n\
             Ctrl-C sends the host's shutdown request and stops everything.",
            source = args.source,
            ns = args.namespace,
        );
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                eprintln!("stopping: sending the host's shutdown request");
                let subject = format!("wasmbus.rpc.{}.{}.default.shutdown", args.lattice, args.provider_key);
                let body = json!({ "host_id": HOST_ID }).to_string();
                match tokio::time::timeout(Duration::from_secs(15), nats.request(subject, body.into())).await {
                    Ok(Ok(reply)) => eprintln!("provider answered: {}", String::from_utf8_lossy(&reply.payload)),
                    _ => eprintln!("no answer to the shutdown request"),
                }
            }
            () = wait_exit(&mut provider) => eprintln!("the provider exited on its own"),
        }
        anyhow::Ok(())
    });
    let status = stop(&mut provider)?;
    drop(server);
    outcome?;
    eprintln!("provider exit status: {status}");
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn wait_exit(child: &mut std::process::Child) {
    while matches!(child.try_wait(), Ok(None)) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits up to 15 s for the provider to exit (sending SIGTERM if it is still running), then
/// kills it.
pub fn stop(child: &mut std::process::Child) -> anyhow::Result<std::process::ExitStatus> {
    if child.try_wait()?.is_none() {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
    }
    for _ in 0..150 {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("the provider did not exit; killing it");
    child.kill()?;
    Ok(child.wait()?)
}
