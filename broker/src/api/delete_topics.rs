//! DeleteTopics (key 20): by name (v1-v5 `topic_names`, v6 `topics`) or by topic id (v6).
//!
//! References: Kafka protocol guide (DeleteTopics), KIP-516.

use kafka_protocol::ResponseError;
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::{DeleteTopicsRequest, DeleteTopicsResponse, TopicName};
use kafka_protocol::protocol::StrBytes;
use uuid::Uuid;

use super::message;
use crate::broker::BrokerState;

/// Deletes the topics; returns the response and the names of the topics deleted (whose
/// committed offsets the caller then deletes: [`crate::group::GroupCoordinator::forget_topic`]).
pub(crate) fn handle(
    state: &BrokerState,
    request: DeleteTopicsRequest,
    version: i16,
) -> (DeleteTopicsResponse, Vec<String>) {
    let mut deleted = Vec::new();
    let wanted: Vec<(Option<TopicName>, Uuid)> = if version >= 6 {
        request
            .topics
            .into_iter()
            .map(|t| (t.name, t.topic_id))
            .collect()
    } else {
        request
            .topic_names
            .into_iter()
            .map(|name| (Some(name), Uuid::nil()))
            .collect()
    };
    let responses = wanted
        .into_iter()
        .map(|(name, id)| {
            let topic = match &name {
                Some(name) => state.catalog.topic(name),
                None => state.catalog.topic_by_id(id),
            };
            let mut result = DeletableTopicResult::default()
                .with_name(name.clone())
                .with_topic_id(id);
            let Some(topic) = topic else {
                let code = if name.is_some() {
                    ResponseError::UnknownTopicOrPartition
                } else {
                    ResponseError::UnknownTopicId
                };
                return result
                    .with_error_code(code.code())
                    .with_error_message(message("This server does not host this topic."));
            };
            if version >= 6 {
                result = result
                    .with_name(Some(TopicName(StrBytes::from_string(topic.name.clone()))))
                    .with_topic_id(topic.id);
            }
            match state.catalog.delete_topic(&topic.name) {
                Ok(_) => {
                    deleted.push(topic.name.clone());
                    result
                }
                Err(e) => result
                    .with_error_code(e.code.code())
                    .with_error_message(message(e.message)),
            }
        })
        .collect();
    (
        DeleteTopicsResponse::default().with_responses(responses),
        deleted,
    )
}
