//! Semel's libraries against a real Apache Kafka cluster: three brokers (KRaft, combined
//! roles), replication factor 3 and `min.insync.replicas=2`, started from Maven Central's jars
//! by `scripts/kafka.sh` (Kafka 4.1.2). This is the path for users who outgrow one node: their
//! own Kafka, our libraries.
//!
//! One test runs every scenario on one cluster (a cluster takes about 20 s to start), and
//! stops the cluster however the scenarios end.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use common::dedup_hosts;
use common::java::{JavaTool, Json, consumed_ranges, ownership_events, replay};
use semel::consumer::{
    AutoOffsetReset, Consumer, ConsumerConfig, ConsumerError, RebalanceContext, RebalanceListener,
    Strategy,
};
use semel::producer::{Acks, Producer, ProducerConfig, ProducerRecord};

/// A 3-broker cluster in a temporary directory, stopped on drop. Besides its plaintext
/// listeners, each broker has a SASL_SSL one (certificate and SCRAM users from `pki`).
struct Cluster {
    dir: tempfile::TempDir,
    bootstrap: String,
    /// The SASL_SSL listeners' bootstrap string.
    sasl_ssl_bootstrap: String,
    pki: common::pki::Pki,
}

fn kafka_sh() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka.sh")
}

/// Runs `scripts/kafka.sh ARGS` to completion (each subcommand bounds its own waits; this
/// bounds the whole call as well).
fn kafka(args: &[&str], limit: Duration) -> anyhow::Result<String> {
    let mut command = Command::new("bash");
    command.arg(kafka_sh()).args(args);
    let out = common::output_within(&mut command, limit, &format!("kafka.sh {}", args.join(" ")))?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(
        out.status.success(),
        "kafka.sh {} failed ({}):\n{stdout}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

impl Cluster {
    fn start() -> anyhow::Result<Self> {
        // Java and Maven come from scripts/setup.sh; say so rather than fail obscurely.
        for tool in ["java", "mvn"] {
            let found = Command::new(tool).arg("-version").output();
            ensure!(
                found.is_ok_and(|o| o.status.success()),
                "{tool} is not installed: run scripts/setup.sh (Debian: openjdk-17-jdk-headless, maven)"
            );
        }
        kafka(&["fetch"], Duration::from_secs(600))?;
        let dir = tempfile::tempdir()?;
        let path = dir.path().display().to_string();
        // Kafka reads a PEM key store as the PKCS#8 key followed by the certificate chain.
        let pki = common::pki::Pki::new()?;
        let keystore = [
            std::fs::read_to_string(pki.path("broker.key"))?,
            std::fs::read_to_string(pki.path("broker.pem"))?,
        ]
        .concat();
        std::fs::write(pki.path("keystore.pem"), keystore)?;
        std::fs::write(pki.path("scram-users"), "alice alice-secret\n")?;
        let mut command = Command::new("bash");
        command
            .arg(kafka_sh())
            .args(["start3", &path])
            .env("KAFKA_SASL_SSL_DIR", pki.dir.path());
        let started =
            common::output_within(&mut command, Duration::from_secs(180), "kafka.sh start3")?;
        let out = common::stdout_of(&started, "kafka.sh start3")?;
        let bootstrap = out
            .lines()
            .last()
            .context("start3 printed no bootstrap")?
            .trim()
            .to_string();
        ensure!(bootstrap.contains(':'), "bootstrap {bootstrap:?}");
        let sasl_ssl_bootstrap = std::fs::read_to_string(dir.path().join("bootstrap-sasl-ssl"))?
            .trim()
            .to_string();
        Ok(Self {
            dir,
            bootstrap,
            sasl_ssl_bootstrap,
            pki,
        })
    }

    fn path(&self) -> String {
        self.dir.path().display().to_string()
    }

    fn tool(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["tool"];
        all.extend_from_slice(args);
        kafka(&all, Duration::from_secs(120))
    }

    fn create_topic(&self, topic: &str, partitions: u32) -> anyhow::Result<()> {
        self.tool(&[
            "topics",
            "--bootstrap-server",
            &self.bootstrap,
            "--create",
            "--topic",
            topic,
            "--partitions",
            &partitions.to_string(),
            "--replication-factor",
            "3",
        ])?;
        Ok(())
    }
}

/// An idempotent `acks=all` producer that rides out broker kills: each request may take 10 s,
/// each record 120 s.
fn through_broker_kills(cluster: &Cluster) -> ProducerConfig {
    ProducerConfig {
        bootstrap_servers: vec![cluster.bootstrap.clone()],
        enable_idempotence: true,
        acks: Acks::All,
        linger: Duration::from_millis(5),
        delivery_timeout: Duration::from_secs(120),
        request_timeout: Duration::from_secs(10),
        ..ProducerConfig::default()
    }
}

/// The node id leading `topic`'s `partition` now, as kafka-topics --describe says.
fn leader(bootstrap: &str, topic: &str, partition: i32) -> anyhow::Result<u32> {
    {
        let out = kafka(
            &[
                "tool",
                "topics",
                "--bootstrap-server",
                bootstrap,
                "--describe",
                "--topic",
                topic,
            ],
            Duration::from_secs(120),
        )?;
        for line in out.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let value = |name: &str| {
                fields
                    .iter()
                    .position(|f| *f == name)
                    .and_then(|i| fields.get(i + 1))
                    .copied()
            };
            if value("Partition:") == Some(&partition.to_string()) {
                return value("Leader:")
                    .and_then(|l| l.parse().ok())
                    .with_context(|| format!("no leader in {line:?}"));
            }
        }
        bail!("partition {partition} of {topic} not in:\n{out}")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let path = self.path();
        if let Err(e) = kafka(&["stop", &path], Duration::from_secs(120)) {
            eprintln!("stopping the Kafka cluster: {e}");
        }
    }
}

/// Every value of `topic`, per partition in offset order, read by kcat (a client we did not
/// write).
fn read_with_kcat(bootstrap: &str, topic: &str) -> anyhow::Result<BTreeMap<i32, Vec<u64>>> {
    let mut command = Command::new(common::kcat()?);
    command.args([
        "-b",
        bootstrap,
        "-C",
        "-t",
        topic,
        "-o",
        "beginning",
        "-e",
        "-q",
        "-f",
        "%p %s\n",
    ]);
    let out = common::output_within(&mut command, Duration::from_secs(120), "kcat -C")?;
    ensure!(
        out.status.success(),
        "kcat: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut partitions: BTreeMap<i32, Vec<u64>> = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let (partition, value) = line.split_once(' ').context("kcat line")?;
        partitions
            .entry(partition.parse()?)
            .or_default()
            .push(value.parse()?);
    }
    Ok(partitions)
}

/// semel-producer, idempotent with `acks=all`, while the leaders of two partitions are
/// `kill -9`ed and restarted, one after the other: every message acknowledged, stored exactly
/// once, and in send order within its partition, read back by kcat and by a semel consumer
/// group.
async fn idempotent_producer_through_leader_kills(cluster: &Cluster) -> anyhow::Result<()> {
    const TOPIC: &str = "semel-leader-kills";
    const MESSAGES: u64 = 20_000;
    cluster.create_topic(TOPIC, 3)?;
    let producer = Producer::connect(through_broker_kills(cluster)).await?;
    // The killer: two rounds of kill -9 of a partition's leader, then a restart that waits
    // until the node answers again.
    let path = cluster.path();
    let bootstrap = cluster.bootstrap.clone();
    let killer = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<u32>> {
        let mut killed = Vec::new();
        for partition in [0, 1] {
            std::thread::sleep(Duration::from_secs(2));
            let leader = leader(&bootstrap, TOPIC, partition)?;
            kafka(
                &["kill", &leader.to_string(), &path],
                Duration::from_secs(60),
            )?;
            killed.push(leader);
            std::thread::sleep(Duration::from_secs(4));
            kafka(
                &["restart", &leader.to_string(), &path],
                Duration::from_secs(180),
            )?;
        }
        Ok(killed)
    });
    let started = Instant::now();
    let mut deliveries = Vec::with_capacity(MESSAGES as usize);
    for i in 0..MESSAGES {
        let record = ProducerRecord::new(TOPIC, i.to_string()).key(format!("k{}", i % 97));
        deliveries.push(producer.send(record).await?);
        // Spread the sends over the kills (about 20 s).
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut failed = Vec::new();
    for (i, delivery) in deliveries.into_iter().enumerate() {
        if let Err(e) = delivery.await {
            failed.push((i, e.to_string()));
        }
    }
    producer.flush().await;
    let killed = killer.await??;
    ensure!(
        failed.is_empty(),
        "{} of {MESSAGES} sends failed, first: {:?}",
        failed.len(),
        failed.first()
    );
    eprintln!(
        "sent {MESSAGES} messages in {:?} while killing leaders {killed:?}",
        started.elapsed()
    );

    let stored = read_with_kcat(&cluster.bootstrap, TOPIC)?;
    let mut seen = BTreeMap::new();
    for (partition, values) in &stored {
        ensure!(
            values.windows(2).all(|w| w[0] < w[1]),
            "partition {partition} is out of send order"
        );
        for value in values {
            *seen.entry(*value).or_insert(0u32) += 1;
        }
    }
    let duplicates: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    ensure!(
        duplicates.is_empty(),
        "stored twice: {:?}",
        &duplicates[..duplicates.len().min(10)]
    );
    ensure!(
        seen.len() as u64 == MESSAGES,
        "{} of {MESSAGES} messages stored",
        seen.len()
    );

    // Our consumer, in a group, on the same topic: every message once.
    let mut consumer = Consumer::connect(ConsumerConfig {
        bootstrap_servers: vec![cluster.bootstrap.clone()],
        group_id: Some("semel-on-kafka".into()),
        auto_offset_reset: AutoOffsetReset::Earliest,
        partition_assignment_strategy: vec![Strategy::CooperativeSticky],
        ..ConsumerConfig::default()
    })
    .await?;
    consumer.subscribe([TOPIC])?;
    let mut consumed = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while (consumed.len() as u64) < MESSAGES {
        ensure!(
            Instant::now() < deadline,
            "the semel consumer read {} of {MESSAGES} in 120 s",
            consumed.len()
        );
        for record in consumer.poll(Duration::from_millis(500)).await? {
            let value: u64 =
                std::str::from_utf8(record.value.as_deref().unwrap_or_default())?.parse()?;
            *consumed.entry(value).or_insert(0u32) += 1;
        }
    }
    ensure!(
        consumed.values().all(|n| *n == 1),
        "the semel consumer read some messages twice"
    );
    consumer.commit().await?;
    consumer.close().await?;
    Ok(())
}

/// `kafka-consumer-groups --describe --group GROUP EXTRA...`.
fn describe_group(cluster: &Cluster, group: &str, extra: &[&str]) -> anyhow::Result<String> {
    let mut args = vec![
        "consumer-groups",
        "--bootstrap-server",
        &cluster.bootstrap,
        "--describe",
        "--group",
        group,
    ];
    args.extend_from_slice(extra);
    cluster.tool(&args)
}

/// The group coordinator's node id for `group` (`kafka-consumer-groups --describe --state`).
fn coordinator(cluster: &Cluster, group: &str) -> anyhow::Result<u32> {
    let out = describe_group(cluster, group, &["--state"])?;
    let row = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some(group))
        .with_context(|| format!("no row for {group} in:\n{out}"))?;
    let id = row
        .split_whitespace()
        .find_map(|f| f.strip_prefix('(').and_then(|f| f.strip_suffix(')')))
        .with_context(|| format!("no coordinator id in {row:?}"))?;
    Ok(id.parse()?)
}

/// Per partition of `topic`, the group's lag (`kafka-consumer-groups --describe`), for the
/// partitions that have a committed offset.
fn group_lag(cluster: &Cluster, group: &str, topic: &str) -> anyhow::Result<BTreeMap<i32, i64>> {
    let out = describe_group(cluster, group, &[])?;
    let mut lag = BTreeMap::new();
    for line in out.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() >= 6
            && fields[0] == group
            && fields[1] == topic
            && let (Ok(partition), Ok(behind)) = (fields[2].parse(), fields[5].parse())
        {
            lag.insert(partition, behind);
        }
    }
    Ok(lag)
}

/// Milliseconds since the epoch, the clock the Java tools stamp their events with.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A semel member's rebalance events, in the form `VerifiableConsumer` prints them, so one
/// replay covers both kinds of member. It commits the positions of revoked partitions, as a
/// Java application does in `onPartitionsRevoked`.
struct Recorder(Arc<Mutex<Vec<Json>>>);

impl Recorder {
    fn push(&self, name: &str, partitions: &BTreeSet<(String, i32)>) {
        let list = partitions
            .iter()
            .map(|(topic, partition)| {
                Json::Obj(vec![
                    ("topic".into(), Json::Str(topic.clone())),
                    ("partition".into(), Json::Int(i64::from(*partition))),
                ])
            })
            .collect();
        self.0.lock().expect("events").push(Json::Obj(vec![
            ("name".into(), Json::Str(name.into())),
            ("timestamp".into(), Json::Int(now_ms())),
            ("partitions".into(), Json::Arr(list)),
        ]));
    }
}

impl RebalanceListener for Recorder {
    fn on_partitions_revoked(
        &mut self,
        ctx: &mut RebalanceContext<'_>,
        partitions: &BTreeSet<(String, i32)>,
    ) {
        for tp in partitions {
            if let Some(position) = ctx.position(tp) {
                ctx.commit(tp.clone(), position);
            }
        }
        self.push("partitions_revoked", partitions);
    }

    fn on_partitions_assigned(
        &mut self,
        _ctx: &mut RebalanceContext<'_>,
        partitions: &BTreeSet<(String, i32)>,
    ) {
        self.push("partitions_assigned", partitions);
    }

    fn on_partitions_lost(
        &mut self,
        _ctx: &mut RebalanceContext<'_>,
        partitions: &BTreeSet<(String, i32)>,
    ) {
        self.push("partitions_revoked", partitions);
    }
}

/// One semel member of a mixed group: polls, records what it read, commits after each poll.
struct SemelMember {
    events: Arc<Mutex<Vec<Json>>>,
    consumed: Arc<Mutex<BTreeSet<(i32, i64)>>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn spawn_semel_member(
    bootstrap: &str,
    group: &str,
    topic: &str,
    strategy: Strategy,
) -> SemelMember {
    let events: Arc<Mutex<Vec<Json>>> = Arc::default();
    let consumed: Arc<Mutex<BTreeSet<(i32, i64)>>> = Arc::default();
    let config = ConsumerConfig {
        bootstrap_servers: vec![bootstrap.to_string()],
        group_id: Some(group.to_string()),
        auto_offset_reset: AutoOffsetReset::Earliest,
        partition_assignment_strategy: vec![strategy],
        session_timeout: Duration::from_secs(10),
        heartbeat_interval: Duration::from_secs(1),
        ..ConsumerConfig::default()
    };
    let topic = topic.to_string();
    let (sink, read) = (Arc::clone(&events), Arc::clone(&consumed));
    let task = tokio::spawn(async move {
        let mut consumer = Consumer::connect(config).await?;
        consumer.set_rebalance_listener(Recorder(sink));
        consumer.subscribe([topic])?;
        loop {
            let records = consumer.poll(Duration::from_millis(200)).await?;
            read.lock()
                .expect("consumed")
                .extend(records.iter().map(|r| (r.partition, r.offset)));
            if !records.is_empty() {
                match consumer.commit().await {
                    // A rebalance under way: the revocation commits what moves.
                    Ok(()) | Err(ConsumerError::CommitFailed(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    });
    SemelMember {
        events,
        consumed,
        task,
    }
}

/// Issue 20: semel-consumer members and Java `VerifiableConsumer`s (classic protocol) in one
/// group on the 3-broker cluster, while a producer writes, through a `kill -9` of the broker
/// that coordinates the group (the coordinator moves to another broker) and its restart.
/// Replayed together, the members' assignment events never give a partition to two members at
/// once; every partition is owned at the end; every record acknowledged was consumed; and the
/// group's committed offsets reach the end of every partition afterwards (commits resume on
/// the new coordinator).
async fn mixed_group_through_a_coordinator_kill(
    cluster: &Cluster,
    strategy: Strategy,
    java_assignor: &str,
) -> anyhow::Result<()> {
    const PARTITIONS: i32 = 6;
    let topic = format!("mixed-{}", strategy.name());
    let group = format!("mixed-group-{}", strategy.name());
    cluster.create_topic(&topic, PARTITIONS as u32)?;
    let producer = Producer::connect(through_broker_kills(cluster)).await?;
    // 60 records every 100 ms, round robin over the partitions, until told to stop.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, topic) = (Arc::clone(&stop), topic.clone());
        tokio::spawn(async move {
            let mut acked = BTreeSet::new();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let mut deliveries = Vec::new();
                for _ in 0..60 {
                    let partition = i32::try_from(n % PARTITIONS as u64)?;
                    let record =
                        ProducerRecord::new(topic.as_str(), n.to_string()).partition(partition);
                    deliveries.push(producer.send(record).await?);
                    n += 1;
                }
                for delivery in deliveries {
                    let report = delivery.await?;
                    acked.insert((report.partition, report.offset));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            producer.close().await;
            anyhow::Ok(acked)
        })
    };

    let java = |n: usize| {
        JavaTool::spawn(
            &format!("VerifiableConsumer {group} #{n}"),
            "verifiable-consumer",
            &[
                "--bootstrap-server",
                &cluster.bootstrap,
                "--topic",
                &topic,
                "--group-id",
                &group,
                "--group-protocol",
                "classic",
                "--assignment-strategy",
                java_assignor,
                "--session-timeout",
                "10000",
                "--reset-policy",
                "earliest",
                "--verbose",
            ],
        )
    };
    let semel1 = spawn_semel_member(&cluster.bootstrap, &group, &topic, strategy);
    let mut java1 = java(1)?;
    let semel2 = spawn_semel_member(&cluster.bootstrap, &group, &topic, strategy);
    let mut java2 = java(2)?;

    // Every member's events, Java's first: member 0 and 1 are Java, 2 and 3 semel.
    let all_events = |java: [&JavaTool; 2]| -> anyhow::Result<Vec<Vec<Json>>> {
        let mut all = ownership_events(&[])?;
        for tool in java {
            all.extend(ownership_events(std::slice::from_ref(tool))?);
        }
        for member in [&semel1, &semel2] {
            all.push(member.events.lock().expect("events").clone());
        }
        Ok(all)
    };
    // All four members own something and every partition has one owner.
    let balanced = |java1: &mut JavaTool, java2: &mut JavaTool, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            java1.ensure_running()?;
            java2.ensure_running()?;
            let ownership = replay(&all_events([java1, java2])?)?;
            ensure!(
                ownership.overlaps.is_empty(),
                "{what}: a partition owned twice: {:?}",
                ownership.overlaps
            );
            let owners: BTreeSet<usize> = ownership.owner.values().copied().collect();
            if ownership.owner.len() == PARTITIONS as usize && owners.len() == 4 {
                return Ok(ownership.owner);
            }
            ensure!(
                Instant::now() < deadline,
                "{what}: the group never shared every partition among its 4 members: {:?}",
                ownership.owner
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let before = tokio::task::block_in_place(|| balanced(&mut java1, &mut java2, "joined"))?;

    let node = tokio::task::block_in_place(|| coordinator(cluster, &group))?;
    let path = cluster.path();
    tokio::task::block_in_place(|| {
        kafka(&["kill", &node.to_string(), &path], Duration::from_secs(60))
    })?;
    // The controller fences the killed broker after its session timeout; then another
    // broker leads the group's `__consumer_offsets` partition and coordinates it.
    let deadline = Instant::now() + Duration::from_secs(90);
    let moved_to = loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        match tokio::task::block_in_place(|| coordinator(cluster, &group)) {
            Ok(id) if id != node => break id,
            seen => ensure!(
                Instant::now() < deadline,
                "the coordinator never moved off the killed node {node}: {seen:?}"
            ),
        }
    };
    let during =
        tokio::task::block_in_place(|| balanced(&mut java1, &mut java2, "coordinator killed"))?;
    tokio::task::block_in_place(|| {
        kafka(
            &["restart", &node.to_string(), &path],
            Duration::from_secs(180),
        )
    })?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let acked = writer.await??;

    // Every acknowledged record consumed by some member, and the group's commits at the end
    // of every partition.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut consumed = consumed_ranges(&[])?;
        for tool in [&java1, &java2] {
            consumed.extend(consumed_ranges(std::slice::from_ref(tool))?);
        }
        for member in [&semel1, &semel2] {
            consumed.extend(member.consumed.lock().expect("consumed").iter().copied());
        }
        let missing = acked.difference(&consumed).count();
        let lag = tokio::task::block_in_place(|| group_lag(cluster, &group, &topic))?;
        let caught_up = lag.len() == PARTITIONS as usize && lag.values().all(|behind| *behind == 0);
        if missing == 0 && caught_up {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{}: {missing} of {} acknowledged records never consumed; lag {lag:?}",
            strategy.name(),
            acked.len()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let after = tokio::task::block_in_place(|| balanced(&mut java1, &mut java2, "at the end"))?;
    ensure!(!semel1.task.is_finished(), "semel member 1 stopped");
    ensure!(!semel2.task.is_finished(), "semel member 2 stopped");
    semel1.task.abort();
    semel2.task.abort();
    eprintln!(
        "mixed {} group on Kafka: coordinator {node} killed, moved to {moved_to}; {} records; \
         owners before {before:?}, during {during:?}, after {after:?}",
        strategy.name(),
        acked.len()
    );
    Ok(())
}

/// The dedup changelog's two-host takeover (`tests/dedup_changelog.rs`) on Kafka: host A's
/// marks reach the changelog topic (replication factor 3, the cluster's default), A is
/// `kill -9`ed before any offset commit, host B replays A's marks and handles only the rest:
/// every id once over both hosts.
async fn dedup_changelog_takeover(cluster: &Cluster) -> anyhow::Result<()> {
    let topic = "semel-dedup-orders";
    cluster.create_topic(topic, dedup_hosts::PARTITIONS as u32)?;
    let outcome =
        dedup_hosts::two_hosts(&cluster.bootstrap, topic, "billing-on-kafka", "on").await?;
    let missing = (0..dedup_hosts::MESSAGES)
        .filter(|n| !outcome.handled.contains_key(&format!("m{n}")))
        .count();
    let twice: Vec<_> = outcome.handled.iter().filter(|(_, c)| **c > 1).collect();
    eprintln!(
        "dedup on Kafka: a handled {}, b: {}; handled twice {}, missing {missing}",
        outcome.a_handled,
        outcome.b_status,
        twice.len()
    );
    ensure!(missing == 0, "{missing} ids never handled");
    ensure!(twice.is_empty(), "handled twice on Kafka: {twice:?}");
    ensure!(
        outcome
            .b_status
            .contains(&format!("restored={} ", dedup_hosts::A_HANDLES)),
        "host b should have restored exactly host a's marks: {}",
        outcome.b_status
    );
    Ok(())
}

/// `examples/replication.rs` on this cluster: for acks=0, 1 and all, both followers paused
/// during a burst, the leader `kill -9`ed and the followers resumed; then the ISR shrinking and
/// growing back, and `acks=all` refused with `NOT_ENOUGH_REPLICAS` when it is too small. The
/// example fails unless `acks=1` lost acknowledged messages (the fault was injected) and
/// `acks=all` lost none; here the numbers are checked again from its `RESULT` lines.
fn replication_example(cluster: &Cluster) -> anyhow::Result<()> {
    let binary = common::workspace_binary("examples/replication")?;
    let mut command = Command::new(binary);
    // The example's own path to kafka.sh is compiled in, and its binary may come from another
    // clone sharing the target directory; name this checkout's script.
    command.args(["--kafka-dir", &cluster.path()]);
    command.arg("--kafka-sh").arg(kafka_sh());
    let out = common::output_within(&mut command, Duration::from_secs(900), "replication")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    ensure!(
        out.status.success(),
        "the replication example failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lost = |level: &str| -> anyhow::Result<u64> {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("RESULT acks={level} ")))
            .with_context(|| format!("no RESULT line for acks={level}"))?;
        line.split_whitespace()
            .find_map(|f| f.strip_prefix("acknowledged_lost="))
            .context("acknowledged_lost")?
            .parse()
            .context("acknowledged_lost")
    };
    ensure!(lost("1")? > 0, "acks=1 lost nothing");
    ensure!(lost("all")? == 0, "acks=all lost acknowledged messages");
    ensure!(stdout.contains("not_enough_replicas=true"), "{stdout}");
    Ok(())
}

/// semel-producer and semel-consumer on Kafka's SASL_SSL listeners (issue 22): SCRAM-SHA-512
/// to produce (idempotent, acks=all, replication factor 3), SCRAM-SHA-256 to read back, and a
/// wrong password refused with the broker's authentication error.
async fn semel_clients_over_sasl_ssl(cluster: &Cluster) -> anyhow::Result<()> {
    use semel::client::security::scram::ScramMechanism;
    use semel::client::{ClientError, SaslMechanism, SecurityProtocol};
    use semel::producer::ProduceError;
    let topic = "kafka-sasl-ssl";
    cluster.create_topic(topic, 1)?;
    let security = |mechanism, password: &str| {
        cluster.pki.client(
            SecurityProtocol::SaslSsl,
            SaslMechanism::Scram(mechanism),
            "alice",
            password,
        )
    };
    let config = |security| ProducerConfig {
        bootstrap_servers: vec![cluster.sasl_ssl_bootstrap.clone()],
        security,
        request_timeout: Duration::from_secs(10),
        delivery_timeout: Duration::from_secs(60),
        ..ProducerConfig::default()
    };
    let producer =
        Producer::connect(config(security(ScramMechanism::Sha512, "alice-secret"))).await?;
    let mut deliveries = Vec::new();
    for n in 0..20 {
        deliveries.push(
            producer
                .send(ProducerRecord::new(topic, n.to_string()).partition(0))
                .await?,
        );
    }
    for delivery in deliveries {
        delivery.await?;
    }
    producer.close().await;
    let mut consumer = Consumer::connect(ConsumerConfig {
        bootstrap_servers: vec![cluster.sasl_ssl_bootstrap.clone()],
        security: security(ScramMechanism::Sha256, "alice-secret"),
        auto_offset_reset: AutoOffsetReset::Earliest,
        ..ConsumerConfig::default()
    })
    .await?;
    consumer.assign([(topic.to_string(), 0)])?;
    let mut values = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while values.len() < 20 && Instant::now() < deadline {
        for record in consumer.poll(Duration::from_millis(200)).await? {
            values.push(
                String::from_utf8_lossy(record.value.as_deref().unwrap_or_default()).into_owned(),
            );
        }
    }
    let expected: Vec<String> = (0..20).map(|n: i32| n.to_string()).collect();
    ensure!(values == expected, "read over SASL_SSL: {values:?}");
    match Producer::connect(config(security(ScramMechanism::Sha256, "guess"))).await {
        Err(ProduceError::Client(ClientError::Authentication { reason, .. })) => {
            ensure!(reason.contains("invalid credentials"), "{reason}");
        }
        other => bail!("a wrong password on Kafka: {other:?}"),
    }
    eprintln!(
        "on Kafka over SASL_SSL: 20 records produced with SCRAM-SHA-512 and read with SCRAM-SHA-256; a wrong password refused"
    );

    // The semel admin tool on Kafka, through the same SASL_SSL listener (--command-config).
    let properties = cluster.pki.path("semel-cli.properties");
    std::fs::write(
        &properties,
        format!(
            "security.protocol=SASL_SSL\nsasl.mechanism=SCRAM-SHA-512\nsasl.username=alice\n\
             sasl.password=alice-secret\nssl.ca.location={}\n",
            cluster.pki.path("ca.pem").display()
        ),
    )?;
    let semel = |args: &[&str]| -> anyhow::Result<String> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_semel"));
        command
            .arg("--bootstrap-server")
            .arg(&cluster.sasl_ssl_bootstrap)
            .arg("--command-config")
            .arg(&properties)
            .args(args);
        let what = format!("semel {}", args.join(" "));
        let out = common::output_within(&mut command, Duration::from_secs(60), &what)?;
        common::stdout_of(&out, &what)
    };
    let described =
        tokio::task::block_in_place(|| semel(&["--json", "topics", "describe", topic]))?;
    ensure!(described.contains(r#""end-offset":20"#), "{described}");
    tokio::task::block_in_place(|| {
        semel(&[
            "offsets",
            "reset",
            "--group",
            "kafka-cli",
            "--topic",
            topic,
            "--to-earliest",
            "--execute",
        ])
    })?;
    let lag =
        tokio::task::block_in_place(|| semel(&["--json", "groups", "describe", "kafka-cli"]))?;
    ensure!(
        lag.contains(r#""current-offset":0"#) && lag.contains(r#""lag":20"#),
        "{lag}"
    );
    let producers =
        tokio::task::block_in_place(|| semel(&["--json", "producers", "--topic", topic]))?;
    ensure!(producers.contains(r#""last-sequence":19"#), "{producers}");
    eprintln!(
        "semel tool on Kafka over SASL_SSL: topic end 20, group lag 20 after a reset to earliest, producer last sequence 19"
    );
    Ok(())
}

/// The child process of [`dedup_changelog_takeover`] (one "host").
/// A compacted, compressed topic read by semel-consumer. Kafka's log cleaner keeps a batch
/// that lost records (its base offset and last offset delta stay), so the records left have
/// gaps in their offset deltas; semel-consumer refused such a compressed batch ("record 1 of
/// 3 has offset delta 2"). The topic rolls 1 MiB segments (the smallest Kafka allows) and
/// the brokers look for dirty logs every second (`log.cleaner.backoff.ms` in kafka.sh).
async fn compacted_compressed_topic(cluster: &Cluster) -> anyhow::Result<()> {
    const TOPIC: &str = "semel-compacted";
    const MESSAGES: u64 = 3_000;
    const KEYS: u64 = 50;
    cluster.tool(&[
        "topics",
        "--bootstrap-server",
        &cluster.bootstrap,
        "--create",
        "--topic",
        TOPIC,
        "--partitions",
        "1",
        "--replication-factor",
        "3",
        "--config",
        "cleanup.policy=compact",
        "--config",
        "segment.bytes=1048576",
        "--config",
        "min.cleanable.dirty.ratio=0.01",
    ])?;
    let producer = Producer::connect(ProducerConfig {
        compression: semel::producer::Compression::Zstd,
        linger: Duration::from_millis(20),
        ..through_broker_kills(cluster)
    })
    .await?;
    // 1 KiB values that do not compress (xorshift), so 3,000 of them fill three segments.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut latest = BTreeMap::new();
    let mut deliveries = Vec::new();
    for i in 0..MESSAGES {
        let mut value = format!("{i}:").into_bytes();
        while value.len() < 1024 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            value.extend_from_slice(&state.to_le_bytes());
        }
        let key = format!("k{}", i % KEYS);
        latest.insert(key.clone(), i);
        deliveries.push(
            producer
                .send(ProducerRecord::new(TOPIC, value).key(key))
                .await?,
        );
    }
    for delivery in deliveries {
        delivery.await?;
    }
    producer.close().await;

    // Read the whole partition until the cleaner has run (fewer records than were sent, with
    // the last one still there), bounded.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let mut consumer = Consumer::connect(ConsumerConfig {
            bootstrap_servers: vec![cluster.bootstrap.clone()],
            auto_offset_reset: AutoOffsetReset::Earliest,
            ..ConsumerConfig::default()
        })
        .await?;
        consumer.assign([(TOPIC.to_string(), 0)])?;
        let mut read: Vec<(i64, String, u64)> = Vec::new();
        let read_deadline = Instant::now() + Duration::from_secs(30);
        while read
            .last()
            .is_none_or(|(offset, _, _)| *offset < MESSAGES as i64 - 1)
        {
            ensure!(
                Instant::now() < read_deadline,
                "read {} records of the compacted topic in 30 s, up to offset {:?}",
                read.len(),
                read.last().map(|r| r.0)
            );
            for record in consumer.poll(Duration::from_millis(200)).await? {
                let key = String::from_utf8_lossy(record.key.as_deref().unwrap_or_default());
                let value = record.value.as_deref().unwrap_or_default();
                let end = value.iter().position(|b| *b == b':').unwrap_or(0);
                let sent: u64 = std::str::from_utf8(&value[..end])?.parse()?;
                read.push((record.offset, key.into_owned(), sent));
            }
        }
        drop(consumer);
        ensure!(
            read.windows(2).all(|w| w[0].0 < w[1].0),
            "offsets out of order"
        );
        for (offset, _, sent) in &read {
            ensure!(
                *offset == *sent as i64,
                "offset {offset} holds message {sent}"
            );
        }
        if read.len() < MESSAGES as usize {
            let mut last = BTreeMap::new();
            for (_, key, sent) in &read {
                last.insert(key.clone(), *sent);
            }
            ensure!(
                last == latest,
                "after compaction the latest value of each key differs"
            );
            eprintln!(
                "on Kafka: a compacted zstd topic read after {attempts} tries: {} of {MESSAGES} records left, every key's latest value there",
                read.len()
            );
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "Kafka's log cleaner did not compact {TOPIC} within 120 s"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[test]
fn host_child() -> anyhow::Result<()> {
    common::child::run_if_child("SEMEL_HOST_CHILD", dedup_hosts::child_main)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semel_libraries_on_a_three_broker_kafka_cluster() -> anyhow::Result<()> {
    common::init_tracing();
    let cluster = Cluster::start()?;
    compacted_compressed_topic(&cluster).await?;
    idempotent_producer_through_leader_kills(&cluster).await?;
    for (strategy, assignor) in [
        (
            Strategy::CooperativeSticky,
            "org.apache.kafka.clients.consumer.CooperativeStickyAssignor",
        ),
        (
            Strategy::Range,
            "org.apache.kafka.clients.consumer.RangeAssignor",
        ),
    ] {
        mixed_group_through_a_coordinator_kill(&cluster, strategy, assignor).await?;
    }
    dedup_changelog_takeover(&cluster).await?;
    semel_clients_over_sasl_ssl(&cluster).await?;
    // semel-producer's transactions on Kafka (replication factor 3), read back
    // read_committed by semel-consumer.
    let summary = common::txn::semel_producer_transactions(&cluster.bootstrap, "kafka-txn").await?;
    eprintln!("on Kafka: {summary}");
    let shared = &cluster;
    tokio::task::block_in_place(|| replication_example(shared))?;
    drop(cluster);
    Ok(())
}
