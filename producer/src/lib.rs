//! semel-producer: an idempotent Kafka producer library.
//!
//! Planned scope (issue 4). Nothing is implemented here yet; the crate exists so the workspace
//! layout is fixed.
#![deny(missing_docs)]
