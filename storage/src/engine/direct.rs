//! Direct I/O (O_DIRECT) writes: aligned buffers and the carried tail block.
//!
//! O_DIRECT needs the buffer address, the file position and the length to be
//! multiples of the device block. A log's appends are neither, so per round
//! and per file the engine coalesces the contiguous appends into one aligned
//! buffer: the bytes of the partial block the previous write ended in (the
//! *tail*, kept in memory so the block is not read back), then the batches,
//! then zero padding to the block boundary. The next write starts by
//! rewriting that block with the tail carried forward.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;

/// Block size for direct I/O alignment: 4 KiB covers 512-byte and 4 KiB
/// logical blocks alike.
pub const DIRECT_BLOCK_BYTES: usize = 4096;

/// The partial last block of a direct-I/O file, as last written.
#[derive(Debug, Default)]
struct Tail {
    /// Position of the block (a multiple of the block size).
    block_position: u64,
    /// The block's valid bytes (fewer than a block).
    bytes: Vec<u8>,
    /// False until a write sets it, and after a truncation.
    valid: bool,
}

/// A segment file opened with O_DIRECT for writing, and its carried tail.
#[derive(Debug)]
pub(crate) struct DirectFile {
    file: File,
    tail: Mutex<Tail>,
}

impl DirectFile {
    /// Opens `path` for direct writes.
    ///
    /// # Errors
    /// EINVAL where the filesystem refuses O_DIRECT (tmpfs, for one).
    pub(crate) fn open(path: &Path) -> io::Result<DirectFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)?;
        Ok(DirectFile {
            file,
            tail: Mutex::new(Tail::default()),
        })
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Forgets the carried tail (the file was cut): the next write reads its
    /// first block back from disk.
    pub(crate) fn forget_tail(&self) {
        self.tail
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .valid = false;
    }

    /// The bytes of the block at `block_position` that precede
    /// `position`, from the carried tail or read back from the device.
    pub(crate) fn prefix(&self, block_position: u64, position: u64) -> io::Result<Vec<u8>> {
        let wanted = (position - block_position) as usize;
        if wanted == 0 {
            return Ok(Vec::new());
        }
        {
            let tail = self
                .tail
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            if tail.valid && tail.block_position == block_position && tail.bytes.len() >= wanted {
                return Ok(tail.bytes[..wanted].to_vec());
            }
        }
        let mut block = AlignedBuffer::zeroed(DIRECT_BLOCK_BYTES)?;
        // Read the whole aligned block; a short read near the end of the file
        // leaves zeros, which is what the file holds there.
        loop {
            // SAFETY: the buffer is aligned and DIRECT_BLOCK_BYTES long.
            let read = unsafe {
                libc::pread(
                    self.fd(),
                    block.as_mut_slice().as_mut_ptr().cast(),
                    DIRECT_BLOCK_BYTES,
                    block_position as libc::off_t,
                )
            };
            if read >= 0 {
                break;
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
        Ok(block.as_slice()[..wanted].to_vec())
    }

    /// Records the tail as planned: `buffer` holds the file's bytes from
    /// `block_position`, valid up to `end`. The planner carries it into the
    /// next write at once; a failed write makes the executor forget it.
    pub(crate) fn set_tail(&self, block_position: u64, buffer: &[u8], end: u64) {
        let tail_block = end - end % DIRECT_BLOCK_BYTES as u64;
        let from = (tail_block - block_position) as usize;
        let to = (end - block_position) as usize;
        let mut tail = self
            .tail
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        tail.block_position = tail_block;
        tail.bytes.clear();
        tail.bytes.extend_from_slice(&buffer[from..to]);
        tail.valid = true;
    }
}

/// A heap buffer aligned to the direct-I/O block.
pub(crate) struct AlignedBuffer {
    pointer: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

// SAFETY: the buffer is plain owned memory.
unsafe impl Send for AlignedBuffer {}

impl AlignedBuffer {
    /// A zeroed buffer of `bytes` (rounded up to a whole block).
    pub(crate) fn zeroed(bytes: usize) -> io::Result<AlignedBuffer> {
        let size = bytes.max(1).next_multiple_of(DIRECT_BLOCK_BYTES);
        let layout = std::alloc::Layout::from_size_align(size, DIRECT_BLOCK_BYTES)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: the layout has a non-zero size.
        let pointer = unsafe { std::alloc::alloc_zeroed(layout) };
        let pointer = std::ptr::NonNull::new(pointer)
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        Ok(AlignedBuffer { pointer, layout })
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: allocated with this size; lives until Drop.
        unsafe { std::slice::from_raw_parts(self.pointer.as_ptr(), self.layout.size()) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above; `&mut self` is unique.
        unsafe { std::slice::from_raw_parts_mut(self.pointer.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.pointer.as_ptr(), self.layout) }
    }
}

/// Spare aligned buffers, shared by the planner (which fills them) and the
/// executor (which gives them back): a fresh multi-megabyte allocation costs
/// a page fault per 4 KiB on first touch.
#[derive(Default)]
pub(crate) struct BufferPool {
    spare: Vec<AlignedBuffer>,
}

/// Buffers kept for reuse; more are freed. Enough for two rounds on the
/// device and one being planned, each writing to several files.
const POOL_BUFFERS_MAX: usize = 16;
/// Bytes of spare buffers kept at most (an idle engine holds no more).
const POOL_SPARE_BYTES_MAX: usize = 64 << 20;
/// Buffers are allocated in multiples of this, so similar rounds reuse them.
const POOL_GRANULE_BYTES: usize = 1 << 20;

impl BufferPool {
    /// A buffer of at least `bytes` (contents unspecified): the largest
    /// spare one, so that a group started with it can take the rest of its
    /// round without growing (growing copies everything gathered so far).
    pub(crate) fn take(&mut self, bytes: usize) -> io::Result<AlignedBuffer> {
        match self
            .spare
            .iter()
            .enumerate()
            .filter(|(_, buffer)| buffer.as_slice().len() >= bytes)
            .max_by_key(|(_, buffer)| buffer.as_slice().len())
            .map(|(index, _)| index)
        {
            Some(index) => Ok(self.spare.swap_remove(index)),
            None => AlignedBuffer::zeroed(bytes.next_multiple_of(POOL_GRANULE_BYTES)),
        }
    }

    /// Returns a buffer for reuse.
    pub(crate) fn give(&mut self, buffer: AlignedBuffer) {
        let spare_bytes: usize = self.spare.iter().map(|spare| spare.as_slice().len()).sum();
        if self.spare.len() < POOL_BUFFERS_MAX
            && spare_bytes + buffer.as_slice().len() <= POOL_SPARE_BYTES_MAX
        {
            self.spare.push(buffer);
        }
    }
}
