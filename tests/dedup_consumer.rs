//! The dedup middleware end to end:
//! - a consumer process that keeps a ledger (a count per message id) through the store's
//!   atomic batch is `kill -9`ed at random points many times while a producer keeps sending
//!   (and resends some messages): every id is counted exactly once, with one handler and with
//!   eight on their own tasks settling in any order (some failing, some dropped). The same run with a plain
//!   consumer (ledger in a file, offsets committed every 100 ms) counts some ids twice;
//! - a side effect outside the batch (a file append) before a crash happens twice
//!   (at-least-once) while the batch ledger counts once (exactly-once);
//! - two members of one group in one process sharing one store: one crashes mid-stream, its
//!   partitions move, no message is handled twice;
//! - records without a key are rejected with a clear error or passed, by configuration.
//!
//! The consumer process is this test binary itself, started with `ledger_child` as the test
//! to run and `SEMEL_LEDGER_CHILD` set (the test of that name does nothing otherwise).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::ensure;
use common::child::{ChildProcess, Lcg, PATIENCE, append_line, env, env_list};
use common::{RawClient, TestBroker, child, create_topic};
use semel::consumer::dedup::{
    DedupConfig, DedupConsumer, DedupStore, MiddlewareConfig, MiddlewareError, MissingKey,
};
use semel::consumer::{AutoOffsetReset, Consumer, ConsumerConfig, Strategy};
use semel::producer::{Producer, ProducerConfig, ProducerRecord};

fn consumer_config(bootstrap: &str, group: &str) -> ConsumerConfig {
    ConsumerConfig {
        bootstrap_servers: vec![bootstrap.to_string()],
        group_id: Some(group.to_string()),
        auto_offset_reset: AutoOffsetReset::Earliest,
        session_timeout: Duration::from_secs(6),
        heartbeat_interval: Duration::from_millis(300),
        max_poll_interval: Duration::from_secs(20),
        fetch_max_wait: Duration::from_millis(100),
        partition_assignment_strategy: vec![Strategy::CooperativeSticky],
        ..ConsumerConfig::default()
    }
}

fn ledger_key(id: &str) -> Vec<u8> {
    format!("count/{id}").into_bytes()
}

fn count_of(store: &DedupStore, id: &str) -> anyhow::Result<u32> {
    Ok(match store.state(&ledger_key(id))? {
        Some(bytes) => u32::from_be_bytes(bytes.as_slice().try_into()?),
        None => 0,
    })
}

fn line_counts(path: &Path) -> anyhow::Result<BTreeMap<String, u32>> {
    let mut counts = BTreeMap::new();
    if path.exists() {
        for line in std::fs::read_to_string(path)?.lines() {
            *counts.entry(line.to_string()).or_default() += 1;
        }
    }
    Ok(counts)
}

/// The consumer process. Modes: `dedup` (middleware, ledger through the store's batch,
/// side effects appended to `SEMEL_EFFECTS`), `plain` (ledger appended to `SEMEL_EFFECTS`,
/// offsets committed every 100 ms). With `SEMEL_END` (end offset per partition) it exits once
/// it has read that far; otherwise it runs until killed.
#[test]
fn ledger_child() -> anyhow::Result<()> {
    child::run_if_child("SEMEL_LEDGER_CHILD", child_main)
}

async fn child_main() -> anyhow::Result<()> {
    let bootstrap = env("SEMEL_BOOTSTRAP")?;
    let topic = env("SEMEL_TOPIC")?;
    let group = env("SEMEL_GROUP")?;
    let effects = PathBuf::from(env("SEMEL_EFFECTS")?);
    let end = env_list("SEMEL_END")?;
    let crash_after_effect = std::env::var("SEMEL_CRASH_AFTER_EFFECT").ok();
    let config = ConsumerConfig {
        // A static member: a restarted process takes its place at once (KIP-345).
        group_instance_id: Some("ledger-child".into()),
        ..consumer_config(&bootstrap, &group)
    };
    let mut consumer = Consumer::connect(config).await?;
    consumer.subscribe([topic.clone()])?;
    let reached = |position: &dyn Fn(&(String, i32)) -> Option<i64>| {
        end.as_ref().is_some_and(|end| {
            end.iter().enumerate().all(|(p, e)| {
                let p = i32::try_from(p).unwrap_or(i32::MAX);
                position(&(topic.clone(), p)).is_some_and(|pos| pos >= *e)
            })
        })
    };
    if env("SEMEL_MODE")? == "plain" {
        let mut last_commit = Instant::now();
        loop {
            for record in consumer.poll(Duration::from_millis(100)).await? {
                let id = String::from_utf8_lossy(record.value.as_deref().unwrap_or_default())
                    .into_owned();
                append_line(&effects, &id)?;
            }
            if last_commit.elapsed() >= Duration::from_millis(100) {
                last_commit = Instant::now();
                consumer.commit().await?;
            }
            if reached(&|tp| consumer.position(tp)) {
                consumer.commit().await?;
                return Ok(());
            }
        }
    }
    let mut config = DedupConfig {
        claim_lease: Duration::from_millis(env("SEMEL_LEASE_MS")?.parse()?),
        ..DedupConfig::new(env("SEMEL_STORE")?)
    };
    // Each run its own bound on the marks held in memory: marks as batch records, as one key
    // each (the memory full), and records rewritten one key each at an open under a smaller
    // bound, all between kills.
    if let Ok(bound) = std::env::var("SEMEL_MEMORY_MARKS") {
        config.memory_marks = bound.parse()?;
    }
    let store = Arc::new(DedupStore::open(config)?);
    // "local": no changelog, so a resend after a restart is caught by the store's own marks
    // alone (with one, a replay would restore any the store lost).
    let middleware = if env("SEMEL_MODE")? == "local" {
        MiddlewareConfig {
            changelog: None,
            ..MiddlewareConfig::default()
        }
    } else {
        MiddlewareConfig::default()
    };
    let mut dedup = DedupConsumer::new(consumer, Arc::clone(&store), middleware)?;
    if env("SEMEL_MODE")? == "concurrent" {
        return concurrent_handlers(dedup, store, &reached).await;
    }
    loop {
        let fresh = match tokio::time::timeout(Duration::from_millis(200), dedup.next()).await {
            Ok(fresh) => fresh?,
            Err(_) => {
                if reached(&|tp| dedup.position(tp)) {
                    dedup.close().await?;
                    return Ok(());
                }
                continue;
            }
        };
        let id =
            String::from_utf8_lossy(fresh.record.value.as_deref().unwrap_or_default()).into_owned();
        // A side effect outside the store: at-least-once.
        append_line(&effects, &id)?;
        if crash_after_effect.as_deref() == Some(id.as_str()) && !fresh.reclaimed() {
            std::process::abort(); // after the effect, before the mark
        }
        let count = count_of(&store, &id)? + 1;
        dedup
            .done(fresh, |state| {
                state.put(&ledger_key(&id), &count.to_be_bytes())
            })
            .await?;
        if reached(&|tp| dedup.position(tp)) {
            dedup.close().await?;
            return Ok(());
        }
    }
}

/// Whether every partition's position reached the end offset it was given.
type Reached<'a> = dyn Fn(&dyn Fn(&(String, i32)) -> Option<i64>) -> bool + 'a;

/// Up to 8 handlers at once, each on its own task, each taking a pseudo-random 0-15 ms, so
/// they settle in any order; every 17th attempt fails (`failed`) and every 23rd handle is
/// dropped unsettled (a panicking handler). Each id's count goes through the batch.
async fn concurrent_handlers(
    mut dedup: DedupConsumer,
    store: Arc<DedupStore>,
    reached: &Reached<'_>,
) -> anyhow::Result<()> {
    let mut tasks: tokio::task::JoinSet<anyhow::Result<()>> = tokio::task::JoinSet::new();
    let mut attempts: u64 = 0;
    loop {
        while tasks.len() >= 8 {
            if let Some(done) = tasks.join_next().await {
                done??;
            }
        }
        while let Some(done) = tasks.try_join_next() {
            done??;
        }
        let fresh = match tokio::time::timeout(Duration::from_millis(100), dedup.next()).await {
            Ok(fresh) => fresh?,
            Err(_) => {
                if tasks.is_empty() && dedup.in_flight() == 0 && reached(&|tp| dedup.position(tp)) {
                    dedup.close().await?;
                    return Ok(());
                }
                continue;
            }
        };
        attempts += 1;
        let attempt = attempts;
        let store = Arc::clone(&store);
        tasks.spawn(async move {
            let pause = (attempt.wrapping_mul(2_654_435_761) >> 7) % 16;
            tokio::time::sleep(Duration::from_millis(pause)).await;
            if attempt.is_multiple_of(17) {
                fresh.failed().await?;
                return Ok(());
            }
            if attempt.is_multiple_of(23) {
                drop(fresh);
                return Ok(());
            }
            let id = String::from_utf8_lossy(fresh.record.value.as_deref().unwrap_or_default())
                .into_owned();
            let count = count_of(&store, &id)? + 1;
            fresh
                .done(|state| state.put(&ledger_key(&id), &count.to_be_bytes()))
                .await?;
            Ok(())
        });
    }
}

/// Sends ids `m<first>..m<first+count>` (header `semel-msg-id`, value = id, key = id);
/// returns the end offset per partition seen in the delivery reports.
async fn send_ids(
    producer: &Producer,
    topic: &str,
    ids: impl Iterator<Item = usize>,
    ends: &mut BTreeMap<i32, i64>,
) -> anyhow::Result<()> {
    let mut deliveries = Vec::new();
    for n in ids {
        let id = format!("m{n}");
        let record = ProducerRecord::new(topic, id.clone())
            .key(id.clone())
            .header("semel-msg-id", id);
        deliveries.push(producer.send(record).await?);
    }
    for delivery in deliveries {
        let report = delivery.await?;
        let end = ends.entry(report.partition).or_default();
        *end = (*end).max(report.offset + 1);
    }
    Ok(())
}

/// Runs the kill -9 loop in one mode; returns the per-id counts and how many kills.
async fn crash_run(mode: &str) -> anyhow::Result<(BTreeMap<String, u32>, usize, usize)> {
    const PARTITIONS: i32 = 3;
    const MESSAGES: usize = 1_200;
    let broker = TestBroker::start_with(|c| {
        c.group.initial_rebalance_delay = Duration::from_millis(100);
    })
    .await?;
    let bootstrap = broker.bootstrap();
    let mut admin = RawClient::connect(broker.addr()).await?;
    let topic = "ledger";
    create_topic(&mut admin, topic, PARTITIONS).await?;
    let work = tempfile::tempdir()?;
    let store = work.path().join("store");
    let effects = work.path().join("effects.txt");
    let vars = |end: Option<&BTreeMap<i32, i64>>| {
        let mut v = vec![
            ("SEMEL_BOOTSTRAP", bootstrap.clone()),
            ("SEMEL_TOPIC", topic.to_string()),
            ("SEMEL_GROUP", format!("ledger-{mode}")),
            ("SEMEL_STORE", store.display().to_string()),
            ("SEMEL_EFFECTS", effects.display().to_string()),
            ("SEMEL_MODE", mode.to_string()),
            ("SEMEL_LEASE_MS", "1000".to_string()),
        ];
        if let Some(end) = end {
            let ends: Vec<String> = (0..PARTITIONS)
                .map(|p| end.get(&p).copied().unwrap_or(0).to_string())
                .collect();
            v.push(("SEMEL_END", ends.join(",")));
        }
        v
    };

    // The producer keeps sending while the consumer is killed again and again; every 10th
    // message is sent a second time later (a producer-side duplicate across a restart).
    let producer = Producer::connect(ProducerConfig {
        bootstrap_servers: vec![bootstrap.clone()],
        ..ProducerConfig::default()
    })
    .await?;
    let sending = {
        let topic = topic.to_string();
        tokio::spawn(async move {
            let mut ends = BTreeMap::new();
            for chunk in 0..=MESSAGES / 40 {
                let first = chunk * 40;
                if first < MESSAGES {
                    send_ids(&producer, &topic, first..first + 40, &mut ends).await?;
                }
                // The previous chunk's, 150 ms after it: often across a kill, so the copy
                // meets a restarted consumer that knows the first only from its store.
                if let Some(previous) = first.checked_sub(40) {
                    let resend = (previous..first).filter(|n| n % 10 == 0);
                    send_ids(&producer, &topic, resend, &mut ends).await?;
                }
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            producer.close().await;
            anyhow::Ok(ends)
        })
    };
    let mut rng = Lcg(7);
    let mut kills = 0;
    // At least 10 kills: while the producer sends, and after it while the consumer catches up.
    while !sending.is_finished() || kills < 10 {
        let mut run_vars = vars(None);
        let bound = [0, 7, 60, 1 << 20][(rng.next_ms(0, 400) / 100) as usize % 4];
        run_vars.push(("SEMEL_MEMORY_MARKS", bound.to_string()));
        let mut child = ChildProcess::spawn("ledger_child", "SEMEL_LEDGER_CHILD", &run_vars)?;
        tokio::time::sleep(Duration::from_millis(rng.next_ms(300, 1_200))).await;
        child.kill9()?;
        kills += 1;
    }
    let ends = sending.await??;
    let mut last = ChildProcess::spawn("ledger_child", "SEMEL_LEDGER_CHILD", &vars(Some(&ends)))?;
    let status = last.wait_exit().await?;
    ensure!(status.success(), "the last consumer failed: {status}");

    let ids: Vec<String> = (0..MESSAGES).map(|n| format!("m{n}")).collect();
    let counts = if mode == "plain" {
        line_counts(&effects)?
    } else {
        let store = DedupStore::open(DedupConfig::new(&store))?;
        let mut counts = BTreeMap::new();
        for id in &ids {
            counts.insert(id.clone(), count_of(&store, id)?);
        }
        counts
    };
    for id in &ids {
        ensure!(
            counts.get(id).copied().unwrap_or(0) >= 1,
            "{mode}: {id} was never handled"
        );
    }
    Ok((counts, kills, ids.len()))
}

/// `crash_run(mode)`, which must count every id exactly once.
async fn every_id_once(mode: &str) -> anyhow::Result<()> {
    let (counts, kills, ids) = crash_run(mode).await?;
    let twice: Vec<(&String, &u32)> = counts.iter().filter(|(_, n)| **n != 1).collect();
    eprintln!(
        "{mode}: {ids} ids, {kills} kill -9s, counted other than once: {}",
        twice.len()
    );
    ensure!(kills >= 10, "only {kills} kills");
    ensure!(
        twice.is_empty(),
        "{mode}: counted other than once: {twice:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_kept_through_the_store_counts_every_message_once_across_kill_9()
-> anyhow::Result<()> {
    every_id_once("dedup").await?;
    // Without the changelog: the store's own marks (records, keys, rewritten records) only.
    every_id_once("local").await?;
    // Eight handlers at once, settling in any order, some failing or dropped, same kills.
    every_id_once("concurrent").await?;

    // The same load and kills without the store: double counts.
    let (counts, kills, ids) = crash_run("plain").await?;
    let twice = counts.values().filter(|n| **n > 1).count();
    eprintln!("plain: {ids} ids, {kills} kill -9s, {twice} ids counted more than once");
    ensure!(
        twice > 0,
        "the plain consumer counted nothing twice: the fault was not injected"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_side_effect_outside_the_batch_is_at_least_once_writes_through_it_exactly_once()
-> anyhow::Result<()> {
    let broker = TestBroker::start_with(|c| {
        c.group.initial_rebalance_delay = Duration::from_millis(100);
    })
    .await?;
    let bootstrap = broker.bootstrap();
    let mut admin = RawClient::connect(broker.addr()).await?;
    create_topic(&mut admin, "effects", 1).await?;
    let producer = Producer::connect(ProducerConfig {
        bootstrap_servers: vec![bootstrap.clone()],
        ..ProducerConfig::default()
    })
    .await?;
    let mut ends = BTreeMap::new();
    send_ids(&producer, "effects", 0..20, &mut ends).await?;
    producer.close().await;
    let work = tempfile::tempdir()?;
    let store = work.path().join("store");
    let effects = work.path().join("effects.txt");
    let vars = vec![
        ("SEMEL_BOOTSTRAP", bootstrap.clone()),
        ("SEMEL_TOPIC", "effects".to_string()),
        ("SEMEL_GROUP", "effects".to_string()),
        ("SEMEL_STORE", store.display().to_string()),
        ("SEMEL_EFFECTS", effects.display().to_string()),
        ("SEMEL_MODE", "dedup".to_string()),
        ("SEMEL_LEASE_MS", "1000".to_string()),
        ("SEMEL_END", ends[&0].to_string()),
        // Crash after m7's effect, before its mark (only on the first attempt).
        ("SEMEL_CRASH_AFTER_EFFECT", "m7".to_string()),
    ];
    let status = ChildProcess::spawn("ledger_child", "SEMEL_LEDGER_CHILD", &vars)?
        .wait_exit()
        .await?;
    ensure!(!status.success(), "the first run was meant to crash at m7");
    let started = Instant::now();
    let status = ChildProcess::spawn("ledger_child", "SEMEL_LEDGER_CHILD", &vars)?
        .wait_exit()
        .await?;
    ensure!(status.success(), "the second run failed: {status}");
    let effect_counts = line_counts(&effects)?;
    let store = DedupStore::open(DedupConfig::new(&store))?;
    for n in 0..20 {
        let id = format!("m{n}");
        let effect = effect_counts.get(&id).copied().unwrap_or(0);
        let ledger = count_of(&store, &id)?;
        ensure!(ledger == 1, "{id}: ledger {ledger}");
        ensure!(
            effect == if n == 7 { 2 } else { 1 },
            "{id}: the side effect happened {effect} times"
        );
    }
    eprintln!(
        "m7's effect happened twice (crash between effect and mark; reclaimed after the 1 s lease, run took {:?}), its ledger entry once",
        started.elapsed()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_sharing_a_store_hand_over_a_partition_without_handling_twice()
-> anyhow::Result<()> {
    const PARTITIONS: i32 = 4;
    const MESSAGES: usize = 800;
    let broker = TestBroker::start_with(|c| {
        c.group.initial_rebalance_delay = Duration::from_millis(100);
    })
    .await?;
    let bootstrap = broker.bootstrap();
    let mut admin = RawClient::connect(broker.addr()).await?;
    create_topic(&mut admin, "moves", PARTITIONS).await?;
    let work = tempfile::tempdir()?;
    // One store per host, shared by the members on it: a partition that moves between them
    // keeps its marks (a store is single-writer, so they share the handle, not the path).
    let store = Arc::new(DedupStore::open(DedupConfig {
        claim_lease: Duration::from_millis(500),
        ..DedupConfig::new(work.path().join("store"))
    })?);
    let producer = Producer::connect(ProducerConfig {
        bootstrap_servers: vec![bootstrap.clone()],
        ..ProducerConfig::default()
    })
    .await?;
    let handled: Arc<std::sync::Mutex<Vec<(String, i32, String)>>> = Arc::default();
    let member = |name: &str| {
        let (store, handled, bootstrap, name) = (
            Arc::clone(&store),
            Arc::clone(&handled),
            bootstrap.clone(),
            name.to_string(),
        );
        tokio::spawn(async move {
            let mut consumer = Consumer::connect(consumer_config(&bootstrap, "moves")).await?;
            consumer.subscribe(["moves"])?;
            let mut dedup =
                DedupConsumer::new(consumer, Arc::clone(&store), MiddlewareConfig::default())?;
            loop {
                let fresh = dedup.next().await?;
                let id = String::from_utf8_lossy(fresh.record.value.as_deref().unwrap_or_default())
                    .into_owned();
                let count = count_of(&store, &id)? + 1;
                let partition = fresh.record.partition;
                dedup
                    .done(fresh, |s| s.put(&ledger_key(&id), &count.to_be_bytes()))
                    .await?;
                handled
                    .lock()
                    .expect("handled")
                    .push((name.clone(), partition, id));
                // A handler that takes a moment, so the crash lands mid-stream.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            #[allow(unreachable_code)]
            anyhow::Ok(())
        })
    };
    let a = member("a");
    let b = member("b");
    let mut ends = BTreeMap::new();
    send_ids(&producer, "moves", 0..MESSAGES / 2, &mut ends).await?;
    // Wait until both members handle, then crash `a` (no commit, no LeaveGroup).
    let started = Instant::now();
    loop {
        let by: Vec<String> = handled
            .lock()
            .expect("handled")
            .iter()
            .map(|h| h.0.clone())
            .collect();
        if by.iter().any(|n| n == "a") && by.iter().any(|n| n == "b") && by.len() >= 100 {
            break;
        }
        ensure!(started.elapsed() < PATIENCE, "members never both handled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.abort();
    let a_partitions: std::collections::BTreeSet<i32> = handled
        .lock()
        .expect("handled")
        .iter()
        .filter(|h| h.0 == "a")
        .map(|h| h.1)
        .collect();
    send_ids(&producer, "moves", MESSAGES / 2..MESSAGES, &mut ends).await?;
    producer.close().await;
    loop {
        let done = (0..MESSAGES).all(|n| count_of(&store, &format!("m{n}")).unwrap_or(0) >= 1);
        if done {
            break;
        }
        ensure!(
            started.elapsed() < PATIENCE,
            "not every message handled; b: {:?}",
            b.is_finished()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.abort();
    for n in 0..MESSAGES {
        let id = format!("m{n}");
        ensure!(
            count_of(&store, &id)? == 1,
            "{id} handled {} times",
            count_of(&store, &id)?
        );
    }
    let handled = handled.lock().expect("handled").clone();
    let b_took: std::collections::BTreeSet<i32> = handled
        .iter()
        .filter(|h| h.0 == "b" && a_partitions.contains(&h.1))
        .map(|h| h.1)
        .collect();
    ensure!(
        b_took == a_partitions,
        "b took over a's partitions {a_partitions:?}, got {b_took:?}"
    );
    eprintln!(
        "a handled partitions {a_partitions:?} then crashed; b took them over; {} messages, each handled once; duplicates dropped by the store: {}",
        MESSAGES,
        store.counts().duplicates
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_without_a_key_are_rejected_or_passed_never_dropped() -> anyhow::Result<()> {
    let broker = TestBroker::start_with(|c| {
        c.group.initial_rebalance_delay = Duration::from_millis(100);
    })
    .await?;
    let bootstrap = broker.bootstrap();
    let mut admin = RawClient::connect(broker.addr()).await?;
    create_topic(&mut admin, "nokey", 1).await?;
    let producer = Producer::connect(ProducerConfig {
        bootstrap_servers: vec![bootstrap.clone()],
        ..ProducerConfig::default()
    })
    .await?;
    producer
        .send(ProducerRecord::new("nokey", "no header"))
        .await?
        .await?;
    producer
        .send(ProducerRecord::new("nokey", "with header").header("semel-msg-id", "x1"))
        .await?
        .await?;
    producer.close().await;
    let work = tempfile::tempdir()?;
    let store = Arc::new(DedupStore::open(DedupConfig::new(work.path().join("s")))?);

    let mut consumer = Consumer::connect(consumer_config(&bootstrap, "reject")).await?;
    consumer.subscribe(["nokey"])?;
    let mut dedup = DedupConsumer::new(consumer, Arc::clone(&store), MiddlewareConfig::default())?;
    let error = tokio::time::timeout(PATIENCE, dedup.next())
        .await?
        .expect_err("a record without semel-msg-id is rejected");
    ensure!(
        matches!(error, MiddlewareError::NoKey { offset: 0, .. }),
        "{error}"
    );
    ensure!(error.to_string().contains("MissingKey::Pass"), "{error}");
    let next = tokio::time::timeout(PATIENCE, dedup.next()).await??;
    ensure!(next.record.offset == 1 && next.key().is_some());
    dedup.done(next, |_| {}).await?;
    ensure!(dedup.metrics().rejected_without_key == 1);
    dedup.close().await?;

    let mut consumer = Consumer::connect(consumer_config(&bootstrap, "pass")).await?;
    consumer.subscribe(["nokey"])?;
    let mut dedup = DedupConsumer::new(
        consumer,
        Arc::clone(&store),
        MiddlewareConfig {
            missing_key: MissingKey::Pass,
            ..MiddlewareConfig::default()
        },
    )?;
    let first = tokio::time::timeout(PATIENCE, dedup.next()).await??;
    ensure!(
        first.record.offset == 0 && first.key().is_none(),
        "passed without a key"
    );
    dedup.done(first, |_| {}).await?;
    let second = tokio::time::timeout(PATIENCE, dedup.next()).await??;
    ensure!(second.record.offset == 1);
    // A handler failure releases the claim and brings the record back.
    dedup.failed(second).await?;
    let again = tokio::time::timeout(PATIENCE, dedup.next()).await??;
    ensure!(again.record.offset == 1, "the failed record comes again");
    dedup.done(again, |_| {}).await?;
    let metrics = dedup.metrics();
    ensure!(
        metrics.passed_without_key == 1 && metrics.handler_failures == 1,
        "{metrics:?}"
    );
    ensure!(store.offset("pass", "nokey", 0)? == Some(2));
    dedup.close().await?;
    Ok(())
}

/// A batch mixing records with and without a message id (`MissingKey::Pass`) in one
/// partition: every record is handed out once, and once all are settled, in any order, the
/// committable offset is past the last one (the keyed and the passed records are tracked
/// in the order they were read, whichever list they go through).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_mixing_keyed_and_unkeyed_records_hands_each_out_once() -> anyhow::Result<()> {
    const RECORDS: i64 = 40;
    let broker = TestBroker::start_with(|c| {
        c.group.initial_rebalance_delay = Duration::from_millis(100);
    })
    .await?;
    let bootstrap = broker.bootstrap();
    let mut admin = RawClient::connect(broker.addr()).await?;
    create_topic(&mut admin, "mixed", 1).await?;
    let producer = Producer::connect(ProducerConfig {
        bootstrap_servers: vec![bootstrap.clone()],
        ..ProducerConfig::default()
    })
    .await?;
    let mut acks = Vec::new();
    for n in 0..RECORDS {
        // Runs of keyed and unkeyed records of different lengths.
        let record = ProducerRecord::new("mixed", format!("v{n}"));
        let record = if n % 5 < 3 {
            record.header("semel-msg-id", format!("m{n}"))
        } else {
            record
        };
        acks.push(producer.send(record).await?);
    }
    for ack in acks {
        ack.await?;
    }
    producer.close().await;
    let work = tempfile::tempdir()?;
    let store = Arc::new(DedupStore::open(DedupConfig::new(work.path().join("s")))?);
    let mut consumer = Consumer::connect(consumer_config(&bootstrap, "mixed")).await?;
    consumer.subscribe(["mixed"])?;
    let mut dedup = DedupConsumer::new(
        consumer,
        Arc::clone(&store),
        MiddlewareConfig {
            missing_key: MissingKey::Pass,
            changelog: None,
            ..MiddlewareConfig::default()
        },
    )?;
    let mut handles = Vec::new();
    while handles.len() < RECORDS as usize {
        handles.extend(tokio::time::timeout(PATIENCE, dedup.next_batch(64)).await??);
    }
    let mut offsets: Vec<i64> = handles.iter().map(|f| f.record.offset).collect();
    offsets.sort_unstable();
    ensure!(
        offsets == (0..RECORDS).collect::<Vec<_>>(),
        "handed out {offsets:?}"
    );
    for fresh in &handles {
        let keyed = fresh.record.offset % 5 < 3;
        ensure!(
            fresh.key().is_some() == keyed,
            "offset {}: key {:?}",
            fresh.record.offset,
            fresh.key()
        );
    }
    // Settled last first: nothing is committable until offset 0 is.
    handles.sort_by_key(|f| std::cmp::Reverse(f.record.offset));
    for fresh in handles {
        dedup.done(fresh, |_| {}).await?;
    }
    ensure!(
        store.offset("mixed", "mixed", 0)? == Some(RECORDS),
        "store offset {:?}",
        store.offset("mixed", "mixed", 0)?
    );
    ensure!(dedup.metrics().passed_without_key == 16);
    dedup.close().await?;
    Ok(())
}

/// Defect (issue 24): a `KeySource::Custom` function that panicked on a record unwound out of
/// `next()` after the record had been taken from the consumer and before the middleware
/// tracked it, so a caller that went on (a supervisor restarting the task) never saw that
/// record again, and the next settle committed past it: a message skipped without a word. It
/// must be reported like a record without a key (`MissingKey::Reject`), with its coordinates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_function_that_panics_is_reported_not_skipped() -> anyhow::Result<()> {
    use semel::consumer::dedup::KeySource;

    let broker = TestBroker::start_with(|c| {
        c.group.initial_rebalance_delay = Duration::from_millis(100);
    })
    .await?;
    let bootstrap = broker.bootstrap();
    let mut admin = RawClient::connect(broker.addr()).await?;
    create_topic(&mut admin, "keyfn", 1).await?;
    let producer = Producer::connect(ProducerConfig {
        bootstrap_servers: vec![bootstrap.clone()],
        ..ProducerConfig::default()
    })
    .await?;
    for value in ["a", "boom", "c", "d"] {
        producer
            .send(ProducerRecord::new("keyfn", value).key(value))
            .await?
            .await?;
    }
    producer.close().await;
    let work = tempfile::tempdir()?;
    let store = Arc::new(DedupStore::open(DedupConfig::new(work.path().join("s")))?);
    let config = MiddlewareConfig {
        key_source: KeySource::Custom(Arc::new(|record| {
            let value = record.value.clone().unwrap_or_default();
            assert!(
                &value[..] != b"boom",
                "the key function fails on this record"
            );
            Some(value)
        })),
        changelog: None,
        ..MiddlewareConfig::default()
    };
    for (group, batches) in [("keyfn-next", false), ("keyfn-batch", true)] {
        let mut consumer = Consumer::connect(consumer_config(&bootstrap, group)).await?;
        consumer.subscribe(["keyfn"])?;
        let mut dedup = DedupConsumer::new(consumer, Arc::clone(&store), config.clone())?;
        let mut seen = Vec::new();
        let mut errors = Vec::new();
        while seen.len() + errors.len() < 4 {
            let call = async {
                if batches {
                    dedup.next_batch(10).await
                } else {
                    dedup.next().await.map(|f| vec![f])
                }
            };
            // A panic here is the defect itself: the record is gone with it.
            match tokio::time::timeout(PATIENCE, call).await? {
                Ok(handles) => {
                    for fresh in handles {
                        seen.push(fresh.record.offset);
                        fresh.done(|_| {}).await?;
                    }
                }
                Err(error) => errors.push(error),
            }
        }
        ensure!(seen == [0, 2, 3], "{group}: handed out {seen:?}");
        ensure!(
            matches!(
                errors.as_slice(),
                [MiddlewareError::KeyFunction { offset: 1, .. }]
            ),
            "{group}: errors {errors:?}"
        );
        let message = errors[0].to_string();
        ensure!(
            message.contains("keyfn-0@1") && message.contains("fails on this record"),
            "{message}"
        );
        dedup.close().await?;
    }
    Ok(())
}
