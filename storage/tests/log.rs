//! Behaviour of one log on real files, for both io engines.

mod common;

use std::sync::Arc;

use common::{ENGINES, VARIANTS, batch, engine, open, read_all, small_config};
use weir_protocol::BatchError;
use weir_storage::{FlushPolicy, Log, LogConfig, StorageError, WriteMode};

/// Appends get consecutive offsets and read back whole, in order, across segment rolls.
#[test]
fn append_and_read_in_order_across_rolls() {
    for (kind, mode) in VARIANTS {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = engine(kind);
        let log = open(dir.path(), &small_config(mode), &engine);
        let mut expected = Vec::new();
        for tag in 0..200u64 {
            let count = 1 + (tag as usize % 7);
            let info = log
                .append_blocking(batch(tag, count, 400, 1_000 + tag as i64))
                .expect("append");
            assert_eq!(info.last_offset - info.base_offset + 1, count as u64);
            expected.push((info.base_offset, count as u64, tag));
        }
        assert!(
            log.segment_count() > 3,
            "{kind:?}/{mode:?}: small segments must roll"
        );
        assert_eq!(read_all(&log), expected, "{kind:?}/{mode:?}");
        assert_eq!(
            log.end_offset(),
            expected.last().map(|e| e.0 + e.1).unwrap_or(0)
        );
        // Reading from the middle of a batch returns that whole batch first.
        let (base, count, tag) = expected[50];
        let read = log.read(base + count - 1, 1).expect("read mid-batch");
        let first = read.batches().next().expect("one batch");
        assert_eq!(
            (first.base_offset(), first.records_count() as u64),
            (base, count)
        );
        assert_eq!(
            read.batches().count(),
            1,
            "max_bytes 1 still returns one whole batch"
        );
        let value = first
            .records()
            .expect("plain")
            .next()
            .expect("record")
            .expect("ok")
            .value
            .expect("value");
        assert_eq!(u64::from_be_bytes(value[..8].try_into().expect("8")), tag);
        log.close().expect("close");
    }
}

/// Reads outside [start, end] are refused with the range; a read at the end is empty.
#[test]
fn reads_out_of_range_are_typed_errors() {
    for (kind, mode) in VARIANTS {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path(), &small_config(mode), &engine(kind));
        log.append_blocking(batch(1, 3, 10, 0)).expect("append");
        assert!(log.read(3, 100).expect("at end").is_empty());
        match log.read(4, 100) {
            Err(StorageError::OffsetOutOfRange {
                offset: 4,
                start: 0,
                end: 3,
            }) => {}
            other => panic!("{kind:?}/{mode:?}: expected out of range, got {other:?}"),
        }
    }
}

/// Every kind of malformed batch is refused with a typed error and changes nothing.
#[test]
fn malformed_batches_are_refused_and_change_nothing() {
    for (kind, mode) in VARIANTS {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = small_config(mode);
        let log = open(dir.path(), &config, &engine(kind));
        log.append_blocking(batch(1, 2, 10, 0)).expect("append");
        let before = (log.end_offset(), log.size_bytes());

        let good = batch(2, 2, 10, 0);
        let mut bad_crc = good.clone();
        *bad_crc.last_mut().expect("non-empty") ^= 1;
        assert!(matches!(
            log.append(bad_crc),
            Err(StorageError::InvalidBatch(BatchError::BadCrc { .. }))
        ));
        let mut bad_magic = good.clone();
        bad_magic[16] = 0;
        assert!(matches!(
            log.append(bad_magic),
            Err(StorageError::InvalidBatch(BatchError::BadMagic(0)))
        ));
        let mut trailing = good.clone();
        trailing.extend_from_slice(&[0, 0, 0]);
        assert!(matches!(
            log.append(trailing),
            Err(StorageError::InvalidBatch(_))
        ));
        assert!(matches!(
            log.append(good[..good.len() - 5].to_vec()),
            Err(StorageError::InvalidBatch(BatchError::Truncated { .. }))
        ));
        let mut zero_records = good.clone();
        zero_records[57..61].copy_from_slice(&0i32.to_be_bytes());
        let crc = crc32c::crc32c(&zero_records[21..]);
        zero_records[17..21].copy_from_slice(&crc.to_be_bytes());
        assert!(matches!(
            log.append(zero_records),
            Err(StorageError::InvalidBatch(BatchError::NoRecords(0)))
        ));
        let huge = batch(3, 1, config.batch_bytes_max + 1, 0);
        assert!(matches!(
            log.append(huge),
            Err(StorageError::BatchTooLarge { .. })
        ));
        assert!(matches!(
            log.append(Vec::new()),
            Err(StorageError::InvalidBatch(_))
        ));

        assert_eq!(
            (log.end_offset(), log.size_bytes()),
            before,
            "{kind:?}/{mode:?}: nothing changed"
        );
        assert_eq!(read_all(&log).len(), 1);
        // And the log still takes good batches.
        assert_eq!(log.append_blocking(good).expect("append").base_offset, 2);
    }
}

/// Truncation removes whole batches from the cut on, inside a segment, at a
/// segment boundary and below everything; appends continue from the new end.
#[test]
fn truncate_to_cuts_whole_batches() {
    for (kind, mode) in VARIANTS {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = small_config(mode);
        let engine = engine(kind);
        let log = open(dir.path(), &config, &engine);
        let mut bases = Vec::new();
        for tag in 0..120u64 {
            bases.push(
                log.append_blocking(batch(tag, 3, 200, tag as i64))
                    .expect("append")
                    .base_offset,
            );
        }
        let segments_before = log.segment_count();
        // Inside a batch: the whole batch goes.
        log.truncate_to(bases[100] + 1).expect("truncate");
        assert_eq!(log.end_offset(), bases[100]);
        assert_eq!(read_all(&log).len(), 100);
        // Far back, across segments.
        log.truncate_to(bases[10]).expect("truncate");
        assert_eq!(log.end_offset(), bases[10]);
        assert!(log.segment_count() < segments_before);
        assert_eq!(
            read_all(&log).iter().map(|b| b.2).collect::<Vec<_>>(),
            (0..10).collect::<Vec<_>>()
        );
        // Appends continue from the cut, and the data survives a reopen.
        let info = log.append_blocking(batch(999, 2, 10, 5)).expect("append");
        assert_eq!(info.base_offset, bases[10]);
        drop(log);
        let log = open(dir.path(), &config, &engine);
        let tags: Vec<u64> = read_all(&log).iter().map(|b| b.2).collect();
        assert_eq!(tags.len(), 11);
        assert_eq!(tags[10], 999, "{kind:?}/{mode:?}");
        // Below the start: the log becomes empty at that offset.
        log.truncate_to(0).expect("truncate");
        assert_eq!((log.start_offset(), log.end_offset()), (0, 0));
        assert_eq!(
            log.append_blocking(batch(5, 1, 10, 0))
                .expect("append")
                .base_offset,
            0
        );
    }
}

/// Truncating exactly at a segment's base removes that segment and makes the previous one active.
#[test]
fn truncate_at_segment_boundary() {
    for (kind, mode) in VARIANTS {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path(), &small_config(mode), &engine(kind));
        log.append_blocking(batch(1, 5, 100, 0)).expect("append");
        log.roll().expect("roll");
        let second = log.append_blocking(batch(2, 5, 100, 0)).expect("append");
        assert_eq!(log.segment_count(), 2);
        log.truncate_to(second.base_offset).expect("truncate");
        assert_eq!(log.segment_count(), 1);
        assert_eq!(log.end_offset(), 5);
        let third = log.append_blocking(batch(3, 1, 100, 0)).expect("append");
        assert_eq!(third.base_offset, 5);
        assert_eq!(
            read_all(&log).iter().map(|b| b.2).collect::<Vec<_>>(),
            vec![1, 3]
        );
    }
}

/// Retention by size and by age deletes whole sealed segments, oldest first, never the active one.
#[test]
fn retention_by_size_and_age() {
    for (kind, mode) in VARIANTS {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = LogConfig {
            retention_bytes: Some(100 * 1024),
            retention_ms: Some(60_000),
            ..small_config(mode)
        };
        let log = open(dir.path(), &config, &engine(kind));
        for tag in 0..400u64 {
            log.append_blocking(batch(tag, 2, 500, 1_000_000 + tag as i64))
                .expect("append");
        }
        let before = log.size_bytes();
        assert!(before > 200 * 1024);
        let outcome = log.apply_retention(Some(1_000_000)).expect("retention");
        assert!(outcome.segments_deleted > 0);
        assert!(
            log.size_bytes() >= 100 * 1024,
            "{kind:?}/{mode:?}: size retention keeps at least the limit"
        );
        assert!(
            log.size_bytes() < 100 * 1024 + 64 * 1024,
            "{kind:?}/{mode:?}: and no more than a segment over it"
        );
        assert!(log.start_offset() > 0);
        assert!(matches!(
            log.read(0, 10),
            Err(StorageError::OffsetOutOfRange { .. })
        ));
        let remaining = read_all(&log);
        assert_eq!(remaining.first().map(|b| b.0), Some(log.start_offset()));
        // Age: every record is far older than the limit at this "now".
        log.apply_retention(Some(10_000_000)).expect("retention");
        assert_eq!(log.segment_count(), 1, "only the active segment is left");
        assert_eq!(read_all(&log).last().map(|b| b.2), Some(399));
    }
}

/// Deleting before an offset removes exactly the sealed segments that lie
/// wholly below it, oldest first, never one holding that offset or the
/// active one, and survives a reopen.
#[test]
fn segments_deleted_before_an_offset() {
    for (kind, mode) in VARIANTS {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = small_config(mode);
        let log = open(dir.path(), &config, &engine(kind));
        let mut bases = Vec::new();
        for tag in 0..4u64 {
            bases.push(
                log.append_blocking(batch(tag, 5, 100, 0))
                    .expect("append")
                    .base_offset,
            );
            log.roll().expect("roll");
        }
        // Segments hold [0, 5), [5, 10), [10, 15), [15, 20), then the active one.
        assert_eq!(bases, vec![0, 5, 10, 15]);
        let outcome = log.delete_segments_before(10).expect("delete");
        assert_eq!(
            outcome.segments_deleted, 2,
            "{kind:?}/{mode:?}: up to 10 exactly"
        );
        assert_eq!(log.start_offset(), 10);
        let outcome = log.delete_segments_before(12).expect("delete");
        assert_eq!(outcome.segments_deleted, 0, "the segment holding 12 stays");
        assert_eq!(log.start_offset(), 10);
        assert!(matches!(
            log.read(9, 10),
            Err(StorageError::OffsetOutOfRange { .. })
        ));
        assert_eq!(
            read_all(&log).iter().map(|b| b.2).collect::<Vec<_>>(),
            vec![2, 3]
        );
        let outcome = log.delete_segments_before(u64::MAX).expect("delete");
        assert_eq!(outcome.segments_deleted, 2);
        assert_eq!(log.segment_count(), 1, "only the active segment is left");
        assert_eq!(log.start_offset(), 20);
        drop(log);
        let log = open(dir.path(), &config, &engine(kind));
        assert_eq!(log.start_offset(), 20, "{kind:?}/{mode:?}: after reopening");
        assert_eq!(log.end_offset(), 20);
    }
}

/// A segment older than `segment_age_ms_max` rolls on the next append.
#[test]
fn segment_rolls_by_age() {
    for (kind, mode) in VARIANTS {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = LogConfig {
            segment_age_ms_max: 0,
            ..small_config(mode)
        };
        let log = open(dir.path(), &config, &engine(kind));
        for tag in 0..3 {
            log.append_blocking(batch(tag, 1, 10, 0)).expect("append");
        }
        assert_eq!(
            log.segment_count(),
            3,
            "{kind:?}/{mode:?}: each append after the first rolls"
        );
    }
}

/// Time lookups return the first record at or after the timestamp, across segments.
#[test]
fn lookup_by_timestamp_finds_first_record_at_or_after() {
    for (kind, mode) in VARIANTS {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path(), &small_config(mode), &engine(kind));
        let mut bases = Vec::new();
        for tag in 0..300u64 {
            bases.push(
                log.append_blocking(batch(tag, 2, 100, 10 * tag as i64))
                    .expect("append")
                    .base_offset,
            );
        }
        assert_eq!(log.lookup_by_timestamp(i64::MIN).expect("lookup"), Some(0));
        assert_eq!(log.lookup_by_timestamp(0).expect("lookup"), Some(0));
        assert_eq!(
            log.lookup_by_timestamp(1_000).expect("lookup"),
            Some(bases[100])
        );
        assert_eq!(
            log.lookup_by_timestamp(1_001).expect("lookup"),
            Some(bases[101])
        );
        assert_eq!(
            log.lookup_by_timestamp(2_990).expect("lookup"),
            Some(bases[299])
        );
        assert_eq!(log.lookup_by_timestamp(2_991).expect("lookup"), None);
        // And after a clean reopen, from the persisted time indexes.
        log.close().expect("close");
        drop(log);
        let log = open(dir.path(), &small_config(mode), &engine(kind));
        assert_eq!(
            log.lookup_by_timestamp(1_500).expect("lookup"),
            Some(bases[150])
        );
    }
}

/// Leader epochs are stamped on appended batches and survive reopen and truncation.
#[test]
fn leader_epochs_are_stamped_and_checkpointed() {
    for (kind, mode) in VARIANTS {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = engine(kind);
        let log = open(dir.path(), &small_config(mode), &engine);
        log.assign_epoch(1).expect("epoch");
        log.append_blocking(batch(1, 4, 10, 0)).expect("append");
        log.assign_epoch(3).expect("epoch");
        log.append_blocking(batch(2, 4, 10, 0)).expect("append");
        let read = log.read(4, 1000).expect("read");
        assert_eq!(
            read.batches()
                .next()
                .expect("batch")
                .partition_leader_epoch(),
            3
        );
        let epochs = log.epochs();
        assert_eq!(epochs.end_offset_for(1, log.end_offset()), Some((1, 4)));
        assert_eq!(epochs.end_offset_for(2, log.end_offset()), Some((1, 4)));
        assert_eq!(epochs.end_offset_for(3, log.end_offset()), Some((3, 8)));
        drop(log);
        let log = open(dir.path(), &small_config(mode), &engine);
        assert_eq!(log.epochs().entries().len(), 2);
        log.truncate_to(4).expect("truncate");
        assert_eq!(
            log.epochs().entries().len(),
            1,
            "epoch 3 started at the cut"
        );
    }
}

/// A replica append must continue the log exactly, keeps the leader's
/// epoch, and teaches the log's epoch cache the leader's epochs.
#[test]
fn replica_appends_keep_offsets_and_epoch() {
    for (kind, mode) in VARIANTS {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path(), &small_config(mode), &engine(kind));
        let mut replicated = batch(1, 3, 10, 0);
        weir_protocol::batch::patch_base_offset(&mut replicated, 5);
        assert!(matches!(
            log.append_replica(replicated.clone()),
            Err(StorageError::UnexpectedOffset {
                expected: 0,
                got: 5
            })
        ));
        weir_protocol::batch::patch_base_offset(&mut replicated, 0);
        weir_protocol::batch::patch_leader_epoch(&mut replicated, 7);
        log.append_replica(replicated)
            .expect("append")
            .wait()
            .expect("durable");
        let read = log.read(0, 100).expect("read");
        assert_eq!(
            read.batches()
                .next()
                .expect("batch")
                .partition_leader_epoch(),
            7
        );
        // The epoch cache learns the leader's epochs from the copies, and
        // keeps them across a reopen; an older epoch adds nothing.
        let mut next = batch(2, 2, 10, 0);
        weir_protocol::batch::patch_base_offset(&mut next, 3);
        weir_protocol::batch::patch_leader_epoch(&mut next, 9);
        log.append_replica(next)
            .expect("append")
            .wait()
            .expect("durable");
        let mut older = batch(3, 1, 10, 0);
        weir_protocol::batch::patch_base_offset(&mut older, 5);
        weir_protocol::batch::patch_leader_epoch(&mut older, 8);
        log.append_replica(older)
            .expect("append")
            .wait()
            .expect("durable");
        let entries = |log: &Log| {
            log.epochs()
                .entries()
                .iter()
                .map(|entry| (entry.epoch, entry.start_offset))
                .collect::<Vec<_>>()
        };
        assert_eq!(entries(&log), vec![(7, 0), (9, 3)]);
        assert_eq!(
            log.epochs().end_offset_for(8, log.end_offset()),
            Some((7, 3))
        );
        drop(log);
        let log = open(dir.path(), &small_config(mode), &engine(kind));
        assert_eq!(entries(&log), vec![(7, 0), (9, 3)]);
        log.truncate_to(3).expect("truncate");
        assert_eq!(entries(&log), vec![(7, 0)]);
    }
}

/// Many threads append and read concurrently: each append's offsets are
/// unique and every read sees only whole, valid, contiguous batches.
#[test]
fn concurrent_appenders_and_readers() {
    for (kind, mode) in VARIANTS {
        for flush in [
            FlushPolicy::Always,
            FlushPolicy::IntervalMs(5),
            FlushPolicy::Never,
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            let config = LogConfig {
                flush,
                ..small_config(mode)
            };
            let log = Arc::new(open(dir.path(), &config, &engine(kind)));
            let writers: Vec<_> = (0..8u64)
                .map(|writer| {
                    let log = log.clone();
                    std::thread::spawn(move || {
                        (0..40u64)
                            .map(|seq| {
                                let tag = writer << 32 | seq;
                                let info =
                                    log.append_blocking(batch(tag, 3, 300, 0)).expect("append");
                                (info.base_offset, tag)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            let reader = {
                let log = log.clone();
                std::thread::spawn(move || {
                    let mut reads = 0;
                    while log.end_offset() < 8 * 40 * 3 {
                        read_all(&log);
                        reads += 1;
                    }
                    reads
                })
            };
            let mut acked: Vec<(u64, u64)> = writers
                .into_iter()
                .flat_map(|w| w.join().expect("writer"))
                .collect();
            reader.join().expect("reader never saw a bad batch");
            acked.sort_unstable();
            let stored: Vec<(u64, u64)> = read_all(&log).iter().map(|b| (b.0, b.2)).collect();
            assert_eq!(
                stored, acked,
                "{kind:?}/{mode:?} {flush}: the log holds exactly the acked batches"
            );
            log.flush().expect("flush");
        }
    }
}

/// A batch corrupted in the middle of a sealed segment is reported on read, never served.
#[test]
fn corruption_in_sealed_segment_is_detected_on_read() {
    for (kind, mode) in VARIANTS {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path(), &small_config(mode), &engine(kind));
        let mut bases = Vec::new();
        for tag in 0..100u64 {
            bases.push(
                log.append_blocking(batch(tag, 2, 300, 0))
                    .expect("append")
                    .base_offset,
            );
        }
        assert!(log.segment_count() > 1);
        let first_segment = dir.path().join(format!("{:020}.log", 0));
        let mut bytes = std::fs::read(&first_segment).expect("read segment");
        let target = 3 * (bytes.len() / (bases.len() / log.segment_count()).max(1)) / 2;
        // Flip a value byte in the batch around `target`.
        bytes[target] ^= 0xff;
        std::fs::write(&first_segment, &bytes).expect("write segment");
        // Reopen, so that nothing is served from memory that predates the damage.
        drop(log);
        let log = open(dir.path(), &small_config(mode), &engine(kind));
        let mut errors = 0;
        let mut offset = 0;
        while offset < log.end_offset() {
            match log.read(offset, 1) {
                Ok(read) => offset = read.next_offset(),
                Err(StorageError::Corrupt { .. }) => {
                    errors += 1;
                    offset += 2;
                }
                Err(other) => panic!("unexpected error {other}"),
            }
        }
        assert_eq!(
            errors, 1,
            "{kind:?}/{mode:?}: exactly the damaged batch is refused"
        );
    }
}

/// A batch whose record count its bytes cannot hold, or that exceeds
/// `batch_records_max`, is refused: it would burn offsets.
#[test]
fn implausible_record_counts_are_refused() {
    for (kind, mode) in VARIANTS {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = LogConfig {
            batch_records_max: 10,
            ..small_config(mode)
        };
        let log = open(dir.path(), &config, &engine(kind));
        let mut lying = batch(1, 1, 10, 0);
        let claimed = i32::MAX;
        lying[23..27].copy_from_slice(&(claimed - 1).to_be_bytes());
        lying[57..61].copy_from_slice(&claimed.to_be_bytes());
        let crc = crc32c::crc32c(&lying[21..]);
        lying[17..21].copy_from_slice(&crc.to_be_bytes());
        assert!(matches!(
            log.append(lying),
            Err(StorageError::InvalidBatch(
                BatchError::TooManyRecords { .. }
            ))
        ));
        assert!(matches!(
            log.append(batch(2, 11, 1, 0)),
            Err(StorageError::InvalidBatch(BatchError::TooManyRecords {
                count: 11,
                limit: 10
            }))
        ));
        assert_eq!(
            log.end_offset(),
            0,
            "{kind:?}/{mode:?}: nothing was written"
        );
        assert_eq!(
            log.append_blocking(batch(3, 10, 1, 0))
                .expect("at the limit")
                .last_offset,
            9
        );
    }
}

/// A directory is written by one open log at a time.
#[test]
fn a_log_directory_opens_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(ENGINES[0]);
    let config = small_config(WriteMode::Direct);
    let log = open(dir.path(), &config, &engine);
    assert!(matches!(
        Log::open(dir.path(), config.clone(), engine.clone()),
        Err(StorageError::Locked { .. })
    ));
    drop(log);
    let reopened = open(dir.path(), &config, &engine);
    assert!(reopened.append_blocking(batch(1, 1, 1, 0)).is_ok());
}

/// A follower left behind its leader's log start empties its log and
/// starts again past its old end: the old records are gone, replica
/// appends continue at the new start, the epoch cache keeps no more below
/// it than retention would, and all of it holds across a reopen.
#[test]
fn truncate_fully_and_start_at_begins_past_the_old_end() {
    for (kind, mode) in VARIANTS {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = small_config(mode);
        let engine = engine(kind);
        let log = open(dir.path(), &config, &engine);
        let mut first = batch(1, 5, 10, 0);
        weir_protocol::batch::patch_leader_epoch(&mut first, 2);
        log.append_replica(first)
            .expect("append")
            .wait()
            .expect("durable");
        log.truncate_fully_and_start_at(1_000).expect("start over");
        assert_eq!((log.start_offset(), log.end_offset()), (1_000, 1_000));
        // At most the epoch in force at the new start reaches below it, as
        // after retention.
        assert!(
            log.epochs()
                .entries()
                .iter()
                .filter(|entry| entry.start_offset < 1_000)
                .count()
                <= 1,
            "{:?}",
            log.epochs().entries()
        );
        let mut next = batch(2, 3, 10, 0);
        weir_protocol::batch::patch_base_offset(&mut next, 1_000);
        weir_protocol::batch::patch_leader_epoch(&mut next, 4);
        log.append_replica(next)
            .expect("append")
            .wait()
            .expect("durable");
        drop(log);
        let log = open(dir.path(), &config, &engine);
        assert_eq!(
            (log.start_offset(), log.end_offset()),
            (1_000, 1_003),
            "{kind:?}/{mode:?}"
        );
        let tags: Vec<u64> = read_all(&log).iter().map(|b| b.2).collect();
        assert_eq!(tags, vec![2]);
        assert_eq!(log.epochs().latest().map(|entry| entry.epoch), Some(4));
    }
}
