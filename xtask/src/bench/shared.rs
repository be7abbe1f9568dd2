//! What the parts of the benchmark share.

use std::process::Child;
use std::time::Duration;

/// The lattice all benchmark processes join.
pub const LATTICE: &str = "bench";
/// The bucket every call names: the link's name, which is what wasmCloud's keyvalue-nats
/// provider takes a bucket to be (ours and keyvalue-redis accept any).
pub const BUCKET: &str = "default";
/// Per-call timeout: a call not answered by then counts as lost.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// The health message of provider `provider_key` of the benchmark's lattice (2 s at most).
pub async fn health(nats: &async_nats::Client, provider_key: &str) -> anyhow::Result<String> {
    use anyhow::Context as _;
    let subject = format!("wasmbus.rpc.{LATTICE}.{provider_key}.health");
    let reply = tokio::time::timeout(Duration::from_secs(2), nats.request(subject, "{}".into()))
        .await
        .context("health timed out")??;
    let health: serde_json::Value = serde_json::from_slice(&reply.payload)?;
    Ok(health["message"].as_str().unwrap_or_default().to_owned())
}

/// Child processes, killed when dropped (on every way out, errors included).
pub struct Killed(pub Vec<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
