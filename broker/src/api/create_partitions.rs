//! CreatePartitions (key 37): grow a topic. Clients notice the new partitions through
//! Metadata; consumer groups rebalance when their leader sees them.
//!
//! References: Kafka protocol guide (CreatePartitions), KIP-195.

use kafka_protocol::ResponseError;
use kafka_protocol::messages::create_partitions_response::CreatePartitionsTopicResult;
use kafka_protocol::messages::{CreatePartitionsRequest, CreatePartitionsResponse};

use super::message;
use crate::broker::BrokerState;

pub(crate) fn handle(
    state: &BrokerState,
    request: CreatePartitionsRequest,
) -> CreatePartitionsResponse {
    let node = state.config.node_id;
    let results = request
        .topics
        .into_iter()
        .map(|wanted| {
            let result = CreatePartitionsTopicResult::default().with_name(wanted.name.clone());
            let assignments_ok = wanted.assignments.as_ref().is_none_or(|assignments| {
                assignments
                    .iter()
                    .all(|a| a.broker_ids.len() == 1 && a.broker_ids[0].0 == node)
            });
            if !assignments_ok {
                return result
                    .with_error_code(ResponseError::InvalidReplicaAssignment.code())
                    .with_error_message(message(format!(
                        "Every new partition must have exactly one replica, on broker {node}."
                    )));
            }
            match state.catalog.create_partitions(
                &wanted.name,
                wanted.count,
                request.validate_only,
                state.now_ms(),
            ) {
                Ok(()) => result,
                Err(e) => result
                    .with_error_code(e.code.code())
                    .with_error_message(message(e.message)),
            }
        })
        .collect();
    CreatePartitionsResponse::default().with_results(results)
}
