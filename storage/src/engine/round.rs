//! One round of the io engine: built by the planner while earlier rounds are
//! on the device, then executed by one of the executors.
//!
//! Building a round copies each direct write's bytes into the aligned buffer
//! of its file's group (so that memcpy overlaps device time); buffered writes
//! are referenced as they are.
//!
//! Executing round `n` overlaps with round `n - 1` on the other executor:
//! - phase A writes everything that no earlier round also writes: buffered
//!   writes and direct groups minus their first block when that block is
//!   shared with the previous write to the file (it carries that write's tail);
//! - phase B, once every earlier round has finished its writes, writes those
//!   shared first blocks, so a block is never written by two rounds at once;
//! - phase C syncs each file the round needs durable (after its own writes,
//!   hence after every earlier round's writes too);
//! - completions run once round `n - 1` has delivered its own, so every log
//!   sees its appends complete in order.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::direct::{AlignedBuffer, BufferPool, DIRECT_BLOCK_BYTES, DirectFile};
use super::{
    Backend, EngineStats, Request, SyncOp, WriteOp, WriteTarget, copy_error, fail_unfinished,
    nanos_since,
};
use crate::config::SyncMode;

/// Contiguous direct writes to one file, coalesced into one aligned buffer.
struct DirectGroup {
    file: Arc<DirectFile>,
    buffer: AlignedBuffer,
    /// File position of `buffer[0]` (block aligned).
    block_position: u64,
    /// File position of the group's first new byte: after `block_position`
    /// when the first block starts with a carried tail.
    start: u64,
    /// File position after the last valid byte.
    end: u64,
}

impl DirectGroup {
    fn valid_bytes(&self) -> usize {
        (self.end - self.block_position) as usize
    }

    fn write_bytes(&self) -> usize {
        self.valid_bytes().next_multiple_of(DIRECT_BLOCK_BYTES)
    }

    /// The first block is also written by the previous write to the file.
    fn shares_first_block(&self) -> bool {
        self.start > self.block_position
    }
}

enum PlannedOp {
    /// Request `request`'s bytes as they are.
    Buffered {
        request: usize,
    },
    Direct(DirectGroup),
    /// The group could not be prepared (reading its first block failed).
    Failed {
        fd: RawFd,
        error: io::Error,
    },
}

/// A round being built or executed.
#[derive(Default)]
pub(crate) struct Round {
    requests: Vec<Request>,
    /// For each request, the op that writes its bytes.
    op_of_request: Vec<Option<usize>>,
    ops: Vec<PlannedOp>,
    /// The op of the group still accepting writes, per direct file.
    open_groups: HashMap<*const DirectFile, usize>,
    bytes: usize,
    plan_nanos: u64,
}

// SAFETY: the raw pointers in `open_groups` are only compared, never
// dereferenced; everything else is Send.
unsafe impl Send for Round {}

impl Round {
    pub(crate) fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    /// True once the round holds `requests_max` requests or `bytes_max` bytes.
    pub(crate) fn is_full(&self, requests_max: usize, bytes_max: usize) -> bool {
        self.requests.len() >= requests_max || self.bytes >= bytes_max
    }

    /// Adds a request, copying a direct write's bytes into its group.
    pub(crate) fn push(&mut self, request: Request, pool: &Mutex<BufferPool>) {
        let started = Instant::now();
        let index = self.requests.len();
        let op = match &request {
            Request::Write(write) => {
                self.bytes += write.data.len();
                Some(match &write.target {
                    WriteTarget::Buffered(_) => {
                        self.ops.push(PlannedOp::Buffered { request: index });
                        self.ops.len() - 1
                    }
                    WriteTarget::Direct(file) => {
                        self.plan_direct(file, write.position, &write.data, pool)
                    }
                })
            }
            Request::Sync { .. } => None,
        };
        self.requests.push(request);
        self.op_of_request.push(op);
        self.plan_nanos += nanos_since(started, Instant::now());
    }

    fn plan_direct(
        &mut self,
        file: &Arc<DirectFile>,
        position: u64,
        data: &[u8],
        pool: &Mutex<BufferPool>,
    ) -> usize {
        let key = Arc::as_ptr(file);
        let open = self.open_groups.get(&key).copied();
        if let Some(op) = open
            && let PlannedOp::Direct(group) = &mut self.ops[op]
            && group.end == position
            && append_to_group(group, data, pool)
        {
            return op;
        }
        self.start_group(file, position, data, pool)
    }

    fn start_group(
        &mut self,
        file: &Arc<DirectFile>,
        position: u64,
        data: &[u8],
        pool: &Mutex<BufferPool>,
    ) -> usize {
        let block_position = position - position % DIRECT_BLOCK_BYTES as u64;
        let planned = file.prefix(block_position, position).and_then(|prefix| {
            let needed = (prefix.len() + data.len()).next_multiple_of(DIRECT_BLOCK_BYTES);
            let mut buffer = pool
                .lock()
                .unwrap_or_else(|poison| poison.into_inner())
                .take(needed)?;
            let slice = buffer.as_mut_slice();
            slice[..prefix.len()].copy_from_slice(&prefix);
            slice[prefix.len()..prefix.len() + data.len()].copy_from_slice(data);
            Ok(DirectGroup {
                file: file.clone(),
                buffer,
                block_position,
                start: position,
                end: position + data.len() as u64,
            })
        });
        let op = self.ops.len();
        match planned {
            Ok(group) => {
                carry_tail(&group);
                self.ops.push(PlannedOp::Direct(group));
                self.open_groups.insert(Arc::as_ptr(file), op);
            }
            Err(error) => {
                file.forget_tail();
                self.ops.push(PlannedOp::Failed {
                    fd: file.fd(),
                    error,
                });
                self.open_groups.remove(&Arc::as_ptr(file));
            }
        }
        op
    }

    /// Performs the round as the module comment describes and completes its
    /// requests in order. Files owed an interval sync by `now` are synced too.
    pub(crate) fn execute(
        mut self,
        context: &ExecuteContext<'_>,
        backend: &mut dyn Backend,
        sequence: u64,
        now: Instant,
    ) {
        let stats = context.stats;
        stats.rounds.fetch_add(1, Ordering::Relaxed);
        stats
            .plan_nanos_total
            .fetch_add(self.plan_nanos, Ordering::Relaxed);
        let (mut syncs, sync_of_request, due) = self.plan_syncs(context, now, sequence);

        // Padding after a group's valid bytes must be zeros (buffers are reused).
        for op in &mut self.ops {
            if let PlannedOp::Direct(group) = op {
                let (valid, write) = (group.valid_bytes(), group.write_bytes());
                group.buffer.as_mut_slice()[valid..write].fill(0);
            }
        }
        let started = Instant::now();
        // Phase A: everything no earlier round also writes.
        let mut phase_a: Vec<WriteOp<'_>> = Vec::new();
        let mut phase_b: Vec<WriteOp<'_>> = Vec::new();
        // For each op: its writes in phase A and B.
        let mut op_writes: Vec<(Option<usize>, Option<usize>)> = Vec::with_capacity(self.ops.len());
        for op in &self.ops {
            let (whole, shared) = write_ops(op, &self.requests);
            let a = whole.map(|write| {
                phase_a.push(write);
                phase_a.len() - 1
            });
            let b = shared.map(|write| {
                phase_b.push(write);
                phase_b.len() - 1
            });
            op_writes.push((a, b));
        }
        if !phase_a.is_empty() {
            backend.execute(&mut phase_a, &mut []);
            fail_unfinished(&mut phase_a, &mut []);
        }
        // Phase B: shared first blocks, after every earlier round's writes.
        context.sequencer.wait_writes_before(sequence);
        if !phase_b.is_empty() {
            backend.execute(&mut phase_b, &mut []);
            fail_unfinished(&mut phase_b, &mut []);
        }
        context.sequencer.finish_writes(sequence);
        // Phase C: syncs, after this round's writes and so all earlier ones.
        if !syncs.is_empty() {
            backend.execute(&mut [], &mut syncs);
            fail_unfinished(&mut [], &mut syncs);
        }
        stats
            .execute_nanos_total
            .fetch_add(nanos_since(started, Instant::now()), Ordering::Relaxed);

        let op_errors: Vec<Option<io::Error>> = op_writes
            .iter()
            .map(|(a, b)| {
                let a = a.and_then(|index| phase_a[index].error.as_ref());
                let b = b.and_then(|index| phase_b[index].error.as_ref());
                a.or(b).map(copy_error)
            })
            .collect();
        drop(phase_a);
        drop(phase_b);
        self.record_syncs(context, &syncs, &due, sequence);
        for (op, error) in self.ops.iter().zip(&op_errors) {
            if let (PlannedOp::Direct(group), Some(_)) = (op, error) {
                group.file.forget_tail();
            }
        }
        let outcomes = self.outcomes(stats, &op_errors, &sync_of_request, &syncs);
        {
            let mut pool = context
                .pool
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            for op in self.ops.drain(..) {
                if let PlannedOp::Direct(group) = op {
                    pool.give(group.buffer);
                }
            }
        }
        context.sequencer.wait_delivered_before(sequence);
        for (request, outcome) in self.requests.drain(..).zip(outcomes) {
            match request {
                Request::Write(write) => (write.done)(outcome),
                Request::Sync { done, .. } => done(outcome),
            }
        }
        context.sequencer.finish_delivery(sequence);
    }

    /// The syncs this round performs: one per file a request needs durable
    /// now, plus files whose interval sync is due. Records interval deadlines.
    fn plan_syncs(
        &self,
        context: &ExecuteContext<'_>,
        now: Instant,
        sequence: u64,
    ) -> (Vec<SyncOp>, Vec<Option<usize>>, Vec<RawFd>) {
        let mut dirty = context
            .dirty
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let due: Vec<RawFd> = dirty
            .iter()
            .filter(|(_, owed)| owed.deadline <= now)
            .map(|(fd, _)| *fd)
            .collect();
        let mut syncs: Vec<SyncOp> = Vec::new();
        let mut sync_index: HashMap<RawFd, usize> = HashMap::new();
        let mut ensure_sync = |fd: RawFd, syncs: &mut Vec<SyncOp>| -> usize {
            *sync_index.entry(fd).or_insert_with(|| {
                syncs.push(SyncOp {
                    fd,
                    done: false,
                    error: None,
                    elapsed: Duration::ZERO,
                });
                syncs.len() - 1
            })
        };
        let mut sync_of_request = Vec::with_capacity(self.requests.len());
        for request in &self.requests {
            let sync = match request {
                Request::Write(write) => match write.sync {
                    SyncMode::Now => Some(ensure_sync(write.target.fd(), &mut syncs)),
                    SyncMode::Within(delay) => {
                        let deadline = now + delay;
                        dirty
                            .entry(write.target.fd())
                            .and_modify(|owed| {
                                owed.deadline = owed.deadline.min(deadline);
                                owed.last_sequence = owed.last_sequence.max(sequence);
                            })
                            .or_insert_with(|| OwedSync {
                                _target: write.target.clone(),
                                deadline,
                                last_sequence: sequence,
                                failed: write.sync_failed.clone(),
                            });
                        None
                    }
                    SyncMode::Never => None,
                },
                Request::Sync { file, .. } => Some(ensure_sync(file.as_raw_fd(), &mut syncs)),
            };
            sync_of_request.push(sync);
        }
        for fd in &due {
            ensure_sync(*fd, &mut syncs);
        }
        (syncs, sync_of_request, due)
    }

    /// Counts the syncs and clears files they covered from the dirty map. A
    /// sync in round `sequence` covers writes of rounds up to `sequence`
    /// (they finished before its phase C), not those of later rounds that
    /// may already have registered.
    fn record_syncs(
        &self,
        context: &ExecuteContext<'_>,
        syncs: &[SyncOp],
        due: &[RawFd],
        sequence: u64,
    ) {
        let mut dirty = context
            .dirty
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        for sync in syncs {
            context
                .stats
                .record_sync(sync.elapsed, sync.error.is_none());
            let Some(owed) = dirty.get(&sync.fd) else {
                continue;
            };
            if owed.last_sequence > sequence {
                continue;
            }
            if sync.error.is_some() && due.contains(&sync.fd) {
                // Nobody waits on an interval sync: the log learns through its flag.
                tracing::error!(fd = sync.fd, error = ?sync.error, "interval fdatasync failed");
                owed.failed.store(true, Ordering::Release);
            }
            if sync.error.is_none() || due.contains(&sync.fd) {
                dirty.remove(&sync.fd);
            }
        }
    }

    /// Each request's outcome: its write's error, else its sync's error.
    fn outcomes(
        &self,
        stats: &EngineStats,
        op_errors: &[Option<io::Error>],
        sync_of_request: &[Option<usize>],
        syncs: &[SyncOp],
    ) -> Vec<io::Result<()>> {
        self.op_of_request
            .iter()
            .zip(sync_of_request)
            .zip(&self.requests)
            .map(|((op, sync), request)| {
                if let Some(index) = op {
                    if let Some(error) = &op_errors[*index] {
                        return Err(copy_error(error));
                    }
                    if let Request::Write(write) = request {
                        stats.writes.fetch_add(1, Ordering::Relaxed);
                        stats
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
            .collect()
    }
}

/// A file written with `SyncMode::Within` and not yet synced since.
pub(crate) struct OwedSync {
    /// Held so the descriptor stays open, and its number unique, until synced.
    pub _target: WriteTarget,
    /// The instant by which it must be synced.
    pub deadline: Instant,
    /// The latest round that wrote it: only a sync in that round or later
    /// covers every owed write.
    pub last_sequence: u64,
    /// Raised if the interval sync fails.
    pub failed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// What every executor shares.
pub(crate) struct ExecuteContext<'a> {
    pub stats: &'a EngineStats,
    /// Files owed an interval sync. Entries leave when a sync covers them.
    pub dirty: &'a Mutex<HashMap<RawFd, OwedSync>>,
    pub pool: &'a Mutex<BufferPool>,
    pub sequencer: &'a Sequencer,
}

/// Orders the overlapping rounds: round `n` writes shared blocks only after
/// rounds `< n` have written, and completes only after they have completed.
#[derive(Default)]
pub(crate) struct Sequencer {
    state: Mutex<SequencerState>,
    changed: std::sync::Condvar,
}

#[derive(Default)]
struct SequencerState {
    /// Rounds `< writes_done` have finished all their writes.
    writes_done: u64,
    /// Rounds `< delivered` have run their completions.
    delivered: u64,
}

impl Sequencer {
    fn wait_until(&self, ready: impl Fn(&SequencerState) -> bool) {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        while !ready(&state) {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(|poison| poison.into_inner());
        }
    }

    fn update(&self, change: impl FnOnce(&mut SequencerState)) {
        change(
            &mut self
                .state
                .lock()
                .unwrap_or_else(|poison| poison.into_inner()),
        );
        self.changed.notify_all();
    }

    fn wait_writes_before(&self, sequence: u64) {
        self.wait_until(|state| state.writes_done >= sequence);
    }

    fn finish_writes(&self, sequence: u64) {
        self.update(|state| {
            assert_eq!(
                state.writes_done, sequence,
                "rounds finish their writes in order"
            );
            state.writes_done = sequence + 1;
        });
    }

    fn wait_delivered_before(&self, sequence: u64) {
        self.wait_until(|state| state.delivered >= sequence);
    }

    fn finish_delivery(&self, sequence: u64) {
        self.update(|state| {
            assert_eq!(state.delivered, sequence, "rounds complete in order");
            state.delivered = sequence + 1;
        });
    }
}

/// Appends `data` to an open group, growing its buffer if needed. False if
/// no bigger buffer could be had (the caller starts a new group).
fn append_to_group(group: &mut DirectGroup, data: &[u8], pool: &Mutex<BufferPool>) -> bool {
    let valid = group.valid_bytes();
    let needed = (valid + data.len()).next_multiple_of(DIRECT_BLOCK_BYTES);
    if needed > group.buffer.as_slice().len() {
        let mut spare = pool.lock().unwrap_or_else(|poison| poison.into_inner());
        let Ok(mut bigger) = spare.take(needed.max(2 * group.buffer.as_slice().len())) else {
            return false;
        };
        bigger.as_mut_slice()[..valid].copy_from_slice(&group.buffer.as_slice()[..valid]);
        spare.give(std::mem::replace(&mut group.buffer, bigger));
    }
    group.buffer.as_mut_slice()[valid..valid + data.len()].copy_from_slice(data);
    group.end += data.len() as u64;
    carry_tail(group);
    true
}

/// Makes the group's last partial block the file's carried tail.
fn carry_tail(group: &DirectGroup) {
    group.file.set_tail(
        group.block_position,
        &group.buffer.as_slice()[..group.valid_bytes()],
        group.end,
    );
}

/// The backend writes for one planned op: what can go in phase A, and the
/// shared first block that must wait for phase B.
fn write_ops<'a>(
    op: &'a PlannedOp,
    requests: &'a [Request],
) -> (Option<WriteOp<'a>>, Option<WriteOp<'a>>) {
    let write = |fd, position, data, align| WriteOp {
        fd,
        position,
        data,
        written: 0,
        align,
        submitted_from: 0,
        error: None,
    };
    match op {
        PlannedOp::Buffered { request } => match &requests[*request] {
            Request::Write(request) => (
                Some(write(
                    request.target.fd(),
                    request.position,
                    &request.data,
                    1,
                )),
                None,
            ),
            Request::Sync { .. } => unreachable!("planned ops are writes"),
        },
        PlannedOp::Direct(group) => {
            let bytes = &group.buffer.as_slice()[..group.write_bytes()];
            let fd = group.file.fd();
            if !group.shares_first_block() {
                return (
                    Some(write(fd, group.block_position, bytes, DIRECT_BLOCK_BYTES)),
                    None,
                );
            }
            let (head, body) = bytes.split_at(DIRECT_BLOCK_BYTES);
            let shared = write(fd, group.block_position, head, DIRECT_BLOCK_BYTES);
            let rest = (!body.is_empty()).then(|| {
                write(
                    fd,
                    group.block_position + DIRECT_BLOCK_BYTES as u64,
                    body,
                    DIRECT_BLOCK_BYTES,
                )
            });
            (rest, Some(shared))
        }
        PlannedOp::Failed { fd, error } => (
            Some(WriteOp {
                error: Some(copy_error(error)),
                ..write(*fd, 0, &[], 1)
            }),
            None,
        ),
    }
}
