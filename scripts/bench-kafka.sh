#!/usr/bin/env bash
# Produce throughput, side by side in one run: Apache Kafka (single node, from
# scripts/kafka.sh) and semel-broker (release build), each loaded by Kafka's own
# kafka-producer-perf-test (the Java client) and by kcat (librdkafka), with 100-byte and
# 1 KiB records, acks=all, idempotent. Prints one table row per (broker, client, size).
#
#   scripts/bench-kafka.sh [RECORDS_100B] [RECORDS_1KIB]     (defaults: 1000000 200000)
#
# Durability differs, and the table says so: semel-broker answers acks=all after an fsync;
# a single Kafka broker answers once the leader wrote to the page cache (flush.messages is
# unlimited by default), as Kafka relies on replication, not fsync.
set -euo pipefail
cd "$(dirname "$0")/.."
small="${1:-1000000}"
large="${2:-200000}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/semel/target}"
bash scripts/setup.sh
command -v kcat >/dev/null || { echo "bench-kafka: kcat is missing (scripts/setup.sh installs it)" >&2; exit 1; }
cargo build --release --locked -p semel-broker
semel_bin="$CARGO_TARGET_DIR/release/semel-broker"
work=$(mktemp -d)
semel_port=29391
cleanup() {
  bash scripts/kafka.sh stop "$work/kafka" >/dev/null 2>&1 || true
  [ -f "$work/semel.pid" ] && kill "$(cat "$work/semel.pid")" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# The inputs: one record per line (kcat) and the same sizes for the Java tool.
python3 - "$work" "$small" "$large" <<'EOF'
import sys
work, small, large = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(f"{work}/100.txt", "w") as f:
    f.write(("x" * 99 + "\n") * small)
with open(f"{work}/1024.txt", "w") as f:
    f.write(("y" * 1023 + "\n") * large)
EOF

kafka_bootstrap=$(bash scripts/kafka.sh start1 "$work/kafka" | tail -n 1)
"$semel_bin" --listen "127.0.0.1:$semel_port" --data-dir "$work/semel-data" \
  --log-level warn >"$work/semel.log" 2>&1 &
echo $! >"$work/semel.pid"
for _ in $(seq 1 100); do
  kcat -b "127.0.0.1:$semel_port" -L -m 1 >/dev/null 2>&1 && break
  sleep 0.1
done

kcat_label="kcat, $(kcat -V 2>&1 | grep -o 'librdkafka [0-9.]*' | head -n 1)"
echo "| broker | client | record | records | records/s | MB/s |"
echo "| --- | --- | --- | --- | --- | --- |"
run=0
for broker in kafka semel; do
  if [ "$broker" = kafka ]; then bootstrap="$kafka_bootstrap"; else bootstrap="127.0.0.1:$semel_port"; fi
  for size in 100 1024; do
    if [ "$size" = 100 ]; then count="$small"; else count="$large"; fi
    run=$((run + 1))
    topic="perf-java-$size-$run"
    out=$(bash scripts/kafka.sh tool producer-perf-test --topic "$topic" --num-records "$count" \
      --record-size "$size" --throughput -1 \
      --producer-props "bootstrap.servers=$bootstrap" acks=all enable.idempotence=true \
      linger.ms=5 batch.size=65536 2>/dev/null | tail -n 1)
    rate=$(echo "$out" | sed -E 's/.* ([0-9.]+) records\/sec \(([0-9.]+) MB\/sec\).*/\1 \2/')
    echo "| $broker | kafka-producer-perf-test 4.1.2 | $size B | $count | ${rate% *} | ${rate#* } |"
    topic="perf-kcat-$size-$run"
    kcat -b "$bootstrap" -L -t "$topic" >/dev/null 2>&1 || true
    start=$(date +%s.%N)
    kcat -P -b "$bootstrap" -t "$topic" -X acks=all -X enable.idempotence=true \
      -X linger.ms=5 -X batch.size=1000000 -l "$work/$size.txt"
    end=$(date +%s.%N)
    python3 -c 'import sys
s = float(sys.argv[2]) - float(sys.argv[1])
n, b = int(sys.argv[3]), int(sys.argv[4])
print(f"| {sys.argv[5]} | {sys.argv[6]} | {b} B | {n} | {n / s:.0f} | {n * b / s / 1e6:.1f} |")' \
      "$start" "$end" "$count" "$size" "$broker" "$kcat_label"
  done
done
