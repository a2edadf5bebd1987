//! Every limit and policy of a log, with the reason for its default.

use std::time::Duration;

/// When an append's bytes must be on stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushPolicy {
    /// An append completes only after its bytes are durable (`fdatasync`).
    /// Concurrent appenders share one sync per io-engine round (group commit).
    Always,
    /// Appends complete once written; the engine syncs each file at most
    /// this long after its first unsynced write.
    IntervalMs(u64),
    /// Appends complete once written; syncing is left to the OS and to
    /// segment roll and clean close.
    Never,
}

impl FlushPolicy {
    /// Parses `always`, `never`, `interval` (1000 ms) or `interval:<ms>`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "always" => Some(FlushPolicy::Always),
            "never" => Some(FlushPolicy::Never),
            "interval" => Some(FlushPolicy::IntervalMs(FLUSH_INTERVAL_MS_DEFAULT)),
            other => other
                .strip_prefix("interval:")
                .and_then(|ms| ms.parse().ok())
                .map(FlushPolicy::IntervalMs),
        }
    }
}

impl std::fmt::Display for FlushPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FlushPolicy::Always => write!(f, "always"),
            FlushPolicy::IntervalMs(ms) => write!(f, "interval:{ms}"),
            FlushPolicy::Never => write!(f, "never"),
        }
    }
}

/// Default for [`FlushPolicy::IntervalMs`]: one second bounds what a power
/// loss can take while keeping syncs rare.
pub const FLUSH_INTERVAL_MS_DEFAULT: u64 = 1_000;

/// Configuration of one partition log.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// A segment rolls before an append would take it past this size. The
    /// active segment is preallocated to it so its memory map never moves.
    /// Default 1 GiB, Kafka's default; at most 4 GiB (index positions are u32).
    pub segment_bytes_max: u64,
    /// A non-empty segment older than this rolls on the next append.
    /// Default 7 days, Kafka's default.
    pub segment_age_ms_max: u64,
    /// Largest batch accepted by `append`. Default 16 MiB: room for a
    /// producer's largest batch while bounding one request's memory.
    pub batch_bytes_max: usize,
    /// Most records one batch may claim. Default 1,000,000: a compressed
    /// batch's count cannot be checked against its bytes, and every record
    /// consumes an offset.
    pub batch_records_max: u32,
    /// Bytes of log between two sparse index entries. Default 4 KiB, Kafka's
    /// default, so a lookup scans at most a few batches.
    pub index_interval_bytes: u64,
    /// Retention by size: sealed segments are removed, oldest first, while
    /// the log would stay above this total. `None` keeps everything.
    pub retention_bytes: Option<u64>,
    /// Retention by age: a sealed segment whose newest record is older than
    /// this is removed. `None` keeps everything.
    pub retention_ms: Option<u64>,
    /// When appends must be durable.
    pub flush: FlushPolicy,
    /// Check each batch's CRC-32C when it is read, so that a corrupted sealed
    /// segment is reported rather than served.
    pub verify_crc_on_read: bool,
    /// How appends reach the device.
    pub write_mode: WriteMode,
    /// With [`WriteMode::Direct`]: bytes of the newest batches kept in memory
    /// for tailing readers (at least 1 MiB is kept). Default 4 MiB per log.
    pub recent_cache_bytes: usize,
}

/// How appends reach the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Through the page cache; readers are served from the memory maps.
    Buffered,
    /// O_DIRECT with aligned, coalesced writes (see `engine::direct`);
    /// tailing readers are served from a bounded cache of recent batches.
    /// Falls back to `Buffered` (logged) where the filesystem refuses O_DIRECT.
    Direct,
}

impl WriteMode {
    /// Parses `buffered` or `direct`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "buffered" => Some(WriteMode::Buffered),
            "direct" => Some(WriteMode::Direct),
            _ => None,
        }
    }
}

/// Smallest recent-batch cache in direct mode: it must always cover the
/// partial block being rewritten (see `Log` on reader coherence).
pub const RECENT_CACHE_BYTES_MIN: usize = 1 << 20;

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes_max: 1 << 30,
            segment_age_ms_max: 7 * 24 * 3600 * 1000,
            batch_bytes_max: 16 << 20,
            batch_records_max: 1_000_000,
            index_interval_bytes: 4096,
            retention_bytes: None,
            retention_ms: None,
            flush: FlushPolicy::Always,
            verify_crc_on_read: true,
            write_mode: WriteMode::Direct,
            recent_cache_bytes: 4 << 20,
        }
    }
}

impl LogConfig {
    /// The interval the io engine must honour for this log's writes.
    pub(crate) fn sync_deadline(&self) -> SyncMode {
        match self.flush {
            FlushPolicy::Always => SyncMode::Now,
            FlushPolicy::IntervalMs(ms) => SyncMode::Within(Duration::from_millis(ms)),
            FlushPolicy::Never => SyncMode::Never,
        }
    }
}

/// What the io engine does after a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// `fdatasync` before completing the write.
    Now,
    /// Complete at once; `fdatasync` the file within this delay.
    Within(Duration),
    /// Complete at once; never sync on the write's account.
    Never,
}

/// Which io engine to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// `io_uring` if the kernel and seccomp allow it, otherwise `sync`
    /// (logged once).
    Auto,
    /// Force `io_uring`; starting fails if it cannot be set up.
    Uring,
    /// Force pwrite + fdatasync on a thread.
    Sync,
}

impl EngineKind {
    /// Parses `auto`, `uring` or `sync`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "auto" => Some(EngineKind::Auto),
            "uring" | "io_uring" => Some(EngineKind::Uring),
            "sync" => Some(EngineKind::Sync),
            _ => None,
        }
    }
}

/// Configuration of one io engine (one per data directory).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Which implementation.
    pub kind: EngineKind,
    /// Capacity of the request channel. A full channel blocks appenders:
    /// that is the engine's backpressure. Default 1024 requests.
    pub queue_depth: usize,
    /// Requests taken into one round (one group commit). Default 128: with
    /// 64 KiB–1 MiB batches a round is already several MiB.
    pub round_requests_max: usize,
    /// Bytes taken into one round, so one round's latency stays bounded.
    /// Default 8 MiB: with 8 writers of 1 MiB batches, one round each.
    pub round_bytes_max: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            kind: EngineKind::Auto,
            queue_depth: 1024,
            round_requests_max: 128,
            round_bytes_max: 8 << 20,
        }
    }
}
