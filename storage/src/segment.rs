//! One segment: a `.log` file of whole batches starting at `base_offset`,
//! its memory map, and its two indexes.
//!
//! The active segment's file is preallocated to `segment_bytes_max` and
//! mapped at that length once, so the map never moves while readers hold
//! slices of it; sealing cuts the file to its data. Readers see only bytes
//! below `published_bytes`, which the log advances after the io engine has
//! completed the write (Release/Acquire).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use memmap2::Mmap;
use weir_protocol::{Batch, BatchError};

use crate::engine::WriteTarget;
use crate::engine::direct::DirectFile;
use crate::error::{Result, StorageError};
use crate::index::{self, Index, OFFSET_ENTRY_WORDS, TIME_ENTRY_WORDS};

/// Digits in a segment file name (`{:020}`), enough for any u64 offset.
pub(crate) const FILE_NAME_DIGITS: usize = 20;

/// The file name stem for a segment starting at `base_offset`.
pub(crate) fn file_stem(base_offset: u64) -> String {
    format!("{base_offset:0FILE_NAME_DIGITS$}")
}

/// One segment of a log.
pub(crate) struct Segment {
    base_offset: u64,
    path: PathBuf,
    file: Arc<File>,
    map: Mmap,
    /// Bytes readers may see; only grows, except under truncation.
    published_bytes: AtomicU64,
    /// Offset after the last published batch.
    published_next_offset: AtomicU64,
    /// Largest batch max-timestamp published, or `i64::MIN` when empty.
    max_timestamp_ms: AtomicI64,
    sealed: AtomicBool,
    /// The O_DIRECT handle, opened on the first direct write and dropped
    /// when the segment is sealed.
    direct: Mutex<Option<Arc<DirectFile>>>,
    pub(crate) offset_index: Index,
    pub(crate) time_index: Index,
}

/// Where a scan of a segment's batches stopped.
pub(crate) struct ScanEnd {
    /// Bytes of valid batches.
    pub bytes: u64,
    /// Offset after the last valid batch.
    pub next_offset: u64,
    /// Largest max-timestamp among the valid batches.
    pub max_timestamp_ms: i64,
    /// Why the scan stopped before the end of the file, if it found bytes
    /// that are not an all-zero (never written) header.
    pub cut: Option<BatchError>,
}

impl Segment {
    /// Creates a new, empty segment preallocated to `preallocate_bytes`.
    pub(crate) fn create(
        dir: &Path,
        base_offset: u64,
        preallocate_bytes: u64,
        index_capacity: usize,
    ) -> Result<Segment> {
        let path = dir.join(format!("{}.log", file_stem(base_offset)));
        let io = |error| StorageError::io(&path, error);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io)?;
        if let Err(error) = preallocate(&file, preallocate_bytes) {
            drop(file);
            let _ = std::fs::remove_file(&path);
            return Err(io(error));
        }
        // Stale indexes of an earlier segment with this base would lie.
        for extension in ["index", "timeindex"] {
            let _ =
                std::fs::remove_file(dir.join(format!("{}.{extension}", file_stem(base_offset))));
        }
        Self::from_file(dir, base_offset, path, file, index_capacity)
    }

    /// Opens an existing segment file and returns it with the file's size
    /// before any preallocation. Its published extent is zero until the
    /// caller scans it or trusts its indexes (see `recovery`).
    /// `preallocate_bytes` is set for the segment that will be active: its
    /// file is grown (with allocated blocks) to that size before mapping.
    pub(crate) fn open(
        dir: &Path,
        base_offset: u64,
        preallocate_bytes: Option<u64>,
        index_capacity: usize,
    ) -> Result<(Segment, u64)> {
        let path = dir.join(format!("{}.log", file_stem(base_offset)));
        let io = |error| StorageError::io(&path, error);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io)?;
        let file_bytes = file.metadata().map_err(io)?.len();
        if let Some(bytes) = preallocate_bytes
            && file_bytes < bytes
        {
            preallocate(&file, bytes).map_err(io)?;
        }
        Ok((
            Self::from_file(dir, base_offset, path, file, index_capacity)?,
            file_bytes,
        ))
    }

    fn from_file(
        dir: &Path,
        base_offset: u64,
        path: PathBuf,
        file: File,
        index_capacity: usize,
    ) -> Result<Segment> {
        let io = |error| StorageError::io(&path, error);
        let file_bytes = file.metadata().map_err(io)?.len();
        // An empty file cannot be mapped; give it one page of preallocation.
        if file_bytes == 0 {
            preallocate(&file, 4096).map_err(io)?;
        }
        // SAFETY: segment files are private to the log (its directory is
        // locked), and bytes below the published extent are not rewritten,
        // with one exception: truncation zeroes what it removes, so a reader
        // still holding a `LogRead` of removed batches sees zeros there. The
        // map itself stays valid: files keep their size (hole punch) and
        // deleted files stay mapped until the last `Arc<Segment>` goes.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let offset_index = Index::open(
            &dir.join(format!("{}.index", file_stem(base_offset))),
            OFFSET_ENTRY_WORDS,
            index_capacity,
        )?;
        let time_index = Index::open(
            &dir.join(format!("{}.timeindex", file_stem(base_offset))),
            TIME_ENTRY_WORDS,
            index_capacity,
        )?;
        Ok(Segment {
            base_offset,
            path,
            file: Arc::new(file),
            map,
            published_bytes: AtomicU64::new(0),
            published_next_offset: AtomicU64::new(base_offset),
            max_timestamp_ms: AtomicI64::new(i64::MIN),
            sealed: AtomicBool::new(false),
            direct: Mutex::new(None),
            offset_index,
            time_index,
        })
    }

    pub(crate) fn base_offset(&self) -> u64 {
        self.base_offset
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// Where appends to this segment are written.
    ///
    /// # Errors
    /// Opening the O_DIRECT handle failed.
    pub(crate) fn write_target(&self, direct: bool) -> Result<WriteTarget> {
        if !direct {
            return Ok(WriteTarget::Buffered(self.file.clone()));
        }
        let mut handle = self
            .direct
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if handle.is_none() {
            let opened = DirectFile::open(&self.path)
                .map_err(|error| StorageError::io(&self.path, error))?;
            *handle = Some(Arc::new(opened));
        }
        match handle.as_ref() {
            Some(file) => Ok(WriteTarget::Direct(file.clone())),
            None => unreachable!("opened above"),
        }
    }

    fn forget_direct_tail(&self) {
        if let Some(file) = self
            .direct
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .as_ref()
        {
            file.forget_tail();
        }
    }

    /// Bytes the map can hold: writes must stay below it.
    pub(crate) fn mapped_bytes(&self) -> u64 {
        self.map.len() as u64
    }

    pub(crate) fn published_bytes(&self) -> u64 {
        self.published_bytes.load(Ordering::Acquire)
    }

    pub(crate) fn published_next_offset(&self) -> u64 {
        self.published_next_offset.load(Ordering::Acquire)
    }

    pub(crate) fn max_timestamp_ms(&self) -> i64 {
        self.max_timestamp_ms.load(Ordering::Acquire)
    }

    pub(crate) fn is_sealed(&self) -> bool {
        self.sealed.load(Ordering::Acquire)
    }

    /// Makes bytes up to `bytes` (ending at `next_offset`) visible to readers.
    pub(crate) fn publish(&self, bytes: u64, next_offset: u64, max_timestamp_ms: i64) {
        assert!(bytes <= self.mapped_bytes(), "published past the map");
        assert!(
            next_offset >= self.base_offset,
            "published offset below the segment base"
        );
        self.max_timestamp_ms
            .fetch_max(max_timestamp_ms, Ordering::AcqRel);
        self.published_next_offset
            .store(next_offset, Ordering::Release);
        self.published_bytes.store(bytes, Ordering::Release);
    }

    /// Resets the published extent (truncation and recovery only).
    pub(crate) fn reset_published(&self, bytes: u64, next_offset: u64, max_timestamp_ms: i64) {
        self.published_bytes.store(bytes, Ordering::Release);
        self.published_next_offset
            .store(next_offset, Ordering::Release);
        self.max_timestamp_ms
            .store(max_timestamp_ms, Ordering::Release);
    }

    /// The published bytes from `position` to the end.
    pub(crate) fn published_slice(&self, position: u64) -> &[u8] {
        let end = self.published_bytes() as usize;
        let start = (position as usize).min(end);
        &self.map[start..end]
    }

    /// Starts reading published bytes `[start, start + len)` from the
    /// device in the background, so a reader catching up finds its next
    /// reads in memory instead of faulting them in one by one. (Direct
    /// writes leave nothing in the page cache.) Only a hint.
    pub(crate) fn prefetch(&self, start: usize, len: usize) {
        let end = start
            .saturating_add(len)
            .min(self.published_bytes() as usize);
        if start < end {
            let _ = self
                .map
                .advise_range(memmap2::Advice::WillNeed, start, end - start);
        }
    }

    /// Whether the page holding byte `position` is in the page cache (a
    /// hint; `false` when the kernel cannot tell).
    pub(crate) fn resident(&self, position: usize) -> bool {
        const PAGE_BYTES: usize = 4096;
        let page = position / PAGE_BYTES * PAGE_BYTES;
        if page >= self.map.len() {
            return false;
        }
        let mut vector = [0u8; 1];
        // SAFETY: the range is one page inside the live map; mincore only
        // writes one byte per page into `vector`.
        let status = unsafe {
            libc::mincore(
                self.map.as_ptr().add(page) as *mut libc::c_void,
                PAGE_BYTES,
                vector.as_mut_ptr(),
            )
        };
        status == 0 && vector[0] & 1 == 1
    }

    /// Bytes `[start, end)` of the map. The caller got the range from a
    /// published extent, so it lies below the map's end.
    pub(crate) fn map_slice(&self, start: usize, end: usize) -> &[u8] {
        &self.map[start..end]
    }

    /// Marks a segment found sealed on disk (not the last one).
    pub(crate) fn mark_sealed(&self) {
        self.sealed.store(true, Ordering::Release);
    }

    /// Reads the batch at `position` (framing only), with `Corrupt` on error.
    pub(crate) fn batch_at(&self, position: u64, verify_crc: bool) -> Result<Batch<'_>> {
        let bytes = self.published_slice(position);
        let parsed = if verify_crc {
            Batch::parse_verified(bytes)
        } else {
            Batch::parse(bytes)
        };
        parsed.map_err(|reason| self.corrupt_at(position, reason))
    }

    /// The error for a bad batch at `position` of this segment.
    pub(crate) fn corrupt_at(&self, position: u64, reason: BatchError) -> StorageError {
        StorageError::Corrupt {
            path: self.path.clone(),
            position,
            reason,
        }
    }

    /// Byte position of the batch containing `offset`, or of the first batch
    /// after it; `published_bytes` if there is none.
    pub(crate) fn position_of(&self, offset: u64) -> Result<u64> {
        let relative = offset.saturating_sub(self.base_offset);
        let mut position = self
            .offset_index
            .floor(relative, index::offset_key)
            .map_or(0, |entry| u64::from(entry[1]));
        let end = self.published_bytes();
        if position > end {
            // A stale entry (racing a truncation): fall back to a full scan.
            position = 0;
        }
        while position < end {
            let batch = self.batch_at(position, false)?;
            if batch.last_offset() >= offset {
                break;
            }
            position += batch.len() as u64;
        }
        Ok(position)
    }

    /// Scans batches from `position` (where offset `next_offset` starts),
    /// checking framing, CRC and offset continuity, up to `limit_bytes` of the
    /// map. Adds index entries as it goes when `rebuild` is set.
    pub(crate) fn scan(
        &self,
        mut position: u64,
        mut next_offset: u64,
        limit_bytes: u64,
        index_interval_bytes: u64,
        rebuild: bool,
    ) -> ScanEnd {
        let limit = (limit_bytes.min(self.mapped_bytes())) as usize;
        let mut max_timestamp_ms = i64::MIN;
        let mut since_entry = index_interval_bytes;
        let mut cut = None;
        while (position as usize) < limit {
            let bytes = &self.map[position as usize..limit];
            match Batch::parse_verified(bytes) {
                Ok(batch)
                    if batch.base_offset() == next_offset
                        && batch.last_offset() - self.base_offset <= u64::from(u32::MAX) =>
                {
                    max_timestamp_ms = max_timestamp_ms.max(batch.max_timestamp());
                    if rebuild && since_entry >= index_interval_bytes {
                        self.add_index_entries(batch.base_offset(), position, max_timestamp_ms);
                        since_entry = 0;
                    }
                    since_entry += batch.len() as u64;
                    next_offset = batch.next_offset();
                    position += batch.len() as u64;
                }
                Ok(batch) => {
                    cut = Some(BatchError::BadRecord(
                        if batch.base_offset() < next_offset {
                            "batch offset goes backwards"
                        } else {
                            "gap in offsets"
                        },
                    ));
                    break;
                }
                Err(error) => {
                    let header =
                        &bytes[..bytes.len().min(weir_protocol::batch::BATCH_HEADER_BYTES)];
                    if header.iter().any(|byte| *byte != 0) {
                        cut = Some(error);
                    }
                    break;
                }
            }
        }
        ScanEnd {
            bytes: position,
            next_offset,
            max_timestamp_ms,
            cut,
        }
    }

    /// Adds an entry to both indexes for the batch at `position`;
    /// `running_max_timestamp_ms` is the largest timestamp in the segment up
    /// to and including this batch (so a time lookup may skip everything
    /// before an entry whose timestamp is below its target).
    pub(crate) fn add_index_entries(
        &self,
        base_offset: u64,
        position: u64,
        running_max_timestamp_ms: i64,
    ) {
        let max_timestamp_ms = running_max_timestamp_ms;
        let relative = relative_offset(base_offset, self.base_offset);
        assert!(
            position <= u64::from(u32::MAX),
            "segment position exceeds u32"
        );
        self.offset_index.push([relative, position as u32, 0]);
        let last_time = self
            .time_index
            .len()
            .checked_sub(1)
            .map(|at| index::time_of(self.time_index.entry(at)));
        if last_time.is_none_or(|last| max_timestamp_ms > last) {
            self.time_index
                .push(index::time_entry(max_timestamp_ms, relative));
        }
    }

    /// Cuts both indexes back to entries below `offset`.
    pub(crate) fn truncate_indexes(&self, offset: u64) {
        let relative = offset.saturating_sub(self.base_offset);
        let keep = |index: &Index, offset_word: usize| {
            let mut keep = index.len();
            while keep > 0 && u64::from(index.entry(keep - 1)[offset_word]) >= relative {
                keep -= 1;
            }
            index.truncate_entries(keep);
        };
        keep(&self.offset_index, 0);
        keep(&self.time_index, 2);
    }

    /// Checks that the offset index is plausible for a segment of
    /// `data_bytes`: increasing, within the data, and its last entry naming
    /// a batch that starts at that offset. A stale or damaged index fails.
    pub(crate) fn indexes_valid(&self, data_bytes: u64) -> bool {
        // The first batch of a segment always gets an entry, and sealing adds
        // a final time entry, so data without entries means a lost index.
        if data_bytes > 0
            && (self.offset_index.len() == 0
                || self.offset_index.entry(0)[..2] != [0, 0]
                || self.time_index.len() == 0)
        {
            return false;
        }
        let mut previous: Option<[u32; 3]> = None;
        for at in 0..self.offset_index.len() {
            let entry = self.offset_index.entry(at);
            if u64::from(entry[1]) >= data_bytes
                || previous.is_some_and(|p| p[0] >= entry[0] || p[1] >= entry[1])
            {
                return false;
            }
            previous = Some(entry);
        }
        let time_ok = (1..self.time_index.len()).all(|at| {
            let (a, b) = (self.time_index.entry(at - 1), self.time_index.entry(at));
            index::time_of(a) < index::time_of(b) && a[2] <= b[2]
        });
        if !time_ok {
            return false;
        }
        match previous {
            None => self.time_index.len() == 0,
            Some(entry) => {
                let position = entry[1] as usize;
                match Batch::parse(&self.map[position..data_bytes as usize]) {
                    Ok(batch) => batch.base_offset() == self.base_offset + u64::from(entry[0]),
                    Err(_) => false,
                }
            }
        }
    }

    /// Seals the segment: data durable, file cut to its data, indexes written.
    pub(crate) fn seal(&self) -> Result<()> {
        let io = |error| StorageError::io(&self.path, error);
        let bytes = self.published_bytes();
        let max_timestamp_ms = self.max_timestamp_ms();
        let next = self.published_next_offset();
        // Record the segment's newest timestamp so retention and time lookups
        // need no scan after a restart.
        if next > self.base_offset {
            let last_time = self
                .time_index
                .len()
                .checked_sub(1)
                .map(|at| index::time_of(self.time_index.entry(at)));
            if last_time.is_none_or(|last| max_timestamp_ms > last) {
                let relative = relative_offset(next - 1, self.base_offset);
                self.time_index
                    .push(index::time_entry(max_timestamp_ms, relative));
            }
        }
        self.file.sync_data().map_err(io)?;
        self.file.set_len(bytes).map_err(io)?;
        self.file.sync_all().map_err(io)?;
        self.offset_index.seal()?;
        self.time_index.seal()?;
        self.sealed.store(true, Ordering::Release);
        self.direct
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .take();
        Ok(())
    }

    /// Makes a sealed segment active again (truncation reached into it):
    /// the indexes regain their room. Its map keeps its sealed length, so it
    /// takes appends only up to that and then rolls.
    pub(crate) fn unseal(&self) -> Result<()> {
        self.offset_index.unseal()?;
        self.time_index.unseal()?;
        self.sealed.store(false, Ordering::Release);
        Ok(())
    }

    /// Zeroes the file from `bytes` on (keeping its size, so a reader's map
    /// never points past the end of the file), so that bytes past the cut can
    /// never be mistaken for batches by a later recovery; then syncs it.
    pub(crate) fn cut_file(&self, bytes: u64) -> Result<()> {
        let io = |error| StorageError::io(&self.path, error);
        self.forget_direct_tail();
        let file_bytes = self.file.metadata().map_err(io)?.len();
        if file_bytes > bytes {
            zero_range(&self.file, bytes, file_bytes - bytes).map_err(io)?;
        }
        self.file.sync_all().map_err(io)
    }

    /// Removes the segment's files.
    pub(crate) fn delete_files(&self) -> Result<()> {
        for path in [
            &self.path,
            &self.offset_index.path().to_path_buf(),
            &self.time_index.path().to_path_buf(),
        ] {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(StorageError::io(path.as_path(), error)),
            }
        }
        Ok(())
    }
}

/// `offset - base` as the u32 that indexes store.
///
/// # Panics
/// If the segment spans more than 2^32 offsets (segments roll long before).
pub(crate) fn relative_offset(offset: u64, base_offset: u64) -> u32 {
    let relative = offset - base_offset;
    assert!(
        relative <= u64::from(u32::MAX),
        "segment spans more than 2^32 offsets"
    );
    relative as u32
}

/// Makes `[position, position + len)` read as zeros: a hole punched and
/// allocated again where the filesystem can, zeros written where it cannot.
fn zero_range(file: &File, position: u64, len: u64) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: plain syscalls on an open descriptor.
    let punched = unsafe {
        libc::fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            position as libc::off_t,
            len as libc::off_t,
        )
    };
    if punched == 0 {
        // Best effort: without space the range is allocated as it is written.
        // SAFETY: as above.
        let _ = unsafe {
            libc::fallocate(
                fd,
                libc::FALLOC_FL_KEEP_SIZE,
                position as libc::off_t,
                len as libc::off_t,
            )
        };
        return Ok(());
    }
    use std::os::unix::fs::FileExt;
    let zeros = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let chunk = (len - done).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..chunk], position + done)?;
        done += chunk as u64;
    }
    Ok(())
}

/// Allocates disk blocks for the first `bytes` of the file (extending it),
/// so that writes into them cannot fail for lack of space.
fn preallocate(file: &File, bytes: u64) -> std::io::Result<()> {
    // SAFETY: plain syscall on an open descriptor.
    let result = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, bytes as libc::off_t) };
    if result == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::EOPNOTSUPP) {
        // Filesystems without fallocate: extend the size; blocks come on write.
        return file.set_len(bytes.max(file.metadata()?.len()));
    }
    Err(error)
}
