//! The broker's Kafka APIs through a raw protocol client: topics admin, produce/fetch semantics,
//! offsets, configs, acks=0 and pipelining.

mod common;

use bytes::Bytes;
use common::{RawClient, TestBroker, TestRecord, decode_records, record_batch};
use kafka_protocol::ResponseError;
use kafka_protocol::messages::create_partitions_request::CreatePartitionsTopic;
use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
use kafka_protocol::messages::delete_topics_request::DeleteTopicState;
use kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiVersionsRequest, CreatePartitionsRequest, CreateTopicsRequest, DeleteTopicsRequest,
    DescribeConfigsRequest, FetchRequest, FetchResponse, ListOffsetsRequest, MetadataRequest,
    ProduceRequest, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::Compression;

fn name(n: &str) -> TopicName {
    TopicName(StrBytes::from_string(n.to_string()))
}

fn creatable(n: &str, partitions: i32) -> CreatableTopic {
    CreatableTopic::default()
        .with_name(name(n))
        .with_num_partitions(partitions)
        .with_replication_factor(1)
}

fn produce_request(topic: &str, partition: i32, records: Bytes, acks: i16) -> ProduceRequest {
    ProduceRequest::default()
        .with_acks(acks)
        .with_timeout_ms(10_000)
        .with_topic_data(vec![
            TopicProduceData::default()
                .with_name(name(topic))
                .with_partition_data(vec![
                    PartitionProduceData::default()
                        .with_index(partition)
                        .with_records(Some(records)),
                ]),
        ])
}

fn fetch_request(topic: &str, partition: i32, offset: i64, max_wait_ms: i32) -> FetchRequest {
    FetchRequest::default()
        .with_replica_id((-1).into())
        .with_max_wait_ms(max_wait_ms)
        .with_min_bytes(1)
        .with_max_bytes(1 << 20)
        .with_topics(vec![
            FetchTopic::default()
                .with_topic(name(topic))
                .with_partitions(vec![
                    FetchPartition::default()
                        .with_partition(partition)
                        .with_fetch_offset(offset)
                        .with_partition_max_bytes(1 << 20),
                ]),
        ])
}

fn records(values: &[&str], timestamp: i64) -> Bytes {
    let records: Vec<TestRecord> = values
        .iter()
        .map(|v| TestRecord::new("k", v, timestamp))
        .collect();
    record_batch(&records, Compression::None).expect("batch")
}

fn values(response: &FetchResponse) -> Vec<(i64, String)> {
    let partition = &response.responses[0].partitions[0];
    decode_records(partition.records.as_ref().expect("records"))
        .expect("decode")
        .into_iter()
        .map(|r| {
            (
                r.offset,
                String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn topic_admin_round_trip() -> anyhow::Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = RawClient::connect(broker.addr()).await?;

    let config = |k: &str, v: &str| {
        CreatableTopicConfig::default()
            .with_name(StrBytes::from_string(k.into()))
            .with_value(Some(StrBytes::from_string(v.into())))
    };
    let request = CreateTopicsRequest::default().with_topics(vec![
        creatable("orders", 3).with_configs(vec![config("retention.ms", "60000")]),
        creatable("replicated", 1).with_replication_factor(3),
        creatable("bad name!", 1),
        creatable("compacted", 1).with_configs(vec![config("cleanup.policy", "compact")]),
    ]);
    let response = client.send(7, &request).await?;
    let codes: Vec<i16> = response.topics.iter().map(|t| t.error_code).collect();
    assert_eq!(
        codes,
        vec![
            0,
            ResponseError::InvalidReplicationFactor.code(),
            ResponseError::InvalidTopicException.code(),
            ResponseError::InvalidConfig.code()
        ]
    );
    assert_eq!(response.topics[0].num_partitions, 3);
    assert!(!response.topics[0].topic_id.is_nil());
    let again = client
        .send(
            7,
            &CreateTopicsRequest::default().with_topics(vec![creatable("orders", 1)]),
        )
        .await?;
    assert_eq!(
        again.topics[0].error_code,
        ResponseError::TopicAlreadyExists.code()
    );

    // Metadata: broker, cluster id, controller, partitions with leader/replicas/isr.
    let metadata = client
        .send(
            12,
            &MetadataRequest::default().with_topics(Some(vec![
                MetadataRequestTopic::default().with_name(Some(name("orders"))),
            ])),
        )
        .await?;
    assert_eq!(metadata.brokers[0].port, i32::from(broker.addr().port()));
    assert_eq!(
        metadata.cluster_id.as_deref(),
        Some(broker.handle.cluster_id())
    );
    assert_eq!(metadata.controller_id.0, 1);
    let topic = &metadata.topics[0];
    assert_eq!(topic.partitions.len(), 3);
    assert!(
        topic
            .partitions
            .iter()
            .all(|p| p.leader_id.0 == 1 && p.isr_nodes.len() == 1)
    );

    // CreatePartitions grows the topic; shrinking is refused.
    let grow = CreatePartitionsRequest::default().with_topics(vec![
        CreatePartitionsTopic::default()
            .with_name(name("orders"))
            .with_count(5),
        CreatePartitionsTopic::default()
            .with_name(name("missing"))
            .with_count(5),
    ]);
    let response = client.send(3, &grow).await?;
    assert_eq!(response.results[0].error_code, 0);
    assert_eq!(
        response.results[1].error_code,
        ResponseError::UnknownTopicOrPartition.code()
    );
    let shrink = CreatePartitionsRequest::default().with_topics(vec![
        CreatePartitionsTopic::default()
            .with_name(name("orders"))
            .with_count(2),
    ]);
    assert_eq!(
        client.send(3, &shrink).await?.results[0].error_code,
        ResponseError::InvalidPartitions.code()
    );

    // DescribeConfigs: the override and a default, with sources.
    let describe = DescribeConfigsRequest::default()
        .with_include_synonyms(true)
        .with_resources(vec![
            DescribeConfigsResource::default()
                .with_resource_type(2)
                .with_resource_name(StrBytes::from_static_str("orders")),
            DescribeConfigsResource::default()
                .with_resource_type(4)
                .with_resource_name(StrBytes::from_static_str("1")),
            DescribeConfigsResource::default()
                .with_resource_type(2)
                .with_resource_name(StrBytes::from_static_str("missing")),
            DescribeConfigsResource::default()
                .with_resource_type(32)
                .with_resource_name(StrBytes::from_static_str("a-group")),
        ]);
    let response = client.send(4, &describe).await?;
    let find = |i: usize, key: &str| {
        response.results[i]
            .configs
            .iter()
            .find(|c| c.name.as_str() == key)
            .map(|c| (c.value.as_ref().map(|v| v.to_string()), c.config_source))
    };
    assert_eq!(find(0, "retention.ms"), Some((Some("60000".into()), 1)));
    assert_eq!(
        find(0, "segment.bytes"),
        Some((Some((1u64 << 30).to_string()), 5))
    );
    assert_eq!(
        find(1, "num.partitions").map(|c| c.0),
        Some(Some("1".into()))
    );
    assert_eq!(
        response.results[2].error_code,
        ResponseError::UnknownTopicOrPartition.code()
    );
    // Group configs belong to KIP-848's protocol: refused, saying why.
    assert_eq!(
        response.results[3].error_code,
        ResponseError::InvalidRequest.code()
    );
    let why = response.results[3]
        .error_message
        .as_ref()
        .map(|m| m.to_string());
    assert!(
        why.as_deref().is_some_and(|m| m.contains("classic groups")),
        "{why:?}"
    );

    // DeleteTopics by name; a second delete is unknown.
    let delete = DeleteTopicsRequest::default().with_topics(vec![
        DeleteTopicState::default().with_name(Some(name("orders"))),
    ]);
    assert_eq!(client.send(6, &delete).await?.responses[0].error_code, 0);
    assert_eq!(
        client.send(6, &delete).await?.responses[0].error_code,
        ResponseError::UnknownTopicOrPartition.code()
    );
    broker.handle.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn metadata_auto_creates_unless_disabled() -> anyhow::Result<()> {
    let broker = TestBroker::start_with(|c| c.num_partitions = 2).await?;
    let mut client = RawClient::connect(broker.addr()).await?;
    let ask = |allow: bool| {
        MetadataRequest::default()
            .with_allow_auto_topic_creation(allow)
            .with_topics(Some(vec![
                MetadataRequestTopic::default().with_name(Some(name("auto"))),
            ]))
    };
    let refused = client.send(9, &ask(false)).await?;
    assert_eq!(
        refused.topics[0].error_code,
        ResponseError::UnknownTopicOrPartition.code()
    );
    let created = client.send(9, &ask(true)).await?;
    assert_eq!(created.topics[0].error_code, 0);
    assert_eq!(created.topics[0].partitions.len(), 2);
    broker.handle.shutdown().await;

    let broker = TestBroker::start_with(|c| c.auto_create_topics = false).await?;
    let mut client = RawClient::connect(broker.addr()).await?;
    let refused = client.send(9, &ask(true)).await?;
    assert_eq!(
        refused.topics[0].error_code,
        ResponseError::UnknownTopicOrPartition.code()
    );
    let produced = client
        .send(9, &produce_request("auto", 0, records(&["x"], 1), 1))
        .await?;
    assert_eq!(
        produced.responses[0].partition_responses[0].error_code,
        ResponseError::UnknownTopicOrPartition.code()
    );
    broker.handle.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn produce_fetch_offsets_and_corrupt_batches() -> anyhow::Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = RawClient::connect(broker.addr()).await?;
    client
        .send(
            7,
            &CreateTopicsRequest::default().with_topics(vec![creatable("t", 1)]),
        )
        .await?;

    let first = client
        .send(
            9,
            &produce_request("t", 0, records(&["a", "b", "c"], 1000), 1),
        )
        .await?;
    let p = &first.responses[0].partition_responses[0];
    assert_eq!(
        (
            p.error_code,
            p.base_offset,
            p.log_append_time_ms,
            p.log_start_offset
        ),
        (0, 0, -1, 0)
    );
    let second = client
        .send(9, &produce_request("t", 0, records(&["d", "e"], 2000), -1))
        .await?;
    assert_eq!(second.responses[0].partition_responses[0].base_offset, 3);

    // A flipped byte inside the CRC-covered part: CORRUPT_MESSAGE, nothing appended.
    let mut corrupt = records(&["bad"], 3000).to_vec();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0x55;
    let refused = client
        .send(9, &produce_request("t", 0, Bytes::from(corrupt), 1))
        .await?;
    assert_eq!(
        refused.responses[0].partition_responses[0].error_code,
        ResponseError::CorruptMessage.code()
    );
    let bad_acks = client
        .send(9, &produce_request("t", 0, records(&["x"], 1), 2))
        .await?;
    assert_eq!(
        bad_acks.responses[0].partition_responses[0].error_code,
        ResponseError::InvalidRequiredAcks.code()
    );
    let no_partition = client
        .send(9, &produce_request("t", 7, records(&["x"], 1), 1))
        .await?;
    assert_eq!(
        no_partition.responses[0].partition_responses[0].error_code,
        ResponseError::UnknownTopicOrPartition.code()
    );

    // Fetch from the middle of the first batch returns that whole batch (clients skip below).
    let fetched = client.send(11, &fetch_request("t", 0, 1, 0)).await?;
    let partition = &fetched.responses[0].partitions[0];
    assert_eq!(
        (
            partition.high_watermark,
            partition.last_stable_offset,
            partition.log_start_offset
        ),
        (5, 5, 0)
    );
    let got = values(&fetched);
    assert_eq!(got.first().map(|r| r.0), Some(0));
    assert_eq!(
        got.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(),
        ["a", "b", "c", "d", "e"]
    );
    let beyond = client.send(11, &fetch_request("t", 0, 6, 0)).await?;
    assert_eq!(
        beyond.responses[0].partitions[0].error_code,
        ResponseError::OffsetOutOfRange.code()
    );
    let at_end = client.send(11, &fetch_request("t", 0, 5, 0)).await?;
    assert_eq!(at_end.responses[0].partitions[0].error_code, 0);
    assert!(values(&at_end).is_empty());

    // ListOffsets: earliest, latest (= high watermark), by timestamp, max timestamp.
    let list = |timestamp: i64| {
        ListOffsetsRequest::default()
            .with_replica_id((-1).into())
            .with_topics(vec![
                ListOffsetsTopic::default()
                    .with_name(name("t"))
                    .with_partitions(vec![
                        ListOffsetsPartition::default()
                            .with_partition_index(0)
                            .with_timestamp(timestamp),
                    ]),
            ])
    };
    for (timestamp, offset) in [
        (-2, 0),
        (-1, 5),
        (0, 0),
        (1500, 3),
        (2000, 3),
        (2001, -1),
        (-3, 3),
    ] {
        let response = client.send(7, &list(timestamp)).await?;
        let p = &response.topics[0].partitions[0];
        assert_eq!(
            (p.error_code, p.offset),
            (0, offset),
            "timestamp {timestamp}"
        );
    }
    // The sentinels of later versions, as Kafka's tools send them (`kafka-get-offsets --time
    // -4` / `-5`): the earliest local offset (v8) is the log start, since nothing is tiered;
    // the latest tiered offset (v9) is none. v10 adds a timeout.
    for (version, timestamp, offset) in [(8, -4, 0), (9, -5, -1), (10, -4, 0), (10, -1, 5)] {
        let response = client.send(version, &list(timestamp)).await?;
        let p = &response.topics[0].partitions[0];
        assert_eq!(
            (p.error_code, p.offset),
            (0, offset),
            "v{version} timestamp {timestamp}"
        );
    }
    broker.handle.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn log_append_time_topics_stamp_batches() -> anyhow::Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = RawClient::connect(broker.addr()).await?;
    let config = CreatableTopicConfig::default()
        .with_name(StrBytes::from_static_str("message.timestamp.type"))
        .with_value(Some(StrBytes::from_static_str("LogAppendTime")));
    client
        .send(
            7,
            &CreateTopicsRequest::default()
                .with_topics(vec![creatable("lat", 1).with_configs(vec![config])]),
        )
        .await?;
    let response = client
        .send(9, &produce_request("lat", 0, records(&["a"], 5), 1))
        .await?;
    let stamped = response.responses[0].partition_responses[0].log_append_time_ms;
    assert!(stamped > 1_600_000_000_000, "log_append_time_ms {stamped}");
    let fetched = client.send(11, &fetch_request("lat", 0, 0, 0)).await?;
    let stored = fetched.responses[0].partitions[0]
        .records
        .clone()
        .expect("records");
    // The stored batch carries the LogAppendTime attribute and the broker's time as its max
    // timestamp, which clients report for every record of the batch.
    let attributes = i16::from_be_bytes([stored[21], stored[22]]);
    assert_ne!(attributes & 0b1000, 0, "timestamp type bit");
    assert_eq!(i64::from_be_bytes(stored[35..43].try_into()?), stamped);
    let records = decode_records(&stored)?;
    assert_eq!(
        records[0].timestamp_type,
        kafka_protocol::records::TimestampType::LogAppend
    );
    broker.handle.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn long_poll_answers_when_data_arrives_or_the_wait_ends() -> anyhow::Result<()> {
    let broker = TestBroker::start().await?;
    let mut admin = RawClient::connect(broker.addr()).await?;
    admin
        .send(
            7,
            &CreateTopicsRequest::default().with_topics(vec![creatable("poll", 1)]),
        )
        .await?;

    // Nothing arrives: an empty answer once max_wait_ms ends, not a hang.
    let empty = admin.send(11, &fetch_request("poll", 0, 0, 100)).await?;
    assert!(values(&empty).is_empty());

    // A long wait is cut short by data: the fetch is parked, then a produce on another
    // connection completes it, with the record.
    let mut consumer = RawClient::connect(broker.addr()).await?;
    let (_, payload) = consumer.encode(11, &fetch_request("poll", 0, 0, 60_000))?;
    consumer.send_frame(&payload).await?;
    // Make sure the fetch is parked before producing: a request pipelined behind it on the same
    // connection is answered only after it, so use a separate connection to produce.
    let produced = admin
        .send(9, &produce_request("poll", 0, records(&["wake"], 1), 1))
        .await?;
    assert_eq!(produced.responses[0].partition_responses[0].error_code, 0);
    let frame = consumer.read_frame().await?.expect("fetch answered");
    let (_, response) = RawClient::decode::<FetchRequest>(11, frame)?;
    assert_eq!(values(&response), vec![(0, "wake".to_string())]);
    broker.handle.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn acks_zero_gets_no_response_and_pipelined_answers_keep_order() -> anyhow::Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = RawClient::connect(broker.addr()).await?;
    client
        .send(
            7,
            &CreateTopicsRequest::default().with_topics(vec![creatable("pipe", 1)]),
        )
        .await?;

    let (_, silent) = client.encode(9, &produce_request("pipe", 0, records(&["zero"], 1), 0))?;
    client.send_frame(&silent).await?;
    // Pipeline: acks=all produces interleaved with ApiVersions; answers come in request order.
    let mut expected = Vec::new();
    for i in 0..10 {
        let (id, payload) = if i % 2 == 0 {
            client.encode(
                9,
                &produce_request("pipe", 0, records(&[&format!("p{i}")], 1), -1),
            )?
        } else {
            client.encode(3, &ApiVersionsRequest::default())?
        };
        client.send_frame(&payload).await?;
        expected.push(id);
    }
    let mut got = Vec::new();
    for _ in 0..10 {
        let frame = client.read_frame().await?.expect("response");
        got.push(i32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]));
    }
    assert_eq!(
        got, expected,
        "responses out of order (or the acks=0 produce was answered)"
    );
    let fetched = client.send(11, &fetch_request("pipe", 0, 0, 0)).await?;
    let stored: Vec<String> = values(&fetched).into_iter().map(|r| r.1).collect();
    assert_eq!(stored, ["zero", "p0", "p2", "p4", "p6", "p8"]);
    broker.handle.shutdown().await;
    Ok(())
}

/// Two brokers on one data directory would both write its logs: the second is refused with an
/// error naming the directory, and once the first stops the directory can be used again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_broker_on_the_same_data_directory_is_refused() {
    let first = TestBroker::start().await.expect("first broker");
    let config = || semel::broker::BrokerConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: first.dir.path().to_path_buf(),
        ..semel::broker::BrokerConfig::default()
    };
    match semel::broker::Broker::start(config()).await {
        Ok(_) => panic!("a second broker started on {}", first.dir.path().display()),
        Err(e) => {
            let text = e.to_string();
            assert!(
                text.contains("in use") && text.contains(&first.dir.path().display().to_string()),
                "{text}"
            );
        }
    }
    let TestBroker { handle, dir } = first;
    handle.shutdown().await;
    let again = semel::broker::Broker::start(semel::broker::BrokerConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.path().to_path_buf(),
        ..semel::broker::BrokerConfig::default()
    })
    .await
    .expect("the directory is free once the first broker stopped");
    again.shutdown().await;
}

/// Listening on every address without saying where clients should connect would advertise
/// 0.0.0.0 in Metadata, which no client can reach: refused, as Kafka refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listening_on_every_address_needs_an_advertised_listener() {
    let dir = tempfile::tempdir().expect("dir");
    let config = |advertised: Option<&str>| semel::broker::BrokerConfig {
        listen: "0.0.0.0:0".parse().expect("addr"),
        data_dir: dir.path().to_path_buf(),
        advertised_listener: advertised.map(str::to_string),
        ..semel::broker::BrokerConfig::default()
    };
    for advertised in [None, Some("0.0.0.0:9092")] {
        match semel::broker::Broker::start(config(advertised)).await {
            Ok(_) => panic!("started advertising the unspecified address ({advertised:?})"),
            Err(e) => assert!(
                e.to_string().contains("advertised.listeners"),
                "{advertised:?}: {e}"
            ),
        }
    }
    let broker = semel::broker::Broker::start(config(Some("127.0.0.1:9092")))
        .await
        .expect("with an advertised listener");
    broker.shutdown().await;
}

/// A client asking for `i32::MAX` bytes gets at most the broker's `fetch.max.bytes` (here
/// 300 kB) of records, whatever the partition holds: one response, one bounded buffer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_responses_are_capped_by_the_broker_whatever_the_request_asks() {
    let broker = TestBroker::start_with(|c| c.fetch_max_bytes = 300_000)
        .await
        .expect("broker");
    let mut client = RawClient::connect(broker.addr()).await.expect("connect");
    let value = "x".repeat(100_000);
    for _ in 0..5 {
        let response = client
            .send(
                9,
                &produce_request("big", 0, records(&[value.as_str()], 1), -1),
            )
            .await
            .expect("produce");
        assert_eq!(response.responses[0].partition_responses[0].error_code, 0);
    }
    let request = fetch_request("big", 0, 0, 0)
        .with_max_bytes(i32::MAX)
        .with_topics(vec![
            FetchTopic::default()
                .with_topic(name("big"))
                .with_partitions(vec![
                    FetchPartition::default()
                        .with_partition(0)
                        .with_fetch_offset(0)
                        .with_partition_max_bytes(i32::MAX),
                ]),
        ]);
    let response = client.send(12, &request).await.expect("fetch");
    let records = response.responses[0].partitions[0]
        .records
        .clone()
        .unwrap_or_default();
    let batches = decode_records(&records).expect("records").len();
    assert!(
        records.len() <= 300_000 && batches >= 1,
        "{} bytes, {batches} batches in one response",
        records.len()
    );
}

/// Topic configs change after creation, as `kafka-configs --alter` does it: Kafka 4's tool
/// sends IncrementalAlterConfigs (SET and DELETE of single keys); older tools AlterConfigs
/// (the whole set replaced). Bad values and unknown topics are refused per resource, broker
/// configs are refused (they are start-up flags here), and validate_only changes nothing.
#[tokio::test]
async fn topic_configs_can_be_altered() -> anyhow::Result<()> {
    use kafka_protocol::messages::incremental_alter_configs_request::{
        AlterConfigsResource, AlterableConfig,
    };
    use kafka_protocol::messages::{AlterConfigsRequest, IncrementalAlterConfigsRequest};
    let broker = TestBroker::start().await?;
    let mut client = RawClient::connect(broker.addr()).await?;
    common::create_topic(&mut client, "orders", 1).await?;
    let s = |text: &str| StrBytes::from_string(text.to_string());
    let describe = |topic: &str| {
        DescribeConfigsRequest::default().with_resources(vec![
            DescribeConfigsResource::default()
                .with_resource_type(2)
                .with_resource_name(StrBytes::from_string(topic.to_string())),
        ])
    };
    let retention = |response: &kafka_protocol::messages::DescribeConfigsResponse| {
        response.results[0]
            .configs
            .iter()
            .find(|c| c.name.as_str() == "retention.ms")
            .map(|c| (c.value.as_ref().map(|v| v.to_string()), c.config_source))
    };
    let default_retention = retention(&client.send(4, &describe("orders")).await?);
    let set = |operation: i8, name: &str, value: Option<&str>| {
        AlterableConfig::default()
            .with_name(s(name))
            .with_config_operation(operation)
            .with_value(value.map(s))
    };
    let incremental = |resource_type: i8, name: &str, configs, validate_only| {
        IncrementalAlterConfigsRequest::default()
            .with_validate_only(validate_only)
            .with_resources(vec![
                AlterConfigsResource::default()
                    .with_resource_type(resource_type)
                    .with_resource_name(s(name))
                    .with_configs(configs),
            ])
    };
    // validate_only: accepted, nothing changes.
    let response = client
        .send(
            1,
            &incremental(
                2,
                "orders",
                vec![set(0, "retention.ms", Some("3600000"))],
                true,
            ),
        )
        .await?;
    assert_eq!(response.responses[0].error_code, 0, "{response:?}");
    assert_eq!(
        retention(&client.send(4, &describe("orders")).await?),
        default_retention
    );
    // SET.
    let response = client
        .send(
            1,
            &incremental(
                2,
                "orders",
                vec![set(0, "retention.ms", Some("3600000"))],
                false,
            ),
        )
        .await?;
    assert_eq!(response.responses[0].error_code, 0, "{response:?}");
    assert_eq!(
        retention(&client.send(4, &describe("orders")).await?),
        Some((Some("3600000".into()), 1))
    );
    // A bad value, an unknown key, an unknown topic, a broker resource: refused.
    for (resource_type, name, config, code) in [
        (2, "orders", set(0, "retention.ms", Some("soon")), 40),
        (2, "orders", set(0, "no.such.config", Some("1")), 40),
        (2, "missing", set(0, "retention.ms", Some("1")), 3),
        (4, "1", set(0, "log.retention.ms", Some("1")), 42),
    ] {
        let response = client
            .send(1, &incremental(resource_type, name, vec![config], false))
            .await?;
        assert_eq!(response.responses[0].error_code, code, "{response:?}");
        assert!(response.responses[0].error_message.is_some());
    }
    assert_eq!(
        retention(&client.send(4, &describe("orders")).await?),
        Some((Some("3600000".into()), 1))
    );
    // DELETE: back to the default.
    let response = client
        .send(
            1,
            &incremental(2, "orders", vec![set(1, "retention.ms", None)], false),
        )
        .await?;
    assert_eq!(response.responses[0].error_code, 0, "{response:?}");
    assert_eq!(
        retention(&client.send(4, &describe("orders")).await?),
        default_retention
    );
    // AlterConfigs replaces the whole set of overrides.
    let legacy = AlterConfigsRequest::default().with_resources(vec![
        kafka_protocol::messages::alter_configs_request::AlterConfigsResource::default()
            .with_resource_type(2)
            .with_resource_name(s("orders"))
            .with_configs(vec![
                kafka_protocol::messages::alter_configs_request::AlterableConfig::default()
                    .with_name(s("retention.ms"))
                    .with_value(Some(s("120000"))),
            ]),
    ]);
    let response = client.send(1, &legacy).await?;
    assert_eq!(response.responses[0].error_code, 0, "{response:?}");
    assert_eq!(
        retention(&client.send(4, &describe("orders")).await?),
        Some((Some("120000".into()), 1))
    );
    broker.handle.shutdown().await;
    Ok(())
}

/// `--metrics-listen`: Prometheus text with the requests served per API, their latency, and
/// each partition's offsets and size; `/health`; 404 elsewhere; a scraper sending junk gets its
/// connection closed and the endpoint keeps answering.
#[tokio::test]
async fn the_metrics_endpoint_reports_requests_partitions_and_health() -> anyhow::Result<()> {
    let broker = TestBroker::start_with(|c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().expect("address"));
    })
    .await?;
    let metrics = broker
        .handle
        .metrics_addr()
        .ok_or_else(|| anyhow::anyhow!("no metrics address"))?;
    let mut client = RawClient::connect(broker.addr()).await?;
    client
        .send(
            7,
            &CreateTopicsRequest::default().with_topics(vec![creatable("watched", 2)]),
        )
        .await?;
    // Scraped twice, parsed as Prometheus text: the values move with the load between.
    let mut scrapes = Vec::new();
    for round in [1, 2] {
        let produces = if round == 1 { 1 } else { 2 };
        for _ in 0..produces {
            let produced = client
                .send(
                    9,
                    &produce_request("watched", 1, records(&["a", "b"], 1000), -1),
                )
                .await?;
            assert_eq!(produced.responses[0].partition_responses[0].error_code, 0);
        }
        let (status, body) = common::http_get(metrics, "/metrics").await?;
        assert_eq!(status, "HTTP/1.1 200 OK");
        let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))?;
        scrapes.push((scrape, body));
    }
    for ((scrape, body), (produces, end)) in scrapes.iter().zip([(1.0, 2.0), (3.0, 6.0)]) {
        let value = |name: &str, labels: &[(&str, &str)]| -> Option<f64> {
            scrape.samples.iter().find_map(|sample| {
                let matches = sample.metric == name
                    && labels.iter().all(|(k, v)| sample.labels.get(k) == Some(*v));
                match (&sample.value, matches) {
                    (
                        prometheus_parse::Value::Counter(n)
                        | prometheus_parse::Value::Gauge(n)
                        | prometheus_parse::Value::Untyped(n),
                        true,
                    ) => Some(*n),
                    (prometheus_parse::Value::Histogram(buckets), true) => {
                        buckets.last().map(|b| b.count)
                    }
                    _ => None,
                }
            })
        };
        let produce = [("api", "Produce")];
        assert_eq!(
            value("semel_requests_total", &produce),
            Some(produces),
            "{body}"
        );
        assert_eq!(
            value("semel_request_duration_seconds", &produce),
            Some(produces),
            "{body}"
        );
        let partition = |p: &'static str| [("topic", "watched"), ("partition", p)];
        assert_eq!(
            value("semel_partition_log_end_offset", &partition("1")),
            Some(end),
            "{body}"
        );
        assert_eq!(
            value("semel_partition_durable_end_offset", &partition("1")),
            Some(end),
            "{body}"
        );
        assert_eq!(
            value("semel_partition_log_end_offset", &partition("0")),
            Some(0.0),
            "{body}"
        );
        assert!(
            value("semel_fsync_duration_seconds", &[]).is_some_and(|n| n >= 1.0),
            "{body}"
        );
        assert_eq!(value("semel_connections_open", &[]), Some(1.0), "{body}");
    }

    // An answered error is counted per API and Kafka error name.
    let refused = client
        .send(
            9,
            &produce_request("watched", 9, records(&["lost?"], 1000), -1),
        )
        .await?;
    assert_eq!(
        refused.responses[0].partition_responses[0].error_code,
        ResponseError::UnknownTopicOrPartition.code()
    );
    let (_, body) = common::http_get(metrics, "/metrics").await?;
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))?;
    let errors: Vec<(&str, &str, f64)> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "semel_response_errors_total")
        .filter_map(|s| match s.value {
            prometheus_parse::Value::Counter(n) => Some((
                s.labels.get("api").unwrap_or_default(),
                s.labels.get("error").unwrap_or_default(),
                n,
            )),
            _ => None,
        })
        .collect();
    assert_eq!(
        errors,
        [("Produce", "UNKNOWN_TOPIC_OR_PARTITION", 1.0)],
        "{body}"
    );

    // Junk without a header end, larger than the head limit: closed, nothing served.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut junk = tokio::net::TcpStream::connect(metrics).await?;
        let _ = junk.write_all(&vec![b'x'; 20_000]).await;
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            junk.read_to_end(&mut rest),
        )
        .await?;
        assert!(rest.is_empty(), "junk got an answer");
    }
    let (status, body) = common::http_get(metrics, "/health").await?;
    assert_eq!(
        (status.as_str(), body.as_str()),
        ("HTTP/1.1 200 OK", "ok\n")
    );
    let (status, _) = common::http_get(metrics, "/elsewhere").await?;
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    Ok(())
}
