//! `cargo xtask ci`: everything CI checks, in order, each step timed. `.ci/run` calls it on a
//! clean clone; run here, it answers the same question before a push.

use std::process::{Command, ExitCode};
use std::time::Instant;

use crate::process::{cargo, root, run_command};
use crate::{check, flags, fuzz, par, test};

pub fn run(args: flags::Ci) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    // Three workspaces: the provider's, e2e's (its own lock) and fuzz's (nightly).
    step(
        "cargo fmt --check (the provider's, e2e's and fuzz's workspaces)",
        || {
            for manifest in ["Cargo.toml", "e2e/Cargo.toml", "fuzz/Cargo.toml"] {
                run_command(cargo().current_dir(root()).args([
                    "fmt",
                    "--all",
                    "--check",
                    "--manifest-path",
                    manifest,
                ]))?;
            }
            Ok(())
        },
    )?;
    step(
        "cargo clippy (the provider's workspace, then e2e's)",
        || {
            let clippy = ["clippy", "--workspace", "--all-targets", "--locked", "--"];
            let deny = ["-D", "warnings"];
            run_command(cargo().current_dir(root()).args(clippy).args(deny))?;
            // In e2e/, so that its .cargo/config.toml builds into the provider's target/.
            run_command(
                cargo()
                    .current_dir(root().join("e2e"))
                    .args(clippy)
                    .args(deny),
            )
        },
    )?;
    step(
        "cargo xtask check (wit/, wasmcloud.toml, wadm.yaml, docker-compose.yml, Dockerfile, \
         flake.nix)",
        || succeeded(check::run(flags::Check {})?),
    )?;
    step(
        "cargo xtask test (with the real-lattice test: a wasmCloud host, components, our archive)",
        || {
            succeeded(test::run(flags::Test {
                e2e_only: false,
                cargo_args: vec!["--locked".into()],
            })?)
        },
    )?;
    step(
        &format!(
            "cargo xtask fuzz (snapshot decoder, engine operations; {} s each, nightly)",
            args.fuzz_seconds
        ),
        || {
            succeeded(fuzz::run(flags::Fuzz {
                seconds: args.fuzz_seconds,
                targets: Vec::new(),
            })?)
        },
    )?;
    step(
        "cargo xtask par (the debug binary the tests built, uncompressed: no second build)",
        || {
            succeeded(par::run(flags::Par {
                release: false,
                out: root().join("target/par-check"),
                keys: root().join(".keys"),
                uncompressed: true,
                binary: Some(root().join("target/debug/keyvalue-inmemory")),
                no_start: false,
            })?)
        },
    )?;
    step(
        "disk used by target/ (CI machines have run out: keep this small)",
        || {
            run_command(
                Command::new("du")
                    .current_dir(root())
                    .args(["-sh", "target"]),
            )
        },
    )?;
    println!(
        "\n=== all CI steps passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs one step under a heading with the time it started and took.
fn step(name: &str, run: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    let started = Instant::now();
    println!("\n=== {name} ({})", utc_time());
    let result = run();
    println!(
        "=== {} after {:.0} s",
        if result.is_ok() { "done" } else { "FAILED" },
        started.elapsed().as_secs_f64()
    );
    result.map_err(|err| err.context(format!("CI step failed: {name}")))
}

fn succeeded(code: ExitCode) -> anyhow::Result<()> {
    anyhow::ensure!(code == ExitCode::SUCCESS, "exited with a failure");
    Ok(())
}

/// The wall clock, `HH:MM:SS` UTC.
fn utc_time() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "{:02}:{:02}:{:02}",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    )
}
