//! semel-broker's message-id dedup window (`semel.dedup.window.ms`, docs/dedup-window.md)
//! with clients we did not write: kafka-python and librdkafka (confluent-kafka, kcat) send
//! records with a `semel-msg-id` header, and kcat reads back what the topic holds.
//!
//! - a restarted producer (a new producer id) sending the same ids again, in batches that mix
//!   old and new ids; two producers at once with overlapping ids, one of them idempotent; a
//!   `kill -9` of the broker, after which the window is rebuilt from the log, then a clean
//!   restart, after which it comes from its snapshot; records without
//!   the header, stored every time: each id is stored once, and nothing else is lost;
//! - an id older than the window is stored again;
//! - Kafka's `kafka-configs` turns the window on for an existing topic, which then knows the
//!   ids already in its log; `kafka-configs --describe` shows the setting.
//!
//! The broker binary runs as a child process (`cargo build -p semel-broker` first).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, ensure};
use common::fixed_port::{spawn_broker_on, spawn_broker_on_free_port};
use common::java::{kafka_ready, run_tool};
use common::{
    RawClient, kcat_read_all, kcat_send_with_id, output_within, python, stdout_of, topic_name,
};
use kafka_protocol::messages::CreateTopicsRequest;
use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
use kafka_protocol::protocol::StrBytes;

/// Bound for one client run.
const CLIENT_LIMIT: Duration = Duration::from_secs(120);

fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/dedup_window.py")
}

/// Sends ids `m<first>..m<end>` with `client` (see `tests/interop/dedup_window.py`).
fn send(
    bootstrap: &str,
    topic: &str,
    ids: std::ops::Range<u32>,
    client: &str,
    extra: &[&str],
) -> anyhow::Result<Command> {
    let mut command = Command::new(python()?);
    command
        .arg(script())
        .args([
            bootstrap,
            topic,
            &ids.start.to_string(),
            &ids.end.to_string(),
            "--client",
            client,
        ])
        .args(extra);
    Ok(command)
}

fn run(mut command: Command, what: &str) -> anyhow::Result<String> {
    let out = output_within(&mut command, CLIENT_LIMIT, what)?;
    stdout_of(&out, what)
}

/// kcat sends one record with key and `semel-msg-id` both `id`.
fn kcat_send(bootstrap: &str, topic: &str, id: &str) -> anyhow::Result<()> {
    kcat_send_with_id(bootstrap, topic, id, &format!("{id}|kcat"), CLIENT_LIMIT)
}

/// One stored record as kcat reads it.
#[derive(Debug)]
struct Stored {
    partition: i32,
    offset: i64,
    value: String,
    headers: String,
}

/// Every record of `topic`, read by kcat from the beginning to the end.
fn read_all(bootstrap: &str, topic: &str) -> anyhow::Result<Vec<Stored>> {
    let text = kcat_read_all(bootstrap, topic, "%p|%o|%s|%h\n", CLIENT_LIMIT)?;
    text.lines()
        .map(|line| {
            let fields: Vec<&str> = line.splitn(5, '|').collect();
            ensure!(fields.len() == 5, "unexpected line {line:?}");
            Ok(Stored {
                partition: fields[0].parse()?,
                offset: fields[1].parse()?,
                value: format!("{}|{}", fields[2], fields[3]),
                headers: fields[4].to_string(),
            })
        })
        .collect()
}

/// How many times each message id was stored, and the records without one.
fn count_ids(records: &[Stored]) -> (BTreeMap<String, usize>, usize) {
    let mut ids = BTreeMap::new();
    let mut without = 0;
    for record in records {
        match record
            .headers
            .split(',')
            .find_map(|h| h.strip_prefix("semel-msg-id="))
        {
            Some(id) => *ids.entry(id.to_string()).or_insert(0) += 1,
            None => without += 1,
        }
    }
    (ids, without)
}

/// Creates `topic` with CreateTopics and `configs` (name, value). Kafka's `kafka-topics
/// --create --config` refuses config names it does not know before asking the broker;
/// `kafka-configs --alter` and the admin clients pass them on.
async fn create_topic(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    configs: &[(&str, &str)],
) -> anyhow::Result<()> {
    let mut client = RawClient::connect(bootstrap.parse()?).await?;
    let request = CreateTopicsRequest::default()
        .with_timeout_ms(5000)
        .with_topics(vec![
            CreatableTopic::default()
                .with_name(topic_name(topic))
                .with_num_partitions(partitions)
                .with_replication_factor(1)
                .with_configs(
                    configs
                        .iter()
                        .map(|(name, value)| {
                            CreatableTopicConfig::default()
                                .with_name(StrBytes::from_string(name.to_string()))
                                .with_value(Some(StrBytes::from_string(value.to_string())))
                        })
                        .collect(),
                ),
        ]);
    let response = client.send(7, &request).await?;
    ensure!(
        response.topics[0].error_code == 0,
        "create {topic}: {:?}",
        response.topics[0]
    );
    Ok(())
}

/// How many records semel-consumer reads from every partition of `topic`, polling until it
/// has `expected` (or a bound passes) and once more after that.
async fn read_with_semel(bootstrap: &str, topic: &str, expected: usize) -> anyhow::Result<usize> {
    use semel::consumer::{AutoOffsetReset, Consumer, ConsumerConfig};
    let mut consumer = Consumer::connect(ConsumerConfig {
        bootstrap_servers: vec![bootstrap.to_string()],
        auto_offset_reset: AutoOffsetReset::Earliest,
        ..ConsumerConfig::default()
    })
    .await?;
    consumer.assign((0..3).map(|p| (topic.to_string(), p)))?;
    let mut count = 0;
    let deadline = tokio::time::Instant::now() + CLIENT_LIMIT;
    while count < expected && tokio::time::Instant::now() < deadline {
        count += consumer.poll(Duration::from_millis(500)).await?.len();
    }
    count += consumer.poll(Duration::from_millis(500)).await?.len();
    Ok(count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_message_id_is_stored_once_across_producers_restarts_and_a_broker_kill()
-> anyhow::Result<()> {
    kafka_ready()?;
    let dir = tempfile::tempdir()?;
    let (broker, port) = spawn_broker_on_free_port(dir.path(), &[])?;
    let bootstrap = format!("127.0.0.1:{port}");
    let topic = "payments";
    create_topic(&bootstrap, topic, 3, &[("semel.dedup.window.ms", "600000")]).await?;
    tokio::task::block_in_place(|| -> anyhow::Result<()> {
        // A producer sends m0..m999, then a restarted one (new producer id) m500..m1499: its
        // batches mix ids already stored with new ones.
        run(
            send(
                &bootstrap,
                topic,
                0..1000,
                "kafka-python",
                &["--tag", "first"],
            )?,
            "first producer",
        )?;
        run(
            send(
                &bootstrap,
                topic,
                500..1500,
                "kafka-python",
                &["--tag", "restarted"],
            )?,
            "restarted producer",
        )?;
        // Two producers at once, overlapping: librdkafka (idempotent) and kafka-python.
        let mut a = send(
            &bootstrap,
            topic,
            1000..2000,
            "confluent",
            &["--idempotent", "--tag", "a"],
        )?;
        let mut b = send(
            &bootstrap,
            topic,
            1500..2500,
            "kafka-python",
            &["--tag", "b"],
        )?;
        let (out_a, out_b) = std::thread::scope(|s| {
            let a = s.spawn(|| output_within(&mut a, CLIENT_LIMIT, "producer a"));
            let b = s.spawn(|| output_within(&mut b, CLIENT_LIMIT, "producer b"));
            (a.join(), b.join())
        });
        stdout_of(
            &out_a.map_err(|_| anyhow::anyhow!("producer a panicked"))??,
            "producer a",
        )?;
        stdout_of(
            &out_b.map_err(|_| anyhow::anyhow!("producer b panicked"))??,
            "producer b",
        )?;
        // kcat: one id already stored, one new.
        kcat_send(&bootstrap, topic, "m7")?;
        kcat_send(&bootstrap, topic, "kcat-1")?;
        // Records without the header are stored every time.
        for tag in ["plain-1", "plain-2"] {
            run(
                send(
                    &bootstrap,
                    topic,
                    0..10,
                    "kafka-python",
                    &["--no-header", "--tag", tag],
                )?,
                "plain producer",
            )?;
        }
        Ok(())
    })?;

    // kill -9: the window is rebuilt from the log on start (no segment rolled: no snapshot).
    broker.kill9()?;
    let broker = spawn_broker_on(dir.path(), port, &[])?;
    tokio::task::block_in_place(|| -> anyhow::Result<()> {
        run(
            send(
                &bootstrap,
                topic,
                0..2500,
                "confluent",
                &["--idempotent", "--tag", "after-kill"],
            )?,
            "producer after the kill",
        )?;
        kcat_send(&bootstrap, topic, "kcat-1")?;
        Ok(())
    })?;
    // A clean shutdown writes the window's snapshot; the next start loads it.
    broker.terminate()?;
    let broker = spawn_broker_on(dir.path(), port, &[])?;
    let records = tokio::task::block_in_place(|| -> anyhow::Result<Vec<Stored>> {
        run(
            send(
                &bootstrap,
                topic,
                2000..2500,
                "kafka-python",
                &["--tag", "after-restart"],
            )?,
            "producer after the clean restart",
        )?;
        read_all(&bootstrap, topic)
    })?;

    let (ids, without) = count_ids(&records);
    let twice: Vec<_> = ids.iter().filter(|(_, n)| **n > 1).take(10).collect();
    ensure!(twice.is_empty(), "ids stored more than once: {twice:?}");
    let mut expected: Vec<String> = (0..2500).map(|i| format!("m{i}")).collect();
    expected.push("kcat-1".into());
    expected.sort();
    let stored: Vec<String> = ids.keys().cloned().collect();
    ensure!(
        stored == expected,
        "stored {} distinct ids, expected {}; first missing: {:?}",
        stored.len(),
        expected.len(),
        expected.iter().find(|id| !ids.contains_key(*id))
    );
    ensure!(
        without == 20,
        "{without} records without an id, expected 20"
    );
    // The first copy of an id is the one kept: m1 from the first producer, m1200 from the
    // restarted one.
    for (id, from) in [("m1", "first"), ("m1200", "restarted")] {
        let header = format!("semel-msg-id={id}");
        let copy = records.iter().find(|r| r.headers == header);
        ensure!(
            copy.is_some_and(|r| r.value == format!("{id}|{from}")),
            "{id} is not the {from} producer's copy: {copy:?}"
        );
    }
    // Offsets in each partition only grow, with gaps where duplicates were dropped.
    let mut last: BTreeMap<i32, i64> = BTreeMap::new();
    for record in &records {
        let previous = last.insert(record.partition, record.offset);
        ensure!(
            previous.is_none_or(|p| p < record.offset),
            "partition {} offsets out of order at {}",
            record.partition,
            record.offset
        );
    }
    // A batch was stored without its duplicates: offsets with gaps inside partitions.
    let gaps = records
        .windows(2)
        .any(|w| w[0].partition == w[1].partition && w[1].offset > w[0].offset + 1);
    ensure!(
        gaps,
        "no offset gap: no batch was stored without duplicates"
    );
    // Two more consumers read the gaps the same way: kafka-python and semel-consumer.
    let python_read = tokio::task::block_in_place(|| {
        let mut command = Command::new(python()?);
        command
            .arg(script())
            .args([&bootstrap, topic, "0", "0", "--read"]);
        run(command, "kafka-python reading")
    })?;
    let (ids_with, _) = count_ids(&records);
    let expected = format!(
        "records={} distinct={} max_copies=1",
        records.len(),
        ids_with.len()
    );
    ensure!(
        python_read.trim() == expected,
        "kafka-python read {python_read:?}, kcat {expected:?}"
    );
    let semel_count = read_with_semel(&bootstrap, topic, records.len()).await?;
    ensure!(
        semel_count == records.len(),
        "semel-consumer read {semel_count}, kcat {}",
        records.len()
    );
    let output = broker.output_text();
    ensure!(
        output.contains("dedup window rebuilt from the log"),
        "the restarted broker did not rebuild the window:\n{output}"
    );
    broker.terminate()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_older_than_the_window_is_stored_again() -> anyhow::Result<()> {
    kafka_ready()?;
    let dir = tempfile::tempdir()?;
    let (broker, port) = spawn_broker_on_free_port(dir.path(), &[])?;
    let bootstrap = format!("127.0.0.1:{port}");
    let topic = "short-window";
    create_topic(&bootstrap, topic, 1, &[("semel.dedup.window.ms", "3000")]).await?;
    tokio::task::block_in_place(|| -> anyhow::Result<()> {
        kcat_send(&bootstrap, topic, "x")?;
        kcat_send(&bootstrap, topic, "x")?;
        let (ids, _) = count_ids(&read_all(&bootstrap, topic)?);
        ensure!(ids.get("x") == Some(&1), "within the window: {ids:?}");
        std::thread::sleep(Duration::from_millis(3500));
        kcat_send(&bootstrap, topic, "x")?;
        let (ids, _) = count_ids(&read_all(&bootstrap, topic)?);
        ensure!(ids.get("x") == Some(&2), "after the window: {ids:?}");
        Ok(())
    })?;
    broker.terminate()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_configs_turns_the_window_on_for_an_existing_topic() -> anyhow::Result<()> {
    kafka_ready()?;
    let dir = tempfile::tempdir()?;
    let (broker, port) = spawn_broker_on_free_port(dir.path(), &[])?;
    let bootstrap = format!("127.0.0.1:{port}");
    let topic = "orders";
    create_topic(&bootstrap, topic, 1, &[]).await?;
    tokio::task::block_in_place(|| -> anyhow::Result<()> {
        kcat_send(&bootstrap, topic, "o1")?;
        kcat_send(&bootstrap, topic, "o1")?;
        let (ids, _) = count_ids(&read_all(&bootstrap, topic)?);
        ensure!(ids.get("o1") == Some(&2), "no window yet: {ids:?}");

        let entity = [
            "--bootstrap-server",
            &bootstrap,
            "--entity-type",
            "topics",
            "--entity-name",
            topic,
        ];
        let mut alter = entity.to_vec();
        alter.extend(["--alter", "--add-config", "semel.dedup.window.ms=600000"]);
        run_tool("configs", &alter)?;
        let mut describe = entity.to_vec();
        describe.push("--describe");
        let described = run_tool("configs", &describe)?;
        ensure!(
            described.contains("semel.dedup.window.ms=600000"),
            "kafka-configs --describe: {described}"
        );

        // The window is built from the log: o1 is already in it.
        kcat_send(&bootstrap, topic, "o1")?;
        kcat_send(&bootstrap, topic, "o2")?;
        kcat_send(&bootstrap, topic, "o2")?;
        let (ids, _) = count_ids(&read_all(&bootstrap, topic)?);
        ensure!(
            ids.get("o1") == Some(&2) && ids.get("o2") == Some(&1),
            "with the window: {ids:?}"
        );
        Ok(())
    })
    .context("kafka-configs")?;
    broker.terminate()?;
    Ok(())
}
