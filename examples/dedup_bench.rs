//! Dedup store benchmark: claim + mark_done pairs per second for fresh keys, then claim of
//! the same keys again (all duplicates), with disk bytes per key and the process's RSS;
//! unbatched (`--batch 1`) or a poll's worth at a time (`claim_many` + `mark_done_many`).
//! With `--redis N`, the common alternative on the first N keys: Redis `SET key 1 NX EX
//! <window>` on loopback (Debian's redis-server, started here with AOF written but not
//! fsynced, the same durability as the store without `--sync`), one round trip per key and
//! pipelined in `--batch` sized groups.
//!
//! ```sh
//! cargo run --release --example dedup_bench -- --keys 1000000 --batch 100 --redis 1000000
//! ```
//! Runs on one task (one core for the store; RocksDB's background flushes and compactions use
//! their own threads). The store lives in a temporary directory.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use semel::consumer::dedup::{Claim, ClaimToken, DedupConfig, DedupStore, KeyHash};

/// Dedup store benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// Distinct message keys to mark.
    #[arg(long, default_value_t = 1_000_000)]
    keys: u64,
    /// fsync every mark.
    #[arg(long)]
    sync: bool,
    /// Block cache size in MiB.
    #[arg(long, default_value_t = 64)]
    cache_mib: usize,
    /// One memtable's size in MiB (`DedupConfig::write_buffer_bytes`).
    #[arg(long, default_value_t = 4)]
    write_buffer_mib: usize,
    /// Keys per claim_many/mark_done_many (1: one call per key).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Also run Redis SET NX EX on this many of the keys (0: skip).
    #[arg(long, default_value_t = 0)]
    redis: u64,
}

/// A redis-server child on a free loopback port, killed on drop.
struct Redis {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = tempfile::tempdir()?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "yes", "--appendfsync", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                anyhow::anyhow!("cannot start redis-server ({e}); apt-get install redis-server")
            })?;
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self { child, port, dir })
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal RESP client: commands out, one reply (status, integer or bulk) back per command.
struct Resp {
    write: TcpStream,
    read: BufReader<TcpStream>,
}

impl Resp {
    fn connect(port: u16) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            read: BufReader::new(stream.try_clone()?),
            write: stream,
        })
    }

    fn encode(buf: &mut Vec<u8>, parts: &[&[u8]]) {
        buf.extend_from_slice(format!("*{}\r\n", parts.len()).as_bytes());
        for part in parts {
            buf.extend_from_slice(format!("${}\r\n", part.len()).as_bytes());
            buf.extend_from_slice(part);
            buf.extend_from_slice(b"\r\n");
        }
    }

    /// One reply: `Some(text)` for a status, integer or bulk; `None` for a nil bulk.
    fn reply(&mut self) -> anyhow::Result<Option<String>> {
        let mut line = String::new();
        self.read.read_line(&mut line)?;
        let line = line.trim_end().to_string();
        match line.as_bytes().first() {
            Some(b'+' | b':') => Ok(Some(line[1..].to_string())),
            Some(b'$') if line == "$-1" => Ok(None),
            Some(b'$') => {
                let len: usize = line[1..].parse()?;
                let mut body = vec![0; len + 2];
                std::io::Read::read_exact(&mut self.read, &mut body)?;
                Ok(Some(String::from_utf8_lossy(&body[..len]).into_owned()))
            }
            _ => anyhow::bail!("redis: {line}"),
        }
    }

    /// `SET key 1 NX EX window` for `keys`, `batch` per round trip; how many were set.
    fn set_nx(&mut self, keys: &[String], batch: usize, window_s: &str) -> anyhow::Result<u64> {
        let mut set = 0;
        let mut buf = Vec::new();
        for group in keys.chunks(batch) {
            buf.clear();
            for key in group {
                Self::encode(
                    &mut buf,
                    &[
                        b"SET",
                        key.as_bytes(),
                        b"1",
                        b"NX",
                        b"EX",
                        window_s.as_bytes(),
                    ],
                );
            }
            self.write.write_all(&buf)?;
            for _ in group {
                if self.reply()?.is_some() {
                    set += 1;
                }
            }
        }
        Ok(set)
    }

    fn used_memory(&mut self) -> anyhow::Result<u64> {
        let mut buf = Vec::new();
        Self::encode(&mut buf, &[b"INFO", b"memory"]);
        self.write.write_all(&buf)?;
        let info = self.reply()?.unwrap_or_default();
        Ok(info
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0))
    }
}

fn redis_bench(keys: u64, batch: usize) -> anyhow::Result<()> {
    let names: Vec<String> = (0..keys)
        .map(|n| format!("bench:payments:msg-{n}"))
        .collect();
    let window_s = (7 * 24 * 3600).to_string();
    for (label, per_trip) in [("unpipelined", 1), ("pipelined", batch.max(2))] {
        let redis = Redis::start()?;
        let mut client = Resp::connect(redis.port)?;
        let base = client.used_memory()?;
        let started = Instant::now();
        let set = client.set_nx(&names, per_trip, &window_s)?;
        let fresh = started.elapsed();
        anyhow::ensure!(set == keys, "redis set {set} of {keys}");
        let started = Instant::now();
        let again = client.set_nx(&names, per_trip, &window_s)?;
        let duplicates = started.elapsed();
        anyhow::ensure!(again == 0, "redis set {again} duplicates");
        let memory = client.used_memory()?.saturating_sub(base);
        let aof = semel::consumer::dedup::inspect::directory_bytes(redis.dir.path())
            + semel::consumer::dedup::inspect::directory_bytes(
                &redis.dir.path().join("appendonlydir"),
            );
        println!(
            "redis {label} ({per_trip}/round trip) keys={keys}: SET NX EX fresh {:.0}/s; \
             duplicate {:.0}/s; used_memory {:.1} bytes/key; AOF {:.1} bytes/key",
            keys as f64 / fresh.as_secs_f64(),
            keys as f64 / duplicates.as_secs_f64(),
            memory as f64 / keys as f64,
            aof as f64 / keys as f64,
        );
    }
    Ok(())
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let config = DedupConfig {
        sync_writes: args.sync,
        block_cache_bytes: args.cache_mib << 20,
        write_buffer_bytes: args.write_buffer_mib << 20,
        ..DedupConfig::new(dir.path())
    };
    let store = DedupStore::open(config.clone())?;
    let key = |n: u64| KeyHash::new("bench", "payments", format!("msg-{n}").as_bytes());

    let batch = args.batch.max(1);
    let started = Instant::now();
    if batch == 1 {
        for n in 0..args.keys {
            let k = key(n);
            let Claim::Fresh(token) = store.claim(k)? else {
                anyhow::bail!("key {n} not fresh");
            };
            store.mark_done(
                k,
                token,
                Some(("bench", "payments", 0, i64::try_from(n)? + 1)),
                |_| {},
            )?;
        }
    } else {
        let mut keys = Vec::with_capacity(batch);
        let mut n = 0;
        while n < args.keys {
            keys.clear();
            keys.extend((n..(n + batch as u64).min(args.keys)).map(key));
            let outcomes = store.claim_many(&keys)?;
            let claims: Vec<(KeyHash, ClaimToken)> = keys
                .iter()
                .zip(&outcomes)
                .filter_map(|(k, c)| match c {
                    Claim::Fresh(token) => Some((*k, *token)),
                    _ => None,
                })
                .collect();
            anyhow::ensure!(claims.len() == keys.len(), "keys from {n} not fresh");
            n += keys.len() as u64;
            store.mark_done_many(
                &claims,
                &[("bench", "payments", 0, i64::try_from(n)?)],
                |_| {},
            )?;
            if n % 10_000_000 < batch as u64 {
                eprintln!("{n} keys marked after {:.0?}", started.elapsed());
            }
        }
    }
    let fresh = started.elapsed();

    let started = Instant::now();
    if batch == 1 {
        for n in 0..args.keys {
            anyhow::ensure!(
                store.claim(key(n))? == Claim::Duplicate,
                "key {n} not a duplicate"
            );
        }
    } else {
        let mut keys = Vec::with_capacity(batch);
        let mut n = 0;
        while n < args.keys {
            keys.clear();
            keys.extend((n..(n + batch as u64).min(args.keys)).map(key));
            let outcomes = store.claim_many(&keys)?;
            anyhow::ensure!(
                outcomes.iter().all(|c| *c == Claim::Duplicate),
                "keys from {n} not duplicates"
            );
            n += keys.len() as u64;
        }
    }
    let duplicates = started.elapsed();
    let (estimated_keys, sst_bytes) = store.size();
    let filter_bytes = store.filter_bytes();
    let (held, held_bytes) = store.marks_in_memory();
    let rss = rss_mib();
    drop(store);
    let disk = semel::consumer::dedup::inspect::directory_bytes(dir.path());
    // An open reads every key of the live buckets into the in-memory filters.
    let started = Instant::now();
    let reopened = DedupStore::open(config)?;
    let reopen = started.elapsed();
    drop(reopened);
    println!(
        "semel store keys={} batch={batch} sync={} cache={} MiB: claim+mark_done {:.0} pairs/s ({:.2} µs/pair); duplicate claim {:.0}/s; \
         estimated keys {estimated_keys}; SST bytes {sst_bytes}; on disk after close {disk} bytes \
         ({:.1} bytes/key); RSS {rss:.0} MiB; key filters {filter_bytes} bytes; \
         marks held in memory {held} ({held_bytes} bytes); reopen {:.2} s",
        args.keys,
        args.sync,
        args.cache_mib,
        args.keys as f64 / fresh.as_secs_f64(),
        fresh.as_secs_f64() * 1e6 / args.keys as f64,
        args.keys as f64 / duplicates.as_secs_f64(),
        disk as f64 / args.keys as f64,
        reopen.as_secs_f64(),
    );
    if args.redis > 0 {
        redis_bench(args.redis, batch)?;
    }
    Ok(())
}
