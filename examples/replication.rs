//! Lost sends where replication really happens: a 3-broker Apache Kafka cluster (replication
//! factor 3, `min.insync.replicas=2`), run from Maven Central's jars by `scripts/kafka.sh`.
//!
//! ```sh
//! cargo run --example replication                      # starts and stops its own cluster
//! cargo run --example replication -- --kafka-dir DIR   # a cluster from `kafka.sh start3 DIR`
//! ```
//!
//! For each `acks` level, one partition and one producer (semel-producer):
//! 1. 1,000 messages are sent and acknowledged while every replica follows.
//! 2. Both followers are paused (`kill -STOP`: they stop fetching, as a slow or partitioned
//!    follower does, but stay in the ISR for `replica.lag.time.max.ms`), and a burst of
//!    messages is sent to the leader.
//! 3. The leader is `kill -9`ed and the followers resumed: the controller elects one of them,
//!    which never had the burst. The old leader is restarted; it comes back as a follower and
//!    truncates its log to the new leader's at the new leader epoch.
//! 4. The partition is read back, and compared with what the producer was told.
//!
//! - `acks=0` and `acks=1`: the burst was acknowledged by the leader alone, and it is gone.
//! - `acks=all`: nothing of the burst was acknowledged while the followers were paused (the
//!   leader waits for the ISR); the producer retried it on the new leader, and every
//!   acknowledged message is there, once (idempotent producer).
//!
//! Then the ISR itself, on a topic with `min.insync.replicas=3`: one follower paused past
//! `replica.lag.time.max.ms` (5 s on this cluster) falls out of the ISR, which is then
//! smaller than `min.insync.replicas`, and `acks=all` is refused with `NOT_ENOUGH_REPLICAS`;
//! resumed, the follower catches up and rejoins.
//!
//! Prints `RESULT` lines; exits non-zero unless `acks=1` lost acknowledged messages (else the
//! fault was not injected) and `acks=all` lost none.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use semel::consumer::{AutoOffsetReset, Consumer, ConsumerConfig};
use semel::producer::{Acks, ProduceError, Producer, ProducerConfig, ProducerRecord};

/// Replication demo.
#[derive(Debug, Parser)]
struct Args {
    /// A running 3-broker cluster started with `scripts/kafka.sh start3 DIR`; without it the
    /// example starts one in a temporary directory and stops it at the end.
    #[arg(long)]
    kafka_dir: Option<PathBuf>,
    /// Messages in the burst sent while the followers are paused.
    #[arg(long, default_value_t = 2_000)]
    burst: u64,
    /// The acks levels to run, of 0, 1 and all.
    #[arg(long, value_delimiter = ',', default_value = "0,1,all")]
    levels: Vec<String>,
    /// Skip the ISR part.
    #[arg(long)]
    no_isr: bool,
    /// The `scripts/kafka.sh` to run; by default the one under the working directory (where
    /// `cargo run` is run), else the one in the checkout this example was built from.
    #[arg(long, env = "SEMEL_KAFKA_SH")]
    kafka_sh: Option<PathBuf>,
}

/// The script that runs Apache Kafka. A path compiled in is only a fallback: a binary built
/// in one clone may be run from another (a shared target directory keeps it when the sources
/// did not change), and the clone it was built in may be gone.
static KAFKA_SH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

fn find_kafka_sh(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        ensure!(
            path.is_file(),
            "--kafka-sh {}: no such file",
            path.display()
        );
        return Ok(path);
    }
    let here = std::env::current_dir()?.join("scripts/kafka.sh");
    if here.is_file() {
        return Ok(here);
    }
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka.sh");
    ensure!(
        built.is_file(),
        "scripts/kafka.sh not found under the working directory or at {}; run from the \
         repository's root or pass --kafka-sh",
        built.display()
    );
    Ok(built)
}

/// `scripts/kafka.sh ARGS`; its own waits are bounded.
fn kafka(args: &[&str]) -> anyhow::Result<String> {
    let script = KAFKA_SH.get().context("kafka.sh not located yet")?;
    let out = Command::new("bash")
        .arg(script)
        .args(args)
        .output()
        .context("running scripts/kafka.sh")?;
    ensure!(
        out.status.success(),
        "kafka.sh {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A partition as `kafka-topics --describe` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Replicas {
    leader: u32,
    replicas: Vec<u32>,
    isr: Vec<u32>,
}

fn describe(bootstrap: &str, topic: &str) -> anyhow::Result<Replicas> {
    // Right after a broker was killed and restarted, the admin client's call can time out
    // while it still tries the old connection ("Timed out waiting to send the call"): ask
    // again, a bounded number of times.
    let args = [
        "tool",
        "topics",
        "--bootstrap-server",
        bootstrap,
        "--describe",
        "--topic",
        topic,
    ];
    let mut attempt = 1;
    let out = loop {
        match kafka(&args) {
            Ok(out) => break out,
            Err(error) if attempt < 3 => {
                eprintln!(
                    "kafka-topics --describe failed (attempt {attempt}), asking again: {error}"
                );
                attempt += 1;
                std::thread::sleep(Duration::from_secs(2));
            }
            Err(error) => return Err(error),
        }
    };
    let ids = |text: &str| -> Vec<u32> { text.split(',').filter_map(|n| n.parse().ok()).collect() };
    for line in out.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let value = |name: &str| {
            fields
                .iter()
                .position(|f| *f == name)
                .and_then(|i| fields.get(i + 1))
                .copied()
        };
        if value("Partition:") == Some("0") {
            return Ok(Replicas {
                leader: value("Leader:").and_then(|l| l.parse().ok()).unwrap_or(0),
                replicas: value("Replicas:").map(ids).unwrap_or_default(),
                isr: value("Isr:").map(ids).unwrap_or_default(),
            });
        }
    }
    bail!("partition 0 of {topic} not in:\n{out}")
}

/// Polls `describe` until `done` holds, for at most `limit`.
fn wait_for(
    bootstrap: &str,
    topic: &str,
    what: &str,
    limit: Duration,
    done: impl Fn(&Replicas) -> bool,
) -> anyhow::Result<Replicas> {
    let deadline = Instant::now() + limit;
    loop {
        let now = describe(bootstrap, topic)?;
        if done(&now) {
            return Ok(now);
        }
        ensure!(
            Instant::now() < deadline,
            "gave up waiting for {what} after {limit:?}: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await?
}

struct Outcome {
    acknowledged: BTreeSet<u64>,
    present: BTreeSet<u64>,
}

/// One `acks` level through the scenario above.
async fn run(
    dir: &str,
    bootstrap: &str,
    acks: Acks,
    label: &str,
    burst: u64,
) -> anyhow::Result<Outcome> {
    let topic = format!("replication-acks-{label}");
    let (b, t) = (bootstrap.to_string(), topic.clone());
    blocking(move || {
        kafka(&[
            "tool",
            "topics",
            "--bootstrap-server",
            &b,
            "--create",
            "--topic",
            &t,
            "--partitions",
            "1",
            "--replication-factor",
            "3",
        ])
    })
    .await?;
    let producer = Producer::connect(ProducerConfig {
        bootstrap_servers: vec![bootstrap.to_string()],
        acks,
        enable_idempotence: acks == Acks::All,
        retries: (acks != Acks::All).then_some(0),
        linger: Duration::from_millis(5),
        request_timeout: Duration::from_secs(5),
        delivery_timeout: Duration::from_secs(90),
        ..ProducerConfig::default()
    })
    .await?;
    let mut acknowledged = BTreeSet::new();
    // 1. Everyone follows.
    let mut pending = Vec::new();
    for n in 0..1_000u64 {
        pending.push((
            n,
            producer
                .send(ProducerRecord::new(&topic, n.to_string()))
                .await?,
        ));
    }
    for (n, delivery) in pending.drain(..) {
        delivery.await?;
        acknowledged.insert(n);
    }
    let (b, t) = (bootstrap.to_string(), topic.clone());
    let before = blocking(move || {
        wait_for(
            &b,
            &t,
            "every replica in the ISR",
            Duration::from_secs(60),
            |r| r.isr.len() == 3,
        )
    })
    .await?;
    let leader = before.leader;
    let followers: Vec<u32> = before
        .replicas
        .iter()
        .copied()
        .filter(|r| *r != leader)
        .collect();
    // 2. Followers paused; the burst goes to the leader alone.
    for follower in &followers {
        kafka(&["pause", &follower.to_string(), dir])?;
    }
    for n in 1_000..1_000 + burst {
        pending.push((
            n,
            producer
                .send(ProducerRecord::new(&topic, n.to_string()))
                .await?,
        ));
    }
    // Long enough for the leader to take (and, below acks=all, acknowledge) the burst; well
    // within replica.lag.time.max.ms, so the paused followers are still in the ISR.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // 3. The leader dies; a follower that never had the burst takes over.
    kafka(&["kill", &leader.to_string(), dir])?;
    for follower in &followers {
        kafka(&["resume", &follower.to_string(), dir])?;
    }
    let (b, t) = (bootstrap.to_string(), topic.clone());
    let after = blocking(move || {
        wait_for(&b, &t, "a new leader", Duration::from_secs(60), |r| {
            r.leader != leader && r.leader != 0 && r.leader != u32::MAX
        })
    })
    .await?;
    let mut failed = 0usize;
    let mut first_error = None;
    for (n, delivery) in pending.drain(..) {
        match delivery.await {
            Ok(_) => {
                acknowledged.insert(n);
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    producer.close().await;
    // The old leader comes back as a follower and truncates what the new leader lacks.
    let restart_dir = dir.to_string();
    blocking(move || kafka(&["restart", &leader.to_string(), &restart_dir])).await?;
    let (b, t) = (bootstrap.to_string(), topic.clone());
    blocking(move || {
        wait_for(
            &b,
            &t,
            "the old leader back in the ISR",
            Duration::from_secs(90),
            |r| r.isr.contains(&leader),
        )
    })
    .await?;
    let truncated = std::fs::read_to_string(format!("{dir}/node{leader}/server.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&topic) && l.contains("runcat"))
        .count();
    // 4. What is there now.
    let present = read_back(bootstrap, &topic).await?;
    println!(
        "acks={label}: leader {leader} killed, followers {followers:?} paused during a burst of {burst}; new leader {}; {failed} sends failed (first: {first_error:?}); old leader's log lines about truncation: {truncated}",
        after.leader
    );
    Ok(Outcome {
        acknowledged,
        present,
    })
}

/// Every value in partition 0 of `topic`: read until three polls in a row bring nothing.
async fn read_back(bootstrap: &str, topic: &str) -> anyhow::Result<BTreeSet<u64>> {
    let mut consumer = Consumer::connect(ConsumerConfig {
        bootstrap_servers: vec![bootstrap.to_string()],
        auto_offset_reset: AutoOffsetReset::Earliest,
        ..ConsumerConfig::default()
    })
    .await?;
    consumer.assign([(topic.to_string(), 0)])?;
    let mut values = BTreeSet::new();
    let mut quiet = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while quiet < 3 {
        ensure!(
            Instant::now() < deadline,
            "reading {topic} back took over 120 s"
        );
        let records = consumer.poll(Duration::from_secs(1)).await?;
        if records.is_empty() {
            quiet += 1;
        } else {
            quiet = 0;
        }
        for record in records {
            values
                .insert(std::str::from_utf8(record.value.as_deref().unwrap_or_default())?.parse()?);
        }
    }
    Ok(values)
}

/// The ISR shrinking and growing back, and `acks=all` refused below `min.insync.replicas`.
async fn isr(dir: &str, bootstrap: &str) -> anyhow::Result<()> {
    // min.insync.replicas=3 on this topic: one follower out of the ISR is enough to refuse
    // acks=all. (Two nodes down at once would take the KRaft controller quorum with them:
    // every node of this cluster is also a controller.)
    let topic = "replication-isr";
    kafka(&[
        "tool",
        "topics",
        "--bootstrap-server",
        bootstrap,
        "--create",
        "--topic",
        topic,
        "--partitions",
        "1",
        "--replication-factor",
        "3",
        "--config",
        "min.insync.replicas=3",
    ])?;
    let producer = Producer::connect(ProducerConfig {
        bootstrap_servers: vec![bootstrap.to_string()],
        acks: Acks::All,
        delivery_timeout: Duration::from_secs(4),
        request_timeout: Duration::from_secs(2),
        ..ProducerConfig::default()
    })
    .await?;
    producer
        .send(ProducerRecord::new(topic, "first"))
        .await?
        .await?;
    let before = describe(bootstrap, topic)?;
    let followers: Vec<u32> = before
        .replicas
        .iter()
        .copied()
        .filter(|r| *r != before.leader)
        .collect();
    println!("ISR before: {:?} (leader {})", before.isr, before.leader);
    // Writes keep the leader ahead of the paused followers: a follower whose log ends where
    // the leader's does counts as caught up however long it is paused. The writer connects
    // and writes once before the pause: a client bootstrapping while a node is paused may
    // first wait out its request timeout on that node (it accepts connections, never answers).
    let writes = Producer::connect(ProducerConfig {
        bootstrap_servers: vec![bootstrap.to_string()],
        acks: Acks::Leader,
        enable_idempotence: false,
        ..ProducerConfig::default()
    })
    .await?;
    writes
        .send(ProducerRecord::new("replication-isr", "before the pause"))
        .await?
        .await?;
    kafka(&["pause", &followers[0].to_string(), dir])?;
    let (b, t, f) = (bootstrap.to_string(), topic.to_string(), followers[0]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let producer = writes;
        let stop = std::sync::Arc::clone(&stop);
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok(d) = producer
                    .send(ProducerRecord::new("replication-isr", format!("lag {n}")))
                    .await
                {
                    let _ = tokio::time::timeout(Duration::from_secs(2), d).await;
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            producer.close().await;
        })
    };
    let during = blocking(move || {
        wait_for(
            &b,
            &t,
            "the paused follower out of the ISR",
            // 5 s of lag, then the leader's AlterPartition; when the paused node is also the
            // active KRaft controller, that request first waits out its timeout (30 s) before
            // the new controller takes it.
            Duration::from_secs(90),
            |r| !r.isr.contains(&f),
        )
    })
    .await?;
    println!(
        "ISR while follower {} is paused: {:?}",
        followers[0], during.isr
    );
    let refused = producer
        .send(ProducerRecord::new(topic, "refused"))
        .await?
        .await;
    println!(
        "ISR {:?} is below the topic's min.insync.replicas=3; acks=all: {refused:?}",
        during.isr
    );
    kafka(&["resume", &followers[0].to_string(), dir])?;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.await?;
    let (b, t) = (bootstrap.to_string(), topic.to_string());
    let after = blocking(move || {
        wait_for(
            &b,
            &t,
            "every replica back in the ISR",
            Duration::from_secs(90),
            |r| r.isr.len() == 3,
        )
    })
    .await?;
    println!("ISR after resuming: {:?}", after.isr);
    producer.close().await;
    let not_enough = matches!(&refused, Err(ProduceError::Timeout { last_error }) if last_error.contains("NotEnoughReplicas"))
        || matches!(&refused, Err(ProduceError::Broker(code)) if format!("{code:?}").contains("NotEnoughReplicas"));
    println!(
        "RESULT isr_before={} isr_during={} isr_after={} not_enough_replicas={not_enough}",
        before.isr.len(),
        during.isr.len(),
        after.isr.len()
    );
    ensure!(
        not_enough,
        "acks=all below min.insync.replicas was not refused with NOT_ENOUGH_REPLICAS: {refused:?}"
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Set once, here; a second set could only be a no-op.
    let _ = KAFKA_SH.set(find_kafka_sh(args.kafka_sh.clone())?);
    // RUST_LOG=semel_producer=debug shows the producer's retries and leader changes.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let owned = tempfile::tempdir()?;
    let dir = match &args.kafka_dir {
        Some(dir) => dir.display().to_string(),
        None => {
            let dir = owned.path().join("kafka").display().to_string();
            kafka(&["start3", &dir])?;
            dir
        }
    };
    let bootstrap = std::fs::read_to_string(format!("{dir}/bootstrap"))?
        .trim()
        .to_string();
    let result = async {
        let mut lost_by_level = Vec::new();
        for (acks, label) in [(Acks::None, "0"), (Acks::Leader, "1"), (Acks::All, "all")] {
            if !args.levels.iter().any(|l| l == label) {
                continue;
            }
            let outcome = run(&dir, &bootstrap, acks, label, args.burst).await?;
            let lost = outcome.acknowledged.difference(&outcome.present).count();
            println!(
                "RESULT acks={label} acknowledged={} present={} acknowledged_lost={lost}",
                outcome.acknowledged.len(),
                outcome.present.len()
            );
            lost_by_level.push((label, lost));
        }
        if !args.no_isr {
            isr(&dir, &bootstrap).await?;
        }
        let lost = |label: &str| lost_by_level.iter().find(|(l, _)| *l == label).map_or(0, |(_, n)| *n);
        ensure!(
            lost("1") > 0 || !args.levels.iter().any(|l| l == "1"),
            "acks=1 lost nothing: the fault was not injected"
        );
        ensure!(lost("all") == 0, "acks=all lost {} acknowledged messages", lost("all"));
        if lost_by_level.len() == 3 {
            println!(
                "\nacks=0 lost {} and acks=1 lost {} acknowledged messages when the leader died with its followers behind; acks=all lost none.",
                lost("0"),
                lost("1")
            );
        }
        anyhow::Ok(())
    }
    .await;
    if args.kafka_dir.is_none() {
        let _ = kafka(&["stop", &dir]);
    }
    result
}
