//! Broker configuration: every setting has Kafka's name in its doc line, a default, and a rule
//! checked by [`BrokerConfig::validate`].
//!
//! References: Kafka broker configs (`socket.request.max.bytes`, `auto.create.topics.enable`,
//! `num.partitions`, `log.segment.bytes`, `log.retention.ms`, ...), topic configs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::log::LogConfig;

/// Everything [`crate::Broker::start`] needs. Build it with `Default` and adjust fields.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Address to bind (`listeners`). Port 0 picks a free port; read it back from the handle.
    pub listen: SocketAddr,
    /// `host:port` announced to clients in Metadata (`advertised.listeners`). `None` announces
    /// the bound address.
    pub advertised_listener: Option<String>,
    /// Directory holding the catalog, producer-id allocator and partition logs (`log.dirs`).
    pub data_dir: PathBuf,
    /// This broker's node id (`node.id`).
    pub node_id: i32,
    /// Largest request frame accepted, in bytes (`socket.request.max.bytes`). A larger frame
    /// closes the connection, as Kafka does.
    pub max_frame_bytes: usize,
    /// Memory, in bytes, that requests being read, handled or answered may take at once, all
    /// connections together (`queued.max.request.bytes`). A request counts its frame plus
    /// [`REQUEST_ELEMENT_BYTES`] for every array element and tagged field in it (what it takes
    /// once decoded, and in its answer). A connection whose next request does not fit stops
    /// being read until earlier requests are answered. One request may count at most
    /// `socket.request.max.bytes`; a larger one closes the connection. Must be at least
    /// `socket.request.max.bytes`.
    pub queued_max_request_bytes: usize,
    /// Most client connections served at once (`max.connections`). Further connections wait in
    /// the accept backlog.
    pub max_connections: usize,
    /// Address of the Prometheus endpoint (`/metrics`, `/health`); `None`: none. Port 0
    /// picks a free port (read it back from the handle).
    pub metrics_listen: Option<SocketAddr>,
    /// Most record bytes in one Fetch response, whatever the request's `max_bytes` says
    /// (`fetch.max.bytes`, 55 MiB as in Kafka). The first batch of a response may still exceed
    /// it (KIP-74), so a consumer always makes progress.
    pub fetch_max_bytes: usize,
    /// Most requests of one connection being processed or awaiting their turn to be answered.
    /// Reading pauses while a connection is at the cap (Kafka's `queued.max.requests`, per connection).
    pub max_in_flight_per_connection: usize,
    /// Create a topic when a client asks for it in Metadata or Produce (`auto.create.topics.enable`).
    pub auto_create_topics: bool,
    /// Partition count of auto-created topics and of CreateTopics without a count (`num.partitions`).
    pub num_partitions: i32,
    /// Defaults for every partition log (`log.segment.bytes`, `log.retention.ms`, ...); topic
    /// configs override them per topic.
    pub log: LogConfig,
    /// How often segment roll by time and retention run (`log.retention.check.interval.ms`).
    pub retention_check_interval: Duration,
    /// How long a record produced with `acks` 0 or 1 may stay in the page cache before the
    /// broker fsyncs it (`log.flush.interval.ms`); `None`: only once its segment is rolled
    /// (within a second of the roll), as Kafka by default. `acks=all` is fsynced before it is
    /// answered either way. Every fsync runs beside produce, never under the partition's lock.
    pub log_flush_interval: Option<Duration>,
    /// How long a shutdown waits for in-flight requests before closing connections anyway.
    pub shutdown_grace: Duration,
    /// Forget a producer's state on a partition after it has not written there for this long
    /// (`producer.id.expiration.ms`, default 1 day). Checked with retention.
    pub producer_id_expiration: Duration,
    /// Most producers remembered per partition (`semel.max.producers.per.partition`). At the
    /// cap, the least recently used producer is evicted: it becomes unknown to the partition,
    /// so its next batch is accepted at any sequence (a retry of an evicted producer's old
    /// batch would be appended again).
    pub max_producers_per_partition: usize,
    /// Largest `transaction.timeout.ms` a transactional producer may ask for in InitProducerId
    /// (`transaction.max.timeout.ms`, default 15 minutes).
    pub transaction_max_timeout: Duration,
    /// Consumer-group coordinator settings (`group.*`, `offsets.*`).
    pub group: crate::group::GroupConfig,
    /// TLS and SASL of the listener (`listener.security.protocol.map`, `ssl.*`, `sasl.*`).
    pub security: crate::security::ListenerSecurity,
}

/// What one array element or tagged field of a request is counted as, in bytes, against
/// `queued.max.request.bytes` and `socket.request.max.bytes`: measured at about 216 bytes for
/// an empty group id in DescribeGroups (its decoded string plus its described group in the
/// answer), rounded up.
pub const REQUEST_ELEMENT_BYTES: u64 = 256;

/// Default `queued.max.request.bytes`: 512 MiB.
pub const DEFAULT_QUEUED_MAX_REQUEST_BYTES: usize = 512 * 1024 * 1024;

/// Kafka's `fetch.max.bytes` default: 55 MiB.
pub const DEFAULT_FETCH_MAX_BYTES: usize = 55 * 1024 * 1024;

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9092)),
            advertised_listener: None,
            data_dir: PathBuf::from("./semel-data"),
            node_id: 1,
            max_frame_bytes: 100 * 1024 * 1024,
            queued_max_request_bytes: DEFAULT_QUEUED_MAX_REQUEST_BYTES,
            max_connections: 1024,
            metrics_listen: None,
            fetch_max_bytes: DEFAULT_FETCH_MAX_BYTES,
            max_in_flight_per_connection: 32,
            auto_create_topics: true,
            num_partitions: 1,
            log: LogConfig::default(),
            retention_check_interval: Duration::from_secs(300),
            log_flush_interval: Some(Duration::from_secs(1)),
            shutdown_grace: Duration::from_secs(10),
            producer_id_expiration: Duration::from_secs(24 * 3600),
            max_producers_per_partition: crate::idempotence::DEFAULT_MAX_PRODUCERS_PER_PARTITION,
            transaction_max_timeout: Duration::from_secs(15 * 60),
            group: crate::group::GroupConfig::default(),
            security: crate::security::ListenerSecurity::default(),
        }
    }
}

/// A setting that cannot work, with the setting's name and the reason.
#[derive(Debug, thiserror::Error)]
#[error("invalid broker setting {name}: {reason}")]
pub struct ConfigError {
    /// Kafka's name of the setting.
    pub name: &'static str,
    /// What is wrong with its value.
    pub reason: String,
}

impl BrokerConfig {
    /// Checks that the settings can work together.
    ///
    /// # Errors
    /// [`ConfigError`] naming the first setting that cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |name, reason: String| Err(ConfigError { name, reason });
        self.security.validate()?;
        if self.max_frame_bytes < 1024 {
            return fail(
                "socket.request.max.bytes",
                format!("{} is below the 1024-byte minimum", self.max_frame_bytes),
            );
        }
        if i32::try_from(self.max_frame_bytes).is_err() {
            return fail(
                "socket.request.max.bytes",
                format!(
                    "{} does not fit a Kafka frame length (i32)",
                    self.max_frame_bytes
                ),
            );
        }
        if self.queued_max_request_bytes < self.max_frame_bytes {
            return fail(
                "queued.max.request.bytes",
                format!(
                    "{} is below socket.request.max.bytes ({}): the largest request could never be read",
                    self.queued_max_request_bytes, self.max_frame_bytes
                ),
            );
        }
        if self.queued_max_request_bytes > tokio::sync::Semaphore::MAX_PERMITS {
            return fail(
                "queued.max.request.bytes",
                format!("{} is too large", self.queued_max_request_bytes),
            );
        }
        if self.max_connections == 0 {
            return fail("max.connections", "must be at least 1".into());
        }
        if self.max_in_flight_per_connection == 0 {
            return fail("queued.max.requests", "must be at least 1".into());
        }
        if self.num_partitions < 1 {
            return fail(
                "num.partitions",
                format!("{} must be at least 1", self.num_partitions),
            );
        }
        if self.max_producers_per_partition == 0 {
            return fail(
                "semel.max.producers.per.partition",
                "must be at least 1".into(),
            );
        }
        if i64::try_from(self.producer_id_expiration.as_millis()).is_err() {
            return fail(
                "producer.id.expiration.ms",
                "does not fit in milliseconds as i64".into(),
            );
        }
        if self.node_id < 0 {
            return fail("node.id", format!("{} must not be negative", self.node_id));
        }
        if let Some(listener) = &self.advertised_listener {
            let (host, _) = advertised_host_port(listener).map_err(|reason| ConfigError {
                name: "advertised.listeners",
                reason,
            })?;
            if host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_unspecified())
            {
                return fail(
                    "advertised.listeners",
                    format!(
                        "{listener}: clients cannot connect to the unspecified address {host}; name a routable host"
                    ),
                );
            }
        }
        self.log.validate().map_err(|e| ConfigError {
            name: "log",
            reason: e.to_string(),
        })?;
        Ok(())
    }
}

/// Splits `host:port` (an optional `PLAINTEXT://` prefix is accepted, as in Kafka's
/// `advertised.listeners`).
pub(crate) fn advertised_host_port(listener: &str) -> Result<(String, i32), String> {
    let rest = listener.strip_prefix("PLAINTEXT://").unwrap_or(listener);
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| format!("{listener:?} is not host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{listener:?} has no valid port"))?;
    if host.is_empty() {
        return Err(format!("{listener:?} has an empty host"));
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok((host.to_string(), i32::from(port)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        BrokerConfig::default().validate().expect("default config");
    }

    #[test]
    fn rejects_tiny_frames_and_bad_listener() {
        let config = BrokerConfig {
            max_frame_bytes: 10,
            ..BrokerConfig::default()
        };
        assert_eq!(
            config.validate().unwrap_err().name,
            "socket.request.max.bytes"
        );
        let config = BrokerConfig {
            advertised_listener: Some("nohost".into()),
            ..BrokerConfig::default()
        };
        assert_eq!(config.validate().unwrap_err().name, "advertised.listeners");
        assert_eq!(
            advertised_host_port("PLAINTEXT://example.com:9093"),
            Ok(("example.com".to_string(), 9093))
        );
    }
}
