//! Dedup store benchmark: claim + mark_done pairs per second for fresh keys, then claim of
//! the same keys again (all duplicates), with disk bytes per key and the process's RSS.
//!
//! ```sh
//! cargo run --release --example dedup_bench -- --keys 1000000
//! ```
//! Runs on one task (one core for the store; RocksDB's background flushes and compactions use
//! their own threads). The store lives in a temporary directory.

use std::time::Instant;

use clap::Parser;
use semel::consumer::dedup::{Claim, DedupConfig, DedupStore, KeyHash};

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

fn dir_bytes(path: &std::path::Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .filter(std::fs::Metadata::is_file)
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let store = DedupStore::open(DedupConfig {
        sync_writes: args.sync,
        block_cache_bytes: args.cache_mib << 20,
        ..DedupConfig::new(dir.path())
    })?;
    let key = |n: u64| KeyHash::new("bench", "payments", format!("msg-{n}").as_bytes());

    let started = Instant::now();
    for n in 0..args.keys {
        let k = key(n);
        anyhow::ensure!(store.claim(k)? == Claim::Fresh, "key {n} not fresh");
        store.mark_done(
            k,
            Some(("bench", "payments", 0, i64::try_from(n)? + 1)),
            |_| {},
        )?;
    }
    let fresh = started.elapsed();

    let started = Instant::now();
    for n in 0..args.keys {
        anyhow::ensure!(
            store.claim(key(n))? == Claim::Duplicate,
            "key {n} not a duplicate"
        );
    }
    let duplicates = started.elapsed();
    let (estimated_keys, sst_bytes) = store.size();
    let rss = rss_mib();
    drop(store);
    let disk = dir_bytes(dir.path());
    println!(
        "keys={} sync={} cache={} MiB: claim+mark_done {:.0} pairs/s ({:.2} µs/pair); duplicate claim {:.0}/s; \
         estimated keys {estimated_keys}; SST bytes {sst_bytes}; on disk after close {disk} bytes \
         ({:.1} bytes/key); RSS {rss:.0} MiB",
        args.keys,
        args.sync,
        args.cache_mib,
        args.keys as f64 / fresh.as_secs_f64(),
        fresh.as_secs_f64() * 1e6 / args.keys as f64,
        args.keys as f64 / duplicates.as_secs_f64(),
        disk as f64 / args.keys as f64,
    );
    Ok(())
}
