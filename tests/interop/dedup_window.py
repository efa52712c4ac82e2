"""Producers we did not write, sending message ids for semel-broker's dedup window.

Run by tests/dedup_window.rs. Sends records m<from>..m<to-1>: key and `semel-msg-id` header
both the id (or no header with --no-header), value "<id>|<tag>". Both clients partition by
murmur2 of the key (as the Java client does), so an id lands on the same partition whichever
client sends it: the window is per partition. Prints one JSON line {"sent": n, "failed": k}
and exits non-zero when a send failed. Every wait is bounded.

    dedup_window.py BOOTSTRAP TOPIC FROM TO --client kafka-python|confluent [--idempotent]
                    [--no-header] [--tag T]
"""

import argparse
import json
import sys


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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("bootstrap")
    parser.add_argument("topic")
    parser.add_argument("first", type=int)
    parser.add_argument("end", type=int)
    parser.add_argument("--client", choices=["kafka-python", "confluent"], required=True)
    parser.add_argument("--idempotent", action="store_true")
    parser.add_argument("--no-header", action="store_true")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    ids = range(args.first, args.end)
    send = send_kafka_python if args.client == "kafka-python" else send_confluent
    failed = send(args, ids)
    print(json.dumps({"sent": len(ids), "failed": failed}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
