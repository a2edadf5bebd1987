//! The broker's shared state: settings, topics, the io engine, groups,
//! producer ids, metrics and the signals readers wait on. Every connection
//! and background task holds it through an `Arc`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{Notify, watch};
use weir_storage::IoEngine;

use crate::config::BrokerConfig;
use crate::topics::Topics;

/// Everything the connections share.
#[derive(Debug)]
pub struct Broker {
    /// Settings.
    pub config: BrokerConfig,
    /// Topics and partitions.
    pub topics: Topics,
    /// The io engine of the data directory.
    pub engine: Arc<IoEngine>,
    /// Woken after every append anywhere (long-poll fetches and pushes wait on it).
    pub appended: Arc<Notify>,
    /// Connections open now.
    pub connections: AtomicU64,
    /// Most connections open at once since the memory trim last looked.
    pub connections_peak: AtomicU64,
    /// Bytes of frame-sized read buffers allocated ahead of their frame's
    /// arrival, across connections (at most [`OWN_FRAME_BUFFERS_BYTES_MAX`]).
    pub own_frame_buffer_bytes: Arc<std::sync::atomic::AtomicUsize>,
    /// Rate limit of the log lines about connections closed or refused by a limit.
    pub limit_log: crate::limits::LimitLog,
    /// Prometheus metrics.
    pub metrics: crate::metrics::Metrics,
    /// True while serving; false during start-up and shutdown (`/readyz`).
    pub ready: std::sync::atomic::AtomicBool,
    /// Set when a controlled shutdown begins: heartbeats ask the
    /// controller to fence this broker so its leaderships move.
    pub shutting_down: std::sync::atomic::AtomicBool,
    /// Becomes true when shutdown begins: long polls answer at once rather
    /// than hold the connection past the grace period.
    pub stopping: watch::Receiver<bool>,
    /// Idempotent producers' ids and epochs.
    pub producer_ids: crate::producers::ProducerIds,
    /// Consumer groups and their committed offsets.
    pub groups: crate::groups::Coordinator,
    /// Where clients connect.
    pub local_addr: SocketAddr,
    /// Where clients are told to connect (FindCoordinator): host and port.
    pub advertised: (String, u16),
    /// This broker's part of the controller quorum (a quorum of one on a
    /// single node).
    pub controller: Arc<crate::cluster::controller::Controller>,
    /// The replica fetchers, one per leader followed.
    pub fetchers: crate::replication::fetcher::Fetchers,
}

/// The `host:port` clients are told to connect to: the configured one, else
/// the bound address, with `127.0.0.1` for an unspecified IP (a client
/// cannot connect to `0.0.0.0`).
///
/// # Errors
/// A configured value that is not `host:port`.
pub fn advertised_address(
    configured: Option<&str>,
    bound: SocketAddr,
) -> Result<(String, u16), crate::config::ConfigError> {
    if let Some(configured) = configured {
        let parsed = configured
            .rsplit_once(':')
            .and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)))
            .filter(|(host, _)| !host.is_empty());
        return match parsed {
            Some((host, port)) => Ok((host.trim_matches(['[', ']']).to_string(), port)),
            None => Err(crate::config::ConfigError {
                name: "advertised_listen",
                value: configured.to_string(),
                expected: "host:port",
            }),
        };
    }
    if bound.ip().is_unspecified() {
        tracing::warn!(
            listen = %bound,
            "listening on every interface: clients are told 127.0.0.1; set advertised_listen"
        );
        return Ok(("127.0.0.1".to_string(), bound.port()));
    }
    Ok((bound.ip().to_string(), bound.port()))
}

impl Broker {
    /// Deletes a topic, its data and its metric series.
    ///
    /// # Errors
    /// As [`Topics::delete`].
    pub async fn delete_local_topic(&self, name: &str) -> Result<(), crate::topics::TopicError> {
        let partitions = self.topics.delete(name).await?;
        self.metrics.forget_topic(name, partitions);
        Ok(())
    }

    /// Creates a topic in the cluster and waits (within the proposal
    /// timeout) until this broker holds it, if it replicates any of it.
    /// `replication_factor` 0 means the default.
    ///
    /// # Errors
    /// A [`TopicError`] with the client's code.
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        replication_factor: u16,
        configs: std::collections::BTreeMap<String, String>,
    ) -> Result<(), crate::topics::TopicError> {
        use crate::cluster::metadata::MetadataCommand;
        if !crate::topics::valid_topic_name(name) {
            return Err(crate::topics::TopicError::refused(
                weir_protocol::ErrorCode::InvalidTopic,
                format!("invalid topic name {name:?}"),
            ));
        }
        let replication_factor = if replication_factor == 0 {
            self.default_replication_factor()
        } else {
            replication_factor
        };
        let command = MetadataCommand::CreateTopic {
            name: name.to_string(),
            partitions,
            replication_factor,
            configs,
        };
        self.controller
            .propose(command)
            .await
            .map_err(crate::topics::TopicError::from_controller)?;
        // Answered once this broker holds (and has applied) the partitions
        // it replicates, so a produce right after creation finds a leader.
        self.await_local(|broker| broker.has_applied(name)).await;
        Ok(())
    }

    /// Creates `__consumer_offsets` in the cluster: the configured number
    /// of partitions, min(3, controller voters) replicas, no retention (its
    /// records and snapshots are the groups' memory).
    ///
    /// # Errors
    /// As [`Broker::create_topic`] (`TopicAlreadyExists` when another
    /// broker created it first).
    pub async fn create_offsets_topic(&self) -> Result<(), crate::topics::TopicError> {
        let configs = std::collections::BTreeMap::from([
            (
                "segment.bytes".to_string(),
                self.config
                    .offsets_segment_bytes
                    .max(crate::topics::SEGMENT_BYTES_MIN)
                    .to_string(),
            ),
            ("retention.ms".to_string(), "-1".to_string()),
            ("retention.bytes".to_string(), "-1".to_string()),
        ]);
        let voters = self.controller.voters().len().clamp(1, 3);
        self.create_topic(
            crate::topics::OFFSETS_TOPIC,
            self.config.offsets_topic_partitions.max(1),
            u16::try_from(voters).unwrap_or(3),
            configs,
        )
        .await
    }

    /// Deletes a topic in the cluster and waits (within the proposal
    /// timeout) until this broker has dropped its data.
    ///
    /// # Errors
    /// A [`TopicError`] with the client's code.
    pub async fn delete_topic(&self, name: &str) -> Result<(), crate::topics::TopicError> {
        use crate::cluster::metadata::MetadataCommand;
        self.controller
            .propose(MetadataCommand::DeleteTopic {
                name: name.to_string(),
            })
            .await
            .map_err(crate::topics::TopicError::from_controller)?;
        self.await_local(|broker| broker.topics.get(name).is_none())
            .await;
        Ok(())
    }

    /// Whether every partition of `topic` this broker replicates is open
    /// here with the metadata the image has for it.
    pub fn has_applied(&self, topic: &str) -> bool {
        let me = self.config.broker_id;
        let view = self.controller.view();
        let Some(image) = view.image.topics.get(topic) else {
            return true;
        };
        image.partitions.iter().enumerate().all(|(index, state)| {
            !state.replicas.contains(&me)
                || self
                    .topics
                    .partition(topic, index as u32)
                    .is_some_and(|partition| partition.leader_epoch() >= state.leader_epoch)
        })
    }

    /// Replicas of a topic created without a replication factor.
    pub fn default_replication_factor(&self) -> u16 {
        self.config.default_replication_factor.unwrap_or_else(|| {
            let registered = self.controller.view().image.brokers.len();
            u16::try_from(registered.clamp(1, 3)).unwrap_or(1)
        })
    }

    /// Waits until `done` holds, re-checking as metadata arrives, for at
    /// most the proposal timeout.
    async fn await_local(&self, done: impl Fn(&Broker) -> bool) {
        let deadline = tokio::time::Instant::now()
            + std::time::Duration::from_millis(self.config.controller_propose_timeout_ms);
        let mut metadata = self.controller.metadata();
        while !done(self) {
            // The local change follows the metadata change by a moment.
            let wait = tokio::time::timeout_at(
                deadline.min(tokio::time::Instant::now() + std::time::Duration::from_millis(20)),
                metadata.changed(),
            );
            if wait.await.is_ok_and(|changed| changed.is_err())
                || tokio::time::Instant::now() >= deadline
            {
                return;
            }
        }
    }

    /// The Prometheus text exposition, state gauges refreshed first.
    pub fn render_metrics(&self) -> String {
        // One scrape at a time: the refresh brings counters up to counts
        // kept elsewhere, which two at once would add twice.
        let _rendering = self
            .metrics
            .rendering
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        self.metrics.cluster.refresh(
            &self.topics,
            &self.controller.view(),
            self.controller.is_leader(),
            &self.config.data_dir,
        );
        self.metrics.render(
            self.connections.load(Ordering::Relaxed),
            &self.engine,
            &self.topics,
            &self.groups,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The advertised address: as configured (IPv6 brackets dropped), else
    /// the bound one, with loopback for an unspecified IP; a value without
    /// a port is refused.
    #[test]
    fn advertised_address_is_what_clients_can_reach() {
        let bound: SocketAddr = "10.1.2.3:9092".parse().expect("addr");
        let any: SocketAddr = "0.0.0.0:9092".parse().expect("addr");
        let any6: SocketAddr = "[::]:9092".parse().expect("addr");
        assert_eq!(
            advertised_address(None, bound).expect("default"),
            ("10.1.2.3".to_string(), 9092)
        );
        assert_eq!(
            advertised_address(None, any).expect("any"),
            ("127.0.0.1".to_string(), 9092)
        );
        assert_eq!(
            advertised_address(None, any6).expect("any6"),
            ("127.0.0.1".to_string(), 9092)
        );
        assert_eq!(
            advertised_address(Some("weir-0.weir:9092"), any).expect("set"),
            ("weir-0.weir".to_string(), 9092)
        );
        assert_eq!(
            advertised_address(Some("[fd00::1]:9092"), any).expect("v6"),
            ("fd00::1".to_string(), 9092)
        );
        for bad in ["weir-0", "weir-0:", ":9092", "weir-0:99999"] {
            assert!(advertised_address(Some(bad), any).is_err(), "{bad}");
        }
    }
}
