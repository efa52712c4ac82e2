//! The dedup middleware: a [`Consumer`] that hands out only messages not handled before.
//!
//! For every record it derives a message key ([`KeySource`]: a header, `semel-msg-id` by
//! default; the record key; or a closure), claims it in the [`DedupStore`], and:
//! - **Fresh** (or a claim whose lease expired, its handler having crashed): the record is
//!   returned as a [`Fresh`] handle. [`DedupConsumer::done`] marks it handled, records the
//!   partition's next offset and applies the handler's own writes, all in one RocksDB
//!   `WriteBatch`; [`DedupConsumer::failed`] releases the claim and seeks back, so the record
//!   comes again. A handle dropped without either (a panicking handler) releases its claim.
//! - **Duplicate**: dropped and counted.
//! - **In progress** (another handler's live claim, e.g. a member of the same process that
//!   is still on it): waits for the lease to end, then asks again.
//!
//! On assignment the consumer starts at the store's offset when it is ahead of the group's
//! committed offset (the store is written with every mark, the group commit only every
//! `commit_interval`). Group commits carry the offsets of settled records.
//!
//! **What is exactly-once and what is not.** Writes made through the batch (`done`'s closure)
//! commit with the mark or not at all: exactly once. A side effect outside it (an HTTP call,
//! a file append) that happened before a crash, with the mark not yet written, happens again
//! once the claim's lease expires: at-least-once. `tests/dedup_consumer.rs` shows both.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::changelog::{Changelog, ChangelogConfig, ChangelogError, RestoreMetrics};
use super::store::{Claim, DedupError, DedupStore, KeyHash, StateBatch};
use crate::assignor::TopicPartition;
use crate::consumer::{Consumer, RebalanceContext, RebalanceListener};
use crate::record::{ConsumerError, ConsumerRecord};

/// A function that derives a message key from a record.
pub type KeyFn = Arc<dyn Fn(&ConsumerRecord) -> Option<Bytes> + Send + Sync>;

/// Where a message's identity comes from.
#[derive(Clone)]
pub enum KeySource {
    /// A header's value (the default: `semel-msg-id`).
    Header(String),
    /// The record key.
    RecordKey,
    /// Any function of the record.
    Custom(KeyFn),
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Header(name) => write!(f, "Header({name:?})"),
            Self::RecordKey => write!(f, "RecordKey"),
            Self::Custom(_) => write!(f, "Custom(..)"),
        }
    }
}

impl KeySource {
    fn key(&self, record: &ConsumerRecord) -> Option<Bytes> {
        match self {
            Self::Header(name) => record.header(name).cloned(),
            Self::RecordKey => record.key.clone(),
            Self::Custom(f) => f(record),
        }
        .filter(|k| !k.is_empty())
    }
}

/// What to do with a record that has no key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingKey {
    /// Hand it out without deduplication (`Fresh::key()` is `None`).
    Pass,
    /// Fail `next` with [`MiddlewareError::NoKey`] (the default); the consumer has moved past
    /// the record, and `seek` brings it back.
    Reject,
}

/// Middleware settings.
#[derive(Debug, Clone)]
pub struct MiddlewareConfig {
    /// Where the message key comes from.
    pub key_source: KeySource,
    /// Records without a key.
    pub missing_key: MissingKey,
    /// How often settled offsets are committed to the group (the store has them at once).
    pub commit_interval: Duration,
    /// The changelog topic that lets a consumer on another host know the marks of a
    /// partition it takes over (on by default; `None` keeps marks on this host only, which
    /// is enough when one host consumes the group). See [`super::changelog`].
    pub changelog: Option<ChangelogConfig>,
}

impl Default for MiddlewareConfig {
    fn default() -> Self {
        Self {
            key_source: KeySource::Header("semel-msg-id".into()),
            missing_key: MissingKey::Reject,
            commit_interval: Duration::from_secs(1),
            changelog: Some(ChangelogConfig::default()),
        }
    }
}

/// What went wrong in the middleware.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MiddlewareError {
    /// The consumer failed.
    #[error(transparent)]
    Consumer(#[from] ConsumerError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] DedupError),
    /// The changelog failed.
    #[error(transparent)]
    Changelog(#[from] ChangelogError),
    /// A record without a key, with `MissingKey::Reject`.
    #[error(
        "record {topic}-{partition}@{offset} has no message key ({source_:?}); set MissingKey::Pass to hand such records out without deduplication"
    )]
    NoKey {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// The offset.
        offset: i64,
        /// The key source that found nothing.
        source_: KeySource,
    },
}

/// Counters: the store's decisions plus the middleware's own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MiddlewareMetrics {
    /// Keys handed out for the first time.
    pub fresh: u64,
    /// Messages dropped as already handled.
    pub duplicates: u64,
    /// Claims taken over after their lease expired.
    pub claims_expired: u64,
    /// Claims released by `failed` (or a dropped handle).
    pub handler_failures: u64,
    /// Records without a key handed out (`MissingKey::Pass`).
    pub passed_without_key: u64,
    /// Records without a key rejected.
    pub rejected_without_key: u64,
    /// Estimated keys in the store.
    pub keys_stored: u64,
    /// SST bytes on disk.
    pub bytes_on_disk: u64,
    /// Changelog replays (zero without a changelog).
    pub changelog: RestoreMetrics,
}

/// A claimed record: settle it with [`DedupConsumer::done`] or [`DedupConsumer::failed`].
/// Dropping it unsettled releases the claim.
#[derive(Debug)]
pub struct Fresh {
    /// The record.
    pub record: ConsumerRecord,
    key: Option<KeyHash>,
    reclaimed: bool,
    store: Arc<DedupStore>,
    settled: bool,
}

impl Fresh {
    /// The message key's hash (`None` for a record passed without key).
    pub fn key(&self) -> Option<KeyHash> {
        self.key
    }

    /// Whether an earlier handler claimed it and crashed (its lease expired): a side effect
    /// outside the store may already have happened once.
    pub fn reclaimed(&self) -> bool {
        self.reclaimed
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        if !self.settled {
            if let Some(key) = self.key {
                if let Err(e) = self.store.release(key) {
                    tracing::warn!(error = %e, "releasing an unsettled claim failed; its lease will expire");
                }
            }
        }
    }
}

/// Seeks newly assigned partitions to the store's offset when it is ahead of the group's
/// commit, and commits the store's offsets of revoked partitions.
struct StoreOffsets {
    store: Arc<DedupStore>,
    group: String,
    /// With a changelog: offsets whose marks the changelog acknowledged (what may be
    /// committed), and the partitions waiting for a replay.
    changelog: Option<(SharedOffsets, SharedPartitions)>,
}

type SharedOffsets = Arc<Mutex<BTreeMap<TopicPartition, i64>>>;
type SharedPartitions = Arc<Mutex<BTreeSet<TopicPartition>>>;

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RebalanceListener for StoreOffsets {
    fn on_partitions_assigned(
        &mut self,
        ctx: &mut RebalanceContext<'_>,
        partitions: &std::collections::BTreeSet<TopicPartition>,
    ) {
        if let Some((_, restore)) = &self.changelog {
            locked(restore).extend(partitions.iter().cloned());
        }
        for tp in partitions {
            match self.store.offset(&self.group, &tp.0, tp.1) {
                Ok(Some(offset)) if Some(offset) > ctx.committed(tp) => {
                    tracing::info!(?tp, store = offset, committed = ?ctx.committed(tp), "starting at the dedup store's offset");
                    ctx.seek(tp.clone(), offset);
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, ?tp, "cannot read the store's offset"),
            }
        }
    }

    fn on_partitions_revoked(
        &mut self,
        ctx: &mut RebalanceContext<'_>,
        partitions: &std::collections::BTreeSet<TopicPartition>,
    ) {
        if let Some((acked, restore)) = &self.changelog {
            // Only offsets whose marks are in the changelog: the next owner may be on
            // another host.
            let acked = locked(acked);
            let mut restore = locked(restore);
            for tp in partitions {
                restore.remove(tp);
                if let Some(&offset) = acked.get(tp) {
                    ctx.commit(tp.clone(), offset);
                }
            }
            return;
        }
        for tp in partitions {
            if let Ok(Some(offset)) = self.store.offset(&self.group, &tp.0, tp.1) {
                ctx.commit(tp.clone(), offset);
            }
        }
    }

    fn on_partitions_lost(
        &mut self,
        _ctx: &mut RebalanceContext<'_>,
        partitions: &std::collections::BTreeSet<TopicPartition>,
    ) {
        if let Some((_, restore)) = &self.changelog {
            let mut restore = locked(restore);
            for tp in partitions {
                restore.remove(tp);
            }
        }
    }
}

/// A group consumer that yields only messages not handled before.
#[derive(Debug)]
pub struct DedupConsumer {
    consumer: Consumer,
    store: Arc<DedupStore>,
    group: String,
    config: MiddlewareConfig,
    settled: BTreeMap<TopicPartition, i64>,
    pending: Option<(ConsumerRecord, KeyHash)>,
    /// A record read while a replay was due, kept until the replay is done.
    held: Option<ConsumerRecord>,
    last_commit: Instant,
    passed: u64,
    rejected: u64,
    changelog: Option<Changelog>,
    acked: SharedOffsets,
    to_restore: SharedPartitions,
}

impl DedupConsumer {
    /// Wraps `consumer` (which must have `group.id`; subscribe before or after). Replaces the
    /// consumer's rebalance listener with the one that seeks to the store's offsets.
    ///
    /// # Errors
    /// `State` without `group.id`.
    pub fn new(
        mut consumer: Consumer,
        store: Arc<DedupStore>,
        config: MiddlewareConfig,
    ) -> Result<Self, MiddlewareError> {
        let group = consumer.group_id().ok_or_else(|| {
            ConsumerError::State("the dedup middleware scopes keys by group.id; set it".into())
        })?;
        let acked = SharedOffsets::default();
        let to_restore = SharedPartitions::default();
        consumer.set_rebalance_listener(StoreOffsets {
            store: Arc::clone(&store),
            group: group.clone(),
            changelog: config
                .changelog
                .as_ref()
                .map(|_| (Arc::clone(&acked), Arc::clone(&to_restore))),
        });
        Ok(Self {
            consumer,
            store,
            group,
            config,
            settled: BTreeMap::new(),
            pending: None,
            held: None,
            last_commit: Instant::now(),
            passed: 0,
            rejected: 0,
            changelog: None,
            acked,
            to_restore,
        })
    }

    /// The wrapped consumer (subscribe, pause, ...).
    pub fn consumer(&mut self) -> &mut Consumer {
        &mut self.consumer
    }

    /// The store.
    pub fn store(&self) -> &Arc<DedupStore> {
        &self.store
    }

    /// The next message not handled before, claimed. Duplicates are dropped on the way.
    /// Cancel-safe: a record taken from the consumer but not yet handed out (waiting for
    /// another handler's lease) is kept for the next call.
    ///
    /// # Errors
    /// The consumer's and the store's errors; `NoKey` with `MissingKey::Reject`.
    pub async fn next(&mut self) -> Result<Fresh, MiddlewareError> {
        loop {
            let (record, key) = match self.pending.take() {
                Some(pending) => pending,
                None => {
                    self.pump_changelog().await?;
                    self.maybe_commit();
                    let mut record = match self.held.take() {
                        Some(record) => record,
                        None => self.consumer.recv().await?,
                    };
                    if !locked(&self.to_restore).is_empty() {
                        // Kept across a failed or cancelled replay.
                        self.held = Some(record);
                        self.restore_assigned().await?;
                        let Some(held) = self.held.take() else {
                            continue;
                        };
                        record = held;
                    }
                    let Some(message_key) = self.config.key_source.key(&record) else {
                        match self.config.missing_key {
                            MissingKey::Pass => {
                                self.passed += 1;
                                return Ok(self.fresh(record, None, false));
                            }
                            MissingKey::Reject => {
                                self.rejected += 1;
                                return Err(MiddlewareError::NoKey {
                                    topic: record.topic.to_string(),
                                    partition: record.partition,
                                    offset: record.offset,
                                    source_: self.config.key_source.clone(),
                                });
                            }
                        }
                    };
                    let key = KeyHash::new(&self.group, &record.topic, &message_key);
                    (record, key)
                }
            };
            match self.store.claim(key)? {
                Claim::Fresh => return Ok(self.fresh(record, Some(key), false)),
                Claim::Reclaimed => return Ok(self.fresh(record, Some(key), true)),
                Claim::Duplicate => {
                    tracing::debug!(topic = %record.topic, partition = record.partition, offset = record.offset, "duplicate dropped");
                    self.settle(record.topic_partition(), record.offset + 1, None);
                }
                Claim::InProgress { until_ms } => {
                    let now = crate::clock::Clock::now_ms(&crate::clock::SystemClock);
                    let wait = u64::try_from(until_ms.saturating_sub(now)).unwrap_or(0);
                    tracing::info!(topic = %record.topic, partition = record.partition, offset = record.offset, wait_ms = wait, "another handler holds the claim; waiting for its lease");
                    self.pending = Some((record, key));
                    tokio::time::sleep(Duration::from_millis(wait.clamp(10, 60_000))).await;
                }
            }
        }
    }

    /// The next offset of `partition` this middleware will hand out or drop (a record held
    /// back for another handler's lease counts as not yet read).
    pub fn position(&self, partition: &TopicPartition) -> Option<i64> {
        let waiting = self.pending.as_ref().map(|(r, _)| r).or(self.held.as_ref());
        match waiting {
            Some(record) if record.topic_partition() == *partition => Some(record.offset),
            _ => self.consumer.position(partition),
        }
    }

    fn fresh(&self, record: ConsumerRecord, key: Option<KeyHash>, reclaimed: bool) -> Fresh {
        Fresh {
            record,
            key,
            reclaimed,
            store: Arc::clone(&self.store),
            settled: false,
        }
    }

    /// Marks the message handled: the mark, the partition's next offset and `state`'s writes
    /// in one atomic batch.
    ///
    /// # Errors
    /// The store's error (nothing was written; the claim stays until its lease ends).
    pub fn done(
        &mut self,
        mut fresh: Fresh,
        state: impl FnOnce(&mut StateBatch<'_>),
    ) -> Result<(), MiddlewareError> {
        let record = &fresh.record;
        let next = record.offset + 1;
        match fresh.key {
            Some(key) => self.store.mark_done(
                key,
                Some((&self.group, &record.topic, record.partition, next)),
                state,
            )?,
            None => self.store.record_offset(
                &self.group,
                &record.topic,
                record.partition,
                next,
                state,
            )?,
        }
        fresh.settled = true;
        let tp = record.topic_partition();
        self.settle(tp, next, fresh.key);
        Ok(())
    }

    /// A record is settled (handled, or dropped as a duplicate): its offset may be committed
    /// now, or with a changelog once the marks before it (and its own) are acknowledged.
    fn settle(&mut self, tp: TopicPartition, next: i64, key: Option<KeyHash>) {
        match (&mut self.changelog, &self.config.changelog) {
            (Some(changelog), _) => match key {
                Some(key) => changelog.push_mark(tp, next, key),
                None => changelog.push_offset(tp, next),
            },
            (None, Some(_)) => {
                // Cannot happen: the changelog starts before the first record is read.
                tracing::error!(?tp, "changelog not started; offset not settled");
            }
            (None, None) => {
                self.settled.insert(tp, next);
            }
        }
    }

    /// Starts the changelog on first use, sends queued marks, releases acknowledged offsets.
    async fn pump_changelog(&mut self) -> Result<(), MiddlewareError> {
        let Some(config) = &self.config.changelog else {
            return Ok(());
        };
        if self.changelog.is_none() {
            let mut topics: BTreeSet<String> = self.consumer.subscription();
            topics.extend(self.consumer.assignment().into_iter().map(|tp| tp.0));
            let changelog = Changelog::start(
                self.consumer.config(),
                &self.group,
                self.store.window(),
                &self.store,
                config,
                &topics.into_iter().collect::<Vec<_>>(),
            )
            .await?;
            tracing::info!(topic = changelog.topic(), "dedup changelog started");
            self.changelog = Some(changelog);
        }
        if let Some(changelog) = &mut self.changelog {
            let before = self.settled.clone();
            changelog.pump(&mut self.settled).await?;
            if self.settled != before {
                let mut acked = locked(&self.acked);
                for (tp, offset) in &self.settled {
                    acked.insert(tp.clone(), *offset);
                }
            }
        }
        Ok(())
    }

    /// Replays the changelog of newly assigned partitions before any of their records is
    /// handed out.
    async fn restore_assigned(&mut self) -> Result<(), MiddlewareError> {
        // Cloned, not taken: a cancelled `next()` (a timeout around it) must leave the
        // partitions waiting for their replay.
        let partitions = locked(&self.to_restore).clone();
        if partitions.is_empty() {
            return Ok(());
        }
        if self.changelog.is_none() {
            self.pump_changelog().await?;
        }
        if let Some(changelog) = &mut self.changelog {
            changelog.restore(&self.store, &partitions).await?;
        }
        let mut waiting = locked(&self.to_restore);
        for tp in &partitions {
            waiting.remove(tp);
        }
        Ok(())
    }

    /// Waits until the changelog acknowledged every mark written so far (no-op without a
    /// changelog). Offsets are still committed only every `commit_interval`.
    ///
    /// # Errors
    /// The changelog's error.
    pub async fn flush_changelog(&mut self) -> Result<(), MiddlewareError> {
        if self.changelog.is_none() {
            return Ok(());
        }
        if let Some(changelog) = &mut self.changelog {
            changelog.flush(&mut self.settled).await?;
            let mut acked = locked(&self.acked);
            for (tp, offset) in &self.settled {
                acked.insert(tp.clone(), *offset);
            }
        }
        Ok(())
    }

    /// The handler failed: the claim is released and the consumer seeks back, so the message
    /// is handed out again.
    ///
    /// # Errors
    /// The store's or the consumer's error.
    pub fn failed(&mut self, mut fresh: Fresh) -> Result<(), MiddlewareError> {
        if let Some(key) = fresh.key {
            self.store.release(key)?;
        }
        fresh.settled = true;
        let tp = fresh.record.topic_partition();
        self.consumer.seek(&tp, fresh.record.offset)?;
        Ok(())
    }

    fn maybe_commit(&mut self) {
        if self.settled.is_empty() || self.last_commit.elapsed() < self.config.commit_interval {
            return;
        }
        self.last_commit = Instant::now();
        let offsets = std::mem::take(&mut self.settled);
        if let Err(e) = self.consumer.commit_async(offsets) {
            tracing::warn!(error = %e, "commit not sent");
        }
    }

    /// Counters.
    pub fn metrics(&self) -> MiddlewareMetrics {
        let counts = self.store.counts();
        let (keys_stored, bytes_on_disk) = self.store.size();
        MiddlewareMetrics {
            fresh: counts.fresh,
            duplicates: counts.duplicates,
            claims_expired: counts.claims_expired,
            handler_failures: counts.handler_failures,
            passed_without_key: self.passed,
            rejected_without_key: self.rejected,
            keys_stored,
            bytes_on_disk,
            changelog: self
                .changelog
                .as_ref()
                .map(Changelog::metrics)
                .unwrap_or_default(),
        }
    }

    /// Commits the settled offsets and closes the consumer (leaving the group).
    ///
    /// # Errors
    /// The commit's error.
    pub async fn close(mut self) -> Result<(), MiddlewareError> {
        if let Err(e) = self.flush_changelog().await {
            tracing::warn!(error = %e, "changelog not flushed; offsets of unacknowledged marks stay uncommitted");
        }
        if let Some(changelog) = self.changelog.take() {
            changelog.close().await;
        }
        let offsets = std::mem::take(&mut self.settled);
        if !offsets.is_empty() {
            if let Err(e) = self.consumer.commit_offsets(&offsets).await {
                tracing::warn!(error = %e, "final commit failed; the store's offsets still hold");
            }
        }
        self.consumer.close().await?;
        Ok(())
    }
}
