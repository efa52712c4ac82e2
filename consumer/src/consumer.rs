//! The consumer: subscription or manual assignment, positions, fetching, rebalances, commits.
//!
//! The application drives it (`poll`, `recv`, or the `stream`), as with the Java client: a
//! rebalance, a commit on revocation and the rebalance listener run inside those calls, on
//! the application's task, so a listener sees a consistent view and may commit or seek. The
//! heartbeat runs on its own task (see `group`), so a slow handler never makes the member look
//! dead; a handler slower than `max.poll.interval.ms` makes it leave the group instead.
//!
//! Fetching is pipelined: one Fetch in flight per broker, sent for every partition whose
//! buffer is below half of `max.partition.fetch.bytes`, so the next records are on their way
//! while the application handles the current ones. A partition's buffer holds at most one
//! more response, so memory stays bounded when the handler is slow (back-pressure).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, Stream, StreamExt};
use kafka_protocol::ResponseError;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::{
    ApiKey, BrokerId, FetchRequest, FetchResponse, ListOffsetsRequest, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use semel_client::{
    ClientConfig, ClientError, Cluster, ConnectionConfig, check_code, needs_metadata_refresh,
};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::assignor::{Strategy, TopicPartition};
use crate::config::{AutoOffsetReset, ConsumerConfig};
use crate::fetch::{self, AbortedTransaction};
use crate::group::{GroupShared, Rejoin, millis, partition_counts};
use crate::record::{ConsumerError, ConsumerRecord};

/// Called inside `poll`/`recv` when partitions come and go. Every method has a default that
/// does nothing (`on_partitions_lost` defaults to `on_partitions_revoked`, like Kafka's).
pub trait RebalanceListener: Send {
    /// Partitions are about to be taken away; their records stop here. Commit what was
    /// handled (through `ctx.commit`) so the next owner starts after it. With eager
    /// strategies every partition is revoked at every rebalance; with cooperative-sticky only
    /// those that move.
    fn on_partitions_revoked(
        &mut self,
        ctx: &mut RebalanceContext<'_>,
        partitions: &BTreeSet<TopicPartition>,
    ) {
        let _ = (ctx, partitions);
    }

    /// Partitions were given to this member. `ctx.committed` has the group's committed
    /// offsets; `ctx.seek` overrides where reading starts (a local store that is ahead of the
    /// group's commit, for example).
    fn on_partitions_assigned(
        &mut self,
        ctx: &mut RebalanceContext<'_>,
        partitions: &BTreeSet<TopicPartition>,
    ) {
        let _ = (ctx, partitions);
    }

    /// The member lost its partitions without a revocation (its session expired, it was
    /// fenced, or it left after `max.poll.interval.ms`): they may already be read by another
    /// member, so committing is pointless (and refused).
    fn on_partitions_lost(
        &mut self,
        ctx: &mut RebalanceContext<'_>,
        partitions: &BTreeSet<TopicPartition>,
    ) {
        self.on_partitions_revoked(ctx, partitions);
    }
}

/// What a [`RebalanceListener`] may look at and ask for.
#[derive(Debug)]
pub struct RebalanceContext<'a> {
    committed: &'a BTreeMap<TopicPartition, i64>,
    positions: BTreeMap<TopicPartition, i64>,
    seeks: Vec<(TopicPartition, i64)>,
    commits: BTreeMap<TopicPartition, i64>,
    generation: i32,
}

impl RebalanceContext<'_> {
    /// The group's committed offset of a newly assigned partition (assignment callbacks).
    pub fn committed(&self, partition: &TopicPartition) -> Option<i64> {
        self.committed.get(partition).copied()
    }

    /// The consumer's position (next offset it would return) of a partition it still holds.
    pub fn position(&self, partition: &TopicPartition) -> Option<i64> {
        self.positions.get(partition).copied()
    }

    /// Start reading `partition` at `offset` (assignment callbacks).
    pub fn seek(&mut self, partition: TopicPartition, offset: i64) {
        self.seeks.push((partition, offset));
    }

    /// Commit `offset` (the next offset to read) for `partition` before the rebalance goes
    /// on (revocation callbacks).
    pub fn commit(&mut self, partition: TopicPartition, offset: i64) {
        self.commits.insert(partition, offset);
    }

    /// The group generation the callback belongs to.
    pub fn generation(&self) -> i32 {
        self.generation
    }
}

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

struct FetchDone {
    node: i32,
    parts: Vec<(TopicPartition, i64, u64)>,
    result: Result<FetchResponse, ClientError>,
}

type FetchFuture = Pin<Box<dyn Future<Output = FetchDone> + Send>>;

/// Completion of a commit running on its own task.
type CommitDone = futures::future::Shared<futures::future::BoxFuture<'static, ()>>;

/// What a rebalance round on the join task brings back: the assignment, and what applying it
/// needs from the network (partition counts, committed offsets of the added partitions), so
/// that applying it in `poll` has nothing left to wait for.
#[derive(Debug)]
struct Round {
    joined: crate::group::Joined,
    counts: BTreeMap<String, i32>,
    committed: BTreeMap<TopicPartition, i64>,
}

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
    /// The JoinGroup + SyncGroup round under way, on its own task. It stays here until its
    /// result has been applied, so a poll cancelled while waiting for it (a `timeout` around
    /// `recv`, a `select!`) never loses a round the coordinator already completed.
    pending_join: Option<tokio::task::JoinHandle<Result<Round, ConsumerError>>>,
    metrics: ConsumerMetrics,
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
            pending_join: None,
            metrics: ConsumerMetrics::default(),
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
        Ok(self.commit_in_background(group, offsets, "async commit failed"))
    }

    /// Starts a commit on its own task, after the previous one.
    fn commit_in_background(
        &mut self,
        group: Arc<GroupShared>,
        offsets: BTreeMap<TopicPartition, i64>,
        failure: &'static str,
    ) -> tokio::sync::oneshot::Receiver<Result<(), ConsumerError>> {
        let as_member = matches!(self.mode, Mode::Subscribed(_));
        let previous = self.last_async_commit.take();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            if let Some(previous) = previous {
                previous.await;
            }
            let result = group.commit(&offsets, as_member).await;
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

    /// A partition the next record may come from has room for another fetch and none in
    /// flight (cheap: no allocation; `send_fetches` does the real work).
    fn prefetch_due(&self) -> bool {
        let threshold = self.prefetch_below();
        self.partitions.values().any(|s| {
            s.position.is_some()
                && !s.paused
                && !s.in_flight
                && s.error.is_none()
                && s.buffered_bytes < threshold
        })
    }

    fn prefetch_below(&self) -> usize {
        usize::try_from(self.config.max_partition_fetch_bytes / 2).unwrap_or(usize::MAX)
    }

    /// Cheap per-record check: a rebalance or a timer needs the slow path.
    fn attention_needed(&self) -> bool {
        if self
            .pending_join
            .as_ref()
            .is_some_and(tokio::task::JoinHandle::is_finished)
        {
            return true;
        }
        if let Some(group) = &self.group {
            let mut state = group.lock();
            state.last_poll = std::time::Instant::now();
            if state.rejoin.is_some() || state.fatal.is_some() {
                return true;
            }
        }
        let now = Instant::now();
        (self.config.enable_auto_commit
            && now >= self.last_auto_commit + self.config.auto_commit_interval)
            || (matches!(self.mode, Mode::Subscribed(_))
                && now >= self.last_metadata + self.config.metadata_max_age)
    }

    /// Runs the group and fetch machinery until some record is buffered (`true`) or
    /// `deadline` passes (`false`).
    async fn fill(&mut self, deadline: Option<Instant>) -> Result<bool, ConsumerError> {
        if self.closed {
            return Err(ConsumerError::Closed);
        }
        loop {
            self.maintain().await?;
            self.init_positions().await?;
            // Answers that already arrived.
            while let Some(Some(done)) = futures::FutureExt::now_or_never(self.in_flight.next()) {
                self.handle_fetch(done);
            }
            if self.has_deliverable() {
                return Ok(true);
            }
            self.send_fetches().await;
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Ok(false);
            }
            let mut wake_at = self.next_timer();
            if let Some(d) = deadline {
                wake_at = wake_at.min(d);
            }
            let wake = Arc::clone(&self.wake);
            tokio::select! {
                Some(done) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    self.handle_fetch(done);
                }
                () = wake.notified() => {}
                () = tokio::time::sleep_until(wake_at) => {}
            }
        }
    }

    fn next_timer(&self) -> Instant {
        let mut at = Instant::now() + Duration::from_secs(1);
        if self.config.enable_auto_commit {
            at = at.min(self.last_auto_commit + self.config.auto_commit_interval);
        }
        if matches!(self.mode, Mode::Subscribed(_)) {
            at = at.min(self.last_metadata + self.config.metadata_max_age);
        }
        if let Some(retry) = self.retry_at {
            at = at.min(retry);
        }
        at
    }

    fn has_deliverable(&self) -> bool {
        self.partitions
            .values()
            .any(|s| !s.paused && (!s.buffer.is_empty() || s.error.is_some()))
    }

    /// Takes the next record, staying on one partition for up to `max.poll.records` records
    /// before moving on, so every partition gets its turn.
    fn take_one(&mut self) -> Result<Option<ConsumerRecord>, ConsumerError> {
        let limit = self.config.max_poll_records;
        let current = self.cursor.clone().filter(|tp| {
            self.taken_from_cursor < limit
                && self
                    .partitions
                    .get(tp)
                    .is_some_and(|s| !s.paused && !s.buffer.is_empty())
        });
        let tp = match current {
            Some(tp) => tp,
            None => {
                let after = self.cursor.clone();
                let next = after
                    .as_ref()
                    .and_then(|a| {
                        self.partitions
                            .range::<TopicPartition, _>((
                                std::ops::Bound::Excluded(a),
                                std::ops::Bound::Unbounded,
                            ))
                            .find(|(_, s)| !s.paused && (!s.buffer.is_empty() || s.error.is_some()))
                            .map(|(tp, _)| tp.clone())
                    })
                    .or_else(|| {
                        self.partitions
                            .iter()
                            .find(|(_, s)| !s.paused && (!s.buffer.is_empty() || s.error.is_some()))
                            .map(|(tp, _)| tp.clone())
                    });
                let Some(tp) = next else { return Ok(None) };
                self.cursor = Some(tp.clone());
                self.taken_from_cursor = 0;
                tp
            }
        };
        let Some(state) = self.partitions.get_mut(&tp) else {
            return Ok(None);
        };
        match state.buffer.pop_front() {
            Some(record) => {
                let size = fetch::record_size(&record);
                state.buffered_bytes = state.buffered_bytes.saturating_sub(size);
                state.position = Some(record.offset + 1);
                if state.buffer.is_empty() {
                    state.position = Some(state.fetch_offset.max(record.offset + 1));
                }
                self.taken_from_cursor += 1;
                self.metrics.records += 1;
                self.metrics.bytes += (size - 64) as u64;
                Ok(Some(record))
            }
            None => match state.error.take() {
                Some(error) => Err(error),
                None => Ok(None),
            },
        }
    }

    /// Group upkeep: fatal errors, metadata refresh (added partitions), rebalances,
    /// auto-commit.
    async fn maintain(&mut self) -> Result<(), ConsumerError> {
        let Some(group) = self.group.clone() else {
            return self.refresh_stale_metadata().await;
        };
        let fatal = {
            let mut s = group.lock();
            s.last_poll = std::time::Instant::now();
            s.fatal.clone()
        };
        if let Some(fatal) = fatal {
            return Err(fatal);
        }
        if let Mode::Subscribed(topics) = &self.mode {
            if Instant::now() >= self.last_metadata + self.config.metadata_max_age {
                self.last_metadata = Instant::now();
                let topics: Vec<String> = topics.iter().cloned().collect();
                match self.cluster.refresh_metadata(Some(&topics), false).await {
                    Ok(()) => {
                        let counts = partition_counts(&self.cluster, &topics);
                        if self.generation >= 0 && counts != self.joined_counts {
                            tracing::info!(before = ?self.joined_counts, now = ?counts, "subscribed topics changed; rebalancing");
                            group.request_rejoin(Rejoin::Needed(
                                "the partitions of a subscribed topic changed".into(),
                            ));
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "metadata refresh failed"),
                }
            }
            if let Some(handle) = self.pending_join.as_mut() {
                if handle.is_finished() {
                    // Awaited in place and applied without another wait: if this poll is
                    // cancelled here, the handle is still there for the next one.
                    let result = handle.await;
                    self.pending_join = None;
                    let round = result.map_err(|e| {
                        ConsumerError::State(format!("the join task failed: {e}"))
                    })??;
                    self.finish_rebalance(&group, round);
                }
            } else {
                let reason = group.lock().rejoin.take();
                if let Some(reason) = reason {
                    self.start_rebalance(&group, reason);
                }
            }
        }
        self.refresh_stale_metadata().await?;
        if self.config.enable_auto_commit
            && Instant::now() >= self.last_auto_commit + self.config.auto_commit_interval
        {
            self.last_auto_commit = Instant::now();
            let offsets = self.positions();
            if let Err(e) = group
                .commit(&offsets, matches!(self.mode, Mode::Subscribed(_)))
                .await
            {
                tracing::warn!(error = %e, "auto-commit failed");
            }
        }
        Ok(())
    }

    async fn refresh_stale_metadata(&mut self) -> Result<(), ConsumerError> {
        if !self.metadata_stale || self.retry_at.is_some_and(|r| Instant::now() < r) {
            return Ok(());
        }
        let topics: Vec<String> = self
            .partitions
            .keys()
            .map(|(t, _)| t.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        match self.cluster.refresh_metadata(Some(&topics), false).await {
            Ok(()) => {
                self.metadata_stale = false;
                self.retry_at = None;
            }
            Err(e) => {
                tracing::debug!(error = %e, "metadata refresh failed");
                self.retry_at = Some(Instant::now() + self.config.retry_backoff);
            }
        }
        Ok(())
    }

    fn call_listener(
        &mut self,
        kind: ListenerCall,
        partitions: &BTreeSet<TopicPartition>,
        committed: &BTreeMap<TopicPartition, i64>,
    ) -> (Vec<(TopicPartition, i64)>, BTreeMap<TopicPartition, i64>) {
        let Some(mut listener) = self.listener.take() else {
            return (Vec::new(), BTreeMap::new());
        };
        let mut ctx = RebalanceContext {
            committed,
            positions: self.positions(),
            seeks: Vec::new(),
            commits: BTreeMap::new(),
            generation: self.generation,
        };
        match kind {
            ListenerCall::Revoked => listener.on_partitions_revoked(&mut ctx, partitions),
            ListenerCall::Assigned => listener.on_partitions_assigned(&mut ctx, partitions),
            ListenerCall::Lost => listener.on_partitions_lost(&mut ctx, partitions),
        }
        self.listener = Some(listener);
        (ctx.seeks, ctx.commits)
    }

    /// Gives up `partitions` cleanly: the revocation callback, then they are dropped, and the
    /// listener's commits (and auto-commit's) start on their own task; the next JoinGroup
    /// waits for them, so the next owner starts after them. Nothing here waits, so a
    /// cancelled poll cannot stop half-way through.
    fn revoke(&mut self, group: &Arc<GroupShared>, partitions: &BTreeSet<TopicPartition>) {
        if partitions.is_empty() {
            return;
        }
        let (_, mut commits) =
            self.call_listener(ListenerCall::Revoked, partitions, &BTreeMap::new());
        if self.config.enable_auto_commit {
            for (tp, offset) in self.positions() {
                if partitions.contains(&tp) {
                    commits.entry(tp).or_insert(offset);
                }
            }
        }
        self.partitions.retain(|tp, _| !partitions.contains(tp));
        if !commits.is_empty() {
            // Its outcome is logged by the task; the next JoinGroup waits for it.
            drop(self.commit_in_background(
                Arc::clone(group),
                commits,
                "commit on revocation failed; those records will be read again",
            ));
        }
        tracing::info!(group = %group.group_id, ?partitions, "partitions revoked");
    }

    /// Before JoinGroup: lost partitions are dropped (the listener is told), and an eager
    /// member revokes everything; then the rebalance round starts on its own task: the
    /// revocation commits, JoinGroup + SyncGroup, and what applying the result needs.
    fn start_rebalance(&mut self, group: &Arc<GroupShared>, reason: Rejoin) {
        let Mode::Subscribed(topics) = self.mode.clone() else {
            return;
        };
        let owned: BTreeSet<TopicPartition> = self.partitions.keys().cloned().collect();
        let why = match reason {
            Rejoin::Lost(why) => {
                if !owned.is_empty() {
                    tracing::warn!(group = %group.group_id, %why, ?owned, "partitions lost");
                    self.call_listener(ListenerCall::Lost, &owned, &BTreeMap::new());
                    self.partitions.clear();
                }
                why
            }
            Rejoin::Needed(why) => {
                if !self.config.cooperative() {
                    self.revoke(group, &owned);
                }
                why
            }
        };
        let owned: BTreeSet<TopicPartition> = self.partitions.keys().cloned().collect();
        let previous = self.previous.clone();
        let commits = self.last_async_commit.clone();
        let task_group = Arc::clone(group);
        self.pending_join = Some(tokio::spawn(async move {
            if let Some(commits) = commits {
                commits.await;
            }
            let result = rebalance_round(&task_group, &topics, &owned, &previous, &why).await;
            task_group.wake.notify_one();
            result
        }));
    }

    /// After SyncGroup: cooperative revocations (and the follow-up rebalance), then the new
    /// partitions with their committed offsets, then the assignment callback. Nothing here
    /// waits (the round brought what it needs), so it happens whole or not at all.
    fn finish_rebalance(&mut self, group: &Arc<GroupShared>, round: Round) {
        if !matches!(self.mode, Mode::Subscribed(_)) {
            return;
        }
        let Round {
            joined,
            counts,
            committed,
        } = round;
        let owned: BTreeSet<TopicPartition> = self.partitions.keys().cloned().collect();
        self.metrics.rebalances += 1;
        self.generation = joined.generation;
        self.protocol = Some(joined.strategy);
        self.previous.clone_from(&joined.assigned);
        self.joined_counts = counts;
        self.last_metadata = Instant::now();

        let revoked: BTreeSet<TopicPartition> =
            owned.difference(&joined.assigned).cloned().collect();
        if !revoked.is_empty() {
            // Cooperative: give these up, then rejoin so the leader can hand them over.
            self.revoke(group, &revoked);
            group.request_rejoin(Rejoin::Needed(
                "partitions revoked; follow-up rebalance".into(),
            ));
        }
        let added: BTreeSet<TopicPartition> = joined.assigned.difference(&owned).cloned().collect();
        tracing::info!(
            group = %group.group_id,
            generation = joined.generation,
            protocol = joined.strategy.name(),
            assigned = ?joined.assigned,
            ?added,
            ?revoked,
            "assignment received"
        );
        if added.is_empty() {
            return;
        }
        for tp in &added {
            let topic = self.topic_name(&tp.0);
            let mut state = PartitionState::new(topic);
            if let Some(&offset) = committed.get(tp) {
                state.set_position(offset);
            }
            self.partitions.insert(tp.clone(), state);
        }
        let (seeks, _) = self.call_listener(ListenerCall::Assigned, &added, &committed);
        for (tp, offset) in seeks {
            if let Some(state) = self.partitions.get_mut(&tp) {
                state.set_position(offset);
            }
        }
    }

    /// Positions for partitions that have none: the committed offset, else
    /// `auto.offset.reset` (or the seek_to_* asked for).
    async fn init_positions(&mut self) -> Result<(), ConsumerError> {
        if self.retry_at.is_some_and(|r| Instant::now() < r) {
            return Ok(());
        }
        let missing: BTreeSet<TopicPartition> = self
            .partitions
            .iter()
            .filter(|(_, s)| s.position.is_none())
            .map(|(tp, _)| tp.clone())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let ask_committed: BTreeSet<TopicPartition> = missing
            .iter()
            .filter(|tp| {
                self.partitions
                    .get(*tp)
                    .is_some_and(|s| s.reset_to.is_none())
            })
            .cloned()
            .collect();
        let committed = match &self.group {
            Some(group) if !ask_committed.is_empty() && self.mode != Mode::None => {
                group.committed(&ask_committed).await?
            }
            _ => BTreeMap::new(),
        };
        let mut list: BTreeMap<TopicPartition, i64> = BTreeMap::new();
        for tp in &missing {
            let Some(state) = self.partitions.get_mut(tp) else {
                continue;
            };
            if let Some(&offset) = committed.get(tp) {
                state.set_position(offset);
                continue;
            }
            let to = match state.reset_to {
                Some(to) => to,
                None => match self.config.auto_offset_reset {
                    AutoOffsetReset::Earliest => -2,
                    AutoOffsetReset::Latest => -1,
                    AutoOffsetReset::None => return Err(ConsumerError::NoOffset(tp.clone())),
                },
            };
            list.insert(tp.clone(), to);
        }
        if list.is_empty() {
            return Ok(());
        }
        let found = self.list_offsets(&list).await;
        for (tp, offset) in found {
            if let Some(state) = self.partitions.get_mut(&tp) {
                tracing::debug!(?tp, offset, "position reset");
                state.set_position(offset);
            }
        }
        if self.partitions.values().any(|s| s.position.is_none()) {
            self.retry_at = Some(Instant::now() + self.config.retry_backoff);
        }
        Ok(())
    }

    /// ListOffsets by timestamp (-2 earliest, -1 latest), per leader; partitions whose
    /// answer failed are left out (and the metadata marked stale).
    async fn list_offsets(
        &mut self,
        wanted: &BTreeMap<TopicPartition, i64>,
    ) -> BTreeMap<TopicPartition, i64> {
        let mut by_node: BTreeMap<i32, Vec<(&TopicPartition, i64)>> = BTreeMap::new();
        for (tp, ts) in wanted {
            match self.cluster.leader(&tp.0, tp.1) {
                Some(node) => by_node.entry(node).or_default().push((tp, *ts)),
                None => self.metadata_stale = true,
            }
        }
        let mut out = BTreeMap::new();
        for (node, parts) in by_node {
            let connection = match self.cluster.node(node).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, node, "ListOffsets: no connection");
                    self.metadata_stale = true;
                    continue;
                }
            };
            let mut topics: BTreeMap<&str, Vec<ListOffsetsPartition>> = BTreeMap::new();
            for (tp, ts) in &parts {
                topics.entry(tp.0.as_str()).or_default().push(
                    ListOffsetsPartition::default()
                        .with_partition_index(tp.1)
                        .with_current_leader_epoch(-1)
                        .with_timestamp(*ts),
                );
            }
            let request = ListOffsetsRequest::default()
                .with_replica_id(BrokerId(-1))
                .with_isolation_level(self.config.isolation_level.wire())
                .with_topics(
                    topics
                        .into_iter()
                        .map(|(t, ps)| {
                            ListOffsetsTopic::default()
                                .with_name(TopicName(StrBytes::from_string(t.to_string())))
                                .with_partitions(ps)
                        })
                        .collect(),
                );
            match connection.send(&request, (1, 7)).await {
                Ok(response) => {
                    for topic in response.topics {
                        for p in topic.partitions {
                            let tp = (topic.name.0.to_string(), p.partition_index);
                            match check_code(p.error_code) {
                                Ok(()) => {
                                    out.insert(tp, p.offset);
                                }
                                Err(code) => {
                                    tracing::debug!(?tp, ?code, "ListOffsets refused");
                                    self.metadata_stale |= needs_metadata_refresh(code);
                                }
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "ListOffsets failed");
                    self.metadata_stale = true;
                }
            }
        }
        out
    }

    /// One Fetch per broker that has none in flight, for every partition that may take more.
    async fn send_fetches(&mut self) {
        let threshold = self.prefetch_below();
        let mut by_node: BTreeMap<i32, Vec<(TopicPartition, i64, u64)>> = BTreeMap::new();
        // Nodes with a partition left out only because its buffer is full: their fetch must
        // not wait for data (fetch.max.wait.ms), or it would hold back that partition's next
        // fetch once the application drains it (one fetch per broker at a time).
        let mut hurried: HashSet<i32> = HashSet::new();
        for (tp, s) in &self.partitions {
            if s.position.is_some()
                && !s.paused
                && !s.in_flight
                && s.error.is_none()
                && s.buffered_bytes >= threshold
            {
                if let Some(node) = self.cluster.leader(&tp.0, tp.1) {
                    hurried.insert(node);
                }
            }
            if s.position.is_none()
                || s.paused
                || s.in_flight
                || s.error.is_some()
                || s.buffered_bytes >= threshold
            {
                continue;
            }
            match self.cluster.leader(&tp.0, tp.1) {
                Some(node) if !self.fetching_nodes.contains(&node) => {
                    by_node
                        .entry(node)
                        .or_default()
                        .push((tp.clone(), s.fetch_offset, s.epoch));
                }
                Some(_) => {}
                None => self.metadata_stale = true,
            }
        }
        for (node, mut parts) in by_node {
            // Rotate, so a partition whose first batch exceeds the partition limit gets to be
            // first (Kafka returns one oversized batch only for the first partition).
            let turn = usize::try_from(self.metrics.fetches).unwrap_or(0) % parts.len();
            parts.rotate_left(turn);
            let connection = match self.cluster.node(node).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, node, "fetch: no connection");
                    self.metadata_stale = true;
                    self.retry_at = Some(Instant::now() + self.config.retry_backoff);
                    continue;
                }
            };
            let mut topics: Vec<FetchTopic> = Vec::new();
            for (tp, offset, _) in &parts {
                let partition = FetchPartition::default()
                    .with_partition(tp.1)
                    .with_current_leader_epoch(-1)
                    .with_fetch_offset(*offset)
                    .with_last_fetched_epoch(-1)
                    .with_log_start_offset(-1)
                    .with_partition_max_bytes(self.config.max_partition_fetch_bytes);
                match topics.last_mut() {
                    Some(last) if last.topic.0.as_str() == tp.0 => last.partitions.push(partition),
                    _ => topics.push(
                        FetchTopic::default()
                            .with_topic(TopicName(StrBytes::from_string(tp.0.clone())))
                            .with_partitions(vec![partition]),
                    ),
                }
            }
            let max_wait = if hurried.contains(&node) {
                0
            } else {
                millis(self.config.fetch_max_wait)
            };
            let request = FetchRequest::default()
                .with_replica_id(BrokerId(-1))
                .with_max_wait_ms(max_wait)
                .with_min_bytes(self.config.fetch_min_bytes)
                .with_max_bytes(self.config.fetch_max_bytes)
                .with_isolation_level(self.config.isolation_level.wire())
                .with_session_id(0)
                .with_session_epoch(-1)
                .with_topics(topics);
            let version = match connection.version(ApiKey::Fetch, (4, 12)) {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "fetch: no common version");
                    self.retry_at = Some(Instant::now() + self.config.retry_backoff);
                    continue;
                }
            };
            let in_flight = match connection.submit(&request, version).await {
                Ok(f) => f,
                Err(e) => {
                    tracing::debug!(error = %e, "fetch not sent");
                    self.metadata_stale = true;
                    continue;
                }
            };
            for (tp, _, _) in &parts {
                if let Some(s) = self.partitions.get_mut(tp) {
                    s.in_flight = true;
                }
            }
            self.fetching_nodes.insert(node);
            self.in_flight.push(Box::pin(async move {
                FetchDone {
                    node,
                    parts,
                    result: in_flight.response().await,
                }
            }));
        }
    }

    fn handle_fetch(&mut self, done: FetchDone) {
        self.fetching_nodes.remove(&done.node);
        self.metrics.fetches += 1;
        for (tp, _, _) in &done.parts {
            if let Some(s) = self.partitions.get_mut(tp) {
                s.in_flight = false;
            }
        }
        let response = match done.result {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, node = done.node, "fetch failed");
                self.metadata_stale = true;
                self.retry_at = Some(Instant::now() + self.config.retry_backoff);
                return;
            }
        };
        if let Err(code) = check_code(response.error_code) {
            tracing::warn!(?code, "fetch refused");
            self.retry_at = Some(Instant::now() + self.config.retry_backoff);
            return;
        }
        let requested: HashMap<&TopicPartition, (i64, u64)> = done
            .parts
            .iter()
            .map(|(tp, offset, epoch)| (tp, (*offset, *epoch)))
            .collect();
        let read_committed =
            self.config.isolation_level == crate::config::IsolationLevel::ReadCommitted;
        let reset_policy = self.config.auto_offset_reset;
        for topic in response.responses {
            for p in topic.partitions {
                let tp = (topic.topic.0.to_string(), p.partition_index);
                let Some(&(offset, epoch)) = requested.get(&tp) else {
                    continue;
                };
                let Some(state) = self.partitions.get_mut(&tp) else {
                    continue; // revoked meanwhile
                };
                if state.epoch != epoch || state.fetch_offset != offset {
                    continue; // a seek meanwhile
                }
                match check_code(p.error_code) {
                    Ok(()) => {}
                    Err(ResponseError::OffsetOutOfRange) => {
                        tracing::info!(
                            ?tp,
                            offset,
                            log_start = p.log_start_offset,
                            "offset out of range"
                        );
                        match reset_policy {
                            AutoOffsetReset::Earliest => state.needs_reset(-2),
                            AutoOffsetReset::Latest => state.needs_reset(-1),
                            AutoOffsetReset::None => {
                                state.error = Some(ConsumerError::OffsetOutOfRange {
                                    partition: tp.clone(),
                                    offset,
                                });
                            }
                        }
                        continue;
                    }
                    Err(code) => {
                        tracing::debug!(?tp, ?code, "fetch: partition error");
                        self.metadata_stale |= needs_metadata_refresh(code);
                        self.retry_at = Some(Instant::now() + self.config.retry_backoff);
                        continue;
                    }
                }
                let Some(data) = p.records.filter(|r| !r.is_empty()) else {
                    continue;
                };
                let aborted: Vec<AbortedTransaction> = p
                    .aborted_transactions
                    .unwrap_or_default()
                    .iter()
                    .map(|a| AbortedTransaction {
                        producer_id: a.producer_id.0,
                        first_offset: a.first_offset,
                    })
                    .collect();
                let (decoded, error) = fetch::decode(
                    &state.topic,
                    tp.1,
                    offset,
                    data,
                    read_committed.then_some(aborted.as_slice()),
                );
                state.fetch_offset = decoded.next_offset;
                state.buffered_bytes += decoded.bytes;
                state.buffer.extend(decoded.records);
                if state.buffer.is_empty() {
                    // Only control or aborted batches: the position moves past them.
                    state.position = Some(state.fetch_offset);
                }
                if let Some(error) = error {
                    tracing::error!(?tp, offset = error.offset, reason = %error.reason, "corrupt batch");
                    state.error = Some(ConsumerError::CorruptRecord {
                        partition: tp.clone(),
                        offset: error.offset,
                        reason: error.reason,
                    });
                }
            }
        }
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

/// One rebalance round on the join task: JoinGroup + SyncGroup, then the partition counts
/// of the subscribed topics and the committed offsets of the partitions it adds (those that
/// cannot be read now are read again when their position is needed).
async fn rebalance_round(
    group: &GroupShared,
    topics: &BTreeSet<String>,
    owned: &BTreeSet<TopicPartition>,
    previous: &BTreeSet<TopicPartition>,
    why: &str,
) -> Result<Round, ConsumerError> {
    let joined = group.join(topics, owned, previous, why).await?;
    let topic_list: Vec<String> = topics.iter().cloned().collect();
    if let Err(e) = group
        .cluster
        .refresh_metadata(Some(&topic_list), false)
        .await
    {
        tracing::debug!(error = %e, "metadata refresh after join failed");
    }
    let counts = partition_counts(&group.cluster, &topic_list);
    let added: BTreeSet<TopicPartition> = joined.assigned.difference(owned).cloned().collect();
    let committed = match group.committed(&added).await {
        Ok(committed) => committed,
        Err(e) => {
            tracing::warn!(error = %e, "committed offsets of the new partitions not read; asking again before fetching");
            BTreeMap::new()
        }
    };
    Ok(Round {
        joined,
        counts,
        committed,
    })
}

#[derive(Debug, Clone, Copy)]
enum ListenerCall {
    Revoked,
    Assigned,
    Lost,
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
