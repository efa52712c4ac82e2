//! The examples, run in their quick mode, with their with/without outcome asserted: a test
//! fails if "with Semel" shows any loss or duplicate, or if "without" shows none (the fault
//! was not injected). `cargo test` builds the examples before it runs tests.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, ensure};

/// Runs `target/<profile>/examples/<name> --quick`; returns its stdout.
fn run_example(name: &str) -> anyhow::Result<String> {
    let path = common::workspace_binary(&format!("examples/{name}"))
        .with_context(|| format!("cargo build --examples builds {name}"))?;
    // A quick run takes seconds to a minute; a hung one fails here, naming the example.
    let output = common::output_within(
        Command::new(&path).arg("--quick"),
        Duration::from_secs(600),
        &format!("example {name} --quick"),
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    ensure!(
        output.status.success(),
        "{name} failed: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{stdout}");
    Ok(stdout)
}

/// The `RESULT k=v ...` lines, keyed by their first field.
fn results(stdout: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("RESULT "))
        .map(|l| {
            let fields: BTreeMap<String, String> = l
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let first = l.split_whitespace().next().unwrap_or_default().to_string();
            (first, fields)
        })
        .collect()
}

fn number(fields: &BTreeMap<String, String>, key: &str) -> anyhow::Result<u64> {
    fields
        .get(key)
        .with_context(|| format!("no {key}"))?
        .parse()
        .with_context(|| format!("{key} is not a number"))
}

#[test]
fn duplicate_send_shows_duplicates_without_idempotence_and_none_with_it() -> anyhow::Result<()> {
    let stdout = run_example("duplicate_send")?;
    let results = results(&stdout);
    let off = results
        .get("idempotence=false")
        .context("no run without idempotence")?;
    let on = results
        .get("idempotence=true")
        .context("no run with idempotence")?;
    ensure!(
        number(off, "duplicated")? > 0,
        "without: no duplicates: {off:?}"
    );
    ensure!(number(off, "lost")? == 0, "without: lost messages: {off:?}");
    ensure!(
        number(on, "duplicated")? == 0 && number(on, "lost")? == 0,
        "with: {on:?}"
    );
    ensure!(number(on, "stored")? == number(on, "sent")?, "with: {on:?}");
    ensure!(
        on.get("in_order").map(String::as_str) == Some("true"),
        "with: {on:?}"
    );
    Ok(())
}

#[test]
fn duplicate_consume_double_counts_without_dedup_and_is_exact_with_it() -> anyhow::Result<()> {
    let stdout = run_example("duplicate_consume")?;
    let results = results(&stdout);
    let plain = results.get("dedup=false").context("no plain run")?;
    let semel = results.get("dedup=true").context("no dedup run")?;
    ensure!(
        number(plain, "off_by")? > 0,
        "plain ledger exact: {plain:?}"
    );
    ensure!(
        number(plain, "total")? > number(plain, "expected")?,
        "plain: redelivery adds, never loses: {plain:?}"
    );
    ensure!(number(semel, "off_by")? == 0, "dedup ledger off: {semel:?}");
    ensure!(
        number(semel, "total")? == number(semel, "expected")?,
        "dedup: {semel:?}"
    );
    ensure!(
        number(semel, "dropped")? > 0,
        "the store dropped the resent transfers: {semel:?}"
    );
    // The rebalance variant: the partition moves to a host with its own store.
    let local = results.get("moved=local").context("no moved=local run")?;
    let logged = results
        .get("moved=changelog")
        .context("no moved=changelog run")?;
    ensure!(
        number(local, "total")? > number(local, "expected")?,
        "without the changelog host B booked nothing twice: {local:?}"
    );
    ensure!(
        number(logged, "off_by")? == 0,
        "with the changelog: {logged:?}"
    );
    ensure!(
        number(logged, "restored")? > 0,
        "host B replayed no marks: {logged:?}"
    );
    Ok(())
}

#[test]
fn acks_zero_loses_acknowledged_messages_to_a_crash_acks_one_and_all_do_not() -> anyhow::Result<()>
{
    common::workspace_binary("semel-broker")?;
    let stdout = run_example("acks")?;
    let results = results(&stdout);
    let zero = results.get("acks=0").context("no acks=0 run")?;
    ensure!(number(zero, "lost")? > 0, "acks=0 lost nothing: {zero:?}");
    for level in ["acks=1", "acks=all"] {
        let r = results
            .get(level)
            .with_context(|| format!("no {level} run"))?;
        ensure!(
            number(r, "lost")? == 0,
            "{level} lost acknowledged messages: {r:?}"
        );
        ensure!(
            number(r, "acknowledged")? > 0,
            "{level}: nothing acknowledged: {r:?}"
        );
    }
    Ok(())
}

#[test]
fn rebalance_tables_show_sticky_strategies_keep_partitions_in_place() -> anyhow::Result<()> {
    let stdout = run_example("rebalance")?;
    let results = results(&stdout);
    for strategy in ["range", "roundrobin", "sticky", "cooperative-sticky"] {
        let r = results
            .get(&format!("strategy={strategy}"))
            .with_context(|| format!("no table for {strategy}"))?;
        if strategy.ends_with("sticky") {
            ensure!(
                number(r, "moved_on_leave")? == 0 && number(r, "moved_on_add")? == 0,
                "{strategy} moved partitions between members that stayed: {r:?}"
            );
        }
    }
    // Range re-deals contiguous ranges when partitions are added: 3+3 becomes 5+4.
    let range = results.get("strategy=range").context("range")?;
    ensure!(
        number(range, "moved_on_add")? > 0,
        "range moved nothing: {range:?}"
    );
    Ok(())
}

#[test]
fn exactly_once_pipeline_writes_one_receipt_per_order_across_kill_9() -> anyhow::Result<()> {
    let stdout = run_example("exactly_once_pipeline")?;
    let results = results(&stdout);
    let plain = results.get("pipeline=plain").context("no plain run")?;
    let semel = results.get("pipeline=semel").context("no semel run")?;
    ensure!(
        number(plain, "kills")? >= 6 && number(semel, "kills")? >= 6,
        "kills: {plain:?} {semel:?}"
    );
    ensure!(
        number(plain, "missing")? == 0,
        "plain lost orders: {plain:?}"
    );
    ensure!(
        number(plain, "duplicated")? > 0,
        "plain: no duplicate receipt, the kills redelivered nothing: {plain:?}"
    );
    ensure!(
        number(semel, "missing")? == 0 && number(semel, "duplicated")? == 0,
        "semel: {semel:?}"
    );
    ensure!(
        number(semel, "receipts")? == number(semel, "orders")?,
        "semel: {semel:?}"
    );
    let transactional = results
        .get("pipeline=transactional")
        .context("no transactional run")?;
    ensure!(
        number(transactional, "kills")? >= 6
            && number(transactional, "missing")? == 0
            && number(transactional, "duplicated")? == 0
            && number(transactional, "receipts")? == number(transactional, "orders")?,
        "transactional: {transactional:?}"
    );
    Ok(())
}

#[test]
fn dedup_window_stores_duplicates_without_the_window_and_each_order_once_with_it()
-> anyhow::Result<()> {
    let stdout = run_example("dedup_window")?;
    let results = results(&stdout);
    let off = results
        .get("window=false")
        .context("no run without the window")?;
    let on = results
        .get("window=true")
        .context("no run with the window")?;
    ensure!(
        number(off, "duplicated")? > 0,
        "without: no duplicates: {off:?}"
    );
    ensure!(
        number(off, "missing")? == 0,
        "without: lost orders: {off:?}"
    );
    ensure!(
        number(on, "duplicated")? == 0 && number(on, "missing")? == 0,
        "with: {on:?}"
    );
    ensure!(
        number(on, "stored")? == number(on, "distinct")?,
        "with: {on:?}"
    );
    Ok(())
}
