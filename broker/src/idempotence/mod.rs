//! Broker-side idempotence: the sequence rules ([`rules`]) and each partition's producer
//! state ([`table`]), persisted in snapshots (`snapshot`).
//!
//! References: docs/idempotence.md, KIP-98, KIP-360, KIP-854.

pub mod rules;
pub(crate) mod snapshot;
pub mod table;

pub use rules::{BatchIdentity, CACHED_BATCHES, CachedBatch, Decision, ProducerEntry};
pub use table::{DEFAULT_MAX_PRODUCERS_PER_PARTITION, ProducerStateTable};
