//! The transaction coordinator (KIP-98, KIP-447): one state machine per `transactional.id`,
//! kept in `transactions.bin` (the role of Kafka's `__transaction_state`), and the markers it
//! writes to end a transaction on each of its partitions ([`partition`]).
//!
//! States, as Kafka names them: `Empty` (no transaction since InitProducerId or the last
//! one), `Ongoing` (a partition or a group was added), `PrepareCommit`/`PrepareAbort` (EndTxn
//! decided, markers being written), `CompleteCommit`/`CompleteAbort`.
//!
//! Durability, in order, for EndTxn:
//! 1. the decision (`Prepare*`) is written and fsynced before any marker;
//! 2. a marker goes to every partition of the transaction, and the transaction's offsets are
//!    committed to their groups (commit only); every marker is fsynced;
//! 3. then `Complete*` is written, and EndTxn is answered.
//!
//! A crash after 1 finds `Prepare*` on start and redoes 2 and 3 before the listener serves
//! ([`TransactionCoordinator::recover`]): a marker written twice ends nothing the second time,
//! and an offset committed twice is the same offset. A crash before 1 leaves the transaction
//! `Ongoing`; it is aborted when `transaction.timeout.ms` runs out, or when its producer calls
//! InitProducerId again.
//!
//! Fencing: every InitProducerId bumps the epoch, and a transaction left open by the previous
//! instance is aborted first (with the bumped epoch, so the old instance's late batches are
//! refused). A transaction that outlives its timeout is aborted with the epoch bumped too, so its
//! producer learns of it (`PRODUCER_FENCED`) instead of committing half of it.
//!
//! A transactional batch is accepted only from the current epoch of a transaction that has
//! added its partition ([`TransactionCoordinator::verify`], called under the partition's producer
//! lock): a batch can never land after its transaction's marker, which would leave a
//! transaction open on that partition forever.
//!
//! The whole state file is rewritten (atomically, fsynced) on each change: its cost grows with
//! the number of transactional ids, which idle ids leave after `transactional.id.expiration.ms`.
//!
//! References: KIP-98; KIP-447 (offsets in transactions, consumer group metadata); KIP-360,
//! KIP-588 (epochs, PRODUCER_FENCED); Kafka's `TransactionCoordinator`,
//! `TransactionMetadata` and `TransactionStateManager`.

pub(crate) mod partition;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use kafka_protocol::ResponseError;

use crate::broker::BrokerState;
use crate::group::offsets::Committed;
use crate::log::BatchHeader;
use crate::log::batch::ControlType;
use crate::partition::AppendError;
use crate::producer_ids::{InitError, ProducerIds};
use crate::state_file::{self, StateFileError};

const FILE: &str = "transactions.bin";
const MAGIC: &[u8; 8] = b"SEMELTXN";
const VERSION: u16 = 1;

/// Tests (debug builds only): with this environment variable set, the process exits at once,
/// as `kill -9` would end it, after an EndTxn's decision is on disk and before any of its
/// markers: the window that start-up recovery must close (`tests/transactions.rs`).
const CRASH_AFTER_DECISION: &str = "SEMEL_TEST_CRASH_AFTER_TXN_DECISION";

fn crash_point(variable: &str) {
    #[cfg(debug_assertions)]
    if std::env::var_os(variable).is_some() {
        tracing::error!(
            variable,
            "test crash point reached: exiting without a shutdown"
        );
        std::process::exit(137);
    }
    #[cfg(not(debug_assertions))]
    let _ = variable;
}

/// How long completing a decided transaction (markers, offsets, their fsyncs) may take before
/// the request that waits for it is answered `CONCURRENT_TRANSACTIONS`.
const COMPLETION_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Kafka's `transactional.id.expiration.ms` default (7 days): a transactional id with no
/// transaction open and no request for this long is forgotten.
pub(crate) const TRANSACTIONAL_ID_EXPIRATION_MS: i64 = 7 * 24 * 60 * 60 * 1000;

/// Where a transaction stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) enum TxnState {
    Empty,
    Ongoing,
    PrepareCommit,
    PrepareAbort,
    CompleteCommit,
    CompleteAbort,
}

impl TxnState {
    /// The name DescribeTransactions and ListTransactions use.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Empty => "Empty",
            Self::Ongoing => "Ongoing",
            Self::PrepareCommit => "PrepareCommit",
            Self::PrepareAbort => "PrepareAbort",
            Self::CompleteCommit => "CompleteCommit",
            Self::CompleteAbort => "CompleteAbort",
        }
    }
}

/// An offset committed inside a transaction, applied to its group when the transaction commits.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct PendingOffset {
    pub(crate) group: String,
    pub(crate) topic: String,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) leader_epoch: i32,
    pub(crate) metadata: String,
}

/// One transactional id.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct TxnMetadata {
    pub(crate) producer_id: i64,
    pub(crate) epoch: i16,
    pub(crate) timeout_ms: i32,
    pub(crate) state: TxnState,
    /// Partitions of the open (or deciding) transaction.
    pub(crate) partitions: BTreeSet<(String, i32)>,
    /// Groups whose offsets the transaction commits (AddOffsetsToTxn).
    pub(crate) groups: BTreeSet<String>,
    /// Offsets committed in the transaction (TxnOffsetCommit), applied on commit.
    pub(crate) offsets: Vec<PendingOffset>,
    /// When the open transaction began (its first AddPartitionsToTxn or AddOffsetsToTxn).
    pub(crate) started_ms: i64,
    /// The last change.
    pub(crate) updated_ms: i64,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct StateFile {
    transactions: Vec<(String, TxnMetadata)>,
}

/// A refused transaction request: the code, and a message for logs and clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TxnError {
    pub(crate) code: ResponseError,
    pub(crate) message: String,
}

impl TxnError {
    fn new(code: ResponseError, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<TxnError> for InitError {
    fn from(e: TxnError) -> Self {
        InitError {
            code: e.code,
            message: e.message,
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    transactions: BTreeMap<String, TxnMetadata>,
    /// Producer id → transactional id.
    by_producer: HashMap<i64, String>,
}

impl Inner {
    fn rebuild_index(&mut self) {
        self.by_producer = self
            .transactions
            .iter()
            .map(|(id, meta)| (meta.producer_id, id.clone()))
            .collect();
    }
}

/// What a transaction ends with, captured when it is decided.
#[derive(Debug, Clone)]
struct Ending {
    transactional_id: String,
    producer_id: i64,
    epoch: i16,
    commit: bool,
    partitions: Vec<(String, i32)>,
    offsets: Vec<PendingOffset>,
}

/// One committed offset as the group coordinator takes it.
type OffsetEntry = ((String, i32), Option<Committed>);

/// The transaction coordinator of one broker.
#[derive(Debug)]
pub(crate) struct TransactionCoordinator {
    path: PathBuf,
    inner: Mutex<Inner>,
    /// One completion at a time per transactional id: the request that decided it, the
    /// timer's retry and the start may each set out to complete the same transaction.
    completions: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl TransactionCoordinator {
    /// Opens `transactions.bin` in `data_dir`. A data directory from before transactions
    /// existed has its transactional ids (and epochs) in the producer-id file: they are taken
    /// from there, so no epoch goes back.
    ///
    /// # Errors
    /// When the file is corrupt or unreadable: starting anyway could lose a decided commit.
    pub(crate) fn open(data_dir: &Path, ids: &ProducerIds) -> Result<Self, StateFileError> {
        let path = data_dir.join(FILE);
        let mut inner = Inner::default();
        match state_file::read::<StateFile>(&path, MAGIC, VERSION)? {
            Some(file) => inner.transactions = file.transactions.into_iter().collect(),
            None => {
                for (id, (producer_id, epoch)) in ids.legacy_transactional() {
                    inner.transactions.insert(
                        id,
                        TxnMetadata {
                            producer_id,
                            epoch,
                            timeout_ms: 60_000,
                            state: TxnState::Empty,
                            partitions: BTreeSet::new(),
                            groups: BTreeSet::new(),
                            offsets: Vec::new(),
                            started_ms: -1,
                            updated_ms: 0,
                        },
                    );
                }
            }
        }
        inner.rebuild_index();
        Ok(Self {
            path,
            inner: Mutex::new(inner),
            completions: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Inner changes only after the write that backs it succeeded.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `transactions` as the new state; the caller then installs it.
    fn persist(&self, transactions: &BTreeMap<String, TxnMetadata>) -> Result<(), TxnError> {
        let file = StateFile {
            transactions: transactions
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        crate::blocking::may_block(|| state_file::write(&self.path, MAGIC, VERSION, &file)).map_err(
            |e| {
                tracing::error!(error = %e, "cannot persist the transaction state");
                TxnError::new(
                    ResponseError::KafkaStorageError,
                    format!("cannot persist the transaction state: {e}"),
                )
            },
        )
    }

    /// Applies `change` to a copy of `transactional_id`'s metadata, persists, then installs it.
    fn update(
        &self,
        inner: &mut Inner,
        transactional_id: &str,
        meta: TxnMetadata,
    ) -> Result<(), TxnError> {
        let mut next = inner.transactions.clone();
        next.insert(transactional_id.to_string(), meta);
        self.persist(&next)?;
        inner.transactions = next;
        inner.rebuild_index();
        Ok(())
    }

    /// The metadata of `transactional_id` if `producer_id` and `epoch` are its current ones.
    fn current<'a>(
        inner: &'a Inner,
        transactional_id: &str,
        producer_id: i64,
        epoch: i16,
    ) -> Result<&'a TxnMetadata, TxnError> {
        let Some(meta) = inner.transactions.get(transactional_id) else {
            return Err(TxnError::new(
                ResponseError::InvalidProducerIdMapping,
                format!("transactional id {transactional_id:?} is unknown; call InitProducerId"),
            ));
        };
        if meta.producer_id != producer_id {
            return Err(TxnError::new(
                ResponseError::InvalidProducerIdMapping,
                format!(
                    "transactional id {transactional_id:?} belongs to producer {}, not {producer_id}",
                    meta.producer_id
                ),
            ));
        }
        if meta.epoch != epoch {
            return Err(TxnError::new(
                ResponseError::ProducerFenced,
                format!(
                    "transactional id {transactional_id:?} is at epoch {}; epoch {epoch} is fenced",
                    meta.epoch
                ),
            ));
        }
        Ok(meta)
    }

    /// InitProducerId for a transactional id: its producer id with the epoch bumped (a new id
    /// at epoch 0 the first time, or when the epoch is used up). A transaction left open by the
    /// previous instance is aborted first. `expected` is the (producer id, epoch) a KIP-360
    /// client sends: the current pair, or the pair just before a bump it retries.
    pub(crate) async fn init_producer_id(
        &self,
        state: &BrokerState,
        transactional_id: &str,
        timeout_ms: i32,
        expected: Option<(i64, i16)>,
    ) -> Result<(i64, i16), InitError> {
        let now = state.now_ms();
        let ending = {
            let mut inner = self.lock();
            let current = inner.transactions.get(transactional_id).cloned();
            if let (Some(current), Some((producer_id, epoch))) = (&current, expected) {
                if producer_id == current.producer_id
                    && epoch.checked_add(1) == Some(current.epoch)
                    && current.state == TxnState::Empty
                {
                    // A retry of the bump that already happened.
                    return Ok((current.producer_id, current.epoch));
                }
                if producer_id != current.producer_id || epoch != current.epoch {
                    return Err(InitError {
                        code: ResponseError::ProducerFenced,
                        message: format!(
                            "transactional id {transactional_id:?} is now producer {} at epoch {}; producer {producer_id} at epoch {epoch} is fenced",
                            current.producer_id, current.epoch
                        ),
                    });
                }
            }
            match current {
                Some(meta)
                    if matches!(meta.state, TxnState::PrepareCommit | TxnState::PrepareAbort) =>
                {
                    return Err(InitError {
                        code: ResponseError::ConcurrentTransactions,
                        message: format!(
                            "transactional id {transactional_id:?} is completing a transaction; retry"
                        ),
                    });
                }
                Some(meta) if meta.state == TxnState::Ongoing => {
                    // Fence the previous instance and abort its transaction.
                    Some(self.decide(&mut inner, transactional_id, false, true, now)?)
                }
                _ => None,
            }
        };
        if let Some(ending) = ending {
            self.complete_within(state, ending).await?;
        }
        let mut inner = self.lock();
        let current = inner.transactions.get(transactional_id).cloned();
        let (producer_id, epoch) = match &current {
            Some(meta) if meta.epoch < i16::MAX - 1 => (meta.producer_id, meta.epoch + 1),
            _ => (state.producer_ids.allocate_id()?, 0),
        };
        let meta = TxnMetadata {
            producer_id,
            epoch,
            timeout_ms,
            state: TxnState::Empty,
            partitions: BTreeSet::new(),
            groups: BTreeSet::new(),
            offsets: Vec::new(),
            started_ms: -1,
            updated_ms: now,
        };
        self.update(&mut inner, transactional_id, meta)?;
        Ok((producer_id, epoch))
    }

    /// Checks that a transaction may take more partitions or groups now.
    fn addable(meta: &TxnMetadata, transactional_id: &str) -> Result<(), TxnError> {
        match meta.state {
            TxnState::PrepareCommit | TxnState::PrepareAbort => Err(TxnError::new(
                ResponseError::ConcurrentTransactions,
                format!(
                    "transactional id {transactional_id:?} is completing its previous transaction; retry"
                ),
            )),
            _ => Ok(()),
        }
    }

    /// AddPartitionsToTxn: the partitions join the open transaction (which opens here if
    /// needed). The caller has checked that every partition exists.
    pub(crate) fn add_partitions(
        &self,
        transactional_id: &str,
        producer_id: i64,
        epoch: i16,
        partitions: &[(String, i32)],
        now_ms: i64,
    ) -> Result<(), TxnError> {
        let mut inner = self.lock();
        let meta = Self::current(&inner, transactional_id, producer_id, epoch)?;
        Self::addable(meta, transactional_id)?;
        if meta.state == TxnState::Ongoing && partitions.iter().all(|p| meta.partitions.contains(p))
        {
            return Ok(());
        }
        let mut meta = meta.clone();
        Self::open_transaction(&mut meta, now_ms);
        meta.partitions.extend(partitions.iter().cloned());
        meta.updated_ms = now_ms;
        self.update(&mut inner, transactional_id, meta)
    }

    /// AddOffsetsToTxn: the group's offsets will be committed with the transaction.
    pub(crate) fn add_offsets(
        &self,
        transactional_id: &str,
        producer_id: i64,
        epoch: i16,
        group: &str,
        now_ms: i64,
    ) -> Result<(), TxnError> {
        let mut inner = self.lock();
        let meta = Self::current(&inner, transactional_id, producer_id, epoch)?;
        Self::addable(meta, transactional_id)?;
        if meta.state == TxnState::Ongoing && meta.groups.contains(group) {
            return Ok(());
        }
        let mut meta = meta.clone();
        Self::open_transaction(&mut meta, now_ms);
        meta.groups.insert(group.to_string());
        meta.updated_ms = now_ms;
        self.update(&mut inner, transactional_id, meta)
    }

    fn open_transaction(meta: &mut TxnMetadata, now_ms: i64) {
        if meta.state != TxnState::Ongoing {
            meta.state = TxnState::Ongoing;
            meta.partitions.clear();
            meta.groups.clear();
            meta.offsets.clear();
            meta.started_ms = now_ms;
        }
    }

    /// TxnOffsetCommit: offsets held with the transaction of `producer_id`, applied to `group`
    /// only if it commits. The group must have been added (AddOffsetsToTxn).
    pub(crate) fn commit_offsets(
        &self,
        transactional_id: &str,
        producer_id: i64,
        epoch: i16,
        group: &str,
        offsets: Vec<PendingOffset>,
        now_ms: i64,
    ) -> Result<(), TxnError> {
        let mut inner = self.lock();
        let meta = Self::current(&inner, transactional_id, producer_id, epoch)?;
        if meta.state != TxnState::Ongoing || !meta.groups.contains(group) {
            return Err(TxnError::new(
                ResponseError::InvalidTxnState,
                format!(
                    "group {group:?} is not in the open transaction of {transactional_id:?}; call AddOffsetsToTxn first"
                ),
            ));
        }
        let mut meta = meta.clone();
        for offset in offsets {
            meta.offsets.retain(|o| {
                !(o.group == offset.group
                    && o.topic == offset.topic
                    && o.partition == offset.partition)
            });
            meta.offsets.push(offset);
        }
        meta.updated_ms = now_ms;
        self.update(&mut inner, transactional_id, meta)
    }

    /// Whether an open transaction holds offsets for `group`'s `topic`-`partition` that are
    /// not committed yet (OffsetFetch with `require_stable` answers `UNSTABLE_OFFSET_COMMIT`).
    pub(crate) fn has_pending_offset(&self, group: &str, topic: &str, partition: i32) -> bool {
        self.lock().transactions.values().any(|meta| {
            meta.offsets
                .iter()
                .any(|o| o.group == group && o.topic == topic && o.partition == partition)
        })
    }

    /// EndTxn: decides the open transaction, writes its markers and answers once it is
    /// complete. A retry of a decision already completed is answered again.
    pub(crate) async fn end_transaction(
        &self,
        state: &BrokerState,
        transactional_id: &str,
        producer_id: i64,
        epoch: i16,
        commit: bool,
    ) -> Result<(), TxnError> {
        let now = state.now_ms();
        let ending = {
            let mut inner = self.lock();
            let meta = Self::current(&inner, transactional_id, producer_id, epoch)?;
            let ending = match (meta.state, commit) {
                (TxnState::Ongoing, _) => {
                    self.decide(&mut inner, transactional_id, commit, false, now)?
                }
                (TxnState::CompleteCommit, true) | (TxnState::CompleteAbort, false) => {
                    return Ok(());
                }
                (TxnState::PrepareCommit, true) | (TxnState::PrepareAbort, false) => {
                    return Err(TxnError::new(
                        ResponseError::ConcurrentTransactions,
                        "the transaction is being completed; retry",
                    ));
                }
                (state, _) => {
                    return Err(TxnError::new(
                        ResponseError::InvalidTxnState,
                        format!(
                            "cannot {} the transaction of {transactional_id:?}: it is {}",
                            if commit { "commit" } else { "abort" },
                            state.name()
                        ),
                    ));
                }
            };
            crash_point(CRASH_AFTER_DECISION);
            ending
        };
        self.complete_within(state, ending).await
    }

    /// Writes the decision (`Prepare*`), bumping the epoch first when `fence` (the producer
    /// may not go on with this transaction), and returns what completing it must do.
    fn decide(
        &self,
        inner: &mut Inner,
        transactional_id: &str,
        commit: bool,
        fence: bool,
        now_ms: i64,
    ) -> Result<Ending, TxnError> {
        let mut meta = inner
            .transactions
            .get(transactional_id)
            .cloned()
            .ok_or_else(|| TxnError::new(ResponseError::InvalidProducerIdMapping, "unknown"))?;
        if fence && meta.epoch < i16::MAX - 1 {
            meta.epoch += 1;
        }
        meta.state = if commit {
            TxnState::PrepareCommit
        } else {
            TxnState::PrepareAbort
        };
        meta.updated_ms = now_ms;
        let ending = Self::ending_of(transactional_id, &meta);
        self.update(inner, transactional_id, meta)?;
        tracing::debug!(
            transactional_id,
            producer_id = ending.producer_id,
            epoch = ending.epoch,
            commit,
            partitions = ending.partitions.len(),
            "transaction decided"
        );
        Ok(ending)
    }

    /// Whether the transaction is still decided as `ending` says (same producer, epoch and
    /// decision, not complete yet).
    fn still_decided(inner: &Inner, ending: &Ending) -> bool {
        let decided = if ending.commit {
            TxnState::PrepareCommit
        } else {
            TxnState::PrepareAbort
        };
        inner
            .transactions
            .get(&ending.transactional_id)
            .is_some_and(|meta| {
                meta.producer_id == ending.producer_id
                    && meta.epoch == ending.epoch
                    && meta.state == decided
            })
    }

    fn ending_of(transactional_id: &str, meta: &TxnMetadata) -> Ending {
        Ending {
            transactional_id: transactional_id.to_string(),
            producer_id: meta.producer_id,
            epoch: meta.epoch,
            commit: meta.state == TxnState::PrepareCommit,
            partitions: meta.partitions.iter().cloned().collect(),
            offsets: if meta.state == TxnState::PrepareCommit {
                meta.offsets.clone()
            } else {
                Vec::new()
            },
        }
    }

    /// [`Self::complete`], for at most [`COMPLETION_LIMIT`]: a disk that does not answer
    /// leaves the transaction decided (Prepare*), the caller is told to retry
    /// (`CONCURRENT_TRANSACTIONS`, which clients retry), and the timer completes it later.
    /// Stopping part-way is safe: a marker written twice ends nothing the second time.
    async fn complete_within(&self, state: &BrokerState, ending: Ending) -> Result<(), TxnError> {
        let transactional_id = ending.transactional_id.clone();
        tokio::time::timeout(COMPLETION_LIMIT, self.complete(state, ending))
            .await
            .unwrap_or_else(|_| {
                tracing::warn!(%transactional_id, limit_s = COMPLETION_LIMIT.as_secs(), "transaction markers not durable in time; it stays decided and is completed later");
                Err(TxnError::new(
                    ResponseError::ConcurrentTransactions,
                    format!(
                        "the transaction of {transactional_id:?} is decided but its markers were not durable within {} s; retry",
                        COMPLETION_LIMIT.as_secs()
                    ),
                ))
            })
    }

    /// Writes the markers of a decided transaction, commits its offsets (commit only), waits for
    /// all of it to be durable, then records it complete.
    ///
    /// One completer at a time per transactional id, and only while the transaction is still
    /// decided as `ending` says: a completer that waited its turn finds it complete and does
    /// nothing. Written twice, a marker could land after the producer's next transaction
    /// began on that partition and end it there, and the offsets would be committed again.
    async fn complete(&self, state: &BrokerState, ending: Ending) -> Result<(), TxnError> {
        let turn = Arc::clone(
            self.completions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(ending.transactional_id.clone())
                .or_default(),
        );
        let _turn = turn.lock().await;
        if !Self::still_decided(&self.lock(), &ending) {
            return Ok(());
        }
        let control = if ending.commit {
            ControlType::Commit
        } else {
            ControlType::Abort
        };
        let now = state.now_ms();
        let mut durable = Vec::with_capacity(ending.partitions.len());
        for (topic, index) in &ending.partitions {
            // A partition deleted since it was added has nothing left to end.
            let Some(partition) = state
                .catalog
                .topic(topic)
                .and_then(|t| t.partition(*index).cloned())
            else {
                continue;
            };
            let offset = partition
                .write_marker(ending.producer_id, ending.epoch, control, now)
                .map_err(|e| {
                    tracing::error!(topic, partition = index, error = %e, "cannot write a transaction marker");
                    TxnError::new(e.code(), format!("cannot write the marker on {topic}-{index}: {e}"))
                })?;
            durable.push((partition, offset + 1));
        }
        for (partition, end) in durable {
            partition.wait_durable(end).await.map_err(|e| {
                TxnError::new(
                    ResponseError::KafkaStorageError,
                    format!(
                        "the marker on {}-{} was not fsynced: {e}",
                        partition.topic, partition.index
                    ),
                )
            })?;
        }
        let mut by_group: BTreeMap<&str, Vec<OffsetEntry>> = BTreeMap::new();
        for offset in &ending.offsets {
            by_group.entry(&offset.group).or_default().push((
                (offset.topic.clone(), offset.partition),
                Some(Committed {
                    offset: offset.offset,
                    leader_epoch: offset.leader_epoch,
                    metadata: offset.metadata.clone(),
                    commit_timestamp_ms: now,
                }),
            ));
        }
        for (group, entries) in by_group {
            state.groups.commit(group, entries).await.map_err(|e| {
                TxnError::new(
                    ResponseError::KafkaStorageError,
                    format!("cannot commit the transaction's offsets of group {group:?}: {e}"),
                )
            })?;
        }
        let mut inner = self.lock();
        if !Self::still_decided(&inner, &ending) {
            return Ok(());
        }
        let Some(meta) = inner.transactions.get(&ending.transactional_id) else {
            return Ok(());
        };
        let mut meta = meta.clone();
        meta.state = if ending.commit {
            TxnState::CompleteCommit
        } else {
            TxnState::CompleteAbort
        };
        meta.partitions.clear();
        meta.groups.clear();
        meta.offsets.clear();
        meta.updated_ms = state.now_ms();
        self.update(&mut inner, &ending.transactional_id, meta)?;
        tracing::info!(
            transactional_id = %ending.transactional_id,
            producer_id = ending.producer_id,
            epoch = ending.epoch,
            commit = ending.commit,
            partitions = ending.partitions.len(),
            "transaction complete"
        );
        Ok(())
    }

    /// Checks a transactional batch of `topic`-`partition` (see the module notes).
    pub(crate) fn verify(
        &self,
        header: &BatchHeader,
        transactional_id: &str,
        topic: &str,
        partition: i32,
    ) -> Result<(), AppendError> {
        let inner = self.lock();
        let meta = inner
            .by_producer
            .get(&header.producer_id)
            .filter(|id| id.as_str() == transactional_id)
            .and_then(|id| inner.transactions.get(id));
        let Some(meta) = meta else {
            return Err(AppendError::TxnState {
                reason: format!(
                    "transactional batch from producer {}, which is not transactional id {transactional_id:?}'s",
                    header.producer_id
                ),
            });
        };
        if header.producer_epoch < meta.epoch {
            return Err(AppendError::Fenced {
                producer_id: header.producer_id,
                epoch: header.producer_epoch,
                current_epoch: meta.epoch,
            });
        }
        if header.producer_epoch != meta.epoch
            || meta.state != TxnState::Ongoing
            || !meta.partitions.contains(&(topic.to_string(), partition))
        {
            return Err(AppendError::TxnState {
                reason: format!(
                    "transactional batch from producer {} at epoch {} for {topic}-{partition}, which its transaction (epoch {}, {}) has not added",
                    header.producer_id,
                    header.producer_epoch,
                    meta.epoch,
                    meta.state.name()
                ),
            });
        }
        Ok(())
    }

    /// On start, before serving: completes every transaction decided before a crash.
    pub(crate) async fn recover(&self, state: &BrokerState) -> Result<usize, TxnError> {
        let endings: Vec<Ending> = self
            .lock()
            .transactions
            .iter()
            .filter(|(_, m)| matches!(m.state, TxnState::PrepareCommit | TxnState::PrepareAbort))
            .map(|(id, m)| Self::ending_of(id, m))
            .collect();
        let count = endings.len();
        for ending in endings {
            tracing::info!(transactional_id = %ending.transactional_id, commit = ending.commit, "completing a transaction decided before the restart");
            self.complete_within(state, ending).await?;
        }
        Ok(count)
    }

    /// Periodic work: aborts (fencing the producer) every open transaction older than its
    /// `transaction.timeout.ms`, retries completions that failed, and forgets transactional ids
    /// idle past `transactional.id.expiration.ms`.
    pub(crate) async fn tick(&self, state: &BrokerState) {
        let now = state.now_ms();
        let mut endings = Vec::new();
        {
            let mut inner = self.lock();
            let expired: Vec<String> = inner
                .transactions
                .iter()
                .filter(|(_, m)| {
                    m.state == TxnState::Ongoing
                        && now.saturating_sub(m.started_ms) > i64::from(m.timeout_ms)
                })
                .map(|(id, _)| id.clone())
                .collect();
            for id in expired {
                tracing::warn!(transactional_id = %id, "transaction timed out (transaction.timeout.ms); aborting it and fencing its producer");
                match self.decide(&mut inner, &id, false, true, now) {
                    Ok(ending) => endings.push(ending),
                    Err(e) => {
                        tracing::error!(transactional_id = %id, error = %e.message, "cannot abort a timed-out transaction")
                    }
                }
            }
            let retried: Vec<Ending> = inner
                .transactions
                .iter()
                .filter(|(id, m)| {
                    matches!(m.state, TxnState::PrepareCommit | TxnState::PrepareAbort)
                        && !endings.iter().any(|d: &Ending| &d.transactional_id == *id)
                })
                .map(|(id, m)| Self::ending_of(id, m))
                .collect();
            endings.extend(retried);
            let idle: Vec<String> = inner
                .transactions
                .iter()
                .filter(|(_, m)| {
                    !matches!(
                        m.state,
                        TxnState::Ongoing | TxnState::PrepareCommit | TxnState::PrepareAbort
                    ) && now.saturating_sub(m.updated_ms) > TRANSACTIONAL_ID_EXPIRATION_MS
                })
                .map(|(id, _)| id.clone())
                .collect();
            if !idle.is_empty() {
                let mut next = inner.transactions.clone();
                for id in &idle {
                    next.remove(id);
                }
                if self.persist(&next).is_ok() {
                    inner.transactions = next;
                    inner.rebuild_index();
                    let mut completions =
                        self.completions.lock().unwrap_or_else(|p| p.into_inner());
                    for id in &idle {
                        completions.remove(id);
                    }
                    tracing::info!(
                        expired = idle.len(),
                        "transactional ids expired (transactional.id.expiration.ms)"
                    );
                }
            }
        }
        for ending in endings {
            if let Err(e) = self.complete_within(state, ending).await {
                tracing::error!(error = %e.message, "cannot complete a transaction; retrying later");
            }
        }
    }

    /// Every transactional id with its metadata (DescribeTransactions, ListTransactions).
    pub(crate) fn snapshot(&self) -> Vec<(String, TxnMetadata)> {
        self.lock()
            .transactions
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::broker::{Broker, BrokerHandle};
    use crate::config::BrokerConfig;
    use crate::log::batch::control_type;
    use crate::log::tests::{build_batch, with_producer};
    use crate::log::validate_produce_records;

    /// Starts a broker on `dir`, waiting (bounded) for a dropped one's tasks to let go of
    /// the data directory's lock.
    async fn start(dir: &Path) -> BrokerHandle {
        let config = BrokerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.to_path_buf(),
            ..BrokerConfig::default()
        };
        for _ in 0..100 {
            match Broker::start(config.clone()).await {
                Ok(broker) => return broker,
                Err(crate::broker::StartError::DataDirInUse { .. }) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(e) => panic!("broker start: {e}"),
            }
        }
        panic!("the data directory stayed locked for 5 s")
    }

    /// (The coordinator's timer runs on the real clock: every time given to it here is
    /// `state.now_ms()`, or the timer would find the transaction decades old and abort it.)
    ///
    /// A broker on `dir` with topic `t` of `partitions` partitions, and transactional id
    /// `tx` initialised: (broker, its state, producer id, epoch).
    async fn with_topic(dir: &Path, partitions: i32) -> (BrokerHandle, Arc<BrokerState>, i64, i16) {
        let broker = start(dir).await;
        let state = Arc::clone(&broker.state);
        state
            .catalog
            .create_topic("t", partitions, Default::default(), false, 0)
            .unwrap();
        let (pid, epoch) = state
            .transactions
            .init_producer_id(&state, "tx", 60_000, None)
            .await
            .unwrap();
        (broker, state, pid, epoch)
    }

    /// A transactional batch of `count` records from `producer` at `epoch`, from `sequence`.
    fn transactional(producer: i64, epoch: i16, sequence: i32, count: i32) -> Vec<u8> {
        let mut bytes = with_producer(build_batch(count, 1_000, 10), producer, epoch, sequence);
        bytes[22] |= 0x10;
        let crc = crc32c::crc32c(&bytes[21..]);
        bytes[17..21].copy_from_slice(&crc.to_be_bytes());
        bytes
    }

    fn last_batch_control(state: &BrokerState, topic: &str) -> Option<ControlType> {
        let partition = state.catalog.topic(topic)?.partition(0)?.clone();
        let end = partition.log().log_end_offset();
        let read = partition.log().read(end - 1, 1 << 20).ok()?;
        control_type(&read.records)
    }

    /// The request that decided a transaction and the timer (which retries every decided
    /// one) may both set out to complete it. Only one writes its markers and commits its
    /// offsets: a second marker written late would end the producer's next transaction on
    /// that partition (aborting or exposing its records), and a second offset commit could
    /// move the group back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_decided_transaction_is_completed_once_when_two_completers_race() {
        let dir = tempfile::tempdir().unwrap();
        let (broker, state, pid, epoch) = with_topic(dir.path(), 1).await;
        state
            .transactions
            .add_partitions("tx", pid, epoch, &[("t".into(), 0)], state.now_ms())
            .unwrap();
        let partition = state
            .catalog
            .topic("t")
            .unwrap()
            .partition(0)
            .unwrap()
            .clone();
        let batch = validate_produce_records(&transactional(pid, epoch, 0, 1), 1 << 20).unwrap();
        let verify = |h: &BatchHeader| state.transactions.verify(h, "tx", "t", 0);
        partition.append_verified(&batch, 2, &verify).unwrap();
        let ending = {
            let mut inner = state.transactions.lock();
            state
                .transactions
                .decide(&mut inner, "tx", false, false, state.now_ms())
                .unwrap()
        };
        let (first, second) = tokio::join!(
            state.transactions.complete(&state, ending.clone()),
            state.transactions.complete(&state, ending)
        );
        first.unwrap();
        second.unwrap();
        assert_eq!(
            partition.log().log_end_offset(),
            2,
            "the batch and one abort marker"
        );
        assert_eq!(last_batch_control(&state, "t"), Some(ControlType::Abort));
        drop(state);
        broker.shutdown().await;
    }

    /// The crash window of EndTxn: the commit was decided (PrepareCommit is on disk) and the
    /// process died before any marker was written. After the restart, before anything is
    /// served, the markers are written and the transaction's offsets committed: the records
    /// become visible to read_committed readers and the group resumes after them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_decided_before_a_crash_is_completed_on_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (broker, state, pid, epoch) = with_topic(dir.path(), 1).await;
        state
            .transactions
            .add_partitions("tx", pid, epoch, &[("t".into(), 0)], state.now_ms())
            .unwrap();
        state
            .transactions
            .add_offsets("tx", pid, epoch, "g", state.now_ms())
            .unwrap();
        let offsets = vec![PendingOffset {
            group: "g".into(),
            topic: "in".into(),
            partition: 0,
            offset: 42,
            leader_epoch: -1,
            metadata: String::new(),
        }];
        state
            .transactions
            .commit_offsets("tx", pid, epoch, "g", offsets, state.now_ms())
            .unwrap();
        let partition = state
            .catalog
            .topic("t")
            .unwrap()
            .partition(0)
            .unwrap()
            .clone();
        let batch = validate_produce_records(&transactional(pid, epoch, 0, 3), 1 << 20).unwrap();
        let verify = |h: &BatchHeader| state.transactions.verify(h, "tx", "t", 0);
        partition.append_verified(&batch, 2, &verify).unwrap();
        assert_eq!(
            partition.last_stable_offset(),
            0,
            "the open transaction holds the LSO"
        );
        // Decide, then "crash": no marker, no Complete.
        {
            let mut inner = state.transactions.lock();
            state
                .transactions
                .decide(&mut inner, "tx", true, false, state.now_ms())
                .unwrap();
        }
        drop(partition);
        drop(state);
        drop(broker);

        let broker = start(dir.path()).await;
        let state = Arc::clone(&broker.state);
        let partition = state
            .catalog
            .topic("t")
            .unwrap()
            .partition(0)
            .unwrap()
            .clone();
        assert_eq!(
            partition.log().log_end_offset(),
            4,
            "3 records and the marker"
        );
        assert_eq!(partition.last_stable_offset(), 4);
        assert_eq!(last_batch_control(&state, "t"), Some(ControlType::Commit));
        let committed = state.groups.committed("g");
        assert_eq!(
            committed.get(&("in".to_string(), 0)).map(|c| c.offset),
            Some(42)
        );
        let meta = state.transactions.snapshot();
        assert_eq!(meta[0].1.state, TxnState::CompleteCommit);
        // And a retried EndTxn(commit) of that transaction is answered as done.
        state
            .transactions
            .end_transaction(&state, "tx", pid, epoch, true)
            .await
            .unwrap();
        drop(partition);
        drop(state);
        broker.shutdown().await;
    }

    /// Kafka refuses a Produce whose transactional batches come without the request's
    /// `transactional_id` (TRANSACTIONAL_ID_AUTHORIZATION_FAILED); semel-broker did not, and
    /// semel-producer, tested only against it, left the field empty (found on Kafka). With the
    /// field, the batch is stored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transactional_produce_must_name_its_transactional_id() {
        use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
        use kafka_protocol::messages::{ProduceRequest, ResponseKind, TopicName, TransactionalId};
        use kafka_protocol::protocol::StrBytes;

        use crate::api::Reply;
        let dir = tempfile::tempdir().unwrap();
        let (broker, state, pid, epoch) = with_topic(dir.path(), 1).await;
        state
            .transactions
            .add_partitions("tx", pid, epoch, &[("t".into(), 0)], state.now_ms())
            .unwrap();
        let produce = |transactional_id: Option<&str>, sequence: i32| {
            let request = ProduceRequest::default()
                .with_transactional_id(
                    transactional_id.map(|id| TransactionalId(StrBytes::from_string(id.into()))),
                )
                .with_acks(1)
                .with_timeout_ms(1000)
                .with_topic_data(vec![
                    TopicProduceData::default()
                        .with_name(TopicName(StrBytes::from_static_str("t")))
                        .with_partition_data(vec![
                            PartitionProduceData::default()
                                .with_index(0)
                                .with_records(Some(bytes::Bytes::from(transactional(
                                    pid, epoch, sequence, 1,
                                )))),
                        ]),
                ]);
            match crate::api::produce::handle(&state, request, 9) {
                Reply::Now(response) => match *response {
                    ResponseKind::Produce(r) => r.responses[0].partition_responses[0].error_code,
                    other => panic!("{other:?}"),
                },
                _ => panic!("acks=1 answers now"),
            }
        };
        assert_eq!(
            produce(None, 0),
            ResponseError::TransactionalIdAuthorizationFailed.code()
        );
        assert_eq!(
            produce(Some("someone-else"), 0),
            ResponseError::InvalidTxnState.code()
        );
        assert_eq!(produce(Some("tx"), 0), 0);
        drop(state);
        broker.shutdown().await;
    }

    /// A transactional batch is refused unless its partition was added to the producer's open
    /// transaction at its current epoch; a non-transactional batch from a producer with a
    /// transaction open on the partition is refused too. Nothing refused is written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_outside_their_transaction_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (broker, state, pid, epoch) = with_topic(dir.path(), 2).await;
        let p0 = state
            .catalog
            .topic("t")
            .unwrap()
            .partition(0)
            .unwrap()
            .clone();
        let p1 = state
            .catalog
            .topic("t")
            .unwrap()
            .partition(1)
            .unwrap()
            .clone();
        let append = |partition: &crate::partition::Partition, index: i32, bytes: Vec<u8>| {
            let batch = validate_produce_records(&bytes, 1 << 20).unwrap();
            let verify = |h: &BatchHeader| state.transactions.verify(h, "tx", "t", index);
            partition.append_verified(&batch, 1, &verify)
        };
        let refused = append(&p0, 0, transactional(pid, epoch, 0, 1)).unwrap_err();
        assert_eq!(refused.code(), ResponseError::InvalidTxnState, "{refused}");
        state
            .transactions
            .add_partitions("tx", pid, epoch, &[("t".into(), 0)], state.now_ms())
            .unwrap();
        append(&p0, 0, transactional(pid, epoch, 0, 1)).unwrap();
        let other = append(&p1, 1, transactional(pid, epoch, 0, 1)).unwrap_err();
        assert_eq!(other.code(), ResponseError::InvalidTxnState, "{other}");
        let plain = with_producer(build_batch(1, 1_000, 10), pid, epoch, 1);
        let plain = append(&p0, 0, plain).unwrap_err();
        assert_eq!(plain.code(), ResponseError::InvalidTxnState, "{plain}");
        // A newer instance fences this one: its open transaction is aborted, and its late
        // batches are refused as fenced.
        let (_, bumped) = state
            .transactions
            .init_producer_id(&state, "tx", 60_000, None)
            .await
            .unwrap();
        assert_eq!(
            bumped,
            epoch + 2,
            "one bump for the abort, one for the new instance"
        );
        assert_eq!(last_batch_control(&state, "t"), Some(ControlType::Abort));
        let late = append(&p0, 0, transactional(pid, epoch, 1, 1)).unwrap_err();
        assert_eq!(late.code(), ResponseError::InvalidProducerEpoch, "{late}");
        assert_eq!(
            p0.log().log_end_offset(),
            2,
            "one batch and its abort marker"
        );
        assert_eq!(p1.log().log_end_offset(), 0);
        drop((p0, p1, state));
        broker.shutdown().await;
    }

    /// KIP-360: the expected producer id and epoch are checked; a retried bump is answered
    /// with the same epoch; a zombie is fenced; the epoch rolls over to a new producer id.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn init_producer_id_checks_the_expected_epoch_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let broker = start(dir.path()).await;
        let state = Arc::clone(&broker.state);
        let tc = &state.transactions;
        let (pid, e0) = tc.init_producer_id(&state, "t", 1_000, None).await.unwrap();
        assert_eq!(e0, 0);
        let (same, e1) = tc
            .init_producer_id(&state, "t", 1_000, Some((pid, 0)))
            .await
            .unwrap();
        assert_eq!((same, e1), (pid, 1));
        let retry = tc
            .init_producer_id(&state, "t", 1_000, Some((pid, 0)))
            .await
            .unwrap();
        assert_eq!(retry, (pid, 1), "a retry of the bump is not bumped again");
        let fenced = tc
            .init_producer_id(&state, "t", 1_000, Some((pid, 7)))
            .await
            .unwrap_err();
        assert_eq!(fenced.code, ResponseError::ProducerFenced);
        {
            let mut inner = tc.lock();
            let mut meta = inner.transactions["t"].clone();
            meta.epoch = i16::MAX - 1;
            tc.update(&mut inner, "t", meta).unwrap();
        }
        let (rotated, epoch) = tc.init_producer_id(&state, "t", 1_000, None).await.unwrap();
        assert_ne!(rotated, pid);
        assert_eq!(epoch, 0);
        drop(state);
        broker.shutdown().await;
        let broker = start(dir.path()).await;
        let state = Arc::clone(&broker.state);
        let again = state
            .transactions
            .init_producer_id(&state, "t", 1_000, None)
            .await
            .unwrap();
        assert_eq!(
            again,
            (rotated, 1),
            "the mapping and epoch survive a restart"
        );
        drop(state);
        broker.shutdown().await;
    }
}
