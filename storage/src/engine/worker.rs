//! The engine's threads and the slot between them.
//!
//! The planner takes requests from the bounded channel and adds them to the
//! *next* round in the slot (copying direct writes into aligned buffers)
//! while the executors perform earlier rounds. An idle executor takes
//! everything the planner has gathered: that round is the group commit.
//! `EXECUTORS` executors let one round's writes overlap the previous round's
//! syncs and completions; `round::Sequencer` keeps shared blocks and
//! completions in order. The slot holds at most `round_requests_max`
//! requests or `round_bytes_max` bytes; beyond that the planner waits, the
//! channel fills, and appenders block: backpressure all the way back.
//!
//! Lifecycle: when every sender is gone the planner marks the slot closed
//! and wakes both executors; each performs what is left, syncs every file
//! owed an interval sync, and exits.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use super::direct::BufferPool;
use super::round::{ExecuteContext, OwedSync, Round, Sequencer};
use super::{Backend, EngineStats, Request};

/// Executor threads per engine: two, so that one round can be on the device
/// while the other finishes; more would only shrink rounds.
pub(crate) const EXECUTORS: usize = 2;

/// The round being gathered, handed from planner to executor.
#[derive(Default)]
struct Slot {
    next: Round,
    /// Sequence number the next round taken will get.
    sequence: u64,
    /// Set by the planner once the channel is closed and drained.
    closed: bool,
}

/// State shared by the two threads.
pub(crate) struct Handoff {
    slot: Mutex<Slot>,
    /// Signalled by the planner when the slot gains a request or closes.
    filled: Condvar,
    /// Signalled by the executor when it empties the slot.
    emptied: Condvar,
    pool: Mutex<BufferPool>,
    /// Files owed an interval sync (see `round::OwedSync`).
    dirty: Mutex<HashMap<RawFd, OwedSync>>,
    sequencer: Sequencer,
}

impl Handoff {
    pub(crate) fn new() -> Arc<Handoff> {
        Arc::new(Handoff {
            slot: Mutex::new(Slot::default()),
            filled: Condvar::new(),
            emptied: Condvar::new(),
            pool: Mutex::new(BufferPool::default()),
            dirty: Mutex::new(HashMap::new()),
            sequencer: Sequencer::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

/// Limits of one round.
#[derive(Clone, Copy)]
pub(crate) struct RoundLimits {
    pub requests_max: usize,
    pub bytes_max: usize,
}

/// Planner thread body.
pub(crate) fn plan(receiver: Receiver<Request>, handoff: Arc<Handoff>, limits: RoundLimits) {
    while let Ok(request) = receiver.recv() {
        let mut slot = handoff.lock();
        while slot.next.is_full(limits.requests_max, limits.bytes_max) {
            slot = handoff
                .emptied
                .wait(slot)
                .unwrap_or_else(|poison| poison.into_inner());
        }
        // One request per lock hold: an idle executor waits for at most one
        // request's copy before it can take the round.
        slot.next.push(request, &handoff.pool);
        drop(slot);
        handoff.filled.notify_one();
    }
    handoff.lock().closed = true;
    handoff.filled.notify_all();
}

/// Executor thread body.
pub(crate) fn execute(
    mut backend: Box<dyn Backend>,
    handoff: Arc<Handoff>,
    stats: Arc<EngineStats>,
) {
    let context = ExecuteContext {
        stats: &stats,
        dirty: &handoff.dirty,
        pool: &handoff.pool,
        sequencer: &handoff.sequencer,
    };
    loop {
        let (round, sequence, closed) = {
            let mut slot = handoff.lock();
            loop {
                if !slot.next.is_empty() || slot.closed {
                    break;
                }
                let deadline = handoff
                    .dirty
                    .lock()
                    .unwrap_or_else(|poison| poison.into_inner())
                    .values()
                    .map(|owed| owed.deadline)
                    .min();
                match deadline {
                    None => {
                        slot = handoff
                            .filled
                            .wait(slot)
                            .unwrap_or_else(|poison| poison.into_inner())
                    }
                    Some(deadline) => {
                        let timeout = deadline.saturating_duration_since(Instant::now());
                        if timeout.is_zero() {
                            break;
                        }
                        slot = handoff
                            .filled
                            .wait_timeout(slot, timeout)
                            .unwrap_or_else(|poison| poison.into_inner())
                            .0;
                    }
                }
            }
            let sequence = slot.sequence;
            slot.sequence += 1;
            (std::mem::take(&mut slot.next), sequence, slot.closed)
        };
        handoff.emptied.notify_one();
        // On shutdown every pending interval sync is due now.
        let now = if closed {
            Instant::now() + Duration::from_secs(3600 * 24 * 365)
        } else {
            Instant::now()
        };
        round.execute(&context, backend.as_mut(), sequence, now);
        if closed && handoff.lock().next.is_empty() {
            return;
        }
    }
}
