//! Produce load generator: measures how many records per second semel-broker (or any Kafka
//! broker) appends, at a given `acks`, batch size and pipelining depth.
//!
//! ```sh
//! cargo run --release --example produce_load -- --acks all --connections 4
//! cargo run --release --example produce_load -- --bootstrap 127.0.0.1:9092 --acks 1
//! cargo run --release --example produce_load -- --acks all --idempotent
//! ```
//! With `--idempotent` each connection gets a producer id (InitProducerId) and numbers its
//! batches, so the broker runs its sequence checks on every request, as for a real idempotent
//! producer.
//! With `--ids` every record carries a unique `semel-msg-id` header; `--dedup-window-ms N` also
//! turns semel-broker's message-id dedup window on for the topic (docs/dedup-window.md), so
//! the two together measure what the window costs:
//! `produce_load -- --acks 1 --ids` next to `produce_load -- --acks 1 --dedup-window-ms 3600000`.
//! Without `--bootstrap` it starts an embedded broker on a temporary directory.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::{Bytes, BytesMut};
use clap::Parser;
use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, CreateTopicsRequest, InitProducerIdRequest, InitProducerIdResponse, ProduceRequest,
    ProduceResponse, ProducerId, RequestHeader, ResponseHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Produce load generator.
#[derive(Debug, Parser)]
struct Args {
    /// Broker to load; without it an embedded broker is started.
    #[arg(long)]
    bootstrap: Option<SocketAddr>,
    /// acks: 0, 1 or all.
    #[arg(long, default_value = "all")]
    acks: String,
    /// Concurrent connections, each producing to its own partition.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Produce requests each connection keeps in flight.
    #[arg(long, default_value_t = 5)]
    in_flight: usize,
    /// Records per batch.
    #[arg(long, default_value_t = 100)]
    batch_records: usize,
    /// Bytes per record value.
    #[arg(long, default_value_t = 100)]
    record_bytes: usize,
    /// Produce as an idempotent producer: a producer id per connection and sequenced batches.
    #[arg(long)]
    idempotent: bool,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Give every record a unique `semel-msg-id` header (16 bytes), as a sender using
    /// semel-broker's dedup window does.
    #[arg(long)]
    ids: bool,
    /// Create the topic with `semel.dedup.window.ms` set to this (semel-broker only; implies
    /// `--ids`).
    #[arg(long)]
    dedup_window_ms: Option<u64>,
    /// With `--dedup-window-ms`: `semel.dedup.max.ids` for the topic (the broker's default
    /// otherwise).
    #[arg(long)]
    dedup_max_ids: Option<u64>,
}

/// Bytes of a message id in `--ids` batches.
const ID_BYTES: usize = 16;

/// A producer's identity in a batch header: (producer id, epoch); (-1, -1) when not idempotent.
type Producer = (i64, i16);

fn batch(
    records: usize,
    value_bytes: usize,
    producer: Producer,
    ids: bool,
) -> anyhow::Result<Bytes> {
    let value = Bytes::from(vec![b'x'; value_bytes]);
    // Now: a run lasts seconds, so every record is inside any dedup window it is sent to.
    let now_ms = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis(),
    )?;
    let records: Vec<Record> = (0..records)
        .map(|i| Record {
            transactional: false,
            control: false,
            partition_leader_epoch: 0,
            producer_id: producer.0,
            producer_epoch: producer.1,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            // `kafka-protocol` starts a new batch wherever offset - sequence changes, so a
            // non-idempotent batch numbers its records from -1 (base sequence -1 = none).
            sequence: if producer.0 < 0 {
                i as i32 - 1
            } else {
                i as i32
            },
            delete_horizon: false,
            timestamp: now_ms,
            key: Some(Bytes::from(format!("key-{i}"))),
            value: Some(value.clone()),
            headers: if ids {
                [(
                    StrBytes::from_static_str("semel-msg-id"),
                    Some(Bytes::from(placeholder(i))),
                )]
                .into_iter()
                .collect()
            } else {
                Default::default()
            },
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &records,
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )?;
    Ok(buf.freeze())
}

/// The id record `i` of a batch is encoded with, to be found and overwritten per request.
fn placeholder(i: usize) -> String {
    format!("@id{i:0width$}", width = ID_BYTES - 3)
}

/// Where each record's id is in `batch`.
fn id_positions(batch: &[u8], records: usize) -> anyhow::Result<Vec<usize>> {
    (0..records)
        .map(|i| {
            let needle = placeholder(i);
            batch
                .windows(ID_BYTES)
                .position(|w| w == needle.as_bytes())
                .with_context(|| format!("id {i} not found in the batch"))
        })
        .collect()
}

/// Sets the base sequence of the batch in `batch`, the ids at `positions` numbered from
/// `first_id` (when given), and its CRC-32C, in place.
fn stamp(batch: &mut [u8], base_sequence: i32, ids: Option<(&[usize], u64)>) {
    batch[BASE_SEQUENCE..BASE_SEQUENCE + 4].copy_from_slice(&base_sequence.to_be_bytes());
    if let Some((positions, first_id)) = ids {
        for (n, at) in positions.iter().enumerate() {
            write_hex(&mut batch[*at..*at + ID_BYTES], first_id + n as u64);
        }
    }
    let crc = crc32c::crc32c(&batch[CRC_COVERS_FROM..]);
    batch[CRC..CRC + 4].copy_from_slice(&crc.to_be_bytes());
}

/// `id` as 16 lowercase hex digits into `out` (`format!` per record cost the load tool, which
/// shares the machine with the broker, more than the broker's dedup window costs the broker).
fn write_hex(out: &mut [u8], id: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, byte) in out.iter_mut().enumerate().take(ID_BYTES) {
        *byte = DIGITS[((id >> (4 * (ID_BYTES - 1 - i))) & 0xf) as usize];
    }
}

/// Where `batch` lies in the encoded Produce request `frame` (its records field is near the
/// end, followed by a few bytes of tagged fields).
fn batch_position(frame: &[u8], batch: &[u8]) -> anyhow::Result<usize> {
    let last = frame
        .len()
        .checked_sub(batch.len())
        .context("the request is shorter than its batch")?;
    (last.saturating_sub(16)..=last)
        .rev()
        .find(|at| &frame[*at..*at + batch.len()] == batch)
        .context("the batch was not found in its request")
}

/// Where a request frame keeps its correlation id: after its 4-byte length, API key and version.
const CORRELATION_ID: usize = 4 + 2 + 2;

/// Byte positions in a RecordBatch v2 header.
const BASE_SEQUENCE: usize = 53;
const CRC: usize = 17;
const CRC_COVERS_FROM: usize = 21;

fn frame(
    api_key: ApiKey,
    version: i16,
    correlation_id: i32,
    body: &impl Encodable,
) -> anyhow::Result<Vec<u8>> {
    let mut buf = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(api_key as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str("produce-load")))
        .encode(&mut buf, api_key.request_header_version(version))?;
    body.encode(&mut buf, version)?;
    let mut out = (buf.len() as i32).to_be_bytes().to_vec();
    out.extend_from_slice(&buf);
    Ok(out)
}

async fn read_frame(stream: &mut TcpStream) -> anyhow::Result<Bytes> {
    let mut prefix = [0u8; 4];
    stream.read_exact(&mut prefix).await?;
    let mut payload = vec![0u8; usize::try_from(i32::from_be_bytes(prefix))?];
    stream.read_exact(&mut payload).await?;
    Ok(Bytes::from(payload))
}

async fn create_topic(
    addr: SocketAddr,
    topic: &str,
    partitions: usize,
    dedup: (Option<u64>, Option<u64>),
) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    let config = |name: &'static str, value: u64| {
        CreatableTopicConfig::default()
            .with_name(StrBytes::from_static_str(name))
            .with_value(Some(StrBytes::from_string(value.to_string())))
    };
    let mut configs = Vec::new();
    if let Some(ms) = dedup.0 {
        configs.push(config("semel.dedup.window.ms", ms));
    }
    if let Some(ids) = dedup.1 {
        configs.push(config("semel.dedup.max.ids", ids));
    }
    let request = CreateTopicsRequest::default()
        .with_timeout_ms(5000)
        .with_topics(vec![
            CreatableTopic::default()
                .with_name(TopicName(StrBytes::from_string(topic.to_string())))
                .with_num_partitions(i32::try_from(partitions)?)
                .with_replication_factor(1)
                .with_configs(configs),
        ]);
    stream
        .write_all(&frame(ApiKey::CreateTopics, 7, 1, &request)?)
        .await?;
    read_frame(&mut stream).await?;
    Ok(())
}

async fn init_producer_id(stream: &mut TcpStream) -> anyhow::Result<Producer> {
    let request = InitProducerIdRequest::default()
        .with_transactional_id(None)
        .with_transaction_timeout_ms(60_000)
        .with_producer_id(ProducerId(-1))
        .with_producer_epoch(-1);
    stream
        .write_all(&frame(ApiKey::InitProducerId, 4, 0, &request)?)
        .await?;
    let mut payload = read_frame(stream).await?;
    ResponseHeader::decode(
        &mut payload,
        ApiKey::InitProducerId.response_header_version(4),
    )?;
    let response = InitProducerIdResponse::decode(&mut payload, 4)?;
    ensure!(
        response.error_code == 0,
        "InitProducerId failed with error code {}",
        response.error_code
    );
    Ok((response.producer_id.0, response.producer_epoch))
}

/// Produces until `deadline`; returns (records acknowledged, per-request latencies).
async fn run_connection(
    addr: SocketAddr,
    topic: String,
    partition: i32,
    args: &Args,
    acks: i16,
    deadline: Instant,
) -> anyhow::Result<(u64, Vec<Duration>)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let producer = if args.idempotent {
        init_producer_id(&mut stream).await?
    } else {
        (-1, -1)
    };
    let ids = args.ids || args.dedup_window_ms.is_some();
    let records = batch(args.batch_records, args.record_bytes, producer, ids)?;
    let positions = if ids {
        id_positions(&records, args.batch_records)?
    } else {
        Vec::new()
    };
    // Ids unique across connections: the partition in the top bits.
    let mut next_id = (partition as u64) << 48;
    let batch_records = i32::try_from(args.batch_records)?;
    let mut next_sequence = 0i32;
    let topic = TopicName(StrBytes::from_string(topic));
    let request = |records: Bytes| {
        ProduceRequest::default()
            .with_acks(acks)
            .with_timeout_ms(30_000)
            .with_topic_data(vec![
                TopicProduceData::default()
                    .with_name(topic.clone())
                    .with_partition_data(vec![
                        PartitionProduceData::default()
                            .with_index(partition)
                            .with_records(Some(records)),
                    ]),
            ])
    };
    // One Produce request, encoded once and sent again and again with its correlation id,
    // base sequence, ids and CRC changed in place: encoding and copying a 1 MiB batch per
    // request cost the load tool, which shares the machine with the broker, a fifth of it.
    let mut request_frame = frame(ApiKey::Produce, 9, 0, &request(records.clone()))?;
    let batch_at = batch_position(&request_frame, &records)?;
    let mut correlation_id = 0i32;
    let mut sent_at = std::collections::VecDeque::new();
    let mut latencies = Vec::new();
    let mut acknowledged = 0u64;
    loop {
        let sending = Instant::now() < deadline;
        while sending && sent_at.len() < args.in_flight {
            correlation_id += 1;
            request_frame[CORRELATION_ID..CORRELATION_ID + 4]
                .copy_from_slice(&correlation_id.to_be_bytes());
            if args.idempotent || ids {
                let sequence = if args.idempotent { next_sequence } else { -1 };
                stamp(
                    &mut request_frame[batch_at..batch_at + records.len()],
                    sequence,
                    ids.then_some((&positions[..], next_id)),
                );
                next_id += args.batch_records as u64;
                // Sequences wrap from i32::MAX to 0, as in Kafka.
                next_sequence = if next_sequence > i32::MAX - batch_records {
                    batch_records - (i32::MAX - next_sequence) - 1
                } else {
                    next_sequence + batch_records
                };
            }
            stream.write_all(&request_frame).await?;
            sent_at.push_back(Instant::now());
            if acks == 0 {
                acknowledged += args.batch_records as u64;
                sent_at.pop_front();
            }
        }
        let Some(started) = sent_at.pop_front() else {
            return Ok((acknowledged, latencies));
        };
        let mut payload = read_frame(&mut stream).await?;
        ResponseHeader::decode(&mut payload, ApiKey::Produce.response_header_version(9))?;
        let response = ProduceResponse::decode(&mut payload, 9)?;
        let code = response.responses[0].partition_responses[0].error_code;
        ensure!(code == 0, "produce failed with error code {code}");
        latencies.push(started.elapsed());
        acknowledged += args.batch_records as u64;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let acks: i16 = match args.acks.as_str() {
        "0" => 0,
        "1" => 1,
        "all" | "-1" => -1,
        other => bail!("--acks must be 0, 1 or all, not {other}"),
    };
    let dir = tempfile::tempdir()?;
    let embedded = match args.bootstrap {
        Some(_) => None,
        None => Some(
            semel::broker::Broker::start(semel::broker::BrokerConfig {
                listen: "127.0.0.1:0".parse()?,
                data_dir: dir.path().to_path_buf(),
                ..Default::default()
            })
            .await?,
        ),
    };
    let addr = args
        .bootstrap
        .or(embedded.as_ref().map(|b| b.local_addr()))
        .context("no broker")?;
    let topic = format!("load-{}", std::process::id());
    create_topic(
        addr,
        &topic,
        args.connections,
        (args.dedup_window_ms, args.dedup_max_ids),
    )
    .await?;

    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.seconds);
    let args = std::sync::Arc::new(args);
    let mut tasks = Vec::new();
    for partition in 0..args.connections {
        let args = std::sync::Arc::clone(&args);
        let topic = topic.clone();
        tasks.push(tokio::spawn(async move {
            run_connection(
                addr,
                topic,
                i32::try_from(partition)?,
                &args,
                acks,
                deadline,
            )
            .await
        }));
    }
    let mut records = 0u64;
    let mut latencies = Vec::new();
    for task in tasks {
        let (count, mut lat) = task.await??;
        records += count;
        latencies.append(&mut lat);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let bytes = records as f64 * args.record_bytes as f64;
    println!(
        "acks={} idempotent={} ids={} dedup_window_ms={} connections={} in_flight={} batch_records={} record_bytes={}: {:.0} records/s, {:.1} MB/s of values, request latency p50 {:.2} ms p99 {:.2} ms max {:.1} ms ({} records in {:.1} s)",
        args.acks,
        args.idempotent,
        args.ids || args.dedup_window_ms.is_some(),
        args.dedup_window_ms.unwrap_or(0),
        args.connections,
        args.in_flight,
        args.batch_records,
        args.record_bytes,
        records as f64 / elapsed,
        bytes / elapsed / 1e6,
        percentile(0.50),
        percentile(0.99),
        percentile(1.0),
        records,
        elapsed
    );
    if let Some(broker) = embedded {
        broker.shutdown().await;
    }
    Ok(())
}
