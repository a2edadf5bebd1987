//! The metrics a cluster operator alerts on: partitions under-replicated
//! and offline, in-sync set shrinks and expands, followers' lag, the
//! controller's leadership and metadata offset, and the data directory's
//! free space. Refreshed from the broker's state at each scrape.

use std::path::Path;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::cluster::controller::state_machine::MetadataView;
use crate::topics::Topics;

type Labels = Vec<(String, String)>;

/// The cluster's metrics, registered with the broker's others.
#[derive(Debug, Default)]
pub struct ClusterMetrics {
    partitions_led: Gauge,
    under_replicated_partitions: Gauge,
    offline_partitions: Gauge,
    isr_shrinks: Family<Labels, Counter>,
    isr_expands: Family<Labels, Counter>,
    replica_lag_records: Family<Labels, Gauge>,
    replica_lag_seconds: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    controller_leader: Gauge,
    metadata_applied_index: Gauge,
    disk_free_bytes: Gauge,
    disk_total_bytes: Gauge,
}

impl ClusterMetrics {
    /// Registers every cluster metric in `registry`.
    pub fn register(registry: &mut Registry) -> ClusterMetrics {
        let metrics = ClusterMetrics::default();
        registry.register(
            "partitions_led",
            "Partitions this broker leads",
            metrics.partitions_led.clone(),
        );
        registry.register(
            "under_replicated_partitions",
            "Partitions this broker leads whose in-sync set is smaller than their replica set",
            metrics.under_replicated_partitions.clone(),
        );
        registry.register(
            "offline_partitions",
            "Partitions without a leader, in this broker's copy of the metadata",
            metrics.offline_partitions.clone(),
        );
        registry.register(
            "isr_shrinks",
            "In-sync set shrinks of partitions this broker led when they happened",
            metrics.isr_shrinks.clone(),
        );
        registry.register(
            "isr_expands",
            "In-sync set expansions of partitions this broker led when they happened",
            metrics.isr_expands.clone(),
        );
        registry.register(
            "replica_lag_records",
            "Records this follower is behind its leader's high watermark",
            metrics.replica_lag_records.clone(),
        );
        registry.register(
            "replica_lag_seconds",
            "Seconds since this follower last held everything below its leader's high watermark",
            metrics.replica_lag_seconds.clone(),
        );
        registry.register(
            "controller_leader",
            "1 on the broker whose controller leads the metadata quorum, else 0",
            metrics.controller_leader.clone(),
        );
        registry.register(
            "metadata_applied_index",
            "Index of the last metadata log entry this broker applied",
            metrics.metadata_applied_index.clone(),
        );
        registry.register(
            "disk_free_bytes",
            "Bytes available to the broker on the data directory's filesystem",
            metrics.disk_free_bytes.clone(),
        );
        registry.register(
            "disk_total_bytes",
            "Size of the data directory's filesystem",
            metrics.disk_total_bytes.clone(),
        );
        metrics
    }

    /// Drops the series of a deleted topic's partition.
    pub fn forget(&self, labels: &Labels) {
        self.isr_shrinks.remove(labels);
        self.isr_expands.remove(labels);
    }

    /// Refreshes every gauge and counter from the broker's state.
    pub fn refresh(
        &self,
        topics: &Topics,
        metadata: &MetadataView,
        controller_leads: bool,
        data_dir: &Path,
    ) {
        let now_ms = crate::clock::now_ms();
        let mut led = 0;
        let mut under_replicated = 0;
        // Rebuilt each time: partitions come, go and change roles.
        self.replica_lag_records.clear();
        self.replica_lag_seconds.clear();
        for topic in topics.all() {
            for partition in &topic.partitions {
                let labels = vec![
                    ("topic".to_string(), topic.name.clone()),
                    ("partition".to_string(), partition.index.to_string()),
                ];
                let (shrinks, expands) = partition.isr_changes();
                sync_counter(&self.isr_shrinks, &labels, shrinks);
                sync_counter(&self.isr_expands, &labels, expands);
                if partition.is_leader() {
                    led += 1;
                    // While a partition moves, its replicas are the old and
                    // the new together: it is under-replicated when fewer
                    // are in sync than it will have (as KIP-352 counts).
                    let target = metadata
                        .image
                        .topics
                        .get(&topic.name)
                        .and_then(|image| image.reassigning.get(&partition.index))
                        .map(Vec::len);
                    if partition.state().is_some_and(|state| {
                        state.isr.len() < target.unwrap_or(state.replicas.len())
                    }) {
                        under_replicated += 1;
                    }
                } else if let Some((records, caught_up_ms)) = partition.follower_lag() {
                    self.replica_lag_records
                        .get_or_create(&labels)
                        .set(i64::try_from(records).unwrap_or(i64::MAX));
                    self.replica_lag_seconds
                        .get_or_create(&labels)
                        .set(now_ms.saturating_sub(caught_up_ms) as f64 / 1000.0);
                }
            }
        }
        self.partitions_led.set(led);
        self.under_replicated_partitions.set(under_replicated);
        let offline = metadata
            .image
            .topics
            .values()
            .flat_map(|topic| topic.partitions.iter())
            .filter(|state| state.leader.is_none())
            .count();
        self.offline_partitions.set(offline as i64);
        self.controller_leader.set(i64::from(controller_leads));
        self.metadata_applied_index
            .set(i64::try_from(metadata.applied_index).unwrap_or(i64::MAX));
        if let Some((free, total)) = filesystem_space(data_dir) {
            self.disk_free_bytes
                .set(i64::try_from(free).unwrap_or(i64::MAX));
            self.disk_total_bytes
                .set(i64::try_from(total).unwrap_or(i64::MAX));
        }
    }
}

/// Brings a counter up to `value`, a count kept elsewhere (it only grows).
fn sync_counter(family: &Family<Labels, Counter>, labels: &Labels, value: u64) {
    let counter = family.get_or_create(labels);
    let seen = counter.get();
    if value > seen {
        counter.inc_by(value - seen);
    }
}

/// (bytes available to an unprivileged writer, total bytes) of the
/// filesystem holding `path`.
fn filesystem_space(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is NUL-terminated; statvfs fills `stats` on success.
    let status = unsafe { libc::statvfs(path.as_ptr(), stats.as_mut_ptr()) };
    if status != 0 {
        return None;
    }
    // SAFETY: initialised by the successful call above.
    let stats = unsafe { stats.assume_init() };
    let block = stats.f_frsize;
    Some((stats.f_bavail * block, stats.f_blocks * block))
}
