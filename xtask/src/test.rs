//! `cargo xtask test`: the whole suite, with what it needs provisioned: a nats-server, and the
//! provider archive the real-lattice test (e2e/tests/lattice.rs) hands to a wasmCloud host.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use crate::{cargo, echo, flags, nats, par, root, run_command};

pub fn run(args: flags::Test) -> anyhow::Result<ExitCode> {
    // `-- --test lattice` selects nothing in the provider's workspace: say where it went.
    anyhow::ensure!(
        args.e2e_only
            || !args
                .cargo_args
                .windows(2)
                .any(|w| w == ["--test", "lattice"]),
        "the real-lattice test is in e2e/, a workspace of its own: `cargo xtask test --e2e-only \
         [-- args]` runs it"
    );
    let nats_server = nats::server_binary()?;
    // The locking flags apply to both workspaces; the rest of the arguments to the one run.
    let locking: Vec<String> = (args.cargo_args.iter())
        .filter(|arg| ["--locked", "--frozen", "--offline"].contains(&arg.as_str()))
        .cloned()
        .collect();
    if !args.e2e_only {
        // Build everything first: a failure to build stops here, before any server starts.
        run_command(&mut cargo_test(Workspace::Provider, &args.cargo_args, true))?;
    }
    // The archive is made of the binary the provider's own tests run. A run filtered to some
    // targets (e.g. `-- --test snapshots`) may not have built it: build it, as the provider's
    // integration tests do (`contract` is one), so its features are theirs.
    let mut binary = cargo();
    binary
        .current_dir(root())
        .args(["test", "--workspace", "--no-run", "--test", "contract"])
        .args(&locking);
    run_command(&mut binary)?;
    let archive = e2e_archive(&root().join("target/debug/keyvalue-inmemory"))?;
    let mut failed = false;
    if !args.e2e_only {
        let mut command = cargo_test(Workspace::Provider, &args.cargo_args, false);
        command.env("NATS_SERVER_BIN", &nats_server);
        echo(&command);
        failed |= !command.status()?.success();
    }
    // Arguments that select tests (a filter, `--test …`) select the provider's: the
    // real-lattice test then runs only when asked for (`--e2e-only`).
    let filtered = args.cargo_args.len() > locking.len();
    if args.e2e_only || !filtered {
        let e2e_args = if args.e2e_only {
            &args.cargo_args
        } else {
            &locking
        };
        let mut command = cargo_test(Workspace::E2e, e2e_args, false);
        command
            .env("NATS_SERVER_BIN", &nats_server)
            .env("KEYVALUE_PAR", &archive);
        echo(&command);
        failed |= !command.status()?.success();
    } else {
        eprintln!(
            "the real-lattice test (e2e/) skipped: the arguments select the provider's tests; \
             `cargo xtask test --e2e-only` runs it"
        );
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The two workspaces: the provider's (with the store, test-support and xtask), and e2e's,
/// which has a lock of its own for the pins of the wasmCloud host library.
#[derive(Clone, Copy)]
enum Workspace {
    Provider,
    E2e,
}

/// `cargo test --workspace` with `args`; `--no-run` goes before any `--` (the arguments
/// after it are the test harness's). Both workspaces build into the one `target/`, so what
/// they share (most of the dependency tree) is built once.
fn cargo_test(workspace: Workspace, args: &[String], no_run: bool) -> Command {
    let split = args
        .iter()
        .position(|arg| arg == "--")
        .unwrap_or(args.len());
    let (cargo_args, harness) = args.split_at(split);
    let mut command = cargo();
    match workspace {
        Workspace::Provider => command.current_dir(root()),
        Workspace::E2e => command
            .current_dir(root().join("e2e"))
            .env("CARGO_TARGET_DIR", root().join("target")),
    };
    command.args(["test", "--workspace"]).args(cargo_args);
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
