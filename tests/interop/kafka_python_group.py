"""kafka-python consumer group against semel-broker (run by tests/consumer_groups.rs).

Usage: kafka_python_group.py BOOTSTRAP TOPIC STRATEGY

The topic has 6 partitions holding p<partition>-<n> for n in 0..50. Three consumers join one
group with the given assignor, each in its own thread: together they must own every partition
exactly once and consume every message. One closes (LeaveGroup); the other two must take over
all partitions. After all close, a new consumer must find the committed offsets (50 each) and
read only what was produced after them.
Exits non-zero with a message on any failure.
"""

import sys
import threading
import time

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor

BOOTSTRAP, TOPIC, STRATEGY = sys.argv[1:4]
GROUP = "py-group-" + STRATEGY
PARTITIONS = 6
PER_PARTITION = 50
PATIENCE = 60.0
ASSIGNOR = {"range": RangePartitionAssignor, "roundrobin": RoundRobinPartitionAssignor}[STRATEGY]


def consumer():
    return KafkaConsumer(
        TOPIC,
        bootstrap_servers=BOOTSTRAP,
        group_id=GROUP,
        partition_assignment_strategy=[ASSIGNOR],
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=500,
    )


class Member(threading.Thread):
    def __init__(self, name, seen, lock):
        super().__init__(daemon=True)
        self.name = name
        self.seen = seen
        self.lock = lock
        self.stop = threading.Event()
        self.assigned = frozenset()
        self.error = None

    def run(self):
        try:
            c = consumer()
            while not self.stop.is_set():
                batches = c.poll(timeout_ms=200)
                with self.lock:
                    for records in batches.values():
                        for r in records:
                            self.seen.append((r.partition, r.offset, r.value.decode()))
                if batches:
                    c.commit()
                self.assigned = frozenset(tp.partition for tp in c.assignment())
            c.close()  # commits nothing more (auto commit is off) and sends LeaveGroup
        except Exception as e:  # reported by the main thread
            self.error = e


def wait(what, condition):
    deadline = time.time() + PATIENCE
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.1)
    sys.exit("timed out waiting for " + what)


def balanced(members):
    owned = [m.assigned for m in members]
    union = frozenset().union(*owned)
    return (
        all(owned)
        and sum(len(o) for o in owned) == PARTITIONS
        and union == frozenset(range(PARTITIONS))
    )


def check_errors(members):
    for m in members:
        if m.error is not None:
            sys.exit("consumer %s failed: %r" % (m.name, m.error))


seen = []
lock = threading.Lock()
members = [Member("c%d" % i, seen, lock) for i in range(3)]
for m in members:
    m.start()
expected = {"p%d-%d" % (p, n) for p in range(PARTITIONS) for n in range(PER_PARTITION)}
wait("three balanced members", lambda: check_errors(members) or balanced(members))
wait("every message", lambda: expected <= {v for _, _, v in seen})

# One member leaves; the other two take over every partition.
members[0].stop.set()
members[0].join(PATIENCE)
wait("two balanced members", lambda: check_errors(members) or balanced(members[1:]))
for m in members[1:]:
    m.stop.set()
    m.join(PATIENCE)
check_errors(members)

# Committed offsets are where a new member starts.
producer = KafkaProducer(bootstrap_servers=BOOTSTRAP)
for p in range(PARTITIONS):
    for n in range(PER_PARTITION, PER_PARTITION + 5):
        producer.send(TOPIC, value=("p%d-%d" % (p, n)).encode(), partition=p)
producer.flush()
producer.close()

c = consumer()
c.poll(timeout_ms=100)  # join the group
committed = [c.committed(TopicPartition(TOPIC, p)) for p in range(PARTITIONS)]
if committed != [PER_PARTITION] * PARTITIONS:
    sys.exit("committed offsets %r, expected %d each" % (committed, PER_PARTITION))
fresh = []
deadline = time.time() + PATIENCE
while len(fresh) < PARTITIONS * 5 and time.time() < deadline:
    for records in c.poll(timeout_ms=200).values():
        fresh.extend((r.partition, r.offset) for r in records)
c.close()
if len(fresh) != PARTITIONS * 5:
    sys.exit("resumed consumer read %d messages, expected %d" % (len(fresh), PARTITIONS * 5))
early = [f for f in fresh if f[1] < PER_PARTITION]
if early:
    sys.exit("re-read before the committed offsets: %r" % early[:5])
print("ok: %s group balanced, took over, resumed from commits" % STRATEGY)
