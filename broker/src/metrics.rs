//! What the broker is doing, in Prometheus' text format (`--metrics-listen`): `GET /metrics`
//! and `GET /health`.
//!
//! Counted as requests are served (atomics, no lock on the request path): connections,
//! requests and their latency per API (from the frame read to the answer written), bytes in
//! and out, connections closed for a bad request; fsync latency (process-wide: every log's
//! segment syncs). Read at each scrape: every partition's log start, end and durable offsets
//! and size, each dedup window's ids, bytes, drops and evictions, and the groups per state.
//!
//! The endpoint is plain HTTP/1.0-style (one request per connection, `Connection: close`),
//! with a bounded request head (8 KiB), a 5 s read limit and at most 16 scrapes at once.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use kafka_protocol::messages::ApiKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::broker::BrokerState;

/// Upper bounds of the latency buckets, in seconds (`+Inf` is implied).
const BOUNDS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// API keys below this are counted one by one (Kafka's are below 100).
const API_SLOTS: usize = 128;

/// A latency histogram: cumulative buckets are computed when rendered.
#[derive(Debug)]
pub(crate) struct Histogram {
    buckets: [AtomicU64; BOUNDS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    const fn new() -> Self {
        Self {
            buckets: [const { AtomicU64::new(0) }; BOUNDS.len() + 1],
            sum_micros: AtomicU64::new(0),
        }
    }

    pub(crate) fn observe(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let slot = BOUNDS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(BOUNDS.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let separator = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = BOUNDS
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{separator}le=\"{le}\"}} {cumulative}"
            );
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }
}

/// Every segment fsync of this process.
pub(crate) static FSYNC: Histogram = Histogram::new();

/// The broker's counters.
#[derive(Debug)]
pub(crate) struct BrokerMetrics {
    pub(crate) connections_open: AtomicI64,
    pub(crate) connections_accepted: AtomicU64,
    pub(crate) connections_refused: AtomicU64,
    pub(crate) tls_handshakes_failed: AtomicU64,
    pub(crate) authentications_succeeded: AtomicU64,
    pub(crate) authentications_failed: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    requests: [AtomicU64; API_SLOTS],
    latency: [Histogram; API_SLOTS],
    /// (API key, error code) → responses (or their topics, partitions, groups) that carried
    /// it. Touched only for a response with an error.
    errors: std::sync::Mutex<std::collections::BTreeMap<(i16, i16), u64>>,
}

impl Default for BrokerMetrics {
    fn default() -> Self {
        Self {
            connections_open: AtomicI64::new(0),
            connections_accepted: AtomicU64::new(0),
            connections_refused: AtomicU64::new(0),
            tls_handshakes_failed: AtomicU64::new(0),
            authentications_succeeded: AtomicU64::new(0),
            authentications_failed: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            requests: [const { AtomicU64::new(0) }; API_SLOTS],
            latency: [const { Histogram::new() }; API_SLOTS],
            errors: std::sync::Mutex::default(),
        }
    }
}

impl BrokerMetrics {
    fn slot(api: ApiKey) -> Option<usize> {
        usize::try_from(api as i16).ok().filter(|&s| s < API_SLOTS)
    }

    /// A request of `api` was read.
    pub(crate) fn request(&self, api: ApiKey, frame_bytes: usize) {
        if let Some(slot) = Self::slot(api) {
            self.requests[slot].fetch_add(1, Ordering::Relaxed);
        }
        self.bytes_in
            .fetch_add(frame_bytes as u64, Ordering::Relaxed);
    }

    /// Counts the error codes `response` (to `api`) carries.
    pub(crate) fn response_errors(
        &self,
        api: ApiKey,
        response: &kafka_protocol::messages::ResponseKind,
    ) {
        let codes = crate::api::errors::error_codes(response);
        if codes.is_empty() {
            return;
        }
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        for code in codes {
            *errors.entry((api as i16, code)).or_default() += 1;
        }
    }

    /// A request of `api` was answered with `bytes` after `took`.
    pub(crate) fn answered(&self, api: ApiKey, took: Duration, bytes: usize) {
        if let Some(slot) = Self::slot(api) {
            self.latency[slot].observe(took);
        }
        self.bytes_out.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The Prometheus text of everything above.
pub(crate) fn render(state: &BrokerState) -> String {
    let m = &state.metrics;
    let mut out = String::with_capacity(16 * 1024);
    header(&mut out, "semel_up", "gauge", "1 while the broker serves.");
    out.push_str("semel_up 1\n");
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    header(
        &mut out,
        "semel_connections_open",
        "gauge",
        "Client connections open now.",
    );
    let _ = writeln!(
        out,
        "semel_connections_open {}",
        m.connections_open.load(Ordering::Relaxed)
    );
    for (name, help, value) in [
        (
            "semel_connections_accepted_total",
            "Client connections accepted.",
            load(&m.connections_accepted),
        ),
        (
            "semel_connections_refused_total",
            "Connections closed by the broker for a request it refused (bad frame, unknown API, unsupported version, malformed body).",
            load(&m.connections_refused),
        ),
        (
            "semel_tls_handshakes_failed_total",
            "Connections closed because their TLS handshake failed or did not finish in 10 s.",
            load(&m.tls_handshakes_failed),
        ),
        (
            "semel_sasl_authentications_succeeded_total",
            "SASL authentications that succeeded.",
            load(&m.authentications_succeeded),
        ),
        (
            "semel_sasl_authentications_failed_total",
            "SASL authentications refused (wrong password, unknown user, malformed exchange).",
            load(&m.authentications_failed),
        ),
        (
            "semel_request_bytes_total",
            "Request frame bytes read.",
            load(&m.bytes_in),
        ),
        (
            "semel_response_bytes_total",
            "Response bytes written.",
            load(&m.bytes_out),
        ),
    ] {
        header(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {value}");
    }
    header(
        &mut out,
        "semel_requests_total",
        "counter",
        "Requests read, per API.",
    );
    let apis: Vec<(usize, ApiKey)> = (0..API_SLOTS)
        .filter_map(|slot| {
            let key = i16::try_from(slot).ok()?;
            Some((slot, ApiKey::try_from(key).ok()?))
        })
        .collect();
    for &(slot, api) in &apis {
        let n = load(&m.requests[slot]);
        if n > 0 {
            let _ = writeln!(out, "semel_requests_total{{api=\"{api:?}\"}} {n}");
        }
    }
    header(
        &mut out,
        "semel_response_errors_total",
        "counter",
        "Error codes answered, per API and Kafka error name (counted once per response, topic, partition or group that carries one).",
    );
    let errors = m.errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for ((api, code), n) in errors {
        let api = ApiKey::try_from(api).map_or_else(|()| api.to_string(), |a| format!("{a:?}"));
        let name = crate::api::errors::error_name(code);
        let _ = writeln!(
            out,
            "semel_response_errors_total{{api=\"{api}\",error=\"{name}\"}} {n}"
        );
    }
    header(
        &mut out,
        "semel_request_duration_seconds",
        "histogram",
        "From a request's frame read to its answer written, per API.",
    );
    for &(slot, api) in &apis {
        if m.latency[slot].count() > 0 {
            m.latency[slot].render(
                &mut out,
                "semel_request_duration_seconds",
                &format!("api=\"{api:?}\""),
            );
        }
    }
    header(
        &mut out,
        "semel_fsync_duration_seconds",
        "histogram",
        "Segment fsyncs of this process.",
    );
    FSYNC.render(&mut out, "semel_fsync_duration_seconds", "");

    let partitions = state.catalog.partitions();
    let mut rows: Vec<(String, i64, i64, i64, u64)> = partitions
        .iter()
        .map(|p| {
            let durable = p.durable_end();
            let log = p.log();
            (
                format!("topic=\"{}\",partition=\"{}\"", p.topic, p.index),
                log.log_start_offset(),
                log.log_end_offset(),
                durable,
                log.size_bytes(),
            )
        })
        .collect();
    rows.sort();
    for (name, help, pick) in [
        (
            "semel_partition_log_start_offset",
            "The partition's first offset.",
            0usize,
        ),
        (
            "semel_partition_log_end_offset",
            "The offset the next record gets.",
            1,
        ),
        (
            "semel_partition_durable_end_offset",
            "Offsets below this are fsynced (acks=all answers up to it).",
            2,
        ),
        (
            "semel_partition_size_bytes",
            "Bytes of the partition's segments.",
            3,
        ),
    ] {
        header(&mut out, name, "gauge", help);
        for (labels, start, end, durable, size) in &rows {
            let value = match pick {
                0 => start.to_string(),
                1 => end.to_string(),
                2 => durable.to_string(),
                _ => size.to_string(),
            };
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
    let mut windows: Vec<(String, (usize, usize, u64, u64))> = partitions
        .iter()
        .filter_map(|p| {
            p.dedup_window_stats().map(|stats| {
                (
                    format!("topic=\"{}\",partition=\"{}\"", p.topic, p.index),
                    stats,
                )
            })
        })
        .collect();
    windows.sort();
    for (name, kind, help, pick) in [
        (
            "semel_dedup_window_ids",
            "gauge",
            "Message ids in the partition's dedup window (semel.dedup.window.ms).",
            0usize,
        ),
        (
            "semel_dedup_window_bytes",
            "gauge",
            "Bytes the partition's dedup window holds.",
            1,
        ),
        (
            "semel_dedup_window_duplicates_dropped_total",
            "counter",
            "Produced records not stored because their message id was in the window.",
            2,
        ),
        (
            "semel_dedup_window_ids_evicted_total",
            "counter",
            "Message ids forgotten before the window ran out because of semel.dedup.max.ids.",
            3,
        ),
    ] {
        if windows.is_empty() {
            break;
        }
        header(&mut out, name, kind, help);
        for (labels, (ids, bytes, dropped, evicted)) in &windows {
            let value = match pick {
                0 => ids.to_string(),
                1 => bytes.to_string(),
                2 => dropped.to_string(),
                _ => evicted.to_string(),
            };
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
    header(
        &mut out,
        "semel_groups",
        "gauge",
        "Consumer groups per state.",
    );
    let mut states: std::collections::BTreeMap<&'static str, usize> = [
        "Empty",
        "PreparingRebalance",
        "CompletingRebalance",
        "Stable",
    ]
    .into_iter()
    .map(|s| (s, 0))
    .collect();
    for (_, _, group_state) in state.groups.list() {
        *states.entry(group_state.name()).or_default() += 1;
    }
    for (name, n) in states {
        let _ = writeln!(out, "semel_groups{{state=\"{name}\"}} {n}");
    }
    out
}

/// Largest request head read from a scraper.
const MAX_HEAD: usize = 8 * 1024;
/// Scrapes served at once.
const MAX_SCRAPES: usize = 16;
const READ_LIMIT: Duration = Duration::from_secs(5);

/// Serves `/metrics` and `/health` until shutdown.
pub(crate) async fn serve(
    listener: TcpListener,
    state: Arc<BrokerState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPES));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            // Too many scrapes at once: this one is dropped (the scraper retries).
            continue;
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &state).await {
                tracing::debug!(%peer, error = %e, "metrics request failed");
            }
            drop(slot);
        });
    }
}

async fn answer(mut stream: TcpStream, state: &BrokerState) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let ended = |head: &[u8]| {
        head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n")
    };
    let read = tokio::time::timeout(READ_LIMIT, async {
        let mut chunk = [0u8; 1024];
        while !ended(&head) {
            let n = stream.read(&mut chunk).await?;
            if n == 0 || head.len() + n > MAX_HEAD {
                break;
            }
            head.extend_from_slice(&chunk[..n]);
        }
        std::io::Result::Ok(())
    })
    .await;
    // A head that never ended (closed early, too long, too slow) gets no answer.
    if !matches!(read, Ok(Ok(()))) || !ended(&head) {
        return Ok(());
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, kind, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(state),
        ),
        ("GET", "/health") => ("200 OK", "text/plain; charset=utf-8", "ok\n".to_string()),
        ("GET", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found: try /metrics or /health\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Binds the metrics listener, if one is configured.
pub(crate) async fn bind(address: Option<SocketAddr>) -> std::io::Result<Option<TcpListener>> {
    match address {
        Some(address) => Ok(Some(TcpListener::bind(address).await?)),
        None => Ok(None),
    }
}
