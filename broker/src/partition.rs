//! A partition: one storage log, its leader epoch, and a signal for readers
//! waiting for new data.
//!
//! Replication comes later; the partition is already shaped as the unit it
//! will drive: it has a leader epoch, and consumers read only below the high
//! watermark, which on one node is the log's published end (durable under
//! `flush = always`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{Notify, watch};
use weir_protocol::{Batch, Batches, Compression, ErrorCode};
use weir_storage::{Log, StorageError};

use crate::producers::{Check, ProducerStates, Stamp};

/// Most bytes the compressed batches of one produce request may expand to
/// when the broker checks their records: 64 MiB, four times the largest
/// batch accepted. Shared by all batches of the request, so a frame full of
/// small, highly compressed batches cannot make the broker expand gigabytes.
pub const DECOMPRESSED_BYTES_MAX: usize = 64 << 20;

/// Largest zstd window accepted (2^24 = 16 MiB, the largest batch).
const ZSTD_WINDOW_LOG_MAX: u32 = 24;

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
    /// Woken after every append anywhere (shared by all partitions of the
    /// broker): a Fetch over several partitions waits on it.
    pub appended: Arc<Notify>,
    /// Woken after every append to this partition: a subscription waits on
    /// it, so an append wakes only the readers of its own partition.
    pub partition_appended: Arc<Notify>,
    /// Set when its topic is deleted: subscriptions end with an error.
    deleted: std::sync::atomic::AtomicBool,
    /// Idempotent producers' last batches, and those not yet durable.
    producers: Arc<Mutex<Producers>>,
    /// Whether any idempotent batch was ever recorded: plain appends then
    /// also purge what failed writes took back.
    stamped_seen: std::sync::atomic::AtomicBool,
}

/// The producer table and the stamped appends still in flight, under one
/// lock with the append itself, so check, append and record are atomic.
#[derive(Debug, Default)]
struct Producers {
    states: ProducerStates,
    /// (producer id, first sequence) → (append id, the append's outcome
    /// once known).
    in_flight: HashMap<(i64, i32), (u64, watch::Receiver<AppendOutcome>)>,
    /// Numbers stamped appends, so a finished one removes only itself.
    next_append_id: u64,
}

/// How a stamped append ended; `None` while it is in flight.
type AppendOutcome = Option<Result<(), ErrorCode>>;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// A stamped append: recorded in the producer table at submit, forgotten
/// again if it fails.
struct StampedAppend {
    producers: Arc<Mutex<Producers>>,
    stamp: Stamp,
    id: u64,
    done: watch::Sender<AppendOutcome>,
}

impl StampedAppend {
    fn finish(self, result: Result<(), ErrorCode>) {
        let mut producers = lock(&self.producers);
        let key = (self.stamp.producer_id, self.stamp.first_sequence);
        if producers
            .in_flight
            .get(&key)
            .is_some_and(|(id, _)| *id == self.id)
        {
            producers.in_flight.remove(&key);
        }
        // A failed write is forgotten when the log reuses its offsets (see
        // `purge_from`), under the log's lock: not here, later and racing.
        drop(producers);
        let _ = self.done.send(Some(result));
    }
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
    /// Wraps an open log, rebuilding its idempotent producers' state.
    pub fn new(topic: String, index: u32, log: Log, appended: Arc<Notify>) -> Arc<Partition> {
        let states = ProducerStates::recover(&log);
        // Replace whatever snapshot was there with one of what is now known,
        // so a stale one cannot be picked up after a later crash.
        if let Err(error) = states.snapshot(log.end_offset()).save(log.dir()) {
            tracing::warn!(%topic, partition = index, %error, "producer snapshot failed");
        }
        let stamped_seen = std::sync::atomic::AtomicBool::new(!states.is_empty());
        let producers = Producers {
            states,
            in_flight: HashMap::new(),
            next_append_id: 0,
        };
        Arc::new(Partition {
            topic,
            index,
            log,
            leader_epoch: 0,
            appended,
            partition_appended: Arc::new(Notify::new()),
            deleted: std::sync::atomic::AtomicBool::new(false),
            producers: Arc::new(Mutex::new(producers)),
            stamped_seen,
        })
    }

    /// Writes the producer snapshot (every batch below the log's end),
    /// so that the next open replays only what follows.
    ///
    /// # Errors
    /// Storage errors writing it.
    pub fn save_producer_state(&self) -> Result<(), StorageError> {
        if self.is_deleted() {
            return Ok(());
        }
        // Copied under the lock, written outside it: appends go on.
        let snapshot = lock(&self.producers).states.snapshot(self.log.end_offset());
        snapshot.save(self.log.dir())
    }

    /// Forgets producers idle for `idle_ms`.
    pub fn expire_producers(&self, now_ms: i64, idle_ms: i64) {
        lock(&self.producers).states.expire(now_ms, idle_ms);
    }

    /// Idempotent producers this partition tracks.
    pub fn producer_count(&self) -> usize {
        lock(&self.producers).states.len()
    }

    /// Marks the partition's topic deleted and wakes its readers.
    pub fn mark_deleted(&self) {
        self.deleted
            .store(true, std::sync::atomic::Ordering::Release);
        self.wake_readers();
    }

    /// Whether its topic was deleted.
    pub fn is_deleted(&self) -> bool {
        self.deleted.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Wakes everyone waiting for this partition's data (an append, a
    /// close, a delete).
    pub fn wake_readers(&self) {
        self.partition_appended.notify_waiters();
        self.appended.notify_waiters();
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
    pub fn submit(&self, records: Bytes) -> Result<PendingAppend, ErrorCode> {
        let config = self.log.config();
        let check = || {
            let mut parsed = Vec::new();
            let mut records_total = 0u64;
            let mut decompressed_budget = DECOMPRESSED_BYTES_MAX;
            for batch in Batches::new(&records, false) {
                let batch = batch.map_err(|_| ErrorCode::CorruptBatch)?;
                if batch.len() > config.batch_bytes_max {
                    return Err(ErrorCode::BatchTooLarge);
                }
                if batch.records_count() as u32 > config.batch_records_max {
                    return Err(ErrorCode::CorruptBatch);
                }
                check_records(&batch, &mut decompressed_budget)?;
                records_total += batch.records_count() as u64;
                parsed.push(batch);
            }
            Ok((parsed, records_total))
        };
        // Decompressing up to DECOMPRESSED_BYTES_MAX takes tens of
        // milliseconds: let the runtime move other tasks off this worker.
        let compressed = Batches::new(&records, false)
            .any(|batch| batch.is_ok_and(|batch| batch.compression() != Compression::None));
        let (parsed, records_total) = if compressed {
            crate::blocking::blocking(check)?
        } else {
            check()?
        };
        let stamps = parsed
            .iter()
            .map(Stamp::of)
            .collect::<Result<Vec<_>, _>>()?;
        if stamps.iter().any(Option::is_some) {
            // As in Kafka: an idempotent batch travels alone, so that a
            // retry is exactly one earlier batch.
            let ([batch], [Some(stamp)]) = (&parsed[..], &stamps[..]) else {
                return Err(ErrorCode::InvalidRequest);
            };
            let (stamp, length) = (*stamp, batch.len());
            drop(parsed);
            let mut owned = records;
            owned.truncate(length);
            return self.submit_stamped(owned, stamp, records_total);
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
        if parsed.is_empty() {
            return Err(ErrorCode::CorruptBatch);
        }
        let lengths: Vec<usize> = parsed.iter().map(Batch::len).collect();
        drop(parsed);
        // A lone batch goes to the log as it is: the log patches and writes
        // it in place, without a copy when it is its buffer's only user (as
        // the reader arranges for large frames). Several are copied apart,
        // so that none keeps the others' memory alive in the log's cache.
        let batches: Vec<Bytes> = if let [length] = lengths[..] {
            let mut lone = records;
            lone.truncate(length);
            vec![lone]
        } else {
            let mut rest = &records[..];
            lengths
                .iter()
                .map(|length| {
                    let (batch, after) = rest.split_at(*length);
                    rest = after;
                    Bytes::copy_from_slice(batch)
                })
                .collect()
        };
        let bytes_total = lengths.iter().map(|length| *length as u64).sum();
        let mut futures = Vec::with_capacity(batches.len());
        let mut failure = None;
        for batch in batches {
            let appended = if self.stamped_seen.load(std::sync::atomic::Ordering::Acquire) {
                // Offsets a failed write took back may now be reused: the
                // producer table must forget the batches that had them.
                let mut producers = lock(&self.producers);
                self.log
                    .append_checked(batch, |next_offset| {
                        producers.states.purge_from(next_offset);
                        Ok::<(), std::convert::Infallible>(())
                    })
                    .map(|checked| match checked {
                        Ok(future) => future,
                        Err(never) => match never {},
                    })
            } else {
                self.log.append(batch)
            };
            match appended {
                Ok(future) => futures.push(future),
                Err(error) => {
                    failure = Some(storage_error_code(&error));
                    break;
                }
            }
        }
        Ok(self.complete(futures, failure, records_total, bytes_total, None))
    }

    /// A stamped (idempotent) batch: a duplicate is answered with the
    /// original's offset once that is durable; a new one is appended and
    /// recorded.
    fn submit_stamped(
        &self,
        batch: Bytes,
        stamp: Stamp,
        records_total: u64,
    ) -> Result<PendingAppend, ErrorCode> {
        let batch_bytes = batch.len() as u64;
        self.stamped_seen
            .store(true, std::sync::atomic::Ordering::Release);
        let mut guard = lock(&self.producers);
        let producers = &mut *guard;
        // Decided under the log's writer lock, after it repaired any failed
        // write: batches whose offsets it took back are forgotten first.
        let appended = self
            .log
            .append_checked(batch, |next_offset| {
                producers.states.purge_from(next_offset);
                match producers.states.check(&stamp) {
                    Ok(Check::Append) => Ok(()),
                    Ok(Check::Duplicate(base_offset)) => Err(Ok(base_offset)),
                    Err(code) => Err(Err(code)),
                }
            })
            .map_err(|error| storage_error_code(&error))?;
        match appended {
            Err(Err(code)) => Err(code),
            Err(Ok(base_offset)) => {
                let original = producers
                    .in_flight
                    .get(&(stamp.producer_id, stamp.first_sequence))
                    .map(|(_, outcome)| outcome.clone());
                drop(guard);
                let answer = Appended {
                    base_offset,
                    log_start_offset: self.log.start_offset(),
                    records: 0,
                    bytes: 0,
                };
                let (sender, receiver) = tokio::sync::oneshot::channel();
                match original {
                    None => {
                        let _ = sender.send(Ok(answer));
                    }
                    Some(mut original) => {
                        // Answered only once the original is durable (or
                        // with its failure, and the client retries).
                        tokio::spawn(async move {
                            let outcome = match original.wait_for(Option::is_some).await {
                                Ok(outcome) => outcome.unwrap_or(Err(ErrorCode::Unknown)),
                                Err(_) => Err(ErrorCode::ShuttingDown),
                            };
                            let _ = sender.send(outcome.map(|()| answer));
                        });
                    }
                }
                Ok(PendingAppend { receiver })
            }
            Ok(future) => {
                let bytes_total = batch_bytes;
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |elapsed| elapsed.as_millis() as i64);
                producers
                    .states
                    .record(&stamp, future.base_offset(), now_ms);
                let id = producers.next_append_id;
                producers.next_append_id += 1;
                let (done, outcome) = watch::channel(None);
                producers
                    .in_flight
                    .insert((stamp.producer_id, stamp.first_sequence), (id, outcome));
                drop(guard);
                let stamped = StampedAppend {
                    producers: self.producers.clone(),
                    stamp,
                    id,
                    done,
                };
                Ok(self.complete(
                    vec![future],
                    None,
                    records_total,
                    bytes_total,
                    Some(stamped),
                ))
            }
        }
    }

    /// Waits for `futures` in a task of its own (which also wakes readers
    /// and settles a stamped append) and returns what resolves with them.
    fn complete(
        &self,
        futures: Vec<weir_storage::AppendFuture>,
        failure: Option<ErrorCode>,
        records_total: u64,
        bytes_total: u64,
        stamped: Option<StampedAppend>,
    ) -> PendingAppend {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let appended = self.appended.clone();
        let partition_appended = self.partition_appended.clone();
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
            partition_appended.notify_waiters();
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
            if let Some(stamped) = stamped {
                stamped.finish(result.map(|_| ()));
            }
            let _ = sender.send(result);
        });
        PendingAppend { receiver }
    }
}

/// Checks that every record of a batch parses, carries the offset delta of
/// its position and that nothing follows the last, so consumers can trust
/// `offset`. lz4 and zstd batches are decompressed for it (as Kafka does),
/// within `decompressed_budget`; gzip and snappy ones, which Weir only
/// stores, are checked by framing (and CRC, later) only.
fn check_records(
    batch: &weir_protocol::Batch<'_>,
    decompressed_budget: &mut usize,
) -> Result<(), ErrorCode> {
    let decompressed;
    let mut records = match batch.compression() {
        Compression::None => batch.records_from(batch.records_bytes()),
        Compression::Lz4 | Compression::Zstd => {
            // Decompressing costs far more than a CRC pass: refuse a
            // damaged batch before spending it.
            batch.verify_crc().map_err(|_| ErrorCode::CorruptBatch)?;
            decompressed = decompress(
                batch.compression(),
                batch.records_bytes(),
                *decompressed_budget,
            )
            .ok_or(ErrorCode::CorruptBatch)?;
            *decompressed_budget -= decompressed.len();
            batch.records_from(&decompressed)
        }
        // Stored as sent: Weir reads neither, and checks their framing only.
        Compression::Gzip | Compression::Snappy => return Ok(()),
    };
    let mut count = 0i64;
    for position in 0.. {
        let Some(record) = records.next() else {
            break;
        };
        let record = record.map_err(|_| ErrorCode::CorruptBatch)?;
        if record.offset != batch.base_offset() + position as u64 {
            return Err(ErrorCode::CorruptBatch);
        }
        count += 1;
    }
    if count != i64::from(batch.records_count()) || records.rest_bytes() != 0 {
        // Too few records, or bytes after the last one.
        return Err(ErrorCode::CorruptBatch);
    }
    Ok(())
}

/// A compressed records section, decompressed; `None` if it is corrupt or
/// would exceed `bytes_max` (a small batch must not expand into gigabytes).
fn decompress(codec: Compression, bytes: &[u8], bytes_max: usize) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    let limit = bytes_max as u64 + 1;
    let read = match codec {
        Compression::Lz4 => lz4_flex::frame::FrameDecoder::new(bytes)
            .take(limit)
            .read_to_end(&mut out),
        Compression::Zstd => {
            let mut decoder = zstd::stream::read::Decoder::new(bytes).ok()?;
            // A window larger than a batch can be is not a real producer's.
            decoder.window_log_max(ZSTD_WINDOW_LOG_MAX).ok()?;
            decoder.take(limit).read_to_end(&mut out)
        }
        _ => return None,
    };
    (read.is_ok() && out.len() <= bytes_max).then_some(out)
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
