//! Sparse, memory-mapped indexes of one segment.
//!
//! - The offset index (`.index`) maps a relative offset to the byte position
//!   of the batch that starts there: entries of two little-endian `u32`
//!   words (relative offset, position), 8 bytes.
//! - The time index (`.timeindex`) maps a timestamp to the relative offset
//!   from which records reach it: entries of three words (timestamp low,
//!   timestamp high, relative offset), 12 bytes; timestamps never decrease.
//!
//! An entry is added after every `index_interval_bytes` of log. The map is
//! created at full capacity and never moves; the file is cut to its entries
//! when the segment is sealed and grown back if it becomes active again.
//!
//! Concurrency: the appender (holding the log's writer lock) stores an entry
//! word by word and then publishes the count with `Release`; readers load the
//! count with `Acquire` and only look at entries below it. The words are
//! atomics, so a reader racing a truncation sees stale but never torn words,
//! and every position it gets is checked against the log anyway.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use memmap2::MmapMut;

use crate::error::{Result, StorageError};

/// Words per offset-index entry.
pub(crate) const OFFSET_ENTRY_WORDS: usize = 2;
/// Words per time-index entry.
pub(crate) const TIME_ENTRY_WORDS: usize = 3;

/// One memory-mapped index file.
pub(crate) struct Index {
    path: PathBuf,
    file: File,
    map: MmapMut,
    words_per_entry: usize,
    capacity: usize,
    entries: AtomicUsize,
}

impl Index {
    /// Opens (or creates) an index with room for `capacity` entries. Existing
    /// entries are loaded as they are; call `validate` before trusting them.
    pub(crate) fn open(path: &Path, words_per_entry: usize, capacity: usize) -> Result<Index> {
        let io = |error| StorageError::io(path, error);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        let entry_bytes = (words_per_entry * 4) as u64;
        let file_entries = (file.metadata().map_err(io)?.len() / entry_bytes) as usize;
        let capacity = capacity.max(file_entries).max(1);
        let map_bytes = capacity as u64 * entry_bytes;
        file.set_len(map_bytes).map_err(io)?;
        // SAFETY: the file is private to this log directory, and every access
        // to the map goes through atomics (see the module comment).
        let map = unsafe { MmapMut::map_mut(&file) }.map_err(io)?;
        Ok(Index {
            path: path.to_path_buf(),
            file,
            map,
            words_per_entry,
            capacity,
            entries: AtomicUsize::new(file_entries),
        })
    }

    fn words(&self) -> &[AtomicU32] {
        let len = self.capacity * self.words_per_entry;
        assert!(
            self.map.len() >= len * 4,
            "index map shorter than its capacity"
        );
        // SAFETY: the map is page-aligned, at least `len * 4` bytes long and
        // lives as long as `self`; all access is atomic, so shared mutation
        // through `&self` is sound.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().cast::<AtomicU32>(), len) }
    }

    /// Entries currently published.
    pub(crate) fn len(&self) -> usize {
        self.entries.load(Ordering::Acquire)
    }

    /// Reads entry `index` (which must be below `len`).
    pub(crate) fn entry(&self, index: usize) -> [u32; 3] {
        let words = self.words();
        let at = index * self.words_per_entry;
        let mut entry = [0u32; 3];
        for (word, slot) in entry.iter_mut().take(self.words_per_entry).enumerate() {
            *slot = u32::from_le(words[at + word].load(Ordering::Relaxed));
        }
        entry
    }

    /// Appends an entry; does nothing once the index is full (a sparser index
    /// is still correct).
    pub(crate) fn push(&self, entry: [u32; 3]) {
        let count = self.entries.load(Ordering::Relaxed);
        if count >= self.capacity {
            return;
        }
        let words = self.words();
        let at = count * self.words_per_entry;
        for (word, value) in entry.iter().take(self.words_per_entry).enumerate() {
            words[at + word].store(value.to_le(), Ordering::Relaxed);
        }
        self.entries.store(count + 1, Ordering::Release);
    }

    /// Drops every entry from `keep` on.
    pub(crate) fn truncate_entries(&self, keep: usize) {
        let count = self.entries.load(Ordering::Relaxed);
        self.entries.store(keep.min(count), Ordering::Release);
    }

    /// Finds the last entry whose key (computed by `key`) is `<= target`.
    pub(crate) fn floor(&self, target: u64, key: impl Fn([u32; 3]) -> u64) -> Option<[u32; 3]> {
        let count = self.len();
        let (mut low, mut high) = (0usize, count);
        // Invariant: entries below `low` have key <= target, from `high` on > target.
        while low < high {
            let middle = low + (high - low) / 2;
            if key(self.entry(middle)) <= target {
                low = middle + 1;
            } else {
                high = middle;
            }
        }
        low.checked_sub(1).map(|index| self.entry(index))
    }

    /// Writes the entries to disk and cuts the file to them (on seal and close).
    pub(crate) fn seal(&self) -> Result<()> {
        let io = |error| StorageError::io(&self.path, error);
        self.map.flush().map_err(io)?;
        let bytes = (self.len() * self.words_per_entry * 4) as u64;
        self.file.set_len(bytes).map_err(io)?;
        self.file.sync_all().map_err(io)
    }

    /// Grows the file back to full capacity so entries can be added again.
    pub(crate) fn unseal(&self) -> Result<()> {
        let bytes = (self.capacity * self.words_per_entry * 4) as u64;
        self.file
            .set_len(bytes)
            .map_err(|error| StorageError::io(&self.path, error))
    }

    /// The index file's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

/// Entry capacity for a segment of `segment_bytes_max` indexed every
/// `index_interval_bytes`.
pub(crate) fn capacity_for(segment_bytes_max: u64, index_interval_bytes: u64) -> usize {
    (segment_bytes_max / index_interval_bytes.max(1) + 2) as usize
}

/// Relative offset of an offset-index entry.
pub(crate) fn offset_key(entry: [u32; 3]) -> u64 {
    u64::from(entry[0])
}

/// Timestamp of a time-index entry.
pub(crate) fn time_key(entry: [u32; 3]) -> u64 {
    // Order-preserving map of i64 onto u64 for the binary search.
    (time_of(entry) as u64) ^ (1 << 63)
}

/// Timestamp of a time-index entry, as stored.
pub(crate) fn time_of(entry: [u32; 3]) -> i64 {
    (u64::from(entry[0]) | (u64::from(entry[1]) << 32)) as i64
}

/// Builds a time-index entry.
pub(crate) fn time_entry(timestamp_ms: i64, relative_offset: u32) -> [u32; 3] {
    let raw = timestamp_ms as u64;
    [raw as u32, (raw >> 32) as u32, relative_offset]
}

/// Maps a timestamp onto the same order-preserving key as `time_key`.
pub(crate) fn time_target(timestamp_ms: i64) -> u64 {
    (timestamp_ms as u64) ^ (1 << 63)
}
