//! Security of a connection: TLS (rustls) and SASL (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512),
//! configured with the Java client's names (`security.protocol`, `sasl.mechanism`,
//! `ssl.ca.location`, ...).
//!
//! A secured connection is set up in this order, as Kafka's clients do: TCP, the TLS handshake
//! (`SSL`, `SASL_SSL`), ApiVersions, then SaslHandshake v1 and SaslAuthenticate rounds
//! (`SASL_PLAINTEXT`, `SASL_SSL`). Only then is the connection handed to its user.
//!
//! [`scram`] and the PEM loaders here are shared with semel-broker, which runs the server side.
//!
//! References: KIP-43 (SaslHandshake), KIP-84 (SCRAM), KIP-152 (SaslAuthenticate), the Java
//! client's `security.protocol`, `sasl.*` and `ssl.*` settings, librdkafka's `ssl.*.location`.

pub mod scram;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::properties::{PropertiesError, Property};

/// `security.protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SecurityProtocol {
    /// `PLAINTEXT`: neither TLS nor SASL.
    #[default]
    Plaintext,
    /// `SSL`: TLS.
    Ssl,
    /// `SASL_PLAINTEXT`: SASL over plain TCP.
    SaslPlaintext,
    /// `SASL_SSL`: SASL over TLS.
    SaslSsl,
}

impl SecurityProtocol {
    /// Kafka's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Plaintext => "PLAINTEXT",
            Self::Ssl => "SSL",
            Self::SaslPlaintext => "SASL_PLAINTEXT",
            Self::SaslSsl => "SASL_SSL",
        }
    }

    /// The protocol named `name` (any case, as Kafka accepts).
    pub fn from_name(name: &str) -> Option<Self> {
        match name.to_ascii_uppercase().as_str() {
            "PLAINTEXT" => Some(Self::Plaintext),
            "SSL" => Some(Self::Ssl),
            "SASL_PLAINTEXT" => Some(Self::SaslPlaintext),
            "SASL_SSL" => Some(Self::SaslSsl),
            _ => None,
        }
    }

    /// Whether it runs over TLS.
    pub fn tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }

    /// Whether it authenticates with SASL.
    pub fn sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }
}

/// `sasl.mechanism`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SaslMechanism {
    /// `PLAIN` (RFC 4616): the password is sent, so use it over TLS only.
    Plain,
    /// `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    Scram(scram::ScramMechanism),
}

impl SaslMechanism {
    /// Its SASL name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::Scram(m) => m.name(),
        }
    }

    /// The mechanism named `name` (upper case, as SASL names are).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "PLAIN" => Some(Self::Plain),
            other => scram::ScramMechanism::from_name(other).map(Self::Scram),
        }
    }
}

/// Settings of TLS and SASL for every connection of a client.
#[derive(Clone)]
pub struct SecurityConfig {
    /// `security.protocol`.
    pub protocol: SecurityProtocol,
    /// `sasl.mechanism` (`PLAIN` when SASL is on and none is given, as in Kafka).
    pub sasl_mechanism: Option<SaslMechanism>,
    /// `sasl.username` (librdkafka's name; the Java client puts it in `sasl.jaas.config`).
    pub sasl_username: String,
    /// `sasl.password`.
    pub sasl_password: String,
    /// `ssl.ca.location`: PEM file of the certificate authorities trusted for the broker's
    /// certificate. `None`: the system's trusted roots.
    pub ssl_ca_location: Option<PathBuf>,
    /// `ssl.certificate.location`: PEM certificate chain presented when the broker asks for a
    /// client certificate.
    pub ssl_certificate_location: Option<PathBuf>,
    /// `ssl.key.location`: PEM private key of that certificate.
    pub ssl_key_location: Option<PathBuf>,
    /// `ssl.endpoint.identification.algorithm`: `true` (`https`, the default) checks that
    /// the broker's certificate names the host connected to; `false` (`none`) checks only that
    /// a trusted authority signed it.
    pub ssl_endpoint_identification: bool,
}

impl std::fmt::Debug for SecurityConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecurityConfig")
            .field("protocol", &self.protocol)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("sasl_username", &self.sasl_username)
            .field("sasl_password", &"<hidden>")
            .field("ssl_ca_location", &self.ssl_ca_location)
            .field("ssl_certificate_location", &self.ssl_certificate_location)
            .field("ssl_key_location", &self.ssl_key_location)
            .field(
                "ssl_endpoint_identification",
                &self.ssl_endpoint_identification,
            )
            .finish()
    }
}

impl Default for SecurityConfig {
    /// Plain TCP, no authentication (Kafka's default).
    fn default() -> Self {
        Self {
            protocol: SecurityProtocol::Plaintext,
            sasl_mechanism: None,
            sasl_username: String::new(),
            sasl_password: String::new(),
            ssl_ca_location: None,
            ssl_certificate_location: None,
            ssl_key_location: None,
            ssl_endpoint_identification: true,
        }
    }
}

impl SecurityConfig {
    /// The SASL mechanism in use, if SASL is on.
    pub fn mechanism(&self) -> Option<SaslMechanism> {
        self.protocol
            .sasl()
            .then(|| self.sasl_mechanism.unwrap_or(SaslMechanism::Plain))
    }

    /// Reads `p` if it is one of the security settings; `Ok(false)` if it is not one.
    ///
    /// # Errors
    /// A security setting with a value that cannot work (named with its line).
    pub fn apply_property(&mut self, p: &Property) -> Result<bool, PropertiesError> {
        match p.key.as_str() {
            "security.protocol" => {
                self.protocol = SecurityProtocol::from_name(&p.value)
                    .ok_or_else(|| p.error("not PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"))?;
            }
            "sasl.mechanism" | "sasl.mechanisms" => {
                self.sasl_mechanism = Some(SaslMechanism::from_name(&p.value).ok_or_else(
                    || p.error("not PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (the mechanisms semel-client speaks)"),
                )?);
            }
            "sasl.username" => self.sasl_username.clone_from(&p.value),
            "sasl.password" => self.sasl_password.clone_from(&p.value),
            "ssl.ca.location" => self.ssl_ca_location = Some(PathBuf::from(&p.value)),
            "ssl.certificate.location" => {
                self.ssl_certificate_location = Some(PathBuf::from(&p.value));
            }
            "ssl.key.location" => self.ssl_key_location = Some(PathBuf::from(&p.value)),
            "ssl.endpoint.identification.algorithm" => {
                self.ssl_endpoint_identification = match p.value.to_ascii_lowercase().as_str() {
                    "https" => true,
                    "none" | "" => false,
                    _ => return Err(p.error("not https or none")),
                };
            }
            "sasl.jaas.config" => {
                return Err(p.error(
                    "not read by semel-client: give sasl.username and sasl.password \
                     (librdkafka's names) instead",
                ));
            }
            "ssl.truststore.location" | "ssl.keystore.location" => {
                return Err(p.error(
                    "Java key stores are not read: give PEM files as ssl.ca.location, \
                     ssl.certificate.location and ssl.key.location",
                ));
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Checks that the settings can work together.
    ///
    /// # Errors
    /// The setting that cannot work (Kafka's name) and why.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.protocol.sasl() && self.sasl_username.is_empty() {
            return Err((
                "sasl.username",
                format!("{} needs a user name", self.protocol.name()),
            ));
        }
        if self.ssl_certificate_location.is_some() != self.ssl_key_location.is_some() {
            return Err((
                "ssl.key.location",
                "a client certificate needs both ssl.certificate.location and ssl.key.location"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The TLS settings of a connection, when the protocol uses TLS.
    ///
    /// # Errors
    /// A file that cannot be read or holds no usable certificate or key.
    pub fn tls_client_config(&self) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
        if !self.protocol.tls() {
            return Ok(None);
        }
        let mut roots = rustls::RootCertStore::empty();
        match &self.ssl_ca_location {
            Some(path) => {
                for cert in load_certificates(path)? {
                    roots
                        .add(cert)
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(
                        "no trusted certificate authority: the system has none and ssl.ca.location is not set"
                            .into(),
                    );
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = if self.ssl_endpoint_identification {
            builder.with_root_certificates(roots)
        } else {
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| e.to_string())?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyName(inner)))
        };
        let config = match (&self.ssl_certificate_location, &self.ssl_key_location) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(load_certificates(cert)?, load_private_key(key)?)
                .map_err(|e| format!("{}: {e}", cert.display()))?,
            _ => builder.with_no_client_auth(),
        };
        Ok(Some(Arc::new(config)))
    }
}

/// The server name TLS checks the certificate against, for `host:port`.
///
/// # Errors
/// A host that is neither a DNS name nor an IP address.
pub fn server_name(broker: &str) -> Result<ServerName<'static>, String> {
    let host = broker
        .rsplit_once(':')
        .map_or(broker, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|e| format!("{host:?}: {e}"))
}

/// The certificates in a PEM file.
///
/// # Errors
/// Unreadable, or no certificate in it.
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
///
/// # Errors
/// Unreadable, or no key in it.
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Certificate checks without the host name (`ssl.endpoint.identification.algorithm=none`):
/// the chain must still lead to a trusted authority and be valid now.
#[derive(Debug)]
struct AnyName(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
