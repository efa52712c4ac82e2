//! One partition as the request handlers see it: the partition log behind a lock, the
//! producer state that makes idempotent appends exactly-once, and group commit for `acks=all`.
//!
//! Idempotent appends: the producer-state lock is held from the sequence check until the batch
//! is written and recorded, so two copies of one batch (a retry racing its original) are
//! decided one after the other: the second finds the first already recorded and is answered as
//! a duplicate with the original's offsets. For `acks=all` the duplicate then waits for the same
//! fsync as the original, so a retry that arrives while the original is being fsynced gets the
//! original's result, and never a second append or an error caused by the race.
//!
//! Lock order: producer state, then log.
//!
//! Group commit: a producer waiting for durability takes the flush lock; whoever holds it fsyncs
//! everything appended so far, so producers that queued behind it find their batch already
//! covered and return without a second fsync. No background task is needed, and dropping a
//! waiter (a closed connection) never leaves the lock held.
//!
//! References: Kafka design notes on `acks` and `flush.messages`; KIP-98 (acks=all semantics).

use std::borrow::Cow;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kafka_protocol::ResponseError;
use tokio::sync::watch;

use crate::dedup_window::{DedupWindow, Verdict, WindowSnapshot};
use crate::idempotence::snapshot::{self, SnapshotFile};
use crate::idempotence::{BatchIdentity, CachedBatch, Decision, ProducerEntry, ProducerStateTable};
use crate::log::batch::{ControlType, control_batch, control_type};
use crate::log::records::{self, BatchRecords};
use crate::log::{
    AppendInfo, BatchHeader, LogConfig, LogError, MaintenanceReport, PartitionLog, ReadResult,
    RecoveryReport, ValidatedBatch,
};
use crate::transactions::partition::{AbortedTxn, PartitionTxns};

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Appended {
    /// The batch was written.
    New(AppendInfo),
    /// The batch was already in the log: nothing was written; this is the original.
    Duplicate(CachedBatch),
}

impl Appended {
    /// Offset after the batch's last record (what `acks=all` waits to be durable).
    pub(crate) fn end_offset(&self) -> i64 {
        match self {
            Self::New(info) => info.last_offset + 1,
            Self::Duplicate(original) => original.last_offset + 1,
        }
    }
}

/// Why an append was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AppendError {
    /// The log refused or failed the write.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The batch's epoch is older than the one this partition knows.
    #[error(
        "producer {producer_id} sent epoch {epoch}, older than its current epoch {current_epoch} on this partition (fenced)"
    )]
    Fenced {
        /// The producer.
        producer_id: i64,
        /// The batch's epoch.
        epoch: i16,
        /// The epoch this partition knows.
        current_epoch: i16,
    },
    /// The batch's first sequence is not the next one expected.
    #[error(
        "out of order sequence number for producer {producer_id} at epoch {epoch}: expected sequence {expected}, received {first_sequence}"
    )]
    OutOfOrder {
        /// The producer.
        producer_id: i64,
        /// The batch's epoch.
        epoch: i16,
        /// The sequence that would have been accepted.
        expected: i32,
        /// The batch's first sequence.
        first_sequence: i32,
    },
    /// A transactional batch outside a transaction of its producer that includes this
    /// partition, or a non-transactional batch while the producer has one open here.
    #[error("{reason}")]
    TxnState {
        /// What is wrong.
        reason: String,
    },
    /// A transactional batch in a Produce request without a `transactional_id`.
    #[error(
        "transactional batch from producer {producer_id} in a produce request without a transactional id"
    )]
    TransactionalIdMissing {
        /// The producer.
        producer_id: i64,
    },
    /// The batch carries a producer id but no sequence, or is a control batch.
    #[error("invalid record batch: {reason}")]
    Invalid {
        /// What is wrong.
        reason: String,
    },
}

impl AppendError {
    /// The Kafka error code to answer with.
    pub(crate) fn code(&self) -> ResponseError {
        match self {
            Self::Log(e) => e.code(),
            Self::Fenced { .. } => ResponseError::InvalidProducerEpoch,
            Self::OutOfOrder { .. } => ResponseError::OutOfOrderSequenceNumber,
            Self::TxnState { .. } => ResponseError::InvalidTxnState,
            Self::TransactionalIdMissing { .. } => {
                ResponseError::TransactionalIdAuthorizationFailed
            }
            Self::Invalid { .. } => ResponseError::InvalidRecord,
        }
    }
}

/// One producer as DescribeProducers reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProducerView {
    pub(crate) producer_id: i64,
    pub(crate) epoch: i16,
    pub(crate) last_sequence: i32,
    pub(crate) last_timestamp_ms: i64,
}

/// Sequences and transactions of the partition's producers, under one lock: a transaction's
/// batches, its marker and the LSO are decided in one order.
#[derive(Debug, Default)]
struct Producers {
    table: ProducerStateTable,
    txns: PartitionTxns,
    /// The message-id dedup window, when the topic has one (built on first use).
    window: Option<DedupWindow>,
}

/// Checks a transactional batch against the transaction coordinator: its producer id and epoch
/// must be the current ones of a transaction that has added this partition. Called with the
/// partition's producer lock held, so a marker cannot slip in between the check and the append.
pub(crate) type TxnVerifier<'a> = &'a dyn Fn(&BatchHeader) -> Result<(), AppendError>;

/// The verifier for partitions no transaction may write to (and tests).
pub(crate) fn no_transactions(header: &BatchHeader) -> Result<(), AppendError> {
    Err(AppendError::TxnState {
        reason: format!(
            "transactional batch from producer {}: no transaction of it includes this partition",
            header.producer_id
        ),
    })
}

/// A partition: its log and its durability state.
#[derive(Debug)]
pub(crate) struct Partition {
    pub(crate) topic: String,
    pub(crate) index: i32,
    /// Producer state and open transactions; locked before `log` when both are needed.
    producers: Mutex<Producers>,
    /// Most producers remembered; the least recently used is evicted beyond it.
    max_producers: usize,
    log: Mutex<PartitionLog>,
    /// Every offset below this is fsynced.
    durable_end: AtomicI64,
    flush_lock: tokio::sync::Mutex<()>,
    /// Held while a dedup window snapshot is written (from a roll, on its own thread, or at
    /// close): one at a time.
    window_snapshots: Arc<Mutex<()>>,
    /// A roll's window snapshot is copied and not written yet: a roll meanwhile takes none
    /// (its copy, tens of MB, and its thread would pile up with tiny segments; a later roll's
    /// or the close's snapshot covers as much).
    window_snapshot_pending: Arc<AtomicBool>,
    /// Set when the topic is deleted: a roll's snapshot still waiting is not written (its
    /// directory may by then be a new topic's of the same name).
    retired: Arc<AtomicBool>,
    /// Tests: threads started for roll snapshots.
    #[cfg(test)]
    window_snapshot_threads: std::sync::atomic::AtomicUsize,
    /// Bumped after every append so long-polling fetches re-check.
    appended: Arc<watch::Sender<u64>>,
    /// Tests: the next fsync of `wait_durable` fails as an `EIO` would.
    #[cfg(test)]
    fail_next_sync: AtomicBool,
}

impl Partition {
    /// Opens (recovering) the log in `dir` and fsyncs whatever recovery kept, so everything
    /// below the log end offset is durable from the start. Then rebuilds the producer state:
    /// the newest intact snapshot, plus every batch appended after it.
    pub(crate) fn open(
        topic: &str,
        index: i32,
        dir: &Path,
        config: LogConfig,
        max_producers: usize,
        now_ms: i64,
        appended: Arc<watch::Sender<u64>>,
    ) -> Result<(Self, RecoveryReport), LogError> {
        let (mut log, report) = PartitionLog::open(dir, config, now_ms)?;
        log.flush()?;
        crate::dedup_window::discard_snapshots_beyond(dir, log.log_end_offset())?;
        let producers = rebuild_producer_state(topic, index, &log, max_producers, now_ms)?;
        let window = if log.config().dedup_window_ms > 0 {
            match DedupWindow::rebuild(log.config(), &log, now_ms) {
                Ok(window) => {
                    tracing::info!(
                        topic,
                        partition = index,
                        ids = window.len(),
                        "dedup window rebuilt from the log"
                    );
                    Some(window)
                }
                Err(e) => {
                    // Retried at the first append, which fails while the log cannot be read.
                    tracing::warn!(topic, partition = index, error = %e, "dedup window not rebuilt yet");
                    None
                }
            }
        } else {
            None
        };
        let producers = Producers {
            table: producers.0,
            txns: producers.1,
            window,
        };
        let durable_end = AtomicI64::new(log.log_end_offset());
        Ok((
            Self {
                topic: topic.to_string(),
                index,
                producers: Mutex::new(producers),
                max_producers,
                log: Mutex::new(log),
                durable_end,
                flush_lock: tokio::sync::Mutex::new(()),
                window_snapshots: Arc::new(Mutex::new(())),
                window_snapshot_pending: Arc::new(AtomicBool::new(false)),
                retired: Arc::new(AtomicBool::new(false)),
                #[cfg(test)]
                window_snapshot_threads: std::sync::atomic::AtomicUsize::new(0),
                appended,
                #[cfg(test)]
                fail_next_sync: AtomicBool::new(false),
            },
            report,
        ))
    }

    /// The log, locked. Appends and reads are short, in-memory-index guided file operations.
    pub(crate) fn log(&self) -> MutexGuard<'_, PartitionLog> {
        // A panic while holding the lock cannot leave the log half-updated in memory (append
        // updates its state only after the write succeeded), so a poisoned lock is still usable.
        self.log
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn producers(&self) -> MutexGuard<'_, Producers> {
        // The table is only changed after the append it records succeeded; still usable.
        self.producers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends one validated batch and wakes long-polling fetches. A batch with a producer id
    /// is checked against the producer state first (docs/idempotence.md): a duplicate of one
    /// of the producer's last five batches is not written again and the original is returned.
    #[cfg(test)]
    pub(crate) fn append(
        &self,
        batch: &ValidatedBatch,
        now_ms: i64,
    ) -> Result<Appended, AppendError> {
        self.append_verified(batch, now_ms, &no_transactions)
    }

    /// [`Partition::append`], with transactional batches checked by `verify` (after the
    /// duplicate check: a copy of a batch already stored is answered as before, whatever the
    /// transaction's state now).
    pub(crate) fn append_verified(
        &self,
        batch: &ValidatedBatch,
        now_ms: i64,
        verify: TxnVerifier<'_>,
    ) -> Result<Appended, AppendError> {
        let header = batch.header();
        let mut guard = self.producers();
        let Producers {
            table: producers,
            txns,
            window,
        } = &mut *guard;
        let identity = if header.has_producer_id() {
            if header.base_sequence < 0 || header.producer_epoch < 0 {
                return Err(AppendError::Invalid {
                    reason: format!(
                        "batch from producer {} has epoch {} and base sequence {}",
                        header.producer_id, header.producer_epoch, header.base_sequence
                    ),
                });
            }
            let identity = identity_of(header);
            match producers.check(&identity) {
                Decision::Append => {}
                Decision::Duplicate(original) => {
                    tracing::info!(
                        topic = %self.topic,
                        partition = self.index,
                        producer_id = identity.producer_id,
                        epoch = identity.producer_epoch,
                        first_sequence = identity.first_sequence,
                        last_sequence = identity.last_sequence,
                        original_base_offset = original.base_offset,
                        "duplicate batch dropped; answering with the original offset"
                    );
                    return Ok(Appended::Duplicate(original));
                }
                Decision::Fenced { current_epoch } => {
                    tracing::warn!(topic = %self.topic, partition = self.index, producer_id = identity.producer_id, epoch = identity.producer_epoch, current_epoch, "fenced batch refused (INVALID_PRODUCER_EPOCH)");
                    return Err(AppendError::Fenced {
                        producer_id: identity.producer_id,
                        epoch: identity.producer_epoch,
                        current_epoch,
                    });
                }
                Decision::OutOfOrder { expected } => {
                    tracing::warn!(topic = %self.topic, partition = self.index, producer_id = identity.producer_id, epoch = identity.producer_epoch, expected, first_sequence = identity.first_sequence, "out-of-order batch refused (OUT_OF_ORDER_SEQUENCE_NUMBER)");
                    return Err(AppendError::OutOfOrder {
                        producer_id: identity.producer_id,
                        epoch: identity.producer_epoch,
                        expected,
                        first_sequence: identity.first_sequence,
                    });
                }
            }
            if header.is_transactional() {
                verify(header)?;
            } else if txns.is_ongoing(header.producer_id) {
                return Err(AppendError::TxnState {
                    reason: format!(
                        "producer {} sent a non-transactional batch while its transaction on this partition is open",
                        header.producer_id
                    ),
                });
            }
            Some(identity)
        } else {
            None
        };
        let mut log = self.log();
        // The message-id dedup window (docs/dedup-window.md), for batches outside transactions.
        let plan = if header.is_transactional() {
            None
        } else {
            self.window_plan(window, &log, batch, now_ms)?
        };
        let appended = match plan {
            None | Some((_, Verdict::Store)) => log.append(batch, now_ms),
            Some((records, Verdict::Without(keep))) => {
                let rebuilt = records::without(batch, &records, &keep);
                let dropped = keep.iter().filter(|k| !**k).count();
                if let Some(window) = window.as_mut() {
                    window.dropped += dropped as u64;
                }
                tracing::debug!(topic = %self.topic, partition = self.index, dropped, "dedup window: duplicate records not stored");
                log.append(&rebuilt, now_ms)
            }
            Some((records, Verdict::AllDuplicates { first, last_offset })) => {
                drop(log);
                let log_append_time_ms = if self.log().config().timestamp_type
                    == crate::log::TimestampType::LogAppendTime
                {
                    first.timestamp
                } else {
                    -1
                };
                let original = CachedBatch {
                    first_sequence: identity.map_or(-1, |i| i.first_sequence),
                    last_sequence: identity.map_or(-1, |i| i.last_sequence),
                    base_offset: first.offset,
                    last_offset,
                    log_append_time_ms,
                };
                if let Some(window) = window.as_mut() {
                    window.dropped += records.records.len() as u64;
                }
                tracing::debug!(topic = %self.topic, partition = self.index, original_offset = first.offset, records = records.records.len(), "dedup window: every record of the batch is a duplicate; nothing stored");
                if let Some(identity) = identity {
                    // Nothing in the log says this producer sent these sequences: the state
                    // is snapshotted now, so its next batch is in order after a restart.
                    producers.record(&identity, original, now_ms, self.max_producers);
                    let end = self.log().log_end_offset();
                    crate::blocking::may_block(|| self.write_snapshot(&guard, end, now_ms));
                }
                return Ok(Appended::Duplicate(original));
            }
        };
        drop(log);
        let info = match appended {
            Ok(info) => info,
            Err(e) => {
                // The window already holds the batch's ids; the log does not. Rebuilt from
                // the log on the next append.
                *window = None;
                return Err(e.into());
            }
        };
        if header.is_transactional() {
            txns.on_data(header.producer_id, info.base_offset);
        }
        if let Some(identity) = identity {
            let cached = CachedBatch {
                first_sequence: identity.first_sequence,
                last_sequence: identity.last_sequence,
                base_offset: info.base_offset,
                last_offset: info.last_offset,
                log_append_time_ms: info.log_append_time_ms,
            };
            if let Some(evicted) = producers.record(&identity, cached, now_ms, self.max_producers) {
                tracing::warn!(topic = %self.topic, partition = self.index, evicted_producer_id = evicted, max_producers = self.max_producers, "producer state full; evicted the least recently used producer");
            }
        }
        self.appended_under(guard, &info, now_ms);
        Ok(Appended::New(info))
    }

    /// The dedup window's decision for `batch`, or `None` when the topic has no window or
    /// no record of the batch carries an id. Builds (or rebuilds, after the topic's setting
    /// changed) the window from the log first.
    fn window_plan<'b>(
        &self,
        window: &mut Option<DedupWindow>,
        log: &PartitionLog,
        batch: &'b ValidatedBatch,
        now_ms: i64,
    ) -> Result<Option<(Cow<'b, BatchRecords>, Verdict)>, AppendError> {
        let config = log.config();
        if config.dedup_window_ms <= 0 {
            *window = None;
            return Ok(None);
        }
        if !window.as_ref().is_some_and(|w| w.built_for(config)) {
            let rebuilt = crate::blocking::may_block(|| DedupWindow::rebuild(config, log, now_ms))?;
            tracing::info!(topic = %self.topic, partition = self.index, ids = rebuilt.len(), window_ms = config.dedup_window_ms, header = %config.dedup_header, "dedup window built from the log");
            *window = Some(rebuilt);
        }
        let Some(window) = window.as_mut() else {
            return Ok(None);
        };
        window.set_max_ids(config.dedup_max_ids);
        let append_time =
            (config.timestamp_type == crate::log::TimestampType::LogAppendTime).then_some(now_ms);
        // Read during validation, unless the topic's header changed since.
        let records = match batch.ids() {
            Some(ids) if ids.header == window.header() => Cow::Borrowed(ids),
            _ => Cow::Owned(records::read_ids(batch.bytes(), window.header())?),
        };
        if records.records.iter().all(|r| r.id.is_none()) {
            return Ok(None);
        }
        let verdict = window.decide(&records.records, log.log_end_offset(), now_ms, append_time);
        Ok(Some((records, verdict)))
    }

    /// After an append, with the producer lock still held: a roll snapshots the producer
    /// state at the new segment's start; then the lock goes and long-polling fetches wake.
    fn appended_under(&self, guard: MutexGuard<'_, Producers>, info: &AppendInfo, now_ms: i64) {
        let mut window = None;
        if info.rolled {
            // The window's snapshot (tens of MB for a full window) is copied here and written
            // after the lock is gone, on a thread of its own: written under the lock it held
            // every produce to this partition for about a second per roll.
            window = guard
                .window
                .as_ref()
                .filter(|_| !self.window_snapshot_pending.swap(true, Ordering::AcqRel))
                .map(|w| w.snapshot(info.last_offset + 1));
            crate::blocking::may_block(|| {
                self.write_snapshot(&guard, info.last_offset + 1, now_ms);
            });
        }
        drop(guard);
        if let Some(snapshot) = window {
            self.write_window_snapshot_later(snapshot);
        }
        self.appended
            .send_modify(|generation| *generation = generation.wrapping_add(1));
    }

    /// Appends a transaction marker for `producer_id` (the coordinator's current epoch for it)
    /// and ends its transaction here. Returns the marker's offset; the caller waits for it to
    /// be durable before it records the transaction complete.
    pub(crate) fn write_marker(
        &self,
        producer_id: i64,
        producer_epoch: i16,
        control: ControlType,
        now_ms: i64,
    ) -> Result<i64, AppendError> {
        let batch = control_batch(producer_id, producer_epoch, control, 0, now_ms);
        let mut guard = self.producers();
        let info = self.log().append(&batch, now_ms)?;
        guard.txns.on_marker(producer_id, control, info.base_offset);
        guard.table.bump_epoch(producer_id, producer_epoch);
        self.appended_under(guard, &info, now_ms);
        Ok(info.base_offset)
    }

    /// The last stable offset: below it every transaction is decided.
    pub(crate) fn last_stable_offset(&self) -> i64 {
        let guard = self.producers();
        let end = self.log().log_end_offset();
        guard.txns.last_stable_offset(end)
    }

    /// A `read_committed` read: whole batches from `fetch_offset` below the LSO, with the LSO
    /// and the aborted transactions the returned batches overlap.
    pub(crate) fn read_committed(
        &self,
        fetch_offset: i64,
        max_bytes: usize,
    ) -> Result<(ReadResult, i64, Vec<AbortedTxn>), LogError> {
        let guard = self.producers();
        let log = self.log();
        let lso = guard.txns.last_stable_offset(log.log_end_offset());
        let read = log.read_below(fetch_offset, max_bytes, lso)?;
        let aborted = guard.txns.aborted_between(fetch_offset, read.next_offset);
        Ok((read, lso, aborted))
    }

    /// Writes a producer-state snapshot covering everything below `end_offset`. A failure is
    /// logged, not returned: recovery then falls back to an older snapshot and replays more log.
    fn write_snapshot(&self, producers: &Producers, end_offset: i64, now_ms: i64) {
        let file = SnapshotFile {
            end_offset,
            written_ms: now_ms,
            producers: producers
                .table
                .iter()
                .map(|(id, e)| (*id, e.clone()))
                .collect(),
            ongoing: producers.txns.ongoing(),
            aborted: producers.txns.aborted().to_vec(),
        };
        let dir = self.log().dir().to_path_buf();
        match snapshot::write(&dir, &file) {
            Ok(()) => {
                tracing::debug!(topic = %self.topic, partition = self.index, end_offset, producers = file.producers.len(), "producer snapshot written")
            }
            Err(e) => {
                tracing::warn!(topic = %self.topic, partition = self.index, end_offset, error = %e, "could not write a producer snapshot")
            }
        }
    }

    /// Checkpoints the recovery point at the durable end (if it moved): a start after a crash
    /// then checks the log from there on, not from an older checkpoint.
    ///
    /// # Errors
    /// `Io` when the checkpoint cannot be written (the previous one stays).
    pub(crate) fn checkpoint_recovery_point(&self) -> Result<(), LogError> {
        let durable = self.durable_end();
        let mut log = self.log();
        // A deleted topic's directory may be a new topic's of the same name by now (checked
        // under the log's lock, which `retire` takes after setting the flag).
        if self.retired.load(Ordering::Acquire) {
            return Ok(());
        }
        log.checkpoint_recovery_point(durable)
    }

    /// Rolls by time, applies retention, and forgets producers idle for longer than
    /// `producer_expiration_ms` (`producer.id.expiration.ms`). Producer state is kept when
    /// retention deletes the producer's records. A roll writes a snapshot.
    pub(crate) fn maintain(
        &self,
        now_ms: i64,
        producer_expiration_ms: i64,
    ) -> Result<(MaintenanceReport, usize), LogError> {
        let mut producers = self.producers();
        let Producers {
            table,
            txns,
            window,
        } = &mut *producers;
        if let Some(window) = window.as_mut() {
            window.expire(now_ms);
        }
        // A producer with a transaction open here is kept (as Kafka does): its marker is
        // still to come.
        let expired = table.expire_except(now_ms, producer_expiration_ms, |id| txns.is_ongoing(id));
        let (report, end) = {
            let mut log = self.log();
            let report = log.maintain(now_ms)?;
            txns.trim(log.log_start_offset());
            // Everything below the durable end was fsynced: recovery never cuts below it.
            log.checkpoint_recovery_point(self.durable_end.load(Ordering::Acquire))?;
            (report, log.log_end_offset())
        };
        if report.rolled || expired > 0 {
            self.write_snapshot(&producers, end, now_ms);
        }
        let window = report
            .rolled
            .then(|| {
                producers
                    .window
                    .as_ref()
                    .filter(|_| !self.window_snapshot_pending.swap(true, Ordering::AcqRel))
                    .map(|w| w.snapshot(end))
            })
            .flatten();
        drop(producers);
        if let Some(snapshot) = window {
            self.write_window_snapshot_later(snapshot);
        }
        Ok((report, expired))
    }

    /// DeleteRecords: every offset below `offset` (the high watermark for -1) is gone; returns
    /// the log start offset after it. Producer state stays (as in Kafka); the aborted
    /// transactions below the new start are forgotten.
    pub(crate) fn delete_records(&self, offset: i64) -> Result<i64, LogError> {
        let mut producers = self.producers();
        let mut log = self.log();
        let offset = if offset == -1 {
            log.log_end_offset()
        } else {
            offset
        };
        let start = log.delete_records_before(offset)?;
        producers.txns.trim(start);
        Ok(start)
    }

    /// Fsyncs the log and snapshots the producer state at the log end (clean shutdown).
    pub(crate) fn close(&self, now_ms: i64) -> Result<(), LogError> {
        let producers = self.producers();
        let end = {
            let mut log = self.log();
            log.flush()?;
            let end = log.log_end_offset();
            log.checkpoint_recovery_point(end)?;
            end
        };
        self.write_snapshot(&producers, end, now_ms);
        self.write_window_snapshot(&producers, end);
        Ok(())
    }

    /// Writes the dedup window (if the topic has one) as of `end_offset`, the log end, now: at
    /// a clean shutdown, so a start reads at most the log after it. Waits for a snapshot still
    /// being written from a roll.
    fn write_window_snapshot(&self, producers: &Producers, end_offset: i64) {
        if let Some(window) = producers.window.as_ref() {
            let dir = self.log().dir().to_path_buf();
            let _turn = self
                .window_snapshots
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            window.write_snapshot(&dir, end_offset);
        }
    }

    /// Writes a window snapshot taken at a roll on a thread of its own, in turn with the
    /// others of this partition, unless the topic was deleted meanwhile. If no thread can be
    /// started it is not written (logged): a start then reads more of the log, as after a
    /// failed write.
    fn write_window_snapshot_later(&self, snapshot: WindowSnapshot) {
        let dir = self.log().dir().to_path_buf();
        let turns = Arc::clone(&self.window_snapshots);
        let pending = Arc::clone(&self.window_snapshot_pending);
        let retired = Arc::clone(&self.retired);
        #[cfg(test)]
        self.window_snapshot_threads.fetch_add(1, Ordering::Relaxed);
        let spawned = std::thread::Builder::new()
            .name("semel-dedup-snapshot".into())
            .spawn(move || {
                let _turn = turns.lock().unwrap_or_else(|p| p.into_inner());
                if !retired.load(Ordering::Acquire) {
                    snapshot.write(&dir);
                }
                pending.store(false, Ordering::Release);
            });
        if let Err(e) = spawned {
            self.window_snapshot_pending.store(false, Ordering::Release);
            tracing::warn!(topic = %self.topic, partition = self.index, error = %e, "no thread for the dedup window snapshot; not written");
        }
    }

    /// The topic is being deleted: no roll snapshot or recovery point checkpoint is written
    /// from now on, and one being written is finished before this returns (so it lands before
    /// the directory moves).
    pub(crate) fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        // A recovery point checkpoint under way finishes first, too.
        drop(self.log());
        drop(
            self.window_snapshots
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
    }

    /// Every remembered producer, ordered by producer id.
    pub(crate) fn producer_views(&self) -> Vec<ProducerView> {
        let producers = self.producers();
        let mut views: Vec<ProducerView> = producers
            .table
            .iter()
            .map(|(id, entry): (&i64, &ProducerEntry)| ProducerView {
                producer_id: *id,
                epoch: entry.epoch,
                last_sequence: entry.last_sequence().unwrap_or(-1),
                last_timestamp_ms: entry.last_timestamp_ms,
            })
            .collect();
        views.sort_unstable_by_key(|v| v.producer_id);
        views
    }

    /// The dedup window's (ids, bytes, duplicates dropped, ids evicted by the cap), if the
    /// topic has one.
    pub(crate) fn dedup_window_stats(&self) -> Option<(usize, usize, u64, u64)> {
        let producers = self.producers();
        producers
            .window
            .as_ref()
            .map(|w| (w.len(), w.bytes(), w.dropped, w.evicted))
    }

    /// Every offset below this is fsynced.
    pub(crate) fn durable_end(&self) -> i64 {
        self.durable_end.load(Ordering::Acquire)
    }

    /// Fsyncs what was appended since the last fsync, if anything (the periodic flush).
    pub(crate) async fn flush_written(&self) -> Result<(), LogError> {
        let end = self.log().log_end_offset();
        if self.durable_end() >= end {
            return Ok(());
        }
        self.wait_durable(end).await
    }

    /// Returns once every offset below `end_offset` is fsynced (group commit).
    pub(crate) async fn wait_durable(&self, end_offset: i64) -> Result<(), LogError> {
        loop {
            if self.durable_end.load(Ordering::Acquire) >= end_offset {
                return Ok(());
            }
            let _flushing = self.flush_lock.lock().await;
            if self.durable_end.load(Ordering::Acquire) >= end_offset {
                return Ok(());
            }
            let sync = self.log().sync_target()?;
            let target = sync.end();
            #[cfg(test)]
            let injected = self.fail_next_sync.swap(false, Ordering::AcqRel);
            #[cfg(not(test))]
            let injected = false;
            let synced = tokio::task::spawn_blocking(move || {
                if injected {
                    return Err(std::io::Error::from_raw_os_error(5)); // EIO
                }
                sync.sync().map(|()| sync)
            })
            .await
            .map_err(|join| std::io::Error::other(join.to_string()))
            .and_then(|result| result);
            let sync = match synced {
                Ok(sync) => sync,
                Err(source) => {
                    let error = LogError::Sync {
                        topic_partition: format!("{}-{}", self.topic, self.index),
                        source,
                    };
                    self.log().fsync_failed(&error);
                    return Err(error);
                }
            };
            self.log().synced(&sync);
            debug_assert!(
                target <= self.log().log_end_offset(),
                "synced up to {target}, beyond the log end"
            );
            // Only grows: an fsync that returns late never takes back what a later one gave.
            self.durable_end.fetch_max(target, Ordering::AcqRel);
        }
    }
}

/// Tests: segment rolls of one named topic take as long as a stalled disk would.
#[cfg(test)]
pub(crate) mod slow_disk {
    use std::path::Path;
    use std::sync::Mutex;
    use std::time::Duration;

    static SLOW: Mutex<Option<(String, Duration)>> = Mutex::new(None);

    /// Every segment roll of `topic`'s partitions from now on sleeps `delay` first (blocking
    /// its thread).
    pub(crate) fn set(topic: &str, delay: Duration) {
        *SLOW.lock().unwrap_or_else(|p| p.into_inner()) = Some((topic.to_string(), delay));
    }

    /// Called by a roll of the partition log in `dir` (`<topic>-<partition>`).
    pub(crate) fn stall(dir: &Path) {
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let delay = match &*SLOW.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((topic, delay)) if name.starts_with(&format!("{topic}-")) => *delay,
            _ => return,
        };
        std::thread::sleep(delay);
    }
}

fn identity_of(header: &BatchHeader) -> BatchIdentity {
    BatchIdentity::new(
        header.producer_id,
        header.producer_epoch,
        header.base_sequence,
        header.last_offset_delta,
    )
}

/// The newest intact snapshot, then every batch after it, recorded without validation (they
/// were validated when appended), and every marker after it. Replayed producers count as
/// active at `now_ms`, so expiry runs from the restart: state may live one expiration period
/// longer, never shorter.
fn rebuild_producer_state(
    topic: &str,
    index: i32,
    log: &PartitionLog,
    max_producers: usize,
    now_ms: i64,
) -> Result<(ProducerStateTable, PartitionTxns), LogError> {
    let (loaded, report) = snapshot::load(log.dir(), log.log_end_offset());
    for (path, reason) in &report.discarded {
        tracing::warn!(topic, partition = index, snapshot = %path.display(), %reason, "producer snapshot discarded");
    }
    let (mut table, mut txns, from) = match loaded {
        Some(file) => (
            ProducerStateTable::from_entries(file.producers),
            PartitionTxns::from_parts(file.ongoing, file.aborted),
            file.end_offset,
        ),
        None => (
            ProducerStateTable::default(),
            PartitionTxns::default(),
            log.log_start_offset(),
        ),
    };
    let mut replayed = 0usize;
    for header in log.batch_headers(from)? {
        if header.base_offset < from || !header.has_producer_id() {
            continue;
        }
        if header.is_control() {
            // Markers are rare: read the batch for its type.
            let read = log.read(header.base_offset, 1)?;
            match control_type(&read.records) {
                Some(control) => {
                    txns.on_marker(header.producer_id, control, header.base_offset);
                    table.bump_epoch(header.producer_id, header.producer_epoch);
                }
                None => tracing::warn!(
                    topic,
                    partition = index,
                    offset = header.base_offset,
                    "control batch of an unknown kind skipped"
                ),
            }
            continue;
        }
        if header.is_transactional() {
            txns.on_data(header.producer_id, header.base_offset);
        }
        let identity = identity_of(&header);
        let cached = CachedBatch {
            first_sequence: identity.first_sequence,
            last_sequence: identity.last_sequence,
            base_offset: header.base_offset,
            last_offset: header.last_offset(),
            log_append_time_ms: if header.is_log_append_time() {
                header.max_timestamp
            } else {
                -1
            },
        };
        table.record(&identity, cached, now_ms, max_producers);
        replayed += 1;
    }
    txns.trim(log.log_start_offset());
    tracing::debug!(
        topic,
        partition = index,
        snapshot_end = from,
        replayed,
        producers = table.len(),
        "producer state rebuilt"
    );
    Ok((table, txns))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::tests::{build_batch, with_producer};
    use crate::log::validate_produce_records;

    const MAX: usize = 100;

    fn open(dir: &Path, config: &LogConfig, now_ms: i64) -> Partition {
        let appended = Arc::new(watch::channel(0).0);
        Partition::open("t", 0, dir, config.clone(), MAX, now_ms, appended)
            .expect("open")
            .0
    }

    /// A 2-record batch from `producer` at `epoch`, starting at `sequence`.
    fn batch(producer: i64, epoch: i16, sequence: i32, value_bytes: usize) -> ValidatedBatch {
        let bytes = with_producer(
            build_batch(2, 1_000, value_bytes),
            producer,
            epoch,
            sequence,
        );
        validate_produce_records(&bytes, 1 << 20).expect("valid batch")
    }

    fn new_offset(appended: Appended) -> i64 {
        match appended {
            Appended::New(info) => info.base_offset,
            Appended::Duplicate(original) => panic!("unexpected duplicate of {original:?}"),
        }
    }

    fn duplicate_of(appended: Appended) -> i64 {
        match appended {
            Appended::Duplicate(original) => original.base_offset,
            Appended::New(info) => panic!("appended again at {}", info.base_offset),
        }
    }

    fn window_config(window_ms: i64) -> LogConfig {
        LogConfig {
            dedup_window_ms: window_ms,
            ..LogConfig::default()
        }
    }

    /// A batch with one record per id (see `batch_with_ids`), from `producer` at `sequence`
    /// when given.
    fn with_ids(
        ids: &[Option<&str>],
        timestamp: i64,
        producer: Option<(i64, i32)>,
    ) -> ValidatedBatch {
        let mut bytes = crate::log::records::tests::batch_with_ids(ids, timestamp, false);
        if let Some((producer, sequence)) = producer {
            bytes = with_producer(bytes, producer, 0, sequence);
        }
        validate_produce_records(&bytes, 1 << 20).expect("valid batch")
    }

    /// Offsets and ids of every record in the partition, read back from the log.
    fn stored_ids(partition: &Partition) -> Vec<(i64, Option<u128>)> {
        let log = partition.log();
        let read = log.read(log.log_start_offset(), 1 << 20).expect("read");
        let mut out = Vec::new();
        let mut at = 0;
        while let Some(header) = BatchHeader::parse(&read.records[at..]) {
            let size = header.total_size().expect("size");
            let records =
                records::read_ids(&read.records[at..at + size], "semel-msg-id").expect("ids");
            for r in records.records {
                out.push((header.base_offset + i64::from(r.offset_delta), r.id));
            }
            at += size;
        }
        out
    }

    fn hash(id: &str) -> Option<u128> {
        Some(xxhash_rust::xxh3::xxh3_128(id.as_bytes()))
    }

    #[test]
    fn the_dedup_window_stores_each_id_once_and_keeps_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let partition = open(dir.path(), &window_config(60_000), 1_000);
        let first = partition
            .append(
                &with_ids(&[Some("a"), Some("b"), Some("c")], 1_000, None),
                1_000,
            )
            .unwrap();
        assert_eq!(new_offset(first), 0);
        // Two old ids, one new, one without an id: a batch at 3..=6 holding offsets 4 and 5.
        let mixed = partition
            .append(
                &with_ids(&[Some("b"), Some("d"), None, Some("a")], 1_100, None),
                1_100,
            )
            .unwrap();
        assert_eq!(new_offset(mixed), 3);
        assert_eq!(
            partition.log().log_end_offset(),
            7,
            "the batch keeps its offset span"
        );
        // Every record a duplicate: nothing stored, answered with the original offsets.
        let again = partition
            .append(&with_ids(&[Some("c"), Some("d")], 1_200, None), 1_200)
            .unwrap();
        match again {
            Appended::Duplicate(original) => {
                assert_eq!((original.base_offset, original.last_offset), (2, 4));
            }
            Appended::New(info) => panic!("stored again at {}", info.base_offset),
        }
        assert_eq!(partition.log().log_end_offset(), 7);
        let expected = vec![
            (0, hash("a")),
            (1, hash("b")),
            (2, hash("c")),
            (4, hash("d")),
            (5, None),
        ];
        assert_eq!(stored_ids(&partition), expected);
        assert_eq!(
            partition.dedup_window_stats().map(|s| (s.0, s.2)),
            Some((4, 4))
        );

        // After a crash (no clean close), the window is rebuilt from the log.
        drop(partition);
        let reopened = open(dir.path(), &window_config(60_000), 1_300);
        let after = reopened
            .append(&with_ids(&[Some("a"), Some("e")], 1_300, None), 1_300)
            .unwrap();
        assert_eq!(new_offset(after), 7);
        let mut expected = expected;
        expected.push((8, hash("e")));
        assert_eq!(stored_ids(&reopened), expected);
    }

    #[test]
    fn the_window_comes_back_from_its_snapshot_and_the_log_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let partition = open(dir.path(), &window_config(60_000), 1_000);
        partition
            .append(&with_ids(&[Some("a"), Some("b")], 1_000, None), 1_000)
            .unwrap();
        partition.close(1_000).unwrap();
        drop(partition);
        let reopened = open(dir.path(), &window_config(60_000), 1_100);
        // After the snapshot (offset 2): appended, then a crash with no snapshot.
        reopened
            .append(&with_ids(&[Some("c")], 1_100, None), 1_100)
            .unwrap();
        drop(reopened);
        let again = open(dir.path(), &window_config(60_000), 1_200);
        for id in ["a", "b", "c"] {
            duplicate_of(
                again
                    .append(&with_ids(&[Some(id)], 1_200, None), 1_200)
                    .unwrap(),
            );
        }
        assert_eq!(again.log().log_end_offset(), 3);
    }

    /// Waits (bounded) until no roll's window snapshot is pending.
    fn settle_window_snapshots(partition: &Partition) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while partition.window_snapshot_pending.load(Ordering::Acquire) {
            assert!(
                std::time::Instant::now() < deadline,
                "snapshot still pending"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// With tiny segments every produce rolls: while one roll's window snapshot waits to be
    /// written, the next rolls take no copy and start no thread (each copy is tens of MB for a
    /// full window), so they cannot pile up.
    #[test]
    fn rolls_take_no_window_snapshot_while_one_is_pending() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            segment_bytes: 61,
            ..window_config(60_000)
        };
        let partition = open(dir.path(), &config, 1_000);
        let turn = partition.window_snapshots.lock().unwrap();
        for n in 0..20 {
            let id = format!("id-{n}");
            let appended = partition
                .append(&with_ids(&[Some(id.as_str())], 1_000, None), 1_000)
                .unwrap();
            assert!(matches!(appended, Appended::New(info) if info.rolled || n == 0));
        }
        assert_eq!(
            partition.window_snapshot_threads.load(Ordering::Relaxed),
            1,
            "one roll's snapshot waiting; the 18 rolls after it took none"
        );
        drop(turn);
        settle_window_snapshots(&partition);
        partition
            .append(&with_ids(&[Some("after")], 1_000, None), 1_000)
            .unwrap();
        assert_eq!(partition.window_snapshot_threads.load(Ordering::Relaxed), 2);
        settle_window_snapshots(&partition);
    }

    /// A roll's window snapshot still waiting when its topic is deleted is never written: by
    /// then its directory may be a new topic's of the same name.
    #[test]
    fn a_deleted_topics_pending_window_snapshot_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            segment_bytes: 61,
            ..window_config(60_000)
        };
        let partition = open(dir.path(), &config, 1_000);
        let turn = partition.window_snapshots.lock().unwrap();
        for id in ["a", "b"] {
            partition
                .append(&with_ids(&[Some(id)], 1_000, None), 1_000)
                .unwrap();
        }
        assert_eq!(partition.window_snapshot_threads.load(Ordering::Relaxed), 1);
        std::thread::scope(|scope| {
            let retiring = scope.spawn(|| partition.retire());
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !partition.retired.load(Ordering::Acquire) {
                assert!(std::time::Instant::now() < deadline, "retire never started");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            drop(turn);
            retiring.join().expect("retire");
        });
        settle_window_snapshots(&partition);
        let written: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|entry| entry.ok())
            .filter(|entry| entry.path().extension().is_some_and(|e| e == "dedup"))
            .map(|entry| entry.path())
            .collect();
        assert!(
            written.is_empty(),
            "the deleted topic's snapshot was written: {written:?}"
        );
    }

    /// A partition of 300-byte segments with a window, ids "a" to "f" appended (a roll comes
    /// within them), and the roll's window snapshot on disk: (partition, the roll's offset).
    fn rolled_with_window_snapshot(dir: &Path, config: &LogConfig) -> (Partition, i64) {
        let partition = open(dir, config, 1_000);
        let mut rolled_at = None;
        for (n, id) in ["a", "b", "c", "d", "e", "f"].into_iter().enumerate() {
            let Appended::New(info) = partition
                .append(&with_ids(&[Some(id)], 1_000, None), 1_000)
                .unwrap()
            else {
                panic!("{id} was taken for a duplicate");
            };
            if info.rolled {
                rolled_at.get_or_insert(n as i64 + 1);
            }
        }
        let rolled_at = rolled_at.expect("300-byte segments roll within six batches");
        // Written on a thread of its own once the partition was let go: it lands shortly.
        let snapshot = dir.join(format!("{rolled_at:020}.dedup"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !snapshot.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "no window snapshot at {} after the roll",
                snapshot.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        (partition, rolled_at)
    }

    /// A roll's snapshots are written before the sealed segment is fsynced, so a power cut
    /// can leave a window snapshot beyond what recovery kept. It goes at the next open, even
    /// with the window off then: kept, it would become "valid" once the log grew past it again,
    /// and its ids (of records the disk lost) would turn new records away as duplicates.
    #[test]
    fn a_window_snapshot_beyond_the_recovered_log_is_discarded_even_with_the_window_off() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            segment_bytes: 300,
            ..window_config(60_000)
        };
        let (partition, _) = rolled_with_window_snapshot(dir.path(), &config);
        drop(partition);
        // The power cut: the first segment never reached the disk (no recovery point yet).
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join(format!("{:020}.log", 0)))
            .unwrap()
            .set_len(0)
            .unwrap();
        let off = LogConfig {
            segment_bytes: 300,
            ..LogConfig::default()
        };
        let (reopened, report) = Partition::open(
            "t",
            0,
            dir.path(),
            off,
            MAX,
            1_100,
            Arc::new(watch::channel(0).0),
        )
        .unwrap();
        assert_eq!(reopened.log().log_end_offset(), 0);
        assert!(report.segments_dropped > 0);
        for id in ["g", "h", "i", "j", "k", "l"] {
            reopened
                .append(&with_ids(&[Some(id)], 1_100, None), 1_100)
                .unwrap();
        }
        drop(reopened);
        let window_on = open(dir.path(), &config, 1_200);
        let appended = window_on
            .append(&with_ids(&[Some("a")], 1_200, None), 1_200)
            .unwrap();
        assert!(
            matches!(appended, Appended::New(_)),
            "\"a\" was lost with the disk's pages, so it is new: {appended:?}"
        );
    }

    #[test]
    fn a_roll_writes_the_window_snapshot_and_a_start_reads_only_the_log_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            segment_bytes: 300,
            ..window_config(60_000)
        };
        let (partition, rolled_at) = rolled_with_window_snapshot(dir.path(), &config);
        // The records before the snapshot go: a start that found their ids read the snapshot,
        // not the log.
        partition.delete_records(rolled_at).unwrap();
        drop(partition);
        let reopened = open(dir.path(), &config, 1_100);
        for id in ["a", "b", "c", "d", "e", "f"] {
            duplicate_of(
                reopened
                    .append(&with_ids(&[Some(id)], 1_100, None), 1_100)
                    .unwrap(),
            );
        }
    }

    #[test]
    fn ids_older_than_the_window_are_stored_again() {
        let dir = tempfile::tempdir().unwrap();
        let partition = open(dir.path(), &window_config(1_000), 5_000);
        partition
            .append(&with_ids(&[Some("a")], 5_000, None), 5_000)
            .unwrap();
        duplicate_of(
            partition
                .append(&with_ids(&[Some("a")], 5_900, None), 5_900)
                .unwrap(),
        );
        assert_eq!(
            new_offset(
                partition
                    .append(&with_ids(&[Some("a")], 6_000, None), 6_000)
                    .unwrap()
            ),
            1
        );
        // A restart 10 s later reads no segment for the window: nothing is in it.
        drop(partition);
        let reopened = open(dir.path(), &window_config(1_000), 16_000);
        assert_eq!(reopened.dedup_window_stats().map(|s| s.0), Some(0));
    }

    #[test]
    fn an_idempotent_producer_continues_after_a_batch_of_only_duplicates_and_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let partition = open(dir.path(), &window_config(60_000), 1_000);
        new_offset(
            partition
                .append(
                    &with_ids(&[Some("a"), Some("b")], 1_000, Some((9, 0))),
                    1_000,
                )
                .unwrap(),
        );
        // Sequences 2..=3, ids already stored: nothing is written.
        let whole = partition
            .append(
                &with_ids(&[Some("a"), Some("b")], 1_001, Some((9, 2))),
                1_001,
            )
            .unwrap();
        assert_eq!(duplicate_of(whole), 0);
        // Its retry is answered the same way by the sequence check.
        let retry = partition
            .append(
                &with_ids(&[Some("a"), Some("b")], 1_001, Some((9, 2))),
                1_002,
            )
            .unwrap();
        assert_eq!(duplicate_of(retry), 0);
        // Killed here: no clean close. The next batch (sequence 4) must still be in order.
        drop(partition);
        let reopened = open(dir.path(), &window_config(60_000), 1_100);
        let next = reopened
            .append(&with_ids(&[Some("c")], 1_100, Some((9, 4))), 1_100)
            .expect("sequence 4 follows the duplicates' sequences 2..=3");
        assert_eq!(new_offset(next), 2);
    }

    #[test]
    fn a_topic_without_the_window_stores_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let partition = open(dir.path(), &LogConfig::default(), 1_000);
        for expected in [0, 1] {
            let appended = partition
                .append(&with_ids(&[Some("a")], 1_000, None), 1_000)
                .unwrap();
            assert_eq!(new_offset(appended), expected);
        }
        assert!(partition.dedup_window_stats().is_none());
    }

    /// The periodic flush (`log.flush.interval.ms`) makes what acks 0 or 1 wrote durable,
    /// and does nothing when nothing was written since the last fsync.
    #[tokio::test]
    async fn the_periodic_flush_fsyncs_what_was_written_since_the_last_one() {
        let dir = tempfile::tempdir().unwrap();
        let partition = open(dir.path(), &LogConfig::default(), 0);
        partition.append(&batch(1, 0, 0, 5), 1).unwrap();
        assert_eq!(partition.durable_end(), 0, "an append alone syncs nothing");
        partition.flush_written().await.unwrap();
        assert_eq!(partition.durable_end(), 2);
        partition.fail_next_sync.store(true, Ordering::SeqCst);
        partition
            .flush_written()
            .await
            .expect("nothing new: no fsync (the failing one is not reached)");
        partition.fail_next_sync.store(false, Ordering::SeqCst);
        partition.append(&batch(1, 0, 2, 5), 2).unwrap();
        partition.flush_written().await.unwrap();
        assert_eq!(partition.durable_end(), 4);
    }

    /// A roll seals a segment without fsyncing it (the produce that rolls does not wait for
    /// the disk); the next sync round covers it, and a failure there takes the partition
    /// offline like any other fsync's.
    #[tokio::test]
    async fn a_sync_round_covers_the_segment_a_roll_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let one = batch(1, 0, 0, 5).bytes().len() as u64;
        let config = LogConfig {
            segment_bytes: one,
            ..LogConfig::default()
        };
        let partition = open(dir.path(), &config, 0);
        partition.append(&batch(1, 0, 0, 5), 1).unwrap();
        let rolled = partition.append(&batch(1, 0, 2, 5), 2).unwrap();
        assert!(matches!(rolled, Appended::New(info) if info.rolled));
        assert_eq!(partition.log().unsynced_sealed(), vec![0]);
        assert_eq!(partition.durable_end(), 0, "the roll fsynced nothing");
        partition.wait_durable(4).await.unwrap();
        assert!(partition.log().unsynced_sealed().is_empty());
        partition.append(&batch(1, 0, 4, 5), 3).unwrap();
        assert_eq!(partition.log().unsynced_sealed(), vec![2]);
        partition.fail_next_sync.store(true, Ordering::SeqCst);
        partition.flush_written().await.expect_err("EIO");
        assert_eq!(
            partition.log().unsynced_sealed(),
            vec![2],
            "still not durable"
        );
        assert_eq!(partition.durable_end(), 4);
    }

    /// The flush task checkpoints the recovery point at the durable end, so a start after a
    /// crash checks only the log written since (recovery reads every segment from the
    /// recovery point's on).
    #[tokio::test]
    async fn the_recovery_point_follows_the_durable_end() {
        let dir = tempfile::tempdir().unwrap();
        let partition = open(dir.path(), &LogConfig::default(), 0);
        partition.append(&batch(1, 0, 0, 5), 1).unwrap();
        partition.checkpoint_recovery_point().unwrap();
        assert_eq!(partition.log().recovery_point(), 0, "nothing fsynced yet");
        partition.flush_written().await.unwrap();
        partition.checkpoint_recovery_point().unwrap();
        assert_eq!(partition.log().recovery_point(), 2);
    }

    /// Issue 18, item 4: after a failed fsync the kernel may drop the dirty pages and let the
    /// next fsync of the same file succeed. So the first failure takes the partition offline:
    /// nothing is acknowledged after it (not even the offsets that failed, by a later sync
    /// that "works"), appends get KAFKA_STORAGE_ERROR, and a restart recovers from the disk.
    #[tokio::test]
    async fn a_failed_fsync_takes_the_partition_offline_until_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let partition = open(dir.path(), &LogConfig::default(), 0);
        partition.append(&batch(1, 0, 0, 5), 1).unwrap();
        partition
            .wait_durable(2)
            .await
            .expect("the first sync works");
        partition.append(&batch(1, 0, 2, 5), 2).unwrap();
        partition.fail_next_sync.store(true, Ordering::SeqCst);
        let failed = partition.wait_durable(4).await.expect_err("EIO");
        assert_eq!(failed.code(), ResponseError::KafkaStorageError);
        assert!(
            partition.wait_durable(4).await.is_err(),
            "a later fsync that succeeds must not acknowledge the offsets whose sync failed"
        );
        assert!(
            partition.wait_durable(2).await.is_ok(),
            "offsets synced before the failure stay acknowledged"
        );
        let refused = partition
            .append(&batch(1, 0, 4, 5), 3)
            .expect_err("an append after a failed fsync");
        assert_eq!(refused.code(), ResponseError::KafkaStorageError);
        assert!(refused.to_string().contains("offline"), "{refused}");
        // Nor is anything read: the page cache may hold records the disk lost, which a
        // consumer must not see and then find gone (or different) after the restart.
        let unread = partition
            .log()
            .read(0, 1 << 20)
            .expect_err("a read after a failed fsync");
        assert_eq!(unread.code(), ResponseError::KafkaStorageError);
        drop(partition);
        let reopened = open(dir.path(), &LogConfig::default(), 4);
        let end = reopened.log().log_end_offset();
        reopened.append(&batch(1, 0, end as i32, 5), 5).unwrap();
        reopened
            .wait_durable(end + 2)
            .await
            .expect("online after a restart");
    }

    /// Issue 18, item 5: a corrupt batch in the middle of a fully fsynced segment must not be
    /// "recovered" by truncating everything after it (acknowledged records, whose offsets
    /// would then be handed out again). A clean close checkpoints the recovery point; below
    /// it, corruption refuses the open and says where; a torn tail above it is still cut.
    #[tokio::test]
    async fn corruption_below_the_recovery_point_refuses_to_open_instead_of_truncating() {
        use std::io::{Seek, SeekFrom, Write};
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig::default();
        let partition = open(dir.path(), &config, 0);
        for n in 0..3 {
            partition.append(&batch(1, 0, n * 2, 50), 1).unwrap();
        }
        partition.wait_durable(6).await.unwrap();
        partition.close(2).unwrap();
        drop(partition);
        // Flip a byte inside the second batch's records (its CRC no longer matches).
        let segment = dir.path().join("00000000000000000000.log");
        let first = std::fs::metadata(&segment).unwrap().len() / 3;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&segment)
            .unwrap();
        file.seek(SeekFrom::Start(first + first / 2)).unwrap();
        file.write_all(&[0xa5]).unwrap();
        drop(file);
        let appended = Arc::new(watch::channel(0).0);
        let refused = Partition::open("t", 0, dir.path(), config.clone(), MAX, 3, appended)
            .map(|(p, report)| (p.log().log_end_offset(), report))
            .expect_err("a corrupt batch below the recovery point was truncated away");
        let text = refused.to_string();
        assert!(text.contains("recovery point"), "{text}");
        assert_eq!(refused.code(), ResponseError::KafkaStorageError);
        assert_eq!(
            std::fs::metadata(&segment).unwrap().len(),
            first * 3,
            "the segment was cut"
        );
    }

    /// Above the recovery point a bad tail is a torn write, not acknowledged data: it is cut
    /// as before, and the records below stay.
    #[tokio::test]
    async fn a_torn_tail_above_the_recovery_point_is_still_cut() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig::default();
        let partition = open(dir.path(), &config, 0);
        partition.append(&batch(1, 0, 0, 50), 1).unwrap();
        partition.close(2).unwrap(); // recovery point 2
        partition.append(&batch(1, 0, 2, 50), 3).unwrap(); // not fsynced: above it
        drop(partition);
        let segment = dir.path().join("00000000000000000000.log");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&segment)
            .unwrap()
            .write_all(b"half a batch, torn by a crash")
            .unwrap();
        let appended = Arc::new(watch::channel(0).0);
        let (reopened, report) =
            Partition::open("t", 0, dir.path(), config, MAX, 4, appended).expect("reopened");
        assert_eq!(report.truncated_bytes, 29);
        assert_eq!(reopened.log().log_end_offset(), 4);
    }

    #[test]
    fn duplicates_are_not_appended_and_errors_use_kafka_codes() {
        let dir = tempfile::tempdir().unwrap();
        let partition = open(dir.path(), &LogConfig::default(), 0);
        assert_eq!(
            new_offset(partition.append(&batch(1, 0, 0, 5), 1).unwrap()),
            0
        );
        assert_eq!(
            new_offset(partition.append(&batch(1, 0, 2, 5), 2).unwrap()),
            2
        );
        assert_eq!(
            duplicate_of(partition.append(&batch(1, 0, 0, 5), 3).unwrap()),
            0
        );
        assert_eq!(partition.log().log_end_offset(), 4);
        let gap = partition.append(&batch(1, 0, 7, 5), 4).unwrap_err();
        assert_eq!(gap.code(), ResponseError::OutOfOrderSequenceNumber);
        assert_eq!(
            new_offset(partition.append(&batch(1, 1, 0, 5), 5).unwrap()),
            4
        );
        let fenced = partition.append(&batch(1, 0, 4, 5), 6).unwrap_err();
        assert_eq!(fenced.code(), ResponseError::InvalidProducerEpoch);
        // A transactional batch (attribute bit 4) is refused until transactions exist.
        let mut bytes = with_producer(build_batch(1, 1_000, 5), 1, 1, 2);
        bytes[22] |= 0x10;
        let crc = crc32c::crc32c(&bytes[21..]);
        bytes[17..21].copy_from_slice(&crc.to_be_bytes());
        let transactional = validate_produce_records(&bytes, 1 << 20).unwrap();
        let refused = partition.append(&transactional, 7).unwrap_err();
        assert_eq!(refused.code(), ResponseError::InvalidTxnState);
        assert_eq!(
            partition.log().log_end_offset(),
            6,
            "nothing refused was appended"
        );
        let views = partition.producer_views();
        assert_eq!(
            views,
            vec![ProducerView {
                producer_id: 1,
                epoch: 1,
                last_sequence: 1,
                last_timestamp_ms: 5
            }]
        );
    }

    #[test]
    fn state_is_rebuilt_from_snapshot_and_log_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        // Segments of ~3 batches, so appends roll and write snapshots.
        let config = LogConfig {
            segment_bytes: 300,
            ..LogConfig::default()
        };
        let partition = open(dir.path(), &config, 0);
        let mut offsets = Vec::new();
        for i in 0..12 {
            offsets.push(new_offset(
                partition.append(&batch(7, 0, i * 2, 20), 10).unwrap(),
            ));
        }
        let snapshots = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension() == Some("snapshot".as_ref()))
            .count();
        assert!(snapshots >= 1, "rolls wrote snapshots");
        // No clean close: as after kill -9, the batches after the newest snapshot are replayed.
        drop(partition);
        let reopened = open(dir.path(), &config, 20);
        for i in 7..12 {
            let again = reopened.append(&batch(7, 0, i * 2, 20), 30).unwrap();
            assert_eq!(duplicate_of(again), offsets[i as usize]);
        }
        let too_old = reopened.append(&batch(7, 0, 12, 20), 30).unwrap_err();
        assert_eq!(too_old.code(), ResponseError::OutOfOrderSequenceNumber);
        assert_eq!(
            new_offset(reopened.append(&batch(7, 0, 24, 20), 30).unwrap()),
            24
        );
    }

    #[test]
    fn corrupt_snapshots_fall_back_to_replaying_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            segment_bytes: 300,
            ..LogConfig::default()
        };
        let partition = open(dir.path(), &config, 0);
        let mut offsets = Vec::new();
        for i in 0..9 {
            offsets.push(new_offset(
                partition.append(&batch(3, 2, i * 2, 20), 10).unwrap(),
            ));
        }
        partition.close(11).unwrap();
        drop(partition);
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension() == Some("snapshot".as_ref()) {
                std::fs::write(&path, b"not a snapshot").unwrap();
            }
        }
        let reopened = open(dir.path(), &config, 20);
        for i in 4..9 {
            let again = reopened.append(&batch(3, 2, i * 2, 20), 30).unwrap();
            assert_eq!(duplicate_of(again), offsets[i as usize]);
        }
    }

    #[test]
    fn retention_keeps_producer_state_until_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            segment_bytes: 300,
            retention_bytes: 300,
            ..LogConfig::default()
        };
        let partition = open(dir.path(), &config, 0);
        // Producer 1 writes once; producer 2 then writes enough to push it out of the log.
        let first = new_offset(partition.append(&batch(1, 0, 0, 20), 100).unwrap());
        for i in 0..9 {
            partition.append(&batch(2, 0, i * 2, 20), 200).unwrap();
        }
        let (report, expired) = partition.maintain(300, 1_000).unwrap();
        assert!(!report.deleted_segments.is_empty());
        assert_eq!(expired, 0);
        assert!(partition.log().log_start_offset() > first);
        assert_eq!(
            duplicate_of(partition.append(&batch(1, 0, 0, 20), 300).unwrap()),
            first
        );
        // After a restart too: the state comes from a snapshot, not from the deleted records.
        partition.close(300).unwrap();
        drop(partition);
        let reopened = open(dir.path(), &config, 400);
        assert_eq!(
            duplicate_of(reopened.append(&batch(1, 0, 0, 20), 400).unwrap()),
            first
        );
        // Idle past producer.id.expiration.ms: forgotten, so any sequence is accepted.
        let (_, expired) = reopened.maintain(2_000, 1_000).unwrap();
        assert_eq!(expired, 2);
        assert!(reopened.producer_views().is_empty());
        new_offset(reopened.append(&batch(1, 0, 40, 20), 2_000).unwrap());
    }
}
