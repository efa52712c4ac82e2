"""Transactional produce next to idempotent produce, one run, same broker, same client.

Client: librdkafka as shipped in the confluent-kafka wheel (its version is printed), producing
from a tight Python loop. Usage (scripts/bench-transactions.sh starts a release semel-broker):
    python bench-transactions.py --bootstrap HOST:PORT [--count N] [--size BYTES] [--per-txn K]
Prints one line per mode with records/s, then the ratio.
"""

import argparse
import time
import uuid

import confluent_kafka
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic


def run(bootstrap, count, size, per_txn):
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    config = {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "batch.num.messages": 10000,
        "queue.buffering.max.messages": 1000000,
    }
    if per_txn:
        config["transactional.id"] = f"tx-{topic}"
    p = Producer(config)
    if per_txn:
        p.init_transactions(30)
    value = b"x" * size
    started = time.perf_counter()
    sent = 0
    while sent < count:
        if per_txn:
            p.begin_transaction()
        for _ in range(per_txn or count):
            while True:
                try:
                    p.produce(topic, value)
                    break
                except BufferError:
                    p.poll(0.01)
            sent += 1
        if per_txn:
            p.commit_transaction(60)
    p.flush(60)
    return count / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--per-txn", type=int, default=1000)
    args = parser.parse_args()
    print(f"librdkafka {confluent_kafka.libversion()[0]}, {args.count} records of {args.size} B, acks=all")
    idempotent = run(args.bootstrap, args.count, args.size, 0)
    print(f"idempotent:    {idempotent:10.0f} records/s")
    transactional = run(args.bootstrap, args.count, args.size, args.per_txn)
    print(f"transactional: {transactional:10.0f} records/s ({args.per_txn} per transaction)")
    print(f"ratio: {transactional / idempotent:.2f}")


if __name__ == "__main__":
    main()
