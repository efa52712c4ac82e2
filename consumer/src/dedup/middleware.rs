//! The dedup middleware: a [`Consumer`] that hands out only messages not handled before.
//!
//! For every record it derives a message key ([`KeySource`]: a header, `semel-msg-id` by
//! default; the record key; or a closure), claims it in the [`DedupStore`], and:
//! - **Fresh** (or a claim whose lease expired, its handler having crashed): the record is
//!   returned as a [`Fresh`] handle. [`Fresh::done`] marks it handled, records the
//!   partition's committable offset and applies the handler's own writes, all in one RocksDB
//!   `WriteBatch`; [`Fresh::failed`] releases the claim and hands the record out again. A
//!   handle dropped without either (a panicking handler) does the same.
//! - **Duplicate**: dropped and counted.
//! - **In progress** (another handler's live claim, e.g. a member of the same process that
//!   is still on it): waits until a handler of this process settles or the lease ends, then
//!   asks again.
//!
//! **Concurrent handlers.** `Fresh` handles are independent of the consumer: hand each to a
//! task, or use `futures::StreamExt::for_each_concurrent`, and settle them in any order. Per
//! partition the offset written to the store and committed to the group is the lowest offset
//! not yet settled ([`super::settlement`]), so a record still in flight, failed or dropped is
//! never passed by one that settled after it: after a crash it is delivered again.
//!
//! **Durability.** Before an offset leaves the process (a group commit, a commit on
//! revocation, a mark released to the changelog) the store's write-ahead log is synced
//! ([`DedupStore::sync`]), so the marks and state it depends on survive a power cut, not only
//! `kill -9`. `sync_writes` syncs every batch instead.
//!
//! On assignment without a changelog, the consumer starts at the store's offset when it is
//! ahead of the group's committed offset (the store is written with every settle, the group
//! commit only every `commit_interval`). With a changelog it starts at the group's offset:
//! the records in between are dropped as duplicates, and their marks go to the changelog
//! again, in case a crash kept them from it. `enable.auto.commit` is refused: it would commit records not handled.
//!
//! **What is exactly-once and what is not.** Writes made through the batch (`done`'s closure)
//! commit with the mark or not at all: exactly once. A side effect outside it (an HTTP call,
//! a file append) that happened before a crash, with the mark not yet written, happens again
//! once the claim's lease expires: at-least-once. `tests/dedup_consumer.rs` shows both.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::changelog::{Changelog, ChangelogConfig, ChangelogError, RestoreMetrics};
use super::settlement::{Epoch, Revoking, Settlements};
use super::store::{
    Claim, ClaimToken, DedupError, DedupStore, KeyHash, StateBatch, StateWrites, Waits, off_runtime,
};
use crate::assignor::TopicPartition;
use crate::consumer::{Consumer, RebalanceContext, RebalanceListener};
use crate::record::{ConsumerError, ConsumerRecord};

/// A function that derives a message key from a record.
pub type KeyFn = Arc<dyn Fn(&ConsumerRecord) -> Option<Bytes> + Send + Sync>;

/// Where a message's identity comes from.
#[derive(Clone)]
pub enum KeySource {
    /// A header's value (the default: `semel-msg-id`).
    Header(String),
    /// The record key.
    RecordKey,
    /// Any function of the record.
    Custom(KeyFn),
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Header(name) => write!(f, "Header({name:?})"),
            Self::RecordKey => write!(f, "RecordKey"),
            Self::Custom(_) => write!(f, "Custom(..)"),
        }
    }
}

impl KeySource {
    /// The record's message key (`None`: it has none), or what a panicking `Custom` function
    /// said: the record was taken from the consumer and must not unwind away with it.
    fn key(&self, record: &ConsumerRecord) -> Result<Option<Bytes>, String> {
        let key = match self {
            Self::Header(name) => record.headers.get_bytes(name),
            Self::RecordKey => record.key.clone(),
            Self::Custom(f) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(record)))
                .map_err(|panic| {
                    panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic without a message".to_string())
                })?,
        };
        Ok(key.filter(|k| !k.is_empty()))
    }

    /// The hash of the record's message key in `group` ([`KeySource::key`]), without a copy
    /// of the key (nor a count on its buffer) when it is a header or the record key.
    fn hash(&self, group: &str, record: &ConsumerRecord) -> Result<Option<KeyHash>, String> {
        let borrowed = match self {
            Self::Header(name) => record.header(name),
            Self::RecordKey => record.key.as_deref(),
            Self::Custom(_) => {
                let key = self.key(record)?;
                return Ok(key.map(|k| KeyHash::new(group, &record.topic, &k)));
            }
        };
        Ok(borrowed
            .filter(|k| !k.is_empty())
            .map(|k| KeyHash::new(group, &record.topic, k)))
    }
}

/// What to do with a record that has no key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingKey {
    /// Hand it out without deduplication (`Fresh::key()` is `None`).
    Pass,
    /// Fail `next` with [`MiddlewareError::NoKey`] (the default). The record counts as settled
    /// (its offset may be committed): the error is the only report of it.
    Reject,
}

/// Middleware settings.
#[derive(Debug, Clone)]
pub struct MiddlewareConfig {
    /// Where the message key comes from.
    pub key_source: KeySource,
    /// Records without a key.
    pub missing_key: MissingKey,
    /// How often settled offsets are committed to the group (the store has them at once).
    pub commit_interval: Duration,
    /// The changelog topic that lets a consumer on another host know the marks of a
    /// partition it takes over (on by default; `None` keeps marks on this host only, which
    /// is enough when one host consumes the group). See [`super::changelog`].
    pub changelog: Option<ChangelogConfig>,
    /// How long a revocation waits for handles still out on the revoked partitions (and for
    /// the changelog to acknowledge their marks) before the rebalance goes on without them:
    /// their records are then handled again by the next owner. The consumer also stops
    /// waiting at half of `max.poll.interval.ms`.
    pub revocation_wait: Duration,
}

impl Default for MiddlewareConfig {
    fn default() -> Self {
        Self {
            key_source: KeySource::Header("semel-msg-id".into()),
            missing_key: MissingKey::Reject,
            commit_interval: Duration::from_secs(1),
            changelog: Some(ChangelogConfig::default()),
            revocation_wait: Duration::from_secs(30),
        }
    }
}

/// What went wrong in the middleware.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MiddlewareError {
    /// The consumer failed.
    #[error(transparent)]
    Consumer(#[from] ConsumerError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] DedupError),
    /// The changelog failed.
    #[error(transparent)]
    Changelog(#[from] ChangelogError),
    /// A record without a key, with `MissingKey::Reject`.
    #[error(
        "record {topic}-{partition}@{offset} has no message key ({source_:?}); set MissingKey::Pass to hand such records out without deduplication"
    )]
    NoKey {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// The offset.
        offset: i64,
        /// The key source that found nothing.
        source_: KeySource,
    },
    /// A `KeySource::Custom` function panicked on a record. As with `NoKey`, the record counts
    /// as settled (its offset may be committed): this error is the only report of it.
    #[error(
        "the message key function panicked on record {topic}-{partition}@{offset}: {panic}; the record is not handed out"
    )]
    KeyFunction {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// The offset.
        offset: i64,
        /// The panic's message.
        panic: String,
    },
}

/// Counters: the store's decisions plus the middleware's own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MiddlewareMetrics {
    /// Keys handed out for the first time.
    pub fresh: u64,
    /// Messages dropped as already handled.
    pub duplicates: u64,
    /// Claims taken over after their lease expired.
    pub claims_expired: u64,
    /// Claims released by `failed` (or a dropped handle).
    pub handler_failures: u64,
    /// Records without a key handed out (`MissingKey::Pass`).
    pub passed_without_key: u64,
    /// Records without a key rejected (or whose key function panicked).
    pub rejected_without_key: u64,
    /// Estimated keys in the store.
    pub keys_stored: u64,
    /// SST bytes on disk.
    pub bytes_on_disk: u64,
    /// Changelog replays (zero without a changelog).
    pub changelog: RestoreMetrics,
}

/// A claimed record: settle it with [`Fresh::done`] or [`Fresh::failed`] (or the
/// [`DedupConsumer`] methods of the same names). Handles are independent of the consumer:
/// several may be in flight at once (a task each) and settle in any order; the offset that is
/// committed never passes one that is still in flight. Dropping a handle unsettled (a
/// panicking handler) releases its claim and hands the record out again.
#[derive(Debug)]
pub struct Fresh {
    /// The record.
    pub record: ConsumerRecord,
    /// The message key's hash and this handle's claim on it (`None`: passed without a key).
    claim: Option<(KeyHash, ClaimToken)>,
    reclaimed: bool,
    epoch: Epoch,
    shared: Arc<Shared>,
    settled: bool,
}

impl Fresh {
    /// The message key's hash (`None` for a record passed without key).
    pub fn key(&self) -> Option<KeyHash> {
        self.claim.map(|(key, _)| key)
    }

    /// Whether an earlier handler claimed it and crashed (its lease expired): a side effect
    /// outside the store may already have happened once.
    pub fn reclaimed(&self) -> bool {
        self.reclaimed
    }

    /// Marks the message handled: its mark, the partition's committable offset (the lowest
    /// offset not yet settled, so never past a record still in flight) and `state`'s writes,
    /// in one atomic batch.
    ///
    /// `state` runs now, on the caller's thread (it may read the store, or drop other
    /// handles); its writes are collected and the batch is written on the consumer's store
    /// thread, so a write that RocksDB stalls never stalls the runtime. The write goes on
    /// whether or not the returned [`Settling`] is awaited; awaiting it gives its result.
    /// The state written is visible to [`DedupStore::state`] once it has resolved: a handler
    /// that reads a value, then writes it back changed, awaits the settle before the next
    /// read.
    ///
    /// # Errors
    /// The store's error: nothing was written, and the record will be handed out again.
    /// `Store(DedupError::LeaseLost)` when this handler's lease ran out and another handler
    /// claimed the key since: `state` was not applied (the record counts once, through the
    /// current holder).
    pub fn done(self, state: impl FnOnce(&mut StateBatch<'_>)) -> Settling {
        // If `state` panics, the handle is dropped unsettled and its record is given back.
        let state = StateWrites::collect(state);
        let shared = Arc::clone(&self.shared);
        Settling::start(&shared, move || {
            let mut handles = vec![self];
            (settle(&mut handles, state), handles)
        })
    }

    /// As [`Fresh::done`], with the batch written on this thread before it returns: for
    /// synchronous code outside the runtime's worker threads (a thread of its own, or
    /// `spawn_blocking`).
    ///
    /// # Errors
    /// As [`Fresh::done`].
    pub fn done_blocking(
        self,
        state: impl FnOnce(&mut StateBatch<'_>),
    ) -> Result<(), MiddlewareError> {
        let state = StateWrites::collect(state);
        settle(&mut vec![self], state)
    }

    /// Marks several handles done with one atomic write: their marks, each partition's
    /// committable offset and `state`'s writes (all of them, or nothing). The handles must
    /// come from the same [`DedupConsumer`]; an empty list writes nothing. `state` runs now
    /// and the batch is written on the store thread, as with [`Fresh::done`].
    ///
    /// # Errors
    /// As [`Fresh::done`]: on any error nothing was written and every record is handed out
    /// again (`LeaseLost` when one of the claims was taken over). `State` when the handles
    /// come from different consumers (then they are handed out again too).
    pub fn done_all(handles: Vec<Fresh>, state: impl FnOnce(&mut StateBatch<'_>)) -> Settling {
        let Some(first) = handles.first() else {
            return Settling::ready(Ok(()));
        };
        let shared = Arc::clone(&first.shared);
        let state = StateWrites::collect(state);
        Settling::start(&shared, move || {
            let mut handles = handles;
            (settle(&mut handles, state), handles)
        })
    }

    /// As [`Fresh::done_all`], with the batch written on this thread before it returns (see
    /// [`Fresh::done_blocking`]).
    ///
    /// # Errors
    /// As [`Fresh::done_all`].
    pub fn done_all_blocking(
        handles: Vec<Fresh>,
        state: impl FnOnce(&mut StateBatch<'_>),
    ) -> Result<(), MiddlewareError> {
        let state = StateWrites::collect(state);
        let mut handles = handles;
        settle(&mut handles, state)
    }

    /// The handler failed: the claim is released and the record is handed out again (before
    /// anything after it is committed). Done on the store thread, as [`Fresh::done`]'s write
    /// (the store's lock may be held by a write under way).
    ///
    /// # Errors
    /// The store's error releasing the claim (the record still comes again, once the claim's
    /// lease has ended).
    pub fn failed(mut self) -> Settling {
        self.settled = true;
        let shared = Arc::clone(&self.shared);
        Settling::start(&shared, move || {
            let given = self
                .shared
                .give_back(&self.record, self.claim, self.epoch)
                .map_err(Into::into);
            (given, vec![self])
        })
    }
}

/// Writes the handles' marks, their partitions' committable offsets and `state` in one batch,
/// then counts them settled; on an error gives them back. Blocking: the store writes.
/// The handles stay the caller's (settled or given back), so their records are freed where
/// they were made: the caller's thread, once it looks at the [`Settling`] (or this thread,
/// if the `Settling` was dropped before the answer came).
fn settle(handles: &mut Vec<Fresh>, state: StateWrites) -> Result<(), MiddlewareError> {
    let Some(first) = handles.first() else {
        return Ok(());
    };
    let shared = Arc::clone(&first.shared);
    if handles.iter().any(|h| !Arc::ptr_eq(&h.shared, &shared)) {
        // Dropped unsettled: each goes back to its own consumer.
        handles.clear();
        return Err(ConsumerError::State(
            "done_all: the handles come from different dedup consumers".into(),
        )
        .into());
    }
    // One settle at a time, from the offsets it reads to the settlement it records: racing
    // settles never write a partition's offsets out of order. The middleware's lock is taken
    // only around the bookkeeping, never around the store's write, so `next` and the other
    // handles' bookkeeping go on while RocksDB writes.
    let order = shared
        .settle_order
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    // Per partition and ownership, the offsets settled here (a handful of partitions: a
    // list, and no copy of a partition's name per handle).
    let mut settling: Vec<((TopicPartition, Epoch), Vec<i64>)> = Vec::new();
    for h in handles.iter() {
        let at = settling.iter().position(|((tp, epoch), _)| {
            *epoch == h.epoch && tp.1 == h.record.partition && *tp.0 == *h.record.topic
        });
        let at = at.unwrap_or_else(|| {
            settling.push(((h.record.topic_partition(), h.epoch), Vec::new()));
            settling.len() - 1
        });
        settling[at].1.push(h.record.offset);
    }
    for (_, offsets) in &mut settling {
        offsets.sort_unstable();
    }
    // Computed before the write and recorded after it: meanwhile other records may be read,
    // handed out, given back or dropped as duplicates, which can only keep a partition's
    // committable offset where it is (a record outstanding now holds it), never move it
    // below one outstanding now. Only a settle moves it up, and settles wait for this one.
    let offsets: Vec<(TopicPartition, i64)> = {
        let inner = shared.lock();
        settling
            .iter()
            .filter_map(|((tp, epoch), set)| {
                inner
                    .settlements
                    .committable_after_all(tp, *epoch, set)
                    .map(|o| (tp.clone(), o))
            })
            .collect()
    };
    let offset_refs: Vec<(&str, &str, i32, i64)> = offsets
        .iter()
        .map(|((topic, partition), o)| (shared.group.as_str(), topic.as_str(), *partition, *o))
        .collect();
    let claims: Vec<(KeyHash, ClaimToken)> = handles.iter().filter_map(|h| h.claim).collect();
    let written = shared.store.mark_done_with(&claims, &offset_refs, state);
    for h in handles.iter_mut() {
        h.settled = true;
    }
    if let Err(e) = written {
        drop(order);
        for h in handles.iter() {
            if let Err(release) = shared.give_back(&h.record, h.claim, h.epoch) {
                tracing::warn!(error = %release, "claim not released; the record comes again once its lease ends");
            }
        }
        return Err(e.into());
    }
    let mut inner = shared.lock();
    let mut last = None;
    for h in handles.iter() {
        let tp = partition_of(&mut last, &h.record);
        let released = inner.settlements.settle(tp, h.epoch, h.record.offset);
        if shared.changelog {
            inner.outbox.push_back(Settled {
                partition: tp.clone(),
                record_offset: h.record.offset,
                release: released.map(|offset| (h.epoch, offset)),
                key: h.key(),
            });
        }
    }
    drop(inner);
    drop(order);
    shared
        .settles
        .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    shared.wake.notify_one();
    shared.settled.notify_waiters();
    Ok(())
}

/// A settle under way ([`Fresh::done`], [`Fresh::done_all`], [`Fresh::failed`]): its store
/// write runs on the consumer's store thread, and goes on whether or not this is awaited.
/// Awaiting it gives the settle's result.
#[must_use = "the settle goes on without it, but only awaiting it tells whether it was written"]
#[derive(Debug)]
pub struct Settling(SettlingState);

#[derive(Debug)]
enum SettlingState {
    Ready(Option<Result<(), MiddlewareError>>),
    /// Its result was given.
    Done,
    Running {
        /// The result, and the handles (settled), to be dropped here.
        result: tokio::sync::oneshot::Receiver<(Result<(), MiddlewareError>, Vec<Fresh>)>,
        /// Whether the first poll spun for the answer (see `HANDOFF_SPIN`).
        spun: bool,
        shared: Arc<Shared>,
    },
}

impl Settling {
    fn ready(result: Result<(), MiddlewareError>) -> Self {
        Self(SettlingState::Ready(Some(result)))
    }

    /// Runs `work` on the store thread. It is counted in `Shared::settling` until it has run
    /// (`close` waits for it).
    fn start(
        shared: &Arc<Shared>,
        work: impl FnOnce() -> (Result<(), MiddlewareError>, Vec<Fresh>) + Send + 'static,
    ) -> Self {
        let running = SettlingGuard::new(shared);
        let result = shared.store_thread.run(move || {
            let _running = running;
            work()
        });
        Self(SettlingState::Running {
            result,
            spun: false,
            shared: Arc::clone(shared),
        })
    }
}

impl std::future::Future for Settling {
    type Output = Result<(), MiddlewareError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let polled = match &mut self.0 {
            SettlingState::Ready(result) => result.take(),
            SettlingState::Done => None,
            SettlingState::Running {
                result,
                spun,
                shared,
            } => {
                let answer = if std::mem::replace(spun, true) {
                    Answer::Later
                } else {
                    answer_soon(result, &shared.store_thread)
                };
                let answer = match answer {
                    Answer::Value(answer) => Some(answer),
                    Answer::Lost => None,
                    Answer::Later => match result.poll_unpin(cx) {
                        std::task::Poll::Pending => return std::task::Poll::Pending,
                        std::task::Poll::Ready(answer) => answer.ok(),
                    },
                };
                match answer {
                    // The handles' records are freed on this thread, which made them.
                    Some((result, _handles)) => Some(result),
                    // Its handles were dropped with it, unsettled: their records come again.
                    None => Some(Err(DedupError::Interrupted {
                        path: shared.store.path().to_path_buf(),
                        what: "settling handles",
                        reason: "it panicked".to_string(),
                    }
                    .into())),
                }
            }
        };
        self.0 = SettlingState::Done;
        std::task::Poll::Ready(polled.unwrap_or_else(|| {
            Err(ConsumerError::State("a settle was awaited again after its result".into()).into())
        }))
    }
}

/// Counts a settle under way in `Shared::settling` for as long as it lives.
#[derive(Debug)]
struct SettlingGuard(Arc<Shared>);

impl SettlingGuard {
    fn new(shared: &Arc<Shared>) -> Self {
        shared
            .settling
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self(Arc::clone(shared))
    }
}

impl Drop for SettlingGuard {
    fn drop(&mut self) {
        self.0
            .settling
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.0.settled.notify_waiters();
    }
}

/// `record`'s partition: the one in `last` when it is the same, else a copy made now (and
/// kept in `last`), so handles of one partition in a row cost one copy of its name.
fn partition_of<'a>(
    last: &'a mut Option<TopicPartition>,
    record: &ConsumerRecord,
) -> &'a TopicPartition {
    let same = last
        .as_ref()
        .is_some_and(|tp| tp.1 == record.partition && *tp.0 == *record.topic);
    if !same {
        *last = Some(record.topic_partition());
    }
    last.get_or_insert_with(|| record.topic_partition())
}

impl Drop for Fresh {
    fn drop(&mut self) {
        if !self.settled {
            tracing::warn!(topic = %self.record.topic, partition = self.record.partition, offset = self.record.offset, "a claimed record was dropped unsettled; handing it out again");
            // On the store thread, as `failed`: the store's lock may be held by a write.
            let back = Fresh {
                record: self.record.clone(),
                claim: self.claim,
                reclaimed: self.reclaimed,
                epoch: self.epoch,
                shared: Arc::clone(&self.shared),
                settled: false,
            };
            self.settled = true;
            drop(back.failed());
        }
    }
}

/// How long settled marks wait to go to the changelog together (one store sync for them all).
const MARKS_LINGER: Duration = Duration::from_millis(5);
/// How many settled marks go to the changelog at once at the most, linger or not.
const MARKS_GROUP: usize = 1024;

/// A settled record on its way to the changelog.
#[derive(Debug)]
struct Settled {
    partition: TopicPartition,
    record_offset: i64,
    /// The partition's committable offset once this mark is in the changelog, with the
    /// ownership it was settled in (`None`: the record was settled after its partition left;
    /// its mark still goes out).
    release: Option<(Epoch, i64)>,
    key: Option<KeyHash>,
}

/// A record to hand out again: failed, dropped unsettled, or its `done` failed.
#[derive(Debug)]
struct Again {
    record: ConsumerRecord,
    key: Option<KeyHash>,
    epoch: Epoch,
}

/// What the middleware, its rebalance listener and every [`Fresh`] share.
#[derive(Debug)]
struct Shared {
    store: Arc<DedupStore>,
    group: String,
    changelog: bool,
    state: Mutex<SharedState>,
    /// Wakes `next` when a record comes back or a claim is settled.
    wake: Notify,
    /// Wakes revocations waiting for handles to settle.
    settled: Notify,
    /// Counts settles and claims given back: a record waiting aside for a claim is claimed
    /// again once this moves.
    settles: std::sync::atomic::AtomicU64,
    /// Set by `close`: a revocation waits for nothing more.
    closing: std::sync::atomic::AtomicBool,
    /// `MiddlewareConfig::revocation_wait`.
    revocation_wait: Duration,
    /// Held by a settle from reading its partitions' committable offsets to recording them
    /// settled (see `settle`).
    settle_order: Mutex<()>,
    /// Settles and give-backs under way on the store thread ([`Settling`]).
    settling: std::sync::atomic::AtomicUsize,
    /// Runs claims, settles and give-backs.
    store_thread: StoreThread,
}

/// A call for the store thread, with when it was queued.
type StoreCall = (Box<dyn FnOnce() + Send>, std::time::Instant);

/// How long the store thread, and a caller waiting for it, spin before they sleep. A thread
/// woken from sleep took about 40 µs on our 2-core machines, longer than most claims and
/// settles: one record at a time (`next`, then `done`), sleeping on both sides ran at 9 k
/// messages/s, spinning this long at 87 k (`changelog_bench --batch 1`). Bounded, so a store
/// call that takes long (a stalled write) is waited for asleep; the store thread spins only
/// while calls come this close together, and a caller only while at most one call is ahead
/// of its own.
const HANDOFF_SPIN: Duration = Duration::from_micros(50);

/// What a store call's answer looks like after a short wait for it.
enum Answer<T> {
    Value(T),
    /// The call panicked (its answer was dropped). The receiver is spent: not to be polled.
    Lost,
    /// Not yet: await the receiver.
    Later,
}

/// Takes `answer` if it comes within [`HANDOFF_SPIN`], spinning, while at most one other call
/// is ahead of it on the store thread (behind many, it would spin for theirs too: a caller
/// awaiting a thousand settles at once).
fn answer_soon<T>(
    answer: &mut tokio::sync::oneshot::Receiver<T>,
    thread: &StoreThread,
) -> Answer<T> {
    use tokio::sync::oneshot::error::TryRecvError;
    let started = std::time::Instant::now();
    loop {
        match answer.try_recv() {
            Ok(value) => return Answer::Value(value),
            Err(TryRecvError::Closed) => return Answer::Lost,
            Err(TryRecvError::Empty)
                if started.elapsed() < HANDOFF_SPIN
                    && thread.queued.load(std::sync::atomic::Ordering::Acquire) <= 2 =>
            {
                std::hint::spin_loop();
            }
            Err(TryRecvError::Empty) => return Answer::Later,
        }
    }
}

/// The thread that runs the middleware's store calls (claims, settles, releases), in the
/// order they come, off the runtime's worker threads: a write that RocksDB stalls stalls this
/// thread only. One thread rather than the runtime's blocking pool: the store's in-memory
/// index stays in one core's caches, and the calls wake one known thread. Syncs (an fsync
/// each) run on the blocking pool, so claims do not queue behind them. The thread ends once
/// the middleware and every handle are gone.
#[derive(Debug)]
struct StoreThread {
    calls: std::sync::mpsc::Sender<StoreCall>,
    /// Calls queued or running.
    queued: Arc<std::sync::atomic::AtomicUsize>,
}

impl StoreThread {
    fn start() -> std::io::Result<Self> {
        let (calls, queue) = std::sync::mpsc::channel::<StoreCall>();
        let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let running = Arc::clone(&queued);
        std::thread::Builder::new()
            .name("semel-dedup-store".into())
            .spawn(move || {
                let mut spin = false;
                let mut last_done = std::time::Instant::now();
                loop {
                    let next = if spin {
                        let started = std::time::Instant::now();
                        loop {
                            match queue.try_recv() {
                                Ok(call) => break Ok(call),
                                Err(std::sync::mpsc::TryRecvError::Empty)
                                    if started.elapsed() < HANDOFF_SPIN =>
                                {
                                    std::hint::spin_loop();
                                }
                                Err(std::sync::mpsc::TryRecvError::Empty) => break queue.recv(),
                                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                                    break Err(std::sync::mpsc::RecvError);
                                }
                            }
                        }
                    } else {
                        queue.recv()
                    };
                    let Ok((call, queued)) = next else {
                        break;
                    };
                    // Spin for the next call only while calls come that close together.
                    spin = queued.saturating_duration_since(last_done) < HANDOFF_SPIN;
                    // A call that panics drops its answer: its caller gets `Interrupted`
                    // (and its handles, dropped unsettled, come again); the thread goes on.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(call));
                    running.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                    last_done = std::time::Instant::now();
                }
            })?;
        Ok(Self { calls, queued })
    }

    /// Queues `call`; the receiver gets its result (or is closed if it panicked).
    fn run<T: Send + 'static>(
        &self,
        call: impl FnOnce() -> T + Send + 'static,
    ) -> tokio::sync::oneshot::Receiver<T> {
        let (answer, result) = tokio::sync::oneshot::channel();
        // The thread lives as long as this sender: the send cannot fail.
        self.queued
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let _ = self.calls.send((
            Box::new(move || {
                let _ = answer.send(call());
            }),
            std::time::Instant::now(),
        ));
        result
    }
}

#[derive(Debug, Default)]
struct SharedState {
    settlements: Settlements,
    /// Records to hand out again, oldest first (still outstanding in `settlements`).
    again: VecDeque<Again>,
    /// Settled records for the changelog, in settling order.
    outbox: VecDeque<Settled>,
    /// With a changelog: per partition, the committable offset whose marks the changelog
    /// has acknowledged (what may be committed).
    acked: BTreeMap<TopicPartition, i64>,
    /// Partitions waiting for a changelog replay.
    to_restore: BTreeSet<TopicPartition>,
    /// How far each partition was handed out, per the store: as found when this process
    /// first claimed from it, and as recorded since.
    handed: BTreeMap<TopicPartition, Handed>,
}

/// A partition's handed-out offset (see `DedupStore::claim_many_handing_out`).
#[derive(Debug, Clone, Copy)]
struct Handed {
    /// Recorded by an earlier run: a record below it that comes back fresh may have been
    /// handled before a crash (`Fresh::reclaimed`).
    before: i64,
    /// Recorded so far.
    to: i64,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, SharedState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes every store write so far durable, on a blocking thread: an fsync takes
    /// milliseconds (much longer on a busy disk) and would stall the worker's other tasks.
    async fn sync_store(&self) -> Result<(), DedupError> {
        off_runtime(&self.store, "syncing the write-ahead log", |store| {
            store.sync()
        })
        .await
    }

    /// Releases the claim (if it is still this handle's) and queues the record to be handed
    /// out again, if its partition is still owned by the same assignment (otherwise the next
    /// owner reads it).
    fn give_back(
        &self,
        record: &ConsumerRecord,
        claim: Option<(KeyHash, ClaimToken)>,
        epoch: Epoch,
    ) -> Result<(), DedupError> {
        let released = claim.map_or(Ok(()), |(key, token)| self.store.release(key, token));
        let key = claim.map(|(key, _)| key);
        let tp = record.topic_partition();
        let mut state = self.lock();
        state.settlements.returned(&tp, epoch, record.offset);
        if state.settlements.epoch(&tp) == Some(epoch) {
            state.again.push_back(Again {
                record: record.clone(),
                key,
                epoch,
            });
        }
        drop(state);
        self.settles
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.wake.notify_one();
        self.settled.notify_waiters();
        released
    }

    /// Offsets the changelog acknowledged, for partitions still owned by the same ownership
    /// that settled them (an offset from before a partition left and came back would rewind
    /// the group).
    fn note_acked(&self, acked: BTreeMap<TopicPartition, (Epoch, i64)>) {
        if acked.is_empty() {
            return;
        }
        let mut state = self.lock();
        for (tp, (epoch, offset)) in acked {
            if state.settlements.settles_in(&tp, epoch) {
                state.acked.insert(tp, offset);
            }
        }
        drop(state);
        self.settled.notify_waiters();
    }

    /// Waits until the handles out in each revoked partition's ownership are settled (or
    /// given back), and, with a changelog, until it acknowledged their marks; then syncs the
    /// store and returns the offsets to commit (what the consumer's revocation commits, and
    /// what it makes the next owner wait for). `close` cuts the wait short; the consumer
    /// bounds it too.
    async fn settle_revoked(
        self: Arc<Self>,
        revoking: Vec<(TopicPartition, Epoch)>,
    ) -> BTreeMap<TopicPartition, i64> {
        let started = Instant::now();
        loop {
            // Registered before the check: a settle or acknowledgement between the two still
            // wakes the wait below. No polling: every settle, give-back and acknowledgement
            // notifies.
            let notified = self.settled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let settled = {
                let state = self.lock();
                revoking
                    .iter()
                    .all(|(tp, epoch)| match state.settlements.revoking(tp, *epoch) {
                        Revoking::Waiting => false,
                        Revoking::Gone | Revoking::Settled(None) => true,
                        Revoking::Settled(Some(committable)) => {
                            !self.changelog || state.acked.get(tp) == Some(&committable)
                        }
                    })
            };
            if settled || self.closing.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            let left = self.revocation_wait.saturating_sub(started.elapsed());
            if left.is_zero() {
                tracing::warn!(partitions = ?revoking, waited = ?self.revocation_wait, "handles still out on revoked partitions; the rebalance goes on, and their records are handled again by the next owner");
                break;
            }
            let _ = tokio::time::timeout(left, notified).await;
        }
        let mut offsets = BTreeMap::new();
        {
            let mut state = self.lock();
            for (tp, epoch) in &revoking {
                let committable = state.settlements.finish_revoke(tp, *epoch);
                let offset = if self.changelog {
                    // Only what the changelog acknowledged: the next owner may be elsewhere.
                    state.acked.get(tp).copied()
                } else {
                    committable
                };
                if state.settlements.epoch(tp).is_none() {
                    state.acked.remove(tp);
                }
                if let Some(offset) = offset {
                    offsets.insert(tp.clone(), offset);
                }
            }
        }
        tracing::debug!(?offsets, waited = ?started.elapsed(), "revoked partitions settled");
        if offsets.is_empty() {
            return offsets;
        }
        // The marks behind these offsets must survive a power cut before the offsets leave.
        if let Err(e) = self.sync_store().await {
            tracing::warn!(error = %e, "store not synced; not committing on revocation");
            return BTreeMap::new();
        }
        offsets
    }

    /// Waits until no settle or give-back runs on the store thread ([`Settling`]), for
    /// `revocation_wait` at the most.
    async fn settles_under_way(&self) {
        let started = Instant::now();
        loop {
            let notified = self.settled.notified();
            tokio::pin!(notified);
            // Registered before the check: a settle that ends in between still wakes it.
            notified.as_mut().enable();
            let running = self.settling.load(std::sync::atomic::Ordering::Acquire);
            if running == 0 {
                return;
            }
            let left = self.revocation_wait.saturating_sub(started.elapsed());
            if left.is_zero() {
                tracing::warn!(running, waited = ?self.revocation_wait, "settles still under way; what they settle is committed by the next owner");
                return;
            }
            let _ = tokio::time::timeout(left, notified).await;
        }
    }

    /// Everything about `tp` is forgotten (revoked, lost, or assigned anew).
    fn forget(state: &mut SharedState, tp: &TopicPartition) {
        state.settlements.revoke(tp);
        state.acked.remove(tp);
        state.to_restore.remove(tp);
        state.again.retain(|a| a.record.topic_partition() != *tp);
    }
}

/// The rebalance side: new partitions start at the store's offset when it is ahead of the
/// group's commit; revoked ones commit what is settled (synced first).
#[derive(Debug)]
struct StoreOffsets(Arc<Shared>);

impl RebalanceListener for StoreOffsets {
    fn on_partitions_assigned(
        &mut self,
        ctx: &mut RebalanceContext<'_>,
        partitions: &BTreeSet<TopicPartition>,
    ) {
        let shared = &self.0;
        {
            let mut state = shared.lock();
            for tp in partitions {
                Shared::forget(&mut state, tp);
                state.settlements.assign(tp);
                if shared.changelog {
                    state.to_restore.insert(tp.clone());
                }
            }
        }
        // A revocation still waiting for one of these partitions has nothing left to wait for.
        shared.settled.notify_waiters();
        if shared.changelog {
            // From the group's offset, not the store's: records settled here whose marks
            // the changelog never acknowledged (a crash in between) lie between the two, and
            // reading them again (as duplicates) is what sends their marks.
            return;
        }
        for tp in partitions {
            match shared.store.offset(&shared.group, &tp.0, tp.1) {
                Ok(Some(offset)) if Some(offset) > ctx.committed(tp) => {
                    tracing::info!(?tp, store = offset, committed = ?ctx.committed(tp), "starting at the dedup store's offset");
                    ctx.seek(tp.clone(), offset);
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, ?tp, "cannot read the store's offset"),
            }
        }
    }

    fn on_partitions_revoked(
        &mut self,
        ctx: &mut RebalanceContext<'_>,
        partitions: &BTreeSet<TopicPartition>,
    ) {
        let shared = Arc::clone(&self.0);
        let mut revoking = Vec::new();
        {
            let mut state = shared.lock();
            for tp in partitions {
                if let Some(epoch) = state.settlements.start_revoke(tp) {
                    revoking.push((tp.clone(), epoch));
                }
                // Nothing of it is handed out any more; the acknowledged offset stays until
                // the revocation is over.
                state.to_restore.remove(tp);
                state.again.retain(|a| a.record.topic_partition() != *tp);
            }
        }
        if revoking.is_empty() {
            return;
        }
        // Handlers still running on these partitions settle first, and (with a changelog)
        // their marks reach it: the next owner, perhaps on another host, starts after them.
        ctx.commit_when(shared.settle_revoked(revoking));
    }

    fn on_partitions_lost(
        &mut self,
        _ctx: &mut RebalanceContext<'_>,
        partitions: &BTreeSet<TopicPartition>,
    ) {
        let mut state = self.0.lock();
        for tp in partitions {
            Shared::forget(&mut state, tp);
        }
        drop(state);
        // A revocation waiting for these partitions' handles has nothing left to wait for.
        self.0.settled.notify_waiters();
    }
}

/// Lets a dropped [`DedupConsumer`] free its store at once: a background sync holds the
/// store only while it holds this gate's lock, and one that has not started when the consumer
/// is dropped does not start. Dropping waits at most for a sync under way (one fsync).
#[derive(Debug, Default)]
struct SyncGate(Arc<Mutex<bool>>);

impl Drop for SyncGate {
    fn drop(&mut self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
    }
}

/// Where the record being looked at came from.
#[derive(Debug)]
struct Candidate {
    record: ConsumerRecord,
    key: KeyHash,
    /// The ownership it was read in (it is outstanding there from the moment it is read); a
    /// candidate of an earlier ownership is dropped unseen: its partition's next owner reads
    /// it.
    epoch: Epoch,
}

/// A record whose key another handler holds (typically a resent copy of a record still in
/// flight here). It waits aside while the records after it are handed out: the caller may
/// hold the handle it waits for, and settle it only after taking more records (`done_many`).
/// It stays outstanding meanwhile, so nothing past it is committed. It is claimed again once a
/// handler of this process settles, or when the claim's lease ends.
#[derive(Debug)]
struct Parked {
    candidate: Candidate,
    /// `Shared::settles` read before its claim was refused: a settle since may have ended it.
    settles: u64,
    /// When the claim's lease ends (for a claim of another process, the only way it ends).
    until: Instant,
}

impl Parked {
    /// Due to be claimed at the next chance (kept after a store error).
    fn due(candidate: Candidate) -> Self {
        Self {
            candidate,
            settles: u64::MAX,
            until: Instant::now(),
        }
    }
}

/// How many records may wait aside at most; past that `next` reads no further until one of
/// them is decided (memory stays bounded when one key comes many times while it is held).
const PARKED_MAX: usize = 1024;

/// Offsets to commit, each with the ownership of its partition they were read in.
type OwnedOffsets = BTreeMap<TopicPartition, (Epoch, i64)>;

/// How a commit sent in the background ended.
type CommitResult = tokio::sync::oneshot::Receiver<Result<(), ConsumerError>>;

/// Claims the candidates' keys, held in memory, and records in the same store write how
/// far each partition is handed out (one small write per call, not a claim record per
/// key). Says for each whether it may have been handled before: a claim taken over, or a
/// fresh record below how far an earlier run (that crashed) handed its partition out.
///
/// With `Waits::Refused` it runs only if nothing in it would wait (see
/// [`DedupStore::try_claim_many_handing_out`]); `None` then means: claim on the store thread.
fn claim(
    shared: &Shared,
    candidates: &[Candidate],
    waits: Waits,
) -> Result<Option<Vec<(Claim, bool)>>, DedupError> {
    let store = &shared.store;
    let group = shared.group.as_str();
    // The partitions of this call (a handful): what the store says, and how far this
    // call hands each out.
    let mut parts: Vec<((&str, i32), Option<Handed>, i64)> = Vec::new();
    {
        let state = shared.lock();
        for c in candidates {
            let key = (&*c.record.topic, c.record.partition);
            let slot = match parts.iter().position(|(k, _, _)| *k == key) {
                Some(slot) => slot,
                None => {
                    let handed = state.handed.get(&c.record.topic_partition()).copied();
                    parts.push((key, handed, -1));
                    parts.len() - 1
                }
            };
            parts[slot].2 = parts[slot].2.max(c.record.offset + 1);
        }
    }
    // A partition seen for the first time: how far an earlier run handed it out, read with
    // no lock held (a read may wait for the disk).
    for (key, handed, _) in &mut parts {
        if handed.is_none() {
            if waits == Waits::Refused {
                return Ok(None);
            }
            let before = store.handed_out(group, key.0, key.1)?.unwrap_or(-1);
            let mut state = shared.lock();
            let entry = state
                .handed
                .entry((key.0.to_string(), key.1))
                .or_insert(Handed { before, to: before });
            *handed = Some(*entry);
        }
    }
    let parts: Vec<((&str, i32), Handed, i64)> = parts
        .into_iter()
        .filter_map(|(key, handed, to)| handed.map(|handed| (key, handed, to.max(handed.to))))
        .collect();
    let handed_out: Vec<(&str, &str, i32, i64)> = parts
        .iter()
        .filter(|(_, handed, to)| *to > handed.to)
        .map(|((topic, partition), _, to)| (group, *topic, *partition, *to))
        .collect();
    let keys: Vec<KeyHash> = candidates.iter().map(|c| c.key).collect();
    let claims = match waits {
        Waits::Allowed => store.claim_many_handing_out(&keys, &handed_out)?,
        Waits::Refused => match store.try_claim_many_handing_out(&keys, &handed_out)? {
            Some(claims) => claims,
            None => return Ok(None),
        },
    };
    if !handed_out.is_empty() {
        let mut state = shared.lock();
        for &(_, topic, partition, to) in &handed_out {
            if let Some(handed) = state.handed.get_mut(&(topic.to_string(), partition)) {
                handed.to = handed.to.max(to);
            }
        }
    }
    Ok(Some(
        candidates
            .iter()
            .zip(claims)
            .map(|(c, claim)| {
                let key = (&*c.record.topic, c.record.partition);
                let before = parts
                    .iter()
                    .find(|(k, _, _)| *k == key)
                    .map_or(-1, |(_, handed, _)| handed.before);
                let reclaimed = match claim {
                    Claim::Reclaimed(_) => true,
                    Claim::Fresh(_) => c.record.offset < before,
                    Claim::Duplicate | Claim::InProgress { .. } => false,
                };
                (claim, reclaimed)
            })
            .collect(),
    ))
}

/// The fewest records with a key a claim is made for where `next` is called (when nothing in it would
/// wait) rather than on the store thread. There, each claim writes beside the store
/// thread's settles (RocksDB's write queue), a cost paid per claim; it pays off for batches.
/// Measured with `changelog_bench` (same hour): `--batch 1`, 300 k records: 52–64 k
/// messages/s with every claim made there, 48–80 k with this bound, 53–71 k before claims were
/// made there (no gain at one record per claim); `--batch 1000`: 0.70–1.07 M, against
/// 0.54–0.78 M before.
const CLAIM_HERE_MIN: usize = 8;

/// What a claim on the store thread gives back: its candidates, and for each its claim.
type ClaimResult = (Vec<Candidate>, Result<Vec<(Claim, bool)>, DedupError>);

/// A claim under way on the store thread (see [`DedupConsumer::next_batch`]). Dropped
/// unanswered (the consumer dropped, or `close` cancelled, while it ran), its claims are
/// released once it has run, so its keys are not held for a lease by nobody.
#[derive(Debug)]
struct Claiming {
    /// `None` once its answer is taken.
    task: Option<tokio::sync::oneshot::Receiver<ClaimResult>>,
    /// Records passed without a key, read with the candidates: handed out with them.
    out: Vec<Fresh>,
    /// `Shared::settles` before the claim.
    settles: u64,
    /// Per partition, the lowest offset of the candidates (for `position`).
    waiting: Vec<(TopicPartition, i64)>,
    shared: Arc<Shared>,
}

impl Claiming {
    /// Its answer was taken: what is left to hand out with it, and `Shared::settles` before.
    fn answered(mut self) -> (Vec<Fresh>, u64) {
        self.task = None;
        (std::mem::take(&mut self.out), self.settles)
    }
}

impl Drop for Claiming {
    fn drop(&mut self) {
        let Some(mut task) = self.task.take() else {
            return;
        };
        let store = Arc::clone(&self.shared.store);
        // Queued behind the claim on the same thread: its answer is in by the time this runs.
        drop(self.shared.store_thread.run(move || {
            if let Ok((candidates, Ok(claims))) = task.try_recv() {
                for (candidate, (claim, _)) in candidates.iter().zip(claims) {
                    if let Claim::Fresh(token) | Claim::Reclaimed(token) = claim
                        && let Err(e) = store.release_unhandled(candidate.key, token)
                    {
                        tracing::warn!(error = %e, "claim not released; its record comes again once its lease ends");
                    }
                }
            }
        }));
    }
}

/// A group consumer that yields only messages not handled before.
#[derive(Debug)]
pub struct DedupConsumer {
    consumer: Consumer,
    shared: Arc<Shared>,
    config: MiddlewareConfig,
    /// Records whose keys another handler holds, waiting aside for those claims to end
    /// (oldest first); see [`Parked`].
    pending: VecDeque<Parked>,
    /// A record read while a replay was due, kept until the replay is done.
    held: Option<ConsumerRecord>,
    /// What was last committed, so unchanged offsets are not committed again.
    committed: BTreeMap<TopicPartition, i64>,
    /// Commits sent in the background and not yet seen to finish, with their offsets: a
    /// failed one is sent again at the next chance.
    commits: Vec<(CommitResult, BTreeMap<TopicPartition, i64>)>,
    last_commit: Instant,
    /// When settled marks last went to the changelog.
    last_marks_sent: Instant,
    passed: u64,
    rejected: u64,
    changelog: Option<Changelog>,
    /// Offsets the changelog released and not yet noted in the shared state.
    acked_unnoted: BTreeMap<TopicPartition, super::changelog::Release>,
    /// A sync of the store running on a blocking thread (see `start_sync`).
    syncing: Option<tokio::task::JoinHandle<Result<(), DedupError>>>,
    /// Closed when this consumer is dropped: see [`SyncGate`].
    sync_gate: SyncGate,
    /// A commit due, waiting for a sync to cover the store writes it depends on: (writes it
    /// needs durable, offsets).
    commit_waiting: Option<(u64, OwnedOffsets)>,
    /// Marks due for the changelog, waiting for a sync likewise: (how many of the outbox's
    /// first entries, writes they need durable).
    marks_waiting: Option<(usize, u64)>,
    /// A claim under way on the store thread, with its records.
    claiming: Option<Claiming>,
    /// Claimed records not yet returned (a claim found more than the call asked for).
    ready: VecDeque<Fresh>,
}

impl DedupConsumer {
    /// Wraps `consumer` (which must have `group.id`; subscribe before or after). Replaces the
    /// consumer's rebalance listener with the one that seeks to the store's offsets.
    ///
    /// # Errors
    /// `State` without `group.id`, or with `enable.auto.commit` (it would commit offsets of
    /// records not handled yet; the middleware commits what is settled).
    pub fn new(
        mut consumer: Consumer,
        store: Arc<DedupStore>,
        config: MiddlewareConfig,
    ) -> Result<Self, MiddlewareError> {
        let group = consumer.group_id().ok_or_else(|| {
            ConsumerError::State("the dedup middleware scopes keys by group.id; set it".into())
        })?;
        if consumer.config().enable_auto_commit {
            return Err(ConsumerError::State(
                "enable.auto.commit would commit offsets of records not handled yet: turn it off; the dedup middleware commits what is settled"
                    .into(),
            )
            .into());
        }
        let shared = Arc::new(Shared {
            store,
            group,
            changelog: config.changelog.is_some(),
            state: Mutex::new(SharedState::default()),
            wake: Notify::new(),
            settled: Notify::new(),
            settles: std::sync::atomic::AtomicU64::new(0),
            closing: std::sync::atomic::AtomicBool::new(false),
            revocation_wait: config.revocation_wait,
            settle_order: Mutex::new(()),
            settling: std::sync::atomic::AtomicUsize::new(0),
            store_thread: StoreThread::start().map_err(|e| {
                ConsumerError::State(format!("cannot start the dedup store thread: {e}"))
            })?,
        });
        consumer.set_rebalance_listener(StoreOffsets(Arc::clone(&shared)));
        Ok(Self {
            consumer,
            shared,
            config,
            pending: VecDeque::new(),
            held: None,
            committed: BTreeMap::new(),
            commits: Vec::new(),
            last_commit: Instant::now(),
            last_marks_sent: Instant::now(),
            passed: 0,
            rejected: 0,
            changelog: None,
            acked_unnoted: BTreeMap::new(),
            syncing: None,
            sync_gate: SyncGate::default(),
            commit_waiting: None,
            marks_waiting: None,
            claiming: None,
            ready: VecDeque::new(),
        })
    }

    /// The wrapped consumer (subscribe, pause, ...).
    pub fn consumer(&mut self) -> &mut Consumer {
        &mut self.consumer
    }

    /// The store.
    pub fn store(&self) -> &Arc<DedupStore> {
        &self.shared.store
    }

    /// Records handed out and not settled yet.
    pub fn in_flight(&self) -> usize {
        self.shared.lock().settlements.outstanding()
    }

    /// The next message not handled before, claimed. Duplicates are dropped on the way;
    /// records given back (failed, dropped unsettled) come first. A record whose key another
    /// handler holds (a resent copy of one still in flight) waits aside while the records
    /// after it are handed out, and is dropped as a duplicate once that handler is done (or
    /// handed out if it fails, or its lease ends). The claim (the store's lookups and its
    /// write) runs on the store thread. Cancel-safe: records taken from the consumer, or
    /// claimed, but not yet handed out are kept for the next call.
    ///
    /// # Errors
    /// The consumer's and the store's errors; `NoKey` with `MissingKey::Reject`.
    pub async fn next(&mut self) -> Result<Fresh, MiddlewareError> {
        loop {
            if let Some(fresh) = self.next_batch(1).await?.pop() {
                return Ok(fresh);
            }
        }
    }

    /// Up to `max` messages not handled before, claimed together with one store write: the
    /// next one (waiting as [`DedupConsumer::next`] does) and those already fetched behind it.
    /// Settle them one by one, or all at once with [`DedupConsumer::done_many`] (one write
    /// for the lot). Cancel-safe as `next`.
    ///
    /// # Errors
    /// As [`DedupConsumer::next`]. Records read before an error are kept for the next call.
    pub async fn next_batch(&mut self, max: usize) -> Result<Vec<Fresh>, MiddlewareError> {
        let max = max.max(1);
        loop {
            if self.claiming.is_none() {
                if !self.ready.is_empty() {
                    let n = self.ready.len().min(max);
                    return Ok(self.ready.drain(..n).collect());
                }
                // A claim made here has no wait of its own: the runtime's other tasks get
                // their turn all the same, as a wait would give them. Before the claim, not
                // between it and the handing out: cancelled there, its records would be lost.
                tokio::task::consume_budget().await;
                if let Some((joined, out, settles)) = self.start_claim(max).await? {
                    if let Some(out) = self.hand_over(Some(joined), out, settles, max)? {
                        return Ok(out);
                    }
                    continue;
                }
            }
            // The claim runs on the store thread. Cancelled here, it stays in
            // `self.claiming` with its records, and the next call takes it up.
            let Some(task) = self.claiming.as_mut().and_then(|c| c.task.as_mut()) else {
                self.claiming = None;
                continue;
            };
            // The claim is usually answered within microseconds: a short spin spares the
            // wake-up (see `HANDOFF_SPIN`).
            let joined = match answer_soon(task, &self.shared.store_thread) {
                Answer::Value(answer) => Some(answer),
                Answer::Lost => None,
                Answer::Later => task.await.ok(),
            };
            let Some((out, settles)) = self.claiming.take().map(Claiming::answered) else {
                continue;
            };
            if let Some(out) = self.hand_over(joined, out, settles, max)? {
                return Ok(out);
            }
        }
    }

    /// What a claim decided, as `next_batch` returns it: at most `max` handles (the rest
    /// wait in `self.ready`); `None` when none is to be handed out.
    fn hand_over(
        &mut self,
        joined: Option<ClaimResult>,
        out: Vec<Fresh>,
        settles: u64,
        max: usize,
    ) -> Result<Option<Vec<Fresh>>, MiddlewareError> {
        let mut out = self.claimed(joined, out, settles)?;
        if out.len() > max {
            self.ready.extend(out.drain(max..));
        }
        Ok((!out.is_empty()).then_some(out))
    }

    /// Reads the next records (waiting for the first, then up to `max` in all of what is
    /// already here) and claims their keys: at once when nothing in the claim would wait
    /// (returned, with the records passed without a key read with them and
    /// `Shared::settles` before the claim), else on the store thread, in `self.claiming`.
    async fn start_claim(
        &mut self,
        max: usize,
    ) -> Result<Option<(ClaimResult, Vec<Fresh>, u64)>, MiddlewareError> {
        let mut out = Vec::new();
        let mut candidates: Vec<Candidate> = Vec::new();
        match self.read().await? {
            Ok(candidate) => candidates.push(candidate),
            Err(passed) => out.push(passed),
        }
        // What is already here, without waiting: records given back or due again, then
        // the consumer's buffer. A record without a key under `MissingKey::Reject` stops
        // the batch; `next` reports it.
        while candidates.len() + out.len() < max {
            let Some(record) = self.take_ready() else {
                break;
            };
            match record {
                Ok(candidate) => candidates.push(candidate),
                Err(passed) => out.push(passed),
            }
            // Nothing given back or due: the rest comes from the consumer's buffer, in
            // one go.
            if self.nothing_waiting() {
                let room = max - candidates.len() - out.len();
                self.take_buffered_many(room, &mut candidates, &mut out);
                break;
            }
        }
        Ok(self.claim_candidates(candidates, out))
    }

    /// Claims `candidates` here if that needs no wait (the usual case: keys decided from
    /// memory, a write RocksDB takes at once), else on the store thread, in `self.claiming`
    /// with `out` (records passed without a key, handed out with them).
    fn claim_candidates(
        &mut self,
        candidates: Vec<Candidate>,
        out: Vec<Fresh>,
    ) -> Option<(ClaimResult, Vec<Fresh>, u64)> {
        // Read before the claim: a settle after it retries a claim that is refused.
        let settles = self.settles();
        if candidates.len() >= CLAIM_HERE_MIN {
            match claim(&self.shared, &candidates, Waits::Refused) {
                Ok(Some(claims)) => return Some(((candidates, Ok(claims)), out, settles)),
                Err(e) => return Some(((candidates, Err(e)), out, settles)),
                Ok(None) => {}
            }
        }
        let mut waiting: Vec<(TopicPartition, i64)> = Vec::new();
        for c in &candidates {
            let same = |(tp, _): &&mut (TopicPartition, i64)| {
                tp.1 == c.record.partition && *tp.0 == *c.record.topic
            };
            match waiting.iter_mut().find(same) {
                Some((_, first)) => *first = (*first).min(c.record.offset),
                None => waiting.push((c.record.topic_partition(), c.record.offset)),
            }
        }
        let shared = Arc::clone(&self.shared);
        let task = self.shared.store_thread.run(move || {
            let claims = claim(&shared, &candidates, Waits::Allowed).and_then(|claims| {
                claims.ok_or_else(|| DedupError::Interrupted {
                    path: shared.store.path().to_path_buf(),
                    what: "claiming message keys",
                    reason: "a claim allowed to wait was refused for waiting".to_string(),
                })
            });
            (candidates, claims)
        });
        self.claiming = Some(Claiming {
            task: Some(task),
            out,
            settles,
            waiting,
            shared: Arc::clone(&self.shared),
        });
        None
    }

    /// Hands out what a claim found fresh (with `out`, the records passed without a key read
    /// with them), drops duplicates, and sets aside records whose key another handler holds.
    fn claimed(
        &mut self,
        joined: Option<ClaimResult>,
        mut out: Vec<Fresh>,
        settles: u64,
    ) -> Result<Vec<Fresh>, MiddlewareError> {
        let (candidates, claims) = match joined {
            Some(joined) => joined,
            None => {
                // Only a bug: the candidates went with the claim, and stay outstanding, so
                // nothing past them is committed; they come again to the partition's next
                // owner.
                return Err(DedupError::Interrupted {
                    path: self.shared.store.path().to_path_buf(),
                    what: "claiming message keys",
                    reason: "it panicked".to_string(),
                }
                .into());
            }
        };
        let claims = match claims {
            Ok(claims) => claims,
            Err(e) => {
                // Kept for the next call, in order: a record read and then lost to a store
                // error would be passed by the next one settled.
                for candidate in candidates.into_iter().rev() {
                    self.pending.push_front(Parked::due(candidate));
                }
                // Handed out again by the next call (nothing was claimed for them).
                drop(out);
                return Err(e.into());
            }
        };
        // Into `out` directly, after the records passed without a key: a record is moved
        // as few times as may be.
        let first = out.len();
        out.reserve(candidates.len());
        for (candidate, claimed) in candidates.into_iter().zip(claims) {
            match claimed {
                (Claim::Fresh(token) | Claim::Reclaimed(token), reclaimed) => {
                    let Candidate { record, key, epoch } = candidate;
                    out.push(self.handle(record, Some((key, token)), epoch, reclaimed));
                }
                (Claim::Duplicate, _) => {
                    tracing::debug!(topic = %candidate.record.topic, partition = candidate.record.partition, offset = candidate.record.offset, "duplicate dropped");
                    self.settle_unhandled(
                        &candidate.record,
                        Some(candidate.epoch),
                        Some(candidate.key),
                    );
                }
                // Outstanding since it was read: it holds the partition's committable
                // offset until it is handed out and settled.
                (Claim::InProgress { until_ms }, _) => self.park(candidate, settles, until_ms),
            }
        }
        if out.len() > first {
            // Handed out together: one lock for all.
            let mut state = self.shared.lock();
            let mut last = None;
            for fresh in &out[first..] {
                let tp = partition_of(&mut last, &fresh.record);
                state
                    .settlements
                    .hand_out(tp, fresh.epoch, fresh.record.offset);
            }
        }
        Ok(out)
    }

    /// `Shared::settles` now.
    fn settles(&self) -> u64 {
        self.shared
            .settles
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Sets `candidate` aside until a settle after `settles`, or until its claim's lease ends
    /// (`until_ms`, wall clock).
    fn park(&mut self, candidate: Candidate, settles: u64, until_ms: i64) {
        let now = crate::clock::Clock::now_ms(&crate::clock::SystemClock);
        let wait = u64::try_from(until_ms.saturating_sub(now)).unwrap_or(0);
        tracing::debug!(topic = %candidate.record.topic, partition = candidate.record.partition, offset = candidate.record.offset, wait_ms = wait, "another handler holds the claim; the record waits aside");
        self.pending.push_back(Parked {
            candidate,
            settles,
            // At least once a second: a claim of another consumer of the same store (a
            // consumer dropped while it claimed, whose claims are released just after) ends
            // without a settle of ours to say so.
            until: Instant::now() + Duration::from_millis(wait.clamp(10, 1_000)),
        });
    }

    /// Whether as many records wait aside as may: nothing more is read until one is decided.
    fn parked_full(&self) -> bool {
        self.pending.len() >= PARKED_MAX
    }

    /// A record that needs no wait: one given back, else one the consumer has buffered (as
    /// a candidate, or a handle for a record passed without a key). `None` when nothing is
    /// ready, a replay is due, or a record without a key is to be rejected (left for `next`).
    fn take_ready(&mut self) -> Option<Result<Candidate, Fresh>> {
        if let Some(again) = self.take_again() {
            return Some(match again.key {
                Some(key) => Ok(Candidate {
                    record: again.record,
                    key,
                    epoch: again.epoch,
                }),
                None => Err(self.fresh(again.record, None, again.epoch, false)),
            });
        }
        if let Some(candidate) = self.take_pending() {
            return Some(Ok(candidate));
        }
        if self.held.is_some() || self.parked_full() || !self.shared.lock().to_restore.is_empty() {
            return None;
        }
        let record = self.consumer.take_buffered()?;
        if self.first_of_assigned_partition(&record) {
            // Its partition's changelog is replayed first: `next` does that.
            self.held = Some(record);
            return None;
        }
        match self.config.key_source.hash(&self.shared.group, &record) {
            // Reported by `read`, which takes the held record first.
            Err(_) => {
                self.held = Some(record);
                None
            }
            Ok(Some(key)) => {
                let epoch = self.shared.lock().settlements.read(
                    &record.topic_partition(),
                    record.offset,
                    true,
                );
                Some(Ok(Candidate { record, key, epoch }))
            }
            Ok(None) => match self.config.missing_key {
                MissingKey::Pass => {
                    self.passed += 1;
                    let epoch = self.shared.lock().settlements.read(
                        &record.topic_partition(),
                        record.offset,
                        true,
                    );
                    Some(Err(self.fresh(record, None, epoch, false)))
                }
                MissingKey::Reject => {
                    self.held = Some(record);
                    None
                }
            },
        }
    }

    /// Whether no record is given back, waiting aside, held, or waiting for a replay: then
    /// the next records are the consumer's buffered ones.
    fn nothing_waiting(&self) -> bool {
        if !self.pending.is_empty() || self.held.is_some() || self.parked_full() {
            return false;
        }
        let state = self.shared.lock();
        state.again.is_empty() && state.to_restore.is_empty()
    }

    /// Up to `room` records from the consumer's buffer, as `take_ready` takes them one at a
    /// time (when [`DedupConsumer::nothing_waiting`]), with one lock for all of them: each
    /// with its key as a candidate, or (without one, `MissingKey::Pass`) a handle in `out`.
    /// Stops at a record `next` has to deal with (a replay due, a key to reject), which it
    /// holds.
    fn take_buffered_many(
        &mut self,
        room: usize,
        candidates: &mut Vec<Candidate>,
        out: &mut Vec<Fresh>,
    ) {
        // Keyed records go straight into `candidates` (a record is moved as few times as may
        // be) and are read under one lock below; a record passed without a key notes how
        // many keyed ones came before it, so all are read in the order they came.
        let start = candidates.len();
        // (`room` comes from the caller's `max`: not a size to allocate up front.)
        candidates.reserve(room.min(1024));
        let mut passed: Vec<(usize, ConsumerRecord)> = Vec::new();
        while candidates.len() - start + passed.len() < room {
            let Some(record) = self.consumer.take_buffered() else {
                break;
            };
            if self.first_of_assigned_partition(&record) {
                self.held = Some(record);
                break;
            }
            match self.config.key_source.hash(&self.shared.group, &record) {
                Err(_) => {
                    self.held = Some(record);
                    break;
                }
                Ok(Some(key)) => candidates.push(Candidate {
                    record,
                    key,
                    epoch: Epoch::UNREAD,
                }),
                Ok(None) => match self.config.missing_key {
                    MissingKey::Pass => {
                        self.passed += 1;
                        passed.push((candidates.len(), record));
                    }
                    MissingKey::Reject => {
                        self.held = Some(record);
                        break;
                    }
                },
            }
        }
        let mut state = self.shared.lock();
        let mut last = None;
        let mut handed = Vec::with_capacity(passed.len());
        let mut passed = passed.into_iter().peekable();
        for at in start..=candidates.len() {
            while let Some((_, record)) = passed.next_if(|(before, _)| *before == at) {
                let tp = partition_of(&mut last, &record);
                let epoch = state.settlements.read(tp, record.offset, true);
                state.settlements.hand_out(tp, epoch, record.offset);
                handed.push((record, epoch));
            }
            if let Some(candidate) = candidates.get_mut(at) {
                let tp = partition_of(&mut last, &candidate.record);
                candidate.epoch = state.settlements.read(tp, candidate.record.offset, true);
            }
        }
        drop(state);
        out.extend(
            handed
                .into_iter()
                .map(|(record, epoch)| self.handle(record, None, epoch, false)),
        );
    }

    /// Whether `record` is the first of a partition assigned by hand ([`Consumer::assign`]:
    /// no group rebalance, so no assignment callback) that must wait for its changelog
    /// replay. The partition is taken as owned from here (as the callback would), and with a
    /// changelog queued for its replay, so that a mark another host handled is known before
    /// any of its records is handed out.
    fn first_of_assigned_partition(&self, record: &ConsumerRecord) -> bool {
        // A subscription's partitions (the common case) have their callback.
        if !self.shared.changelog || self.consumer.is_subscribed() {
            return false;
        }
        let tp = record.topic_partition();
        let mut state = self.shared.lock();
        if state.settlements.epoch(&tp).is_some() {
            return false;
        }
        state.settlements.assign(&tp);
        state.to_restore.insert(tp);
        true
    }

    /// When the marks waiting for the changelog, the next commit, or a record waiting aside
    /// for a claim's lease to end, are due while `next` waits for records.
    fn upkeep_at(&self) -> Instant {
        let commit = self.last_commit + self.config.commit_interval;
        let lease_end = self.pending.iter().map(|p| p.until).min();
        let at = lease_end.map_or(commit, |end| commit.min(end));
        if self.shared.lock().outbox.is_empty() {
            at
        } else {
            at.min(self.last_marks_sent + MARKS_LINGER)
        }
    }

    /// The oldest record waiting aside that is due to be claimed again (a settle since it was
    /// set aside, or its claim's lease ended). One whose partition is no longer owned as when
    /// it was read is dropped: the partition's next owner reads it.
    fn take_pending(&mut self) -> Option<Candidate> {
        if self.pending.is_empty() {
            return None;
        }
        let settles = self.settles();
        let now = Instant::now();
        let state = self.shared.lock();
        let mut i = 0;
        while let Some(parked) = self.pending.get(i) {
            let tp = parked.candidate.record.topic_partition();
            if state.settlements.epoch(&tp) != Some(parked.candidate.epoch) {
                self.pending.remove(i);
            } else if parked.settles != settles || parked.until <= now {
                return self.pending.remove(i).map(|p| p.candidate);
            } else {
                i += 1;
            }
        }
        None
    }

    /// A record given back, if its partition is still ours.
    fn take_again(&mut self) -> Option<Again> {
        let mut state = self.shared.lock();
        while let Some(again) = state.again.pop_front() {
            if state.settlements.epoch(&again.record.topic_partition()) == Some(again.epoch) {
                return Some(again);
            }
        }
        None
    }

    /// The next record from the consumer (after a due replay), with its key; or, for a record
    /// without one and `MissingKey::Pass`, the handle to return as it is. Records given back
    /// while it waits come first.
    async fn read(&mut self) -> Result<Result<Candidate, Fresh>, MiddlewareError> {
        let record = loop {
            self.pump_changelog(false).await?;
            self.maybe_commit();
            if let Some(again) = self.take_again() {
                return Ok(match again.key {
                    Some(key) => Ok(Candidate {
                        record: again.record,
                        key,
                        epoch: again.epoch,
                    }),
                    // Passed without a key: no claim to take; handed out again as it is.
                    None => Err(self.fresh(again.record, None, again.epoch, false)),
                });
            }
            if let Some(candidate) = self.take_pending() {
                return Ok(Ok(candidate));
            }
            let record = match self.held.take() {
                Some(record) => record,
                None => {
                    let shared = Arc::clone(&self.shared);
                    let upkeep = self.upkeep_at();
                    let read_on = !self.parked_full();
                    // `recv` is cancel-safe: a record it took is never lost to the select.
                    tokio::select! {
                        record = self.consumer.recv(), if read_on => record?,
                        // A record given back, or a settle (marks to send, offsets to commit).
                        () = shared.wake.notified() => continue,
                        () = tokio::time::sleep_until(upkeep) => continue,
                    }
                }
            };
            if !self.first_of_assigned_partition(&record)
                && self.shared.lock().to_restore.is_empty()
            {
                break record;
            }
            // Kept across a failed or cancelled replay.
            self.held = Some(record);
            self.restore_assigned().await?;
        };
        let tp = record.topic_partition();
        let message_key = match self.config.key_source.key(&record) {
            Ok(key) => key,
            Err(panic) => {
                tracing::warn!(topic = %record.topic, partition = record.partition, offset = record.offset, %panic, "the message key function panicked");
                self.rejected += 1;
                self.settle_unhandled(&record, None, None);
                return Err(MiddlewareError::KeyFunction {
                    topic: record.topic.to_string(),
                    partition: record.partition,
                    offset: record.offset,
                    panic,
                });
            }
        };
        let Some(message_key) = message_key else {
            return match self.config.missing_key {
                MissingKey::Pass => {
                    self.passed += 1;
                    let epoch = self
                        .shared
                        .lock()
                        .settlements
                        .read(&tp, record.offset, true);
                    Ok(Err(self.fresh(record, None, epoch, false)))
                }
                MissingKey::Reject => {
                    self.rejected += 1;
                    self.settle_unhandled(&record, None, None);
                    Err(MiddlewareError::NoKey {
                        topic: record.topic.to_string(),
                        partition: record.partition,
                        offset: record.offset,
                        source_: self.config.key_source.clone(),
                    })
                }
            };
        };
        let key = KeyHash::new(&self.shared.group, &record.topic, &message_key);
        let epoch = self
            .shared
            .lock()
            .settlements
            .read(&tp, record.offset, true);
        Ok(Ok(Candidate { record, key, epoch }))
    }

    /// A record settled without being handed out (a duplicate, or rejected for having no
    /// key): `epoch` is set when it had been handed out before. A duplicate's mark goes to the
    /// changelog again: it may be one this host marked but never got into the changelog
    /// before a crash, and a mark the changelog has twice is harmless.
    fn settle_unhandled(
        &mut self,
        record: &ConsumerRecord,
        epoch: Option<Epoch>,
        key: Option<KeyHash>,
    ) {
        let tp = record.topic_partition();
        let mut state = self.shared.lock();
        let epoch = epoch.unwrap_or_else(|| state.settlements.read(&tp, record.offset, false));
        let release = state
            .settlements
            .settle(&tp, epoch, record.offset)
            .map(|offset| (epoch, offset));
        if self.shared.changelog {
            state.outbox.push_back(Settled {
                partition: tp,
                record_offset: record.offset,
                release,
                key,
            });
        }
        drop(state);
        // A revocation may be waiting for this record.
        self.shared.settled.notify_waiters();
    }

    /// The next offset of `partition` this middleware will hand out or drop: records given
    /// back or held for another handler's claim count as not yet read.
    pub fn position(&self, partition: &TopicPartition) -> Option<i64> {
        let state = self.shared.lock();
        let waiting = self
            .pending
            .iter()
            .map(|p| &p.candidate.record)
            .chain(self.held.iter())
            .chain(state.again.iter().map(|a| &a.record))
            .chain(self.ready.iter().map(|f| &f.record))
            .chain(
                self.claiming
                    .iter()
                    .flat_map(|c| c.out.iter().map(|f| &f.record)),
            )
            .filter(|r| r.topic_partition() == *partition)
            .map(|r| r.offset)
            .chain(
                self.claiming
                    .iter()
                    .flat_map(|c| c.waiting.iter())
                    .filter(|(tp, _)| tp == partition)
                    .map(|(_, offset)| *offset),
            )
            .min();
        match (waiting, self.consumer.position(partition)) {
            (Some(w), Some(p)) => Some(w.min(p)),
            (w, p) => w.or(p),
        }
    }

    fn fresh(
        &self,
        record: ConsumerRecord,
        claim: Option<(KeyHash, ClaimToken)>,
        epoch: Epoch,
        reclaimed: bool,
    ) -> Fresh {
        self.shared
            .lock()
            .settlements
            .hand_out(&record.topic_partition(), epoch, record.offset);
        self.handle(record, claim, epoch, reclaimed)
    }

    /// The handle of a record, not yet counted as handed out (the caller does that,
    /// `Settlements::hand_out`, before the handle leaves).
    fn handle(
        &self,
        record: ConsumerRecord,
        claim: Option<(KeyHash, ClaimToken)>,
        epoch: Epoch,
        reclaimed: bool,
    ) -> Fresh {
        Fresh {
            record,
            claim,
            reclaimed,
            epoch,
            shared: Arc::clone(&self.shared),
            settled: false,
        }
    }

    /// Marks the message handled (see [`Fresh::done`]).
    ///
    /// # Errors
    /// As [`Fresh::done`].
    pub fn done(&mut self, fresh: Fresh, state: impl FnOnce(&mut StateBatch<'_>)) -> Settling {
        fresh.done(state)
    }

    /// Marks several handles done with one write (see [`Fresh::done_all`]).
    ///
    /// # Errors
    /// As [`Fresh::done_all`].
    pub fn done_many(
        &mut self,
        handles: Vec<Fresh>,
        state: impl FnOnce(&mut StateBatch<'_>),
    ) -> Settling {
        Fresh::done_all(handles, state)
    }

    /// The handler failed (see [`Fresh::failed`]).
    ///
    /// # Errors
    /// As [`Fresh::failed`].
    pub fn failed(&mut self, fresh: Fresh) -> Settling {
        fresh.failed()
    }

    /// Starts the changelog on first use, sends settled marks, releases acknowledged offsets.
    /// Marks are sent in groups (every [`MARKS_LINGER`], or [`MARKS_GROUP`] of them, or when
    /// `now` is asked for), each group after one sync of the store: a sync per record would
    /// cost a disk flush per message.
    async fn pump_changelog(&mut self, now: bool) -> Result<(), MiddlewareError> {
        let Some(config) = &self.config.changelog else {
            return Ok(());
        };
        if self.changelog.is_none() {
            let mut topics: BTreeSet<String> = self.consumer.subscription();
            topics.extend(self.consumer.assignment().into_iter().map(|tp| tp.0));
            let changelog = Changelog::start(
                self.consumer.config(),
                &self.shared.group,
                self.shared.store.window(),
                &self.shared.store,
                config,
                &topics.into_iter().collect::<Vec<_>>(),
            )
            .await?;
            tracing::info!(topic = changelog.topic(), "dedup changelog started");
            self.changelog = Some(changelog);
        }
        let due = self.marks_waiting.is_some() || {
            let state = self.shared.lock();
            !state.outbox.is_empty()
                && (now
                    || state.outbox.len() >= MARKS_GROUP
                    || self.last_marks_sent.elapsed() >= MARKS_LINGER)
        };
        let mut settled: Vec<Settled> = Vec::new();
        if due {
            // Marks leave the process only once they would survive a power cut here: a mark
            // in the changelog whose local state was lost would drop a message unhandled.
            // Every mark queued was written (and counted) before it was queued, so once the
            // writes counted now are durable, the entries queued now may go. They stay queued
            // until then: a cancelled call loses none.
            // Asked for `now`: everything queued (a superset of what may be waiting).
            let (queued, needed) = match self.marks_waiting {
                Some(waiting) if !now => waiting,
                _ => {
                    let state = self.shared.lock();
                    let marks = state.outbox.iter().any(|s| s.key.is_some());
                    let needed = if marks { self.shared.store.writes() } else { 0 };
                    (state.outbox.len(), needed)
                }
            };
            if self.shared.store.durable_writes() < needed {
                if now {
                    self.shared.sync_store().await?;
                } else {
                    // Synced in the background; `next` goes on meanwhile.
                    self.marks_waiting = Some((queued, needed));
                    self.start_sync()?;
                }
            }
            if self.shared.store.durable_writes() >= needed {
                self.marks_waiting = None;
                self.last_marks_sent = Instant::now();
                settled = self.shared.lock().outbox.drain(..queued).collect();
            }
        }
        let Some(changelog) = &mut self.changelog else {
            return Ok(());
        };
        for s in settled {
            match s.key {
                Some(key) => changelog.push_mark(s.partition, s.record_offset, s.release, key),
                None => {
                    if let Some(release) = s.release {
                        changelog.push_offset(s.partition, release);
                    }
                }
            }
        }
        let pumped = changelog.pump(&mut self.acked_unnoted).await;
        // Also what a cancelled `flush_changelog` had taken.
        self.shared
            .note_acked(std::mem::take(&mut self.acked_unnoted));
        pumped?;
        Ok(())
    }

    /// Replays the changelog of newly assigned partitions before any of their records is
    /// handed out.
    async fn restore_assigned(&mut self) -> Result<(), MiddlewareError> {
        // Cloned, not taken: a cancelled `next()` (a timeout around it) must leave the
        // partitions waiting for their replay.
        let partitions = self.shared.lock().to_restore.clone();
        if partitions.is_empty() {
            return Ok(());
        }
        if self.changelog.is_none() {
            self.pump_changelog(true).await?;
        }
        if let Some(changelog) = &mut self.changelog {
            changelog.restore(&self.shared.store, &partitions).await?;
        }
        let mut state = self.shared.lock();
        for tp in &partitions {
            state.to_restore.remove(tp);
        }
        Ok(())
    }

    /// Waits until the changelog acknowledged every mark settled so far (no-op without a
    /// changelog). Offsets are still committed only every `commit_interval`.
    ///
    /// # Errors
    /// The changelog's error.
    pub async fn flush_changelog(&mut self) -> Result<(), MiddlewareError> {
        if self.config.changelog.is_none() {
            return Ok(());
        }
        self.pump_changelog(true).await?;
        if let Some(changelog) = &mut self.changelog {
            // Kept in `self` while the flush waits: if this call is cancelled, the next one
            // notes what it had taken (a release lost here would hold the partition's
            // commit back until its next settle).
            let flushed = changelog.flush(&mut self.acked_unnoted).await;
            // What was acknowledged before a failure still counts.
            self.shared
                .note_acked(std::mem::take(&mut self.acked_unnoted));
            flushed?;
        }
        Ok(())
    }

    /// What may be committed now: per partition the lowest offset not settled (with a
    /// changelog: whose marks it acknowledged), where it moved since the last commit.
    fn commit_offsets(&self) -> OwnedOffsets {
        let state = self.shared.lock();
        let offsets = if self.shared.changelog {
            state.acked.clone()
        } else {
            state.settlements.all_committable()
        };
        // Only partitions owned now, with the ownership they are owned in: one being revoked
        // is committed by its revocation (a commit from here could land after it and rewind
        // the group).
        offsets
            .into_iter()
            .filter(|(tp, o)| self.committed.get(tp) != Some(o))
            .filter_map(|(tp, o)| {
                let epoch = state.settlements.epoch(&tp)?;
                Some((tp, (epoch, o)))
            })
            .collect()
    }

    /// Of `offsets`, those whose partitions are still owned in the same ownership.
    fn still_owned(&self, offsets: OwnedOffsets) -> BTreeMap<TopicPartition, i64> {
        let state = self.shared.lock();
        offsets
            .into_iter()
            .filter(|(tp, (epoch, _))| state.settlements.epoch(tp) == Some(*epoch))
            .map(|(tp, (_, offset))| (tp, offset))
            .collect()
    }

    /// Offsets a failed commit carried count as not committed, so the next chance sends
    /// them again even if nothing moved (unless a later commit already moved them).
    fn forget_committed(&mut self, offsets: &BTreeMap<TopicPartition, i64>) {
        for (tp, offset) in offsets {
            if self.committed.get(tp) == Some(offset) {
                self.committed.remove(tp);
            }
        }
    }

    /// Looks at the commits sent in the background that have finished.
    fn check_commits(&mut self) {
        let mut failed = Vec::new();
        self.commits
            .retain_mut(|(result, offsets)| match result.try_recv() {
                Err(tokio::sync::oneshot::error::TryRecvError::Empty) => true,
                Ok(Ok(())) => false,
                Ok(Err(_)) | Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                    failed.push(std::mem::take(offsets));
                    false
                }
            });
        for offsets in failed {
            self.forget_committed(&offsets);
        }
    }

    /// Commits what is settled every `commit_interval`, once a sync covers the store writes
    /// behind it. The sync runs in the background: `next` is not held up by it, and a
    /// cancelled `next` does not start it over.
    fn maybe_commit(&mut self) {
        self.check_commits();
        if self.commit_waiting.is_none() {
            if self.last_commit.elapsed() < self.config.commit_interval {
                return;
            }
            self.last_commit = Instant::now();
            let offsets = self.commit_offsets();
            if offsets.is_empty() {
                return;
            }
            // Counted after the offsets are read: a settle writes (and counts) its batch
            // before its offset can be read, so every write behind them is counted.
            let needed = self.shared.store.writes();
            self.commit_waiting = Some((needed, offsets));
        }
        let Some((needed, _)) = &self.commit_waiting else {
            return;
        };
        // The marks behind these offsets must survive a power cut before the offsets leave.
        if self.shared.store.durable_writes() < *needed {
            if let Err(e) = self.start_sync() {
                tracing::warn!(error = %e, "store not synced; offsets not committed yet");
            }
            return;
        }
        let Some((_, offsets)) = self.commit_waiting.take() else {
            return;
        };
        // A partition revoked (or revoked and assigned again) while the sync ran is left out.
        let offsets = self.still_owned(offsets);
        if offsets.is_empty() {
            return;
        }
        self.committed.extend(offsets.clone());
        match self.consumer.commit_async(offsets.clone()) {
            Ok(result) => self.commits.push((result, offsets)),
            Err(e) => {
                tracing::warn!(error = %e, "commit not sent");
                self.forget_committed(&offsets);
            }
        }
    }

    /// Starts a sync of the store on a blocking thread unless one is running; `next` is
    /// woken when it ends. Returns the error of a sync that ended since the last call (the
    /// writes it was to cover are not durable; the next call tries again).
    fn start_sync(&mut self) -> Result<(), DedupError> {
        if self.syncing.as_ref().is_some_and(|h| !h.is_finished()) {
            return Ok(());
        }
        let ended = self.syncing.take();
        let shared = Arc::downgrade(&self.shared);
        let gate = Arc::clone(&self.sync_gate.0);
        self.syncing = Some(tokio::task::spawn_blocking(move || {
            let closed = gate.lock().unwrap_or_else(|p| p.into_inner());
            // The consumer was dropped: no sync (it would hold the store open), and nothing
            // waits for it.
            let Some(shared) = shared.upgrade().filter(|_| !*closed) else {
                return Ok(());
            };
            let synced = shared.store.sync();
            shared.wake.notify_one();
            // Let go of the store before the gate: once a drop has passed the gate, no sync
            // holds the store.
            drop(shared);
            drop(closed);
            synced
        }));
        match ended.and_then(|h| h.now_or_never()) {
            Some(Ok(Err(e))) => Err(e),
            Some(Err(e)) => Err(DedupError::Interrupted {
                path: self.shared.store.path().to_path_buf(),
                what: "syncing the write-ahead log",
                reason: e.to_string(),
            }),
            _ => Ok(()),
        }
    }

    /// Counters.
    pub fn metrics(&self) -> MiddlewareMetrics {
        let store = &self.shared.store;
        let counts = store.counts();
        let (keys_stored, bytes_on_disk) = store.size();
        MiddlewareMetrics {
            fresh: counts.fresh,
            duplicates: counts.duplicates,
            claims_expired: counts.claims_expired,
            handler_failures: counts.handler_failures,
            passed_without_key: self.passed,
            rejected_without_key: self.rejected,
            keys_stored,
            bytes_on_disk,
            changelog: self
                .changelog
                .as_ref()
                .map(Changelog::metrics)
                .unwrap_or_default(),
        }
    }

    /// Commits what is settled (records still in flight, or given back, are not: they come
    /// again to the next owner) and closes the consumer (leaving the group).
    ///
    /// # Errors
    /// The commit's error.
    pub async fn close(mut self) -> Result<(), MiddlewareError> {
        // Handles still out are not waited for: their records come again to the next owner.
        self.shared
            .closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // A revocation waiting for handles stops waiting.
        self.shared.settled.notify_waiters();
        // Records claimed and not handed out are given back, and the settles under way
        // (written on the store thread) end first, so what they settled is committed below
        // and no claim of this consumer outlives it in the store.
        // Each wait ends by `revocation_wait` (a store thread stuck in RocksDB); cancelled or
        // cut short at the first, the claim is dropped unanswered and released once it ran.
        let deadline = Instant::now() + self.config.revocation_wait;
        if let Some(mut claiming) = self.claiming.take()
            && let Some(task) = claiming.task.as_mut()
        {
            match tokio::time::timeout_at(deadline, task).await {
                Ok(answer) => {
                    let (out, settles) = claiming.answered();
                    if let Ok(claimed) = self.claimed(answer.ok(), out, settles) {
                        self.ready.extend(claimed);
                    }
                }
                Err(_) => {
                    tracing::warn!(waited = ?self.config.revocation_wait, "a claim still runs on the store thread; its claims are released once it has run");
                }
            }
        }
        let giving_back: Vec<Settling> = self.ready.drain(..).map(Fresh::failed).collect();
        for settling in giving_back {
            match tokio::time::timeout_at(deadline, settling).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "claim not released; its record comes again once its lease ends");
                }
                Err(_) => {
                    tracing::warn!(waited = ?self.config.revocation_wait, "claims still being released on the store thread; closing without waiting for them");
                    break;
                }
            }
        }
        self.shared.settles_under_way().await;
        if let Err(e) = self.flush_changelog().await {
            tracing::warn!(error = %e, "changelog not flushed; offsets of unacknowledged marks stay uncommitted");
        }
        if let Some(changelog) = self.changelog.take() {
            changelog.close().await;
        }
        let offsets = self.commit_offsets();
        if !offsets.is_empty() {
            let synced = self.shared.sync_store().await;
            let offsets = self.still_owned(offsets);
            match synced {
                Ok(()) => {
                    if let Err(e) = self.consumer.commit_offsets(&offsets).await {
                        tracing::warn!(error = %e, "final commit failed; the store's offsets still hold");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "store not synced; final offsets not committed")
                }
            }
        }
        self.consumer.close().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(dir: &std::path::Path) -> Arc<Shared> {
        let store = DedupStore::open(super::super::store::DedupConfig::new(dir)).expect("store");
        Arc::new(Shared {
            store: Arc::new(store),
            group: "g".into(),
            changelog: true,
            state: Mutex::new(SharedState::default()),
            wake: Notify::new(),
            settled: Notify::new(),
            settles: std::sync::atomic::AtomicU64::new(0),
            closing: std::sync::atomic::AtomicBool::new(false),
            revocation_wait: Duration::from_secs(30),
            settle_order: Mutex::new(()),
            settling: std::sync::atomic::AtomicUsize::new(0),
            store_thread: StoreThread::start().expect("store thread"),
        })
    }

    /// What a revocation commits: the listener's offsets once the deferred ones are known.
    async fn revocation_commits(
        listener: &mut StoreOffsets,
        committed: &BTreeMap<TopicPartition, i64>,
        partitions: &BTreeSet<TopicPartition>,
    ) -> BTreeMap<TopicPartition, i64> {
        let mut ctx = RebalanceContext::for_tests(committed);
        listener.on_partitions_revoked(&mut ctx, partitions);
        let mut commits = ctx.commits_for_tests().clone();
        for settled in ctx.take_deferred_for_tests() {
            commits.extend(settled.await);
        }
        commits
    }

    /// A partition's acknowledged offset belongs to one ownership of it: after the partition
    /// left and came back (another member advanced it meanwhile), revoking it again must not
    /// commit the old offset, which would rewind the group.
    #[tokio::test]
    async fn a_partition_that_comes_back_does_not_commit_an_offset_from_before() {
        let dir = tempfile::tempdir().expect("dir");
        let shared = shared(dir.path());
        let mut listener = StoreOffsets(Arc::clone(&shared));
        let tp: TopicPartition = ("t".into(), 0);
        let partitions: BTreeSet<TopicPartition> = [tp.clone()].into();
        let none = BTreeMap::new();

        listener.on_partitions_assigned(&mut RebalanceContext::for_tests(&none), &partitions);
        shared.lock().acked.insert(tp.clone(), 10);
        let commits = revocation_commits(&mut listener, &none, &partitions).await;
        assert_eq!(commits.get(&tp), Some(&10));

        // Another member read it to 20 and committed; it comes back here.
        let committed: BTreeMap<TopicPartition, i64> = [(tp.clone(), 20)].into();
        listener.on_partitions_assigned(&mut RebalanceContext::for_tests(&committed), &partitions);
        let commits = revocation_commits(&mut listener, &committed, &partitions).await;
        assert_eq!(
            commits.get(&tp),
            None,
            "nothing was acknowledged in this ownership; committing would rewind the group"
        );
    }

    /// An acknowledgement that arrives after the partition left and came back carries the
    /// offset of the earlier ownership: it must not become this ownership's committable.
    #[test]
    fn an_acknowledgement_from_an_earlier_ownership_is_ignored() {
        let dir = tempfile::tempdir().expect("dir");
        let shared = shared(dir.path());
        let tp: TopicPartition = ("t".into(), 0);
        let earlier = shared.lock().settlements.assign(&tp);
        Shared::forget(&mut shared.lock(), &tp);
        let now = shared.lock().settlements.assign(&tp);
        shared.note_acked([(tp.clone(), (earlier, 6))].into());
        assert_eq!(shared.lock().acked.get(&tp), None);
        shared.note_acked([(tp.clone(), (now, 25))].into());
        assert_eq!(shared.lock().acked.get(&tp), Some(&25));
    }
}
