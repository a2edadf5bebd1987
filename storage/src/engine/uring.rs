//! The io_uring backend. Per round and per file, the file's writes are
//! pushed as one linked chain ending in a linked `fdatasync` (when the file
//! needs one), and all chains are submitted with a single syscall.
//!
//! A short write breaks a link: the kernel completes the rest of the chain
//! with `-ECANCELED`. Such writes (and the cancelled sync) are not errors;
//! the backend resubmits what is left in another phase, so a sync is only
//! counted as done if it ran after every write of its file had finished.

use std::io;
use std::time::Instant;

use io_uring::{IoUring, opcode, squeue, types};

use super::{Backend, SyncOp, WriteOp};

/// Tag bit marking a sync's user data (writes use the plain index).
const SYNC_TAG: u64 = 1 << 63;

/// Submission queue size for a round of `round_requests_max` writes: every
/// write plus one sync per file fits in one phase (files ≤ writes, plus
/// room for files only due an interval sync, which then go in later phases).
pub(crate) fn ring_entries(round_requests_max: usize) -> u32 {
    let wanted = (round_requests_max.max(1) * 2 + 16).next_power_of_two();
    u32::try_from(wanted).unwrap_or(4096).min(4096)
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

    /// Pushes the outstanding part of one file's chain. Returns how many
    /// entries were pushed, or `None` if the queue lacks room for the chain.
    fn push_chain(
        &mut self,
        writes: &[WriteOp<'_>],
        indices: &[usize],
        sync: Option<(usize, &SyncOp)>,
    ) -> Option<usize> {
        let pending: Vec<usize> = indices
            .iter()
            .copied()
            .filter(|index| !writes[*index].finished())
            .collect();
        let needs_sync = sync.is_some_and(|(_, op)| !op.done && op.error.is_none());
        let entries = pending.len() + usize::from(needs_sync);
        let mut queue = self.ring.submission();
        if queue.capacity() - queue.len() < entries {
            return None;
        }
        for (position, index) in pending.iter().enumerate() {
            let op = &writes[*index];
            let from = op.resume_at();
            let rest = &op.data[from..];
            let last = position + 1 == pending.len() && !needs_sync;
            let flags = if last {
                squeue::Flags::empty()
            } else {
                squeue::Flags::IO_LINK
            };
            let len = u32::try_from(rest.len()).unwrap_or(u32::MAX);
            let entry = opcode::Write::new(types::Fd(op.fd), rest.as_ptr(), len)
                .offset(op.position + from as u64)
                .build()
                .flags(flags)
                .user_data(*index as u64 | (from as u64) << 32);
            // SAFETY: the buffer is owned by the round's request and outlives
            // the submission (execute waits for every completion), and the
            // capacity check above guarantees room.
            unsafe {
                if queue.push(&entry).is_err() {
                    unreachable!("capacity checked before pushing");
                }
            }
        }
        if let Some((sync_index, op)) = sync.filter(|_| needs_sync) {
            let entry = opcode::Fsync::new(types::Fd(op.fd))
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .user_data(SYNC_TAG | sync_index as u64);
            // SAFETY: no buffer; room checked above.
            unsafe {
                if queue.push(&entry).is_err() {
                    unreachable!("capacity checked before pushing");
                }
            }
        }
        Some(entries)
    }
}

impl Backend for UringBackend {
    fn execute(&mut self, writes: &mut [WriteOp<'_>], syncs: &mut [SyncOp]) {
        // Writes of files without a sync in this round form chains of their own.
        let mut unsynced: Vec<usize> = (0..writes.len())
            .filter(|index| !syncs.iter().any(|sync| sync.writes.contains(index)))
            .collect();
        unsynced.sort_by_key(|index| writes[*index].fd);
        let mut bare_chains: Vec<Vec<usize>> = Vec::new();
        for index in unsynced {
            match bare_chains.last_mut() {
                Some(chain) if writes[chain[0]].fd == writes[index].fd => chain.push(index),
                _ => bare_chains.push(vec![index]),
            }
        }

        loop {
            let mut pushed = 0usize;
            for chain in &bare_chains {
                match self.push_chain(writes, chain, None) {
                    Some(entries) => pushed += entries,
                    None => break,
                }
            }
            let phase_started = Instant::now();
            for (sync_index, sync) in syncs.iter().enumerate() {
                let chain = sync.writes.clone();
                match self.push_chain(writes, &chain, Some((sync_index, sync))) {
                    Some(entries) => pushed += entries,
                    None => break,
                }
            }
            if pushed == 0 {
                break;
            }
            if let Err(error) = self.submit_and_reap(pushed, writes, syncs, phase_started) {
                // The ring itself failed: fail everything still open.
                for op in writes.iter_mut().filter(|op| !op.finished()) {
                    op.error = Some(io::Error::new(error.kind(), error.to_string()));
                }
                for sync in syncs
                    .iter_mut()
                    .filter(|sync| !sync.done && sync.error.is_none())
                {
                    sync.error = Some(io::Error::new(error.kind(), error.to_string()));
                }
                break;
            }
        }
    }
}

impl UringBackend {
    fn submit_and_reap(
        &mut self,
        pushed: usize,
        writes: &mut [WriteOp<'_>],
        syncs: &mut [SyncOp],
        phase_started: Instant,
    ) -> io::Result<()> {
        let mut reaped = 0usize;
        while reaped < pushed {
            match self.ring.submit_and_wait(pushed - reaped) {
                Ok(_) => {}
                Err(error) if error.raw_os_error() == Some(libc::EINTR) => continue,
                Err(error) if error.raw_os_error() == Some(libc::EBUSY) => {}
                Err(error) => return Err(error),
            }
            for cqe in self.ring.completion() {
                reaped += 1;
                let user_data = cqe.user_data();
                let result = cqe.result();
                if user_data & SYNC_TAG != 0 {
                    let sync = &mut syncs[(user_data & !SYNC_TAG) as usize];
                    sync.elapsed = phase_started.elapsed();
                    let covers_all = sync.writes.iter().all(|index| writes[*index].finished());
                    match result {
                        0 if covers_all => sync.done = true,
                        // Ran before a retried remainder: sync again next phase.
                        0 => {}
                        code if -code == libc::ECANCELED => {}
                        code => sync.error = Some(io::Error::from_raw_os_error(-code)),
                    }
                } else {
                    // Writes carry their index in the low 32 bits and the
                    // byte they started at in the high bits (below SYNC_TAG).
                    let op = &mut writes[(user_data & 0xffff_ffff) as usize];
                    let from = ((user_data & !SYNC_TAG) >> 32) as usize;
                    match result {
                        n if n > 0 => op.written = from + n as usize,
                        0 => op.error = Some(io::Error::from(io::ErrorKind::WriteZero)),
                        code if -code == libc::ECANCELED
                            || -code == libc::EINTR
                            || -code == libc::EAGAIN => {}
                        code => op.error = Some(io::Error::from_raw_os_error(-code)),
                    }
                }
            }
        }
        Ok(())
    }
}
