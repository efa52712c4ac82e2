//! Consumer benchmark: semel-consumer and kcat (librdkafka) reading the same topic from the
//! same broker in the same run, for 100 B and 1 KiB records.
//!
//! ```sh
//! cargo run --release --example consumer_bench -- --messages 1000000
//! cargo run --release --example consumer_bench -- --bootstrap 127.0.0.1:9092
//! ```
//! Without `--bootstrap` it starts an embedded semel-broker on a temporary directory. For each
//! record size it fills a fresh 3-partition topic (semel-producer, `acks=1`), then times each
//! client reading every record from the beginning: semel from `connect` to the last record
//! (manual assignment, no group), kcat from process start to exit (`-C -e`, output to
//! /dev/null). Clients alternate, and each reads the topic `--rounds` times.

#[path = "support/mod.rs"]
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Parser;
use semel::consumer::{AutoOffsetReset, Consumer, ConsumerConfig};
use semel::producer::{Acks, Producer, ProducerConfig, ProducerRecord};

/// Consumer benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// Broker to read from; without it an embedded broker is started.
    #[arg(long)]
    bootstrap: Option<String>,
    /// Records per topic.
    #[arg(long, default_value_t = 1_000_000)]
    messages: usize,
    /// Reads per client and record size.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Skip kcat.
    #[arg(long)]
    no_kcat: bool,
}

const PARTITIONS: i32 = 3;

async fn fill(bootstrap: &str, topic: &str, messages: usize, size: usize) -> anyhow::Result<()> {
    let producer = Producer::connect(ProducerConfig {
        bootstrap_servers: vec![bootstrap.to_string()],
        acks: Acks::Leader,
        enable_idempotence: false,
        linger: Duration::from_millis(5),
        batch_size: 256 * 1024,
        ..ProducerConfig::default()
    })
    .await?;
    let value = bytes::Bytes::from(vec![b'x'; size]);
    let mut deliveries = Vec::with_capacity(messages);
    for i in 0..messages {
        let record = ProducerRecord::new(topic, value.clone()).key(format!("k{i}"));
        deliveries.push(producer.send(record).await?);
    }
    for delivery in deliveries {
        delivery.await?;
    }
    producer.close().await;
    Ok(())
}

async fn semel(bootstrap: &str, topic: &str, messages: usize) -> anyhow::Result<(Duration, u64)> {
    let started = Instant::now();
    let mut consumer = Consumer::connect(ConsumerConfig {
        bootstrap_servers: vec![bootstrap.to_string()],
        auto_offset_reset: AutoOffsetReset::Earliest,
        ..ConsumerConfig::default()
    })
    .await?;
    consumer.assign((0..PARTITIONS).map(|p| (topic.to_string(), p)))?;
    let mut count = 0;
    let mut bytes = 0u64;
    while count < messages {
        for record in consumer.poll(Duration::from_secs(5)).await? {
            bytes += record.value.as_ref().map_or(0, |v| v.len()) as u64;
            count += 1;
        }
    }
    Ok((started.elapsed(), bytes))
}

fn kcat(bootstrap: &str, topic: &str, messages: usize) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let output = Command::new("kcat")
        .args([
            "-C",
            "-b",
            bootstrap,
            "-t",
            topic,
            "-o",
            "beginning",
            "-e",
            "-q",
        ])
        .args(["-f", "%o\\n"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .context("cannot start kcat")?;
    let elapsed = started.elapsed();
    ensure!(
        output.status.success(),
        "kcat: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines = output.stdout.iter().filter(|b| **b == b'\n').count();
    ensure!(lines == messages, "kcat read {lines} of {messages} records");
    Ok(elapsed)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let broker = support::ExampleBroker::start(args.bootstrap.as_deref(), |_| {}).await?;
    let bootstrap = broker.bootstrap.clone();
    println!("| client | record | round | records/s | MB/s (values) |");
    println!("|---|---|---|---|---|");
    for size in [100, 1024] {
        let topic = format!("consume-{size}-{}", std::process::id());
        support::create_topics(&bootstrap, &[(&topic, PARTITIONS)]).await?;
        fill(&bootstrap, &topic, args.messages, size).await?;
        for round in 1..=args.rounds {
            for client in ["semel", "kcat"] {
                if client == "kcat" && args.no_kcat {
                    continue;
                }
                let elapsed = if client == "semel" {
                    let (elapsed, bytes) = semel(&bootstrap, &topic, args.messages).await?;
                    ensure!(
                        bytes == (args.messages * size) as u64,
                        "semel read {bytes} bytes"
                    );
                    elapsed
                } else {
                    let (b, t, m) = (bootstrap.clone(), topic.clone(), args.messages);
                    tokio::task::spawn_blocking(move || kcat(&b, &t, m)).await??
                };
                let rate = args.messages as f64 / elapsed.as_secs_f64();
                println!(
                    "| {client} | {size} B | {round} | {rate:.0} | {:.1} |",
                    rate * size as f64 / 1e6
                );
            }
        }
    }
    broker.shutdown().await;
    Ok(())
}
