//! One round of the io engine: built by the planner while the previous round
//! is on the device, then executed by the executor.
//!
//! Building a round copies each direct write's bytes into the aligned buffer
//! of its file's group (so that memcpy overlaps the device time of the round
//! before); buffered writes are referenced as they are.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::direct::{AlignedBuffer, BufferPool, DIRECT_BLOCK_BYTES, DirectFile};
use super::{Backend, EngineStats, Request, SyncOp, WriteOp, WriteTarget, copy_error, nanos_since};
use crate::config::SyncMode;

/// Contiguous direct writes to one file, coalesced into one aligned buffer.
struct DirectGroup {
    file: Arc<DirectFile>,
    buffer: AlignedBuffer,
    /// File position of `buffer[0]` (block aligned).
    block_position: u64,
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

    /// Performs the round (writes, then syncs) and completes its requests in
    /// order. `dirty` holds the files owed an interval sync; those due by
    /// `now` are synced in this round.
    pub(crate) fn execute(
        mut self,
        backend: &mut dyn Backend,
        stats: &EngineStats,
        dirty: &mut HashMap<RawFd, (WriteTarget, Instant)>,
        now: Instant,
        pool: &Mutex<BufferPool>,
    ) {
        let due: Vec<RawFd> = dirty
            .iter()
            .filter(|(_, (_, deadline))| *deadline <= now)
            .map(|(fd, _)| *fd)
            .collect();
        if self.requests.is_empty() && due.is_empty() {
            return;
        }
        stats.rounds.fetch_add(1, Ordering::Relaxed);
        stats
            .plan_nanos_total
            .fetch_add(self.plan_nanos, Ordering::Relaxed);

        let mut syncs: Vec<SyncOp> = Vec::new();
        let mut sync_index: HashMap<RawFd, usize> = HashMap::new();
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
        let mut sync_of_request = Vec::with_capacity(self.requests.len());
        for request in &self.requests {
            let sync = match request {
                Request::Write(write) => match write.sync {
                    SyncMode::Now => Some(ensure_sync(write.target.fd(), &mut syncs)),
                    SyncMode::Within(delay) => {
                        let deadline = now + delay;
                        dirty
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
        for fd in &due {
            ensure_sync(*fd, &mut syncs);
        }

        // Padding after a group's valid bytes must be zeros (buffers are reused).
        for op in &mut self.ops {
            if let PlannedOp::Direct(group) = op {
                let (valid, write) = (group.valid_bytes(), group.write_bytes());
                group.buffer.as_mut_slice()[valid..write].fill(0);
            }
        }
        let mut writes: Vec<WriteOp<'_>> = self
            .ops
            .iter()
            .map(|op| write_op(op, &self.requests))
            .collect();
        for sync in &mut syncs {
            sync.writes = (0..writes.len())
                .filter(|index| writes[*index].fd == sync.fd)
                .collect();
        }
        let started = Instant::now();
        backend.execute(&mut writes, &mut syncs);
        stats
            .execute_nanos_total
            .fetch_add(nanos_since(started, Instant::now()), Ordering::Relaxed);
        let write_errors: Vec<Option<io::Error>> = writes
            .iter()
            .map(|op| op.error.as_ref().map(copy_error))
            .collect();
        drop(writes);

        for sync in &syncs {
            debug_assert!(
                sync.done || sync.error.is_some(),
                "backend left a sync unfinished"
            );
            stats.record_sync(sync.elapsed, sync.error.is_none());
            if sync.error.is_none() {
                dirty.remove(&sync.fd);
            } else if due.contains(&sync.fd) {
                // Nobody waits on an interval sync: the error goes to the log.
                tracing::error!(fd = sync.fd, error = ?sync.error, "interval fdatasync failed");
                dirty.remove(&sync.fd);
            }
        }
        for (op, error) in self.ops.iter().zip(&write_errors) {
            if let (PlannedOp::Direct(group), Some(_)) = (op, error) {
                group.file.forget_tail();
            }
        }
        let outcomes: Vec<io::Result<()>> = self
            .op_of_request
            .iter()
            .zip(&sync_of_request)
            .zip(&self.requests)
            .map(|((op, sync), request)| {
                if let Some(index) = op {
                    if let Some(error) = &write_errors[*index] {
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
            .collect();
        {
            let mut pool = pool.lock().unwrap_or_else(|poison| poison.into_inner());
            for op in self.ops.drain(..) {
                if let PlannedOp::Direct(group) = op {
                    pool.give(group.buffer);
                }
            }
        }
        for (request, outcome) in self.requests.drain(..).zip(outcomes) {
            match request {
                Request::Write(write) => (write.done)(outcome),
                Request::Sync { done, .. } => done(outcome),
            }
        }
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

fn write_op<'a>(op: &'a PlannedOp, requests: &'a [Request]) -> WriteOp<'a> {
    match op {
        PlannedOp::Buffered { request } => match &requests[*request] {
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
        PlannedOp::Direct(group) => WriteOp {
            fd: group.file.fd(),
            position: group.block_position,
            data: &group.buffer.as_slice()[..group.write_bytes()],
            written: 0,
            align: DIRECT_BLOCK_BYTES,
            error: None,
        },
        PlannedOp::Failed { fd, error } => WriteOp {
            fd: *fd,
            position: 0,
            data: &[],
            written: 0,
            align: 1,
            error: Some(copy_error(error)),
        },
    }
}
