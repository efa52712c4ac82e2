//! semel-client: the connection layer shared by `semel-producer` and `semel-consumer`, for any
//! Kafka-protocol broker (semel-broker, Apache Kafka, Redpanda).
//!
//! # Layout
//! - [`connection`]: one broker connection: framing, correlation ids, pipelining, ApiVersions
//!   negotiation (with the v0 fallback), request timeouts, poisoning on any framing error.
//! - [`cluster`]: bootstrap over several addresses, a pooled connection per broker with
//!   reconnect backoff, and the metadata cache (partition → leader).
//! - [`error`]: [`ClientError`], with Kafka error codes as data.
//!
//! Responses are decoded with `kafka-protocol`, whose array decoders pre-allocate from counts on
//! the wire: the client trusts the broker it talks to not to send absurd counts (frames are
//! still capped at `max_response_bytes`).
//!
//! ```no_run
//! # async fn run() -> Result<(), semel_client::ClientError> {
//! use semel_client::{ClientConfig, Cluster};
//! let cluster = Cluster::connect(ClientConfig {
//!     bootstrap_servers: vec!["127.0.0.1:9092".into()],
//!     ..ClientConfig::default()
//! })
//! .await?;
//! println!("{:?}", cluster.topic("orders"));
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod cluster;
pub mod connection;
pub mod error;

pub use cluster::{ClientConfig, Cluster, PartitionInfo, TopicInfo, needs_metadata_refresh};
pub use connection::{Connection, ConnectionConfig, InFlight};
pub use error::{ClientError, check_code};
