//! `cargo xtask <task>`: the project's automation, in plain Rust (see README.md).
//!
//! Every task and its options are declared in `flags.rs`; one module per task does it. Every
//! external command is echoed before it runs.

mod bench;
mod call;
mod check;
mod ci;
mod flags;
mod fuzz;
mod nats;
mod par;
mod run;
mod test;
mod tools;
mod up;
mod wit;

use std::process::{Command, ExitCode};

use clap::Parser as _;

use flags::{Internal, Task};

fn main() -> ExitCode {
    let cli = flags::Cli::parse();
    let result = match cli.task {
        Task::Run(args) => run::run(args),
        Task::Test(args) => test::run(args),
        Task::Ci(args) => ci::run(args),
        Task::Call(args) => call::run(args),
        Task::Par(args) => par::run(args),
        Task::Wit(args) => wit::run(args),
        Task::Check(args) => check::run(args),
        Task::Fuzz(args) => fuzz::run(args),
        Task::Up(args) => up::up(args),
        Task::Down(args) => up::down(args),
        Task::Bench(args) => bench::run(args),
        Task::NatsServer => nats::server_binary().map(|path| {
            println!("{}", path.display());
            ExitCode::SUCCESS
        }),
        Task::Internal(Internal::Measure(args)) => bench::run_release(args),
        Task::Internal(Internal::Floor { nats, prefix }) => bench::floor(&nats, &prefix),
        Task::Internal(Internal::Echo { nats, subject }) => bench::echo(&nats, &subject),
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
