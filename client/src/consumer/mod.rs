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
use weir_protocol::{ErrorCode, Request, Response};

mod batch;
mod membership;
mod reconnect;

pub use batch::ConsumerBatch;
use reconnect::Reconnecting;
pub use reconnect::{RECONNECT_ATTEMPT_MS_MIN, RECONNECT_BACKOFF_MS_MAX};

use crate::connection::Connection;
use crate::error::{ClientError, Result};
use crate::group::{GroupConfig, RebalanceListener};
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
            Some(chunk) if !self.records.is_empty() => chunk.next_offset(),
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
