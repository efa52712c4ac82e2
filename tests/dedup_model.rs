//! A model-based test of the dedup middleware against a real broker: random sequences of
//! `next`, `done`, `failed`, a dropped handle (a panicking handler) and a crash (everything
//! dropped, no commit, a new member on the same store), in any order and with several handles
//! in flight. The model is one line: whatever happened, once the partition is read to its end
//! every message id has been counted exactly once through the store's batch (20 ids, two of
//! them sent twice). proptest shrinks a failing sequence to a short one.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use common::TestBroker;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use semel::consumer::dedup::{DedupConfig, DedupConsumer, DedupStore, Fresh, MiddlewareConfig};
use semel::consumer::{AutoOffsetReset, Consumer, ConsumerConfig, Strategy as Assignor};
use semel::producer::{Producer, ProducerConfig, ProducerRecord};

#[derive(Debug, Clone)]
enum Op {
    /// Take the next record (if one comes within a moment).
    Next,
    /// Settle one of the handles in flight.
    Done(prop::sample::Index),
    /// Its handler failed.
    Failed(prop::sample::Index),
    /// Its handler panicked: the handle is dropped.
    Drop(prop::sample::Index),
    /// The process dies: no commit, no LeaveGroup; a new member takes over the store.
    Crash,
    /// Take up to this many records at once (`next_batch`).
    NextBatch(usize),
    /// Settle several handles in flight with one write (`done_all`), from this one on.
    DoneMany(prop::sample::Index, usize),
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    prop_oneof![
        6 => Just(Op::Next),
        4 => any::<prop::sample::Index>().prop_map(Op::Done),
        1 => any::<prop::sample::Index>().prop_map(Op::Failed),
        1 => any::<prop::sample::Index>().prop_map(Op::Drop),
        1 => Just(Op::Crash),
        // Up to 11: claims of 8 or more are made where `next_batch` is called (see
        // `CLAIM_HERE_MIN`), smaller ones on the store thread.
        3 => (1usize..12).prop_map(Op::NextBatch),
        3 => (any::<prop::sample::Index>(), 1usize..6).prop_map(|(i, n)| Op::DoneMany(i, n)),
    ]
}

const IDS: usize = 20;
const PATIENCE: Duration = Duration::from_secs(60);

static CASE: AtomicUsize = AtomicUsize::new(0);

fn config(bootstrap: &str, group: &str) -> ConsumerConfig {
    ConsumerConfig {
        bootstrap_servers: vec![bootstrap.to_string()],
        group_id: Some(group.to_string()),
        // A static member: after a crash the next member takes its place at once.
        group_instance_id: Some(format!("{group}-member")),
        auto_offset_reset: AutoOffsetReset::Earliest,
        fetch_max_wait: Duration::from_millis(20),
        partition_assignment_strategy: vec![Assignor::Range],
        ..ConsumerConfig::default()
    }
}

async fn member(
    bootstrap: &str,
    group: &str,
    topic: &str,
    store: &Arc<DedupStore>,
) -> anyhow::Result<DedupConsumer> {
    let mut consumer = Consumer::connect(config(bootstrap, group)).await?;
    consumer.subscribe([topic])?;
    Ok(DedupConsumer::new(
        consumer,
        Arc::clone(store),
        MiddlewareConfig {
            commit_interval: Duration::from_millis(1),
            changelog: None,
            ..MiddlewareConfig::default()
        },
    )?)
}

fn id_of(fresh: &Fresh) -> String {
    String::from_utf8_lossy(fresh.record.value.as_deref().unwrap_or_default()).into_owned()
}

fn count(store: &DedupStore, id: &str) -> anyhow::Result<u32> {
    Ok(match store.state(id.as_bytes())? {
        Some(bytes) => u32::from_be_bytes(bytes.as_slice().try_into()?),
        None => 0,
    })
}

async fn done(store: &DedupStore, fresh: Fresh) -> anyhow::Result<()> {
    let id = id_of(&fresh);
    let next = count(store, &id)? + 1;
    fresh
        .done(|state| state.put(id.as_bytes(), &next.to_be_bytes()))
        .await?;
    Ok(())
}

/// Settles `handles` with one write: each id's count goes up by one, in the same batch.
async fn done_many(store: &DedupStore, handles: Vec<Fresh>) -> anyhow::Result<()> {
    let mut counts = Vec::new();
    for fresh in &handles {
        let id = id_of(fresh);
        let next = count(store, &id)? + 1;
        counts.push((id, next));
    }
    Fresh::done_all(handles, |state| {
        for (id, next) in &counts {
            state.put(id.as_bytes(), &next.to_be_bytes());
        }
    })
    .await?;
    Ok(())
}

async fn run(ops: Vec<Op>) -> anyhow::Result<()> {
    let broker = TestBroker::start_with(|c| {
        c.group.initial_rebalance_delay = Duration::from_millis(0);
    })
    .await?;
    let bootstrap = broker.bootstrap();
    let case = CASE.fetch_add(1, Ordering::SeqCst);
    let topic = format!("model-{case}");
    let group = format!("model-{case}-group");
    let producer = Producer::connect(ProducerConfig {
        bootstrap_servers: vec![bootstrap.clone()],
        ..ProducerConfig::default()
    })
    .await?;
    let order = (0..IDS).chain([3, 7]);
    let mut end = 0;
    for n in order {
        let record = ProducerRecord::new(&topic, format!("m{n}"))
            .partition(0)
            .header("semel-msg-id", format!("m{n}"));
        end = producer.send(record).await?.await?.offset + 1;
    }
    producer.close().await;

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    let mut store = Arc::new(DedupStore::open(DedupConfig::new(&path))?);
    let mut dedup = member(&bootstrap, &group, &topic, &store).await?;
    let mut handles: Vec<Fresh> = Vec::new();
    for op in ops {
        match op {
            Op::Next => {
                if let Ok(fresh) =
                    tokio::time::timeout(Duration::from_millis(300), dedup.next()).await
                {
                    handles.push(fresh?);
                }
            }
            Op::Done(i) if !handles.is_empty() => {
                done(&store, handles.swap_remove(i.index(handles.len()))).await?;
            }
            Op::Failed(i) if !handles.is_empty() => {
                handles.swap_remove(i.index(handles.len())).failed().await?;
            }
            Op::Drop(i) if !handles.is_empty() => {
                drop(handles.swap_remove(i.index(handles.len())));
            }
            Op::Crash => {
                drop(dedup);
                handles.clear();
                drop(store);
                store = Arc::new(DedupStore::open(DedupConfig::new(&path))?);
                dedup = member(&bootstrap, &group, &topic, &store).await?;
            }
            Op::NextBatch(max) => {
                if let Ok(batch) =
                    tokio::time::timeout(Duration::from_millis(300), dedup.next_batch(max)).await
                {
                    handles.extend(batch?);
                }
            }
            Op::DoneMany(i, n) if !handles.is_empty() => {
                let from = i.index(handles.len());
                let to = (from + n).min(handles.len());
                done_many(&store, handles.drain(from..to).collect()).await?;
            }
            Op::Done(_) | Op::Failed(_) | Op::Drop(_) | Op::DoneMany(..) => {}
        }
    }
    // Settle what is in flight, then read to the end.
    for fresh in handles.drain(..) {
        done(&store, fresh).await?;
    }
    let started = Instant::now();
    while dedup.position(&(topic.clone(), 0)).is_none_or(|p| p < end) || dedup.in_flight() > 0 {
        ensure!(
            started.elapsed() < PATIENCE,
            "never read to {end}: position {:?}",
            dedup.position(&(topic.clone(), 0))
        );
        if let Ok(fresh) = tokio::time::timeout(Duration::from_millis(200), dedup.next()).await {
            done(&store, fresh?).await?;
        }
    }
    dedup.close().await?;
    for n in 0..IDS {
        let id = format!("m{n}");
        let times = count(&store, &id).with_context(|| id.clone())?;
        ensure!(times == 1, "{id} counted {times} times");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 8,
        // Each case runs a broker and a consumer group: a few seconds, not milliseconds.
        max_shrink_iters: 32,
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_id_counts_once_whatever_the_handlers_do(ops in prop::collection::vec(op(), 1..40)) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        runtime
            .block_on(run(ops))
            .map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
    }
}
