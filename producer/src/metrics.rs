//! Counters a service can export: what was sent, retried, acknowledged as a duplicate, failed,
//! and how many records wait.
//!
//! Each is kept here (read with [`Counter::get`]) and published through the `metrics`
//! facade, labelled with the producer's `client_id`, under these names:
//! `semel_producer_records_sent_total`, `semel_producer_batches_retried_total`,
//! `semel_producer_duplicates_acknowledged_total`, `semel_producer_records_failed_total`,
//! `semel_producer_records_queued`. Install the recorder (for example
//! `metrics-exporter-prometheus`) before `Producer::connect`: handles are registered then.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// A monotonically increasing count.
#[derive(Debug)]
pub struct Counter {
    value: AtomicU64,
    exported: metrics::Counter,
}

impl Counter {
    fn new(name: &'static str, client_id: &str) -> Self {
        Self {
            value: AtomicU64::new(0),
            exported: metrics::counter!(name, "client_id" => client_id.to_string()),
        }
    }

    pub(crate) fn inc(&self) {
        self.add(1);
    }

    pub(crate) fn add(&self, n: u64) {
        self.value.fetch_add(n, Ordering::Relaxed);
        self.exported.increment(n);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug)]
pub struct Gauge {
    value: AtomicI64,
    exported: metrics::Gauge,
}

impl Gauge {
    fn new(name: &'static str, client_id: &str) -> Self {
        Self {
            value: AtomicI64::new(0),
            exported: metrics::gauge!(name, "client_id" => client_id.to_string()),
        }
    }

    pub(crate) fn add(&self, delta: i64) {
        self.value.fetch_add(delta, Ordering::Relaxed);
        #[allow(clippy::cast_precision_loss)]
        self.exported.increment(delta as f64);
    }

    /// The current value.
    pub fn get(&self) -> i64 {
        self.value.load(Ordering::Relaxed)
    }
}

/// The producer's counters.
#[derive(Debug)]
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

impl Metrics {
    /// Counters at zero, published under `client_id`.
    pub fn new(client_id: &str) -> Self {
        Self {
            sent: Counter::new("semel_producer_records_sent_total", client_id),
            retried: Counter::new("semel_producer_batches_retried_total", client_id),
            duplicates_acknowledged: Counter::new(
                "semel_producer_duplicates_acknowledged_total",
                client_id,
            ),
            failed: Counter::new("semel_producer_records_failed_total", client_id),
            queued: Gauge::new("semel_producer_records_queued", client_id),
        }
    }
}
