//! `cargo xtask test`: the whole suite, with what it needs provisioned: a nats-server, and the
//! provider archive the real-lattice test (e2e/tests/lattice.rs) hands to a wasmCloud host.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use crate::process::{cargo, echo, root, run_command};
use crate::{flags, nats, par};

pub fn run(args: flags::Test) -> anyhow::Result<ExitCode> {
    let split = (args.cargo_args.iter())
        .position(|arg| arg == "--")
        .unwrap_or(args.cargo_args.len());
    let (cargo_args, harness) = args.cargo_args.split_at(split);
    // `-- --test lattice` selects nothing in the provider's workspace: say where it went.
    anyhow::ensure!(
        args.e2e_only
            || !(cargo_args.iter().any(|a| a == "--test=lattice")
                || cargo_args.windows(2).any(|w| w == ["--test", "lattice"])),
        "the real-lattice test is in e2e/, a workspace of its own: `cargo xtask test --e2e-only \
         [-- args]` runs it"
    );
    let nats_server = nats::server_binary()?;
    let mut failed = false;
    if !args.e2e_only {
        // Build everything first: a failure to build stops here, before any server starts.
        run_command(&mut cargo_test(Workspace::Provider, &args.cargo_args, true))?;
        let mut command = cargo_test(Workspace::Provider, &args.cargo_args, false);
        command.env("NATS_SERVER_BIN", &nats_server);
        echo(&command);
        failed = !command.status()?.success();
    }
    // Arguments that choose which tests run choose the provider's: the real-lattice test then
    // runs only when asked for (`--e2e-only`). As `cargo test` stops at the first failing test
    // binary, a failure stops the run before it too, unless `--no-fail-fast`.
    let selecting = cargo_args.iter().any(|arg| selects_tests(arg)) || names_tests(harness);
    let fail_fast = !cargo_args.iter().any(|arg| arg == "--no-fail-fast");
    if !args.e2e_only && selecting {
        eprintln!(
            "the real-lattice test (e2e/) skipped: the arguments choose the provider's tests; \
             `cargo xtask test --e2e-only` runs it"
        );
    } else if failed && fail_fast {
        eprintln!("the real-lattice test (e2e/) skipped: the provider's tests failed");
    } else {
        // The archive is made of the binary the provider's own tests run. With
        // `--e2e-only` it may not be built yet: build it as the provider's integration tests
        // do (`contract` is one), so its features are theirs.
        let locking = (cargo_args.iter())
            .filter(|arg| ["--locked", "--frozen", "--offline"].contains(&arg.as_str()));
        let mut binary = cargo();
        binary
            .current_dir(root())
            .args(["test", "--workspace", "--no-run", "--test", "contract"])
            .args(locking);
        run_command(&mut binary)?;
        let archive = e2e_archive(&root().join("target/debug/keyvalue-inmemory"))?;
        let mut command = cargo_test(Workspace::E2e, &args.cargo_args, false);
        command
            .env("NATS_SERVER_BIN", &nats_server)
            .env("KEYVALUE_PAR", &archive);
        echo(&command);
        failed |= !command.status()?.success();
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Whether the test harness's arguments (`--` and after) name tests: a filter, or `--skip`.
fn names_tests(harness: &[String]) -> bool {
    const TAKE_A_VALUE: [&str; 5] = [
        "--test-threads",
        "--color",
        "--format",
        "--logfile",
        "--shuffle-seed",
    ];
    let mut args = harness.iter().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--skip" || !arg.starts_with('-') {
            return true;
        }
        if TAKE_A_VALUE.contains(&arg.as_str()) {
            args.next();
        }
    }
    false
}

/// Whether a `cargo test` argument chooses which tests run (a package, a target).
fn selects_tests(arg: &str) -> bool {
    let name = arg.split('=').next().unwrap_or(arg);
    [
        "-p",
        "--package",
        "--test",
        "--tests",
        "--lib",
        "--bin",
        "--bins",
        "--example",
        "--examples",
        "--bench",
        "--benches",
        "--doc",
        "--all-targets",
        "--exclude",
    ]
    .contains(&name)
        || (arg.starts_with("-p") && arg.len() > 2)
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
