//! Apache Kafka's Java tools, run through `scripts/kafka.sh`: starting them, collecting what
//! they print, and reading the JSON event lines of the verifiable clients (`VerifiableProducer`,
//! `VerifiableConsumer`), shared by the tests that run them.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use super::output_within;

/// The Kafka release the tools come from (`scripts/kafka.sh` keeps one cache per version).
pub const KAFKA_VERSION: &str = "4.1.2";
/// JVM options for every tool: C1 only, which starts short-lived tools about a quarter faster.
pub const TOOL_JVM: &str = "-Xmx256m -XX:TieredStopAtLevel=1";

/// Bound for one short admin tool run (JVM start included).
pub const TOOL_LIMIT: Duration = Duration::from_secs(60);
/// Bound for a tool asked to stop.
const STOP_LIMIT: Duration = Duration::from_secs(90);

pub fn kafka_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka.sh")
}

/// `scripts/kafka.sh ARGS`, with its stdin read from `input` if given (inside a shell:
/// `output_within` gives the child an empty stdin).
pub fn kafka_command(args: &[&str], input: Option<&Path>) -> Command {
    let mut command = Command::new("bash");
    if let Some(input) = input {
        command
            .args(["-c", "exec bash \"$@\" < \"$SEMEL_TOOL_INPUT\"", "bash"])
            .env("SEMEL_TOOL_INPUT", input);
    }
    command
        .arg(kafka_script())
        .args(args)
        .env("KAFKA_VERSION", KAFKA_VERSION)
        .env("KAFKA_TOOL_HEAP", TOOL_JVM);
    command
}

/// Checks for Java and fetches the Kafka jars (once per test process; `fetch` is a no-op
/// when they are cached). An error names what to install.
pub fn kafka_ready() -> anyhow::Result<()> {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    READY
        .get_or_init(|| prepare_kafka().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn prepare_kafka() -> anyhow::Result<()> {
    match Command::new("java").arg("-version").output() {
        Ok(out) if out.status.success() => {}
        _ => bail!(
            "java is not installed: these tests run Apache Kafka's Java clients; install a JDK \
             17+ (Debian/Ubuntu: apt-get install openjdk-17-jdk-headless) or run scripts/setup.sh"
        ),
    }
    let out = output_within(
        &mut kafka_command(&["fetch"], None),
        Duration::from_secs(960),
        "scripts/kafka.sh fetch",
    )?;
    ensure!(
        out.status.success(),
        "scripts/kafka.sh fetch could not get the Kafka {KAFKA_VERSION} jars (the first fetch \
         needs Maven: apt-get install maven, or run scripts/setup.sh):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Runs a Kafka tool to its end (bounded) and returns its stdout; fails on a non-zero exit.
pub fn run_tool(alias: &str, args: &[&str]) -> anyhow::Result<String> {
    run_tool_with_input(alias, args, None)
}

/// Like [`run_tool`], with the tool's stdin read from `input` (a file).
pub fn run_tool_with_input(
    alias: &str,
    args: &[&str],
    input: Option<&Path>,
) -> anyhow::Result<String> {
    let mut full = vec!["tool", alias];
    full.extend_from_slice(args);
    let what = format!("kafka {alias} {}", args.join(" "));
    let out = output_within(&mut kafka_command(&full, input), TOOL_LIMIT, &what)?;
    super::stdout_of(&out, &what)
}

/// Calls `check` every 50 ms until it returns true; fails after `limit`, naming `what`.
pub fn poll_until(
    limit: Duration,
    what: &str,
    mut check: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    while !check()? {
        ensure!(
            started.elapsed() < limit,
            "gave up after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

pub type Lines = Arc<Mutex<Vec<String>>>;

/// Collects the lines of a pipe into a shared vector, from a thread that ends at end of file.
pub fn collect_lines(pipe: Option<impl Read + Send + 'static>) -> (Lines, JoinHandle<()>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&lines);
    let reader = std::thread::spawn(move || {
        if let Some(pipe) = pipe {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                sink.lock().expect("lines lock").push(line);
            }
        }
    });
    (lines, reader)
}

/// A Kafka tool running in the background; its stdout lines are collected as they come.
/// Killed on drop.
pub struct JavaTool {
    what: String,
    child: Child,
    stdout: Lines,
    stderr: Lines,
    readers: Vec<JoinHandle<()>>,
}

impl JavaTool {
    pub fn spawn(what: &str, alias: &str, args: &[&str]) -> anyhow::Result<Self> {
        let mut full = vec!["tool", alias];
        full.extend_from_slice(args);
        let mut child = kafka_command(&full, None)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        let (stdout, out_reader) = collect_lines(child.stdout.take());
        let (stderr, err_reader) = collect_lines(child.stderr.take());
        Ok(Self {
            what: what.to_string(),
            child,
            stdout,
            stderr,
            readers: vec![out_reader, err_reader],
        })
    }

    pub fn lines(&self) -> Vec<String> {
        self.stdout.lock().expect("lines lock").clone()
    }

    /// Stdout lines with a JSON event of this name.
    pub fn count(&self, event: &str) -> usize {
        let needle = format!("\"name\":\"{event}\"");
        self.stdout
            .lock()
            .expect("lines lock")
            .iter()
            .filter(|l| l.contains(&needle))
            .count()
    }

    pub fn stderr_tail(&self) -> String {
        let lines = self.stderr.lock().expect("lines lock");
        let skip = lines.len().saturating_sub(40);
        lines[skip..].join("\n")
    }

    /// Fails if the tool has already exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited early ({status}); stderr:\n{}",
                self.what,
                self.stderr_tail()
            );
        }
        Ok(())
    }

    pub fn wait_exit(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                // The readers end once they have read everything the tool printed.
                for reader in self.readers.drain(..) {
                    reader
                        .join()
                        .map_err(|_| anyhow::anyhow!("reader thread panicked"))?;
                }
                return Ok(status);
            }
            ensure!(
                started.elapsed() < limit,
                "{} still running after {limit:?}; stderr:\n{}",
                self.what,
                self.stderr_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM (the JVM runs its shutdown hooks: a consumer leaves its group), then waits.
    pub fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()?;
        ensure!(status.success(), "kill -TERM {} failed", self.what);
        self.wait_exit(STOP_LIMIT)
    }
}

impl Drop for JavaTool {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Just enough JSON for the verifiable tools' event lines.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut parser = JsonParser {
            bytes: text.as_bytes(),
            at: 0,
        };
        let value = parser.value()?;
        parser.skip_ws();
        ensure!(parser.at == parser.bytes.len(), "trailing text in {text}");
        Ok(value)
    }

    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(fields) => fields.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        match self.get(key)? {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn int(&self, key: &str) -> Option<i64> {
        match self.get(key)? {
            Json::Int(n) => Some(*n),
            _ => None,
        }
    }

    pub fn list(&self, key: &str) -> &[Json] {
        match self.get(key) {
            Some(Json::Arr(items)) => items,
            _ => &[],
        }
    }

    pub fn name(&self) -> &str {
        self.str("name").unwrap_or_default()
    }

    /// The partition numbers of a `partitions` list.
    pub fn partitions(&self) -> anyhow::Result<BTreeSet<i32>> {
        self.list("partitions")
            .iter()
            .map(|p| {
                let n = p.int("partition").context("partition without a number")?;
                Ok(i32::try_from(n)?)
            })
            .collect()
    }
}

struct JsonParser<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl JsonParser<'_> {
    fn skip_ws(&mut self) {
        while self.bytes.get(self.at).is_some_and(u8::is_ascii_whitespace) {
            self.at += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> anyhow::Result<()> {
        self.skip_ws();
        ensure!(
            self.bytes.get(self.at) == Some(&byte),
            "expected '{}' at byte {}",
            byte as char,
            self.at
        );
        self.at += 1;
        Ok(())
    }

    fn literal(&mut self, word: &str, value: Json) -> anyhow::Result<Json> {
        ensure!(
            self.bytes[self.at..].starts_with(word.as_bytes()),
            "bad literal at byte {}",
            self.at
        );
        self.at += word.len();
        Ok(value)
    }

    fn value(&mut self) -> anyhow::Result<Json> {
        self.skip_ws();
        match self.bytes.get(self.at).copied() {
            Some(b'{') => {
                self.at += 1;
                let mut fields = Vec::new();
                self.skip_ws();
                if self.bytes.get(self.at) == Some(&b'}') {
                    self.at += 1;
                    return Ok(Json::Obj(fields));
                }
                loop {
                    self.skip_ws();
                    let key = self.string()?;
                    self.eat(b':')?;
                    fields.push((key, self.value()?));
                    self.skip_ws();
                    match self.bytes.get(self.at) {
                        Some(b',') => self.at += 1,
                        Some(b'}') => {
                            self.at += 1;
                            return Ok(Json::Obj(fields));
                        }
                        _ => bail!("expected ',' or '}}' at byte {}", self.at),
                    }
                }
            }
            Some(b'[') => {
                self.at += 1;
                let mut items = Vec::new();
                self.skip_ws();
                if self.bytes.get(self.at) == Some(&b']') {
                    self.at += 1;
                    return Ok(Json::Arr(items));
                }
                loop {
                    items.push(self.value()?);
                    self.skip_ws();
                    match self.bytes.get(self.at) {
                        Some(b',') => self.at += 1,
                        Some(b']') => {
                            self.at += 1;
                            return Ok(Json::Arr(items));
                        }
                        _ => bail!("expected ',' or ']' at byte {}", self.at),
                    }
                }
            }
            Some(b'"') => Ok(Json::Str(self.string()?)),
            Some(b't') => self.literal("true", Json::Bool(true)),
            Some(b'f') => self.literal("false", Json::Bool(false)),
            Some(b'n') => self.literal("null", Json::Null),
            Some(b'-' | b'0'..=b'9') => {
                let start = self.at;
                while self
                    .bytes
                    .get(self.at)
                    .is_some_and(|b| matches!(b, b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'))
                {
                    self.at += 1;
                }
                let text = std::str::from_utf8(&self.bytes[start..self.at])?;
                Ok(match text.parse::<i64>() {
                    Ok(n) => Json::Int(n),
                    Err(_) => Json::Float(text.parse()?),
                })
            }
            _ => bail!("unexpected input at byte {}", self.at),
        }
    }

    fn string(&mut self) -> anyhow::Result<String> {
        self.eat(b'"')?;
        let mut out = Vec::new();
        loop {
            let byte = *self.bytes.get(self.at).context("unterminated string")?;
            self.at += 1;
            match byte {
                b'"' => return Ok(String::from_utf8(out)?),
                b'\\' => {
                    let escape = *self.bytes.get(self.at).context("unterminated escape")?;
                    self.at += 1;
                    let c = match escape {
                        b'n' => '\n',
                        b't' => '\t',
                        b'r' => '\r',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'u' => {
                            let hex = self.bytes.get(self.at..self.at + 4).context("short \\u")?;
                            self.at += 4;
                            let code = u32::from_str_radix(std::str::from_utf8(hex)?, 16)?;
                            char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER)
                        }
                        other => char::from(other),
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
                other => out.push(other),
            }
        }
    }
}

/// The JSON events among a tool's stdout lines.
pub fn events(lines: &[String]) -> anyhow::Result<Vec<Json>> {
    lines
        .iter()
        .filter(|l| l.starts_with('{'))
        .map(|l| Json::parse(l).with_context(|| format!("bad JSON line {l}")))
        .collect()
}

/// Only the events with one of these names (the lines are picked before they are parsed).
pub fn events_named(lines: &[String], names: &[&str]) -> anyhow::Result<Vec<Json>> {
    let needles: Vec<String> = names.iter().map(|n| format!("\"name\":\"{n}\"")).collect();
    lines
        .iter()
        .filter(|l| needles.iter().any(|n| l.contains(n.as_str())))
        .map(|l| Json::parse(l).with_context(|| format!("bad JSON line {l}")))
        .collect()
}

/// What [`replay`] found.
pub struct Ownership {
    /// Partition -> the member owning it at the end.
    pub owner: BTreeMap<i32, usize>,
    /// Each time a partition went to a member while another still owned it.
    pub overlaps: Vec<String>,
    /// Every revocation: (member, what it owned just before, what it had revoked).
    pub revocations: Vec<(usize, BTreeSet<i32>, BTreeSet<i32>)>,
}

/// Replays every member's `partitions_assigned` / `partitions_revoked` events in time order
/// (each member's own order kept; on equal timestamps a revocation goes first, as it happens
/// before the rebalance that hands the partition on). The members are separate JVMs on one
/// machine, so their millisecond timestamps come from one clock.
pub fn replay(members: &[Vec<Json>]) -> anyhow::Result<Ownership> {
    let streams: Vec<Vec<&Json>> = members
        .iter()
        .map(|events| {
            events
                .iter()
                .filter(|e| matches!(e.name(), "partitions_assigned" | "partitions_revoked"))
                .collect()
        })
        .collect();
    let mut next = vec![0usize; streams.len()];
    let mut out = Ownership {
        owner: BTreeMap::new(),
        overlaps: Vec::new(),
        revocations: Vec::new(),
    };
    loop {
        let mut pick: Option<(i64, u8, usize)> = None;
        for (member, stream) in streams.iter().enumerate() {
            if let Some(event) = stream.get(next[member]) {
                let key = (
                    event.int("timestamp").context("event without timestamp")?,
                    u8::from(event.name() == "partitions_assigned"),
                    member,
                );
                if pick.is_none_or(|p| key < p) {
                    pick = Some(key);
                }
            }
        }
        let Some((ts, _, member)) = pick else {
            return Ok(out);
        };
        let event = streams[member][next[member]];
        next[member] += 1;
        let partitions = event.partitions()?;
        if event.name() == "partitions_assigned" {
            for p in partitions {
                if let Some(other) = out.owner.insert(p, member)
                    && other != member
                {
                    out.overlaps.push(format!(
                        "partition {p} assigned to member {member} at {ts} while member {other} owned it"
                    ));
                }
            }
        } else {
            let owned: BTreeSet<i32> = out
                .owner
                .iter()
                .filter(|(_, m)| **m == member)
                .map(|(p, _)| *p)
                .collect();
            for p in &partitions {
                if out.owner.get(p) == Some(&member) {
                    out.owner.remove(p);
                }
            }
            out.revocations.push((member, owned, partitions));
        }
    }
}

pub fn ownership_events(members: &[JavaTool]) -> anyhow::Result<Vec<Vec<Json>>> {
    members
        .iter()
        .map(|m| events_named(&m.lines(), &["partitions_assigned", "partitions_revoked"]))
        .collect()
}

/// The offsets a group's members consumed, from their per-batch `records_consumed` ranges.
pub fn consumed_ranges(members: &[JavaTool]) -> anyhow::Result<BTreeSet<(i32, i64)>> {
    let mut got = BTreeSet::new();
    for member in members {
        for event in events_named(&member.lines(), &["records_consumed"])? {
            for p in event.list("partitions") {
                let partition = i32::try_from(p.int("partition").context("no partition")?)?;
                let (min, max) = (p.int("minOffset"), p.int("maxOffset"));
                got.extend(
                    (min.context("no minOffset")?..=max.context("no maxOffset")?)
                        .map(|o| (partition, o)),
                );
            }
        }
    }
    Ok(got)
}
