//! Helpers shared by the storage integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use weir_protocol::BatchBuilder;
use weir_storage::{EngineConfig, EngineKind, IoEngine, Log, LogConfig, WriteMode};

/// Both io engines: every behaviour is tested on each.
pub const ENGINES: [EngineKind; 2] = [EngineKind::Uring, EngineKind::Sync];

/// Every io engine with every write mode.
pub const VARIANTS: [(EngineKind, WriteMode); 4] = [
    (EngineKind::Uring, WriteMode::Direct),
    (EngineKind::Uring, WriteMode::Buffered),
    (EngineKind::Sync, WriteMode::Direct),
    (EngineKind::Sync, WriteMode::Buffered),
];

pub fn engine(kind: EngineKind) -> Arc<IoEngine> {
    IoEngine::start(&EngineConfig {
        kind,
        ..EngineConfig::default()
    })
    .expect("io engine starts (io_uring must be available on the test machine)")
}

/// A small-segment configuration so tests exercise rolls and indexes.
pub fn small_config(write_mode: WriteMode) -> LogConfig {
    LogConfig {
        write_mode,
        segment_bytes_max: 64 * 1024,
        index_interval_bytes: 512,
        batch_bytes_max: 32 * 1024,
        ..LogConfig::default()
    }
}

pub fn open(dir: &Path, config: &LogConfig, engine: &Arc<IoEngine>) -> Log {
    Log::open(dir, config.clone(), engine.clone()).expect("log opens")
}

/// A batch of `count` records whose values encode `tag` and the record's
/// index, so content can be checked after recovery.
pub fn batch(tag: u64, count: usize, value_bytes: usize, timestamp_ms: i64) -> Vec<u8> {
    let mut builder = BatchBuilder::with_capacity(timestamp_ms, count * (value_bytes + 16) + 64);
    for index in 0..count {
        let mut value = vec![0u8; value_bytes.max(16)];
        value[..8].copy_from_slice(&tag.to_be_bytes());
        value[8..16].copy_from_slice(&(index as u64).to_be_bytes());
        let key = tag.to_be_bytes();
        builder.push(timestamp_ms, Some(&key), Some(&value), &[]);
    }
    builder.finish()
}

/// Reads every batch from `start_offset()` to `end_offset()` as
/// (base offset, record count, first value tag), checking CRCs and contiguity.
pub fn read_all(log: &Log) -> Vec<(u64, u64, u64)> {
    let mut out = Vec::new();
    let mut offset = log.start_offset();
    let end = log.end_offset();
    while offset < end {
        let read = log.read(offset, 64 * 1024).expect("read succeeds");
        assert!(read.next_offset() > offset, "a read must make progress");
        for batch in read.batches() {
            batch.verify_crc().expect("served batch has a valid crc");
            assert_eq!(batch.base_offset(), offset, "batches are contiguous");
            let first = batch
                .records()
                .expect("uncompressed")
                .next()
                .expect("a record")
                .expect("parses");
            let value = first.value.expect("value");
            let tag = u64::from_be_bytes(value[..8].try_into().expect("8 bytes"));
            out.push((batch.base_offset(), batch.records_count() as u64, tag));
            offset = batch.next_offset();
        }
        assert_eq!(offset, read.next_offset());
    }
    out
}
