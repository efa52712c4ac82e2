//! Shared helpers for the integration tests: an embedded broker on port 0, the broker binary as
//! a child process, a raw Kafka-protocol client built on `kafka-protocol`, and record batches.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, Request, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use semel::broker::{Broker, BrokerConfig, BrokerHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Installs a test log subscriber once (RUST_LOG controls it; quiet by default).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A broker running inside the test process, with its data directory.
pub struct TestBroker {
    pub handle: BrokerHandle,
    pub dir: tempfile::TempDir,
}

impl TestBroker {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut BrokerConfig)) -> anyhow::Result<Self> {
        init_tracing();
        let dir = tempfile::tempdir()?;
        let mut config = BrokerConfig {
            listen: "127.0.0.1:0".parse()?,
            data_dir: dir.path().to_path_buf(),
            ..BrokerConfig::default()
        };
        adjust(&mut config);
        let handle = Broker::start(config).await?;
        Ok(Self { handle, dir })
    }

    pub fn addr(&self) -> SocketAddr {
        self.handle.local_addr()
    }

    pub fn bootstrap(&self) -> String {
        self.addr().to_string()
    }
}

/// Path of a workspace binary built next to the test executable (`target/<profile>/<name>`).
pub fn workspace_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test executable has no target/<profile> directory")?;
    let path = profile_dir.join(name);
    if !path.exists() {
        bail!(
            "{} is not built; run `cargo build --workspace --bins` first (the README's test command does)",
            path.display()
        );
    }
    Ok(path)
}

/// The `semel-broker` binary running as a real child process.
pub struct ChildBroker {
    pub child: Child,
    pub addr: SocketAddr,
    /// Everything the broker printed after its "listening" line, collected by a thread.
    pub output: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl ChildBroker {
    /// Starts the binary on port 0 with `data_dir` and waits for its listening line.
    pub fn spawn(data_dir: &Path, extra_args: &[&str]) -> anyhow::Result<Self> {
        Self::spawn_with(data_dir, extra_args, None)
    }

    /// Like [`ChildBroker::spawn`], optionally through `sh -c` with a prefix (for `ulimit`).
    pub fn spawn_with(
        data_dir: &Path,
        extra_args: &[&str],
        shell_prefix: Option<&str>,
    ) -> anyhow::Result<Self> {
        let binary = workspace_binary("semel-broker")?;
        let mut args: Vec<String> = vec![
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--log-level".into(),
            "info".into(),
        ];
        args.extend(extra_args.iter().map(|s| s.to_string()));
        let mut command = match shell_prefix {
            Some(prefix) => {
                let quoted: Vec<String> = std::iter::once(binary.display().to_string())
                    .chain(args)
                    .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
                    .collect();
                let mut c = Command::new("bash");
                c.arg("-c")
                    .arg(format!("{prefix} exec {}", quoted.join(" ")));
                c
            }
            None => {
                let mut c = Command::new(&binary);
                c.args(&args);
                c
            }
        };
        let mut child = command
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut before = Vec::new();
        let addr = loop {
            let Some(line) = lines.next() else {
                let _ = child.kill();
                bail!(
                    "broker exited before listening; output:\n{}",
                    before.join("\n")
                );
            };
            let line = line?;
            if let Some(addr) = line.strip_prefix("semel-broker listening on ") {
                break addr.trim().parse()?;
            }
            before.push(line);
        };
        let output = std::sync::Arc::new(std::sync::Mutex::new(before));
        let sink = std::sync::Arc::clone(&output);
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().expect("output lock").push(line);
            }
        });
        Ok(Self {
            child,
            addr,
            output,
        })
    }

    /// `kill -9`: no flush, no shutdown.
    pub fn kill9(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(mut self) -> anyhow::Result<std::process::ExitStatus> {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()?;
        if !status.success() {
            bail!("kill -TERM failed");
        }
        Ok(self.child.wait()?)
    }

    pub fn output_text(&self) -> String {
        self.output.lock().expect("output lock").join("\n")
    }
}

impl Drop for ChildBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw Kafka-protocol connection that sends one request at a time (or pipelines raw frames).
pub struct RawClient {
    pub stream: TcpStream,
    next_correlation_id: i32,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            next_correlation_id: 1,
        })
    }

    /// Encodes `request` (header + body) as a frame payload, without sending it.
    pub fn encode<R: Request>(
        &mut self,
        version: i16,
        request: &R,
    ) -> anyhow::Result<(i32, Bytes)> {
        let correlation_id = self.next_correlation_id;
        self.next_correlation_id += 1;
        let api_key = ApiKey::try_from(R::KEY).map_err(|()| anyhow::anyhow!("unknown key"))?;
        let header = RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(correlation_id)
            .with_client_id(Some(StrBytes::from_static_str("semel-tests")));
        let mut buf = BytesMut::new();
        header.encode(&mut buf, api_key.request_header_version(version))?;
        request.encode(&mut buf, version)?;
        Ok((correlation_id, buf.freeze()))
    }

    pub async fn send_frame(&mut self, payload: &[u8]) -> anyhow::Result<()> {
        let mut frame = Vec::with_capacity(payload.len() + 4);
        frame.extend_from_slice(&(payload.len() as i32).to_be_bytes());
        frame.extend_from_slice(payload);
        self.stream.write_all(&frame).await?;
        Ok(())
    }

    /// Reads one response frame; `None` if the broker closed the connection.
    pub async fn read_frame(&mut self) -> anyhow::Result<Option<Bytes>> {
        let mut prefix = [0u8; 4];
        match tokio::time::timeout(Duration::from_secs(30), self.stream.read_exact(&mut prefix))
            .await?
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let length = usize::try_from(i32::from_be_bytes(prefix))?;
        let mut payload = vec![0u8; length];
        self.stream.read_exact(&mut payload).await?;
        Ok(Some(Bytes::from(payload)))
    }

    /// Decodes a response frame for request type `R` at `version`; returns (correlation id, body).
    pub fn decode<R: Request>(
        version: i16,
        mut frame: Bytes,
    ) -> anyhow::Result<(i32, R::Response)> {
        let api_key = ApiKey::try_from(R::KEY).map_err(|()| anyhow::anyhow!("unknown key"))?;
        let header = ResponseHeader::decode(&mut frame, api_key.response_header_version(version))?;
        let body = R::Response::decode(&mut frame, version)?;
        if frame.has_remaining() {
            bail!("{} bytes left after the response body", frame.remaining());
        }
        Ok((header.correlation_id, body))
    }

    /// Sends `request` and waits for its response.
    pub async fn send<R: Request>(
        &mut self,
        version: i16,
        request: &R,
    ) -> anyhow::Result<R::Response> {
        let (correlation_id, payload) = self.encode(version, request)?;
        self.send_frame(&payload).await?;
        let frame = self
            .read_frame()
            .await?
            .context("broker closed the connection instead of answering")?;
        let (got, response) = Self::decode::<R>(version, frame)?;
        if got != correlation_id {
            bail!("correlation id {got}, expected {correlation_id}");
        }
        Ok(response)
    }
}

/// One record for [`record_batch`].
#[derive(Debug, Clone)]
pub struct TestRecord {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub timestamp: i64,
}

impl TestRecord {
    pub fn new(key: &str, value: &str, timestamp: i64) -> Self {
        Self {
            key: Some(key.as_bytes().to_vec()),
            value: Some(value.as_bytes().to_vec()),
            headers: Vec::new(),
            timestamp,
        }
    }
}

/// Encodes records as one RecordBatch v2 with `kafka-protocol` (the client side of the crate).
pub fn record_batch(records: &[TestRecord], compression: Compression) -> anyhow::Result<Bytes> {
    record_batch_with_producer(records, compression, -1, -1, -1)
}

pub fn record_batch_with_producer(
    records: &[TestRecord],
    compression: Compression,
    producer_id: i64,
    producer_epoch: i16,
    base_sequence: i32,
) -> anyhow::Result<Bytes> {
    let records: Vec<Record> = records
        .iter()
        .enumerate()
        .map(|(i, r)| Record {
            transactional: false,
            control: false,
            partition_leader_epoch: 0,
            producer_id,
            producer_epoch,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            // -1 + i for non-idempotent batches keeps `offset - sequence` constant, which is
            // how the encoder decides records share a batch; the batch's base sequence stays -1.
            sequence: base_sequence.wrapping_add(i as i32),
            delete_horizon: false,
            timestamp: r.timestamp,
            key: r.key.clone().map(Bytes::from),
            value: r.value.clone().map(Bytes::from),
            headers: r
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        StrBytes::from_string(k.clone()),
                        Some(Bytes::from(v.clone())),
                    )
                })
                .collect(),
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &records,
        &RecordEncodeOptions {
            version: 2,
            compression,
        },
    )?;
    Ok(buf.freeze())
}

/// Decodes every record in a Fetch response's `records` bytes.
pub fn decode_records(bytes: &Bytes) -> anyhow::Result<Vec<Record>> {
    let mut bytes = bytes.clone();
    let mut out = Vec::new();
    while bytes.has_remaining() {
        let set = kafka_protocol::records::RecordBatchDecoder::decode(&mut bytes)?;
        out.extend(set.records);
    }
    Ok(out)
}

/// Appends a little-endian-agnostic raw i32 to a buffer (for hand-built hostile frames).
pub fn put_i32(buf: &mut BytesMut, value: i32) {
    buf.put_i32(value);
}

pub fn topic_name(name: &str) -> kafka_protocol::messages::TopicName {
    kafka_protocol::messages::TopicName(StrBytes::from_string(name.to_string()))
}

/// Creates a topic with CreateTopics v7 and fails unless the broker says NONE.
pub async fn create_topic(
    client: &mut RawClient,
    name: &str,
    partitions: i32,
) -> anyhow::Result<()> {
    use kafka_protocol::messages::CreateTopicsRequest;
    use kafka_protocol::messages::create_topics_request::CreatableTopic;
    let request = CreateTopicsRequest::default()
        .with_timeout_ms(5000)
        .with_topics(vec![
            CreatableTopic::default()
                .with_name(topic_name(name))
                .with_num_partitions(partitions)
                .with_replication_factor(1),
        ]);
    let response = client.send(7, &request).await?;
    anyhow::ensure!(
        response.topics[0].error_code == 0,
        "create {name}: {:?}",
        response.topics[0]
    );
    Ok(())
}

/// A Produce request carrying one batch for one partition.
pub fn produce_request(
    topic: &str,
    partition: i32,
    batch: Bytes,
    acks: i16,
) -> kafka_protocol::messages::ProduceRequest {
    use kafka_protocol::messages::ProduceRequest;
    use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
    ProduceRequest::default()
        .with_acks(acks)
        .with_timeout_ms(30_000)
        .with_topic_data(vec![
            TopicProduceData::default()
                .with_name(topic_name(topic))
                .with_partition_data(vec![
                    PartitionProduceData::default()
                        .with_index(partition)
                        .with_records(Some(batch)),
                ]),
        ])
}

/// Every record of one partition from its log start, fetched with Fetch v12 until the high
/// watermark; fails on any fetch error.
pub async fn fetch_all(
    client: &mut RawClient,
    topic: &str,
    partition: i32,
) -> anyhow::Result<Vec<Record>> {
    use kafka_protocol::messages::FetchRequest;
    use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
    let mut out: Vec<Record> = Vec::new();
    loop {
        let next = out.last().map_or(0, |r| r.offset + 1);
        let request = FetchRequest::default()
            .with_replica_id((-1).into())
            .with_max_wait_ms(0)
            .with_min_bytes(1)
            .with_max_bytes(1 << 20)
            .with_topics(vec![
                FetchTopic::default()
                    .with_topic(topic_name(topic))
                    .with_partitions(vec![
                        FetchPartition::default()
                            .with_partition(partition)
                            .with_fetch_offset(next)
                            .with_partition_max_bytes(1 << 20),
                    ]),
            ]);
        let response = client.send(11, &request).await?;
        let data = &response.responses[0].partitions[0];
        anyhow::ensure!(data.error_code == 0, "fetch error {}", data.error_code);
        let records = decode_records(data.records.as_ref().context("no records field")?)?;
        let fresh: Vec<Record> = records.into_iter().filter(|r| r.offset >= next).collect();
        if fresh.is_empty() {
            anyhow::ensure!(
                next == data.high_watermark,
                "stopped at {next}, high watermark {}",
                data.high_watermark
            );
            return Ok(out);
        }
        out.extend(fresh);
    }
}

/// A record's value as text.
pub fn value_text(record: &Record) -> String {
    String::from_utf8_lossy(record.value.as_deref().unwrap_or_default()).into_owned()
}

/// The `kcat` binary (librdkafka), or `$SEMEL_KCAT`. Installed by `scripts/setup.sh`; tests
/// fail rather than skip without it, because interop is part of what the broker promises.
pub fn kcat() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("SEMEL_KCAT")
        .map(PathBuf::from)
        .unwrap_or_else(|| "kcat".into());
    let found = Command::new(&path).arg("-V").output();
    match found {
        Ok(out) if out.status.success() => Ok(path),
        _ => bail!("kcat is not installed (run scripts/setup.sh, or apt-get install kcat)"),
    }
}

/// kcat (librdkafka) sends one record with value `value`, key `id` and a `semel-msg-id: id`
/// header, partitioned as the Java client does (murmur2 of the key), `acks=all`; bounded by
/// `limit`.
pub fn kcat_send_with_id(
    bootstrap: &str,
    topic: &str,
    id: &str,
    value: &str,
    limit: Duration,
) -> anyhow::Result<()> {
    // kcat reads values from stdin or files; `output_within` gives it no stdin.
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), value)?;
    let mut command = Command::new(kcat()?);
    command.args([
        "-P",
        "-b",
        bootstrap,
        "-t",
        topic,
        "-k",
        id,
        "-H",
        &format!("semel-msg-id={id}"),
        "-X",
        "partitioner=murmur2_random",
        "-X",
        "acks=all",
        "-l",
        &file.path().to_string_lossy(),
    ]);
    let what = format!("kcat sending {id}");
    let out = output_within(&mut command, limit, &what)?;
    stdout_of(&out, &what)?;
    Ok(())
}

/// Every record of `topic`, read by kcat from the beginning to the end, each printed with
/// kcat's `-f` `format`; bounded by `limit`.
pub fn kcat_read_all(
    bootstrap: &str,
    topic: &str,
    format: &str,
    limit: Duration,
) -> anyhow::Result<String> {
    let mut command = Command::new(kcat()?);
    command.args([
        "-C",
        "-b",
        bootstrap,
        "-t",
        topic,
        "-o",
        "beginning",
        "-e",
        "-q",
        "-f",
        format,
    ]);
    let what = format!("kcat reading {topic}");
    let out = output_within(&mut command, limit, &what)?;
    stdout_of(&out, &what)
}

/// The venv Python with kafka-python and its codecs, or `$SEMEL_PYTHON`.
pub fn python() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("SEMEL_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_default();
            PathBuf::from(home).join(".cache/semel/venv/bin/python")
        });
    let found = Command::new(&path)
        .args(["-c", "import kafka, lz4, snappy, zstandard"])
        .output();
    match found {
        Ok(out) if out.status.success() => Ok(path),
        _ => bail!(
            "{} cannot import kafka-python and its codecs (run scripts/setup.sh)",
            path.display()
        ),
    }
}

/// A new idempotent producer id and epoch (InitProducerId v4, no transactional id).
pub async fn init_producer_id(client: &mut RawClient) -> anyhow::Result<(i64, i16)> {
    use kafka_protocol::messages::{InitProducerIdRequest, ProducerId};
    let response = client
        .send(
            4,
            &InitProducerIdRequest::default()
                .with_transactional_id(None)
                .with_transaction_timeout_ms(60_000)
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1),
        )
        .await?;
    anyhow::ensure!(response.error_code == 0, "InitProducerId: {response:?}");
    Ok((response.producer_id.0, response.producer_epoch))
}

/// One HTTP GET to the metrics endpoint: (status line, body).
pub async fn http_get(
    address: std::net::SocketAddr,
    path: &str,
) -> anyhow::Result<(String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: semel\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await??;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no header end in {response:?}"))?;
    Ok((
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    ))
}

pub mod child;
#[cfg(feature = "dedup")]
pub mod dedup_hosts;
pub mod fixed_port;
pub mod java;
pub mod pki;
pub mod proxy;
pub mod txn;

/// The stdout of a finished command, or an error naming `what` with its exit status, stdout
/// and stderr.
pub fn stdout_of(out: &std::process::Output, what: &str) -> anyhow::Result<String> {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// Runs `command` to its end, like `Command::output`, but for at most `limit`: a child still
/// running then is killed, and the error names `what` it was and shows what it had printed.
pub fn output_within(
    command: &mut Command,
    limit: Duration,
    what: &str,
) -> anyhow::Result<std::process::Output> {
    use std::io::Read;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    match status {
        Some(status) => Ok(std::process::Output {
            status,
            stdout,
            stderr,
        }),
        None => bail!(
            "{what} was still running after {limit:?} and was killed; it printed:\n{}\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    }
}
