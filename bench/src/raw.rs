//! Raw-hardware baselines: what the disk does for a program that writes or
//! reads sequentially with no engine in between.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Size of each raw write: 1 MiB, the chunk the baselines name.
pub const RAW_WRITE_BYTES: usize = 1 << 20;
/// Alignment O_DIRECT needs for buffers, offsets and lengths.
pub const DIRECT_ALIGN_BYTES: usize = 4096;

/// One raw measurement.
#[derive(Debug, Clone, Copy)]
pub struct RawResult {
    /// Bytes written.
    pub bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// fdatasync latencies, microseconds (p50, p99), when the mode syncs.
    pub sync_p50_us: u64,
    /// See `sync_p50_us`.
    pub sync_p99_us: u64,
}

impl RawResult {
    /// Throughput in MB/s (10^6 bytes per second).
    pub fn mb_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// An aligned, zero-filled buffer for O_DIRECT.
struct AlignedBuffer {
    pointer: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuffer {
    fn new(bytes: usize) -> anyhow::Result<Self> {
        let layout = std::alloc::Layout::from_size_align(bytes, DIRECT_ALIGN_BYTES)?;
        // SAFETY: non-zero size, valid layout; freed in Drop with the same layout.
        let pointer = unsafe { std::alloc::alloc_zeroed(layout) };
        if pointer.is_null() {
            bail!("allocation of {bytes} aligned bytes failed");
        }
        Ok(AlignedBuffer { pointer, layout })
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: allocated with this size and alive until Drop.
        unsafe { std::slice::from_raw_parts(self.pointer, self.layout.size()) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` is unique.
        unsafe { std::slice::from_raw_parts_mut(self.pointer, self.layout.size()) }
    }
}

impl Drop for AlignedBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.pointer, self.layout) }
    }
}

fn fill_pattern(bytes: &mut [u8]) {
    // Incompressible-looking bytes, so no layer can cheat on zeros.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for chunk in bytes.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let word = state.to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
}

fn percentile(sorted: &[u64], quantile: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((sorted.len() as f64 - 1.0) * quantile).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Sequential buffered `pwrite` of 1 MiB chunks, `fdatasync` after each,
/// for `duration` or until `bytes_max`.
///
/// # Errors
/// I/O errors, with the path.
pub fn buffered_sync(path: &Path, duration: Duration, bytes_max: u64) -> anyhow::Result<RawResult> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    let mut chunk = vec![0u8; RAW_WRITE_BYTES];
    fill_pattern(&mut chunk);
    let mut sync_us = Vec::new();
    let started = Instant::now();
    let mut position = 0u64;
    while started.elapsed() < duration && position < bytes_max {
        file.write_all_at(&chunk, position).context("raw pwrite")?;
        let sync_started = Instant::now();
        file.sync_data().context("raw fdatasync")?;
        sync_us.push(sync_started.elapsed().as_micros() as u64);
        position += chunk.len() as u64;
    }
    let elapsed = started.elapsed();
    drop(file);
    std::fs::remove_file(path).ok();
    sync_us.sort_unstable();
    Ok(RawResult {
        bytes: position,
        elapsed,
        sync_p50_us: percentile(&sync_us, 0.50),
        sync_p99_us: percentile(&sync_us, 0.99),
    })
}

/// Creates `path` for O_DIRECT writes, preallocated (unwritten) to
/// `bytes_max`, as the storage engine's segments are.
fn open_direct_preallocated(path: &Path, bytes_max: u64) -> anyhow::Result<File> {
    let file: File = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .with_context(|| format!("create {} with O_DIRECT", path.display()))?;
    // SAFETY: plain syscall on an open descriptor.
    let allocated = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, bytes_max as libc::off_t) };
    if allocated != 0 {
        bail!(
            "fallocate {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(file)
}

/// Sequential O_DIRECT writes of 1 MiB into a file preallocated to
/// `bytes_max`, for `duration`: the device's own sequential write limit.
/// With `sync_each`, an `fdatasync` follows every write: the best a
/// single writer can do when each MiB must be durable before the next.
///
/// # Errors
/// I/O errors (O_DIRECT is refused by some filesystems, e.g. tmpfs).
pub fn direct(
    path: &Path,
    duration: Duration,
    bytes_max: u64,
    sync_each: bool,
) -> anyhow::Result<RawResult> {
    let file = open_direct_preallocated(path, bytes_max)?;
    let mut buffer = AlignedBuffer::new(RAW_WRITE_BYTES)?;
    fill_pattern(buffer.as_mut_slice());
    let started = Instant::now();
    let mut position = 0u64;
    let mut sync_us = Vec::new();
    while started.elapsed() < duration && position + RAW_WRITE_BYTES as u64 <= bytes_max {
        file.write_all_at(buffer.as_slice(), position)
            .context("raw O_DIRECT write")?;
        position += RAW_WRITE_BYTES as u64;
        if sync_each {
            let sync_started = Instant::now();
            file.sync_data().context("raw fdatasync")?;
            sync_us.push(sync_started.elapsed().as_micros() as u64);
        }
    }
    sync_us.sort_unstable();
    // The data is on the device once the writes return; one final sync
    // covers the file's metadata, as a fair end to the measurement.
    file.sync_data().context("raw final fdatasync")?;
    let elapsed = started.elapsed();
    drop(file);
    std::fs::remove_file(path).ok();
    Ok(RawResult {
        bytes: position,
        elapsed,
        sync_p50_us: percentile(&sync_us, 0.50),
        sync_p99_us: percentile(&sync_us, 0.99),
    })
}

/// Size of each append in [`small_appends`]: one block, as a lone small
/// produce writes.
pub const SMALL_APPEND_BYTES: usize = 4096;

/// O_DIRECT appends of one block into a preallocated file, each followed by
/// an `fdatasync`, for `duration`: the least a durable ack of a small write
/// costs on this disk. Latencies are of write + fdatasync.
///
/// # Errors
/// I/O errors.
pub fn small_appends(path: &Path, duration: Duration) -> anyhow::Result<RawResult> {
    let bytes_max: u64 = 1 << 30;
    let file = open_direct_preallocated(path, bytes_max)?;
    let mut buffer = AlignedBuffer::new(SMALL_APPEND_BYTES)?;
    fill_pattern(buffer.as_mut_slice());
    let started = Instant::now();
    let mut position = 0u64;
    let mut append_us = Vec::new();
    while started.elapsed() < duration && position + SMALL_APPEND_BYTES as u64 <= bytes_max {
        let append_started = Instant::now();
        file.write_all_at(buffer.as_slice(), position)
            .context("raw O_DIRECT append")?;
        file.sync_data().context("raw fdatasync")?;
        append_us.push(append_started.elapsed().as_micros() as u64);
        position += SMALL_APPEND_BYTES as u64;
    }
    let elapsed = started.elapsed();
    append_us.sort_unstable();
    drop(file);
    std::fs::remove_file(path).ok();
    Ok(RawResult {
        bytes: position,
        elapsed,
        sync_p50_us: percentile(&append_us, 0.50),
        sync_p99_us: percentile(&append_us, 0.99),
    })
}

/// Requests in flight in [`direct_read`]: each of this many threads reads
/// every `READ_QUEUE_DEPTH`-th MiB, so the device always has this many 1 MiB
/// reads queued (as an engine reading ahead would keep it).
pub const READ_QUEUE_DEPTH: usize = 4;

/// The device's own sequential read: a file of `file_bytes` is first
/// written with O_DIRECT (so none of it is in the page cache), then read
/// back with O_DIRECT in 1 MiB requests, [`READ_QUEUE_DEPTH`] in flight,
/// for `duration` or to its end. Only the reading is timed.
///
/// # Errors
/// I/O errors.
pub fn direct_read(path: &Path, duration: Duration, file_bytes: u64) -> anyhow::Result<RawResult> {
    let file_bytes = file_bytes / RAW_WRITE_BYTES as u64 * RAW_WRITE_BYTES as u64;
    {
        let file = open_direct_preallocated(path, file_bytes)?;
        let mut buffer = AlignedBuffer::new(RAW_WRITE_BYTES)?;
        fill_pattern(buffer.as_mut_slice());
        let mut position = 0u64;
        while position < file_bytes {
            file.write_all_at(buffer.as_slice(), position)
                .context("raw O_DIRECT write")?;
            position += RAW_WRITE_BYTES as u64;
        }
        file.sync_data().context("raw fdatasync")?;
    }
    let file = std::sync::Arc::new(
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .with_context(|| format!("open {} with O_DIRECT", path.display()))?,
    );
    let chunks = file_bytes / RAW_WRITE_BYTES as u64;
    let started = Instant::now();
    let readers: Vec<_> = (0..READ_QUEUE_DEPTH as u64)
        .map(|lane| {
            let file = file.clone();
            std::thread::spawn(move || -> anyhow::Result<u64> {
                let mut buffer = AlignedBuffer::new(RAW_WRITE_BYTES)?;
                let mut read = 0u64;
                let mut chunk = lane;
                while chunk < chunks && started.elapsed() < duration {
                    file.read_exact_at(buffer.as_mut_slice(), chunk * RAW_WRITE_BYTES as u64)
                        .context("raw O_DIRECT read")?;
                    read += RAW_WRITE_BYTES as u64;
                    chunk += READ_QUEUE_DEPTH as u64;
                }
                Ok(read)
            })
        })
        .collect();
    let mut bytes = 0u64;
    for reader in readers {
        bytes += reader
            .join()
            .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    }
    let elapsed = started.elapsed();
    drop(file);
    std::fs::remove_file(path).ok();
    Ok(RawResult {
        bytes,
        elapsed,
        sync_p50_us: 0,
        sync_p99_us: 0,
    })
}
