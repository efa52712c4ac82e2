//! DescribeProducers (key 61): the producers each partition remembers, with their epoch, last
//! sequence and last write time, so a user (`kafka-transactions.sh describe-producers`, or any
//! admin client) can see the state behind duplicate detection.
//!
//! `last_timestamp` is the broker's clock at the producer's last append to the partition (what
//! expiry counts from). There are no transactions yet, so `coordinator_epoch` and
//! `current_txn_start_offset` are -1.
//!
//! References: KIP-664 (DescribeProducers).

use kafka_protocol::ResponseError;
use kafka_protocol::messages::describe_producers_response::{
    PartitionResponse, ProducerState, TopicResponse,
};
use kafka_protocol::messages::{DescribeProducersRequest, DescribeProducersResponse, ProducerId};

use super::message;
use crate::broker::BrokerState;

pub(crate) fn handle(
    state: &BrokerState,
    request: DescribeProducersRequest,
) -> DescribeProducersResponse {
    let topics = request
        .topics
        .into_iter()
        .map(|requested| {
            let topic = state.catalog.topic(&requested.name);
            let partitions = requested
                .partition_indexes
                .into_iter()
                .map(|index| {
                    let response = PartitionResponse::default().with_partition_index(index);
                    let Some(partition) = topic.as_ref().and_then(|t| t.partition(index)) else {
                        return response
                            .with_error_code(ResponseError::UnknownTopicOrPartition.code())
                            .with_error_message(message(format!(
                                "This server does not host partition {}-{index}.",
                                requested.name.as_str()
                            )));
                    };
                    response.with_active_producers(
                        partition
                            .producer_views()
                            .into_iter()
                            .map(|view| {
                                ProducerState::default()
                                    .with_producer_id(ProducerId(view.producer_id))
                                    .with_producer_epoch(i32::from(view.epoch))
                                    .with_last_sequence(view.last_sequence)
                                    .with_last_timestamp(view.last_timestamp_ms)
                                    .with_coordinator_epoch(-1)
                                    .with_current_txn_start_offset(-1)
                            })
                            .collect(),
                    )
                })
                .collect();
            TopicResponse::default()
                .with_name(requested.name)
                .with_partitions(partitions)
        })
        .collect();
    DescribeProducersResponse::default().with_topics(topics)
}
