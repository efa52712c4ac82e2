//! semel-producer's transactions read back by semel-consumer (`read_committed` and
//! `read_uncommitted`), on any broker: `tests/transactions.rs` runs it on semel-broker and
//! `tests/kafka_cluster.rs` on a 3-broker Apache Kafka cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, ensure};
use semel::consumer::{AutoOffsetReset, Consumer, ConsumerConfig, IsolationLevel};
use semel::producer::{ProduceError, Producer, ProducerConfig, ProducerRecord};

use super::RawClient;

const PATIENCE: Duration = Duration::from_secs(60);

/// CreateTopics with the broker's default replication factor (1 on semel-broker, 3 on the
/// test cluster).
async fn create(bootstrap: &str, name: &str, partitions: i32) -> anyhow::Result<()> {
    use kafka_protocol::messages::CreateTopicsRequest;
    use kafka_protocol::messages::create_topics_request::CreatableTopic;
    let first = bootstrap
        .split(',')
        .next()
        .context("no bootstrap address")?;
    let mut client = RawClient::connect(first.parse()?).await?;
    let request = CreateTopicsRequest::default()
        .with_timeout_ms(30_000)
        .with_topics(vec![
            CreatableTopic::default()
                .with_name(super::topic_name(name))
                .with_num_partitions(partitions)
                .with_replication_factor(-1),
        ]);
    let response = client.send(5, &request).await?;
    ensure!(
        response.topics[0].error_code == 0,
        "create {name}: {:?}",
        response.topics[0]
    );
    Ok(())
}

fn producer_config(bootstrap: &str, transactional_id: Option<&str>) -> ProducerConfig {
    ProducerConfig {
        bootstrap_servers: vec![bootstrap.to_string()],
        transactional_id: transactional_id.map(str::to_string),
        delivery_timeout: Duration::from_secs(60),
        ..ProducerConfig::default()
    }
}

fn consumer_config(bootstrap: &str, group: Option<&str>, committed: bool) -> ConsumerConfig {
    ConsumerConfig {
        bootstrap_servers: vec![bootstrap.to_string()],
        group_id: group.map(str::to_string),
        auto_offset_reset: AutoOffsetReset::Earliest,
        isolation_level: if committed {
            IsolationLevel::ReadCommitted
        } else {
            IsolationLevel::ReadUncommitted
        },
        fetch_max_wait: Duration::from_millis(100),
        ..ConsumerConfig::default()
    }
}

/// Every record of `topic`'s `partitions` from the start, until `expected` are read (then one
/// more second, so extra records show) or the patience runs out: (partition, value) in order.
async fn read(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    committed: bool,
    expected: usize,
) -> anyhow::Result<Vec<(i32, String)>> {
    let mut consumer = Consumer::connect(consumer_config(bootstrap, None, committed)).await?;
    consumer.assign((0..partitions).map(|p| (topic.to_string(), p)))?;
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut linger: Option<tokio::time::Instant> = None;
    loop {
        let now = tokio::time::Instant::now();
        if now >= deadline || linger.is_some_and(|l| now >= l) {
            break;
        }
        for record in consumer.poll(Duration::from_millis(200)).await? {
            let value = String::from_utf8_lossy(record.value.as_deref().unwrap_or_default());
            out.push((record.partition, value.into_owned()));
        }
        if out.len() >= expected && linger.is_none() {
            linger = Some(tokio::time::Instant::now() + Duration::from_secs(1));
        }
    }
    consumer.close().await?;
    Ok(out)
}

async fn send_all(
    producer: &Producer,
    topic: &str,
    label: &str,
    count: i32,
    partitions: i32,
) -> anyhow::Result<()> {
    for i in 0..count {
        producer
            .send(ProducerRecord::new(topic, format!("{label}-{i}")).partition(i % partitions))
            .await?;
    }
    Ok(())
}

/// Commit, abort and commit; offsets sent with a transaction; a zombie fenced. Returns a
/// summary line.
pub async fn semel_producer_transactions(bootstrap: &str, prefix: &str) -> anyhow::Result<String> {
    let data = format!("{prefix}-data");
    create(bootstrap, &data, 3).await?;
    let producer =
        Producer::connect(producer_config(bootstrap, Some(&format!("{prefix}-tx")))).await?;
    for (label, commit) in [("c1", true), ("a", false), ("c2", true)] {
        producer.begin_transaction().await?;
        send_all(&producer, &data, label, 30, 3).await?;
        if commit {
            producer.commit_transaction().await?;
        } else {
            producer.flush().await;
            producer.abort_transaction().await?;
        }
    }
    let committed = read(bootstrap, &data, 3, true, 60).await?;
    let uncommitted = read(bootstrap, &data, 3, false, 90).await?;
    for partition in 0..3 {
        let got: Vec<&str> = committed
            .iter()
            .filter(|(p, _)| *p == partition)
            .map(|(_, v)| v.as_str())
            .collect();
        let want: Vec<String> = ["c1", "c2"]
            .iter()
            .flat_map(|label| {
                (0..30)
                    .filter(move |i| i % 3 == partition)
                    .map(move |i| format!("{label}-{i}"))
            })
            .collect();
        ensure!(
            got == want,
            "read_committed partition {partition}: {got:?}, expected {want:?}"
        );
    }
    ensure!(
        uncommitted.len() == 90,
        "read_uncommitted read {} records, expected 90 (aborted ones included)",
        uncommitted.len()
    );

    // Offsets in a transaction: the group's offset moves only when it commits.
    let (input, output, group) = (
        format!("{prefix}-in"),
        format!("{prefix}-out"),
        format!("{prefix}-g"),
    );
    create(bootstrap, &input, 1).await?;
    create(bootstrap, &output, 1).await?;
    let plain = Producer::connect(producer_config(bootstrap, None)).await?;
    for i in 0..10 {
        plain
            .send(ProducerRecord::new(input.as_str(), format!("in-{i}")))
            .await?
            .await?;
    }
    plain.close().await;
    let mut consumer = Consumer::connect(consumer_config(bootstrap, Some(&group), true)).await?;
    consumer.subscribe([input.as_str()])?;
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while seen.len() < 10 && tokio::time::Instant::now() < deadline {
        seen.extend(consumer.poll(Duration::from_millis(200)).await?);
    }
    ensure!(seen.len() == 10, "consumed {} of 10", seen.len());
    producer.begin_transaction().await?;
    for record in &seen {
        let value = String::from_utf8_lossy(record.value.as_deref().unwrap_or_default());
        producer
            .send(ProducerRecord::new(output.as_str(), value.to_uppercase()))
            .await?;
    }
    let position = consumer
        .position(&(input.clone(), 0))
        .context("no position after consuming")?;
    let metadata = consumer.group_metadata().context("no group metadata")?;
    producer
        .send_offsets_to_transaction(vec![(input.clone(), 0, position)], metadata)
        .await?;
    producer.commit_transaction().await?;
    let partitions: BTreeSet<(String, i32)> = [(input.clone(), 0)].into();
    let offsets: BTreeMap<(String, i32), i64> = consumer.committed(&partitions).await?;
    consumer.close().await?;
    ensure!(
        offsets.get(&(input.clone(), 0)) == Some(&10),
        "the group's committed offset after the transaction: {offsets:?}, expected 10"
    );
    let copied = read(bootstrap, &output, 1, true, 10).await?;
    ensure!(
        copied.len() == 10,
        "{} copies committed, expected 10",
        copied.len()
    );

    // A zombie: a second instance with the same transactional.id aborts the first one's open
    // transaction and fences it.
    let zombies = format!("{prefix}-zombie");
    create(bootstrap, &zombies, 1).await?;
    let zombie_id = format!("{prefix}-z");
    let zombie = Producer::connect(producer_config(bootstrap, Some(&zombie_id))).await?;
    zombie.begin_transaction().await?;
    send_all(&zombie, &zombies, "zombie", 5, 1).await?;
    zombie.flush().await;
    let live = Producer::connect(producer_config(bootstrap, Some(&zombie_id))).await?;
    live.begin_transaction().await?;
    send_all(&live, &zombies, "live", 5, 1).await?;
    live.commit_transaction().await?;
    let fenced = zombie.commit_transaction().await;
    ensure!(
        matches!(fenced, Err(ProduceError::Fatal(_))),
        "the zombie's commit: {fenced:?}, expected a fatal (fenced) error"
    );
    let visible: Vec<String> = read(bootstrap, &zombies, 1, true, 5)
        .await?
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let want: Vec<String> = (0..5).map(|i| format!("live-{i}")).collect();
    ensure!(
        visible == want,
        "after the fence, read_committed: {visible:?}"
    );
    producer.close().await;
    zombie.close().await;
    live.close().await;
    Ok(format!(
        "semel-producer transactions: {} committed read, {} with aborted, group offset {:?}, zombie fenced ({})",
        committed.len(),
        uncommitted.len(),
        offsets.get(&(input, 0)),
        fenced.err().map(|e| e.to_string()).unwrap_or_default()
    ))
}
