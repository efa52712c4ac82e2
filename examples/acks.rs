//! Lost sends, shown: the three `acks` levels when the broker hangs and is then killed with
//! `kill -9`. What the producer was told was written, against what is in the log after a
//! restart.
//!
//! ```sh
//! cargo build --bins && cargo run --example acks            # 20,000 acknowledged first
//! cargo run --example acks -- --quick                       # 2,000
//! ```
//! The broker is the `semel-broker` binary as a child process (so `kill -9` is real), on a
//! temporary data directory. For each level a producer sends numbered messages as fast as it
//! can; once some are acknowledged the broker is frozen (`SIGSTOP`: it reads nothing more,
//! like a hung or partitioned leader) for 300 ms, then killed (`SIGKILL`) and restarted on the
//! same directory, and the partition is read back.
//!
//! - `acks=0`: a message counts as sent once it is written to the socket. What the frozen
//!   broker never read is gone: lost, although the producer was told nothing bad.
//! - `acks=1`: acknowledged once the leader wrote it to its log. Nothing acknowledged is lost
//!   to `kill -9`, because the log is in the OS page cache; a power cut before the next fsync
//!   could still lose it (not shown here: it needs a machine crash).
//! - `acks=all`: acknowledged once fsynced (semel-broker is a single node): survives both.
//!
//! The process exits non-zero unless `acks=0` lost something and the others lost nothing.

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::ensure;
use clap::Parser;
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::{BrokerId, ListOffsetsRequest, TopicName};
use kafka_protocol::protocol::StrBytes;
use semel::consumer::{AutoOffsetReset, Consumer, ConsumerConfig};
use semel::producer::{Acks, Producer, ProducerConfig, ProducerRecord};
use support::common::ChildBroker;

/// acks demo.
#[derive(Debug, Parser)]
struct Args {
    /// Messages acknowledged before the broker is frozen and killed.
    #[arg(long, default_value_t = 20_000)]
    acknowledged: usize,
    /// A quick run (2,000), as the tests do.
    #[arg(long)]
    quick: bool,
}

const TOPIC: &str = "orders";

#[derive(Debug, Default)]
struct Outcome {
    sent: usize,
    acknowledged: usize,
    stored: usize,
    acknowledged_lost: usize,
    stored_unacknowledged: usize,
}

async fn end_offset(addr: &str) -> anyhow::Result<i64> {
    let request = ListOffsetsRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_topics(vec![
            ListOffsetsTopic::default()
                .with_name(TopicName(StrBytes::from_static_str(TOPIC)))
                .with_partitions(vec![
                    ListOffsetsPartition::default()
                        .with_partition_index(0)
                        .with_timestamp(-1),
                ]),
        ]);
    let response = support::admin(addr)
        .await?
        .any()
        .await?
        .send(&request, (1, 7))
        .await?;
    Ok(response.topics[0].partitions[0].offset)
}

fn signal(broker: &ChildBroker, name: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .args([format!("-{name}"), broker.child.id().to_string()])
        .status()?;
    ensure!(status.success(), "kill -{name} failed");
    Ok(())
}

async fn run(acks: Acks, acknowledged_first: usize) -> anyhow::Result<Outcome> {
    let dir = tempfile::tempdir()?;
    let broker = ChildBroker::spawn(dir.path(), &[])?;
    let addr = broker.addr.to_string();
    support::create_topics(&addr, &[(TOPIC, 1)]).await?;
    let producer = Arc::new(
        Producer::connect(ProducerConfig {
            bootstrap_servers: vec![addr.clone()],
            acks,
            enable_idempotence: acks == Acks::All,
            linger: Duration::from_millis(1),
            request_timeout: Duration::from_secs(1),
            delivery_timeout: Duration::from_secs(2),
            ..ProducerConfig::default()
        })
        .await?,
    );
    let acked: Arc<Mutex<BTreeSet<usize>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let sender = {
        let (producer, acked, stop, sent) = (
            Arc::clone(&producer),
            Arc::clone(&acked),
            Arc::clone(&stop),
            Arc::clone(&sent),
        );
        tokio::spawn(async move {
            let mut n = 0;
            let mut waiting = tokio::task::JoinSet::new();
            while !stop.load(Ordering::SeqCst) {
                let Ok(delivery) = producer
                    .send(ProducerRecord::new(TOPIC, n.to_string()))
                    .await
                else {
                    break;
                };
                let acked = Arc::clone(&acked);
                waiting.spawn(async move {
                    if delivery.await.is_ok() {
                        acked.lock().expect("acked").insert(n);
                    }
                });
                n += 1;
                sent.store(n, Ordering::SeqCst);
                if n % 256 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            while waiting.join_next().await.is_some() {}
        })
    };
    let patience = support::Patience::new("the first acknowledgements", Duration::from_secs(60));
    while acked.lock().expect("acked").len() < acknowledged_first {
        patience.check(|| {
            format!(
                "{} of {acknowledged_first} acknowledged",
                acked.lock().expect("acked").len()
            )
        })?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Freeze the broker (it reads nothing more), let the producer go on for a moment, kill.
    signal(&broker, "STOP")?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker.kill9()?;
    stop.store(true, Ordering::SeqCst);
    // Deliveries still pending once the broker is gone count as not acknowledged.
    let mut sender = sender;
    if tokio::time::timeout(Duration::from_secs(3), &mut sender)
        .await
        .is_err()
    {
        sender.abort();
    }
    let sent = sent.load(Ordering::SeqCst);
    if let Ok(producer) = Arc::try_unwrap(producer) {
        tokio::time::timeout(Duration::from_secs(2), producer.close())
            .await
            .ok();
    }

    // Restart on the same directory and read everything back.
    let broker = ChildBroker::spawn(dir.path(), &[])?;
    let addr = broker.addr.to_string();
    let end = end_offset(&addr).await?;
    let mut consumer = Consumer::connect(ConsumerConfig {
        bootstrap_servers: vec![addr.clone()],
        auto_offset_reset: AutoOffsetReset::Earliest,
        ..ConsumerConfig::default()
    })
    .await?;
    consumer.assign([(TOPIC.to_string(), 0)])?;
    let mut stored = BTreeSet::new();
    let patience = support::Patience::new(
        "the log read back after the restart",
        Duration::from_secs(120),
    );
    while consumer
        .position(&(TOPIC.to_string(), 0))
        .is_none_or(|p| p < end)
    {
        patience.check(|| {
            format!(
                "position {:?} of {end}",
                consumer.position(&(TOPIC.to_string(), 0))
            )
        })?;
        for record in consumer.poll(Duration::from_secs(1)).await? {
            stored.insert(
                std::str::from_utf8(record.value.as_deref().unwrap_or_default())?
                    .parse::<usize>()?,
            );
        }
    }
    drop(broker);
    let acked = acked.lock().expect("acked").clone();
    Ok(Outcome {
        sent,
        acknowledged: acked.len(),
        stored: stored.len(),
        acknowledged_lost: acked.difference(&stored).count(),
        stored_unacknowledged: stored.difference(&acked).count(),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let first = if args.quick { 2_000 } else { args.acknowledged };
    println!(
        "acks: a producer sends as fast as it can; after {first} acknowledgements the broker is frozen 300 ms, then kill -9, then restarted\n"
    );
    println!(
        "| acks | handed to the producer | acknowledged | in the log after restart | acknowledged but lost | stored, never acknowledged |"
    );
    println!("|---|---|---|---|---|---|");
    let mut results = Vec::new();
    for (label, acks) in [("0", Acks::None), ("1", Acks::Leader), ("all", Acks::All)] {
        let o = run(acks, first).await?;
        println!(
            "| {label} | {} | {} | {} | {} | {} |",
            o.sent, o.acknowledged, o.stored, o.acknowledged_lost, o.stored_unacknowledged
        );
        results.push((label, o));
    }
    println!();
    for (label, o) in &results {
        println!(
            "RESULT acks={label} sent={} acknowledged={} stored={} lost={}",
            o.sent, o.acknowledged, o.stored, o.acknowledged_lost
        );
    }
    ensure!(
        results[0].1.acknowledged_lost > 0,
        "acks=0 lost nothing: the broker was not frozen long enough"
    );
    ensure!(
        results[1].1.acknowledged_lost == 0 && results[2].1.acknowledged_lost == 0,
        "acks=1/all lost acknowledged messages"
    );
    println!(
        "\nacks=0 lost {} messages the producer believed sent; acks=1 and acks=all lost nothing they acknowledged \
         (acks=1 would lose to a power cut what acks=all fsynced).",
        results[0].1.acknowledged_lost
    );
    Ok(())
}
