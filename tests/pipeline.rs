//! `semel::pipeline` under crashes: the pipeline runs in a child process that is `kill -9`ed
//! again and again while it turns orders into receipts; in the end every order has exactly
//! one committed receipt (read `read_committed`), and the group's offsets are at the end of
//! the input.
//!
//! - Same `transactional.id` on every restart: the new instance aborts what the killed one
//!   left open as it starts.
//! - A new `transactional.id` on every restart: nothing aborts the killed instance's
//!   transaction but its timeout; until then the group's offsets for its partitions are
//!   unstable (`UNSTABLE_OFFSET_COMMIT`), so the new instance starts from the right place.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, ensure};
use common::TestBroker;
use common::child::{ChildProcess, Lcg, env, run_if_child};
use semel::consumer::{AutoOffsetReset, Consumer, ConsumerConfig, IsolationLevel};
use semel::pipeline::{Pipeline, PipelineConfig, PipelineError};
use semel::producer::{Producer, ProducerConfig, ProducerRecord};

const ORDERS: usize = 2_000;
const PARTITIONS: i32 = 2;
const MARKER: &str = "SEMEL_PIPELINE_CHILD";

fn consumer_config(bootstrap: &str, group: Option<&str>) -> ConsumerConfig {
    ConsumerConfig {
        bootstrap_servers: vec![bootstrap.to_string()],
        group_id: group.map(str::to_string),
        auto_offset_reset: AutoOffsetReset::Earliest,
        isolation_level: IsolationLevel::ReadCommitted,
        fetch_max_wait: Duration::from_millis(100),
        session_timeout: Duration::from_secs(6),
        heartbeat_interval: Duration::from_millis(300),
        ..ConsumerConfig::default()
    }
}

/// The pipeline process: orders → receipts, 20 orders per transaction, forever.
async fn child_main() -> anyhow::Result<()> {
    let bootstrap = env("SEMEL_PIPELINE_BOOTSTRAP")?;
    let transactional_id = env("SEMEL_PIPELINE_TXN_ID")?;
    let mut consumer = consumer_config(&bootstrap, Some("pipeline"));
    // A static member: the restarted process takes the killed one's place at once.
    consumer.group_instance_id = Some("pipeline-member".into());
    let producer = ProducerConfig {
        bootstrap_servers: vec![bootstrap.clone()],
        transactional_id: Some(transactional_id),
        transaction_timeout: Duration::from_secs(3),
        ..ProducerConfig::default()
    };
    let mut config = PipelineConfig::new(consumer, producer, ["orders"]);
    config.max_records_per_transaction = 20;
    config.poll_timeout = Duration::from_millis(200);
    let mut pipeline = Pipeline::start(config).await?;
    loop {
        let step = pipeline
            .run_once(|order| {
                // Slow enough that kills land inside transactions.
                std::thread::sleep(Duration::from_millis(5));
                let value = String::from_utf8_lossy(order.value.as_deref().unwrap_or_default());
                vec![
                    ProducerRecord::new("receipts", format!("receipt-for-{value}"))
                        .partition(order.partition),
                ]
            })
            .await;
        match step {
            Ok(_) | Err(PipelineError::Aborted(_)) => {}
            Err(error) => return Err(error.into()),
        }
    }
}

#[test]
fn pipeline_child() -> anyhow::Result<()> {
    run_if_child(MARKER, child_main)
}

async fn create_topics(broker: &TestBroker) -> anyhow::Result<()> {
    let mut client = common::RawClient::connect(broker.addr()).await?;
    common::create_topic(&mut client, "orders", PARTITIONS).await?;
    common::create_topic(&mut client, "receipts", PARTITIONS).await?;
    Ok(())
}

/// Every receipt (only committed ones when `committed`), by value, with its count.
async fn receipts(
    bootstrap: &str,
    expected: usize,
    committed: bool,
) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut config = consumer_config(bootstrap, None);
    if !committed {
        config.isolation_level = IsolationLevel::ReadUncommitted;
    }
    let mut consumer = Consumer::connect(config).await?;
    consumer.assign((0..PARTITIONS).map(|p| ("receipts".to_string(), p)))?;
    let mut counts = BTreeMap::new();
    let mut total = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        for record in consumer.poll(Duration::from_millis(200)).await? {
            let value = String::from_utf8_lossy(record.value.as_deref().unwrap_or_default());
            *counts.entry(value.into_owned()).or_insert(0) += 1;
            total += 1;
        }
        if total > expected {
            break;
        }
    }
    consumer.close().await?;
    Ok(counts)
}

async fn crash_and_check(new_id_each_time: bool, kills: usize) -> anyhow::Result<()> {
    let broker = TestBroker::start().await?;
    let bootstrap = broker.bootstrap();
    create_topics(&broker).await?;
    let feeder = Producer::connect(ProducerConfig {
        bootstrap_servers: vec![bootstrap.clone()],
        ..ProducerConfig::default()
    })
    .await?;
    for i in 0..ORDERS {
        feeder
            .send(
                ProducerRecord::new("orders", format!("order-{i}"))
                    .partition(i as i32 % PARTITIONS),
            )
            .await?;
    }
    feeder.flush().await;
    feeder.close().await;
    let mut delays = Lcg(7);
    let spawn = |round: usize| {
        let id = if new_id_each_time {
            format!("pipeline-{round}")
        } else {
            "pipeline".to_string()
        };
        ChildProcess::spawn(
            "pipeline_child",
            MARKER,
            &[
                ("SEMEL_PIPELINE_BOOTSTRAP", bootstrap.clone()),
                ("SEMEL_PIPELINE_TXN_ID", id),
            ],
        )
    };
    for round in 0..kills {
        let mut child = spawn(round)?;
        tokio::time::sleep(Duration::from_millis(delays.next_ms(700, 1_500))).await;
        child.kill9()?;
    }
    let before_last = receipts(&bootstrap, ORDERS, true)
        .await?
        .values()
        .sum::<usize>();
    ensure!(
        before_last < ORDERS,
        "the killed instances handled every order before the last one started: the kills \
         interrupted nothing (slow the transform down)"
    );
    let mut last = spawn(kills)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut counts = BTreeMap::new();
    while tokio::time::Instant::now() < deadline {
        counts = receipts(&bootstrap, ORDERS, true).await?;
        if counts.values().sum::<usize>() >= ORDERS {
            break;
        }
        if let Some(status) = last.0.try_wait()? {
            anyhow::bail!("the last pipeline process exited: {status}");
        }
    }
    last.kill9()?;
    // Receipts of transactions cut by a kill are in the log, aborted.
    let written = receipts(&bootstrap, ORDERS, false)
        .await?
        .values()
        .sum::<usize>();
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    let missing: Vec<String> = (0..ORDERS)
        .map(|i| format!("receipt-for-order-{i}"))
        .filter(|r| !counts.contains_key(r))
        .collect();
    eprintln!(
        "pipeline ({} transactional id per restart, {kills} kills): {} receipts committed ({before_last} before the last instance started), {written} written including aborted ones; {} twice, {} missing",
        if new_id_each_time {
            "a new"
        } else {
            "the same"
        },
        counts.values().sum::<usize>(),
        twice.len(),
        missing.len()
    );
    ensure!(twice.is_empty(), "receipts committed twice: {twice:?}");
    ensure!(missing.is_empty(), "orders without a receipt: {missing:?}");
    ensure!(counts.len() == ORDERS, "{} receipts", counts.len());
    // The group resumes after every order.
    let consumer = Consumer::connect(consumer_config(&bootstrap, Some("pipeline"))).await?;
    let partitions = (0..PARTITIONS).map(|p| ("orders".to_string(), p)).collect();
    let committed = consumer.committed(&partitions).await?;
    let ends = (0..PARTITIONS)
        .map(|p| {
            committed
                .get(&("orders".to_string(), p))
                .copied()
                .context("no committed offset")
        })
        .collect::<anyhow::Result<Vec<i64>>>()?;
    ensure!(
        ends.iter()
            .all(|&e| e == (ORDERS as i64) / i64::from(PARTITIONS)),
        "committed offsets {ends:?}, expected the input's end on each partition"
    );
    consumer.close().await?;
    broker.handle.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_order_gets_one_receipt_through_kill_9s_with_the_same_transactional_id()
-> anyhow::Result<()> {
    crash_and_check(false, 6).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_order_gets_one_receipt_through_kill_9s_with_a_new_transactional_id_each_time()
-> anyhow::Result<()> {
    crash_and_check(true, 3).await
}
