//! TLS and SASL end to end (issue 22): semel-producer and semel-consumer against a SASL_SSL
//! semel-broker with each mechanism, librdkafka (kcat) and kafka-python over TLS + SCRAM, and
//! the refusals: a wrong password, an unknown user, a client that does not trust the broker's
//! certificate authority, a plaintext client on the TLS port, a request before authentication,
//! a missing client certificate where one is required.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, ensure};
use common::pki::Pki;
use common::{RawClient, TestBroker, kcat, output_within, python, stdout_of};
use kafka_protocol::messages::{
    ApiVersionsRequest, MetadataRequest, SaslAuthenticateRequest, SaslHandshakeRequest,
};
use kafka_protocol::protocol::StrBytes;
use semel::broker::security::{ClientAuth, ListenerSecurity};
use semel::client::security::scram::ScramMechanism;
use semel::client::{ClientError, SaslMechanism, SecurityConfig, SecurityProtocol};
use semel::consumer::{AutoOffsetReset, Consumer, ConsumerConfig};
use semel::producer::{ProduceError, Producer, ProducerConfig, ProducerRecord};

const LIMIT: Duration = Duration::from_secs(60);

async fn secured_broker(pki: &Pki, protocol: SecurityProtocol) -> anyhow::Result<TestBroker> {
    let listener = pki.listener(protocol);
    TestBroker::start_with(move |config| config.security = listener).await
}

fn producer_config(bootstrap: &str, security: SecurityConfig) -> ProducerConfig {
    ProducerConfig {
        bootstrap_servers: vec![bootstrap.to_string()],
        security,
        delivery_timeout: Duration::from_secs(20),
        request_timeout: Duration::from_secs(10),
        ..ProducerConfig::default()
    }
}

/// Values of `topic` partition 0 read by a semel consumer with `security`, until `count`.
async fn read_values(
    bootstrap: &str,
    security: SecurityConfig,
    topic: &str,
    count: usize,
) -> anyhow::Result<Vec<String>> {
    let mut consumer = Consumer::connect(ConsumerConfig {
        bootstrap_servers: vec![bootstrap.to_string()],
        security,
        auto_offset_reset: AutoOffsetReset::Earliest,
        ..ConsumerConfig::default()
    })
    .await?;
    consumer.assign([(topic.to_string(), 0)])?;
    let mut values = Vec::new();
    let deadline = tokio::time::Instant::now() + LIMIT;
    while values.len() < count {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "only {values:?} of {count} records within {LIMIT:?}"
        );
        for record in consumer.poll(Duration::from_millis(200)).await? {
            values
                .push(String::from_utf8_lossy(record.value.as_deref().unwrap_or_default()).into());
        }
    }
    Ok(values)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semel_clients_work_over_sasl_ssl_with_every_mechanism() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let broker = secured_broker(&pki, SecurityProtocol::SaslSsl).await?;
    let bootstrap = broker.bootstrap();
    let mechanisms = [
        SaslMechanism::Plain,
        SaslMechanism::Scram(ScramMechanism::Sha256),
        SaslMechanism::Scram(ScramMechanism::Sha512),
    ];
    for (n, mechanism) in mechanisms.into_iter().enumerate() {
        let security = pki.client(
            SecurityProtocol::SaslSsl,
            mechanism,
            "alice",
            "alice-secret",
        );
        let producer = Producer::connect(producer_config(&bootstrap, security.clone())).await?;
        let delivered = producer
            .send(ProducerRecord::new("secured", format!("over {}", mechanism.name())).partition(0))
            .await?
            .await?;
        ensure!(delivered.offset == n as i64, "offset {}", delivered.offset);
        producer.close().await;
        let values = read_values(&bootstrap, security, "secured", n + 1).await?;
        ensure!(
            values.last().map(String::as_str)
                == Some(format!("over {}", mechanism.name()).as_str()),
            "{values:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_or_unknown_user_fails_at_once_with_an_authentication_error()
-> anyhow::Result<()> {
    let pki = Pki::new()?;
    let broker = secured_broker(&pki, SecurityProtocol::SaslSsl).await?;
    for (mechanism, user, password) in [
        (
            SaslMechanism::Scram(ScramMechanism::Sha256),
            "alice",
            "wrong",
        ),
        (
            SaslMechanism::Scram(ScramMechanism::Sha512),
            "mallory",
            "alice-secret",
        ),
        (SaslMechanism::Plain, "bob", "alice-secret"),
    ] {
        let security = pki.client(SecurityProtocol::SaslSsl, mechanism, user, password);
        let started = std::time::Instant::now();
        let result = Producer::connect(producer_config(&broker.bootstrap(), security)).await;
        match result {
            Err(ProduceError::Client(ClientError::Authentication { reason, .. })) => {
                ensure!(
                    reason.contains("SaslAuthenticationFailed"),
                    "{user}: {reason}"
                );
            }
            other => anyhow::bail!("{user} with {}: {other:?}", mechanism.name()),
        }
        // Not retried until a timeout: wrong credentials stay wrong.
        ensure!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refusals_untrusted_authority_plaintext_client_and_missing_client_certificate()
-> anyhow::Result<()> {
    let pki = Pki::new()?;
    let broker = secured_broker(&pki, SecurityProtocol::Ssl).await?;
    let bootstrap = broker.bootstrap();
    let quick = |security: SecurityConfig| ProducerConfig {
        request_timeout: Duration::from_secs(3),
        ..producer_config(&bootstrap, security)
    };
    // A client that trusts another authority: the handshake fails, and says so.
    let untrusting = SecurityConfig {
        protocol: SecurityProtocol::Ssl,
        ssl_ca_location: Some(pki.path("other-ca.pem")),
        ..SecurityConfig::default()
    };
    let error = Producer::connect(quick(untrusting))
        .await
        .err()
        .context("a client that does not trust the broker's authority connected")?;
    ensure!(
        error.to_string().contains("TLS handshake failed"),
        "{error}"
    );
    // A plaintext Kafka client on the TLS port gets no answer, and the broker goes on.
    let mut raw = RawClient::connect(broker.addr()).await?;
    let (_, frame) = raw.encode(3, &MetadataRequest::default())?;
    raw.send_frame(&frame).await?;
    ensure!(
        raw.read_frame().await.map_or(true, |f| f.is_none()),
        "a plaintext request on the TLS port was answered"
    );
    let trusting = SecurityConfig {
        protocol: SecurityProtocol::Ssl,
        ssl_ca_location: Some(pki.path("ca.pem")),
        ..SecurityConfig::default()
    };
    let producer = Producer::connect(quick(trusting.clone())).await?;
    producer
        .send(ProducerRecord::new("tls", "after the refusals").partition(0))
        .await?
        .await?;
    producer.close().await;
    drop(broker);

    // A broker whose certificate expired: refused by the client, naming the reason.
    let listener = ListenerSecurity {
        ssl_certificate_location: Some(pki.path("expired.pem")),
        ssl_key_location: Some(pki.path("expired.key")),
        ..pki.listener(SecurityProtocol::Ssl)
    };
    let expired = TestBroker::start_with(move |config| config.security = listener).await?;
    let error = Producer::connect(ProducerConfig {
        request_timeout: Duration::from_secs(3),
        ..producer_config(&expired.bootstrap(), trusting.clone())
    })
    .await
    .err()
    .context("a client accepted an expired certificate")?;
    ensure!(
        error.to_string().to_lowercase().contains("expired"),
        "{error}"
    );
    drop(expired);

    // ssl.client.auth=required: without a certificate the handshake fails; with one signed
    // by the configured authority, records flow.
    let listener = ListenerSecurity {
        ssl_ca_location: Some(pki.path("ca.pem")),
        ssl_client_auth: ClientAuth::Required,
        ..pki.listener(SecurityProtocol::Ssl)
    };
    let broker = TestBroker::start_with(move |config| config.security = listener).await?;
    let bootstrap = broker.bootstrap();
    let quick = |security: SecurityConfig| ProducerConfig {
        request_timeout: Duration::from_secs(3),
        ..producer_config(&bootstrap, security)
    };
    ensure!(
        Producer::connect(quick(trusting.clone())).await.is_err(),
        "a client without a certificate was served where one is required"
    );
    let with_certificate = SecurityConfig {
        ssl_certificate_location: Some(pki.path("client.pem")),
        ssl_key_location: Some(pki.path("client.key")),
        ..trusting
    };
    let producer = Producer::connect(quick(with_certificate)).await?;
    producer
        .send(ProducerRecord::new("mtls", "with a client certificate").partition(0))
        .await?
        .await?;
    producer.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_but_sasl_is_served_before_authentication() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let listener = pki.listener(SecurityProtocol::SaslPlaintext);
    let broker = TestBroker::start_with(move |config| {
        config.security = listener;
        config.metrics_listen = Some("127.0.0.1:0".parse().expect("address"));
    })
    .await?;
    // ApiVersions is allowed (clients ask it first); Metadata closes the connection unanswered.
    let mut raw = RawClient::connect(broker.addr()).await?;
    let versions = raw.send(3, &ApiVersionsRequest::default()).await?;
    ensure!(versions.error_code == 0);
    let (_, frame) = raw.encode(12, &MetadataRequest::default().with_topics(None))?;
    raw.send_frame(&frame).await?;
    ensure!(
        raw.read_frame().await?.is_none(),
        "an unauthenticated Metadata request was answered"
    );
    // A wrong PLAIN password: SASL_AUTHENTICATION_FAILED, then the connection closes.
    let mut raw = RawClient::connect(broker.addr()).await?;
    let handshake = raw
        .send(
            1,
            &SaslHandshakeRequest::default().with_mechanism(StrBytes::from_static_str("PLAIN")),
        )
        .await?;
    ensure!(handshake.error_code == 0, "{handshake:?}");
    let answer = raw
        .send(
            2,
            &SaslAuthenticateRequest::default()
                .with_auth_bytes(bytes::Bytes::from_static(b"\0alice\0guess")),
        )
        .await?;
    ensure!(answer.error_code == 58, "{answer:?}"); // SASL_AUTHENTICATION_FAILED
    ensure!(
        raw.read_frame().await?.is_none(),
        "still open after a failure"
    );
    // An unknown mechanism is answered with the enabled ones, and the client may try again.
    let mut raw = RawClient::connect(broker.addr()).await?;
    let handshake = raw
        .send(
            1,
            &SaslHandshakeRequest::default().with_mechanism(StrBytes::from_static_str("GSSAPI")),
        )
        .await?;
    ensure!(handshake.error_code == 33, "{handshake:?}"); // UNSUPPORTED_SASL_MECHANISM
    ensure!(handshake.mechanisms.len() == 3, "{handshake:?}");
    // SaslHandshake v0: the tokens that follow are raw frames (no request header).
    let handshake = raw
        .send(
            0,
            &SaslHandshakeRequest::default().with_mechanism(StrBytes::from_static_str("PLAIN")),
        )
        .await?;
    ensure!(handshake.error_code == 0, "{handshake:?}");
    raw.send_frame(b"\0bob\0bob-secret").await?;
    let token = raw
        .read_frame()
        .await?
        .context("no answer to the raw token")?;
    ensure!(token.is_empty(), "PLAIN answers an empty token: {token:?}");
    let metadata = raw
        .send(12, &MetadataRequest::default().with_topics(None))
        .await?;
    ensure!(metadata.brokers.len() == 1, "{metadata:?}");
    // One success (bob over v0) and one failure (alice's wrong password), as counted.
    let metrics = broker.handle.metrics_addr().context("no metrics address")?;
    let (_, body) = common::http_get(metrics, "/metrics").await?;
    let value = |name: &str| -> Option<f64> {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
    };
    ensure!(
        value("semel_sasl_authentications_succeeded_total ") == Some(1.0),
        "{body}"
    );
    ensure!(
        value("semel_sasl_authentications_failed_total ") == Some(1.0),
        "{body}"
    );
    Ok(())
}

fn kcat_secured(pki: &Pki, args: &[&str], mechanism: &str, password: &str) -> Command {
    let mut command = Command::new(kcat().unwrap_or_else(|_| "kcat".into()));
    command.args(args).args([
        "-X",
        "security.protocol=SASL_SSL",
        "-X",
        &format!("sasl.mechanisms={mechanism}"),
        "-X",
        "sasl.username=alice",
        "-X",
        &format!("sasl.password={password}"),
        "-X",
        &format!("ssl.ca.location={}", pki.path("ca.pem").display()),
    ]);
    command
}

fn with_file(value: &str) -> anyhow::Result<tempfile::NamedTempFile> {
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), value)?;
    Ok(file)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn librdkafka_and_kafka_python_work_over_tls_and_scram_and_are_refused_a_wrong_password()
-> anyhow::Result<()> {
    kcat()?;
    let pki = Pki::new()?;
    let broker = secured_broker(&pki, SecurityProtocol::SaslSsl).await?;
    let bootstrap = broker.bootstrap();

    // kcat (librdkafka) produces over SASL_SSL with SCRAM-SHA-512 ...
    let value = with_file("from librdkafka")?;
    let mut produce = kcat_secured(
        &pki,
        &["-P", "-b", &bootstrap, "-t", "rdkafka", "-p", "0", "-l"],
        "SCRAM-SHA-512",
        "alice-secret",
    );
    produce.arg(value.path());
    let out = tokio::task::block_in_place(|| output_within(&mut produce, LIMIT, "kcat -P"))?;
    stdout_of(&out, "kcat producing over SASL_SSL")?;
    // ... semel-consumer reads it over SASL_SSL with SCRAM-SHA-256 ...
    let security = pki.client(
        SecurityProtocol::SaslSsl,
        SaslMechanism::Scram(ScramMechanism::Sha256),
        "alice",
        "alice-secret",
    );
    let values = read_values(&bootstrap, security, "rdkafka", 1).await?;
    ensure!(values == ["from librdkafka"], "{values:?}");
    // ... and kcat reads it back.
    let mut consume = kcat_secured(
        &pki,
        &[
            "-C",
            "-b",
            &bootstrap,
            "-t",
            "rdkafka",
            "-o",
            "beginning",
            "-e",
            "-q",
        ],
        "SCRAM-SHA-256",
        "alice-secret",
    );
    let out = tokio::task::block_in_place(|| output_within(&mut consume, LIMIT, "kcat -C"))?;
    let read = stdout_of(&out, "kcat consuming over SASL_SSL")?;
    ensure!(read.trim() == "from librdkafka", "{read:?}");
    // A wrong password: kcat fails with librdkafka's authentication error.
    let mut refused = kcat_secured(&pki, &["-L", "-b", &bootstrap], "SCRAM-SHA-512", "nope");
    refused.args(["-m", "10"]);
    let out = tokio::task::block_in_place(|| output_within(&mut refused, LIMIT, "kcat -L"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "kcat with a wrong password listed metadata"
    );
    ensure!(
        stderr.contains("Authentication failed") || stderr.contains("SASL authentication error"),
        "{stderr}"
    );

    // kafka-python over SASL_SSL with SCRAM-SHA-256: a round trip, then a wrong password.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/kafka_python_sasl.py");
    let mut command = Command::new(python()?);
    command.arg(&script).arg(&bootstrap).arg(pki.path("ca.pem"));
    let out = tokio::task::block_in_place(|| output_within(&mut command, LIMIT, "kafka-python"))?;
    let printed = stdout_of(&out, "kafka-python over SASL_SSL")?;
    eprintln!("{printed}");
    ensure!(printed.contains("round trip ok"), "{printed}");
    ensure!(printed.contains("wrong password refused"), "{printed}");
    ensure!(printed.contains("confluent-kafka ok"), "{printed}");
    Ok(())
}

/// Simple ACLs (issue 22): carol may use `orders*` topics and the `billing` group only. Other
/// topics are answered TOPIC_AUTHORIZATION_FAILED (to semel's clients and to librdkafka),
/// are never auto-created, and are left out of her topic list; another group is answered
/// GROUP_AUTHORIZATION_FAILED; alice, without limits, sees everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_user_gets_authorization_errors_for_other_topics_and_groups() -> anyhow::Result<()>
{
    use semel::client::admin::NewTopic;
    use semel::client::{Admin, ClientConfig, ConnectionConfig};
    let pki = Pki::new()?;
    let broker = secured_broker(&pki, SecurityProtocol::SaslPlaintext).await?;
    let bootstrap = broker.bootstrap();
    let plain = |user: &str, password: &str| SecurityConfig {
        ssl_ca_location: None,
        ..pki.client(
            SecurityProtocol::SaslPlaintext,
            SaslMechanism::Scram(ScramMechanism::Sha256),
            user,
            password,
        )
    };
    let admin_as = |user: &str, password: &str| {
        Admin::connect(ClientConfig {
            bootstrap_servers: vec![bootstrap.clone()],
            connection: ConnectionConfig {
                security: plain(user, password),
                ..ConnectionConfig::default()
            },
            ..ClientConfig::default()
        })
    };
    let alice = admin_as("alice", "alice-secret").await?;
    for name in ["orders-eu", "payments"] {
        let created = alice
            .create_topics(&[NewTopic {
                name: name.into(),
                partitions: 1,
                replication_factor: 1,
                configs: Default::default(),
            }])
            .await?;
        ensure!(created.iter().all(|(_, r)| r.is_ok()), "{created:?}");
    }
    let carol = admin_as("carol", "carol-secret").await?;
    let topics: Vec<String> = carol.list_topics().await?.into_keys().collect();
    ensure!(topics == ["orders-eu"], "carol lists {topics:?}");
    let everything: Vec<String> = alice.list_topics().await?.into_keys().collect();
    ensure!(
        everything == ["orders-eu", "payments"],
        "alice lists {everything:?}"
    );
    let created = carol
        .create_topics(&[NewTopic {
            name: "secrets".into(),
            partitions: 1,
            replication_factor: 1,
            configs: Default::default(),
        }])
        .await?;
    ensure!(
        format!("{created:?}").contains("TopicAuthorizationFailed"),
        "{created:?}"
    );
    match carol.describe_group("other").await {
        Err(ClientError::Broker { code, .. }) => ensure!(
            code == kafka_protocol::ResponseError::GroupAuthorizationFailed,
            "{code:?}"
        ),
        other => anyhow::bail!("carol described another group: {other:?}"),
    }
    carol.describe_group("billing").await?;

    // Her producer writes orders-eu, and is refused payments.
    let producer = Producer::connect(ProducerConfig {
        delivery_timeout: Duration::from_secs(8),
        request_timeout: Duration::from_secs(5),
        ..producer_config(&bootstrap, plain("carol", "carol-secret"))
    })
    .await?;
    producer
        .send(ProducerRecord::new("orders-eu", "allowed").partition(0))
        .await?
        .await?;
    let refused = async {
        producer
            .send(ProducerRecord::new("payments", "denied").partition(0))
            .await?
            .await
    };
    let error = refused.await.err().context("carol wrote to payments")?;
    ensure!(error.to_string().contains("TopicAuthorization"), "{error}");
    producer.close().await;

    // librdkafka sees the same refusal, and payments still holds nothing.
    let value = with_file("from kcat")?;
    let mut kcat_produce = Command::new(kcat()?);
    kcat_produce
        .args(["-P", "-b", &bootstrap, "-t", "payments", "-p", "0"])
        .args([
            "-X",
            "security.protocol=SASL_PLAINTEXT",
            "-X",
            "sasl.mechanisms=PLAIN",
        ])
        .args([
            "-X",
            "sasl.username=carol",
            "-X",
            "sasl.password=carol-secret",
        ])
        .args(["-X", "message.timeout.ms=5000", "-l"])
        .arg(value.path());
    let out = tokio::task::block_in_place(|| output_within(&mut kcat_produce, LIMIT, "kcat"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        stderr.contains("authorization failed") || stderr.contains("Authorization failed"),
        "kcat as carol to payments: {stderr}"
    );
    let ends = alice
        .list_offsets(
            &[("payments".to_string(), 0)],
            semel::client::admin::OffsetSpec::Latest,
        )
        .await?;
    ensure!(
        ends.values().all(|end| *end == 0),
        "payments got records: {ends:?}"
    );
    Ok(())
}
