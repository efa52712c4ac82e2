//! The admin API: topics, consumer groups, their committed offsets and lag, and producers,
//! against any Kafka-protocol cluster (semel-broker, Apache Kafka). The `semel` command-line
//! tool is built on it.
//!
//! Each call goes where Kafka's own AdminClient sends it: topic changes to any broker (the
//! controller forwards them), group calls to the group's coordinator (FindCoordinator), offset
//! and producer queries to each partition's leader, ListGroups to every broker.
//!
//! References: Kafka protocol guide (CreateTopics, DeleteTopics, Metadata, ListOffsets,
//! ListGroups, DescribeGroups, OffsetFetch, OffsetCommit, DescribeProducers, FindCoordinator);
//! the Java `Admin` interface for names and semantics; `kafka-consumer-groups.sh` for lag.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
use kafka_protocol::messages::delete_topics_request::DeleteTopicState;
use kafka_protocol::messages::describe_producers_request::TopicRequest;
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::{
    ApiKey, ConsumerProtocolAssignment, CreateTopicsRequest, DeleteTopicsRequest,
    DescribeGroupsRequest, DescribeProducersRequest, FindCoordinatorRequest, GroupId,
    ListGroupsRequest, ListOffsetsRequest, OffsetCommitRequest, OffsetFetchRequest, TopicName,
};
use kafka_protocol::protocol::{Decodable, StrBytes};

use crate::cluster::{ClientConfig, Cluster};
use crate::connection::Connection;
use crate::error::{ClientError, check_code};

/// A topic partition.
pub type TopicPartition = (String, i32);

/// A topic to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTopic {
    /// Its name.
    pub name: String,
    /// Partitions (-1: the broker's `num.partitions`).
    pub partitions: i32,
    /// Replication factor (-1: the broker's default).
    pub replication_factor: i16,
    /// Topic configs (`retention.ms`, ...).
    pub configs: BTreeMap<String, String>,
}

/// Which offset of a partition [`Admin::list_offsets`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetSpec {
    /// The log start offset.
    Earliest,
    /// The log end offset (high watermark).
    Latest,
    /// The first offset whose timestamp is at least this (ms); the end offset if none.
    Timestamp(i64),
}

/// A consumer group as ListGroups names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupListing {
    /// `group.id`.
    pub group_id: String,
    /// `consumer` for consumer groups.
    pub protocol_type: String,
    /// `Stable`, `Empty`, ... (empty when the broker does not say).
    pub state: String,
}

/// One member of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberDescription {
    /// The member id the coordinator gave.
    pub member_id: String,
    /// `group.instance.id` of a static member.
    pub group_instance_id: Option<String>,
    /// `client.id`.
    pub client_id: String,
    /// The member's host as the coordinator saw it.
    pub host: String,
    /// The partitions assigned to it (decoded from its consumer-protocol assignment).
    pub assignment: Vec<TopicPartition>,
}

/// A group as DescribeGroups answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDescription {
    /// `group.id`.
    pub group_id: String,
    /// `Stable`, `Empty`, `PreparingRebalance`, `CompletingRebalance`, `Dead`.
    pub state: String,
    /// The assignor chosen (`range`, `cooperative-sticky`, ...).
    pub protocol: String,
    /// Its members.
    pub members: Vec<MemberDescription>,
}

/// A partition's committed offset, end offset and lag for one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// The group's committed offset (`None`: nothing committed).
    pub committed: Option<i64>,
    /// The partition's log end offset.
    pub end: i64,
    /// `end - committed` (`None` without a committed offset).
    pub lag: Option<i64>,
    /// The member it is assigned to now, if any.
    pub owner: Option<String>,
    /// That member's `client.id`.
    pub client_id: Option<String>,
}

/// A producer's state on a partition (DescribeProducers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerDescription {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Producer id.
    pub producer_id: i64,
    /// Producer epoch.
    pub producer_epoch: i32,
    /// The last sequence number written.
    pub last_sequence: i32,
    /// The last write's timestamp (ms).
    pub last_timestamp: i64,
    /// The first offset of its open transaction (-1: none).
    pub current_txn_start_offset: i64,
}

/// An admin client. Cheap to share.
#[derive(Debug, Clone)]
pub struct Admin {
    cluster: Arc<Cluster>,
}

fn name(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

fn broker_error(api: ApiKey, code: i16, message: Option<&StrBytes>) -> Result<(), ClientError> {
    check_code(code).map_err(|code| ClientError::Broker {
        api,
        code,
        message: message.map(ToString::to_string),
    })
}

impl Admin {
    /// Connects to the cluster (`config.bootstrap_servers`, with its security settings).
    ///
    /// # Errors
    /// `NoBrokerReachable`, `Authentication`.
    pub async fn connect(config: ClientConfig) -> Result<Self, ClientError> {
        Ok(Self {
            cluster: Arc::new(Cluster::connect(config).await?),
        })
    }

    /// An admin client over an existing cluster connection.
    pub fn from_cluster(cluster: Arc<Cluster>) -> Self {
        Self { cluster }
    }

    /// The cluster connection (metadata cache, pooled connections).
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// Grows `topic` to `count` partitions (CreatePartitions).
    ///
    /// # Errors
    /// The broker's refusal (`INVALID_PARTITIONS` when it already has that many or more), or
    /// a request that failed.
    pub async fn create_partitions(&self, topic: &str, count: i32) -> Result<(), ClientError> {
        use kafka_protocol::messages::CreatePartitionsRequest;
        use kafka_protocol::messages::create_partitions_request::CreatePartitionsTopic;
        let request = CreatePartitionsRequest::default()
            .with_timeout_ms(30_000)
            .with_topics(vec![
                CreatePartitionsTopic::default()
                    .with_name(TopicName(name(topic)))
                    .with_count(count),
            ]);
        let response = self.cluster.any().await?.send(&request, (0, 3)).await?;
        for result in &response.results {
            broker_error(
                ApiKey::CreatePartitions,
                result.error_code,
                result.error_message.as_ref(),
            )?;
        }
        Ok(())
    }

    /// Creates `topics`; each result in order (`TOPIC_ALREADY_EXISTS` included, as Kafka
    /// answers it).
    ///
    /// # Errors
    /// The request failed as a whole (no broker, a broken connection).
    pub async fn create_topics(
        &self,
        topics: &[NewTopic],
    ) -> Result<Vec<(String, Result<(), ClientError>)>, ClientError> {
        let request = CreateTopicsRequest::default()
            .with_timeout_ms(30_000)
            .with_topics(
                topics
                    .iter()
                    .map(|t| {
                        CreatableTopic::default()
                            .with_name(TopicName(name(&t.name)))
                            .with_num_partitions(t.partitions)
                            .with_replication_factor(t.replication_factor)
                            .with_configs(
                                t.configs
                                    .iter()
                                    .map(|(k, v)| {
                                        CreatableTopicConfig::default()
                                            .with_name(name(k))
                                            .with_value(Some(name(v)))
                                    })
                                    .collect(),
                            )
                    })
                    .collect(),
            );
        let response = self.cluster.any().await?.send(&request, (2, 7)).await?;
        Ok(response
            .topics
            .iter()
            .map(|t| {
                let result =
                    broker_error(ApiKey::CreateTopics, t.error_code, t.error_message.as_ref());
                (t.name.0.to_string(), result)
            })
            .collect())
    }

    /// Deletes `topics`; each result in order.
    ///
    /// # Errors
    /// The request failed as a whole.
    pub async fn delete_topics(
        &self,
        topics: &[&str],
    ) -> Result<Vec<(String, Result<(), ClientError>)>, ClientError> {
        let connection = self.cluster.any().await?;
        let version = connection.version(ApiKey::DeleteTopics, (1, 6))?;
        let request = if version >= 6 {
            DeleteTopicsRequest::default().with_topics(
                topics
                    .iter()
                    .map(|t| DeleteTopicState::default().with_name(Some(TopicName(name(t)))))
                    .collect(),
            )
        } else {
            DeleteTopicsRequest::default()
                .with_topic_names(topics.iter().map(|t| TopicName(name(t))).collect())
        }
        .with_timeout_ms(30_000);
        let response = connection.send_version(&request, version).await?;
        Ok(response
            .responses
            .iter()
            .map(|r| {
                let topic = r.name.as_ref().map(|n| n.0.to_string()).unwrap_or_default();
                let result =
                    broker_error(ApiKey::DeleteTopics, r.error_code, r.error_message.as_ref());
                (topic, result)
            })
            .collect())
    }

    /// Every topic and its partition count, by name; internal topics (`__*`) left out.
    ///
    /// # Errors
    /// Metadata failed.
    pub async fn list_topics(&self) -> Result<BTreeMap<String, usize>, ClientError> {
        self.cluster.refresh_metadata(None, false).await?;
        Ok(self
            .cluster
            .topic_names()
            .into_iter()
            .filter(|t| !t.starts_with("__"))
            .filter_map(|t| {
                let info = self.cluster.topic(&t)?;
                info.error.is_none().then_some((t, info.partitions.len()))
            })
            .collect())
    }

    /// The partitions of `topic` and each one's leader.
    ///
    /// # Errors
    /// `UNKNOWN_TOPIC_OR_PARTITION` as a `Broker` error; Metadata failed.
    pub async fn describe_topic(&self, topic: &str) -> Result<Vec<(i32, i32)>, ClientError> {
        self.cluster
            .refresh_metadata(Some(&[topic.to_string()]), false)
            .await?;
        let info = self
            .cluster
            .topic(topic)
            .ok_or_else(|| ClientError::Metadata(format!("no metadata for {topic}")))?;
        if let Some(code) = info.error {
            return Err(ClientError::Broker {
                api: ApiKey::Metadata,
                code,
                message: Some(topic.to_string()),
            });
        }
        Ok(info
            .partitions
            .iter()
            .map(|p| (p.partition, p.leader))
            .collect())
    }

    /// The offset `spec` names for each partition, asked of each partition's leader.
    ///
    /// # Errors
    /// A partition's error, or a request that failed.
    pub async fn list_offsets(
        &self,
        partitions: &[TopicPartition],
        spec: OffsetSpec,
    ) -> Result<BTreeMap<TopicPartition, i64>, ClientError> {
        let timestamp = match spec {
            OffsetSpec::Earliest => -2,
            OffsetSpec::Latest => -1,
            OffsetSpec::Timestamp(ms) => ms,
        };
        let mut offsets = self.query_offsets(partitions, timestamp).await?;
        // No record at or after the time: the end, as Kafka's tools reset.
        let past_the_end: Vec<TopicPartition> = offsets
            .iter()
            .filter(|(_, offset)| **offset < 0)
            .map(|(tp, _)| tp.clone())
            .collect();
        if !past_the_end.is_empty() {
            offsets.extend(self.query_offsets(&past_the_end, -1).await?);
        }
        Ok(offsets)
    }

    /// ListOffsets at `timestamp` (-2 earliest, -1 latest) for each partition, per leader.
    async fn query_offsets(
        &self,
        partitions: &[TopicPartition],
        timestamp: i64,
    ) -> Result<BTreeMap<TopicPartition, i64>, ClientError> {
        let by_leader = self.by_leader(partitions).await?;
        let mut out = BTreeMap::new();
        for (leader, topics) in by_leader {
            let request = ListOffsetsRequest::default()
                .with_replica_id((-1).into())
                .with_topics(
                    topics
                        .iter()
                        .map(|(topic, partitions)| {
                            ListOffsetsTopic::default()
                                .with_name(TopicName(name(topic)))
                                .with_partitions(
                                    partitions
                                        .iter()
                                        .map(|p| {
                                            ListOffsetsPartition::default()
                                                .with_partition_index(*p)
                                                .with_timestamp(timestamp)
                                        })
                                        .collect(),
                                )
                        })
                        .collect(),
                );
            let response = self
                .cluster
                .node(leader)
                .await?
                .send(&request, (1, 7))
                .await?;
            for topic in response.topics {
                for p in topic.partitions {
                    broker_error(ApiKey::ListOffsets, p.error_code, None)?;
                    out.insert((topic.name.0.to_string(), p.partition_index), p.offset);
                }
            }
        }
        Ok(out)
    }

    /// `partitions` grouped by their leader's node id, then by topic (metadata refreshed).
    async fn by_leader(
        &self,
        partitions: &[TopicPartition],
    ) -> Result<BTreeMap<i32, BTreeMap<String, Vec<i32>>>, ClientError> {
        let topics: BTreeSet<String> = partitions.iter().map(|(t, _)| t.clone()).collect();
        let topics: Vec<String> = topics.into_iter().collect();
        self.cluster.refresh_metadata(Some(&topics), false).await?;
        let mut by_leader: BTreeMap<i32, BTreeMap<String, Vec<i32>>> = BTreeMap::new();
        for (topic, partition) in partitions {
            let leader = self.cluster.leader(topic, *partition).ok_or_else(|| {
                ClientError::Metadata(format!("no leader for {topic}-{partition}"))
            })?;
            by_leader
                .entry(leader)
                .or_default()
                .entry(topic.clone())
                .or_default()
                .push(*partition);
        }
        Ok(by_leader)
    }

    /// Every group, asked of every broker (each lists the groups it coordinates).
    ///
    /// # Errors
    /// A broker's error, or a request that failed.
    pub async fn list_groups(&self) -> Result<Vec<GroupListing>, ClientError> {
        self.cluster.refresh_metadata(Some(&[]), false).await?;
        let mut out = BTreeMap::new();
        for node in self.cluster.node_ids() {
            let connection = self.cluster.node(node).await?;
            let response = connection
                .send(&ListGroupsRequest::default(), (0, 4))
                .await?;
            broker_error(ApiKey::ListGroups, response.error_code, None)?;
            for g in response.groups {
                out.insert(
                    g.group_id.0.to_string(),
                    GroupListing {
                        group_id: g.group_id.0.to_string(),
                        protocol_type: g.protocol_type.to_string(),
                        state: g.group_state.to_string(),
                    },
                );
            }
        }
        Ok(out.into_values().collect())
    }

    /// The coordinator of `group` (FindCoordinator).
    async fn coordinator(&self, group: &str) -> Result<Arc<Connection>, ClientError> {
        let any = self.cluster.any().await?;
        let version = any.version(ApiKey::FindCoordinator, (0, 4))?;
        let request = if version >= 4 {
            FindCoordinatorRequest::default().with_coordinator_keys(vec![name(group)])
        } else {
            FindCoordinatorRequest::default().with_key(name(group))
        };
        let response = any.send_version(&request, version).await?;
        let (code, message, host, port) = match response.coordinators.first() {
            Some(c) if version >= 4 => (
                c.error_code,
                c.error_message.clone(),
                c.host.clone(),
                c.port,
            ),
            _ => (
                response.error_code,
                response.error_message.clone(),
                response.host.clone(),
                response.port,
            ),
        };
        broker_error(ApiKey::FindCoordinator, code, message.as_ref())?;
        self.cluster.connection(&format!("{host}:{port}")).await
    }

    /// The configs of `topic` (DescribeConfigs): name → (value, source), where source is
    /// Kafka's `config_source` (1 = set on the topic, 5 = the broker's default, ...). Sensitive
    /// values come back as `None`.
    ///
    /// # Errors
    /// The topic's error (`UNKNOWN_TOPIC_OR_PARTITION`), or a request that failed.
    pub async fn describe_topic_configs(
        &self,
        topic: &str,
    ) -> Result<BTreeMap<String, (Option<String>, i8)>, ClientError> {
        use kafka_protocol::messages::DescribeConfigsRequest;
        use kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
        let request = DescribeConfigsRequest::default().with_resources(vec![
            DescribeConfigsResource::default()
                .with_resource_type(2)
                .with_resource_name(name(topic))
                .with_configuration_keys(None),
        ]);
        let response = self.cluster.any().await?.send(&request, (1, 4)).await?;
        let mut out = BTreeMap::new();
        for result in response.results {
            broker_error(
                ApiKey::DescribeConfigs,
                result.error_code,
                result.error_message.as_ref(),
            )?;
            for config in result.configs {
                out.insert(
                    config.name.to_string(),
                    (config.value.map(|v| v.to_string()), config.config_source),
                );
            }
        }
        Ok(out)
    }

    /// Sets and removes configs of `topic` (IncrementalAlterConfigs, as `kafka-configs
    /// --alter --add-config/--delete-config`); what is not named keeps its value.
    ///
    /// # Errors
    /// The broker's refusal (`INVALID_CONFIG` naming the key), or a request that failed.
    pub async fn alter_topic_configs(
        &self,
        topic: &str,
        set: &BTreeMap<String, String>,
        delete: &[String],
    ) -> Result<(), ClientError> {
        use kafka_protocol::messages::IncrementalAlterConfigsRequest;
        use kafka_protocol::messages::incremental_alter_configs_request::{
            AlterConfigsResource, AlterableConfig,
        };
        let configs = set
            .iter()
            .map(|(k, v)| {
                AlterableConfig::default()
                    .with_name(name(k))
                    .with_config_operation(0)
                    .with_value(Some(name(v)))
            })
            .chain(delete.iter().map(|k| {
                AlterableConfig::default()
                    .with_name(name(k))
                    .with_config_operation(1)
            }))
            .collect();
        let request = IncrementalAlterConfigsRequest::default().with_resources(vec![
            AlterConfigsResource::default()
                .with_resource_type(2)
                .with_resource_name(name(topic))
                .with_configs(configs),
        ]);
        let response = self.cluster.any().await?.send(&request, (0, 1)).await?;
        for result in response.responses {
            broker_error(
                ApiKey::IncrementalAlterConfigs,
                result.error_code,
                result.error_message.as_ref(),
            )?;
        }
        Ok(())
    }

    /// Deletes `groups` with their committed offsets (only groups without active members,
    /// `NON_EMPTY_GROUP` otherwise); each result in order.
    ///
    /// # Errors
    /// A request that failed.
    pub async fn delete_groups(
        &self,
        groups: &[&str],
    ) -> Result<Vec<(String, Result<(), ClientError>)>, ClientError> {
        use kafka_protocol::messages::DeleteGroupsRequest;
        let mut out = Vec::new();
        for group in groups {
            let coordinator = self.coordinator(group).await?;
            let response = coordinator
                .send(
                    &DeleteGroupsRequest::default().with_groups_names(vec![GroupId(name(group))]),
                    (0, 2),
                )
                .await?;
            for result in response.results {
                out.push((
                    result.group_id.to_string(),
                    broker_error(ApiKey::DeleteGroups, result.error_code, None),
                ));
            }
        }
        Ok(out)
    }

    /// `group`'s state, assignor and members with their partitions.
    ///
    /// # Errors
    /// The group's error (`GROUP_ID_NOT_FOUND` for a group that does not exist, on Kafka),
    /// or a request that failed.
    pub async fn describe_group(&self, group: &str) -> Result<GroupDescription, ClientError> {
        let coordinator = self.coordinator(group).await?;
        let response = coordinator
            .send(
                &DescribeGroupsRequest::default().with_groups(vec![GroupId(name(group))]),
                (0, 5),
            )
            .await?;
        let described = response
            .groups
            .into_iter()
            .next()
            .ok_or_else(|| ClientError::Metadata(format!("DescribeGroups left out {group}")))?;
        broker_error(ApiKey::DescribeGroups, described.error_code, None)?;
        let members = described
            .members
            .iter()
            .map(|m| MemberDescription {
                member_id: m.member_id.to_string(),
                group_instance_id: m.group_instance_id.as_ref().map(ToString::to_string),
                client_id: m.client_id.to_string(),
                host: m.client_host.to_string(),
                assignment: decode_assignment(&m.member_assignment),
            })
            .collect();
        Ok(GroupDescription {
            group_id: group.to_string(),
            state: described.group_state.to_string(),
            protocol: described.protocol_data.to_string(),
            members,
        })
    }

    /// `group`'s committed offsets (OffsetFetch with every topic).
    ///
    /// # Errors
    /// The group's or a partition's error, or a request that failed.
    pub async fn committed_offsets(
        &self,
        group: &str,
    ) -> Result<BTreeMap<TopicPartition, i64>, ClientError> {
        let coordinator = self.coordinator(group).await?;
        let response = coordinator
            .send(
                &OffsetFetchRequest::default()
                    .with_group_id(GroupId(name(group)))
                    .with_topics(None),
                (2, 7),
            )
            .await?;
        broker_error(ApiKey::OffsetFetch, response.error_code, None)?;
        let mut out = BTreeMap::new();
        for topic in response.topics {
            for p in topic.partitions {
                broker_error(ApiKey::OffsetFetch, p.error_code, None)?;
                if p.committed_offset >= 0 {
                    out.insert(
                        (topic.name.0.to_string(), p.partition_index),
                        p.committed_offset,
                    );
                }
            }
        }
        Ok(out)
    }

    /// Sets `group`'s committed offsets, as `kafka-consumer-groups --reset-offsets --execute`
    /// does: allowed by the coordinator only while the group has no active member.
    ///
    /// # Errors
    /// A partition's error (`UNKNOWN_MEMBER_ID` while members are active), or a request that
    /// failed.
    pub async fn alter_committed_offsets(
        &self,
        group: &str,
        offsets: &BTreeMap<TopicPartition, i64>,
    ) -> Result<(), ClientError> {
        let coordinator = self.coordinator(group).await?;
        let mut topics: BTreeMap<&str, Vec<OffsetCommitRequestPartition>> = BTreeMap::new();
        for ((topic, partition), offset) in offsets {
            topics.entry(topic).or_default().push(
                OffsetCommitRequestPartition::default()
                    .with_partition_index(*partition)
                    .with_committed_offset(*offset),
            );
        }
        let request = OffsetCommitRequest::default()
            .with_group_id(GroupId(name(group)))
            .with_generation_id_or_member_epoch(-1)
            .with_member_id(StrBytes::default())
            .with_topics(
                topics
                    .into_iter()
                    .map(|(topic, partitions)| {
                        OffsetCommitRequestTopic::default()
                            .with_name(TopicName(name(topic)))
                            .with_partitions(partitions)
                    })
                    .collect(),
            );
        let response = coordinator.send(&request, (2, 8)).await?;
        for topic in response.topics {
            for p in topic.partitions {
                broker_error(ApiKey::OffsetCommit, p.error_code, None)?;
            }
        }
        Ok(())
    }

    /// `group`'s lag on every partition it committed or is assigned: committed offset, log
    /// end, `end - committed`, and the member that owns it now (as
    /// `kafka-consumer-groups --describe`).
    ///
    /// # Errors
    /// As [`Admin::describe_group`], [`Admin::committed_offsets`], [`Admin::list_offsets`].
    pub async fn group_lag(&self, group: &str) -> Result<Vec<PartitionLag>, ClientError> {
        let description = self.describe_group(group).await?;
        let committed = self.committed_offsets(group).await?;
        let mut owners: BTreeMap<TopicPartition, &MemberDescription> = BTreeMap::new();
        for member in &description.members {
            for tp in &member.assignment {
                owners.insert(tp.clone(), member);
            }
        }
        let partitions: BTreeSet<TopicPartition> =
            committed.keys().chain(owners.keys()).cloned().collect();
        let partitions: Vec<TopicPartition> = partitions.into_iter().collect();
        let ends = if partitions.is_empty() {
            BTreeMap::new()
        } else {
            self.list_offsets(&partitions, OffsetSpec::Latest).await?
        };
        Ok(partitions
            .into_iter()
            .map(|tp| {
                let committed = committed.get(&tp).copied();
                let end = ends.get(&tp).copied().unwrap_or(-1);
                let owner = owners.get(&tp);
                PartitionLag {
                    lag: committed.map(|c| (end - c).max(0)),
                    owner: owner.map(|m| m.member_id.clone()),
                    client_id: owner.map(|m| m.client_id.clone()),
                    committed,
                    end,
                    topic: tp.0,
                    partition: tp.1,
                }
            })
            .collect())
    }

    /// The active producers of each partition (DescribeProducers, to each leader).
    ///
    /// # Errors
    /// A partition's error, or a request that failed.
    pub async fn describe_producers(
        &self,
        partitions: &[TopicPartition],
    ) -> Result<Vec<ProducerDescription>, ClientError> {
        let by_leader = self.by_leader(partitions).await?;
        let mut out = Vec::new();
        for (leader, topics) in by_leader {
            let request = DescribeProducersRequest::default().with_topics(
                topics
                    .into_iter()
                    .map(|(topic, partitions)| {
                        TopicRequest::default()
                            .with_name(TopicName(name(&topic)))
                            .with_partition_indexes(partitions)
                    })
                    .collect(),
            );
            let response = self
                .cluster
                .node(leader)
                .await?
                .send(&request, (0, 0))
                .await?;
            for topic in response.topics {
                for p in topic.partitions {
                    broker_error(
                        ApiKey::DescribeProducers,
                        p.error_code,
                        p.error_message.as_ref(),
                    )?;
                    for s in p.active_producers {
                        out.push(ProducerDescription {
                            topic: topic.name.0.to_string(),
                            partition: p.partition_index,
                            producer_id: s.producer_id.0,
                            producer_epoch: s.producer_epoch,
                            last_sequence: s.last_sequence,
                            last_timestamp: s.last_timestamp,
                            current_txn_start_offset: s.current_txn_start_offset,
                        });
                    }
                }
            }
        }
        Ok(out)
    }
}

/// The partitions of a consumer-protocol assignment (empty for another protocol or bytes
/// that do not decode: a group of another kind, such as Kafka Connect).
fn decode_assignment(bytes: &Bytes) -> Vec<TopicPartition> {
    let mut bytes = bytes.clone();
    if bytes.len() < 2 {
        return Vec::new();
    }
    let version = i16::from_be_bytes([bytes[0], bytes[1]]);
    let _ = bytes::Buf::get_i16(&mut bytes);
    let Ok(assignment) = ConsumerProtocolAssignment::decode(&mut bytes, version.clamp(0, 3)) else {
        return Vec::new();
    };
    assignment
        .assigned_partitions
        .iter()
        .flat_map(|tp| {
            tp.partitions
                .iter()
                .map(move |p| (tp.topic.0.to_string(), *p))
        })
        .collect()
}
