//! `ConsumerBatch`: the records of one partition as they arrived, checked
//! and decompressed once, read without a copy.

use std::collections::VecDeque;

use bytes::Bytes;
use weir_protocol::{Batches, Compression, Record};

use super::ConsumerRecord;
use crate::error::{ClientError, Result};
use crate::producer::decompress;

/// Records of one partition as they arrived, checked (framing, CRC) and
/// decompressed but not decoded record by record: the way to read at the
/// rate the network delivers. [`ConsumerBatch::records`] walks them without
/// allocating.
#[derive(Debug, Clone)]
pub struct ConsumerBatch {
    pub(super) topic: std::sync::Arc<str>,
    pub(super) partition: u32,
    /// Whole RecordBatches as the broker sent them.
    pub(super) bytes: Bytes,
    /// Decompressed records sections of the compressed batches, in order.
    pub(super) decompressed: Vec<Bytes>,
    /// Records before this offset were already delivered: skipped.
    pub(super) start_offset: u64,
    /// The offset after the last batch.
    pub(super) next_offset: u64,
}

impl ConsumerBatch {
    /// Checks `bytes` and decompresses what needs it.
    pub(super) fn new(
        topic: std::sync::Arc<str>,
        partition: u32,
        bytes: Bytes,
        start_offset: u64,
    ) -> Result<ConsumerBatch> {
        let mut decompressed = Vec::new();
        let mut next_offset = start_offset;
        for batch in Batches::new(&bytes, true) {
            // Errors name the batch: where the application can skip to.
            let batch = batch.map_err(|error| {
                ClientError::Protocol(format!("the batch at offset {next_offset}: {error}"))
            })?;
            if batch.compression() != Compression::None {
                let records =
                    decompress(batch.compression(), batch.records_bytes()).map_err(|error| {
                        ClientError::Protocol(format!(
                            "the batch at offset {}: {error}",
                            batch.base_offset()
                        ))
                    })?;
                decompressed.push(Bytes::from(records));
            }
            next_offset = next_offset.max(batch.next_offset());
        }
        Ok(ConsumerBatch {
            topic,
            partition,
            bytes,
            decompressed,
            start_offset,
            next_offset,
        })
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The partition.
    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// The offset after the last record: where the partition continues.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// The RecordBatch bytes as stored (the first batch may begin before
    /// the consumer's position; [`ConsumerBatch::records`] skips those).
    pub fn raw_bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Each record, borrowed from the batch, in offset order.
    pub fn records(&self) -> impl Iterator<Item = Result<Record<'_>>> + '_ {
        let mut compressed_index = 0;
        Batches::new(&self.bytes, false)
            .filter_map(Result::ok)
            .flat_map(move |batch| {
                let section: &[u8] = if batch.compression() == Compression::None {
                    batch.records_bytes()
                } else {
                    let section = self
                        .decompressed
                        .get(compressed_index)
                        .map_or(&[][..], |bytes| &bytes[..]);
                    compressed_index += 1;
                    section
                };
                batch.records_from(section)
            })
            .map(|record| record.map_err(|error| ClientError::Protocol(error.to_string())))
            .filter(move |record| {
                record
                    .as_ref()
                    .map_or(true, |record| record.offset >= self.start_offset)
            })
    }

    /// Owned records, as [`Consumer::next`](super::Consumer::next) hands them out.
    pub(super) fn to_records(&self, out: &mut VecDeque<ConsumerRecord>) -> Result<()> {
        let mut compressed_index = 0;
        for batch in Batches::new(&self.bytes, false) {
            let batch = batch.map_err(|error| ClientError::Protocol(error.to_string()))?;
            let owner = if batch.compression() == Compression::None {
                self.bytes.clone()
            } else {
                let owner = self
                    .decompressed
                    .get(compressed_index)
                    .cloned()
                    .unwrap_or_default();
                compressed_index += 1;
                owner
            };
            let section = if batch.compression() == Compression::None {
                batch.records_bytes()
            } else {
                &owner[..]
            };
            for record in batch.records_from(section) {
                let record = record.map_err(|error| ClientError::Protocol(error.to_string()))?;
                if record.offset < self.start_offset {
                    continue;
                }
                let slice = |part: Option<&[u8]>| part.map(|part| owner.slice_ref(part));
                out.push_back(ConsumerRecord {
                    topic: self.topic.clone(),
                    partition: self.partition,
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
}
