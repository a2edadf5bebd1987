//! What the request handlers of one connection share: the broker, the
//! connection's subscriptions, and the queue to its writer task.

use std::collections::HashMap;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, OwnedSemaphorePermit, mpsc};
use weir_protocol::message::EncodedFrame;

use crate::broker::Broker;

/// A frame for the writer, with the in-flight budget it releases when written.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) frame: EncodedFrame,
    pub(crate) _budget: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

/// A subscription's control block, shared by the connection and its push task.
#[derive(Debug)]
pub struct SubscriptionControl {
    /// Bytes the broker may still push (may go below zero by one batch).
    pub credit_bytes: AtomicI64,
    /// Woken when credit is granted.
    pub credit_granted: Notify,
    /// The push task.
    pub task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// What request handlers of one connection share.
#[derive(Debug)]
pub struct ConnectionContext {
    /// The broker.
    pub broker: Arc<Broker>,
    /// Subscriptions of this connection by id.
    pub subscriptions: Mutex<HashMap<u32, Arc<SubscriptionControl>>>,
    pub(crate) outgoing: mpsc::Sender<Outgoing>,
    /// The broker (and incarnation) whose heartbeats arrive on this
    /// connection: when it closes, the controller learns at once that the
    /// broker may be gone (a process that dies closes its sockets).
    pub heartbeats_from: Mutex<Option<(u32, u64)>>,
}

impl ConnectionContext {
    /// Queues a push frame; false once the connection is gone.
    pub async fn push(&self, frame: EncodedFrame) -> bool {
        self.outgoing
            .send(Outgoing {
                frame,
                _budget: None,
            })
            .await
            .is_ok()
    }
}

impl ConnectionContext {
    /// A sender for a push task (which must not hold the context itself).
    pub fn push_sender(&self) -> PushSender {
        PushSender(self.outgoing.clone())
    }

    /// Stops every push task of the connection.
    pub(crate) fn end_subscriptions(&self) {
        let subscriptions =
            std::mem::take(&mut *self.subscriptions.lock().unwrap_or_else(|p| p.into_inner()));
        for control in subscriptions.values() {
            if let Some(task) = control
                .task
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
            {
                task.abort();
            }
        }
    }
}

/// Queues push frames for one connection's writer.
#[derive(Debug, Clone)]
pub struct PushSender(mpsc::Sender<Outgoing>);

impl PushSender {
    /// Queues a push frame, waiting while the writer is behind; false once
    /// the connection is gone.
    pub async fn push(&self, frame: EncodedFrame) -> bool {
        self.0
            .send(Outgoing {
                frame,
                _budget: None,
            })
            .await
            .is_ok()
    }
}
