//! Durability with the real `semel-broker` binary as a child process: `kill -9` after
//! `acks=all`, a torn log tail, and a full disk (a file-size limit, EFBIG).

mod common;

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, ensure};
use bytes::Bytes;
use common::{ChildBroker, RawClient, TestRecord, decode_records, record_batch};
use kafka_protocol::ResponseError;
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::produce_response::PartitionProduceResponse;
use kafka_protocol::messages::{CreateTopicsRequest, FetchRequest, ProduceRequest, TopicName};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::Compression;

fn topic_name(name: &str) -> TopicName {
    TopicName(StrBytes::from_string(name.to_string()))
}

async fn create_topic(client: &mut RawClient, name: &str, partitions: i32) -> anyhow::Result<()> {
    let request = CreateTopicsRequest::default()
        .with_timeout_ms(5000)
        .with_topics(vec![
            CreatableTopic::default()
                .with_name(topic_name(name))
                .with_num_partitions(partitions)
                .with_replication_factor(1),
        ]);
    let response = client.send(7, &request).await?;
    ensure!(
        response.topics[0].error_code == 0,
        "create {name}: {:?}",
        response.topics[0]
    );
    Ok(())
}

fn produce_request(topic: &str, partition: i32, batch: Bytes, acks: i16) -> ProduceRequest {
    ProduceRequest::default()
        .with_acks(acks)
        .with_timeout_ms(30_000)
        .with_topic_data(vec![
            TopicProduceData::default()
                .with_name(topic_name(topic))
                .with_partition_data(vec![
                    PartitionProduceData::default()
                        .with_index(partition)
                        .with_records(Some(batch)),
                ]),
        ])
}

async fn produce(
    client: &mut RawClient,
    topic: &str,
    batch: Bytes,
) -> anyhow::Result<PartitionProduceResponse> {
    let response = client
        .send(9, &produce_request(topic, 0, batch, -1))
        .await?;
    Ok(response.responses[0].partition_responses[0].clone())
}

/// Every record of partition 0 from offset 0, as (offset, value).
async fn fetch_all(client: &mut RawClient, topic: &str) -> anyhow::Result<Vec<(i64, String)>> {
    let mut out = Vec::new();
    loop {
        let next = out.last().map_or(0, |(o, _)| o + 1);
        let request = FetchRequest::default()
            .with_replica_id((-1).into())
            .with_max_wait_ms(0)
            .with_min_bytes(1)
            .with_max_bytes(1 << 20)
            .with_topics(vec![
                FetchTopic::default()
                    .with_topic(topic_name(topic))
                    .with_partitions(vec![
                        FetchPartition::default()
                            .with_partition(0)
                            .with_fetch_offset(next)
                            .with_partition_max_bytes(1 << 20),
                    ]),
            ]);
        let response = client.send(11, &request).await?;
        let partition = &response.responses[0].partitions[0];
        ensure!(
            partition.error_code == 0,
            "fetch error {}",
            partition.error_code
        );
        let records = decode_records(partition.records.as_ref().context("records")?)?;
        let fresh: Vec<_> = records
            .into_iter()
            .filter(|r| r.offset >= next)
            .map(|r| {
                (
                    r.offset,
                    String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned(),
                )
            })
            .collect();
        if fresh.is_empty() {
            ensure!(
                next == partition.high_watermark,
                "stopped at {next}, high watermark {}",
                partition.high_watermark
            );
            return Ok(out);
        }
        out.extend(fresh);
    }
}

fn batch_of(tag: &str, records: usize) -> anyhow::Result<Bytes> {
    let records: Vec<TestRecord> = (0..records)
        .map(|j| TestRecord::new(&format!("k{j}"), &format!("{tag}-r{j}"), 1_700_000_000_000))
        .collect();
    record_batch(&records, Compression::None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_all_survives_repeated_kill_9() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut acknowledged: Vec<(i64, String)> = Vec::new();
    let mut next_batch = 0usize;
    for round in 0..3 {
        let broker = ChildBroker::spawn(dir.path(), &[])?;
        let mut client = RawClient::connect(broker.addr).await?;
        if round == 0 {
            create_topic(&mut client, "durable", 1).await?;
        }
        // Everything acknowledged in earlier rounds is still there, at the same offsets.
        let stored = fetch_all(&mut client, "durable").await?;
        ensure!(
            stored.len() >= acknowledged.len() && stored[..acknowledged.len()] == acknowledged[..],
            "round {round}: acknowledged records changed after kill -9"
        );
        ensure!(
            stored.iter().enumerate().all(|(i, (o, _))| *o == i as i64),
            "round {round}: offsets are not contiguous"
        );
        // Records stored but never acknowledged (none here: every send was awaited) would be
        // allowed; adopt what is stored as the new baseline.
        acknowledged = stored;
        for _ in 0..50 {
            let tag = format!("b{next_batch}");
            next_batch += 1;
            let response = produce(&mut client, "durable", batch_of(&tag, 10)?).await?;
            ensure!(response.error_code == 0, "produce failed: {response:?}");
            ensure!(
                response.base_offset == acknowledged.len() as i64,
                "base offset {}",
                response.base_offset
            );
            for j in 0..10 {
                acknowledged.push((response.base_offset + j, format!("{tag}-r{j}")));
            }
        }
        // Pipeline a few more without waiting, then kill -9 while they may be in flight.
        for _ in 0..5 {
            let tag = format!("b{next_batch}");
            next_batch += 1;
            let (_, payload) =
                client.encode(9, &produce_request("durable", 0, batch_of(&tag, 10)?, -1))?;
            client.send_frame(&payload).await?;
        }
        broker.kill9()?;
    }
    let broker = ChildBroker::spawn(dir.path(), &[])?;
    let mut client = RawClient::connect(broker.addr).await?;
    let stored = fetch_all(&mut client, "durable").await?;
    ensure!(
        stored[..acknowledged.len()] == acknowledged[..],
        "acknowledged records lost"
    );
    ensure!(stored.len() >= 1500, "only {} records", stored.len());
    Ok(())
}

fn active_segment(data_dir: &Path, topic: &str) -> anyhow::Result<std::path::PathBuf> {
    let dir = data_dir.join(format!("{topic}-0"));
    let mut logs: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    logs.pop().context("no segment file")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_tail_is_truncated_logged_and_appends_continue() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = ChildBroker::spawn(dir.path(), &[])?;
    let mut client = RawClient::connect(broker.addr).await?;
    create_topic(&mut client, "torn", 1).await?;
    for n in 0..20 {
        let response = produce(&mut client, "torn", batch_of(&format!("b{n}"), 5)?).await?;
        ensure!(response.error_code == 0);
    }
    let before = fetch_all(&mut client, "torn").await?;
    ensure!(before.len() == 100);
    broker.kill9()?;

    // Half of a valid batch, as a crash mid-write would leave it, then garbage.
    let segment = active_segment(dir.path(), "torn")?;
    let whole = batch_of("torn-write", 5)?;
    let mut file = OpenOptions::new().append(true).open(&segment)?;
    file.write_all(&whole[..whole.len() / 2])?;
    file.write_all(b"\x00\x00garbage after the torn batch")?;
    drop(file);

    let broker = ChildBroker::spawn(dir.path(), &[])?;
    let log = broker.output_text();
    ensure!(
        log.contains("truncat"),
        "recovery did not log the cut:\n{log}"
    );
    let mut client = RawClient::connect(broker.addr).await?;
    let after = fetch_all(&mut client, "torn").await?;
    ensure!(after == before, "records before the torn tail changed");
    let response = produce(&mut client, "torn", batch_of("after", 5)?).await?;
    ensure!(
        response.error_code == 0 && response.base_offset == 100,
        "append after recovery: {response:?}"
    );
    ensure!(fetch_all(&mut client, "torn").await?.len() == 105);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_fails_the_produce_and_keeps_serving() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // A 256 KiB file-size limit: writes past it fail with EFBIG, as a full disk fails with ENOSPC.
    let broker = ChildBroker::spawn_with(dir.path(), &[], Some("trap '' XFSZ; ulimit -f 256;"))?;
    let mut client = RawClient::connect(broker.addr).await?;
    create_topic(&mut client, "full", 1).await?;
    let mut acknowledged = 0usize;
    let mut refused = None;
    for n in 0..100 {
        let records: Vec<TestRecord> = (0..10)
            .map(|j| {
                TestRecord::new(
                    "k",
                    &format!("b{n}-r{j}-{}", "x".repeat(1000)),
                    1_700_000_000_000,
                )
            })
            .collect();
        let response = produce(
            &mut client,
            "full",
            record_batch(&records, Compression::None)?,
        )
        .await?;
        if response.error_code == 0 {
            ensure!(
                refused.is_none(),
                "a produce succeeded after the disk was full"
            );
            acknowledged += 10;
        } else {
            refused = Some(response.error_code);
            break;
        }
    }
    ensure!(
        refused == Some(ResponseError::KafkaStorageError.code()),
        "expected KAFKA_STORAGE_ERROR once the limit was hit, got {refused:?} after {acknowledged} records"
    );
    ensure!(acknowledged > 0, "the limit was hit before any append");
    // Still serving: everything acknowledged is readable, and nothing partial was kept.
    let stored = fetch_all(&mut client, "full").await?;
    ensure!(
        stored.len() == acknowledged,
        "{} stored, {acknowledged} acknowledged",
        stored.len()
    );
    drop(client);
    let status = broker.terminate()?;
    ensure!(status.success(), "broker exited with {status}");

    // Space comes back: a restart without the limit has exactly the acknowledged records.
    let broker = ChildBroker::spawn(dir.path(), &[])?;
    let mut client = RawClient::connect(broker.addr).await?;
    ensure!(fetch_all(&mut client, "full").await?.len() == acknowledged);
    let response = produce(&mut client, "full", batch_of("after", 1)?).await?;
    ensure!(response.error_code == 0 && response.base_offset == acknowledged as i64);
    Ok(())
}
