#!/usr/bin/env bash
# Installs what is missing, builds, and runs semel-broker on 127.0.0.1:9092 with its data in
# ./semel-data. Extra arguments go to the broker (see --help); Ctrl-C stops it cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/semel/target}"
exec cargo run --release --locked -p semel-broker -- "$@"
