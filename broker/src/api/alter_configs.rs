//! AlterConfigs (key 33) and IncrementalAlterConfigs (key 44): change a topic's config
//! overrides after creation, as `kafka-configs --alter` does (Kafka 4's tool uses the
//! incremental form: SET and DELETE of single keys; AlterConfigs replaces the whole set).
//!
//! Only topics can be altered. Broker settings are start-up flags here, so a BROKER resource
//! is refused with `INVALID_REQUEST` and a message saying so. APPEND and SUBTRACT apply to list
//! configs, and the only list config a topic has, `cleanup.policy`, has one possible value:
//! they are refused with `INVALID_CONFIG`. Each resource is answered on its own.
//!
//! References: Kafka protocol guide (AlterConfigs, IncrementalAlterConfigs), KIP-339.

use std::collections::BTreeMap;

use kafka_protocol::ResponseError;
use kafka_protocol::messages::{
    AlterConfigsRequest, AlterConfigsResponse, IncrementalAlterConfigsRequest,
    IncrementalAlterConfigsResponse, alter_configs_response, incremental_alter_configs_response,
};
use kafka_protocol::protocol::StrBytes;

use super::message;
use crate::broker::BrokerState;

const RESOURCE_TOPIC: i8 = 2;
const SET: i8 = 0;
const DELETE: i8 = 1;

/// What altering one resource came to: `None` or an error code with its message.
type Outcome = Option<(ResponseError, String)>;

pub(crate) fn handle_incremental(
    state: &BrokerState,
    request: IncrementalAlterConfigsRequest,
) -> IncrementalAlterConfigsResponse {
    let responses = request
        .resources
        .into_iter()
        .map(|resource| {
            let outcome = alter(
                state,
                resource.resource_type,
                resource.resource_name.as_str(),
                request.validate_only,
                |current| {
                    let mut configs = current.clone();
                    for change in &resource.configs {
                        let name = change.name.to_string();
                        match (change.config_operation, &change.value) {
                            (SET, Some(value)) => {
                                configs.insert(name, value.to_string());
                            }
                            (SET, None) => {
                                return Err((
                                    ResponseError::InvalidConfig,
                                    format!("SET of {name} needs a value"),
                                ));
                            }
                            (DELETE, _) => {
                                configs.remove(&name);
                            }
                            (operation, _) => {
                                return Err((
                                    ResponseError::InvalidConfig,
                                    format!(
                                        "operation {operation} (APPEND or SUBTRACT) on {name}: no topic config here is a list that can take it"
                                    ),
                                ));
                            }
                        }
                    }
                    Ok(configs)
                },
            );
            let (code, text) = split(outcome);
            incremental_alter_configs_response::AlterConfigsResourceResponse::default()
                .with_error_code(code)
                .with_error_message(text)
                .with_resource_type(resource.resource_type)
                .with_resource_name(resource.resource_name)
        })
        .collect();
    IncrementalAlterConfigsResponse::default().with_responses(responses)
}

pub(crate) fn handle_legacy(
    state: &BrokerState,
    request: AlterConfigsRequest,
) -> AlterConfigsResponse {
    let responses = request
        .resources
        .into_iter()
        .map(|resource| {
            let outcome = alter(
                state,
                resource.resource_type,
                resource.resource_name.as_str(),
                request.validate_only,
                |_| {
                    Ok(resource
                        .configs
                        .iter()
                        .filter_map(|c| {
                            c.value
                                .as_ref()
                                .map(|v| (c.name.to_string(), v.to_string()))
                        })
                        .collect())
                },
            );
            let (code, text) = split(outcome);
            alter_configs_response::AlterConfigsResourceResponse::default()
                .with_error_code(code)
                .with_error_message(text)
                .with_resource_type(resource.resource_type)
                .with_resource_name(resource.resource_name)
        })
        .collect();
    AlterConfigsResponse::default().with_responses(responses)
}

fn split(outcome: Outcome) -> (i16, Option<StrBytes>) {
    match outcome {
        None => (0, None),
        Some((code, text)) => (code.code(), message(text)),
    }
}

/// Computes a topic's new overrides from its current ones and applies them.
fn alter(
    state: &BrokerState,
    resource_type: i8,
    name: &str,
    validate_only: bool,
    change: impl FnOnce(
        &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, (ResponseError, String)>,
) -> Outcome {
    if resource_type != RESOURCE_TOPIC {
        return Some((
            ResponseError::InvalidRequest,
            format!(
                "resource type {resource_type} cannot be altered: only topics (2) can; broker settings are semel-broker's start-up flags"
            ),
        ));
    }
    let Some(topic) = state.catalog.topic(name) else {
        return Some((
            ResponseError::UnknownTopicOrPartition,
            format!("This server does not host topic '{name}'."),
        ));
    };
    let configs = match change(&topic.configs) {
        Ok(configs) => configs,
        Err(refused) => return Some(refused),
    };
    match state
        .catalog
        .alter_topic_configs(name, configs, validate_only)
    {
        Ok(()) => None,
        Err(e) => Some((e.code, e.message)),
    }
}
