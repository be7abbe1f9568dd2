//! Starting the provider binary as a wasmCloud 1.x host does: host data as one base64 line on
//! stdin, links as host data carries them.

use std::io::Write as _;
use std::process::{Child, Command, Stdio};

use anyhow::Context as _;
use base64::Engine as _;
use serde_json::{json, Map, Value};

/// What one provider is started with.
pub struct HostData<'a> {
    /// The host id; shutdown requests must name it.
    pub host_id: &'a str,
    pub lattice: &'a str,
    pub nats_url: &'a str,
    pub provider_key: &'a str,
    pub instance_id: &'a str,
    /// Provider config.
    pub config: Map<String, Value>,
    /// Link definitions ([`link`]).
    pub links: Vec<Value>,
    /// More host data fields (`otel_config`, `log_level`, …), added last.
    pub extra: Value,
}

impl HostData<'_> {
    /// The host data JSON: both required keys and every field the SDK reads.
    pub fn to_json(&self) -> Value {
        let mut host_data = json!({
            "host_id": self.host_id,
            "lattice_rpc_prefix": self.lattice,
            "lattice_rpc_url": self.nats_url,
            "provider_key": self.provider_key,
            "instance_id": self.instance_id,
            "env_values": {},
            "config": self.config,
            "link_definitions": self.links,
        });
        if let (Some(fields), Some(extra)) = (host_data.as_object_mut(), self.extra.as_object()) {
            fields.extend(extra.clone());
        }
        host_data
    }
}

/// A `wasi:keyvalue` link named `name` from component `source` to provider `target`, as host
/// data and `linkdefs.put` carry it.
pub fn link(source: &str, target: &str, name: &str, target_config: Value) -> Value {
    keyvalue_link(
        source,
        target,
        name,
        &["store", "atomics", "batch"],
        json!({}),
        target_config,
    )
}

/// A `wasi:keyvalue/watcher` link named `name` from provider `source` to component `target`,
/// with its `watch` settings as `source_config`.
pub fn watch_link(source: &str, target: &str, name: &str, source_config: Value) -> Value {
    keyvalue_link(source, target, name, &["watcher"], source_config, json!({}))
}

fn keyvalue_link(
    source: &str,
    target: &str,
    name: &str,
    interfaces: &[&str],
    source_config: Value,
    target_config: Value,
) -> Value {
    json!({
        "source_id": source,
        "target": target,
        "name": name,
        "wit_namespace": "wasi",
        "wit_package": "keyvalue",
        "interfaces": interfaces,
        "source_config": source_config,
        "target_config": target_config,
    })
}

/// Spawns `command` (the provider binary, its environment and outputs set by the caller) with
/// `host_data` (JSON) written to its stdin as the host writes it, then closes stdin.
pub fn spawn_provider(mut command: Command, host_data: &str) -> anyhow::Result<Child> {
    let mut child = command
        .stdin(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {:?}", command.get_program()))?;
    let encoded = base64::engine::general_purpose::STANDARD.encode(host_data);
    let mut stdin = child.stdin.take().context("the provider's stdin")?;
    writeln!(stdin, "{encoded}").context("cannot write host data")?;
    Ok(child)
}
