//! Producer settings, under the Java client's names, with `validate()`.

use std::time::Duration;

use kafka_protocol::records::Compression;
use semel_client::PropertiesError;

/// `acks`: how durable a write must be before the broker answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acks {
    /// `acks=0`: no answer at all; nothing is retried and offsets are unknown (-1).
    None,
    /// `acks=1`: the leader wrote the batch.
    Leader,
    /// `acks=all` / `-1`: every in-sync replica has it (on semel-broker: fsynced).
    All,
}

impl Acks {
    pub(crate) fn wire(self) -> i16 {
        match self {
            Self::None => 0,
            Self::Leader => 1,
            Self::All => -1,
        }
    }
}

/// Producer settings. `Default` is the Java client's defaults (idempotence on, `acks=all`).
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// `bootstrap.servers`.
    pub bootstrap_servers: Vec<String>,
    /// TLS and SASL (`security.protocol`, `sasl.*`, `ssl.*`).
    pub security: semel_client::SecurityConfig,
    /// `client.id`.
    pub client_id: String,
    /// `acks`.
    pub acks: Acks,
    /// `enable.idempotence`: producer id + per-partition sequence numbers, so a retried batch
    /// is stored once. Needs `acks=all` and at most 5 requests in flight per partition.
    pub enable_idempotence: bool,
    /// `linger.ms`: how long a batch waits for more records before it is sent.
    pub linger: Duration,
    /// `batch.size`: a batch is sent once its records take this many bytes.
    pub batch_size: usize,
    /// `compression.type`.
    pub compression: Compression,
    /// `delivery.timeout.ms`: from `send` to a delivery report or an error, retries included.
    pub delivery_timeout: Duration,
    /// `request.timeout.ms`: how long one Produce request may take.
    pub request_timeout: Duration,
    /// `retry.backoff.ms`: the wait before a failed batch is sent again.
    pub retry_backoff: Duration,
    /// `max.in.flight.requests.per.connection`: batches in flight per partition (≤ 5 when
    /// idempotent).
    pub max_in_flight: usize,
    /// `retries`: how many times a failed batch is sent again (within `delivery.timeout.ms`).
    /// `None` (the default) means unlimited for an idempotent producer, whose retries the
    /// broker deduplicates, and **0 without idempotence**, because such a retry after a lost
    /// reply stores the batch twice. That default differs from the Java client's on purpose;
    /// set `Some(u32::MAX)` for Java's behaviour.
    pub retries: Option<u32>,
    /// **Semel extension** `semel.max.queued.records`, in the role of `buffer.memory`
    /// (counted in records, not bytes): records sent and not yet acknowledged or failed;
    /// `send` waits for room while this many are.
    pub max_queued_records: usize,
    /// **Semel extension** (no Java counterpart): a stable identity for zombie fencing
    /// without transactions. The producer id comes from InitProducerId with this as the
    /// transactional id (from its transaction coordinator), so every instance using the same
    /// fencing id gets the same producer id with a higher epoch. Brokers check epochs per
    /// partition (Kafka's and semel's alike): once the newer instance has written to a
    /// partition, the batches of any older instance still running are refused there
    /// (`INVALID_PRODUCER_EPOCH` / `PRODUCER_FENCED`, fatal for that instance). To fence a
    /// partition at once, write to it first (the `exactly_once_pipeline` example writes a
    /// fence record). No transaction is ever opened; the batches are plain idempotent ones.
    /// Needs `enable.idempotence`. At most one live instance per id: the newest wins.
    pub fencing_id: Option<String>,
    /// `transactional.id`: makes this a transactional producer (KIP-98). Records are sent
    /// between [`crate::Producer::begin_transaction`] and
    /// [`crate::Producer::commit_transaction`] (or `abort_transaction`), and
    /// `read_committed` consumers see them only once committed. Every instance with the same
    /// id gets the same producer id at a higher epoch, which aborts the transaction an older
    /// instance left open and fences it. Needs `enable.idempotence`; not with `fencing_id`.
    pub transactional_id: Option<String>,
    /// `transaction.timeout.ms`: the coordinator aborts a transaction open for longer than
    /// this (and fences the producer). Brokers cap it at `transaction.max.timeout.ms`.
    pub transaction_timeout: Duration,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        Self {
            bootstrap_servers: vec!["127.0.0.1:9092".into()],
            security: semel_client::SecurityConfig::default(),
            client_id: "semel-producer".into(),
            acks: Acks::All,
            enable_idempotence: true,
            linger: Duration::from_millis(5),
            batch_size: 16 * 1024,
            compression: Compression::None,
            delivery_timeout: Duration::from_secs(120),
            request_timeout: Duration::from_secs(30),
            retry_backoff: Duration::from_millis(100),
            max_in_flight: 5,
            retries: None,
            max_queued_records: 100_000,
            fencing_id: None,
            transactional_id: None,
            transaction_timeout: Duration::from_secs(60),
        }
    }
}

/// A setting that cannot work.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid producer setting {name}: {reason}")]
pub struct ConfigError {
    /// Kafka's name of the setting.
    pub name: &'static str,
    /// Why.
    pub reason: String,
}

impl ProducerConfig {
    /// Settings from Java-style properties (`key=value` lines, see
    /// [`semel_client::properties`]) under the Java client's names; what is not given keeps
    /// its default. As in the Java client, `acks` other than `all` (or more than 5 requests in
    /// flight) turns idempotence off unless `enable.idempotence` is given too. Semel's own
    /// settings: `semel.fencing.id`, `semel.max.queued.records`. The result is validated.
    ///
    /// ```
    /// # use semel_producer::ProducerConfig;
    /// let config = ProducerConfig::from_properties(
    ///     "bootstrap.servers=kafka-1:9092,kafka-2:9092\nacks=all\nlinger.ms=10\n",
    /// )?;
    /// assert_eq!(config.bootstrap_servers.len(), 2);
    /// # Ok::<(), semel_client::PropertiesError>(())
    /// ```
    ///
    /// # Errors
    /// An unknown key, a value that does not parse, or settings that cannot work together:
    /// each names the key (and its line).
    pub fn from_properties(text: &str) -> Result<Self, PropertiesError> {
        let mut config = Self::default();
        let mut idempotence_given = false;
        for p in semel_client::properties::parse(text)? {
            if config.security.apply_property(&p)? {
                continue;
            }
            match p.key.as_str() {
                "bootstrap.servers" => config.bootstrap_servers = p.list(),
                "client.id" => config.client_id.clone_from(&p.value),
                "acks" => {
                    config.acks = match p.value.as_str() {
                        "0" => Acks::None,
                        "1" => Acks::Leader,
                        "all" | "-1" => Acks::All,
                        other => return Err(p.error(format!("{other:?} is not 0, 1, all or -1"))),
                    }
                }
                "enable.idempotence" => {
                    config.enable_idempotence = p.bool()?;
                    idempotence_given = true;
                }
                "linger.ms" => config.linger = p.millis()?,
                "batch.size" => config.batch_size = p.number()?,
                "compression.type" => {
                    config.compression = match p.value.as_str() {
                        "none" => Compression::None,
                        "gzip" => Compression::Gzip,
                        "snappy" => Compression::Snappy,
                        "lz4" => Compression::Lz4,
                        "zstd" => Compression::Zstd,
                        other => {
                            return Err(p.error(format!(
                                "{other:?} is not none, gzip, snappy, lz4 or zstd"
                            )));
                        }
                    }
                }
                "delivery.timeout.ms" => config.delivery_timeout = p.millis()?,
                "request.timeout.ms" => config.request_timeout = p.millis()?,
                "retry.backoff.ms" => config.retry_backoff = p.millis()?,
                "max.in.flight.requests.per.connection" => config.max_in_flight = p.number()?,
                "retries" => config.retries = Some(p.number()?),
                "transactional.id" => config.transactional_id = Some(p.value.clone()),
                "transaction.timeout.ms" => config.transaction_timeout = p.millis()?,
                "semel.fencing.id" => config.fencing_id = Some(p.value.clone()),
                "semel.max.queued.records" => config.max_queued_records = p.number()?,
                "buffer.memory" => {
                    return Err(p.error(
                        "not a semel-producer setting: it bounds records, not bytes \
                         (semel.max.queued.records)",
                    ));
                }
                "key.serializer" | "value.serializer" => {
                    return Err(p.error(
                        "not a semel-producer setting: records are bytes (ProducerRecord)",
                    ));
                }
                _ => return Err(p.error("unknown producer setting")),
            }
        }
        if !idempotence_given && (config.acks != Acks::All || config.max_in_flight > 5) {
            config.enable_idempotence = false;
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
        if self.enable_idempotence && self.acks != Acks::All {
            return fail(
                "enable.idempotence",
                "needs acks=all (a retried batch is only known stored once all replicas have it)",
            );
        }
        if self.enable_idempotence && !(1..=5).contains(&self.max_in_flight) {
            return fail(
                "max.in.flight.requests.per.connection",
                "must be 1 to 5 with enable.idempotence (brokers remember the last 5 batches)",
            );
        }
        if self.max_in_flight == 0 {
            return fail(
                "max.in.flight.requests.per.connection",
                "must be at least 1",
            );
        }
        if self.delivery_timeout < self.linger + self.request_timeout {
            return fail(
                "delivery.timeout.ms",
                "must be at least linger.ms + request.timeout.ms",
            );
        }
        if self.batch_size == 0 {
            return fail("batch.size", "must be at least 1");
        }
        if self.fencing_id.is_some() && !self.enable_idempotence {
            return fail(
                "fencing_id",
                "needs enable.idempotence (it fences by producer epoch)",
            );
        }
        if self.fencing_id.as_deref() == Some("") {
            return fail("fencing_id", "must not be empty");
        }
        if self.transactional_id.is_some() && !self.enable_idempotence {
            return fail(
                "transactional.id",
                "needs enable.idempotence (transactions are built on producer ids and sequences)",
            );
        }
        if self.transactional_id.as_deref() == Some("") {
            return fail("transactional.id", "must not be empty");
        }
        if self.transactional_id.is_some() && self.fencing_id.is_some() {
            return fail(
                "fencing_id",
                "not with transactional.id, which fences the same way (and opens transactions)",
            );
        }
        if self.transaction_timeout.is_zero()
            || self.transaction_timeout.as_millis() > i32::MAX as u128
        {
            return fail(
                "transaction.timeout.ms",
                "must be between 1 ms and i32::MAX ms",
            );
        }
        Ok(())
    }

    /// The transactional id InitProducerId is asked with: `transactional.id`, or the
    /// `fencing_id` extension.
    pub(crate) fn coordinator_key(&self) -> Option<&str> {
        self.transactional_id
            .as_deref()
            .or(self.fencing_id.as_deref())
    }

    pub(crate) fn transaction_timeout_ms(&self) -> i32 {
        i32::try_from(self.transaction_timeout.as_millis()).unwrap_or(i32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn java_producer_properties_map_to_the_config() -> Result<(), PropertiesError> {
        let config = ProducerConfig::from_properties(
            "bootstrap.servers=a:9092,b:9092\nclient.id=billing\nacks=all\n\
             enable.idempotence=true\nlinger.ms=20\nbatch.size=65536\ncompression.type=zstd\n\
             delivery.timeout.ms=60000\nrequest.timeout.ms=5000\nretry.backoff.ms=50\n\
             max.in.flight.requests.per.connection=3\nretries=10\n\
             transactional.id=billing-tx\ntransaction.timeout.ms=30000\n\
             semel.max.queued.records=1000\n",
        )?;
        assert_eq!(config.bootstrap_servers, vec!["a:9092", "b:9092"]);
        assert_eq!(config.client_id, "billing");
        assert_eq!(config.linger, Duration::from_millis(20));
        assert_eq!(config.batch_size, 65536);
        assert_eq!(config.compression, Compression::Zstd);
        assert_eq!(config.max_in_flight, 3);
        assert_eq!(config.retries, Some(10));
        assert_eq!(config.transactional_id.as_deref(), Some("billing-tx"));
        assert_eq!(config.max_queued_records, 1000);
        Ok(())
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors_naming_the_key() {
        let error = ProducerConfig::from_properties("bootstrap.servers=a:9092\nlinger.sm=5\n")
            .expect_err("misspelled");
        assert_eq!((error.line, error.key.as_str()), (2, "linger.sm"));
        let error = ProducerConfig::from_properties("acks=most").expect_err("bad acks");
        assert_eq!(error.key, "acks");
        let error = ProducerConfig::from_properties("acks=1\nenable.idempotence=true")
            .expect_err("idempotence needs acks=all");
        assert_eq!(error.key, "enable.idempotence");
    }

    #[test]
    fn acks_1_without_idempotence_given_turns_it_off_as_in_java() -> Result<(), PropertiesError> {
        let config = ProducerConfig::from_properties("acks=1")?;
        assert!(!config.enable_idempotence);
        assert_eq!(config.acks, Acks::Leader);
        Ok(())
    }
}
