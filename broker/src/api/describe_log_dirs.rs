//! DescribeLogDirs (key 35): the broker's one log directory and, for every partition asked
//! about (all of them when `topics` is null), its size on disk, as `kafka-log-dirs.sh
//! --describe` and `Admin.describeLogDirs` show it. A single node has no replica behind the
//! leader and no future replica: `offset_lag` is 0 and `is_future_key` false. Unknown topics
//! and partitions are left out, as Kafka does.
//!
//! `total_bytes` and `usable_bytes` (v4) are -1, Kafka's "unknown": the standard library does
//! not report a file system's size, and the broker takes no system-call crate for it.
//!
//! References: KIP-113 (DescribeLogDirs), KIP-827 (total and usable bytes).

use std::collections::BTreeMap;

use kafka_protocol::messages::describe_log_dirs_response::{
    DescribeLogDirsPartition, DescribeLogDirsResult, DescribeLogDirsTopic,
};
use kafka_protocol::messages::{DescribeLogDirsRequest, DescribeLogDirsResponse, TopicName};
use kafka_protocol::protocol::StrBytes;

use crate::broker::BrokerState;

pub(crate) fn handle(
    state: &BrokerState,
    request: DescribeLogDirsRequest,
) -> DescribeLogDirsResponse {
    // None: every partition; otherwise topic → the partitions asked for.
    let wanted: Option<BTreeMap<String, Vec<i32>>> = request.topics.map(|topics| {
        let mut wanted: BTreeMap<String, Vec<i32>> = BTreeMap::new();
        for topic in topics {
            wanted
                .entry(topic.topic.0.to_string())
                .or_default()
                .extend(topic.partitions);
        }
        wanted
    });
    let mut by_topic: BTreeMap<String, Vec<DescribeLogDirsPartition>> = BTreeMap::new();
    for partition in state.catalog.partitions() {
        let asked = wanted.as_ref().is_none_or(|wanted| {
            wanted
                .get(&partition.topic)
                .is_some_and(|indexes| indexes.contains(&partition.index))
        });
        if !asked {
            continue;
        }
        let size = partition.log().size_bytes();
        by_topic.entry(partition.topic.clone()).or_default().push(
            DescribeLogDirsPartition::default()
                .with_partition_index(partition.index)
                .with_partition_size(i64::try_from(size).unwrap_or(i64::MAX))
                .with_offset_lag(0)
                .with_is_future_key(false),
        );
    }
    let topics = by_topic
        .into_iter()
        .map(|(name, mut partitions)| {
            partitions.sort_by_key(|p| p.partition_index);
            DescribeLogDirsTopic::default()
                .with_name(TopicName(StrBytes::from_string(name)))
                .with_partitions(partitions)
        })
        .collect();
    let log_dir = std::path::absolute(&state.config.data_dir)
        .unwrap_or_else(|_| state.config.data_dir.clone());
    DescribeLogDirsResponse::default().with_results(vec![
        DescribeLogDirsResult::default()
            .with_log_dir(StrBytes::from_string(log_dir.display().to_string()))
            .with_topics(topics)
            .with_total_bytes(-1)
            .with_usable_bytes(-1),
    ])
}
