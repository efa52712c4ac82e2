//! One client connection: a reader that decodes requests and runs their in-order part, and a
//! writer that sends responses in request order.
//!
//! Requests are handled in arrival order up to the point where they only wait (for an fsync
//! under `acks=all`, or for data in a long-polling fetch); that waiting part runs while later
//! requests are read, and the writer answers strictly in order, as Kafka clients require. At
//! most `max_in_flight_per_connection` requests wait to be answered; beyond that, reading pauses.
//!
//! Memory is budgeted broker-wide (`queued.max.request.bytes`): a request takes its frame's
//! length from the budget before its body is read, and once the guard has counted the values
//! it decodes into, what those cost too; it gives all of it back when its answer is written.
//! A connection whose next request does not fit stops being read (back-pressure) instead of
//! the broker growing. One connection holds at most `socket.request.max.bytes` of it. A request that alone would count more than `socket.request.max.bytes`
//! closes the connection: a few bytes per element on the wire must not become hundreds per
//! element in memory.
//!
//! Anything that breaks the framing or cannot be decoded closes this connection only, as
//! Kafka does: a negative or oversized length, an unknown API key, an unsupported version
//! (except ApiVersions, which answers `UNSUPPORTED_VERSION` in v0 per KIP-511), a body the
//! [`guard`](super::guard) refuses, or a body that does not decode.
//!
//! References: Kafka protocol guide ("Requests and responses", "Versioning"), KIP-511.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiKey, RequestHeader, ResponseHeader, ResponseKind, SaslAuthenticateRequest,
    SaslHandshakeRequest,
};
use kafka_protocol::protocol::{Decodable, Encodable};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tracing::Instrument;

use super::frame::{FrameError, FrameReader};
use super::guard;
use crate::api::{self, Reply};
use crate::broker::BrokerState;
use crate::security::{Authenticator, Step, authenticate_response};

/// A request whose response is owed, in arrival order.
struct Pending {
    correlation_id: i32,
    api_key: ApiKey,
    api_version: i16,
    reply: Reply,
    /// When its frame was read (for the latency metric).
    started: std::time::Instant,
    /// This request's share of `queued.max.request.bytes` and of its connection's share,
    /// given back once it is answered.
    memory: Option<Held>,
}

/// Memory a request holds: (broker-wide budget, its connection's share).
struct Held {
    _broker: OwnedSemaphorePermit,
    _connection: OwnedSemaphorePermit,
}

/// Acquires `n` permits, unless shutdown comes first (`None`, as when the semaphore is
/// closed, which never happens: it would only mean the broker is going away).
async fn acquire(
    semaphore: &Arc<Semaphore>,
    n: u32,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<OwnedSemaphorePermit> {
    tokio::select! {
        permit = Arc::clone(semaphore).acquire_many_owned(n) => permit.ok(),
        _ = shutdown.wait_for(|stop| *stop) => None,
    }
}

/// Why a connection was closed by the broker.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("request of {0} bytes is too short for a request header")]
    ShortHeader(usize),
    #[error("unknown API key {0}")]
    UnknownApiKey(i16),
    #[error("{api:?} version {version} is not supported (supported: {min}..={max})")]
    UnsupportedVersion {
        api: ApiKey,
        version: i16,
        min: i16,
        max: i16,
    },
    #[error("malformed {api:?} v{version} request header: {reason}")]
    BadHeader {
        api: ApiKey,
        version: i16,
        reason: String,
    },
    #[error("refused {api:?} v{version} request body: {source}")]
    Guard {
        api: ApiKey,
        version: i16,
        source: guard::GuardError,
    },
    #[error(
        "{api:?} v{version} request of {frame_bytes} bytes holds {elements} values, counted as {cost} bytes in memory, over socket.request.max.bytes ({max})"
    )]
    TooCostly {
        api: ApiKey,
        version: i16,
        frame_bytes: usize,
        elements: u64,
        cost: u64,
        max: usize,
    },
    #[error("malformed {api:?} v{version} request body: {reason}")]
    BadBody {
        api: ApiKey,
        version: i16,
        reason: String,
    },
    #[error("{0:?} request before SASL authentication")]
    Unauthenticated(ApiKey),
    #[error("SASL authentication failed: {0}")]
    Authentication(String),
}

/// Longest a TLS handshake may take before the connection is dropped (a peer that connects
/// and sends nothing must not hold a connection slot).
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a connection stays open after a failed authentication was answered.
const FAILED_AUTHENTICATION_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

/// Serves one connection until the peer closes it, it breaks the protocol, or shutdown.
pub(crate) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<BrokerState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let span = tracing::info_span!("connection", %peer);
    async move {
        let _ = stream.set_nodelay(true);
        let Some(acceptor) = state.security.tls.clone() else {
            let (read_half, write_half) = stream.into_split();
            return serve_stream(read_half, write_half, peer, state, shutdown).await;
        };
        let accepted = tokio::select! {
            accepted = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)) => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        match accepted {
            Ok(Ok(tls)) => {
                let (read_half, write_half) = tokio::io::split(tls);
                serve_stream(read_half, write_half, peer, state, shutdown).await;
            }
            Ok(Err(e)) => {
                state.metrics.tls_handshakes_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "TLS handshake failed; closing connection");
            }
            Err(_) => {
                state.metrics.tls_handshakes_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(timeout = ?TLS_HANDSHAKE_TIMEOUT, "no TLS handshake in time; closing connection");
            }
        }
    }
    .instrument(span)
    .await;
}

/// Serves a connection's byte stream (plain TCP or TLS).
async fn serve_stream<R, W>(
    read_half: R,
    write_half: W,
    peer: SocketAddr,
    state: Arc<BrokerState>,
    shutdown: watch::Receiver<bool>,
) where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    {
        let (pending_tx, pending_rx) = mpsc::channel(state.config.max_in_flight_per_connection);
        let writer = tokio::spawn(
            write_responses(write_half, pending_rx, Arc::clone(&state)).in_current_span(),
        );
        state
            .metrics
            .connections_open
            .fetch_add(1, Ordering::Relaxed);
        state
            .metrics
            .connections_accepted
            .fetch_add(1, Ordering::Relaxed);
        let reader = FrameReader::new(read_half, state.config.max_frame_bytes);
        match read_requests(reader, &state, peer, pending_tx, shutdown).await {
            Ok(()) => tracing::debug!("connection closed"),
            Err(refusal) => {
                state
                    .metrics
                    .connections_refused
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %refusal, "closing connection");
            }
        }
        if let Err(e) = writer.await {
            tracing::error!(error = %e, "response writer failed");
        }
        state
            .metrics
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

async fn read_requests<R: tokio::io::AsyncRead + Unpin>(
    mut reader: FrameReader<R>,
    state: &Arc<BrokerState>,
    peer: SocketAddr,
    pending: mpsc::Sender<Pending>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), Refusal> {
    let budget = &state.request_memory;
    // One connection may hold at most one largest request's worth of the budget, so a
    // client pipelining large requests (and perhaps not reading the answers) waits for its
    // own earlier requests instead of taking the budget from everyone else.
    let share = Arc::new(Semaphore::new(state.config.max_frame_bytes));
    let mut auth = Authenticator::new(Arc::clone(&state.security));
    loop {
        let length = tokio::select! {
            length = reader.next_frame_len() => length?,
            _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
        };
        let Some(length) = length else {
            return Ok(());
        };
        // The frame's bytes first: they are read into memory next. `length` is at most
        // `socket.request.max.bytes`, which fits an i32, the share and the budget.
        let Some(mut own) = acquire(&share, permits(length as u64), &mut shutdown).await else {
            return Ok(());
        };
        let Some(mut memory) = acquire(budget, permits(length as u64), &mut shutdown).await else {
            return Ok(());
        };
        let frame = tokio::select! {
            frame = reader.read_frame() => frame?,
            _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
        };
        let Some(frame) = frame else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        if auth.expects_raw_token() {
            // After SaslHandshake v0 the frame is a bare SASL token, not a request.
            let step = auth.step(&frame, true);
            count_authentication(state, &step);
            let reply = match step {
                Step::Continue(token) | Step::Done(_, token) => Reply::Raw(Bytes::from(token)),
                Step::Failed(reason) | Step::Illegal(reason) => {
                    return Err(Refusal::Authentication(reason));
                }
            };
            let raw = Pending {
                correlation_id: 0,
                api_key: ApiKey::SaslAuthenticate,
                api_version: 0,
                reply,
                started,
                memory: Some(Held {
                    _broker: memory,
                    _connection: own,
                }),
            };
            if pending.send(raw).await.is_err() {
                return Ok(());
            }
            continue;
        }
        let Some(request) = parse_request(frame)? else {
            continue;
        };
        let reply = match request {
            Parsed::Request {
                header,
                api_key,
                body,
                elements,
            } => {
                let api_version = header.request_api_version;
                state.metrics.request(api_key, length);
                if matches!(api_key, ApiKey::SaslHandshake | ApiKey::SaslAuthenticate) {
                    let (response, keep, failure) =
                        sasl_request(state, &mut auth, api_key, api_version, body)?;
                    let answer = Pending {
                        correlation_id: header.correlation_id,
                        api_key,
                        api_version,
                        reply: Reply::Now(Box::new(response)),
                        started,
                        memory: Some(Held {
                            _broker: memory,
                            _connection: own,
                        }),
                    };
                    if pending.send(answer).await.is_err() {
                        return Ok(());
                    }
                    if !keep {
                        // As Kafka (`connection.failed.authentication.delay.ms`, 100 ms):
                        // the refusal is written, then the connection closes a little later,
                        // so a client reads the reason rather than only a closed socket, and
                        // one guessing passwords is slowed down.
                        tokio::time::sleep(FAILED_AUTHENTICATION_DELAY).await;
                        return Err(Refusal::Authentication(failure));
                    }
                    continue;
                }
                if !auth.permits(api_key) {
                    return Err(Refusal::Unauthenticated(api_key));
                }
                let cost = (length as u64)
                    .saturating_add(elements.saturating_mul(crate::config::REQUEST_ELEMENT_BYTES));
                if cost > state.config.max_frame_bytes as u64 {
                    return Err(Refusal::TooCostly {
                        api: api_key,
                        version: api_version,
                        frame_bytes: length,
                        elements,
                        cost,
                        max: state.config.max_frame_bytes,
                    });
                }
                let extra = permits(cost - length as u64);
                if extra > 0 {
                    // The connection's share: only this connection's earlier requests hold
                    // it, and they are answered without waiting for this one.
                    let Some(more) = acquire(&share, extra, &mut shutdown).await else {
                        return Ok(());
                    };
                    own.merge(more);
                    match Arc::clone(budget).try_acquire_many_owned(extra) {
                        Ok(more) => memory.merge(more),
                        Err(_) => {
                            // Wait for the whole cost holding none of the budget, so that
                            // requests waiting here never hold it from each other.
                            drop(memory);
                            let Some(all) = acquire(budget, permits(cost), &mut shutdown).await
                            else {
                                return Ok(());
                            };
                            memory = all;
                        }
                    }
                }
                let reply = api::handle(state, &header, api_key, body, peer, auth.permissions())
                    .await
                    .map_err(|reason| Refusal::BadBody {
                        api: api_key,
                        version: api_version,
                        reason,
                    })?;
                Pending {
                    correlation_id: header.correlation_id,
                    api_key,
                    api_version,
                    reply,
                    started,
                    memory: Some(Held {
                        _broker: memory,
                        _connection: own,
                    }),
                }
            }
            Parsed::Immediate(mut pending) => {
                pending.memory = Some(Held {
                    _broker: memory,
                    _connection: own,
                });
                pending
            }
        };
        if matches!(reply.reply, Reply::Nothing) {
            continue;
        }
        if pending.send(reply).await.is_err() {
            // The writer stopped: the peer is gone.
            return Ok(());
        }
    }
}

/// Answers SaslHandshake or SaslAuthenticate: the response, whether the connection stays
/// open after it, and if not, why.
fn sasl_request(
    state: &BrokerState,
    auth: &mut Authenticator,
    api_key: ApiKey,
    version: i16,
    mut body: Bytes,
) -> Result<(ResponseKind, bool, String), Refusal> {
    let bad_body = |e: anyhow::Error| Refusal::BadBody {
        api: api_key,
        version,
        reason: e.to_string(),
    };
    if api_key == ApiKey::SaslHandshake {
        let request = SaslHandshakeRequest::decode(&mut body, version).map_err(bad_body)?;
        let (response, keep) = auth.handshake(request.mechanism.as_str(), version);
        let why = format!("SaslHandshake refused ({})", response.error_code);
        return Ok((ResponseKind::SaslHandshake(response), keep, why));
    }
    let request = SaslAuthenticateRequest::decode(&mut body, version).map_err(bad_body)?;
    let step = auth.step(&request.auth_bytes, false);
    count_authentication(state, &step);
    let (response, keep) = authenticate_response(&step);
    let why = response
        .error_message
        .as_ref()
        .map(|m| m.to_string())
        .unwrap_or_default();
    Ok((ResponseKind::SaslAuthenticate(response), keep, why))
}

fn count_authentication(state: &BrokerState, step: &Step) {
    let counter = match step {
        Step::Continue(_) => return,
        Step::Done(..) => &state.metrics.authentications_succeeded,
        Step::Failed(_) | Step::Illegal(_) => &state.metrics.authentications_failed,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Permits for `bytes` of `queued.max.request.bytes` (one per byte). Callers pass at most
/// `socket.request.max.bytes`, an i32.
fn permits(bytes: u64) -> u32 {
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

enum Parsed {
    Request {
        header: RequestHeader,
        api_key: ApiKey,
        body: Bytes,
        /// Values the body decodes into, as the guard counted them.
        elements: u64,
    },
    /// Answered without decoding the body (ApiVersions with an unsupported version).
    Immediate(Pending),
}

fn parse_request(mut frame: Bytes) -> Result<Option<Parsed>, Refusal> {
    if frame.len() < 8 {
        return Err(Refusal::ShortHeader(frame.len()));
    }
    let raw_key = i16::from_be_bytes([frame[0], frame[1]]);
    let version = i16::from_be_bytes([frame[2], frame[3]]);
    let correlation_id = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
    let api_key = ApiKey::try_from(raw_key).map_err(|()| Refusal::UnknownApiKey(raw_key))?;
    let Some(range) = api::supported_versions(api_key) else {
        return Err(Refusal::UnknownApiKey(raw_key));
    };
    if version < range.0 || version > range.1 {
        if api_key == ApiKey::ApiVersions {
            tracing::debug!(
                version,
                "ApiVersions with an unsupported version; answering v0 (KIP-511)"
            );
            return Ok(Some(Parsed::Immediate(Pending {
                correlation_id,
                api_key,
                api_version: 0,
                reply: Reply::Now(api::api_versions::unsupported_version_response()),
                started: std::time::Instant::now(),
                memory: None,
            })));
        }
        return Err(Refusal::UnsupportedVersion {
            api: api_key,
            version,
            min: range.0,
            max: range.1,
        });
    }
    let header = RequestHeader::decode(&mut frame, api_key.request_header_version(version))
        .map_err(|e| Refusal::BadHeader {
            api: api_key,
            version,
            reason: e.to_string(),
        })?;
    let checked =
        guard::check_request_body(raw_key, version, &frame).map_err(|source| Refusal::Guard {
            api: api_key,
            version,
            source,
        })?;
    Ok(Some(Parsed::Request {
        header,
        api_key,
        body: frame,
        elements: checked.elements,
    }))
}

/// Writes a whole response frame and flushes it: over TLS, written bytes can wait in the
/// session's buffer until flushed (a refusal followed by closing the connection would
/// otherwise never reach the client). For plain TCP the flush does nothing.
async fn write_frame<W: AsyncWrite + Unpin>(writer: &mut W, frame: &[u8]) -> std::io::Result<()> {
    writer.write_all(frame).await?;
    writer.flush().await
}

/// Largest response buffer a connection keeps between responses.
const RETAINED_WRITE_BUFFER_BYTES: usize = 1024 * 1024;

async fn write_responses<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut pending: mpsc::Receiver<Pending>,
    state: Arc<BrokerState>,
) {
    let mut buffer = BytesMut::new();
    while let Some(item) = pending.recv().await {
        let response = match item.reply {
            Reply::Now(response) => *response,
            Reply::Later(future) => future.await,
            Reply::Nothing => continue,
            Reply::Raw(token) => {
                buffer.clear();
                buffer.put_u32(u32::try_from(token.len()).unwrap_or(u32::MAX));
                buffer.extend_from_slice(&token);
                if let Err(e) = write_frame(&mut writer, &buffer).await {
                    tracing::debug!(error = %e, "peer stopped reading responses");
                    return;
                }
                continue;
            }
        };
        state.metrics.response_errors(item.api_key, &response);
        buffer.clear();
        buffer.put_i32(0);
        let header = ResponseHeader::default().with_correlation_id(item.correlation_id);
        let header_version = item.api_key.response_header_version(item.api_version);
        let encoded = header
            .encode(&mut buffer, header_version)
            .and_then(|()| response.encode(&mut buffer, item.api_version));
        if let Err(e) = encoded {
            // A handler built a response this version cannot carry: a broker bug. The client
            // would wait forever for this correlation id, so close the connection.
            tracing::error!(api = ?item.api_key, version = item.api_version, error = %e, "cannot encode response; closing connection");
            return;
        }
        let Ok(length) = i32::try_from(buffer.len() - 4) else {
            tracing::error!(api = ?item.api_key, bytes = buffer.len(), "response too large for a frame; closing connection");
            return;
        };
        buffer[..4].copy_from_slice(&length.to_be_bytes());
        if let Err(e) = write_frame(&mut writer, &buffer).await {
            tracing::debug!(error = %e, "peer stopped reading responses");
            return;
        }
        state
            .metrics
            .answered(item.api_key, item.started.elapsed(), buffer.len());
        // Answered: its memory goes back to the budget, and a large answer's buffer is not
        // kept for the life of the connection.
        drop(item.memory);
        if buffer.capacity() > RETAINED_WRITE_BUFFER_BYTES {
            buffer = BytesMut::new();
        }
    }
    // Every answer is written: close our side (over TLS, with its close_notify).
    let _ = writer.shutdown().await;
}
