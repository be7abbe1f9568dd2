//! `cargo xtask <task>`: the project's automation, in plain Rust (see README.md).
//!
//! One module per task. Every external command is echoed before it runs.

mod bench;
mod call;
mod check;
mod fuzz;
mod nats;
mod par;
mod run;
mod test;
mod tools;
mod up;
mod wit;

use std::process::{Command, ExitCode};

use clap::{Parser, Subcommand};

/// Tasks for building, running and testing keyvalue-inmemory.
#[derive(Parser)]
#[command(name = "cargo xtask", version)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run the provider as a wasmCloud host would, against a real nats-server.
    Run(run::Args),
    /// Run the whole test suite (provisions nats-server first).
    Test(test::Args),
    /// Call a running provider over wRPC, as a linked component would.
    Call(call::Args),
    /// Build a signed provider archive (build/keyvalue-inmemory.par.gz) and check it.
    Par(par::Args),
    /// Refresh wit/deps from wit/deps.toml (network), or `--check` it against wit/deps.lock.
    Wit(wit::Args),
    /// Validate wit/, wasmcloud.toml, wadm.yaml, docker-compose.yml, Dockerfile, flake.nix.
    Check(check::Args),
    /// Bounded cargo-fuzz runs of the snapshot decoder and the engine (nightly).
    Fuzz(fuzz::Args),
    /// Start the docker-compose demo lattice and deploy wadm.yaml.
    Up(up::Args),
    /// Undeploy and stop the docker-compose demo lattice.
    Down(up::Args),
    /// Measure the provider against a minimal wRPC server and raw NATS (release builds).
    Bench(bench::Args),
    /// Print the path of a nats-server binary, installing one if none is found.
    NatsServer,
    /// (internal) The measuring part of `bench`, run from the release build.
    #[command(hide = true)]
    BenchRun(bench::Args),
    /// (internal) The minimal wRPC server `bench` compares against.
    #[command(hide = true)]
    BenchFloor {
        #[arg(long)]
        nats: String,
        #[arg(long)]
        prefix: String,
    },
    /// (internal) The raw NATS echo `bench` compares against.
    #[command(hide = true)]
    BenchEcho {
        #[arg(long)]
        nats: String,
        #[arg(long)]
        subject: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Run(args) => run::run(args),
        Task::Test(args) => test::run(args),
        Task::Call(args) => call::run(args),
        Task::Par(args) => par::run(args),
        Task::Wit(args) => wit::run(args),
        Task::Check(args) => check::run(args),
        Task::Fuzz(args) => fuzz::run(args),
        Task::Up(args) => up::up(args),
        Task::Down(args) => up::down(args),
        Task::Bench(args) => bench::run(args),
        Task::BenchRun(args) => bench::run_release(args),
        Task::BenchFloor { nats, prefix } => bench::floor(&nats, &prefix),
        Task::BenchEcho { nats, subject } => bench::echo(&nats, &subject),
        Task::NatsServer => nats::server_binary().map(|path| {
            println!("{}", path.display());
            ExitCode::SUCCESS
        }),
    };
    result.unwrap_or_else(|err| {
        eprintln!("error: {err:#}");
        ExitCode::FAILURE
    })
}

/// The workspace root.
pub fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// A command of the cargo that runs this task (`$CARGO`, which cargo sets for `cargo xtask`),
/// or of the `cargo` on the PATH.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Prints a command the way a shell would show it, before running it.
pub fn echo(command: &Command) {
    let mut line = String::from("$");
    for (key, value) in command.get_envs() {
        if let Some(value) = value {
            line.push_str(&format!(
                " {}={}",
                key.to_string_lossy(),
                value.to_string_lossy()
            ));
        }
    }
    line.push(' ');
    line.push_str(&command.get_program().to_string_lossy());
    for arg in command.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    eprintln!("{line}");
}

/// Runs a command to completion, echoed; fails on a non-zero exit.
pub fn run_command(command: &mut Command) -> anyhow::Result<()> {
    echo(command);
    let status = command
        .status()
        .map_err(|err| anyhow::anyhow!("cannot run {:?}: {err}", command.get_program()))?;
    anyhow::ensure!(
        status.success(),
        "{:?} failed: {status}",
        command.get_program()
    );
    Ok(())
}
