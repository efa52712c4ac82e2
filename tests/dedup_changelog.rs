//! The dedup changelog across two "hosts": two consumer processes of one group, each with its
//! **own** store directory. Host A handles part of the input, its marks reach the changelog
//! (`flush_changelog`), and it is `kill -9`ed before any offset commit. The partitions move to
//! host B, which reads everything again from the start:
//! - with the changelog, B replays A's marks first and drops every message A handled: each
//!   id is handled exactly once over the two hosts;
//! - without it, B handles A's messages a second time (asserted, so the test fails if the
//!   fault was not injected);
//! - a record in the changelog that is not a mark (someone else wrote to the topic) is
//!   skipped and counted, not fatal.
//!
//! The consumer process is this test binary itself, started with `host_child` as the test to
//! run and `SEMEL_HOST_CHILD` set. The scenario lives in `tests/common/dedup_hosts.rs`, which
//! `tests/kafka_cluster.rs` runs on Apache Kafka too.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::ensure;
use common::child::PATIENCE;
use common::dedup_hosts::{self, A_HANDLES, MESSAGES, Outcome, PARTITIONS, consumer_config};
use common::{RawClient, TestBroker, child, create_topic};
use semel::consumer::dedup::{
    ChangelogConfig, DedupConfig, DedupConsumer, DedupStore, MiddlewareConfig,
};
use semel::consumer::{Consumer, ConsumerConfig};
use semel::producer::{Producer, ProducerConfig, ProducerRecord};

#[test]
fn host_child() -> anyhow::Result<()> {
    child::run_if_child("SEMEL_HOST_CHILD", dedup_hosts::child_main)
}

async fn two_hosts(changelog: &str) -> anyhow::Result<Outcome> {
    let broker = TestBroker::start_with(|c| {
        c.group.initial_rebalance_delay = Duration::from_millis(100);
    })
    .await?;
    let mut admin = RawClient::connect(broker.addr()).await?;
    create_topic(&mut admin, "orders", PARTITIONS).await?;
    dedup_hosts::two_hosts(
        &broker.bootstrap(),
        "orders",
        &format!("billing-{changelog}"),
        changelog,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changelog_carries_marks_to_another_host() -> anyhow::Result<()> {
    every_id_once_over_the_two_hosts(two_hosts("on").await?)
}

/// Defect: with partitions assigned by hand (`Consumer::assign`, no group rebalance) there
/// was no assignment callback, so nothing replayed the changelog: host B handled every
/// message host A had handled again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changelog_carries_marks_to_another_host_under_manual_assignment() -> anyhow::Result<()> {
    every_id_once_over_the_two_hosts(two_hosts("assign").await?)
}

fn every_id_once_over_the_two_hosts(outcome: Outcome) -> anyhow::Result<()> {
    let missing = (0..MESSAGES)
        .filter(|n| !outcome.handled.contains_key(&format!("m{n}")))
        .count();
    let twice: Vec<_> = outcome.handled.iter().filter(|(_, c)| **c > 1).collect();
    eprintln!(
        "changelog on: a handled {}, b: {}; ids handled twice {}, missing {missing}",
        outcome.a_handled,
        outcome.b_status,
        twice.len()
    );
    ensure!(missing == 0, "{missing} ids never handled");
    ensure!(
        twice.is_empty(),
        "handled twice with the changelog: {twice:?}"
    );
    ensure!(
        outcome.b_status.contains(&format!("restored={A_HANDLES} ")),
        "host b should have restored exactly host a's marks: {}",
        outcome.b_status
    );
    ensure!(
        outcome.b_status.contains("skipped=1"),
        "the record that is not a mark was skipped and counted: {}",
        outcome.b_status
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_changelog_the_other_host_handles_again() -> anyhow::Result<()> {
    let outcome = two_hosts("off").await?;
    let twice = outcome.handled.values().filter(|c| **c > 1).count();
    eprintln!(
        "changelog off: a handled {}, b: {}; ids handled twice {twice}",
        outcome.a_handled, outcome.b_status
    );
    ensure!(outcome.handled.len() == MESSAGES, "ids missing");
    // Every message A handled comes again on B, which has never seen its key.
    ensure!(
        twice == A_HANDLES,
        "expected host a's {A_HANDLES} ids handled twice, got {twice}"
    );
    Ok(())
}

/// Warm standby: host B tails the changelog while it owns nothing (host A holds the
/// partitions until its session times out after its crash), so when it takes them over its
/// replay reads only what the standby had not, and it hands out none of A's messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_standby_knows_the_marks_before_the_takeover() -> anyhow::Result<()> {
    let broker = TestBroker::start_with(|c| {
        c.group.initial_rebalance_delay = Duration::from_millis(100);
    })
    .await?;
    let bootstrap = broker.bootstrap();
    let mut admin = RawClient::connect(broker.addr()).await?;
    let topic = "orders";
    create_topic(&mut admin, topic, PARTITIONS).await?;
    let group = "billing-standby";
    let producer = Producer::connect(ProducerConfig {
        bootstrap_servers: vec![bootstrap.clone()],
        ..ProducerConfig::default()
    })
    .await?;
    for n in 0..MESSAGES {
        let id = format!("m{n}");
        let record = ProducerRecord::new(topic, id.clone()).header("semel-msg-id", id);
        producer.send(record).await?.await?;
    }
    producer.close().await;
    let work = tempfile::tempdir()?;
    let mut handled: BTreeMap<String, u32> = BTreeMap::new();

    // Host A handles half, its marks reach the changelog, and it crashes (dropped: no
    // commit, no LeaveGroup; its membership lasts until session.timeout.ms).
    {
        let store = Arc::new(DedupStore::open(DedupConfig::new(work.path().join("a")))?);
        let mut consumer = Consumer::connect(consumer_config(&bootstrap, group)).await?;
        consumer.subscribe([topic])?;
        let mut a = DedupConsumer::new(
            consumer,
            store,
            MiddlewareConfig {
                commit_interval: Duration::from_secs(3600),
                ..MiddlewareConfig::default()
            },
        )?;
        for _ in 0..A_HANDLES {
            let fresh = a.next().await?;
            let id = String::from_utf8_lossy(fresh.record.value.as_deref().unwrap_or_default())
                .into_owned();
            a.done(fresh, |_| {}).await?;
            *handled.entry(id).or_default() += 1;
        }
        a.flush_changelog().await?;
    }

    let store = Arc::new(DedupStore::open(DedupConfig::new(work.path().join("b")))?);
    let mut consumer = Consumer::connect(consumer_config(&bootstrap, group)).await?;
    consumer.subscribe([topic])?;
    let mut b = DedupConsumer::new(
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
    // Until A's session ends (6 s), B owns nothing; its standby reads A's marks meanwhile.
    let started = Instant::now();
    let mut standby_before_takeover = 0;
    let mut b_handled = 0;
    while b_handled < MESSAGES - A_HANDLES {
        ensure!(started.elapsed() < PATIENCE, "host b handled {b_handled}");
        if b.consumer().assignment().is_empty() {
            standby_before_takeover = b.metrics().changelog.standby_marks;
        }
        let Ok(fresh) = tokio::time::timeout(Duration::from_millis(100), b.next()).await else {
            continue;
        };
        let fresh = fresh?;
        let id =
            String::from_utf8_lossy(fresh.record.value.as_deref().unwrap_or_default()).into_owned();
        b.done(fresh, |_| {}).await?;
        *handled.entry(id).or_default() += 1;
        b_handled += 1;
    }
    let m = b.metrics();
    eprintln!(
        "standby: marks known before the takeover {standby_before_takeover}, standby total {}, replay read {} restored {}; b fresh {} duplicates {}",
        m.changelog.standby_marks,
        m.changelog.records_read,
        m.changelog.marks_restored,
        m.fresh,
        m.duplicates
    );
    b.close().await?;
    ensure!(
        handled.len() == MESSAGES && handled.values().all(|c| *c == 1),
        "every id once over the two hosts"
    );
    // Every mark of A reached B one way or the other...
    ensure!(
        m.changelog.standby_marks + m.changelog.marks_restored == A_HANDLES as u64,
        "marks: standby {} + replay {}",
        m.changelog.standby_marks,
        m.changelog.marks_restored
    );
    // ...and the standby had them before B owned a partition (A's session lasts 6 s; the
    // standby reads 300 records in milliseconds).
    ensure!(
        standby_before_takeover == A_HANDLES as u64,
        "the standby knew {standby_before_takeover} marks before the takeover"
    );
    Ok(())
}

/// The broker goes away while marks wait for the changelog: `flush_changelog` reports the
/// failure once `delivery_timeout` has passed (it used to retry forever), and `close` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_returns_when_the_broker_is_gone_and_says_the_marks_did_not_land()
-> anyhow::Result<()> {
    let broker = TestBroker::start_with(|c| {
        c.group.initial_rebalance_delay = Duration::from_millis(100);
    })
    .await?;
    let bootstrap = broker.bootstrap();
    let mut admin = RawClient::connect(broker.addr()).await?;
    create_topic(&mut admin, "orders", 1).await?;
    let producer = Producer::connect(ProducerConfig {
        bootstrap_servers: vec![bootstrap.clone()],
        ..ProducerConfig::default()
    })
    .await?;
    for n in 0..50 {
        let id = format!("m{n}");
        let record = ProducerRecord::new("orders", id.clone()).header("semel-msg-id", id);
        producer.send(record).await?.await?;
    }
    producer.close().await;
    let work = tempfile::tempdir()?;
    let store = Arc::new(DedupStore::open(DedupConfig::new(work.path().join("s")))?);
    let mut consumer = Consumer::connect(ConsumerConfig {
        request_timeout: Duration::from_secs(2),
        ..consumer_config(&bootstrap, "gone")
    })
    .await?;
    consumer.subscribe(["orders"])?;
    let mut dedup = DedupConsumer::new(
        consumer,
        store,
        MiddlewareConfig {
            changelog: Some(ChangelogConfig {
                delivery_timeout: Duration::from_secs(3),
                ..ChangelogConfig::default()
            }),
            ..MiddlewareConfig::default()
        },
    )?;
    // The first record brings the rest of the partition into the consumer's buffer.
    let first = tokio::time::timeout(PATIENCE, dedup.next()).await??;
    dedup.done(first, |_| {}).await?;
    dedup.flush_changelog().await?;
    broker.handle.shutdown().await;
    // Buffered records are still handed out and marked locally; their marks cannot land.
    for _ in 0..5 {
        let fresh = tokio::time::timeout(PATIENCE, dedup.next()).await??;
        dedup.done(fresh, |_| {}).await?;
    }
    let flushed = tokio::time::timeout(PATIENCE, dedup.flush_changelog())
        .await
        .map_err(|_| anyhow::anyhow!("flush_changelog hangs with the broker gone"))?;
    ensure!(
        flushed.is_err(),
        "flush_changelog reported success with the broker gone"
    );
    tokio::time::timeout(PATIENCE, dedup.close())
        .await
        .map_err(|_| anyhow::anyhow!("close hangs with the broker gone"))?
        .ok();
    Ok(())
}

/// Defect: a replay cut short by a cancelled `next()` (a caller's timeout) lost the count of
/// the marks it had already written to the store, so `marks_restored` under-counted: the next
/// call's replay started from the position those writes reached and found nothing left. (The
/// marks themselves were kept; `examples/duplicate_consume` showed "0 marks replayed" while
/// it dropped every one of host A's messages.) Host B here calls `next()` with timeouts of
/// 1 ms, 2 ms, 3 ms, ... so that replays are cancelled at every kind of await point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_cancelled_midway_still_counts_every_mark_it_restored() -> anyhow::Result<()> {
    const HANDLED: usize = 3000;
    let broker = TestBroker::start_with(|c| {
        c.group.initial_rebalance_delay = Duration::from_millis(100);
    })
    .await?;
    let bootstrap = broker.bootstrap();
    let mut admin = RawClient::connect(broker.addr()).await?;
    let topic = "replay-count";
    create_topic(&mut admin, topic, 1).await?;
    let group = "replay-count-group";
    let producer = Producer::connect(ProducerConfig {
        bootstrap_servers: vec![bootstrap.clone()],
        ..ProducerConfig::default()
    })
    .await?;
    let mut acks = Vec::new();
    for n in 0..=HANDLED {
        let id = format!("m{n}");
        acks.push(
            producer
                .send(ProducerRecord::new(topic, id.clone()).header("semel-msg-id", id))
                .await?,
        );
    }
    for ack in acks {
        ack.await?;
    }
    producer.close().await;
    let work = tempfile::tempdir()?;
    {
        let store = Arc::new(DedupStore::open(DedupConfig::new(work.path().join("a")))?);
        let mut consumer = Consumer::connect(consumer_config(&bootstrap, group)).await?;
        consumer.subscribe([topic])?;
        let mut a = DedupConsumer::new(consumer, store, MiddlewareConfig::default())?;
        for _ in 0..HANDLED {
            let fresh = tokio::time::timeout(PATIENCE, a.next()).await??;
            a.done(fresh, |_| {}).await?;
        }
        tokio::time::timeout(PATIENCE, a.close()).await??;
    }
    let store = Arc::new(DedupStore::open(DedupConfig::new(work.path().join("b")))?);
    let mut consumer = Consumer::connect(consumer_config(&bootstrap, group)).await?;
    consumer.subscribe([topic])?;
    let mut b = DedupConsumer::new(consumer, store, MiddlewareConfig::default())?;
    let started = Instant::now();
    let mut wait_ms = 0;
    let last = loop {
        ensure!(started.elapsed() < PATIENCE, "host b handed out nothing");
        wait_ms += 1;
        if let Ok(fresh) = tokio::time::timeout(Duration::from_millis(wait_ms), b.next()).await {
            break fresh?;
        }
    };
    ensure!(
        last.record.offset == HANDLED as i64,
        "host b handed out offset {}",
        last.record.offset
    );
    b.done(last, |_| {}).await?;
    let restored = b.metrics().changelog.marks_restored;
    b.close().await?;
    ensure!(
        restored == HANDLED as u64,
        "marks_restored says {restored}; host b restored all {HANDLED} of host a's marks \
         (it handed none of them out again)"
    );
    Ok(())
}
