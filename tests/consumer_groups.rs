//! Consumer groups on semel-broker with clients we did not write, and committed offsets:
//! - librdkafka (`kcat -G`), 3 members on a 6-partition topic for each of `range`,
//!   `roundrobin` and `cooperative-sticky`: every partition owned by exactly one member, a
//!   killed member's partitions taken over, every message consumed, and a restarted consumer
//!   resuming from the committed offsets (nothing before them read again);
//! - two groups on one topic each receive every message;
//! - kafka-python (pure Python) forming a group, for `range` and `roundrobin`;
//! - committed offsets survive `kill -9`; a zombie member's commit is refused.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::{Buf, Bytes};
use common::{
    ChildBroker, RawClient, TestBroker, TestRecord, create_topic, kcat, produce_request, python,
    record_batch, topic_name,
};
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
use kafka_protocol::messages::{
    ConsumerProtocolAssignment, DescribeGroupsRequest, GroupId, JoinGroupRequest,
    OffsetCommitRequest, OffsetFetchRequest, SyncGroupRequest,
};
use kafka_protocol::protocol::{Decodable, StrBytes};
use kafka_protocol::records::Compression;

const PARTITIONS: i32 = 6;
/// The shortest session timeout the broker allows by default (group.min.session.timeout.ms).
const SESSION_TIMEOUT_MS: u64 = 6_000;
/// Upper bound for anything that should happen within a session timeout or two; waits poll a
/// condition and end as soon as it holds.
const PATIENCE: Duration = Duration::from_secs(60);

fn s(text: &str) -> StrBytes {
    StrBytes::from_string(text.to_string())
}

async fn group_broker() -> anyhow::Result<TestBroker> {
    TestBroker::start_with(|config| {
        config.group.initial_rebalance_delay = Duration::from_millis(500);
    })
    .await
}

/// Produces `count` messages `p<partition>-<n>` (n from `first`) to each partition.
async fn produce(
    client: &mut RawClient,
    topic: &str,
    first: usize,
    count: usize,
) -> anyhow::Result<()> {
    for partition in 0..PARTITIONS {
        let records: Vec<TestRecord> = (first..first + count)
            .map(|n| {
                TestRecord::new(
                    &format!("k{n}"),
                    &format!("p{partition}-{n}"),
                    1_700_000_000_000,
                )
            })
            .collect();
        let batch = record_batch(&records, Compression::None)?;
        let response = client
            .send(9, &produce_request(topic, partition, batch, -1))
            .await?;
        let code = response.responses[0].partition_responses[0].error_code;
        ensure!(code == 0, "produce to {topic}-{partition}: error {code}");
    }
    Ok(())
}

/// The group's state and, per member, the partitions its assignment holds.
async fn assignment(
    client: &mut RawClient,
    group: &str,
) -> anyhow::Result<(String, BTreeMap<String, Vec<(String, i32)>>)> {
    let response = client
        .send(
            5,
            &DescribeGroupsRequest::default().with_groups(vec![GroupId(s(group))]),
        )
        .await?;
    let described = response.groups.first().context("no group in reply")?;
    ensure!(
        described.error_code == 0,
        "describe error {}",
        described.error_code
    );
    let mut members = BTreeMap::new();
    for member in &described.members {
        let mut bytes = member.member_assignment.clone();
        let mut owned = Vec::new();
        if bytes.remaining() >= 2 {
            let version = bytes.get_i16();
            let decoded = ConsumerProtocolAssignment::decode(&mut bytes, version.clamp(0, 3))?;
            for topic in decoded.assigned_partitions {
                for p in topic.partitions {
                    owned.push((topic.topic.to_string(), p));
                }
            }
        }
        members.insert(member.member_id.to_string(), owned);
    }
    Ok((described.group_state.to_string(), members))
}

/// Waits until the group is Stable with `members` members that together own every partition
/// of `topic` exactly once; returns how long that took.
async fn wait_for_balanced(
    client: &mut RawClient,
    group: &str,
    topic: &str,
    members: usize,
    partitions: i32,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < PATIENCE {
        let (state, owned) = assignment(client, group).await?;
        let all: Vec<&(String, i32)> = owned.values().flatten().collect();
        let distinct: BTreeSet<&(String, i32)> = all.iter().copied().collect();
        let complete = (0..partitions).all(|p| distinct.contains(&(topic.to_string(), p)));
        if state == "Stable"
            && owned.len() == members
            && all.len() == distinct.len()
            && complete
            && owned.values().all(|p| !p.is_empty())
        {
            return Ok(started.elapsed());
        }
        last = Some((state, owned));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("group {group} never balanced over {members} members; last seen {last:?}")
}

/// A `kcat -G` balanced consumer writing `partition offset value` lines to a file.
struct KcatConsumer {
    child: Child,
    output: PathBuf,
}

impl KcatConsumer {
    fn start(
        bootstrap: &str,
        group: &str,
        topic: &str,
        strategy: &str,
        output: PathBuf,
    ) -> anyhow::Result<Self> {
        let file = std::fs::File::create(&output)?;
        let session = format!("session.timeout.ms={SESSION_TIMEOUT_MS}");
        let assignor = format!("partition.assignment.strategy={strategy}");
        let child = Command::new(kcat()?)
            .args(["-b", bootstrap, "-G", group, topic, "-u", "-q"])
            .args(["-f", "%p %o %s\\n"])
            .args(["-X", &assignor, "-X", &session])
            .args([
                "-X",
                "heartbeat.interval.ms=300",
                "-X",
                "auto.commit.interval.ms=200",
            ])
            .args(["-X", "auto.offset.reset=earliest"])
            .args(["-X", "reconnect.backoff.max.ms=200"])
            // Notice added partitions quickly (the default is every 5 minutes).
            .args(["-X", "topic.metadata.refresh.interval.ms=500"])
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start kcat")?;
        Ok(Self { child, output })
    }

    /// (partition, offset, value) of everything consumed so far.
    fn consumed(&self) -> anyhow::Result<Vec<(i32, i64, String)>> {
        consumed_lines(&self.output)
    }

    /// SIGTERM: kcat commits its offsets and leaves the group.
    fn stop(mut self) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        ensure!(status.success(), "kill -TERM failed");
        self.child.wait()?;
        Ok(())
    }

    /// SIGKILL: no commit, no LeaveGroup; the broker notices only by the session timeout.
    fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for KcatConsumer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn consumed_lines(path: &Path) -> anyhow::Result<Vec<(i32, i64, String)>> {
    let text = std::fs::read_to_string(path)?;
    // kcat may be writing the last line right now: only newline-terminated lines count.
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .filter(|l| !l.is_empty())
        .map(|line| {
            let mut parts = line.splitn(3, ' ');
            let partition = parts.next().context("partition")?.parse()?;
            let offset = parts.next().context("offset")?.parse()?;
            let value = parts.next().context("value")?.to_string();
            Ok((partition, offset, value))
        })
        .collect()
}

/// Waits until the consumers together have consumed every value in `expected`.
async fn wait_for_values(
    consumers: &[&KcatConsumer],
    expected: &BTreeSet<String>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let mut seen = BTreeSet::new();
        for consumer in consumers {
            seen.extend(consumer.consumed()?.into_iter().map(|(_, _, v)| v));
        }
        let missing: Vec<&String> = expected.difference(&seen).collect();
        if missing.is_empty() {
            return Ok(());
        }
        if started.elapsed() > PATIENCE {
            bail!(
                "{} of {} messages never consumed, e.g. {:?}",
                missing.len(),
                expected.len(),
                missing.iter().take(5).collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn values(first: usize, count: usize) -> BTreeSet<String> {
    (0..PARTITIONS)
        .flat_map(|p| (first..first + count).map(move |n| format!("p{p}-{n}")))
        .collect()
}

/// Committed offset per partition of `topic` for `group` (-1: none).
async fn committed(client: &mut RawClient, group: &str, topic: &str) -> anyhow::Result<Vec<i64>> {
    let response = client
        .send(
            5,
            &OffsetFetchRequest::default()
                .with_group_id(GroupId(s(group)))
                .with_topics(Some(vec![
                    OffsetFetchRequestTopic::default()
                        .with_name(topic_name(topic))
                        .with_partition_indexes((0..PARTITIONS).collect()),
                ])),
        )
        .await?;
    ensure!(
        response.error_code == 0,
        "offset fetch error {}",
        response.error_code
    );
    let topic = response.topics.first().context("no topic")?;
    Ok(topic
        .partitions
        .iter()
        .map(|p| p.committed_offset)
        .collect())
}

async fn kcat_group_round(strategy: &str) -> anyhow::Result<()> {
    let broker = group_broker().await?;
    let bootstrap = broker.bootstrap();
    let mut client = RawClient::connect(broker.addr()).await?;
    let topic = format!("orders-{strategy}");
    let group = format!("billing-{strategy}");
    create_topic(&mut client, &topic, PARTITIONS).await?;
    produce(&mut client, &topic, 0, 50).await?;

    let dir = tempfile::tempdir()?;
    let mut consumers: Vec<KcatConsumer> = (0..3)
        .map(|i| {
            KcatConsumer::start(
                &bootstrap,
                &group,
                &topic,
                strategy,
                dir.path().join(format!("c{i}")),
            )
        })
        .collect::<anyhow::Result<_>>()?;
    wait_for_balanced(&mut client, &group, &topic, 3, PARTITIONS)
        .await
        .context("three members")?;
    wait_for_values(&consumers.iter().collect::<Vec<_>>(), &values(0, 50)).await?;

    // One member dies without leaving: the others take its partitions over once its session
    // times out.
    let victim = consumers.remove(0);
    let victim_output = victim.output.clone();
    victim.kill()?;
    let takeover = wait_for_balanced(&mut client, &group, &topic, 2, PARTITIONS)
        .await
        .context("after a member was killed")?;
    eprintln!(
        "{strategy}: the survivors owned every partition {takeover:?} after the kill (session.timeout.ms={SESSION_TIMEOUT_MS})"
    );
    produce(&mut client, &topic, 50, 50).await?;
    wait_for_values(&consumers.iter().collect::<Vec<_>>(), &values(50, 50)).await?;

    // Every message was consumed at least once by someone.
    let mut all: BTreeSet<String> = consumed_lines(&victim_output)?
        .into_iter()
        .map(|(_, _, v)| v)
        .collect();
    for consumer in &consumers {
        all.extend(consumer.consumed()?.into_iter().map(|(_, _, v)| v));
    }
    ensure!(all == values(0, 100), "not every message was consumed");

    // Clean stops commit what was consumed; the group ends up empty.
    for consumer in consumers.drain(..) {
        consumer.stop()?;
    }
    let offsets = committed(&mut client, &group, &topic).await?;
    ensure!(
        offsets == vec![100; PARTITIONS as usize],
        "committed offsets after clean stops: {offsets:?}"
    );

    // A restarted consumer resumes from the committed offsets: nothing before them again.
    produce(&mut client, &topic, 100, 10).await?;
    let resumed = KcatConsumer::start(
        &bootstrap,
        &group,
        &topic,
        strategy,
        dir.path().join("again"),
    )?;
    wait_for_values(&[&resumed], &values(100, 10)).await?;
    let reread: Vec<_> = resumed
        .consumed()?
        .into_iter()
        .filter(|(_, offset, _)| *offset < 100)
        .collect();
    ensure!(
        reread.is_empty(),
        "re-read before the committed offset: {reread:?}"
    );
    resumed.stop()?;
    broker.handle.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kcat_group_with_range_assignment() -> anyhow::Result<()> {
    kcat_group_round("range").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kcat_group_with_roundrobin_assignment() -> anyhow::Result<()> {
    kcat_group_round("roundrobin").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kcat_group_with_cooperative_sticky_assignment() -> anyhow::Result<()> {
    kcat_group_round("cooperative-sticky").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_groups_on_one_topic_each_receive_every_message() -> anyhow::Result<()> {
    let broker = group_broker().await?;
    let bootstrap = broker.bootstrap();
    let mut client = RawClient::connect(broker.addr()).await?;
    create_topic(&mut client, "shipments", PARTITIONS).await?;
    produce(&mut client, "shipments", 0, 40).await?;
    let dir = tempfile::tempdir()?;
    let a = KcatConsumer::start(
        &bootstrap,
        "warehouse",
        "shipments",
        "range",
        dir.path().join("a"),
    )?;
    let b = KcatConsumer::start(
        &bootstrap,
        "invoicing",
        "shipments",
        "range",
        dir.path().join("b"),
    )?;
    wait_for_values(&[&a], &values(0, 40)).await?;
    wait_for_values(&[&b], &values(0, 40)).await?;
    for consumer in [&a, &b] {
        let lines = consumer.consumed()?;
        ensure!(
            lines.len() == 240,
            "one consumer alone read {} lines, expected 240",
            lines.len()
        );
    }
    a.stop()?;
    b.stop()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_partitions_are_assigned_after_a_rebalance() -> anyhow::Result<()> {
    use kafka_protocol::messages::CreatePartitionsRequest;
    use kafka_protocol::messages::create_partitions_request::CreatePartitionsTopic;
    let broker = group_broker().await?;
    let bootstrap = broker.bootstrap();
    let mut client = RawClient::connect(broker.addr()).await?;
    create_topic(&mut client, "growing", 2).await?;
    let dir = tempfile::tempdir()?;
    let consumers: Vec<KcatConsumer> = (0..2)
        .map(|i| {
            KcatConsumer::start(
                &bootstrap,
                "growers",
                "growing",
                "range",
                dir.path().join(format!("g{i}")),
            )
        })
        .collect::<anyhow::Result<_>>()?;
    wait_for_balanced(&mut client, "growers", "growing", 2, 2).await?;
    let response = client
        .send(
            3,
            &CreatePartitionsRequest::default()
                .with_timeout_ms(5000)
                .with_topics(vec![
                    CreatePartitionsTopic::default()
                        .with_name(topic_name("growing"))
                        .with_count(PARTITIONS),
                ]),
        )
        .await?;
    ensure!(
        response.results[0].error_code == 0,
        "create partitions: {:?}",
        response.results[0]
    );
    let took = wait_for_balanced(&mut client, "growers", "growing", 2, PARTITIONS).await?;
    eprintln!("added partitions assigned {took:?} after CreatePartitions");
    produce(&mut client, "growing", 0, 5).await?;
    wait_for_values(&consumers.iter().collect::<Vec<_>>(), &values(0, 5)).await?;
    for consumer in consumers {
        consumer.stop()?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_python_group_shares_partitions_and_resumes_from_commits() -> anyhow::Result<()> {
    let broker = group_broker().await?;
    let mut client = RawClient::connect(broker.addr()).await?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/kafka_python_group.py");
    for strategy in ["range", "roundrobin"] {
        let topic = format!("py-{strategy}");
        create_topic(&mut client, &topic, PARTITIONS).await?;
        produce(&mut client, &topic, 0, 50).await?;
        let output = tokio::task::spawn_blocking({
            let python = python()?;
            let script = script.clone();
            let bootstrap = broker.bootstrap();
            move || {
                common::output_within(
                    Command::new(python)
                        .arg(script)
                        .args([&bootstrap, &topic, strategy]),
                    Duration::from_secs(300),
                    &format!("kafka-python group ({strategy})"),
                )
            }
        })
        .await??;
        ensure!(
            output.status.success(),
            "kafka-python group ({strategy}) failed:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

fn join_request(member_id: &str) -> JoinGroupRequest {
    JoinGroupRequest::default()
        .with_group_id(GroupId(s("ledger")))
        .with_session_timeout_ms(10_000)
        .with_rebalance_timeout_ms(10_000)
        .with_member_id(s(member_id))
        .with_protocol_type(s("consumer"))
        .with_protocols(vec![
            JoinGroupRequestProtocol::default()
                .with_name(s("range"))
                .with_metadata(Bytes::from_static(b"\0\0\0\0\0\0\0\0\0\0")),
        ])
}

fn commit_request(member_id: &str, generation: i32, offset: i64) -> OffsetCommitRequest {
    OffsetCommitRequest::default()
        .with_group_id(GroupId(s("ledger")))
        .with_generation_id_or_member_epoch(generation)
        .with_member_id(s(member_id))
        .with_topics(vec![
            OffsetCommitRequestTopic::default()
                .with_name(topic_name("payments"))
                .with_partitions(
                    (0..3)
                        .map(|p| {
                            OffsetCommitRequestPartition::default()
                                .with_partition_index(p)
                                .with_committed_offset(offset + i64::from(p))
                                .with_committed_metadata(Some(s(&format!("meta-{p}"))))
                        })
                        .collect(),
                ),
        ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_offsets_survive_kill_9_and_zombie_commits_are_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = ChildBroker::spawn(dir.path(), &["--group-initial-rebalance-delay-ms", "0"])?;
    let mut client = RawClient::connect(broker.addr).await?;
    create_topic(&mut client, "payments", 3).await?;

    // Join (v5: first MEMBER_ID_REQUIRED, then with the id), sync, commit.
    let first = client.send(5, &join_request("")).await?;
    ensure!(
        first.error_code == 79,
        "expected MEMBER_ID_REQUIRED, got {}",
        first.error_code
    );
    let member = first.member_id.to_string();
    let joined = client.send(5, &join_request(&member)).await?;
    ensure!(joined.error_code == 0, "join: {}", joined.error_code);
    let generation = joined.generation_id;
    let synced = client
        .send(
            3,
            &SyncGroupRequest::default()
                .with_group_id(GroupId(s("ledger")))
                .with_generation_id(generation)
                .with_member_id(s(&member)),
        )
        .await?;
    ensure!(synced.error_code == 0, "sync: {}", synced.error_code);
    let response = client
        .send(7, &commit_request(&member, generation, 10))
        .await?;
    for p in &response.topics[0].partitions {
        ensure!(
            p.error_code == 0,
            "commit partition {}: {}",
            p.partition_index,
            p.error_code
        );
    }
    // A zombie from an older generation is refused, and nothing it sent is kept.
    let zombie = client
        .send(7, &commit_request(&member, generation - 1, 999))
        .await?;
    ensure!(
        zombie.topics[0]
            .partitions
            .iter()
            .all(|p| p.error_code == 22),
        "expected ILLEGAL_GENERATION, got {:?}",
        zombie.topics[0].partitions
    );
    let unknown = client
        .send(7, &commit_request("someone-else", generation, 999))
        .await?;
    ensure!(
        unknown.topics[0]
            .partitions
            .iter()
            .all(|p| p.error_code == 25),
        "expected UNKNOWN_MEMBER_ID, got {:?}",
        unknown.topics[0].partitions
    );
    drop(client);
    broker.kill9()?;

    let broker = ChildBroker::spawn(dir.path(), &[])?;
    let mut client = RawClient::connect(broker.addr).await?;
    let response = client
        .send(
            8,
            &OffsetFetchRequest::default().with_groups(vec![
                kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestGroup::default()
                    .with_group_id(GroupId(s("ledger")))
                    .with_topics(None),
            ]),
        )
        .await?;
    let group = response.groups.first().context("no group")?;
    ensure!(group.error_code == 0);
    let topic = group
        .topics
        .first()
        .context("no committed topic after restart")?;
    let got: Vec<(i32, i64, String)> = topic
        .partitions
        .iter()
        .map(|p| {
            (
                p.partition_index,
                p.committed_offset,
                p.metadata
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
            )
        })
        .collect();
    ensure!(
        got == vec![
            (0, 10, "meta-0".to_string()),
            (1, 11, "meta-1".to_string()),
            (2, 12, "meta-2".to_string())
        ],
        "after kill -9: {got:?}"
    );
    Ok(())
}

/// A clock the test moves by hand.
#[derive(Debug)]
struct ManualClock(std::sync::atomic::AtomicI64);

impl semel::broker::clock::Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

async fn standalone_commit(client: &mut RawClient, group: &str, offset: i64) -> anyhow::Result<()> {
    let request = commit_request("", -1, offset).with_group_id(GroupId(s(group)));
    let response = client.send(7, &request).await?;
    ensure!(
        response.topics[0]
            .partitions
            .iter()
            .all(|p| p.error_code == 0),
        "standalone commit for {group}: {:?}",
        response.topics[0].partitions
    );
    Ok(())
}

async fn committed_payments(client: &mut RawClient, group: &str) -> anyhow::Result<Vec<i64>> {
    let response = client
        .send(
            5,
            &OffsetFetchRequest::default()
                .with_group_id(GroupId(s(group)))
                .with_topics(Some(vec![
                    OffsetFetchRequestTopic::default()
                        .with_name(topic_name("payments"))
                        .with_partition_indexes(vec![0, 1, 2]),
                ])),
        )
        .await?;
    Ok(response.topics[0]
        .partitions
        .iter()
        .map(|p| p.committed_offset)
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_groups_offsets_expire_after_retention_and_groups_can_be_deleted()
-> anyhow::Result<()> {
    use kafka_protocol::messages::{DeleteGroupsRequest, ListGroupsRequest};
    use std::sync::atomic::{AtomicI64, Ordering};
    let start = 1_800_000_000_000;
    let clock = std::sync::Arc::new(ManualClock(AtomicI64::new(start)));
    let dir = tempfile::tempdir()?;
    let broker = semel::broker::Broker::start_with_clock(
        semel::broker::BrokerConfig {
            listen: "127.0.0.1:0".parse()?,
            data_dir: dir.path().to_path_buf(),
            group: semel::broker::GroupConfig {
                offsets_retention: Duration::from_secs(60),
                ..semel::broker::GroupConfig::default()
            },
            ..semel::broker::BrokerConfig::default()
        },
        clock.clone(),
    )
    .await?;
    let mut client = RawClient::connect(broker.local_addr()).await?;
    create_topic(&mut client, "payments", 3).await?;
    standalone_commit(&mut client, "old", 5).await?;
    clock.0.store(start + 61_000, Ordering::SeqCst);
    standalone_commit(&mut client, "fresh", 7).await?;

    // The coordinator's timer notices within a tick or two of real time.
    let started = Instant::now();
    while committed_payments(&mut client, "old").await? != vec![-1, -1, -1] {
        ensure!(started.elapsed() < PATIENCE, "old offsets never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(committed_payments(&mut client, "fresh").await? == vec![7, 8, 9]);
    let listed = client.send(4, &ListGroupsRequest::default()).await?;
    let names: Vec<String> = listed
        .groups
        .iter()
        .map(|g| g.group_id.to_string())
        .collect();
    ensure!(names == vec!["fresh".to_string()], "listed {names:?}");

    let deleted = client
        .send(
            2,
            &DeleteGroupsRequest::default()
                .with_groups_names(vec![GroupId(s("fresh")), GroupId(s("never-was"))]),
        )
        .await?;
    let codes: Vec<i16> = deleted.results.iter().map(|r| r.error_code).collect();
    ensure!(
        codes == vec![0, 69],
        "delete groups: {codes:?} (expected NONE, GROUP_ID_NOT_FOUND)"
    );
    ensure!(committed_payments(&mut client, "fresh").await? == vec![-1, -1, -1]);
    broker.shutdown().await;
    Ok(())
}

/// Deleting a topic deletes every group's committed offsets for it, as Kafka does: a topic
/// created again under the same name starts with no committed offsets, so a group reads it
/// from `auto.offset.reset` instead of skipping to where the old topic's offsets were (found
/// with Kafka's `kafka-consumer-groups` against semel-broker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_topic_deletes_its_committed_offsets() -> anyhow::Result<()> {
    use kafka_protocol::messages::DeleteTopicsRequest;
    let broker = TestBroker::start().await?;
    let mut client = RawClient::connect(broker.addr()).await?;
    common::create_topic(&mut client, "payments", 3).await?;
    common::create_topic(&mut client, "kept", 1).await?;
    standalone_commit(&mut client, "ledger", 4).await?;
    standalone_commit(&mut client, "audit", 7).await?;
    let kept = OffsetCommitRequest::default()
        .with_group_id(GroupId(s("audit")))
        .with_generation_id_or_member_epoch(-1)
        .with_topics(vec![
            OffsetCommitRequestTopic::default()
                .with_name(topic_name("kept"))
                .with_partitions(vec![
                    OffsetCommitRequestPartition::default()
                        .with_partition_index(0)
                        .with_committed_offset(9),
                ]),
        ]);
    client.send(7, &kept).await?;
    ensure!(committed_payments(&mut client, "ledger").await? == vec![4, 5, 6]);

    let deleted = client
        .send(
            4,
            &DeleteTopicsRequest::default()
                .with_topic_names(vec![topic_name("payments")])
                .with_timeout_ms(10_000),
        )
        .await?;
    ensure!(deleted.responses[0].error_code == 0, "{deleted:?}");
    common::create_topic(&mut client, "payments", 3).await?;
    for group in ["ledger", "audit"] {
        let offsets = committed_payments(&mut client, group).await?;
        ensure!(
            offsets == vec![-1, -1, -1],
            "{group}: offsets of the deleted topic are still committed: {offsets:?}"
        );
    }
    // Other topics' offsets stay.
    let response = client
        .send(
            5,
            &OffsetFetchRequest::default()
                .with_group_id(GroupId(s("audit")))
                .with_topics(Some(vec![
                    OffsetFetchRequestTopic::default()
                        .with_name(topic_name("kept"))
                        .with_partition_indexes(vec![0]),
                ])),
        )
        .await?;
    ensure!(response.topics[0].partitions[0].committed_offset == 9);
    broker.handle.shutdown().await;
    Ok(())
}
