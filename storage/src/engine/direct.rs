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
        self.tail.lock().unwrap_or_else(|poison| poison.into_inner()).valid = false;
    }

    /// The bytes of the block at `block_position` that precede
    /// `position`, from the carried tail or read back from the device.
    fn prefix(&self, block_position: u64, position: u64) -> io::Result<Vec<u8>> {
        let wanted = (position - block_position) as usize;
        if wanted == 0 {
            return Ok(Vec::new());
        }
        {
            let tail = self.tail.lock().unwrap_or_else(|poison| poison.into_inner());
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

    /// Records the tail after a successful write of `buffer` at
    /// `block_position` whose valid bytes end at `end`.
    fn set_tail(&self, block_position: u64, buffer: &[u8], end: u64) {
        let tail_block = end - end % DIRECT_BLOCK_BYTES as u64;
        let from = (tail_block - block_position) as usize;
        let to = (end - block_position) as usize;
        let mut tail = self.tail.lock().unwrap_or_else(|poison| poison.into_inner());
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
        let pointer = std::ptr::NonNull::new(pointer).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
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

/// One coalesced direct write: the aligned buffer and where its valid bytes end.
pub(crate) struct DirectWrite {
    pub buffer: AlignedBuffer,
    pub block_position: u64,
    /// Bytes to write: the prefix, the data and the padding to a whole block.
    pub write_bytes: usize,
    pub end: u64,
}

impl DirectWrite {
    /// The bytes handed to the device.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.buffer.as_slice()[..self.write_bytes]
    }
}

/// Spare aligned buffers, reused across rounds: a fresh multi-megabyte
/// allocation costs a page fault per 4 KiB on first touch.
#[derive(Default)]
pub(crate) struct BufferPool {
    spare: Vec<AlignedBuffer>,
}

/// Buffers kept for reuse; more are freed.
const POOL_BUFFERS_MAX: usize = 4;

impl BufferPool {
    fn take(&mut self, bytes: usize) -> io::Result<AlignedBuffer> {
        match self.spare.iter().position(|buffer| buffer.as_slice().len() >= bytes) {
            Some(index) => Ok(self.spare.swap_remove(index)),
            // Round up so that slightly larger rounds reuse the buffer too.
            None => AlignedBuffer::zeroed(bytes.next_multiple_of(1 << 20)),
        }
    }

    /// Returns a buffer for reuse.
    pub(crate) fn give(&mut self, buffer: AlignedBuffer) {
        if self.spare.len() < POOL_BUFFERS_MAX {
            self.spare.push(buffer);
        }
    }
}

/// Builds the aligned buffer for contiguous `pieces` starting at `position`.
pub(crate) fn coalesce(
    file: &DirectFile,
    position: u64,
    pieces: &[&[u8]],
    pool: &mut BufferPool,
) -> io::Result<DirectWrite> {
    let block_position = position - position % DIRECT_BLOCK_BYTES as u64;
    let prefix = file.prefix(block_position, position)?;
    let data_bytes: usize = pieces.iter().map(|piece| piece.len()).sum();
    let write_bytes = (prefix.len() + data_bytes).next_multiple_of(DIRECT_BLOCK_BYTES);
    let mut buffer = pool.take(write_bytes)?;
    let slice = buffer.as_mut_slice();
    slice[..prefix.len()].copy_from_slice(&prefix);
    let mut at = prefix.len();
    for piece in pieces {
        slice[at..at + piece.len()].copy_from_slice(piece);
        at += piece.len();
    }
    // A reused buffer holds old bytes: the padding must be zeros.
    slice[at..write_bytes].fill(0);
    Ok(DirectWrite {
        buffer,
        block_position,
        write_bytes,
        end: position + data_bytes as u64,
    })
}

/// Called after the engine has written `write`: carry its tail, or forget
/// it if the write failed.
pub(crate) fn finish(file: &DirectFile, write: &DirectWrite, ok: bool) {
    if ok {
        file.set_tail(write.block_position, write.bytes(), write.end);
    } else {
        file.forget_tail();
    }
}
