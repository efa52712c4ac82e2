//! A read-only look into a dedup store (`semel dedup --path DIR`): its buckets and how many
//! marks each holds, the bucket width, the next offset recorded per (group, topic,
//! partition), and its size on disk.
//!
//! The store is opened with RocksDB's read-only mode, which takes no lock: it works while a
//! consumer has the store open, shows what was flushed or logged when it opened, and never
//! writes (no recovery, no compaction, no expiry).

use std::path::{Path, PathBuf};

use rocksdb::{DBWithThreadMode, IteratorMode, MultiThreaded, Options};

use super::store::{
    BUCKET_WIDTH_KEY, DedupError, MARKS_PREFIX, OFFSETS, StoredOffset, StoredWidth,
};

/// One time bucket of marks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketSummary {
    /// Its start (ms since the epoch); it holds marks made from then for one bucket width.
    pub start_ms: i64,
    /// Marks in it.
    pub keys: u64,
}

/// The next offset a store recorded for one partition of one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPartitionOffset {
    /// `group.id`.
    pub group: String,
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// The next offset to read (every record below it is settled).
    pub next_offset: i64,
}

/// What [`inspect`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSummary {
    /// The store's directory.
    pub path: PathBuf,
    /// Bytes of the files in it.
    pub size_bytes: u64,
    /// The bucket width it was created with (half the dedup window), if recorded.
    pub bucket_width_ms: Option<i64>,
    /// Buckets, oldest first.
    pub buckets: Vec<BucketSummary>,
    /// Recorded offsets, in key order.
    pub offsets: Vec<StoredPartitionOffset>,
}

/// Opens the store at `path` read-only and summarises it.
///
/// # Errors
/// `Storage` when it cannot be opened (no store there), `Corrupt` for a value that does not
/// decode.
pub fn inspect(path: &Path) -> Result<StoreSummary, DedupError> {
    let storage = |source| DedupError::Storage {
        path: path.to_path_buf(),
        source,
    };
    let corrupt = |what: String, reason: String| DedupError::Corrupt {
        path: path.to_path_buf(),
        what,
        reason,
    };
    let options = Options::default();
    let families = DBWithThreadMode::<MultiThreaded>::list_cf(&options, path).map_err(storage)?;
    let db =
        DBWithThreadMode::<MultiThreaded>::open_cf_for_read_only(&options, path, &families, false)
            .map_err(storage)?;
    let bucket_width_ms = match db.get(BUCKET_WIDTH_KEY).map_err(storage)? {
        Some(bytes) => Some(
            postcard::from_bytes::<StoredWidth>(&bytes)
                .map_err(|e| corrupt("bucket width".into(), e.to_string()))?
                .width_ms,
        ),
        None => None,
    };
    let mut buckets = Vec::new();
    for name in &families {
        let Some(start_ms) = name
            .strip_prefix(MARKS_PREFIX)
            .and_then(|s| s.parse::<i64>().ok())
        else {
            continue;
        };
        let family = db
            .cf_handle(name)
            .ok_or_else(|| corrupt(name.clone(), "listed but not opened".into()))?;
        let mut keys = 0u64;
        for item in db.iterator_cf(&family, IteratorMode::Start) {
            let (key, value) = item.map_err(storage)?;
            // A batch record holds many marks (see `recent`).
            keys += match super::recent::parse_batch_key(&key) {
                Some(seq) => super::recent::decode_batch(&value)
                    .map_err(|reason| corrupt(format!("{name}: batch record {seq}"), reason))?
                    .1
                    .len() as u64,
                None => 1,
            };
        }
        buckets.push(BucketSummary { start_ms, keys });
    }
    buckets.sort_by_key(|b| b.start_ms);
    let mut offsets = Vec::new();
    if let Some(family) = db.cf_handle(OFFSETS) {
        for item in db.iterator_cf(&family, IteratorMode::Start) {
            let (key, value) = item.map_err(storage)?;
            // 0xff starts the claim bookkeeping kept beside the offsets.
            if key.first() == Some(&0xff) {
                continue;
            }
            let Some((group, topic, partition)) = parse_offset_key(&key) else {
                return Err(corrupt("offset key".into(), format!("{key:?}")));
            };
            let stored: StoredOffset = postcard::from_bytes(&value).map_err(|e| {
                corrupt(
                    format!("offset of {group}/{topic}-{partition}"),
                    e.to_string(),
                )
            })?;
            offsets.push(StoredPartitionOffset {
                group,
                topic,
                partition,
                next_offset: stored.next_offset,
            });
        }
    }
    Ok(StoreSummary {
        path: path.to_path_buf(),
        size_bytes: directory_bytes(path),
        bucket_width_ms,
        buckets,
        offsets,
    })
}

/// (group, topic, partition) from an offsets-family key: two length-prefixed strings and a
/// big-endian partition.
fn parse_offset_key(mut key: &[u8]) -> Option<(String, String, i32)> {
    let mut text = || -> Option<String> {
        let len = u32::from_be_bytes(key.get(..4)?.try_into().ok()?) as usize;
        let value = std::str::from_utf8(key.get(4..4 + len)?).ok()?.to_string();
        key = &key[4 + len..];
        Some(value)
    };
    let group = text()?;
    let topic = text()?;
    let partition = i32::from_be_bytes(key.try_into().ok()?);
    Some((group, topic, partition))
}

/// Bytes of the files directly in `path` (a RocksDB directory has no subfolders).
pub fn directory_bytes(path: &Path) -> u64 {
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
