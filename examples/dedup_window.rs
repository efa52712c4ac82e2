//! Duplicates idempotence cannot stop, shown: an order service sends each order once, with a
//! message id in the `semel-msg-id` header. It crashes, and the restarted process (a new
//! producer id) sends again everything after its last checkpoint; meanwhile a failover
//! instance (another client, kcat) sends some of the same orders. Producer ids and sequences
//! only catch a retry of one producer session, so without more the topic holds those orders
//! two or three times. With semel-broker's message-id dedup window on the topic
//! (`semel.dedup.window.ms`, a Semel extension), each order is stored once, whoever sent it.
//!
//! ```sh
//! cargo run --example dedup_window            # 10,000 orders per run
//! cargo run --example dedup_window -- --quick # 2,000
//! ```
//! The same sends go to two topics, one without the window and one with it; then kcat (a
//! consumer we did not write) reads each back and every order id is counted. The process
//! exits non-zero if the run with the window stored an order twice or lost one, or if the run
//! without it shows no duplicate.
//!
//! It needs `kcat` (installed by `scripts/setup.sh`) and a semel-broker: with `--bootstrap`,
//! one that is already running (Apache Kafka refuses the topic config).

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, ensure};
use clap::Parser;
use semel::producer::{Acks, Producer, ProducerConfig, ProducerRecord};
use support::common::{kcat, kcat_read_all, kcat_send_with_id};

/// Message-id dedup window demo.
#[derive(Debug, Parser)]
struct Args {
    /// Orders per run.
    #[arg(long, default_value_t = 10_000)]
    orders: usize,
    /// A quick run (2,000 orders), as the tests do.
    #[arg(long)]
    quick: bool,
    /// A running semel-broker to use instead of an embedded one.
    #[arg(long)]
    bootstrap: Option<String>,
}

const PARTITIONS: i32 = 3;
/// Orders the failover instance (kcat, one process per order) sends again.
const FAILOVER_ORDERS: usize = 20;
/// Bound on one kcat run.
const KCAT_LIMIT: Duration = Duration::from_secs(60);

/// What one topic ended up holding.
#[derive(Debug, Default)]
struct Outcome {
    sent: usize,
    stored: usize,
    distinct: usize,
    duplicated: usize,
    missing: usize,
}

/// One instance of the order service: a new producer (so a new producer id) sending
/// `orders` with key and `semel-msg-id` both the order id.
async fn send_orders(
    bootstrap: &str,
    topic: &str,
    orders: std::ops::Range<usize>,
    instance: &str,
) -> anyhow::Result<usize> {
    let producer = Producer::connect(ProducerConfig {
        bootstrap_servers: vec![bootstrap.to_string()],
        acks: Acks::All,
        enable_idempotence: true,
        linger: Duration::from_millis(5),
        ..ProducerConfig::default()
    })
    .await?;
    let patience = support::Patience::new("the order service's sends", Duration::from_secs(120));
    let mut deliveries = Vec::with_capacity(orders.len());
    let sent = orders.len();
    for n in orders {
        let id = format!("order-{n}");
        let record = ProducerRecord::new(topic, format!("{id} from {instance}"))
            .key(id.clone())
            .header("semel-msg-id", id);
        deliveries.push(patience.wait(producer.send(record)).await??);
    }
    for delivery in deliveries {
        patience
            .wait(delivery)
            .await?
            .context("an order was not delivered")?;
    }
    producer.close().await;
    Ok(sent)
}

/// The failover instance: kcat, one process per order, partitioned as the Java client and
/// semel-producer do (murmur2 of the key), so an order goes to the same partition.
fn kcat_send(bootstrap: &str, topic: &str, n: usize) -> anyhow::Result<()> {
    let id = format!("order-{n}");
    kcat_send_with_id(
        bootstrap,
        topic,
        &id,
        &format!("{id} from kcat"),
        KCAT_LIMIT,
    )
}

/// Every order id in `topic`, read by kcat from the beginning to the end.
fn read_orders(bootstrap: &str, topic: &str) -> anyhow::Result<Vec<String>> {
    Ok(kcat_read_all(bootstrap, topic, "%k\n", KCAT_LIMIT)?
        .lines()
        .map(str::to_string)
        .collect())
}

async fn run(bootstrap: &str, orders: usize, window: bool) -> anyhow::Result<Outcome> {
    let topic = if window {
        "orders-with-window"
    } else {
        "orders-without-window"
    };
    let configs: &[(&str, &str)] = if window {
        &[("semel.dedup.window.ms", "600000")]
    } else {
        &[]
    };
    support::create_topic_with_configs(bootstrap, topic, PARTITIONS, configs)
        .await
        .context("creating the topic (the dedup window needs semel-broker)")?;

    // The first instance gets through 80 % of the orders, then crashes; it had checkpointed
    // 60 %, so the restarted instance sends everything from there.
    let crashed_at = orders * 8 / 10;
    let checkpoint = orders * 6 / 10;
    let mut sent = send_orders(bootstrap, topic, 0..crashed_at, "instance-1").await?;
    sent += send_orders(bootstrap, topic, checkpoint..orders, "instance-1-restarted").await?;
    // The failover instance resends the last orders it saw.
    let failover: Vec<usize> = (orders - FAILOVER_ORDERS..orders).collect();
    let bootstrap_owned = bootstrap.to_string();
    let topic_owned = topic.to_string();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        for n in failover {
            kcat_send(&bootstrap_owned, &topic_owned, n)?;
        }
        Ok(())
    })
    .await??;
    sent += FAILOVER_ORDERS;

    let bootstrap_owned = bootstrap.to_string();
    let topic_owned = topic.to_string();
    let stored =
        tokio::task::spawn_blocking(move || read_orders(&bootstrap_owned, &topic_owned)).await??;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for id in &stored {
        *counts.entry(id.clone()).or_default() += 1;
    }
    Ok(Outcome {
        sent,
        stored: stored.len(),
        distinct: counts.len(),
        duplicated: counts.values().filter(|c| **c > 1).count(),
        missing: (0..orders)
            .filter(|n| !counts.contains_key(&format!("order-{n}")))
            .count(),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let orders = if args.quick { 2_000 } else { args.orders };
    ensure!(
        orders > FAILOVER_ORDERS,
        "--orders must be more than {FAILOVER_ORDERS}"
    );
    kcat()?;
    let broker = support::ExampleBroker::start(args.bootstrap.as_deref(), |_| {}).await?;
    println!(
        "dedup_window: {orders} orders to a {PARTITIONS}-partition topic; the sender crashes at 80 % and its restart resends from its 60 % checkpoint; a failover instance (kcat) resends the last {FAILOVER_ORDERS}\n"
    );
    println!(
        "| message-id dedup window | records sent | stored | distinct orders | orders stored twice+ | missing |"
    );
    println!("|---|---|---|---|---|---|");
    let mut outcomes = Vec::new();
    for window in [false, true] {
        let o = run(&broker.bootstrap, orders, window).await?;
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            if window { "on (Semel)" } else { "off" },
            o.sent,
            o.stored,
            o.distinct,
            o.duplicated,
            o.missing
        );
        outcomes.push((window, o));
    }
    println!();
    for (window, o) in &outcomes {
        println!(
            "RESULT window={window} sent={} stored={} distinct={} duplicated={} missing={}",
            o.sent, o.stored, o.distinct, o.duplicated, o.missing
        );
    }
    broker.shutdown().await;
    let (_, off) = &outcomes[0];
    let (_, on) = &outcomes[1];
    println!(
        "\nWithout the window, {} of {orders} orders were stored more than once (idempotence only stops one session's retries); with it, each exactly once.",
        off.duplicated
    );
    ensure!(
        on.duplicated == 0 && on.missing == 0 && on.stored == orders,
        "with the window: {on:?}"
    );
    ensure!(
        off.duplicated > 0 && off.missing == 0,
        "without the window: {off:?}"
    );
    Ok(())
}
