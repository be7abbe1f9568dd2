//! `cargo xtask test`: the whole suite, with what it needs provisioned: a nats-server, and the
//! provider archive the real-lattice test (e2e/tests/lattice.rs) hands to a wasmCloud host.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use crate::{cargo, echo, flags, nats, par, root, run_command};

pub fn run(args: flags::Test) -> anyhow::Result<ExitCode> {
    let nats_server = nats::server_binary()?;
    // Build everything first, in the same invocation (same feature unification) as the run
    // below: the provider binary the archive is made of is then the one the other tests run.
    // `cargo build -p keyvalue-inmemory` would resolve features for the provider alone and
    // build a second copy of the whole tree (wasmtime included).
    run_command(&mut cargo_test(&args, true))?;
    // A run filtered to some targets (e.g. `-- --test lattice`) may not have built the provider
    // binary, and the archive would hold a stale one: build it, with the same features (the
    // binary is built for a package's integration tests; `contract` is one).
    let mut binary = cargo();
    binary
        .current_dir(root())
        .args(["test", "--workspace", "--no-run", "--test", "contract"])
        .args(
            args.cargo_args
                .iter()
                .filter(|arg| ["--locked", "--frozen", "--offline"].contains(&arg.as_str())),
        );
    run_command(&mut binary)?;
    let archive = e2e_archive(&root().join("target/debug/keyvalue-inmemory"))?;
    let mut command = cargo_test(&args, false);
    command
        .env("NATS_SERVER_BIN", &nats_server)
        .env("KEYVALUE_PAR", &archive);
    echo(&command);
    let status = command.status()?;
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `cargo test --workspace` with the user's arguments; `--no-run` goes before any `--` (the
/// arguments after it are the test harness's).
fn cargo_test(args: &flags::Test, no_run: bool) -> Command {
    let split = (args.cargo_args.iter())
        .position(|arg| arg == "--")
        .unwrap_or(args.cargo_args.len());
    let (cargo_args, harness) = args.cargo_args.split_at(split);
    let mut command = cargo();
    command
        .current_dir(root())
        .args(["test", "--workspace"])
        .args(cargo_args);
    if no_run {
        command.arg("--no-run");
    } else {
        command.args(harness);
    }
    command
}

/// The archive the host starts in the real-lattice test: the debug build the other tests run,
/// stripped (the host copies it into its cache), uncompressed, signed with throwaway keys under
/// target/.
fn e2e_archive(binary: &Path) -> anyhow::Result<PathBuf> {
    let dir = root().join("target/e2e");
    std::fs::create_dir_all(&dir)?;
    let stripped = dir.join("keyvalue-inmemory");
    strip(binary, &stripped)?;
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
