//! The portable backend: `pwrite` for each write, then one `fdatasync` per
//! file. Chosen when io_uring is refused (Docker's default seccomp profile)
//! or forced by configuration.

use std::io;
use std::time::Instant;

use super::{Backend, SyncOp, WriteOp};

pub(crate) struct SyncBackend;

impl Backend for SyncBackend {
    fn execute(&mut self, writes: &mut [WriteOp<'_>], syncs: &mut [SyncOp]) {
        for op in writes.iter_mut() {
            while !op.finished() {
                let from = op.resume_at();
                let rest = &op.data[from..];
                // SAFETY: `rest` is a live slice; pwrite reads at most its length.
                let result = unsafe {
                    libc::pwrite(
                        op.fd,
                        rest.as_ptr().cast(),
                        rest.len(),
                        (op.position + from as u64) as libc::off_t,
                    )
                };
                match result {
                    n if n > 0 => op.written = from + n as usize,
                    0 => op.error = Some(io::Error::from(io::ErrorKind::WriteZero)),
                    _ => {
                        let error = io::Error::last_os_error();
                        if error.kind() != io::ErrorKind::Interrupted {
                            op.error = Some(error);
                        }
                    }
                }
            }
        }
        for sync in syncs.iter_mut() {
            let started = Instant::now();
            loop {
                // SAFETY: plain syscall on a descriptor the round keeps open.
                if unsafe { libc::fdatasync(sync.fd) } == 0 {
                    sync.done = true;
                    break;
                }
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::Interrupted {
                    sync.error = Some(error);
                    break;
                }
            }
            sync.elapsed = started.elapsed();
        }
    }
}
