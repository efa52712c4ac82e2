//! Consumer-side dedup: a RocksDB store of the keys of handled messages, so a message
//! delivered again (after a crash, a rebalance, or a producer's resend) is dropped before the
//! handler sees it. See [`store`] for the layout and guarantees, [`middleware`] for
//! [`DedupConsumer`], which wraps semel's group consumer, and [`changelog`] for how marks
//! follow a partition to a consumer on another host.
//!
//! Standalone use with any consumer (rdkafka, for example): for each message, compute its
//! [`KeyHash`], [`DedupStore::claim`] it, handle it only on `Fresh`/`Reclaimed` (which carry
//! the claim's token), then [`DedupStore::mark_done`] with that token (with the next offset,
//! and the handler's own state writes in the same atomic batch) or [`DedupStore::release`] on
//! failure. A handler whose claim was taken over after its lease ran out gets
//! `DedupError::LeaseLost`, and its batch is not applied.
//!
//! ```ignore
//! // With the rdkafka crate (not compiled here):
//! let key = KeyHash::new("billing", message.topic(), message.key().unwrap_or_default());
//! match store.claim(key)? {
//!     Claim::Fresh(token) | Claim::Reclaimed(token) => match handle(&message) {
//!         Ok(()) => store.mark_done(
//!             key,
//!             token,
//!             Some(("billing", message.topic(), message.partition(), message.offset() + 1)),
//!             |state| state.put(b"balance", &new_balance),
//!         )?,
//!         Err(_) => store.release(key, token)?,
//!     },
//!     Claim::Duplicate => {}                       // already handled: skip
//!     Claim::InProgress { .. } => { /* another handler has it; retry later */ }
//! }
//! ```
//!
//! Side effects outside the batch (an HTTP call, a file append) are at-least-once: a crash
//! between the effect and `mark_done` leaves a claim that the next open takes over, and the message is
//! handled again. Writes made through the batch are exactly-once.

pub mod changelog;
mod filter;
pub mod inspect;
pub mod middleware;
mod recent;
mod settlement;
pub mod store;

pub use changelog::{ChangelogConfig, ChangelogError, RestoreMetrics};
pub use middleware::{
    DedupConsumer, Fresh, KeyFn, KeySource, MiddlewareConfig, MiddlewareError, MiddlewareMetrics,
    MissingKey,
};
pub use store::{
    Check, Claim, ClaimToken, DedupConfig, DedupCounts, DedupError, DedupStore, KeyHash, StateBatch,
};
