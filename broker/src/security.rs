//! The listener's security: TLS (rustls) and SASL authentication (PLAIN, SCRAM-SHA-256,
//! SCRAM-SHA-512) against a users file.
//!
//! A connection to a SASL listener may send only ApiVersions, SaslHandshake and
//! SaslAuthenticate until it has authenticated; any other request closes it unanswered, as
//! Kafka does, so no data reaches an unauthenticated peer. A failed authentication is
//! answered `SASL_AUTHENTICATION_FAILED` and the connection is closed. SaslHandshake v0 is
//! followed by raw SASL tokens (length-prefixed, no request header), v1 by SaslAuthenticate
//! requests; both are served, as some clients still use v0.
//!
//! The users file is TOML:
//!
//! ```toml
//! [[users]]
//! name = "alice"
//! password = "alice-secret"
//!
//! [[users]]
//! name = "carol"
//! password = "carol-secret"
//! topics = ["orders*"]    # optional: the topics she may use (name, prefix*, or *)
//! groups = ["billing"]    # optional: the groups she may use
//! ```
//!
//! A user's `topics` and `groups` limit what it may use ([`crate::acl`]).
//!
//! The broker keeps per user only SCRAM credentials (salted, 4096 PBKDF2 iterations) and a
//! salted digest for PLAIN, never the password; the file itself should be readable by the
//! broker's user only.
//!
//! References: KIP-43 (SaslHandshake), KIP-84 (SCRAM), KIP-152 (SaslAuthenticate), RFC 4616
//! (PLAIN), RFC 5802 (SCRAM); Kafka's `SaslServerAuthenticator` for the order of requests.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kafka_protocol::ResponseError;
use kafka_protocol::messages::{ApiKey, SaslAuthenticateResponse, SaslHandshakeResponse};
use kafka_protocol::protocol::StrBytes;
use semel_client::security::scram::{
    ClientFirst, MIN_ITERATIONS, ScramCredential, ScramMechanism, ScramServer,
};
use semel_client::{SaslMechanism, SecurityProtocol};

use crate::acl::Permissions;
use crate::config::ConfigError;

/// `ssl.client.auth`: whether the listener asks TLS clients for a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientAuth {
    /// `none`: no client certificate is asked for.
    #[default]
    None,
    /// `requested`: asked for; a client without one is still served.
    Requested,
    /// `required`: a client without a certificate signed by `ssl.ca.location` is refused.
    Required,
}

impl ClientAuth {
    /// The setting named `name` (`none`, `requested`, `required`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "none" => Some(Self::None),
            "requested" => Some(Self::Requested),
            "required" => Some(Self::Required),
            _ => None,
        }
    }
}

/// Settings of the listener's security (Kafka's names).
#[derive(Debug, Clone)]
pub struct ListenerSecurity {
    /// The listener's protocol (`listener.security.protocol.map` for Semel's one listener):
    /// `PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL`.
    pub protocol: SecurityProtocol,
    /// `ssl.certificate.location`: the broker's PEM certificate chain.
    pub ssl_certificate_location: Option<PathBuf>,
    /// `ssl.key.location`: its PEM private key.
    pub ssl_key_location: Option<PathBuf>,
    /// `ssl.ca.location`: PEM authorities that sign client certificates (`ssl.client.auth`).
    pub ssl_ca_location: Option<PathBuf>,
    /// `ssl.client.auth`.
    pub ssl_client_auth: ClientAuth,
    /// `sasl.enabled.mechanisms`.
    pub sasl_enabled_mechanisms: Vec<SaslMechanism>,
    /// `semel.sasl.users.file`: the users and passwords SASL accepts (TOML, see the module).
    pub sasl_users_file: Option<PathBuf>,
}

impl Default for ListenerSecurity {
    fn default() -> Self {
        Self {
            protocol: SecurityProtocol::Plaintext,
            ssl_certificate_location: None,
            ssl_key_location: None,
            ssl_ca_location: None,
            ssl_client_auth: ClientAuth::None,
            sasl_enabled_mechanisms: vec![
                SaslMechanism::Plain,
                SaslMechanism::Scram(ScramMechanism::Sha256),
                SaslMechanism::Scram(ScramMechanism::Sha512),
            ],
            sasl_users_file: None,
        }
    }
}

fn config_error(name: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        name,
        reason: reason.into(),
    }
}

impl ListenerSecurity {
    /// Checks that the settings can work together (files are read at start).
    ///
    /// # Errors
    /// The setting that cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let tls_only = [
            (
                "ssl.certificate.location",
                self.ssl_certificate_location.is_some(),
            ),
            ("ssl.key.location", self.ssl_key_location.is_some()),
            ("ssl.ca.location", self.ssl_ca_location.is_some()),
        ];
        if self.protocol.tls() {
            for (name, given) in &tls_only[..2] {
                if !given {
                    return Err(config_error(
                        name,
                        format!("{} needs it", self.protocol.name()),
                    ));
                }
            }
            if self.ssl_client_auth != ClientAuth::None && self.ssl_ca_location.is_none() {
                return Err(config_error(
                    "ssl.ca.location",
                    "ssl.client.auth needs the authorities that sign client certificates",
                ));
            }
        } else if let Some((name, _)) = tls_only.iter().find(|(_, given)| *given) {
            return Err(config_error(
                name,
                format!(
                    "set, but the listener's protocol {} has no TLS (use SSL or SASL_SSL)",
                    self.protocol.name()
                ),
            ));
        }
        if self.protocol.sasl() {
            if self.sasl_users_file.is_none() {
                return Err(config_error(
                    "semel.sasl.users.file",
                    format!("{} needs the users it accepts", self.protocol.name()),
                ));
            }
            if self.sasl_enabled_mechanisms.is_empty() {
                return Err(config_error(
                    "sasl.enabled.mechanisms",
                    "at least one mechanism is needed",
                ));
            }
        }
        Ok(())
    }
}

/// What one user may authenticate with, and use.
struct User {
    permissions: Arc<Permissions>,
    scram: Vec<ScramCredential>,
    /// Salt and `SHA-256(salt || password)` for PLAIN.
    plain: ([u8; 16], Vec<u8>),
}

/// The listener's security, ready to serve connections.
pub(crate) struct Security {
    pub(crate) protocol: SecurityProtocol,
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
    mechanisms: Vec<SaslMechanism>,
    users: HashMap<String, User>,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("protocol", &self.protocol)
            .field("tls", &self.tls.is_some())
            .field("mechanisms", &self.mechanisms)
            .field("users", &self.users.len())
            .finish()
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    #[serde(default)]
    users: Vec<UserEntry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    name: String,
    password: String,
    /// Topics it may use (names, prefixes ending in `*`, or `*`); absent: all.
    topics: Option<Vec<String>>,
    /// Groups it may use; absent: all.
    groups: Option<Vec<String>>,
}

fn random<const N: usize>() -> Result<[u8; N], String> {
    let mut bytes = [0u8; N];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| "no randomness available".to_string())?;
    Ok(bytes)
}

fn plain_digest(salt: &[u8], password: &[u8]) -> Vec<u8> {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(salt);
    context.update(password);
    context.finish().as_ref().to_vec()
}

fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Security {
    /// Reads the certificate, key and users files the settings name.
    ///
    /// # Errors
    /// A file that cannot be read or used, named with its setting.
    pub(crate) fn load(settings: &ListenerSecurity) -> Result<Self, ConfigError> {
        settings.validate()?;
        let tls = if settings.protocol.tls() {
            Some(tls_acceptor(settings)?)
        } else {
            None
        };
        let users = match (&settings.sasl_users_file, settings.protocol.sasl()) {
            (Some(path), true) => load_users(path)?,
            _ => HashMap::new(),
        };
        Ok(Self {
            protocol: settings.protocol,
            tls,
            mechanisms: settings.sasl_enabled_mechanisms.clone(),
            users,
        })
    }
}

fn tls_acceptor(settings: &ListenerSecurity) -> Result<tokio_rustls::TlsAcceptor, ConfigError> {
    use semel_client::security::{load_certificates, load_private_key};
    let (Some(cert), Some(key)) = (
        &settings.ssl_certificate_location,
        &settings.ssl_key_location,
    ) else {
        return Err(config_error("ssl.certificate.location", "not set"));
    };
    let chain = load_certificates(cert)
        .map_err(|reason| config_error("ssl.certificate.location", reason))?;
    let key = load_private_key(key).map_err(|reason| config_error("ssl.key.location", reason))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| config_error("ssl.enabled.protocols", e.to_string()))?;
    let builder = match (&settings.ssl_ca_location, settings.ssl_client_auth) {
        (Some(ca), auth) if auth != ClientAuth::None => {
            let mut roots = rustls::RootCertStore::empty();
            for root in load_certificates(ca).map_err(|r| config_error("ssl.ca.location", r))? {
                roots
                    .add(root)
                    .map_err(|e| config_error("ssl.ca.location", e.to_string()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            );
            let verifier = if auth == ClientAuth::Requested {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| config_error("ssl.ca.location", e.to_string()))?,
            )
        }
        _ => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| config_error("ssl.key.location", e.to_string()))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

fn load_users(path: &Path) -> Result<HashMap<String, User>, ConfigError> {
    let name = "semel.sasl.users.file";
    let text = std::fs::read_to_string(path)
        .map_err(|e| config_error(name, format!("{}: {e}", path.display())))?;
    let file: UsersFile = toml::from_str(&text)
        .map_err(|e| config_error(name, format!("{}: {e}", path.display())))?;
    let mut users = HashMap::new();
    for entry in file.users {
        if entry.name.is_empty() {
            return Err(config_error(name, "a user with an empty name"));
        }
        let scram = [ScramMechanism::Sha256, ScramMechanism::Sha512]
            .into_iter()
            .map(|m| {
                let salt = random::<16>().map_err(|r| config_error(name, r))?;
                Ok(ScramCredential::new(
                    m,
                    &entry.password,
                    salt.to_vec(),
                    MIN_ITERATIONS,
                ))
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let salt = random::<16>().map_err(|r| config_error(name, r))?;
        let plain = (salt, plain_digest(&salt, entry.password.as_bytes()));
        let permissions = Arc::new(Permissions {
            user: entry.name.clone(),
            topics: entry.topics,
            groups: entry.groups,
        });
        if users
            .insert(
                entry.name.clone(),
                User {
                    permissions,
                    scram,
                    plain,
                },
            )
            .is_some()
        {
            return Err(config_error(
                name,
                format!("user {:?} is listed twice", entry.name),
            ));
        }
    }
    Ok(users)
}

/// Where a connection is in authentication.
#[derive(Debug)]
enum State {
    /// Requests are served: no SASL on this listener, or authenticated (as this user).
    Open(Option<Arc<Permissions>>),
    /// SASL is required; SaslHandshake comes next.
    Handshake,
    /// The mechanism is agreed; tokens come next, raw (after handshake v0) or in
    /// SaslAuthenticate requests (v1).
    Tokens {
        mechanism: SaslMechanism,
        raw: bool,
        scram: Option<ScramServer>,
    },
    /// Authentication failed: the connection is closing.
    Failed,
}

/// One connection's authentication: which requests it may send now, and each SASL step.
/// Free of I/O; the connection feeds it requests and tokens.
#[derive(Debug)]
pub(crate) struct Authenticator {
    security: Arc<Security>,
    state: State,
}

/// The outcome of one SASL token.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Send this token back; more follow.
    Continue(Vec<u8>),
    /// Authenticated as this user; send this last token back.
    Done(String, Vec<u8>),
    /// Refused: answer `SASL_AUTHENTICATION_FAILED` with this message and close.
    Failed(String),
    /// A token when none was expected: `ILLEGAL_SASL_STATE`, then close.
    Illegal(String),
}

impl Authenticator {
    pub(crate) fn new(security: Arc<Security>) -> Self {
        let state = if security.protocol.sasl() {
            State::Handshake
        } else {
            State::Open(None)
        };
        Self { security, state }
    }

    /// Whether a request of `api` may be served now (SASL requests are answered by
    /// [`Authenticator::handshake`] and [`Authenticator::authenticate`]).
    pub(crate) fn permits(&self, api: ApiKey) -> bool {
        matches!(self.state, State::Open(_)) || api == ApiKey::ApiVersions
    }

    /// Whether the next frame is a raw SASL token (after SaslHandshake v0).
    pub(crate) fn expects_raw_token(&self) -> bool {
        matches!(self.state, State::Tokens { raw: true, .. })
    }

    /// The authenticated user, if any.
    #[cfg(test)]
    pub(crate) fn principal(&self) -> Option<&str> {
        match &self.state {
            State::Open(user) => user.as_deref().map(|p| p.user.as_str()),
            _ => None,
        }
    }

    /// What the authenticated user may use (`None`: no SASL, or not yet authenticated).
    pub(crate) fn permissions(&self) -> Option<&Arc<Permissions>> {
        match &self.state {
            State::Open(user) => user.as_ref(),
            _ => None,
        }
    }

    fn user(&self, name: &str) -> Option<Arc<Permissions>> {
        self.security
            .users
            .get(name)
            .map(|u| Arc::clone(&u.permissions))
    }

    /// Answers SaslHandshake `version` for `mechanism`; `false` with it when the connection
    /// must close after the answer.
    pub(crate) fn handshake(
        &mut self,
        mechanism: &str,
        version: i16,
    ) -> (SaslHandshakeResponse, bool) {
        let enabled: Vec<StrBytes> = self
            .security
            .mechanisms
            .iter()
            .map(|m| StrBytes::from_static_str(m.name()))
            .collect();
        let answer = |error: Option<ResponseError>| {
            SaslHandshakeResponse::default()
                .with_error_code(error.map_or(0, |e| e.code()))
                .with_mechanisms(enabled.clone())
        };
        if !matches!(self.state, State::Handshake) {
            // Kafka answers ILLEGAL_SASL_STATE on a listener without SASL or after
            // authentication; a second handshake mid-exchange closes the connection.
            let keep = matches!(self.state, State::Open(_));
            if !keep {
                self.state = State::Failed;
            }
            return (answer(Some(ResponseError::IllegalSaslState)), keep);
        }
        match SaslMechanism::from_name(mechanism).filter(|m| self.security.mechanisms.contains(m)) {
            Some(mechanism) => {
                self.state = State::Tokens {
                    mechanism,
                    raw: version == 0,
                    scram: None,
                };
                (answer(None), true)
            }
            None => {
                // The client may try another mechanism (Kafka keeps the connection).
                (answer(Some(ResponseError::UnsupportedSaslMechanism)), true)
            }
        }
    }

    /// One SASL token, raw or from SaslAuthenticate (`raw` says which arrived).
    pub(crate) fn step(&mut self, token: &[u8], raw: bool) -> Step {
        let state = std::mem::replace(&mut self.state, State::Failed);
        let State::Tokens {
            mechanism,
            raw: expected_raw,
            scram,
        } = state
        else {
            let reason = match state {
                State::Open(_) => {
                    "SaslAuthenticate on a connection that needs no authentication now"
                }
                _ => "SaslAuthenticate before SaslHandshake",
            };
            if let State::Open(user) = state {
                self.state = State::Open(user);
            }
            return Step::Illegal(reason.into());
        };
        if raw != expected_raw {
            return Step::Illegal("SASL token framed unlike the handshake version asked".into());
        }
        let failed = |detail: &str| {
            tracing::info!(
                mechanism = mechanism.name(),
                detail,
                "SASL authentication failed"
            );
            Step::Failed(format!(
                "Authentication failed during authentication due to invalid credentials with SASL mechanism {}",
                mechanism.name()
            ))
        };
        match (mechanism, scram) {
            (SaslMechanism::Plain, _) => match self.plain(token) {
                Ok(user) => {
                    self.state = State::Open(self.user(&user));
                    Step::Done(user, Vec::new())
                }
                Err(detail) => failed(&detail),
            },
            (SaslMechanism::Scram(m), None) => {
                let first = match ClientFirst::parse(token) {
                    Ok(first) => first,
                    Err(e) => return failed(&e.to_string()),
                };
                let credential = self
                    .security
                    .users
                    .get(&first.username)
                    .and_then(|u| u.scram.iter().find(|c| c.mechanism == m).cloned());
                match ScramServer::start(m, first, credential) {
                    Ok((server, reply)) => {
                        self.state = State::Tokens {
                            mechanism,
                            raw,
                            scram: Some(server),
                        };
                        Step::Continue(reply)
                    }
                    Err(e) => failed(&e.to_string()),
                }
            }
            (SaslMechanism::Scram(_), Some(server)) => match server.finish(token) {
                Ok(reply) => {
                    let user = server.username().to_string();
                    self.state = State::Open(self.user(&user));
                    Step::Done(user, reply)
                }
                Err(e) => failed(&format!("user {:?}: {e}", server.username())),
            },
        }
    }

    /// Checks a PLAIN token (`authzid NUL user NUL password`).
    fn plain(&self, token: &[u8]) -> Result<String, String> {
        let mut parts = token.split(|b| *b == 0);
        let (Some(authzid), Some(user), Some(password), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("malformed PLAIN token".into());
        };
        let user = std::str::from_utf8(user).map_err(|_| "user name is not UTF-8".to_string())?;
        if !authzid.is_empty() && authzid != user.as_bytes() {
            return Err("authorization id differs from the user".into());
        }
        let known = self.security.users.get(user);
        // An unknown user costs the same digest as a known one.
        let (salt, expected) = known.map_or(([0u8; 16], &[][..]), |u| (u.plain.0, &u.plain.1[..]));
        let digest = plain_digest(&salt, password);
        if known.is_some() && same(&digest, expected) {
            Ok(user.to_string())
        } else {
            Err(format!("user {user:?}: wrong password or unknown user"))
        }
    }
}

/// The SaslAuthenticate answer for `step` (and whether the connection stays open).
pub(crate) fn authenticate_response(step: &Step) -> (SaslAuthenticateResponse, bool) {
    let response = SaslAuthenticateResponse::default();
    match step {
        Step::Continue(token) | Step::Done(_, token) => (
            response.with_auth_bytes(bytes::Bytes::copy_from_slice(token)),
            true,
        ),
        Step::Failed(message) => (
            response
                .with_error_code(ResponseError::SaslAuthenticationFailed.code())
                .with_error_message(Some(StrBytes::from_string(message.clone()))),
            false,
        ),
        Step::Illegal(message) => (
            response
                .with_error_code(ResponseError::IllegalSaslState.code())
                .with_error_message(Some(StrBytes::from_string(message.clone()))),
            false,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use semel_client::security::scram::ScramClient;

    fn security(mechanisms: Vec<SaslMechanism>) -> Arc<Security> {
        let salt = [7u8; 16];
        let user = User {
            permissions: Arc::new(Permissions {
                user: "alice".into(),
                topics: None,
                groups: None,
            }),
            scram: vec![
                ScramCredential::new(ScramMechanism::Sha256, "pw", b"s1".to_vec(), 4096),
                ScramCredential::new(ScramMechanism::Sha512, "pw", b"s2".to_vec(), 4096),
            ],
            plain: (salt, plain_digest(&salt, b"pw")),
        };
        Arc::new(Security {
            protocol: SecurityProtocol::SaslPlaintext,
            tls: None,
            mechanisms,
            users: HashMap::from([("alice".to_string(), user)]),
        })
    }

    fn all() -> Vec<SaslMechanism> {
        ListenerSecurity::default().sasl_enabled_mechanisms
    }

    #[test]
    fn only_api_versions_and_sasl_before_authentication() {
        let mut auth = Authenticator::new(security(all()));
        assert!(auth.permits(ApiKey::ApiVersions));
        assert!(!auth.permits(ApiKey::Metadata));
        assert!(!auth.permits(ApiKey::Fetch));
        let (answer, keep) = auth.handshake("PLAIN", 1);
        assert_eq!((answer.error_code, keep), (0, true));
        assert!(!auth.permits(ApiKey::Produce));
        let step = auth.step(b"\0alice\0pw", false);
        assert_eq!(step, Step::Done("alice".into(), Vec::new()));
        assert!(auth.permits(ApiKey::Produce));
        assert_eq!(auth.principal(), Some("alice"));
        // A second handshake after authentication: ILLEGAL_SASL_STATE, connection kept.
        let (answer, keep) = auth.handshake("PLAIN", 1);
        assert_eq!(
            (answer.error_code, keep),
            (ResponseError::IllegalSaslState.code(), true)
        );
    }

    #[test]
    fn wrong_password_unknown_user_and_malformed_plain_fail() {
        for token in [
            &b"\0alice\0wrong"[..],
            b"\0bob\0pw",
            b"alice\0pw",
            b"\0alice\0pw\0x",
            b"other\0alice\0pw",
        ] {
            let mut auth = Authenticator::new(security(all()));
            auth.handshake("PLAIN", 1);
            assert!(
                matches!(auth.step(token, false), Step::Failed(_)),
                "{token:?}"
            );
            assert!(!auth.permits(ApiKey::Metadata));
        }
    }

    #[test]
    fn scram_exchange_with_the_client_side_and_a_wrong_password() {
        for (password, ok) in [("pw", true), ("nope", false)] {
            let mut auth = Authenticator::new(security(all()));
            auth.handshake("SCRAM-SHA-512", 0);
            assert!(auth.expects_raw_token());
            let mut client = ScramClient::new(ScramMechanism::Sha512, "alice", password)
                .unwrap_or_else(|e| panic!("{e}"));
            let Step::Continue(server_first) = auth.step(&client.client_first(), true) else {
                panic!("no server-first message");
            };
            let client_final = client
                .client_final(&server_first)
                .unwrap_or_else(|e| panic!("{e}"));
            match auth.step(&client_final, true) {
                Step::Done(user, server_final) if ok => {
                    assert_eq!(user, "alice");
                    assert_eq!(client.verify_server_final(&server_final), Ok(()));
                }
                Step::Failed(_) if !ok => assert!(!auth.permits(ApiKey::Produce)),
                other => panic!("{password}: {other:?}"),
            }
        }
    }

    #[test]
    fn disabled_mechanism_and_out_of_order_tokens_are_refused() {
        let mut auth = Authenticator::new(security(vec![SaslMechanism::Plain]));
        assert!(matches!(auth.step(b"\0alice\0pw", false), Step::Illegal(_)));
        let mut auth = Authenticator::new(security(vec![SaslMechanism::Plain]));
        let (answer, keep) = auth.handshake("SCRAM-SHA-256", 1);
        assert_eq!(
            (answer.error_code, keep),
            (ResponseError::UnsupportedSaslMechanism.code(), true)
        );
        assert_eq!(answer.mechanisms.len(), 1);
        // Handshake v1 then a raw token: refused.
        auth.handshake("PLAIN", 1);
        assert!(matches!(auth.step(b"\0alice\0pw", true), Step::Illegal(_)));
    }

    #[test]
    fn settings_that_cannot_work_are_named() {
        let tls_without_cert = ListenerSecurity {
            protocol: SecurityProtocol::SaslSsl,
            sasl_users_file: Some("users.toml".into()),
            ..ListenerSecurity::default()
        };
        assert_eq!(
            tls_without_cert.validate().map_err(|e| e.name),
            Err("ssl.certificate.location")
        );
        let sasl_without_users = ListenerSecurity {
            protocol: SecurityProtocol::SaslPlaintext,
            ..ListenerSecurity::default()
        };
        assert_eq!(
            sasl_without_users.validate().map_err(|e| e.name),
            Err("semel.sasl.users.file")
        );
        let cert_without_tls = ListenerSecurity {
            ssl_certificate_location: Some("c.pem".into()),
            ..ListenerSecurity::default()
        };
        assert_eq!(
            cert_without_tls.validate().map_err(|e| e.name),
            Err("ssl.certificate.location")
        );
    }
}
