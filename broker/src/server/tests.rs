//! The server as a whole, in-crate (for hooks only tests can reach).

use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, CreateTopicsRequest, ProduceRequest, RequestHeader, ResponseHeader,
    TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, Request, StrBytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::BrokerConfig;
use crate::log::tests::build_batch;

async fn send<R: Request>(stream: &mut TcpStream, version: i16, request: &R) -> anyhow::Result<()> {
    let api_key = ApiKey::try_from(R::KEY).map_err(|()| anyhow::anyhow!("key"))?;
    let header = RequestHeader::default()
        .with_request_api_key(R::KEY)
        .with_request_api_version(version)
        .with_correlation_id(1)
        .with_client_id(Some(StrBytes::from_static_str("server-tests")));
    let mut body = BytesMut::new();
    header.encode(&mut body, api_key.request_header_version(version))?;
    request.encode(&mut body, version)?;
    let mut frame = BytesMut::new();
    frame.put_i32(i32::try_from(body.len())?);
    frame.extend_from_slice(&body);
    stream.write_all(&frame).await?;
    Ok(())
}

async fn receive<R: Request>(stream: &mut TcpStream, version: i16) -> anyhow::Result<R::Response> {
    let length = stream.read_i32().await?;
    let mut payload = vec![0u8; usize::try_from(length)?];
    stream.read_exact(&mut payload).await?;
    let mut payload = Bytes::from(payload);
    let api_key = ApiKey::try_from(R::KEY).map_err(|()| anyhow::anyhow!("key"))?;
    ResponseHeader::decode(&mut payload, api_key.response_header_version(version))?;
    let response = R::Response::decode(&mut payload, version)?;
    anyhow::ensure!(!payload.has_remaining(), "bytes left after the response");
    Ok(response)
}

/// A segment roll that blocks on the disk (here: a hook that sleeps in it) must not stop the
/// broker from serving other connections, even with a single runtime worker thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_roll_stalled_on_the_disk_does_not_stall_other_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = crate::Broker::start(BrokerConfig {
        listen: "127.0.0.1:0".parse().expect("address"),
        data_dir: dir.path().to_path_buf(),
        ..BrokerConfig::default()
    })
    .await
    .expect("broker");
    let addr = broker.local_addr();
    let mut producer = TcpStream::connect(addr).await.expect("connect");
    let topic = TopicName(StrBytes::from_static_str("stalled-disk"));
    send(
        &mut producer,
        4,
        &CreateTopicsRequest::default()
            .with_topics(vec![
                CreatableTopic::default()
                    .with_name(topic.clone())
                    .with_num_partitions(1)
                    .with_replication_factor(1)
                    .with_configs(vec![
                        CreatableTopicConfig::default()
                            .with_name(StrBytes::from_static_str("segment.bytes"))
                            .with_value(Some(StrBytes::from_static_str("1024"))),
                    ]),
            ])
            .with_timeout_ms(10_000),
    )
    .await
    .expect("send");
    let created = receive::<CreateTopicsRequest>(&mut producer, 4)
        .await
        .expect("created");
    assert_eq!(created.topics[0].error_code, 0);

    // 700-byte values: the first batch fits the 1024-byte segment, the second rolls it.
    let produce = |topic: &TopicName| {
        ProduceRequest::default()
            .with_acks(1)
            .with_timeout_ms(10_000)
            .with_topic_data(vec![
                TopicProduceData::default()
                    .with_name(topic.clone())
                    .with_partition_data(vec![
                        PartitionProduceData::default()
                            .with_index(0)
                            .with_records(Some(Bytes::from(build_batch(1, 0, 700)))),
                    ]),
            ])
    };
    send(&mut producer, 7, &produce(&topic))
        .await
        .expect("send");
    let first = receive::<ProduceRequest>(&mut producer, 7)
        .await
        .expect("first produce");
    assert_eq!(first.responses[0].partition_responses[0].base_offset, 0);
    const STALL: Duration = Duration::from_millis(1500);
    crate::partition::slow_disk::set("stalled-disk", STALL);
    let started = Instant::now();
    send(&mut producer, 7, &produce(&topic))
        .await
        .expect("send");
    // Give the broker time to start the append, then ask something of it elsewhere.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut other = TcpStream::connect(addr).await.expect("connect");
    send(&mut other, 3, &ApiVersionsRequest::default())
        .await
        .expect("send");
    let versions = tokio::time::timeout(STALL, receive::<ApiVersionsRequest>(&mut other, 3))
        .await
        .expect("another connection is answered while the append is stalled")
        .expect("ApiVersions");
    assert_eq!(versions.error_code, 0);
    assert!(started.elapsed() < STALL, "{:?}", started.elapsed());
    let produced = receive::<ProduceRequest>(&mut producer, 7)
        .await
        .expect("the stalled produce is answered");
    let partition = &produced.responses[0].partition_responses[0];
    assert_eq!((partition.error_code, partition.base_offset), (0, 1));
    broker.shutdown().await;
}
