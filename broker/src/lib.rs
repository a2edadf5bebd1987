//! Weir's broker: topics of partitions on the storage engine, served over
//! the binary protocol of `weir-protocol`.
//!
//! Layout, each module importing only those above it:
//! - `config`: [`BrokerConfig`], every setting with its default and reason.
//! - `blocking`: file work and decompression run off the async workers.
//! - `producers`: idempotent producers' ids, epochs and per-partition state.
//! - `partition`: one partition — a storage log, leader epoch, high watermark.
//! - `topics`: the topic registry (`topics.json`) and partition directories.
//! - `groups`: the group coordinator (`group`: one group's rounds;
//!   `assignors`: pure assignment functions; `offsets`: committed offsets
//!   as records of `__consumer_offsets`, their snapshots and load).
//! - `metrics`: the Prometheus metrics (`prometheus-client`).
//! - `broker`: [`broker::Broker`], the state every connection shares.
//! - `context`: what the handlers of one connection share.
//! - `handlers`: one function per API.
//! - `admin_http`: `/metrics`, `/healthz`, `/readyz` and the JSON API (axum).
//! - `server`: accepting, per-connection reader/writer tasks, limits, shutdown.
//!
//! Architecture invariant: every queue on a data path is bounded — the
//! per-connection response channel (`in_flight_requests_max`), the request
//! byte budget (`in_flight_bytes_max`), the io engine's channel — and a full
//! one stops the producer of work rather than growing.

pub mod admin_http;
pub mod blocking;
pub mod broker;
pub mod clock;
pub mod cluster;
pub mod cluster_metrics;
pub mod config;
pub mod connection;
pub mod context;
pub mod groups;
pub mod handlers;
pub mod limits;
pub mod metrics;
pub mod partition;
pub mod producers;
pub mod replication;
pub mod server;
pub mod topics;

pub use config::BrokerConfig;
pub use server::{Running, start};
