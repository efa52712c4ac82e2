//! The dedup changelog: every done mark also goes to a Kafka topic, so a consumer on another
//! host that takes a partition over knows which messages were already handled.
//!
//! A local store knows only the keys its own host handled. The changelog
//! (`<group>-semel-dedup-changelog` by default) is partitioned like the input: the marks of
//! input partition `p` (of every subscribed topic) go to changelog partition `p`, record key
//! = the 16-byte [`KeyHash`], value = the topic, partition, offset and time of the mark,
//! record timestamp = the time of the mark. When a partition is assigned, the middleware
//! replays its changelog partition from (now − window) (ListOffsets by timestamp) into the
//! local store **before** it hands out any record, skipping marks the store already has.
//! The changelog position reached is kept in the store, so the next replay of that partition
//! on this host reads only what is new. With [`ChangelogConfig::standby`], a task keeps
//! tailing every changelog partition (warm standby), so a takeover replays almost nothing.
//!
//! **Order of writes**, per handled message:
//! 1. the local `WriteBatch`: mark + committable offset + the handler's state (atomic),
//!    and the store's write-ahead log synced before the mark leaves the process;
//! 2. the mark is produced to the changelog (idempotent producer, `acks=all`, batched by
//!    `linger.ms`);
//! 3. only when the changelog acknowledged the marks of every record up to an offset is that
//!    offset committed to the group.
//!
//! So a committed offset never has a mark that is missing from the changelog: whichever
//! host takes the partition over starts at or before the first record whose mark it may not
//! know, and everything before it is either committed or in the changelog. A crash after (1)
//! and before (2) is acknowledged leaves a mark known only locally: the record is redelivered
//! (the offset was not committed) and handled again on another host, or dropped by the local
//! store if the partition comes back to this one. The reverse order (changelog first) would
//! be worse: a crash between the two would leave a mark with no local effect, and the message
//! would be dropped unhandled.
//!
//! What stays at-least-once: a side effect outside the store's batch (an HTTP call) done
//! before a crash whose mark was not yet written anywhere; and, when the partition moves to
//! another host, a record whose mark had not reached the changelog yet: its host died, or its
//! handler was still running (or the mark still queued) at the revocation, which does not wait
//! for them.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use kafka_protocol::ResponseError;
use kafka_protocol::messages::DescribeConfigsRequest;
use kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
use kafka_protocol::protocol::StrBytes;
use semel_client::admin::NewTopic;
use semel_client::{Admin, ClientConfig, ClientError, ConnectionConfig};
use semel_producer::{
    Deliveries, DeliveryReport, ProduceError, Producer, ProducerConfig, ProducerRecord,
};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::settlement::Epoch;
use super::store::{DedupError, DedupStore, KeyHash, off_runtime};

/// An offset that may be committed once the changelog acknowledged what came before it, and
/// the ownership of the partition it was settled in (an offset from an earlier ownership is
/// not committed for a later one).
pub(crate) type Release = (Epoch, i64);
use crate::assignor::TopicPartition;
use crate::clock::{Clock, SystemClock};
use crate::config::{AutoOffsetReset, ConsumerConfig};
use crate::consumer::Consumer;
use crate::record::ConsumerError;

/// A changelog record of one mark (the record key is the mark's key): what earlier versions
/// wrote, still read.
const FORMAT_VERSION: u8 = 1;
/// A changelog record of several marks of one input partition (no record key).
const MARKS_FORMAT_VERSION: u8 = 2;
/// Marks in one changelog record at most: about 30 KB.
const MARKS_PER_RECORD: usize = 1024;
/// The store's offsets family keeps changelog positions under this pseudo group.
const POSITIONS: &str = "\u{0}semel-changelog-position";
/// Marks written to the store per batch while replaying.
const RESTORE_BATCH: usize = 10_000;

/// Changelog settings ([`super::MiddlewareConfig::changelog`]).
#[derive(Debug, Clone)]
pub struct ChangelogConfig {
    /// The topic; `None` means `<group>-semel-dedup-changelog`.
    pub topic: Option<String>,
    /// Replication factor when the topic is created (-1: the broker's
    /// `default.replication.factor`, KIP-464).
    pub replication_factor: i16,
    /// Keep tailing the changelog of partitions this consumer does not own (warm standby),
    /// so that taking one over replays almost nothing. Off by default.
    pub standby: bool,
    /// `linger.ms` of the changelog producer: marks are batched this long.
    pub linger: Duration,
    /// `delivery.timeout.ms` of the changelog producer: how long a mark may take to be
    /// acknowledged before the attempt counts as failed (the mark is sent again, and
    /// `flush_changelog` / `close` report the failure).
    pub delivery_timeout: Duration,
}

impl Default for ChangelogConfig {
    fn default() -> Self {
        Self {
            topic: None,
            replication_factor: -1,
            standby: false,
            linger: Duration::from_millis(5),
            delivery_timeout: Duration::from_secs(120),
        }
    }
}

/// What went wrong with the changelog.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChangelogError {
    /// The changelog topic could not be created or grown.
    #[error("changelog topic {topic}: {reason}")]
    Topic {
        /// The topic.
        topic: String,
        /// Why.
        reason: String,
    },
    /// The changelog producer failed.
    #[error("changelog producer: {0}")]
    Produce(#[from] ProduceError),
    /// Reading the changelog failed.
    #[error("changelog reader: {0}")]
    Read(#[from] ConsumerError),
    /// The store refused the replayed marks.
    #[error(transparent)]
    Store(#[from] DedupError),
}

/// Replay figures since the middleware started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreMetrics {
    /// Changelog records read while replaying (before any record of the partition was
    /// handed out).
    pub records_read: u64,
    /// Marks added to the local store by replays (the rest were known already).
    pub marks_restored: u64,
    /// Time spent replaying, in ms.
    pub restore_ms: u64,
    /// Marks added by the warm standby task.
    pub standby_marks: u64,
    /// Changelog records that were not semel marks (skipped, logged).
    pub records_skipped: u64,
}

/// A mark as written to the changelog (the record value).
#[derive(Debug, Serialize, Deserialize)]
struct MarkValue {
    version: u8,
    topic: String,
    partition: i32,
    offset: i64,
    at_ms: i64,
}

/// Marks as written to the changelog: several marks of one input partition in one record,
/// so that a mark costs the producer and the broker a few bytes, not a record.
#[derive(Debug, Serialize, Deserialize)]
struct MarksValue {
    version: u8,
    topic: String,
    partition: i32,
    /// Each mark: its key, the offset of its record, when it was marked.
    marks: Vec<([u8; 16], i64, i64)>,
}

/// A mark waiting to be produced, or an offset waiting behind marks in flight.
struct Entry {
    partition: TopicPartition,
    /// The offset of the record a mark is for.
    record_offset: i64,
    /// The partition's committable offset once this entry (and all before it) is
    /// acknowledged, with the ownership it belongs to; `None` for a mark whose partition has
    /// left (it still goes out).
    release: Option<Release>,
    mark: Option<(KeyHash, i64)>,
    /// Its mark's place in the group of marks sent with it (one `send_many`).
    delivery: Option<(Arc<Mutex<MarkGroup>>, usize)>,
}

/// Marks handed to the producer together, and their outcomes once all are known.
struct MarkGroup {
    deliveries: Option<Deliveries>,
    outcomes: Vec<Option<Result<DeliveryReport, ProduceError>>>,
}

impl MarkGroup {
    /// The outcome of the group's `index`-th mark: `None` while the group is under way.
    fn outcome(&mut self, index: usize) -> Option<Result<DeliveryReport, ProduceError>> {
        if let Some(deliveries) = self.deliveries.as_mut() {
            let all = deliveries.now_or_never()?;
            let count = self.outcomes.len();
            self.outcomes = match all {
                Ok(outcomes) => outcomes.into_iter().map(Some).collect(),
                Err(e) => (0..count).map(|_| Some(Err(e.clone()))).collect(),
            };
            self.deliveries = None;
        }
        Some(
            // Several entries share a record: each reads its outcome.
            self.outcomes
                .get(index)
                .cloned()
                .flatten()
                .unwrap_or(Err(ProduceError::Closed)),
        )
    }
}

/// The changelog side of the middleware.
pub(crate) struct Changelog {
    topic: String,
    group: String,
    window_ms: i64,
    producer: Producer,
    admin: Admin,
    reader: Consumer,
    partitions: i32,
    replication_factor: i16,
    entries: VecDeque<Entry>,
    /// The last mark delivery that failed for good (reported by `flush`).
    last_failure: Option<ProduceError>,
    /// How many entries at the front were sent (or need no sending).
    sent: usize,
    metrics: Arc<Mutex<RestoreMetrics>>,
    standby: Option<AbortOnDrop>,
    /// Each record's key: a random prefix of this middleware's, then a count. Unique, so a
    /// topic someone made compacted accepts the records (it refuses records without a key)
    /// and keeps every one.
    record_keys: (u64, u64),
}

/// The standby task, stopped when the changelog goes, with or without `close` (it holds the
/// store, and with it the store's lock).
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl std::fmt::Debug for Changelog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Changelog")
            .field("topic", &self.topic)
            .field("partitions", &self.partitions)
            .field("queued", &self.entries.len())
            .finish_non_exhaustive()
    }
}

impl Changelog {
    /// Connects the producer, the reader and the admin client; creates the topic if needed.
    pub(crate) async fn start(
        consumer: &ConsumerConfig,
        group: &str,
        window: Duration,
        store: &Arc<DedupStore>,
        config: &ChangelogConfig,
        input_topics: &[String],
    ) -> Result<Self, ChangelogError> {
        let topic = config
            .topic
            .clone()
            .unwrap_or_else(|| format!("{group}-semel-dedup-changelog"));
        let admin = Admin::connect(ClientConfig {
            bootstrap_servers: consumer.bootstrap_servers.clone(),
            connection: ConnectionConfig {
                client_id: format!("{}-changelog-admin", consumer.client_id),
                request_timeout: consumer.request_timeout,
                security: consumer.security.clone(),
                ..ConnectionConfig::default()
            },
            reconnect_backoff: consumer.reconnect_backoff,
            reconnect_backoff_max: consumer.reconnect_backoff_max,
        })
        .await
        .map_err(ConsumerError::from)?;
        // Partitioned like the input: as many partitions as the largest subscribed topic.
        let mut input_partitions = 1;
        if !input_topics.is_empty() {
            admin
                .cluster()
                .refresh_metadata(Some(input_topics), false)
                .await
                .map_err(ConsumerError::from)?;
            for name in input_topics {
                if let Some(info) = admin.cluster().topic(name) {
                    input_partitions = input_partitions
                        .max(i32::try_from(info.partitions.len()).unwrap_or(i32::MAX));
                }
            }
        }
        let producer = Producer::connect(ProducerConfig {
            bootstrap_servers: consumer.bootstrap_servers.clone(),
            security: consumer.security.clone(),
            client_id: format!("{}-changelog", consumer.client_id),
            linger: config.linger,
            request_timeout: consumer
                .request_timeout
                .min(config.delivery_timeout.saturating_sub(config.linger)),
            delivery_timeout: config.delivery_timeout,
            ..ProducerConfig::default()
        })
        .await?;
        let reader = Consumer::connect(reader_config(consumer, "changelog-reader")).await?;
        let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
        let mut changelog = Self {
            topic,
            group: group.to_string(),
            window_ms,
            producer,
            admin,
            reader,
            partitions: 0,
            replication_factor: config.replication_factor,
            entries: VecDeque::new(),
            last_failure: None,
            sent: 0,
            metrics: Arc::new(Mutex::new(RestoreMetrics::default())),
            standby: None,
            record_keys: (
                std::hash::BuildHasher::hash_one(
                    &std::collections::hash_map::RandomState::new(),
                    group,
                ),
                0,
            ),
        };
        changelog.ensure_partitions(input_partitions).await?;
        if config.standby {
            let reader = Consumer::connect(reader_config(consumer, "changelog-standby")).await?;
            changelog.standby = Some(AbortOnDrop(tokio::spawn(standby(
                reader,
                Arc::clone(store),
                changelog.topic.clone(),
                changelog.partitions,
                window_ms,
                Arc::clone(&changelog.metrics),
            ))));
        }
        Ok(changelog)
    }

    /// The changelog topic's name.
    pub(crate) fn topic(&self) -> &str {
        &self.topic
    }

    pub(crate) fn metrics(&self) -> RestoreMetrics {
        *self.metrics.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates the topic with at least `needed` partitions, or grows it to that many.
    async fn ensure_partitions(&mut self, needed: i32) -> Result<(), ChangelogError> {
        if self.partitions >= needed {
            return Ok(());
        }
        let fail = |reason: String| ChangelogError::Topic {
            topic: self.topic.clone(),
            reason,
        };
        let created = self
            .admin
            .create_topics(&[NewTopic {
                name: self.topic.clone(),
                partitions: needed,
                replication_factor: self.replication_factor,
                configs: [
                    ("retention.ms".to_string(), self.window_ms.to_string()),
                    ("cleanup.policy".to_string(), "delete".to_string()),
                ]
                .into(),
            }])
            .await
            .map_err(|e| fail(format!("CreateTopics: {e}")))?;
        for (_, result) in created {
            match result {
                Ok(()) => {
                    tracing::info!(topic = %self.topic, partitions = needed, retention_ms = self.window_ms, "changelog topic created");
                }
                // Someone (another member) was first.
                Err(ClientError::Broker {
                    code: ResponseError::TopicAlreadyExists,
                    ..
                }) if self.partitions == 0 => {
                    if let Ok(connection) = self.admin.cluster().any().await {
                        check_retention(&self.topic, self.window_ms, &connection).await;
                    }
                }
                Err(ClientError::Broker {
                    code: ResponseError::TopicAlreadyExists,
                    ..
                }) => {}
                Err(e) => return Err(fail(format!("CreateTopics refused: {e}"))),
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.admin
                .cluster()
                .refresh_metadata(Some(std::slice::from_ref(&self.topic)), false)
                .await
                .map_err(|e| fail(format!("Metadata: {e}")))?;
            let count = self.admin.cluster().topic(&self.topic).map_or(0, |t| {
                if t.error.is_some() {
                    0
                } else {
                    i32::try_from(t.partitions.len()).unwrap_or(i32::MAX)
                }
            });
            if count >= needed {
                self.partitions = count;
                return Ok(());
            }
            if count > 0 {
                match self.admin.create_partitions(&self.topic, needed).await {
                    // INVALID_PARTITIONS: another member grew it first.
                    Ok(())
                    | Err(ClientError::Broker {
                        code: ResponseError::InvalidPartitions,
                        ..
                    }) => {}
                    Err(e) => return Err(fail(format!("CreatePartitions refused: {e}"))),
                }
                tracing::info!(topic = %self.topic, from = count, to = needed, "changelog partitions added");
            }
            if Instant::now() >= deadline {
                return Err(fail(format!(
                    "has {count} partitions, {needed} needed, after 30 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Queues the mark of a handled record (written and synced locally already); `release`
    /// is the partition's committable offset once it is acknowledged.
    pub(crate) fn push_mark(
        &mut self,
        partition: TopicPartition,
        record_offset: i64,
        release: Option<Release>,
        key: KeyHash,
    ) {
        let at_ms = SystemClock.now_ms();
        self.entries.push_back(Entry {
            partition,
            record_offset,
            release,
            mark: Some((key, at_ms)),
            delivery: None,
        });
    }

    /// Queues an offset with no mark (a duplicate dropped, a record without key): committable
    /// once the marks queued before it are acknowledged.
    pub(crate) fn push_offset(&mut self, partition: TopicPartition, release: Release) {
        self.entries.push_back(Entry {
            partition,
            record_offset: release.1 - 1,
            release: Some(release),
            mark: None,
            delivery: None,
        });
    }

    /// Sends queued marks and moves acknowledged offsets into `settled` (in order: an offset
    /// is released only when every mark queued before it is acknowledged). A mark whose
    /// delivery failed for good is sent again.
    pub(crate) async fn pump(
        &mut self,
        settled: &mut BTreeMap<TopicPartition, Release>,
    ) -> Result<(), ChangelogError> {
        // Entries before `sent` were sent already (or carry no mark): each call looks only
        // at what is new.
        let needed = self
            .entries
            .range(self.sent.min(self.entries.len())..)
            .filter(|e| e.mark.is_some() && e.delivery.is_none())
            .map(|e| e.partition.1 + 1)
            .max()
            .unwrap_or(0);
        if needed > self.partitions {
            self.ensure_partitions(needed).await?;
        }
        // Every mark not sent yet goes to the producer in one hand-over, the marks of each
        // input partition gathered into records of up to `MARKS_PER_RECORD`, in queue order.
        let (unsent, values) = gather(
            self.entries
                .iter()
                .enumerate()
                .skip(self.sent)
                .filter(|(_, entry)| entry.delivery.is_none()),
        );
        let records: Vec<ProducerRecord> = values
            .iter()
            .map(|value| {
                let (prefix, count) = &mut self.record_keys;
                *count += 1;
                let mut key = [0; 16];
                key[..8].copy_from_slice(&prefix.to_be_bytes());
                key[8..].copy_from_slice(&count.to_be_bytes());
                marks_record(&self.topic, key, value)
            })
            .collect();
        if !records.is_empty() {
            let count = records.len();
            let deliveries = self.producer.send_many(records).await?;
            let group = Arc::new(Mutex::new(MarkGroup {
                deliveries: Some(deliveries),
                outcomes: (0..count).map(|_| None).collect(),
            }));
            for (index, slot) in unsent {
                self.entries[index].delivery = Some((Arc::clone(&group), slot));
            }
        }
        self.sent = self.entries.len();
        let mut failed = None;
        while let Some(front) = self.entries.front_mut() {
            if let Some((group, index)) = front.delivery.as_ref() {
                let outcome = group
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .outcome(*index);
                match outcome {
                    None => break,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, partition = ?front.partition, offset = front.record_offset, "changelog write failed; sending the marks of that record again (their offsets are not committed until they land)");
                        // Every mark of the failed record goes again, together.
                        failed = front.delivery.take();
                        self.sent = 0;
                        self.last_failure = Some(e);
                        break;
                    }
                }
            }
            if let Some(entry) = self.entries.pop_front() {
                self.sent = self.sent.saturating_sub(1);
                if let Some(release) = entry.release {
                    settled.insert(entry.partition, release);
                }
            }
        }
        // Every mark of a failed record of that hand-over goes again, at once, not one record
        // per round as each reaches the front.
        if let Some((group, slot)) = failed {
            for entry in &mut self.entries {
                let resend = entry.delivery.as_ref().is_some_and(|(g, s)| {
                    Arc::ptr_eq(g, &group)
                        && (*s == slot
                            || matches!(
                                g.lock().unwrap_or_else(|p| p.into_inner()).outcome(*s),
                                Some(Err(_))
                            ))
                });
                if resend {
                    entry.delivery = None;
                }
            }
        }
        Ok(())
    }

    /// Waits until every queued mark is acknowledged, moving the offsets into `settled`.
    pub(crate) async fn flush(
        &mut self,
        settled: &mut BTreeMap<TopicPartition, Release>,
    ) -> Result<(), ChangelogError> {
        self.last_failure = None;
        loop {
            self.pump(settled).await?;
            if self.entries.is_empty() {
                return Ok(());
            }
            if let Some(failure) = self.last_failure.take() {
                // Not sent again here: whoever flushes wants an answer, and the marks stay
                // queued (their offsets uncommitted) for the next attempt.
                return Err(failure.into());
            }
            self.producer.flush().await;
            tokio::task::yield_now().await;
        }
    }

    /// Replays the changelog partitions of `assigned` into `store`, from (now − window) or
    /// the position an earlier replay reached, to the end offsets read now.
    pub(crate) async fn restore(
        &mut self,
        store: &Arc<DedupStore>,
        assigned: &BTreeSet<TopicPartition>,
    ) -> Result<(), ChangelogError> {
        let started = Instant::now();
        let needed = assigned.iter().map(|tp| tp.1 + 1).max().unwrap_or(0);
        self.ensure_partitions(needed).await?;
        let partitions: BTreeSet<i32> = assigned.iter().map(|tp| tp.1).collect();
        let since = SystemClock.now_ms().saturating_sub(self.window_ms).max(0);
        let (read, added, skipped) = replay(
            &mut self.reader,
            store,
            &self.topic,
            &partitions,
            since,
            &self.metrics,
            |done, total| {
                tracing::info!(topic = %self.topic, read = done, of = total, "changelog replay in progress");
            },
        )
        .await?;
        self.reader.assign(Vec::new())?;
        let elapsed = started.elapsed();
        {
            // Records and marks are counted as they are read and written: a replay cancelled
            // midway (a caller's timeout around `next`) loses none of its counts.
            let mut metrics = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
            metrics.restore_ms += u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
        }
        tracing::info!(
            group = %self.group,
            topic = %self.topic,
            partitions = ?partitions,
            records = read,
            restored = added,
            skipped,
            seconds = elapsed.as_secs_f64(),
            "changelog replayed"
        );
        Ok(())
    }

    /// Stops the standby task and flushes the producer.
    pub(crate) async fn close(self) {
        drop(self.standby);
        self.producer.close().await;
        if let Err(e) = self.reader.close().await {
            tracing::debug!(error = %e, "changelog reader close");
        }
    }
}

/// Warns when an existing changelog keeps marks for less than the window: a takeover would
/// then miss the older marks (and handle their messages again).
async fn check_retention(topic: &str, window_ms: i64, connection: &semel_client::Connection) {
    let request = DescribeConfigsRequest::default().with_resources(vec![
        DescribeConfigsResource::default()
            .with_resource_type(2)
            .with_resource_name(StrBytes::from_string(topic.to_string()))
            .with_configuration_keys(Some(vec![StrBytes::from_static_str("retention.ms")])),
    ]);
    let retention = match connection.send(&request, (1, 4)).await {
        Ok(response) => response
            .results
            .iter()
            .flat_map(|r| r.configs.iter())
            .find(|c| c.name.as_str() == "retention.ms")
            .and_then(|c| c.value.as_ref())
            .and_then(|v| v.as_str().parse::<i64>().ok()),
        Err(e) => {
            tracing::debug!(error = %e, "DescribeConfigs of the changelog failed");
            None
        }
    };
    if let Some(retention) = retention
        && retention >= 0
        && retention < window_ms
    {
        tracing::warn!(
            topic,
            retention_ms = retention,
            window_ms = window_ms,
            "the changelog keeps marks for less than the dedup window: a consumer taking a partition over will not know the older marks; raise the topic's retention.ms"
        );
    }
}

fn reader_config(consumer: &ConsumerConfig, suffix: &str) -> ConsumerConfig {
    ConsumerConfig {
        group_id: None,
        group_instance_id: None,
        client_id: format!("{}-{suffix}", consumer.client_id),
        auto_offset_reset: AutoOffsetReset::Earliest,
        enable_auto_commit: false,
        // A record holds up to `MARKS_PER_RECORD` marks: a poll of the consumer's 500 could
        // hand a replay or the standby half a million marks for one store write; 64 records
        // keep it under 66 k (and records of one mark each, as earlier versions wrote, still
        // come 64 to a poll).
        max_poll_records: 64,
        ..consumer.clone()
    }
}

/// Gathers the marks of `entries` (index, entry; in queue order) into changelog record values
/// of one input partition and up to `MARKS_PER_RECORD` marks each: the values, and for each
/// entry with a mark, (its index, the value holding its mark). A partition's marks stay in
/// queue order, across its values too.
fn gather<'a>(
    entries: impl Iterator<Item = (usize, &'a Entry)>,
) -> (Vec<(usize, usize)>, Vec<MarksValue>) {
    let mut placed = Vec::new();
    let mut values: Vec<MarksValue> = Vec::new();
    // Per partition, the value being filled.
    let mut filling: BTreeMap<&TopicPartition, usize> = BTreeMap::new();
    for (index, entry) in entries {
        let Some((key, at_ms)) = entry.mark else {
            continue;
        };
        let slot = match filling.get(&entry.partition) {
            Some(&slot) if values[slot].marks.len() < MARKS_PER_RECORD => slot,
            _ => {
                values.push(MarksValue {
                    version: MARKS_FORMAT_VERSION,
                    topic: entry.partition.0.clone(),
                    partition: entry.partition.1,
                    marks: Vec::new(),
                });
                filling.insert(&entry.partition, values.len() - 1);
                values.len() - 1
            }
        };
        values[slot]
            .marks
            .push((key.to_bytes(), entry.record_offset, at_ms));
        placed.push((index, slot));
    }
    (placed, values)
}

fn marks_record(topic: &str, key: [u8; 16], value: &MarksValue) -> ProducerRecord {
    // The newest mark's time: the record is kept (`retention.ms`) as long as that mark needs,
    // and a replay from (now − window) finds it.
    let newest = value.marks.iter().map(|&(_, _, at)| at).max().unwrap_or(0);
    let bytes = postcard::to_stdvec(value).unwrap_or_default();
    ProducerRecord {
        topic: topic.to_string(),
        partition: Some(value.partition),
        key: Some(Bytes::copy_from_slice(&key)),
        value: Some(Bytes::from(bytes)),
        headers: Vec::new(),
        timestamp_ms: Some(newest),
    }
}

/// Decodes a changelog record into `marks`: each key and when it was marked. `false` when the
/// record is not a semel mark record.
fn decode(key: Option<&Bytes>, value: Option<&Bytes>, marks: &mut Vec<(KeyHash, i64)>) -> bool {
    let Some(value) = value else {
        return false;
    };
    match value.first() {
        Some(&FORMAT_VERSION) => {
            let Some(key) = key.and_then(|k| <[u8; 16]>::try_from(k.as_ref()).ok()) else {
                return false;
            };
            let Ok(mark) = postcard::from_bytes::<MarkValue>(value) else {
                return false;
            };
            marks.push((KeyHash::from_bytes(key), mark.at_ms));
            true
        }
        Some(&MARKS_FORMAT_VERSION) => {
            let Ok(batch) = postcard::from_bytes::<MarksValue>(value) else {
                return false;
            };
            marks.extend(
                batch
                    .marks
                    .iter()
                    .map(|&(key, _, at_ms)| (KeyHash::from_bytes(key), at_ms)),
            );
            true
        }
        _ => false,
    }
}

/// Reads changelog `partitions` from `since` (or the stored position, if further) to their
/// end offsets now, adding the marks to `store`. Returns (records read, marks added, records
/// skipped) by this call; `metrics` counts them as they go, so a cancelled replay's count
/// stays too.
async fn replay(
    reader: &mut Consumer,
    store: &Arc<DedupStore>,
    topic: &str,
    partitions: &BTreeSet<i32>,
    since: i64,
    metrics: &Arc<Mutex<RestoreMetrics>>,
    mut progress: impl FnMut(u64, u64),
) -> Result<(u64, u64, u64), ChangelogError> {
    let tps: Vec<TopicPartition> = partitions.iter().map(|p| (topic.to_string(), *p)).collect();
    let starts = reader
        .offsets_for_times(&tps.iter().map(|tp| (tp.clone(), since)).collect())
        .await?;
    let ends = reader
        .offsets_for_times(&tps.iter().map(|tp| (tp.clone(), -1)).collect())
        .await?;
    let mut from = BTreeMap::new();
    let mut total = 0u64;
    for tp in &tps {
        let end = ends.get(tp).copied().unwrap_or(0);
        let mut start = starts.get(tp).copied().unwrap_or(end);
        if let Some(reached) = store.offset(POSITIONS, topic, tp.1)?
            && reached > start
            && reached <= end
        {
            start = reached;
        }
        if start < end {
            total += u64::try_from(end - start).unwrap_or(0);
            from.insert(tp.clone(), (start, end));
        }
    }
    if from.is_empty() {
        return Ok((0, 0, 0));
    }
    reader.assign(from.keys().cloned())?;
    for (tp, (start, _)) in &from {
        reader.seek(tp, *start)?;
    }
    let (mut read, mut added, mut skipped) = (0u64, 0u64, 0u64);
    let mut next_progress = 100_000u64;
    let mut marks: Vec<(KeyHash, i64)> = Vec::with_capacity(RESTORE_BATCH);
    let mut positions: BTreeMap<i32, i64> = BTreeMap::new();
    while !from.is_empty() {
        let records = reader.poll(Duration::from_millis(200)).await?;
        let skipped_before = skipped;
        for record in &records {
            read += 1;
            if !decode(record.key.as_ref(), record.value.as_ref(), &mut marks) {
                skipped += 1;
                tracing::warn!(
                    topic,
                    partition = record.partition,
                    offset = record.offset,
                    "changelog record is not a semel dedup mark; skipped"
                );
            }
            positions.insert(record.partition, record.offset + 1);
        }
        {
            let mut m = metrics.lock().unwrap_or_else(|p| p.into_inner());
            m.records_read += records.len() as u64;
            m.records_skipped += skipped - skipped_before;
        }
        if marks.len() >= RESTORE_BATCH {
            added +=
                flush_marks(store, topic, &mut marks, &mut positions, restored(metrics)).await?;
        }
        from.retain(|tp, (_, end)| reader.position(tp).is_none_or(|p| p < *end));
        if read >= next_progress {
            progress(read, total);
            next_progress += 100_000;
        }
    }
    added += flush_marks(store, topic, &mut marks, &mut positions, restored(metrics)).await?;
    Ok((read, added, skipped))
}

/// Counts marks a replay added, for [`flush_marks`].
fn restored(metrics: &Arc<Mutex<RestoreMetrics>>) -> impl FnOnce(u64) + Send + 'static {
    let metrics = Arc::clone(metrics);
    move |added| {
        metrics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .marks_restored += added;
        metrics::counter!("semel_dedup_changelog_marks_restored_total").increment(added);
    }
}

/// Writes `marks`, then the changelog `positions` they bring each partition to, on a blocking
/// thread (see `off_runtime`). Both are taken: on an error the caller reads them again.
/// `count` is told how many marks were added, on that thread: the write goes on when the
/// caller is cancelled, and so does its count.
async fn flush_marks(
    store: &Arc<DedupStore>,
    topic: &str,
    marks: &mut Vec<(KeyHash, i64)>,
    positions: &mut BTreeMap<i32, i64>,
    count: impl FnOnce(u64) + Send + 'static,
) -> Result<u64, ChangelogError> {
    let marks = std::mem::take(marks);
    let positions = std::mem::take(positions);
    let topic = topic.to_string();
    let added = off_runtime(store, "restoring marks", move |store| {
        // The positions go after the marks: one write per partition position (the marks are
        // in the first), so a crash mid-replay re-reads, never skips.
        let mut added = store.restore_marks(&marks, None)?;
        for (partition, next) in positions {
            added += store.restore_marks(&[], Some((POSITIONS, &topic, partition, next)))?;
        }
        count(added as u64);
        Ok(added)
    })
    .await?;
    Ok(added as u64)
}

/// Warm standby: tails every changelog partition into the store.
async fn standby(
    mut reader: Consumer,
    store: Arc<DedupStore>,
    topic: String,
    partitions: i32,
    window_ms: i64,
    metrics: Arc<Mutex<RestoreMetrics>>,
) {
    let all: BTreeSet<i32> = (0..partitions).collect();
    let since = SystemClock.now_ms().saturating_sub(window_ms).max(0);
    let tps: Vec<TopicPartition> = all.iter().map(|p| (topic.clone(), *p)).collect();
    let starts = match reader
        .offsets_for_times(&tps.iter().map(|tp| (tp.clone(), since)).collect())
        .await
    {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "changelog standby cannot start");
            return;
        }
    };
    if let Err(e) = reader.assign(tps.iter().cloned()) {
        tracing::warn!(error = %e, "changelog standby cannot start");
        return;
    }
    for tp in &tps {
        let mut start = starts.get(tp).copied().unwrap_or(0);
        if let Ok(Some(reached)) = store.offset(POSITIONS, &topic, tp.1) {
            start = start.max(reached);
        }
        if let Err(e) = reader.seek(tp, start) {
            tracing::warn!(error = %e, "changelog standby cannot seek");
        }
    }
    tracing::info!(%topic, partitions, "changelog standby tailing");
    loop {
        let records = match reader.poll(Duration::from_millis(500)).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "changelog standby poll failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut marks = Vec::with_capacity(records.len());
        let mut positions = BTreeMap::new();
        // Where this poll's records start, per partition: read again if they are not stored.
        let mut firsts: BTreeMap<i32, i64> = BTreeMap::new();
        for record in &records {
            decode(record.key.as_ref(), record.value.as_ref(), &mut marks);
            positions.insert(record.partition, record.offset + 1);
            firsts.entry(record.partition).or_insert(record.offset);
        }
        let standby_count = Arc::clone(&metrics);
        let counted = move |added: u64| {
            standby_count
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .standby_marks += added;
            metrics::counter!("semel_dedup_changelog_standby_marks_total").increment(added);
        };
        match flush_marks(&store, &topic, &mut marks, &mut positions, counted).await {
            Ok(_) => {}
            Err(e) => {
                // Not skipped: a later poll's positions would pass these marks, and a
                // replay starting from them would never restore them.
                tracing::warn!(error = %e, "changelog standby cannot write the store; reading those records again");
                for (partition, first) in firsts {
                    if let Err(e) = reader.seek(&(topic.clone(), partition), first) {
                        tracing::warn!(error = %e, "changelog standby cannot seek");
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(topic: &str, partition: i32, offset: i64, mark: Option<u128>) -> Entry {
        Entry {
            partition: (topic.to_string(), partition),
            record_offset: offset,
            release: None,
            mark: mark.map(|k| (KeyHash(k), 1_000 + offset)),
            delivery: None,
        }
    }

    #[test]
    fn marks_are_gathered_per_partition_in_queue_order_and_bounded_per_record() {
        let mut entries = Vec::new();
        for offset in 0..(MARKS_PER_RECORD as i64 + 5) {
            entries.push(entry("in", 0, offset, Some(offset as u128)));
            if offset < 3 {
                entries.push(entry("in", 1, offset, Some(1 << 64 | offset as u128)));
                entries.push(entry("in", 1, offset, None));
            }
        }
        let (placed, values) = gather(entries.iter().enumerate());
        assert_eq!(
            values.len(),
            3,
            "two records of partition 0, one of partition 1"
        );
        assert_eq!(values[0].marks.len(), MARKS_PER_RECORD);
        assert_eq!((values[1].partition, values[1].marks.len()), (1, 3));
        assert_eq!((values[2].partition, values[2].marks.len()), (0, 5));
        // Every entry with a mark is placed, once, in the record holding its mark.
        assert_eq!(placed.len(), MARKS_PER_RECORD + 5 + 3);
        for &(index, slot) in &placed {
            let (key, _) = entries[index].mark.expect("a mark");
            assert!(values[slot].marks.iter().any(|m| m.0 == key.to_bytes()));
        }
        // Partition 0's offsets run in order across its two records.
        let offsets: Vec<i64> = [&values[0], &values[2]]
            .iter()
            .flat_map(|v| v.marks.iter().map(|m| m.1))
            .collect();
        assert_eq!(
            offsets,
            (0..MARKS_PER_RECORD as i64 + 5).collect::<Vec<_>>()
        );
    }

    #[test]
    fn both_record_formats_decode_and_anything_else_is_refused() {
        let values = gather(
            [entry("in", 2, 7, Some(42)), entry("in", 2, 8, Some(43))]
                .iter()
                .enumerate(),
        )
        .1;
        let record = marks_record("log", [7; 16], &values[0]);
        assert_eq!(record.partition, Some(2));
        assert_eq!(record.timestamp_ms, Some(1_008), "the newest mark's time");
        let mut marks = Vec::new();
        assert!(decode(
            record.key.as_ref(),
            record.value.as_ref(),
            &mut marks
        ));
        assert_eq!(marks, vec![(KeyHash(42), 1_007), (KeyHash(43), 1_008)]);
        // One mark per record, keyed by the mark: what earlier versions wrote.
        let old = Bytes::from(
            postcard::to_stdvec(&MarkValue {
                version: FORMAT_VERSION,
                topic: "in".into(),
                partition: 2,
                offset: 9,
                at_ms: 5,
            })
            .expect("encode"),
        );
        let key = Bytes::copy_from_slice(&KeyHash(44).to_bytes());
        assert!(decode(Some(&key), Some(&old), &mut marks));
        assert_eq!(marks.last(), Some(&(KeyHash(44), 5)));
        let before = marks.len();
        assert!(
            !decode(None, Some(&old), &mut marks),
            "a one-mark record needs its key"
        );
        assert!(!decode(
            Some(&key),
            Some(&Bytes::from_static(b"\x03xx")),
            &mut marks
        ));
        assert!(!decode(Some(&key), None, &mut marks));
        assert!(!decode(
            None,
            Some(&Bytes::from_static(&[2, 1])),
            &mut marks
        ));
        assert_eq!(marks.len(), before, "nothing added from a refused record");
    }
}
