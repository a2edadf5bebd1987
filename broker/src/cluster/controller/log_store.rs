//! The controller's Raft log, vote and commit point on disk.
//!
//! One file, `raft-log`, holds the entries as records
//! `[u32 length][u32 CRC-32C of the payload][payload: the entry as JSON]`;
//! `raft-vote`, `raft-purged` and `raft-committed` are small checkpoints
//! replaced atomically. An append is written and `fdatasync`ed before
//! openraft is told it is durable, so a vote or an acknowledgement this
//! node gives never rests on bytes still in the page cache.
//!
//! The metadata log is small (it is snapshotted every
//! [`SNAPSHOT_LOGS_SINCE_LAST`](super::SNAPSHOT_LOGS_SINCE_LAST) entries and
//! purged behind the snapshot), so every live entry is also kept in memory;
//! the file exists for restarts. On open, the file is read to its first
//! incomplete or corrupt record and cut there: a torn tail is what a crash
//! during an append leaves, and those entries were never acknowledged.
//! Truncation (a new leader's log overriding this one's tail) cuts the file;
//! a purge records its point first and rewrites the file without the purged
//! entries once they are a large share of it.

// openraft's storage traits return its `StorageError` (over 200 bytes);
// the helpers here return the same.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    AnyError, Entry, LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote,
};

use super::TypeConfig;
use crate::blocking::blocking;

const LOG_FILE: &str = "raft-log";
const VOTE_FILE: &str = "raft-vote";
const PURGED_FILE: &str = "raft-purged";
const COMMITTED_FILE: &str = "raft-committed";
/// Bytes of purged entries at the head of the file that trigger a rewrite.
const REWRITE_PURGED_BYTES_MIN: u64 = 1 << 20;
/// Largest entry this store writes or reads (a metadata command is tiny;
/// a membership change lists the voters).
pub const ENTRY_BYTES_MAX: usize = 16 << 20;
const RECORD_HEADER_BYTES: usize = 8;

type NodeId = u64;
type Result<T> = std::result::Result<T, StorageError<NodeId>>;

/// The controller's durable Raft log. Clones share one store.
#[derive(Debug, Clone)]
pub struct LogStore {
    inner: Arc<Mutex<LogFile>>,
}

#[derive(Debug)]
struct LogFile {
    dir: PathBuf,
    file: File,
    /// Bytes in the file.
    file_len: u64,
    /// Live entries by index, with their record's position in the file.
    /// openraft appends without holes; its storage test suite does not, so
    /// the store keeps whatever it is given.
    entries: BTreeMap<u64, (u64, Entry<TypeConfig>)>,
    /// File position of the first live entry's record (everything before
    /// it is purged).
    live_from: u64,
    last_purged: Option<LogId<NodeId>>,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
}

fn io_error(error: impl Into<AnyError>) -> StorageError<NodeId> {
    StorageIOError::write_logs(error).into()
}

fn read_error(error: impl Into<AnyError>) -> StorageError<NodeId> {
    StorageIOError::read_logs(error).into()
}

fn load_json<T: serde::de::DeserializeOwned>(dir: &Path, name: &str) -> Result<Option<T>> {
    match std::fs::read(dir.join(name)) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|error| read_error(&error)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(read_error(&error)),
    }
}

fn store_json<T: serde::Serialize>(dir: &Path, name: &str, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec(value).map_err(|error| io_error(&error))?;
    weir_storage::checkpoint::write_atomic(dir, name, &bytes).map_err(|error| io_error(&error))
}

/// One record's bytes for `entry`.
fn encode(entry: &Entry<TypeConfig>) -> Result<Vec<u8>> {
    let payload = serde_json::to_vec(entry).map_err(|error| io_error(&error))?;
    if payload.len() > ENTRY_BYTES_MAX {
        return Err(io_error(AnyError::error(format!(
            "raft entry of {} bytes over the {ENTRY_BYTES_MAX}-byte limit",
            payload.len()
        ))));
    }
    let mut record = Vec::with_capacity(RECORD_HEADER_BYTES + payload.len());
    record.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    record.extend_from_slice(&crc32c::crc32c(&payload).to_be_bytes());
    record.extend_from_slice(&payload);
    Ok(record)
}

/// Parses records from `bytes`: the entries with their positions, and the
/// length of the valid prefix.
fn decode_all(bytes: &[u8]) -> (Vec<(u64, Entry<TypeConfig>)>, u64) {
    let mut entries = Vec::new();
    let mut at = 0usize;
    while bytes.len() - at >= RECORD_HEADER_BYTES {
        let length =
            u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize;
        let crc = u32::from_be_bytes([bytes[at + 4], bytes[at + 5], bytes[at + 6], bytes[at + 7]]);
        let start = at + RECORD_HEADER_BYTES;
        if length > ENTRY_BYTES_MAX || bytes.len() - start < length {
            break;
        }
        let payload = &bytes[start..start + length];
        if crc32c::crc32c(payload) != crc {
            break;
        }
        let Ok(entry) = serde_json::from_slice::<Entry<TypeConfig>>(payload) else {
            break;
        };
        entries.push((at as u64, entry));
        at = start + length;
    }
    (entries, at as u64)
}

impl LogStore {
    /// Opens (or creates) the log in `dir`.
    ///
    /// # Errors
    /// I/O errors.
    pub fn open(dir: &Path) -> Result<LogStore> {
        std::fs::create_dir_all(dir).map_err(|error| io_error(&error))?;
        let vote = load_json(dir, VOTE_FILE)?;
        let last_purged: Option<LogId<NodeId>> = load_json(dir, PURGED_FILE)?;
        let committed = load_json(dir, COMMITTED_FILE)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(LOG_FILE))
            .map_err(|error| io_error(&error))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|error| read_error(&error))?;
        let (records, valid_len) = decode_all(&bytes);
        if valid_len < bytes.len() as u64 {
            tracing::warn!(
                dir = %dir.display(),
                kept_bytes = valid_len,
                cut_bytes = bytes.len() as u64 - valid_len,
                "controller log: cutting an incomplete or corrupt tail"
            );
            file.set_len(valid_len).map_err(|error| io_error(&error))?;
            file.sync_data().map_err(|error| io_error(&error))?;
        }
        let purged_index = last_purged.map(|id| id.index);
        let mut entries = BTreeMap::new();
        for (position, entry) in records {
            if purged_index.is_some_and(|purged| entry.log_id.index <= purged) {
                continue;
            }
            entries.insert(entry.log_id.index, (position, entry));
        }
        let live_from = entries
            .values()
            .next()
            .map_or(valid_len, |(position, _)| *position);
        Ok(LogStore {
            inner: Arc::new(Mutex::new(LogFile {
                dir: dir.to_path_buf(),
                file,
                file_len: valid_len,
                entries,
                live_from,
                last_purged,
                vote,
                committed,
            })),
        })
    }

    /// Appends `entries` and returns once they are on disk (what
    /// [`RaftLogStorage::append`] does before it reports them durable).
    ///
    /// # Errors
    /// I/O errors; the file is left as it was before the call.
    pub fn append_durably(
        &mut self,
        entries: impl IntoIterator<Item = Entry<TypeConfig>>,
    ) -> Result<()> {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let mut log = self.lock();
        // An entry at an index the log already holds replaces that entry
        // and everything after it (openraft truncates first; its test
        // suite relies on append replacing).
        if let Some(first) = entries.first()
            && log
                .last_log_id()
                .is_some_and(|last| first.log_id.index <= last.index)
        {
            log.truncate_from(first.log_id.index)?;
        }
        let mut bytes = Vec::new();
        let mut added = Vec::new();
        for entry in entries {
            let position = log.file_len + bytes.len() as u64;
            bytes.extend_from_slice(&encode(&entry)?);
            added.push((position, entry));
        }
        let written = blocking(|| -> std::io::Result<()> {
            let at = log.file_len;
            log.file.seek(SeekFrom::Start(at))?;
            log.file.write_all(&bytes)?;
            log.file.sync_data()
        });
        if let Err(error) = written {
            // Forget the partial write: the next append overwrites it, and
            // a restart cuts it as a torn tail.
            let at = log.file_len;
            let _ = log.file.set_len(at);
            return Err(io_error(&error));
        }
        log.file_len += bytes.len() as u64;
        for (position, entry) in added {
            log.entries.insert(entry.log_id.index, (position, entry));
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, LogFile> {
        // A panic while holding the lock leaves no half-done state that
        // matters: every change is written to disk before memory changes.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl LogFile {
    fn last_log_id(&self) -> Option<LogId<NodeId>> {
        let last = self
            .entries
            .values()
            .next_back()
            .map(|(_, entry)| entry.log_id);
        last.max(self.last_purged)
    }

    /// Drops the entries from `index` on, in the file first.
    fn truncate_from(&mut self, index: u64) -> Result<()> {
        let Some((_, (cut_at, _))) = self.entries.range(index..).next() else {
            return Ok(());
        };
        let cut_at = *cut_at;
        blocking(|| -> std::io::Result<()> {
            self.file.set_len(cut_at)?;
            self.file.sync_data()
        })
        .map_err(|error| io_error(&error))?;
        self.entries.split_off(&index);
        self.file_len = cut_at;
        if self.entries.is_empty() {
            self.live_from = cut_at;
        }
        Ok(())
    }

    /// Rewrites the file with the live entries only.
    fn rewrite(&mut self) -> Result<()> {
        let temp = self.dir.join(format!("{LOG_FILE}.tmp"));
        let mut out = File::create(&temp).map_err(|error| io_error(&error))?;
        let mut position = 0u64;
        let mut positions = Vec::with_capacity(self.entries.len());
        for (_, entry) in self.entries.values() {
            let record = encode(entry)?;
            out.write_all(&record).map_err(|error| io_error(&error))?;
            positions.push(position);
            position += record.len() as u64;
        }
        out.sync_all().map_err(|error| io_error(&error))?;
        drop(out);
        std::fs::rename(&temp, self.dir.join(LOG_FILE)).map_err(|error| io_error(&error))?;
        weir_storage::checkpoint::sync_dir(&self.dir).map_err(|error| io_error(&error))?;
        self.file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.dir.join(LOG_FILE))
            .map_err(|error| io_error(&error))?;
        for ((slot, _), new_position) in self.entries.values_mut().zip(positions) {
            *slot = new_position;
        }
        self.file_len = position;
        self.live_from = 0;
        Ok(())
    }
}

fn range_bounds<RB: RangeBounds<u64>>(range: &RB) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&start) => start,
        Bound::Excluded(&start) => start.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&end) => end.saturating_add(1),
        Bound::Excluded(&end) => end,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>> {
        let (start, end) = range_bounds(&range);
        if start >= end {
            return Ok(Vec::new());
        }
        let log = self.lock();
        Ok(log
            .entries
            .range(start..end)
            .map(|(_, (_, entry))| entry.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>> {
        let log = self.lock();
        Ok(LogState {
            last_purged_log_id: log.last_purged,
            last_log_id: log.last_log_id(),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<()> {
        let mut log = self.lock();
        blocking(|| store_json(&log.dir, VOTE_FILE, vote))?;
        log.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>> {
        Ok(self.lock().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<()> {
        let mut log = self.lock();
        if log.committed == committed {
            return Ok(());
        }
        blocking(|| store_json(&log.dir, COMMITTED_FILE, &committed))?;
        log.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>> {
        Ok(self.lock().committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        match self.append_durably(entries) {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(error) => {
                callback.log_io_completed(Err(std::io::Error::other(error.to_string())));
                Err(error)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        self.lock().truncate_from(log_id.index)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        let mut log = self.lock();
        if log
            .last_purged
            .is_some_and(|purged| purged.index >= log_id.index)
        {
            return Ok(());
        }
        // The purge point first: a crash after it and before the rewrite
        // leaves purged entries in the file, which open skips.
        blocking(|| store_json(&log.dir, PURGED_FILE, &log_id))?;
        log.last_purged = Some(log_id);
        let kept = log.entries.split_off(&(log_id.index + 1));
        log.entries = kept;
        log.live_from = log
            .entries
            .values()
            .next()
            .map_or(log.file_len, |(position, _)| *position);
        if log.live_from >= REWRITE_PURGED_BYTES_MIN || log.entries.is_empty() {
            blocking(|| log.rewrite())?;
        }
        Ok(())
    }
}
