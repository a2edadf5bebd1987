//! The io engine: the threads of one data directory that perform every log
//! write.
//!
//! Appenders hand the engine [`WriteRequest`]s through a bounded crossbeam
//! channel (a full channel blocks them: that is the engine's backpressure).
//! Work happens in *rounds*. A planner thread gathers the next round from
//! the channel (up to `round_requests_max` / `round_bytes_max`), copying
//! O_DIRECT writes into aligned buffers; whichever of two executor threads is
//! idle takes everything gathered so far and performs it: the round's writes,
//! then one `fdatasync` per file that a request needs durable, then the
//! completions, in the order the requests arrived. Appenders that arrive
//! while a round is on the device share the next round's sync: group commit.
//! Two executors let one round's writes overlap the previous round's sync
//! and completions; `round` explains how they stay ordered.
//!
//! Two backends perform the I/O: `uring` (one `io_uring` per executor; a
//! file's writes linked in order, all files in one submission, then the
//! syncs in another) and `sync` (`pwrite`, then `fdatasync`). They share the
//! round logic, so they have the same semantics and pass the same tests.
//!
//! Architecture invariant: completions run in request order, on an executor
//! thread, after the request's writes and syncs have finished. A log relies
//! on this to publish its end offset in order.
//!
//! Architecture invariant: a panic on an engine thread aborts the process;
//! the other threads would otherwise wait for it forever.

pub(crate) mod direct;
mod round;
mod sync;
mod uring;
mod worker;

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::config::{EngineConfig, EngineKind, SyncMode};
use crate::error::{Result, StorageError};

/// Called exactly once with the outcome of a request, on the engine thread.
/// It must not block: it publishes state and wakes the waiter.
pub(crate) type Completion = Box<dyn FnOnce(io::Result<()>) + Send>;

/// Where a write goes.
#[derive(Clone)]
pub(crate) enum WriteTarget {
    /// Through the page cache.
    Buffered(Arc<File>),
    /// With O_DIRECT: the engine aligns and coalesces (see `direct`).
    Direct(Arc<direct::DirectFile>),
}

impl WriteTarget {
    fn fd(&self) -> RawFd {
        match self {
            WriteTarget::Buffered(file) => file.as_raw_fd(),
            WriteTarget::Direct(file) => file.fd(),
        }
    }
}

/// A positioned write of owned bytes.
pub(crate) struct WriteRequest {
    /// The file; kept alive by the request until completion.
    pub target: WriteTarget,
    /// Byte position in the file.
    pub position: u64,
    /// The bytes, shared with the log's recent-batch cache and held by the
    /// request until completion so that io_uring can read them meanwhile.
    pub data: bytes::Bytes,
    /// Whether and when the write must become durable.
    pub sync: SyncMode,
    /// Set if a later interval sync covering this write fails: nobody waits
    /// on that sync, so the log learns of it through this flag.
    pub sync_failed: Arc<std::sync::atomic::AtomicBool>,
    /// Runs once the write (and sync, if `SyncMode::Now`) is done.
    pub done: Completion,
}

/// What the engine thread receives.
pub(crate) enum Request {
    /// Write bytes at a position.
    Write(WriteRequest),
    /// `fdatasync` the file after every earlier request, then complete.
    Sync {
        /// The file to sync.
        file: Arc<File>,
        /// Runs with the sync's outcome.
        done: Completion,
    },
}

/// Counters the engine keeps for metrics and benchmarks.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Rounds performed (each is at most one sync per file).
    pub rounds: AtomicU64,
    /// Write requests completed.
    pub writes: AtomicU64,
    /// Bytes written.
    pub bytes_written: AtomicU64,
    /// `fdatasync` calls made.
    pub syncs: AtomicU64,
    /// `fdatasync` calls that failed.
    pub sync_errors: AtomicU64,
    /// Sum of `fdatasync` latencies, nanoseconds.
    pub sync_nanos_total: AtomicU64,
    /// Time spent preparing rounds (coalescing direct writes), nanoseconds.
    pub plan_nanos_total: AtomicU64,
    /// Time spent performing rounds' writes and syncs, nanoseconds.
    pub execute_nanos_total: AtomicU64,
    /// `fdatasync` latency histogram: bucket `i` counts syncs that took
    /// less than 2^i microseconds (the last bucket takes the rest).
    pub sync_latency_buckets: [AtomicU64; SYNC_LATENCY_BUCKETS],
}

/// Buckets in [`EngineStats::sync_latency_buckets`]: up to 2^23 µs (8 s).
pub const SYNC_LATENCY_BUCKETS: usize = 24;

impl EngineStats {
    fn record_sync(&self, elapsed: Duration, ok: bool) {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.sync_errors.fetch_add(1, Ordering::Relaxed);
        }
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sync_nanos_total.fetch_add(nanos, Ordering::Relaxed);
        let micros = nanos / 1_000;
        let bucket = (64 - micros.leading_zeros() as usize).min(SYNC_LATENCY_BUCKETS - 1);
        self.sync_latency_buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }
}

/// A handle to a running io engine. Logs share it through an `Arc`.
///
/// Lifecycle: the engine's threads run until the last handle is dropped (or
/// [`IoEngine::shutdown`] is called); they then finish the queued requests,
/// sync files with pending interval syncs, and exit. `Drop` joins them.
pub struct IoEngine {
    /// Closed (set to `None`) by `shutdown`, which ends the planner's loop.
    sender: Mutex<Option<Sender<Request>>>,
    /// Planner and executor; joined by `shutdown`.
    threads: Mutex<Vec<JoinHandle<()>>>,
    kind: EngineKind,
    stats: Arc<EngineStats>,
    receiver_probe: Receiver<Request>,
}

impl std::fmt::Debug for IoEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoEngine")
            .field("kind", &self.kind)
            .finish()
    }
}

impl IoEngine {
    /// Starts an engine thread.
    ///
    /// With [`EngineKind::Auto`], a failure to set up io_uring (EPERM or
    /// ENOSYS under a seccomp profile, ENOMEM under a low memlock limit) is
    /// logged once and the sync engine is used instead.
    ///
    /// # Errors
    /// [`StorageError::EngineStart`] if the forced engine cannot start or the
    /// thread cannot be spawned.
    pub fn start(config: &EngineConfig) -> Result<Arc<IoEngine>> {
        let ring_entries = uring::ring_entries(config.round_requests_max);
        let uring_backends = || -> std::io::Result<Vec<Box<dyn Backend>>> {
            (0..worker::EXECUTORS)
                .map(|_| {
                    uring::UringBackend::new(ring_entries)
                        .map(|backend| Box::new(backend) as Box<dyn Backend>)
                })
                .collect()
        };
        let sync_backends = || -> Vec<Box<dyn Backend>> {
            (0..worker::EXECUTORS)
                .map(|_| Box::new(sync::SyncBackend) as Box<dyn Backend>)
                .collect()
        };
        let (backends, kind) = match config.kind {
            EngineKind::Sync => (sync_backends(), EngineKind::Sync),
            EngineKind::Uring => (
                uring_backends().map_err(StorageError::EngineStart)?,
                EngineKind::Uring,
            ),
            EngineKind::Auto => match uring_backends() {
                Ok(backends) => (backends, EngineKind::Uring),
                Err(error) => {
                    tracing::warn!(%error, "io_uring unavailable; using the sync io engine");
                    (sync_backends(), EngineKind::Sync)
                }
            },
        };
        let (sender, receiver) = crossbeam_channel::bounded(config.queue_depth.max(1));
        let stats = Arc::new(EngineStats::default());
        let handoff = worker::Handoff::new();
        let limits = worker::RoundLimits {
            requests_max: config.round_requests_max.max(1),
            bytes_max: config.round_bytes_max.max(1),
        };
        let planner = {
            let handoff = handoff.clone();
            let receiver = receiver.clone();
            std::thread::Builder::new()
                .name(format!("weir-io-plan-{}", kind_name(kind)))
                .spawn(move || {
                    abort_on_panic("planner", || worker::plan(receiver, handoff, limits))
                })
                .map_err(StorageError::EngineStart)?
        };
        let mut threads = vec![planner];
        for (index, backend) in backends.into_iter().enumerate() {
            let stats = stats.clone();
            let handoff = handoff.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("weir-io-{}-{index}", kind_name(kind)))
                    .spawn(move || {
                        abort_on_panic("executor", || worker::execute(backend, handoff, stats))
                    })
                    .map_err(StorageError::EngineStart)?,
            );
        }
        tracing::info!(engine = kind_name(kind), "io engine started");
        Ok(Arc::new(IoEngine {
            sender: Mutex::new(Some(sender)),
            threads: Mutex::new(threads),
            kind,
            stats,
            receiver_probe: receiver,
        }))
    }

    /// The engine actually running (`Uring` or `Sync`, never `Auto`).
    pub fn kind(&self) -> EngineKind {
        self.kind
    }

    /// `"uring"` or `"sync"`.
    pub fn kind_name(&self) -> &'static str {
        kind_name(self.kind)
    }

    /// Counters for metrics.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Requests waiting in the channel.
    pub fn queue_depth(&self) -> usize {
        self.receiver_probe.len()
    }

    /// Queues a request, blocking while the channel is full.
    pub(crate) fn submit(&self, request: Request) -> Result<()> {
        let sender = {
            let guard = self
                .sender
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            guard.clone().ok_or(StorageError::Closed)?
        };
        // Try without blocking first so the common case avoids the slow path.
        match sender.try_send(request) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(request)) => {
                sender.send(request).map_err(|_| StorageError::Closed)
            }
            Err(TrySendError::Disconnected(_)) => Err(StorageError::Closed),
        }
    }

    /// Stops accepting requests, lets the thread finish the queued ones, and
    /// waits for it.
    pub fn shutdown(&self) {
        self.sender
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .take();
        let threads = std::mem::take(
            &mut *self
                .threads
                .lock()
                .unwrap_or_else(|poison| poison.into_inner()),
        );
        for thread in threads {
            if thread.join().is_err() {
                tracing::error!("io engine thread panicked");
            }
        }
    }
}

impl Drop for IoEngine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn kind_name(kind: EngineKind) -> &'static str {
    match kind {
        EngineKind::Uring => "uring",
        EngineKind::Sync => "sync",
        EngineKind::Auto => "auto",
    }
}

/// One write of a round, as a backend sees it.
pub(crate) struct WriteOp<'a> {
    pub fd: RawFd,
    pub position: u64,
    pub data: &'a [u8],
    /// Bytes written so far; the backend advances it.
    pub written: usize,
    /// Alignment a resubmitted remainder must keep (1, or the direct-I/O
    /// block): after a short write the backend resumes from
    /// `written - written % align`, rewriting a few bytes if need be.
    pub align: usize,
    /// Where the attempt in flight started (backend bookkeeping).
    pub submitted_from: usize,
    /// Set by the backend on a hard error; the write is then abandoned.
    pub error: Option<io::Error>,
}

impl WriteOp<'_> {
    /// True once the write has finished, either way.
    pub fn finished(&self) -> bool {
        self.error.is_some() || self.written == self.data.len()
    }

    /// Where the next attempt starts, keeping the alignment.
    pub fn resume_at(&self) -> usize {
        self.written - self.written % self.align.max(1)
    }
}

/// One `fdatasync` of a round.
pub(crate) struct SyncOp {
    pub fd: RawFd,
    /// Set once the sync succeeded.
    pub done: bool,
    /// Set by the backend if the sync itself failed.
    pub error: Option<io::Error>,
    /// Time spent in the sync, for stats.
    pub elapsed: Duration,
}

/// Performs part of a round: every write to completion (or hard error), then
/// every sync.
pub(crate) trait Backend: Send {
    fn execute(&mut self, writes: &mut [WriteOp<'_>], syncs: &mut [SyncOp]);
}

/// Runs an engine thread's body; a panic there is a broken invariant of the
/// write path, and the other threads would wait for it forever, so the
/// process stops (recovery on restart handles the rest).
fn abort_on_panic(thread: &str, body: impl FnOnce()) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).is_err() {
        tracing::error!(thread, "io engine thread panicked; aborting");
        std::process::abort();
    }
}

/// Turns anything a backend left unfinished into an error, so that a backend
/// bug can never make an unwritten append look successful.
fn fail_unfinished(writes: &mut [WriteOp<'_>], syncs: &mut [SyncOp]) {
    for op in writes.iter_mut().filter(|op| !op.finished()) {
        op.error = Some(io::Error::other("io engine left a write unfinished"));
    }
    for sync in syncs
        .iter_mut()
        .filter(|sync| !sync.done && sync.error.is_none())
    {
        sync.error = Some(io::Error::other("io engine left a sync unfinished"));
    }
}

fn nanos_since(from: Instant, to: Instant) -> u64 {
    u64::try_from(to.duration_since(from).as_nanos()).unwrap_or(u64::MAX)
}

/// io::Error is not Clone; keep the OS code (what callers match on) and text.
fn copy_error(error: &io::Error) -> io::Error {
    match error.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(error.kind(), error.to_string()),
    }
}
