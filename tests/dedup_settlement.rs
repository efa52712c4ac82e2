//! Settling out of order: `Fresh` handles are owned values, so an application handles several
//! at once and they settle in any order. Whatever the order, and whether a handle is settled,
//! dropped (a panicking handler) or lost to a crash, a record that was not settled must be
//! delivered again, to this member or the next one: the offset committed to the group and
//! recorded in the store is the lowest offset not yet settled, never the offset after the
//! last record that happened to settle.
//!
//! One partition, messages `m0..m9` (some tests add a resent `m1`); a first member takes m0
//! and m1, settles m1 only, then closes or crashes; a new member with the same store and
//! group reads the partition to its end. It must handle m0, and must not handle m1 again.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use common::TestBroker;
use common::child::PATIENCE;
use common::proxy::{FaultPlan, FaultProxy};
use semel::consumer::dedup::{DedupConfig, DedupConsumer, DedupStore, Fresh, MiddlewareConfig};
use semel::consumer::{AutoOffsetReset, Consumer, ConsumerConfig, Strategy};
use semel::producer::{Producer, ProducerConfig, ProducerRecord};

fn consumer_config(bootstrap: &str, group: &str) -> ConsumerConfig {
    ConsumerConfig {
        bootstrap_servers: vec![bootstrap.to_string()],
        group_id: Some(group.to_string()),
        // A static member: the next member takes the crashed one's place at once.
        group_instance_id: Some(format!("{group}-member")),
        auto_offset_reset: AutoOffsetReset::Earliest,
        session_timeout: Duration::from_secs(6),
        heartbeat_interval: Duration::from_millis(300),
        fetch_max_wait: Duration::from_millis(50),
        partition_assignment_strategy: vec![Strategy::Range],
        ..ConsumerConfig::default()
    }
}

fn middleware() -> MiddlewareConfig {
    MiddlewareConfig {
        // Commits as often as it can: a commit past an unsettled record has every chance.
        commit_interval: Duration::from_millis(1),
        changelog: None,
        ..MiddlewareConfig::default()
    }
}

/// Sends `ids` in this order to partition 0 of `topic`; returns the end offset.
async fn send(bootstrap: &str, topic: &str, ids: &[&str]) -> anyhow::Result<i64> {
    let producer = Producer::connect(ProducerConfig {
        bootstrap_servers: vec![bootstrap.to_string()],
        ..ProducerConfig::default()
    })
    .await?;
    let mut end = 0;
    for id in ids {
        let record = ProducerRecord::new(topic, id.to_string())
            .partition(0)
            .header("semel-msg-id", id.to_string());
        end = producer.send(record).await?.await?.offset + 1;
    }
    producer.close().await;
    Ok(end)
}

async fn member(
    bootstrap: &str,
    group: &str,
    topic: &str,
    store: &Arc<DedupStore>,
) -> anyhow::Result<DedupConsumer> {
    let mut consumer = Consumer::connect(consumer_config(bootstrap, group)).await?;
    consumer.subscribe([topic])?;
    Ok(DedupConsumer::new(
        consumer,
        Arc::clone(store),
        middleware(),
    )?)
}

async fn next(dedup: &mut DedupConsumer) -> anyhow::Result<Fresh> {
    tokio::time::timeout(PATIENCE, dedup.next())
        .await
        .context("no record within PATIENCE")?
        .map_err(Into::into)
}

fn id(fresh: &Fresh) -> String {
    String::from_utf8_lossy(fresh.record.value.as_deref().unwrap_or_default()).into_owned()
}

/// A new member with the same store and group reads to `end`; returns how often it handled
/// each id.
async fn handled_by_the_next_member(
    bootstrap: &str,
    group: &str,
    topic: &str,
    store_path: &Path,
    end: i64,
) -> anyhow::Result<BTreeMap<String, u32>> {
    handled_by_the_next_member_with(bootstrap, group, topic, store_path, end, middleware()).await
}

async fn handled_by_the_next_member_with(
    bootstrap: &str,
    group: &str,
    topic: &str,
    store_path: &Path,
    end: i64,
    config: MiddlewareConfig,
) -> anyhow::Result<BTreeMap<String, u32>> {
    let store = Arc::new(DedupStore::open(DedupConfig::new(store_path))?);
    let mut consumer = Consumer::connect(consumer_config(bootstrap, group)).await?;
    consumer.subscribe([topic])?;
    let mut dedup = DedupConsumer::new(consumer, Arc::clone(&store), config)?;
    let mut handled: BTreeMap<String, u32> = BTreeMap::new();
    let started = Instant::now();
    while dedup
        .position(&(topic.to_string(), 0))
        .is_none_or(|p| p < end)
    {
        ensure!(
            started.elapsed() < PATIENCE,
            "the next member never read to {end}: position {:?}, handled {handled:?}",
            dedup.position(&(topic.to_string(), 0))
        );
        if let Ok(fresh) = tokio::time::timeout(Duration::from_millis(200), dedup.next()).await {
            let fresh = fresh?;
            *handled.entry(id(&fresh)).or_default() += 1;
            dedup.done(fresh, |_| {}).await?;
        }
    }
    dedup.close().await?;
    Ok(handled)
}

/// A broker with ids m0..m(n-1) sent to partition 0 of a topic, and an empty store.
struct Fixture {
    _broker: TestBroker,
    bootstrap: String,
    /// The partition's end offset.
    end: i64,
    _dir: tempfile::TempDir,
    store: Arc<DedupStore>,
    messages: Vec<String>,
}

async fn fixture(topic: &str, n: usize) -> anyhow::Result<Fixture> {
    let broker = TestBroker::start().await?;
    let bootstrap = broker.addr().to_string();
    let messages = ids(0..n);
    let refs: Vec<&str> = messages.iter().map(String::as_str).collect();
    let end = send(&bootstrap, topic, &refs).await?;
    let dir = tempfile::tempdir()?;
    let store = Arc::new(DedupStore::open(DedupConfig::new(
        dir.path().join("store"),
    ))?);
    Ok(Fixture {
        _broker: broker,
        bootstrap,
        end,
        _dir: dir,
        store,
        messages,
    })
}

fn ids(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|n| format!("m{n}")).collect()
}

/// What the next member must have handled: m0, and m2..m9, each once; not m1.
fn check(handled: &BTreeMap<String, u32>) -> anyhow::Result<()> {
    let mut want: BTreeMap<String, u32> = ids(2..10).into_iter().map(|id| (id, 1)).collect();
    want.insert("m0".into(), 1);
    ensure!(
        *handled == want,
        "the next member handled {handled:?}; want m0 and m2..m9 once each (m1 was settled)"
    );
    Ok(())
}

/// How the first member ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// m0's handle is dropped unsettled, then `close()`.
    DropThenClose,
    /// m0's handle is still held when the process "crashes" (everything dropped, no commit
    /// and no LeaveGroup), after a few more commit chances.
    Crash,
}

async fn first_member_settles_m1_only(
    topic: &str,
    messages: &[&str],
    end_how: End,
    take_a_duplicate: bool,
) -> anyhow::Result<()> {
    let broker = TestBroker::start().await?;
    let bootstrap = broker.bootstrap();
    let group = format!("{topic}-group");
    let end = send(&bootstrap, topic, messages).await?;
    let dir = tempfile::tempdir()?;
    let store_path = dir.path().join("store");
    {
        let store = Arc::new(DedupStore::open(DedupConfig::new(&store_path))?);
        let mut dedup = member(&bootstrap, &group, topic, &store).await?;
        let m0 = next(&mut dedup).await?;
        ensure!(id(&m0) == "m0", "first record {}", id(&m0));
        let m1 = next(&mut dedup).await?;
        ensure!(id(&m1) == "m1", "second record {}", id(&m1));
        dedup.done(m1, |_| {}).await?;
        if take_a_duplicate {
            // The resent m1 is dropped on the way to m2; m0 is still in flight.
            let m2 = next(&mut dedup).await?;
            ensure!(id(&m2) == "m2", "after the resent m1: {}", id(&m2));
            ensure!(
                dedup.metrics().duplicates == 1,
                "the resent m1 was not dropped"
            );
            dedup.done(m2, |_| {}).await?;
        }
        match end_how {
            End::DropThenClose => {
                drop(m0); // a handler that panicked
                dedup.close().await?;
            }
            End::Crash => {
                // More chances to commit (the commit interval is 1 ms), m0 still held.
                for _ in 0..3 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let _ = tokio::time::timeout(Duration::from_millis(100), dedup.next()).await;
                }
                // The crash: no commit, no LeaveGroup. (m0's handle goes last; a real crash
                // would leave its claim to expire instead of releasing it.)
                drop(dedup);
                drop(m0);
            }
        }
    }
    let handled = handled_by_the_next_member(&bootstrap, &group, topic, &store_path, end).await?;
    if take_a_duplicate {
        let mut want: BTreeMap<String, u32> = ids(3..10).into_iter().map(|id| (id, 1)).collect();
        want.insert("m0".into(), 1);
        ensure!(
            handled == want,
            "the next member handled {handled:?}; want m0 and m3..m9 once each (m1, its resend \
             and m2 were settled)"
        );
        return Ok(());
    }
    check(&handled)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_handle_before_a_settled_one_is_delivered_again_after_close() -> anyhow::Result<()>
{
    let messages = ids(0..10);
    let messages: Vec<&str> = messages.iter().map(String::as_str).collect();
    first_member_settles_m1_only("settle-drop-close", &messages, End::DropThenClose, false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handle_still_held_at_a_crash_is_delivered_again() -> anyhow::Result<()> {
    let messages = ids(0..10);
    let messages: Vec<&str> = messages.iter().map(String::as_str).collect();
    first_member_settles_m1_only("settle-crash", &messages, End::Crash, false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_dropped_while_an_earlier_record_is_in_flight_does_not_settle_past_it()
-> anyhow::Result<()> {
    let mut messages = vec!["m0".to_string(), "m1".into(), "m1".into()];
    messages.extend(ids(2..10));
    let messages: Vec<&str> = messages.iter().map(String::as_str).collect();
    first_member_settles_m1_only("settle-duplicate", &messages, End::Crash, true).await
}

/// Defect: marks and offsets were never synced before the offsets left the process, so after
/// a power cut the group's offset could be past records whose marks (and the handler's state)
/// were lost. Here a proxy looks at every OffsetCommit as it leaves the client: each
/// committed offset's marks must already be durable (the store's write counter at the time
/// the record was settled is at most its synced counter at the time the commit is seen).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_offset_commit_leaves_after_the_marks_it_covers_are_synced() -> anyhow::Result<()> {
    use kafka_protocol::messages::{OffsetCommitRequest, RequestHeader};
    use kafka_protocol::protocol::Decodable;

    let proxy = FaultProxy::start(FaultPlan::default()).await?;
    let advertised = proxy.addr().to_string();
    let broker = TestBroker::start_with(|c| c.advertised_listener = Some(advertised)).await?;
    proxy.set_upstream(broker.addr());
    let bootstrap = proxy.addr().to_string();
    let topic = "synced-commits";
    let messages = ids(0..200);
    let refs: Vec<&str> = messages.iter().map(String::as_str).collect();
    let end = send(&bootstrap, topic, &refs).await?;

    let dir = tempfile::tempdir()?;
    let store = Arc::new(DedupStore::open(DedupConfig::new(
        dir.path().join("store"),
    ))?);
    // offset + 1 -> the store's write count once that record was settled.
    let settled_at: Arc<Mutex<BTreeMap<i64, u64>>> = Arc::default();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    proxy.on_request({
        let (store, settled_at, seen) = (
            Arc::clone(&store),
            Arc::clone(&settled_at),
            Arc::clone(&seen),
        );
        Arc::new(move |api_key, frame| {
            const OFFSET_COMMIT: i16 = 8;
            if api_key != OFFSET_COMMIT {
                return;
            }
            let durable = store.durable_writes();
            let mut body = bytes::Bytes::copy_from_slice(&frame[4..]);
            let version = i16::from_be_bytes([frame[6], frame[7]]);
            let Ok(_header) = RequestHeader::decode(&mut body, 2) else {
                seen.lock().expect("seen").push("undecodable header".into());
                return;
            };
            let Ok(request) = OffsetCommitRequest::decode(&mut body, version) else {
                seen.lock()
                    .expect("seen")
                    .push("undecodable OffsetCommit".into());
                return;
            };
            let settled_at = settled_at.lock().expect("settled");
            for t in &request.topics {
                for p in &t.partitions {
                    let needed = settled_at
                        .range(..=p.committed_offset)
                        .next_back()
                        .map_or(0, |(_, w)| *w);
                    seen.lock().expect("seen").push(if needed <= durable {
                        "ok".into()
                    } else {
                        format!(
                            "offset {} left with {durable} writes synced; its marks need {needed}",
                            p.committed_offset
                        )
                    });
                }
            }
        })
    });
    let mut dedup = member(&bootstrap, "synced-commits-group", topic, &store).await?;
    let started = Instant::now();
    while dedup
        .position(&(topic.to_string(), 0))
        .is_none_or(|p| p < end)
    {
        ensure!(started.elapsed() < PATIENCE, "never read to {end}");
        if let Ok(fresh) = tokio::time::timeout(Duration::from_millis(200), dedup.next()).await {
            let fresh = fresh?;
            let next = fresh.record.offset + 1;
            dedup.done(fresh, |_| {}).await?;
            settled_at
                .lock()
                .expect("settled")
                .insert(next, store.writes());
        }
    }
    dedup.close().await?;
    let seen = seen.lock().expect("seen").clone();
    ensure!(!seen.is_empty(), "no OffsetCommit went through the proxy");
    let bad: Vec<&String> = seen.iter().filter(|s| *s != "ok").collect();
    ensure!(
        bad.is_empty(),
        "{} of {} commits left too early: {bad:?}",
        bad.len(),
        seen.len()
    );
    Ok(())
}

/// Issue 24: a commit that failed (its connection broke) was remembered as sent, so the same
/// offset was never committed again until another record moved it. Here every OffsetCommit
/// is cut until all ten records are settled, then the proxy lets them through and no record
/// comes any more: the group's offset must still reach the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_failed_is_sent_again_without_new_records() -> anyhow::Result<()> {
    const OFFSET_COMMIT: i16 = 8;
    let proxy = FaultProxy::start(FaultPlan::default()).await?;
    let advertised = proxy.addr().to_string();
    let broker = TestBroker::start_with(|c| c.advertised_listener = Some(advertised)).await?;
    proxy.set_upstream(broker.addr());
    let bootstrap = proxy.addr().to_string();
    let topic = "failed-commit";
    let group = "failed-commit-group";
    let messages = ids(0..10);
    let refs: Vec<&str> = messages.iter().map(String::as_str).collect();
    let end = send(&bootstrap, topic, &refs).await?;
    let dir = tempfile::tempdir()?;
    let store = Arc::new(DedupStore::open(DedupConfig::new(
        dir.path().join("store"),
    ))?);
    proxy.set_plan(FaultPlan {
        cut_requests_of_api: Some(OFFSET_COMMIT),
        ..FaultPlan::default()
    });
    let mut dedup = member(&bootstrap, group, topic, &store).await?;
    let started = Instant::now();
    while dedup
        .position(&(topic.to_string(), 0))
        .is_none_or(|p| p < end)
    {
        ensure!(started.elapsed() < PATIENCE, "never read to {end}");
        if let Ok(fresh) = tokio::time::timeout(Duration::from_millis(200), dedup.next()).await {
            dedup.done(fresh?, |_| {}).await?;
        }
    }
    // Commit chances (every 1 ms) while the commits are cut.
    for _ in 0..5 {
        let _ = tokio::time::timeout(Duration::from_millis(50), dedup.next()).await;
    }
    ensure!(
        proxy.requests_cut() > 0,
        "no OffsetCommit was cut: the test proves nothing"
    );
    proxy.set_plan(FaultPlan::default());
    // Never joins: it only reads the group's committed offsets, straight from the broker.
    let checker = Consumer::connect(ConsumerConfig {
        group_instance_id: None,
        ..consumer_config(&broker.bootstrap(), group)
    })
    .await?;
    let tp = (topic.to_string(), 0);
    let started = Instant::now();
    loop {
        // Idle polls: no new record, only the middleware's own upkeep can commit.
        let _ = tokio::time::timeout(Duration::from_millis(100), dedup.next()).await;
        let committed = checker
            .committed(&std::collections::BTreeSet::from([tp.clone()]))
            .await?
            .get(&tp)
            .copied();
        if committed == Some(end) {
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(15),
            "the group's offset stayed at {committed:?} after the failed commits, want {end}"
        );
    }
    drop(dedup); // no close(): close would commit anyway
    Ok(())
}

/// A handler slower than `claim_lease`: the same message id comes again (a resend), and the
/// middleware reclaims it once the lease has run out. Both handlers then settle, adding to a
/// count through the batch. The count must be 1: the first handler's claim was taken over, so
/// its `done` is refused and its state write not applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_whose_lease_ran_out_cannot_settle_after_another_took_the_claim()
-> anyhow::Result<()> {
    let broker = TestBroker::start().await?;
    let bootstrap = broker.bootstrap();
    let topic = "slow-handler";
    // m0, then m0 resent, then m1.
    send(&bootstrap, topic, &["m0", "m0", "m1"]).await?;
    let dir = tempfile::tempdir()?;
    let store = Arc::new(DedupStore::open(DedupConfig {
        claim_lease: Duration::from_millis(300),
        ..DedupConfig::new(dir.path().join("store"))
    })?);
    let count = |store: &DedupStore| -> anyhow::Result<u32> {
        Ok(match store.state(b"count/m0")? {
            Some(bytes) => u32::from_be_bytes(bytes.as_slice().try_into()?),
            None => 0,
        })
    };
    let mut dedup = member(&bootstrap, "slow-handler-group", topic, &store).await?;
    let slow = next(&mut dedup).await?;
    ensure!(
        slow.record.offset == 0,
        "first record at {}",
        slow.record.offset
    );
    // The resend waits aside while its claim is held: m1 comes first.
    let m1 = next(&mut dedup).await?;
    ensure!(
        m1.record.offset == 2,
        "second record at {}",
        m1.record.offset
    );
    dedup.done(m1, |_| {}).await?;
    // Then the resend, once the slow handler's lease has run out.
    let fast = next(&mut dedup).await?;
    ensure!(
        fast.record.offset == 1 && fast.reclaimed(),
        "the resend at offset {} (reclaimed: {})",
        fast.record.offset,
        fast.reclaimed()
    );
    let before = count(&store)?;
    dedup
        .done(fast, |state| {
            state.put(b"count/m0", &(before + 1).to_be_bytes());
        })
        .await?;
    let before = count(&store)?;
    let late = dedup
        .done(slow, |state| {
            state.put(b"count/m0", &(before + 1).to_be_bytes());
        })
        .await;
    ensure!(
        late.is_err(),
        "the handler whose claim was taken over settled too (count now {})",
        count(&store)?
    );
    ensure!(count(&store)? == 1, "m0 counted {} times", count(&store)?);
    Ok(())
}

/// With the changelog: marks written locally but never acknowledged by the changelog (the
/// host crashed first) must reach it after the restart, or a host that takes the partition
/// over later does not know them: a resend of such a message would be handled twice. Host A
/// handles m0..m9 and crashes right after its last `done` (m9's mark never left); it restarts
/// on the same store, handles m10 and closes. Host B (its own store) takes over and gets a
/// resend of m9: it must drop it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marks_the_changelog_never_acknowledged_reach_it_after_a_restart() -> anyhow::Result<()> {
    let broker = TestBroker::start().await?;
    let bootstrap = broker.bootstrap();
    let topic = "changelog-resend";
    let group = "changelog-resend-group";
    let first = ids(0..10);
    let first: Vec<&str> = first.iter().map(String::as_str).collect();
    send(&bootstrap, topic, &first).await?;
    let with_changelog = || MiddlewareConfig {
        changelog: Some(semel::consumer::dedup::ChangelogConfig::default()),
        ..middleware()
    };
    let host = |store: &Arc<DedupStore>| {
        let (bootstrap, store) = (bootstrap.clone(), Arc::clone(store));
        async move {
            let mut consumer = Consumer::connect(consumer_config(&bootstrap, group)).await?;
            consumer.subscribe([topic])?;
            anyhow::Ok(DedupConsumer::new(consumer, store, with_changelog())?)
        }
    };
    let dir = tempfile::tempdir()?;
    {
        let store = Arc::new(DedupStore::open(DedupConfig::new(dir.path().join("a")))?);
        let mut a = host(&store).await?;
        for n in 0..10 {
            let fresh = next(&mut a).await?;
            ensure!(id(&fresh) == format!("m{n}"), "host A got {}", id(&fresh));
            a.done(fresh, |_| {}).await?;
        }
        // Crash: m9's mark is in the store only.
    }
    send(&bootstrap, topic, &["m10"]).await?;
    {
        let store = Arc::new(DedupStore::open(DedupConfig::new(dir.path().join("a")))?);
        let mut a = host(&store).await?;
        let fresh = next(&mut a).await?;
        ensure!(
            id(&fresh) == "m10",
            "host A after its restart got {}",
            id(&fresh)
        );
        a.done(fresh, |_| {}).await?;
        a.flush_changelog().await?;
        a.close().await?;
    }
    let end = send(&bootstrap, topic, &["m9"]).await?;
    let handled = handled_by_the_next_member_with(
        &bootstrap,
        group,
        topic,
        &dir.path().join("b"),
        end,
        with_changelog(),
    )
    .await?;
    ensure!(
        handled.is_empty(),
        "host B handled {handled:?}: the resent m9 should have been dropped"
    );
    Ok(())
}

/// The batch API: `next_batch` claims what is fetched with one store write, `done_many`
/// settles a batch with one more. A batch dropped unsettled (a handler that panicked) is
/// handed out again, records first; settled at last in one write, the whole partition is
/// committed, and the next member has nothing to handle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_settles_with_one_write_and_a_dropped_batch_comes_again() -> anyhow::Result<()> {
    let broker = TestBroker::start().await?;
    let bootstrap = broker.bootstrap();
    let topic = "batch-settle";
    let messages = ids(0..10);
    let messages: Vec<&str> = messages.iter().map(String::as_str).collect();
    let end = send(&bootstrap, topic, &messages).await?;
    let group = format!("{topic}-group");
    let dir = tempfile::tempdir()?;
    let store_path = dir.path().join("store");
    {
        let store = Arc::new(DedupStore::open(DedupConfig::new(&store_path))?);
        let mut dedup = member(&bootstrap, &group, topic, &store).await?;
        let first = tokio::time::timeout(PATIENCE, dedup.next_batch(4))
            .await
            .context("no batch within PATIENCE")??;
        ensure!(
            !first.is_empty() && first.len() <= 4 && id(&first[0]) == "m0",
            "first batch {:?}",
            first.iter().map(id).collect::<Vec<_>>()
        );
        drop(first); // a handler that panicked: every record comes again
        let mut all = Vec::new();
        let started = Instant::now();
        while all.len() < 10 {
            ensure!(
                started.elapsed() < PATIENCE,
                "only {:?} handed out again",
                all.iter().map(id).collect::<Vec<_>>()
            );
            if let Ok(batch) =
                tokio::time::timeout(Duration::from_millis(200), dedup.next_batch(100)).await
            {
                all.extend(batch?);
            }
        }
        let mut seen: Vec<String> = all.iter().map(id).collect();
        seen.sort();
        let mut want = ids(0..10);
        want.sort();
        ensure!(seen == want, "handed out {seen:?}, want m0..m9 once each");
        ensure!(dedup.in_flight() == 10, "in flight: {}", dedup.in_flight());
        let writes = store.writes();
        dedup
            .done_many(all, |state| state.put(b"batches", b"1"))
            .await?;
        ensure!(
            store.writes() == writes + 1,
            "done_many took {} writes",
            store.writes() - writes
        );
        ensure!(dedup.in_flight() == 0, "in flight: {}", dedup.in_flight());
        ensure!(
            store.offset(&group, topic, 0)? == Some(end),
            "store offset {:?}, want {end}",
            store.offset(&group, topic, 0)?
        );
        dedup.close().await?;
    }
    let handled = handled_by_the_next_member(&bootstrap, &group, topic, &store_path, end).await?;
    ensure!(
        handled.is_empty(),
        "the next member handled {handled:?} again"
    );
    Ok(())
}

/// A task of the test's runtime that ticks every 10 ms and measures its longest gap: how long
/// the runtime stood still.
struct Ticker {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Duration>,
}

impl Ticker {
    fn start() -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = tokio::spawn({
            let stop = Arc::clone(&stop);
            async move {
                let mut worst = Duration::ZERO;
                let mut last = Instant::now();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    worst = worst.max(last.elapsed());
                    last = Instant::now();
                }
                worst
            }
        });
        Self { stop, task }
    }

    /// The longest gap between two ticks.
    async fn stop(self) -> anyhow::Result<Duration> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(self.task.await?)
    }
}

/// A store hook (`on_sync`, `on_write`) that counts its calls and takes `ms` each: a slow
/// disk, or writes that RocksDB stalls.
fn slow_hook(
    calls: &Arc<std::sync::atomic::AtomicUsize>,
    ms: u64,
) -> impl Fn() + Send + Sync + 'static {
    let calls = Arc::clone(calls);
    move || {
        calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(ms));
    }
}

/// Defect (issue 24): the store's syncs ran on the runtime's worker threads, so a slow fsync
/// (a busy disk) stalled every other task of the application meanwhile: here the runtime has
/// one thread, and a task that ticks every 10 ms must keep ticking while the middleware
/// commits (each commit syncs the store first; the sync is made to take 800 ms).
#[tokio::test(flavor = "current_thread")]
async fn a_slow_store_sync_does_not_stall_the_runtime() -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};

    let topic = "slow-sync";
    let Fixture {
        _broker,
        bootstrap,
        end,
        _dir,
        store,
        ..
    } = fixture(topic, 20).await?;
    let syncs = Arc::new(AtomicUsize::new(0));
    store.on_sync(slow_hook(&syncs, 800));
    let ticker = Ticker::start();

    let mut dedup = member(&bootstrap, "slow-sync-group", topic, &store).await?;
    let started = Instant::now();
    while dedup
        .position(&(topic.to_string(), 0))
        .is_none_or(|p| p < end)
        || syncs.load(Ordering::SeqCst) == 0
    {
        ensure!(
            started.elapsed() < PATIENCE,
            "never read to {end} and synced"
        );
        if let Ok(fresh) = tokio::time::timeout(Duration::from_millis(200), dedup.next()).await {
            fresh?.done(|_| {}).await?;
        }
    }
    dedup.close().await?;
    let worst = ticker.stop().await?;
    let syncs = syncs.load(Ordering::SeqCst);
    ensure!(syncs > 0, "the store was never synced");
    ensure!(
        worst < Duration::from_millis(400),
        "a task of the same runtime stood still for {worst:?} while the store synced ({syncs} syncs of 800 ms)"
    );
    Ok(())
}

/// Defect (issue 24): the store's writes ran on the runtime's worker threads: each `next`'s
/// claims, each `done`'s batch, the release of a failed handle's claim. A write is
/// microseconds, until RocksDB stalls writes (compaction falling behind, a slow disk); then
/// every other task of the application stood still with it. Here the runtime has one thread,
/// every write is made to take 400 ms, and a task that ticks every 10 ms must keep ticking
/// while records are claimed, failed, handed out again and settled. A `next` cut short by a
/// timeout while its claim is under way loses nothing: every id is handled once.
#[tokio::test(flavor = "current_thread")]
async fn a_stalled_store_write_does_not_stall_the_runtime() -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};

    let topic = "slow-write";
    let Fixture {
        _broker,
        bootstrap,
        end,
        _dir,
        store,
        messages,
    } = fixture(topic, 4).await?;
    let writes = Arc::new(AtomicUsize::new(0));
    store.on_write(slow_hook(&writes, 400));
    let ticker = Ticker::start();

    let mut dedup = member(&bootstrap, "slow-write-group", topic, &store).await?;
    let mut handled: BTreeMap<String, u32> = BTreeMap::new();
    let mut failed_one = false;
    let started = Instant::now();
    while dedup
        .position(&(topic.to_string(), 0))
        .is_none_or(|p| p < end)
        || handled.len() < messages.len()
    {
        ensure!(started.elapsed() < PATIENCE, "handled only {handled:?}");
        if let Ok(fresh) = tokio::time::timeout(Duration::from_millis(200), dedup.next()).await {
            let fresh = fresh?;
            if !failed_one {
                failed_one = true;
                fresh.failed().await?;
                continue;
            }
            *handled.entry(id(&fresh)).or_default() += 1;
            fresh.done(|_| {}).await?;
        }
    }
    dedup.close().await?;
    let worst = ticker.stop().await?;
    let writes = writes.load(Ordering::SeqCst);
    ensure!(
        handled.len() == messages.len() && handled.values().all(|&n| n == 1),
        "handled {handled:?}"
    );
    ensure!(writes > 0, "the store was never written");
    ensure!(
        worst < Duration::from_millis(300),
        "a task of the same runtime stood still for {worst:?} while the store wrote ({writes} writes of 400 ms)"
    );
    Ok(())
}

/// Defect (issue 24, found in review): a consumer dropped while a claim ran on its store
/// thread (a `next` cut short, then the consumer dropped: a restart loop) left that claim
/// held in the store, so the next consumer of the same store waited out the claim's lease
/// (30 s) before handing the record out. The claim is released once it has run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_under_way_when_its_consumer_is_dropped_is_released() -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};

    let topic = "claim-dropped";
    let Fixture {
        _broker,
        bootstrap,
        _dir,
        store,
        ..
    } = fixture(topic, 3).await?;
    let writing = Arc::new(AtomicBool::new(false));
    store.on_write({
        let writing = Arc::clone(&writing);
        move || {
            if !writing.swap(true, Ordering::SeqCst) {
                // The first write is the first claim's: it is still under way when the
                // consumer is dropped.
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    });
    let mut first = member(&bootstrap, "claim-dropped-group", topic, &store).await?;
    let started = Instant::now();
    while !writing.load(Ordering::SeqCst) {
        ensure!(started.elapsed() < PATIENCE, "no claim started");
        let _ = tokio::time::timeout(Duration::from_millis(20), first.next()).await;
    }
    drop(first);
    // The next consumer may claim m0 while the dropped one's claim still runs (then m0 waits
    // aside, and the records after it come first): it must come within seconds all the same.
    let mut second = member(&bootstrap, "claim-dropped-group", topic, &store).await?;
    let started = Instant::now();
    let mut seen = Vec::new();
    while !seen.iter().any(|id| id == "m0") {
        ensure!(
            started.elapsed() < Duration::from_secs(15),
            "m0 was not handed out again within 15 s (its claim was still held); handed out {seen:?}"
        );
        let Ok(fresh) = tokio::time::timeout(Duration::from_millis(500), second.next()).await
        else {
            continue;
        };
        let fresh = fresh?;
        seen.push(id(&fresh));
        let mut settling = fresh.done(|_| {});
        (&mut settling).await?;
        ensure!(
            (&mut settling).await.is_err(),
            "a settle awaited again after its result gave a result again"
        );
    }
    second.close().await?;
    Ok(())
}

/// Defect (issue 24, found in review): a store call that panicked on the store thread (here
/// a write hook; in life a bug) panicked the caller too ("called after complete", from
/// tokio's oneshot polled after it was found closed) instead of answering `Interrupted`.
/// The claim's and the settle's callers both get the error, and nothing panics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_call_that_panics_answers_an_error() -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};

    let topic = "store-panic";
    let Fixture {
        _broker,
        bootstrap,
        _dir,
        store,
        ..
    } = fixture(topic, 3).await?;
    // The first write (the first claim's) and the third (the first settle's) panic.
    let writes = Arc::new(AtomicUsize::new(0));
    store.on_write({
        let writes = Arc::clone(&writes);
        move || {
            let n = writes.fetch_add(1, Ordering::SeqCst);
            if n == 0 || n == 2 {
                // Unwinds at once (no panic hook, no backtrace): the answer is seen closed
                // while its caller still spins for it.
                std::panic::resume_unwind(Box::new(format!("write {n} made to fail")));
            }
        }
    });
    let mut dedup = member(&bootstrap, "store-panic-group", topic, &store).await?;
    let started = Instant::now();
    let mut claim_failed = false;
    let fresh = loop {
        ensure!(started.elapsed() < PATIENCE, "no record handed out");
        match tokio::time::timeout(Duration::from_millis(500), dedup.next()).await {
            Err(_) => continue,
            Ok(Err(e)) => {
                ensure!(e.to_string().contains("panicked"), "unexpected error: {e}");
                claim_failed = true;
            }
            Ok(Ok(fresh)) => break fresh,
        }
    };
    ensure!(claim_failed, "the panicking claim answered no error");
    // The second write: the claim again. The third, this settle's, panics; it is over by the
    // time the settle is awaited.
    let settling = fresh.done(|_| {});
    tokio::time::sleep(Duration::from_millis(200)).await;
    let settled = settling.await;
    ensure!(
        settled
            .as_ref()
            .is_err_and(|e| e.to_string().contains("panicked")),
        "the panicking settle answered {settled:?}"
    );
    dedup.close().await?;
    Ok(())
}

/// Defect: a handler's `done` closure ran under the middleware's lock (and the store's), so a
/// closure that gave another handle back (dropped it: its handler gave up) or read the
/// store waited for itself forever. Bounded: the settle runs on its own thread, and a hang
/// fails the test. The handle dropped inside comes again, and every id counts once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_done_closure_may_drop_another_handle_and_read_the_store() -> anyhow::Result<()> {
    let topic = "closure-reentry";
    let Fixture {
        _broker,
        bootstrap,
        end,
        _dir,
        store,
        messages,
    } = fixture(topic, 5).await?;
    let mut dedup = member(&bootstrap, "closure-reentry-group", topic, &store).await?;
    let first = next(&mut dedup).await?;
    let second = next(&mut dedup).await?;
    ensure!(
        id(&first) == "m0" && id(&second) == "m1",
        "read out of order"
    );
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn({
        let store = Arc::clone(&store);
        move || {
            let done = first.done_blocking(|batch| {
                drop(second);
                let fresh = store.counts().fresh;
                batch.put(b"fresh-seen", fresh.to_string().as_bytes());
            });
            let _ = tx.send(done.map_err(anyhow::Error::from));
        }
    });
    match tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(10))).await? {
        Ok(done) => done?,
        Err(_) => {
            anyhow::bail!("done() never returned: its closure waited for a lock held around it")
        }
    }
    let mut handled: BTreeMap<String, u32> = BTreeMap::from([("m0".to_string(), 1)]);
    let started = Instant::now();
    while dedup
        .position(&(topic.to_string(), 0))
        .is_none_or(|p| p < end)
        || handled.len() < messages.len()
    {
        ensure!(started.elapsed() < PATIENCE, "handled only {handled:?}");
        if let Ok(fresh) = tokio::time::timeout(Duration::from_millis(200), dedup.next()).await {
            let fresh = fresh?;
            *handled.entry(id(&fresh)).or_default() += 1;
            fresh.done(|_| {}).await?;
        }
    }
    ensure!(handled.values().all(|&n| n == 1), "handled {handled:?}");
    ensure!(
        store.state(b"fresh-seen")?.is_some(),
        "the closure's write is missing"
    );
    dedup.close().await?;
    Ok(())
}

/// Defect (issue 24): a handler that takes several records with `next()` before settling them
/// together (`done_many`) got stuck when a message came twice among them. The second copy's
/// key was claimed by the first copy's handle, so `next()` waited out the whole claim lease
/// (30 s by default) for a handle only the caller could settle; it then took the claim over,
/// and `done_many` of both copies was refused (`LeaseLost`), both were handed out again, and
/// the same wait came back: a livelock. A copy whose key is claimed must wait aside while the
/// records after it are handed out, and be dropped as a duplicate once its key is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_a_record_in_flight_waits_aside_and_is_dropped_once_the_first_is_done()
-> anyhow::Result<()> {
    let broker = TestBroker::start().await?;
    let bootstrap = broker.bootstrap();
    let topic = "copy-in-flight";
    // m0, m0 resent, m1, m2.
    let end = send(&bootstrap, topic, &["m0", "m0", "m1", "m2"]).await?;
    let dir = tempfile::tempdir()?;
    let store = Arc::new(DedupStore::open(DedupConfig {
        claim_lease: Duration::from_secs(60),
        ..DedupConfig::new(dir.path().join("store"))
    })?);
    let group = format!("{topic}-group");
    let mut dedup = member(&bootstrap, &group, topic, &store).await?;
    let mut batch = vec![next(&mut dedup).await?];
    for _ in 0..2 {
        let fresh = tokio::time::timeout(Duration::from_secs(10), dedup.next())
            .await
            .with_context(|| {
                format!(
                    "next() stood still with {:?} in hand (the copy of m0 waits for a claim \
                     only this caller can settle)",
                    batch.iter().map(id).collect::<Vec<_>>()
                )
            })??;
        batch.push(fresh);
    }
    let got: Vec<(String, i64)> = batch.iter().map(|f| (id(f), f.record.offset)).collect();
    ensure!(
        got == [("m0".to_string(), 0), ("m1".into(), 2), ("m2".into(), 3)],
        "handed out {got:?}"
    );
    dedup
        .done_many(batch, |state| state.put(b"handled", b"3"))
        .await?;
    // The copy is dropped now that m0 is done; nothing else comes.
    let started = Instant::now();
    while dedup.position(&(topic.to_string(), 0)) != Some(end) || dedup.in_flight() != 0 {
        ensure!(
            started.elapsed() < Duration::from_secs(10),
            "the copy of m0 was never settled: position {:?}, in flight {}",
            dedup.position(&(topic.to_string(), 0)),
            dedup.in_flight()
        );
        if let Ok(extra) = tokio::time::timeout(Duration::from_millis(100), dedup.next()).await {
            let extra = extra?;
            anyhow::bail!("handed out {} at {} again", id(&extra), extra.record.offset);
        }
    }
    ensure!(
        dedup.metrics().duplicates == 1,
        "duplicates {}",
        dedup.metrics().duplicates
    );
    dedup.close().await?;
    drop(store);
    let handled =
        handled_by_the_next_member(&bootstrap, &group, topic, &dir.path().join("store"), end)
            .await?;
    ensure!(
        handled.is_empty(),
        "the next member handled {handled:?} again"
    );
    Ok(())
}

/// The records waiting aside for a claim are capped (1024), so memory stays bounded when one
/// message comes many times while its first copy is in flight: past the cap nothing more is
/// read, and once the first copy is done every waiting copy is dropped and reading goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_waiting_aside_are_capped_and_drain_once_the_first_is_done() -> anyhow::Result<()> {
    const COPIES: usize = 1100;
    let broker = TestBroker::start().await?;
    let bootstrap = broker.bootstrap();
    let topic = "copies-capped";
    let mut messages = vec!["m0"; COPIES];
    messages.push("m1");
    let end = send(&bootstrap, topic, &messages).await?;
    let dir = tempfile::tempdir()?;
    let store = Arc::new(DedupStore::open(DedupConfig {
        claim_lease: Duration::from_secs(60),
        ..DedupConfig::new(dir.path().join("store"))
    })?);
    let mut dedup = member(&bootstrap, &format!("{topic}-group"), topic, &store).await?;
    let m0 = next(&mut dedup).await?;
    ensure!(
        m0.record.offset == 0,
        "first record at {}",
        m0.record.offset
    );
    // The copies fill the cap; m1, behind the rest of them, is not reached.
    if let Ok(got) = tokio::time::timeout(Duration::from_secs(3), dedup.next()).await {
        let got = got?;
        anyhow::bail!(
            "handed out {} at {} while m0 is in flight",
            id(&got),
            got.record.offset
        );
    }
    let position = dedup.position(&(topic.to_string(), 0));
    ensure!(
        position == Some(1),
        "position {position:?}: the copies waiting aside still count as not read"
    );
    ensure!(
        dedup.in_flight() == 1025,
        "in flight: {}",
        dedup.in_flight()
    );
    dedup.done(m0, |_| {}).await?;
    let m1 = next(&mut dedup).await?;
    ensure!(
        id(&m1) == "m1" && m1.record.offset == end - 1,
        "then {} at {}",
        id(&m1),
        m1.record.offset
    );
    dedup.done(m1, |_| {}).await?;
    ensure!(
        dedup.metrics().duplicates == COPIES as u64 - 1,
        "duplicates {}",
        dedup.metrics().duplicates
    );
    dedup.close().await?;
    Ok(())
}
