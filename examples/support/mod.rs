//! What the examples share (each includes this file with `#[path = "support/mod.rs"]`): a
//! broker to run against (an embedded semel-broker unless `--bootstrap` names one), topic
//! administration, and (from the tests' helpers) a deterministic source of delays.
#![allow(dead_code)]

/// The integration tests' helpers (child brokers, the fault proxy, `Lcg`).
#[path = "../../tests/common/mod.rs"]
pub(crate) mod common;
#[allow(unused_imports)]
pub(crate) use common::child::Lcg;

use anyhow::{Context, ensure};
use semel::broker::{BrokerConfig, BrokerHandle};
use semel::client::admin::NewTopic;
use semel::client::{Admin, ClientConfig, Cluster};

/// The broker an example runs against.
pub(crate) struct ExampleBroker {
    /// `host:port` to bootstrap from.
    pub(crate) bootstrap: String,
    embedded: Option<BrokerHandle>,
    _data: Option<tempfile::TempDir>,
}

impl ExampleBroker {
    /// `bootstrap`'s broker when given; otherwise a semel-broker in this process on
    /// 127.0.0.1 (a free port), its data in a temporary directory, configured by `adjust`.
    pub(crate) async fn start(
        bootstrap: Option<&str>,
        adjust: impl FnOnce(&mut BrokerConfig),
    ) -> anyhow::Result<Self> {
        if let Some(bootstrap) = bootstrap {
            return Ok(Self {
                bootstrap: bootstrap.to_string(),
                embedded: None,
                _data: None,
            });
        }
        let data = tempfile::tempdir()?;
        let mut config = BrokerConfig {
            listen: "127.0.0.1:0".parse()?,
            data_dir: data.path().to_path_buf(),
            ..BrokerConfig::default()
        };
        adjust(&mut config);
        let handle = semel::broker::Broker::start(config).await?;
        Ok(Self {
            bootstrap: handle.local_addr().to_string(),
            embedded: Some(handle),
            _data: Some(data),
        })
    }

    /// The embedded broker, if this is one.
    pub(crate) fn embedded(&self) -> Option<&BrokerHandle> {
        self.embedded.as_ref()
    }

    /// Shuts the embedded broker down cleanly (nothing to do for an external one).
    pub(crate) async fn shutdown(self) {
        if let Some(handle) = self.embedded {
            handle.shutdown().await;
        }
    }
}

/// An admin client of `bootstrap`'s cluster.
pub(crate) async fn admin(bootstrap: &str) -> anyhow::Result<Cluster> {
    Ok(Cluster::connect(ClientConfig {
        bootstrap_servers: vec![bootstrap.to_string()],
        ..ClientConfig::default()
    })
    .await?)
}

/// Creates `topic` with `partitions` (replication factor 1) and the topic configs `configs`
/// (name, value) through the admin API; fails on any refusal.
pub(crate) async fn create_topic_with_configs(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    configs: &[(&str, &str)],
) -> anyhow::Result<()> {
    let admin = Admin::connect(ClientConfig {
        bootstrap_servers: vec![bootstrap.to_string()],
        ..ClientConfig::default()
    })
    .await?;
    let results = admin
        .create_topics(&[NewTopic {
            name: topic.to_string(),
            partitions,
            replication_factor: 1,
            configs: configs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }])
        .await?;
    for (name, result) in results {
        result.with_context(|| format!("create topic {name}"))?;
    }
    Ok(())
}

/// Creates each (topic, partitions), replication factor 1; fails on any refusal.
pub(crate) async fn create_topics(bootstrap: &str, topics: &[(&str, i32)]) -> anyhow::Result<()> {
    for (topic, partitions) in topics {
        create_topic_with_configs(bootstrap, topic, *partitions, &[]).await?;
    }
    Ok(())
}

/// Grows `topic` to `count` partitions.
pub(crate) async fn add_partitions(bootstrap: &str, topic: &str, count: i32) -> anyhow::Result<()> {
    let admin = Admin::connect(ClientConfig {
        bootstrap_servers: vec![bootstrap.to_string()],
        ..ClientConfig::default()
    })
    .await?;
    Ok(admin.create_partitions(topic, count).await?)
}

/// A bound on one of an example's waits: every loop that waits for something checks it, and
/// every single await that could wait forever goes through [`Patience::wait`], so a stuck run
/// stops with an error that names what it was waiting for instead of hanging.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Patience {
    what: &'static str,
    deadline: tokio::time::Instant,
    limit: std::time::Duration,
}

impl Patience {
    /// A wait for `what`, of at most `limit`.
    pub(crate) fn new(what: &'static str, limit: std::time::Duration) -> Self {
        Self {
            what,
            deadline: tokio::time::Instant::now() + limit,
            limit,
        }
    }

    /// Fails once the limit has passed; `progress` says how far it got.
    pub(crate) fn check(&self, progress: impl FnOnce() -> String) -> anyhow::Result<()> {
        ensure!(
            tokio::time::Instant::now() < self.deadline,
            "gave up waiting for {} after {:?} ({})",
            self.what,
            self.limit,
            progress()
        );
        Ok(())
    }

    /// `future`'s output, or an error naming the wait once the limit has passed.
    pub(crate) async fn wait<T>(
        &self,
        future: impl std::future::Future<Output = T>,
    ) -> anyhow::Result<T> {
        tokio::time::timeout_at(self.deadline, future)
            .await
            .map_err(|_| {
                anyhow::anyhow!("gave up waiting for {} after {:?}", self.what, self.limit)
            })
    }
}
