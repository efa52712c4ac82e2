//! ApiVersions (key 18): the APIs and version ranges this broker implements.
//!
//! The response header is always v0 (the crate's `header_version` for ApiVersions says so), and
//! tagged fields are written only when they differ from their defaults, which librdkafka before
//! 2.2 needs. A request with a version the broker does not support gets `UNSUPPORTED_VERSION`
//! encoded as v0, still listing the supported ranges, so the client can retry (KIP-511).
//!
//! References: KIP-35, KIP-511, Kafka protocol guide (ApiVersions).

use kafka_protocol::ResponseError;
use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::{ApiVersionsRequest, ApiVersionsResponse, ResponseKind};

use super::SUPPORTED_APIS;

fn api_keys() -> Vec<ApiVersion> {
    SUPPORTED_APIS
        .iter()
        .map(|&(key, min, max)| {
            ApiVersion::default()
                .with_api_key(key as i16)
                .with_min_version(min)
                .with_max_version(max)
        })
        .collect()
}

pub(crate) fn handle(request: ApiVersionsRequest) -> ApiVersionsResponse {
    tracing::debug!(
        client_software_name = %request.client_software_name,
        client_software_version = %request.client_software_version,
        "ApiVersions"
    );
    ApiVersionsResponse::default().with_api_keys(api_keys())
}

/// The KIP-511 answer to an ApiVersions request with a version this broker does not support.
pub(crate) fn unsupported_version_response() -> Box<ResponseKind> {
    Box::new(ResponseKind::ApiVersions(
        ApiVersionsResponse::default()
            .with_error_code(ResponseError::UnsupportedVersion.code())
            .with_api_keys(api_keys()),
    ))
}
