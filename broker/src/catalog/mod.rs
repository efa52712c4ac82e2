//! The catalog: which topics exist, their ids, partition counts and config overrides, and the
//! open partitions of each.
//!
//! Persisted in `<data-dir>/catalog.bin` (see [`crate::state_file`]). Partition `p` of topic `t`
//! lives in `<data-dir>/t-p/`, as in Kafka. Deleting a topic renames its directories to
//! `*-delete` first, then persists the catalog, then removes them; a crash in between leaves
//! only `*-delete` directories, which the next start removes.
//!
//! References: Kafka topic naming rules (`Topic.validate`), KIP-516 (topic ids).

pub(crate) mod config;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use kafka_protocol::ResponseError;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use uuid::Uuid;

use crate::log::LogConfig;
use crate::partition::Partition;
use crate::state_file::{self, StateFileError};

const CATALOG_FILE: &str = "catalog.bin";
const CATALOG_MAGIC: &[u8; 8] = b"SEMELCAT";
const CATALOG_VERSION: u16 = 1;
/// Most partitions one topic may have; a typo such as 100000 should not create 100000 directories.
pub(crate) const MAX_PARTITIONS_PER_TOPIC: i32 = 10_000;
const MAX_TOPIC_NAME_CHARS: usize = 249;

#[derive(Debug, Serialize, Deserialize)]
struct CatalogFile {
    cluster_id: String,
    topics: Vec<TopicRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TopicRecord {
    name: String,
    id: u128,
    partitions: i32,
    configs: BTreeMap<String, String>,
}

/// A topic and its open partitions. Replaced as a whole when partitions are added.
#[derive(Debug)]
pub(crate) struct Topic {
    pub(crate) name: String,
    pub(crate) id: Uuid,
    /// Overrides given at creation; everything else is the broker default.
    pub(crate) configs: BTreeMap<String, String>,
    /// Broker defaults with `configs` applied.
    pub(crate) log_config: LogConfig,
    pub(crate) partitions: Vec<Arc<Partition>>,
}

impl Topic {
    pub(crate) fn partition(&self, index: i32) -> Option<&Arc<Partition>> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.partitions.get(i))
    }

    fn record(&self) -> TopicRecord {
        TopicRecord {
            name: self.name.clone(),
            id: self.id.as_u128(),
            partitions: partition_count(self.partitions.len()),
            configs: self.configs.clone(),
        }
    }
}

fn partition_count(len: usize) -> i32 {
    i32::try_from(len).unwrap_or(i32::MAX)
}

/// A catalog change that was refused, with the Kafka error code to return.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(crate) struct CatalogError {
    pub(crate) code: ResponseError,
    pub(crate) message: String,
}

impl CatalogError {
    fn new(code: ResponseError, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<StateFileError> for CatalogError {
    fn from(e: StateFileError) -> Self {
        Self::new(ResponseError::KafkaStorageError, e.to_string())
    }
}

/// Why the catalog could not be opened at start-up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CatalogOpenError {
    /// The catalog file is unreadable or corrupt.
    #[error("catalog: {0}")]
    State(#[from] StateFileError),
    /// A partition directory could not be opened or recovered.
    #[error("partition {topic}-{partition}: {source}")]
    Partition {
        /// Topic name.
        topic: String,
        /// Partition index.
        partition: i32,
        /// What the log reported.
        source: crate::log::LogError,
    },
    /// The data directory could not be created or listed.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

#[derive(Debug)]
struct CatalogState {
    topics: BTreeMap<String, Arc<Topic>>,
}

/// Topics of this broker. Reads take a read lock; changes are serialized and persisted before
/// they become visible.
#[derive(Debug)]
pub(crate) struct Catalog {
    data_dir: PathBuf,
    cluster_id: String,
    defaults: LogConfig,
    /// Cap on producers remembered per partition.
    max_producers: usize,
    appended: Arc<watch::Sender<u64>>,
    state: RwLock<CatalogState>,
    changes: Mutex<()>,
}

impl Catalog {
    /// Opens the catalog in `data_dir` (creating it on first start) and recovers every partition.
    pub(crate) fn open(
        data_dir: &Path,
        defaults: LogConfig,
        max_producers: usize,
        now_ms: i64,
        appended: Arc<watch::Sender<u64>>,
    ) -> Result<Self, CatalogOpenError> {
        fs::create_dir_all(data_dir).map_err(|source| CatalogOpenError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        remove_leftover_deletions(data_dir)?;
        let path = data_dir.join(CATALOG_FILE);
        let file = match state_file::read::<CatalogFile>(&path, CATALOG_MAGIC, CATALOG_VERSION)? {
            Some(file) => file,
            None => {
                let file = CatalogFile {
                    cluster_id: new_cluster_id(),
                    topics: Vec::new(),
                };
                state_file::write(&path, CATALOG_MAGIC, CATALOG_VERSION, &file)?;
                tracing::info!(cluster_id = %file.cluster_id, path = %path.display(), "created a new catalog");
                file
            }
        };
        let mut topics = BTreeMap::new();
        for record in file.topics {
            let log_config = config::apply_overrides(&defaults, &record.configs).unwrap_or_else(|e| {
                tracing::warn!(topic = %record.name, error = %e, "stored topic config no longer valid; using broker defaults");
                defaults.clone()
            });
            let mut partitions = Vec::new();
            for index in 0..record.partitions {
                let partition = open_partition(
                    data_dir,
                    &record.name,
                    index,
                    &log_config,
                    max_producers,
                    now_ms,
                    &appended,
                )
                .map_err(|source| CatalogOpenError::Partition {
                    topic: record.name.clone(),
                    partition: index,
                    source,
                })?;
                partitions.push(Arc::new(partition));
            }
            topics.insert(
                record.name.clone(),
                Arc::new(Topic {
                    name: record.name,
                    id: Uuid::from_u128(record.id),
                    configs: record.configs,
                    log_config,
                    partitions,
                }),
            );
        }
        Ok(Self {
            data_dir: data_dir.to_path_buf(),
            cluster_id: file.cluster_id,
            defaults,
            max_producers,
            appended,
            state: RwLock::new(CatalogState { topics }),
            changes: Mutex::new(()),
        })
    }

    pub(crate) fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    pub(crate) fn defaults(&self) -> &LogConfig {
        &self.defaults
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, CatalogState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn topic(&self, name: &str) -> Option<Arc<Topic>> {
        self.read().topics.get(name).cloned()
    }

    pub(crate) fn topic_by_id(&self, id: Uuid) -> Option<Arc<Topic>> {
        self.read().topics.values().find(|t| t.id == id).cloned()
    }

    pub(crate) fn topics(&self) -> Vec<Arc<Topic>> {
        self.read().topics.values().cloned().collect()
    }

    /// Every partition of every topic.
    pub(crate) fn partitions(&self) -> Vec<Arc<Partition>> {
        self.read()
            .topics
            .values()
            .flat_map(|t| t.partitions.iter().cloned())
            .collect()
    }

    fn persist(&self, topics: &BTreeMap<String, Arc<Topic>>) -> Result<(), CatalogError> {
        let file = CatalogFile {
            cluster_id: self.cluster_id.clone(),
            topics: topics.values().map(|t| t.record()).collect(),
        };
        state_file::write(
            &self.data_dir.join(CATALOG_FILE),
            CATALOG_MAGIC,
            CATALOG_VERSION,
            &file,
        )?;
        Ok(())
    }

    /// Creates a topic, or with `validate_only` checks that it could be created.
    pub(crate) fn create_topic(
        &self,
        name: &str,
        partitions: i32,
        configs: BTreeMap<String, String>,
        validate_only: bool,
        now_ms: i64,
    ) -> Result<Arc<Topic>, CatalogError> {
        validate_topic_name(name)?;
        validate_partition_count(partitions)?;
        let log_config = config::apply_overrides(&self.defaults, &configs)
            .map_err(|e| CatalogError::new(ResponseError::InvalidConfig, e.to_string()))?;
        let _change = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        if self.topic(name).is_some() {
            return Err(CatalogError::new(
                ResponseError::TopicAlreadyExists,
                format!("Topic '{name}' already exists."),
            ));
        }
        let colliding = self
            .read()
            .topics
            .keys()
            .find(|existing| collides(existing, name))
            .cloned();
        if let Some(existing) = colliding {
            return Err(CatalogError::new(
                ResponseError::InvalidTopicException,
                format!(
                    "Topic '{name}' collides with existing topic '{existing}' ('.' and '_' are interchangeable in metric names)"
                ),
            ));
        }
        let id = Uuid::new_v4();
        let mut opened = Vec::new();
        if !validate_only {
            for index in 0..partitions {
                let partition = open_partition(
                    &self.data_dir,
                    name,
                    index,
                    &log_config,
                    self.max_producers,
                    now_ms,
                    &self.appended,
                )
                .map_err(|e| CatalogError::new(ResponseError::KafkaStorageError, e.to_string()))?;
                opened.push(Arc::new(partition));
            }
        }
        let topic = Arc::new(Topic {
            name: name.to_string(),
            id,
            configs,
            log_config,
            partitions: opened,
        });
        if validate_only {
            return Ok(topic);
        }
        let mut topics = self.read().topics.clone();
        topics.insert(name.to_string(), Arc::clone(&topic));
        self.persist(&topics)?;
        self.state.write().unwrap_or_else(|p| p.into_inner()).topics = topics;
        tracing::info!(topic = name, partitions, "created topic");
        Ok(topic)
    }

    /// Deletes a topic and its data.
    pub(crate) fn delete_topic(&self, name: &str) -> Result<Uuid, CatalogError> {
        let _change = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        let topic = self.topic(name).ok_or_else(|| unknown_topic(name))?;
        let mut doomed = Vec::new();
        for partition in &topic.partitions {
            // A roll's window snapshot still to be written would land in this directory, or
            // in a new topic's of the same name.
            partition.retire();
            let dir = partition_dir(&self.data_dir, name, partition.index);
            let target = self.data_dir.join(format!(
                "{name}-{}.{}-delete",
                partition.index,
                topic.id.simple()
            ));
            match fs::rename(&dir, &target) {
                Ok(()) => doomed.push(target),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(CatalogError::new(
                        ResponseError::KafkaStorageError,
                        format!("cannot move {} aside for deletion: {e}", dir.display()),
                    ));
                }
            }
        }
        let mut topics = self.read().topics.clone();
        topics.remove(name);
        self.persist(&topics)?;
        self.state.write().unwrap_or_else(|p| p.into_inner()).topics = topics;
        for dir in doomed {
            if let Err(e) = fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "could not remove a deleted partition; it will be removed at the next start");
            }
        }
        tracing::info!(topic = name, "deleted topic");
        Ok(topic.id)
    }

    /// Grows a topic to `total` partitions (CreatePartitions).
    /// Replaces `name`'s config overrides with `configs` (or, with `validate_only`, checks
    /// that it could): every partition's log takes the new settings, and the catalog is
    /// persisted before the change is visible.
    pub(crate) fn alter_topic_configs(
        &self,
        name: &str,
        configs: BTreeMap<String, String>,
        validate_only: bool,
    ) -> Result<(), CatalogError> {
        let _change = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        let topic = self.topic(name).ok_or_else(|| unknown_topic(name))?;
        let log_config = config::apply_overrides(&self.defaults, &configs)
            .map_err(|e| CatalogError::new(ResponseError::InvalidConfig, e.to_string()))?;
        log_config
            .validate()
            .map_err(|e| CatalogError::new(ResponseError::InvalidConfig, e.to_string()))?;
        if validate_only {
            return Ok(());
        }
        let altered = Arc::new(Topic {
            name: topic.name.clone(),
            id: topic.id,
            configs: configs.clone(),
            log_config: log_config.clone(),
            partitions: topic.partitions.clone(),
        });
        let mut topics = self.read().topics.clone();
        topics.insert(name.to_string(), altered);
        self.persist(&topics)?;
        for partition in &topic.partitions {
            partition
                .log()
                .set_config(log_config.clone())
                .map_err(|e| CatalogError::new(ResponseError::InvalidConfig, e.to_string()))?;
        }
        self.state.write().unwrap_or_else(|p| p.into_inner()).topics = topics;
        tracing::info!(topic = name, ?configs, "altered topic configs");
        Ok(())
    }

    pub(crate) fn create_partitions(
        &self,
        name: &str,
        total: i32,
        validate_only: bool,
        now_ms: i64,
    ) -> Result<(), CatalogError> {
        let _change = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        let topic = self.topic(name).ok_or_else(|| unknown_topic(name))?;
        let current = partition_count(topic.partitions.len());
        if total <= current {
            return Err(CatalogError::new(
                ResponseError::InvalidPartitions,
                format!(
                    "Topic currently has {current} partitions, {total} would not be an increase."
                ),
            ));
        }
        validate_partition_count(total)?;
        if validate_only {
            return Ok(());
        }
        let mut partitions = topic.partitions.clone();
        for index in current..total {
            let partition = open_partition(
                &self.data_dir,
                name,
                index,
                &topic.log_config,
                self.max_producers,
                now_ms,
                &self.appended,
            )
            .map_err(|e| CatalogError::new(ResponseError::KafkaStorageError, e.to_string()))?;
            partitions.push(Arc::new(partition));
        }
        let grown = Arc::new(Topic {
            name: topic.name.clone(),
            id: topic.id,
            configs: topic.configs.clone(),
            log_config: topic.log_config.clone(),
            partitions,
        });
        let mut topics = self.read().topics.clone();
        topics.insert(name.to_string(), grown);
        self.persist(&topics)?;
        self.state.write().unwrap_or_else(|p| p.into_inner()).topics = topics;
        tracing::info!(topic = name, from = current, to = total, "added partitions");
        Ok(())
    }
}

pub(crate) fn unknown_topic(name: &str) -> CatalogError {
    CatalogError::new(
        ResponseError::UnknownTopicOrPartition,
        format!("This server does not host topic '{name}'."),
    )
}

fn partition_dir(data_dir: &Path, topic: &str, index: i32) -> PathBuf {
    data_dir.join(format!("{topic}-{index}"))
}

fn open_partition(
    data_dir: &Path,
    topic: &str,
    index: i32,
    config: &LogConfig,
    max_producers: usize,
    now_ms: i64,
    appended: &Arc<watch::Sender<u64>>,
) -> Result<Partition, crate::log::LogError> {
    let dir = partition_dir(data_dir, topic, index);
    let (partition, report) = Partition::open(
        topic,
        index,
        &dir,
        config.clone(),
        max_producers,
        now_ms,
        Arc::clone(appended),
    )?;
    if report.truncated_bytes > 0 {
        tracing::warn!(topic, partition = index, report = ?report, "recovery truncated an invalid log tail");
    } else {
        tracing::debug!(topic, partition = index, report = ?report, "opened partition");
    }
    Ok(partition)
}

fn remove_leftover_deletions(data_dir: &Path) -> Result<(), CatalogOpenError> {
    let entries = fs::read_dir(data_dir).map_err(|source| CatalogOpenError::DataDir {
        path: data_dir.to_path_buf(),
        source,
    })?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() && entry.file_name().to_string_lossy().ends_with("-delete") {
            match fs::remove_dir_all(&path) {
                Ok(()) => {
                    tracing::info!(dir = %path.display(), "removed a partition of a deleted topic")
                }
                Err(e) => {
                    tracing::warn!(dir = %path.display(), error = %e, "could not remove a deleted partition")
                }
            }
        }
    }
    Ok(())
}

/// Kafka's rules: 1-249 characters from `[a-zA-Z0-9._-]`, and not `.` or `..`.
pub(crate) fn validate_topic_name(name: &str) -> Result<(), CatalogError> {
    let invalid = |why: &str| {
        Err(CatalogError::new(
            ResponseError::InvalidTopicException,
            format!("Topic name '{name}' is illegal: {why}"),
        ))
    };
    if name.is_empty() {
        return invalid("it is empty");
    }
    if name == "." || name == ".." {
        return invalid("'.' and '..' are not allowed");
    }
    if name.chars().count() > MAX_TOPIC_NAME_CHARS {
        return invalid("it is longer than 249 characters");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return invalid("it contains characters other than ASCII alphanumerics, '.', '_' and '-'");
    }
    Ok(())
}

fn validate_partition_count(partitions: i32) -> Result<(), CatalogError> {
    if !(1..=MAX_PARTITIONS_PER_TOPIC).contains(&partitions) {
        return Err(CatalogError::new(
            ResponseError::InvalidPartitions,
            format!(
                "Number of partitions must be between 1 and {MAX_PARTITIONS_PER_TOPIC}, got {partitions}."
            ),
        ));
    }
    Ok(())
}

/// Kafka refuses `a.b` next to `a_b`, because both map to the same metric name.
fn collides(a: &str, b: &str) -> bool {
    a != b && a.replace('.', "_") == b.replace('.', "_")
}

/// A Kafka-style cluster id: a random UUID in URL-safe base64 without padding (22 characters).
fn new_cluster_id() -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let value = Uuid::new_v4().as_u128();
    (0..22)
        .map(|i| {
            let shift = 128i32 - 6 * (i + 1);
            let sextet = if shift >= 0 {
                (value >> shift) & 63
            } else {
                (value << -shift) & 63
            };
            char::from(ALPHABET[usize::try_from(sextet).unwrap_or(0)])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> Catalog {
        Catalog::open(
            dir,
            LogConfig::default(),
            crate::idempotence::DEFAULT_MAX_PRODUCERS_PER_PARTITION,
            0,
            Arc::new(watch::channel(0).0),
        )
        .expect("open")
    }

    #[test]
    fn topics_survive_reopen_and_deletion_removes_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let catalog = open(dir.path());
        let cluster = catalog.cluster_id().to_string();
        assert_eq!(cluster.len(), 22);
        let created = catalog
            .create_topic("orders", 3, BTreeMap::new(), false, 0)
            .expect("create");
        assert_eq!(created.partitions.len(), 3);
        assert!(dir.path().join("orders-2").is_dir());
        let err = catalog
            .create_topic("orders", 1, BTreeMap::new(), false, 0)
            .unwrap_err();
        assert_eq!(err.code, ResponseError::TopicAlreadyExists);
        catalog
            .create_partitions("orders", 5, false, 0)
            .expect("grow");
        let err = catalog
            .create_partitions("orders", 4, false, 0)
            .unwrap_err();
        assert_eq!(err.code, ResponseError::InvalidPartitions);
        drop(catalog);

        let catalog = open(dir.path());
        assert_eq!(catalog.cluster_id(), cluster);
        let topic = catalog.topic("orders").expect("still there");
        assert_eq!(topic.partitions.len(), 5);
        assert_eq!(topic.id, created.id);
        catalog.delete_topic("orders").expect("delete");
        assert!(catalog.topic("orders").is_none());
        assert!(!dir.path().join("orders-0").exists());
        drop(catalog);
        assert!(open(dir.path()).topic("orders").is_none());
    }

    #[test]
    fn names_and_counts_are_validated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let catalog = open(dir.path());
        for bad in ["", ".", "..", "has space", "slash/inside", &"x".repeat(250)] {
            let err = catalog
                .create_topic(bad, 1, BTreeMap::new(), false, 0)
                .unwrap_err();
            assert_eq!(err.code, ResponseError::InvalidTopicException, "{bad:?}");
        }
        for count in [0, -1, MAX_PARTITIONS_PER_TOPIC + 1] {
            let err = catalog
                .create_topic("t", count, BTreeMap::new(), false, 0)
                .unwrap_err();
            assert_eq!(err.code, ResponseError::InvalidPartitions);
        }
        catalog
            .create_topic("a.b", 1, BTreeMap::new(), false, 0)
            .expect("create");
        let err = catalog
            .create_topic("a_b", 1, BTreeMap::new(), false, 0)
            .unwrap_err();
        assert_eq!(err.code, ResponseError::InvalidTopicException);
        catalog
            .create_topic("v", 1, BTreeMap::new(), true, 0)
            .expect("validate only");
        assert!(catalog.topic("v").is_none());
    }
}
