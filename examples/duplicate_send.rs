//! Duplicate sends, shown: a producer whose replies get lost retries, and without idempotence
//! the broker stores those batches twice. With idempotence (producer id + sequence numbers)
//! every message is stored once, in order.
//!
//! ```sh
//! cargo run --example duplicate_send            # 20,000 messages per run
//! cargo run --example duplicate_send -- --quick # 2,000
//! ```
//! An embedded semel-broker sits behind a fault proxy that cuts the connection instead of
//! delivering every 7th Produce reply (the batch is stored; the producer never hears so) and
//! holds every 5th reply back 20 ms. The same load runs twice, idempotence off (with retries,
//! as the Java client does by default) and on; then every partition is read back and each
//! message id counted. The process exits non-zero if the idempotent run lost or duplicated
//! anything, or if the plain run shows no duplicate (the fault did not bite).
//!
//! The proxy only works with a broker that advertises the proxy's address, so this example
//! always runs its own embedded broker.

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, ensure};
use clap::Parser;
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::{BrokerId, ListOffsetsRequest, TopicName};
use kafka_protocol::protocol::StrBytes;
use semel::consumer::{AutoOffsetReset, Consumer, ConsumerConfig};
use semel::producer::{Acks, Producer, ProducerConfig, ProducerRecord};
use support::common::proxy::{FaultPlan, FaultProxy};

/// Duplicate-send demo.
#[derive(Debug, Parser)]
struct Args {
    /// Messages per run.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// A quick run (2,000 messages), as the tests do.
    #[arg(long)]
    quick: bool,
}

const PARTITIONS: i32 = 3;
const TOPIC: &str = "payments";

/// What one run stored.
#[derive(Debug, Default)]
struct Outcome {
    replies_cut: u64,
    retries: u64,
    failed_sends: usize,
    stored: usize,
    lost: usize,
    duplicated: usize,
    in_order: bool,
}

/// Each partition's end offset (ListOffsets, latest).
async fn end_offsets(cluster: &semel::client::Cluster) -> anyhow::Result<Vec<i64>> {
    let request = ListOffsetsRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_topics(vec![
            ListOffsetsTopic::default()
                .with_name(TopicName(StrBytes::from_static_str(TOPIC)))
                .with_partitions(
                    (0..PARTITIONS)
                        .map(|p| {
                            ListOffsetsPartition::default()
                                .with_partition_index(p)
                                .with_timestamp(-1)
                        })
                        .collect(),
                ),
        ]);
    let response = cluster.any().await?.send(&request, (1, 7)).await?;
    let mut ends = vec![0; PARTITIONS as usize];
    for p in &response.topics[0].partitions {
        ends[usize::try_from(p.partition_index)?] = p.offset;
    }
    Ok(ends)
}

async fn run(messages: usize, idempotent: bool) -> anyhow::Result<Outcome> {
    let proxy = FaultProxy::start(FaultPlan::default()).await?;
    let broker = support::ExampleBroker::start(None, |c| {
        c.advertised_listener = Some(proxy.addr().to_string());
    })
    .await?;
    proxy.set_upstream(broker.bootstrap.parse()?);
    support::create_topics(&broker.bootstrap, &[(TOPIC, PARTITIONS)]).await?;
    let cluster = support::admin(&broker.bootstrap).await?;
    proxy.set_plan(FaultPlan {
        cut_every_nth_produce_reply: 7,
        delay_every_nth_produce_reply: 5,
        delay: Duration::from_millis(20),
        ..FaultPlan::default()
    });

    let producer = Producer::connect(ProducerConfig {
        bootstrap_servers: vec![proxy.addr().to_string()],
        acks: Acks::All,
        enable_idempotence: idempotent,
        // Without idempotence, retry like the Java client does by default: that is where
        // duplicates come from.
        retries: if idempotent { None } else { Some(u32::MAX) },
        linger: Duration::from_millis(2),
        // Small batches, so that even the quick run's 2,000 short messages take many Produce
        // requests and every 7th reply is lost several times over (the producer carries all
        // ready partitions of a broker in one request, and takes records in bulk).
        batch_size: 256,
        ..ProducerConfig::default()
    })
    .await?;
    let mut deliveries = Vec::with_capacity(messages);
    for n in 0..messages {
        let id = format!("{n}");
        deliveries.push(
            producer
                .send(ProducerRecord::new(TOPIC, id.clone()).key(id))
                .await?,
        );
    }
    let mut outcome = Outcome::default();
    for delivery in deliveries {
        if delivery.await.is_err() {
            outcome.failed_sends += 1;
        }
    }
    outcome.retries = producer.metrics().retried.get();
    producer.close().await;
    outcome.replies_cut = proxy.replies_cut();

    // Read everything back (straight from the broker) and count each id.
    let ends = end_offsets(&cluster).await?;
    let mut consumer = Consumer::connect(ConsumerConfig {
        bootstrap_servers: vec![broker.bootstrap.clone()],
        auto_offset_reset: AutoOffsetReset::Earliest,
        ..ConsumerConfig::default()
    })
    .await?;
    consumer.assign((0..PARTITIONS).map(|p| (TOPIC.to_string(), p)))?;
    let mut per_partition: Vec<Vec<usize>> = vec![Vec::new(); PARTITIONS as usize];
    let done = |c: &Consumer| {
        (0..PARTITIONS).all(|p| {
            c.position(&(TOPIC.to_string(), p))
                .is_some_and(|pos| pos >= ends[p as usize])
        })
    };
    let patience =
        support::Patience::new("the topic read back to its end", Duration::from_secs(120));
    while !done(&consumer) {
        patience.check(|| {
            format!(
                "positions {:?}, ends {ends:?}",
                (0..PARTITIONS)
                    .map(|p| consumer.position(&(TOPIC.to_string(), p)))
                    .collect::<Vec<_>>()
            )
        })?;
        for record in consumer.poll(Duration::from_secs(1)).await? {
            let id: usize = std::str::from_utf8(record.value.as_deref().unwrap_or_default())?
                .parse()
                .context("value")?;
            per_partition[usize::try_from(record.partition)?].push(id);
        }
    }
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for id in per_partition.iter().flatten() {
        *counts.entry(*id).or_default() += 1;
    }
    outcome.stored = per_partition.iter().map(Vec::len).sum();
    outcome.lost = (0..messages).filter(|n| !counts.contains_key(n)).count();
    outcome.duplicated = counts.values().filter(|c| **c > 1).count();
    outcome.in_order = per_partition
        .iter()
        .all(|ids| ids.windows(2).all(|w| w[0] < w[1]));
    broker.shutdown().await;
    Ok(outcome)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let messages = if args.quick { 2_000 } else { args.messages };
    println!(
        "duplicate_send: {messages} messages to a {PARTITIONS}-partition topic through a proxy that loses every 7th Produce reply\n"
    );
    println!(
        "| idempotence | replies lost | batch retries | stored | lost | ids stored twice+ | in order |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut results = Vec::new();
    for idempotent in [false, true] {
        let o = run(messages, idempotent).await?;
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            if idempotent { "on (Semel)" } else { "off" },
            o.replies_cut,
            o.retries,
            o.stored,
            o.lost,
            o.duplicated,
            if o.in_order { "yes" } else { "no" }
        );
        results.push((idempotent, o));
    }
    println!();
    for (idempotent, o) in &results {
        // A line for machines (the tests read it).
        println!(
            "RESULT idempotence={idempotent} sent={messages} stored={} lost={} duplicated={} in_order={} failed_sends={}",
            o.stored, o.lost, o.duplicated, o.in_order, o.failed_sends
        );
    }
    let (_, off) = &results[0];
    let (_, on) = &results[1];
    ensure!(
        off.duplicated > 0,
        "without idempotence nothing was stored twice: the fault was not injected"
    );
    ensure!(
        on.lost == 0 && on.duplicated == 0 && on.in_order && on.failed_sends == 0,
        "with idempotence: {on:?}"
    );
    println!(
        "\nWithout idempotence, {} of {messages} messages were stored more than once; with it, each exactly once, in order.",
        off.duplicated
    );
    Ok(())
}
