//! Consumer groups: membership, generations, assignment on the coordinator,
//! and committed offsets kept as records of the internal topic
//! `__consumer_offsets`.
//!
//! A group is coordinated by the leader of its `__consumer_offsets`
//! partition (on a single node: this broker, for every group). The
//! coordinator takes up an offsets partition when it becomes its leader,
//! loading its groups from the partition's snapshot and log, and gives it
//! up (dropping those groups' memberships) when leadership moves on; a
//! group call elsewhere is answered `NotCoordinator`. A rebalance is a
//! round: it starts when a member joins, changes its subscription, leaves
//! or misses its session timeout; every member must (re)join within the
//! rebalance timeout, or it is dropped; then the generation advances and the
//! coordinator computes the assignment (`range` or `roundrobin`) and answers
//! every waiting JoinGroup with its member's partitions. A member of an
//! older generation is fenced (`IllegalGeneration`), a removed one gets
//! `UnknownMemberId`. Member ids carry the broker's start time, so an id
//! from before a restart is unknown after it: its owner rejoins.
//!
//! Offsets are the durable part: an OffsetCommit is one batch appended to
//! the group's offsets partition and acknowledged once it is on every
//! in-sync replica (as an acks=all produce), so the next coordinator has
//! it; taking up a partition loads its snapshot (written at clean stops and
//! every retention check) and replays the records after it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use weir_protocol::message::*;
use weir_protocol::{BatchBuilder, Batches, ErrorCode};

use crate::topics::Topics;

mod assignors;
mod group;
mod offsets;

pub use assignors::{Assignment, assign, assign_sticky};
pub use group::{Committed, GroupState};
use group::{FENCED_IDS_MAX, Group, Member, RunningTime, join_error, to_wire};
pub use offsets::offsets_partition;

pub use crate::config::{OFFSETS_RETENTION_MS, OFFSETS_SEGMENT_BYTES};
pub use crate::topics::OFFSETS_TOPIC;
/// Groups a coordinator keeps at most.
pub const GROUPS_MAX: usize = 10_000;
/// Members of one group at most.
pub const MEMBERS_PER_GROUP_MAX: usize = 1_000;
/// Longest group name, member id or instance id.
pub const GROUP_NAME_BYTES_MAX: usize = 255;
/// Shortest session timeout accepted.
pub const SESSION_TIMEOUT_MS_MIN: u32 = 500;
/// Longest session timeout accepted.
pub const SESSION_TIMEOUT_MS_MAX: u32 = 300_000;
/// Longest rebalance timeout accepted.
pub const REBALANCE_TIMEOUT_MS_MAX: u32 = 300_000;
/// Offsets in one OffsetCommit at most.
pub const COMMIT_OFFSETS_MAX: usize = 10_000;
/// Longest metadata string kept with an offset.
pub const COMMIT_METADATA_BYTES_MAX: usize = 4096;
/// How long an OffsetCommit waits for the in-sync replicas of its offsets
/// partition before it is answered `Timeout` (the commit may still land).
pub const OFFSET_COMMIT_REPLICATION_TIMEOUT_MS: u64 = 10_000;
/// How often expired members are looked for.
pub const REAPER_INTERVAL_MS: u64 = 100;
/// The assignors the coordinator knows.
pub const ASSIGNORS: [&str; 3] = ["range", "roundrobin", COOPERATIVE_STICKY];

/// The assignor that keeps partitions with their owners and moves the rest
/// in two rounds, so members never stop what they keep.
pub const COOPERATIVE_STICKY: &str = "cooperative-sticky";

/// Groups of this broker.
#[derive(Debug)]
pub struct Coordinator {
    groups: Mutex<BTreeMap<String, Group>>,
    changed: Notify,
    /// One per offsets partition: a commit holds it from append to apply,
    /// so the log's order and the table's agree.
    commit_locks: Vec<tokio::sync::Mutex<()>>,
    /// Partitions of the offsets topic: configured until the topic exists,
    /// then the topic's own count.
    offsets_partitions: AtomicU32,
    /// Offsets partitions this broker leads and has loaded, with the
    /// leader epoch it loaded them in: it coordinates their groups.
    owned: Mutex<BTreeMap<u32, i32>>,
    /// Offsets partitions whose load failed, with the leader epoch it
    /// failed in (not retried until leadership changes).
    load_failed: Mutex<BTreeMap<u32, i32>>,
    initial_delay: Duration,
    /// Offsets of a group go once it has had no members for this long and
    /// no commit within it (0: kept for ever).
    offsets_retention_ms: u64,
    /// Segment size the offsets topic is created with.
    offsets_segment_bytes: u64,
    /// Distinguishes this run's member ids from an earlier run's.
    run_id: String,
    next_member: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= GROUP_NAME_BYTES_MAX
}

impl Coordinator {
    /// A coordinator whose offsets topic has `offsets_partitions`
    /// partitions and whose first rebalance of an empty group waits
    /// `initial_delay` for more members.
    pub fn new(offsets_partitions: u32, initial_delay: Duration) -> Coordinator {
        let run_id = format!(
            "{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_micros())
        );
        Coordinator {
            groups: Mutex::new(BTreeMap::new()),
            changed: Notify::new(),
            commit_locks: (0..offsets_partitions.max(1))
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            offsets_partitions: AtomicU32::new(offsets_partitions.max(1)),
            owned: Mutex::new(BTreeMap::new()),
            load_failed: Mutex::new(BTreeMap::new()),
            initial_delay,
            offsets_retention_ms: OFFSETS_RETENTION_MS,
            offsets_segment_bytes: OFFSETS_SEGMENT_BYTES,
            run_id,
            next_member: AtomicU64::new(0),
        }
    }

    /// Sets how long the offsets of a group without members and commits
    /// are kept (0: for ever), and the offsets topic's segment size.
    pub fn with_offsets(mut self, retention_ms: u64, segment_bytes: u64) -> Coordinator {
        self.offsets_retention_ms = retention_ms;
        self.offsets_segment_bytes = segment_bytes.max(crate::topics::SEGMENT_BYTES_MIN);
        self
    }

    /// JoinGroup: waits until the round this member joins completes.
    pub async fn join(&self, topics: &Topics, request: JoinGroupRequest) -> JoinGroupResponse {
        if !valid_name(&request.group)
            || request.member_id.len() > GROUP_NAME_BYTES_MAX
            || request
                .group_instance_id
                .as_ref()
                .is_some_and(|id| !valid_name(id))
            || request.topics.len() > crate::topics::TOPICS_PER_REQUEST_MAX
        {
            return join_error(ErrorCode::InvalidRequest, &request.member_id);
        }
        if !(SESSION_TIMEOUT_MS_MIN..=SESSION_TIMEOUT_MS_MAX).contains(&request.session_timeout_ms)
        {
            return join_error(ErrorCode::InvalidSessionTimeout, &request.member_id);
        }
        if !ASSIGNORS.contains(&request.assignor.as_str()) {
            return join_error(ErrorCode::InconsistentAssignor, &request.member_id);
        }
        if let Err(error) = self.check_coordinator(&request.group) {
            return join_error(error, &request.member_id);
        }
        let now = Instant::now();
        let (member_id, joined_at_generation) = {
            let mut groups = lock(&self.groups);
            if !groups.contains_key(&request.group) {
                if !request.member_id.is_empty() {
                    return join_error(ErrorCode::UnknownMemberId, &request.member_id);
                }
                if groups.len() >= GROUPS_MAX {
                    return join_error(ErrorCode::InvalidRequest, &request.member_id);
                }
            }
            let group = groups
                .entry(request.group.clone())
                .or_insert_with(|| Group::new(now));
            if !group.members.is_empty() && group.assignor != request.assignor {
                return join_error(ErrorCode::InconsistentAssignor, &request.member_id);
            }
            let mut topics_wanted = request.topics.clone();
            topics_wanted.sort();
            topics_wanted.dedup();
            let static_member = request.group_instance_id.as_ref().and_then(|instance| {
                group
                    .members
                    .iter()
                    .find(|(_, member)| member.instance_id.as_ref() == Some(instance))
                    .map(|(id, _)| id.clone())
            });
            if group.fenced.contains(&request.member_id) {
                return join_error(ErrorCode::FencedInstanceId, &request.member_id);
            }
            let (member_id, known) = if request.member_id.is_empty() {
                match static_member {
                    Some(old_id) => {
                        // The instance restarted (or a second copy runs):
                        // the new process takes over under a new id and the
                        // old id is fenced, so two processes never share
                        // partitions.
                        let number = self.next_member.fetch_add(1, Ordering::Relaxed);
                        let prefix = request.group_instance_id.as_deref().unwrap_or("member");
                        let new_id = format!("{prefix}-{}-{number}", self.run_id);
                        if let Some(member) = group.members.remove(&old_id) {
                            group.members.insert(new_id.clone(), member);
                        }
                        if group.joined.remove(&old_id) {
                            group.joined.insert(new_id.clone());
                        }
                        if group.leader == old_id {
                            group.leader = new_id.clone();
                        }
                        group.fenced.push_back(old_id);
                        while group.fenced.len() > FENCED_IDS_MAX {
                            group.fenced.pop_front();
                        }
                        (new_id, true)
                    }
                    None => {
                        if group.members.len() >= MEMBERS_PER_GROUP_MAX {
                            return join_error(ErrorCode::InvalidRequest, "");
                        }
                        let number = self.next_member.fetch_add(1, Ordering::Relaxed);
                        let prefix = request.group_instance_id.as_deref().unwrap_or("member");
                        (format!("{prefix}-{}-{number}", self.run_id), false)
                    }
                }
            } else if group.members.contains_key(&request.member_id) {
                (request.member_id.clone(), true)
            } else {
                return join_error(ErrorCode::UnknownMemberId, &request.member_id);
            };
            let unchanged = known
                && group
                    .members
                    .get(&member_id)
                    .is_some_and(|member| member.topics == topics_wanted);
            // A member: the group is no longer empty (the reaper would see
            // it only on its next round).
            group.empty = None;
            let member = group
                .members
                .entry(member_id.clone())
                .or_insert_with(|| Member {
                    instance_id: request.group_instance_id.clone(),
                    topics: Vec::new(),
                    session_timeout: Duration::ZERO,
                    rebalance_timeout: Duration::ZERO,
                    last_seen: now,
                    assignment: Vec::new(),
                    revoking: Vec::new(),
                });
            member.topics = topics_wanted;
            member.session_timeout = Duration::from_millis(u64::from(request.session_timeout_ms));
            member.rebalance_timeout = Duration::from_millis(u64::from(
                request.rebalance_timeout_ms.min(REBALANCE_TIMEOUT_MS_MAX),
            ));
            member.last_seen = now;
            if group.state == GroupState::Stable && unchanged && !group.follow_up {
                // A known member (or a static one back from a restart) with
                // the same subscription: nothing to rebalance.
                return group.response_for(&member_id);
            }
            group.assignor = request.assignor.clone();
            if group.state != GroupState::PreparingRebalance {
                group.follow_up = false;
                group.open_round(now, self.initial_delay);
            }
            group.joined.insert(member_id.clone());
            let generation = group.generation;
            if group.try_complete(now, topics) {
                self.changed.notify_waiters();
            }
            (member_id, generation)
        };
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Err(error) = self.check_coordinator(&request.group) {
                // Leadership of the offsets partition moved meanwhile.
                return join_error(error, &member_id);
            }
            let wake_at = {
                let mut groups = lock(&self.groups);
                let Some(group) = groups.get_mut(&request.group) else {
                    return join_error(ErrorCode::UnknownMemberId, &member_id);
                };
                if group.fenced.contains(&member_id) {
                    return join_error(ErrorCode::FencedInstanceId, &member_id);
                }
                if !group.members.contains_key(&member_id) {
                    return join_error(ErrorCode::UnknownMemberId, &member_id);
                }
                // The round this member joined has completed: answer it,
                // even if another round has opened since (the member learns
                // of that one from its heartbeat). Folding it into the next
                // round instead would skip a generation whose revocations
                // it never saw.
                if group.generation != joined_at_generation {
                    if let Some(member) = group.members.get_mut(&member_id) {
                        member.last_seen = Instant::now();
                    }
                    return group.response_for(&member_id);
                }
                let now = Instant::now();
                if group.try_complete(now, topics) {
                    self.changed.notify_waiters();
                    return group.response_for(&member_id);
                }
                if group.round_not_before > now {
                    group.round_not_before.min(group.round_deadline)
                } else {
                    group.round_deadline
                }
            };
            let _ = tokio::time::timeout_at(wake_at.into(), changed).await;
        }
    }

    /// SyncGroup: the member's assignment in the current generation.
    pub fn sync(&self, request: &SyncGroupRequest) -> SyncGroupResponse {
        let groups = lock(&self.groups);
        let checked = self
            .check_coordinator(&request.group)
            .and_then(|()| check_member(&groups, &request.group, &request.member_id));
        let error = match checked {
            Err(error) => error,
            Ok(group) if group.state == GroupState::PreparingRebalance => {
                ErrorCode::RebalanceInProgress
            }
            Ok(group) if group.generation != request.generation => ErrorCode::IllegalGeneration,
            Ok(group) => {
                return SyncGroupResponse {
                    error: ErrorCode::None,
                    assignment: group
                        .members
                        .get(&request.member_id)
                        .map(|member| to_wire(&member.assignment))
                        .unwrap_or_default(),
                };
            }
        };
        SyncGroupResponse {
            error,
            assignment: Vec::new(),
        }
    }

    /// Heartbeat: keeps the member's session; tells it to rejoin during a
    /// rebalance.
    pub fn heartbeat(&self, request: &HeartbeatRequest) -> GroupAck {
        if let Err(error) = self.check_coordinator(&request.group) {
            return GroupAck { error };
        }
        let mut groups = lock(&self.groups);
        let error = match groups.get_mut(&request.group) {
            None => ErrorCode::UnknownGroup,
            Some(group) if group.fenced.contains(&request.member_id) => ErrorCode::FencedInstanceId,
            Some(group) => match group.members.get_mut(&request.member_id) {
                None => ErrorCode::UnknownMemberId,
                Some(member) => {
                    member.last_seen = Instant::now();
                    let owes_follow_up = group.follow_up && !member.revoking.is_empty();
                    if group.state == GroupState::PreparingRebalance || owes_follow_up {
                        // Cooperative: a member holding back moved
                        // partitions is prompted to rejoin for the hand-over.
                        ErrorCode::RebalanceInProgress
                    } else if group.generation != request.generation {
                        ErrorCode::IllegalGeneration
                    } else {
                        ErrorCode::None
                    }
                }
            },
        };
        GroupAck { error }
    }

    /// LeaveGroup: the member goes; the rest rebalance.
    pub fn leave(&self, topics: &Topics, request: &LeaveGroupRequest) -> GroupAck {
        if let Err(error) = self.check_coordinator(&request.group) {
            return GroupAck { error };
        }
        let mut groups = lock(&self.groups);
        let error = match groups.get_mut(&request.group) {
            None => ErrorCode::UnknownGroup,
            Some(group) if !group.members.contains_key(&request.member_id) => {
                ErrorCode::UnknownMemberId
            }
            Some(group) => {
                let now = Instant::now();
                group.remove_member(&request.member_id, now, self.initial_delay);
                group.try_complete(now, topics);
                ErrorCode::None
            }
        };
        drop(groups);
        self.changed.notify_waiters();
        GroupAck { error }
    }

    /// Drops members whose session expired and closes rounds whose time is
    /// up, and forgets the offsets of groups whose retention ran out,
    /// returning those (group, partitions) for
    /// [`Coordinator::write_tombstones`]. Called every
    /// [`REAPER_INTERVAL_MS`].
    pub fn reap(&self, topics: &Topics) -> Vec<(String, Vec<(String, u32)>)> {
        let now = Instant::now();
        let mut changed = false;
        let mut groups = lock(&self.groups);
        for (name, group) in groups.iter_mut() {
            let expired: Vec<String> = group
                .members
                .iter()
                .filter(|(id, member)| {
                    // A member waiting in JoinGroup is not expected to beat.
                    !(group.state == GroupState::PreparingRebalance && group.joined.contains(*id))
                        && member.last_seen + member.session_timeout < now
                })
                .map(|(id, _)| id.clone())
                .collect();
            for member in expired {
                tracing::info!(group = name, member, "session expired");
                group.remove_member(&member, now, self.initial_delay);
                changed = true;
            }
            if group.state == GroupState::Stable
                && group.subscribed_counts(topics) != group.assigned_counts
            {
                tracing::info!(group = name, "subscribed topics changed; rebalancing");
                group.open_round(now, self.initial_delay);
                changed = true;
            }
            changed |= group.try_complete(now, topics);
        }
        // A group with nothing left to remember goes, and so do the
        // offsets of one that has had no members for the retention and no
        // commit within it (as Kafka, KIP-211: the clock starts when the
        // group empties, so a restart or a lapsed session never costs a
        // live group its offsets). The next snapshot leaves them out, and
        // the records below it are not replayed.
        let retention = Duration::from_millis(self.offsets_retention_ms);
        let mut expired_offsets = Vec::new();
        groups.retain(|name, group| {
            if group.state != GroupState::Empty || !group.members.is_empty() {
                group.empty = None;
                return true;
            }
            if group.offsets.is_empty() {
                return false;
            }
            let empty = group.empty.get_or_insert(RunningTime::starting(now));
            let expired = !retention.is_zero()
                && empty.elapsed(now) >= retention
                && group.since_commit.elapsed(now) >= retention;
            if expired {
                tracing::info!(
                    group = name,
                    partitions = group.offsets.len(),
                    "offsets expired: no members and no commit within the retention"
                );
                expired_offsets.push((name.clone(), group.offsets.keys().cloned().collect()));
            }
            !expired
        });
        drop(groups);
        if changed {
            self.changed.notify_waiters();
        }
        expired_offsets
    }

    /// ListGroups.
    pub fn list(&self) -> ListGroupsResponse {
        let groups = lock(&self.groups);
        ListGroupsResponse {
            groups: groups
                .iter()
                // Only those coordinated here (another broker lists the rest).
                .filter(|(name, _)| self.check_coordinator(name).is_ok())
                .map(|(name, group)| GroupListing {
                    group: name.clone(),
                    state: group.state.name().to_string(),
                    members: group.members.len() as u32,
                })
                .collect(),
        }
    }

    /// DescribeGroup: members, assignment, offsets and lag.
    pub fn describe(
        &self,
        topics: &Topics,
        request: &DescribeGroupRequest,
    ) -> DescribeGroupResponse {
        let groups = lock(&self.groups);
        let coordinated = self.check_coordinator(&request.group);
        let Some(group) = groups.get(&request.group).filter(|_| coordinated.is_ok()) else {
            return DescribeGroupResponse {
                error: coordinated.err().unwrap_or(ErrorCode::UnknownGroup),
                group: request.group.clone(),
                state: String::new(),
                assignor: String::new(),
                generation: -1,
                members: Vec::new(),
                offsets: Vec::new(),
            };
        };
        // Every partition the group owns or has committed.
        let mut partitions: BTreeSet<(String, u32)> = group.offsets.keys().cloned().collect();
        for member in group.members.values() {
            partitions.extend(member.assignment.iter().cloned());
        }
        let offsets = partitions
            .into_iter()
            .map(|(topic, partition)| {
                let high_watermark = topics
                    .partition(&topic, partition)
                    .map_or(0, |p| p.high_watermark());
                let committed = group
                    .offsets
                    .get(&(topic.clone(), partition))
                    .map(|c| c.offset);
                GroupOffset {
                    lag: high_watermark.saturating_sub(committed.unwrap_or(0)),
                    committed: committed.map_or(-1, |offset| offset as i64),
                    high_watermark,
                    topic,
                    partition,
                }
            })
            .collect();
        DescribeGroupResponse {
            error: ErrorCode::None,
            group: request.group.clone(),
            state: group.state.name().to_string(),
            assignor: group.assignor.clone(),
            generation: group.generation,
            members: group
                .members
                .iter()
                .map(|(id, member)| GroupMemberDescription {
                    member_id: id.clone(),
                    group_instance_id: member.instance_id.clone(),
                    topics: member.topics.clone(),
                    assignment: to_wire(&member.assignment),
                })
                .collect(),
            offsets,
        }
    }

    /// Every group's name (for metrics and the admin API).
    pub fn group_names(&self) -> Vec<String> {
        lock(&self.groups).keys().cloned().collect()
    }
}

fn check_member<'a>(
    groups: &'a BTreeMap<String, Group>,
    group: &str,
    member: &str,
) -> Result<&'a Group, ErrorCode> {
    let group = groups.get(group).ok_or(ErrorCode::UnknownGroup)?;
    if group.fenced.iter().any(|fenced| fenced == member) {
        return Err(ErrorCode::FencedInstanceId);
    }
    if group.members.contains_key(member) {
        Ok(group)
    } else {
        Err(ErrorCode::UnknownMemberId)
    }
}
