//! Which records of each partition are settled, so that the offset committed to the group and
//! recorded in the store is always the **lowest offset not yet settled**.
//!
//! The middleware reads records in offset order but hands them out as owned [`Fresh`]
//! handles, which an application settles in any order (a task per message,
//! `for_each_concurrent`). Committing "the offset after the record that settled last" would
//! skip every record before it that is still in flight, failed, or lost to a crash. Here, per
//! partition:
//! - a record read and handed out is *outstanding* until it is settled (done, or dropped as a
//!   duplicate at once);
//! - the committable offset is the smallest outstanding offset, or, with none, the offset after
//!   the last record read;
//! - each ownership of a partition (from one assignment to its revocation) has its own
//!   [`Epoch`]: a handle from an earlier ownership settles nothing here (its mark still counts,
//!   its offset does not), so a partition that left and came back never commits from stale
//!   state;
//! - a revoked partition's state is kept until its revocation is over: the handles out at the
//!   revocation (`handed`) still settle there, and the revocation commits once none is out.
//!
//! Plain values and no I/O: the middleware feeds it and writes what it answers.
//!
//! [`Fresh`]: super::Fresh

use std::collections::{BTreeMap, VecDeque};

use crate::assignor::TopicPartition;

/// A set of offsets, for offsets that mostly arrive in increasing order and mostly leave from
/// the low end (records read in order, settled about in order): a sorted queue in which a
/// removed offset is only marked, and dropped once it reaches the front. A `BTreeSet` cost a
/// node search and, every few offsets, an allocation per insert and per remove, several per
/// record. Marked entries never outnumber live ones by much: past that the queue is compacted.
#[derive(Debug, Default)]
pub(crate) struct OffsetSet {
    /// Increasing offsets, each with whether it is (still) in the set. The front one is.
    entries: VecDeque<(i64, bool)>,
    live: usize,
}

impl OffsetSet {
    /// Adds `offset`; `false` when it was there already.
    pub(crate) fn insert(&mut self, offset: i64) -> bool {
        if self.entries.back().is_none_or(|&(last, _)| last < offset) {
            self.entries.push_back((offset, true));
            self.live += 1;
            return true;
        }
        match self.entries.binary_search_by_key(&offset, |&(o, _)| o) {
            Ok(at) => {
                let (_, present) = &mut self.entries[at];
                if *present {
                    return false;
                }
                *present = true;
            }
            Err(at) => self.entries.insert(at, (offset, true)),
        }
        self.live += 1;
        true
    }

    /// Removes `offset`; `false` when it was not there.
    pub(crate) fn remove(&mut self, offset: i64) -> bool {
        // Settled about in order: usually the lowest.
        let at = if self
            .entries
            .front()
            .is_some_and(|&(first, _)| first == offset)
        {
            0
        } else {
            match self.entries.binary_search_by_key(&offset, |&(o, _)| o) {
                Ok(at) => at,
                Err(_) => return false,
            }
        };
        let (_, present) = &mut self.entries[at];
        if !*present {
            return false;
        }
        *present = false;
        self.live -= 1;
        while self.entries.front().is_some_and(|&(_, present)| !present) {
            self.entries.pop_front();
        }
        if self.entries.len() > 2 * self.live + 64 {
            self.entries.retain(|&(_, present)| present);
        }
        true
    }

    /// The lowest offset in the set.
    pub(crate) fn first(&self) -> Option<i64> {
        self.entries.front().map(|&(offset, _)| offset)
    }

    /// The offsets, lowest first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = i64> + '_ {
        self.entries
            .iter()
            .filter(|&&(_, present)| present)
            .map(|&(offset, _)| offset)
    }

    pub(crate) fn len(&self) -> usize {
        self.live
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.live == 0
    }
}

/// One ownership of one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Epoch(u64);

impl Epoch {
    /// Stands for an epoch until the record is read ([`Settlements::read`] gives the real
    /// one); no partition's epoch.
    pub(crate) const UNREAD: Epoch = Epoch(u64::MAX);
}

#[derive(Debug)]
struct Track {
    epoch: Epoch,
    /// The offset after the last record read (`None` before the first).
    read_to: Option<i64>,
    /// Offsets read and not settled yet (handed out, given back, or waiting for a claim).
    outstanding: OffsetSet,
    /// Of those, the ones a live handle holds: what a revocation waits for.
    handed: OffsetSet,
    /// Whether a record was settled in this ownership (so an offset was released to the
    /// changelog, which a revocation waits for).
    settled_any: bool,
}

impl Track {
    fn committable(&self) -> Option<i64> {
        match self.outstanding.first() {
            Some(lowest) => Some(lowest),
            None => self.read_to,
        }
    }
}

/// Where a revoked partition's settling stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Revoking {
    /// Handles of that ownership are still out.
    Waiting,
    /// None is out: the committable offset then (`None`: nothing was settled in that
    /// ownership, so there is no release to wait for and nothing new to commit).
    Settled(Option<i64>),
    /// Not revoking in that ownership any more (assigned again, or lost).
    Gone,
}

/// The settlement state of every partition this member owns, and of those it is giving up
/// while handles of theirs are still out.
#[derive(Debug, Default)]
pub(crate) struct Settlements {
    partitions: BTreeMap<TopicPartition, Track>,
    /// Revoked partitions, kept until the revocation is over: handles out at the revocation
    /// still settle here, so the offset committed for them covers what they handled.
    revoking: BTreeMap<TopicPartition, Track>,
    next_epoch: u64,
}

impl Settlements {
    /// The partition is (newly) ours: whatever was known about it is forgotten.
    pub(crate) fn assign(&mut self, tp: &TopicPartition) -> Epoch {
        let epoch = Epoch(self.next_epoch);
        self.next_epoch += 1;
        self.revoking.remove(tp);
        self.partitions.insert(
            tp.clone(),
            Track {
                epoch,
                read_to: None,
                outstanding: OffsetSet::default(),
                handed: OffsetSet::default(),
                settled_any: false,
            },
        );
        epoch
    }

    /// The partition is no longer ours, and nothing about it is kept (lost, or forgotten).
    pub(crate) fn revoke(&mut self, tp: &TopicPartition) {
        self.partitions.remove(tp);
        self.revoking.remove(tp);
    }

    /// The partition is being given up: it is not ours any more (no record of it is handed
    /// out), but its handles still out settle until [`Settlements::finish_revoke`]. Returns
    /// the ownership given up.
    pub(crate) fn start_revoke(&mut self, tp: &TopicPartition) -> Option<Epoch> {
        let track = self.partitions.remove(tp)?;
        let epoch = track.epoch;
        self.revoking.insert(tp.clone(), track);
        Some(epoch)
    }

    /// Where the revocation of `tp` (ownership `epoch`) stands.
    pub(crate) fn revoking(&self, tp: &TopicPartition, epoch: Epoch) -> Revoking {
        match self.revoking.get(tp).filter(|t| t.epoch == epoch) {
            None => Revoking::Gone,
            Some(track) if !track.handed.is_empty() => Revoking::Waiting,
            Some(track) if !track.settled_any => Revoking::Settled(None),
            Some(track) => Revoking::Settled(track.committable()),
        }
    }

    /// The revocation of `tp` (ownership `epoch`) is over: its state goes; the committable
    /// offset it ended with is returned.
    pub(crate) fn finish_revoke(&mut self, tp: &TopicPartition, epoch: Epoch) -> Option<i64> {
        if self.revoking.get(tp).is_some_and(|t| t.epoch == epoch) {
            return self.revoking.remove(tp).and_then(|t| t.committable());
        }
        None
    }

    /// Whether `epoch` is `tp`'s current ownership or the one being revoked.
    pub(crate) fn settles_in(&self, tp: &TopicPartition, epoch: Epoch) -> bool {
        self.track(tp, epoch).is_some()
    }

    fn track(&self, tp: &TopicPartition, epoch: Epoch) -> Option<&Track> {
        self.partitions
            .get(tp)
            .filter(|t| t.epoch == epoch)
            .or_else(|| self.revoking.get(tp).filter(|t| t.epoch == epoch))
    }

    fn track_mut(&mut self, tp: &TopicPartition, epoch: Epoch) -> Option<&mut Track> {
        match self.partitions.get_mut(tp) {
            Some(track) if track.epoch == epoch => Some(track),
            _ => self.revoking.get_mut(tp).filter(|t| t.epoch == epoch),
        }
    }

    /// A record (read in `epoch`) is handed out in a live handle.
    pub(crate) fn hand_out(&mut self, tp: &TopicPartition, epoch: Epoch, offset: i64) {
        if let Some(track) = self.track_mut(tp, epoch) {
            track.handed.insert(offset);
        }
    }

    /// A handle came back unsettled (failed, dropped): its record is outstanding still.
    pub(crate) fn returned(&mut self, tp: &TopicPartition, epoch: Epoch, offset: i64) {
        if let Some(track) = self.track_mut(tp, epoch) {
            track.handed.remove(offset);
        }
    }

    /// The current epoch of `tp`, if it is ours.
    pub(crate) fn epoch(&self, tp: &TopicPartition) -> Option<Epoch> {
        self.partitions.get(tp).map(|t| t.epoch)
    }

    /// A record at `offset` was read: handed out (`outstanding`) or settled at once (a
    /// duplicate, a record rejected for having no key). A partition not known yet (manual
    /// assignment, or a record that raced its assignment callback) is taken as assigned now.
    pub(crate) fn read(&mut self, tp: &TopicPartition, offset: i64, outstanding: bool) -> Epoch {
        if !self.partitions.contains_key(tp) {
            self.assign(tp);
        }
        let Some(track) = self.partitions.get_mut(tp) else {
            unreachable!("assigned just above");
        };
        let next = offset.saturating_add(1);
        // A seek backwards re-reads records: the end already read does not move back.
        track.read_to = Some(track.read_to.map_or(next, |r| r.max(next)));
        if outstanding {
            track.outstanding.insert(offset);
        }
        track.epoch
    }

    /// What [`Settlements::committable`] will be once `offset` (read in `epoch`) is settled;
    /// `None` when `epoch` is not the partition's current one.
    #[cfg(test)]
    pub(crate) fn committable_after(
        &self,
        tp: &TopicPartition,
        epoch: Epoch,
        offset: i64,
    ) -> Option<i64> {
        let track = self.track(tp, epoch)?;
        let lowest_other = track.outstanding.iter().find(|&o| o != offset);
        match lowest_other {
            Some(lowest) => Some(lowest),
            None => track.read_to,
        }
    }

    /// What [`Settlements::committable`] will be once every offset of `offsets` (sorted; read
    /// in `epoch`) is settled; `None` when `epoch` is not the partition's current one.
    pub(crate) fn committable_after_all(
        &self,
        tp: &TopicPartition,
        epoch: Epoch,
        offsets: &[i64],
    ) -> Option<i64> {
        let track = self.track(tp, epoch)?;
        let lowest_other = track
            .outstanding
            .iter()
            .find(|o| offsets.binary_search(o).is_err());
        match lowest_other {
            Some(lowest) => Some(lowest),
            None => track.read_to,
        }
    }

    /// `offset` (read in `epoch`) is settled; returns the partition's committable offset then,
    /// or `None` when `epoch` is stale (nothing changes).
    pub(crate) fn settle(&mut self, tp: &TopicPartition, epoch: Epoch, offset: i64) -> Option<i64> {
        let track = self.track_mut(tp, epoch)?;
        track.outstanding.remove(offset);
        track.handed.remove(offset);
        track.settled_any = true;
        track.committable()
    }

    /// The lowest offset not yet settled of `tp` (`None`: nothing read since it was assigned).
    #[cfg(test)]
    pub(crate) fn committable(&self, tp: &TopicPartition) -> Option<i64> {
        self.partitions.get(tp).and_then(Track::committable)
    }

    /// [`Settlements::committable`] of every partition that has one.
    pub(crate) fn all_committable(&self) -> BTreeMap<TopicPartition, i64> {
        self.partitions
            .iter()
            .filter_map(|(tp, t)| t.committable().map(|o| (tp.clone(), o)))
            .collect()
    }

    /// Records handed out and not settled, over all partitions.
    pub(crate) fn outstanding(&self) -> usize {
        self.partitions.values().map(|t| t.outstanding.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tp() -> TopicPartition {
        ("t".to_string(), 0)
    }

    #[test]
    fn the_committable_offset_stops_at_the_lowest_record_in_flight() {
        let mut s = Settlements::default();
        let e = s.assign(&tp());
        assert_eq!(s.committable(&tp()), None);
        s.read(&tp(), 0, true);
        s.read(&tp(), 1, true);
        assert_eq!(s.committable(&tp()), Some(0));
        assert_eq!(s.committable_after(&tp(), e, 1), Some(0));
        assert_eq!(s.settle(&tp(), e, 1), Some(0), "m1 settled, m0 in flight");
        s.read(&tp(), 2, false); // a duplicate, settled at once
        assert_eq!(
            s.committable(&tp()),
            Some(0),
            "a duplicate does not pass m0"
        );
        assert_eq!(s.committable_after(&tp(), e, 0), Some(3));
        assert_eq!(s.settle(&tp(), e, 0), Some(3));
    }

    #[test]
    fn settling_several_at_once_stops_at_the_lowest_left_in_flight() {
        let mut s = Settlements::default();
        let e = s.assign(&tp());
        for o in 0..6 {
            s.read(&tp(), o, true);
        }
        let some = [0, 1, 3];
        assert_eq!(s.committable_after_all(&tp(), e, &some), Some(2));
        let all: Vec<i64> = (0..6).collect();
        assert_eq!(s.committable_after_all(&tp(), e, &all), Some(6));
        let other = Epoch(e.0 + 1);
        assert_eq!(s.committable_after_all(&tp(), other, &all), None);
    }

    /// Defect: a partition revoked with records read but none settled in that ownership (its
    /// one handler failed, or every record waited for another's claim) reported the lowest
    /// outstanding offset as settled-to, and a revocation with a changelog waited for the
    /// changelog to acknowledge a release that was never sent: the whole `revocation_wait`
    /// (30 s) on every such rebalance.
    #[test]
    fn a_revocation_with_nothing_settled_waits_for_no_release() {
        let mut s = Settlements::default();
        let tp = tp();
        let epoch = s.assign(&tp);
        s.read(&tp, 5, true);
        s.read(&tp, 6, true);
        s.returned(&tp, epoch, 5);
        assert_eq!(s.start_revoke(&tp), Some(epoch));
        assert_eq!(s.revoking(&tp, epoch), Revoking::Settled(None));

        // Once one settles, its release is what the revocation waits for.
        let epoch = s.assign(&tp);
        s.read(&tp, 5, true);
        s.read(&tp, 6, true);
        assert_eq!(s.settle(&tp, epoch, 6), Some(5));
        assert_eq!(s.start_revoke(&tp), Some(epoch));
        assert_eq!(s.revoking(&tp, epoch), Revoking::Settled(Some(5)));
    }

    #[test]
    fn a_handle_from_an_earlier_ownership_settles_nothing() {
        let mut s = Settlements::default();
        let old = s.assign(&tp());
        s.read(&tp(), 5, true);
        s.revoke(&tp());
        assert_eq!(s.settle(&tp(), old, 5), None);
        let new = s.assign(&tp());
        assert_ne!(old, new);
        s.read(&tp(), 3, true);
        assert_eq!(s.settle(&tp(), old, 3), None, "stale epoch");
        assert_eq!(s.committable(&tp()), Some(3));
        assert_eq!(s.settle(&tp(), new, 3), Some(4));
    }

    #[test]
    fn a_seek_backwards_does_not_move_the_end_read_back() {
        let mut s = Settlements::default();
        let e = s.assign(&tp());
        for o in 0..5 {
            s.read(&tp(), o, false);
        }
        assert_eq!(s.committable(&tp()), Some(5));
        s.read(&tp(), 2, false); // re-read after a seek to 2: a duplicate
        assert_eq!(s.committable(&tp()), Some(5));
        s.read(&tp(), 3, true); // re-read and handed out again
        assert_eq!(s.committable(&tp()), Some(3));
        assert_eq!(s.settle(&tp(), e, 3), Some(5));
    }

    proptest! {
        /// `OffsetSet` against `BTreeSet`: inserts mostly above what is there, some below or
        /// again; removes anywhere, mostly low.
        #[test]
        fn an_offset_set_answers_as_a_btree_set_does(
            ops in proptest::collection::vec((any::<bool>(), 0u8..4, 0i64..200), 1..400),
        ) {
            let mut set = OffsetSet::default();
            let mut model = std::collections::BTreeSet::new();
            let mut next = 0i64;
            for (add, kind, n) in ops {
                if add {
                    let offset = if kind > 0 { next += 1; next } else { n };
                    prop_assert_eq!(set.insert(offset), model.insert(offset));
                } else {
                    let offset = match kind {
                        0 => n,
                        _ => model.iter().next().copied().unwrap_or(n),
                    };
                    prop_assert_eq!(set.remove(offset), model.remove(&offset));
                }
                prop_assert_eq!(set.first(), model.first().copied());
                prop_assert_eq!(set.len(), model.len());
                prop_assert_eq!(set.is_empty(), model.is_empty());
                prop_assert!(set.entries.len() <= 2 * set.len() + 64 + 1);
            }
            prop_assert_eq!(set.iter().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
        }

        /// Against a model: records 0..n read in order, each handed out or settled at once,
        /// settled in a random order. The committable offset is always the lowest offset not
        /// settled (or the end read), it never moves backwards, and every offset below it is
        /// settled.
        #[test]
        fn the_committable_offset_is_the_lowest_unsettled(
            handed in proptest::collection::vec(any::<bool>(), 1..40),
            order in proptest::collection::vec(any::<proptest::sample::Index>(), 0..80),
            interleave in proptest::collection::vec(any::<bool>(), 0..120),
        ) {
            let mut s = Settlements::default();
            let e = s.assign(&tp());
            let n = handed.len();
            let mut settled = vec![false; n];
            let mut read = 0usize;
            let mut in_flight: Vec<i64> = Vec::new();
            let mut last: Option<i64> = None;
            let mut steps = interleave.into_iter();
            let mut picks = order.into_iter();
            loop {
                let read_next = steps.next().unwrap_or(true);
                if read_next && read < n {
                    let offset = i64::try_from(read).unwrap_or(i64::MAX);
                    s.read(&tp(), offset, handed[read]);
                    if handed[read] { in_flight.push(offset) } else { settled[read] = true }
                    read += 1;
                } else if !in_flight.is_empty() {
                    let i = picks.next().map_or(0, |p| p.index(in_flight.len()));
                    let offset = in_flight.swap_remove(i);
                    let predicted = s.committable_after(&tp(), e, offset);
                    let now = s.settle(&tp(), e, offset);
                    prop_assert_eq!(predicted, now);
                    settled[usize::try_from(offset).unwrap_or(usize::MAX)] = true;
                } else if read >= n {
                    break;
                }
                let got = s.committable(&tp());
                if read == 0 {
                    prop_assert_eq!(got, None);
                    continue;
                }
                let want = settled[..read].iter().position(|done| !done).unwrap_or(read);
                prop_assert_eq!(got, Some(i64::try_from(want).unwrap_or(i64::MAX)));
                prop_assert!(last <= got, "moved backwards: {:?} -> {:?}", last, got);
                last = got;
            }
            prop_assert_eq!(s.outstanding(), 0);
            prop_assert_eq!(s.committable(&tp()), Some(i64::try_from(n).unwrap_or(i64::MAX)));
        }
    }
}
