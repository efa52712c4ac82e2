//! DeleteRecords (key 21): moves a partition's log start offset up to the requested offset
//! (the high watermark for -1), as `kafka-delete-records.sh` and `Admin.deleteRecords` ask.
//! The new start is checkpointed (fsynced) before the answer, so a restart keeps it; whole
//! segments below it are deleted at once, and a segment it falls inside stays on disk but is
//! no longer read (fetches below the start get `OFFSET_OUT_OF_RANGE`, ListOffsets earliest
//! answers the start). An offset at or below the start changes nothing and is answered with
//! the start; one past the high watermark gets `OFFSET_OUT_OF_RANGE`.
//!
//! References: KIP-107 (DeleteRecords).

use kafka_protocol::ResponseError;
use kafka_protocol::messages::delete_records_response::{
    DeleteRecordsPartitionResult, DeleteRecordsTopicResult,
};
use kafka_protocol::messages::{DeleteRecordsRequest, DeleteRecordsResponse};

use crate::broker::BrokerState;

pub(crate) fn handle(state: &BrokerState, request: DeleteRecordsRequest) -> DeleteRecordsResponse {
    let topics = request
        .topics
        .into_iter()
        .map(|requested| {
            let topic = state.catalog.topic(&requested.name);
            let partitions = requested
                .partitions
                .into_iter()
                .map(|asked| {
                    let result = DeleteRecordsPartitionResult::default()
                        .with_partition_index(asked.partition_index)
                        .with_low_watermark(-1);
                    let Some(partition) = topic
                        .as_ref()
                        .and_then(|t| t.partition(asked.partition_index))
                    else {
                        return result
                            .with_error_code(ResponseError::UnknownTopicOrPartition.code());
                    };
                    match partition.delete_records(asked.offset) {
                        Ok(start) => {
                            tracing::info!(topic = %partition.topic, partition = partition.index, log_start_offset = start, "records deleted (DeleteRecords)");
                            result.with_low_watermark(start)
                        }
                        Err(e) => {
                            tracing::debug!(topic = %partition.topic, partition = partition.index, offset = asked.offset, error = %e, "DeleteRecords refused");
                            result.with_error_code(e.code().code())
                        }
                    }
                })
                .collect();
            DeleteRecordsTopicResult::default()
                .with_name(requested.name)
                .with_partitions(partitions)
        })
        .collect();
    DeleteRecordsResponse::default().with_topics(topics)
}
