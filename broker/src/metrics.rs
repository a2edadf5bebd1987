//! Prometheus metrics (the Prometheus project's `prometheus-client`).
//!
//! Counters and histograms are updated on the request path; gauges that
//! mirror state (connections, engine queue and fsyncs, log offsets and sizes)
//! are read from that state when `/metrics` is scraped.

use std::sync::atomic::Ordering;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::groups::Coordinator;
use crate::topics::Topics;
use weir_storage::IoEngine;

type Labels = Vec<(String, String)>;

fn latency_histogram() -> Histogram {
    // 25 µs to ~40 s in factors of √2: fine enough near an fsync's
    // ~0.1 ms to tell a p99 of 0.3 ms from one of 0.5 ms.
    Histogram::new(exponential_buckets(0.000_025, std::f64::consts::SQRT_2, 42))
}

/// Every metric the broker exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Records appended, per topic.
    pub records_in: Family<Labels, Counter>,
    /// Bytes appended, per topic.
    pub bytes_in: Family<Labels, Counter>,
    /// Records sent to consumers (fetch and push), per topic.
    pub records_out: Family<Labels, Counter>,
    /// Bytes sent to consumers, per topic.
    pub bytes_out: Family<Labels, Counter>,
    /// Produce latency until acknowledged, seconds.
    pub produce_latency: Histogram,
    /// Fetch latency including long-poll waits, seconds.
    pub fetch_latency: Histogram,
    /// Time from a request's arrival to its response queued, by `api`.
    request_latency: Family<Labels, Histogram, fn() -> Histogram>,
    /// Each API's series of `request_latency`, by API key, made once so
    /// that a request records its latency without a lookup or allocation.
    request_latency_by_api: Vec<Option<Histogram>>,
    /// The cluster's metrics (replication, controller, disk).
    pub cluster: crate::cluster_metrics::ClusterMetrics,
    /// Held while a scrape refreshes and renders.
    pub rendering: std::sync::Mutex<()>,
    /// Connections the broker closed, by `reason` (idle, frame_timeout, send_timeout).
    pub connections_closed: Family<Labels, Counter>,
    /// Connections refused at accept, by `reason` (broker_limit, address_limit).
    pub connections_refused: Family<Labels, Counter>,
    connections: Gauge,
    io_queue_depth: Gauge,
    fsyncs: Gauge,
    fsync_errors: Gauge,
    fsync_seconds_sum: Gauge<f64, std::sync::atomic::AtomicU64>,
    fsync_le_micros: Family<Labels, Gauge>,
    log_start_offset: Family<Labels, Gauge>,
    log_end_offset: Family<Labels, Gauge>,
    log_size_bytes: Family<Labels, Gauge>,
    group_members: Family<Labels, Gauge>,
    group_committed_offset: Family<Labels, Gauge>,
    group_lag: Family<Labels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("weir");
        let metrics = Metrics {
            records_in: Family::default(),
            bytes_in: Family::default(),
            records_out: Family::default(),
            bytes_out: Family::default(),
            produce_latency: latency_histogram(),
            fetch_latency: latency_histogram(),
            request_latency: Family::new_with_constructor(latency_histogram),
            request_latency_by_api: Vec::new(),
            cluster: crate::cluster_metrics::ClusterMetrics::default(),
            rendering: std::sync::Mutex::new(()),
            connections_closed: Family::default(),
            connections_refused: Family::default(),
            connections: Gauge::default(),
            io_queue_depth: Gauge::default(),
            fsyncs: Gauge::default(),
            fsync_errors: Gauge::default(),
            fsync_seconds_sum: Gauge::default(),
            fsync_le_micros: Family::default(),
            log_start_offset: Family::default(),
            log_end_offset: Family::default(),
            log_size_bytes: Family::default(),
            group_members: Family::default(),
            group_committed_offset: Family::default(),
            group_lag: Family::default(),
            registry: Registry::default(),
        };
        registry.register("records_in", "Records appended", metrics.records_in.clone());
        registry.register("bytes_in", "Bytes appended", metrics.bytes_in.clone());
        registry.register(
            "records_out",
            "Records sent to consumers",
            metrics.records_out.clone(),
        );
        registry.register(
            "bytes_out",
            "Bytes sent to consumers",
            metrics.bytes_out.clone(),
        );
        registry.register(
            "produce_latency_seconds",
            "Produce latency until acknowledged",
            metrics.produce_latency.clone(),
        );
        registry.register(
            "fetch_latency_seconds",
            "Fetch latency including long-poll waits",
            metrics.fetch_latency.clone(),
        );
        registry.register(
            "request_latency_seconds",
            "Time from a request's arrival to its response queued, by API",
            metrics.request_latency.clone(),
        );
        let cluster = crate::cluster_metrics::ClusterMetrics::register(&mut registry);
        registry.register(
            "connections",
            "Client connections open",
            metrics.connections.clone(),
        );
        registry.register(
            "connections_closed",
            "Connections the broker closed by a limit, by reason (idle, frame_timeout, send_timeout)",
            metrics.connections_closed.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections refused at accept, by reason (broker_limit, address_limit)",
            metrics.connections_refused.clone(),
        );
        registry.register(
            "io_queue_depth",
            "Requests waiting for the io engine",
            metrics.io_queue_depth.clone(),
        );
        registry.register(
            "io_fsyncs",
            "fdatasync calls by the io engine",
            metrics.fsyncs.clone(),
        );
        registry.register(
            "io_fsync_errors",
            "fdatasync calls that failed",
            metrics.fsync_errors.clone(),
        );
        registry.register(
            "io_fsync_seconds_sum",
            "Total time in fdatasync",
            metrics.fsync_seconds_sum.clone(),
        );
        registry.register(
            "io_fsync_le_micros",
            "fdatasync calls that took at most `le` microseconds (cumulative)",
            metrics.fsync_le_micros.clone(),
        );
        registry.register(
            "log_start_offset",
            "First stored offset per partition",
            metrics.log_start_offset.clone(),
        );
        registry.register(
            "log_end_offset",
            "Next offset per partition",
            metrics.log_end_offset.clone(),
        );
        registry.register(
            "log_size_bytes",
            "Bytes stored per partition",
            metrics.log_size_bytes.clone(),
        );
        registry.register(
            "group_members",
            "Members of each consumer group",
            metrics.group_members.clone(),
        );
        registry.register(
            "group_committed_offset",
            "Committed offset per group and partition (-1: none)",
            metrics.group_committed_offset.clone(),
        );
        registry.register(
            "group_lag",
            "Records between a group's committed offset and the partition's end",
            metrics.group_lag.clone(),
        );
        // Every reason has a series from the start, so dashboards and
        // alerts over them have data before the first close.
        for reason in ["idle", "frame_timeout", "send_timeout"] {
            drop(
                metrics
                    .connections_closed
                    .get_or_create(&vec![("reason".to_string(), reason.to_string())]),
            );
        }
        for reason in ["broker_limit", "address_limit"] {
            drop(
                metrics
                    .connections_refused
                    .get_or_create(&vec![("reason".to_string(), reason.to_string())]),
            );
        }
        let mut request_latency_by_api = Vec::new();
        for api in weir_protocol::ApiKey::ALL {
            let code = usize::from(api.code());
            if request_latency_by_api.len() <= code {
                request_latency_by_api.resize(code + 1, None);
            }
            let labels = vec![("api".to_string(), snake_case(&format!("{api:?}")))];
            request_latency_by_api[code] =
                Some(metrics.request_latency.get_or_create(&labels).clone());
        }
        Metrics {
            registry,
            cluster,
            request_latency_by_api,
            ..metrics
        }
    }

    /// Records one request's latency (request read to response queued).
    pub fn observe_request(&self, api_key: u16, seconds: f64) {
        if let Some(Some(histogram)) = self.request_latency_by_api.get(usize::from(api_key)) {
            histogram.observe(seconds);
        }
    }

    /// Labels for a topic.
    pub fn topic(topic: &str) -> Labels {
        vec![("topic".to_string(), topic.to_string())]
    }

    /// Drops the series of a deleted topic, so that `/metrics` does not
    /// report it forever (nor a later topic of the same name inherit them).
    pub fn forget_topic(&self, topic: &str, partitions: u32) {
        let labels = Metrics::topic(topic);
        for family in [
            &self.records_in,
            &self.bytes_in,
            &self.records_out,
            &self.bytes_out,
        ] {
            family.remove(&labels);
        }
        for index in 0..partitions {
            let labels = vec![
                ("topic".to_string(), topic.to_string()),
                ("partition".to_string(), index.to_string()),
            ];
            for family in [
                &self.log_start_offset,
                &self.log_end_offset,
                &self.log_size_bytes,
            ] {
                family.remove(&labels);
            }
            self.cluster.forget(&labels);
        }
    }

    /// The text exposition, with state gauges refreshed from the broker's
    /// connection count, io engine, topics and groups.
    pub fn render(
        &self,
        connections: u64,
        engine: &IoEngine,
        topics: &Topics,
        groups: &Coordinator,
    ) -> String {
        self.connections.set(connections as i64);
        self.io_queue_depth.set(engine.queue_depth() as i64);
        let stats = engine.stats();
        self.fsyncs.set(stats.syncs.load(Ordering::Relaxed) as i64);
        self.fsync_errors
            .set(stats.sync_errors.load(Ordering::Relaxed) as i64);
        self.fsync_seconds_sum
            .set(stats.sync_nanos_total.load(Ordering::Relaxed) as f64 / 1e9);
        let mut cumulative = 0u64;
        for (bucket, count) in stats.sync_latency_buckets.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let le = if bucket + 1 == stats.sync_latency_buckets.len() {
                "+Inf".to_string()
            } else {
                (1u64 << bucket).to_string()
            };
            self.fsync_le_micros
                .get_or_create(&vec![("le".to_string(), le)])
                .set(cumulative as i64);
        }
        for topic in topics.all() {
            for partition in &topic.partitions {
                let labels = vec![
                    ("topic".to_string(), topic.name.clone()),
                    ("partition".to_string(), partition.index.to_string()),
                ];
                self.log_start_offset
                    .get_or_create(&labels)
                    .set(partition.log.start_offset() as i64);
                self.log_end_offset
                    .get_or_create(&labels)
                    .set(partition.log.end_offset() as i64);
                self.log_size_bytes
                    .get_or_create(&labels)
                    .set(partition.log.size_bytes() as i64);
            }
        }
        // Rebuilt each time: groups come and go.
        self.group_members.clear();
        self.group_committed_offset.clear();
        self.group_lag.clear();
        for name in groups.group_names() {
            let request = weir_protocol::message::DescribeGroupRequest {
                group: name.clone(),
            };
            let description = groups.describe(topics, &request);
            self.group_members
                .get_or_create(&vec![("group".to_string(), name.clone())])
                .set(description.members.len() as i64);
            for offset in description.offsets {
                let labels = vec![
                    ("group".to_string(), name.clone()),
                    ("topic".to_string(), offset.topic),
                    ("partition".to_string(), offset.partition.to_string()),
                ];
                self.group_committed_offset
                    .get_or_create(&labels)
                    .set(offset.committed);
                self.group_lag
                    .get_or_create(&labels)
                    .set(i64::try_from(offset.lag).unwrap_or(i64::MAX));
            }
        }
        let mut text = String::new();
        if encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}

/// `CreateTopics` → `create_topics`: an API's name as a metric label.
fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (index, character) in name.chars().enumerate() {
        if character.is_ascii_uppercase() {
            if index > 0 {
                out.push('_');
            }
            out.push(character.to_ascii_lowercase());
        } else {
            out.push(character);
        }
    }
    out
}
