//! Simple ACLs: a SASL user may be limited to some topics and some groups (the users file's
//! `topics` and `groups`, each a name, a prefix ending in `*`, or `*`).
//!
//! What a limited user gets, as Kafka answers it:
//! - Produce, Fetch, ListOffsets, CreateTopics, DeleteTopics, OffsetCommit: the topics it may
//!   not use are taken out of the request and answered `TOPIC_AUTHORIZATION_FAILED` (29);
//!   the rest is served. A Produce with `acks=0` that names such a topic closes the connection
//!   instead (there is no answer to carry the error, and the records must not vanish quietly).
//! - Metadata: named topics it may not use are answered 29 (and never auto-created); a request
//!   for every topic lists only the ones it may use.
//! - Group requests for a group it may not use: `GROUP_AUTHORIZATION_FAILED` (30). ListGroups
//!   lists only its groups; OffsetFetch leaves out topics it may not use.
//! - Other APIs that name topics or transactions (configs, partitions, records deletion, log
//!   dirs, producers, transactions): closed, with the reason logged. A limited user has no
//!   business there, and a wrong answer would be worse than none. An idempotent
//!   InitProducerId (no transactional id) is served.
//!
//! A user without `topics` or `groups` in the file may use every topic or group.
//!
//! References: Kafka's `AclAuthorizer` error codes (KIP-11), the Kafka protocol guide.

use kafka_protocol::messages::create_topics_response::CreatableTopicResult;
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::metadata_response::MetadataResponseTopic;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{
    CreateTopicsRequest, DeleteTopicsRequest, FetchRequest, ListOffsetsRequest, MetadataRequest,
    OffsetCommitRequest, ProduceRequest, ResponseKind, TopicName,
};

use crate::api::Reply;

/// `TOPIC_AUTHORIZATION_FAILED`.
pub(crate) const TOPIC_DENIED: i16 = 29;
/// `GROUP_AUTHORIZATION_FAILED`.
pub(crate) const GROUP_DENIED: i16 = 30;

/// What one user may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Permissions {
    /// The user.
    pub(crate) user: String,
    /// Topic patterns; `None`: every topic.
    pub(crate) topics: Option<Vec<String>>,
    /// Group patterns; `None`: every group.
    pub(crate) groups: Option<Vec<String>>,
}

fn matches(patterns: Option<&Vec<String>>, name: &str) -> bool {
    patterns.is_none_or(|patterns| {
        patterns.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => p == name,
        })
    })
}

impl Permissions {
    /// Whether the user may use `topic`.
    pub(crate) fn topic(&self, topic: &str) -> bool {
        matches(self.topics.as_ref(), topic)
    }

    /// Whether the user may use `group`.
    pub(crate) fn group(&self, group: &str) -> bool {
        matches(self.groups.as_ref(), group)
    }

    /// Whether the user is limited at all.
    pub(crate) fn limited(&self) -> bool {
        self.topics.is_some() || self.groups.is_some()
    }
}

/// Topics taken out of a request, with the partitions they named.
pub(crate) type Denied = Vec<(TopicName, Vec<i32>)>;

/// Keeps in `items` those `allowed` accepts and returns the others, in order.
pub(crate) fn split<T>(items: &mut Vec<T>, allowed: impl Fn(&T) -> bool) -> Vec<T> {
    let (kept, taken) = std::mem::take(items)
        .into_iter()
        .partition(|item| allowed(item));
    *items = kept;
    taken
}

/// Applies `add` to the response a reply will carry (now or later).
pub(crate) fn amend(reply: Reply, add: impl FnOnce(&mut ResponseKind) + Send + 'static) -> Reply {
    match reply {
        Reply::Now(mut response) => {
            add(&mut response);
            Reply::Now(response)
        }
        Reply::Later(future) => Reply::Later(Box::pin(async move {
            let mut response = future.await;
            add(&mut response);
            response
        })),
        other => other,
    }
}

/// Takes the topics `access` may not produce to out of `request`.
pub(crate) fn take_produce(access: &Permissions, request: &mut ProduceRequest) -> Denied {
    split(&mut request.topic_data, |t| access.topic(&t.name))
        .into_iter()
        .map(|t| (t.name, t.partition_data.iter().map(|p| p.index).collect()))
        .collect()
}

/// Adds the denied topics to a Produce response.
pub(crate) fn deny_produce(response: &mut ResponseKind, denied: Denied) {
    let ResponseKind::Produce(response) = response else {
        return;
    };
    for (name, partitions) in denied {
        response.responses.push(
            TopicProduceResponse::default()
                .with_name(name)
                .with_partition_responses(
                    partitions
                        .into_iter()
                        .map(|index| {
                            PartitionProduceResponse::default()
                                .with_index(index)
                                .with_error_code(TOPIC_DENIED)
                                .with_base_offset(-1)
                                .with_log_append_time_ms(-1)
                                .with_log_start_offset(-1)
                        })
                        .collect(),
                ),
        );
    }
}

/// Takes the topics `access` may not read out of a Fetch request.
pub(crate) fn take_fetch(access: &Permissions, request: &mut FetchRequest) -> Denied {
    split(&mut request.topics, |t| access.topic(&t.topic))
        .into_iter()
        .map(|t| (t.topic, t.partitions.iter().map(|p| p.partition).collect()))
        .collect()
}

/// Adds the denied topics to a Fetch response.
pub(crate) fn deny_fetch(response: &mut ResponseKind, denied: Denied) {
    let ResponseKind::Fetch(response) = response else {
        return;
    };
    for (topic, partitions) in denied {
        response.responses.push(
            FetchableTopicResponse::default()
                .with_topic(topic)
                .with_partitions(
                    partitions
                        .into_iter()
                        .map(|partition| {
                            PartitionData::default()
                                .with_partition_index(partition)
                                .with_error_code(TOPIC_DENIED)
                                .with_high_watermark(-1)
                                .with_last_stable_offset(-1)
                                .with_log_start_offset(-1)
                                .with_preferred_read_replica((-1).into())
                        })
                        .collect(),
                ),
        );
    }
}

/// Takes the topics `access` may not use out of a ListOffsets request.
pub(crate) fn take_list_offsets(access: &Permissions, request: &mut ListOffsetsRequest) -> Denied {
    split(&mut request.topics, |t| access.topic(&t.name))
        .into_iter()
        .map(|t| {
            (
                t.name,
                t.partitions.iter().map(|p| p.partition_index).collect(),
            )
        })
        .collect()
}

/// Adds the denied topics to a ListOffsets response.
pub(crate) fn deny_list_offsets(response: &mut ResponseKind, denied: Denied) {
    let ResponseKind::ListOffsets(response) = response else {
        return;
    };
    for (name, partitions) in denied {
        response.topics.push(
            ListOffsetsTopicResponse::default()
                .with_name(name)
                .with_partitions(
                    partitions
                        .into_iter()
                        .map(|partition| {
                            ListOffsetsPartitionResponse::default()
                                .with_partition_index(partition)
                                .with_error_code(TOPIC_DENIED)
                                .with_timestamp(-1)
                                .with_offset(-1)
                                .with_leader_epoch(-1)
                        })
                        .collect(),
                ),
        );
    }
}

/// Takes named topics `access` may not see out of a Metadata request (so they are not
/// auto-created either). A request for every topic stays as it is (filtered afterwards).
pub(crate) fn take_metadata(access: &Permissions, request: &mut MetadataRequest) -> Denied {
    let Some(topics) = request.topics.take() else {
        return Vec::new();
    };
    let (allowed, denied): (Vec<_>, Vec<_>) = topics
        .into_iter()
        .partition(|t| t.name.as_ref().is_none_or(|n| access.topic(n)));
    request.topics = Some(allowed);
    denied
        .into_iter()
        .filter_map(|t| t.name.map(|n| (n, Vec::new())))
        .collect()
}

/// Filters a Metadata response to what `access` may see and adds the denied topics.
pub(crate) fn deny_metadata(response: &mut ResponseKind, access: &Permissions, denied: Denied) {
    let ResponseKind::Metadata(response) = response else {
        return;
    };
    response
        .topics
        .retain(|t| t.name.as_ref().is_none_or(|n| access.topic(n)));
    for (name, _) in denied {
        response.topics.push(
            MetadataResponseTopic::default()
                .with_name(Some(name))
                .with_error_code(TOPIC_DENIED),
        );
    }
}

/// Takes the topics `access` may not create out of a CreateTopics request.
pub(crate) fn take_create_topics(
    access: &Permissions,
    request: &mut CreateTopicsRequest,
) -> Denied {
    split(&mut request.topics, |t| access.topic(&t.name))
        .into_iter()
        .map(|t| (t.name, Vec::new()))
        .collect()
}

/// Adds the denied topics to a CreateTopics response.
pub(crate) fn deny_create_topics(response: &mut ResponseKind, denied: Denied) {
    let ResponseKind::CreateTopics(response) = response else {
        return;
    };
    for (name, _) in denied {
        response.topics.push(
            CreatableTopicResult::default()
                .with_name(name)
                .with_error_code(TOPIC_DENIED)
                .with_error_message(crate::api::message("Topic authorization failed."))
                .with_num_partitions(-1)
                .with_replication_factor(-1),
        );
    }
}

/// Takes the topics `access` may not delete out of a DeleteTopics request (by name; a
/// request by topic id alone is kept only for users without topic limits).
pub(crate) fn take_delete_topics(
    access: &Permissions,
    request: &mut DeleteTopicsRequest,
) -> Denied {
    let mut denied = Vec::new();
    request.topic_names.retain(|name| {
        let ok = access.topic(name);
        if !ok {
            denied.push((name.clone(), Vec::new()));
        }
        ok
    });
    let limited = access.topics.is_some();
    request.topics.retain(|t| match &t.name {
        Some(name) if !access.topic(name) => {
            denied.push((name.clone(), Vec::new()));
            false
        }
        Some(_) => true,
        None => !limited,
    });
    denied
}

/// Adds the denied topics to a DeleteTopics response.
pub(crate) fn deny_delete_topics(response: &mut ResponseKind, denied: Denied) {
    let ResponseKind::DeleteTopics(response) = response else {
        return;
    };
    for (name, _) in denied {
        response.responses.push(
            DeletableTopicResult::default()
                .with_name(Some(name))
                .with_error_code(TOPIC_DENIED),
        );
    }
}

/// Takes the topics `access` may not commit offsets for out of an OffsetCommit request.
pub(crate) fn take_offset_commit(
    access: &Permissions,
    request: &mut OffsetCommitRequest,
) -> Denied {
    split(&mut request.topics, |t| access.topic(&t.name))
        .into_iter()
        .map(|t| {
            (
                t.name,
                t.partitions.iter().map(|p| p.partition_index).collect(),
            )
        })
        .collect()
}

/// Adds the denied topics (or, with `code` = 30, every partition) to an OffsetCommit
/// response.
pub(crate) fn deny_offset_commit(response: &mut ResponseKind, denied: Denied, code: i16) {
    let ResponseKind::OffsetCommit(response) = response else {
        return;
    };
    for (name, partitions) in denied {
        response.topics.push(
            OffsetCommitResponseTopic::default()
                .with_name(name)
                .with_partitions(
                    partitions
                        .into_iter()
                        .map(|partition| {
                            OffsetCommitResponsePartition::default()
                                .with_partition_index(partition)
                                .with_error_code(code)
                        })
                        .collect(),
                ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(topics: Option<&[&str]>, groups: Option<&[&str]>) -> Permissions {
        let list = |l: Option<&[&str]>| l.map(|l| l.iter().map(|s| s.to_string()).collect());
        Permissions {
            user: "u".into(),
            topics: list(topics),
            groups: list(groups),
        }
    }

    #[test]
    fn names_prefixes_and_everything() {
        let limited = user(Some(&["orders", "pay-*"]), Some(&["billing"]));
        assert!(limited.topic("orders"));
        assert!(!limited.topic("orders2"));
        assert!(limited.topic("pay-eu"));
        assert!(!limited.topic("payroll"));
        assert!(limited.group("billing"));
        assert!(!limited.group("other"));
        let all = user(Some(&["*"]), None);
        assert!(all.topic("anything") && all.group("anything"));
        assert!(all.limited());
        assert!(!user(None, None).limited());
        let none = user(Some(&[]), Some(&[]));
        assert!(!none.topic("orders") && !none.group("billing"));
    }
}
