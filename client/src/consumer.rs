//! `Consumer`: assigned partitions, read through push subscriptions with
//! credit-based flow control, as a `Stream` of records.
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
use weir_protocol::{Batches, Compression, ErrorCode, Request, Response};

use crate::connection::Connection;
use crate::error::{ClientError, Result};
use crate::producer::decompress;

/// Consumer settings.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Bytes each partition may have pushed but not yet taken. Default 4 MiB.
    pub credit_bytes: u32,
    /// How long one call may take. Default 30 s.
    pub request_timeout_ms: u64,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            credit_bytes: 4 << 20,
            request_timeout_ms: 30_000,
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

struct Assignment {
    topic: String,
    /// The same name, shared with every record handed out.
    shared_topic: std::sync::Arc<str>,
    partition: u32,
    subscription_id: u32,
    pushes: mpsc::Receiver<SubscriptionPush>,
    /// Next offset the application should see.
    position: u64,
    records: VecDeque<ConsumerRecord>,
    /// Bytes taken since the last credit grant.
    taken_bytes: u32,
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
    connection: Connection,
    config: ConsumerConfig,
    assignments: Vec<Assignment>,
    next_assignment: usize,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("assignments", &self.assignments.len())
            .finish()
    }
}

impl Consumer {
    /// Connects to a broker.
    ///
    /// # Errors
    /// [`ClientError::Connect`].
    pub async fn connect(addr: &str, config: ConsumerConfig) -> Result<Consumer> {
        let connection =
            Connection::connect(addr, Duration::from_millis(config.request_timeout_ms)).await?;
        Ok(Consumer {
            connection,
            config,
            assignments: Vec::new(),
            next_assignment: 0,
        })
    }

    async fn resolve(&self, topic: &str, partition: u32, start: Offset) -> Result<u64> {
        let spec = match start {
            Offset::At(offset) => return Ok(offset),
            Offset::Earliest => OFFSET_SPEC_EARLIEST,
            Offset::Latest => OFFSET_SPEC_LATEST,
            Offset::Timestamp(timestamp) => timestamp.max(0),
        };
        crate::Admin::with_connection(self.connection.clone())
            .list_offset(topic, partition, spec)
            .await
            .map_err(|error| match error {
                ClientError::Broker(ErrorCode::UnknownTopicOrPartition) => {
                    ClientError::UnknownTopic(topic.to_string())
                }
                other => other,
            })
    }

    /// Starts reading `topic`/`partition` from `start` (replacing an
    /// earlier assignment of the same partition: a seek).
    ///
    /// # Errors
    /// `UnknownTopic`, `Broker(OffsetOutOfRange)`, connection errors.
    pub async fn assign(&mut self, topic: &str, partition: u32, start: Offset) -> Result<()> {
        self.unassign(topic, partition).await?;
        let offset = self.resolve(topic, partition, start).await?;
        let subscription_id = self.connection.next_id();
        // Every push carries at least one batch header's worth of credit,
        // plus one batch of overshoot per push: this many always fit.
        let capacity =
            self.config.credit_bytes as usize / weir_protocol::batch::BATCH_HEADER_BYTES + 16;
        let pushes = self.connection.route_pushes(subscription_id, capacity);
        let response = self
            .connection
            .call(Request::Subscribe(SubscribeRequest {
                subscription_id,
                topic: topic.to_string(),
                partition,
                offset,
                credit_bytes: self.config.credit_bytes,
            }))
            .await;
        let response = match response {
            Ok(Response::Subscribe(response)) => response,
            Ok(other) => {
                return Err(ClientError::Protocol(format!(
                    "unexpected {:?}",
                    other.api()
                )));
            }
            Err(error) => {
                self.connection.forget_pushes(subscription_id);
                return Err(error);
            }
        };
        match response.error {
            ErrorCode::None => {}
            ErrorCode::UnknownTopicOrPartition => {
                self.connection.forget_pushes(subscription_id);
                return Err(ClientError::UnknownTopic(topic.to_string()));
            }
            error => {
                self.connection.forget_pushes(subscription_id);
                return Err(ClientError::Broker(error));
            }
        }
        self.assignments.push(Assignment {
            topic: topic.to_string(),
            shared_topic: std::sync::Arc::from(topic),
            partition,
            subscription_id,
            pushes,
            position: offset,
            records: VecDeque::new(),
            taken_bytes: 0,
        });
        Ok(())
    }

    /// Seeks an assigned partition (or assigns it).
    ///
    /// # Errors
    /// As [`Consumer::assign`].
    pub async fn seek(&mut self, topic: &str, partition: u32, to: Offset) -> Result<()> {
        self.assign(topic, partition, to).await
    }

    /// Stops reading a partition.
    ///
    /// # Errors
    /// Connection errors.
    pub async fn unassign(&mut self, topic: &str, partition: u32) -> Result<()> {
        let Some(index) = self
            .assignments
            .iter()
            .position(|assignment| assignment.topic == topic && assignment.partition == partition)
        else {
            return Ok(());
        };
        let assignment = self.assignments.remove(index);
        let subscription_id = assignment.subscription_id;
        self.connection.forget_pushes(subscription_id);
        drop(assignment);
        self.connection
            .call(Request::Unsubscribe(UnsubscribeRequest { subscription_id }))
            .await?;
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
    pub async fn next(&mut self) -> Option<Result<ConsumerRecord>> {
        std::future::poll_fn(|context| self.poll_record(context)).await
    }

    fn poll_record(&mut self, context: &mut Context<'_>) -> Poll<Option<Result<ConsumerRecord>>> {
        if self.assignments.is_empty() {
            return Poll::Ready(None);
        }
        let count = self.assignments.len();
        for step in 0..count {
            let index = (self.next_assignment + step) % count;
            let assignment = &mut self.assignments[index];
            loop {
                if let Some(record) = assignment.records.pop_front() {
                    assignment.position = record.offset + 1;
                    self.next_assignment = (index + 1) % count;
                    return Poll::Ready(Some(Ok(record)));
                }
                match assignment.pushes.poll_recv(context) {
                    Poll::Ready(Some(push)) => {
                        if !push.error.is_ok() {
                            // The broker ended this subscription.
                            self.assignments.remove(index);
                            self.next_assignment = 0;
                            return Poll::Ready(Some(Err(ClientError::Broker(push.error))));
                        }
                        let bytes = push.records.to_bytes();
                        let pushed = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
                        if let Err(error) = unpack(assignment, &bytes) {
                            return Poll::Ready(Some(Err(error)));
                        }
                        // Return the credit these bytes used once half the
                        // window has been taken, so pushes keep flowing.
                        assignment.taken_bytes = assignment.taken_bytes.saturating_add(pushed);
                        if assignment.taken_bytes >= self.config.credit_bytes / 2 {
                            let grant = std::mem::take(&mut assignment.taken_bytes);
                            let connection = self.connection.clone();
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
                    }
                    Poll::Ready(None) => {
                        // The connection closed: report it once, then drop the partition.
                        self.assignments.remove(index);
                        self.next_assignment = 0;
                        return Poll::Ready(Some(Err(ClientError::Closed)));
                    }
                    Poll::Pending => break,
                }
            }
        }
        Poll::Pending
    }
}

impl futures_core::Stream for Consumer {
    type Item = Result<ConsumerRecord>;

    fn poll_next(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_record(context)
    }
}

/// Turns pushed batches into records at or after the assignment's position.
fn unpack(assignment: &mut Assignment, bytes: &Bytes) -> Result<()> {
    for batch in Batches::new(bytes, true) {
        let batch = batch.map_err(|error| ClientError::Protocol(error.to_string()))?;
        let decompressed;
        let (records, owner) = if batch.compression() == Compression::None {
            (batch.records_from(batch.records_bytes()), bytes.clone())
        } else {
            decompressed = Bytes::from(decompress(batch.compression(), batch.records_bytes())?);
            (batch.records_from(&decompressed), decompressed.clone())
        };
        for record in records {
            let record = record.map_err(|error| ClientError::Protocol(error.to_string()))?;
            if record.offset < assignment.position {
                continue;
            }
            let slice = |part: Option<&[u8]>| part.map(|part| owner.slice_ref(part));
            assignment.records.push_back(ConsumerRecord {
                topic: assignment.shared_topic.clone(),
                partition: assignment.partition,
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
