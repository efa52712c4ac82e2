#!/usr/bin/env bash
# Installs what building and testing Semel needs, skipping whatever is already there.
#   - Debian packages: kcat (librdkafka, for interop tests), clang + libclang-dev (RocksDB's
#     bindings, for semel-consumer's dedup store), python3-venv.
#   - A Python virtualenv with kafka-python and its compression codecs, for interop tests.
#   - A JDK (openjdk-17-jdk-headless) and Maven, then the Apache Kafka jars that
#     scripts/kafka.sh resolves with them (once, into ~/.cache/semel/kafka), for
#     tests/java_clients.rs.
# Idempotent and quiet when nothing is missing.
set -euo pipefail

SEMEL_CACHE="${SEMEL_CACHE:-$HOME/.cache/semel}"
VENV="$SEMEL_CACHE/venv"
PYTHON_PACKAGES=(kafka-python==3.0.12 confluent-kafka==2.16.1 python-snappy==0.7.3 cramjam==2.14.0 lz4==4.4.5 zstandard==0.25.0)

need_apt=()
command -v kcat >/dev/null 2>&1 || need_apt+=(kcat)
command -v clang >/dev/null 2>&1 || need_apt+=(clang)
dpkg -s libclang-dev >/dev/null 2>&1 || need_apt+=(libclang-dev)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3-venv)
java_missing=()
command -v java >/dev/null 2>&1 || java_missing+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null 2>&1 || java_missing+=(maven)
if ((${#java_missing[@]})); then
  echo "setup: java or mvn is missing; tests/java_clients.rs runs Apache Kafka's Java tools," \
    "which need ${java_missing[*]}"
  need_apt+=("${java_missing[@]}")
fi
if ((${#need_apt[@]})); then
  echo "setup: installing Debian packages: ${need_apt[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# Rust cannot be installed from here (rustup downloads toolchains from its own servers):
# check what the build needs and say what to do.
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is missing; install Rust 1.89 or newer (https://rustup.rs) and run this again" >&2
  exit 1
fi
rust_version=$(rustc --version | awk '{print $2}')
if ! printf '1.89.0\n%s\n' "${rust_version%%-*}" | sort -V -C; then
  echo "setup: Rust $rust_version is too old: Semel needs 1.89 or newer (edition 2024, File::try_lock)." >&2
  echo "setup: run 'rustup update stable' (or install a newer toolchain) and run this again" >&2
  exit 1
fi
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    if command -v rustup >/dev/null 2>&1 && rustup component add "$component" >/dev/null 2>&1; then
      echo "setup: installed the $component component"
    else
      echo "setup: cargo ${component/rustfmt/fmt} is missing: run 'rustup component add $component'" >&2
      exit 1
    fi
  fi
done

stamp="$VENV/.semel-packages"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "${PYTHON_PACKAGES[*]}" ]; then
  echo "setup: creating Python virtualenv $VENV"
  mkdir -p "$SEMEL_CACHE"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "${PYTHON_PACKAGES[@]}"
  echo "${PYTHON_PACKAGES[*]}" > "$stamp"
fi

# Apache Kafka's jars for tests/java_clients.rs; a no-op once they are cached.
kafka_sh="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/kafka.sh"
if ! kafka_log=$(bash "$kafka_sh" fetch 2>&1); then
  echo "$kafka_log" >&2
  echo "setup: scripts/kafka.sh fetch failed (it needs java, mvn and Maven Central)" >&2
  exit 1
fi
