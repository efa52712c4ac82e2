//! Producer benchmark: semel-producer and kcat (librdkafka) sending the same load to the same
//! broker, for 100 B and 1 KiB records, `acks=1` and `acks=all`, idempotence on and off, back
//! to back, with the ratio semel / librdkafka.
//!
//! ```sh
//! cargo run --release --example producer_bench -- --messages 200000 --runs 3
//! cargo run --release --example producer_bench -- --bootstrap 127.0.0.1:9092
//! cargo run --release --example producer_bench -- --tls
//! ```
//! kcat runs on the librdkafka of the confluent-kafka wheel in `~/.cache/semel/venv`
//! (`scripts/setup.sh` installs it; 2.x, newer than Debian's) when it is there, else on the
//! system's; `--librdkafka FILE` names another `librdkafka.so`. The version used is printed.
//! With `--runs N` each configuration runs N times, the clients alternating, and the table
//! gives the median of each.
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
    /// Runs per configuration and client (the table gives medians).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// The librdkafka shared library kcat runs on (default: the confluent-kafka wheel's, if
    /// installed, else the system's).
    #[arg(long)]
    librdkafka: Option<std::path::PathBuf>,
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
    // The same 1,000 keys kcat reads from its input, made before the clock starts.
    let keys: Vec<bytes::Bytes> = (0..1000).map(|i| format!("k{i}").into()).collect();
    let started = Instant::now();
    let record = |i: usize| ProducerRecord::new(topic, value.clone()).key(keys[i % 1000].clone());
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

/// Where kcat finds the librdkafka to run on: a directory holding `librdkafka.so.1` (a link
/// to `library`), for `LD_LIBRARY_PATH`. `None`: the system's.
fn librdkafka_dir(
    library: Option<std::path::PathBuf>,
) -> anyhow::Result<Option<tempfile::TempDir>> {
    let library = match library {
        Some(library) => Some(library),
        None => {
            // The wheel bundles it as confluent_kafka.libs/librdkafka-<hash>.so.1.
            let venv = std::env::var_os("HOME")
                .map(|home| std::path::Path::new(&home).join(".cache/semel/venv/lib"))
                .filter(|dir| dir.is_dir());
            let mut found = None;
            if let Some(lib) = venv {
                for python in std::fs::read_dir(lib)?.flatten() {
                    let libs = python.path().join("site-packages/confluent_kafka.libs");
                    for file in std::fs::read_dir(libs).into_iter().flatten().flatten() {
                        let name = file.file_name().to_string_lossy().into_owned();
                        if name.starts_with("librdkafka") && name.contains(".so") {
                            found = Some(file.path());
                        }
                    }
                }
            }
            found
        }
    };
    let Some(library) = library else {
        return Ok(None);
    };
    ensure!(library.is_file(), "{}: no such file", library.display());
    let dir = tempfile::tempdir()?;
    std::os::unix::fs::symlink(&library, dir.path().join("librdkafka.so.1"))?;
    Ok(Some(dir))
}

/// kcat's librdkafka version, as `kcat -V` reports it.
fn librdkafka_version(dir: Option<&std::path::Path>) -> anyhow::Result<String> {
    let mut command = Command::new("kcat");
    if let Some(dir) = dir {
        command.env("LD_LIBRARY_PATH", dir);
    }
    let output = command.arg("-V").output().context("cannot run kcat")?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.split_whitespace()
        .skip_while(|word| *word != "librdkafka")
        .nth(1)
        .map(str::to_string)
        .context("kcat -V names no librdkafka version")
}

/// CPU seconds used so far by this process and by its waited-for children (kcat), from
/// `/proc/self/stat` (utime + stime, cutime + cstime).
fn cpu_seconds(ticks_per_second: f64) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses: state is field 3.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<f64>().ok();
    Some((
        (field(14)? + field(15)?) / ticks_per_second,
        (field(16)? + field(17)?) / ticks_per_second,
    ))
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn median(mut rates: Vec<f64>) -> f64 {
    rates.sort_by(f64::total_cmp);
    match rates.len() {
        0 => 0.0,
        n if n % 2 == 1 => rates[n / 2],
        n => (rates[n / 2 - 1] + rates[n / 2]) / 2.0,
    }
}

fn kcat(load: &Load, librdkafka: Option<&std::path::Path>) -> anyhow::Result<Duration> {
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
    if let Some(dir) = librdkafka {
        command.env("LD_LIBRARY_PATH", dir);
    }
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
    let librdkafka = if args.no_kcat {
        None
    } else {
        librdkafka_dir(args.librdkafka.clone())?
    };
    let librdkafka_path = librdkafka.as_ref().map(|d| d.path().to_path_buf());
    if !args.no_kcat {
        println!(
            "kcat on librdkafka {}; semel-producer with {}; median of {} run(s) each",
            librdkafka_version(librdkafka_path.as_deref())?,
            if args.many > 1 {
                format!("send_many of {}", args.many)
            } else {
                "one send per record".into()
            },
            args.runs.max(1)
        );
    }
    println!(
        "| record | acks | idempotent | semel msg/s | librdkafka msg/s | semel / librdkafka |"
    );
    println!("|---|---|---|---|---|---|");
    // With an external broker this process's CPU time is the producer's alone: give it per
    // message, next to kcat's (its process's user + system time).
    let ticks = clock_ticks_per_second();
    let measure_cpu = args.bootstrap.is_some();
    let mut cpu_rows = Vec::new();
    let mut n = 0;
    for size in [100, 1024] {
        for (acks, idempotent) in [(Acks::Leader, false), (Acks::All, false), (Acks::All, true)] {
            let label = if acks == Acks::All { "all" } else { "1" };
            let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
            let mut cpu: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
            for _ in 0..args.runs.max(1) {
                for (c, client) in ["semel", "kcat"].into_iter().enumerate() {
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
                    let before = cpu_seconds(ticks);
                    let elapsed = if client == "semel" {
                        semel(&load, args.many).await?
                    } else {
                        let dir = librdkafka_path.clone();
                        tokio::task::spawn_blocking(move || kcat(&load, dir.as_deref())).await??
                    };
                    rates[c].push(args.messages as f64 / elapsed.as_secs_f64());
                    if let (Some(before), Some(after)) = (before, cpu_seconds(ticks)) {
                        let used = if c == 0 {
                            after.0 - before.0
                        } else {
                            after.1 - before.1
                        };
                        cpu[c].push(used * 1e6 / args.messages as f64);
                    }
                }
            }
            let [semel, kcat] = rates.map(median);
            let ratio = if args.no_kcat {
                "-".to_string()
            } else {
                format!("{:.2}", semel / kcat)
            };
            let kcat = if args.no_kcat {
                "-".to_string()
            } else {
                format!("{kcat:.0}")
            };
            println!("| {size} B | {label} | {idempotent} | {semel:.0} | {kcat} | {ratio} |");
            if measure_cpu && !args.no_kcat {
                let [semel, kcat] = cpu.map(median);
                cpu_rows.push(format!(
                    "| {size} B | {label} | {idempotent} | {semel:.2} | {kcat:.2} |"
                ));
            }
        }
    }
    if !cpu_rows.is_empty() {
        println!();
        println!("Client CPU time (user + system) per message, µs, medians:");
        println!("| record | acks | idempotent | semel | librdkafka (kcat) |");
        println!("|---|---|---|---|---|");
        for row in cpu_rows {
            println!("{row}");
        }
    }
    broker.shutdown().await;
    Ok(())
}
