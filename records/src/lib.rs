//! Reads the records of a compressed Kafka record batch without trusting anything in it: the
//! codec's stream is decompressed a piece at a time and the records are read from it, so
//! memory follows what the batch really holds, never what it claims, and the whole stream may
//! not decompress to more than [`MAX_DECOMPRESSED_BYTES`].
//!
//! - [`check_compressed_records`] walks the records' framing (the broker validates produced
//!   batches with it: count, offset deltas, nothing after the last record) and skips their
//!   contents.
//! - [`decode_compressed_records`] also returns each record's key, value and headers (the
//!   consumer decodes fetched batches with it); [`decode_records`] does the same for an
//!   uncompressed batch, without copying. Fetched batches may have gaps in their offset
//!   deltas (Kafka's log cleaner removes records and keeps the batch), so both take the rule
//!   the deltas must follow.
//! - Nothing read here is added to anything: offsets and timestamps are returned as deltas.
//!
//! Codecs, as Kafka numbers them in the batch attributes: 1 gzip, 2 snappy (the framing of
//! snappy-java, `\x82SNAPPY\0` then length-prefixed blocks, or one raw block without it, as
//! the Java client accepts), 3 lz4 (the LZ4 frame format), 4 zstd.
//!
//! References: Kafka's `DefaultRecordBatch` and `CompressionType`; snappy-java's
//! `SnappyInputStream` (the block framing); the LZ4 frame format.

use std::io::{self, Read};

use bytes::{Bytes, BytesMut};

mod headers;

pub use headers::{Headers, Iter as HeadersIter};

/// Why a batch's records cannot be read: a sentence for the error message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordsError(pub String);

impl std::fmt::Display for RecordsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RecordsError {}

/// One record as stored in a batch, before the batch's base offset and timestamp are added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRecord {
    /// Added to the batch's base timestamp.
    pub timestamp_delta: i64,
    /// Added to the batch's base offset.
    pub offset_delta: i32,
    /// The key, `None` for null.
    pub key: Option<Bytes>,
    /// The value, `None` for null.
    pub value: Option<Bytes>,
    /// Headers in order: name, and value (`None` for null).
    pub headers: Headers,
}

/// The most bytes a compressed batch may decompress to. Real batches are bounded by
/// `max.message.bytes` before compression (1 MiB by default) and compress a few times at
/// most; this leaves room for very compressible data without letting a small batch expand
/// into unbounded work.
pub const MAX_DECOMPRESSED_BYTES: u64 = 256 * 1024 * 1024;

/// Largest zstd window accepted (2^24 = 16 MiB). zstd would otherwise allocate whatever
/// window the frame declares, up to 128 MiB.
const ZSTD_WINDOW_LOG_MAX: u32 = 24;

/// Decompressed bytes read ahead at a time.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// Enough bytes for a record's attributes, timestamp delta and offset delta (1 + 10 + 10).
const RECORD_PREFIX_BYTES: usize = 21;

/// Checks that the compressed `payload` (the batch after its 61-byte header), compressed with
/// `codec` (the attributes' low three bits), holds exactly `count` records, the n-th with
/// offset delta n, and nothing after them. Record contents are skipped, not kept.
///
/// # Errors
/// What is wrong, as a sentence.
pub fn check_compressed_records(
    payload: &[u8],
    codec: i16,
    count: usize,
) -> Result<(), RecordsError> {
    read_within(payload, codec, count, MAX_DECOMPRESSED_BYTES, None)
}

/// How the offset deltas of a batch's records must run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetDeltas {
    /// 0, 1, 2, …: a batch as a producer writes it (the broker checks produced batches so).
    Consecutive,
    /// Increasing, none past `last` (the batch's last offset delta): a stored batch, which
    /// may have lost records to Kafka's log cleaner or to the dedup window, leaving gaps.
    Increasing {
        /// The batch's last offset delta.
        last: i32,
    },
}

impl OffsetDeltas {
    /// Whether `delta` may follow `previous` (-1 before the first record) as record `index`.
    fn allows(self, index: usize, previous: i64, delta: i64) -> bool {
        match self {
            Self::Consecutive => usize::try_from(delta).ok() == Some(index),
            Self::Increasing { last } => delta > previous && delta <= i64::from(last),
        }
    }
}

/// Like [`check_compressed_records`], and returns the records; their offset deltas run as
/// `deltas` says.
///
/// # Errors
/// What is wrong, as a sentence.
pub fn decode_compressed_records(
    payload: &[u8],
    codec: i16,
    count: usize,
    deltas: OffsetDeltas,
) -> Result<Vec<RawRecord>, RecordsError> {
    let mut records = Vec::new();
    read_within(
        payload,
        codec,
        count,
        MAX_DECOMPRESSED_BYTES,
        Some((&mut records, deltas)),
    )?;
    Ok(records)
}

/// The `count` records of an uncompressed batch (`payload`, the batch after its 61-byte
/// header), their keys, values and header values sharing `payload`'s memory. Their offset
/// deltas run as `deltas` says, and they fill the payload exactly.
///
/// # Errors
/// What is wrong, as a sentence.
pub fn decode_records(
    payload: &Bytes,
    count: usize,
    deltas: OffsetDeltas,
) -> Result<Vec<RawRecord>, RecordsError> {
    let malformed = |index: usize| RecordsError(format!("record {index} of {count} is malformed"));
    // Every record takes a byte at least, so the bytes bound what is reserved.
    let mut records = Vec::with_capacity(count.min(payload.len()));
    let mut at = 0usize;
    let mut previous = -1i64;
    for index in 0..count {
        let length = varint_at(payload, &mut at)
            .and_then(|l| usize::try_from(l).ok())
            .ok_or_else(|| malformed(index))?;
        let end = at
            .checked_add(length)
            .filter(|end| *end <= payload.len())
            .ok_or_else(|| {
                RecordsError(format!(
                    "record {index} of {count} claims {length} bytes past the end of the batch"
                ))
            })?;
        // Read in place: the fields are slices of `payload` (no count taken on it for the
        // record as a whole).
        let record = &payload[..end];
        if at == end {
            return Err(malformed(index));
        }
        let mut cursor = at + 1; // attributes
        let timestamp_delta = varint_at(record, &mut cursor).ok_or_else(|| malformed(index))?;
        let offset_delta = varint_at(record, &mut cursor).ok_or_else(|| malformed(index))?;
        if !deltas.allows(index, previous, offset_delta) {
            return Err(RecordsError(format!(
                "record {index} of {count} has offset delta {offset_delta}"
            )));
        }
        previous = offset_delta;
        let key = bytes_at(payload, end, &mut cursor).ok_or_else(|| malformed(index))?;
        let value = bytes_at(payload, end, &mut cursor).ok_or_else(|| malformed(index))?;
        let header_count = varint_at(record, &mut cursor)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| malformed(index))?;
        let headers =
            Headers::read(payload, end, &mut cursor, header_count).map_err(|e| match e {
                headers::Malformed::NotUtf8 => RecordsError(format!(
                    "record {index} of {count} has a header name that is not UTF-8"
                )),
                headers::Malformed::Framing | headers::Malformed::NullName => malformed(index),
            })?;
        if cursor != end {
            return Err(RecordsError(format!(
                "record {index} of {count} has {} bytes after its headers",
                end - cursor
            )));
        }
        records.push(RawRecord {
            timestamp_delta,
            // allows() kept it within 0..=last or equal to an index below count.
            offset_delta: i32::try_from(offset_delta).map_err(|_| malformed(index))?,
            key,
            value,
            headers,
        });
        at = end;
    }
    if at != payload.len() {
        return Err(RecordsError(format!(
            "{} bytes follow the {count} records of the batch",
            payload.len() - at
        )));
    }
    Ok(records)
}

/// A varint length (-1 = null) at `*at` in `payload`, and that many bytes before `end` (the
/// record's end), sharing its memory; `None` when malformed. Advances `at`.
fn bytes_at(payload: &Bytes, end: usize, at: &mut usize) -> Option<Option<Bytes>> {
    let length = varint_at(&payload[..end], at)?;
    if length == -1 {
        return Some(None);
    }
    let length = usize::try_from(length).ok()?;
    let stop = at.checked_add(length).filter(|stop| *stop <= end)?;
    let bytes = payload.slice(*at..stop);
    *at = stop;
    Some(Some(bytes))
}

fn read_within(
    payload: &[u8],
    codec: i16,
    count: usize,
    limit: u64,
    keep: Option<(&mut Vec<RawRecord>, OffsetDeltas)>,
) -> Result<(), RecordsError> {
    let name = codec_name(codec);
    let invalid = |reason: String| RecordsError(reason);
    let decoder: Box<dyn Read + '_> = match codec {
        1 => Box::new(flate2::read::MultiGzDecoder::new(payload)),
        2 => Box::new(SnappyJavaReader::new(payload)),
        3 => Box::new(
            lz4::Decoder::new(payload)
                .map_err(|e| invalid(format!("cannot read the {name} batch: {e}")))?,
        ),
        4 => {
            let mut decoder = zstd::stream::read::Decoder::new(payload)
                .map_err(|e| invalid(format!("cannot read the {name} batch: {e}")))?;
            decoder
                .window_log_max(ZSTD_WINDOW_LOG_MAX)
                .map_err(|e| invalid(format!("cannot read the {name} batch: {e}")))?;
            Box::new(decoder)
        }
        other => return Err(invalid(format!("unknown compression codec {other}"))),
    };
    // Buffered, so the byte-at-a-time varint reads are served from memory instead of each
    // going down to the decompressor.
    let mut reader = io::BufReader::with_capacity(
        READ_BUFFER_BYTES,
        Limited {
            inner: decoder,
            left: limit,
        },
    );
    walk(&mut reader, count, keep).map_err(|e| match e {
        Walk::Record(reason) => invalid(format!("{name} batch: {reason}")),
        Walk::Io(e) if e.kind() == io::ErrorKind::FileTooLarge => invalid(format!(
            "the {name} batch decompresses to more than {limit} bytes"
        )),
        Walk::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => invalid(format!(
            "the {name} batch ends inside its records ({count} claimed)"
        )),
        Walk::Io(e) => invalid(format!("cannot decompress the {name} batch: {e}")),
    })
}

fn codec_name(codec: i16) -> &'static str {
    match codec {
        1 => "gzip",
        2 => "snappy",
        3 => "lz4",
        4 => "zstd",
        _ => "unknown",
    }
}

enum Walk {
    Record(String),
    Io(io::Error),
}

impl From<io::Error> for Walk {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

fn walk(
    reader: &mut impl Read,
    count: usize,
    mut keep: Option<(&mut Vec<RawRecord>, OffsetDeltas)>,
) -> Result<(), Walk> {
    let mut prefix = [0u8; RECORD_PREFIX_BYTES];
    let mut previous = -1i64;
    for index in 0..count {
        let length = read_varint(reader)?;
        let length = u64::try_from(length)
            .map_err(|_| Walk::Record(format!("record {index} of {count} has length {length}")))?;
        if let Some((records, deltas)) = keep.as_mut() {
            let mut record = reader.by_ref().take(length);
            let decoded = read_record(&mut record, index, count, *deltas, previous)?;
            previous = i64::from(decoded.offset_delta);
            if record.limit() != 0 {
                return Err(Walk::Record(format!(
                    "record {index} of {count} has {} bytes after its headers",
                    record.limit()
                )));
            }
            records.push(decoded);
            continue;
        }
        let head = usize::try_from(length)
            .unwrap_or(usize::MAX)
            .min(RECORD_PREFIX_BYTES);
        reader.read_exact(&mut prefix[..head])?;
        let malformed = || Walk::Record(format!("record {index} of {count} is malformed"));
        let mut at = 1; // attributes
        if head < 1 {
            return Err(malformed());
        }
        varint_at(&prefix[..head], &mut at).ok_or_else(malformed)?; // timestamp delta
        let offset_delta = varint_at(&prefix[..head], &mut at).ok_or_else(malformed)?;
        if usize::try_from(offset_delta).ok() != Some(index) {
            return Err(Walk::Record(format!(
                "record {index} of {count} has offset delta {offset_delta}"
            )));
        }
        let rest = length - head as u64;
        let skipped = io::copy(&mut reader.by_ref().take(rest), &mut io::sink())?;
        if skipped != rest {
            return Err(Walk::Io(io::ErrorKind::UnexpectedEof.into()));
        }
    }
    let mut extra = [0u8; 1];
    if reader.read(&mut extra)? != 0 {
        return Err(Walk::Record(format!(
            "bytes follow the {count} records of the batch"
        )));
    }
    Ok(())
}

/// One record's fields, from a reader limited to the record's length. Buffers grow with the
/// bytes that arrive, never from a length read off the stream.
fn read_record(
    record: &mut impl Read,
    index: usize,
    count: usize,
    deltas: OffsetDeltas,
    previous: i64,
) -> Result<RawRecord, Walk> {
    let mut attributes = [0u8; 1];
    record.read_exact(&mut attributes)?;
    let timestamp_delta = read_varint(record)?;
    let offset_delta = read_varint(record)?;
    if !deltas.allows(index, previous, offset_delta) {
        return Err(Walk::Record(format!(
            "record {index} of {count} has offset delta {offset_delta}"
        )));
    }
    let key = read_bytes(record)?;
    let value = read_bytes(record)?;
    let header_count = read_varint(record)?;
    let header_count = usize::try_from(header_count).map_err(|_| {
        Walk::Record(format!(
            "record {index} of {count} has {header_count} headers"
        ))
    })?;
    // Kept in wire form, as an uncompressed record's are (its lengths written anew).
    let mut wire = BytesMut::new();
    for _ in 0..header_count {
        let name = read_bytes(record)?.ok_or_else(|| {
            Walk::Record(format!(
                "record {index} of {count} has a header without a name"
            ))
        })?;
        if std::str::from_utf8(&name).is_err() {
            return Err(Walk::Record(format!(
                "record {index} of {count} has a header name that is not UTF-8"
            )));
        }
        headers::put_bytes(&mut wire, Some(&name));
        headers::put_bytes(&mut wire, read_bytes(record)?.as_deref());
    }
    let headers = Headers::from_wire(wire.freeze(), header_count);
    Ok(RawRecord {
        timestamp_delta,
        offset_delta: offset_delta as i32,
        key,
        value,
        headers,
    })
}

/// A varint length (-1 = null) and that many bytes.
fn read_bytes(reader: &mut impl Read) -> Result<Option<Bytes>, Walk> {
    let length = read_varint(reader)?;
    if length == -1 {
        return Ok(None);
    }
    let length = u64::try_from(length)
        .map_err(|_| Walk::Record(format!("a key, value or header has length {length}")))?;
    let mut bytes = Vec::new();
    let read = reader.by_ref().take(length).read_to_end(&mut bytes)?;
    if read as u64 != length {
        return Err(Walk::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(Some(Bytes::from(bytes)))
}

/// A zig-zag varint read from a stream.
fn read_varint(reader: &mut impl Read) -> Result<i64, Walk> {
    let mut value: u64 = 0;
    for shift in (0..64).step_by(7) {
        let mut byte = [0u8; 1];
        reader.read_exact(&mut byte)?;
        value |= u64::from(byte[0] & 0x7f) << shift;
        if byte[0] & 0x80 == 0 {
            return Ok(((value >> 1) as i64) ^ -((value & 1) as i64));
        }
    }
    Err(Walk::Record("a record length is not a valid varint".into()))
}

/// The zig-zag varint (a record's lengths and deltas) at `*at` in `bytes`; advances `at`.
/// `None` when the bytes end first or it is longer than 10 bytes.
///
/// Inlined for the one- and two-byte varints that make up nearly all of a record's fields
/// (values below 8192): the broker and the consumer read several per record.
#[inline]
pub fn varint_at(bytes: &[u8], at: &mut usize) -> Option<i64> {
    let unzigzag = |value: u64| ((value >> 1) as i64) ^ -((value & 1) as i64);
    let first = *bytes.get(*at)?;
    if first & 0x80 == 0 {
        *at += 1;
        return Some(unzigzag(u64::from(first)));
    }
    if let Some(&second) = bytes.get(*at + 1)
        && second & 0x80 == 0
    {
        *at += 2;
        return Some(unzigzag(u64::from(first & 0x7f) | (u64::from(second) << 7)));
    }
    varint_at_long(bytes, at)
}

/// [`varint_at`] for any length.
#[inline(never)]
fn varint_at_long(bytes: &[u8], at: &mut usize) -> Option<i64> {
    let mut value: u64 = 0;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(((value >> 1) as i64) ^ -((value & 1) as i64));
        }
    }
    None
}

/// A reader that fails with `FileTooLarge` once more than `left` bytes were asked of it.
struct Limited<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            // One more byte would be past the limit; an end of stream is still fine.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(io::ErrorKind::FileTooLarge.into()),
            };
        }
        let wanted = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let read = self.inner.read(&mut buf[..wanted])?;
        self.left -= read as u64;
        Ok(read)
    }
}

/// snappy-java's stream: a 16-byte header (`\x82SNAPPY\0`, version, compatible version),
/// then blocks of a big-endian u32 length and that many bytes of raw snappy. Without the
/// header the whole input is one raw snappy block.
struct SnappyJavaReader<'a> {
    input: &'a [u8],
    block: Vec<u8>,
    position: usize,
    raw_done: bool,
    framed: bool,
}

const SNAPPY_JAVA_MAGIC: &[u8; 8] = b"\x82SNAPPY\x00";
const SNAPPY_JAVA_HEADER_BYTES: usize = 16;
const SNAPPY_MAX_EXPANSION: usize = 32;

impl<'a> SnappyJavaReader<'a> {
    fn new(input: &'a [u8]) -> Self {
        let framed = input.starts_with(SNAPPY_JAVA_MAGIC);
        Self {
            input: if framed {
                input.get(SNAPPY_JAVA_HEADER_BYTES..).unwrap_or(&[])
            } else {
                input
            },
            block: Vec::new(),
            position: 0,
            raw_done: false,
            framed,
        }
    }

    /// Decompresses the next block into `self.block`; false at the end of the input.
    fn next_block(&mut self) -> io::Result<bool> {
        let compressed = if self.framed {
            let Some(length) = self.input.get(..4) else {
                if self.input.is_empty() {
                    return Ok(false);
                }
                return Err(io::ErrorKind::UnexpectedEof.into());
            };
            let length = u32::from_be_bytes([length[0], length[1], length[2], length[3]]) as usize;
            let block = self
                .input
                .get(4..4 + length)
                .ok_or(io::ErrorKind::UnexpectedEof)?;
            self.input = &self.input[4 + length..];
            block
        } else {
            if self.raw_done {
                return Ok(false);
            }
            self.raw_done = true;
            self.input
        };
        let size = snap::raw::decompress_len(compressed).map_err(io::Error::other)?;
        // Snappy expands at most about 21 times (a 3-byte copy of 64 bytes), so a block that
        // claims more is refused before its buffer is allocated.
        let possible = compressed
            .len()
            .saturating_mul(SNAPPY_MAX_EXPANSION)
            .saturating_add(64);
        if size > possible {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a snappy block of {} bytes claims {size}", compressed.len()),
            ));
        }
        if size as u64 > MAX_DECOMPRESSED_BYTES {
            return Err(io::ErrorKind::FileTooLarge.into());
        }
        self.block.clear();
        self.block.resize(size, 0);
        snap::raw::Decoder::new()
            .decompress(compressed, &mut self.block)
            .map_err(io::Error::other)?;
        self.position = 0;
        Ok(true)
    }
}

impl Read for SnappyJavaReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.position == self.block.len() {
            if !self.next_block()? {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.block.len() - self.position);
        buf[..n].copy_from_slice(&self.block[self.position..self.position + n]);
        self.position += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// `count` records with offset deltas 0.., each with a value of `value_bytes` bytes.
    fn records(count: usize, value_bytes: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..count {
            let mut record = vec![0u8]; // attributes
            record.push(0); // timestamp delta 0
            record.extend(zigzag(i as i64)); // offset delta
            record.extend(zigzag(-1)); // null key
            record.extend(zigzag(value_bytes as i64));
            record.extend(std::iter::repeat_n(b'v', value_bytes));
            record.push(0); // no headers
            out.extend(zigzag(record.len() as i64));
            out.extend(record);
        }
        out
    }

    /// A record's fields are read within the record's own length: a value, key or header
    /// that runs into the next record is malformed, not a read of that record's bytes.
    #[test]
    fn an_uncompressed_record_cannot_reach_into_the_next() {
        let good = records(2, 3);
        let decoded =
            decode_records(&Bytes::from(good.clone()), 2, OffsetDeltas::Consecutive).unwrap();
        assert_eq!(decoded.len(), 2);
        assert_eq!(decoded[1].value.as_deref(), Some(&b"vvv"[..]));
        assert!(decoded[1].headers.is_empty());
        // Record 0: 9 bytes = attributes, ts, delta, key -1, value length 3, "vvv", header
        // count. Its value length says 5: two bytes past its end, into record 1.
        let mut long_value = good.clone();
        assert_eq!(long_value[5], 6, "the value length of record 0");
        long_value[5] = 10;
        let error = decode_records(&Bytes::from(long_value), 2, OffsetDeltas::Consecutive);
        assert_eq!(
            error,
            Err(RecordsError("record 0 of 2 is malformed".to_string()))
        );
        // Its header count says 1: the header would be read from record 1.
        let mut header = good;
        assert_eq!(header[9], 0, "the header count of record 0");
        header[9] = 2;
        let error = decode_records(&Bytes::from(header), 2, OffsetDeltas::Consecutive);
        assert_eq!(
            error,
            Err(RecordsError("record 0 of 2 is malformed".to_string()))
        );
    }

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

    #[test]
    fn the_short_varint_paths_read_as_the_long_one_does() {
        let values = (-70_000i64..70_000).step_by(7).chain([
            i64::MIN,
            i64::MAX,
            -1,
            0,
            63,
            64,
            -64,
            -65,
            8191,
            8192,
            -8192,
            -8193,
        ]);
        for value in values {
            let encoded = zigzag(value);
            // After a prefix, at the end of the input and followed by more bytes.
            for tail in [&[][..], &[0x05, 0x80][..]] {
                let bytes: Vec<u8> = [&[0xAA][..], &encoded, tail].concat();
                let (mut short, mut long) = (1, 1);
                assert_eq!(varint_at(&bytes, &mut short), Some(value), "{value}");
                assert_eq!(varint_at_long(&bytes, &mut long), Some(value), "{value}");
                assert_eq!(short, 1 + encoded.len());
                assert_eq!(long, short);
            }
            // Cut short anywhere: none at all.
            for cut in 0..encoded.len() {
                assert_eq!(
                    varint_at(&encoded[..cut], &mut 0),
                    None,
                    "{value} cut at {cut}"
                );
            }
        }
        // Eleven continuation bytes: longer than any i64.
        assert_eq!(varint_at(&[0xFF; 11], &mut 0), None);
        assert_eq!(varint_at(&[0x80, 0x80], &mut 0), None);
        assert_eq!(varint_at(&[], &mut 0), None);
        assert_eq!(varint_at(&[0], &mut 1), None);
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    fn compress(codec: i16, bytes: &[u8]) -> Vec<u8> {
        match codec {
            1 => gzip(bytes),
            2 => {
                // snappy-java framing, two blocks.
                let mut out = b"\x82SNAPPY\x00\x00\x00\x00\x01\x00\x00\x00\x01".to_vec();
                let (a, b) = bytes.split_at(bytes.len() / 2);
                for part in [a, b] {
                    let block = snap::raw::Encoder::new().compress_vec(part).unwrap();
                    out.extend((block.len() as u32).to_be_bytes());
                    out.extend(block);
                }
                out
            }
            3 => {
                let mut encoder = lz4::EncoderBuilder::new().build(Vec::new()).unwrap();
                encoder.write_all(bytes).unwrap();
                let (out, result) = encoder.finish();
                result.unwrap();
                out
            }
            4 => zstd::stream::encode_all(bytes, 3).unwrap(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn every_codec_walks_a_good_batch_and_refuses_a_wrong_count() {
        let plain = records(50, 30);
        for codec in 1..=4 {
            let payload = compress(codec, &plain);
            check_compressed_records(&payload, codec, 50)
                .unwrap_or_else(|e| panic!("codec {codec}: {e}"));
            let decoded = decode_compressed_records(&payload, codec, 50, OffsetDeltas::Consecutive)
                .unwrap_or_else(|e| panic!("codec {codec}: {e}"));
            assert_eq!(decoded.len(), 50);
            assert_eq!(decoded[7].offset_delta, 7);
            assert_eq!(decoded[7].key, None);
            assert_eq!(decoded[7].value.as_deref(), Some(&[b'v'; 30][..]));
            for wrong in [49, 51, 1000] {
                assert!(check_compressed_records(&payload, codec, wrong).is_err());
                assert!(
                    decode_compressed_records(&payload, codec, wrong, OffsetDeltas::Consecutive)
                        .is_err()
                );
            }
        }
        // Raw snappy without snappy-java's header, as the Java client also reads.
        let raw = snap::raw::Encoder::new().compress_vec(&plain).unwrap();
        check_compressed_records(&raw, 2, 50).unwrap();
    }

    #[test]
    fn refuses_wrong_deltas_truncation_garbage_and_unknown_codecs() {
        let mut plain = records(3, 5);
        // Records 0, 1, 2 then a copy of record 0: four records, the last with delta 0.
        let first = records(1, 5);
        plain.extend(&first);
        let e = check_compressed_records(&gzip(&plain), 1, 4).unwrap_err();
        assert!(e.to_string().contains("offset delta 0"), "{e}");

        let plain = records(3, 5);
        let e = check_compressed_records(&gzip(&plain[..plain.len() - 2]), 1, 3).unwrap_err();
        assert!(e.to_string().contains("ends inside"), "{e}");

        let e = check_compressed_records(b"not gzip at all", 1, 3).unwrap_err();
        assert!(e.to_string().contains("gzip"), "{e}");
        let e = check_compressed_records(b"\x82SNAPPY\x00junk-junk", 2, 3).unwrap_err();
        assert!(e.to_string().contains("snappy"), "{e}");
        // A raw snappy block whose length header claims 200 MB.
        let mut lying = vec![0x80, 0xa8, 0xd6, 0xb9, 0x07];
        lying.extend([0u8; 10]);
        let e = check_compressed_records(&lying, 2, 3).unwrap_err();
        assert!(e.to_string().contains("claims"), "{e}");
        let e = check_compressed_records(&gzip(&plain), 5, 3).unwrap_err();
        assert!(e.to_string().contains("codec 5"), "{e}");
    }

    #[test]
    fn a_batch_that_decompresses_past_the_limit_is_refused_without_reading_it_all() {
        // One record whose value is 4 MiB of one byte: tiny compressed, large decompressed.
        let plain = records(1, 4 << 20);
        for codec in 1..=4 {
            let payload = compress(codec, &plain);
            assert!(payload.len() < 300 * 1024, "{codec}: {}", payload.len());
            for keep in [false, true] {
                let mut records = Vec::new();
                let e = read_within(
                    &payload,
                    codec,
                    1,
                    1 << 20,
                    keep.then_some((&mut records, OffsetDeltas::Consecutive)),
                )
                .unwrap_err();
                assert!(
                    e.to_string().contains("more than 1048576 bytes"),
                    "{codec}: {e}"
                );
                read_within(
                    &payload,
                    codec,
                    1,
                    8 << 20,
                    keep.then_some((&mut records, OffsetDeltas::Consecutive)),
                )
                .unwrap();
            }
        }
    }
}
