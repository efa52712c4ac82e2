//! Partition logs: append-only segment files of RecordBatch v2 bytes, with sparse offset and
//! time indexes, recovery of a torn tail, segment roll, and retention.
//!
//! A [`PartitionLog`] is one partition directory. It is synchronous and single-threaded; the
//! broker wraps each one in a lock. Time is passed in (`now_ms`), never read here.
//!
//! References: Kafka design "Log" and "Log Compaction" (retention part), KIP-74 (fetch returns
//! at least one batch), KIP-79 (offsets by timestamp).

pub mod batch;
mod index;
pub(crate) mod records;
mod segment;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use kafka_protocol::ResponseError;

pub use batch::{BatchHeader, ValidatedBatch, validate_produce_records};
pub use segment::Truncation;
use segment::{Segment, file_name};

/// The partition's recovery point: every offset below it was fsynced when it was written, so
/// recovery never cuts below it (a corrupt batch there is acknowledged data, not a torn tail).
const RECOVERY_POINT_FILE: &str = "recovery-point.checkpoint";
const RECOVERY_POINT_MAGIC: &[u8; 8] = b"SEMELRCP";
const RECOVERY_POINT_VERSION: u16 = 1;
/// The log start offset DeleteRecords moved (KIP-107), when it is inside the first segment.
const LOG_START_FILE: &str = "log-start-offset.checkpoint";
const LOG_START_MAGIC: &[u8; 8] = b"SEMELLSO";
const LOG_START_VERSION: u16 = 1;

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct RecoveryPoint {
    offset: i64,
}

/// Settings of one partition log; broker defaults with topic overrides applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// Roll to a new segment before the active one would exceed this many bytes (`segment.bytes`).
    pub segment_bytes: u64,
    /// Roll once the active segment is this old, in milliseconds (`segment.ms`).
    pub segment_ms: i64,
    /// Delete segments whose newest record is older than this; -1 keeps forever (`retention.ms`).
    pub retention_ms: i64,
    /// Delete the oldest segments while the log is larger than this; -1 for no limit (`retention.bytes`).
    pub retention_bytes: i64,
    /// Bytes of log between two offset-index entries (`index.interval.bytes`).
    pub index_interval_bytes: u32,
    /// Largest batch accepted (`max.message.bytes`).
    pub max_message_bytes: u32,
    /// Whose timestamps the log keeps (`message.timestamp.type`).
    pub timestamp_type: TimestampType,
    /// The message-id dedup window (a Semel extension, docs/dedup-window.md): a record whose
    /// id was stored in this partition less than this many milliseconds ago is not stored
    /// again; 0 turns it off (`semel.dedup.window.ms`).
    pub dedup_window_ms: i64,
    /// The header that carries a record's message id (`semel.dedup.header`).
    pub dedup_header: String,
    /// Most message ids one partition's window remembers; the oldest go first beyond it
    /// (`semel.dedup.max.ids`).
    pub dedup_max_ids: u32,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            segment_bytes: 1 << 30,
            segment_ms: 7 * 24 * 3600 * 1000,
            retention_ms: 7 * 24 * 3600 * 1000,
            retention_bytes: -1,
            index_interval_bytes: 4096,
            max_message_bytes: 1_048_588,
            timestamp_type: TimestampType::CreateTime,
            dedup_window_ms: 0,
            dedup_header: DEFAULT_DEDUP_HEADER.to_string(),
            dedup_max_ids: 1_000_000,
        }
    }
}

/// Most ids a partition's dedup window may hold (`semel.dedup.max.ids`): about 100 bytes of
/// memory each, and the window's 32-bit sequence numbers need the queue well below 2^32.
pub const MAX_DEDUP_IDS: u32 = 1 << 30;

/// The header the dedup window reads by default: the one semel-consumer's dedup middleware
/// reads too.
pub const DEFAULT_DEDUP_HEADER: &str = "semel-msg-id";

impl LogConfig {
    /// Checks that the settings can work.
    ///
    /// # Errors
    /// [`LogError::InvalidConfig`] naming the setting.
    pub fn validate(&self) -> Result<(), LogError> {
        let invalid = |reason: String| Err(LogError::InvalidConfig { reason });
        if self.segment_bytes < batch::HEADER_BYTES as u64
            || self.segment_bytes > u64::from(u32::MAX)
        {
            return invalid(format!(
                "segment.bytes {} must be between 61 and {}",
                self.segment_bytes,
                u32::MAX
            ));
        }
        if self.segment_ms < 1 {
            return invalid(format!("segment.ms {} must be positive", self.segment_ms));
        }
        if self.retention_ms < -1 || self.retention_bytes < -1 {
            return invalid("retention.ms and retention.bytes must be -1 or more".into());
        }
        if self.dedup_window_ms < 0 {
            return invalid(format!(
                "semel.dedup.window.ms {} must be 0 (off) or more",
                self.dedup_window_ms
            ));
        }
        if self.dedup_header.is_empty() {
            return invalid("semel.dedup.header must not be empty".into());
        }
        if self.dedup_max_ids == 0 || self.dedup_max_ids > MAX_DEDUP_IDS {
            return invalid(format!(
                "semel.dedup.max.ids {} must be between 1 and {MAX_DEDUP_IDS}",
                self.dedup_max_ids
            ));
        }
        Ok(())
    }
}

/// Whose timestamps the log keeps (`message.timestamp.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimestampType {
    /// The producer's timestamps.
    #[default]
    CreateTime,
    /// The broker's clock at append.
    LogAppendTime,
}

/// Why a log operation failed; [`LogError::code`] is the Kafka error to answer with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// The batch is truncated, has an invalid length, or fails its CRC.
    #[error("corrupt record batch: {reason}")]
    CorruptBatch {
        /// What is wrong.
        reason: String,
    },
    /// The batch is well-formed but not acceptable (magic, counts, several batches).
    #[error("invalid record batch: {reason}")]
    InvalidRecord {
        /// What is wrong.
        reason: String,
    },
    /// The batch is larger than `max.message.bytes`.
    #[error("record batch of {size} bytes exceeds max.message.bytes ({max})")]
    MessageTooLarge {
        /// Batch size.
        size: usize,
        /// The limit.
        max: u32,
    },
    /// The requested offset is outside the log.
    #[error("offset {offset} is outside the log [{log_start_offset}, {log_end_offset}]")]
    OffsetOutOfRange {
        /// The requested offset.
        offset: i64,
        /// First offset in the log.
        log_start_offset: i64,
        /// Next offset to be written.
        log_end_offset: i64,
    },
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// An fsync for `acks=all` failed.
    #[error("fsync of {topic_partition} failed: {source}")]
    Sync {
        /// `topic-partition`.
        topic_partition: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Recovery found the log damaged below its recovery point: acknowledged, fsynced
    /// records. Nothing is cut; the operator decides (restore the segment from a copy, or
    /// move it aside to accept the loss).
    #[error(
        "{}: {reason}, at byte {position} (offset {offset}), below the recovery point {recovery_point}: these records were fsynced and acknowledged, so the broker does not cut them; restore the segment or move it aside",
        path.display()
    )]
    CorruptBelowRecoveryPoint {
        /// The segment file.
        path: PathBuf,
        /// Byte position of the first bad batch (or the end of the file).
        position: u64,
        /// The offset expected there.
        offset: i64,
        /// The checkpointed recovery point.
        recovery_point: i64,
        /// What is wrong.
        reason: String,
    },
    /// An earlier fsync failed: the partition is offline until a restart.
    #[error(
        "partition {} is offline after a failed fsync ({reason}); nothing is written or acknowledged until the broker restarts",
        dir.display()
    )]
    Offline {
        /// The partition's directory.
        dir: PathBuf,
        /// The fsync's error.
        reason: String,
    },
    /// A setting cannot work.
    #[error("invalid log config: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },
    /// A file in the partition directory is not a segment this log can use.
    #[error("{path}: {reason}")]
    UnexpectedFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

impl LogError {
    /// The Kafka error code for this failure.
    pub fn code(&self) -> ResponseError {
        match self {
            Self::CorruptBatch { .. } => ResponseError::CorruptMessage,
            Self::InvalidRecord { .. } => ResponseError::InvalidRecord,
            Self::MessageTooLarge { .. } => ResponseError::MessageTooLarge,
            Self::OffsetOutOfRange { .. } => ResponseError::OffsetOutOfRange,
            Self::InvalidConfig { .. } => ResponseError::InvalidConfig,
            Self::Io { .. }
            | Self::Sync { .. }
            | Self::Offline { .. }
            | Self::CorruptBelowRecoveryPoint { .. }
            | Self::UnexpectedFile { .. } => ResponseError::KafkaStorageError,
        }
    }
}

/// What opening a log found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segments loaded.
    pub segments: usize,
    /// Batches validated (CRC included) in the segments recovery checked: the last one, and
    /// every one from the segment holding the recovery point on.
    pub tail_batches_checked: usize,
    /// Bytes cut from the tail (0 if it was clean).
    pub truncated_bytes: u64,
    /// Where and why the tail was cut.
    pub truncation: Option<Truncation>,
    /// Segments deleted because they came after a cut sealed segment (after a gap).
    pub segments_dropped: usize,
}

/// Where an append landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendInfo {
    /// Offset of the first record.
    pub base_offset: i64,
    /// Offset of the last record.
    pub last_offset: i64,
    /// The broker's timestamp under LogAppendTime, else -1.
    pub log_append_time_ms: i64,
    /// First offset of the log after the append.
    pub log_start_offset: i64,
    /// Whether the append rolled a new segment first.
    pub rolled: bool,
}

/// Whole batches read from the log.
#[derive(Debug, Clone)]
pub struct ReadResult {
    /// Concatenated stored batches (possibly empty).
    pub records: Bytes,
    /// The offset after the last batch returned (the fetch offset when none was).
    pub next_offset: i64,
    /// Next offset to be written (the high watermark on a single node).
    pub high_watermark: i64,
    /// First offset in the log.
    pub log_start_offset: i64,
}

/// What maintenance did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MaintenanceReport {
    /// Whether the active segment was rolled by time.
    pub rolled: bool,
    /// Base offsets of the segments deleted by retention.
    pub deleted_segments: Vec<i64>,
}

/// One partition's log in its directory.
#[derive(Debug)]
pub struct PartitionLog {
    dir: PathBuf,
    config: LogConfig,
    /// Segments by base offset; never empty.
    segments: BTreeMap<i64, Segment>,
    /// Set by the first failed fsync. After `EIO` the kernel may have dropped the dirty pages
    /// and a later fsync of the same file can succeed without them, so nothing is written or
    /// acknowledged any more (as Kafka takes a log directory offline) until a restart recovers
    /// from what the disk really holds.
    offline: Option<String>,
    /// The recovery point last checkpointed (`-1`: none).
    recovery_point: i64,
    /// The log start offset set by DeleteRecords (`-1`: none): offsets below it are gone even
    /// where their segment is still on disk.
    start_offset: i64,
    /// Largest offset, relative to its segment's base, a record may have: a segment rolls
    /// before an append would pass it ([`MAX_RELATIVE_OFFSET`]; lowered by tests).
    max_relative_offset: i64,
    /// Sealed segments not fsynced yet, by base offset: a roll leaves the fsync to the next
    /// sync round ([`PartitionLog::sync_target`]), outside the partition's lock, as Kafka
    /// flushes a rolled segment in the background.
    unsynced: BTreeSet<i64>,
    /// Changes to the directory (segments created by rolls) and how many of them a sync round
    /// has made durable: the directory needs an fsync while they differ.
    dir_changes: u64,
    dir_synced: u64,
}

/// What one sync round fsyncs to make every offset below [`SyncTarget::end`] durable: the
/// sealed segments a roll left unsynced, the directory if a roll changed it, then the active
/// segment. Taken under the partition's lock, synced outside it.
#[derive(Debug)]
pub struct SyncTarget {
    dir: PathBuf,
    sealed: Vec<(i64, fs::File)>,
    dir_changes: Option<u64>,
    active: fs::File,
    end: i64,
}

impl SyncTarget {
    /// The log end offset when the target was taken.
    pub fn end(&self) -> i64 {
        self.end
    }

    /// Fsyncs everything the target names (blocking).
    ///
    /// # Errors
    /// The first failing fsync's error; after it the log must go offline.
    pub fn sync(&self) -> std::io::Result<()> {
        let started = std::time::Instant::now();
        for (_, file) in &self.sealed {
            file.sync_data()?;
        }
        if self.dir_changes.is_some() {
            fs::File::open(&self.dir)?.sync_all()?;
        }
        self.active.sync_data()?;
        crate::metrics::FSYNC.observe(started.elapsed());
        Ok(())
    }
}

/// Largest offset relative to a segment's base offset (Kafka's bound, `Int.MaxValue`): the
/// offset and time indexes store relative offsets in 32 bits. Offsets grow by record count,
/// and compressed records can take less than a byte each, so a full segment could pass it.
pub const MAX_RELATIVE_OFFSET: i64 = i32::MAX as i64;

impl PartitionLog {
    /// Opens the log in `dir` (creating it if needed). Every segment from the one holding the
    /// recovery point on (all of them without one) is fully validated; a torn or corrupt tail
    /// is truncated at the last valid batch, and when that tail is a sealed segment's, the
    /// segments after it are deleted (their records would follow a gap).
    ///
    /// # Errors
    /// `Io` when the directory cannot be read or a file cannot be opened; `UnexpectedFile` for
    /// a `.log` file whose name is not a base offset; `CorruptBatch` for a corrupt segment
    /// before the recovery point's; `CorruptBelowRecoveryPoint` for damage below that point.
    pub fn open(
        dir: &Path,
        config: LogConfig,
        now_ms: i64,
    ) -> Result<(Self, RecoveryReport), LogError> {
        config.validate()?;
        let created = !dir.exists();
        fs::create_dir_all(dir).map_err(|source| LogError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        if created && let Some(parent) = dir.parent() {
            // The new directory's entry in its parent must survive a power cut too, or the
            // fsynced segments inside it go with it.
            sync_dir(parent)?;
        }
        let mut bases = Vec::new();
        let entries = fs::read_dir(dir).map_err(|source| LogError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| LogError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
            let path = entry.path();
            let Some(extension) = path.extension().and_then(|e| e.to_str()) else {
                continue;
            };
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default();
            let base = stem
                .parse::<i64>()
                .ok()
                .filter(|b| *b >= 0 && stem.len() == 20);
            match (extension, base) {
                ("log", Some(base)) => bases.push(base),
                ("log", None) => {
                    return Err(LogError::UnexpectedFile {
                        path,
                        reason: "segment file name is not a 20-digit base offset".into(),
                    });
                }
                ("index" | "timeindex", Some(base))
                    if !dir.join(file_name(base, "log")).exists() =>
                {
                    // An index without its segment (e.g. a crash during deletion).
                    let _ = fs::remove_file(&path);
                }
                _ => {}
            }
        }
        bases.sort_unstable();
        let recovery_point = read_recovery_point(dir);
        let mut report = RecoveryReport::default();
        let mut segments = BTreeMap::new();
        let mut unsynced = BTreeSet::new();
        // A roll does not fsync the segment it seals (the next sync round does), so after a
        // power cut any segment from the one holding the recovery point on may be torn; without
        // a checkpoint, any segment at all. Those are checked batch by batch (CRCs); the ones
        // before are sealed and were fsynced.
        let first_checked = if recovery_point < 0 {
            bases.first().copied()
        } else {
            bases
                .iter()
                .rev()
                .find(|base| **base <= recovery_point)
                .or(bases.first())
                .copied()
        };
        for (at, &base) in bases.iter().enumerate() {
            let next_base = bases.get(at + 1).copied();
            let checked = first_checked.is_some_and(|first| base >= first);
            // A checked segment must reach the recovery point, or its successor's base when
            // that comes first; below that every byte was fsynced and acknowledged.
            let floor = next_base.map_or(recovery_point, |next| recovery_point.min(next));
            let (segment, truncation, batches) = Segment::open(
                dir,
                base,
                checked.then_some(floor),
                config.index_interval_bytes,
                now_ms,
            )?;
            if checked {
                report.tail_batches_checked += batches;
            }
            let short = next_base.filter(|next| segment.next_offset != *next);
            if let Some(next) = short
                && segment.next_offset > next
            {
                return Err(LogError::CorruptBatch {
                    reason: format!(
                        "{}: segment ends at offset {} past the next segment's base {next}",
                        dir.join(file_name(base, "log")).display(),
                        segment.next_offset
                    ),
                });
            }
            if let Some(next) = short
                && !checked
            {
                // Fsynced whole before the recovery point's segment: not a torn tail.
                return Err(LogError::CorruptBelowRecoveryPoint {
                    path: dir.join(file_name(base, "log")),
                    position: segment.size,
                    offset: segment.next_offset,
                    recovery_point,
                    reason: format!("the segment ends before the next one's base offset {next}"),
                });
            }
            if let Some(t) = truncation {
                report.truncated_bytes += t.bytes;
                report.truncation = Some(t);
            }
            if checked && next_base.is_some() {
                // What a crash left in the page cache is fsynced before it counts as durable.
                unsynced.insert(base);
            }
            segments.insert(base, segment);
            if let Some(next) = short {
                // The rest of this segment never reached the disk: every record after it
                // would follow a gap, so the later segments go (a torn tail, one segment on).
                let later = &bases[at + 1..];
                tracing::warn!(dir = %dir.display(), segment = base, next, dropped = later.len(), "a sealed segment lost its tail; dropping the segments after it");
                for &gone in later {
                    for extension in ["log", "index", "timeindex"] {
                        match fs::remove_file(dir.join(file_name(gone, extension))) {
                            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                                return Err(LogError::Io {
                                    path: dir.join(file_name(gone, extension)),
                                    source: e,
                                });
                            }
                            _ => {}
                        }
                    }
                }
                sync_dir(dir)?;
                report.segments_dropped = later.len();
                unsynced.remove(&base);
                break;
            }
        }
        if segments.is_empty() {
            segments.insert(0, Segment::create(dir, 0, now_ms)?);
            sync_dir(dir)?;
        }
        report.segments = segments.len();
        let mut log = Self {
            dir: dir.to_path_buf(),
            config,
            segments,
            offline: None,
            max_relative_offset: MAX_RELATIVE_OFFSET,
            recovery_point,
            start_offset: -1,
            unsynced,
            // The directory is fsynced by the first sync round: a crash may have left the
            // active segment's entry in it unsynced.
            dir_changes: 1,
            dir_synced: 0,
        };
        // A checkpoint beyond the log end (the log lost its tail): the log starts at its end,
        // and the checkpoint says so durably, or it would hide the offsets written next once
        // the log grew past it again.
        let stored_start = read_log_start(dir);
        log.start_offset = stored_start.min(log.log_end_offset());
        if stored_start > log.log_end_offset() {
            let path = dir.join(LOG_START_FILE);
            crate::state_file::write(
                &path,
                LOG_START_MAGIC,
                LOG_START_VERSION,
                &RecoveryPoint {
                    offset: log.start_offset,
                },
            )
            .map_err(|e| LogError::Io {
                path,
                source: std::io::Error::other(e.to_string()),
            })?;
        }
        Ok((log, report))
    }

    fn active(&self) -> &Segment {
        self.segments
            .values()
            .next_back()
            .expect("a log always has a segment")
    }

    fn active_mut(&mut self) -> &mut Segment {
        self.segments
            .values_mut()
            .next_back()
            .expect("a log always has a segment")
    }

    /// First offset in the log.
    pub fn log_start_offset(&self) -> i64 {
        self.segments
            .keys()
            .next()
            .copied()
            .unwrap_or(0)
            .max(self.start_offset)
    }

    /// DeleteRecords: makes `offset` the log start (if it is past it), durably, then deletes
    /// the segments wholly below it. Returns the log start offset after it (the "low
    /// watermark").
    ///
    /// # Errors
    /// `OffsetOutOfRange` past the log end; `Offline` after a failed fsync; `Io` when the
    /// checkpoint or a deletion fails (the log start is then unchanged, or moved with some
    /// segments left to the next call or retention).
    pub fn delete_records_before(&mut self, offset: i64) -> Result<i64, LogError> {
        self.check_online()?;
        let end = self.log_end_offset();
        if offset > end || offset < 0 {
            return Err(LogError::OffsetOutOfRange {
                offset,
                log_start_offset: self.log_start_offset(),
                log_end_offset: end,
            });
        }
        if offset <= self.log_start_offset() {
            return Ok(self.log_start_offset());
        }
        let path = self.dir.join(LOG_START_FILE);
        crate::state_file::write(
            &path,
            LOG_START_MAGIC,
            LOG_START_VERSION,
            &RecoveryPoint { offset },
        )
        .map_err(|e| LogError::Io {
            path,
            source: std::io::Error::other(e.to_string()),
        })?;
        self.start_offset = offset;
        let mut deleted = false;
        while self.segments.len() > 1 {
            let Some((&base, first)) = self.segments.iter().next() else {
                break;
            };
            if first.next_offset > offset {
                break;
            }
            if let Some(segment) = self.segments.remove(&base) {
                self.unsynced.remove(&base);
                segment.delete_files(&self.dir)?;
                deleted = true;
            }
        }
        if deleted {
            sync_dir(&self.dir)?;
        }
        Ok(self.log_start_offset())
    }

    /// Next offset to be assigned (the high watermark on this single node).
    pub fn log_end_offset(&self) -> i64 {
        self.active().next_offset
    }

    /// Bytes of all segment files.
    pub fn size_bytes(&self) -> u64 {
        self.segments.values().map(|s| s.size).sum()
    }

    /// The settings in force.
    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// Replaces the settings (a topic's configs were altered). They apply from the next
    /// append, roll check and retention pass; nothing already written changes.
    ///
    /// # Errors
    /// `InvalidConfig` when the settings cannot work.
    pub fn set_config(&mut self, config: LogConfig) -> Result<(), LogError> {
        config.validate()?;
        self.config = config;
        Ok(())
    }

    /// Appends a validated batch at the log end offset.
    ///
    /// # Errors
    /// `Io` (code KAFKA_STORAGE_ERROR) when the write fails; the file is then truncated back and
    /// the log is unchanged.
    pub fn append(&mut self, batch: &ValidatedBatch, now_ms: i64) -> Result<AppendInfo, LogError> {
        self.check_online()?;
        let size = batch.bytes().len() as u64;
        let active = self.active();
        let last_relative = self.log_end_offset() + i64::from(batch.header().last_offset_delta)
            - active.base_offset;
        let rolled = active.size > 0
            && (active.size + size > self.config.segment_bytes
                || now_ms - active.created_ms >= self.config.segment_ms
                || last_relative > self.max_relative_offset);
        if rolled {
            self.roll(now_ms)?;
        }
        let base_offset = self.log_end_offset();
        let log_append_time =
            (self.config.timestamp_type == TimestampType::LogAppendTime).then_some(now_ms);
        let stored = batch::assign(batch, base_offset, log_append_time);
        let mut header = *batch.header();
        header.base_offset = base_offset;
        if let Some(now) = log_append_time {
            header.max_timestamp = now;
        }
        let interval = self.config.index_interval_bytes;
        let active = self.active_mut();
        if active.size == 0 {
            active.created_ms = now_ms;
        }
        active.append(
            &stored,
            &batch.bytes()[batch::HEADER_BYTES..],
            &header,
            interval,
        )?;
        // The batch landed at the log end, and the log end moved past its last record.
        debug_assert_eq!(
            self.log_end_offset(),
            header.last_offset() + 1,
            "append at {base_offset} did not end the log after its last record"
        );
        debug_assert!(
            header.last_offset() - self.active().base_offset <= self.max_relative_offset,
            "a record's offset relative to its segment overflowed"
        );
        Ok(AppendInfo {
            base_offset,
            last_offset: header.last_offset(),
            log_append_time_ms: log_append_time.unwrap_or(-1),
            log_start_offset: self.log_start_offset(),
            rolled,
        })
    }

    /// The recovery point last checkpointed (`-1`: none).
    pub fn recovery_point(&self) -> i64 {
        self.recovery_point
    }

    /// Records `offset` as the recovery point (atomically, fsynced): every offset below it
    /// must have been fsynced. Only moves forward; a no-op while offline.
    ///
    /// # Errors
    /// `Io` when the checkpoint cannot be written (the previous one stays).
    pub fn checkpoint_recovery_point(&mut self, offset: i64) -> Result<(), LogError> {
        if offset <= self.recovery_point || self.offline.is_some() {
            return Ok(());
        }
        debug_assert!(
            offset <= self.log_end_offset(),
            "recovery point {offset} beyond the log end {}",
            self.log_end_offset()
        );
        let path = self.dir.join(RECOVERY_POINT_FILE);
        crate::state_file::write(
            &path,
            RECOVERY_POINT_MAGIC,
            RECOVERY_POINT_VERSION,
            &RecoveryPoint { offset },
        )
        .map_err(|e| LogError::Io {
            path,
            source: std::io::Error::other(e.to_string()),
        })?;
        self.recovery_point = offset;
        Ok(())
    }

    /// `Offline` once an fsync has failed.
    fn check_online(&self) -> Result<(), LogError> {
        match &self.offline {
            None => Ok(()),
            Some(reason) => Err(LogError::Offline {
                dir: self.dir.clone(),
                reason: reason.clone(),
            }),
        }
    }

    /// Takes the log offline after a failed fsync (see `offline`); the first reason stays.
    pub fn fsync_failed(&mut self, error: &dyn std::fmt::Display) {
        if self.offline.is_none() {
            tracing::error!(dir = %self.dir.display(), %error, "fsync failed: partition offline until a restart; nothing more is written or acknowledged");
            self.offline = Some(error.to_string());
        }
    }

    /// Seals the active segment (its index files written) and starts a new one at the log
    /// end. Nothing is fsynced here: the sealed segment and the directory are left to the next
    /// sync round ([`PartitionLog::sync_target`]: an `acks=all` produce, the periodic flush),
    /// which runs outside the partition's lock. Until then the sealed segment counts as not
    /// durable, and recovery checks it after a crash.
    fn roll(&mut self, now_ms: i64) -> Result<(), LogError> {
        crate::blocking::may_block(|| {
            #[cfg(test)]
            crate::partition::slow_disk::stall(&self.dir);
            let next = self.log_end_offset();
            let active = self.active();
            let sealed = active.base_offset;
            active.write_indexes(&self.dir, false)?;
            let segment = Segment::create(&self.dir, next, now_ms)?;
            self.segments.insert(next, segment);
            self.unsynced.insert(sealed);
            self.dir_changes += 1;
            Ok(())
        })
    }

    /// Whole batches from the one containing `fetch_offset`, up to `max_bytes`, but always at
    /// least one batch when any is available (KIP-74).
    ///
    /// # Errors
    /// `Offline` after a failed fsync; `OffsetOutOfRange` below the log start or above the
    /// log end; `Io` on read failure.
    pub fn read(&self, fetch_offset: i64, max_bytes: usize) -> Result<ReadResult, LogError> {
        self.read_below(fetch_offset, max_bytes, i64::MAX)
    }

    /// [`PartitionLog::read`], stopping before the first batch whose base offset is at or past
    /// `max_offset` (the last stable offset, for `read_committed`); a batch below it is whole.
    ///
    /// # Errors
    /// As [`PartitionLog::read`].
    pub fn read_below(
        &self,
        fetch_offset: i64,
        max_bytes: usize,
        max_offset: i64,
    ) -> Result<ReadResult, LogError> {
        self.check_online()?;
        let (start, end) = (self.log_start_offset(), self.log_end_offset());
        if fetch_offset < start || fetch_offset > end {
            return Err(LogError::OffsetOutOfRange {
                offset: fetch_offset,
                log_start_offset: start,
                log_end_offset: end,
            });
        }
        let mut out = BytesMut::new();
        let mut offset = fetch_offset;
        'segments: for (_, segment) in self
            .segments
            .range(..=fetch_offset)
            .next_back()
            .into_iter()
            .chain(self.segments.range(fetch_offset + 1..))
        {
            if offset >= segment.next_offset {
                continue;
            }
            let Some(mut position) = segment.position_of(offset)? else {
                continue;
            };
            while position < segment.size {
                let header = segment.header_at(position)?;
                let total = header.total_size().unwrap_or(0);
                if header.base_offset >= max_offset
                    || (!out.is_empty() && out.len() + total > max_bytes)
                {
                    break 'segments;
                }
                out.extend_from_slice(&segment.read_at(position, total)?);
                position += total as u64;
                offset = header.last_offset() + 1;
                if out.len() >= max_bytes {
                    break 'segments;
                }
            }
        }
        Ok(ReadResult {
            records: out.freeze(),
            next_offset: offset,
            high_watermark: end,
            log_start_offset: start,
        })
    }

    /// Headers of every batch from the one containing `from_offset` to the log end, in order
    /// (for rebuilding producer state). Offsets below the log start begin at the log start.
    ///
    /// # Errors
    /// `Io` on read failure; `CorruptBatch` for an unreadable header.
    pub fn batch_headers(&self, from_offset: i64) -> Result<Vec<BatchHeader>, LogError> {
        let from = from_offset.max(self.log_start_offset());
        let mut headers = Vec::new();
        for (_, segment) in self
            .segments
            .range(..=from)
            .next_back()
            .into_iter()
            .chain(self.segments.range(from + 1..))
        {
            if from >= segment.next_offset {
                continue;
            }
            let Some(mut position) = segment.position_of(from.max(segment.base_offset))? else {
                continue;
            };
            while position < segment.size {
                let header = segment.header_at(position)?;
                position += header.total_size().unwrap_or(0) as u64;
                headers.push(header);
            }
        }
        Ok(headers)
    }

    /// The base offset of the first segment holding a batch whose max timestamp is after
    /// `cutoff` (every record at or before `cutoff` is in an earlier segment or in an older
    /// batch), or `None` when no segment does.
    pub fn first_offset_of_segment_newer_than(&self, cutoff: i64) -> Option<i64> {
        self.segments
            .values()
            .find(|segment| segment.max_timestamp.is_some_and(|(ts, _)| ts > cutoff))
            .map(|segment| segment.base_offset.max(self.log_start_offset()))
    }

    /// The partition directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The earliest record with a timestamp at or after `timestamp_ms`, as (offset, timestamp).
    /// Exact for uncompressed batches; for a compressed batch, its base offset and max timestamp
    /// (the broker does not decompress).
    ///
    /// # Errors
    /// `Io` on read failure.
    pub fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<Option<(i64, i64)>, LogError> {
        // Records below a start offset moved by DeleteRecords are gone, even on disk.
        let start = self.log_start_offset();
        for segment in self.segments.values() {
            if segment.max_timestamp.is_none_or(|(t, _)| t < timestamp_ms) {
                continue;
            }
            let start_offset = segment.time_scan_start(timestamp_ms);
            let Some(mut position) = segment.position_of(start_offset)? else {
                continue;
            };
            while position < segment.size {
                let header = segment.header_at(position)?;
                let total = header.total_size().unwrap_or(0);
                if header.max_timestamp >= timestamp_ms && header.last_offset() >= start {
                    let bytes = segment.read_at(position, total)?;
                    if let Some(records) = batch::record_timestamps(&bytes) {
                        if let Some((delta, ts)) = records.into_iter().find(|(delta, ts)| {
                            *ts >= timestamp_ms && header.base_offset + i64::from(*delta) >= start
                        }) {
                            return Ok(Some((header.base_offset + i64::from(delta), ts)));
                        }
                    } else {
                        return Ok(Some((header.base_offset.max(start), header.max_timestamp)));
                    }
                }
                position += total as u64;
            }
        }
        Ok(None)
    }

    /// The first record with the largest timestamp, as (offset, timestamp); `None` for an
    /// empty log. Exact for uncompressed batches; for a compressed batch, its base offset.
    ///
    /// # Errors
    /// `Io` on read failure.
    pub fn max_timestamp(&self) -> Result<Option<(i64, i64)>, LogError> {
        let best = self
            .segments
            .values()
            .filter_map(|s| s.max_timestamp.map(|(t, base)| (t, base, s)))
            .fold(
                None,
                |best: Option<(i64, i64, &Segment)>, candidate| match best {
                    Some((bt, _, _)) if bt >= candidate.0 => best,
                    _ => Some(candidate),
                },
            );
        let Some((timestamp, base_offset, segment)) = best else {
            return Ok(None);
        };
        let Some(position) = segment.position_of(base_offset)? else {
            return Ok(Some((base_offset, timestamp)));
        };
        let header = segment.header_at(position)?;
        let bytes = segment.read_at(position, header.total_size().unwrap_or(0))?;
        let exact = batch::record_timestamps(&bytes)
            .and_then(|records| records.into_iter().find(|(_, t)| *t == timestamp))
            .map(|(delta, _)| base_offset + i64::from(delta));
        Ok(Some((exact.unwrap_or(base_offset), timestamp)))
    }

    /// What to fsync, outside the caller's lock, so that every offset below the log end now
    /// is durable: the sealed segments a roll left unsynced, the directory, the active segment.
    /// Report a successful sync back with [`PartitionLog::synced`].
    ///
    /// # Errors
    /// `Offline` after a failed fsync; `Io` if a file handle cannot be duplicated.
    pub fn sync_target(&self) -> Result<SyncTarget, LogError> {
        self.check_online()?;
        let clone = |segment: &Segment| {
            segment.file().try_clone().map_err(|source| LogError::Io {
                path: self.dir.clone(),
                source,
            })
        };
        let sealed = self
            .unsynced
            .iter()
            .filter_map(|base| self.segments.get(base).map(|s| (*base, s)))
            .map(|(base, segment)| Ok((base, clone(segment)?)))
            .collect::<Result<Vec<_>, LogError>>()?;
        Ok(SyncTarget {
            dir: self.dir.clone(),
            sealed,
            dir_changes: (self.dir_changes > self.dir_synced).then_some(self.dir_changes),
            active: clone(self.active())?,
            end: self.log_end_offset(),
        })
    }

    /// Records that `target` was fsynced: its sealed segments and directory changes are
    /// durable now.
    pub fn synced(&mut self, target: &SyncTarget) {
        for (base, _) in &target.sealed {
            self.unsynced.remove(base);
        }
        if let Some(changes) = target.dir_changes {
            self.dir_synced = self.dir_synced.max(changes);
        }
    }

    /// Sealed segments not fsynced yet (base offsets).
    pub fn unsynced_sealed(&self) -> Vec<i64> {
        self.unsynced.iter().copied().collect()
    }

    /// Whether a roll left a sealed segment unsynced.
    pub fn has_unsynced_sealed(&self) -> bool {
        !self.unsynced.is_empty()
    }

    /// Fsyncs everything written (sealed segments left by rolls, the directory, the active
    /// segment) under the caller's lock; a failure takes the log offline.
    ///
    /// # Errors
    /// `Offline`, or `Io` if an fsync fails.
    pub fn flush(&mut self) -> Result<(), LogError> {
        let target = self.sync_target()?;
        match target.sync() {
            Ok(()) => {
                self.synced(&target);
                Ok(())
            }
            Err(source) => {
                let error = LogError::Io {
                    path: self.dir.clone(),
                    source,
                };
                self.fsync_failed(&error);
                Err(error)
            }
        }
    }

    /// Rolls by time and applies retention (whole segments, never the active one).
    ///
    /// # Errors
    /// `Io` when a roll or a deletion fails.
    pub fn maintain(&mut self, now_ms: i64) -> Result<MaintenanceReport, LogError> {
        let mut report = MaintenanceReport::default();
        if self.offline.is_some() {
            // Said once when it went offline; nothing to roll or delete until a restart.
            return Ok(report);
        }
        let active = self.active();
        if active.size > 0 && now_ms - active.created_ms >= self.config.segment_ms {
            self.roll(now_ms)?;
            report.rolled = true;
        }
        while self.segments.len() > 1 {
            let Some((&base, oldest)) = self.segments.iter().next() else {
                break;
            };
            let total = self.size_bytes();
            let by_bytes = self.config.retention_bytes >= 0
                && total.saturating_sub(oldest.size)
                    >= u64::try_from(self.config.retention_bytes).unwrap_or(0);
            let by_time = self.config.retention_ms >= 0
                && oldest
                    .max_timestamp
                    .is_none_or(|(t, _)| t < now_ms - self.config.retention_ms);
            if !(by_bytes || by_time) {
                break;
            }
            if let Some(segment) = self.segments.remove(&base) {
                self.unsynced.remove(&base);
                segment.delete_files(&self.dir)?;
                report.deleted_segments.push(base);
            }
        }
        if !report.deleted_segments.is_empty() {
            // Deletions are durable too: a power cut must not bring old segments back.
            sync_dir(&self.dir)?;
        }
        Ok(report)
    }

    /// Fsyncs and writes the active segment's indexes.
    ///
    /// # Errors
    /// `Io` on failure.
    pub fn close(mut self) -> Result<(), LogError> {
        self.flush()?;
        self.active().write_indexes(&self.dir, true)
    }
}

/// The checkpointed recovery point of the log in `dir` (`-1`: none). An unreadable checkpoint
/// is reported and ignored: recovery then checks the whole active segment, as without one.
fn read_recovery_point(dir: &Path) -> i64 {
    let path = dir.join(RECOVERY_POINT_FILE);
    match crate::state_file::read::<RecoveryPoint>(
        &path,
        RECOVERY_POINT_MAGIC,
        RECOVERY_POINT_VERSION,
    ) {
        Ok(Some(point)) => point.offset,
        Ok(None) => -1,
        Err(e) => {
            tracing::warn!(error = %e, "recovery point unreadable; checking the whole active segment without it");
            -1
        }
    }
}

fn read_log_start(dir: &Path) -> i64 {
    let path = dir.join(LOG_START_FILE);
    match crate::state_file::read::<RecoveryPoint>(&path, LOG_START_MAGIC, LOG_START_VERSION) {
        Ok(Some(point)) => point.offset,
        Ok(None) => -1,
        Err(e) => {
            // Records below a lost start offset come back; nothing acknowledged is lost.
            tracing::warn!(error = %e, "log start offset unreadable; the log starts at its first segment");
            -1
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| LogError::Io {
            path: dir.to_path_buf(),
            source,
        })
}

#[cfg(test)]
pub(crate) mod tests;
