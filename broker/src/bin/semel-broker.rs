//! The `semel-broker` command: run a single-node Kafka-protocol broker.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use std::ffi::OsString;

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};
use semel_broker::log::{LogConfig, TimestampType};
use semel_broker::security::{ClientAuth, ListenerSecurity};
use semel_broker::{Broker, BrokerConfig, GroupConfig};
use semel_client::{SaslMechanism, SecurityProtocol};

/// A single-node broker that speaks the Apache Kafka wire protocol.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// A TOML file of settings, under the flags' names (`data-dir = "/var/lib/semel"`,
    /// `num-partitions = 3`); flags and SEMEL_* environment variables override it. An
    /// unknown key is refused.
    #[arg(long, env = "SEMEL_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (Kafka: listeners).
    #[arg(long, env = "SEMEL_LISTEN", default_value = "127.0.0.1:9092")]
    listen: SocketAddr,
    /// host:port announced to clients in Metadata (Kafka: advertised.listeners). Defaults to the bound address; required when listening on 0.0.0.0 or [::].
    #[arg(long, env = "SEMEL_ADVERTISED_LISTENER")]
    advertised_listener: Option<String>,
    /// Directory for the catalog and partition logs (Kafka: log.dirs).
    #[arg(long, env = "SEMEL_DATA_DIR", default_value = "./semel-data")]
    data_dir: PathBuf,
    /// This broker's node id (Kafka: node.id).
    #[arg(long, env = "SEMEL_NODE_ID", default_value_t = 1)]
    node_id: i32,
    /// Largest request frame in bytes (Kafka: socket.request.max.bytes).
    #[arg(long, env = "SEMEL_SOCKET_REQUEST_MAX_BYTES", default_value_t = 100 * 1024 * 1024)]
    socket_request_max_bytes: usize,
    /// Memory all requests being read, handled or answered may take at once, in bytes; a
    /// connection whose next request does not fit waits (Kafka: queued.max.request.bytes).
    #[arg(long, env = "SEMEL_QUEUED_MAX_REQUEST_BYTES", default_value_t = semel_broker::config::DEFAULT_QUEUED_MAX_REQUEST_BYTES)]
    queued_max_request_bytes: usize,
    /// Serve Prometheus metrics (GET /metrics) and a health check (GET /health) on this
    /// address, e.g. 127.0.0.1:9404; off when not given.
    #[arg(long, env = "SEMEL_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Most client connections served at once (Kafka: max.connections).
    #[arg(long, env = "SEMEL_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: usize,
    /// Most record bytes in one Fetch response, whatever the request asks (Kafka: fetch.max.bytes).
    #[arg(long, env = "SEMEL_FETCH_MAX_BYTES", default_value_t = semel_broker::config::DEFAULT_FETCH_MAX_BYTES)]
    fetch_max_bytes: usize,
    /// Create unknown topics on Metadata and Produce (Kafka: auto.create.topics.enable).
    #[arg(long, env = "SEMEL_AUTO_CREATE_TOPICS_ENABLE", default_value_t = true, action = clap::ArgAction::Set)]
    auto_create_topics_enable: bool,
    /// Partition count of auto-created topics (Kafka: num.partitions).
    #[arg(long, env = "SEMEL_NUM_PARTITIONS", default_value_t = 1)]
    num_partitions: i32,
    /// Segment file size before a roll, in bytes (Kafka: log.segment.bytes).
    #[arg(long, env = "SEMEL_LOG_SEGMENT_BYTES", default_value_t = 1024 * 1024 * 1024)]
    log_segment_bytes: u64,
    /// Segment age before a roll, in milliseconds (Kafka: log.roll.ms).
    #[arg(long, env = "SEMEL_LOG_ROLL_MS", default_value_t = 7 * 24 * 3600 * 1000)]
    log_roll_ms: i64,
    /// Delete segments whose newest record is older than this, in milliseconds; -1 keeps forever (Kafka: log.retention.ms).
    #[arg(long, env = "SEMEL_LOG_RETENTION_MS", default_value_t = 7 * 24 * 3600 * 1000, allow_negative_numbers = true)]
    log_retention_ms: i64,
    /// Delete old segments while a partition is larger than this; -1 for no limit (Kafka: log.retention.bytes).
    #[arg(long, env = "SEMEL_LOG_RETENTION_BYTES", default_value_t = -1, allow_negative_numbers = true)]
    log_retention_bytes: i64,
    /// How often roll-by-time and retention run, in milliseconds (Kafka: log.retention.check.interval.ms).
    #[arg(
        long,
        env = "SEMEL_LOG_RETENTION_CHECK_INTERVAL_MS",
        default_value_t = 300_000
    )]
    log_retention_check_interval_ms: u64,
    /// Longest a record produced with acks 0 or 1 waits in the page cache before it is
    /// fsynced, in milliseconds; 0: only once its segment rolls, within a second of the roll
    /// (Kafka: log.flush.interval.ms).
    #[arg(long, env = "SEMEL_LOG_FLUSH_INTERVAL_MS", default_value_t = 1_000)]
    log_flush_interval_ms: u64,
    /// Largest record batch accepted, in bytes (Kafka: message.max.bytes).
    #[arg(long, env = "SEMEL_MESSAGE_MAX_BYTES", default_value_t = 1_048_588)]
    message_max_bytes: u32,
    /// CreateTime or LogAppendTime (Kafka: log.message.timestamp.type).
    #[arg(
        long,
        env = "SEMEL_LOG_MESSAGE_TIMESTAMP_TYPE",
        default_value = "CreateTime"
    )]
    log_message_timestamp_type: String,
    /// Forget an idle producer's state after this many milliseconds (Kafka: producer.id.expiration.ms).
    #[arg(long, env = "SEMEL_PRODUCER_ID_EXPIRATION_MS", default_value_t = 24 * 3600 * 1000)]
    producer_id_expiration_ms: u64,
    /// Most producers remembered per partition; the least recently used is evicted beyond it.
    #[arg(long, env = "SEMEL_MAX_PRODUCERS_PER_PARTITION", default_value_t = semel_broker::idempotence::DEFAULT_MAX_PRODUCERS_PER_PARTITION)]
    max_producers_per_partition: usize,
    /// Largest transaction.timeout.ms a transactional producer may ask for (Kafka: transaction.max.timeout.ms).
    #[arg(
        long,
        env = "SEMEL_TRANSACTION_MAX_TIMEOUT_MS",
        default_value_t = 900_000
    )]
    transaction_max_timeout_ms: u64,
    /// Shortest session.timeout.ms a consumer may ask for (Kafka: group.min.session.timeout.ms).
    #[arg(
        long,
        env = "SEMEL_GROUP_MIN_SESSION_TIMEOUT_MS",
        default_value_t = 6_000
    )]
    group_min_session_timeout_ms: u64,
    /// Longest session.timeout.ms a consumer may ask for (Kafka: group.max.session.timeout.ms).
    #[arg(
        long,
        env = "SEMEL_GROUP_MAX_SESSION_TIMEOUT_MS",
        default_value_t = 1_800_000
    )]
    group_max_session_timeout_ms: u64,
    /// How long an empty group's first rebalance waits for more members (Kafka: group.initial.rebalance.delay.ms).
    #[arg(
        long,
        env = "SEMEL_GROUP_INITIAL_REBALANCE_DELAY_MS",
        default_value_t = 3_000
    )]
    group_initial_rebalance_delay_ms: u64,
    /// Most members in one group (Kafka: group.max.size).
    #[arg(long, env = "SEMEL_GROUP_MAX_SIZE", default_value_t = usize::MAX)]
    group_max_size: usize,
    /// Delete the committed offsets of a group empty this long, in minutes (Kafka: offsets.retention.minutes).
    #[arg(
        long,
        env = "SEMEL_OFFSETS_RETENTION_MINUTES",
        default_value_t = 10_080
    )]
    offsets_retention_minutes: u64,
    /// Largest metadata string kept with a committed offset (Kafka: offset.metadata.max.bytes).
    #[arg(long, env = "SEMEL_OFFSET_METADATA_MAX_BYTES", default_value_t = 4096)]
    offset_metadata_max_bytes: usize,
    /// How long shutdown waits for in-flight requests, in milliseconds.
    #[arg(long, env = "SEMEL_SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    shutdown_grace_ms: u64,
    /// The listener's protocol: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL (Kafka: listener.security.protocol.map).
    #[arg(long, env = "SEMEL_SECURITY_PROTOCOL", default_value = "PLAINTEXT")]
    security_protocol: String,
    /// PEM certificate chain of the broker, for SSL and SASL_SSL (Kafka: ssl.keystore.certificate.chain; librdkafka: ssl.certificate.location).
    #[arg(long, env = "SEMEL_SSL_CERTIFICATE_LOCATION")]
    ssl_certificate_location: Option<PathBuf>,
    /// PEM private key of that certificate (Kafka: ssl.keystore.key; librdkafka: ssl.key.location).
    #[arg(long, env = "SEMEL_SSL_KEY_LOCATION")]
    ssl_key_location: Option<PathBuf>,
    /// PEM authorities that sign client certificates, with --ssl-client-auth (Kafka: ssl.truststore.certificates).
    #[arg(long, env = "SEMEL_SSL_CA_LOCATION")]
    ssl_ca_location: Option<PathBuf>,
    /// Ask TLS clients for a certificate: none, requested or required (Kafka: ssl.client.auth).
    #[arg(long, env = "SEMEL_SSL_CLIENT_AUTH", default_value = "none")]
    ssl_client_auth: String,
    /// SASL mechanisms offered, comma-separated: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 (Kafka: sasl.enabled.mechanisms).
    #[arg(
        long,
        env = "SEMEL_SASL_ENABLED_MECHANISMS",
        default_value = "PLAIN,SCRAM-SHA-256,SCRAM-SHA-512"
    )]
    sasl_enabled_mechanisms: String,
    /// TOML file of the users SASL accepts ([[users]] name = .., password = ..), for SASL_PLAINTEXT and SASL_SSL.
    #[arg(long, env = "SEMEL_SASL_USERS_FILE")]
    sasl_users_file: Option<PathBuf>,
    /// Log filter, e.g. info or semel_broker=debug (tracing-subscriber EnvFilter syntax).
    #[arg(long, env = "SEMEL_LOG_LEVEL", default_value = "info")]
    log_level: String,
}

/// The arguments from `argv`, the environment and `--config`'s file, in that order of
/// precedence over the defaults.
fn parse_args(argv: Vec<OsString>) -> anyhow::Result<Args> {
    let matches = Args::command().try_get_matches_from(&argv)?;
    let Some(path) = matches.get_one::<PathBuf>("config").cloned() else {
        return Ok(Args::from_arg_matches(&matches)?);
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read --config {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("--config {}: not valid TOML", path.display()))?;
    let command = Args::command();
    let mut from_file = Vec::new();
    for (key, value) in table {
        let id = key.replace('-', "_");
        let known = id != "config" && command.get_arguments().any(|a| a.get_id() == id.as_str());
        anyhow::ensure!(
            known,
            "--config {}: unknown key {key:?} (the keys are the flags' names, such as data-dir)",
            path.display()
        );
        let value = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => anyhow::bail!(
                "--config {}: {key} must be a string, a number or a boolean, not {}",
                path.display(),
                other.type_str()
            ),
        };
        // Only where neither a flag nor the environment gave a value.
        if matches!(
            matches.value_source(&id),
            None | Some(ValueSource::DefaultValue)
        ) {
            from_file.push(OsString::from(format!(
                "--{}={value}",
                id.replace('_', "-")
            )));
        }
    }
    let mut argv = argv;
    argv.extend(from_file);
    let matches = Args::command().try_get_matches_from(argv)?;
    Ok(Args::from_arg_matches(&matches)?)
}

fn main() -> anyhow::Result<()> {
    let args = match parse_args(std::env::args_os().collect()) {
        Ok(args) => args,
        // --help, --version and usage errors print as clap prints them.
        Err(e) => match e.downcast::<clap::Error>() {
            Ok(clap_error) => clap_error.exit(),
            Err(e) => return Err(e),
        },
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log_level)
                .with_context(|| format!("invalid --log-level {:?}", args.log_level))?,
        )
        .init();
    let timestamp_type = match args.log_message_timestamp_type.as_str() {
        "CreateTime" => TimestampType::CreateTime,
        "LogAppendTime" => TimestampType::LogAppendTime,
        other => anyhow::bail!(
            "--log-message-timestamp-type must be CreateTime or LogAppendTime, not {other:?}"
        ),
    };
    let security = ListenerSecurity {
        protocol: SecurityProtocol::from_name(&args.security_protocol).with_context(|| {
            format!(
                "--security-protocol must be PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL, not {:?}",
                args.security_protocol
            )
        })?,
        ssl_certificate_location: args.ssl_certificate_location,
        ssl_key_location: args.ssl_key_location,
        ssl_ca_location: args.ssl_ca_location,
        ssl_client_auth: ClientAuth::from_name(&args.ssl_client_auth).with_context(|| {
            format!(
                "--ssl-client-auth must be none, requested or required, not {:?}",
                args.ssl_client_auth
            )
        })?,
        sasl_enabled_mechanisms: args
            .sasl_enabled_mechanisms
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(|name| {
                SaslMechanism::from_name(name).with_context(|| {
                    format!(
                        "--sasl-enabled-mechanisms: {name:?} is not PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"
                    )
                })
            })
            .collect::<anyhow::Result<_>>()?,
        sasl_users_file: args.sasl_users_file,
    };
    let config = BrokerConfig {
        security,
        listen: args.listen,
        advertised_listener: args.advertised_listener,
        data_dir: args.data_dir,
        node_id: args.node_id,
        max_frame_bytes: args.socket_request_max_bytes,
        queued_max_request_bytes: args.queued_max_request_bytes,
        fetch_max_bytes: args.fetch_max_bytes,
        max_connections: args.max_connections,
        metrics_listen: args.metrics_listen,
        auto_create_topics: args.auto_create_topics_enable,
        num_partitions: args.num_partitions,
        log: LogConfig {
            segment_bytes: args.log_segment_bytes,
            segment_ms: args.log_roll_ms,
            retention_ms: args.log_retention_ms,
            retention_bytes: args.log_retention_bytes,
            max_message_bytes: args.message_max_bytes,
            timestamp_type,
            ..LogConfig::default()
        },
        retention_check_interval: Duration::from_millis(
            args.log_retention_check_interval_ms.max(1),
        ),
        log_flush_interval: (args.log_flush_interval_ms > 0)
            .then(|| Duration::from_millis(args.log_flush_interval_ms)),
        shutdown_grace: Duration::from_millis(args.shutdown_grace_ms),
        producer_id_expiration: Duration::from_millis(args.producer_id_expiration_ms),
        max_producers_per_partition: args.max_producers_per_partition,
        transaction_max_timeout: Duration::from_millis(args.transaction_max_timeout_ms),
        group: GroupConfig {
            min_session_timeout: Duration::from_millis(args.group_min_session_timeout_ms),
            max_session_timeout: Duration::from_millis(args.group_max_session_timeout_ms),
            initial_rebalance_delay: Duration::from_millis(args.group_initial_rebalance_delay_ms),
            max_size: args.group_max_size,
            offsets_retention: Duration::from_secs(
                args.offsets_retention_minutes.saturating_mul(60),
            ),
            offset_metadata_max_bytes: args.offset_metadata_max_bytes,
        },
        ..BrokerConfig::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let broker = Broker::start(config)
            .await
            .context("broker failed to start")?;
        // Tests and scripts read this line to learn the bound port.
        println!("semel-broker listening on {}", broker.local_addr());
        wait_for_signal().await?;
        tracing::info!("shutting down");
        broker.shutdown().await;
        Ok(())
    })
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("cannot listen for SIGINT")?,
        _ = terminate.recv() => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(config: &str, flags: &[&str]) -> anyhow::Result<Args> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("semel.toml");
        std::fs::write(&path, config)?;
        let mut argv: Vec<OsString> = vec!["semel-broker".into(), "--config".into(), path.into()];
        argv.extend(flags.iter().map(OsString::from));
        parse_args(argv)
    }

    #[test]
    fn the_config_file_sets_what_no_flag_gives() -> anyhow::Result<()> {
        let args = parse(
            "data-dir = \"/tmp/semel-from-file\"\nnum-partitions = 3\n\
             auto-create-topics-enable = false\nlog-retention-ms = -1\n",
            &[],
        )?;
        assert_eq!(args.data_dir, PathBuf::from("/tmp/semel-from-file"));
        assert_eq!(args.num_partitions, 3);
        assert!(!args.auto_create_topics_enable);
        assert_eq!(args.log_retention_ms, -1);
        Ok(())
    }

    #[test]
    fn a_flag_beats_the_config_file() -> anyhow::Result<()> {
        let args = parse("num-partitions = 3\n", &["--num-partitions", "2"])?;
        assert_eq!(args.num_partitions, 2);
        Ok(())
    }

    #[test]
    fn an_unknown_key_is_refused_by_name() {
        let error = parse("num-partition = 3\n", &[]).expect_err("misspelled key");
        assert!(error.to_string().contains("\"num-partition\""), "{error}");
        let error = parse("listen = [1, 2]\n", &[]).expect_err("an array");
        assert!(error.to_string().contains("listen"), "{error}");
    }
}
