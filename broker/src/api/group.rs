//! Group membership APIs: FindCoordinator, JoinGroup, SyncGroup, Heartbeat, LeaveGroup,
//! ListGroups, DescribeGroups, DeleteGroups. The work is in [`crate::group`]; these handlers
//! translate requests and responses.
//!
//! References: Kafka protocol guide (message schemas); Kafka's `GroupCoordinator` for which
//! error goes where; KIP-394 (JoinGroup v4 `MEMBER_ID_REQUIRED`), KIP-345 (static members),
//! KIP-699 (batched FindCoordinator, v4).

use std::net::SocketAddr;
use std::sync::Arc;

use kafka_protocol::ResponseError;
use kafka_protocol::messages::delete_groups_response::DeletableGroupResult;
use kafka_protocol::messages::describe_groups_response::{DescribedGroup, DescribedGroupMember};
use kafka_protocol::messages::find_coordinator_response::Coordinator;
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::{
    BrokerId, DeleteGroupsRequest, DeleteGroupsResponse, DescribeGroupsRequest,
    DescribeGroupsResponse, FindCoordinatorRequest, FindCoordinatorResponse, GroupId,
    HeartbeatRequest, HeartbeatResponse, JoinGroupRequest, JoinGroupResponse, LeaveGroupRequest,
    LeaveGroupResponse, ListGroupsRequest, ListGroupsResponse, ResponseKind, SyncGroupRequest,
    SyncGroupResponse,
};
use kafka_protocol::protocol::StrBytes;

use super::Reply;

/// The wire code of an outcome: 0 for success.
fn code(outcome: Result<(), ResponseError>) -> i16 {
    outcome.err().map_or(0, |e| e.code())
}
use crate::broker::BrokerState;
use crate::group::Pending;
use crate::group::state::{JoinParams, JoinResult, SyncParams, SyncResult};

fn text(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

fn opt(s: Option<&StrBytes>) -> Option<String> {
    s.map(|v| v.to_string())
}

/// Key types: 0 = group, 1 = transaction. This broker coordinates both.
pub(crate) fn find_coordinator(
    state: &Arc<BrokerState>,
    request: FindCoordinatorRequest,
    version: i16,
) -> FindCoordinatorResponse {
    let (host, port) = state.advertised.clone();
    let node_id = state.config.node_id;
    let known_type = matches!(request.key_type, 0 | 1);
    let error = if known_type {
        0
    } else {
        ResponseError::InvalidRequest.code()
    };
    let message = (!known_type).then(|| text(&format!("unknown key type {}", request.key_type)));
    if version >= 4 {
        let coordinators = request
            .coordinator_keys
            .into_iter()
            .map(|key| {
                Coordinator::default()
                    .with_key(key)
                    .with_node_id(BrokerId(if known_type { node_id } else { -1 }))
                    .with_host(text(if known_type { &host } else { "" }))
                    .with_port(if known_type { port } else { -1 })
                    .with_error_code(error)
                    .with_error_message(message.clone())
            })
            .collect();
        return FindCoordinatorResponse::default().with_coordinators(coordinators);
    }
    if known_type {
        FindCoordinatorResponse::default()
            .with_node_id(BrokerId(node_id))
            .with_host(text(&host))
            .with_port(port)
    } else {
        FindCoordinatorResponse::default()
            .with_error_code(error)
            .with_error_message(message)
            .with_node_id(BrokerId(-1))
            .with_port(-1)
    }
}

fn valid_group_id(group_id: &GroupId) -> bool {
    !group_id.0.is_empty()
}

fn join_response(result: JoinResult) -> JoinGroupResponse {
    JoinGroupResponse::default()
        .with_error_code(result.error.map_or(0, |e| e.code()))
        .with_generation_id(result.generation_id)
        .with_protocol_type(result.protocol_type.as_deref().map(text))
        .with_protocol_name(result.protocol_name.as_deref().map(text))
        .with_leader(text(&result.leader))
        .with_member_id(text(&result.member_id))
        .with_members(
            result
                .members
                .into_iter()
                .map(|m| {
                    JoinGroupResponseMember::default()
                        .with_member_id(text(&m.member_id))
                        .with_group_instance_id(m.group_instance_id.as_deref().map(text))
                        .with_metadata(m.metadata)
                })
                .collect(),
        )
}

fn join_error(error: ResponseError, member_id: &str) -> JoinGroupResponse {
    JoinGroupResponse::default()
        .with_error_code(error.code())
        .with_generation_id(-1)
        .with_member_id(text(member_id))
}

pub(crate) fn join_group(
    state: &Arc<BrokerState>,
    request: JoinGroupRequest,
    version: i16,
    client_id: &str,
    peer: SocketAddr,
) -> Reply {
    if !valid_group_id(&request.group_id) {
        return Reply::Now(Box::new(ResponseKind::JoinGroup(join_error(
            ResponseError::InvalidGroupId,
            &request.member_id,
        ))));
    }
    let session_timeout_ms = request.session_timeout_ms;
    let params = JoinParams {
        member_id: request.member_id.to_string(),
        group_instance_id: opt(request.group_instance_id.as_ref()),
        client_id: client_id.to_string(),
        client_host: format!("/{}", peer.ip()),
        session_timeout_ms,
        // v0 has no rebalance timeout: it is the session timeout.
        rebalance_timeout_ms: if version >= 1 {
            request.rebalance_timeout_ms
        } else {
            session_timeout_ms
        },
        protocol_type: request.protocol_type.to_string(),
        protocols: request
            .protocols
            .into_iter()
            .map(|p| (p.name.to_string(), p.metadata))
            .collect(),
        require_known_member_id: version >= 4,
    };
    let member_id = params.member_id.clone();
    match state.groups.join(&request.group_id.0, params) {
        Pending::Now(result) => {
            Reply::Now(Box::new(ResponseKind::JoinGroup(join_response(result))))
        }
        Pending::Later(receiver) => Reply::Later(Box::pin(async move {
            let response = match receiver.await {
                Ok(result) => join_response(result),
                // Replaced by a newer JoinGroup from the same member, or the group went away.
                Err(_) => join_error(ResponseError::UnknownMemberId, &member_id),
            };
            ResponseKind::JoinGroup(response)
        })),
    }
}

fn sync_response(result: SyncResult) -> SyncGroupResponse {
    SyncGroupResponse::default()
        .with_error_code(result.error.map_or(0, |e| e.code()))
        .with_protocol_type(result.protocol_type.as_deref().map(text))
        .with_protocol_name(result.protocol_name.as_deref().map(text))
        .with_assignment(result.assignment)
}

pub(crate) fn sync_group(state: &Arc<BrokerState>, request: SyncGroupRequest) -> Reply {
    if !valid_group_id(&request.group_id) {
        return Reply::Now(Box::new(ResponseKind::SyncGroup(
            SyncGroupResponse::default().with_error_code(ResponseError::InvalidGroupId.code()),
        )));
    }
    let params = SyncParams {
        member_id: request.member_id.to_string(),
        group_instance_id: opt(request.group_instance_id.as_ref()),
        generation_id: request.generation_id,
        protocol_type: opt(request.protocol_type.as_ref()),
        protocol_name: opt(request.protocol_name.as_ref()),
        assignments: request
            .assignments
            .into_iter()
            .map(|a| (a.member_id.to_string(), a.assignment))
            .collect(),
    };
    match state.groups.sync(&request.group_id.0, params) {
        Pending::Now(result) => {
            Reply::Now(Box::new(ResponseKind::SyncGroup(sync_response(result))))
        }
        Pending::Later(receiver) => Reply::Later(Box::pin(async move {
            let response = match receiver.await {
                Ok(result) => sync_response(result),
                Err(_) => SyncGroupResponse::default()
                    .with_error_code(ResponseError::RebalanceInProgress.code()),
            };
            ResponseKind::SyncGroup(response)
        })),
    }
}

pub(crate) fn heartbeat(state: &Arc<BrokerState>, request: HeartbeatRequest) -> HeartbeatResponse {
    let outcome = if valid_group_id(&request.group_id) {
        state.groups.heartbeat(
            &request.group_id.0,
            &request.member_id,
            request.group_instance_id.as_deref(),
            request.generation_id,
        )
    } else {
        Err(ResponseError::InvalidGroupId)
    };
    HeartbeatResponse::default().with_error_code(code(outcome))
}

pub(crate) fn leave_group(
    state: &Arc<BrokerState>,
    request: LeaveGroupRequest,
    version: i16,
) -> LeaveGroupResponse {
    if !valid_group_id(&request.group_id) {
        return LeaveGroupResponse::default().with_error_code(ResponseError::InvalidGroupId.code());
    }
    let members: Vec<(String, Option<String>)> = if version >= 3 {
        request
            .members
            .iter()
            .map(|m| (m.member_id.to_string(), opt(m.group_instance_id.as_ref())))
            .collect()
    } else {
        vec![(request.member_id.to_string(), None)]
    };
    let codes = state.groups.leave(&request.group_id.0, &members);
    if version >= 3 {
        LeaveGroupResponse::default().with_members(
            members
                .iter()
                .zip(codes)
                .map(|((member, instance), outcome)| {
                    MemberResponse::default()
                        .with_member_id(text(member))
                        .with_group_instance_id(instance.as_deref().map(text))
                        .with_error_code(code(outcome))
                })
                .collect(),
        )
    } else {
        LeaveGroupResponse::default().with_error_code(codes.first().map_or(0, |o| code(*o)))
    }
}

pub(crate) fn list_groups(
    state: &Arc<BrokerState>,
    request: ListGroupsRequest,
) -> ListGroupsResponse {
    let wanted: Vec<String> = request
        .states_filter
        .iter()
        .map(|s| s.to_lowercase())
        .collect();
    let groups = state
        .groups
        .list()
        .into_iter()
        .filter(|(_, _, group_state)| {
            wanted.is_empty() || wanted.contains(&group_state.name().to_lowercase())
        })
        .map(|(id, protocol_type, group_state)| {
            ListedGroup::default()
                .with_group_id(GroupId(text(&id)))
                .with_protocol_type(text(&protocol_type))
                .with_group_state(text(group_state.name()))
                .with_group_type(text("classic"))
        })
        .collect();
    ListGroupsResponse::default().with_groups(groups)
}

pub(crate) fn describe_groups(
    state: &Arc<BrokerState>,
    request: DescribeGroupsRequest,
) -> DescribeGroupsResponse {
    let groups = request
        .groups
        .into_iter()
        .map(|group_id| {
            let described = DescribedGroup::default()
                .with_group_id(group_id.clone())
                .with_authorized_operations(i32::MIN);
            if !valid_group_id(&group_id) {
                return described.with_error_code(ResponseError::InvalidGroupId.code());
            }
            match state.groups.describe(&group_id.0) {
                // Kafka describes an unknown group as Dead, without an error.
                None => described.with_group_state(text("Dead")),
                Some(view) => described
                    .with_group_state(text(view.state.name()))
                    .with_protocol_type(text(&view.protocol_type))
                    .with_protocol_data(text(&view.protocol_name))
                    .with_members(
                        view.members
                            .into_iter()
                            .map(|m| {
                                DescribedGroupMember::default()
                                    .with_member_id(text(&m.member_id))
                                    .with_group_instance_id(
                                        m.group_instance_id.as_deref().map(text),
                                    )
                                    .with_client_id(text(&m.client_id))
                                    .with_client_host(text(&m.client_host))
                                    .with_member_metadata(m.metadata)
                                    .with_member_assignment(m.assignment)
                            })
                            .collect(),
                    ),
            }
        })
        .collect();
    DescribeGroupsResponse::default().with_groups(groups)
}

pub(crate) fn delete_groups(state: &Arc<BrokerState>, request: DeleteGroupsRequest) -> Reply {
    let state = Arc::clone(state);
    Reply::Later(Box::pin(async move {
        let mut results = Vec::new();
        for group_id in request.groups_names {
            let outcome = if valid_group_id(&group_id) {
                state.groups.delete(&group_id.0).await
            } else {
                Err(ResponseError::InvalidGroupId)
            };
            results.push(
                DeletableGroupResult::default()
                    .with_group_id(group_id)
                    .with_error_code(code(outcome)),
            );
        }
        ResponseKind::DeleteGroups(DeleteGroupsResponse::default().with_results(results))
    }))
}
