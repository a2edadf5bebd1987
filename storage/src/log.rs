//! One partition's log: append, read, truncate, retention, roll, close.
//!
//! Writers and readers meet at two points:
//! - the writer lock (`Log::writer`) orders appends: it assigns offsets and
//!   byte positions and hands the write to the io engine while held, so the
//!   engine sees each log's writes in offset order;
//! - the engine completes writes in that order on its thread; each completion
//!   publishes its segment's extent and then the log's end offset (Release).
//!   Readers load the end offset (Acquire) and never look past it.
//!
//! A failed write (I/O error, full disk) fails its append and every append
//! queued behind it. The next writer-side operation waits for in-flight
//! writes to drain, zeroes the bytes after the published end and resets the
//! offsets to it, so the log is again exactly what was acknowledged.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use tokio::sync::oneshot;
use weir_protocol::batch::{patch_base_offset, patch_leader_epoch};
use weir_protocol::{Batch, BatchError, Batches};

use crate::checkpoint::{self, CLEAN_SHUTDOWN_FILE, EpochCache, RECOVERY_POINT_FILE};
use crate::config::{LogConfig, RECENT_CACHE_BYTES_MIN, WriteMode};
use crate::engine::direct::{DIRECT_BLOCK_BYTES, DirectFile};
use crate::engine::{IoEngine, Request, WriteRequest};
use crate::error::{Result, StorageError};
use crate::index;
use crate::recent::{CachedBatch, RecentBatches};
use crate::recovery::{self, RecoveryReport};
use crate::segment::Segment;

/// How far past a read from a segment the log asks the kernel to read
/// ahead. A reader catching up on data that direct writes left out of the
/// page cache then overlaps its network sends with the device's reads.
pub const READ_AHEAD_BYTES: usize = 32 << 20;

/// What an append wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendInfo {
    /// Offset of the batch's first record.
    pub base_offset: u64,
    /// Offset of its last record.
    pub last_offset: u64,
    /// The batch's max timestamp.
    pub max_timestamp_ms: i64,
}

/// Resolves when an append has met the flush policy.
///
/// `await` it from async code or call [`AppendFuture::wait`] from a thread.
#[derive(Debug)]
pub struct AppendFuture {
    receiver: oneshot::Receiver<Result<AppendInfo>>,
    base_offset: u64,
}

impl AppendFuture {
    /// The offset the batch's first record will have if the append
    /// completes (known as soon as it is submitted: appends are ordered).
    pub fn base_offset(&self) -> u64 {
        self.base_offset
    }

    /// Blocks the current thread until the append completes.
    ///
    /// # Errors
    /// The append's error, or [`StorageError::Closed`] if the engine stopped.
    ///
    /// # Panics
    /// If called from inside an async runtime (await the future there).
    pub fn wait(self) -> Result<AppendInfo> {
        self.receiver
            .blocking_recv()
            .unwrap_or(Err(StorageError::Closed))
    }
}

impl Future for AppendFuture {
    type Output = Result<AppendInfo>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.receiver)
            .poll(cx)
            .map(|received| received.unwrap_or(Err(StorageError::Closed)))
    }
}

/// Whole batches, borrowed from a segment's memory map or shared with the
/// recent-batch cache; no bytes are copied.
///
/// Holding a `LogRead` keeps its segment's map alive even if retention
/// deletes the segment meanwhile.
pub struct LogRead {
    parts: Vec<ReadPart>,
    len: usize,
    next_offset: u64,
}

/// One chunk of a [`LogRead`], owning what keeps its bytes alive.
pub struct LogChunk(ReadPart);

impl AsRef<[u8]> for LogChunk {
    fn as_ref(&self) -> &[u8] {
        self.0.bytes()
    }
}

impl fmt::Debug for LogChunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogChunk")
            .field("bytes", &self.as_ref().len())
            .finish()
    }
}

/// A batch handed to [`Log::append`]: bytes the log owns from then on and
/// patches in place (base offset, leader epoch) before writing them, so
/// that a batch read off the network reaches the disk without a copy.
///
/// The log keeps what it is given alive (in the recent-batch cache) while
/// counting only the batch's length, so a caller should hand over a buffer
/// that is mostly this batch, not a small slice of a large one.
pub trait IntoBatchBytes {
    /// Length of the batch, checked before anything is copied.
    fn batch_len(&self) -> usize;

    /// The bytes, owned and writable.
    fn into_batch_bytes(self) -> BytesMut;
}

impl IntoBatchBytes for BytesMut {
    fn batch_len(&self) -> usize {
        self.len()
    }

    fn into_batch_bytes(self) -> BytesMut {
        self
    }
}

impl IntoBatchBytes for Vec<u8> {
    fn batch_len(&self) -> usize {
        self.len()
    }

    fn into_batch_bytes(self) -> BytesMut {
        Bytes::from(self).into_batch_bytes()
    }
}

impl IntoBatchBytes for Bytes {
    fn batch_len(&self) -> usize {
        self.len()
    }

    /// Without a copy when these bytes are the only handle on their buffer
    /// (which then stays alive whole); copied otherwise.
    fn into_batch_bytes(self) -> BytesMut {
        self.try_into_mut()
            .unwrap_or_else(|shared| BytesMut::from(&shared[..]))
    }
}

enum ReadPart {
    Mapped {
        segment: Arc<Segment>,
        start: usize,
        end: usize,
    },
    Cached(Bytes),
}

impl ReadPart {
    fn bytes(&self) -> &[u8] {
        match self {
            ReadPart::Mapped {
                segment,
                start,
                end,
            } => segment.map_slice(*start, *end),
            ReadPart::Cached(bytes) => bytes,
        }
    }
}

impl fmt::Debug for LogRead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogRead")
            .field("bytes", &self.len)
            .field("chunks", &self.parts.len())
            .field("next_offset", &self.next_offset)
            .finish()
    }
}

impl LogRead {
    fn empty(next_offset: u64) -> Self {
        LogRead {
            parts: Vec::new(),
            len: 0,
            next_offset,
        }
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing was read (the reader is at the end).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes in order, as one or more chunks of whole batches (for a
    /// vectored write to a socket).
    pub fn chunks(&self) -> impl Iterator<Item = &[u8]> {
        self.parts.iter().map(ReadPart::bytes)
    }

    /// The bytes copied into one buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        for chunk in self.chunks() {
            out.extend_from_slice(chunk);
        }
        out
    }

    /// The offset after the last batch returned: where the next read starts.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// The chunks as owned values that keep their memory alive (a segment
    /// map or a cached batch), for handing to a network layer without copying.
    pub fn into_chunks(self) -> Vec<LogChunk> {
        self.parts.into_iter().map(LogChunk).collect()
    }

    /// Iterates the batches (already checked when read).
    pub fn batches(&self) -> impl Iterator<Item = Batch<'_>> {
        self.chunks()
            .flat_map(|chunk| Batches::new(chunk, false).filter_map(|batch| batch.ok()))
    }
}

/// Removed by [`Log::apply_retention`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionOutcome {
    /// Segments deleted.
    pub segments_deleted: usize,
    /// Bytes they held.
    pub bytes_deleted: u64,
}

struct PublishState {
    /// Appends handed to the engine and not yet completed.
    in_flight: usize,
    /// A write failed; appends behind it fail until the writer repairs.
    failed: bool,
}

/// State shared with completions running on the engine thread.
struct Shared {
    segments: RwLock<BTreeMap<u64, Arc<Segment>>>,
    /// Offset after the last published batch.
    end_offset: AtomicU64,
    /// First offset still stored.
    start_offset: AtomicU64,
    publish: Mutex<PublishState>,
    /// Signalled when `in_flight` reaches zero.
    drained: Condvar,
    /// Newest batches, in direct mode (lock after `publish`, never before).
    recent: Mutex<RecentBatches>,
    /// Raised by the io engine when an interval sync of this log fails.
    sync_failed: Arc<AtomicBool>,
}

/// State only the appender (holding the writer lock) touches.
struct Writer {
    /// Next offset to assign (≥ the published end while writes are in flight).
    next_offset: u64,
    active: Arc<Segment>,
    /// Next byte position in the active segment.
    write_position: u64,
    /// Bytes appended since the last index entry.
    bytes_since_index: u64,
    /// Largest timestamp in the active segment so far.
    active_max_timestamp_ms: i64,
    /// When the active segment started taking appends (age roll).
    active_since: Instant,
    epochs: EpochCache,
    /// Segments below this base were synced; recovery scans from here.
    recovery_point: u64,
    closed: bool,
}

/// A partition log in one directory. Cheap to share behind an `Arc`: every
/// method takes `&self`.
pub struct Log {
    dir: PathBuf,
    config: LogConfig,
    engine: Arc<IoEngine>,
    shared: Arc<Shared>,
    writer: Mutex<Writer>,
    report: RecoveryReport,
    /// Holds the directory's advisory lock for the life of the log.
    _lock_file: std::fs::File,
    /// Appends use O_DIRECT (the configured mode, unless the filesystem refused it).
    direct: bool,
}

impl fmt::Debug for Log {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Log")
            .field("dir", &self.dir)
            .field("start_offset", &self.start_offset())
            .field("end_offset", &self.end_offset())
            .finish()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

impl Log {
    /// Opens the log in `dir` (creating it if needed), recovering it as
    /// `recovery` describes, and removes the clean-shutdown marker before
    /// any append can happen.
    ///
    /// # Errors
    /// I/O errors, with the path.
    pub fn open(dir: impl AsRef<Path>, config: LogConfig, engine: Arc<IoEngine>) -> Result<Log> {
        let dir = dir.as_ref().to_path_buf();
        let config = LogConfig {
            batch_bytes_max: config
                .batch_bytes_max
                .min(config.segment_bytes_max as usize),
            ..config
        };
        if !dir.exists() {
            std::fs::create_dir_all(&dir).map_err(|error| StorageError::io(&dir, error))?;
            if let Some(parent) = dir.parent() {
                checkpoint::sync_dir(parent)?;
            }
        }
        let lock_file = lock_directory(&dir)?;
        let recovered = recovery::recover(&dir, &config)?;
        let mut segments = recovered.segments;
        // An empty active segment whose map is smaller than a full segment
        // (recovery cut a sealed one back to nothing) is replaced by a fresh
        // one, so that an empty active segment always has full room.
        let undersized = segments
            .iter()
            .next_back()
            .filter(|(_, last)| {
                last.published_bytes() == 0 && last.mapped_bytes() < config.segment_bytes_max
            })
            .map(|(base, _)| *base);
        if let Some(base) = undersized
            && let Some(stale) = segments.remove(&base)
        {
            stale.delete_files()?;
            drop(stale);
            let fresh = Segment::create(
                &dir,
                base,
                config.segment_bytes_max,
                index_capacity(&config),
            )?;
            segments.insert(base, Arc::new(fresh));
        }
        if segments.is_empty() {
            let segment =
                Segment::create(&dir, 0, config.segment_bytes_max, index_capacity(&config))?;
            segments.insert(0, Arc::new(segment));
        }
        checkpoint::sync_dir(&dir)?;
        let (start_offset, active) = match (segments.values().next(), segments.values().next_back())
        {
            (Some(first), Some(last)) => (first.base_offset(), last.clone()),
            _ => unreachable!("at least one segment exists"),
        };
        let end_offset = active.published_next_offset();
        let mut epochs = EpochCache::load(&dir)?;
        if epochs.truncate_from_end(end_offset) {
            epochs.store(&dir)?;
        }
        let direct = config.write_mode == WriteMode::Direct
            && match DirectFile::open(active.path()) {
                Ok(_) => true,
                Err(error) => {
                    tracing::warn!(dir = %dir.display(), %error, "O_DIRECT refused; this log writes through the page cache");
                    false
                }
            };
        let recent_budget = if direct {
            config.recent_cache_bytes.max(RECENT_CACHE_BYTES_MIN)
        } else {
            0
        };
        // Recovery must scan at least the active segment next time: persist
        // that now, before any append lands in it.
        let recovery_point = checkpoint::read_recovery_point(&dir).min(active.base_offset());
        if checkpoint::read_recovery_point(&dir) != recovery_point
            || !dir.join(RECOVERY_POINT_FILE).exists()
        {
            checkpoint::write_atomic(
                &dir,
                RECOVERY_POINT_FILE,
                recovery_point.to_string().as_bytes(),
            )?;
        }
        checkpoint::remove_durably(&dir, CLEAN_SHUTDOWN_FILE)?;
        let writer = Writer {
            next_offset: end_offset,
            write_position: active.published_bytes(),
            bytes_since_index: config.index_interval_bytes,
            active_max_timestamp_ms: active.max_timestamp_ms(),
            active_since: Instant::now(),
            active,
            epochs,
            recovery_point,
            closed: false,
        };
        let log = Log {
            dir,
            engine,
            shared: Arc::new(Shared {
                segments: RwLock::new(segments),
                end_offset: AtomicU64::new(end_offset),
                start_offset: AtomicU64::new(start_offset),
                publish: Mutex::new(PublishState {
                    in_flight: 0,
                    failed: false,
                }),
                drained: Condvar::new(),
                recent: Mutex::new(RecentBatches::new(recent_budget)),
                sync_failed: Arc::new(AtomicBool::new(false)),
            }),
            writer: Mutex::new(writer),
            report: recovered.report,
            _lock_file: lock_file,
            direct,
            config,
        };
        let active = lock(&log.writer).active.clone();
        log.lower_end(&active, active.published_bytes(), end_offset)?;
        Ok(log)
    }

    /// Whether appends use O_DIRECT.
    pub fn write_mode(&self) -> WriteMode {
        if self.direct {
            WriteMode::Direct
        } else {
            WriteMode::Buffered
        }
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The configuration in force.
    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// What opening the log found.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.report
    }

    /// Offset after the last readable record (on one node: the durable end
    /// under `flush = always`).
    pub fn end_offset(&self) -> u64 {
        self.shared.end_offset.load(Ordering::Acquire)
    }

    /// First offset still stored.
    pub fn start_offset(&self) -> u64 {
        self.shared.start_offset.load(Ordering::Acquire)
    }

    /// Number of segments.
    pub fn segment_count(&self) -> usize {
        self.read_segments().len()
    }

    /// Published bytes over all segments.
    pub fn size_bytes(&self) -> u64 {
        self.read_segments()
            .values()
            .map(|segment| segment.published_bytes())
            .sum()
    }

    /// The leader-epoch cache (epoch → first offset).
    pub fn epochs(&self) -> EpochCache {
        lock(&self.writer).epochs.clone()
    }

    fn read_segments(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, Arc<Segment>>> {
        self.shared
            .segments
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn write_segments(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u64, Arc<Segment>>> {
        self.shared
            .segments
            .write()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Appends a batch, assigning its offsets (by patching the header) and
    /// stamping the current leader epoch. Returns once the write is queued;
    /// the future resolves when the flush policy is met.
    ///
    /// # Errors
    /// Immediately, with nothing written: [`StorageError::InvalidBatch`],
    /// [`StorageError::BatchTooLarge`], [`StorageError::StorageFull`] (no room
    /// for a new segment), [`StorageError::Closed`]. Through the future: the
    /// write's I/O error, or [`StorageError::WriteFailed`] if an earlier
    /// in-flight write failed.
    pub fn append(&self, batch: impl IntoBatchBytes) -> Result<AppendFuture> {
        self.append_inner(
            batch,
            true,
            None,
            |_| Ok::<(), std::convert::Infallible>(()),
        )
        .map(|checked| match checked {
            Ok(future) => future,
            Err(never) => match never {},
        })
    }

    /// [`Log::append`], but first `check` is called, under the log's writer
    /// lock and after any repair of failed writes, with the offset the
    /// batch would get; an `Err` from it appends nothing and is returned
    /// inside `Ok`. A caller keeping state per appended batch (idempotent
    /// producers) can so drop what a failed write took back (everything at
    /// or past that offset) and decide with the log standing still.
    ///
    /// # Errors
    /// As [`Log::append`].
    pub fn append_checked<E>(
        &self,
        batch: impl IntoBatchBytes,
        check: impl FnOnce(u64) -> std::result::Result<(), E>,
    ) -> Result<std::result::Result<AppendFuture, E>> {
        self.append_inner(batch, true, None, check)
    }

    /// [`Log::append_checked`] for a leader appending in `epoch`: refused
    /// with [`StorageError::StaleEpoch`] unless `epoch` is still the log's
    /// newest, decided under the writer lock, so a broker deposed (and
    /// already copying its new leader's epoch) between its leadership check
    /// and the append cannot write into the new leader's epoch.
    ///
    /// # Errors
    /// As [`Log::append`], and [`StorageError::StaleEpoch`].
    pub fn append_checked_in_epoch<E>(
        &self,
        batch: impl IntoBatchBytes,
        epoch: i32,
        check: impl FnOnce(u64) -> std::result::Result<(), E>,
    ) -> Result<std::result::Result<AppendFuture, E>> {
        self.append_inner(batch, true, Some(epoch), check)
    }

    /// Appends a batch that already carries its offsets and leader epoch (a
    /// replica copying its leader). Its base offset must equal `end_offset`
    /// plus whatever is in flight.
    ///
    /// # Errors
    /// As [`Log::append`], and [`StorageError::UnexpectedOffset`].
    pub fn append_replica(&self, batch: impl IntoBatchBytes) -> Result<AppendFuture> {
        self.append_inner(batch, false, None, |_| {
            Ok::<(), std::convert::Infallible>(())
        })
        .map(|checked| match checked {
            Ok(future) => future,
            Err(never) => match never {},
        })
    }

    /// [`Log::append`] and wait.
    ///
    /// # Errors
    /// As [`Log::append`].
    pub fn append_blocking(&self, batch: impl IntoBatchBytes) -> Result<AppendInfo> {
        self.append(batch)?.wait()
    }

    fn append_inner<E>(
        &self,
        batch: impl IntoBatchBytes,
        assign_offsets: bool,
        required_epoch: Option<i32>,
        check: impl FnOnce(u64) -> std::result::Result<(), E>,
    ) -> Result<std::result::Result<AppendFuture, E>> {
        if batch.batch_len() > self.config.batch_bytes_max {
            return Err(StorageError::BatchTooLarge {
                bytes: batch.batch_len(),
                limit: self.config.batch_bytes_max,
            });
        }
        let mut batch = batch.into_batch_bytes();
        let parsed = Batch::parse_verified(&batch)?;
        if parsed.len() != batch.len() {
            return Err(StorageError::InvalidBatch(BatchError::BadLength(
                (parsed.len() - weir_protocol::batch::BATCH_LENGTH_PREFIX_BYTES) as i32,
            )));
        }
        if parsed.records_count() as u32 > self.config.batch_records_max {
            return Err(StorageError::InvalidBatch(BatchError::TooManyRecords {
                count: parsed.records_count(),
                limit: self.config.batch_records_max as usize,
            }));
        }
        let (last_offset_delta, batch_max_timestamp_ms, given_base, given_epoch) = (
            u64::from(parsed.last_offset_delta() as u32),
            parsed.max_timestamp(),
            parsed.base_offset(),
            parsed.partition_leader_epoch(),
        );

        let mut writer = lock(&self.writer);
        self.check_open(&writer)?;
        self.repair_if_failed(&mut writer)?;
        if let Some(expected) = required_epoch {
            let latest = writer.epochs.latest().map(|entry| entry.epoch);
            if latest != Some(expected) {
                return Err(StorageError::StaleEpoch { expected, latest });
            }
        }
        if let Err(refused) = check(writer.next_offset) {
            return Ok(Err(refused));
        }
        if !assign_offsets && given_base != writer.next_offset {
            return Err(StorageError::UnexpectedOffset {
                expected: writer.next_offset,
                got: given_base,
            });
        }
        if !assign_offsets
            && given_epoch >= 0
            && writer
                .epochs
                .latest()
                .is_none_or(|latest| latest.epoch < given_epoch)
        {
            // A replica learns the leader's epochs from the batches it
            // copies, in log order, before the batch is written: the
            // leader-epoch lookup then answers for this log as for the
            // leader's. If the write fails, the repair's truncation drops
            // the entry again.
            let start = writer.next_offset;
            writer.epochs.assign(given_epoch, start);
            writer.epochs.store(&self.dir)?;
        }
        let len = batch.len() as u64;
        if self.should_roll(&writer, len, last_offset_delta + 1) {
            self.roll_locked(&mut writer)?;
        }

        let target = writer.active.write_target(self.direct)?;
        let base_offset = writer.next_offset;
        if assign_offsets {
            patch_base_offset(&mut batch, base_offset);
            if let Some(latest) = writer.epochs.latest() {
                patch_leader_epoch(&mut batch, latest.epoch);
            }
        }
        let next_offset = base_offset + last_offset_delta + 1;
        let position = writer.write_position;
        let segment = writer.active.clone();
        assert!(
            position + len <= segment.mapped_bytes(),
            "append past the segment map"
        );
        writer.active_max_timestamp_ms = writer.active_max_timestamp_ms.max(batch_max_timestamp_ms);
        if writer.bytes_since_index >= self.config.index_interval_bytes {
            segment.add_index_entries(base_offset, position, writer.active_max_timestamp_ms);
            writer.bytes_since_index = 0;
        }
        writer.bytes_since_index += len;
        writer.next_offset = next_offset;
        writer.write_position = position + len;
        lock(&self.shared.publish).in_flight += 1;

        let (sender, receiver) = oneshot::channel();
        let shared = self.shared.clone();
        let completed_segment = segment.clone();
        let info = AppendInfo {
            base_offset,
            last_offset: next_offset - 1,
            max_timestamp_ms: batch_max_timestamp_ms,
        };
        let data = batch.freeze();
        let cached = data.clone();
        let done = Box::new(move |result: std::io::Result<()>| {
            let outcome = complete_append(
                &shared,
                &completed_segment,
                position + len,
                info,
                &cached,
                result,
            );
            // The caller may have stopped waiting; the append stands regardless.
            let _ = sender.send(outcome);
        });
        let request = Request::Write(WriteRequest {
            target,
            position,
            data,
            sync: self.config.sync_deadline(),
            sync_failed: self.shared.sync_failed.clone(),
            done,
        });
        if let Err(error) = self.engine.submit(request) {
            // Nothing reached the engine: undo the reservation.
            writer.next_offset = base_offset;
            writer.write_position = position;
            segment.truncate_indexes(base_offset);
            let mut publish = lock(&self.shared.publish);
            publish.in_flight -= 1;
            if publish.in_flight == 0 {
                self.shared.drained.notify_all();
            }
            return Err(error);
        }
        Ok(Ok(AppendFuture {
            receiver,
            base_offset,
        }))
    }

    /// Refuses writer-side work on a closed log or after a failed interval sync.
    fn check_open(&self, writer: &Writer) -> Result<()> {
        if writer.closed {
            return Err(StorageError::Closed);
        }
        if self.shared.sync_failed.load(Ordering::Acquire) {
            return Err(StorageError::SyncFailed {
                path: self.dir.clone(),
            });
        }
        Ok(())
    }

    fn should_roll(&self, writer: &Writer, incoming_bytes: u64, incoming_records: u64) -> bool {
        if writer.write_position == 0 {
            return false;
        }
        let capacity = self
            .config
            .segment_bytes_max
            .min(writer.active.mapped_bytes());
        // Index entries store offsets relative to the segment base as u32.
        let offsets_after = writer.next_offset + incoming_records - writer.active.base_offset();
        writer.write_position + incoming_bytes > capacity
            || offsets_after > u64::from(u32::MAX)
            || writer.active_since.elapsed().as_millis() as u64 >= self.config.segment_age_ms_max
    }

    /// Waits until no write of this log is in flight.
    fn wait_drained(&self) -> MutexGuard<'_, PublishState> {
        let mut publish = lock(&self.shared.publish);
        while publish.in_flight > 0 {
            publish = self
                .shared
                .drained
                .wait(publish)
                .unwrap_or_else(|poison| poison.into_inner());
        }
        publish
    }

    /// If a write failed, waits for the writes behind it, then cuts the log
    /// back to its published end so that it holds exactly what was acked.
    fn repair_if_failed(&self, writer: &mut Writer) -> Result<()> {
        if !lock(&self.shared.publish).failed {
            return Ok(());
        }
        drop(self.wait_drained());
        self.truncate_locked(writer, self.end_offset())?;
        lock(&self.shared.publish).failed = false;
        Ok(())
    }

    /// Starts a new segment at the next offset (no-op on an empty segment).
    ///
    /// # Errors
    /// [`StorageError::StorageFull`] if the new segment cannot be
    /// preallocated; I/O errors sealing the old one.
    pub fn roll(&self) -> Result<()> {
        let mut writer = lock(&self.writer);
        self.check_open(&writer)?;
        self.repair_if_failed(&mut writer)?;
        self.roll_locked(&mut writer)
    }

    fn roll_locked(&self, writer: &mut Writer) -> Result<()> {
        if writer.write_position == 0 {
            return Ok(());
        }
        let publish = self.wait_drained();
        if publish.failed {
            return Err(StorageError::WriteFailed);
        }
        drop(publish);
        let base = writer.next_offset;
        let segment = Segment::create(
            &self.dir,
            base,
            self.config.segment_bytes_max,
            index_capacity(&self.config),
        )?;
        let old = writer.active.clone();
        assert_eq!(
            old.published_next_offset(),
            base,
            "rolling with unpublished writes"
        );
        if let Err(error) = old.seal().and_then(|()| checkpoint::sync_dir(&self.dir)) {
            let _ = segment.delete_files();
            return Err(error);
        }
        let segment = Arc::new(segment);
        self.write_segments().insert(base, segment.clone());
        writer.active = segment;
        writer.write_position = 0;
        writer.bytes_since_index = self.config.index_interval_bytes;
        writer.active_max_timestamp_ms = i64::MIN;
        writer.active_since = Instant::now();
        // Everything before the new segment is synced: recovery may skip it.
        self.set_recovery_point(writer, base)
    }

    fn set_recovery_point(&self, writer: &mut Writer, offset: u64) -> Result<()> {
        if writer.recovery_point != offset {
            checkpoint::write_atomic(
                &self.dir,
                RECOVERY_POINT_FILE,
                offset.to_string().as_bytes(),
            )?;
            writer.recovery_point = offset;
        }
        Ok(())
    }

    /// Reads whole batches starting with the one that contains `from_offset`,
    /// up to about `max_bytes` (at least one batch, so a reader always makes
    /// progress), from one segment. An empty result at `end_offset`.
    ///
    /// # Errors
    /// [`StorageError::OffsetOutOfRange`] outside `[start, end]`;
    /// [`StorageError::Corrupt`] if the first batch fails its checks (a
    /// later bad batch ends the read before it).
    pub fn read(&self, from_offset: u64, max_bytes: usize) -> Result<LogRead> {
        // The end is read under the cache lock, which truncation also holds
        // while it lowers the end and refills the cache: the two agree.
        // In direct mode the newest batches come from the cache, and the map
        // is read only below the cache's first offset (see `recent`).
        let (end, mapped_limit) = {
            let recent = lock(&self.shared.recent);
            let end = self.end_offset();
            let start = self.start_offset();
            if from_offset < start || from_offset > end {
                return Err(StorageError::OffsetOutOfRange {
                    offset: from_offset,
                    start,
                    end,
                });
            }
            if from_offset == end {
                return Ok(LogRead::empty(end));
            }
            if let Some(mut batches) = recent.read(from_offset, max_bytes) {
                // A completion caches its batch just before it raises the end.
                batches.retain(|batch| batch.base_offset < end);
                if !batches.is_empty() {
                    return Ok(cached_read(batches));
                }
            }
            (end, recent.start_offset().unwrap_or(u64::MAX).min(end))
        };
        let segment = self.segment_for(from_offset, end)?;
        let position = segment.position_of(from_offset)?;
        if !segment.resident(position as usize) {
            // A reader starting (or resuming) on data the page cache does
            // not hold: read the whole window ahead now, rather than fault
            // it in page by page and advise only its far end.
            segment.prefetch(position as usize, READ_AHEAD_BYTES);
        }
        let verify = self.config.verify_crc_on_read;
        let mut cursor = position;
        let mut next_offset = from_offset;
        while cursor < segment.published_bytes() && next_offset < mapped_limit {
            // Framing first: a batch that will not be returned (past the end
            // or over the budget) is not worth its CRC pass.
            match segment.batch_at(cursor, false) {
                Ok(batch) if batch.base_offset() >= end => break,
                Ok(batch)
                    if cursor > position
                        && (cursor - position) as usize + batch.len() > max_bytes =>
                {
                    break;
                }
                Ok(batch) => {
                    if verify && let Err(reason) = batch.verify_crc() {
                        if cursor == position {
                            return Err(segment.corrupt_at(cursor, reason));
                        }
                        break;
                    }
                    cursor += batch.len() as u64;
                    next_offset = batch.next_offset();
                }
                Err(error) if cursor == position => return Err(error),
                Err(_) => break,
            }
        }
        let len = (cursor - position) as usize;
        // Keep the readahead front READ_AHEAD_BYTES past the reader: ask
        // only for the slice that just entered the window, so each byte is
        // asked for once per pass (asking for the whole window every time
        // costs a page-cache walk of it per read).
        segment.prefetch(position as usize + READ_AHEAD_BYTES, len);
        Ok(LogRead {
            parts: vec![ReadPart::Mapped {
                segment,
                start: position as usize,
                end: cursor as usize,
            }],
            len,
            next_offset,
        })
    }

    /// The segment holding `offset` (or the first after it).
    fn segment_for(&self, offset: u64, end: u64) -> Result<Arc<Segment>> {
        let segments = self.read_segments();
        let mut found = segments
            .range(..=offset)
            .next_back()
            .map(|(_, s)| s.clone());
        while let Some(segment) = found
            .as_ref()
            .filter(|s| s.published_next_offset() <= offset)
        {
            found = segments
                .range((Bound::Excluded(segment.base_offset()), Bound::Unbounded))
                .next()
                .map(|(_, s)| s.clone());
        }
        found.ok_or(StorageError::OffsetOutOfRange {
            offset,
            start: self.start_offset(),
            end,
        })
    }

    /// The first offset whose record timestamp is at or after `timestamp_ms`
    /// (batch granularity for compressed batches), or `None` if every
    /// record is older.
    ///
    /// # Errors
    /// [`StorageError::Corrupt`] if a scanned batch fails its checks.
    pub fn lookup_by_timestamp(&self, timestamp_ms: i64) -> Result<Option<u64>> {
        let (mapped_limit, cached) = {
            let recent = lock(&self.shared.recent);
            let start = recent.start_offset();
            let cached = start
                .and_then(|start| recent.read(start, usize::MAX))
                .unwrap_or_default();
            (start.unwrap_or(u64::MAX), cached)
        };
        let segments: Vec<Arc<Segment>> = self.read_segments().values().cloned().collect();
        let limit = self.end_offset().min(mapped_limit);
        for segment in segments {
            if segment.base_offset() >= limit {
                break;
            }
            if segment.max_timestamp_ms() < timestamp_ms || segment.published_bytes() == 0 {
                continue;
            }
            // Entries hold the running maximum: everything up to an entry
            // whose timestamp is below the target is older than it.
            let from = match timestamp_ms.checked_sub(1) {
                Some(below) => segment
                    .time_index
                    .floor(index::time_target(below), index::time_key)
                    .map_or(segment.base_offset(), |entry| {
                        segment.base_offset() + u64::from(entry[2])
                    }),
                None => segment.base_offset(),
            };
            let mut position = segment.position_of(from)?;
            while position < segment.published_bytes() {
                let batch = segment.batch_at(position, false)?;
                if batch.base_offset() >= limit {
                    break;
                }
                if let Some(offset) = first_at_or_after(&batch, timestamp_ms) {
                    return Ok(Some(offset));
                }
                position += batch.len() as u64;
            }
        }
        for cached_batch in &cached {
            let batch = Batch::parse(&cached_batch.bytes)?;
            if let Some(offset) = first_at_or_after(&batch, timestamp_ms) {
                return Ok(Some(offset));
            }
        }
        Ok(None)
    }

    /// Removes every record at or after `offset`. If `offset` falls inside a
    /// batch, that whole batch goes: the new end is the batch's base offset.
    /// Waits for in-flight appends first. The removed bytes are zeroed on
    /// disk so no later recovery can bring them back.
    ///
    /// # Errors
    /// I/O errors, with the path.
    pub fn truncate_to(&self, offset: u64) -> Result<()> {
        let mut writer = lock(&self.writer);
        self.check_open(&writer)?;
        drop(self.wait_drained());
        let target = offset.min(self.end_offset());
        self.truncate_locked(&mut writer, target)?;
        lock(&self.shared.publish).failed = false;
        Ok(())
    }

    /// Empties the log and starts it again at `offset`, which may lie
    /// beyond the current end: what a follower does when its leader's log
    /// now starts past everything the follower holds (the records between
    /// were deleted by retention while it was away), so that it can fetch
    /// on from the leader's start. Waits for in-flight appends first.
    ///
    /// # Errors
    /// I/O errors, with the path.
    pub fn truncate_fully_and_start_at(&self, offset: u64) -> Result<()> {
        let mut writer = lock(&self.writer);
        self.check_open(&writer)?;
        drop(self.wait_drained());
        self.reset_to(&mut writer, offset)?;
        // As after retention: only the epoch in force at the new start is
        // kept (it carries on until a copied batch names a newer one).
        if writer.epochs.truncate_from_start(offset) {
            writer.epochs.store(&self.dir)?;
        }
        lock(&self.shared.publish).failed = false;
        Ok(())
    }

    /// Cuts the log at `offset` (≤ the published end). No write may be in
    /// flight. Order matters for a crash midway and for concurrent readers:
    /// first the recovery point drops to the segment being cut (so the next
    /// open scans it), then readers are stopped at the new end, and only then
    /// are files cut and deleted.
    fn truncate_locked(&self, writer: &mut Writer, offset: u64) -> Result<()> {
        let start = self.start_offset();
        if offset <= start {
            return self.reset_to(writer, offset.max(start));
        }
        let (base, segment, previous) = {
            let segments = self.read_segments();
            let Some((base, segment)) = segments.range(..=offset).next_back() else {
                unreachable!("offset above start has a segment");
            };
            let previous = segments.range(..*base).next_back().map(|(_, s)| s.clone());
            (*base, segment.clone(), previous)
        };
        let position = if offset >= segment.published_next_offset() {
            segment.published_bytes()
        } else {
            segment.position_of(offset)?
        };
        let new_end = if position < segment.published_bytes() {
            segment.batch_at(position, false)?.base_offset()
        } else {
            segment.published_next_offset()
        };
        // Nothing of this segment remains: the previous one becomes active
        // again (or, with none, a fresh full-size segment takes its place).
        let reactivated = previous.filter(|_| position == 0);
        let scan_from = reactivated
            .as_ref()
            .map_or(base, |previous| previous.base_offset());
        self.set_recovery_point(writer, writer.recovery_point.min(scan_from))?;
        match &reactivated {
            Some(previous) => self.lower_end(previous, previous.published_bytes(), new_end)?,
            None => self.lower_end(&segment, position, new_end)?,
        }

        let mut segments = self.write_segments();
        let later: Vec<u64> = segments
            .range((Bound::Excluded(base), Bound::Unbounded))
            .map(|(b, _)| *b)
            .collect();
        for later_base in later {
            if let Some(removed) = segments.remove(&later_base) {
                removed.delete_files()?;
            }
        }
        let active = if position == 0 {
            segments.remove(&base);
            segment.delete_files()?;
            match reactivated {
                Some(previous) => previous,
                None => {
                    let fresh = Arc::new(Segment::create(
                        &self.dir,
                        base,
                        self.config.segment_bytes_max,
                        index_capacity(&self.config),
                    )?);
                    segments.insert(base, fresh.clone());
                    fresh
                }
            }
        } else {
            let max_timestamp_ms = max_timestamp_before(&segment, position)?;
            segment.reset_published(position, new_end, max_timestamp_ms);
            segment.truncate_indexes(new_end);
            segment.cut_file(position)?;
            segment
        };
        drop(segments);
        if active.is_sealed() {
            active.unseal()?;
        }
        checkpoint::sync_dir(&self.dir)?;
        self.install_active(writer, active)
    }

    /// Makes the log empty, starting at `offset` (truncation below the start).
    fn reset_to(&self, writer: &mut Writer, offset: u64) -> Result<()> {
        self.set_recovery_point(writer, offset.min(writer.recovery_point))?;
        {
            let mut recent = lock(&self.shared.recent);
            recent.clear();
            self.shared.end_offset.store(offset, Ordering::Release);
            self.shared.start_offset.store(offset, Ordering::Release);
        }
        let mut segments = self.write_segments();
        for (_, segment) in std::mem::take(&mut *segments) {
            segment.delete_files()?;
        }
        let segment = Arc::new(Segment::create(
            &self.dir,
            offset,
            self.config.segment_bytes_max,
            index_capacity(&self.config),
        )?);
        segments.insert(offset, segment.clone());
        drop(segments);
        checkpoint::sync_dir(&self.dir)?;
        self.install_active(writer, segment)
    }

    /// Lowers the end offset and, in direct mode, refills the recent cache
    /// with the batches of `segment` that end at `end_position`, both under
    /// the cache lock that readers take to learn the end.
    fn lower_end(&self, segment: &Segment, end_position: u64, end_offset: u64) -> Result<()> {
        let enabled = lock(&self.shared.recent).enabled();
        let batches = if enabled {
            tail_batches(segment, end_position, end_offset)?
        } else {
            Vec::new()
        };
        let mut recent = lock(&self.shared.recent);
        recent.clear();
        for batch in batches {
            recent.push(batch);
        }
        self.shared.end_offset.store(end_offset, Ordering::Release);
        Ok(())
    }

    /// Points the writer at `active` (whose published extent is final).
    fn install_active(&self, writer: &mut Writer, active: Arc<Segment>) -> Result<()> {
        let end = active.published_next_offset();
        writer.next_offset = end;
        writer.write_position = active.published_bytes();
        writer.active_max_timestamp_ms = active.max_timestamp_ms();
        writer.bytes_since_index = self.config.index_interval_bytes;
        writer.active_since = Instant::now();
        let base = active.base_offset();
        writer.active = active.clone();
        self.lower_end(&active, active.published_bytes(), end)?;
        if writer.epochs.truncate_from_end(end) {
            writer.epochs.store(&self.dir)?;
        }
        if writer.recovery_point > base {
            self.set_recovery_point(writer, base)?;
        }
        Ok(())
    }

    /// Records that `epoch` begins at the current end offset; later appends
    /// carry it. Ignored unless it is newer than the latest epoch.
    ///
    /// # Errors
    /// I/O errors writing the checkpoint.
    pub fn assign_epoch(&self, epoch: i32) -> Result<()> {
        let mut writer = lock(&self.writer);
        self.check_open(&writer)?;
        let start = writer.next_offset;
        if writer.epochs.assign(epoch, start) {
            writer.epochs.store(&self.dir)?;
        }
        Ok(())
    }

    /// Deletes sealed segments, oldest first, that retention by size or age
    /// no longer keeps, judging age against `at_ms` (the wall clock when
    /// `None`). The active segment is never deleted.
    ///
    /// # Errors
    /// I/O errors deleting files.
    pub fn apply_retention(&self, at_ms: Option<i64>) -> Result<RetentionOutcome> {
        let now_ms = at_ms.unwrap_or_else(now_ms);
        self.delete_leading_segments(|segment, _next_base, remaining_bytes| {
            let by_size = self
                .config
                .retention_bytes
                .is_some_and(|limit| remaining_bytes >= limit);
            let by_age = self.config.retention_ms.is_some_and(|limit| {
                segment.max_timestamp_ms() < now_ms.saturating_sub(limit as i64)
            });
            by_size || by_age
        })
    }

    /// Deletes the sealed segments, oldest first, whose every offset lies
    /// below `offset` (for a log whose older records a snapshot replaces).
    /// The active segment is never deleted.
    ///
    /// # Errors
    /// I/O errors deleting files.
    pub fn delete_segments_before(&self, offset: u64) -> Result<RetentionOutcome> {
        self.delete_leading_segments(|_segment, next_base, _remaining_bytes| next_base <= offset)
    }

    /// Deletes sealed segments from the oldest on while `wanted(segment,
    /// base offset of the next segment, bytes that would remain)` says so.
    fn delete_leading_segments(
        &self,
        mut wanted: impl FnMut(&Segment, u64, u64) -> bool,
    ) -> Result<RetentionOutcome> {
        let mut writer = lock(&self.writer);
        self.check_open(&writer)?;
        let mut outcome = RetentionOutcome::default();
        let mut segments = self.write_segments();
        let mut total: u64 = segments
            .values()
            .map(|segment| segment.published_bytes())
            .sum();
        let candidates: Vec<Arc<Segment>> = segments
            .values()
            .filter(|s| s.is_sealed())
            .cloned()
            .collect();
        for segment in candidates {
            if segment.base_offset() == writer.active.base_offset() {
                break;
            }
            let bytes = segment.published_bytes();
            // A sealed segment is never the last: the active one follows.
            let next_base = segments
                .range(segment.base_offset() + 1..)
                .next()
                .map_or(writer.next_offset, |(base, _)| *base);
            if !wanted(&segment, next_base, total - bytes) {
                break;
            }
            segments.remove(&segment.base_offset());
            let new_start = segments
                .keys()
                .next()
                .copied()
                .unwrap_or(writer.next_offset);
            self.shared.start_offset.store(new_start, Ordering::Release);
            segment.delete_files()?;
            total -= bytes;
            outcome.segments_deleted += 1;
            outcome.bytes_deleted += bytes;
        }
        drop(segments);
        if outcome.segments_deleted > 0 {
            checkpoint::sync_dir(&self.dir)?;
            if writer.epochs.truncate_from_start(self.start_offset()) {
                writer.epochs.store(&self.dir)?;
            }
        }
        Ok(outcome)
    }

    /// Makes every completed append durable now (for `interval` and `never`).
    ///
    /// # Errors
    /// The sync's I/O error.
    pub fn flush(&self) -> Result<()> {
        let file = {
            let writer = lock(&self.writer);
            self.check_open(&writer)?;
            writer.active.file().clone()
        };
        let (sender, receiver) = oneshot::channel();
        let done = Box::new(move |result: std::io::Result<()>| {
            let _ = sender.send(result);
        });
        self.engine.submit(Request::Sync { file, done })?;
        receiver
            .blocking_recv()
            .unwrap_or_else(|_| Err(std::io::Error::other("io engine stopped")))
            .map_err(|error| StorageError::io(&self.dir, error))
    }

    /// Closes the log cleanly: waits for in-flight appends, syncs the active
    /// segment, cuts its files to their data, and writes the clean-shutdown
    /// marker so the next open skips the scan.
    ///
    /// # Errors
    /// I/O errors; the marker is then not written and the next open scans.
    pub fn close(&self) -> Result<()> {
        let mut writer = lock(&self.writer);
        if writer.closed {
            return Ok(());
        }
        if self.shared.sync_failed.load(Ordering::Acquire) {
            // No clean marker: the next open must scan what is really on disk.
            drop(self.wait_drained());
            writer.closed = true;
            return Err(StorageError::SyncFailed {
                path: self.dir.clone(),
            });
        }
        self.repair_if_failed(&mut writer)?;
        drop(self.wait_drained());
        writer.closed = true;
        let active = writer.active.clone();
        active.seal()?;
        writer.epochs.store(&self.dir)?;
        checkpoint::write_atomic(&self.dir, CLEAN_SHUTDOWN_FILE, b"")
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        // Without `close` this behaves like a crash, except that writes the
        // engine already holds complete first, so a log reopened in the same
        // process never races its predecessor's writes.
        drop(self.wait_drained());
    }
}

fn index_capacity(config: &LogConfig) -> usize {
    index::capacity_for(config.segment_bytes_max, config.index_interval_bytes)
}

/// Takes an exclusive advisory lock on `dir/lock`, so that two `Log`s (in
/// this process or another) never write one directory.
fn lock_directory(dir: &Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let path = dir.join(checkpoint::LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|error| StorageError::io(&path, error))?;
    // SAFETY: plain syscall on an open descriptor.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let error = std::io::Error::last_os_error();
        return Err(if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
            StorageError::Locked {
                path: dir.to_path_buf(),
            }
        } else {
            StorageError::io(&path, error)
        });
    }
    Ok(file)
}

/// The batches of `segment` that a direct-mode cache must hold so that it
/// covers the partial block at `end_position`: from the last index entry at
/// or before that block to the end. Read through the map, which is safe
/// because no write is in flight. Checks offset continuity up to
/// `end_offset`: base offsets are not covered by the CRC.
fn tail_batches(segment: &Segment, end_position: u64, end_offset: u64) -> Result<Vec<CachedBatch>> {
    let block_start = end_position - end_position % DIRECT_BLOCK_BYTES as u64;
    let mut cursor = segment
        .offset_index
        .floor(block_start, |entry| u64::from(entry[1]))
        .map_or(0, |entry| u64::from(entry[1]))
        .min(end_position);
    let mut batches: Vec<CachedBatch> = Vec::new();
    while cursor < end_position {
        let bytes = segment.map_slice(cursor as usize, end_position as usize);
        let batch = Batch::parse(bytes).map_err(|reason| StorageError::Corrupt {
            path: segment.path().to_path_buf(),
            position: cursor,
            reason,
        })?;
        let continues = batches
            .last()
            .is_none_or(|last| last.next_offset == batch.base_offset());
        if !continues {
            return Err(StorageError::Corrupt {
                path: segment.path().to_path_buf(),
                position: cursor,
                reason: BatchError::BadRecord("gap in offsets"),
            });
        }
        batches.push(CachedBatch {
            base_offset: batch.base_offset(),
            next_offset: batch.next_offset(),
            bytes: Bytes::copy_from_slice(batch.bytes()),
        });
        cursor += batch.len() as u64;
    }
    if batches
        .last()
        .is_some_and(|last| last.next_offset != end_offset)
    {
        return Err(StorageError::Corrupt {
            path: segment.path().to_path_buf(),
            position: cursor,
            reason: BatchError::BadRecord("tail does not end at the log end"),
        });
    }
    Ok(batches)
}

/// The first record of `batch` at or after `timestamp_ms` (the batch's base
/// offset for a compressed batch), if the batch reaches that time at all.
fn first_at_or_after(batch: &Batch<'_>, timestamp_ms: i64) -> Option<u64> {
    if batch.max_timestamp() < timestamp_ms {
        return None;
    }
    let record_offset = batch.records().ok().and_then(|mut records| {
        records.find_map(|record| {
            record
                .ok()
                .filter(|r| r.timestamp_ms >= timestamp_ms)
                .map(|r| r.offset)
        })
    });
    Some(record_offset.unwrap_or(batch.base_offset()))
}

fn cached_read(batches: Vec<CachedBatch>) -> LogRead {
    let next_offset = batches.last().map_or(0, |batch| batch.next_offset);
    let len = batches.iter().map(|batch| batch.bytes.len()).sum();
    LogRead {
        parts: batches
            .into_iter()
            .map(|batch| ReadPart::Cached(batch.bytes))
            .collect(),
        len,
        next_offset,
    }
}

/// Largest timestamp among the batches of `segment` before `position`.
fn max_timestamp_before(segment: &Segment, position: u64) -> Result<i64> {
    let mut max_timestamp_ms = i64::MIN;
    let mut cursor = 0u64;
    // Start from the last index entry before the cut: its running maximum
    // covers everything before it.
    if let Some(at) = segment.time_index.len().checked_sub(1) {
        let entry = segment.time_index.entry(at);
        max_timestamp_ms = index::time_of(entry);
        cursor = segment.position_of(segment.base_offset() + u64::from(entry[2]))?;
    }
    while cursor < position {
        let batch = segment.batch_at(cursor, false)?;
        max_timestamp_ms = max_timestamp_ms.max(batch.max_timestamp());
        cursor += batch.len() as u64;
    }
    Ok(max_timestamp_ms)
}

/// Runs on the engine thread, in request order: publishes the write or
/// records the failure.
fn complete_append(
    shared: &Shared,
    segment: &Segment,
    end_position: u64,
    info: AppendInfo,
    data: &Bytes,
    result: std::io::Result<()>,
) -> Result<AppendInfo> {
    let mut publish = lock(&shared.publish);
    let outcome = if publish.failed {
        Err(StorageError::WriteFailed)
    } else {
        match result {
            Ok(()) => {
                let end = shared.end_offset.load(Ordering::Acquire);
                assert_eq!(
                    end, info.base_offset,
                    "appends must publish in offset order"
                );
                segment.publish(end_position, info.last_offset + 1, info.max_timestamp_ms);
                // Cache before publishing the end, so a reader that sees the
                // new end finds the batch in the cache (direct mode).
                lock(&shared.recent).push(CachedBatch {
                    base_offset: info.base_offset,
                    next_offset: info.last_offset + 1,
                    bytes: data.clone(),
                });
                shared
                    .end_offset
                    .store(info.last_offset + 1, Ordering::Release);
                Ok(info)
            }
            Err(error) => {
                publish.failed = true;
                Err(StorageError::io(segment.path(), error))
            }
        }
    };
    publish.in_flight -= 1;
    if publish.in_flight == 0 {
        shared.drained.notify_all();
    }
    outcome
}
