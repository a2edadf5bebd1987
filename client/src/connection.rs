//! One multiplexed connection to a broker: many requests in flight, matched
//! to responses by correlation id; pushes routed to their subscription.
//!
//! Lifecycle: a reader task owns the socket's read half and completes the
//! pending calls; a writer task owns the write half. When either ends (the
//! broker closed, an I/O error, or the `Connection` is dropped), every
//! pending call fails with `Closed` and every subscription channel closes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use weir_protocol::frame::{FRAME_BYTES_MAX_DEFAULT, FrameDecoder};
use weir_protocol::message::SubscriptionPush;
use weir_protocol::{ErrorCode, FrameKind, Request, Response};

use crate::error::{ClientError, Result};

/// Frames queued for the writer before callers wait. Bounded: a caller that
/// outruns the socket waits instead of growing a queue.
pub const WRITE_QUEUE_FRAMES: usize = 256;

/// Calls waiting for responses by correlation id; `None` once the reader
/// has ended, so that a call started after that fails at once instead of
/// waiting out its timeout.
type Pending = Arc<Mutex<Option<HashMap<u32, oneshot::Sender<Result<Response>>>>>>;
type Subscriptions = Arc<Mutex<HashMap<u32, mpsc::Sender<SubscriptionPush>>>>;

/// A connection to one broker. Cheap to clone; all clones share it.
#[derive(Debug, Clone)]
pub struct Connection {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    addr: String,
    writer: mpsc::Sender<Vec<Bytes>>,
    pending: Pending,
    subscriptions: Subscriptions,
    next_correlation: AtomicU32,
    request_timeout: Duration,
    reader_task: tokio::task::JoinHandle<()>,
    /// Set by the reader once it has ended (before it fails the calls and
    /// closes the subscriptions), so `is_closed` takes no lock.
    closed: Arc<AtomicBool>,
    /// What calls fail with once the connection has ended: `Closed`, or
    /// what the broker said when it refused the connection.
    ended_with: Arc<Mutex<ClientError>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader_task.abort();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

impl Connection {
    /// Connects to `addr` (`host:port`).
    ///
    /// # Errors
    /// [`ClientError::Connect`].
    pub async fn connect(addr: &str, request_timeout: Duration) -> Result<Connection> {
        // Bounded like a request: an unreachable host must not hold a
        // caller for the OS's SYN retries (minutes).
        let stream = match tokio::time::timeout(request_timeout, TcpStream::connect(addr)).await {
            Ok(connected) => connected.map_err(|error| ClientError::Connect {
                addr: addr.to_string(),
                message: error.to_string(),
            })?,
            Err(_) => {
                return Err(ClientError::Connect {
                    addr: addr.to_string(),
                    message: format!("no answer within {} ms", request_timeout.as_millis()),
                });
            }
        };
        let _ = stream.set_nodelay(true);
        let (reader, mut writer) = stream.into_split();
        let (write_queue, mut frames) = mpsc::channel::<Vec<Bytes>>(WRITE_QUEUE_FRAMES);
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let subscriptions: Subscriptions = Arc::new(Mutex::new(HashMap::new()));
        tokio::spawn(async move {
            while let Some(parts) = frames.recv().await {
                for part in parts {
                    if writer.write_all(&part).await.is_err() {
                        return;
                    }
                }
            }
            let _ = writer.shutdown().await;
        });
        let closed = Arc::new(AtomicBool::new(false));
        let ended_with = Arc::new(Mutex::new(ClientError::Closed));
        let reader_task = tokio::spawn(read_loop(
            reader,
            addr.to_string(),
            pending.clone(),
            subscriptions.clone(),
            closed.clone(),
            ended_with.clone(),
        ));
        Ok(Connection {
            inner: Arc::new(Inner {
                addr: addr.to_string(),
                writer: write_queue,
                pending,
                subscriptions,
                next_correlation: AtomicU32::new(1),
                request_timeout,
                reader_task,
                closed,
                ended_with,
            }),
        })
    }

    /// A new connection to the same broker, with the same request timeout
    /// (to replace this one once it has closed).
    ///
    /// # Errors
    /// [`ClientError::Connect`].
    pub async fn reopen(&self) -> Result<Connection> {
        Connection::connect(&self.inner.addr, self.inner.request_timeout).await
    }

    /// The broker address.
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// Whether the connection has ended (the broker closed it, or an I/O
    /// error): every call on it now fails with `Closed`.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire) || self.inner.writer.is_closed()
    }

    /// Sends a request and waits for its response.
    ///
    /// # Errors
    /// [`ClientError::Closed`], [`ClientError::Timeout`], or a protocol error.
    pub async fn call(&self, request: Request) -> Result<Response> {
        self.start_call(request).await?.wait().await
    }

    /// Queues a request for the writer and returns its pending response.
    /// Requests started one after another leave on the wire in that order.
    ///
    /// # Errors
    /// [`ClientError::Closed`].
    pub async fn start_call(&self, request: Request) -> Result<PendingCall> {
        let correlation = self.inner.next_correlation.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        match lock(&self.inner.pending).as_mut() {
            Some(calls) => calls.insert(correlation, sender),
            None => return Err(lock(&self.inner.ended_with).clone()),
        };
        let frame = request.encode(correlation);
        if self.inner.writer.send(frame.parts).await.is_err() {
            forget(&self.inner.pending, correlation);
            return Err(lock(&self.inner.ended_with).clone());
        }
        Ok(PendingCall {
            receiver,
            correlation,
            pending: self.inner.pending.clone(),
            timeout: self.inner.request_timeout,
        })
    }

    /// Sends a request whose response the broker will not send (Produce with
    /// acks = 0).
    ///
    /// # Errors
    /// [`ClientError::Closed`].
    pub async fn send_only(&self, request: Request) -> Result<()> {
        let correlation = self.inner.next_correlation.fetch_add(1, Ordering::Relaxed);
        self.inner
            .writer
            .send(request.encode(correlation).parts)
            .await
            .map_err(|_| ClientError::Closed)
    }

    /// Registers where pushes for `subscription_id` go (before subscribing).
    /// `capacity` must hold every push the subscription's credit allows, so
    /// that the reader never waits on a slow application (which would stall
    /// every response on the connection).
    pub fn route_pushes(
        &self,
        subscription_id: u32,
        capacity: usize,
    ) -> mpsc::Receiver<SubscriptionPush> {
        let (sender, receiver) = mpsc::channel(capacity.max(1));
        lock(&self.inner.subscriptions).insert(subscription_id, sender);
        receiver
    }

    /// Stops routing pushes for `subscription_id`.
    pub fn forget_pushes(&self, subscription_id: u32) {
        lock(&self.inner.subscriptions).remove(&subscription_id);
    }

    /// A fresh id, unique on this connection, for a subscription.
    pub fn next_id(&self) -> u32 {
        self.inner.next_correlation.fetch_add(1, Ordering::Relaxed)
    }
}

/// A request on the wire, waiting for its response.
#[derive(Debug)]
pub struct PendingCall {
    receiver: oneshot::Receiver<Result<Response>>,
    correlation: u32,
    pending: Pending,
    timeout: Duration,
}

impl PendingCall {
    /// Waits up to `timeout` instead of the connection's request timeout
    /// (a JoinGroup may rightly take a whole rebalance).
    pub fn with_timeout(mut self, timeout: Duration) -> PendingCall {
        self.timeout = timeout;
        self
    }

    /// Waits for the response, up to the connection's request timeout.
    ///
    /// # Errors
    /// [`ClientError::Closed`], [`ClientError::Timeout`], or the response's error.
    pub async fn wait(self) -> Result<Response> {
        match tokio::time::timeout(self.timeout, self.receiver).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => {
                forget(&self.pending, self.correlation);
                Err(ClientError::Timeout)
            }
        }
    }
}

/// Removes a call's waiter, if it is still there.
fn forget(pending: &Pending, correlation: u32) -> Option<oneshot::Sender<Result<Response>>> {
    lock(pending)
        .as_mut()
        .and_then(|calls| calls.remove(&correlation))
}

async fn read_loop(
    mut reader: tokio::net::tcp::OwnedReadHalf,
    addr: String,
    pending: Pending,
    subscriptions: Subscriptions,
    closed: Arc<AtomicBool>,
    ended_with: Arc<Mutex<ClientError>>,
) {
    let mut failure = ClientError::Closed;
    let decoder = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
    let mut buffer = BytesMut::with_capacity(64 * 1024);
    'read: loop {
        loop {
            let frame = match decoder.decode(&mut buffer) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(_) => break 'read,
            };
            let header = frame.header;
            match header.kind {
                FrameKind::Push => {
                    let sender = lock(&subscriptions).get(&header.correlation_id).cloned();
                    if let (Some(sender), Ok(push)) = (sender, SubscriptionPush::decode(frame.body))
                    {
                        // Credit bounds what the broker sends, so this waits rarely.
                        let _ = sender.send(push).await;
                    }
                }
                FrameKind::Response => {
                    let waiter = forget(&pending, header.correlation_id);
                    let result = decode_response(header.api_key, frame.body);
                    let closing = matches!(
                        result,
                        Err(ClientError::Broker(_)) | Err(ClientError::Protocol(_))
                    );
                    let refused = matches!(
                        result,
                        Err(ClientError::Broker(ErrorCode::TooManyConnections))
                    );
                    if let Some(waiter) = waiter {
                        let _ = waiter.send(result);
                    }
                    if closing && header.correlation_id == 0 {
                        if refused {
                            failure = ClientError::TooManyConnections { addr };
                        }
                        break 'read;
                    }
                }
                FrameKind::Request => break 'read,
            }
        }
        match reader.read_buf(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    // Fail every pending call; close every subscription channel (whoever
    // sees either end already finds the connection closed).
    *lock(&ended_with) = failure.clone();
    closed.store(true, Ordering::Release);
    let calls = lock(&pending).take().unwrap_or_default();
    for (_, waiter) in calls {
        let _ = waiter.send(Err(failure.clone()));
    }
    lock(&subscriptions).clear();
}

fn decode_response(api_key: u16, body: Bytes) -> Result<Response> {
    // A response whose body is a lone error code is the broker refusing the
    // connection's input (or Credit/Unsubscribe answering).
    match Response::decode_body(api_key, 0, body.clone()) {
        Ok(response) => Ok(response),
        Err(error) if body.len() == 2 => {
            let code = ErrorCode::from_code(u16::from_be_bytes([body[0], body[1]]));
            if code.is_ok() {
                Err(ClientError::Protocol(error.to_string()))
            } else {
                Err(ClientError::Broker(code))
            }
        }
        Err(error) => Err(ClientError::Protocol(error.to_string())),
    }
}
