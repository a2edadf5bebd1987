//! The io engine: one thread per data directory that performs every log write.
//!
//! Appenders hand the engine [`WriteRequest`]s through a bounded crossbeam
//! channel (a full channel blocks them: that is the engine's backpressure).
//! The thread works in *rounds*: it waits for one request, takes whatever
//! else is queued (up to `round_requests_max` / `round_bytes_max`), performs
//! all of the round's writes, then one `fdatasync` per file that a request in
//! the round needs durable, and only then runs the completions, in the order
//! the requests arrived. While a round is on the device the next one queues
//! up, so concurrent appenders share each sync: that is group commit.
//!
//! Two backends perform a round: `uring` (one `io_uring` per engine, writes
//! for one file linked and followed by a linked `fdatasync`) and `sync`
//! (`pwrite` + `fdatasync`). They share this module's round logic, so they
//! have the same semantics and pass the same tests.
//!
//! Architecture invariant: completions run in request order, on the engine
//! thread, after the round's writes and syncs have finished. A log relies on
//! this to publish its end offset in order.

pub(crate) mod direct;
mod sync;
mod uring;

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};

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
    pub data: Arc<Vec<u8>>,
    /// Whether and when the write must become durable.
    pub sync: SyncMode,
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
/// Lifecycle: the engine thread runs until the last handle is dropped (or
/// [`IoEngine::shutdown`] is called); it then finishes the queued requests,
/// syncs files with pending interval syncs, and exits. `Drop` joins it.
pub struct IoEngine {
    /// Closed (set to `None`) by `shutdown`, which ends the thread's loop.
    sender: Mutex<Option<Sender<Request>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    kind: EngineKind,
    stats: Arc<EngineStats>,
    receiver_probe: Receiver<Request>,
}

impl std::fmt::Debug for IoEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoEngine").field("kind", &self.kind).finish()
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
        let (backend, kind): (Box<dyn Backend>, EngineKind) = match config.kind {
            EngineKind::Sync => (Box::new(sync::SyncBackend), EngineKind::Sync),
            EngineKind::Uring => (
                Box::new(uring::UringBackend::new(ring_entries).map_err(StorageError::EngineStart)?),
                EngineKind::Uring,
            ),
            EngineKind::Auto => match uring::UringBackend::new(ring_entries) {
                Ok(backend) => (Box::new(backend), EngineKind::Uring),
                Err(error) => {
                    tracing::warn!(%error, "io_uring unavailable; using the sync io engine");
                    (Box::new(sync::SyncBackend), EngineKind::Sync)
                }
            },
        };
        let (sender, receiver) = crossbeam_channel::bounded(config.queue_depth.max(1));
        let stats = Arc::new(EngineStats::default());
        let worker = Worker {
            receiver: receiver.clone(),
            backend,
            stats: stats.clone(),
            round_requests_max: config.round_requests_max.max(1),
            round_bytes_max: config.round_bytes_max.max(1),
            dirty: HashMap::new(),
            pool: direct::BufferPool::default(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("weir-io-{}", kind_name(kind)))
            .spawn(move || worker.run())
            .map_err(StorageError::EngineStart)?;
        tracing::info!(engine = kind_name(kind), "io engine started");
        Ok(Arc::new(IoEngine {
            sender: Mutex::new(Some(sender)),
            thread: Mutex::new(Some(thread)),
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
            let guard = self.sender.lock().unwrap_or_else(|poison| poison.into_inner());
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
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .take();
        if let Some(thread) = thread
            && thread.join().is_err()
        {
            tracing::error!("io engine thread panicked");
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

/// One `fdatasync` of a round, issued after the writes listed in `writes`.
pub(crate) struct SyncOp {
    pub fd: RawFd,
    /// Indices (into the round's writes) of this file's writes.
    pub writes: Vec<usize>,
    /// Set once the sync succeeded after all of `writes` finished.
    pub done: bool,
    /// Set by the backend if the sync itself failed.
    pub error: Option<io::Error>,
    /// Time spent in the sync, for stats.
    pub elapsed: Duration,
}

/// Performs one round: every write to completion (or hard error), then every
/// sync after its file's writes.
pub(crate) trait Backend: Send {
    fn execute(&mut self, writes: &mut [WriteOp<'_>], syncs: &mut [SyncOp]);
}

struct Worker {
    receiver: Receiver<Request>,
    backend: Box<dyn Backend>,
    stats: Arc<EngineStats>,
    round_requests_max: usize,
    round_bytes_max: usize,
    /// Files written with `SyncMode::Within`, and the instant by which each
    /// must be synced. Entries leave when a sync covers them.
    dirty: HashMap<RawFd, (WriteTarget, Instant)>,
    /// Aligned buffers for direct writes, reused across rounds.
    pool: direct::BufferPool,
}

impl Worker {
    fn run(mut self) {
        let mut round: Vec<Request> = Vec::with_capacity(self.round_requests_max);
        loop {
            let next_deadline = self.dirty.values().map(|(_, deadline)| *deadline).min();
            let first = match next_deadline {
                Some(deadline) => self.receiver.recv_deadline(deadline),
                None => self.receiver.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            let disconnected = match first {
                Ok(request) => {
                    round.push(request);
                    false
                }
                Err(RecvTimeoutError::Timeout) => false,
                Err(RecvTimeoutError::Disconnected) => true,
            };
            let mut round_bytes = round.iter().map(request_bytes).sum::<usize>();
            while round.len() < self.round_requests_max && round_bytes < self.round_bytes_max {
                match self.receiver.try_recv() {
                    Ok(request) => {
                        round_bytes += request_bytes(&request);
                        round.push(request);
                    }
                    Err(_) => break,
                }
            }
            // On shutdown every pending interval sync is due now.
            let now = if disconnected {
                Instant::now() + Duration::from_secs(3600 * 24 * 365)
            } else {
                Instant::now()
            };
            self.perform_round(&mut round, now);
            if disconnected {
                return;
            }
        }
    }

    /// Runs one round and completes its requests in order.
    fn perform_round(&mut self, round: &mut Vec<Request>, now: Instant) {
        let due: Vec<WriteTarget> = self
            .dirty
            .values()
            .filter(|(_, deadline)| *deadline <= now)
            .map(|(target, _)| target.clone())
            .collect();
        if round.is_empty() && due.is_empty() {
            return;
        }
        self.stats.rounds.fetch_add(1, Ordering::Relaxed);

        let plan_started = Instant::now();
        let plan = plan_writes(round, &mut self.pool);
        let mut syncs: Vec<SyncOp> = Vec::new();
        let mut sync_index: HashMap<RawFd, usize> = HashMap::new();
        let mut sync_of_request: Vec<Option<usize>> = Vec::with_capacity(round.len());
        let mut ensure_sync = |fd: RawFd, syncs: &mut Vec<SyncOp>| -> usize {
            *sync_index.entry(fd).or_insert_with(|| {
                syncs.push(SyncOp {
                    fd,
                    writes: Vec::new(),
                    done: false,
                    error: None,
                    elapsed: Duration::ZERO,
                });
                syncs.len() - 1
            })
        };
        for request in round.iter() {
            let sync = match request {
                Request::Write(write) => match write.sync {
                    SyncMode::Now => Some(ensure_sync(write.target.fd(), &mut syncs)),
                    SyncMode::Within(delay) => {
                        let deadline = now + delay;
                        self.dirty
                            .entry(write.target.fd())
                            .and_modify(|(_, due)| *due = (*due).min(deadline))
                            .or_insert_with(|| (write.target.clone(), deadline));
                        None
                    }
                    SyncMode::Never => None,
                },
                Request::Sync { file, .. } => Some(ensure_sync(file.as_raw_fd(), &mut syncs)),
            };
            sync_of_request.push(sync);
        }
        for target in &due {
            ensure_sync(target.fd(), &mut syncs);
        }

        let mut writes: Vec<WriteOp<'_>> = plan.ops(round);
        for sync in &mut syncs {
            sync.writes = (0..writes.len()).filter(|index| writes[*index].fd == sync.fd).collect();
        }
        let execute_started = Instant::now();
        self.stats
            .plan_nanos_total
            .fetch_add(nanos_since(plan_started, execute_started), Ordering::Relaxed);
        self.backend.execute(&mut writes, &mut syncs);
        self.stats
            .execute_nanos_total
            .fetch_add(nanos_since(execute_started, Instant::now()), Ordering::Relaxed);

        for sync in &syncs {
            debug_assert!(sync.done || sync.error.is_some(), "backend left a sync unfinished");
            self.stats.record_sync(sync.elapsed, sync.error.is_none());
            if sync.error.is_none() {
                self.dirty.remove(&sync.fd);
            } else if due.iter().any(|target| target.fd() == sync.fd) {
                // Nobody waits on an interval sync: the error goes to the log.
                tracing::error!(fd = sync.fd, error = ?sync.error, "interval fdatasync failed");
                self.dirty.remove(&sync.fd);
            }
        }
        let write_errors: Vec<Option<io::Error>> = writes.iter().map(|op| op.error.as_ref().map(copy_error)).collect();
        drop(writes);
        plan.finish(&write_errors);
        let outcomes: Vec<io::Result<()>> = plan
            .op_of_request
            .iter()
            .zip(&sync_of_request)
            .zip(round.iter())
            .map(|((op, sync), request)| {
                if let Some(index) = op {
                    if let Some(error) = &write_errors[*index] {
                        return Err(copy_error(error));
                    }
                    if let Request::Write(write) = request {
                        self.stats.writes.fetch_add(1, Ordering::Relaxed);
                        self.stats
                            .bytes_written
                            .fetch_add(write.data.len() as u64, Ordering::Relaxed);
                    }
                }
                match sync.map(|index| &syncs[index]) {
                    Some(SyncOp {
                        error: Some(error), ..
                    }) => Err(copy_error(error)),
                    _ => Ok(()),
                }
            })
            .collect();
        plan.recycle(&mut self.pool);
        for (request, outcome) in round.drain(..).zip(outcomes) {
            match request {
                Request::Write(write) => (write.done)(outcome),
                Request::Sync { done, .. } => done(outcome),
            }
        }
    }
}

/// How a round's requests become writes: buffered requests one to one,
/// contiguous direct requests to the same file coalesced into one aligned write.
struct WritePlan {
    /// For each request, the index of the write op that carries it.
    op_of_request: Vec<Option<usize>>,
    ops: Vec<PlannedOp>,
}

enum PlannedOp {
    /// Request `index`'s bytes as they are.
    Buffered { request: usize },
    /// Coalesced requests in one aligned buffer (or the error building it).
    Direct {
        file: Arc<direct::DirectFile>,
        write: io::Result<direct::DirectWrite>,
    },
}

fn plan_writes(round: &[Request], pool: &mut direct::BufferPool) -> WritePlan {
    let mut op_of_request = vec![None; round.len()];
    let mut ops = Vec::new();
    // Direct requests grouped per file while they stay contiguous.
    let mut groups: Vec<(Arc<direct::DirectFile>, u64, u64, Vec<usize>)> = Vec::new();
    for (index, request) in round.iter().enumerate() {
        let Request::Write(write) = request else { continue };
        match &write.target {
            WriteTarget::Buffered(_) => {
                op_of_request[index] = Some(ops.len());
                ops.push(PlannedOp::Buffered { request: index });
            }
            WriteTarget::Direct(file) => {
                let end = write.position + write.data.len() as u64;
                match groups.iter_mut().rev().find(|group| Arc::ptr_eq(&group.0, file)) {
                    Some(group) if group.2 == write.position => {
                        group.2 = end;
                        group.3.push(index);
                    }
                    _ => groups.push((file.clone(), write.position, end, vec![index])),
                }
            }
        }
    }
    for (file, position, _, members) in groups {
        let pieces: Vec<&[u8]> = members
            .iter()
            .filter_map(|index| match &round[*index] {
                Request::Write(write) => Some(write.data.as_slice()),
                Request::Sync { .. } => None,
            })
            .collect();
        let write = direct::coalesce(&file, position, &pieces, pool);
        for member in members {
            op_of_request[member] = Some(ops.len());
        }
        ops.push(PlannedOp::Direct { file, write });
    }
    WritePlan { op_of_request, ops }
}

impl WritePlan {
    /// The backend's view of the planned writes. A direct write whose buffer
    /// could not be built is handed over already failed.
    fn ops<'a>(&'a self, round: &'a [Request]) -> Vec<WriteOp<'a>> {
        self.ops
            .iter()
            .map(|op| match op {
                PlannedOp::Buffered { request } => match &round[*request] {
                    Request::Write(write) => WriteOp {
                        fd: write.target.fd(),
                        position: write.position,
                        data: &write.data,
                        written: 0,
                        align: 1,
                        error: None,
                    },
                    Request::Sync { .. } => unreachable!("planned ops are writes"),
                },
                PlannedOp::Direct { file, write } => match write {
                    Ok(write) => WriteOp {
                        fd: file.fd(),
                        position: write.block_position,
                        data: write.bytes(),
                        written: 0,
                        align: direct::DIRECT_BLOCK_BYTES,
                        error: None,
                    },
                    Err(error) => WriteOp {
                        fd: file.fd(),
                        position: 0,
                        data: &[],
                        written: 0,
                        align: 1,
                        error: Some(copy_error(error)),
                    },
                },
            })
            .collect()
    }

    /// Carries each direct file's tail forward (or forgets it on failure).
    fn finish(&self, errors: &[Option<io::Error>]) {
        for (op, error) in self.ops.iter().zip(errors) {
            if let PlannedOp::Direct { file, write: Ok(write) } = op {
                direct::finish(file, write, error.is_none());
            }
        }
    }

    /// Hands the aligned buffers back for the next round.
    fn recycle(self, pool: &mut direct::BufferPool) {
        for op in self.ops {
            if let PlannedOp::Direct { write: Ok(write), .. } = op {
                pool.give(write.buffer);
            }
        }
    }
}

fn nanos_since(from: Instant, to: Instant) -> u64 {
    u64::try_from(to.duration_since(from).as_nanos()).unwrap_or(u64::MAX)
}

fn request_bytes(request: &Request) -> usize {
    match request {
        Request::Write(write) => write.data.len(),
        Request::Sync { .. } => 0,
    }
}

/// io::Error is not Clone; keep the OS code (what callers match on) and text.
fn copy_error(error: &io::Error) -> io::Error {
    match error.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(error.kind(), error.to_string()),
    }
}
