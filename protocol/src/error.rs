//! Why a batch was refused.

use crate::batch::Compression;

/// A batch that is not a well-formed RecordBatch v2.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// Fewer bytes than the header or the length field claims.
    #[error("batch truncated: needs {needed} bytes, {available} present")]
    Truncated {
        /// Bytes the batch needs.
        needed: usize,
        /// Bytes present.
        available: usize,
    },
    /// The length field is negative or shorter than a header.
    #[error("batch length field {0} is invalid")]
    BadLength(i32),
    /// Not magic 2.
    #[error("batch magic {0} is not 2")]
    BadMagic(u8),
    /// Stored and computed CRC-32C differ.
    #[error("batch crc mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadCrc {
        /// CRC in the header.
        stored: u32,
        /// CRC of the bytes.
        computed: u32,
    },
    /// Zero or a negative number of records.
    #[error("batch has {0} records; at least one is required")]
    NoRecords(i32),
    /// `last_offset_delta` does not equal `records_count - 1`.
    #[error("batch last offset delta {last_offset_delta} does not match {records_count} records")]
    OffsetDeltaMismatch {
        /// Stored last offset delta.
        last_offset_delta: i32,
        /// Stored record count.
        records_count: i32,
    },
    /// More records than the batch's bytes can hold, or than a limit allows.
    #[error("batch claims {count} records; at most {limit} allowed")]
    TooManyRecords {
        /// Stored record count.
        count: i32,
        /// The most the batch (or the configured limit) allows.
        limit: usize,
    },
    /// The compression bits (0–2 of the attributes) hold 5, 6 or 7.
    #[error("unknown compression codec {0}")]
    UnknownCompression(u8),
    /// Records of a compressed batch cannot be read without decompressing.
    #[error("batch records are compressed with {0:?}")]
    Compressed(Compression),
    /// A varint ran past its maximum length or the input.
    #[error("malformed varint")]
    Varint,
    /// A record inside the batch is malformed.
    #[error("malformed record: {0}")]
    BadRecord(&'static str),
}
