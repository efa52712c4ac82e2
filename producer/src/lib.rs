//! semel-producer: an idempotent producer for any Kafka-protocol broker (semel-broker, Apache
//! Kafka, Redpanda).
//!
//! With `enable.idempotence` (the default) the producer gets a producer id from the broker and
//! numbers its records per partition, so when a reply is lost and a batch is sent again, the
//! broker stores it once and answers with the original offset. Records of one partition are
//! delivered in the order they were sent, retries included.
//!
//! What it cannot guarantee: a record given up after `delivery.timeout.ms` may or may not be
//! stored; after such a give-up (or a broker that lost the producer's state), the producer
//! bumps its epoch and renumbers what is queued (KIP-360), and a batch whose earlier attempt
//! was stored with its reply lost can then be stored a second time. A restarted process gets a
//! new producer id, so resends across a process restart are not deduplicated by the broker
//! (deduplicate on the consumer side, which is what `semel-consumer`'s dedup store is for).
//!
//! # Layout
//! - [`config`]: [`ProducerConfig`] under the Java client's names, with `validate()`.
//! - [`record`]: [`ProducerRecord`], [`DeliveryReport`], [`ProduceError`].
//! - [`partitioner`]: murmur2, the same partition as the Java client and librdkafka's
//!   `murmur2_random` for the same key.
//! - `sender`: the background task that batches, sends and retries in sequence order.
//! - [`metrics`] holds the counters.
//!
//! ```no_run
//! # async fn run() -> Result<(), semel_producer::ProduceError> {
//! use semel_producer::{Producer, ProducerConfig, ProducerRecord};
//! let producer = Producer::connect(ProducerConfig {
//!     bootstrap_servers: vec!["127.0.0.1:9092".into()],
//!     ..ProducerConfig::default()
//! })
//! .await?;
//! let report = producer
//!     .send(ProducerRecord::new("payments", "charge 42").key("order-7"))
//!     .await?
//!     .await?;
//! println!("stored at {}-{}", report.partition, report.offset);
//! producer.close().await;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod batch;
pub mod config;
mod inbox;
pub mod metrics;
pub mod partitioner;
pub mod record;
mod reply;
mod sender;
mod transaction;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use kafka_protocol::messages::{ApiKey, InitProducerIdRequest, ProducerId, TransactionalId};
use kafka_protocol::protocol::StrBytes;
use semel_client::{ClientConfig, ClientError, Cluster, ConnectionConfig, check_code};
use tokio::sync::{Semaphore, mpsc, oneshot};

pub use config::{Acks, ConfigError, ProducerConfig};
use inbox::Inbox;
pub use kafka_protocol::records::Compression;
pub use metrics::Metrics;
pub use record::{DeliveryReport, ProduceError, ProducerRecord};
pub use reply::Deliveries;
use reply::{Many, Reply};
pub use semel_client::ConsumerGroupMetadata;
use sender::{Command, Sender};

/// A running producer. Cheap to share behind an `Arc`; `send` may be called from many tasks.
#[derive(Debug)]
pub struct Producer {
    commands: mpsc::Sender<Command>,
    /// Where records go without a transactional id (see `inbox`); transactional producers
    /// send records on `commands`, in one order with `begin`/`commit`.
    inbox: Option<Arc<Inbox>>,
    /// `max_queued_records` permits: one per record from `send` until its outcome is known.
    room: Arc<Semaphore>,
    /// `max_queued_records` (at least 1).
    capacity: usize,
    task: tokio::task::JoinHandle<()>,
    metrics: Arc<Metrics>,
    producer_id: i64,
}

/// Resolves to the record's delivery report once the broker acknowledged it.
#[derive(Debug)]
pub struct Delivery(oneshot::Receiver<Result<DeliveryReport, ProduceError>>);

impl Future for Delivery {
    type Output = Result<DeliveryReport, ProduceError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(ProduceError::Closed)))
    }
}

impl Producer {
    /// Validates the config, connects, and (when idempotent) gets a producer id.
    ///
    /// # Errors
    /// `Config` for settings that cannot work; `Client` when no broker answers or
    /// InitProducerId fails.
    pub async fn connect(config: ProducerConfig) -> Result<Self, ProduceError> {
        config.validate()?;
        let cluster = Arc::new(
            Cluster::connect(ClientConfig {
                bootstrap_servers: config.bootstrap_servers.clone(),
                connection: ConnectionConfig {
                    client_id: config.client_id.clone(),
                    request_timeout: config.request_timeout,
                    security: config.security.clone(),
                    ..ConnectionConfig::default()
                },
                ..ClientConfig::default()
            })
            .await?,
        );
        let producer = if config.enable_idempotence {
            first_producer_id(&cluster, &config).await?
        } else {
            (-1, -1)
        };
        let metrics = Arc::new(Metrics::new(&config.client_id));
        let capacity = config
            .max_queued_records
            .clamp(1, Semaphore::MAX_PERMITS)
            .min(u32::MAX as usize);
        let (commands, receiver) = mpsc::channel(capacity);
        let span = tracing::info_span!(
            "producer",
            client_id = %config.client_id,
            producer_id = producer.0,
            idempotent = config.enable_idempotence,
        );
        let inbox = config
            .transactional_id
            .is_none()
            .then(|| Arc::new(Inbox::default()));
        let sender = Sender::new(
            config,
            cluster,
            receiver,
            inbox.clone(),
            producer,
            Arc::clone(&metrics),
        );
        let task = tokio::spawn(tracing::Instrument::instrument(sender.run(), span));
        Ok(Self {
            commands,
            inbox,
            room: Arc::new(Semaphore::new(capacity)),
            capacity,
            task,
            metrics,
            producer_id: producer.0,
        })
    }

    /// Queues `record`; waits while `max_queued_records` records are queued and not yet
    /// acknowledged or failed (room comes back as they complete, at the latest at their
    /// `delivery.timeout.ms`). The returned [`Delivery`] resolves when the record is
    /// acknowledged (or fails for good).
    ///
    /// # Errors
    /// `Closed` once the producer is closed.
    pub async fn send(&self, record: ProducerRecord) -> Result<Delivery, ProduceError> {
        let room = Arc::clone(&self.room)
            .acquire_owned()
            .await
            .map_err(|_| ProduceError::Closed)?;
        let (reply, delivery) = oneshot::channel();
        let reply = Reply::one(reply, room);
        match &self.inbox {
            Some(inbox) => inbox
                .push([(record, reply)])
                .map_err(|_| ProduceError::Closed)?,
            None => self
                .commands
                .send(Command::Send { record, reply })
                .await
                .map_err(|_| ProduceError::Closed)?,
        }
        Ok(Delivery(delivery))
    }

    /// Queues many records at once: what [`Producer::send`] does for each, in order, for one
    /// hand-over to the producer's task per `max_queued_records` records instead of one per
    /// record, and one completion for them all. Each record counts against
    /// `max_queued_records`; more than that many are queued as room comes back. The returned
    /// [`Deliveries`] resolves once every record completed, to their outcomes in order.
    ///
    /// # Errors
    /// `Closed` once the producer is closed (records handed over before that still complete).
    pub async fn send_many(
        &self,
        records: Vec<ProducerRecord>,
    ) -> Result<Deliveries, ProduceError> {
        let (done, deliveries) = oneshot::channel();
        if records.is_empty() {
            let _ = done.send(Vec::new());
            return Ok(Deliveries(deliveries));
        }
        let many = Many::new(records.len(), done);
        let mut records = records.into_iter().enumerate().peekable();
        while records.peek().is_some() {
            let chunk: Vec<(usize, ProducerRecord)> =
                records.by_ref().take(self.capacity).collect();
            let permits = u32::try_from(chunk.len()).map_err(|_| ProduceError::Closed)?;
            let mut room = Arc::clone(&self.room)
                .acquire_many_owned(permits)
                .await
                .map_err(|_| ProduceError::Closed)?;
            let mut items = Vec::with_capacity(chunk.len());
            for (index, record) in chunk {
                // `room` holds one permit per record of the chunk.
                let one = room.split(1).ok_or(ProduceError::Closed)?;
                items.push((record, Reply::many(Arc::clone(&many), index, one)));
            }
            match &self.inbox {
                Some(inbox) => inbox.push(items).map_err(|_| ProduceError::Closed)?,
                None => self
                    .commands
                    .send(Command::SendMany(items))
                    .await
                    .map_err(|_| ProduceError::Closed)?,
            }
        }
        Ok(Deliveries(deliveries))
    }

    /// Sends everything queued now, and waits until all of it is acknowledged or failed.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.commands.send(Command::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }

    /// Delivers (or reports the failure of) everything queued, then stops.
    pub async fn close(self) {
        drop(self.commands);
        let _ = self.task.await;
    }

    /// The producer's counters.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The producer id from InitProducerId (-1 without idempotence).
    pub fn producer_id(&self) -> i64 {
        self.producer_id
    }

    /// Opens a transaction (`transactional.id` producers only; `connect` already did what
    /// the Java client's `initTransactions` does). Records sent from now on belong to it.
    ///
    /// # Errors
    /// `TransactionState` when one is already open or the producer is not transactional;
    /// `Fatal` once fenced.
    pub async fn begin_transaction(&self) -> Result<(), ProduceError> {
        self.transaction_command(Command::Begin).await
    }

    /// Adds a group consumer's offsets to the open transaction (KIP-447): they become the
    /// group's committed offsets if, and only if, the transaction commits. `offsets` are
    /// (topic, partition, next offset to read); `group` comes from the consumer
    /// (`Consumer::group_metadata`), so offsets of a member that lost its partitions are
    /// refused.
    ///
    /// # Errors
    /// `Abortable` when the coordinator refused them (abort, then start again); `Fatal` once
    /// fenced; `TransactionState` without an open transaction.
    pub async fn send_offsets_to_transaction(
        &self,
        offsets: Vec<(String, i32, i64)>,
        group: ConsumerGroupMetadata,
    ) -> Result<(), ProduceError> {
        self.transaction_command(|reply| Command::SendOffsets {
            offsets,
            group,
            reply,
        })
        .await
    }

    /// Sends everything of the open transaction, waits for all of it to be acknowledged, then
    /// commits it (EndTxn). If any record of it failed, nothing is committed and the error is
    /// `Abortable`: call [`Producer::abort_transaction`].
    ///
    /// # Errors
    /// `Abortable`, `Fatal` (fenced: a newer instance took over, or the broker aborted the
    /// transaction on its timeout), `TransactionState`, or `Client` when the coordinator
    /// could not be reached before `delivery.timeout.ms` (the outcome is then unknown:
    /// calling commit again is safe).
    pub async fn commit_transaction(&self) -> Result<(), ProduceError> {
        self.transaction_command(|reply| Command::End {
            commit: true,
            reply,
        })
        .await
    }

    /// Waits for the open transaction's records to be answered, then aborts it: none of its
    /// records or offsets is ever visible to `read_committed` consumers.
    ///
    /// # Errors
    /// As [`Producer::commit_transaction`], without `Abortable`.
    pub async fn abort_transaction(&self) -> Result<(), ProduceError> {
        self.transaction_command(|reply| Command::End {
            commit: false,
            reply,
        })
        .await
    }

    async fn transaction_command(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<(), ProduceError>>) -> Command,
    ) -> Result<(), ProduceError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| ProduceError::Closed)?;
        answer.await.unwrap_or(Err(ProduceError::Closed))
    }
}

/// The producer id to start with. A coordinator that is still loading, moving or busy
/// (`COORDINATOR_LOAD_IN_PROGRESS`, `COORDINATOR_NOT_AVAILABLE`, `NOT_COORDINATOR`,
/// `CONCURRENT_TRANSACTIONS`: what a Kafka cluster answers for a while after it starts or a
/// broker fails) is asked again, with waits doubling up to 1 s, for at most
/// `delivery.timeout.ms`, as the Java client's `initTransactions` retries them.
async fn first_producer_id(
    cluster: &Cluster,
    config: &ProducerConfig,
) -> Result<(i64, i16), ClientError> {
    let deadline = tokio::time::Instant::now() + config.delivery_timeout;
    let mut wait = std::time::Duration::from_millis(50);
    loop {
        match init_producer_id(
            cluster,
            config.coordinator_key(),
            config.transaction_timeout_ms(),
            (-1, -1),
        )
        .await
        {
            Ok(producer) => return Ok(producer),
            Err(ClientError::Broker { api, code, .. })
                if matches!(
                    code,
                    kafka_protocol::ResponseError::CoordinatorLoadInProgress
                        | kafka_protocol::ResponseError::CoordinatorNotAvailable
                        | kafka_protocol::ResponseError::NotCoordinator
                        | kafka_protocol::ResponseError::ConcurrentTransactions
                ) && tokio::time::Instant::now() + wait < deadline =>
            {
                tracing::info!(
                    ?api,
                    ?code,
                    retry_in_ms = wait.as_millis() as u64,
                    "producer id not available yet; asking again"
                );
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(1));
            }
            Err(error) => return Err(error),
        }
    }
}

/// InitProducerId: a new producer id, or with `fencing_id` the id's producer id at the next
/// epoch, asked of its transaction coordinator. `current` (KIP-360, v3+) is the id and epoch
/// being bumped, (-1, -1) at start.
pub(crate) async fn init_producer_id(
    cluster: &Cluster,
    fencing_id: Option<&str>,
    transaction_timeout_ms: i32,
    current: (i64, i16),
) -> Result<(i64, i16), ClientError> {
    let connection = match fencing_id {
        Some(id) => {
            transaction::coordinator(cluster, transaction::CoordinatorKind::Transaction, id).await?
        }
        None => cluster.any().await?,
    };
    let version = connection.version(ApiKey::InitProducerId, (0, 4))?;
    let current = if version >= 3 { current } else { (-1, -1) };
    let response = connection
        .send_version(
            &InitProducerIdRequest::default()
                .with_transactional_id(
                    fencing_id.map(|id| TransactionalId(StrBytes::from_string(id.to_string()))),
                )
                .with_transaction_timeout_ms(transaction_timeout_ms)
                .with_producer_id(ProducerId(current.0))
                .with_producer_epoch(current.1),
            version,
        )
        .await?;
    check_code(response.error_code).map_err(|code| ClientError::Broker {
        api: ApiKey::InitProducerId,
        code,
        message: None,
    })?;
    Ok((response.producer_id.0, response.producer_epoch))
}
