#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, unit tests, integration tests against real
# third-party clients (kcat/librdkafka, kafka-python, Apache Kafka's Java tools), and a short
# fuzz run. Installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One warm target directory outside the clone, so CI and repeated runs do not rebuild everything.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/semel/target}"
export SEMEL_PYTHON="${SEMEL_PYTHON:-$HOME/.cache/semel/venv/bin/python}"
cargo fmt --all -- --check
# RocksDB's C++ is compiled once, by this build (the tour's build is the same one), and
# `cargo test` reuses it. The tests run the broker and example binaries as child processes.
cargo build --workspace --bins --examples --locked
# Clippy's artifacts are kept apart from the build's (it wraps rustc), so on its own it would
# compile RocksDB's C++ a second time. Checking does not link: point librocksdb-sys at the
# library just built instead (its build script then only generates the bindings).
rocksdb_lib=$(find "$CARGO_TARGET_DIR/debug/build" -path '*librocksdb-sys-*/out/librocksdb.a' -print -quit)
if [ -n "$rocksdb_lib" ]; then
  ROCKSDB_LIB_DIR=$(dirname "$rocksdb_lib") ROCKSDB_STATIC=1 \
    cargo clippy --workspace --all-targets --locked -- -D warnings
else
  cargo clippy --workspace --all-targets --locked -- -D warnings
fi
cargo test --workspace --locked
# A short fuzz run of every decoder that reads network bytes (FUZZ_SECONDS each, 10 by
# default; nightly and cargo-fuzz are installed on first use).
bash scripts/fuzz.sh
