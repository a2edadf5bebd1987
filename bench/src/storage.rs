//! `weir-bench storage`: raw baselines, then Weir appends from W concurrent
//! writers, then reads of the written log from the memory maps, all in one
//! run on one directory.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;
use weir_protocol::BatchBuilder;
use weir_storage::{EngineConfig, EngineKind, FlushPolicy, IoEngine, Log, LogConfig, WriteMode};

use crate::raw;

/// Arguments of `weir-bench storage`.
#[derive(Debug, clap::Args)]
pub struct StorageArgs {
    /// Seconds per phase (raw sync, raw direct, Weir appends).
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Bytes per record value.
    #[arg(long, default_value_t = 1024)]
    record_bytes: usize,
    /// Bytes per batch (records are packed up to this size; 64 KiB–1 MiB).
    #[arg(long, default_value_t = 256 * 1024)]
    batch_bytes: usize,
    /// Flush policy: always, interval (1000 ms), interval:<ms>, never.
    #[arg(long, default_value = "always")]
    flush: String,
    /// Concurrent appending threads.
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Logs (partitions) sharing the io engine; writer i appends to log i mod N.
    #[arg(long, default_value_t = 1)]
    logs: usize,
    /// io engine: auto, uring, sync.
    #[arg(long, default_value = "auto")]
    engine: String,
    /// Write mode: direct (O_DIRECT, the default) or buffered (page cache).
    #[arg(long, default_value = "direct")]
    write_mode: String,
    /// Directory for the benchmark's files (removed afterwards).
    #[arg(long, default_value = "weir-bench-data")]
    dir: PathBuf,
    /// Largest file each phase may write, in MiB.
    #[arg(long, default_value_t = 8192)]
    phase_mib_max: u64,
    /// Skip the raw baselines (for quick iterations; ratios are then absent).
    #[arg(long)]
    no_baseline: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct StorageReport {
    engine: String,
    write_mode: String,
    flush: String,
    writers: usize,
    logs: usize,
    record_bytes: usize,
    batch_bytes: usize,
    seconds: u64,
    raw_sync_mb_s: Option<f64>,
    raw_sync_fsync_p50_us: Option<u64>,
    raw_sync_fsync_p99_us: Option<u64>,
    raw_direct_mb_s: Option<f64>,
    /// O_DIRECT 1 MiB writes with an fdatasync after each.
    raw_direct_sync_mb_s: Option<f64>,
    weir_mb_s: f64,
    weir_records_s: f64,
    ratio_sync: Option<f64>,
    ratio_direct: Option<f64>,
    ratio_direct_sync: Option<f64>,
    append_p50_us: u64,
    append_p99_us: u64,
    append_p999_us: u64,
    append_max_us: u64,
    engine_rounds: u64,
    engine_plan_ms: f64,
    engine_execute_ms: f64,
    engine_syncs: u64,
    bytes_per_sync: u64,
    /// First read pass: from the device after direct writes.
    read_first_pass_mb_s: f64,
    /// Second read pass: from the page cache.
    read_mb_s: f64,
    bytes_written: u64,
}

/// Builds one batch of `record_bytes` records filling about `batch_bytes`.
fn build_batch(record_bytes: usize, batch_bytes: usize, seed: u64) -> (Vec<u8>, u64) {
    let mut builder = BatchBuilder::with_capacity(0, batch_bytes + record_bytes + 128);
    let mut value = vec![0u8; record_bytes];
    let mut state = seed | 1;
    for byte in value.iter_mut() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *byte = state as u8;
    }
    let mut records = 0u64;
    let stamp_bytes = value.len().min(8);
    while builder.len_bytes() + builder.record_bytes(0, None, Some(&value), &[]) <= batch_bytes
        || records == 0
    {
        value[..stamp_bytes].copy_from_slice(&records.to_le_bytes()[..stamp_bytes]);
        builder.push(0, None, Some(&value), &[]);
        records += 1;
    }
    (builder.finish(), records)
}

/// Runs the storage benchmark and prints its report.
///
/// # Errors
/// Bad arguments, or any I/O error of the phases.
pub fn run(args: &StorageArgs) -> anyhow::Result<()> {
    let flush = FlushPolicy::parse(&args.flush)
        .context("--flush must be always, interval, interval:<ms> or never")?;
    let kind = EngineKind::parse(&args.engine).context("--engine must be auto, uring or sync")?;
    let write_mode =
        WriteMode::parse(&args.write_mode).context("--write-mode must be direct or buffered")?;
    let phase = Duration::from_secs(args.seconds);
    let phase_bytes_max = args.phase_mib_max << 20;
    std::fs::create_dir_all(&args.dir).with_context(|| format!("create {}", args.dir.display()))?;

    let (raw_sync, raw_direct, raw_direct_sync) = if args.no_baseline {
        (None, None, None)
    } else {
        let sync = raw::buffered_sync(&args.dir.join("raw-sync"), phase, phase_bytes_max)?;
        let direct = raw::direct(&args.dir.join("raw-direct"), phase, phase_bytes_max, false)?;
        let direct_sync = raw::direct(
            &args.dir.join("raw-direct-sync"),
            phase,
            phase_bytes_max,
            true,
        )?;
        (Some(sync), Some(direct), Some(direct_sync))
    };

    let engine = IoEngine::start(&EngineConfig {
        kind,
        ..EngineConfig::default()
    })?;
    let config = LogConfig {
        flush,
        write_mode,
        batch_bytes_max: args.batch_bytes.max(1 << 20) * 2,
        ..LogConfig::default()
    };
    let mut logs = Vec::new();
    for index in 0..args.logs.max(1) {
        let log_dir = args.dir.join(format!("weir-{index}"));
        if log_dir.exists() {
            std::fs::remove_dir_all(&log_dir)?;
        }
        logs.push(Arc::new(Log::open(
            &log_dir,
            config.clone(),
            engine.clone(),
        )?));
    }

    let bytes_written = Arc::new(AtomicU64::new(0));
    let records_written = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let writers: Vec<_> = (0..args.writers.max(1))
        .map(|writer| {
            let log = logs[writer % logs.len()].clone();
            let bytes_written = bytes_written.clone();
            let records_written = records_written.clone();
            let (template, records) =
                build_batch(args.record_bytes, args.batch_bytes, writer as u64 + 1);
            std::thread::spawn(move || -> anyhow::Result<Histogram<u64>> {
                let mut latencies = Histogram::<u64>::new(3)?;
                while started.elapsed() < phase
                    && bytes_written.load(Ordering::Relaxed) < phase_bytes_max
                {
                    let batch = template.clone();
                    let append_started = Instant::now();
                    log.append_blocking(batch)?;
                    latencies.record(append_started.elapsed().as_micros() as u64)?;
                    bytes_written.fetch_add(template.len() as u64, Ordering::Relaxed);
                    records_written.fetch_add(records, Ordering::Relaxed);
                }
                Ok(latencies)
            })
        })
        .collect();
    let mut latencies = Histogram::<u64>::new(3)?;
    for writer in writers {
        let histogram = writer
            .join()
            .map_err(|_| anyhow::anyhow!("writer thread panicked"))??;
        latencies.add(histogram)?;
    }
    let append_elapsed = started.elapsed();
    let bytes = bytes_written.load(Ordering::Relaxed);
    let weir_mb_s = bytes as f64 / 1e6 / append_elapsed.as_secs_f64();

    // Read everything back (CRC checked per batch, as served): the first
    // pass from wherever the data is (the device, after direct writes), the
    // second from the page cache.
    let mut read_mb_s = Vec::new();
    for _pass in 0..2 {
        let read_started = Instant::now();
        let mut read_bytes = 0u64;
        let mut checksum = 0u64;
        for log in &logs {
            let mut offset = log.start_offset();
            while offset < log.end_offset() {
                let read = log.read(offset, 1 << 20)?;
                read_bytes += read.len() as u64;
                checksum = checksum.wrapping_add(
                    read.chunks()
                        .map(|chunk| u64::from(chunk.last().copied().unwrap_or(0)))
                        .sum::<u64>(),
                );
                offset = read.next_offset();
            }
        }
        std::hint::black_box(checksum);
        read_mb_s.push(read_bytes as f64 / 1e6 / read_started.elapsed().as_secs_f64().max(1e-9));
    }
    let stats = engine.stats();
    let syncs = stats.syncs.load(Ordering::Relaxed);
    let effective_write_mode = format!("{:?}", logs[0].write_mode()).to_lowercase();
    for log in &logs {
        log.close()?;
    }
    drop(logs);
    for index in 0..args.logs.max(1) {
        std::fs::remove_dir_all(args.dir.join(format!("weir-{index}"))).ok();
    }
    std::fs::remove_dir(&args.dir).ok();

    let report = StorageReport {
        engine: engine.kind_name().to_string(),
        write_mode: effective_write_mode,
        flush: flush.to_string(),
        writers: args.writers,
        logs: args.logs.max(1),
        record_bytes: args.record_bytes,
        batch_bytes: args.batch_bytes,
        seconds: args.seconds,
        raw_sync_mb_s: raw_sync.map(|r| r.mb_s()),
        raw_sync_fsync_p50_us: raw_sync.map(|r| r.sync_p50_us),
        raw_sync_fsync_p99_us: raw_sync.map(|r| r.sync_p99_us),
        raw_direct_mb_s: raw_direct.map(|r| r.mb_s()),
        raw_direct_sync_mb_s: raw_direct_sync.map(|r| r.mb_s()),
        weir_mb_s,
        weir_records_s: records_written.load(Ordering::Relaxed) as f64
            / append_elapsed.as_secs_f64(),
        ratio_sync: raw_sync.map(|r| weir_mb_s / r.mb_s()),
        ratio_direct: raw_direct.map(|r| weir_mb_s / r.mb_s()),
        ratio_direct_sync: raw_direct_sync.map(|r| weir_mb_s / r.mb_s()),
        append_p50_us: latencies.value_at_quantile(0.50),
        append_p99_us: latencies.value_at_quantile(0.99),
        append_p999_us: latencies.value_at_quantile(0.999),
        append_max_us: latencies.max(),
        engine_rounds: stats.rounds.load(Ordering::Relaxed),
        engine_plan_ms: stats.plan_nanos_total.load(Ordering::Relaxed) as f64 / 1e6,
        engine_execute_ms: stats.execute_nanos_total.load(Ordering::Relaxed) as f64 / 1e6,
        engine_syncs: syncs,
        bytes_per_sync: bytes.checked_div(syncs).unwrap_or(0),
        read_first_pass_mb_s: read_mb_s[0],
        read_mb_s: read_mb_s[1],
        bytes_written: bytes,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(report: &StorageReport) {
    let show = |value: Option<f64>| value.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
    let ratio = |value: Option<f64>| value.map_or_else(|| "-".to_string(), |v| format!("{v:.2}"));
    println!(
        "engine {} · {} writes · flush {} · {} logs · {} writers · {} B records in {} B batches · {} s per phase",
        report.engine,
        report.write_mode,
        report.flush,
        report.logs,
        report.writers,
        report.record_bytes,
        report.batch_bytes,
        report.seconds
    );
    println!(
        "raw pwrite+fdatasync/1MiB    {:>9} MB/s   (fdatasync p50 {} µs, p99 {} µs)",
        show(report.raw_sync_mb_s),
        report.raw_sync_fsync_p50_us.unwrap_or(0),
        report.raw_sync_fsync_p99_us.unwrap_or(0)
    );
    println!(
        "raw O_DIRECT 1MiB            {:>9} MB/s",
        show(report.raw_direct_mb_s)
    );
    println!(
        "raw O_DIRECT+fdatasync/1MiB  {:>9} MB/s",
        show(report.raw_direct_sync_mb_s)
    );
    println!(
        "weir append                  {:>9.1} MB/s   ({:.0} records/s; ×{} of raw sync, ×{} of raw direct, ×{} of raw direct+sync)",
        report.weir_mb_s,
        report.weir_records_s,
        ratio(report.ratio_sync),
        ratio(report.ratio_direct),
        ratio(report.ratio_direct_sync)
    );
    println!(
        "append latency               p50 {} µs · p99 {} µs · p99.9 {} µs · max {} µs",
        report.append_p50_us, report.append_p99_us, report.append_p999_us, report.append_max_us
    );
    println!(
        "group commit                 {} rounds · {} syncs · {} bytes per sync · engine busy {:.0} ms planning, {:.0} ms on the device",
        report.engine_rounds,
        report.engine_syncs,
        report.bytes_per_sync,
        report.engine_plan_ms,
        report.engine_execute_ms
    );
    println!(
        "weir read (mmap)             {:>9.1} MB/s from the page cache ({:.1} MB/s first pass)",
        report.read_mb_s, report.read_first_pass_mb_s
    );
}
