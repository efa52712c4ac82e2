#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, unit tests, and integration tests against
# real third-party clients (kcat/librdkafka, kafka-python). Installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One warm target directory outside the clone, so CI and repeated runs do not rebuild everything.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/semel/target}"
export SEMEL_PYTHON="${SEMEL_PYTHON:-$HOME/.cache/semel/venv/bin/python}"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --bins --locked
cargo test --workspace --locked
