//! The TCP server: binding the listener, accepting connections under the
//! broker-wide and per-address limits, the background loops (retention,
//! group reaper), and shutting down gracefully. One connection's life is
//! in [`crate::connection`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Notify, Semaphore, watch};
use weir_protocol::ErrorCode;
use weir_storage::{EngineConfig, IoEngine, LogConfig};

use crate::broker::{Broker, advertised_address};
use crate::config::BrokerConfig;
use crate::connection::{AddressSlots, LimitReason, record_limit, refuse};
use crate::topics::Topics;

pub use crate::connection::OWN_FRAME_BUFFERS_BYTES_MAX;

/// A running broker.
#[derive(Debug)]
pub struct Running {
    /// Where clients connect.
    pub local_addr: SocketAddr,
    /// Where the admin HTTP listens.
    pub admin_addr: SocketAddr,
    stop: watch::Sender<bool>,
    done: tokio::task::JoinHandle<()>,
    broker: Arc<Broker>,
}

impl Running {
    /// In a cluster, first moves every leadership this broker holds to
    /// other in-sync replicas while it still serves (a controlled
    /// shutdown); then stops accepting, lets connections finish their
    /// in-flight requests (up to the grace period), closes every log
    /// cleanly.
    pub async fn shutdown(self) {
        controlled_shutdown(&self.broker).await;
        let _ = self.stop.send(true);
        let _ = self.done.await;
    }
}

/// Asks the controller to move this broker's leaderships away (its
/// heartbeats say it is shutting down; the controller fences it, electing
/// other in-sync replicas and taking it out of in-sync sets), and waits,
/// still serving, until it leads nothing or `controlled_shutdown_timeout_ms`
/// has passed. Clients see leadership move (`NotLeader`, retried at the
/// new leader) rather than a dead broker. Nothing to do for a cluster of one.
async fn controlled_shutdown(broker: &Broker) {
    if broker.controller.voters().len() <= 1 {
        return;
    }
    broker.ready.store(false, Ordering::Release);
    broker.shutting_down.store(true, Ordering::Release);
    let me = broker.config.broker_id;
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_millis(broker.config.controlled_shutdown_timeout_ms);
    let mut metadata = broker.controller.metadata();
    tracing::info!("controlled shutdown: moving leadership away");
    loop {
        let fenced = metadata
            .borrow_and_update()
            .image
            .brokers
            .get(&me)
            .is_none_or(|registration| registration.fenced);
        let leading = broker
            .topics
            .all()
            .iter()
            .flat_map(|topic| topic.partitions.iter())
            .filter(|partition| partition.is_leader())
            .count();
        if fenced && leading == 0 {
            tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "controlled shutdown: leads nothing now"
            );
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                fenced,
                leading,
                "controlled shutdown: timed out; stopping anyway"
            );
            return;
        }
        tokio::select! {
            _ = metadata.changed() => {}
            // The local side follows a metadata change by a moment.
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
}

/// The controller's directory inside the data directory.
pub const CONTROLLER_DIR: &str = "controller";
/// Longest a cluster of one waits at start to be writable.
pub const READY_WAIT_MS: u64 = 30_000;

/// Resolves once this broker is registered and unfenced and every
/// partition it replicates has had its metadata applied; marks it ready.
async fn wait_ready(broker: Arc<Broker>) {
    let me = broker.config.broker_id;
    let mut metadata = broker.controller.metadata();
    let mut stopping = broker.stopping.clone();
    loop {
        let view = metadata.borrow_and_update().clone();
        let unfenced = view
            .image
            .brokers
            .get(&me)
            .is_some_and(|registration| !registration.fenced);
        let applied = view
            .image
            .topics
            .keys()
            .all(|name| broker.has_applied(name));
        if unfenced && applied {
            broker.ready.store(true, Ordering::Release);
            return;
        }
        tokio::select! {
            changed = metadata.changed() => if changed.is_err() { return },
            // The local side follows a metadata change by a moment.
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = stopping.wait_for(|stopping| *stopping) => return,
        }
    }
}

/// Opens the data directory and starts serving.
///
/// # Errors
/// Bad settings, storage that cannot open, or a listener that cannot bind.
pub async fn start(config: BrokerConfig) -> anyhow::Result<Running> {
    let engine = IoEngine::start(&EngineConfig {
        kind: config.engine_kind()?,
        ..EngineConfig::default()
    })?;
    let log_config = LogConfig {
        segment_bytes_max: config.segment_bytes,
        batch_bytes_max: config.batch_bytes_max,
        retention_bytes: config.retention_bytes,
        retention_ms: config.retention_ms,
        flush: config.flush_policy()?,
        write_mode: config.write_mode()?,
        verify_crc_on_read: config.verify_crc_on_read,
        ..LogConfig::default()
    };
    let appended = Arc::new(Notify::new());
    let replica_config = crate::cluster::replica::ReplicaConfig {
        replica_lag_time_max_ms: config.replica_lag_time_max_ms,
        min_insync_replicas: 1,
        isr_retry_ms: 1_000,
        unclean_leader_election: config.unclean_leader_election,
    };
    // A data directory written before the broker had a controller: its
    // topics are imported into the cluster (until a marker says done).
    let upgrading = config.data_dir.join(crate::topics::TOPICS_FILE).exists()
        && !config
            .data_dir
            .join(crate::replication::session::IMPORTED_FILE)
            .exists();
    let topics = Topics::open(
        &config.data_dir,
        log_config,
        engine.clone(),
        appended.clone(),
        config.broker_id,
        replica_config,
    )?;
    let producer_ids =
        crate::producers::ProducerIds::open(&config.data_dir).map_err(anyhow::Error::msg)?;
    let groups = crate::groups::Coordinator::new(
        config.offsets_topic_partitions,
        Duration::from_millis(config.group_initial_rebalance_delay_ms),
    )
    .with_offsets(config.offsets_retention_ms, config.offsets_segment_bytes);
    groups.verify(&topics).map_err(anyhow::Error::msg)?;
    let listener = bind(config.listen, config.listen_backlog)?;
    let local_addr = listener.local_addr()?;
    let advertised = advertised_address(config.advertised_listen.as_deref(), local_addr)?;
    let advertised_addr = format!("{}:{}", advertised.0, advertised.1);
    let voters = config.voters(&advertised_addr)?;
    // A broker outside the voters follows the metadata log as a learner.
    let in_cluster = voters.len() > 1 || !voters.contains_key(&config.broker_id);
    if in_cluster && config.flush_policy()? != weir_storage::FlushPolicy::Always {
        // The high watermark counts what followers report as written; only
        // `flush = always` makes that durable (the lesson of KIP-966).
        anyhow::bail!("a cluster of several brokers needs flush = always");
    }
    let alone = voters.len() == 1 && voters.contains_key(&config.broker_id);
    let controller = crate::cluster::controller::Controller::start(
        crate::cluster::controller::ControllerConfig {
            node_id: config.broker_id,
            voters,
            advertised: advertised_addr,
            dir: config.data_dir.join(CONTROLLER_DIR),
            raft_heartbeat_ms: config.controller_heartbeat_ms,
            raft_election_timeout_min_ms: config.controller_election_timeout_ms,
            raft_election_timeout_max_ms: config.controller_election_timeout_ms * 2,
            broker_session_timeout_ms: config.broker_session_timeout_ms,
            unclean_leader_election: config.unclean_leader_election,
            propose_timeout_ms: config.controller_propose_timeout_ms,
            leader_rebalance_interval_ms: config.leader_rebalance_interval_ms,
        },
    )
    .await?;
    let incarnation = crate::replication::session::next_incarnation(&config.data_dir)?;
    let admin_listener = TcpListener::bind(config.admin_listen).await?;
    let admin_addr = admin_listener.local_addr()?;
    let (stop, stopped) = watch::channel(false);
    let broker = Arc::new(Broker {
        config,
        topics,
        engine,
        appended,
        connections: AtomicU64::new(0),
        connections_peak: AtomicU64::new(0),
        own_frame_buffer_bytes: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        limit_log: crate::limits::LimitLog::default(),
        metrics: crate::metrics::Metrics::new(),
        ready: std::sync::atomic::AtomicBool::new(false),
        shutting_down: std::sync::atomic::AtomicBool::new(false),
        stopping: stopped.clone(),
        producer_ids,
        groups,
        local_addr,
        advertised,
        controller,
        fetchers: crate::replication::fetcher::Fetchers::default(),
    });
    tokio::spawn(crate::replication::session::run(
        broker.clone(),
        incarnation,
        upgrading,
    ));
    let serving = {
        let broker = broker.clone();
        let stopped = stopped.clone();
        tokio::spawn(async move { serve(listener, broker, stopped).await })
    };
    let became_ready = wait_ready(broker.clone());
    if alone {
        // A cluster of one is ready within moments: start() returns once
        // it can take writes, as the single-node broker always did.
        if tokio::time::timeout(Duration::from_millis(READY_WAIT_MS), became_ready)
            .await
            .is_err()
        {
            tracing::warn!("not ready after {READY_WAIT_MS} ms; serving anyway");
        }
    } else {
        tokio::spawn(became_ready);
    }
    let admin = {
        let mut stopped = stopped.clone();
        let app = crate::admin_http::router(broker.clone());
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.changed().await;
            };
            if let Err(error) = axum::serve(admin_listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::error!(%error, "admin http failed");
            }
        })
    };
    let done = tokio::spawn(async move {
        let _ = serving.await;
        let _ = admin.await;
    });
    Ok(Running {
        local_addr,
        admin_addr,
        stop,
        done,
        broker,
    })
}

async fn serve(listener: TcpListener, broker: Arc<Broker>, mut stopped: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(broker.config.connections_max));
    let per_address = AddressSlots::new(broker.config.connections_per_address_max());
    let lingering = Arc::new(Semaphore::new(crate::connection::REFUSALS_LINGERING_MAX));
    let retention = tokio::spawn(retention_loop(broker.clone(), stopped.clone()));
    let reaper = tokio::spawn(group_reaper(broker.clone(), stopped.clone()));
    let trim = tokio::spawn(memory_trim_loop(broker.clone(), stopped.clone()));
    loop {
        tokio::select! {
            _ = stopped.changed() => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of descriptors and the like: back off, keep serving.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    record_limit(&broker, LimitReason::BrokerLimit, peer);
                    let linger = lingering.clone().try_acquire_owned().ok();
                    tokio::spawn(refuse(stream, ErrorCode::TooManyConnections, linger));
                    continue;
                };
                let Some(address_slot) = per_address.try_acquire(peer.ip()) else {
                    record_limit(&broker, LimitReason::AddressLimit, peer);
                    let linger = lingering.clone().try_acquire_owned().ok();
                    tokio::spawn(refuse(stream, ErrorCode::TooManyConnections, linger));
                    continue;
                };
                tokio::spawn(crate::connection::serve(
                    stream,
                    peer,
                    broker.clone(),
                    stopped.clone(),
                    (slot, address_slot),
                ));
            }
        }
    }
    drop(listener);
    broker.ready.store(false, Ordering::Release);
    retention.abort();
    reaper.abort();
    trim.abort();
    // Wait for connections to finish what they have in flight.
    let grace = Duration::from_millis(broker.config.shutdown_grace_ms);
    let all = u32::try_from(broker.config.connections_max).unwrap_or(u32::MAX);
    if tokio::time::timeout(grace, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace period over with connections still open");
    }
    {
        let broker = broker.clone();
        let _ =
            tokio::task::spawn_blocking(move || broker.groups.save_snapshots(&broker.topics)).await;
    }
    broker.topics.close_all();
    broker.engine.shutdown();
    broker.controller.shutdown().await;
    tracing::info!("broker stopped");
}

async fn retention_loop(broker: Arc<Broker>, mut stopped: watch::Receiver<bool>) {
    let period = Duration::from_millis(broker.config.retention_check_ms.max(100));
    loop {
        tokio::select! {
            _ = stopped.changed() => return,
            _ = tokio::time::sleep(period) => {
                let broker = broker.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    broker.topics.apply_retention();
                    // Keeps the replay after an unclean stop short.
                    broker
                        .topics
                        .save_producer_states(broker.config.producer_expiration_ms as i64);
                    broker.groups.save_snapshots(&broker.topics);
                })
                .await;
            }
        }
    }
}

/// How often the memory trim looks at the connection count.
const MEMORY_TRIM_CHECK_MS: u64 = 2_000;
/// Connections that must have closed since the last look for a trim.
const MEMORY_TRIM_CONNECTIONS_MIN: u64 = 256;

/// Gives the allocator's free memory back to the system after a burst of
/// connections has gone. glibc keeps freed chunks inside its heaps (in the
/// middle of a heap it cannot shrink), so without this the memory of a
/// burst stays resident after its connections close; measured with 2,000
/// connections a round, the broker kept ~12 MB after the burst, and 1 MB
/// after a trim (docs/OPERATIONS.md, "Connections and memory"). A trim
/// walks the heaps under their locks, so it runs only after a burst and
/// on a blocking thread.
async fn memory_trim_loop(broker: Arc<Broker>, mut stopped: watch::Receiver<bool>) {
    let period = Duration::from_millis(MEMORY_TRIM_CHECK_MS);
    loop {
        tokio::select! {
            _ = stopped.changed() => return,
            _ = tokio::time::sleep(period) => {
                let open = broker.connections.load(Ordering::Relaxed);
                let peak = broker.connections_peak.swap(open, Ordering::Relaxed);
                if peak.saturating_sub(open) >= MEMORY_TRIM_CONNECTIONS_MIN {
                    let _ = tokio::task::spawn_blocking(trim_allocator).await;
                }
            }
        }
    }
}

/// Returns free heap memory to the system (glibc's `malloc_trim`).
fn trim_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes the allocator's own locks; it only
        // releases free pages and is safe to call from any thread.
        let released = unsafe { libc::malloc_trim(0) };
        tracing::debug!(
            released,
            "returned free heap memory after a connection burst"
        );
    }
}

/// Expires group members whose session ran out, and takes up or gives up
/// offsets partitions (their groups) as their leadership moves.
async fn group_reaper(broker: Arc<Broker>, mut stopped: watch::Receiver<bool>) {
    let period = Duration::from_millis(crate::groups::REAPER_INTERVAL_MS);
    loop {
        tokio::select! {
            _ = stopped.changed() => return,
            _ = tokio::time::sleep(period) => {
                let follower = broker.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    follower.groups.follow_leadership(&follower.topics);
                })
                .await;
                let expired = broker.groups.reap(&broker.topics);
                if !expired.is_empty() {
                    let broker = broker.clone();
                    tokio::spawn(async move {
                        broker.groups.write_tombstones(&broker.topics, expired).await;
                    });
                }
            }
        }
    }
}

/// The client listener, with `backlog` connections waiting for accept (the
/// kernel caps it at `net.core.somaxconn`): a burst of connects beyond the
/// backlog waits for SYN retries, a second or more each.
fn bind(address: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = match address {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(backlog.max(1))
}
