//! semel-consumer: consumer-side exactly-once for Kafka-protocol topics.
//!
//! # Layout
//! - `dedup` (feature `dedup`, on by default): the RocksDB store of handled message keys,
//!   usable with any consumer.
//! - [`assignor`]: range, round-robin, sticky and cooperative-sticky as pure functions, and
//!   the embedded consumer protocol's encodings.
//! - [`clock`]: the injected clock.
//!
//! The group consumer (range, round-robin, sticky and cooperative-sticky assignment) is not
//! written yet (issue 6).
#![deny(missing_docs)]

pub mod assignor;
pub mod clock;
#[cfg(feature = "dedup")]
pub mod dedup;
