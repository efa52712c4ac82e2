//! Dedup changelog benchmark: what the changelog costs while handling, and how long a
//! consumer on a new host (empty store) takes to replay N marks before it hands out its
//! first record.
//!
//! 1. N messages (header `semel-msg-id`) are produced over `--partitions` partitions.
//! 2. Host A handles them all through the dedup middleware **without** a changelog (group
//!    `…-local`), then again **with** one (group `…-changelog`; its marks are produced to
//!    `<group>-semel-dedup-changelog`), each with its own empty store: messages/s of each.
//! 3. Host B, an empty store in the changelog group, is assigned every partition. One new
//!    message per partition arrives; before B hands it out it replays the changelog from
//!    (now − window): records read, marks restored, seconds.
//!
//! The plain consumer reads the same messages first (no dedup): the ceiling, in the same run.
//! `--batch N` claims and settles N messages at a time (`next_batch` + `done_many`: one store
//! write each); `--handlers N` settles them on N tasks at once, in whatever order they finish.
//!
//! ```sh
//! cargo run --release --example changelog_bench -- --messages 1000000
//! cargo run --release --example changelog_bench -- --messages 1000000 --batch 1000 --handlers 8
//! ```
//! Everything runs in this process on an embedded broker (or `--bootstrap host:port`).

#[path = "support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::ensure;
use clap::Parser;
use semel::consumer::dedup::{
    ChangelogConfig, DedupConfig, DedupConsumer, DedupStore, Fresh, MiddlewareConfig,
};
use semel::consumer::{AutoOffsetReset, Consumer, ConsumerConfig};
use semel::producer::{Producer, ProducerConfig, ProducerRecord};

/// Changelog benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// A Kafka-protocol broker; without it an embedded one is started.
    #[arg(long)]
    bootstrap: Option<String>,
    /// Messages to handle (and marks to replay).
    #[arg(long, default_value_t = 1_000_000)]
    messages: usize,
    /// Partitions of the input topic.
    #[arg(long, default_value_t = 3)]
    partitions: i32,
    /// Messages claimed and settled together (`next_batch` + `done_many`); 1: `next` + `done`
    /// per message.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Handlers at once, each on its own task, settling in whatever order they finish.
    #[arg(long, default_value_t = 1)]
    handlers: usize,
}

fn consumer_config(bootstrap: &str, group: &str) -> ConsumerConfig {
    ConsumerConfig {
        bootstrap_servers: vec![bootstrap.to_string()],
        group_id: Some(group.to_string()),
        auto_offset_reset: AutoOffsetReset::Earliest,
        fetch_max_wait: Duration::from_millis(50),
        ..ConsumerConfig::default()
    }
}

async fn produce(
    bootstrap: &str,
    topic: &str,
    ids: impl Iterator<Item = String>,
    partition: Option<i32>,
) -> anyhow::Result<()> {
    let producer = Producer::connect(ProducerConfig {
        bootstrap_servers: vec![bootstrap.to_string()],
        linger: Duration::from_millis(10),
        batch_size: 256 * 1024,
        ..ProducerConfig::default()
    })
    .await?;
    let mut deliveries = Vec::new();
    for id in ids {
        let mut record = ProducerRecord::new(topic, id.clone()).header("semel-msg-id", id);
        record.partition = partition;
        deliveries.push(producer.send(record).await?);
        if deliveries.len() >= 50_000 {
            for d in deliveries.drain(..) {
                d.await?;
            }
        }
    }
    for d in deliveries {
        d.await?;
    }
    producer.close().await;
    Ok(())
}

/// Reads every message of `topic` in `group` with the plain consumer (no dedup); returns
/// messages/s: the ceiling the middleware is measured against.
async fn read_plain(
    bootstrap: &str,
    topic: &str,
    group: &str,
    messages: usize,
) -> anyhow::Result<f64> {
    let mut consumer = Consumer::connect(consumer_config(bootstrap, group)).await?;
    consumer.subscribe([topic])?;
    // The clock starts at the first record: joining the group (the broker's initial
    // rebalance delay, 3 s by default) is not reading.
    let mut read = consumer.recv_many(1024).await?.len();
    let started = Instant::now();
    let timed = messages - read;
    while read < messages {
        read += consumer.recv_many(1024).await?.len();
    }
    let rate = timed as f64 / started.elapsed().as_secs_f64();
    consumer.close().await?;
    Ok(rate)
}

/// Handles every message of `topic` in `group`; returns messages/s.
async fn handle_all(
    bootstrap: &str,
    topic: &str,
    group: &str,
    args: &Args,
    changelog: Option<ChangelogConfig>,
) -> anyhow::Result<f64> {
    let messages = args.messages;
    let dir = tempfile::tempdir()?;
    let store = Arc::new(DedupStore::open(DedupConfig::new(dir.path().join("a")))?);
    let mut consumer = Consumer::connect(consumer_config(bootstrap, group)).await?;
    consumer.subscribe([topic])?;
    let mut dedup = DedupConsumer::new(
        consumer,
        store,
        MiddlewareConfig {
            changelog,
            ..MiddlewareConfig::default()
        },
    )?;
    let mut handled = 0;
    let mut tasks: tokio::task::JoinSet<anyhow::Result<()>> = tokio::task::JoinSet::new();
    let mut settling = None;
    // The clock starts at the first record, as for the plain consumer.
    let mut started = None;
    while handled < messages {
        let batch = if args.batch > 1 {
            dedup.next_batch(args.batch.min(messages - handled)).await?
        } else {
            vec![dedup.next().await?]
        };
        if started.is_none() {
            started = Some((Instant::now(), handled));
        }
        handled += batch.len();
        if args.handlers > 1 {
            while tasks.len() >= args.handlers {
                if let Some(done) = tasks.join_next().await {
                    done??;
                }
            }
            tasks.spawn(async move { Ok(Fresh::done_all(batch, |_| {}).await?) });
        } else {
            // The write runs on the store thread: the next batch is claimed meanwhile, and
            // this one's result is looked at after that.
            if let Some(previous) = settling.replace(dedup.done_many(batch, |_| {})) {
                previous.await?;
            }
        }
    }
    if let Some(last) = settling.take() {
        last.await?;
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    dedup.flush_changelog().await?;
    let (started, before) = started.unwrap_or((Instant::now(), 0));
    let rate = (messages - before) as f64 / started.elapsed().as_secs_f64();
    dedup.close().await?;
    Ok(rate)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let broker = support::ExampleBroker::start(args.bootstrap.as_deref(), |_| {}).await?;
    let bootstrap = broker.bootstrap.clone();
    let run = std::process::id();
    let topic = format!("bench-input-{run}");
    support::create_topics(&bootstrap, &[(&topic, args.partitions)]).await?;
    produce(
        &bootstrap,
        &topic,
        (0..args.messages).map(|n| format!("m{n}")),
        None,
    )
    .await?;
    println!(
        "changelog_bench: {} messages over {} partitions, batch {}, {} handler(s)",
        args.messages, args.partitions, args.batch, args.handlers
    );

    let plain = read_plain(
        &bootstrap,
        &topic,
        &format!("bench-{run}-plain"),
        args.messages,
    )
    .await?;
    println!("plain consumer:         {plain:>10.0} messages/s read (no dedup)");
    let local = handle_all(
        &bootstrap,
        &topic,
        &format!("bench-{run}-local"),
        &args,
        None,
    )
    .await?;
    println!(
        "host A, no changelog:   {local:>10.0} messages/s handled ({:.1} % of the plain consumer)",
        100.0 * local / plain
    );
    let group = format!("bench-{run}-changelog");
    let logged = handle_all(
        &bootstrap,
        &topic,
        &group,
        &args,
        Some(ChangelogConfig::default()),
    )
    .await?;
    println!(
        "host A, with changelog: {logged:>10.0} messages/s handled, marks acknowledged ({:.1} % of the plain consumer)",
        100.0 * logged / plain
    );

    // Host B: an empty store takes the partitions over.
    let store_dir = tempfile::tempdir()?;
    let store = Arc::new(DedupStore::open(DedupConfig::new(
        store_dir.path().join("b"),
    ))?);
    let mut consumer = Consumer::connect(consumer_config(&bootstrap, &group)).await?;
    consumer.subscribe([topic.as_str()])?;
    let mut dedup = DedupConsumer::new(consumer, Arc::clone(&store), MiddlewareConfig::default())?;
    for p in 0..args.partitions {
        produce(
            &bootstrap,
            &topic,
            std::iter::once(format!("new-{p}")),
            Some(p),
        )
        .await?;
    }
    let waiting = Instant::now();
    let fresh = dedup.next().await?;
    let first = waiting.elapsed();
    dedup.done(fresh, |_| {}).await?;
    let m = dedup.metrics().changelog;
    println!(
        "host B, empty store: replayed {} changelog records ({} marks restored) in {:.2} s = {:.0} marks/s; first record handed out {:.2} s after the consumer started waiting",
        m.records_read,
        m.marks_restored,
        m.restore_ms as f64 / 1000.0,
        m.marks_restored as f64 / (m.restore_ms.max(1) as f64 / 1000.0),
        first.as_secs_f64()
    );
    ensure!(
        m.marks_restored == args.messages as u64,
        "restored {} of {} marks",
        m.marks_restored,
        args.messages
    );
    println!(
        "RESULT plain_rate={plain:.0} local_rate={local:.0} changelog_rate={logged:.0} replayed={} restored={} restore_ms={}",
        m.records_read, m.marks_restored, m.restore_ms
    );
    dedup.close().await?;
    broker.shutdown().await;
    Ok(())
}
