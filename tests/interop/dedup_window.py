"""Producers we did not write, sending message ids for semel-broker's dedup window.

Run by tests/dedup_window.rs. Sends records m<from>..m<to-1>: key and `semel-msg-id` header
both the id (or no header with --no-header), value "<id>|<tag>". Both clients partition by
murmur2 of the key (as the Java client does), so an id lands on the same partition whichever
client sends it: the window is per partition. Prints one JSON line {"sent": n, "failed": k}
and exits non-zero when a send failed. Every wait is bounded.

    dedup_window.py BOOTSTRAP TOPIC FROM TO --client kafka-python|confluent [--idempotent]
                    [--no-header] [--tag T]
    dedup_window.py BOOTSTRAP TOPIC 0 0 --read

With --read, kafka-python's consumer reads the whole topic instead (offsets with gaps where
the broker dropped duplicates from a batch) and prints "records=N distinct=D max_copies=M"
(records with the header counted by id).
"""

import argparse
import json
import sys
import time


def send_kafka_python(args, ids):
    from kafka import KafkaProducer

    producer = KafkaProducer(
        bootstrap_servers=args.bootstrap,
        acks="all",
        linger_ms=20,
        enable_idempotence=args.idempotent,
        request_timeout_ms=15000,
    )
    futures = []
    for i in ids:
        key = f"m{i}".encode()
        headers = [] if args.no_header else [("semel-msg-id", key)]
        value = f"m{i}|{args.tag}".encode()
        futures.append(producer.send(args.topic, key=key, value=value, headers=headers))
    producer.flush(timeout=60)
    failed = 0
    for future in futures:
        try:
            future.get(timeout=60)
        except Exception as e:  # noqa: BLE001 - any failure is counted and reported
            failed += 1
            print(f"send failed: {e!r}", file=sys.stderr)
    producer.close(timeout=10)
    return failed


def send_confluent(args, ids):
    from confluent_kafka import Producer

    producer = Producer(
        {
            "bootstrap.servers": args.bootstrap,
            "acks": "all",
            "linger.ms": 20,
            "enable.idempotence": args.idempotent,
            "partitioner": "murmur2_random",
            "message.timeout.ms": 60000,
        }
    )
    failed = [0]

    def report(err, _msg):
        if err is not None:
            failed[0] += 1
            print(f"send failed: {err}", file=sys.stderr)

    for i in ids:
        key = f"m{i}".encode()
        headers = [] if args.no_header else [("semel-msg-id", key)]
        value = f"m{i}|{args.tag}".encode()
        while True:
            try:
                producer.produce(args.topic, key=key, value=value, headers=headers, on_delivery=report)
                break
            except BufferError:
                producer.poll(0.1)
    left = producer.flush(60)
    return failed[0] + left


def read(args):
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=args.bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        consumer_timeout_ms=1000,
    )
    partitions = [TopicPartition(args.topic, p) for p in consumer.partitions_for_topic(args.topic)]
    consumer.assign(partitions)
    ends = consumer.end_offsets(partitions)
    ids = {}
    records = 0
    deadline = time.monotonic() + 60
    while any(consumer.position(tp) < ends[tp] for tp in partitions):
        if time.monotonic() > deadline:
            print("read: gave up after 60 s", file=sys.stderr)
            sys.exit(1)
        for batch in consumer.poll(timeout_ms=500).values():
            for record in batch:
                records += 1
                header = dict(record.headers).get("semel-msg-id")
                if header is not None:
                    key = header.decode()
                    ids[key] = ids.get(key, 0) + 1
    consumer.close()
    print(f"records={records} distinct={len(ids)} max_copies={max(ids.values(), default=0)}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("bootstrap")
    parser.add_argument("topic")
    parser.add_argument("first", type=int)
    parser.add_argument("end", type=int)
    parser.add_argument("--client", choices=["kafka-python", "confluent"])
    parser.add_argument("--read", action="store_true")
    parser.add_argument("--idempotent", action="store_true")
    parser.add_argument("--no-header", action="store_true")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    if args.read:
        read(args)
        return
    ids = range(args.first, args.end)
    send = send_kafka_python if args.client == "kafka-python" else send_confluent
    failed = send(args, ids)
    print(json.dumps({"sent": len(ids), "failed": failed}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
