//! `weir-broker`: with no arguments, a single-node broker on 127.0.0.1:9092
//! with data in `./weir-data`. A TOML file (`--config`), `WEIR_*`
//! environment variables and flags override the embedded defaults, in that
//! order of increasing precedence.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use weir_broker::BrokerConfig;

#[derive(Debug, Parser)]
#[command(
    name = "weir-broker",
    about = "Weir broker: a durable, replicated append-only log"
)]
struct Args {
    /// TOML file with any of the broker's settings.
    #[arg(long, env = "WEIR_CONFIG")]
    config: Option<PathBuf>,
    /// Address clients connect to.
    #[arg(long, env = "WEIR_LISTEN")]
    listen: Option<SocketAddr>,
    /// Admin HTTP address.
    #[arg(long, env = "WEIR_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// Data directory.
    #[arg(long, env = "WEIR_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Flush policy: always, interval, interval:<ms>, never.
    #[arg(long, env = "WEIR_FLUSH")]
    flush: Option<String>,
    /// Write mode: direct or buffered.
    #[arg(long, env = "WEIR_WRITE_MODE")]
    write_mode: Option<String>,
    /// io engine: auto, uring, sync.
    #[arg(long, env = "WEIR_IO_ENGINE")]
    io_engine: Option<String>,
    /// Most connections served at once.
    #[arg(long, env = "WEIR_CONNECTIONS_MAX")]
    connections_max: Option<usize>,
    /// Most connections from one client address (default: half of connections-max).
    #[arg(long, env = "WEIR_CONNECTIONS_MAX_PER_ADDRESS")]
    connections_max_per_address: Option<usize>,
    /// Close connections idle this long (0: never).
    #[arg(long, env = "WEIR_CONNECTIONS_MAX_IDLE_MS")]
    connections_max_idle_ms: Option<u64>,
    /// Close a connection whose frame, once begun, is not whole within this (0: never).
    #[arg(long, env = "WEIR_FRAME_TIMEOUT_MS")]
    frame_timeout_ms: Option<u64>,
    /// Connections queued for accept by the kernel.
    #[arg(long, env = "WEIR_LISTEN_BACKLOG")]
    listen_backlog: Option<u32>,
    /// Segment size in bytes.
    #[arg(long, env = "WEIR_SEGMENT_BYTES")]
    segment_bytes: Option<u64>,
    /// This broker's id in the cluster.
    #[arg(long, env = "WEIR_BROKER_ID")]
    broker_id: Option<u32>,
    /// Controller voters, `id@host:port,...` (default: this broker alone).
    #[arg(long, env = "WEIR_CONTROLLER_VOTERS")]
    controller_voters: Option<String>,
    /// `host:port` other brokers and clients are told to connect to.
    #[arg(long, env = "WEIR_ADVERTISED_LISTEN")]
    advertised_listen: Option<String>,
    /// This broker's rack.
    #[arg(long, env = "WEIR_RACK")]
    rack: Option<String>,
}

fn load(args: &Args) -> anyhow::Result<BrokerConfig> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("read {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("parse {}", path.display()))?
        }
        None => BrokerConfig::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(admin) = args.admin_listen {
        config.admin_listen = admin;
    }
    if let Some(dir) = &args.data_dir {
        config.data_dir = dir.clone();
    }
    if let Some(flush) = &args.flush {
        config.flush = flush.clone();
    }
    if let Some(mode) = &args.write_mode {
        config.write_mode = mode.clone();
    }
    if let Some(engine) = &args.io_engine {
        config.io_engine = engine.clone();
    }
    if let Some(max) = args.connections_max {
        config.connections_max = max;
    }
    if let Some(max) = args.connections_max_per_address {
        config.connections_max_per_address = Some(max);
    }
    if let Some(idle) = args.connections_max_idle_ms {
        config.connections_max_idle_ms = idle;
    }
    if let Some(timeout) = args.frame_timeout_ms {
        config.frame_timeout_ms = timeout;
    }
    if let Some(backlog) = args.listen_backlog {
        config.listen_backlog = backlog;
    }
    if let Some(bytes) = args.segment_bytes {
        config.segment_bytes = bytes;
    }
    if let Some(id) = args.broker_id {
        config.broker_id = id;
    }
    if let Some(voters) = &args.controller_voters {
        config.controller_voters = Some(voters.clone());
    }
    if let Some(advertised) = &args.advertised_listen {
        config.advertised_listen = Some(advertised.clone());
    }
    if let Some(rack) = &args.rack {
        config.rack = Some(rack.clone());
    }
    config.flush_policy()?;
    config.write_mode()?;
    config.engine_kind()?;
    Ok(config)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // openraft logs every unreachable peer at ERROR, twice a second;
                // the controller logs its own leadership and liveness changes.
                .unwrap_or_else(|_| "info,openraft=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = load(&Args::parse())?;
    let data_dir = config.data_dir.clone();
    let running = weir_broker::start(config).await?;
    // One line on stdout that scripts and tests can wait for.
    println!(
        "weir-broker listening on {} (data in {}; admin http://{})",
        running.local_addr,
        data_dir.display(),
        running.admin_addr
    );
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}
