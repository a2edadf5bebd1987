//! The replication rules of one partition on one broker, as a state machine
//! without I/O: metadata, fetches, fetch answers and clock ticks go in;
//! actions (assign an epoch, truncate, fetch from, propose an in-sync set,
//! publish a high watermark) come out. The broker drives it over the
//! network and the storage engine; a seeded simulation drives it in tests.
//!
//! The local log is read through [`LogView`]: its end is the end of what
//! is durable on this broker's disk, so every offset a follower reports and
//! every high watermark a leader computes counts only synced records.
//!
//! The rules:
//! - **High watermark.** The leader's is the minimum durable end over its
//!   in-sync set — the committed set joined with any expansion it has
//!   proposed (a proposed shrink does not count until the controller has
//!   committed it, so a leader cut off from the controller cannot leave out
//!   a follower on its own). It never goes down while the broker leads. A
//!   follower's is the leader's, capped at its own durable end.
//! - **Fetch.** A follower asks from its durable end, naming the epoch of its
//!   last record. The leader checks that epoch against its own epoch history
//!   (the leader-epoch lookup); if the follower's log diverges, the answer
//!   names where that epoch ends on the leader, and the follower truncates
//!   there, never to its own high watermark. Only a consistent fetch counts
//!   as the follower's progress.
//! - **In-sync set.** A follower that has not caught up to the leader's end
//!   within `replica_lag_time_max_ms` is proposed out; one whose end reaches
//!   the high watermark and the start of the leader's epoch is proposed in.
//!   One proposal at a time, retried until the controller answers.
//! - **Epochs.** Requests carry the leader epoch their sender believes in;
//!   a broker that is not the leader of that epoch refuses them.

use std::collections::BTreeMap;

use weir_protocol::ErrorCode;

pub use super::metadata::{BrokerId, MetadataError, PartitionState};

/// What the rules need to know of the local log.
pub trait LogView {
    /// First offset stored.
    fn start_offset(&self) -> u64;
    /// End of what is durable (the next offset to write).
    fn end_offset(&self) -> u64;
    /// The newest epoch of the epoch cache, including one assigned on
    /// becoming leader with no record written in it yet: a follower names it
    /// in its fetch, so that a leadership it lost is found diverging and cut
    /// from its cache (naming only its last record's epoch would leave the
    /// cache claiming offsets for an epoch it holds none of).
    fn latest_epoch(&self) -> Option<i32>;
    /// The largest epoch `<= epoch` this log knows and where it ends
    /// (exclusive): the leader-epoch lookup.
    fn epoch_end(&self, epoch: i32) -> Option<(i32, u64)>;
}

/// Settings of the rules.
#[derive(Debug, Clone, Copy)]
pub struct ReplicaConfig {
    /// A follower that has not caught up for this long leaves the in-sync set.
    pub replica_lag_time_max_ms: u64,
    /// `acks=all` needs at least this many in-sync replicas.
    pub min_insync_replicas: usize,
    /// An unanswered in-sync proposal is sent again after this long.
    pub isr_retry_ms: u64,
    /// Whether the controller may elect a leader outside the in-sync set
    /// (then a follower may have to truncate below its high watermark).
    pub unclean_leader_election: bool,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        ReplicaConfig {
            replica_lag_time_max_ms: 10_000,
            min_insync_replicas: 1,
            isr_retry_ms: 1_000,
            unclean_leader_election: false,
        }
    }
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// This broker now leads in `epoch`: record that the epoch starts at the
    /// log's end (before any append in it), stop fetching.
    BecomeLeader {
        /// The new leader epoch.
        epoch: i32,
    },
    /// Fetch from `leader` in `epoch` (a new leader or epoch).
    FollowLeader {
        /// The leader.
        leader: BrokerId,
        /// Its epoch.
        epoch: i32,
    },
    /// Neither lead nor fetch (no leader, or not a replica any more).
    Stop,
    /// Cut the log back to `offset` (every record at or after it goes).
    Truncate {
        /// The new end.
        offset: u64,
    },
    /// Send this in-sync set to the controller (`AlterPartition`).
    ProposeIsr {
        /// The leader epoch it is proposed in.
        leader_epoch: i32,
        /// The partition epoch it is based on.
        partition_epoch: i32,
        /// The proposed set.
        isr: Vec<BrokerId>,
    },
    /// The high watermark rose to this offset: wake `acks=all` waiters and
    /// consumers.
    HighWatermark(u64),
}

/// A follower's fetch, as the leader receives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchFrom {
    /// The follower.
    pub follower: BrokerId,
    /// The leader epoch the follower believes in.
    pub leader_epoch: i32,
    /// The follower's durable end.
    pub fetch_offset: u64,
    /// The epoch of the follower's last record.
    pub last_fetched_epoch: Option<i32>,
}

/// The leader's answer to a fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchAnswer {
    /// Send the batches from `from`.
    Read {
        /// First offset to send.
        from: u64,
        /// The leader's high watermark.
        high_watermark: u64,
    },
    /// The follower's log diverges: `epoch` ends at `end_offset` here.
    Diverging {
        /// The largest epoch the leader knows at or below the follower's.
        epoch: i32,
        /// Where that epoch ends on the leader.
        end_offset: u64,
        /// The leader's high watermark.
        high_watermark: u64,
    },
    /// Refused: `NotLeader`, `FencedLeaderEpoch` (the follower's epoch is
    /// older) or `UnknownLeaderEpoch` (newer than this broker knows).
    Refused(ErrorCode),
}

/// A follower's progress as its leader sees it.
#[derive(Debug, Clone, Copy)]
struct Progress {
    /// Durable end, once a consistent fetch in this leadership reported it.
    end_offset: Option<u64>,
    /// Last time its end reached the leader's end.
    caught_up_at_ms: u64,
    /// The leader's end at its previous fetch, and that fetch's time.
    previous_fetch: (u64, u64),
}

/// An in-sync proposal awaiting the controller.
#[derive(Debug, Clone)]
struct Pending {
    isr: Vec<BrokerId>,
    partition_epoch: i32,
    sent_at_ms: u64,
    /// Refused as stale: not resent; newer metadata settles it.
    awaiting_metadata: bool,
}

#[derive(Debug, Clone)]
enum Role {
    Leader {
        progress: BTreeMap<BrokerId, Progress>,
        pending: Option<Pending>,
    },
    Follower {
        leader: BrokerId,
    },
    /// No leader, or not a replica.
    Idle,
}

/// One partition's replication state on one broker.
#[derive(Debug, Clone)]
pub struct Replica {
    me: BrokerId,
    config: ReplicaConfig,
    /// The newest metadata applied.
    state: Option<PartitionState>,
    role: Role,
    high_watermark: u64,
    /// After the controller refused an expansion as ineligible, none is
    /// proposed again before this time (a fenced broker that still fetches
    /// must not cost a controller write per fetch).
    expand_blocked_until_ms: u64,
}

impl Replica {
    /// A replica that has seen no metadata yet, with the high watermark it
    /// last knew (a lower bound; 0 when unknown).
    pub fn new(me: BrokerId, config: ReplicaConfig, high_watermark: u64) -> Replica {
        Replica {
            me,
            config,
            state: None,
            role: Role::Idle,
            high_watermark,
            expand_blocked_until_ms: 0,
        }
    }

    /// Sets how many in-sync replicas `acks=all` needs (it depends on the
    /// topic's replication factor and configs, known with its metadata).
    pub fn set_min_insync_replicas(&mut self, count: usize) {
        self.config.min_insync_replicas = count;
    }

    /// Consumers read below it.
    pub fn high_watermark(&self) -> u64 {
        self.high_watermark
    }

    /// Whether this broker leads the partition.
    pub fn is_leader(&self) -> bool {
        matches!(self.role, Role::Leader { .. })
    }

    /// The leader this broker follows, if it follows.
    pub fn leader(&self) -> Option<BrokerId> {
        match self.role {
            Role::Leader { .. } => Some(self.me),
            Role::Follower { leader } => Some(leader),
            Role::Idle => None,
        }
    }

    /// The metadata last applied.
    pub fn state(&self) -> Option<&PartitionState> {
        self.state.as_ref()
    }

    /// The leader epoch last applied (-1 before any).
    pub fn leader_epoch(&self) -> i32 {
        self.state.as_ref().map_or(-1, |state| state.leader_epoch)
    }

    /// A leader's lowest end offset over all its replicas (`own_end` for
    /// itself; 0 for a follower not heard from in this leadership): what
    /// every replica holds. 0 on a follower.
    pub fn replicas_end_floor(&self, own_end: u64) -> u64 {
        let Role::Leader { progress, .. } = &self.role else {
            return 0;
        };
        progress
            .values()
            .map(|follower| follower.end_offset.unwrap_or(0))
            .fold(own_end, u64::min)
    }

    /// The in-sync set the high watermark is computed over: the committed
    /// one joined with a proposed expansion.
    pub fn maximal_isr(&self) -> Vec<BrokerId> {
        let mut isr = self.state.as_ref().map_or(Vec::new(), |s| s.isr.clone());
        if let Role::Leader {
            pending: Some(pending),
            ..
        } = &self.role
        {
            for id in &pending.isr {
                if !isr.contains(id) {
                    isr.push(*id);
                }
            }
        }
        isr
    }

    /// Applies the controller's view of the partition. Older views (by
    /// leader epoch, then partition epoch) are ignored.
    pub fn apply_metadata(
        &mut self,
        state: PartitionState,
        log: &impl LogView,
        now_ms: u64,
    ) -> Vec<Action> {
        if let Some(current) = &self.state
            && (state.leader_epoch, state.partition_epoch)
                <= (current.leader_epoch, current.partition_epoch)
        {
            return Vec::new();
        }
        let same_leadership = self
            .state
            .as_ref()
            .is_some_and(|current| current.leader_epoch == state.leader_epoch);
        let mut actions = Vec::new();
        let is_replica = state.replicas.contains(&self.me);
        // An epoch this log already holds was led by this broker in an
        // earlier life (only the leader of an epoch writes it): after a
        // restart it must not lead it again with what it forgot (its high
        // watermark, its followers' progress), or it could admit a lagging
        // follower to the in-sync set. It waits for a new epoch.
        let led_before = !(same_leadership && self.is_leader())
            && log
                .latest_epoch()
                .is_some_and(|latest| latest >= state.leader_epoch);
        match state.leader {
            Some(leader) if leader == self.me && is_replica && !led_before => {
                if !(same_leadership && self.is_leader()) {
                    let progress = state
                        .replicas
                        .iter()
                        .filter(|id| **id != self.me)
                        .map(|id| {
                            (
                                *id,
                                Progress {
                                    end_offset: None,
                                    // A follower gets a full lag period to show up.
                                    caught_up_at_ms: now_ms,
                                    previous_fetch: (u64::MAX, now_ms),
                                },
                            )
                        })
                        .collect();
                    self.role = Role::Leader {
                        progress,
                        pending: None,
                    };
                    actions.push(Action::BecomeLeader {
                        epoch: state.leader_epoch,
                    });
                } else if let Role::Leader { pending, .. } = &mut self.role
                    && pending
                        .as_ref()
                        .is_some_and(|p| p.partition_epoch < state.partition_epoch)
                {
                    // The controller acted on (or past) the proposal.
                    *pending = None;
                }
                if let Role::Leader { progress, .. } = &mut self.role {
                    // Replicas added by a move get a full lag period to
                    // show up; those dropped are no longer waited for.
                    let me = self.me;
                    progress.retain(|id, _| state.replicas.contains(id));
                    for id in state.replicas.iter().filter(|id| **id != me) {
                        progress.entry(*id).or_insert(Progress {
                            end_offset: None,
                            caught_up_at_ms: now_ms,
                            previous_fetch: (u64::MAX, now_ms),
                        });
                    }
                }
                self.state = Some(state);
                self.high_watermark = self.high_watermark.min(log.end_offset());
                actions.extend(self.advance_high_watermark(log));
            }
            Some(leader) if is_replica && leader != self.me => {
                let changed = !same_leadership
                    || !matches!(self.role, Role::Follower { leader: l } if l == leader);
                self.role = Role::Follower { leader };
                if changed {
                    actions.push(Action::FollowLeader {
                        leader,
                        epoch: state.leader_epoch,
                    });
                }
                self.state = Some(state);
            }
            _ => {
                if !matches!(self.role, Role::Idle) {
                    actions.push(Action::Stop);
                }
                self.role = Role::Idle;
                self.state = Some(state);
            }
        }
        actions
    }

    /// Checks a produce before anything is appended.
    ///
    /// # Errors
    /// `NotLeader`, `FencedLeaderEpoch` for a producer that names an older
    /// epoch, or `NotEnoughReplicas` for `acks=all` with too small an
    /// in-sync set.
    pub fn check_produce(
        &self,
        acks_all: bool,
        leader_epoch: Option<i32>,
    ) -> Result<(), ErrorCode> {
        if !self.is_leader() {
            return Err(ErrorCode::NotLeader);
        }
        if let Some(epoch) = leader_epoch {
            check_epoch(epoch, self.leader_epoch())?;
        }
        let isr = self.state.as_ref().map_or(0, |s| s.isr.len());
        if acks_all && isr < self.config.min_insync_replicas {
            return Err(ErrorCode::NotEnoughReplicas);
        }
        Ok(())
    }

    /// Whether an `acks=all` append ending at `end_offset` (exclusive),
    /// made while leading in `leader_epoch`, is complete: `None` while the
    /// high watermark is below it. An append from an earlier leadership is
    /// refused even if the offset is now below the high watermark: the
    /// record there may be another one.
    pub fn acks_all_outcome(
        &self,
        end_offset: u64,
        leader_epoch: i32,
    ) -> Option<Result<(), ErrorCode>> {
        if !self.is_leader() || leader_epoch != self.leader_epoch() {
            return Some(Err(ErrorCode::NotLeader));
        }
        if self.high_watermark < end_offset {
            return None;
        }
        let isr = self.state.as_ref().map_or(0, |s| s.isr.len());
        Some(if isr < self.config.min_insync_replicas {
            Err(ErrorCode::NotEnoughReplicasAfterAppend)
        } else {
            Ok(())
        })
    }

    /// The leader's side of a follower's fetch.
    pub fn on_fetch(
        &mut self,
        fetch: &FetchFrom,
        log: &impl LogView,
        now_ms: u64,
    ) -> (FetchAnswer, Vec<Action>) {
        let epoch = self.leader_epoch();
        let high_watermark = self.high_watermark;
        let Role::Leader { progress, .. } = &mut self.role else {
            return (FetchAnswer::Refused(ErrorCode::NotLeader), Vec::new());
        };
        if let Err(code) = check_epoch(fetch.leader_epoch, epoch) {
            return (FetchAnswer::Refused(code), Vec::new());
        }
        let Some(follower) = progress.get_mut(&fetch.follower) else {
            return (FetchAnswer::Refused(ErrorCode::NotLeader), Vec::new());
        };
        let leader_end = log.end_offset();
        // The leader-epoch lookup: is the follower's last record where this
        // log has it?
        let diverging = match fetch.last_fetched_epoch {
            Some(last) => match log.epoch_end(last) {
                Some((found, end)) if found == last && fetch.fetch_offset <= end => None,
                Some((found, end)) => Some((found, end)),
                // This log knows no epoch that old: the follower keeps
                // nothing of it beyond what this log starts at.
                None => Some((-1, log.start_offset())),
            },
            None if fetch.fetch_offset > leader_end => {
                Some((log.latest_epoch().unwrap_or(-1), leader_end))
            }
            None => None,
        };
        if let Some((epoch, end_offset)) = diverging {
            return (
                FetchAnswer::Diverging {
                    epoch,
                    end_offset,
                    high_watermark,
                },
                Vec::new(),
            );
        }
        let offset = fetch.fetch_offset;
        follower.end_offset = Some(offset);
        if offset >= leader_end {
            follower.caught_up_at_ms = now_ms;
        } else if offset >= follower.previous_fetch.0 {
            // It has what the leader had at its previous fetch.
            follower.caught_up_at_ms = follower.caught_up_at_ms.max(follower.previous_fetch.1);
        }
        follower.previous_fetch = (leader_end, now_ms);
        let mut actions = self.advance_high_watermark(log);
        // This leadership's first offset: where the previous epoch ends.
        let epoch_start = log
            .epoch_end(epoch - 1)
            .map_or(log.start_offset(), |(_, end)| end);
        actions.extend(self.maybe_expand(fetch.follower, offset, epoch_start, now_ms));
        (
            FetchAnswer::Read {
                from: offset,
                high_watermark: self.high_watermark,
            },
            actions,
        )
    }

    /// The local log's durable end moved (an append completed).
    pub fn on_local_durable(&mut self, log: &impl LogView) -> Vec<Action> {
        if self.is_leader() {
            self.advance_high_watermark(log)
        } else {
            Vec::new()
        }
    }

    /// Time passed: a leader proposes out followers that lag too long and
    /// resends an unanswered proposal.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Action> {
        let lag_max = self.config.replica_lag_time_max_ms;
        let retry = self.config.isr_retry_ms;
        let Some(state) = &self.state else {
            return Vec::new();
        };
        let Role::Leader {
            progress, pending, ..
        } = &mut self.role
        else {
            return Vec::new();
        };
        if let Some(pending) = pending {
            if !pending.awaiting_metadata && now_ms.saturating_sub(pending.sent_at_ms) >= retry {
                pending.sent_at_ms = now_ms;
                return vec![Action::ProposeIsr {
                    leader_epoch: state.leader_epoch,
                    partition_epoch: pending.partition_epoch,
                    isr: pending.isr.clone(),
                }];
            }
            return Vec::new();
        }
        let lagging: Vec<BrokerId> = state
            .isr
            .iter()
            .copied()
            .filter(|id| *id != self.me)
            .filter(|id| {
                progress
                    .get(id)
                    .is_some_and(|p| now_ms.saturating_sub(p.caught_up_at_ms) > lag_max)
            })
            .collect();
        if lagging.is_empty() {
            return Vec::new();
        }
        let isr: Vec<BrokerId> = state
            .isr
            .iter()
            .copied()
            .filter(|id| !lagging.contains(id))
            .collect();
        propose(pending, state, isr, now_ms)
    }

    /// The controller refused the proposal. A refusal because the
    /// proposal was ineligible leaves the committed set as it was: the
    /// proposal is dropped and the next fetch or tick proposes again. A
    /// refusal because this broker's view is stale (a newer leader epoch or
    /// partition epoch) keeps the proposal, and with it the maximal in-sync
    /// set, until newer metadata arrives: the controller may have applied
    /// the proposal (its answer lost) before electing another leader, and
    /// falling back to the older, smaller set could let this deposed leader
    /// advance its high watermark without the new leader's copy.
    ///
    /// `partition_epoch` and `isr` name the refused proposal; a refusal of
    /// an earlier one is ignored.
    pub fn on_isr_refused(
        &mut self,
        partition_epoch: i32,
        isr: &[BrokerId],
        error: &MetadataError,
    ) {
        let Role::Leader { pending, .. } = &mut self.role else {
            return;
        };
        let Some(refused) = pending
            .as_mut()
            .filter(|p| p.partition_epoch == partition_epoch && p.isr == isr)
        else {
            return;
        };
        match error {
            MetadataError::InvalidIsr => {
                self.expand_blocked_until_ms = refused.sent_at_ms + self.config.isr_retry_ms;
                *pending = None;
            }
            _ => refused.awaiting_metadata = true,
        }
    }

    /// The follower's side of a fetch answer. `log` is the log after the
    /// answer's batches (if any) became durable.
    ///
    /// # Panics
    /// If the leader asks to truncate below this broker's high watermark
    /// while unclean election is off: records every in-sync replica held
    /// would be lost, which the rules exclude.
    ///
    /// An answer from another broker than the leader followed, or in
    /// another epoch, is ignored: a deposed leader's divergence must not
    /// truncate this log.
    pub fn on_fetch_answer(
        &mut self,
        from: BrokerId,
        leader_epoch: i32,
        answer: &FetchAnswer,
        log: &impl LogView,
    ) -> Vec<Action> {
        if !matches!(self.role, Role::Follower { leader } if leader == from)
            || leader_epoch != self.leader_epoch()
        {
            return Vec::new();
        }
        match *answer {
            FetchAnswer::Read { high_watermark, .. } => {
                self.follow_high_watermark(high_watermark, log)
            }
            // The high watermark rises only with a consistent read: what is
            // left below the cut may still diverge in an older epoch.
            FetchAnswer::Diverging {
                epoch, end_offset, ..
            } => {
                // Cut where the leader's epoch ends, or where ours does if
                // that is earlier; the next fetch checks again from there.
                let own_end = if epoch < 0 {
                    end_offset
                } else {
                    log.epoch_end(epoch).map_or(0, |(_, end)| end)
                };
                let offset = end_offset.min(own_end).min(log.end_offset());
                if offset < self.high_watermark {
                    assert!(
                        self.config.unclean_leader_election,
                        "truncation to {offset} below the high watermark {}",
                        self.high_watermark
                    );
                    self.high_watermark = offset;
                }
                vec![Action::Truncate { offset }]
            }
            FetchAnswer::Refused(_) => Vec::new(),
        }
    }

    fn follow_high_watermark(
        &mut self,
        leader_high_watermark: u64,
        log: &impl LogView,
    ) -> Vec<Action> {
        let high_watermark = leader_high_watermark.min(log.end_offset());
        if high_watermark > self.high_watermark {
            self.high_watermark = high_watermark;
            vec![Action::HighWatermark(high_watermark)]
        } else {
            Vec::new()
        }
    }

    /// Recomputes a leader's high watermark.
    fn advance_high_watermark(&mut self, log: &impl LogView) -> Vec<Action> {
        let isr = self.maximal_isr();
        let Role::Leader { progress, .. } = &self.role else {
            return Vec::new();
        };
        let leader_end = log.end_offset();
        let minimum = isr
            .iter()
            .map(|id| {
                if *id == self.me {
                    leader_end
                } else {
                    progress.get(id).and_then(|p| p.end_offset).unwrap_or(0)
                }
            })
            .min()
            .unwrap_or(leader_end)
            .min(leader_end);
        if minimum > self.high_watermark {
            self.high_watermark = minimum;
            vec![Action::HighWatermark(minimum)]
        } else {
            Vec::new()
        }
    }

    /// Proposes `follower` into the in-sync set once it holds everything
    /// below the high watermark and this leadership's first offset.
    fn maybe_expand(
        &mut self,
        follower: BrokerId,
        end_offset: u64,
        epoch_start: u64,
        now_ms: u64,
    ) -> Vec<Action> {
        let high_watermark = self.high_watermark;
        let Some(state) = &self.state else {
            return Vec::new();
        };
        let Role::Leader { pending, .. } = &mut self.role else {
            return Vec::new();
        };
        if pending.is_some()
            || now_ms < self.expand_blocked_until_ms
            || state.in_sync(follower)
            || end_offset < high_watermark
            || end_offset < epoch_start
        {
            return Vec::new();
        }
        let mut isr = state.isr.clone();
        isr.push(follower);
        propose(pending, state, isr, now_ms)
    }
}

/// Records `isr` as the proposal in flight, based on `state`, and the
/// action that sends it.
fn propose(
    pending: &mut Option<Pending>,
    state: &PartitionState,
    isr: Vec<BrokerId>,
    now_ms: u64,
) -> Vec<Action> {
    *pending = Some(Pending {
        isr: isr.clone(),
        partition_epoch: state.partition_epoch,
        sent_at_ms: now_ms,
        awaiting_metadata: false,
    });
    vec![Action::ProposeIsr {
        leader_epoch: state.leader_epoch,
        partition_epoch: state.partition_epoch,
        isr,
    }]
}

/// A request naming `requested` reaching a broker at `current`.
fn check_epoch(requested: i32, current: i32) -> Result<(), ErrorCode> {
    match requested.cmp(&current) {
        std::cmp::Ordering::Less => Err(ErrorCode::FencedLeaderEpoch),
        std::cmp::Ordering::Greater => Err(ErrorCode::UnknownLeaderEpoch),
        std::cmp::Ordering::Equal => Ok(()),
    }
}
