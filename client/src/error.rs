//! Errors of the connection layer. Kafka error codes are data (`code`), not strings.

use std::time::Duration;

use kafka_protocol::ResponseError;
use kafka_protocol::messages::ApiKey;

/// What went wrong talking to a broker.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The broker refused our credentials, or SASL could not be agreed on, or the broker
    /// did not prove it knows them (SCRAM). Retrying with the same settings will not help.
    #[error("authentication with {broker} failed: {reason}")]
    Authentication {
        /// `host:port`.
        broker: String,
        /// What the broker said, or what we found wrong.
        reason: String,
    },
    /// No TCP connection could be made.
    #[error("cannot connect to {broker}: {reason}")]
    Connect {
        /// `host:port` as configured or announced.
        broker: String,
        /// The OS error.
        reason: String,
    },
    /// The connection broke (closed, a framing error, a timeout). Every request that was in
    /// flight on it fails with this, and the connection is not used again.
    #[error("connection to {broker} broke: {cause}")]
    ConnectionBroken {
        /// `host:port`.
        broker: String,
        /// Why, as first observed.
        cause: String,
    },
    /// No answer within `request.timeout.ms`; the connection is closed, as Kafka clients do.
    #[error("{api:?} to {broker} got no answer within {after:?}")]
    Timeout {
        /// The request's API.
        api: ApiKey,
        /// `host:port`.
        broker: String,
        /// The timeout.
        after: Duration,
    },
    /// The broker does not support any version of this API that we do.
    #[error("{broker} supports no version of {api:?} in {ours:?} (it offers {theirs:?})")]
    UnsupportedVersion {
        /// The API.
        api: ApiKey,
        /// `host:port`.
        broker: String,
        /// The versions this library speaks.
        ours: (i16, i16),
        /// What the broker announced, if anything.
        theirs: Option<(i16, i16)>,
    },
    /// A request could not be encoded (a value out of the protocol's range).
    #[error("cannot encode {api:?} v{version}: {reason}")]
    Encode {
        /// The API.
        api: ApiKey,
        /// The version.
        version: i16,
        /// The codec's message.
        reason: String,
    },
    /// A response could not be decoded.
    #[error("cannot decode the {api:?} v{version} response: {reason}")]
    Decode {
        /// The API.
        api: ApiKey,
        /// The version.
        version: i16,
        /// The codec's message.
        reason: String,
    },
    /// The broker answered with an error code.
    #[error("{api:?}: broker error {code:?}{}", message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    Broker {
        /// The API.
        api: ApiKey,
        /// The Kafka error.
        code: ResponseError,
        /// The broker's message, if it sent one.
        message: Option<String>,
    },
    /// None of the bootstrap servers could be reached or answered Metadata.
    #[error("no broker reachable; tried {tried:?}; last error: {last}")]
    NoBrokerReachable {
        /// Addresses tried.
        tried: Vec<String>,
        /// The last error.
        last: String,
    },
    /// The metadata names no broker for this node id, topic or partition.
    #[error("{0}")]
    Metadata(String),
}

impl ClientError {
    /// Whether trying again (after a metadata refresh or a reconnect) can succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            Self::Connect { .. }
            | Self::ConnectionBroken { .. }
            | Self::Timeout { .. }
            | Self::NoBrokerReachable { .. }
            | Self::Metadata(_) => true,
            Self::Broker { code, .. } => code.is_retriable(),
            Self::Authentication { .. }
            | Self::UnsupportedVersion { .. }
            | Self::Encode { .. }
            | Self::Decode { .. } => false,
        }
    }
}

/// A Kafka error code as `Ok(())` for 0, `Err(ResponseError)` otherwise (codes this crate does
/// not know become `ResponseError::Unknown(code)`).
///
/// # Errors
/// The error the code stands for.
pub fn check_code(code: i16) -> Result<(), ResponseError> {
    match ResponseError::try_from_code(code) {
        None => Ok(()),
        Some(error) => Err(error),
    }
}
