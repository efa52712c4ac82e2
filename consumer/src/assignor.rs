//! Partition assignors as pure functions: range, round-robin, sticky and cooperative-sticky,
//! with the embedded consumer protocol's encodings, so a semel consumer can lead a group of
//! librdkafka or Java consumers (and follow one).
//!
//! - **range**: per topic, members (sorted by id) get contiguous ranges; the first
//!   `partitions % members` get one more.
//! - **roundrobin**: every (topic, partition), sorted, dealt to the subscribed members in turn.
//! - **sticky**: keeps every partition a member owned (highest generation wins a conflict), takes
//!   away only what exceeds a balanced share, and gives free partitions to the least-loaded
//!   eligible member; then moves partitions from the most to the least loaded member while they
//!   differ by more than one.
//! - **cooperative-sticky**: the sticky result, minus every partition that still belongs to
//!   another member: that owner revokes it first, and the follow-up rebalance hands it over
//!   (KIP-429), so no partition is ever owned by two members at once.
//!
//! References: Kafka's `RangeAssignor`, `RoundRobinAssignor`, `AbstractStickyAssignor`,
//! `CooperativeStickyAssignor`; KIP-54 (sticky), KIP-429 (cooperative), KIP-341 (generation in
//! the subscription).

use std::collections::{BTreeMap, BTreeSet};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::consumer_protocol_assignment::TopicPartition as AssignedTopic;
use kafka_protocol::messages::consumer_protocol_subscription::TopicPartition as OwnedTopic;
use kafka_protocol::messages::{
    ConsumerProtocolAssignment, ConsumerProtocolSubscription, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

/// A topic partition.
pub type TopicPartition = (String, i32);

/// One member's subscription, as the leader sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subscription {
    /// The member id.
    pub member_id: String,
    /// Topics it subscribes to.
    pub topics: BTreeSet<String>,
    /// Partitions it owns now (consumer protocol v1+, or sticky user data).
    pub owned: BTreeSet<TopicPartition>,
    /// The generation those partitions were assigned in (-1 unknown).
    pub generation: i32,
}

/// member id → the partitions it gets.
pub type Assignment = BTreeMap<String, BTreeSet<TopicPartition>>;

/// The strategies, by their protocol names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// `range`.
    Range,
    /// `roundrobin`.
    RoundRobin,
    /// `sticky`.
    Sticky,
    /// `cooperative-sticky`.
    CooperativeSticky,
}

impl Strategy {
    /// The protocol name in JoinGroup.
    pub fn name(self) -> &'static str {
        match self {
            Self::Range => "range",
            Self::RoundRobin => "roundrobin",
            Self::Sticky => "sticky",
            Self::CooperativeSticky => "cooperative-sticky",
        }
    }

    /// The strategy of a protocol name.
    pub fn from_name(name: &str) -> Option<Self> {
        [
            Self::Range,
            Self::RoundRobin,
            Self::Sticky,
            Self::CooperativeSticky,
        ]
        .into_iter()
        .find(|s| s.name() == name)
    }

    /// Assigns `partitions` (topic → partition count) to `members`.
    pub fn assign(
        self,
        partitions: &BTreeMap<String, i32>,
        members: &[Subscription],
    ) -> Assignment {
        match self {
            Self::Range => range(partitions, members),
            Self::RoundRobin => round_robin(partitions, members),
            Self::Sticky => sticky(partitions, members),
            Self::CooperativeSticky => cooperative_sticky(partitions, members),
        }
    }
}

fn empty(members: &[Subscription]) -> Assignment {
    members
        .iter()
        .map(|m| (m.member_id.clone(), BTreeSet::new()))
        .collect()
}

/// Kafka's range assignor.
pub fn range(partitions: &BTreeMap<String, i32>, members: &[Subscription]) -> Assignment {
    let mut out = empty(members);
    for (topic, &count) in partitions {
        let mut subscribed: Vec<&str> = members
            .iter()
            .filter(|m| m.topics.contains(topic))
            .map(|m| m.member_id.as_str())
            .collect();
        subscribed.sort_unstable();
        if subscribed.is_empty() || count <= 0 {
            continue;
        }
        let n = subscribed.len() as i32;
        let (each, extra) = (count / n, count % n);
        let mut next = 0;
        for (i, member) in subscribed.iter().enumerate() {
            let take = each + i32::from((i as i32) < extra);
            let owned = out.entry((*member).to_string()).or_default();
            for p in next..next + take {
                owned.insert((topic.clone(), p));
            }
            next += take;
        }
    }
    out
}

/// Kafka's round-robin assignor.
pub fn round_robin(partitions: &BTreeMap<String, i32>, members: &[Subscription]) -> Assignment {
    let mut out = empty(members);
    let mut sorted: Vec<&Subscription> = members.iter().collect();
    sorted.sort_by(|a, b| a.member_id.cmp(&b.member_id));
    if sorted.is_empty() {
        return out;
    }
    let mut turn = 0;
    for (topic, &count) in partitions {
        for p in 0..count {
            // The next member in turn that subscribes to this topic.
            for step in 0..sorted.len() {
                let member = sorted[(turn + step) % sorted.len()];
                if member.topics.contains(topic) {
                    out.entry(member.member_id.clone())
                        .or_default()
                        .insert((topic.clone(), p));
                    turn = (turn + step + 1) % sorted.len();
                    break;
                }
            }
        }
    }
    out
}

/// Kafka's sticky assignor (the general idea of `AbstractStickyAssignor`).
pub fn sticky(partitions: &BTreeMap<String, i32>, members: &[Subscription]) -> Assignment {
    let exists = |tp: &TopicPartition| {
        partitions
            .get(&tp.0)
            .is_some_and(|&n| tp.1 >= 0 && tp.1 < n)
    };
    // Who may keep what: the claim from the highest generation wins a conflict.
    let mut claims: BTreeMap<TopicPartition, (i32, String)> = BTreeMap::new();
    for member in members {
        for tp in &member.owned {
            if !exists(tp) || !member.topics.contains(&tp.0) {
                continue;
            }
            let better = claims
                .get(tp)
                .is_none_or(|(generation, _)| member.generation > *generation);
            if better {
                claims.insert(tp.clone(), (member.generation, member.member_id.clone()));
            }
        }
    }
    let mut out = empty(members);
    for (tp, (_, member)) in &claims {
        out.entry(member.clone()).or_default().insert(tp.clone());
    }
    let eligible = |tp: &TopicPartition| -> Vec<&str> {
        members
            .iter()
            .filter(|m| m.topics.contains(&tp.0))
            .map(|m| m.member_id.as_str())
            .collect()
    };
    let all: Vec<TopicPartition> = partitions
        .iter()
        .flat_map(|(t, &n)| (0..n.max(0)).map(move |p| (t.clone(), p)))
        .filter(|tp| members.iter().any(|m| m.topics.contains(&tp.0)))
        .collect();
    // Balanced shares (exact when every member subscribes to the same topics): nobody keeps
    // more than the ceiling.
    let total = all.len();
    let per_member = if members.is_empty() {
        0
    } else {
        total.div_ceil(members.len())
    };
    for owned in out.values_mut() {
        while owned.len() > per_member {
            // Give back the highest partitions; they are reassigned below.
            let last = owned.iter().next_back().cloned();
            if let Some(tp) = last {
                owned.remove(&tp);
            }
        }
    }
    let assigned: BTreeSet<TopicPartition> = out.values().flatten().cloned().collect();
    for tp in all.iter().filter(|tp| !assigned.contains(*tp)) {
        let target = eligible(tp)
            .into_iter()
            .min_by_key(|m| (out.get(*m).map_or(0, BTreeSet::len), m.to_string()));
        if let Some(member) = target {
            out.entry(member.to_string())
                .or_default()
                .insert(tp.clone());
        }
    }
    // Move partitions from the most to the least loaded eligible member while they differ by
    // more than one.
    loop {
        let mut moved = false;
        let mut by_load: Vec<(usize, String)> =
            out.iter().map(|(m, p)| (p.len(), m.clone())).collect();
        by_load.sort();
        'outer: for (high_load, high) in by_load.iter().rev() {
            for (low_load, low) in &by_load {
                if high_load <= &(low_load + 1) {
                    break;
                }
                let candidate = out.get(high).and_then(|owned| {
                    owned
                        .iter()
                        .rev()
                        .find(|tp| eligible(tp).contains(&low.as_str()))
                        .cloned()
                });
                if let Some(tp) = candidate {
                    out.entry(high.clone()).or_default().remove(&tp);
                    out.entry(low.clone()).or_default().insert(tp);
                    moved = true;
                    break 'outer;
                }
            }
        }
        if !moved {
            return out;
        }
    }
}

/// KIP-429: the sticky result without the partitions another member still owns.
pub fn cooperative_sticky(
    partitions: &BTreeMap<String, i32>,
    members: &[Subscription],
) -> Assignment {
    let target = sticky(partitions, members);
    let mut owner: BTreeMap<&TopicPartition, &str> = BTreeMap::new();
    for member in members {
        for tp in &member.owned {
            owner.insert(tp, member.member_id.as_str());
        }
    }
    target
        .into_iter()
        .map(|(member, owned)| {
            let kept = owned
                .into_iter()
                .filter(|tp| owner.get(tp).is_none_or(|o| *o == member))
                .collect();
            (member, kept)
        })
        .collect()
}

/// Why embedded consumer-protocol bytes could not be read.
#[derive(Debug, Clone, thiserror::Error)]
#[error("consumer protocol: {0}")]
pub struct ProtocolError(String);

/// Highest consumer-protocol version this crate writes.
pub const PROTOCOL_VERSION: i16 = 3;

/// JoinGroup metadata for `topics` (version prefix + ConsumerProtocolSubscription).
///
/// # Errors
/// When the encoder refuses a value.
///
/// `sticky_previous`: for the eager `sticky` protocol, the member's previous assignment,
/// written as `StickyAssignorUserDataV1` user data (eager members own nothing when they
/// rejoin, so that is where the sticky assignor looks, in Kafka and librdkafka alike).
pub fn encode_subscription(
    topics: &BTreeSet<String>,
    owned: &BTreeSet<TopicPartition>,
    generation: i32,
    sticky_previous: Option<&BTreeSet<TopicPartition>>,
) -> Result<Bytes, ProtocolError> {
    let mut by_topic: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
    for (t, p) in owned {
        by_topic.entry(t.as_str()).or_default().push(*p);
    }
    let body = ConsumerProtocolSubscription::default()
        .with_topics(
            topics
                .iter()
                .map(|t| StrBytes::from_string(t.clone()))
                .collect(),
        )
        .with_owned_partitions(
            by_topic
                .into_iter()
                .map(|(t, ps)| {
                    OwnedTopic::default()
                        .with_topic(TopicName(StrBytes::from_string(t.to_string())))
                        .with_partitions(ps)
                })
                .collect(),
        )
        .with_generation_id(generation)
        .with_user_data(sticky_previous.map(|previous| sticky_user_data(previous, generation)));
    let mut buf = BytesMut::new();
    buf.put_i16(PROTOCOL_VERSION);
    body.encode(&mut buf, PROTOCOL_VERSION)
        .map_err(|e| ProtocolError(e.to_string()))?;
    Ok(buf.freeze())
}

/// Reads a member's JoinGroup metadata (any version; newer ones read as the newest known,
/// which is how Kafka reads them).
///
/// # Errors
/// Truncated or malformed bytes.
pub fn decode_subscription(
    member_id: &str,
    metadata: &Bytes,
) -> Result<Subscription, ProtocolError> {
    let mut buf = metadata.clone();
    if buf.remaining() < 2 {
        return Err(ProtocolError(
            "subscription shorter than its version".into(),
        ));
    }
    let version = buf.get_i16().clamp(0, PROTOCOL_VERSION);
    let body = ConsumerProtocolSubscription::decode(&mut buf, version)
        .map_err(|e| ProtocolError(e.to_string()))?;
    if body.owned_partitions.is_empty()
        && let Some((owned, generation)) = body.user_data.as_ref().and_then(decode_sticky_user_data)
    {
        return Ok(Subscription {
            member_id: member_id.to_string(),
            topics: body.topics.iter().map(ToString::to_string).collect(),
            owned,
            generation,
        });
    }
    Ok(Subscription {
        member_id: member_id.to_string(),
        topics: body.topics.iter().map(ToString::to_string).collect(),
        owned: body
            .owned_partitions
            .iter()
            .flat_map(|t| {
                t.partitions
                    .iter()
                    .map(move |p| (t.topic.0.to_string(), *p))
            })
            .collect(),
        generation: if version >= 2 { body.generation_id } else { -1 },
    })
}

/// `StickyAssignorUserDataV1`: `[topic: string, partitions: [int32]]`, `generation: int32`,
/// in the classic (non-flexible) encoding, with no version prefix.
fn sticky_user_data(previous: &BTreeSet<TopicPartition>, generation: i32) -> Bytes {
    let mut by_topic: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
    for (t, p) in previous {
        by_topic.entry(t.as_str()).or_default().push(*p);
    }
    let mut buf = BytesMut::new();
    buf.put_i32(i32::try_from(by_topic.len()).unwrap_or(i32::MAX));
    for (topic, partitions) in by_topic {
        buf.put_i16(i16::try_from(topic.len()).unwrap_or(i16::MAX));
        buf.put_slice(topic.as_bytes());
        buf.put_i32(i32::try_from(partitions.len()).unwrap_or(i32::MAX));
        for p in partitions {
            buf.put_i32(p);
        }
    }
    buf.put_i32(generation);
    buf.freeze()
}

/// Reads sticky user data V1 (or V0, without the generation); `None` unless the bytes are
/// exactly that shape (other assignors' user data is ignored).
fn decode_sticky_user_data(bytes: &Bytes) -> Option<(BTreeSet<TopicPartition>, i32)> {
    let mut buf = bytes.clone();
    if buf.remaining() < 4 {
        return None;
    }
    let topics = usize::try_from(buf.get_i32()).ok()?;
    let mut owned = BTreeSet::new();
    for _ in 0..topics {
        if buf.remaining() < 2 {
            return None;
        }
        let len = usize::try_from(buf.get_i16()).ok()?;
        if buf.remaining() < len + 4 {
            return None;
        }
        let topic = String::from_utf8(buf.copy_to_bytes(len).to_vec()).ok()?;
        let count = usize::try_from(buf.get_i32()).ok()?;
        if buf.remaining() < count.checked_mul(4)? {
            return None;
        }
        for _ in 0..count {
            owned.insert((topic.clone(), buf.get_i32()));
        }
    }
    match buf.remaining() {
        0 => Some((owned, -1)),
        4 => Some((owned, buf.get_i32())),
        _ => None,
    }
}

/// SyncGroup assignment bytes for one member.
///
/// # Errors
/// When the encoder refuses a value.
pub fn encode_assignment(partitions: &BTreeSet<TopicPartition>) -> Result<Bytes, ProtocolError> {
    let mut by_topic: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
    for (t, p) in partitions {
        by_topic.entry(t.as_str()).or_default().push(*p);
    }
    let body = ConsumerProtocolAssignment::default().with_assigned_partitions(
        by_topic
            .into_iter()
            .map(|(t, ps)| {
                AssignedTopic::default()
                    .with_topic(TopicName(StrBytes::from_string(t.to_string())))
                    .with_partitions(ps)
            })
            .collect(),
    );
    let mut buf = BytesMut::new();
    buf.put_i16(PROTOCOL_VERSION);
    body.encode(&mut buf, PROTOCOL_VERSION)
        .map_err(|e| ProtocolError(e.to_string()))?;
    Ok(buf.freeze())
}

/// Reads SyncGroup assignment bytes (empty bytes: nothing assigned).
///
/// # Errors
/// Truncated or malformed bytes.
pub fn decode_assignment(bytes: &Bytes) -> Result<BTreeSet<TopicPartition>, ProtocolError> {
    let mut buf = bytes.clone();
    if buf.remaining() == 0 {
        return Ok(BTreeSet::new());
    }
    if buf.remaining() < 2 {
        return Err(ProtocolError("assignment shorter than its version".into()));
    }
    let version = buf.get_i16().clamp(0, PROTOCOL_VERSION);
    let body = ConsumerProtocolAssignment::decode(&mut buf, version)
        .map_err(|e| ProtocolError(e.to_string()))?;
    Ok(body
        .assigned_partitions
        .iter()
        .flat_map(|t| {
            t.partitions
                .iter()
                .map(move |p| (t.topic.0.to_string(), *p))
        })
        .collect())
}

#[cfg(test)]
mod tests;
