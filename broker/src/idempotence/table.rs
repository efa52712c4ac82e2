//! Producer state of one partition: every producer's [`ProducerEntry`], bounded in number,
//! expiring idle producers.
//!
//! Bound: at most `max_producers` entries. When a new producer arrives at the bound, the least
//! recently used producer (oldest `last_timestamp_ms`) is evicted. That producer is then
//! unknown to this partition, so its next batch is accepted at whatever sequence it carries
//! (the "unknown producer may start anywhere" rule): a retry of one of its old batches after
//! eviction would be appended again. The default bound is far above what one partition sees
//! in practice; eviction is logged so it is never silent.
//!
//! References: KIP-98; Kafka's `producer.id.expiration.ms` (KIP-854).

use std::collections::HashMap;

use super::rules::{BatchIdentity, CachedBatch, Decision, ProducerEntry, check};

/// Default cap on producers remembered per partition.
pub const DEFAULT_MAX_PRODUCERS_PER_PARTITION: usize = 10_000;

/// All producers one partition remembers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerStateTable {
    entries: HashMap<i64, ProducerEntry>,
}

impl ProducerStateTable {
    /// The state of `producer_id`, if remembered.
    pub fn get(&self, producer_id: i64) -> Option<&ProducerEntry> {
        self.entries.get(&producer_id)
    }

    /// Number of producers remembered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no producer is remembered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every remembered producer.
    pub fn iter(&self) -> impl Iterator<Item = (&i64, &ProducerEntry)> {
        self.entries.iter()
    }

    /// Applies the sequence rules to `batch`.
    pub fn check(&self, batch: &BatchIdentity) -> Decision {
        check(self.entries.get(&batch.producer_id), batch)
    }

    /// Records an appended batch (or one replayed from the log during recovery). Returns the
    /// producer evicted to stay within `max_producers`, if any.
    pub fn record(
        &mut self,
        batch: &BatchIdentity,
        cached: CachedBatch,
        now_ms: i64,
        max_producers: usize,
    ) -> Option<i64> {
        if let Some(entry) = self.entries.get_mut(&batch.producer_id) {
            entry.record(batch.producer_epoch, cached, now_ms);
            return None;
        }
        let evicted = if self.entries.len() >= max_producers.max(1) {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(id, e)| (e.last_timestamp_ms, **id))
                .map(|(id, _)| *id);
            if let Some(id) = oldest {
                self.entries.remove(&id);
            }
            oldest
        } else {
            None
        };
        self.entries.insert(
            batch.producer_id,
            ProducerEntry::first(batch.producer_epoch, cached, now_ms),
        );
        evicted
    }

    /// Forgets producers idle for longer than `expiration_ms`; returns how many.
    pub fn expire(&mut self, now_ms: i64, expiration_ms: i64) -> usize {
        self.expire_except(now_ms, expiration_ms, |_| false)
    }

    /// [`ProducerStateTable::expire`], keeping the producers `keep` names.
    pub fn expire_except(
        &mut self,
        now_ms: i64,
        expiration_ms: i64,
        keep: impl Fn(i64) -> bool,
    ) -> usize {
        let before = self.entries.len();
        self.entries.retain(|id, e| {
            keep(*id) || now_ms.saturating_sub(e.last_timestamp_ms) <= expiration_ms
        });
        before - self.entries.len()
    }

    /// A transaction marker at `epoch` was written for `producer_id`: a newer epoch (the
    /// coordinator fenced the producer) replaces the old one, whose sequences no longer count.
    pub fn bump_epoch(&mut self, producer_id: i64, epoch: i16) {
        if let Some(entry) = self.entries.get_mut(&producer_id)
            && epoch > entry.epoch
        {
            entry.epoch = epoch;
            entry.batches.clear();
        }
    }

    /// Builds a table from snapshot entries.
    pub fn from_entries(entries: impl IntoIterator<Item = (i64, ProducerEntry)>) -> Self {
        Self {
            entries: entries.into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(producer_id: i64, first: i32) -> (BatchIdentity, CachedBatch) {
        let identity = BatchIdentity::new(producer_id, 0, first, 0);
        let cached = CachedBatch {
            first_sequence: first,
            last_sequence: first,
            base_offset: i64::from(first),
            last_offset: i64::from(first),
            log_append_time_ms: -1,
        };
        (identity, cached)
    }

    #[test]
    fn evicts_the_least_recently_used_producer_at_the_bound() {
        let mut table = ProducerStateTable::default();
        for (producer, now) in [(1, 10), (2, 20), (3, 30)] {
            let (identity, cached) = batch(producer, 0);
            assert_eq!(table.record(&identity, cached, now, 3), None);
        }
        // Producer 1 appends again, so producer 2 is now the least recently used.
        let (identity, cached) = batch(1, 1);
        assert_eq!(table.record(&identity, cached, 40, 3), None);
        let (identity, cached) = batch(4, 0);
        assert_eq!(table.record(&identity, cached, 50, 3), Some(2));
        assert_eq!(table.len(), 3);
        // The evicted producer is unknown now: its next batch is accepted at any sequence,
        // even a retry of an old one (the documented cost of eviction).
        let (identity, _) = batch(2, 0);
        assert_eq!(table.check(&identity), Decision::Append);
    }

    #[test]
    fn expiry_drops_only_idle_producers() {
        let mut table = ProducerStateTable::default();
        for (producer, now) in [(1, 0), (2, 1_000)] {
            let (identity, cached) = batch(producer, 0);
            table.record(&identity, cached, now, 10);
        }
        assert_eq!(table.expire(1_500, 1_000), 1);
        assert!(table.get(1).is_none());
        assert!(table.get(2).is_some());
    }
}
