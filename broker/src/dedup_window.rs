//! The message-id dedup window of one partition (a Semel extension; docs/dedup-window.md):
//! which message ids were stored recently, at which offset and with which timestamp.
//!
//! An id is in the window while its record's timestamp is less than `semel.dedup.window.ms`
//! behind the broker's clock. A produced record whose id is in the window is a duplicate and
//! is not stored; the batch's other records are. The window is kept in memory, bounded by
//! `semel.dedup.max.ids` (the oldest ids leave first beyond it), and rebuilt from the log when
//! the partition opens or the setting changes: nothing is written besides the log itself.
//!
//! The rules here do no I/O and read no clock; [`crate::partition`] calls them with the
//! partition's producer lock held, so the check and the append that follows are one step.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use crate::log::batch::BatchHeader;
use crate::log::records::{MessageId, RecordId, read_ids};
use crate::log::{LogConfig, LogError, PartitionLog};

/// Where an id was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stored {
    pub(crate) offset: i64,
    pub(crate) timestamp: i64,
}

/// Ids are XXH3-128 hashes already: the map uses their low bits as they are.
#[derive(Debug, Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u128(&mut self, id: u128) {
        self.0 = id as u64;
    }
}

/// What to do with a produced batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// No record is a duplicate: store the batch as it came.
    Store,
    /// Some records are duplicates: store only those marked `true`.
    Without(Vec<bool>),
    /// Every record is a duplicate: store nothing; these are the originals' first and last
    /// offsets and the first one's timestamp.
    AllDuplicates { first: Stored, last_offset: i64 },
}

/// One partition's window.
///
/// Every store goes to the back of `order` and gets the next sequence number; `live` maps each
/// id to the sequence number of its latest store. Expiry and the cap pop `order` from the
/// front without touching `live` (that would be a random memory access per id, the largest
/// cost of the window): an entry of `live` whose sequence number was popped is stale, read as
/// absent, and swept out in one pass over `live` once stale entries could make it more than
/// twice the size of `order`.
#[derive(Debug)]
pub(crate) struct DedupWindow {
    header: String,
    window_ms: i64,
    max_ids: usize,
    /// Each id's latest store, by sequence number.
    live: HashMap<MessageId, u64, BuildHasherDefault<IdHasher>>,
    /// Every store in append order, for expiry and the cap; `order[i]` has sequence number
    /// `first_seq + i`.
    order: VecDeque<(MessageId, Stored)>,
    first_seq: u64,
    /// Records not stored because they were duplicates (since the partition opened).
    pub(crate) dropped: u64,
    /// Ids forgotten before their time because of `max_ids`.
    pub(crate) evicted: u64,
}

impl DedupWindow {
    /// An empty window for `config` (whose `dedup_window_ms` is positive).
    pub(crate) fn new(config: &LogConfig) -> Self {
        Self {
            header: config.dedup_header.clone(),
            window_ms: config.dedup_window_ms,
            max_ids: config.dedup_max_ids as usize,
            live: HashMap::default(),
            order: VecDeque::new(),
            first_seq: 0,
            dropped: 0,
            evicted: 0,
        }
    }

    /// Whether this window was built for `config`'s header and width (the cap may change in
    /// place).
    pub(crate) fn built_for(&self, config: &LogConfig) -> bool {
        self.header == config.dedup_header && self.window_ms == config.dedup_window_ms
    }

    /// The header holding the message id.
    pub(crate) fn header(&self) -> &str {
        &self.header
    }

    /// Applies a new cap, forgetting the oldest ids beyond it.
    pub(crate) fn set_max_ids(&mut self, max_ids: u32) {
        self.max_ids = (max_ids as usize).max(1);
        self.enforce_cap();
    }

    /// Ids in the window (some may have expired and not been dropped yet).
    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }

    /// Bytes the window's tables hold, about: 25 per map bucket (id, sequence number and a
    /// control byte; the map keeps up to 1/8 of its buckets free) and 32 per queue slot.
    pub(crate) fn bytes(&self) -> usize {
        let bucket = std::mem::size_of::<(MessageId, u64)>() + 1;
        let buckets = match self.live.capacity() {
            0 => 0,
            capacity => (capacity * 8 / 7).next_power_of_two(),
        };
        buckets * bucket + self.order.capacity() * std::mem::size_of::<(MessageId, Stored)>()
    }

    fn cutoff(&self, now_ms: i64) -> i64 {
        now_ms.saturating_sub(self.window_ms)
    }

    /// Forgets every id whose timestamp is at or before `now_ms - window` and that is at the
    /// front of the queue (records out of timestamp order wait behind a later one; the lookup
    /// checks the timestamp itself, so they never count as duplicates once expired).
    pub(crate) fn expire(&mut self, now_ms: i64) {
        let cutoff = self.cutoff(now_ms);
        while let Some((_, stored)) = self.order.front() {
            if stored.timestamp > cutoff {
                break;
            }
            self.pop_front();
        }
        self.sweep();
    }

    fn pop_front(&mut self) {
        if self.order.pop_front().is_some() {
            self.first_seq += 1;
        }
    }

    fn enforce_cap(&mut self) {
        while self.order.len() > self.max_ids {
            self.pop_front();
            self.evicted += 1;
        }
        self.sweep();
    }

    /// Drops the stale entries of `live` once they could be half of it.
    fn sweep(&mut self) {
        if self.live.len() > 2 * self.order.len() + 1024 {
            let first = self.first_seq;
            self.live.retain(|_, seq| *seq >= first);
            if self.live.capacity() > 4 * self.live.len().max(1024) {
                self.live.shrink_to_fit();
            }
        }
    }

    /// The store `seq` names, if it is still queued.
    #[cfg(test)]
    fn at(&self, seq: u64) -> Option<&(MessageId, Stored)> {
        seq.checked_sub(self.first_seq)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| self.order.get(i))
    }

    /// Where `id` was stored, if that is within the window.
    #[cfg(test)]
    pub(crate) fn original(&self, id: MessageId, now_ms: i64) -> Option<Stored> {
        let cutoff = self.cutoff(now_ms);
        let seq = *self.live.get(&id)?;
        self.at(seq)
            .filter(|(queued, stored)| *queued == id && stored.timestamp > cutoff)
            .map(|(_, stored)| *stored)
    }

    fn push(&mut self, id: MessageId, stored: Stored) -> u64 {
        let seq = self.first_seq + self.order.len() as u64;
        self.order.push_back((id, stored));
        seq
    }

    /// Remembers that `id` was stored at `offset` with `timestamp` (ignored if that is already
    /// outside the window).
    pub(crate) fn insert(&mut self, id: MessageId, offset: i64, timestamp: i64, now_ms: i64) {
        if timestamp <= self.cutoff(now_ms) {
            return;
        }
        let seq = self.push(id, Stored { offset, timestamp });
        self.live.insert(id, seq);
        self.enforce_cap();
    }

    /// Decides a produced batch that, if stored, starts at `base_offset`: a record is a
    /// duplicate when its id is in the window or an earlier record of the same batch has it.
    /// Records without an id are always stored. The ids of the records to store enter the
    /// window at once, at their offsets: the caller appends the batch (or the batch without
    /// the duplicates) next, under the same lock, and if that append fails it drops the window
    /// (rebuilt from the log on next use) rather than undo this.
    pub(crate) fn decide(
        &mut self,
        records: &[RecordId],
        base_offset: i64,
        now_ms: i64,
    ) -> Verdict {
        self.expire(now_ms);
        let cutoff = self.cutoff(now_ms);
        let mut keep = Vec::new();
        let mut first_original: Option<Stored> = None;
        let mut last_original = i64::MIN;
        for (index, record) in records.iter().enumerate() {
            let duplicate = match record.id {
                None => None,
                Some(id) => {
                    let stored = Stored {
                        offset: base_offset + i64::from(record.offset_delta),
                        timestamp: record.timestamp,
                    };
                    let next_seq = self.first_seq + self.order.len() as u64;
                    let fresh = stored.timestamp > cutoff;
                    let original = match self.live.entry(id) {
                        Entry::Occupied(mut entry) => {
                            let seq = *entry.get();
                            let queued = seq
                                .checked_sub(self.first_seq)
                                .and_then(|i| usize::try_from(i).ok())
                                .and_then(|i| self.order.get(i))
                                .filter(|(queued, s)| *queued == id && s.timestamp > cutoff)
                                .map(|(_, s)| *s);
                            if queued.is_none() && fresh {
                                entry.insert(next_seq);
                            }
                            queued
                        }
                        Entry::Vacant(entry) => {
                            if fresh {
                                entry.insert(next_seq);
                            }
                            None
                        }
                    };
                    // A record already outside the window is stored and not remembered.
                    if original.is_none() && fresh {
                        self.order.push_back((id, stored));
                    }
                    original
                }
            };
            match duplicate {
                None => {
                    if !keep.is_empty() {
                        keep.push(true);
                    }
                }
                Some(original) => {
                    if keep.is_empty() {
                        keep = vec![true; index];
                    }
                    keep.push(false);
                    // An id repeated within the batch points into this batch: it only
                    // matters when something is stored, and then the answer is the batch's.
                    first_original.get_or_insert(original);
                    last_original = last_original.max(original.offset);
                }
            }
        }
        self.enforce_cap();
        if keep.is_empty() {
            return Verdict::Store;
        }
        if keep.iter().any(|k| *k) {
            return Verdict::Without(keep);
        }
        // Every record is a duplicate of one stored before this batch (a repeat within the
        // batch needs a first copy that is stored).
        match first_original {
            Some(first) => Verdict::AllDuplicates {
                first,
                last_offset: last_original,
            },
            None => Verdict::Store,
        }
    }

    /// Rebuilds the window for `config` from `log`: every record with an id in a batch that
    /// is not transactional, whose timestamp is still within the window at `now_ms`. Only the
    /// segments whose largest timestamp is inside the window are read.
    ///
    /// # Errors
    /// `Io` when the log cannot be read. A batch whose records cannot be read is skipped with
    /// a warning (it was validated when it was appended; recovery checked its CRC).
    pub(crate) fn rebuild(
        config: &LogConfig,
        log: &PartitionLog,
        now_ms: i64,
    ) -> Result<Self, LogError> {
        let mut window = Self::new(config);
        let cutoff = window.cutoff(now_ms);
        let Some(mut offset) = log.first_offset_of_segment_newer_than(cutoff) else {
            return Ok(window);
        };
        let end = log.log_end_offset();
        while offset < end {
            let read = log.read(offset, 4 << 20)?;
            if read.next_offset <= offset {
                break;
            }
            let mut at = 0usize;
            while let Some(header) = BatchHeader::parse(&read.records[at..]) {
                let Some(size) = header.total_size() else {
                    break;
                };
                let Some(bytes) = read.records.get(at..at + size) else {
                    break;
                };
                at += size;
                if header.is_control()
                    || header.is_transactional()
                    || header.max_timestamp <= cutoff
                {
                    continue;
                }
                match read_ids(bytes, &window.header, None) {
                    Ok(batch) => {
                        for record in batch.records {
                            if let Some(id) = record.id {
                                window.insert(
                                    id,
                                    header.base_offset + i64::from(record.offset_delta),
                                    record.timestamp,
                                    now_ms,
                                );
                            }
                        }
                    }
                    Err(e) => tracing::warn!(
                        offset = header.base_offset,
                        error = %e,
                        "dedup window: a stored batch's records cannot be read; its ids are not in the window"
                    ),
                }
            }
            offset = read.next_offset;
        }
        Ok(window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(window_ms: i64, max_ids: u32) -> LogConfig {
        LogConfig {
            dedup_window_ms: window_ms,
            dedup_max_ids: max_ids,
            ..LogConfig::default()
        }
    }

    fn record(offset_delta: i32, timestamp: i64, id: Option<u128>) -> RecordId {
        RecordId {
            offset_delta,
            timestamp,
            id,
        }
    }

    #[test]
    fn fresh_partial_and_whole_duplicates() {
        let mut window = DedupWindow::new(&config(1_000, 100));
        let now = 10_000;
        let batch = [
            record(0, now, Some(1)),
            record(1, now, Some(2)),
            record(2, now, None),
        ];
        assert_eq!(window.decide(&batch, 100, now), Verdict::Store);
        assert_eq!(
            window.original(2, now),
            Some(Stored {
                offset: 101,
                timestamp: now
            })
        );

        // Old ids 1 and 2 with a new 3 and one without an id: only the old ones go.
        let batch = [
            record(0, now, Some(2)),
            record(1, now, Some(3)),
            record(2, now, Some(1)),
            record(3, now, None),
        ];
        assert_eq!(
            window.decide(&batch, 103, now),
            Verdict::Without(vec![false, true, false, true])
        );
        assert_eq!(window.original(3, now).map(|s| s.offset), Some(104));

        let batch = [record(0, now, Some(2)), record(1, now, Some(1))];
        assert_eq!(
            window.decide(&batch, 107, now),
            Verdict::AllDuplicates {
                first: Stored {
                    offset: 101,
                    timestamp: now
                },
                last_offset: 101,
            }
        );
    }

    #[test]
    fn an_id_twice_in_one_batch_is_stored_once() {
        let mut window = DedupWindow::new(&config(1_000, 100));
        let batch = [
            record(0, 5, Some(7)),
            record(1, 5, Some(7)),
            record(2, 5, Some(8)),
        ];
        assert_eq!(
            window.decide(&batch, 0, 5),
            Verdict::Without(vec![true, false, true])
        );
        assert_eq!(window.len(), 2);
    }

    #[test]
    fn ids_expire_by_record_timestamp() {
        let mut window = DedupWindow::new(&config(1_000, 100));
        window.insert(1, 0, 5_000, 5_000);
        assert!(window.original(1, 5_999).is_some());
        assert!(window.original(1, 6_000).is_none(), "1000 ms old: out");
        // A record already older than the window is not remembered at all.
        window.insert(2, 1, 3_000, 5_000);
        assert!(window.original(2, 5_000).is_none());
        window.expire(6_000);
        assert_eq!(window.len(), 0);
        // Out of timestamp order: the later record does not keep the earlier one alive.
        window.insert(3, 2, 9_000, 8_500);
        window.insert(4, 3, 8_000, 8_500);
        assert!(window.original(4, 9_000).is_none());
        assert!(window.original(3, 9_000).is_some());
    }

    #[test]
    fn the_cap_forgets_the_oldest_ids() {
        let mut window = DedupWindow::new(&config(60_000, 3));
        for id in 0..5u128 {
            window.insert(id, id as i64, 1_000, 1_000);
        }
        assert_eq!(window.len(), 3);
        assert_eq!(window.evicted, 2);
        assert!(window.original(0, 1_000).is_none());
        assert!(window.original(1, 1_000).is_none());
        assert!(window.original(4, 1_000).is_some());
        window.set_max_ids(1);
        assert!(window.original(3, 1_000).is_none());
        assert!(window.original(4, 1_000).is_some());
    }

    #[test]
    fn forgotten_ids_do_not_pile_up_in_the_map() {
        let mut window = DedupWindow::new(&config(60_000, 100));
        for id in 0..50_000u128 {
            let batch = [record(0, 1_000, Some(id))];
            assert_eq!(window.decide(&batch, id as i64, 1_000), Verdict::Store);
            assert!(
                window.live.len() <= 2 * 100 + 1024 + 1,
                "{}",
                window.live.len()
            );
        }
        assert_eq!(window.len(), 100);
        assert_eq!(window.evicted, 49_900);
        assert!(window.original(49_899, 1_000).is_none());
        assert!(window.original(49_900, 1_000).is_some());
        // An evicted id sent again is stored again, and then remembered.
        assert_eq!(
            window.decide(&[record(0, 1_000, Some(7))], 60_000, 1_000),
            Verdict::Store
        );
        assert_eq!(window.original(7, 1_000).map(|s| s.offset), Some(60_000));
    }

    #[test]
    fn a_stored_again_id_outlives_its_first_store() {
        let mut window = DedupWindow::new(&config(1_000, 100));
        window.insert(1, 0, 1_000, 1_000);
        // Expired at 2_000 but still queued behind nothing: re-stored at 2_500.
        window.insert(1, 5, 2_500, 2_500);
        window.expire(2_500);
        assert_eq!(
            window.original(1, 2_500),
            Some(Stored {
                offset: 5,
                timestamp: 2_500
            })
        );
    }
}
