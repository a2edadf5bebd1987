//! This broker's session with the controller: it registers (with a new
//! incarnation on every start), imports the topics a single-node broker
//! wrote before it was a cluster, starts following metadata, and then
//! heartbeats to every voter until shutdown.
//!
//! The controller keeps a registered broker fenced until its heartbeats say
//! it has applied metadata up to its own registration, so a broker that is
//! still catching up is not made leader of anything.

use std::sync::Arc;
use std::time::Duration;

use crate::broker::Broker;
use crate::cluster::controller::{ControllerError, Heartbeat};
use crate::cluster::metadata::{MetadataCommand, MetadataError};

/// The file in the data directory holding the last incarnation.
pub const INCARNATION_FILE: &str = "broker-incarnation";
/// Written once every pre-cluster topic has been imported.
pub const IMPORTED_FILE: &str = "cluster-imported";
/// Pause between registration attempts while no quorum answers.
pub const REGISTER_RETRY_MS: u64 = 200;

/// Reads, increments and durably stores this broker's incarnation.
///
/// # Errors
/// I/O errors.
pub fn next_incarnation(data_dir: &std::path::Path) -> std::io::Result<u64> {
    let previous = match std::fs::read_to_string(data_dir.join(INCARNATION_FILE)) {
        Ok(text) => text.trim().parse::<u64>().unwrap_or(0),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => 0,
        Err(error) => return Err(error),
    };
    let next = previous + 1;
    weir_storage::checkpoint::write_atomic(
        data_dir,
        INCARNATION_FILE,
        format!("{next}\n").as_bytes(),
    )
    .map_err(std::io::Error::other)?;
    Ok(next)
}

/// Registers, imports, follows and heartbeats until shutdown. `upgrading`
/// is true on the first start of a data directory written by a broker
/// without a controller: its topics are proposed to the cluster as they are.
pub async fn run(broker: Arc<Broker>, incarnation: u64, upgrading: bool) {
    let me = broker.config.broker_id;
    let (host, port) = broker.advertised.clone();
    let register = MetadataCommand::RegisterBroker {
        id: me,
        host,
        port,
        rack: broker.config.rack.clone(),
        incarnation,
    };
    loop {
        if *broker.stopping.borrow() {
            return;
        }
        match broker.controller.propose(register.clone()).await {
            Ok(_) => break,
            Err(error) => {
                tracing::warn!(%error, "registration with the controller not committed yet");
                tokio::time::sleep(Duration::from_millis(REGISTER_RETRY_MS)).await;
            }
        }
    }
    // Caught up to the registration once this broker's copy has it.
    let mut metadata = broker.controller.metadata();
    let registered = metadata
        .wait_for(|view| {
            view.image
                .brokers
                .get(&me)
                .is_some_and(|registration| registration.incarnation >= incarnation)
        })
        .await
        .is_ok();
    if !registered {
        return;
    }
    tracing::info!(broker = me, incarnation, "registered with the controller");
    if upgrading {
        // Until every topic is in, retried: the marker says it is done.
        while !import_local_topics(&broker).await {
            if *broker.stopping.borrow() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(REGISTER_RETRY_MS)).await;
        }
        if let Err(error) =
            weir_storage::checkpoint::write_atomic(&broker.config.data_dir, IMPORTED_FILE, b"1\n")
        {
            tracing::error!(%error, "cannot record that the import is done");
        }
    }
    tokio::spawn(super::follow_metadata(broker.clone()));
    tokio::spawn(super::tick_loop(broker.clone()));
    let mut tick = tokio::time::interval(Duration::from_millis(broker.config.broker_heartbeat_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if *broker.stopping.borrow() {
            return;
        }
        broker.controller.heartbeat(Heartbeat {
            broker: me,
            incarnation,
            caught_up: true,
            shutting_down: broker
                .shutting_down
                .load(std::sync::atomic::Ordering::Acquire),
        });
    }
}

/// Proposes every local topic the cluster does not know, with this broker
/// as its only replica and leader epochs above those its logs hold; true
/// once all are in.
async fn import_local_topics(broker: &Arc<Broker>) -> bool {
    let mut all_in = true;
    let known = broker.controller.view();
    for topic in broker.topics.all() {
        if known.image.topics.contains_key(&topic.name) {
            continue;
        }
        let leader_epochs: Vec<i32> = topic
            .partitions
            .iter()
            .map(|partition| {
                partition
                    .log
                    .epochs()
                    .latest()
                    .map_or(0, |entry| entry.epoch + 1)
            })
            .collect();
        let command = MetadataCommand::ImportTopic {
            name: topic.name.clone(),
            broker: broker.config.broker_id,
            leader_epochs,
            configs: topic.spec.configs.clone(),
        };
        match broker.controller.propose(command).await {
            Ok(_) | Err(ControllerError::Rejected(MetadataError::TopicAlreadyExists)) => {
                tracing::info!(topic = %topic.name, "imported into the cluster");
            }
            Err(error) => {
                tracing::error!(topic = %topic.name, %error, "import into the cluster failed");
                all_in = false;
            }
        }
    }
    all_in
}
