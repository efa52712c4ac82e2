#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ with libFuzzer for FUZZ_SECONDS each (default 10; the
# README gives the longer run and its result). Needs a nightly toolchain and cargo-fuzz:
# installs both when missing. A crash, a leak, an allocation over 2 GiB or an input slower
# than 10 s fails the run; the input that did it is saved under fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${FUZZ_SECONDS:-10}"
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz: installing the nightly toolchain (libFuzzer's sanitizers need it)"
  rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
# Kept apart from the main target directory: nightly and sanitizer flags would evict it.
export CARGO_TARGET_DIR="${SEMEL_FUZZ_TARGET_DIR:-$HOME/.cache/semel/fuzz-target}"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for target in $(cargo +nightly fuzz list); do
  mkdir -p "corpus/$target"
  if ! cargo +nightly fuzz run "$target" "corpus/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=10 \
    -print_final_stats=1 >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "fuzz: $target FAILED (the input is under fuzz/artifacts/$target/)" >&2
    exit 1
  fi
  runs=$(awk '/^stat::number_of_executed_units:/ {print $2}' "$log")
  peak=$(awk '/^stat::peak_rss_mb:/ {print $2}' "$log")
  echo "fuzz: $target: ${runs:-?} inputs in ${seconds}s, peak ${peak:-?} MB, no failure"
done
