//! The transactional producer's requests to its transaction coordinator (AddPartitionsToTxn,
//! AddOffsetsToTxn, EndTxn) and to the group coordinator (TxnOffsetCommit), with the Java
//! client's retry rules: a coordinator that is loading, moving or busy with the previous
//! transaction (`COORDINATOR_LOAD_IN_PROGRESS`, `COORDINATOR_NOT_AVAILABLE`, `NOT_COORDINATOR`,
//! `CONCURRENT_TRANSACTIONS`) and a broken connection are retried, the coordinator looked up
//! again, with waits doubling up to 1 s, until `deadline`. A fenced producer
//! (`PRODUCER_FENCED`, `INVALID_PRODUCER_EPOCH`, `INVALID_PRODUCER_ID_MAPPING`) is an error
//! the caller turns into the fatal state.
//!
//! References: KIP-98, KIP-447; the Java client's `TransactionManager` handlers.

use std::sync::Arc;
use std::time::Duration;

use kafka_protocol::ResponseError;
use kafka_protocol::messages::add_partitions_to_txn_request::AddPartitionsToTxnTopic;
use kafka_protocol::messages::txn_offset_commit_request::{
    TxnOffsetCommitRequestPartition, TxnOffsetCommitRequestTopic,
};
use kafka_protocol::messages::{
    AddOffsetsToTxnRequest, AddPartitionsToTxnRequest, ApiKey, EndTxnRequest,
    FindCoordinatorRequest, GroupId, ProducerId, TopicName, TransactionalId,
    TxnOffsetCommitRequest,
};
use kafka_protocol::protocol::StrBytes;
use semel_client::{ClientError, Cluster, Connection, ConsumerGroupMetadata, check_code};
use tokio::time::Instant;

/// Which coordinator (FindCoordinator key type).
#[derive(Debug, Clone, Copy)]
pub(crate) enum CoordinatorKind {
    Group,
    Transaction,
}

/// FindCoordinator for `key`, connected.
pub(crate) async fn coordinator(
    cluster: &Cluster,
    kind: CoordinatorKind,
    key: &str,
) -> Result<Arc<Connection>, ClientError> {
    let any = cluster.any().await?;
    let version = any.version(ApiKey::FindCoordinator, (1, 4))?;
    let key_type = match kind {
        CoordinatorKind::Group => 0,
        CoordinatorKind::Transaction => 1,
    };
    let key = StrBytes::from_string(key.to_string());
    let request = if version >= 4 {
        FindCoordinatorRequest::default()
            .with_key_type(key_type)
            .with_coordinator_keys(vec![key])
    } else {
        FindCoordinatorRequest::default()
            .with_key(key)
            .with_key_type(key_type)
    };
    let response = any.send_version(&request, version).await?;
    let (code, message, host, port) = match response.coordinators.first() {
        Some(c) if version >= 4 => (
            c.error_code,
            c.error_message.clone(),
            c.host.to_string(),
            c.port,
        ),
        _ => (
            response.error_code,
            response.error_message.clone(),
            response.host.to_string(),
            response.port,
        ),
    };
    check_code(code).map_err(|code| ClientError::Broker {
        api: ApiKey::FindCoordinator,
        code,
        message: message.map(|m| m.to_string()),
    })?;
    cluster.connection(&format!("{host}:{port}")).await
}

/// Whether a transaction request that failed this way may be sent again.
fn retriable(error: &ClientError) -> bool {
    match error {
        ClientError::Broker { code, .. } => matches!(
            code,
            ResponseError::CoordinatorLoadInProgress
                | ResponseError::CoordinatorNotAvailable
                | ResponseError::NotCoordinator
                | ResponseError::ConcurrentTransactions
                | ResponseError::UnknownTopicOrPartition
                | ResponseError::RequestTimedOut
                | ResponseError::UnstableOffsetCommit
        ),
        // A broken or timed-out connection: the request may or may not have been applied;
        // each of these requests is idempotent for the coordinator (adding what is already
        // added, ending what is already ended with the same result).
        ClientError::Connect { .. }
        | ClientError::ConnectionBroken { .. }
        | ClientError::Timeout { .. }
        | ClientError::NoBrokerReachable { .. } => true,
        _ => false,
    }
}

/// Runs `attempt` until it succeeds, fails for good, or `deadline` passes.
async fn with_retries<T, F, Fut>(
    deadline: Instant,
    what: &str,
    mut attempt: F,
) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let mut wait = Duration::from_millis(20);
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) if retriable(&error) && Instant::now() + wait < deadline => {
                tracing::debug!(%error, what, retry_in_ms = wait.as_millis() as u64, "transaction request retried");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(1));
            }
            Err(error) => return Err(error),
        }
    }
}

fn broker_error(api: ApiKey, code: i16) -> Result<(), ClientError> {
    check_code(code).map_err(|code| ClientError::Broker {
        api,
        code,
        message: None,
    })
}

/// The producer's transactional identity.
#[derive(Debug, Clone)]
pub(crate) struct TxnIdentity {
    pub(crate) transactional_id: String,
    pub(crate) producer: (i64, i16),
}

/// AddPartitionsToTxn for `partitions`.
pub(crate) async fn add_partitions(
    cluster: &Cluster,
    id: &TxnIdentity,
    partitions: &[(String, i32)],
    deadline: Instant,
) -> Result<(), ClientError> {
    let mut by_topic: std::collections::BTreeMap<&str, Vec<i32>> = Default::default();
    for (topic, partition) in partitions {
        by_topic.entry(topic).or_default().push(*partition);
    }
    let topics: Vec<AddPartitionsToTxnTopic> = by_topic
        .into_iter()
        .map(|(topic, partitions)| {
            AddPartitionsToTxnTopic::default()
                .with_name(TopicName(StrBytes::from_string(topic.to_string())))
                .with_partitions(partitions)
        })
        .collect();
    with_retries(deadline, "AddPartitionsToTxn", || async {
        let connection =
            coordinator(cluster, CoordinatorKind::Transaction, &id.transactional_id).await?;
        let version = connection.version(ApiKey::AddPartitionsToTxn, (0, 3))?;
        let request = AddPartitionsToTxnRequest::default()
            .with_v3_and_below_transactional_id(TransactionalId(StrBytes::from_string(
                id.transactional_id.clone(),
            )))
            .with_v3_and_below_producer_id(ProducerId(id.producer.0))
            .with_v3_and_below_producer_epoch(id.producer.1)
            .with_v3_and_below_topics(topics.clone());
        let response = connection.send_version(&request, version).await?;
        // The first real error wins; OPERATION_NOT_ATTEMPTED only says another partition failed.
        let mut worst = 0i16;
        for topic in &response.results_by_topic_v3_and_below {
            for partition in &topic.results_by_partition {
                let code = partition.partition_error_code;
                if code != 0 && (worst == 0 || worst == ResponseError::OperationNotAttempted.code())
                {
                    worst = code;
                }
            }
        }
        broker_error(ApiKey::AddPartitionsToTxn, worst)
    })
    .await
}

/// AddOffsetsToTxn for `group`, then TxnOffsetCommit of `offsets` to the group's coordinator.
pub(crate) async fn send_offsets(
    cluster: &Cluster,
    id: &TxnIdentity,
    offsets: &[(String, i32, i64)],
    group: &ConsumerGroupMetadata,
    deadline: Instant,
) -> Result<(), ClientError> {
    with_retries(deadline, "AddOffsetsToTxn", || async {
        let connection =
            coordinator(cluster, CoordinatorKind::Transaction, &id.transactional_id).await?;
        let version = connection.version(ApiKey::AddOffsetsToTxn, (0, 3))?;
        let request = AddOffsetsToTxnRequest::default()
            .with_transactional_id(TransactionalId(StrBytes::from_string(
                id.transactional_id.clone(),
            )))
            .with_producer_id(ProducerId(id.producer.0))
            .with_producer_epoch(id.producer.1)
            .with_group_id(GroupId(StrBytes::from_string(group.group_id.clone())));
        let response = connection.send_version(&request, version).await?;
        broker_error(ApiKey::AddOffsetsToTxn, response.error_code)
    })
    .await?;
    let mut by_topic: std::collections::BTreeMap<&str, Vec<(i32, i64)>> = Default::default();
    for (topic, partition, offset) in offsets {
        by_topic
            .entry(topic)
            .or_default()
            .push((*partition, *offset));
    }
    let topics: Vec<TxnOffsetCommitRequestTopic> = by_topic
        .into_iter()
        .map(|(topic, partitions)| {
            TxnOffsetCommitRequestTopic::default()
                .with_name(TopicName(StrBytes::from_string(topic.to_string())))
                .with_partitions(
                    partitions
                        .into_iter()
                        .map(|(partition, offset)| {
                            TxnOffsetCommitRequestPartition::default()
                                .with_partition_index(partition)
                                .with_committed_offset(offset)
                                .with_committed_leader_epoch(-1)
                                .with_committed_metadata(Some(StrBytes::from_static_str("")))
                        })
                        .collect(),
                )
        })
        .collect();
    with_retries(deadline, "TxnOffsetCommit", || async {
        let connection = coordinator(cluster, CoordinatorKind::Group, &group.group_id).await?;
        let version = connection.version(ApiKey::TxnOffsetCommit, (0, 3))?;
        let mut request = TxnOffsetCommitRequest::default()
            .with_transactional_id(TransactionalId(StrBytes::from_string(
                id.transactional_id.clone(),
            )))
            .with_group_id(GroupId(StrBytes::from_string(group.group_id.clone())))
            .with_producer_id(ProducerId(id.producer.0))
            .with_producer_epoch(id.producer.1)
            .with_topics(topics.clone());
        if version >= 3 {
            request = request
                .with_generation_id(group.generation_id)
                .with_member_id(StrBytes::from_string(group.member_id.clone()))
                .with_group_instance_id(group.group_instance_id.clone().map(StrBytes::from_string));
        }
        let response = connection.send_version(&request, version).await?;
        let code = response
            .topics
            .iter()
            .flat_map(|t| t.partitions.iter())
            .map(|p| p.error_code)
            .find(|code| *code != 0)
            .unwrap_or(0);
        broker_error(ApiKey::TxnOffsetCommit, code)
    })
    .await
}

/// EndTxn: commit or abort the open transaction.
pub(crate) async fn end(
    cluster: &Cluster,
    id: &TxnIdentity,
    commit: bool,
    deadline: Instant,
) -> Result<(), ClientError> {
    with_retries(deadline, "EndTxn", || async {
        let connection =
            coordinator(cluster, CoordinatorKind::Transaction, &id.transactional_id).await?;
        let version = connection.version(ApiKey::EndTxn, (0, 3))?;
        let request = EndTxnRequest::default()
            .with_transactional_id(TransactionalId(StrBytes::from_string(
                id.transactional_id.clone(),
            )))
            .with_producer_id(ProducerId(id.producer.0))
            .with_producer_epoch(id.producer.1)
            .with_committed(commit);
        let response = connection.send_version(&request, version).await?;
        broker_error(ApiKey::EndTxn, response.error_code)
    })
    .await
}

/// Whether `error` means a newer instance took over this transactional id.
pub(crate) fn fenced(error: &ClientError) -> bool {
    matches!(
        error,
        ClientError::Broker {
            code: ResponseError::ProducerFenced
                | ResponseError::InvalidProducerEpoch
                | ResponseError::InvalidProducerIdMapping
                | ResponseError::TransactionalIdAuthorizationFailed,
            ..
        }
    )
}
