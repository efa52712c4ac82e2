//! RecordBatch v2 headers: parsing, validation of what a producer sent, and the fields the
//! broker assigns (base offset, partition leader epoch, and under `LogAppendTime` the max
//! timestamp, which is covered by the CRC and so requires recomputing it).
//!
//! Layout (big-endian): baseOffset i64 @0, batchLength i32 @8, partitionLeaderEpoch i32 @12,
//! magic i8 @16, crc u32 @17 (CRC-32C of bytes 21..end), attributes i16 @21, lastOffsetDelta
//! i32 @23, baseTimestamp i64 @27, maxTimestamp i64 @35, producerId i64 @43, producerEpoch i16
//! @51, baseSequence i32 @53, recordsCount i32 @57, records @61.
//!
//! References: Kafka protocol guide "Record Batch"; KIP-98; KIP-32 (timestamps).

use bytes::Bytes;

use super::LogError;

/// Bytes before the records.
pub const HEADER_BYTES: usize = 61;
/// `baseOffset` and `batchLength`: the part of the header outside `batchLength`.
pub const LOG_OVERHEAD: usize = 12;
const CRC_START: usize = 21;
const ATTRIBUTE_TIMESTAMP_TYPE: i16 = 1 << 3;
const ATTRIBUTE_TRANSACTIONAL: i16 = 1 << 4;
const ATTRIBUTE_CONTROL: i16 = 1 << 5;

fn i16_at(bytes: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([bytes[at], bytes[at + 1]])
}
fn i32_at(bytes: &[u8], at: usize) -> i32 {
    i32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}
fn i64_at(bytes: &[u8], at: usize) -> i64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    i64::from_be_bytes(b)
}

/// A parsed RecordBatch v2 header. Only constructed over at least [`HEADER_BYTES`] bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// Offset of the first record.
    pub base_offset: i64,
    /// Bytes after the `batchLength` field.
    pub batch_length: i32,
    /// Magic (format version); 2 for RecordBatch v2.
    pub magic: i8,
    /// Stored CRC-32C.
    pub crc: u32,
    /// Attribute bits (compression, timestamp type, transactional, control).
    pub attributes: i16,
    /// Offset of the last record minus the base offset.
    pub last_offset_delta: i32,
    /// Timestamp of the first record.
    pub base_timestamp: i64,
    /// Largest timestamp in the batch (or the append time under LogAppendTime).
    pub max_timestamp: i64,
    /// Producer id, -1 if none.
    pub producer_id: i64,
    /// Producer epoch, -1 if none.
    pub producer_epoch: i16,
    /// Sequence of the first record, -1 if none.
    pub base_sequence: i32,
    /// Number of records.
    pub records_count: i32,
}

impl BatchHeader {
    /// Parses the header at the start of `bytes`; `None` if fewer than [`HEADER_BYTES`] bytes.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < HEADER_BYTES {
            return None;
        }
        Some(Self {
            base_offset: i64_at(bytes, 0),
            batch_length: i32_at(bytes, 8),
            magic: i8::from_be_bytes([bytes[16]]),
            crc: u32::from_be_bytes([bytes[17], bytes[18], bytes[19], bytes[20]]),
            attributes: i16_at(bytes, 21),
            last_offset_delta: i32_at(bytes, 23),
            base_timestamp: i64_at(bytes, 27),
            max_timestamp: i64_at(bytes, 35),
            producer_id: i64_at(bytes, 43),
            producer_epoch: i16_at(bytes, 51),
            base_sequence: i32_at(bytes, 53),
            records_count: i32_at(bytes, 57),
        })
    }

    /// Total size of the batch in bytes, if `batch_length` is not negative.
    pub fn total_size(&self) -> Option<usize> {
        usize::try_from(self.batch_length)
            .ok()
            .map(|l| l + LOG_OVERHEAD)
    }

    /// Offset of the last record. Saturates: the base offset is not covered by the CRC, so a
    /// damaged one near i64::MAX must not overflow (the recovery scan then refuses it).
    pub fn last_offset(&self) -> i64 {
        self.base_offset
            .saturating_add(i64::from(self.last_offset_delta))
    }

    /// Compression codec id (0 none, 1 gzip, 2 snappy, 3 lz4, 4 zstd).
    pub fn compression(&self) -> i16 {
        self.attributes & 0x07
    }

    /// Whether the batch belongs to a transaction.
    pub fn is_transactional(&self) -> bool {
        self.attributes & ATTRIBUTE_TRANSACTIONAL != 0
    }

    /// Whether the batch is a control batch (transaction marker).
    pub fn is_control(&self) -> bool {
        self.attributes & ATTRIBUTE_CONTROL != 0
    }

    /// Whether the batch carries a producer id (idempotent or transactional producer).
    pub fn has_producer_id(&self) -> bool {
        self.producer_id >= 0
    }

    /// Whether the stored timestamps are the broker's (LogAppendTime); `max_timestamp` is then
    /// the append time.
    pub fn is_log_append_time(&self) -> bool {
        self.attributes & ATTRIBUTE_TIMESTAMP_TYPE != 0
    }
}

/// CRC-32C over the CRC-covered part of a whole batch.
pub(super) fn compute_crc(batch: &[u8]) -> u32 {
    crc32c::crc32c(&batch[CRC_START..])
}

/// Checks one stored or incoming batch at the start of `bytes`: complete, magic 2, CRC valid.
/// Returns its header. Used by recovery and by produce validation.
///
/// # Errors
/// `CorruptMessage` for a truncated batch, a nonsensical length or a CRC mismatch;
/// `InvalidRecord` for a magic other than 2.
pub fn check_batch(bytes: &[u8]) -> Result<BatchHeader, LogError> {
    let header = BatchHeader::parse(bytes).ok_or_else(|| LogError::CorruptBatch {
        reason: format!(
            "{} bytes is shorter than a record batch header ({HEADER_BYTES})",
            bytes.len()
        ),
    })?;
    let total = header
        .total_size()
        .filter(|t| *t >= HEADER_BYTES)
        .ok_or_else(|| LogError::CorruptBatch {
            reason: format!("batch length {} is invalid", header.batch_length),
        })?;
    if bytes.len() < total {
        return Err(LogError::CorruptBatch {
            reason: format!(
                "batch claims {total} bytes but only {} are present",
                bytes.len()
            ),
        });
    }
    if header.magic != 2 {
        return Err(LogError::InvalidRecord {
            reason: format!(
                "record batch magic {} is not supported; only magic 2 (RecordBatch v2)",
                header.magic
            ),
        });
    }
    let computed = compute_crc(&bytes[..total]);
    if computed != header.crc {
        return Err(LogError::CorruptBatch {
            reason: format!(
                "CRC-32C mismatch: stored {:#010x}, computed {computed:#010x}",
                header.crc
            ),
        });
    }
    Ok(header)
}

/// A producer's batch that passed validation, ready to append.
#[derive(Debug, Clone)]
pub struct ValidatedBatch {
    bytes: Bytes,
    header: BatchHeader,
    /// Its records' message ids, when they were read during validation.
    ids: Option<super::records::BatchRecords>,
}

impl ValidatedBatch {
    /// A batch built by the broker (the dedup window's rewrite, a transaction marker);
    /// `header` must describe `bytes`.
    pub(super) fn rebuilt(bytes: Bytes, header: BatchHeader) -> Self {
        Self {
            bytes,
            header,
            ids: None,
        }
    }

    /// The records' message ids, if validation read them (for a topic with a dedup window).
    pub(crate) fn ids(&self) -> Option<&super::records::BatchRecords> {
        self.ids.as_ref()
    }

    /// The batch's header as sent.
    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// The batch's bytes as sent.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Number of records.
    pub fn records_count(&self) -> i32 {
        self.header.records_count
    }
}

/// Validates the `records` of one partition in a Produce request: exactly one RecordBatch v2,
/// complete, CRC-valid, with consistent counts and within `max_message_bytes`.
///
/// # Errors
/// `CorruptMessage` (truncated, bad length, CRC), `InvalidRecord` (magic, counts, more than
/// one batch, empty), `MessageTooLarge`.
pub fn validate_produce_records(
    records: &[u8],
    max_message_bytes: u32,
) -> Result<ValidatedBatch, LogError> {
    validate_produce_records_with(&Bytes::copy_from_slice(records), max_message_bytes, None)
}

/// [`validate_produce_records`]; with `dedup_header` (the topic has a message-id dedup
/// window) a batch outside a transaction also has its records' ids read, in the same walk
/// that checks them.
///
/// # Errors
/// As [`validate_produce_records`].
///
/// The batch keeps `records` (a slice of the request's frame, not a copy).
pub(crate) fn validate_produce_records_with(
    records: &Bytes,
    max_message_bytes: u32,
    dedup_header: Option<&str>,
) -> Result<ValidatedBatch, LogError> {
    if records.is_empty() {
        return Err(LogError::InvalidRecord {
            reason: "the produce request holds no record batch".into(),
        });
    }
    let header = check_batch(records)?;
    let total = header.total_size().unwrap_or(0);
    if records.len() > total {
        return Err(LogError::InvalidRecord {
            reason: format!(
                "a produce request must hold exactly one record batch per partition; {} bytes follow the first",
                records.len() - total
            ),
        });
    }
    if usize::try_from(max_message_bytes).is_ok_and(|max| total > max) {
        return Err(LogError::MessageTooLarge {
            size: total,
            max: max_message_bytes,
        });
    }
    if header.last_offset_delta < 0
        || header.records_count != header.last_offset_delta.saturating_add(1)
    {
        return Err(LogError::InvalidRecord {
            reason: format!(
                "records count {} does not match last offset delta {}",
                header.records_count, header.last_offset_delta
            ),
        });
    }
    if header.is_control() {
        return Err(LogError::InvalidRecord {
            reason: "producers may not send control batches".into(),
        });
    }
    let payload = &records[HEADER_BYTES..total];
    let ids = match dedup_header {
        Some(name) if !header.is_transactional() => {
            Some(super::records::read_produced_ids(&header, payload, name)?)
        }
        _ => {
            check_records(payload, &header)?;
            None
        }
    };
    Ok(ValidatedBatch {
        bytes: records.clone(),
        header,
        ids,
    })
}

/// The fewest bytes one record takes: length, attributes, timestamp delta, offset delta, key
/// length, value length and header count, one byte each at the least.
pub const MIN_RECORD_BYTES: usize = 7;

/// The most records a compressed batch of `payload` bytes may claim: generous for real data
/// (a thousand records per compressed byte), and never more than a few million, so nobody
/// decoding it allocates from a count the bytes cannot back.
pub fn max_compressed_records(payload: usize) -> usize {
    payload.saturating_mul(1024).max(1 << 20)
}

/// Checks the records inside a batch against its header, without allocating from any count
/// in it. Uncompressed: walks every record's framing (length, then attributes, timestamp
/// delta and offset delta as varints); there must be exactly `records_count` of them, the
/// n-th with offset delta n, filling the batch to its last byte. Compressed: the count must be
/// one the compressed bytes could hold ([`max_compressed_records`]), then the records are
/// decompressed a piece at a time and walked the same way (bounded: see `semel-records`).
///
/// # Errors
/// `InvalidRecord`, saying what does not match.
pub fn check_records(payload: &[u8], header: &BatchHeader) -> Result<(), LogError> {
    let invalid = |reason: String| LogError::InvalidRecord { reason };
    let count = usize::try_from(header.records_count)
        .map_err(|_| invalid(format!("negative records count {}", header.records_count)))?;
    if header.compression() != 0 {
        let most = max_compressed_records(payload.len());
        if count > most {
            return Err(invalid(format!(
                "a compressed batch of {} bytes cannot hold {count} records (at most {most})",
                payload.len()
            )));
        }
        return semel_records::check_compressed_records(payload, header.compression(), count)
            .map_err(|e| invalid(e.0));
    }
    if count.saturating_mul(MIN_RECORD_BYTES) > payload.len() {
        return Err(invalid(format!(
            "{count} records cannot fit in {} bytes",
            payload.len()
        )));
    }
    let mut at = 0usize;
    for index in 0..count {
        let malformed = || invalid(format!("record {index} of {count} is malformed"));
        let length = semel_records::varint_at(payload, &mut at)
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
        semel_records::varint_at(record, &mut cursor).ok_or_else(malformed)?; // timestamp delta
        let offset_delta = semel_records::varint_at(record, &mut cursor).ok_or_else(malformed)?;
        if usize::try_from(offset_delta).ok() != Some(index) {
            return Err(invalid(format!(
                "record {index} of {count} has offset delta {offset_delta}"
            )));
        }
        at = end;
    }
    if at != payload.len() {
        return Err(invalid(format!(
            "{} bytes follow the {count} records of the batch",
            payload.len() - at
        )));
    }
    Ok(())
}

/// The header to store for `batch` (its records follow unchanged): base offset and leader
/// epoch assigned, and under LogAppendTime the timestamp type bit and max timestamp set, with
/// the CRC recomputed. Only the header is copied, never the records.
pub(crate) fn assign(
    batch: &ValidatedBatch,
    base_offset: i64,
    log_append_time_ms: Option<i64>,
) -> [u8; HEADER_BYTES] {
    // Validation checked the batch is at least a header long.
    let mut head = [0u8; HEADER_BYTES];
    head.copy_from_slice(&batch.bytes[..HEADER_BYTES]);
    head[0..8].copy_from_slice(&base_offset.to_be_bytes());
    head[12..16].copy_from_slice(&0i32.to_be_bytes());
    if let Some(now_ms) = log_append_time_ms {
        let attributes = batch.header.attributes | ATTRIBUTE_TIMESTAMP_TYPE;
        head[21..23].copy_from_slice(&attributes.to_be_bytes());
        head[35..43].copy_from_slice(&now_ms.to_be_bytes());
        // The CRC covers the header from the attributes on, then the records as sent.
        let crc = crc32c::crc32c_append(
            crc32c::crc32c(&head[CRC_START..]),
            &batch.bytes[HEADER_BYTES..],
        );
        head[17..21].copy_from_slice(&crc.to_be_bytes());
    }
    head
}

/// For an uncompressed batch, each record's (offset delta, timestamp), walking the records'
/// varint framing. `None` if the batch is compressed or its records are malformed.
pub fn record_timestamps(batch: &[u8]) -> Option<Vec<(i32, i64)>> {
    let header = BatchHeader::parse(batch)?;
    if header.compression() != 0 {
        return None;
    }
    let total = header.total_size()?;
    let body = batch.get(HEADER_BYTES..total)?;
    let log_append = header.attributes & ATTRIBUTE_TIMESTAMP_TYPE != 0;
    let mut out = Vec::new();
    let mut at = 0usize;
    for _ in 0..header.records_count.max(0) {
        let length = usize::try_from(semel_records::varint_at(body, &mut at)?).ok()?;
        let start = at;
        let end = start.checked_add(length)?;
        if end > body.len() {
            return None;
        }
        let mut cursor = start + 1; // attributes
        let timestamp_delta = semel_records::varint_at(body, &mut cursor)?;
        let offset_delta = i32::try_from(semel_records::varint_at(body, &mut cursor)?).ok()?;
        let timestamp = if log_append {
            header.max_timestamp
        } else {
            header.base_timestamp.checked_add(timestamp_delta)?
        };
        out.push((offset_delta, timestamp));
        at = end;
    }
    Some(out)
}

/// What a transaction marker (a control batch's one record) says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlType {
    /// The producer's transaction on this partition was aborted (key type 0).
    Abort,
    /// It was committed (key type 1).
    Commit,
}

/// A transaction marker for `producer_id` at `producer_epoch`: a control batch (attributes
/// transactional and control, no sequence) holding one record whose key is
/// `[version i16 = 0][type i16]` and whose value is `[version i16 = 0][coordinator epoch i32]`,
/// as Kafka's `EndTransactionMarker` writes it.
pub fn control_batch(
    producer_id: i64,
    producer_epoch: i16,
    control: ControlType,
    coordinator_epoch: i32,
    timestamp_ms: i64,
) -> ValidatedBatch {
    let kind: i16 = match control {
        ControlType::Abort => 0,
        ControlType::Commit => 1,
    };
    let mut key = Vec::with_capacity(4);
    key.extend_from_slice(&0i16.to_be_bytes());
    key.extend_from_slice(&kind.to_be_bytes());
    let mut value = Vec::with_capacity(6);
    value.extend_from_slice(&0i16.to_be_bytes());
    value.extend_from_slice(&coordinator_epoch.to_be_bytes());
    // attributes, timestamp delta 0, offset delta 0, key, value, no headers; every varint
    // here is one byte (zig-zag of 4 is 8, of 6 is 12).
    let mut record = vec![0u8, 0, 0, 8];
    record.extend_from_slice(&key);
    record.push(12);
    record.extend_from_slice(&value);
    record.push(0);
    let record_length = u8::try_from(record.len() * 2).unwrap_or(0); // zig-zag, one byte
    let mut bytes = Vec::with_capacity(HEADER_BYTES + 1 + record.len());
    bytes.extend_from_slice(&0i64.to_be_bytes()); // base offset, assigned on append
    let batch_length = i32::try_from(HEADER_BYTES - LOG_OVERHEAD + 1 + record.len()).unwrap_or(0);
    bytes.extend_from_slice(&batch_length.to_be_bytes());
    bytes.extend_from_slice(&0i32.to_be_bytes()); // partition leader epoch
    bytes.push(2); // magic
    bytes.extend_from_slice(&0u32.to_be_bytes()); // crc, below
    let attributes = ATTRIBUTE_TRANSACTIONAL | ATTRIBUTE_CONTROL;
    bytes.extend_from_slice(&attributes.to_be_bytes());
    bytes.extend_from_slice(&0i32.to_be_bytes()); // last offset delta
    bytes.extend_from_slice(&timestamp_ms.to_be_bytes());
    bytes.extend_from_slice(&timestamp_ms.to_be_bytes());
    bytes.extend_from_slice(&producer_id.to_be_bytes());
    bytes.extend_from_slice(&producer_epoch.to_be_bytes());
    bytes.extend_from_slice(&(-1i32).to_be_bytes()); // base sequence
    bytes.extend_from_slice(&1i32.to_be_bytes()); // records count
    bytes.push(record_length);
    bytes.extend_from_slice(&record);
    let crc = compute_crc(&bytes);
    bytes[17..21].copy_from_slice(&crc.to_be_bytes());
    let header = BatchHeader::parse(&bytes).unwrap_or_else(|| unreachable!("61+ bytes"));
    ValidatedBatch::rebuilt(Bytes::from(bytes), header)
}

/// The marker type of a stored control batch, read from its first record's key. `None` when
/// `batch` is not a control batch or its record is malformed (or of a type other than commit
/// and abort, which Kafka reserves for other control records).
pub fn control_type(batch: &[u8]) -> Option<ControlType> {
    let header = BatchHeader::parse(batch)?;
    if !header.is_control() || header.compression() != 0 {
        return None;
    }
    let body = batch.get(HEADER_BYTES..header.total_size()?)?;
    let mut at = 0usize;
    let _length = semel_records::varint_at(body, &mut at)?;
    at += 1; // attributes
    let _timestamp_delta = semel_records::varint_at(body, &mut at)?;
    let _offset_delta = semel_records::varint_at(body, &mut at)?;
    let key_length = usize::try_from(semel_records::varint_at(body, &mut at)?).ok()?;
    if key_length < 4 {
        return None;
    }
    let key = body.get(at..at + 4)?;
    match i16::from_be_bytes([key[2], key[3]]) {
        0 => Some(ControlType::Abort),
        1 => Some(ControlType::Commit),
        _ => None,
    }
}
