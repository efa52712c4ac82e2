#!/usr/bin/env bash
# Builds and runs semel-broker on 127.0.0.1:9092 with its data in ./semel-data. Extra
# arguments go to the broker (see --help); Ctrl-C stops it cleanly. Needs only cargo: the
# broker does not use RocksDB or any of the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1; then
  echo "broker.sh: cargo is missing; install Rust 1.85 or newer (https://rustup.rs)" >&2
  exit 1
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/semel/target}"
exec cargo run --release --locked -p semel-broker -- "$@"
