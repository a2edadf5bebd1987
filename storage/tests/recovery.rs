//! Recovery by replay: damaged tails, damaged middles, missing and stale
//! indexes, and the clean-shutdown marker, for both io engines.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::{VARIANTS, batch, engine, open, read_all, small_config};
use weir_storage::checkpoint::CLEAN_SHUTDOWN_FILE;
use weir_storage::{LogConfig, StorageError};

fn segment_path(dir: &Path, base: u64, extension: &str) -> PathBuf {
    dir.join(format!("{base:020}.{extension}"))
}

/// Fills a log with `batches` batches and drops it without `close` (a crash,
/// as far as the marker is concerned). Returns the base offsets and sizes.
fn fill(
    dir: &Path,
    config: &LogConfig,
    kind: weir_storage::EngineKind,
    batches: u64,
) -> Vec<(u64, usize)> {
    let log = open(dir, config, &engine(kind));
    let mut out = Vec::new();
    for tag in 0..batches {
        let bytes = batch(tag, 2, 150, tag as i64);
        let len = bytes.len();
        out.push((log.append_blocking(bytes).expect("append").base_offset, len));
    }
    out
}

fn flip(path: &Path, position: u64) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, position).expect("read byte");
    byte[0] ^= 0x5a;
    file.write_all_at(&byte, position).expect("write byte");
}

/// A tail truncated mid-batch is cut at the last whole batch; appends continue there.
#[test]
fn truncated_tail_mid_batch() {
    for (kind, mode) in VARIANTS {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = LogConfig {
            segment_bytes_max: 1 << 20,
            ..small_config(mode)
        };
        let written = fill(dir.path(), &config, kind, 20);
        let tail_start: u64 = written[..19].iter().map(|(_, len)| *len as u64).sum();
        // Zero the second half of the last batch, as if its write was torn.
        let path = segment_path(dir.path(), 0, "log");
        let file = OpenOptions::new().write(true).open(&path).expect("open");
        let half = written[19].1 as u64 / 2;
        file.write_all_at(&vec![0u8; half as usize], tail_start + half)
            .expect("tear");
        drop(file);
        let log = open(dir.path(), &config, &engine(kind));
        assert_eq!(
            log.end_offset(),
            written[19].0,
            "{kind:?}/{mode:?}: the torn batch is gone"
        );
        let report = log.recovery_report();
        assert!(!report.clean);
        assert!(report.cut.is_some(), "the cut is reported");
        assert_eq!(read_all(&log).len(), 19);
        assert_eq!(
            log.append_blocking(batch(77, 1, 10, 0))
                .expect("append")
                .base_offset,
            written[19].0
        );
        assert_eq!(read_all(&log).last().map(|b| b.2), Some(77));
    }
}

/// A flipped byte in the last batch cuts exactly that batch.
#[test]
fn flipped_byte_in_tail() {
    for (kind, mode) in VARIANTS {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = LogConfig {
            segment_bytes_max: 1 << 20,
            ..small_config(mode)
        };
        let written = fill(dir.path(), &config, kind, 10);
        let tail_start: u64 = written[..9].iter().map(|(_, len)| *len as u64).sum();
        flip(&segment_path(dir.path(), 0, "log"), tail_start + 80);
        let log = open(dir.path(), &config, &engine(kind));
        assert_eq!(log.end_offset(), written[9].0);
        let (_, position, reason) = log.recovery_report().cut.clone().expect("cut reported");
        assert_eq!(position, tail_start);
        assert!(reason.contains("crc"), "reason names the crc: {reason}");
    }
}

/// A flipped byte in the middle of the unsynced region cuts the log there:
/// nothing after the first bad byte is ever served, and later segments go.
#[test]
fn flipped_byte_in_middle_cuts_everything_after() {
    for (kind, mode) in VARIANTS {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = small_config(mode);
        let written = fill(dir.path(), &config, kind, 800);
        // Forget the recovery point so every segment is scanned.
        std::fs::remove_file(dir.path().join("recovery-point"))
            .expect("recovery point exists after rolls");
        let segments_before = std::fs::read_dir(dir.path())
            .expect("dir")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "log"))
            })
            .count();
        assert!(segments_before > 3);
        let position: u64 = written[..30]
            .iter()
            .map(|(_, len)| *len as u64)
            .sum::<u64>()
            + 100;
        flip(&segment_path(dir.path(), 0, "log"), position);
        let log = open(dir.path(), &config, &engine(kind));
        let report = log.recovery_report().clone();
        assert!(
            report.segments_deleted >= segments_before - 1 - 1,
            "{kind:?}/{mode:?}: {report:?}"
        );
        let survivors = read_all(&log);
        assert_eq!(
            survivors.len(),
            30,
            "{kind:?}/{mode:?}: the log ends before the damaged batch"
        );
        for (index, (_, _, tag)) in survivors.iter().enumerate() {
            assert_eq!(*tag, index as u64, "survivors are exactly the prefix");
        }
        // Appends continue after the cut and a second recovery keeps them.
        let next = log.end_offset();
        log.append_blocking(batch(5000, 1, 10, 0)).expect("append");
        drop(log);
        let log = open(dir.path(), &config, &engine(kind));
        assert_eq!(log.end_offset(), next + 1);
        assert_eq!(read_all(&log).last().map(|b| b.2), Some(5000));
    }
}

/// Missing index files are rebuilt, after a clean shutdown and after a crash.
#[test]
fn missing_indexes_are_rebuilt() {
    for (kind, mode) in VARIANTS {
        for clean in [true, false] {
            let dir = tempfile::tempdir().expect("tempdir");
            let config = small_config(mode);
            let log = open(dir.path(), &config, &engine(kind));
            for tag in 0..300u64 {
                log.append_blocking(batch(tag, 2, 150, 10 * tag as i64))
                    .expect("append");
            }
            let expected = read_all(&log);
            let lookup = log.lookup_by_timestamp(1_505).expect("lookup");
            if clean {
                log.close().expect("close");
            }
            drop(log);
            for entry in std::fs::read_dir(dir.path()).expect("dir") {
                let path = entry.expect("entry").path();
                if path
                    .extension()
                    .is_some_and(|x| x == "index" || x == "timeindex")
                {
                    std::fs::remove_file(path).expect("remove index");
                }
            }
            let log = open(dir.path(), &config, &engine(kind));
            assert!(
                log.recovery_report().indexes_rebuilt > 0,
                "{kind:?}/{mode:?} clean={clean}"
            );
            assert_eq!(read_all(&log), expected);
            assert_eq!(log.lookup_by_timestamp(1_505).expect("lookup"), lookup);
        }
    }
}

/// A stale index (entries pointing at the wrong batches) is detected and rebuilt.
#[test]
fn stale_index_is_rebuilt() {
    for (kind, mode) in VARIANTS {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = small_config(mode);
        let log = open(dir.path(), &config, &engine(kind));
        for tag in 0..300u64 {
            log.append_blocking(batch(tag, 2, 150, tag as i64))
                .expect("append");
        }
        let expected = read_all(&log);
        log.close().expect("close");
        drop(log);
        // Shift every position in the first segment's index by 7 bytes.
        let path = segment_path(dir.path(), 0, "index");
        let mut bytes = std::fs::read(&path).expect("index");
        assert!(bytes.len() >= 16, "the index has entries");
        for entry in bytes.chunks_mut(8) {
            let position = u32::from_le_bytes(entry[4..8].try_into().expect("4")) + 7;
            entry[4..8].copy_from_slice(&position.to_le_bytes());
        }
        std::fs::write(&path, &bytes).expect("write index");
        let log = open(dir.path(), &config, &engine(kind));
        assert!(log.recovery_report().indexes_rebuilt > 0);
        assert_eq!(read_all(&log), expected, "{kind:?}/{mode:?}");
        for (base, _, _) in expected.iter().step_by(17) {
            let read = log.read(*base, 1).expect("read");
            assert_eq!(read.batches().next().map(|b| b.base_offset()), Some(*base));
        }
    }
}

/// Without the marker every unsynced segment is scanned; with it, none is.
#[test]
fn clean_marker_decides_the_scan() {
    for (kind, mode) in VARIANTS {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = small_config(mode);
        let log = open(dir.path(), &config, &engine(kind));
        for tag in 0..200u64 {
            log.append_blocking(batch(tag, 2, 150, tag as i64))
                .expect("append");
        }
        let expected = read_all(&log);
        log.close().expect("close");
        assert!(matches!(
            log.append(batch(1, 1, 1, 0)),
            Err(StorageError::Closed)
        ));
        drop(log);
        assert!(dir.path().join(CLEAN_SHUTDOWN_FILE).exists());
        let log = open(dir.path(), &config, &engine(kind));
        assert!(log.recovery_report().clean);
        assert_eq!(log.recovery_report().segments_scanned, 0);
        assert!(
            !dir.path().join(CLEAN_SHUTDOWN_FILE).exists(),
            "the marker is removed on open"
        );
        assert_eq!(read_all(&log), expected);
        drop(log);
        // Now without the marker: the active segment (past the recovery point) is scanned.
        let log = open(dir.path(), &config, &engine(kind));
        let report = log.recovery_report();
        assert!(!report.clean);
        assert!(report.segments_scanned >= 1);
        assert!(
            report.cut.is_none(),
            "{kind:?}/{mode:?}: nothing to cut in a good log: {report:?}"
        );
        assert_eq!(read_all(&log), expected);
    }
}
