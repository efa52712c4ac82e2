//! What the consumer hands out: [`ConsumerRecord`] and [`ConsumerError`].

use std::sync::Arc;

use bytes::Bytes;
use kafka_protocol::ResponseError;
use semel_client::ClientError;
pub use semel_records::{Headers, HeadersIter};

use crate::assignor::TopicPartition;
use crate::config::ConfigError;

/// One record read from a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerRecord {
    /// The topic.
    pub topic: Arc<str>,
    /// The partition.
    pub partition: i32,
    /// The record's offset; commit `offset + 1` once it is handled.
    pub offset: i64,
    /// Milliseconds since the Unix epoch (create or log-append time, per the topic).
    pub timestamp: i64,
    /// The key, if any.
    pub key: Option<Bytes>,
    /// The value (`None` for a tombstone).
    pub value: Option<Bytes>,
    /// Headers in the order they were written (read from the fetched bytes when asked: a
    /// record's headers cost no allocation).
    pub headers: Headers,
}

impl ConsumerRecord {
    /// The value of the first header called `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.get(name)
    }

    /// `(topic, partition)`.
    pub fn topic_partition(&self) -> TopicPartition {
        (self.topic.to_string(), self.partition)
    }
}

/// What went wrong consuming.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumerError {
    /// A setting that cannot work.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Talking to a broker failed (after the retries that made sense).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// No committed offset and `auto.offset.reset=none`.
    #[error("no committed offset for {0:?} and auto.offset.reset=none")]
    NoOffset(TopicPartition),
    /// The position is outside the log and `auto.offset.reset=none`; `seek` to go on.
    #[error("offset {offset} of {partition:?} is out of range and auto.offset.reset=none")]
    OffsetOutOfRange {
        /// The partition.
        partition: TopicPartition,
        /// The position that the broker refused.
        offset: i64,
    },
    /// A batch failed its CRC or could not be decoded. The position stays at `offset`; `seek`
    /// past it to skip the damaged batch.
    #[error("corrupt record batch in {partition:?} at offset {offset}: {reason}")]
    CorruptRecord {
        /// The partition.
        partition: TopicPartition,
        /// The position where the damaged batch starts.
        offset: i64,
        /// What the decoder said.
        reason: String,
    },
    /// The commit was refused because the group rebalanced: the partitions may already belong
    /// to another member (`ILLEGAL_GENERATION`, `UNKNOWN_MEMBER_ID`, `REBALANCE_IN_PROGRESS`).
    /// The records since the last successful commit will be delivered again, to someone.
    #[error("commit failed: {0}")]
    CommitFailed(String),
    /// The group refused this member for good (`FENCED_INSTANCE_ID`,
    /// `GROUP_MAX_SIZE_REACHED`, `INCONSISTENT_GROUP_PROTOCOL`, `INVALID_SESSION_TIMEOUT`,
    /// authorization).
    #[error("group {group}: {code:?}{}", message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    Group {
        /// The group id.
        group: String,
        /// Kafka's error.
        code: ResponseError,
        /// The broker's message, if any.
        message: Option<String>,
    },
    /// The call does not fit the consumer's state (commit without `group.id`, a partition
    /// that is not assigned, ...).
    #[error("{0}")]
    State(String),
    /// The consumer was closed.
    #[error("the consumer is closed")]
    Closed,
}
