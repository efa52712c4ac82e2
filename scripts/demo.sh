#!/usr/bin/env bash
# The tour: every example in quick mode, each on its own embedded broker, each showing what
# goes wrong without Semel and that it does not with it. Installs what is missing and builds
# first (the first build compiles RocksDB from C++: many minutes on 2 cores).
#   scripts/demo.sh                    # all of them
#   scripts/demo.sh duplicate_consume  # just some
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/semel/target}"
# The acks example runs the broker binary as a child (so its kill -9 is real).
cargo build --locked --bins --examples
examples=("$@")
if ((${#examples[@]} == 0)); then
  examples=(duplicate_send duplicate_consume acks rebalance exactly_once_pipeline)
fi
failed=()
for example in "${examples[@]}"; do
  printf '\n===== %s =====\n\n' "$example"
  if ! "$CARGO_TARGET_DIR/debug/examples/$example" --quick; then
    failed+=("$example")
  fi
done
if ((${#failed[@]})); then
  printf '\nFAILED: %s\n' "${failed[*]}" >&2
  exit 1
fi
printf '\nAll %d examples showed the failure without Semel and none with it.\n' "${#examples[@]}"
