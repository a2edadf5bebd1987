//! Property test: random append / read / truncate / roll / retention / reopen
//! sequences agree with an in-memory model of the log, for both io engines.

mod common;

use common::{VARIANTS, batch, engine, read_all};
use proptest::prelude::*;
use weir_storage::{EngineKind, Log, LogConfig, WriteMode};

#[derive(Debug, Clone)]
enum Op {
    Append {
        count: usize,
        value_bytes: usize,
    },
    Read {
        at: prop::sample::Index,
        max_bytes: usize,
    },
    Truncate {
        at: prop::sample::Index,
    },
    Roll,
    Retention,
    Reopen {
        clean: bool,
    },
    Epoch,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (1usize..6, 0usize..3000).prop_map(|(count, value_bytes)| Op::Append { count, value_bytes }),
        3 => (any::<prop::sample::Index>(), 1usize..20_000).prop_map(|(at, max_bytes)| Op::Read { at, max_bytes }),
        1 => any::<prop::sample::Index>().prop_map(|at| Op::Truncate { at }),
        1 => Just(Op::Roll),
        1 => Just(Op::Retention),
        1 => any::<bool>().prop_map(|clean| Op::Reopen { clean }),
        1 => Just(Op::Epoch),
    ]
}

/// One batch as the model remembers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stored {
    base: u64,
    count: u64,
    tag: u64,
}

fn config(write_mode: WriteMode) -> LogConfig {
    LogConfig {
        write_mode,
        segment_bytes_max: 24 * 1024,
        index_interval_bytes: 300,
        batch_bytes_max: 16 * 1024,
        retention_bytes: Some(40 * 1024),
        ..LogConfig::default()
    }
}

fn run((kind, mode): (EngineKind, WriteMode), ops: &[Op]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(kind);
    let mut log = Log::open(dir.path(), config(mode), engine.clone()).expect("open");
    let mut model: Vec<Stored> = Vec::new();
    let mut next_offset = 0u64;
    let mut start_offset = 0u64;
    let mut epoch = 0;
    for (step, op) in ops.iter().enumerate() {
        match op {
            Op::Append { count, value_bytes } => {
                let tag = step as u64;
                let info = log
                    .append_blocking(batch(tag, *count, *value_bytes, step as i64))
                    .expect("append");
                prop_assert_eq!(info.base_offset, next_offset);
                model.push(Stored {
                    base: next_offset,
                    count: *count as u64,
                    tag,
                });
                next_offset += *count as u64;
            }
            Op::Read { at, max_bytes } => {
                if model.is_empty() {
                    continue;
                }
                let target = &model[at.index(model.len())];
                let offset = target.base + target.count / 2;
                let read = log.read(offset, *max_bytes).expect("read");
                let got: Vec<u64> = read.batches().map(|b| b.base_offset()).collect();
                prop_assert!(!got.is_empty());
                prop_assert_eq!(
                    got[0],
                    target.base,
                    "a read starts with the batch holding the offset"
                );
                let from = model
                    .iter()
                    .position(|s| s.base == target.base)
                    .expect("present");
                let expected: Vec<u64> = model[from..from + got.len()]
                    .iter()
                    .map(|s| s.base)
                    .collect();
                prop_assert_eq!(got, expected);
            }
            Op::Truncate { at } => {
                if model.is_empty() {
                    continue;
                }
                let cut = at.index(model.len());
                let offset = model[cut].base + model[cut].count.saturating_sub(1);
                log.truncate_to(offset).expect("truncate");
                // Inside a batch the whole batch goes; at its base the same.
                model.truncate(cut);
                next_offset = model.last().map_or(start_offset, |s| s.base + s.count);
            }
            Op::Roll => log.roll().expect("roll"),
            Op::Retention => {
                log.apply_retention(None).expect("retention");
                start_offset = log.start_offset();
                model.retain(|s| s.base >= start_offset);
                prop_assert!(
                    model.first().is_none_or(|s| s.base == start_offset),
                    "start is a batch boundary"
                );
            }
            Op::Reopen { clean } => {
                if *clean {
                    log.close().expect("close");
                }
                drop(log);
                log = Log::open(dir.path(), config(mode), engine.clone()).expect("reopen");
                prop_assert_eq!(log.recovery_report().clean, *clean);
                prop_assert!(
                    log.recovery_report().cut.is_none(),
                    "a healthy log is never cut: {:?}",
                    log.recovery_report()
                );
            }
            Op::Epoch => {
                epoch += 1;
                log.assign_epoch(epoch).expect("epoch");
            }
        }
        prop_assert_eq!(log.end_offset(), next_offset, "end offset after {:?}", op);
        prop_assert_eq!(log.start_offset(), start_offset);
        let stored: Vec<Stored> = read_all(&log)
            .into_iter()
            .map(|(base, count, tag)| Stored { base, count, tag })
            .collect();
        prop_assert_eq!(&stored, &model, "log and model differ after {:?}", op);
    }
    Ok(())
}

proptest! {
    // 32 cases per variant by default; PROPTEST_CASES=N runs more.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|cases| cases.parse().ok()).unwrap_or(32),
        ..ProptestConfig::default()
    })]

    /// The uring engine with direct I/O agrees with the model.
    #[test]
    fn uring_direct_log_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(VARIANTS[0], &ops)?;
    }

    /// The uring engine through the page cache agrees with the model.
    #[test]
    fn uring_buffered_log_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(VARIANTS[1], &ops)?;
    }

    /// The sync engine with direct I/O agrees with the model.
    #[test]
    fn sync_direct_log_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(VARIANTS[2], &ops)?;
    }

    /// The sync engine through the page cache agrees with the model.
    #[test]
    fn sync_buffered_log_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(VARIANTS[3], &ops)?;
    }
}
