//! Consumer groups: membership, generations, assignment on the coordinator,
//! and committed offsets kept as records of the internal topic
//! `__consumer_offsets`.
//!
//! One broker coordinates every group (a single node; the cluster will place
//! each group with the leader of its offsets partition). A rebalance is a
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
//! the group's offsets partition and acknowledged once durable; on start the
//! coordinator loads each offsets partition's snapshot (written at clean
//! stops and every retention check) and replays the records after it.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use weir_protocol::message::*;
use weir_protocol::{BatchBuilder, Batches, ErrorCode};

use crate::topics::Topics;

/// The internal topic holding committed offsets.
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";
/// Default segment size of the offsets topic (each partition preallocates
/// one). Snapshots replace the records below them, so a partition keeps
/// about one segment beyond its snapshot.
pub const OFFSETS_SEGMENT_BYTES: u64 = 64 << 20;
/// Default time the offsets of a group are kept once it has no members and
/// no commit: 7 days, Kafka's `offsets.retention.minutes`.
pub const OFFSETS_RETENTION_MS: u64 = 7 * 24 * 3600 * 1000;
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
/// How often expired members are looked for.
pub const REAPER_INTERVAL_MS: u64 = 100;
/// The assignors the coordinator knows.
pub const ASSIGNORS: [&str; 3] = ["range", "roundrobin", COOPERATIVE_STICKY];

/// The assignor that keeps partitions with their owners and moves the rest
/// in two rounds, so members never stop what they keep.
pub const COOPERATIVE_STICKY: &str = "cooperative-sticky";

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
struct Member {
    instance_id: Option<String>,
    topics: Vec<String>,
    session_timeout: Duration,
    rebalance_timeout: Duration,
    last_seen: Instant,
    assignment: Vec<(String, u32)>,
    /// Cooperative: partitions taken from this member in the current
    /// generation but given to nobody yet; it may still commit them.
    revoking: Vec<(String, u32)>,
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
struct Group {
    state: GroupState,
    generation: i32,
    assignor: String,
    leader: String,
    members: BTreeMap<String, Member>,
    /// Members that have (re)joined in the open round.
    joined: BTreeSet<String>,
    round_deadline: Instant,
    /// A round opened on an empty group waits this long for more members.
    round_not_before: Instant,
    offsets: BTreeMap<(String, u32), Committed>,
    /// Partition counts of the subscribed topics when the assignment was
    /// made: a change (a topic created, grown or deleted) rebalances.
    assigned_counts: BTreeMap<String, u32>,
    /// Member ids a static member's restart replaced: their owner is an
    /// older process of the same instance and must stop.
    fenced: VecDeque<String>,
    /// Cooperative: the last round withheld partitions that change owner;
    /// the next join opens the round that hands them over.
    follow_up: bool,
    /// Time since the last commit (or creation, or load).
    since_commit: RunningTime,
    /// Time without members (set by the reaper, cleared on a join).
    empty: Option<RunningTime>,
}

/// Replaced static member ids remembered per group.
pub const FENCED_IDS_MAX: usize = 64;

/// Time elapsed in the broker's own running time: the monotonic clock since
/// `since`, plus what a snapshot carried over from earlier runs. Neither
/// downtime nor a wall-clock jump ages it, and a restart does not reset it.
#[derive(Debug, Clone, Copy)]
struct RunningTime {
    since: Instant,
    carried: Duration,
}

impl RunningTime {
    fn starting(now: Instant) -> RunningTime {
        RunningTime::carrying(now, Duration::ZERO)
    }

    fn carrying(now: Instant, carried: Duration) -> RunningTime {
        RunningTime {
            since: now,
            carried,
        }
    }

    fn elapsed(&self, now: Instant) -> Duration {
        self.carried + now.duration_since(self.since)
    }
}

impl Group {
    fn new(now: Instant) -> Group {
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
    fn subscribed_counts(&self, topics: &Topics) -> BTreeMap<String, u32> {
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

    fn open_round(&mut self, now: Instant, initial_delay: Duration) {
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
    fn try_complete(&mut self, now: Instant, topics: &Topics) -> bool {
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

    fn complete(&mut self, topics: &Topics) {
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
    fn complete_cooperative(
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
    fn remove_member(&mut self, member: &str, now: Instant, initial_delay: Duration) {
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

    fn response_for(&self, member_id: &str) -> JoinGroupResponse {
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

fn to_wire(partitions: &[(String, u32)]) -> Vec<TopicPartition> {
    partitions
        .iter()
        .map(|(topic, partition)| TopicPartition {
            topic: topic.clone(),
            partition: *partition,
        })
        .collect()
}

fn join_error(error: ErrorCode, member_id: &str) -> JoinGroupResponse {
    JoinGroupResponse {
        error,
        generation: -1,
        member_id: member_id.to_string(),
        leader: String::new(),
        assignor: String::new(),
        assignment: Vec::new(),
    }
}

/// Partitions (topic, index) per member id.
pub type Assignment = HashMap<String, Vec<(String, u32)>>;

/// An empty assignment for every member, and the topics anyone subscribes to.
fn assignment_frame(subscriptions: &[(String, Vec<String>)]) -> (Assignment, BTreeSet<&String>) {
    let out = subscriptions
        .iter()
        .map(|(member, _)| (member.clone(), Vec::new()))
        .collect();
    let topics = subscriptions
        .iter()
        .flat_map(|(_, topics)| topics.iter())
        .collect();
    (out, topics)
}

/// The members subscribed to `topic`, in member order.
fn subscribers_of<'a>(subscriptions: &'a [(String, Vec<String>)], topic: &str) -> Vec<&'a String> {
    subscriptions
        .iter()
        .filter(|(_, topics)| topics.iter().any(|t| t == topic))
        .map(|(member, _)| member)
        .collect()
}

/// Assigns the subscribed topics' partitions to members (`subscriptions`
/// sorted by member id). `range`: per topic, contiguous runs, the first
/// members one extra; `roundrobin`: all partitions in (topic, partition)
/// order dealt in turn to the members subscribed to each.
pub fn assign(
    assignor: &str,
    subscriptions: &[(String, Vec<String>)],
    partitions_of: impl Fn(&str) -> u32,
) -> HashMap<String, Vec<(String, u32)>> {
    let (mut out, topics) = assignment_frame(subscriptions);
    match assignor {
        "roundrobin" => {
            let mut turn = 0usize;
            for topic in topics {
                let subscribers = subscribers_of(subscriptions, topic);
                for partition in 0..partitions_of(topic) {
                    // Deal across all members, skipping those not subscribed.
                    let member = loop {
                        let candidate = &subscriptions[turn % subscriptions.len()].0;
                        turn += 1;
                        if subscribers.contains(&candidate) {
                            break candidate;
                        }
                    };
                    if let Some(owned) = out.get_mut(member) {
                        owned.push((topic.clone(), partition));
                    }
                }
            }
        }
        _ => {
            for topic in topics {
                let subscribers = subscribers_of(subscriptions, topic);
                let count = partitions_of(topic);
                let per_member = count / subscribers.len() as u32;
                let extra = count % subscribers.len() as u32;
                let mut next = 0;
                for (index, member) in subscribers.iter().enumerate() {
                    let take = per_member + u32::from((index as u32) < extra);
                    if let Some(owned) = out.get_mut(*member) {
                        owned.extend((next..next + take).map(|p| (topic.clone(), p)));
                    }
                    next += take;
                }
            }
        }
    }
    out
}

/// A balanced assignment (per topic, as even as `range`) that keeps each
/// partition with its current owner where the balance allows.
pub fn assign_sticky(
    subscriptions: &[(String, Vec<String>)],
    current: &HashMap<String, Vec<(String, u32)>>,
    partitions_of: impl Fn(&str) -> u32,
) -> HashMap<String, Vec<(String, u32)>> {
    let (mut out, topics) = assignment_frame(subscriptions);
    for topic in topics {
        let count = partitions_of(topic);
        let mut subscribers = subscribers_of(subscriptions, topic);
        let owned_here = |member: &String| {
            current.get(member).map_or(0, |owned| {
                owned
                    .iter()
                    .filter(|(t, p)| t == topic && *p < count)
                    .count()
            })
        };
        // The members owning most keep the one-extra quotas: fewer moves.
        subscribers.sort_by_cached_key(|member| {
            (std::cmp::Reverse(owned_here(member)), (*member).clone())
        });
        let base = count / subscribers.len() as u32;
        let extra = count % subscribers.len() as u32;
        let quota: HashMap<&String, u32> = subscribers
            .iter()
            .enumerate()
            .map(|(index, member)| (*member, base + u32::from((index as u32) < extra)))
            .collect();
        let mut taken = BTreeSet::new();
        for member in &subscribers {
            let mut kept = 0;
            for (t, partition) in current.get(*member).into_iter().flatten() {
                if t == topic
                    && *partition < count
                    && kept < quota[member]
                    && taken.insert(*partition)
                {
                    out.entry((*member).clone())
                        .or_default()
                        .push((topic.clone(), *partition));
                    kept += 1;
                }
            }
        }
        let mut free = (0..count).filter(|partition| !taken.contains(partition));
        for member in &subscribers {
            let have = out.get(*member).map_or(0, |owned| {
                owned.iter().filter(|(t, _)| t == topic).count() as u32
            });
            for _ in have..quota[member] {
                if let Some(partition) = free.next() {
                    out.entry((*member).clone())
                        .or_default()
                        .push((topic.clone(), partition));
                }
            }
        }
    }
    out
}

/// Java's `String.hashCode`, so groups land on the offsets partition
/// Kafka would put them on.
fn java_hash(text: &str) -> i32 {
    text.encode_utf16().fold(0i32, |hash, unit| {
        hash.wrapping_mul(31).wrapping_add(i32::from(unit))
    })
}

/// The offsets partition of a group.
pub fn offsets_partition(group: &str, partitions: u32) -> u32 {
    // Kafka's Utils.abs: i32::MIN maps to 0.
    let hash = java_hash(group);
    let positive = if hash == i32::MIN {
        0
    } else {
        hash.unsigned_abs()
    };
    positive % partitions.max(1)
}

const GROUPS_SNAPSHOT_FILE: &str = "groups-snapshot.json";

/// The committed offsets of one offsets partition's groups as of `offset`.
#[derive(Debug, Serialize, Deserialize)]
struct GroupsSnapshot {
    offset: u64,
    groups: BTreeMap<String, Vec<(String, u32, Committed)>>,
    /// How long ago each group last committed, in the broker's running
    /// time, ms (absent: as if at load).
    #[serde(default)]
    commit_age_ms: BTreeMap<String, u64>,
    /// How long each group without members had been empty, ms.
    #[serde(default)]
    empty_for_ms: BTreeMap<String, u64>,
}

impl GroupsSnapshot {
    /// Writes the snapshot atomically and durably. Segments below it are
    /// deleted afterwards, so it must never be written wrong: an encoding
    /// failure is an error, not an empty file.
    fn save(&self, dir: &std::path::Path) -> Result<(), String> {
        let text = serde_json::to_vec(self).map_err(|error| error.to_string())?;
        weir_storage::checkpoint::write_atomic(dir, GROUPS_SNAPSHOT_FILE, &text)
            .map_err(|error| error.to_string())
    }

    /// The snapshot, `Ok(None)` if there is none, `Err` if it is unreadable.
    fn load(dir: &std::path::Path) -> Result<Option<GroupsSnapshot>, String> {
        let path = dir.join(GROUPS_SNAPSHOT_FILE);
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(format!("{}: {error}", path.display())),
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|error| format!("{}: {error}", path.display()))
    }
}

/// The key of an offset record (JSON: readable with any consumer).
#[derive(Debug, Serialize, Deserialize)]
struct OffsetKey {
    group: String,
    topic: String,
    partition: u32,
}

/// Groups of this broker.
#[derive(Debug)]
pub struct Coordinator {
    groups: Mutex<BTreeMap<String, Group>>,
    changed: Notify,
    /// One per offsets partition: a commit holds it from append to apply,
    /// so the log's order and the table's agree.
    commit_locks: Vec<tokio::sync::Mutex<()>>,
    offsets_partitions: u32,
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
            offsets_partitions: offsets_partitions.max(1),
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

    /// Rebuilds committed offsets from the offsets topic, if it exists:
    /// each partition's snapshot, then the records after it.
    ///
    /// # Errors
    /// A partition whose records below its start were deleted (replaced by
    /// its snapshot) but whose snapshot is missing or unreadable: starting
    /// anyway would silently forget the groups it held.
    pub fn load(&self, topics: &Topics) -> Result<(), String> {
        let Some(topic) = topics.get(OFFSETS_TOPIC) else {
            return Ok(());
        };
        let now = Instant::now();
        let mut groups = lock(&self.groups);
        let mut records = 0u64;
        for partition in &topic.partitions {
            let log = &partition.log;
            let mut from = log.start_offset();
            let end = log.end_offset();
            let index = partition.index;
            let snapshot = match GroupsSnapshot::load(log.dir()) {
                Ok(snapshot) => snapshot,
                Err(error) if from == 0 => {
                    tracing::warn!(partition = index, %error, "unreadable group snapshot; replaying the whole log");
                    None
                }
                Err(error) => {
                    return Err(format!(
                        "{OFFSETS_TOPIC} partition {index}: group snapshot unreadable: {error}"
                    ));
                }
            };
            match &snapshot {
                None if from > 0 => {
                    return Err(format!(
                        "{OFFSETS_TOPIC} partition {index} starts at {from} but has no group \
                         snapshot to stand for the records before it"
                    ));
                }
                Some(snapshot) if snapshot.offset < from => {
                    return Err(format!(
                        "{OFFSETS_TOPIC} partition {index} starts at {from}, after its group \
                         snapshot ({}): the records between are gone",
                        snapshot.offset
                    ));
                }
                _ => {}
            }
            if let Some(mut snapshot) = snapshot {
                if snapshot.offset > end {
                    // Snapshots follow a flush, so the log lost records it
                    // had on disk (a damaged tail cut at recovery): the
                    // snapshot still knows their commits.
                    tracing::warn!(
                        partition = index,
                        snapshot = snapshot.offset,
                        end,
                        "offsets log ends before its snapshot; using the snapshot"
                    );
                    // New commits will land below the snapshot's offset: it
                    // must say where its content really ends, or the next
                    // start would skip them.
                    snapshot.offset = end;
                    snapshot
                        .save(log.dir())
                        .map_err(|error| format!("{OFFSETS_TOPIC} partition {index}: {error}"))?;
                }
                for (name, offsets) in snapshot.groups {
                    let commit_age_ms = snapshot.commit_age_ms.get(&name).copied();
                    let empty_for_ms = snapshot.empty_for_ms.get(&name).copied();
                    let group = groups.entry(name).or_insert_with(|| Group::new(now));
                    // The running time it had already been idle counts
                    // (downtime does not): restarts neither keep abandoned
                    // groups for ever nor age live ones.
                    group.since_commit = RunningTime::carrying(
                        now,
                        Duration::from_millis(commit_age_ms.unwrap_or(0)),
                    );
                    group.empty = empty_for_ms
                        .map(|ms| RunningTime::carrying(now, Duration::from_millis(ms)));
                    for (topic, partition, committed) in offsets {
                        group.offsets.insert((topic, partition), committed);
                    }
                }
                from = from.max(snapshot.offset);
            }
            // Every record below the end is replayed or the start fails: a
            // record skipped here would be left out of the next snapshot and
            // then deleted, moving its offset back for good.
            let unreadable = |at: u64, what: &dyn std::fmt::Display| -> String {
                format!("{OFFSETS_TOPIC} partition {index}: offset {at} unreadable: {what}")
            };
            while from < end {
                let read = log
                    .read(from, 4 << 20)
                    .map_err(|error| unreadable(from, &error))?;
                if read.is_empty() {
                    return Err(unreadable(from, &"nothing to read below the end"));
                }
                for chunk in read.chunks() {
                    for batch in Batches::new(chunk, false) {
                        let batch = batch.map_err(|error| unreadable(from, &error))?;
                        let batch_records =
                            batch.records().map_err(|error| unreadable(from, &error))?;
                        for record in batch_records {
                            let record = record.map_err(|error| unreadable(from, &error))?;
                            if record.offset < from {
                                continue;
                            }
                            records += 1;
                            apply_record(&mut groups, now, record.key, record.value);
                        }
                    }
                }
                from = from.max(read.next_offset());
            }
        }
        tracing::info!(
            groups = groups.len(),
            records,
            "consumer group offsets recovered"
        );
        Ok(())
    }

    /// Writes each offsets partition's snapshot (the offsets of the groups
    /// it holds, as of its end), so the next start replays only what
    /// follows. Blocking (takes the commit locks, writes files): call it off
    /// the runtime.
    pub fn save_snapshots(&self, topics: &Topics) {
        let Some(topic) = topics.get(OFFSETS_TOPIC) else {
            return;
        };
        let count = topic.partitions.len() as u32;
        for partition in &topic.partitions {
            // Holding the partition's commit lock: no commit is between its
            // append and its apply, so the end offset and the table agree.
            let _ordered = self.commit_locks[partition.index as usize % self.commit_locks.len()]
                .blocking_lock();
            // Only durable commits may be covered (a crash must not leave
            // the log below the snapshot).
            if let Err(error) = partition.log.flush() {
                tracing::warn!(partition = partition.index, %error, "offsets flush failed; no snapshot");
                continue;
            }
            let offset = partition.log.end_offset();
            let mut groups = BTreeMap::new();
            let mut commit_age_ms = BTreeMap::new();
            let mut empty_for_ms = BTreeMap::new();
            let now = Instant::now();
            let millis = |age: Duration| u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
            for (name, group) in lock(&self.groups).iter().filter(|(name, group)| {
                !group.offsets.is_empty() && offsets_partition(name, count) == partition.index
            }) {
                groups.insert(
                    name.clone(),
                    group
                        .offsets
                        .iter()
                        .map(|((topic, index), committed)| {
                            (topic.clone(), *index, committed.clone())
                        })
                        .collect(),
                );
                commit_age_ms.insert(name.clone(), millis(group.since_commit.elapsed(now)));
                if let Some(empty) = group.empty {
                    empty_for_ms.insert(name.clone(), millis(empty.elapsed(now)));
                }
            }
            let snapshot = GroupsSnapshot {
                offset,
                groups,
                commit_age_ms,
                empty_for_ms,
            };
            if let Err(error) = snapshot.save(partition.log.dir()) {
                tracing::warn!(partition = partition.index, %error, "group snapshot failed");
                continue;
            }
            // The snapshot (durable) now stands for every record below its
            // offset: whole segments of them can go, which keeps the
            // offsets log from growing with every commit for ever.
            match partition.log.delete_segments_before(offset) {
                Ok(outcome) if outcome.segments_deleted > 0 => tracing::info!(
                    partition = partition.index,
                    segments = outcome.segments_deleted,
                    bytes = outcome.bytes_deleted,
                    "offsets log compacted below its snapshot"
                ),
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(partition = partition.index, %error, "offsets log compaction failed")
                }
            }
        }
    }

    async fn offsets_topic(
        &self,
        topics: &Topics,
    ) -> Result<std::sync::Arc<crate::topics::Topic>, ErrorCode> {
        if let Some(topic) = topics.get(OFFSETS_TOPIC) {
            return Ok(topic);
        }
        // No retention: the records (and snapshots) are the groups' memory.
        let configs = BTreeMap::from([
            (
                "segment.bytes".to_string(),
                self.offsets_segment_bytes.to_string(),
            ),
            ("retention.ms".to_string(), "-1".to_string()),
            ("retention.bytes".to_string(), "-1".to_string()),
        ]);
        match topics
            .create(OFFSETS_TOPIC, self.offsets_partitions, configs)
            .await
        {
            Ok(()) => {}
            Err(error) if error.code() == ErrorCode::TopicAlreadyExists => {}
            Err(error) => return Err(error.code()),
        }
        topics.get(OFFSETS_TOPIC).ok_or(ErrorCode::Unknown)
    }

    /// JoinGroup: waits until the round this member joins completes.
    pub async fn join(&self, topics: &Topics, request: JoinGroupRequest) -> JoinGroupResponse {
        if !valid_name(&request.group)
            || request.member_id.len() > GROUP_NAME_BYTES_MAX
            || request
                .group_instance_id
                .as_ref()
                .is_some_and(|id| !valid_name(id))
            || request.topics.len() > crate::handlers::TOPICS_PER_REQUEST_MAX
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
        let error = match check_member(&groups, &request.group, &request.member_id) {
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
    /// up. Called every [`REAPER_INTERVAL_MS`].
    pub fn reap(&self, topics: &Topics) {
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
            }
            !expired
        });
        drop(groups);
        if changed {
            self.changed.notify_waiters();
        }
    }

    /// OffsetCommit: all offsets or none, durable before the answer.
    pub async fn commit(
        &self,
        topics: &Topics,
        request: OffsetCommitRequest,
    ) -> OffsetCommitResponse {
        let refuse = |error: ErrorCode, request: &OffsetCommitRequest| OffsetCommitResponse {
            error,
            partitions: request
                .offsets
                .iter()
                .map(|offset| OffsetCommitPartitionResponse {
                    topic: offset.topic.clone(),
                    partition: offset.partition,
                    error,
                })
                .collect(),
        };
        if !valid_name(&request.group)
            || request.offsets.len() > COMMIT_OFFSETS_MAX
            || request.offsets.iter().any(|offset| {
                offset
                    .metadata
                    .as_ref()
                    .is_some_and(|metadata| metadata.len() > COMMIT_METADATA_BYTES_MAX)
            })
        {
            return refuse(ErrorCode::InvalidRequest, &request);
        }
        if request.offsets.is_empty() {
            return OffsetCommitResponse {
                error: ErrorCode::None,
                partitions: Vec::new(),
            };
        }
        if request
            .offsets
            .iter()
            .any(|offset| topics.partition(&offset.topic, offset.partition).is_none())
        {
            return refuse(ErrorCode::UnknownTopicOrPartition, &request);
        }
        if let Err(error) = self.check_committer(&request) {
            return refuse(error, &request);
        }
        let offsets_topic = match self.offsets_topic(topics).await {
            Ok(topic) => topic,
            Err(error) => return refuse(error, &request),
        };
        let index = offsets_partition(&request.group, offsets_topic.partitions.len() as u32);
        let Some(partition) = offsets_topic.partitions.get(index as usize).cloned() else {
            return refuse(ErrorCode::Unknown, &request);
        };
        let _ordered = self.commit_locks[index as usize % self.commit_locks.len()]
            .lock()
            .await;
        // Checked again under the commit lock: a rebalance may have begun.
        if let Err(error) = self.check_committer(&request) {
            return refuse(error, &request);
        }
        // A commit under way keeps its group from expiring meanwhile (the
        // apply below would otherwise bring back only these partitions).
        if let Some(group) = lock(&self.groups).get_mut(&request.group) {
            group.since_commit = RunningTime::starting(Instant::now());
        }
        let batch = offsets_batch(&request);
        let outcome = match partition.submit(batch) {
            Ok(pending) => pending.wait().await.map(|_| ()),
            Err(error) => Err(error),
        };
        if let Err(error) = outcome {
            return refuse(error, &request);
        }
        {
            let mut groups = lock(&self.groups);
            let group = groups
                .entry(request.group.clone())
                .or_insert_with(|| Group::new(Instant::now()));
            group.since_commit = RunningTime::starting(Instant::now());
            for offset in &request.offsets {
                group.offsets.insert(
                    (offset.topic.clone(), offset.partition),
                    Committed {
                        offset: offset.offset,
                        metadata: offset.metadata.clone(),
                    },
                );
            }
        }
        OffsetCommitResponse {
            error: ErrorCode::None,
            partitions: request
                .offsets
                .iter()
                .map(|offset| OffsetCommitPartitionResponse {
                    topic: offset.topic.clone(),
                    partition: offset.partition,
                    error: ErrorCode::None,
                })
                .collect(),
        }
    }

    /// Whether `request`'s committer may commit these offsets now.
    fn check_committer(&self, request: &OffsetCommitRequest) -> Result<(), ErrorCode> {
        let groups = lock(&self.groups);
        if request.generation < 0 && request.member_id.is_empty() {
            // An admin (or a consumer without a group membership): only
            // while nobody consumes the group.
            return match groups.get(&request.group) {
                Some(group) if !group.members.is_empty() => Err(ErrorCode::GroupNotEmpty),
                _ => {
                    if !groups.contains_key(&request.group) && groups.len() >= GROUPS_MAX {
                        Err(ErrorCode::InvalidRequest)
                    } else {
                        Ok(())
                    }
                }
            };
        }
        let group = check_member(&groups, &request.group, &request.member_id)?;
        if group.generation != request.generation {
            return Err(ErrorCode::IllegalGeneration);
        }
        let member = group
            .members
            .get(&request.member_id)
            .ok_or(ErrorCode::UnknownMemberId)?;
        if request.offsets.iter().any(|offset| {
            !member
                .assignment
                .iter()
                .chain(member.revoking.iter())
                .any(|(topic, partition)| *topic == offset.topic && *partition == offset.partition)
        }) {
            return Err(ErrorCode::PartitionNotAssigned);
        }
        Ok(())
    }

    /// OffsetFetch: the committed offsets asked for (or all of the group).
    pub fn fetch(&self, request: &OffsetFetchRequest) -> OffsetFetchResponse {
        let groups = lock(&self.groups);
        let group = groups.get(&request.group);
        let offsets = match &request.partitions {
            Some(wanted) => wanted
                .iter()
                .map(|wanted| {
                    let committed = group.and_then(|group| {
                        group.offsets.get(&(wanted.topic.clone(), wanted.partition))
                    });
                    OffsetFetchPartition {
                        topic: wanted.topic.clone(),
                        partition: wanted.partition,
                        offset: committed.map_or(-1, |c| c.offset as i64),
                        metadata: committed.and_then(|c| c.metadata.clone()),
                    }
                })
                .collect(),
            None => group
                .map(|group| {
                    group
                        .offsets
                        .iter()
                        .map(|((topic, partition), committed)| OffsetFetchPartition {
                            topic: topic.clone(),
                            partition: *partition,
                            offset: committed.offset as i64,
                            metadata: committed.metadata.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        };
        OffsetFetchResponse {
            error: ErrorCode::None,
            offsets,
        }
    }

    /// ListGroups.
    pub fn list(&self) -> ListGroupsResponse {
        let groups = lock(&self.groups);
        ListGroupsResponse {
            groups: groups
                .iter()
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
        let Some(group) = groups.get(&request.group) else {
            return DescribeGroupResponse {
                error: ErrorCode::UnknownGroup,
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

/// The wall clock, ms since the epoch (record timestamps).
fn wall_clock_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

/// One batch with a record per committed offset.
fn offsets_batch(request: &OffsetCommitRequest) -> Bytes {
    let now_ms = wall_clock_ms();
    let mut builder = BatchBuilder::new(now_ms);
    for offset in &request.offsets {
        let key = serde_json::to_vec(&OffsetKey {
            group: request.group.clone(),
            topic: offset.topic.clone(),
            partition: offset.partition,
        })
        .unwrap_or_default();
        let value = serde_json::to_vec(&Committed {
            offset: offset.offset,
            metadata: offset.metadata.clone(),
        })
        .unwrap_or_default();
        builder.push(now_ms, Some(&key), Some(&value), &[]);
    }
    Bytes::from(builder.finish())
}

fn apply_record(
    groups: &mut BTreeMap<String, Group>,
    now: Instant,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
) {
    let Some(Ok(key)) = key.map(serde_json::from_slice::<OffsetKey>) else {
        return;
    };
    let group = groups.entry(key.group).or_insert_with(|| Group::new(now));
    // Replayed commits count as made at load (their wall-clock age would
    // count downtime): expiry waits a whole retention from here.
    group.since_commit = RunningTime::starting(now);
    match value.map(serde_json::from_slice::<Committed>) {
        Some(Ok(committed)) => {
            group.offsets.insert((key.topic, key.partition), committed);
        }
        // A tombstone (or an unreadable value): no offset.
        _ => {
            group.offsets.remove(&(key.topic, key.partition));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(count: usize, topics: &[&str]) -> Vec<(String, Vec<String>)> {
        (0..count)
            .map(|index| {
                (
                    format!("m{index}"),
                    topics.iter().map(|topic| topic.to_string()).collect(),
                )
            })
            .collect()
    }

    /// Both assignors hand out every partition exactly once, evenly, only
    /// to subscribers.
    #[test]
    fn assignors_cover_every_partition_once() {
        for assignor in ["range", "roundrobin"] {
            let subscriptions = members(3, &["a", "b"]);
            let assignment = assign(
                assignor,
                &subscriptions,
                |topic| {
                    if topic == "a" { 12 } else { 5 }
                },
            );
            let mut all: Vec<(String, u32)> = assignment.values().flatten().cloned().collect();
            all.sort();
            let mut expected: Vec<(String, u32)> = (0..12)
                .map(|p| ("a".to_string(), p))
                .chain((0..5).map(|p| ("b".to_string(), p)))
                .collect();
            expected.sort();
            assert_eq!(all, expected, "{assignor}");
            let sizes: Vec<usize> = assignment.values().map(Vec::len).collect();
            assert!(
                sizes.iter().max().unwrap_or(&0) - sizes.iter().min().unwrap_or(&0) <= 2,
                "{assignor}: {sizes:?}"
            );
        }
        let mixed = vec![
            ("m0".to_string(), vec!["a".to_string()]),
            ("m1".to_string(), vec!["b".to_string()]),
        ];
        for assignor in ["range", "roundrobin"] {
            let assignment = assign(assignor, &mixed, |_| 4);
            assert!(assignment["m0"].iter().all(|(topic, _)| topic == "a"));
            assert!(assignment["m1"].iter().all(|(topic, _)| topic == "b"));
            assert_eq!(assignment["m0"].len(), 4);
        }
    }

    /// The sticky assignor balances like range and moves as little as it
    /// can: a third member takes a third, the others keep the rest.
    #[test]
    fn sticky_keeps_what_it_can() {
        let two = members(2, &["t"]);
        let first = assign_sticky(&two, &HashMap::new(), |_| 12);
        assert_eq!(first["m0"].len() + first["m1"].len(), 12);
        let three = members(3, &["t"]);
        let second = assign_sticky(&three, &first, |_| 12);
        for member in ["m0", "m1"] {
            assert_eq!(second[member].len(), 4);
            assert!(
                second[member].iter().all(|p| first[member].contains(p)),
                "{member} keeps only what it had"
            );
        }
        assert_eq!(second["m2"].len(), 4);
        let mut all: Vec<(String, u32)> = second.values().flatten().cloned().collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 12, "every partition once");
        // Mixed subscriptions, and a topic that shrank: only subscribers,
        // nothing beyond the count, every partition once.
        let mixed = vec![
            ("m0".to_string(), vec!["a".to_string(), "b".to_string()]),
            ("m1".to_string(), vec!["b".to_string()]),
        ];
        let before: HashMap<String, Vec<(String, u32)>> = HashMap::from([
            (
                "m0".to_string(),
                vec![("a".to_string(), 5), ("b".to_string(), 0)],
            ),
            (
                "m1".to_string(),
                vec![("b".to_string(), 1), ("b".to_string(), 7)],
            ),
        ]);
        let after = assign_sticky(&mixed, &before, |topic| if topic == "a" { 3 } else { 4 });
        assert!(after["m1"].iter().all(|(topic, _)| topic == "b"));
        let mut all: Vec<(String, u32)> = after.values().flatten().cloned().collect();
        all.sort();
        let expected: Vec<(String, u32)> = (0..3)
            .map(|p| ("a".to_string(), p))
            .chain((0..4).map(|p| ("b".to_string(), p)))
            .collect();
        assert_eq!(all, expected);
        assert!(after["m1"].contains(&("b".to_string(), 1)), "kept");
    }

    /// Groups map to offsets partitions as Kafka maps them
    /// (`abs(hashCode) % n`).
    #[test]
    fn offsets_partition_follows_java_hash() {
        assert_eq!(java_hash("group"), 98_629_247);
        assert_eq!(offsets_partition("group", 50), 98_629_247 % 50);
        assert_eq!(java_hash(""), 0);
    }
}
