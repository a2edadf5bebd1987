//! Weir's storage engine: one append-only log per partition, made of
//! segments, written through a shared io engine and read through memory maps.
//!
//! Layout:
//! - `log`: [`Log`], the public face: append, read, truncate, retention,
//!   roll, leader epochs, close.
//! - `segment`: one `.log` file, its map and published extent.
//! - `index`: the sparse offset and time indexes (memory-mapped).
//! - `recovery`: what `Log::open` does with what it finds on disk.
//! - `checkpoint`: atomic metadata files and the leader-epoch cache.
//! - `engine`: [`IoEngine`], the per-data-directory writer thread with its
//!   `uring` and `sync` backends and group commit.
//! - `config`, `error`: limits and policies; [`StorageError`].
//!
//! Architecture invariant: this crate knows nothing of the network. It
//! depends on `weir-protocol` for the batch format only.
//!
//! API boundary: the broker drives partitions through [`Log`] and shares one
//! [`IoEngine`] per data directory.

pub mod checkpoint;
pub mod config;
mod engine;
mod error;
mod index;
mod log;
mod recent;
mod recovery;
mod segment;

pub use checkpoint::{EpochCache, EpochEntry};
pub use config::{EngineConfig, EngineKind, FlushPolicy, LogConfig, WriteMode};
pub use engine::{EngineStats, IoEngine, SYNC_LATENCY_BUCKETS};
pub use error::{Result, StorageError};
pub use log::{AppendFuture, AppendInfo, IntoBatchBytes, Log, LogChunk, LogRead, RetentionOutcome};
pub use recovery::RecoveryReport;
