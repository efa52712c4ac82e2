//! One connection to one broker: framing, correlation ids, pipelining, API-version
//! negotiation.
//!
//! Requests are encoded whole and handed to a writer task, so a caller that stops waiting
//! (a cancelled future) can never leave half a frame on the wire. A reader task matches each
//! response to its request by correlation id; any framing problem (a length out of range, an
//! unknown correlation id, end of stream) poisons the connection: every request in flight fails
//! with that cause and later requests fail at once. A request that times out poisons it too,
//! since its answer could still arrive later (what the Java client and librdkafka do).
//!
//! References: Kafka protocol guide ("Network", "Request Header"), KIP-511 (ApiVersions v3 and
//! the v0 fallback), KIP-482 (flexible versions).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, ApiVersionsRequest, RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, Request, StrBytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::error::ClientError;
use crate::security::{SaslMechanism, SecurityConfig};

/// Settings of one connection (Kafka client names).
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    /// `client.id`, sent in every request header.
    pub client_id: String,
    /// `request.timeout.ms`.
    pub request_timeout: Duration,
    /// `socket.connection.setup.timeout.ms`: how long the TCP connect and the ApiVersions
    /// exchange of a new connection may take together (`request.timeout.ms` when that is
    /// shorter). A broker that accepts connections but never answers (a paused process) is
    /// given up after this rather than after a whole request timeout.
    pub connection_setup_timeout: Duration,
    /// Largest response frame accepted (`receive.message.max.bytes` in librdkafka).
    pub max_response_bytes: usize,
    /// Requests queued for the writer before `send` waits.
    pub max_queued_requests: usize,
    /// TLS and SASL (`security.protocol`, `sasl.*`, `ssl.*`).
    pub security: SecurityConfig,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        Self {
            client_id: "semel".into(),
            request_timeout: Duration::from_secs(30),
            // The Java client's default.
            connection_setup_timeout: Duration::from_secs(10),
            max_response_bytes: 100 * 1024 * 1024,
            max_queued_requests: 64,
            security: SecurityConfig::default(),
        }
    }
}

type Answer = Result<Bytes, ClientError>;

#[derive(Debug, Default)]
struct Shared {
    /// correlation id → who waits for the answer.
    waiting: Mutex<HashMap<i32, oneshot::Sender<Answer>>>,
    /// Set once; every later request fails with it.
    broken: Mutex<Option<ClientError>>,
}

impl Shared {
    fn poison(&self, error: ClientError) {
        let mut broken = self.broken.lock().unwrap_or_else(|p| p.into_inner());
        if broken.is_none() {
            tracing::debug!(%error, "connection poisoned");
            *broken = Some(error.clone());
        }
        let cause = broken.clone().unwrap_or(error);
        drop(broken);
        let waiting: Vec<_> = self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        for (_, sender) in waiting {
            let _ = sender.send(Err(cause.clone()));
        }
    }

    fn broken(&self) -> Option<ClientError> {
        self.broken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// A connection to one broker. Cheap to share: requests from many tasks are pipelined.
#[derive(Debug)]
pub struct Connection {
    broker: String,
    config: ConnectionConfig,
    shared: Arc<Shared>,
    frames: mpsc::Sender<Bytes>,
    next_correlation_id: AtomicI32,
    /// The broker's supported versions per API key, from ApiVersions.
    versions: HashMap<i16, (i16, i16)>,
}

impl Connection {
    /// Connects over TCP (and TLS), negotiates API versions and authenticates (SASL), as
    /// `config.security` says.
    ///
    /// # Errors
    /// `Connect` if the TCP connection or the TLS handshake fails; `Authentication` if SASL
    /// does; any error of the ApiVersions exchange.
    pub async fn connect(broker: &str, config: ConnectionConfig) -> Result<Self, ClientError> {
        let limit = config.connection_setup_timeout.min(config.request_timeout);
        let connect_error = |reason: String| ClientError::Connect {
            broker: broker.to_string(),
            reason,
        };
        let setup = async {
            let tls = config.security.tls_client_config().map_err(connect_error)?;
            let stream = TcpStream::connect(broker)
                .await
                .map_err(|e| connect_error(e.to_string()))?;
            let _ = stream.set_nodelay(true);
            let mechanism = config.security.mechanism();
            let security = config.security.clone();
            let connection = match tls {
                None => {
                    let (read, write) = stream.into_split();
                    Self::over(broker, read, write, config).await?
                }
                Some(tls) => {
                    let name = crate::security::server_name(broker).map_err(connect_error)?;
                    let stream = tokio_rustls::TlsConnector::from(tls)
                        .connect(name, stream)
                        .await
                        .map_err(|e| connect_error(format!("TLS handshake failed: {e}")))?;
                    let (read, write) = tokio::io::split(stream);
                    Self::over(broker, read, write, config).await?
                }
            };
            if let Some(mechanism) = mechanism {
                connection.authenticate(mechanism, &security).await?;
            }
            Ok(connection)
        };
        tokio::time::timeout(limit, setup)
            .await
            .map_err(|_| ClientError::Connect {
                broker: broker.to_string(),
                reason: format!(
                    "no answer to ApiVersions within socket.connection.setup.timeout.ms ({limit:?})"
                ),
            })?
    }

    /// A connection over any byte stream (tests use `tokio::io::duplex`).
    ///
    /// # Errors
    /// Any error of the ApiVersions exchange.
    pub async fn over<R, W>(
        broker: &str,
        read: R,
        write: W,
        config: ConnectionConfig,
    ) -> Result<Self, ClientError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let shared = Arc::new(Shared::default());
        let (frames, queue) = mpsc::channel(config.max_queued_requests.max(1));
        let reader = tokio::spawn(read_frames(
            read,
            Arc::clone(&shared),
            broker.to_string(),
            config.max_response_bytes,
        ));
        tokio::spawn(write_frames(
            write,
            queue,
            Arc::clone(&shared),
            broker.to_string(),
            (reader.abort_handle(), config.request_timeout),
        ));
        let mut connection = Self {
            broker: broker.to_string(),
            config,
            shared,
            frames,
            next_correlation_id: AtomicI32::new(1),
            versions: HashMap::new(),
        };
        connection.versions = connection.negotiate().await?;
        Ok(connection)
    }

    /// SaslHandshake v1, then SaslAuthenticate rounds for `mechanism` (KIP-152).
    async fn authenticate(
        &self,
        mechanism: SaslMechanism,
        security: &SecurityConfig,
    ) -> Result<(), ClientError> {
        use kafka_protocol::messages::SaslHandshakeRequest;
        let refused = |reason: String| ClientError::Authentication {
            broker: self.broker.clone(),
            reason,
        };
        let handshake = SaslHandshakeRequest::default()
            .with_mechanism(StrBytes::from_static_str(mechanism.name()));
        let answer = self.send(&handshake, (1, 1)).await?;
        if answer.error_code != 0 {
            let offered: Vec<&str> = answer.mechanisms.iter().map(|m| m.as_str()).collect();
            return Err(refused(format!(
                "the broker does not enable {} (it offers {offered:?})",
                mechanism.name()
            )));
        }
        let (user, password) = (&security.sasl_username, &security.sasl_password);
        match mechanism {
            SaslMechanism::Plain => {
                let mut token = Vec::with_capacity(user.len() + password.len() + 2);
                token.push(0);
                token.extend_from_slice(user.as_bytes());
                token.push(0);
                token.extend_from_slice(password.as_bytes());
                self.sasl_round(token).await?;
            }
            SaslMechanism::Scram(m) => {
                let mut scram = crate::security::scram::ScramClient::new(m, user, password)
                    .map_err(|e| refused(e.to_string()))?;
                let server_first = self.sasl_round(scram.client_first()).await?;
                let client_final = scram
                    .client_final(&server_first)
                    .map_err(|e| refused(e.to_string()))?;
                let server_final = self.sasl_round(client_final).await?;
                scram
                    .verify_server_final(&server_final)
                    .map_err(|e| refused(e.to_string()))?;
            }
        }
        tracing::debug!(broker = %self.broker, mechanism = mechanism.name(), "authenticated");
        Ok(())
    }

    /// One SaslAuthenticate round: our token out, the broker's back.
    async fn sasl_round(&self, token: Vec<u8>) -> Result<Bytes, ClientError> {
        use kafka_protocol::messages::SaslAuthenticateRequest;
        let request = SaslAuthenticateRequest::default().with_auth_bytes(Bytes::from(token));
        let answer = self.send(&request, (0, 2)).await?;
        if answer.error_code != 0 {
            let code = kafka_protocol::ResponseError::try_from_code(answer.error_code)
                .map_or_else(|| answer.error_code.to_string(), |c| format!("{c:?}"));
            return Err(ClientError::Authentication {
                broker: self.broker.clone(),
                reason: format!(
                    "{code}: {}",
                    answer.error_message.as_deref().unwrap_or("no message")
                ),
            });
        }
        Ok(answer.auth_bytes)
    }

    /// `host:port` of the broker.
    pub fn broker(&self) -> &str {
        &self.broker
    }

    /// Whether the connection broke (it is never used again once it did).
    pub fn is_broken(&self) -> bool {
        self.shared.broken().is_some()
    }

    /// ApiVersions v3, and v0 if the broker does not know v3 (KIP-511: it answers
    /// `UNSUPPORTED_VERSION` with its own ApiVersions range, in the v0 format).
    async fn negotiate(&self) -> Result<HashMap<i16, (i16, i16)>, ClientError> {
        let request = ApiVersionsRequest::default()
            .with_client_software_name(StrBytes::from_static_str("semel"))
            .with_client_software_version(StrBytes::from_static_str(env!("CARGO_PKG_VERSION")));
        // KIP-511: a broker that does not know v3 answers in the v0 format.
        let (api, payload) = self.round_trip(&request, 3).await?;
        let mut response = decode_response::<ApiVersionsRequest>(api, 3, payload.clone())
            .or_else(|_| decode_response::<ApiVersionsRequest>(api, 0, payload))?;
        if response.error_code == kafka_protocol::ResponseError::UnsupportedVersion.code() {
            response = self.send_version(&request, 0).await?;
        }
        crate::error::check_code(response.error_code).map_err(|code| ClientError::Broker {
            api: ApiKey::ApiVersions,
            code,
            message: None,
        })?;
        Ok(response
            .api_keys
            .iter()
            .map(|k| (k.api_key, (k.min_version, k.max_version)))
            .collect())
    }

    /// The highest version of `api` both sides speak, within `ours`.
    ///
    /// # Errors
    /// `UnsupportedVersion` when the ranges do not overlap or the broker lacks the API.
    pub fn version(&self, api: ApiKey, ours: (i16, i16)) -> Result<i16, ClientError> {
        let theirs = self.versions.get(&(api as i16)).copied();
        match theirs {
            Some((min, max)) if ours.0.max(min) <= ours.1.min(max) => Ok(ours.1.min(max)),
            _ => Err(ClientError::UnsupportedVersion {
                api,
                broker: self.broker.clone(),
                ours,
                theirs,
            }),
        }
    }

    fn encode<R: Request>(
        &self,
        request: &R,
        version: i16,
    ) -> Result<(i32, ApiKey, Bytes), ClientError> {
        let api = ApiKey::try_from(R::KEY).map_err(|()| ClientError::Encode {
            api: ApiKey::ApiVersions,
            version,
            reason: format!("unknown api key {}", R::KEY),
        })?;
        let correlation_id = self.next_correlation_id.fetch_add(1, Ordering::Relaxed);
        // The whole frame at once: a Produce of many batches would otherwise be copied each
        // time the buffer doubles.
        let body = request.compute_size(version).unwrap_or(0);
        let mut buf = BytesMut::with_capacity(64 + self.config.client_id.len() + body);
        buf.extend_from_slice(&[0, 0, 0, 0]);
        let encode_error = |reason: String| ClientError::Encode {
            api,
            version,
            reason,
        };
        RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(correlation_id)
            .with_client_id(Some(StrBytes::from_string(self.config.client_id.clone())))
            .encode(&mut buf, api.request_header_version(version))
            .map_err(|e| encode_error(e.to_string()))?;
        request
            .encode(&mut buf, version)
            .map_err(|e| encode_error(e.to_string()))?;
        let length = i32::try_from(buf.len() - 4).map_err(|_| ClientError::Encode {
            api,
            version,
            reason: format!("{} bytes do not fit a frame", buf.len()),
        })?;
        buf[..4].copy_from_slice(&length.to_be_bytes());
        Ok((correlation_id, api, buf.freeze()))
    }

    /// Sends `request` at `version` and waits for its response.
    ///
    /// # Errors
    /// `ConnectionBroken`, `Timeout` (which also breaks the connection), `Encode`, `Decode`.
    pub async fn send_version<R: Request>(
        &self,
        request: &R,
        version: i16,
    ) -> Result<R::Response, ClientError> {
        let (api, payload) = self.round_trip(request, version).await?;
        decode_response::<R>(api, version, payload)
    }

    /// Sends `request` and returns the raw response (header and body).
    async fn round_trip<R: Request>(
        &self,
        request: &R,
        version: i16,
    ) -> Result<(ApiKey, Bytes), ClientError> {
        let in_flight = self.submit(request, version).await?;
        let api = in_flight.api;
        Ok((api, in_flight.raw().await?))
    }

    /// Queues `request` for writing and returns a handle to await its answer. Requests are
    /// written in the order `submit` is called (and returns), so a caller that needs ordering
    /// across requests (a producer's batches of one partition) submits them one after the
    /// other and awaits the answers concurrently.
    ///
    /// # Errors
    /// `ConnectionBroken`, `Encode`.
    pub async fn submit<R: Request>(
        &self,
        request: &R,
        version: i16,
    ) -> Result<InFlight<R>, ClientError> {
        if let Some(error) = self.shared.broken() {
            return Err(error);
        }
        let (correlation_id, api, frame) = self.encode(request, version)?;
        let (sender, receiver) = oneshot::channel();
        self.shared
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(correlation_id, sender);
        let forget = || {
            self.shared
                .waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&correlation_id);
        };
        // Poisoned between the first check and the registration: nobody would answer.
        if let Some(error) = self.shared.broken() {
            forget();
            return Err(error);
        }
        if self.frames.send(frame).await.is_err() {
            forget();
            return Err(self
                .shared
                .broken()
                .unwrap_or_else(|| self.broken("writer stopped")));
        }
        Ok(InFlight {
            api,
            version,
            correlation_id,
            receiver,
            shared: Arc::clone(&self.shared),
            broker: self.broker.clone(),
            timeout: self.config.request_timeout,
            response: std::marker::PhantomData,
        })
    }

    /// Sends `request` at the highest version both sides speak within `ours`.
    ///
    /// # Errors
    /// As [`Connection::send_version`], and `UnsupportedVersion`.
    pub async fn send<R: Request>(
        &self,
        request: &R,
        ours: (i16, i16),
    ) -> Result<R::Response, ClientError> {
        let api = ApiKey::try_from(R::KEY).unwrap_or(ApiKey::ApiVersions);
        let version = self.version(api, ours)?;
        self.send_version(request, version).await
    }

    /// Sends a request that gets no response (Produce with `acks=0`).
    ///
    /// # Errors
    /// `ConnectionBroken`, `Encode`.
    pub async fn send_without_response<R: Request>(
        &self,
        request: &R,
        version: i16,
    ) -> Result<(), ClientError> {
        if let Some(error) = self.shared.broken() {
            return Err(error);
        }
        let (_, _, frame) = self.encode(request, version)?;
        self.frames.send(frame).await.map_err(|_| {
            self.shared
                .broken()
                .unwrap_or_else(|| self.broken("writer stopped"))
        })
    }

    fn broken(&self, cause: &str) -> ClientError {
        ClientError::ConnectionBroken {
            broker: self.broker.clone(),
            cause: cause.to_string(),
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Dropping `frames` ends the writer once it has written what was queued (an acks=0
        // produce request counts as sent once queued, so it must not be thrown away); the
        // writer then closes the stream and fails whatever still waits for an answer.
    }
}

/// A request on the wire (or queued for it), whose answer can be awaited.
#[derive(Debug)]
pub struct InFlight<R> {
    api: ApiKey,
    version: i16,
    correlation_id: i32,
    receiver: oneshot::Receiver<Answer>,
    shared: Arc<Shared>,
    broker: String,
    timeout: Duration,
    response: std::marker::PhantomData<fn() -> R>,
}

impl<R: Request> InFlight<R> {
    /// Waits up to `timeout` instead of `request.timeout.ms` (a JoinGroup may be held by the
    /// coordinator for the whole rebalance timeout).
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Waits for the answer (at most `request.timeout.ms`, after which the connection is
    /// broken, since the answer could still come later).
    ///
    /// # Errors
    /// `ConnectionBroken`, `Timeout`, `Decode`.
    pub async fn response(self) -> Result<R::Response, ClientError> {
        let (api, version) = (self.api, self.version);
        let payload = self.raw().await?;
        decode_response::<R>(api, version, payload)
    }

    async fn raw(self) -> Result<Bytes, ClientError> {
        match tokio::time::timeout(self.timeout, self.receiver).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(self
                .shared
                .broken()
                .unwrap_or(ClientError::ConnectionBroken {
                    broker: self.broker.clone(),
                    cause: "reader stopped".into(),
                })),
            Err(_) => {
                self.shared
                    .waiting
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&self.correlation_id);
                let error = ClientError::Timeout {
                    api: self.api,
                    broker: self.broker.clone(),
                    after: self.timeout,
                };
                self.shared.poison(ClientError::ConnectionBroken {
                    broker: self.broker.clone(),
                    cause: error.to_string(),
                });
                Err(error)
            }
        }
    }
}

fn decode_response<R: Request>(
    api: ApiKey,
    version: i16,
    mut payload: Bytes,
) -> Result<R::Response, ClientError> {
    let decode_error = |reason: String| ClientError::Decode {
        api,
        version,
        reason,
    };
    ResponseHeader::decode(&mut payload, api.response_header_version(version))
        .map_err(|e| decode_error(e.to_string()))?;
    let response =
        R::Response::decode(&mut payload, version).map_err(|e| decode_error(e.to_string()))?;
    if payload.has_remaining() {
        return Err(decode_error(format!(
            "{} bytes left after the body",
            payload.remaining()
        )));
    }
    Ok(response)
}

/// Writes queued frames in order until the connection breaks or is dropped (then after the
/// frames already queued). On the way out it closes the write half, fails the requests still
/// waiting for an answer, and gives the reader `grace` to see the broker close its side.
async fn write_frames<W: AsyncWrite + Unpin>(
    mut write: W,
    mut queue: mpsc::Receiver<Bytes>,
    shared: Arc<Shared>,
    broker: String,
    (reader, grace): (tokio::task::AbortHandle, Duration),
) {
    while let Some(frame) = queue.recv().await {
        if shared.broken().is_some() {
            break;
        }
        if let Err(e) = write.write_all(&frame).await {
            shared.poison(ClientError::ConnectionBroken {
                broker: broker.clone(),
                cause: format!("write failed: {e}"),
            });
            break;
        }
    }
    let _ = write.flush().await;
    let _ = write.shutdown().await;
    shared.poison(ClientError::ConnectionBroken {
        broker: broker.clone(),
        cause: "connection closed by the client".into(),
    });
    tokio::time::sleep(grace).await;
    reader.abort();
}

async fn read_frames<R: AsyncRead + Unpin>(
    mut read: R,
    shared: Arc<Shared>,
    broker: String,
    max_response_bytes: usize,
) {
    let cause = loop {
        let mut prefix = [0u8; 4];
        if let Err(e) = read.read_exact(&mut prefix).await {
            break format!("read failed: {e}");
        }
        let length = i32::from_be_bytes(prefix);
        let length = match usize::try_from(length) {
            Ok(l) if (4..=max_response_bytes).contains(&l) => l,
            _ => break format!("response frame length {length} outside 4..={max_response_bytes}"),
        };
        let mut payload = vec![0u8; length];
        if let Err(e) = read.read_exact(&mut payload).await {
            break format!("read failed inside a frame: {e}");
        }
        let correlation_id = i32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
        let waiter = shared
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&correlation_id);
        match waiter {
            Some(sender) => {
                let _ = sender.send(Ok(Bytes::from(payload)));
            }
            None if shared.broken().is_some() => return,
            // An answer nobody asked for: the stream can no longer be trusted.
            None => break format!("response with unknown correlation id {correlation_id}"),
        }
    };
    shared.poison(ClientError::ConnectionBroken { broker, cause });
}
