//! The cluster: the controller's metadata and the replication rules.
//!
//! Layout:
//! - `metadata`: the metadata image (brokers, topics, partitions with their
//!   leaders, epochs and in-sync sets) and the controller's rules for
//!   changing it — pure functions the controller quorum applies in log order.
//! - `replica`: one partition's replication rules on one broker (leader and
//!   follower transitions, high watermark, in-sync changes, truncation by
//!   leader epoch) as a state machine without I/O.
//!
//! Architecture invariant: `metadata` and `replica` do no I/O and read no
//! clock; time and the local log come in as arguments, so the seeded
//! simulation in `tests/replication_sim.rs` drives exactly the code the
//! broker runs.

pub mod controller;
pub mod metadata;
pub mod replica;
