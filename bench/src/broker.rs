//! Workloads against a broker (`produce`, `consume`, `e2e`) and the
//! `baseline` of the hardware they run on (disk, loopback TCP, fsync).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use serde::Serialize;
use weir_client::{
    Acks, Admin, Compression, Consumer, ConsumerConfig, Offset, Producer, ProducerConfig,
    ProducerRecord,
};

use crate::raw;

/// Arguments shared by `produce`, `consume` and `e2e`.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkloadArgs {
    /// Broker to use (ignored with --spawn-broker).
    #[arg(long, default_value = "127.0.0.1:9092")]
    broker: String,
    /// Start a broker of our own (release build next to this binary) on a
    /// free port with a temporary data directory.
    #[arg(long)]
    spawn_broker: bool,
    /// Start a cluster of this many brokers of our own (1, 3 or 5, every
    /// one a controller voter, `flush = always`) on free ports, with a
    /// temporary data directory each, and bootstrap from all of them.
    #[arg(long)]
    spawn_cluster: Option<usize>,
    /// Replicas of each partition of the benchmark topic (0: the broker's
    /// default, min(3, brokers)).
    #[arg(long, default_value_t = 0)]
    replication_factor: u16,
    /// The broker's admin HTTP address, to read its own produce latency
    /// histogram after the run (known by itself with --spawn-broker).
    #[arg(long)]
    admin: Option<String>,
    /// Producer clients.
    #[arg(long, default_value_t = 1)]
    producers: usize,
    /// Consumer clients (e2e and consume).
    #[arg(long, default_value_t = 1)]
    consumers: usize,
    /// Partitions of the benchmark topic.
    #[arg(long, default_value_t = 1)]
    partitions: u32,
    /// Bytes per record value.
    #[arg(long, default_value_t = 1024)]
    record_bytes: usize,
    /// Producer batch size.
    #[arg(long, default_value_t = 256 * 1024)]
    batch_bytes: usize,
    /// 0, 1 or all.
    #[arg(long, default_value = "1")]
    acks: String,
    /// none, gzip, snappy, lz4 or zstd.
    #[arg(long, default_value = "none")]
    compression: String,
    /// Producer batches in flight per partition (the producer's default;
    /// at most 5 while idempotent).
    #[arg(long, default_value_t = 5)]
    in_flight: usize,
    /// Turn the producer's idempotence (on by default) off.
    #[arg(long)]
    no_idempotence: bool,
    /// Records per second over all producers (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Seconds of load.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// How consumers read: `batch` (`Consumer::next_batch`, records
    /// borrowed from the pushed bytes) or `record` (`Consumer::next`, one
    /// owned record at a time).
    #[arg(long, default_value = "batch")]
    consumer_api: String,
    /// `consume`: read everything produced this many times. Direct writes
    /// leave nothing in the page cache, so the first pass reads the device
    /// and later ones read memory.
    #[arg(long, default_value_t = 1)]
    passes: u32,
    /// Producer linger, milliseconds.
    #[arg(long, default_value_t = 2)]
    linger_ms: u64,
    /// Consumer credit per partition, bytes (default: the client's).
    #[arg(long)]
    credit_bytes: Option<u32>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Default, Serialize)]
struct WorkloadReport {
    workload: String,
    /// Brokers serving the benchmark topic.
    brokers: usize,
    /// Replicas of each of its partitions.
    replication_factor: u16,
    producers: usize,
    consumers: usize,
    partitions: u32,
    record_bytes: usize,
    batch_bytes: usize,
    in_flight: usize,
    idempotent: bool,
    acks: String,
    compression: String,
    consumer_api: String,
    linger_ms: u64,
    seconds: f64,
    records: u64,
    mb_s: f64,
    records_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    /// The broker's own produce latency (request read → response queued),
    /// from its histogram: the upper bound of the bucket holding the quantile.
    broker_produce_p50_ms: Option<f64>,
    /// See `broker_produce_p50_ms`.
    broker_produce_p99_ms: Option<f64>,
    /// See `broker_produce_p50_ms`.
    broker_produce_p999_ms: Option<f64>,
    consume_mb_s: Option<f64>,
    /// MB/s of each consume pass, first (from the device) to last.
    consume_passes_mb_s: Vec<f64>,
    e2e_p50_ms: Option<f64>,
    e2e_p99_ms: Option<f64>,
    e2e_p999_ms: Option<f64>,
}

impl WorkloadReport {
    /// Fills in what the produce phase measured.
    fn record_produce(
        &mut self,
        records: u64,
        bytes: u64,
        latencies: &Histogram<u64>,
        elapsed: f64,
    ) {
        self.records = records;
        self.seconds = elapsed;
        self.mb_s = bytes as f64 / 1e6 / elapsed;
        self.records_s = records as f64 / elapsed;
        self.p50_ms = percentile_ms(latencies, 0.5);
        self.p99_ms = percentile_ms(latencies, 0.99);
        self.p999_ms = percentile_ms(latencies, 0.999);
        self.max_ms = latencies.max() as f64 / 1_000.0;
    }
}

/// A broker started for the benchmark: the process (killed on drop) and its
/// data directory (removed on drop).
struct SpawnedBroker {
    process: weir_testkit::BrokerProcess,
    _dir: TempDir,
}

/// A directory removed on drop.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A cluster started for the benchmark: the processes (killed on drop) and
/// their data directories (removed on drop).
struct SpawnedCluster {
    _cluster: weir_testkit::Cluster,
    _dir: TempDir,
}

fn spawn_cluster(brokers: usize) -> anyhow::Result<(SpawnedCluster, String)> {
    if !(1..=5).contains(&brokers) || brokers.is_multiple_of(2) {
        bail!("--spawn-cluster must be 1, 3 or 5 (every broker is a controller voter)");
    }
    let binary = broker_binary()?;
    let dir = std::env::current_dir()?.join(format!("weir-bench-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let cluster = weir_testkit::Cluster::start_binary(&binary, brokers, &dir, &[]);
    let bootstrap = cluster.bootstrap();
    Ok((
        SpawnedCluster {
            _cluster: cluster,
            _dir: TempDir(dir),
        },
        bootstrap,
    ))
}

/// `weir-broker` next to this binary.
fn broker_binary() -> anyhow::Result<std::path::PathBuf> {
    let binary = std::env::current_exe()?
        .parent()
        .map(|dir| dir.join("weir-broker"))
        .context("binary directory")?;
    if !binary.exists() {
        bail!(
            "{} not found: cargo build --release -p weir-broker",
            binary.display()
        );
    }
    Ok(binary)
}

/// Creates the benchmark topic once the cluster takes writes (a cluster
/// just started elects its controller first), and waits until every
/// partition has a leader with all its replicas in sync.
async fn create_bench_topic(addr: &str, topic: &str, args: &WorkloadArgs) -> anyhow::Result<u16> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let admin = Admin::connect(addr).await?;
    loop {
        match admin
            .create_topic_replicated(topic, args.partitions, args.replication_factor)
            .await
        {
            Ok(()) => break,
            Err(error) if Instant::now() < deadline => {
                tracing::debug!(%error, "cluster not writable yet");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => return Err(error.into()),
        }
    }
    loop {
        let metadata = admin.metadata(Some(vec![topic.to_string()])).await?;
        let partitions = metadata
            .topics
            .first()
            .map(|topic| topic.partitions.clone())
            .unwrap_or_default();
        let replicas = partitions
            .first()
            .map_or(0, |partition| partition.replicas.len());
        let ready = partitions.len() == args.partitions as usize
            && partitions.iter().all(|partition| {
                partition.leader >= 0
                    && partition.in_sync_replicas.len() == partition.replicas.len()
            });
        if ready {
            return Ok(u16::try_from(replicas).unwrap_or(u16::MAX));
        }
        if Instant::now() >= deadline {
            bail!("{topic}: not every partition led with all replicas in sync within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn spawn_broker() -> anyhow::Result<(SpawnedBroker, String)> {
    let binary = broker_binary()?;
    let dir = std::env::current_dir()?.join(format!("weir-bench-broker-{}", std::process::id()));
    let process = weir_testkit::BrokerProcess::start_binary(&binary, &dir, &[]);
    let addr = process.addr.to_string();
    Ok((
        SpawnedBroker {
            process,
            _dir: TempDir(dir),
        },
        addr,
    ))
}

/// Deliveries handed to a producer's reaper at a time.
const REAP_CHUNK_RECORDS: usize = 256;
/// Chunks queued for a reaper: more records than a producer's buffer holds.
const REAP_QUEUE_CHUNKS: usize = 1024;
/// Answered records timed with one reading of the clock, at most.
const REAP_CLOCK_REUSE_MAX: usize = 64;

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as u64)
}

fn percentile_ms(histogram: &Histogram<u64>, quantile: f64) -> f64 {
    histogram.value_at_quantile(quantile) as f64 / 1_000.0
}

fn parse_acks(acks: &str) -> anyhow::Result<Acks> {
    Ok(match acks {
        "0" => Acks::None,
        "1" => Acks::Leader,
        "all" | "-1" => Acks::All,
        other => bail!("--acks must be 0, 1 or all, not {other}"),
    })
}

fn parse_compression(compression: &str) -> anyhow::Result<Compression> {
    Ok(match compression {
        "none" => Compression::None,
        "gzip" => Compression::Gzip,
        "snappy" => Compression::Snappy,
        "lz4" => Compression::Lz4,
        "zstd" => Compression::Zstd,
        other => bail!("--compression must be none, gzip, snappy, lz4 or zstd, not {other}"),
    })
}

/// Produces for `seconds`; returns (records, bytes, ack latency histogram in µs).
async fn produce_phase(
    addr: &str,
    topic: &str,
    args: &WorkloadArgs,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<(u64, u64, Histogram<u64>)> {
    let acks = parse_acks(&args.acks)?;
    let compression = parse_compression(&args.compression)?;
    let records = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let per_producer_rate = args.rate / args.producers.max(1) as u64;
    for producer_index in 0..args.producers.max(1) {
        let producer = Producer::connect(
            addr,
            ProducerConfig {
                acks,
                compression,
                batch_bytes: args.batch_bytes,
                linger_ms: args.linger_ms,
                in_flight_per_partition: Some(args.in_flight.max(1)),
                idempotent: !args.no_idempotence,
                ..ProducerConfig::default()
            },
        )
        .await?;
        let stop = stop.clone();
        let records = records.clone();
        let topic = topic.to_string();
        let record_bytes = args.record_bytes.max(16);
        // Deliveries are awaited by a task of their own, in send order, so
        // that each ack is timed when it arrives, not when the sender next
        // looks (at low rates that would add the gap between sends).
        // They travel in chunks, so that a reaper that has caught up is not
        // woken once per record.
        let (reap_queue, mut to_reap) = tokio::sync::mpsc::channel::<
            Vec<(u64, weir_client::DeliveryFuture)>,
        >(REAP_QUEUE_CHUNKS);
        let reaper = {
            let records = records.clone();
            tokio::spawn(async move {
                let mut latencies = Histogram::<u64>::new(3)?;
                while let Some(chunk) = to_reap.recv().await {
                    let count = chunk.len() as u64;
                    // Records of a chunk found already answered share a
                    // reading of the clock (renewed every
                    // REAP_CLOCK_REUSE_MAX of them); every reading is
                    // later than the chunk's sends.
                    let (mut now_ns, mut reused) = (0u64, usize::MAX);
                    for (sent_at_ns, delivery) in chunk {
                        match delivery.try_delivery() {
                            Some(result) => {
                                result?;
                                if reused >= REAP_CLOCK_REUSE_MAX {
                                    (now_ns, reused) = (now_nanos(), 0);
                                }
                                reused += 1;
                            }
                            None => {
                                delivery.await?;
                                (now_ns, reused) = (now_nanos(), 1);
                            }
                        }
                        latencies.record(now_ns.saturating_sub(sent_at_ns) / 1_000)?;
                    }
                    records.fetch_add(count, Ordering::Relaxed);
                }
                anyhow::Ok(latencies)
            })
        };
        tasks.push(tokio::spawn(async move {
            let mut value = vec![0u8; record_bytes];
            let started = Instant::now();
            let mut sent = 0u64;
            let mut chunk = Vec::with_capacity(REAP_CHUNK_RECORDS);
            while !stop.load(Ordering::Relaxed) {
                // One clock read per record: the value's send time (for
                // end-to-end latency), the ack latency's start, and the
                // record's timestamp.
                let sent_at_ns = now_nanos();
                value[..8].copy_from_slice(&sent_at_ns.to_le_bytes());
                value[8..16].copy_from_slice(&(producer_index as u64).to_le_bytes());
                let record = ProducerRecord::new(Bytes::copy_from_slice(&value))
                    .timestamp_ms((sent_at_ns / 1_000_000) as i64);
                let delivery = producer.send(&topic, record).await?;
                chunk.push((sent_at_ns, delivery));
                sent += 1;
                let due = (per_producer_rate > 0).then(|| {
                    started + Duration::from_secs_f64(sent as f64 / per_producer_rate as f64)
                });
                let pausing = due.is_some_and(|due| due > Instant::now());
                if (chunk.len() >= REAP_CHUNK_RECORDS || pausing)
                    && reap_queue
                        .send(std::mem::replace(
                            &mut chunk,
                            Vec::with_capacity(REAP_CHUNK_RECORDS),
                        ))
                        .await
                        .is_err()
                {
                    break;
                }
                if let Some(due) = due {
                    tokio::time::sleep_until(due.into()).await;
                }
            }
            if !chunk.is_empty() {
                let _ = reap_queue.send(chunk).await;
            }
            producer.flush().await?;
            drop(reap_queue);
            reaper.await?
        }));
    }
    let mut latencies = Histogram::<u64>::new(3)?;
    for task in tasks {
        latencies.add(task.await??)?;
    }
    let count = records.load(Ordering::Relaxed);
    Ok((count, count * args.record_bytes as u64, latencies))
}

/// Consumes every partition from earliest until `expected` records or `stop`;
/// returns (records, bytes, e2e latency histogram in µs: empty when
/// `expected` is set, since a replay pass has none worth timing).
async fn consume_phase(
    addr: &str,
    topic: &str,
    args: &WorkloadArgs,
    expected: Option<u64>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<(u64, u64, Histogram<u64>)> {
    let consumers = args.consumers.max(1);
    let mut tasks = Vec::new();
    let total = Arc::new(AtomicU64::new(0));
    for consumer_index in 0..consumers {
        let defaults = ConsumerConfig::default();
        let config = ConsumerConfig {
            credit_bytes: args.credit_bytes.unwrap_or(defaults.credit_bytes),
            ..defaults
        };
        let mut consumer = Consumer::connect(addr, config).await?;
        for partition in (0..args.partitions)
            .filter(|partition| *partition as usize % consumers == consumer_index)
        {
            consumer.assign(topic, partition, Offset::Earliest).await?;
        }
        let stop = stop.clone();
        let total = total.clone();
        let consumer_api = args.consumer_api.clone();
        if consumer_api != "batch" && consumer_api != "record" {
            bail!("--consumer-api must be batch or record, not {consumer_api}");
        }
        tasks.push(tokio::spawn(async move {
            let mut latencies = Histogram::<u64>::new(3)?;
            let mut bytes = 0u64;
            let batches = consumer_api == "batch";
            // A replay pass (`expected` set) reads records produced long
            // before: their end-to-end latency means nothing, and reading
            // the clock for each of millions of records would be a
            // noticeable share of the consumer's time.
            let timed = expected.is_none();
            let mut note = |value: Option<&[u8]>| -> anyhow::Result<()> {
                if let Some(value) = value {
                    bytes += value.len() as u64;
                    if timed && value.len() >= 8 {
                        let sent = u64::from_le_bytes(value[..8].try_into()?);
                        latencies.record(now_nanos().saturating_sub(sent) / 1_000)?;
                    }
                }
                Ok(())
            };
            loop {
                if stop.load(Ordering::Relaxed)
                    || expected.is_some_and(|expected| total.load(Ordering::Relaxed) >= expected)
                {
                    break;
                }
                let wait = Duration::from_millis(200);
                if batches {
                    let batch = match tokio::time::timeout(wait, consumer.next_batch()).await {
                        Ok(Some(batch)) => batch?,
                        Ok(None) => break,
                        Err(_) => continue,
                    };
                    let mut count = 0;
                    for record in batch.records() {
                        note(record?.value)?;
                        count += 1;
                    }
                    total.fetch_add(count, Ordering::Relaxed);
                } else {
                    let record = match tokio::time::timeout(wait, consumer.next()).await {
                        Ok(Some(record)) => record?,
                        Ok(None) => break,
                        Err(_) => continue,
                    };
                    note(record.value.as_deref())?;
                    total.fetch_add(1, Ordering::Relaxed);
                }
            }
            anyhow::Ok((bytes, latencies))
        }));
    }
    let mut latencies = Histogram::<u64>::new(3)?;
    let mut bytes = 0;
    for task in tasks {
        let (consumer_bytes, histogram) = task.await??;
        bytes += consumer_bytes;
        latencies.add(histogram)?;
    }
    Ok((total.load(Ordering::Relaxed), bytes, latencies))
}

/// Runs `produce`, `consume` or `e2e`.
///
/// # Errors
/// Bad arguments, an unreachable broker, or a failed workload.
pub async fn run(workload: &str, args: &WorkloadArgs) -> anyhow::Result<()> {
    if args.spawn_broker && args.spawn_cluster.is_some() {
        bail!("--spawn-broker and --spawn-cluster exclude each other");
    }
    let cluster = match args.spawn_cluster {
        Some(brokers) => Some(spawn_cluster(brokers)?),
        None => None,
    };
    let (spawned, addr) = if args.spawn_broker {
        let (spawned, addr) = spawn_broker()?;
        (Some(spawned), addr)
    } else if let Some((_, bootstrap)) = &cluster {
        (None, bootstrap.clone())
    } else {
        (None, args.broker.clone())
    };
    // A cluster's produce latency is spread over its leaders' histograms:
    // only a single broker's is read.
    let admin = spawned
        .as_ref()
        .map(|spawned| spawned.process.admin_addr.to_string())
        .or_else(|| args.admin.clone());
    let topic = format!("bench-{}-{}", workload, std::process::id());
    let replication_factor = create_bench_topic(&addr, &topic, args).await?;
    let brokers = Admin::connect(&addr)
        .await?
        .metadata(Some(Vec::new()))
        .await?
        .brokers
        .len();
    let seconds = Duration::from_secs(args.seconds);
    let stop = Arc::new(AtomicBool::new(false));
    let timer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(seconds).await;
            stop.store(true, Ordering::Relaxed);
        })
    };
    let mut report = WorkloadReport {
        workload: workload.to_string(),
        brokers,
        replication_factor,
        producers: args.producers,
        consumers: args.consumers,
        partitions: args.partitions,
        record_bytes: args.record_bytes,
        batch_bytes: args.batch_bytes,
        in_flight: args.in_flight,
        idempotent: !args.no_idempotence,
        acks: args.acks.clone(),
        compression: args.compression.clone(),
        consumer_api: args.consumer_api.clone(),
        linger_ms: args.linger_ms,
        ..WorkloadReport::default()
    };
    let started = Instant::now();
    match workload {
        "produce" | "consume" => {
            let (records, bytes, latencies) =
                produce_phase(&addr, &topic, args, stop.clone()).await?;
            let elapsed = started.elapsed().as_secs_f64();
            report.record_produce(records, bytes, &latencies, elapsed);
            if workload == "consume" {
                // Read back everything just produced: the first pass from
                // the device (or the recent-batch cache), later ones from
                // the page cache the first filled.
                for _ in 0..args.passes.max(1) {
                    let consume_started = Instant::now();
                    let never = Arc::new(AtomicBool::new(false));
                    let (consumed, consumed_bytes, _) =
                        consume_phase(&addr, &topic, args, Some(records), never).await?;
                    let elapsed = consume_started.elapsed().as_secs_f64();
                    if consumed < records {
                        bail!("consumed {consumed} of {records} records");
                    }
                    report
                        .consume_passes_mb_s
                        .push(consumed_bytes as f64 / 1e6 / elapsed);
                }
                report.consume_mb_s = report.consume_passes_mb_s.last().copied();
            }
        }
        "e2e" => {
            let consume = {
                let addr = addr.clone();
                let topic = topic.clone();
                let args = args.clone();
                let stop = stop.clone();
                tokio::spawn(async move { consume_phase(&addr, &topic, &args, None, stop).await })
            };
            let (records, bytes, latencies) =
                produce_phase(&addr, &topic, args, stop.clone()).await?;
            let elapsed = started.elapsed().as_secs_f64();
            // Let the consumers drain what was produced before stopping them.
            tokio::time::sleep(Duration::from_millis(500)).await;
            stop.store(true, Ordering::Relaxed);
            let (_, _, e2e) = consume.await??;
            report.record_produce(records, bytes, &latencies, elapsed);
            report.e2e_p50_ms = Some(percentile_ms(&e2e, 0.5));
            report.e2e_p99_ms = Some(percentile_ms(&e2e, 0.99));
            report.e2e_p999_ms = Some(percentile_ms(&e2e, 0.999));
        }
        other => bail!("unknown workload {other}"),
    }
    timer.abort();
    if let Some(admin) = &admin {
        let buckets =
            produce_latency_buckets(admin).with_context(|| format!("reading {admin}/metrics"))?;
        report.broker_produce_p50_ms = bucket_quantile_ms(&buckets, 0.5);
        report.broker_produce_p99_ms = bucket_quantile_ms(&buckets, 0.99);
        report.broker_produce_p999_ms = bucket_quantile_ms(&buckets, 0.999);
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

/// The broker's cumulative produce latency buckets, (upper bound in
/// seconds, count), read from its `/metrics` with a plain HTTP/1.0 GET.
fn produce_latency_buckets(admin: &str) -> anyhow::Result<Vec<(f64, u64)>> {
    let mut stream = TcpStream::connect(admin)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: weir\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let mut buckets = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("weir_produce_latency_seconds_bucket{le=\"") else {
            continue;
        };
        let Some((bound, count)) = rest.split_once("\"} ") else {
            continue;
        };
        let bound = if bound == "+Inf" {
            f64::INFINITY
        } else {
            bound.parse()?
        };
        buckets.push((bound, count.trim().parse()?));
    }
    if buckets.is_empty() {
        bail!("no weir_produce_latency_seconds buckets");
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(buckets)
}

/// The upper bound (ms) of the first bucket holding `quantile` of the count.
fn bucket_quantile_ms(buckets: &[(f64, u64)], quantile: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total == 0 {
        return None;
    }
    let wanted = (total as f64 * quantile).ceil() as u64;
    buckets
        .iter()
        .find(|(_, count)| *count >= wanted)
        .map(|(bound, _)| bound * 1_000.0)
}

/// Arguments of `weir-bench baseline`.
#[derive(Debug, clap::Args)]
pub struct BaselineArgs {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Directory for the disk measurement (removed afterwards).
    #[arg(long, default_value = "weir-bench-data")]
    dir: std::path::PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct BaselineReport {
    disk_mb_s: f64,
    /// The device's sequential read: O_DIRECT, 1 MiB requests, 4 in flight,
    /// of a file written with O_DIRECT just before (nothing of it cached).
    disk_read_mb_s: f64,
    disk_sync_mb_s: f64,
    fsync_p50_ms: f64,
    fsync_p99_ms: f64,
    /// One 4 KiB O_DIRECT append + fdatasync (a lone small produce's floor).
    small_append_sync_p50_ms: f64,
    /// See `small_append_sync_p50_ms`.
    small_append_sync_p99_ms: f64,
    loopback_mb_s: f64,
}

/// Loopback TCP bandwidth: one thread writes 1 MiB chunks, another reads.
fn loopback_mb_s(duration: Duration) -> anyhow::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> anyhow::Result<u64> {
        let (mut stream, _) = listener.accept()?;
        let mut buffer = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            match stream.read(&mut buffer)? {
                0 => return Ok(total),
                read => total += read as u64,
            }
        }
    });
    let mut stream = TcpStream::connect(addr)?;
    let chunk = vec![0x5au8; 1 << 20];
    let started = Instant::now();
    while started.elapsed() < duration {
        stream.write_all(&chunk)?;
    }
    drop(stream);
    let total = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    Ok(total as f64 / 1e6 / started.elapsed().as_secs_f64())
}

/// Runs `baseline`.
///
/// # Errors
/// I/O errors.
pub fn baseline(args: &BaselineArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir)?;
    let duration = Duration::from_secs(args.seconds);
    let direct = raw::direct(&args.dir.join("baseline-direct"), duration, 8 << 30, false)?;
    let direct_sync = raw::direct(
        &args.dir.join("baseline-direct-sync"),
        duration,
        8 << 30,
        true,
    )?;
    let small = raw::small_appends(&args.dir.join("baseline-small-appends"), duration)?;
    let read = raw::direct_read(&args.dir.join("baseline-direct-read"), duration, 4 << 30)?;
    let loopback = loopback_mb_s(duration)?;
    std::fs::remove_dir(&args.dir).ok();
    let report = BaselineReport {
        disk_mb_s: direct.mb_s(),
        disk_read_mb_s: read.mb_s(),
        disk_sync_mb_s: direct_sync.mb_s(),
        fsync_p50_ms: direct_sync.sync_p50_us as f64 / 1_000.0,
        fsync_p99_ms: direct_sync.sync_p99_us as f64 / 1_000.0,
        small_append_sync_p50_ms: small.sync_p50_us as f64 / 1_000.0,
        small_append_sync_p99_ms: small.sync_p99_us as f64 / 1_000.0,
        loopback_mb_s: loopback,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}
