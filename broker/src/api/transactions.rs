//! The transactional producer's APIs: AddPartitionsToTxn (24), AddOffsetsToTxn (25), EndTxn
//! (26) and TxnOffsetCommit (28), answered by the transaction coordinator
//! ([`crate::transactions`]).
//!
//! - AddPartitionsToTxn v0–v3 carry one transaction; v4 (sent by brokers, KIP-890) carries
//!   several, each answered on its own. A partition that does not exist is
//!   `UNKNOWN_TOPIC_OR_PARTITION` and the others of that transaction `OPERATION_NOT_ATTEMPTED`,
//!   as Kafka answers; nothing is added then.
//! - TxnOffsetCommit v3+ carries the consumer's group metadata (generation, member id, group
//!   instance id): a zombie consumer's offsets are refused as an OffsetCommit's would be (KIP-447).
//! - Clients before KIP-588 do not know `PRODUCER_FENCED`; they get `INVALID_PRODUCER_EPOCH`.
//! - DescribeTransactions (65) and ListTransactions (66, v0-v1) are for operators
//!   (`kafka-transactions.sh`).
//!
//! References: KIP-98, KIP-447, KIP-588, KIP-890; Kafka's `KafkaApis` handlers of these APIs.

use std::sync::Arc;

use kafka_protocol::ResponseError;
use kafka_protocol::messages::add_partitions_to_txn_request::AddPartitionsToTxnTopic;
use kafka_protocol::messages::add_partitions_to_txn_response::{
    AddPartitionsToTxnPartitionResult, AddPartitionsToTxnResult, AddPartitionsToTxnTopicResult,
};
use kafka_protocol::messages::txn_offset_commit_response::{
    TxnOffsetCommitResponsePartition, TxnOffsetCommitResponseTopic,
};
use kafka_protocol::messages::{
    AddOffsetsToTxnRequest, AddOffsetsToTxnResponse, AddPartitionsToTxnRequest,
    AddPartitionsToTxnResponse, DescribeTransactionsRequest, DescribeTransactionsResponse,
    EndTxnRequest, EndTxnResponse, ListTransactionsRequest, ListTransactionsResponse, ProducerId,
    ResponseKind, TopicName, TransactionalId, TxnOffsetCommitRequest, TxnOffsetCommitResponse,
    describe_transactions_response, list_transactions_response,
};
use kafka_protocol::protocol::StrBytes;

use super::Reply;
use crate::broker::BrokerState;
use crate::transactions::{PendingOffset, TxnError};

/// `PRODUCER_FENCED` as clients of `version` understand it (KIP-588).
fn compatible(code: ResponseError, version: i16) -> ResponseError {
    if code == ResponseError::ProducerFenced && version < 2 {
        ResponseError::InvalidProducerEpoch
    } else {
        code
    }
}

fn log_refusal(api: &str, transactional_id: &str, error: &TxnError) {
    tracing::info!(api, transactional_id, code = ?error.code, message = %error.message, "transaction request refused");
}

pub(crate) fn add_partitions(
    state: &BrokerState,
    request: AddPartitionsToTxnRequest,
    version: i16,
) -> AddPartitionsToTxnResponse {
    if version <= 3 {
        let results = add_one(
            state,
            &request.v3_and_below_transactional_id.0,
            request.v3_and_below_producer_id.0,
            request.v3_and_below_producer_epoch,
            &request.v3_and_below_topics,
            false,
            version,
        );
        return AddPartitionsToTxnResponse::default().with_results_by_topic_v3_and_below(results);
    }
    let results = request
        .transactions
        .iter()
        .map(|txn| {
            AddPartitionsToTxnResult::default()
                .with_transactional_id(txn.transactional_id.clone())
                .with_topic_results(add_one(
                    state,
                    &txn.transactional_id.0,
                    txn.producer_id.0,
                    txn.producer_epoch,
                    &txn.topics,
                    txn.verify_only,
                    version,
                ))
        })
        .collect();
    AddPartitionsToTxnResponse::default().with_results_by_transaction(results)
}

/// One transaction's partitions, answered per partition.
fn add_one(
    state: &BrokerState,
    transactional_id: &str,
    producer_id: i64,
    epoch: i16,
    topics: &[AddPartitionsToTxnTopic],
    verify_only: bool,
    version: i16,
) -> Vec<AddPartitionsToTxnTopicResult> {
    let exists = |topic: &str, partition: i32| {
        state
            .catalog
            .topic(topic)
            .is_some_and(|t| t.partition(partition).is_some())
    };
    let all_exist = topics
        .iter()
        .all(|t| t.partitions.iter().all(|p| exists(&t.name.0, *p)));
    let wanted: Vec<(String, i32)> = topics
        .iter()
        .flat_map(|t| t.partitions.iter().map(|p| (t.name.0.to_string(), *p)))
        .collect();
    let outcome: Result<(), ResponseError> = if !all_exist {
        Err(ResponseError::OperationNotAttempted)
    } else if verify_only {
        // KIP-890 verification: are these partitions in the open transaction already?
        let open = state.transactions.snapshot().into_iter().any(|(id, meta)| {
            id == transactional_id
                && meta.producer_id == producer_id
                && meta.epoch == epoch
                && meta.state == crate::transactions::TxnState::Ongoing
                && wanted.iter().all(|p| meta.partitions.contains(p))
        });
        if open {
            Ok(())
        } else {
            Err(ResponseError::InvalidTxnState)
        }
    } else {
        state
            .transactions
            .add_partitions(
                transactional_id,
                producer_id,
                epoch,
                &wanted,
                state.now_ms(),
            )
            .map_err(|e| {
                log_refusal("AddPartitionsToTxn", transactional_id, &e);
                compatible(e.code, version)
            })
    };
    topics
        .iter()
        .map(|t| {
            let partitions = t
                .partitions
                .iter()
                .map(|p| {
                    let code = match outcome {
                        Ok(()) => 0,
                        Err(ResponseError::OperationNotAttempted) if !exists(&t.name.0, *p) => {
                            ResponseError::UnknownTopicOrPartition.code()
                        }
                        Err(code) => code.code(),
                    };
                    AddPartitionsToTxnPartitionResult::default()
                        .with_partition_index(*p)
                        .with_partition_error_code(code)
                })
                .collect();
            AddPartitionsToTxnTopicResult::default()
                .with_name(t.name.clone())
                .with_results_by_partition(partitions)
        })
        .collect()
}

pub(crate) fn add_offsets(
    state: &BrokerState,
    request: AddOffsetsToTxnRequest,
    version: i16,
) -> AddOffsetsToTxnResponse {
    let transactional_id = request.transactional_id.0.as_str();
    let group = request.group_id.0.as_str();
    let outcome = if group.is_empty() {
        Err(TxnError {
            code: ResponseError::InvalidGroupId,
            message: "the group id is empty".into(),
        })
    } else {
        state.transactions.add_offsets(
            transactional_id,
            request.producer_id.0,
            request.producer_epoch,
            group,
            state.now_ms(),
        )
    };
    match outcome {
        Ok(()) => AddOffsetsToTxnResponse::default(),
        Err(e) => {
            log_refusal("AddOffsetsToTxn", transactional_id, &e);
            AddOffsetsToTxnResponse::default().with_error_code(compatible(e.code, version).code())
        }
    }
}

pub(crate) fn end_txn(state: &Arc<BrokerState>, request: EndTxnRequest, version: i16) -> Reply {
    let state = Arc::clone(state);
    Reply::Later(Box::pin(async move {
        let transactional_id = request.transactional_id.0.to_string();
        let outcome = state
            .transactions
            .end_transaction(
                &state,
                &transactional_id,
                request.producer_id.0,
                request.producer_epoch,
                request.committed,
            )
            .await;
        let response = EndTxnResponse::default()
            .with_producer_id(request.producer_id)
            .with_producer_epoch(request.producer_epoch);
        ResponseKind::EndTxn(match outcome {
            Ok(()) => response,
            Err(e) => {
                log_refusal("EndTxn", &transactional_id, &e);
                response.with_error_code(compatible(e.code, version).code())
            }
        })
    }))
}

pub(crate) fn txn_offset_commit(
    state: &BrokerState,
    request: TxnOffsetCommitRequest,
    version: i16,
) -> TxnOffsetCommitResponse {
    let transactional_id = request.transactional_id.0.as_str();
    let group = request.group_id.0.as_str();
    let max_metadata = state.groups.offset_metadata_max_bytes();
    let mut outcome: Result<(), ResponseError> = Ok(());
    if group.is_empty() {
        outcome = Err(ResponseError::InvalidGroupId);
    } else if version >= 3 {
        // KIP-447: a consumer that lost its partitions cannot commit through a transaction.
        outcome = state.groups.validate_commit(
            group,
            &request.member_id,
            request.group_instance_id.as_deref(),
            request.generation_id,
        );
    }
    let mut too_large = Vec::new();
    let mut offsets = Vec::new();
    for topic in &request.topics {
        for p in &topic.partitions {
            let metadata = p.committed_metadata.as_deref().unwrap_or_default();
            if metadata.len() > max_metadata {
                too_large.push((topic.name.0.to_string(), p.partition_index));
                continue;
            }
            offsets.push(PendingOffset {
                group: group.to_string(),
                topic: topic.name.0.to_string(),
                partition: p.partition_index,
                offset: p.committed_offset,
                leader_epoch: p.committed_leader_epoch,
                metadata: metadata.to_string(),
            });
        }
    }
    if outcome.is_ok() {
        outcome = state
            .transactions
            .commit_offsets(
                transactional_id,
                request.producer_id.0,
                request.producer_epoch,
                group,
                offsets,
                state.now_ms(),
            )
            .map_err(|e| {
                log_refusal("TxnOffsetCommit", transactional_id, &e);
                compatible(e.code, version)
            });
    }
    let topics = request
        .topics
        .iter()
        .map(|t| {
            let partitions = t
                .partitions
                .iter()
                .map(|p| {
                    let code = if too_large.contains(&(t.name.0.to_string(), p.partition_index)) {
                        ResponseError::OffsetMetadataTooLarge.code()
                    } else {
                        outcome.err().map_or(0, |code| code.code())
                    };
                    TxnOffsetCommitResponsePartition::default()
                        .with_partition_index(p.partition_index)
                        .with_error_code(code)
                })
                .collect();
            TxnOffsetCommitResponseTopic::default()
                .with_name(t.name.clone())
                .with_partitions(partitions)
        })
        .collect();
    TxnOffsetCommitResponse::default().with_topics(topics)
}

/// DescribeTransactions (65): each transactional id's state, producer, timeout, start time and
/// partitions (`kafka-transactions.sh describe`). An unknown id is
/// `TRANSACTIONAL_ID_NOT_FOUND`.
pub(crate) fn describe_transactions(
    state: &BrokerState,
    request: DescribeTransactionsRequest,
) -> DescribeTransactionsResponse {
    let known: std::collections::BTreeMap<String, crate::transactions::TxnMetadata> =
        state.transactions.snapshot().into_iter().collect();
    let states = request
        .transactional_ids
        .into_iter()
        .map(|id| {
            let Some(meta) = known.get(id.0.as_str()) else {
                return describe_transactions_response::TransactionState::default()
                    .with_transactional_id(id)
                    .with_error_code(ResponseError::TransactionalIdNotFound.code())
                    .with_transaction_state(StrBytes::from_static_str(""))
                    .with_producer_id(ProducerId(-1))
                    .with_producer_epoch(-1);
            };
            let mut topics: std::collections::BTreeMap<&str, Vec<i32>> = Default::default();
            for (topic, partition) in &meta.partitions {
                topics.entry(topic).or_default().push(*partition);
            }
            describe_transactions_response::TransactionState::default()
                .with_transactional_id(id)
                .with_transaction_state(StrBytes::from_static_str(meta.state.name()))
                .with_transaction_timeout_ms(meta.timeout_ms)
                .with_transaction_start_time_ms(meta.started_ms)
                .with_producer_id(ProducerId(meta.producer_id))
                .with_producer_epoch(meta.epoch)
                .with_topics(
                    topics
                        .into_iter()
                        .map(|(topic, partitions)| {
                            describe_transactions_response::TopicData::default()
                                .with_topic(TopicName(StrBytes::from_string(topic.to_string())))
                                .with_partitions(partitions)
                        })
                        .collect(),
                )
        })
        .collect();
    DescribeTransactionsResponse::default().with_transaction_states(states)
}

/// ListTransactions (66) v0-v1: every transactional id, filtered by state, producer id and
/// (v1) how long its transaction has been open (`kafka-transactions.sh list`, `find-hanging`).
/// Unknown state names are echoed back in `unknown_state_filters`, as Kafka does.
pub(crate) fn list_transactions(
    state: &BrokerState,
    request: ListTransactionsRequest,
) -> ListTransactionsResponse {
    const STATES: [&str; 6] = [
        "Empty",
        "Ongoing",
        "PrepareCommit",
        "PrepareAbort",
        "CompleteCommit",
        "CompleteAbort",
    ];
    let unknown: Vec<StrBytes> = request
        .state_filters
        .iter()
        .filter(|s| !STATES.contains(&s.as_str()))
        .cloned()
        .collect();
    let now = state.now_ms();
    let states = state
        .transactions
        .snapshot()
        .into_iter()
        .filter(|(_, meta)| {
            (request.state_filters.is_empty()
                || request
                    .state_filters
                    .iter()
                    .any(|s| s.as_str() == meta.state.name()))
                && (request.producer_id_filters.is_empty()
                    || request
                        .producer_id_filters
                        .iter()
                        .any(|p| p.0 == meta.producer_id))
                && (request.duration_filter < 0
                    || (meta.state == crate::transactions::TxnState::Ongoing
                        && now.saturating_sub(meta.started_ms) >= request.duration_filter))
        })
        .map(|(id, meta)| {
            list_transactions_response::TransactionState::default()
                .with_transactional_id(TransactionalId(StrBytes::from_string(id)))
                .with_producer_id(ProducerId(meta.producer_id))
                .with_transaction_state(StrBytes::from_static_str(meta.state.name()))
        })
        .collect();
    ListTransactionsResponse::default()
        .with_unknown_state_filters(unknown)
        .with_transaction_states(states)
}
