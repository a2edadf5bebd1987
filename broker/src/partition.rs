//! A partition: one storage log, its leader epoch, and a signal for readers
//! waiting for new data.
//!
//! Replication comes later; the partition is already shaped as the unit it
//! will drive: it has a leader epoch, and consumers read only below the high
//! watermark, which on one node is the log's published end (durable under
//! `flush = always`).

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::Notify;
use weir_protocol::{Batches, ErrorCode};
use weir_storage::{Log, StorageError};

/// One partition of a topic.
#[derive(Debug)]
pub struct Partition {
    /// Topic name.
    pub topic: String,
    /// Partition index.
    pub index: u32,
    /// The storage log.
    pub log: Log,
    /// Current leader epoch (0 on a single node).
    pub leader_epoch: i32,
    /// Woken after every append (shared by all partitions of the broker).
    pub appended: Arc<Notify>,
}

/// What an append did.
#[derive(Debug, Clone, Copy)]
pub struct Appended {
    /// Offset of the first record.
    pub base_offset: u64,
    /// The partition's first stored offset when the append was submitted.
    pub log_start_offset: u64,
    /// Records appended.
    pub records: u64,
    /// Bytes appended.
    pub bytes: u64,
}

impl Partition {
    /// Wraps an open log.
    pub fn new(topic: String, index: u32, log: Log, appended: Arc<Notify>) -> Arc<Partition> {
        Arc::new(Partition {
            topic,
            index,
            log,
            leader_epoch: 0,
            appended,
        })
    }

    /// Offsets below it are readable by consumers.
    pub fn high_watermark(&self) -> u64 {
        self.log.end_offset()
    }

    /// Checks every batch in `records` (framing, CRC, size, record count)
    /// and, only if all pass, hands them to the log in order. Synchronous,
    /// so that a connection's produce requests reach a partition in the
    /// order they arrived. A storage failure while submitting can leave a
    /// prefix appended.
    ///
    /// The returned [`PendingAppend`] resolves when the flush policy is met.
    /// Waiting for that happens in a task of its own, which also wakes
    /// readers, so a produce request that times out or is dropped never
    /// leaves fetches and subscriptions unaware of data that did land.
    ///
    /// # Errors
    /// An [`ErrorCode`] for the client: CorruptBatch, BatchTooLarge,
    /// StorageFull, StorageError, ShuttingDown.
    pub fn submit(&self, records: &Bytes) -> Result<PendingAppend, ErrorCode> {
        let config = self.log.config();
        let mut parsed = Vec::new();
        let mut records_total = 0u64;
        for batch in Batches::new(records, false) {
            let batch = batch.map_err(|_| ErrorCode::CorruptBatch)?;
            if batch.len() > config.batch_bytes_max {
                return Err(ErrorCode::BatchTooLarge);
            }
            if batch.records_count() as u32 > config.batch_records_max {
                return Err(ErrorCode::CorruptBatch);
            }
            check_records(&batch)?;
            records_total += batch.records_count() as u64;
            parsed.push(batch);
        }
        // The log checks each batch's CRC as it appends. A lone batch is
        // left to that check (one pass over the bytes, not two); several
        // are checked here first, so that a bad one refuses them all rather
        // than leaving a prefix appended.
        if parsed.len() > 1 {
            for batch in &parsed {
                batch.verify_crc().map_err(|_| ErrorCode::CorruptBatch)?;
            }
        }
        let batches: Vec<Vec<u8>> = parsed.iter().map(|batch| batch.bytes().to_vec()).collect();
        let bytes_total = batches.iter().map(|batch| batch.len() as u64).sum();
        if batches.is_empty() {
            return Err(ErrorCode::CorruptBatch);
        }
        let mut futures = Vec::with_capacity(batches.len());
        let mut failure = None;
        for batch in batches {
            match self.log.append(batch) {
                Ok(future) => futures.push(future),
                Err(error) => {
                    failure = Some(storage_error_code(&error));
                    break;
                }
            }
        }
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let appended = self.appended.clone();
        let log_start_offset = self.log.start_offset();
        tokio::spawn(async move {
            let mut first = None;
            let mut outcome = Ok(());
            for future in futures {
                match future.await {
                    Ok(info) => {
                        first.get_or_insert(info.base_offset);
                    }
                    Err(error) => {
                        outcome = Err(storage_error_code(&error));
                        break;
                    }
                }
            }
            appended.notify_waiters();
            let result = match (failure, outcome) {
                (Some(code), _) | (None, Err(code)) => Err(code),
                (None, Ok(())) => Ok(Appended {
                    base_offset: first.unwrap_or(0),
                    records: records_total,
                    bytes: bytes_total,
                    log_start_offset,
                }),
            };
            let _ = sender.send(result);
        });
        Ok(PendingAppend { receiver })
    }
}

/// Checks that every record of an uncompressed batch parses and carries the
/// offset delta of its position, so consumers can trust `offset`. Compressed
/// batches are checked by their CRC and framing only (decompressing them here
/// would cost the broker what the client saved).
fn check_records(batch: &weir_protocol::Batch<'_>) -> Result<(), ErrorCode> {
    let Ok(records) = batch.records() else {
        return Ok(());
    };
    let mut count = 0i64;
    for (position, record) in records.enumerate() {
        let record = record.map_err(|_| ErrorCode::CorruptBatch)?;
        if record.offset != batch.base_offset() + position as u64 {
            return Err(ErrorCode::CorruptBatch);
        }
        count += 1;
    }
    if count != i64::from(batch.records_count()) {
        return Err(ErrorCode::CorruptBatch);
    }
    Ok(())
}

/// An append handed to the log, not yet durable.
#[derive(Debug)]
pub struct PendingAppend {
    receiver: tokio::sync::oneshot::Receiver<Result<Appended, ErrorCode>>,
}

impl PendingAppend {
    /// Resolves when the flush policy is met for every batch.
    ///
    /// # Errors
    /// The append's [`ErrorCode`].
    pub async fn wait(self) -> Result<Appended, ErrorCode> {
        self.receiver.await.unwrap_or(Err(ErrorCode::ShuttingDown))
    }
}

/// The error code for a storage error.
pub fn storage_error_code(error: &StorageError) -> ErrorCode {
    match error {
        StorageError::InvalidBatch(_) | StorageError::UnexpectedOffset { .. } => {
            ErrorCode::CorruptBatch
        }
        StorageError::BatchTooLarge { .. } => ErrorCode::BatchTooLarge,
        StorageError::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
        StorageError::StorageFull { .. } => ErrorCode::StorageFull,
        StorageError::Closed => ErrorCode::ShuttingDown,
        StorageError::Corrupt { .. }
        | StorageError::Io { .. }
        | StorageError::WriteFailed
        | StorageError::SyncFailed { .. }
        | StorageError::Locked { .. }
        | StorageError::EngineStart(_) => ErrorCode::StorageError,
    }
}
