//! The guard against the crate's own encoder: every covered version of every request, populated
//! and empty, is accepted and decodes; hostile counts, truncations and random corruption are
//! either refused or decode without aborting.

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::create_partitions_request::{
    CreatePartitionsAssignment, CreatePartitionsTopic,
};
use kafka_protocol::messages::create_topics_request::{
    CreatableReplicaAssignment, CreatableTopic, CreatableTopicConfig,
};
use kafka_protocol::messages::delete_topics_request::DeleteTopicState;
use kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic, ForgottenTopic};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Encodable, StrBytes};
use proptest::prelude::*;

use super::*;

fn s(text: &str) -> StrBytes {
    StrBytes::from_string(text.to_string())
}
fn topic(text: &str) -> TopicName {
    TopicName(s(text))
}
fn twice<T: Clone>(item: T) -> Vec<T> {
    vec![item.clone(), item]
}

/// A request of every covered kind with two elements in every array, as encoded bytes.
fn populated(api_key: i16, version: i16) -> Bytes {
    let mut buf = BytesMut::new();
    let encoded = match api_key {
        0 => ProduceRequest::default()
            .with_transactional_id(Some(TransactionalId(s("tx"))))
            .with_acks(-1)
            .with_timeout_ms(30_000)
            .with_topic_data(twice(
                TopicProduceData::default()
                    .with_name(topic("t"))
                    .with_partition_data(twice(
                        PartitionProduceData::default()
                            .with_index(1)
                            .with_records(Some(Bytes::from_static(b"0123456789"))),
                    )),
            ))
            .encode(&mut buf, version),
        1 => FetchRequest::default()
            .with_replica_id(BrokerId(-1))
            .with_max_wait_ms(500)
            .with_min_bytes(1)
            .with_max_bytes(1 << 20)
            .with_session_id(if version >= 7 { 3 } else { 0 })
            .with_topics(twice(
                FetchTopic::default()
                    .with_topic(topic("t"))
                    .with_partitions(twice(
                        FetchPartition::default()
                            .with_partition(2)
                            .with_fetch_offset(9)
                            .with_partition_max_bytes(1024),
                    )),
            ))
            .with_forgotten_topics_data(if version >= 7 {
                twice(
                    ForgottenTopic::default()
                        .with_topic(topic("old"))
                        .with_partitions(vec![1, 2]),
                )
            } else {
                Vec::new()
            })
            .with_rack_id(if version >= 11 {
                s("rack")
            } else {
                StrBytes::default()
            })
            .with_cluster_id(if version >= 12 {
                Some(s("cluster"))
            } else {
                None
            })
            .encode(&mut buf, version),
        2 => ListOffsetsRequest::default()
            .with_replica_id(BrokerId(-1))
            .with_topics(twice(
                ListOffsetsTopic::default()
                    .with_name(topic("t"))
                    .with_partitions(twice(
                        ListOffsetsPartition::default()
                            .with_partition_index(0)
                            .with_timestamp(-1),
                    )),
            ))
            .encode(&mut buf, version),
        3 => MetadataRequest::default()
            .with_topics(Some(twice(
                MetadataRequestTopic::default().with_name(Some(topic("t"))),
            )))
            .with_allow_auto_topic_creation(true)
            .encode(&mut buf, version),
        18 => ApiVersionsRequest::default()
            .with_client_software_name(if version >= 3 {
                s("semel")
            } else {
                StrBytes::default()
            })
            .with_client_software_version(if version >= 3 {
                s("1.0")
            } else {
                StrBytes::default()
            })
            .encode(&mut buf, version),
        19 => CreateTopicsRequest::default()
            .with_topics(twice(
                CreatableTopic::default()
                    .with_name(topic("t"))
                    .with_num_partitions(-1)
                    .with_replication_factor(-1)
                    .with_assignments(twice(
                        CreatableReplicaAssignment::default()
                            .with_partition_index(0)
                            .with_broker_ids(vec![BrokerId(1), BrokerId(2)]),
                    ))
                    .with_configs(twice(
                        CreatableTopicConfig::default()
                            .with_name(s("retention.ms"))
                            .with_value(Some(s("1"))),
                    )),
            ))
            .with_timeout_ms(1000)
            .encode(&mut buf, version),
        20 => if version >= 6 {
            DeleteTopicsRequest::default().with_topics(twice(
                DeleteTopicState::default().with_name(Some(topic("t"))),
            ))
        } else {
            DeleteTopicsRequest::default().with_topic_names(twice(topic("t")))
        }
        .with_timeout_ms(1000)
        .encode(&mut buf, version),
        32 => DescribeConfigsRequest::default()
            .with_resources(twice(
                DescribeConfigsResource::default()
                    .with_resource_type(2)
                    .with_resource_name(s("t"))
                    .with_configuration_keys(Some(vec![s("a"), s("b")])),
            ))
            .with_include_synonyms(true)
            .encode(&mut buf, version),
        33 => AlterConfigsRequest::default()
            .with_resources(twice(
                alter_configs_request::AlterConfigsResource::default()
                    .with_resource_type(2)
                    .with_resource_name(s("t"))
                    .with_configs(vec![
                        alter_configs_request::AlterableConfig::default()
                            .with_name(s("retention.ms"))
                            .with_value(Some(s("1000"))),
                        alter_configs_request::AlterableConfig::default()
                            .with_name(s("segment.ms"))
                            .with_value(None),
                    ]),
            ))
            .with_validate_only(true)
            .encode(&mut buf, version),
        44 => IncrementalAlterConfigsRequest::default()
            .with_resources(twice(
                incremental_alter_configs_request::AlterConfigsResource::default()
                    .with_resource_type(2)
                    .with_resource_name(s("t"))
                    .with_configs(vec![
                        incremental_alter_configs_request::AlterableConfig::default()
                            .with_name(s("retention.ms"))
                            .with_config_operation(0)
                            .with_value(Some(s("1000"))),
                        incremental_alter_configs_request::AlterableConfig::default()
                            .with_name(s("segment.ms"))
                            .with_config_operation(1)
                            .with_value(None),
                    ]),
            ))
            .encode(&mut buf, version),
        37 => CreatePartitionsRequest::default()
            .with_topics(twice(
                CreatePartitionsTopic::default()
                    .with_name(topic("t"))
                    .with_count(4)
                    .with_assignments(Some(twice(
                        CreatePartitionsAssignment::default().with_broker_ids(vec![BrokerId(1)]),
                    ))),
            ))
            .with_timeout_ms(1000)
            .encode(&mut buf, version),
        22 => InitProducerIdRequest::default()
            .with_transactional_id(Some(TransactionalId(s("tx"))))
            .with_transaction_timeout_ms(60_000)
            .with_producer_id(if version >= 3 {
                ProducerId(7)
            } else {
                ProducerId(-1)
            })
            .with_producer_epoch(if version >= 3 { 2 } else { -1 })
            .encode(&mut buf, version),
        24 => {
            let topics = twice(
                add_partitions_to_txn_request::AddPartitionsToTxnTopic::default()
                    .with_name(topic("t"))
                    .with_partitions(vec![0, 1]),
            );
            if version >= 4 {
                AddPartitionsToTxnRequest::default()
                    .with_transactions(twice(
                        add_partitions_to_txn_request::AddPartitionsToTxnTransaction::default()
                            .with_transactional_id(TransactionalId(s("tx")))
                            .with_producer_id(ProducerId(7))
                            .with_producer_epoch(2)
                            .with_topics(topics),
                    ))
                    .encode(&mut buf, version)
            } else {
                AddPartitionsToTxnRequest::default()
                    .with_v3_and_below_transactional_id(TransactionalId(s("tx")))
                    .with_v3_and_below_producer_id(ProducerId(7))
                    .with_v3_and_below_producer_epoch(2)
                    .with_v3_and_below_topics(topics)
                    .encode(&mut buf, version)
            }
        }
        25 => AddOffsetsToTxnRequest::default()
            .with_transactional_id(TransactionalId(s("tx")))
            .with_producer_id(ProducerId(7))
            .with_group_id(GroupId(s("g")))
            .encode(&mut buf, version),
        26 => EndTxnRequest::default()
            .with_transactional_id(TransactionalId(s("tx")))
            .with_producer_id(ProducerId(7))
            .with_committed(true)
            .encode(&mut buf, version),
        28 => TxnOffsetCommitRequest::default()
            .with_transactional_id(TransactionalId(s("tx")))
            .with_group_id(GroupId(s("g")))
            .with_producer_id(ProducerId(7))
            .with_member_id(if version >= 3 { s("m") } else { s("") })
            .with_generation_id(if version >= 3 { 3 } else { -1 })
            .with_topics(twice(
                txn_offset_commit_request::TxnOffsetCommitRequestTopic::default()
                    .with_name(topic("t"))
                    .with_partitions(twice(
                        txn_offset_commit_request::TxnOffsetCommitRequestPartition::default()
                            .with_partition_index(1)
                            .with_committed_offset(42)
                            .with_committed_metadata(Some(s("meta"))),
                    )),
            ))
            .encode(&mut buf, version),
        65 => DescribeTransactionsRequest::default()
            .with_transactional_ids(twice(TransactionalId(s("tx"))))
            .encode(&mut buf, version),
        66 => ListTransactionsRequest::default()
            .with_state_filters(twice(s("Ongoing")))
            .with_producer_id_filters(twice(ProducerId(7)))
            .with_duration_filter(if version >= 1 { 1000 } else { -1 })
            .encode(&mut buf, version),
        61 => DescribeProducersRequest::default()
            .with_topics(twice(
                describe_producers_request::TopicRequest::default()
                    .with_name(topic("t"))
                    .with_partition_indexes(vec![0, 1]),
            ))
            .encode(&mut buf, version),
        21 => DeleteRecordsRequest::default()
            .with_topics(twice(
                delete_records_request::DeleteRecordsTopic::default()
                    .with_name(topic("t"))
                    .with_partitions(twice(
                        delete_records_request::DeleteRecordsPartition::default()
                            .with_partition_index(1)
                            .with_offset(5),
                    )),
            ))
            .with_timeout_ms(1000)
            .encode(&mut buf, version),
        17 => SaslHandshakeRequest::default()
            .with_mechanism(s("SCRAM-SHA-256"))
            .encode(&mut buf, version),
        36 => SaslAuthenticateRequest::default()
            .with_auth_bytes(Bytes::from_static(b"n,,n=user,r=nonce"))
            .encode(&mut buf, version),
        35 => DescribeLogDirsRequest::default()
            .with_topics(Some(twice(
                describe_log_dirs_request::DescribableLogDirTopic::default()
                    .with_topic(topic("t"))
                    .with_partitions(vec![0, 1]),
            )))
            .encode(&mut buf, version),
        10 => FindCoordinatorRequest::default()
            .with_key(if version <= 3 { s("g") } else { s("") })
            .with_key_type(0)
            .with_coordinator_keys(if version >= 4 { twice(s("g")) } else { vec![] })
            .encode(&mut buf, version),
        11 => JoinGroupRequest::default()
            .with_group_id(GroupId(s("g")))
            .with_session_timeout_ms(10_000)
            .with_rebalance_timeout_ms(30_000)
            .with_member_id(s("m"))
            .with_group_instance_id((version >= 5).then(|| s("i")))
            .with_protocol_type(s("consumer"))
            .with_protocols(twice(
                join_group_request::JoinGroupRequestProtocol::default()
                    .with_name(s("range"))
                    .with_metadata(Bytes::from_static(b"meta")),
            ))
            .with_reason((version >= 8).then(|| s("why")))
            .encode(&mut buf, version),
        14 => SyncGroupRequest::default()
            .with_group_id(GroupId(s("g")))
            .with_generation_id(3)
            .with_member_id(s("m"))
            .with_group_instance_id((version >= 3).then(|| s("i")))
            .with_protocol_type((version >= 5).then(|| s("consumer")))
            .with_protocol_name((version >= 5).then(|| s("range")))
            .with_assignments(twice(
                sync_group_request::SyncGroupRequestAssignment::default()
                    .with_member_id(s("m"))
                    .with_assignment(Bytes::from_static(b"assigned")),
            ))
            .encode(&mut buf, version),
        12 => HeartbeatRequest::default()
            .with_group_id(GroupId(s("g")))
            .with_generation_id(3)
            .with_member_id(s("m"))
            .with_group_instance_id((version >= 3).then(|| s("i")))
            .encode(&mut buf, version),
        13 => {
            if version >= 3 {
                LeaveGroupRequest::default()
                    .with_group_id(GroupId(s("g")))
                    .with_members(twice(
                        leave_group_request::MemberIdentity::default()
                            .with_member_id(s("m"))
                            .with_group_instance_id(Some(s("i")))
                            .with_reason((version >= 5).then(|| s("bye"))),
                    ))
                    .encode(&mut buf, version)
            } else {
                LeaveGroupRequest::default()
                    .with_group_id(GroupId(s("g")))
                    .with_member_id(s("m"))
                    .encode(&mut buf, version)
            }
        }
        8 => OffsetCommitRequest::default()
            .with_group_id(GroupId(s("g")))
            .with_generation_id_or_member_epoch(3)
            .with_member_id(s("m"))
            .with_group_instance_id((version >= 7).then(|| s("i")))
            .with_topics(twice(
                offset_commit_request::OffsetCommitRequestTopic::default()
                    .with_name(topic("t"))
                    .with_partitions(twice(
                        offset_commit_request::OffsetCommitRequestPartition::default()
                            .with_partition_index(1)
                            .with_committed_offset(42)
                            .with_committed_metadata(Some(s("meta"))),
                    )),
            ))
            .encode(&mut buf, version),
        9 => {
            if version >= 8 {
                OffsetFetchRequest::default()
                    .with_groups(twice(
                        offset_fetch_request::OffsetFetchRequestGroup::default()
                            .with_group_id(GroupId(s("g")))
                            .with_topics(Some(twice(
                                offset_fetch_request::OffsetFetchRequestTopics::default()
                                    .with_name(topic("t"))
                                    .with_partition_indexes(vec![0, 1]),
                            ))),
                    ))
                    .encode(&mut buf, version)
            } else {
                OffsetFetchRequest::default()
                    .with_group_id(GroupId(s("g")))
                    .with_topics(Some(twice(
                        offset_fetch_request::OffsetFetchRequestTopic::default()
                            .with_name(topic("t"))
                            .with_partition_indexes(vec![0, 1]),
                    )))
                    .encode(&mut buf, version)
            }
        }
        16 => ListGroupsRequest::default()
            .with_states_filter(if version >= 4 {
                twice(s("Stable"))
            } else {
                vec![]
            })
            .encode(&mut buf, version),
        15 => DescribeGroupsRequest::default()
            .with_groups(twice(GroupId(s("g"))))
            .encode(&mut buf, version),
        42 => DeleteGroupsRequest::default()
            .with_groups_names(twice(GroupId(s("g"))))
            .encode(&mut buf, version),
        47 => OffsetDeleteRequest::default()
            .with_group_id(GroupId(s("g")))
            .with_topics(twice(
                offset_delete_request::OffsetDeleteRequestTopic::default()
                    .with_name(topic("t"))
                    .with_partitions(twice(
                        offset_delete_request::OffsetDeleteRequestPartition::default()
                            .with_partition_index(2),
                    )),
            ))
            .encode(&mut buf, version),
        other => panic!("no sample for api key {other}"),
    };
    encoded.unwrap_or_else(|e| panic!("encode {api_key} v{version}: {e}"));
    buf.freeze()
}

fn empty(api_key: i16, version: i16) -> Bytes {
    let mut buf = BytesMut::new();
    let encoded = match api_key {
        0 => ProduceRequest::default().encode(&mut buf, version),
        1 => FetchRequest::default().encode(&mut buf, version),
        2 => ListOffsetsRequest::default().encode(&mut buf, version),
        3 => MetadataRequest::default().encode(&mut buf, version),
        18 => ApiVersionsRequest::default().encode(&mut buf, version),
        19 => CreateTopicsRequest::default().encode(&mut buf, version),
        20 => DeleteTopicsRequest::default().encode(&mut buf, version),
        32 => DescribeConfigsRequest::default().encode(&mut buf, version),
        33 => AlterConfigsRequest::default().encode(&mut buf, version),
        44 => IncrementalAlterConfigsRequest::default().encode(&mut buf, version),
        37 => CreatePartitionsRequest::default().encode(&mut buf, version),
        22 => InitProducerIdRequest::default().encode(&mut buf, version),
        24 => AddPartitionsToTxnRequest::default().encode(&mut buf, version),
        25 => AddOffsetsToTxnRequest::default().encode(&mut buf, version),
        26 => EndTxnRequest::default().encode(&mut buf, version),
        28 => TxnOffsetCommitRequest::default().encode(&mut buf, version),
        65 => DescribeTransactionsRequest::default().encode(&mut buf, version),
        66 => ListTransactionsRequest::default().encode(&mut buf, version),
        61 => DescribeProducersRequest::default().encode(&mut buf, version),
        35 => DescribeLogDirsRequest::default().encode(&mut buf, version),
        17 => SaslHandshakeRequest::default().encode(&mut buf, version),
        36 => SaslAuthenticateRequest::default().encode(&mut buf, version),
        21 => DeleteRecordsRequest::default().encode(&mut buf, version),
        10 => FindCoordinatorRequest::default().encode(&mut buf, version),
        11 => JoinGroupRequest::default().encode(&mut buf, version),
        14 => SyncGroupRequest::default().encode(&mut buf, version),
        12 => HeartbeatRequest::default().encode(&mut buf, version),
        13 => LeaveGroupRequest::default().encode(&mut buf, version),
        8 => OffsetCommitRequest::default().encode(&mut buf, version),
        9 => OffsetFetchRequest::default().encode(&mut buf, version),
        16 => ListGroupsRequest::default().encode(&mut buf, version),
        15 => DescribeGroupsRequest::default().encode(&mut buf, version),
        42 => DeleteGroupsRequest::default().encode(&mut buf, version),
        47 => OffsetDeleteRequest::default().encode(&mut buf, version),
        other => panic!("no sample for api key {other}"),
    };
    encoded.unwrap_or_else(|e| panic!("encode empty {api_key} v{version}: {e}"));
    buf.freeze()
}

/// Decodes with the crate. Only called on bodies the guard accepted: if the guard had a hole,
/// this could abort the test process, which is a loud failure.
fn decode(api_key: i16, version: i16, body: &Bytes) -> Result<(), String> {
    crate::fuzzing::decode_request(api_key, version, body)
}

fn covered() -> Vec<(i16, i16)> {
    covered_versions()
}

#[test]
fn accepts_every_covered_version_populated_and_empty() {
    for (api_key, version) in covered() {
        for body in [populated(api_key, version), empty(api_key, version)] {
            check_request_body(api_key, version, &body)
                .unwrap_or_else(|e| panic!("api {api_key} v{version}: {e}"));
            decode(api_key, version, &body)
                .unwrap_or_else(|e| panic!("decode api {api_key} v{version}: {e}"));
        }
    }
}

#[test]
fn covers_exactly_what_the_broker_advertises() {
    for &(key, min, max) in crate::api::SUPPORTED_APIS {
        for version in min..=max {
            assert!(is_covered(key as i16, version), "{key:?} v{version}");
        }
        assert!(!is_covered(key as i16, max + 1), "{key:?} v{}", max + 1);
    }
    assert!(!is_covered(9999, 0));
    assert!(matches!(
        check_request_body(38, 1, &[]),
        Err(GuardError::NotCovered { .. })
    ));
}

#[test]
fn refuses_every_truncation() {
    for (api_key, version) in covered() {
        let body = populated(api_key, version);
        for cut in 0..body.len() {
            assert!(
                check_request_body(api_key, version, &body[..cut]).is_err(),
                "api {api_key} v{version} accepted a body cut at {cut} of {}",
                body.len()
            );
        }
    }
}

#[test]
fn refuses_huge_and_negative_counts() {
    let huge = i32::MAX.to_be_bytes();
    let err = check_request_body(3, 1, &huge).unwrap_err();
    assert!(
        matches!(
            err,
            GuardError::ImplausibleCount {
                count: 2147483647,
                ..
            }
        ),
        "{err}"
    );
    // Compact: varint 0xffffffff (2^32 - 1, i.e. 2^32 - 2 elements).
    let err = check_request_body(3, 9, &[0xff, 0xff, 0xff, 0xff, 0x0f, 0, 0, 0]).unwrap_err();
    assert!(matches!(err, GuardError::ImplausibleCount { .. }), "{err}");
    let err = check_request_body(3, 4, &[0xff, 0xff, 0xff, 0xfe, 1]).unwrap_err();
    assert!(
        matches!(err, GuardError::NegativeLength { length: -2, .. }),
        "{err}"
    );
    let err = check_request_body(3, 9, &[0xff, 0xff, 0xff, 0xff, 0xff, 0x01]).unwrap_err();
    assert!(matches!(err, GuardError::BadVarint { .. }), "{err}");
    // A plausible count whose elements are missing is a truncation.
    let err = check_request_body(3, 1, &[0, 0, 0, 2, 0, 1, b'a']).unwrap_err();
    assert!(matches!(err, GuardError::Truncated { .. }), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Random corruption of valid requests: whatever the guard accepts decodes (or fails to
    /// decode) without aborting.
    #[test]
    fn corrupted_requests_never_reach_the_decoder_unsafely(
        which in 0usize..1000,
        edits in proptest::collection::vec((0usize..4096, any::<u8>()), 1..5),
        cut in proptest::option::of(0usize..4096),
    ) {
        let pairs = covered();
        let (api_key, version) = pairs[which % pairs.len()];
        let mut body = populated(api_key, version).to_vec();
        for (at, byte) in edits {
            if !body.is_empty() {
                let at = at % body.len();
                body[at] = byte;
            }
        }
        if let Some(cut) = cut {
            body.truncate(cut % (body.len() + 1));
        }
        let body = Bytes::from(body);
        if check_request_body(api_key, version, &body).is_ok() {
            let _ = decode(api_key, version, &body);
        }
    }
}

#[test]
fn counts_the_values_a_body_decodes_into() {
    // Metadata v1: three topic names.
    let mut body = 3i32.to_be_bytes().to_vec();
    for name in ["a", "bb", ""] {
        body.extend_from_slice(&(name.len() as i16).to_be_bytes());
        body.extend_from_slice(name.as_bytes());
    }
    assert_eq!(check_request_body(3, 1, &body).unwrap().elements, 3);
    // A null array decodes into nothing.
    assert_eq!(
        check_request_body(3, 1, &(-1i32).to_be_bytes())
            .unwrap()
            .elements,
        0
    );
    // Metadata v9 (flexible): two topics, the first with one unknown tagged field, then
    // the request's own fields and its empty tagged fields: 2 elements + 1 tagged field.
    let body = [
        3, // compact array of 2 topics
        2, b'a', 1, 5, 1, 0x55, // "a"; one tagged field: tag 5, 1 byte
        2, b'b', 0, // "b"; no tagged fields
        1, 0, 0, // allow_auto_topic_creation, the two include_*_authorized_operations
        0, // no tagged fields
    ];
    assert_eq!(check_request_body(3, 9, &body).unwrap().elements, 3);
}
