#!/usr/bin/env bash
# kafka.sh - a real Apache Kafka (the JVM reference implementation) for interop testing.
#
# Resolves the Apache Kafka jars from Maven Central with Maven (no tarball, no Docker), runs
# a 1- or 3-broker KRaft cluster on loopback, and runs Kafka's own CLI tools (kafka-topics,
# kafka-consumer-groups, VerifiableProducer, ...) against any bootstrap server, including
# semel-broker.
#
# Usage:
#   scripts/kafka.sh fetch              resolve the jars once into ~/.cache/semel/kafka/<ver>/libs
#   scripts/kafka.sh classpath          print the classpath (fetches first if needed)
#   scripts/kafka.sh start1 DIR         format + start 1 broker, print the bootstrap string
#   scripts/kafka.sh start3 DIR         format + start 3 brokers, print the bootstrap string
#   scripts/kafka.sh stop DIR           SIGTERM every broker in DIR, wait (bounded), then SIGKILL
#   scripts/kafka.sh kill N DIR         kill -9 broker N (1-based)
#   scripts/kafka.sh restart N DIR      kill -9 broker N, start it again, wait until it answers
#   scripts/kafka.sh pause N DIR        kill -STOP broker N (it stops fetching: falls out of the ISR)
#   scripts/kafka.sh resume N DIR       kill -CONT broker N
#   scripts/kafka.sh status DIR         show which brokers in DIR are running
#   scripts/kafka.sh tool CLASS ARGS... run a Kafka CLI class (or one of the aliases below)
#
# Version: KAFKA_VERSION (default 4.1.2, the newest 4.1.x patch release). Override it to try
# another 4.x release; each version gets its own cache directory.
#
# Ports (loopback only): broker N (N = 1..3) listens for clients on 19091+N (19092, 19093,
# 19094) and for the KRaft controller quorum on 19191+N (19192, 19193, 19194). Every broker
# runs the combined broker+controller roles, node.id = N. Override the bases with
# KAFKA_CLIENT_PORT_BASE / KAFKA_CONTROLLER_PORT_BASE (port = base + N).
#
# TLS + SASL: with KAFKA_SASL_SSL_DIR set to a folder holding keystore.pem (the broker's
# PKCS#8 private key followed by its certificate chain, PEM) and scram-users (one
# "name password" per line), every broker also listens on a SASL_SSL listener at
# 19291+N (KAFKA_SASL_SSL_PORT_BASE) with PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512; the users'
# SCRAM credentials are added when the storage is formatted, and DIR/bootstrap-sasl-ssl holds
# that listener's bootstrap string. Clients then use security.protocol=SASL_SSL.
#
# Layout of DIR: DIR/nodeN/server.properties, DIR/nodeN/data (log.dirs and metadata log),
# DIR/nodeN/server.log (stdout+stderr of the JVM), DIR/nodeN/pid, DIR/cluster (1 or 3),
# DIR/bootstrap. Starting a DIR that is already formatted reuses its data; starting a
# broker that is already running leaves it alone, so start1/start3 are idempotent.
#
# Heap: KAFKA_HEAP (default -Xmx512m -Xms128m) per broker, KAFKA_TOOL_HEAP (default
# -Xmx256m) for tools. Waits are bounded: KAFKA_START_TIMEOUT seconds (default 90) for the
# cluster to answer, KAFKA_STOP_TIMEOUT (default 30) before SIGKILL.
#
# Tool aliases (the class that runs, for Kafka 4.1):
#   topics               org.apache.kafka.tools.TopicCommand
#   consumer-groups      org.apache.kafka.tools.consumer.group.ConsumerGroupCommand
#   configs              kafka.admin.ConfigCommand
#   console-producer     org.apache.kafka.tools.ConsoleProducer
#   console-consumer     org.apache.kafka.tools.consumer.ConsoleConsumer
#   producer-perf-test   org.apache.kafka.tools.ProducerPerformance
#   consumer-perf-test   org.apache.kafka.tools.ConsumerPerformance
#   verifiable-producer  org.apache.kafka.tools.VerifiableProducer
#   verifiable-consumer  org.apache.kafka.tools.VerifiableConsumer
#   api-versions         org.apache.kafka.tools.BrokerApiVersionsCommand
#   get-offsets          org.apache.kafka.tools.GetOffsetShell
#   delete-records       org.apache.kafka.tools.DeleteRecordsCommand
#   log-dirs             org.apache.kafka.tools.LogDirsCommand
#   transactions         org.apache.kafka.tools.TransactionsCommand
#   metadata-quorum      org.apache.kafka.tools.MetadataQuorumCommand
#   storage              kafka.tools.StorageTool
# Anything else is taken as a fully-qualified class name. Tool logging goes to stderr at WARN
# (KAFKA_TOOL_LOG_LEVEL to change it).
#
# Examples:
#   scripts/kafka.sh start1 /tmp/k1
#   scripts/kafka.sh tool topics --bootstrap-server 127.0.0.1:19092 --create --topic t --partitions 3
#   scripts/kafka.sh tool verifiable-producer --bootstrap-server 127.0.0.1:9092 --topic t --max-messages 100
#   scripts/kafka.sh stop /tmp/k1
#
# Needs java (17+, Debian: openjdk-17-jdk-headless) and mvn (Debian: maven); Maven must reach
# Maven Central the first time. Nothing here needs root or touches the repository.
set -euo pipefail

KAFKA_VERSION="${KAFKA_VERSION:-4.1.2}"
LOG4J_VERSION="${KAFKA_LOG4J_VERSION:-2.25.3}"
SLF4J_VERSION="${KAFKA_SLF4J_VERSION:-2.0.17}"
CACHE_DIR="${SEMEL_KAFKA_CACHE:-$HOME/.cache/semel/kafka}/$KAFKA_VERSION"
LIBS="$CACHE_DIR/libs"
MARKER="$CACHE_DIR/.fetched"
CLIENT_BASE="${KAFKA_CLIENT_PORT_BASE:-19091}"
CONTROLLER_BASE="${KAFKA_CONTROLLER_PORT_BASE:-19191}"
SASL_SSL_BASE="${KAFKA_SASL_SSL_PORT_BASE:-19291}"
SASL_SSL_DIR="${KAFKA_SASL_SSL_DIR:-}"
HEAP="${KAFKA_HEAP:--Xmx512m -Xms128m}"
TOOL_HEAP="${KAFKA_TOOL_HEAP:--Xmx256m}"
START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-30}"
FETCH_TIMEOUT="${KAFKA_FETCH_TIMEOUT:-900}"
SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"

die() { echo "kafka.sh: $*" >&2; exit 1; }
log() { echo "kafka.sh: $*" >&2; }

need_java() {
  command -v java >/dev/null 2>&1 ||
    die "java is missing; install a JDK 17+ (Debian/Ubuntu: apt-get install -y openjdk-17-jdk-headless)"
}

need_mvn() {
  command -v mvn >/dev/null 2>&1 ||
    die "mvn is missing; install Maven (Debian/Ubuntu: apt-get install -y maven)"
}

write_pom() {
  cat >"$CACHE_DIR/pom.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by scripts/kafka.sh; only used to resolve Apache Kafka $KAFKA_VERSION jars. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>semel.local</groupId>
  <artifactId>kafka-libs</artifactId>
  <version>$KAFKA_VERSION</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$KAFKA_VERSION</version></dependency>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId><version>$KAFKA_VERSION</version></dependency>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-clients</artifactId><version>$KAFKA_VERSION</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId><version>$SLF4J_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-api</artifactId><version>$LOG4J_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>$LOG4J_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId><version>$LOG4J_VERSION</version></dependency>
  </dependencies>
</project>
EOF
}

write_log_configs() {
  # Brokers: INFO to stdout (redirected to DIR/nodeN/server.log), noisy loggers at WARN.
  cat >"$CACHE_DIR/log4j2-server.properties" <<'EOF'
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.target = SYSTEM_OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = OUT
logger.zk.name = org.apache.kafka.clients
logger.zk.level = warn
logger.req.name = kafka.request.logger
logger.req.level = warn
EOF
  # Tools: stderr only, so that stdout stays machine-readable (JSON lines, records).
  cat >"$CACHE_DIR/log4j2-tools.properties" <<'EOF'
status = warn
appender.err.type = Console
appender.err.name = ERR
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = ${sys:kafka.tool.log.level:-warn}
rootLogger.appenderRef.err.ref = ERR
EOF
}

cmd_fetch() {
  need_java
  if [[ -f "$MARKER" ]]; then
    write_log_configs
    return 0
  fi
  need_mvn
  mkdir -p "$CACHE_DIR"
  write_pom
  write_log_configs
  rm -rf "$LIBS.tmp"
  log "resolving Apache Kafka $KAFKA_VERSION with Maven into $LIBS (once)"
  if ! timeout "$FETCH_TIMEOUT" mvn -B -q -f "$CACHE_DIR/pom.xml" \
    dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$LIBS.tmp" \
    >"$CACHE_DIR/mvn.log" 2>&1; then
    tail -n 30 "$CACHE_DIR/mvn.log" >&2
    die "mvn failed or timed out after ${FETCH_TIMEOUT}s resolving Kafka $KAFKA_VERSION (log: $CACHE_DIR/mvn.log)"
  fi
  # slf4j 1.7 from Kafka's own poms would shadow the 2.x API the binding needs.
  rm -f "$LIBS.tmp"/slf4j-api-1.*.jar
  rm -rf "$LIBS"
  mv "$LIBS.tmp" "$LIBS"
  date -u +%FT%TZ >"$MARKER"
  log "fetched $(find "$LIBS" -name '*.jar' | wc -l) jars for Kafka $KAFKA_VERSION"
}

classpath() { echo "$LIBS/*"; }

# run_java LOG4J_CONFIG HEAP CLASS ARGS...
run_java() {
  local cfg="$1" heap="$2" cls="$3"
  shift 3
  local -a heap_args
  read -r -a heap_args <<<"$heap"
  exec java "${heap_args[@]}" -XX:+UseSerialGC -Djava.awt.headless=true -Dsemel.kafka.tool=1 \
    -Dlog4j2.configurationFile="$CACHE_DIR/$cfg" \
    -Dkafka.tool.log.level="${KAFKA_TOOL_LOG_LEVEL:-warn}" \
    -cp "$(classpath)" "$cls" "$@"
}

tool_class() {
  case "$1" in
    topics) echo org.apache.kafka.tools.TopicCommand ;;
    consumer-groups) echo org.apache.kafka.tools.consumer.group.ConsumerGroupCommand ;;
    configs) echo kafka.admin.ConfigCommand ;;
    console-producer) echo org.apache.kafka.tools.ConsoleProducer ;;
    console-consumer) echo org.apache.kafka.tools.consumer.ConsoleConsumer ;;
    producer-perf-test) echo org.apache.kafka.tools.ProducerPerformance ;;
    consumer-perf-test) echo org.apache.kafka.tools.ConsumerPerformance ;;
    verifiable-producer) echo org.apache.kafka.tools.VerifiableProducer ;;
    verifiable-consumer) echo org.apache.kafka.tools.VerifiableConsumer ;;
    api-versions) echo org.apache.kafka.tools.BrokerApiVersionsCommand ;;
    get-offsets) echo org.apache.kafka.tools.GetOffsetShell ;;
    delete-records) echo org.apache.kafka.tools.DeleteRecordsCommand ;;
    log-dirs) echo org.apache.kafka.tools.LogDirsCommand ;;
    transactions) echo org.apache.kafka.tools.TransactionsCommand ;;
    metadata-quorum) echo org.apache.kafka.tools.MetadataQuorumCommand ;;
    storage) echo kafka.tools.StorageTool ;;
    *) echo "$1" ;;
  esac
}

cmd_tool() {
  [[ $# -ge 1 ]] || die "usage: kafka.sh tool CLASS|ALIAS ARGS..."
  cmd_fetch
  local cls
  cls="$(tool_class "$1")"
  shift
  run_java log4j2-tools.properties "$TOOL_HEAP" "$cls" "$@"
}

# Runs a tool in a subshell (cmd_tool execs).
tool() { (cmd_tool "$@"); }

client_port() { echo $((CLIENT_BASE + $1)); }
controller_port() { echo $((CONTROLLER_BASE + $1)); }
sasl_ssl_port() { echo $((SASL_SSL_BASE + $1)); }

pid_alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }

node_pid() {
  local f="$2/node$1/pid"
  if [[ -f "$f" ]]; then cat "$f"; fi
}

bootstrap_for() {
  local n="$1" port_of="${2:-client_port}" i out=""
  for ((i = 1; i <= n; i++)); do
    out+="${out:+,}127.0.0.1:$("$port_of" "$i")"
  done
  echo "$out"
}

# Extra listener settings for SASL_SSL (KAFKA_SASL_SSL_DIR), appended to server.properties.
sasl_ssl_config() {
  local users plain_users="" name password
  users="$SASL_SSL_DIR/scram-users"
  [[ -f "$SASL_SSL_DIR/keystore.pem" && -f "$users" ]] ||
    die "KAFKA_SASL_SSL_DIR=$SASL_SSL_DIR needs keystore.pem and scram-users"
  while read -r name password; do
    [[ -n "$name" ]] && plain_users+=" user_$name=\"$password\""
  done <"$users"
  cat <<EOF
ssl.keystore.type=PEM
ssl.keystore.location=$SASL_SSL_DIR/keystore.pem
sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required$plain_users;
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
EOF
}

write_node_config() {
  local n="$1" dir="$2" count="$3" i voters=""
  for ((i = 1; i <= count; i++)); do
    voters+="${voters:+,}$i@127.0.0.1:$(controller_port "$i")"
  done
  local rf=1 isr=1
  if ((count >= 3)); then rf=3 isr=2; fi
  mkdir -p "$dir/node$n/data"
  local listeners="PLAINTEXT://127.0.0.1:$(client_port "$n")"
  local protocols="PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
  if [[ -n "$SASL_SSL_DIR" ]]; then
    listeners+=",SASL_SSL://127.0.0.1:$(sasl_ssl_port "$n")"
    protocols+=",SASL_SSL:SASL_SSL"
  fi
  cat >"$dir/node$n/server.properties" <<EOF
# Generated by scripts/kafka.sh (node $n of $count).
process.roles=broker,controller
node.id=$n
controller.quorum.voters=$voters
listeners=$listeners,CONTROLLER://127.0.0.1:$(controller_port "$n")
advertised.listeners=$listeners
listener.security.protocol.map=$protocols
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
log.dirs=$dir/node$n/data
num.partitions=1
default.replication.factor=$rf
min.insync.replicas=$isr
offsets.topic.replication.factor=$rf
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$isr
transaction.state.log.num.partitions=10
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$isr
group.initial.rebalance.delay.ms=0
# A follower that has not caught up for 5 s leaves the ISR (default 30 s), so the
# replication example shows it within seconds.
replica.lag.time.max.ms=5000
# Faster failure detection for kill/restart tests (defaults: 2000 / 9000).
broker.heartbeat.interval.ms=1000
broker.session.timeout.ms=6000
auto.create.topics.enable=true
log.segment.bytes=67108864
# The log cleaner looks for dirty logs every second (default 15 s), so a compacted topic's
# test sees it cleaned within seconds.
log.cleaner.backoff.ms=1000
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
background.threads=4
EOF
  if [[ -n "$SASL_SSL_DIR" ]]; then
    sasl_ssl_config >>"$dir/node$n/server.properties"
  fi
}

format_node() {
  local n="$1" dir="$2" cluster_id="$3"
  if [[ -f "$dir/node$n/data/meta.properties" ]]; then
    return 0
  fi
  local scram=() name password mechanism
  if [[ -n "$SASL_SSL_DIR" ]]; then
    while read -r name password; do
      [[ -n "$name" ]] || continue
      for mechanism in SCRAM-SHA-256 SCRAM-SHA-512; do
        scram+=(--add-scram "$mechanism=[name=$name,password=$password]")
      done
    done <"$SASL_SSL_DIR/scram-users"
  fi
  if ! tool storage format --ignore-formatted -t "$cluster_id" "${scram[@]}" \
    -c "$dir/node$n/server.properties" >"$dir/node$n/format.log" 2>&1; then
    cat "$dir/node$n/format.log" >&2
    die "formatting node $n failed"
  fi
}

start_node() {
  local n="$1" dir="$2"
  local pid
  pid="$(node_pid "$n" "$dir")"
  if pid_alive "$pid"; then
    log "node $n already running (pid $pid)"
    return 0
  fi
  [[ -f "$dir/node$n/server.properties" ]] || die "$dir/node$n is not set up; run start1/start3 first"
  local -a heap
  read -r -a heap <<<"$HEAP"
  (
    cd "$dir/node$n"
    # setsid: the broker must not die with this shell or get the terminal's Ctrl-C.
    setsid java "${heap[@]}" -XX:+UseG1GC \
      -Djava.awt.headless=true -Dsemel.kafka.node="$n" -Dsemel.kafka.dir="$dir" \
      -Dlog4j2.configurationFile="$CACHE_DIR/log4j2-server.properties" \
      -cp "$(classpath)" kafka.Kafka "$dir/node$n/server.properties" \
      >>"$dir/node$n/server.log" 2>&1 </dev/null &
  )
  # setsid may fork, so find the JVM by its marker rather than trusting $!.
  local deadline=$((SECONDS + 10))
  pid=""
  while [[ -z "$pid" ]] && ((SECONDS < deadline)); do
    pid="$(pgrep -f -- "-Dsemel.kafka.node=$n -Dsemel.kafka.dir=$dir " | head -n 1 || true)"
    [[ -n "$pid" ]] || sleep 0.2
  done
  [[ -n "$pid" ]] || { tail -n 20 "$dir/node$n/server.log" >&2; die "node $n did not start"; }
  echo "$pid" >"$dir/node$n/pid"
  log "node $n started (pid $(node_pid "$n" "$dir"), client port $(client_port "$n"), log $dir/node$n/server.log)"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_ready DIR COUNT: every broker answers ApiVersions and is in the metadata.
wait_ready() {
  local dir="$1" count="$2" deadline i out ok
  deadline=$((SECONDS + START_TIMEOUT))
  for ((i = 1; i <= count; i++)); do
    until port_open "$(client_port "$i")"; do
      pid_alive "$(node_pid "$i" "$dir")" ||
        { tail -n 40 "$dir/node$i/server.log" >&2; die "node $i exited while starting (log: $dir/node$i/server.log)"; }
      ((SECONDS < deadline)) ||
        die "node $i did not open port $(client_port "$i") within ${START_TIMEOUT}s (log: $dir/node$i/server.log)"
      sleep 0.5
    done
  done
  while :; do
    out="$(timeout 30 bash "$SELF" tool api-versions --bootstrap-server "$(bootstrap_for "$count")" 2>/dev/null || true)"
    ok=1
    for ((i = 1; i <= count; i++)); do
      grep -q "(id: $i rack" <<<"$out" || ok=0
    done
    ((ok)) && return 0
    ((SECONDS < deadline)) || die "cluster in $dir not ready within ${START_TIMEOUT}s"
    sleep 1
  done
}

cmd_start() {
  local count="$1" dir="${2:-}"
  [[ -n "$dir" ]] || die "usage: kafka.sh start$count DIR"
  cmd_fetch
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  if [[ -f "$dir/cluster" && "$(cat "$dir/cluster")" != "$count" ]]; then
    die "$dir already holds a $(cat "$dir/cluster")-broker cluster; use another DIR"
  fi
  echo "$count" >"$dir/cluster"
  local cluster_id i
  if [[ -f "$dir/cluster.id" ]]; then
    cluster_id="$(cat "$dir/cluster.id")"
  else
    cluster_id="$(tool storage random-uuid 2>/dev/null | tail -n 1)"
    [[ -n "$cluster_id" ]] || die "could not generate a cluster id"
    echo "$cluster_id" >"$dir/cluster.id"
  fi
  for ((i = 1; i <= count; i++)); do
    write_node_config "$i" "$dir" "$count"
    format_node "$i" "$dir" "$cluster_id"
  done
  for ((i = 1; i <= count; i++)); do
    start_node "$i" "$dir"
  done
  wait_ready "$dir" "$count"
  bootstrap_for "$count" >"$dir/bootstrap"
  if [[ -n "$SASL_SSL_DIR" ]]; then
    bootstrap_for "$count" sasl_ssl_port >"$dir/bootstrap-sasl-ssl"
  fi
  cat "$dir/bootstrap"
}

cluster_size() {
  [[ -f "$1/cluster" ]] || die "$1 holds no cluster started by kafka.sh"
  cat "$1/cluster"
}

stop_pids() {
  local pids=("$@") p deadline
  ((${#pids[@]})) || return 0
  kill -TERM "${pids[@]}" 2>/dev/null || true
  deadline=$((SECONDS + STOP_TIMEOUT))
  for p in "${pids[@]}"; do
    while pid_alive "$p" && ((SECONDS < deadline)); do sleep 0.5; done
    if pid_alive "$p"; then
      log "pid $p still alive after ${STOP_TIMEOUT}s; SIGKILL"
      kill -KILL "$p" 2>/dev/null || true
    fi
  done
}

cmd_stop() {
  local dir="${1:-}"
  [[ -n "$dir" ]] || die "usage: kafka.sh stop DIR"
  [[ -d "$dir" ]] || return 0
  local count i pid pids=()
  count="$(cluster_size "$dir")"
  for ((i = 1; i <= count; i++)); do
    pid="$(node_pid "$i" "$dir")"
    pid_alive "$pid" && pids+=("$pid")
  done
  stop_pids "${pids[@]}"
  for ((i = 1; i <= count; i++)); do rm -f "$dir/node$i/pid"; done
  log "stopped ${#pids[@]} broker(s) in $dir"
}

check_node() {
  local n="$1" dir="$2" count
  [[ "$n" =~ ^[0-9]+$ ]] || die "broker number must be an integer, got '$n'"
  count="$(cluster_size "$dir")"
  ((n >= 1 && n <= count)) || die "broker $n not in 1..$count"
}

kill9_node() {
  local n="$1" dir="$2" pid
  pid="$(node_pid "$n" "$dir")"
  if pid_alive "$pid"; then
    kill -KILL "$pid"
    local deadline=$((SECONDS + 10))
    while pid_alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
    log "node $n (pid $pid) killed with SIGKILL"
  else
    log "node $n was not running"
  fi
  rm -f "$dir/node$n/pid"
}

cmd_kill() {
  [[ $# -eq 2 ]] || die "usage: kafka.sh kill N DIR"
  check_node "$1" "$2"
  kill9_node "$1" "$(cd "$2" && pwd)"
}

cmd_pause() {
  [[ $# -eq 2 ]] || die "usage: kafka.sh pause N DIR"
  check_node "$1" "$2"
  local pid
  pid="$(node_pid "$1" "$(cd "$2" && pwd)")"
  pid_alive "$pid" || die "broker $1 is not running"
  kill -STOP "$pid"
}

cmd_resume() {
  [[ $# -eq 2 ]] || die "usage: kafka.sh resume N DIR"
  check_node "$1" "$2"
  local pid
  pid="$(node_pid "$1" "$(cd "$2" && pwd)")"
  pid_alive "$pid" || die "broker $1 is not running"
  kill -CONT "$pid"
}

cmd_restart() {
  [[ $# -eq 2 ]] || die "usage: kafka.sh restart N DIR"
  check_node "$1" "$2"
  local n="$1" dir count
  dir="$(cd "$2" && pwd)"
  count="$(cluster_size "$dir")"
  cmd_fetch
  kill9_node "$n" "$dir"
  start_node "$n" "$dir"
  wait_ready "$dir" "$count"
  cat "$dir/bootstrap"
}

cmd_status() {
  local dir="${1:-}" count i pid
  [[ -n "$dir" ]] || die "usage: kafka.sh status DIR"
  count="$(cluster_size "$dir")"
  for ((i = 1; i <= count; i++)); do
    pid="$(node_pid "$i" "$dir")"
    if pid_alive "$pid"; then
      echo "node $i: running (pid $pid, 127.0.0.1:$(client_port "$i"))"
    else
      echo "node $i: stopped"
    fi
  done
}

usage() { sed -n '2,/^set -euo/p' "$SELF" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2; }

main() {
  [[ $# -ge 1 ]] || usage
  local sub="$1"
  shift
  case "$sub" in
    fetch) cmd_fetch ;;
    classpath) cmd_fetch && classpath ;;
    start1) cmd_start 1 "$@" ;;
    start3) cmd_start 3 "$@" ;;
    stop) cmd_stop "$@" ;;
    kill) cmd_kill "$@" ;;
    restart) cmd_restart "$@" ;;
    pause) cmd_pause "$@" ;;
    resume) cmd_resume "$@" ;;
    status) cmd_status "$@" ;;
    tool) cmd_tool "$@" ;;
    -h | --help | help) usage ;;
    *) die "unknown subcommand '$sub' (try --help)" ;;
  esac
}

main "$@"
