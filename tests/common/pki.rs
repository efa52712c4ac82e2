//! Test certificates and users for TLS and SASL: a certificate authority, a broker
//! certificate for `localhost` and `127.0.0.1` (and an expired one), a client certificate, a second authority
//! nobody trusts, and a users file (alice, bob), as PEM and TOML files in a temporary folder.

use std::path::PathBuf;

use semel::broker::security::ListenerSecurity;
use semel::client::{SaslMechanism, SecurityConfig, SecurityProtocol};

/// A certificate authority, a broker certificate for `localhost` and `127.0.0.1` signed by
/// it, a client certificate, and a second authority nobody trusts; PEM files in a folder.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> anyhow::Result<Self> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir()?;
        let authority = |name: &str| -> anyhow::Result<(String, Issuer<'static, KeyPair>)> {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            let cert = params.self_signed(&key)?;
            Ok((cert.pem(), Issuer::new(params, key)))
        };
        let (ca_pem, ca) = authority("semel test CA")?;
        let (other_pem, _) = authority("an authority nobody trusts")?;
        let leaf = |names: Vec<String>, file: &str, expired: bool| -> anyhow::Result<()> {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(names)?;
            params.distinguished_name.push(DnType::CommonName, file);
            if expired {
                params.not_before = rcgen::date_time_ymd(2020, 1, 1);
                params.not_after = rcgen::date_time_ymd(2021, 1, 1);
            }
            let cert = params.signed_by(&key, &ca)?;
            std::fs::write(dir.path().join(format!("{file}.pem")), cert.pem())?;
            std::fs::write(dir.path().join(format!("{file}.key")), key.serialize_pem())?;
            Ok(())
        };
        let broker_names = || vec!["localhost".to_string(), "127.0.0.1".to_string()];
        leaf(broker_names(), "broker", false)?;
        // The same names, valid only in 2020: a broker serving it must be refused.
        leaf(broker_names(), "expired", true)?;
        leaf(vec!["client".into()], "client", false)?;
        std::fs::write(dir.path().join("ca.pem"), ca_pem)?;
        std::fs::write(dir.path().join("other-ca.pem"), other_pem)?;
        std::fs::write(
            dir.path().join("users.toml"),
            "[[users]]\nname = \"alice\"\npassword = \"alice-secret\"\n\n\
             [[users]]\nname = \"bob\"\npassword = \"bob-secret\"\n\n\
             # carol may use the orders topics and the billing group only\n\
             [[users]]\nname = \"carol\"\npassword = \"carol-secret\"\n\
             topics = [\"orders*\"]\ngroups = [\"billing\"]\n",
        )?;
        Ok(Self { dir })
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    pub fn listener(&self, protocol: SecurityProtocol) -> ListenerSecurity {
        ListenerSecurity {
            protocol,
            ssl_certificate_location: protocol.tls().then(|| self.path("broker.pem")),
            ssl_key_location: protocol.tls().then(|| self.path("broker.key")),
            sasl_users_file: protocol.sasl().then(|| self.path("users.toml")),
            ..ListenerSecurity::default()
        }
    }

    pub fn client(
        &self,
        protocol: SecurityProtocol,
        mechanism: SaslMechanism,
        user: &str,
        password: &str,
    ) -> SecurityConfig {
        SecurityConfig {
            protocol,
            sasl_mechanism: Some(mechanism),
            sasl_username: user.into(),
            sasl_password: password.into(),
            ssl_ca_location: Some(self.path("ca.pem")),
            ..SecurityConfig::default()
        }
    }

    /// semel-broker's flags for a listener of `protocol` with these files.
    pub fn broker_flags(&self, protocol: SecurityProtocol) -> Vec<String> {
        let mut flags = vec![
            "--security-protocol".to_string(),
            protocol.name().to_string(),
        ];
        if protocol.tls() {
            for (flag, file) in [
                ("--ssl-certificate-location", "broker.pem"),
                ("--ssl-key-location", "broker.key"),
            ] {
                flags.push(flag.into());
                flags.push(self.path(file).display().to_string());
            }
        }
        if protocol.sasl() {
            flags.push("--sasl-users-file".into());
            flags.push(self.path("users.toml").display().to_string());
        }
        flags
    }

    /// Java client properties for SASL_SSL with `mechanism` as alice with `password`,
    /// trusting the test authority (PEM trust store), written to a file.
    pub fn java_properties(&self, mechanism: &str, password: &str) -> anyhow::Result<PathBuf> {
        let path = self.path(&format!("java-{mechanism}-{password}.properties"));
        std::fs::write(
            &path,
            format!(
                "security.protocol=SASL_SSL\nsasl.mechanism={mechanism}\n\
                 sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule \
                 required username=\"alice\" password=\"{password}\";\n\
                 ssl.truststore.type=PEM\nssl.truststore.location={}\n",
                self.path("ca.pem").display()
            ),
        )?;
        Ok(path)
    }
}
