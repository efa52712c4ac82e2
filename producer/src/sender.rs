//! The producer's background task: it batches records per partition, sends batches to the
//! partition leaders, and retries what failed, in sequence order.
//!
//! Records arrive through the inbox (`crate::inbox`), taken many at a time; every ready
//! partition a broker leads goes in one Produce to it (one batch per partition per request,
//! as Kafka requires), and the answer is split back per batch.
//!
//! Idempotence: a batch gets its base sequence when it is sealed and keeps it (and its bytes)
//! across retries, so a broker that already stored it answers with the original offset. At
//! most `max.in.flight` batches per partition are outstanding; a batch that fails with a
//! retriable error goes back to the front of its partition's queue, and any later batch the
//! broker then refuses as out of order follows it, so retries go out in sequence order.
//!
//! When the sequence is broken for good (a batch given up after `delivery.timeout.ms`, or the
//! broker answering `OUT_OF_ORDER_SEQUENCE_NUMBER` to the first batch in line, or
//! `UNKNOWN_PRODUCER_ID`), the producer does what the Java client does since KIP-360: it waits
//! for nothing to be in flight, bumps its epoch with InitProducerId (current id and epoch), and
//! renumbers every queued batch from sequence 0. A batch that was stored but whose answer was
//! lost *and* which is renumbered this way can then be stored twice: the one case in which
//! idempotence does not hold (the Java client has the same gap).
//!
//! References: KIP-98, KIP-360, KIP-480 (sticky partitioning), KIP-91 (delivery.timeout.ms).

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use kafka_protocol::ResponseError;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{ApiKey, ProduceRequest, TopicName, TransactionalId};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType};
use semel_client::{ClientError, Cluster, check_code, needs_metadata_refresh};
use tokio::sync::{mpsc, oneshot};

use crate::config::{Acks, ProducerConfig};
use crate::inbox::{Inbox, Item};
use crate::metrics::Metrics;
use crate::partitioner::partition_for_key;
use crate::record::{DeliveryReport, ProduceError, ProducerRecord};

pub(crate) use crate::reply::Reply;

pub(crate) type TxnReply = oneshot::Sender<Result<(), ProduceError>>;

pub(crate) enum Command {
    Send {
        record: ProducerRecord,
        reply: Reply,
    },
    /// Records of one `send_many` call (at most `max_queued_records` of them).
    SendMany(Vec<(ProducerRecord, Reply)>),
    Flush(oneshot::Sender<()>),
    Begin(TxnReply),
    SendOffsets {
        offsets: Vec<(String, i32, i64)>,
        group: semel_client::ConsumerGroupMetadata,
        reply: TxnReply,
    },
    End {
        commit: bool,
        reply: TxnReply,
    },
}

/// The transaction of a `transactional.id` producer.
#[derive(Default)]
struct Txn {
    open: bool,
    /// Partitions added to the open transaction (AddPartitionsToTxn).
    added: HashSet<Key>,
    /// Whether offsets were added (AddOffsetsToTxn).
    offsets_added: bool,
    /// `metrics.failed` when the transaction began: a record failed in it if it grew.
    failed_at_begin: u64,
    /// Why the open transaction can only be aborted.
    doomed: Option<String>,
    /// A sequence was lost in it: after the abort, bump the epoch (KIP-360).
    needs_bump: bool,
    /// A commit or abort waiting for the transaction's records to be answered.
    ending: Option<(bool, TxnReply)>,
}

struct Pending {
    record: ProducerRecord,
    timestamp_ms: i64,
    reply: Reply,
}

struct Batch {
    id: u64,
    records: Vec<Pending>,
    size: usize,
    created: Instant,
    /// `delivery.timeout.ms` after `created`, when its first record joined: records join in
    /// the order they were sent, so the first one's deadline is the batch's (as in the Java
    /// client, where a batch's records time out together).
    deadline: Instant,
    /// Set when sealed (idempotent producers); -1 otherwise.
    base_sequence: i32,
    /// Encoded once when sealed; retries send the same bytes.
    encoded: Bytes,
    attempts: u32,
    last_error: String,
    /// The connection of the current attempt.
    connection: Option<Arc<semel_client::Connection>>,
}

impl Batch {
    fn deadline(&self) -> Instant {
        self.deadline
    }
}

struct PartitionQueue {
    open: Option<Batch>,
    /// Sealed batches waiting to be sent, in sequence order.
    ready: VecDeque<Batch>,
    in_flight: Vec<Batch>,
    next_sequence: i32,
    /// Sequence of the last record the broker acknowledged in this epoch (-1: none yet).
    acked_through: i32,
    backoff_until: Option<Instant>,
}

impl Default for PartitionQueue {
    fn default() -> Self {
        Self {
            open: None,
            ready: VecDeque::new(),
            in_flight: Vec::new(),
            next_sequence: 0,
            acked_through: -1,
            backoff_until: None,
        }
    }
}

type Key = (String, i32);

/// rustc's FxHash, for the map of partition queues, which the producer looks up for every
/// record: its keys are the application's own topic names, not input chosen by someone else,
/// and SipHash cost more per record than the rest of the lookup.
#[derive(Default, Clone, Copy)]
struct FxHasher(u64);

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, byte: u8) {
        self.add(u64::from(byte));
    }

    fn write_i32(&mut self, value: i32) {
        self.add(u64::from(value.cast_unsigned()));
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// One Produce being put together: batches of partitions one broker leads.
struct Request {
    connection: Arc<semel_client::Connection>,
    batches: Vec<(Key, Batch)>,
    bytes: usize,
}

/// The most bytes of batches one Produce request carries (the Java client's default
/// `max.request.size`); a single larger batch still goes, alone.
const MAX_REQUEST_BYTES: usize = 1024 * 1024;

struct Outcome {
    key: Key,
    batch_id: u64,
    result: Result<(i16, i64, i64), ClientError>,
}

pub(crate) struct Sender {
    config: ProducerConfig,
    cluster: Arc<Cluster>,
    commands: mpsc::Receiver<Command>,
    /// Records of `send`/`send_many` (producers without a transactional id).
    inbox: Option<Arc<Inbox>>,
    /// The inbox's records being queued (kept to reuse its allocation).
    taken: Vec<Item>,
    /// The answers of one Produce request, one per batch it carried.
    outcomes_tx: mpsc::UnboundedSender<Vec<Outcome>>,
    outcomes: mpsc::UnboundedReceiver<Vec<Outcome>>,
    queues: HashMap<Key, PartitionQueue, BuildHasherDefault<FxHasher>>,
    /// The last topic a record went to, its partition count and the metadata version that
    /// count was read at: consecutive records to one topic skip the metadata lookup.
    last_topic: Option<(String, i32, u64)>,
    /// The key of the record being placed, rebuilt in place for each record so looking up
    /// its queue allocates nothing.
    scratch: Key,
    sticky: HashMap<String, i32>,
    /// (producer id, epoch); (-1, -1) without idempotence.
    producer: (i64, i16),
    bump_epoch: bool,
    /// After a failed epoch bump: when to try again, and the wait that got us there.
    next_bump_at: Option<Instant>,
    bump_wait: Duration,
    /// Set once a newer instance fenced this producer: every record fails from then on.
    fenced: Option<String>,
    flushes: Vec<oneshot::Sender<()>>,
    next_batch_id: u64,
    metrics: Arc<Metrics>,
    /// Set while a background metadata refresh runs (at most one at a time).
    refreshing: Arc<std::sync::atomic::AtomicBool>,
    /// `Some` for a `transactional.id` producer.
    txn: Option<Txn>,
}

impl Drop for Sender {
    /// However the task ends (closing, or a panic unwinding through it), the inbox refuses
    /// records from then on and the replies of those still waiting report `Closed`: a record
    /// never waits in an inbox nobody takes from.
    fn drop(&mut self) {
        if let Some(inbox) = &self.inbox {
            drop(inbox.close());
        }
    }
}

fn config_transactional(config: &ProducerConfig) -> Option<Txn> {
    config.transactional_id.as_ref().map(|_| Txn::default())
}

fn next_sequence(sequence: i32, increment: i32) -> i32 {
    if sequence > i32::MAX - increment {
        increment - (i32::MAX - sequence) - 1
    } else {
        sequence + increment
    }
}

impl Sender {
    pub(crate) fn new(
        config: ProducerConfig,
        cluster: Arc<Cluster>,
        commands: mpsc::Receiver<Command>,
        inbox: Option<Arc<Inbox>>,
        producer: (i64, i16),
        metrics: Arc<Metrics>,
    ) -> Self {
        let (outcomes_tx, outcomes) = mpsc::unbounded_channel();
        let txn = config_transactional(&config);
        Self {
            txn,
            config,
            cluster,
            commands,
            inbox,
            taken: Vec::new(),
            outcomes_tx,
            outcomes,
            queues: HashMap::default(),
            scratch: (String::new(), 0),
            last_topic: None,
            sticky: HashMap::new(),
            producer,
            bump_epoch: false,
            next_bump_at: None,
            bump_wait: Duration::ZERO,
            fenced: None,
            flushes: Vec::new(),
            next_batch_id: 0,
            metrics,
            refreshing: Arc::default(),
        }
    }

    /// Refreshes the metadata on a task of its own, unless a refresh already runs: the sender
    /// keeps taking records and expiring batches meanwhile (a refresh can wait out a dead
    /// broker's connection backoff). The batches waiting for it have a backoff that wakes the
    /// sender again.
    fn refresh_in_background(&self) {
        use std::sync::atomic::Ordering;
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let (cluster, refreshing) = (Arc::clone(&self.cluster), Arc::clone(&self.refreshing));
        tokio::spawn(async move {
            let refreshed = cluster.refresh_metadata(None, false).await;
            tracing::debug!(
                ?refreshed,
                "metadata refreshed after a send could not go out"
            );
            refreshing.store(false, Ordering::Release);
        });
    }

    fn idempotent(&self) -> bool {
        self.config.enable_idempotence
    }

    fn idle(&self) -> bool {
        self.queues
            .values()
            .all(|q| q.open.is_none() && q.ready.is_empty() && q.in_flight.is_empty())
    }

    pub(crate) async fn run(mut self) {
        let mut closing = false;
        let inbox = self.inbox.clone();
        loop {
            let wake = self.next_wake();
            // While a transaction ends, later commands (records of the next transaction) wait.
            let ending = self.txn.as_ref().is_some_and(|t| t.ending.is_some());
            tokio::select! {
                () = records_arrived(inbox.as_deref()), if !closing && !ending => {
                    self.take_inbox().await;
                }
                command = self.commands.recv(), if !closing && !ending => {
                    // Records sent before this command go first.
                    self.take_inbox().await;
                    match command {
                    Some(Command::Send { record, reply }) => {
                        self.enqueue(record, reply, now_ms()).await;
                    }
                    Some(Command::SendMany(records)) => {
                        let now = now_ms();
                        for (record, reply) in records {
                            self.enqueue(record, reply, now).await;
                        }
                    }
                    Some(Command::Flush(done)) => self.flushes.push(done),
                    Some(Command::Begin(reply)) => self.begin(reply),
                    Some(Command::SendOffsets { offsets, group, reply }) => {
                        self.send_offsets(offsets, group, reply).await;
                    }
                    Some(Command::End { commit, reply }) => self.start_ending(commit, reply),
                    None => closing = true,
                    }
                }
                Some(outcomes) = self.outcomes.recv() => {
                    for outcome in outcomes {
                        self.complete(outcome);
                    }
                }
                () = sleep_until(wake) => {}
            }
            let ending = self.txn.as_ref().is_some_and(|t| t.ending.is_some());
            let flushing = closing || ending || !self.flushes.is_empty();
            self.dispatch(flushing).await;
            if ending && self.idle() {
                self.finish_ending().await;
            }
            if self.idle() {
                for done in self.flushes.drain(..) {
                    let _ = done.send(());
                }
                if closing {
                    return; // the inbox closes as `self` drops
                }
            }
        }
    }

    /// Queues every record waiting in the inbox, in the order they were sent.
    async fn take_inbox(&mut self) {
        let Some(inbox) = self.inbox.clone() else {
            return;
        };
        let mut items = std::mem::take(&mut self.taken);
        inbox.take(&mut items);
        let now = now_ms();
        for (record, reply) in items.drain(..) {
            if let Some((record, reply)) = self.enqueue_now(record, reply, now) {
                self.enqueue(record, reply, now).await;
            }
        }
        self.taken = items;
    }

    fn next_wake(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut wake: Option<Instant> = None;
        let mut consider = |t: Instant| wake = Some(wake.map_or(t, |w| w.min(t)));
        for queue in self.queues.values() {
            if let Some(open) = &queue.open {
                consider(open.created + self.config.linger);
            }
            // A backoff already over needs no wake-up of its own (waking for it would spin)...
            if let Some(until) = queue.backoff_until.filter(|t| *t > now) {
                consider(until);
            } else if !self.bump_epoch && !queue.ready.is_empty() && queue.in_flight.is_empty() {
                // ...unless batches wait for it with nothing in flight, whose answer would
                // wake the task: then they go now. (Before, such a batch, put back while a
                // metadata refresh ran, slept until its delivery timeout: a producer whose
                // leader died never reached the new one.) Dispatch either sends them or sets
                // a new backoff, so this does not spin; an epoch bump has a wake of its own.
                consider(now);
            }
            if let Some(first) = queue.ready.front() {
                consider(first.deadline());
            }
        }
        if self.bump_epoch
            && let Some(at) = self.next_bump_at.filter(|t| *t > now)
        {
            consider(at);
        }
        wake
    }

    async fn partitions_of(&self, topic: &str) -> Result<i32, ProduceError> {
        let mut last = String::new();
        for attempt in 0..20 {
            let known = self.cluster.with_topic(topic, |info| match info.error {
                None if !info.partitions.is_empty() => Ok(info.partitions.len()),
                error => Err(format!("{error:?}")),
            });
            match known {
                Some(Ok(count)) => {
                    return i32::try_from(count)
                        .map_err(|_| ProduceError::UnknownTopic(topic.to_string()));
                }
                Some(Err(error)) => last = error,
                None => {}
            }
            if attempt > 0 {
                tokio::time::sleep(self.config.retry_backoff).await;
            }
            if let Err(e) = self
                .cluster
                .refresh_metadata(Some(&[topic.to_string()]), true)
                .await
            {
                last = e.to_string();
            }
        }
        Err(ProduceError::UnknownTopic(format!("{topic}: {last}")))
    }

    /// Queues one record; `now_ms` is its create time unless it has one (read once per
    /// group of records taken together).
    async fn enqueue(&mut self, record: ProducerRecord, reply: Reply, now_ms: i64) {
        if let Some((record, reply)) = self.enqueue_now(record, reply, now_ms) {
            // The topic's partitions are not known yet: ask, then queue.
            let partitions = match self.partitions_of(&record.topic).await {
                Ok(n) => n,
                Err(error) => {
                    self.metrics.failed.inc();
                    reply.send(Err(error));
                    return;
                }
            };
            self.place(record, reply, now_ms, partitions);
        }
    }

    /// Queues one record whose topic's partition count is in the metadata, without awaiting
    /// anything (the common case, kept out of `enqueue`'s future: moving that large future
    /// for every record cost more than queueing the record). Gives the record back when the
    /// metadata does not know the topic yet.
    fn enqueue_now(
        &mut self,
        record: ProducerRecord,
        reply: Reply,
        now_ms: i64,
    ) -> Option<(ProducerRecord, Reply)> {
        if let Some(reason) = &self.fenced {
            self.metrics.failed.inc();
            reply.send(Err(ProduceError::Fatal(reason.clone())));
            return None;
        }
        if let Some(refused) = self.txn_refuses_records() {
            self.metrics.failed.inc();
            reply.send(Err(refused));
            return None;
        }
        let version = self.cluster.metadata_version();
        if let Some((topic, partitions, at)) = &self.last_topic
            && *at == version
            && *topic == record.topic
        {
            let partitions = *partitions;
            self.place(record, reply, now_ms, partitions);
            return None;
        }
        let known = self.cluster.with_topic(&record.topic, |info| {
            (info.error.is_none() && !info.partitions.is_empty()).then_some(info.partitions.len())
        });
        match known.flatten().and_then(|n| i32::try_from(n).ok()) {
            Some(partitions) => {
                self.last_topic = Some((record.topic.clone(), partitions, version));
                self.place(record, reply, now_ms, partitions);
                None
            }
            None => Some((record, reply)),
        }
    }

    /// Puts a record into its partition's open batch.
    fn place(&mut self, mut record: ProducerRecord, reply: Reply, now_ms: i64, partitions: i32) {
        let partition = match (record.partition, &record.key) {
            (Some(p), _) if (0..partitions).contains(&p) => p,
            (Some(p), _) => {
                self.metrics.failed.inc();
                reply.send(Err(ProduceError::UnknownTopic(format!(
                    "{}-{p} (the topic has {partitions} partitions)",
                    record.topic
                ))));
                return;
            }
            (None, Some(key)) => partition_for_key(key, partitions),
            (None, None) => {
                let start = i32::try_from(self.next_batch_id % 7_919).unwrap_or(0) % partitions;
                *self.sticky.entry(record.topic.clone()).or_insert(start) % partitions
            }
        };
        record.partition = Some(partition);
        self.scratch.0.clear();
        self.scratch.0.push_str(&record.topic);
        self.scratch.1 = partition;
        let size = record.size_estimate();
        let pending = Pending {
            timestamp_ms: record.timestamp_ms.unwrap_or(now_ms),
            record,
            reply,
        };
        let full = {
            if !self.queues.contains_key(&self.scratch) {
                self.queues
                    .insert(self.scratch.clone(), PartitionQueue::default());
            }
            let Some(queue) = self.queues.get_mut(&self.scratch) else {
                return; // inserted just above
            };
            let needs_new = queue
                .open
                .as_ref()
                .is_some_and(|b| b.size + size > self.config.batch_size);
            if needs_new && let Some(batch) = queue.open.take() {
                queue.ready.push_back(batch);
            }
            let id = &mut self.next_batch_id;
            let (batch_size, delivery_timeout) =
                (self.config.batch_size, self.config.delivery_timeout);
            let batch = queue.open.get_or_insert_with(|| {
                *id += 1;
                let created = Instant::now();
                Batch {
                    id: *id,
                    // Room for as many records of this size as fill the batch (growing a
                    // vector of queued records copies them all each time it doubles).
                    records: Vec::with_capacity((batch_size / size.max(1)).clamp(1, 4096)),
                    size: 0,
                    created,
                    deadline: created + delivery_timeout,
                    base_sequence: -1,
                    encoded: Bytes::new(),
                    attempts: 0,
                    last_error: String::new(),
                    connection: None,
                }
            });
            batch.records.push(pending);
            batch.size += size;
            batch.size >= self.config.batch_size || needs_new
        };
        self.metrics.queued.add(1);
        if full {
            let key = self.scratch.clone();
            self.seal_full(&key);
        }
    }

    /// Seals every batch of `key` waiting in `open` and in `ready` without bytes.
    fn seal_full(&mut self, key: &Key) {
        if let Some(queue) = self.queues.get_mut(key)
            && queue
                .open
                .as_ref()
                .is_some_and(|b| b.size >= self.config.batch_size)
            && let Some(batch) = queue.open.take()
        {
            queue.ready.push_back(batch);
        }
        self.encode_unsealed(key);
        self.advance_sticky(&key.0, key.1);
    }

    fn advance_sticky(&mut self, topic: &str, partition: i32) {
        if let Some(current) = self.sticky.get_mut(topic)
            && *current == partition
        {
            *current = partition + 1;
        }
    }

    /// Gives every batch in `ready` that has no bytes yet its sequence and bytes.
    fn encode_unsealed(&mut self, key: &Key) {
        let idempotent = self.idempotent();
        let transactional = self.txn.is_some();
        let producer = self.producer;
        let compression = self.config.compression;
        let Some(queue) = self.queues.get_mut(key) else {
            return;
        };
        for batch in &mut queue.ready {
            if !batch.encoded.is_empty() {
                continue;
            }
            let count = i32::try_from(batch.records.len()).unwrap_or(i32::MAX);
            if idempotent {
                batch.base_sequence = queue.next_sequence;
                queue.next_sequence = next_sequence(queue.next_sequence, count);
            }
            match encode(batch, producer, compression, transactional) {
                Ok(bytes) => batch.encoded = bytes,
                Err(reason) => batch.last_error = reason,
            }
        }
    }

    async fn dispatch(&mut self, flushing: bool) {
        let now = Instant::now();
        let keys: Vec<Key> = self.queues.keys().cloned().collect();
        for key in &keys {
            if let Some(queue) = self.queues.get_mut(key)
                && queue
                    .open
                    .as_ref()
                    .is_some_and(|b| flushing || b.created + self.config.linger <= now)
                && let Some(batch) = queue.open.take()
            {
                queue.ready.push_back(batch);
            }
            self.encode_unsealed(key);
            self.advance_sticky(&key.0, key.1);
        }
        self.expire_ready(now);
        if self.bump_epoch {
            if self.queues.values().any(|q| !q.in_flight.is_empty()) {
                return; // bump once nothing is outstanding
            }
            if self.queues.values().all(|q| q.ready.is_empty()) {
                return; // nothing to renumber yet: bump when there is
            }
            if self.next_bump_at.is_some_and(|at| at > now) {
                return; // the last attempt failed; next_wake covers the retry
            }
            self.bump().await;
            if self.bump_epoch {
                return;
            }
        }
        if self.txn.as_ref().is_some_and(|t| t.open) {
            self.add_partitions().await;
        }
        let mut refresh = false;
        // Rounds of one batch per ready partition, grouped into one Produce per leader (as the
        // Java sender drains a node's partitions into one request): with many partitions on a
        // broker, one request and one answer instead of one per partition. A partition with
        // more ready batches (up to `max.in.flight`) gets one per round, each in a later
        // request on the same connection, so they reach the broker in sequence order.
        let mut connections: HashMap<i32, Arc<semel_client::Connection>> = HashMap::new();
        loop {
            let mut requests: Vec<Request> = Vec::new();
            let mut request_of_node: HashMap<i32, usize> = HashMap::new();
            for key in &keys {
                if self
                    .txn
                    .as_ref()
                    .is_some_and(|t| t.open && !t.added.contains(key))
                {
                    continue; // not added yet (AddPartitionsToTxn failed or is to be retried)
                }
                let Some(queue) = self.queues.get_mut(key) else {
                    continue;
                };
                // A broken connection fails its requests asynchronously; until those failures
                // are back, a batch sent now on a new connection could overtake them and reach
                // the broker out of sequence.
                let waiting_for_failures = queue
                    .in_flight
                    .iter()
                    .any(|b| b.connection.as_ref().is_some_and(|c| c.is_broken()));
                if waiting_for_failures
                    || queue.backoff_until.is_some_and(|t| t > now)
                    || queue.in_flight.len() >= self.config.max_in_flight
                {
                    continue;
                }
                let Some(batch) = queue.ready.pop_front() else {
                    continue;
                };
                if batch.encoded.is_empty() {
                    let error =
                        ProduceError::Fatal(format!("cannot encode batch: {}", batch.last_error));
                    fail(batch, &error, &self.metrics);
                    continue;
                }
                let Some(leader) = self.cluster.leader(&key.0, key.1) else {
                    refresh = true;
                    self.retry_later(key, batch, "no leader known".into());
                    continue;
                };
                if let Some(at) = self.cluster.node_retry_at(leader) {
                    // The leader refused connections lately: wait out its backoff here
                    // rather than inside `node`, which would hold up this whole task. And
                    // ask again who leads: a dead leader is replaced by the controller a few
                    // seconds after it died, and until the metadata says so every retry
                    // would go to the dead one (as the Java client, refresh on disconnect).
                    queue.ready.push_front(batch);
                    queue.backoff_until = Some(at);
                    refresh = true;
                    continue;
                }
                let connection = match connections.get(&leader) {
                    Some(c) => Arc::clone(c),
                    None => match self.cluster.node(leader).await {
                        Ok(c) => {
                            connections.insert(leader, Arc::clone(&c));
                            c
                        }
                        Err(e) => {
                            refresh = true;
                            self.retry_later(key, batch, e.to_string());
                            continue;
                        }
                    },
                };
                let size = batch.encoded.len();
                match request_of_node.get(&leader) {
                    // The Java client's max.request.size bounds a request: a batch that would
                    // take it past that starts the node's next request.
                    Some(&index) if requests[index].bytes + size <= MAX_REQUEST_BYTES => {
                        requests[index].batches.push((key.clone(), batch));
                        requests[index].bytes += size;
                    }
                    _ => {
                        request_of_node.insert(leader, requests.len());
                        requests.push(Request {
                            connection,
                            batches: vec![(key.clone(), batch)],
                            bytes: size,
                        });
                    }
                }
            }
            if requests.is_empty() {
                break;
            }
            for request in requests {
                self.send(request.batches, request.connection).await;
            }
        }
        if refresh {
            self.refresh_in_background();
        }
    }

    /// Puts one Produce carrying `batches` (one per partition, all led by the connection's
    /// broker) on the wire, in the caller's order, and awaits its answer in a task.
    async fn send(
        &mut self,
        mut batches: Vec<(Key, Batch)>,
        connection: Arc<semel_client::Connection>,
    ) {
        let mut topics: Vec<TopicProduceData> = Vec::new();
        for (key, batch) in &mut batches {
            batch.attempts += 1;
            if batch.attempts > 1 {
                self.metrics.retried.inc();
            }
            let partition = PartitionProduceData::default()
                .with_index(key.1)
                .with_records(Some(batch.encoded.clone()));
            match topics.iter_mut().find(|t| t.name.0.as_str() == key.0) {
                Some(topic) => topic.partition_data.push(partition),
                None => topics.push(
                    TopicProduceData::default()
                        .with_name(TopicName(StrBytes::from_string(key.0.clone())))
                        .with_partition_data(vec![partition]),
                ),
            }
        }
        let request = ProduceRequest::default()
            // Brokers refuse transactional batches without it (Kafka answers
            // TRANSACTIONAL_ID_AUTHORIZATION_FAILED).
            .with_transactional_id(
                self.txn
                    .as_ref()
                    .and(self.config.transactional_id.as_ref())
                    .map(|id| TransactionalId(StrBytes::from_string(id.clone()))),
            )
            .with_acks(self.config.acks.wire())
            .with_timeout_ms(
                i32::try_from(self.config.request_timeout.as_millis()).unwrap_or(i32::MAX),
            )
            .with_topic_data(topics);
        let version = match connection.version(ApiKey::Produce, (3, 9)) {
            Ok(v) => v,
            Err(error) => {
                let error = ProduceError::Client(error);
                for (_, batch) in batches {
                    fail(batch, &error, &self.metrics);
                }
                return;
            }
        };
        if self.config.acks == Acks::None {
            match connection.send_without_response(&request, version).await {
                Ok(()) => {
                    for (key, batch) in batches {
                        succeed(batch, key.1, -1, -1, &self.metrics);
                    }
                }
                Err(error) => {
                    for (key, batch) in batches {
                        self.retry_later(&key, batch, error.to_string());
                    }
                }
            }
            return;
        }
        let in_flight = match connection.submit(&request, version).await {
            Ok(in_flight) => in_flight,
            Err(error) => {
                for (key, batch) in batches {
                    self.retry_later(&key, batch, error.to_string());
                }
                return;
            }
        };
        let tx = self.outcomes_tx.clone();
        let mut sent: Vec<(Key, u64)> = Vec::with_capacity(batches.len());
        for (key, mut batch) in batches {
            sent.push((key.clone(), batch.id));
            batch.connection = Some(Arc::clone(&connection));
            if let Some(queue) = self.queues.get_mut(&key) {
                queue.in_flight.push(batch);
            }
        }
        tokio::spawn(async move {
            let outcomes = match in_flight.response().await {
                Ok(response) => sent
                    .into_iter()
                    .map(|(key, batch_id)| {
                        let result = response
                            .responses
                            .iter()
                            .filter(|t| t.name.0.as_str() == key.0)
                            .flat_map(|t| &t.partition_responses)
                            .find(|p| p.index == key.1)
                            .map(|p| (p.error_code, p.base_offset, p.log_append_time_ms))
                            .ok_or_else(|| {
                                ClientError::Metadata(format!(
                                    "the produce response has no answer for {}-{}",
                                    key.0, key.1
                                ))
                            });
                        Outcome {
                            key,
                            batch_id,
                            result,
                        }
                    })
                    .collect(),
                Err(error) => sent
                    .into_iter()
                    .map(|(key, batch_id)| Outcome {
                        key,
                        batch_id,
                        result: Err(error.clone()),
                    })
                    .collect(),
            };
            let _ = tx.send(outcomes);
        });
    }

    /// Fails every queued batch (not in flight) whose `delivery.timeout.ms` has passed, in
    /// one sweep (KIP-91): with the broker gone, nothing else would pop them, since batches
    /// wait behind a retry backoff or an epoch bump that cannot succeed. A failed batch
    /// leaves a gap in its partition's sequence, so an idempotent producer bumps its epoch
    /// and renumbers what is still queued.
    fn expire_ready(&mut self, now: Instant) {
        let idempotent = self.idempotent();
        let mut gap = false;
        for queue in self.queues.values_mut() {
            // Ready batches are in sequence (= creation) order, so deadlines only grow along
            // the queue: the expired ones are at the front.
            while queue.ready.front().is_some_and(|b| b.deadline() <= now) {
                let Some(batch) = queue.ready.pop_front() else {
                    break;
                };
                gap |= idempotent && !batch.encoded.is_empty();
                let error = ProduceError::Timeout {
                    last_error: if batch.last_error.is_empty() {
                        "not sent: no broker took it in time".into()
                    } else {
                        batch.last_error.clone()
                    },
                };
                fail(batch, &error, &self.metrics);
            }
        }
        if gap {
            self.lost_sequence();
        }
    }

    fn retry_later(&mut self, key: &Key, mut batch: Batch, error: String) {
        tracing::debug!(topic = %key.0, partition = key.1, attempts = batch.attempts, %error, "batch to be retried");
        batch.last_error = error;
        batch.connection = None;
        if Instant::now() >= batch.deadline() {
            if self.idempotent() {
                self.lost_sequence();
            }
            let error = ProduceError::Timeout {
                last_error: batch.last_error.clone(),
            };
            fail(batch, &error, &self.metrics);
            return;
        }
        let retries = self
            .config
            .retries
            .unwrap_or(if self.idempotent() { u32::MAX } else { 0 });
        if batch.attempts > retries {
            let error = ProduceError::RetriesExhausted {
                attempts: batch.attempts,
                last_error: batch.last_error.clone(),
            };
            fail(batch, &error, &self.metrics);
            return;
        }
        let Some(queue) = self.queues.get_mut(key) else {
            return;
        };
        let position = queue
            .ready
            .iter()
            .position(|b| sequence_before(batch.base_sequence, b.base_sequence, batch.id, b.id))
            .unwrap_or(queue.ready.len());
        queue.ready.insert(position, batch);
        queue.backoff_until = Some(Instant::now() + self.config.retry_backoff);
    }

    fn complete(&mut self, outcome: Outcome) {
        let Some(queue) = self.queues.get_mut(&outcome.key) else {
            return;
        };
        let Some(index) = queue
            .in_flight
            .iter()
            .position(|b| b.id == outcome.batch_id)
        else {
            return;
        };
        let batch = queue.in_flight.remove(index);
        let earlier_outstanding = queue
            .in_flight
            .iter()
            .chain(queue.ready.iter())
            .any(|b| sequence_before(b.base_sequence, batch.base_sequence, b.id, batch.id));
        match outcome.result {
            Ok((0, base_offset, append_time)) => {
                succeed(
                    batch,
                    outcome.key.1,
                    base_offset,
                    append_time,
                    &self.metrics,
                );
            }
            Ok((46, _, _)) => {
                // DUPLICATE_SEQUENCE_NUMBER (old brokers): stored before, offset unknown.
                self.metrics.duplicates_acknowledged.inc();
                succeed(batch, outcome.key.1, -1, -1, &self.metrics);
            }
            Ok((code, _, _)) => {
                let error = check_code(code)
                    .err()
                    .unwrap_or(ResponseError::UnknownServerError);
                let out_of_order = error == ResponseError::OutOfOrderSequenceNumber;
                if out_of_order && earlier_outstanding {
                    // An earlier batch failed; this one follows it in order.
                    self.retry_later(&outcome.key, batch, format!("{error:?}"));
                } else if self.idempotent()
                    && (out_of_order || error == ResponseError::UnknownProducerId)
                {
                    tracing::warn!(topic = %outcome.key.0, partition = outcome.key.1, ?error, "sequence lost; bumping the epoch (KIP-360)");
                    self.lost_sequence();
                    self.retry_later(&outcome.key, batch, format!("{error:?}"));
                } else if error == ResponseError::InvalidProducerEpoch
                    || error == ResponseError::ProducerFenced
                {
                    let reason = format!("{error:?}: a newer producer instance fenced this one");
                    fail(batch, &ProduceError::Fatal(reason.clone()), &self.metrics);
                    self.fence(reason);
                } else if error.is_retriable() {
                    if needs_metadata_refresh(error) {
                        self.refresh_in_background();
                    }
                    self.retry_later(&outcome.key, batch, format!("{error:?}"));
                } else {
                    fail(batch, &ProduceError::Broker(error), &self.metrics);
                }
            }
            Err(error) => {
                // The connection broke or timed out: the batch may or may not be stored.
                // Resending the same bytes is safe with idempotence; without it, this is
                // where duplicates come from.
                self.retry_later(&outcome.key, batch, error.to_string());
            }
        }
    }

    /// A newer instance with the same producer id took over: everything queued fails, and so
    /// does every later record (the Java client's fatal state).
    fn fence(&mut self, reason: String) {
        if self.fenced.is_none() {
            tracing::error!(%reason, "producer fenced");
        }
        self.bump_epoch = false;
        for queue in self.queues.values_mut() {
            let error = ProduceError::Fatal(reason.clone());
            for batch in queue.open.take().into_iter().chain(queue.ready.drain(..)) {
                fail(batch, &error, &self.metrics);
            }
        }
        if let Some((_, reply)) = self.txn.as_mut().and_then(|t| t.ending.take()) {
            let _ = reply.send(Err(ProduceError::Fatal(reason.clone())));
        }
        self.fenced = Some(reason);
    }

    /// A sequence was lost (a batch given up, or the broker lost the producer's state): an
    /// idempotent producer bumps its epoch now (KIP-360); a transactional one cannot commit
    /// the open transaction, and bumps after its abort.
    fn lost_sequence(&mut self) {
        match &mut self.txn {
            Some(txn) => {
                txn.needs_bump = true;
                txn.doomed
                    .get_or_insert_with(|| "a record of the transaction was not stored".into());
            }
            None => self.bump_epoch = true,
        }
    }

    /// Why a record cannot join a transaction now, if it cannot.
    fn txn_refuses_records(&mut self) -> Option<ProduceError> {
        let failed = self.metrics.failed.get();
        let txn = self.txn.as_mut()?;
        if !txn.open {
            return Some(ProduceError::TransactionState(
                "no transaction is open: call begin_transaction first".into(),
            ));
        }
        if txn.doomed.is_none() && failed > txn.failed_at_begin {
            txn.doomed = Some("a record of the transaction failed".into());
        }
        txn.doomed.clone().map(ProduceError::Abortable)
    }

    fn begin(&mut self, reply: TxnReply) {
        let failed = self.metrics.failed.get();
        let answer = if let Some(reason) = &self.fenced {
            Err(ProduceError::Fatal(reason.clone()))
        } else {
            match &mut self.txn {
                None => Err(ProduceError::TransactionState(
                    "begin_transaction needs transactional.id".into(),
                )),
                Some(txn) if txn.open => Err(ProduceError::TransactionState(
                    "a transaction is already open".into(),
                )),
                Some(txn) => {
                    *txn = Txn {
                        open: true,
                        failed_at_begin: failed,
                        ..Txn::default()
                    };
                    Ok(())
                }
            }
        };
        let _ = reply.send(answer);
    }

    fn identity(&self) -> crate::transaction::TxnIdentity {
        crate::transaction::TxnIdentity {
            transactional_id: self.config.transactional_id.clone().unwrap_or_default(),
            producer: self.producer,
        }
    }

    fn transaction_deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + self.config.delivery_timeout
    }

    async fn send_offsets(
        &mut self,
        offsets: Vec<(String, i32, i64)>,
        group: semel_client::ConsumerGroupMetadata,
        reply: TxnReply,
    ) {
        if let Some(reason) = &self.fenced {
            let _ = reply.send(Err(ProduceError::Fatal(reason.clone())));
            return;
        }
        if let Some(refused) = self.txn_refuses_records() {
            let _ = reply.send(Err(refused));
            return;
        }
        let identity = self.identity();
        let deadline = self.transaction_deadline();
        let sent =
            crate::transaction::send_offsets(&self.cluster, &identity, &offsets, &group, deadline)
                .await;
        let answer = match sent {
            Ok(()) => {
                if let Some(txn) = &mut self.txn {
                    txn.offsets_added = true;
                }
                Ok(())
            }
            Err(error) if crate::transaction::fenced(&error) => {
                let reason = format!("{error}: a newer producer instance fenced this one");
                self.fence(reason.clone());
                Err(ProduceError::Fatal(reason))
            }
            Err(error) => {
                let reason = format!("sending the offsets failed: {error}");
                if let Some(txn) = &mut self.txn {
                    // The offsets may be half in: this transaction may not commit.
                    txn.offsets_added = true;
                    txn.doomed.get_or_insert(reason.clone());
                }
                Err(ProduceError::Abortable(reason))
            }
        };
        let _ = reply.send(answer);
    }

    fn start_ending(&mut self, commit: bool, reply: TxnReply) {
        if let Some(reason) = &self.fenced {
            let _ = reply.send(Err(ProduceError::Fatal(reason.clone())));
            return;
        }
        match &mut self.txn {
            None => {
                let _ = reply.send(Err(ProduceError::TransactionState(
                    "commit_transaction and abort_transaction need transactional.id".into(),
                )));
            }
            Some(txn) if !txn.open => {
                let _ = reply.send(Err(ProduceError::TransactionState(
                    "no transaction is open".into(),
                )));
            }
            Some(txn) => txn.ending = Some((commit, reply)),
        }
    }

    /// Every record of the ending transaction is answered: commit or abort it.
    async fn finish_ending(&mut self) {
        let failed = self.metrics.failed.get();
        let Some(txn) = self.txn.as_mut() else {
            return;
        };
        let Some((commit, reply)) = txn.ending.take() else {
            return;
        };
        if txn.doomed.is_none() && failed > txn.failed_at_begin {
            txn.doomed = Some("a record of the transaction failed".into());
        }
        if commit && let Some(reason) = &txn.doomed {
            let _ = reply.send(Err(ProduceError::Abortable(reason.clone())));
            return;
        }
        let anything = !txn.added.is_empty() || txn.offsets_added;
        let needs_bump = txn.needs_bump;
        if anything {
            let identity = self.identity();
            let deadline = self.transaction_deadline();
            match crate::transaction::end(&self.cluster, &identity, commit, deadline).await {
                Ok(()) => {}
                Err(error) if crate::transaction::fenced(&error) => {
                    let reason = format!(
                        "{error}: the transaction was aborted by a newer instance or on its timeout"
                    );
                    self.fence(reason.clone());
                    let _ = reply.send(Err(ProduceError::Fatal(reason)));
                    return;
                }
                Err(error) => {
                    // The outcome is unknown; the transaction stays open here, and the same
                    // call again is safe (EndTxn with the same result is answered again).
                    let _ = reply.send(Err(ProduceError::Client(error)));
                    return;
                }
            }
        }
        tracing::debug!(
            commit,
            partitions = self.txn.as_ref().map_or(0, |t| t.added.len()),
            "transaction ended"
        );
        if let Some(txn) = &mut self.txn {
            *txn = Txn::default();
        }
        if needs_bump {
            // Sequences restart at 0 under a new epoch for the next transaction.
            self.bump().await;
        }
        let _ = reply.send(Ok(()));
    }

    /// Before any batch of a partition new to the open transaction goes out, the partition
    /// joins it (AddPartitionsToTxn). A doomed transaction sends nothing more.
    async fn add_partitions(&mut self) {
        let Some(txn) = &self.txn else {
            return;
        };
        if let Some(reason) = txn.doomed.clone() {
            for queue in self.queues.values_mut() {
                for batch in queue.ready.drain(..) {
                    fail(
                        batch,
                        &ProduceError::Abortable(reason.clone()),
                        &self.metrics,
                    );
                }
            }
            return;
        }
        let new: Vec<Key> = self
            .queues
            .iter()
            .filter(|(key, q)| !q.ready.is_empty() && !txn.added.contains(*key))
            .map(|(key, _)| key.clone())
            .collect();
        if new.is_empty() {
            return;
        }
        let identity = self.identity();
        let deadline = self.transaction_deadline();
        match crate::transaction::add_partitions(&self.cluster, &identity, &new, deadline).await {
            Ok(()) => {
                if let Some(txn) = &mut self.txn {
                    txn.added.extend(new);
                }
            }
            Err(error) if crate::transaction::fenced(&error) => {
                self.fence(format!(
                    "{error}: a newer producer instance fenced this one"
                ));
            }
            Err(error) => {
                let reason = format!("AddPartitionsToTxn failed: {error}");
                tracing::warn!(%reason, "the transaction must be aborted");
                if let Some(txn) = &mut self.txn {
                    txn.doomed = Some(reason.clone());
                }
                for key in new {
                    if let Some(queue) = self.queues.get_mut(&key) {
                        for batch in queue.ready.drain(..) {
                            fail(
                                batch,
                                &ProduceError::Abortable(reason.clone()),
                                &self.metrics,
                            );
                        }
                    }
                }
            }
        }
    }

    /// KIP-360: a new epoch for the same producer id, and every queued batch renumbered.
    async fn bump(&mut self) {
        let result = crate::init_producer_id(
            &self.cluster,
            self.config.coordinator_key(),
            self.config.transaction_timeout_ms(),
            self.producer,
        )
        .await;
        match result {
            Ok(producer) => {
                tracing::info!(?producer, "producer epoch bumped; sequences restart at 0");
                self.producer = producer;
                self.bump_epoch = false;
                self.next_bump_at = None;
                self.bump_wait = Duration::ZERO;
                for queue in self.queues.values_mut() {
                    queue.next_sequence = 0;
                    queue.acked_through = -1;
                    for batch in &mut queue.ready {
                        batch.encoded = Bytes::new();
                    }
                }
                let keys: Vec<Key> = self.queues.keys().cloned().collect();
                for key in keys {
                    self.encode_unsealed(&key);
                }
            }
            Err(ClientError::Broker {
                code: code @ (ResponseError::ProducerFenced | ResponseError::InvalidProducerEpoch),
                ..
            }) => {
                self.fence(format!(
                    "{code:?} on epoch bump: a newer producer instance fenced this one"
                ));
            }
            Err(error) => {
                // Doubling waits up to 1 s: a broker that is gone is not asked 10 times a
                // second, and the task never sleeps inside a connection attempt's backoff.
                self.bump_wait = (self.bump_wait * 2).clamp(
                    self.config.retry_backoff,
                    Duration::from_secs(1).max(self.config.retry_backoff),
                );
                self.next_bump_at = Some(Instant::now() + self.bump_wait);
                tracing::warn!(%error, retry_in = ?self.bump_wait, "epoch bump failed; will retry");
            }
        }
    }
}

/// Whether batch (seq a, id a) goes before batch (seq b, id b): by sequence when both have
/// one, else by creation order.
fn sequence_before(seq_a: i32, seq_b: i32, id_a: u64, id_b: u64) -> bool {
    if seq_a >= 0 && seq_b >= 0 && seq_a != seq_b {
        // Sequences wrap from i32::MAX to 0; within the few batches outstanding, the shorter
        // way round the 2^31 circle decides.
        let forward = (i64::from(seq_b) - i64::from(seq_a)).rem_euclid(1 << 31);
        forward < (1 << 30)
    } else {
        id_a < id_b
    }
}

fn succeed(batch: Batch, partition: i32, base_offset: i64, append_time: i64, metrics: &Metrics) {
    // Counted before any reply goes out, so a caller woken by one sees it counted.
    let n = batch.records.len();
    metrics.sent.add(n as u64);
    metrics.queued.add(-i64::try_from(n).unwrap_or(i64::MAX));
    let mut room = None;
    for (i, pending) in batch.records.into_iter().enumerate() {
        let offset = if base_offset < 0 {
            -1
        } else {
            base_offset + i64::try_from(i).unwrap_or(0)
        };
        pending.reply.send_into(
            Ok(DeliveryReport {
                partition,
                offset,
                timestamp_ms: append_time,
            }),
            &mut room,
        );
    }
}

fn fail(batch: Batch, error: &ProduceError, metrics: &Metrics) {
    let n = batch.records.len();
    metrics.failed.add(n as u64);
    metrics.queued.add(-i64::try_from(n).unwrap_or(i64::MAX));
    let mut room = None;
    for pending in batch.records {
        pending.reply.send_into(Err(error.clone()), &mut room);
    }
}

fn encode(
    batch: &Batch,
    producer: (i64, i16),
    compression: kafka_protocol::records::Compression,
    transactional: bool,
) -> Result<Bytes, String> {
    let idempotent = batch.base_sequence >= 0;
    if compression == kafka_protocol::records::Compression::None {
        let fields = crate::batch::BatchFields {
            producer_id: if idempotent { producer.0 } else { -1 },
            producer_epoch: if idempotent { producer.1 } else { -1 },
            base_sequence: if idempotent { batch.base_sequence } else { -1 },
            transactional,
        };
        let records = batch.records.iter().map(|p| (&p.record, p.timestamp_ms));
        return crate::batch::encode_uncompressed(records, fields)
            .ok_or_else(|| format!("a batch of {} records", batch.records.len()));
    }
    let records: Vec<Record> = batch
        .records
        .iter()
        .enumerate()
        .map(|(i, pending)| {
            let i32_index = i32::try_from(i).unwrap_or(i32::MAX);
            Record {
                transactional,
                control: false,
                partition_leader_epoch: -1,
                producer_id: if idempotent { producer.0 } else { -1 },
                producer_epoch: if idempotent { producer.1 } else { -1 },
                timestamp_type: TimestampType::Creation,
                offset: i64::from(i32_index),
                // kafka-protocol cuts a batch wherever offset - sequence changes; without a
                // producer id the records are numbered from -1 (base sequence -1 = none).
                sequence: if idempotent {
                    next_sequence(batch.base_sequence, i32_index)
                } else {
                    i32_index - 1
                },
                delete_horizon: false,
                timestamp: pending.timestamp_ms,
                key: pending.record.key.clone(),
                value: pending.record.value.clone(),
                headers: pending
                    .record
                    .headers
                    .iter()
                    .map(|(k, v)| (StrBytes::from_string(k.clone()), v.clone()))
                    .collect(),
            }
        })
        .collect();
    let mut buf = BytesMut::with_capacity(batch.size + 64);
    RecordBatchEncoder::encode(
        &mut buf,
        &records,
        &RecordEncodeOptions {
            version: 2,
            compression,
        },
    )
    .map_err(|e| e.to_string())?;
    Ok(buf.freeze())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Resolves when records may be waiting in `inbox`; never without one.
async fn records_arrived(inbox: Option<&Inbox>) {
    match inbox {
        Some(inbox) => inbox.arrived().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(wake: Option<Instant>) {
    match wake {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => tokio::time::sleep(Duration::from_secs(3600)).await,
    }
}
