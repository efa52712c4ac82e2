//! Group membership over the classic protocol: FindCoordinator, JoinGroup, SyncGroup (with
//! the leader computing the assignment), Heartbeat from a background task, LeaveGroup,
//! OffsetCommit and OffsetFetch.
//!
//! The coordinator gets its own connection (not the pooled one fetches use), so a fetch held
//! for `fetch.max.wait.ms` never delays a heartbeat, which is what the Java client and
//! librdkafka do too. The heartbeat task also enforces `max.poll.interval.ms`: when the
//! application has not polled for that long, it leaves the group so the partitions go to a
//! member that is making progress.
//!
//! References: Kafka protocol guide; the Java client's `AbstractCoordinator` and
//! `ConsumerCoordinator`; KIP-62 (heartbeat thread, max.poll.interval.ms), KIP-345 (static
//! members), KIP-394 (MEMBER_ID_REQUIRED), KIP-429 (cooperative rebalancing).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kafka_protocol::ResponseError;
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::leave_group_request::MemberIdentity;
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
use kafka_protocol::messages::{
    ApiKey, FindCoordinatorRequest, GroupId, HeartbeatRequest, JoinGroupRequest, LeaveGroupRequest,
    OffsetCommitRequest, OffsetFetchRequest, SyncGroupRequest, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use semel_client::{ClientError, Cluster, Connection, check_code};
use tokio::sync::Notify;

use crate::assignor::{
    Strategy, Subscription, TopicPartition, decode_assignment, decode_subscription,
    encode_assignment, encode_subscription,
};
use crate::config::ConsumerConfig;
use crate::record::ConsumerError;

/// Why the member has to join again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Rejoin {
    /// The group is rebalancing (or our subscription or the metadata changed): the partitions
    /// are still ours until the rebalance says otherwise.
    Needed(String),
    /// Our generation is gone (expired session, fenced, left after `max.poll.interval.ms`):
    /// the partitions may already be someone else's.
    Lost(String),
}

#[derive(Debug)]
pub(crate) struct Membership {
    pub(crate) member_id: String,
    pub(crate) generation: i32,
    /// JoinGroup+SyncGroup done and no rebalance noticed since.
    pub(crate) stable: bool,
    pub(crate) rejoin: Option<Rejoin>,
    coordinator: Option<Arc<Connection>>,
    pub(crate) last_poll: Instant,
    pub(crate) fatal: Option<ConsumerError>,
    closed: bool,
}

/// What the poll loop and the heartbeat task share.
#[derive(Debug)]
pub(crate) struct GroupShared {
    pub(crate) group_id: String,
    pub(crate) config: ConsumerConfig,
    pub(crate) cluster: Arc<Cluster>,
    pub(crate) state: Mutex<Membership>,
    /// Wakes a waiting `poll` when a rebalance is needed.
    pub(crate) wake: Arc<Notify>,
    stop: Notify,
}

/// The result of one JoinGroup + SyncGroup round.
#[derive(Debug)]
pub(crate) struct Joined {
    pub(crate) generation: i32,
    pub(crate) assigned: BTreeSet<TopicPartition>,
    pub(crate) strategy: Strategy,
}

fn str_bytes(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

impl GroupShared {
    pub(crate) fn new(
        group_id: String,
        config: ConsumerConfig,
        cluster: Arc<Cluster>,
        wake: Arc<Notify>,
    ) -> Arc<Self> {
        Arc::new(Self {
            group_id,
            config,
            cluster,
            state: Mutex::new(Membership {
                member_id: String::new(),
                generation: -1,
                stable: false,
                rejoin: Some(Rejoin::Needed("initial join".into())),
                coordinator: None,
                last_poll: Instant::now(),
                fatal: None,
                closed: false,
            }),
            wake,
            stop: Notify::new(),
        })
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Membership> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn group_error(&self, code: ResponseError, message: Option<&StrBytes>) -> ConsumerError {
        ConsumerError::Group {
            group: self.group_id.clone(),
            code,
            message: message.map(ToString::to_string),
        }
    }

    /// Asks for a rebalance (a stronger reason replaces a weaker one).
    pub(crate) fn request_rejoin(&self, reason: Rejoin) {
        let mut state = self.lock();
        state.stable = false;
        match (&state.rejoin, &reason) {
            (Some(Rejoin::Lost(_)), Rejoin::Needed(_)) => {}
            _ => state.rejoin = Some(reason),
        }
        drop(state);
        self.wake.notify_one();
    }

    fn forget_coordinator(&self) {
        self.lock().coordinator = None;
    }

    /// The coordinator's connection, found (again) if needed.
    pub(crate) async fn coordinator(&self) -> Result<Arc<Connection>, ConsumerError> {
        let existing = self.lock().coordinator.clone();
        if let Some(connection) = existing.filter(|c| !c.is_broken()) {
            return Ok(connection);
        }
        let any = self.cluster.any().await?;
        let version = any.version(ApiKey::FindCoordinator, (0, 4))?;
        let request = if version >= 4 {
            FindCoordinatorRequest::default()
                .with_key_type(0)
                .with_coordinator_keys(vec![str_bytes(&self.group_id)])
        } else {
            FindCoordinatorRequest::default()
                .with_key(str_bytes(&self.group_id))
                .with_key_type(0)
        };
        let response = any.send_version(&request, version).await?;
        let (code, message, host, port) = if version >= 4 {
            let Some(c) = response.coordinators.first() else {
                return Err(ClientError::Metadata(
                    "FindCoordinator answered no coordinator".into(),
                )
                .into());
            };
            (
                c.error_code,
                c.error_message.clone(),
                c.host.to_string(),
                c.port,
            )
        } else {
            (
                response.error_code,
                response.error_message.clone(),
                response.host.to_string(),
                response.port,
            )
        };
        if let Err(code) = check_code(code) {
            return Err(ClientError::Broker {
                api: ApiKey::FindCoordinator,
                code,
                message: message.map(|m| m.to_string()),
            }
            .into());
        }
        let mut connection_config = self.cluster.config().connection.clone();
        connection_config
            .client_id
            .clone_from(&self.config.client_id);
        let connection =
            Arc::new(Connection::connect(&format!("{host}:{port}"), connection_config).await?);
        self.lock().coordinator = Some(Arc::clone(&connection));
        Ok(connection)
    }

    /// One JoinGroup + SyncGroup round, retried through coordinator moves and
    /// `MEMBER_ID_REQUIRED` until it produces an assignment or a fatal error. Runs on its own
    /// task, so `poll(timeout)` keeps its timeout (and a cooperative member keeps consuming
    /// what it owns) while the coordinator holds the JoinGroup for the rebalance.
    pub(crate) async fn join(
        &self,
        topics: &BTreeSet<String>,
        owned: &BTreeSet<TopicPartition>,
        previous: &BTreeSet<TopicPartition>,
        reason: &str,
    ) -> Result<Joined, ConsumerError> {
        let strategies = self.config.partition_assignment_strategy.clone();
        let cooperative = self.config.cooperative();
        loop {
            if self.lock().closed {
                return Err(ConsumerError::Closed);
            }
            let coordinator = match self.coordinator().await {
                Ok(c) => c,
                Err(e) if retriable(&e) => {
                    tracing::debug!(error = %e, "coordinator lookup failed; retrying");
                    tokio::time::sleep(self.config.retry_backoff).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let (member_id, generation) = {
                let s = self.lock();
                (s.member_id.clone(), s.generation)
            };
            let nothing = BTreeSet::new();
            let mut protocols = Vec::new();
            for strategy in &strategies {
                let metadata = encode_subscription(
                    topics,
                    if cooperative { owned } else { &nothing },
                    generation,
                    (*strategy == Strategy::Sticky).then_some(previous),
                )
                .map_err(|e| ConsumerError::State(e.to_string()))?;
                protocols.push(
                    JoinGroupRequestProtocol::default()
                        .with_name(str_bytes(strategy.name()))
                        .with_metadata(metadata),
                );
            }
            let version = coordinator.version(ApiKey::JoinGroup, (0, 9))?;
            let rebalance_timeout = self.config.max_poll_interval;
            let request = JoinGroupRequest::default()
                .with_group_id(GroupId(str_bytes(&self.group_id)))
                .with_session_timeout_ms(millis(self.config.session_timeout))
                .with_rebalance_timeout_ms(millis(rebalance_timeout))
                .with_member_id(str_bytes(&member_id))
                .with_group_instance_id(self.config.group_instance_id.as_deref().map(str_bytes))
                .with_protocol_type(StrBytes::from_static_str("consumer"))
                .with_protocols(protocols)
                .with_reason(Some(str_bytes(reason)));
            let answer = async {
                coordinator
                    .submit(&request, version)
                    .await?
                    .with_timeout(rebalance_timeout + Duration::from_secs(5))
                    .response()
                    .await
            }
            .await;
            let response = match answer {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "JoinGroup failed; retrying");
                    self.forget_coordinator();
                    tokio::time::sleep(self.config.retry_backoff).await;
                    continue;
                }
            };
            match check_code(response.error_code) {
                Ok(()) => {}
                Err(ResponseError::MemberIdRequired) => {
                    self.lock().member_id = response.member_id.to_string();
                    continue;
                }
                Err(ResponseError::UnknownMemberId) => {
                    self.lock().member_id.clear();
                    continue;
                }
                Err(
                    ResponseError::NotCoordinator
                    | ResponseError::CoordinatorNotAvailable
                    | ResponseError::CoordinatorLoadInProgress
                    | ResponseError::RebalanceInProgress,
                ) => {
                    self.forget_coordinator();
                    tokio::time::sleep(self.config.retry_backoff).await;
                    continue;
                }
                Err(code) => {
                    let error = self.group_error(code, None);
                    self.lock().fatal = Some(error.clone());
                    return Err(error);
                }
            }
            let generation = response.generation_id;
            let member_id = response.member_id.to_string();
            let protocol = response
                .protocol_name
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default();
            let Some(strategy) = Strategy::from_name(&protocol) else {
                return Err(ConsumerError::State(format!(
                    "the group chose protocol {protocol:?}, which this consumer did not offer"
                )));
            };
            {
                let mut s = self.lock();
                s.member_id.clone_from(&member_id);
                s.generation = generation;
            }
            let leader = response.leader.as_str() == member_id;
            tracing::info!(
                group = %self.group_id,
                %member_id,
                generation,
                protocol = %protocol,
                leader,
                "joined group"
            );
            let assignments = if leader && !response.skip_assignment {
                self.assign(strategy, &response.members).await?
            } else {
                Vec::new()
            };
            let version = coordinator.version(ApiKey::SyncGroup, (0, 5))?;
            let request = SyncGroupRequest::default()
                .with_group_id(GroupId(str_bytes(&self.group_id)))
                .with_generation_id(generation)
                .with_member_id(str_bytes(&member_id))
                .with_group_instance_id(self.config.group_instance_id.as_deref().map(str_bytes))
                .with_protocol_type(Some(StrBytes::from_static_str("consumer")))
                .with_protocol_name(Some(str_bytes(&protocol)))
                .with_assignments(assignments);
            let answer = async {
                coordinator
                    .submit(&request, version)
                    .await?
                    .with_timeout(rebalance_timeout + Duration::from_secs(5))
                    .response()
                    .await
            }
            .await;
            let response = match answer {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "SyncGroup failed; joining again");
                    self.forget_coordinator();
                    tokio::time::sleep(self.config.retry_backoff).await;
                    continue;
                }
            };
            match check_code(response.error_code) {
                Ok(()) => {}
                Err(ResponseError::UnknownMemberId | ResponseError::IllegalGeneration) => {
                    let mut s = self.lock();
                    s.member_id.clear();
                    s.generation = -1;
                    continue;
                }
                Err(ResponseError::RebalanceInProgress) => continue,
                Err(
                    ResponseError::NotCoordinator
                    | ResponseError::CoordinatorNotAvailable
                    | ResponseError::CoordinatorLoadInProgress,
                ) => {
                    self.forget_coordinator();
                    tokio::time::sleep(self.config.retry_backoff).await;
                    continue;
                }
                Err(code) => {
                    let error = self.group_error(code, None);
                    self.lock().fatal = Some(error.clone());
                    return Err(error);
                }
            }
            let assigned = decode_assignment(&response.assignment)
                .map_err(|e| ConsumerError::State(format!("assignment from the leader: {e}")))?;
            // A rejoin asked for during this round (a subscription change, a commit that met
            // REBALANCE_IN_PROGRESS) stays asked for: the consumer runs another round.
            self.lock().stable = true;
            self.wake.notify_one();
            return Ok(Joined {
                generation,
                assigned,
                strategy,
            });
        }
    }

    /// The leader's work: decode every member's subscription, load the partition counts of
    /// every topic any member wants, run the assignor.
    async fn assign(
        &self,
        strategy: Strategy,
        members: &[kafka_protocol::messages::join_group_response::JoinGroupResponseMember],
    ) -> Result<Vec<SyncGroupRequestAssignment>, ConsumerError> {
        let mut subscriptions: Vec<Subscription> = Vec::new();
        for member in members {
            match decode_subscription(member.member_id.as_str(), &member.metadata) {
                Ok(subscription) => subscriptions.push(subscription),
                Err(e) => {
                    tracing::warn!(member = %member.member_id, error = %e, "unreadable subscription; it gets nothing");
                    subscriptions.push(Subscription {
                        member_id: member.member_id.to_string(),
                        ..Subscription::default()
                    });
                }
            }
        }
        let topics: Vec<String> = subscriptions
            .iter()
            .flat_map(|s| s.topics.iter().cloned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        self.cluster.refresh_metadata(Some(&topics), false).await?;
        let partitions = partition_counts(&self.cluster, &topics);
        let assignment = strategy.assign(&partitions, &subscriptions);
        tracing::debug!(?assignment, "leader assigned");
        let mut out = Vec::new();
        for (member, owned) in assignment {
            out.push(
                SyncGroupRequestAssignment::default()
                    .with_member_id(str_bytes(&member))
                    .with_assignment(
                        encode_assignment(&owned)
                            .map_err(|e| ConsumerError::State(e.to_string()))?,
                    ),
            );
        }
        Ok(out)
    }

    /// Leaves the group (dynamic members only: a static member keeps its place for a
    /// restart within the session timeout, KIP-345).
    pub(crate) async fn leave(&self, reason: &str) {
        let (member_id, connection) = {
            let mut s = self.lock();
            s.stable = false;
            let member_id = std::mem::take(&mut s.member_id);
            s.generation = -1;
            (member_id, s.coordinator.clone())
        };
        if member_id.is_empty() || self.config.group_instance_id.is_some() {
            return;
        }
        let Some(connection) = connection else { return };
        let Ok(version) = connection.version(ApiKey::LeaveGroup, (0, 5)) else {
            return;
        };
        let request = if version >= 3 {
            LeaveGroupRequest::default()
                .with_group_id(GroupId(str_bytes(&self.group_id)))
                .with_members(vec![
                    MemberIdentity::default()
                        .with_member_id(str_bytes(&member_id))
                        .with_reason(Some(str_bytes(reason))),
                ])
        } else {
            LeaveGroupRequest::default()
                .with_group_id(GroupId(str_bytes(&self.group_id)))
                .with_member_id(str_bytes(&member_id))
        };
        match connection.send_version(&request, version).await {
            Ok(response) => {
                tracing::info!(group = %self.group_id, %member_id, code = response.error_code, "left group");
            }
            Err(e) => tracing::debug!(error = %e, "LeaveGroup failed"),
        }
    }

    /// Commits `offsets` (next offsets to read). Generation -1 and an empty member id when
    /// the consumer is not a group member (manual assignment), as Kafka expects.
    pub(crate) async fn commit(
        &self,
        offsets: &BTreeMap<TopicPartition, i64>,
        as_member: bool,
    ) -> Result<(), ConsumerError> {
        if offsets.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + self.config.request_timeout;
        loop {
            let connection = match self.coordinator().await {
                Ok(c) => c,
                Err(e) if retriable(&e) && Instant::now() < deadline => {
                    tokio::time::sleep(self.config.retry_backoff).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let (member_id, generation) = if as_member {
                let s = self.lock();
                (s.member_id.clone(), s.generation)
            } else {
                (String::new(), -1)
            };
            let mut by_topic: BTreeMap<&str, Vec<OffsetCommitRequestPartition>> = BTreeMap::new();
            for ((topic, partition), offset) in offsets {
                by_topic.entry(topic).or_default().push(
                    OffsetCommitRequestPartition::default()
                        .with_partition_index(*partition)
                        .with_committed_offset(*offset)
                        .with_committed_leader_epoch(-1),
                );
            }
            let request = OffsetCommitRequest::default()
                .with_group_id(GroupId(str_bytes(&self.group_id)))
                .with_generation_id_or_member_epoch(generation)
                .with_member_id(str_bytes(&member_id))
                .with_group_instance_id(if as_member {
                    self.config.group_instance_id.as_deref().map(str_bytes)
                } else {
                    None
                })
                .with_retention_time_ms(-1)
                .with_topics(
                    by_topic
                        .into_iter()
                        .map(|(t, ps)| {
                            OffsetCommitRequestTopic::default()
                                .with_name(TopicName(str_bytes(t)))
                                .with_partitions(ps)
                        })
                        .collect(),
                );
            let response = match connection.send(&request, (2, 8)).await {
                Ok(r) => r,
                Err(e) if e.is_retriable() && Instant::now() < deadline => {
                    self.forget_coordinator();
                    tokio::time::sleep(self.config.retry_backoff).await;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let mut retry = false;
            for topic in &response.topics {
                for p in &topic.partitions {
                    match check_code(p.error_code) {
                        Ok(()) => {}
                        Err(
                            ResponseError::NotCoordinator
                            | ResponseError::CoordinatorNotAvailable
                            | ResponseError::CoordinatorLoadInProgress
                            | ResponseError::RequestTimedOut,
                        ) => retry = true,
                        // The heartbeat notices the rebalance; the commit just failed.
                        Err(code @ ResponseError::RebalanceInProgress) => {
                            return Err(ConsumerError::CommitFailed(format!(
                                "{code:?}: the group is rebalancing"
                            )));
                        }
                        Err(
                            code @ (ResponseError::IllegalGeneration
                            | ResponseError::UnknownMemberId),
                        ) => {
                            // Sent with the generation before a rebalance that is under way
                            // (a cooperative member keeps consuming while it rejoins): the
                            // partitions are still ours, the join in progress settles it.
                            // Only a refusal of the current, settled generation means they
                            // are lost (the Java client's rule).
                            let (stable, current) = {
                                let s = self.lock();
                                (s.stable, s.generation)
                            };
                            if as_member && stable && current == generation {
                                self.request_rejoin(Rejoin::Lost(format!("commit: {code:?}")));
                            }
                            return Err(ConsumerError::CommitFailed(format!(
                                "{code:?} for generation {generation}"
                            )));
                        }
                        Err(code @ ResponseError::FencedInstanceId) => {
                            let error = self.group_error(code, None);
                            self.lock().fatal = Some(error.clone());
                            return Err(error);
                        }
                        Err(code) => {
                            return Err(ClientError::Broker {
                                api: ApiKey::OffsetCommit,
                                code,
                                message: Some(format!("{}-{}", topic.name.0, p.partition_index)),
                            }
                            .into());
                        }
                    }
                }
            }
            if !retry {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ConsumerError::CommitFailed(
                    "the coordinator stayed unavailable for request.timeout.ms".into(),
                ));
            }
            self.forget_coordinator();
            tokio::time::sleep(self.config.retry_backoff).await;
        }
    }

    /// The committed offsets of `partitions` (absent: none committed).
    pub(crate) async fn committed(
        &self,
        partitions: &BTreeSet<TopicPartition>,
    ) -> Result<BTreeMap<TopicPartition, i64>, ConsumerError> {
        let mut out = BTreeMap::new();
        if partitions.is_empty() {
            return Ok(out);
        }
        let deadline = Instant::now() + self.config.request_timeout;
        loop {
            let connection = match self.coordinator().await {
                Ok(c) => c,
                Err(e) if retriable(&e) && Instant::now() < deadline => {
                    tokio::time::sleep(self.config.retry_backoff).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut by_topic: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
            for (t, p) in partitions {
                by_topic.entry(t).or_default().push(*p);
            }
            let request = OffsetFetchRequest::default()
                .with_group_id(GroupId(str_bytes(&self.group_id)))
                .with_topics(Some(
                    by_topic
                        .into_iter()
                        .map(|(t, ps)| {
                            OffsetFetchRequestTopic::default()
                                .with_name(TopicName(str_bytes(t)))
                                .with_partition_indexes(ps)
                        })
                        .collect(),
                ))
                .with_require_stable(true);
            let response = match connection.send(&request, (1, 7)).await {
                Ok(r) => r,
                Err(e) if e.is_retriable() && Instant::now() < deadline => {
                    self.forget_coordinator();
                    tokio::time::sleep(self.config.retry_backoff).await;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let mut retry = false;
            match check_code(response.error_code) {
                Ok(()) => {}
                Err(
                    ResponseError::NotCoordinator
                    | ResponseError::CoordinatorNotAvailable
                    | ResponseError::CoordinatorLoadInProgress,
                ) => retry = true,
                Err(code) => {
                    return Err(ClientError::Broker {
                        api: ApiKey::OffsetFetch,
                        code,
                        message: None,
                    }
                    .into());
                }
            }
            for topic in &response.topics {
                for p in &topic.partitions {
                    match check_code(p.error_code) {
                        Ok(()) if p.committed_offset >= 0 => {
                            out.insert(
                                (topic.name.0.to_string(), p.partition_index),
                                p.committed_offset,
                            );
                        }
                        Ok(()) => {}
                        // KIP-447: offsets pending in a transaction; ask again.
                        Err(ResponseError::UnstableOffsetCommit) => retry = true,
                        Err(code) => {
                            return Err(ClientError::Broker {
                                api: ApiKey::OffsetFetch,
                                code,
                                message: Some(format!("{}-{}", topic.name.0, p.partition_index)),
                            }
                            .into());
                        }
                    }
                }
            }
            if !retry {
                return Ok(out);
            }
            if Instant::now() >= deadline {
                return Err(ConsumerError::State(
                    "committed offsets stayed unavailable for request.timeout.ms".into(),
                ));
            }
            out.clear();
            self.forget_coordinator();
            tokio::time::sleep(self.config.retry_backoff).await;
        }
    }

    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.stop.notify_one();
    }

    /// The heartbeat task: runs until `close`.
    pub(crate) async fn heartbeat_loop(self: Arc<Self>) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.config.heartbeat_interval) => {}
                () = self.stop.notified() => return,
            }
            let (stable, member_id, generation, idle) = {
                let s = self.lock();
                if s.closed {
                    return;
                }
                (
                    s.stable,
                    s.member_id.clone(),
                    s.generation,
                    s.last_poll.elapsed(),
                )
            };
            if !stable {
                continue;
            }
            if idle > self.config.max_poll_interval {
                tracing::warn!(
                    group = %self.group_id,
                    idle_ms = idle.as_millis(),
                    "no poll within max.poll.interval.ms; leaving the group so its partitions go to a member that is making progress"
                );
                self.leave("consumer poll timeout has expired").await;
                self.request_rejoin(Rejoin::Lost("max.poll.interval.ms exceeded".into()));
                continue;
            }
            let connection = match self.coordinator().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "heartbeat: no coordinator");
                    continue;
                }
            };
            let request = HeartbeatRequest::default()
                .with_group_id(GroupId(str_bytes(&self.group_id)))
                .with_generation_id(generation)
                .with_member_id(str_bytes(&member_id))
                .with_group_instance_id(self.config.group_instance_id.as_deref().map(str_bytes));
            let response = match connection.send(&request, (0, 4)).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "heartbeat failed");
                    self.forget_coordinator();
                    continue;
                }
            };
            match check_code(response.error_code) {
                Ok(()) => {}
                Err(ResponseError::RebalanceInProgress) => {
                    self.request_rejoin(Rejoin::Needed("the group is rebalancing".into()));
                }
                Err(code @ (ResponseError::IllegalGeneration | ResponseError::UnknownMemberId)) => {
                    if code == ResponseError::UnknownMemberId {
                        self.lock().member_id.clear();
                    }
                    self.request_rejoin(Rejoin::Lost(format!("heartbeat: {code:?}")));
                }
                Err(ResponseError::NotCoordinator | ResponseError::CoordinatorNotAvailable) => {
                    self.forget_coordinator()
                }
                Err(code) => {
                    let error = self.group_error(code, None);
                    tracing::error!(%error, "heartbeat refused");
                    let mut s = self.lock();
                    s.fatal = Some(error);
                    s.stable = false;
                    drop(s);
                    self.wake.notify_one();
                }
            }
        }
    }
}

fn retriable(error: &ConsumerError) -> bool {
    match error {
        ConsumerError::Client(e) => {
            e.is_retriable()
                || matches!(
                    e,
                    ClientError::Broker {
                        code: ResponseError::CoordinatorNotAvailable
                            | ResponseError::NotCoordinator
                            | ResponseError::CoordinatorLoadInProgress,
                        ..
                    }
                )
        }
        _ => false,
    }
}

pub(crate) fn millis(d: Duration) -> i32 {
    i32::try_from(d.as_millis()).unwrap_or(i32::MAX)
}

/// topic → partition count, for the topics the metadata knows without error.
pub(crate) fn partition_counts(cluster: &Cluster, topics: &[String]) -> BTreeMap<String, i32> {
    topics
        .iter()
        .filter_map(|t| {
            let info = cluster.topic(t)?;
            if info.error.is_some() || info.partitions.is_empty() {
                return None;
            }
            Some((
                t.clone(),
                i32::try_from(info.partitions.len()).unwrap_or(i32::MAX),
            ))
        })
        .collect()
}
