//! The dedup middleware's edges: what it refuses to start with, and what it leaves behind.
//! - `enable.auto.commit` is refused: auto-commit commits the positions of records handed
//!   out but not handled yet, which skips them after a crash;
//! - a `DedupConsumer` dropped without `close` (a panic unwinding, an early return) stops
//!   everything it started: its changelog's standby task held the store, so the store could
//!   not be opened again in the same process.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use common::TestBroker;
use semel::consumer::dedup::{
    ChangelogConfig, DedupConfig, DedupConsumer, DedupError, DedupStore, MiddlewareConfig,
};
use semel::consumer::{AutoOffsetReset, Consumer, ConsumerConfig};
use semel::producer::{Producer, ProducerConfig, ProducerRecord};

fn consumer_config(bootstrap: &str, group: &str) -> ConsumerConfig {
    ConsumerConfig {
        bootstrap_servers: vec![bootstrap.to_string()],
        group_id: Some(group.to_string()),
        auto_offset_reset: AutoOffsetReset::Earliest,
        fetch_max_wait: Duration::from_millis(50),
        ..ConsumerConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enable_auto_commit_is_refused() -> anyhow::Result<()> {
    let broker = TestBroker::start().await?;
    let dir = tempfile::tempdir()?;
    let store = Arc::new(DedupStore::open(DedupConfig::new(dir.path().join("s")))?);
    let consumer = Consumer::connect(ConsumerConfig {
        enable_auto_commit: true,
        ..consumer_config(&broker.bootstrap(), "auto-commit")
    })
    .await?;
    match DedupConsumer::new(consumer, store, MiddlewareConfig::default()) {
        Ok(_) => bail!("a DedupConsumer was made over a consumer with enable.auto.commit"),
        Err(e) => ensure!(
            e.to_string().contains("enable.auto.commit"),
            "the error does not name the setting: {e}"
        ),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_dedup_consumer_stops_its_standby_task_and_frees_the_store() -> anyhow::Result<()>
{
    let broker = TestBroker::start().await?;
    let bootstrap = broker.bootstrap();
    let topic = "standby-drop";
    let producer = Producer::connect(ProducerConfig {
        bootstrap_servers: vec![bootstrap.clone()],
        ..ProducerConfig::default()
    })
    .await?;
    producer
        .send(ProducerRecord::new(topic, "v").header("semel-msg-id", "m0"))
        .await?
        .await?;
    producer.close().await;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    {
        let store = Arc::new(DedupStore::open(DedupConfig::new(&path))?);
        let mut consumer = Consumer::connect(consumer_config(&bootstrap, "standby-drop")).await?;
        consumer.subscribe([topic])?;
        let mut dedup = DedupConsumer::new(
            consumer,
            store,
            MiddlewareConfig {
                changelog: Some(ChangelogConfig {
                    standby: true,
                    ..ChangelogConfig::default()
                }),
                ..MiddlewareConfig::default()
            },
        )?;
        // The first record starts the changelog, and with it the standby task.
        let fresh = tokio::time::timeout(Duration::from_secs(60), dedup.next()).await??;
        dedup.done(fresh, |_| {}).await?;
        // Dropped without close.
    }
    let started = Instant::now();
    loop {
        match DedupStore::open(DedupConfig::new(&path)) {
            Ok(_) => return Ok(()),
            Err(DedupError::InUse { .. }) if started.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => bail!(
                "the store is still held {:?} after its DedupConsumer was dropped: {e}",
                started.elapsed()
            ),
        }
    }
}
