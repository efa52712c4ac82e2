//! Partition log behaviour on real files in a temporary directory, with hand-built batches.

use std::fs::OpenOptions;
use std::io::Write;

use super::*;

/// An uncompressed RecordBatch v2 with `count` records whose timestamps are
/// `base_timestamp + i`, CRC included, base offset 0.
pub(crate) fn build_batch(count: i32, base_timestamp: i64, value_bytes: usize) -> Vec<u8> {
    use super::records::put_varint as varint;
    let mut records = Vec::new();
    for i in 0..count {
        let mut body = vec![0u8]; // attributes
        varint(&mut body, i64::from(i)); // timestamp delta
        varint(&mut body, i64::from(i)); // offset delta
        varint(&mut body, 1); // key length
        body.push(b'k');
        varint(&mut body, value_bytes as i64);
        body.extend(std::iter::repeat_n(b'v', value_bytes));
        varint(&mut body, 0); // headers
        varint(&mut records, body.len() as i64);
        records.extend_from_slice(&body);
    }
    let mut batch = Vec::new();
    batch.extend_from_slice(&0i64.to_be_bytes());
    batch.extend_from_slice(&((batch::HEADER_BYTES - 12 + records.len()) as i32).to_be_bytes());
    batch.extend_from_slice(&0i32.to_be_bytes()); // partition leader epoch
    batch.push(2); // magic
    batch.extend_from_slice(&0u32.to_be_bytes()); // crc, filled below
    batch.extend_from_slice(&0i16.to_be_bytes()); // attributes
    batch.extend_from_slice(&(count - 1).to_be_bytes());
    batch.extend_from_slice(&base_timestamp.to_be_bytes());
    batch.extend_from_slice(&(base_timestamp + i64::from(count - 1)).to_be_bytes());
    batch.extend_from_slice(&(-1i64).to_be_bytes());
    batch.extend_from_slice(&(-1i16).to_be_bytes());
    batch.extend_from_slice(&(-1i32).to_be_bytes());
    batch.extend_from_slice(&count.to_be_bytes());
    batch.extend_from_slice(&records);
    let crc = crc32c::crc32c(&batch[21..]);
    batch[17..21].copy_from_slice(&crc.to_be_bytes());
    batch
}

/// `batch` with its producer id, epoch and base sequence set (and the CRC recomputed).
pub(crate) fn with_producer(
    mut batch: Vec<u8>,
    producer_id: i64,
    epoch: i16,
    sequence: i32,
) -> Vec<u8> {
    batch[43..51].copy_from_slice(&producer_id.to_be_bytes());
    batch[51..53].copy_from_slice(&epoch.to_be_bytes());
    batch[53..57].copy_from_slice(&sequence.to_be_bytes());
    let crc = crc32c::crc32c(&batch[21..]);
    batch[17..21].copy_from_slice(&crc.to_be_bytes());
    batch
}

fn validated(count: i32, timestamp: i64) -> ValidatedBatch {
    validate_produce_records(&build_batch(count, timestamp, 10), 1 << 20).expect("valid batch")
}

fn open(dir: &Path, config: LogConfig) -> (PartitionLog, RecoveryReport) {
    PartitionLog::open(dir, config, 0).expect("open")
}

/// Base offsets of the batches in `bytes`.
fn batch_offsets(bytes: &[u8]) -> Vec<(i64, i64)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let header = check_batch_for_test(&bytes[at..]);
        out.push((header.base_offset, header.last_offset()));
        at += header.total_size().expect("size");
    }
    out
}

fn check_batch_for_test(bytes: &[u8]) -> BatchHeader {
    batch::check_batch(bytes).expect("stored batches stay valid")
}

#[test]
fn offsets_are_per_record_and_reads_return_whole_batches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut log, _) = open(dir.path(), LogConfig::default());
    let mut expected = 0i64;
    let mut sizes = (1..=37).cycle();
    while expected < 10_000 {
        let count = sizes
            .next()
            .expect("cycle")
            .min(i32::try_from(10_000 - expected).expect("fits"));
        let info = log.append(&validated(count, 1_000), 5).expect("append");
        assert_eq!(info.base_offset, expected);
        assert_eq!(info.last_offset, expected + i64::from(count) - 1);
        expected += i64::from(count);
    }
    assert_eq!(log.log_end_offset(), 10_000);
    // From the middle of a batch: that whole batch first.
    let read = log.read(2, 1 << 20).expect("read");
    assert_eq!(batch_offsets(&read.records)[0], (1, 2));
    assert_eq!(read.high_watermark, 10_000);
    // A max_bytes smaller than one batch still returns exactly one batch (KIP-74).
    let read = log.read(0, 1).expect("read");
    assert_eq!(batch_offsets(&read.records), vec![(0, 0)]);
    assert!(log.read(10_000, 100).expect("at end").records.is_empty());
    assert!(matches!(
        log.read(10_001, 100),
        Err(LogError::OffsetOutOfRange { .. })
    ));
    assert!(matches!(
        log.read(-1, 100),
        Err(LogError::OffsetOutOfRange { .. })
    ));
}

#[test]
fn produce_validation_refuses_bad_batches_and_appends_nothing() {
    let good = build_batch(3, 0, 5);
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    assert!(matches!(
        validate_produce_records(&flipped, 1 << 20),
        Err(LogError::CorruptBatch { .. })
    ));
    let mut magic = good.clone();
    magic[16] = 1;
    assert_eq!(
        validate_produce_records(&magic, 1 << 20)
            .unwrap_err()
            .code(),
        ResponseError::InvalidRecord
    );
    let mut two = good.clone();
    two.extend_from_slice(&good);
    assert_eq!(
        validate_produce_records(&two, 1 << 20).unwrap_err().code(),
        ResponseError::InvalidRecord
    );
    assert_eq!(
        validate_produce_records(&good[..good.len() - 1], 1 << 20)
            .unwrap_err()
            .code(),
        ResponseError::CorruptMessage
    );
    assert_eq!(
        validate_produce_records(&good, 20).unwrap_err().code(),
        ResponseError::MessageTooLarge
    );
    assert_eq!(
        validate_produce_records(&[], 20).unwrap_err().code(),
        ResponseError::InvalidRecord
    );
}

#[test]
fn log_append_time_rewrites_the_timestamp_and_keeps_the_crc_valid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = LogConfig {
        timestamp_type: TimestampType::LogAppendTime,
        ..LogConfig::default()
    };
    let (mut log, _) = open(dir.path(), config);
    let info = log.append(&validated(2, 5), 777).expect("append");
    assert_eq!(info.log_append_time_ms, 777);
    let read = log.read(0, 1 << 20).expect("read");
    let header = check_batch_for_test(&read.records);
    assert_eq!(header.max_timestamp, 777);
    assert_ne!(header.attributes & 0b1000, 0);
}

#[test]
fn recovery_truncates_a_torn_tail_and_appends_continue() {
    for tail in [
        build_batch(4, 0, 10)[..40].to_vec(),
        b"not a batch at all, just garbage bytes here........................".to_vec(),
        {
            let mut b = build_batch(4, 0, 10);
            b[0..8].copy_from_slice(&5i64.to_be_bytes());
            let n = b.len() - 3;
            b[n] ^= 0xff;
            b
        },
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, _) = open(dir.path(), LogConfig::default());
        for _ in 0..5 {
            log.append(&validated(1, 0), 0).expect("append");
        }
        let before = log.read(0, 1 << 20).expect("read").records;
        drop(log);
        let segment = dir.path().join(file_name(0, "log"));
        OpenOptions::new()
            .append(true)
            .open(&segment)
            .expect("open")
            .write_all(&tail)
            .expect("write");

        let (mut log, report) = open(dir.path(), LogConfig::default());
        assert_eq!(report.truncated_bytes, tail.len() as u64);
        assert_eq!(report.tail_batches_checked, 5);
        assert!(report.truncation.is_some());
        assert_eq!(log.read(0, 1 << 20).expect("read").records, before);
        assert_eq!(
            log.append(&validated(1, 0), 0).expect("append").base_offset,
            5
        );
    }
}

#[test]
fn roll_by_size_and_time_and_reads_span_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let batch_size = build_batch(1, 0, 10).len() as u64;
    let config = LogConfig {
        segment_bytes: batch_size * 3,
        segment_ms: 1_000,
        ..LogConfig::default()
    };
    let (mut log, _) = open(dir.path(), config.clone());
    for i in 0..7 {
        log.append(&validated(1, i), 0).expect("append");
    }
    // Three batches per segment: 0-2, 3-5, 6.
    assert_eq!(
        log.segments.keys().copied().collect::<Vec<_>>(),
        vec![0, 3, 6]
    );
    let read = log.read(2, 1 << 20).expect("read");
    assert_eq!(batch_offsets(&read.records).len(), 5);
    // Time: the next append after segment.ms rolls even though the segment is not full.
    log.append(&validated(1, 7), 10_000).expect("append");
    assert_eq!(
        log.segments.keys().copied().collect::<Vec<_>>(),
        vec![0, 3, 6, 7]
    );
    let report = log.maintain(20_000).expect("maintain");
    assert!(report.rolled);
    drop(log);
    // Reopen: sealed segments load with their index files; offsets continue.
    let (mut log, report) = open(dir.path(), config);
    assert_eq!(report.segments, 5);
    assert_eq!(log.log_end_offset(), 8);
    assert_eq!(
        log.append(&validated(1, 8), 20_000)
            .expect("append")
            .base_offset,
        8
    );
    assert_eq!(
        batch_offsets(&log.read(0, 1 << 20).expect("read").records).len(),
        9
    );
}

#[test]
fn a_segment_rolls_before_a_relative_offset_would_overflow() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut log, _) = open(dir.path(), LogConfig::default());
    // The real bound is i32::MAX offsets past the segment's base; 10 here.
    log.max_relative_offset = 10;
    for i in 0..4 {
        log.append(&validated(4, i), 0).expect("append");
    }
    // 0-3, 4-7 fit below relative offset 10; 8-11 would end at 11: a new segment at 8, and
    // 12-15 fits with it (relative 7).
    assert_eq!(log.segments.keys().copied().collect::<Vec<_>>(), vec![0, 8]);
    for (from, batches) in [(0, 4), (5, 3), (9, 2), (14, 1)] {
        let read = log.read(from, 1 << 20).expect("read");
        assert_eq!(batch_offsets(&read.records).len(), batches, "from {from}");
    }
    drop(log);
    let (log, report) = open(dir.path(), LogConfig::default());
    assert_eq!(report.segments, 2);
    assert_eq!(log.log_end_offset(), 16);
}

#[test]
fn retention_deletes_whole_old_segments_by_bytes_and_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let batch_size = build_batch(1, 0, 10).len() as i64;
    let config = LogConfig {
        segment_bytes: u64::try_from(batch_size * 2).expect("size"),
        retention_bytes: batch_size * 4,
        retention_ms: -1,
        ..LogConfig::default()
    };
    let (mut log, _) = open(dir.path(), config);
    for i in 0..10 {
        log.append(&validated(1, i * 1_000), 0).expect("append");
    }
    let report = log.maintain(0).expect("maintain");
    assert_eq!(report.deleted_segments, vec![0, 2, 4]);
    assert_eq!(log.log_start_offset(), 6);
    assert!(log.size_bytes() <= u64::try_from(batch_size * 4).expect("size"));
    assert!(matches!(
        log.read(5, 100),
        Err(LogError::OffsetOutOfRange { .. })
    ));
    assert!(!dir.path().join(file_name(0, "log")).exists());

    let dir = tempfile::tempdir().expect("tempdir");
    let config = LogConfig {
        segment_bytes: u64::try_from(batch_size * 2).expect("size"),
        retention_ms: 5_000,
        ..LogConfig::default()
    };
    let (mut log, _) = open(dir.path(), config);
    for i in 0..6 {
        log.append(&validated(1, i * 1_000), 0).expect("append");
    }
    // Segments [0,1] (newest record 1000), [2,3] (3000), [4,5] active.
    let report = log.maintain(7_000).expect("maintain");
    assert_eq!(report.deleted_segments, vec![0]);
    assert_eq!(log.log_start_offset(), 2);
}

#[test]
fn offsets_by_timestamp_are_exact_for_uncompressed_batches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut log, _) = open(
        dir.path(),
        LogConfig {
            index_interval_bytes: 1,
            ..LogConfig::default()
        },
    );
    log.append(&validated(5, 100), 0).expect("append"); // offsets 0-4, timestamps 100-104
    log.append(&validated(5, 200), 0).expect("append"); // offsets 5-9, timestamps 200-204
    assert_eq!(log.offset_for_timestamp(0).expect("lookup"), Some((0, 100)));
    assert_eq!(
        log.offset_for_timestamp(103).expect("lookup"),
        Some((3, 103))
    );
    assert_eq!(
        log.offset_for_timestamp(150).expect("lookup"),
        Some((5, 200))
    );
    assert_eq!(
        log.offset_for_timestamp(204).expect("lookup"),
        Some((9, 204))
    );
    assert_eq!(log.offset_for_timestamp(205).expect("lookup"), None);
    assert_eq!(log.max_timestamp().expect("max"), Some((9, 204)));
}

#[test]
fn corrupt_index_files_are_rebuilt_not_trusted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let batch_size = build_batch(1, 0, 10).len() as u64;
    let config = LogConfig {
        segment_bytes: batch_size * 2,
        index_interval_bytes: 1,
        ..LogConfig::default()
    };
    let (mut log, _) = open(dir.path(), config.clone());
    for i in 0..5 {
        log.append(&validated(1, i), 0).expect("append");
    }
    drop(log);
    std::fs::write(dir.path().join(file_name(0, "index")), b"\xff\xff\xff").expect("corrupt index");
    std::fs::write(
        dir.path().join(file_name(2, "index")),
        [0u8, 0, 0, 9, 0, 0, 0xff, 0xff],
    )
    .expect("bad position");
    let (log, _) = open(dir.path(), config);
    for offset in 0..5 {
        let read = log.read(offset, 1).expect("read");
        assert_eq!(batch_offsets(&read.records), vec![(offset, offset)]);
    }
}

#[test]
fn a_segment_file_with_a_foreign_name_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("notes.log"), b"x").expect("write");
    assert!(matches!(
        PartitionLog::open(dir.path(), LogConfig::default(), 0),
        Err(LogError::UnexpectedFile { .. })
    ));
}

/// Issue 20 (DeleteRecords, KIP-107): the log start moves inside a segment and across whole
/// ones, durably; reads below it are refused; a restart keeps it; nothing past the end.
#[test]
fn delete_records_moves_the_log_start_durably() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Small segments: one 4-record batch (about 130 bytes) each.
    let config = LogConfig {
        segment_bytes: 150,
        ..LogConfig::default()
    };
    let (mut log, _) = open(dir.path(), config.clone());
    for i in 0..4 {
        log.append(&validated(4, i * 10), 0).expect("append");
    }
    assert_eq!((log.log_start_offset(), log.log_end_offset()), (0, 16));
    let segments_before = log.segments.len();
    assert!(segments_before >= 3, "{segments_before} segments");

    assert_eq!(log.delete_records_before(6).expect("delete"), 6);
    assert!(
        log.segments.len() < segments_before,
        "the first segment went"
    );
    let refused = log.read(5, 1 << 20).expect_err("below the start");
    assert_eq!(refused.code(), ResponseError::OffsetOutOfRange);
    let read = log.read(6, 1 << 20).expect("at the start");
    assert!(!read.records.is_empty());
    assert!(
        log.offset_for_timestamp(0)
            .expect("by time")
            .is_some_and(|(offset, _)| offset >= 6),
        "no offset below the start by timestamp"
    );
    // Not backwards, not past the end.
    assert_eq!(log.delete_records_before(2).expect("no-op"), 6);
    assert_eq!(
        log.delete_records_before(17)
            .expect_err("past the end")
            .code(),
        ResponseError::OffsetOutOfRange
    );
    drop(log);

    let (mut log, _) = open(dir.path(), config.clone());
    assert_eq!(log.log_start_offset(), 6, "kept across a restart");
    assert_eq!(log.delete_records_before(16).expect("to the end"), 16);
    assert_eq!(log.segments.len(), 1, "only the active segment stays");
    log.append(&validated(2, 100), 0).expect("append after");
    assert_eq!((log.log_start_offset(), log.log_end_offset()), (16, 18));
}

/// Segments of three one-record batches each, `batches` batches in all, appended and dropped
/// without a close (a crash); returns the directory and the segments' base offsets.
fn crashed_log(batches: i64, recovery_point: Option<i64>) -> (tempfile::TempDir, Vec<i64>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut log, _) = open(dir.path(), small_segments());
    for i in 0..batches {
        log.append(&validated(1, i), 0).expect("append");
    }
    if let Some(point) = recovery_point {
        log.checkpoint_recovery_point(point).expect("checkpoint");
    }
    let bases = log.segments.keys().copied().collect();
    drop(log);
    (dir, bases)
}

/// Sets the size of segment `base`'s file, as a power cut that lost its tail leaves it.
fn cut_segment(dir: &Path, base: i64, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(dir.join(file_name(base, "log")))
        .expect("open")
        .set_len(len)
        .expect("cut");
}

/// Cuts the last 5 bytes of segment `base`: its last batch torn.
fn tear_segment(dir: &Path, base: i64) {
    let size = fs::metadata(dir.join(file_name(base, "log")))
        .expect("metadata")
        .len();
    cut_segment(dir, base, size - 5);
}

/// Bytes of one of `crashed_log`'s batches.
fn one_batch() -> u64 {
    build_batch(1, 0, 10).len() as u64
}

fn small_segments() -> LogConfig {
    LogConfig {
        segment_bytes: one_batch() * 3,
        ..LogConfig::default()
    }
}

/// A roll leaves the sealed segment's fsync to the next sync round, so a power cut can tear a
/// sealed segment, not only the last one: recovery checks every segment from the one holding
/// the recovery point, cuts the first torn one and drops every segment after it (their
/// records come after a gap).
#[test]
fn power_loss_after_a_roll_cuts_a_torn_sealed_segment_and_drops_the_segments_after_it() {
    // Segments 0-2, 3-5, 6-8, 9-10; the recovery point at 3.
    let (dir, bases) = crashed_log(11, Some(3));
    assert_eq!(bases, vec![0, 3, 6, 9]);
    // Segment 3 lost its last batch's last bytes (pages never written back).
    tear_segment(dir.path(), 3);

    let (mut log, report) = open(dir.path(), small_segments());
    assert_eq!(
        log.log_end_offset(),
        5,
        "offsets 3 and 4 survive, 5 is torn"
    );
    assert_eq!(
        report.segments_dropped, 2,
        "segments 6 and 9 follow the gap"
    );
    assert!(report.truncation.is_some());
    assert!(!dir.path().join(file_name(6, "log")).exists());
    assert!(!dir.path().join(file_name(9, "log")).exists());
    assert_eq!(
        batch_offsets(&log.read(0, 1 << 20).expect("read").records).len(),
        5
    );
    assert_eq!(
        log.append(&validated(1, 0), 0).expect("append").base_offset,
        5
    );
}

/// A sealed segment that lost whole batches at its end (its size never reached the disk) is
/// as much a gap as a torn one.
#[test]
fn a_sealed_segment_short_of_the_next_base_is_a_gap_too() {
    let (dir, _) = crashed_log(11, Some(3));
    cut_segment(dir.path(), 6, one_batch());
    let (log, report) = open(dir.path(), small_segments());
    assert_eq!(log.log_end_offset(), 7);
    assert_eq!(report.segments_dropped, 1);
}

/// Below the recovery point every byte was fsynced and acknowledged: a sealed segment
/// damaged there is refused, never cut.
#[test]
fn a_sealed_segment_damaged_below_the_recovery_point_is_refused() {
    // The recovery point at 7: offset 6 was fsynced, 7 and 8 may not have been.
    let (dir, _) = crashed_log(11, Some(7));
    // Offset 8 lost: cut there, and segment 9 (after the gap) dropped.
    cut_segment(dir.path(), 6, 2 * one_batch());
    let (log, report) = open(dir.path(), small_segments());
    assert_eq!(log.log_end_offset(), 8);
    assert_eq!(report.segments_dropped, 1);
    drop(log);
    // Offset 6 lost too: below the recovery point.
    cut_segment(dir.path(), 6, 0);
    let error = PartitionLog::open(dir.path(), small_segments(), 0).expect_err("refused");
    assert!(
        matches!(error, LogError::CorruptBelowRecoveryPoint { .. }),
        "{error}"
    );
}

/// Without a checkpoint nothing is known to be fsynced: every segment is checked.
#[test]
fn without_a_recovery_point_every_segment_is_checked() {
    let (dir, _) = crashed_log(11, None);
    tear_segment(dir.path(), 0);
    let (log, report) = open(dir.path(), small_segments());
    assert_eq!(log.log_end_offset(), 2);
    assert_eq!(report.segments_dropped, 3);
}

/// What a crash left in the page cache of sealed segments is fsynced before the log counts
/// it durable, and a sync round covers the sealed segments a roll left unsynced.
#[test]
fn sync_rounds_cover_the_sealed_segments_a_roll_left_unsynced() {
    let (dir, _) = crashed_log(11, Some(3));
    let (mut log, _) = open(dir.path(), small_segments());
    assert_eq!(
        log.unsynced_sealed(),
        vec![3, 6],
        "segments after the recovery point"
    );
    log.flush().expect("flush");
    assert!(log.unsynced_sealed().is_empty());
    // 11, then a roll at 12 (sealing 9), 13, 14, a roll at 15 (sealing 12), 16, 17.
    for i in 0..7 {
        log.append(&validated(1, i), 0).expect("append");
    }
    assert_eq!(log.unsynced_sealed(), vec![9, 12]);
    let target = log.sync_target().expect("target");
    assert_eq!(target.end(), 18);
    target.sync().expect("sync");
    log.synced(&target);
    assert!(log.unsynced_sealed().is_empty());
}

/// A segment before the one holding the recovery point was fsynced whole: ending short of
/// the next segment's base there is damage to acknowledged data, refused rather than taken
/// for a torn tail (which would delete the fsynced segments after it).
#[test]
fn a_gap_before_the_recovery_point_is_refused_not_cut() {
    let (dir, _) = crashed_log(11, Some(9));
    cut_segment(dir.path(), 3, one_batch());
    let error = PartitionLog::open(dir.path(), small_segments(), 0).expect_err("refused");
    assert!(
        matches!(error, LogError::CorruptBelowRecoveryPoint { .. }),
        "{error}"
    );
    assert!(
        dir.path().join(file_name(9, "log")).exists(),
        "nothing deleted"
    );
}

/// A log start checkpoint (DeleteRecords) beyond what recovery kept is lowered to the log end
/// on disk too: left as it was, it would hide the records written next once the log grew past
/// it again.
#[test]
fn a_log_start_beyond_the_recovered_end_is_lowered_durably() {
    let (dir, _) = crashed_log(11, Some(3));
    {
        let (mut log, _) = open(dir.path(), small_segments());
        assert_eq!(log.delete_records_before(8).expect("delete records"), 8);
    }
    // The power cut: segment 6 kept only offset 6.
    cut_segment(dir.path(), 6, one_batch());
    let (mut log, _) = open(dir.path(), small_segments());
    assert_eq!((log.log_start_offset(), log.log_end_offset()), (7, 7));
    for i in 0..3 {
        log.append(&validated(1, i), 0).expect("append");
    }
    drop(log);
    let (log, _) = open(dir.path(), small_segments());
    assert_eq!(
        log.log_start_offset(),
        7,
        "offset 7 was written after the cut"
    );
    assert_eq!(log.log_end_offset(), 10);
}
