//! `cargo xtask test`: the whole suite, with what it needs provisioned: a nats-server, and the
//! provider archive the real-lattice test (e2e/tests/lattice.rs) hands to a wasmCloud host.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use crate::{echo, nats, par, root, run, run_command};

/// Runs `cargo test --workspace` with NATS_SERVER_BIN and KEYVALUE_PAR set.
#[derive(clap::Args)]
pub struct Args {
    /// Extra arguments for cargo test (after `--`), e.g. a test name filter.
    #[arg(last = true)]
    cargo_args: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let nats_server = nats::server_binary()?;
    let archive = e2e_archive()?;
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command
        .current_dir(root())
        .env("NATS_SERVER_BIN", &nats_server)
        .env("KEYVALUE_PAR", &archive)
        .args(["test", "--workspace"])
        .args(&args.cargo_args);
    echo(&command);
    let status = command.status()?;
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The archive the host starts in the real-lattice test: the debug build (the one the other
/// tests run, so no second build), stripped of debug info (~180 MB → a few tens of MB; the
/// host copies it into its cache), uncompressed, signed with throwaway keys under target/.
fn e2e_archive() -> anyhow::Result<PathBuf> {
    let binary = run::build_provider(false)?;
    let dir = root().join("target/e2e");
    std::fs::create_dir_all(&dir)?;
    let stripped = dir.join("keyvalue-inmemory");
    strip(&binary, &stripped)?;
    let archive = par::write(&stripped, &dir, &dir.join("keys"), false)?;
    eprintln!("wrote {}", archive.display());
    Ok(archive)
}

fn strip(binary: &Path, out: &Path) -> anyhow::Result<()> {
    let mut command = Command::new("strip");
    command.arg("--strip-debug").arg("-o").arg(out).arg(binary);
    run_command(&mut command).map_err(|e| {
        e.context(
            "`strip` (binutils) is needed to package the test provider: apt-get install binutils",
        )
    })
}
