//! `weir-bench metadata`: how long a broker takes to load the controller's
//! metadata image from a snapshot, as a validated `rkyv` archive (the
//! snapshot format) against JSON (the first format), for a cluster of N
//! partitions, measured in the same run.

use std::time::Instant;

use anyhow::Context;
use serde::Serialize;
use weir_broker::cluster::controller::state_machine::{decode_state, encode_state};
use weir_broker::cluster::metadata::MetadataImage;

/// Arguments of `metadata`.
#[derive(Debug, Clone, clap::Args)]
pub struct MetadataArgs {
    /// Partitions in the image (RF min(3, brokers), 100 per topic).
    #[arg(long, default_value_t = 100_000)]
    partitions: u32,
    /// Registered brokers.
    #[arg(long, default_value_t = 9)]
    brokers: u32,
    /// Loads timed per format; the median is reported.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
}

#[derive(Debug, Serialize)]
struct MetadataReport {
    partitions: u32,
    brokers: u32,
    rkyv_bytes: usize,
    json_bytes: usize,
    /// Validating and loading the archive (the snapshot format), median ms.
    rkyv_load_ms: f64,
    /// Parsing the same image from JSON, median ms.
    json_load_ms: f64,
    /// Writing each, median ms.
    rkyv_write_ms: f64,
    json_write_ms: f64,
}

fn median_ms(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples.get(samples.len() / 2).copied().unwrap_or(0.0)
}

/// Runs `metadata`.
///
/// # Errors
/// An image that cannot be built, encoded or decoded.
pub fn run(args: &MetadataArgs) -> anyhow::Result<()> {
    let image = MetadataImage::synthetic(args.brokers, args.partitions)
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    // openraft's default membership (the type comes from `encode_state`).
    let membership = Default::default();
    let rounds = args.rounds.max(1);
    let (mut rkyv_load, mut json_load, mut rkyv_write, mut json_write) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut rkyv_bytes, mut json_bytes) = (0, 0);
    for _ in 0..rounds {
        let started = Instant::now();
        let archive = encode_state(None, &membership, &image).map_err(anyhow::Error::msg)?;
        rkyv_write.push(started.elapsed().as_secs_f64() * 1e3);
        let started = Instant::now();
        let json = serde_json::to_vec(&image).context("json")?;
        json_write.push(started.elapsed().as_secs_f64() * 1e3);
        rkyv_bytes = archive.len();
        json_bytes = json.len();

        let started = Instant::now();
        let (_, _, loaded) = decode_state(&archive).map_err(anyhow::Error::msg)?;
        rkyv_load.push(started.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(loaded == image, "the archive did not give the image back");
        let started = Instant::now();
        let parsed: MetadataImage = serde_json::from_slice(&json).context("json")?;
        json_load.push(started.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(parsed == image, "JSON did not give the image back");
    }
    let report = MetadataReport {
        partitions: args.partitions,
        brokers: args.brokers,
        rkyv_bytes,
        json_bytes,
        rkyv_load_ms: median_ms(rkyv_load),
        json_load_ms: median_ms(json_load),
        rkyv_write_ms: median_ms(rkyv_write),
        json_write_ms: median_ms(json_write),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
