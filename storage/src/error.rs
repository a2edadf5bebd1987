//! The storage crate's error type.

use std::io;
use std::path::PathBuf;

use weir_protocol::BatchError;

/// Everything a log operation can report.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The batch handed to `append` is malformed; nothing was written.
    #[error("invalid batch: {0}")]
    InvalidBatch(#[from] BatchError),
    /// The batch is larger than `batch_bytes_max`; nothing was written.
    #[error("batch of {bytes} bytes exceeds the limit of {limit} bytes")]
    BatchTooLarge {
        /// Size of the batch.
        bytes: usize,
        /// `batch_bytes_max`.
        limit: usize,
    },
    /// An append made in a leader epoch the log has moved past (or lost:
    /// a repair truncated it away before any record was written in it).
    #[error("append in leader epoch {expected}, but the log's newest is {latest:?}")]
    StaleEpoch {
        /// The epoch the caller appends in.
        expected: i32,
        /// The log's newest epoch.
        latest: Option<i32>,
    },
    /// A replica append's base offset is not the log's next offset.
    #[error("batch base offset {got} does not continue the log at {expected}")]
    UnexpectedOffset {
        /// The log's next offset.
        expected: u64,
        /// The batch's base offset.
        got: u64,
    },
    /// A read asked for an offset outside `[start_offset, end_offset]`.
    #[error("offset {offset} is out of range [{start}, {end}]")]
    OffsetOutOfRange {
        /// The requested offset.
        offset: u64,
        /// First offset still stored.
        start: u64,
        /// Next offset to be written.
        end: u64,
    },
    /// Stored bytes failed their checks on read: they are never served.
    #[error("corrupt batch in {path} at position {position}: {reason}")]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// Byte position of the bad batch.
        position: u64,
        /// What failed.
        reason: BatchError,
    },
    /// An I/O error (a full disk arrives here as `StorageFull`).
    #[error("i/o error on {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The device is full (ENOSPC or EDQUOT). Nothing was acknowledged;
    /// appends work again once space is freed.
    #[error("no space left on device for {path}")]
    StorageFull {
        /// The file that could not grow.
        path: PathBuf,
    },
    /// An earlier write failed and the log is still rolling back the writes
    /// that followed it; retry shortly.
    #[error("log is recovering from a failed write; retry")]
    WriteFailed,
    /// A background (interval) `fdatasync` failed: acknowledged appends may
    /// not be on disk. The log refuses further work; reopen it to recover.
    #[error("a background fdatasync of {path} failed; reopen the log")]
    SyncFailed {
        /// The log directory.
        path: PathBuf,
    },
    /// Another `Log` in this or another process has the directory open.
    #[error("log directory {path} is locked by another open log")]
    Locked {
        /// The log directory.
        path: PathBuf,
    },
    /// The log or its io engine has been closed.
    #[error("log is closed")]
    Closed,
    /// The io engine could not be started.
    #[error("io engine could not start: {0}")]
    EngineStart(io::Error),
}

impl StorageError {
    /// Wraps an I/O error with the path it concerns, recognising a full disk.
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => StorageError::StorageFull { path },
            _ => StorageError::Io { path, source },
        }
    }
}

/// Result alias for the storage crate.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;
