//! Producer-state snapshots: one file per snapshot in the partition directory, named by the log
//! end offset it covers (`00000000000000001234.snapshot`), in the broker's state-file format
//! (magic, format version, postcard payload, CRC-32C).
//!
//! Unlike Kafka, whose snapshots keep only the last batch of each producer, a snapshot here
//! keeps all [`super::CACHED_BATCHES`] batches, so the window of detectable duplicates is the
//! same after a restart as before it.
//!
//! Recovery ([`load`]) takes the newest snapshot at or below the log end that reads back
//! intact. Snapshots above the log end (the tail they covered was truncated) and corrupt ones
//! are deleted, with a warning. The caller then replays the log after the snapshot.
//!
//! References: docs/idempotence.md "Persistence and rebuild"; Kafka's `ProducerStateManager`
//! (snapshot per segment roll, named by offset).

use std::fs;
use std::path::{Path, PathBuf};

use super::rules::ProducerEntry;
use crate::state_file::{self, StateFileError};

const MAGIC: &[u8; 8] = b"SEMELPST";
/// 2: open transactions and the aborted-transaction index were added. A version-1 snapshot
/// reads as unusable, so the state is rebuilt from the log.
const VERSION: u16 = 2;
const EXTENSION: &str = "snapshot";
/// Snapshots kept after a new one is written (the newest, and one to fall back on).
pub(crate) const KEPT_SNAPSHOTS: usize = 2;

/// The payload of one snapshot file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct SnapshotFile {
    /// Every batch below this offset is reflected in `producers`.
    pub(crate) end_offset: i64,
    /// Broker clock when the snapshot was written.
    pub(crate) written_ms: i64,
    /// Every producer the partition remembered, by producer id.
    pub(crate) producers: Vec<(i64, ProducerEntry)>,
    /// Open transactions: producer id and the offset of its first batch.
    pub(crate) ongoing: Vec<(i64, i64)>,
    /// The aborted-transaction index.
    pub(crate) aborted: Vec<crate::transactions::partition::AbortedTxn>,
}

/// Path of the snapshot covering everything below `end_offset`.
pub(crate) fn path(dir: &Path, end_offset: i64) -> PathBuf {
    dir.join(format!("{end_offset:020}.{EXTENSION}"))
}

/// Writes a snapshot atomically, then deletes all but the newest [`KEPT_SNAPSHOTS`].
///
/// # Errors
/// When the snapshot cannot be written (the previous snapshots are then untouched).
pub(crate) fn write(dir: &Path, snapshot: &SnapshotFile) -> Result<(), StateFileError> {
    state_file::write(&path(dir, snapshot.end_offset), MAGIC, VERSION, snapshot)?;
    let mut offsets = list(dir);
    offsets.sort_unstable_by(|a, b| b.cmp(a));
    for old in offsets.into_iter().skip(KEPT_SNAPSHOTS) {
        if let Err(e) = fs::remove_file(path(dir, old)) {
            tracing::warn!(dir = %dir.display(), offset = old, error = %e, "could not delete an old producer snapshot");
        }
    }
    Ok(())
}

/// Offsets of the snapshot files in `dir`, unordered.
fn list(dir: &Path) -> Vec<i64> {
    state_file::offsets_named(dir, EXTENSION)
}

/// What [`load`] found.
#[derive(Debug, Default)]
pub(crate) struct LoadReport {
    /// Snapshots deleted because they were corrupt, unreadable or beyond the log end.
    pub(crate) discarded: Vec<(PathBuf, String)>,
}

/// The newest intact snapshot at or below `log_end_offset`, if any.
pub(crate) fn load(dir: &Path, log_end_offset: i64) -> (Option<SnapshotFile>, LoadReport) {
    let mut report = LoadReport::default();
    let mut offsets = list(dir);
    offsets.sort_unstable_by(|a, b| b.cmp(a));
    let mut found = None;
    for offset in offsets {
        let file = path(dir, offset);
        if found.is_some() {
            break;
        }
        if offset > log_end_offset {
            report.discarded.push((
                file.clone(),
                format!("covers offsets up to {offset}, beyond the log end {log_end_offset}"),
            ));
            let _ = fs::remove_file(&file);
            continue;
        }
        match state_file::read::<SnapshotFile>(&file, MAGIC, VERSION) {
            Ok(Some(snapshot)) if snapshot.end_offset == offset => found = Some(snapshot),
            Ok(Some(snapshot)) => {
                report.discarded.push((
                    file.clone(),
                    format!(
                        "holds end offset {} but is named {offset}",
                        snapshot.end_offset
                    ),
                ));
                let _ = fs::remove_file(&file);
            }
            Ok(None) => {}
            Err(e) => {
                report.discarded.push((file.clone(), e.to_string()));
                let _ = fs::remove_file(&file);
            }
        }
    }
    if !report.discarded.is_empty()
        && let Err(e) = state_file::sync_dir(dir)
    {
        // A snapshot beyond the log end that a power cut brought back would pass for valid
        // once the log grew past it; any later fsync on the same file system makes the
        // deletion durable too, so this is only reported.
        tracing::warn!(dir = %dir.display(), error = %e, "could not fsync the directory after discarding producer snapshots");
    }
    (found, report)
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use crate::idempotence::CachedBatch;

    fn snapshot(end_offset: i64) -> SnapshotFile {
        let batches = (0..5)
            .map(|i| CachedBatch {
                first_sequence: i * 10,
                last_sequence: i * 10 + 9,
                base_offset: i64::from(i) * 10,
                last_offset: i64::from(i) * 10 + 9,
                log_append_time_ms: -1,
            })
            .collect::<VecDeque<_>>();
        SnapshotFile {
            end_offset,
            written_ms: 1_000,
            producers: vec![(
                42,
                ProducerEntry {
                    epoch: 3,
                    batches,
                    last_timestamp_ms: 900,
                },
            )],
            ongoing: vec![(42, 7)],
            aborted: vec![crate::transactions::partition::AbortedTxn {
                producer_id: 41,
                first_offset: 1,
                last_offset: 3,
            }],
        }
    }

    #[test]
    fn round_trip_keeps_all_five_batches_and_prunes_old_files() {
        let dir = tempfile::tempdir().unwrap();
        for end in [10, 20, 30] {
            write(dir.path(), &snapshot(end)).unwrap();
        }
        let mut left = list(dir.path());
        left.sort_unstable();
        assert_eq!(left, vec![20, 30]);
        let (loaded, report) = load(dir.path(), 50);
        assert!(report.discarded.is_empty());
        let loaded = loaded.unwrap();
        assert_eq!(loaded, snapshot(30));
        assert_eq!(loaded.producers[0].1.batches.len(), 5);
    }

    #[test]
    fn corrupt_and_too_new_snapshots_are_discarded_for_an_older_one() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &snapshot(10)).unwrap();
        write(dir.path(), &snapshot(20)).unwrap();
        // Flip one payload byte of the newest: the CRC no longer matches.
        let newest = path(dir.path(), 20);
        let mut bytes = fs::read(&newest).unwrap();
        bytes[20] ^= 0xff;
        fs::write(&newest, bytes).unwrap();
        // And one beyond the log end.
        fs::write(path(dir.path(), 99), b"whatever").unwrap();

        let (loaded, report) = load(dir.path(), 50);
        assert_eq!(loaded.unwrap().end_offset, 10);
        assert_eq!(report.discarded.len(), 2, "{:?}", report.discarded);
        assert!(
            report
                .discarded
                .iter()
                .any(|(_, why)| why.contains("checksum"))
        );
        assert!(!newest.exists());
        assert!(!path(dir.path(), 99).exists());
    }

    #[test]
    fn no_snapshot_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let (loaded, report) = load(dir.path(), 0);
        assert!(loaded.is_none());
        assert!(report.discarded.is_empty());
    }
}
