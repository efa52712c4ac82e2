//! Topic configs: which keys a topic accepts, their defaults, and how they map onto the
//! partition log's settings.
//!
//! References: Kafka topic configs (`cleanup.policy`, `retention.ms`, `retention.bytes`,
//! `segment.bytes`, `segment.ms`, `max.message.bytes`, `message.timestamp.type`, ...).

use std::collections::BTreeMap;

use crate::log::{LogConfig, TimestampType};

/// One topic config key the broker understands.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TopicConfigKey {
    pub(crate) name: &'static str,
    /// The broker setting that supplies the default (for DescribeConfigs synonyms).
    pub(crate) broker_name: &'static str,
    pub(crate) documentation: &'static str,
}

/// Every topic config the broker accepts, in DescribeConfigs order.
pub(crate) const TOPIC_CONFIG_KEYS: &[TopicConfigKey] = &[
    TopicConfigKey {
        name: "cleanup.policy",
        broker_name: "log.cleanup.policy",
        documentation: "Only \"delete\" is supported: old segments are deleted by retention.",
    },
    TopicConfigKey {
        name: "retention.ms",
        broker_name: "log.retention.ms",
        documentation: "Delete a segment once its newest record is older than this; -1 keeps forever.",
    },
    TopicConfigKey {
        name: "retention.bytes",
        broker_name: "log.retention.bytes",
        documentation: "Delete the oldest segments while a partition is larger than this; -1 for no limit.",
    },
    TopicConfigKey {
        name: "segment.bytes",
        broker_name: "log.segment.bytes",
        documentation: "Roll to a new segment file once the active one would exceed this size.",
    },
    TopicConfigKey {
        name: "segment.ms",
        broker_name: "log.roll.ms",
        documentation: "Roll to a new segment file once the active one is older than this.",
    },
    TopicConfigKey {
        name: "max.message.bytes",
        broker_name: "message.max.bytes",
        documentation: "Largest record batch a producer may append.",
    },
    TopicConfigKey {
        name: "message.timestamp.type",
        broker_name: "log.message.timestamp.type",
        documentation: "CreateTime keeps the producer's timestamps; LogAppendTime stamps batches with the broker's clock.",
    },
    TopicConfigKey {
        name: "index.interval.bytes",
        broker_name: "log.index.interval.bytes",
        documentation: "Bytes of log between two entries of the sparse offset index.",
    },
    TopicConfigKey {
        name: "min.insync.replicas",
        broker_name: "min.insync.replicas",
        documentation: "Single node: every write is in sync; only 1 is accepted.",
    },
    TopicConfigKey {
        name: "semel.dedup.window.ms",
        broker_name: "semel.dedup.window.ms",
        documentation: "Semel extension: a record whose message id (semel.dedup.header) was stored in this partition less than this long ago, by its record timestamp, is not stored again; 0 is off.",
    },
    TopicConfigKey {
        name: "semel.dedup.header",
        broker_name: "semel.dedup.header",
        documentation: "Semel extension: the record header whose value is the message id for semel.dedup.window.ms.",
    },
    TopicConfigKey {
        name: "semel.dedup.max.ids",
        broker_name: "semel.dedup.max.ids",
        documentation: "Semel extension: most message ids one partition's dedup window remembers (about 70 bytes each); the oldest are forgotten first beyond it.",
    },
];

/// A topic config key or value the broker cannot honour.
#[derive(Debug, thiserror::Error)]
#[error("topic config {name}={value:?}: {reason}")]
pub(crate) struct InvalidTopicConfig {
    pub(crate) name: String,
    pub(crate) value: String,
    pub(crate) reason: String,
}

/// The current value of `name` in `log` (the effective config), as DescribeConfigs shows it.
pub(crate) fn effective_value(name: &str, log: &LogConfig) -> Option<String> {
    Some(match name {
        "cleanup.policy" => "delete".to_string(),
        "retention.ms" => log.retention_ms.to_string(),
        "retention.bytes" => log.retention_bytes.to_string(),
        "segment.bytes" => log.segment_bytes.to_string(),
        "segment.ms" => log.segment_ms.to_string(),
        "max.message.bytes" => log.max_message_bytes.to_string(),
        "message.timestamp.type" => match log.timestamp_type {
            TimestampType::CreateTime => "CreateTime".to_string(),
            TimestampType::LogAppendTime => "LogAppendTime".to_string(),
        },
        "index.interval.bytes" => log.index_interval_bytes.to_string(),
        "min.insync.replicas" => "1".to_string(),
        "semel.dedup.window.ms" => log.dedup_window_ms.to_string(),
        "semel.dedup.header" => log.dedup_header.clone(),
        "semel.dedup.max.ids" => log.dedup_max_ids.to_string(),
        _ => return None,
    })
}

/// Applies topic overrides to the broker defaults, rejecting unknown keys and bad values.
pub(crate) fn apply_overrides(
    defaults: &LogConfig,
    overrides: &BTreeMap<String, String>,
) -> Result<LogConfig, InvalidTopicConfig> {
    let mut config = defaults.clone();
    for (name, value) in overrides {
        let invalid = |reason: &str| InvalidTopicConfig {
            name: name.clone(),
            value: value.clone(),
            reason: reason.to_string(),
        };
        let int = || {
            value
                .trim()
                .parse::<i64>()
                .map_err(|_| invalid("not an integer"))
        };
        match name.as_str() {
            "cleanup.policy" => {
                if value.trim() != "delete" {
                    return Err(invalid("log compaction is not supported; use \"delete\""));
                }
            }
            "retention.ms" => {
                config.retention_ms = at_least(int()?, -1).map_err(|r| invalid(&r))?
            }
            "retention.bytes" => {
                config.retention_bytes = at_least(int()?, -1).map_err(|r| invalid(&r))?;
            }
            "segment.bytes" => {
                config.segment_bytes =
                    u64::try_from(at_least(int()?, 14).map_err(|r| invalid(&r))?)
                        .map_err(|_| invalid("out of range"))?;
            }
            "segment.ms" => config.segment_ms = at_least(int()?, 1).map_err(|r| invalid(&r))?,
            "max.message.bytes" => {
                config.max_message_bytes =
                    u32::try_from(at_least(int()?, 0).map_err(|r| invalid(&r))?)
                        .map_err(|_| invalid("out of range"))?;
            }
            "index.interval.bytes" => {
                config.index_interval_bytes =
                    u32::try_from(at_least(int()?, 0).map_err(|r| invalid(&r))?)
                        .map_err(|_| invalid("out of range"))?;
            }
            "message.timestamp.type" => {
                config.timestamp_type = match value.trim() {
                    "CreateTime" => TimestampType::CreateTime,
                    "LogAppendTime" => TimestampType::LogAppendTime,
                    _ => return Err(invalid("expected CreateTime or LogAppendTime")),
                }
            }
            "min.insync.replicas" => {
                if int()? != 1 {
                    return Err(invalid(
                        "a single-node broker has exactly one in-sync replica",
                    ));
                }
            }
            "semel.dedup.window.ms" => {
                config.dedup_window_ms = at_least(int()?, 0).map_err(|r| invalid(&r))?;
            }
            "semel.dedup.header" => {
                if value.is_empty() {
                    return Err(invalid("the header name must not be empty"));
                }
                config.dedup_header = value.clone();
            }
            "semel.dedup.max.ids" => {
                config.dedup_max_ids = u32::try_from(at_least(int()?, 1).map_err(|r| invalid(&r))?)
                    .map_err(|_| invalid("out of range"))?;
            }
            _ => return Err(invalid("unknown topic config")),
        }
    }
    config.validate().map_err(|e| InvalidTopicConfig {
        name: "(combined)".to_string(),
        value: String::new(),
        reason: e.to_string(),
    })?;
    Ok(config)
}

fn at_least(value: i64, minimum: i64) -> Result<i64, String> {
    if value < minimum {
        Err(format!("must be at least {minimum}"))
    } else {
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_apply_and_bad_ones_are_named() {
        let overrides = BTreeMap::from([
            ("retention.ms".to_string(), "1000".to_string()),
            (
                "message.timestamp.type".to_string(),
                "LogAppendTime".to_string(),
            ),
        ]);
        let config = apply_overrides(&LogConfig::default(), &overrides).expect("valid");
        assert_eq!(config.retention_ms, 1000);
        assert_eq!(
            effective_value("message.timestamp.type", &config).as_deref(),
            Some("LogAppendTime")
        );

        for (name, value) in [
            ("cleanup.policy", "compact"),
            ("retention.ms", "soon"),
            ("segment.bytes", "1"),
            ("semel.dedup.window.ms", "-1"),
            ("semel.dedup.max.ids", "0"),
            ("semel.dedup.header", ""),
            ("no.such.config", "1"),
        ] {
            let overrides = BTreeMap::from([(name.to_string(), value.to_string())]);
            let err = apply_overrides(&LogConfig::default(), &overrides).unwrap_err();
            assert_eq!(err.name, name);
        }
    }

    #[test]
    fn every_key_has_an_effective_value() {
        for key in TOPIC_CONFIG_KEYS {
            assert!(
                effective_value(key.name, &LogConfig::default()).is_some(),
                "{}",
                key.name
            );
        }
    }
}
