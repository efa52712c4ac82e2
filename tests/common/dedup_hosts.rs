//! The two-host dedup changelog scenario, shared by `tests/dedup_changelog.rs` (on
//! semel-broker) and `tests/kafka_cluster.rs` (on Apache Kafka): two consumer processes of
//! one group, each with its own store directory; host A handles part of the input, its marks
//! reach the changelog, and it is `kill -9`ed before any offset commit; host B takes the
//! partitions over and reads everything again. Each test binary that uses it defines a
//! `host_child` test that calls [`child_main`] (the child processes run that test).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::ensure;
use semel::consumer::dedup::{
    ChangelogConfig, DedupConfig, DedupConsumer, DedupStore, MiddlewareConfig,
};
use semel::consumer::{AutoOffsetReset, Consumer, ConsumerConfig, Strategy};
use semel::producer::{Producer, ProducerConfig, ProducerRecord};

use super::child::{ChildProcess, append_line, env, env_list, lines};

pub const PARTITIONS: i32 = 3;
pub const MESSAGES: usize = 600;
/// How many fresh messages host A handles before it flushes the changelog and waits to die.
pub const A_HANDLES: usize = 300;

pub fn consumer_config(bootstrap: &str, group: &str) -> ConsumerConfig {
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

/// One host. `SEMEL_STOP_AFTER=n`: handle n fresh messages, flush the changelog, write
/// `flushed` to `SEMEL_STATUS`, then idle until killed (no offset is ever committed:
/// `commit_interval` is an hour). `SEMEL_END`: drain to those end offsets, write the
/// metrics to `SEMEL_STATUS`, exit. Every handled id is appended to `SEMEL_HANDLED` after
/// its mark.
pub async fn child_main() -> anyhow::Result<()> {
    let topic = env("SEMEL_TOPIC")?;
    let handled = PathBuf::from(env("SEMEL_HANDLED")?);
    let status = PathBuf::from(env("SEMEL_STATUS")?);
    let stop_after: Option<usize> = std::env::var("SEMEL_STOP_AFTER")
        .ok()
        .map(|s| s.parse())
        .transpose()?;
    let end = env_list("SEMEL_END")?;
    let mut consumer = Consumer::connect(consumer_config(
        &env("SEMEL_BOOTSTRAP")?,
        &env("SEMEL_GROUP")?,
    ))
    .await?;
    // "on", "off", or "assign": on, with the partitions assigned by hand (no group
    // rebalance, so no assignment callback).
    let mode = env("SEMEL_CHANGELOG")?;
    if mode == "assign" {
        consumer.assign((0..PARTITIONS).map(|p| (topic.clone(), p)))?;
    } else {
        consumer.subscribe([topic.clone()])?;
    }
    let store = Arc::new(DedupStore::open(DedupConfig::new(env("SEMEL_STORE")?))?);
    let changelog = (mode != "off").then(ChangelogConfig::default);
    let mut dedup = DedupConsumer::new(
        consumer,
        store,
        MiddlewareConfig {
            commit_interval: Duration::from_secs(3600),
            changelog,
            ..MiddlewareConfig::default()
        },
    )?;
    let reached = |dedup: &DedupConsumer| {
        end.as_ref().is_some_and(|end| {
            end.iter().enumerate().all(|(p, e)| {
                let p = i32::try_from(p).unwrap_or(i32::MAX);
                dedup
                    .position(&(topic.clone(), p))
                    .is_some_and(|pos| pos >= *e)
            })
        })
    };
    let mut count = 0;
    loop {
        if reached(&dedup) {
            let m = dedup.metrics();
            append_line(
                &status,
                &format!(
                    "fresh={} duplicates={} restored={} read={} skipped={}",
                    m.fresh,
                    m.duplicates,
                    m.changelog.marks_restored,
                    m.changelog.records_read,
                    m.changelog.records_skipped
                ),
            )?;
            dedup.close().await?;
            return Ok(());
        }
        let fresh = match tokio::time::timeout(Duration::from_millis(200), dedup.next()).await {
            Ok(fresh) => fresh?,
            Err(_) => continue,
        };
        let id =
            String::from_utf8_lossy(fresh.record.value.as_deref().unwrap_or_default()).into_owned();
        dedup.done(fresh, |_| {}).await?;
        append_line(&handled, &id)?;
        count += 1;
        if stop_after == Some(count) {
            dedup.flush_changelog().await?;
            append_line(&status, "flushed")?;
            loop {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        }
    }
}

pub struct Outcome {
    /// Per id: how many times it was handled, over both hosts.
    pub handled: BTreeMap<String, u32>,
    pub a_handled: usize,
    pub b_status: String,
}

/// Runs the scenario on the cluster at `bootstrap`, where `topic` exists with
/// [`PARTITIONS`] partitions; `changelog` is "on", "off", or "assign" (on, with every
/// partition assigned by hand to each host instead of a group subscription).
pub async fn two_hosts(
    bootstrap: &str,
    topic: &str,
    group: &str,
    changelog: &str,
) -> anyhow::Result<Outcome> {
    let bootstrap = bootstrap.to_string();
    let group = group.to_string();
    // Every id once, and every 10th a second time (a producer-side resend).
    let producer = Producer::connect(ProducerConfig {
        bootstrap_servers: vec![bootstrap.clone()],
        ..ProducerConfig::default()
    })
    .await?;
    let mut deliveries = Vec::new();
    for n in (0..MESSAGES).chain((0..MESSAGES).filter(|n| n % 10 == 0)) {
        let id = format!("m{n}");
        let record = ProducerRecord::new(topic, id.clone())
            .key(id.clone())
            .header("semel-msg-id", id);
        deliveries.push(producer.send(record).await?);
    }
    let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
    for delivery in deliveries {
        let report = delivery.await?;
        let end = ends.entry(report.partition).or_default();
        *end = (*end).max(report.offset + 1);
    }
    producer.close().await;

    let work = tempfile::tempdir()?;
    let host_vars = |name: &str| {
        vec![
            ("SEMEL_BOOTSTRAP", bootstrap.clone()),
            ("SEMEL_TOPIC", topic.to_string()),
            ("SEMEL_GROUP", group.clone()),
            ("SEMEL_CHANGELOG", changelog.to_string()),
            // Each host its own store directory.
            (
                "SEMEL_STORE",
                work.path()
                    .join(format!("store-{name}"))
                    .display()
                    .to_string(),
            ),
            (
                "SEMEL_HANDLED",
                work.path()
                    .join(format!("handled-{name}"))
                    .display()
                    .to_string(),
            ),
            (
                "SEMEL_STATUS",
                work.path()
                    .join(format!("status-{name}"))
                    .display()
                    .to_string(),
            ),
        ]
    };

    let mut a_vars = host_vars("a");
    a_vars.push(("SEMEL_STOP_AFTER", A_HANDLES.to_string()));
    let mut a = ChildProcess::spawn("host_child", "SEMEL_HOST_CHILD", &a_vars)?;
    let status = a.wait_for_lines(&work.path().join("status-a")).await?;
    ensure!(status == ["flushed"], "host a: {status:?}");
    a.kill9()?;
    let a_handled = lines(&work.path().join("handled-a"))?.len();
    ensure!(a_handled == A_HANDLES, "host a handled {a_handled}");

    // The window this feature exists for: A's marks are in the changelog, no offset was
    // committed.
    let probe = Consumer::connect(consumer_config(&bootstrap, &group)).await?;
    let tps = (0..PARTITIONS).map(|p| (topic.to_string(), p)).collect();
    let committed = probe.committed(&tps).await?;
    ensure!(
        committed.is_empty(),
        "host a committed offsets: {committed:?}"
    );
    probe.close().await?;
    if changelog != "off" {
        // Bad input: a record in the changelog that is not a semel mark (someone else wrote
        // to the topic). The replay skips it, counted, and goes on.
        let producer = Producer::connect(ProducerConfig {
            bootstrap_servers: vec![bootstrap.clone()],
            ..ProducerConfig::default()
        })
        .await?;
        producer
            .send(
                ProducerRecord::new(format!("{group}-semel-dedup-changelog"), "not a mark")
                    .key("junk")
                    .partition(0),
            )
            .await?
            .await?;
        producer.close().await;
    }

    let mut b_vars = host_vars("b");
    let end_list: Vec<String> = (0..PARTITIONS)
        .map(|p| ends.get(&p).copied().unwrap_or(0).to_string())
        .collect();
    b_vars.push(("SEMEL_END", end_list.join(",")));
    let mut b = ChildProcess::spawn("host_child", "SEMEL_HOST_CHILD", &b_vars)?;
    let exit = b.wait_exit().await?;
    ensure!(exit.success(), "host b failed: {exit}");
    let b_status = lines(&work.path().join("status-b"))?.join(" ");

    let mut handled: BTreeMap<String, u32> = BTreeMap::new();
    for name in ["a", "b"] {
        for id in lines(&work.path().join(format!("handled-{name}")))? {
            *handled.entry(id).or_default() += 1;
        }
    }
    Ok(Outcome {
        handled,
        a_handled,
        b_status,
    })
}
