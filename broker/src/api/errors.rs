//! The error codes a response carries (top level, per topic, per partition, per group), for
//! the `semel_response_errors_total` metric. Covers the APIs clients send most; a response of
//! another API counts no error.

use kafka_protocol::messages::ResponseKind;

/// Every nonzero error code in `response`, once per place it appears.
pub(crate) fn error_codes(response: &ResponseKind) -> Vec<i16> {
    let mut codes = Vec::new();
    match response {
        ResponseKind::Produce(r) => extend(
            &mut codes,
            r.responses
                .iter()
                .flat_map(|t| t.partition_responses.iter().map(|p| p.error_code)),
        ),
        ResponseKind::Fetch(r) => {
            push(&mut codes, r.error_code);
            extend(
                &mut codes,
                r.responses
                    .iter()
                    .flat_map(|t| t.partitions.iter().map(|p| p.error_code)),
            );
        }
        ResponseKind::ListOffsets(r) => extend(
            &mut codes,
            r.topics
                .iter()
                .flat_map(|t| t.partitions.iter().map(|p| p.error_code)),
        ),
        ResponseKind::Metadata(r) => {
            for topic in &r.topics {
                push(&mut codes, topic.error_code);
                extend(&mut codes, topic.partitions.iter().map(|p| p.error_code));
            }
        }
        ResponseKind::OffsetCommit(r) => extend(
            &mut codes,
            r.topics
                .iter()
                .flat_map(|t| t.partitions.iter().map(|p| p.error_code)),
        ),
        ResponseKind::OffsetFetch(r) => {
            push(&mut codes, r.error_code);
            extend(
                &mut codes,
                r.topics
                    .iter()
                    .flat_map(|t| t.partitions.iter().map(|p| p.error_code)),
            );
            for group in &r.groups {
                push(&mut codes, group.error_code);
                extend(
                    &mut codes,
                    group
                        .topics
                        .iter()
                        .flat_map(|t| t.partitions.iter().map(|p| p.error_code)),
                );
            }
        }
        ResponseKind::FindCoordinator(r) => {
            push(&mut codes, r.error_code);
            extend(&mut codes, r.coordinators.iter().map(|c| c.error_code));
        }
        ResponseKind::JoinGroup(r) => push(&mut codes, r.error_code),
        ResponseKind::SyncGroup(r) => push(&mut codes, r.error_code),
        ResponseKind::Heartbeat(r) => push(&mut codes, r.error_code),
        ResponseKind::LeaveGroup(r) => {
            push(&mut codes, r.error_code);
            extend(&mut codes, r.members.iter().map(|m| m.error_code));
        }
        ResponseKind::ListGroups(r) => push(&mut codes, r.error_code),
        ResponseKind::DescribeGroups(r) => {
            extend(&mut codes, r.groups.iter().map(|g| g.error_code))
        }
        ResponseKind::CreateTopics(r) => extend(&mut codes, r.topics.iter().map(|t| t.error_code)),
        ResponseKind::DeleteTopics(r) => {
            extend(&mut codes, r.responses.iter().map(|t| t.error_code))
        }
        ResponseKind::InitProducerId(r) => push(&mut codes, r.error_code),
        ResponseKind::EndTxn(r) => push(&mut codes, r.error_code),
        ResponseKind::AddOffsetsToTxn(r) => push(&mut codes, r.error_code),
        ResponseKind::SaslHandshake(r) => push(&mut codes, r.error_code),
        ResponseKind::SaslAuthenticate(r) => push(&mut codes, r.error_code),
        _ => {}
    }
    codes
}

/// Only nonzero codes are kept, so a response without errors allocates nothing.
fn push(codes: &mut Vec<i16>, code: i16) {
    if code != 0 {
        codes.push(code);
    }
}

fn extend(codes: &mut Vec<i16>, found: impl IntoIterator<Item = i16>) {
    codes.extend(found.into_iter().filter(|code| *code != 0));
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
