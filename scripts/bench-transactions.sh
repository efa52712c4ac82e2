#!/usr/bin/env bash
# Transactional produce (1,000 records per transaction) next to idempotent produce, against a
# release semel-broker in a temporary directory, with librdkafka from the confluent-kafka
# wheel. Arguments go to scripts/bench-transactions.py (--count, --size, --per-txn).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/semel/target-release-nodedup}"
cargo build --release --locked -p semel-broker
python="${SEMEL_PYTHON:-$HOME/.cache/semel/venv/bin/python}"
dir=$(mktemp -d)
port=$((20000 + RANDOM % 10000))
"$CARGO_TARGET_DIR/release/semel-broker" --listen "127.0.0.1:$port" --data-dir "$dir" \
  --log-level warn >"$dir/broker.log" 2>&1 &
broker=$!
trap 'kill "$broker" 2>/dev/null; wait "$broker" 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 50); do
  grep -q "listening" "$dir/broker.log" && break
  sleep 0.1
done
timeout 600 "$python" scripts/bench-transactions.py --bootstrap "127.0.0.1:$port" "$@"
