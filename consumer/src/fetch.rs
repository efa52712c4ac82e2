//! Turning one partition's `records` bytes from a Fetch response into [`ConsumerRecord`]s.
//!
//! - Batches are split by their length prefix; a trailing partial batch (the broker cut the
//!   response at `max.partition.fetch.bytes`) is left for the next fetch.
//! - A batch that starts before the fetch offset (a compressed batch is always returned whole)
//!   contributes only its records at or after it.
//! - Control batches (transaction markers) are never returned; with `read_committed`, records
//!   of aborted transactions are dropped, Kafka's way: the response's aborted-transaction list
//!   activates a producer id once its first offset is reached, its ABORT marker ends it.
//! - CRCs are checked; all four codecs are decompressed. Records are read by `semel-records`:
//!   uncompressed ones without copying, compressed ones a piece at a time, at most 256 MiB
//!   decompressed each, so a small batch from a broken or hostile broker cannot make the
//!   consumer allocate gigabytes.
//! - Offset deltas may leave gaps (Kafka's log cleaner drops records from a batch and keeps
//!   the batch) but must increase within the batch's last offset delta. A base offset no
//!   broker could hand out is an error; timestamps wrap past i64::MAX as in the Java client.
//!   Nothing in the bytes can make the arithmetic overflow.
//!
//! References: Kafka protocol guide (Record Batch), the Java client's `CompletedFetch`.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;

use bytes::{Buf, Bytes};

use crate::record::ConsumerRecord;

/// A transaction the broker says was aborted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AbortedTransaction {
    pub(crate) producer_id: i64,
    pub(crate) first_offset: i64,
}

/// One partition's decoded fetch data.
#[derive(Debug, Default)]
pub(crate) struct Decoded {
    /// A deque: it becomes the partition's buffer as it is when that is empty (no copy).
    pub(crate) records: VecDeque<ConsumerRecord>,
    /// Where the next fetch starts: after the last complete batch (control and aborted batches
    /// included), or the fetch offset when there was none.
    pub(crate) next_offset: i64,
    /// Bytes of the records returned (keys, values, headers), for the buffer bound.
    pub(crate) bytes: usize,
}

/// Why a partition's data could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DecodeError {
    /// Offset of the batch that failed.
    pub(crate) offset: i64,
    pub(crate) reason: String,
    /// What was decoded before it (returned to the application first).
    pub(crate) before: usize,
}

const LENGTH_PREFIX: usize = 12;
const MAGIC_AT: usize = 16;
const ATTRIBUTES_AT: usize = 21;
const LAST_OFFSET_DELTA_AT: usize = 23;
const PRODUCER_ID_AT: usize = 43;
const RECORDS_COUNT_AT: usize = 57;
const HEADER_LEN: usize = 61;

fn be_i64(b: &[u8], at: usize) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    i64::from_be_bytes(a)
}

fn be_i32(b: &[u8], at: usize) -> i32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    i32::from_be_bytes(a)
}

const CRC_AT: usize = 17;
const FIRST_TIMESTAMP_AT: usize = 27;
const MAX_TIMESTAMP_AT: usize = 35;
/// Attributes bit: every record's timestamp is the batch's max timestamp (`LogAppendTime`).
const LOG_APPEND_TIME: i16 = 1 << 3;
/// The highest base offset read: any record's offset delta (an i32) added to it, and one
/// more, still fits in an i64. No broker comes near it; a batch past it is damaged.
const MAX_BASE_OFFSET: i64 = i64::MAX - (1 << 32);

/// A batch's records (the whole batch, length prefix included): CRC checked, then read by
/// semel-records, compressed ones decompressed a piece at a time. Offset deltas may have gaps
/// (a compacted batch) but must increase and stay within the last offset delta.
fn decode_records(
    batch: &Bytes,
    attributes: i16,
    count: usize,
) -> Result<Vec<semel_records::RawRecord>, String> {
    let stored = u32::from_be_bytes([
        batch[CRC_AT],
        batch[CRC_AT + 1],
        batch[CRC_AT + 2],
        batch[CRC_AT + 3],
    ]);
    let computed = crc32c::crc32c(&batch[ATTRIBUTES_AT..]);
    if stored != computed {
        return Err(format!(
            "CRC mismatch: the batch says {stored:#010x}, its bytes give {computed:#010x}"
        ));
    }
    let deltas = semel_records::OffsetDeltas::Increasing {
        last: be_i32(batch, LAST_OFFSET_DELTA_AT),
    };
    let codec = attributes & 0x7;
    if codec == 0 {
        semel_records::decode_records(&batch.slice(HEADER_LEN..), count, deltas)
    } else {
        semel_records::decode_compressed_records(&batch[HEADER_LEN..], codec, count, deltas)
    }
    .map_err(|e| e.0)
}

/// What a buffered record counts for against the buffer bound.
pub(crate) fn record_size(record: &ConsumerRecord) -> usize {
    record.key.as_ref().map_or(0, Bytes::len)
        + record.value.as_ref().map_or(0, Bytes::len)
        + record.headers.wire().len()
        + 64
}

/// Decodes `data` fetched from `fetch_offset`.
///
/// # Errors
/// The first batch that fails its CRC or does not decode; records before it are in
/// `Ok` of a later call (the caller keeps them through [`DecodeError::before`]).
/// The fewest bytes one record takes (length, attributes, timestamp delta, offset delta, key
/// length, value length, header count: a byte each at the least).
const MIN_RECORD_BYTES: usize = 7;

/// The most records a compressed batch of `payload` bytes may claim: a thousand per
/// compressed byte, and at least a million (more than any real batch), so a claim is bounded
/// by memory the bytes could back. The broker applies the same bound on produce.
fn max_compressed_records(payload: usize) -> usize {
    payload.saturating_mul(1024).max(1 << 20)
}

pub(crate) fn decode(
    topic: &Arc<str>,
    partition: i32,
    fetch_offset: i64,
    mut data: Bytes,
    aborted: Option<&[AbortedTransaction]>,
) -> (Decoded, Option<DecodeError>) {
    let mut out = Decoded {
        next_offset: fetch_offset,
        ..Decoded::default()
    };
    // producer id → aborted transactions not yet reached, by first offset.
    let mut pending: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for a in aborted.unwrap_or_default() {
        pending
            .entry(a.first_offset)
            .or_default()
            .push(a.producer_id);
    }
    let mut active_aborts: HashSet<i64> = HashSet::new();
    let read_committed = aborted.is_some();

    while data.len() >= LENGTH_PREFIX {
        let base_offset = be_i64(&data, 0);
        let length = be_i32(&data, 8);
        let fail = |reason: String, out: &Decoded| DecodeError {
            offset: base_offset.max(fetch_offset),
            reason,
            before: out.records.len(),
        };
        let Ok(length) = usize::try_from(length) else {
            let e = fail(format!("negative batch length {length}"), &out);
            return (out, Some(e));
        };
        let total = LENGTH_PREFIX + length;
        if data.len() < total {
            break; // a partial batch at the end of the response
        }
        let batch = data.split_to(total);
        if total < HEADER_LEN {
            let e = fail(
                format!("batch of {total} bytes is shorter than its header"),
                &out,
            );
            return (out, Some(e));
        }
        let magic = batch[MAGIC_AT];
        if magic != 2 {
            let e = fail(
                format!("message format v{magic} is not supported (only record batches v2)"),
                &out,
            );
            return (out, Some(e));
        }
        if !(0..=MAX_BASE_OFFSET).contains(&base_offset) {
            let e = fail(format!("base offset {base_offset} is out of range"), &out);
            return (out, Some(e));
        }
        let attributes = i16::from_be_bytes([batch[ATTRIBUTES_AT], batch[ATTRIBUTES_AT + 1]]);
        let last_offset = base_offset + i64::from(be_i32(&batch, LAST_OFFSET_DELTA_AT));
        let producer_id = be_i64(&batch, PRODUCER_ID_AT);
        let transactional = attributes & (1 << 4) != 0;
        let control = attributes & (1 << 5) != 0;

        if read_committed {
            let reached: Vec<i64> = pending.range(..=last_offset).map(|(k, _)| *k).collect();
            for first in reached {
                if let Some(ids) = pending.remove(&first) {
                    active_aborts.extend(ids);
                }
            }
        }
        if last_offset < fetch_offset {
            continue; // wholly before the position (and out.next_offset is still ahead)
        }
        // Room is reserved for the header's record count: a count the bytes cannot back (a
        // hostile or broken broker) would abort the process, so it is checked first.
        let count = be_i32(&batch, RECORDS_COUNT_AT);
        let payload = total - HEADER_LEN;
        let most = if attributes & 0x7 != 0 {
            max_compressed_records(payload)
        } else {
            payload / MIN_RECORD_BYTES
        };
        if !usize::try_from(count).is_ok_and(|c| c <= most) {
            let e = fail(
                format!("the batch claims {count} records in {payload} bytes (at most {most})"),
                &out,
            );
            return (out, Some(e));
        }
        let decoded = match decode_records(&batch, attributes, count as usize) {
            Ok(decoded) => decoded,
            Err(reason) => {
                let e = fail(reason, &out);
                return (out, Some(e));
            }
        };
        out.next_offset = out.next_offset.max(last_offset + 1);
        if control {
            // Key: version (i16), type (i16): 0 = ABORT, 1 = COMMIT.
            let ends_transaction = decoded.iter().any(|r| {
                r.key.as_ref().is_some_and(|k| {
                    let mut k = k.clone();
                    k.remaining() >= 4 && {
                        k.advance(2);
                        matches!(k.get_i16(), 0 | 1)
                    }
                })
            });
            if ends_transaction {
                active_aborts.remove(&producer_id);
            }
            continue;
        }
        if read_committed && transactional && active_aborts.contains(&producer_id) {
            continue;
        }
        let first_timestamp = be_i64(&batch, FIRST_TIMESTAMP_AT);
        let max_timestamp = be_i64(&batch, MAX_TIMESTAMP_AT);
        out.records.reserve(decoded.len());
        for r in decoded {
            // MAX_BASE_OFFSET leaves room for any delta.
            let offset = base_offset + i64::from(r.offset_delta);
            if offset < fetch_offset {
                continue;
            }
            let record = ConsumerRecord {
                topic: Arc::clone(topic),
                partition,
                offset,
                // Wraps past i64::MAX, as Java's long does in the Java consumer.
                timestamp: if attributes & LOG_APPEND_TIME != 0 {
                    max_timestamp
                } else {
                    first_timestamp.wrapping_add(r.timestamp_delta)
                },
                key: r.key,
                value: r.value,
                headers: r.headers,
            };
            out.bytes += record_size(&record);
            out.records.push_back(record);
        }
    }
    (out, None)
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use kafka_protocol::protocol::StrBytes;
    use kafka_protocol::records::{
        Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
    };

    use super::*;

    fn record(offset: i64, value: &str, producer_id: i64, transactional: bool) -> Record {
        Record {
            transactional,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: 0,
            producer_id,
            producer_epoch: 0,
            timestamp_type: TimestampType::Creation,
            offset,
            // Constant offset - sequence: the encoder puts such records in one batch.
            sequence: offset as i32,
            timestamp: 1_000 + offset,
            key: Some(Bytes::from(format!("k{offset}"))),
            value: Some(Bytes::from(value.to_string())),
            headers: [(
                StrBytes::from_static_str("semel-msg-id"),
                Some(Bytes::from("id")),
            )]
            .into_iter()
            .collect(),
        }
    }

    fn batch(records: &[Record], compression: Compression) -> BytesMut {
        let mut buf = BytesMut::new();
        RecordBatchEncoder::encode(
            &mut buf,
            records,
            &RecordEncodeOptions {
                version: 2,
                compression,
            },
        )
        .expect("encode");
        buf
    }

    const EVERY_CODEC: [Compression; 5] = [
        Compression::None,
        Compression::Gzip,
        Compression::Snappy,
        Compression::Lz4,
        Compression::Zstd,
    ];

    /// The encoder starts a new batch where it must (see `record`): the tests that mean one
    /// batch of several records check that they got one.
    fn assert_one_batch(data: &[u8]) {
        assert_eq!(
            LENGTH_PREFIX + be_i32(data, 8) as usize,
            data.len(),
            "one batch"
        );
    }

    fn topic() -> Arc<str> {
        Arc::from("t")
    }

    #[test]
    fn every_codec_decodes_and_partial_tail_is_left() {
        for compression in EVERY_CODEC {
            let mut data = batch(
                &[record(0, "a", -1, false), record(1, "b", -1, false)],
                compression,
            );
            let second = batch(&[record(2, "c", -1, false)], compression);
            data.extend_from_slice(&second[..second.len() - 3]);
            let (out, error) = decode(&topic(), 0, 0, data.freeze(), None);
            assert_eq!(error, None, "{compression:?}");
            let values: Vec<_> = out.records.iter().map(|r| r.value.clone()).collect();
            assert_eq!(
                values,
                vec![Some(Bytes::from("a")), Some(Bytes::from("b"))],
                "{compression:?}"
            );
            assert_eq!(out.next_offset, 2);
            assert_eq!(out.records[0].header("semel-msg-id"), Some(&b"id"[..]));
        }
    }

    #[test]
    fn records_before_the_fetch_offset_are_skipped() {
        let data = batch(
            &[
                record(10, "a", -1, false),
                record(11, "b", -1, false),
                record(12, "c", -1, false),
            ],
            Compression::Lz4,
        );
        let (out, error) = decode(&topic(), 0, 12, data.freeze(), None);
        assert_eq!(error, None);
        assert_eq!(
            out.records.iter().map(|r| r.offset).collect::<Vec<_>>(),
            vec![12]
        );
        assert_eq!(out.next_offset, 13);
    }

    /// A batch whose header claims 2^31 - 1 records around one (count and last offset delta
    /// consistent, CRC recomputed): a hostile or broken broker must not make the consumer
    /// allocate from the count (the process died with "memory allocation of 377957121872
    /// bytes failed"); the batch is an error, after the good batches before it.
    #[test]
    fn a_batch_claiming_more_records_than_it_holds_is_an_error_not_an_abort() {
        for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let mut data = batch(&[record(0, "a", -1, false)], compression);
            let mut bad = batch(&[record(1, "b", -1, false)], compression);
            bad[LAST_OFFSET_DELTA_AT..LAST_OFFSET_DELTA_AT + 4]
                .copy_from_slice(&(i32::MAX - 1).to_be_bytes());
            bad[RECORDS_COUNT_AT..RECORDS_COUNT_AT + 4].copy_from_slice(&i32::MAX.to_be_bytes());
            let crc = crc32c::crc32c(&bad[21..]);
            bad[17..21].copy_from_slice(&crc.to_be_bytes());
            data.extend_from_slice(&bad);
            let (out, error) = decode(&topic(), 0, 0, data.freeze(), None);
            assert_eq!(out.records.len(), 1, "{compression:?}");
            let error = error.expect("an error for the batch");
            assert_eq!(error.offset, 1, "{compression:?}");
            assert!(error.reason.contains("records"), "{}", error.reason);
        }
    }

    /// Rewrites bytes of the first batch in `batch` at `at` and recomputes its CRC.
    fn patch(batch: &mut BytesMut, at: usize, bytes: &[u8]) {
        batch[at..at + bytes.len()].copy_from_slice(bytes);
        let end = LENGTH_PREFIX + usize::try_from(be_i32(batch, 8)).expect("a length");
        let crc = crc32c::crc32c(&batch[ATTRIBUTES_AT..end]);
        batch[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
    }

    /// Found by the fuzzer (consumer_fetch): a base offset of i64::MIN with a negative last
    /// offset delta overflowed computing the batch's last offset and killed the process. A
    /// base offset no broker can hand out (negative, or so close to i64::MAX that its records'
    /// offsets overflow) is a decode error after the good batches.
    #[test]
    fn a_batch_whose_offsets_overflow_is_an_error_not_a_panic() {
        for compression in [Compression::None, Compression::Zstd] {
            for (base, last_delta) in [(i64::MIN, -2), (-1, 0), (i64::MAX, 0), (i64::MAX - 1, 5)] {
                let mut data = batch(&[record(0, "a", -1, false)], compression);
                let mut bad = batch(&[record(1, "b", -1, false)], compression);
                bad[..8].copy_from_slice(&base.to_be_bytes());
                patch(
                    &mut bad,
                    LAST_OFFSET_DELTA_AT,
                    &i32::to_be_bytes(last_delta),
                );
                data.extend_from_slice(&bad);
                let (out, error) = decode(&topic(), 0, 0, data.freeze(), None);
                assert_eq!(out.records.len(), 1, "{compression:?} {base}");
                let error = error.expect("an error for the batch");
                assert!(error.reason.contains("offset"), "{}", error.reason);
            }
        }
    }

    /// A record's timestamp is the batch's first timestamp plus its delta, both from the
    /// broker's bytes: a sum past i64::MAX wraps, as in the Java consumer (it overflowed and
    /// panicked in kafka-protocol's decoder).
    #[test]
    fn a_timestamp_past_the_end_of_i64_wraps_not_panics() {
        for compression in [Compression::None, Compression::Zstd] {
            let mut early = record(0, "a", -1, false);
            early.timestamp = 0;
            let mut late = record(1, "b", -1, false);
            late.timestamp = i64::MAX;
            let mut data = batch(&[early, late], compression);
            patch(&mut data, FIRST_TIMESTAMP_AT, &1i64.to_be_bytes());
            assert_one_batch(&data);
            let (out, error) = decode(&topic(), 0, 0, data.freeze(), None);
            assert_eq!(error, None, "{compression:?}");
            assert_eq!(
                out.records.iter().map(|r| r.timestamp).collect::<Vec<_>>(),
                vec![1, i64::MIN],
                "{compression:?}"
            );
        }
    }

    /// Kafka's log cleaner drops records from a batch and keeps its base offset and last
    /// offset delta, so the offset deltas left have gaps, compressed batches included. The
    /// Java consumer reads them; a compacted compressed batch was refused here ("record 1 of 3
    /// has offset delta 2").
    #[test]
    fn a_compacted_batch_with_gaps_in_its_offsets_is_read() {
        for compression in EVERY_CODEC {
            let data = batch(
                &[
                    record(10, "a", -1, false),
                    record(12, "b", -1, false),
                    record(15, "c", -1, false),
                ],
                compression,
            );
            assert_one_batch(&data);
            let (out, error) = decode(&topic(), 0, 11, data.freeze(), None);
            assert_eq!(error, None, "{compression:?}");
            assert_eq!(
                out.records.iter().map(|r| r.offset).collect::<Vec<_>>(),
                vec![12, 15],
                "{compression:?}"
            );
            assert_eq!(out.next_offset, 16, "{compression:?}");
        }
    }

    /// Offset deltas that go backwards (or past the last offset delta) are not a batch any
    /// broker writes: an error, not records handed out of order.
    #[test]
    fn offset_deltas_out_of_order_are_an_error() {
        for compression in [Compression::None, Compression::Zstd] {
            let mut data = batch(
                &[record(0, "a", -1, false), record(1, "b", -1, false)],
                compression,
            );
            patch(&mut data, LAST_OFFSET_DELTA_AT, &0i32.to_be_bytes());
            let (out, error) = decode(&topic(), 0, 0, data.freeze(), None);
            assert!(out.records.is_empty(), "{compression:?}");
            let error = error.expect("an error for the batch");
            assert!(error.reason.contains("offset delta"), "{}", error.reason);
        }
    }

    #[test]
    fn a_bad_crc_is_an_error_after_the_good_batches() {
        let mut data = batch(&[record(0, "a", -1, false)], Compression::None);
        let mut bad = batch(&[record(1, "b", -1, false)], Compression::None);
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        data.extend_from_slice(&bad);
        let (out, error) = decode(&topic(), 0, 0, data.freeze(), None);
        assert_eq!(out.records.len(), 1);
        let error = error.expect("crc error");
        assert_eq!(error.offset, 1);
        assert_eq!(error.before, 1);
        assert!(error.reason.contains("CRC mismatch"), "{}", error.reason);
    }

    #[test]
    fn read_committed_drops_aborted_transactions_and_control_batches() {
        let mut data = batch(
            &[record(0, "aborted", 7, true), record(1, "aborted", 7, true)],
            Compression::None,
        );
        data.extend_from_slice(&batch(&[record(2, "plain", -1, false)], Compression::None));
        // The ABORT marker for producer 7.
        let mut marker = record(3, "", 7, true);
        marker.control = true;
        marker.key = Some(Bytes::from_static(&[0, 0, 0, 0]));
        marker.headers.clear();
        data.extend_from_slice(&batch(&[marker], Compression::None));
        data.extend_from_slice(&batch(
            &[record(4, "committed", 7, true)],
            Compression::None,
        ));
        let aborted = [AbortedTransaction {
            producer_id: 7,
            first_offset: 0,
        }];
        let data = data.freeze();
        let (out, error) = decode(&topic(), 0, 0, data.clone(), Some(&aborted));
        assert_eq!(error, None);
        assert_eq!(
            out.records.iter().map(|r| r.offset).collect::<Vec<_>>(),
            vec![2, 4]
        );
        assert_eq!(out.next_offset, 5);
        // read_uncommitted returns everything but the marker.
        let (out, _) = decode(&topic(), 0, 0, data, None);
        assert_eq!(
            out.records.iter().map(|r| r.offset).collect::<Vec<_>>(),
            vec![0, 1, 2, 4]
        );
    }

    /// A zstd batch of one record whose value is `value_mib` MiB of zeros, built by hand from
    /// RLE blocks: a few kilobytes on the wire, that many MiB decompressed.
    fn zstd_bomb(value_mib: usize) -> Bytes {
        fn zigzag(value: i64) -> Vec<u8> {
            let mut v = ((value << 1) ^ (value >> 63)) as u64;
            let mut out = Vec::new();
            while v >= 0x80 {
                out.push((v as u8) | 0x80);
                v >>= 7;
            }
            out.push(v as u8);
            out
        }
        let value_len = (value_mib << 20) as i64;
        let mut body = vec![0u8, 0, 0]; // attributes, timestamp delta, offset delta
        body.extend(zigzag(-1)); // null key
        body.extend(zigzag(value_len));
        let mut prefix = zigzag(body.len() as i64 + value_len + 1);
        prefix.extend(body);
        let block_header = |size: usize, kind: u32, last: bool| {
            let word = (size as u32) << 3 | kind << 1 | u32::from(last);
            word.to_le_bytes()[..3].to_vec()
        };
        let mut frame = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, 7 << 3]; // magic, no flags, 128 KiB window
        frame.extend(block_header(prefix.len(), 0, false)); // raw block
        frame.extend(&prefix);
        for _ in 0..(value_len as usize) / (128 << 10) {
            frame.extend(block_header(128 << 10, 1, false)); // RLE block of 128 KiB
            frame.push(0);
        }
        frame.extend(block_header(1, 0, true)); // raw: no headers
        frame.push(0);
        // The batch around it: one record, zstd, CRC over everything after the CRC field.
        let mut batch = vec![0u8; 61];
        batch[8..12].copy_from_slice(&((49 + frame.len()) as i32).to_be_bytes());
        batch[16] = 2; // magic
        batch[21..23].copy_from_slice(&4i16.to_be_bytes()); // zstd
        batch[43..51].copy_from_slice(&(-1i64).to_be_bytes()); // no producer id
        batch[51..53].copy_from_slice(&(-1i16).to_be_bytes());
        batch[53..57].copy_from_slice(&(-1i32).to_be_bytes());
        batch[57..61].copy_from_slice(&1i32.to_be_bytes());
        batch.extend(frame);
        let crc = crc32c::crc32c(&batch[21..]);
        batch[17..21].copy_from_slice(&crc.to_be_bytes());
        Bytes::from(batch)
    }

    /// A broker (hostile or broken) must not make the consumer allocate without bound: a
    /// compressed batch that decompresses to more than 256 MiB is a decode error, found
    /// without decompressing it all.
    #[test]
    fn a_batch_that_decompresses_past_the_bound_is_an_error_not_an_allocation() {
        let small = zstd_bomb(1);
        assert!(small.len() < 4096, "{}", small.len());
        let (out, error) = decode(&topic(), 0, 0, small, None);
        assert!(error.is_none(), "{error:?}");
        assert_eq!(
            out.records[0].value.as_ref().map(|v| v.len()),
            Some(1 << 20)
        );

        let bomb = zstd_bomb(300);
        assert!(bomb.len() < 20_000, "{}", bomb.len());
        let (out, error) = decode(&topic(), 0, 0, bomb, None);
        assert!(out.records.is_empty());
        let error = error.expect("a decode error");
        assert!(error.reason.contains("more than"), "{}", error.reason);
    }
}
