//! `cargo xtask <task>`: the project's automation, in plain Rust (see README.md).
//!
//! Every task and its options are declared in `flags.rs`; one module per task does it.
//! `process.rs` runs what they run: every external command is echoed before it runs (the
//! nats-server a task starts is reported with its address instead).

mod bench;
mod call;
mod check;
mod ci;
mod flags;
mod fuzz;
mod nats;
mod par;
mod process;
mod run;
mod test;
mod tools;
mod up;
mod wit;

use std::process::ExitCode;

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
        Task::Internal(Internal::Watchers {
            nats,
            lattice,
            count,
        }) => bench::watchers(&nats, &lattice, count),
    };
    result.unwrap_or_else(|err| {
        eprintln!("error: {err:#}");
        ExitCode::FAILURE
    })
}
