#!/usr/bin/env bash
# Runs the tour (scripts/demo.sh) the way a new user's first run does: from a clean clone of
# this repository's HEAD, with none of the workspace's own crates, binaries or examples built
# before it. Third-party builds in the shared target directory (RocksDB's C++ above all) are
# kept: they are the same on every machine, and rebuilding them costs 20 minutes. CI runs it
# (.ci/run), so a tour that only works because the test build left something behind fails.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/semel/target}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q . "$work/semel"
if [ -d "$CARGO_TARGET_DIR" ]; then
  (cd "$work/semel" && cargo clean --quiet -p semel -p semel-broker -p semel-client \
    -p semel-producer -p semel-consumer -p semel-records)
fi
started=$(date +%s)
bash "$work/semel/scripts/demo.sh"
echo "fresh-tour: the tour passed from a clean clone in $(($(date +%s) - started)) s"
