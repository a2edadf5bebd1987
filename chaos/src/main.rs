//! `weir-chaos`: faults against a real cluster under load, and what
//! survived them.
//!
//! `weir-chaos failover --brokers 3 --kills N --json` starts a cluster of
//! real `weir-broker` processes on loopback (each a controller voter, each
//! with its own data directory), runs an idempotent `acks=all` producer
//! into one RF=3 partition, kill -9s the partition's leader N times
//! (restarting it and waiting for it to rejoin the in-sync set before the
//! next kill), then reads the partition back and reports:
//! `failover_ms_p50/p99/max` (kill to the first acknowledgement of a record
//! sent after it),
//! `acked`, `lost` (acknowledged, not read back) and `duplicated` (values
//! read more than once).

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde::Serialize;
use weir_client::{
    Acks, Admin, Consumer, ConsumerConfig, Offset, Producer, ProducerConfig, ProducerRecord,
};
use weir_testkit::Cluster;

/// Records in flight at once: enough to keep the partition busy, bounded.
const IN_FLIGHT_MAX: usize = 256;
/// Longest any one step (a failover, a rejoin, the read back) may take.
const STEP_DEADLINE: Duration = Duration::from_secs(60);
const TOPIC: &str = "chaos";

#[derive(Debug, Parser)]
#[command(name = "weir-chaos", about = "Faults against a real Weir cluster")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Kill -9 the leader under acks=all load, N times; report failover
    /// times and what was lost or duplicated.
    Failover {
        /// Brokers in the cluster (all controller voters).
        #[arg(long, default_value_t = 3)]
        brokers: usize,
        /// Leader kills.
        #[arg(long, default_value_t = 5)]
        kills: usize,
        /// The broker binary (default: `weir-broker` next to this one).
        #[arg(long)]
        broker_bin: Option<PathBuf>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Serialize)]
struct FailoverReport {
    brokers: usize,
    kills: usize,
    failover_ms: Vec<u64>,
    failover_ms_p50: u64,
    failover_ms_p99: u64,
    failover_ms_max: u64,
    acked: usize,
    failed: usize,
    lost: usize,
    duplicated: usize,
}

/// What the producer has been told, with when.
#[derive(Debug, Default)]
struct History {
    /// Value, when it was sent, when it was acknowledged.
    acked: Vec<(u64, Instant, Instant)>,
    failed: Vec<u64>,
}

fn percentile(sorted: &[u64], fraction: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((sorted.len() as f64) * fraction).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cli.command {
        Command::Failover {
            brokers,
            kills,
            broker_bin,
            json,
        } => {
            if !(1..=5).contains(&brokers) || brokers % 2 == 0 {
                bail!("--brokers must be 1, 3 or 5 (every broker is a controller voter)");
            }
            let binary = match broker_bin {
                Some(path) => path,
                None => std::env::current_exe()?
                    .parent()
                    .map(|dir| dir.join("weir-broker"))
                    .context("no directory for weir-broker")?,
            };
            if !binary.exists() {
                bail!(
                    "{} not found: cargo build --release -p weir-broker",
                    binary.display()
                );
            }
            let report = runtime.block_on(failover(&binary, brokers, kills))?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "failover ms p50 {} p99 {} max {} (each: {:?})",
                    report.failover_ms_p50,
                    report.failover_ms_p99,
                    report.failover_ms_max,
                    report.failover_ms
                );
                println!(
                    "acked {} failed {} lost {} duplicated {}",
                    report.acked, report.failed, report.lost, report.duplicated
                );
            }
            if report.lost > 0 || report.duplicated > 0 {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

/// Leader, in-sync set and leader epoch of the partition, from `addr`.
async fn placement(addr: &str) -> Option<(i32, BTreeSet<u32>)> {
    let admin = tokio::time::timeout(Duration::from_secs(5), Admin::connect(addr))
        .await
        .ok()?
        .ok()?;
    let metadata = tokio::time::timeout(
        Duration::from_secs(5),
        admin.metadata(Some(vec![TOPIC.to_string()])),
    )
    .await
    .ok()?
    .ok()?;
    let partition = metadata.topics.first()?.partitions.first()?.clone();
    Some((
        partition.leader,
        partition.in_sync_replicas.into_iter().collect(),
    ))
}

/// Polls every running broker until all report the same leader with the
/// whole replica set in sync (a broker just restarted answers from the
/// metadata it had until it catches up: one broker's word is not enough).
async fn wait_in_sync(cluster: &Cluster, replicas: usize) -> anyhow::Result<i32> {
    let deadline = Instant::now() + STEP_DEADLINE;
    loop {
        let mut views = Vec::new();
        for (index, addr) in cluster.addrs.iter().enumerate() {
            if cluster.brokers[index].is_some() {
                views.push(placement(&addr.to_string()).await);
            }
        }
        if let Some(Some((leader, isr))) = views.first()
            && *leader > 0
            && isr.len() == replicas
            && views.iter().all(|view| view == &views[0])
        {
            return Ok(*leader);
        }
        if Instant::now() >= deadline {
            bail!("the partition did not get a leader with all replicas in sync");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every value in the partition, with how often it appears, read from the
/// leader at `leader_addr` up to its high watermark.
async fn read_back(leader_addr: &str) -> anyhow::Result<HashMap<u64, usize>> {
    let end = Admin::connect(leader_addr)
        .await?
        .list_offset(TOPIC, 0, -1)
        .await?;
    let mut consumer = Consumer::connect(leader_addr, ConsumerConfig::default()).await?;
    consumer.assign(TOPIC, 0, Offset::Earliest).await?;
    let mut seen: HashMap<u64, usize> = HashMap::new();
    let mut position = 0u64;
    while position < end {
        let record = tokio::time::timeout(STEP_DEADLINE, consumer.next())
            .await
            .context("the read back stalled")?
            .context("assignment ended")??;
        position = record.offset + 1;
        let value = record
            .value
            .as_deref()
            .and_then(|bytes| std::str::from_utf8(bytes).ok())
            .and_then(|text| text.parse::<u64>().ok())
            .context("a record that is not one of ours")?;
        *seen.entry(value).or_default() += 1;
    }
    Ok(seen)
}

async fn failover(
    binary: &std::path::Path,
    brokers: usize,
    kills: usize,
) -> anyhow::Result<FailoverReport> {
    let root = tempfile::tempdir()?;
    let mut cluster = Cluster::start_binary(
        binary,
        brokers,
        root.path(),
        &["--segment-bytes", "67108864"],
    );
    let replicas = brokers.min(3);
    let bootstrap = cluster.bootstrap();
    let deadline = Instant::now() + STEP_DEADLINE;
    loop {
        let created = match Admin::connect(&bootstrap).await {
            Ok(admin) => admin
                .create_topic_replicated(TOPIC, 1, replicas as u16)
                .await
                .is_ok(),
            Err(_) => false,
        };
        if created {
            break;
        }
        if Instant::now() >= deadline {
            bail!("could not create the topic");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_in_sync(&cluster, replicas).await?;

    let producer = Arc::new(
        Producer::connect(
            &bootstrap,
            ProducerConfig {
                acks: Acks::All,
                linger_ms: 1,
                delivery_timeout_ms: 60_000,
                ..ProducerConfig::default()
            },
        )
        .await?,
    );
    let history = Arc::new(Mutex::new(History::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producing = {
        let producer = producer.clone();
        let history = history.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT_MAX));
            let mut value = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    break;
                };
                let record = ProducerRecord::new(value.to_string()).partition(0);
                let sent_at = Instant::now();
                let Ok(delivery) = producer.send(TOPIC, record).await else {
                    history
                        .lock()
                        .unwrap_or_else(|poison| poison.into_inner())
                        .failed
                        .push(value);
                    break;
                };
                let history = history.clone();
                tokio::spawn(async move {
                    let outcome = delivery.await;
                    let mut history = history.lock().unwrap_or_else(|poison| poison.into_inner());
                    match outcome {
                        Ok(_) => history.acked.push((value, sent_at, Instant::now())),
                        Err(_) => history.failed.push(value),
                    }
                    drop(slot);
                });
                value += 1;
            }
            slots
        })
    };

    let mut failovers = Vec::with_capacity(kills);
    for _ in 0..kills {
        // Steady state first: all in sync and acknowledgements flowing.
        let leader = wait_in_sync(&cluster, replicas).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let killed_at = Instant::now();
        cluster.kill(leader as usize - 1);
        eprintln!(
            "killed broker {leader} at {}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_millis())
        );
        let deadline = killed_at + STEP_DEADLINE;
        // The first acknowledgement of a record sent after the kill (an
        // answer the dead leader wrote just before dying does not count).
        let recovered = loop {
            let first = history
                .lock()
                .unwrap_or_else(|poison| poison.into_inner())
                .acked
                .iter()
                .rev()
                .take_while(|(_, _, acked_at)| *acked_at > killed_at)
                .filter(|(_, sent_at, _)| *sent_at > killed_at)
                .map(|(_, _, acked_at)| *acked_at)
                .min();
            if let Some(at) = first {
                break at;
            }
            if Instant::now() >= deadline {
                bail!("no acknowledgement within {STEP_DEADLINE:?} of a leader kill");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        failovers.push(recovered.duration_since(killed_at).as_millis() as u64);
        cluster.restart(leader as usize - 1);
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    let slots = producing.await?;
    producer.flush().await?;
    // Every delivery resolved: all slots back.
    let _all = tokio::time::timeout(STEP_DEADLINE, slots.acquire_many(IN_FLIGHT_MAX as u32))
        .await
        .context("deliveries did not resolve")??;
    let (acked, failed): (BTreeSet<u64>, usize) = {
        let history = history.lock().unwrap_or_else(|poison| poison.into_inner());
        (
            history.acked.iter().map(|(value, _, _)| *value).collect(),
            history.failed.len(),
        )
    };

    // Read the partition back from its leader, to its end (asking again
    // while a broker's view of the leader is a moment old).
    let read_deadline = Instant::now() + STEP_DEADLINE;
    let seen = loop {
        let leader = wait_in_sync(&cluster, replicas).await?;
        let leader_addr = cluster.addrs[leader as usize - 1].to_string();
        match read_back(&leader_addr).await {
            Ok(seen) => break seen,
            Err(error) if Instant::now() < read_deadline => {
                eprintln!("read back from {leader_addr} failed ({error}); asking again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => return Err(error),
        }
    };
    let lost = acked
        .iter()
        .filter(|value| !seen.contains_key(value))
        .count();
    let duplicated = seen.values().filter(|count| **count > 1).count();
    let mut sorted = failovers.clone();
    sorted.sort_unstable();
    Ok(FailoverReport {
        brokers,
        kills,
        failover_ms_p50: percentile(&sorted, 0.5),
        failover_ms_p99: percentile(&sorted, 0.99),
        failover_ms_max: sorted.last().copied().unwrap_or(0),
        failover_ms: failovers,
        acked: acked.len(),
        failed,
        lost,
        duplicated,
    })
}
