//! Weir's wire formats: plain data and codecs, no I/O.
//!
//! Layout:
//! - `batch`: the RecordBatch v2 header, a zero-copy parser ([`Batch`]), an
//!   iterator over consecutive batches ([`Batches`]) and the two in-place
//!   patches the broker applies on append (base offset, leader epoch).
//! - `record`: zero-copy iteration over the records and headers of an
//!   uncompressed batch.
//! - `builder`: [`BatchBuilder`], which encodes records once into a batch.
//! - `varint`: Kafka's zig-zag varints.
//! - `error`: [`BatchError`].
//!
//! API boundary: the storage engine depends on this crate for the batch format
//! only; the client will build batches with it without linking storage.

pub mod batch;
pub mod builder;
mod error;
pub mod record;
pub mod varint;

pub use batch::{Batch, Batches, Compression};
pub use builder::{BatchBuilder, ProducerStamp};
pub use error::BatchError;
pub use record::{Header, Record, Records};
