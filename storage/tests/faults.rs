//! Faults from the OS reach the caller as errors and leave the log exactly
//! as acknowledged: a full disk (a real tmpfs), and writes refused by the
//! kernel mid-stream (RLIMIT_FSIZE makes writes short and then fail with
//! EFBIG, exercising the short-write path and the repair after a failure).
//!
//! The rlimit is process-wide, so that test re-runs itself in a child
//! process (as `crash.rs` does): it touches nothing else under either
//! `cargo test` (one process, tests on threads) or nextest.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{ENGINES, batch, engine, read_all};
use weir_storage::{Log, LogConfig, StorageError};

/// A tmpfs of a fixed size, unmounted on drop. Needs root (CI runs as root).
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size_bytes: u64) -> Tmpfs {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_bytes}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a tmpfs needs root; the disk-full test cannot run otherwise"
        );
        Tmpfs {
            path: dir.path().to_path_buf(),
            _dir: dir,
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

fn fill_with_ballast(dir: &Path, bytes: usize) -> PathBuf {
    let path = dir.join("ballast");
    std::fs::write(&path, vec![1u8; bytes]).expect("write ballast");
    path
}

/// A full disk fails the append that needs a new segment with StorageFull;
/// the log stays readable and intact, and appends work again once space returns.
#[test]
fn disk_full_is_reported_and_recoverable() {
    for kind in ENGINES {
        let tmpfs = Tmpfs::mount(4 << 20);
        let dir = tmpfs.path.join("log");
        let config = LogConfig {
            segment_bytes_max: 512 * 1024,
            index_interval_bytes: 1024,
            batch_bytes_max: 64 * 1024,
            ..LogConfig::default()
        };
        let engine = engine(kind);
        let log = Log::open(&dir, config.clone(), engine.clone()).expect("open");
        let ballast = fill_with_ballast(&tmpfs.path, 2 << 20);
        let mut acked = Vec::new();
        let error = loop {
            match log.append_blocking(batch(acked.len() as u64, 4, 2000, 0)) {
                Ok(info) => acked.push(info.base_offset),
                Err(error) => break error,
            }
            assert!(acked.len() < 10_000, "the disk never filled");
        };
        assert!(
            matches!(error, StorageError::StorageFull { .. }),
            "{kind:?}: got {error}"
        );
        let stored: Vec<u64> = read_all(&log).iter().map(|b| b.0).collect();
        assert_eq!(
            stored, acked,
            "{kind:?}: the log holds exactly what was acknowledged"
        );
        // Still full: still a clear error, still nothing changed.
        assert!(matches!(
            log.append_blocking(batch(0, 4, 2000, 0)),
            Err(StorageError::StorageFull { .. })
        ));
        std::fs::remove_file(ballast).expect("free space");
        let info = log
            .append_blocking(batch(9999, 1, 10, 0))
            .expect("append works once space returns");
        assert_eq!(info.base_offset, log.end_offset() - 1);
        drop(log);
        let log = Log::open(&dir, config, engine).expect("reopen");
        assert_eq!(read_all(&log).last().map(|b| b.2), Some(9999));
        assert_eq!(read_all(&log).len(), acked.len() + 1);
    }
}

fn set_file_size_limit(bytes: u64) {
    // SAFETY: plain syscalls; SIGXFSZ is ignored so the limit yields EFBIG
    // instead of killing the process.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let limit = libc::rlimit {
            rlim_cur: bytes,
            rlim_max: libc::RLIM_INFINITY,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0, "setrlimit");
    }
}

/// Writes refused by the kernel (short, then EFBIG) fail their append and
/// every append queued behind it; the log keeps exactly the acknowledged
/// batches, later appends work, and a reopen never brings back the bytes of
/// the failed writes.
#[test]
fn failed_writes_fail_appends_and_the_log_repairs_itself() {
    if std::env::var_os(RLIMIT_CHILD_ENV).is_some() {
        failed_writes_in_this_process();
        return;
    }
    let output = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "failed_writes_fail_appends_and_the_log_repairs_itself",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(RLIMIT_CHILD_ENV, "1")
        .output()
        .expect("spawn child");
    assert!(
        output.status.success(),
        "child failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // The child ran the test (a filter that matched nothing would pass too).
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("1 passed"),
        "the child ran the test: {}",
        String::from_utf8_lossy(&output.stdout)
    );
}

/// Set in the child process that lowers its own file size limit.
const RLIMIT_CHILD_ENV: &str = "WEIR_FAULTS_RLIMIT_CHILD";

fn failed_writes_in_this_process() {
    for kind in ENGINES {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = LogConfig {
            segment_bytes_max: 1 << 20,
            index_interval_bytes: 1024,
            ..LogConfig::default()
        };
        let engine = engine(kind);
        let log = Log::open(dir.path(), config.clone(), engine.clone()).expect("open");
        set_file_size_limit(100_000);
        let mut acked = Vec::new();
        let mut failures = 0;
        let mut failed_offsets = Vec::new();
        for round in 0..20u64 {
            // Several appends in flight at once, so failures land mid-queue.
            let futures: Vec<_> = (0..8u64)
                .map(|i| (round * 8 + i, log.append(batch(round * 8 + i, 3, 1500, 0))))
                .collect();
            for (tag, future) in futures {
                let given = future.as_ref().map(|f| f.base_offset()).ok();
                match future.and_then(|f| f.wait()) {
                    Ok(info) => {
                        assert_eq!(Some(info.base_offset), given, "the offset known at submit");
                        acked.push((info.base_offset, tag));
                    }
                    Err(StorageError::Io { .. } | StorageError::WriteFailed) => {
                        failures += 1;
                        failed_offsets.extend(given);
                    }
                    Err(other) => panic!("{kind:?}: unexpected error {other}"),
                }
            }
        }
        assert!(
            failures > 0,
            "{kind:?}: the file size limit must refuse writes"
        );
        assert!(
            log.end_offset() < 100_000,
            "nothing was published past the limit"
        );
        let stored: Vec<(u64, u64)> = read_all(&log).iter().map(|b| (b.0, b.2)).collect();
        assert_eq!(stored, acked, "{kind:?}: exactly the acknowledged batches");
        set_file_size_limit(libc::RLIM_INFINITY);
        // append_checked sees the offset the batch would get, after the
        // repair: the failed writes' offsets are taken back (reused), which
        // is what keeps idempotent producers' state honest.
        let refused = log
            .append_checked(batch(6666, 2, 1500, 0), Err)
            .expect("no storage error");
        let Err(offered) = refused else {
            panic!("the check refused")
        };
        assert_eq!(offered, log.end_offset(), "{kind:?}: at the repaired end");
        let acked_end = acked.iter().map(|(base, _)| base + 3).max().unwrap_or(0);
        assert_eq!(
            offered, acked_end,
            "{kind:?}: right after the last acknowledged batch"
        );
        assert!(
            failed_offsets.contains(&offered),
            "{kind:?}: a failed write's offset comes back for the next batch"
        );
        let future = log
            .append_checked(batch(7777, 2, 1500, 0), |next_offset| {
                assert_eq!(next_offset, offered, "nothing appended by the refusal");
                Ok::<(), u64>(())
            })
            .expect("no storage error")
            .expect("accepted");
        assert_eq!(future.base_offset(), offered);
        let info = future.wait().expect("appends work again");
        drop(log);
        let log = Log::open(dir.path(), config, engine).expect("reopen");
        assert!(
            log.recovery_report().cut.is_none(),
            "{kind:?}: {:?}",
            log.recovery_report()
        );
        let stored: Vec<(u64, u64)> = read_all(&log).iter().map(|b| (b.0, b.2)).collect();
        let mut expected = acked.clone();
        expected.push((info.base_offset, 7777));
        assert_eq!(
            stored, expected,
            "{kind:?}: nothing of the failed writes came back"
        );
    }
}
