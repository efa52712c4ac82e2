//! Produce (key 0): validate and append one RecordBatch v2 per partition, then answer according
//! to `acks`.
//!
//! - `acks=0`: no response at all; the client does not read one. A failed append is only logged.
//! - `acks=1`: answered once the batch is written to the OS (page cache). A process crash loses
//!   nothing acknowledged; a machine crash or power loss can lose what was not yet flushed.
//! - `acks=-1` (all): answered only after the batch is fsynced (group commit, see
//!   [`crate::partition`]). Nothing acknowledged is lost on this node short of losing the disk.
//!
//! Batches with a producer id go through the idempotence check first ([`crate::partition`]):
//! a duplicate is answered with the original's offset, and under `acks=all` waits for the same
//! fsync as the original. A transactional batch must belong to the current epoch of a
//! transaction that has added its partition ([`crate::transactions`]).
//!
//! Appends happen in request order before the handler returns, so pipelined requests on one
//! connection land in the log in the order they were sent; only the wait for fsync overlaps.
//!
//! References: Kafka protocol guide (Produce), KIP-74/KIP-98 (RecordBatch v2), Kafka design
//! notes on acks.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use kafka_protocol::ResponseError;
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{ProduceRequest, ProduceResponse, ResponseKind};

use super::{Reply, message};
use crate::broker::BrokerState;
use crate::catalog::Topic;
use crate::log::batch::validate_produce_records_with;
use crate::partition::{AppendError, Appended, Partition};

/// Used when a Produce request carries no usable timeout (Kafka's `request.timeout.ms` default).
const DEFAULT_TIMEOUT_MS: u64 = 30_000;

/// An append that must be fsynced before `acks=all` may answer: (topic index, partition
/// index in the response, partition, end offset).
type Awaiting = (usize, usize, Arc<Partition>, i64);

pub(crate) fn handle(state: &Arc<BrokerState>, request: ProduceRequest, version: i16) -> Reply {
    let acks = request.acks;
    let transactional_id = request.transactional_id.as_ref().map(|id| id.0.to_string());
    let now_ms = state.now_ms();
    let mut awaiting: Vec<Awaiting> = Vec::new();
    let mut responses = Vec::with_capacity(request.topic_data.len());
    for (topic_slot, topic_data) in request.topic_data.into_iter().enumerate() {
        let topic = resolve_topic(state, &topic_data.name);
        let mut partition_responses = Vec::with_capacity(topic_data.partition_data.len());
        for (partition_slot, data) in topic_data.partition_data.into_iter().enumerate() {
            let mut response = PartitionProduceResponse::default()
                .with_index(data.index)
                .with_base_offset(-1)
                .with_log_append_time_ms(-1)
                .with_log_start_offset(-1);
            let outcome = append_one(
                state,
                transactional_id.as_deref(),
                &topic,
                data.index,
                data.records.as_ref(),
                acks,
                now_ms,
            );
            match outcome {
                Ok((partition, appended)) => {
                    // A duplicate is answered NONE with the original's offset and timestamp,
                    // never DUPLICATE_SEQUENCE_NUMBER: clients count that as a failure or lose
                    // the offset (docs/idempotence.md "Answering a duplicate").
                    let (base_offset, log_append_time_ms) = match appended {
                        Appended::New(info) => (info.base_offset, info.log_append_time_ms),
                        Appended::Duplicate(original) => {
                            (original.base_offset, original.log_append_time_ms)
                        }
                    };
                    response = response
                        .with_base_offset(base_offset)
                        .with_log_append_time_ms(log_append_time_ms)
                        .with_log_start_offset(partition.log().log_start_offset());
                    if acks == -1 {
                        awaiting.push((
                            topic_slot,
                            partition_slot,
                            Arc::clone(&partition),
                            appended.end_offset(),
                        ));
                    }
                }
                Err((code, text)) => {
                    tracing::debug!(topic = %topic_data.name.as_str(), partition = data.index, error = ?code, %text, "produce refused");
                    if acks == 0 {
                        tracing::warn!(topic = %topic_data.name.as_str(), partition = data.index, error = ?code, %text, "acks=0 produce failed; the client is not told");
                    }
                    response = response.with_error_code(code.code());
                    if version >= 8 {
                        response = response.with_error_message(message(text));
                    }
                }
            }
            partition_responses.push(response);
        }
        responses.push(
            TopicProduceResponse::default()
                .with_name(topic_data.name)
                .with_partition_responses(partition_responses),
        );
    }
    let response = ProduceResponse::default().with_responses(responses);
    match acks {
        0 => Reply::Nothing,
        -1 if !awaiting.is_empty() => {
            // Kafka clients send `request.timeout.ms` here; a client sending 0 still gets an
            // answer based on the fsync rather than an instant timeout.
            let timeout_ms = u64::try_from(request.timeout_ms).unwrap_or(0);
            let timeout = Duration::from_millis(if timeout_ms == 0 {
                DEFAULT_TIMEOUT_MS
            } else {
                timeout_ms
            });
            Reply::Later(Box::pin(wait_durable(response, awaiting, timeout)))
        }
        _ => Reply::Now(Box::new(ResponseKind::Produce(response))),
    }
}

fn resolve_topic(state: &BrokerState, name: &str) -> Result<Arc<Topic>, (ResponseError, String)> {
    if let Some(topic) = state.catalog.topic(name) {
        return Ok(topic);
    }
    if !state.config.auto_create_topics {
        return Err((
            ResponseError::UnknownTopicOrPartition,
            format!("This server does not host topic '{name}'."),
        ));
    }
    let created = crate::blocking::may_block(|| {
        state.catalog.create_topic(
            name,
            state.config.num_partitions,
            Default::default(),
            false,
            state.now_ms(),
        )
    });
    match created {
        Ok(topic) => Ok(topic),
        Err(e) if e.code == ResponseError::TopicAlreadyExists => state
            .catalog
            .topic(name)
            .ok_or((ResponseError::LeaderNotAvailable, e.message)),
        Err(e) => Err((e.code, e.message)),
    }
}

fn append_one(
    state: &BrokerState,
    transactional_id: Option<&str>,
    topic: &Result<Arc<Topic>, (ResponseError, String)>,
    index: i32,
    records: Option<&Bytes>,
    acks: i16,
    now_ms: i64,
) -> Result<(Arc<Partition>, Appended), (ResponseError, String)> {
    let topic = topic.as_ref().map_err(Clone::clone)?;
    if !matches!(acks, -1..=1) {
        return Err((
            ResponseError::InvalidRequiredAcks,
            format!("acks must be -1, 0 or 1, not {acks}"),
        ));
    }
    let partition = topic.partition(index).ok_or_else(|| {
        (
            ResponseError::UnknownTopicOrPartition,
            format!("Topic '{}' has no partition {index}.", topic.name),
        )
    })?;
    let empty = Bytes::new();
    let records = records.unwrap_or(&empty);
    // A topic with a dedup window has the ids read while the records are checked.
    let config = &topic.log_config;
    let dedup_header = (config.dedup_window_ms > 0).then_some(config.dedup_header.as_str());
    let batch = validate_produce_records_with(records, config.max_message_bytes, dedup_header)
        .map_err(|e| (e.code(), e.to_string()))?;
    // As Kafka: a transactional batch comes with the request's transactional id, which must
    // be the one its producer id belongs to.
    let verify = |header: &crate::log::BatchHeader| match transactional_id {
        None => Err(AppendError::TransactionalIdMissing {
            producer_id: header.producer_id,
        }),
        Some(id) => state.transactions.verify(header, id, &topic.name, index),
    };
    let appended = partition.append_verified(&batch, now_ms, &verify).map_err(|e| {
        if matches!(e, AppendError::Log(_)) {
            tracing::error!(topic = %topic.name, partition = index, error = %e, "append failed");
        }
        (e.code(), e.to_string())
    })?;
    Ok((Arc::clone(partition), appended))
}

async fn wait_durable(
    mut response: ProduceResponse,
    awaiting: Vec<Awaiting>,
    timeout: Duration,
) -> ResponseKind {
    let deadline = tokio::time::Instant::now() + timeout;
    for (topic_slot, partition_slot, partition, end_offset) in awaiting {
        let outcome = tokio::time::timeout_at(deadline, partition.wait_durable(end_offset)).await;
        let error = match outcome {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => {
                tracing::error!(topic = %partition.topic, partition = partition.index, error = %e, "fsync failed; acks=all produce not acknowledged");
                ResponseError::KafkaStorageError
            }
            Err(_) => ResponseError::RequestTimedOut,
        };
        if let Some(entry) = response
            .responses
            .get_mut(topic_slot)
            .and_then(|t| t.partition_responses.get_mut(partition_slot))
        {
            entry.error_code = error.code();
            entry.base_offset = -1;
        }
    }
    ResponseKind::Produce(response)
}
