//! Producer ids for InitProducerId: never reused, including across restarts and `kill -9`.
//!
//! Ids are handed out from blocks of [`BLOCK_SIZE`]. Before the first id of a block is given
//! out, the end of the block is written (atomically, fsynced) to `producer_ids.bin`; after a
//! restart allocation resumes at that end. A crash therefore skips at most the rest of one
//! block, and never repeats an id.
//!
//! A transactional id maps to one producer id, and every InitProducerId for it bumps the
//! epoch, which fences the previous instance (its batches now carry an older epoch). The
//! mapping is persisted before the reply. When the epoch would reach `i16::MAX`, the
//! transactional id is moved to a fresh producer id at epoch 0, as Kafka does.
//!
//! References: KIP-98 (InitProducerId), KIP-360 (producer id and epoch in the request, retries
//! of a bump), KIP-588 (PRODUCER_FENCED), Kafka's `ProducerIdManager` (blocks of 1000).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use kafka_protocol::ResponseError;

use crate::state_file::{self, StateFileError};

/// Ids reserved per write of the allocator file.
pub(crate) const BLOCK_SIZE: i64 = 1000;
const FILE: &str = "producer_ids.bin";
const MAGIC: &[u8; 8] = b"SEMELPID";
const VERSION: u16 = 1;

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct AllocatorFile {
    /// No id below this has been or will be handed out again.
    next_block_start: i64,
    /// Transactional id → its producer id and current epoch.
    transactional: Vec<(String, TransactionalProducer)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct TransactionalProducer {
    producer_id: i64,
    epoch: i16,
}

#[derive(Debug)]
struct Inner {
    next: i64,
    block_end: i64,
    transactional: BTreeMap<String, TransactionalProducer>,
}

/// The producer-id allocator of one broker.
#[derive(Debug)]
pub(crate) struct ProducerIds {
    path: PathBuf,
    inner: Mutex<Inner>,
}

/// A refused InitProducerId.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InitError {
    pub(crate) code: ResponseError,
    pub(crate) message: String,
}

impl ProducerIds {
    /// Opens (or creates) the allocator in `data_dir`.
    ///
    /// # Errors
    /// When the file exists but is corrupt, or cannot be read: starting anyway could reuse ids.
    pub(crate) fn open(data_dir: &Path) -> Result<Self, StateFileError> {
        let path = data_dir.join(FILE);
        let file = state_file::read::<AllocatorFile>(&path, MAGIC, VERSION)?.unwrap_or_default();
        let next = file.next_block_start;
        Ok(Self {
            path,
            inner: Mutex::new(Inner {
                next,
                block_end: next,
                transactional: file.transactional.into_iter().collect(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Inner is changed only after the file write that backs it succeeded.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(
        &self,
        next_block_start: i64,
        transactional: &BTreeMap<String, TransactionalProducer>,
    ) -> Result<(), InitError> {
        let file = AllocatorFile {
            next_block_start,
            transactional: transactional.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        };
        state_file::write(&self.path, MAGIC, VERSION, &file).map_err(|e| {
            tracing::error!(error = %e, "cannot persist the producer-id allocator");
            InitError {
                code: ResponseError::KafkaStorageError,
                message: format!("cannot persist producer ids: {e}"),
            }
        })
    }

    /// A never-used producer id, reserving a new block first when the current one is used up.
    fn allocate(&self, inner: &mut Inner) -> Result<i64, InitError> {
        if inner.next >= inner.block_end {
            let end = inner.next + BLOCK_SIZE;
            self.persist(end, &inner.transactional)?;
            inner.block_end = end;
        }
        let id = inner.next;
        inner.next += 1;
        Ok(id)
    }

    /// A new idempotent producer: a fresh id at epoch 0.
    pub(crate) fn new_idempotent(&self) -> Result<(i64, i16), InitError> {
        let mut inner = self.lock();
        Ok((self.allocate(&mut inner)?, 0))
    }

    /// The producer id of `transactional_id` with its epoch bumped (or a new id at epoch 0 the
    /// first time). `expected` is the (producer id, epoch) a KIP-360 client sends (v3+): it
    /// must be the current pair, or the pair just before a bump that the client is retrying;
    /// anything else means another instance took over and the caller is fenced.
    pub(crate) fn init_transactional(
        &self,
        transactional_id: &str,
        expected: Option<(i64, i16)>,
    ) -> Result<(i64, i16), InitError> {
        let mut inner = self.lock();
        let current = inner.transactional.get(transactional_id).copied();
        if let (Some(current), Some((producer_id, epoch))) = (current, expected) {
            if producer_id == current.producer_id && epoch.checked_add(1) == Some(current.epoch) {
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
        let next = match current {
            Some(current) if current.epoch < i16::MAX - 1 => TransactionalProducer {
                producer_id: current.producer_id,
                epoch: current.epoch + 1,
            },
            _ => TransactionalProducer {
                producer_id: self.allocate(&mut inner)?,
                epoch: 0,
            },
        };
        let mut updated = inner.transactional.clone();
        updated.insert(transactional_id.to_string(), next);
        self.persist(inner.block_end, &updated)?;
        inner.transactional = updated;
        Ok((next.producer_id, next.epoch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_never_reused_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let ids = ProducerIds::open(dir.path()).unwrap();
        let first: Vec<i64> = (0..3).map(|_| ids.new_idempotent().unwrap().0).collect();
        assert_eq!(first, vec![0, 1, 2]);
        drop(ids);
        // As after kill -9: the rest of the reserved block is skipped, nothing repeats.
        let ids = ProducerIds::open(dir.path()).unwrap();
        let (next, epoch) = ids.new_idempotent().unwrap();
        assert_eq!((next, epoch), (BLOCK_SIZE, 0));
    }

    #[test]
    fn allocation_crosses_block_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let ids = ProducerIds::open(dir.path()).unwrap();
        let mut last = -1;
        for _ in 0..(BLOCK_SIZE * 2 + 5) {
            let (id, _) = ids.new_idempotent().unwrap();
            assert_eq!(id, last + 1);
            last = id;
        }
        drop(ids);
        let ids = ProducerIds::open(dir.path()).unwrap();
        assert_eq!(ids.new_idempotent().unwrap().0, BLOCK_SIZE * 3);
    }

    #[test]
    fn transactional_id_keeps_its_producer_and_bumps_the_epoch_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let ids = ProducerIds::open(dir.path()).unwrap();
        let (pid, epoch) = ids.init_transactional("orders", None).unwrap();
        assert_eq!(epoch, 0);
        assert_eq!(ids.init_transactional("orders", None).unwrap(), (pid, 1));
        let (other, _) = ids.init_transactional("payments", None).unwrap();
        assert_ne!(other, pid);
        drop(ids);
        let ids = ProducerIds::open(dir.path()).unwrap();
        assert_eq!(ids.init_transactional("orders", None).unwrap(), (pid, 2));
    }

    #[test]
    fn kip_360_expected_epoch_is_checked_and_retries_are_answered() {
        let dir = tempfile::tempdir().unwrap();
        let ids = ProducerIds::open(dir.path()).unwrap();
        let (pid, _) = ids.init_transactional("t", None).unwrap();
        assert_eq!(
            ids.init_transactional("t", Some((pid, 0))).unwrap(),
            (pid, 1)
        );
        // The same request again (its reply was lost): the bump is not repeated.
        assert_eq!(
            ids.init_transactional("t", Some((pid, 0))).unwrap(),
            (pid, 1)
        );
        // A zombie with an older epoch, or another producer id, is fenced.
        let fenced = ids.init_transactional("t", Some((pid, 5))).unwrap_err();
        assert_eq!(fenced.code, ResponseError::ProducerFenced);
        let fenced = ids
            .init_transactional("t", Some((pid + 100, 1)))
            .unwrap_err();
        assert_eq!(fenced.code, ResponseError::ProducerFenced);
    }

    #[test]
    fn epoch_exhaustion_rotates_to_a_new_producer_id() {
        let dir = tempfile::tempdir().unwrap();
        let ids = ProducerIds::open(dir.path()).unwrap();
        let (pid, _) = ids.init_transactional("t", None).unwrap();
        ids.lock().transactional.insert(
            "t".into(),
            TransactionalProducer {
                producer_id: pid,
                epoch: i16::MAX - 1,
            },
        );
        let (rotated, epoch) = ids.init_transactional("t", None).unwrap();
        assert_ne!(rotated, pid);
        assert_eq!(epoch, 0);
    }

    #[test]
    fn a_corrupt_allocator_file_refuses_to_start() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), b"garbage that is not a state file").unwrap();
        let error = ProducerIds::open(dir.path()).unwrap_err();
        assert!(error.to_string().contains("producer_ids.bin"), "{error}");
    }
}
