//! Weir's broker: topics of partitions on the storage engine, served over
//! the binary protocol of `weir-protocol`.
//!
//! Layout:
//! - `config`: [`BrokerConfig`], every setting with its default and reason.
//! - `topics`: the topic registry (`topics.json`) and partition directories.
//! - `partition`: one partition — a storage log, leader epoch, high watermark.
//! - `server`: accepting, per-connection reader/writer tasks, limits, shutdown.
//! - `handlers`: one function per API.
//! - `admin_http`: `/metrics`, `/healthz`, `/readyz` and the JSON API (axum).
//! - `metrics`: the Prometheus metrics (`prometheus-client`).
//!
//! Architecture invariant: every queue on a data path is bounded — the
//! per-connection response channel (`in_flight_requests_max`), the request
//! byte budget (`in_flight_bytes_max`), the io engine's channel — and a full
//! one stops the producer of work rather than growing.

pub mod admin_http;
pub mod blocking;
pub mod config;
pub mod groups;
pub mod handlers;
pub mod metrics;
pub mod partition;
pub mod producers;
pub mod server;
pub mod topics;

pub use config::BrokerConfig;
pub use server::{Running, start};
