"""Transactions with librdkafka (confluent-kafka) against a broker, checked from the client side.

Run by tests/transactions.rs. Each scenario prints one JSON line {"scenario": ..., "ok": ...,
...}; the script exits non-zero if any scenario failed. Every wait is bounded.

Scenarios:
- commit_abort: three transactions (commit, abort, commit) over three partitions; a
  read_committed consumer sees the committed records exactly once, in order, and no aborted
  one; a read_uncommitted consumer sees all of them.
- send_offsets: consume-transform-produce: offsets committed with send_offsets_to_transaction
  become the group's committed offsets only when the transaction commits.
- zombie: a second producer with the same transactional.id fences the first, whose open
  transaction is aborted and whose commit fails.
- timeout: a transaction left open past transaction.timeout.ms is aborted by the broker; its
  records are never visible and the partition's LSO moves on.

Phases (--phase, --topic), around a kill -9 of the broker by the test: crash_open leaves a
transaction open after a committed one; crash_check, against the restarted broker, checks
that the open one still holds the LSO and is then aborted on its timeout.
"""

import argparse
import json
import os
import sys
import time
import uuid

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

TIMEOUT = 30


def create(bootstrap, topic, partitions):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(topic, partitions, 1)])
    futures[topic].result(timeout=TIMEOUT)


def producer(bootstrap, txn_id, **extra):
    config = {
        "bootstrap.servers": bootstrap,
        "transactional.id": txn_id,
        "linger.ms": 5,
    }
    config.update(extra)
    p = Producer(config)
    p.init_transactions(TIMEOUT)
    return p


def read_all(bootstrap, topic, isolation, expected, group=None, limit=TIMEOUT):
    """Every record of topic from the start, until `expected` are read or the time runs out."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group or f"reader-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": isolation,
        }
    )
    c.subscribe([topic])
    records = []
    deadline = time.time() + limit
    while time.time() < deadline and len(records) < expected:
        m = c.poll(0.5)
        if m is None or m.error():
            continue
        records.append((m.partition(), m.offset(), m.value().decode()))
    # Linger briefly: anything beyond `expected` is a failure the caller sees.
    end = time.time() + 2
    while time.time() < end:
        m = c.poll(0.2)
        if m is not None and not m.error():
            records.append((m.partition(), m.offset(), m.value().decode()))
    c.close()
    return records


def commit_abort(bootstrap):
    topic = f"txn-{uuid.uuid4().hex[:8]}"
    create(bootstrap, topic, 3)
    p = producer(bootstrap, f"tx-{topic}")
    sent = {"c1": 90, "a": 60, "c2": 90}
    for label, count in sent.items():
        p.begin_transaction()
        for i in range(count):
            p.produce(topic, value=f"{label}-{i}".encode(), partition=i % 3)
        if label == "a":
            p.flush(TIMEOUT)
            p.abort_transaction(TIMEOUT)
        else:
            p.commit_transaction(TIMEOUT)
    committed = read_all(bootstrap, topic, "read_committed", 180)
    values = [v for _, _, v in committed]
    want = [f"c1-{i}" for i in range(90)] + [f"c2-{i}" for i in range(90)]
    in_order = all(
        [v for part, _, v in committed if part == q]
        == [w for i, w in enumerate(want) if (i % 90) % 3 == q]
        for q in range(3)
    )
    uncommitted = read_all(bootstrap, topic, "read_uncommitted", 240)
    ok = (
        sorted(values) == sorted(want)
        and len(values) == len(set(values))
        and not any(v.startswith("a-") for v in values)
        and in_order
        and len(uncommitted) == 240
    )
    return {
        "ok": ok,
        "read_committed": len(values),
        "distinct": len(set(values)),
        "aborted_seen": sum(v.startswith("a-") for v in values),
        "in_order": in_order,
        "read_uncommitted": len(uncommitted),
    }


def send_offsets(bootstrap):
    source = f"in-{uuid.uuid4().hex[:8]}"
    sink = f"out-{source}"
    group = f"g-{source}"
    create(bootstrap, source, 1)
    create(bootstrap, sink, 1)
    plain = Producer({"bootstrap.servers": bootstrap})
    for i in range(20):
        plain.produce(source, value=f"in-{i}".encode())
    plain.flush(TIMEOUT)
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    c.subscribe([source])
    p = producer(bootstrap, f"tx-{source}")
    seen = []
    deadline = time.time() + TIMEOUT
    while len(seen) < 20 and time.time() < deadline:
        m = c.poll(0.5)
        if m is None or m.error():
            continue
        seen.append(m)
    p.begin_transaction()
    for m in seen:
        p.produce(sink, value=m.value().upper())
    positions = c.position(c.assignment())
    p.send_offsets_to_transaction(positions, c.consumer_group_metadata(), TIMEOUT)
    # Before the commit the group has no offset yet: TxnOffsetCommit is pending. A
    # read_committed consumer asks for stable offsets only and is told to retry
    # (UNSTABLE_OFFSET_COMMIT), so it cannot get an answer now; a read_uncommitted one sees
    # no offset.
    unstable = False
    try:
        c.committed([TopicPartition(source, 0)], 3)
    except KafkaException:
        unstable = True
    peek = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "isolation.level": "read_uncommitted",
        }
    )
    before = peek.committed([TopicPartition(source, 0)], TIMEOUT)[0].offset
    peek.close()
    p.commit_transaction(TIMEOUT)
    after = c.committed([TopicPartition(source, 0)], TIMEOUT)[0].offset
    c.close()
    out = read_all(bootstrap, sink, "read_committed", 20)
    ok = len(seen) == 20 and unstable and before < 0 and after == 20 and len(out) == 20
    return {
        "ok": ok,
        "unstable_while_pending": unstable,
        "consumed": len(seen),
        "committed_before": before,
        "committed_after": after,
        "produced": len(out),
    }


def zombie(bootstrap):
    topic = f"zombie-{uuid.uuid4().hex[:8]}"
    create(bootstrap, topic, 1)
    txn_id = f"tx-{topic}"
    a = producer(bootstrap, txn_id)
    a.begin_transaction()
    for i in range(10):
        a.produce(topic, value=f"zombie-{i}".encode())
    a.flush(TIMEOUT)
    b = producer(bootstrap, txn_id)  # fences a and aborts its transaction
    b.begin_transaction()
    for i in range(10):
        b.produce(topic, value=f"live-{i}".encode())
    b.commit_transaction(TIMEOUT)
    fenced = False
    error = ""
    try:
        a.produce(topic, value=b"late")
        a.commit_transaction(TIMEOUT)
    except KafkaException as e:
        fenced = True
        error = str(e.args[0])
    values = [v for _, _, v in read_all(bootstrap, topic, "read_committed", 10)]
    ok = fenced and values == [f"live-{i}" for i in range(10)]
    return {"ok": ok, "fenced": fenced, "error": error, "visible": values}


def timeout(bootstrap):
    topic = f"timeout-{uuid.uuid4().hex[:8]}"
    create(bootstrap, topic, 1)
    slow = producer(bootstrap, f"tx-{topic}", **{"transaction.timeout.ms": 2000})
    slow.begin_transaction()
    for i in range(5):
        slow.produce(topic, value=f"stale-{i}".encode())
    slow.flush(TIMEOUT)
    time.sleep(5)
    failed = False
    try:
        slow.commit_transaction(TIMEOUT)
    except KafkaException:
        failed = True
    other = producer(bootstrap, f"tx2-{topic}")
    other.begin_transaction()
    other.produce(topic, value=b"after")
    other.commit_transaction(TIMEOUT)
    values = [v for _, _, v in read_all(bootstrap, topic, "read_committed", 1)]
    ok = failed and values == ["after"]
    return {"ok": ok, "commit_failed": failed, "visible": values}


def crash_open(bootstrap, topic, timeout_ms=6000):
    """Before a kill -9 of the broker: one committed transaction, then one left open."""
    create(bootstrap, topic, 1)
    p = producer(bootstrap, f"tx-{topic}", **{"transaction.timeout.ms": timeout_ms})
    p.begin_transaction()
    for i in range(10):
        p.produce(topic, value=f"c-{i}".encode())
    p.commit_transaction(TIMEOUT)
    p.begin_transaction()
    for i in range(10):
        p.produce(topic, value=f"open-{i}".encode())
    p.flush(TIMEOUT)  # acknowledged (acks=all): on disk, in an open transaction
    return {"ok": True}


def crash_check(bootstrap, topic):
    """After the restart: the open transaction still holds the LSO, so read_committed sees only
    the committed one; the broker then aborts it on its timeout, and records committed after
    it become visible. The open transaction's records never are."""
    early = [v for _, _, v in read_all(bootstrap, topic, "read_committed", 10, limit=10)]
    raw = [v for _, _, v in read_all(bootstrap, topic, "read_uncommitted", 20, limit=10)]
    other = producer(bootstrap, f"tx2-{topic}")
    other.begin_transaction()
    other.produce(topic, value=b"after")
    other.commit_transaction(TIMEOUT)
    late = [v for _, _, v in read_all(bootstrap, topic, "read_committed", 11, limit=40)]
    committed = [f"c-{i}" for i in range(10)]
    ok = early == committed and len(raw) == 20 and late == committed + ["after"]
    return {"ok": ok, "early": early, "read_uncommitted": len(raw), "late": late}


def crash_commit(bootstrap, topic):
    """Commits a transaction while the broker dies between EndTxn's decision and its markers
    (the test restarts it on the same port): the commit still succeeds (librdkafka retries
    EndTxn, which the restarted broker answers from the completed transaction), and the
    records are visible read_committed."""
    create(bootstrap, topic, 1)
    p = producer(bootstrap, f"tx-{topic}")
    p.begin_transaction()
    for i in range(10):
        p.produce(topic, value=f"d-{i}".encode())
    p.flush(TIMEOUT)
    committed = False
    error = ""
    try:
        p.commit_transaction(90)
        committed = True
    except KafkaException as e:
        error = str(e.args[0])
    values = [v for _, _, v in read_all(bootstrap, topic, "read_committed", 10)]
    ok = committed and values == [f"d-{i}" for i in range(10)]
    return {"ok": ok, "committed": committed, "error": error, "visible": values}


PHASES = {"crash_open": crash_open, "crash_check": crash_check, "crash_commit": crash_commit}

SCENARIOS = {
    "commit_abort": commit_abort,
    "send_offsets": send_offsets,
    "zombie": zombie,
    "timeout": timeout,
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--phase", choices=list(PHASES))
    parser.add_argument("--topic")
    parser.add_argument("--txn-timeout-ms", type=int)
    args = parser.parse_args()
    if args.phase:
        try:
            extra = {"timeout_ms": args.txn_timeout_ms} if args.txn_timeout_ms else {}
            result = PHASES[args.phase](args.bootstrap, args.topic, **extra)
        except Exception as e:  # reported, and counted as a failure
            result = {"ok": False, "exception": repr(e)}
        result["scenario"] = args.phase
        print(json.dumps(result), flush=True)
        # No clean close: the open transaction must stay open, as after a crash.
        os._exit(0 if result["ok"] else 1)
    failed = False
    for name in args.scenarios.split(","):
        try:
            result = SCENARIOS[name](args.bootstrap)
        except Exception as e:  # reported, and counted as a failure
            result = {"ok": False, "exception": repr(e)}
        result["scenario"] = name
        print(json.dumps(result), flush=True)
        failed = failed or not result["ok"]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
