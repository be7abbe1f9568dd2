//! `cargo xtask par`: a signed provider archive, built and then checked the way a host loads it.
//!
//! Writes `build/keyvalue-inmemory.par.gz` (or `.par` with `--uncompressed`) with the
//! `provider-archive` crate: the binary for this machine's `{arch}-{os}` target, the WIT world
//! `provider` encoded as a WIT package (`world.wasm`), and claims signed with an issuer
//! (account) key and a subject (service) key. The keys live in `.keys/` (or `--keys DIR`),
//! are made on first use, and are git-ignored: never commit them.
//!
//! Then it loads the archive back (which verifies the claims' signature and every target
//! hash), checks the claims, extracts the binary, starts it from host data against a
//! nats-server of its own and waits for its health answer.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use nkeys::KeyPair;
use provider_archive::ProviderArchive;

use crate::process::root;
use crate::{flags, nats, run};

/// The provider's name and vendor in its claims.
pub const NAME: &str = "keyvalue-inmemory";
const VENDOR: &str = "keyvalue-inmemory";

/// The host's target name for this machine, as the 1.x host looks it up: `{arch}-{os}`.
pub fn target() -> String {
    format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS)
}

pub fn run(args: flags::Par) -> anyhow::Result<ExitCode> {
    let binary = match args.binary {
        Some(binary) => binary,
        None => run::build_provider(args.release)?,
    };
    let path = write(
        &binary,
        &root().join(&args.out),
        &root().join(&args.keys),
        !args.uncompressed,
    )?;
    println!("wrote {}", path.display());
    check(&path, args.no_start)?;
    Ok(ExitCode::SUCCESS)
}

/// Encodes the `provider` world of `wit/` as a binary WIT package.
pub fn encoded_world() -> anyhow::Result<Vec<u8>> {
    let mut resolve = wit_parser::Resolve::default();
    let (package, _) = resolve
        .push_path(root().join("wit"))
        .context("wit/ does not parse")?;
    resolve
        .select_world(&[package], Some("provider"))
        .context("wit/ has no world `provider`")?;
    wit_component::encode(&resolve, package).context("cannot encode the WIT package")
}

/// A seed from `dir/name`, or a new key written there (mode 0600).
fn key(dir: &Path, name: &str, new: fn() -> KeyPair) -> anyhow::Result<KeyPair> {
    let path = dir.join(name);
    if path.exists() {
        let seed = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        return KeyPair::from_seed(seed.trim())
            .with_context(|| format!("{} is not an nkey seed", path.display()));
    }
    std::fs::create_dir_all(dir)?;
    let pair = new();
    let seed = pair.seed().context("new key has no seed")?;
    std::fs::write(&path, format!("{seed}\n"))?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    eprintln!(
        "made a new {name} in {} (keep it; never commit it)",
        dir.display()
    );
    Ok(pair)
}

/// Writes the archive; answers its path.
pub fn write(binary: &Path, out: &Path, keys: &Path, gzip: bool) -> anyhow::Result<PathBuf> {
    let issuer = key(keys, "issuer.nk", KeyPair::new_account)?;
    let subject = key(keys, "subject.nk", KeyPair::new_service)?;
    let bytes =
        std::fs::read(binary).with_context(|| format!("cannot read {}", binary.display()))?;
    let version = env!("CARGO_PKG_VERSION").to_string();
    let mut par = ProviderArchive::new(NAME, VENDOR, None, Some(version));
    par.add_library(&target(), &bytes)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    par.add_wit_world(&encoded_world()?)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    std::fs::create_dir_all(out)?;
    let path = out.join(if gzip {
        "keyvalue-inmemory.par.gz"
    } else {
        "keyvalue-inmemory.par"
    });
    tokio::runtime::Runtime::new()?
        .block_on(par.write(&path, &issuer, &subject, gzip))
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}

/// Loads the archive back as a host would and proves the binary in it starts and answers.
pub fn check(path: &Path, no_start: bool) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    let par = runtime
        .block_on(ProviderArchive::try_load_file(path))
        .map_err(|e| anyhow::anyhow!("{} does not load: {e}", path.display()))?;
    let claims = par.claims().context("the archive has no claims")?;
    let metadata = claims
        .metadata
        .as_ref()
        .context("the claims have no metadata")?;
    anyhow::ensure!(
        metadata.name.as_deref() == Some(NAME),
        "claims name {:?}",
        metadata.name
    );
    anyhow::ensure!(
        metadata.vendor == VENDOR,
        "claims vendor {:?}",
        metadata.vendor
    );
    anyhow::ensure!(
        claims.subject.starts_with('V'),
        "subject {} is not a service key",
        claims.subject
    );
    anyhow::ensure!(
        claims.issuer.starts_with('A'),
        "issuer {} is not an account key",
        claims.issuer
    );
    anyhow::ensure!(
        par.targets() == vec![target()],
        "targets {:?}",
        par.targets()
    );
    anyhow::ensure!(par.wit_world().is_some(), "no WIT world in the archive");
    anyhow::ensure!(
        metadata.target_hashes.contains_key(&target()),
        "no hash for target {}",
        target()
    );
    eprintln!(
        "loaded {}: claims verified (issuer {}, subject {}), target {} hash verified, WIT world present",
        path.display(),
        claims.issuer,
        claims.subject,
        target()
    );
    if no_start {
        return Ok(());
    }
    let bytes = par
        .target_bytes(&target())
        .context("no binary for this target")?;
    let dir = tempfile::tempdir()?;
    let binary = dir.path().join("keyvalue-inmemory");
    std::fs::write(&binary, bytes)?;
    std::fs::set_permissions(&binary, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let server = nats::start_server()?;
    let url = server.url();
    let mut provider = run::start_provider(
        &binary,
        &url,
        "par-check",
        &claims.subject,
        Default::default(),
        &[],
        serde_json::json!({}),
    )?;
    let answer = runtime.block_on(async {
        let client = async_nats::connect(&url).await?;
        run::wait_for_health(&client, "par-check", &claims.subject, &mut provider).await
    });
    let _ = provider.kill();
    let _ = provider.wait();
    let answer = answer?;
    anyhow::ensure!(
        answer.contains("\"healthy\":true"),
        "health answer: {answer}"
    );
    eprintln!("the extracted binary started from host data and answered health: {answer}");
    Ok(())
}
