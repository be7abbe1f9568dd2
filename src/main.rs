//! The provider binary, as a wasmCloud host starts it: host data on stdin.

use wasmcloud_provider_sdk::initialize_observability;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    initialize_observability!(keyvalue_inmemory::NAME, None::<std::path::PathBuf>);
    keyvalue_inmemory::run().await
}
