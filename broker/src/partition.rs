//! One partition as the request handlers see it: the partition log behind a lock, plus group
//! commit for `acks=all`.
//!
//! Group commit: a producer waiting for durability takes the flush lock; whoever holds it fsyncs
//! everything appended so far, so producers that queued behind it find their batch already
//! covered and return without a second fsync. No background task is needed, and dropping a
//! waiter (a closed connection) never leaves the lock held.
//!
//! References: Kafka design notes on `acks` and `flush.messages`; KIP-98 (acks=all semantics).

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use crate::log::{AppendInfo, LogConfig, LogError, PartitionLog, RecoveryReport, ValidatedBatch};

/// A partition: its log and its durability state.
#[derive(Debug)]
pub(crate) struct Partition {
    pub(crate) topic: String,
    pub(crate) index: i32,
    log: Mutex<PartitionLog>,
    /// Every offset below this is fsynced.
    durable_end: AtomicI64,
    flush_lock: tokio::sync::Mutex<()>,
    /// Bumped after every append so long-polling fetches re-check.
    appended: Arc<watch::Sender<u64>>,
}

impl Partition {
    /// Opens (recovering) the log in `dir` and fsyncs whatever recovery kept, so everything
    /// below the log end offset is durable from the start.
    pub(crate) fn open(
        topic: &str,
        index: i32,
        dir: &Path,
        config: LogConfig,
        now_ms: i64,
        appended: Arc<watch::Sender<u64>>,
    ) -> Result<(Self, RecoveryReport), LogError> {
        let (mut log, report) = PartitionLog::open(dir, config, now_ms)?;
        log.flush()?;
        let durable_end = AtomicI64::new(log.log_end_offset());
        Ok((
            Self {
                topic: topic.to_string(),
                index,
                log: Mutex::new(log),
                durable_end,
                flush_lock: tokio::sync::Mutex::new(()),
                appended,
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

    /// Appends one validated batch and wakes long-polling fetches.
    pub(crate) fn append(
        &self,
        batch: &ValidatedBatch,
        now_ms: i64,
    ) -> Result<AppendInfo, LogError> {
        let info = self.log().append(batch, now_ms)?;
        self.appended
            .send_modify(|generation| *generation = generation.wrapping_add(1));
        Ok(info)
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
            let (file, target) = self.log().sync_target()?;
            let synced = tokio::task::spawn_blocking(move || file.sync_data())
                .await
                .map_err(|join| std::io::Error::other(join.to_string()))
                .and_then(|result| result);
            synced.map_err(|source| LogError::Sync {
                topic_partition: format!("{}-{}", self.topic, self.index),
                source,
            })?;
            self.durable_end.fetch_max(target, Ordering::AcqRel);
        }
    }
}
