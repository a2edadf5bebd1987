//! Weir's wire formats: plain data and codecs, no I/O.
//!
//! Layout:
//! - `batch`: the RecordBatch v2 header, a zero-copy parser ([`Batch`]), an
//!   iterator over consecutive batches ([`Batches`]) and the two in-place
//!   patches the broker applies on append (base offset, leader epoch).
//! - `record`: zero-copy iteration over the records and headers of an
//!   uncompressed batch.
//! - `builder`: [`BatchBuilder`], which encodes records once into a batch.
//! - `codec`: the compression codecs of a records section (gzip, snappy,
//!   lz4, zstd), bounded when decompressing.
//! - `varint`: Kafka's zig-zag varints.
//! - `error`: [`BatchError`].
//! - `frame`: the wire frame (length prefix, header) and [`FrameDecoder`],
//!   which splits a byte stream into frames under a size limit.
//! - `wire`: primitive encodings and limits ([`wire::Reader`], [`wire::Writer`]).
//! - `api`: [`ApiKey`] and the versions spoken, [`ErrorCode`].
//! - `message`: every request, response and push, and their codecs.
//!
//! API boundary: the storage engine depends on this crate for the batch format
//! only; the client builds batches and frames with it without linking storage;
//! docs/PROTOCOL.md specifies every byte this crate reads and writes.

pub mod api;
pub mod batch;
pub mod builder;
pub mod codec;
mod error;
pub mod frame;
pub mod message;
pub mod record;
pub mod varint;
pub mod wire;

pub use api::{ApiKey, ErrorCode};
pub use batch::{Batch, Batches, Compression};
pub use builder::{BatchBuilder, ProducerStamp};
pub use codec::CodecError;
pub use error::BatchError;
pub use frame::{Frame, FrameDecoder, FrameError, FrameHeader, FrameKind};
pub use message::{DecodeError, Request, Response};
pub use record::{Header, Record, Records};
