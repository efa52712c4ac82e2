//! The consumer's counters, published through the `metrics` facade, labelled with its
//! `client_id`: `semel_consumer_records_total`, `semel_consumer_bytes_total`,
//! `semel_consumer_fetches_total`, `semel_consumer_rebalances_total`, the histogram
//! `semel_consumer_fetch_latency_seconds` (a Fetch request to its answer) and the gauge
//! `semel_consumer_records_lag` per topic and partition (the partition's high watermark minus
//! the consumer's next fetch offset, after each fetch). Install the recorder before
//! `Consumer::connect`: handles are registered then.

use std::time::Duration;

/// Handles registered for one consumer.
#[derive(Debug)]
pub(super) struct Export {
    client_id: String,
    pub(super) records: metrics::Counter,
    pub(super) bytes: metrics::Counter,
    pub(super) fetches: metrics::Counter,
    pub(super) rebalances: metrics::Counter,
    fetch_latency: metrics::Histogram,
}

impl Export {
    pub(super) fn new(client_id: &str) -> Self {
        let label = || ("client_id", client_id.to_string());
        Self {
            client_id: client_id.to_string(),
            records: metrics::counter!("semel_consumer_records_total", &[label()]),
            bytes: metrics::counter!("semel_consumer_bytes_total", &[label()]),
            fetches: metrics::counter!("semel_consumer_fetches_total", &[label()]),
            rebalances: metrics::counter!("semel_consumer_rebalances_total", &[label()]),
            fetch_latency: metrics::histogram!("semel_consumer_fetch_latency_seconds", &[label()]),
        }
    }

    pub(super) fn fetched(&self, latency: Duration) {
        self.fetches.increment(1);
        self.fetch_latency.record(latency.as_secs_f64());
    }

    /// The lag of one partition after a fetch.
    pub(super) fn lag(&self, topic: &str, partition: i32, lag: i64) {
        #[allow(clippy::cast_precision_loss)]
        metrics::gauge!(
            "semel_consumer_records_lag",
            "client_id" => self.client_id.clone(),
            "topic" => topic.to_string(),
            "partition" => partition.to_string()
        )
        .set(lag.max(0) as f64);
    }
}
