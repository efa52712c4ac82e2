#!/usr/bin/env bash
# The tour: every example in quick mode, each on its own embedded broker, each showing what
# goes wrong without Semel and that it does not with it. Installs what is missing and builds
# first (the first build compiles RocksDB from C++: about 20 minutes on 2 cores).
#   scripts/demo.sh                    # all of them
#   scripts/demo.sh duplicate_consume  # just some
# Each example gets SEMEL_EXAMPLE_TIMEOUT seconds (default 600); one that runs out is
# stopped and counted as failed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/semel/target}"
# --workspace: the root is also a package, and without it only the root's targets are built;
# the acks example runs the broker binary (semel-broker) as a child, so its kill -9 is real.
# The same target selection as scripts/test.sh's, so both share one RocksDB build.
cargo build --workspace --bins --examples --locked
examples=("$@")
if ((${#examples[@]} == 0)); then
  examples=(duplicate_send dedup_window duplicate_consume acks rebalance exactly_once_pipeline)
fi
limit="${SEMEL_EXAMPLE_TIMEOUT:-600}"
failed=()
for example in "${examples[@]}"; do
  printf '\n===== %s =====\n\n' "$example"
  status=0
  timeout --kill-after=10 "$limit" "$CARGO_TARGET_DIR/debug/examples/$example" --quick || status=$?
  if ((status == 124 || status == 137)); then
    printf '\n%s: still running after %s s; stopped\n' "$example" "$limit" >&2
  fi
  if ((status != 0)); then
    failed+=("$example")
  fi
done
if ((${#failed[@]})); then
  printf '\nFAILED: %s\n' "${failed[*]}" >&2
  exit 1
fi
printf '\nAll %d examples showed the failure without Semel and none with it.\n' "${#examples[@]}"
