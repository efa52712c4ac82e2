//! The group coordinator: consumer groups (the classic protocol) and committed offsets. This
//! broker coordinates every group.
//!
//! [`state`] is the pure state machine of one group; this module keeps the groups, parks
//! JoinGroup and SyncGroup requests until the state machine answers them, ticks the clock
//! for session and rebalance timeouts, and stores offsets through [`offsets`].
//!
//! Lock order: the groups lock is never held across an await; offsets are written after the
//! group check, outside it.

pub(crate) mod offsets;
pub(crate) mod state;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kafka_protocol::ResponseError;
use tokio::sync::oneshot;

use crate::clock::Clock;
use crate::log::LogError;
use offsets::{CommitError, Committed, GroupOffsets, OffsetStore};
use state::{
    Completion, Group, GroupLimits, GroupRecord, GroupState, JoinParams, JoinResult, MemberView,
    SyncParams, SyncResult,
};

/// Group coordinator settings (Kafka's names).
#[derive(Debug, Clone, Copy)]
pub struct GroupConfig {
    /// `group.min.session.timeout.ms`.
    pub min_session_timeout: Duration,
    /// `group.max.session.timeout.ms`.
    pub max_session_timeout: Duration,
    /// `group.initial.rebalance.delay.ms`.
    pub initial_rebalance_delay: Duration,
    /// `group.max.size`.
    pub max_size: usize,
    /// `offsets.retention.minutes`: offsets of a group empty this long are deleted.
    pub offsets_retention: Duration,
    /// `offset.metadata.max.bytes`.
    pub offset_metadata_max_bytes: usize,
}

impl Default for GroupConfig {
    fn default() -> Self {
        Self {
            min_session_timeout: Duration::from_millis(6_000),
            max_session_timeout: Duration::from_millis(1_800_000),
            initial_rebalance_delay: Duration::from_millis(3_000),
            max_size: usize::MAX,
            offsets_retention: Duration::from_secs(7 * 24 * 3600),
            offset_metadata_max_bytes: 4096,
        }
    }
}

fn millis_i32(d: Duration) -> i32 {
    i32::try_from(d.as_millis()).unwrap_or(i32::MAX)
}

fn millis_i64(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[derive(Debug)]
struct Slot {
    group: Group,
    joins: HashMap<String, oneshot::Sender<JoinResult>>,
    syncs: HashMap<String, oneshot::Sender<SyncResult>>,
    /// The membership record last written to the offsets log.
    recorded: Option<GroupRecord>,
}

impl Slot {
    fn deliver(&mut self, completions: Vec<Completion>) {
        for completion in completions {
            match completion {
                Completion::Join(member, result) => {
                    if let Some(waiter) = self.joins.remove(&member) {
                        let _ = waiter.send(result);
                    }
                }
                Completion::Sync(member, result) => {
                    if let Some(waiter) = self.syncs.remove(&member) {
                        let _ = waiter.send(result);
                    }
                }
            }
        }
    }
}

/// What DescribeGroups shows of one group.
#[derive(Debug, Clone)]
pub(crate) struct GroupView {
    pub(crate) state: GroupState,
    pub(crate) protocol_type: String,
    pub(crate) protocol_name: String,
    pub(crate) members: Vec<MemberView>,
}

/// A JoinGroup or SyncGroup answer: now, or once the rest of the group is there.
#[derive(Debug)]
pub(crate) enum Pending<T> {
    Now(T),
    Later(oneshot::Receiver<T>),
}

/// Every group on this broker.
#[derive(Debug)]
pub(crate) struct GroupCoordinator {
    config: GroupConfig,
    limits: GroupLimits,
    groups: Mutex<HashMap<String, Slot>>,
    offsets: OffsetStore,
    clock: Arc<dyn Clock>,
}

impl GroupCoordinator {
    /// Checkpoints the offsets log's recovery point (the flush task, every minute).
    ///
    /// # Errors
    /// `Io` when the checkpoint cannot be written.
    pub(crate) fn checkpoint_recovery_point(&self) -> Result<(), LogError> {
        self.offsets.checkpoint_recovery_point()
    }

    pub(crate) fn open(
        data_dir: &Path,
        config: GroupConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, LogError> {
        let now = clock.now_ms();
        let offsets = OffsetStore::open(data_dir, now)?;
        let limits = GroupLimits {
            min_session_timeout_ms: millis_i32(config.min_session_timeout),
            max_session_timeout_ms: millis_i32(config.max_session_timeout),
            initial_rebalance_delay_ms: millis_i32(config.initial_rebalance_delay),
            max_size: config.max_size,
        };
        // Groups with members come back as they were (Kafka reloads its group metadata the
        // same way): their members go on heartbeating and committing with the generation they
        // have, instead of all being told UNKNOWN_MEMBER_ID and rejoining.
        let mut groups = HashMap::new();
        for (id, record) in offsets.take_group_records() {
            if record.members.is_empty() {
                continue;
            }
            tracing::info!(group = %id, generation = record.generation_id, members = record.members.len(), "group restored");
            groups.insert(
                id.clone(),
                Slot {
                    group: Group::restore(&id, record.clone(), limits, now),
                    joins: HashMap::new(),
                    syncs: HashMap::new(),
                    recorded: Some(record),
                },
            );
        }
        Ok(Self {
            config,
            limits,
            groups: Mutex::new(groups),
            offsets,
            clock,
        })
    }

    fn groups(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        // Group calls update their state only through complete steps; still usable.
        self.groups
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn slot<'a>(
        &self,
        groups: &'a mut HashMap<String, Slot>,
        group_id: &str,
        now_ms: i64,
    ) -> &'a mut Slot {
        let slot = groups.entry(group_id.to_string()).or_insert_with(|| Slot {
            group: Group::new(group_id, self.limits, now_ms),
            joins: HashMap::new(),
            syncs: HashMap::new(),
            recorded: None,
        });
        if slot.group.state() == GroupState::Dead {
            // A deleted group's id is free again.
            slot.group = Group::new(group_id, self.limits, now_ms);
        }
        slot
    }

    pub(crate) fn offset_metadata_max_bytes(&self) -> usize {
        self.config.offset_metadata_max_bytes
    }

    pub(crate) fn join(&self, group_id: &str, params: JoinParams) -> Pending<JoinResult> {
        let now = self.clock.now_ms();
        let fresh = uuid::Uuid::new_v4().to_string();
        let mut groups = self.groups();
        let slot = self.slot(&mut groups, group_id, now);
        let (sender, receiver) = oneshot::channel();
        let mut out = Vec::new();
        // A member waiting in an earlier JoinGroup is answered by this one's outcome instead.
        let waiter_id = if params.member_id.is_empty() {
            None
        } else {
            Some(params.member_id.clone())
        };
        let answer = slot.group.join(params, &fresh, now, &mut out);
        self.record(group_id, slot, now);
        match answer {
            Some(result) => {
                slot.deliver(out);
                Pending::Now(result)
            }
            None => {
                // The member id this request waits under: known, or just handed out (the
                // state machine names it in its completion).
                let id = waiter_id.unwrap_or_else(|| new_member_id(&out, &slot.group, &fresh));
                slot.joins.insert(id, sender);
                slot.deliver(out);
                Pending::Later(receiver)
            }
        }
    }

    pub(crate) fn sync(&self, group_id: &str, params: SyncParams) -> Pending<SyncResult> {
        let now = self.clock.now_ms();
        let mut groups = self.groups();
        let Some(slot) = groups.get_mut(group_id) else {
            return Pending::Now(SyncResult {
                error: Some(ResponseError::UnknownMemberId),
                protocol_type: None,
                protocol_name: None,
                assignment: bytes::Bytes::new(),
            });
        };
        let member = params.member_id.clone();
        let mut out = Vec::new();
        let answer = slot.group.sync(params, now, &mut out);
        self.record(group_id, slot, now);
        match answer {
            Some(result) => {
                slot.deliver(out);
                Pending::Now(result)
            }
            None => {
                let (sender, receiver) = oneshot::channel();
                slot.syncs.insert(member, sender);
                slot.deliver(out);
                Pending::Later(receiver)
            }
        }
    }

    pub(crate) fn heartbeat(
        &self,
        group_id: &str,
        member_id: &str,
        instance_id: Option<&str>,
        generation_id: i32,
    ) -> Result<(), ResponseError> {
        let now = self.clock.now_ms();
        let mut groups = self.groups();
        match groups.get_mut(group_id) {
            Some(slot) => slot
                .group
                .heartbeat(member_id, instance_id, generation_id, now),
            None => Err(ResponseError::UnknownMemberId),
        }
    }

    pub(crate) fn leave(
        &self,
        group_id: &str,
        members: &[(String, Option<String>)],
    ) -> Vec<Result<(), ResponseError>> {
        let now = self.clock.now_ms();
        let mut groups = self.groups();
        let Some(slot) = groups.get_mut(group_id) else {
            return vec![Err(ResponseError::UnknownMemberId); members.len()];
        };
        let mut out = Vec::new();
        let codes = members
            .iter()
            .map(|(member, instance)| slot.group.leave(member, instance.as_deref(), now, &mut out))
            .collect();
        self.record(group_id, slot, now);
        slot.deliver(out);
        codes
    }

    /// Expires sessions, ends overdue join and sync phases, and deletes the offsets of groups
    /// that have been empty longer than `offsets.retention.minutes`.
    pub(crate) async fn tick(&self) {
        let now = self.clock.now_ms();
        let retention = millis_i64(self.config.offsets_retention);
        let mut expired: Vec<(String, Vec<(String, i32)>)> = Vec::new();
        {
            let mut groups = self.groups();
            for (id, slot) in groups.iter_mut() {
                let mut out = Vec::new();
                let before = (slot.group.state(), slot.group.member_count());
                slot.group.tick(now, &mut out);
                if (slot.group.state(), slot.group.member_count()) != before {
                    self.record(id, slot, now);
                }
                slot.deliver(out);
            }
            groups.retain(|_, slot| slot.group.state() != GroupState::Dead);
            for group in self.offsets.groups() {
                let empty_since = match groups.get(&group) {
                    Some(slot) if !slot.group.is_empty() => continue,
                    Some(slot) => slot.group.empty_since_ms(),
                    None => i64::MIN,
                };
                if now.saturating_sub(empty_since) < retention {
                    continue;
                }
                let stale = self
                    .offsets
                    .committed_before(&group, now.saturating_sub(retention));
                if !stale.is_empty() {
                    expired.push((group, stale));
                }
            }
        }
        expired.sort();
        for (group, _) in expired {
            // Decided again as the tombstones are appended: a commit made meanwhile stays.
            match self
                .offsets
                .expire(&group, now.saturating_sub(retention), now)
                .await
            {
                Ok(0) => {}
                Ok(count) => {
                    tracing::info!(%group, partitions = count, "offsets expired (offsets.retention.minutes)")
                }
                Err(error) => {
                    tracing::warn!(%group, %error, "could not write expired-offset tombstones")
                }
            }
        }
    }

    /// Checks an OffsetCommit against the group's membership and generation.
    pub(crate) fn validate_commit(
        &self,
        group_id: &str,
        member_id: &str,
        instance_id: Option<&str>,
        generation_id: i32,
    ) -> Result<(), ResponseError> {
        let now = self.clock.now_ms();
        let mut groups = self.groups();
        match groups.get_mut(group_id) {
            Some(slot) => slot
                .group
                .validate_commit(member_id, instance_id, generation_id, now),
            None if generation_id < 0 => Ok(()),
            None => Err(ResponseError::IllegalGeneration),
        }
    }

    pub(crate) async fn commit(
        &self,
        group_id: &str,
        entries: Vec<((String, i32), Option<Committed>)>,
    ) -> Result<(), CommitError> {
        self.offsets
            .commit(group_id, entries, self.clock.now_ms())
            .await
    }

    pub(crate) fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Deletes every group's committed offsets for `topic` (the topic was deleted). A
    /// failure is logged: the topic is gone either way, and a restart replays the log.
    pub(crate) async fn forget_topic(&self, topic: &str) {
        for (group, keys) in self.offsets.committed_for_topic(topic) {
            let count = keys.len();
            let entries = keys.into_iter().map(|key| (key, None)).collect();
            match self.commit(&group, entries).await {
                Ok(()) => {
                    tracing::info!(%group, topic, partitions = count, "deleted the committed offsets of a deleted topic")
                }
                Err(error) => {
                    tracing::warn!(%group, topic, %error, "could not delete the committed offsets of a deleted topic")
                }
            }
        }
    }

    pub(crate) fn committed(&self, group_id: &str) -> GroupOffsets {
        self.offsets.group(group_id)
    }

    /// (group id, protocol type, state) of every group, including groups that only have
    /// committed offsets.
    pub(crate) fn list(&self) -> Vec<(String, String, GroupState)> {
        let groups = self.groups();
        let mut out: Vec<(String, String, GroupState)> = groups
            .iter()
            .filter(|(_, slot)| slot.group.state() != GroupState::Dead)
            .map(|(id, slot)| {
                (
                    id.clone(),
                    slot.group.protocol_type().unwrap_or_default().to_string(),
                    slot.group.state(),
                )
            })
            .collect();
        for id in self.offsets.groups() {
            if !groups.contains_key(&id) {
                out.push((id, String::new(), GroupState::Empty));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// DescribeGroups for one group: `None` if the broker knows nothing of it.
    pub(crate) fn describe(&self, group_id: &str) -> Option<GroupView> {
        let groups = self.groups();
        match groups.get(group_id) {
            Some(slot) if slot.group.state() != GroupState::Dead => Some(GroupView {
                state: slot.group.state(),
                protocol_type: slot.group.protocol_type().unwrap_or_default().to_string(),
                protocol_name: slot.group.protocol_name().unwrap_or_default().to_string(),
                members: slot.group.member_views(),
            }),
            _ if !self.offsets.group(group_id).is_empty() => Some(GroupView {
                state: GroupState::Empty,
                protocol_type: String::new(),
                protocol_name: String::new(),
                members: Vec::new(),
            }),
            _ => None,
        }
    }

    /// Members' metadata for the selected protocol, if the group is active (to tell which
    /// topics a consumer group subscribes to).
    pub(crate) fn active_metadata(&self, group_id: &str) -> Option<(String, Vec<bytes::Bytes>)> {
        let groups = self.groups();
        let slot = groups.get(group_id)?;
        if slot.group.is_empty() || slot.group.state() == GroupState::Dead {
            return None;
        }
        Some((
            slot.group.protocol_type().unwrap_or_default().to_string(),
            slot.group.selected_metadata(),
        ))
    }

    /// DeleteGroups for one group: only an empty group can go; its offsets go with it.
    pub(crate) async fn delete(&self, group_id: &str) -> Result<(), ResponseError> {
        let known_offsets = self.offsets.group(group_id);
        {
            let mut groups = self.groups();
            match groups.get_mut(group_id) {
                Some(slot) if !slot.group.is_empty() => return Err(ResponseError::NonEmptyGroup),
                Some(slot) if slot.group.state() != GroupState::Dead => slot.group.mark_dead(),
                _ if known_offsets.is_empty() => return Err(ResponseError::GroupIdNotFound),
                _ => {}
            }
            groups.remove(group_id);
        }
        let entries = known_offsets.into_keys().map(|key| (key, None)).collect();
        match self.commit(group_id, entries).await {
            Ok(()) => Ok(()),
            Err(error) => {
                tracing::warn!(group = %group_id, %error, "deleting the group's offsets failed");
                Err(ResponseError::KafkaStorageError)
            }
        }
    }

    /// Writes the group's membership record if it reached a state worth keeping that differs
    /// from the last one written.
    fn record(&self, group_id: &str, slot: &mut Slot, now_ms: i64) {
        let Some(record) = slot.group.record() else {
            return;
        };
        if slot.recorded.as_ref() == Some(&record) {
            return;
        }
        self.offsets.record_group(group_id, &record, now_ms);
        slot.recorded = Some(record);
    }

    pub(crate) fn close(&self) -> Result<(), LogError> {
        self.offsets.close(self.clock.now_ms())
    }
}

/// The member id a new member's join is parked under: the one its completion names, or else
/// the one the group just added with this `fresh` suffix.
fn new_member_id(out: &[Completion], group: &Group, fresh: &str) -> String {
    let suffix = format!("-{fresh}");
    out.iter()
        .find_map(|c| match c {
            Completion::Join(id, _) if id.ends_with(&suffix) => Some(id.clone()),
            _ => None,
        })
        .or_else(|| {
            group
                .member_views()
                .into_iter()
                .map(|m| m.member_id)
                .find(|id| id.ends_with(&suffix))
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod expiry_tests {
    use std::future::Future;
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::task::Context;

    use super::*;

    #[derive(Debug)]
    struct ManualClock(AtomicI64);

    impl Clock for ManualClock {
        fn now_ms(&self) -> i64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn committed(offset: i64, at_ms: i64) -> Option<Committed> {
        Some(Committed {
            offset,
            leader_epoch: -1,
            metadata: String::new(),
            commit_timestamp_ms: at_ms,
        })
    }

    /// Issue 18, item 6: offsets expiry decides what is stale, then writes the tombstones,
    /// with awaits in between (one fsync per expired group). A commit that lands in between
    /// must survive: here group b's offset is committed anew while the tombstones of group a
    /// are being fsynced, and b's tombstone written after it deleted the new commit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_that_lands_while_expiry_runs_is_not_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock(AtomicI64::new(1_000)));
        let config = GroupConfig {
            offsets_retention: Duration::from_secs(60),
            ..GroupConfig::default()
        };
        let coordinator = GroupCoordinator::open(dir.path(), config, clock.clone()).unwrap();
        let key = ("t".to_string(), 0);
        for group in ["a", "b"] {
            coordinator
                .commit(group, vec![(key.clone(), committed(5, 1_000))])
                .await
                .unwrap();
        }
        clock.0.store(1_000 + 61_000, Ordering::SeqCst);
        // Expiry starts: both groups are stale; it stops at its first fsync (group a's).
        let mut tick = Box::pin(coordinator.tick());
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(
            tick.as_mut().poll(&mut cx).is_pending(),
            "expiry finished in one poll: the test proves nothing"
        );
        // Meanwhile b's member commits again: appended at once, then it waits for an fsync.
        let mut commit =
            Box::pin(coordinator.commit("b", vec![(key.clone(), committed(9, 62_000))]));
        assert!(commit.as_mut().poll(&mut cx).is_pending());
        let ((), result) = tokio::join!(tick, commit);
        result.unwrap();
        assert_eq!(coordinator.committed("a").get(&key), None, "a expired");
        assert_eq!(
            coordinator.committed("b").get(&key).map(|c| c.offset),
            Some(9),
            "the commit made while expiry ran was deleted"
        );
        drop(coordinator);
        let reopened = GroupCoordinator::open(
            dir.path(),
            GroupConfig::default(),
            Arc::new(ManualClock(AtomicI64::new(63_000))),
        )
        .unwrap();
        assert_eq!(
            reopened.committed("b").get(&key).map(|c| c.offset),
            Some(9),
            "after a restart"
        );
    }
}

#[cfg(test)]
mod restart_tests {
    use bytes::Bytes;

    use super::*;
    use crate::clock::SystemClock;

    fn coordinator(dir: &Path) -> GroupCoordinator {
        let config = GroupConfig {
            initial_rebalance_delay: Duration::ZERO,
            ..GroupConfig::default()
        };
        GroupCoordinator::open(dir, config, Arc::new(SystemClock)).expect("open")
    }

    async fn answer<T>(coordinator: &GroupCoordinator, pending: Pending<T>) -> T {
        match pending {
            Pending::Now(result) => result,
            Pending::Later(mut receiver) => {
                for _ in 0..100 {
                    coordinator.tick().await;
                    if let Ok(result) = receiver.try_recv() {
                        return result;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                panic!("no answer within 5 s");
            }
        }
    }

    /// Issue 20: after a restart (here without a clean close, as after kill -9) every member
    /// was unknown: heartbeats and commits got UNKNOWN_MEMBER_ID, in-flight commits failed and
    /// the group rebalanced, so Java consumers read records again (528 of 60,000 in the probe).
    /// Now the group comes back at its generation, with its members and their assignments.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn members_keep_their_generation_and_assignment_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let first = coordinator(dir.path());
        let joined = first.join(
            "g",
            JoinParams {
                client_id: "c".into(),
                client_host: "/127.0.0.1".into(),
                session_timeout_ms: 10_000,
                rebalance_timeout_ms: 10_000,
                protocol_type: "consumer".into(),
                protocols: vec![("range".into(), Bytes::from_static(b"subscription"))],
                ..JoinParams::default()
            },
        );
        let joined = answer(&first, joined).await;
        assert_eq!(joined.error, None);
        let (member, generation) = (joined.member_id.clone(), joined.generation_id);
        let synced = first.sync(
            "g",
            SyncParams {
                member_id: member.clone(),
                generation_id: generation,
                assignments: vec![(member.clone(), Bytes::from_static(b"assignment"))],
                ..SyncParams::default()
            },
        );
        let synced = answer(&first, synced).await;
        assert_eq!(synced.error, None);
        first.heartbeat("g", &member, None, generation).unwrap();
        drop(first); // no close: the record was written, not fsynced, as before kill -9

        let second = coordinator(dir.path());
        assert_eq!(
            second.heartbeat("g", &member, None, generation),
            Ok(()),
            "the member is known after the restart"
        );
        assert_eq!(
            second.validate_commit("g", &member, None, generation),
            Ok(())
        );
        let view = second.describe("g").expect("the group is there");
        assert_eq!(view.state, GroupState::Stable);
        assert_eq!(view.members.len(), 1);
        assert_eq!(
            view.members[0].assignment,
            Bytes::from_static(b"assignment")
        );
        assert_eq!(
            view.members[0].metadata,
            Bytes::from_static(b"subscription")
        );

        // A member that left is not brought back by the next restart.
        assert_eq!(second.leave("g", &[(member.clone(), None)]), vec![Ok(())]);
        drop(second);
        let third = coordinator(dir.path());
        assert_eq!(
            third.heartbeat("g", &member, None, generation),
            Err(ResponseError::UnknownMemberId)
        );
    }
}
