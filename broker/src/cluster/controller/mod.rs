//! The controller quorum: the metadata image replicated by openraft among
//! the brokers named as controller voters.
//!
//! Layout: `log_store` (the Raft log, vote and commit point on disk),
//! `state_machine` (the metadata image, its snapshots, and the watch channel
//! the broker follows), `network` (Raft RPCs to the other voters over the
//! broker listener). This module ties them into a [`Controller`]: it starts
//! Raft, forms the quorum on first start, answers the `Controller` requests
//! other brokers send, forwards this broker's proposals to the leader, and,
//! while this voter leads, fences brokers whose heartbeats stop.
//!
//! Sessions are kept by every voter, not only the leader: each broker
//! heartbeats to all voters, so a voter that becomes leader already knows
//! who is alive and needs no grace period before fencing (the failover of a
//! broker that was also the controller leader is not delayed by a fresh
//! session timeout).

pub mod log_store;
pub mod network;
pub mod state_machine;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, Raft, ServerState};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use weir_client::connection::Connection;
use weir_protocol::ErrorCode;
use weir_protocol::message::{ControllerRequest, ControllerResponse};
use weir_protocol::{Request, Response};

use self::log_store::LogStore;
use self::network::Network;
pub use self::state_machine::MetadataView;
use self::state_machine::StateMachine;
use crate::cluster::metadata::{
    BrokerId, MetadataCommand, MetadataError, MetadataImage, MetadataOutcome,
};

/// What one applied command returns.
pub type CommandResult = Result<MetadataOutcome, MetadataError>;

openraft::declare_raft_types!(
    /// The controller's Raft types.
    pub TypeConfig:
        D = MetadataCommand,
        R = CommandResult,
        NodeId = u64,
        Node = BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = std::io::Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The `kind` numbers of a `Controller` request (docs/PROTOCOL.md).
pub mod kind {
    /// Raft AppendEntries.
    pub const APPEND_ENTRIES: u8 = 0;
    /// Raft Vote.
    pub const VOTE: u8 = 1;
    /// Raft InstallSnapshot.
    pub const INSTALL_SNAPSHOT: u8 = 2;
    /// A metadata command for the leader to commit.
    pub const PROPOSE: u8 = 3;
    /// A broker is alive.
    pub const HEARTBEAT: u8 = 4;
    /// A broker that is not a voter asks to follow the metadata log as a
    /// learner (payload: [`super::Join`]).
    pub const JOIN: u8 = 5;
}

/// A non-voter's request to follow the metadata log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Join {
    /// The broker.
    pub broker: BrokerId,
    /// Its listener (`host:port`), where Raft messages reach it.
    pub addr: String,
}

/// Pause between a non-voter's attempts to join the metadata log.
pub const JOIN_RETRY_MS: u64 = 200;

/// Entries between snapshots of the metadata image.
pub const SNAPSHOT_LOGS_SINCE_LAST: u64 = 1_000;
/// Entries kept behind a snapshot, so a briefly lagging voter catches up
/// from the log rather than a snapshot.
pub const SNAPSHOT_LOGS_KEPT: u64 = 200;
/// How often a voter checks sessions (and, leading, fences).
pub const LIVENESS_CHECK_MS: u64 = 100;
/// A broker whose heartbeat connection closed, and which has not
/// heartbeated since, is fenced this long after the close (rather than a
/// whole session timeout later): a process that died closed its sockets.
/// Long enough for a live broker to reconnect and heartbeat again.
pub const CONNECTION_LOSS_GRACE_MS: u64 = 400;
/// Pause between attempts of a proposal that found no leader.
pub const PROPOSE_RETRY_MS: u64 = 50;

/// The controller's settings.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// This broker's id.
    pub node_id: BrokerId,
    /// Voters by id, with the `host:port` of their broker listener.
    pub voters: BTreeMap<BrokerId, String>,
    /// This broker's own listener as others reach it (`host:port`): where
    /// the leader sends a non-voter the metadata log.
    pub advertised: String,
    /// Where the Raft log and snapshots live.
    pub dir: PathBuf,
    /// Raft heartbeat (and replication timeout), milliseconds.
    pub raft_heartbeat_ms: u64,
    /// Raft election timeout range, milliseconds.
    pub raft_election_timeout_min_ms: u64,
    /// Upper end of the election timeout range, milliseconds.
    pub raft_election_timeout_max_ms: u64,
    /// A broker with no heartbeat for this long is fenced.
    pub broker_session_timeout_ms: u64,
    /// Whether elections may pick a replica outside the in-sync set.
    pub unclean_leader_election: bool,
    /// Bound on one proposal (leader changes included).
    pub propose_timeout_ms: u64,
    /// How often the leader restores preferred leaders (0: never).
    pub leader_rebalance_interval_ms: u64,
}

/// Why the controller could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// Raft could not start (storage or configuration).
    #[error("controller: cannot start: {0}")]
    Start(String),
    /// The command was applied and refused by the metadata rules.
    #[error("controller: {0}")]
    Rejected(#[from] MetadataError),
    /// No leader committed the command within the proposal timeout.
    #[error("controller: no leader committed the proposal within {0} ms")]
    Timeout(u64),
    /// Raft stopped on this node.
    #[error("controller: raft stopped: {0}")]
    Stopped(String),
}

/// A broker heartbeat, sent to every voter.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The broker.
    pub broker: BrokerId,
    /// Its registration's incarnation.
    pub incarnation: u64,
    /// It has applied metadata at least up to its registration, so it may
    /// be unfenced.
    pub caught_up: bool,
    /// It is stopping (SIGTERM): fence it now, so its leaderships move
    /// while it still serves, and do not unfence it again.
    #[serde(default)]
    pub shutting_down: bool,
}

/// One broker's session as this voter sees it.
#[derive(Debug, Clone, Copy)]
struct Session {
    incarnation: u64,
    caught_up: bool,
    shutting_down: bool,
    last_heartbeat: Instant,
    /// When the connection its heartbeats came over closed, if no
    /// heartbeat arrived since.
    connection_lost_at: Option<Instant>,
}

/// This broker's part of the controller quorum.
pub struct Controller {
    config: ControllerConfig,
    raft: Raft<TypeConfig>,
    metadata: watch::Receiver<Arc<MetadataView>>,
    sessions: Mutex<HashMap<BrokerId, Session>>,
    /// Connections to the other voters, for forwarded proposals and
    /// heartbeats (Raft's own RPCs have theirs). Never held across a
    /// connect or a call: one unreachable voter must not delay the others.
    peers: Mutex<HashMap<BrokerId, Connection>>,
    /// Voters a heartbeat is on its way to: the next is not sent to one
    /// until the previous is answered or timed out, so a slow voter does
    /// not pile up tasks.
    heartbeats_in_flight: Mutex<std::collections::HashSet<BrokerId>>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("node_id", &self.config.node_id)
            .field("leader", &self.leader())
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn json<T: Serialize>(value: &T) -> Bytes {
    // The values serialized here are plain data; serde_json cannot fail on them.
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

fn answer(error: ErrorCode, payload: Bytes) -> ControllerResponse {
    ControllerResponse { error, payload }
}

impl Controller {
    /// Starts this voter (or, when `node_id` is not a voter, only the
    /// client side) and forms the quorum on first start.
    ///
    /// # Errors
    /// [`ControllerError::Start`].
    pub async fn start(config: ControllerConfig) -> Result<Arc<Controller>, ControllerError> {
        let start_error = |error: &dyn std::fmt::Display| ControllerError::Start(error.to_string());
        let log_store = LogStore::open(&config.dir).map_err(|error| start_error(&error))?;
        let state_machine = StateMachine::open(
            &config.dir,
            MetadataImage::new(config.unclean_leader_election),
        )
        .map_err(|error| start_error(&error))?;
        let metadata = state_machine.subscribe();
        let raft_config = openraft::Config {
            cluster_name: "weir".to_string(),
            heartbeat_interval: config.raft_heartbeat_ms,
            election_timeout_min: config.raft_election_timeout_min_ms,
            election_timeout_max: config.raft_election_timeout_max_ms,
            install_snapshot_timeout: 10_000,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(SNAPSHOT_LOGS_SINCE_LAST),
            max_in_snapshot_log_to_keep: SNAPSHOT_LOGS_KEPT,
            ..Default::default()
        }
        .validate()
        .map_err(|error| start_error(&error))?;
        let network = Network {
            connect_timeout: Duration::from_millis(config.raft_heartbeat_ms.max(100) * 4),
        };
        let raft = Raft::new(
            u64::from(config.node_id),
            Arc::new(raft_config),
            network,
            log_store,
            state_machine,
        )
        .await
        .map_err(|error| start_error(&error))?;
        let initialized = raft
            .is_initialized()
            .await
            .map_err(|error| start_error(&error))?;
        if config.voters.contains_key(&config.node_id) && !initialized {
            let members: BTreeMap<u64, BasicNode> = config
                .voters
                .iter()
                .map(|(id, addr)| (u64::from(*id), BasicNode::new(addr)))
                .collect();
            // Every voter proposes the same initial membership; openraft
            // makes that safe, and a formed quorum answers NotAllowed.
            match raft.initialize(members).await {
                Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                Err(error) => return Err(start_error(&error)),
            }
        }
        let controller = Arc::new(Controller {
            config,
            raft,
            metadata,
            sessions: Mutex::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
            heartbeats_in_flight: Mutex::new(std::collections::HashSet::new()),
        });
        tokio::spawn(Self::liveness_loop(Arc::downgrade(&controller)));
        if !controller.is_voter() {
            tokio::spawn(Self::join_loop(Arc::downgrade(&controller)));
        }
        Ok(controller)
    }

    /// A non-voter asks the voters, until the leader has added it as a
    /// learner (its membership names it), to send it the metadata log.
    async fn join_loop(controller: std::sync::Weak<Controller>) {
        loop {
            let Some(controller) = controller.upgrade() else {
                return;
            };
            let me = u64::from(controller.config.node_id);
            let joined = controller
                .raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .get_node(&me)
                .is_some();
            if joined {
                tracing::info!("controller: following the metadata log as a learner");
                return;
            }
            let join = Join {
                broker: controller.config.node_id,
                addr: controller.config.advertised.clone(),
            };
            let timeout = Duration::from_millis(controller.config.propose_timeout_ms.min(2_000));
            let mut target = controller.leader();
            for _ in 0..controller.config.voters.len().max(1) {
                let Some(voter) =
                    target.or_else(|| controller.config.voters.keys().next().copied())
                else {
                    break;
                };
                match controller
                    .forward(voter, kind::JOIN, json(&join), timeout)
                    .await
                {
                    Ok(_) => break,
                    Err(hint) => {
                        target = hint.or_else(|| {
                            let voters: Vec<_> = controller.config.voters.keys().copied().collect();
                            (!voters.is_empty()).then(|| voters[fastrand_index(voters.len())])
                        });
                    }
                }
            }
            drop(controller);
            tokio::time::sleep(Duration::from_millis(JOIN_RETRY_MS)).await;
        }
    }

    /// Adds a non-voter as a learner (on the leader).
    async fn add_learner(&self, join: Join) -> ControllerResponse {
        let id = u64::from(join.broker);
        if self.config.voters.contains_key(&join.broker) {
            return answer(
                ErrorCode::InvalidRequest,
                json(&format!("broker {} is a voter", join.broker)),
            );
        }
        let known = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .is_some();
        if known && self.is_leader() {
            return answer(ErrorCode::None, json(&()));
        }
        match self
            .raft
            .add_learner(id, BasicNode::new(&join.addr), false)
            .await
        {
            Ok(_) => {
                tracing::info!(
                    broker = join.broker,
                    addr = join.addr,
                    "controller: added a learner"
                );
                answer(ErrorCode::None, json(&()))
            }
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                let leader = forward.leader_id.and_then(|id| BrokerId::try_from(id).ok());
                answer(ErrorCode::NotController, json(&leader))
            }
            Err(error) => {
                tracing::debug!(%error, "controller: cannot add the learner");
                answer(ErrorCode::NotController, json(&Option::<u64>::None))
            }
        }
    }

    /// This broker's id.
    pub fn node_id(&self) -> BrokerId {
        self.config.node_id
    }

    /// Whether this broker is a controller voter.
    pub fn is_voter(&self) -> bool {
        self.config.voters.contains_key(&self.config.node_id)
    }

    /// The voters and their addresses.
    pub fn voters(&self) -> &BTreeMap<BrokerId, String> {
        &self.config.voters
    }

    /// Follows the metadata this voter has applied.
    pub fn metadata(&self) -> watch::Receiver<Arc<MetadataView>> {
        self.metadata.clone()
    }

    /// The current metadata.
    pub fn view(&self) -> Arc<MetadataView> {
        self.metadata.borrow().clone()
    }

    /// The controller leader, as this voter last heard.
    pub fn leader(&self) -> Option<BrokerId> {
        let leader = self.raft.metrics().borrow().current_leader;
        leader.and_then(|id| BrokerId::try_from(id).ok())
    }

    /// Whether this voter leads the quorum.
    pub fn is_leader(&self) -> bool {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        metrics.state == ServerState::Leader
            && metrics.current_leader == Some(u64::from(self.config.node_id))
    }

    /// Stops Raft on this node.
    pub async fn shutdown(&self) {
        if let Err(error) = self.raft.shutdown().await {
            tracing::warn!(%error, "controller: raft did not stop cleanly");
        }
    }

    /// Answers one `Controller` request from another broker.
    pub async fn handle(&self, request: ControllerRequest) -> ControllerResponse {
        let payload = request.payload;
        let bad = |error: serde_json::Error| {
            answer(
                ErrorCode::InvalidRequest,
                json(&format!("controller request: {error}")),
            )
        };
        match request.kind {
            kind::APPEND_ENTRIES => match serde_json::from_slice(&payload) {
                Ok(rpc) => answer(ErrorCode::None, json(&self.raft.append_entries(rpc).await)),
                Err(error) => bad(error),
            },
            kind::VOTE => match serde_json::from_slice(&payload) {
                Ok(rpc) => answer(ErrorCode::None, json(&self.raft.vote(rpc).await)),
                Err(error) => bad(error),
            },
            kind::INSTALL_SNAPSHOT => match serde_json::from_slice(&payload) {
                Ok(rpc) => answer(
                    ErrorCode::None,
                    json(&self.raft.install_snapshot(rpc).await),
                ),
                Err(error) => bad(error),
            },
            kind::JOIN => match serde_json::from_slice::<Join>(&payload) {
                Ok(join) => self.add_learner(join).await,
                Err(error) => bad(error),
            },
            kind::PROPOSE => match serde_json::from_slice::<MetadataCommand>(&payload) {
                Ok(command) => match self.raft.client_write(command).await {
                    Ok(written) => answer(ErrorCode::None, json(&written.data)),
                    Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                        let leader = forward.leader_id.and_then(|id| BrokerId::try_from(id).ok());
                        answer(ErrorCode::NotController, json(&leader))
                    }
                    Err(error) => answer(ErrorCode::NotController, {
                        tracing::debug!(%error, "controller: proposal failed");
                        json(&Option::<u64>::None)
                    }),
                },
                Err(error) => bad(error),
            },
            kind::HEARTBEAT => match serde_json::from_slice::<Heartbeat>(&payload) {
                Ok(heartbeat) => {
                    self.record_heartbeat(&heartbeat);
                    answer(ErrorCode::None, json(&()))
                }
                Err(error) => bad(error),
            },
            other => answer(
                ErrorCode::InvalidRequest,
                json(&format!("controller request kind {other} unknown")),
            ),
        }
    }

    fn record_heartbeat(&self, heartbeat: &Heartbeat) {
        let mut sessions = lock(&self.sessions);
        sessions.insert(
            heartbeat.broker,
            Session {
                incarnation: heartbeat.incarnation,
                caught_up: heartbeat.caught_up,
                shutting_down: heartbeat.shutting_down,
                last_heartbeat: Instant::now(),
                connection_lost_at: None,
            },
        );
    }

    /// The connection `broker`'s heartbeats arrived on has closed.
    pub fn connection_lost(&self, broker: BrokerId, incarnation: u64) {
        if let Some(session) = lock(&self.sessions)
            .get_mut(&broker)
            .filter(|session| session.incarnation == incarnation)
        {
            session.connection_lost_at = Some(Instant::now());
        }
    }

    /// Commits `command` through the controller leader (this voter or,
    /// forwarded, another) and returns what applying it produced.
    ///
    /// # Errors
    /// [`ControllerError::Rejected`] when the metadata rules refuse it,
    /// [`ControllerError::Timeout`] when no leader commits it in time.
    pub async fn propose(
        &self,
        command: MetadataCommand,
    ) -> Result<MetadataOutcome, ControllerError> {
        let timeout_ms = self.config.propose_timeout_ms;
        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
        let mut leader_hint = self.leader();
        loop {
            let outcome: Result<Bytes, Option<BrokerId>> = match leader_hint {
                Some(leader) if leader == self.config.node_id => {
                    // A leader that lost its quorum never commits: bounded.
                    let left = deadline.saturating_duration_since(Instant::now());
                    let Ok(written) =
                        tokio::time::timeout(left, self.raft.client_write(command.clone())).await
                    else {
                        return Err(ControllerError::Timeout(timeout_ms));
                    };
                    match written {
                        Ok(written) => return written.data.map_err(ControllerError::Rejected),
                        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                            Err(forward.leader_id.and_then(|id| BrokerId::try_from(id).ok()))
                        }
                        Err(RaftError::Fatal(fatal)) => {
                            return Err(ControllerError::Stopped(fatal.to_string()));
                        }
                        Err(error) => {
                            tracing::debug!(%error, "controller: local proposal failed");
                            Err(None)
                        }
                    }
                }
                Some(leader) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    self.forward(leader, kind::PROPOSE, json(&command), left)
                        .await
                }
                None => Err(None),
            };
            match outcome {
                Ok(payload) => {
                    let result: CommandResult = serde_json::from_slice(&payload)
                        .map_err(|error| ControllerError::Stopped(error.to_string()))?;
                    return result.map_err(ControllerError::Rejected);
                }
                Err(hint) => {
                    if Instant::now() >= deadline {
                        return Err(ControllerError::Timeout(timeout_ms));
                    }
                    tokio::time::sleep(Duration::from_millis(PROPOSE_RETRY_MS)).await;
                    leader_hint = hint.or_else(|| self.leader()).or_else(|| {
                        // Not a voter, or no leader known yet: try each voter
                        // in turn; one that is not the leader names it.
                        let voters: Vec<_> = self.config.voters.keys().copied().collect();
                        (!voters.is_empty()).then(|| voters[fastrand_index(voters.len())])
                    });
                }
            }
        }
    }

    /// A connection to voter `target`, opened (within `timeout`) if there
    /// is none.
    async fn peer(&self, target: BrokerId, timeout: Duration) -> Option<Connection> {
        let existing = lock(&self.peers)
            .get(&target)
            .filter(|connection| !connection.is_closed())
            .cloned();
        if existing.is_some() {
            return existing;
        }
        let addr = self.config.voters.get(&target)?;
        match Connection::connect(addr, timeout).await {
            Ok(connection) => {
                lock(&self.peers).insert(target, connection.clone());
                Some(connection)
            }
            Err(error) => {
                tracing::debug!(%error, target, "controller: cannot reach voter");
                None
            }
        }
    }

    /// Sends one request to voter `target`, answered within `timeout`;
    /// `Err` carries a leader hint.
    async fn forward(
        &self,
        target: BrokerId,
        kind: u8,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, Option<BrokerId>> {
        let Some(connection) = self.peer(target, timeout).await else {
            return Err(None);
        };
        let request = Request::Controller(ControllerRequest { kind, payload });
        let answer = async {
            connection
                .start_call(request)
                .await?
                .with_timeout(timeout)
                .wait()
                .await
        }
        .await;
        match answer {
            Ok(Response::Controller(response)) if response.error.is_ok() => Ok(response.payload),
            Ok(Response::Controller(response)) if response.error == ErrorCode::NotController => {
                Err(
                    serde_json::from_slice::<Option<BrokerId>>(&response.payload)
                        .ok()
                        .flatten()
                        .filter(|leader| *leader != target),
                )
            }
            Ok(other) => {
                tracing::debug!(?other, target, "controller: unexpected answer");
                Err(None)
            }
            Err(error) => {
                tracing::debug!(%error, target, "controller: voter call failed");
                let mut peers = lock(&self.peers);
                if peers.get(&target).is_some_and(Connection::is_closed) {
                    peers.remove(&target);
                }
                Err(None)
            }
        }
    }

    /// Tells every voter this broker is alive: this voter at once, the
    /// others concurrently, each bounded by a third of the session
    /// timeout, so one unreachable voter delays none of the rest.
    pub fn heartbeat(self: &Arc<Self>, heartbeat: Heartbeat) {
        self.record_heartbeat(&heartbeat);
        let timeout = Duration::from_millis((self.config.broker_session_timeout_ms / 3).max(50));
        for voter in self.config.voters.keys().copied() {
            if voter == self.config.node_id || !lock(&self.heartbeats_in_flight).insert(voter) {
                continue;
            }
            let controller = self.clone();
            let heartbeat = heartbeat.clone();
            tokio::spawn(async move {
                if let Err(hint) = controller
                    .forward(voter, kind::HEARTBEAT, json(&heartbeat), timeout)
                    .await
                {
                    tracing::trace!(voter, ?hint, "controller: heartbeat not delivered");
                }
                lock(&controller.heartbeats_in_flight).remove(&voter);
            });
        }
    }

    /// While this voter leads: fences brokers whose session expired and
    /// unfences registered brokers that heartbeat and have caught up.
    async fn liveness_loop(controller: std::sync::Weak<Controller>) {
        let mut tick = tokio::time::interval(Duration::from_millis(LIVENESS_CHECK_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let started = Instant::now();
        let mut preferred_checked = Instant::now();
        loop {
            tick.tick().await;
            let Some(controller) = controller.upgrade() else {
                return;
            };
            if !controller.is_leader() {
                continue;
            }
            for command in controller.liveness_commands(started) {
                if let Err(error) = controller.propose(command.clone()).await {
                    tracing::debug!(%error, ?command, "controller: liveness change not committed");
                }
            }
            for (topic, partition) in controller.view().image.reassignments_ready() {
                tracing::info!(
                    topic,
                    partition,
                    "controller: new replicas in sync, completing the move"
                );
                let command = MetadataCommand::CompleteReassignment { topic, partition };
                if let Err(error) = controller.propose(command).await {
                    tracing::debug!(%error, "controller: move not completed");
                }
            }
            let interval = controller.config.leader_rebalance_interval_ms;
            if interval > 0 && preferred_checked.elapsed() >= Duration::from_millis(interval) {
                preferred_checked = Instant::now();
                if controller.view().image.preferred_leaders_wanted() {
                    tracing::info!("controller: moving leadership back to preferred replicas");
                    if let Err(error) = controller
                        .propose(MetadataCommand::ElectPreferredLeaders)
                        .await
                    {
                        tracing::debug!(%error, "controller: preferred leaders not committed");
                    }
                }
            }
        }
    }

    /// The fencing and unfencing the sessions call for now.
    fn liveness_commands(&self, started: Instant) -> Vec<MetadataCommand> {
        let view = self.view();
        let sessions = self
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let timeout = Duration::from_millis(self.config.broker_session_timeout_ms);
        let now = Instant::now();
        let mut commands = Vec::new();
        for (id, broker) in &view.image.brokers {
            let session = sessions
                .get(id)
                .filter(|session| session.incarnation == broker.incarnation);
            // A voter that has heard nothing since it started gives every
            // broker one session timeout from its own start.
            let last = session.map_or(started, |session| session.last_heartbeat);
            let grace = Duration::from_millis(CONNECTION_LOSS_GRACE_MS);
            let connection_gone = session
                .and_then(|session| session.connection_lost_at)
                .is_some_and(|lost| now.duration_since(lost) >= grace);
            let alive = now.duration_since(last) < timeout && !connection_gone;
            let stopping = session.is_some_and(|session| session.shutting_down);
            if !broker.fenced && stopping {
                tracing::info!(broker = id, "controller: controlled shutdown, fencing");
                commands.push(MetadataCommand::FenceBroker { id: *id });
            } else if !broker.fenced && !alive {
                tracing::info!(
                    broker = id,
                    connection_gone,
                    "controller: session expired, fencing"
                );
                commands.push(MetadataCommand::FenceBroker { id: *id });
            } else if broker.fenced
                && alive
                && !stopping
                && session.is_some_and(|session| session.caught_up)
            {
                commands.push(MetadataCommand::UnfenceBroker {
                    id: *id,
                    incarnation: broker.incarnation,
                });
            }
        }
        commands
    }
}

fn fastrand_index(len: usize) -> usize {
    // Spread retries over voters without a RNG dependency: the clock's
    // nanoseconds are random enough for picking whom to ask.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.subsec_nanos() as usize);
    nanos % len
}
