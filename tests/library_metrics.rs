//! The libraries publish through the `metrics` facade (issue 22): with a recorder installed,
//! a producer's sent and queued records, a consumer's records, fetches, fetch latency and
//! per-partition lag, and the dedup store's claims by outcome show up under their names and
//! move with the load. One test binary: the recorder is process-wide.

mod common;

use std::time::Duration;

use anyhow::{Context, ensure};
use common::TestBroker;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use semel::consumer::dedup::{Claim, DedupConfig, DedupStore, KeyHash};
use semel::consumer::{AutoOffsetReset, Consumer, ConsumerConfig};
use semel::producer::{Producer, ProducerConfig, ProducerRecord};

/// What the debugging recorder reported: its snapshots drain what they read (counters and
/// histograms since the last one, gauges reset to 0), so counters and histogram sample counts
/// are summed over every snapshot taken, and gauges keep the value of the latest one.
struct Totals {
    snapshotter: Snapshotter,
    /// (name, labels, is a gauge, value).
    seen: Vec<Series>,
}

type Series = (String, Vec<(String, String)>, bool, f64);

impl Totals {
    fn refresh(&mut self) {
        for (key, _, _, value) in self.snapshotter.snapshot().into_vec() {
            let key = key.key();
            let labels: Vec<(String, String)> = key
                .labels()
                .map(|l| (l.key().to_string(), l.value().to_string()))
                .collect();
            #[allow(clippy::cast_precision_loss)]
            let (gauge, number) = match value {
                DebugValue::Counter(n) => (false, n as f64),
                DebugValue::Gauge(g) => (true, g.into_inner()),
                DebugValue::Histogram(samples) => (false, samples.len() as f64),
            };
            let name = key.name().to_string();
            match self
                .seen
                .iter_mut()
                .find(|(n, l, _, _)| *n == name && *l == labels)
            {
                Some(entry) if gauge => entry.3 = number,
                Some(entry) => entry.3 += number,
                None => self.seen.push((name, labels, gauge, number)),
            }
        }
    }

    /// The total of `name` over the series that carry every label in `labels`.
    fn value(&mut self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.refresh();
        let matching: Vec<f64> = self
            .seen
            .iter()
            .filter(|(n, l, _, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, _, v)| *v)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_consumer_and_dedup_publish_through_the_metrics_facade() -> anyhow::Result<()> {
    let recorder = DebuggingRecorder::new();
    let mut totals = Totals {
        snapshotter: recorder.snapshotter(),
        seen: Vec::new(),
    };
    recorder
        .install()
        .context("a recorder was installed already")?;
    let broker = TestBroker::start().await?;
    let bootstrap = broker.bootstrap();

    let producer = Producer::connect(ProducerConfig {
        bootstrap_servers: vec![bootstrap.clone()],
        client_id: "metered-producer".into(),
        ..ProducerConfig::default()
    })
    .await?;
    // One batch per record (each awaited), so a consumer fetching one batch at a time lags.
    for n in 0..50 {
        producer
            .send(ProducerRecord::new("metered", n.to_string()).partition(0))
            .await?
            .await?;
    }
    let producer_label = [("client_id", "metered-producer")];
    ensure!(
        totals.value("semel_producer_records_sent_total", &producer_label) == Some(50.0),
        "sent: {:?}",
        totals.value("semel_producer_records_sent_total", &producer_label)
    );
    ensure!(
        totals.value("semel_producer_records_queued", &producer_label) == Some(0.0),
        "queued"
    );
    producer.close().await;

    let mut consumer = Consumer::connect(ConsumerConfig {
        bootstrap_servers: vec![bootstrap.clone()],
        client_id: "metered-consumer".into(),
        auto_offset_reset: AutoOffsetReset::Earliest,
        max_partition_fetch_bytes: 1,
        max_poll_records: 1,
        ..ConsumerConfig::default()
    })
    .await?;
    consumer.assign([("metered".to_string(), 0)])?;
    let lag_labels = [
        ("client_id", "metered-consumer"),
        ("topic", "metered"),
        ("partition", "0"),
    ];
    let mut read = 0;
    let mut lag_seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while read < 50 {
        ensure!(tokio::time::Instant::now() < deadline, "read {read} of 50");
        read += consumer.poll(Duration::from_millis(200)).await?.len();
        if let Some(lag) = totals.value("semel_consumer_records_lag", &lag_labels) {
            lag_seen.push(lag);
        }
    }
    let consumer_label = [("client_id", "metered-consumer")];
    let records = totals.value("semel_consumer_records_total", &consumer_label);
    ensure!(
        records == Some(50.0) && consumer.metrics().records == 50,
        "records: exported {records:?}, in-process {:?}",
        consumer.metrics()
    );
    let fetches = totals
        .value("semel_consumer_fetches_total", &consumer_label)
        .context("no fetch counter")?;
    ensure!(fetches >= 2.0, "fetches {fetches}");
    ensure!(
        totals.value("semel_consumer_fetch_latency_seconds", &consumer_label) == Some(fetches),
        "one latency sample per fetch"
    );
    ensure!(
        lag_seen.first().is_some_and(|lag| *lag > 0.0) && lag_seen.last() == Some(&0.0),
        "lag did not move from behind to caught up: {lag_seen:?}"
    );

    let dir = tempfile::tempdir()?;
    let store = DedupStore::open(DedupConfig::new(dir.path().join("store")))?;
    let key = KeyHash::new("g", "metered", b"order-1");
    let Claim::Fresh(token) = store.claim(key)? else {
        anyhow::bail!("a new key was not fresh");
    };
    store.mark_done(key, token, None, |_| {})?;
    ensure!(
        matches!(store.claim(key)?, Claim::Duplicate),
        "not a duplicate"
    );
    for result in ["fresh", "duplicate"] {
        ensure!(
            totals
                .value("semel_dedup_claims_total", &[("result", result)])
                .is_some_and(|n| n >= 1.0),
            "no {result} claim counted"
        );
    }
    Ok(())
}
