//! One segment of a partition log: `<base offset, 20 digits>.log` holding stored batches back
//! to back, with its in-memory sparse indexes.
//!
//! A write that fails (ENOSPC, EFBIG, EIO) is undone by truncating the file back to its old
//! length, so the file never keeps a partial batch that a later append would bury.
//!
//! References: Kafka `LogSegment`.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::LogError;
use super::batch::{BatchHeader, HEADER_BYTES, check_batch};
use super::index::{OffsetIndex, TimeIndex, read_file};

/// What recovery cut from a segment's tail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncation {
    /// The segment file.
    pub path: PathBuf,
    /// Byte position of the first invalid byte (the new file size).
    pub position: u64,
    /// Bytes removed.
    pub bytes: u64,
    /// Why the tail was invalid.
    pub reason: String,
}

#[derive(Debug)]
pub(crate) struct Segment {
    pub(crate) base_offset: i64,
    path: PathBuf,
    file: File,
    pub(crate) size: u64,
    /// Offset after the last record in this segment.
    pub(crate) next_offset: i64,
    /// Largest batch max timestamp, and the base offset of the (first) batch that has it.
    pub(crate) max_timestamp: Option<(i64, i64)>,
    /// When this segment was created or first appended to (for `segment.ms`).
    pub(crate) created_ms: i64,
    offset_index: OffsetIndex,
    time_index: TimeIndex,
    bytes_since_index: u64,
}

pub(crate) fn file_name(base_offset: i64, extension: &str) -> String {
    format!("{base_offset:020}.{extension}")
}

fn io_error(path: &Path, source: std::io::Error) -> LogError {
    LogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Segment {
    pub(crate) fn create(dir: &Path, base_offset: i64, now_ms: i64) -> Result<Self, LogError> {
        let path = dir.join(file_name(base_offset, "log"));
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io_error(&path, e))?;
        Ok(Self {
            base_offset,
            path,
            file,
            size: 0,
            next_offset: base_offset,
            max_timestamp: None,
            created_ms: now_ms,
            offset_index: OffsetIndex::default(),
            time_index: TimeIndex::default(),
            bytes_since_index: 0,
        })
    }

    /// Opens an existing segment. With `recover`, every batch is validated and an invalid tail
    /// is cut off; otherwise persisted indexes are used when consistent and the batches are
    /// only walked (headers) to rebuild offsets and timestamps.
    pub(crate) fn open(
        dir: &Path,
        base_offset: i64,
        recovery_point: Option<i64>,
        index_interval_bytes: u32,
        now_ms: i64,
    ) -> Result<(Self, Option<Truncation>, usize), LogError> {
        // `Some`: the active segment, checked batch by batch; a bad tail is cut, but never
        // below the recovery point.
        let recover = recovery_point.is_some();
        let mut segment = Self::create(dir, base_offset, now_ms)?;
        let size = segment
            .file
            .metadata()
            .map_err(|e| io_error(&segment.path, e))?
            .len();
        segment.size = size;
        let mut position = 0u64;
        let mut batches = 0usize;
        let mut truncation = None;
        let mut expected_offset = base_offset;
        while position < size {
            let step = segment.read_batch_at(position, recover);
            let header = match step {
                Ok(header) if header.base_offset == expected_offset || !recover => header,
                Ok(header) => {
                    truncation = Some(format!(
                        "batch at position {position} has base offset {}, expected {expected_offset}",
                        header.base_offset
                    ));
                    break;
                }
                Err(reason) => {
                    truncation = Some(reason);
                    break;
                }
            };
            let total = header.total_size().unwrap_or(0) as u64;
            segment.index_batch(&header, position, total, index_interval_bytes);
            expected_offset = header.last_offset() + 1;
            position += total;
            batches += 1;
        }
        segment.next_offset = expected_offset;
        if let Some(point) = recovery_point
            && expected_offset < point
        {
            return Err(LogError::CorruptBelowRecoveryPoint {
                path: segment.path.clone(),
                position,
                offset: expected_offset,
                recovery_point: point,
                reason: truncation.unwrap_or_else(|| "the segment ends early".into()),
            });
        }
        let truncation = match truncation {
            Some(reason) if recover => {
                segment
                    .file
                    .set_len(position)
                    .map_err(|e| io_error(&segment.path, e))?;
                segment
                    .file
                    .sync_all()
                    .map_err(|e| io_error(&segment.path, e))?;
                segment.size = position;
                Some(Truncation {
                    path: segment.path.clone(),
                    position,
                    bytes: size - position,
                    reason,
                })
            }
            Some(reason) => {
                return Err(LogError::CorruptBatch {
                    reason: format!(
                        "{}: sealed segment is corrupt at position {position}: {reason}",
                        segment.path.display()
                    ),
                });
            }
            None => None,
        };
        // Sealed segments: prefer the persisted indexes when they are consistent (they may be
        // denser or sparser than what the walk produced; either is correct).
        if !recover {
            if let Some(index) = read_file(&dir.join(file_name(base_offset, "index")))
                .and_then(|b| OffsetIndex::from_bytes(&b, segment.size))
            {
                segment.offset_index = index;
            }
            if let Some(index) = read_file(&dir.join(file_name(base_offset, "timeindex")))
                .and_then(|b| TimeIndex::from_bytes(&b))
            {
                segment.time_index = index;
            }
        }
        Ok((segment, truncation, batches))
    }

    /// Reads and checks the batch header at `position`; with `verify`, the whole batch's CRC too.
    fn read_batch_at(&self, position: u64, verify: bool) -> Result<BatchHeader, String> {
        let remaining = self.size - position;
        let mut head = [0u8; HEADER_BYTES];
        if remaining < HEADER_BYTES as u64 {
            return Err(format!(
                "{remaining} trailing bytes are shorter than a batch header"
            ));
        }
        self.file
            .read_exact_at(&mut head, position)
            .map_err(|e| format!("read failed: {e}"))?;
        let header = BatchHeader::parse(&head).ok_or("unparsable header")?;
        let total = header
            .total_size()
            .filter(|t| *t >= HEADER_BYTES)
            .ok_or_else(|| format!("invalid batch length {}", header.batch_length))?;
        if total as u64 > remaining {
            return Err(format!(
                "batch of {total} bytes but only {remaining} remain (torn write)"
            ));
        }
        if header.magic != 2 {
            return Err(format!("magic {} is not 2", header.magic));
        }
        if verify {
            let mut whole = vec![0u8; total];
            self.file
                .read_exact_at(&mut whole, position)
                .map_err(|e| format!("read failed: {e}"))?;
            check_batch(&whole).map_err(|e| e.to_string())?;
        }
        Ok(header)
    }

    fn index_batch(
        &mut self,
        header: &BatchHeader,
        position: u64,
        total: u64,
        index_interval_bytes: u32,
    ) {
        let relative = u32::try_from(header.base_offset - self.base_offset).unwrap_or(u32::MAX);
        if self.offset_index_due(index_interval_bytes) {
            self.offset_index
                .push(relative, u32::try_from(position).unwrap_or(u32::MAX));
            self.bytes_since_index = 0;
        }
        self.bytes_since_index += total;
        let last_offset = header.last_offset();
        if self
            .max_timestamp
            .is_none_or(|(t, _)| header.max_timestamp > t)
        {
            self.max_timestamp = Some((header.max_timestamp, header.base_offset));
            self.time_index.push(header.max_timestamp, relative);
        }
        self.size = self.size.max(position + total);
        self.next_offset = last_offset + 1;
    }

    fn offset_index_due(&self, index_interval_bytes: u32) -> bool {
        self.offset_index.is_empty() || self.bytes_since_index >= u64::from(index_interval_bytes)
    }

    /// Appends stored batch bytes. On failure the file is truncated back and nothing changes.
    pub(crate) fn append(
        &mut self,
        head: &[u8],
        records: &[u8],
        header: &BatchHeader,
        index_interval_bytes: u32,
    ) -> Result<(), LogError> {
        let position = self.size;
        let written = write_all_vectored(&mut self.file, head, records);
        if let Err(source) = written {
            if let Err(undo) = self.file.set_len(position) {
                return Err(LogError::Io {
                    path: self.path.clone(),
                    source: std::io::Error::new(
                        source.kind(),
                        format!(
                            "{source}; truncating back to {position} bytes also failed: {undo}"
                        ),
                    ),
                });
            }
            return Err(io_error(&self.path, source));
        }
        let length = (head.len() + records.len()) as u64;
        self.index_batch(header, position, length, index_interval_bytes);
        Ok(())
    }

    /// Byte position of the batch containing `offset`, scanning from the index entry.
    pub(crate) fn position_of(&self, offset: i64) -> Result<Option<u64>, LogError> {
        let relative = u32::try_from(offset - self.base_offset).unwrap_or(u32::MAX);
        let mut position = u64::from(self.offset_index.lookup(relative));
        while position < self.size {
            let header = self.header_at(position)?;
            if header.last_offset() >= offset {
                return Ok(Some(position));
            }
            position += header.total_size().unwrap_or(0) as u64;
        }
        Ok(None)
    }

    pub(crate) fn header_at(&self, position: u64) -> Result<BatchHeader, LogError> {
        let mut head = [0u8; HEADER_BYTES];
        self.file
            .read_exact_at(&mut head, position)
            .map_err(|e| io_error(&self.path, e))?;
        let header = BatchHeader::parse(&head).ok_or_else(|| LogError::CorruptBatch {
            reason: format!(
                "{}: unreadable batch header at {position}",
                self.path.display()
            ),
        })?;
        if header.total_size().is_none_or(|t| t < HEADER_BYTES) {
            return Err(LogError::CorruptBatch {
                reason: format!(
                    "{}: invalid batch length at {position}",
                    self.path.display()
                ),
            });
        }
        Ok(header)
    }

    pub(crate) fn read_at(&self, position: u64, length: usize) -> Result<Vec<u8>, LogError> {
        let mut out = vec![0u8; length];
        self.file
            .read_exact_at(&mut out, position)
            .map_err(|e| io_error(&self.path, e))?;
        Ok(out)
    }

    /// Relative offset from which to scan for a timestamp (see [`TimeIndex::scan_start`]).
    pub(crate) fn time_scan_start(&self, timestamp: i64) -> i64 {
        self.base_offset + i64::from(self.time_index.scan_start(timestamp))
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Writes the index files (at roll and close); fsynced with `durable`. An index file a
    /// power cut left short or zeroed is harmless: an open trusts only consistent ones and
    /// rebuilds the rest by scanning the segment.
    pub(crate) fn write_indexes(&self, dir: &Path, durable: bool) -> Result<(), LogError> {
        for (name, bytes) in [
            (
                file_name(self.base_offset, "index"),
                self.offset_index.to_bytes(),
            ),
            (
                file_name(self.base_offset, "timeindex"),
                self.time_index.to_bytes(),
            ),
        ] {
            let path = dir.join(name);
            let mut file = File::create(&path).map_err(|e| io_error(&path, e))?;
            file.write_all(&bytes).map_err(|e| io_error(&path, e))?;
            if durable {
                file.sync_all().map_err(|e| io_error(&path, e))?;
            }
        }
        Ok(())
    }

    pub(crate) fn delete_files(self, dir: &Path) -> Result<(), LogError> {
        for extension in ["log", "index", "timeindex"] {
            let path = dir.join(file_name(self.base_offset, extension));
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(&path, e)),
            }
        }
        Ok(())
    }
}

/// Writes `head` then `body`, in one `writev` when the kernel takes them whole (a batch's
/// patched header and its records as they came, without copying them together first).
fn write_all_vectored(file: &mut File, head: &[u8], body: &[u8]) -> std::io::Result<()> {
    let mut skip = 0usize;
    let total = head.len() + body.len();
    while skip < total {
        let written = if skip < head.len() {
            file.write_vectored(&[
                std::io::IoSlice::new(&head[skip..]),
                std::io::IoSlice::new(body),
            ])
        } else {
            file.write(&body[skip - head.len()..])
        };
        match written {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => skip += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
