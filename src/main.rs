//! The provider binary, as a wasmCloud host starts it: host data on stdin.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    keyvalue_inmemory::run().await
}
