//! semel-broker: a single-node broker that speaks the Apache Kafka wire protocol, with durable
//! partition logs, so any Kafka client can produce to it and consume from it.
//!
//! # Layout
//! The modules follow the path a request takes:
//! - [`server`]: accept connections, read frames ([`server::frame`]), refuse bodies that are not
//!   safe to decode ([`server::guard`]), decode, and answer in order (`server::connection`).
//! - `api`: one file per Kafka API (`api/produce.rs`, `api/fetch.rs`, ...), and the list of
//!   supported versions that ApiVersions advertises.
//! - [`log`]: partition logs: segments, sparse offset and time indexes, recovery of a torn tail,
//!   roll and retention.
//! - `partition`: a log behind its lock, plus group commit for `acks=all`.
//! - `catalog`: topics, partitions and topic configs, persisted atomically.
//! - [`idempotence`] and `producer_ids`: the idempotent-producer rules, per-partition producer
//!   state with snapshots, and the persisted producer-id allocator (InitProducerId).
//! - [`config`], [`clock`], `state_file`: settings, injected time, atomic state files.
//!
//! # Embedding
//! ```no_run
//! # async fn run() -> Result<(), semel_broker::StartError> {
//! let config = semel_broker::BrokerConfig {
//!     listen: "127.0.0.1:0".parse().expect("address"),
//!     data_dir: "/tmp/semel-example".into(),
//!     ..Default::default()
//! };
//! let broker = semel_broker::Broker::start(config).await?;
//! println!("listening on {}", broker.local_addr());
//! broker.shutdown().await;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod acl;
mod api;
mod blocking;
mod broker;
mod catalog;
pub mod clock;
pub mod config;
mod dedup_window;
#[doc(hidden)]
pub mod fuzzing;
pub mod group;
pub mod idempotence;
pub mod log;
mod metrics;
mod partition;
mod producer_ids;
pub mod security;
pub mod server;
mod state_file;
mod transactions;

pub use broker::{Broker, BrokerHandle, StartError};
pub use catalog::CatalogOpenError;
pub use config::{BrokerConfig, ConfigError};
pub use group::GroupConfig;
pub use state_file::StateFileError;
