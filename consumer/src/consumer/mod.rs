//! The consumer: subscription or manual assignment, positions, fetching, rebalances, commits.
//!
//! The application drives it (`poll`, `recv`, or the `stream`), as with the Java client: the
//! rebalance listener runs inside those calls, on the application's task, so it sees a
//! consistent view and may commit or seek. The JoinGroup + SyncGroup round and the commits
//! asked for on revocation run on tasks of their own, so a cancelled poll loses neither. The
//! heartbeat runs on its own task (see `group`), so a slow handler never makes the member look
//! dead; a handler slower than `max.poll.interval.ms` makes it leave the group instead.
//!
//! Fetching is pipelined: one Fetch in flight per broker, sent for every partition whose
//! buffer is below half of `max.partition.fetch.bytes`, so the next records are on their way
//! while the application handles the current ones. A partition's buffer holds at most one
//! more response, so memory stays bounded when the handler is slow (back-pressure).
//!
//! Layout: this file holds the public API (`Consumer`: connect, subscribe/assign, positions,
//! commits, `poll`/`recv`/`stream`, close); `fetching` the fetch pipeline (positions, Fetch
//! and ListOffsets requests, buffers, handing records out); `rebalance` the listener and the
//! rebalance handling on the application's side (the round itself, JoinGroup and SyncGroup,
//! is in `crate::group`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, Stream};
use semel_client::{ClientConfig, Cluster, ConnectionConfig};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::assignor::{Strategy, TopicPartition};
use crate::config::ConsumerConfig;
use crate::group::{GroupShared, Rejoin};
use crate::record::{ConsumerError, ConsumerRecord};

mod export;
mod fetching;
mod rebalance;

use fetching::FetchFuture;
use rebalance::{DeferredCommit, ListenerCall, Round};
pub use rebalance::{RebalanceContext, RebalanceListener};

/// Counters, as a snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsumerMetrics {
    /// Records handed to the application.
    pub records: u64,
    /// Key + value + header bytes of those records.
    pub bytes: u64,
    /// Fetch responses handled.
    pub fetches: u64,
    /// Completed JoinGroup + SyncGroup rounds.
    pub rebalances: u64,
}

#[derive(Debug)]
struct PartitionState {
    topic: Arc<str>,
    /// The next offset to hand out; `None` until known (committed offset, reset or seek).
    position: Option<i64>,
    /// Where the next fetch starts (after what is buffered).
    fetch_offset: i64,
    /// Reset to this timestamp (-2 earliest, -1 latest) instead of the committed offset.
    reset_to: Option<i64>,
    paused: bool,
    buffer: VecDeque<ConsumerRecord>,
    buffered_bytes: usize,
    /// Bumped by every seek, so an answer to a fetch sent before it is dropped.
    epoch: u64,
    in_flight: bool,
    error: Option<ConsumerError>,
}

impl PartitionState {
    fn new(topic: Arc<str>) -> Self {
        Self {
            topic,
            position: None,
            fetch_offset: -1,
            reset_to: None,
            paused: false,
            buffer: VecDeque::new(),
            buffered_bytes: 0,
            epoch: 0,
            in_flight: false,
            error: None,
        }
    }

    fn set_position(&mut self, offset: i64) {
        self.position = Some(offset);
        self.fetch_offset = offset;
        self.reset_to = None;
        self.buffer.clear();
        self.buffered_bytes = 0;
        self.epoch += 1;
        self.error = None;
    }

    fn needs_reset(&mut self, to: i64) {
        self.position = None;
        self.reset_to = Some(to);
        self.buffer.clear();
        self.buffered_bytes = 0;
        self.epoch += 1;
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Mode {
    None,
    Subscribed(BTreeSet<String>),
    Assigned,
}

/// Completion of a commit running on its own task.
type CommitDone = futures::future::Shared<futures::future::BoxFuture<'static, ()>>;

/// A Kafka-protocol consumer: a group member (`subscribe`) or a reader of chosen partitions
/// (`assign`).
pub struct Consumer {
    config: ConsumerConfig,
    cluster: Arc<Cluster>,
    group: Option<Arc<GroupShared>>,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
    wake: Arc<Notify>,
    mode: Mode,
    partitions: BTreeMap<TopicPartition, PartitionState>,
    topic_names: HashMap<String, Arc<str>>,
    in_flight: FuturesUnordered<FetchFuture>,
    fetching_nodes: HashSet<i32>,
    listener: Option<Box<dyn RebalanceListener>>,
    /// The last assignment, for the eager sticky assignor's user data.
    previous: BTreeSet<TopicPartition>,
    joined_counts: BTreeMap<String, i32>,
    generation: i32,
    protocol: Option<Strategy>,
    cursor: Option<TopicPartition>,
    taken_from_cursor: usize,
    last_auto_commit: Instant,
    last_metadata: Instant,
    retry_at: Option<Instant>,
    metadata_stale: bool,
    /// The last commit started without waiting (async commits, commits on revocation); the
    /// next one waits for it, so commits land in order. Shared, so a wait that is cancelled
    /// leaves it for the next waiter.
    last_async_commit: Option<CommitDone>,
    /// Offsets a revocation callback asked to commit once they are known
    /// (`RebalanceContext::commit_when`), taken by the revocation that called it.
    deferred_commits: Vec<DeferredCommit>,
    /// The JoinGroup + SyncGroup round under way, on its own task. It stays here until its
    /// result has been applied, so a poll cancelled while waiting for it (a `timeout` around
    /// `recv`, a `select!`) never loses a round the coordinator already completed.
    pending_join: Option<tokio::task::JoinHandle<Result<Round, ConsumerError>>>,
    metrics: ConsumerMetrics,
    /// The same counters, published through the `metrics` facade.
    export: export::Export,
    closed: bool,
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("group_id", &self.config.group_id)
            .field("mode", &self.mode)
            .field("assignment", &self.partitions.keys().collect::<Vec<_>>())
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Consumer {
    /// Validates `config` and connects to the cluster (loading its metadata).
    ///
    /// # Errors
    /// `Config` for settings that cannot work; `Client` when no bootstrap server answers.
    pub async fn connect(config: ConsumerConfig) -> Result<Self, ConsumerError> {
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
                reconnect_backoff: config.reconnect_backoff,
                reconnect_backoff_max: config.reconnect_backoff_max,
            })
            .await?,
        );
        let wake = Arc::new(Notify::new());
        let group = config.group_id.clone().map(|id| {
            GroupShared::new(id, config.clone(), Arc::clone(&cluster), Arc::clone(&wake))
        });
        let heartbeat = group
            .as_ref()
            .map(|g| tokio::spawn(Arc::clone(g).heartbeat_loop()));
        let now = Instant::now();
        let export = export::Export::new(&config.client_id);
        Ok(Self {
            config,
            cluster,
            group,
            heartbeat,
            wake,
            mode: Mode::None,
            partitions: BTreeMap::new(),
            topic_names: HashMap::new(),
            in_flight: FuturesUnordered::new(),
            fetching_nodes: HashSet::new(),
            listener: None,
            previous: BTreeSet::new(),
            joined_counts: BTreeMap::new(),
            generation: -1,
            protocol: None,
            cursor: None,
            taken_from_cursor: 0,
            last_auto_commit: now,
            last_metadata: now,
            retry_at: None,
            metadata_stale: false,
            last_async_commit: None,
            deferred_commits: Vec::new(),
            pending_join: None,
            metrics: ConsumerMetrics::default(),
            export,
            closed: false,
        })
    }

    /// Sets the rebalance listener (replacing any earlier one).
    pub fn set_rebalance_listener(&mut self, listener: impl RebalanceListener + 'static) {
        self.listener = Some(Box::new(listener));
    }

    /// Joins the group (`group.id`) for `topics`. Calling it again with other topics changes
    /// the subscription, which rebalances the group. Nothing happens on the wire until the
    /// next `poll`/`recv`.
    ///
    /// # Errors
    /// `State` without `group.id`, or after `assign`.
    pub fn subscribe<I, S>(&mut self, topics: I) -> Result<(), ConsumerError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let Some(group) = &self.group else {
            return Err(ConsumerError::State(
                "subscribe needs group.id (or use assign)".into(),
            ));
        };
        if self.mode == Mode::Assigned {
            return Err(ConsumerError::State(
                "subscribe after assign: a consumer either subscribes or assigns".into(),
            ));
        }
        let topics: BTreeSet<String> = topics.into_iter().map(Into::into).collect();
        if topics.is_empty() {
            return Err(ConsumerError::State(
                "subscribe to at least one topic".into(),
            ));
        }
        let changed = !matches!(&self.mode, Mode::Subscribed(t) if *t == topics);
        self.mode = Mode::Subscribed(topics);
        if changed && self.generation >= 0 {
            group.request_rejoin(Rejoin::Needed("the subscription changed".into()));
        }
        Ok(())
    }

    /// Reads exactly these partitions, with no group membership (commits still go to
    /// `group.id` if set, as Kafka's "simple" consumer does). Replaces an earlier `assign`.
    ///
    /// # Errors
    /// `State` after `subscribe`.
    pub fn assign<I>(&mut self, partitions: I) -> Result<(), ConsumerError>
    where
        I: IntoIterator<Item = TopicPartition>,
    {
        if matches!(self.mode, Mode::Subscribed(_)) {
            return Err(ConsumerError::State(
                "assign after subscribe: a consumer either subscribes or assigns".into(),
            ));
        }
        let wanted: BTreeSet<TopicPartition> = partitions.into_iter().collect();
        self.partitions.retain(|tp, _| wanted.contains(tp));
        for tp in wanted {
            if !self.partitions.contains_key(&tp) {
                let topic = self.topic_name(&tp.0);
                self.partitions.insert(tp, PartitionState::new(topic));
            }
        }
        self.mode = Mode::Assigned;
        Ok(())
    }

    /// The partitions this consumer holds now.
    pub fn assignment(&self) -> BTreeSet<TopicPartition> {
        self.partitions.keys().cloned().collect()
    }

    /// Whether this consumer is a group member by subscription (not assigned by hand).
    #[cfg(feature = "dedup")]
    pub(crate) fn is_subscribed(&self) -> bool {
        matches!(self.mode, Mode::Subscribed(_))
    }

    /// The subscribed topics.
    pub fn subscription(&self) -> BTreeSet<String> {
        match &self.mode {
            Mode::Subscribed(t) => t.clone(),
            _ => BTreeSet::new(),
        }
    }

    /// The settings this consumer was made with.
    pub fn config(&self) -> &ConsumerConfig {
        &self.config
    }

    /// For each partition, the earliest offset whose record timestamp is at or after the given
    /// time in ms (Kafka's `offsetsForTimes`; -1 asks for the end offset, -2 the beginning).
    /// A partition with no such record maps to its end offset. The partitions need not be
    /// assigned.
    ///
    /// # Errors
    /// `Client` when a partition's leader gives no answer within `request.timeout.ms`.
    pub async fn offsets_for_times(
        &mut self,
        times: &BTreeMap<TopicPartition, i64>,
    ) -> Result<BTreeMap<TopicPartition, i64>, ConsumerError> {
        let deadline = Instant::now() + self.config.request_timeout;
        let mut found = BTreeMap::new();
        let mut missing = times.clone();
        loop {
            let topics: Vec<String> = missing
                .keys()
                .map(|(t, _)| t.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            if let Err(e) = self.cluster.refresh_metadata(Some(&topics), false).await {
                tracing::debug!(error = %e, "metadata refresh for ListOffsets failed");
            }
            let answered = self.list_offsets(&missing).await;
            let mut ends = BTreeMap::new();
            for (tp, offset) in answered {
                missing.remove(&tp);
                if offset < 0 {
                    ends.insert(tp, -1);
                } else {
                    found.insert(tp, offset);
                }
            }
            if !ends.is_empty() {
                for (tp, offset) in self.list_offsets(&ends).await {
                    if offset >= 0 {
                        ends.remove(&tp);
                        found.insert(tp, offset);
                    }
                }
                missing.extend(ends);
            }
            if missing.is_empty() {
                return Ok(found);
            }
            if Instant::now() >= deadline {
                return Err(ConsumerError::State(format!(
                    "ListOffsets: no answer for {:?} within request.timeout.ms",
                    missing.keys().collect::<Vec<_>>()
                )));
            }
            tokio::time::sleep(self.config.retry_backoff).await;
        }
    }

    /// `group.id`, if set.
    pub fn group_id(&self) -> Option<String> {
        self.config.group_id.clone()
    }

    /// The group generation of the current assignment (-1 before the first).
    pub fn generation(&self) -> i32 {
        self.generation
    }

    /// The assignor the group chose at the last rebalance.
    pub fn protocol(&self) -> Option<Strategy> {
        self.protocol
    }

    /// This member's id in the group (empty before the first join).
    pub fn member_id(&self) -> String {
        self.group
            .as_ref()
            .map(|g| g.lock().member_id.clone())
            .unwrap_or_default()
    }

    /// This member's identity in its group, for a transactional producer's
    /// `send_offsets_to_transaction` (KIP-447). `None` without a `group.id`.
    pub fn group_metadata(&self) -> Option<semel_client::ConsumerGroupMetadata> {
        let group_id = self.config.group_id.clone()?;
        Some(semel_client::ConsumerGroupMetadata {
            group_id,
            generation_id: self.generation,
            member_id: self.member_id(),
            group_instance_id: self.config.group_instance_id.clone(),
        })
    }

    /// Bytes of records fetched but not yet handed out (keys, values, headers and a fixed
    /// overhead per record), over all partitions. Stays below about 1.5 ×
    /// `max.partition.fetch.bytes` per partition, however slow the application is.
    pub fn buffered_bytes(&self) -> usize {
        self.partitions.values().map(|s| s.buffered_bytes).sum()
    }

    /// Counters since `connect`.
    pub fn metrics(&self) -> ConsumerMetrics {
        self.metrics
    }

    /// The next offset `poll` would return for `partition` (`None` until known).
    pub fn position(&self, partition: &TopicPartition) -> Option<i64> {
        self.partitions.get(partition).and_then(|s| s.position)
    }

    /// Where reading of `partition` goes on: the next record returned is at `offset`.
    ///
    /// # Errors
    /// `State` when the partition is not assigned.
    pub fn seek(&mut self, partition: &TopicPartition, offset: i64) -> Result<(), ConsumerError> {
        let state = self
            .partitions
            .get_mut(partition)
            .ok_or_else(|| ConsumerError::State(format!("seek: {partition:?} is not assigned")))?;
        state.set_position(offset);
        Ok(())
    }

    /// Reads `partitions` from their log start.
    ///
    /// # Errors
    /// `State` when a partition is not assigned.
    pub fn seek_to_beginning(
        &mut self,
        partitions: &[TopicPartition],
    ) -> Result<(), ConsumerError> {
        self.reset(partitions, -2)
    }

    /// Reads `partitions` from their end (only records written from now on).
    ///
    /// # Errors
    /// `State` when a partition is not assigned.
    pub fn seek_to_end(&mut self, partitions: &[TopicPartition]) -> Result<(), ConsumerError> {
        self.reset(partitions, -1)
    }

    fn reset(&mut self, partitions: &[TopicPartition], to: i64) -> Result<(), ConsumerError> {
        for tp in partitions {
            self.partitions
                .get_mut(tp)
                .ok_or_else(|| ConsumerError::State(format!("seek: {tp:?} is not assigned")))?
                .needs_reset(to);
        }
        Ok(())
    }

    /// Stops returning and fetching records of `partitions` until `resume` (the position
    /// stays; a rebalance forgets pauses of partitions that move).
    pub fn pause(&mut self, partitions: &[TopicPartition]) {
        for tp in partitions {
            if let Some(s) = self.partitions.get_mut(tp) {
                s.paused = true;
            }
        }
    }

    /// Undoes `pause`.
    pub fn resume(&mut self, partitions: &[TopicPartition]) {
        for tp in partitions {
            if let Some(s) = self.partitions.get_mut(tp) {
                s.paused = false;
            }
        }
    }

    /// The paused partitions.
    pub fn paused(&self) -> BTreeSet<TopicPartition> {
        self.partitions
            .iter()
            .filter(|(_, s)| s.paused)
            .map(|(tp, _)| tp.clone())
            .collect()
    }

    /// The group's committed offsets of `partitions` (absent: nothing committed).
    ///
    /// # Errors
    /// `State` without `group.id`; `Client` when the coordinator cannot be reached.
    pub async fn committed(
        &self,
        partitions: &BTreeSet<TopicPartition>,
    ) -> Result<BTreeMap<TopicPartition, i64>, ConsumerError> {
        self.group()?.committed(partitions).await
    }

    /// Commits the positions of every assigned partition and waits for the answer (Java's
    /// `commitSync()`): what `poll` returned so far counts as handled.
    ///
    /// # Errors
    /// `CommitFailed` when the group rebalanced meanwhile; `Client`.
    pub async fn commit(&mut self) -> Result<(), ConsumerError> {
        let offsets = self.positions();
        self.commit_offsets(&offsets).await
    }

    /// Commits `offsets` (for each partition, the next offset to read: last handled + 1) and
    /// waits for the answer.
    ///
    /// # Errors
    /// As [`Consumer::commit`].
    pub async fn commit_offsets(
        &mut self,
        offsets: &BTreeMap<TopicPartition, i64>,
    ) -> Result<(), ConsumerError> {
        // An earlier async commit lands first, so commits never go backwards.
        if let Some(previous) = self.last_async_commit.clone() {
            previous.await;
        }
        let group = self.group()?;
        group
            .commit(offsets, matches!(self.mode, Mode::Subscribed(_)))
            .await
    }

    /// Commits `offsets` without waiting; the returned receiver tells how it went (dropping
    /// it is fine). Commits are sent in the order they were asked for, so a later commit
    /// never lands before an earlier one.
    ///
    /// # Errors
    /// `State` without `group.id`.
    pub fn commit_async(
        &mut self,
        offsets: BTreeMap<TopicPartition, i64>,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<(), ConsumerError>>, ConsumerError> {
        let group = Arc::clone(self.group()?);
        Ok(self.commit_in_background(group, offsets, Vec::new(), "async commit failed"))
    }

    /// Starts a commit on its own task, after the previous one.
    /// Commits `offsets` on a task of its own, after the commits before it, and after the
    /// `deferred` offsets are known (each waited for at most half of `max.poll.interval.ms`,
    /// the time the coordinator gives this member to rejoin).
    fn commit_in_background(
        &mut self,
        group: Arc<GroupShared>,
        offsets: BTreeMap<TopicPartition, i64>,
        deferred: Vec<DeferredCommit>,
        failure: &'static str,
    ) -> tokio::sync::oneshot::Receiver<Result<(), ConsumerError>> {
        let as_member = matches!(self.mode, Mode::Subscribed(_));
        let previous = self.last_async_commit.take();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let bound = self.config.max_poll_interval / 2;
        let task = tokio::spawn(async move {
            if let Some(previous) = previous {
                previous.await;
            }
            let mut offsets = offsets;
            for settled in deferred {
                match tokio::time::timeout(bound, settled.0).await {
                    Ok(more) => offsets.extend(more),
                    Err(_) => tracing::warn!(
                        waited = ?bound,
                        "a revocation's offsets were not known in time; committing without them"
                    ),
                }
            }
            let result = if offsets.is_empty() {
                Ok(())
            } else {
                group.commit(&offsets, as_member).await
            };
            if let Err(e) = &result {
                tracing::warn!(error = %e, "{failure}");
            }
            let _ = tx.send(result);
        });
        self.last_async_commit = Some(futures::FutureExt::shared(futures::FutureExt::boxed(
            async move {
                let _ = task.await;
            },
        )));
        rx
    }

    fn group(&self) -> Result<&Arc<GroupShared>, ConsumerError> {
        self.group
            .as_ref()
            .ok_or_else(|| ConsumerError::State("committing needs group.id".into()))
    }

    fn positions(&self) -> BTreeMap<TopicPartition, i64> {
        self.partitions
            .iter()
            .filter_map(|(tp, s)| s.position.map(|p| (tp.clone(), p)))
            .collect()
    }

    fn topic_name(&mut self, topic: &str) -> Arc<str> {
        Arc::clone(
            self.topic_names
                .entry(topic.to_string())
                .or_insert_with(|| Arc::from(topic)),
        )
    }

    /// Waits up to `timeout` for records and returns at most `max.poll.records` of them
    /// (an empty batch when none came). Rebalances, auto-commits and listener calls happen
    /// in here.
    ///
    /// # Errors
    /// `NoOffset`/`OffsetOutOfRange` with `auto.offset.reset=none`, `CorruptRecord`, fatal
    /// group errors, `Closed`.
    pub async fn poll(&mut self, timeout: Duration) -> Result<Vec<ConsumerRecord>, ConsumerError> {
        let deadline = Instant::now() + timeout;
        if !self.fill(Some(deadline)).await? {
            return Ok(Vec::new());
        }
        // Nothing waits once records are taken: a poll cancelled before this point has
        // taken none, so none is lost (the next fetches went out in `fill`).
        let mut out = Vec::new();
        while out.len() < self.config.max_poll_records {
            match self.take_one()? {
                Some(record) => out.push(record),
                None => break,
            }
        }
        Ok(out)
    }

    /// The next record, waiting as long as it takes.
    ///
    /// # Errors
    /// As [`Consumer::poll`].
    pub async fn recv(&mut self) -> Result<ConsumerRecord, ConsumerError> {
        loop {
            if self.attention_needed() {
                self.fill(Some(Instant::now())).await?;
            }
            // The next fetches go out before a record is taken, never after: a `recv`
            // cancelled while it waits (a `timeout`, a `select!`) must not have taken a
            // record it then never returns.
            if self.prefetch_due() {
                self.send_fetches().await;
            }
            if let Some(record) = self.take_one()? {
                return Ok(record);
            }
            self.fill(None).await?;
        }
    }

    /// The next record, waiting as long as it takes, and up to `max - 1` more that are
    /// already buffered (no further wait): a batch for handlers that settle many records
    /// with one write. Cancel-safe as [`Consumer::recv`]: records are taken only once
    /// nothing more is awaited.
    ///
    /// # Errors
    /// As [`Consumer::poll`]; an error after the first record is kept for the next call
    /// (the records taken before it are returned).
    pub async fn recv_many(&mut self, max: usize) -> Result<Vec<ConsumerRecord>, ConsumerError> {
        let first = self.recv().await?;
        let mut out = Vec::with_capacity(max.clamp(1, 4096));
        out.push(first);
        while out.len() < max {
            // A partition's error is left for the next call: these records come first.
            match self.take_buffered() {
                Some(record) => out.push(record),
                None => break,
            }
        }
        Ok(out)
    }

    /// The records as a `futures::Stream` (it ends after `Closed`).
    pub fn stream(
        &mut self,
    ) -> impl Stream<Item = Result<ConsumerRecord, ConsumerError>> + Send + Unpin + '_ {
        Box::pin(futures::stream::unfold(self, |consumer| async move {
            match consumer.recv().await {
                Err(ConsumerError::Closed) => None,
                other => Some((other, consumer)),
            }
        }))
    }

    /// Commits (when `enable.auto.commit`), calls the revocation callback, leaves the group
    /// (dynamic members) and stops the heartbeat.
    ///
    /// # Errors
    /// The auto-commit's error (the group is left anyway).
    pub async fn close(mut self) -> Result<(), ConsumerError> {
        let mut result = Ok(());
        if let Some(join) = self.pending_join.take() {
            join.abort();
        }
        if let Some(previous) = self.last_async_commit.take() {
            previous.await;
        }
        if let Some(group) = self.group.clone() {
            let owned: BTreeSet<TopicPartition> = self.partitions.keys().cloned().collect();
            if matches!(self.mode, Mode::Subscribed(_)) && self.generation >= 0 {
                let lost = group
                    .lock()
                    .rejoin
                    .as_ref()
                    .is_some_and(|r| matches!(r, Rejoin::Lost(_)));
                if lost {
                    self.call_listener(ListenerCall::Lost, &owned, &BTreeMap::new());
                } else {
                    let (_, mut commits) =
                        self.call_listener(ListenerCall::Revoked, &owned, &BTreeMap::new());
                    let bound = self.config.max_poll_interval / 2;
                    for settled in std::mem::take(&mut self.deferred_commits) {
                        match tokio::time::timeout(bound, settled.0).await {
                            Ok(more) => commits.extend(more),
                            Err(_) => {
                                tracing::warn!(waited = ?bound, "a revocation's offsets were not known in time; closing without them")
                            }
                        }
                    }
                    if self.config.enable_auto_commit {
                        for (tp, offset) in self.positions() {
                            commits.entry(tp).or_insert(offset);
                        }
                    }
                    result = group.commit(&commits, true).await;
                }
                group.leave("the consumer is closing").await;
            } else if self.config.enable_auto_commit {
                result = group.commit(&self.positions(), false).await;
            }
            group.close();
        }
        if let Some(task) = self.heartbeat.take() {
            let _ = task.await;
        }
        self.closed = true;
        result
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        if let Some(join) = self.pending_join.take() {
            join.abort();
        }
        if let Some(group) = &self.group {
            group.close();
        }
        if let Some(task) = self.heartbeat.take() {
            task.abort();
        }
    }
}
