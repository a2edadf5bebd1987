//! The TCP server: accepting connections under a limit, reading frames under
//! an in-flight budget, answering requests concurrently, pushing
//! subscriptions, and shutting down gracefully.
//!
//! Per connection, one reader task decodes frames and spawns a task per
//! request; responses and pushes go through a bounded channel to one writer
//! task. The reader takes the frame's size from a per-connection byte budget
//! before it reads the next frame and the writer returns it once the
//! response is written: a connection at its budget is simply not read, which
//! is the producer's backpressure.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use weir_protocol::frame::FrameDecoder;
use weir_protocol::message::error_frame;
use weir_protocol::{ErrorCode, FrameKind, Request, Response};
use weir_storage::{EngineConfig, IoEngine, LogConfig};

use crate::broker::{Broker, advertised_address};
use crate::config::BrokerConfig;
use crate::context::{ConnectionContext, Outgoing};
use crate::handlers;
use crate::topics::Topics;

/// Bytes read from a socket at a time.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Frames at least this large are read into a buffer of their own, so the
/// batches they carry reach the log without a copy (in a shared read buffer
/// the log would have to copy them, and the buffer's growth copies too).
const OWN_BUFFER_FRAME_BYTES_MIN: usize = 64 * 1024;
/// Most bytes of such buffers allocated, broker-wide, before their frames
/// have arrived (a peer that announces a large frame and sends nothing must
/// not make the broker reserve memory without bound); past it, reads go to
/// the shared buffer, which grows only with bytes received.
pub const OWN_FRAME_BUFFERS_BYTES_MAX: usize = 256 << 20;
/// Bytes the writer buffers before a write syscall.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;

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
    let listener = TcpListener::bind(config.listen).await?;
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
        own_frame_buffer_bytes: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
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
    let retention = tokio::spawn(retention_loop(broker.clone(), stopped.clone()));
    let reaper = tokio::spawn(group_reaper(broker.clone(), stopped.clone()));
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
                match slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        tokio::spawn(connection(stream, peer, broker.clone(), stopped.clone(), slot));
                    }
                    Err(_) => {
                        tokio::spawn(refuse(stream, ErrorCode::TooManyConnections));
                    }
                }
            }
        }
    }
    drop(listener);
    broker.ready.store(false, Ordering::Release);
    retention.abort();
    reaper.abort();
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

/// Answers a connection the broker will not serve, then closes it.
async fn refuse(mut stream: TcpStream, error: ErrorCode) {
    let frame = error_frame(0, 0, error);
    let _ = stream.write_all(&frame.to_vec()).await;
    let _ = stream.shutdown().await;
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    broker: Arc<Broker>,
    mut stopped: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
) {
    broker.connections.fetch_add(1, Ordering::Relaxed);
    let (mut reader, writer) = stream.into_split();
    let (outgoing, queue) = mpsc::channel::<Outgoing>(broker.config.in_flight_requests_max.max(1));
    let writer_task = tokio::spawn(write_loop(writer, queue));
    let context = Arc::new(ConnectionContext {
        broker: broker.clone(),
        subscriptions: Mutex::new(HashMap::new()),
        outgoing,
        heartbeats_from: Mutex::new(None),
    });
    let budget_bytes = broker.config.in_flight_bytes_max.max(1);
    let budget = Arc::new(Semaphore::new(budget_bytes));
    let request_slots = Arc::new(Semaphore::new(broker.config.in_flight_requests_max.max(1)));
    let decoder = FrameDecoder::new(broker.config.frame_bytes_max);
    let mut buffer = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let mut reservation = FrameReservation {
        pool: broker.own_frame_buffer_bytes.clone(),
        bytes: 0,
    };
    let mut requests = tokio::task::JoinSet::new();
    'read: loop {
        // Decode every whole frame already buffered.
        loop {
            let frame_bytes = match decoder.frame_bytes(&buffer) {
                Ok(Some(bytes)) if buffer.len() >= bytes => bytes,
                Ok(_) => break,
                Err(error) => {
                    tracing::debug!(%peer, %error, "bad frame; closing");
                    let code = match error {
                        weir_protocol::FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
                        _ => ErrorCode::CorruptMessage,
                    };
                    let _ = context.push(error_frame(0, 0, code)).await;
                    break 'read;
                }
            };
            // Hold the frame's size against the budget until its response is written.
            let charge = u32::try_from(frame_bytes.min(budget_bytes)).unwrap_or(u32::MAX);
            let Ok(bytes_permit) = budget.clone().acquire_many_owned(charge).await else {
                break 'read;
            };
            // And one of the connection's request slots.
            let Ok(slot_permit) = request_slots.clone().acquire_owned().await else {
                break 'read;
            };
            let permit = (bytes_permit, slot_permit);
            // A buffer made for exactly this frame (`prepare_read_buffer`)
            // is taken whole, so that the frame is the only user of its
            // memory and its batch reaches the log uncopied; the next read
            // gets a fresh buffer. Other frames are split off as usual.
            let mut own_buffer = (buffer.len() == frame_bytes && buffer.capacity() == frame_bytes)
                .then(|| std::mem::take(&mut buffer));
            let frame = match decoder.decode(own_buffer.as_mut().unwrap_or(&mut buffer)) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(_) => {
                    // Unknown kind or reserved flags: answer, then close.
                    let _ = context
                        .push(error_frame(0, 0, ErrorCode::CorruptMessage))
                        .await;
                    break 'read;
                }
            };
            // Emptied by the split; dropping it leaves the frame alone.
            drop(own_buffer);
            let header = frame.header;
            if header.kind != FrameKind::Request {
                let _ = context
                    .push(error_frame(
                        header.api_key,
                        header.correlation_id,
                        ErrorCode::CorruptMessage,
                    ))
                    .await;
                break 'read;
            }
            let request = match Request::decode_body(header.api_key, header.api_version, frame.body)
            {
                Ok(request) => request,
                Err(error) => {
                    tracing::debug!(%peer, %error, "undecodable request; closing");
                    let _ = context
                        .push(error_frame(
                            header.api_key,
                            header.correlation_id,
                            error.error_code(),
                        ))
                        .await;
                    break 'read;
                }
            };
            let context = context.clone();
            // Produce is submitted to the logs here, on the reader, so a
            // connection's batches reach each partition in the order sent.
            let submitted = match request {
                Request::Produce(produce) => Ok(handlers::submit_produce(&context, produce)),
                other => Err(other),
            };
            requests.spawn(async move {
                let response = match submitted {
                    Ok(submitted) => handlers::finish_produce(&context, submitted)
                        .await
                        .map(Response::Produce),
                    Err(request) => handlers::handle(&context, request).await,
                };
                if let Some(response) = response {
                    let frame = response.encode(header.correlation_id);
                    let _ = context
                        .outgoing
                        .send(Outgoing {
                            frame,
                            _budget: Some(permit),
                        })
                        .await;
                }
            });
        }
        // Reap finished request tasks so the set stays small.
        while requests.try_join_next().is_some() {}
        prepare_read_buffer(&decoder, &mut buffer, &mut reservation);
        tokio::select! {
            _ = stopped.changed() => break 'read,
            read = reader.read_buf(&mut buffer) => match read {
                Ok(0) | Err(_) => break 'read,
                Ok(_) => {}
            },
        }
    }
    // Finish what is in flight, then let the writer drain and close.
    context.end_subscriptions();
    while requests.join_next().await.is_some() {}
    context.end_subscriptions();
    let heartbeats_from = *context
        .heartbeats_from
        .lock()
        .unwrap_or_else(|poison| poison.into_inner());
    if let Some((broker_id, incarnation)) = heartbeats_from {
        broker.controller.connection_lost(broker_id, incarnation);
    }
    drop(context);
    let _ = writer_task.await;
    broker.connections.fetch_sub(1, Ordering::Relaxed);
}

/// A connection's share of [`OWN_FRAME_BUFFERS_BYTES_MAX`]: the size of the
/// frame-sized buffer it allocated for a frame still arriving.
struct FrameReservation {
    pool: Arc<std::sync::atomic::AtomicUsize>,
    bytes: usize,
}

impl FrameReservation {
    /// Reserves `bytes` (replacing any earlier reservation) if the pool has room.
    fn take(&mut self, bytes: usize) -> bool {
        self.release();
        let taken = self
            .pool
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes)
                    .filter(|total| *total <= OWN_FRAME_BUFFERS_BYTES_MAX)
            })
            .is_ok();
        if taken {
            self.bytes = bytes;
        }
        taken
    }

    fn release(&mut self) {
        if self.bytes > 0 {
            self.pool.fetch_sub(self.bytes, Ordering::AcqRel);
            self.bytes = 0;
        }
    }
}

impl Drop for FrameReservation {
    fn drop(&mut self) {
        self.release();
    }
}

/// Makes room for the next read. The rest of a large frame is read into a
/// buffer exactly its size, which the frame then owns alone (so its batch
/// reaches the log uncopied); otherwise reads go to a shared buffer of
/// [`READ_CHUNK_BYTES`].
fn prepare_read_buffer(
    decoder: &FrameDecoder,
    buffer: &mut BytesMut,
    reservation: &mut FrameReservation,
) {
    if let Ok(Some(frame_bytes)) = decoder.frame_bytes(buffer)
        && frame_bytes > buffer.len()
        && frame_bytes >= OWN_BUFFER_FRAME_BYTES_MIN
    {
        if reservation.bytes == frame_bytes && buffer.capacity() == frame_bytes {
            // Already reading into this frame's own buffer.
            return;
        }
        if reservation.take(frame_bytes) {
            let mut own = BytesMut::with_capacity(frame_bytes);
            own.extend_from_slice(buffer);
            *buffer = own;
            return;
        }
    } else {
        // No frame is arriving into a buffer of its own any more.
        reservation.release();
    }
    if buffer.capacity() - buffer.len() < READ_CHUNK_BYTES / 2 {
        buffer.reserve(READ_CHUNK_BYTES);
    }
}

async fn write_loop(writer: tokio::net::tcp::OwnedWriteHalf, mut queue: mpsc::Receiver<Outgoing>) {
    let mut writer = BufWriter::with_capacity(WRITE_BUFFER_BYTES, writer);
    while let Some(outgoing) = queue.recv().await {
        if write_frame(&mut writer, &outgoing.frame.parts)
            .await
            .is_err()
        {
            return;
        }
        drop(outgoing);
        // Flush when nothing else is waiting, so replies batch under load.
        if queue.is_empty() && writer.flush().await.is_err() {
            return;
        }
    }
    let _ = writer.flush().await;
    let _ = writer.into_inner().shutdown().await;
}

async fn write_frame(
    writer: &mut BufWriter<tokio::net::tcp::OwnedWriteHalf>,
    parts: &[Bytes],
) -> std::io::Result<()> {
    for part in parts {
        writer.write_all(part).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use weir_protocol::frame::FRAME_BYTES_MAX_DEFAULT;

    /// The start of a frame announcing `frame_bytes` in all, with `received`
    /// of its bytes in.
    fn partial_frame(frame_bytes: usize, received: usize) -> BytesMut {
        let mut buffer = BytesMut::with_capacity(READ_CHUNK_BYTES);
        buffer.extend_from_slice(&((frame_bytes - 4) as u32).to_be_bytes());
        buffer.resize(received, 0);
        buffer
    }

    fn reservation(pool: &Arc<std::sync::atomic::AtomicUsize>) -> FrameReservation {
        FrameReservation {
            pool: pool.clone(),
            bytes: 0,
        }
    }

    /// A large frame's rest is read into a buffer of exactly its size,
    /// counted against the broker-wide allowance until the frame is in.
    #[test]
    fn a_large_frame_gets_a_buffer_of_its_own() {
        let decoder = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
        let pool = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut held = reservation(&pool);
        let mut buffer = partial_frame(1 << 20, 1000);
        prepare_read_buffer(&decoder, &mut buffer, &mut held);
        assert_eq!(buffer.capacity(), 1 << 20);
        assert_eq!(buffer.len(), 1000, "what had arrived is kept");
        assert_eq!(pool.load(Ordering::Acquire), 1 << 20);
        // Preparing again for the same frame changes nothing.
        prepare_read_buffer(&decoder, &mut buffer, &mut held);
        assert_eq!(pool.load(Ordering::Acquire), 1 << 20);
        // Once the frame is taken, the allowance is given back.
        buffer.clear();
        prepare_read_buffer(&decoder, &mut buffer, &mut held);
        assert_eq!(pool.load(Ordering::Acquire), 0);
        assert!(buffer.capacity() >= READ_CHUNK_BYTES / 2);
        drop(held);
        assert_eq!(pool.load(Ordering::Acquire), 0);
    }

    /// Past the broker-wide allowance (peers announcing big frames and
    /// sending little), reads go to the shared buffer, which grows only
    /// with bytes received; small frames never get a buffer of their own.
    #[test]
    fn announced_frames_reserve_no_more_than_the_allowance() {
        let decoder = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
        let pool = Arc::new(std::sync::atomic::AtomicUsize::new(
            OWN_FRAME_BUFFERS_BYTES_MAX - 1024,
        ));
        let mut held = reservation(&pool);
        let mut buffer = partial_frame(16 << 20, 100);
        prepare_read_buffer(&decoder, &mut buffer, &mut held);
        assert!(buffer.capacity() < 16 << 20, "no frame-sized buffer");
        assert_eq!(
            pool.load(Ordering::Acquire),
            OWN_FRAME_BUFFERS_BYTES_MAX - 1024
        );
        assert_eq!(held.bytes, 0);

        let pool = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut held = reservation(&pool);
        let mut buffer = partial_frame(1024, 100);
        prepare_read_buffer(&decoder, &mut buffer, &mut held);
        assert_eq!(pool.load(Ordering::Acquire), 0);
        assert!(buffer.capacity() >= READ_CHUNK_BYTES / 2);
    }
}
