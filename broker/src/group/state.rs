//! One consumer group's membership state machine (the classic protocol), with no I/O and no
//! clock of its own: every call takes `now_ms`, so tests drive time by hand.
//!
//! States: Empty → PreparingRebalance → CompletingRebalance → Stable, back to
//! PreparingRebalance on any trigger, and Dead once deleted. A rebalance collects a JoinGroup
//! from every member (members that do not rejoin within the rebalance timeout are dropped),
//! bumps the generation, picks a protocol every member supports, and answers the joins: the
//! leader gets every member's metadata and computes the assignment, which it hands back in its
//! SyncGroup; the broker relays each member its part.
//!
//! Calls that answer a request later (JoinGroup and SyncGroup wait for the rest of the group)
//! return `None` and the answer arrives as a [`Completion`] pushed to `out`, possibly by a later
//! call (another member's join, a leave, or [`Group::tick`]).
//!
//! References: Kafka's `GroupCoordinator`/`GroupMetadata` (classic protocol); KIP-394 (member
//! id required), KIP-345 (static membership), KIP-134 (initial rebalance delay), KIP-211
//! (offsets expire once the group is empty).

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use kafka_protocol::ResponseError;

/// The group's state, named as Kafka's DescribeGroups and ListGroups name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GroupState {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
    Dead,
}

impl GroupState {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Empty => "Empty",
            Self::PreparingRebalance => "PreparingRebalance",
            Self::CompletingRebalance => "CompletingRebalance",
            Self::Stable => "Stable",
            Self::Dead => "Dead",
        }
    }
}

/// Group settings from the broker config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GroupLimits {
    /// `group.min.session.timeout.ms`.
    pub(crate) min_session_timeout_ms: i32,
    /// `group.max.session.timeout.ms`.
    pub(crate) max_session_timeout_ms: i32,
    /// `group.initial.rebalance.delay.ms`: the first rebalance of an empty group waits this
    /// long for more members, so a group starting up rebalances once, not once per member.
    pub(crate) initial_rebalance_delay_ms: i32,
    /// `group.max.size`.
    pub(crate) max_size: usize,
}

impl Default for GroupLimits {
    fn default() -> Self {
        Self {
            min_session_timeout_ms: 6_000,
            max_session_timeout_ms: 1_800_000,
            initial_rebalance_delay_ms: 3_000,
            max_size: usize::MAX,
        }
    }
}

/// A JoinGroup request, as the state machine needs it.
#[derive(Debug, Clone, Default)]
pub(crate) struct JoinParams {
    pub(crate) member_id: String,
    pub(crate) group_instance_id: Option<String>,
    pub(crate) client_id: String,
    pub(crate) client_host: String,
    pub(crate) session_timeout_ms: i32,
    pub(crate) rebalance_timeout_ms: i32,
    pub(crate) protocol_type: String,
    /// (name, metadata), in the member's order of preference.
    pub(crate) protocols: Vec<(String, Bytes)>,
    /// JoinGroup v4+: a new dynamic member first gets `MEMBER_ID_REQUIRED` and its id.
    pub(crate) require_known_member_id: bool,
}

/// A member as the leader sees it in its JoinGroup response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JoinedMember {
    pub(crate) member_id: String,
    pub(crate) group_instance_id: Option<String>,
    pub(crate) metadata: Bytes,
}

/// A JoinGroup answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JoinResult {
    /// `None` on success.
    pub(crate) error: Option<ResponseError>,
    pub(crate) generation_id: i32,
    pub(crate) protocol_type: Option<String>,
    pub(crate) protocol_name: Option<String>,
    pub(crate) leader: String,
    pub(crate) member_id: String,
    /// Every member, for the leader only; empty for the others.
    pub(crate) members: Vec<JoinedMember>,
}

impl JoinResult {
    fn error(error: ResponseError, member_id: &str) -> Self {
        Self {
            error: Some(error),
            generation_id: -1,
            protocol_type: None,
            protocol_name: None,
            leader: String::new(),
            member_id: member_id.to_string(),
            members: Vec::new(),
        }
    }
}

/// A SyncGroup request, as the state machine needs it.
#[derive(Debug, Clone, Default)]
pub(crate) struct SyncParams {
    pub(crate) member_id: String,
    pub(crate) group_instance_id: Option<String>,
    pub(crate) generation_id: i32,
    pub(crate) protocol_type: Option<String>,
    pub(crate) protocol_name: Option<String>,
    /// The leader's assignment: (member id, assignment bytes).
    pub(crate) assignments: Vec<(String, Bytes)>,
}

/// A SyncGroup answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SyncResult {
    /// `None` on success.
    pub(crate) error: Option<ResponseError>,
    pub(crate) protocol_type: Option<String>,
    pub(crate) protocol_name: Option<String>,
    pub(crate) assignment: Bytes,
}

impl SyncResult {
    fn error(error: ResponseError) -> Self {
        Self {
            error: Some(error),
            protocol_type: None,
            protocol_name: None,
            assignment: Bytes::new(),
        }
    }
}

/// An answer to a request that was waiting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Completion {
    Join(String, JoinResult),
    Sync(String, SyncResult),
}

/// A member as DescribeGroups shows it.
#[derive(Debug, Clone)]
pub(crate) struct MemberView {
    pub(crate) member_id: String,
    pub(crate) group_instance_id: Option<String>,
    pub(crate) client_id: String,
    pub(crate) client_host: String,
    /// Metadata for the selected protocol (empty before the first generation).
    pub(crate) metadata: Bytes,
    pub(crate) assignment: Bytes,
}

#[derive(Debug, Clone)]
struct Member {
    instance_id: Option<String>,
    client_id: String,
    client_host: String,
    session_timeout_ms: i32,
    rebalance_timeout_ms: i32,
    protocol_type: String,
    protocols: Vec<(String, Bytes)>,
    assignment: Bytes,
    last_seen_ms: i64,
    /// Has a JoinGroup waiting for this rebalance to complete.
    awaiting_join: bool,
    /// Has a SyncGroup waiting for the leader's assignment.
    awaiting_sync: bool,
    /// Sent its SyncGroup in the current generation.
    synced: bool,
}

impl Member {
    fn metadata_for(&self, protocol: &str) -> Bytes {
        self.protocols
            .iter()
            .find(|(name, _)| name == protocol)
            .map(|(_, metadata)| metadata.clone())
            .unwrap_or_default()
    }
}

/// One group.
#[derive(Debug)]
pub(crate) struct Group {
    id: String,
    state: GroupState,
    generation_id: i32,
    protocol_type: Option<String>,
    protocol_name: Option<String>,
    leader: Option<String>,
    members: BTreeMap<String, Member>,
    /// `group.instance.id` → member id (static members).
    static_members: HashMap<String, String>,
    /// Member ids handed out with `MEMBER_ID_REQUIRED`, not yet joined, with their deadline.
    pending: HashMap<String, i64>,
    /// When the current join phase ends even if members are missing.
    join_deadline_ms: i64,
    /// The join phase is the initial delay of a group that was empty.
    initial_join: bool,
    rebalance_started_ms: i64,
    /// When members that have not sent SyncGroup are dropped.
    sync_deadline_ms: i64,
    /// When the group last became empty (offsets expire from there, KIP-211).
    empty_since_ms: i64,
    limits: GroupLimits,
}

/// What is kept of a group across a broker restart, as Kafka keeps its group metadata record:
/// the generation and the members with their subscription and assignment, written when a
/// rebalance completes and when the group empties.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct GroupRecord {
    pub(crate) generation_id: i32,
    pub(crate) protocol_type: Option<String>,
    pub(crate) protocol_name: Option<String>,
    pub(crate) leader: Option<String>,
    pub(crate) members: Vec<MemberRecord>,
}

/// One member in a [`GroupRecord`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct MemberRecord {
    pub(crate) member_id: String,
    pub(crate) instance_id: Option<String>,
    pub(crate) client_id: String,
    pub(crate) client_host: String,
    pub(crate) session_timeout_ms: i32,
    pub(crate) rebalance_timeout_ms: i32,
    /// Its metadata for the selected protocol.
    pub(crate) metadata: Vec<u8>,
    pub(crate) assignment: Vec<u8>,
}

impl Group {
    /// The record to keep now: `Some` only in a state worth restoring (Stable, or Empty with
    /// its generation), `None` in the middle of a rebalance.
    pub(crate) fn record(&self) -> Option<GroupRecord> {
        if !matches!(self.state, GroupState::Stable | GroupState::Empty) {
            return None;
        }
        let protocol = self.protocol_name.clone().unwrap_or_default();
        Some(GroupRecord {
            generation_id: self.generation_id,
            protocol_type: self.protocol_type.clone(),
            protocol_name: self.protocol_name.clone(),
            leader: self.leader.clone(),
            members: self
                .members
                .iter()
                .map(|(id, m)| MemberRecord {
                    member_id: id.clone(),
                    instance_id: m.instance_id.clone(),
                    client_id: m.client_id.clone(),
                    client_host: m.client_host.clone(),
                    session_timeout_ms: m.session_timeout_ms,
                    rebalance_timeout_ms: m.rebalance_timeout_ms,
                    metadata: m.metadata_for(&protocol).to_vec(),
                    assignment: m.assignment.to_vec(),
                })
                .collect(),
        })
    }

    /// The group as it was recorded, after a restart: Stable with its members (each given a
    /// full session from `now_ms`, so a member that is gone is dropped one session timeout
    /// later and the group rebalances), or Empty at its generation.
    pub(crate) fn restore(id: &str, record: GroupRecord, limits: GroupLimits, now_ms: i64) -> Self {
        let mut group = Self::new(id, limits, now_ms);
        group.generation_id = record.generation_id;
        group.protocol_type = record.protocol_type;
        group.protocol_name = record.protocol_name;
        let protocol = group.protocol_name.clone().unwrap_or_default();
        for m in record.members {
            if let Some(instance) = &m.instance_id {
                group
                    .static_members
                    .insert(instance.clone(), m.member_id.clone());
            }
            group.members.insert(
                m.member_id,
                Member {
                    instance_id: m.instance_id,
                    client_id: m.client_id,
                    client_host: m.client_host,
                    session_timeout_ms: m.session_timeout_ms,
                    rebalance_timeout_ms: m.rebalance_timeout_ms,
                    protocol_type: group.protocol_type.clone().unwrap_or_default(),
                    protocols: vec![(protocol.clone(), Bytes::from(m.metadata))],
                    assignment: Bytes::from(m.assignment),
                    last_seen_ms: now_ms,
                    awaiting_join: false,
                    awaiting_sync: false,
                    synced: true,
                },
            );
        }
        if !group.members.is_empty() {
            group.state = GroupState::Stable;
            group.leader = record
                .leader
                .filter(|leader| group.members.contains_key(leader));
        }
        group
    }

    pub(crate) fn new(id: &str, limits: GroupLimits, now_ms: i64) -> Self {
        Self {
            id: id.to_string(),
            state: GroupState::Empty,
            generation_id: 0,
            protocol_type: None,
            protocol_name: None,
            leader: None,
            members: BTreeMap::new(),
            static_members: HashMap::new(),
            pending: HashMap::new(),
            join_deadline_ms: 0,
            initial_join: false,
            rebalance_started_ms: 0,
            sync_deadline_ms: 0,
            empty_since_ms: now_ms,
            limits,
        }
    }

    pub(crate) fn state(&self) -> GroupState {
        self.state
    }

    #[cfg(test)]
    pub(crate) fn generation_id(&self) -> i32 {
        self.generation_id
    }

    pub(crate) fn protocol_type(&self) -> Option<&str> {
        self.protocol_type.as_deref()
    }

    pub(crate) fn protocol_name(&self) -> Option<&str> {
        self.protocol_name.as_deref()
    }

    #[cfg(test)]
    pub(crate) fn leader(&self) -> Option<&str> {
        self.leader.as_deref()
    }

    pub(crate) fn empty_since_ms(&self) -> i64 {
        self.empty_since_ms
    }

    pub(crate) fn member_count(&self) -> usize {
        self.members.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.members.is_empty() && self.pending.is_empty()
    }

    #[cfg(test)]
    pub(crate) fn has_member(&self, member_id: &str) -> bool {
        self.members.contains_key(member_id)
    }

    /// Members for DescribeGroups.
    pub(crate) fn member_views(&self) -> Vec<MemberView> {
        let protocol = self.protocol_name.clone().unwrap_or_default();
        self.members
            .iter()
            .map(|(id, m)| MemberView {
                member_id: id.clone(),
                group_instance_id: m.instance_id.clone(),
                client_id: m.client_id.clone(),
                client_host: m.client_host.clone(),
                metadata: m.metadata_for(&protocol),
                assignment: m.assignment.clone(),
            })
            .collect()
    }

    /// Every member's metadata for the selected protocol (to see what a consumer group is
    /// subscribed to).
    pub(crate) fn selected_metadata(&self) -> Vec<Bytes> {
        let protocol = self.protocol_name.clone().unwrap_or_default();
        self.members
            .values()
            .map(|m| m.metadata_for(&protocol))
            .collect()
    }

    /// Marks the group deleted (DeleteGroups on an empty group).
    pub(crate) fn mark_dead(&mut self) {
        self.state = GroupState::Dead;
    }

    /// The checks Kafka applies to a member id and instance id, in its order.
    fn check_member(
        &self,
        member_id: &str,
        instance_id: Option<&str>,
    ) -> Result<(), ResponseError> {
        if let Some(instance) = instance_id {
            match self.static_members.get(instance) {
                Some(known) if known != member_id => return Err(ResponseError::FencedInstanceId),
                _ => {}
            }
        }
        if !self.members.contains_key(member_id) {
            return Err(ResponseError::UnknownMemberId);
        }
        Ok(())
    }

    /// Protocol names every member (and `protocols`, for a joining member) supports.
    fn supports(&self, protocol_type: &str, protocols: &[(String, Bytes)], except: &str) -> bool {
        if protocol_type.is_empty() || protocols.is_empty() {
            return false;
        }
        let others: Vec<&Member> = self
            .members
            .iter()
            .filter(|(id, _)| id.as_str() != except)
            .map(|(_, m)| m)
            .collect();
        if others.is_empty() {
            return true;
        }
        if others.iter().any(|m| m.protocol_type != protocol_type) {
            return false;
        }
        protocols.iter().any(|(name, _)| {
            others
                .iter()
                .all(|m| m.protocols.iter().any(|(n, _)| n == name))
        })
    }

    /// JoinGroup. `fresh` is a unique suffix for a member id this call may hand out.
    /// `Some` answers now; `None` means the answer comes as a [`Completion`].
    pub(crate) fn join(
        &mut self,
        params: JoinParams,
        fresh: &str,
        now_ms: i64,
        out: &mut Vec<Completion>,
    ) -> Option<JoinResult> {
        if self.state == GroupState::Dead {
            return Some(JoinResult::error(
                ResponseError::CoordinatorNotAvailable,
                &params.member_id,
            ));
        }
        if params.session_timeout_ms < self.limits.min_session_timeout_ms
            || params.session_timeout_ms > self.limits.max_session_timeout_ms
        {
            return Some(JoinResult::error(
                ResponseError::InvalidSessionTimeout,
                &params.member_id,
            ));
        }
        if !self.supports(&params.protocol_type, &params.protocols, &params.member_id) {
            return Some(JoinResult::error(
                ResponseError::InconsistentGroupProtocol,
                &params.member_id,
            ));
        }
        if params.member_id.is_empty() {
            self.join_new(params, fresh, now_ms, out)
        } else {
            self.join_known(params, now_ms, out)
        }
    }

    fn join_new(
        &mut self,
        params: JoinParams,
        fresh: &str,
        now_ms: i64,
        out: &mut Vec<Completion>,
    ) -> Option<JoinResult> {
        let prefix = params
            .group_instance_id
            .clone()
            .unwrap_or_else(|| params.client_id.clone());
        let member_id = format!("{prefix}-{fresh}");
        if let Some(instance) = params.group_instance_id.clone() {
            if let Some(old_id) = self.static_members.get(&instance).cloned() {
                return self.replace_static_member(&old_id, &member_id, params, now_ms, out);
            }
        } else if params.require_known_member_id {
            if self.members.len() + self.pending.len() >= self.limits.max_size {
                return Some(JoinResult::error(ResponseError::GroupMaxSizeReached, ""));
            }
            let deadline = now_ms + i64::from(params.session_timeout_ms);
            self.pending.insert(member_id.clone(), deadline);
            return Some(JoinResult::error(
                ResponseError::MemberIdRequired,
                &member_id,
            ));
        }
        if self.members.len() + self.pending.len() >= self.limits.max_size {
            return Some(JoinResult::error(ResponseError::GroupMaxSizeReached, ""));
        }
        self.add_member(member_id, params, now_ms, out);
        None
    }

    fn join_known(
        &mut self,
        params: JoinParams,
        now_ms: i64,
        out: &mut Vec<Completion>,
    ) -> Option<JoinResult> {
        let member_id = params.member_id.clone();
        if self.pending.remove(&member_id).is_some() {
            self.add_member(member_id, params, now_ms, out);
            return None;
        }
        if let Err(error) = self.check_member(&member_id, params.group_instance_id.as_deref()) {
            return Some(JoinResult::error(error, &member_id));
        }
        let is_leader = self.leader.as_deref() == Some(member_id.as_str());
        let member = self.members.get_mut(&member_id)?;
        member.last_seen_ms = now_ms;
        let unchanged =
            member.protocols == params.protocols && member.protocol_type == params.protocol_type;
        match self.state {
            GroupState::PreparingRebalance => {
                update(member, &params);
                member.awaiting_join = true;
                self.check_join_complete(now_ms, out);
                None
            }
            GroupState::CompletingRebalance if unchanged => {
                // The member lost our answer: give it again.
                Some(self.join_result(&member_id))
            }
            GroupState::Stable if unchanged && !is_leader => Some(self.join_result(&member_id)),
            GroupState::CompletingRebalance | GroupState::Stable => {
                update(member, &params);
                member.awaiting_join = true;
                self.prepare_rebalance(now_ms, out);
                None
            }
            GroupState::Empty | GroupState::Dead => Some(JoinResult::error(
                ResponseError::UnknownMemberId,
                &member_id,
            )),
        }
    }

    /// A static member rejoined with a new member id: the old id is fenced. In a stable group
    /// with unchanged protocols this is not a rebalance (KIP-345): the member gets the current
    /// generation and, from SyncGroup, its previous assignment.
    fn replace_static_member(
        &mut self,
        old_id: &str,
        new_id: &str,
        params: JoinParams,
        now_ms: i64,
        out: &mut Vec<Completion>,
    ) -> Option<JoinResult> {
        let mut member = self.members.remove(old_id)?;
        if member.awaiting_join {
            out.push(Completion::Join(
                old_id.to_string(),
                JoinResult::error(ResponseError::FencedInstanceId, old_id),
            ));
            member.awaiting_join = false;
        }
        if member.awaiting_sync {
            out.push(Completion::Sync(
                old_id.to_string(),
                SyncResult::error(ResponseError::FencedInstanceId),
            ));
            member.awaiting_sync = false;
        }
        let unchanged =
            member.protocols == params.protocols && member.protocol_type == params.protocol_type;
        update(&mut member, &params);
        member.last_seen_ms = now_ms;
        if let Some(instance) = &member.instance_id {
            self.static_members
                .insert(instance.clone(), new_id.to_string());
        }
        let was_leader = self.leader.as_deref() == Some(old_id);
        if was_leader {
            self.leader = Some(new_id.to_string());
        }
        self.members.insert(new_id.to_string(), member);
        if self.state == GroupState::Stable && unchanged && !was_leader {
            if let Some(m) = self.members.get_mut(new_id) {
                m.synced = false;
            }
            return Some(self.join_result(new_id));
        }
        if let Some(m) = self.members.get_mut(new_id) {
            m.awaiting_join = true;
        }
        match self.state {
            GroupState::PreparingRebalance => self.check_join_complete(now_ms, out),
            _ => self.prepare_rebalance(now_ms, out),
        }
        None
    }

    fn add_member(
        &mut self,
        member_id: String,
        params: JoinParams,
        now_ms: i64,
        out: &mut Vec<Completion>,
    ) {
        if let Some(instance) = &params.group_instance_id {
            self.static_members
                .insert(instance.clone(), member_id.clone());
        }
        let member = Member {
            instance_id: params.group_instance_id.clone(),
            client_id: params.client_id.clone(),
            client_host: params.client_host.clone(),
            session_timeout_ms: params.session_timeout_ms,
            rebalance_timeout_ms: params.rebalance_timeout_ms,
            protocol_type: params.protocol_type.clone(),
            protocols: params.protocols,
            assignment: Bytes::new(),
            last_seen_ms: now_ms,
            awaiting_join: true,
            awaiting_sync: false,
            synced: false,
        };
        if self.members.is_empty() {
            self.protocol_type = Some(member.protocol_type.clone());
        }
        self.members.insert(member_id, member);
        if self.state == GroupState::PreparingRebalance {
            if self.initial_join {
                // KIP-134: each new member during the initial delay extends it, up to the
                // rebalance timeout.
                let cap = self.rebalance_started_ms + i64::from(self.max_rebalance_timeout());
                self.join_deadline_ms = (now_ms
                    + i64::from(self.limits.initial_rebalance_delay_ms))
                .min(cap)
                .max(self.join_deadline_ms);
            }
            self.check_join_complete(now_ms, out);
        } else {
            self.prepare_rebalance(now_ms, out);
        }
    }

    fn max_rebalance_timeout(&self) -> i32 {
        self.members
            .values()
            .map(|m| m.rebalance_timeout_ms)
            .max()
            .unwrap_or(0)
    }

    /// Starts a rebalance: every member must rejoin.
    fn prepare_rebalance(&mut self, now_ms: i64, out: &mut Vec<Completion>) {
        if self.state == GroupState::CompletingRebalance {
            // The assignment being computed is void: members waiting in SyncGroup rejoin.
            for (id, member) in &mut self.members {
                if member.awaiting_sync {
                    member.awaiting_sync = false;
                    out.push(Completion::Sync(
                        id.clone(),
                        SyncResult::error(ResponseError::RebalanceInProgress),
                    ));
                }
            }
        }
        let was_empty = self.state == GroupState::Empty;
        self.state = GroupState::PreparingRebalance;
        self.rebalance_started_ms = now_ms;
        if was_empty && self.limits.initial_rebalance_delay_ms > 0 {
            self.initial_join = true;
            self.join_deadline_ms = now_ms
                + i64::from(
                    self.limits
                        .initial_rebalance_delay_ms
                        .min(self.max_rebalance_timeout()),
                );
        } else {
            self.initial_join = false;
            self.join_deadline_ms = now_ms + i64::from(self.max_rebalance_timeout());
        }
        self.check_join_complete(now_ms, out);
    }

    fn check_join_complete(&mut self, now_ms: i64, out: &mut Vec<Completion>) {
        if self.state != GroupState::PreparingRebalance {
            return;
        }
        let all_joined = self.members.values().all(|m| m.awaiting_join) && self.pending.is_empty();
        let delaying = self.initial_join && now_ms < self.join_deadline_ms;
        if (all_joined && !delaying) || now_ms >= self.join_deadline_ms {
            self.complete_join(now_ms, out);
        }
    }

    /// Ends the join phase: drops dynamic members that did not rejoin, bumps the generation and
    /// answers every waiting JoinGroup.
    fn complete_join(&mut self, now_ms: i64, out: &mut Vec<Completion>) {
        let missing: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| !m.awaiting_join && m.instance_id.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        for id in missing {
            self.members.remove(&id);
        }
        self.pending.clear();
        self.initial_join = false;
        self.generation_id += 1;
        if !self.members.values().any(|m| m.awaiting_join) {
            // Nobody rejoined (static members that did not rejoin are dropped too).
            self.members.clear();
            self.static_members.clear();
            self.state = GroupState::Empty;
            self.protocol_name = None;
            self.leader = None;
            self.empty_since_ms = now_ms;
            return;
        }
        self.protocol_name = self.select_protocol();
        if !self
            .leader
            .as_ref()
            .is_some_and(|l| self.members.get(l).is_some_and(|m| m.awaiting_join))
        {
            self.leader = self
                .members
                .iter()
                .find(|(_, m)| m.awaiting_join)
                .map(|(id, _)| id.clone());
        }
        self.state = GroupState::CompletingRebalance;
        self.sync_deadline_ms = now_ms + i64::from(self.max_rebalance_timeout());
        let joined: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| m.awaiting_join)
            .map(|(id, _)| id.clone())
            .collect();
        for id in joined {
            let result = self.join_result(&id);
            if let Some(member) = self.members.get_mut(&id) {
                member.awaiting_join = false;
                member.synced = false;
                member.last_seen_ms = now_ms;
            }
            out.push(Completion::Join(id, result));
        }
    }

    /// The protocol most members prefer among those all members support.
    fn select_protocol(&self) -> Option<String> {
        let first = self.members.values().next()?;
        let candidates: Vec<&String> = first
            .protocols
            .iter()
            .map(|(name, _)| name)
            .filter(|name| {
                self.members
                    .values()
                    .all(|m| m.protocols.iter().any(|(n, _)| n == *name))
            })
            .collect();
        let mut votes: Vec<(usize, &String)> = candidates.iter().map(|c| (0, *c)).collect();
        for member in self.members.values() {
            if let Some((name, _)) = member
                .protocols
                .iter()
                .find(|(n, _)| candidates.contains(&n))
                && let Some(vote) = votes.iter_mut().find(|(_, c)| *c == name)
            {
                vote.0 += 1;
            }
        }
        // Most votes; ties go to the first member's preference order.
        let best = votes.iter().map(|(count, _)| *count).max()?;
        votes
            .into_iter()
            .find(|(count, _)| *count == best)
            .map(|(_, name)| name.clone())
    }

    fn join_result(&self, member_id: &str) -> JoinResult {
        let protocol = self.protocol_name.clone().unwrap_or_default();
        let is_leader = self.leader.as_deref() == Some(member_id);
        let members = if is_leader {
            self.members
                .iter()
                .map(|(id, m)| JoinedMember {
                    member_id: id.clone(),
                    group_instance_id: m.instance_id.clone(),
                    metadata: m.metadata_for(&protocol),
                })
                .collect()
        } else {
            Vec::new()
        };
        JoinResult {
            error: None,
            generation_id: self.generation_id,
            protocol_type: self.protocol_type.clone(),
            protocol_name: self.protocol_name.clone(),
            leader: self.leader.clone().unwrap_or_default(),
            member_id: member_id.to_string(),
            members,
        }
    }

    /// SyncGroup. `Some` answers now; `None` means the answer comes as a [`Completion`].
    pub(crate) fn sync(
        &mut self,
        params: SyncParams,
        now_ms: i64,
        out: &mut Vec<Completion>,
    ) -> Option<SyncResult> {
        if self.state == GroupState::Dead {
            return Some(SyncResult::error(ResponseError::CoordinatorNotAvailable));
        }
        if let Err(error) =
            self.check_member(&params.member_id, params.group_instance_id.as_deref())
        {
            return Some(SyncResult::error(error));
        }
        if params.generation_id != self.generation_id {
            return Some(SyncResult::error(ResponseError::IllegalGeneration));
        }
        if params
            .protocol_type
            .as_ref()
            .is_some_and(|t| Some(t) != self.protocol_type.as_ref())
            || params
                .protocol_name
                .as_ref()
                .is_some_and(|n| Some(n) != self.protocol_name.as_ref())
        {
            return Some(SyncResult::error(ResponseError::InconsistentGroupProtocol));
        }
        let is_leader = self.leader.as_deref() == Some(params.member_id.as_str());
        match self.state {
            GroupState::Empty | GroupState::Dead => {
                Some(SyncResult::error(ResponseError::UnknownMemberId))
            }
            GroupState::PreparingRebalance => {
                Some(SyncResult::error(ResponseError::RebalanceInProgress))
            }
            GroupState::CompletingRebalance => {
                let member = self.members.get_mut(&params.member_id)?;
                member.awaiting_sync = true;
                member.synced = true;
                member.last_seen_ms = now_ms;
                if is_leader {
                    let mut given: HashMap<String, Bytes> =
                        params.assignments.into_iter().collect();
                    for (id, member) in &mut self.members {
                        member.assignment = given.remove(id).unwrap_or_default();
                    }
                    self.state = GroupState::Stable;
                    for (id, member) in &mut self.members {
                        if member.awaiting_sync {
                            member.awaiting_sync = false;
                            out.push(Completion::Sync(
                                id.clone(),
                                SyncResult {
                                    error: None,
                                    protocol_type: self.protocol_type.clone(),
                                    protocol_name: self.protocol_name.clone(),
                                    assignment: member.assignment.clone(),
                                },
                            ));
                        }
                    }
                }
                None
            }
            GroupState::Stable => {
                let member = self.members.get_mut(&params.member_id)?;
                member.synced = true;
                member.last_seen_ms = now_ms;
                Some(SyncResult {
                    error: None,
                    protocol_type: self.protocol_type.clone(),
                    protocol_name: self.protocol_name.clone(),
                    assignment: member.assignment.clone(),
                })
            }
        }
    }

    /// Heartbeat: keeps the member's session alive and tells it whether to rejoin.
    pub(crate) fn heartbeat(
        &mut self,
        member_id: &str,
        instance_id: Option<&str>,
        generation_id: i32,
        now_ms: i64,
    ) -> Result<(), ResponseError> {
        if self.state == GroupState::Dead {
            return Err(ResponseError::CoordinatorNotAvailable);
        }
        self.check_member(member_id, instance_id)?;
        if generation_id != self.generation_id {
            return Err(ResponseError::IllegalGeneration);
        }
        if let Some(member) = self.members.get_mut(member_id) {
            member.last_seen_ms = now_ms;
        }
        match self.state {
            GroupState::PreparingRebalance => Err(ResponseError::RebalanceInProgress),
            GroupState::CompletingRebalance | GroupState::Stable => Ok(()),
            GroupState::Empty | GroupState::Dead => Err(ResponseError::UnknownMemberId),
        }
    }

    /// LeaveGroup for one member (by member id, or by instance id for static members).
    pub(crate) fn leave(
        &mut self,
        member_id: &str,
        instance_id: Option<&str>,
        now_ms: i64,
        out: &mut Vec<Completion>,
    ) -> Result<(), ResponseError> {
        if self.state == GroupState::Dead {
            return Err(ResponseError::CoordinatorNotAvailable);
        }
        let target = match instance_id {
            Some(instance) => match self.static_members.get(instance) {
                None => return Err(ResponseError::UnknownMemberId),
                Some(known) if !member_id.is_empty() && known != member_id => {
                    return Err(ResponseError::FencedInstanceId);
                }
                Some(known) => known.clone(),
            },
            None => {
                if self.pending.remove(member_id).is_some() {
                    self.check_join_complete(now_ms, out);
                    return Ok(());
                }
                if !self.members.contains_key(member_id) {
                    return Err(ResponseError::UnknownMemberId);
                }
                member_id.to_string()
            }
        };
        self.remove_member(&target, now_ms, out);
        Ok(())
    }

    fn remove_member(&mut self, member_id: &str, now_ms: i64, out: &mut Vec<Completion>) {
        let Some(member) = self.members.remove(member_id) else {
            return;
        };
        if member.awaiting_join {
            out.push(Completion::Join(
                member_id.to_string(),
                JoinResult::error(ResponseError::UnknownMemberId, member_id),
            ));
        }
        if member.awaiting_sync {
            out.push(Completion::Sync(
                member_id.to_string(),
                SyncResult::error(ResponseError::UnknownMemberId),
            ));
        }
        if let Some(instance) = &member.instance_id {
            self.static_members.remove(instance);
        }
        if self.leader.as_deref() == Some(member_id) {
            self.leader = None;
        }
        match self.state {
            GroupState::Stable | GroupState::CompletingRebalance => {
                self.prepare_rebalance(now_ms, out);
            }
            GroupState::PreparingRebalance => self.check_join_complete(now_ms, out),
            GroupState::Empty | GroupState::Dead => {}
        }
    }

    /// Expires silent members and pending member ids, and ends join or sync phases whose
    /// deadline passed.
    pub(crate) fn tick(&mut self, now_ms: i64, out: &mut Vec<Completion>) {
        if self.state == GroupState::Dead {
            return;
        }
        let before = self.pending.len();
        self.pending.retain(|_, deadline| *deadline > now_ms);
        if self.pending.len() != before {
            self.check_join_complete(now_ms, out);
        }
        let expired: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| {
                !m.awaiting_join
                    && !m.awaiting_sync
                    && m.last_seen_ms + i64::from(m.session_timeout_ms) <= now_ms
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            tracing::info!(group = %self.id, member = %id, "session timed out; removing member");
            self.remove_member(&id, now_ms, out);
        }
        match self.state {
            GroupState::PreparingRebalance if now_ms >= self.join_deadline_ms => {
                self.complete_join(now_ms, out);
            }
            GroupState::CompletingRebalance if now_ms >= self.sync_deadline_ms => {
                let unsynced: Vec<String> = self
                    .members
                    .iter()
                    .filter(|(_, m)| !m.synced)
                    .map(|(id, _)| id.clone())
                    .collect();
                tracing::info!(group = %self.id, members = ?unsynced, "no SyncGroup within the rebalance timeout; removing");
                for id in &unsynced {
                    if let Some(member) = self.members.remove(id)
                        && let Some(instance) = &member.instance_id
                    {
                        self.static_members.remove(instance);
                    }
                }
                self.prepare_rebalance(now_ms, out);
            }
            _ => {}
        }
    }

    /// The checks an OffsetCommit from a group member passes (Kafka's order). A commit with
    /// generation -1 and no member id is a standalone commit, allowed while the group is empty.
    pub(crate) fn validate_commit(
        &mut self,
        member_id: &str,
        instance_id: Option<&str>,
        generation_id: i32,
        now_ms: i64,
    ) -> Result<(), ResponseError> {
        if self.state == GroupState::Dead {
            return Err(ResponseError::CoordinatorNotAvailable);
        }
        if generation_id < 0 && member_id.is_empty() && instance_id.is_none() {
            return if self.members.is_empty() {
                Ok(())
            } else {
                Err(ResponseError::UnknownMemberId)
            };
        }
        self.check_member(member_id, instance_id)?;
        if generation_id != self.generation_id {
            return Err(ResponseError::IllegalGeneration);
        }
        if self.state == GroupState::CompletingRebalance {
            return Err(ResponseError::RebalanceInProgress);
        }
        if let Some(member) = self.members.get_mut(member_id) {
            member.last_seen_ms = now_ms;
        }
        Ok(())
    }
}

fn update(member: &mut Member, params: &JoinParams) {
    member.protocols.clone_from(&params.protocols);
    member.protocol_type.clone_from(&params.protocol_type);
    member.session_timeout_ms = params.session_timeout_ms;
    member.rebalance_timeout_ms = params.rebalance_timeout_ms;
    member.client_id.clone_from(&params.client_id);
    member.client_host.clone_from(&params.client_host);
}

#[cfg(test)]
mod tests;
