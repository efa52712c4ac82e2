//! DescribeConfigs (key 32): effective topic configs (overrides and defaults) and the broker
//! settings clients and tools commonly ask for.
//!
//! References: Kafka protocol guide (DescribeConfigs), KIP-133, KIP-226 (synonyms), KIP-569
//! (config types and documentation, v3+).

use kafka_protocol::ResponseError;
use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResult, DescribeConfigsSynonym,
};
use kafka_protocol::messages::{DescribeConfigsRequest, DescribeConfigsResponse};
use kafka_protocol::protocol::StrBytes;

use super::create_topics::{SOURCE_DEFAULT_CONFIG, SOURCE_TOPIC_CONFIG};
use super::message;
use crate::broker::BrokerState;
use crate::catalog::config::{TOPIC_CONFIG_KEYS, effective_value};

const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_BROKER: i8 = 4;
const RESOURCE_BROKER_LOGGER: i8 = 8;
const RESOURCE_GROUP: i8 = 32;
/// `config_source` for a broker's static (start-up) setting.
const SOURCE_STATIC_BROKER_CONFIG: i8 = 4;
/// `config_type` values (v3+).
const TYPE_BOOLEAN: i8 = 1;
const TYPE_STRING: i8 = 2;
const TYPE_INT: i8 = 3;
const TYPE_LONG: i8 = 5;

/// One config entry before it is filtered and encoded.
struct Entry {
    name: &'static str,
    value: String,
    source: i8,
    config_type: i8,
    documentation: &'static str,
    /// Synonyms, most specific first: (name, value, source).
    synonyms: Vec<(&'static str, String, i8)>,
}

pub(crate) fn handle(
    state: &BrokerState,
    request: DescribeConfigsRequest,
    version: i16,
) -> DescribeConfigsResponse {
    let results = request
        .resources
        .into_iter()
        .map(|resource| {
            let result = DescribeConfigsResult::default()
                .with_resource_type(resource.resource_type)
                .with_resource_name(resource.resource_name.clone());
            let entries = match resource.resource_type {
                RESOURCE_TOPIC => topic_entries(state, resource.resource_name.as_str()),
                RESOURCE_BROKER => broker_entries(state, resource.resource_name.as_str()),
                other => Err((ResponseError::InvalidRequest, unsupported(other))),
            };
            let entries = match entries {
                Ok(entries) => entries,
                Err((code, text)) => {
                    return result
                        .with_error_code(code.code())
                        .with_error_message(message(text));
                }
            };
            // Null or empty asks for every config.
            let wanted = resource
                .configuration_keys
                .as_ref()
                .filter(|keys| !keys.is_empty());
            let configs = entries
                .into_iter()
                .filter(|e| wanted.is_none_or(|keys| keys.iter().any(|k| k.as_str() == e.name)))
                .map(|e| {
                    encode(
                        e,
                        version,
                        request.include_synonyms,
                        request.include_documentation,
                    )
                })
                .collect();
            result.with_configs(configs)
        })
        .collect();
    DescribeConfigsResponse::default().with_results(results)
}

/// Why a resource type has no configs here, in words a `kafka-configs` user can act on.
fn unsupported(resource_type: i8) -> String {
    match resource_type {
        RESOURCE_BROKER_LOGGER => {
            "Broker loggers (8) are not served: semel-broker's log filter is \
             its --log-level start-up setting."
                .to_string()
        }
        RESOURCE_GROUP => "Group configs (32) are not served: semel-broker runs classic groups \
             (KIP-848's consumer protocol is not served), whose timeouts each member sends in \
             JoinGroup."
            .to_string(),
        other => format!("Resource type {other} is not supported; use TOPIC (2) or BROKER (4)."),
    }
}

fn encode(
    entry: Entry,
    version: i16,
    include_synonyms: bool,
    include_documentation: bool,
) -> DescribeConfigsResourceResult {
    let mut result = DescribeConfigsResourceResult::default()
        .with_name(StrBytes::from_static_str(entry.name))
        .with_value(Some(StrBytes::from_string(entry.value)))
        .with_config_source(entry.source);
    if include_synonyms {
        result = result.with_synonyms(
            entry
                .synonyms
                .into_iter()
                .map(|(name, value, source)| {
                    DescribeConfigsSynonym::default()
                        .with_name(StrBytes::from_static_str(name))
                        .with_value(Some(StrBytes::from_string(value)))
                        .with_source(source)
                })
                .collect(),
        );
    }
    if version >= 3 {
        result = result.with_config_type(entry.config_type);
        if include_documentation {
            result =
                result.with_documentation(Some(StrBytes::from_static_str(entry.documentation)));
        }
    }
    result
}

fn topic_entries(state: &BrokerState, name: &str) -> Result<Vec<Entry>, (ResponseError, String)> {
    let topic = state.catalog.topic(name).ok_or_else(|| {
        (
            ResponseError::UnknownTopicOrPartition,
            format!("Topic '{name}' does not exist."),
        )
    })?;
    let defaults = state.catalog.defaults();
    Ok(TOPIC_CONFIG_KEYS
        .iter()
        .filter_map(|key| {
            let value = effective_value(key.name, &topic.log_config)?;
            let default = effective_value(key.name, defaults).unwrap_or_default();
            let overridden = topic.configs.contains_key(key.name);
            let mut synonyms = Vec::new();
            if overridden {
                synonyms.push((key.name, value.clone(), SOURCE_TOPIC_CONFIG));
            }
            synonyms.push((key.broker_name, default, SOURCE_DEFAULT_CONFIG));
            Some(Entry {
                name: key.name,
                value,
                source: if overridden {
                    SOURCE_TOPIC_CONFIG
                } else {
                    SOURCE_DEFAULT_CONFIG
                },
                config_type: match key.name {
                    "cleanup.policy" | "message.timestamp.type" | "semel.dedup.header" => {
                        TYPE_STRING
                    }
                    "retention.ms" | "retention.bytes" | "segment.ms" | "semel.dedup.window.ms" => {
                        TYPE_LONG
                    }
                    _ => TYPE_INT,
                },
                documentation: key.documentation,
                synonyms,
            })
        })
        .collect())
}

fn broker_entries(state: &BrokerState, name: &str) -> Result<Vec<Entry>, (ResponseError, String)> {
    let node = state.config.node_id;
    if !name.is_empty() && name != node.to_string() {
        return Err((
            ResponseError::InvalidRequest,
            format!("Unexpected broker id, expected {node}, but received {name}"),
        ));
    }
    let config = &state.config;
    let log = &config.log;
    let entry = |name, value: String, config_type, documentation| Entry {
        name,
        synonyms: vec![(name, value.clone(), SOURCE_STATIC_BROKER_CONFIG)],
        value,
        source: SOURCE_STATIC_BROKER_CONFIG,
        config_type,
        documentation,
    };
    Ok(vec![
        entry("node.id", node.to_string(), TYPE_INT, "This broker's id."),
        entry("broker.id", node.to_string(), TYPE_INT, "This broker's id."),
        entry(
            "log.dirs",
            config.data_dir.display().to_string(),
            TYPE_STRING,
            "Where partition logs are stored.",
        ),
        entry(
            "auto.create.topics.enable",
            config.auto_create_topics.to_string(),
            TYPE_BOOLEAN,
            "Create unknown topics on Metadata and Produce.",
        ),
        entry(
            "num.partitions",
            config.num_partitions.to_string(),
            TYPE_INT,
            "Partition count of auto-created topics.",
        ),
        entry(
            "default.replication.factor",
            "1".into(),
            TYPE_INT,
            "Single node: always 1.",
        ),
        entry(
            "min.insync.replicas",
            "1".into(),
            TYPE_INT,
            "Single node: always 1.",
        ),
        entry(
            "socket.request.max.bytes",
            config.max_frame_bytes.to_string(),
            TYPE_INT,
            "Largest request accepted.",
        ),
        entry(
            "message.max.bytes",
            log.max_message_bytes.to_string(),
            TYPE_INT,
            "Largest record batch accepted.",
        ),
        entry(
            "log.segment.bytes",
            log.segment_bytes.to_string(),
            TYPE_INT,
            "Segment file size before a roll.",
        ),
        entry(
            "log.roll.ms",
            log.segment_ms.to_string(),
            TYPE_LONG,
            "Segment age before a roll.",
        ),
        entry(
            "log.retention.ms",
            log.retention_ms.to_string(),
            TYPE_LONG,
            "Age after which segments are deleted; -1 keeps forever.",
        ),
        entry(
            "log.retention.bytes",
            log.retention_bytes.to_string(),
            TYPE_LONG,
            "Partition size above which old segments are deleted; -1 for no limit.",
        ),
        entry(
            "log.index.interval.bytes",
            log.index_interval_bytes.to_string(),
            TYPE_INT,
            "Bytes between offset index entries.",
        ),
        entry(
            "log.message.timestamp.type",
            effective_value("message.timestamp.type", log).unwrap_or_default(),
            TYPE_STRING,
            "CreateTime or LogAppendTime.",
        ),
    ])
}
