//! The bounded cache of a log's newest batches, used in direct-I/O mode.
//!
//! Direct writes bypass the page cache, so without it a tailing reader would
//! fault every new page in from the device. More importantly, the partial
//! block at the write position is rewritten by the next direct write; a
//! reader must never map that page while it can change under it. The cache
//! therefore always holds every batch from at least `budget` bytes behind
//! the end, which covers that block, and readers of those offsets are served
//! from here instead of the map.
//!
//! Lifecycle: completions push (engine thread, in offset order); readers
//! clone `Bytes` handles out under the lock; truncation and open refill it from the
//! active segment (`Log::warm_recent`).

use std::collections::VecDeque;

/// One cached batch.
#[derive(Debug, Clone)]
pub(crate) struct CachedBatch {
    pub base_offset: u64,
    pub next_offset: u64,
    pub bytes: bytes::Bytes,
}

/// The newest batches of one log, contiguous in offsets.
#[derive(Debug, Default)]
pub(crate) struct RecentBatches {
    batches: VecDeque<CachedBatch>,
    bytes: usize,
    /// Bytes kept; 0 disables the cache.
    budget: usize,
}

impl RecentBatches {
    pub(crate) fn new(budget: usize) -> Self {
        RecentBatches {
            budget,
            ..RecentBatches::default()
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.budget > 0
    }

    /// Adds the batch that was just published; evicts the oldest while the
    /// rest still spans the budget.
    pub(crate) fn push(&mut self, batch: CachedBatch) {
        if !self.enabled() {
            return;
        }
        if let Some(last) = self.batches.back() {
            assert_eq!(
                last.next_offset, batch.base_offset,
                "recent batches must be contiguous"
            );
        }
        self.bytes += batch.bytes.len();
        self.batches.push_back(batch);
        while let Some(front) = self.batches.front() {
            if self.bytes - front.bytes.len() < self.budget {
                break;
            }
            self.bytes -= front.bytes.len();
            self.batches.pop_front();
        }
    }

    /// Empties the cache (before warming it again).
    pub(crate) fn clear(&mut self) {
        self.batches.clear();
        self.bytes = 0;
    }

    /// First offset the cache can serve.
    pub(crate) fn start_offset(&self) -> Option<u64> {
        self.batches.front().map(|batch| batch.base_offset)
    }

    /// Batches from the one containing `offset`, up to about `max_bytes`
    /// (at least one), or `None` if the cache does not reach back that far.
    pub(crate) fn read(&self, offset: u64, max_bytes: usize) -> Option<Vec<CachedBatch>> {
        let first = self.batches.front()?;
        if offset < first.base_offset || self.batches.back()?.next_offset <= offset {
            return None;
        }
        let start = self
            .batches
            .partition_point(|batch| batch.next_offset <= offset);
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for batch in self.batches.range(start..) {
            if !out.is_empty() && bytes + batch.bytes.len() > max_bytes {
                break;
            }
            bytes += batch.bytes.len();
            out.push(batch.clone());
        }
        Some(out)
    }
}
