//! `weir-bench`: Weir's load generator and raw-hardware baselines.
//!
//! Layout:
//! - `raw`: the hardware's own limits, measured by this program writing the
//!   same bytes the same way Weir would (pwrite + fdatasync, O_DIRECT).
//! - `storage`: the storage-engine workload (`weir-bench storage`).
//! - `broker`: workloads against a broker (`produce`, `consume`, `e2e`) and
//!   the `baseline` of disk, fsync and loopback TCP.
//!
//! Every figure a workload prints comes with the baselines measured in the
//! same run, on the same directory, so ratios are honest on a noisy machine.

mod broker;
mod metadata;
mod raw;
mod storage;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "weir-bench",
    about = "Weir benchmarks, each next to the raw hardware baseline of the same run"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Storage engine: raw disk baselines, Weir appends from W writers, mmap reads.
    Storage(storage::StorageArgs),
    /// Producers against a broker: MB/s, records/s, ack latency.
    Produce(broker::WorkloadArgs),
    /// Produce, then read everything back: adds consume MB/s.
    Consume(broker::WorkloadArgs),
    /// Producers and consumers at once: adds end-to-end latency.
    E2e(broker::WorkloadArgs),
    /// The hardware under the broker: disk, fsync, loopback TCP.
    Baseline(broker::BaselineArgs),
    /// Loading the controller's metadata image: rkyv archive against JSON.
    Metadata(metadata::MetadataArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    };
    match Cli::parse().command {
        Command::Storage(args) => storage::run(&args),
        Command::Produce(args) => runtime()?.block_on(broker::run("produce", &args)),
        Command::Consume(args) => runtime()?.block_on(broker::run("consume", &args)),
        Command::E2e(args) => runtime()?.block_on(broker::run("e2e", &args)),
        Command::Baseline(args) => broker::baseline(&args),
        Command::Metadata(args) => metadata::run(&args),
    }
}
