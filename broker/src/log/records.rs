//! The records inside one batch, as the message-id dedup window needs them
//! (docs/dedup-window.md): each record's offset delta, timestamp and message id (one header's
//! value, hashed), and the same batch rebuilt without some of its records.
//!
//! A rebuilt batch keeps everything an idempotent producer and a consumer rely on: its base
//! offset, its last offset delta (so the offsets it spans and the sequences it covers do not
//! change), its producer id, epoch and base sequence, and each kept record's own offset
//! delta. Only the records count, the length, the max timestamp and the CRC change, so a
//! consumer sees a gap in the offsets, as after compaction in Kafka. A compressed batch is
//! rebuilt uncompressed (the records are re-encoded; every client reads both).
//!
//! Stored batches may hold such gaps, so the walk here accepts any increasing offset deltas
//! within the last offset delta; a produced batch was checked to have none before it gets
//! here ([`super::batch::check_records`]).

use bytes::Bytes;
use semel_records::{OffsetDeltas, RawRecord, varint_at};

use super::LogError;
use super::batch::{BatchHeader, HEADER_BYTES, LOG_OVERHEAD, ValidatedBatch, compute_crc};

/// A message id: the 128-bit XXH3 of the header's value. Two different ids share one with a
/// probability of about n²/2¹²⁹ for n ids, far below any hardware error rate.
pub(crate) type MessageId = u128;

/// One record of a batch, as the dedup window sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecordId {
    /// Added to the batch's base offset.
    pub(crate) offset_delta: i32,
    /// The record's timestamp as it is (or will be) stored.
    pub(crate) timestamp: i64,
    /// The message id, if the record has the header with a non-null value.
    pub(crate) id: Option<MessageId>,
}

/// Where each record's bytes are, to rebuild the batch without some of them.
#[derive(Debug, Clone)]
enum Body {
    /// Uncompressed: the records are copied from the batch (found again by their lengths).
    Plain,
    /// Compressed: the decoded records, re-encoded when rebuilt.
    Decoded(Vec<RawRecord>),
}

/// The records of one batch.
#[derive(Debug, Clone)]
pub(crate) struct BatchRecords {
    /// The header the ids were read from.
    pub(crate) header: String,
    pub(crate) records: Vec<RecordId>,
    body: Body,
}

fn invalid(reason: String) -> LogError {
    LogError::InvalidRecord { reason }
}

/// Reads every record of the whole stored batch `batch` (header included): offset delta,
/// timestamp, and the value of the first header named `header_name`, hashed (no id when it is
/// null or empty). Offset deltas may leave gaps (a batch stored without some records).
///
/// # Errors
/// `InvalidRecord` when the records are malformed.
pub(crate) fn read_ids(batch: &[u8], header_name: &str) -> Result<BatchRecords, LogError> {
    let header = BatchHeader::parse(batch)
        .ok_or_else(|| invalid("a record batch shorter than its header".into()))?;
    let total = header
        .total_size()
        .filter(|t| *t >= HEADER_BYTES && *t <= batch.len())
        .ok_or_else(|| invalid(format!("batch length {} is invalid", header.batch_length)))?;
    walk(&header, &batch[HEADER_BYTES..total], header_name, false)
}

/// [`read_ids`] for a produced batch's records (`payload`, after the header), checked as
/// [`super::batch::check_records`] checks them: exactly `records_count` records, the n-th
/// with offset delta n, filling the payload; a compressed one bounded the same way. Produce
/// validation calls this instead of `check_records` when the topic has a dedup window, so the
/// records are walked once.
///
/// # Errors
/// `InvalidRecord`, saying what does not match.
pub(crate) fn read_produced_ids(
    header: &BatchHeader,
    payload: &[u8],
    header_name: &str,
) -> Result<BatchRecords, LogError> {
    walk(header, payload, header_name, true)
}

fn walk(
    header: &BatchHeader,
    payload: &[u8],
    header_name: &str,
    strict: bool,
) -> Result<BatchRecords, LogError> {
    let count = usize::try_from(header.records_count)
        .map_err(|_| invalid(format!("negative records count {}", header.records_count)))?;
    let timestamp_of = |delta: i64| {
        if header.is_log_append_time() {
            header.max_timestamp
        } else {
            header.base_timestamp.saturating_add(delta)
        }
    };
    let hash = xxhash_rust::xxh3::xxh3_128;
    if header.compression() != 0 {
        let most = super::batch::max_compressed_records(payload.len());
        if count > most {
            return Err(invalid(format!(
                "a compressed batch of {} bytes cannot hold {count} records (at most {most})",
                payload.len()
            )));
        }
        let decoded = semel_records::decode_compressed_records(
            payload,
            header.compression(),
            count,
            if strict {
                OffsetDeltas::Consecutive
            } else {
                OffsetDeltas::Increasing {
                    last: header.last_offset_delta,
                }
            },
        )
        .map_err(|e| invalid(e.0))?;
        let records = decoded
            .iter()
            .map(|r| RecordId {
                offset_delta: r.offset_delta,
                timestamp: timestamp_of(r.timestamp_delta),
                id: r
                    .headers
                    .iter()
                    .find(|(name, _)| *name == header_name)
                    .and_then(|(_, value)| value)
                    .filter(|value| !value.is_empty())
                    .map(hash),
            })
            .collect();
        return Ok(BatchRecords {
            header: header_name.to_string(),
            records,
            body: Body::Decoded(decoded),
        });
    }
    if count.saturating_mul(super::batch::MIN_RECORD_BYTES) > payload.len() {
        return Err(invalid(format!(
            "{count} records cannot fit in {} bytes",
            payload.len()
        )));
    }
    let mut records = Vec::with_capacity(count);
    let mut at = 0usize;
    let mut previous_delta = -1i64;
    for index in 0..count {
        let malformed = || invalid(format!("record {index} of {count} is malformed"));
        let length = varint_at(payload, &mut at)
            .and_then(|l| usize::try_from(l).ok())
            .ok_or_else(malformed)?;
        let end = at
            .checked_add(length)
            .filter(|end| *end <= payload.len())
            .ok_or_else(|| {
                invalid(format!(
                    "record {index} of {count} claims {length} bytes past the end of the batch"
                ))
            })?;
        let record = &payload[at..end];
        let mut cursor = 1; // attributes
        let timestamp_delta = varint_at(record, &mut cursor).ok_or_else(malformed)?;
        let offset_delta = varint_at(record, &mut cursor).ok_or_else(malformed)?;
        let in_order = if strict {
            usize::try_from(offset_delta).ok() == Some(index)
        } else {
            offset_delta > previous_delta && offset_delta <= i64::from(header.last_offset_delta)
        };
        if !in_order {
            return Err(invalid(format!(
                "record {index} of {count} has offset delta {offset_delta}"
            )));
        }
        previous_delta = offset_delta;
        skip_bytes(record, &mut cursor).ok_or_else(malformed)?; // key
        skip_bytes(record, &mut cursor).ok_or_else(malformed)?; // value
        let headers = varint_at(record, &mut cursor).ok_or_else(malformed)?;
        // The first header of the name decides (a null or empty value: no id), as the
        // consumer middleware and the compressed path read it.
        let mut id = None;
        let mut found = false;
        for _ in 0..headers.max(0) {
            let name = bytes_at(record, &mut cursor).ok_or_else(malformed)?;
            let value = bytes_at(record, &mut cursor).ok_or_else(malformed)?;
            if !found && name == Some(header_name.as_bytes()) {
                found = true;
                id = value.filter(|value| !value.is_empty()).map(hash);
            }
        }
        records.push(RecordId {
            offset_delta: offset_delta as i32,
            timestamp: timestamp_of(timestamp_delta),
            id,
        });
        at = end;
    }
    if strict && at != payload.len() {
        return Err(invalid(format!(
            "{} bytes follow the {count} records of the batch",
            payload.len() - at
        )));
    }
    Ok(BatchRecords {
        header: header_name.to_string(),
        records,
        body: Body::Plain,
    })
}

/// A varint length (-1 = null) and that many bytes, at `*at`.
fn bytes_at<'a>(bytes: &'a [u8], at: &mut usize) -> Option<Option<&'a [u8]>> {
    let length = varint_at(bytes, at)?;
    if length == -1 {
        return Some(None);
    }
    let length = usize::try_from(length).ok()?;
    let end = at.checked_add(length).filter(|end| *end <= bytes.len())?;
    let value = &bytes[*at..end];
    *at = end;
    Some(Some(value))
}

fn skip_bytes(bytes: &[u8], at: &mut usize) -> Option<()> {
    bytes_at(bytes, at).map(|_| ())
}

/// Appends `value` as a zig-zag varint.
pub(crate) fn put_varint(out: &mut Vec<u8>, value: i64) {
    let mut v = ((value << 1) ^ (value >> 63)) as u64;
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn put_bytes(out: &mut Vec<u8>, value: Option<&[u8]>) {
    match value {
        None => put_varint(out, -1),
        Some(v) => {
            put_varint(out, v.len() as i64);
            out.extend_from_slice(v);
        }
    }
}

/// One decoded record, encoded again (uncompressed), length prefix included.
fn encode(out: &mut Vec<u8>, record: &RawRecord) {
    let mut body = vec![0u8]; // attributes: unused in v2
    put_varint(&mut body, record.timestamp_delta);
    put_varint(&mut body, i64::from(record.offset_delta));
    put_bytes(&mut body, record.key.as_deref());
    put_bytes(&mut body, record.value.as_deref());
    put_varint(&mut body, record.headers.len() as i64);
    body.extend_from_slice(record.headers.wire());
    put_varint(out, body.len() as i64);
    out.extend_from_slice(&body);
}

/// `batch` without the records whose `keep` is false (at least one is kept): same base
/// offset, last offset delta, producer id, epoch and base sequence; uncompressed.
pub(crate) fn without(
    batch: &ValidatedBatch,
    records: &BatchRecords,
    keep: &[bool],
) -> ValidatedBatch {
    let header = *batch.header();
    let bytes = batch.bytes();
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&bytes[..HEADER_BYTES]);
    match &records.body {
        Body::Plain => {
            // The records as sent, each with its length prefix; the walk that read them
            // checked the lengths.
            let payload = &bytes[HEADER_BYTES..];
            let mut at = 0usize;
            for keep in keep {
                let start = at;
                let length = varint_at(payload, &mut at)
                    .and_then(|l| usize::try_from(l).ok())
                    .unwrap_or(0);
                at = at.saturating_add(length).min(payload.len());
                if *keep {
                    out.extend_from_slice(&payload[start..at]);
                }
            }
        }
        Body::Decoded(decoded) => {
            for (record, _) in decoded.iter().zip(keep).filter(|(_, k)| **k) {
                encode(&mut out, record);
            }
        }
    }
    let kept = keep.iter().filter(|k| **k).count();
    let mut rebuilt = header;
    rebuilt.batch_length = i32::try_from(out.len() - LOG_OVERHEAD).unwrap_or(i32::MAX);
    rebuilt.attributes = header.attributes & !0x07;
    rebuilt.records_count = i32::try_from(kept).unwrap_or(i32::MAX);
    if !header.is_log_append_time() {
        rebuilt.max_timestamp = records
            .records
            .iter()
            .zip(keep)
            .filter(|(_, k)| **k)
            .map(|(r, _)| r.timestamp)
            .max()
            .unwrap_or(header.max_timestamp);
    }
    out[8..12].copy_from_slice(&rebuilt.batch_length.to_be_bytes());
    out[21..23].copy_from_slice(&rebuilt.attributes.to_be_bytes());
    out[35..43].copy_from_slice(&rebuilt.max_timestamp.to_be_bytes());
    out[57..61].copy_from_slice(&rebuilt.records_count.to_be_bytes());
    rebuilt.crc = compute_crc(&out);
    out[17..21].copy_from_slice(&rebuilt.crc.to_be_bytes());
    ValidatedBatch::rebuilt(Bytes::from(out), rebuilt)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::log::batch::check_batch;
    use crate::log::validate_produce_records;

    /// A batch of one record per entry of `ids` (value `v<i>`, the id in a `semel-msg-id`
    /// header after an `other` header, or no header for `None`), timestamps `base + i`,
    /// compressed with gzip when `gzip`.
    pub(crate) fn batch_with_ids(ids: &[Option<&str>], base_timestamp: i64, gzip: bool) -> Vec<u8> {
        let headers: Vec<_> = ids
            .iter()
            .map(|id| {
                let mut headers = semel_records::Headers::new();
                headers.push("other", Some(b"x"));
                if let Some(id) = id {
                    headers.push("semel-msg-id", Some(id.as_bytes()));
                }
                headers
            })
            .collect();
        batch_with_headers(&headers, base_timestamp, gzip)
    }

    /// A batch of one record per entry of `headers` (value `v<i>`), timestamps `base + i`,
    /// compressed with gzip when `gzip`.
    fn batch_with_headers(
        headers: &[semel_records::Headers],
        base_timestamp: i64,
        gzip: bool,
    ) -> Vec<u8> {
        let mut records = Vec::new();
        for (i, headers) in headers.iter().enumerate() {
            let value = format!("v{i}");
            let headers = headers.clone();
            let record = RawRecord {
                timestamp_delta: i as i64,
                offset_delta: i as i32,
                key: None,
                value: Some(Bytes::from(value)),
                headers,
            };
            encode(&mut records, &record);
        }
        if gzip {
            use std::io::Write as _;
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            encoder.write_all(&records).expect("gzip");
            records = encoder.finish().expect("gzip");
        }
        let count = headers.len() as i32;
        let mut batch = Vec::new();
        batch.extend_from_slice(&0i64.to_be_bytes());
        batch.extend_from_slice(
            &((HEADER_BYTES - LOG_OVERHEAD + records.len()) as i32).to_be_bytes(),
        );
        batch.extend_from_slice(&0i32.to_be_bytes());
        batch.push(2);
        batch.extend_from_slice(&0u32.to_be_bytes());
        batch.extend_from_slice(&i16::from(gzip).to_be_bytes());
        batch.extend_from_slice(&(count - 1).to_be_bytes());
        batch.extend_from_slice(&base_timestamp.to_be_bytes());
        batch.extend_from_slice(&(base_timestamp + i64::from(count - 1)).to_be_bytes());
        batch.extend_from_slice(&(-1i64).to_be_bytes());
        batch.extend_from_slice(&(-1i16).to_be_bytes());
        batch.extend_from_slice(&(-1i32).to_be_bytes());
        batch.extend_from_slice(&count.to_be_bytes());
        batch.extend_from_slice(&records);
        let crc = compute_crc(&batch);
        batch[17..21].copy_from_slice(&crc.to_be_bytes());
        batch
    }

    fn id(text: &str) -> Option<MessageId> {
        Some(xxhash_rust::xxh3::xxh3_128(text.as_bytes()))
    }

    /// The id is the first header of that name, as the consumer middleware reads it: when
    /// its value is null the record has no id, whatever a later header of the same name
    /// says (the uncompressed walk took the later one; the compressed path did not); an
    /// empty value is no id either (records with one were all taken for one message).
    #[test]
    fn the_first_header_of_the_name_decides_even_when_null() {
        let headers: semel_records::Headers =
            [("semel-msg-id", None), ("semel-msg-id", Some("late"))]
                .into_iter()
                .collect();
        let with_id: semel_records::Headers = [("semel-msg-id", Some("a"))].into_iter().collect();
        // An empty id is no id (as the middleware reads it): two such records are not one
        // message sent twice.
        let empty: semel_records::Headers = [("semel-msg-id", Some(""))].into_iter().collect();
        for gzip in [false, true] {
            let bytes = super::super::tests::with_producer(
                batch_with_headers(
                    &[
                        headers.clone(),
                        with_id.clone(),
                        empty.clone(),
                        empty.clone(),
                    ],
                    1_000,
                    gzip,
                ),
                7,
                0,
                40,
            );
            let batch = validate_produce_records(&bytes, 1 << 20).expect("valid");
            let records = read_ids(batch.bytes(), "semel-msg-id").expect("read");
            let ids: Vec<_> = records.records.iter().map(|r| r.id).collect();
            assert_eq!(ids, vec![None, id("a"), None, None], "gzip: {gzip}");
        }
    }

    #[test]
    fn ids_are_read_and_a_rebuilt_batch_keeps_offsets_and_sequences() {
        for gzip in [false, true] {
            let bytes = super::super::tests::with_producer(
                batch_with_ids(&[Some("a"), None, Some("b"), Some("c")], 1_000, gzip),
                7,
                0,
                40,
            );
            let batch = validate_produce_records(&bytes, 1 << 20).expect("valid");
            let records = read_ids(batch.bytes(), "semel-msg-id").expect("read");
            let seen: Vec<_> = records
                .records
                .iter()
                .map(|r| (r.offset_delta, r.timestamp, r.id))
                .collect();
            assert_eq!(
                seen,
                vec![
                    (0, 1_000, id("a")),
                    (1, 1_001, None),
                    (2, 1_002, id("b")),
                    (3, 1_003, id("c")),
                ]
            );
            // Read while validating (the topic has a window): the same, in one walk.
            let produced = crate::log::batch::validate_produce_records_with(
                &bytes::Bytes::from(bytes.clone()),
                1 << 20,
                Some("semel-msg-id"),
            )
            .expect("valid");
            assert_eq!(
                produced.ids().map(|r| r.records.clone()),
                Some(records.records.clone())
            );

            let rebuilt = without(&batch, &records, &[false, true, true, false]);
            let header = check_batch(rebuilt.bytes()).expect("CRC and length are right");
            assert_eq!(header, *rebuilt.header());
            assert_eq!(header.compression(), 0, "rebuilt uncompressed");
            assert_eq!(header.records_count, 2);
            assert_eq!(
                header.last_offset_delta, 3,
                "the offsets it spans do not change"
            );
            assert_eq!(
                (
                    header.producer_id,
                    header.producer_epoch,
                    header.base_sequence
                ),
                (7, 0, 40)
            );
            assert_eq!(header.base_timestamp, 1_000);
            assert_eq!(header.max_timestamp, 1_002);
            let again = read_ids(rebuilt.bytes(), "semel-msg-id").expect("re-read");
            let kept: Vec<_> = again
                .records
                .iter()
                .map(|r| (r.offset_delta, r.timestamp, r.id))
                .collect();
            assert_eq!(kept, vec![(1, 1_001, None), (2, 1_002, id("b"))]);
        }
    }

    #[test]
    fn a_malformed_header_is_an_error_not_a_panic() {
        let mut bytes = batch_with_ids(&[Some("a"), Some("b")], 0, false);
        // The last header value's length (one byte before the value `b`): claim 16 bytes.
        let len = bytes.len();
        bytes[len - 2] = 0x20;
        let crc = compute_crc(&bytes);
        bytes[17..21].copy_from_slice(&crc.to_be_bytes());
        assert!(read_ids(&bytes, "semel-msg-id").is_err());
        assert!(read_ids(&bytes[..30], "semel-msg-id").is_err());
    }
}
