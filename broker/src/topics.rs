//! Topics and their partitions, and the file that lists them.
//!
//! Layout of the data directory: one directory per partition,
//! `<topic>-<partition>/` (the storage log), and `topics.json`, written
//! atomically, naming every topic with its partition count and configs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use weir_protocol::ErrorCode;
use weir_storage::{IoEngine, Log, LogConfig};

use crate::partition::Partition;

/// Longest topic name (Kafka's limit).
pub const TOPIC_NAME_BYTES_MAX: usize = 249;
/// Most partitions one topic may have.
pub const TOPIC_PARTITIONS_MAX: u32 = 10_000;
/// Topics one Metadata or DescribeTopics request may name; more are refused
/// with one `InvalidRequest` entry rather than answered.
pub const TOPICS_PER_REQUEST_MAX: usize = 10_000;
/// The internal topic holding committed offsets (written by the group
/// coordinator only).
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";
/// The topic list's file name inside the data directory.
pub const TOPICS_FILE: &str = "topics.json";

/// A topic as `topics.json` records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TopicSpec {
    /// The cluster's id for the topic (`None`: written before the broker
    /// was in a cluster, or internal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// Partition count.
    pub partitions: u32,
    /// Topic configs (recorded; `segment.bytes`, `retention.ms` and
    /// `retention.bytes` apply, -1 for no retention).
    pub configs: BTreeMap<String, String>,
}

/// A topic and its open partitions.
#[derive(Debug)]
pub struct Topic {
    /// Name.
    pub name: String,
    /// How it was created.
    pub spec: TopicSpec,
    /// Partitions by index.
    pub partitions: Vec<Arc<Partition>>,
}

/// Why a topic operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    /// The answer for the client.
    #[error("{code}: {message}")]
    Refused {
        /// Error code.
        code: ErrorCode,
        /// Detail.
        message: String,
    },
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] weir_storage::StorageError),
}

impl TopicError {
    /// A refusal with the client's code.
    pub fn refused(code: ErrorCode, message: impl Into<String>) -> Self {
        TopicError::Refused {
            code,
            message: message.into(),
        }
    }

    /// A controller failure, as the client sees it.
    pub fn from_controller(error: crate::cluster::controller::ControllerError) -> Self {
        use crate::cluster::controller::ControllerError;
        use crate::cluster::metadata::MetadataError;
        let code = match &error {
            ControllerError::Rejected(MetadataError::TopicAlreadyExists) => {
                ErrorCode::TopicAlreadyExists
            }
            ControllerError::Rejected(MetadataError::UnknownTopicOrPartition) => {
                ErrorCode::UnknownTopicOrPartition
            }
            ControllerError::Rejected(_) => ErrorCode::InvalidRequest,
            ControllerError::Timeout(_) => ErrorCode::Timeout,
            ControllerError::Start(_) | ControllerError::Stopped(_) => ErrorCode::NotController,
        };
        TopicError::refused(code, error.to_string())
    }

    /// The code for the client.
    pub fn code(&self) -> ErrorCode {
        match self {
            TopicError::Refused { code, .. } => *code,
            TopicError::Storage(error) => crate::partition::storage_error_code(error),
        }
    }
}

/// Smallest `segment.bytes` a topic may set.
pub const SEGMENT_BYTES_MIN: u64 = 1 << 20;

/// All topics of this broker.
#[derive(Debug)]
pub struct Topics {
    data_dir: PathBuf,
    log_config: LogConfig,
    engine: Arc<IoEngine>,
    appended: Arc<tokio::sync::Notify>,
    broker_id: crate::cluster::metadata::BrokerId,
    replica_config: crate::cluster::replica::ReplicaConfig,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
    /// Serialises create and delete so `topics.json` matches the directories.
    changes: tokio::sync::Mutex<()>,
}

/// Whether clients may not create, delete or produce to `topic` (they may
/// read it).
pub fn is_internal(topic: &str) -> bool {
    topic == OFFSETS_TOPIC
}

/// Checks a topic name: 1–249 bytes of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn valid_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= TOPIC_NAME_BYTES_MAX
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'))
}

fn partition_dir(data_dir: &Path, topic: &str, index: u32) -> PathBuf {
    data_dir.join(format!("{topic}-{index}"))
}

impl Topics {
    /// Opens every topic listed in `topics.json` (recovering each partition).
    ///
    /// # Errors
    /// Storage errors, or an unreadable topic list.
    pub fn open(
        data_dir: &Path,
        log_config: LogConfig,
        engine: Arc<IoEngine>,
        appended: Arc<tokio::sync::Notify>,
        broker_id: crate::cluster::metadata::BrokerId,
        replica_config: crate::cluster::replica::ReplicaConfig,
    ) -> Result<Topics, TopicError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|error| weir_storage::StorageError::io(data_dir, error))?;
        let specs: BTreeMap<String, TopicSpec> = match std::fs::read(data_dir.join(TOPICS_FILE)) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|error| {
                TopicError::refused(
                    ErrorCode::Unknown,
                    format!("unreadable {TOPICS_FILE}: {error}"),
                )
            })?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(error) => {
                return Err(
                    weir_storage::StorageError::io(data_dir.join(TOPICS_FILE), error).into(),
                );
            }
        };
        let topics = Topics {
            data_dir: data_dir.to_path_buf(),
            log_config,
            engine,
            appended,
            broker_id,
            replica_config,
            topics: RwLock::new(BTreeMap::new()),
            changes: tokio::sync::Mutex::new(()),
        };
        for (name, spec) in specs {
            let topic = topics.open_topic(&name, spec)?;
            topics.write().insert(name, Arc::new(topic));
        }
        Ok(topics)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Topic>>> {
        self.topics
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Topic>>> {
        self.topics
            .write()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn open_topic(&self, name: &str, spec: TopicSpec) -> Result<Topic, TopicError> {
        let mut partitions = Vec::with_capacity(spec.partitions as usize);
        let mut log_config = self.log_config.clone();
        if let Some(bytes) = spec
            .configs
            .get("segment.bytes")
            .and_then(|value| value.parse::<u64>().ok())
        {
            // Each partition preallocates a segment: a small internal topic
            // need not reserve gigabytes.
            log_config.segment_bytes_max =
                bytes.clamp(SEGMENT_BYTES_MIN, log_config.segment_bytes_max);
        }
        // Retention overrides; -1 keeps everything.
        if let Some(value) = spec
            .configs
            .get("retention.ms")
            .and_then(|value| value.parse::<i64>().ok())
        {
            log_config.retention_ms = u64::try_from(value).ok();
        }
        if let Some(value) = spec
            .configs
            .get("retention.bytes")
            .and_then(|value| value.parse::<i64>().ok())
        {
            log_config.retention_bytes = u64::try_from(value).ok();
        }
        for index in 0..spec.partitions {
            let log = Log::open(
                partition_dir(&self.data_dir, name, index),
                log_config.clone(),
                self.engine.clone(),
            )?;
            let report = log.recovery_report();
            if report.cut.is_some() {
                tracing::warn!(
                    topic = name,
                    partition = index,
                    ?report,
                    "partition recovered with a cut"
                );
            }
            let partition = Partition::new(
                name.to_string(),
                index,
                log,
                self.appended.clone(),
                self.broker_id,
                self.replica_config,
            );
            partitions.push(partition);
        }
        Ok(Topic {
            name: name.to_string(),
            spec,
            partitions,
        })
    }

    /// The topic, if it exists.
    pub fn get(&self, name: &str) -> Option<Arc<Topic>> {
        self.read().get(name).cloned()
    }

    /// One partition, if it exists.
    pub fn partition(&self, topic: &str, index: u32) -> Option<Arc<Partition>> {
        self.get(topic)
            .and_then(|topic| topic.partitions.get(index as usize).cloned())
    }

    /// Every topic, by name.
    pub fn all(&self) -> Vec<Arc<Topic>> {
        self.read().values().cloned().collect()
    }

    fn store(&self) -> Result<(), TopicError> {
        let specs: BTreeMap<String, TopicSpec> = self
            .read()
            .iter()
            .map(|(name, topic)| (name.clone(), topic.spec.clone()))
            .collect();
        let text = serde_json::to_vec_pretty(&specs)
            .map_err(|error| TopicError::refused(ErrorCode::Unknown, error.to_string()))?;
        weir_storage::checkpoint::write_atomic(&self.data_dir, TOPICS_FILE, &text)?;
        Ok(())
    }

    /// Creates a topic.
    ///
    /// # Errors
    /// InvalidTopic, TopicAlreadyExists, InvalidRequest (partition count),
    /// or a storage error.
    pub async fn create(
        &self,
        name: &str,
        id: Option<u64>,
        partitions: u32,
        configs: BTreeMap<String, String>,
    ) -> Result<(), TopicError> {
        if !valid_topic_name(name) {
            return Err(TopicError::refused(
                ErrorCode::InvalidTopic,
                format!("invalid topic name {name:?}"),
            ));
        }
        if partitions == 0 || partitions > TOPIC_PARTITIONS_MAX {
            return Err(TopicError::refused(
                ErrorCode::InvalidRequest,
                format!("partitions must be 1..={TOPIC_PARTITIONS_MAX}"),
            ));
        }
        let _changes = self.changes.lock().await;
        if self.get(name).is_some() {
            return Err(TopicError::refused(
                ErrorCode::TopicAlreadyExists,
                format!("topic {name} exists"),
            ));
        }
        // Preallocating segments and syncing metadata block: keep them off
        // the runtime's workers' queues (other connections keep running).
        crate::blocking::blocking(|| self.create_locked(name, id, partitions, configs))
    }

    /// Records the cluster's id for a topic this broker held before it had
    /// one.
    ///
    /// # Errors
    /// UnknownTopicOrPartition, or a storage error writing the list.
    pub async fn adopt_id(&self, name: &str, id: u64) -> Result<(), TopicError> {
        let _changes = self.changes.lock().await;
        let Some(topic) = self.get(name) else {
            return Err(TopicError::refused(
                ErrorCode::UnknownTopicOrPartition,
                format!("no topic {name}"),
            ));
        };
        let mut spec = topic.spec.clone();
        spec.id = Some(id);
        let updated = Topic {
            name: topic.name.clone(),
            spec,
            partitions: topic.partitions.clone(),
        };
        self.write().insert(name.to_string(), Arc::new(updated));
        crate::blocking::blocking(|| self.store())
    }

    fn create_locked(
        &self,
        name: &str,
        id: Option<u64>,
        partitions: u32,
        configs: BTreeMap<String, String>,
    ) -> Result<(), TopicError> {
        // Leftovers of a topic deleted before a crash must not come back.
        for index in 0..partitions {
            let dir = partition_dir(&self.data_dir, name, index);
            if dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .map_err(|error| weir_storage::StorageError::io(&dir, error))?;
            }
        }
        let topic = match self.open_topic(
            name,
            TopicSpec {
                id,
                partitions,
                configs,
            },
        ) {
            Ok(topic) => topic,
            Err(error) => {
                // Give back whatever was preallocated (a full disk, often).
                for index in 0..partitions {
                    let _ = std::fs::remove_dir_all(partition_dir(&self.data_dir, name, index));
                }
                return Err(error);
            }
        };
        self.write().insert(name.to_string(), Arc::new(topic));
        if let Err(error) = self.store() {
            self.write().remove(name);
            return Err(error);
        }
        Ok(())
    }

    /// Deletes a topic and its data; returns how many partitions it had.
    /// Readers holding its partitions finish with what they read; appends
    /// to it fail once its logs close.
    ///
    /// # Errors
    /// UnknownTopicOrPartition, or a storage error.
    pub async fn delete(&self, name: &str) -> Result<u32, TopicError> {
        let _changes = self.changes.lock().await;
        let Some(topic) = self.write().remove(name) else {
            return Err(TopicError::refused(
                ErrorCode::UnknownTopicOrPartition,
                format!("no topic {name}"),
            ));
        };
        crate::blocking::blocking(|| {
            self.store()?;
            for partition in &topic.partitions {
                partition.log.close()?;
                let dir = partition_dir(&self.data_dir, name, partition.index);
                std::fs::remove_dir_all(&dir)
                    .map_err(|error| weir_storage::StorageError::io(&dir, error))?;
                partition.mark_deleted();
            }
            Ok(topic.partitions.len() as u32)
        })
    }

    /// Applies retention to every partition.
    pub fn apply_retention(&self) {
        for topic in self.all() {
            for partition in &topic.partitions {
                if let Err(error) = partition.log.apply_retention(None) {
                    tracing::warn!(topic = topic.name, partition = partition.index, %error, "retention failed");
                }
            }
        }
    }

    /// Expires producers idle for `producer_idle_ms`, then writes every
    /// partition's producer snapshot. Blocking: call it off the runtime.
    pub fn save_producer_states(&self, producer_idle_ms: i64) {
        // Not while a topic is created or deleted: a snapshot must not land
        // in a directory being removed (or in its successor's).
        let _changes = self.changes.blocking_lock();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_millis() as i64);
        for topic in self.all() {
            for partition in &topic.partitions {
                partition.expire_producers(now_ms, producer_idle_ms);
            }
        }
        for topic in self.all() {
            for partition in &topic.partitions {
                if let Err(error) = partition.save_producer_state() {
                    tracing::warn!(topic = topic.name, partition = partition.index, %error, "producer snapshot failed");
                }
            }
        }
    }

    /// Closes every partition cleanly (clean-shutdown markers).
    pub fn close_all(&self) {
        for topic in self.all() {
            for partition in &topic.partitions {
                if let Err(error) = partition.log.close() {
                    tracing::error!(topic = topic.name, partition = partition.index, %error, "close failed");
                }
                if let Err(error) = partition.save_producer_state() {
                    tracing::warn!(topic = topic.name, partition = partition.index, %error, "producer snapshot failed");
                }
                partition.wake_readers();
            }
        }
    }
}
