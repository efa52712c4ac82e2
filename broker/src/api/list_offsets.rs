//! ListOffsets (key 2): the earliest offset, the latest offset (the log end offset, i.e. the
//! high watermark on this single node), the offset for a timestamp, or the record with the
//! largest timestamp.
//!
//! Later versions add sentinels for tiered storage, which this broker does not have: the
//! earliest local offset (`-4`, v8) is the log start, and the latest tiered offset (`-5`, v9)
//! is none (`-1`), as Kafka answers for a topic that is not tiered. v10 adds a timeout, which
//! a single node never needs.
//!
//! With `isolation_level` 1 (`read_committed`) the latest offset is the last stable offset
//! (KIP-98), below which every transaction is decided.
//!
//! References: Kafka protocol guide (ListOffsets), KIP-98, KIP-79 (by timestamp), KIP-734 (max
//! timestamp), KIP-405 and KIP-1005 (the tiered-storage sentinels), KIP-1075 (timeout).

use kafka_protocol::ResponseError;
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::{ListOffsetsRequest, ListOffsetsResponse};

use crate::broker::BrokerState;

/// `timestamp` sentinels from the protocol.
const LATEST: i64 = -1;
const EARLIEST: i64 = -2;
const MAX_TIMESTAMP: i64 = -3;
const EARLIEST_LOCAL: i64 = -4;
const LATEST_TIERED: i64 = -5;

pub(crate) fn handle(
    state: &BrokerState,
    request: ListOffsetsRequest,
    version: i16,
) -> ListOffsetsResponse {
    let topics = request
        .topics
        .into_iter()
        .map(|wanted| {
            let topic = state.catalog.topic(&wanted.name);
            let partitions = wanted
                .partitions
                .iter()
                .map(|p| {
                    let mut response = ListOffsetsPartitionResponse::default()
                        .with_partition_index(p.partition_index)
                        .with_timestamp(-1)
                        .with_offset(-1);
                    let Some(partition) =
                        topic.as_ref().and_then(|t| t.partition(p.partition_index))
                    else {
                        return response
                            .with_error_code(ResponseError::UnknownTopicOrPartition.code());
                    };
                    if version >= 4 {
                        response = response.with_leader_epoch(0);
                    }
                    // read_committed (v2+): the latest offset is the last stable offset.
                    let lso =
                        (request.isolation_level == 1).then(|| partition.last_stable_offset());
                    let log = partition.log();
                    let found = match p.timestamp {
                        LATEST => Ok(Some((lso.unwrap_or(log.log_end_offset()), -1))),
                        EARLIEST => Ok(Some((log.log_start_offset(), -1))),
                        MAX_TIMESTAMP => log.max_timestamp().map_err(|e| e.code()),
                        EARLIEST_LOCAL if version >= 8 => Ok(Some((log.log_start_offset(), -1))),
                        LATEST_TIERED if version >= 9 => Ok(Some((-1, -1))),
                        timestamp if timestamp >= 0 => {
                            log.offset_for_timestamp(timestamp).map_err(|e| e.code())
                        }
                        _ => Err(ResponseError::UnsupportedVersion),
                    };
                    match found {
                        Ok(Some((offset, timestamp))) => {
                            response.with_offset(offset).with_timestamp(timestamp)
                        }
                        Ok(None) => response,
                        Err(code) => response.with_error_code(code.code()),
                    }
                })
                .collect();
            ListOffsetsTopicResponse::default()
                .with_name(wanted.name)
                .with_partitions(partitions)
        })
        .collect();
    ListOffsetsResponse::default().with_topics(topics)
}
