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
    /// Bytes of frame-sized read buffers allocated ahead of their frame's
    /// arrival, across connections (at most [`OWN_FRAME_BUFFERS_BYTES_MAX`]).
    pub own_frame_buffer_bytes: Arc<std::sync::atomic::AtomicUsize>,
    /// Prometheus metrics.
    pub metrics: crate::metrics::Metrics,
    /// True while serving; false during start-up and shutdown (`/readyz`).
    pub ready: std::sync::atomic::AtomicBool,
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
    /// This broker's part of the controller quorum, once started.
    pub controller: Option<Arc<crate::cluster::controller::Controller>>,
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
    pub async fn delete_topic(&self, name: &str) -> Result<(), crate::topics::TopicError> {
        let partitions = self.topics.delete(name).await?;
        self.metrics.forget_topic(name, partitions);
        Ok(())
    }

    /// The Prometheus text exposition, state gauges refreshed first.
    pub fn render_metrics(&self) -> String {
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
