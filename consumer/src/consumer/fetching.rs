//! The fetch pipeline: positions (committed offsets, `auto.offset.reset`, ListOffsets), one
//! Fetch in flight per broker for every partition with room in its buffer, answers decoded
//! into per-partition buffers, and records handed out a partition at a time.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::StreamExt;
use kafka_protocol::ResponseError;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::{
    ApiKey, BrokerId, FetchRequest, FetchResponse, ListOffsetsRequest, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use semel_client::{ClientError, check_code, needs_metadata_refresh};
use tokio::time::Instant;

use crate::assignor::TopicPartition;
use crate::config::AutoOffsetReset;
use crate::fetch::{self, AbortedTransaction};
use crate::group::millis;
use crate::record::{ConsumerError, ConsumerRecord};

use super::*;

pub(super) struct FetchDone {
    node: i32,
    /// When the request was sent (for the fetch latency).
    sent: Instant,
    parts: Vec<(TopicPartition, i64, u64)>,
    result: Result<FetchResponse, ClientError>,
}

pub(super) type FetchFuture = Pin<Box<dyn Future<Output = FetchDone> + Send>>;

impl Consumer {
    /// A partition the next record may come from has room for another fetch and none in
    /// flight (cheap: no allocation; `send_fetches` does the real work).
    pub(super) fn prefetch_due(&self) -> bool {
        let threshold = self.prefetch_below();
        self.partitions.values().any(|s| {
            s.position.is_some()
                && !s.paused
                && !s.in_flight
                && s.error.is_none()
                && s.buffered_bytes < threshold
        })
    }

    /// A partition is fetched again while it holds less than this many buffered bytes: half
    /// of `max.partition.fetch.bytes`, and at least 1, so an empty partition is always
    /// fetched (with a limit of 1 byte, half was 0 and nothing was ever fetched).
    pub(super) fn prefetch_below(&self) -> usize {
        usize::try_from(self.config.max_partition_fetch_bytes / 2)
            .unwrap_or(usize::MAX)
            .max(1)
    }

    /// Cheap per-record check: a rebalance or a timer needs the slow path.
    pub(super) fn attention_needed(&self) -> bool {
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
    pub(super) async fn fill(&mut self, deadline: Option<Instant>) -> Result<bool, ConsumerError> {
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

    pub(super) fn next_timer(&self) -> Instant {
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

    pub(super) fn has_deliverable(&self) -> bool {
        self.partitions
            .values()
            .any(|s| !s.paused && (!s.buffer.is_empty() || s.error.is_some()))
    }

    /// Takes the next record, staying on one partition for up to `max.poll.records` records
    /// before moving on, so every partition gets its turn.
    pub(super) fn take_one(&mut self) -> Result<Option<ConsumerRecord>, ConsumerError> {
        self.take_next(true)
    }

    /// The next buffered record, never a partition's error (it stays for the next call).
    pub(crate) fn take_buffered(&mut self) -> Option<ConsumerRecord> {
        self.take_next(false).ok().flatten()
    }

    fn take_next(&mut self, errors: bool) -> Result<Option<ConsumerRecord>, ConsumerError> {
        let limit = self.config.max_poll_records;
        // The partition taken from last time, while it has records and its share is not
        // used up; else the next one that has some (round robin). No clone of its name per
        // record: this runs once per record.
        let stay = self.cursor.as_ref().is_some_and(|tp| {
            self.taken_from_cursor < limit
                && self
                    .partitions
                    .get(tp)
                    .is_some_and(|s| !s.paused && !s.buffer.is_empty())
        });
        if !stay {
            let next = self
                .cursor
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
            self.cursor = Some(tp);
            self.taken_from_cursor = 0;
        }
        let Some(state) = self
            .cursor
            .as_ref()
            .and_then(|tp| self.partitions.get_mut(tp))
        else {
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
                self.export.records.increment(1);
                self.export.bytes.increment((size - 64) as u64);
                Ok(Some(record))
            }
            None if errors => match state.error.take() {
                Some(error) => Err(error),
                None => Ok(None),
            },
            None => Ok(None),
        }
    }

    /// Positions for partitions that have none: the committed offset, else
    /// `auto.offset.reset` (or the seek_to_* asked for).
    pub(super) async fn init_positions(&mut self) -> Result<(), ConsumerError> {
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
    pub(super) async fn list_offsets(
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
    pub(super) async fn send_fetches(&mut self) {
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
                && let Some(node) = self.cluster.leader(&tp.0, tp.1)
            {
                hurried.insert(node);
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
            let sent = Instant::now();
            self.in_flight.push(Box::pin(async move {
                FetchDone {
                    node,
                    sent,
                    parts,
                    result: in_flight.response().await,
                }
            }));
        }
    }

    pub(super) fn handle_fetch(&mut self, done: FetchDone) {
        self.fetching_nodes.remove(&done.node);
        self.metrics.fetches += 1;
        self.export.fetched(done.sent.elapsed());
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
                    self.export.lag(&tp.0, tp.1, p.high_watermark - offset);
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
                self.export
                    .lag(&tp.0, tp.1, p.high_watermark - decoded.next_offset);
                state.buffered_bytes += decoded.bytes;
                if state.buffer.is_empty() {
                    state.buffer = decoded.records;
                } else {
                    state.buffer.extend(decoded.records);
                }
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
}
