//! SCRAM-SHA-256 and SCRAM-SHA-512, both sides of the exchange, as Kafka uses them.
//!
//! The client sends `n,,n=<user>,r=<client nonce>`; the server answers with its nonce appended,
//! the salt and the iteration count; the client proves it knows the password without sending
//! it (`p=`), and the server proves it knows the stored key (`v=`). Each side checks the other:
//! a server that does not extend the client's nonce, asks for fewer than 4096 iterations
//! (Kafka's minimum) or cannot prove the key is refused by the client, and a client whose proof
//! does not match is refused by the server.
//!
//! The server keeps only [`ScramCredential`]: salt, iterations, `StoredKey = H(ClientKey)` and
//! `ServerKey`, never the password.
//!
//! References: RFC 5802 (SCRAM), RFC 7677 (SCRAM-SHA-256), KIP-84 (SCRAM in Kafka).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::{digest, hmac, pbkdf2};

/// Kafka's (and RFC 7677's) smallest accepted iteration count.
pub const MIN_ITERATIONS: u32 = 4096;

/// Largest iteration count a client accepts from a server (a hostile server could otherwise
/// make it spin for minutes); Kafka's own maximum.
pub const MAX_ITERATIONS: u32 = 16384;

/// The two SCRAM mechanisms Kafka supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScramMechanism {
    /// `SCRAM-SHA-256`.
    Sha256,
    /// `SCRAM-SHA-512`.
    Sha512,
}

impl ScramMechanism {
    /// Its SASL name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sha256 => "SCRAM-SHA-256",
            Self::Sha512 => "SCRAM-SHA-512",
        }
    }

    /// The mechanism named `name` (SASL names are upper case).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "SCRAM-SHA-256" => Some(Self::Sha256),
            "SCRAM-SHA-512" => Some(Self::Sha512),
            _ => None,
        }
    }

    fn hmac_algorithm(self) -> hmac::Algorithm {
        match self {
            Self::Sha256 => hmac::HMAC_SHA256,
            Self::Sha512 => hmac::HMAC_SHA512,
        }
    }

    fn pbkdf2_algorithm(self) -> pbkdf2::Algorithm {
        match self {
            Self::Sha256 => pbkdf2::PBKDF2_HMAC_SHA256,
            Self::Sha512 => pbkdf2::PBKDF2_HMAC_SHA512,
        }
    }

    fn digest_algorithm(self) -> &'static digest::Algorithm {
        match self {
            Self::Sha256 => &digest::SHA256,
            Self::Sha512 => &digest::SHA512,
        }
    }

    fn output_len(self) -> usize {
        self.digest_algorithm().output_len()
    }

    /// `Hi(password, salt, i)`: PBKDF2 with this mechanism's HMAC.
    fn salted_password(self, password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
        let mut out = vec![0u8; self.output_len()];
        let rounds =
            std::num::NonZeroU32::new(iterations.max(1)).unwrap_or(std::num::NonZeroU32::MIN);
        pbkdf2::derive(self.pbkdf2_algorithm(), rounds, salt, password, &mut out);
        out
    }

    fn hmac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        let key = hmac::Key::new(self.hmac_algorithm(), key);
        hmac::sign(&key, data).as_ref().to_vec()
    }

    fn hash(self, data: &[u8]) -> Vec<u8> {
        digest::digest(self.digest_algorithm(), data)
            .as_ref()
            .to_vec()
    }
}

/// What a server stores for one user and mechanism.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramCredential {
    /// The mechanism these keys are for.
    pub mechanism: ScramMechanism,
    /// The salt.
    pub salt: Vec<u8>,
    /// PBKDF2 iterations (at least [`MIN_ITERATIONS`]).
    pub iterations: u32,
    /// `H(HMAC(SaltedPassword, "Client Key"))`.
    pub stored_key: Vec<u8>,
    /// `HMAC(SaltedPassword, "Server Key")`.
    pub server_key: Vec<u8>,
}

impl std::fmt::Debug for ScramCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramCredential")
            .field("mechanism", &self.mechanism)
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

impl ScramCredential {
    /// The credential of `password` under `salt`.
    pub fn new(mechanism: ScramMechanism, password: &str, salt: Vec<u8>, iterations: u32) -> Self {
        let salted = mechanism.salted_password(password.as_bytes(), &salt, iterations);
        let client_key = mechanism.hmac(&salted, b"Client Key");
        Self {
            mechanism,
            stored_key: mechanism.hash(&client_key),
            server_key: mechanism.hmac(&salted, b"Server Key"),
            salt,
            iterations,
        }
    }
}

/// A SCRAM message that breaks the exchange.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("SCRAM: {0}")]
pub struct ScramError(pub String);

fn fail<T>(reason: impl Into<String>) -> Result<T, ScramError> {
    Err(ScramError(reason.into()))
}

/// The attributes of a SCRAM message (`k=value,...`), in order.
fn attributes(message: &str) -> Result<Vec<(char, &str)>, ScramError> {
    message
        .split(',')
        .map(|part| {
            let mut chars = part.chars();
            match (chars.next(), chars.next()) {
                (Some(k), Some('=')) if k.is_ascii_alphabetic() => Ok((k, &part[2..])),
                _ => fail(format!("malformed attribute {part:?}")),
            }
        })
        .collect()
}

fn attribute<'a>(attrs: &[(char, &'a str)], key: char) -> Result<&'a str, ScramError> {
    attrs
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| *v)
        .ok_or_else(|| ScramError(format!("missing attribute {key}=")))
}

/// `saslname` escaping: `=` and `,` cannot appear raw in a user name.
fn escape(name: &str) -> String {
    name.replace('=', "=3D").replace(',', "=2C")
}

fn unescape(name: &str) -> Result<String, ScramError> {
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(at) = rest.find('=') {
        out.push_str(&rest[..at]);
        match rest.get(at..at + 3) {
            Some("=3D") => out.push('='),
            Some("=2C") => out.push(','),
            _ => return fail(format!("bad escape in user name {name:?}")),
        }
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A fresh nonce: 32 random letters and digits (printable, and free of the `+`, `/` and `=`
/// of base64, which some clients' SCRAM parsers mishandle; Kafka's nonces are alphanumeric
/// too).
///
/// # Errors
/// The system's random source failed.
pub fn nonce() -> Result<String, ScramError> {
    const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| ScramError("no randomness available".into()))?;
    Ok(bytes
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
        .collect())
}

/// Equal, in time that depends only on the lengths.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn xor(a: &[u8], b: &[u8]) -> Vec<u8> {
    a.iter().zip(b).map(|(x, y)| x ^ y).collect()
}

/// The client's side of one exchange.
#[derive(Debug)]
pub struct ScramClient {
    mechanism: ScramMechanism,
    password: String,
    client_nonce: String,
    client_first_bare: String,
    /// `ServerSignature`, known once the client-final message is built.
    server_signature: Option<Vec<u8>>,
}

impl ScramClient {
    /// Starts an exchange for `username`, with a fresh nonce.
    ///
    /// # Errors
    /// No randomness available.
    pub fn new(
        mechanism: ScramMechanism,
        username: &str,
        password: &str,
    ) -> Result<Self, ScramError> {
        Ok(Self::with_nonce(mechanism, username, password, nonce()?))
    }

    /// As [`ScramClient::new`] with a given nonce (tests use RFC vectors).
    pub fn with_nonce(
        mechanism: ScramMechanism,
        username: &str,
        password: &str,
        client_nonce: String,
    ) -> Self {
        let client_first_bare = format!("n={},r={client_nonce}", escape(username));
        Self {
            mechanism,
            password: password.to_string(),
            client_nonce,
            client_first_bare,
            server_signature: None,
        }
    }

    /// The client-first message.
    pub fn client_first(&self) -> Vec<u8> {
        format!("n,,{}", self.client_first_bare).into_bytes()
    }

    /// The client-final message answering `server_first`.
    ///
    /// # Errors
    /// A server message that is malformed, does not extend our nonce, or asks for an iteration
    /// count outside `MIN_ITERATIONS..=MAX_ITERATIONS`.
    pub fn client_final(&mut self, server_first: &[u8]) -> Result<Vec<u8>, ScramError> {
        let server_first = std::str::from_utf8(server_first)
            .map_err(|_| ScramError("server-first message is not UTF-8".into()))?;
        let attrs = attributes(server_first)?;
        if let Ok(error) = attribute(&attrs, 'e') {
            return fail(format!("server refused: {error}"));
        }
        let nonce = attribute(&attrs, 'r')?;
        if !nonce.starts_with(&self.client_nonce) || nonce.len() == self.client_nonce.len() {
            return fail("server nonce does not extend the client nonce");
        }
        let salt = BASE64
            .decode(attribute(&attrs, 's')?)
            .map_err(|_| ScramError("salt is not base64".into()))?;
        let iterations: u32 = attribute(&attrs, 'i')?
            .parse()
            .map_err(|_| ScramError("iteration count is not a number".into()))?;
        if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&iterations) {
            return fail(format!(
                "iteration count {iterations} outside {MIN_ITERATIONS}..={MAX_ITERATIONS}"
            ));
        }
        let m = self.mechanism;
        let salted = m.salted_password(self.password.as_bytes(), &salt, iterations);
        let client_key = m.hmac(&salted, b"Client Key");
        let stored_key = m.hash(&client_key);
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let client_signature = m.hmac(&stored_key, auth_message.as_bytes());
        let proof = xor(&client_key, &client_signature);
        let server_key = m.hmac(&salted, b"Server Key");
        self.server_signature = Some(m.hmac(&server_key, auth_message.as_bytes()));
        Ok(format!("{without_proof},p={}", BASE64.encode(proof)).into_bytes())
    }

    /// Checks the server-final message.
    ///
    /// # Errors
    /// The server reported an error, or did not prove it knows the credential.
    pub fn verify_server_final(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let text = std::str::from_utf8(server_final)
            .map_err(|_| ScramError("server-final message is not UTF-8".into()))?;
        let attrs = attributes(text)?;
        if let Ok(error) = attribute(&attrs, 'e') {
            return fail(format!("server refused: {error}"));
        }
        let signature = BASE64
            .decode(attribute(&attrs, 'v')?)
            .map_err(|_| ScramError("server signature is not base64".into()))?;
        match &self.server_signature {
            Some(expected) if same(expected, &signature) => Ok(()),
            Some(_) => fail("the server's signature does not match: it does not know the password"),
            None => fail("server-final before client-final"),
        }
    }
}

/// The server's side of one exchange, after the client-first message.
#[derive(Debug)]
pub struct ScramServer {
    credential: Option<ScramCredential>,
    username: String,
    nonce: String,
    client_first_bare: String,
    server_first: String,
    gs2_header: String,
}

/// The user name a client-first message names, and the rest of it for [`ScramServer::start`].
#[derive(Debug)]
pub struct ClientFirst {
    /// The (unescaped) user name.
    pub username: String,
    gs2_header: String,
    bare: String,
    client_nonce: String,
}

impl ClientFirst {
    /// Parses a client-first message.
    ///
    /// # Errors
    /// Malformed, or asking for channel binding (Kafka supports none) or an authorization id
    /// other than the user itself.
    pub fn parse(message: &[u8]) -> Result<Self, ScramError> {
        let text = std::str::from_utf8(message)
            .map_err(|_| ScramError("client-first message is not UTF-8".into()))?;
        let mut parts = text.splitn(3, ',');
        let (Some(binding), Some(authzid), Some(bare)) = (parts.next(), parts.next(), parts.next())
        else {
            return fail("client-first message has no GS2 header");
        };
        if binding != "n" && binding != "y" {
            return fail("channel binding is not supported");
        }
        let attrs = attributes(bare)?;
        if attrs.iter().any(|(k, _)| *k == 'm') {
            return fail("mandatory extensions are not supported");
        }
        let username = unescape(attribute(&attrs, 'n')?)?;
        if let Some(id) = authzid.strip_prefix("a=") {
            if unescape(id)? != username {
                return fail("authorization id differs from the user name");
            }
        } else if !authzid.is_empty() {
            return fail("malformed GS2 header");
        }
        let client_nonce = attribute(&attrs, 'r')?.to_string();
        if client_nonce.is_empty() {
            return fail("empty client nonce");
        }
        Ok(Self {
            username,
            gs2_header: format!("{binding},{authzid},"),
            bare: bare.to_string(),
            client_nonce,
        })
    }
}

impl ScramServer {
    /// Answers `first` with `credential` (the user's, or `None` for an unknown user: the
    /// exchange then goes on with a made-up salt and fails at the proof, so an unknown user
    /// looks like a wrong password).
    ///
    /// # Errors
    /// No randomness available.
    pub fn start(
        mechanism: ScramMechanism,
        first: ClientFirst,
        credential: Option<ScramCredential>,
    ) -> Result<(Self, Vec<u8>), ScramError> {
        let nonce = format!("{}{}", first.client_nonce, self::nonce()?);
        let (salt, iterations) = match &credential {
            Some(c) => (c.salt.clone(), c.iterations),
            None => (
                mechanism.hash(first.username.as_bytes())[..16].to_vec(),
                MIN_ITERATIONS,
            ),
        };
        let server_first = format!("r={nonce},s={},i={iterations}", BASE64.encode(salt));
        let reply = server_first.clone().into_bytes();
        Ok((
            Self {
                credential: credential.filter(|c| c.mechanism == mechanism),
                username: first.username,
                nonce,
                client_first_bare: first.bare,
                server_first,
                gs2_header: first.gs2_header,
            },
            reply,
        ))
    }

    /// The user this exchange is for.
    pub fn username(&self) -> &str {
        &self.username
    }

    /// Checks the client-final message; on success, the server-final message to send.
    ///
    /// # Errors
    /// Malformed, a changed nonce or GS2 header, or a proof that does not match (wrong
    /// password or unknown user).
    pub fn finish(&self, client_final: &[u8]) -> Result<Vec<u8>, ScramError> {
        let text = std::str::from_utf8(client_final)
            .map_err(|_| ScramError("client-final message is not UTF-8".into()))?;
        let Some((without_proof, proof)) = text.rsplit_once(",p=") else {
            return fail("client-final message has no proof");
        };
        let attrs = attributes(without_proof)?;
        // The nonce must end with the whole server nonce (client part + server part), so a
        // replayed exchange fails. RFC 5802 asks for it exactly; librdkafka before 2.6.1
        // (Debian 12 ships 2.0.2, behind kcat) sends its client nonce once more in front.
        // Kafka 3.8.1-3.9 accepted that (`endsWith`), Kafka 4 refuses it; semel-broker accepts
        // it, because those clients are common and the fresh server nonce is still required.
        if !attribute(&attrs, 'r')?.ends_with(&self.nonce) {
            return fail("nonce changed");
        }
        let binding = BASE64
            .decode(attribute(&attrs, 'c')?)
            .map_err(|_| ScramError("channel binding is not base64".into()))?;
        if binding != self.gs2_header.as_bytes() {
            return fail("channel binding does not repeat the GS2 header");
        }
        let proof = BASE64
            .decode(proof)
            .map_err(|_| ScramError("proof is not base64".into()))?;
        let Some(credential) = &self.credential else {
            return fail("authentication failed");
        };
        let m = credential.mechanism;
        let auth_message = format!(
            "{},{},{without_proof}",
            self.client_first_bare, self.server_first
        );
        let client_signature = m.hmac(&credential.stored_key, auth_message.as_bytes());
        if proof.len() != client_signature.len() {
            return fail("authentication failed");
        }
        let client_key = xor(&proof, &client_signature);
        if !same(&m.hash(&client_key), &credential.stored_key) {
            return fail("authentication failed");
        }
        let signature = m.hmac(&credential.server_key, auth_message.as_bytes());
        Ok(format!("v={}", BASE64.encode(signature)).into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677 §3's example exchange, byte for byte.
    #[test]
    fn rfc_7677_vector() -> Result<(), ScramError> {
        let mut client = ScramClient::with_nonce(
            ScramMechanism::Sha256,
            "user",
            "pencil",
            "rOprNGfwEbeRWgbNEkqO".into(),
        );
        assert_eq!(client.client_first(), b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let server_first = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let client_final = client.client_final(server_first)?;
        assert_eq!(
            std::str::from_utf8(&client_final).unwrap_or_default(),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        client.verify_server_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")?;
        assert!(client.verify_server_final(b"v=AAAA").is_err());
        Ok(())
    }

    fn exchange(password: &str, stored: &str, user: &str) -> Result<(), ScramError> {
        let m = ScramMechanism::Sha512;
        let credential = ScramCredential::new(m, stored, b"salt-of-alice".to_vec(), 4096);
        let mut client = ScramClient::new(m, user, password)?;
        let first = ClientFirst::parse(&client.client_first())?;
        let known = (first.username == "al,i=ce").then_some(credential);
        let (server, server_first) = ScramServer::start(m, first, known)?;
        let client_final = client.client_final(&server_first)?;
        let server_final = server.finish(&client_final)?;
        client.verify_server_final(&server_final)
    }

    #[test]
    fn both_sides_agree_and_refuse_a_wrong_password_or_unknown_user() {
        assert_eq!(exchange("secret", "secret", "al,i=ce"), Ok(()));
        assert!(exchange("guess", "secret", "al,i=ce").is_err());
        assert!(exchange("secret", "secret", "bob").is_err());
    }

    #[test]
    fn a_server_that_does_not_extend_the_nonce_or_asks_too_few_iterations_is_refused()
    -> Result<(), ScramError> {
        let mut client = ScramClient::with_nonce(ScramMechanism::Sha256, "u", "p", "abc".into());
        assert!(client.client_final(b"r=xyz1,s=AAAA,i=4096").is_err());
        assert!(client.client_final(b"r=abc1,s=AAAA,i=1").is_err());
        assert!(client.client_final(b"r=abc1,s=AAAA,i=99999999").is_err());
        assert!(client.client_final(b"e=unknown-user").is_err());
        assert!(client.client_final(b"r=abc1,s=AAAA,i=4096").is_ok());
        Ok(())
    }

    /// librdkafka before 2.6.1 puts its client nonce once more in front of the combined nonce
    /// in its client-final message; a nonce that ends with the server's is accepted (as Kafka
    /// 3.8.1-3.9 did), any other is refused.
    #[test]
    fn a_client_final_nonce_must_end_with_the_servers_as_kafka_checks() -> Result<(), ScramError> {
        let m = ScramMechanism::Sha256;
        let credential = ScramCredential::new(m, "pw", b"salt".to_vec(), 4096);
        let mut client = ScramClient::with_nonce(m, "u", "pw", "cnonce".into());
        let first = ClientFirst::parse(&client.client_first())?;
        let (server, server_first) = ScramServer::start(m, first, Some(credential))?;
        let ours = String::from_utf8_lossy(&client.client_final(&server_first)?).into_owned();
        let doubled = ours.replace("r=cnonce", "r=cnoncecnonce");
        assert!(
            server.finish(doubled.as_bytes()).is_err(),
            "proof over another message"
        );
        let server_nonce = &server.nonce;
        let foreign = ours.replace(server_nonce.as_str(), "cnonceXYZ");
        assert_eq!(
            server.finish(foreign.as_bytes()),
            Err(ScramError("nonce changed".into()))
        );
        assert!(server.finish(ours.as_bytes()).is_ok());
        Ok(())
    }

    #[test]
    fn malformed_client_messages_are_errors_not_panics() {
        for message in [
            &b""[..],
            b"n",
            b"n,,",
            b"p=tls-unique,,n=u,r=x",
            b"n,,n=u",
            b"n,,n=u=1,r=x",
            b"n,a=other,n=u,r=x",
            b"n,,m=ext,n=u,r=x",
            b"\xff\xfe",
        ] {
            assert!(ClientFirst::parse(message).is_err(), "{message:?}");
        }
    }
}
