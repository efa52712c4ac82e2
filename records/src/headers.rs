//! A record's headers, kept as they are in the batch and read when asked.
//!
//! A fetched record's headers are a slice of the fetched batch: decoding a record costs no
//! allocation for them (a name as a `String` and a list to hold the pairs would cost two for
//! most records, and as much again to free them). Names are checked to be UTF-8 when the
//! record is decoded, so reading them later cannot fail.

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

use crate::varint_at;

/// A record's headers, in the order they were written: each a name (UTF-8) and a value
/// (`None` for null). Several headers may share a name.
///
/// Cheap to clone: the bytes are shared with the batch the record came from.
#[derive(Clone, Default)]
pub struct Headers {
    /// The headers in wire form, without the count: per header, a zig-zag varint length and
    /// the name's bytes, then a varint length (-1 for null) and the value's bytes.
    raw: Bytes,
    count: usize,
}

impl Headers {
    /// No headers.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// How many headers there are.
    #[must_use]
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there are none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The headers in order, as `(name, value)`.
    #[must_use]
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            raw: &self.raw,
            at: 0,
            left: self.count,
        }
    }

    /// The value of the first header called `name` (`None` when there is none, or its
    /// value is null).
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        // Names compared as bytes: no UTF-8 check on the way (it was made at decode).
        let raw: &[u8] = &self.raw;
        let mut at = 0;
        for _ in 0..self.count {
            let found = span_at(raw, &mut at)??;
            let value = span_at(raw, &mut at)?;
            if raw[found] == *name.as_bytes() {
                return value.map(|v| &raw[v]);
            }
        }
        None
    }

    /// Like [`Headers::get`], as a [`Bytes`] sharing the record's memory.
    #[must_use]
    pub fn get_bytes(&self, name: &str) -> Option<Bytes> {
        self.get(name).map(|v| self.raw.slice_ref(v))
    }

    /// Adds a header after the others. The bytes are extended in place when no one else holds
    /// them (headers built by pushes), so n pushes cost O(n) amortized, not O(n²); headers
    /// sharing a fetched batch's memory are copied once first.
    pub fn push(&mut self, name: &str, value: Option<&[u8]>) {
        // Two varint lengths of at most 5 bytes each (lengths are i32).
        let added = name.len() + value.map_or(0, <[u8]>::len) + 10;
        let copy = |bytes: &[u8]| {
            let mut copied = BytesMut::with_capacity(bytes.len() + added);
            copied.extend_from_slice(bytes);
            copied
        };
        let mut raw = match std::mem::take(&mut self.raw).try_into_mut() {
            Ok(owned) if owned.capacity() <= 2 * (owned.len() + added) + 64 => owned,
            // Headers read from a batch that nothing else holds any more: extended in place,
            // they would keep the whole batch alive as spare room.
            Ok(owned) => copy(&owned),
            Err(shared) => copy(&shared),
        };
        put_bytes(&mut raw, Some(name.as_bytes()));
        put_bytes(&mut raw, value);
        self.raw = raw.freeze();
        self.count += 1;
    }

    /// The headers as owned pairs.
    #[must_use]
    pub fn to_vec(&self) -> Vec<(String, Option<Bytes>)> {
        self.iter()
            .map(|(n, v)| (n.to_string(), v.map(|v| self.raw.slice_ref(v))))
            .collect()
    }

    /// The headers in wire form, without their count (what follows the count in a record).
    #[must_use]
    pub fn wire(&self) -> &[u8] {
        &self.raw
    }

    /// The `count` headers at `*at` in `payload`, before `end` (the record's end: the
    /// headers share the payload's memory); advances `at`.
    pub(crate) fn read(
        payload: &Bytes,
        end: usize,
        at: &mut usize,
        count: usize,
    ) -> Result<Self, Malformed> {
        let record = &payload[..end];
        let start = *at;
        for _ in 0..count {
            let name = span_at(record, at)
                .ok_or(Malformed::Framing)?
                .ok_or(Malformed::NullName)?;
            if std::str::from_utf8(&record[name]).is_err() {
                return Err(Malformed::NotUtf8);
            }
            span_at(record, at).ok_or(Malformed::Framing)?;
        }
        Ok(Self {
            raw: payload.slice(start..*at),
            count,
        })
    }

    /// Headers read from a stream, already in wire form in `raw`.
    pub(crate) fn from_wire(raw: Bytes, count: usize) -> Self {
        Self { raw, count }
    }
}

/// Why a record's headers cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Malformed {
    /// A length runs past the record, or is not a varint.
    Framing,
    /// A header's name is null.
    NullName,
    /// A header's name is not UTF-8.
    NotUtf8,
}

/// The range of a varint-length-prefixed field at `*at` (`Some(None)` for null, -1);
/// `None` when malformed. Advances `at`.
fn span_at(bytes: &[u8], at: &mut usize) -> Option<Option<std::ops::Range<usize>>> {
    let length = varint_at(bytes, at)?;
    if length == -1 {
        return Some(None);
    }
    let length = usize::try_from(length).ok()?;
    let start = *at;
    let end = start
        .checked_add(length)
        .filter(|end| *end <= bytes.len())?;
    *at = end;
    Some(Some(start..end))
}

/// Appends a varint length (-1 for null) and the bytes.
pub(crate) fn put_bytes(out: &mut BytesMut, bytes: Option<&[u8]>) {
    match bytes {
        None => put_varint(out, -1),
        Some(b) => {
            put_varint(out, i64::try_from(b.len()).unwrap_or(i64::MAX));
            out.extend_from_slice(b);
        }
    }
}

/// Appends a zig-zag varint.
fn put_varint(out: &mut BytesMut, value: i64) {
    let mut v = ((value << 1) ^ (value >> 63)) as u64;
    while v >= 0x80 {
        out.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    out.put_u8(v as u8);
}

/// The headers of a [`Headers`], in order.
#[derive(Debug, Clone)]
pub struct Iter<'a> {
    raw: &'a [u8],
    at: usize,
    left: usize,
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a str, Option<&'a [u8]>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // Checked when the headers were made: these cannot fail, and end the headers if
        // they did.
        let name = span_at(self.raw, &mut self.at)??;
        let name = std::str::from_utf8(&self.raw[name]).ok()?;
        let value = span_at(self.raw, &mut self.at)?.map(|v| &self.raw[v]);
        Some((name, value))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.left))
    }
}

impl<'a> IntoIterator for &'a Headers {
    type Item = (&'a str, Option<&'a [u8]>);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

impl<N: AsRef<str>, V: AsRef<[u8]>> FromIterator<(N, Option<V>)> for Headers {
    fn from_iter<I: IntoIterator<Item = (N, Option<V>)>>(iter: I) -> Self {
        let mut raw = BytesMut::new();
        let mut count = 0;
        for (name, value) in iter {
            put_bytes(&mut raw, Some(name.as_ref().as_bytes()));
            put_bytes(&mut raw, value.as_ref().map(AsRef::as_ref));
            count += 1;
        }
        Self {
            raw: raw.freeze(),
            count,
        }
    }
}

impl PartialEq for Headers {
    fn eq(&self, other: &Self) -> bool {
        // By what they hold: two writers may encode a length in more bytes than needed.
        self.count == other.count && self.iter().eq(other.iter())
    }
}

impl Eq for Headers {}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.iter()
                    .map(|(n, v)| (n, v.map(|v| String::from_utf8_lossy(v).into_owned()))),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_built_and_read_back_keep_their_order_names_and_nulls() {
        let headers: Headers = [
            ("id", Some(&b"m1"[..])),
            ("trace", None),
            ("id", Some(&b"m2"[..])),
        ]
        .into_iter()
        .collect();
        assert_eq!(headers.len(), 3);
        let read: Vec<_> = headers.iter().collect();
        assert_eq!(
            read,
            vec![
                ("id", Some(&b"m1"[..])),
                ("trace", None),
                ("id", Some(&b"m2"[..])),
            ]
        );
        assert_eq!(headers.get("id"), Some(&b"m1"[..]));
        assert_eq!(headers.get("trace"), None);
        assert_eq!(headers.get("none"), None);
        assert_eq!(headers.get_bytes("id"), Some(Bytes::from_static(b"m1")));
        let mut pushed = Headers::new();
        pushed.push("id", Some(b"m1"));
        pushed.push("trace", None);
        pushed.push("id", Some(b"m2"));
        assert_eq!(pushed, headers);
    }

    /// A push extends the bytes in place only when nothing else holds them: a clone taken
    /// before, and the batch a record's headers were read from, keep what they had.
    #[test]
    fn a_push_never_changes_headers_shared_with_a_clone_or_a_batch() {
        let mut pushed = Headers::new();
        for n in 0..100 {
            pushed.push("n", Some(format!("{n}").as_bytes()));
        }
        let before = pushed.clone();
        pushed.push("last", None);
        assert_eq!(before.len(), 100);
        assert_eq!(before.get("last"), None);
        assert_eq!(pushed.len(), 101);
        let built: Headers = (0..100)
            .map(|n| ("n", Some(format!("{n}"))))
            .chain([("last", None)])
            .collect();
        assert_eq!(pushed, built);

        let wire = Bytes::copy_from_slice(before.wire());
        let mut at = 0;
        let mut read = Headers::read(&wire, wire.len(), &mut at, 100).expect("well formed");
        read.push("more", Some(b"x"));
        assert_eq!(&wire[..], before.wire(), "the batch's bytes are untouched");
        assert_eq!(read.len(), 101);
        assert_eq!(read.get("more"), Some(&b"x"[..]));

        // Headers read from the middle of a batch that is then dropped: the only holder of
        // its memory. A push gives them the header, and nothing of the batch around them.
        let mut batch = vec![0xaa; 1_000];
        batch.extend_from_slice(before.wire());
        let end = batch.len();
        batch.extend_from_slice(&[0xbb; 64 << 10]);
        let batch = Bytes::from(batch);
        let mut at = 1_000;
        let mut alone = Headers::read(&batch, end, &mut at, 100).expect("well formed");
        drop(batch);
        alone.push("more", Some(b"y"));
        let mut expected = before.clone();
        expected.push("more", Some(b"y"));
        assert_eq!(alone, expected);
        assert_eq!(alone.wire(), expected.wire());
        assert_eq!(alone.get("more"), Some(&b"y"[..]));
    }

    #[test]
    fn headers_read_from_a_record_refuse_bad_names_and_lengths() {
        let good: Headers = [("a", Some("1"))].into_iter().collect();
        let record = Bytes::copy_from_slice(good.wire());
        let end = record.len();
        let mut at = 0;
        assert_eq!(Headers::read(&record, end, &mut at, 1), Ok(good));
        assert_eq!(at, end);
        // One header more than there are bytes for.
        assert_eq!(
            Headers::read(&record, end, &mut 0, 2),
            Err(Malformed::Framing)
        );
        // The bytes are there, but past the record's end.
        assert_eq!(
            Headers::read(&record, end - 1, &mut 0, 1),
            Err(Malformed::Framing)
        );
        let null_name = Bytes::from_static(&[1, 2, b'v']); // -1, then a 1-byte value
        assert_eq!(
            Headers::read(&null_name, 3, &mut 0, 1),
            Err(Malformed::NullName)
        );
        let not_utf8 = Bytes::from_static(&[2, 0xff, 1]); // a 1-byte name 0xff, null value
        assert_eq!(
            Headers::read(&not_utf8, 3, &mut 0, 1),
            Err(Malformed::NotUtf8)
        );
    }
}
