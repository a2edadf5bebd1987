//! The cluster driven over the network: this broker's session with the
//! controller, the metadata it follows, and the replica fetchers.
//!
//! Layout: `session` (registration, heartbeats, the import of topics a
//! single-node broker wrote before it was a cluster), `fetcher` (one task
//! per leader this broker follows, fetching its partitions), and this
//! module: following the metadata (creating and deleting local topics,
//! handing each partition its state), carrying out what the rules return
//! (`execute`), and the tick that lets leaders shrink in-sync sets.
//!
//! The rules themselves are in `cluster::replica` (no I/O); a partition
//! carries out the local actions itself (`partition::carry_out`).

pub mod fetcher;
pub mod session;

use std::sync::Arc;
use std::time::Duration;

use crate::broker::Broker;
use crate::cluster::controller::{ControllerError, MetadataView};
use crate::cluster::metadata::{MetadataCommand, MetadataOutcome, TopicImage};
use crate::cluster::replica::Action;
use crate::partition::Partition;

/// How often leaders check their followers' lag and retry proposals.
pub const TICK_MS: u64 = 250;

/// Wall clock, milliseconds (the rules take time as an argument).
pub use crate::clock::now_ms;

/// `acks=all` needs this many in-sync replicas for a topic: its
/// `min.insync.replicas`, else the broker's setting, else 2 with three or
/// more replicas and 1 below; never more than the replicas there are.
pub fn min_insync_replicas(broker: &Broker, topic: &TopicImage, replicas: usize) -> usize {
    let configured = topic
        .configs
        .get("min.insync.replicas")
        .and_then(|value| value.parse::<usize>().ok())
        .or(broker.config.min_insync_replicas);
    let wanted = configured.unwrap_or(if replicas >= 3 { 2 } else { 1 });
    wanted.clamp(1, replicas.max(1))
}

/// Carries out what the rules returned for `partition` that is not local:
/// fetching from a leader, stopping, proposing an in-sync set.
pub fn execute(broker: &Arc<Broker>, partition: &Arc<Partition>, actions: Vec<Action>) {
    for action in actions {
        match action {
            Action::BecomeLeader { epoch } => {
                tracing::info!(topic = %partition.topic, partition = partition.index, epoch,
                    "leading");
                broker.fetchers.unfollow(partition);
            }
            Action::Stop => broker.fetchers.unfollow(partition),
            Action::FollowLeader { leader, epoch } => {
                tracing::debug!(topic = %partition.topic, partition = partition.index, leader,
                    epoch, "following");
                broker.fetchers.follow(broker, partition, leader, epoch);
            }
            Action::ProposeIsr {
                leader_epoch,
                partition_epoch,
                isr,
            } => {
                let broker = broker.clone();
                let partition = partition.clone();
                tokio::spawn(async move {
                    propose_isr(&broker, &partition, leader_epoch, partition_epoch, isr).await;
                });
            }
            // Carried out by the partition itself.
            Action::Truncate { .. } | Action::HighWatermark(_) => {}
        }
    }
}

async fn propose_isr(
    broker: &Arc<Broker>,
    partition: &Arc<Partition>,
    leader_epoch: i32,
    partition_epoch: i32,
    isr: Vec<u32>,
) {
    let command = MetadataCommand::AlterPartition {
        topic: partition.topic.clone(),
        partition: partition.index,
        leader: broker.config.broker_id,
        leader_epoch,
        partition_epoch,
        isr: isr.clone(),
    };
    tracing::info!(topic = %partition.topic, partition = partition.index, ?isr,
        "proposing in-sync set");
    match broker.controller.propose(command).await {
        Ok(MetadataOutcome::Partition(state)) => {
            let min_insync = broker
                .controller
                .view()
                .image
                .topics
                .get(&partition.topic)
                .map_or(1, |topic| {
                    min_insync_replicas(broker, topic, state.replicas.len())
                });
            let actions = partition.apply_metadata(state, min_insync, now_ms());
            execute(broker, partition, actions);
        }
        Ok(_) => {}
        Err(ControllerError::Rejected(error)) => {
            tracing::info!(topic = %partition.topic, partition = partition.index, %error,
                "in-sync proposal refused");
            partition.on_isr_refused(partition_epoch, &isr, &error);
        }
        // Retried by the tick after `isr_retry_ms`.
        Err(error) => tracing::warn!(topic = %partition.topic, partition = partition.index,
            %error, "in-sync proposal not committed"),
    }
}

/// Brings local topics and partitions in line with `view`: creates the
/// topics this broker replicates, deletes those the cluster deleted, and
/// hands each partition its state.
pub async fn reconcile(broker: &Arc<Broker>, view: &MetadataView) {
    let me = broker.config.broker_id;
    let now = now_ms();
    for (name, topic) in &view.image.topics {
        let replicates = topic
            .partitions
            .iter()
            .any(|partition| partition.replicas.contains(&me));
        match broker.topics.get(name) {
            // The same name, another topic: the old one was deleted (and
            // this one created) while this broker was away.
            Some(local) if local.spec.id.is_some_and(|id| id != topic.id) => {
                tracing::info!(topic = %name, "replaced in the cluster: dropping the old data");
                for partition in &local.partitions {
                    broker.fetchers.unfollow(partition);
                }
                if let Err(error) = broker.delete_local_topic(name).await {
                    tracing::error!(topic = %name, %error, "cannot delete local data");
                    continue;
                }
            }
            Some(local) if local.spec.id.is_none() => {
                if let Err(error) = broker.topics.adopt_id(name, topic.id).await {
                    tracing::error!(topic = %name, %error, "cannot record the topic id");
                }
            }
            _ => {}
        }
        if broker.topics.get(name).is_none() {
            if !replicates {
                continue;
            }
            let partitions = topic.partitions.len() as u32;
            if let Err(error) = broker
                .topics
                .create(name, Some(topic.id), partitions, topic.configs.clone())
                .await
            {
                tracing::error!(topic = %name, %error, "cannot create the local partitions");
                continue;
            }
        }
        for (index, state) in topic.partitions.iter().enumerate() {
            let Some(partition) = broker.topics.partition(name, index as u32) else {
                continue;
            };
            // During a move the replicas are old and new together: the
            // minimum in sync is the target's, or it would rise meanwhile.
            let replica_count = topic
                .reassigning
                .get(&(index as u32))
                .map_or(state.replicas.len(), Vec::len);
            let min_insync = min_insync_replicas(broker, topic, replica_count);
            let was_replica = partition
                .state()
                .is_some_and(|before| before.replicas.contains(&me));
            let actions = partition.apply_metadata(state.clone(), min_insync, now);
            execute(broker, &partition, actions);
            let log = &partition.log;
            // Only a copy this broker held as a replica and was moved off:
            // data the cluster never placed here (an import that lost to
            // another broker's topic of the same name) is kept.
            if was_replica && !state.replicas.contains(&me) && log.end_offset() > log.start_offset()
            {
                // Moved away (a reassignment): the data is the new
                // replicas' now; free the disk. Stopped following above,
                // so no fetch appends here any more.
                tracing::info!(topic = %name, partition = index,
                    "no longer a replica: deleting the local copy");
                if let Err(error) = crate::blocking::blocking(|| log.truncate_fully_and_start_at(0))
                {
                    tracing::error!(topic = %name, partition = index, %error,
                        "cannot delete the local copy");
                }
            }
        }
    }
    // Local data goes only for a topic the cluster deleted: a topic the
    // image merely lacks (an image that lost its history, an import not yet
    // done) is kept, with a warning.
    for topic in broker.topics.all() {
        if view.image.topics.contains_key(&topic.name) {
            continue;
        }
        let deleted = topic
            .spec
            .id
            .is_some_and(|id| view.image.deleted_topic_ids.contains(&id));
        if !deleted {
            tracing::warn!(topic = %topic.name, "held here but unknown to the cluster: kept");
            continue;
        }
        tracing::info!(topic = %topic.name, "deleted in the cluster: deleting its local data");
        for partition in &topic.partitions {
            broker.fetchers.unfollow(partition);
        }
        if let Err(error) = broker.delete_local_topic(&topic.name).await {
            tracing::error!(topic = %topic.name, %error, "cannot delete local data");
        }
    }
}

/// Follows the metadata until shutdown, reconciling after every change.
pub async fn follow_metadata(broker: Arc<Broker>) {
    let mut metadata = broker.controller.metadata();
    let mut stopping = broker.stopping.clone();
    loop {
        let view = metadata.borrow_and_update().clone();
        reconcile(&broker, &view).await;
        tokio::select! {
            changed = metadata.changed() => if changed.is_err() { return },
            _ = stopping.wait_for(|stopping| *stopping) => return,
        }
    }
}

/// Ticks every partition this broker leads until shutdown.
pub async fn tick_loop(broker: Arc<Broker>) {
    let mut tick = tokio::time::interval(Duration::from_millis(TICK_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if *broker.stopping.borrow() {
            return;
        }
        let now = now_ms();
        for topic in broker.topics.all() {
            for partition in &topic.partitions {
                let actions = partition.tick(now);
                if !actions.is_empty() {
                    execute(&broker, partition, actions);
                }
            }
        }
    }
}
