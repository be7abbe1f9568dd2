//! The processes a run drives, each a process of its own: our provider, its floor (a minimal
//! wRPC server of the same WIT on the host's stack), a raw NATS echo, and what `--compare`
//! names.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::json;

use super::shared::{Killed, LATTICE};
use super::workload::Target;
use crate::{flags, run};

/// Ours with `replication = "jetstream"`, linearizable reads.
pub const REPLICATED: &str = "js";
/// Ours with `replication = "jetstream"`, `read_consistency = "local"`.
pub const REPLICATED_LOCAL: &str = "js-local";

/// The started targets.
pub struct Targets {
    /// Stopped when dropped.
    pub children: Killed,
    /// Name and wRPC prefix of each provider-like target.
    pub prefixes: Vec<(&'static str, String)>,
    /// A client of each, by name.
    pub clients: BTreeMap<&'static str, Target>,
    /// The raw NATS echo.
    pub echo: Target,
    /// Our provider's process, for `--perf`.
    pub ours_pid: u32,
}

/// Starts every target on the nats-server at `url`, our provider from `binary`.
pub async fn start(
    args: &flags::Bench,
    url: &str,
    nats: &async_nats::Client,
    binary: &Path,
) -> anyhow::Result<Targets> {
    let limits = json!({
        "max_keys": "10000000",
        "max_total_bytes": "8589934592",
        "list_page_size": "1000",
    });
    let mut children = Killed(Vec::new());
    let config = limits.as_object().cloned().unwrap_or_default();
    let links = [("bench-component", "bench")];
    let otel = if args.otel {
        let sink = otlp_sink().await?;
        json!({ "otel_config": { "enable_observability": true, "observability_endpoint": sink, "protocol": "Http" } })
    } else {
        json!({})
    };
    let mut ours = run::start_provider(binary, url, LATTICE, "ours", config, &links, otel)?;
    let health = run::wait_for_health(nats, LATTICE, "ours", &mut ours).await;
    let ours_pid = ours.id();
    children.0.push(ours);
    health?;
    children.0.push(helper(&[
        "internal",
        "bench-floor",
        "--nats",
        url,
        "--prefix",
        &format!("{LATTICE}.floor"),
    ])?);
    children.0.push(helper(&[
        "internal",
        "bench-echo",
        "--nats",
        url,
        "--subject",
        "bench.echo",
    ])?);
    // Ours again, its link asking for expiry and eviction (a TTL no key reaches during the
    // run, and room for every key: what is measured is their bookkeeping on every call).
    let cache_link = json!({ "namespace": links[0].1, "ttl_secs": "3600", "eviction": "lru" });
    let mut cache = run::start_provider_linked(
        binary,
        url,
        LATTICE,
        "cache",
        limits.as_object().cloned().unwrap_or_default(),
        vec![run::link_definition(links[0].0, "cache", cache_link)],
        json!({}),
    )?;
    let health = run::wait_for_health(nats, LATTICE, "cache", &mut cache).await;
    children.0.push(cache);
    health?;
    let mut prefixes: Vec<(&str, String)> = vec![
        ("ours", format!("{LATTICE}.ours")),
        ("floor", format!("{LATTICE}.floor")),
        ("cache", format!("{LATTICE}.cache")),
    ];
    // Ours replicated through JetStream (one instance each, file storage): linearizable
    // reads, and local ones.
    if !args.no_replication {
        for (name, reads) in [(REPLICATED, "linearizable"), (REPLICATED_LOCAL, "local")] {
            let mut config = limits.as_object().cloned().unwrap_or_default();
            config.insert("replication".into(), "jetstream".into());
            config.insert("read_consistency".into(), reads.into());
            let mut child =
                run::start_provider(binary, url, LATTICE, name, config, &links, json!({}))?;
            let health = run::wait_for_health(nats, LATTICE, name, &mut child).await;
            children.0.push(child);
            health?;
            prefixes.push((name, format!("{LATTICE}.{name}")));
        }
    }
    if let Some(bin) = &args.compare {
        let mut config = serde_json::Map::new();
        if args.redis {
            // Probed free, then bound by redis-server: a race, but only for this optional
            // comparison, whose start fails loudly if it loses.
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
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
                target_config.insert(k.into(), v.replace("{nats}", url).into());
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
            run::start_provider(bin, url, LATTICE, "compare", config, &links, host_data)?;
        let health = run::wait_for_health(nats, LATTICE, "compare", &mut compare).await;
        children.0.push(compare);
        health?;
        prefixes.push(("compare", format!("{LATTICE}.compare")));
    }
    let mut clients = BTreeMap::new();
    for (name, prefix) in &prefixes {
        let client = wrpc_transport_nats::Client::new(nats.clone(), prefix.clone(), None).await?;
        clients.insert(*name, Target::Wrpc(Arc::new(client)));
    }
    let echo = Target::Echo(nats.clone());
    Ok(Targets {
        children,
        prefixes,
        clients,
        echo,
        ours_pid,
    })
}

/// A helper process of this binary (`bench-floor` / `bench-echo`), up once it prints "ready".
pub fn helper(args: &[&str]) -> anyhow::Result<Child> {
    helper_niced(args, 0)
}

/// Like [`helper`], at CPU priority `nice` (0: this process's; run through `nice`).
pub fn helper_niced(args: &[&str], nice: i32) -> anyhow::Result<Child> {
    use std::io::BufRead as _;
    let mut command = match nice {
        0 => Command::new(std::env::current_exe()?),
        n => {
            let mut command = Command::new("nice");
            command
                .args(["-n", &n.to_string()])
                .arg(std::env::current_exe()?);
            command
        }
    };
    let mut child = command
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
