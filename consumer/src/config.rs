//! Consumer settings, under the Java client's names, with `validate()`.

use std::time::Duration;

use crate::assignor::Strategy;

/// `auto.offset.reset`: where to start a partition that has no committed offset, or whose
/// position fell out of the log (`OFFSET_OUT_OF_RANGE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoOffsetReset {
    /// `earliest`: the log start offset.
    Earliest,
    /// `latest` (Kafka's default): the end of the log, so only records written later are read.
    Latest,
    /// `none`: an error ([`crate::ConsumerError::NoOffset`] or `OffsetOutOfRange`) instead.
    None,
}

impl AutoOffsetReset {
    /// Parses Kafka's spelling (`earliest`, `latest`, `none`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "earliest" | "smallest" | "beginning" => Some(Self::Earliest),
            "latest" | "largest" | "end" => Some(Self::Latest),
            "none" | "error" => Some(Self::None),
            _ => None,
        }
    }
}

/// `isolation.level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IsolationLevel {
    /// `read_uncommitted` (the Java default): every record up to the high watermark.
    ReadUncommitted,
    /// `read_committed`: up to the last stable offset, without aborted transactions' records.
    ReadCommitted,
}

impl IsolationLevel {
    pub(crate) fn wire(self) -> i8 {
        match self {
            Self::ReadUncommitted => 0,
            Self::ReadCommitted => 1,
        }
    }
}

/// Consumer settings. `Default` is the Java client's defaults, except `enable.auto.commit`,
/// which is **off**: offsets are committed when the application says a record is handled,
/// never on a timer behind its back.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// `bootstrap.servers`.
    pub bootstrap_servers: Vec<String>,
    /// `client.id`.
    pub client_id: String,
    /// `group.id`: needed by `subscribe` and by `commit`; `None` for manual assignment
    /// without commits.
    pub group_id: Option<String>,
    /// `group.instance.id`: a static member (KIP-345). A restart within `session.timeout.ms`
    /// gets its partitions back without a rebalance; `close()` does not leave the group.
    pub group_instance_id: Option<String>,
    /// `auto.offset.reset`.
    pub auto_offset_reset: AutoOffsetReset,
    /// `enable.auto.commit` (default **false**): commit positions every
    /// `auto.commit.interval.ms` from `poll`, before a rebalance revokes partitions, and on
    /// `close()`.
    pub enable_auto_commit: bool,
    /// `auto.commit.interval.ms`.
    pub auto_commit_interval: Duration,
    /// `session.timeout.ms`: the coordinator removes a member it has not heard from this long.
    pub session_timeout: Duration,
    /// `heartbeat.interval.ms`.
    pub heartbeat_interval: Duration,
    /// `max.poll.interval.ms`: the longest time between two `poll`s before the consumer leaves
    /// the group by itself (its partitions go to others); also the rebalance timeout it asks for.
    pub max_poll_interval: Duration,
    /// `max.poll.records`: the most records one `poll` returns.
    pub max_poll_records: usize,
    /// `partition.assignment.strategy`, in order of preference. Cooperative rebalancing is used
    /// only when every strategy listed is cooperative (the Java client's rule).
    pub partition_assignment_strategy: Vec<Strategy>,
    /// `fetch.min.bytes`.
    pub fetch_min_bytes: i32,
    /// `fetch.max.wait.ms`.
    pub fetch_max_wait: Duration,
    /// `fetch.max.bytes`: the most one Fetch response may carry.
    pub fetch_max_bytes: i32,
    /// `max.partition.fetch.bytes`: the most one partition contributes to a Fetch response. It
    /// also bounds the records buffered per partition (about 1.5 times this), which is the
    /// consumer's back-pressure: a slow handler stops fetching, not grows memory.
    pub max_partition_fetch_bytes: i32,
    /// `isolation.level`.
    pub isolation_level: IsolationLevel,
    /// `request.timeout.ms`.
    pub request_timeout: Duration,
    /// `retry.backoff.ms`: the wait before a failed group or offset request is tried again.
    pub retry_backoff: Duration,
    /// `reconnect.backoff.ms`.
    pub reconnect_backoff: Duration,
    /// `reconnect.backoff.max.ms`.
    pub reconnect_backoff_max: Duration,
    /// `metadata.max.age.ms`: how often the subscribed topics' metadata is reloaded, which is
    /// how partitions added to a topic are noticed (and trigger a rebalance).
    pub metadata_max_age: Duration,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            bootstrap_servers: vec!["127.0.0.1:9092".into()],
            client_id: "semel-consumer".into(),
            group_id: None,
            group_instance_id: None,
            auto_offset_reset: AutoOffsetReset::Latest,
            enable_auto_commit: false,
            auto_commit_interval: Duration::from_secs(5),
            session_timeout: Duration::from_secs(45),
            heartbeat_interval: Duration::from_secs(3),
            max_poll_interval: Duration::from_secs(300),
            max_poll_records: 500,
            partition_assignment_strategy: vec![Strategy::Range, Strategy::CooperativeSticky],
            fetch_min_bytes: 1,
            fetch_max_wait: Duration::from_millis(500),
            fetch_max_bytes: 50 * 1024 * 1024,
            max_partition_fetch_bytes: 1024 * 1024,
            isolation_level: IsolationLevel::ReadUncommitted,
            request_timeout: Duration::from_secs(30),
            retry_backoff: Duration::from_millis(100),
            reconnect_backoff: Duration::from_millis(50),
            reconnect_backoff_max: Duration::from_secs(1),
            metadata_max_age: Duration::from_secs(300),
        }
    }
}

/// A setting that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid consumer setting {name}: {reason}")]
pub struct ConfigError {
    /// Kafka's name of the setting.
    pub name: &'static str,
    /// Why.
    pub reason: String,
}

impl ConsumerConfig {
    /// Checks the settings against each other, as the Java client does.
    ///
    /// # Errors
    /// The first setting that cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |name, reason: &str| {
            Err(ConfigError {
                name,
                reason: reason.to_string(),
            })
        };
        if self.bootstrap_servers.is_empty() {
            return fail("bootstrap.servers", "at least one address is needed");
        }
        if self.group_id.as_deref() == Some("") {
            return fail("group.id", "must not be empty (leave it unset instead)");
        }
        if self.group_instance_id.is_some() && self.group_id.is_none() {
            return fail("group.instance.id", "needs group.id");
        }
        if self.heartbeat_interval >= self.session_timeout {
            return fail(
                "heartbeat.interval.ms",
                "must be lower than session.timeout.ms (a third of it is usual)",
            );
        }
        if self.partition_assignment_strategy.is_empty() {
            return fail("partition.assignment.strategy", "at least one is needed");
        }
        if self.max_poll_records == 0 {
            return fail("max.poll.records", "must be at least 1");
        }
        if self.max_partition_fetch_bytes <= 0 || self.fetch_max_bytes <= 0 {
            return fail(
                "max.partition.fetch.bytes",
                "max.partition.fetch.bytes and fetch.max.bytes must be positive",
            );
        }
        if self.fetch_min_bytes < 0 {
            return fail("fetch.min.bytes", "must not be negative");
        }
        if self.request_timeout <= self.fetch_max_wait {
            return fail(
                "request.timeout.ms",
                "must be longer than fetch.max.wait.ms (a fetch may wait that long)",
            );
        }
        Ok(())
    }

    /// Whether rebalances are incremental (KIP-429): every listed strategy is cooperative.
    pub fn cooperative(&self) -> bool {
        self.partition_assignment_strategy
            .iter()
            .all(|s| *s == Strategy::CooperativeSticky)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_do_not_auto_commit() {
        let config = ConsumerConfig::default();
        assert_eq!(config.validate(), Ok(()));
        assert!(!config.enable_auto_commit);
        assert!(!config.cooperative());
    }

    #[test]
    fn inconsistent_settings_are_refused_by_name() {
        let config = ConsumerConfig {
            heartbeat_interval: Duration::from_secs(10),
            session_timeout: Duration::from_secs(10),
            ..ConsumerConfig::default()
        };
        assert_eq!(
            config.validate().map_err(|e| e.name),
            Err("heartbeat.interval.ms")
        );
        let config = ConsumerConfig {
            group_instance_id: Some("a".into()),
            ..ConsumerConfig::default()
        };
        assert_eq!(
            config.validate().map_err(|e| e.name),
            Err("group.instance.id")
        );
        let config = ConsumerConfig {
            partition_assignment_strategy: vec![Strategy::CooperativeSticky],
            ..ConsumerConfig::default()
        };
        assert!(config.cooperative());
    }
}
