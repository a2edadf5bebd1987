//! Weir's async client.
//!
//! Layout:
//! - `connection`: one multiplexed connection (correlation ids, pushes).
//! - `admin`: [`Admin`] — topics and offsets.
//! - `producer`: [`Producer`] — batching, compression, acks, retries,
//!   backpressure through a bounded buffer.
//! - `consumer`: [`Consumer`] — assigned partitions read through push
//!   subscriptions with credit-based flow control, record by record, chunk
//!   by chunk, or as a `Stream` ([`Consumer::into_stream`]).
//! - `partitioner`: Kafka's murmur2, so keys land where Kafka users expect.
//! - `error`: [`ClientError`].
//!
//! API boundary: depends on `weir-protocol` only, never on the broker or the
//! storage engine.

pub mod admin;
pub mod connection;
pub mod consumer;
mod error;
pub mod group;
pub mod partitioner;
pub mod producer;
pub mod router;

pub use admin::Admin;
pub use consumer::{Consumer, ConsumerBatch, ConsumerConfig, ConsumerRecord, Offset, RecordStream};
pub use error::{ClientError, Result};
pub use group::{GroupConfig, RebalanceListener};
pub use producer::{Acks, Delivery, DeliveryFuture, Producer, ProducerConfig, ProducerRecord};
pub use weir_protocol::Compression;
pub use weir_protocol::Record;
