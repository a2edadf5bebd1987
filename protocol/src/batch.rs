//! The RecordBatch v2 layout, byte for byte as Kafka defines it.
//!
//! ```text
//! offset  size  field
//!      0     8  base_offset             patched by the broker on append
//!      8     4  batch_length            bytes after this field
//!     12     4  partition_leader_epoch  patched by the broker on append
//!     16     1  magic (= 2)
//!     17     4  crc                     CRC-32C of bytes 21..end
//!     21     2  attributes              compression, timestamp type, flags
//!     23     4  last_offset_delta
//!     27     8  base_timestamp
//!     35     8  max_timestamp
//!     43     8  producer_id
//!     51     2  producer_epoch
//!     53     4  base_sequence
//!     57     4  records_count
//!     61     …  records (possibly compressed)
//! ```
//! All integers are big-endian. Because the CRC starts at `attributes`, the
//! two fields the broker patches (base offset and leader epoch) never force a
//! re-checksum, let alone a re-encode.

use crate::BatchError;
use crate::record::Records;

/// Bytes before the first record.
pub const BATCH_HEADER_BYTES: usize = 61;
/// Bytes covered by `base_offset` and `batch_length`: the part of the header
/// that is not counted in `batch_length`.
pub const BATCH_LENGTH_PREFIX_BYTES: usize = 12;
/// The only batch format Weir reads or writes.
pub const MAGIC_V2: u8 = 2;
/// Where the CRC-32C coverage begins.
pub const CRC_START: usize = 21;
/// Smallest encoded record: length, attributes, timestamp delta, offset
/// delta, key length, value length and header count, one byte each.
pub const RECORD_BYTES_MIN: usize = 7;

const BASE_OFFSET_AT: usize = 0;
const BATCH_LENGTH_AT: usize = 8;
const LEADER_EPOCH_AT: usize = 12;
const MAGIC_AT: usize = 16;
const CRC_AT: usize = 17;
const ATTRIBUTES_AT: usize = 21;
const LAST_OFFSET_DELTA_AT: usize = 23;
const BASE_TIMESTAMP_AT: usize = 27;
const MAX_TIMESTAMP_AT: usize = 35;
const PRODUCER_ID_AT: usize = 43;
const PRODUCER_EPOCH_AT: usize = 51;
const BASE_SEQUENCE_AT: usize = 53;
const RECORDS_COUNT_AT: usize = 57;

/// Compression codec, bits 0–2 of the attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Records are stored as they are.
    None,
    /// gzip.
    Gzip,
    /// snappy (raw or xerial-framed when read; xerial-framed when written).
    Snappy,
    /// LZ4 frame format.
    Lz4,
    /// Zstandard.
    Zstd,
}

impl Compression {
    /// The codec's id in the attributes field.
    pub fn id(self) -> u16 {
        match self {
            Compression::None => 0,
            Compression::Gzip => 1,
            Compression::Snappy => 2,
            Compression::Lz4 => 3,
            Compression::Zstd => 4,
        }
    }

    fn from_attributes(attributes: u16) -> Result<Self, BatchError> {
        match attributes & 0x07 {
            0 => Ok(Compression::None),
            1 => Ok(Compression::Gzip),
            2 => Ok(Compression::Snappy),
            3 => Ok(Compression::Lz4),
            4 => Ok(Compression::Zstd),
            other => Err(BatchError::UnknownCompression(other as u8)),
        }
    }
}

/// Attribute bit: timestamps were set by the broker at append time.
pub const ATTRIBUTE_LOG_APPEND_TIME: u16 = 1 << 3;
/// Attribute bit: the batch belongs to a transaction.
pub const ATTRIBUTE_TRANSACTIONAL: u16 = 1 << 4;
/// Attribute bit: the batch holds a control record.
pub const ATTRIBUTE_CONTROL: u16 = 1 << 5;

/// A validated, borrowed view of one encoded batch.
///
/// Construct it with [`Batch::parse`] (header and length only, for framing)
/// or [`Batch::parse_verified`] (also the CRC, for anything from outside).
#[derive(Clone, Copy)]
pub struct Batch<'a> {
    bytes: &'a [u8],
}

impl std::fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("base_offset", &self.base_offset())
            .field("records_count", &self.records_count())
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

fn be_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn be_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(word)
}

/// Reads the total size of the batch starting at `bytes[0]` from its length
/// field, without checking anything else. `None` if fewer than 12 bytes are
/// present or the length is negative.
pub fn peek_batch_bytes(bytes: &[u8]) -> Option<usize> {
    if bytes.len() < BATCH_LENGTH_PREFIX_BYTES {
        return None;
    }
    let length = be_u32(bytes, BATCH_LENGTH_AT) as i32;
    usize::try_from(length)
        .ok()
        .map(|len| len + BATCH_LENGTH_PREFIX_BYTES)
}

impl<'a> Batch<'a> {
    /// Parses the batch at the front of `bytes`, checking the framing fields
    /// (length, magic, record count, offset delta, compression) but not the
    /// CRC. Bytes after the batch are ignored; use [`Batch::bytes`] to learn
    /// its extent.
    ///
    /// # Errors
    /// A [`BatchError`] naming the first field that is wrong.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, BatchError> {
        if bytes.len() < BATCH_HEADER_BYTES {
            return Err(BatchError::Truncated {
                needed: BATCH_HEADER_BYTES,
                available: bytes.len(),
            });
        }
        let length = be_u32(bytes, BATCH_LENGTH_AT) as i32;
        let total = usize::try_from(length)
            .ok()
            .map(|len| len + BATCH_LENGTH_PREFIX_BYTES)
            .filter(|total| *total >= BATCH_HEADER_BYTES)
            .ok_or(BatchError::BadLength(length))?;
        if bytes.len() < total {
            return Err(BatchError::Truncated {
                needed: total,
                available: bytes.len(),
            });
        }
        if bytes[MAGIC_AT] != MAGIC_V2 {
            return Err(BatchError::BadMagic(bytes[MAGIC_AT]));
        }
        let batch = Batch {
            bytes: &bytes[..total],
        };
        Compression::from_attributes(batch.attributes())?;
        let count = batch.records_count();
        if count <= 0 {
            return Err(BatchError::NoRecords(count));
        }
        if batch.last_offset_delta() != count - 1 {
            return Err(BatchError::OffsetDeltaMismatch {
                last_offset_delta: batch.last_offset_delta(),
                records_count: count,
            });
        }
        // An uncompressed record takes at least RECORD_BYTES_MIN bytes, so a
        // count the bytes cannot hold is a lie that would burn offsets.
        if batch.compression() == Compression::None
            && count as usize > batch.records_bytes().len() / RECORD_BYTES_MIN
        {
            return Err(BatchError::TooManyRecords {
                count,
                limit: batch.records_bytes().len() / RECORD_BYTES_MIN,
            });
        }
        Ok(batch)
    }

    /// [`Batch::parse`] and then the CRC-32C.
    ///
    /// # Errors
    /// As [`Batch::parse`], or [`BatchError::BadCrc`].
    pub fn parse_verified(bytes: &'a [u8]) -> Result<Self, BatchError> {
        let batch = Self::parse(bytes)?;
        batch.verify_crc()?;
        Ok(batch)
    }

    /// Checks the stored CRC-32C against the bytes it covers.
    ///
    /// # Errors
    /// [`BatchError::BadCrc`] with both values.
    pub fn verify_crc(&self) -> Result<(), BatchError> {
        let computed = crc32c::crc32c(&self.bytes[CRC_START..]);
        let stored = self.crc();
        if computed == stored {
            Ok(())
        } else {
            Err(BatchError::BadCrc { stored, computed })
        }
    }

    /// The whole encoded batch.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Total encoded size.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Never true: a parsed batch holds at least its header.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Offset of the first record (as assigned by the broker).
    pub fn base_offset(&self) -> u64 {
        be_u64(self.bytes, BASE_OFFSET_AT)
    }

    /// Offset of the last record.
    ///
    /// Saturates rather than overflows: the base offset is not covered by
    /// the CRC, so a damaged one must not panic a reader.
    pub fn last_offset(&self) -> u64 {
        self.base_offset()
            .saturating_add(self.last_offset_delta() as u64)
    }

    /// The offset after this batch.
    pub fn next_offset(&self) -> u64 {
        self.last_offset().saturating_add(1)
    }

    /// The leader epoch under which the batch was appended.
    pub fn partition_leader_epoch(&self) -> i32 {
        be_u32(self.bytes, LEADER_EPOCH_AT) as i32
    }

    /// The stored CRC-32C.
    pub fn crc(&self) -> u32 {
        be_u32(self.bytes, CRC_AT)
    }

    /// The raw attributes field.
    pub fn attributes(&self) -> u16 {
        be_u16(self.bytes, ATTRIBUTES_AT)
    }

    /// The compression codec of the records section.
    pub fn compression(&self) -> Compression {
        // Checked in `parse`, so the fallback is unreachable.
        Compression::from_attributes(self.attributes()).unwrap_or(Compression::None)
    }

    /// `records_count - 1`, as stored.
    pub fn last_offset_delta(&self) -> i32 {
        be_u32(self.bytes, LAST_OFFSET_DELTA_AT) as i32
    }

    /// Timestamp of the first record (milliseconds since the epoch).
    pub fn base_timestamp(&self) -> i64 {
        be_u64(self.bytes, BASE_TIMESTAMP_AT) as i64
    }

    /// Largest record timestamp in the batch.
    pub fn max_timestamp(&self) -> i64 {
        be_u64(self.bytes, MAX_TIMESTAMP_AT) as i64
    }

    /// Idempotent producer id, or -1.
    pub fn producer_id(&self) -> i64 {
        be_u64(self.bytes, PRODUCER_ID_AT) as i64
    }

    /// Idempotent producer epoch, or -1.
    pub fn producer_epoch(&self) -> i16 {
        be_u16(self.bytes, PRODUCER_EPOCH_AT) as i16
    }

    /// Sequence number of the first record, or -1.
    pub fn base_sequence(&self) -> i32 {
        be_u32(self.bytes, BASE_SEQUENCE_AT) as i32
    }

    /// Number of records in the batch.
    pub fn records_count(&self) -> i32 {
        be_u32(self.bytes, RECORDS_COUNT_AT) as i32
    }

    /// The records section (compressed if [`Batch::compression`] says so).
    pub fn records_bytes(&self) -> &'a [u8] {
        &self.bytes[BATCH_HEADER_BYTES..]
    }

    /// Iterates the records of an uncompressed batch without copying.
    ///
    /// # Errors
    /// [`BatchError::Compressed`] if the records section is compressed;
    /// decompression belongs to the client.
    pub fn records(&self) -> Result<Records<'a>, BatchError> {
        if self.compression() != Compression::None {
            return Err(BatchError::Compressed(self.compression()));
        }
        Ok(self.records_from(self.records_bytes()))
    }

    /// Iterates records from `decompressed`, the records section of this
    /// (compressed) batch after the caller decompressed it.
    pub fn records_from<'b>(&self, decompressed: &'b [u8]) -> Records<'b> {
        Records::new(
            decompressed,
            self.base_offset(),
            self.base_timestamp(),
            self.records_count(),
        )
    }
}

/// Sets the base offset of an encoded batch in place. The CRC does not cover
/// this field, so nothing else changes.
///
/// # Panics
/// If `bytes` is shorter than a batch header (a caller bug: parse first).
pub fn patch_base_offset(bytes: &mut [u8], base_offset: u64) {
    bytes[BASE_OFFSET_AT..BASE_OFFSET_AT + 8].copy_from_slice(&base_offset.to_be_bytes());
}

/// Sets the partition leader epoch of an encoded batch in place (not covered
/// by the CRC either).
///
/// # Panics
/// If `bytes` is shorter than a batch header.
pub fn patch_leader_epoch(bytes: &mut [u8], epoch: i32) {
    bytes[LEADER_EPOCH_AT..LEADER_EPOCH_AT + 4].copy_from_slice(&epoch.to_be_bytes());
}

/// Rebuilds an encoded uncompressed batch with its records section replaced
/// by `compressed_records` (the same records compressed with `codec` by the
/// caller): attributes, length and CRC are updated; offsets, timestamps and
/// producer fields are kept.
///
/// # Panics
/// If `batch` is shorter than a header (a caller bug: build it first).
pub fn with_compressed_records(
    batch: &[u8],
    codec: Compression,
    compressed_records: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(BATCH_HEADER_BYTES + compressed_records.len());
    out.extend_from_slice(&batch[..BATCH_HEADER_BYTES]);
    out.extend_from_slice(compressed_records);
    let length = (out.len() - BATCH_LENGTH_PREFIX_BYTES) as u32;
    out[BATCH_LENGTH_AT..BATCH_LENGTH_AT + 4].copy_from_slice(&length.to_be_bytes());
    let attributes = (be_u16(&out, ATTRIBUTES_AT) & !0x07) | codec.id();
    out[ATTRIBUTES_AT..ATTRIBUTES_AT + 2].copy_from_slice(&attributes.to_be_bytes());
    let crc = crc32c::crc32c(&out[CRC_START..]);
    out[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
    out
}

/// Iterates over the consecutive batches in `bytes`, checking framing (and the
/// CRC when `verify_crc`). Stops with an error at the first bad batch; a
/// partial batch at the very end is reported as [`BatchError::Truncated`].
#[derive(Debug)]
pub struct Batches<'a> {
    rest: &'a [u8],
    verify_crc: bool,
}

impl<'a> Batches<'a> {
    /// Iterates `bytes` as a sequence of whole batches.
    pub fn new(bytes: &'a [u8], verify_crc: bool) -> Self {
        Batches {
            rest: bytes,
            verify_crc,
        }
    }
}

impl<'a> Iterator for Batches<'a> {
    type Item = Result<Batch<'a>, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let parsed = if self.verify_crc {
            Batch::parse_verified(self.rest)
        } else {
            Batch::parse(self.rest)
        };
        match parsed {
            Ok(batch) => {
                self.rest = &self.rest[batch.len()..];
                Some(Ok(batch))
            }
            Err(error) => {
                self.rest = &[];
                Some(Err(error))
            }
        }
    }
}
