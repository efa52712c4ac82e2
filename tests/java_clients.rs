//! Apache Kafka's own Java clients and command-line tools (Kafka 4.1.2, resolved from Maven
//! Central by `scripts/kafka.sh`) against the `semel-broker` binary as a child process:
//! - `VerifiableProducer`, idempotent with `acks=all`, while the broker is `kill -9`ed and
//!   restarted twice on the same address: every acknowledged message is in the log exactly
//!   once, at the offset it was acknowledged with, read back by Kafka's console consumer;
//! - `VerifiableConsumer` groups (classic protocol) for each of Kafka's four assignors, members
//!   joining and leaving while a producer runs: no partition owned by two members at once,
//!   the assignor's layout and rebalance protocol (eager or cooperative) as Kafka defines
//!   them, and every acknowledged record consumed;
//! - two `VerifiableConsumer`s of one group through a `kill -9` of the broker: the group comes
//!   back at its generation, with no rebalance;
//! - the admin tools: `kafka-topics`, `kafka-consumer-groups` (lag, reset, delete) and
//!   `kafka-configs --describe`.
//!
//! Java (17+) and, the first time, Maven are installed by `scripts/setup.sh`; these tests fail
//! (they do not skip) when Java is missing or the jars cannot be fetched.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use common::fixed_port::{spawn_broker_on, spawn_broker_on_free_port};
use common::java::{
    JavaTool, Json, TOOL_LIMIT, consumed_ranges, events, events_named, kafka_command, kafka_ready,
    ownership_events, poll_until, replay, run_tool, run_tool_with_input,
};
use common::{ChildBroker, output_within};

/// Bound for anything the tests wait on (a rebalance, a consumer catching up, a producer).
const PATIENCE: Duration = Duration::from_secs(90);

/// `kafka-topics --create` of `topic` with `partitions` partitions.
fn create_topic(
    bootstrap: &str,
    topic: &str,
    partitions: impl std::fmt::Display,
) -> anyhow::Result<()> {
    run_tool(
        "topics",
        &[
            "--bootstrap-server",
            bootstrap,
            "--create",
            "--topic",
            topic,
            "--partitions",
            &partitions.to_string(),
        ],
    )?;
    Ok(())
}

/// Kafka's `VerifiableProducer`, idempotent with `acks=-1`, sending `messages` to `topic` at
/// `throughput` a second; `extra_config` is added to its producer config.
fn spawn_verifiable_producer(
    dir: &Path,
    bootstrap: &str,
    topic: &str,
    messages: usize,
    throughput: u32,
    extra_config: &str,
) -> anyhow::Result<JavaTool> {
    let config = idempotent_producer_config(dir, extra_config)?;
    JavaTool::spawn(
        "VerifiableProducer",
        "verifiable-producer",
        &[
            "--bootstrap-server",
            bootstrap,
            "--topic",
            topic,
            "--max-messages",
            &messages.to_string(),
            "--throughput",
            &throughput.to_string(),
            "--acks",
            "-1",
            "--producer.config",
            &config.display().to_string(),
        ],
    )
}

/// What a `VerifiableProducer` run acknowledged: value -> (partition, offset).
#[derive(Debug, Default)]
struct Acked {
    by_value: BTreeMap<String, (i32, i64)>,
    duplicate_acks: Vec<String>,
    send_errors: Vec<String>,
    tool_data: Option<Json>,
}

fn acked(lines: &[String]) -> anyhow::Result<Acked> {
    let mut out = Acked::default();
    for event in events(lines)? {
        match event.name() {
            "producer_send_success" => {
                let value = event.str("value").context("ack without value")?.to_string();
                let partition = i32::try_from(event.int("partition").context("no partition")?)?;
                let offset = event.int("offset").context("ack without offset")?;
                if out
                    .by_value
                    .insert(value.clone(), (partition, offset))
                    .is_some()
                {
                    out.duplicate_acks.push(value);
                }
            }
            "producer_send_error" => out.send_errors.push(format!("{event:?}")),
            "tool_data" => out.tool_data = Some(event),
            _ => {}
        }
    }
    Ok(out)
}

fn idempotent_producer_config(dir: &Path, extra: &str) -> anyhow::Result<PathBuf> {
    // VerifiableProducer forces retries=0 unless the config file sets it; idempotence needs
    // retries, and without idempotence a retried batch may be stored twice.
    let path = dir.join("producer.properties");
    std::fs::write(
        &path,
        format!(
            "enable.idempotence=true\nretries=2147483647\nreconnect.backoff.max.ms=200\n{extra}"
        ),
    )?;
    Ok(path)
}

// ---------------------------------------------------------------------------------------------
// 1. VerifiableProducer through kill -9

const CRASH_TOPIC: &str = "java-crash";
const CRASH_MESSAGES: usize = 30_000;
/// Acknowledged counts at which the broker is killed (the producer sends 3,000 a second).
const CRASH_POINTS: [usize; 2] = [8_000, 18_000];

/// Kafka's `VerifiableProducer` (idempotent, `acks=-1`, 30,000 messages at 3,000 a second)
/// keeps sending while the broker is `kill -9`ed twice and restarted on the same port and data
/// directory. Every message is acknowledged, and Kafka's console consumer, reading the topic
/// from the start to its end offsets, finds each acknowledged value exactly once, at the
/// partition and offset of its acknowledgement: nothing acknowledged was lost, and the retries
/// across the restarts stored no duplicate.
#[test]
fn java_verifiable_producer_loses_no_acknowledged_message_through_kill_9() -> anyhow::Result<()> {
    kafka_ready()?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let (mut broker, port) = spawn_broker_on_free_port(&data, &[])?;
    let bootstrap = format!("127.0.0.1:{port}");
    let b = bootstrap.as_str();
    create_topic(b, CRASH_TOPIC, 3)?;

    let mut producer =
        spawn_verifiable_producer(dir.path(), b, CRASH_TOPIC, CRASH_MESSAGES, 3000, "")?;
    for point in CRASH_POINTS {
        poll_until(PATIENCE, &format!("{point} acknowledgements"), || {
            producer.ensure_running()?;
            Ok(producer.count("producer_send_success") >= point)
        })?;
        let at_kill = producer.count("producer_send_success");
        ensure!(
            at_kill < CRASH_MESSAGES,
            "the producer was done ({at_kill} acked) before the kill; it is meant to span it"
        );
        broker.kill9()?;
        broker = spawn_broker_on(&data, port, &[])?;
    }
    let status = producer.wait_exit(Duration::from_secs(150))?;
    ensure!(
        status.success(),
        "VerifiableProducer failed ({status}):\n{}",
        producer.stderr_tail()
    );
    let acked = acked(&producer.lines())?;
    ensure!(
        acked.send_errors.is_empty(),
        "{} sends failed though retries are unlimited, first: {}",
        acked.send_errors.len(),
        acked.send_errors[0]
    );
    ensure!(
        acked.duplicate_acks.is_empty(),
        "values acknowledged twice: {:?}",
        acked.duplicate_acks
    );
    ensure!(
        acked.by_value.len() == CRASH_MESSAGES,
        "{} of {CRASH_MESSAGES} messages acknowledged; tool summary {:?}",
        acked.by_value.len(),
        acked.tool_data
    );

    // The log's end offsets (Kafka's GetOffsetShell), then everything up to them.
    let ends = end_offsets(b, CRASH_TOPIC)?;
    let total: i64 = ends.values().sum();
    ensure!(
        usize::try_from(total)? == CRASH_MESSAGES,
        "the log holds {total} records for {CRASH_MESSAGES} acknowledged messages: {ends:?}"
    );
    let consumed = run_tool(
        "console-consumer",
        &[
            "--bootstrap-server",
            b,
            "--topic",
            CRASH_TOPIC,
            "--from-beginning",
            "--max-messages",
            &total.to_string(),
            "--timeout-ms",
            "30000",
            "--property",
            "print.partition=true",
            "--property",
            "print.offset=true",
        ],
    )?;
    // Lines look like "Partition:1\tOffset:42\t1234".
    let mut at: BTreeMap<(i32, i64), String> = BTreeMap::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for line in consumed.lines() {
        let mut fields = line.splitn(3, '\t');
        let (Some(p), Some(o), Some(value)) = (fields.next(), fields.next(), fields.next()) else {
            bail!("unexpected console consumer line {line:?}");
        };
        let partition: i32 = p
            .strip_prefix("Partition:")
            .context("no partition")?
            .parse()?;
        let offset: i64 = o.strip_prefix("Offset:").context("no offset")?.parse()?;
        ensure!(
            at.insert((partition, offset), value.to_string()).is_none(),
            "{partition}/{offset} read twice"
        );
        *seen.entry(value.to_string()).or_default() += 1;
    }
    ensure!(
        at.len() == CRASH_MESSAGES,
        "read {} records of {CRASH_MESSAGES}",
        at.len()
    );
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).take(10).collect();
    ensure!(twice.is_empty(), "values stored more than once: {twice:?}");
    let mut misplaced = Vec::new();
    for (value, (partition, offset)) in &acked.by_value {
        if at.get(&(*partition, *offset)) != Some(value) {
            misplaced.push(format!(
                "{value} acked at {partition}/{offset}, log has {:?}",
                at.get(&(*partition, *offset))
            ));
        }
    }
    ensure!(
        misplaced.is_empty(),
        "{} acknowledged messages missing or moved, first: {:?}",
        misplaced.len(),
        &misplaced[..misplaced.len().min(5)]
    );
    broker.terminate()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. VerifiableConsumer groups with each assignor

const GROUP_TOPIC: &str = "java-groups";
const GROUP_PARTITIONS: i32 = 6;
const GROUP_MESSAGES: usize = 12_000;
const ASSIGNORS: [(&str, &str); 4] = [
    ("range", "org.apache.kafka.clients.consumer.RangeAssignor"),
    (
        "roundrobin",
        "org.apache.kafka.clients.consumer.RoundRobinAssignor",
    ),
    ("sticky", "org.apache.kafka.clients.consumer.StickyAssignor"),
    (
        "cooperative-sticky",
        "org.apache.kafka.clients.consumer.CooperativeStickyAssignor",
    ),
];

/// Which partitions each member (by index) owns.
type Layout = BTreeMap<usize, BTreeSet<i32>>;

/// The members of one group and what they printed.
struct Group {
    name: &'static str,
    members: Vec<JavaTool>,
    /// The balanced layouts with members {0}, {0, 1}, {0, 1, 2} and, after 0 left, {1, 2}.
    layouts: Vec<Layout>,
}

/// The replay itself: a hand-made history where member 1 is given a partition member 0 has
/// not yet revoked is reported, a clean handoff (revoke, then assign in the same millisecond)
/// is not, and each revocation is returned with what the member owned before it.
#[test]
fn ownership_replay_reports_a_partition_held_by_two_members() -> anyhow::Result<()> {
    let event = |ts: i64, name: &str, partitions: &[i32]| {
        let list: Vec<String> = partitions
            .iter()
            .map(|p| format!("{{\"topic\":\"t\",\"partition\":{p}}}"))
            .collect();
        Json::parse(&format!(
            "{{\"timestamp\":{ts},\"name\":\"{name}\",\"partitions\":[{}]}}",
            list.join(",")
        ))
    };
    let member0 = vec![
        event(1, "partitions_assigned", &[0, 1])?,
        event(5, "partitions_revoked", &[0, 1])?,
        event(6, "partitions_assigned", &[0])?,
    ];
    let clean = vec![event(5, "partitions_assigned", &[1])?];
    let ownership = replay(&[member0.clone(), clean])?;
    ensure!(ownership.overlaps.is_empty(), "{:?}", ownership.overlaps);
    ensure!(
        ownership.owner == BTreeMap::from([(0, 0), (1, 1)]),
        "{:?}",
        ownership.owner
    );
    ensure!(
        ownership.revocations == [(0, BTreeSet::from([0, 1]), BTreeSet::from([0, 1]))],
        "{:?}",
        ownership.revocations
    );
    let early = vec![event(4, "partitions_assigned", &[1])?];
    let ownership = replay(&[member0, early])?;
    ensure!(
        ownership.overlaps.len() == 1 && ownership.overlaps[0].contains("partition 1"),
        "{:?}",
        ownership.overlaps
    );
    Ok(())
}

/// What the members in `running` own once they share every partition evenly (None while a
/// rebalance is still under way).
fn balanced_layout(members: &[JavaTool], running: &[usize]) -> anyhow::Result<Option<Layout>> {
    let ownership = replay(&ownership_events(members)?)?;
    let share = usize::try_from(GROUP_PARTITIONS)? / running.len();
    let mut layout = Layout::new();
    for member in running {
        let owned: BTreeSet<i32> = ownership
            .owner
            .iter()
            .filter(|(_, m)| *m == member)
            .map(|(p, _)| *p)
            .collect();
        if owned.len() != share {
            return Ok(None);
        }
        layout.insert(*member, owned);
    }
    let covered = ownership.owner.len() == usize::try_from(GROUP_PARTITIONS)?
        && ownership.owner.values().all(|m| running.contains(m));
    Ok(covered.then_some(layout))
}

fn spawn_member(
    bootstrap: &str,
    group: &str,
    assignor: &str,
    config: &str,
    n: usize,
) -> anyhow::Result<JavaTool> {
    JavaTool::spawn(
        &format!("VerifiableConsumer {group} #{n}"),
        "verifiable-consumer",
        &[
            "--bootstrap-server",
            bootstrap,
            "--topic",
            GROUP_TOPIC,
            "--group-id",
            group,
            "--group-protocol",
            "classic",
            // The option, not partition.assignment.strategy in --consumer.config: the tool
            // overwrites the file's value with the option's default (RangeAssignor).
            "--assignment-strategy",
            assignor,
            "--session-timeout",
            "10000",
            "--consumer.config",
            config,
            "--verbose",
        ],
    )
}

/// Members join one at a time, each once the group is balanced again, then the first leaves.
fn run_group(
    bootstrap: &str,
    name: &'static str,
    assignor: &str,
    config: &str,
) -> anyhow::Result<Group> {
    let group = format!("java-{name}");
    let mut members: Vec<JavaTool> = Vec::new();
    let mut layouts = Vec::new();
    for n in 0..3 {
        members.push(spawn_member(bootstrap, &group, assignor, config, n)?);
        let running: Vec<usize> = (0..=n).collect();
        let mut layout = None;
        poll_until(
            PATIENCE,
            &format!("{group}: {} members sharing the partitions", n + 1),
            || {
                for member in &mut members {
                    member.ensure_running()?;
                }
                layout = balanced_layout(&members, &running)?;
                Ok(layout.is_some())
            },
        )?;
        layouts.extend(layout);
    }
    members[0].terminate()?;
    let mut layout = None;
    poll_until(
        PATIENCE,
        &format!("{group}: 2 members sharing the partitions after one left"),
        || {
            for member in &mut members[1..] {
                member.ensure_running()?;
            }
            layout = balanced_layout(&members, &[1, 2])?;
            Ok(layout.is_some())
        },
    )?;
    layouts.extend(layout);
    Ok(Group {
        name,
        members,
        layouts,
    })
}

fn shape(layout: &Layout) -> BTreeSet<BTreeSet<i32>> {
    layout.values().cloned().collect()
}

fn shape_of(sets: &[&[i32]]) -> BTreeSet<BTreeSet<i32>> {
    sets.iter().map(|s| s.iter().copied().collect()).collect()
}

/// Partitions taken from a member that stayed, between consecutive layouts: when a member
/// joins, those who stay keep a subset of what they had; when one leaves, a superset.
fn unsticky_moves(layouts: &[Layout]) -> Vec<String> {
    let mut moves = Vec::new();
    for pair in layouts.windows(2) {
        let (before, after) = (&pair[0], &pair[1]);
        for (member, now) in after {
            let Some(was) = before.get(member) else {
                continue;
            };
            let kept = if after.len() > before.len() {
                now.is_subset(was)
            } else {
                was.is_subset(now)
            };
            if !kept {
                moves.push(format!("member {member}: {was:?} -> {now:?}"));
            }
        }
    }
    moves
}

/// For each of Kafka's four classic assignors (range, roundrobin, sticky, cooperative-sticky,
/// each in its own group on one 6-partition topic), `VerifiableConsumer` members join one at a
/// time and the first one later leaves, while `VerifiableProducer` writes 12,000 messages.
/// From the members' `partitions_assigned`/`partitions_revoked` events: no partition was ever
/// assigned to a member while another still owned it; range and roundrobin laid out 2, 3 and
/// again 2 members exactly as Kafka's assignors do, and the sticky ones never took a partition
/// from a member that stayed; the eager assignors revoked everything at each rebalance and
/// cooperative-sticky only what moved. Every acknowledged message was
/// consumed by each group, with the acknowledged value; no record was consumed twice in a group
/// whose offset commits all succeeded.
#[test]
fn java_consumer_group_with_each_assignor() -> anyhow::Result<()> {
    kafka_ready()?;
    let dir = tempfile::tempdir()?;
    let broker = ChildBroker::spawn(
        &dir.path().join("data"),
        &["--group-initial-rebalance-delay-ms", "0"],
    )?;
    let bootstrap = broker.addr.to_string();
    let b = bootstrap.as_str();
    create_topic(b, GROUP_TOPIC, GROUP_PARTITIONS)?;
    // Small batches: the producer's sticky partitioner moves on after each, so every partition
    // gets records.
    let mut producer = spawn_verifiable_producer(
        dir.path(),
        b,
        GROUP_TOPIC,
        GROUP_MESSAGES,
        1000,
        "batch.size=1024\n",
    )?;
    let consumer_config = dir.path().join("consumer.properties");
    std::fs::write(
        &consumer_config,
        "heartbeat.interval.ms=1000\nmax.poll.records=100\n",
    )?;
    let consumer_config = consumer_config.display().to_string();

    let groups: Vec<Group> = std::thread::scope(|scope| {
        let runs: Vec<_> = ASSIGNORS
            .iter()
            .map(|(name, class)| {
                let config = consumer_config.as_str();
                scope.spawn(move || run_group(b, name, class, config))
            })
            .collect();
        runs.into_iter()
            .map(|run| {
                run.join()
                    .map_err(|_| anyhow::anyhow!("group thread panicked"))?
            })
            .collect::<anyhow::Result<Vec<Group>>>()
    })?;

    let status = producer.wait_exit(PATIENCE)?;
    ensure!(
        status.success(),
        "VerifiableProducer failed ({status}):\n{}",
        producer.stderr_tail()
    );
    let acked = acked(&producer.lines())?;
    ensure!(
        acked.by_value.len() == GROUP_MESSAGES && acked.send_errors.is_empty(),
        "{} of {GROUP_MESSAGES} acknowledged, {} send errors",
        acked.by_value.len(),
        acked.send_errors.len()
    );
    let partitions_written: BTreeSet<i32> = acked.by_value.values().map(|(p, _)| *p).collect();
    ensure!(
        partitions_written.len() == usize::try_from(GROUP_PARTITIONS)?,
        "the producer wrote to partitions {partitions_written:?} only"
    );
    let wanted: BTreeMap<(i32, i64), &String> = acked
        .by_value
        .iter()
        .map(|(value, at)| (*at, value))
        .collect();

    let mut groups = groups;
    for group in &mut groups {
        let name = group.name;
        poll_until(
            PATIENCE,
            &format!("group {name} consuming every acknowledged message"),
            || {
                for member in &mut group.members[1..] {
                    member.ensure_running()?;
                }
                let got = consumed_ranges(&group.members)?;
                Ok(wanted.keys().all(|at| got.contains(at)))
            },
        )?;
    }
    // The second member leaves, the third takes everything over, then it leaves too.
    for group in &mut groups {
        group.members[1].terminate()?;
    }
    for group in &mut groups {
        let name = group.name;
        poll_until(
            PATIENCE,
            &format!("{name}: the last member owning everything"),
            || {
                group.members[2].ensure_running()?;
                Ok(balanced_layout(&group.members, &[2])?.is_some())
            },
        )?;
        group.members[2].terminate()?;
    }

    for group in &groups {
        let name = group.name;
        let all: Vec<Vec<Json>> = group
            .members
            .iter()
            .map(|m| events(&m.lines()))
            .collect::<anyhow::Result<_>>()?;
        for (n, member) in all.iter().enumerate() {
            ensure!(
                member.iter().any(|e| e.name() == "shutdown_complete"),
                "{name} member {n} did not shut down cleanly:\n{}",
                group.members[n].stderr_tail()
            );
        }
        let ownership = replay(&all)?;
        ensure!(
            ownership.overlaps.is_empty(),
            "{name}: partitions owned by two members at once: {:?}",
            ownership.overlaps
        );
        ensure!(
            ownership.owner.is_empty(),
            "{name}: partitions never revoked at shutdown: {:?}",
            ownership.owner
        );

        let shapes: Vec<_> = group.layouts.iter().map(shape).collect();
        let expected = match name {
            "range" => Some((
                shape_of(&[&[0, 1, 2], &[3, 4, 5]]),
                shape_of(&[&[0, 1], &[2, 3], &[4, 5]]),
            )),
            "roundrobin" => Some((
                shape_of(&[&[0, 2, 4], &[1, 3, 5]]),
                shape_of(&[&[0, 3], &[1, 4], &[2, 5]]),
            )),
            _ => None,
        };
        if let Some((two, three)) = expected {
            ensure!(
                shapes == [shape_of(&[&[0, 1, 2, 3, 4, 5]]), two.clone(), three, two],
                "{name} laid the partitions out as {:?}",
                group.layouts
            );
        } else {
            let moves = unsticky_moves(&group.layouts);
            ensure!(
                moves.is_empty(),
                "{name} moved partitions away from members that stayed: {moves:?} (layouts {:?})",
                group.layouts
            );
        }
        let partial: Vec<_> = ownership
            .revocations
            .iter()
            .filter(|(_, owned, revoked)| revoked != owned)
            .collect();
        if name == "cooperative-sticky" {
            // Only what moves is revoked: everything only when a member shuts down (its last
            // revocation); each join took partitions from members that kept others (1 from
            // member 0 when member 1 joined, 1 from each when member 2 did).
            for (member, _, _) in &ownership.revocations {
                let own: Vec<_> = ownership
                    .revocations
                    .iter()
                    .filter(|(m, _, _)| m == member)
                    .collect();
                for (_, owned, revoked) in &own[..own.len() - 1] {
                    ensure!(
                        !revoked.is_empty() && revoked.is_subset(owned) && revoked != owned,
                        "{name}: member {member} had {revoked:?} of {owned:?} revoked while it stayed"
                    );
                }
            }
            ensure!(
                partial.len() >= 3,
                "{name}: {} incremental revocations: {:?}",
                partial.len(),
                ownership.revocations
            );
        } else {
            ensure!(
                partial.is_empty(),
                "{name} (eager): revocations of less than everything owned: {partial:?}"
            );
        }

        // What each member consumed, against what was acknowledged.
        let mut consumed: BTreeMap<(i32, i64), usize> = BTreeMap::new();
        let mut failed_commits = 0;
        for member in &all {
            for event in member {
                match event.name() {
                    "record_data" => {
                        let at = (
                            i32::try_from(event.int("partition").context("no partition")?)?,
                            event.int("offset").context("no offset")?,
                        );
                        if let Some(value) = wanted.get(&at) {
                            ensure!(
                                event.str("value") == Some(value.as_str()),
                                "{name}: {at:?} holds {:?}, acknowledged with {value}",
                                event.str("value")
                            );
                        }
                        *consumed.entry(at).or_default() += 1;
                    }
                    "offsets_committed" if event.get("success") != Some(&Json::Bool(true)) => {
                        failed_commits += 1;
                    }
                    _ => {}
                }
            }
        }
        let missing = wanted
            .keys()
            .filter(|at| !consumed.contains_key(at))
            .count();
        ensure!(
            missing == 0,
            "{name}: {missing} acknowledged records not consumed"
        );
        let twice = consumed.values().filter(|n| **n > 1).count();
        ensure!(
            failed_commits > 0 || twice == 0,
            "{name}: {twice} records consumed twice though every commit succeeded"
        );
        println!(
            "{name}: layouts {:?}, {} revocations ({} partial), {} records consumed, {twice} twice, \
             {failed_commits} failed commits",
            shapes,
            ownership.revocations.len(),
            partial.len(),
            consumed.len()
        );
    }
    broker.terminate()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. Admin tools

/// The rows of `kafka-consumer-groups --describe` for `topic`: partition -> (current offset,
/// log-end offset, lag).
fn describe_rows(output: &str, topic: &str) -> anyhow::Result<BTreeMap<i32, (i64, i64, i64)>> {
    let mut rows = BTreeMap::new();
    for line in output.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() >= 6 && fields[1] == topic {
            let number = |i: usize| -> anyhow::Result<i64> {
                fields[i]
                    .parse()
                    .with_context(|| format!("column {i} of {line:?}"))
            };
            rows.insert(
                i32::try_from(number(2)?)?,
                (number(3)?, number(4)?, number(5)?),
            );
        }
    }
    Ok(rows)
}

/// Partition -> end offset, from Kafka's `GetOffsetShell --time -1`.
fn end_offsets(bootstrap: &str, topic: &str) -> anyhow::Result<BTreeMap<i32, i64>> {
    let out = run_tool(
        "get-offsets",
        &[
            "--bootstrap-server",
            bootstrap,
            "--topic",
            topic,
            "--time",
            "-1",
        ],
    )?;
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let mut fields = line.rsplitn(3, ':');
            let end = fields.next().context("no offset")?.trim().parse()?;
            let partition = fields.next().context("no partition")?.parse()?;
            Ok((partition, end))
        })
        .collect()
}

/// Kafka's admin tools against the broker: `kafka-topics` creates a 3-partition topic with a
/// config, lists it and describes its partition count and partitions; after a console consumer
/// in a group consumed everything and 5 more records arrived, `kafka-consumer-groups` lists the
/// group and describes it with the committed offsets, the log end offsets and a lag of 5 on the
/// one partition written; `--reset-offsets --to-earliest --execute` moves the inactive group to
/// 0 (and describe then shows 0 with the whole log as lag); `--delete` removes the group from
/// the list; `kafka-configs --describe` shows the topic's config.
#[test]
fn kafka_admin_tools_work_against_semel_broker() -> anyhow::Result<()> {
    kafka_ready()?;
    let dir = tempfile::tempdir()?;
    let broker = ChildBroker::spawn(
        &dir.path().join("data"),
        &["--group-initial-rebalance-delay-ms", "0"],
    )?;
    let bootstrap = broker.addr.to_string();
    let b = bootstrap.as_str();
    let (topic, group) = ("java-admin", "java-admin-group");

    let created = run_tool(
        "topics",
        &[
            "--bootstrap-server",
            b,
            "--create",
            "--topic",
            topic,
            "--partitions",
            "3",
            "--config",
            "retention.ms=3600000",
        ],
    )?;
    ensure!(
        created.contains(&format!("Created topic {topic}.")),
        "create said: {created}"
    );
    let listed = run_tool("topics", &["--bootstrap-server", b, "--list"])?;
    ensure!(
        listed.lines().any(|l| l.trim() == topic),
        "--list lacks {topic}: {listed}"
    );
    let described = run_tool(
        "topics",
        &["--bootstrap-server", b, "--describe", "--topic", topic],
    )?;
    ensure!(
        described.contains("PartitionCount: 3") && described.contains("retention.ms=3600000"),
        "--describe: {described}"
    );
    for p in 0..3 {
        ensure!(
            described.contains(&format!("Topic: {topic}\tPartition: {p}\t")),
            "--describe lacks partition {p}: {described}"
        );
    }

    // 60 keyed records, all consumed by a group, whose consumer commits on close.
    let produce = |input: String| -> anyhow::Result<()> {
        let input_path = dir.path().join("input.txt");
        std::fs::write(&input_path, input)?;
        run_tool_with_input(
            "console-producer",
            &[
                "--bootstrap-server",
                b,
                "--topic",
                topic,
                "--property",
                "parse.key=true",
                "--property",
                "key.separator=:",
            ],
            Some(&input_path),
        )?;
        Ok(())
    };
    produce((0..60).map(|i| format!("key-{i}:value-{i}\n")).collect())?;
    let before = end_offsets(b, topic)?;
    ensure!(
        before.values().sum::<i64>() == 60 && before.len() == 3,
        "end offsets {before:?}"
    );
    let consumed = output_within(
        &mut kafka_command(
            &[
                "tool",
                "console-consumer",
                "--bootstrap-server",
                b,
                "--topic",
                topic,
                "--group",
                group,
                "--from-beginning",
                "--max-messages",
                "60",
                "--timeout-ms",
                "30000",
            ],
            None,
        ),
        TOOL_LIMIT,
        "console-consumer",
    )?;
    let consumer_stderr = String::from_utf8_lossy(&consumed.stderr);
    ensure!(
        consumed.status.success() && consumer_stderr.contains("Processed a total of 60 messages"),
        "console-consumer: {consumer_stderr}"
    );
    // Five more records with one key: one partition gets all five.
    produce("same-key:late\n".repeat(5))?;
    let after = end_offsets(b, topic)?;
    let grown: Vec<i32> = after
        .iter()
        .filter(|(p, end)| before.get(p) != Some(end))
        .map(|(p, _)| *p)
        .collect();
    ensure!(
        grown.len() == 1 && after.values().sum::<i64>() == 65,
        "end offsets {before:?} -> {after:?}"
    );

    let groups = run_tool("consumer-groups", &["--bootstrap-server", b, "--list"])?;
    ensure!(
        groups.lines().any(|l| l.trim() == group),
        "--list lacks {group}: {groups}"
    );
    let describe = || {
        run_tool(
            "consumer-groups",
            &["--bootstrap-server", b, "--describe", "--group", group],
        )
    };
    let rows = describe_rows(&describe()?, topic)?;
    let expected: BTreeMap<i32, (i64, i64, i64)> = after
        .iter()
        .map(|(p, end)| {
            let committed = before[p];
            (*p, (committed, *end, end - committed))
        })
        .collect();
    ensure!(
        rows == expected,
        "--describe rows (current, log end, lag) {rows:?}, expected {expected:?}"
    );
    ensure!(
        rows.values().map(|r| r.2).sum::<i64>() == 5,
        "lag is not 5: {rows:?}"
    );

    let reset = run_tool(
        "consumer-groups",
        &[
            "--bootstrap-server",
            b,
            "--reset-offsets",
            "--group",
            group,
            "--topic",
            topic,
            "--to-earliest",
            "--execute",
        ],
    )?;
    let new_offsets = reset
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some(topic))
        .count();
    ensure!(new_offsets == 3, "--reset-offsets printed: {reset}");
    let rows = describe_rows(&describe()?, topic)?;
    let expected: BTreeMap<i32, (i64, i64, i64)> =
        after.iter().map(|(p, end)| (*p, (0, *end, *end))).collect();
    ensure!(
        rows == expected,
        "after --to-earliest: {rows:?}, expected {expected:?}"
    );

    let deleted = run_tool(
        "consumer-groups",
        &["--bootstrap-server", b, "--delete", "--group", group],
    )?;
    ensure!(
        deleted.contains("was successful"),
        "--delete said: {deleted}"
    );
    let groups = run_tool("consumer-groups", &["--bootstrap-server", b, "--list"])?;
    ensure!(
        !groups.lines().any(|l| l.trim() == group),
        "{group} still listed after --delete: {groups}"
    );

    let configs = run_tool(
        "configs",
        &[
            "--bootstrap-server",
            b,
            "--describe",
            "--entity-type",
            "topics",
            "--entity-name",
            topic,
        ],
    )?;
    ensure!(
        configs.contains(&format!("Dynamic configs for topic {topic} are:"))
            && configs.contains("retention.ms=3600000"),
        "kafka-configs --describe: {configs}"
    );

    // kafka-log-dirs: DescribeLogDirs, each partition with its size.
    let dirs = run_tool(
        "log-dirs",
        &["--bootstrap-server", b, "--describe", "--topic-list", topic],
    )?;
    ensure!(
        dirs.contains(&format!("\"partition\":\"{topic}-0\""))
            && dirs.contains("\"error\":null")
            && dirs.contains("\"logDir\":"),
        "kafka-log-dirs --describe: {dirs}"
    );

    // kafka-delete-records: DeleteRecords moves partition 0's log start to the middle of
    // its records; kafka-get-offsets then gives it as the earliest offset.
    let offsets = |time: &str| -> anyhow::Result<i64> {
        let out = run_tool(
            "get-offsets",
            &["--bootstrap-server", b, "--topic", topic, "--time", time],
        )?;
        out.lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{topic}:0:")))
            .with_context(|| format!("no partition 0 in get-offsets: {out}"))?
            .parse()
            .context("offset")
    };
    let end = offsets("-1")?;
    ensure!(end >= 2, "partition 0 holds {end} records");
    let cut = end / 2;
    let spec = dir.path().join("delete-records.json");
    std::fs::write(
        &spec,
        format!(
            "{{\"partitions\":[{{\"topic\":\"{topic}\",\"partition\":0,\"offset\":{cut}}}],\"version\":1}}"
        ),
    )?;
    let deleted = run_tool(
        "delete-records",
        &[
            "--bootstrap-server",
            b,
            "--offset-json-file",
            &spec.to_string_lossy(),
        ],
    )?;
    ensure!(
        deleted.contains(&format!("low_watermark: {cut}")),
        "kafka-delete-records: {deleted}"
    );
    ensure!(offsets("-2")? == cut, "earliest after delete-records");
    broker.terminate()?;
    Ok(())
}

const RESTART_TOPIC: &str = "java-restart";
const RESTART_MESSAGES: usize = 24_000;

/// Issue 20: two Java `VerifiableConsumer`s of one group (classic protocol) read while a
/// `VerifiableProducer` writes, and the broker is `kill -9`ed and restarted on the same port.
/// The group comes back with its members at their generation (it is recorded in the offsets
/// log), so neither member is told `UNKNOWN_MEMBER_ID` and no rebalance follows: no partition
/// is revoked, lost or assigned again after the restart, and every message is consumed.
/// Before, every member rejoined after a restart, and its in-flight commits failed (528 of
/// 60,000 records read twice in the first probe).
#[test]
fn java_consumers_keep_their_group_through_a_broker_kill_9() -> anyhow::Result<()> {
    kafka_ready()?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let (mut broker, port) =
        spawn_broker_on_free_port(&data, &["--group-initial-rebalance-delay-ms", "0"])?;
    let bootstrap = format!("127.0.0.1:{port}");
    let b = bootstrap.as_str();
    create_topic(b, RESTART_TOPIC, 4)?;
    let mut producer = spawn_verifiable_producer(
        dir.path(),
        b,
        RESTART_TOPIC,
        RESTART_MESSAGES,
        2000,
        "batch.size=1024\n",
    )?;
    let consumer_config = dir.path().join("restart-consumer.properties");
    std::fs::write(
        &consumer_config,
        "heartbeat.interval.ms=1000\nmax.poll.records=200\n",
    )?;
    let consumer_config = consumer_config.display().to_string();
    let member = |n: usize| {
        JavaTool::spawn(
            &format!("VerifiableConsumer java-restart #{n}"),
            "verifiable-consumer",
            &[
                "--bootstrap-server",
                b,
                "--topic",
                RESTART_TOPIC,
                "--group-id",
                "java-restart",
                "--group-protocol",
                "classic",
                "--session-timeout",
                "20000",
                "--consumer.config",
                &consumer_config,
            ],
        )
    };
    let mut members = vec![member(0)?, member(1)?];
    // Balanced: each member has two partitions, and both read something.
    let assigned_now = |m: &JavaTool| -> anyhow::Result<usize> {
        let mut owned = BTreeSet::new();
        for event in events_named(&m.lines(), &["partitions_assigned", "partitions_revoked"])? {
            for p in event.list("partitions") {
                let partition = p.int("partition").unwrap_or(-1);
                if event.name() == "partitions_assigned" {
                    owned.insert(partition);
                } else {
                    owned.remove(&partition);
                }
            }
        }
        Ok(owned.len())
    };
    poll_until(
        PATIENCE,
        "two members with two partitions each, consuming",
        || {
            for m in &mut members {
                m.ensure_running()?;
            }
            Ok(members
                .iter()
                .map(|m| Ok(assigned_now(m)? == 2 && m.count("records_consumed") > 0))
                .collect::<anyhow::Result<Vec<bool>>>()?
                .into_iter()
                .all(|ok| ok))
        },
    )?;
    let rebalance_events = |m: &JavaTool| {
        m.count("partitions_assigned") + m.count("partitions_revoked") + m.count("partitions_lost")
    };
    let before: Vec<usize> = members.iter().map(rebalance_events).collect();
    broker.kill9()?;
    broker = spawn_broker_on(&data, port, &["--group-initial-rebalance-delay-ms", "0"])?;
    let status = producer.wait_exit(Duration::from_secs(150))?;
    ensure!(status.success(), "VerifiableProducer failed ({status})");
    let consumed = |m: &JavaTool| -> anyhow::Result<i64> {
        Ok(events_named(&m.lines(), &["records_consumed"])?
            .iter()
            .filter_map(|e| e.int("count"))
            .sum())
    };
    poll_until(PATIENCE, "every message consumed", || {
        let mut total = 0;
        for m in &mut members {
            m.ensure_running()?;
            total += consumed(m)?;
        }
        Ok(usize::try_from(total)? >= RESTART_MESSAGES)
    })?;
    let after: Vec<usize> = members.iter().map(rebalance_events).collect();
    let total: i64 = members.iter().map(consumed).sum::<anyhow::Result<i64>>()?;
    eprintln!(
        "Java group through a broker kill -9: {total} records consumed for {RESTART_MESSAGES} \
         sent; rebalance events per member before {before:?}, after {after:?}"
    );
    ensure!(
        before == after,
        "the members rebalanced after the restart (assigned/revoked/lost events before \
         {before:?}, after {after:?}): the group did not survive it\n{}",
        broker.output_text()
    );
    for m in &mut members {
        m.terminate()?;
    }
    Ok(())
}

/// The Java reference client over TLS and SCRAM (issue 22): semel-broker started with its
/// security flags (SASL_SSL, a PEM certificate, a users file); `kafka-topics`, the console
/// producer and consumer with SCRAM-SHA-512 and a PEM trust store; a wrong password refused
/// with the Java client's authentication error.
#[test]
fn java_clients_work_against_semel_broker_over_sasl_ssl() -> anyhow::Result<()> {
    use semel::client::SecurityProtocol;
    kafka_ready()?;
    let pki = common::pki::Pki::new()?;
    let dir = tempfile::tempdir()?;
    let flags = pki.broker_flags(SecurityProtocol::SaslSsl);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let broker = ChildBroker::spawn(&dir.path().join("data"), &flags)?;
    let bootstrap = format!("localhost:{}", broker.addr.port());
    let b = bootstrap.as_str();
    let good = pki.java_properties("SCRAM-SHA-512", "alice-secret")?;
    let good = good.to_string_lossy();
    let topic = "java-secured";

    let created = run_tool(
        "topics",
        &[
            "--bootstrap-server",
            b,
            "--command-config",
            &good,
            "--create",
            "--topic",
            topic,
            "--partitions",
            "1",
        ],
    )?;
    ensure!(created.contains("Created topic"), "create said: {created}");
    let input = dir.path().join("input.txt");
    std::fs::write(&input, "one\ntwo\nthree\n")?;
    run_tool_with_input(
        "console-producer",
        &[
            "--bootstrap-server",
            b,
            "--topic",
            topic,
            "--producer.config",
            &good,
        ],
        Some(&input),
    )?;
    let read = run_tool(
        "console-consumer",
        &[
            "--bootstrap-server",
            b,
            "--topic",
            topic,
            "--consumer.config",
            &good,
            "--from-beginning",
            "--max-messages",
            "3",
            "--timeout-ms",
            "30000",
        ],
    )?;
    let lines: Vec<&str> = read.lines().collect();
    ensure!(
        lines == ["one", "two", "three"],
        "console-consumer read {read:?}"
    );

    let wrong = pki.java_properties("SCRAM-SHA-512", "guess")?;
    let refused = run_tool(
        "topics",
        &[
            "--bootstrap-server",
            b,
            "--command-config",
            &wrong.to_string_lossy(),
            "--list",
        ],
    );
    let error = format!(
        "{:#}",
        refused.err().context("a wrong password listed topics")?
    );
    ensure!(
        error.contains("SaslAuthenticationException") && error.contains("invalid credentials"),
        "{error}"
    );
    Ok(())
}
