//! `cargo xtask wit [--check]`: the vendored WIT dependencies.
//!
//! `wit/deps.toml` names where each dependency comes from; `wit/deps.lock` records the digest
//! (sha256 and sha512, as wit-deps computes them over the unpacked directory) of what is
//! vendored under `wit/deps/`.
//!
//! - `cargo xtask wit` refreshes `wit/deps` and `wit/deps.lock` from `wit/deps.toml` with the
//!   `wit-deps` library (it downloads: run it where GitHub is reachable), then checks.
//! - `cargo xtask wit --check` works offline: every locked directory has the locked digest, the
//!   lock and the manifest name the same dependencies from the same places, nothing unlocked
//!   sits in `wit/deps`, and the world `provider` still parses and encodes.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, ensure, Context as _};
use wit_deps::{LockEntry, LockEntrySource, ManifestEntry};

use crate::process::root;
use crate::{flags, par};

pub fn run(args: flags::Wit) -> anyhow::Result<ExitCode> {
    let wit = root().join("wit");
    let runtime = tokio::runtime::Runtime::new()?;
    if !args.check {
        eprintln!("$ wit-deps update: wit/deps.toml → wit/deps/, wit/deps.lock");
        runtime
            .block_on(wit_deps::update_path(
                wit.join("deps.toml"),
                wit.join("deps.lock"),
                wit.join("deps"),
            ))
            .context("wit-deps could not refresh wit/deps (it needs network)")?;
    }
    drop(runtime);
    verify()?;
    println!("wit: wit/deps matches wit/deps.lock; world `provider` parses and encodes");
    Ok(ExitCode::SUCCESS)
}

/// The offline check of `--check`.
pub fn verify() -> anyhow::Result<()> {
    let wit = root().join("wit");
    tokio::runtime::Runtime::new()?.block_on(check(&wit))?;
    par::encoded_world().context("the world `provider` no longer parses")?;
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn check(wit: &Path) -> anyhow::Result<()> {
    let read = |name: &str| {
        let path = wit.join(name);
        std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
    };
    let manifest: wit_deps::Manifest =
        toml::from_str(&read("deps.toml")?).context("wit/deps.toml is not a wit-deps manifest")?;
    let lock: wit_deps::Lock =
        toml::from_str(&read("deps.lock")?).context("wit/deps.lock is not a wit-deps lock")?;

    let wanted: BTreeSet<&String> = manifest.keys().collect();
    let locked: BTreeSet<&String> = lock.keys().collect();
    ensure!(
        wanted == locked,
        "wit/deps.toml names {wanted:?} but wit/deps.lock locks {locked:?}: run `cargo xtask wit`"
    );
    for entry in std::fs::read_dir(wit.join("deps"))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        ensure!(
            lock.contains_key(&name),
            "wit/deps/{name} is not in wit/deps.lock: vendor dependencies with `cargo xtask wit`"
        );
    }
    for (name, entry) in lock.iter() {
        let from_manifest = match &manifest[name] {
            ManifestEntry::Url { url, .. } => url.to_string(),
            ManifestEntry::Path(path) => path.display().to_string(),
        };
        let from_lock = match &entry.source {
            Some(LockEntrySource::Url { url, .. }) => url.to_string(),
            Some(LockEntrySource::Path { path }) => path.display().to_string(),
            None => bail!("wit/deps.lock: {name} has no source"),
        };
        ensure!(
            from_manifest == from_lock,
            "{name}: wit/deps.toml says {from_manifest}, wit/deps.lock says {from_lock}: \
             run `cargo xtask wit`"
        );
        let dir = wit.join("deps").join(name);
        let digest = LockEntry::digest(&dir)
            .await
            .with_context(|| format!("cannot digest {}", dir.display()))?;
        ensure!(
            digest == entry.digest,
            "wit/deps/{name} does not match wit/deps.lock (edited by hand?)\n  \
             tree: sha256 = \"{}\", sha512 = \"{}\"\n  lock: sha256 = \"{}\", sha512 = \"{}\"",
            hex(&digest.sha256),
            hex(&digest.sha512),
            hex(&entry.digest.sha256),
            hex(&entry.digest.sha512),
        );
    }
    Ok(())
}
