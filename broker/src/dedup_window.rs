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

use std::collections::VecDeque;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::log::batch::BatchHeader;
use crate::log::records::{MessageId, RecordId, read_ids};
use crate::log::{LogConfig, LogError, PartitionLog};
use crate::state_file::{self, StateFileError};

/// Where an id was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stored {
    pub(crate) offset: i64,
    pub(crate) timestamp: i64,
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

/// A slot of the id table, 8 bytes: a fingerprint of the id (its low 32 bits, never 0) and
/// the low 32 bits of the sequence number of its latest store; `fp == 0` for a slot never
/// used. A slot's sequence number is read relative to the queue's first one (see
/// [`DedupWindow::live_seq`]), so 32 bits are enough for any window of fewer than 2^32 ids.
#[derive(Debug, Clone, Copy)]
struct Slot {
    fp: u32,
    seq: u32,
}

/// The fingerprint a slot keeps for `id`: its low 32 bits, 0 (the empty slot's) made 1.
fn fingerprint(id: MessageId) -> u32 {
    (id as u32).max(1)
}

/// The slot an id's probe starts at: from its fingerprint (which the slot keeps, so a table
/// can be rebuilt without the ids).
fn home(fp: u32, mask: usize) -> usize {
    (fp as usize) & mask
}
const EMPTY_SLOT: Slot = Slot { fp: 0, seq: 0 };
/// Fewest slots a table has (small in tests, so they grow and rebuild tables often).
const MIN_SLOTS: usize = if cfg!(test) { 16 } else { 1024 };
/// Slots per queued store after a rebuild. The table is rebuilt when half its slots are used
/// (live or stale), so at the cap, with every store new, that is every `SLOTS_PER_ID / 2 - 1`
/// caps' worth of stores; and probes stay short (at most half the slots used).
const SLOTS_PER_ID: usize = 8;
/// Stores after which the table is rebuilt even if it is not half used (ids stored again
/// after they expired reuse their stale slots, so `used` may never grow). With at most
/// [`crate::log::MAX_DEDUP_IDS`] queued, a slot is then never more than 2^31 stores behind the
/// queue's first, so its 32-bit sequence number cannot alias a queued store.
const REBUILD_AFTER_STORES: u64 = if cfg!(test) { 1 << 12 } else { 1 << 30 };

/// [`DedupWindow::live_seq`] for a queue whose first store is `first_seq` and which holds
/// `queued` stores.
fn live_seq(seq: u32, first_seq: u64, queued: usize) -> Option<u64> {
    let behind = u64::from(seq.wrapping_sub(first_seq as u32));
    (behind < queued as u64).then(|| first_seq + behind)
}

/// Empties every slot that `is_live` refuses and moves each live one to where a probe from
/// its home now finds it first; returns the live slots. Slots are taken in probe order from
/// just after an empty one, so every slot between a live one's home and its old place is
/// settled (or empty) when it moves: it lands there or earlier, never past an empty slot.
/// The table must have an empty slot (it is at most half used).
fn clean_in_place(slots: &mut [Slot], is_live: impl Fn(&Slot) -> bool) -> usize {
    let mask = slots.len() - 1;
    let Some(start) = slots.iter().position(|s| s.fp == 0) else {
        return slots.len();
    };
    let mut live = 0;
    for step in 1..=slots.len() {
        let at = (start + step) & mask;
        let slot = slots[at];
        if slot.fp == 0 {
            continue;
        }
        slots[at] = EMPTY_SLOT;
        if !is_live(&slot) {
            continue;
        }
        let mut to = home(slot.fp, mask);
        while slots[to].fp != 0 {
            to = (to + 1) & mask;
        }
        slots[to] = slot;
        live += 1;
    }
    live
}

/// One partition's window.
///
/// Every store goes to the back of `order` and gets the next sequence number. `slots` is an
/// open-addressing table (linear probing, indexed by an id's low 64 bits) from id to the
/// sequence number of its latest store; a slot holds a 32-bit fingerprint of the id, and the
/// id is confirmed against `order`, so a match costs one look into the queue, and the table
/// (8 bytes a slot, 8 slots a cache line) about one cache line per probe. Expiry and the cap pop `order` from the front without touching the
/// table: a slot whose sequence number was popped is stale, read as absent and reused by a
/// later insert on its probe path (it never becomes empty again, so no probe path breaks).
/// When used slots pass half of the table, it is rebuilt with the live ones only, in one pass
/// that reads the old table and writes the new one in order.
#[derive(Debug)]
pub(crate) struct DedupWindow {
    header: String,
    window_ms: i64,
    max_ids: usize,
    /// Id → sequence number of its latest store; a power-of-two length.
    slots: Vec<Slot>,
    /// Slots not empty (live or stale).
    used: usize,
    /// Every store in append order, for expiry and the cap; `order[i]` has sequence number
    /// `first_seq + i`.
    order: VecDeque<(MessageId, Stored)>,
    first_seq: u64,
    /// Records not stored because they were duplicates (since the partition opened).
    pub(crate) dropped: u64,
    /// Ids forgotten before their time because of `max_ids`.
    pub(crate) evicted: u64,
    /// Stores since the table was last rebuilt.
    stores_since_rebuild: u64,
    /// Tests: tables rebuilt.
    #[cfg(test)]
    rebuilds: usize,
}

/// What a probe for an id found.
enum Probe {
    /// The id's slot, and its latest store if that is still queued.
    Found(usize, Stored),
    /// Not there; the slot to put it in (a stale one on its path, or the empty one that ended
    /// the path).
    Absent(usize),
}

impl DedupWindow {
    /// An empty window for `config` (whose `dedup_window_ms` is positive).
    pub(crate) fn new(config: &LogConfig) -> Self {
        Self {
            header: config.dedup_header.clone(),
            window_ms: config.dedup_window_ms,
            max_ids: config.dedup_max_ids as usize,
            slots: vec![EMPTY_SLOT; MIN_SLOTS],
            used: 0,
            order: VecDeque::new(),
            first_seq: 0,
            dropped: 0,
            evicted: 0,
            stores_since_rebuild: 0,
            #[cfg(test)]
            rebuilds: 0,
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

    /// Bytes the window's tables hold: 8 per table slot (8 to 16 slots per queued id after a
    /// rebuild) and 32 per queue slot.
    pub(crate) fn bytes(&self) -> usize {
        self.slots.len() * std::mem::size_of::<Slot>()
            + self.order.capacity() * std::mem::size_of::<(MessageId, Stored)>()
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
            self.order.pop_front();
            self.first_seq += 1;
        }
    }

    fn enforce_cap(&mut self) {
        while self.order.len() > self.max_ids {
            self.order.pop_front();
            self.first_seq += 1;
            self.evicted += 1;
        }
    }

    fn next_seq(&self) -> u64 {
        self.first_seq + self.order.len() as u64
    }

    /// The queued store `seq` names, if it is still queued and is `id`'s.
    fn queued(&self, seq: u64, id: MessageId) -> Option<Stored> {
        let index = usize::try_from(seq.checked_sub(self.first_seq)?).ok()?;
        self.order
            .get(index)
            .filter(|(queued, _)| *queued == id)
            .map(|(_, stored)| *stored)
    }

    /// The full sequence number of a slot's `seq` if it names a store still queued. Read
    /// relative to `first_seq`: exact because no slot outlives [`REBUILD_AFTER_STORES`]
    /// stores without a rebuild, which keeps only live slots.
    fn live_seq(&self, seq: u32) -> Option<u64> {
        live_seq(seq, self.first_seq, self.order.len())
    }

    fn probe(&self, id: MessageId) -> Probe {
        let mask = self.slots.len() - 1;
        let fp = fingerprint(id);
        let mut at = home(fp, mask);
        let mut reuse = None;
        loop {
            let slot = self.slots[at];
            if slot.fp == 0 {
                return Probe::Absent(reuse.unwrap_or(at));
            }
            match self.live_seq(slot.seq) {
                None => {
                    reuse.get_or_insert(at);
                }
                Some(seq) if slot.fp == fp => {
                    if let Some(stored) = self.queued(seq, id) {
                        return Probe::Found(at, stored);
                    }
                }
                Some(_) => {}
            }
            at = (at + 1) & mask;
        }
    }

    /// Points `at` (from [`Self::probe`]) to `seq` for `id`, then grows or cleans the table
    /// when used slots pass half of it (probe paths stay short: stale slots count as used).
    fn set(&mut self, at: usize, id: MessageId, seq: u64) {
        if self.slots[at].fp == 0 {
            self.used += 1;
        }
        self.slots[at] = Slot {
            fp: fingerprint(id),
            // The low 32 bits: `live_seq` restores the rest.
            seq: seq as u32,
        };
        self.stores_since_rebuild += 1;
        if self.used * 2 > self.slots.len() || self.stores_since_rebuild >= REBUILD_AFTER_STORES {
            self.rebuild_table();
        }
    }

    /// A table holding the live slots only, with at least `SLOTS_PER_ID` slots per queued
    /// store (at most one live slot each), so the next rebuild is that many stores away. When
    /// that is the table's present size (a full window, the steady state under load), the
    /// table is cleaned in place rather than allocated again: no new memory to fault in and
    /// zero, which cost more than the rebuild itself.
    fn rebuild_table(&mut self) {
        self.stores_since_rebuild = 0;
        #[cfg(test)]
        {
            self.rebuilds += 1;
        }
        let size = (self.order.len() * SLOTS_PER_ID)
            .max(MIN_SLOTS)
            .next_power_of_two();
        let (first_seq, queued) = (self.first_seq, self.order.len());
        let is_live = |slot: &Slot| slot.fp != 0 && live_seq(slot.seq, first_seq, queued).is_some();
        if size == self.slots.len() {
            self.used = clean_in_place(&mut self.slots, is_live);
            return;
        }
        let mut slots = vec![EMPTY_SLOT; size];
        let mask = size - 1;
        let mut live = 0;
        for slot in self.slots.iter().filter(|s| is_live(s)) {
            // Read in table order and written near their old places: close to sequential.
            let mut at = home(slot.fp, mask);
            while slots[at].fp != 0 {
                at = (at + 1) & mask;
            }
            slots[at] = *slot;
            live += 1;
        }
        self.slots = slots;
        self.used = live;
    }

    /// Where `id` was stored, if that is within the window.
    #[cfg(test)]
    pub(crate) fn original(&self, id: MessageId, now_ms: i64) -> Option<Stored> {
        let cutoff = self.cutoff(now_ms);
        match self.probe(id) {
            Probe::Found(_, stored) if stored.timestamp > cutoff => Some(stored),
            _ => None,
        }
    }

    /// Remembers that `id` was stored at `offset` with `timestamp` (ignored if that is already
    /// outside the window).
    pub(crate) fn insert(&mut self, id: MessageId, offset: i64, timestamp: i64, now_ms: i64) {
        if timestamp <= self.cutoff(now_ms) {
            return;
        }
        let at = match self.probe(id) {
            Probe::Found(at, _) | Probe::Absent(at) => at,
        };
        let seq = self.next_seq();
        self.order.push_back((id, Stored { offset, timestamp }));
        self.set(at, id, seq);
        self.enforce_cap();
    }

    /// Decides a produced batch that, if stored, starts at `base_offset`: a record is a
    /// duplicate when its id is in the window or an earlier record of the same batch has it.
    /// Records without an id are always stored. The ids of the records to store enter the
    /// window at once, at their offsets: the caller appends the batch (or the batch without
    /// the duplicates) next, under the same lock, and if that append fails it drops the window
    /// (rebuilt from the log on next use) rather than undo this.
    /// Under `LogAppendTime` every record is stored with `append_time`, which replaces its own.
    pub(crate) fn decide(
        &mut self,
        records: &[RecordId],
        base_offset: i64,
        now_ms: i64,
        append_time: Option<i64>,
    ) -> Verdict {
        self.expire(now_ms);
        let cutoff = self.cutoff(now_ms);
        // Each id's home slot is, in a large window, a cache miss. Reading them all first, with
        // no load depending on another, lets the processor fetch them at the same time; the
        // probes below then find them in cache. (A prefetch without unsafe code.)
        let mask = self.slots.len() - 1;
        let touched = records.iter().filter_map(|r| r.id).fold(0u32, |acc, id| {
            acc ^ self.slots[home(fingerprint(id), mask)].seq
        });
        std::hint::black_box(touched);
        let mut keep = Vec::new();
        let mut first_original: Option<Stored> = None;
        let mut last_original = i64::MIN;
        for (index, record) in records.iter().enumerate() {
            let duplicate = record.id.and_then(|id| {
                let at = match self.probe(id) {
                    Probe::Found(_, original) if original.timestamp > cutoff => {
                        return Some(original);
                    }
                    Probe::Found(at, _) | Probe::Absent(at) => at,
                };
                // A record already outside the window is stored and not remembered.
                let timestamp = append_time.unwrap_or(record.timestamp);
                if timestamp > cutoff {
                    let seq = self.next_seq();
                    self.order.push_back((
                        id,
                        Stored {
                            offset: base_offset + i64::from(record.offset_delta),
                            timestamp,
                        },
                    ));
                    self.set(at, id, seq);
                }
                None
            });
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

    /// Rebuilds the window for `config` from `log`: the newest snapshot written for the same
    /// header and width (at a segment roll or a clean shutdown), then every batch after it;
    /// without one, every batch whose max timestamp is inside the window. Only records with an
    /// id in batches that are not transactional count, and only those whose timestamp is
    /// still within the window at `now_ms`.
    ///
    /// # Errors
    /// `Io` when the log cannot be read. A snapshot that cannot be read is skipped (an older
    /// one, or the log, is used), and so is a batch whose records cannot be read, with a
    /// warning (it was validated when it was appended; recovery checked its CRC).
    pub(crate) fn rebuild(
        config: &LogConfig,
        log: &PartitionLog,
        now_ms: i64,
    ) -> Result<Self, LogError> {
        let mut window = Self::new(config);
        let from = match load_snapshot(log.dir(), log.log_end_offset(), config) {
            Some(snapshot) => {
                for (id, offset, timestamp) in snapshot.entries {
                    window.insert(id, offset, timestamp, now_ms);
                }
                snapshot.end_offset
            }
            None => log.log_start_offset(),
        };
        window.replay(log, from, now_ms)?;
        Ok(window)
    }

    /// Adds the ids of every batch at or after `from` (see [`Self::rebuild`]).
    fn replay(&mut self, log: &PartitionLog, from: i64, now_ms: i64) -> Result<(), LogError> {
        let cutoff = self.cutoff(now_ms);
        let Some(start) = log.first_offset_of_segment_newer_than(cutoff) else {
            return Ok(());
        };
        let mut offset = start.max(from);
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
                if header.base_offset < from
                    || header.is_control()
                    || header.is_transactional()
                    || header.max_timestamp <= cutoff
                {
                    continue;
                }
                match read_ids(bytes, &self.header) {
                    Ok(batch) => {
                        for record in batch.records {
                            if let Some(id) = record.id {
                                self.insert(
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
        Ok(())
    }

    /// Writes the window as it is for everything below `end_offset` to `dir` (see
    /// [`WindowSnapshot::write`]).
    pub(crate) fn write_snapshot(&self, dir: &Path, end_offset: i64) {
        self.snapshot(end_offset).write(dir);
    }

    /// The window as it is for everything below `end_offset`, to be written later: a copy of
    /// the queue (32 bytes per id, a memory copy), so the caller can let go of the partition
    /// before the slow part (encoding, writing and syncing the file).
    pub(crate) fn snapshot(&self, end_offset: i64) -> WindowSnapshot {
        WindowSnapshot(SnapshotFile {
            end_offset,
            window_ms: self.window_ms,
            header: self.header.clone(),
            entries: self
                .order
                .iter()
                .map(|(id, stored)| (*id, stored.offset, stored.timestamp))
                .collect(),
        })
    }
}

/// A window taken by [`DedupWindow::snapshot`], not yet on disk.
#[derive(Debug)]
pub(crate) struct WindowSnapshot(SnapshotFile);

impl WindowSnapshot {
    /// Writes it to `dir`, atomically, and deletes all but the newest two snapshots there. A
    /// failure is logged: the next start then reads more of the log. Callers writing to the
    /// same directory from several threads take turns (their temporary files share a name
    /// when their end offsets do).
    pub(crate) fn write(self, dir: &Path) {
        let end_offset = self.0.end_offset;
        if let Err(e) = state_file::write(&snapshot_path(dir, end_offset), MAGIC, VERSION, &self.0)
        {
            tracing::warn!(dir = %dir.display(), end_offset, error = %e, "could not write a dedup window snapshot");
            return;
        }
        let mut offsets = list_snapshots(dir);
        offsets.sort_unstable_by(|a, b| b.cmp(a));
        for old in offsets.into_iter().skip(KEPT_SNAPSHOTS) {
            let _ = fs::remove_file(snapshot_path(dir, old));
        }
    }
}

/// A window written to disk: its stores, oldest first, covering every offset below
/// `end_offset`.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotFile {
    end_offset: i64,
    window_ms: i64,
    header: String,
    entries: Vec<(MessageId, i64, i64)>,
}

const MAGIC: &[u8; 8] = b"SEMELDDW";
const VERSION: u16 = 1;
const EXTENSION: &str = "dedup";
const KEPT_SNAPSHOTS: usize = 2;

fn snapshot_path(dir: &Path, end_offset: i64) -> PathBuf {
    dir.join(format!("{end_offset:020}.{EXTENSION}"))
}

fn list_snapshots(dir: &Path) -> Vec<i64> {
    state_file::offsets_named(dir, EXTENSION)
}

/// The newest readable snapshot at or below `log_end_offset` written for `config`'s header
/// and width. Snapshots beyond the log end (the log lost its tail) or unreadable ones are
/// deleted; one for another header or width is left (the topic may be set back).
/// Deletes the window snapshots in `dir` beyond `log_end_offset`: written at a roll before
/// the sealed segment was fsynced, they name records a power cut took. Run at every open,
/// whether or not the topic has a window then: kept, such a snapshot would pass for valid once
/// the log grew past it again, and its ids would turn new records away.
///
/// # Errors
/// `Io` when one cannot be deleted, or the deletion made durable: the partition must not open
/// with it in place.
pub(crate) fn discard_snapshots_beyond(dir: &Path, log_end_offset: i64) -> Result<(), LogError> {
    let beyond: Vec<i64> = list_snapshots(dir)
        .into_iter()
        .filter(|offset| *offset > log_end_offset)
        .collect();
    for &offset in &beyond {
        let path = snapshot_path(dir, offset);
        tracing::warn!(snapshot = %path.display(), log_end_offset, "dedup window snapshot beyond the log end discarded");
        fs::remove_file(&path).map_err(|source| LogError::Io { path, source })?;
    }
    if !beyond.is_empty() {
        // Gone for good: a later power cut must not bring it back once the log is past it.
        state_file::sync_dir(dir).map_err(|e| LogError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
    }
    Ok(())
}

fn load_snapshot(dir: &Path, log_end_offset: i64, config: &LogConfig) -> Option<SnapshotFile> {
    let mut offsets = list_snapshots(dir);
    offsets.sort_unstable_by(|a, b| b.cmp(a));
    for offset in offsets {
        let path = snapshot_path(dir, offset);
        let discard = |reason: &dyn std::fmt::Display| {
            tracing::warn!(snapshot = %path.display(), %reason, "dedup window snapshot discarded");
            let _ = fs::remove_file(&path);
        };
        if offset > log_end_offset {
            discard(&format_args!(
                "covers offsets up to {offset}, beyond the log end {log_end_offset}"
            ));
            continue;
        }
        match state_file::read::<SnapshotFile>(&path, MAGIC, VERSION) {
            Ok(Some(file)) if file.end_offset != offset => {
                discard(&format_args!(
                    "holds end offset {} but is named {offset}",
                    file.end_offset
                ));
            }
            Ok(Some(file)) => {
                if file.header == config.dedup_header && file.window_ms == config.dedup_window_ms {
                    return Some(file);
                }
            }
            Ok(None) => {}
            Err(e @ StateFileError::Corrupt { .. }) => discard(&e),
            Err(e) => {
                tracing::warn!(snapshot = %path.display(), error = %e, "dedup window snapshot unreadable")
            }
        }
    }
    None
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
        assert_eq!(window.decide(&batch, 100, now, None), Verdict::Store);
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
            window.decide(&batch, 103, now, None),
            Verdict::Without(vec![false, true, false, true])
        );
        assert_eq!(window.original(3, now).map(|s| s.offset), Some(104));

        let batch = [record(0, now, Some(2)), record(1, now, Some(1))];
        assert_eq!(
            window.decide(&batch, 107, now, None),
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
            window.decide(&batch, 0, 5, None),
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

    /// Ids stored again after they expired reuse their stale slots, so the table never gets
    /// half used; it is rebuilt every `REBUILD_AFTER_STORES` stores all the same, so no stale
    /// slot lives long enough for its 32-bit sequence number to alias a queued store.
    #[test]
    fn a_table_that_never_fills_is_still_rebuilt_every_so_many_stores() {
        let mut window = DedupWindow::new(&config(1_000, 100));
        let mut grown = 0;
        let rounds = 4 * REBUILD_AFTER_STORES / 10;
        for round in 0..rounds {
            let now = 1_000 + 2_000 * round as i64;
            for id in 0..10u128 {
                window.insert(id, id as i64, now, now);
            }
            window.expire(now + 1_500);
            if round == 0 {
                // The table grew to hold the ten ids; none of that counts.
                grown = window.rebuilds;
            }
        }
        assert!(
            window.used <= 20,
            "stale slots were reused: {} used",
            window.used
        );
        assert!(
            window.rebuilds - grown >= 3,
            "{} rebuilds after the table grew",
            window.rebuilds - grown
        );
    }

    #[test]
    fn forgotten_ids_do_not_pile_up_in_the_map() {
        let mut window = DedupWindow::new(&config(60_000, 100));
        for id in 0..50_000u128 {
            let batch = [record(0, 1_000, Some(id))];
            assert_eq!(
                window.decide(&batch, id as i64, 1_000, None),
                Verdict::Store
            );
            assert!(window.slots.len() <= 4 * 1024, "{}", window.slots.len());
        }
        assert_eq!(window.len(), 100);
        assert_eq!(window.evicted, 49_900);
        assert!(window.original(49_899, 1_000).is_none());
        assert!(window.original(49_900, 1_000).is_some());
        // An evicted id sent again is stored again, and then remembered.
        assert_eq!(
            window.decide(&[record(0, 1_000, Some(7))], 60_000, 1_000, None),
            Verdict::Store
        );
        assert_eq!(window.original(7, 1_000).map(|s| s.offset), Some(60_000));
    }

    #[test]
    fn a_full_window_cleans_its_table_in_place_and_still_finds_every_id() {
        // Scattered homes: at up to half the slots used, linear probing makes runs of
        // neighbours, and a slot left behind a gap (a stale one emptied in place, the slots
        // after it not moved) would be missed.
        let id_of = |n: u128| {
            let mixed = (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            (n << 64) | u128::from(mixed ^ (mixed >> 32))
        };
        let cap = 100u128;
        let mut window = DedupWindow::new(&config(60_000, cap as u32));
        let mut table_len = None;
        let (mut used, mut cleanings) = (0, 0);
        for n in 0..20_000u128 {
            let batch = [record(0, 1_000, Some(id_of(n)))];
            assert_eq!(window.decide(&batch, n as i64, 1_000, None), Verdict::Store);
            if n >= cap {
                // Full: the table keeps its size from here on, cleaned where it is.
                assert_eq!(
                    *table_len.get_or_insert(window.slots.len()),
                    window.slots.len()
                );
                cleanings += usize::from(window.used < used);
            }
            used = window.used;
            for back in 0..(n + 1).min(cap) {
                let id = n - back;
                assert_eq!(
                    window.original(id_of(id), 1_000).map(|s| s.offset),
                    Some(id as i64),
                    "id {id} after storing {n}"
                );
            }
            if n >= cap {
                assert!(window.original(id_of(n - cap), 1_000).is_none());
            }
        }
        assert!(cleanings > 20, "cleaned in place {cleanings} times");
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

    #[test]
    fn a_snapshot_is_loaded_and_a_bad_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(60_000, 100);
        let (log, _) = PartitionLog::open(dir.path(), config.clone(), 0).unwrap();
        let mut window = DedupWindow::new(&config);
        window.insert(1, 7, 50_000, 50_000);
        window.insert(2, 8, 50_001, 50_000);
        // Covers offsets below 0: the (empty) log has nothing after it to replay.
        window.write_snapshot(dir.path(), 0);
        let loaded = DedupWindow::rebuild(&config, &log, 60_000).unwrap();
        assert_eq!(loaded.original(1, 60_000).map(|s| s.offset), Some(7));
        assert_eq!(loaded.original(2, 60_000).map(|s| s.offset), Some(8));
        // Loading applies the clock: 1 has expired by 110_000, 2 not yet.
        let later = DedupWindow::rebuild(&config, &log, 110_000).unwrap();
        assert_eq!(later.original(1, 110_000), None);
        assert_eq!(later.len(), 1);

        // Another header: not this window's snapshot (kept for that setting).
        let other = LogConfig {
            dedup_header: "other-id".into(),
            ..config.clone()
        };
        assert_eq!(DedupWindow::rebuild(&other, &log, 60_000).unwrap().len(), 0);
        assert!(snapshot_path(dir.path(), 0).exists());

        // Beyond the log end (the log lost its tail): deleted, not used.
        window.write_snapshot(dir.path(), 5);
        let path = snapshot_path(dir.path(), 5);
        assert!(path.exists());
        let _ = DedupWindow::rebuild(&config, &log, 60_000).unwrap();
        assert!(!path.exists());

        // A corrupt one is deleted; nothing is loaded from it.
        fs::write(snapshot_path(dir.path(), 0), b"not a snapshot").unwrap();
        assert_eq!(
            DedupWindow::rebuild(&config, &log, 60_000).unwrap().len(),
            0
        );
        assert!(!snapshot_path(dir.path(), 0).exists());
    }

    /// The window against a plain list: same verdicts and same answers for every id, through
    /// random batches, clock jumps and caps, with ids that share their high bits (long probe
    /// paths) or their low bits (slots that match but are another id).
    mod model {
        use proptest::prelude::*;

        use super::*;

        #[derive(Debug, Default)]
        struct Model {
            queue: VecDeque<(MessageId, Stored)>,
        }

        impl Model {
            fn original(&self, id: MessageId, cutoff: i64) -> Option<Stored> {
                self.queue
                    .iter()
                    .rev()
                    .find(|(queued, _)| *queued == id)
                    .map(|(_, stored)| *stored)
                    .filter(|stored| stored.timestamp > cutoff)
            }

            fn decide(
                &mut self,
                records: &[RecordId],
                base_offset: i64,
                cutoff: i64,
                cap: usize,
            ) -> Verdict {
                while self
                    .queue
                    .front()
                    .is_some_and(|(_, s)| s.timestamp <= cutoff)
                {
                    self.queue.pop_front();
                }
                let mut keep = Vec::new();
                let mut originals = Vec::new();
                for record in records {
                    let original = record.id.and_then(|id| self.original(id, cutoff));
                    match (original, record.id) {
                        (Some(original), _) => {
                            keep.push(false);
                            originals.push(original);
                        }
                        (None, id) => {
                            keep.push(true);
                            if let Some(id) = id
                                && record.timestamp > cutoff
                            {
                                self.queue.push_back((
                                    id,
                                    Stored {
                                        offset: base_offset + i64::from(record.offset_delta),
                                        timestamp: record.timestamp,
                                    },
                                ));
                            }
                        }
                    }
                }
                while self.queue.len() > cap {
                    self.queue.pop_front();
                }
                if keep.iter().all(|k| *k) {
                    Verdict::Store
                } else if keep.iter().any(|k| *k) {
                    Verdict::Without(keep)
                } else {
                    Verdict::AllDuplicates {
                        first: originals[0],
                        last_offset: originals.iter().map(|o| o.offset).max().unwrap_or(0),
                    }
                }
            }
        }

        fn id_of(n: u8) -> MessageId {
            // The low half is n % 8, the high half n / 8: eight ids share each low half (the
            // same home slot, and a slot that matches but is another id), and neighbouring
            // homes make long probe paths.
            (u128::from(n / 8) << 64) | u128::from(n % 8)
        }

        proptest! {
            #[test]
            fn the_window_answers_as_a_plain_list_does(
                cap in 1u32..40,
                // Slots keep the low 32 bits of a sequence number: also start just below 2^32,
                // so the numbers wrap within the run.
                first_seq in proptest::sample::select(vec![0u64, (1u64 << 32) - 300]),
                steps in proptest::collection::vec(
                    (
                        proptest::collection::vec((proptest::option::weighted(0.9, 0u8..64), 0i64..1_500), 1..6),
                        0i64..400,
                    ),
                    1..200,
                ),
            ) {
                let mut window = DedupWindow::new(&config(1_000, cap));
                window.first_seq = first_seq;
                let mut model = Model::default();
                let mut now = 10_000i64;
                let mut offset = 0i64;
                for (batch, advance) in steps {
                    now += advance;
                    let records: Vec<RecordId> = batch
                        .iter()
                        .enumerate()
                        .map(|(i, (n, age))| record(i as i32, now - age, n.map(id_of)))
                        .collect();
                    let cutoff = now - 1_000;
                    let expected = model.decide(&records, offset, cutoff, cap as usize);
                    let got = window.decide(&records, offset, now, None);
                    prop_assert_eq!(&got, &expected);
                    if !matches!(got, Verdict::AllDuplicates { .. }) {
                        offset += records.len() as i64;
                    }
                    for n in 0..64u8 {
                        prop_assert_eq!(
                            window.original(id_of(n), now),
                            model.original(id_of(n), cutoff),
                            "id {}", n
                        );
                    }
                    prop_assert_eq!(window.len(), model.queue.len());
                }
            }
        }
    }
}
