//! Broker configuration: embedded defaults, then a TOML file, then `WEIR_*`
//! environment variables and command-line flags (clap reads both).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use weir_storage::{EngineKind, FlushPolicy, WriteMode};

/// Default segment size of the offsets topic (each partition preallocates
/// one). Snapshots replace the records below them, so a partition keeps
/// about one segment beyond its snapshot.
pub const OFFSETS_SEGMENT_BYTES: u64 = 64 << 20;
/// Default time the offsets of a group are kept once it has no members and
/// no commit: 7 days, Kafka's `offsets.retention.minutes`.
pub const OFFSETS_RETENTION_MS: u64 = 7 * 24 * 3600 * 1000;

/// Every setting of a broker, with the reason for each default.
/// (docs/OPERATIONS.md's configuration table is generated from these
/// comments and defaults; `broker/tests/config_reference.rs` fails when
/// the two drift apart.)
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// Client listener. Default 127.0.0.1:9092, Kafka's port, loopback only.
    pub listen: SocketAddr,
    /// Admin HTTP listener (`/metrics`, `/healthz`, `/readyz`, `/v1/...`).
    /// Default 127.0.0.1:9644.
    pub admin_listen: SocketAddr,
    /// Where partitions live. Default `./weir-data`.
    pub data_dir: PathBuf,
    /// This broker's id.
    pub broker_id: u32,
    /// The cluster's id, reported by Metadata and Handshake.
    pub cluster_id: String,
    /// Connections served at once; more are refused with TooManyConnections.
    /// Default 10,000: well above the 1,000 the tests open, below typical fd limits.
    pub connections_max: usize,
    /// Most connections open at once from one client address; more are
    /// refused with TooManyConnections. Default: half of `connections_max`,
    /// so that no single address can take every slot.
    pub connections_max_per_address: Option<usize>,
    /// A connection with no request in flight, no subscription and no byte
    /// received for this long is closed (Kafka's `connections.max.idle.ms`,
    /// whose default this is: 10 minutes). 0: never.
    pub connections_max_idle_ms: u64,
    /// Once the first byte of a frame has arrived, the whole frame must
    /// arrive within this, and a response or push once begun must be sent
    /// within it; otherwise the connection is closed (a peer that sends
    /// half a frame, or stops reading, cannot hold a connection slot for
    /// ever). Default 30 s, time for a maximal frame at 1 MB/s. 0: never.
    pub frame_timeout_ms: u64,
    /// Connections the kernel queues for accept (capped by
    /// `net.core.somaxconn`). Default 1,024: a burst of connects larger than
    /// the backlog waits for SYN retries, a second or more each.
    pub listen_backlog: u32,
    /// Largest frame accepted. Default 16 MiB + 64 KiB: one maximal batch and its request.
    pub frame_bytes_max: usize,
    /// Request bytes one connection may have in flight before the broker
    /// stops reading its socket (producer backpressure). Default 64 MiB.
    pub in_flight_bytes_max: usize,
    /// Requests one connection may have in flight. Default 1,024.
    pub in_flight_requests_max: usize,
    /// Longest Fetch long-poll accepted. Default 30 s.
    pub fetch_wait_ms_max: u32,
    /// Largest push to a subscription. Default 1 MiB.
    pub push_bytes_max: usize,
    /// Partitions of a topic created without a count. Default 1.
    pub default_partitions: u32,
    /// Flush policy of every partition: `always`, `interval:<ms>`, `never`.
    pub flush: String,
    /// `direct` or `buffered` writes.
    pub write_mode: String,
    /// io engine: `auto`, `uring`, `sync`.
    pub io_engine: String,
    /// Segment size. Default 1 GiB.
    pub segment_bytes: u64,
    /// Retention by size per partition, bytes; absent keeps everything.
    pub retention_bytes: Option<u64>,
    /// Retention by age, milliseconds; default 7 days, Kafka's default.
    pub retention_ms: Option<u64>,
    /// How often retention runs. Default 60 s.
    pub retention_check_ms: u64,
    /// Largest batch accepted. Default 16 MiB.
    pub batch_bytes_max: usize,
    /// Most time graceful shutdown waits for connections to drain. Default 10 s.
    pub shutdown_grace_ms: u64,
    /// Check each batch's CRC-32C again when serving it to a consumer.
    /// Default off, as in Kafka: every batch is checked when it is produced
    /// and when a log is recovered, and the client checks every batch it
    /// receives, so a corrupted byte is still caught end to end; checking on
    /// every read too cost a quarter of the broker's CPU under load.
    pub verify_crc_on_read: bool,
    /// `host:port` that clients are told to connect to (FindCoordinator
    /// answers with it). Default: the address the broker listens on, or,
    /// when that is every interface (`0.0.0.0`, `::`), `127.0.0.1` with its
    /// port and a warning to set this.
    pub advertised_listen: Option<String>,
    /// Partitions of `__consumer_offsets` (created on first use). Default 8.
    pub offsets_topic_partitions: u32,
    /// Segment size `__consumer_offsets` is created with. Each retention
    /// check snapshots the committed offsets and deletes the segments below
    /// the snapshot, so a partition keeps about one segment. At least 1 MiB;
    /// default 64 MiB.
    pub offsets_segment_bytes: u64,
    /// The committed offsets of a group are dropped once it has had no
    /// members for this long and no commit within it (the clock starts when
    /// the group empties; downtime does not count); 0 keeps them for ever.
    /// Default 7 days, Kafka's `offsets.retention.minutes`.
    pub offsets_retention_ms: u64,
    /// How long the first rebalance of an empty group waits for more
    /// members to join, so that consumers started together get one
    /// assignment instead of a rebalance each. Default 1 s (Kafka: 3 s).
    pub group_initial_rebalance_delay_ms: u64,
    /// An idempotent producer with no batch on a partition for this long is
    /// forgotten there (its retries are long over). Default 1 day, Kafka's
    /// `producer.id.expiration.ms`.
    pub producer_expiration_ms: u64,
    /// The controller quorum's voters, `id@host:port` separated by commas
    /// (each the broker listener of that broker). Default: none, which
    /// makes this broker a quorum of one at its own address.
    pub controller_voters: Option<String>,
    /// This broker's rack (replicas of a partition are spread over racks).
    pub rack: Option<String>,
    /// A broker whose heartbeats stop for this long is fenced: it leads
    /// nothing and leaves in-sync sets. Default 1.5 s (Kafka: 9 s;
    /// Redpanda's election timeout: 1.5 s).
    pub broker_session_timeout_ms: u64,
    /// How often a broker heartbeats to every controller voter. Default 150 ms.
    pub broker_heartbeat_ms: u64,
    /// The controller's Raft heartbeat. Default 50 ms.
    pub controller_heartbeat_ms: u64,
    /// The controller's Raft election timeout, lower end (the upper end is
    /// twice it). Default 150 ms.
    pub controller_election_timeout_ms: u64,
    /// Bound on one metadata change (topic creation, in-sync change),
    /// controller failover included. Default 10 s.
    pub controller_propose_timeout_ms: u64,
    /// A follower that has not caught up for this long leaves the in-sync
    /// set. Default 10 s (Kafka: 30 s).
    pub replica_lag_time_max_ms: u64,
    /// In-sync replicas `acks=all` needs; a topic's `min.insync.replicas`
    /// overrides it. Default: 2 for topics with 3 or more replicas, else 1.
    pub min_insync_replicas: Option<usize>,
    /// Replicas of a topic created without a replication factor. Default:
    /// 3, or the number of registered brokers if fewer.
    pub default_replication_factor: Option<u16>,
    /// Whether a replica outside the in-sync set may be elected leader when
    /// none in it is alive (acknowledged records can then be lost; see
    /// docs/REPLICATION.md). Default off.
    pub unclean_leader_election: bool,
    /// Longest a follower's fetch waits at its leader for new data. Default 500 ms.
    pub replica_fetch_wait_ms: u32,
    /// Most record bytes one follower fetch carries. Default 8 MiB.
    pub replica_fetch_bytes_max: u32,
    /// On SIGTERM in a cluster, how long the broker waits (still serving)
    /// for the controller to move every leadership it holds elsewhere
    /// before it stops anyway. Default 15 s.
    pub controlled_shutdown_timeout_ms: u64,
    /// How often the controller leader moves leadership back to each
    /// partition's preferred replica (the first) where that replica is
    /// alive and in sync: a broker back from a restart leads again. 0: never.
    /// Default 10 s.
    pub leader_rebalance_interval_ms: u64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9092)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9644)),
            data_dir: PathBuf::from("weir-data"),
            broker_id: 1,
            cluster_id: "weir-local".to_string(),
            connections_max: 10_000,
            connections_max_per_address: None,
            connections_max_idle_ms: 600_000,
            frame_timeout_ms: 30_000,
            listen_backlog: 1_024,
            frame_bytes_max: weir_protocol::frame::FRAME_BYTES_MAX_DEFAULT,
            in_flight_bytes_max: 64 << 20,
            in_flight_requests_max: 1024,
            fetch_wait_ms_max: 30_000,
            push_bytes_max: 1 << 20,
            default_partitions: 1,
            flush: "always".to_string(),
            write_mode: "direct".to_string(),
            io_engine: "auto".to_string(),
            segment_bytes: 1 << 30,
            retention_bytes: None,
            retention_ms: Some(7 * 24 * 3600 * 1000),
            retention_check_ms: 60_000,
            batch_bytes_max: 16 << 20,
            shutdown_grace_ms: 10_000,
            verify_crc_on_read: false,
            advertised_listen: None,
            offsets_topic_partitions: 8,
            offsets_segment_bytes: OFFSETS_SEGMENT_BYTES,
            offsets_retention_ms: OFFSETS_RETENTION_MS,
            group_initial_rebalance_delay_ms: 1_000,
            producer_expiration_ms: 24 * 3600 * 1000,
            controller_voters: None,
            rack: None,
            broker_session_timeout_ms: 1_500,
            broker_heartbeat_ms: 150,
            controller_heartbeat_ms: 50,
            controller_election_timeout_ms: 150,
            controller_propose_timeout_ms: 10_000,
            replica_lag_time_max_ms: 10_000,
            min_insync_replicas: None,
            default_replication_factor: None,
            unclean_leader_election: false,
            replica_fetch_wait_ms: 500,
            controlled_shutdown_timeout_ms: 15_000,
            leader_rebalance_interval_ms: 10_000,
            replica_fetch_bytes_max: 8 << 20,
        }
    }
}

/// A setting that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {name} = {value:?}: expected {expected}")]
pub struct ConfigError {
    /// Setting name.
    pub name: &'static str,
    /// The value given.
    pub value: String,
    /// What would have been accepted.
    pub expected: &'static str,
}

impl BrokerConfig {
    /// The connection limit per client address in effect.
    pub fn connections_per_address_max(&self) -> usize {
        self.connections_max_per_address
            .unwrap_or(self.connections_max / 2)
            .max(1)
    }

    /// The flush policy.
    ///
    /// # Errors
    /// [`ConfigError`] for an unknown policy.
    pub fn flush_policy(&self) -> Result<FlushPolicy, ConfigError> {
        FlushPolicy::parse(&self.flush).ok_or_else(|| ConfigError {
            name: "flush",
            value: self.flush.clone(),
            expected: "always, never, interval or interval:<ms>",
        })
    }

    /// The write mode.
    ///
    /// # Errors
    /// [`ConfigError`] for an unknown mode.
    pub fn write_mode(&self) -> Result<WriteMode, ConfigError> {
        WriteMode::parse(&self.write_mode).ok_or_else(|| ConfigError {
            name: "write_mode",
            value: self.write_mode.clone(),
            expected: "direct or buffered",
        })
    }

    /// The io engine.
    ///
    /// # Errors
    /// [`ConfigError`] for an unknown engine.
    pub fn engine_kind(&self) -> Result<EngineKind, ConfigError> {
        EngineKind::parse(&self.io_engine).ok_or_else(|| ConfigError {
            name: "io_engine",
            value: self.io_engine.clone(),
            expected: "auto, uring or sync",
        })
    }
}

impl BrokerConfig {
    /// The controller voters: parsed `controller_voters`, or this broker
    /// alone at `own_address`.
    ///
    /// # Errors
    /// A malformed list.
    pub fn voters(
        &self,
        own_address: &str,
    ) -> Result<std::collections::BTreeMap<u32, String>, ConfigError> {
        let Some(list) = &self.controller_voters else {
            return Ok([(self.broker_id, own_address.to_string())].into());
        };
        let invalid = || ConfigError {
            name: "controller_voters",
            value: list.clone(),
            expected: "id@host:port[,id@host:port...] (1, 3 or 5 voters)",
        };
        let mut voters = std::collections::BTreeMap::new();
        for item in list
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
        {
            let (id, address) = item.split_once('@').ok_or_else(invalid)?;
            let id: u32 = id.trim().parse().map_err(|_| invalid())?;
            let address = address.trim();
            if address
                .rsplit_once(':')
                .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
            {
                return Err(invalid());
            }
            if voters.insert(id, address.to_string()).is_some() {
                return Err(invalid());
            }
        }
        if voters.is_empty() || voters.len() % 2 == 0 || voters.len() > 5 {
            return Err(invalid());
        }
        Ok(voters)
    }
}
