//! `semel`: an admin tool for any Kafka-protocol cluster (semel-broker, Apache Kafka), on
//! `semel::client::Admin`.
//!
//! ```sh
//! semel topics list
//! semel topics create orders --partitions 3 --config retention.ms=86400000
//! semel groups describe billing            # committed offset, end, lag and owner per partition
//! semel offsets reset --group billing --topic orders --to-earliest            # dry run
//! semel offsets reset --group billing --topic orders --to-earliest --execute
//! semel producers --topic orders
//! semel dedup --path /var/lib/billing/dedup  # a dedup store, read-only: buckets, offsets, size
//! semel --command-config client.properties --json groups list   # TLS/SASL settings, JSON
//! ```
//!
//! Tables are aligned text; `--json` prints one JSON document instead. Exit status 1 with the
//! reason on stderr when anything fails.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use semel::client::admin::{NewTopic, OffsetSpec, TopicPartition};
use semel::client::{Admin, ClientConfig, ConnectionConfig, SecurityConfig};

/// Admin tool for Kafka-protocol clusters: topics, consumer groups and their lag, committed
/// offsets, producers.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Broker(s) to bootstrap from, comma-separated (Kafka: bootstrap.servers).
    #[arg(long, env = "SEMEL_BOOTSTRAP_SERVER", default_value = "127.0.0.1:9092")]
    bootstrap_server: String,
    /// Java-style properties file with client settings: security.protocol, sasl.*, ssl.*,
    /// client.id, request.timeout.ms (as the Kafka tools' --command-config).
    #[arg(long)]
    command_config: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Topics: list, create, delete, describe.
    #[command(subcommand)]
    Topics(Topics),
    /// Consumer groups: list, describe (with lag).
    #[command(subcommand)]
    Groups(Groups),
    /// Committed offsets of a group.
    #[command(subcommand)]
    Offsets(Offsets),
    /// Active producers (id, epoch, last sequence) of a topic's partitions.
    Producers {
        /// The topic.
        #[arg(long)]
        topic: String,
    },
    /// A dedup store, opened read-only (no broker needed; works while a consumer uses it):
    /// bucket width, marks per bucket, the next offset recorded per partition, size on disk.
    Dedup {
        /// The store's directory (`DedupConfig::path`).
        #[arg(long)]
        path: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum Topics {
    /// Every topic with its partition count.
    List,
    /// Create a topic.
    Create {
        /// Its name.
        name: String,
        /// Partitions (default: the broker's num.partitions).
        #[arg(long, default_value_t = -1)]
        partitions: i32,
        /// Replication factor (default: the broker's).
        #[arg(long, default_value_t = -1)]
        replication_factor: i16,
        /// A topic config, key=value (repeatable).
        #[arg(long = "config", value_parser = key_value)]
        configs: Vec<(String, String)>,
    },
    /// Delete a topic.
    Delete {
        /// Its name.
        name: String,
    },
    /// Partitions with their leader, start and end offsets.
    Describe {
        /// Its name.
        name: String,
    },
    /// A topic's configs and where each value comes from.
    Configs {
        /// Its name.
        name: String,
    },
    /// Set (`--set k=v`) or remove (`--delete k`) topic configs; the others keep their values.
    AlterConfigs {
        /// Its name.
        name: String,
        /// A config to set, key=value (repeatable).
        #[arg(long = "set", value_parser = key_value)]
        set: Vec<(String, String)>,
        /// A config to return to the broker's default (repeatable).
        #[arg(long = "delete")]
        delete: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum Groups {
    /// Every group with its state.
    List,
    /// Per partition: committed offset, log end offset, lag, owning member.
    Describe {
        /// The group.
        group: String,
    },
    /// Delete a group without active members, with its committed offsets.
    Delete {
        /// The group.
        group: String,
    },
}

#[derive(Debug, Subcommand)]
enum Offsets {
    /// Move a group's committed offsets (a dry run unless --execute; the group must have
    /// no active member, as kafka-consumer-groups requires).
    Reset {
        /// The group.
        #[arg(long)]
        group: String,
        /// The topic whose partitions move.
        #[arg(long)]
        topic: String,
        /// Only these partitions (repeatable; default: all).
        #[arg(long = "partition")]
        partitions: Vec<i32>,
        /// To each partition's log start.
        #[arg(long, group = "to")]
        to_earliest: bool,
        /// To each partition's log end.
        #[arg(long, group = "to")]
        to_latest: bool,
        /// To the first offset at or after this time (ms since the epoch).
        #[arg(long, group = "to")]
        to_datetime: Option<i64>,
        /// By this many offsets from the committed one (negative: back), kept within the log.
        #[arg(long, group = "to", allow_negative_numbers = true)]
        shift_by: Option<i64>,
        /// Commit the new offsets (without it, only print them).
        #[arg(long)]
        execute: bool,
    },
}

fn key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .ok_or_else(|| format!("{text:?} is not key=value"))
}

/// The client settings: bootstrap servers, and what the properties file gives.
fn client_config(args: &Args) -> anyhow::Result<ClientConfig> {
    let mut connection = ConnectionConfig {
        client_id: "semel-admin".into(),
        ..ConnectionConfig::default()
    };
    let mut bootstrap: Vec<String> = args
        .bootstrap_server
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if let Some(path) = &args.command_config {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --command-config {}", path.display()))?;
        let mut security = SecurityConfig::default();
        for p in semel::client::properties::parse(&text)? {
            if security.apply_property(&p)? {
                continue;
            }
            match p.key.as_str() {
                "bootstrap.servers" => bootstrap = p.list(),
                "client.id" => connection.client_id.clone_from(&p.value),
                "request.timeout.ms" => connection.request_timeout = p.millis()?,
                _ => bail!(
                    "{}: line {}: {}: unknown setting (security.protocol, sasl.*, ssl.*, \
                     bootstrap.servers, client.id and request.timeout.ms are read)",
                    path.display(),
                    p.line,
                    p.key
                ),
            }
        }
        if let Err((name, reason)) = security.validate() {
            bail!("{}: {name}: {reason}", path.display());
        }
        connection.security = security;
    }
    Ok(ClientConfig {
        bootstrap_servers: bootstrap,
        connection,
        reconnect_backoff_max: Duration::from_millis(500),
        ..ClientConfig::default()
    })
}

/// A column of text, or a JSON value.
#[derive(Debug, Clone)]
enum Cell {
    Text(String),
    Number(Option<i64>),
}

impl Cell {
    fn text(&self) -> String {
        match self {
            Self::Text(s) => s.clone(),
            Self::Number(Some(n)) => n.to_string(),
            Self::Number(None) => "-".into(),
        }
    }

    fn json(&self) -> String {
        match self {
            Self::Text(s) => json_string(s),
            Self::Number(Some(n)) => n.to_string(),
            Self::Number(None) => "null".into(),
        }
    }
}

fn text(s: impl Into<String>) -> Cell {
    Cell::Text(s.into())
}

fn number(n: impl Into<i64>) -> Cell {
    Cell::Number(Some(n.into()))
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Prints rows under `headers`: aligned columns, or a JSON array of objects keyed by the
/// headers in lower case.
fn print_rows(json: bool, headers: &[&str], rows: &[Vec<Cell>]) {
    if json {
        let objects: Vec<String> = rows
            .iter()
            .map(|row| {
                let fields: Vec<String> = headers
                    .iter()
                    .zip(row)
                    .map(|(h, c)| format!("{}:{}", json_string(&h.to_lowercase()), c.json()))
                    .collect();
                format!("{{{}}}", fields.join(","))
            })
            .collect();
        println!("[{}]", objects.join(",\n "));
        return;
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(Cell::text).collect())
        .collect();
    let widths: Vec<usize> = headers
        .iter()
        .enumerate()
        .map(|(i, h)| {
            cells
                .iter()
                .map(|r| r.get(i).map_or(0, String::len))
                .chain([h.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |values: Vec<&str>| {
        let padded: Vec<String> = values
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in &cells {
        line(row.iter().map(String::as_str).collect());
    }
}

/// `semel dedup`: the store's summary, as two tables (or one JSON document).
fn dedup(path: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let summary = semel::consumer::dedup::inspect::inspect(path)?;
    let keys: u64 = summary.buckets.iter().map(|b| b.keys).sum();
    let buckets: Vec<Vec<Cell>> = summary
        .buckets
        .iter()
        .map(|b| vec![number(b.start_ms), Cell::Number(i64::try_from(b.keys).ok())])
        .collect();
    let offsets: Vec<Vec<Cell>> = summary
        .offsets
        .iter()
        .map(|o| {
            vec![
                text(o.group.clone()),
                text(o.topic.clone()),
                number(o.partition),
                number(o.next_offset),
            ]
        })
        .collect();
    if json {
        println!(
            "{{\"path\":{},\"size_bytes\":{},\"bucket_width_ms\":{},\"keys\":{keys},\"buckets\":",
            json_string(&summary.path.display().to_string()),
            summary.size_bytes,
            Cell::Number(summary.bucket_width_ms).json()
        );
        print_rows(true, &["START_MS", "KEYS"], &buckets);
        println!(",\"offsets\":");
        print_rows(
            true,
            &["GROUP", "TOPIC", "PARTITION", "NEXT_OFFSET"],
            &offsets,
        );
        println!("}}");
        return Ok(());
    }
    println!(
        "{}: {keys} keys in {} buckets of {} ms, {} bytes on disk",
        summary.path.display(),
        summary.buckets.len(),
        Cell::Number(summary.bucket_width_ms).text(),
        summary.size_bytes
    );
    println!();
    print_rows(false, &["BUCKET-START-MS", "KEYS"], &buckets);
    println!();
    print_rows(
        false,
        &["GROUP", "TOPIC", "PARTITION", "NEXT-OFFSET"],
        &offsets,
    );
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<()> {
    if let Command::Dedup { path } = &args.command {
        return dedup(path, args.json);
    }
    let admin = Admin::connect(client_config(&args)?).await?;
    let json = args.json;
    match args.command {
        Command::Topics(Topics::List) => {
            let rows: Vec<Vec<Cell>> = admin
                .list_topics()
                .await?
                .into_iter()
                .map(|(topic, partitions)| {
                    vec![text(topic), number(i64::try_from(partitions).unwrap_or(-1))]
                })
                .collect();
            print_rows(json, &["TOPIC", "PARTITIONS"], &rows);
        }
        Command::Topics(Topics::Create {
            name,
            partitions,
            replication_factor,
            configs,
        }) => {
            let results = admin
                .create_topics(&[NewTopic {
                    name: name.clone(),
                    partitions,
                    replication_factor,
                    configs: configs.into_iter().collect(),
                }])
                .await?;
            for (topic, result) in results {
                result.with_context(|| format!("creating {topic}"))?;
            }
            println!("Created topic {name}.");
        }
        Command::Topics(Topics::Delete { name }) => {
            for (topic, result) in admin.delete_topics(&[&name]).await? {
                result.with_context(|| format!("deleting {topic}"))?;
            }
            println!("Deleted topic {name}.");
        }
        Command::Topics(Topics::Describe { name }) => {
            let partitions = admin.describe_topic(&name).await?;
            let all: Vec<TopicPartition> =
                partitions.iter().map(|(p, _)| (name.clone(), *p)).collect();
            let starts = admin.list_offsets(&all, OffsetSpec::Earliest).await?;
            let ends = admin.list_offsets(&all, OffsetSpec::Latest).await?;
            let rows: Vec<Vec<Cell>> = partitions
                .iter()
                .map(|(p, leader)| {
                    let tp = (name.clone(), *p);
                    vec![
                        text(name.clone()),
                        number(*p),
                        number(*leader),
                        Cell::Number(starts.get(&tp).copied()),
                        Cell::Number(ends.get(&tp).copied()),
                    ]
                })
                .collect();
            print_rows(
                json,
                &["TOPIC", "PARTITION", "LEADER", "START-OFFSET", "END-OFFSET"],
                &rows,
            );
        }
        Command::Topics(Topics::Configs { name }) => {
            let sources = |source: i8| match source {
                1 => "topic",
                4 => "broker (static)",
                5 => "default",
                _ => "other",
            };
            let rows: Vec<Vec<Cell>> = admin
                .describe_topic_configs(&name)
                .await?
                .into_iter()
                .map(|(key, (value, source))| {
                    vec![
                        text(key),
                        text(value.unwrap_or_else(|| "(sensitive)".into())),
                        text(sources(source)),
                    ]
                })
                .collect();
            print_rows(json, &["CONFIG", "VALUE", "SOURCE"], &rows);
        }
        Command::Topics(Topics::AlterConfigs { name, set, delete }) => {
            anyhow::ensure!(
                !set.is_empty() || !delete.is_empty(),
                "say what to change: --set key=value or --delete key"
            );
            admin
                .alter_topic_configs(&name, &set.into_iter().collect(), &delete)
                .await?;
            println!("Altered the configs of {name}.");
        }
        Command::Groups(Groups::Delete { group }) => {
            for (group, result) in admin.delete_groups(&[&group]).await? {
                result.with_context(|| format!("deleting group {group}"))?;
            }
            println!("Deleted group {group}.");
        }
        Command::Groups(Groups::List) => {
            let rows: Vec<Vec<Cell>> = admin
                .list_groups()
                .await?
                .into_iter()
                .map(|g| vec![text(g.group_id), text(g.state), text(g.protocol_type)])
                .collect();
            print_rows(json, &["GROUP", "STATE", "PROTOCOL-TYPE"], &rows);
        }
        Command::Groups(Groups::Describe { group }) => {
            let rows: Vec<Vec<Cell>> = admin
                .group_lag(&group)
                .await?
                .into_iter()
                .map(|l| {
                    vec![
                        text(group.clone()),
                        text(l.topic),
                        number(l.partition),
                        Cell::Number(l.committed),
                        number(l.end),
                        Cell::Number(l.lag),
                        text(l.owner.unwrap_or_else(|| "-".into())),
                        text(l.client_id.unwrap_or_else(|| "-".into())),
                    ]
                })
                .collect();
            print_rows(
                json,
                &[
                    "GROUP",
                    "TOPIC",
                    "PARTITION",
                    "CURRENT-OFFSET",
                    "LOG-END-OFFSET",
                    "LAG",
                    "CONSUMER-ID",
                    "CLIENT-ID",
                ],
                &rows,
            );
        }
        Command::Offsets(Offsets::Reset {
            group,
            topic,
            partitions,
            to_earliest,
            to_latest,
            to_datetime,
            shift_by,
            execute,
        }) => {
            let all: Vec<TopicPartition> = admin
                .describe_topic(&topic)
                .await?
                .into_iter()
                .map(|(p, _)| (topic.clone(), p))
                .filter(|(_, p)| partitions.is_empty() || partitions.contains(p))
                .collect();
            anyhow::ensure!(
                !all.is_empty(),
                "{topic} has none of partitions {partitions:?}"
            );
            let targets: BTreeMap<TopicPartition, i64> = if to_earliest {
                admin.list_offsets(&all, OffsetSpec::Earliest).await?
            } else if to_latest {
                admin.list_offsets(&all, OffsetSpec::Latest).await?
            } else if let Some(ms) = to_datetime {
                admin.list_offsets(&all, OffsetSpec::Timestamp(ms)).await?
            } else if let Some(shift) = shift_by {
                let committed = admin.committed_offsets(&group).await?;
                let starts = admin.list_offsets(&all, OffsetSpec::Earliest).await?;
                let ends = admin.list_offsets(&all, OffsetSpec::Latest).await?;
                all.iter()
                    .map(|tp| {
                        let (start, end) = (starts[tp], ends[tp]);
                        let from = committed.get(tp).copied().unwrap_or(end);
                        (tp.clone(), from.saturating_add(shift).clamp(start, end))
                    })
                    .collect()
            } else {
                bail!("say where to: --to-earliest, --to-latest, --to-datetime or --shift-by");
            };
            if execute {
                admin.alter_committed_offsets(&group, &targets).await?;
            }
            let rows: Vec<Vec<Cell>> = targets
                .iter()
                .map(|((t, p), offset)| {
                    vec![
                        text(group.clone()),
                        text(t.clone()),
                        number(*p),
                        number(*offset),
                    ]
                })
                .collect();
            print_rows(json, &["GROUP", "TOPIC", "PARTITION", "NEW-OFFSET"], &rows);
            if !execute && !json {
                eprintln!("(dry run: nothing committed; add --execute to commit these offsets)");
            }
        }
        Command::Dedup { path } => dedup(&path, json)?,
        Command::Producers { topic } => {
            let all: Vec<TopicPartition> = admin
                .describe_topic(&topic)
                .await?
                .into_iter()
                .map(|(p, _)| (topic.clone(), p))
                .collect();
            let rows: Vec<Vec<Cell>> = admin
                .describe_producers(&all)
                .await?
                .into_iter()
                .map(|s| {
                    vec![
                        text(s.topic),
                        number(s.partition),
                        number(s.producer_id),
                        number(s.producer_epoch),
                        number(s.last_sequence),
                        number(s.last_timestamp),
                        number(s.current_txn_start_offset),
                    ]
                })
                .collect();
            print_rows(
                json,
                &[
                    "TOPIC",
                    "PARTITION",
                    "PRODUCER-ID",
                    "PRODUCER-EPOCH",
                    "LAST-SEQUENCE",
                    "LAST-TIMESTAMP",
                    "CURRENT-TRANSACTION-START-OFFSET",
                ],
                &rows,
            );
        }
    }
    Ok(())
}

fn main() {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("semel: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    // Every call is bounded by request.timeout.ms; the whole command by two minutes more.
    let result = runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(120), run(args))
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within 120 s")))
    });
    if let Err(e) = result {
        eprintln!("semel: {e:#}");
        std::process::exit(1);
    }
}
