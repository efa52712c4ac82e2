//! Producer benchmark: semel-producer and kcat (librdkafka) sending the same load to the same
//! broker, for 100 B and 1 KiB records, `acks=1` and `acks=all`, idempotence on and off.
//!
//! ```sh
//! cargo run --release --example producer_bench -- --messages 200000
//! cargo run --release --example producer_bench -- --bootstrap 127.0.0.1:9092
//! cargo run --release --example producer_bench -- --tls
//! ```
//! `--tls` runs the embedded broker with an `SSL` listener (a test certificate authority made
//! for the run) and both clients over TLS, to set against a plaintext run of the same load.
//! Without `--bootstrap` it starts an embedded semel-broker on a temporary directory. Each
//! configuration writes to a fresh 3-partition topic; the figure is messages acknowledged per
//! second, from the first send to the last delivery report (kcat: process start to exit).

#[path = "support/mod.rs"]
mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Parser;
use semel::client::{SecurityConfig, SecurityProtocol};
use semel::producer::{Acks, Producer, ProducerConfig, ProducerRecord};

/// Producer benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// Broker to load; without it an embedded broker is started.
    #[arg(long)]
    bootstrap: Option<String>,
    /// Messages per configuration.
    #[arg(long, default_value_t = 200_000)]
    messages: usize,
    /// Skip kcat.
    #[arg(long)]
    no_kcat: bool,
    /// Hand records to semel-producer `N` at a time (`send_many`) instead of one `send` each.
    #[arg(long, default_value_t = 1)]
    many: usize,
    /// Serve and send over TLS (embedded broker only).
    #[arg(long)]
    tls: bool,
}

/// One configuration's load, for either client.
#[derive(Debug, Clone)]
struct Load {
    bootstrap: String,
    topic: String,
    messages: usize,
    size: usize,
    acks: Acks,
    idempotent: bool,
    /// The test authority to trust, when the broker serves TLS.
    ca: Option<std::path::PathBuf>,
}

async fn semel(load: &Load, many: usize) -> anyhow::Result<Duration> {
    let Load {
        bootstrap,
        topic,
        messages,
        size,
        acks,
        idempotent,
        ca,
    } = load.clone();
    let topic = topic.as_str();
    let security = match ca {
        Some(ca) => SecurityConfig {
            protocol: SecurityProtocol::Ssl,
            ssl_ca_location: Some(ca),
            ..SecurityConfig::default()
        },
        None => SecurityConfig::default(),
    };
    let producer = Producer::connect(ProducerConfig {
        bootstrap_servers: vec![bootstrap],
        security,
        acks,
        enable_idempotence: idempotent,
        linger: Duration::from_millis(5),
        batch_size: 64 * 1024,
        ..ProducerConfig::default()
    })
    .await?;
    let value = bytes::Bytes::from(vec![b'x'; size]);
    let started = Instant::now();
    let record = |i: usize| ProducerRecord::new(topic, value.clone()).key(format!("k{}", i % 1000));
    if many > 1 {
        let mut groups = Vec::with_capacity(messages / many + 1);
        let mut i = 0;
        while i < messages {
            let end = (i + many).min(messages);
            groups.push(producer.send_many((i..end).map(record).collect()).await?);
            i = end;
        }
        for group in groups {
            for report in group.await? {
                report?;
            }
        }
    } else {
        let mut deliveries = Vec::with_capacity(messages);
        for i in 0..messages {
            deliveries.push(producer.send(record(i)).await?);
        }
        for delivery in deliveries {
            delivery.await?;
        }
    }
    let elapsed = started.elapsed();
    producer.close().await;
    Ok(elapsed)
}

fn kcat(load: &Load) -> anyhow::Result<Duration> {
    let Load {
        bootstrap,
        topic,
        messages,
        size,
        acks,
        idempotent,
        ca,
    } = load.clone();
    let (bootstrap, topic) = (bootstrap.as_str(), topic.as_str());
    let value = "x".repeat(size);
    let mut input = String::with_capacity(messages * (size + 8));
    for i in 0..messages {
        input.push_str(&format!("k{}:{value}\n", i % 1000));
    }
    let acks = match acks {
        Acks::None => "0",
        Acks::Leader => "1",
        Acks::All => "all",
    };
    let started = Instant::now();
    let mut command = Command::new("kcat");
    if let Some(ca) = ca {
        command.args(["-X", "security.protocol=ssl", "-X"]);
        command.arg(format!("ssl.ca.location={}", ca.display()));
    }
    let mut child = command
        .args(["-P", "-b", bootstrap, "-t", topic, "-K", ":"])
        .args(["-X", &format!("acks={acks}")])
        .args(["-X", &format!("enable.idempotence={idempotent}")])
        .args(["-X", "linger.ms=5", "-X", "batch.size=65536"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start kcat")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let output = child.wait_with_output()?;
    ensure!(
        output.status.success(),
        "kcat: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(started.elapsed())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        !(args.tls && args.bootstrap.is_some()),
        "--tls runs the embedded broker; it cannot be used with --bootstrap"
    );
    let pki = if args.tls {
        Some(support::common::pki::Pki::new()?)
    } else {
        None
    };
    let ca = pki.as_ref().map(|pki| pki.path("ca.pem"));
    let listener = pki.as_ref().map(|pki| pki.listener(SecurityProtocol::Ssl));
    let broker = support::ExampleBroker::start(args.bootstrap.as_deref(), |config| {
        if let Some(listener) = listener {
            // Topics are made by the clients' first Metadata request (the admin helper
            // speaks plaintext), with the 3 partitions every configuration uses.
            config.security = listener;
            config.num_partitions = 3;
        }
    })
    .await?;
    let bootstrap = broker.bootstrap.clone();
    println!("| client | record | acks | idempotent | messages/s | MB/s |");
    println!("|---|---|---|---|---|---|");
    let mut n = 0;
    for size in [100, 1024] {
        for (acks, idempotent) in [(Acks::Leader, false), (Acks::All, false), (Acks::All, true)] {
            let label = if acks == Acks::All { "all" } else { "1" };
            for client in ["semel", "kcat"] {
                if client == "kcat" && args.no_kcat {
                    continue;
                }
                n += 1;
                let topic = format!("bench-{n}-{}", std::process::id());
                if ca.is_none() {
                    support::create_topics(&bootstrap, &[(&topic, 3)]).await?;
                }
                let load = Load {
                    bootstrap: bootstrap.clone(),
                    topic,
                    messages: args.messages,
                    size,
                    acks,
                    idempotent,
                    ca: ca.clone(),
                };
                let elapsed = if client == "semel" {
                    semel(&load, args.many).await?
                } else {
                    tokio::task::spawn_blocking(move || kcat(&load)).await??
                };
                let rate = args.messages as f64 / elapsed.as_secs_f64();
                println!(
                    "| {client} | {size} B | {label} | {idempotent} | {rate:.0} | {:.1} |",
                    rate * size as f64 / 1e6
                );
            }
        }
    }
    broker.shutdown().await;
    Ok(())
}
