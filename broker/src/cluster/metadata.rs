//! The cluster's metadata image and the controller's rules for changing it.
//!
//! The image is what the controller quorum agrees on: registered brokers
//! (and which are fenced), topics with each partition's replicas, leader,
//! leader epoch and in-sync set, and the next block of producer ids. It
//! changes only by [`MetadataImage::apply`]ing a [`MetadataCommand`], a
//! pure, deterministic function: every voter applies the same commands in
//! the same order (the Raft log) and holds the same image, and a test can
//! drive the rules without a network.
//!
//! The rules that keep acknowledged data:
//! - a leader is chosen only from the in-sync set, among unfenced brokers
//!   (unless unclean election is allowed), and every leader change bumps the
//!   leader epoch;
//! - the in-sync set changes only by the current leader's proposal naming
//!   the leader epoch and partition epoch it saw (`AlterPartition`), or by
//!   the controller removing a fenced broker; a proposal from a deposed
//!   leader, or one based on a stale set, is refused;
//! - a broker joins an in-sync set only while unfenced;
//! - the in-sync set never becomes empty: a partition whose last in-sync
//!   broker is fenced keeps it (and has no leader) until it returns.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A broker's id (`node_id`).
pub type BrokerId = u32;

/// Most partitions one topic may have (as the single-node registry).
pub const TOPIC_PARTITIONS_MAX: u32 = crate::topics::TOPIC_PARTITIONS_MAX;
/// Largest replication factor accepted.
pub const REPLICATION_FACTOR_MAX: u16 = 7;
/// Producer ids handed to a broker per allocation.
pub const PRODUCER_ID_BLOCK: i64 = 1000;

/// One partition as the controller sees it.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct PartitionState {
    /// Brokers holding a copy, the preferred leader first.
    pub replicas: Vec<BrokerId>,
    /// Replicas known to hold every record below the high watermark.
    pub isr: Vec<BrokerId>,
    /// The leader; `None` while no in-sync replica is available.
    pub leader: Option<BrokerId>,
    /// Bumped on every leader change (including to and from none).
    pub leader_epoch: i32,
    /// Bumped on every change of this partition (leader or in-sync set), so
    /// a proposal based on an older state is recognised.
    pub partition_epoch: i32,
}

impl PartitionState {
    /// Whether `broker` is in the in-sync set.
    pub fn in_sync(&self, broker: BrokerId) -> bool {
        self.isr.contains(&broker)
    }
}

/// A registered broker.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct BrokerRegistration {
    /// Its id.
    pub id: BrokerId,
    /// Where clients and other brokers reach it.
    pub host: String,
    /// Port of `host`.
    pub port: u16,
    /// Failure domain, for spreading replicas.
    pub rack: Option<String>,
    /// Differs on every start of the broker process.
    pub incarnation: u64,
    /// A fenced broker leads nothing and joins no in-sync set.
    pub fenced: bool,
}

/// A topic in the image.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct TopicImage {
    /// The topic's id: a topic deleted and created again under its name
    /// gets a new one, so a broker that missed both drops the old data
    /// instead of taking it for the new topic's.
    #[serde(default)]
    pub id: u64,
    /// Partitions by index.
    pub partitions: Vec<PartitionState>,
    /// Topic configs.
    pub configs: BTreeMap<String, String>,
    /// Partitions being moved, with the replicas they move to. Meanwhile
    /// the partition's replicas are the old ones followed by the new: the
    /// new catch up (and join the in-sync set) before the old are dropped.
    #[serde(default)]
    pub reassigning: BTreeMap<u32, Vec<BrokerId>>,
}

/// A change to the metadata, as proposed to the controller quorum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetadataCommand {
    /// A broker (re)starts: recorded fenced until it catches up and asks
    /// to be unfenced.
    RegisterBroker {
        /// The broker.
        id: BrokerId,
        /// Advertised host.
        host: String,
        /// Advertised port.
        port: u16,
        /// Rack, if any.
        rack: Option<String>,
        /// This start of it.
        incarnation: u64,
    },
    /// The broker's session expired (or it is shutting down): it leads
    /// nothing and leaves every in-sync set it can leave.
    FenceBroker {
        /// The broker.
        id: BrokerId,
    },
    /// A registered broker heartbeats again: it may lead and be in sync.
    UnfenceBroker {
        /// The broker.
        id: BrokerId,
        /// Must match its registration.
        incarnation: u64,
    },
    /// Creates a topic, placing replicas over the unfenced brokers.
    CreateTopic {
        /// Name.
        name: String,
        /// Partition count.
        partitions: u32,
        /// Copies of each partition.
        replication_factor: u16,
        /// Topic configs.
        configs: BTreeMap<String, String>,
    },
    /// Adopts a topic one broker holds from before it was in a cluster:
    /// that broker is its only replica, and each partition's leader epoch
    /// starts above what its log holds.
    ImportTopic {
        /// Name.
        name: String,
        /// The broker holding it.
        broker: BrokerId,
        /// Per partition, the first leader epoch to use.
        leader_epochs: Vec<i32>,
        /// Topic configs.
        configs: BTreeMap<String, String>,
    },
    /// Deletes a topic.
    DeleteTopic {
        /// Name.
        name: String,
    },
    /// A leader proposes a new in-sync set.
    AlterPartition {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// The proposer, which must be the leader.
        leader: BrokerId,
        /// The leader epoch it leads in.
        leader_epoch: i32,
        /// The partition epoch its proposal is based on.
        partition_epoch: i32,
        /// The proposed in-sync set.
        isr: Vec<BrokerId>,
    },
    /// Moves leadership back to preferred replicas that are in sync.
    ElectPreferredLeaders,
    /// Starts moving a partition to `replicas` (preferred leader first):
    /// they are added to its replicas, to catch up.
    ReassignPartition {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// The brokers it is to live on.
        replicas: Vec<BrokerId>,
    },
    /// Finishes a move whose new replicas are all in sync: the replicas
    /// become the new set, the old leave, and leadership moves into the new
    /// set if it was outside it.
    CompleteReassignment {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
    },
    /// Hands a block of producer ids to a broker.
    AllocateProducerIds {
        /// The broker asking.
        broker: BrokerId,
        /// The block starts at or above this (ids a broker handed out
        /// before it was in a cluster are never handed out again).
        at_least: i64,
    },
}

/// What an applied command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetadataOutcome {
    /// Done; nothing to report.
    Done,
    /// The partition's state after an `AlterPartition`.
    Partition(PartitionState),
    /// The first id of an allocated block of [`PRODUCER_ID_BLOCK`] ids.
    ProducerIds(i64),
}

/// Why a command was refused. Refusals change nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MetadataError {
    /// No such topic or partition.
    #[error("unknown topic or partition")]
    UnknownTopicOrPartition,
    /// The topic exists.
    #[error("topic already exists")]
    TopicAlreadyExists,
    /// Bad partition count or replication factor, or too few brokers.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// No such broker, or a stale incarnation.
    #[error("unknown broker or stale incarnation")]
    UnknownBroker,
    /// A registration older than the one recorded.
    #[error("a newer incarnation of this broker is registered")]
    StaleIncarnation,
    /// The proposer is not the leader of that epoch.
    #[error("not the leader of that epoch")]
    FencedLeaderEpoch,
    /// The proposal is based on an older partition state.
    #[error("stale partition epoch")]
    StalePartitionEpoch,
    /// The proposed in-sync set is not allowed (a fenced broker, a
    /// non-replica, or without the leader).
    #[error("invalid in-sync set")]
    InvalidIsr,
}

/// The metadata image.
#[derive(
    Debug,
    Clone,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct MetadataImage {
    /// Registered brokers by id.
    pub brokers: BTreeMap<BrokerId, BrokerRegistration>,
    /// Topics by name.
    pub topics: BTreeMap<String, TopicImage>,
    /// First producer id of the next block.
    pub next_producer_id: i64,
    /// Allow electing a replica outside the in-sync set when none in it is
    /// available (loses acknowledged records; off by default).
    pub unclean_leader_election: bool,
    /// The id the next topic gets (ids start at 1).
    #[serde(default)]
    pub next_topic_id: u64,
    /// Ids of deleted topics: a broker deletes local data only of a topic
    /// the cluster deleted, never merely because the image lacks it (an
    /// image that lost its history must not wipe the brokers).
    #[serde(default)]
    pub deleted_topic_ids: std::collections::BTreeSet<u64>,
}

impl MetadataImage {
    /// An empty image.
    pub fn new(unclean_leader_election: bool) -> MetadataImage {
        MetadataImage {
            unclean_leader_election,
            ..MetadataImage::default()
        }
    }

    /// A synthetic image: `brokers` registered and live brokers, and
    /// `partitions` partitions of replication factor min(3, brokers) in
    /// topics of 100 (`topic-0`, `topic-1`, …). For tests and benchmarks of
    /// what a large cluster's metadata costs.
    ///
    /// # Errors
    /// None in practice: the commands are valid by construction.
    pub fn synthetic(brokers: u32, partitions: u32) -> Result<MetadataImage, MetadataError> {
        let mut image = MetadataImage::new(false);
        for id in 1..=brokers {
            image.apply(&MetadataCommand::RegisterBroker {
                id,
                host: "127.0.0.1".into(),
                port: 9000u16.saturating_add(u16::try_from(id).unwrap_or(u16::MAX)),
                rack: None,
                incarnation: 1,
            })?;
            image.apply(&MetadataCommand::UnfenceBroker { id, incarnation: 1 })?;
        }
        for topic in 0..partitions.div_ceil(100) {
            image.apply(&MetadataCommand::CreateTopic {
                name: format!("topic-{topic}"),
                partitions: 100.min(partitions - topic * 100),
                replication_factor: u16::try_from(brokers.min(3)).unwrap_or(3),
                configs: BTreeMap::new(),
            })?;
        }
        Ok(image)
    }

    fn take_topic_id(&mut self) -> u64 {
        self.next_topic_id = self.next_topic_id.max(1);
        let id = self.next_topic_id;
        self.next_topic_id += 1;
        id
    }

    /// A partition's state.
    pub fn partition(&self, topic: &str, partition: u32) -> Option<&PartitionState> {
        self.topics.get(topic)?.partitions.get(partition as usize)
    }

    /// Whether `broker` is registered and not fenced.
    pub fn is_live(&self, broker: BrokerId) -> bool {
        self.brokers.get(&broker).is_some_and(|b| !b.fenced)
    }

    /// Applies one command.
    ///
    /// # Errors
    /// A [`MetadataError`] when the command is refused; the image is then
    /// unchanged.
    pub fn apply(&mut self, command: &MetadataCommand) -> Result<MetadataOutcome, MetadataError> {
        match command {
            MetadataCommand::RegisterBroker {
                id,
                host,
                port,
                rack,
                incarnation,
            } => {
                // An older start of a broker must not replace a newer one
                // (a registration retried from before a restart).
                if self
                    .brokers
                    .get(id)
                    .is_some_and(|known| known.incarnation > *incarnation)
                {
                    return Err(MetadataError::StaleIncarnation);
                }
                self.brokers.insert(
                    *id,
                    BrokerRegistration {
                        id: *id,
                        host: host.clone(),
                        port: *port,
                        rack: rack.clone(),
                        incarnation: *incarnation,
                        fenced: true,
                    },
                );
                // A new incarnation lost whatever was not durable: it leads
                // nothing until it is unfenced and elected again.
                self.fence(*id);
                Ok(MetadataOutcome::Done)
            }
            MetadataCommand::FenceBroker { id } => {
                let broker = self
                    .brokers
                    .get_mut(id)
                    .ok_or(MetadataError::UnknownBroker)?;
                broker.fenced = true;
                self.fence(*id);
                Ok(MetadataOutcome::Done)
            }
            MetadataCommand::UnfenceBroker { id, incarnation } => {
                let broker = self
                    .brokers
                    .get_mut(id)
                    .ok_or(MetadataError::UnknownBroker)?;
                if broker.incarnation != *incarnation {
                    return Err(MetadataError::UnknownBroker);
                }
                broker.fenced = false;
                self.bump_partitions_of(*id);
                self.elect_leaderless();
                Ok(MetadataOutcome::Done)
            }
            MetadataCommand::CreateTopic {
                name,
                partitions,
                replication_factor,
                configs,
            } => self.create_topic(name, *partitions, *replication_factor, configs),
            MetadataCommand::ImportTopic {
                name,
                broker,
                leader_epochs,
                configs,
            } => {
                if self.topics.contains_key(name) {
                    return Err(MetadataError::TopicAlreadyExists);
                }
                if !self.brokers.contains_key(broker) || leader_epochs.is_empty() {
                    return Err(MetadataError::UnknownBroker);
                }
                let live = self.live_brokers();
                let partitions = leader_epochs
                    .iter()
                    .map(|epoch| {
                        let mut state = PartitionState {
                            replicas: vec![*broker],
                            isr: vec![*broker],
                            leader: None,
                            leader_epoch: *epoch,
                            partition_epoch: 0,
                        };
                        if live.contains(broker) {
                            set_leader(&mut state, Some(*broker));
                        }
                        state
                    })
                    .collect();
                let id = self.take_topic_id();
                self.topics.insert(
                    name.clone(),
                    TopicImage {
                        id,
                        partitions,
                        configs: configs.clone(),
                        reassigning: BTreeMap::new(),
                    },
                );
                Ok(MetadataOutcome::Done)
            }
            MetadataCommand::DeleteTopic { name } => {
                let topic = self
                    .topics
                    .remove(name)
                    .ok_or(MetadataError::UnknownTopicOrPartition)?;
                self.deleted_topic_ids.insert(topic.id);
                Ok(MetadataOutcome::Done)
            }
            MetadataCommand::AlterPartition {
                topic,
                partition,
                leader,
                leader_epoch,
                partition_epoch,
                isr,
            } => self.alter_partition(
                topic,
                *partition,
                *leader,
                *leader_epoch,
                *partition_epoch,
                isr,
            ),
            MetadataCommand::ElectPreferredLeaders => {
                self.elect_preferred();
                Ok(MetadataOutcome::Done)
            }
            MetadataCommand::ReassignPartition {
                topic,
                partition,
                replicas,
            } => self.reassign(topic, *partition, replicas),
            MetadataCommand::CompleteReassignment { topic, partition } => {
                self.complete_reassignment(topic, *partition)
            }
            MetadataCommand::AllocateProducerIds { broker, at_least } => {
                if !self.brokers.contains_key(broker) {
                    return Err(MetadataError::UnknownBroker);
                }
                let first = self.next_producer_id.max(*at_least);
                self.next_producer_id += PRODUCER_ID_BLOCK;
                Ok(MetadataOutcome::ProducerIds(first))
            }
        }
    }

    /// Takes `broker` out of leadership and in-sync sets: partitions it led
    /// get a new leader from the rest of their in-sync set (or none); it
    /// leaves every in-sync set it is not the last member of.
    fn fence(&mut self, broker: BrokerId) {
        let live = self.live_brokers();
        let unclean = self.unclean_leader_election;
        for topic in self.topics.values_mut() {
            for partition in &mut topic.partitions {
                if !partition.replicas.contains(&broker) {
                    continue;
                }
                if partition.isr.len() > 1 && partition.in_sync(broker) {
                    partition.isr.retain(|id| *id != broker);
                }
                if partition.leader == Some(broker) {
                    let next = choose_leader(partition, &live, unclean);
                    set_leader(partition, next);
                }
            }
        }
        // Bumped even where nothing else changed: an in-sync proposal made
        // before this broker's liveness changed (say, to add it, from a
        // fetch of its previous incarnation) must not be applied after it.
        self.bump_partitions_of(broker);
    }

    /// Bumps the partition epoch of every partition `broker` replicates, so
    /// that proposals based on its earlier liveness are refused as stale.
    fn bump_partitions_of(&mut self, broker: BrokerId) {
        for topic in self.topics.values_mut() {
            for partition in &mut topic.partitions {
                if partition.replicas.contains(&broker) {
                    partition.partition_epoch += 1;
                }
            }
        }
    }

    /// Gives a leader to every partition without one that now has a live
    /// in-sync replica (or, with unclean election, any live replica).
    fn elect_leaderless(&mut self) {
        let live = self.live_brokers();
        let unclean = self.unclean_leader_election;
        for topic in self.topics.values_mut() {
            for partition in &mut topic.partitions {
                if partition.leader.is_none()
                    && let Some(next) = choose_leader(partition, &live, unclean)
                {
                    set_leader(partition, Some(next));
                    partition.partition_epoch += 1;
                }
            }
        }
    }

    fn reassign(
        &mut self,
        topic: &str,
        partition: u32,
        target: &[BrokerId],
    ) -> Result<MetadataOutcome, MetadataError> {
        let invalid = |why: &str| Err(MetadataError::InvalidRequest(why.to_string()));
        let mut distinct = target.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        if target.is_empty() || distinct.len() != target.len() {
            return invalid("the new replicas must be one or more distinct broker ids");
        }
        if let Some(unknown) = target.iter().find(|id| !self.brokers.contains_key(id)) {
            return invalid(&format!("broker {unknown} is not registered"));
        }
        // A dead target would never catch up, and the move never end.
        let live = self.live_brokers();
        if let Some(fenced) = target.iter().find(|id| !live.contains(id)) {
            return invalid(&format!("broker {fenced} is fenced (down or catching up)"));
        }
        let image = self
            .topics
            .get_mut(topic)
            .ok_or(MetadataError::UnknownTopicOrPartition)?;
        let state = image
            .partitions
            .get_mut(partition as usize)
            .ok_or(MetadataError::UnknownTopicOrPartition)?;
        if state.replicas == target {
            // Already there (a move back to where it is cancels one).
            image.reassigning.remove(&partition);
            return Ok(MetadataOutcome::Done);
        }
        // A move under way is replaced: its added replicas stay until this
        // one completes, which drops every replica outside `target`.
        for id in target {
            if !state.replicas.contains(id) {
                state.replicas.push(*id);
            }
        }
        state.partition_epoch += 1;
        let outcome = MetadataOutcome::Partition(state.clone());
        image.reassigning.insert(partition, target.to_vec());
        Ok(outcome)
    }

    fn complete_reassignment(
        &mut self,
        topic: &str,
        partition: u32,
    ) -> Result<MetadataOutcome, MetadataError> {
        let live = self.live_brokers();
        let unclean = self.unclean_leader_election;
        let image = self
            .topics
            .get_mut(topic)
            .ok_or(MetadataError::UnknownTopicOrPartition)?;
        let Some(target) = image.reassigning.get(&partition).cloned() else {
            return Err(MetadataError::InvalidRequest(
                "this partition is not being moved".to_string(),
            ));
        };
        let state = image
            .partitions
            .get_mut(partition as usize)
            .ok_or(MetadataError::UnknownTopicOrPartition)?;
        if !target.iter().all(|id| state.in_sync(*id)) {
            return Err(MetadataError::InvalidRequest(
                "the new replicas are not all in sync yet".to_string(),
            ));
        }
        state.replicas = target.clone();
        state.isr = target
            .iter()
            .copied()
            .filter(|id| state.isr.contains(id))
            .collect();
        if state.leader.is_none_or(|leader| !target.contains(&leader)) {
            let next = choose_leader(state, &live, unclean);
            set_leader(state, next);
        }
        state.partition_epoch += 1;
        let outcome = MetadataOutcome::Partition(state.clone());
        image.reassigning.remove(&partition);
        Ok(outcome)
    }

    /// Moves whose new replicas are all in sync: ready to complete.
    pub fn reassignments_ready(&self) -> Vec<(String, u32)> {
        let mut ready = Vec::new();
        for (name, topic) in &self.topics {
            for (partition, target) in &topic.reassigning {
                let caught_up = topic
                    .partitions
                    .get(*partition as usize)
                    .is_some_and(|state| target.iter().all(|id| state.in_sync(*id)));
                if caught_up {
                    ready.push((name.clone(), *partition));
                }
            }
        }
        ready
    }

    /// Whether some partition's preferred replica (its first) is alive and
    /// in sync but does not lead: what `ElectPreferredLeaders` would change.
    pub fn preferred_leaders_wanted(&self) -> bool {
        let live = self.live_brokers();
        self.topics.values().any(|topic| {
            topic.partitions.iter().any(|partition| {
                partition.replicas.first().is_some_and(|&preferred| {
                    partition.leader != Some(preferred)
                        && partition.in_sync(preferred)
                        && live.contains(&preferred)
                })
            })
        })
    }

    fn elect_preferred(&mut self) {
        let live = self.live_brokers();
        for topic in self.topics.values_mut() {
            for partition in &mut topic.partitions {
                let Some(&preferred) = partition.replicas.first() else {
                    continue;
                };
                if partition.leader != Some(preferred)
                    && partition.in_sync(preferred)
                    && live.contains(&preferred)
                {
                    set_leader(partition, Some(preferred));
                    partition.partition_epoch += 1;
                }
            }
        }
    }

    fn live_brokers(&self) -> Vec<BrokerId> {
        self.brokers
            .values()
            .filter(|b| !b.fenced)
            .map(|b| b.id)
            .collect()
    }

    fn create_topic(
        &mut self,
        name: &str,
        partitions: u32,
        replication_factor: u16,
        configs: &BTreeMap<String, String>,
    ) -> Result<MetadataOutcome, MetadataError> {
        if self.topics.contains_key(name) {
            return Err(MetadataError::TopicAlreadyExists);
        }
        if partitions == 0 || partitions > TOPIC_PARTITIONS_MAX {
            return Err(MetadataError::InvalidRequest(format!(
                "partitions must be 1 to {TOPIC_PARTITIONS_MAX}"
            )));
        }
        if replication_factor == 0 || replication_factor > REPLICATION_FACTOR_MAX {
            return Err(MetadataError::InvalidRequest(format!(
                "replication factor must be 1 to {REPLICATION_FACTOR_MAX}"
            )));
        }
        let live: Vec<&BrokerRegistration> = self.brokers.values().filter(|b| !b.fenced).collect();
        if live.len() < usize::from(replication_factor) {
            return Err(MetadataError::InvalidRequest(format!(
                "replication factor {replication_factor} needs as many live brokers; {} are",
                live.len()
            )));
        }
        let placement = place_replicas(&live, partitions, replication_factor, self.topics.len());
        let partitions = placement
            .into_iter()
            .map(|replicas| PartitionState {
                leader: replicas.first().copied(),
                isr: replicas.clone(),
                replicas,
                leader_epoch: 0,
                partition_epoch: 0,
            })
            .collect();
        let id = self.take_topic_id();
        self.topics.insert(
            name.to_string(),
            TopicImage {
                id,
                partitions,
                configs: configs.clone(),
                reassigning: BTreeMap::new(),
            },
        );
        Ok(MetadataOutcome::Done)
    }

    fn alter_partition(
        &mut self,
        topic: &str,
        partition: u32,
        leader: BrokerId,
        leader_epoch: i32,
        partition_epoch: i32,
        isr: &[BrokerId],
    ) -> Result<MetadataOutcome, MetadataError> {
        let live = self.live_brokers();
        let state = self
            .topics
            .get_mut(topic)
            .and_then(|t| t.partitions.get_mut(partition as usize))
            .ok_or(MetadataError::UnknownTopicOrPartition)?;
        if state.leader != Some(leader) || state.leader_epoch != leader_epoch {
            return Err(MetadataError::FencedLeaderEpoch);
        }
        if state.partition_epoch != partition_epoch {
            return Err(MetadataError::StalePartitionEpoch);
        }
        let mut proposed: Vec<BrokerId> = Vec::with_capacity(isr.len());
        for id in isr {
            if !proposed.contains(id) {
                proposed.push(*id);
            }
        }
        let valid = proposed.contains(&leader)
            && proposed.iter().all(|id| state.replicas.contains(id))
            // Only live brokers may join; members already in may stay.
            && proposed
                .iter()
                .all(|id| state.isr.contains(id) || live.contains(id));
        if !valid {
            return Err(MetadataError::InvalidIsr);
        }
        // Keep replica order, so every voter stores the same list.
        state.isr = state
            .replicas
            .iter()
            .copied()
            .filter(|id| proposed.contains(id))
            .collect();
        state.partition_epoch += 1;
        Ok(MetadataOutcome::Partition(state.clone()))
    }
}

/// The next leader: the first replica (preferred order) that is in sync and
/// live; with `unclean`, failing that, the first live replica.
fn choose_leader(partition: &PartitionState, live: &[BrokerId], unclean: bool) -> Option<BrokerId> {
    let clean = partition
        .replicas
        .iter()
        .copied()
        .find(|id| partition.in_sync(*id) && live.contains(id));
    clean.or_else(|| {
        unclean
            .then(|| {
                partition
                    .replicas
                    .iter()
                    .copied()
                    .find(|id| live.contains(id))
            })
            .flatten()
    })
}

/// Sets the leader and bumps the leader epoch. An unclean leader (outside
/// the in-sync set) becomes the whole in-sync set.
fn set_leader(partition: &mut PartitionState, leader: Option<BrokerId>) {
    partition.leader = leader;
    partition.leader_epoch += 1;
    if let Some(leader) = leader
        && !partition.in_sync(leader)
    {
        partition.isr = vec![leader];
    }
}

/// Replica lists for `partitions` partitions: leaders spread evenly over the
/// brokers (rotated by `rotation`, so successive topics start on different
/// brokers), followers on the next brokers in an order that alternates
/// racks when racks are given, so that copies land on different racks
/// where there are enough of them.
fn place_replicas(
    live: &[&BrokerRegistration],
    partitions: u32,
    replication_factor: u16,
    rotation: usize,
) -> Vec<Vec<BrokerId>> {
    // Interleave racks: r1-a, r2-a, r3-a, r1-b, ... (Kafka's rack-aware order).
    let mut by_rack: BTreeMap<&str, Vec<BrokerId>> = BTreeMap::new();
    for broker in live {
        by_rack
            .entry(broker.rack.as_deref().unwrap_or(""))
            .or_default()
            .push(broker.id);
    }
    let mut order = Vec::with_capacity(live.len());
    for round in 0.. {
        let before = order.len();
        for ids in by_rack.values() {
            if let Some(id) = ids.get(round) {
                order.push(*id);
            }
        }
        if order.len() == before {
            break;
        }
    }
    let brokers = order.len();
    (0..partitions as usize)
        .map(|index| {
            let first = (index + rotation) % brokers;
            (0..usize::from(replication_factor))
                .map(|copy| order[(first + copy) % brokers])
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_with_brokers(count: u32, racks: &[&str]) -> MetadataImage {
        let mut image = MetadataImage::new(false);
        for id in 1..=count {
            let rack =
                (!racks.is_empty()).then(|| racks[(id as usize - 1) % racks.len()].to_string());
            image
                .apply(&MetadataCommand::RegisterBroker {
                    id,
                    host: "127.0.0.1".into(),
                    port: 9000 + id as u16,
                    rack,
                    incarnation: 1,
                })
                .expect("register");
            image
                .apply(&MetadataCommand::UnfenceBroker { id, incarnation: 1 })
                .expect("unfence");
        }
        image
    }

    fn create(image: &mut MetadataImage, name: &str, partitions: u32, rf: u16) {
        image
            .apply(&MetadataCommand::CreateTopic {
                name: name.into(),
                partitions,
                replication_factor: rf,
                configs: BTreeMap::new(),
            })
            .expect("create");
    }

    /// Creation spreads leaders and copies evenly, and copies of a
    /// partition land on different racks when there are enough racks.
    #[test]
    fn topics_spread_leaders_and_racks() {
        let mut image = image_with_brokers(6, &["a", "a", "b", "b", "c", "c"]);
        create(&mut image, "t", 12, 3);
        let topic = &image.topics["t"];
        let mut leaders = BTreeMap::new();
        for partition in &topic.partitions {
            *leaders
                .entry(partition.leader.expect("leader"))
                .or_insert(0) += 1;
            let racks: std::collections::BTreeSet<_> = partition
                .replicas
                .iter()
                .map(|id| image.brokers[id].rack.clone())
                .collect();
            assert_eq!(racks.len(), 3, "{:?}", partition.replicas);
            assert_eq!(partition.isr, partition.replicas);
        }
        assert_eq!(leaders.len(), 6);
        assert!(leaders.values().all(|count| *count == 2), "{leaders:?}");
    }

    /// A fenced leader is replaced from the in-sync set with a higher epoch;
    /// the last in-sync broker is kept (no leader) until it returns.
    #[test]
    fn fencing_elects_only_from_the_in_sync_set() {
        let mut image = image_with_brokers(3, &[]);
        create(&mut image, "t", 1, 3);
        let before = image.partition("t", 0).expect("p").clone();
        let first = before.leader.expect("leader");
        image
            .apply(&MetadataCommand::FenceBroker { id: first })
            .expect("fence");
        let after = image.partition("t", 0).expect("p").clone();
        assert_ne!(after.leader, Some(first));
        assert!(after.leader_epoch > before.leader_epoch);
        assert!(!after.in_sync(first));
        let second = after.leader.expect("leader");
        image
            .apply(&MetadataCommand::FenceBroker { id: second })
            .expect("fence");
        let third = image.partition("t", 0).expect("p").leader.expect("leader");
        image
            .apply(&MetadataCommand::FenceBroker { id: third })
            .expect("fence");
        let none = image.partition("t", 0).expect("p").clone();
        assert_eq!(none.leader, None);
        assert_eq!(none.isr, vec![third], "the last in-sync broker stays");
        // The first broker returning is not in sync: still no leader.
        image
            .apply(&MetadataCommand::UnfenceBroker {
                id: first,
                incarnation: 1,
            })
            .expect("unfence");
        assert_eq!(image.partition("t", 0).expect("p").leader, None);
        image
            .apply(&MetadataCommand::UnfenceBroker {
                id: third,
                incarnation: 1,
            })
            .expect("unfence");
        assert_eq!(image.partition("t", 0).expect("p").leader, Some(third));
    }

    /// A move adds the new replicas first; it completes only once they are
    /// all in sync, leaving exactly the new set with a leader inside it.
    #[test]
    fn reassignment_adds_first_and_completes_when_in_sync() {
        let mut image = image_with_brokers(3, &[]);
        create(&mut image, "t", 1, 2);
        let before = image.partition("t", 0).expect("p").clone();
        let arriving = (1..=3)
            .find(|id| !before.replicas.contains(id))
            .expect("third");
        let target = vec![before.replicas[1], arriving];
        let reassign = |replicas: Vec<BrokerId>| MetadataCommand::ReassignPartition {
            topic: "t".into(),
            partition: 0,
            replicas,
        };
        assert!(matches!(
            image.apply(&reassign(vec![7])),
            Err(MetadataError::InvalidRequest(_))
        ));
        // A move can be cancelled by moving back to where it was.
        image.apply(&reassign(target.clone())).expect("start");
        image
            .apply(&reassign(before.replicas.clone()))
            .expect("replace");
        assert_eq!(image.reassignments_ready(), vec![("t".to_string(), 0)]);
        image
            .apply(&MetadataCommand::CompleteReassignment {
                topic: "t".into(),
                partition: 0,
            })
            .expect("back where it was");
        assert_eq!(
            image.partition("t", 0).expect("p").replicas,
            before.replicas
        );
        image
            .apply(&MetadataCommand::FenceBroker { id: arriving })
            .expect("fence");
        assert!(
            matches!(
                image.apply(&reassign(target.clone())),
                Err(MetadataError::InvalidRequest(_))
            ),
            "not onto a fenced broker"
        );
        image
            .apply(&MetadataCommand::UnfenceBroker {
                id: arriving,
                incarnation: 1,
            })
            .expect("unfence");
        image.apply(&reassign(target.clone())).expect("start");
        let moving = image.partition("t", 0).expect("p").clone();
        assert_eq!(moving.replicas.len(), 3, "old and new together: {moving:?}");
        assert_eq!(moving.leader, before.leader, "leadership stays meanwhile");
        assert!(image.reassignments_ready().is_empty());
        let complete = MetadataCommand::CompleteReassignment {
            topic: "t".into(),
            partition: 0,
        };
        assert!(
            matches!(
                image.apply(&complete),
                Err(MetadataError::InvalidRequest(_))
            ),
            "not before the new replica is in sync"
        );
        let leader = moving.leader.expect("leader");
        image
            .apply(&MetadataCommand::AlterPartition {
                topic: "t".into(),
                partition: 0,
                leader,
                leader_epoch: moving.leader_epoch,
                partition_epoch: moving.partition_epoch,
                isr: moving.replicas.clone(),
            })
            .expect("all in sync");
        assert_eq!(image.reassignments_ready(), vec![("t".to_string(), 0)]);
        image.apply(&complete).expect("complete");
        let after = image.partition("t", 0).expect("p").clone();
        assert_eq!(after.replicas, target);
        assert!(after.isr.iter().all(|id| target.contains(id)));
        assert!(after.leader.is_some_and(|leader| target.contains(&leader)));
        assert!(image.reassignments_ready().is_empty());
    }
    /// Only the current leader, at the current partition epoch, may change
    /// the in-sync set, and only live replicas may join it.
    #[test]
    fn alter_partition_is_checked() {
        let mut image = image_with_brokers(3, &[]);
        create(&mut image, "t", 1, 3);
        let state = image.partition("t", 0).expect("p").clone();
        let leader = state.leader.expect("leader");
        let follower = *state.replicas.iter().find(|id| **id != leader).expect("f");
        let alter = |leader, leader_epoch, partition_epoch, isr: Vec<BrokerId>| {
            MetadataCommand::AlterPartition {
                topic: "t".into(),
                partition: 0,
                leader,
                leader_epoch,
                partition_epoch,
                isr,
            }
        };
        assert_eq!(
            image.apply(&alter(follower, state.leader_epoch, 0, vec![follower])),
            Err(MetadataError::FencedLeaderEpoch)
        );
        let shrunk = image
            .apply(&alter(leader, state.leader_epoch, 0, vec![leader]))
            .expect("shrink");
        assert_eq!(
            shrunk,
            MetadataOutcome::Partition(PartitionState {
                isr: vec![leader],
                partition_epoch: 1,
                ..state.clone()
            })
        );
        assert_eq!(
            image.apply(&alter(
                leader,
                state.leader_epoch,
                0,
                vec![leader, follower]
            )),
            Err(MetadataError::StalePartitionEpoch)
        );
        image
            .apply(&MetadataCommand::FenceBroker { id: follower })
            .expect("fence");
        let epoch = image.partition("t", 0).expect("p").partition_epoch;
        assert_eq!(
            image.apply(&alter(
                leader,
                state.leader_epoch,
                epoch,
                vec![leader, follower]
            )),
            Err(MetadataError::InvalidIsr)
        );
        assert_eq!(
            image.apply(&alter(leader, state.leader_epoch, epoch, vec![follower])),
            Err(MetadataError::InvalidIsr),
            "the leader stays in its own set"
        );
    }

    /// Preferred leaders come back once in sync; producer id blocks never overlap.
    #[test]
    fn preferred_leaders_and_producer_ids() {
        let mut image = image_with_brokers(3, &[]);
        create(&mut image, "t", 3, 3);
        let preferred = image.partition("t", 0).expect("p").replicas[0];
        image
            .apply(&MetadataCommand::FenceBroker { id: preferred })
            .expect("fence");
        image
            .apply(&MetadataCommand::UnfenceBroker {
                id: preferred,
                incarnation: 1,
            })
            .expect("unfence");
        let state = image.partition("t", 0).expect("p").clone();
        assert_ne!(state.leader, Some(preferred));
        let leader = state.leader.expect("leader");
        image
            .apply(&MetadataCommand::AlterPartition {
                topic: "t".into(),
                partition: 0,
                leader,
                leader_epoch: state.leader_epoch,
                partition_epoch: state.partition_epoch,
                isr: state.replicas.clone(),
            })
            .expect("expand");
        image
            .apply(&MetadataCommand::ElectPreferredLeaders)
            .expect("elect");
        let back = image.partition("t", 0).expect("p");
        assert_eq!(back.leader, Some(preferred));
        assert_eq!(back.leader_epoch, state.leader_epoch + 1);
        let first = image.apply(&MetadataCommand::AllocateProducerIds {
            broker: 1,
            at_least: 0,
        });
        let second = image.apply(&MetadataCommand::AllocateProducerIds {
            broker: 2,
            at_least: 0,
        });
        assert_eq!(first, Ok(MetadataOutcome::ProducerIds(0)));
        assert_eq!(second, Ok(MetadataOutcome::ProducerIds(PRODUCER_ID_BLOCK)));
    }
}
