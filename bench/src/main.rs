//! `weir-bench`: Weir's load generator and raw-hardware baselines.
//!
//! Layout:
//! - `raw`: the hardware's own limits, measured by this program writing the
//!   same bytes the same way Weir would (pwrite + fdatasync, O_DIRECT).
//! - `storage`: the storage-engine workload (`weir-bench storage`).
//!
//! Every figure a workload prints comes with the baselines measured in the
//! same run, on the same directory, so ratios are honest on a noisy machine.

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
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Storage(args) => storage::run(&args),
    }
}
