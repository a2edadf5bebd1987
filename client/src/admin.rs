//! `Admin`: topics and offsets.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use weir_protocol::message::*;
use weir_protocol::{ErrorCode, Request, Response};

use crate::connection::Connection;
use crate::error::{ClientError, Result};

/// Administrative calls against one broker.
///
/// ```no_run
/// # async fn demo() -> Result<(), weir_client::ClientError> {
/// let admin = weir_client::Admin::connect("127.0.0.1:9092").await?;
/// admin.create_topic("orders", 3).await?;
/// for topic in admin.list_topics().await? {
///     println!("{} has {} partitions", topic.name, topic.partitions.len());
/// }
/// # Ok(()) }
/// ```
///
/// A connection the broker closed (a restart, say) is opened again on the
/// next call.
#[derive(Debug, Clone)]
pub struct Admin {
    /// Shared by clones: a connection one of them reopened serves the others.
    connection: Arc<Mutex<Connection>>,
}

/// How long an admin call (and a reconnect) may take.
pub const ADMIN_REQUEST_TIMEOUT_MS: u64 = 30_000;

fn unexpected(response: &Response) -> ClientError {
    ClientError::Protocol(format!("unexpected response {:?}", response.api()))
}

fn check(error: ErrorCode) -> Result<()> {
    if error.is_ok() {
        Ok(())
    } else {
        Err(ClientError::Broker(error))
    }
}

impl Admin {
    /// Connects to a broker: `addr` is one `host:port` or several,
    /// comma-separated, tried in order until one answers (any broker of a
    /// cluster answers admin calls; topic changes go through the
    /// controller).
    ///
    /// # Errors
    /// [`ClientError::Connect`] for the last address when none answers.
    pub async fn connect(addr: &str) -> Result<Admin> {
        let mut last_error = ClientError::InvalidArgument("no broker address given".into());
        for candidate in crate::router::bootstrap_list(addr) {
            match Connection::connect(&candidate, Duration::from_millis(ADMIN_REQUEST_TIMEOUT_MS))
                .await
            {
                Ok(connection) => return Ok(Admin::with_connection(connection)),
                Err(error) => last_error = error,
            }
        }
        Err(last_error)
    }

    /// Uses an existing connection.
    pub fn with_connection(connection: Connection) -> Admin {
        Admin {
            connection: Arc::new(Mutex::new(connection)),
        }
    }

    /// The connection, opened again (one attempt) if the broker closed it.
    async fn connection(&self) -> Result<Connection> {
        let current = self
            .connection
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone();
        if !current.is_closed() {
            return Ok(current);
        }
        let fresh = current.reopen().await?;
        *self
            .connection
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = fresh.clone();
        Ok(fresh)
    }

    /// `request` on the admin connection, retried with backoff while the
    /// broker refuses the connection at its connection limit.
    async fn call(&self, request: Request) -> Result<Response> {
        crate::router::retry_refused(|| {
            let request = request.clone();
            async move { self.connection().await?.call(request).await }
        })
        .await
    }

    /// Creates a topic with `partitions` partitions and the cluster's
    /// default replication factor (3, or fewer brokers if there are fewer).
    ///
    /// # Errors
    /// `Broker(TopicAlreadyExists)`, `Broker(InvalidTopic)`, connection errors.
    pub async fn create_topic(&self, name: &str, partitions: u32) -> Result<()> {
        self.create_topic_replicated(name, partitions, 0).await
    }

    /// Creates a topic with `partitions` partitions of `replication_factor`
    /// copies each (0: the cluster's default).
    ///
    /// # Errors
    /// As [`Admin::create_topic`]; `Broker(InvalidRequest)` for more
    /// replicas than brokers.
    pub async fn create_topic_replicated(
        &self,
        name: &str,
        partitions: u32,
        replication_factor: u16,
    ) -> Result<()> {
        let request = Request::CreateTopics(CreateTopicsRequest {
            topics: vec![NewTopic {
                name: name.to_string(),
                partitions,
                replication_factor,
                configs: Vec::new(),
            }],
            timeout_ms: 30_000,
        });
        match self.call(request).await? {
            Response::CreateTopics(response) => response
                .topics
                .first()
                .map_or(Ok(()), |topic| check(topic.error)),
            other => Err(unexpected(&other)),
        }
    }

    /// Deletes a topic and its data.
    ///
    /// # Errors
    /// `UnknownTopic`, connection errors.
    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        let request = Request::DeleteTopics(DeleteTopicsRequest {
            names: vec![name.to_string()],
            timeout_ms: 30_000,
        });
        match self.call(request).await? {
            Response::DeleteTopics(response) => {
                match response.topics.first().map(|topic| topic.error) {
                    Some(ErrorCode::UnknownTopicOrPartition) => {
                        Err(ClientError::UnknownTopic(name.to_string()))
                    }
                    Some(error) => check(error),
                    None => Ok(()),
                }
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Every topic with its partitions.
    ///
    /// # Errors
    /// Connection errors.
    pub async fn list_topics(&self) -> Result<Vec<TopicMetadata>> {
        Ok(self.metadata(None).await?.topics)
    }

    /// Cluster and topic metadata (`None`: all topics).
    ///
    /// # Errors
    /// Connection errors.
    pub async fn metadata(&self, topics: Option<Vec<String>>) -> Result<MetadataResponse> {
        match self
            .call(Request::Metadata(MetadataRequest { topics }))
            .await?
        {
            Response::Metadata(response) => Ok(response),
            other => Err(unexpected(&other)),
        }
    }

    /// Offsets, sizes and configs of one topic.
    ///
    /// # Errors
    /// `UnknownTopic`, connection errors.
    pub async fn describe_topic(&self, name: &str) -> Result<TopicDescription> {
        let request = Request::DescribeTopics(DescribeTopicsRequest {
            names: vec![name.to_string()],
        });
        match self.call(request).await? {
            Response::DescribeTopics(mut response) if !response.topics.is_empty() => {
                let topic = response.topics.remove(0);
                match topic.error {
                    ErrorCode::UnknownTopicOrPartition => {
                        Err(ClientError::UnknownTopic(name.to_string()))
                    }
                    error => check(error).map(|()| topic),
                }
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Starts moving a partition to `replicas` (broker ids, the preferred
    /// leader first). The new replicas catch up and join the in-sync set,
    /// then the controller drops the old ones; Metadata shows the progress
    /// ([`Admin::wait_for_replicas`] waits for the end).
    ///
    /// # Errors
    /// `UnknownTopic`, `Broker(InvalidRequest)` with the broker's reason in
    /// the log (an unknown broker, a move already under way), connection
    /// errors.
    pub async fn reassign_partition(
        &self,
        topic: &str,
        partition: u32,
        replicas: &[u32],
    ) -> Result<()> {
        let request = Request::ReassignPartition(ReassignPartitionRequest {
            topic: topic.to_string(),
            partition,
            replicas: replicas.to_vec(),
        });
        match self.call(request).await? {
            Response::ReassignPartition(response) => match response.error {
                ErrorCode::None => Ok(()),
                ErrorCode::UnknownTopicOrPartition => {
                    Err(ClientError::UnknownTopic(topic.to_string()))
                }
                ErrorCode::InvalidRequest => Err(ClientError::InvalidArgument(response.message)),
                error => Err(ClientError::Broker(error)),
            },
            other => Err(unexpected(&other)),
        }
    }

    /// Waits until `topic`/`partition` lives on exactly `replicas`, all in
    /// sync, for at most `timeout`.
    ///
    /// # Errors
    /// `Timeout` when it does not within `timeout`; connection errors.
    pub async fn wait_for_replicas(
        &self,
        topic: &str,
        partition: u32,
        replicas: &[u32],
        timeout: Duration,
    ) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut wanted = replicas.to_vec();
        wanted.sort_unstable();
        loop {
            let metadata = self.metadata(Some(vec![topic.to_string()])).await?;
            let done = metadata
                .topics
                .first()
                .and_then(|found| {
                    found
                        .partitions
                        .iter()
                        .find(|state| state.partition == partition)
                })
                .is_some_and(|state| {
                    let mut now = state.replicas.clone();
                    now.sort_unstable();
                    let mut in_sync = state.in_sync_replicas.clone();
                    in_sync.sort_unstable();
                    now == wanted && in_sync == wanted && state.leader >= 0
                });
            if done {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ClientError::Timeout);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The offset for `spec` (earliest -2, latest -1, or a timestamp in ms).
    ///
    /// # Errors
    /// Broker errors, connection errors.
    pub async fn list_offset(&self, topic: &str, partition: u32, spec: i64) -> Result<u64> {
        let request = Request::ListOffsets(ListOffsetsRequest {
            partitions: vec![ListOffsetsPartition {
                topic: topic.to_string(),
                partition,
                spec,
            }],
        });
        match self.call(request).await? {
            Response::ListOffsets(mut response) if !response.partitions.is_empty() => {
                let answer = response.partitions.remove(0);
                check(answer.error)?;
                u64::try_from(answer.offset)
                    .map_err(|_| ClientError::Protocol("negative offset".into()))
            }
            other => Err(unexpected(&other)),
        }
    }

    /// The offset `start` names in a partition: itself, or looked up
    /// (earliest, latest, first at or after a timestamp).
    ///
    /// # Errors
    /// `UnknownTopic`, other broker errors, connection errors.
    pub async fn resolve_offset(
        &self,
        topic: &str,
        partition: u32,
        start: crate::Offset,
    ) -> Result<u64> {
        let spec = match start {
            crate::Offset::At(offset) => return Ok(offset),
            crate::Offset::Earliest => OFFSET_SPEC_EARLIEST,
            crate::Offset::Latest => OFFSET_SPEC_LATEST,
            crate::Offset::Timestamp(timestamp) => timestamp.max(0),
        };
        self.list_offset(topic, partition, spec)
            .await
            .map_err(|error| match error {
                ClientError::Broker(ErrorCode::UnknownTopicOrPartition) => {
                    ClientError::UnknownTopic(topic.to_string())
                }
                other => other,
            })
    }

    /// The partition count of a topic.
    ///
    /// # Errors
    /// `UnknownTopic`, connection errors.
    pub async fn partition_count(&self, topic: &str) -> Result<u32> {
        let metadata = self.metadata(Some(vec![topic.to_string()])).await?;
        match metadata.topics.first() {
            Some(found) if found.error.is_ok() => Ok(found.partitions.len() as u32),
            _ => Err(ClientError::UnknownTopic(topic.to_string())),
        }
    }

    /// Every group of the cluster (each broker lists those it
    /// coordinates).
    ///
    /// # Errors
    /// Connection errors.
    pub async fn list_groups(&self) -> Result<Vec<GroupListing>> {
        let brokers = self.broker_addrs().await?;
        let connection = self.connection().await?;
        let mut all: Vec<GroupListing> = Vec::new();
        for addr in brokers {
            let broker = match &addr {
                None => connection.clone(),
                Some(addr) => {
                    Connection::connect(addr, Duration::from_millis(ADMIN_REQUEST_TIMEOUT_MS))
                        .await?
                }
            };
            match broker
                .call(Request::ListGroups(ListGroupsRequest {}))
                .await?
            {
                Response::ListGroups(response) => all.extend(response.groups),
                other => return Err(unexpected(&other)),
            }
        }
        all.sort_by(|a, b| a.group.cmp(&b.group));
        all.dedup_by(|a, b| a.group == b.group);
        Ok(all)
    }

    /// The brokers of the cluster: `None` for the one the admin connection
    /// reaches when it is the only one, else each broker's address.
    async fn broker_addrs(&self) -> Result<Vec<Option<String>>> {
        let metadata = match self
            .call(Request::Metadata(MetadataRequest {
                topics: Some(Vec::new()),
            }))
            .await?
        {
            Response::Metadata(metadata) => metadata,
            other => return Err(unexpected(&other)),
        };
        if metadata.brokers.len() <= 1 {
            return Ok(vec![None]);
        }
        Ok(metadata
            .brokers
            .iter()
            .map(|broker| Some(format!("{}:{}", broker.host, broker.port)))
            .collect())
    }

    /// A connection to `group`'s coordinator.
    async fn coordinator(&self, group: &str) -> Result<Connection> {
        match self
            .call(Request::FindCoordinator(FindCoordinatorRequest {
                group: group.to_string(),
            }))
            .await?
        {
            Response::FindCoordinator(found) => {
                check(found.error)?;
                if self.broker_addrs().await? == [None] {
                    return self.connection().await;
                }
                Connection::connect(
                    &format!("{}:{}", found.host, found.port),
                    Duration::from_millis(ADMIN_REQUEST_TIMEOUT_MS),
                )
                .await
            }
            other => Err(unexpected(&other)),
        }
    }

    /// `call` at `group`'s coordinator, found again while it moves (for up
    /// to [`ADMIN_REQUEST_TIMEOUT_MS`]).
    async fn at_coordinator<T, F, Fut>(&self, group: &str, call: F) -> Result<T>
    where
        F: Fn(Connection) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(ADMIN_REQUEST_TIMEOUT_MS);
        let mut backoff = Duration::from_millis(50);
        loop {
            let outcome = match self.coordinator(group).await {
                Ok(coordinator) => call(coordinator).await,
                Err(error) => Err(error),
            };
            match outcome {
                Err(error)
                    if crate::group::coordinator_moved(&error)
                        && tokio::time::Instant::now() + backoff < deadline =>
                {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(1_000));
                }
                outcome => return outcome,
            }
        }
    }

    /// A group's state, members, assignment, committed offsets and lag.
    ///
    /// # Errors
    /// `Broker(UnknownGroup)`, connection errors.
    pub async fn describe_group(&self, group: &str) -> Result<DescribeGroupResponse> {
        self.at_coordinator(group, |coordinator| async move {
            match coordinator
                .call(Request::DescribeGroup(DescribeGroupRequest {
                    group: group.to_string(),
                }))
                .await?
            {
                Response::DescribeGroup(response) => {
                    check(response.error)?;
                    Ok(response)
                }
                other => Err(unexpected(&other)),
            }
        })
        .await
    }

    /// A group's committed offsets (topic, partition, offset).
    ///
    /// # Errors
    /// Connection errors.
    pub async fn group_offsets(&self, group: &str) -> Result<Vec<(String, u32, i64)>> {
        self.at_coordinator(group, |coordinator| async move {
            crate::group::fetch_offsets(&coordinator, group, None).await
        })
        .await
    }

    /// Sets a group's committed offsets (topic, partition, next offset to
    /// consume), all or none. Only for a group without members.
    ///
    /// # Errors
    /// `Broker(GroupNotEmpty)` while members consume it,
    /// `Broker(UnknownTopicOrPartition)`, connection errors.
    pub async fn set_group_offsets(
        &self,
        group: &str,
        offsets: &[(String, u32, u64)],
    ) -> Result<()> {
        self.at_coordinator(group, |coordinator| async move {
            crate::group::commit_offsets(&coordinator, group, None, offsets).await
        })
        .await
    }
}
