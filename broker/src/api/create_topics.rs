//! CreateTopics (key 19). Replication factor must be 1 (or -1 for the default): this is one
//! node. Manual replica assignments are accepted when every replica is this node.
//!
//! References: Kafka protocol guide (CreateTopics), KIP-464 (defaults via -1), KIP-525
//! (configs in the response, v5+), KIP-516 (topic id, v7+).

use std::collections::{BTreeMap, HashSet};

use kafka_protocol::ResponseError;
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::create_topics_response::{
    CreatableTopicConfigs, CreatableTopicResult,
};
use kafka_protocol::messages::{CreateTopicsRequest, CreateTopicsResponse};
use kafka_protocol::protocol::StrBytes;

use super::message;
use crate::broker::BrokerState;
use crate::catalog::config::{TOPIC_CONFIG_KEYS, effective_value};

/// DescribeConfigs/CreateTopics `config_source` values.
pub(crate) const SOURCE_TOPIC_CONFIG: i8 = 1;
pub(crate) const SOURCE_DEFAULT_CONFIG: i8 = 5;

pub(crate) fn handle(
    state: &BrokerState,
    request: CreateTopicsRequest,
    version: i16,
) -> CreateTopicsResponse {
    let mut seen = HashSet::new();
    let duplicates: HashSet<_> = request
        .topics
        .iter()
        .filter(|t| !seen.insert(t.name.clone()))
        .map(|t| t.name.clone())
        .collect();
    let topics = request
        .topics
        .into_iter()
        .map(|wanted| {
            let name = wanted.name.clone();
            let outcome = if duplicates.contains(&name) {
                Err((
                    ResponseError::InvalidRequest,
                    format!(
                        "Topic '{}' appears more than once in the request.",
                        name.as_str()
                    ),
                ))
            } else {
                create(state, wanted, request.validate_only)
            };
            let mut result = CreatableTopicResult::default().with_name(name);
            match outcome {
                Ok(created) => {
                    if version >= 5 {
                        result = result
                            .with_num_partitions(created.partitions)
                            .with_replication_factor(1)
                            .with_configs(Some(created.configs));
                    }
                    if version >= 7 {
                        result = result.with_topic_id(created.id);
                    }
                }
                Err((code, text)) => {
                    result = result
                        .with_error_code(code.code())
                        .with_error_message(message(text))
                        .with_num_partitions(-1)
                        .with_replication_factor(-1);
                }
            }
            result
        })
        .collect();
    CreateTopicsResponse::default().with_topics(topics)
}

struct Created {
    id: uuid::Uuid,
    partitions: i32,
    configs: Vec<CreatableTopicConfigs>,
}

fn create(
    state: &BrokerState,
    wanted: CreatableTopic,
    validate_only: bool,
) -> Result<Created, (ResponseError, String)> {
    let node = state.config.node_id;
    let mut partitions = if wanted.num_partitions == -1 {
        state.config.num_partitions
    } else {
        wanted.num_partitions
    };
    if !matches!(wanted.replication_factor, -1 | 1) {
        return Err((
            ResponseError::InvalidReplicationFactor,
            format!(
                "Replication factor: {} larger than available brokers: 1.",
                wanted.replication_factor
            ),
        ));
    }
    if !wanted.assignments.is_empty() {
        if wanted.num_partitions != -1 || wanted.replication_factor != -1 {
            return Err((
                ResponseError::InvalidRequest,
                "Both numPartitions or replicationFactor and replicasAssignments were set. Both cannot be used at the same time.".to_string(),
            ));
        }
        for (expected, assignment) in wanted.assignments.iter().enumerate() {
            if usize::try_from(assignment.partition_index).ok() != Some(expected) {
                return Err((
                    ResponseError::InvalidReplicaAssignment,
                    "Partitions in the assignment must be numbered 0, 1, 2, ... in order."
                        .to_string(),
                ));
            }
            if assignment.broker_ids.len() != 1 || assignment.broker_ids[0].0 != node {
                return Err((
                    ResponseError::InvalidReplicaAssignment,
                    format!("Every partition must have exactly one replica, on broker {node}."),
                ));
            }
        }
        partitions = i32::try_from(wanted.assignments.len()).unwrap_or(i32::MAX);
    }
    let mut overrides = BTreeMap::new();
    for config in wanted.configs {
        if let Some(value) = config.value {
            overrides.insert(config.name.to_string(), value.to_string());
        }
    }
    let topic = state
        .catalog
        .create_topic(
            &wanted.name,
            partitions,
            overrides,
            validate_only,
            state.now_ms(),
        )
        .map_err(|e| (e.code, e.message))?;
    let configs = TOPIC_CONFIG_KEYS
        .iter()
        .filter_map(|key| {
            let value = effective_value(key.name, &topic.log_config)?;
            let source = if topic.configs.contains_key(key.name) {
                SOURCE_TOPIC_CONFIG
            } else {
                SOURCE_DEFAULT_CONFIG
            };
            Some(
                CreatableTopicConfigs::default()
                    .with_name(StrBytes::from_static_str(key.name))
                    .with_value(Some(StrBytes::from_string(value)))
                    .with_config_source(source),
            )
        })
        .collect();
    Ok(Created {
        id: topic.id,
        partitions,
        configs,
    })
}
