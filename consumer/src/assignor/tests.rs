//! Assignor properties over random groups, plus the wire encodings.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::Strategy;
use super::*;

fn members(count: usize, topics: &[&str]) -> Vec<Subscription> {
    (0..count)
        .map(|i| Subscription {
            member_id: format!("member-{i:02}"),
            topics: topics.iter().map(|t| (*t).to_string()).collect(),
            owned: BTreeSet::new(),
            generation: -1,
        })
        .collect()
}

fn topics(counts: &[i32]) -> BTreeMap<String, i32> {
    counts
        .iter()
        .enumerate()
        .map(|(i, n)| (format!("t{i}"), *n))
        .collect()
}

fn all_partitions(partitions: &BTreeMap<String, i32>) -> BTreeSet<TopicPartition> {
    partitions
        .iter()
        .flat_map(|(t, &n)| (0..n).map(move |p| (t.clone(), p)))
        .collect()
}

/// Every partition exactly once, and only to members subscribed to its topic.
fn check_complete(partitions: &BTreeMap<String, i32>, group: &[Subscription], out: &Assignment) {
    let mut seen = BTreeSet::new();
    for (member, owned) in out {
        let subscription = group
            .iter()
            .find(|m| &m.member_id == member)
            .expect("member");
        for tp in owned {
            assert!(
                subscription.topics.contains(&tp.0),
                "{member} got {tp:?} it does not subscribe to"
            );
            assert!(seen.insert(tp.clone()), "{tp:?} assigned twice");
        }
    }
    assert_eq!(
        seen,
        all_partitions(partitions),
        "not every partition assigned"
    );
}

fn spread(out: &Assignment) -> usize {
    let loads: Vec<usize> = out.values().map(BTreeSet::len).collect();
    loads.iter().max().unwrap_or(&0) - loads.iter().min().unwrap_or(&0)
}

/// Gives each member what `out` assigned it, as its owned partitions for the next round.
fn owning(group: &[Subscription], out: &Assignment, generation: i32) -> Vec<Subscription> {
    group
        .iter()
        .map(|m| Subscription {
            owned: out.get(&m.member_id).cloned().unwrap_or_default(),
            generation,
            ..m.clone()
        })
        .collect()
}

/// The most partitions that can stay put when `before` is rebalanced over `after` members,
/// balanced: each member keeps at most its share.
fn max_kept(before: &[Subscription], after_members: usize, total: usize) -> usize {
    let floor = total / after_members.max(1);
    before.iter().map(|m| m.owned.len().min(floor)).sum()
}

fn kept(before: &[Subscription], out: &Assignment) -> usize {
    before
        .iter()
        .map(|m| {
            out.get(&m.member_id)
                .map_or(0, |now| now.intersection(&m.owned).count())
        })
        .sum()
}

proptest! {
    #[test]
    fn every_strategy_assigns_each_partition_once(
        member_count in 1usize..9,
        counts in proptest::collection::vec(0i32..13, 1..4),
        strategy in prop_oneof![
            Just(Strategy::Range),
            Just(Strategy::RoundRobin),
            Just(Strategy::Sticky),
        ],
    ) {
        let partitions = topics(&counts);
        let names: Vec<String> = partitions.keys().cloned().collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let group = members(member_count, &refs);
        let out = strategy.assign(&partitions, &group);
        check_complete(&partitions, &group, &out);
        if matches!(strategy, Strategy::RoundRobin | Strategy::Sticky) {
            prop_assert!(spread(&out) <= 1, "unbalanced: {out:?}");
        }
    }

    #[test]
    fn sticky_keeps_what_it_can_when_members_come_and_go(
        member_count in 2usize..8,
        partition_count in 1i32..40,
        joining in any::<bool>(),
    ) {
        let partitions = topics(&[partition_count]);
        let group = members(member_count, &["t0"]);
        let first = Strategy::Sticky.assign(&partitions, &group);
        let mut next = owning(&group, &first, 1);
        if joining {
            next.push(Subscription {
                member_id: "member-new".into(),
                topics: ["t0".to_string()].into_iter().collect(),
                owned: BTreeSet::new(),
                generation: -1,
            });
        } else {
            next.remove(0);
        }
        let second = Strategy::Sticky.assign(&partitions, &next);
        check_complete(&partitions, &next, &second);
        prop_assert!(spread(&second) <= 1);
        let total = usize::try_from(partition_count).unwrap_or(0);
        prop_assert!(
            kept(&next, &second) >= max_kept(&next, next.len(), total),
            "kept {} of the {} that could stay",
            kept(&next, &second),
            max_kept(&next, next.len(), total)
        );
    }

    #[test]
    fn cooperative_never_assigns_a_partition_another_member_still_owns(
        member_count in 2usize..8,
        partition_count in 1i32..40,
    ) {
        let partitions = topics(&[partition_count]);
        let group = members(member_count, &["t0"]);
        let first = Strategy::CooperativeSticky.assign(&partitions, &group);
        check_complete(&partitions, &group, &first);
        // A member joins: round one only revokes; round two hands the freed partitions over.
        let mut next = owning(&group, &first, 1);
        next.push(Subscription {
            member_id: "member-new".into(),
            topics: ["t0".to_string()].into_iter().collect(),
            owned: BTreeSet::new(),
            generation: -1,
        });
        let round_one = Strategy::CooperativeSticky.assign(&partitions, &next);
        for (member, owned) in &round_one {
            for tp in owned {
                let other_owner = next
                    .iter()
                    .find(|m| &m.member_id != member && m.owned.contains(tp));
                prop_assert!(other_owner.is_none(), "{tp:?} given to {member} while owned elsewhere");
            }
        }
        // Members revoke what they lost, then rejoin owning only what they kept.
        let after_revoke = owning(&next, &round_one, 2);
        let round_two = Strategy::CooperativeSticky.assign(&partitions, &after_revoke);
        check_complete(&partitions, &after_revoke, &round_two);
        prop_assert!(spread(&round_two) <= 1);
    }
}

#[test]
fn range_matches_kafkas_example() {
    // Kafka's RangeAssignor javadoc: two consumers, two topics of three partitions.
    let partitions = topics(&[3, 3]);
    let group = members(2, &["t0", "t1"]);
    let out = range(&partitions, &group);
    let expect = |pairs: &[(&str, i32)]| -> BTreeSet<TopicPartition> {
        pairs.iter().map(|(t, p)| ((*t).to_string(), *p)).collect()
    };
    assert_eq!(
        out["member-00"],
        expect(&[("t0", 0), ("t0", 1), ("t1", 0), ("t1", 1)])
    );
    assert_eq!(out["member-01"], expect(&[("t0", 2), ("t1", 2)]));
}

#[test]
fn subscriptions_and_assignments_round_trip_through_the_wire_format() {
    let topics: BTreeSet<String> = ["orders".to_string(), "refunds".to_string()].into();
    let owned: BTreeSet<TopicPartition> =
        [("orders".to_string(), 2), ("orders".to_string(), 5)].into();
    let bytes = encode_subscription(&topics, &owned, 7, None).expect("encode");
    let back = decode_subscription("m", &bytes).expect("decode");
    assert_eq!(back.topics, topics);
    assert_eq!(back.owned, owned);
    assert_eq!(back.generation, 7);
    let assignment = encode_assignment(&owned).expect("encode");
    assert_eq!(decode_assignment(&assignment).expect("decode"), owned);
    assert!(decode_assignment(&Bytes::new()).expect("empty").is_empty());
    assert!(decode_subscription("m", &Bytes::from_static(&[0])).is_err());
}

#[test]
fn eager_sticky_carries_the_previous_assignment_in_user_data() {
    let topics: BTreeSet<String> = ["orders".to_string()].into();
    let previous: BTreeSet<TopicPartition> =
        [("orders".to_string(), 1), ("orders".to_string(), 3)].into();
    // Eager members own nothing when they rejoin: the previous assignment rides in
    // StickyAssignorUserDataV1, which is where the leader (ours or librdkafka's) reads it.
    let bytes = encode_subscription(&topics, &BTreeSet::new(), 4, Some(&previous)).expect("encode");
    let back = decode_subscription("m", &bytes).expect("decode");
    assert_eq!(back.owned, previous);
    assert_eq!(back.generation, 4);
    // V1 layout, byte for byte: one topic "orders" with [1, 3], generation 4.
    let user_data = decode_user_data(&bytes);
    let mut expected = vec![0, 0, 0, 1, 0, 6];
    expected.extend_from_slice(b"orders");
    expected.extend_from_slice(&[0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 3, 0, 0, 0, 4]);
    assert_eq!(user_data, expected);
    // Another assignor's user data (Java's cooperative-sticky writes just a generation) is
    // not mistaken for it.
    assert_eq!(
        decode_sticky_user_data(&Bytes::from_static(&[0, 0, 0, 9])),
        None
    );
}

fn decode_user_data(bytes: &Bytes) -> Vec<u8> {
    use kafka_protocol::protocol::Decodable;
    let mut buf = bytes.clone();
    let version = bytes::Buf::get_i16(&mut buf);
    kafka_protocol::messages::ConsumerProtocolSubscription::decode(&mut buf, version)
        .expect("decode")
        .user_data
        .expect("user data")
        .to_vec()
}
