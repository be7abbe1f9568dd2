//! Running things: the workspace root, cargo, and commands echoed before they run.

use std::process::Command;

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
