//! Crash test: a child process appends with `flush = always` and reports each
//! acknowledged batch; the parent kills it with SIGKILL at random moments,
//! reopens the log and checks that every acknowledged batch is present and
//! intact, and that only whole, valid, contiguous batches are ever served.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{batch, engine, read_all};
use weir_storage::{EngineKind, FlushPolicy, Log, LogConfig, WriteMode};

/// Kills per engine; two engines make 60 in all.
const KILLS_PER_ENGINE: usize = 30;
const CHILD_WRITERS: u64 = 4;
/// The child stops by itself after this long, should the parent vanish.
const CHILD_LIFETIME_MAX: Duration = Duration::from_secs(30);

/// Runs alternate between the write modes, so recovery also sees a log
/// written one way and continued the other.
fn config(run: usize) -> LogConfig {
    LogConfig {
        write_mode: if run.is_multiple_of(2) {
            WriteMode::Direct
        } else {
            WriteMode::Buffered
        },
        segment_bytes_max: 256 * 1024,
        index_interval_bytes: 1024,
        flush: FlushPolicy::Always,
        ..LogConfig::default()
    }
}

/// Child side: appends until killed. Runs only when the parent sets the
/// environment (it is `#[ignore]`d so a plain test run skips it).
#[test]
#[ignore = "child process of crash_test_kill_9_loses_no_acknowledged_batch"]
fn crash_child() {
    let (Ok(dir), Ok(kind), Ok(run)) = (
        std::env::var("WEIR_CRASH_DIR"),
        std::env::var("WEIR_CRASH_ENGINE"),
        std::env::var("WEIR_CRASH_RUN"),
    ) else {
        return;
    };
    let kind = EngineKind::parse(&kind).expect("engine name");
    let run: u64 = run.parse().expect("run number");
    let log =
        Arc::new(Log::open(&dir, config(run as usize), engine(kind)).expect("child opens log"));
    let started = Instant::now();
    let writers: Vec<_> = (0..CHILD_WRITERS)
        .map(|writer| {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut seq = 0u64;
                while started.elapsed() < CHILD_LIFETIME_MAX {
                    let tag = run << 40 | writer << 32 | seq;
                    let count = 1 + (seq % 5) as usize;
                    let value_bytes = 100 + ((seq * 997) % 1900) as usize;
                    let info = log
                        .append_blocking(batch(tag, count, value_bytes, seq as i64))
                        .expect("append");
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "ACK {} {} {}", info.base_offset, count, tag).expect("report");
                    out.flush().expect("flush");
                    seq += 1;
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().expect("writer");
    }
}

fn spawn_child(dir: &std::path::Path, kind: &str, run: usize) -> std::process::Child {
    Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "crash_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("WEIR_CRASH_DIR", dir)
        .env("WEIR_CRASH_ENGINE", kind)
        .env("WEIR_CRASH_RUN", run.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child")
}

/// kill -9 at random moments never loses or damages an acknowledged batch.
#[test]
fn crash_test_kill_9_loses_no_acknowledged_batch() {
    for (kind, name) in [(EngineKind::Uring, "uring"), (EngineKind::Sync, "sync")] {
        let dir = tempfile::tempdir().expect("tempdir");
        // Every batch ever acknowledged, by base offset: (record count, tag).
        let mut acked: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
        let mut kills_with_acks = 0;
        for run in 0..KILLS_PER_ENGINE {
            let mut child = spawn_child(dir.path(), name, run);
            let stdout = child.stdout.take().expect("piped stdout");
            let lines = Arc::new(Mutex::new(Vec::<String>::new()));
            let collector = {
                let lines = lines.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stdout);
                    let mut line = String::new();
                    while reader.read_line(&mut line).is_ok_and(|read| read > 0) {
                        // A line cut by the kill has no newline: not an ack.
                        if line.ends_with('\n') && line.starts_with("ACK ") {
                            lines
                                .lock()
                                .expect("lines")
                                .push(line.trim_end().to_string());
                        }
                        line.clear();
                    }
                })
            };
            // Kill at a random moment: sometimes during open and recovery,
            // mostly while appends are in flight.
            std::thread::sleep(Duration::from_millis(fastrand::u64(5..120)));
            child.kill().expect("SIGKILL the child");
            child.wait().expect("reap child");
            collector.join().expect("collector");
            let lines = std::mem::take(&mut *lines.lock().expect("lines"));
            if !lines.is_empty() {
                kills_with_acks += 1;
            }
            for line in lines {
                let fields: Vec<u64> = line[4..]
                    .split(' ')
                    .map(|f| f.parse().expect("number"))
                    .collect();
                acked.insert(fields[0], (fields[1], fields[2]));
            }

            let log =
                Log::open(dir.path(), config(run + 1), engine(kind)).expect("reopen after kill");
            let stored: BTreeMap<u64, (u64, u64)> = read_all(&log)
                .into_iter()
                .map(|(base, count, tag)| (base, (count, tag)))
                .collect();
            for (base, expected) in &acked {
                assert_eq!(
                    stored.get(base),
                    Some(expected),
                    "{name} run {run}: acknowledged batch at offset {base} lost or changed"
                );
            }
            // Some of the time close cleanly; otherwise leave the log for the
            // next child to recover again.
            if run.is_multiple_of(3) {
                log.close().expect("close");
            }
        }
        assert!(
            kills_with_acks >= KILLS_PER_ENGINE / 2,
            "{name}: most kills must land while appends are acknowledged ({kills_with_acks})"
        );
        assert!(
            acked.len() > 100,
            "{name}: the test acknowledged too little to prove anything"
        );
    }
}
