//! The io engine as a whole: many logs sharing one engine, and the automatic
//! fallback to the sync engine where a seccomp profile refuses io_uring (as
//! Docker's and Kubernetes' default profiles do).

mod common;

use std::sync::Arc;

use common::{VARIANTS, batch, engine, open, read_all, small_config};
use weir_storage::{EngineConfig, EngineKind, IoEngine, Log, LogConfig, StorageError, WriteMode};

/// Eight logs on one engine, appended to concurrently, each get exactly
/// their own acknowledged batches, in order.
#[test]
fn many_logs_share_one_engine() {
    for (kind, mode) in VARIANTS {
        let root = tempfile::tempdir().expect("tempdir");
        let engine = engine(kind);
        let config = small_config(mode);
        let logs: Vec<Arc<Log>> = (0..8)
            .map(|index| {
                Arc::new(open(
                    &root.path().join(format!("log-{index}")),
                    &config,
                    &engine,
                ))
            })
            .collect();
        let writers: Vec<_> = (0..16u64)
            .map(|writer| {
                let log = logs[writer as usize % logs.len()].clone();
                std::thread::spawn(move || {
                    (0..30u64)
                        .map(|seq| {
                            let tag = writer << 32 | seq;
                            (
                                log.append_blocking(batch(tag, 2, 300, 0))
                                    .expect("append")
                                    .base_offset,
                                tag,
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut acked: Vec<Vec<(u64, u64)>> = vec![Vec::new(); logs.len()];
        for (writer, handle) in writers.into_iter().enumerate() {
            acked[writer % logs.len()].extend(handle.join().expect("writer"));
        }
        for (index, log) in logs.iter().enumerate() {
            acked[index].sort_unstable();
            let stored: Vec<(u64, u64)> = read_all(log).iter().map(|b| (b.0, b.2)).collect();
            assert_eq!(stored, acked[index], "{kind:?}/{mode:?}: log {index}");
        }
        assert!(
            engine
                .stats()
                .rounds
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
        );
    }
}

/// A BPF program that makes `io_uring_setup` fail with EPERM, as Docker's
/// default seccomp profile does, and allows everything else.
#[cfg(target_arch = "x86_64")]
fn refuse_io_uring() {
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    let statement = |code: u16, k: u32| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |code: u16, k: u32, jt: u8, jf: u8| libc::sock_filter { code, jt, jf, k };
    let load_word = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    let jump_equal = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    let ret = (libc::BPF_RET | libc::BPF_K) as u16;
    let mut program = [
        statement(load_word, 4), // seccomp_data.arch
        jump(jump_equal, AUDIT_ARCH_X86_64, 1, 0),
        statement(ret, SECCOMP_RET_ALLOW),
        statement(load_word, 0), // seccomp_data.nr
        jump(jump_equal, libc::SYS_io_uring_setup as u32, 0, 1),
        statement(ret, SECCOMP_RET_ERRNO | libc::EPERM as u32),
        statement(ret, SECCOMP_RET_ALLOW),
    ];
    let filter = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: plain syscalls with a valid, live BPF program.
    unsafe {
        assert_eq!(
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            0,
            "no_new_privs"
        );
        let installed = libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_TSYNC,
            &filter as *const libc::sock_fprog,
        );
        assert_eq!(
            installed,
            0,
            "seccomp filter: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Child side of the fallback test: runs under the filter in its own process.
#[cfg(target_arch = "x86_64")]
#[test]
#[ignore = "child process of auto_engine_falls_back_to_sync_when_io_uring_is_refused"]
fn seccomp_child() {
    if std::env::var_os("WEIR_SECCOMP_CHILD").is_none() {
        return;
    }
    refuse_io_uring();
    let forced = IoEngine::start(&EngineConfig {
        kind: EngineKind::Uring,
        ..EngineConfig::default()
    });
    assert!(
        matches!(forced, Err(StorageError::EngineStart(_))),
        "forced uring must fail under the filter"
    );
    let engine = IoEngine::start(&EngineConfig::default()).expect("auto engine starts");
    assert_eq!(engine.kind(), EngineKind::Sync, "auto falls back to sync");
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(
        dir.path(),
        LogConfig {
            write_mode: WriteMode::Direct,
            ..small_config(WriteMode::Direct)
        },
        engine,
    )
    .expect("open");
    for tag in 0..20 {
        log.append_blocking(batch(tag, 3, 100, 0))
            .expect("append on the sync engine");
    }
    assert_eq!(read_all(&log).len(), 20);
    println!("FALLBACK OK");
}

/// With io_uring refused by seccomp, `auto` starts the sync engine (and a
/// forced `uring` fails cleanly); the log works on it.
#[cfg(target_arch = "x86_64")]
#[test]
fn auto_engine_falls_back_to_sync_when_io_uring_is_refused() {
    let output = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "seccomp_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("WEIR_SECCOMP_CHILD", "1")
        .output()
        .expect("run child");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("FALLBACK OK"),
        "child failed: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}
