//! One group's state: its members, the rebalance round in progress, its
//! generation and assignment, and its committed offsets.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use weir_protocol::ErrorCode;
use weir_protocol::message::*;

use super::{COOPERATIVE_STICKY, assign, assign_sticky};
use crate::topics::Topics;

/// Group states, as ListGroups and DescribeGroup name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupState {
    /// No members (offsets may be committed).
    Empty,
    /// A rebalance round is open: members are (re)joining.
    PreparingRebalance,
    /// Every member has its assignment for the current generation.
    Stable,
}

impl GroupState {
    /// The name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            GroupState::Empty => "Empty",
            GroupState::PreparingRebalance => "PreparingRebalance",
            GroupState::Stable => "Stable",
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct Member {
    pub(super) instance_id: Option<String>,
    pub(super) topics: Vec<String>,
    pub(super) session_timeout: Duration,
    pub(super) rebalance_timeout: Duration,
    pub(super) last_seen: Instant,
    pub(super) assignment: Vec<(String, u32)>,
    /// Cooperative: partitions taken from this member in the current
    /// generation but given to nobody yet; it may still commit them.
    pub(super) revoking: Vec<(String, u32)>,
}

/// A committed offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    /// The next offset to consume.
    pub offset: u64,
    /// The committer's metadata.
    pub metadata: Option<String>,
}

#[derive(Debug)]
pub(super) struct Group {
    pub(super) state: GroupState,
    pub(super) generation: i32,
    pub(super) assignor: String,
    pub(super) leader: String,
    pub(super) members: BTreeMap<String, Member>,
    /// Members that have (re)joined in the open round.
    pub(super) joined: BTreeSet<String>,
    pub(super) round_deadline: Instant,
    /// A round opened on an empty group waits this long for more members.
    pub(super) round_not_before: Instant,
    pub(super) offsets: BTreeMap<(String, u32), Committed>,
    /// Partition counts of the subscribed topics when the assignment was
    /// made: a change (a topic created, grown or deleted) rebalances.
    pub(super) assigned_counts: BTreeMap<String, u32>,
    /// Member ids a static member's restart replaced: their owner is an
    /// older process of the same instance and must stop.
    pub(super) fenced: VecDeque<String>,
    /// Cooperative: the last round withheld partitions that change owner;
    /// the next join opens the round that hands them over.
    pub(super) follow_up: bool,
    /// Time since the last commit (or creation, or load).
    pub(super) since_commit: RunningTime,
    /// Time without members (set by the reaper, cleared on a join).
    pub(super) empty: Option<RunningTime>,
}

/// Replaced static member ids remembered per group.
pub const FENCED_IDS_MAX: usize = 64;

/// Time elapsed in the broker's own running time: the monotonic clock since
/// `since`, plus what a snapshot carried over from earlier runs. Neither
/// downtime nor a wall-clock jump ages it, and a restart does not reset it.
#[derive(Debug, Clone, Copy)]
pub(super) struct RunningTime {
    pub(super) since: Instant,
    pub(super) carried: Duration,
}

impl RunningTime {
    pub(super) fn starting(now: Instant) -> RunningTime {
        RunningTime::carrying(now, Duration::ZERO)
    }

    pub(super) fn carrying(now: Instant, carried: Duration) -> RunningTime {
        RunningTime {
            since: now,
            carried,
        }
    }

    pub(super) fn elapsed(&self, now: Instant) -> Duration {
        self.carried + now.duration_since(self.since)
    }
}

impl Group {
    pub(super) fn new(now: Instant) -> Group {
        Group {
            state: GroupState::Empty,
            generation: 0,
            assignor: String::new(),
            leader: String::new(),
            members: BTreeMap::new(),
            joined: BTreeSet::new(),
            round_deadline: now,
            round_not_before: now,
            offsets: BTreeMap::new(),
            assigned_counts: BTreeMap::new(),
            fenced: VecDeque::new(),
            follow_up: false,
            since_commit: RunningTime::starting(now),
            empty: None,
        }
    }

    /// The partition counts of every topic the members subscribe to.
    pub(super) fn subscribed_counts(&self, topics: &Topics) -> BTreeMap<String, u32> {
        self.members
            .values()
            .flat_map(|member| member.topics.iter())
            .map(|topic| {
                (
                    topic.clone(),
                    topics.get(topic).map_or(0, |t| t.partitions.len() as u32),
                )
            })
            .collect()
    }

    pub(super) fn open_round(&mut self, now: Instant, initial_delay: Duration) {
        let was_empty = self.state == GroupState::Empty;
        self.state = GroupState::PreparingRebalance;
        self.joined.clear();
        let longest = self
            .members
            .values()
            .map(|member| member.rebalance_timeout)
            .max()
            .unwrap_or_default();
        self.round_deadline = now + longest;
        self.round_not_before = if was_empty { now + initial_delay } else { now };
    }

    /// Closes the open round if every member has joined (and an empty
    /// group's first round has waited its delay), or its deadline passed.
    pub(super) fn try_complete(&mut self, now: Instant, topics: &Topics) -> bool {
        if self.state != GroupState::PreparingRebalance {
            return false;
        }
        let all_joined = self
            .members
            .keys()
            .all(|member| self.joined.contains(member));
        if (all_joined && now >= self.round_not_before) || now >= self.round_deadline {
            self.complete(topics);
            true
        } else {
            false
        }
    }

    pub(super) fn complete(&mut self, topics: &Topics) {
        let joined = std::mem::take(&mut self.joined);
        self.members.retain(|member, _| joined.contains(member));
        // Waiting in JoinGroup counted as being alive: the session restarts
        // now, not from when the member sent its join.
        let now = Instant::now();
        for member in self.members.values_mut() {
            member.last_seen = now;
        }
        self.assigned_counts = self.subscribed_counts(topics);
        self.generation = self.generation.wrapping_add(1).max(1);
        let partitions_of =
            |topic: &str| topics.get(topic).map_or(0, |t| t.partitions.len() as u32);
        let subscriptions: Vec<(String, Vec<String>)> = self
            .members
            .iter()
            .map(|(id, member)| (id.clone(), member.topics.clone()))
            .collect();
        if self.assignor == COOPERATIVE_STICKY {
            self.complete_cooperative(&subscriptions, partitions_of);
        } else {
            let assignment = assign(&self.assignor, &subscriptions, partitions_of);
            for (id, member) in &mut self.members {
                member.assignment = assignment.get(id).cloned().unwrap_or_default();
                member.revoking.clear();
            }
        }
        self.leader = self.members.keys().next().cloned().unwrap_or_default();
        self.state = if self.members.is_empty() {
            GroupState::Empty
        } else {
            GroupState::Stable
        };
    }

    /// Cooperative-sticky: the balanced assignment that keeps every
    /// partition it can with its current owner; a partition that must move
    /// is taken from its owner now and given to its new owner only in the
    /// next round, which the old owner joins after it has stopped reading
    /// it. So no partition ever has two readers, and nobody stops reading
    /// what it keeps.
    pub(super) fn complete_cooperative(
        &mut self,
        subscriptions: &[(String, Vec<String>)],
        partitions_of: impl Fn(&str) -> u32,
    ) {
        let current: HashMap<String, Vec<(String, u32)>> = self
            .members
            .iter()
            .map(|(id, member)| (id.clone(), member.assignment.clone()))
            .collect();
        let target = assign_sticky(subscriptions, &current, partitions_of);
        let owner_now: HashMap<(String, u32), String> = current
            .iter()
            .flat_map(|(id, owned)| owned.iter().map(move |p| (p.clone(), id.clone())))
            .collect();
        let mut withheld = false;
        for member in self.members.values_mut() {
            member.revoking.clear();
        }
        let mut revoking: HashMap<String, Vec<(String, u32)>> = HashMap::new();
        for (id, member) in &mut self.members {
            let mut given = Vec::new();
            for partition in target.get(id).cloned().unwrap_or_default() {
                match owner_now.get(&partition) {
                    Some(owner) if owner != id => {
                        revoking.entry(owner.clone()).or_default().push(partition);
                        withheld = true;
                    }
                    _ => given.push(partition),
                }
            }
            member.assignment = given;
        }
        for (id, partitions) in revoking {
            if let Some(member) = self.members.get_mut(&id) {
                member.revoking = partitions;
            }
        }
        // Whatever else a member loses (a topic it no longer reads, a
        // partition that went away) it may still commit in this generation,
        // so its last commit is not refused as a whole.
        for (id, member) in &mut self.members {
            let kept = member.assignment.clone();
            for partition in current.get(id).into_iter().flatten() {
                if !kept.contains(partition) && !member.revoking.contains(partition) {
                    member.revoking.push(partition.clone());
                }
            }
        }
        self.follow_up = withheld;
    }

    /// Drops a member; a group with members left rebalances.
    pub(super) fn remove_member(&mut self, member: &str, now: Instant, initial_delay: Duration) {
        self.members.remove(member);
        self.joined.remove(member);
        if self.members.is_empty() {
            // Fence whatever the last member still had in flight.
            self.generation = self.generation.wrapping_add(1).max(1);
            self.state = GroupState::Empty;
            self.joined.clear();
        } else if self.state == GroupState::Stable {
            self.open_round(now, initial_delay);
        }
    }

    pub(super) fn response_for(&self, member_id: &str) -> JoinGroupResponse {
        match self.members.get(member_id) {
            Some(member) => JoinGroupResponse {
                error: ErrorCode::None,
                generation: self.generation,
                member_id: member_id.to_string(),
                leader: self.leader.clone(),
                assignor: self.assignor.clone(),
                assignment: to_wire(&member.assignment),
            },
            None => join_error(ErrorCode::UnknownMemberId, member_id),
        }
    }
}

pub(super) fn to_wire(partitions: &[(String, u32)]) -> Vec<TopicPartition> {
    partitions
        .iter()
        .map(|(topic, partition)| TopicPartition {
            topic: topic.clone(),
            partition: *partition,
        })
        .collect()
}

pub(super) fn join_error(error: ErrorCode, member_id: &str) -> JoinGroupResponse {
    JoinGroupResponse {
        error,
        generation: -1,
        member_id: member_id.to_string(),
        leader: String::new(),
        assignor: String::new(),
        assignment: Vec::new(),
    }
}
