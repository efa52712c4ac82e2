//! Idempotence under real faults, with the `semel-broker` binary as a child process and
//! librdkafka (`kcat`) as the producer:
//! - replies lost on the way back (a proxy cuts the connection after the broker answered):
//!   with idempotence off the log holds duplicates, with it on each message is stored once;
//! - the broker `kill -9`ed and restarted several times while an idempotent, `acks=all`
//!   producer keeps sending: every message is stored exactly once, in order per partition;
//! - the raw bytes of an acknowledged batch replayed after `kill -9`: the original offset.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, ensure};
use bytes::Bytes;
use common::proxy::{FaultPlan, FaultProxy};
use common::{
    ChildBroker, RawClient, TestRecord, create_topic, fetch_all, init_producer_id, kcat,
    produce_request, record_batch_with_producer, value_text,
};
use kafka_protocol::records::Compression;

const PARTITIONS: i32 = 3;

/// A broker child advertising the proxy's address, so clients keep going through the proxy.
fn spawn_behind(proxy: &FaultProxy, dir: &std::path::Path) -> anyhow::Result<ChildBroker> {
    let advertised = proxy.addr().to_string();
    let broker = ChildBroker::spawn(dir, &["--advertised-listener", &advertised])?;
    proxy.set_upstream(broker.addr);
    Ok(broker)
}

/// `kcat -P` reading `id:message` lines from a pipe, keyed so each key stays on one partition.
fn spawn_kcat_producer(bootstrap: &str, topic: &str, idempotent: bool) -> anyhow::Result<Child> {
    let idempotence = format!("enable.idempotence={idempotent}");
    Command::new(kcat()?)
        // -E: a cut connection is the only broker down; keep going instead of exiting.
        .args(["-P", "-E", "-b", bootstrap, "-t", topic, "-K", ":"])
        .args(["-X", &idempotence, "-X", "acks=all"])
        // Small batches sent at once: many Produce requests, so many replies can be lost.
        .args(["-X", "linger.ms=0", "-X", "batch.num.messages=20"])
        .args([
            "-X",
            "message.timeout.ms=120000",
            "-X",
            "retry.backoff.ms=20",
        ])
        // Reconnect at once: the default backoff grows to 10 s after a few cuts.
        .args([
            "-X",
            "reconnect.backoff.ms=10",
            "-X",
            "reconnect.backoff.max.ms=100",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start kcat")
}

fn lines(range: std::ops::Range<usize>) -> String {
    range.map(|i| format!("key-{}:msg-{i}\n", i % 31)).collect()
}

fn finish(mut kcat: Child) -> anyhow::Result<String> {
    drop(kcat.stdin.take());
    let output = kcat.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    ensure!(output.status.success(), "kcat failed: {stderr}");
    Ok(stderr)
}

/// Every stored message number per partition, in log order.
async fn stored(client: &mut RawClient, topic: &str) -> anyhow::Result<Vec<Vec<usize>>> {
    let mut out = Vec::new();
    for partition in 0..PARTITIONS {
        let numbers = fetch_all(client, topic, partition)
            .await?
            .iter()
            .map(|r| {
                let text = value_text(r);
                text.strip_prefix("msg-")
                    .and_then(|n| n.parse().ok())
                    .with_context(|| format!("unexpected value {text:?}"))
            })
            .collect::<anyhow::Result<Vec<usize>>>()?;
        out.push(numbers);
    }
    Ok(out)
}

/// How many times each message number is stored.
fn counts(per_partition: &[Vec<usize>]) -> BTreeMap<usize, usize> {
    let mut counts = BTreeMap::new();
    for number in per_partition.iter().flatten() {
        *counts.entry(*number).or_insert(0) += 1;
    }
    counts
}

async fn produce_through_lossy_proxy(idempotent: bool) -> anyhow::Result<(Vec<Vec<usize>>, u64)> {
    let dir = tempfile::tempdir()?;
    let proxy = FaultProxy::start(FaultPlan::default()).await?;
    let broker = spawn_behind(&proxy, dir.path())?;
    let mut client = RawClient::connect(broker.addr).await?;
    create_topic(&mut client, "lossy", PARTITIONS).await?;
    proxy.set_plan(FaultPlan {
        cut_every_nth_produce_reply: 7,
        ..FaultPlan::default()
    });
    let bootstrap = proxy.addr().to_string();
    let mut kcat = spawn_kcat_producer(&bootstrap, "lossy", idempotent)?;
    let input = lines(0..2_000);
    let stderr = tokio::task::block_in_place(|| {
        kcat.stdin
            .as_mut()
            .context("stdin")?
            .write_all(input.as_bytes())?;
        finish(kcat)
    })?;
    let cut = proxy.replies_cut();
    ensure!(cut > 0, "the proxy cut no replies; kcat said: {stderr}");
    Ok((stored(&mut client, "lossy").await?, cut))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_replies_duplicate_messages_without_idempotence_and_never_with_it()
-> anyhow::Result<()> {
    let (without, cut) = produce_through_lossy_proxy(false).await?;
    let counts_without = counts(&without);
    let duplicated = counts_without.values().filter(|&&c| c > 1).count();
    ensure!(
        counts_without.len() == 2_000,
        "idempotence off lost messages: {} of 2000 stored",
        counts_without.len()
    );
    ensure!(
        duplicated > 0,
        "idempotence off: {cut} replies were cut but no message was stored twice"
    );

    let (with, cut) = produce_through_lossy_proxy(true).await?;
    let counts_with = counts(&with);
    ensure!(
        counts_with.len() == 2_000 && counts_with.values().all(|&c| c == 1),
        "idempotence on, {cut} replies cut: {} distinct messages, {} stored twice or more",
        counts_with.len(),
        counts_with.values().filter(|&&c| c > 1).count()
    );
    for (partition, numbers) in with.iter().enumerate() {
        ensure!(
            numbers.windows(2).all(|w| w[0] < w[1]),
            "partition {partition} is out of order"
        );
    }
    Ok(())
}

/// Sum of the partitions' log end offsets, read straight from the broker.
async fn stored_count(broker: &ChildBroker, topic: &str) -> anyhow::Result<usize> {
    let mut client = RawClient::connect(broker.addr).await?;
    Ok(stored(&mut client, topic).await?.iter().map(Vec::len).sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_kcat_survives_repeated_broker_kill_9_exactly_once() -> anyhow::Result<()> {
    const ROUNDS: usize = 4;
    const PER_ROUND: usize = 1_500;
    let dir = tempfile::tempdir()?;
    let proxy = FaultProxy::start(FaultPlan::default()).await?;
    let mut broker = spawn_behind(&proxy, dir.path())?;
    let mut client = RawClient::connect(broker.addr).await?;
    create_topic(&mut client, "crashy", PARTITIONS).await?;
    drop(client);
    let mut kcat = spawn_kcat_producer(&proxy.addr().to_string(), "crashy", true)?;
    for round in 0..ROUNDS {
        let input = lines(round * PER_ROUND..(round + 1) * PER_ROUND);
        tokio::task::block_in_place(|| -> anyhow::Result<()> {
            let stdin = kcat.stdin.as_mut().context("stdin")?;
            stdin.write_all(input.as_bytes())?;
            stdin.flush()?;
            Ok(())
        })?;
        // Kill once part of this round is stored, so the kill lands mid-stream.
        let target = round * PER_ROUND + PER_ROUND / 3;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let count = stored_count(&broker, "crashy").await?;
            if count >= target {
                break;
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "round {round}: only {count} of {target} messages stored after 120 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        broker.kill9()?;
        broker = spawn_behind(&proxy, dir.path())?;
    }
    let stderr = tokio::task::block_in_place(|| finish(kcat))?;
    let mut client = RawClient::connect(broker.addr).await?;
    let per_partition = stored(&mut client, "crashy").await?;
    let counts = counts(&per_partition);
    let total = ROUNDS * PER_ROUND;
    let twice: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).collect();
    ensure!(
        twice.is_empty(),
        "stored more than once: {twice:?}; kcat said: {stderr}"
    );
    ensure!(
        counts.len() == total,
        "{} of {total} messages stored; kcat said: {stderr}",
        counts.len()
    );
    for (partition, numbers) in per_partition.iter().enumerate() {
        ensure!(
            numbers.windows(2).all(|w| w[0] < w[1]),
            "partition {partition} is out of order"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_batch_replayed_after_kill_9_gets_its_original_offset() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let broker = ChildBroker::spawn(dir.path(), &[])?;
    let mut client = RawClient::connect(broker.addr).await?;
    create_topic(&mut client, "replay", 1).await?;
    let (producer_id, producer_epoch) = init_producer_id(&mut client).await?;
    let mut acknowledged: Vec<(Bytes, i64)> = Vec::new();
    for i in 0..8 {
        let records: Vec<TestRecord> = (0..3)
            .map(|j| TestRecord::new("k", &format!("b{i}-{j}"), 1_700_000_000_000))
            .collect();
        let batch = record_batch_with_producer(
            &records,
            Compression::None,
            producer_id,
            producer_epoch,
            i * 3,
        )?;
        let (_, request) = client.encode(9, &produce_request("replay", 0, batch, -1))?;
        client.send_frame(&request).await?;
        let frame = client.read_frame().await?.context("no reply")?;
        let (_, response) =
            RawClient::decode::<kafka_protocol::messages::ProduceRequest>(9, frame)?;
        let partition = &response.responses[0].partition_responses[0];
        ensure!(partition.error_code == 0);
        acknowledged.push((request, partition.base_offset));
    }
    drop(client);
    broker.kill9()?;

    let broker = ChildBroker::spawn(dir.path(), &[])?;
    let mut client = RawClient::connect(broker.addr).await?;
    for (request, offset) in &acknowledged[3..] {
        client.send_frame(request).await?;
        let frame = client.read_frame().await?.context("no reply")?;
        let (_, response) =
            RawClient::decode::<kafka_protocol::messages::ProduceRequest>(9, frame)?;
        let partition = &response.responses[0].partition_responses[0];
        ensure!(
            partition.error_code == 0 && partition.base_offset == *offset,
            "replayed batch answered {partition:?}, originally offset {offset}"
        );
    }
    ensure!(fetch_all(&mut client, "replay", 0).await?.len() == 24);
    Ok(())
}
