//! Entry points for the fuzz targets in `fuzz/` (`cargo +nightly fuzz run <target>`), also
//! used by tests. Each takes arbitrary bytes and must return: no panic, no abort, no
//! allocation sized by a count nobody checked. Not a stable API.

use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::Decodable;

use crate::server::frame::FrameReader;
use crate::server::guard;

/// Decodes `body` as the request `api_key` at `version`, as the broker would after the
/// guard accepted it. `Err` for a body that does not decode or an API the broker does not
/// decode at all.
///
/// # Errors
/// The decoder's message.
pub fn decode_request(api_key: i16, version: i16, body: &Bytes) -> Result<(), String> {
    let mut bytes = body.clone();
    let result = match api_key {
        0 => ProduceRequest::decode(&mut bytes, version).map(drop),
        1 => FetchRequest::decode(&mut bytes, version).map(drop),
        2 => ListOffsetsRequest::decode(&mut bytes, version).map(drop),
        3 => MetadataRequest::decode(&mut bytes, version).map(drop),
        18 => ApiVersionsRequest::decode(&mut bytes, version).map(drop),
        19 => CreateTopicsRequest::decode(&mut bytes, version).map(drop),
        20 => DeleteTopicsRequest::decode(&mut bytes, version).map(drop),
        32 => DescribeConfigsRequest::decode(&mut bytes, version).map(drop),
        33 => AlterConfigsRequest::decode(&mut bytes, version).map(drop),
        44 => IncrementalAlterConfigsRequest::decode(&mut bytes, version).map(drop),
        37 => CreatePartitionsRequest::decode(&mut bytes, version).map(drop),
        22 => InitProducerIdRequest::decode(&mut bytes, version).map(drop),
        24 => AddPartitionsToTxnRequest::decode(&mut bytes, version).map(drop),
        25 => AddOffsetsToTxnRequest::decode(&mut bytes, version).map(drop),
        26 => EndTxnRequest::decode(&mut bytes, version).map(drop),
        28 => TxnOffsetCommitRequest::decode(&mut bytes, version).map(drop),
        65 => DescribeTransactionsRequest::decode(&mut bytes, version).map(drop),
        66 => ListTransactionsRequest::decode(&mut bytes, version).map(drop),
        61 => DescribeProducersRequest::decode(&mut bytes, version).map(drop),
        35 => DescribeLogDirsRequest::decode(&mut bytes, version).map(drop),
        17 => SaslHandshakeRequest::decode(&mut bytes, version).map(drop),
        36 => SaslAuthenticateRequest::decode(&mut bytes, version).map(drop),
        21 => DeleteRecordsRequest::decode(&mut bytes, version).map(drop),
        10 => FindCoordinatorRequest::decode(&mut bytes, version).map(drop),
        11 => JoinGroupRequest::decode(&mut bytes, version).map(drop),
        14 => SyncGroupRequest::decode(&mut bytes, version).map(drop),
        12 => HeartbeatRequest::decode(&mut bytes, version).map(drop),
        13 => LeaveGroupRequest::decode(&mut bytes, version).map(drop),
        8 => OffsetCommitRequest::decode(&mut bytes, version).map(drop),
        9 => OffsetFetchRequest::decode(&mut bytes, version).map(drop),
        16 => ListGroupsRequest::decode(&mut bytes, version).map(drop),
        15 => DescribeGroupsRequest::decode(&mut bytes, version).map(drop),
        42 => DeleteGroupsRequest::decode(&mut bytes, version).map(drop),
        47 => OffsetDeleteRequest::decode(&mut bytes, version).map(drop),
        other => return Err(format!("no decoder for api key {other}")),
    };
    result.map_err(|e| e.to_string())
}

/// The first two bytes pick one covered (api key, version); the rest is its body, checked
/// by the guard and, if accepted, decoded.
pub fn request(data: &[u8]) {
    let covered = guard::covered_versions();
    let Some((pick, body)) = data.split_first_chunk::<2>() else {
        return;
    };
    let (api_key, version) = covered[usize::from(u16::from_be_bytes(*pick)) % covered.len()];
    if guard::check_request_body(api_key, version, body).is_ok() {
        let _ = decode_request(api_key, version, &Bytes::copy_from_slice(body));
    }
}

/// Reads `data` as a connection's byte stream of frames (at most 64 KiB each) until it
/// ends or breaks the framing.
pub fn frames(data: &[u8]) {
    let mut reader = FrameReader::new(data, 64 * 1024);
    let mut context = Context::from_waker(Waker::noop());
    loop {
        // A byte slice is always ready, so one poll decides.
        let polled = {
            let next = pin!(reader.read_frame());
            next.poll(&mut context)
        };
        match polled {
            Poll::Ready(Ok(Some(_))) => continue,
            Poll::Ready(_) | Poll::Pending => return,
        }
    }
}

/// Validates `data` as the records of one partition in a Produce request (uncompressed and
/// compressed batches walked record by record). A batch that passes is then read as the
/// dedup window reads it and rebuilt without every other record, which must give a valid
/// batch holding the others at their offsets. The raw bytes are also read as the window's
/// rebuild reads a stored batch.
pub fn produce_records(data: &[u8]) {
    use crate::log::records::{read_ids, without};
    let _ = read_ids(data, "semel-msg-id");
    let plain = crate::log::validate_produce_records(data, 1 << 20);
    // With a dedup window the records are read once, ids included: that walk never accepts
    // what the plain one refuses, and reads what the stored-batch reader reads.
    let with_ids = crate::log::batch::validate_produce_records_with(
        &bytes::Bytes::copy_from_slice(data),
        1 << 20,
        Some("semel-msg-id"),
    );
    if let Ok(with_ids) = &with_ids {
        assert!(
            plain.is_ok(),
            "accepted only with the window: {:?}",
            plain.err()
        );
        if let (Some(ids), Ok(stored)) = (with_ids.ids(), read_ids(data, "semel-msg-id")) {
            assert_eq!(ids.records, stored.records);
        }
    }
    let Ok(batch) = plain else {
        return;
    };
    let records =
        read_ids(batch.bytes(), "semel-msg-id").expect("a validated batch's records can be read");
    if records.records.len() < 2 {
        return;
    }
    let keep: Vec<bool> = (0..records.records.len()).map(|i| i % 2 == 0).collect();
    let rebuilt = without(&batch, &records, &keep);
    let header =
        crate::log::batch::check_batch(rebuilt.bytes()).expect("the rebuilt batch is whole");
    assert_eq!(header.last_offset_delta, batch.header().last_offset_delta);
    let again = read_ids(rebuilt.bytes(), "semel-msg-id").expect("the rebuilt batch reads");
    let expected: Vec<_> = records
        .records
        .iter()
        .zip(&keep)
        .filter(|(_, k)| **k)
        .map(|(r, _)| (r.offset_delta, r.id))
        .collect();
    let got: Vec<_> = again
        .records
        .iter()
        .map(|r| (r.offset_delta, r.id))
        .collect();
    assert_eq!(got, expected);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_points_take_anything() {
        for data in [&b""[..], b"\x00", b"\x00\x03\x00\x00\x00\x01", &[0xff; 64]] {
            request(data);
            frames(data);
            produce_records(data);
        }
        // A whole frame, then a partial one.
        frames(b"\x00\x00\x00\x02ab\x00\x00\x00\x05a");
    }

    #[test]
    fn valid_batches_with_ids_rebuild() {
        use crate::log::records::tests::batch_with_ids;
        for gzip in [false, true] {
            produce_records(&batch_with_ids(
                &[Some("a"), None, Some("b"), Some("a")],
                5,
                gzip,
            ));
        }
    }
}
