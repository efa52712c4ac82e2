//! Requests of a user the users file limits to some topics or groups ([`crate::acl`]): each
//! request is narrowed to what the user may use, served by the same handlers as everyone's,
//! and the answer completed with `TOPIC_AUTHORIZATION_FAILED` / `GROUP_AUTHORIZATION_FAILED`
//! for the rest. APIs a limited user may not use close the connection (see `acl`).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use kafka_protocol::messages::delete_groups_response::DeletableGroupResult;
use kafka_protocol::messages::describe_groups_response::DescribedGroup;
use kafka_protocol::messages::find_coordinator_response::Coordinator;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::OffsetFetchResponseGroup;
use kafka_protocol::messages::{
    ApiKey, CreateTopicsRequest, DeleteGroupsRequest, DeleteTopicsRequest, DescribeGroupsRequest,
    FetchRequest, FindCoordinatorRequest, FindCoordinatorResponse, HeartbeatRequest,
    HeartbeatResponse, InitProducerIdRequest, JoinGroupRequest, JoinGroupResponse,
    LeaveGroupRequest, LeaveGroupResponse, ListGroupsRequest, ListOffsetsRequest, MetadataRequest,
    OffsetCommitRequest, OffsetCommitResponse, OffsetDeleteRequest, OffsetDeleteResponse,
    OffsetFetchRequest, ProduceRequest, RequestHeader, ResponseKind, SyncGroupRequest,
    SyncGroupResponse,
};

use super::{Reply, decode, on_blocking_pool};
use crate::acl::{self, GROUP_DENIED, Permissions, TOPIC_DENIED};
use crate::broker::BrokerState;

fn now(response: ResponseKind) -> Result<Reply, String> {
    Ok(Reply::Now(Box::new(response)))
}

/// Serves one request of the limited user `access`.
pub(crate) async fn handle(
    state: &Arc<BrokerState>,
    header: &RequestHeader,
    api_key: ApiKey,
    body: Bytes,
    peer: SocketAddr,
    access: &Arc<Permissions>,
) -> Result<Reply, String> {
    let version = header.request_api_version;
    let refused = |what: &str| {
        Err(format!(
            "{what} is not available to user {:?}, whose topics or groups are limited",
            access.user
        ))
    };
    match api_key {
        ApiKey::ApiVersions => now(ResponseKind::ApiVersions(super::api_versions::handle(
            decode(body, version)?,
        ))),
        ApiKey::Metadata => {
            let mut request: MetadataRequest = decode(body, version)?;
            let denied = acl::take_metadata(access, &mut request);
            let mut response = ResponseKind::Metadata(
                on_blocking_pool(state, move |state| {
                    super::metadata::handle(state, request, version)
                })
                .await?,
            );
            acl::deny_metadata(&mut response, access, denied);
            now(response)
        }
        ApiKey::Produce => {
            let mut request: ProduceRequest = decode(body, version)?;
            let denied = acl::take_produce(access, &mut request);
            if request.acks == 0 && !denied.is_empty() {
                return refused("an acks=0 Produce to a topic it may not write");
            }
            let reply = super::produce::handle(state, request, version);
            Ok(acl::amend(reply, move |r| acl::deny_produce(r, denied)))
        }
        ApiKey::Fetch => {
            let mut request: FetchRequest = decode(body, version)?;
            let denied = acl::take_fetch(access, &mut request);
            let reply = super::fetch::handle(state, request, version);
            Ok(acl::amend(reply, move |r| acl::deny_fetch(r, denied)))
        }
        ApiKey::ListOffsets => {
            let mut request: ListOffsetsRequest = decode(body, version)?;
            let denied = acl::take_list_offsets(access, &mut request);
            let mut response = ResponseKind::ListOffsets(
                on_blocking_pool(state, move |state| {
                    super::list_offsets::handle(state, request, version)
                })
                .await?,
            );
            acl::deny_list_offsets(&mut response, denied);
            now(response)
        }
        ApiKey::CreateTopics => {
            let mut request: CreateTopicsRequest = decode(body, version)?;
            let denied = acl::take_create_topics(access, &mut request);
            let mut response = ResponseKind::CreateTopics(
                on_blocking_pool(state, move |state| {
                    super::create_topics::handle(state, request, version)
                })
                .await?,
            );
            acl::deny_create_topics(&mut response, denied);
            now(response)
        }
        ApiKey::DeleteTopics => {
            let mut request: DeleteTopicsRequest = decode(body, version)?;
            let denied = acl::take_delete_topics(access, &mut request);
            let (response, deleted) = on_blocking_pool(state, move |state| {
                super::delete_topics::handle(state, request, version)
            })
            .await?;
            for topic in deleted {
                state.groups.forget_topic(&topic).await;
            }
            let mut response = ResponseKind::DeleteTopics(response);
            acl::deny_delete_topics(&mut response, denied);
            now(response)
        }
        ApiKey::InitProducerId => {
            let request: InitProducerIdRequest = decode(body, version)?;
            if request.transactional_id.is_some() {
                return refused("a transactional InitProducerId");
            }
            Ok(super::init_producer_id::handle(state, request, version))
        }
        ApiKey::FindCoordinator => {
            let mut request: FindCoordinatorRequest = decode(body, version)?;
            if request.key_type != 0 {
                return refused("FindCoordinator for a transaction");
            }
            if version < 4 {
                if !access.group(&request.key) {
                    return now(ResponseKind::FindCoordinator(
                        FindCoordinatorResponse::default()
                            .with_error_code(GROUP_DENIED)
                            .with_node_id((-1).into())
                            .with_port(-1),
                    ));
                }
                return now(ResponseKind::FindCoordinator(
                    super::group::find_coordinator(state, request, version),
                ));
            }
            let denied = acl::split(&mut request.coordinator_keys, |key| access.group(key));
            let mut response = super::group::find_coordinator(state, request, version);
            for key in denied {
                response.coordinators.push(
                    Coordinator::default()
                        .with_key(key)
                        .with_node_id((-1).into())
                        .with_port(-1)
                        .with_error_code(GROUP_DENIED),
                );
            }
            now(ResponseKind::FindCoordinator(response))
        }
        ApiKey::JoinGroup => {
            let request: JoinGroupRequest = decode(body, version)?;
            if !access.group(&request.group_id) {
                return now(ResponseKind::JoinGroup(
                    JoinGroupResponse::default()
                        .with_error_code(GROUP_DENIED)
                        .with_generation_id(-1)
                        .with_member_id(request.member_id),
                ));
            }
            Ok(super::group::join_group(
                state,
                request,
                version,
                header.client_id.as_deref().unwrap_or_default(),
                peer,
            ))
        }
        ApiKey::SyncGroup => {
            let request: SyncGroupRequest = decode(body, version)?;
            if !access.group(&request.group_id) {
                return now(ResponseKind::SyncGroup(
                    SyncGroupResponse::default().with_error_code(GROUP_DENIED),
                ));
            }
            Ok(super::group::sync_group(state, request))
        }
        ApiKey::Heartbeat => {
            let request: HeartbeatRequest = decode(body, version)?;
            if !access.group(&request.group_id) {
                return now(ResponseKind::Heartbeat(
                    HeartbeatResponse::default().with_error_code(GROUP_DENIED),
                ));
            }
            now(ResponseKind::Heartbeat(super::group::heartbeat(
                state, request,
            )))
        }
        ApiKey::LeaveGroup => {
            let request: LeaveGroupRequest = decode(body, version)?;
            if !access.group(&request.group_id) {
                return now(ResponseKind::LeaveGroup(
                    LeaveGroupResponse::default().with_error_code(GROUP_DENIED),
                ));
            }
            now(ResponseKind::LeaveGroup(super::group::leave_group(
                state, request, version,
            )))
        }
        ApiKey::ListGroups => {
            let request: ListGroupsRequest = decode(body, version)?;
            let mut response = super::group::list_groups(state, request);
            response.groups.retain(|g| access.group(&g.group_id));
            now(ResponseKind::ListGroups(response))
        }
        ApiKey::DescribeGroups => {
            let mut request: DescribeGroupsRequest = decode(body, version)?;
            let denied = acl::split(&mut request.groups, |g| access.group(g));
            let mut response = super::group::describe_groups(state, request);
            for group in denied {
                response.groups.push(
                    DescribedGroup::default()
                        .with_group_id(group)
                        .with_error_code(GROUP_DENIED),
                );
            }
            now(ResponseKind::DescribeGroups(response))
        }
        ApiKey::DeleteGroups => {
            let mut request: DeleteGroupsRequest = decode(body, version)?;
            let denied = acl::split(&mut request.groups_names, |g| access.group(g));
            let reply = super::group::delete_groups(state, request);
            Ok(acl::amend(reply, move |response| {
                if let ResponseKind::DeleteGroups(response) = response {
                    for group in denied {
                        response.results.push(
                            DeletableGroupResult::default()
                                .with_group_id(group)
                                .with_error_code(GROUP_DENIED),
                        );
                    }
                }
            }))
        }
        ApiKey::OffsetCommit => {
            let mut request: OffsetCommitRequest = decode(body, version)?;
            if !access.group(&request.group_id) {
                let topics = request
                    .topics
                    .into_iter()
                    .map(|t| {
                        OffsetCommitResponseTopic::default()
                            .with_name(t.name)
                            .with_partitions(
                                t.partitions
                                    .iter()
                                    .map(|p| {
                                        OffsetCommitResponsePartition::default()
                                            .with_partition_index(p.partition_index)
                                            .with_error_code(GROUP_DENIED)
                                    })
                                    .collect(),
                            )
                    })
                    .collect();
                return now(ResponseKind::OffsetCommit(
                    OffsetCommitResponse::default().with_topics(topics),
                ));
            }
            let denied = acl::take_offset_commit(access, &mut request);
            let reply = super::offsets::offset_commit(state, request);
            Ok(acl::amend(reply, move |r| {
                acl::deny_offset_commit(r, denied, TOPIC_DENIED);
            }))
        }
        ApiKey::OffsetFetch => {
            let mut request: OffsetFetchRequest = decode(body, version)?;
            let mut denied_groups = Vec::new();
            if version >= 8 {
                let denied = acl::split(&mut request.groups, |g| access.group(&g.group_id));
                denied_groups = denied.into_iter().map(|g| g.group_id).collect();
            } else if !access.group(&request.group_id) {
                let mut response = kafka_protocol::messages::OffsetFetchResponse::default();
                response.error_code = GROUP_DENIED;
                return now(ResponseKind::OffsetFetch(response));
            }
            let mut response = super::offsets::offset_fetch(state, request, version);
            response.topics.retain(|t| access.topic(&t.name));
            for group in &mut response.groups {
                group.topics.retain(|t| access.topic(&t.name));
            }
            for group in denied_groups {
                response.groups.push(
                    OffsetFetchResponseGroup::default()
                        .with_group_id(group)
                        .with_error_code(GROUP_DENIED),
                );
            }
            now(ResponseKind::OffsetFetch(response))
        }
        ApiKey::OffsetDelete => {
            let request: OffsetDeleteRequest = decode(body, version)?;
            let code = if !access.group(&request.group_id) {
                GROUP_DENIED
            } else if request.topics.iter().any(|t| !access.topic(&t.name)) {
                TOPIC_DENIED
            } else {
                return Ok(super::offsets::offset_delete(state, request));
            };
            now(ResponseKind::OffsetDelete(
                OffsetDeleteResponse::default().with_error_code(code),
            ))
        }
        other => refused(&format!("{other:?}")),
    }
}
