//! A three-broker cluster's metrics follow what happens to it: one
//! controller leader, the partition's leader counts it as under-replicated
//! while a follower is down (an in-sync shrink) and not once it is back (an
//! expansion), followers report their lag, requests are timed per API, and
//! the data directory's free space is reported.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::metric;
use weir_client::Admin;
use weir_testkit::{Cluster, DEADLINE};

/// Waits until `check` holds, failing after [`DEADLINE`].
fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The partition's leader id and in-sync set, as broker `addr` sees them.
async fn placement(addr: &str) -> Option<(i32, BTreeSet<u32>)> {
    let admin = Admin::connect(addr).await.ok()?;
    let metadata = admin
        .metadata(Some(vec!["watched".to_string()]))
        .await
        .ok()?;
    let partition = metadata.topics.first()?.partitions.first()?.clone();
    Some((
        partition.leader,
        partition.in_sync_replicas.into_iter().collect(),
    ))
}

/// The metrics an operator alerts on move with a follower's death and return.
#[test]
fn cluster_metrics_follow_a_follower_down_and_back() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::start(3, root.path(), &["--segment-bytes", "8388608"]);
    let admin_of = |cluster: &Cluster, index: usize| {
        cluster.brokers[index]
            .as_ref()
            .map(|broker| broker.admin_addr)
            .expect("running")
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let first = cluster.addrs[0].to_string();
    let all: BTreeSet<u32> = [1, 2, 3].into();
    let leader = runtime.block_on(async {
        common::create_replicated_topic(&first, "watched", 1).await;
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some((leader, isr)) = placement(&first).await
                && leader > 0
                && isr == all
            {
                break leader as usize - 1;
            }
            assert!(Instant::now() < deadline, "never all in sync");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    runtime.block_on(common::produce_acknowledged(
        &cluster.bootstrap(),
        "watched",
        100,
    ));

    let leader_admin = admin_of(&cluster, leader);
    let labels = "{topic=\"watched\",partition=\"0\"}";
    // Exactly one controller leader; the partition led once, fully replicated.
    wait_until("one controller leader", || {
        (0..3)
            .map(|index| metric(admin_of(&cluster, index), "weir_controller_leader").unwrap_or(0.0))
            .sum::<f64>()
            == 1.0
    });
    assert_eq!(metric(leader_admin, "weir_partitions_led"), Some(1.0));
    assert_eq!(
        metric(leader_admin, "weir_under_replicated_partitions"),
        Some(0.0)
    );
    assert_eq!(metric(leader_admin, "weir_offline_partitions"), Some(0.0));
    assert!(metric(leader_admin, "weir_metadata_applied_index").is_some_and(|index| index > 0.0));
    assert!(metric(leader_admin, "weir_disk_free_bytes").is_some_and(|free| free > 0.0));
    assert!(
        metric(
            leader_admin,
            "weir_request_latency_seconds_count{api=\"produce\"}"
        )
        .is_some_and(|count| count > 0.0),
        "produce requests are timed"
    );
    let follower = (0..3).find(|index| *index != leader).expect("a follower");
    let other = (0..3)
        .find(|index| *index != leader && *index != follower)
        .expect("another follower");
    wait_until("the follower's lag reported and caught up", || {
        metric(
            admin_of(&cluster, other),
            &format!("weir_replica_lag_records{labels}"),
        ) == Some(0.0)
    });

    // A follower down: the leader reports the partition under-replicated
    // and counts a shrink.
    cluster.kill(follower);
    wait_until("under-replicated on the leader", || {
        metric(leader_admin, "weir_under_replicated_partitions") == Some(1.0)
            && metric(leader_admin, &format!("weir_isr_shrinks_total{labels}"))
                .is_some_and(|shrinks| shrinks >= 1.0)
    });
    // Back: caught up, in sync again, an expansion counted.
    cluster.restart(follower);
    wait_until("fully replicated again", || {
        metric(leader_admin, "weir_under_replicated_partitions") == Some(0.0)
            && metric(leader_admin, &format!("weir_isr_expands_total{labels}"))
                .is_some_and(|expands| expands >= 1.0)
    });
}
