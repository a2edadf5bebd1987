//! One client connection: reading frames under an in-flight budget,
//! answering requests concurrently, writing responses and pushes, and the
//! limits that keep a careless or hostile peer from holding the broker's
//! resources (idle and half-sent connections, connections per address).
//!
//! Per connection, one reader task decodes frames and spawns a task per
//! request; responses and pushes go through a bounded channel to one writer
//! task. The reader takes the frame's size from a per-connection byte budget
//! before it reads the next frame and the writer returns it once the
//! response is written: a connection at its budget is simply not read, which
//! is the producer's backpressure.
//!
//! An idle connection holds no buffers: the read buffer is allocated when
//! bytes are readable and dropped once every frame in it is taken, and the
//! write buffer lives only while there is something to write. Memory thus
//! follows the connections that are busy, not the ones that are open.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::time::Instant;
use weir_protocol::frame::FrameDecoder;
use weir_protocol::message::error_frame;
use weir_protocol::{ErrorCode, FrameKind, Request, Response};

use crate::broker::Broker;
use crate::context::{ConnectionContext, Outgoing};
use crate::handlers;
pub use crate::limits::{LimitLog, LimitReason};

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
/// How long a refused connection is read (and its bytes dropped) after the
/// error frame is sent, so that it closes with FIN rather than RST: a reset
/// can make the peer's kernel drop the error frame unread.
const REFUSE_LINGER_MS: u64 = 1_000;
/// Most bytes read from a refused connection while it lingers.
const REFUSE_DRAIN_BYTES_MAX: usize = 64 * 1024;
/// Refused connections lingering at once; past it, refusals close at once.
pub const REFUSALS_LINGERING_MAX: usize = 256;
/// Counts a closed or refused connection and logs it (rate limited).
pub fn record_limit(broker: &Broker, reason: LimitReason, peer: SocketAddr) {
    let labels = vec![("reason".to_string(), reason.label().to_string())];
    match reason {
        LimitReason::BrokerLimit | LimitReason::AddressLimit => {
            broker
                .metrics
                .connections_refused
                .get_or_create(&labels)
                .inc();
        }
        _ => {
            broker
                .metrics
                .connections_closed
                .get_or_create(&labels)
                .inc();
        }
    }
    if broker.limit_log.due(reason, crate::clock::now_ms()) {
        let config = &broker.config;
        match reason {
            LimitReason::Idle => tracing::info!(
                %peer,
                connections_max_idle_ms = config.connections_max_idle_ms,
                "closed an idle connection (further ones are counted in weir_connections_closed_total)"
            ),
            LimitReason::FrameTimeout => tracing::warn!(
                %peer,
                frame_timeout_ms = config.frame_timeout_ms,
                "closed a connection that began a frame and did not finish it"
            ),
            LimitReason::SendTimeout => tracing::warn!(
                %peer,
                frame_timeout_ms = config.frame_timeout_ms,
                "closed a connection that stopped reading its responses"
            ),
            LimitReason::BrokerLimit => tracing::warn!(
                %peer,
                connections_max = config.connections_max,
                "refused a connection: the broker's connection limit is reached"
            ),
            LimitReason::AddressLimit => tracing::warn!(
                %peer,
                connections_max_per_address = config.connections_per_address_max(),
                "refused a connection: this address's connection limit is reached"
            ),
        }
    }
}

/// Connections open per client address, under a limit. An address's entry
/// goes when its last connection closes, so the map holds only addresses
/// with connections open.
#[derive(Debug)]
pub struct AddressSlots {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl AddressSlots {
    /// Slots for at most `max` connections per address.
    pub fn new(max: usize) -> Arc<AddressSlots> {
        Arc::new(AddressSlots {
            max: max.max(1),
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for one more connection from `address`, if it has one left.
    pub fn try_acquire(self: &Arc<Self>, address: IpAddr) -> Option<AddressSlot> {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let count = open.entry(address).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            slots: self.clone(),
            address,
        })
    }

    /// Connections open from `address`.
    pub fn open(&self, address: IpAddr) -> usize {
        let open = self
            .open
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        open.get(&address).copied().unwrap_or(0)
    }
}

/// One connection's place in [`AddressSlots`], given back on drop.
#[derive(Debug)]
pub struct AddressSlot {
    slots: Arc<AddressSlots>,
    address: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self
            .slots
            .open
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if let Some(count) = open.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.address);
            }
        }
    }
}

/// Answers a connection the broker will not serve, then closes it; with
/// a `linger` permit (refusals lingering at once are limited, so a flood
/// of connects cannot hold descriptors) it first reads what the peer sent.
pub async fn refuse(stream: TcpStream, error: ErrorCode, linger: Option<OwnedSemaphorePermit>) {
    let frame = error_frame(0, 0, error);
    let (mut reader, mut writer) = stream.into_split();
    if writer.write_all(&frame.to_vec()).await.is_err() {
        return;
    }
    let _ = writer.shutdown().await;
    if linger.is_none() {
        return;
    }
    // Read what the peer already sent (its first request, usually) until it
    // closes or the linger ends: closing with unread bytes would reset the
    // connection, and a reset can discard the error frame at the peer.
    let drain = async {
        let mut scratch = [0u8; 4096];
        let mut drained = 0;
        while drained < REFUSE_DRAIN_BYTES_MAX {
            match reader.read(&mut scratch).await {
                Ok(0) | Err(_) => return,
                Ok(read) => drained += read,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(REFUSE_LINGER_MS), drain).await;
}

/// A deadline so far away it never fires (a disabled limit).
fn never() -> Instant {
    Instant::now() + Duration::from_secs(365 * 24 * 3600)
}

/// Serves one connection until the peer closes it, a limit closes it, or
/// the broker stops.
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    broker: Arc<Broker>,
    mut stopped: watch::Receiver<bool>,
    _slots: (OwnedSemaphorePermit, AddressSlot),
) {
    let open = broker.connections.fetch_add(1, Ordering::Relaxed) + 1;
    broker.connections_peak.fetch_max(open, Ordering::Relaxed);
    let (reader, writer) = stream.into_split();
    let (outgoing, queue) = mpsc::channel::<Outgoing>(broker.config.in_flight_requests_max.max(1));
    let frame_timeout = (broker.config.frame_timeout_ms > 0)
        .then(|| Duration::from_millis(broker.config.frame_timeout_ms));
    let mut writer_task = Some(tokio::spawn(write_loop(writer, queue, frame_timeout)));
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
    // Allocated when bytes arrive; empty (no allocation) while idle.
    let mut buffer = BytesMut::new();
    let mut reservation = FrameReservation {
        pool: broker.own_frame_buffer_bytes.clone(),
        bytes: 0,
    };
    let mut requests = tokio::task::JoinSet::new();
    let idle_timeout = (broker.config.connections_max_idle_ms > 0)
        .then(|| Duration::from_millis(broker.config.connections_max_idle_ms));
    // The last moment the connection was seen busy (bytes arrived, or a
    // request or subscription was in progress when the idle clock was checked).
    let mut busy_at = Instant::now();
    // When the first byte of a frame not yet whole arrived.
    let mut frame_started: Option<Instant> = None;
    // Why a limit closed the connection, if one did.
    let mut closed_by: Option<LimitReason> = None;
    let far_away = never();
    let limit_timer = tokio::time::sleep_until(far_away);
    tokio::pin!(limit_timer);
    'read: loop {
        let mut decoded_any = false;
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
            decoded_any = true;
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
            let arrived = Instant::now();
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
                    context
                        .broker
                        .metrics
                        .observe_request(header.api_key, arrived.elapsed().as_secs_f64());
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
        if buffer.is_empty() {
            // Nothing partly read: hold no buffer while waiting.
            frame_started = None;
            buffer = BytesMut::new();
            reservation.release();
        } else if decoded_any || frame_started.is_none() {
            // What is left began in the latest read.
            frame_started = Some(Instant::now());
        }
        let frame_deadline = frame_started
            .zip(frame_timeout)
            .map(|(started, timeout)| started + timeout);
        let idle_deadline = idle_timeout.map(|timeout| busy_at + timeout);
        let deadline = frame_deadline
            .into_iter()
            .chain(idle_deadline)
            .min()
            .unwrap_or(far_away);
        // Only ever brought forward here (a reset per request would cost a
        // timer-wheel lock each); a timer that fires early re-arms below.
        if deadline < limit_timer.deadline() {
            limit_timer.as_mut().reset(deadline);
        }
        tokio::select! {
            // Bytes first: a request that has arrived is served, not cut
            // off by a limit that fell due in the same instant.
            biased;
            _ = stopped.changed() => break 'read,
            ended = async {
                match writer_task.as_mut() {
                    Some(task) => task.await,
                    None => std::future::pending().await,
                }
            } => {
                // The writer gave up (the peer stopped reading, or the
                // socket failed): nothing more can be answered, so waiting
                // long polls and acknowledgements are not waited for (their
                // appends were submitted already).
                writer_task = None;
                requests.abort_all();
                if let Ok(Err(WriteStopped::Stalled)) = ended {
                    record_limit(&broker, LimitReason::SendTimeout, peer);
                }
                break 'read;
            }
            readable = reader.readable() => {
                if readable.is_err() {
                    break 'read;
                }
                prepare_read_buffer(&decoder, &mut buffer, &mut reservation);
                match reader.try_read_buf(&mut buffer) {
                    Ok(0) => break 'read,
                    Ok(_) => busy_at = Instant::now(),
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => break 'read,
                }
            }
            // A request finished: the idle clock starts again from its answer.
            Some(_) = requests.join_next(), if !requests.is_empty() => busy_at = Instant::now(),
            () = &mut limit_timer => {
                let now = Instant::now();
                if frame_deadline.is_some_and(|deadline| now >= deadline) {
                    closed_by = Some(LimitReason::FrameTimeout);
                    break 'read;
                }
                if idle_deadline.is_some_and(|deadline| now >= deadline) {
                    let subscribed = !context
                        .subscriptions
                        .lock()
                        .unwrap_or_else(|poison| poison.into_inner())
                        .is_empty();
                    if requests.is_empty() && !subscribed {
                        closed_by = Some(LimitReason::Idle);
                        break 'read;
                    }
                    // A long poll or a subscription in progress is not idle.
                    busy_at = now;
                }
                // Re-armed at the next turn with the deadlines as they are then.
                limit_timer.as_mut().reset(far_away);
            }
        }
    }
    if let Some(reason) = closed_by {
        record_limit(&broker, reason, peer);
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
    if let Some(writer_task) = writer_task
        && let Ok(Err(WriteStopped::Stalled)) = writer_task.await
        && closed_by.is_none()
    {
        record_limit(&broker, LimitReason::SendTimeout, peer);
    }
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

/// Why a writer stopped before its queue closed.
#[derive(Debug)]
enum WriteStopped {
    /// The socket failed.
    Failed,
    /// A frame was not sent within the frame timeout.
    Stalled,
}

/// Writes queued frames until the queue closes. The write buffer exists
/// only while frames are waiting: an idle connection holds none.
async fn write_loop(
    mut writer: tokio::net::tcp::OwnedWriteHalf,
    mut queue: mpsc::Receiver<Outgoing>,
    frame_timeout: Option<Duration>,
) -> Result<(), WriteStopped> {
    while let Some(first) = queue.recv().await {
        let mut buffered = BufWriter::with_capacity(WRITE_BUFFER_BYTES, writer);
        let mut next = Some(first);
        while let Some(outgoing) = next.take() {
            bounded(
                frame_timeout,
                write_frame(&mut buffered, &outgoing.frame.parts),
            )
            .await?;
            drop(outgoing);
            next = queue.try_recv().ok();
        }
        // Nothing else is waiting: flush, so replies batch under load.
        bounded(frame_timeout, buffered.flush()).await?;
        writer = buffered.into_inner();
    }
    let _ = writer.shutdown().await;
    Ok(())
}

/// `io` within `timeout` (if any).
async fn bounded(
    timeout: Option<Duration>,
    io: impl std::future::Future<Output = std::io::Result<()>>,
) -> Result<(), WriteStopped> {
    let result = match timeout {
        Some(timeout) => tokio::time::timeout(timeout, io)
            .await
            .map_err(|_| WriteStopped::Stalled)?,
        None => io.await,
    };
    result.map_err(|_| WriteStopped::Failed)
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

    /// An address gets at most its limit of connections; closing one frees
    /// its slot, and an address with none open leaves no entry behind.
    #[test]
    fn connections_per_address_are_limited_and_forgotten() {
        let slots = AddressSlots::new(2);
        let one: IpAddr = [127, 0, 0, 1].into();
        let other: IpAddr = [127, 0, 0, 2].into();
        let first = slots.try_acquire(one).expect("first");
        let second = slots.try_acquire(one).expect("second");
        assert!(slots.try_acquire(one).is_none(), "third refused");
        let elsewhere = slots
            .try_acquire(other)
            .expect("another address has its own");
        drop(first);
        let third = slots.try_acquire(one).expect("a freed slot is reused");
        drop((second, third, elsewhere));
        assert_eq!(slots.open(one), 0);
        assert!(
            slots.open.lock().expect("lock").is_empty(),
            "no entry for addresses without connections"
        );
    }
}
