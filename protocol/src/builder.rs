//! Builds an uncompressed RecordBatch v2 by appending records into one buffer.
//!
//! The builder writes each record once, straight into the batch buffer, and
//! fills in the header and CRC in [`BatchBuilder::finish`]. The base offset is
//! left at zero: the broker assigns it on append by patching the header.

use crate::batch::{BATCH_HEADER_BYTES, BATCH_LENGTH_PREFIX_BYTES, CRC_START, MAGIC_V2};
use crate::varint::{put_varint, put_varlong, varint_len, varlong_len};

/// Producer identity carried by an idempotent batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerStamp {
    /// Producer id from InitProducerId.
    pub producer_id: i64,
    /// Producer epoch.
    pub producer_epoch: i16,
    /// Sequence number of the batch's first record.
    pub base_sequence: i32,
}

impl ProducerStamp {
    /// The stamp of a batch from a non-idempotent producer.
    pub const NONE: ProducerStamp = ProducerStamp {
        producer_id: -1,
        producer_epoch: -1,
        base_sequence: -1,
    };
}

/// Accumulates records into one encoded batch.
#[derive(Debug)]
pub struct BatchBuilder {
    buf: Vec<u8>,
    base_timestamp_ms: i64,
    max_timestamp_ms: i64,
    records_count: i32,
    stamp: ProducerStamp,
}

impl BatchBuilder {
    /// Starts a batch whose timestamps are stored relative to
    /// `base_timestamp_ms` (usually the first record's timestamp).
    pub fn new(base_timestamp_ms: i64) -> Self {
        Self::with_capacity(base_timestamp_ms, 4096)
    }

    /// As [`BatchBuilder::new`], reserving `capacity_bytes` up front.
    pub fn with_capacity(base_timestamp_ms: i64, capacity_bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity_bytes.max(BATCH_HEADER_BYTES));
        buf.resize(BATCH_HEADER_BYTES, 0);
        BatchBuilder {
            buf,
            base_timestamp_ms,
            max_timestamp_ms: base_timestamp_ms,
            records_count: 0,
            stamp: ProducerStamp::NONE,
        }
    }

    /// Marks the batch as coming from an idempotent producer.
    pub fn producer(mut self, stamp: ProducerStamp) -> Self {
        self.stamp = stamp;
        self
    }

    /// Records appended so far.
    pub fn records_count(&self) -> i32 {
        self.records_count
    }

    /// Encoded size if the batch were finished now.
    pub fn len_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Encoded size a record would add, so callers can stop before a limit.
    pub fn record_bytes(
        &self,
        timestamp_ms: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, Option<&[u8]>)],
    ) -> usize {
        let body = self.record_body_bytes(timestamp_ms, key, value, headers);
        varint_len(body as i32) + body
    }

    /// Most bytes a record can take in any batch (timestamp and offset
    /// deltas at their widest), without a builder: enough to size a buffer
    /// or check a limit before choosing the batch.
    pub fn record_bytes_max(
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, Option<&[u8]>)],
    ) -> usize {
        varint_len(i32::MAX) + body_bytes(i64::MIN, i32::MIN, key, value, headers)
    }

    fn record_body_bytes(
        &self,
        timestamp_ms: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, Option<&[u8]>)],
    ) -> usize {
        body_bytes(
            timestamp_ms.wrapping_sub(self.base_timestamp_ms),
            self.records_count,
            key,
            value,
            headers,
        )
    }

    /// Appends one record and returns its offset delta within the batch.
    pub fn push(
        &mut self,
        timestamp_ms: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, Option<&[u8]>)],
    ) -> i32 {
        let body = self.record_body_bytes(timestamp_ms, key, value, headers);
        let offset_delta = self.records_count;
        let buf = &mut self.buf;
        put_varint(buf, body as i32);
        buf.push(0);
        put_varlong(buf, timestamp_ms.wrapping_sub(self.base_timestamp_ms));
        put_varint(buf, offset_delta);
        put_nullable(buf, key);
        put_nullable(buf, value);
        put_varint(buf, headers.len() as i32);
        for (name, header_value) in headers {
            put_nullable(buf, Some(name.as_bytes()));
            put_nullable(buf, *header_value);
        }
        self.records_count += 1;
        self.max_timestamp_ms = self.max_timestamp_ms.max(timestamp_ms);
        offset_delta
    }

    /// Writes the header and CRC and returns the encoded batch (base offset 0,
    /// leader epoch -1 until the broker patches them).
    ///
    /// # Panics
    /// If no record was pushed: an empty batch is not a valid batch.
    pub fn finish(self) -> Vec<u8> {
        assert!(self.records_count > 0, "a batch needs at least one record");
        let mut buf = self.buf;
        let batch_length = (buf.len() - BATCH_LENGTH_PREFIX_BYTES) as u32;
        let header = &mut buf[..BATCH_HEADER_BYTES];
        header[0..8].copy_from_slice(&0u64.to_be_bytes());
        header[8..12].copy_from_slice(&batch_length.to_be_bytes());
        header[12..16].copy_from_slice(&(-1i32).to_be_bytes());
        header[16] = MAGIC_V2;
        header[21..23].copy_from_slice(&0u16.to_be_bytes());
        header[23..27].copy_from_slice(&(self.records_count - 1).to_be_bytes());
        header[27..35].copy_from_slice(&self.base_timestamp_ms.to_be_bytes());
        header[35..43].copy_from_slice(&self.max_timestamp_ms.to_be_bytes());
        header[43..51].copy_from_slice(&self.stamp.producer_id.to_be_bytes());
        header[51..53].copy_from_slice(&self.stamp.producer_epoch.to_be_bytes());
        header[53..57].copy_from_slice(&self.stamp.base_sequence.to_be_bytes());
        header[57..61].copy_from_slice(&self.records_count.to_be_bytes());
        let crc = crc32c::crc32c(&buf[CRC_START..]);
        buf[17..21].copy_from_slice(&crc.to_be_bytes());
        buf
    }
}

/// Encoded size of a record's body (everything after its length prefix)
/// with these deltas.
fn body_bytes(
    timestamp_delta: i64,
    offset_delta: i32,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: &[(&str, Option<&[u8]>)],
) -> usize {
    let nullable = |field: Option<&[u8]>| match field {
        None => varint_len(-1),
        Some(bytes) => varint_len(bytes.len() as i32) + bytes.len(),
    };
    let mut body = 1
        + varlong_len(timestamp_delta)
        + varint_len(offset_delta)
        + nullable(key)
        + nullable(value)
        + varint_len(headers.len() as i32);
    for (name, header_value) in headers {
        body += nullable(Some(name.as_bytes())) + nullable(*header_value);
    }
    body
}

fn put_nullable(buf: &mut Vec<u8>, field: Option<&[u8]>) {
    match field {
        None => put_varint(buf, -1),
        Some(bytes) => {
            put_varint(buf, bytes.len() as i32);
            buf.extend_from_slice(bytes);
        }
    }
}
