//! Duplicate consumption, shown: a consumer keeps account balances, handles transfers, and
//! crashes after handling a batch but before its offset commit. When it restarts, the group
//! hands it the transfers since the last commit again. A plain consumer applies them twice;
//! with Semel's dedup store (balances written through the store's atomic batch) every
//! transfer counts once. The producer also resends 5% of the transfers (a resend after a
//! producer restart, which broker idempotence cannot catch): the store drops those too.
//!
//! ```sh
//! cargo run --example duplicate_consume            # 5,000 transfers
//! cargo run --example duplicate_consume -- --quick # 1,000
//! cargo run --example duplicate_consume -- --bootstrap 127.0.0.1:9092
//! ```
//! Without `--bootstrap` it runs an embedded semel-broker. The crash is simulated in-process:
//! the consumer is dropped without commit or LeaveGroup; it is a static group member
//! (`group.instance.id`), so its restart takes its place at once. The process exits non-zero
//! if the dedup run's balances are off, or if the plain run's are right (no redelivery).
//!
//! The rebalance variant: host A (its own store) crashes, and the partition moves to host B
//! (another store, as on another machine) once A's session times out (6 s). Each host books
//! the transfers it handled; the bank's balance is the sum. Without the dedup changelog B has
//! never seen A's keys and books A's uncommitted transfers again; with it, B replays A's
//! marks (`<group>-semel-dedup-changelog`) before it handles anything, and the sum is exact.

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, ensure};
use clap::Parser;
use semel::consumer::dedup::{
    ChangelogConfig, DedupConfig, DedupConsumer, DedupStore, MiddlewareConfig,
};
use semel::consumer::{AutoOffsetReset, Consumer, ConsumerConfig, Strategy};
use semel::producer::{Producer, ProducerConfig, ProducerRecord};
use support::Patience;

/// Duplicate-consume demo.
#[derive(Debug, Parser)]
struct Args {
    /// A Kafka-protocol broker; without it an embedded one is started.
    #[arg(long)]
    bootstrap: Option<String>,
    /// Transfers to send.
    #[arg(long, default_value_t = 5_000)]
    transfers: usize,
    /// A quick run (1,000 transfers), as the tests do.
    #[arg(long)]
    quick: bool,
}

const ACCOUNTS: usize = 10;

/// The bound on each of the run's waits (a quick run needs a few seconds for each).
const LIMIT: Duration = Duration::from_secs(120);

fn host_a_wait(changelog: bool) -> &'static str {
    if changelog {
        "host A (changelog) to handle its records"
    } else {
        "host A (no changelog) to handle its records"
    }
}

fn host_b_wait(changelog: bool) -> &'static str {
    if changelog {
        "host B (changelog) to be assigned the partition and read it to its end"
    } else {
        "host B (no changelog) to be assigned the partition and read it to its end"
    }
}

/// Transfer `n`: account `n % 10` gets `n % 7 + 1`.
fn transfer(n: usize) -> (String, i64) {
    (format!("acct-{}", n % ACCOUNTS), (n % 7 + 1) as i64)
}

/// Where the consumer crashes: 77 records past a commit (commits every 200).
fn crash_point(sent: usize) -> usize {
    (sent / 2 / 200) * 200 + 77
}

fn expected(transfers: usize) -> BTreeMap<String, i64> {
    let mut balances = BTreeMap::new();
    for n in 0..transfers {
        let (account, amount) = transfer(n);
        *balances.entry(account).or_default() += amount;
    }
    balances
}

fn parse(value: Option<&[u8]>) -> anyhow::Result<(String, i64)> {
    let text = std::str::from_utf8(value.unwrap_or_default())?;
    let (account, amount) = text.split_once(':').context("account:amount")?;
    Ok((account.to_string(), amount.parse()?))
}

async fn produce(bootstrap: &str, topic: &str, transfers: usize) -> anyhow::Result<usize> {
    let producer = Producer::connect(ProducerConfig {
        bootstrap_servers: vec![bootstrap.to_string()],
        ..ProducerConfig::default()
    })
    .await?;
    let mut sent = 0;
    let mut deliveries = Vec::new();
    // Every 20th transfer is sent twice, the second time much later.
    let order = (0..transfers).chain((0..transfers).filter(|n| n % 20 == 0));
    for n in order {
        let (account, amount) = transfer(n);
        let record = ProducerRecord::new(topic, format!("{account}:{amount}"))
            .key(account)
            .header("semel-msg-id", format!("transfer-{n}"));
        deliveries.push(producer.send(record).await?);
        sent += 1;
    }
    for delivery in deliveries {
        delivery.await?;
    }
    producer.close().await;
    Ok(sent)
}

fn consumer_config(bootstrap: &str, group: &str) -> ConsumerConfig {
    ConsumerConfig {
        bootstrap_servers: vec![bootstrap.to_string()],
        group_id: Some(group.to_string()),
        // A static member: the restarted process takes the crashed one's place at once.
        group_instance_id: Some(format!("{group}-1")),
        auto_offset_reset: AutoOffsetReset::Earliest,
        partition_assignment_strategy: vec![Strategy::Range],
        fetch_max_wait: Duration::from_millis(100),
        ..ConsumerConfig::default()
    }
}

/// The plain consumer: balances in a map that survives the crash (think: a database),
/// offsets committed every 200 records.
async fn plain(bootstrap: &str, topic: &str, sent: usize) -> anyhow::Result<BTreeMap<String, i64>> {
    let group = format!("{topic}-plain");
    let mut balances: BTreeMap<String, i64> = BTreeMap::new();
    let mut handled = 0;
    let crash_at = crash_point(sent);
    // First life: crashes after handling `crash_at` transfers, 77 past its last commit.
    {
        let mut consumer = Consumer::connect(consumer_config(bootstrap, &group)).await?;
        consumer.subscribe([topic])?;
        let patience = Patience::new("the plain consumer's first life", LIMIT);
        'first: loop {
            patience.check(|| format!("{handled} of {crash_at} handled"))?;
            for record in consumer.poll(Duration::from_secs(1)).await? {
                let (account, amount) = parse(record.value.as_deref())?;
                *balances.entry(account).or_default() += amount;
                handled += 1;
                let tp = record.topic_partition();
                if handled % 200 == 0 {
                    consumer
                        .commit_offsets(&[(tp, record.offset + 1)].into())
                        .await?;
                }
                if handled == crash_at {
                    break 'first; // crash: no commit, no LeaveGroup
                }
            }
        }
    }
    // Second life: the group hands out everything since the last commit again.
    let mut consumer = Consumer::connect(consumer_config(bootstrap, &group)).await?;
    consumer.subscribe([topic])?;
    let patience = Patience::new("the plain consumer's second life", LIMIT);
    while consumer
        .position(&(topic.to_string(), 0))
        .is_none_or(|p| p < sent as i64)
    {
        patience.check(|| {
            format!(
                "position {:?} of {sent}",
                consumer.position(&(topic.to_string(), 0))
            )
        })?;
        for record in consumer.poll(Duration::from_secs(1)).await? {
            let (account, amount) = parse(record.value.as_deref())?;
            *balances.entry(account).or_default() += amount;
        }
    }
    consumer.commit().await?;
    consumer.close().await?;
    Ok(balances)
}

/// The Semel consumer: balances written through the dedup store's batch.
async fn with_dedup(
    bootstrap: &str,
    topic: &str,
    sent: usize,
) -> anyhow::Result<(BTreeMap<String, i64>, u64)> {
    let group = format!("{topic}-semel");
    let dir = tempfile::tempdir()?;
    let store_path = dir.path().join("dedup");
    let crash_at = crash_point(sent);
    let position = |dedup: &DedupConsumer| dedup.position(&(topic.to_string(), 0));
    let mut dropped = 0;
    {
        let store = Arc::new(DedupStore::open(DedupConfig::new(&store_path))?);
        let mut consumer = Consumer::connect(consumer_config(bootstrap, &group)).await?;
        consumer.subscribe([topic])?;
        let mut dedup =
            DedupConsumer::new(consumer, Arc::clone(&store), MiddlewareConfig::default())?;
        let mut handled = 0;
        let patience = Patience::new("the dedup consumer's first life", LIMIT);
        while handled < crash_at {
            let fresh = patience.wait(dedup.next()).await??;
            book(&mut dedup, fresh).await?;
            handled += 1;
        }
        dropped += dedup.metrics().duplicates;
        // crash: the DedupConsumer and the store are dropped, nothing more is committed
    }
    let store = Arc::new(DedupStore::open(DedupConfig::new(&store_path))?);
    let mut consumer = Consumer::connect(consumer_config(bootstrap, &group)).await?;
    consumer.subscribe([topic])?;
    let mut dedup = DedupConsumer::new(consumer, Arc::clone(&store), MiddlewareConfig::default())?;
    let patience = Patience::new("the dedup consumer's second life", LIMIT);
    loop {
        if position(&dedup).is_some_and(|p| p >= sent as i64) {
            break;
        }
        patience.check(|| format!("position {:?} of {sent}", position(&dedup)))?;
        match tokio::time::timeout(Duration::from_millis(500), dedup.next()).await {
            Ok(fresh) => book(&mut dedup, fresh?).await?,
            Err(_) => continue,
        }
    }
    dropped += dedup.metrics().duplicates;
    let balances = balances_of(&store)?;
    dedup.close().await?;
    Ok((balances, dropped))
}

fn balances_of(store: &DedupStore) -> anyhow::Result<BTreeMap<String, i64>> {
    let mut balances = BTreeMap::new();
    for a in 0..ACCOUNTS {
        let account = format!("acct-{a}");
        let value = store
            .state(format!("balance/{account}").as_bytes())?
            .map(|b| i64::from_be_bytes(b.as_slice().try_into().unwrap_or_default()))
            .unwrap_or(0);
        balances.insert(account, value);
    }
    Ok(balances)
}

/// Books a transfer in the host's own store, with its mark and offset.
async fn book(
    dedup: &mut DedupConsumer,
    fresh: semel::consumer::dedup::Fresh,
) -> anyhow::Result<()> {
    let (account, amount) = parse(fresh.record.value.as_deref())?;
    let key = format!("balance/{account}");
    let old = dedup
        .store()
        .state(key.as_bytes())?
        .map(|b| i64::from_be_bytes(b.as_slice().try_into().unwrap_or_default()))
        .unwrap_or(0);
    dedup
        .done(fresh, |state| {
            state.put(key.as_bytes(), &(old + amount).to_be_bytes());
        })
        .await?;
    Ok(())
}

/// The rebalance variant: host A crashes, host B (its own store) takes the partition over.
/// Returns the summed balances, the duplicates B dropped and the marks it replayed.
async fn moved(
    bootstrap: &str,
    topic: &str,
    sent: usize,
    changelog: bool,
) -> anyhow::Result<(BTreeMap<String, i64>, u64, u64)> {
    let group = format!(
        "{topic}-moved-{}",
        if changelog { "changelog" } else { "local" }
    );
    let config = |host: &str| ConsumerConfig {
        group_instance_id: None,
        client_id: format!("host-{host}"),
        session_timeout: Duration::from_secs(6),
        heartbeat_interval: Duration::from_millis(500),
        ..consumer_config(bootstrap, &group)
    };
    let middleware = || MiddlewareConfig {
        changelog: changelog.then(ChangelogConfig::default),
        ..MiddlewareConfig::default()
    };
    let dir = tempfile::tempdir()?;
    let crash_at = crash_point(sent);
    let store_a = Arc::new(DedupStore::open(DedupConfig::new(
        dir.path().join("host-a"),
    ))?);
    {
        let mut consumer = Consumer::connect(config("a")).await?;
        consumer.subscribe([topic])?;
        let mut dedup = DedupConsumer::new(consumer, Arc::clone(&store_a), middleware())?;
        let patience = Patience::new(host_a_wait(changelog), LIMIT);
        for _ in 0..crash_at {
            let fresh = patience.wait(dedup.next()).await??;
            book(&mut dedup, fresh).await?;
        }
        // The marks reached the changelog (when there is one); the crash comes before the
        // next offset commit.
        patience.wait(dedup.flush_changelog()).await??;
        // crash: dropped without commit or LeaveGroup
    }
    let store_b = Arc::new(DedupStore::open(DedupConfig::new(
        dir.path().join("host-b"),
    ))?);
    let mut consumer = Consumer::connect(config("b")).await?;
    consumer.subscribe([topic])?;
    let mut dedup = DedupConsumer::new(consumer, Arc::clone(&store_b), middleware())?;
    // Host A's session has to time out (6 s) before B is given the partition.
    let patience = Patience::new(host_b_wait(changelog), LIMIT);
    while dedup
        .position(&(topic.to_string(), 0))
        .is_none_or(|p| p < sent as i64)
    {
        let assignment = dedup.consumer().assignment();
        patience.check(|| {
            format!(
                "position {:?} of {sent}, assignment {assignment:?}",
                dedup.position(&(topic.to_string(), 0)),
            )
        })?;
        match tokio::time::timeout(Duration::from_millis(500), dedup.next()).await {
            Ok(fresh) => book(&mut dedup, fresh?).await?,
            Err(_) => continue,
        }
    }
    let metrics = dedup.metrics();
    dedup.close().await?;
    let mut balances = balances_of(&store_a)?;
    for (account, value) in balances_of(&store_b)? {
        *balances.entry(account).or_default() += value;
    }
    Ok((
        balances,
        metrics.duplicates,
        metrics.changelog.marks_restored,
    ))
}

fn off_by(balances: &BTreeMap<String, i64>, expected: &BTreeMap<String, i64>) -> i64 {
    expected
        .iter()
        .map(|(a, e)| (balances.get(a).copied().unwrap_or(0) - e).abs())
        .sum()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let transfers = if args.quick { 1_000 } else { args.transfers };
    let broker = support::ExampleBroker::start(args.bootstrap.as_deref(), |_| {}).await?;
    let bootstrap = broker.bootstrap.clone();
    let topic = format!("transfers-{}", std::process::id());
    support::create_topics(&bootstrap, &[(&topic, 1)]).await?;
    let sent = produce(&bootstrap, &topic, transfers).await?;
    let expected = expected(transfers);
    let total: i64 = expected.values().sum();
    println!(
        "duplicate_consume: {transfers} transfers ({sent} records: every 20th sent twice) over {ACCOUNTS} accounts, total {total}; \
         the consumer crashes after handling {} records, 77 past its last offset commit\n",
        crash_point(sent)
    );
    let plain_balances = plain(&bootstrap, &topic, sent).await?;
    let (semel_balances, dropped) = with_dedup(&bootstrap, &topic, sent).await?;
    let ((local_balances, local_dropped, _), (logged_balances, logged_dropped, restored)) = tokio::try_join!(
        moved(&bootstrap, &topic, sent, false),
        moved(&bootstrap, &topic, sent, true)
    )?;
    let plain_total: i64 = plain_balances.values().sum();
    let semel_total: i64 = semel_balances.values().sum();
    println!("| consumer | ledger total | expected | off by | duplicates dropped |");
    println!("|---|---|---|---|---|");
    println!(
        "| plain (commit every 200) | {plain_total} | {total} | {} | 0 |",
        off_by(&plain_balances, &expected)
    );
    println!(
        "| Semel dedup store | {semel_total} | {total} | {} | {dropped} |",
        off_by(&semel_balances, &expected)
    );
    println!(
        "| partition moves to host B, own store, no changelog | {} | {total} | {} | {local_dropped} |",
        local_balances.values().sum::<i64>(),
        off_by(&local_balances, &expected)
    );
    println!(
        "| partition moves to host B, own store, dedup changelog ({restored} marks replayed) | {} | {total} | {} | {logged_dropped} |",
        logged_balances.values().sum::<i64>(),
        off_by(&logged_balances, &expected)
    );
    println!();
    println!(
        "RESULT moved=local total={} expected={total} off_by={} dropped={local_dropped}",
        local_balances.values().sum::<i64>(),
        off_by(&local_balances, &expected)
    );
    println!(
        "RESULT moved=changelog total={} expected={total} off_by={} dropped={logged_dropped} restored={restored}",
        logged_balances.values().sum::<i64>(),
        off_by(&logged_balances, &expected)
    );
    println!(
        "RESULT dedup=false total={plain_total} expected={total} off_by={}",
        off_by(&plain_balances, &expected)
    );
    println!(
        "RESULT dedup=true total={semel_total} expected={total} off_by={} dropped={dropped}",
        off_by(&semel_balances, &expected)
    );
    ensure!(
        off_by(&plain_balances, &expected) > 0,
        "the plain consumer's ledger is right: nothing was delivered twice"
    );
    ensure!(
        semel_balances == expected,
        "the dedup consumer's ledger is off: {semel_balances:?} vs {expected:?}"
    );
    ensure!(
        off_by(&local_balances, &expected) > 0,
        "host B without the changelog booked nothing twice: the partition did not move after a crash"
    );
    ensure!(
        logged_balances == expected,
        "with the changelog the two hosts' ledgers are off: {logged_balances:?} vs {expected:?}"
    );
    println!(
        "\nWithout dedup the ledger is off by {}; with the store it is exact. When the partition \
         moves to a host with its own store, it is off by {} without the changelog and exact with it.",
        off_by(&plain_balances, &expected),
        off_by(&local_balances, &expected)
    );
    broker.shutdown().await;
    Ok(())
}
