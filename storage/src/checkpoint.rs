//! Small metadata files written atomically, and the leader-epoch cache.
//!
//! Every metadata file is replaced as a whole: write `name.tmp`, fsync it,
//! rename it over `name`, fsync the directory. A crash leaves either the old
//! or the new file, never a mix.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;

use crate::error::{Result, StorageError};

/// Name of the clean-shutdown marker inside a log directory.
pub const CLEAN_SHUTDOWN_FILE: &str = "clean-shutdown";
/// Name of the recovery-point checkpoint: segments below it were synced.
pub const RECOVERY_POINT_FILE: &str = "recovery-point";
/// Name of the file whose advisory lock marks the directory as open.
pub const LOCK_FILE: &str = "lock";
/// Name of the leader-epoch checkpoint.
pub const LEADER_EPOCH_FILE: &str = "leader-epoch-checkpoint";

/// Replaces `dir/name` with `contents` atomically and durably.
///
/// # Errors
/// Any I/O error, with the path.
pub fn write_atomic(dir: &Path, name: &str, contents: &[u8]) -> Result<()> {
    let target = dir.join(name);
    let temp = dir.join(format!("{name}.tmp"));
    let io = |error| StorageError::io(&temp, error);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&temp)
        .map_err(io)?;
    file.write_all(contents).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    fs::rename(&temp, &target).map_err(|error| StorageError::io(&target, error))?;
    sync_dir(dir)
}

/// Makes a directory's entries (creations, renames, removals) durable.
///
/// # Errors
/// Any I/O error, with the path.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(|error| StorageError::io(dir, error))
}

/// Removes `dir/name` durably if it exists.
pub(crate) fn remove_durably(dir: &Path, name: &str) -> Result<()> {
    match fs::remove_file(dir.join(name)) {
        Ok(()) => sync_dir(dir),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(StorageError::io(dir.join(name), error)),
    }
}

/// Reads the recovery point, or 0 if absent or unreadable (0 means "scan
/// everything", the safe answer).
pub(crate) fn read_recovery_point(dir: &Path) -> u64 {
    fs::read_to_string(dir.join(RECOVERY_POINT_FILE))
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

/// One leader epoch and the first offset written under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochEntry {
    /// The leader epoch.
    pub epoch: i32,
    /// First offset appended under it.
    pub start_offset: u64,
}

/// Leader epochs in increasing order, as replication's truncation protocol
/// needs them: "where did epoch E end?" is the start of the next epoch.
///
/// Stored in Kafka's text layout: a version line (0), a count line, then
/// `epoch start_offset` per line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EpochCache {
    entries: Vec<EpochEntry>,
}

impl EpochCache {
    /// Loads the checkpoint from `dir`; a missing file is an empty cache.
    ///
    /// # Errors
    /// [`StorageError::Io`] if the file exists but is malformed.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(LEADER_EPOCH_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self::default());
            }
            Err(error) => return Err(StorageError::io(&path, error)),
        };
        let malformed = || {
            StorageError::io(
                &path,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "malformed leader-epoch checkpoint",
                ),
            )
        };
        let mut lines = text.lines();
        if lines.next().map(str::trim) != Some("0") {
            return Err(malformed());
        }
        let count: usize = lines
            .next()
            .and_then(|line| line.trim().parse().ok())
            .ok_or_else(malformed)?;
        let mut entries = Vec::with_capacity(count);
        for line in lines.take(count) {
            let mut fields = line.split_whitespace();
            let epoch = fields
                .next()
                .and_then(|field| field.parse().ok())
                .ok_or_else(malformed)?;
            let start_offset = fields
                .next()
                .and_then(|field| field.parse().ok())
                .ok_or_else(malformed)?;
            entries.push(EpochEntry {
                epoch,
                start_offset,
            });
        }
        if entries.len() != count {
            return Err(malformed());
        }
        Ok(EpochCache { entries })
    }

    /// Writes the checkpoint atomically.
    ///
    /// # Errors
    /// Any I/O error.
    pub fn store(&self, dir: &Path) -> Result<()> {
        let mut text = format!("0\n{}\n", self.entries.len());
        for entry in &self.entries {
            text.push_str(&format!("{} {}\n", entry.epoch, entry.start_offset));
        }
        write_atomic(dir, LEADER_EPOCH_FILE, text.as_bytes())
    }

    /// All entries, oldest first.
    pub fn entries(&self) -> &[EpochEntry] {
        &self.entries
    }

    /// The newest epoch, if any.
    pub fn latest(&self) -> Option<EpochEntry> {
        self.entries.last().copied()
    }

    /// Records that `epoch` starts at `start_offset`. Returns whether the cache
    /// changed. Epochs only grow: an older or equal epoch is ignored.
    pub fn assign(&mut self, epoch: i32, start_offset: u64) -> bool {
        if self.latest().is_some_and(|latest| latest.epoch >= epoch) {
            return false;
        }
        // An epoch that starts where the previous one started replaces it: no
        // record was written under the previous one.
        while self
            .latest()
            .is_some_and(|latest| latest.start_offset >= start_offset)
        {
            self.entries.pop();
        }
        self.entries.push(EpochEntry {
            epoch,
            start_offset,
        });
        true
    }

    /// The end offset of `epoch` (exclusive) and the largest epoch `<=` it
    /// that the log knows, as a leader answers a follower's
    /// OffsetForLeaderEpoch; `None` if the log knows no such epoch.
    pub fn end_offset_for(&self, epoch: i32, log_end_offset: u64) -> Option<(i32, u64)> {
        let position = self
            .entries
            .iter()
            .rposition(|entry| entry.epoch <= epoch)?;
        let found = self.entries[position];
        let end = self
            .entries
            .get(position + 1)
            .map_or(log_end_offset, |next| next.start_offset);
        Some((found.epoch, end))
    }

    /// Drops epochs that start at or after `end_offset` (log truncation).
    pub fn truncate_from_end(&mut self, end_offset: u64) -> bool {
        let before = self.entries.len();
        self.entries.retain(|entry| entry.start_offset < end_offset);
        before != self.entries.len()
    }

    /// Drops epochs wholly below `start_offset`, keeping the one in force at
    /// it (retention).
    pub fn truncate_from_start(&mut self, start_offset: u64) -> bool {
        let in_force = self
            .entries
            .iter()
            .rposition(|entry| entry.start_offset <= start_offset);
        match in_force {
            Some(position) if position > 0 => {
                self.entries.drain(..position);
                true
            }
            _ => false,
        }
    }
}
