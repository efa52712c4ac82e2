//! Record batch v2 (magic 2) encoding of an uncompressed batch, written straight from the
//! queued records into one buffer of the right size: no intermediate record structs, no
//! reference-count traffic on keys and values, no buffer growth. Compressed batches go through
//! `kafka_protocol`'s encoder, which compresses the records section.
//!
//! Layout (Kafka's `DefaultRecordBatch`): base offset (8), batch length (4), partition leader
//! epoch (4), magic (1), CRC-32C of everything after it (4), attributes (2), last offset delta
//! (4), base timestamp (8), max timestamp (8), producer id (8), producer epoch (2), base
//! sequence (4), record count (4), then the records. A record: its length (varint), attributes
//! (1, zero), timestamp delta (varlong), offset delta (varint), key and value (varint length or
//! -1 for null, then the bytes), header count (varint) and each header's key and value the same
//! way. Varints are zigzag-encoded, as Kafka's `ByteUtils.writeVarint`.

use bytes::{BufMut, Bytes, BytesMut};

use crate::record::ProducerRecord;

const HEADER_BYTES: usize = 61;
const CRC_AT: usize = 17;
const ATTRIBUTES_AT: usize = 21;
const TRANSACTIONAL: i16 = 0x10;

/// The batch-level fields a producer sets.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchFields {
    /// -1 without idempotence (then epoch and base sequence are -1 too).
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub transactional: bool,
}

/// Encodes `records` (each with its create time in ms) as one uncompressed batch at base
/// offset 0 (the broker assigns offsets). `None` for no records or more than `i32::MAX`.
pub(crate) fn encode_uncompressed<'a, I>(records: I, fields: BatchFields) -> Option<Bytes>
where
    I: Iterator<Item = (&'a ProducerRecord, i64)> + Clone,
{
    let mut count = 0usize;
    let mut min_timestamp = i64::MAX;
    let mut max_timestamp = i64::MIN;
    for (_, timestamp) in records.clone() {
        count += 1;
        min_timestamp = min_timestamp.min(timestamp);
        max_timestamp = max_timestamp.max(timestamp);
    }
    let count_i32 = i32::try_from(count).ok().filter(|c| *c > 0)?;
    let mut size = HEADER_BYTES;
    for (delta, (record, timestamp)) in records.clone().enumerate() {
        let body = body_size(record, timestamp - min_timestamp, delta);
        size += varint_size(zigzag(i64::try_from(body).ok()?)) + body;
    }
    let batch_length = i32::try_from(size - 12).ok()?;
    let mut buf = BytesMut::with_capacity(size);
    buf.put_i64(0);
    buf.put_i32(batch_length);
    buf.put_i32(-1);
    buf.put_i8(2);
    buf.put_u32(0); // the CRC, filled in below
    buf.put_i16(if fields.transactional {
        TRANSACTIONAL
    } else {
        0
    });
    buf.put_i32(count_i32 - 1);
    buf.put_i64(min_timestamp);
    buf.put_i64(max_timestamp);
    buf.put_i64(fields.producer_id);
    buf.put_i16(fields.producer_epoch);
    buf.put_i32(fields.base_sequence);
    buf.put_i32(count_i32);
    for (delta, (record, timestamp)) in records.enumerate() {
        let timestamp_delta = timestamp - min_timestamp;
        let body = body_size(record, timestamp_delta, delta);
        put_varint(&mut buf, i64::try_from(body).ok()?);
        buf.put_i8(0);
        put_varint(&mut buf, timestamp_delta);
        put_varint(&mut buf, i64::try_from(delta).ok()?);
        put_bytes(&mut buf, record.key.as_deref());
        put_bytes(&mut buf, record.value.as_deref());
        put_varint(&mut buf, i64::try_from(record.headers.len()).ok()?);
        for (name, value) in &record.headers {
            put_bytes(&mut buf, Some(name.as_bytes()));
            put_bytes(&mut buf, value.as_deref());
        }
    }
    debug_assert_eq!(buf.len(), size);
    let crc = crc32c::crc32c(&buf[ATTRIBUTES_AT..]);
    buf[CRC_AT..ATTRIBUTES_AT].copy_from_slice(&crc.to_be_bytes());
    Some(buf.freeze())
}

/// The bytes of a record after its length varint.
fn body_size(record: &ProducerRecord, timestamp_delta: i64, offset_delta: usize) -> usize {
    let offset_delta = i64::try_from(offset_delta).unwrap_or(i64::MAX);
    let headers = i64::try_from(record.headers.len()).unwrap_or(i64::MAX);
    1 + varint_size(zigzag(timestamp_delta))
        + varint_size(zigzag(offset_delta))
        + bytes_size(record.key.as_deref())
        + bytes_size(record.value.as_deref())
        + varint_size(zigzag(headers))
        + record
            .headers
            .iter()
            .map(|(name, value)| bytes_size(Some(name.as_bytes())) + bytes_size(value.as_deref()))
            .sum::<usize>()
}

fn bytes_size(bytes: Option<&[u8]>) -> usize {
    match bytes {
        Some(b) => varint_size(zigzag(i64::try_from(b.len()).unwrap_or(i64::MAX))) + b.len(),
        None => 1,
    }
}

fn put_bytes(buf: &mut BytesMut, bytes: Option<&[u8]>) {
    match bytes {
        Some(b) => {
            put_varint(buf, i64::try_from(b.len()).unwrap_or(i64::MAX));
            buf.put_slice(b);
        }
        None => put_varint(buf, -1),
    }
}

fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)).cast_unsigned()
}

fn varint_size(mut zigzagged: u64) -> usize {
    let mut size = 1;
    while zigzagged >= 0x80 {
        zigzagged >>= 7;
        size += 1;
    }
    size
}

fn put_varint(buf: &mut BytesMut, value: i64) {
    let mut v = zigzag(value);
    while v >= 0x80 {
        buf.put_u8(u8::try_from(v & 0x7f).unwrap_or(0) | 0x80);
        v >>= 7;
    }
    buf.put_u8(u8::try_from(v).unwrap_or(0));
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::protocol::StrBytes;
    use kafka_protocol::records::{
        Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions,
        TimestampType,
    };

    /// What `kafka_protocol`'s encoder writes for the same records.
    fn reference(records: &[(ProducerRecord, i64)], fields: BatchFields) -> Bytes {
        let idempotent = fields.producer_id >= 0;
        let records: Vec<Record> = records
            .iter()
            .enumerate()
            .map(|(i, (record, timestamp))| {
                let i = i32::try_from(i).expect("index");
                Record {
                    transactional: fields.transactional,
                    control: false,
                    partition_leader_epoch: -1,
                    producer_id: fields.producer_id,
                    producer_epoch: fields.producer_epoch,
                    timestamp_type: TimestampType::Creation,
                    offset: i64::from(i),
                    sequence: if idempotent {
                        fields.base_sequence.wrapping_add(i)
                    } else {
                        i - 1
                    },
                    delete_horizon: false,
                    timestamp: *timestamp,
                    key: record.key.clone(),
                    value: record.value.clone(),
                    headers: record
                        .headers
                        .iter()
                        .map(|(k, v)| (StrBytes::from_string(k.clone()), v.clone()))
                        .collect(),
                }
            })
            .collect();
        let mut buf = BytesMut::new();
        RecordBatchEncoder::encode(
            &mut buf,
            &records,
            &RecordEncodeOptions {
                version: 2,
                compression: Compression::None,
            },
        )
        .expect("reference encode");
        buf.freeze()
    }

    fn sample() -> Vec<(ProducerRecord, i64)> {
        let big = Bytes::from(vec![7u8; 300]);
        vec![
            (ProducerRecord::new("t", "v0").key("k0"), 1_700_000_000_000),
            (
                ProducerRecord {
                    value: None,
                    ..ProducerRecord::new("t", "")
                },
                1_700_000_000_005,
            ),
            (
                ProducerRecord::new("t", big)
                    .key(Bytes::from(vec![1u8; 200]))
                    .header("semel-msg-id", "abc")
                    .header("empty", ""),
                1_700_000_000_003,
            ),
            (
                ProducerRecord {
                    headers: vec![("null-value".into(), None)],
                    ..ProducerRecord::new("t", "x")
                },
                1_699_999_999_000,
            ),
        ]
    }

    #[test]
    fn matches_the_reference_encoder_byte_for_byte() {
        let plain = BatchFields {
            producer_id: -1,
            producer_epoch: -1,
            base_sequence: -1,
            transactional: false,
        };
        let idempotent = BatchFields {
            producer_id: 4242,
            producer_epoch: 3,
            base_sequence: 17,
            transactional: false,
        };
        let transactional = BatchFields {
            transactional: true,
            ..idempotent
        };
        let records = sample();
        for fields in [plain, idempotent, transactional] {
            for n in 1..=records.len() {
                let ours = encode_uncompressed(records[..n].iter().map(|(r, t)| (r, *t)), fields)
                    .expect("encode");
                assert_eq!(
                    ours,
                    reference(&records[..n], fields),
                    "{fields:?}, {n} records"
                );
                // And it reads back.
                let mut bytes = ours.clone();
                let decoded = RecordBatchDecoder::decode(&mut bytes).expect("decode");
                assert_eq!(decoded.records.len(), n);
            }
        }
    }

    #[test]
    fn no_records_is_no_batch() {
        let fields = BatchFields {
            producer_id: -1,
            producer_epoch: -1,
            base_sequence: -1,
            transactional: false,
        };
        assert!(encode_uncompressed(std::iter::empty(), fields).is_none());
    }

    #[test]
    fn varints_are_zigzag_as_kafka_writes_them() {
        for (value, bytes) in [
            (0i64, vec![0u8]),
            (-1, vec![1]),
            (1, vec![2]),
            (63, vec![126]),
            (-64, vec![127]),
            (64, vec![128, 1]),
            (300, vec![216, 4]),
        ] {
            let mut buf = BytesMut::new();
            put_varint(&mut buf, value);
            assert_eq!(buf.to_vec(), bytes, "{value}");
            assert_eq!(varint_size(zigzag(value)), bytes.len());
        }
    }
}
