//! What semel-broker's message-id dedup window (docs/dedup-window.md) costs: the same load,
//! every record with a unique `semel-msg-id` header, to a topic without the window and to one
//! with it, alternating, in one run; then the window's memory per id, from the broker's
//! metrics.
//!
//! ```sh
//! cargo run --release --example dedup_window_bench -- --messages 1000000 --rounds 3
//! ```
//! An embedded broker (its data in a temporary directory, metrics on a free port); one
//! idempotent semel-producer per run, `acks=all`, records handed over 1,000 at a time
//! (`send_many`), 3 partitions. The figure is records acknowledged per second, from the first
//! send to the last acknowledgement. Beside it, the process's CPU time per record (broker and
//! producer together, from `/proc/self/stat`): wall-clock rates on a shared 2-core machine move
//! by ±20 % between runs of the same code, CPU time per record much less. A last run resends the first half of the ids to the
//! window's topic and checks that nothing was stored again.

#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Parser;
use semel::producer::{Acks, Producer, ProducerConfig, ProducerRecord};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Dedup window benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// Records per run.
    #[arg(long, default_value_t = 1_000_000)]
    messages: usize,
    /// Value bytes per record.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Runs of each (off, on), alternating.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

const PARTITIONS: i32 = 3;

async fn load(
    bootstrap: &str,
    topic: &str,
    ids: std::ops::Range<usize>,
    size: usize,
) -> anyhow::Result<Duration> {
    let producer = Producer::connect(ProducerConfig {
        bootstrap_servers: vec![bootstrap.to_string()],
        acks: Acks::All,
        enable_idempotence: true,
        linger: Duration::from_millis(5),
        batch_size: 64 * 1024,
        ..ProducerConfig::default()
    })
    .await?;
    let value = bytes::Bytes::from(vec![b'x'; size]);
    let record = |i: usize| {
        let id = format!("msg-{i}");
        ProducerRecord::new(topic, value.clone())
            .key(id.clone())
            .header("semel-msg-id", id)
    };
    let patience = support::Patience::new("the benchmark's sends", Duration::from_secs(600));
    let started = Instant::now();
    let mut groups = Vec::new();
    let mut i = ids.start;
    while i < ids.end {
        let end = (i + 1000).min(ids.end);
        groups.push(
            patience
                .wait(producer.send_many((i..end).map(record).collect()))
                .await??,
        );
        i = end;
    }
    for group in groups {
        for report in patience.wait(group).await?? {
            report?;
        }
    }
    let elapsed = started.elapsed();
    producer.close().await;
    Ok(elapsed)
}

/// CPU seconds this process has used (every thread, user and system), from `/proc/self/stat`;
/// `None` where that is not readable.
fn cpu_seconds(ticks_per_second: f64) -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces, so split after its ')'): state is
    // field 3, utime field 14, stime field 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks_per_second)
}

/// Clock ticks per second of `/proc` times (`getconf CLK_TCK`; 100 where that fails).
fn ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The broker's `/metrics` text.
async fn metrics(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        .await?;
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut text)).await??;
    Ok(text)
}

/// The sum over partitions of metric `name` for `topic`.
fn sum(text: &str, name: &str, topic: &str) -> u64 {
    let prefix = format!("{name}{{topic=\"{topic}\"");
    text.lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let broker = support::ExampleBroker::start(None, |c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().expect("address"));
    })
    .await?;
    let metrics_addr = broker
        .embedded()
        .and_then(|b| b.metrics_addr())
        .context("the embedded broker serves metrics")?;
    let bootstrap = broker.bootstrap.clone();
    println!(
        "dedup_window_bench: {} records of {} B per run, unique ids, idempotent semel-producer, acks=all, {PARTITIONS} partitions\n",
        args.messages, args.size
    );
    println!("| round | window | records/s | CPU µs per record |");
    println!("|---|---|---|---|");
    let ticks = ticks_per_second();
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut cpu: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut last_window_topic = String::new();
    for round in 0..args.rounds {
        for window in [false, true] {
            let topic = format!("bench-{}-{round}", if window { "on" } else { "off" });
            let configs: &[(&str, &str)] = if window {
                &[("semel.dedup.window.ms", "3600000")]
            } else {
                &[]
            };
            support::create_topic_with_configs(&bootstrap, &topic, PARTITIONS, configs).await?;
            let cpu_before = cpu_seconds(ticks);
            let took = load(&bootstrap, &topic, 0..args.messages, args.size).await?;
            let rate = args.messages as f64 / took.as_secs_f64();
            let per_record = cpu_before
                .zip(cpu_seconds(ticks))
                .map(|(before, after)| (after - before) * 1e6 / args.messages as f64);
            println!(
                "| {round} | {} | {rate:.0} | {} |",
                if window { "on" } else { "off" },
                per_record.map_or("?".to_string(), |us| format!("{us:.2}"))
            );
            rates[usize::from(window)].push(rate);
            if let Some(us) = per_record {
                cpu[usize::from(window)].push(us);
            }
            if window {
                last_window_topic = topic;
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let off = median(&mut rates[0]);
    let on = median(&mut rates[1]);
    println!(
        "\nmedian: off {off:.0}/s, on {on:.0}/s: the window costs {:.1} %",
        (1.0 - on / off) * 100.0
    );
    if cpu.iter().all(|v| !v.is_empty()) {
        let off = median(&mut cpu[0]);
        let on = median(&mut cpu[1]);
        println!(
            "median CPU per record: off {off:.2} µs, on {on:.2} µs: {:+.1} % with the window",
            (on / off - 1.0) * 100.0
        );
    }

    let text = metrics(metrics_addr).await?;
    let ids = sum(&text, "semel_dedup_window_ids", &last_window_topic);
    let bytes = sum(&text, "semel_dedup_window_bytes", &last_window_topic);
    ensure!(ids == args.messages as u64, "the window holds {ids} ids");
    println!(
        "memory: {ids} ids in {bytes} bytes: {:.1} bytes per id",
        bytes as f64 / ids as f64
    );

    // Resend half of the ids: nothing is stored again.
    let resend = args.messages / 2;
    let took = load(&bootstrap, &last_window_topic, 0..resend, args.size).await?;
    let text = metrics(metrics_addr).await?;
    let dropped = sum(
        &text,
        "semel_dedup_window_duplicates_dropped_total",
        &last_window_topic,
    );
    let ends = sum(&text, "semel_partition_log_end_offset", &last_window_topic);
    ensure!(
        dropped == resend as u64 && ends == args.messages as u64,
        "resent {resend}: {dropped} dropped, log ends add up to {ends}"
    );
    println!(
        "resent {resend} ids: all dropped ({:.0} records/s), the topic still holds {ends}",
        resend as f64 / took.as_secs_f64()
    );
    broker.shutdown().await;
    Ok(())
}
