//! `cargo xtask test`: the whole suite, with a nats-server provisioned for it.

use std::process::{Command, ExitCode};

use crate::{echo, nats};

/// Runs `cargo test --workspace` with NATS_SERVER_BIN set.
#[derive(clap::Args)]
pub struct Args {
    /// Extra arguments for cargo test (after `--`), e.g. a test name filter.
    #[arg(last = true)]
    cargo_args: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let nats_server = nats::server_binary()?;
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command
        .current_dir(crate::root())
        .env("NATS_SERVER_BIN", &nats_server)
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
