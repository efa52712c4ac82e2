//! Counters a service can export: what was sent, retried, acknowledged as a duplicate, failed,
//! and how many records wait.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub(crate) fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub(crate) fn add(&self, delta: i64) {
        self.0.fetch_add(delta, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The producer's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Records acknowledged.
    pub sent: Counter,
    /// Batch sends after the first attempt.
    pub retried: Counter,
    /// Batches a broker answered as duplicates without an offset (`DUPLICATE_SEQUENCE_NUMBER`).
    pub duplicates_acknowledged: Counter,
    /// Records that ended in an error.
    pub failed: Counter,
    /// Records accepted by `send` and not yet acknowledged or failed.
    pub queued: Gauge,
}
