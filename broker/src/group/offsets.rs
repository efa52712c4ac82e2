//! Committed offsets, kept the way Kafka keeps them: appended to an internal partition log
//! (`<data-dir>/__consumer_offsets/`, like Kafka's `__consumer_offsets`) and loaded into memory
//! on start. A commit is acknowledged only once its batch is fsynced, so it survives `kill -9`
//! and power loss; a torn tail is cut by the log's own recovery, losing only unacknowledged
//! commits.
//!
//! Each commit is one record batch with a record per partition. Keys and values are postcard
//! with a leading format version; a record with no value is a tombstone (offset deleted or
//! expired). The log is never compacted yet: it grows by about 100 bytes per committed
//! partition, and replay on start reads all of it.
//!
//! References: Kafka's `GroupMetadataManager` (offset commit records, KIP-211 expiry).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::log::{LogConfig, LogError, validate_produce_records};
use crate::partition::Partition;

use super::state::GroupRecord;

/// Directory of the offsets log inside the data directory.
pub(crate) const OFFSETS_DIR: &str = "__consumer_offsets";
const FORMAT_VERSION: u8 = 1;

/// One committed offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Committed {
    pub(crate) offset: i64,
    pub(crate) leader_epoch: i32,
    pub(crate) metadata: String,
    pub(crate) commit_timestamp_ms: i64,
}

#[derive(Debug, Serialize, Deserialize)]
struct OffsetKey {
    version: u8,
    group: String,
    topic: String,
    partition: i32,
}

/// The key of a group's membership record: `version` 2 tells it from an offset's key
/// (version 1), whose first byte is its version too.
#[derive(Debug, Serialize, Deserialize)]
struct GroupKey {
    version: u8,
    group: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct GroupValue {
    version: u8,
    record: GroupRecord,
}

const GROUP_RECORD_VERSION: u8 = 2;

#[derive(Debug, Serialize, Deserialize)]
struct OffsetValue {
    version: u8,
    offset: i64,
    leader_epoch: i32,
    metadata: String,
    commit_timestamp_ms: i64,
}

/// Why committing failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CommitError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("cannot encode the commit: {0}")]
    Encode(String),
}

/// (topic, partition) → committed offset, per group.
pub(crate) type GroupOffsets = BTreeMap<(String, i32), Committed>;

/// The offsets log and its in-memory view.
#[derive(Debug)]
pub(crate) struct OffsetStore {
    partition: Partition,
    offsets: Mutex<HashMap<String, GroupOffsets>>,
    /// Commits appended and not yet visible, by the end offset of their batch: taken in log
    /// order once fsynced, so memory always shows what a replay of the log would (two commits
    /// of one key whose fsyncs return in the other order must not leave the older one).
    /// Appends happen under this lock, so its order is the log's.
    pending: Mutex<BTreeMap<i64, Pending>>,
    /// Group membership records replayed at start, until the coordinator takes them.
    group_records: Mutex<HashMap<String, GroupRecord>>,
}

/// A commit waiting for its fsync: the group and its entries.
type Pending = (String, Vec<((String, i32), Option<Committed>)>);

impl OffsetStore {
    /// Opens (recovering) the offsets log under `data_dir` and replays it.
    pub(crate) fn open(data_dir: &Path, now_ms: i64) -> Result<Self, LogError> {
        let config = LogConfig {
            segment_bytes: 100 << 20,
            retention_ms: -1,
            retention_bytes: -1,
            ..LogConfig::default()
        };
        let (appended, _) = watch::channel(0);
        let (partition, report) = Partition::open(
            OFFSETS_DIR,
            0,
            &data_dir.join(OFFSETS_DIR),
            config,
            0,
            now_ms,
            Arc::new(appended),
        )?;
        if report.truncated_bytes > 0 {
            tracing::warn!(
                bytes = report.truncated_bytes,
                "offsets log: cut a torn tail (commits that were never acknowledged)"
            );
        }
        let mut offsets: HashMap<String, GroupOffsets> = HashMap::new();
        let mut groups: HashMap<String, GroupRecord> = HashMap::new();
        let mut next = partition.log().log_start_offset();
        loop {
            let read = partition.log().read(next, 1 << 20)?;
            if read.records.is_empty() {
                break;
            }
            let mut bytes = read.records.clone();
            while !bytes.is_empty() {
                let set =
                    RecordBatchDecoder::decode(&mut bytes).map_err(|e| LogError::CorruptBatch {
                        reason: format!("offsets log: {e}"),
                    })?;
                for record in set.records {
                    next = next.max(record.offset + 1);
                    if record.key.as_ref().and_then(|k| k.first()) == Some(&GROUP_RECORD_VERSION) {
                        apply_group(&mut groups, &record);
                    } else {
                        apply(&mut offsets, &record);
                    }
                }
            }
        }
        let count: usize = offsets.values().map(BTreeMap::len).sum();
        tracing::info!(
            groups = offsets.len(),
            offsets = count,
            "loaded committed offsets"
        );
        Ok(Self {
            partition,
            offsets: Mutex::new(offsets),
            pending: Mutex::new(BTreeMap::new()),
            group_records: Mutex::new(groups),
        })
    }

    fn offsets(&self) -> std::sync::MutexGuard<'_, HashMap<String, GroupOffsets>> {
        self.offsets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends and fsyncs `entries` (None = delete) for `group`, then makes them visible.
    pub(crate) async fn commit(
        &self,
        group: &str,
        entries: Vec<((String, i32), Option<Committed>)>,
        now_ms: i64,
    ) -> Result<(), CommitError> {
        if entries.is_empty() {
            return Ok(());
        }
        let end = {
            let mut pending = self.lock_pending();
            self.append(&mut pending, group, entries, now_ms)?
        };
        self.settle(end).await
    }

    /// Deletes the offsets of `group` committed before `cutoff_ms` (offsets expiry). Decided
    /// under the append lock, with the commits still waiting for their fsync counted as
    /// current: a commit that lands while expiry runs is never deleted, in memory or in the
    /// log.
    pub(crate) async fn expire(
        &self,
        group: &str,
        cutoff_ms: i64,
        now_ms: i64,
    ) -> Result<usize, CommitError> {
        let end = {
            let mut pending = self.lock_pending();
            let fresh: std::collections::BTreeSet<&(String, i32)> = pending
                .values()
                .filter(|(g, _)| g == group)
                .flat_map(|(_, entries)| entries.iter().map(|(key, _)| key))
                .collect();
            let stale: Vec<((String, i32), Option<Committed>)> = self
                .offsets()
                .get(group)
                .map(|offsets| {
                    offsets
                        .iter()
                        .filter(|(key, c)| {
                            c.commit_timestamp_ms < cutoff_ms && !fresh.contains(key)
                        })
                        .map(|(key, _)| (key.clone(), None))
                        .collect()
                })
                .unwrap_or_default();
            if stale.is_empty() {
                return Ok(0);
            }
            let count = stale.len();
            let end = self.append(&mut pending, group, stale, now_ms)?;
            (end, count)
        };
        self.settle(end.0).await?;
        Ok(end.1)
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, BTreeMap<i64, Pending>> {
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends `entries` as one batch and queues them to become visible; returns the batch's
    /// end offset. Called with the append lock (`pending`) held.
    fn append(
        &self,
        pending: &mut BTreeMap<i64, Pending>,
        group: &str,
        entries: Vec<((String, i32), Option<Committed>)>,
        now_ms: i64,
    ) -> Result<i64, CommitError> {
        let encoded = entries
            .iter()
            .map(|((topic, partition), value)| {
                let key = postcard::to_stdvec(&OffsetKey {
                    version: FORMAT_VERSION,
                    group: group.to_string(),
                    topic: topic.clone(),
                    partition: *partition,
                })
                .map_err(|e| CommitError::Encode(e.to_string()))?;
                let value = value
                    .as_ref()
                    .map(|c| {
                        postcard::to_stdvec(&OffsetValue {
                            version: FORMAT_VERSION,
                            offset: c.offset,
                            leader_epoch: c.leader_epoch,
                            metadata: c.metadata.clone(),
                            commit_timestamp_ms: c.commit_timestamp_ms,
                        })
                    })
                    .transpose()
                    .map_err(|e| CommitError::Encode(e.to_string()))?;
                Ok((key, value))
            })
            .collect::<Result<Vec<_>, CommitError>>()?;
        let end = self.append_records(encoded, now_ms)?;
        pending.insert(end, (group.to_string(), entries));
        Ok(end)
    }

    /// Appends one batch of (key, value) records; returns its end offset. Called with the
    /// append lock (`pending`) held, so the log's order is the lock's.
    fn append_records(
        &self,
        encoded: Vec<(Vec<u8>, Option<Vec<u8>>)>,
        now_ms: i64,
    ) -> Result<i64, CommitError> {
        let records = encoded
            .into_iter()
            .enumerate()
            .map(|(i, (key, value))| Record {
                transactional: false,
                control: false,
                partition_leader_epoch: 0,
                producer_id: -1,
                producer_epoch: -1,
                timestamp_type: TimestampType::Creation,
                offset: i64::try_from(i).unwrap_or(0),
                // `kafka-protocol` starts a new batch wherever offset - sequence changes;
                // numbering from -1 keeps one batch with base sequence -1 (none).
                sequence: i32::try_from(i).unwrap_or(0) - 1,
                delete_horizon: false,
                timestamp: now_ms,
                key: Some(Bytes::from(key)),
                value: value.map(Bytes::from),
                headers: Default::default(),
            })
            .collect::<Vec<Record>>();
        let mut buf = BytesMut::new();
        RecordBatchEncoder::encode(
            &mut buf,
            &records,
            &RecordEncodeOptions {
                version: 2,
                compression: Compression::None,
            },
        )
        .map_err(|e| CommitError::Encode(e.to_string()))?;
        let batch = validate_produce_records(&buf, u32::MAX)?;
        // (A roll inside the append tells tokio it blocks: see `crate::blocking`.)
        let appended =
            self.partition
                .append_verified(&batch, now_ms, &crate::partition::no_transactions);
        let appended = appended.map_err(|e| match e {
            crate::partition::AppendError::Log(log) => CommitError::Log(log),
            other => CommitError::Encode(other.to_string()),
        })?;
        Ok(appended.end_offset())
    }

    /// Appends `group`'s membership record. Not waited for: the next commit's fsync, or the
    /// shutdown's, makes it durable, and a record lost to a power cut only means the members
    /// rejoin after the restart, as they did before records were kept. A group that emptied is
    /// recorded with no members, which a restart skips.
    pub(crate) fn record_group(&self, group: &str, record: &GroupRecord, now_ms: i64) {
        let encoded = postcard::to_stdvec(&GroupKey {
            version: GROUP_RECORD_VERSION,
            group: group.to_string(),
        })
        .and_then(|key| {
            let value = postcard::to_stdvec(&GroupValue {
                version: GROUP_RECORD_VERSION,
                record: record.clone(),
            })?;
            Ok((key, Some(value)))
        });
        let appended = match encoded {
            Ok(kv) => {
                let _order = self.lock_pending();
                self.append_records(vec![kv], now_ms)
            }
            Err(e) => Err(CommitError::Encode(e.to_string())),
        };
        if let Err(error) = appended {
            tracing::warn!(group, %error, "could not record the group's members; after a restart they rejoin");
        }
    }

    /// The membership records read at start (taken once).
    pub(crate) fn take_group_records(&self) -> HashMap<String, GroupRecord> {
        std::mem::take(
            &mut *self
                .group_records
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }

    /// Waits for the fsync of the batch ending at `end`, then makes every fsynced commit
    /// visible, in log order.
    async fn settle(&self, end: i64) -> Result<(), CommitError> {
        if let Err(e) = self.partition.wait_durable(end).await {
            // Never acknowledged, so never visible (the log is offline after a failed fsync).
            self.lock_pending().remove(&end);
            return Err(e.into());
        }
        let mut pending = self.lock_pending();
        let durable = self.partition.durable_end();
        let mut offsets = self.offsets();
        while let Some(entry) = pending.first_entry() {
            if *entry.key() > durable {
                break;
            }
            let (group, entries) = entry.remove();
            let group_offsets = offsets.entry(group.clone()).or_default();
            for (key, value) in entries {
                match value {
                    Some(committed) => {
                        group_offsets.insert(key, committed);
                    }
                    None => {
                        group_offsets.remove(&key);
                    }
                }
            }
            if group_offsets.is_empty() {
                offsets.remove(&group);
            }
        }
        Ok(())
    }

    /// Every committed offset of `group`.
    pub(crate) fn group(&self, group: &str) -> GroupOffsets {
        self.offsets().get(group).cloned().unwrap_or_default()
    }

    /// Groups that have committed offsets.
    pub(crate) fn groups(&self) -> Vec<String> {
        self.offsets().keys().cloned().collect()
    }

    /// Every group with offsets committed for `topic`, with those partitions.
    pub(crate) fn committed_for_topic(&self, topic: &str) -> Vec<(String, Vec<(String, i32)>)> {
        self.offsets()
            .iter()
            .filter_map(|(group, offsets)| {
                let keys: Vec<(String, i32)> = offsets
                    .keys()
                    .filter(|(t, _)| t == topic)
                    .cloned()
                    .collect();
                (!keys.is_empty()).then(|| (group.clone(), keys))
            })
            .collect()
    }

    /// Offsets of `group` committed before `cutoff_ms` (for expiry).
    pub(crate) fn committed_before(&self, group: &str, cutoff_ms: i64) -> Vec<(String, i32)> {
        self.offsets()
            .get(group)
            .map(|offsets| {
                offsets
                    .iter()
                    .filter(|(_, c)| c.commit_timestamp_ms < cutoff_ms)
                    .map(|(key, _)| key.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Fsyncs and closes the log (clean shutdown).
    /// Checkpoints the offsets log's recovery point at its durable end (the flush task).
    ///
    /// # Errors
    /// `Io` when the checkpoint cannot be written.
    pub(crate) fn checkpoint_recovery_point(&self) -> Result<(), LogError> {
        self.partition.checkpoint_recovery_point()
    }

    pub(crate) fn close(&self, now_ms: i64) -> Result<(), LogError> {
        self.partition.close(now_ms)
    }
}

/// Replays one membership record: the newest per group wins; one without a value forgets it.
fn apply_group(groups: &mut HashMap<String, GroupRecord>, record: &Record) {
    let Some(Ok(key)) = record
        .key
        .as_ref()
        .map(|k| postcard::from_bytes::<GroupKey>(k))
    else {
        tracing::warn!(
            offset = record.offset,
            "offsets log: unreadable group key skipped"
        );
        return;
    };
    match record
        .value
        .as_ref()
        .map(|v| postcard::from_bytes::<GroupValue>(v))
    {
        None => {
            groups.remove(&key.group);
        }
        Some(Ok(value)) if value.version == GROUP_RECORD_VERSION => {
            groups.insert(key.group, value.record);
        }
        Some(_) => tracing::warn!(
            offset = record.offset,
            group = %key.group,
            "offsets log: unreadable group record skipped"
        ),
    }
}

fn apply(offsets: &mut HashMap<String, GroupOffsets>, record: &Record) {
    let Some(key) = record.key.as_ref() else {
        return;
    };
    let Ok(key) = postcard::from_bytes::<OffsetKey>(key) else {
        tracing::warn!(
            offset = record.offset,
            "offsets log: unreadable key skipped"
        );
        return;
    };
    if key.version != FORMAT_VERSION {
        tracing::warn!(
            offset = record.offset,
            version = key.version,
            "offsets log: unknown record version skipped"
        );
        return;
    }
    let slot = (key.topic, key.partition);
    match record
        .value
        .as_ref()
        .map(|v| postcard::from_bytes::<OffsetValue>(v))
    {
        None => {
            if let Some(group) = offsets.get_mut(&key.group) {
                group.remove(&slot);
                if group.is_empty() {
                    offsets.remove(&key.group);
                }
            }
        }
        Some(Ok(value)) if value.version == FORMAT_VERSION => {
            offsets.entry(key.group).or_default().insert(
                slot,
                Committed {
                    offset: value.offset,
                    leader_epoch: value.leader_epoch,
                    metadata: value.metadata,
                    commit_timestamp_ms: value.commit_timestamp_ms,
                },
            );
        }
        Some(_) => {
            tracing::warn!(
                offset = record.offset,
                "offsets log: unreadable value skipped"
            );
        }
    }
}
