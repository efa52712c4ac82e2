//! One client connection: a reader that decodes requests and runs their in-order part, and a
//! writer that sends responses in request order.
//!
//! Requests are handled in arrival order up to the point where they only wait (for an fsync
//! under `acks=all`, or for data in a long-polling fetch); that waiting part runs while later
//! requests are read, and the writer answers strictly in order, as Kafka clients require. At
//! most `max_in_flight_per_connection` requests wait to be answered; beyond that, reading pauses.
//!
//! Anything that breaks the framing or cannot be decoded closes this connection only, as
//! Kafka does: a negative or oversized length, an unknown API key, an unsupported version
//! (except ApiVersions, which answers `UNSUPPORTED_VERSION` in v0 per KIP-511), a body the
//! [`guard`](super::guard) refuses, or a body that does not decode.
//!
//! References: Kafka protocol guide ("Requests and responses", "Versioning"), KIP-511.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use super::frame::{FrameError, FrameReader};
use super::guard;
use crate::api::{self, Reply};
use crate::broker::BrokerState;

/// A request whose response is owed, in arrival order.
struct Pending {
    correlation_id: i32,
    api_key: ApiKey,
    api_version: i16,
    reply: Reply,
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
    #[error("malformed {api:?} v{version} request body: {reason}")]
    BadBody {
        api: ApiKey,
        version: i16,
        reason: String,
    },
}

/// Serves one connection until the peer closes it, it breaks the protocol, or shutdown.
pub(crate) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<BrokerState>,
    shutdown: watch::Receiver<bool>,
) {
    let span = tracing::info_span!("connection", %peer);
    async move {
        let _ = stream.set_nodelay(true);
        let (read_half, write_half) = stream.into_split();
        let (pending_tx, pending_rx) = mpsc::channel(state.config.max_in_flight_per_connection);
        let writer = tokio::spawn(write_responses(write_half, pending_rx).in_current_span());
        let reader = FrameReader::new(read_half, state.config.max_frame_bytes);
        match read_requests(reader, &state, peer, pending_tx, shutdown).await {
            Ok(()) => tracing::debug!("connection closed"),
            Err(refusal) => tracing::warn!(error = %refusal, "closing connection"),
        }
        if let Err(e) = writer.await {
            tracing::error!(error = %e, "response writer failed");
        }
    }
    .instrument(span)
    .await;
}

async fn read_requests<R: tokio::io::AsyncRead + Unpin>(
    mut reader: FrameReader<R>,
    state: &Arc<BrokerState>,
    peer: SocketAddr,
    pending: mpsc::Sender<Pending>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), Refusal> {
    loop {
        let frame = tokio::select! {
            frame = reader.read_frame() => frame?,
            _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
        };
        let Some(frame) = frame else {
            return Ok(());
        };
        let Some(request) = parse_request(frame)? else {
            continue;
        };
        let reply = match request {
            Parsed::Request {
                header,
                api_key,
                body,
            } => {
                let api_version = header.request_api_version;
                let reply = api::handle(state, &header, api_key, body, peer)
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
                }
            }
            Parsed::Immediate(pending) => pending,
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

enum Parsed {
    Request {
        header: RequestHeader,
        api_key: ApiKey,
        body: Bytes,
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
    guard::check_request_body(raw_key, version, &frame).map_err(|source| Refusal::Guard {
        api: api_key,
        version,
        source,
    })?;
    Ok(Some(Parsed::Request {
        header,
        api_key,
        body: frame,
    }))
}

async fn write_responses<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut pending: mpsc::Receiver<Pending>,
) {
    let mut buffer = BytesMut::new();
    while let Some(item) = pending.recv().await {
        let response = match item.reply {
            Reply::Now(response) => *response,
            Reply::Later(future) => future.await,
            Reply::Nothing => continue,
        };
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
        if let Err(e) = writer.write_all(&buffer).await {
            tracing::debug!(error = %e, "peer stopped reading responses");
            return;
        }
    }
}
