//! A nats-server with JetStream on a loopback port, stopped on drop.
//!
//! The server picks its own ports (`-p -1`, and `-m -1` for its monitoring endpoint) and
//! writes them to a ports file, which we read: no port is ever probed free, released, then
//! bound by someone else.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// How long nats-server may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Where `cargo xtask` installs nats-server when none is found.
pub fn provisioned() -> PathBuf {
    crate::workspace_root().join("target/tools/nats-server/bin/nats-server")
}

/// A nats-server binary: `$NATS_SERVER_BIN`, the copy `cargo xtask` provisions
/// ([`provisioned`]), or `nats-server` on `PATH`, in that order.
pub fn find_binary() -> anyhow::Result<Option<PathBuf>> {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN") {
        let bin = PathBuf::from(bin);
        anyhow::ensure!(
            bin.is_file(),
            "NATS_SERVER_BIN={} is not a file",
            bin.display()
        );
        return Ok(Some(bin));
    }
    if provisioned().is_file() {
        return Ok(Some(provisioned()));
    }
    Ok(std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file()))
}

/// How to start one.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// The binary; [`find_binary`] when `None`.
    pub binary: Option<PathBuf>,
    /// A port to listen on (a restart on the port a test's clients know); the server picks
    /// a free one when `None`.
    pub port: Option<u16>,
    /// Start it in a process group of its own, so that Ctrl-C reaches only the caller, which
    /// stops things in order (`cargo xtask`). Tests leave it in theirs: an interrupted test
    /// run takes its servers with it.
    pub own_process_group: bool,
}

/// A nats-server with JetStream, on 127.0.0.1 only; killed on drop.
pub struct NatsServer {
    child: Child,
    pub port: u16,
    /// Its monitoring endpoint (`http://127.0.0.1:PORT`), which tells which connections
    /// subscribe to what ([`NatsServer::subscribers`]).
    monitor: String,
    /// Its ports file, log and JetStream store (kept across [`NatsServer::restart`]).
    dir: tempfile::TempDir,
    binary: PathBuf,
    own_process_group: bool,
}

impl NatsServer {
    /// Starts one on a port of its choosing; panics (a test's failure) when it cannot.
    pub fn start() -> Self {
        Self::try_start(&Options::default()).expect("cannot start nats-server")
    }

    /// Starts one on `port` (a restart on the port it had); panics when it cannot.
    pub fn start_on(port: u16) -> Self {
        let options = Options {
            port: Some(port),
            ..Options::default()
        };
        Self::try_start(&options).expect("cannot start nats-server")
    }

    /// Starts one as `options` say and waits until it listens.
    pub fn try_start(options: &Options) -> anyhow::Result<Self> {
        let binary = match &options.binary {
            Some(binary) => binary.clone(),
            None => find_binary()?.context(
                "no nats-server found: run through `cargo xtask` (it provisions one), or set \
                 NATS_SERVER_BIN",
            )?,
        };
        let dir = tempfile::tempdir()?;
        let mut child = spawn(&binary, options.port, dir.path(), options.own_process_group)?;
        match wait_for_port(&mut child, dir.path()) {
            Ok((port, monitor)) => Ok(Self {
                child,
                port,
                monitor,
                dir,
                binary,
                own_process_group: options.own_process_group,
            }),
            Err(err) => {
                let _ = child.kill();
                let _ = child.wait();
                let log =
                    std::fs::read_to_string(dir.path().join("nats-server.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                Err(err.context(format!(
                    "{} (its log ends: {:?})",
                    binary.display(),
                    tail.join(" | ")
                )))
            }
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL: no clean shutdown) and starts it again on the same port
    /// with the same JetStream store; panics when it cannot.
    pub fn restart(&mut self) {
        self.restart_after(Duration::ZERO);
    }

    /// Like [`NatsServer::restart`], the server staying away for `down` (blocking).
    pub fn restart_after(&mut self, down: Duration) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(down);
        for entry in std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if entry.path().extension().is_some_and(|e| e == "ports") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        self.child = spawn(
            &self.binary,
            Some(self.port),
            self.dir.path(),
            self.own_process_group,
        )
        .expect("cannot restart nats-server");
        let (port, monitor) =
            wait_for_port(&mut self.child, self.dir.path()).expect("nats-server restart");
        assert_eq!(port, self.port);
        self.monitor = monitor;
    }

    /// How many client connections hold a subscription whose subject starts with `prefix`
    /// (read from the server's `/connz`). A process killed with SIGKILL keeps its
    /// subscriptions until the server has noticed its connection closed, which is not at
    /// once: a request sent meanwhile to a queue group it was in may be routed to it, and is
    /// lost.
    pub fn subscribers(&self, prefix: &str) -> anyhow::Result<usize> {
        let connz = http_get(&self.monitor, "/connz?subs=1&limit=100000")?;
        let connz: serde_json::Value = serde_json::from_str(&connz)
            .with_context(|| format!("/connz is no JSON: {connz:?}"))?;
        let connections = connz["connections"]
            .as_array()
            .with_context(|| format!("/connz lists no connections: {connz}"))?;
        Ok(connections
            .iter()
            .filter(|c| {
                (c["subscriptions_list"].as_array().into_iter().flatten())
                    .any(|s| s.as_str().is_some_and(|s| s.starts_with(prefix)))
            })
            .count())
    }

    /// Waits (blocking) until exactly `n` connections subscribe under `prefix`
    /// ([`NatsServer::subscribers`]); fails after `timeout`.
    pub fn wait_for_subscribers(
        &self,
        prefix: &str,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.subscribers(prefix)?;
            if now == n {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{now} connections subscribe under {prefix:?} after {timeout:?}, not {n}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The body of `GET {base}{path}` (HTTP/1.0: the body ends with the connection).
fn http_get(base: &str, path: &str) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let address = base
        .strip_prefix("http://")
        .with_context(|| format!("not an http address: {base}"))?;
    let mut stream = std::net::TcpStream::connect(address)
        .with_context(|| format!("cannot connect to {address}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP response: {response:?}"))?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "GET {path}: {head}"
    );
    Ok(body.to_owned())
}

/// Starts nats-server with JetStream on 127.0.0.1 (`port`, or one of its choosing), its store,
/// ports file and log in `dir`.
fn spawn(
    binary: &Path,
    port: Option<u16>,
    dir: &Path,
    own_process_group: bool,
) -> anyhow::Result<Child> {
    let port = port.map_or_else(|| "-1".to_owned(), |p| p.to_string());
    let mut command = Command::new(binary);
    command
        .args(["-a", "127.0.0.1", "-p", &port, "-m", "-1", "-js", "-sd"])
        .arg(dir.join("jetstream"))
        .arg("--ports_file_dir")
        .arg(dir)
        .arg("--log")
        .arg(dir.join("nats-server.log"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if own_process_group {
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
    }
    command
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))
}

/// The client port and the monitoring address from the ports file nats-server writes into
/// `dir` once it listens (`<its program name>_<pid>.ports`, holding
/// `{"nats":["nats://127.0.0.1:PORT"],"monitoring":["http://127.0.0.1:PORT"]}`); the
/// directory is this server's alone.
fn wait_for_port(child: &mut Child, dir: &Path) -> anyhow::Result<(u16, String)> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let ports_file = std::fs::read_dir(dir)?
            .flatten()
            .map(|entry| entry.path())
            .find(|path| path.extension().is_some_and(|e| e == "ports"));
        if let Some(text) = ports_file.and_then(|file| std::fs::read_to_string(file).ok()) {
            if let Ok(ports) = serde_json::from_str::<serde_json::Value>(&text) {
                let url = ports["nats"][0].as_str().unwrap_or_default();
                let port = url.rsplit(':').next().and_then(|p| p.parse().ok());
                let port = port.with_context(|| format!("no client port in {text:?}"))?;
                let monitor = (ports["monitoring"][0].as_str())
                    .with_context(|| format!("no monitoring address in {text:?}"))?;
                return Ok((port, monitor.to_owned()));
            }
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("nats-server exited at start ({status})");
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "nats-server did not listen within {START_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
