//! One file per Kafka API. [`handle`] decodes a request body (already checked by the guard)
//! and runs the API's handler; [`SUPPORTED_APIS`] is the single list ApiVersions advertises and
//! the connection enforces.
//!
//! A handler returns a [`Reply`]: a response now, a response after waiting (an fsync for
//! `acks=all`, data for a long-polling fetch), or nothing (`acks=0`).
//!
//! Rare handlers whose in-order part may wait for the disk (creating or deleting topics and
//! their directories, altering topic configs, Metadata that auto-creates, ListOffsets reading segments) run on
//! tokio's blocking pool ([`on_blocking_pool`]), so a slow disk holds up only the connection
//! that asked. Produce and Fetch run in place (a thread hand-off per request cost a third of
//! the produce throughput); the slow step inside an append, a segment roll, tells tokio it
//! blocks ([`crate::blocking`]). Either way the connection waits for the handler before it
//! reads its next request, so request order is kept.
//!
//! References: Kafka protocol guide (message schemas and versions).

pub(crate) mod alter_configs;
pub(crate) mod api_versions;
pub(crate) mod authorized;
pub(crate) mod create_partitions;
pub(crate) mod create_topics;
pub(crate) mod delete_records;
pub(crate) mod delete_topics;
pub(crate) mod describe_configs;
pub(crate) mod describe_log_dirs;
pub(crate) mod describe_producers;
pub(crate) mod errors;
pub(crate) mod fetch;
pub(crate) mod group;
pub(crate) mod init_producer_id;
pub(crate) mod list_offsets;
pub(crate) mod metadata;
pub(crate) mod offsets;
pub(crate) mod produce;
pub(crate) mod transactions;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, RequestHeader, ResponseKind};
use kafka_protocol::protocol::{Decodable, StrBytes};

use crate::broker::BrokerState;

/// What a handler owes the client.
pub(crate) enum Reply {
    /// The response is ready.
    Now(Box<ResponseKind>),
    /// The response is ready once this completes; later requests proceed meanwhile, and the
    /// connection still answers in order.
    Later(Pin<Box<dyn Future<Output = ResponseKind> + Send>>),
    /// No response at all (`acks=0`).
    Nothing,
    /// A raw SASL token, framed by its length only (after SaslHandshake v0).
    Raw(Bytes),
}

/// Every API this broker implements, with the exact version range it supports. Each range
/// lies inside what both `kafka-protocol` and the request guard cover.
pub(crate) const SUPPORTED_APIS: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 3, 9),
    (ApiKey::Fetch, 4, 12),
    (ApiKey::ListOffsets, 1, 10),
    (ApiKey::Metadata, 0, 12),
    (ApiKey::ApiVersions, 0, 3),
    (ApiKey::CreateTopics, 2, 7),
    (ApiKey::DeleteTopics, 1, 6),
    (ApiKey::DescribeConfigs, 1, 4),
    (ApiKey::AlterConfigs, 0, 2),
    (ApiKey::IncrementalAlterConfigs, 0, 1),
    (ApiKey::CreatePartitions, 0, 3),
    (ApiKey::InitProducerId, 0, 4),
    (ApiKey::AddPartitionsToTxn, 0, 4),
    (ApiKey::AddOffsetsToTxn, 0, 4),
    (ApiKey::EndTxn, 0, 4),
    (ApiKey::TxnOffsetCommit, 0, 4),
    (ApiKey::DescribeTransactions, 0, 0),
    (ApiKey::ListTransactions, 0, 1),
    (ApiKey::DescribeProducers, 0, 0),
    (ApiKey::DescribeLogDirs, 1, 4),
    (ApiKey::DeleteRecords, 0, 2),
    (ApiKey::SaslHandshake, 0, 1),
    (ApiKey::SaslAuthenticate, 0, 2),
    (ApiKey::FindCoordinator, 0, 4),
    (ApiKey::JoinGroup, 0, 9),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 5),
    (ApiKey::OffsetCommit, 2, 8),
    (ApiKey::OffsetFetch, 1, 8),
    (ApiKey::ListGroups, 0, 4),
    (ApiKey::DescribeGroups, 0, 5),
    (ApiKey::DeleteGroups, 0, 2),
    (ApiKey::OffsetDelete, 0, 0),
];

/// The supported version range of `api_key`, if the broker implements it.
pub(crate) fn supported_versions(api_key: ApiKey) -> Option<(i16, i16)> {
    SUPPORTED_APIS
        .iter()
        .find(|(key, _, _)| *key == api_key)
        .map(|&(_, min, max)| (min, max))
}

fn decode<T: Decodable>(mut body: Bytes, version: i16) -> Result<T, String> {
    T::decode(&mut body, version).map_err(|e| e.to_string())
}

/// Decodes and handles one request. `Err` means the body does not decode; the connection is
/// then closed.
pub(crate) async fn handle(
    state: &Arc<BrokerState>,
    header: &RequestHeader,
    api_key: ApiKey,
    body: Bytes,
    peer: SocketAddr,
    access: Option<&Arc<crate::acl::Permissions>>,
) -> Result<Reply, String> {
    if let Some(access) = access.filter(|a| a.limited()) {
        return authorized::handle(state, header, api_key, body, peer, access).await;
    }
    let version = header.request_api_version;
    let now = |response| Ok(Reply::Now(Box::new(response)));
    match api_key {
        ApiKey::ApiVersions => now(ResponseKind::ApiVersions(api_versions::handle(decode(
            body, version,
        )?))),
        // May auto-create topics.
        ApiKey::Metadata => {
            let request = decode(body, version)?;
            now(ResponseKind::Metadata(
                on_blocking_pool(state, move |state| {
                    metadata::handle(state, request, version)
                })
                .await?,
            ))
        }
        ApiKey::CreateTopics => {
            let request = decode(body, version)?;
            now(ResponseKind::CreateTopics(
                on_blocking_pool(state, move |state| {
                    create_topics::handle(state, request, version)
                })
                .await?,
            ))
        }
        ApiKey::DeleteTopics => {
            let request = decode(body, version)?;
            let (response, deleted) = on_blocking_pool(state, move |state| {
                delete_topics::handle(state, request, version)
            })
            .await?;
            // Every group's committed offsets for a deleted topic go too (as in Kafka), before
            // the answer: a topic created again right after must not start at old offsets.
            for topic in deleted {
                state.groups.forget_topic(&topic).await;
            }
            now(ResponseKind::DeleteTopics(response))
        }
        ApiKey::AlterConfigs => {
            let request = decode(body, version)?;
            now(ResponseKind::AlterConfigs(
                on_blocking_pool(state, move |state| {
                    alter_configs::handle_legacy(state, request)
                })
                .await?,
            ))
        }
        ApiKey::IncrementalAlterConfigs => {
            let request = decode(body, version)?;
            now(ResponseKind::IncrementalAlterConfigs(
                on_blocking_pool(state, move |state| {
                    alter_configs::handle_incremental(state, request)
                })
                .await?,
            ))
        }
        // Fsyncs the new log start and deletes segments.
        ApiKey::DeleteRecords => {
            let request = decode(body, version)?;
            now(ResponseKind::DeleteRecords(
                on_blocking_pool(state, move |state| delete_records::handle(state, request))
                    .await?,
            ))
        }
        ApiKey::CreatePartitions => {
            let request = decode(body, version)?;
            now(ResponseKind::CreatePartitions(
                on_blocking_pool(state, move |state| {
                    create_partitions::handle(state, request)
                })
                .await?,
            ))
        }
        ApiKey::DescribeConfigs => now(ResponseKind::DescribeConfigs(describe_configs::handle(
            state,
            decode(body, version)?,
            version,
        ))),
        // Reads segments to find an offset by timestamp.
        ApiKey::ListOffsets => {
            let request = decode(body, version)?;
            now(ResponseKind::ListOffsets(
                on_blocking_pool(state, move |state| {
                    list_offsets::handle(state, request, version)
                })
                .await?,
            ))
        }
        ApiKey::InitProducerId => Ok(init_producer_id::handle(
            state,
            decode(body, version)?,
            version,
        )),
        ApiKey::AddPartitionsToTxn => now(ResponseKind::AddPartitionsToTxn(
            transactions::add_partitions(state, decode(body, version)?, version),
        )),
        ApiKey::AddOffsetsToTxn => now(ResponseKind::AddOffsetsToTxn(transactions::add_offsets(
            state,
            decode(body, version)?,
            version,
        ))),
        ApiKey::EndTxn => Ok(transactions::end_txn(
            state,
            decode(body, version)?,
            version,
        )),
        ApiKey::TxnOffsetCommit => now(ResponseKind::TxnOffsetCommit(
            transactions::txn_offset_commit(state, decode(body, version)?, version),
        )),
        ApiKey::DescribeTransactions => now(ResponseKind::DescribeTransactions(
            transactions::describe_transactions(state, decode(body, version)?),
        )),
        ApiKey::ListTransactions => now(ResponseKind::ListTransactions(
            transactions::list_transactions(state, decode(body, version)?),
        )),
        ApiKey::DescribeProducers => now(ResponseKind::DescribeProducers(
            describe_producers::handle(state, decode(body, version)?),
        )),
        ApiKey::DescribeLogDirs => now(ResponseKind::DescribeLogDirs(describe_log_dirs::handle(
            state,
            decode(body, version)?,
        ))),
        ApiKey::FindCoordinator => now(ResponseKind::FindCoordinator(group::find_coordinator(
            state,
            decode(body, version)?,
            version,
        ))),
        ApiKey::JoinGroup => Ok(group::join_group(
            state,
            decode(body, version)?,
            version,
            header.client_id.as_deref().unwrap_or_default(),
            peer,
        )),
        ApiKey::SyncGroup => Ok(group::sync_group(state, decode(body, version)?)),
        ApiKey::Heartbeat => now(ResponseKind::Heartbeat(group::heartbeat(
            state,
            decode(body, version)?,
        ))),
        ApiKey::LeaveGroup => now(ResponseKind::LeaveGroup(group::leave_group(
            state,
            decode(body, version)?,
            version,
        ))),
        ApiKey::ListGroups => now(ResponseKind::ListGroups(group::list_groups(
            state,
            decode(body, version)?,
        ))),
        ApiKey::DescribeGroups => now(ResponseKind::DescribeGroups(group::describe_groups(
            state,
            decode(body, version)?,
        ))),
        ApiKey::DeleteGroups => Ok(group::delete_groups(state, decode(body, version)?)),
        ApiKey::OffsetCommit => Ok(offsets::offset_commit(state, decode(body, version)?)),
        ApiKey::OffsetFetch => now(ResponseKind::OffsetFetch(offsets::offset_fetch(
            state,
            decode(body, version)?,
            version,
        ))),
        ApiKey::OffsetDelete => Ok(offsets::offset_delete(state, decode(body, version)?)),
        // In place: appends and reads go to the page cache; a roll inside an append says it
        // blocks (`crate::blocking`).
        ApiKey::Produce => Ok(produce::handle(state, decode(body, version)?, version)),
        ApiKey::Fetch => Ok(fetch::handle(state, decode(body, version)?, version)),
        other => Err(format!("{other:?} is not implemented")),
    }
}

/// Runs `handler` on tokio's blocking pool and waits for it. `Err` only if it panicked (the
/// connection is then closed, as it would have been had it panicked in place).
async fn on_blocking_pool<T: Send + 'static>(
    state: &Arc<BrokerState>,
    handler: impl FnOnce(&Arc<BrokerState>) -> T + Send + 'static,
) -> Result<T, String> {
    let state = Arc::clone(state);
    tokio::task::spawn_blocking(move || handler(&state))
        .await
        .map_err(|e| format!("the handler failed: {e}"))
}

/// `Some(message)` as the protocol's nullable string.
pub(crate) fn message(text: impl Into<String>) -> Option<StrBytes> {
    Some(StrBytes::from_string(text.into()))
}
