//! The group state machine driven by hand: time is a number, so no test sleeps.

use bytes::Bytes;
use kafka_protocol::ResponseError;

use super::*;

const SESSION: i32 = 10_000;
const REBALANCE: i32 = 30_000;

fn limits(initial_delay: i32) -> GroupLimits {
    GroupLimits {
        initial_rebalance_delay_ms: initial_delay,
        ..GroupLimits::default()
    }
}

fn join_params(member_id: &str, protocols: &[&str]) -> JoinParams {
    JoinParams {
        member_id: member_id.to_string(),
        group_instance_id: None,
        client_id: "client".into(),
        client_host: "/127.0.0.1".into(),
        session_timeout_ms: SESSION,
        rebalance_timeout_ms: REBALANCE,
        protocol_type: "consumer".into(),
        protocols: protocols
            .iter()
            .map(|p| ((*p).to_string(), Bytes::from(format!("meta-{p}"))))
            .collect(),
        require_known_member_id: false,
    }
}

fn static_params(instance: &str) -> JoinParams {
    JoinParams {
        group_instance_id: Some(instance.to_string()),
        ..join_params("", &["range"])
    }
}

fn joins(out: &[Completion]) -> Vec<(String, JoinResult)> {
    out.iter()
        .filter_map(|c| match c {
            Completion::Join(id, r) => Some((id.clone(), r.clone())),
            Completion::Sync(..) => None,
        })
        .collect()
}

fn syncs(out: &[Completion]) -> Vec<(String, SyncResult)> {
    out.iter()
        .filter_map(|c| match c {
            Completion::Sync(id, r) => Some((id.clone(), r.clone())),
            Completion::Join(..) => None,
        })
        .collect()
}

fn sync_params(member: &str, generation: i32, assignments: &[(&str, &str)]) -> SyncParams {
    SyncParams {
        member_id: member.to_string(),
        generation_id: generation,
        assignments: assignments
            .iter()
            .map(|(m, a)| ((*m).to_string(), Bytes::from((*a).to_string())))
            .collect(),
        ..SyncParams::default()
    }
}

/// When [`stable_group`]'s group becomes stable.
const T0: i64 = 1_000;

/// Forms a stable group of `n` dynamic members in generation 1, at time [`T0`] (all join
/// inside the initial delay); returns their ids, leader first.
fn stable_group(n: usize) -> (Group, Vec<String>) {
    let mut group = Group::new("g", limits(1_000), 0);
    let mut out = Vec::new();
    let mut ids = Vec::new();
    for i in 0..n {
        assert!(
            group
                .join(join_params("", &["range"]), &format!("m{i}"), 0, &mut out)
                .is_none()
        );
        ids.push(format!("client-m{i}"));
    }
    group.tick(T0, &mut out);
    assert_eq!(joins(&out).len(), n);
    assert_eq!(group.generation_id(), 1);
    assert_eq!(group.state(), GroupState::CompletingRebalance);
    let leader = group.leader().expect("leader").to_string();
    let assignments: Vec<(String, String)> = ids
        .iter()
        .map(|id| (id.clone(), format!("for-{id}")))
        .collect();
    let refs: Vec<(&str, &str)> = assignments
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    for id in ids.iter().filter(|id| **id != leader) {
        assert!(group.sync(sync_params(id, 1, &[]), T0, &mut out).is_none());
    }
    out.clear();
    assert!(
        group
            .sync(sync_params(&leader, 1, &refs), T0, &mut out)
            .is_none()
    );
    assert_eq!(syncs(&out).len(), n);
    assert_eq!(group.state(), GroupState::Stable);
    let mut ordered = vec![leader.clone()];
    ordered.extend(ids.into_iter().filter(|id| *id != leader));
    (group, ordered)
}

#[test]
fn new_members_get_member_id_required_then_join() {
    let mut group = Group::new("g", limits(0), 0);
    let mut out = Vec::new();
    let params = JoinParams {
        require_known_member_id: true,
        ..join_params("", &["range"])
    };
    let first = group
        .join(params.clone(), "a", 0, &mut out)
        .expect("answered now");
    assert_eq!(first.error, Some(ResponseError::MemberIdRequired));
    assert_eq!(first.member_id, "client-a");
    assert!(
        group
            .join(join_params("client-a", &["range"]), "b", 1, &mut out)
            .is_none()
    );
    let done = joins(&out);
    assert_eq!(done.len(), 1);
    let (id, result) = &done[0];
    assert_eq!(id, "client-a");
    assert_eq!(result.error, None);
    assert_eq!(result.generation_id, 1);
    assert_eq!(result.leader, "client-a");
    assert_eq!(result.protocol_name.as_deref(), Some("range"));
    assert_eq!(result.members.len(), 1, "the leader sees every member");
}

#[test]
fn pending_member_ids_expire_after_the_session_timeout() {
    let mut group = Group::new("g", limits(0), 0);
    let mut out = Vec::new();
    let params = JoinParams {
        require_known_member_id: true,
        ..join_params("", &["range"])
    };
    let id = group.join(params, "a", 0, &mut out).expect("now").member_id;
    group.tick(i64::from(SESSION), &mut out);
    let late = group
        .join(
            join_params(&id, &["range"]),
            "b",
            i64::from(SESSION) + 1,
            &mut out,
        )
        .expect("refused now");
    assert_eq!(late.error, Some(ResponseError::UnknownMemberId));
}

#[test]
fn the_initial_delay_collects_members_into_one_rebalance() {
    let mut group = Group::new("g", limits(3_000), 0);
    let mut out = Vec::new();
    assert!(
        group
            .join(join_params("", &["range"]), "a", 0, &mut out)
            .is_none()
    );
    assert!(
        group
            .join(join_params("", &["range"]), "b", 1_000, &mut out)
            .is_none()
    );
    group.tick(2_999, &mut out);
    assert!(out.is_empty(), "still inside the initial delay");
    group.tick(4_000, &mut out);
    let done = joins(&out);
    assert_eq!(done.len(), 2, "both answered by the same rebalance");
    assert!(done.iter().all(|(_, r)| r.generation_id == 1));
    assert_eq!(group.state(), GroupState::CompletingRebalance);
}

#[test]
fn a_join_during_a_rebalance_waits_for_the_other_members() {
    let (mut group, ids) = stable_group(2);
    let mut out = Vec::new();
    // A third member arrives: a rebalance starts; it completes only once all have rejoined.
    assert!(
        group
            .join(join_params("", &["range"]), "c", 10, &mut out)
            .is_none()
    );
    assert_eq!(group.state(), GroupState::PreparingRebalance);
    assert!(out.is_empty());
    assert_eq!(
        group.heartbeat(&ids[0], None, 1, 11),
        Err(ResponseError::RebalanceInProgress)
    );
    assert!(
        group
            .join(join_params(&ids[0], &["range"]), "x", 12, &mut out)
            .is_none()
    );
    assert!(out.is_empty(), "one member has not rejoined yet");
    assert!(
        group
            .join(join_params(&ids[1], &["range"]), "x", 13, &mut out)
            .is_none()
    );
    let done = joins(&out);
    assert_eq!(done.len(), 3);
    assert!(done.iter().all(|(_, r)| r.generation_id == 2));
    let leaders: Vec<_> = done.iter().filter(|(_, r)| !r.members.is_empty()).collect();
    assert_eq!(leaders.len(), 1, "exactly one member is told it leads");
    assert_eq!(leaders[0].0, ids[0], "the leader keeps its role");
}

#[test]
fn members_that_do_not_rejoin_are_dropped_at_the_rebalance_timeout() {
    let (mut group, ids) = stable_group(3);
    let mut out = Vec::new();
    let start = T0 + 100;
    assert!(
        group
            .join(
                join_params(&ids[0], &["range", "roundrobin"]),
                "x",
                start,
                &mut out
            )
            .is_none()
    );
    assert!(
        group
            .join(join_params(&ids[1], &["range"]), "x", start, &mut out)
            .is_none()
    );
    // ids[2] keeps heartbeating (told to rejoin each time) but never rejoins.
    let deadline = start + i64::from(REBALANCE);
    let mut now = start;
    while now < deadline {
        assert_eq!(
            group.heartbeat(&ids[2], None, 1, now),
            Err(ResponseError::RebalanceInProgress)
        );
        group.tick(now, &mut out);
        assert!(out.is_empty(), "completed early at {now}");
        now += 1_000;
    }
    group.tick(deadline, &mut out);
    let done = joins(&out);
    assert_eq!(done.len(), 2);
    assert!(!group.has_member(&ids[2]));
    assert_eq!(
        group.heartbeat(&ids[2], None, 1, deadline),
        Err(ResponseError::UnknownMemberId)
    );
}

#[test]
fn the_leader_leaving_mid_rebalance_hands_leadership_to_a_joined_member() {
    let (mut group, ids) = stable_group(3);
    let mut out = Vec::new();
    assert!(
        group
            .join(join_params("", &["range"]), "d", 5, &mut out)
            .is_none()
    );
    assert!(
        group
            .join(join_params(&ids[1], &["range"]), "x", 6, &mut out)
            .is_none()
    );
    assert!(
        group
            .join(join_params(&ids[2], &["range"]), "x", 6, &mut out)
            .is_none()
    );
    assert!(out.is_empty(), "the leader has not rejoined");
    assert_eq!(group.leave(&ids[0], None, 7, &mut out), Ok(()));
    let done = joins(&out);
    assert_eq!(done.len(), 3, "the leader's leave completes the join phase");
    let leader = group.leader().expect("a new leader").to_string();
    assert_ne!(leader, ids[0]);
    let told: Vec<_> = done.iter().filter(|(_, r)| !r.members.is_empty()).collect();
    assert_eq!(told.len(), 1);
    assert_eq!(told[0].0, leader);
    assert_eq!(told[0].1.members.len(), 3);
}

#[test]
fn the_leader_leaving_while_others_wait_in_sync_sends_them_back_to_join() {
    let mut group = Group::new("g", limits(0), 0);
    let mut out = Vec::new();
    assert!(
        group
            .join(join_params("", &["range"]), "a", 0, &mut out)
            .is_none()
    );
    assert!(
        group
            .join(join_params("", &["range"]), "b", 0, &mut out)
            .is_none()
    );
    assert!(
        group
            .join(join_params("client-a", &["range"]), "x", 0, &mut out)
            .is_none()
    );
    let generation = group.generation_id();
    let leader = group.leader().expect("leader").to_string();
    let other = if leader == "client-a" {
        "client-b"
    } else {
        "client-a"
    };
    out.clear();
    assert!(
        group
            .sync(sync_params(other, generation, &[]), 1, &mut out)
            .is_none()
    );
    assert_eq!(group.leave(&leader, None, 2, &mut out), Ok(()));
    let answered = syncs(&out);
    assert_eq!(answered.len(), 1);
    assert_eq!(
        answered[0].1.error,
        Some(ResponseError::RebalanceInProgress)
    );
}

#[test]
fn silent_members_expire_after_the_session_timeout_and_trigger_a_rebalance() {
    let (mut group, ids) = stable_group(2);
    let mut out = Vec::new();
    let t = T0 + i64::from(SESSION) - 1;
    assert_eq!(group.heartbeat(&ids[0], None, 1, t), Ok(()));
    group.tick(t, &mut out);
    assert!(
        group.has_member(&ids[1]),
        "not silent for a whole session yet"
    );
    group.tick(t + 1, &mut out);
    assert!(!group.has_member(&ids[1]), "silent for a whole session");
    assert!(group.has_member(&ids[0]), "heartbeated in time");
    assert_eq!(group.state(), GroupState::PreparingRebalance);
    assert_eq!(
        group.heartbeat(&ids[0], None, 1, t + 2),
        Err(ResponseError::RebalanceInProgress)
    );
    assert!(
        group
            .join(join_params(&ids[0], &["range"]), "x", t + 3, &mut out)
            .is_none()
    );
    assert_eq!(joins(&out).len(), 1);
    assert_eq!(group.generation_id(), 2);
}

#[test]
fn a_commit_from_an_older_generation_is_rejected() {
    let (mut group, ids) = stable_group(2);
    assert_eq!(group.validate_commit(&ids[1], None, 1, 5), Ok(()));
    let mut out = Vec::new();
    assert!(
        group
            .join(join_params("", &["range"]), "z", 10, &mut out)
            .is_none()
    );
    // During PreparingRebalance members of the current generation may still commit (what
    // consumers do when their partitions are revoked).
    assert_eq!(group.validate_commit(&ids[1], None, 1, 11), Ok(()));
    for id in &ids {
        let _ = group.join(join_params(id, &["range"]), "x", 12, &mut out);
    }
    assert_eq!(group.generation_id(), 2);
    assert_eq!(
        group.validate_commit(&ids[1], None, 2, 13),
        Err(ResponseError::RebalanceInProgress),
        "no commits between join and sync"
    );
    assert_eq!(
        group.validate_commit(&ids[1], None, 1, 13),
        Err(ResponseError::IllegalGeneration),
        "a zombie from generation 1"
    );
    assert_eq!(
        group.validate_commit("client-gone", None, 2, 13),
        Err(ResponseError::UnknownMemberId)
    );
    assert_eq!(
        group.validate_commit("", None, -1, 13),
        Err(ResponseError::UnknownMemberId),
        "standalone commits only to an empty group"
    );
}

#[test]
fn a_restarted_static_member_rejoins_without_a_rebalance() {
    let mut group = Group::new("g", limits(0), 0);
    let mut out = Vec::new();
    assert!(
        group
            .join(static_params("host-1"), "a", 0, &mut out)
            .is_none()
    );
    assert!(
        group
            .join(static_params("host-2"), "b", 0, &mut out)
            .is_none()
    );
    assert!(
        group
            .join(
                JoinParams {
                    member_id: "host-1-a".into(),
                    ..static_params("host-1")
                },
                "x",
                0,
                &mut out
            )
            .is_none()
    );
    let generation = group.generation_id();
    let leader = group.leader().expect("leader").to_string();
    let follower = if leader == "host-1-a" {
        "host-2-b"
    } else {
        "host-1-a"
    };
    let follower_instance = if follower == "host-1-a" {
        "host-1"
    } else {
        "host-2"
    };
    out.clear();
    assert!(
        group
            .sync(
                SyncParams {
                    group_instance_id: Some(follower_instance.into()),
                    ..sync_params(follower, generation, &[])
                },
                1,
                &mut out
            )
            .is_none()
    );
    assert!(
        group
            .sync(
                SyncParams {
                    group_instance_id: Some(
                        if follower_instance == "host-1" {
                            "host-2"
                        } else {
                            "host-1"
                        }
                        .into()
                    ),
                    ..sync_params(
                        &leader,
                        generation,
                        &[(follower, "old-assignment"), (&leader, "lead")]
                    )
                },
                1,
                &mut out
            )
            .is_none()
    );
    assert_eq!(group.state(), GroupState::Stable);

    // The follower restarts: same instance id, no member id.
    out.clear();
    let rejoined = group
        .join(static_params(follower_instance), "new", 100, &mut out)
        .expect("answered at once, no rebalance");
    assert_eq!(rejoined.error, None);
    assert_eq!(rejoined.generation_id, generation, "same generation");
    assert_eq!(group.state(), GroupState::Stable);
    let new_id = rejoined.member_id.clone();
    assert_ne!(new_id, follower);
    let assignment = group
        .sync(
            SyncParams {
                group_instance_id: Some(follower_instance.into()),
                ..sync_params(&new_id, generation, &[])
            },
            101,
            &mut out,
        )
        .expect("stable: answered now");
    assert_eq!(assignment.assignment, Bytes::from("old-assignment"));
    // The old incarnation is fenced.
    assert_eq!(
        group.heartbeat(follower, Some(follower_instance), generation, 102),
        Err(ResponseError::FencedInstanceId)
    );
    assert_eq!(
        group.validate_commit(follower, Some(follower_instance), generation, 102),
        Err(ResponseError::FencedInstanceId)
    );
}

#[test]
fn protocol_selection_picks_one_every_member_supports() {
    let mut group = Group::new("g", limits(0), 0);
    let mut out = Vec::new();
    assert!(
        group
            .join(
                join_params("", &["cooperative-sticky", "range"]),
                "a",
                0,
                &mut out
            )
            .is_none()
    );
    assert!(
        group
            .join(join_params("", &["range", "roundrobin"]), "b", 0, &mut out)
            .is_none()
    );
    assert!(
        group
            .join(
                join_params("client-a", &["cooperative-sticky", "range"]),
                "x",
                0,
                &mut out
            )
            .is_none()
    );
    assert_eq!(group.protocol_name(), Some("range"));
    let refused = group
        .join(join_params("", &["roundrobin"]), "c", 1, &mut out)
        .expect("now");
    assert_eq!(
        refused.error,
        Some(ResponseError::InconsistentGroupProtocol)
    );
    let wrong_type = group
        .join(
            JoinParams {
                protocol_type: "connect".into(),
                ..join_params("", &["range"])
            },
            "d",
            1,
            &mut out,
        )
        .expect("now");
    assert_eq!(
        wrong_type.error,
        Some(ResponseError::InconsistentGroupProtocol)
    );
}

#[test]
fn a_lost_join_answer_is_given_again_and_stale_syncs_are_refused() {
    let (mut group, ids) = stable_group(2);
    let mut out = Vec::new();
    // A follower re-sending its JoinGroup with the same protocols gets the same generation.
    let again = group
        .join(join_params(&ids[1], &["range"]), "x", 5, &mut out)
        .expect("answered now");
    assert_eq!(again.generation_id, 1);
    assert_eq!(group.state(), GroupState::Stable);
    let stale = group
        .sync(sync_params(&ids[1], 0, &[]), 6, &mut out)
        .expect("now");
    assert_eq!(stale.error, Some(ResponseError::IllegalGeneration));
    // A changed subscription (new protocol metadata) triggers a rebalance.
    let mut changed = join_params(&ids[1], &["range"]);
    changed.protocols[0].1 = Bytes::from_static(b"new topics");
    assert!(group.join(changed, "x", 7, &mut out).is_none());
    assert_eq!(group.state(), GroupState::PreparingRebalance);
}

#[test]
fn the_last_member_leaving_empties_the_group_and_bad_session_timeouts_are_refused() {
    let (mut group, ids) = stable_group(1);
    let mut out = Vec::new();
    assert_eq!(group.leave(&ids[0], None, 50, &mut out), Ok(()));
    assert_eq!(group.state(), GroupState::Empty);
    assert_eq!(group.empty_since_ms(), 50);
    assert_eq!(
        group.leave(&ids[0], None, 51, &mut out),
        Err(ResponseError::UnknownMemberId)
    );
    let too_short = group
        .join(
            JoinParams {
                session_timeout_ms: 10,
                ..join_params("", &["range"])
            },
            "q",
            60,
            &mut out,
        )
        .expect("now");
    assert_eq!(too_short.error, Some(ResponseError::InvalidSessionTimeout));
    assert_eq!(group.validate_commit("", None, -1, 61), Ok(()));
}
