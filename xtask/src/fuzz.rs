//! `cargo xtask fuzz [--seconds N] [TARGET…]`: a bounded cargo-fuzz run of each target in
//! fuzz/ (default: all, 30 s each), starting from the seed corpus in fuzz/corpus/.
//!
//! Needs the nightly toolchain (rustup) and cargo-fuzz, which it installs into
//! target/tools/cargo-fuzz. The growing corpus goes to target/fuzz/corpus/ and crashes to
//! target/fuzz/artifacts/, so a run never dirties the repository; a crash fails the task and
//! names the input to add to fuzz/corpus/ once fixed.

use std::process::{Command, ExitCode};

use anyhow::{bail, Context as _};

use crate::process::{cargo, root, run_command};
use crate::{flags, tools};

const TARGETS: [&str; 2] = ["snapshot_decode", "engine_ops"];

fn cargo_fuzz() -> anyhow::Result<std::path::PathBuf> {
    let bin = tools::dir("cargo-fuzz").join("bin/cargo-fuzz");
    if !bin.is_file() {
        run_command(
            cargo()
                .args([
                    "install",
                    "--locked",
                    "--quiet",
                    "cargo-fuzz@0.13.2",
                    "--root",
                ])
                .arg(tools::dir("cargo-fuzz")),
        )
        .context("cannot install cargo-fuzz")?;
    }
    Ok(bin)
}

pub fn run(args: flags::Fuzz) -> anyhow::Result<ExitCode> {
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output();
    if !nightly.is_ok_and(|o| o.status.success()) {
        bail!("cargo fuzz needs the nightly toolchain: rustup toolchain install nightly");
    }
    let cargo_fuzz = cargo_fuzz()?;
    let targets: Vec<String> = if args.targets.is_empty() {
        TARGETS.iter().map(|t| t.to_string()).collect()
    } else {
        args.targets
    };
    let work = root().join("target/fuzz");
    for target in &targets {
        anyhow::ensure!(
            TARGETS.contains(&target.as_str()),
            "no fuzz target {target} (there are {TARGETS:?})"
        );
        let corpus = work.join("corpus").join(target);
        let artifacts = work.join("artifacts").join(target);
        std::fs::create_dir_all(&corpus)?;
        std::fs::create_dir_all(&artifacts)?;
        let mut run = Command::new("rustup");
        run.current_dir(root())
            .args(["run", "nightly"])
            .arg(&cargo_fuzz)
            .args(["fuzz", "run", "--fuzz-dir", "fuzz", "--target-dir"])
            .arg(work.join("build"))
            .arg(target)
            .arg(&corpus)
            .arg(root().join("fuzz/corpus").join(target))
            .arg("--")
            .arg(format!("-max_total_time={}", args.seconds))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg("-print_final_stats=1");
        run_command(&mut run).with_context(|| {
            format!(
                "fuzz target {target} failed: the crashing input is in {}",
                artifacts.display()
            )
        })?;
    }
    Ok(ExitCode::SUCCESS)
}
