#!/usr/bin/env bash
# Runs the tour (scripts/demo.sh) the way a new user's first run does: from a clean clone of
# this repository's HEAD, with none of the workspace's own crates, binaries or examples built
# before it. Third-party builds in the shared target directory (RocksDB's C++ above all) are
# kept: they are the same on every machine, and rebuilding them costs 20 minutes. CI runs it
# (.ci/run), so a tour that only works because the test build left something behind fails.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/semel/target}"
# Our crates built by the tour come from the temporary clone (paths compiled in with file!()
# or env!("CARGO_MANIFEST_DIR") point into it). Cargo's fingerprints do not depend on the
# clone's path and this checkout's files are older than the tour's build, so a later build
# here would reuse them: clean them again on the way out, whatever the tour's result.
ours=(-p semel -p semel-broker -p semel-client -p semel-producer -p semel-consumer -p semel-records)
work=$(mktemp -d)
cleanup() {
  if [ -d "$CARGO_TARGET_DIR" ]; then
    cargo clean --quiet "${ours[@]}" || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
git clone -q . "$work/semel"
if [ -d "$CARGO_TARGET_DIR" ]; then
  (cd "$work/semel" && cargo clean --quiet "${ours[@]}")
fi
started=$(date +%s)
bash "$work/semel/scripts/demo.sh"
echo "fresh-tour: the tour passed from a clean clone in $(($(date +%s) - started)) s"
