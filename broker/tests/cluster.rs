//! Three real broker processes on loopback, every one a controller voter:
//! replication with acks=all survives kill -9 of the leader (a producer
//! and a consumer bootstrapped from the broker list follow the new
//! leader without an error reaching the application), a follower
//! that was killed catches up and rejoins the in-sync set, replicas end
//! with identical bytes, with two of three brokers down nothing is
//! acknowledged, and a group's committed offsets outlive its coordinator.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use weir_client::{
    Acks, Admin, Consumer, ConsumerConfig, GroupConfig, Offset, Producer, ProducerConfig,
    ProducerRecord,
};
use weir_testkit::{Cluster, DEADLINE};

/// Small segments: each partition of each broker preallocates one.
const FLAGS: &[&str] = &["--segment-bytes", "8388608"];

/// One partition as some broker's metadata shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Placement {
    leader: i32,
    leader_epoch: i32,
    isr: BTreeSet<u32>,
}

/// The partitions of `topic` as the broker at `addr` sees them, in order;
/// `None` if it does not answer within 5 s.
async fn topic_partitions(
    addr: &str,
    topic: &str,
) -> Option<Vec<weir_protocol::message::PartitionMetadata>> {
    let admin = tokio::time::timeout(Duration::from_secs(5), Admin::connect(addr))
        .await
        .ok()?
        .ok()?;
    let metadata = tokio::time::timeout(
        Duration::from_secs(5),
        admin.metadata(Some(vec![topic.to_string()])),
    )
    .await
    .ok()?
    .ok()?;
    let mut states = metadata.topics.first()?.partitions.clone();
    states.sort_by_key(|state| state.partition);
    Some(states)
}

async fn placement(addr: &str, topic: &str, partition: u32) -> Option<Placement> {
    let state = topic_partitions(addr, topic)
        .await?
        .into_iter()
        .find(|state| state.partition == partition)?;
    Some(Placement {
        leader: state.leader,
        leader_epoch: state.leader_epoch,
        isr: state.in_sync_replicas.into_iter().collect(),
    })
}

/// Polls `check` until it yields, failing the test after [`DEADLINE`].
async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Three brokers under `root` sharing the settings `toml` (a config file
/// written there).
fn cluster_with_settings(root: &Path, toml: &str) -> Cluster {
    let config = root.join("weir.toml");
    std::fs::write(&config, toml).expect("config");
    let config = config.to_str().expect("utf-8 path").to_string();
    Cluster::start(3, root, &["--config", &config])
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Creates `topic` (one partition, three replicas) once the cluster takes
/// writes, and waits for a leader with all three in sync.
async fn create_replicated(cluster: &Cluster, topic: &str) -> Placement {
    let first = cluster.addrs[0].to_string();
    wait_for("a writable cluster", || async {
        let admin = Admin::connect(&first).await.ok()?;
        admin.create_topic_replicated(topic, 1, 3).await.ok()
    })
    .await;
    let all: BTreeSet<u32> = [1, 2, 3].into();
    wait_for("a leader with all replicas in sync", || async {
        placement(&first, topic, 0)
            .await
            .filter(|placement| placement.leader > 0 && placement.isr == all)
    })
    .await
}

fn acks_all() -> ProducerConfig {
    ProducerConfig {
        acks: Acks::All,
        linger_ms: 1,
        batch_bytes: 4 * 1024,
        delivery_timeout_ms: 10_000,
        ..ProducerConfig::default()
    }
}

/// Sends `values` through `producer` and returns them once all are
/// acknowledged.
async fn produce_all(producer: &Producer, topic: &str, values: &[String]) -> Vec<String> {
    let mut deliveries = Vec::new();
    for value in values {
        let record = ProducerRecord::new(value.clone()).partition(0);
        deliveries.push(producer.send(topic, record).await.expect("send"));
    }
    producer.flush().await.expect("flush");
    for delivery in deliveries {
        delivery.await.expect("acknowledged");
    }
    values.to_vec()
}

/// Every value of partition 0, read through `addr` (a bootstrap list).
async fn read_all(addr: &str, topic: &str, expected: usize) -> Vec<String> {
    let mut consumer = Consumer::connect(addr, ConsumerConfig::default())
        .await
        .expect("consumer");
    consumer
        .assign(topic, 0, Offset::Earliest)
        .await
        .expect("assign");
    next_values(&mut consumer, expected).await
}

/// The next `count` values `consumer` returns; any error fails the test.
async fn next_values(consumer: &mut Consumer, count: usize) -> Vec<String> {
    let mut values = Vec::new();
    while values.len() < count {
        let record = tokio::time::timeout(DEADLINE, consumer.next())
            .await
            .expect("records keep coming")
            .expect("assigned")
            .expect("record");
        let value = record.value.expect("value");
        values.push(String::from_utf8(value.to_vec()).expect("utf-8"));
    }
    values
}

/// The valid batches at the head of a partition's segment files (the
/// preallocated rest is zeros).
fn log_bytes(data_dir: &Path, topic: &str) -> Vec<u8> {
    let dir = data_dir.join(format!("{topic}-0"));
    let mut segments: Vec<_> = std::fs::read_dir(&dir)
        .expect("partition dir")
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
        .collect();
    segments.sort();
    let mut all = Vec::new();
    for segment in segments {
        let bytes = std::fs::read(&segment).expect("segment");
        let mut valid = 0;
        for batch in weir_protocol::Batches::new(&bytes, true) {
            match batch {
                Ok(batch) => valid += batch.len(),
                Err(_) => break,
            }
        }
        all.extend_from_slice(&bytes[..valid]);
    }
    all
}

/// Kill -9 of the leader under acks=all: a new leader is elected from the
/// in-sync set, producing goes on there, every acknowledged record is
/// readable once and in order, the killed broker comes back, truncates or
/// catches up, rejoins the in-sync set, and the three logs are identical.
#[test]
fn leader_kill_loses_no_acknowledged_record() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::start(3, root.path(), FLAGS);
    let runtime = runtime();
    runtime.block_on(async {
        let before = create_replicated(&cluster, "events").await;
        let all: BTreeSet<u32> = [1, 2, 3].into();
        let leader_index = before.leader as usize - 1;
        // Bootstrapped from all three: it finds the leader itself, and the
        // next one after the kill.
        let producer = Producer::connect(&cluster.bootstrap(), acks_all())
            .await
            .expect("producer");
        let first_half: Vec<String> = (0..300).map(|n| format!("value-{n}")).collect();
        let mut acknowledged = produce_all(&producer, "events", &first_half).await;
        // A consumer bootstrapped at a follower reads from the leader, and
        // follows it across the kill without an error reaching it.
        let follower_first = format!(
            "{},{}",
            cluster.addrs[(leader_index + 1) % 3],
            cluster.bootstrap()
        );
        let mut consumer = Consumer::connect(&follower_first, ConsumerConfig::default())
            .await
            .expect("consumer");
        consumer
            .assign("events", 0, Offset::Earliest)
            .await
            .expect("assign");
        let mut consumed = next_values(&mut consumer, first_half.len()).await;

        cluster.kill(leader_index);
        let survivor = cluster.addrs[(leader_index + 1) % 3].to_string();
        let after = wait_for("a new leader", || async {
            placement(&survivor, "events", 0)
                .await
                .filter(|placement| placement.leader > 0 && placement.leader != before.leader)
        })
        .await;
        assert!(after.leader_epoch > before.leader_epoch);
        let new_leader = cluster.addrs[after.leader as usize - 1].to_string();
        let second_half: Vec<String> = (300..600).map(|n| format!("value-{n}")).collect();
        acknowledged.extend(produce_all(&producer, "events", &second_half).await);
        consumed.extend(next_values(&mut consumer, second_half.len()).await);
        assert_eq!(
            consumed, acknowledged,
            "the consumer read every acknowledged record once, in order, across the kill"
        );

        // Bootstrapped from a list whose first broker is the dead one.
        let every_broker = cluster
            .addrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let read = read_all(&every_broker, "events", acknowledged.len()).await;
        assert_eq!(
            read, acknowledged,
            "every acknowledged record, once, in order"
        );

        cluster.restart(leader_index);
        wait_for("the killed broker back in sync", || async {
            placement(&new_leader, "events", 0)
                .await
                .filter(|placement| placement.isr == all)
        })
        .await;
    });
    // In sync means caught up to the leader's end at some fetch; with no
    // more writes, each replica reaches the same end shortly after.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let logs: Vec<Vec<u8>> = (0..3)
            .map(|index| log_bytes(&cluster.data_dir(index), "events"))
            .collect();
        if logs[0] == logs[1] && logs[1] == logs[2] {
            assert!(!logs[0].is_empty());
            break;
        }
        assert!(Instant::now() < deadline, "replica logs differ");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// With both followers of an RF=3 topic killed, an acks=all produce is not
/// acknowledged (the in-sync set cannot shrink below two without the
/// controller, and min.insync.replicas is 2); once one follower is back,
/// the same producer's records are acknowledged and readable.
#[test]
fn two_followers_down_acknowledges_nothing() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::start(3, root.path(), FLAGS);
    let runtime = runtime();
    runtime.block_on(async {
        let placed = create_replicated(&cluster, "guarded").await;
        let leader_index = placed.leader as usize - 1;
        let leader_addr = cluster.addrs[leader_index].to_string();
        let followers: Vec<usize> = (0..3).filter(|index| *index != leader_index).collect();
        // Connected (with its producer id) while the quorum is up.
        let producer = Producer::connect(
            &leader_addr,
            ProducerConfig {
                delivery_timeout_ms: 3_000,
                request_timeout_ms: 2_000,
                ..acks_all()
            },
        )
        .await
        .expect("producer");
        for follower in &followers {
            cluster.kill(*follower);
        }
        let refused = producer
            .send("guarded", ProducerRecord::new("lonely").partition(0))
            .await
            .expect("send")
            .await;
        assert!(
            refused.is_err(),
            "acknowledged with two replicas down: {refused:?}"
        );

        cluster.restart(followers[0]);
        let producer = Producer::connect(&cluster.bootstrap(), acks_all())
            .await
            .expect("producer");
        let values: Vec<String> = (0..50).map(|n| format!("after-{n}")).collect();
        let acknowledged = produce_all(&producer, "guarded", &values).await;
        let leader = wait_for("a leader", || async {
            placement(&cluster.addrs[followers[0]].to_string(), "guarded", 0)
                .await
                .filter(|placement| placement.leader > 0)
        })
        .await;
        // The refused record may or may not have survived (it was never
        // acknowledged): read on to the last acknowledged one.
        let leader_addr = cluster.addrs[leader.leader as usize - 1].to_string();
        let mut expected = acknowledged.len();
        let read = loop {
            let read = read_all(&leader_addr, "guarded", expected).await;
            if read.last() == acknowledged.last() {
                break read;
            }
            expected += 1;
        };
        let without_refused: Vec<String> =
            read.into_iter().filter(|value| value != "lonely").collect();
        assert_eq!(without_refused, acknowledged);
    });
}

/// Kill -9 of the broker coordinating a consumer group: the offsets it
/// acknowledged are served by the new coordinator (the new leader of the
/// group's `__consumer_offsets` partition), and the member finds it,
/// rejoins and reads on from the committed offset without an error
/// reaching the application.
#[test]
fn coordinator_kill_keeps_committed_offsets() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::start(3, root.path(), FLAGS);
    let runtime = runtime();
    runtime.block_on(async {
        create_replicated(&cluster, "work").await;
        let producer = Producer::connect(&cluster.bootstrap(), acks_all())
            .await
            .expect("producer");
        let first: Vec<String> = (0..100).map(|n| format!("value-{n}")).collect();
        produce_all(&producer, "work", &first).await;

        let mut member = Consumer::connect(&cluster.bootstrap(), ConsumerConfig::default())
            .await
            .expect("consumer");
        let config = GroupConfig {
            auto_commit: false,
            reset: Offset::Earliest,
            ..GroupConfig::default()
        };
        member
            .subscribe_with("billing", &["work"], config, None)
            .await
            .expect("subscribe");
        let read = next_values(&mut member, 50).await;
        assert_eq!(read, first[..50]);
        member.commit_sync().await.expect("commit");

        // The coordinator is the leader of the group's offsets partition.
        let offsets_partition = weir_broker::groups::offsets_partition("billing", 8);
        let first_addr = cluster.addrs[0].to_string();
        let coordinator = wait_for("an offsets partition leader with all in sync", || async {
            placement(&first_addr, "__consumer_offsets", offsets_partition)
                .await
                .filter(|placement| placement.leader > 0 && placement.isr.len() == 3)
        })
        .await;
        let coordinator_index = coordinator.leader as usize - 1;
        cluster.kill(coordinator_index);

        let survivors = cluster.bootstrap();
        let admin = Admin::connect(&survivors).await.expect("admin");
        let committed = wait_for("the new coordinator", || async {
            admin.group_offsets("billing").await.ok()
        })
        .await;
        assert_eq!(
            committed,
            vec![("work".to_string(), 0, 50)],
            "the acknowledged commit survives its coordinator"
        );

        let second: Vec<String> = (100..150).map(|n| format!("value-{n}")).collect();
        produce_all(&producer, "work", &second).await;
        // Rejoined as a new member, it starts at the committed offset.
        let rest = next_values(&mut member, 100).await;
        let expected: Vec<String> = first[50..].iter().chain(&second).cloned().collect();
        assert_eq!(
            rest, expected,
            "read on from the committed offset, in order"
        );
        member
            .commit_sync()
            .await
            .expect("commit at the new coordinator");
        assert_eq!(
            admin.group_offsets("billing").await.expect("offsets"),
            vec![("work".to_string(), 0, 150)]
        );
    });
}

/// Every partition of `topic` as the broker at `addr` sees it: (leader,
/// replicas, in-sync set).
async fn partitions(addr: &str, topic: &str) -> Option<Vec<(i32, Vec<u32>, BTreeSet<u32>)>> {
    Some(
        topic_partitions(addr, topic)
            .await?
            .into_iter()
            .map(|state| {
                (
                    state.leader,
                    state.replicas,
                    state.in_sync_replicas.into_iter().collect(),
                )
            })
            .collect(),
    )
}

/// A rolling restart of all three brokers with SIGTERM (a controlled
/// shutdown moves each broker's leaderships away before it stops) under an
/// idempotent acks=all producer and a consumer: neither sees an error,
/// every acknowledged record is read once and in order, and once all are
/// back each partition is led by its preferred replica again.
#[test]
fn rolling_restart_gives_clients_no_error() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut cluster = cluster_with_settings(
        root.path(),
        "segment_bytes = 8388608\nleader_rebalance_interval_ms = 500\n",
    );
    let runtime = runtime();
    runtime.block_on(async {
        let first = cluster.addrs[0].to_string();
        wait_for("a writable cluster", || async {
            let admin = Admin::connect(&first).await.ok()?;
            admin.create_topic_replicated("rolling", 3, 3).await.ok()
        })
        .await;
        let live = first_live(&cluster);
        wait_for("every partition led with all in sync", || {
            all_in_sync(&live, "rolling")
        })
        .await;

        let bootstrap = cluster
            .addrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let producer = Producer::connect(
            &bootstrap,
            ProducerConfig {
                delivery_timeout_ms: 30_000,
                ..acks_all()
            },
        )
        .await
        .expect("producer");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sending = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut deliveries = Vec::new();
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Acquire) {
                    let partition = (n % 3) as u32;
                    let value = format!("{partition}-{n}");
                    let record = ProducerRecord::new(value.clone()).partition(partition);
                    let delivery = producer.send("rolling", record).await.expect("send");
                    deliveries.push((partition, value, delivery));
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                producer.flush().await.expect("flush");
                let mut acknowledged: Vec<Vec<String>> = vec![Vec::new(); 3];
                for (partition, value, delivery) in deliveries {
                    if let Err(error) = delivery.await {
                        panic!("{value} not acknowledged: {error}");
                    }
                    acknowledged[partition as usize].push(value);
                }
                acknowledged
            })
        };
        let mut consumer = Consumer::connect(&bootstrap, ConsumerConfig::default())
            .await
            .expect("consumer");
        for partition in 0..3 {
            consumer
                .assign("rolling", partition, Offset::Earliest)
                .await
                .expect("assign");
        }
        let reading = tokio::spawn(async move {
            let mut read: Vec<Vec<String>> = vec![Vec::new(); 3];
            loop {
                let record = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await;
                let Ok(record) = record else {
                    // Nothing for 5 s: the producer has stopped.
                    return read;
                };
                let record = record.expect("assigned").expect("no error while reading");
                let value =
                    String::from_utf8(record.value.expect("value").to_vec()).expect("utf-8");
                read[record.partition as usize].push(value);
            }
        });

        for index in 0..3 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let status = cluster.terminate(index).expect("running");
            assert!(
                status.success(),
                "broker {} stopped cleanly: {status}",
                index + 1
            );
            cluster.restart(index);
            let live = first_live(&cluster);
            wait_for("all back in sync after the restart", || {
                all_in_sync(&live, "rolling")
            })
            .await;
        }
        let live = first_live(&cluster);
        wait_for("preferred leaders restored", || async {
            partitions(&live, "rolling").await.filter(|states| {
                states.iter().all(|(leader, replicas, _)| {
                    replicas.first().map(|id| *id as i32) == Some(*leader)
                })
            })
        })
        .await;
        stop.store(true, std::sync::atomic::Ordering::Release);
        let acknowledged = sending.await.expect("producer task");
        let read = reading.await.expect("consumer task");
        assert!(acknowledged.iter().all(|values| !values.is_empty()));
        assert_eq!(
            read, acknowledged,
            "every acknowledged record read once, in order, per partition"
        );
    });
}

/// `Some` once every partition of `topic` has a leader and all three
/// replicas in sync.
async fn all_in_sync(addr: &str, topic: &str) -> Option<()> {
    let all: BTreeSet<u32> = [1, 2, 3].into();
    partitions(addr, topic)
        .await
        .filter(|states| {
            !states.is_empty()
                && states
                    .iter()
                    .all(|(leader, _, isr)| *leader > 0 && *isr == all)
        })
        .map(|_| ())
}

/// The address of the first broker of `cluster` that is running.
fn first_live(cluster: &Cluster) -> String {
    cluster
        .bootstrap()
        .split(',')
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Kill -9 of the controller quorum's leader: the other two voters elect a
/// new one and metadata goes on (a topic is created and takes acknowledged
/// writes), and the killed broker registers again when it returns and
/// rejoins the in-sync set of the topic it replicated.
#[test]
fn controller_leader_kill_keeps_metadata_going() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::start(3, root.path(), FLAGS);
    let runtime = runtime();
    runtime.block_on(async {
        create_replicated(&cluster, "before").await;
        let first = cluster.addrs[0].to_string();
        let controller = wait_for("a controller leader", || async {
            let admin = Admin::connect(&first).await.ok()?;
            let metadata = admin.metadata(Some(Vec::new())).await.ok()?;
            u32::try_from(metadata.controller_id)
                .ok()
                .filter(|id| *id > 0)
        })
        .await;
        let killed = controller as usize - 1;
        cluster.kill(killed);

        let survivor = cluster.addrs[(killed + 1) % 3].to_string();
        let successor = wait_for("a new controller leader", || async {
            let admin = Admin::connect(&survivor).await.ok()?;
            let metadata = admin.metadata(Some(Vec::new())).await.ok()?;
            u32::try_from(metadata.controller_id)
                .ok()
                .filter(|id| *id > 0 && *id != controller)
        })
        .await;
        assert_ne!(successor, controller);
        wait_for("the killed broker shown fenced", || async {
            let admin = Admin::connect(&survivor).await.ok()?;
            let metadata = admin.metadata(Some(Vec::new())).await.ok()?;
            metadata.fenced_brokers.contains(&controller).then_some(())
        })
        .await;
        // Two brokers are left: two replicas.
        wait_for("a topic created after the kill", || async {
            let admin = Admin::connect(&survivor).await.ok()?;
            admin.create_topic_replicated("after", 1, 2).await.ok()
        })
        .await;
        let producer = Producer::connect(&cluster.bootstrap(), acks_all())
            .await
            .expect("producer");
        let values: Vec<String> = (0..50).map(|n| format!("after-{n}")).collect();
        let acknowledged = produce_all(&producer, "after", &values).await;
        let read = read_all(&cluster.bootstrap(), "after", acknowledged.len()).await;
        assert_eq!(read, acknowledged);

        cluster.restart(killed);
        let all: BTreeSet<u32> = [1, 2, 3].into();
        wait_for("the returned broker back in sync", || async {
            placement(&survivor, "before", 0)
                .await
                .filter(|placement| placement.isr == all)
        })
        .await;
    });
}

/// A follower that was down while its leader's retention deleted
/// everything past the follower's end cannot fetch on from where it
/// stopped: it starts its log over at the leader's log start, catches up
/// and rejoins the in-sync set.
#[test]
fn follower_behind_the_leaders_log_start_starts_over() {
    let root = tempfile::tempdir().expect("tempdir");
    // 1 MiB segments, about two kept: retention runs ahead of a follower
    // that misses a few MiB.
    let mut cluster = cluster_with_settings(
        root.path(),
        "segment_bytes = 1048576\nretention_bytes = 2097152\nretention_check_ms = 100\n",
    );
    let runtime = runtime();
    runtime.block_on(async {
        let placed = create_replicated(&cluster, "short").await;
        let leader_index = placed.leader as usize - 1;
        let follower = (leader_index + 1) % 3;
        let producer = Producer::connect(&cluster.bootstrap(), acks_all())
            .await
            .expect("producer");
        let small: Vec<String> = (0..100).map(|n| format!("early-{n}")).collect();
        produce_all(&producer, "short", &small).await;
        cluster.kill(follower);

        // About 8 MiB while it is away, in 4 KiB values.
        let filler = "x".repeat(4096);
        let values: Vec<String> = (0..2_000).map(|n| format!("{n}-{filler}")).collect();
        produce_all(&producer, "short", &values).await;
        let leader_addr = cluster.addrs[leader_index].to_string();
        let admin = Admin::connect(&leader_addr).await.expect("admin");
        wait_for("the leader's retention past the follower's end", || async {
            let start = admin
                .list_offset("short", 0, weir_protocol::message::OFFSET_SPEC_EARLIEST)
                .await
                .ok()?;
            (start > 100).then_some(start)
        })
        .await;

        cluster.restart(follower);
        let all: BTreeSet<u32> = [1, 2, 3].into();
        wait_for("the follower back in sync", || async {
            placement(&leader_addr, "short", 0)
                .await
                .filter(|placement| placement.isr == all)
        })
        .await;
    });
}

/// `weir partition reassign` moves an RF=2 partition from brokers {a, b}
/// to {b, c} under an idempotent acks=all producer: the producer sees no
/// error, the move completes once c is in sync, every acknowledged record
/// is readable afterwards, and a's copy is deleted.
#[test]
fn reassignment_moves_a_partition_without_stopping_it() {
    let root = tempfile::tempdir().expect("tempdir");
    let cluster = Cluster::start(3, root.path(), FLAGS);
    let runtime = runtime();
    runtime.block_on(async {
        let first = cluster.addrs[0].to_string();
        // All three registered and unfenced: the move needs the third.
        wait_for("three live brokers", || async {
            let admin = Admin::connect(&first).await.ok()?;
            let metadata = admin.metadata(Some(Vec::new())).await.ok()?;
            (metadata.brokers.len() == 3).then_some(())
        })
        .await;
        wait_for("a writable cluster", || async {
            let admin = Admin::connect(&first).await.ok()?;
            admin.create_topic_replicated("moving", 1, 2).await.ok()
        })
        .await;
        let replicas = wait_for("a leader with both replicas in sync", || async {
            topic_partitions(&first, "moving").await.and_then(|states| {
                let state = states.first()?.clone();
                (state.leader > 0 && state.in_sync_replicas.len() == 2).then_some(state.replicas)
            })
        })
        .await;
        let (leaving, staying) = (replicas[0], replicas[1]);
        let arriving = (1..=3)
            .find(|id| !replicas.contains(id))
            .expect("a third broker");

        let producer = Producer::connect(&cluster.bootstrap(), acks_all())
            .await
            .expect("producer");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sending = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut deliveries = Vec::new();
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Acquire) || n < 500 {
                    let value = format!("moving-{n}");
                    let record = ProducerRecord::new(value.clone()).partition(0);
                    deliveries.push((value, producer.send("moving", record).await.expect("send")));
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                producer.flush().await.expect("flush");
                let mut acknowledged = Vec::new();
                for (value, delivery) in deliveries {
                    if let Err(error) = delivery.await {
                        panic!("{value} not acknowledged: {error}");
                    }
                    acknowledged.push(value);
                }
                acknowledged
            })
        };

        let target = format!("{staying},{arriving}");
        let bootstrap = cluster.bootstrap();
        let cli = weir_testkit::workspace_binary("weir");
        let output = tokio::task::spawn_blocking(move || {
            std::process::Command::new(cli)
                .args(["--broker", &bootstrap, "partition", "reassign", "moving"])
                .args([
                    "--partition",
                    "0",
                    "--replicas",
                    &target,
                    "--timeout-s",
                    "60",
                ])
                .output()
                .expect("run weir")
        })
        .await
        .expect("cli");
        assert!(
            output.status.success(),
            "weir partition reassign: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let after = topic_partitions(&first, "moving")
            .await
            .expect("metadata")
            .remove(0);
        assert_eq!(after.replicas, vec![staying, arriving]);
        let leader = u32::try_from(after.leader).expect("a leader");
        assert!(leader == staying || leader == arriving, "{after:?}");

        stop.store(true, std::sync::atomic::Ordering::Release);
        let acknowledged = sending.await.expect("producer task");
        let read = read_all(&cluster.bootstrap(), "moving", acknowledged.len()).await;
        assert_eq!(
            read, acknowledged,
            "every acknowledged record, once, in order"
        );
        let leaving_dir = cluster.data_dir(leaving as usize - 1);
        wait_for("the old replica's copy deleted", || async {
            log_bytes(&leaving_dir, "moving").is_empty().then_some(())
        })
        .await;
    });
}

/// Offsets a coordinator expired stay expired when another broker takes
/// the group over: the expiry is written to the offsets log as tombstones,
/// which the next coordinator replays (it has no snapshot of its own).
#[test]
fn expired_offsets_stay_expired_after_the_coordinator_moves() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut cluster = cluster_with_settings(
        root.path(),
        "segment_bytes = 8388608\noffsets_retention_ms = 3000\nretention_check_ms = 100\n",
    );
    let runtime = runtime();
    runtime.block_on(async {
        create_replicated(&cluster, "aging").await;
        let admin = Admin::connect(&cluster.bootstrap()).await.expect("admin");
        admin
            .set_group_offsets("abandoned", &[("aging".to_string(), 0, 3)])
            .await
            .expect("commit");
        let expired = |offsets: &[(String, u32, i64)]| offsets.iter().all(|(_, _, o)| *o < 0);
        wait_for("the abandoned group's offsets expired", || async {
            let offsets = admin.group_offsets("abandoned").await.ok()?;
            expired(&offsets).then_some(())
        })
        .await;

        let offsets_partition = weir_broker::groups::offsets_partition("abandoned", 8);
        let first = cluster.addrs[0].to_string();
        let coordinator = wait_for("the offsets partition in sync", || async {
            placement(&first, "__consumer_offsets", offsets_partition)
                .await
                .filter(|placement| placement.leader > 0 && placement.isr.len() == 3)
        })
        .await;
        cluster.kill(coordinator.leader as usize - 1);
        let survivors = Admin::connect(&cluster.bootstrap()).await.expect("admin");
        // The first answer of the new coordinator, well within the
        // retention a resurrected commit would get again.
        let offsets = wait_for("the new coordinator", || async {
            survivors.group_offsets("abandoned").await.ok()
        })
        .await;
        assert!(
            expired(&offsets),
            "expired offsets came back at the new coordinator: {offsets:?}"
        );
    });
}

/// Horizontal scaling: a fourth broker started with the cluster's voter
/// list (which does not name it) follows the metadata log as a learner,
/// registers, and takes a partition moved onto it with all the records the
/// others hold; producing and reading go on through it.
#[test]
fn a_new_broker_joins_and_takes_a_partition() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::start(3, root.path(), FLAGS);
    let runtime = runtime();
    runtime.block_on(async {
        create_replicated(&cluster, "grow").await;
        let producer = Producer::connect(&cluster.bootstrap(), acks_all())
            .await
            .expect("producer");
        let first: Vec<String> = (0..100).map(|n| format!("grow-{n}")).collect();
        let mut acknowledged = produce_all(&producer, "grow", &first).await;

        let added = cluster.add_broker();
        let new_id = added as u32 + 1;
        let first_addr = cluster.addrs[0].to_string();
        wait_for("the new broker registered and live", || async {
            let admin = Admin::connect(&first_addr).await.ok()?;
            let metadata = admin.metadata(Some(Vec::new())).await.ok()?;
            metadata
                .brokers
                .iter()
                .any(|broker| broker.id == new_id)
                .then_some(())
        })
        .await;
        let admin = Admin::connect(&cluster.bootstrap()).await.expect("admin");
        let target = [new_id, 1, 2];
        admin
            .reassign_partition("grow", 0, &target)
            .await
            .expect("reassign");
        admin
            .wait_for_replicas("grow", 0, &target, Duration::from_secs(60))
            .await
            .expect("moved onto the new broker");

        let second: Vec<String> = (100..200).map(|n| format!("grow-{n}")).collect();
        acknowledged.extend(produce_all(&producer, "grow", &second).await);
        let read = read_all(&cluster.bootstrap(), "grow", acknowledged.len()).await;
        assert_eq!(read, acknowledged);
        let (new_dir, old_dir) = (cluster.data_dir(added), cluster.data_dir(0));
        wait_for("the new broker's copy equal to the others'", || async {
            let copy = log_bytes(&new_dir, "grow");
            (!copy.is_empty() && copy == log_bytes(&old_dir, "grow")).then_some(())
        })
        .await;
    });
}
