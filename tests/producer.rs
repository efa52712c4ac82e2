//! semel-producer end to end, against semel-broker through a fault-injecting proxy:
//! - idempotence on: 50,000 messages over 3 partitions while replies are lost (connections cut
//!   after the broker answered) arrive exactly once and in order per partition;
//! - idempotence off: the same run stores duplicates (asserted);
//! - the broker `kill -9`ed and restarted during a send loop: no acknowledged message lost,
//!   none duplicated;
//! - our partition for a key equals librdkafka's `murmur2_random` (kcat) for the same key;
//! - every compression codec, `acks=0` and `flush`.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, ensure};
use common::proxy::{FaultPlan, FaultProxy};
use common::{ChildBroker, RawClient, TestBroker, create_topic, fetch_all, kcat, value_text};
use semel::producer::{Acks, Producer, ProducerConfig, ProducerRecord};

const PARTITIONS: i32 = 3;

fn config(bootstrap: String, idempotent: bool) -> ProducerConfig {
    ProducerConfig {
        bootstrap_servers: vec![bootstrap],
        enable_idempotence: idempotent,
        acks: Acks::All,
        linger: Duration::from_millis(2),
        // Small batches: many Produce requests, so many replies to lose.
        batch_size: 4 * 1024,
        request_timeout: Duration::from_secs(10),
        retry_backoff: Duration::from_millis(10),
        delivery_timeout: Duration::from_secs(120),
        // Without idempotence semel-producer does not retry by default; retry like the Java
        // client does, to show what those retries cost.
        retries: if idempotent { None } else { Some(u32::MAX) },
        ..ProducerConfig::default()
    }
}

/// Every stored message number per partition, in log order.
async fn stored(client: &mut RawClient, topic: &str) -> anyhow::Result<Vec<Vec<usize>>> {
    let mut out = Vec::new();
    for partition in 0..PARTITIONS {
        let numbers = fetch_all(client, topic, partition)
            .await?
            .iter()
            .map(|r| value_text(r).parse::<usize>().context("value"))
            .collect::<anyhow::Result<Vec<usize>>>()?;
        out.push(numbers);
    }
    Ok(out)
}

fn counts(per_partition: &[Vec<usize>]) -> BTreeMap<usize, usize> {
    let mut counts = BTreeMap::new();
    for n in per_partition.iter().flatten() {
        *counts.entry(*n).or_insert(0) += 1;
    }
    counts
}

/// Sends `range` keyed by `n % 97` (so each key stays on one partition) and waits for every
/// delivery report.
async fn send_all(
    producer: &Producer,
    topic: &str,
    range: std::ops::Range<usize>,
) -> anyhow::Result<()> {
    let mut deliveries = Vec::with_capacity(range.len());
    for n in range {
        let record = ProducerRecord::new(topic, n.to_string()).key(format!("key-{}", n % 97));
        deliveries.push((n, producer.send(record).await?));
    }
    for (n, delivery) in deliveries {
        delivery
            .await
            .with_context(|| format!("message {n} was not delivered"))?;
    }
    Ok(())
}

/// A broker that clients reach through a fault proxy (it advertises the proxy's address), and
/// a raw client straight to the broker.
async fn behind_proxy() -> anyhow::Result<(FaultProxy, TestBroker, RawClient)> {
    let proxy = FaultProxy::start(FaultPlan::default()).await?;
    let advertised = proxy.addr().to_string();
    let broker = TestBroker::start_with(|c| c.advertised_listener = Some(advertised)).await?;
    proxy.set_upstream(broker.addr());
    let client = RawClient::connect(broker.addr()).await?;
    Ok((proxy, broker, client))
}

async fn run_through_lossy_proxy(idempotent: bool) -> anyhow::Result<(Vec<Vec<usize>>, u64, u64)> {
    let (proxy, _broker, mut client) = behind_proxy().await?;
    let topic = if idempotent {
        "ledger-on"
    } else {
        "ledger-off"
    };
    create_topic(&mut client, topic, PARTITIONS).await?;
    proxy.set_plan(FaultPlan {
        cut_every_nth_produce_reply: 13,
        cut_every_nth_produce_request: 17,
        delay_every_nth_produce_reply: 5,
        delay: Duration::from_millis(20),
        ..FaultPlan::default()
    });
    let producer = Producer::connect(config(proxy.addr().to_string(), idempotent)).await?;
    send_all(&producer, topic, 0..50_000).await?;
    let retried = producer.metrics().retried.get();
    producer.close().await;
    let cut = proxy.replies_cut();
    ensure!(cut > 0, "the proxy cut no replies");
    ensure!(proxy.requests_cut() > 0, "the proxy cut no requests");
    Ok((stored(&mut client, topic).await?, cut, retried))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_producer_stores_each_message_once_in_order_despite_lost_replies()
-> anyhow::Result<()> {
    let (per_partition, cut, retried) = run_through_lossy_proxy(true).await?;
    let counts = counts(&per_partition);
    ensure!(retried > 0, "{cut} replies cut but nothing retried");
    ensure!(
        counts.len() == 50_000 && counts.values().all(|&c| c == 1),
        "{} distinct of 50000, {} stored more than once ({cut} replies cut, {retried} retries)",
        counts.len(),
        counts.values().filter(|&&c| c > 1).count()
    );
    for (partition, numbers) in per_partition.iter().enumerate() {
        ensure!(
            numbers.windows(2).all(|w| w[0] < w[1]),
            "partition {partition} out of order"
        );
    }
    eprintln!("idempotent: {cut} replies cut, {retried} batch retries, 50000 stored once each");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_idempotence_lost_replies_store_duplicates() -> anyhow::Result<()> {
    let (per_partition, cut, retried) = run_through_lossy_proxy(false).await?;
    let counts = counts(&per_partition);
    let duplicated = counts.values().filter(|&&c| c > 1).count();
    ensure!(
        counts.len() == 50_000,
        "lost messages: {} of 50000",
        counts.len()
    );
    ensure!(
        duplicated > 0,
        "{cut} replies cut, {retried} retries, yet no duplicates"
    );
    eprintln!("not idempotent: {cut} replies cut, {duplicated} messages stored twice or more");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_kill_9_during_a_send_loop_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let proxy = FaultProxy::start(FaultPlan::default()).await?;
    let advertised = proxy.addr().to_string();
    let spawn = |proxy: &FaultProxy| -> anyhow::Result<ChildBroker> {
        let broker = ChildBroker::spawn(dir.path(), &["--advertised-listener", &advertised])?;
        proxy.set_upstream(broker.addr);
        Ok(broker)
    };
    let mut first = Some(spawn(&proxy)?);
    let mut client = RawClient::connect(first.as_ref().context("broker")?.addr).await?;
    create_topic(&mut client, "crashy", PARTITIONS).await?;
    drop(client);
    let producer = Producer::connect(ProducerConfig {
        request_timeout: Duration::from_secs(3),
        ..config(proxy.addr().to_string(), true)
    })
    .await?;
    // First part acknowledged, then the broker dies while the second part is in flight.
    send_all(&producer, "crashy", 0..5_000).await?;
    let mut deliveries = Vec::new();
    for n in 5_000..15_000 {
        let record = ProducerRecord::new("crashy", n.to_string()).key(format!("key-{}", n % 97));
        deliveries.push((n, producer.send(record).await?));
        if n == 7_000 {
            first.take().context("broker")?.kill9()?;
        }
    }
    let broker = spawn(&proxy)?;
    for (n, delivery) in deliveries {
        delivery
            .await
            .with_context(|| format!("message {n} was not delivered after the restart"))?;
    }
    producer.close().await;
    let mut client = RawClient::connect(broker.addr).await?;
    let per_partition = stored(&mut client, "crashy").await?;
    let counts = counts(&per_partition);
    let twice: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).take(5).collect();
    ensure!(twice.is_empty(), "stored twice: {twice:?}");
    ensure!(counts.len() == 15_000, "{} of 15000 stored", counts.len());
    for (partition, numbers) in per_partition.iter().enumerate() {
        ensure!(
            numbers.windows(2).all(|w| w[0] < w[1]),
            "partition {partition} out of order"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_partitions_match_librdkafka_murmur2_random() -> anyhow::Result<()> {
    const KEYED_PARTITIONS: i32 = 6;
    let broker = TestBroker::start().await?;
    let mut client = RawClient::connect(broker.addr()).await?;
    create_topic(&mut client, "by-kcat", KEYED_PARTITIONS).await?;
    create_topic(&mut client, "by-semel", KEYED_PARTITIONS).await?;
    let keys: Vec<String> = (0..300)
        .map(|i| format!("customer-{i}-{}", i * 7919))
        .collect();

    let mut child = Command::new(kcat()?)
        .args(["-P", "-b", &broker.bootstrap(), "-t", "by-kcat", "-K", ":"])
        .args(["-X", "partitioner=murmur2_random"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    {
        let mut stdin = child.stdin.take().context("stdin")?;
        for key in &keys {
            writeln!(stdin, "{key}:{key}")?;
        }
    }
    let output = tokio::task::spawn_blocking(move || child.wait_with_output()).await??;
    ensure!(
        output.status.success(),
        "kcat: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    let producer = Producer::connect(ProducerConfig {
        bootstrap_servers: vec![broker.bootstrap()],
        ..ProducerConfig::default()
    })
    .await?;
    let mut ours = BTreeMap::new();
    for key in &keys {
        let report = producer
            .send(ProducerRecord::new("by-semel", key.clone()).key(key.clone()))
            .await?
            .await?;
        ours.insert(key.clone(), report.partition);
    }
    producer.close().await;

    let mut theirs = BTreeMap::new();
    for partition in 0..KEYED_PARTITIONS {
        for record in fetch_all(&mut client, "by-kcat", partition).await? {
            theirs.insert(value_text(&record), partition);
        }
    }
    ensure!(
        theirs.len() == keys.len(),
        "kcat stored {} keys",
        theirs.len()
    );
    let differ: Vec<_> = keys
        .iter()
        .filter(|k| ours.get(*k) != theirs.get(*k))
        .take(5)
        .map(|k| (k, ours.get(k), theirs.get(k)))
        .collect();
    ensure!(
        differ.is_empty(),
        "partition differs (key, ours, kcat): {differ:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_codec_round_trips_and_acks_0_and_flush_work() -> anyhow::Result<()> {
    use semel::producer::Compression;
    let broker = TestBroker::start().await?;
    let mut client = RawClient::connect(broker.addr()).await?;
    for (name, codec) in [
        ("none", Compression::None),
        ("gzip", Compression::Gzip),
        ("snappy", Compression::Snappy),
        ("lz4", Compression::Lz4),
        ("zstd", Compression::Zstd),
    ] {
        let topic = format!("codec-{name}");
        create_topic(&mut client, &topic, 1).await?;
        let producer = Producer::connect(ProducerConfig {
            bootstrap_servers: vec![broker.bootstrap()],
            compression: codec,
            ..ProducerConfig::default()
        })
        .await?;
        let mut deliveries = Vec::new();
        for n in 0..1_000 {
            let record = ProducerRecord::new(&topic, format!("{n}:{}", "v".repeat(n % 50)))
                .header("trace", format!("t{n}"));
            deliveries.push(producer.send(record).await?);
        }
        producer.flush().await;
        for (n, delivery) in deliveries.into_iter().enumerate() {
            let report = delivery.await?;
            ensure!(
                report.offset == i64::try_from(n)?,
                "{name}: offset {} for {n}",
                report.offset
            );
        }
        producer.close().await;
        let stored = fetch_all(&mut client, &topic, 0).await?;
        ensure!(stored.len() == 1_000, "{name}: {} stored", stored.len());
        for (n, record) in stored.iter().enumerate() {
            ensure!(
                value_text(record) == format!("{n}:{}", "v".repeat(n % 50)),
                "{name}: record {n} is {:?}",
                value_text(record)
            );
            let header = record
                .headers
                .iter()
                .find(|(k, _)| k.as_str() == "trace")
                .and_then(|(_, v)| v.as_ref())
                .map(|v| String::from_utf8_lossy(v).into_owned());
            ensure!(
                header == Some(format!("t{n}")),
                "{name}: header of {n}: {header:?}"
            );
        }
    }

    create_topic(&mut client, "fire-and-forget", 1).await?;
    let producer = Producer::connect(ProducerConfig {
        bootstrap_servers: vec![broker.bootstrap()],
        acks: Acks::None,
        enable_idempotence: false,
        ..ProducerConfig::default()
    })
    .await?;
    let mut deliveries = Vec::new();
    for n in 0..500 {
        deliveries.push(
            producer
                .send(ProducerRecord::new("fire-and-forget", n.to_string()))
                .await?,
        );
    }
    for delivery in deliveries {
        ensure!(delivery.await?.offset == -1, "acks=0 reports no offset");
    }
    producer.close().await;
    // acks=0 has no answer to wait for: poll until the broker has them all.
    let started = std::time::Instant::now();
    loop {
        let stored = fetch_all(&mut client, "fire-and-forget", 0).await?.len();
        if stored == 500 {
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(30),
            "acks=0: {stored} of 500 stored"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_idempotence_a_lost_reply_is_an_error_not_a_retry_by_default() -> anyhow::Result<()>
{
    let (proxy, _broker, mut client) = behind_proxy().await?;
    create_topic(&mut client, "no-retries", 1).await?;
    proxy.set_plan(FaultPlan {
        cut_every_nth_produce_reply: 1,
        ..FaultPlan::default()
    });
    let producer = Producer::connect(ProducerConfig {
        bootstrap_servers: vec![proxy.addr().to_string()],
        enable_idempotence: false,
        ..ProducerConfig::default()
    })
    .await?;
    let result = producer
        .send(ProducerRecord::new("no-retries", "once"))
        .await?
        .await;
    ensure!(
        matches!(
            result,
            Err(semel::producer::ProduceError::RetriesExhausted { attempts: 1, .. })
        ),
        "expected an error after one attempt, got {result:?}"
    );
    // The broker did store it (only the reply was lost): reported, never silently duplicated.
    ensure!(fetch_all(&mut client, "no-retries", 0).await?.len() == 1);
    producer.close().await;
    Ok(())
}

/// `fencing_id` (a semel extension): two instances with the same id share a producer id; once
/// the newer one has written to a partition (the broker checks epochs per partition, as
/// Kafka's does), the older one's batches there are refused, its records fail (fatal), and
/// nothing it sends after that is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_instance_with_the_same_fencing_id_fences_the_older() -> anyhow::Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = RawClient::connect(broker.addr()).await?;
    create_topic(&mut client, "fenced", PARTITIONS).await?;
    let fenced_config = || ProducerConfig {
        fencing_id: Some("pipeline-0".into()),
        ..config(broker.bootstrap(), true)
    };
    let old = Producer::connect(fenced_config()).await?;
    let record = |n: usize| ProducerRecord::new("fenced", n.to_string()).partition(0);
    old.send(record(1)).await?.await?;
    let new = Producer::connect(fenced_config()).await?;
    ensure!(
        new.producer_id() == old.producer_id(),
        "same fencing id, same producer id: {} vs {}",
        new.producer_id(),
        old.producer_id()
    );
    new.send(record(2)).await?.await?;
    let refused = old.send(record(3)).await?.await;
    ensure!(
        matches!(refused, Err(semel::producer::ProduceError::Fatal(_))),
        "the old instance's send after the takeover: {refused:?}"
    );
    // Fatal from then on, without another round trip.
    let again = old.send(record(4)).await?.await;
    ensure!(
        matches!(again, Err(semel::producer::ProduceError::Fatal(_))),
        "{again:?}"
    );
    new.send(record(5)).await?.await?;
    old.close().await;
    new.close().await;
    let stored = stored(&mut client, "fenced").await?;
    ensure!(stored[0] == [1, 2, 5], "partition 0 holds {:?}", stored[0]);
    // Validation: fencing needs idempotence.
    let bad = ProducerConfig {
        enable_idempotence: false,
        ..fenced_config()
    };
    ensure!(
        bad.validate().is_err(),
        "fencing_id without idempotence accepted"
    );
    Ok(())
}

/// The broker goes away for good: every queued record fails with a timeout once its
/// `delivery.timeout.ms` has passed (none hangs, none is reported stored), and `send`, once
/// `max_queued_records` (500) wait, gets room back as those records fail: it never blocks
/// for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_fail_at_delivery_timeout_when_the_broker_is_gone() -> anyhow::Result<()> {
    for idempotent in [true, false] {
        let broker = TestBroker::start().await?;
        let mut client = RawClient::connect(broker.addr()).await?;
        create_topic(&mut client, "gone", PARTITIONS).await?;
        drop(client);
        let producer = Producer::connect(ProducerConfig {
            delivery_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(1),
            max_queued_records: 500,
            ..config(broker.bootstrap(), idempotent)
        })
        .await?;
        producer
            .send(ProducerRecord::new("gone", "before"))
            .await?
            .await?;
        broker.handle.shutdown().await;
        // A hang guard, far above the 3 s the records are given.
        let outcome = tokio::time::timeout(Duration::from_secs(60), async {
            let mut deliveries = Vec::new();
            for n in 0..2_000 {
                deliveries.push(
                    producer
                        .send(ProducerRecord::new("gone", n.to_string()))
                        .await?,
                );
            }
            let mut timed_out = 0;
            for delivery in deliveries {
                match delivery.await {
                    Err(semel::producer::ProduceError::Timeout { .. }) => timed_out += 1,
                    other => anyhow::bail!("a record sent to a dead broker: {other:?}"),
                }
            }
            anyhow::Ok(timed_out)
        })
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "records still pending 60 s after the broker went away (idempotent: {idempotent})"
            )
        })??;
        ensure!(outcome == 2_000, "timed out: {outcome}");
        tokio::time::timeout(Duration::from_secs(30), producer.close())
            .await
            .map_err(|_| anyhow::anyhow!("close hangs"))?;
    }
    Ok(())
}

/// `max_queued_records` bounds the records waiting for delivery (as `buffer.memory` does in
/// the Java client): with the broker's Produce replies held back 1.5 s, the send after the bound
/// waits for room, and goes through once earlier records are acknowledged. `send_many` counts
/// each of its records against the same bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_waits_while_max_queued_records_are_undelivered() -> anyhow::Result<()> {
    const PRODUCE_API: i16 = 0;
    let (proxy, _broker, mut client) = behind_proxy().await?;
    create_topic(&mut client, "bounded", PARTITIONS).await?;
    let producer = Producer::connect(ProducerConfig {
        max_queued_records: 10,
        linger: Duration::from_millis(0),
        ..config(proxy.addr().to_string(), true)
    })
    .await?;
    proxy.set_plan(FaultPlan {
        delay_replies_of_api: Some(PRODUCE_API),
        delay: Duration::from_millis(1500),
        ..FaultPlan::default()
    });
    let mut deliveries = Vec::new();
    for n in 0..10 {
        deliveries.push(
            producer
                .send(ProducerRecord::new("bounded", n.to_string()))
                .await?,
        );
    }
    let eleventh = tokio::time::timeout(
        Duration::from_millis(500),
        producer.send(ProducerRecord::new("bounded", "10")),
    )
    .await;
    ensure!(
        eleventh.is_err(),
        "the 11th send was taken with 10 records undelivered (max_queued_records = 10)"
    );
    // Room comes back as the held replies arrive.
    let eleventh = tokio::time::timeout(
        Duration::from_secs(30),
        producer.send(ProducerRecord::new("bounded", "10")),
    )
    .await
    .context("the 11th send never got room")??;
    deliveries.push(eleventh);
    // More records than the bound at once: taken as room comes, all delivered.
    let many = tokio::time::timeout(
        Duration::from_secs(60),
        producer.send_many(
            (11..26)
                .map(|n| ProducerRecord::new("bounded", n.to_string()))
                .collect(),
        ),
    )
    .await
    .context("send_many never got room")??;
    for delivery in deliveries {
        delivery.await?;
    }
    let reports = tokio::time::timeout(Duration::from_secs(60), many)
        .await
        .context("send_many's records never completed")??;
    ensure!(reports.len() == 15, "{} reports", reports.len());
    for report in reports {
        report?;
    }
    producer.close().await;
    let stored = stored(&mut client, "bounded").await?;
    ensure!(
        stored.iter().map(Vec::len).sum::<usize>() == 26,
        "stored {stored:?}"
    );
    Ok(())
}

/// Batches of several partitions led by one broker leave in one Produce (as the Java sender
/// drains a node's ready partitions into one request), and each batch's answer reaches its
/// own records.
#[tokio::test]
async fn one_produce_request_carries_every_ready_partition_of_a_broker() -> anyhow::Result<()> {
    const PRODUCE_API: i16 = 0;
    let (proxy, _broker, mut client) = behind_proxy().await?;
    create_topic(&mut client, "per-broker", PARTITIONS).await?;
    // Partitions named in each Produce request, in the order the requests left.
    let requests: std::sync::Arc<std::sync::Mutex<Vec<Vec<i32>>>> = std::sync::Arc::default();
    proxy.on_request({
        let requests = std::sync::Arc::clone(&requests);
        std::sync::Arc::new(move |api_key, frame| {
            use kafka_protocol::messages::{ApiKey, ProduceRequest, RequestHeader};
            use kafka_protocol::protocol::Decodable;
            if api_key != PRODUCE_API {
                return;
            }
            let version = i16::from_be_bytes([frame[6], frame[7]]);
            let mut body = bytes::Bytes::copy_from_slice(&frame[4..]);
            let header_version = ApiKey::Produce.request_header_version(version);
            let partitions = RequestHeader::decode(&mut body, header_version)
                .and_then(|_| ProduceRequest::decode(&mut body, version))
                .map(|request| {
                    request
                        .topic_data
                        .iter()
                        .flat_map(|t| t.partition_data.iter().map(|p| p.index))
                        .collect()
                })
                .unwrap_or_else(|_| vec![-1]);
            requests.lock().expect("requests").push(partitions);
        })
    });
    let producer = Producer::connect(ProducerConfig {
        // Long enough that nothing leaves before the flush seals all three batches at once.
        linger: Duration::from_secs(30),
        ..config(proxy.addr().to_string(), true)
    })
    .await?;
    let mut deliveries = Vec::new();
    for n in 0..30 {
        let record = ProducerRecord::new("per-broker", n.to_string()).partition(n % PARTITIONS);
        deliveries.push((n, producer.send(record).await?));
    }
    tokio::time::timeout(Duration::from_secs(30), producer.flush())
        .await
        .context("flush did not finish")?;
    for (n, delivery) in deliveries {
        let report = delivery.await?;
        ensure!(
            report.partition == n % PARTITIONS && report.offset == i64::from(n / PARTITIONS),
            "record {n}: {report:?}"
        );
    }
    let mut seen = requests.lock().expect("requests").clone();
    ensure!(
        seen.len() == 1,
        "Produce requests (partitions each): {seen:?}"
    );
    seen[0].sort_unstable();
    ensure!(
        seen[0] == [0, 1, 2],
        "partitions in the request: {:?}",
        seen[0]
    );
    producer.close().await;
    let stored = stored(&mut client, "per-broker").await?;
    ensure!(
        stored.iter().map(Vec::len).collect::<Vec<_>>() == [10, 10, 10],
        "stored {stored:?}"
    );
    Ok(())
}
