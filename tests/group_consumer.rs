//! semel-consumer against semel-broker, and in one group with librdkafka (`kcat -G`):
//! - semel and librdkafka members in the same group, for cooperative-sticky (a semel leader)
//!   and range (a librdkafka leader): one member of each kind killed, every partition covered
//!   again, every message consumed, and no partition consumed by two members at once
//!   (checked from the timeline of what each member consumed);
//! - partitions added to a subscribed topic and a changed subscription trigger rebalances;
//! - offsets resume after a restart; `auto.offset.reset` earliest, latest and none, and
//!   out-of-range positions, behave like Kafka's;
//! - a member that stops polling for `max.poll.interval.ms` leaves and is told its partitions
//!   were lost; pause/resume, seek, async commits and the Stream.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Buf;
use common::proxy::{FaultPlan, FaultProxy};
use common::{
    RawClient, TestBroker, TestRecord, create_topic, kcat, produce_request, record_batch,
};
use futures::StreamExt;
use kafka_protocol::messages::{ConsumerProtocolAssignment, DescribeGroupsRequest, GroupId};
use kafka_protocol::protocol::{Decodable, StrBytes};
use kafka_protocol::records::Compression;
use semel::consumer::{
    AutoOffsetReset, Consumer, ConsumerConfig, ConsumerError, RebalanceContext, RebalanceListener,
    Strategy, TopicPartition,
};

const PATIENCE: Duration = Duration::from_secs(60);
const SESSION_TIMEOUT: Duration = Duration::from_secs(6);

async fn group_broker() -> anyhow::Result<TestBroker> {
    TestBroker::start_with(|config| {
        config.group.initial_rebalance_delay = Duration::from_millis(300);
    })
    .await
}

fn config(bootstrap: &str, group: &str, strategy: Strategy) -> ConsumerConfig {
    ConsumerConfig {
        bootstrap_servers: vec![bootstrap.to_string()],
        group_id: Some(group.to_string()),
        auto_offset_reset: AutoOffsetReset::Earliest,
        session_timeout: SESSION_TIMEOUT,
        heartbeat_interval: Duration::from_millis(300),
        max_poll_interval: Duration::from_secs(20),
        fetch_max_wait: Duration::from_millis(100),
        metadata_max_age: Duration::from_millis(500),
        partition_assignment_strategy: vec![strategy],
        ..ConsumerConfig::default()
    }
}

/// Produces `count` messages `p<partition>-<n>` (n from `first`) to each of `partitions`.
async fn produce(
    client: &mut RawClient,
    topic: &str,
    partitions: i32,
    first: usize,
    count: usize,
) -> anyhow::Result<()> {
    for partition in 0..partitions {
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

fn expected_values(partitions: i32, first: usize, count: usize) -> BTreeSet<String> {
    (0..partitions)
        .flat_map(|p| (first..first + count).map(move |n| format!("p{p}-{n}")))
        .collect()
}

/// One consumption event: when, by whom, what.
#[derive(Debug, Clone)]
struct Event {
    at: Instant,
    member: String,
    partition: i32,
    offset: i64,
    value: String,
}

type Timeline = Arc<Mutex<Vec<Event>>>;

fn text(bytes: Option<&bytes::Bytes>) -> String {
    String::from_utf8_lossy(bytes.map(|b| b.as_ref()).unwrap_or_default()).into_owned()
}

/// A semel group member on its own task, recording every record into `timeline` and
/// committing after each poll. Aborting the task is a crash: no commit, no LeaveGroup.
fn spawn_semel(
    name: &str,
    config: ConsumerConfig,
    topic: &str,
    timeline: Timeline,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let name = name.to_string();
    let topic = topic.to_string();
    tokio::spawn(async move {
        let mut consumer = Consumer::connect(config).await?;
        // What a manual-commit application does (Java's commitSync in onPartitionsRevoked):
        // the commit after a poll can fail while the group rebalances, and a clean hand-over
        // reads nothing twice only if the revoked partitions' positions are committed before
        // they move.
        consumer.set_rebalance_listener(CommitOnRevoke);
        consumer.subscribe([topic])?;
        loop {
            let records = consumer.poll(Duration::from_millis(200)).await?;
            let now = Instant::now();
            {
                let mut timeline = timeline.lock().expect("timeline");
                for r in &records {
                    timeline.push(Event {
                        at: now,
                        member: name.clone(),
                        partition: r.partition,
                        offset: r.offset,
                        value: text(r.value.as_ref()),
                    });
                }
            }
            if !records.is_empty() {
                match consumer.commit().await {
                    Ok(()) => {}
                    Err(ConsumerError::CommitFailed(why)) => {
                        eprintln!(
                            "{name}: commit after a poll failed ({why}); the revocation commits"
                        );
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
    })
}

/// Commits the positions of revoked partitions.
struct CommitOnRevoke;

impl RebalanceListener for CommitOnRevoke {
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
    }
}

/// A `kcat -G` member whose output lines are stamped as they arrive.
struct KcatMember {
    child: Child,
}

impl KcatMember {
    fn start(
        name: &str,
        bootstrap: &str,
        group: &str,
        topic: &str,
        strategy: &str,
        timeline: Timeline,
    ) -> anyhow::Result<Self> {
        let mut child = Command::new(kcat()?)
            .args(["-b", bootstrap, "-G", group, topic, "-u", "-q"])
            .args(["-f", "%p %o %s\\n"])
            .args(["-X", &format!("partition.assignment.strategy={strategy}")])
            .args([
                "-X",
                &format!("session.timeout.ms={}", SESSION_TIMEOUT.as_millis()),
            ])
            .args(["-X", "heartbeat.interval.ms=300"])
            .args(["-X", "auto.commit.interval.ms=200"])
            .args(["-X", "auto.offset.reset=earliest"])
            .args(["-X", "reconnect.backoff.max.ms=200"])
            .args(["-X", "topic.metadata.refresh.interval.ms=500"])
            .stdout(Stdio::piped())
            .args(
                std::env::var("KCAT_DEBUG")
                    .map(|d| vec!["-d".to_string(), d])
                    .unwrap_or_default(),
            )
            .stderr(std::env::var("KCAT_DEBUG").map_or(Stdio::null(), |_| Stdio::inherit()))
            .spawn()
            .context("cannot start kcat")?;
        let stdout = child.stdout.take().context("kcat stdout")?;
        let name = name.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let mut parts = line.splitn(3, ' ');
                let (Some(p), Some(o), Some(v)) = (parts.next(), parts.next(), parts.next()) else {
                    continue;
                };
                let (Ok(partition), Ok(offset)) = (p.parse(), o.parse()) else {
                    continue;
                };
                timeline.lock().expect("timeline").push(Event {
                    at: Instant::now(),
                    member: name.clone(),
                    partition,
                    offset,
                    value: v.to_string(),
                });
            }
        });
        Ok(Self { child })
    }

    fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for KcatMember {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The group's state and each member's partitions, from DescribeGroups.
async fn describe(
    client: &mut RawClient,
    group: &str,
) -> anyhow::Result<(String, BTreeMap<String, Vec<i32>>)> {
    let response = client
        .send(
            5,
            &DescribeGroupsRequest::default()
                .with_groups(vec![GroupId(StrBytes::from_string(group.to_string()))]),
        )
        .await?;
    let described = response.groups.first().context("no group")?;
    let mut members = BTreeMap::new();
    for member in &described.members {
        let mut bytes = member.member_assignment.clone();
        let mut owned = Vec::new();
        if bytes.remaining() >= 2 {
            let version = bytes.get_i16();
            let decoded = ConsumerProtocolAssignment::decode(&mut bytes, version.clamp(0, 3))?;
            for topic in decoded.assigned_partitions {
                owned.extend(topic.partitions);
            }
        }
        members.insert(member.member_id.to_string(), owned);
    }
    Ok((described.group_state.to_string(), members))
}

/// Waits for a Stable group of `members` members that own every partition exactly once.
async fn wait_balanced(
    client: &mut RawClient,
    group: &str,
    members: usize,
    partitions: i32,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < PATIENCE {
        let (state, owned) = describe(client, group).await?;
        let mut all: Vec<i32> = owned.values().flatten().copied().collect();
        all.sort_unstable();
        if state == "Stable"
            && owned.len() == members
            && all == (0..partitions).collect::<Vec<_>>()
            && owned.values().all(|p| !p.is_empty())
        {
            return Ok(started.elapsed());
        }
        last = Some((state, owned));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("group {group} never balanced over {members} members; last seen {last:?}")
}

async fn wait_consumed(timeline: &Timeline, expected: &BTreeSet<String>) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let seen: BTreeSet<String> = timeline
            .lock()
            .expect("timeline")
            .iter()
            .map(|e| e.value.clone())
            .collect();
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

/// No partition consumed by two members at once: ordered by time, a partition's events
/// change hands only when the group rebalanced. Two members reading one partition
/// concurrently would interleave their events (hundreds of switches with a steady producer);
/// each rebalance can move a partition once.
fn check_exclusive(timeline: &[Event], rebalances: usize) -> anyhow::Result<BTreeMap<i32, usize>> {
    let mut events = timeline.to_vec();
    events.sort_by_key(|e| e.at);
    let mut switches: BTreeMap<i32, usize> = BTreeMap::new();
    let mut owner: BTreeMap<i32, String> = BTreeMap::new();
    for e in &events {
        let previous = owner.insert(e.partition, e.member.clone());
        if previous.is_some_and(|p| p != e.member) {
            *switches.entry(e.partition).or_default() += 1;
        }
    }
    // Redelivered records (the uncommitted tail of a crashed member) are expected; count them.
    let mut reads: BTreeMap<(i32, i64), Vec<&str>> = BTreeMap::new();
    for e in &events {
        reads
            .entry((e.partition, e.offset))
            .or_default()
            .push(&e.member);
    }
    let mut again: BTreeMap<String, usize> = BTreeMap::new();
    for readers in reads.values().filter(|r| r.len() > 1) {
        *again.entry(readers.join(" then ")).or_default() += 1;
    }
    eprintln!("records read more than once, by readers: {again:?}");
    // Only a crashed member's uncommitted tail is read again: a clean hand-over (revocation,
    // commit, then the new owner) reads nothing twice.
    for readers in again.keys() {
        ensure!(
            readers.starts_with("kcat-1 ") || readers.starts_with("semel-2 "),
            "records read twice without a crash in between: {readers}"
        );
    }
    for (partition, count) in &switches {
        ensure!(
            *count <= rebalances,
            "partition {partition} changed hands {count} times over {rebalances} rebalances: \
             two members consumed it at once"
        );
    }
    Ok(switches)
}

/// Semel and librdkafka members in one group: every partition covered after each join and
/// each kill, every message consumed, no partition read by two members at once.
async fn mixed_group(strategy: Strategy, kcat_leads: bool) -> anyhow::Result<()> {
    const PARTITIONS: i32 = 6;
    let broker = group_broker().await?;
    let bootstrap = broker.bootstrap();
    let mut admin = RawClient::connect(broker.addr()).await?;
    let topic = "mixed";
    let group = format!("mixed-{}", strategy.name());
    create_topic(&mut admin, topic, PARTITIONS).await?;

    // A steady producer: 5 messages per partition every 50 ms, until told to stop.
    let produced = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producer = {
        let (produced, stop, addr) = (Arc::clone(&produced), Arc::clone(&stop), broker.addr());
        tokio::spawn(async move {
            let mut client = RawClient::connect(addr).await?;
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                produce(&mut client, topic, PARTITIONS, n, 5).await?;
                n += 5;
                produced.store(n, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::Ok(())
        })
    };

    let timeline: Timeline = Arc::default();
    let mut rebalances = 0;
    let cfg = || config(&bootstrap, &group, strategy);
    let spawn_kcat = |name: &str| {
        KcatMember::start(
            name,
            &bootstrap,
            &group,
            topic,
            strategy.name(),
            Arc::clone(&timeline),
        )
    };
    let mut kcat1;
    let semel1;
    if kcat_leads {
        kcat1 = spawn_kcat("kcat-1")?;
        wait_balanced(&mut admin, &group, 1, PARTITIONS).await?;
        semel1 = spawn_semel("semel-1", cfg(), topic, Arc::clone(&timeline));
    } else {
        semel1 = spawn_semel("semel-1", cfg(), topic, Arc::clone(&timeline));
        wait_balanced(&mut admin, &group, 1, PARTITIONS).await?;
        kcat1 = spawn_kcat("kcat-1")?;
    }
    rebalances += 1;
    wait_balanced(&mut admin, &group, 2, PARTITIONS).await?;
    rebalances += 1;
    let semel2 = spawn_semel("semel-2", cfg(), topic, Arc::clone(&timeline));
    wait_balanced(&mut admin, &group, 3, PARTITIONS).await?;
    rebalances += 1;
    let _kcat2 = spawn_kcat("kcat-2")?;
    wait_balanced(&mut admin, &group, 4, PARTITIONS).await?;
    rebalances += 1;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Crash one member of each kind: kill -9 for librdkafka, an aborted task for semel (no
    // commit, no LeaveGroup: the coordinator finds out by the session timeout).
    kcat1.kill()?;
    let took = wait_balanced(&mut admin, &group, 3, PARTITIONS).await?;
    eprintln!(
        "{}: kcat member killed, partitions covered again after {took:?}",
        strategy.name()
    );
    rebalances += 1;
    semel2.abort();
    let took = wait_balanced(&mut admin, &group, 2, PARTITIONS).await?;
    eprintln!(
        "{}: semel member crashed, partitions covered again after {took:?}",
        strategy.name()
    );
    rebalances += 1;
    tokio::time::sleep(Duration::from_millis(500)).await;

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    producer.await??;
    let total = produced.load(std::sync::atomic::Ordering::SeqCst);
    wait_consumed(&timeline, &expected_values(PARTITIONS, 0, total)).await?;
    ensure!(!semel1.is_finished(), "semel-1 stopped: {:?}", semel1.await);
    semel1.abort();

    let events = timeline.lock().expect("timeline").clone();
    let switches = check_exclusive(&events, rebalances)?;
    let members: BTreeSet<&str> = events.iter().map(|e| e.member.as_str()).collect();
    ensure!(
        members.len() == 4,
        "every member consumed something; only {members:?} did"
    );
    eprintln!(
        "{}: {} messages, {} events, hand-overs per partition {switches:?}",
        strategy.name(),
        total * PARTITIONS as usize,
        events.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semel_and_librdkafka_share_a_cooperative_sticky_group() -> anyhow::Result<()> {
    mixed_group(Strategy::CooperativeSticky, false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semel_and_librdkafka_share_a_range_group_led_by_librdkafka() -> anyhow::Result<()> {
    mixed_group(Strategy::Range, true).await
}

/// Records what the listener saw.
#[derive(Debug, Default, Clone)]
struct Calls(Arc<Mutex<Vec<Call>>>);

/// A listener call: its kind and partitions.
type Call = (String, BTreeSet<TopicPartition>);

impl RebalanceListener for Calls {
    fn on_partitions_revoked(
        &mut self,
        _ctx: &mut RebalanceContext<'_>,
        partitions: &BTreeSet<TopicPartition>,
    ) {
        self.0
            .lock()
            .expect("calls")
            .push(("revoked".into(), partitions.clone()));
    }

    fn on_partitions_assigned(
        &mut self,
        _ctx: &mut RebalanceContext<'_>,
        partitions: &BTreeSet<TopicPartition>,
    ) {
        self.0
            .lock()
            .expect("calls")
            .push(("assigned".into(), partitions.clone()));
    }

    fn on_partitions_lost(
        &mut self,
        _ctx: &mut RebalanceContext<'_>,
        partitions: &BTreeSet<TopicPartition>,
    ) {
        self.0
            .lock()
            .expect("calls")
            .push(("lost".into(), partitions.clone()));
    }
}

/// Polls `consumer` until `done` holds, collecting records.
async fn poll_until(
    consumer: &mut Consumer,
    mut done: impl FnMut(&Consumer, &[semel::consumer::ConsumerRecord]) -> bool,
) -> anyhow::Result<Vec<semel::consumer::ConsumerRecord>> {
    let started = Instant::now();
    let mut out = Vec::new();
    while !done(consumer, &out) {
        ensure!(
            started.elapsed() < PATIENCE,
            "gave up; have {} records",
            out.len()
        );
        out.extend(consumer.poll(Duration::from_millis(100)).await?);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_partitions_and_a_changed_subscription_trigger_rebalances() -> anyhow::Result<()> {
    let broker = group_broker().await?;
    let bootstrap = broker.bootstrap();
    let mut admin = RawClient::connect(broker.addr()).await?;
    create_topic(&mut admin, "grow", 2).await?;
    create_topic(&mut admin, "extra", 2).await?;
    let mut a = Consumer::connect(config(&bootstrap, "grow", Strategy::CooperativeSticky)).await?;
    let mut b = Consumer::connect(config(&bootstrap, "grow", Strategy::CooperativeSticky)).await?;
    a.subscribe(["grow"])?;
    b.subscribe(["grow"])?;
    let calls = Calls::default();
    a.set_rebalance_listener(calls.clone());
    // Poll both until they share the two partitions.
    let started = Instant::now();
    while a.assignment().len() + b.assignment().len() != 2
        || a.assignment().is_empty()
        || b.assignment().is_empty()
    {
        ensure!(
            started.elapsed() < PATIENCE,
            "never balanced: {:?} {:?}",
            a.assignment(),
            b.assignment()
        );
        a.poll(Duration::from_millis(50)).await?;
        b.poll(Duration::from_millis(50)).await?;
    }

    // Seed trigger 2: partitions added to a subscribed topic.
    let request = kafka_protocol::messages::CreatePartitionsRequest::default()
        .with_timeout_ms(5_000)
        .with_topics(vec![
            kafka_protocol::messages::create_partitions_request::CreatePartitionsTopic::default()
                .with_name(common::topic_name("grow"))
                .with_count(5),
        ]);
    let response = admin.send(3, &request).await?;
    ensure!(
        response.results[0].error_code == 0,
        "create partitions: {:?}",
        response.results
    );
    produce(&mut admin, "grow", 5, 0, 3).await?;
    let added_at = Instant::now();
    let mut seen = BTreeSet::new();
    while seen.len() < 15 {
        ensure!(
            started.elapsed() < PATIENCE,
            "only {} of 15 consumed: {seen:?}",
            seen.len()
        );
        for c in [&mut a, &mut b] {
            for r in c.poll(Duration::from_millis(50)).await? {
                seen.insert(text(r.value.as_ref()));
            }
        }
    }
    let union: BTreeSet<TopicPartition> = a.assignment().union(&b.assignment()).cloned().collect();
    ensure!(union.len() == 5, "all five partitions assigned: {union:?}");
    ensure!(a.assignment().is_disjoint(&b.assignment()));
    eprintln!(
        "added partitions consumed {:?} after CreatePartitions",
        added_at.elapsed()
    );
    ensure!(
        calls
            .0
            .lock()
            .expect("calls")
            .iter()
            .any(|(kind, tps)| kind == "assigned" && tps.iter().any(|(_, p)| *p >= 2))
            || b.assignment().iter().any(|(_, p)| *p >= 2),
        "an added partition was announced to a listener or held by b"
    );

    // Trigger 3: a subscription change.
    a.subscribe(["grow", "extra"])?;
    b.subscribe(["grow", "extra"])?;
    let started = Instant::now();
    loop {
        a.poll(Duration::from_millis(50)).await?;
        b.poll(Duration::from_millis(50)).await?;
        let union: BTreeSet<TopicPartition> =
            a.assignment().union(&b.assignment()).cloned().collect();
        if union.len() == 7 && a.assignment().is_disjoint(&b.assignment()) {
            break;
        }
        ensure!(
            started.elapsed() < PATIENCE,
            "subscription change never rebalanced: {union:?}"
        );
    }
    // Cooperative: nobody was told to revoke what it kept.
    let calls = calls.0.lock().expect("calls").clone();
    ensure!(
        !calls.iter().any(|(kind, _)| kind == "lost"),
        "nothing was lost: {calls:?}"
    );
    a.close().await?;
    b.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_resume_after_a_restart_and_reset_policies_behave_like_kafka() -> anyhow::Result<()>
{
    let broker = group_broker().await?;
    let bootstrap = broker.bootstrap();
    let mut admin = RawClient::connect(broker.addr()).await?;
    create_topic(&mut admin, "resume", 1).await?;
    produce(&mut admin, "resume", 1, 0, 10).await?;

    // earliest: a new group starts at the log start, commits, leaves.
    let mut first = Consumer::connect(config(&bootstrap, "g1", Strategy::Range)).await?;
    first.subscribe(["resume"])?;
    let got = poll_until(&mut first, |_, r| r.len() >= 10).await?;
    ensure!(got.iter().map(|r| r.offset).collect::<Vec<_>>() == (0..10).collect::<Vec<_>>());
    first.commit().await?;
    first.close().await?;

    // A restarted member resumes at the commit: only the newer records.
    produce(&mut admin, "resume", 1, 10, 5).await?;
    let mut again = Consumer::connect(config(&bootstrap, "g1", Strategy::Range)).await?;
    again.subscribe(["resume"])?;
    let got = poll_until(&mut again, |_, r| r.len() >= 5).await?;
    ensure!(
        got.iter().map(|r| r.offset).collect::<Vec<_>>() == (10..15).collect::<Vec<_>>(),
        "resumed at {:?}",
        got.first().map(|r| r.offset)
    );
    let committed = again.committed(&[("resume".to_string(), 0)].into()).await?;
    ensure!(committed.get(&("resume".to_string(), 0)) == Some(&10));
    again.close().await?; // no auto-commit: the commit stays at 10
    let mut third = Consumer::connect(config(&bootstrap, "g1", Strategy::Range)).await?;
    third.subscribe(["resume"])?;
    let got = poll_until(&mut third, |_, r| r.len() >= 5).await?;
    ensure!(
        got[0].offset == 10,
        "nothing committed past 10, so 10 comes again"
    );
    third.close().await?;

    // latest: a new group sees only what is written after it joined.
    let mut latest = Consumer::connect(ConsumerConfig {
        auto_offset_reset: AutoOffsetReset::Latest,
        ..config(&bootstrap, "g2", Strategy::Range)
    })
    .await?;
    latest.subscribe(["resume"])?;
    poll_until(&mut latest, |c, _| {
        c.position(&("resume".to_string(), 0)).is_some()
    })
    .await?;
    ensure!(latest.position(&("resume".to_string(), 0)) == Some(15));
    produce(&mut admin, "resume", 1, 15, 2).await?;
    let got = poll_until(&mut latest, |_, r| r.len() >= 2).await?;
    ensure!(got.iter().map(|r| r.offset).collect::<Vec<_>>() == vec![15, 16]);
    latest.close().await?;

    // none: no committed offset is an error, not a guess.
    let mut none = Consumer::connect(ConsumerConfig {
        auto_offset_reset: AutoOffsetReset::None,
        ..config(&bootstrap, "g3", Strategy::Range)
    })
    .await?;
    none.subscribe(["resume"])?;
    let started = Instant::now();
    let error = loop {
        match none.poll(Duration::from_millis(100)).await {
            Err(e) => break e,
            Ok(_) => ensure!(
                started.elapsed() < PATIENCE,
                "auto.offset.reset=none never failed"
            ),
        }
    };
    ensure!(matches!(error, ConsumerError::NoOffset(_)), "{error}");
    drop(none);

    // Out of range: a position past the end resets by the policy (earliest here)...
    let mut manual = Consumer::connect(ConsumerConfig {
        group_id: None,
        ..config(&bootstrap, "unused", Strategy::Range)
    })
    .await?;
    manual.assign([("resume".to_string(), 0)])?;
    poll_until(&mut manual, |c, _| {
        c.position(&("resume".to_string(), 0)).is_some()
    })
    .await?;
    manual.seek(&("resume".to_string(), 0), 1_000)?;
    let got = poll_until(&mut manual, |_, r| !r.is_empty()).await?;
    ensure!(
        got[0].offset == 0,
        "reset to earliest after out of range, got {}",
        got[0].offset
    );
    // ... or fails with auto.offset.reset=none.
    let mut strict = Consumer::connect(ConsumerConfig {
        group_id: None,
        auto_offset_reset: AutoOffsetReset::None,
        ..config(&bootstrap, "unused", Strategy::Range)
    })
    .await?;
    strict.assign([("resume".to_string(), 0)])?;
    strict.seek(&("resume".to_string(), 0), 1_000)?;
    let started = Instant::now();
    let error = loop {
        match strict.poll(Duration::from_millis(100)).await {
            Err(e) => break e,
            Ok(_) => ensure!(started.elapsed() < PATIENCE, "out of range never reported"),
        }
    };
    ensure!(
        matches!(error, ConsumerError::OffsetOutOfRange { offset: 1_000, .. }),
        "{error}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_stops_polling_leaves_and_is_told_its_partitions_were_lost()
-> anyhow::Result<()> {
    let broker = group_broker().await?;
    let bootstrap = broker.bootstrap();
    let mut admin = RawClient::connect(broker.addr()).await?;
    create_topic(&mut admin, "slow", 2).await?;
    let quick = |group: &str| ConsumerConfig {
        max_poll_interval: Duration::from_secs(2),
        ..config(&bootstrap, group, Strategy::Range)
    };
    let mut slow = Consumer::connect(quick("slow")).await?;
    let mut busy = Consumer::connect(quick("slow")).await?;
    let calls = Calls::default();
    slow.set_rebalance_listener(calls.clone());
    slow.subscribe(["slow"])?;
    busy.subscribe(["slow"])?;
    let started = Instant::now();
    while slow.assignment().len() != 1 || busy.assignment().len() != 1 {
        ensure!(started.elapsed() < PATIENCE, "never balanced");
        slow.poll(Duration::from_millis(50)).await?;
        busy.poll(Duration::from_millis(50)).await?;
    }
    // `slow` stops polling; its heartbeat task leaves after max.poll.interval.ms, and `busy`
    // gets both partitions.
    let stalled = Instant::now();
    while busy.assignment().len() != 2 {
        ensure!(
            started.elapsed() < PATIENCE,
            "the stalled member kept its partition"
        );
        busy.poll(Duration::from_millis(100)).await?;
    }
    let took = stalled.elapsed();
    ensure!(
        took >= Duration::from_secs(2),
        "partition moved before max.poll.interval.ms: {took:?}"
    );
    // Back from its stall, `slow` learns it lost its partition, then rejoins.
    while slow.assignment().len() != 1 || busy.assignment().len() != 1 {
        ensure!(
            started.elapsed() < PATIENCE,
            "the stalled member never rejoined"
        );
        slow.poll(Duration::from_millis(50)).await?;
        busy.poll(Duration::from_millis(50)).await?;
    }
    let calls = calls.0.lock().expect("calls").clone();
    let kinds: Vec<&str> = calls.iter().map(|(k, _)| k.as_str()).collect();
    ensure!(
        kinds.contains(&"lost"),
        "on_partitions_lost was called: {kinds:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_seek_async_commit_and_the_stream() -> anyhow::Result<()> {
    let broker = group_broker().await?;
    let bootstrap = broker.bootstrap();
    let mut admin = RawClient::connect(broker.addr()).await?;
    create_topic(&mut admin, "ops", 2).await?;
    produce(&mut admin, "ops", 2, 0, 20).await?;
    let mut consumer = Consumer::connect(config(&bootstrap, "ops", Strategy::RoundRobin)).await?;
    consumer.subscribe(["ops"])?;
    let p0 = ("ops".to_string(), 0);
    let p1 = ("ops".to_string(), 1);
    poll_until(&mut consumer, |c, _| c.assignment().len() == 2).await?;
    // Whatever that poll returned, start both partitions over.
    consumer.seek_to_beginning(&[p0.clone(), p1.clone()])?;
    consumer.pause(std::slice::from_ref(&p1));
    ensure!(consumer.paused() == [p1.clone()].into());
    let got = poll_until(&mut consumer, |_, r| r.len() >= 20).await?;
    ensure!(
        got.iter().all(|r| r.partition == 0),
        "a paused partition returned records"
    );
    for _ in 0..3 {
        ensure!(consumer.poll(Duration::from_millis(100)).await?.is_empty());
    }
    consumer.resume(std::slice::from_ref(&p1));
    consumer.seek(&p0, 15)?;
    // The Stream hands out the rest: p0 from 15, p1 from 0.
    let mut seen = Vec::new();
    {
        let mut stream = consumer.stream();
        while seen.len() < 25 {
            let record = tokio::time::timeout(PATIENCE, stream.next())
                .await?
                .context("stream ended")??;
            seen.push((record.partition, record.offset));
        }
    }
    let p0_offsets: Vec<i64> = seen
        .iter()
        .filter(|(p, _)| *p == 0)
        .map(|(_, o)| *o)
        .collect();
    ensure!(p0_offsets == (15..20).collect::<Vec<_>>(), "{p0_offsets:?}");
    let async_commit = consumer.commit_async([(p0.clone(), 20), (p1.clone(), 20)].into())?;
    async_commit.await??;
    let committed = consumer.committed(&[p0.clone(), p1.clone()].into()).await?;
    ensure!(committed == [(p0, 20), (p1, 20)].into(), "{committed:?}");
    consumer.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_bounds_the_buffer_instead_of_growing_memory() -> anyhow::Result<()> {
    let broker = group_broker().await?;
    let bootstrap = broker.bootstrap();
    let mut admin = RawClient::connect(broker.addr()).await?;
    create_topic(&mut admin, "backlog", 1).await?;
    // 4,000 records of ~1 KiB: 4 MB waiting.
    let value = "v".repeat(1_000);
    for chunk in 0..40 {
        let records: Vec<TestRecord> = (0..100)
            .map(|n| TestRecord::new(&format!("k{}", chunk * 100 + n), &value, 1_700_000_000_000))
            .collect();
        let batch = record_batch(&records, Compression::None)?;
        let response = admin
            .send(9, &produce_request("backlog", 0, batch, -1))
            .await?;
        ensure!(response.responses[0].partition_responses[0].error_code == 0);
    }
    const LIMIT: i32 = 64 * 1024;
    let mut consumer = Consumer::connect(ConsumerConfig {
        group_id: None,
        max_partition_fetch_bytes: LIMIT,
        ..config(&bootstrap, "unused", Strategy::Range)
    })
    .await?;
    consumer.assign([("backlog".to_string(), 0)])?;
    let mut peak = 0;
    for n in 0..400 {
        let record = tokio::time::timeout(PATIENCE, consumer.recv()).await??;
        ensure!(record.offset == n, "in order");
        peak = peak.max(consumer.buffered_bytes());
        if n % 50 == 0 {
            // A slow handler: the broker has megabytes more, the consumer does not take them.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // One response may arrive while the buffer is just under half the limit, and a batch is
    // returned whole: 100 records of ~1 KiB each on top.
    let bound = usize::try_from(LIMIT)? * 3 / 2 + 100 * 1_100;
    eprintln!("peak buffered {peak} bytes with max.partition.fetch.bytes={LIMIT} (4 MB waiting)");
    ensure!(peak <= bound, "buffer grew to {peak} bytes (bound {bound})");
    Ok(())
}

/// `timeout(…, consumer.recv())` (or a `select!`) cancels a poll wherever it waits. A poll
/// cancelled while the consumer applies a finished JoinGroup + SyncGroup round must not lose
/// that round: here every Metadata reply is held 400 ms by a proxy and every poll is cut off
/// after 50 ms, so each poll is cancelled inside the rebalance. The member must still get its
/// partitions, read every record, and see each partition assigned exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polls_cancelled_in_the_middle_of_a_rebalance_do_not_lose_the_assignment()
-> anyhow::Result<()> {
    const METADATA: i16 = 3;
    let proxy = FaultProxy::start(FaultPlan::default()).await?;
    let advertised = proxy.addr().to_string();
    let broker = TestBroker::start_with(|config| {
        config.group.initial_rebalance_delay = Duration::from_millis(300);
        config.advertised_listener = Some(advertised);
    })
    .await?;
    proxy.set_upstream(broker.addr());
    let topic = "cancelled-polls";
    let mut client = RawClient::connect(broker.addr()).await?;
    create_topic(&mut client, topic, 2).await?;
    produce(&mut client, topic, 2, 0, 50).await?;

    let mut consumer = Consumer::connect(config(
        &proxy.addr().to_string(),
        "cancelled-polls",
        Strategy::Range,
    ))
    .await?;
    let calls = Calls::default();
    consumer.set_rebalance_listener(calls.clone());
    consumer.subscribe([topic])?;
    proxy.set_plan(FaultPlan {
        delay_replies_of_api: Some(METADATA),
        delay: Duration::from_millis(400),
        ..FaultPlan::default()
    });
    let expected = expected_values(2, 0, 50);
    let mut seen = BTreeSet::new();
    let started = Instant::now();
    while seen != expected {
        ensure!(
            started.elapsed() < PATIENCE,
            "after {PATIENCE:?} of polls cut off at 50 ms: {} of {} records, assignment {:?}, \
             generation {}",
            seen.len(),
            expected.len(),
            consumer.assignment(),
            consumer.generation()
        );
        if let Ok(record) = tokio::time::timeout(Duration::from_millis(50), consumer.recv()).await {
            seen.insert(text(record?.value.as_ref()));
        }
    }
    let calls = calls.0.lock().expect("calls").clone();
    let mut assigned: BTreeMap<TopicPartition, usize> = BTreeMap::new();
    for (_, partitions) in calls.iter().filter(|(kind, _)| kind == "assigned") {
        for tp in partitions {
            *assigned.entry(tp.clone()).or_default() += 1;
        }
    }
    let want: BTreeMap<TopicPartition, usize> =
        (0..2).map(|p| ((topic.to_string(), p), 1)).collect();
    ensure!(assigned == want, "each partition assigned once: {calls:?}");
    consumer.close().await?;
    Ok(())
}

/// A subscription changed while the member's first JoinGroup is still waiting (the broker's
/// initial rebalance delay) must still be honoured: the join carried the old topics, and no
/// rejoin was asked for because the member had no generation yet, so it kept the old
/// topics' partitions for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_changed_during_the_first_join_gets_its_own_partitions() -> anyhow::Result<()>
{
    let broker = group_broker().await?;
    let mut client = RawClient::connect(broker.addr()).await?;
    create_topic(&mut client, "first-choice", 1).await?;
    create_topic(&mut client, "second-choice", 1).await?;
    let mut consumer = Consumer::connect(ConsumerConfig {
        // The default: the periodic metadata check would otherwise notice after 500 ms.
        metadata_max_age: Duration::from_secs(300),
        ..config(&broker.bootstrap(), "changed-mind", Strategy::Range)
    })
    .await?;
    consumer.subscribe(["first-choice"])?;
    // Starts the join; the broker holds it for its initial rebalance delay (300 ms).
    consumer.poll(Duration::from_millis(50)).await?;
    ensure!(
        consumer.generation() < 0,
        "the first join already completed (generation {}): the test proves nothing",
        consumer.generation()
    );
    consumer.subscribe(["second-choice"])?;
    let want: BTreeSet<(String, i32)> = [("second-choice".to_string(), 0)].into();
    let started = Instant::now();
    while consumer.assignment() != want {
        ensure!(
            started.elapsed() < Duration::from_secs(15),
            "assignment {:?} (generation {}) after subscribing to second-choice, want {want:?}",
            consumer.assignment(),
            consumer.generation()
        );
        consumer.poll(Duration::from_millis(100)).await?;
    }
    consumer.close().await?;
    Ok(())
}

/// A connection that takes longer to set up than the application waits per poll: each poll
/// is cancelled in the middle of the TCP connect + ApiVersions exchange. The set-up must go
/// on between polls (it used to start over at every poll, so the consumer never connected).
/// Here the proxy holds every ApiVersions reply for 300 ms and each `recv` is cut at 50 ms;
/// the fetch connection is a new one (the broker is reached as `localhost`, and advertised as
/// `127.0.0.1`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_slower_than_each_poll_still_gets_made() -> anyhow::Result<()> {
    const API_VERSIONS: i16 = 18;
    let proxy = FaultProxy::start(FaultPlan::default()).await?;
    let advertised = proxy.addr().to_string();
    let broker = TestBroker::start_with(|config| {
        config.advertised_listener = Some(advertised);
    })
    .await?;
    proxy.set_upstream(broker.addr());
    let topic = "slow-connect";
    let mut client = RawClient::connect(broker.addr()).await?;
    create_topic(&mut client, topic, 1).await?;
    produce(&mut client, topic, 1, 0, 20).await?;
    let bootstrap = format!("localhost:{}", proxy.addr().port());
    let mut consumer = Consumer::connect(ConsumerConfig {
        bootstrap_servers: vec![bootstrap],
        auto_offset_reset: AutoOffsetReset::Earliest,
        ..ConsumerConfig::default()
    })
    .await?;
    consumer.assign([(topic.to_string(), 0)])?;
    proxy.set_plan(FaultPlan {
        delay_replies_of_api: Some(API_VERSIONS),
        delay: Duration::from_millis(300),
        ..FaultPlan::default()
    });
    let started = Instant::now();
    let mut read = 0;
    while read < 20 {
        ensure!(
            started.elapsed() < Duration::from_secs(20),
            "{read} of 20 records after 20 s of polls cut off at 50 ms"
        );
        if let Ok(record) = tokio::time::timeout(Duration::from_millis(50), consumer.recv()).await {
            record?;
            read += 1;
        }
    }
    consumer.close().await?;
    Ok(())
}

/// `max.partition.fetch.bytes` smaller than a batch (here 1 byte) still reads everything, one
/// batch per fetch, as KIP-74 promises. Before the fix the consumer never fetched at all: it
/// prefetched only while a partition held less than half the limit buffered, and half of 1
/// byte is 0, so `poll` returned nothing forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_max_partition_fetch_bytes_still_makes_progress() -> anyhow::Result<()> {
    use semel::producer::{Producer, ProducerConfig, ProducerRecord};
    let broker = TestBroker::start().await?;
    let producer = Producer::connect(ProducerConfig {
        bootstrap_servers: vec![broker.bootstrap()],
        ..ProducerConfig::default()
    })
    .await?;
    for n in 0..5 {
        producer
            .send(ProducerRecord::new("tiny-fetch", n.to_string()).partition(0))
            .await?
            .await?;
    }
    producer.close().await;
    let mut consumer = Consumer::connect(ConsumerConfig {
        bootstrap_servers: vec![broker.bootstrap()],
        auto_offset_reset: AutoOffsetReset::Earliest,
        max_partition_fetch_bytes: 1,
        ..ConsumerConfig::default()
    })
    .await?;
    consumer.assign([("tiny-fetch".to_string(), 0)])?;
    let mut values = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while values.len() < 5 && Instant::now() < deadline {
        for record in consumer.poll(Duration::from_millis(100)).await? {
            values.push(text(record.value.as_ref()));
        }
    }
    ensure!(values == ["0", "1", "2", "3", "4"], "read {values:?}");
    Ok(())
}
