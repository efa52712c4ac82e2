//! Transactions (KIP-98, KIP-447) on semel-broker, driven by clients we did not write:
//! - librdkafka 2.16 (confluent-kafka): commit and abort read back `read_committed` and
//!   `read_uncommitted`, `send_offsets_to_transaction` with a consumer group (offsets visible
//!   only once the transaction commits, `UNSTABLE_OFFSET_COMMIT` meanwhile), a zombie producer
//!   fenced by a newer instance, and a transaction aborted by the broker when it outlives
//!   `transaction.timeout.ms` (`tests/interop/confluent_transactions.py`);
//! - Apache Kafka's `TransactionalMessageCopier` (the Java client's consume-transform-produce
//!   loop from Kafka's own system tests), with random aborts: the output topic, read
//!   `read_committed` by kcat, holds every input record exactly once.
//!
//! - a `kill -9` of the broker with one transaction committed and one open: after the restart
//!   the open one still holds the last stable offset, the broker aborts it on its timeout, and
//!   the committed one stays visible.
//!
//! The crash window between EndTxn's decision and its markers is tested inside the broker
//! crate (`transactions::tests`).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, ensure};
use common::{ChildBroker, TestBroker, kcat, output_within, python};

fn run(command: &mut Command, limit: Duration, what: &str) -> anyhow::Result<String> {
    let out = tokio::task::block_in_place(|| output_within(command, limit, what))?;
    common::stdout_of(&out, what)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn librdkafka_transactions_commit_abort_send_offsets_fence_and_time_out() -> anyhow::Result<()>
{
    let python = python()?;
    let found = Command::new(&python)
        .args(["-c", "import confluent_kafka"])
        .output()?;
    ensure!(
        found.status.success(),
        "confluent-kafka is missing from {} (run scripts/setup.sh)",
        python.display()
    );
    let broker = TestBroker::start().await?;
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/confluent_transactions.py");
    let mut command = Command::new(&python);
    command
        .arg(&script)
        .args(["--bootstrap", &broker.bootstrap()]);
    let out = tokio::task::block_in_place(|| {
        output_within(
            &mut command,
            Duration::from_secs(300),
            "confluent-kafka transactions",
        )
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    // One JSON line per scenario, written by the script with `json.dumps` (so `"ok": true`
    // appears exactly so when it passed).
    for scenario in ["commit_abort", "send_offsets", "zombie", "timeout"] {
        let tag = format!("\"scenario\": \"{scenario}\"");
        let result = stdout
            .lines()
            .find(|l| l.contains(&tag))
            .with_context(|| format!("no result for {scenario}:\n{stdout}"))?;
        ensure!(
            result.starts_with("{\"ok\": true,"),
            "{scenario} failed: {result}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    ensure!(out.status.success(), "the script failed:\n{stdout}");
    broker.handle.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_transactional_copier_with_random_aborts_copies_every_record_once()
-> anyhow::Result<()> {
    const COUNT: usize = 2_000;
    let kcat = kcat()?;
    let broker = TestBroker::start().await?;
    let bootstrap = broker.bootstrap();
    let input: String = (0..COUNT).map(|i| format!("record-{i}\n")).collect();
    let input_file = broker.dir.path().join("input.txt");
    std::fs::write(&input_file, &input)?;
    run(
        Command::new(&kcat)
            .args(["-P", "-b", &bootstrap, "-t", "copy-in", "-p", "0", "-l"])
            .arg(&input_file),
        Duration::from_secs(60),
        "kcat produce",
    )?;
    let kafka_sh = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka.sh");
    let copier = run(
        Command::new("bash").arg(&kafka_sh).args([
            "tool",
            "org.apache.kafka.tools.TransactionalMessageCopier",
            "--broker-list",
            &bootstrap,
            "--input-topic",
            "copy-in",
            "--input-partition",
            "0",
            "--output-topic",
            "copy-out",
            "--transactional-id",
            "copier",
            "--consumer-group",
            "copier-group",
            "--max-messages",
            &COUNT.to_string(),
            "--transaction-size",
            "100",
            "--enable-random-aborts",
            "--use-group-metadata",
        ]),
        Duration::from_secs(300),
        "TransactionalMessageCopier",
    )?;
    ensure!(
        copier.contains("ShutdownComplete") && copier.contains("\"remaining\":0"),
        "the copier did not finish:\n{copier}"
    );
    let read = |isolation: &str| -> anyhow::Result<Vec<String>> {
        let out = run(
            Command::new(&kcat).args([
                "-C",
                "-b",
                &bootstrap,
                "-t",
                "copy-out",
                "-o",
                "beginning",
                "-e",
                "-q",
                "-X",
                &format!("isolation.level={isolation}"),
            ]),
            Duration::from_secs(60),
            "kcat consume",
        )?;
        Ok(out.lines().map(str::to_string).collect())
    };
    let committed = read("read_committed")?;
    let mut sorted = committed.clone();
    sorted.sort();
    let mut expected: Vec<String> = (0..COUNT).map(|i| format!("record-{i}")).collect();
    expected.sort();
    ensure!(
        sorted == expected,
        "read_committed holds {} records ({} distinct), expected each of {COUNT} once",
        committed.len(),
        committed
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    );
    let in_order: Vec<String> = (0..COUNT).map(|i| format!("record-{i}")).collect();
    ensure!(
        committed == in_order,
        "read_committed is not in input order"
    );
    let uncommitted = read("read_uncommitted")?;
    eprintln!(
        "copier: {} committed, {} read_uncommitted (the difference was aborted)",
        committed.len(),
        uncommitted.len()
    );
    ensure!(
        uncommitted.len() > COUNT,
        "random aborts left no aborted records ({} read_uncommitted): the test did not exercise aborts",
        uncommitted.len()
    );
    broker.handle.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_transaction_survives_kill_9_and_is_aborted_on_its_timeout() -> anyhow::Result<()> {
    let python = python()?;
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/confluent_transactions.py");
    let dir = tempfile::tempdir()?;
    let phase = |addr: std::net::SocketAddr, phase: &str| -> anyhow::Result<String> {
        run(
            Command::new(&python).arg(&script).args([
                "--bootstrap",
                &addr.to_string(),
                "--phase",
                phase,
                "--topic",
                "crash",
            ]),
            Duration::from_secs(180),
            phase,
        )
    };
    let broker = ChildBroker::spawn(dir.path(), &[])?;
    let opened = phase(broker.addr, "crash_open")?;
    ensure!(opened.contains("\"ok\": true"), "{opened}");
    broker.kill9()?;
    let broker = ChildBroker::spawn(dir.path(), &[])?;
    let checked = phase(broker.addr, "crash_check");
    let checked = checked.with_context(|| broker.output_text())?;
    eprintln!("{checked}");
    ensure!(checked.starts_with("{\"ok\": true,"), "{checked}");
    broker.terminate()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semel_producer_transactions_on_semel_broker() -> anyhow::Result<()> {
    let broker = TestBroker::start().await?;
    let summary = common::txn::semel_producer_transactions(&broker.bootstrap(), "sp").await?;
    eprintln!("{summary}");
    broker.handle.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_python_transactions_commit_abort_and_send_offsets() -> anyhow::Result<()> {
    let python = python()?;
    let broker = TestBroker::start().await?;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/interop/kafka_python_transactions.py");
    let out = run(
        Command::new(&python)
            .arg(&script)
            .args(["--bootstrap", &broker.bootstrap()]),
        Duration::from_secs(180),
        "kafka-python transactions",
    )?;
    eprintln!("{out}");
    ensure!(out.starts_with("{\"ok\": true,"), "{out}");
    broker.handle.shutdown().await;
    Ok(())
}

/// Kafka's `kafka-transactions.sh list` and `describe` (DescribeTransactions,
/// ListTransactions) show an open transaction: its state, producer and partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_transactions_tool_lists_and_describes_an_open_transaction() -> anyhow::Result<()> {
    let python = python()?;
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/confluent_transactions.py");
    let broker = TestBroker::start().await?;
    let bootstrap = broker.bootstrap();
    let opened = run(
        Command::new(&python).arg(&script).args([
            "--bootstrap",
            &bootstrap,
            "--phase",
            "crash_open",
            "--topic",
            "tool",
            "--txn-timeout-ms",
            "300000",
        ]),
        Duration::from_secs(120),
        "crash_open",
    )?;
    ensure!(opened.contains("\"ok\": true"), "{opened}");
    let kafka_sh = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka.sh");
    let tool = |args: &[&str]| {
        run(
            Command::new("bash")
                .arg(&kafka_sh)
                .args(["tool", "transactions", "--bootstrap-server", &bootstrap])
                .args(args),
            Duration::from_secs(120),
            "kafka-transactions",
        )
    };
    let listed = tool(&["list"])?;
    ensure!(
        listed
            .lines()
            .any(|l| l.contains("tx-tool") && l.contains("Ongoing")),
        "kafka-transactions list:\n{listed}"
    );
    let described = tool(&["describe", "--transactional-id", "tx-tool"])?;
    ensure!(
        described.contains("Ongoing") && described.contains("tool-0"),
        "kafka-transactions describe:\n{described}"
    );
    broker.handle.shutdown().await;
    Ok(())
}

/// The crash window of EndTxn with a client we did not write: the broker (a debug build, with
/// its test crash point set) exits right after the commit decision is on disk, before any
/// marker. It is restarted on the same port; before serving it writes the markers, and
/// librdkafka's retried EndTxn is answered as committed: the records are visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_cut_by_a_broker_crash_before_its_markers_completes_after_the_restart()
-> anyhow::Result<()> {
    use common::fixed_port::{free_port, spawn_broker_on, spawn_broker_with_env};
    let python = python()?;
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/confluent_transactions.py");
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let port = free_port()?;
    let mut broker = spawn_broker_with_env(
        &data,
        port,
        &[],
        &[("SEMEL_TEST_CRASH_AFTER_TXN_DECISION", "1")],
    )?;
    let mut client = Command::new(&python)
        .arg(&script)
        .args([
            "--bootstrap",
            &format!("127.0.0.1:{port}"),
            "--phase",
            "crash_commit",
            "--topic",
            "decided",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let exit = loop {
        if let Some(status) = broker.child.try_wait()? {
            break status;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the broker never reached its crash point"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    ensure!(exit.code() == Some(137), "the broker exited with {exit}");
    let restarted = spawn_broker_on(&data, port, &[])?;
    let out = tokio::task::block_in_place(|| -> anyhow::Result<std::process::Output> {
        let deadline = std::time::Instant::now() + Duration::from_secs(180);
        while client.try_wait()?.is_none() {
            if std::time::Instant::now() >= deadline {
                let _ = client.kill();
                anyhow::bail!("the client never finished");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(client.wait_with_output()?)
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    ensure!(
        stdout.starts_with("{\"ok\": true,"),
        "{stdout}\n{}\nbroker after the restart:\n{}",
        String::from_utf8_lossy(&out.stderr),
        restarted.output_text()
    );
    ensure!(
        restarted
            .output_text()
            .contains("completing a transaction decided before the restart"),
        "the restarted broker did not complete the decided transaction:\n{}",
        restarted.output_text()
    );
    restarted.terminate()?;
    Ok(())
}
