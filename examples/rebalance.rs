//! Rebalances, shown: three semel consumers in a group, for each of `range`, `roundrobin`,
//! `sticky` and `cooperative-sticky`: who owns which partition, then after a member leaves,
//! then after partitions are added, and how many partitions changed hands among the members
//! that stayed (a moved partition is a pause in its processing, and with eager strategies every
//! member gives up everything while the group rebalances).
//!
//! ```sh
//! cargo run --example rebalance            # 6 partitions, then 9
//! cargo run --example rebalance -- --quick # the same (it is quick already)
//! cargo run --example rebalance -- --bootstrap 127.0.0.1:9092
//! ```
//! The process exits non-zero if any table assigns a partition twice or leaves one out, or if a
//! sticky strategy moved a partition between members that stayed.

#[path = "support/mod.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use semel::consumer::{AutoOffsetReset, Consumer, ConsumerConfig, Strategy};

/// Rebalance demo.
#[derive(Debug, Parser)]
struct Args {
    /// A Kafka-protocol broker; without it an embedded one is started.
    #[arg(long)]
    bootstrap: Option<String>,
    /// Accepted for symmetry with the other examples (this one is quick).
    #[arg(long)]
    quick: bool,
}

type Owners = Arc<Mutex<BTreeMap<String, BTreeSet<i32>>>>;

/// A member polling on its own task and publishing its assignment; `stop` makes it close
/// (LeaveGroup).
fn member(
    name: &str,
    bootstrap: &str,
    group: &str,
    topic: &str,
    strategy: Strategy,
    owners: Owners,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let (name, bootstrap, group, topic) = (
        name.to_string(),
        bootstrap.to_string(),
        group.to_string(),
        topic.to_string(),
    );
    tokio::spawn(async move {
        let mut consumer = Consumer::connect(ConsumerConfig {
            bootstrap_servers: vec![bootstrap],
            group_id: Some(group),
            auto_offset_reset: AutoOffsetReset::Earliest,
            partition_assignment_strategy: vec![strategy],
            heartbeat_interval: Duration::from_millis(200),
            session_timeout: Duration::from_secs(6),
            metadata_max_age: Duration::from_millis(300),
            fetch_max_wait: Duration::from_millis(50),
            ..ConsumerConfig::default()
        })
        .await?;
        consumer.subscribe([topic])?;
        while !*stop.borrow() {
            consumer.poll(Duration::from_millis(50)).await?;
            let owned: BTreeSet<i32> = consumer.assignment().iter().map(|(_, p)| *p).collect();
            owners.lock().expect("owners").insert(name.clone(), owned);
        }
        owners.lock().expect("owners").remove(&name);
        consumer.close().await?;
        Ok(())
    })
}

/// Waits until `members` own `0..partitions` exactly once between them, every member has
/// something, and that holds for a second.
async fn settled(
    owners: &Owners,
    members: usize,
    partitions: i32,
) -> anyhow::Result<BTreeMap<String, BTreeSet<i32>>> {
    let started = Instant::now();
    let mut since: Option<(Instant, BTreeMap<String, BTreeSet<i32>>)> = None;
    loop {
        let now = owners.lock().expect("owners").clone();
        let all: Vec<i32> = now.values().flatten().copied().collect();
        let distinct: BTreeSet<i32> = all.iter().copied().collect();
        let ok = now.len() == members
            && all.len() == distinct.len()
            && distinct == (0..partitions).collect()
            && now.values().all(|p| !p.is_empty());
        match (&since, ok) {
            (Some((at, seen)), true) if *seen == now => {
                if at.elapsed() >= Duration::from_secs(1) {
                    return Ok(now);
                }
            }
            (_, true) => since = Some((Instant::now(), now)),
            (_, false) => since = None,
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "the group never settled: {:?}",
                owners.lock().expect("owners")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Partitions (that existed before) whose owner changed, among members present in both.
fn moved(
    before: &BTreeMap<String, BTreeSet<i32>>,
    after: &BTreeMap<String, BTreeSet<i32>>,
) -> usize {
    let owner = |map: &BTreeMap<String, BTreeSet<i32>>, p: i32| {
        map.iter()
            .find(|(_, ps)| ps.contains(&p))
            .map(|(m, _)| m.clone())
    };
    before
        .values()
        .flatten()
        .filter(|p| {
            let was = owner(before, **p);
            let now = owner(after, **p);
            was.as_ref().is_some_and(|w| after.contains_key(w)) && was != now
        })
        .count()
}

fn row(phase: &str, owners: &BTreeMap<String, BTreeSet<i32>>, moved: Option<usize>) -> String {
    let cell = |name: &str| {
        owners
            .get(name)
            .map(|ps| {
                ps.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_else(|| "(left)".into())
    };
    format!(
        "| {phase} | {} | {} | {} | {} |",
        cell("c1"),
        cell("c2"),
        cell("c3"),
        moved.map_or("".to_string(), |m| m.to_string())
    )
}

async fn run(bootstrap: &str, strategy: Strategy) -> anyhow::Result<(usize, usize)> {
    let topic = format!("rebalance-{}-{}", strategy.name(), std::process::id());
    let group = format!("{topic}-group");
    support::create_topics(bootstrap, &[(&topic, 6)]).await?;
    let owners: Owners = Arc::default();
    let mut stops = Vec::new();
    let mut tasks = Vec::new();
    for name in ["c1", "c2", "c3"] {
        let (tx, rx) = tokio::sync::watch::channel(false);
        stops.push(tx);
        tasks.push(member(
            name,
            bootstrap,
            &group,
            &topic,
            strategy,
            Arc::clone(&owners),
            rx,
        ));
        // One at a time, so every table starts from the same story.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let first = settled(&owners, 3, 6).await?;
    stops[2].send(true)?;
    let left = settled(&owners, 2, 6).await?;
    support::add_partitions(bootstrap, &topic, 9).await?;
    let grown = settled(&owners, 2, 9).await?;
    let (on_leave, on_add) = (moved(&first, &left), moved(&left, &grown));
    println!("\n{} (6 partitions, 3 members):\n", strategy.name());
    println!("| phase | c1 | c2 | c3 | moved between members that stayed |");
    println!("|---|---|---|---|---|");
    println!("{}", row("start", &first, None));
    println!("{}", row("c3 left", &left, Some(on_leave)));
    println!("{}", row("9 partitions", &grown, Some(on_add)));
    for stop in &stops {
        let _ = stop.send(true);
    }
    let patience = support::Patience::new("the members to close", Duration::from_secs(60));
    for task in tasks {
        patience.wait(task).await?.context("member task")??;
    }
    Ok((on_leave, on_add))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let broker = support::ExampleBroker::start(args.bootstrap.as_deref(), |c| {
        c.group.initial_rebalance_delay = Duration::from_millis(200);
    })
    .await?;
    let bootstrap = broker.bootstrap.clone();
    println!("rebalance: who owns what, for each assignment strategy");
    let mut results = Vec::new();
    for strategy in [
        Strategy::Range,
        Strategy::RoundRobin,
        Strategy::Sticky,
        Strategy::CooperativeSticky,
    ] {
        results.push((strategy, run(&bootstrap, strategy).await?));
    }
    println!();
    for (strategy, (on_leave, on_add)) in &results {
        println!(
            "RESULT strategy={} moved_on_leave={on_leave} moved_on_add={on_add}",
            strategy.name()
        );
    }
    for (strategy, (on_leave, on_add)) in &results {
        if matches!(strategy, Strategy::Sticky | Strategy::CooperativeSticky) {
            ensure!(
                *on_leave == 0 && *on_add == 0,
                "{} moved partitions between members that stayed",
                strategy.name()
            );
        }
    }
    broker.shutdown().await;
    Ok(())
}
