#!/usr/bin/env python3
"""Round trip through semel-broker with kafka-python, a pure-Python Kafka client we did not write.

Creates a topic with the admin client, lists metadata, produces keyed messages with headers
(acks=all, the given compression), then reads every partition back from the beginning and
checks offsets, keys, values, headers and per-partition order. Prints one JSON line with the
counts; exits non-zero with a reason on any mismatch.
"""
import argparse
import json
import sys
import time

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic


def fail(reason):
    print(json.dumps({"ok": False, "reason": reason}))
    sys.exit(1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--compression", default="none")
    args = parser.parse_args()

    admin = KafkaAdminClient(bootstrap_servers=args.bootstrap, client_id="interop-admin")
    admin.create_topics([NewTopic(args.topic, num_partitions=args.partitions, replication_factor=1)])
    topics = admin.list_topics()
    if args.topic not in topics:
        fail(f"created topic {args.topic} missing from list_topics: {topics}")
    described = admin.describe_topics([args.topic])
    partition_count = len(described[0]["partitions"])
    if partition_count != args.partitions:
        fail(f"describe_topics shows {partition_count} partitions, expected {args.partitions}")
    admin.close()

    producer = KafkaProducer(
        bootstrap_servers=args.bootstrap,
        acks="all",
        compression_type=None if args.compression == "none" else args.compression,
        linger_ms=5,
        retries=0,
    )
    futures = []
    for i in range(args.count):
        key = f"key-{i % 97}".encode()
        value = f"value-{i}".encode()
        headers = [("seq", str(i).encode()), ("origin", b"kafka-python")]
        futures.append((i, producer.send(args.topic, key=key, value=value, headers=headers)))
    producer.flush()
    sent = {}  # partition -> list of (offset, i)
    for i, future in futures:
        metadata = future.get(timeout=30)
        sent.setdefault(metadata.partition, []).append((metadata.offset, i))
    producer.close()

    for partition, entries in sent.items():
        offsets = sorted(o for o, _ in entries)
        if offsets != list(range(len(offsets))):
            fail(f"partition {partition}: acknowledged offsets are not 0..{len(offsets) - 1}")

    consumer = KafkaConsumer(bootstrap_servers=args.bootstrap, enable_auto_commit=False, group_id=None)
    partitions = [TopicPartition(args.topic, p) for p in range(args.partitions)]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    end_offsets = consumer.end_offsets(partitions)
    for tp, end in end_offsets.items():
        expected = len(sent.get(tp.partition, []))
        if end != expected:
            fail(f"partition {tp.partition}: end offset {end}, expected {expected}")

    received = {}
    deadline = time.time() + 60
    total = 0
    while total < args.count and time.time() < deadline:
        for tp, records in consumer.poll(timeout_ms=1000).items():
            for r in records:
                received.setdefault(tp.partition, []).append(r)
                total += 1
    consumer.close()
    if total != args.count:
        fail(f"consumed {total} records, expected {args.count}")

    by_index = {}
    for partition, records in received.items():
        for expected_offset, r in enumerate(records):
            if r.offset != expected_offset:
                fail(f"partition {partition}: record at position {expected_offset} has offset {r.offset}")
            headers = dict(r.headers)
            i = int(headers["seq"].decode())
            if r.key != f"key-{i % 97}".encode() or r.value != f"value-{i}".encode():
                fail(f"record {i}: key/value mismatch {r.key!r} {r.value!r}")
            if headers.get("origin") != b"kafka-python":
                fail(f"record {i}: headers {headers}")
            by_index[i] = (partition, r.offset)
        sequence = [int(dict(r.headers)["seq"].decode()) for r in records]
        if sequence != sorted(sequence):
            fail(f"partition {partition}: records out of send order")
    for partition, entries in sent.items():
        for offset, i in entries:
            if by_index.get(i) != (partition, offset):
                fail(f"record {i}: acknowledged at {(partition, offset)}, read at {by_index.get(i)}")

    print(json.dumps({
        "ok": True,
        "produced": args.count,
        "consumed": total,
        "partitions": {str(p): len(v) for p, v in sorted(received.items())},
    }))


if __name__ == "__main__":
    main()
