//! semel-client: the connection layer shared by `semel-producer` and `semel-consumer`, for any
//! Kafka-protocol broker (semel-broker, Apache Kafka, Redpanda).
//!
//! # Layout
//! - [`connection`]: one broker connection: framing, correlation ids, pipelining, ApiVersions
//!   negotiation (with the v0 fallback), request timeouts, poisoning on any framing error.
//! - [`admin`]: topics, groups, committed offsets and lag, producers (the `semel` tool's API).
//! - [`cluster`]: bootstrap over several addresses, a pooled connection per broker with
//!   reconnect backoff, and the metadata cache (partition → leader).
//! - [`security`]: TLS and SASL (PLAIN, SCRAM) for a connection, with the Java client's
//!   setting names; its SCRAM code also serves semel-broker.
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

pub mod admin;
pub mod cluster;
pub mod connection;
pub mod error;
pub mod properties;
pub mod security;

pub use admin::Admin;
pub use cluster::{ClientConfig, Cluster, PartitionInfo, TopicInfo, needs_metadata_refresh};
pub use connection::{Connection, ConnectionConfig, InFlight};
pub use error::{ClientError, check_code};
pub use properties::PropertiesError;
pub use security::{SaslMechanism, SecurityConfig, SecurityProtocol};

/// A group consumer's identity in its group, as a transactional producer sends it with the
/// offsets it commits (`send_offsets_to_transaction`, KIP-447): the group coordinator refuses
/// them if the member was fenced or its generation is over, so a consumer that lost its
/// partitions cannot commit through a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerGroupMetadata {
    /// `group.id`.
    pub group_id: String,
    /// The generation the member joined (-1 when not in a group generation).
    pub generation_id: i32,
    /// The member id the coordinator gave ("" when none).
    pub member_id: String,
    /// `group.instance.id` of a static member.
    pub group_instance_id: Option<String>,
}

impl ConsumerGroupMetadata {
    /// Metadata without a generation: the coordinator then checks nothing about the member
    /// (as the Java client's `new ConsumerGroupMetadata(groupId)`).
    pub fn new(group_id: impl Into<String>) -> Self {
        Self {
            group_id: group_id.into(),
            generation_id: -1,
            member_id: String::new(),
            group_instance_id: None,
        }
    }
}
