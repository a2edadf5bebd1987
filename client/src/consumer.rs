//! `Consumer`: assigned partitions, read through push subscriptions with
//! credit-based flow control, read with `next`, `next_batch` or as a
//! `Stream` of records (`into_stream`).
//!
//! Memory is bounded by credit: each partition's subscription starts with
//! `credit_bytes` and the consumer grants more only as the application takes
//! records, so a slow application makes the broker stop pushing instead of
//! making anything grow.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use weir_protocol::message::*;
use weir_protocol::{Batches, Compression, ErrorCode, Record, Request, Response};

use crate::connection::Connection;
use crate::error::{ClientError, Result};
use crate::group::{GroupConfig, RebalanceListener};
use crate::producer::decompress;
use crate::router::Router;

/// Consumer settings.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Bytes each partition may have pushed but not yet taken. Default 4 MiB.
    pub credit_bytes: u32,
    /// How long one call may take. Default 30 s.
    pub request_timeout_ms: u64,
    /// How long the consumer keeps trying to reconnect after the broker
    /// connection is lost (a broker restart, say) before it reports the
    /// loss, drops what it owned and leaves its group. Reading resumes where
    /// the application left off. [`Consumer::next`] and
    /// [`Consumer::next_batch`] reconnect, and so do `assign`, `seek`,
    /// `subscribe` and the synchronous commits, which may therefore wait
    /// this long. 0: one attempt. Default 120 s.
    pub reconnect_timeout_ms: u64,
    /// First pause between reconnect attempts, doubled after each failure
    /// up to [`RECONNECT_BACKOFF_MS_MAX`]. Default 100 ms.
    pub reconnect_backoff_ms: u64,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            credit_bytes: 4 << 20,
            request_timeout_ms: 30_000,
            reconnect_timeout_ms: 120_000,
            reconnect_backoff_ms: 100,
        }
    }
}

/// Longest pause between a consumer's reconnect attempts.
pub const RECONNECT_BACKOFF_MS_MAX: u64 = 2_000;

/// Least time a reconnect attempt gets to connect and be answered, even
/// when the reconnect timeout is (nearly) spent: the last attempt may end
/// this much after it.
pub const RECONNECT_ATTEMPT_MS_MIN: u64 = 1_000;

/// A connection lost again within this long of a reconnect continues that
/// reconnect (its clock and backoff), so that a broker that accepts and
/// then drops the consumer is not hammered; a connection that lived longer
/// was a success, and the next loss starts afresh.
const RECONNECT_STABLE_MS: u64 = RECONNECT_BACKOFF_MS_MAX;

/// A reconnect under way, kept in the consumer so that a caller who
/// abandons `next()` (a timeout around it) neither restarts its clock nor
/// skips its pauses.
#[derive(Debug)]
struct Reconnecting {
    /// When the loss was first noticed.
    since: tokio::time::Instant,
    /// The pause after the next attempt.
    backoff: Duration,
    /// No attempt before this.
    next_attempt_at: tokio::time::Instant,
    /// Attempts begun (an abandoned one counts).
    attempts: u32,
    /// Why the last attempt failed.
    last_error: Option<ClientError>,
    /// When the consumer was last fully reconnected (it may be lost again).
    connected_at: Option<tokio::time::Instant>,
}

/// Where to start reading a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offset {
    /// The first stored record.
    Earliest,
    /// Only records produced from now on.
    Latest,
    /// This offset.
    At(u64),
    /// The first record at or after this timestamp (ms).
    Timestamp(i64),
}

/// One record read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerRecord {
    /// Topic (shared by every record of the partition: no allocation per record).
    pub topic: std::sync::Arc<str>,
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
    /// Timestamp, ms.
    pub timestamp_ms: i64,
    /// Key.
    pub key: Option<Bytes>,
    /// Value.
    pub value: Option<Bytes>,
    /// Headers.
    pub headers: Vec<(String, Option<Bytes>)>,
}

/// A subscription being opened: unless disarmed (it opened), dropping it
/// forgets the route and asks the broker to drop the subscription, which
/// may exist even if its answer never came (a timeout, or a call cut short
/// by the caller), so none is left pushing data nobody reads.
struct OpeningSubscription {
    connection: Connection,
    subscription_id: u32,
    armed: bool,
}

impl Drop for OpeningSubscription {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.connection.forget_pushes(self.subscription_id);
        if self.connection.is_closed() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (connection, subscription_id) = (self.connection.clone(), self.subscription_id);
            runtime.spawn(async move {
                let _ = connection
                    .call(Request::Unsubscribe(UnsubscribeRequest { subscription_id }))
                    .await;
            });
        }
    }
}

struct Assignment {
    /// The connection its subscription lives on: the partition's leader
    /// when it was subscribed.
    connection: Connection,
    topic: String,
    /// The same name, shared with every record handed out.
    shared_topic: std::sync::Arc<str>,
    partition: u32,
    subscription_id: u32,
    pushes: mpsc::Receiver<SubscriptionPush>,
    /// Next offset the application should see.
    position: u64,
    /// Records of `chunk` being handed out one by one.
    records: VecDeque<ConsumerRecord>,
    /// The subscription died with an earlier connection and was not
    /// reopened (a group member's, until its rejoin): nothing to poll or
    /// unsubscribe, and its id may belong to another subscription now.
    stale: bool,
    /// The partition's leadership moved (or its leader's connection
    /// closed) while the consumer still owns it: resubscribed at the new
    /// leader from where the application left off, group member or not.
    moved: bool,
    /// The chunk `records` came from, handed back whole (from `position`)
    /// if the application switches to [`Consumer::next_batch`].
    chunk: Option<ConsumerBatch>,
    /// Bytes taken since the last credit grant.
    taken_bytes: u32,
}

impl Assignment {
    /// Where a new subscription must start so that the application sees
    /// every offset once: after the chunk still being handed out record by
    /// record, else at the position.
    fn resume_offset(&self) -> u64 {
        match &self.chunk {
            Some(chunk) if !self.records.is_empty() => chunk.next_offset,
            _ => self.position,
        }
    }

    /// The next record decoded from `chunk`, advancing the position; the
    /// chunk is let go with its last record.
    fn take_record(&mut self) -> Option<ConsumerRecord> {
        let record = self.records.pop_front()?;
        self.position = record.offset + 1;
        if self.records.is_empty() {
            self.chunk = None;
        }
        Some(record)
    }
}

/// Records of one partition as they arrived, checked (framing, CRC) and
/// decompressed but not decoded record by record: the way to read at the
/// rate the network delivers. [`ConsumerBatch::records`] walks them without
/// allocating.
#[derive(Debug, Clone)]
pub struct ConsumerBatch {
    topic: std::sync::Arc<str>,
    partition: u32,
    /// Whole RecordBatches as the broker sent them.
    bytes: Bytes,
    /// Decompressed records sections of the compressed batches, in order.
    decompressed: Vec<Bytes>,
    /// Records before this offset were already delivered: skipped.
    start_offset: u64,
    /// The offset after the last batch.
    next_offset: u64,
}

impl ConsumerBatch {
    /// Checks `bytes` and decompresses what needs it.
    fn new(
        topic: std::sync::Arc<str>,
        partition: u32,
        bytes: Bytes,
        start_offset: u64,
    ) -> Result<ConsumerBatch> {
        let mut decompressed = Vec::new();
        let mut next_offset = start_offset;
        for batch in Batches::new(&bytes, true) {
            // Errors name the batch: where the application can skip to.
            let batch = batch.map_err(|error| {
                ClientError::Protocol(format!("the batch at offset {next_offset}: {error}"))
            })?;
            if batch.compression() != Compression::None {
                let records =
                    decompress(batch.compression(), batch.records_bytes()).map_err(|error| {
                        ClientError::Protocol(format!(
                            "the batch at offset {}: {error}",
                            batch.base_offset()
                        ))
                    })?;
                decompressed.push(Bytes::from(records));
            }
            next_offset = next_offset.max(batch.next_offset());
        }
        Ok(ConsumerBatch {
            topic,
            partition,
            bytes,
            decompressed,
            start_offset,
            next_offset,
        })
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The partition.
    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// The offset after the last record: where the partition continues.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// The RecordBatch bytes as stored (the first batch may begin before
    /// the consumer's position; [`ConsumerBatch::records`] skips those).
    pub fn raw_bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Each record, borrowed from the batch, in offset order.
    pub fn records(&self) -> impl Iterator<Item = Result<Record<'_>>> + '_ {
        let mut compressed_index = 0;
        Batches::new(&self.bytes, false)
            .filter_map(Result::ok)
            .flat_map(move |batch| {
                let section: &[u8] = if batch.compression() == Compression::None {
                    batch.records_bytes()
                } else {
                    let section = self
                        .decompressed
                        .get(compressed_index)
                        .map_or(&[][..], |bytes| &bytes[..]);
                    compressed_index += 1;
                    section
                };
                batch.records_from(section)
            })
            .map(|record| record.map_err(|error| ClientError::Protocol(error.to_string())))
            .filter(move |record| {
                record
                    .as_ref()
                    .map_or(true, |record| record.offset >= self.start_offset)
            })
    }

    /// Owned records, as [`Consumer::next`] hands them out.
    fn to_records(&self, out: &mut VecDeque<ConsumerRecord>) -> Result<()> {
        let mut compressed_index = 0;
        for batch in Batches::new(&self.bytes, false) {
            let batch = batch.map_err(|error| ClientError::Protocol(error.to_string()))?;
            let owner = if batch.compression() == Compression::None {
                self.bytes.clone()
            } else {
                let owner = self
                    .decompressed
                    .get(compressed_index)
                    .cloned()
                    .unwrap_or_default();
                compressed_index += 1;
                owner
            };
            let section = if batch.compression() == Compression::None {
                batch.records_bytes()
            } else {
                &owner[..]
            };
            for record in batch.records_from(section) {
                let record = record.map_err(|error| ClientError::Protocol(error.to_string()))?;
                if record.offset < self.start_offset {
                    continue;
                }
                let slice = |part: Option<&[u8]>| part.map(|part| owner.slice_ref(part));
                out.push_back(ConsumerRecord {
                    topic: self.topic.clone(),
                    partition: self.partition,
                    offset: record.offset,
                    timestamp_ms: record.timestamp_ms,
                    key: slice(record.key),
                    value: slice(record.value),
                    headers: record
                        .headers()
                        .filter_map(|header| header.ok())
                        .map(|header| (header.key.to_string(), slice(header.value)))
                        .collect(),
                });
            }
        }
        Ok(())
    }
}

/// Reads assigned partitions.
///
/// ```no_run
/// # async fn demo() -> Result<(), weir_client::ClientError> {
/// use weir_client::{Consumer, ConsumerConfig, Offset};
/// let mut consumer = Consumer::connect("127.0.0.1:9092", ConsumerConfig::default()).await?;
/// consumer.assign("orders", 0, Offset::Earliest).await?;
/// while let Some(record) = consumer.next().await {
///     let record = record?;
///     println!("{}@{}: {:?}", record.partition, record.offset, record.value);
/// }
/// # Ok(()) }
/// ```
pub struct Consumer {
    /// Finds each partition's leader.
    router: std::sync::Arc<Router>,
    /// The connection for everything that is not a partition's: the
    /// group's calls, metadata.
    connection: Connection,
    config: ConsumerConfig,
    assignments: Vec<Assignment>,
    next_assignment: usize,
    /// Set by [`Consumer::subscribe`].
    group: Option<crate::group::Membership>,
    /// Set when a subscription's pushes ended with the connection: the
    /// assignments keep their positions for [`Consumer::reconnect`].
    connection_lost: bool,
    /// Hand-assigned partitions are `stale` on a new connection and still
    /// to be resubscribed (a reconnect was cut short).
    resubscribe_pending: bool,
    /// While reconnecting (see [`Reconnecting`]).
    reconnecting: Option<Reconnecting>,
    /// Partitions a reconnect had to drop, reported by the next `next()`
    /// or `next_batch()`.
    deferred_error: Option<ClientError>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("assignments", &self.assignments.len())
            .finish()
    }
}

impl Consumer {
    /// Connects to a broker of `addr`, a comma-separated bootstrap list;
    /// each partition is then read from its leader, wherever it moves.
    ///
    /// # Errors
    /// [`ClientError::Connect`].
    pub async fn connect(addr: &str, config: ConsumerConfig) -> Result<Consumer> {
        let router =
            Router::connect(addr, Duration::from_millis(config.request_timeout_ms)).await?;
        let connection = router.any().await?;
        Ok(Consumer {
            router: std::sync::Arc::new(router),
            connection,
            config,
            assignments: Vec::new(),
            next_assignment: 0,
            group: None,
            connection_lost: false,
            resubscribe_pending: false,
            reconnecting: None,
            deferred_error: None,
        })
    }

    /// A connection to the leader of `topic`/`partition`.
    ///
    /// # Errors
    /// `UnknownTopic` when the cluster's metadata has no such partition;
    /// retriable errors ([`crate::router::leader_moved`]) while it has no
    /// leader or the leader cannot be reached.
    async fn leader(&self, topic: &str, partition: u32) -> Result<Connection> {
        match self.router.leader(topic, partition).await {
            Err(ClientError::Broker(ErrorCode::NotLeader))
                if !self.router.knows_partition(topic, partition) =>
            {
                Err(ClientError::UnknownTopic(topic.to_string()))
            }
            other => other,
        }
    }

    /// Resolves `start` at the partition's leader and subscribes there:
    /// the connection, the offset, the subscription and its pushes. While
    /// leadership is moving it asks again, at the reconnect backoff, for up
    /// to `reconnect_timeout_ms`.
    async fn subscribe_at_leader(
        &self,
        topic: &str,
        partition: u32,
        start: Offset,
    ) -> Result<(Connection, u64, u32, mpsc::Receiver<SubscriptionPush>)> {
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.config.reconnect_timeout_ms);
        let mut backoff = Duration::from_millis(self.config.reconnect_backoff_ms.max(1));
        loop {
            let attempt = async {
                let connection = self.leader(topic, partition).await?;
                let offset = crate::Admin::with_connection(connection.clone())
                    .resolve_offset(topic, partition, start)
                    .await?;
                let (subscription_id, pushes) = self
                    .open_subscription(&connection, topic, partition, offset)
                    .await?;
                Ok((connection, offset, subscription_id, pushes))
            };
            match attempt.await {
                Err(error)
                    if crate::router::leader_moved(&error)
                        && tokio::time::Instant::now() + backoff < deadline =>
                {
                    tracing::debug!(%error, topic, partition, "leader moving; asking again");
                    self.router.forget_leader(topic, partition);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(RECONNECT_BACKOFF_MS_MAX));
                }
                // The metadata has the partition but its leader does not
                // hold it yet (a topic created a moment ago reaches its
                // leaders a moment later): ask again. A topic that is
                // really gone leaves the metadata, and the next attempt
                // says so.
                Err(ClientError::UnknownTopic(_))
                    if self.router.knows_partition(topic, partition)
                        && tokio::time::Instant::now() + backoff < deadline =>
                {
                    self.router.forget_leader(topic, partition);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(RECONNECT_BACKOFF_MS_MAX));
                }
                Err(ClientError::Broker(ErrorCode::UnknownTopicOrPartition)) => {
                    return Err(ClientError::UnknownTopic(topic.to_string()));
                }
                other => return other,
            }
        }
    }

    /// Starts reading `topic`/`partition` from `start` (replacing an
    /// earlier assignment of the same partition: a seek).
    ///
    /// # Errors
    /// `UnknownTopic`, `Broker(OffsetOutOfRange)`, connection errors.
    pub async fn assign(&mut self, topic: &str, partition: u32, start: Offset) -> Result<()> {
        self.ensure_connected().await?;
        self.assign_now(topic, partition, start).await
    }

    /// Subscribes to `topic`/`partition` from `offset` on `connection`:
    /// (subscription id, where its pushes arrive).
    async fn open_subscription(
        &self,
        connection: &Connection,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<(u32, mpsc::Receiver<SubscriptionPush>)> {
        let subscription_id = connection.next_id();
        // Every push carries at least one batch header's worth of credit,
        // plus one batch of overshoot per push: this many always fit.
        let capacity =
            self.config.credit_bytes as usize / weir_protocol::batch::BATCH_HEADER_BYTES + 16;
        let pushes = connection.route_pushes(subscription_id, capacity);
        let mut opening = OpeningSubscription {
            connection: connection.clone(),
            subscription_id,
            armed: true,
        };
        let response = connection
            .call(Request::Subscribe(SubscribeRequest {
                subscription_id,
                topic: topic.to_string(),
                partition,
                offset,
                credit_bytes: self.config.credit_bytes,
            }))
            .await?;
        let Response::Subscribe(response) = response else {
            return Err(ClientError::Protocol(format!(
                "unexpected {:?}",
                response.api()
            )));
        };
        match response.error {
            ErrorCode::None => {
                opening.armed = false;
                Ok((subscription_id, pushes))
            }
            ErrorCode::UnknownTopicOrPartition => Err(ClientError::UnknownTopic(topic.to_string())),
            error => Err(ClientError::Broker(error)),
        }
    }

    /// After the connection was lost: connects again and resubscribes every
    /// hand-assigned partition where the application left off, so that it
    /// sees each offset once. A group member instead heartbeats on the new
    /// connection and rejoins; its partitions restart from the committed
    /// offsets, as after any rebalance (they are not resubscribed here: the
    /// rejoin decides what the member owns).
    ///
    /// One attempt per call; the caller loops while the connection is
    /// lost. Attempts are spaced by a backoff doubling from
    /// `reconnect_backoff_ms` to [`RECONNECT_BACKOFF_MS_MAX`], and once
    /// `reconnect_timeout_ms` has passed since the loss was noticed (with
    /// attempts failing, or every new connection lost again at once), every
    /// assignment and the group are dropped and the error is returned.
    ///
    /// A partition that can no longer be read (its topic deleted, or its
    /// log now ends before the position) is dropped and reported, with its
    /// position, by the next `next()`/`next_batch()`; the others go on.
    async fn reconnect(&mut self) -> Result<()> {
        let timeout = Duration::from_millis(self.config.reconnect_timeout_ms);
        let now = tokio::time::Instant::now();
        let continuing = self
            .reconnecting
            .as_ref()
            .is_some_and(|state| match state.connected_at {
                // Lost again right after reconnecting: the same reconnect.
                Some(at) => now.duration_since(at) < Duration::from_millis(RECONNECT_STABLE_MS),
                // Attempts failing, and asked again before the timeout ran out.
                None => now.duration_since(state.next_attempt_at) < timeout,
            });
        if !continuing {
            self.reconnecting = None;
        }
        let first_backoff = Duration::from_millis(self.config.reconnect_backoff_ms.max(1));
        let state = self.reconnecting.get_or_insert(Reconnecting {
            since: now,
            backoff: first_backoff,
            next_attempt_at: now,
            attempts: 0,
            last_error: None,
            connected_at: None,
        });
        state.connected_at = None;
        if state.attempts > 0 && now >= state.since + timeout {
            let error = state
                .last_error
                .take()
                .unwrap_or_else(|| ClientError::Connect {
                    addr: self.connection.addr().to_string(),
                    message: format!(
                        "no lasting connection within {} ms",
                        self.config.reconnect_timeout_ms
                    ),
                });
            self.give_up_connection();
            return Err(error);
        }
        // An abandoned wait leaves everything as it was.
        tokio::time::sleep_until(state.next_attempt_at).await;
        // Book the attempt before making it, so that one abandoned midway
        // still counts and still spaces the next.
        let now = tokio::time::Instant::now();
        state.attempts += 1;
        state.next_attempt_at = now + state.backoff;
        state.backoff = (state.backoff * 2).min(Duration::from_millis(RECONNECT_BACKOFF_MS_MAX));
        // Connecting and the Handshake get what is left of the timeout (at
        // least RECONNECT_ATTEMPT_MS_MIN), not a request timeout each.
        let left = (state.since + timeout).saturating_duration_since(now);
        let budget = Duration::from_millis(self.config.request_timeout_ms)
            .min(left.max(Duration::from_millis(RECONNECT_ATTEMPT_MS_MIN)));
        let attempt = self.reconnect_once(budget).await;
        let Some(state) = self.reconnecting.as_mut() else {
            return attempt;
        };
        match attempt {
            Ok(()) => {
                state.connected_at = Some(tokio::time::Instant::now());
                state.last_error = None;
                Ok(())
            }
            Err(error) => {
                if state.next_attempt_at >= state.since + timeout {
                    self.give_up_connection();
                    return Err(error);
                }
                tracing::debug!(%error, addr = self.connection.addr(), "consumer reconnect failed; retrying");
                state.last_error = Some(error);
                Ok(())
            }
        }
    }

    /// The broker stayed away: nothing is owned any more.
    fn give_up_connection(&mut self) {
        self.reconnecting = None;
        self.connection_lost = false;
        self.resubscribe_pending = false;
        self.assignments.clear();
        self.next_assignment = 0;
        self.group = None;
    }

    /// One reconnect attempt: a new connection that has answered a request
    /// (unless the current one is alive and only resubscriptions are left),
    /// then the resubscriptions, each of which clears its partition's
    /// `stale` mark, so that an attempt cut short resumes where it stopped.
    async fn reconnect_once(&mut self, budget: Duration) -> Result<()> {
        if self.connection_lost || self.connection.is_closed() || self.coordinator_lost() {
            let addr = self.connection.addr().to_string();
            let started = tokio::time::Instant::now();
            // A group member's calls go to its coordinator, wherever it is
            // now; otherwise the same broker if it answers, else any other.
            let router = self.router.clone();
            let group = self.group.as_ref().map(|group| group.group.clone());
            let found = async move {
                match group {
                    Some(group) => crate::group::find_coordinator(&router, &group).await,
                    None => router.any().await,
                }
            };
            let connection =
                tokio::time::timeout(budget, found)
                    .await
                    .map_err(|_| ClientError::Connect {
                        addr: addr.clone(),
                        message: format!("no answer within {} ms", budget.as_millis()),
                    })??;
            // A broker that accepts and then closes (out of connection
            // slots, or restarting) must not count as reconnected.
            let handshake = connection
                .start_call(Request::Handshake(HandshakeRequest {
                    client_name: "weir-client consumer".to_string(),
                    api_versions: Vec::new(),
                }))
                .await?
                .with_timeout(budget.saturating_sub(started.elapsed()))
                .wait()
                .await
                .map_err(|error| match error {
                    ClientError::Timeout => ClientError::Connect {
                        addr: addr.clone(),
                        message: format!("no Handshake answer within {} ms", budget.as_millis()),
                    },
                    error => error,
                })?;
            match handshake {
                Response::Handshake(response) if response.error.is_ok() => {}
                Response::Handshake(response) => {
                    return Err(ClientError::Broker(response.error));
                }
                other => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected {:?}",
                        other.api()
                    )));
                }
            }
            // From here to the marks, nothing awaits: a new connection
            // always comes with every subscription of a closed one marked
            // stale (those at other brokers' leaders read on).
            self.connection = connection;
            self.connection_lost = false;
            for assignment in &mut self.assignments {
                if assignment.connection.is_closed() {
                    assignment.stale = true;
                }
            }
            if let Some(group) = &mut self.group {
                // The rejoin decides what the member owns.
                group.reattach(self.connection.clone());
            } else {
                self.resubscribe_pending = true;
            }
        }
        for index in (0..self.assignments.len()).rev() {
            let assignment = &self.assignments[index];
            // A group member's partitions of a lost coordinator connection
            // wait for the rejoin; those whose leader moved are its still.
            if !assignment.stale || (self.group.is_some() && !assignment.moved) {
                continue;
            }
            let (topic, partition) = (assignment.topic.clone(), assignment.partition);
            let mut offset = assignment.resume_offset();
            let leader = match self.leader(&topic, partition).await {
                Ok(leader) => Ok(leader),
                Err(error) => {
                    if crate::router::leader_moved(&error) {
                        self.router.forget_leader(&topic, partition);
                    }
                    Err(error)
                }
            };
            let mut outcome = match &leader {
                Ok(leader) => {
                    self.open_subscription(leader, &topic, partition, offset)
                        .await
                }
                Err(error) => Err(error.clone()),
            };
            if matches!(
                outcome,
                Err(ClientError::Broker(ErrorCode::OffsetOutOfRange))
            ) && offset != self.assignments[index].position
            {
                // The log now ends inside the chunk being handed out (it
                // lost unsynced data in the crash): read on from the
                // position, dropping the chunk's undelivered records.
                let assignment = &mut self.assignments[index];
                assignment.records.clear();
                assignment.chunk = None;
                offset = assignment.position;
                if let Ok(leader) = &leader {
                    outcome = self
                        .open_subscription(leader, &topic, partition, offset)
                        .await;
                }
            }
            match (outcome, leader) {
                (Ok((subscription_id, pushes)), Ok(leader)) => {
                    let assignment = &mut self.assignments[index];
                    assignment.connection = leader;
                    assignment.subscription_id = subscription_id;
                    assignment.pushes = pushes;
                    assignment.stale = false;
                    assignment.moved = false;
                    // The new subscription starts with all of its credit.
                    assignment.taken_bytes = 0;
                }
                (
                    Err(
                        error @ (ClientError::UnknownTopic(_)
                        | ClientError::Broker(ErrorCode::OffsetOutOfRange)),
                    ),
                    _,
                ) => {
                    let assignment = self.assignments.remove(index);
                    self.next_assignment = 0;
                    let dropped = format!(
                        "{topic}/{partition} at offset {} ({error})",
                        assignment.position
                    );
                    self.deferred_error = Some(match self.deferred_error.take() {
                        Some(ClientError::Protocol(earlier)) => {
                            ClientError::Protocol(format!("{earlier}, {dropped}"))
                        }
                        _ => ClientError::Protocol(format!(
                            "unassigned after reconnecting: {dropped}"
                        )),
                    });
                }
                // Lost again, refused, or the leader is still moving: the
                // next attempt goes on from here (on a new connection if
                // this one closed).
                (Err(error), _) | (Ok(_), Err(error)) => {
                    if crate::router::leader_moved(&error) {
                        self.router.forget_leader(&topic, partition);
                    }
                    return Err(error);
                }
            }
        }
        self.resubscribe_pending = false;
        Ok(())
    }

    /// Seeks an assigned partition (or assigns it).
    ///
    /// # Errors
    /// As [`Consumer::assign`].
    pub async fn seek(&mut self, topic: &str, partition: u32, to: Offset) -> Result<()> {
        self.assign(topic, partition, to).await
    }

    /// Stops reading a partition. On a lost connection there is nothing to
    /// unsubscribe from: that is not an error.
    ///
    /// # Errors
    /// Connection errors other than a lost connection (a timeout, say).
    pub async fn unassign(&mut self, topic: &str, partition: u32) -> Result<()> {
        let Some(index) = self
            .assignments
            .iter()
            .position(|assignment| assignment.topic == topic && assignment.partition == partition)
        else {
            return Ok(());
        };
        let assignment = self.assignments.remove(index);
        self.next_assignment = 0;
        if assignment.stale {
            return Ok(());
        }
        let subscription_id = assignment.subscription_id;
        let connection = assignment.connection.clone();
        connection.forget_pushes(subscription_id);
        drop(assignment);
        match connection
            .call(Request::Unsubscribe(UnsubscribeRequest { subscription_id }))
            .await
        {
            Ok(_) | Err(ClientError::Closed) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Before a call of the application's: a connection found lost is
    /// opened again (resuming what is assigned), within
    /// `reconnect_timeout_ms`.
    async fn ensure_connected(&mut self) -> Result<()> {
        while self.connection_lost
            || self.resubscribe_pending
            || self.connection.is_closed()
            || self.coordinator_lost()
        {
            self.reconnect().await?;
        }
        Ok(())
    }

    /// [`Consumer::assign`] on the connection as it is (inside a rebalance,
    /// a lost connection must fail the rebalance, to be redone after the
    /// reconnect, not be reconnected under it).
    async fn assign_now(&mut self, topic: &str, partition: u32, start: Offset) -> Result<()> {
        if self.connection.is_closed() {
            // Not reopened here (resolving through `Admin` would).
            return Err(ClientError::Closed);
        }
        self.unassign(topic, partition).await?;
        if self.connection.is_closed() {
            return Err(ClientError::Closed);
        }
        let (connection, offset, subscription_id, pushes) =
            self.subscribe_at_leader(topic, partition, start).await?;
        self.assignments.push(Assignment {
            connection,
            topic: topic.to_string(),
            shared_topic: std::sync::Arc::from(topic),
            partition,
            subscription_id,
            pushes,
            position: offset,
            records: VecDeque::new(),
            stale: false,
            moved: false,
            chunk: None,
            taken_bytes: 0,
        });
        Ok(())
    }

    /// The next offset to be returned for a partition.
    pub fn position(&self, topic: &str, partition: u32) -> Option<u64> {
        self.assignments
            .iter()
            .find(|assignment| assignment.topic == topic && assignment.partition == partition)
            .map(|assignment| assignment.position)
    }

    /// The next record from any assigned partition; `None` once nothing is
    /// assigned or the connection closed.
    ///
    /// With a group ([`Consumer::subscribe`]) this also takes part in
    /// rebalances and commits automatically when configured to; it then
    /// waits (rather than ending) while no partition is assigned.
    pub async fn next(&mut self) -> Option<Result<ConsumerRecord>> {
        self.next_item(Consumer::poll_record).await
    }

    /// The next chunk of records from any assigned partition, undecoded
    /// (see [`ConsumerBatch`]); `None` once nothing is assigned or the
    /// connection closed. Records that [`Consumer::next`] already took
    /// are not repeated.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), weir_client::ClientError> {
    /// use weir_client::{Consumer, ConsumerConfig, Offset};
    /// let mut consumer = Consumer::connect("127.0.0.1:9092", ConsumerConfig::default()).await?;
    /// consumer.assign("orders", 0, Offset::Earliest).await?;
    /// while let Some(batch) = consumer.next_batch().await {
    ///     for record in batch?.records() {
    ///         let record = record?;
    ///         println!("{}: {:?}", record.offset, record.value);
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn next_batch(&mut self) -> Option<Result<ConsumerBatch>> {
        self.next_item(Consumer::poll_batch).await
    }

    async fn next_item<T>(
        &mut self,
        poll: fn(&mut Consumer, &mut Context<'_>) -> Poll<Option<Result<T>>>,
    ) -> Option<Result<T>> {
        loop {
            if let Some(error) = self.deferred_error.take() {
                return Some(Err(error));
            }
            // Listen for the heartbeat's wake before looking at anything it
            // may have changed, so that a wake in between is not missed.
            let wake = self.group.as_ref().map(|group| group.wake.clone());
            let rejoin_wanted = wake.as_ref().map(|wake| wake.notified());
            tokio::pin!(rejoin_wanted);
            if let Some(notified) = rejoin_wanted.as_mut().as_pin_mut() {
                notified.enable();
            }
            let failure = self.group.as_ref().and_then(|group| {
                group
                    .failed
                    .lock()
                    .unwrap_or_else(|poison| poison.into_inner())
                    .take()
            });
            if let Some(error) = failure {
                // Membership is over (fenced, say): report it once; the
                // consumer then has nothing assigned.
                self.group = None;
                self.assignments.clear();
                return Some(Err(error));
            }
            let owns_anything = !self.assignments.is_empty() || self.group.is_some();
            if self.connection_lost
                || self.resubscribe_pending
                || (owns_anything && self.connection.is_closed())
                || self.coordinator_lost()
            {
                if let Err(error) = self.reconnect().await {
                    return Some(Err(error));
                }
                continue;
            }
            let Some(commit_due) = self.group.as_ref().map(|group| group.commit_due_at()) else {
                match std::future::poll_fn(|context| poll(self, context)).await {
                    // Lost with the connection: reconnect (top of the loop).
                    Some(Err(ClientError::Closed))
                        if self.connection_lost || self.resubscribe_pending =>
                    {
                        continue;
                    }
                    item => return item,
                }
            };
            if let Err(error) = self.maintain_group().await {
                if crate::group::coordinator_moved(&error) {
                    self.mark_coordinator_moved();
                }
                if self.group.is_some() && (self.connection.is_closed() || self.coordinator_lost())
                {
                    // Lost during the rejoin or a commit: reconnect and
                    // rejoin again rather than end the application's loop.
                    continue;
                }
                return Some(Err(error));
            }
            let auto_commit = self
                .group
                .as_ref()
                .is_some_and(|group| group.config.auto_commit);
            let item = std::future::poll_fn(|context| match poll(self, context) {
                // No partition now: wait for the next rebalance instead.
                Poll::Ready(None) => Poll::Pending,
                other => other,
            });
            tokio::select! {
                item = item => match item {
                    Some(Err(ClientError::Closed))
                        if self.connection_lost || self.resubscribe_pending => {}
                    item => return item,
                },
                _ = std::future::poll_fn(|context| match rejoin_wanted.as_mut().as_pin_mut() {
                    Some(notified) => notified.poll(context),
                    None => Poll::Pending,
                }) => {}
                _ = tokio::time::sleep_until(commit_due), if auto_commit => {}
            }
        }
    }

    /// Joins `group` consuming `topics`, with [`GroupConfig`] defaults;
    /// partitions then come and go with the group's rebalances (replacing
    /// any assigned by hand).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), weir_client::ClientError> {
    /// use weir_client::{Consumer, ConsumerConfig};
    /// let mut consumer = Consumer::connect("127.0.0.1:9092", ConsumerConfig::default()).await?;
    /// consumer.subscribe("billing", &["orders"]).await?;
    /// while let Some(record) = consumer.next().await {
    ///     let record = record?;
    ///     println!("{}@{}", record.partition, record.offset);
    ///     consumer.commit_sync().await?; // or leave it to auto-commit
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// Broker errors from joining (e.g. `InvalidSessionTimeout`,
    /// `InconsistentAssignor`), connection errors.
    pub async fn subscribe(&mut self, group: &str, topics: &[&str]) -> Result<()> {
        self.subscribe_with(group, topics, GroupConfig::default(), None)
            .await
    }

    /// [`Consumer::subscribe`] with settings and a rebalance listener.
    ///
    /// # Errors
    /// As [`Consumer::subscribe`].
    pub async fn subscribe_with(
        &mut self,
        group: &str,
        topics: &[&str],
        config: GroupConfig,
        listener: Option<Box<dyn RebalanceListener>>,
    ) -> Result<()> {
        self.ensure_connected().await?;
        self.close_group().await?;
        self.unassign_all().await?;
        let topics: Vec<String> = topics.iter().map(|topic| topic.to_string()).collect();
        // The group's coordinator (the leader of its offsets partition)
        // takes every group call; while it moves or loads, ask again.
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.config.reconnect_timeout_ms);
        let mut backoff = Duration::from_millis(self.config.reconnect_backoff_ms.max(1));
        let (identity, assignment) = loop {
            let attempt = async {
                let coordinator = crate::group::find_coordinator(&self.router, group).await?;
                let joined = crate::group::join(&coordinator, group, &topics, &config, "").await?;
                Ok((coordinator, joined))
            };
            match attempt.await {
                Ok((coordinator, joined)) => {
                    self.connection = coordinator;
                    break joined;
                }
                Err(error)
                    if (crate::group::coordinator_moved(&error)
                        || crate::router::leader_moved(&error))
                        && tokio::time::Instant::now() + backoff < deadline =>
                {
                    tracing::debug!(%error, group, "coordinator not ready; asking again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(RECONNECT_BACKOFF_MS_MAX));
                }
                Err(error) => return Err(error),
            }
        };
        self.group = Some(crate::group::Membership::start(
            self.connection.clone(),
            group.to_string(),
            topics,
            config,
            identity,
            listener,
        ));
        self.take_assignment(assignment).await
    }

    /// Partitions owned now (hand-assigned or by the group).
    pub fn assignment(&self) -> Vec<(String, u32)> {
        self.assignments
            .iter()
            .map(|assignment| (assignment.topic.clone(), assignment.partition))
            .collect()
    }

    /// This member's id and generation in its group.
    pub fn group_generation(&self) -> Option<(String, i32)> {
        self.group.as_ref().map(|group| {
            let identity = group.identity();
            (identity.member_id, identity.generation)
        })
    }

    /// Commits the position of every owned partition in the background
    /// (errors are logged; use [`Consumer::commit_sync`] to see them).
    pub fn commit(&self) {
        let Some(group) = &self.group else {
            return;
        };
        let connection = self.connection.clone();
        let name = group.group.clone();
        let identity = group.identity();
        let offsets = self.positions();
        let order = group.commit_order.clone();
        tokio::spawn(async move {
            let _ordered = order.lock().await;
            if let Err(error) =
                crate::group::commit_offsets(&connection, &name, Some(&identity), &offsets).await
            {
                tracing::warn!(%error, group = name, "commit failed");
            }
        });
    }

    /// Commits the position of every owned partition and waits until it is
    /// durable.
    ///
    /// # Errors
    /// `InvalidArgument` without a group; `Broker(IllegalGeneration |
    /// RebalanceInProgress | UnknownMemberId)` when the group moved on (the
    /// next `next()` rejoins); connection errors.
    pub async fn commit_sync(&mut self) -> Result<()> {
        let offsets = self.positions();
        self.commit_offsets_sync(&offsets).await
    }

    /// Commits these offsets (topic, partition, next offset to consume).
    ///
    /// # Errors
    /// As [`Consumer::commit_sync`], and `Broker(PartitionNotAssigned)`.
    pub async fn commit_offsets_sync(&mut self, offsets: &[(String, u32, u64)]) -> Result<()> {
        self.require_group()?;
        loop {
            // Finding a moved coordinator again is bounded by the
            // reconnect timeout, as any reconnect.
            self.ensure_connected().await?;
            match self.commit_offsets_now(offsets).await {
                Err(error) if crate::group::coordinator_moved(&error) => continue,
                outcome => return outcome,
            }
        }
    }

    /// The coordinator said the group is no longer its own.
    fn coordinator_lost(&self) -> bool {
        self.group.as_ref().is_some_and(|group| {
            group
                .coordinator_moved
                .load(std::sync::atomic::Ordering::Acquire)
        })
    }

    /// Finds the coordinator again before the next group call.
    fn mark_coordinator_moved(&self) {
        if let Some(group) = &self.group {
            group
                .coordinator_moved
                .store(true, std::sync::atomic::Ordering::Release);
        }
    }

    fn require_group(&self) -> Result<()> {
        match self.group {
            Some(_) => Ok(()),
            None => Err(ClientError::InvalidArgument(
                "commit needs a group (subscribe first)".into(),
            )),
        }
    }

    /// [`Consumer::commit_offsets_sync`] on the connection as it is.
    async fn commit_offsets_now(&mut self, offsets: &[(String, u32, u64)]) -> Result<()> {
        let Some(group) = &mut self.group else {
            return Err(ClientError::InvalidArgument(
                "commit needs a group (subscribe first)".into(),
            ));
        };
        let identity = group.identity();
        let order = group.commit_order.clone();
        let _ordered = order.lock().await;
        let outcome =
            crate::group::commit_offsets(&self.connection, &group.group, Some(&identity), offsets)
                .await;
        if let Err(ClientError::Broker(
            ErrorCode::IllegalGeneration
            | ErrorCode::RebalanceInProgress
            | ErrorCode::UnknownMemberId,
        )) = &outcome
        {
            group
                .rejoin
                .store(true, std::sync::atomic::Ordering::Release);
        }
        if let Err(error) = &outcome
            && crate::group::coordinator_moved(error)
        {
            group
                .coordinator_moved
                .store(true, std::sync::atomic::Ordering::Release);
        }
        if outcome.is_ok() {
            group.last_commit = tokio::time::Instant::now();
        }
        outcome
    }

    /// Leaves the group cleanly: commits (with auto-commit), leaves (a
    /// static member keeps its place until its session expires) and stops
    /// heartbeating. Dropping a consumer without it is a crash to the group:
    /// its partitions move after the session timeout.
    ///
    /// # Errors
    /// Connection errors.
    pub async fn close(mut self) -> Result<()> {
        self.close_group().await
    }

    async fn close_group(&mut self) -> Result<()> {
        let Some(group) = self.group.take() else {
            return Ok(());
        };
        // What was read is committed, stale partitions included (read
        // before a reconnect); then the stale subscriptions go with the
        // group (nothing would ever resubscribe them).
        let offsets = self.positions();
        self.assignments.retain(|assignment| !assignment.stale);
        self.next_assignment = 0;
        group.heartbeat.abort();
        let identity = group.identity();
        if group.config.auto_commit
            && let Err(error) = crate::group::commit_offsets(
                &self.connection,
                &group.group,
                Some(&identity),
                &offsets,
            )
            .await
        {
            tracing::warn!(%error, group = group.group, "final commit failed");
        }
        if group.config.instance_id.is_none() && !identity.member_id.is_empty() {
            crate::group::leave(&self.connection, &group.group, &identity.member_id).await?;
        }
        Ok(())
    }

    /// (topic, partition, position) of every owned partition.
    fn positions(&self) -> Vec<(String, u32, u64)> {
        self.assignments
            .iter()
            .map(|assignment| {
                (
                    assignment.topic.clone(),
                    assignment.partition,
                    assignment.position,
                )
            })
            .collect()
    }

    /// Rejoins when the heartbeat said so; commits when it is time.
    async fn maintain_group(&mut self) -> Result<()> {
        let Some(group) = &self.group else {
            return Ok(());
        };
        // The flag is cleared only when the rebalance is done, so one cut
        // short (the caller dropped `next()`) is taken up again.
        if group.rebalancing() {
            return self.rebalance().await;
        }
        if group.auto_commit_due() {
            let positions = self.positions();
            match self.commit_offsets_now(&positions).await {
                Ok(()) => {}
                // The group moved on: the rebalance comes next.
                Err(ClientError::Broker(_)) => {
                    if let Some(group) = &mut self.group {
                        group.last_commit = tokio::time::Instant::now();
                    }
                }
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// Gives up every partition (committing first), rejoins, takes the new
    /// assignment.
    async fn rebalance(&mut self) -> Result<()> {
        if self
            .group
            .as_ref()
            .is_some_and(|group| group.config.assignor == crate::group::COOPERATIVE_STICKY)
        {
            return self.rebalance_cooperatively().await;
        }
        let started = self
            .group
            .as_ref()
            .is_some_and(|group| group.pending_join.is_some() || group.joined.is_some());
        if !started {
            let owned = self.assignment();
            self.commit_before_revoking(&owned).await?;
            self.unassign_all().await?;
        }
        let connection = self.connection.clone();
        let Some(group) = &mut self.group else {
            return Ok(());
        };
        let (_, assignment) = match group.join_resumable(&connection).await {
            Ok(joined) => joined,
            Err(error) if crate::group::coordinator_moved(&error) => {
                // Not a failure of the membership: rejoin at the new
                // coordinator once it is found.
                self.mark_coordinator_moved();
                return Err(error);
            }
            Err(error) => return Err(self.abandon_membership(error).await),
        };
        self.take_assignment(assignment).await?;
        self.finish_rebalance(false);
        Ok(())
    }

    /// Before `partitions` are given up: the listener stages what it wants
    /// committed, auto-commit adds the positions it did not name, and all
    /// of it is committed. A group that already moved on refuses the commit;
    /// that is not an error here (nothing can be committed any more).
    async fn commit_before_revoking(&mut self, partitions: &[(String, u32)]) -> Result<()> {
        let mut commits = Vec::new();
        if let Some(group) = &mut self.group
            && let Some(listener) = &mut group.listener
        {
            listener
                .get_mut()
                .unwrap_or_else(|poison| poison.into_inner())
                .revoked(partitions, &mut commits);
        }
        let auto_commit = self
            .group
            .as_ref()
            .is_some_and(|group| group.config.auto_commit);
        if auto_commit {
            for (topic, partition, position) in self.positions() {
                let revoking = partitions
                    .iter()
                    .any(|(t, p)| *t == topic && *p == partition);
                let staged = commits
                    .iter()
                    .any(|(t, p, _)| *t == topic && *p == partition);
                if revoking && !staged {
                    commits.push((topic, partition, position));
                }
            }
        }
        match self.commit_offsets_now(&commits).await {
            Ok(()) | Err(ClientError::Broker(_)) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Marks a rebalance applied; `again` asks for another one right away.
    fn finish_rebalance(&mut self, again: bool) {
        if let Some(group) = &mut self.group {
            group.joined = None;
            group.reattached = false;
            // Heartbeats answered during the join spoke of the old
            // generation: the join just dealt with what they asked for.
            group
                .rejoin
                .store(again, std::sync::atomic::Ordering::Release);
            if again {
                group.wake.notify_waiters();
            }
        }
    }

    /// A join failed: nothing assigned can be trusted to be ours any more.
    async fn abandon_membership(&mut self, error: ClientError) -> ClientError {
        let _ = self.unassign_all().await;
        if let Some(group) = &mut self.group {
            group.joined = None;
            group.pending_join = None;
        }
        if matches!(error, ClientError::Broker(ErrorCode::FencedInstanceId)) {
            // A newer process of this instance owns the membership now;
            // whatever `unassign_all` could not let go of goes too.
            self.group = None;
            self.assignments.clear();
            self.next_assignment = 0;
        }
        error
    }

    /// Cooperative: keep reading everything while rejoining; afterwards
    /// give up only what the new assignment leaves out (committing it
    /// first) and start what it adds. Giving something up means the group
    /// has a second round to hand it over: rejoin right away for it.
    async fn rebalance_cooperatively(&mut self) -> Result<()> {
        let auto_commit = self
            .group
            .as_ref()
            .is_some_and(|group| group.config.auto_commit);
        let started = self
            .group
            .as_ref()
            .is_some_and(|group| group.pending_join.is_some() || group.joined.is_some());
        let reattached = self.group.as_ref().is_some_and(|group| group.reattached);
        if reattached && !started {
            // Back from a lost connection, everything held is given up, as
            // an eager member would: the listener hears of it and may
            // commit, under the old identity (refused if the group moved
            // on meanwhile, so an offset never goes back).
            let owned = self.assignment();
            self.commit_before_revoking(&owned).await?;
        } else if auto_commit && !started {
            let positions = self.positions();
            if let Err(error) = self.commit_offsets_now(&positions).await
                && !matches!(error, ClientError::Broker(_))
            {
                return Err(error);
            }
        }
        let connection = self.connection.clone();
        let Some(group) = &mut self.group else {
            return Ok(());
        };
        let member_before = group.identity().member_id;
        let (identity, assignment) = match group.join_resumable(&connection).await {
            Ok(joined) => joined,
            Err(error) if crate::group::coordinator_moved(&error) => {
                // Not a failure of the membership: rejoin at the new
                // coordinator once it is found.
                self.mark_coordinator_moved();
                return Err(error);
            }
            Err(error) => return Err(self.abandon_membership(error).await),
        };
        if member_before.is_empty() || identity.member_id != member_before || reattached {
            // Rejoined as a new member (expired, or the coordinator
            // restarted): what this consumer held may have been read and
            // committed by others since; start everything afresh from the
            // committed offsets. So too after a reconnect, which left what
            // it held unsubscribed.
            self.unassign_all().await?;
            self.take_assignment(assignment).await?;
            self.finish_rebalance(false);
            return Ok(());
        }
        let owned = self.assignment();
        let revoked: Vec<(String, u32)> = owned
            .iter()
            .filter(|partition| !assignment.contains(partition))
            .cloned()
            .collect();
        let added: Vec<(String, u32)> = assignment
            .iter()
            .filter(|partition| !owned.contains(partition))
            .cloned()
            .collect();
        if !revoked.is_empty() {
            // The coordinator still accepts commits for partitions being
            // handed over, in the new generation.
            self.commit_before_revoking(&revoked).await?;
            for (topic, partition) in &revoked {
                self.unassign(topic, *partition).await?;
            }
        }
        self.take_assignment(added).await?;
        // Giving something up means a second round hands it over: rejoin
        // right away for it.
        self.finish_rebalance(!revoked.is_empty());
        Ok(())
    }

    /// Starts reading `assignment` at the committed offsets.
    async fn take_assignment(&mut self, assignment: Vec<(String, u32)>) -> Result<()> {
        let Some(group) = &self.group else {
            return Ok(());
        };
        let name = group.group.clone();
        let reset = group.config.reset;
        let committed =
            crate::group::fetch_offsets(&self.connection, &name, Some(&assignment)).await?;
        for (topic, partition, offset) in committed {
            let start = if offset >= 0 {
                Offset::At(offset as u64)
            } else {
                reset
            };
            match self.assign_now(&topic, partition, start).await {
                Ok(()) => {}
                // Deleted since the assignment: the coordinator rebalances
                // on its own when it notices; read the rest meanwhile.
                Err(ClientError::UnknownTopic(_)) => {}
                // Committed past the end after a truncation, or before a
                // retention cut: start where the reset says.
                Err(ClientError::Broker(ErrorCode::OffsetOutOfRange)) => {
                    self.assign_now(&topic, partition, reset).await?;
                }
                Err(error) => return Err(error),
            }
        }
        if let Some(group) = &mut self.group {
            group.last_commit = tokio::time::Instant::now();
            if let Some(listener) = &mut group.listener {
                listener
                    .get_mut()
                    .unwrap_or_else(|poison| poison.into_inner())
                    .assigned(&assignment);
            }
        }
        Ok(())
    }

    async fn unassign_all(&mut self) -> Result<()> {
        for (topic, partition) in self.assignment() {
            self.unassign(&topic, partition).await?;
        }
        Ok(())
    }

    /// Gives up an assignment whose data could not be read (a batch that
    /// fails its CRC, an unsupported or broken compression): unsubscribes
    /// and reports where reading stopped, so the application can decide
    /// (skip ahead with `assign`, or stop) instead of losing offsets unseen.
    fn abandon(&mut self, index: usize, error: ClientError) -> ClientError {
        let assignment = self.assignments.remove(index);
        self.next_assignment = 0;
        let connection = assignment.connection.clone();
        connection.forget_pushes(assignment.subscription_id);
        let subscription_id = assignment.subscription_id;
        tokio::spawn(async move {
            let _ = connection
                .call(Request::Unsubscribe(UnsubscribeRequest { subscription_id }))
                .await;
        });
        ClientError::Protocol(format!(
            "{}/{} unassigned at offset {}: {error}",
            assignment.topic, assignment.partition, assignment.position
        ))
    }

    /// A record already decoded, taking turns among the partitions.
    fn take_decoded_record(&mut self) -> Option<ConsumerRecord> {
        let count = self.assignments.len();
        for step in 0..count {
            let index = (self.next_assignment + step) % count;
            let assignment = &mut self.assignments[index];
            if let Some(record) = assignment.take_record() {
                self.next_assignment = (index + 1) % count;
                return Some(record);
            }
        }
        None
    }

    /// What [`Consumer::next`] would return at once without awaiting
    /// anything: a decoded record, when no reconnect, rebalance, failure
    /// report or auto-commit is due first. `None` means "call `next()`".
    fn take_ready_record(&mut self) -> Option<ConsumerRecord> {
        if self.connection_lost
            || self.resubscribe_pending
            || self.deferred_error.is_some()
            || self.connection.is_closed()
            || self.coordinator_lost()
        {
            return None;
        }
        if let Some(group) = &self.group {
            let failed = group
                .failed
                .lock()
                .unwrap_or_else(|poison| poison.into_inner())
                .is_some();
            if group.rebalancing() || group.auto_commit_due() || failed {
                return None;
            }
        }
        self.take_decoded_record()
    }

    /// The consumer as a `Stream` of records with everything
    /// [`Consumer::next`] does: group rebalances and commits, reconnects.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), weir_client::ClientError> {
    /// use weir_client::{Consumer, ConsumerConfig};
    /// let mut consumer = Consumer::connect("127.0.0.1:9092", ConsumerConfig::default()).await?;
    /// consumer.subscribe("billing", &["orders"]).await?;
    /// let mut records = consumer.into_stream();
    /// // With futures::StreamExt: while let Some(record) = records.next().await { .. }
    /// # drop(records);
    /// # Ok(()) }
    /// ```
    pub fn into_stream(self) -> RecordStream {
        RecordStream {
            consumer: std::sync::Arc::new(tokio::sync::Mutex::new(self)),
            call: None,
        }
    }

    fn poll_record(&mut self, context: &mut Context<'_>) -> Poll<Option<Result<ConsumerRecord>>> {
        if let Some(record) = self.take_decoded_record() {
            return Poll::Ready(Some(Ok(record)));
        }
        loop {
            match self.poll_batch(context) {
                Poll::Ready(Some(Ok(batch))) => {
                    let Some(index) = self.assignments.iter().position(|assignment| {
                        assignment.partition == batch.partition
                            && *assignment.shared_topic == *batch.topic
                    }) else {
                        continue;
                    };
                    let assignment = &mut self.assignments[index];
                    // Rewind: the records are handed out one at a time.
                    assignment.position = batch.start_offset;
                    if let Err(error) = batch.to_records(&mut assignment.records) {
                        // Checked on arrival, so this is a bug or memory
                        // corruption: give the partition up rather than skip.
                        assignment.records.clear();
                        return Poll::Ready(Some(Err(self.abandon(index, error))));
                    }
                    let next_offset = batch.next_offset;
                    assignment.chunk = Some(batch);
                    if let Some(record) = assignment.take_record() {
                        return Poll::Ready(Some(Ok(record)));
                    }
                    assignment.chunk = None;
                    assignment.position = next_offset;
                }
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// The partition's subscription ended with its leader (an error push
    /// saying leadership moved, or the leader's connection closed): it is
    /// resubscribed at the new leader by the next reconnect step.
    fn mark_moved(&mut self, index: usize) {
        let assignment = &mut self.assignments[index];
        assignment
            .connection
            .forget_pushes(assignment.subscription_id);
        assignment.stale = true;
        assignment.moved = true;
        self.router
            .forget_leader(&assignment.topic, assignment.partition);
        self.resubscribe_pending = true;
    }

    fn poll_batch(&mut self, context: &mut Context<'_>) -> Poll<Option<Result<ConsumerBatch>>> {
        if self.assignments.is_empty() {
            return Poll::Ready(None);
        }
        let count = self.assignments.len();
        for step in 0..count {
            let index = (self.next_assignment + step) % count;
            let assignment = &mut self.assignments[index];
            if assignment.stale {
                // Waiting for the rejoin to replace it.
                continue;
            }
            if !assignment.records.is_empty() {
                // Hand back what record-at-a-time reading left undelivered.
                assignment.records.clear();
                if let Some(mut chunk) = assignment.chunk.take() {
                    chunk.start_offset = assignment.position;
                    assignment.position = chunk.next_offset;
                    self.next_assignment = (index + 1) % count;
                    return Poll::Ready(Some(Ok(chunk)));
                }
            }
            loop {
                match assignment.pushes.poll_recv(context) {
                    Poll::Ready(Some(push)) => {
                        if matches!(
                            push.error,
                            ErrorCode::NotLeader
                                | ErrorCode::FencedLeaderEpoch
                                | ErrorCode::UnknownLeaderEpoch
                                | ErrorCode::ShuttingDown
                        ) {
                            // Leadership moved: read on at the new leader.
                            self.mark_moved(index);
                            return Poll::Ready(Some(Err(ClientError::Closed)));
                        }
                        if !push.error.is_ok() {
                            // The broker ended this subscription.
                            self.assignments.remove(index);
                            self.next_assignment = 0;
                            return Poll::Ready(Some(Err(ClientError::Broker(push.error))));
                        }
                        let bytes = push.records.to_bytes();
                        let pushed = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
                        let batch = ConsumerBatch::new(
                            assignment.shared_topic.clone(),
                            assignment.partition,
                            bytes,
                            assignment.position,
                        );
                        // Return the credit these bytes used once half the
                        // window has been taken, so pushes keep flowing.
                        assignment.taken_bytes = assignment.taken_bytes.saturating_add(pushed);
                        if assignment.taken_bytes >= self.config.credit_bytes / 2 {
                            let grant = std::mem::take(&mut assignment.taken_bytes);
                            let connection = assignment.connection.clone();
                            let subscription_id = assignment.subscription_id;
                            tokio::spawn(async move {
                                let _ = connection
                                    .call(Request::Credit(CreditRequest {
                                        subscription_id,
                                        credit_bytes: grant,
                                    }))
                                    .await;
                            });
                        }
                        let batch = match batch {
                            Ok(batch) => batch,
                            Err(error) => {
                                // The broker has moved past these bytes: going
                                // on would silently skip their offsets.
                                return Poll::Ready(Some(Err(self.abandon(index, error))));
                            }
                        };
                        if batch.next_offset <= assignment.position {
                            // Nothing new (a push that overlapped a seek).
                            continue;
                        }
                        assignment.position = batch.next_offset;
                        self.next_assignment = (index + 1) % count;
                        return Poll::Ready(Some(Ok(batch)));
                    }
                    Poll::Ready(None) => {
                        // The connection closed. The assignment keeps its
                        // position: `next`/`next_batch` reconnect and resume,
                        // at the partition's leader wherever it is now.
                        if self.connection.is_closed() {
                            self.connection_lost = true;
                        } else {
                            self.mark_moved(index);
                        }
                        return Poll::Ready(Some(Err(ClientError::Closed)));
                    }
                    Poll::Pending => break,
                }
            }
        }
        Poll::Pending
    }
}

/// A [`Consumer`] as a `Stream` of records (see [`Consumer::into_stream`]):
/// each item is what [`Consumer::next`] returns, rebalances, commits and
/// reconnects included. Records already decoded are handed out directly;
/// a call of `next()` runs (boxed) only when none is ready, about once per
/// pushed chunk. A call abandoned midway (a timeout or `select!` around
/// the stream's `next()`) is dropped when the consumer is asked for, which
/// `next()` is built to survive, so the consumer is always reachable.
pub struct RecordStream {
    consumer: std::sync::Arc<tokio::sync::Mutex<Consumer>>,
    call: Option<NextCall>,
}

type NextCall = Pin<Box<dyn std::future::Future<Output = Option<Result<ConsumerRecord>>> + Send>>;

impl std::fmt::Debug for RecordStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordStream")
            .field("calling_next", &self.call.is_some())
            .finish()
    }
}

impl RecordStream {
    /// The consumer, to commit or look at its assignment between items. A
    /// call of `next()` left unfinished is abandoned first (harmless: the
    /// stream's next item starts a new one).
    pub fn consumer(&mut self) -> &mut Consumer {
        self.call = None;
        std::sync::Arc::get_mut(&mut self.consumer)
            .expect("invariant: only an unfinished call shares the consumer")
            .get_mut()
    }

    /// The consumer back (to `close` it, say), abandoning a call of
    /// `next()` left unfinished.
    pub fn into_consumer(mut self) -> Consumer {
        self.call = None;
        match std::sync::Arc::try_unwrap(self.consumer) {
            Ok(consumer) => consumer.into_inner(),
            Err(_) => unreachable!("invariant: only an unfinished call shares the consumer"),
        }
    }
}

impl futures_core::Stream for RecordStream {
    type Item = Result<ConsumerRecord>;

    fn poll_next(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let stream = self.get_mut();
        if stream.call.is_none() {
            if let Ok(mut consumer) = stream.consumer.try_lock()
                && let Some(record) = consumer.take_ready_record()
            {
                return Poll::Ready(Some(Ok(record)));
            }
            let consumer = stream.consumer.clone();
            stream.call = Some(Box::pin(
                async move { consumer.lock_owned().await.next().await },
            ));
        }
        let Some(call) = stream.call.as_mut() else {
            return Poll::Ready(None);
        };
        match call.as_mut().poll(context) {
            Poll::Ready(item) => {
                stream.call = None;
                Poll::Ready(item)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
