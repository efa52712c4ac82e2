//! The `semel` admin tool against a live semel-broker (issue 22): topics created, listed and
//! described; a group's lag equal to produced minus committed, with the owning member; an
//! offset reset that only prints until `--execute`, then commits; producers listed; `--json`
//! and a refusal naming what went wrong.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, ensure};
use common::{TestBroker, output_within, stdout_of};
use semel::consumer::{AutoOffsetReset, Consumer, ConsumerConfig};
use semel::producer::{Producer, ProducerConfig, ProducerRecord};

const LIMIT: Duration = Duration::from_secs(60);

fn semel(bootstrap: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut command = Command::new(env!("CARGO_BIN_EXE_semel"));
    command.arg("--bootstrap-server").arg(bootstrap).args(args);
    let what = format!("semel {}", args.join(" "));
    let out = output_within(&mut command, LIMIT, &what)?;
    stdout_of(&out, &what)
}

/// The rows of a table the tool printed, each a map from header to value.
fn table(text: &str) -> Vec<BTreeMap<String, String>> {
    let mut lines = text.lines();
    let headers: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    lines
        .map(|line| {
            headers
                .iter()
                .zip(line.split_whitespace())
                .map(|(h, v)| (h.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semel_tool_shows_lag_resets_offsets_and_lists_producers() -> anyhow::Result<()> {
    let broker = TestBroker::start().await?;
    let b = broker.bootstrap();
    let run = |args: Vec<&str>| {
        let b = b.clone();
        let args: Vec<String> = args.into_iter().map(str::to_string).collect();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            semel(&b, &args)
        })
    };

    let created = run(vec![
        "topics",
        "create",
        "orders",
        "--partitions",
        "2",
        "--config",
        "retention.ms=3600000",
    ])
    .await??;
    ensure!(created.contains("Created topic orders."), "{created}");
    let listed = table(&run(vec!["topics", "list"]).await??);
    ensure!(
        listed
            .iter()
            .any(|r| r["TOPIC"] == "orders" && r["PARTITIONS"] == "2"),
        "{listed:?}"
    );

    // 10 records to partition 0, 6 to partition 1, from one idempotent producer.
    let producer = Producer::connect(ProducerConfig {
        bootstrap_servers: vec![b.clone()],
        ..ProducerConfig::default()
    })
    .await?;
    for (partition, count) in [(0, 10), (1, 6)] {
        for n in 0..count {
            producer
                .send(ProducerRecord::new("orders", format!("{n}")).partition(partition))
                .await?
                .await?;
        }
    }
    producer.close().await;

    // A group member that owns both partitions and committed 4 on partition 0, 1 on 1.
    let mut consumer = Consumer::connect(ConsumerConfig {
        bootstrap_servers: vec![b.clone()],
        group_id: Some("billing".into()),
        client_id: "billing-1".into(),
        auto_offset_reset: AutoOffsetReset::Earliest,
        ..ConsumerConfig::default()
    })
    .await?;
    consumer.subscribe(["orders"])?;
    let deadline = tokio::time::Instant::now() + LIMIT;
    while consumer.assignment().len() < 2 {
        ensure!(tokio::time::Instant::now() < deadline, "never assigned");
        consumer.poll(Duration::from_millis(100)).await?;
    }
    consumer
        .commit_offsets(&BTreeMap::from([
            (("orders".to_string(), 0), 4),
            (("orders".to_string(), 1), 1),
        ]))
        .await?;

    let described = table(&run(vec!["groups", "describe", "billing"]).await??);
    ensure!(described.len() == 2, "{described:?}");
    for (row, (partition, committed, end)) in described.iter().zip([(0, 4, 10), (1, 1, 6)]) {
        ensure!(row["PARTITION"] == partition.to_string(), "{row:?}");
        ensure!(row["CURRENT-OFFSET"] == committed.to_string(), "{row:?}");
        ensure!(row["LOG-END-OFFSET"] == end.to_string(), "{row:?}");
        ensure!(row["LAG"] == (end - committed).to_string(), "lag {row:?}");
        ensure!(row["CLIENT-ID"] == "billing-1", "{row:?}");
        ensure!(row["CONSUMER-ID"] != "-", "no owner in {row:?}");
    }
    let json = run(vec!["--json", "groups", "list"]).await??;
    ensure!(
        json.contains(r#""group":"billing""#) && json.contains(r#""state":"Stable""#),
        "{json}"
    );

    // A reset while the member is active is refused by the coordinator, naming the error.
    let refused = run(vec![
        "offsets",
        "reset",
        "--group",
        "billing",
        "--topic",
        "orders",
        "--to-earliest",
        "--execute",
    ])
    .await?;
    let error = format!(
        "{:#}",
        refused
            .err()
            .context("a reset of an active group went through")?
    );
    ensure!(
        error.contains("UnknownMemberId") || error.contains("RebalanceInProgress"),
        "{error}"
    );
    consumer.close().await?;

    // Dry run: printed, not committed; then executed.
    let planned = table(
        &run(vec![
            "offsets",
            "reset",
            "--group",
            "billing",
            "--topic",
            "orders",
            "--shift-by",
            "-3",
        ])
        .await??,
    );
    let planned: Vec<(String, String)> = planned
        .iter()
        .map(|r| (r["PARTITION"].clone(), r["NEW-OFFSET"].clone()))
        .collect();
    ensure!(
        planned == [("0".into(), "1".into()), ("1".into(), "0".into())],
        "{planned:?}"
    );
    let after_dry_run = table(&run(vec!["groups", "describe", "billing"]).await??);
    ensure!(
        after_dry_run[0]["CURRENT-OFFSET"] == "4",
        "{after_dry_run:?}"
    );
    run(vec![
        "offsets",
        "reset",
        "--group",
        "billing",
        "--topic",
        "orders",
        "--to-latest",
        "--execute",
    ])
    .await??;
    let after = table(&run(vec!["groups", "describe", "billing"]).await??);
    ensure!(
        after
            .iter()
            .all(|r| r["LAG"] == "0" && r["CONSUMER-ID"] == "-"),
        "{after:?}"
    );

    let producers = table(&run(vec!["producers", "--topic", "orders"]).await??);
    ensure!(producers.len() == 2, "{producers:?}");
    ensure!(
        producers
            .iter()
            .all(|r| r["PRODUCER-ID"] == producers[0]["PRODUCER-ID"]),
        "{producers:?}"
    );
    ensure!(
        producers
            .iter()
            .map(|r| r["LAST-SEQUENCE"].as_str())
            .collect::<Vec<_>>()
            == ["9", "5"],
        "{producers:?}"
    );

    let described = table(&run(vec!["topics", "describe", "orders"]).await??);
    ensure!(
        described
            .iter()
            .map(|r| r["END-OFFSET"].as_str())
            .collect::<Vec<_>>()
            == ["10", "6"],
        "{described:?}"
    );
    // Configs: set one, read it back with its source, return it to the default.
    run(vec![
        "topics",
        "alter-configs",
        "orders",
        "--set",
        "retention.ms=60000",
    ])
    .await??;
    let configs = table(&run(vec!["topics", "configs", "orders"]).await??);
    let retention = configs
        .iter()
        .find(|r| r["CONFIG"] == "retention.ms")
        .context("no retention.ms")?;
    ensure!(
        retention["VALUE"] == "60000" && retention["SOURCE"] == "topic",
        "{retention:?}"
    );
    run(vec![
        "topics",
        "alter-configs",
        "orders",
        "--delete",
        "retention.ms",
    ])
    .await??;
    let configs = table(&run(vec!["topics", "configs", "orders"]).await??);
    ensure!(
        configs
            .iter()
            .any(|r| r["CONFIG"] == "retention.ms" && r["SOURCE"] == "default"),
        "{configs:?}"
    );
    let bad = run(vec![
        "topics",
        "alter-configs",
        "orders",
        "--set",
        "retention.mss=1",
    ])
    .await?;
    let error = format!(
        "{:#}",
        bad.err().context("a misspelled config was accepted")?
    );
    ensure!(error.contains("retention.mss"), "{error}");
    // The group, empty now, is deleted with its offsets.
    run(vec!["groups", "delete", "billing"]).await??;
    let groups = run(vec!["groups", "list"]).await??;
    ensure!(!groups.contains("billing"), "{groups}");

    let missing = run(vec!["topics", "describe", "nowhere"]).await?;
    let error = format!(
        "{:#}",
        missing.err().context("a missing topic was described")?
    );
    ensure!(error.contains("UnknownTopicOrPartition"), "{error}");
    Ok(())
}

/// `semel dedup` opens a store read-only while its owner still holds it: the marks, the bucket
/// width and the offsets recorded per partition, without touching it.
#[test]
fn semel_dedup_reads_a_store_in_use() -> anyhow::Result<()> {
    use semel::consumer::dedup::{Claim, DedupConfig, DedupStore, KeyHash};
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    let store = DedupStore::open(DedupConfig::new(&path))?;
    for n in 0..25 {
        let key = KeyHash::new("billing", "orders", format!("order-{n}").as_bytes());
        let Claim::Fresh(token) = store.claim(key)? else {
            anyhow::bail!("order-{n} was not fresh");
        };
        let offset = ("billing", "orders", n % 2, i64::from(n) + 1);
        store.mark_done(key, token, Some(offset), |_| {})?;
    }
    store.sync()?;
    let mut command = Command::new(env!("CARGO_BIN_EXE_semel"));
    command.args(["--json", "dedup", "--path"]).arg(&path);
    let out = output_within(&mut command, LIMIT, "semel dedup")?;
    let printed = stdout_of(&out, "semel dedup")?;
    ensure!(printed.contains("\"keys\":25,"), "{printed}");
    ensure!(
        printed.contains(r#"{"group":"billing","topic":"orders","partition":0,"next_offset":25}"#)
            && printed
                .contains(r#"{"group":"billing","topic":"orders","partition":1,"next_offset":24}"#),
        "{printed}"
    );
    // The owner goes on using it.
    let key = KeyHash::new("billing", "orders", b"order-0");
    ensure!(
        matches!(store.claim(key)?, Claim::Duplicate),
        "a handled key was fresh again"
    );
    let missing = Command::new(env!("CARGO_BIN_EXE_semel"))
        .args(["dedup", "--path"])
        .arg(dir.path().join("nothing-here"))
        .output()?;
    ensure!(!missing.status.success(), "a missing store was summarised");
    Ok(())
}
