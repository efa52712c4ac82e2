"""kafka-python's transactional producer and read_committed consumer against a broker.

Run by tests/transactions.rs. Three transactions over two partitions (commit, abort, commit),
then a consume-transform-produce step with send_offsets_to_transaction. Prints one JSON line
{"ok": ..., ...} and exits non-zero on failure. Every wait is bounded.
"""

import argparse
import json
import sys
import time
import uuid

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.structs import OffsetAndMetadata

TIMEOUT = 30


def read(bootstrap, topic, isolation, expected, group=None):
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level=isolation,
        consumer_timeout_ms=3000,
    )
    consumer.subscribe([topic])
    records = []
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        batch = consumer.poll(timeout_ms=500)
        for part in batch.values():
            records.extend(r.value.decode() for r in part)
        if len(records) >= expected:
            # Linger briefly: anything beyond `expected` is a failure the caller sees.
            end = time.time() + 2
            while time.time() < end:
                for part in consumer.poll(timeout_ms=200).values():
                    records.extend(r.value.decode() for r in part)
            break
    consumer.close()
    return records


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    args = parser.parse_args()
    bootstrap = args.bootstrap
    topic = f"kp-txn-{uuid.uuid4().hex[:8]}"
    sink = f"{topic}-out"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, 2, 1), NewTopic(sink, 1, 1)])
    admin.close()
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, transactional_id=f"tx-{topic}", linger_ms=5
    )
    producer.init_transactions()
    for label, count in (("c1", 40), ("a", 30), ("c2", 40)):
        producer.begin_transaction()
        for i in range(count):
            producer.send(topic, value=f"{label}-{i}".encode(), partition=i % 2)
        if label == "a":
            producer.flush()
            producer.abort_transaction()
        else:
            producer.commit_transaction()
    committed = read(bootstrap, topic, "read_committed", 80)
    uncommitted = read(bootstrap, topic, "read_uncommitted", 110)
    want = sorted([f"c1-{i}" for i in range(40)] + [f"c2-{i}" for i in range(40)])

    # Consume-transform-produce: the group's offset moves with the transaction.
    group = f"g-{topic}"
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    consumer.subscribe([topic])
    seen = []
    deadline = time.time() + TIMEOUT
    while len(seen) < 80 and time.time() < deadline:
        for part in consumer.poll(timeout_ms=500).values():
            seen.extend(part)
    producer.begin_transaction()
    for record in seen:
        producer.send(sink, value=record.value.upper())
    offsets = {
        tp: OffsetAndMetadata(consumer.position(tp), "", -1)
        for tp in consumer.assignment()
    }
    producer.send_offsets_to_transaction(offsets, consumer.group_metadata())
    producer.commit_transaction()
    group_offsets = {
        tp.partition: consumer.committed(tp) for tp in consumer.assignment()
    }
    # Every record, aborted ones and markers included, takes an offset: the group resumes at
    # the log end of each partition.
    ends = {tp.partition: end for tp, end in consumer.end_offsets(list(consumer.assignment())).items()}
    consumer.close()
    producer.close()
    out = read(bootstrap, sink, "read_committed", 80)
    ok = (
        sorted(committed) == want
        and len(uncommitted) == 110
        and len(seen) == 80
        and group_offsets == ends
        and len(ends) == 2
        and len(out) == 80
    )
    print(
        json.dumps(
            {
                "ok": ok,
                "read_committed": len(committed),
                "aborted_seen": sum(v.startswith("a-") for v in committed),
                "read_uncommitted": len(uncommitted),
                "consumed": len(seen),
                "group_offsets": group_offsets,
                "log_ends": ends,
                "produced": len(out),
            }
        ),
        flush=True,
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
