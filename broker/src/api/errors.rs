//! The error codes a response carries (top level, per topic, per partition, per group), for
//! the `semel_response_errors_total` metric. Covers the APIs clients send most; a response of
//! another API counts no error.

use kafka_protocol::messages::ResponseKind;

/// Every nonzero error code in `response`, once per place it appears.
pub(crate) fn error_codes(response: &ResponseKind) -> Vec<i16> {
    let mut codes = Vec::new();
    match response {
        ResponseKind::Produce(r) => codes.extend(
            r.responses
                .iter()
                .flat_map(|t| t.partition_responses.iter().map(|p| p.error_code)),
        ),
        ResponseKind::Fetch(r) => {
            codes.push(r.error_code);
            codes.extend(
                r.responses
                    .iter()
                    .flat_map(|t| t.partitions.iter().map(|p| p.error_code)),
            );
        }
        ResponseKind::ListOffsets(r) => codes.extend(
            r.topics
                .iter()
                .flat_map(|t| t.partitions.iter().map(|p| p.error_code)),
        ),
        ResponseKind::Metadata(r) => {
            for topic in &r.topics {
                codes.push(topic.error_code);
                codes.extend(topic.partitions.iter().map(|p| p.error_code));
            }
        }
        ResponseKind::OffsetCommit(r) => codes.extend(
            r.topics
                .iter()
                .flat_map(|t| t.partitions.iter().map(|p| p.error_code)),
        ),
        ResponseKind::OffsetFetch(r) => {
            codes.push(r.error_code);
            codes.extend(
                r.topics
                    .iter()
                    .flat_map(|t| t.partitions.iter().map(|p| p.error_code)),
            );
            for group in &r.groups {
                codes.push(group.error_code);
                codes.extend(
                    group
                        .topics
                        .iter()
                        .flat_map(|t| t.partitions.iter().map(|p| p.error_code)),
                );
            }
        }
        ResponseKind::FindCoordinator(r) => {
            codes.push(r.error_code);
            codes.extend(r.coordinators.iter().map(|c| c.error_code));
        }
        ResponseKind::JoinGroup(r) => codes.push(r.error_code),
        ResponseKind::SyncGroup(r) => codes.push(r.error_code),
        ResponseKind::Heartbeat(r) => codes.push(r.error_code),
        ResponseKind::LeaveGroup(r) => {
            codes.push(r.error_code);
            codes.extend(r.members.iter().map(|m| m.error_code));
        }
        ResponseKind::ListGroups(r) => codes.push(r.error_code),
        ResponseKind::DescribeGroups(r) => codes.extend(r.groups.iter().map(|g| g.error_code)),
        ResponseKind::CreateTopics(r) => codes.extend(r.topics.iter().map(|t| t.error_code)),
        ResponseKind::DeleteTopics(r) => codes.extend(r.responses.iter().map(|t| t.error_code)),
        ResponseKind::InitProducerId(r) => codes.push(r.error_code),
        ResponseKind::EndTxn(r) => codes.push(r.error_code),
        ResponseKind::AddOffsetsToTxn(r) => codes.push(r.error_code),
        ResponseKind::SaslHandshake(r) => codes.push(r.error_code),
        ResponseKind::SaslAuthenticate(r) => codes.push(r.error_code),
        _ => {}
    }
    codes.retain(|code| *code != 0);
    codes
}

/// Kafka's name of an error code (`NOT_LEADER_OR_FOLLOWER`), or the number.
pub(crate) fn error_name(code: i16) -> String {
    match kafka_protocol::ResponseError::try_from_code(code) {
        Some(kafka_protocol::ResponseError::Unknown(_)) | None => code.to_string(),
        Some(error) => {
            let camel = format!("{error:?}");
            let mut out = String::with_capacity(camel.len() + 8);
            for (i, c) in camel.chars().enumerate() {
                if c.is_ascii_uppercase() && i > 0 {
                    out.push('_');
                }
                out.push(c.to_ascii_uppercase());
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::produce_response::{
        PartitionProduceResponse, TopicProduceResponse,
    };
    use kafka_protocol::messages::{HeartbeatResponse, ProduceResponse};

    #[test]
    fn codes_are_found_where_each_response_keeps_them_and_named_as_kafka_does() {
        let produce = ResponseKind::Produce(ProduceResponse::default().with_responses(vec![
            TopicProduceResponse::default().with_partition_responses(vec![
                PartitionProduceResponse::default().with_error_code(0),
                PartitionProduceResponse::default().with_error_code(6),
                PartitionProduceResponse::default().with_error_code(29),
            ]),
        ]));
        assert_eq!(error_codes(&produce), [6, 29]);
        let heartbeat = ResponseKind::Heartbeat(HeartbeatResponse::default().with_error_code(27));
        assert_eq!(error_codes(&heartbeat), [27]);
        assert_eq!(error_name(6), "NOT_LEADER_OR_FOLLOWER");
        assert_eq!(error_name(29), "TOPIC_AUTHORIZATION_FAILED");
        assert_eq!(error_name(27), "REBALANCE_IN_PROGRESS");
        assert_eq!(error_name(-1234), "-1234");
    }
}
