//! `cargo xtask up` / `down`: the full-lattice demo of docker-compose.yml.
//!
//! `up` builds the release archive into build/ (the host mounts it read-only), starts the
//! compose project, deploys wadm.yaml through wadm's NATS API (what `wash app deploy` sends)
//! and prints where to look. `down` undeploys and removes the project and its volume.

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::process::{root, run_command};
use crate::{flags, par, run, tools};

/// The NATS port docker-compose.yml publishes on 127.0.0.1.
const NATS: &str = "nats://127.0.0.1:4222";
const LATTICE: &str = "default";
const APP: &str = "keyvalue-inmemory-demo";

/// `docker compose …` in the repository, or a plain message saying what is missing.
fn compose() -> anyhow::Result<Command> {
    let Some(docker) = tools::on_path("docker") else {
        bail!(
            "Docker is not installed: `cargo xtask up` needs Docker Engine with the compose plugin"
        );
    };
    let plugin = Command::new(&docker).args(["compose", "version"]).output();
    if !plugin.is_ok_and(|o| o.status.success()) {
        bail!("`docker compose` is not available: install the Docker compose plugin (docker-compose-plugin)");
    }
    let daemon = Command::new(&docker).arg("info").output();
    if !daemon.is_ok_and(|o| o.status.success()) {
        bail!("the Docker daemon is not reachable (`docker info` fails): start it, or check your permissions");
    }
    let mut command = Command::new(docker);
    command
        .current_dir(root())
        .args(["compose", "--file", "docker-compose.yml"]);
    Ok(command)
}

/// A wadm API request; wadm answers JSON with a `result` field ("error" on failure).
async fn wadm(nats: &async_nats::Client, op: &str, body: Vec<u8>) -> anyhow::Result<String> {
    let subject = format!("wadm.api.{LATTICE}.model.{op}");
    let reply = tokio::time::timeout(Duration::from_secs(10), nats.request(subject, body.into()))
        .await
        .context("wadm did not answer in 10 s")??;
    let answer: serde_json::Value = serde_json::from_slice(&reply.payload)?;
    if answer["result"] == "error" {
        bail!("wadm {op}: {}", answer["message"]);
    }
    Ok(answer["message"].as_str().unwrap_or_default().to_string())
}

pub fn up(_: flags::Up) -> anyhow::Result<ExitCode> {
    let mut compose = compose()?;
    let binary = run::build_provider(true)?;
    let archive = par::write(&binary, &root().join("build"), &root().join(".keys"), true)?;
    par::check(&archive, true)?;
    run_command(compose.args(["up", "--detach", "--wait"]))?;

    let manifest = std::fs::read(root().join("wadm.yaml"))?;
    tokio::runtime::Runtime::new()?.block_on(async {
        let nats = async_nats::connect(NATS)
            .await
            .with_context(|| format!("cannot reach the demo's NATS at {NATS}"))?;
        // wadm subscribes a moment after its container reports started.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match wadm(&nats, "put", manifest.clone()).await {
                Ok(message) => {
                    eprintln!("wadm: {message}");
                    break;
                }
                Err(err) if Instant::now() < deadline => {
                    eprintln!("waiting for wadm ({err:#})");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                Err(err) => return Err(err),
            }
        }
        let deployed = wadm(&nats, &format!("deploy.{APP}"), b"{}".to_vec()).await?;
        eprintln!("wadm: {deployed}");
        anyhow::Ok(())
    })?;
    println!(
        "\nThe demo lattice is up ({APP} deployed; the host pulls the counter and the HTTP \
         server from ghcr.io, so give it a minute):\n  \
         counter  curl http://127.0.0.1:8000/       (each request increments a counter kept by our provider)\n  \
         traces   http://127.0.0.1:16686/           (Jaeger: pick service keyvalue-inmemory)\n  \
         NATS     {NATS}               (cargo xtask call --nats {NATS} --provider-key <id> …)\n  \
         registry 127.0.0.1:5000\n\
         Stop it with `cargo xtask down`."
    );
    Ok(ExitCode::SUCCESS)
}

pub fn down(_: flags::Up) -> anyhow::Result<ExitCode> {
    let mut compose = compose()?;
    let undeploy = tokio::runtime::Runtime::new()?.block_on(async {
        let nats = async_nats::connect(NATS).await?;
        wadm(&nats, &format!("undeploy.{APP}"), b"{}".to_vec()).await
    });
    if let Err(err) = undeploy {
        eprintln!("(not undeployed through wadm: {err:#})");
    }
    run_command(compose.args(["down", "--volumes", "--remove-orphans"]))?;
    Ok(ExitCode::SUCCESS)
}
