//! A handler still running when its partition moves to another host. Host A (its own store)
//! holds m0 in flight and has settled m1..m3 when the group moves the partition to host B (its
//! own store; marks travel through the changelog). A's handler finishes m0 a moment later.
//! B must not handle m0 again, and every id must be handled once over the two hosts: the
//! revocation waits for A's handler and for its mark to reach the changelog before A commits
//! and before B is given the partition (as a Java application blocks in
//! `onPartitionsRevoked`).

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use common::TestBroker;
use common::child::PATIENCE;
use semel::consumer::dedup::{
    ChangelogConfig, DedupConfig, DedupConsumer, DedupStore, Fresh, MiddlewareConfig,
};
use semel::consumer::{AutoOffsetReset, Consumer, ConsumerConfig, Strategy};
use semel::producer::{Producer, ProducerConfig, ProducerRecord};

fn config(bootstrap: &str, group: &str, strategy: Strategy) -> ConsumerConfig {
    ConsumerConfig {
        bootstrap_servers: vec![bootstrap.to_string()],
        group_id: Some(group.to_string()),
        auto_offset_reset: AutoOffsetReset::Earliest,
        session_timeout: Duration::from_secs(10),
        heartbeat_interval: Duration::from_millis(300),
        max_poll_interval: Duration::from_secs(20),
        fetch_max_wait: Duration::from_millis(50),
        partition_assignment_strategy: vec![strategy],
        ..ConsumerConfig::default()
    }
}

async fn host(
    bootstrap: &str,
    group: &str,
    topic: &str,
    dir: &std::path::Path,
    strategy: Strategy,
) -> anyhow::Result<DedupConsumer> {
    let mut consumer = Consumer::connect(config(bootstrap, group, strategy)).await?;
    consumer.subscribe([topic])?;
    let store = Arc::new(DedupStore::open(DedupConfig::new(dir))?);
    Ok(DedupConsumer::new(
        consumer,
        store,
        MiddlewareConfig {
            commit_interval: Duration::from_millis(10),
            changelog: Some(ChangelogConfig::default()),
            ..MiddlewareConfig::default()
        },
    )?)
}

fn id(fresh: &Fresh) -> String {
    String::from_utf8_lossy(fresh.record.value.as_deref().unwrap_or_default()).into_owned()
}

type Handled = Arc<Mutex<BTreeMap<String, Vec<&'static str>>>>;

fn note(handled: &Handled, host: &'static str, id: String) {
    handled
        .lock()
        .expect("handled")
        .entry(id)
        .or_default()
        .push(host);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_in_flight_when_its_partition_moves_is_not_handled_again_on_the_next_host()
-> anyhow::Result<()> {
    moves_with_a_handler_in_flight(Strategy::Range).await
}

/// The same with cooperative-sticky: only the moving partition is revoked, and the follow-up
/// rebalance that hands it over waits for the revocation's commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_with_cooperative_sticky() -> anyhow::Result<()> {
    moves_with_a_handler_in_flight(Strategy::CooperativeSticky).await
}

async fn moves_with_a_handler_in_flight(strategy: Strategy) -> anyhow::Result<()> {
    common::init_tracing();
    let broker = TestBroker::start_with(|c| {
        c.group.initial_rebalance_delay = Duration::from_millis(0);
    })
    .await?;
    let bootstrap = broker.bootstrap();
    let (topic, parking) = ("moving", "parking");
    let group = format!("moving-{}", strategy.name());
    let group = group.as_str();
    let producer = Producer::connect(ProducerConfig {
        bootstrap_servers: vec![bootstrap.clone()],
        ..ProducerConfig::default()
    })
    .await?;
    let mut end = 0;
    for n in 0..10 {
        let record = ProducerRecord::new(topic, format!("m{n}"))
            .partition(0)
            .header("semel-msg-id", format!("m{n}"));
        end = producer.send(record).await?.await?.offset + 1;
    }
    // The parking topic exists so that each host has something to own while the other has
    // the partition that moves.
    producer
        .send(ProducerRecord::new(parking, "p0").header("semel-msg-id", "p0"))
        .await?
        .await?;
    producer.close().await;
    let dirs = (tempfile::tempdir()?, tempfile::tempdir()?);
    let handled: Handled = Arc::default();

    // A owns `moving`, B owns `parking`.
    let mut a = host(&bootstrap, group, topic, dirs.0.path(), strategy).await?;
    let mut b = host(&bootstrap, group, parking, dirs.1.path(), strategy).await?;
    let mut in_flight = None;
    let started = Instant::now();
    let mut settled_by_a = 0;
    while settled_by_a < 3 || in_flight.is_none() {
        ensure!(
            started.elapsed() < PATIENCE,
            "host A got {settled_by_a} records and m0 {}",
            if in_flight.is_some() {
                "in flight"
            } else {
                "not yet"
            }
        );
        if let Ok(fresh) = tokio::time::timeout(Duration::from_millis(100), a.next()).await {
            let fresh = fresh?;
            if id(&fresh) == "m0" {
                in_flight = Some(fresh);
            } else if settled_by_a < 3 {
                note(&handled, "A", id(&fresh));
                fresh.done(|_| {}).await?;
                settled_by_a += 1;
            } else {
                // Not settled: handed out again to whoever owns the partition next.
                fresh.failed().await?;
            }
        }
        if let Ok(fresh) = tokio::time::timeout(Duration::from_millis(10), b.next()).await {
            fresh?.done(|_| {}).await?;
        }
    }
    let m0 = in_flight.context("m0 never handed out")?;

    // The partitions swap hosts while A's handler is still on m0; it finishes 1.5 s later.
    a.consumer().subscribe([parking])?;
    b.consumer().subscribe([topic])?;
    let finishing = {
        let handled = Arc::clone(&handled);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            note(&handled, "A", id(&m0));
            m0.done(|_| {}).await
        })
    };
    let started = Instant::now();
    while b.position(&(topic.to_string(), 0)).is_none_or(|p| p < end) || !finishing.is_finished() {
        ensure!(
            started.elapsed() < PATIENCE,
            "host B never read `{topic}` to {end}: position {:?}; handled {:?}",
            b.position(&(topic.to_string(), 0)),
            handled.lock().expect("handled")
        );
        if let Ok(fresh) = tokio::time::timeout(Duration::from_millis(20), a.next()).await {
            // Records A had given back come to A again while it still owns the partition.
            let fresh = fresh?;
            if fresh.record.topic.as_ref() == topic {
                note(&handled, "A", id(&fresh));
            }
            fresh.done(|_| {}).await?;
        }
        if let Ok(fresh) = tokio::time::timeout(Duration::from_millis(20), b.next()).await {
            let fresh = fresh?;
            if fresh.record.topic.as_ref() == topic {
                note(&handled, "B", id(&fresh));
            }
            fresh.done(|_| {}).await?;
        }
    }
    finishing.await??;
    // Each close rebalances the group under the other: a commit that meets it fails, and
    // is reported; what was handled is what this test checks.
    for (name, host) in [("A", a), ("B", b)] {
        if let Err(e) = host.close().await {
            eprintln!("host {name} closed with: {e}");
        }
    }

    let handled = handled.lock().expect("handled").clone();
    let twice: BTreeMap<&String, &Vec<&str>> = handled
        .iter()
        .filter(|(_, hosts)| hosts.len() > 1)
        .collect();
    ensure!(
        twice.is_empty(),
        "handled on both hosts: {twice:?} (all: {handled:?})"
    );
    let missing: Vec<String> = (0..10)
        .map(|n| format!("m{n}"))
        .filter(|id| !handled.contains_key(id))
        .collect();
    ensure!(missing.is_empty(), "never handled: {missing:?}");
    Ok(())
}
