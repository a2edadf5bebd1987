//! Finding brokers: a bootstrap list, the cluster's metadata, and one
//! connection per broker, so that each partition's requests go to its
//! leader.
//!
//! Leaders are learnt from any broker's Metadata answer and cached per
//! topic; an error that says leadership moved (`NotLeader`, a fenced or
//! unknown leader epoch) or a lost connection forgets the cached leader, and
//! the next request asks again. Against a cluster of one broker every
//! request uses the connection the client bootstrapped with, whatever
//! address the broker advertises (a single broker behind a proxy or a
//! port mapping keeps working).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use weir_protocol::message::{MetadataRequest, MetadataResponse};
use weir_protocol::{ErrorCode, Request, Response};

use crate::connection::Connection;
use crate::error::{ClientError, Result};

/// Splits a comma-separated bootstrap list (`host:port,host:port`).
pub fn bootstrap_list(addrs: &str) -> Vec<String> {
    addrs
        .split(',')
        .map(str::trim)
        .filter(|addr| !addr.is_empty())
        .map(str::to_string)
        .collect()
}

#[derive(Debug, Default)]
struct Cache {
    /// Broker addresses by id.
    brokers: HashMap<u32, String>,
    /// Per topic, each partition's leader (`None`: none now).
    leaders: HashMap<String, Vec<Option<u32>>>,
    /// The cluster has one broker: use the bootstrap connection for all.
    single: bool,
}

/// Connections to the brokers of one cluster.
#[derive(Debug)]
pub struct Router {
    bootstrap: Vec<String>,
    request_timeout: Duration,
    connections: Mutex<HashMap<String, Connection>>,
    /// The address that answered last (tried first for metadata).
    home: Mutex<String>,
    cache: Mutex<Cache>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// Retries of a metadata refresh refused at the brokers' connection limit.
pub const TOO_MANY_CONNECTIONS_RETRIES: u32 = 4;
/// The first backoff of those retries, doubled each time (0.1 + 0.2 + 0.4 +
/// 0.8 s: 1.5 s in all).
pub const TOO_MANY_CONNECTIONS_BACKOFF_MS: u64 = 100;

/// `attempt`, tried again with backoff (up to
/// [`TOO_MANY_CONNECTIONS_RETRIES`] times) while it fails with
/// `TooManyConnections`: slots free as other clients close theirs.
///
/// # Errors
/// The last attempt's error.
pub(crate) async fn retry_refused<T, F, Fut>(mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut backoff = Duration::from_millis(TOO_MANY_CONNECTIONS_BACKOFF_MS);
    for _ in 0..TOO_MANY_CONNECTIONS_RETRIES {
        match attempt().await {
            Err(ClientError::TooManyConnections { .. }) => {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            other => return other,
        }
    }
    attempt().await
}

/// Whether `error` says the partition's leader is elsewhere (or gone).
pub fn leader_moved(error: &ClientError) -> bool {
    matches!(
        error,
        ClientError::Broker(
            ErrorCode::NotLeader
                | ErrorCode::FencedLeaderEpoch
                | ErrorCode::UnknownLeaderEpoch
                | ErrorCode::UnknownTopicOrPartition
                | ErrorCode::ShuttingDown
        ) | ClientError::Closed
            | ClientError::TooManyConnections { .. }
            | ClientError::Connect { .. }
            | ClientError::Timeout
    )
}

impl Router {
    /// Connects to the first broker of `bootstrap` (comma-separated) that
    /// answers.
    ///
    /// # Errors
    /// [`ClientError::Connect`] for the last address tried when none answers.
    pub async fn connect(bootstrap: &str, request_timeout: Duration) -> Result<Router> {
        let list = bootstrap_list(bootstrap);
        let Some(first) = list.first().cloned() else {
            return Err(ClientError::InvalidArgument(
                "no broker address given".to_string(),
            ));
        };
        let router = Router {
            bootstrap: list,
            request_timeout,
            connections: Mutex::new(HashMap::new()),
            home: Mutex::new(first),
            cache: Mutex::new(Cache::default()),
        };
        router.any().await?;
        Ok(router)
    }

    /// The request timeout connections are opened with.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// A connection to `addr`, opened if there is none (or it closed).
    ///
    /// # Errors
    /// [`ClientError::Connect`].
    pub async fn connection_to(&self, addr: &str) -> Result<Connection> {
        if let Some(open) = lock(&self.connections)
            .get(addr)
            .filter(|open| !open.is_closed())
        {
            return Ok(open.clone());
        }
        let fresh = Connection::connect(addr, self.request_timeout).await?;
        lock(&self.connections).insert(addr.to_string(), fresh.clone());
        Ok(fresh)
    }

    /// A connection to any broker that answers: the last that did, then
    /// the bootstrap list, then every broker the metadata named.
    ///
    /// # Errors
    /// The last connection error when none answers.
    pub async fn any(&self) -> Result<Connection> {
        let home = lock(&self.home).clone();
        let mut candidates = vec![home];
        candidates.extend(self.bootstrap.iter().cloned());
        candidates.extend(lock(&self.cache).brokers.values().cloned());
        let mut last_error = None;
        let mut tried = std::collections::HashSet::new();
        for addr in candidates {
            if !tried.insert(addr.clone()) {
                continue;
            }
            match self.connection_to(&addr).await {
                Ok(connection) => {
                    *lock(&self.home) = addr;
                    return Ok(connection);
                }
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or(ClientError::Closed))
    }

    /// One round of [`Router::refresh`]: each broker asked once at most.
    async fn refresh_once(&self, topics: Option<Vec<String>>) -> Result<MetadataResponse> {
        let mut last_error = ClientError::Closed;
        let known = lock(&self.cache).brokers.len();
        // Each broker once at most: one that fails is dropped from `home`.
        for _ in 0..self.bootstrap.len().max(known).max(1) {
            let connection = self.any().await?;
            let request = Request::Metadata(MetadataRequest {
                topics: topics.clone(),
            });
            match connection.call(request).await {
                Ok(Response::Metadata(metadata)) => {
                    self.learn(&metadata);
                    return Ok(metadata);
                }
                Ok(other) => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected response {:?}",
                        other.api()
                    )));
                }
                Err(error) => {
                    self.forget_connection(connection.addr());
                    last_error = error;
                    self.rotate_home();
                }
            }
        }
        Err(last_error)
    }

    /// Asks a broker for `topics`' metadata and caches the leaders; retried
    /// with backoff while brokers refuse the connection at their connection
    /// limit (slots free as others close).
    ///
    /// # Errors
    /// Connection errors when no broker answers; `TooManyConnections` once
    /// the retries are spent.
    pub async fn refresh(&self, topics: Option<Vec<String>>) -> Result<MetadataResponse> {
        retry_refused(|| self.refresh_once(topics.clone())).await
    }

    fn learn(&self, metadata: &MetadataResponse) {
        let mut cache = lock(&self.cache);
        for broker in &metadata.brokers {
            cache
                .brokers
                .insert(broker.id, format!("{}:{}", broker.host, broker.port));
        }
        cache.single = metadata.brokers.len() == 1;
        for topic in &metadata.topics {
            if !topic.error.is_ok() {
                cache.leaders.remove(&topic.name);
                continue;
            }
            let count = topic
                .partitions
                .iter()
                .map(|partition| partition.partition + 1)
                .max()
                .unwrap_or(0);
            let mut leaders = vec![None; count as usize];
            for partition in &topic.partitions {
                leaders[partition.partition as usize] = u32::try_from(partition.leader).ok();
            }
            cache.leaders.insert(topic.name.clone(), leaders);
        }
    }

    fn rotate_home(&self) {
        let home = lock(&self.home).clone();
        let next = self
            .bootstrap
            .iter()
            .chain(lock(&self.cache).brokers.values())
            .find(|addr| **addr != home)
            .cloned();
        if let Some(next) = next {
            *lock(&self.home) = next;
        }
    }

    fn forget_connection(&self, addr: &str) {
        let mut connections = lock(&self.connections);
        if connections.get(addr).is_some_and(Connection::is_closed) {
            connections.remove(addr);
        }
    }

    /// The number of partitions of `topic`, from metadata.
    ///
    /// # Errors
    /// `UnknownTopic`, connection errors.
    pub async fn partition_count(&self, topic: &str) -> Result<u32> {
        if let Some(leaders) = lock(&self.cache).leaders.get(topic) {
            return Ok(leaders.len() as u32);
        }
        let metadata = self.refresh(Some(vec![topic.to_string()])).await?;
        match metadata.topics.iter().find(|entry| entry.name == topic) {
            Some(entry) if entry.error.is_ok() => Ok(entry.partitions.len() as u32),
            _ => Err(ClientError::UnknownTopic(topic.to_string())),
        }
    }

    fn cached_leader(&self, topic: &str, partition: u32) -> Option<Option<String>> {
        let cache = lock(&self.cache);
        let leader = (*cache.leaders.get(topic)?.get(partition as usize)?)?;
        if cache.single {
            return Some(None);
        }
        Some(cache.brokers.get(&leader).cloned())
    }

    /// A connection to the leader of `topic`/`partition`, asking for
    /// metadata when the leader is not known.
    ///
    /// # Errors
    /// `Broker(NotLeader)` (retriable) while the partition has no leader;
    /// connection errors.
    pub async fn leader(&self, topic: &str, partition: u32) -> Result<Connection> {
        if self.cached_leader(topic, partition).is_none() {
            self.refresh(Some(vec![topic.to_string()])).await?;
        }
        let single = lock(&self.cache).single;
        match self.cached_leader(topic, partition) {
            // One broker: the connection the client already has.
            Some(None) if single => self.any().await,
            Some(Some(addr)) => match self.connection_to(&addr).await {
                Ok(connection) => Ok(connection),
                Err(error) => {
                    self.forget_leader(topic, partition);
                    Err(error)
                }
            },
            _ => Err(ClientError::Broker(ErrorCode::NotLeader)),
        }
    }

    /// Whether the cluster has one broker (asking for metadata if none
    /// was learnt yet).
    ///
    /// # Errors
    /// Connection errors when no broker answers.
    pub async fn is_single(&self) -> Result<bool> {
        if lock(&self.cache).brokers.is_empty() {
            self.refresh(Some(Vec::new())).await?;
        }
        Ok(lock(&self.cache).single)
    }

    /// Whether the metadata last learnt has `topic`/`partition` (with or
    /// without a leader).
    pub fn knows_partition(&self, topic: &str, partition: u32) -> bool {
        lock(&self.cache)
            .leaders
            .get(topic)
            .is_some_and(|leaders| (partition as usize) < leaders.len())
    }

    /// Forgets the cached leader of `topic`/`partition` (after an error that
    /// says it moved), so the next [`Router::leader`] asks again.
    pub fn forget_leader(&self, topic: &str, partition: u32) {
        if let Some(leaders) = lock(&self.cache).leaders.get_mut(topic)
            && let Some(slot) = leaders.get_mut(partition as usize)
        {
            *slot = None;
        }
    }
}
