//! Consume-transform-produce exactly once, with Kafka transactions (KIP-98, KIP-447), on
//! semel-broker or Apache Kafka.
//!
//! Each [`Pipeline::run_once`] is one transaction: the records of one poll are transformed,
//! the outputs produced and the inputs' offsets committed with them (`send_offsets_to_transaction`),
//! and the transaction committed. Either all of it becomes visible to `read_committed` readers
//! and the group, or none of it does:
//! - a crash before the commit leaves the transaction open; the broker aborts it when
//!   `transaction.timeout.ms` runs out or when the next instance with the same
//!   `transactional.id` starts, and the group resumes from the last committed offsets, so the
//!   inputs are transformed again and their earlier outputs never show;
//! - a member that lost its partitions in a rebalance cannot commit offsets for them: the
//!   group coordinator refuses its generation (KIP-447), the transaction is aborted and the
//!   records are read again by their new owner;
//! - a newer instance with the same `transactional.id` fences this one: [`PipelineError::Fenced`].
//!
//! The transform runs once per input record *per attempt*: an aborted attempt's outputs are
//! discarded, so only Kafka writes are exactly once. Side effects outside Kafka need the dedup
//! store (`semel-consumer`'s dedup middleware) as well.
//!
//! ```no_run
//! # async fn run() -> Result<(), semel::pipeline::PipelineError> {
//! use semel::consumer::ConsumerConfig;
//! use semel::pipeline::{Pipeline, PipelineConfig};
//! use semel::producer::{ProducerConfig, ProducerRecord};
//! let mut pipeline = Pipeline::start(PipelineConfig::new(
//!     ConsumerConfig { group_id: Some("billing".into()), ..ConsumerConfig::default() },
//!     ProducerConfig { transactional_id: Some("billing-0".into()), ..ProducerConfig::default() },
//!     ["orders"],
//! ))
//! .await?;
//! loop {
//!     pipeline
//!         .run_once(|order| vec![ProducerRecord::new("invoices", order.value.clone().unwrap_or_default())])
//!         .await?;
//! }
//! # }
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use semel_consumer::{Consumer, ConsumerConfig, ConsumerError, ConsumerRecord, IsolationLevel};
use semel_producer::{ProduceError, Producer, ProducerConfig, ProducerRecord};

/// Settings of a [`Pipeline`].
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// The input consumer. `group.id` is required; `isolation.level` is forced to
    /// `read_committed` and `enable.auto.commit` off.
    pub consumer: ConsumerConfig,
    /// The output producer. `transactional.id` is required: use one per pipeline instance
    /// that stays the same across its restarts (a restarted instance then aborts what the
    /// crashed one left open at once, instead of after `transaction.timeout.ms`).
    pub producer: ProducerConfig,
    /// Topics to read.
    pub input_topics: Vec<String>,
    /// Most input records per transaction (the consumer's `max.poll.records` is set to it).
    pub max_records_per_transaction: usize,
    /// How long one `run_once` waits for input.
    pub poll_timeout: Duration,
}

impl PipelineConfig {
    /// Settings with 500 records per transaction at most and a 500 ms poll.
    pub fn new<I, S>(consumer: ConsumerConfig, producer: ProducerConfig, topics: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            consumer,
            producer,
            input_topics: topics.into_iter().map(Into::into).collect(),
            max_records_per_transaction: 500,
            poll_timeout: Duration::from_millis(500),
        }
    }
}

/// Why a pipeline step failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// A setting cannot work.
    #[error("pipeline setting: {0}")]
    Config(String),
    /// The consumer failed.
    #[error(transparent)]
    Consumer(#[from] ConsumerError),
    /// A newer instance with the same `transactional.id` took over (or the broker aborted a
    /// transaction that outlived `transaction.timeout.ms`): this instance must stop.
    #[error("fenced: {0}")]
    Fenced(String),
    /// The transaction was aborted (a record or the offsets were refused, for example after
    /// a rebalance); its input records will be read and transformed again. Calling
    /// `run_once` again continues.
    #[error("transaction aborted: {0}")]
    Aborted(String),
    /// The producer failed otherwise.
    #[error(transparent)]
    Producer(ProduceError),
}

/// A consume-transform-produce loop; see the module notes.
#[derive(Debug)]
pub struct Pipeline {
    consumer: Consumer,
    producer: Producer,
    config: PipelineConfig,
}

impl Pipeline {
    /// Connects the producer (which aborts whatever an earlier instance with the same
    /// `transactional.id` left open) and subscribes the consumer.
    ///
    /// # Errors
    /// `Config` without `group.id` or `transactional.id`; the clients' errors.
    pub async fn start(mut config: PipelineConfig) -> Result<Self, PipelineError> {
        if config.consumer.group_id.is_none() {
            return Err(PipelineError::Config("the consumer needs group.id".into()));
        }
        if config.producer.transactional_id.is_none() {
            return Err(PipelineError::Config(
                "the producer needs transactional.id".into(),
            ));
        }
        if config.max_records_per_transaction == 0 {
            return Err(PipelineError::Config(
                "max_records_per_transaction must be at least 1".into(),
            ));
        }
        config.consumer.isolation_level = IsolationLevel::ReadCommitted;
        config.consumer.enable_auto_commit = false;
        config.consumer.max_poll_records = config.max_records_per_transaction;
        let producer = Producer::connect(config.producer.clone())
            .await
            .map_err(PipelineError::Producer)?;
        let mut consumer = Consumer::connect(config.consumer.clone()).await?;
        consumer.subscribe(config.input_topics.iter().map(String::as_str))?;
        Ok(Self {
            consumer,
            producer,
            config,
        })
    }

    /// One transaction: poll, transform every record into its outputs, produce them and
    /// commit them together with the inputs' offsets. Returns how many input records were
    /// handled (0 when none came within the poll timeout).
    ///
    /// # Errors
    /// `Aborted` (the records will come again: call `run_once` again), `Fenced` (stop),
    /// `Consumer` or `Producer` for the clients' other failures.
    pub async fn run_once<F>(&mut self, mut transform: F) -> Result<usize, PipelineError>
    where
        F: FnMut(&ConsumerRecord) -> Vec<ProducerRecord>,
    {
        // `max.poll.records` is the transaction's size: every record polled is in it (one
        // dropped here would be skipped, its offset committed past it by the next one).
        let records = self.consumer.poll(self.config.poll_timeout).await?;
        if records.is_empty() {
            return Ok(0);
        }
        let mut first: BTreeMap<(String, i32), i64> = BTreeMap::new();
        let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for record in &records {
            let partition = (record.topic.to_string(), record.partition);
            first.entry(partition.clone()).or_insert(record.offset);
            next.insert(partition, record.offset + 1);
        }
        let Some(group) = self.consumer.group_metadata() else {
            return Err(PipelineError::Config("the consumer has no group".into()));
        };
        match self
            .transaction(&records, &next, group, &mut transform)
            .await
        {
            Ok(()) => Ok(records.len()),
            Err(ProduceError::Fatal(reason)) => Err(PipelineError::Fenced(reason)),
            Err(error) => {
                let reason = error.to_string();
                if let Err(abort) = self.producer.abort_transaction().await {
                    return Err(match abort {
                        ProduceError::Fatal(reason) => PipelineError::Fenced(reason),
                        other => PipelineError::Producer(other),
                    });
                }
                self.rewind(&first)?;
                Err(PipelineError::Aborted(reason))
            }
        }
    }

    async fn transaction<F>(
        &mut self,
        records: &[ConsumerRecord],
        next: &BTreeMap<(String, i32), i64>,
        group: semel_consumer::ConsumerGroupMetadata,
        transform: &mut F,
    ) -> Result<(), ProduceError>
    where
        F: FnMut(&ConsumerRecord) -> Vec<ProducerRecord>,
    {
        self.producer.begin_transaction().await?;
        let mut deliveries = Vec::new();
        for record in records {
            for output in transform(record) {
                deliveries.push(self.producer.send(output).await?);
            }
        }
        let offsets = next
            .iter()
            .map(|((topic, partition), offset)| (topic.clone(), *partition, *offset))
            .collect();
        self.producer
            .send_offsets_to_transaction(offsets, group)
            .await?;
        self.producer.commit_transaction().await?;
        for delivery in deliveries {
            delivery.await?;
        }
        Ok(())
    }

    /// After an abort: each polled partition still assigned goes back to the first offset
    /// this poll returned (where the last committed transaction left it), so its records are
    /// read and transformed again. A partition that moved to another member starts there from
    /// the committed offset.
    fn rewind(&mut self, first: &BTreeMap<(String, i32), i64>) -> Result<(), PipelineError> {
        let assigned = self.consumer.assignment();
        for (partition, offset) in first {
            if assigned.contains(partition) {
                self.consumer.seek(partition, *offset)?;
            }
        }
        Ok(())
    }

    /// The input consumer (for its metrics, assignment, ...).
    pub fn consumer(&self) -> &Consumer {
        &self.consumer
    }

    /// Leaves the group and closes the producer.
    ///
    /// # Errors
    /// The consumer's error on leaving.
    pub async fn close(self) -> Result<(), PipelineError> {
        self.producer.close().await;
        self.consumer.close().await?;
        Ok(())
    }
}
