//! Consumer-group membership for [`crate::Consumer::subscribe`]: joining,
//! heartbeats in a task of their own, rebalances, and committed offsets.
//!
//! The coordinator assigns partitions (`range` or `roundrobin`); a member
//! learns of a rebalance from its heartbeat (`RebalanceInProgress`), and the
//! consumer then revokes everything it owns (committing first, see
//! [`RebalanceListener`]), rejoins, and starts each newly assigned partition
//! at the group's committed offset (or `reset` where there is none).
//! Delivery is at least once: offsets are committed after the records
//! before them were handed to the application.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use weir_protocol::message::*;
use weir_protocol::{ErrorCode, Request, Response};

use crate::connection::Connection;
use crate::consumer::Offset;
use crate::error::{ClientError, Result};
use crate::router::Router;

/// Group membership settings.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// The coordinator drops a member it has not heard from for this long.
    /// Default 10 s.
    pub session_timeout_ms: u32,
    /// Time between heartbeats. Default 1 s (well under the session).
    pub heartbeat_interval_ms: u64,
    /// How long a rebalance waits for every member. Default 30 s.
    pub rebalance_timeout_ms: u32,
    /// `range` (default), `roundrobin`, or `cooperative-sticky` (members
    /// keep the partitions they keep through a rebalance, without
    /// re-reading them; what moves is handed over in a second round).
    pub assignor: String,
    /// Static membership: a stable id per application instance, so a
    /// restart within the session timeout keeps its partitions without a
    /// rebalance. Default none.
    pub instance_id: Option<String>,
    /// Commit positions every `auto_commit_interval_ms` and before giving
    /// partitions up. Default true.
    pub auto_commit: bool,
    /// Default 5 s.
    pub auto_commit_interval_ms: u64,
    /// Where a partition without a committed offset starts: `Earliest` or
    /// `Latest` (default, as Kafka's `auto.offset.reset`).
    pub reset: Offset,
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            session_timeout_ms: 10_000,
            heartbeat_interval_ms: 1_000,
            rebalance_timeout_ms: 30_000,
            assignor: "range".to_string(),
            instance_id: None,
            auto_commit: true,
            auto_commit_interval_ms: 5_000,
            reset: Offset::Latest,
        }
    }
}

/// Told about partitions coming and going in a rebalance.
pub trait RebalanceListener: Send {
    /// Before `partitions` are given up. Offsets pushed into `commits`
    /// (topic, partition, next offset to consume) are committed before the
    /// consumer rejoins, so the next owner starts right after what this
    /// one processed.
    fn revoked(&mut self, partitions: &[(String, u32)], commits: &mut Vec<(String, u32, u64)>) {
        let _ = (partitions, commits);
    }

    /// After `partitions` were assigned (reading them starts next).
    fn assigned(&mut self, partitions: &[(String, u32)]) {
        let _ = partitions;
    }
}

/// What a JoinGroup gave: the identity and the assignment.
pub(crate) type Joined = (Identity, Vec<(String, u32)>);

/// Who this member is in which generation (shared with the heartbeat task).
#[derive(Debug, Clone, Default)]
pub(crate) struct Identity {
    pub member_id: String,
    pub generation: i32,
}

/// A consumer's membership of one group.
pub(crate) struct Membership {
    pub group: String,
    pub topics: Vec<String>,
    pub config: GroupConfig,
    pub identity: Arc<Mutex<Identity>>,
    /// Set by the heartbeat task when the member must rejoin.
    pub rejoin: Arc<AtomicBool>,
    /// Set by the heartbeat task when membership cannot go on: the
    /// connection failed, or a newer process of this static instance took
    /// over (`FencedInstanceId`).
    pub failed: Arc<Mutex<Option<ClientError>>>,
    /// Set by the heartbeat task (and by calls answered so) when the
    /// coordinator is no longer this connection's broker: the consumer
    /// finds the new one and reattaches there.
    pub coordinator_moved: Arc<AtomicBool>,
    /// Serialises commits, so a background commit never lands after a
    /// later one (an offset must not go backwards).
    pub commit_order: Arc<tokio::sync::Mutex<()>>,
    /// Woken with `rejoin`.
    pub wake: Arc<Notify>,
    pub heartbeat: tokio::task::JoinHandle<()>,
    pub last_commit: tokio::time::Instant,
    /// A JoinGroup under way in a task of its own, so that a `next()`
    /// dropped mid-rebalance (a timeout around it, say) does not lose it:
    /// the next call picks it up.
    pub pending_join: Option<tokio::task::JoinHandle<Result<Joined>>>,
    /// A join's result not yet fully applied (for the same reason).
    pub joined: Option<Joined>,
    /// In a mutex only so the consumer stays `Sync` (it is called from the
    /// consumer's own `&mut` methods).
    pub listener: Option<Mutex<Box<dyn RebalanceListener>>>,
    /// Set by [`Membership::reattach`] until the next rebalance is done:
    /// the partitions held were not resubscribed on the new connection, so
    /// that rebalance must start every partition afresh.
    pub reattached: bool,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.heartbeat.abort();
        if let Some(join) = &self.pending_join {
            join.abort();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

impl Membership {
    /// Rebalance work is due or under way.
    pub fn rebalancing(&self) -> bool {
        self.rejoin.load(Ordering::Acquire) || self.pending_join.is_some() || self.joined.is_some()
    }

    /// Joins (or picks up the join already under way) and keeps the result
    /// until [`Membership::joined`] is cleared by whoever applied it.
    pub async fn join_resumable(
        &mut self,
        connection: &Connection,
    ) -> Result<(Identity, Vec<(String, u32)>)> {
        if let Some(joined) = &self.joined {
            return Ok(joined.clone());
        }
        if self.pending_join.is_none() {
            let (connection, group, topics, config) = (
                connection.clone(),
                self.group.clone(),
                self.topics.clone(),
                self.config.clone(),
            );
            let member_id = self.identity().member_id;
            self.pending_join = Some(tokio::spawn(async move {
                join(&connection, &group, &topics, &config, &member_id).await
            }));
        }
        let outcome = match self.pending_join.as_mut() {
            Some(pending) => pending.await,
            None => return Err(ClientError::Closed),
        };
        self.pending_join = None;
        let joined = outcome.map_err(|_| ClientError::Closed)??;
        *lock(&self.identity) = joined.0.clone();
        self.joined = Some(joined.clone());
        Ok(joined)
    }

    /// Carries the membership over to a new connection (the old one was
    /// lost): heartbeats go there, and the member rejoins, since a
    /// rebalance may have happened (or the coordinator restarted) while it
    /// was away. A join under way on the old connection is abandoned. A
    /// failure the old heartbeat reported (fenced, say) stays reported.
    pub fn reattach(&mut self, connection: Connection) {
        self.heartbeat.abort();
        if let Some(join) = self.pending_join.take() {
            join.abort();
        }
        self.joined = None;
        self.reattached = true;
        self.coordinator_moved.store(false, Ordering::Release);
        self.heartbeat = tokio::spawn(heartbeat_loop(
            connection,
            self.group.clone(),
            Duration::from_millis(self.config.heartbeat_interval_ms.max(10)),
            self.identity.clone(),
            HeartbeatSignals {
                rejoin: self.rejoin.clone(),
                failed: self.failed.clone(),
                wake: self.wake.clone(),
                coordinator_moved: self.coordinator_moved.clone(),
            },
        ));
        self.rejoin.store(true, Ordering::Release);
    }

    /// When the next automatic commit is due.
    pub fn commit_due_at(&self) -> tokio::time::Instant {
        self.last_commit + Duration::from_millis(self.config.auto_commit_interval_ms.max(1))
    }

    /// An automatic commit is due now.
    pub fn auto_commit_due(&self) -> bool {
        self.config.auto_commit && tokio::time::Instant::now() >= self.commit_due_at()
    }

    /// The current member id and generation.
    pub fn identity(&self) -> Identity {
        lock(&self.identity).clone()
    }

    /// Starts heartbeating for a member that has joined.
    pub fn start(
        connection: Connection,
        group: String,
        topics: Vec<String>,
        config: GroupConfig,
        identity: Identity,
        listener: Option<Box<dyn RebalanceListener>>,
    ) -> Membership {
        let identity = Arc::new(Mutex::new(identity));
        let rejoin = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(Notify::new());
        let failed = Arc::new(Mutex::new(None));
        let coordinator_moved = Arc::new(AtomicBool::new(false));
        let heartbeat = tokio::spawn(heartbeat_loop(
            connection,
            group.clone(),
            Duration::from_millis(config.heartbeat_interval_ms.max(10)),
            identity.clone(),
            HeartbeatSignals {
                rejoin: rejoin.clone(),
                failed: failed.clone(),
                wake: wake.clone(),
                coordinator_moved: coordinator_moved.clone(),
            },
        ));
        Membership {
            group,
            topics,
            config,
            identity,
            rejoin,
            failed,
            coordinator_moved,
            commit_order: Arc::new(tokio::sync::Mutex::new(())),
            wake,
            heartbeat,
            last_commit: tokio::time::Instant::now(),
            pending_join: None,
            joined: None,
            listener: listener.map(Mutex::new),
            reattached: false,
        }
    }
}

struct HeartbeatSignals {
    rejoin: Arc<AtomicBool>,
    failed: Arc<Mutex<Option<ClientError>>>,
    wake: Arc<Notify>,
    coordinator_moved: Arc<AtomicBool>,
}

/// Whether `error` says the group's coordinator is elsewhere now (its
/// offsets partition's leadership moved) or not yet known.
pub(crate) fn coordinator_moved(error: &ClientError) -> bool {
    matches!(
        error,
        ClientError::Broker(ErrorCode::NotCoordinator | ErrorCode::CoordinatorNotAvailable)
    )
}

/// A connection to the coordinator of `group`, asked of any broker.
///
/// # Errors
/// `Broker(CoordinatorNotAvailable)` (retriable) while the group's offsets
/// partition has no leader; connection errors.
pub(crate) async fn find_coordinator(router: &Router, group: &str) -> Result<Connection> {
    let connection = router.any().await?;
    let response = connection
        .call(Request::FindCoordinator(FindCoordinatorRequest {
            group: group.to_string(),
        }))
        .await?;
    let Response::FindCoordinator(found) = response else {
        return Err(ClientError::Protocol(format!(
            "unexpected {:?}",
            response.api()
        )));
    };
    if !found.error.is_ok() {
        return Err(ClientError::Broker(found.error));
    }
    if router.is_single().await? {
        // One broker: the connection the client has, whatever address it
        // advertises (a proxy or a port mapping in between).
        return Ok(connection);
    }
    router
        .connection_to(&format!("{}:{}", found.host, found.port))
        .await
}

async fn heartbeat_loop(
    connection: Connection,
    group: String,
    interval: Duration,
    identity: Arc<Mutex<Identity>>,
    signals: HeartbeatSignals,
) {
    loop {
        tokio::time::sleep(interval).await;
        let sent = lock(&identity).clone();
        if sent.member_id.is_empty() {
            // Between identities (rejoining as new): nothing to beat for.
            continue;
        }
        let response = connection
            .call(Request::Heartbeat(HeartbeatRequest {
                group: group.clone(),
                generation: sent.generation,
                member_id: sent.member_id.clone(),
            }))
            .await;
        let error = match response {
            Ok(Response::Heartbeat(ack)) if coordinator_moved(&ClientError::Broker(ack.error)) => {
                // The coordinator moved: the consumer finds the new one and
                // reattaches there.
                signals.coordinator_moved.store(true, Ordering::Release);
                signals.wake.notify_waiters();
                return;
            }
            Ok(Response::Heartbeat(ack)) => ack.error,
            Ok(_) => continue,
            Err(ClientError::Timeout) => continue,
            Err(ClientError::Closed | ClientError::TooManyConnections { .. }) => {
                // The connection is gone: the consumer reconnects and
                // starts a new heartbeat (`Membership::reattach`).
                signals.wake.notify_waiters();
                return;
            }

            Err(error) => {
                *lock(&signals.failed) = Some(error);
                signals.wake.notify_waiters();
                return;
            }
        };
        // An answer about an identity the consumer has since replaced (it
        // rejoined meanwhile) says nothing about the current one.
        {
            let mut current = lock(&identity);
            if current.member_id != sent.member_id || current.generation != sent.generation {
                continue;
            }
            match error {
                ErrorCode::RebalanceInProgress | ErrorCode::IllegalGeneration => {}
                ErrorCode::UnknownMemberId | ErrorCode::UnknownGroup => {
                    // Expired (or the coordinator restarted): rejoin as new.
                    current.member_id.clear();
                }
                ErrorCode::FencedInstanceId => {
                    *lock(&signals.failed) = Some(ClientError::Broker(error));
                    signals.wake.notify_waiters();
                    return;
                }
                _ => continue,
            }
        }
        signals.rejoin.store(true, Ordering::Release);
        signals.wake.notify_waiters();
    }
}

/// JoinGroup until it succeeds or fails for good: (identity, assignment).
pub(crate) async fn join(
    connection: &Connection,
    group: &str,
    topics: &[String],
    config: &GroupConfig,
    member_id: &str,
) -> Result<(Identity, Vec<(String, u32)>)> {
    let mut member_id = member_id.to_string();
    let mut attempts = 0;
    // The coordinator may hold a JoinGroup for a whole rebalance (and a
    // bit): wait that long, not just a request's time.
    let patience = Duration::from_millis(u64::from(config.rebalance_timeout_ms) * 2)
        + Duration::from_millis(JOIN_TIMEOUT_MARGIN_MS);
    loop {
        attempts += 1;
        let pending = connection
            .start_call(Request::JoinGroup(JoinGroupRequest {
                group: group.to_string(),
                member_id: member_id.clone(),
                group_instance_id: config.instance_id.clone(),
                session_timeout_ms: config.session_timeout_ms,
                rebalance_timeout_ms: config.rebalance_timeout_ms,
                topics: topics.to_vec(),
                assignor: config.assignor.clone(),
            }))
            .await?;
        let response = match pending.with_timeout(patience).wait().await {
            Ok(response) => response,
            Err(ClientError::Timeout) if attempts < JOIN_ATTEMPTS_MAX => continue,
            Err(error) => return Err(error),
        };
        let Response::JoinGroup(response) = response else {
            return Err(ClientError::Protocol(
                "unexpected response to JoinGroup".into(),
            ));
        };
        match response.error {
            ErrorCode::None => {
                return Ok((
                    Identity {
                        member_id: response.member_id,
                        generation: response.generation,
                    },
                    response
                        .assignment
                        .into_iter()
                        .map(|owned| (owned.topic, owned.partition))
                        .collect(),
                ));
            }
            // Forgotten by the coordinator: join as a new member.
            ErrorCode::UnknownMemberId if attempts < JOIN_ATTEMPTS_MAX => member_id.clear(),
            ErrorCode::RebalanceInProgress if attempts < JOIN_ATTEMPTS_MAX => {}
            error => return Err(ClientError::Broker(error)),
        }
    }
}

/// The assignor with which members keep reading the partitions they keep
/// through a rebalance (only moved ones stop, in a second round).
pub const COOPERATIVE_STICKY: &str = "cooperative-sticky";

/// JoinGroup attempts before a rejoin gives up.
pub const JOIN_ATTEMPTS_MAX: u32 = 10;

/// How much longer than twice the rebalance timeout a JoinGroup may take.
pub const JOIN_TIMEOUT_MARGIN_MS: u64 = 10_000;

/// Committed offsets of `partitions` (-1 where none).
pub(crate) async fn fetch_offsets(
    connection: &Connection,
    group: &str,
    partitions: Option<&[(String, u32)]>,
) -> Result<Vec<(String, u32, i64)>> {
    let response = connection
        .call(Request::OffsetFetch(OffsetFetchRequest {
            group: group.to_string(),
            partitions: partitions.map(|partitions| {
                partitions
                    .iter()
                    .map(|(topic, partition)| TopicPartition {
                        topic: topic.clone(),
                        partition: *partition,
                    })
                    .collect()
            }),
        }))
        .await?;
    match response {
        Response::OffsetFetch(response) if response.error.is_ok() => Ok(response
            .offsets
            .into_iter()
            .map(|offset| (offset.topic, offset.partition, offset.offset))
            .collect()),
        Response::OffsetFetch(response) => Err(ClientError::Broker(response.error)),
        _ => Err(ClientError::Protocol(
            "unexpected response to OffsetFetch".into(),
        )),
    }
}

/// Commits offsets (all or none) as `identity` (or as an admin when it is
/// `None`: generation -1, for a group without members).
pub(crate) async fn commit_offsets(
    connection: &Connection,
    group: &str,
    identity: Option<&Identity>,
    offsets: &[(String, u32, u64)],
) -> Result<()> {
    if offsets.is_empty() {
        return Ok(());
    }
    let response = connection
        .call(Request::OffsetCommit(OffsetCommitRequest {
            group: group.to_string(),
            generation: identity.map_or(-1, |identity| identity.generation),
            member_id: identity.map_or_else(String::new, |identity| identity.member_id.clone()),
            offsets: offsets
                .iter()
                .map(|(topic, partition, offset)| OffsetCommitPartition {
                    topic: topic.clone(),
                    partition: *partition,
                    offset: *offset,
                    metadata: None,
                })
                .collect(),
        }))
        .await?;
    match response {
        Response::OffsetCommit(response) if response.error.is_ok() => Ok(()),
        Response::OffsetCommit(response) => Err(ClientError::Broker(response.error)),
        _ => Err(ClientError::Protocol(
            "unexpected response to OffsetCommit".into(),
        )),
    }
}

/// Leaves the group (dynamic members; a static one keeps its place).
pub(crate) async fn leave(connection: &Connection, group: &str, member_id: &str) -> Result<()> {
    let response = connection
        .call(Request::LeaveGroup(LeaveGroupRequest {
            group: group.to_string(),
            member_id: member_id.to_string(),
        }))
        .await?;
    match response {
        Response::LeaveGroup(ack)
            if ack.error.is_ok()
                || matches!(
                    ack.error,
                    ErrorCode::UnknownMemberId | ErrorCode::UnknownGroup
                ) =>
        {
            Ok(())
        }
        Response::LeaveGroup(ack) => Err(ClientError::Broker(ack.error)),
        _ => Err(ClientError::Protocol(
            "unexpected response to LeaveGroup".into(),
        )),
    }
}
