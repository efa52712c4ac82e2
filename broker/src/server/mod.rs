//! The network side: accept connections (at most `max_connections` at once), and run periodic
//! log maintenance (time-based segment roll, retention).
//!
//! Request path: [`connection`] reads frames ([`frame`]), refuses anything [`guard`] cannot
//! prove safe to decode, decodes with `kafka-protocol`, and hands the request to
//! [`crate::api`].

pub(crate) mod connection;
pub mod frame;
pub mod guard;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::broker::BrokerState;

/// Accepts connections until shutdown, then waits (up to the grace period) for the open ones.
pub(crate) async fn serve(
    listener: TcpListener,
    state: Arc<BrokerState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(state.config.max_connections));
    let mut connections = JoinSet::new();
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        // Reap finished connection tasks so the set does not grow.
        while connections.try_join_next().is_some() {}
        match accepted {
            Ok((stream, peer)) => {
                let state = Arc::clone(&state);
                let shutdown = shutdown.clone();
                connections.spawn(async move {
                    connection::serve(stream, peer, state, shutdown).await;
                    drop(permit);
                });
            }
            Err(e) => {
                // Usually EMFILE or a connection reset before accept; back off briefly.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    let grace = state.config.shutdown_grace;
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            grace_ms = grace.as_millis() as u64,
            "closing connections still busy after the shutdown grace period"
        );
        connections.shutdown().await;
    }
}

/// How often the group coordinator checks session and rebalance timeouts.
const GROUP_TICK: std::time::Duration = std::time::Duration::from_millis(100);

/// Drives the group coordinator's timers until shutdown.
pub(crate) async fn group_loop(state: Arc<BrokerState>, mut shutdown: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(GROUP_TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        state.groups.tick().await;
    }
}

/// How often the transaction coordinator looks for timed-out transactions (Kafka:
/// `transaction.abort.timed.out.transaction.cleanup.interval.ms`, 10 s).
const TRANSACTION_TICK: std::time::Duration = std::time::Duration::from_secs(1);

/// Drives the transaction coordinator's timers until shutdown.
pub(crate) async fn transaction_loop(state: Arc<BrokerState>, mut shutdown: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(TRANSACTION_TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        state.transactions.tick(&state).await;
    }
}

/// Fsyncs, every `log.flush.interval.ms`, each partition written since its last fsync
/// (records produced with `acks` 0 or 1), beside produce: see `BrokerConfig::log_flush_interval`.
/// Without an interval it still fsyncs, within a second, every segment a roll sealed (a roll
/// leaves that to a sync round, outside the partition's lock), as Kafka flushes a rolled
/// segment in the background.
pub(crate) async fn flush_loop(state: Arc<BrokerState>, mut shutdown: watch::Receiver<bool>) {
    let every = state.config.log_flush_interval;
    let mut interval = tokio::time::interval(every.unwrap_or(SEALED_SEGMENT_SYNC));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut checkpointed = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let partitions = state.catalog.partitions();
        for partition in &partitions {
            if every.is_none() && !partition.log().has_unsynced_sealed() {
                continue;
            }
            // A disk that stops answering holds up this partition's flush, not every other
            // partition's (nor the shutdown, which waits for this task).
            match tokio::time::timeout(FLUSH_LIMIT, partition.flush_written()).await {
                Ok(Ok(())) => {}
                // A failed fsync took the partition offline and was logged there.
                Ok(Err(e)) => {
                    tracing::debug!(topic = %partition.topic, partition = partition.index, error = %e, "periodic flush")
                }
                Err(_) => {
                    tracing::warn!(topic = %partition.topic, partition = partition.index, limit_s = FLUSH_LIMIT.as_secs(), "periodic flush not done in time; going on with the other partitions")
                }
            }
        }
        if checkpointed.elapsed() >= RECOVERY_POINT_CHECKPOINT {
            checkpointed = tokio::time::Instant::now();
            // A few small fsynced files: off the runtime's threads.
            let groups = Arc::clone(&state);
            let written = tokio::task::spawn_blocking(move || {
                for partition in partitions {
                    if let Err(e) = partition.checkpoint_recovery_point() {
                        tracing::warn!(topic = %partition.topic, partition = partition.index, error = %e, "recovery point not checkpointed");
                    }
                }
                if let Err(e) = groups.groups.checkpoint_recovery_point() {
                    tracing::warn!(error = %e, "offsets log recovery point not checkpointed");
                }
            });
            if let Err(e) = written.await {
                tracing::warn!(error = %e, "recovery point checkpoints interrupted");
            }
        }
    }
}

/// Longest the flush task waits for one partition's fsync before it goes on.
const FLUSH_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// How often the flush task checkpoints each partition's recovery point (Kafka's
/// `log.flush.offset.checkpoint.interval.ms`): recovery after a crash reads the log from it.
const RECOVERY_POINT_CHECKPOINT: std::time::Duration = std::time::Duration::from_secs(60);

/// How soon a sealed segment is fsynced when `log.flush.interval.ms` is off.
const SEALED_SEGMENT_SYNC: std::time::Duration = std::time::Duration::from_secs(1);

/// Rolls segments by time, applies retention and expires idle producers every
/// `retention_check_interval`.
pub(crate) async fn maintenance_loop(state: Arc<BrokerState>, mut shutdown: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(state.config.retention_check_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let state = Arc::clone(&state);
        let run = tokio::task::spawn_blocking(move || {
            let now_ms = state.now_ms();
            let expiration_ms =
                i64::try_from(state.config.producer_id_expiration.as_millis()).unwrap_or(i64::MAX);
            for partition in state.catalog.partitions() {
                match partition.maintain(now_ms, expiration_ms) {
                    Ok((report, expired_producers)) => {
                        tracing::debug!(topic = %partition.topic, partition = partition.index, ?report, expired_producers, "log maintenance")
                    }
                    Err(e) => {
                        tracing::error!(topic = %partition.topic, partition = partition.index, error = %e, "log maintenance failed")
                    }
                }
            }
        });
        if let Err(e) = run.await {
            tracing::error!(error = %e, "log maintenance task failed");
        }
    }
}
