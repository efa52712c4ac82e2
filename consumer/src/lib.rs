//! semel-consumer: consumer-side exactly-once for Kafka-protocol topics.
//!
//! # Layout
//! - `dedup` (feature `dedup`, on by default): the RocksDB store of handled message keys,
//!   usable with any consumer.
//! - [`assignor`]: range, round-robin, sticky and cooperative-sticky as pure functions, and
//!   the embedded consumer protocol's encodings.
//! - [`clock`]: the injected clock.
//!
//! - [`consumer`]: [`Consumer`], a group member (`subscribe`) or a reader of chosen
//!   partitions (`assign`), with [`RebalanceListener`] callbacks.
//! - [`config`]: [`ConsumerConfig`] under the Java client's names.
//! - [`record`]: [`ConsumerRecord`] and [`ConsumerError`].
//! - `group` (membership, heartbeats, commits) and `fetch` (record batch decoding) are
//!   internal.
//!
//! ```no_run
//! # async fn run() -> Result<(), semel_consumer::ConsumerError> {
//! use std::time::Duration;
//! use semel_consumer::{Consumer, ConsumerConfig, Strategy};
//! let mut consumer = Consumer::connect(ConsumerConfig {
//!     bootstrap_servers: vec!["127.0.0.1:9092".into()],
//!     group_id: Some("billing".into()),
//!     partition_assignment_strategy: vec![Strategy::CooperativeSticky],
//!     ..ConsumerConfig::default()
//! })
//! .await?;
//! consumer.subscribe(["payments"])?;
//! loop {
//!     for record in consumer.poll(Duration::from_secs(1)).await? {
//!         println!("{}-{}@{}: {:?}", record.topic, record.partition, record.offset, record.value);
//!     }
//!     consumer.commit().await?; // what poll returned is handled
//! }
//! # }
//! ```
#![deny(missing_docs)]

pub mod assignor;
pub mod clock;
pub mod config;
pub mod consumer;
#[cfg(feature = "dedup")]
pub mod dedup;
mod fetch;
#[doc(hidden)]
pub mod fuzzing;
mod group;
pub mod record;

pub use assignor::{Strategy, TopicPartition};
pub use config::{AutoOffsetReset, ConfigError, ConsumerConfig, IsolationLevel};
pub use consumer::{Consumer, ConsumerMetrics, RebalanceContext, RebalanceListener};
pub use record::{ConsumerError, ConsumerRecord, Headers, HeadersIter};
pub use semel_client::ConsumerGroupMetadata;
