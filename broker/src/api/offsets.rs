//! Committed-offset APIs: OffsetCommit, OffsetFetch, OffsetDelete.
//!
//! A commit is checked against the group first (a zombie member from an older generation is
//! refused with `ILLEGAL_GENERATION`, a fenced static member with `FENCED_INSTANCE_ID`), then
//! appended to the offsets log and answered only once fsynced.
//!
//! References: Kafka protocol guide; Kafka's `GroupCoordinator.handleCommitOffsets` and
//! `handleFetchOffsets`; KIP-709 (OffsetFetch v8, several groups), KIP-496 (OffsetDelete).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Buf;
use kafka_protocol::ResponseError;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_delete_response::{
    OffsetDeleteResponsePartition, OffsetDeleteResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponseGroup, OffsetFetchResponsePartition, OffsetFetchResponsePartitions,
    OffsetFetchResponseTopic, OffsetFetchResponseTopics,
};
use kafka_protocol::messages::{
    ConsumerProtocolSubscription, OffsetCommitRequest, OffsetCommitResponse, OffsetDeleteRequest,
    OffsetDeleteResponse, OffsetFetchRequest, OffsetFetchResponse, ResponseKind, TopicName,
};
use kafka_protocol::protocol::{Decodable, StrBytes};

use super::Reply;
use crate::broker::BrokerState;
use crate::group::offsets::{Committed, GroupOffsets};

/// A partition index and how its commit went.
type PartitionOutcome = (i32, Result<(), ResponseError>);

fn partition_exists(state: &BrokerState, topic: &str, partition: i32) -> bool {
    state
        .catalog
        .topic(topic)
        .is_some_and(|t| t.partition(partition).is_some())
}

pub(crate) fn offset_commit(state: &Arc<BrokerState>, request: OffsetCommitRequest) -> Reply {
    let state = Arc::clone(state);
    Reply::Later(Box::pin(async move {
        ResponseKind::OffsetCommit(commit(&state, request).await)
    }))
}

async fn commit(state: &BrokerState, request: OffsetCommitRequest) -> OffsetCommitResponse {
    let group_id = request.group_id.0.to_string();
    let check = if group_id.is_empty() {
        Err(ResponseError::InvalidGroupId)
    } else {
        state.groups.validate_commit(
            &group_id,
            &request.member_id,
            request.group_instance_id.as_deref(),
            request.generation_id_or_member_epoch,
        )
    };
    let now = state.groups.now_ms();
    let max_metadata = state.groups.offset_metadata_max_bytes();
    // (topic, partition) → error; NONE entries are the ones to write.
    let mut results: Vec<(TopicName, Vec<PartitionOutcome>)> = Vec::new();
    let mut entries = Vec::new();
    for topic in &request.topics {
        let mut partitions = Vec::new();
        for p in &topic.partitions {
            let metadata = p
                .committed_metadata
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default();
            let error = match check {
                Err(error) => Err(error),
                Ok(()) if !partition_exists(state, &topic.name.0, p.partition_index) => {
                    Err(ResponseError::UnknownTopicOrPartition)
                }
                Ok(()) if metadata.len() > max_metadata => {
                    Err(ResponseError::OffsetMetadataTooLarge)
                }
                Ok(()) => {
                    entries.push((
                        (topic.name.0.to_string(), p.partition_index),
                        Some(Committed {
                            offset: p.committed_offset,
                            leader_epoch: p.committed_leader_epoch,
                            metadata,
                            commit_timestamp_ms: now,
                        }),
                    ));
                    Ok(())
                }
            };
            partitions.push((p.partition_index, error));
        }
        results.push((topic.name.clone(), partitions));
    }
    let written = if entries.is_empty() {
        Ok(())
    } else {
        state.groups.commit(&group_id, entries).await
    };
    if let Err(error) = &written {
        tracing::warn!(group = %group_id, %error, "offset commit failed");
    }
    OffsetCommitResponse::default().with_topics(
        results
            .into_iter()
            .map(|(name, partitions)| {
                OffsetCommitResponseTopic::default()
                    .with_name(name)
                    .with_partitions(
                        partitions
                            .into_iter()
                            .map(|(index, error)| {
                                let error = match (&written, error) {
                                    (Err(_), Ok(())) => Err(ResponseError::KafkaStorageError),
                                    (_, error) => error,
                                };
                                OffsetCommitResponsePartition::default()
                                    .with_partition_index(index)
                                    .with_error_code(error.err().map_or(0, |e| e.code()))
                            })
                            .collect(),
                    )
            })
            .collect(),
    )
}

/// One partition's committed offset, or -1 with no error when nothing is committed.
/// `UNSTABLE_OFFSET_COMMIT` when the client asked for stable offsets only (v7+, the Java
/// consumer under `read_committed`) and an open transaction holds an offset for the partition
/// that is not committed yet (KIP-447); the client retries. 0 otherwise.
fn unstable(
    state: &BrokerState,
    require_stable: bool,
    group: &str,
    topic: &str,
    partition: i32,
) -> i16 {
    if require_stable
        && state
            .transactions
            .has_pending_offset(group, topic, partition)
    {
        ResponseError::UnstableOffsetCommit.code()
    } else {
        0
    }
}

fn fetched(committed: &GroupOffsets, topic: &str, partition: i32) -> (i64, i32, String) {
    committed
        .get(&(topic.to_string(), partition))
        .map_or((-1, -1, String::new()), |c| {
            (c.offset, c.leader_epoch, c.metadata.clone())
        })
}

/// The (topic, partitions) asked for, or every committed partition when `topics` is null.
fn wanted(
    committed: &GroupOffsets,
    topics: Option<Vec<(TopicName, Vec<i32>)>>,
) -> Vec<(TopicName, Vec<i32>)> {
    match topics {
        Some(topics) => topics,
        None => {
            let mut by_topic: BTreeMap<String, Vec<i32>> = BTreeMap::new();
            for (topic, partition) in committed.keys() {
                by_topic.entry(topic.clone()).or_default().push(*partition);
            }
            by_topic
                .into_iter()
                .map(|(t, p)| (TopicName(StrBytes::from_string(t)), p))
                .collect()
        }
    }
}

pub(crate) fn offset_fetch(
    state: &Arc<BrokerState>,
    request: OffsetFetchRequest,
    version: i16,
) -> OffsetFetchResponse {
    if version >= 8 {
        let groups = request
            .groups
            .into_iter()
            .map(|group| {
                if group.group_id.0.is_empty() {
                    return OffsetFetchResponseGroup::default()
                        .with_group_id(group.group_id)
                        .with_error_code(ResponseError::InvalidGroupId.code());
                }
                let committed = state.groups.committed(&group.group_id.0);
                let topics = group.topics.map(|topics| {
                    topics
                        .into_iter()
                        .map(|t| (t.name, t.partition_indexes))
                        .collect()
                });
                let topics = wanted(&committed, topics)
                    .into_iter()
                    .map(|(name, partitions)| {
                        let partitions = partitions
                            .into_iter()
                            .map(|index| {
                                let (offset, epoch, metadata) = fetched(&committed, &name.0, index);
                                OffsetFetchResponsePartitions::default()
                                    .with_partition_index(index)
                                    .with_committed_offset(offset)
                                    .with_committed_leader_epoch(epoch)
                                    .with_metadata(Some(StrBytes::from_string(metadata)))
                                    .with_error_code(unstable(
                                        state,
                                        request.require_stable,
                                        &group.group_id.0,
                                        &name.0,
                                        index,
                                    ))
                            })
                            .collect();
                        OffsetFetchResponseTopics::default()
                            .with_name(name)
                            .with_partitions(partitions)
                    })
                    .collect();
                OffsetFetchResponseGroup::default()
                    .with_group_id(group.group_id)
                    .with_topics(topics)
            })
            .collect();
        return OffsetFetchResponse::default().with_groups(groups);
    }
    if request.group_id.0.is_empty() {
        return OffsetFetchResponse::default()
            .with_error_code(ResponseError::InvalidGroupId.code());
    }
    let committed = state.groups.committed(&request.group_id.0);
    let topics = request.topics.map(|topics| {
        topics
            .into_iter()
            .map(|t| (t.name, t.partition_indexes))
            .collect()
    });
    let topics = wanted(&committed, topics)
        .into_iter()
        .map(|(name, partitions)| {
            let partitions = partitions
                .into_iter()
                .map(|index| {
                    let (offset, epoch, metadata) = fetched(&committed, &name.0, index);
                    OffsetFetchResponsePartition::default()
                        .with_partition_index(index)
                        .with_committed_offset(offset)
                        .with_committed_leader_epoch(epoch)
                        .with_metadata(Some(StrBytes::from_string(metadata)))
                        .with_error_code(unstable(
                            state,
                            request.require_stable,
                            &request.group_id.0,
                            &name.0,
                            index,
                        ))
                })
                .collect();
            OffsetFetchResponseTopic::default()
                .with_name(name)
                .with_partitions(partitions)
        })
        .collect();
    OffsetFetchResponse::default().with_topics(topics)
}

/// Topics an active consumer group subscribes to, from its members' subscription metadata.
fn subscribed_topics(metadata: &[bytes::Bytes]) -> Vec<String> {
    let mut topics = Vec::new();
    for bytes in metadata {
        let mut buf = bytes.clone();
        if buf.remaining() < 2 {
            continue;
        }
        let version = buf.get_i16();
        // The embedded consumer protocol has versions 0-3; newer ones are read as 3, which
        // is how Kafka reads versions it does not know (the topic list comes first anyway).
        if let Ok(subscription) =
            ConsumerProtocolSubscription::decode(&mut buf, version.clamp(0, 3))
        {
            topics.extend(subscription.topics.into_iter().map(|t| t.to_string()));
        }
    }
    topics
}

pub(crate) fn offset_delete(state: &Arc<BrokerState>, request: OffsetDeleteRequest) -> Reply {
    let state = Arc::clone(state);
    Reply::Later(Box::pin(async move {
        ResponseKind::OffsetDelete(delete(&state, request).await)
    }))
}

async fn delete(state: &BrokerState, request: OffsetDeleteRequest) -> OffsetDeleteResponse {
    let group_id = request.group_id.0.to_string();
    if group_id.is_empty() {
        return OffsetDeleteResponse::default()
            .with_error_code(ResponseError::InvalidGroupId.code());
    }
    let active = state.groups.active_metadata(&group_id);
    let committed = state.groups.committed(&group_id);
    if active.is_none() && committed.is_empty() && state.groups.describe(&group_id).is_none() {
        return OffsetDeleteResponse::default()
            .with_error_code(ResponseError::GroupIdNotFound.code());
    }
    let subscribed = match &active {
        Some((protocol_type, _)) if protocol_type != "consumer" => {
            return OffsetDeleteResponse::default()
                .with_error_code(ResponseError::NonEmptyGroup.code());
        }
        Some((_, metadata)) => subscribed_topics(metadata),
        None => Vec::new(),
    };
    let mut entries = Vec::new();
    let mut results = Vec::new();
    for topic in &request.topics {
        let mut partitions = Vec::new();
        for p in &topic.partitions {
            let error = if subscribed.iter().any(|t| t == topic.name.0.as_str()) {
                ResponseError::GroupSubscribedToTopic.code()
            } else if !partition_exists(state, &topic.name.0, p.partition_index) {
                ResponseError::UnknownTopicOrPartition.code()
            } else {
                let key = (topic.name.0.to_string(), p.partition_index);
                if committed.contains_key(&key) {
                    entries.push((key, None));
                }
                0
            };
            partitions.push((p.partition_index, error));
        }
        results.push((topic.name.clone(), partitions));
    }
    let written = state.groups.commit(&group_id, entries).await;
    if let Err(error) = &written {
        tracing::warn!(group = %group_id, %error, "offset delete failed");
        return OffsetDeleteResponse::default()
            .with_error_code(ResponseError::KafkaStorageError.code());
    }
    OffsetDeleteResponse::default().with_topics(
        results
            .into_iter()
            .map(|(name, partitions)| {
                OffsetDeleteResponseTopic::default()
                    .with_name(name)
                    .with_partitions(
                        partitions
                            .into_iter()
                            .map(|(index, error)| {
                                OffsetDeleteResponsePartition::default()
                                    .with_partition_index(index)
                                    .with_error_code(error)
                            })
                            .collect(),
                    )
            })
            .collect(),
    )
}
