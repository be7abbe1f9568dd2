//! The store of keyvalue-inmemory: namespaces of buckets of keys, in memory, with limits,
//! paged listings and a snapshot file format.
//!
//! Plain synchronous Rust with no wRPC, NATS or SDK types, so it can be unit-tested, fuzzed
//! (`fuzz/`) and benchmarked (`benches/engine.rs`) alone. The provider crate serves it.
//!
//! # Layout, one concept a file
//!
//! - `engine.rs`: [`Engine`], the API: get, set, delete, increment, the batches, and the shape
//!   of the data (namespaces → buckets → entries, each a DashMap).
//! - `item.rs`: how one entry lives in memory (key and value in one allocation behind a thin
//!   pointer, and its stamp: deadline and last use); `clock.rs`: the units of the stamp.
//! - `expiry.rs`: the incremental sweep of expired entries; `evict.rs`: approximate LRU
//!   eviction; `raw.rs`: the slot-level walks of a shard both need.
//! - `limits.rs`: [`Limits`] and the checks every write makes first.
//! - `error.rs`: [`EngineError`], why an operation was refused.
//! - `usage.rs`: [`Usage`], and how a write reserves room before it writes, so that counters
//!   never pass a limit.
//! - `answer.rs`: [`AnswerRefused`], bounding what a read copies into an answer.
//! - `listing.rs`: paged, sorted key listings; `cursor.rs`: the [`Cursor`] of their pages.
//! - [`snapshot`]: the snapshot file format, its writer and its verifying reader.
//! - `replica.rs`: writes a replicated log applies (whatever the local limits), and the check
//!   its writer makes first.
//! - `watch.rs`: the [`Observer`] told of every change in a watched namespace, in order per
//!   key.

mod answer;
mod clock;
mod cursor;
mod engine;
mod error;
mod evict;
mod expiry;
mod item;
mod limits;
mod listing;
mod raw;
mod replica;
pub mod snapshot;
mod usage;
mod watch;

#[cfg(test)]
mod testing;

pub use answer::{AnswerRefused, ANSWER_ELEMENT_BYTES};
pub use clock::{MAX_TTL, TICK};
pub use cursor::Cursor;
pub use engine::{parse_counter, Engine};
pub use error::EngineError;
pub use evict::SAMPLES as EVICTION_SAMPLES;
pub use expiry::{Swept, SWEEP_RUN};
pub use limits::Limits;
pub use listing::{KeyPage, CURSOR_IDLE_TTL, MAX_LISTINGS_PER_NAMESPACE};
pub use replica::quietly;
pub use usage::Usage;
pub use watch::{Change, Observer, What};
