//! A nats-server of the test's own on a free loopback port (shared by tests/common and the
//! real-lattice test in e2e/, which includes this file by path).

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long nats-server may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the nats-server binary is: `NATS_SERVER_BIN`, the copy `cargo xtask` provisions, or
/// `PATH`.
pub fn nats_server_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN") {
        return PathBuf::from(bin);
    }
    let provisioned =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/tools/nats-server/bin/nats-server");
    if provisioned.exists() {
        return provisioned;
    }
    if let Some(found) = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.exists())
    {
        return found;
    }
    panic!(
        "no nats-server found: run the tests with `cargo xtask test` (it provisions one), \
         or set NATS_SERVER_BIN"
    );
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

/// A nats-server of our own on a free loopback port; killed on drop.
pub struct NatsServer {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    /// Starts on `port` (for restarts on the same port).
    pub fn start_on(port: u16) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let child = Command::new(nats_server_bin())
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("failed to start nats-server");
        let server = Self {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
