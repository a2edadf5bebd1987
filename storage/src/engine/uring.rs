//! The io_uring backend: a round's writes in one submission, then its syncs
//! in another.
//!
//! Writes to the same file are linked in order (two groups of one file in a
//! round may share a block, and the later must land last); writes to
//! different files run in parallel. A short write breaks a link: the kernel
//! completes the rest of that chain with `-ECANCELED`. Neither is an error:
//! the backend resubmits what is left in another phase, resuming at an
//! aligned position. Syncs start only after every write has finished.

use std::io;
use std::time::Instant;

use io_uring::{IoUring, opcode, squeue, types};

use super::{Backend, SyncOp, WriteOp};

/// Largest submission queue: a round never needs more, and chains longer
/// than the queue are submitted in parts.
const RING_ENTRIES_MAX: u32 = 4096;

/// Tries of one `io_uring_enter` that fails with a transient error.
const ENTER_RETRIES_MAX: u32 = 1000;

/// Submission queue size for rounds of `round_requests_max` requests.
pub(crate) fn ring_entries(round_requests_max: usize) -> u32 {
    let wanted = (round_requests_max.max(1) + 16).next_power_of_two();
    u32::try_from(wanted)
        .unwrap_or(RING_ENTRIES_MAX)
        .min(RING_ENTRIES_MAX)
}

pub(crate) struct UringBackend {
    ring: IoUring,
}

impl UringBackend {
    pub(crate) fn new(entries: u32) -> io::Result<Self> {
        Ok(UringBackend {
            ring: IoUring::new(entries)?,
        })
    }

    /// Pushes as much of one file's outstanding writes as the queue has room
    /// for, linked in order. Returns how many entries were pushed.
    fn push_writes(&mut self, writes: &mut [WriteOp<'_>], chain: &[usize]) -> usize {
        let mut queue = self.ring.submission();
        let room = queue.capacity() - queue.len();
        let pending: Vec<usize> = chain
            .iter()
            .copied()
            .filter(|index| !writes[*index].finished())
            .take(room)
            .collect();
        for (position, index) in pending.iter().enumerate() {
            let op = &mut writes[*index];
            let from = op.resume_at();
            op.submitted_from = from;
            let rest = &op.data[from..];
            let flags = if position + 1 == pending.len() {
                squeue::Flags::empty()
            } else {
                squeue::Flags::IO_LINK
            };
            let len = u32::try_from(rest.len()).unwrap_or(u32::MAX);
            let entry = opcode::Write::new(types::Fd(op.fd), rest.as_ptr(), len)
                .offset(op.position + from as u64)
                .build()
                .flags(flags)
                .user_data(*index as u64);
            // SAFETY: the buffer belongs to the round and outlives the
            // submission (`execute` reaps every completion before returning),
            // and `room` guarantees the queue has space.
            if unsafe { queue.push(&entry) }.is_err() {
                unreachable!("room checked before pushing");
            }
        }
        pending.len()
    }

    /// Submits what was pushed and reaps exactly `pushed` completions, calling
    /// `complete(user_data, result)` for each.
    fn submit_and_reap(&mut self, pushed: usize, mut complete: impl FnMut(u64, i32)) {
        let mut reaped = 0usize;
        let mut retries = 0u32;
        while reaped < pushed {
            match self.ring.submit_and_wait(pushed - reaped) {
                Ok(_) => {}
                Err(error)
                    if matches!(
                        error.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) && retries < ENTER_RETRIES_MAX =>
                {
                    retries += 1;
                    std::thread::yield_now();
                }
                Err(error) => {
                    // Entries may still be in the kernel, reading buffers we
                    // would free on return: stopping is the only safe answer.
                    tracing::error!(%error, "io_uring_enter failed with operations in flight; aborting");
                    std::process::abort();
                }
            }
            for cqe in self.ring.completion() {
                reaped += 1;
                complete(cqe.user_data(), cqe.result());
            }
        }
    }

    fn write_all(&mut self, writes: &mut [WriteOp<'_>]) {
        // One chain per file, in op order.
        let mut order: Vec<usize> = (0..writes.len()).collect();
        order.sort_by_key(|index| writes[*index].fd);
        let mut chains: Vec<Vec<usize>> = Vec::new();
        for index in order {
            match chains.last_mut() {
                Some(chain) if writes[chain[0]].fd == writes[index].fd => chain.push(index),
                _ => chains.push(vec![index]),
            }
        }
        loop {
            let mut pushed = 0;
            for chain in &chains {
                pushed += self.push_writes(writes, chain);
            }
            if pushed == 0 {
                return;
            }
            self.submit_and_reap(pushed, |user_data, result| {
                let op = &mut writes[user_data as usize];
                match result {
                    n if n > 0 => op.written = op.submitted_from + n as usize,
                    0 => op.error = Some(io::Error::from(io::ErrorKind::WriteZero)),
                    code if matches!(-code, libc::ECANCELED | libc::EINTR | libc::EAGAIN) => {}
                    code => op.error = Some(io::Error::from_raw_os_error(-code)),
                }
            });
        }
    }

    fn sync_all(&mut self, syncs: &mut [SyncOp]) {
        loop {
            let started = Instant::now();
            let mut pushed = 0;
            {
                let mut queue = self.ring.submission();
                for (index, sync) in syncs.iter().enumerate() {
                    if sync.done || sync.error.is_some() || queue.len() == queue.capacity() {
                        continue;
                    }
                    let entry = opcode::Fsync::new(types::Fd(sync.fd))
                        .flags(types::FsyncFlags::DATASYNC)
                        .build()
                        .user_data(index as u64);
                    // SAFETY: no buffer; room checked above.
                    if unsafe { queue.push(&entry) }.is_err() {
                        unreachable!("room checked before pushing");
                    }
                    pushed += 1;
                }
            }
            if pushed == 0 {
                return;
            }
            self.submit_and_reap(pushed, |user_data, result| {
                let sync = &mut syncs[user_data as usize];
                sync.elapsed = started.elapsed();
                match result {
                    0 => sync.done = true,
                    code if matches!(-code, libc::EINTR | libc::EAGAIN) => {}
                    code => sync.error = Some(io::Error::from_raw_os_error(-code)),
                }
            });
        }
    }
}

impl Backend for UringBackend {
    fn execute(&mut self, writes: &mut [WriteOp<'_>], syncs: &mut [SyncOp]) {
        self.write_all(writes);
        self.sync_all(syncs);
    }
}
