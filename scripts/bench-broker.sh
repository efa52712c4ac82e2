#!/usr/bin/env bash
# semel-broker's produce path under librdkafka producers (kcat), in one run, on this machine:
#
#  1. one producer, 1,000,000 x 100 B, acks=all, idempotent, linger.ms=5, batch.size=1 MB:
#     semel-broker (release, fsync before each acks=all answer) against librdkafka's own
#     in-process mock broker, which stores nothing on disk: the ceiling of what this client
#     reaches on this machine. Runs alternate; medians and the ratio.
#  2. what idempotence costs the broker: examples/produce_load (4 connections, 5 requests in
#     flight each, 100 records of 100 B per batch, acks=all, 3 s, a fresh broker each run)
#     with and without producer ids and sequences, alternating. (librdkafka itself is slower idempotent, against the
#     mock too, so kcat cannot show the broker's share.)
#  3. 1 to 4 producers at once (each the load of 1, its own topic): aggregate records/s, and
#     the machine's CPU use (from /proc/stat) while they ran.
#  4. 1 KiB records, acks=all, large batches: kcat (batch.size=1 MB, linger.ms=50, idempotent
#     and not) into the broker above, and produce_load (960 records per batch, about 1 MB;
#     idempotent; 4 connections x 5 in flight; 8 s; a fresh embedded broker each run; MB/s of
#     values, about 2 % below the bytes written) taking turns with the device's sequential
#     write bandwidth: dd of 8 GiB with O_DIRECT in 4 MiB writes (no page cache), the ratio
#     run by run. Also dd of 1 GiB into the page cache with one fdatasync, which this
#     machine's host partly absorbs.
#
#   scripts/bench-broker.sh [RUNS] [RECORDS]          (defaults: 5 1000000)
#
# kcat runs on the librdkafka of the confluent-kafka wheel in ~/.cache/semel/venv (installed
# by scripts/setup.sh; 2.x, newer than Debian's) when it is there; LIBRDKAFKA=FILE names
# another. Everything shares this machine's cores: the broker, the producers, the mock.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-5}"
records="${2:-1000000}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/semel/target}"
bash scripts/setup.sh >/dev/null
command -v kcat >/dev/null || { echo "bench-broker: kcat is missing (scripts/setup.sh installs it)" >&2; exit 1; }
cargo build --release --locked -p semel-broker
cargo build --release --locked --no-default-features --example produce_load
semel_bin="$CARGO_TARGET_DIR/release/semel-broker"
load_bin="$CARGO_TARGET_DIR/release/examples/produce_load"
work=$(mktemp -d)
port=29491
fresh=""
cleanup() {
  # Wait for the brokers to exit, so nothing writes into $work as it is removed.
  local pid
  for pid in "$(cat "$work/semel.pid" 2>/dev/null)" "$fresh"; do
    [ -n "$pid" ] || continue
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

library="${LIBRDKAFKA:-$(ls "$HOME"/.cache/semel/venv/lib/python*/site-packages/confluent_kafka.libs/librdkafka*.so* 2>/dev/null | head -n 1 || true)}"
if [ -n "$library" ]; then
  mkdir -p "$work/lib"
  ln -s "$library" "$work/lib/librdkafka.so.1"
  export LD_LIBRARY_PATH="$work/lib"
fi
version=$(kcat -V 2>&1 | grep -o 'librdkafka [0-9.]*' | head -n 1)

python3 - "$work" "$records" <<'EOF'
import sys
work, n = sys.argv[1], int(sys.argv[2])
with open(f"{work}/100.txt", "w") as f:
    f.write(("x" * 99 + "\n") * n)
with open(f"{work}/1024.txt", "w") as f:
    f.write(("y" * 1023 + "\n") * max(1, n // 5))
EOF

# The mock broker makes 4 partitions per topic; semel-broker does the same here.
"$semel_bin" --listen "127.0.0.1:$port" --data-dir "$work/data" --num-partitions 4 \
  --log-level warn >"$work/semel.log" 2>&1 &
echo $! >"$work/semel.pid"
for _ in $(seq 1 100); do
  kcat -b "127.0.0.1:$port" -L -m 1 >/dev/null 2>&1 && break
  sleep 0.1
done

topic=0
# produce TARGET FILE IDEMPOTENT [EXTRA -X ...]: seconds taken by one kcat run.
produce() {
  local target="$1" file="$2" idempotent="$3"
  shift 3
  topic=$((topic + 1))
  local where=(-b "127.0.0.1:$port")
  [ "$target" = mock ] && where=(-X test.mock.num.brokers=1 -b mock:1)
  local start end
  start=$(date +%s.%N)
  kcat -P "${where[@]}" -t "bench-$topic" -X acks=all -X "enable.idempotence=$idempotent" \
    -X linger.ms=5 -X batch.size=1000000 "$@" -l "$file" 2>>"$work/kcat.err"
  end=$(date +%s.%N)
  python3 -c 'import sys; print(float(sys.argv[2]) - float(sys.argv[1]))' "$start" "$end"
}
median() { python3 -c 'import sys, statistics; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }
rate() { python3 -c 'import sys; print(f"{float(sys.argv[1]) / float(sys.argv[2]):.0f}")' "$1" "$2"; }

echo "kcat with $version; $records records of 100 B; median of $runs runs; $(nproc) cores"
echo
echo "| broker | records/s (median) | runs |"
echo "| --- | --- | --- |"
mock=() semel=()
for _ in $(seq 1 "$runs"); do
  mock+=("$(rate "$records" "$(produce mock "$work/100.txt" true)")")
  semel+=("$(rate "$records" "$(produce semel "$work/100.txt" true)")")
done
m=$(median "${mock[@]}") s=$(median "${semel[@]}")
echo "| librdkafka mock (in-process, no disk) | $m | ${mock[*]} |"
echo "| semel-broker (fsync per acks=all answer) | $s | ${semel[*]} |"
python3 -c 'import sys; m, s = map(float, sys.argv[1:]); print(f"\nsemel-broker / mock ceiling: {s / m:.2f}")' "$m" "$s"

echo
plain=() idem=()
for _ in $(seq 1 "$runs"); do
  for mode in plain idem; do
    flag=()
    [ "$mode" = idem ] && flag=(--idempotent)
    # A fresh broker each time: on a shared one, later runs are slower as the page cache
    # fills with earlier runs' data, and that drift is larger than the difference measured.
    rm -rf "$work/fresh"
    "$semel_bin" --listen "127.0.0.1:$((port + 1))" --data-dir "$work/fresh" --num-partitions 4 \
      --log-level warn >"$work/fresh.log" 2>&1 &
    fresh=$!
    for _ in $(seq 1 100); do
      kcat -b "127.0.0.1:$((port + 1))" -L -m 1 >/dev/null 2>&1 && break
      sleep 0.1
    done
    out=$("$load_bin" --bootstrap "127.0.0.1:$((port + 1))" --acks all --seconds 3 "${flag[@]}" | tail -n 1)
    kill "$fresh"
    wait "$fresh" 2>/dev/null || true
    r=$(echo "$out" | grep -o '[0-9]* records/s' | cut -d' ' -f1)
    if [ "$mode" = idem ]; then idem+=("$r"); else plain+=("$r"); fi
  done
done
p=$(median "${plain[@]}") i=$(median "${idem[@]}")
echo "produce_load, acks=all: without producer ids $p records/s (${plain[*]}); idempotent $i (${idem[*]})"
python3 -c 'import sys; p, i = map(float, sys.argv[1:]); print(f"idempotence costs semel-broker {100 * (1 - i / p):.1f} % (medians)")' "$p" "$i"

echo
echo "| producers at once | aggregate records/s | CPU busy |"
echo "| --- | --- | --- |"
cpu_busy() { awk '/^cpu /{print $2+$3+$4+$7+$8, $5+$6}' /proc/stat; }
for n in 1 2 3 4; do
  read -r busy0 idle0 < <(cpu_busy)
  start=$(date +%s.%N)
  pids=()
  for i in $(seq 1 "$n"); do
    topic=$((topic + 1))
    kcat -P -b "127.0.0.1:$port" -t "bench-$topic" -X acks=all -X enable.idempotence=true \
      -X linger.ms=5 -X batch.size=1000000 -l "$work/100.txt" 2>>"$work/kcat.err" &
    pids+=($!)
  done
  wait "${pids[@]}"
  end=$(date +%s.%N)
  read -r busy1 idle1 < <(cpu_busy)
  python3 -c 'import sys
n, r, s, e, b0, i0, b1, i1 = sys.argv[1:]
secs = float(e) - float(s)
busy = (float(b1) - float(b0)) / ((float(b1) - float(b0)) + (float(i1) - float(i0)))
print(f"| {n} | {int(n) * int(r) / secs:.0f} | {100 * busy:.0f} % |")' \
    "$n" "$records" "$start" "$end" "$busy0" "$idle0" "$busy1" "$idle1"
done

echo
large=$(( records / 5 > 0 ? records / 5 : 1 ))
dd if=/dev/zero of="$work/dd" bs=1M count=1024 conv=fdatasync 2>"$work/dd.err" || true
disk=$(grep -o '[0-9.,]* [MG]B/s' "$work/dd.err" | tail -n 1)
echo "The disk (dd 1 GiB into the page cache, one fdatasync): $disk"
for idempotent in false true; do
  kib=()
  for _ in $(seq 1 "$runs"); do
    secs=$(produce semel "$work/1024.txt" "$idempotent" -X linger.ms=50)
    kib+=("$(python3 -c 'import sys; print(f"{int(sys.argv[1]) * 1024 / float(sys.argv[2]) / 1e6:.0f}")' "$large" "$secs")")
  done
  echo "kcat, 1 KiB x $large, acks=all, idempotent=$idempotent, batch.size=1000000, linger.ms=50: semel-broker $(median "${kib[@]}") MB/s (runs: ${kib[*]})"
done
# The device and the broker write about the same amount each time (8 GiB, 8 s), taking turns
# at going first: this machine's host lets a burst through faster than a sustained stream, so
# a short dd next to a long broker run would compare unlike things. The broker here is
# produce_load's embedded one (the same code), in a fresh directory that is deleted with it:
# five runs into one broker at 1 GB/s would fill the disk.
disk_mb() {
  # A failed dd (no O_DIRECT on this file system, a full disk) counts as 0 MB/s, not an abort.
  LC_ALL=C dd if=/dev/zero of="$work/dd" bs=4M count=2048 oflag=direct 2>"$work/dd.err" || true
  rm -f "$work/dd"
  (grep -o '[0-9.]* [kMG]B/s' "$work/dd.err" || true) | tail -n 1 | python3 -c '
import sys
words = sys.stdin.read().split()
scale = {"kB/s": 0.001, "MB/s": 1, "GB/s": 1000}
print(round(float(words[0]) * scale[words[1]]) if len(words) == 2 else 0)'
}
broker_mb() {
  TMPDIR="$work" "$load_bin" --acks all --idempotent --seconds 8 --record-bytes 1024 \
    --batch-records 960 | tail -n 1 | grep -o '[0-9.]* MB/s' | cut -d' ' -f1
}
kib=()
direct=()
ratios=()
for run in $(seq 1 "$runs"); do
  if [ $((run % 2)) -eq 1 ]; then
    d=$(disk_mb)
    b=$(broker_mb)
  else
    b=$(broker_mb)
    d=$(disk_mb)
  fi
  direct+=("$d")
  kib+=("$b")
  ratios+=("$(python3 -c 'import sys; d = float(sys.argv[2]); print(f"{float(sys.argv[1]) / d:.2f}" if d else "0")' "$b" "$d")")
done
echo "The disk (dd 8 GiB, O_DIRECT, 4 MiB writes): $(median "${direct[@]}") MB/s (runs: ${direct[*]})"
echo "produce_load, 1 KiB, 960 per batch, idempotent, 4 connections x 5 in flight, acks=all, 8 s, a fresh embedded broker each run: $(median "${kib[@]}") MB/s of values (runs: ${kib[*]})"
echo "semel-broker / disk, run by run: ${ratios[*]} (median $(median "${ratios[@]}"))"
rm -f "$work/dd"
