//! Fetch (key 1): whole stored batches from the batch that contains each fetch offset.
//!
//! Limits: `partition_max_bytes` per partition and `max_bytes` for the response (at most the
//! broker's `fetch.max.bytes`), except that
//! the first partition with data always returns at least one whole batch, however large, so a
//! consumer always makes progress (KIP-74). `max_wait_ms` with `min_bytes` is a long poll: the
//! response goes out as soon as `min_bytes` are available, or when the wait ends. Fetch sessions
//! (KIP-227) are not implemented: the response carries session id 0, which tells clients to keep
//! sending full fetch requests.
//!
//! `isolation_level` 1 (`read_committed`) reads only below each partition's last stable offset
//! and returns the aborted transactions the data overlaps, which clients use to drop aborted
//! records ([`crate::transactions::partition`]). Every fetch reports the LSO.
//!
//! References: Kafka protocol guide (Fetch), KIP-74, KIP-98, KIP-227.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::ResponseError;
use kafka_protocol::messages::fetch_request::FetchTopic;
use kafka_protocol::messages::fetch_response::{
    AbortedTransaction, FetchableTopicResponse, PartitionData,
};
use kafka_protocol::messages::{FetchRequest, FetchResponse, ProducerId, ResponseKind};

use super::Reply;
use crate::broker::BrokerState;
use crate::catalog::Topic;

/// The request's topics, resolved once.
struct Plan {
    topics: Vec<(FetchTopic, Option<Arc<Topic>>)>,
    max_bytes: usize,
    /// `isolation_level` 1: only below the last stable offset, with the aborted transactions.
    read_committed: bool,
}

/// What one pass over the plan produced.
struct Pass {
    response: FetchResponse,
    bytes: usize,
    has_error: bool,
}

pub(crate) fn handle(state: &Arc<BrokerState>, request: FetchRequest, version: i16) -> Reply {
    let _ = version;
    // Subscribe before reading, so an append between the read and the wait is not missed.
    let mut appended = state.appended.subscribe();
    appended.borrow_and_update();
    let plan = Plan {
        topics: request
            .topics
            .into_iter()
            .map(|t| {
                let topic = state.catalog.topic(&t.topic);
                (t, topic)
            })
            .collect(),
        // The broker's cap wins over the request's: a client asking for i32::MAX bytes on a
        // large partition must not make the broker buffer gigabytes for one response.
        max_bytes: usize::try_from(request.max_bytes)
            .unwrap_or(0)
            .min(state.config.fetch_max_bytes),
        read_committed: request.isolation_level == 1,
    };
    let min_bytes = usize::try_from(request.min_bytes).unwrap_or(0);
    let first = run(&plan);
    let max_wait_ms = u64::try_from(request.max_wait_ms).unwrap_or(0);
    if first.has_error
        || first.bytes >= min_bytes.max(1)
        || max_wait_ms == 0
        || plan.topics.is_empty()
    {
        return Reply::Now(Box::new(ResponseKind::Fetch(first.response)));
    }
    Reply::Later(Box::pin(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(max_wait_ms);
        loop {
            tokio::select! {
                changed = appended.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => break,
            }
            let pass = run(&plan);
            if pass.has_error || pass.bytes >= min_bytes.max(1) {
                return ResponseKind::Fetch(pass.response);
            }
        }
        ResponseKind::Fetch(run(&plan).response)
    }))
}

fn run(plan: &Plan) -> Pass {
    let mut bytes = 0usize;
    let mut has_error = false;
    let mut responses = Vec::with_capacity(plan.topics.len());
    for (wanted, topic) in &plan.topics {
        let mut partitions = Vec::with_capacity(wanted.partitions.len());
        for p in &wanted.partitions {
            let mut data = PartitionData::default()
                .with_partition_index(p.partition)
                .with_high_watermark(-1)
                .with_last_stable_offset(-1)
                .with_log_start_offset(-1)
                .with_records(Some(Bytes::new()));
            let partition = topic.as_ref().and_then(|t| t.partition(p.partition));
            let Some(partition) = partition else {
                has_error = true;
                partitions
                    .push(data.with_error_code(ResponseError::UnknownTopicOrPartition.code()));
                continue;
            };
            let remaining = plan.max_bytes.saturating_sub(bytes);
            let limit = usize::try_from(p.partition_max_bytes)
                .unwrap_or(0)
                .min(remaining);
            let outcome = if plan.read_committed {
                partition
                    .read_committed(p.fetch_offset, limit)
                    .map(|(read, lso, aborted)| {
                        let aborted = aborted
                            .into_iter()
                            .map(|a| {
                                AbortedTransaction::default()
                                    .with_producer_id(ProducerId(a.producer_id))
                                    .with_first_offset(a.first_offset)
                            })
                            .collect::<Vec<_>>();
                        (read, lso, Some(aborted))
                    })
            } else {
                let lso = partition.last_stable_offset();
                partition
                    .log()
                    .read(p.fetch_offset, limit)
                    .map(|read| (read, lso, None))
            };
            {
                let log = partition.log();
                data = data
                    .with_high_watermark(log.log_end_offset())
                    .with_last_stable_offset(log.log_end_offset())
                    .with_log_start_offset(log.log_start_offset());
            }
            match outcome {
                Ok((read, lso, aborted)) => {
                    // Past the first data in the response, a batch that does not fit waits for
                    // the next fetch (KIP-74 only guarantees progress, not overflow everywhere).
                    let fits = bytes == 0 || read.records.len() <= limit;
                    if fits && !read.records.is_empty() {
                        bytes += read.records.len();
                        data = data.with_records(Some(read.records));
                    }
                    data = data
                        .with_high_watermark(read.high_watermark)
                        .with_last_stable_offset(lso)
                        .with_log_start_offset(read.log_start_offset)
                        .with_aborted_transactions(aborted);
                }
                Err(e) => {
                    has_error = true;
                    tracing::debug!(topic = %partition.topic, partition = partition.index, offset = p.fetch_offset, error = %e, "fetch refused");
                    data = data.with_error_code(e.code().code());
                }
            }
            partitions.push(data);
        }
        responses.push(
            FetchableTopicResponse::default()
                .with_topic(wanted.topic.clone())
                .with_partitions(partitions),
        );
    }
    Pass {
        response: FetchResponse::default().with_responses(responses),
        bytes,
        has_error,
    }
}
