//! Clients we did not write, against an in-process broker on port 0: librdkafka (through
//! Debian's `kcat`) and kafka-python (pure Python). Each one lists metadata, uses a
//! 3-partition topic, produces 10,000 keyed messages with headers and reads them all back with
//! correct offsets, keys, values, headers and per-partition order, for every compression codec.
//!
//! The clients are installed by `scripts/setup.sh`; these tests fail (they do not skip) when a
//! client is missing, because interop is part of what the broker promises.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, ensure};
use common::{RawClient, TestBroker, kcat, python};
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::{CreateTopicsRequest, ListOffsetsRequest, TopicName};
use kafka_protocol::protocol::StrBytes;

const MESSAGES: usize = 10_000;
const PARTITIONS: i32 = 3;
const CODECS: [&str; 5] = ["none", "gzip", "snappy", "lz4", "zstd"];

async fn create_topic(broker: &TestBroker, name: &str, partitions: i32) -> anyhow::Result<()> {
    let mut client = RawClient::connect(broker.addr()).await?;
    let request = CreateTopicsRequest::default()
        .with_timeout_ms(5000)
        .with_topics(vec![
            CreatableTopic::default()
                .with_name(TopicName(StrBytes::from_string(name.to_string())))
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

async fn high_watermarks(
    broker: &TestBroker,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<Vec<i64>> {
    let mut client = RawClient::connect(broker.addr()).await?;
    let request = ListOffsetsRequest::default()
        .with_replica_id((-1).into())
        .with_topics(vec![
            ListOffsetsTopic::default()
                .with_name(TopicName(StrBytes::from_string(topic.to_string())))
                .with_partitions(
                    (0..partitions)
                        .map(|p| {
                            ListOffsetsPartition::default()
                                .with_partition_index(p)
                                .with_timestamp(-1)
                        })
                        .collect(),
                ),
        ]);
    let response = client.send(7, &request).await?;
    Ok(response.topics[0]
        .partitions
        .iter()
        .map(|p| p.offset)
        .collect())
}

fn run_kcat(args: &[&str], stdin: Option<&[u8]>) -> anyhow::Result<String> {
    let mut child = Command::new(kcat()?)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(input) = stdin {
        child.stdin.take().context("stdin")?.write_all(input)?;
    }
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "kcat {args:?} failed: {stderr}");
    ensure!(
        !stderr.contains("ERROR"),
        "kcat {args:?} reported errors: {stderr}"
    );
    Ok(String::from_utf8(out.stdout)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kcat_lists_metadata_and_round_trips_every_codec() -> anyhow::Result<()> {
    let broker = TestBroker::start().await?;
    let bootstrap = broker.bootstrap();
    for codec in CODECS {
        let topic = format!("kcat-{codec}");
        create_topic(&broker, &topic, PARTITIONS).await?;

        let metadata =
            tokio::task::block_in_place(|| run_kcat(&["-b", &bootstrap, "-L", "-J"], None))?;
        ensure!(
            metadata.contains(&format!("\"topic\":\"{topic}\"")),
            "metadata lacks {topic}: {metadata}"
        );
        ensure!(
            metadata.contains(&format!("\"name\":\"{bootstrap}\"")),
            "metadata lacks the broker {bootstrap}: {metadata}"
        );

        let input: String = (0..MESSAGES)
            .map(|i| format!("key-{}:value-{i}\n", i % 97))
            .collect();
        tokio::task::block_in_place(|| {
            run_kcat(
                &[
                    "-P",
                    "-b",
                    &bootstrap,
                    "-t",
                    &topic,
                    "-K",
                    ":",
                    "-z",
                    codec,
                    "-H",
                    "origin=kcat",
                    "-X",
                    "acks=all",
                    "-X",
                    "linger.ms=5",
                ],
                Some(input.as_bytes()),
            )
        })?;

        let watermarks = high_watermarks(&broker, &topic, PARTITIONS).await?;
        ensure!(
            watermarks.iter().sum::<i64>() == MESSAGES as i64,
            "{codec}: high watermarks {watermarks:?} do not add up to {MESSAGES}"
        );

        let output = tokio::task::block_in_place(|| {
            run_kcat(
                &[
                    "-C",
                    "-b",
                    &bootstrap,
                    "-t",
                    &topic,
                    "-o",
                    "beginning",
                    "-e",
                    "-q",
                    "-f",
                    "%p|%o|%k|%s|%h\n",
                ],
                None,
            )
        })?;
        let mut per_partition: BTreeMap<i32, Vec<(i64, usize)>> = BTreeMap::new();
        let mut partition_of_key: BTreeMap<String, i32> = BTreeMap::new();
        for line in output.lines() {
            let fields: Vec<&str> = line.split('|').collect();
            ensure!(fields.len() == 5, "{codec}: unexpected line {line:?}");
            let partition: i32 = fields[0].parse()?;
            let offset: i64 = fields[1].parse()?;
            let i: usize = fields[3].strip_prefix("value-").context("value")?.parse()?;
            ensure!(
                fields[2] == format!("key-{}", i % 97),
                "{codec}: record {i} has key {}",
                fields[2]
            );
            ensure!(
                fields[4] == "origin=kcat",
                "{codec}: record {i} has headers {:?}",
                fields[4]
            );
            let previous = partition_of_key.insert(fields[2].to_string(), partition);
            ensure!(
                previous.is_none_or(|p| p == partition),
                "{codec}: key {} in two partitions",
                fields[2]
            );
            per_partition
                .entry(partition)
                .or_default()
                .push((offset, i));
        }
        let total: usize = per_partition.values().map(Vec::len).sum();
        ensure!(total == MESSAGES, "{codec}: consumed {total} of {MESSAGES}");
        for (partition, records) in &per_partition {
            let offsets: Vec<i64> = records.iter().map(|r| r.0).collect();
            ensure!(
                offsets == (0..records.len() as i64).collect::<Vec<_>>(),
                "{codec}: partition {partition} offsets are not contiguous from 0"
            );
            ensure!(
                records.windows(2).all(|w| w[0].1 < w[1].1),
                "{codec}: partition {partition} is not in send order"
            );
            ensure!(
                watermarks[*partition as usize] == records.len() as i64,
                "{codec}: partition {partition} high watermark {} but {} records",
                watermarks[*partition as usize],
                records.len()
            );
        }
    }
    broker.handle.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_python_round_trips_every_codec() -> anyhow::Result<()> {
    let python = python()?;
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/kafka_python_roundtrip.py");
    let broker = TestBroker::start().await?;
    for codec in CODECS {
        let topic = format!("python-{codec}");
        let out = tokio::task::block_in_place(|| {
            common::output_within(
                Command::new(&python)
                    .arg(&script)
                    .args(["--bootstrap", &broker.bootstrap(), "--topic", &topic])
                    .args([
                        "--partitions",
                        &PARTITIONS.to_string(),
                        "--count",
                        &MESSAGES.to_string(),
                    ])
                    .args(["--compression", codec]),
                Duration::from_secs(300),
                &format!("kafka-python round trip ({codec})"),
            )
        })?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && stdout.contains("\"ok\": true"),
            "kafka-python {codec}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let watermarks = high_watermarks(&broker, &topic, PARTITIONS).await?;
        ensure!(
            watermarks.iter().sum::<i64>() == MESSAGES as i64,
            "{codec}: {watermarks:?}"
        );
    }
    broker.handle.shutdown().await;
    Ok(())
}
