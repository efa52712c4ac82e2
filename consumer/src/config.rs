//! Consumer settings, under the Java client's names, with `validate()`.

use std::time::Duration;

use semel_client::PropertiesError;

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
    /// TLS and SASL (`security.protocol`, `sasl.*`, `ssl.*`).
    pub security: semel_client::SecurityConfig,
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
            security: semel_client::SecurityConfig::default(),
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
    /// Settings from Java-style properties (`key=value` lines, see
    /// [`semel_client::properties`]) under the Java client's names; what is not given keeps
    /// its default. `partition.assignment.strategy` takes the assignors' short names (`range`,
    /// `roundrobin`, `sticky`, `cooperative-sticky`) or the Java classes'. The result is
    /// validated.
    ///
    /// ```
    /// # use semel_consumer::ConsumerConfig;
    /// let config = ConsumerConfig::from_properties(
    ///     "bootstrap.servers=kafka-1:9092\ngroup.id=billing\nauto.offset.reset=earliest\n",
    /// )?;
    /// assert_eq!(config.group_id.as_deref(), Some("billing"));
    /// # Ok::<(), semel_client::PropertiesError>(())
    /// ```
    ///
    /// # Errors
    /// An unknown key, a value that does not parse, or settings that cannot work together:
    /// each names the key (and its line).
    pub fn from_properties(text: &str) -> Result<Self, PropertiesError> {
        let mut config = Self::default();
        for p in semel_client::properties::parse(text)? {
            if config.security.apply_property(&p)? {
                continue;
            }
            match p.key.as_str() {
                "bootstrap.servers" => config.bootstrap_servers = p.list(),
                "client.id" => config.client_id.clone_from(&p.value),
                "group.id" => config.group_id = Some(p.value.clone()),
                "group.instance.id" => config.group_instance_id = Some(p.value.clone()),
                "auto.offset.reset" => {
                    config.auto_offset_reset = AutoOffsetReset::from_name(&p.value)
                        .ok_or_else(|| p.error("not earliest, latest or none"))?;
                }
                "enable.auto.commit" => config.enable_auto_commit = p.bool()?,
                "auto.commit.interval.ms" => config.auto_commit_interval = p.millis()?,
                "session.timeout.ms" => config.session_timeout = p.millis()?,
                "heartbeat.interval.ms" => config.heartbeat_interval = p.millis()?,
                "max.poll.interval.ms" => config.max_poll_interval = p.millis()?,
                "max.poll.records" => config.max_poll_records = p.number()?,
                "partition.assignment.strategy" => {
                    config.partition_assignment_strategy = p
                        .list()
                        .iter()
                        .map(|name| {
                            strategy_named(name)
                                .ok_or_else(|| p.error(format!("unknown assignor {name:?}")))
                        })
                        .collect::<Result<_, _>>()?;
                }
                "fetch.min.bytes" => config.fetch_min_bytes = p.number()?,
                "fetch.max.wait.ms" => config.fetch_max_wait = p.millis()?,
                "fetch.max.bytes" => config.fetch_max_bytes = p.number()?,
                "max.partition.fetch.bytes" => config.max_partition_fetch_bytes = p.number()?,
                "isolation.level" => {
                    config.isolation_level = match p.value.as_str() {
                        "read_uncommitted" => IsolationLevel::ReadUncommitted,
                        "read_committed" => IsolationLevel::ReadCommitted,
                        _ => return Err(p.error("not read_uncommitted or read_committed")),
                    }
                }
                "request.timeout.ms" => config.request_timeout = p.millis()?,
                "retry.backoff.ms" => config.retry_backoff = p.millis()?,
                "reconnect.backoff.ms" => config.reconnect_backoff = p.millis()?,
                "reconnect.backoff.max.ms" => config.reconnect_backoff_max = p.millis()?,
                "metadata.max.age.ms" => config.metadata_max_age = p.millis()?,
                "key.deserializer" | "value.deserializer" => {
                    return Err(p.error(
                        "not a semel-consumer setting: records are bytes (ConsumerRecord)",
                    ));
                }
                _ => return Err(p.error("unknown consumer setting")),
            }
        }
        config
            .validate()
            .map_err(|e| PropertiesError::settings(e.name, e.reason))?;
        Ok(config)
    }

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
        if let Err((name, reason)) = self.security.validate() {
            return fail(name, &reason);
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

/// An assignor by its protocol name or its Java class (`...RangeAssignor`).
fn strategy_named(name: &str) -> Option<Strategy> {
    let short = match name.rsplit('.').next() {
        Some("RangeAssignor") => "range",
        Some("RoundRobinAssignor") => "roundrobin",
        Some("StickyAssignor") => "sticky",
        Some("CooperativeStickyAssignor") => "cooperative-sticky",
        _ => name,
    };
    Strategy::from_name(short)
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

    #[test]
    fn java_consumer_properties_map_to_the_config() -> Result<(), PropertiesError> {
        let config = ConsumerConfig::from_properties(
            "bootstrap.servers=a:9092\ngroup.id=billing\ngroup.instance.id=host-1\n\
             auto.offset.reset=earliest\nenable.auto.commit=false\nsession.timeout.ms=10000\n\
             heartbeat.interval.ms=1000\nmax.poll.records=100\n\
             partition.assignment.strategy=org.apache.kafka.clients.consumer.CooperativeStickyAssignor, range\n\
             isolation.level=read_committed\nfetch.max.wait.ms=100\n",
        )?;
        assert_eq!(config.group_id.as_deref(), Some("billing"));
        assert_eq!(config.group_instance_id.as_deref(), Some("host-1"));
        assert_eq!(config.auto_offset_reset, AutoOffsetReset::Earliest);
        assert_eq!(config.session_timeout, Duration::from_secs(10));
        assert_eq!(config.max_poll_records, 100);
        assert_eq!(
            config.partition_assignment_strategy,
            vec![Strategy::CooperativeSticky, Strategy::Range]
        );
        assert_eq!(config.isolation_level, IsolationLevel::ReadCommitted);
        Ok(())
    }

    #[test]
    fn unknown_consumer_keys_are_errors_naming_the_key() {
        let error = ConsumerConfig::from_properties("group.id=g\nauto.offset.rest=earliest")
            .expect_err("misspelled");
        assert_eq!((error.line, error.key.as_str()), (2, "auto.offset.rest"));
        let error = ConsumerConfig::from_properties("partition.assignment.strategy=fair")
            .expect_err("unknown assignor");
        assert_eq!(error.key, "partition.assignment.strategy");
    }
}
