//! `Producer`: batches records per partition (by size and linger), compresses,
//! sends with acks and retries, and applies backpressure through a bounded
//! buffer.
//!
//! Idempotent by default: the producer takes an id and epoch from the broker
//! (InitProducerId) and numbers the records of each partition; the broker
//! appends a batch only if it continues the sequence, and answers a retry of
//! an appended batch with its original offsets. So a retry never duplicates
//! a record, and with up to five batches in flight per partition a retried
//! batch can never land after a later one (the later one is refused as out
//! of sequence until the retry is in, then retried itself).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use weir_protocol::batch::with_compressed_records;
use weir_protocol::message::*;
use weir_protocol::{BatchBuilder, Compression, ErrorCode, Request, Response};

use crate::connection::Connection;
use crate::error::{ClientError, Result};
use crate::partitioner::partition_for_key;

/// Longest pause between retries of a batch (the pause doubles from
/// `retry_backoff_ms`). 1 s, as Kafka's `retry.backoff.max.ms`: a leader
/// failover takes one to two seconds, and a longer pause would add up to
/// its own length to it.
pub const RETRY_BACKOFF_MS_MAX: u64 = 1_000;

/// Most batches in flight per partition for an idempotent producer: the
/// broker remembers the last five of each producer (as Kafka does).
pub const IDEMPOTENT_IN_FLIGHT_MAX: usize = 5;

/// When a produce is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acks {
    /// Not at all: fire and forget (offsets are unknown).
    None,
    /// After the leader's append (durable on it under `flush = always`).
    Leader,
    /// After every in-sync replica.
    All,
}

impl Acks {
    fn wire(self) -> i8 {
        match self {
            Acks::None => 0,
            Acks::Leader => 1,
            Acks::All => -1,
        }
    }
}

/// Producer settings.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// How long a batch waits for more records. Default 5 ms.
    pub linger_ms: u64,
    /// A batch is sent once it reaches this size. Default 256 KiB.
    pub batch_bytes: usize,
    /// Bytes of records buffered before `send` waits, each record counted
    /// at its largest encoded size (a few bytes over). Default 32 MiB.
    pub buffer_bytes: usize,
    /// Acknowledgement level. Default `All`.
    pub acks: Acks,
    /// Retries of a batch after a retriable error. Default unlimited: the
    /// bound is `delivery_timeout_ms`, as in Kafka.
    pub retries: u32,
    /// How long a batch may take from its first attempt to its answer,
    /// retries and reconnects included; past it the batch fails with its
    /// last error. Default 120 s, which rides out a broker restart.
    pub delivery_timeout_ms: u64,
    /// Wait before the first retry, doubled each time. Default 100 ms.
    pub retry_backoff_ms: u64,
    /// How long one produce request may take. Default 30 s.
    pub request_timeout_ms: u64,
    /// Compression of each batch's records. Default none.
    pub compression: Compression,
    /// Batches in flight per partition. Default (`None`): 5 when
    /// idempotent, where order holds regardless (at most
    /// [`IDEMPOTENT_IN_FLIGHT_MAX`]); 1 otherwise, since without idempotence
    /// more than 1 lets a retried batch land after batches sent after it.
    pub in_flight_per_partition: Option<usize>,
    /// Numbered batches the broker deduplicates. Default true. Only with
    /// acknowledgements: with `Acks::None` a refused batch is never reported,
    /// so the producer is not idempotent whatever this says.
    pub idempotent: bool,
    /// A stable name for this producer (e.g. an application instance): a
    /// new producer with the same name takes over the same producer id with
    /// the next epoch, and the broker refuses the older one's batches
    /// (`ProducerFenced`). Default none: a fresh id.
    pub producer_name: Option<String>,
    /// Largest record accepted by `send`. Default 8 MiB: well under the
    /// broker's 16 MiB batch and frame limits, so one record never costs
    /// the connection a `FrameTooLarge`.
    pub record_bytes_max: usize,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            linger_ms: 5,
            batch_bytes: 256 * 1024,
            buffer_bytes: 32 << 20,
            acks: Acks::All,
            retries: u32::MAX,
            delivery_timeout_ms: 120_000,
            retry_backoff_ms: 100,
            request_timeout_ms: 30_000,
            compression: Compression::None,
            record_bytes_max: 8 << 20,
            in_flight_per_partition: None,
            idempotent: true,
            producer_name: None,
        }
    }
}

/// One record to send.
#[derive(Debug, Clone, Default)]
pub struct ProducerRecord {
    /// Key; decides the partition (murmur2, as Kafka) unless one is given.
    pub key: Option<Bytes>,
    /// Value; `None` is a tombstone.
    pub value: Option<Bytes>,
    /// Headers.
    pub headers: Vec<(String, Option<Bytes>)>,
    /// Timestamp in ms; now if `None`.
    pub timestamp_ms: Option<i64>,
    /// Explicit partition.
    pub partition: Option<u32>,
}

impl ProducerRecord {
    /// A record with a value.
    pub fn new(value: impl Into<Bytes>) -> Self {
        ProducerRecord {
            value: Some(value.into()),
            ..ProducerRecord::default()
        }
    }

    /// Sets the key.
    pub fn key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push((name.into(), Some(value.into())));
        self
    }

    /// Sends to this partition.
    pub fn partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// Sets the timestamp.
    pub fn timestamp_ms(mut self, timestamp_ms: i64) -> Self {
        self.timestamp_ms = Some(timestamp_ms);
        self
    }
}

/// Where a record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Partition.
    pub partition: u32,
    /// Offset (-1 with `Acks::None`).
    pub offset: i64,
}

/// The answer for one batch, shared by the delivery futures of its records:
/// one allocation per batch rather than a channel per record.
#[derive(Default)]
struct BatchOutcome {
    /// Set once `state.result` is: lets a check for the answer skip the lock.
    resolved: AtomicBool,
    state: Mutex<OutcomeState>,
}

#[derive(Default)]
struct OutcomeState {
    /// The batch's base offset (-1 with `Acks::None`), or why it failed.
    result: Option<Result<i64>>,
    /// Futures waiting for the result; a future keeps its slot.
    wakers: Vec<std::task::Waker>,
}

/// The producer's end of a [`BatchOutcome`]: resolves it once, and with
/// `Closed` if the batch is dropped unanswered (the producer was dropped).
struct BatchCompleter {
    outcome: Arc<BatchOutcome>,
}

impl BatchCompleter {
    fn new() -> Self {
        BatchCompleter {
            outcome: Arc::new(BatchOutcome::default()),
        }
    }

    fn future(&self, partition: u32, offset_delta: i32) -> DeliveryFuture {
        DeliveryFuture {
            outcome: self.outcome.clone(),
            partition,
            offset_delta,
            waker_slot: None,
        }
    }

    fn complete(&self, result: Result<i64>) {
        let wakers = {
            let mut state = lock(&self.outcome.state);
            if state.result.is_some() {
                return;
            }
            state.result = Some(result);
            self.outcome.resolved.store(true, Ordering::Release);
            std::mem::take(&mut state.wakers)
        };
        for waker in wakers {
            waker.wake();
        }
    }
}

impl Drop for BatchCompleter {
    fn drop(&mut self) {
        self.complete(Err(ClientError::Closed));
    }
}

/// Resolves when the record is acknowledged (or finally fails; `Closed` if
/// the producer was dropped first).
pub struct DeliveryFuture {
    outcome: Arc<BatchOutcome>,
    partition: u32,
    offset_delta: i32,
    /// Where this future's waker sits in the outcome's list, once polled.
    waker_slot: Option<usize>,
}

impl std::fmt::Debug for DeliveryFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryFuture")
            .field("partition", &self.partition)
            .field("offset_delta", &self.offset_delta)
            .finish()
    }
}

impl DeliveryFuture {
    fn delivery(&self, result: &Result<i64>) -> Result<Delivery> {
        match result {
            Ok(base) => Ok(Delivery {
                partition: self.partition,
                offset: if *base < 0 {
                    -1
                } else {
                    base + i64::from(self.offset_delta)
                },
            }),
            Err(error) => Err(error.clone()),
        }
    }

    /// The outcome if the record's batch has been answered, without waiting.
    pub fn try_delivery(&self) -> Option<Result<Delivery>> {
        if !self.is_resolved() {
            return None;
        }
        let state = lock(&self.outcome.state);
        state.result.as_ref().map(|result| self.delivery(result))
    }

    /// Whether the record's batch has been answered.
    pub fn is_resolved(&self) -> bool {
        self.outcome.resolved.load(Ordering::Acquire)
    }
}

impl std::future::Future for DeliveryFuture {
    type Output = Result<Delivery>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<Delivery>> {
        let this = &mut *self;
        let mut state = lock(&this.outcome.state);
        if let Some(result) = &state.result {
            return std::task::Poll::Ready(this.delivery(result));
        }
        match this.waker_slot {
            Some(slot) if state.wakers[slot].will_wake(cx.waker()) => {}
            Some(slot) => state.wakers[slot] = cx.waker().clone(),
            None => {
                this.waker_slot = Some(state.wakers.len());
                state.wakers.push(cx.waker().clone());
            }
        }
        std::task::Poll::Pending
    }
}

struct OpenBatch {
    builder: BatchBuilder,
    created: Instant,
    completer: BatchCompleter,
    /// Buffer space of every record in the batch, merged into one permit.
    permit: Option<OwnedSemaphorePermit>,
}

struct ReadyBatch {
    topic: Arc<str>,
    partition: u32,
    bytes: Bytes,
    completer: BatchCompleter,
    _permit: Option<OwnedSemaphorePermit>,
}

/// A partition's batches on the wire. A new one may start only within
/// `limit` batches of the oldest unresolved one (not merely while fewer than
/// `limit` are unresolved): the broker recognises a retry only among a
/// producer's last five batches, so while an old batch waits for its retry
/// no more than four may be appended after it.
#[derive(Default)]
struct Window {
    /// Batches started so far (the next one's index).
    started: u64,
    /// Indexes of started batches not yet resolved.
    unresolved: std::collections::BTreeSet<u64>,
}

impl Window {
    fn can_start(&self, limit: usize) -> bool {
        self.unresolved
            .first()
            .is_none_or(|oldest| self.started - oldest < limit as u64)
    }

    fn start(&mut self) -> u64 {
        let index = self.started;
        self.started += 1;
        self.unresolved.insert(index);
        index
    }
}

/// One partition's batches: the open one, the sealed ones waiting for the
/// window, and those on the wire.
#[derive(Default)]
struct PartitionState {
    open: Option<OpenBatch>,
    ready: VecDeque<ReadyBatch>,
    window: Window,
    /// Next sequence (idempotent producers).
    sequence: i32,
    /// Whether the partition is in `State::active`.
    listed: bool,
}

impl PartitionState {
    /// Whether a batch may go on the wire now.
    fn window_open(&self, limit: usize) -> bool {
        self.window.can_start(limit)
    }

    /// Whether the open batch may be sealed and sent at once: nothing sealed
    /// waits before it and the window has room.
    fn can_start(&self, limit: usize) -> bool {
        self.window_open(limit) && self.ready.is_empty()
    }
}

/// A topic's partitions, indexed by partition number. Records find their
/// batch through the topic name (borrowed: no allocation per record).
struct TopicState {
    name: Arc<str>,
    partitions: Vec<PartitionState>,
    /// Where keyless records go until their batch fills.
    sticky: Option<u32>,
}

#[derive(Default)]
struct State {
    topics: Vec<TopicState>,
    /// Where each topic sits in `topics`.
    topic_index: HashMap<String, usize>,
    /// The topic used last: checked before hashing, since a producer
    /// mostly sends to one topic after another.
    last_topic: usize,
    /// Batches sealed or in flight; `flush` waits for zero.
    outstanding: usize,
    /// Partitions (topic index, partition) with an open or sealed batch:
    /// what the send loop and `flush` visit, rather than every partition.
    active: Vec<(usize, u32)>,
}

impl State {
    fn find_topic(&mut self, topic: &str) -> Option<usize> {
        if self
            .topics
            .get(self.last_topic)
            .is_some_and(|state| &*state.name == topic)
        {
            return Some(self.last_topic);
        }
        let index = *self.topic_index.get(topic)?;
        self.last_topic = index;
        Some(index)
    }

    fn add_topic(&mut self, topic: &str, partitions: u32) -> usize {
        if let Some(index) = self.find_topic(topic) {
            return index;
        }
        self.topics.push(TopicState {
            name: Arc::from(topic),
            partitions: (0..partitions).map(|_| PartitionState::default()).collect(),
            sticky: None,
        });
        let index = self.topics.len() - 1;
        self.topic_index.insert(topic.to_string(), index);
        index
    }

    fn partition_mut(&mut self, topic: &str, partition: u32) -> Option<&mut PartitionState> {
        let index = self.find_topic(topic)?;
        self.topics
            .get_mut(index)
            .and_then(|state| state.partitions.get_mut(partition as usize))
    }
}

struct Shared {
    /// Connections to the brokers, and which one leads each partition.
    router: crate::router::Router,
    /// Set (with `fatal`) when an idempotent batch failed for good: every
    /// later send fails. The flag spares `send` a lock.
    failed: AtomicBool,
    fatal: Mutex<Option<String>>,
    /// Producer id and epoch when idempotent.
    identity: Option<(i64, i16)>,
    config: ProducerConfig,
    buffer: Arc<Semaphore>,
    state: Mutex<State>,
    wake: Notify,
    idle: Notify,
}

impl Shared {
    /// Batches in flight per partition.
    fn in_flight_limit(&self) -> usize {
        match (self.identity, self.config.in_flight_per_partition) {
            // The broker remembers a producer's last five batches: a retry
            // further back could not be recognised.
            (Some(_), wanted) => wanted
                .unwrap_or(IDEMPOTENT_IN_FLIGHT_MAX)
                .clamp(1, IDEMPOTENT_IN_FLIGHT_MAX),
            (None, wanted) => wanted.unwrap_or(1).max(1),
        }
    }

    /// A connection to the leader of `topic`/`partition` (opened again
    /// if the broker closed it: a restart, say). Batches retried over a new
    /// connection, or at a new leader, keep their sequence numbers, so the
    /// dedupe (which followers replicate) keeps every record exactly once.
    ///
    /// # Errors
    /// Connection errors and `Broker(NotLeader)` while no leader is known
    /// (retriable: a batch's retries and backoff ride out the outage).
    async fn connection(&self, topic: &str, partition: u32) -> Result<Connection> {
        self.router.leader(topic, partition).await
    }

    fn fatal_reason(&self) -> Option<String> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        lock(&self.fatal).clone()
    }
}

/// Sends records to a broker.
///
/// ```no_run
/// # async fn demo() -> Result<(), weir_client::ClientError> {
/// use weir_client::{Producer, ProducerConfig, ProducerRecord};
/// let producer = Producer::connect("127.0.0.1:9092", ProducerConfig::default()).await?;
/// let delivery = producer.send("orders", ProducerRecord::new("hello").key("customer-7")).await?;
/// let placed = delivery.await?;
/// println!("partition {} offset {}", placed.partition, placed.offset);
/// producer.flush().await?;
/// # Ok(()) }
/// ```
pub struct Producer {
    shared: Arc<Shared>,
    sender_task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("config", &self.shared.config)
            .finish()
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.sender_task.abort();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

impl Producer {
    /// Connects to a cluster through `addr`: one broker's `host:port`, or
    /// several, comma-separated (the first that answers is used to learn
    /// the rest). Each partition's batches go to its leader.
    ///
    /// # Errors
    /// [`ClientError::Connect`].
    pub async fn connect(addr: &str, config: ProducerConfig) -> Result<Producer> {
        let router =
            crate::router::Router::connect(addr, Duration::from_millis(config.request_timeout_ms))
                .await?;
        let identity = if config.idempotent && config.acks != Acks::None {
            Some(init_producer_id(&router.any().await?, config.producer_name.clone()).await?)
        } else {
            None
        };
        let shared = Arc::new(Shared {
            router,
            failed: AtomicBool::new(false),
            fatal: Mutex::new(None),
            identity,
            buffer: Arc::new(Semaphore::new(config.buffer_bytes.max(1))),
            config,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            idle: Notify::new(),
        });
        let sender_task = tokio::spawn(send_loop(shared.clone()));
        Ok(Producer {
            shared,
            sender_task,
        })
    }

    /// The producer id and epoch the broker gave, when idempotent.
    pub fn identity(&self) -> Option<(i64, i16)> {
        self.shared.identity
    }

    /// Learns a topic's partitions (its first record), and returns the
    /// state locked, with the topic's index.
    async fn state_with_topic(
        &self,
        topic: &str,
    ) -> Result<(std::sync::MutexGuard<'_, State>, usize)> {
        {
            let mut guard = lock(&self.shared.state);
            if let Some(index) = guard.find_topic(topic) {
                return Ok((guard, index));
            }
        }
        let count = self.shared.router.partition_count(topic).await?;
        let mut guard = lock(&self.shared.state);
        let index = guard.add_topic(topic, count);
        Ok((guard, index))
    }

    /// Queues a record; waits while the buffer is full. The returned future
    /// resolves when the record is acknowledged (or finally fails).
    ///
    /// # Errors
    /// `UnknownTopic`, `InvalidArgument` (partition out of range, record
    /// larger than the buffer), connection errors.
    pub async fn send(&self, topic: &str, record: ProducerRecord) -> Result<DeliveryFuture> {
        if let Some(reason) = self.shared.fatal_reason() {
            return Err(ClientError::ProducerFailed(reason));
        }
        let headers: Vec<(&str, Option<&[u8]>)> = record
            .headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_deref()))
            .collect();
        let (key, value) = (record.key.as_deref(), record.value.as_deref());
        // An upper bound (no builder needed): a few bytes over at most.
        let record_bytes = BatchBuilder::record_bytes_max(key, value, &headers);
        let config = &self.shared.config;
        if record_bytes > config.buffer_bytes.min(config.record_bytes_max) {
            return Err(ClientError::InvalidArgument(format!(
                "record of {record_bytes} bytes exceeds record_bytes_max or the producer buffer"
            )));
        }
        let charge = u32::try_from(record_bytes).unwrap_or(u32::MAX);
        let permit = match self.shared.buffer.clone().try_acquire_many_owned(charge) {
            Ok(permit) => permit,
            Err(tokio::sync::TryAcquireError::Closed) => return Err(ClientError::Closed),
            Err(tokio::sync::TryAcquireError::NoPermits) => self
                .shared
                .buffer
                .clone()
                .acquire_many_owned(charge)
                .await
                .map_err(|_| ClientError::Closed)?,
        };
        let timestamp_ms = record.timestamp_ms.unwrap_or_else(now_ms);
        let batch_bytes = config.batch_bytes;
        let identity = self.shared.identity;
        // One lock per record: the topic is found (or, on its first record,
        // learned) and the record added under the same hold.
        let (mut guard, topic_index) = self.state_with_topic(topic).await?;
        let State {
            topics,
            outstanding,
            active,
            ..
        } = &mut *guard;
        let Some(topic_state) = topics.get_mut(topic_index) else {
            return Err(ClientError::Protocol(format!("{topic} was forgotten")));
        };
        let partitions = topic_state.partitions.len() as u32;
        let partition = match (record.partition, key) {
            (Some(partition), _) if partition < partitions => partition,
            (Some(partition), _) => {
                return Err(ClientError::InvalidArgument(format!(
                    "partition {partition} of a {partitions}-partition topic"
                )));
            }
            (None, Some(key)) => partition_for_key(key, partitions),
            (None, None) => *topic_state
                .sticky
                .get_or_insert_with(|| fastrand_below(partitions)),
        };
        let name = &topic_state.name;
        let Some(state) = topic_state.partitions.get_mut(partition as usize) else {
            return Err(ClientError::Protocol(format!(
                "{topic} has no partition {partition}"
            )));
        };
        // Batches sealed here (at most two: the full one, then this record's).
        let mut sealed = 0usize;
        // The bound (not the exact size) decides: at most a few bytes of
        // batch go unused, and the record's size is not worked out twice.
        let full = state
            .open
            .as_ref()
            .is_some_and(|open| open.builder.len_bytes() + record_bytes > batch_bytes);
        if full {
            sealed += usize::from(seal(identity, name, partition, state));
            if key.is_none() && record.partition.is_none() {
                // Sticky: a full batch moves keyless records to another partition.
                topic_state.sticky = Some((partition + 1) % partitions.max(1));
            }
        }
        let created = state.open.is_none();
        if !state.listed {
            state.listed = true;
            active.push((topic_index, partition));
        }
        let open = state.open.get_or_insert_with(|| OpenBatch {
            builder: BatchBuilder::with_capacity(timestamp_ms, batch_bytes.min(4 << 20)),
            created: Instant::now(),
            completer: BatchCompleter::new(),
            permit: None,
        });
        let offset_delta = open.builder.push(timestamp_ms, key, value, &headers);
        let delivery = open.completer.future(partition, offset_delta);
        match &mut open.permit {
            Some(held) => held.merge(permit),
            None => open.permit = Some(permit),
        }
        if open.builder.len_bytes() >= batch_bytes {
            sealed += usize::from(seal(identity, name, partition, state));
        }
        *outstanding += sealed;
        drop(guard);
        // The send loop cares about new batches (their linger deadline) and
        // sealed ones, not about every record.
        if sealed > 0 || created {
            self.shared.wake.notify_one();
        }
        Ok(delivery)
    }

    /// Sends everything buffered now and waits until it is acknowledged.
    ///
    /// # Errors
    /// [`ClientError::Closed`] if the producer's sender stopped.
    pub async fn flush(&self) -> Result<()> {
        loop {
            let idle = self.shared.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            {
                let mut guard = lock(&self.shared.state);
                let State {
                    topics,
                    outstanding,
                    active,
                    ..
                } = &mut *guard;
                for (topic_index, partition) in active.iter() {
                    let Some(topic) = topics.get_mut(*topic_index) else {
                        continue;
                    };
                    if let Some(state) = topic.partitions.get_mut(*partition as usize)
                        && seal(self.shared.identity, &topic.name, *partition, state)
                    {
                        *outstanding += 1;
                    }
                }
                if *outstanding == 0 {
                    return Ok(());
                }
            }
            self.shared.wake.notify_one();
            if self.sender_task.is_finished() {
                return Err(ClientError::Closed);
            }
            idle.await;
        }
    }
}

/// A pseudo-random partition for the first keyless record of a topic.
fn fastrand_below(partitions: u32) -> u32 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.subsec_nanos());
    nanos % partitions.max(1)
}

/// Asks the broker for a producer id and epoch.
async fn init_producer_id(connection: &Connection, name: Option<String>) -> Result<(i64, i16)> {
    let response = connection
        .call(Request::InitProducerId(InitProducerIdRequest {
            producer_name: name,
        }))
        .await?;
    match response {
        Response::InitProducerId(response) if response.error.is_ok() => {
            Ok((response.producer_id, response.producer_epoch))
        }
        Response::InitProducerId(response) => Err(ClientError::Broker(response.error)),
        other => Err(ClientError::Protocol(format!(
            "unexpected {:?}",
            other.api()
        ))),
    }
}

/// Moves a partition's open batch to its ready queue, numbering it if the
/// producer is idempotent. Returns whether there was one to seal (the
/// caller counts it as outstanding).
fn seal(
    identity: Option<(i64, i16)>,
    topic: &Arc<str>,
    partition: u32,
    state: &mut PartitionState,
) -> bool {
    let Some(mut open) = state.open.take() else {
        return false;
    };
    if open.builder.records_count() == 0 {
        return false;
    }
    if let Some((producer_id, producer_epoch)) = identity {
        let base_sequence = state.sequence;
        // Sequences wrap from i32::MAX to 0, as Kafka's do.
        state.sequence = ((i64::from(base_sequence) + i64::from(open.builder.records_count()))
            % (i64::from(i32::MAX) + 1)) as i32;
        open.builder = open.builder.producer(weir_protocol::ProducerStamp {
            producer_id,
            producer_epoch,
            base_sequence,
        });
    }
    state.ready.push_back(ReadyBatch {
        topic: topic.clone(),
        partition,
        bytes: Bytes::from(open.builder.finish()),
        completer: open.completer,
        _permit: open.permit,
    });
    true
}

async fn send_loop(shared: Arc<Shared>) {
    let linger = Duration::from_millis(shared.config.linger_ms);
    let limit = shared.in_flight_limit();
    loop {
        let woken = shared.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let mut to_start = Vec::new();
        let next_deadline = {
            let now = Instant::now();
            let mut guard = lock(&shared.state);
            let State {
                topics,
                outstanding,
                active,
                ..
            } = &mut *guard;
            let mut next_deadline: Option<Instant> = None;
            active.retain(|(topic_index, partition)| {
                let partition = *partition;
                let Some(topic) = topics.get_mut(*topic_index) else {
                    return false;
                };
                let Some(state) = topic.partitions.get_mut(partition as usize) else {
                    return false;
                };
                // A partition at its in-flight limit (or with sealed
                // batches waiting) keeps its open batch open past
                // linger, so records arriving meanwhile join it: under
                // load batches grow to what one round trip accumulates
                // instead of queueing up tiny ones.
                let due = state
                    .open
                    .as_ref()
                    .is_some_and(|open| now.duration_since(open.created) >= linger);
                if due
                    && state.can_start(limit)
                    && seal(shared.identity, &topic.name, partition, state)
                {
                    *outstanding += 1;
                }
                while state.window_open(limit) {
                    let Some(batch) = state.ready.pop_front() else {
                        break;
                    };
                    let index = state.window.start();
                    to_start.push((index, batch));
                }
                // Blocked partitions are woken by their batch completing.
                if let Some(open) = &state.open
                    && state.can_start(limit)
                {
                    let deadline = open.created + linger;
                    next_deadline = Some(next_deadline.map_or(deadline, |d| d.min(deadline)));
                }
                // Listed while it has batches not yet on the wire; those in
                // flight wake the loop themselves when they finish.
                state.listed = state.open.is_some() || !state.ready.is_empty();
                state.listed
            });
            next_deadline
        };
        // Put each batch's first attempt on the wire here, in order: the
        // broker appends a connection's batches in arrival order. Waiting
        // (and any retry) happens in a task per batch.
        for (index, batch) in to_start {
            let first = first_attempt(&shared, &batch).await;
            tokio::spawn(deliver(shared.clone(), index, batch, first));
        }
        match next_deadline {
            Some(deadline) => {
                let _ = tokio::time::timeout_at(deadline.into(), woken).await;
            }
            None => woken.await,
        }
    }
}

/// The produce request for a batch (compressed as configured).
fn produce_request(shared: &Shared, batch: &ReadyBatch) -> Result<Request> {
    let bytes = compress(&batch.bytes, shared.config.compression)?;
    Ok(Request::Produce(ProduceRequest {
        acks: shared.config.acks.wire(),
        timeout_ms: u32::try_from(shared.config.request_timeout_ms).unwrap_or(u32::MAX),
        topics: vec![ProduceTopic {
            name: batch.topic.to_string(),
            partitions: vec![ProducePartition {
                partition: batch.partition,
                records: RecordSet::single(bytes),
            }],
        }],
    }))
}

/// The first attempt of a batch, already queued on the connection.
enum FirstAttempt {
    /// Waiting for the broker's answer.
    Pending(Request, crate::connection::PendingCall),
    /// Sent with acks = 0: nothing to wait for.
    Sent,
    /// Could not even be sent; retried (if retriable) by `deliver`.
    Failed(Option<Request>, ClientError),
}

async fn first_attempt(shared: &Shared, batch: &ReadyBatch) -> FirstAttempt {
    let request = match produce_request(shared, batch) {
        Ok(request) => request,
        Err(error) => return FirstAttempt::Failed(None, error),
    };
    let connection = match shared.connection(&batch.topic, batch.partition).await {
        Ok(connection) => connection,
        Err(error) => return FirstAttempt::Failed(Some(request), error),
    };
    if shared.config.acks == Acks::None {
        return match connection.send_only(request.clone()).await {
            Ok(()) => FirstAttempt::Sent,
            Err(error) => FirstAttempt::Failed(Some(request), error),
        };
    }
    match connection.start_call(request.clone()).await {
        Ok(pending) => FirstAttempt::Pending(request, pending),
        Err(error) => FirstAttempt::Failed(Some(request), error),
    }
}

/// The base offset from a produce response.
fn base_offset(response: Result<Response>) -> Result<i64> {
    match response? {
        Response::Produce(response) => {
            match response.topics.first().and_then(|t| t.partitions.first()) {
                Some(answer) if answer.error == ErrorCode::None => Ok(answer.base_offset),
                Some(answer) => Err(ClientError::Broker(answer.error)),
                None => Err(ClientError::Protocol("empty produce response".into())),
            }
        }
        other => Err(ClientError::Protocol(format!(
            "unexpected {:?}",
            other.api()
        ))),
    }
}

/// Finishes one batch (retrying as configured) and resolves its records.
async fn deliver(shared: Arc<Shared>, index: u64, batch: ReadyBatch, first: FirstAttempt) {
    let outcome = finish(&shared, &batch.topic, batch.partition, index, first).await;
    if shared.identity.is_some()
        && let Err(error) = &outcome
    {
        // The partition's sequence now has a gap no later batch can fill.
        let mut fatal = lock(&shared.fatal);
        if fatal.is_none() {
            *fatal = Some(format!(
                "a batch for {}/{} failed: {error}",
                batch.topic, batch.partition
            ));
        }
        shared.failed.store(true, Ordering::Release);
    }
    batch.completer.complete(outcome);
    {
        let mut state = lock(&shared.state);
        if let Some(partition) = state.partition_mut(&batch.topic, batch.partition) {
            partition.window.unresolved.remove(&index);
        }
        state.outstanding -= 1;
        if state.outstanding == 0 {
            shared.idle.notify_waiters();
        }
    }
    shared.wake.notify_one();
}

async fn finish(
    shared: &Shared,
    topic: &str,
    partition: u32,
    index: u64,
    first: FirstAttempt,
) -> Result<i64> {
    let deadline = Instant::now() + Duration::from_millis(shared.config.delivery_timeout_ms);
    let (request, mut result) = match first {
        FirstAttempt::Sent => return Ok(-1),
        FirstAttempt::Pending(request, pending) => (request, base_offset(pending.wait().await)),
        FirstAttempt::Failed(None, error) => return Err(error),
        FirstAttempt::Failed(Some(request), error) => (request, Err(error)),
    };
    let mut backoff = Duration::from_millis(shared.config.retry_backoff_ms);
    let mut attempt = 0;
    loop {
        // Out of sequence while idempotent: an earlier batch of the
        // partition failed and is being retried; this one goes in after it.
        // So too an unknown producer id: after leadership moved, a new
        // leader that never got the producer's first batch (it was still
        // being replicated) knows no state for it until that batch's retry
        // lands there.
        // An unknown partition is retried too (as in Kafka): in a cluster a
        // new topic reaches its leaders a moment after it is created.
        let retriable = |error: &ClientError| {
            error.is_retriable()
                || matches!(
                    error,
                    ClientError::Broker(ErrorCode::UnknownTopicOrPartition)
                )
                || (shared.identity.is_some()
                    && matches!(
                        error,
                        ClientError::Broker(
                            ErrorCode::OutOfOrderSequence | ErrorCode::UnknownProducerId
                        )
                    ))
        };
        if let Some(reason) = shared.fatal_reason() {
            if result.is_err() {
                return Err(ClientError::ProducerFailed(reason));
            }
            return result;
        }
        // Waiting behind an earlier batch that is being retried does not
        // use up this batch's retries.
        let behind_a_retry = matches!(
            &result,
            Err(ClientError::Broker(
                ErrorCode::OutOfOrderSequence | ErrorCode::UnknownProducerId
            ))
        ) && lock(&shared.state)
            .partition_mut(topic, partition)
            .and_then(|state| state.window.unresolved.first().copied())
            .is_some_and(|oldest| oldest < index);
        // A retry that could not start before the deadline is not made.
        let in_time = Instant::now() + backoff < deadline;
        match result {
            Err(error)
                if retriable(&error)
                    && in_time
                    && (behind_a_retry || attempt < shared.config.retries) =>
            {
                if !behind_a_retry {
                    attempt += 1;
                }
                tracing::debug!(%error, attempt, "retrying produce");
                // Leadership moving is waited out at the base pause, each
                // retry asking for the new leader: a failover is over in a
                // second or two, and a doubled pause would add up to its
                // own length to it. Other errors back off exponentially.
                let moved = crate::router::leader_moved(&error);
                if moved {
                    shared.router.forget_leader(topic, partition);
                }
                tokio::time::sleep(backoff).await;
                backoff = if moved {
                    Duration::from_millis(shared.config.retry_backoff_ms)
                } else {
                    backoff
                        .saturating_mul(2)
                        .min(Duration::from_millis(RETRY_BACKOFF_MS_MAX))
                };
                result = match shared.connection(topic, partition).await {
                    Err(error) => Err(error),
                    Ok(connection) if shared.config.acks == Acks::None => {
                        connection.send_only(request.clone()).await.map(|()| -1)
                    }
                    Ok(connection) => base_offset(connection.call(request.clone()).await),
                };
            }
            other => return other,
        }
    }
}

/// Compresses a built batch's records section.
fn compress(batch: &Bytes, codec: Compression) -> Result<Bytes> {
    if codec == Compression::None {
        return Ok(batch.clone());
    }
    let records = &batch[weir_protocol::batch::BATCH_HEADER_BYTES..];
    let compressed = weir_protocol::codec::compress(codec, records)
        .map_err(|error| ClientError::InvalidArgument(error.to_string()))?;
    Ok(Bytes::from(with_compressed_records(
        batch,
        codec,
        &compressed,
    )))
}

/// Most bytes one batch's records section may expand to in this client
/// (the broker refuses batches that expand further), so a hostile or
/// broken batch cannot make a consumer allocate without bound.
pub use weir_protocol::codec::DECOMPRESSED_BYTES_MAX;

/// Decompresses a batch's records section for iteration (every Kafka
/// codec: gzip, snappy, lz4, zstd).
///
/// # Errors
/// [`ClientError::Protocol`] for corrupt compressed data, or data that
/// expands past [`DECOMPRESSED_BYTES_MAX`].
pub fn decompress(codec: Compression, records: &[u8]) -> Result<Vec<u8>> {
    weir_protocol::codec::decompress(codec, records, DECOMPRESSED_BYTES_MAX)
        .map_err(|error| ClientError::Protocol(error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every record of a batch learns its own offset from the one shared
    /// answer, whether it waited for it or looked afterwards.
    #[tokio::test]
    async fn records_of_a_batch_share_one_answer() {
        let completer = BatchCompleter::new();
        let first = completer.future(3, 0);
        let second = completer.future(3, 1);
        let waiting = tokio::spawn(first);
        tokio::task::yield_now().await;
        assert!(!second.is_resolved());
        assert!(second.try_delivery().is_none());
        completer.complete(Ok(100));
        let first = waiting.await.expect("task").expect("delivered");
        assert_eq!(
            first,
            Delivery {
                partition: 3,
                offset: 100
            }
        );
        assert!(second.is_resolved());
        let second = second.try_delivery().expect("answered").expect("delivered");
        assert_eq!(second.offset, 101);
        // A later answer does not replace the first.
        completer.complete(Err(ClientError::Timeout));
        assert_eq!(completer.future(3, 2).await.expect("delivered").offset, 102);
    }

    /// A batch dropped unanswered (the producer went away) fails its
    /// records with `Closed` instead of leaving them waiting forever.
    #[tokio::test]
    async fn a_dropped_batch_fails_its_records() {
        let completer = BatchCompleter::new();
        let delivery = completer.future(0, 0);
        let waiting = tokio::spawn(delivery);
        tokio::task::yield_now().await;
        drop(completer);
        let outcome = tokio::time::timeout(Duration::from_secs(60), waiting)
            .await
            .expect("resolved")
            .expect("task");
        assert!(matches!(outcome, Err(ClientError::Closed)), "{outcome:?}");
    }

    /// `Acks::None` answers carry no offsets: every record reports -1.
    #[tokio::test]
    async fn unacknowledged_batches_report_no_offset() {
        let completer = BatchCompleter::new();
        let delivery = completer.future(1, 5);
        completer.complete(Ok(-1));
        assert_eq!(delivery.await.expect("sent").offset, -1);
    }
}
