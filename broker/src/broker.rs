//! Starting and stopping a broker: [`Broker::start`] opens the data directory, binds the
//! listener and returns a [`BrokerHandle`] for the bound address and shutdown.
//!
//! Shutdown order: stop accepting, let connections finish the requests they have (bounded by
//! `shutdown_grace`), then fsync every partition.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::catalog::{Catalog, CatalogOpenError};
use crate::clock::{Clock, SystemClock};
use crate::config::{BrokerConfig, ConfigError, advertised_host_port};
use crate::group::GroupCoordinator;
use crate::log::LogError;
use crate::producer_ids::ProducerIds;
use crate::server;
use crate::state_file::StateFileError;
use crate::transactions::TransactionCoordinator;

/// State shared by every connection.
#[derive(Debug)]
pub(crate) struct BrokerState {
    pub(crate) config: BrokerConfig,
    /// Host and port announced in Metadata.
    pub(crate) advertised: (String, i32),
    pub(crate) catalog: Catalog,
    pub(crate) producer_ids: ProducerIds,
    pub(crate) transactions: TransactionCoordinator,
    pub(crate) groups: GroupCoordinator,
    /// Bumped by every append; long-polling fetches wait on it.
    pub(crate) appended: Arc<watch::Sender<u64>>,
    pub(crate) clock: Arc<dyn Clock>,
    /// `queued.max.request.bytes`, one permit per byte: taken by each request before its body
    /// is read and given back once it is answered.
    pub(crate) request_memory: Arc<tokio::sync::Semaphore>,
    /// What `--metrics-listen` serves.
    pub(crate) metrics: crate::metrics::BrokerMetrics,
    /// The listener's TLS and SASL.
    pub(crate) security: Arc<crate::security::Security>,
    /// `<data dir>/.lock`, held (an OS file lock) for as long as anything of this broker
    /// runs: a second broker on the same directory is refused instead of corrupting it.
    _lock: std::fs::File,
}

impl BrokerState {
    pub(crate) fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }
}

/// Why a broker could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A setting cannot work.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The data directory or a partition in it could not be opened.
    #[error(transparent)]
    Catalog(#[from] CatalogOpenError),
    /// The producer-id allocator file is corrupt or unreadable; starting anyway could hand
    /// out a producer id twice.
    #[error("producer-id allocator: {0}")]
    ProducerIds(#[source] StateFileError),
    /// The transaction state file is corrupt or unreadable; starting anyway could lose a
    /// decided commit.
    #[error("transaction state: {0}")]
    Transactions(#[source] StateFileError),
    /// A transaction decided before the restart could not be completed.
    #[error("completing the transactions decided before the restart: {0}")]
    TransactionRecovery(String),
    /// The committed-offsets log could not be opened.
    #[error("offsets log: {0}")]
    Offsets(#[source] LogError),
    /// The listen address could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address from the config.
        address: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// Opening the data directory panicked or was cancelled.
    #[error("start-up task failed: {0}")]
    Task(String),
    /// Another broker (in this process or another) has the data directory open.
    #[error(
        "data directory {path} is in use by another broker ({reason}); stop it, or give this one its own --data-dir"
    )]
    DataDirInUse {
        /// The data directory.
        path: std::path::PathBuf,
        /// What locking its `.lock` file said.
        reason: String,
    },
    /// The data directory cannot be created or its lock file opened.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The data directory.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Creates the data directory if needed and takes its lock (`.lock`, as Kafka's log
/// directories have): an exclusive OS lock, released when the file is closed, so a crash
/// never leaves a stale lock behind.
fn lock_data_dir(data_dir: &std::path::Path) -> Result<std::fs::File, StartError> {
    let io = |source| StartError::DataDir {
        path: data_dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(data_dir).map_err(io)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(data_dir.join(".lock"))
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StartError::DataDirInUse {
            path: data_dir.to_path_buf(),
            reason: "its .lock file is locked".into(),
        }),
        Err(std::fs::TryLockError::Error(source)) => Err(io(source)),
    }
}

/// The broker library's entry point.
#[derive(Debug)]
pub struct Broker;

impl Broker {
    /// Opens the data directory (recovering every partition log), binds the listener and starts
    /// serving. Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// [`StartError`] when the config is invalid, the data directory cannot be opened or
    /// recovered, or the address cannot be bound.
    pub async fn start(config: BrokerConfig) -> Result<BrokerHandle, StartError> {
        Self::start_with_clock(config, Arc::new(SystemClock)).await
    }

    /// [`Broker::start`] with an injected clock (for tests of time-based behaviour).
    ///
    /// # Errors
    /// As [`Broker::start`].
    pub async fn start_with_clock(
        config: BrokerConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<BrokerHandle, StartError> {
        config.validate()?;
        let security = {
            let settings = config.security.clone();
            tokio::task::spawn_blocking(move || crate::security::Security::load(&settings))
                .await
                .map_err(|e| StartError::Task(e.to_string()))??
        };
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    address: config.listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
            address: config.listen,
            source,
        })?;
        let advertised = match &config.advertised_listener {
            Some(listener) => advertised_host_port(listener).map_err(|reason| ConfigError {
                name: "advertised.listeners",
                reason,
            })?,
            None if local_addr.ip().is_unspecified() => {
                return Err(ConfigError {
                    name: "advertised.listeners",
                    reason: format!(
                        "listening on {local_addr} (every address) needs --advertised-listener: clients cannot connect to {}; name a host:port they can reach",
                        local_addr.ip()
                    ),
                }
                .into());
            }
            None => (local_addr.ip().to_string(), i32::from(local_addr.port())),
        };
        let metrics_listener =
            crate::metrics::bind(config.metrics_listen)
                .await
                .map_err(|source| StartError::Bind {
                    address: config.metrics_listen.unwrap_or(config.listen),
                    source,
                })?;
        let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
        let lock = lock_data_dir(&config.data_dir)?;
        let appended = Arc::new(watch::channel(0u64).0);
        let catalog = {
            let data_dir = config.data_dir.clone();
            let defaults = config.log.clone();
            let max_producers = config.max_producers_per_partition;
            let appended = Arc::clone(&appended);
            let now_ms = clock.now_ms();
            tokio::task::spawn_blocking(move || {
                Catalog::open(&data_dir, defaults, max_producers, now_ms, appended)
            })
            .await
            .map_err(|e| StartError::Task(e.to_string()))??
        };
        let producer_ids = ProducerIds::open(&config.data_dir).map_err(StartError::ProducerIds)?;
        let transactions = TransactionCoordinator::open(&config.data_dir, &producer_ids)
            .map_err(StartError::Transactions)?;
        let groups = {
            let data_dir = config.data_dir.clone();
            let group_config = config.group;
            let clock = Arc::clone(&clock);
            tokio::task::spawn_blocking(move || {
                GroupCoordinator::open(&data_dir, group_config, clock)
            })
            .await
            .map_err(|e| StartError::Task(e.to_string()))?
            .map_err(StartError::Offsets)?
        };
        tracing::info!(
            listen = %local_addr,
            advertised = %format!("{}:{}", advertised.0, advertised.1),
            data_dir = %config.data_dir.display(),
            cluster_id = catalog.cluster_id(),
            topics = catalog.topics().len(),
            "broker started"
        );
        let request_memory = Arc::new(tokio::sync::Semaphore::new(config.queued_max_request_bytes));
        let state = Arc::new(BrokerState {
            config,
            advertised,
            catalog,
            producer_ids,
            transactions,
            groups,
            appended,
            clock,
            request_memory,
            metrics: crate::metrics::BrokerMetrics::default(),
            security: Arc::new(security),
            _lock: lock,
        });
        // Before anything is served: a transaction decided before a crash gets its markers (and
        // its offsets) now, so no reader sees its partitions stuck below it.
        let recovered = state
            .transactions
            .recover(&state)
            .await
            .map_err(|e| StartError::TransactionRecovery(e.message))?;
        if recovered > 0 {
            tracing::info!(
                transactions = recovered,
                "completed transactions decided before the restart"
            );
        }
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let maintenance = tokio::spawn(server::maintenance_loop(
            Arc::clone(&state),
            shutdown_rx.clone(),
        ));
        let flushes = tokio::spawn(server::flush_loop(Arc::clone(&state), shutdown_rx.clone()));
        let group_timers =
            tokio::spawn(server::group_loop(Arc::clone(&state), shutdown_rx.clone()));
        let transaction_timers = tokio::spawn(server::transaction_loop(
            Arc::clone(&state),
            shutdown_rx.clone(),
        ));
        let metrics = metrics_listener.map(|listener| {
            tokio::spawn(crate::metrics::serve(
                listener,
                Arc::clone(&state),
                shutdown_rx.clone(),
            ))
        });
        if let Some(address) = metrics_addr {
            tracing::info!(%address, "metrics at http://{address}/metrics");
        }
        let server = tokio::spawn(server::serve(listener, Arc::clone(&state), shutdown_rx));
        Ok(BrokerHandle {
            local_addr,
            metrics_addr,
            metrics,
            shutdown_tx,
            server: Some(server),
            maintenance: Some(maintenance),
            flushes: Some(flushes),
            group_timers: Some(group_timers),
            transaction_timers: Some(transaction_timers),
            state,
        })
    }
}

/// A running broker. Dropping it without [`BrokerHandle::shutdown`] stops accepting
/// connections but skips the final flush.
#[derive(Debug)]
pub struct BrokerHandle {
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    metrics: Option<JoinHandle<()>>,
    shutdown_tx: watch::Sender<bool>,
    server: Option<JoinHandle<()>>,
    maintenance: Option<JoinHandle<()>>,
    flushes: Option<JoinHandle<()>>,
    group_timers: Option<JoinHandle<()>>,
    transaction_timers: Option<JoinHandle<()>>,
    pub(crate) state: Arc<BrokerState>,
}

impl BrokerHandle {
    /// The address the listener is bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address `/metrics` is served on, when `metrics_listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The cluster id stored in the data directory.
    pub fn cluster_id(&self) -> &str {
        self.state.catalog.cluster_id()
    }

    /// Stops accepting, lets connections finish within the grace period, then fsyncs every
    /// partition.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown_tx.send(true);
        if let Some(server) = self.server.take()
            && let Err(e) = server.await
        {
            tracing::error!(error = %e, "server task failed");
        }
        if let Some(maintenance) = self.maintenance.take() {
            let _ = maintenance.await;
        }
        if let Some(flushes) = self.flushes.take() {
            let _ = flushes.await;
        }
        if let Some(group_timers) = self.group_timers.take() {
            let _ = group_timers.await;
        }
        if let Some(transaction_timers) = self.transaction_timers.take() {
            let _ = transaction_timers.await;
        }
        if let Some(metrics) = self.metrics.take() {
            let _ = metrics.await;
        }
        let state = Arc::clone(&self.state);
        let flushed = tokio::task::spawn_blocking(move || {
            let now_ms = state.now_ms();
            for partition in state.catalog.partitions() {
                if let Err(e) = partition.close(now_ms) {
                    tracing::error!(topic = %partition.topic, partition = partition.index, error = %e, "final flush failed");
                }
            }
            if let Err(e) = state.groups.close() {
                tracing::error!(error = %e, "final flush of the offsets log failed");
            }
        })
        .await;
        if let Err(e) = flushed {
            tracing::error!(error = %e, "final flush task failed");
        }
        tracing::info!("broker stopped");
    }
}

impl Drop for BrokerHandle {
    fn drop(&mut self) {
        let _ = self.shutdown_tx.send(true);
    }
}
