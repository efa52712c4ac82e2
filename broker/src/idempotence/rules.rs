//! The sequence rules of the idempotent producer, as a pure function over values: given what a
//! partition remembers about a producer and an incoming batch's identity, decide whether to
//! append it, answer it as a duplicate, or refuse it.
//!
//! Order of checks (docs/idempotence.md "Order of checks"): duplicate, then epoch, then sequence.
//!
//! References: KIP-98 (idempotent producer), KIP-360 (epoch bump on UNKNOWN_PRODUCER_ID /
//! OUT_OF_ORDER), KAFKA-5494 (5 cached batches, i.e. max.in.flight.requests.per.connection <= 5).

use std::collections::VecDeque;

/// How many recent batches per producer and partition are remembered for duplicate detection.
pub const CACHED_BATCHES: usize = 5;

/// The identity fields of a RecordBatch v2 that idempotence looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchIdentity {
    /// `producerId` (byte 43); -1 when the producer is not idempotent.
    pub producer_id: i64,
    /// `producerEpoch` (byte 51).
    pub producer_epoch: i16,
    /// `baseSequence` (byte 53).
    pub first_sequence: i32,
    /// `baseSequence + lastOffsetDelta`, wrapping from `i32::MAX` to 0.
    pub last_sequence: i32,
}

impl BatchIdentity {
    /// Builds the identity from the header fields, computing the wrapped last sequence.
    pub fn new(
        producer_id: i64,
        producer_epoch: i16,
        first_sequence: i32,
        last_offset_delta: i32,
    ) -> Self {
        Self {
            producer_id,
            producer_epoch,
            first_sequence,
            last_sequence: add_sequence(first_sequence, last_offset_delta),
        }
    }
}

/// `sequence + increment` in Kafka's sequence space, which wraps from `i32::MAX` to 0.
pub fn add_sequence(sequence: i32, increment: i32) -> i32 {
    let sum = i64::from(sequence) + i64::from(increment);
    let wrapped = sum.rem_euclid(i64::from(i32::MAX) + 1);
    i32::try_from(wrapped).unwrap_or(0)
}

/// One appended batch, as remembered for duplicate detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CachedBatch {
    /// First sequence of the batch.
    pub first_sequence: i32,
    /// Last sequence of the batch.
    pub last_sequence: i32,
    /// Offset the broker assigned to the first record.
    pub base_offset: i64,
    /// Offset of the last record.
    pub last_offset: i64,
    /// `log_append_time_ms` returned for it (-1 for CreateTime topics).
    pub log_append_time_ms: i64,
}

/// What one partition remembers about one producer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProducerEntry {
    /// The producer's current epoch on this partition.
    pub epoch: i16,
    /// The most recent batches, oldest first; at most [`CACHED_BATCHES`].
    pub batches: VecDeque<CachedBatch>,
    /// When this producer last appended (ms since the epoch); drives expiry.
    pub last_timestamp_ms: i64,
}

impl ProducerEntry {
    /// The last sequence appended, if any batch is remembered.
    pub fn last_sequence(&self) -> Option<i32> {
        self.batches.back().map(|b| b.last_sequence)
    }

    /// Records an appended batch. A newer epoch clears the cache first.
    pub fn record(&mut self, epoch: i16, batch: CachedBatch, now_ms: i64) {
        if epoch != self.epoch {
            self.epoch = epoch;
            self.batches.clear();
        }
        if self.batches.len() == CACHED_BATCHES {
            self.batches.pop_front();
        }
        self.batches.push_back(batch);
        self.last_timestamp_ms = self.last_timestamp_ms.max(now_ms);
    }

    /// A fresh entry holding one batch.
    pub fn first(epoch: i16, batch: CachedBatch, now_ms: i64) -> Self {
        Self {
            epoch,
            batches: VecDeque::from([batch]),
            last_timestamp_ms: now_ms,
        }
    }
}

/// The verdict on one incoming batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// New and in order: append it.
    Append,
    /// Already appended: answer `NONE` with the original result, append nothing.
    Duplicate(CachedBatch),
    /// The epoch is older than the partition's: `INVALID_PRODUCER_EPOCH` (47).
    Fenced {
        /// The epoch the partition knows.
        current_epoch: i16,
    },
    /// Not the next sequence: `OUT_OF_ORDER_SEQUENCE_NUMBER` (45).
    OutOfOrder {
        /// The sequence that would have been accepted.
        expected: i32,
    },
}

/// Decides what to do with `batch`, given the partition's entry for its producer (if any).
pub fn check(entry: Option<&ProducerEntry>, batch: &BatchIdentity) -> Decision {
    let Some(entry) = entry else {
        // A producer this partition has no state for may start at any sequence (its state may
        // have expired, or it may be new to this partition).
        return Decision::Append;
    };
    if batch.producer_epoch == entry.epoch
        && let Some(original) = entry.batches.iter().find(|b| {
            b.first_sequence == batch.first_sequence && b.last_sequence == batch.last_sequence
        })
    {
        return Decision::Duplicate(*original);
    }
    if batch.producer_epoch < entry.epoch {
        return Decision::Fenced {
            current_epoch: entry.epoch,
        };
    }
    if batch.producer_epoch > entry.epoch {
        return if batch.first_sequence == 0 {
            Decision::Append
        } else {
            Decision::OutOfOrder { expected: 0 }
        };
    }
    let expected = entry
        .last_sequence()
        .map_or(batch.first_sequence, |last| add_sequence(last, 1));
    if batch.first_sequence == expected {
        Decision::Append
    } else {
        Decision::OutOfOrder { expected }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cached(first: i32, last: i32, base_offset: i64) -> CachedBatch {
        CachedBatch {
            first_sequence: first,
            last_sequence: last,
            base_offset,
            last_offset: base_offset + i64::from(last - first),
            log_append_time_ms: -1,
        }
    }

    /// A producer at epoch 3 that has appended batches of 10 records: seq 0-9, 10-19, ... (n batches).
    fn entry_with(n: i32) -> ProducerEntry {
        let mut entry = ProducerEntry::first(3, cached(0, 9, 100), 0);
        for i in 1..n {
            entry.record(
                3,
                cached(i * 10, i * 10 + 9, 100 + i64::from(i) * 10),
                i64::from(i),
            );
        }
        entry
    }

    fn batch(epoch: i16, first: i32, records: i32) -> BatchIdentity {
        BatchIdentity::new(7, epoch, first, records - 1)
    }

    #[test]
    fn each_of_the_last_five_batches_is_a_duplicate_with_its_original_offset() {
        let entry = entry_with(8);
        assert_eq!(entry.batches.len(), CACHED_BATCHES);
        for i in 3..8 {
            let decision = check(Some(&entry), &batch(3, i * 10, 10));
            assert_eq!(
                decision,
                Decision::Duplicate(cached(i * 10, i * 10 + 9, 100 + i64::from(i) * 10))
            );
        }
    }

    #[test]
    fn the_sixth_oldest_batch_is_out_of_order() {
        let entry = entry_with(8);
        assert_eq!(
            check(Some(&entry), &batch(3, 20, 10)),
            Decision::OutOfOrder { expected: 80 }
        );
    }

    #[test]
    fn next_sequence_appends_and_a_gap_is_out_of_order() {
        let entry = entry_with(2);
        assert_eq!(check(Some(&entry), &batch(3, 20, 5)), Decision::Append);
        assert_eq!(
            check(Some(&entry), &batch(3, 21, 5)),
            Decision::OutOfOrder { expected: 20 }
        );
        // Same first sequence, different length: not the cached batch, and not next in line.
        assert_eq!(
            check(Some(&entry), &batch(3, 10, 5)),
            Decision::OutOfOrder { expected: 20 }
        );
    }

    #[test]
    fn lower_epoch_is_fenced_even_for_a_cached_range() {
        let entry = entry_with(2);
        assert_eq!(
            check(Some(&entry), &batch(2, 0, 10)),
            Decision::Fenced { current_epoch: 3 }
        );
        assert_eq!(
            check(Some(&entry), &batch(2, 20, 10)),
            Decision::Fenced { current_epoch: 3 }
        );
    }

    #[test]
    fn epoch_bump_must_restart_at_zero_and_clears_the_cache() {
        let entry = entry_with(2);
        assert_eq!(check(Some(&entry), &batch(4, 0, 10)), Decision::Append);
        assert_eq!(
            check(Some(&entry), &batch(4, 20, 10)),
            Decision::OutOfOrder { expected: 0 }
        );
        let mut bumped = entry.clone();
        bumped.record(4, cached(0, 9, 500), 10);
        assert_eq!(bumped.batches.len(), 1);
        // The old epoch's batch 0-9 is no longer a duplicate; the new one is.
        assert_eq!(
            check(Some(&bumped), &batch(3, 0, 10)),
            Decision::Fenced { current_epoch: 4 }
        );
        assert_eq!(
            check(Some(&bumped), &batch(4, 0, 10)),
            Decision::Duplicate(cached(0, 9, 500))
        );
    }

    #[test]
    fn sequences_wrap_from_i32_max_to_zero() {
        assert_eq!(add_sequence(i32::MAX, 1), 0);
        assert_eq!(add_sequence(i32::MAX - 2, 5), 2);
        let identity = BatchIdentity::new(7, 0, i32::MAX - 1, 4);
        assert_eq!(identity.last_sequence, 2);
        let entry = ProducerEntry::first(0, cached(i32::MAX - 9, i32::MAX, 0), 0);
        assert_eq!(check(Some(&entry), &batch(0, 0, 3)), Decision::Append);
        assert_eq!(
            check(Some(&entry), &batch(0, 1, 3)),
            Decision::OutOfOrder { expected: 0 }
        );
    }

    #[test]
    fn unknown_producer_may_start_anywhere() {
        for first in [0, 1, 12345, i32::MAX] {
            assert_eq!(check(None, &batch(0, first, 1)), Decision::Append);
        }
    }
}
