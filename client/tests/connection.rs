//! The connection layer against a real semel-broker and against scripted fake brokers over
//! `tokio::io::duplex` (for framing errors, timeouts and the ApiVersions v0 fallback).

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::{
    ApiKey, ApiVersionsResponse, CreateTopicsRequest, MetadataRequest, RequestHeader,
    ResponseHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use semel_client::{ClientConfig, ClientError, Cluster, Connection, ConnectionConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

type TestResult = Result<(), Box<dyn std::error::Error>>;

async fn broker()
-> Result<(semel_broker::BrokerHandle, tempfile::TempDir), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let handle = semel_broker::Broker::start(semel_broker::BrokerConfig {
        listen: "127.0.0.1:0".parse()?,
        data_dir: dir.path().to_path_buf(),
        ..semel_broker::BrokerConfig::default()
    })
    .await?;
    Ok((handle, dir))
}

#[tokio::test]
async fn negotiates_versions_and_pipelines_concurrent_requests() -> TestResult {
    let (handle, _dir) = broker().await?;
    let address = handle.local_addr().to_string();
    let cluster = Cluster::connect(ClientConfig {
        // The first address refuses connections; bootstrap moves on to the next.
        bootstrap_servers: vec!["127.0.0.1:1".into(), address.clone()],
        ..ClientConfig::default()
    })
    .await?;
    // One entry may be a comma-separated list, as Kafka's bootstrap.servers is.
    Cluster::connect(ClientConfig {
        bootstrap_servers: vec![format!("127.0.0.1:1, {address}")],
        ..ClientConfig::default()
    })
    .await?;
    let connection = cluster.connection(&address).await?;
    assert_eq!(connection.version(ApiKey::Produce, (3, 9))?, 9);
    assert_eq!(
        connection.version(ApiKey::Fetch, (0, 100))?,
        12,
        "capped by the broker"
    );
    match connection.version(ApiKey::Produce, (0, 2)) {
        Err(ClientError::UnsupportedVersion { theirs, .. }) => assert_eq!(theirs, Some((3, 9))),
        other => panic!("expected UnsupportedVersion, got {other:?}"),
    }

    let created = connection
        .send(
            &CreateTopicsRequest::default()
                .with_timeout_ms(5_000)
                .with_topics(vec![
                    CreatableTopic::default()
                        .with_name(TopicName(StrBytes::from_static_str("orders")))
                        .with_num_partitions(3)
                        .with_replication_factor(1),
                ]),
            (2, 7),
        )
        .await?;
    assert_eq!(created.topics[0].error_code, 0);
    cluster
        .refresh_metadata(Some(&["orders".to_string()]), false)
        .await?;
    let topic = cluster.topic("orders").ok_or("no metadata for orders")?;
    assert_eq!(topic.partitions.len(), 3);
    assert_eq!(cluster.leader("orders", 2), Some(1));
    assert_eq!(cluster.leader("orders", 3), None);

    // 200 requests in flight on one connection at once, answered and matched correctly.
    let mut tasks = Vec::new();
    for i in 0..200 {
        let connection = Arc::clone(&connection);
        tasks.push(tokio::spawn(async move {
            let topic = if i % 2 == 0 { "orders" } else { "missing" };
            let response = connection
                .send(
                    &MetadataRequest::default()
                        .with_topics(Some(vec![
                            kafka_protocol::messages::metadata_request::MetadataRequestTopic::default()
                                .with_name(Some(TopicName(StrBytes::from_static_str(topic)))),
                        ]))
                        .with_allow_auto_topic_creation(false),
                    (4, 12),
                )
                .await?;
            Ok::<_, ClientError>((topic, response.topics[0].error_code))
        }));
    }
    for task in tasks {
        let (topic, code) = task.await??;
        let expected = if topic == "orders" { 0 } else { 3 };
        assert_eq!(
            code, expected,
            "answer for {topic} matched to the wrong request"
        );
    }

    // Requests abandoned by their callers never leave half a frame behind.
    for _ in 0..50 {
        let connection = Arc::clone(&connection);
        let task = tokio::spawn(async move {
            let _ = connection.send(&MetadataRequest::default(), (4, 12)).await;
        });
        task.abort();
    }
    let still = connection
        .send(&MetadataRequest::default(), (4, 12))
        .await?;
    assert!(!still.brokers.is_empty());
    assert!(!connection.is_broken());
    drop(connection);
    drop(cluster);
    handle.shutdown().await;
    Ok(())
}

/// Reads one request frame; returns (api key, version, correlation id).
async fn read_request(stream: &mut DuplexStream) -> std::io::Result<(i16, i16, i32)> {
    let length = stream.read_i32().await?;
    let mut payload = vec![0u8; usize::try_from(length).unwrap_or(0)];
    stream.read_exact(&mut payload).await?;
    let mut bytes = Bytes::from(payload);
    let api_key = i16::from_be_bytes([bytes[0], bytes[1]]);
    let version = i16::from_be_bytes([bytes[2], bytes[3]]);
    let api = ApiKey::try_from(api_key).map_err(|()| std::io::Error::other("api key"))?;
    let header = RequestHeader::decode(&mut bytes, api.request_header_version(version))
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok((api_key, version, header.correlation_id))
}

async fn write_response(
    stream: &mut DuplexStream,
    correlation_id: i32,
    header_version: i16,
    body: &impl Encodable,
    version: i16,
) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    ResponseHeader::default()
        .with_correlation_id(correlation_id)
        .encode(&mut buf, header_version)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    body.encode(&mut buf, version)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut frame = BytesMut::new();
    frame.put_i32(i32::try_from(buf.len()).unwrap_or(i32::MAX));
    frame.extend_from_slice(&buf);
    stream.write_all(&frame).await
}

fn api_versions(error_code: i16) -> ApiVersionsResponse {
    ApiVersionsResponse::default()
        .with_error_code(error_code)
        .with_api_keys(vec![
            ApiVersion::default()
                .with_api_key(ApiKey::ApiVersions as i16)
                .with_min_version(0)
                .with_max_version(2),
            ApiVersion::default()
                .with_api_key(ApiKey::Metadata as i16)
                .with_min_version(0)
                .with_max_version(9),
        ])
}

/// A fake broker that answers ApiVersions like a broker that only knows v0-v2 (so the client
/// falls back to v0), then hands the stream to `then`.
async fn fake_broker<F, Fut>(config: ConnectionConfig, then: F) -> Result<Connection, ClientError>
where
    F: FnOnce(DuplexStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let (client_side, mut broker_side) = tokio::io::duplex(1 << 16);
    tokio::spawn(async move {
        let Ok((key, version, correlation_id)) = read_request(&mut broker_side).await else {
            return;
        };
        assert_eq!((key, version), (18, 3));
        // KIP-511: an unknown ApiVersions version is answered in v0 with UNSUPPORTED_VERSION.
        let _ = write_response(&mut broker_side, correlation_id, 0, &api_versions(35), 0).await;
        let Ok((key, version, correlation_id)) = read_request(&mut broker_side).await else {
            return;
        };
        assert_eq!((key, version), (18, 0), "the client retries with v0");
        let _ = write_response(&mut broker_side, correlation_id, 0, &api_versions(0), 0).await;
        then(broker_side).await;
    });
    let (read, write) = tokio::io::split(client_side);
    Connection::over("fake:9092", read, write, config).await
}

#[tokio::test]
async fn api_versions_falls_back_to_v0() -> TestResult {
    let connection = fake_broker(ConnectionConfig::default(), |_stream| async {}).await?;
    assert_eq!(connection.version(ApiKey::Metadata, (4, 12))?, 9);
    assert!(connection.version(ApiKey::Produce, (3, 9)).is_err());
    Ok(())
}

#[tokio::test]
async fn a_framing_error_fails_every_in_flight_request_and_poisons_the_connection() -> TestResult {
    let connection = Arc::new(
        fake_broker(ConnectionConfig::default(), |mut stream| async move {
            for _ in 0..3 {
                if read_request(&mut stream).await.is_err() {
                    return;
                }
            }
            // A negative frame length: nothing after it can be trusted.
            let _ = stream.write_i32(-5).await;
            let _ = stream.flush().await;
            // Keep the stream open so only the bad length can be the cause.
            tokio::time::sleep(Duration::from_secs(60)).await;
        })
        .await?,
    );
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let connection = Arc::clone(&connection);
        tasks.push(tokio::spawn(async move {
            connection
                .send_version(&MetadataRequest::default(), 9)
                .await
        }));
    }
    for task in tasks {
        match task.await? {
            Err(ClientError::ConnectionBroken { cause, .. }) => {
                assert!(cause.contains("-5"), "cause names the bad length: {cause}");
            }
            other => panic!("expected ConnectionBroken, got {other:?}"),
        }
    }
    assert!(connection.is_broken());
    let later = connection
        .send_version(&MetadataRequest::default(), 9)
        .await;
    assert!(
        matches!(later, Err(ClientError::ConnectionBroken { .. })),
        "a poisoned connection fails at once: {later:?}"
    );
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_request_without_an_answer_times_out_and_breaks_the_connection() -> TestResult {
    let config = ConnectionConfig {
        request_timeout: Duration::from_secs(5),
        ..ConnectionConfig::default()
    };
    let connection = fake_broker(config, |mut stream| async move {
        // Reads the request and never answers.
        let _ = read_request(&mut stream).await;
        tokio::time::sleep(Duration::from_secs(3600)).await;
    })
    .await?;
    let result = connection
        .send_version(&MetadataRequest::default(), 9)
        .await;
    match result {
        Err(ClientError::Timeout { api, after, .. }) => {
            assert_eq!(api, ApiKey::Metadata);
            assert_eq!(after, Duration::from_secs(5));
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(
        connection.is_broken(),
        "a late answer could arrive: the connection is dropped"
    );
    Ok(())
}

#[tokio::test]
async fn an_oversized_response_frame_is_refused_before_it_is_buffered() -> TestResult {
    let config = ConnectionConfig {
        max_response_bytes: 1024,
        ..ConnectionConfig::default()
    };
    let connection = fake_broker(config, |mut stream| async move {
        if read_request(&mut stream).await.is_ok() {
            let _ = stream.write_i32(i32::MAX).await;
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
    })
    .await?;
    let result = connection
        .send_version(&MetadataRequest::default(), 9)
        .await;
    match result {
        Err(ClientError::ConnectionBroken { cause, .. }) => {
            assert!(cause.contains("2147483647"), "{cause}");
        }
        other => panic!("expected ConnectionBroken, got {other:?}"),
    }
    Ok(())
}

/// Requests queued when the connection is dropped (an acks=0 producer counts them as sent)
/// are still written, in full, before the stream is closed.
#[tokio::test]
async fn frames_queued_before_a_drop_are_still_written() -> TestResult {
    let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel::<()>();
    let (count_tx, count_rx) = tokio::sync::oneshot::channel::<usize>();
    let connection = fake_broker(ConnectionConfig::default(), |mut stream| async move {
        // Reads nothing until the client has dropped the connection, so the frames pile up
        // (the 64 KiB pipe fills after about one of them).
        let _ = dropped_rx.await;
        let mut frames = 0;
        while read_request(&mut stream).await.is_ok() {
            frames += 1;
        }
        let _ = count_tx.send(frames);
    })
    .await?;
    let topics = (0..2_000)
        .map(|i| {
            kafka_protocol::messages::metadata_request::MetadataRequestTopic::default().with_name(
                Some(TopicName(StrBytes::from_string(format!(
                    "a-topic-with-a-rather-long-name-{i:05}"
                )))),
            )
        })
        .collect();
    let request = MetadataRequest::default().with_topics(Some(topics));
    for _ in 0..10 {
        connection.send_without_response(&request, 9).await?;
    }
    drop(connection);
    let _ = dropped_tx.send(());
    let frames = tokio::time::timeout(Duration::from_secs(30), count_rx).await??;
    assert_eq!(frames, 10, "every queued frame reached the broker");
    Ok(())
}

/// A bootstrap address that accepts connections but never answers (a paused broker process):
/// the cluster gives it up after `socket.connection.setup.timeout.ms` and bootstraps from the
/// next address, instead of waiting a whole `request.timeout.ms` (here 60 s) on it.
#[tokio::test]
async fn a_broker_that_accepts_but_never_answers_is_given_up_after_the_setup_timeout() -> TestResult
{
    let (handle, _dir) = broker().await?;
    let mute = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let mute_addr = mute.local_addr()?;
    let held = tokio::spawn(async move {
        let mut streams = Vec::new();
        while let Ok((stream, _)) = mute.accept().await {
            streams.push(stream);
        }
    });
    let config = ClientConfig {
        bootstrap_servers: vec![mute_addr.to_string(), handle.local_addr().to_string()],
        connection: ConnectionConfig {
            request_timeout: Duration::from_secs(60),
            connection_setup_timeout: Duration::from_secs(2),
            ..ConnectionConfig::default()
        },
        ..ClientConfig::default()
    };
    let connected = tokio::time::timeout(Duration::from_secs(30), Cluster::connect(config)).await;
    held.abort();
    let cluster = connected.map_err(|_| "still bootstrapping after 30 s")??;
    assert!(cluster.any().await.is_ok());
    handle.shutdown().await;
    Ok(())
}
