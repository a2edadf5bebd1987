//! Recovery of a segment whose tail is arbitrary bytes: opening never panics,
//! the valid prefix survives, and every batch served afterwards is whole,
//! checksummed and contiguous; appends continue after the cut.
#![no_main]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use weir_protocol::BatchBuilder;
use weir_storage::{EngineConfig, EngineKind, IoEngine, Log, LogConfig, WriteMode};

fn engine() -> &'static Arc<IoEngine> {
    static ENGINE: OnceLock<Arc<IoEngine>> = OnceLock::new();
    ENGINE.get_or_init(|| {
        IoEngine::start(&EngineConfig { kind: EngineKind::Sync, ..EngineConfig::default() })
            .expect("engine starts")
    })
}

fn config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 1 << 20,
        index_interval_bytes: 256,
        write_mode: WriteMode::Buffered,
        ..LogConfig::default()
    }
}

fn batch(tag: u8) -> Vec<u8> {
    let mut builder = BatchBuilder::new(i64::from(tag));
    for index in 0..=tag % 4 {
        builder.push(i64::from(tag), Some(&[tag]), Some(&[index; 40]), &[]);
    }
    builder.finish()
}

fuzz_target!(|data: &[u8]| {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let Some((&valid, tail)) = data.split_first() else { return };
    let dir = std::env::temp_dir().join(format!(
        "weir-fuzz-recovery-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let valid = usize::from(valid % 8);
    let mut good_end = 0;
    {
        let log = Log::open(&dir, config(), engine().clone()).expect("open new log");
        for tag in 0..valid {
            good_end = log.append_blocking(batch(tag as u8)).expect("append").last_offset + 1;
        }
        // Dropped without close: the next open must scan.
    }
    let segment = dir.join(format!("{:020}.log", 0));
    let file = std::fs::OpenOptions::new().write(true).open(&segment).expect("segment");
    let data_end: u64 = (0..valid).map(|tag| batch(tag as u8).len() as u64).sum();
    std::os::unix::fs::FileExt::write_all_at(&file, tail, data_end).expect("write tail");
    drop(file);

    let log = Log::open(&dir, config(), engine().clone()).expect("recovery opens any tail");
    assert!(log.end_offset() >= good_end, "the valid prefix survives");
    let mut offset = log.start_offset();
    while offset < log.end_offset() {
        let read = log.read(offset, 1 << 16).expect("recovered data reads");
        for batch in read.batches() {
            batch.verify_crc().expect("only checksummed batches are served");
            assert_eq!(batch.base_offset(), offset, "contiguous offsets");
            offset = batch.next_offset();
        }
    }
    let appended = log.append_blocking(batch(9)).expect("append after recovery");
    assert_eq!(appended.base_offset, offset);
    drop(log);
    let _ = std::fs::remove_dir_all(&dir);
});
