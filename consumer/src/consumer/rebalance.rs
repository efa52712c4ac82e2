//! Rebalances on the application's side: the listener and its context, group upkeep in
//! `poll` (fatal errors, metadata changes, rejoin requests), and the round itself, which runs
//! on its own task and is applied without waiting, so a cancelled poll never loses one.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tokio::time::Instant;

use crate::assignor::TopicPartition;

/// Offsets a revocation callback will know later: what `RebalanceContext::commit_when` holds.
pub(super) struct DeferredCommit(
    pub(super) futures::future::BoxFuture<'static, BTreeMap<TopicPartition, i64>>,
);

impl std::fmt::Debug for DeferredCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeferredCommit")
    }
}
use crate::group::{GroupShared, Rejoin, partition_counts};
use crate::record::ConsumerError;

use super::*;

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
    deferred: Vec<DeferredCommit>,
    generation: i32,
}

impl<'a> RebalanceContext<'a> {
    /// A context with these committed offsets and nothing else, for listener tests.
    #[cfg(test)]
    pub(crate) fn for_tests(committed: &'a BTreeMap<TopicPartition, i64>) -> Self {
        Self {
            committed,
            positions: BTreeMap::new(),
            seeks: Vec::new(),
            commits: BTreeMap::new(),
            deferred: Vec::new(),
            generation: 1,
        }
    }

    /// The commits asked for so far (listener tests).
    #[cfg(test)]
    pub(crate) fn commits_for_tests(&self) -> &BTreeMap<TopicPartition, i64> {
        &self.commits
    }

    /// The deferred commits asked for so far (listener tests).
    #[cfg(test)]
    pub(crate) fn take_deferred_for_tests(
        &mut self,
    ) -> Vec<futures::future::BoxFuture<'static, BTreeMap<TopicPartition, i64>>> {
        std::mem::take(&mut self.deferred)
            .into_iter()
            .map(|d| d.0)
            .collect()
    }
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

    /// Revocation callbacks: hold the rebalance until `settled` resolves, then commit the
    /// offsets it yields. For work still in flight when its partitions are revoked (handlers
    /// on other tasks): the member's next JoinGroup waits for it, so the partitions' next
    /// owner starts after what it settled, as a Java application that blocks in
    /// `onPartitionsRevoked` until its handlers finish. Waited for at most half of
    /// `max.poll.interval.ms` (the coordinator waits that long for the member to rejoin);
    /// after that the rebalance goes on without those offsets. Ignored outside revocations.
    pub fn commit_when(
        &mut self,
        settled: impl std::future::Future<Output = BTreeMap<TopicPartition, i64>> + Send + 'static,
    ) {
        self.deferred.push(DeferredCommit(Box::pin(settled)));
    }

    /// The group generation the callback belongs to.
    pub fn generation(&self) -> i32 {
        self.generation
    }
}

/// What a rebalance round on the join task brings back: the assignment, and what applying it
/// needs from the network (partition counts, committed offsets of the added partitions), so
/// that applying it in `poll` has nothing left to wait for.
#[derive(Debug)]
pub(super) struct Round {
    joined: crate::group::Joined,
    counts: BTreeMap<String, i32>,
    committed: BTreeMap<TopicPartition, i64>,
    /// The subscription this round joined with.
    topics: BTreeSet<String>,
}

impl Consumer {
    /// Group upkeep: fatal errors, metadata refresh (added partitions), rebalances,
    /// auto-commit.
    pub(super) async fn maintain(&mut self) -> Result<(), ConsumerError> {
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

    pub(super) async fn refresh_stale_metadata(&mut self) -> Result<(), ConsumerError> {
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

    pub(super) fn call_listener(
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
            deferred: Vec::new(),
            generation: self.generation,
        };
        match kind {
            ListenerCall::Revoked => listener.on_partitions_revoked(&mut ctx, partitions),
            ListenerCall::Assigned => listener.on_partitions_assigned(&mut ctx, partitions),
            ListenerCall::Lost => listener.on_partitions_lost(&mut ctx, partitions),
        }
        self.listener = Some(listener);
        if matches!(kind, ListenerCall::Revoked) {
            self.deferred_commits.extend(ctx.deferred);
        }
        (ctx.seeks, ctx.commits)
    }

    /// Gives up `partitions` cleanly: the revocation callback, then they are dropped, and the
    /// listener's commits (and auto-commit's) start on their own task; the next JoinGroup
    /// waits for them, so the next owner starts after them. Nothing here waits, so a
    /// cancelled poll cannot stop half-way through.
    pub(super) fn revoke(
        &mut self,
        group: &Arc<GroupShared>,
        partitions: &BTreeSet<TopicPartition>,
    ) {
        if partitions.is_empty() {
            return;
        }
        let (_, mut commits) =
            self.call_listener(ListenerCall::Revoked, partitions, &BTreeMap::new());
        let deferred = std::mem::take(&mut self.deferred_commits);
        if self.config.enable_auto_commit {
            for (tp, offset) in self.positions() {
                if partitions.contains(&tp) {
                    commits.entry(tp).or_insert(offset);
                }
            }
        }
        self.partitions.retain(|tp, _| !partitions.contains(tp));
        if !commits.is_empty() || !deferred.is_empty() {
            // Its outcome is logged by the task; the next JoinGroup waits for it.
            drop(self.commit_in_background(
                Arc::clone(group),
                commits,
                deferred,
                "commit on revocation failed; those records will be read again",
            ));
        }
        tracing::info!(group = %group.group_id, ?partitions, "partitions revoked");
    }

    /// Before JoinGroup: lost partitions are dropped (the listener is told), and an eager
    /// member revokes everything; then the rebalance round starts on its own task: the
    /// revocation commits, JoinGroup + SyncGroup, and what applying the result needs.
    pub(super) fn start_rebalance(&mut self, group: &Arc<GroupShared>, reason: Rejoin) {
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
    pub(super) fn finish_rebalance(&mut self, group: &Arc<GroupShared>, round: Round) {
        if !matches!(self.mode, Mode::Subscribed(_)) {
            return;
        }
        let Round {
            joined,
            counts,
            committed,
            topics,
        } = round;
        if matches!(&self.mode, Mode::Subscribed(now) if *now != topics) {
            // `subscribe` changed the topics while this round was joining with the old ones
            // (before the first join completed, no rejoin is asked for): one more round.
            group.request_rejoin(Rejoin::Needed(
                "the subscription changed during the rebalance".into(),
            ));
        }
        let owned: BTreeSet<TopicPartition> = self.partitions.keys().cloned().collect();
        self.metrics.rebalances += 1;
        self.export.rebalances.increment(1);
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
        topics: topics.clone(),
    })
}

#[derive(Debug, Clone, Copy)]
pub(super) enum ListenerCall {
    Revoked,
    Assigned,
    Lost,
}
