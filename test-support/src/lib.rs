//! What the black-box tests (`tests/`), `cargo xtask` and the real-lattice test (`e2e/`) share:
//! a nats-server of their own on a loopback port that cannot race ([`nats`]), and starting the
//! provider binary as a wasmCloud 1.x host does ([`host`]).
//!
//! Synchronous and small on purpose: no NATS client, no runtime; each user brings its own.

pub mod host;
pub mod nats;

/// The workspace root (this crate lives in `test-support/` under it).
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("test-support lives in the workspace")
        .to_path_buf()
}
