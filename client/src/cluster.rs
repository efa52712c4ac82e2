//! The cluster as a client sees it: bootstrap over several addresses, one pooled connection
//! per broker (reconnected with exponential backoff when it breaks), and a metadata cache that
//! maps each partition to its leader.
//!
//! Callers refresh the metadata when a broker says `NOT_LEADER_OR_FOLLOWER`,
//! `UNKNOWN_TOPIC_OR_PARTITION` or `LEADER_NOT_AVAILABLE` (see [`needs_metadata_refresh`]),
//! and when a connection breaks.
//!
//! References: Kafka protocol guide (Metadata); the Java client's `reconnect.backoff.ms`,
//! `reconnect.backoff.max.ms` and `bootstrap.servers` semantics.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use kafka_protocol::ResponseError;
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::{MetadataRequest, TopicName};
use kafka_protocol::protocol::StrBytes;

use crate::connection::{Connection, ConnectionConfig};
use crate::error::{ClientError, check_code};

/// Client settings (Kafka's names).
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `bootstrap.servers`: `host:port` addresses tried in order until one answers. An entry
    /// may also be a comma-separated list (`"a:9092,b:9092"`), as in Kafka's clients.
    pub bootstrap_servers: Vec<String>,
    /// Per-connection settings (`client.id`, `request.timeout.ms`, ...).
    pub connection: ConnectionConfig,
    /// `reconnect.backoff.ms`: the first wait before reconnecting to a broker that failed.
    pub reconnect_backoff: Duration,
    /// `reconnect.backoff.max.ms`: the wait doubles up to this.
    pub reconnect_backoff_max: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            bootstrap_servers: vec!["127.0.0.1:9092".into()],
            connection: ConnectionConfig::default(),
            reconnect_backoff: Duration::from_millis(50),
            reconnect_backoff_max: Duration::from_secs(1),
        }
    }
}

/// One partition in the metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    /// The partition index.
    pub partition: i32,
    /// Node id of the leader; -1 when there is none.
    pub leader: i32,
    /// The partition's error, if any.
    pub error: Option<ResponseError>,
}

/// One topic in the metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    /// The topic's error (`UNKNOWN_TOPIC_OR_PARTITION`, ...), if any.
    pub error: Option<ResponseError>,
    /// Partitions in index order.
    pub partitions: Vec<PartitionInfo>,
}

#[derive(Debug, Default)]
struct Metadata {
    /// node id → `host:port`.
    brokers: HashMap<i32, String>,
    topics: HashMap<String, TopicInfo>,
}

#[derive(Debug)]
struct Backoff {
    next_attempt: Instant,
    wait: Duration,
}

/// A client of one Kafka-protocol cluster.
#[derive(Debug)]
pub struct Cluster {
    config: ClientConfig,
    connections: Shared<HashMap<String, Arc<Connection>>>,
    /// Connections being made, each on a task of its own: a caller that stops waiting (a
    /// poll cut by a timeout) leaves it going, and the next caller waits for the same one.
    connecting: Shared<HashMap<String, Pending>>,
    backoff: Shared<HashMap<String, Backoff>>,
    metadata: RwLock<Metadata>,
    /// Bumped each time the cached metadata changes (see [`Cluster::metadata_version`]).
    metadata_version: std::sync::atomic::AtomicU64,
}

type Shared<T> = Arc<std::sync::Mutex<T>>;

/// A connection attempt's outcome, once it has one.
type Pending = tokio::sync::watch::Receiver<Option<Result<Arc<Connection>, ClientError>>>;

fn lock<T>(shared: &Shared<T>) -> std::sync::MutexGuard<'_, T> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether a partition-level error means the client's metadata is stale.
pub fn needs_metadata_refresh(error: ResponseError) -> bool {
    matches!(
        error,
        ResponseError::NotLeaderOrFollower
            | ResponseError::UnknownTopicOrPartition
            | ResponseError::LeaderNotAvailable
            | ResponseError::FencedLeaderEpoch
            | ResponseError::UnknownLeaderEpoch
    )
}

impl Cluster {
    /// Connects to the first reachable bootstrap server and loads the metadata of every topic.
    ///
    /// # Errors
    /// `NoBrokerReachable` when no bootstrap server answers.
    pub async fn connect(config: ClientConfig) -> Result<Self, ClientError> {
        let cluster = Self {
            config,
            connections: Shared::default(),
            connecting: Shared::default(),
            backoff: Shared::default(),
            metadata: RwLock::new(Metadata::default()),
            metadata_version: std::sync::atomic::AtomicU64::new(0),
        };
        cluster.refresh_metadata(None, false).await?;
        Ok(cluster)
    }

    /// The settings this cluster client was made with.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// The pooled connection to `broker` (`host:port`), made (again) if needed. A broker that
    /// failed recently is retried only after its backoff.
    ///
    /// # Errors
    /// `Connect` and any error of the API-version exchange.
    pub async fn connection(&self, broker: &str) -> Result<Arc<Connection>, ClientError> {
        let mut pending = {
            // `connecting` before `connections`; the connect task takes them one at a time.
            let mut connecting = lock(&self.connecting);
            {
                let mut connections = lock(&self.connections);
                if let Some(existing) = connections.get(broker) {
                    if !existing.is_broken() {
                        return Ok(Arc::clone(existing));
                    }
                    connections.remove(broker);
                }
            }
            match connecting.get(broker) {
                Some(pending) => pending.clone(),
                None => {
                    let pending = self.start_connecting(broker);
                    connecting.insert(broker.to_string(), pending.clone());
                    pending
                }
            }
        };
        let outcome = pending.wait_for(Option::is_some).await.map(|o| o.clone());
        match outcome {
            Ok(Some(result)) => result,
            Ok(None) | Err(_) => Err(ClientError::Connect {
                broker: broker.to_string(),
                reason: "the connection attempt ended without an outcome".into(),
            }),
        }
    }

    /// Makes a connection to `broker` on a task of its own (after the broker's backoff, if it
    /// failed recently), pools it, and tells whoever waits.
    fn start_connecting(&self, broker: &str) -> Pending {
        let (tell, pending) = tokio::sync::watch::channel(None);
        let wait = lock(&self.backoff)
            .get(broker)
            .map(|b| b.next_attempt.saturating_duration_since(Instant::now()))
            .unwrap_or_default();
        let broker = broker.to_string();
        let config = self.config.connection.clone();
        let (first_wait, max_wait) = (
            self.config.reconnect_backoff,
            self.config.reconnect_backoff_max,
        );
        let (connections, connecting, backoff) = (
            Arc::clone(&self.connections),
            Arc::clone(&self.connecting),
            Arc::clone(&self.backoff),
        );
        tokio::spawn(async move {
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            let result = Connection::connect(&broker, config).await.map(Arc::new);
            match &result {
                Ok(connection) => {
                    lock(&backoff).remove(&broker);
                    lock(&connections).insert(broker.clone(), Arc::clone(connection));
                }
                Err(_) => {
                    let mut backoff = lock(&backoff);
                    let entry = backoff.entry(broker.clone()).or_insert(Backoff {
                        next_attempt: Instant::now(),
                        wait: first_wait,
                    });
                    entry.next_attempt = Instant::now() + entry.wait;
                    entry.wait = (entry.wait * 2).min(max_wait);
                }
            }
            lock(&connecting).remove(&broker);
            let _ = tell.send(Some(result));
        });
        pending
    }

    /// The connection to node `node_id`, from the metadata.
    ///
    /// # Errors
    /// `Metadata` for an unknown node; as [`Cluster::connection`].
    pub async fn node(&self, node_id: i32) -> Result<Arc<Connection>, ClientError> {
        let address = self
            .address_of(node_id)
            .ok_or_else(|| ClientError::Metadata(format!("no broker with node id {node_id}")))?;
        self.connection(&address).await
    }

    fn address_of(&self, node_id: i32) -> Option<String> {
        self.metadata
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .brokers
            .get(&node_id)
            .cloned()
    }

    /// When node `node_id` may be tried again, if a failed connection put it in backoff (a
    /// caller that must not wait can skip it until then; [`Cluster::node`] would sleep).
    pub fn node_retry_at(&self, node_id: i32) -> Option<Instant> {
        let address = self.address_of(node_id)?;
        lock(&self.backoff)
            .get(&address)
            .map(|b| b.next_attempt)
            .filter(|at| *at > Instant::now())
    }

    /// A connection to any broker: a known one first, then the bootstrap servers.
    ///
    /// # Errors
    /// `NoBrokerReachable` when none answers.
    pub async fn any(&self) -> Result<Arc<Connection>, ClientError> {
        let mut candidates: Vec<String> = self
            .metadata
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .brokers
            .values()
            .cloned()
            .collect();
        candidates.sort();
        // An entry may itself be a comma-separated list, as Kafka's `bootstrap.servers` is.
        for bootstrap in self
            .config
            .bootstrap_servers
            .iter()
            .flat_map(|entry| entry.split(','))
            .map(str::trim)
            .filter(|address| !address.is_empty())
        {
            if !candidates.iter().any(|known| known == bootstrap) {
                candidates.push(bootstrap.to_string());
            }
        }
        let mut last = String::from("no address configured");
        for candidate in &candidates {
            match self.connection(candidate).await {
                Ok(connection) => return Ok(connection),
                // Wrong credentials stay wrong: fail now, as the Java client does
                // (SaslAuthenticationException), instead of retrying until a timeout.
                Err(error @ ClientError::Authentication { .. }) => return Err(error),
                Err(error) => last = error.to_string(),
            }
        }
        Err(ClientError::NoBrokerReachable {
            tried: candidates,
            last,
        })
    }

    /// Reloads the metadata of `topics` (all topics with `None`), asking the broker to create
    /// missing ones when `allow_auto_topic_creation`.
    ///
    /// # Errors
    /// `NoBrokerReachable`, or the Metadata request's error.
    pub async fn refresh_metadata(
        &self,
        topics: Option<&[String]>,
        allow_auto_topic_creation: bool,
    ) -> Result<(), ClientError> {
        let connection = self.any().await?;
        let request = MetadataRequest::default()
            .with_topics(topics.map(|names| {
                names
                    .iter()
                    .map(|name| {
                        MetadataRequestTopic::default()
                            .with_name(Some(TopicName(StrBytes::from_string(name.clone()))))
                    })
                    .collect()
            }))
            .with_allow_auto_topic_creation(allow_auto_topic_creation);
        let response = connection.send(&request, (4, 12)).await?;
        tracing::debug!(
            broker = connection.broker(),
            topics = response.topics.len(),
            "metadata"
        );
        let mut metadata = self.metadata.write().unwrap_or_else(|p| p.into_inner());
        for broker in &response.brokers {
            metadata
                .brokers
                .insert(broker.node_id.0, format!("{}:{}", broker.host, broker.port));
        }
        for topic in response.topics {
            let Some(name) = topic.name else { continue };
            let mut partitions: Vec<PartitionInfo> = topic
                .partitions
                .iter()
                .map(|p| PartitionInfo {
                    partition: p.partition_index,
                    leader: p.leader_id.0,
                    error: check_code(p.error_code).err(),
                })
                .collect();
            partitions.sort_by_key(|p| p.partition);
            metadata.topics.insert(
                name.0.to_string(),
                TopicInfo {
                    error: check_code(topic.error_code).err(),
                    partitions,
                },
            );
        }
        self.metadata_version
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// A number that changes whenever the cached metadata does: something derived from the
    /// metadata (a topic's partition count, say) stays valid while this returns the same.
    pub fn metadata_version(&self) -> u64 {
        self.metadata_version
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// The names of every topic in the cached metadata.
    pub fn topic_names(&self) -> Vec<String> {
        let metadata = self.metadata.read().unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<String> = metadata.topics.keys().cloned().collect();
        names.sort();
        names
    }

    /// The node ids of every broker in the cached metadata.
    pub fn node_ids(&self) -> Vec<i32> {
        let metadata = self.metadata.read().unwrap_or_else(|p| p.into_inner());
        let mut ids: Vec<i32> = metadata.brokers.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// The cached metadata of `topic`.
    pub fn topic(&self, topic: &str) -> Option<TopicInfo> {
        self.with_topic(topic, TopicInfo::clone)
    }

    /// `f` of the cached metadata of `topic`, without copying it (the producer asks this for
    /// every record).
    pub fn with_topic<R>(&self, topic: &str, f: impl FnOnce(&TopicInfo) -> R) -> Option<R> {
        self.metadata
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .topics
            .get(topic)
            .map(f)
    }

    /// The cached leader of a partition (`None` when unknown or leaderless).
    pub fn leader(&self, topic: &str, partition: i32) -> Option<i32> {
        self.with_topic(topic, |info| {
            info.partitions
                .iter()
                .find(|p| p.partition == partition)
                .map(|p| p.leader)
        })?
        .filter(|leader| *leader >= 0)
    }
}
