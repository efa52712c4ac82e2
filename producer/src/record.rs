//! What an application sends and what it gets back.

use bytes::Bytes;
use kafka_protocol::ResponseError;

/// One message to send.
#[derive(Debug, Clone, Default)]
pub struct ProducerRecord {
    /// The topic.
    pub topic: String,
    /// A fixed partition; `None` lets the partitioner choose (murmur2 of the key, or sticky).
    pub partition: Option<i32>,
    /// The key (also what the partitioner hashes).
    pub key: Option<Bytes>,
    /// The value; `None` is a tombstone.
    pub value: Option<Bytes>,
    /// Headers, in order.
    pub headers: Vec<(String, Option<Bytes>)>,
    /// Create time in ms since the epoch; `None` means now.
    pub timestamp_ms: Option<i64>,
}

impl ProducerRecord {
    /// A record with a value, for `topic`.
    pub fn new(topic: impl Into<String>, value: impl Into<Bytes>) -> Self {
        Self {
            topic: topic.into(),
            value: Some(value.into()),
            ..Self::default()
        }
    }

    /// Sets the key.
    #[must_use]
    pub fn key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets the partition.
    #[must_use]
    pub fn partition(mut self, partition: i32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// Adds a header.
    #[must_use]
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push((name.into(), Some(value.into())));
        self
    }

    pub(crate) fn size_estimate(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Bytes::len) + 4)
            .sum();
        self.key.as_ref().map_or(0, Bytes::len)
            + self.value.as_ref().map_or(0, Bytes::len)
            + headers
            + 16
    }
}

/// Where a record was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryReport {
    /// The partition.
    pub partition: i32,
    /// The record's offset; -1 when unknown (`acks=0`, or a broker that answered a duplicate
    /// with `DUPLICATE_SEQUENCE_NUMBER`).
    pub offset: i64,
    /// The log append time, or -1 when the topic uses create time.
    pub timestamp_ms: i64,
}

/// Why a record was not delivered.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ProduceError {
    /// The settings cannot work.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The broker refused the record for good (too large, invalid, not authorized, ...).
    #[error("broker refused the record: {0:?}")]
    Broker(ResponseError),
    /// `delivery.timeout.ms` passed before the record was acknowledged; it may or may not be
    /// stored.
    #[error("not acknowledged within delivery.timeout.ms ({last_error})")]
    Timeout {
        /// The last error seen while retrying.
        last_error: String,
    },
    /// The batch failed and `retries` allowed no further attempt; it may or may not be stored.
    #[error("failed after {attempts} attempt(s), retries exhausted: {last_error}")]
    RetriesExhausted {
        /// Attempts made.
        attempts: u32,
        /// The last error.
        last_error: String,
    },
    /// The producer was fenced by a newer instance with the same id (`INVALID_PRODUCER_EPOCH`)
    /// or lost its sequence (`OUT_OF_ORDER_SEQUENCE_NUMBER` on the first batch in line).
    #[error("producer fenced or out of sequence: {0}")]
    Fatal(String),
    /// The topic or partition does not exist.
    #[error("unknown topic or partition: {0}")]
    UnknownTopic(String),
    /// No broker could be reached to start.
    #[error(transparent)]
    Client(#[from] semel_client::ClientError),
    /// The producer is closed.
    #[error("the producer is closed")]
    Closed,
    /// A transaction method called in the wrong state (no transaction open, one already open,
    /// or a transactional method on a producer without `transactional.id`).
    #[error("transaction state: {0}")]
    TransactionState(String),
    /// The open transaction cannot commit (a record of it failed, or its offsets could not
    /// be sent): abort it, then start again.
    #[error("the transaction must be aborted: {0}")]
    Abortable(String),
}
