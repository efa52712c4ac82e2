//! Producer ids for InitProducerId: never reused, including across restarts and `kill -9`.
//!
//! Ids are handed out from blocks of [`BLOCK_SIZE`]. Before the first id of a block is given
//! out, the end of the block is written (atomically, fsynced) to `producer_ids.bin`; after a
//! restart allocation resumes at that end. A crash therefore skips at most the rest of one
//! block, and never repeats an id.
//!
//! Transactional ids and their epochs are kept by the transaction coordinator
//! (`crate::transactions`); brokers from before it kept them here, and it reads them once.
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

    /// A never-used producer id (for a transactional id: the coordinator keeps its epoch).
    pub(crate) fn allocate_id(&self) -> Result<i64, InitError> {
        let mut inner = self.lock();
        self.allocate(&mut inner)
    }

    /// Transactional ids recorded by a broker from before the transaction coordinator kept
    /// them (`transactions.bin`), with their producer id and epoch.
    pub(crate) fn legacy_transactional(&self) -> Vec<(String, (i64, i16))> {
        self.lock()
            .transactional
            .iter()
            .map(|(id, p)| (id.clone(), (p.producer_id, p.epoch)))
            .collect()
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
    fn a_corrupt_allocator_file_refuses_to_start() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), b"garbage that is not a state file").unwrap();
        let error = ProducerIds::open(dir.path()).unwrap_err();
        assert!(error.to_string().contains("producer_ids.bin"), "{error}");
    }
}
