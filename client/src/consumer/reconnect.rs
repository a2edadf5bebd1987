//! Reconnecting a consumer whose connection was lost: within
//! `reconnect_timeout_ms`, with a doubling backoff, resuming each assigned
//! partition at its leader from the application's position.

use std::time::Duration;

use super::*;

/// Longest pause between a consumer's reconnect attempts.
pub const RECONNECT_BACKOFF_MS_MAX: u64 = 2_000;

/// Least time a reconnect attempt gets to connect and be answered, even
/// when the reconnect timeout is (nearly) spent: the last attempt may end
/// this much after it.
pub const RECONNECT_ATTEMPT_MS_MIN: u64 = 1_000;

/// A connection lost again within this long of a reconnect continues that
/// reconnect (its clock and backoff), so that a broker that accepts and
/// then drops the consumer is not hammered; a connection that lived longer
/// was a success, and the next loss starts afresh.
const RECONNECT_STABLE_MS: u64 = RECONNECT_BACKOFF_MS_MAX;

/// A reconnect under way, kept in the consumer so that a caller who
/// abandons `next()` (a timeout around it) neither restarts its clock nor
/// skips its pauses.
#[derive(Debug)]
pub(super) struct Reconnecting {
    /// When the loss was first noticed.
    pub(super) since: tokio::time::Instant,
    /// The pause after the next attempt.
    pub(super) backoff: Duration,
    /// No attempt before this.
    pub(super) next_attempt_at: tokio::time::Instant,
    /// Attempts begun (an abandoned one counts).
    pub(super) attempts: u32,
    /// Why the last attempt failed.
    pub(super) last_error: Option<ClientError>,
    /// When the consumer was last fully reconnected (it may be lost again).
    pub(super) connected_at: Option<tokio::time::Instant>,
}

impl Consumer {
    /// After the connection was lost: connects again and resubscribes every
    /// hand-assigned partition where the application left off, so that it
    /// sees each offset once. A group member instead heartbeats on the new
    /// connection and rejoins; its partitions restart from the committed
    /// offsets, as after any rebalance (they are not resubscribed here: the
    /// rejoin decides what the member owns).
    ///
    /// One attempt per call; the caller loops while the connection is
    /// lost. Attempts are spaced by a backoff doubling from
    /// `reconnect_backoff_ms` to [`RECONNECT_BACKOFF_MS_MAX`], and once
    /// `reconnect_timeout_ms` has passed since the loss was noticed (with
    /// attempts failing, or every new connection lost again at once), every
    /// assignment and the group are dropped and the error is returned.
    ///
    /// A partition that can no longer be read (its topic deleted, or its
    /// log now ends before the position) is dropped and reported, with its
    /// position, by the next `next()`/`next_batch()`; the others go on.
    pub(super) async fn reconnect(&mut self) -> Result<()> {
        let timeout = Duration::from_millis(self.config.reconnect_timeout_ms);
        let now = tokio::time::Instant::now();
        let continuing = self
            .reconnecting
            .as_ref()
            .is_some_and(|state| match state.connected_at {
                // Lost again right after reconnecting: the same reconnect.
                Some(at) => now.duration_since(at) < Duration::from_millis(RECONNECT_STABLE_MS),
                // Attempts failing, and asked again before the timeout ran out.
                None => now.duration_since(state.next_attempt_at) < timeout,
            });
        if !continuing {
            self.reconnecting = None;
        }
        let first_backoff = Duration::from_millis(self.config.reconnect_backoff_ms.max(1));
        let state = self.reconnecting.get_or_insert(Reconnecting {
            since: now,
            backoff: first_backoff,
            next_attempt_at: now,
            attempts: 0,
            last_error: None,
            connected_at: None,
        });
        state.connected_at = None;
        if state.attempts > 0 && now >= state.since + timeout {
            let error = state
                .last_error
                .take()
                .unwrap_or_else(|| ClientError::Connect {
                    addr: self.connection.addr().to_string(),
                    message: format!(
                        "no lasting connection within {} ms",
                        self.config.reconnect_timeout_ms
                    ),
                });
            self.give_up_connection();
            return Err(error);
        }
        // An abandoned wait leaves everything as it was.
        tokio::time::sleep_until(state.next_attempt_at).await;
        // Book the attempt before making it, so that one abandoned midway
        // still counts and still spaces the next.
        let now = tokio::time::Instant::now();
        state.attempts += 1;
        state.next_attempt_at = now + state.backoff;
        state.backoff = (state.backoff * 2).min(Duration::from_millis(RECONNECT_BACKOFF_MS_MAX));
        // Connecting and the Handshake get what is left of the timeout (at
        // least RECONNECT_ATTEMPT_MS_MIN), not a request timeout each.
        let left = (state.since + timeout).saturating_duration_since(now);
        let budget = Duration::from_millis(self.config.request_timeout_ms)
            .min(left.max(Duration::from_millis(RECONNECT_ATTEMPT_MS_MIN)));
        let attempt = self.reconnect_once(budget).await;
        let Some(state) = self.reconnecting.as_mut() else {
            return attempt;
        };
        match attempt {
            Ok(()) => {
                state.connected_at = Some(tokio::time::Instant::now());
                state.last_error = None;
                Ok(())
            }
            Err(error) => {
                if state.next_attempt_at >= state.since + timeout {
                    self.give_up_connection();
                    return Err(error);
                }
                tracing::debug!(%error, addr = self.connection.addr(), "consumer reconnect failed; retrying");
                state.last_error = Some(error);
                Ok(())
            }
        }
    }

    /// The broker stayed away: nothing is owned any more.
    pub(super) fn give_up_connection(&mut self) {
        self.reconnecting = None;
        self.connection_lost = false;
        self.resubscribe_pending = false;
        self.assignments.clear();
        self.next_assignment = 0;
        self.group = None;
    }

    /// One reconnect attempt: a new connection that has answered a request
    /// (unless the current one is alive and only resubscriptions are left),
    /// then the resubscriptions, each of which clears its partition's
    /// `stale` mark, so that an attempt cut short resumes where it stopped.
    pub(super) async fn reconnect_once(&mut self, budget: Duration) -> Result<()> {
        if self.connection_lost || self.connection.is_closed() || self.coordinator_lost() {
            let addr = self.connection.addr().to_string();
            let started = tokio::time::Instant::now();
            // A group member's calls go to its coordinator, wherever it is
            // now; otherwise the same broker if it answers, else any other.
            let router = self.router.clone();
            let group = self.group.as_ref().map(|group| group.group.clone());
            let found = async move {
                match group {
                    Some(group) => crate::group::find_coordinator(&router, &group).await,
                    None => router.any().await,
                }
            };
            let connection =
                tokio::time::timeout(budget, found)
                    .await
                    .map_err(|_| ClientError::Connect {
                        addr: addr.clone(),
                        message: format!("no answer within {} ms", budget.as_millis()),
                    })??;
            // A broker that accepts and then closes (out of connection
            // slots, or restarting) must not count as reconnected.
            let handshake = connection
                .start_call(Request::Handshake(HandshakeRequest {
                    client_name: "weir-client consumer".to_string(),
                    api_versions: Vec::new(),
                }))
                .await?
                .with_timeout(budget.saturating_sub(started.elapsed()))
                .wait()
                .await
                .map_err(|error| match error {
                    ClientError::Timeout => ClientError::Connect {
                        addr: addr.clone(),
                        message: format!("no Handshake answer within {} ms", budget.as_millis()),
                    },
                    error => error,
                })?;
            match handshake {
                Response::Handshake(response) if response.error.is_ok() => {}
                Response::Handshake(response) => {
                    return Err(ClientError::Broker(response.error));
                }
                other => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected {:?}",
                        other.api()
                    )));
                }
            }
            // From here to the marks, nothing awaits: a new connection
            // always comes with every subscription of a closed one marked
            // stale (those at other brokers' leaders read on).
            self.connection = connection;
            self.connection_lost = false;
            for assignment in &mut self.assignments {
                if assignment.connection.is_closed() {
                    assignment.stale = true;
                }
            }
            if let Some(group) = &mut self.group {
                // The rejoin decides what the member owns.
                group.reattach(self.connection.clone());
            } else {
                self.resubscribe_pending = true;
            }
        }
        for index in (0..self.assignments.len()).rev() {
            let assignment = &self.assignments[index];
            // A group member's partitions of a lost coordinator connection
            // wait for the rejoin; those whose leader moved are its still.
            if !assignment.stale || (self.group.is_some() && !assignment.moved) {
                continue;
            }
            let (topic, partition) = (assignment.topic.clone(), assignment.partition);
            let mut offset = assignment.resume_offset();
            let leader = match self.leader(&topic, partition).await {
                Ok(leader) => Ok(leader),
                Err(error) => {
                    if crate::router::leader_moved(&error) {
                        self.router.forget_leader(&topic, partition);
                    }
                    Err(error)
                }
            };
            let mut outcome = match &leader {
                Ok(leader) => {
                    self.open_subscription(leader, &topic, partition, offset)
                        .await
                }
                Err(error) => Err(error.clone()),
            };
            if matches!(
                outcome,
                Err(ClientError::Broker(ErrorCode::OffsetOutOfRange))
            ) && offset != self.assignments[index].position
            {
                // The log now ends inside the chunk being handed out (it
                // lost unsynced data in the crash): read on from the
                // position, dropping the chunk's undelivered records.
                let assignment = &mut self.assignments[index];
                assignment.records.clear();
                assignment.chunk = None;
                offset = assignment.position;
                if let Ok(leader) = &leader {
                    outcome = self
                        .open_subscription(leader, &topic, partition, offset)
                        .await;
                }
            }
            match (outcome, leader) {
                (Ok((subscription_id, pushes)), Ok(leader)) => {
                    let assignment = &mut self.assignments[index];
                    assignment.connection = leader;
                    assignment.subscription_id = subscription_id;
                    assignment.pushes = pushes;
                    assignment.stale = false;
                    assignment.moved = false;
                    // The new subscription starts with all of its credit.
                    assignment.taken_bytes = 0;
                }
                (
                    Err(
                        error @ (ClientError::UnknownTopic(_)
                        | ClientError::Broker(ErrorCode::OffsetOutOfRange)),
                    ),
                    _,
                ) => {
                    let assignment = self.assignments.remove(index);
                    self.next_assignment = 0;
                    let dropped = format!(
                        "{topic}/{partition} at offset {} ({error})",
                        assignment.position
                    );
                    self.deferred_error = Some(match self.deferred_error.take() {
                        Some(ClientError::Protocol(earlier)) => {
                            ClientError::Protocol(format!("{earlier}, {dropped}"))
                        }
                        _ => ClientError::Protocol(format!(
                            "unassigned after reconnecting: {dropped}"
                        )),
                    });
                }
                // Lost again, refused, or the leader is still moving: the
                // next attempt goes on from here (on a new connection if
                // this one closed).
                (Err(error), _) | (Ok(_), Err(error)) => {
                    if crate::router::leader_moved(&error) {
                        self.router.forget_leader(&topic, partition);
                    }
                    return Err(error);
                }
            }
        }
        self.resubscribe_pending = false;
        Ok(())
    }

    /// Before a call of the application's: a connection found lost is
    /// opened again (resuming what is assigned), within
    /// `reconnect_timeout_ms`.
    pub(super) async fn ensure_connected(&mut self) -> Result<()> {
        while self.connection_lost
            || self.resubscribe_pending
            || self.connection.is_closed()
            || self.coordinator_lost()
        {
            self.reconnect().await?;
        }
        Ok(())
    }
}
