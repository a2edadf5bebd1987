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
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot};
use weir_protocol::batch::with_compressed_records;
use weir_protocol::message::*;
use weir_protocol::{BatchBuilder, Compression, ErrorCode, Request, Response};

use crate::admin::Admin;
use crate::connection::Connection;
use crate::error::{ClientError, Result};
use crate::partitioner::partition_for_key;

/// Longest wait between two attempts of a batch.
pub const RETRY_BACKOFF_MS_MAX: u64 = 5_000;

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
    /// Bytes of records buffered before `send` waits. Default 32 MiB.
    pub buffer_bytes: usize,
    /// Acknowledgement level. Default `All`.
    pub acks: Acks,
    /// Retries of a batch after a retriable error. Default 5.
    pub retries: u32,
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
    /// Numbered batches the broker deduplicates. Default true.
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
            retries: 5,
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

/// Resolves when the record is acknowledged.
pub type DeliveryFuture = oneshot::Receiver<Result<Delivery>>;

struct OpenBatch {
    builder: BatchBuilder,
    created: Instant,
    waiters: Vec<(i32, oneshot::Sender<Result<Delivery>>)>,
    /// Buffer space of every record in the batch, merged into one permit.
    permit: Option<OwnedSemaphorePermit>,
}

struct ReadyBatch {
    topic: String,
    partition: u32,
    bytes: Bytes,
    waiters: Vec<(i32, oneshot::Sender<Result<Delivery>>)>,
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

#[derive(Default)]
struct State {
    open: HashMap<(String, u32), OpenBatch>,
    ready: HashMap<(String, u32), VecDeque<ReadyBatch>>,
    in_flight: HashMap<(String, u32), Window>,
    partition_counts: HashMap<String, u32>,
    sticky: HashMap<String, u32>,
    /// Batches sealed or in flight; `flush` waits for zero.
    outstanding: usize,
    /// Next sequence per partition (idempotent producers).
    sequences: HashMap<(String, u32), i32>,
}

struct Shared {
    connection: Connection,
    /// Set when an idempotent batch failed for good: every later send fails.
    fatal: Mutex<Option<String>>,
    /// Producer id and epoch when idempotent.
    identity: Option<(i64, i16)>,
    config: ProducerConfig,
    buffer: Arc<Semaphore>,
    state: Mutex<State>,
    wake: Notify,
    idle: Notify,
}

/// Sends records to a broker.
///
/// ```no_run
/// # async fn demo() -> Result<(), weir_client::ClientError> {
/// use weir_client::{Producer, ProducerConfig, ProducerRecord};
/// let producer = Producer::connect("127.0.0.1:9092", ProducerConfig::default()).await?;
/// let delivery = producer.send("orders", ProducerRecord::new("hello").key("customer-7")).await?;
/// let placed = delivery.await.expect("producer alive")?;
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
    /// Connects to a broker.
    ///
    /// # Errors
    /// [`ClientError::Connect`].
    pub async fn connect(addr: &str, config: ProducerConfig) -> Result<Producer> {
        let connection =
            Connection::connect(addr, Duration::from_millis(config.request_timeout_ms)).await?;
        let identity = if config.idempotent {
            Some(init_producer_id(&connection, config.producer_name.clone()).await?)
        } else {
            None
        };
        let shared = Arc::new(Shared {
            connection,
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

    async fn partition_count(&self, topic: &str) -> Result<u32> {
        if let Some(count) = lock(&self.shared.state).partition_counts.get(topic) {
            return Ok(*count);
        }
        let count = Admin::with_connection(self.shared.connection.clone())
            .partition_count(topic)
            .await?;
        lock(&self.shared.state)
            .partition_counts
            .insert(topic.to_string(), count);
        Ok(count)
    }

    /// Queues a record; waits while the buffer is full. The returned future
    /// resolves when the record is acknowledged (or finally fails).
    ///
    /// # Errors
    /// `UnknownTopic`, `InvalidArgument` (partition out of range, record
    /// larger than the buffer), connection errors.
    pub async fn send(&self, topic: &str, record: ProducerRecord) -> Result<DeliveryFuture> {
        if let Some(reason) = lock(&self.shared.fatal).clone() {
            return Err(ClientError::ProducerFailed(reason));
        }
        let partitions = self.partition_count(topic).await?;
        let timestamp_ms = record.timestamp_ms.unwrap_or_else(now_ms);
        let headers: Vec<(&str, Option<&[u8]>)> = record
            .headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_deref()))
            .collect();
        let record_bytes = BatchBuilder::new(timestamp_ms).record_bytes(
            timestamp_ms,
            record.key.as_deref(),
            record.value.as_deref(),
            &headers,
        );
        if record_bytes
            > self
                .shared
                .config
                .buffer_bytes
                .min(self.shared.config.record_bytes_max)
        {
            return Err(ClientError::InvalidArgument(format!(
                "record of {record_bytes} bytes exceeds record_bytes_max or the producer buffer"
            )));
        }
        let permit = self
            .shared
            .buffer
            .clone()
            .acquire_many_owned(u32::try_from(record_bytes).unwrap_or(u32::MAX))
            .await
            .map_err(|_| ClientError::Closed)?;
        let (sender, receiver) = oneshot::channel();
        let mut state = lock(&self.shared.state);
        let partition = match (record.partition, &record.key) {
            (Some(partition), _) if partition < partitions => partition,
            (Some(partition), _) => {
                return Err(ClientError::InvalidArgument(format!(
                    "partition {partition} of a {partitions}-partition topic"
                )));
            }
            (None, Some(key)) => partition_for_key(key, partitions),
            (None, None) => match state.sticky.get(topic) {
                Some(partition) => *partition,
                None => {
                    let partition = fastrand_below(partitions);
                    state.sticky.insert(topic.to_string(), partition);
                    partition
                }
            },
        };
        let key = (topic.to_string(), partition);
        let full = state.open.get(&key).is_some_and(|open| {
            open.builder.len_bytes() + record_bytes > self.shared.config.batch_bytes
        });
        if full {
            seal(&self.shared, &mut state, &key);
            if record.key.is_none() && record.partition.is_none() {
                // Sticky: a full batch moves keyless records to another partition.
                let next = (partition + 1) % partitions.max(1);
                state.sticky.insert(topic.to_string(), next);
            }
        }
        let open = state.open.entry(key).or_insert_with(|| OpenBatch {
            builder: BatchBuilder::with_capacity(
                timestamp_ms,
                self.shared.config.batch_bytes.min(4 << 20),
            ),
            created: Instant::now(),
            waiters: Vec::new(),
            permit: None,
        });
        let delta = open.builder.push(
            timestamp_ms,
            record.key.as_deref(),
            record.value.as_deref(),
            &headers,
        );
        open.waiters.push((delta, sender));
        match &mut open.permit {
            Some(held) => held.merge(permit),
            None => open.permit = Some(permit),
        }
        if open.builder.len_bytes() >= self.shared.config.batch_bytes {
            seal(&self.shared, &mut state, &(topic.to_string(), partition));
        }
        drop(state);
        self.shared.wake.notify_one();
        Ok(receiver)
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
                let mut state = lock(&self.shared.state);
                let keys: Vec<(String, u32)> = state.open.keys().cloned().collect();
                for key in keys {
                    seal(&self.shared, &mut state, &key);
                }
                if state.outstanding == 0 {
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

/// Moves an open batch to the partition's ready queue, numbering it if the
/// producer is idempotent.
fn seal(shared: &Shared, state: &mut State, key: &(String, u32)) {
    let Some(mut open) = state.open.remove(key) else {
        return;
    };
    if open.waiters.is_empty() {
        return;
    }
    if let Some((producer_id, producer_epoch)) = shared.identity {
        let sequence = state.sequences.entry(key.clone()).or_insert(0);
        let base_sequence = *sequence;
        // Sequences wrap from i32::MAX to 0, as Kafka's do.
        *sequence = ((i64::from(base_sequence) + i64::from(open.builder.records_count()))
            % (i64::from(i32::MAX) + 1)) as i32;
        open.builder = open.builder.producer(weir_protocol::ProducerStamp {
            producer_id,
            producer_epoch,
            base_sequence,
        });
    }
    state.outstanding += 1;
    state
        .ready
        .entry(key.clone())
        .or_default()
        .push_back(ReadyBatch {
            topic: key.0.clone(),
            partition: key.1,
            bytes: Bytes::from(open.builder.finish()),
            waiters: open.waiters,
            _permit: open.permit,
        });
}

async fn send_loop(shared: Arc<Shared>) {
    let linger = Duration::from_millis(shared.config.linger_ms);
    loop {
        let woken = shared.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let mut to_start = Vec::new();
        let next_deadline = {
            let mut state = lock(&shared.state);
            let limit = match (shared.identity, shared.config.in_flight_per_partition) {
                // The broker remembers a producer's last five batches: a
                // retry further back could not be recognised.
                (Some(_), wanted) => wanted
                    .unwrap_or(IDEMPOTENT_IN_FLIGHT_MAX)
                    .clamp(1, IDEMPOTENT_IN_FLIGHT_MAX),
                (None, wanted) => wanted.unwrap_or(1).max(1),
            };
            // A partition at its in-flight limit (or with sealed batches
            // waiting) keeps its open batch open past linger, so records
            // arriving meanwhile join it: under load batches grow to what
            // one round trip accumulates instead of queueing up tiny ones.
            let window_open = |state: &State, key: &(String, u32)| {
                state
                    .in_flight
                    .get(key)
                    .is_none_or(|window| window.can_start(limit))
            };
            let can_start = |state: &State, key: &(String, u32)| {
                window_open(state, key) && state.ready.get(key).is_none_or(VecDeque::is_empty)
            };
            let due: Vec<(String, u32)> = state
                .open
                .iter()
                .filter(|(key, open)| open.created.elapsed() >= linger && can_start(&state, key))
                .map(|(key, _)| key.clone())
                .collect();
            for key in due {
                seal(&shared, &mut state, &key);
            }
            let startable: Vec<(String, u32)> = state
                .ready
                .iter()
                .filter(|(key, queue)| !queue.is_empty() && window_open(&state, key))
                .map(|(key, _)| key.clone())
                .collect();
            for key in startable {
                while window_open(&state, &key) {
                    let Some(batch) = state.ready.get_mut(&key).and_then(VecDeque::pop_front)
                    else {
                        break;
                    };
                    let index = state.in_flight.entry(key.clone()).or_default().start();
                    to_start.push((key.clone(), index, batch));
                }
            }
            // Blocked partitions are woken by their batch completing.
            state
                .open
                .iter()
                .filter(|(key, _)| can_start(&state, key))
                .map(|(_, open)| open.created + linger)
                .min()
        };
        // Put each batch's first attempt on the wire here, in order: the
        // broker appends a connection's batches in arrival order. Waiting
        // (and any retry) happens in a task per batch.
        for (key, index, batch) in to_start {
            let first = first_attempt(&shared, &batch).await;
            tokio::spawn(deliver(shared.clone(), key, index, batch, first));
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
            name: batch.topic.clone(),
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
    if shared.config.acks == Acks::None {
        return match shared.connection.send_only(request.clone()).await {
            Ok(()) => FirstAttempt::Sent,
            Err(error) => FirstAttempt::Failed(Some(request), error),
        };
    }
    match shared.connection.start_call(request.clone()).await {
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
async fn deliver(
    shared: Arc<Shared>,
    key: (String, u32),
    index: u64,
    batch: ReadyBatch,
    first: FirstAttempt,
) {
    let outcome = finish(&shared, &key, index, first).await;
    if shared.identity.is_some()
        && let Err(error) = &outcome
    {
        // The partition's sequence now has a gap no later batch can fill.
        let mut fatal = lock(&shared.fatal);
        if fatal.is_none() {
            *fatal = Some(format!("a batch for {}/{} failed: {error}", key.0, key.1));
        }
    }
    for (delta, waiter) in batch.waiters {
        let result = match &outcome {
            Ok(base) => Ok(Delivery {
                partition: batch.partition,
                offset: if *base < 0 {
                    -1
                } else {
                    base + i64::from(delta)
                },
            }),
            Err(error) => Err(error.clone()),
        };
        let _ = waiter.send(result);
    }
    {
        let mut state = lock(&shared.state);
        if let Some(window) = state.in_flight.get_mut(&key) {
            window.unresolved.remove(&index);
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
    key: &(String, u32),
    index: u64,
    first: FirstAttempt,
) -> Result<i64> {
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
        let retriable = |error: &ClientError| {
            error.is_retriable()
                || (shared.identity.is_some()
                    && matches!(error, ClientError::Broker(ErrorCode::OutOfOrderSequence)))
        };
        if let Some(reason) = lock(&shared.fatal).clone() {
            if result.is_err() {
                return Err(ClientError::ProducerFailed(reason));
            }
            return result;
        }
        // Waiting behind an earlier batch that is being retried does not
        // use up this batch's retries.
        let behind_a_retry = matches!(
            &result,
            Err(ClientError::Broker(ErrorCode::OutOfOrderSequence))
        ) && lock(&shared.state)
            .in_flight
            .get(key)
            .and_then(|window| window.unresolved.first().copied())
            .is_some_and(|oldest| oldest < index);
        match result {
            Err(error)
                if retriable(&error) && (behind_a_retry || attempt < shared.config.retries) =>
            {
                if !behind_a_retry {
                    attempt += 1;
                }
                tracing::debug!(%error, attempt, "retrying produce");
                tokio::time::sleep(backoff).await;
                backoff = backoff
                    .saturating_mul(2)
                    .min(Duration::from_millis(RETRY_BACKOFF_MS_MAX));
                result = if shared.config.acks == Acks::None {
                    shared
                        .connection
                        .send_only(request.clone())
                        .await
                        .map(|()| -1)
                } else {
                    base_offset(shared.connection.call(request.clone()).await)
                };
            }
            other => return other,
        }
    }
}

/// Compresses a built batch's records section.
fn compress(batch: &Bytes, codec: Compression) -> Result<Bytes> {
    let records = &batch[weir_protocol::batch::BATCH_HEADER_BYTES..];
    let compressed = match codec {
        Compression::None => return Ok(batch.clone()),
        Compression::Lz4 => {
            let mut encoder =
                lz4_flex::frame::FrameEncoder::new(Vec::with_capacity(records.len() / 2));
            std::io::Write::write_all(&mut encoder, records)
                .map_err(|error| ClientError::InvalidArgument(error.to_string()))?;
            encoder
                .finish()
                .map_err(|error| ClientError::InvalidArgument(error.to_string()))?
        }
        Compression::Zstd => zstd::bulk::compress(records, 3)
            .map_err(|error| ClientError::InvalidArgument(error.to_string()))?,
        other => {
            return Err(ClientError::InvalidArgument(format!(
                "{other:?} is not supported for producing"
            )));
        }
    };
    Ok(Bytes::from(with_compressed_records(
        batch,
        codec,
        &compressed,
    )))
}

/// Most bytes one batch's records section may expand to in this client:
/// 64 MiB (the broker refuses batches that expand further), so a hostile
/// or broken batch cannot make a consumer allocate without bound.
pub const DECOMPRESSED_BYTES_MAX: usize = 64 << 20;

/// Decompresses a batch's records section for iteration.
///
/// # Errors
/// [`ClientError::Protocol`] for corrupt or unsupported compressed data, or
/// data that expands past [`DECOMPRESSED_BYTES_MAX`].
pub fn decompress(codec: Compression, records: &[u8]) -> Result<Vec<u8>> {
    use std::io::Read;
    let limit = DECOMPRESSED_BYTES_MAX as u64 + 1;
    let mut out = Vec::new();
    let read = match codec {
        Compression::None => return Ok(records.to_vec()),
        Compression::Lz4 => lz4_flex::frame::FrameDecoder::new(records)
            .take(limit)
            .read_to_end(&mut out),
        Compression::Zstd => zstd::stream::read::Decoder::new(records)
            .and_then(|mut decoder| {
                decoder.window_log_max(24)?;
                Ok(decoder)
            })
            .and_then(|decoder| decoder.take(limit).read_to_end(&mut out)),
        other => {
            return Err(ClientError::Protocol(format!(
                "{other:?} batches are not supported by this client"
            )));
        }
    };
    read.map_err(|error| ClientError::Protocol(error.to_string()))?;
    if out.len() > DECOMPRESSED_BYTES_MAX {
        return Err(ClientError::Protocol(format!(
            "a batch expands past {DECOMPRESSED_BYTES_MAX} bytes"
        )));
    }
    Ok(out)
}
