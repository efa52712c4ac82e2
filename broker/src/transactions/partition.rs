//! What one partition knows about transactions: which producers have a transaction open on it
//! (from the offset of their first transactional batch), and which transactions were aborted
//! (the aborted-transaction index that `read_committed` fetches return).
//!
//! - The **last stable offset** (LSO) is the first offset of the oldest open transaction, or
//!   the log end when none is open. A `read_committed` consumer reads only below it, so it never
//!   sees a record whose fate is not decided yet.
//! - A transaction ends with a marker (a control batch). An abort marker adds
//!   `(producer id, first offset, marker offset)` to the aborted index; a consumer given that
//!   entry skips the producer's records from the first offset until it reaches the marker.
//!
//! Both live in the producer-state snapshot and are rebuilt by replaying the log after it, as
//! producer sequences are. Entries whose marker is below the log start (deleted by retention)
//! are dropped: no fetch can reach them.
//!
//! References: KIP-98 ("Transactional message delivery", the LSO and the aborted index);
//! Kafka's `ProducerStateManager` and `TransactionIndex`.

use std::collections::BTreeMap;

use crate::log::batch::ControlType;

/// One aborted transaction on a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct AbortedTxn {
    pub(crate) producer_id: i64,
    /// Offset of the transaction's first batch on this partition.
    pub(crate) first_offset: i64,
    /// Offset of its abort marker.
    pub(crate) last_offset: i64,
}

/// Open and aborted transactions of one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PartitionTxns {
    /// Producer id → offset of its open transaction's first batch.
    ongoing: BTreeMap<i64, i64>,
    /// Aborted transactions, in marker order.
    aborted: Vec<AbortedTxn>,
}

impl PartitionTxns {
    pub(crate) fn from_parts(ongoing: Vec<(i64, i64)>, aborted: Vec<AbortedTxn>) -> Self {
        Self {
            ongoing: ongoing.into_iter().collect(),
            aborted,
        }
    }

    pub(crate) fn ongoing(&self) -> Vec<(i64, i64)> {
        self.ongoing.iter().map(|(p, o)| (*p, *o)).collect()
    }

    pub(crate) fn aborted(&self) -> &[AbortedTxn] {
        &self.aborted
    }

    /// A transactional batch of `producer_id` was appended at `base_offset`: the first one
    /// opens its transaction here.
    pub(crate) fn on_data(&mut self, producer_id: i64, base_offset: i64) {
        self.ongoing.entry(producer_id).or_insert(base_offset);
    }

    /// A marker for `producer_id` was appended at `offset`. A marker with no open transaction
    /// (one written again after a coordinator restart, or for a partition the producer added
    /// but never wrote to) changes nothing.
    pub(crate) fn on_marker(&mut self, producer_id: i64, control: ControlType, offset: i64) {
        let Some(first_offset) = self.ongoing.remove(&producer_id) else {
            return;
        };
        if control == ControlType::Abort {
            self.aborted.push(AbortedTxn {
                producer_id,
                first_offset,
                last_offset: offset,
            });
        }
    }

    pub(crate) fn is_ongoing(&self, producer_id: i64) -> bool {
        self.ongoing.contains_key(&producer_id)
    }

    /// The last stable offset, given the log end.
    pub(crate) fn last_stable_offset(&self, log_end_offset: i64) -> i64 {
        self.ongoing
            .values()
            .copied()
            .min()
            .map_or(log_end_offset, |first| first.min(log_end_offset))
    }

    /// Aborted transactions a fetch of `[from, to)` must be told about: those whose marker is
    /// at or after `from` and whose first batch is before `to`.
    pub(crate) fn aborted_between(&self, from: i64, to: i64) -> Vec<AbortedTxn> {
        self.aborted
            .iter()
            .filter(|a| a.last_offset >= from && a.first_offset < to)
            .copied()
            .collect()
    }

    /// Forgets aborted transactions whose marker is below `log_start_offset`.
    pub(crate) fn trim(&mut self, log_start_offset: i64) {
        self.aborted.retain(|a| a.last_offset >= log_start_offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lso_is_the_first_offset_of_the_oldest_open_transaction() {
        let mut txns = PartitionTxns::default();
        assert_eq!(txns.last_stable_offset(10), 10);
        txns.on_data(7, 10);
        txns.on_data(7, 12); // the same transaction goes on
        txns.on_data(8, 11);
        assert_eq!(txns.last_stable_offset(20), 10);
        txns.on_marker(7, ControlType::Commit, 20);
        assert_eq!(txns.last_stable_offset(21), 11);
        txns.on_marker(8, ControlType::Abort, 21);
        assert_eq!(txns.last_stable_offset(22), 22);
        assert_eq!(
            txns.aborted(),
            &[AbortedTxn {
                producer_id: 8,
                first_offset: 11,
                last_offset: 21
            }]
        );
    }

    #[test]
    fn a_marker_without_an_open_transaction_changes_nothing() {
        let mut txns = PartitionTxns::default();
        txns.on_marker(7, ControlType::Abort, 3);
        assert!(txns.aborted().is_empty());
        assert_eq!(txns.last_stable_offset(4), 4);
    }

    #[test]
    fn fetches_are_told_only_about_overlapping_aborts_and_retention_trims() {
        let mut txns = PartitionTxns::default();
        for (producer, first, marker) in [(1, 0, 5), (2, 6, 9), (3, 10, 20)] {
            txns.on_data(producer, first);
            txns.on_marker(producer, ControlType::Abort, marker);
        }
        let ids = |v: Vec<AbortedTxn>| v.into_iter().map(|a| a.producer_id).collect::<Vec<_>>();
        assert_eq!(ids(txns.aborted_between(5, 7)), vec![1, 2]);
        assert_eq!(ids(txns.aborted_between(10, 11)), vec![3]);
        assert_eq!(ids(txns.aborted_between(21, 30)), Vec::<i64>::new());
        txns.trim(9);
        assert_eq!(ids(txns.aborted_between(0, 100)), vec![2, 3]);
    }
}
