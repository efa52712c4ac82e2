//! Metadata (key 3): brokers, cluster id, controller, and topics with their partitions.
//!
//! This node is the only broker, the controller, and the leader (epoch 0) and only replica of
//! every partition. A requested topic that does not exist is created when
//! `auto.create.topics.enable` is on and the client allows it (v4+ `allow_auto_topic_creation`);
//! creation is synchronous, so the answer describes the new topic at once.
//!
//! References: Kafka protocol guide (Metadata), KIP-516 (topic ids in v10+).

use std::collections::BTreeMap;

use kafka_protocol::ResponseError;
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{BrokerId, MetadataRequest, MetadataResponse, TopicName};
use kafka_protocol::protocol::StrBytes;
use uuid::Uuid;

use crate::broker::BrokerState;
use crate::catalog::Topic;

pub(crate) fn handle(
    state: &BrokerState,
    request: MetadataRequest,
    version: i16,
) -> MetadataResponse {
    let node = BrokerId(state.config.node_id);
    let broker = MetadataResponseBroker::default()
        .with_node_id(node)
        .with_host(StrBytes::from_string(state.advertised.0.clone()))
        .with_port(state.advertised.1);
    // v0: an empty list means every topic; v1+: null means every topic.
    let all_topics = match &request.topics {
        None => true,
        Some(topics) => version == 0 && topics.is_empty(),
    };
    let topics = if all_topics {
        state
            .catalog
            .topics()
            .iter()
            .map(|t| describe(t, node, version))
            .collect()
    } else {
        let may_create =
            state.config.auto_create_topics && (version < 4 || request.allow_auto_topic_creation);
        request
            .topics
            .unwrap_or_default()
            .into_iter()
            .map(|wanted| match wanted.name {
                Some(name) => lookup_or_create(state, &name, may_create, node, version),
                None => match state.catalog.topic_by_id(wanted.topic_id) {
                    Some(topic) => describe(&topic, node, version),
                    None => MetadataResponseTopic::default()
                        .with_topic_id(wanted.topic_id)
                        .with_name(None)
                        .with_error_code(ResponseError::UnknownTopicId.code()),
                },
            })
            .collect()
    };
    MetadataResponse::default()
        .with_brokers(vec![broker])
        .with_cluster_id(Some(StrBytes::from_string(
            state.catalog.cluster_id().to_string(),
        )))
        .with_controller_id(node)
        .with_topics(topics)
}

fn lookup_or_create(
    state: &BrokerState,
    name: &TopicName,
    may_create: bool,
    node: BrokerId,
    version: i16,
) -> MetadataResponseTopic {
    if let Some(topic) = state.catalog.topic(name) {
        return describe(&topic, node, version);
    }
    let failed = |code: ResponseError| {
        MetadataResponseTopic::default()
            .with_name(Some(name.clone()))
            .with_error_code(code.code())
    };
    if !may_create {
        return failed(ResponseError::UnknownTopicOrPartition);
    }
    let partitions = state.config.num_partitions;
    match state
        .catalog
        .create_topic(name, partitions, BTreeMap::new(), false, state.now_ms())
    {
        Ok(topic) => describe(&topic, node, version),
        // Another request created it in the meantime.
        Err(e) if e.code == ResponseError::TopicAlreadyExists => match state.catalog.topic(name) {
            Some(topic) => describe(&topic, node, version),
            None => failed(ResponseError::LeaderNotAvailable),
        },
        Err(e) => {
            tracing::info!(topic = %name.as_str(), error = %e, "auto-create refused");
            failed(e.code)
        }
    }
}

fn describe(topic: &Topic, node: BrokerId, version: i16) -> MetadataResponseTopic {
    let partitions = topic
        .partitions
        .iter()
        .map(|p| {
            MetadataResponsePartition::default()
                .with_partition_index(p.index)
                .with_leader_id(node)
                .with_leader_epoch(0)
                .with_replica_nodes(vec![node])
                .with_isr_nodes(vec![node])
        })
        .collect();
    let topic_id = if version >= 10 { topic.id } else { Uuid::nil() };
    MetadataResponseTopic::default()
        .with_name(Some(TopicName(StrBytes::from_string(topic.name.clone()))))
        .with_topic_id(topic_id)
        .with_is_internal(topic.name.starts_with("__"))
        .with_partitions(partitions)
}
