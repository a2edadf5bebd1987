//! Consumer groups through the client (and the `weir` CLI as a consumer
//! process to kill) against the real broker binary.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::BufRead;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use weir_client::{
    Admin, Consumer, ConsumerConfig, GroupConfig, Offset, Producer, ProducerConfig, ProducerRecord,
};
use weir_testkit::{BrokerProcess, DEADLINE, workspace_binary};

fn quick_group() -> GroupConfig {
    GroupConfig {
        session_timeout_ms: 2_000,
        heartbeat_interval_ms: 200,
        reset: Offset::Earliest,
        ..GroupConfig::default()
    }
}

/// Keeps producing numbered records round-robin over `partitions` until
/// stopped; returns how many it produced.
fn start_producer(
    addr: String,
    topic: &'static str,
    partitions: u32,
    stop: Arc<AtomicBool>,
    pause_us: u64,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let producer = Producer::connect(
            &addr,
            ProducerConfig {
                linger_ms: 1,
                ..ProducerConfig::default()
            },
        )
        .await
        .expect("producer");
        let mut number = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let record = ProducerRecord::new(number.to_string())
                .partition((number % u64::from(partitions)) as u32);
            producer.send(topic, record).await.expect("send");
            number += 1;
            if pause_us > 0 {
                tokio::time::sleep(Duration::from_micros(pause_us)).await;
            }
        }
        producer.flush().await.expect("flush");
        number
    })
}

/// The partitions' end offsets.
async fn ends(admin: &Admin, topic: &str, partitions: u32) -> BTreeMap<u32, u64> {
    let mut ends = BTreeMap::new();
    for partition in 0..partitions {
        ends.insert(
            partition,
            admin.list_offset(topic, partition, -1).await.expect("end"),
        );
    }
    ends
}

/// Four consumers of one group under a producer at full speed, each
/// committing synchronously after every batch it processed, with no crash:
/// every record is processed exactly once (rebalances included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_consumers_process_every_record_exactly_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let addr = broker.addr.to_string();
    let admin = Admin::connect(&addr).await.expect("admin");
    admin.create_topic("stream", 8).await.expect("create");
    let stop = Arc::new(AtomicBool::new(false));
    let producer = start_producer(addr.clone(), "stream", 8, stop.clone(), 0);
    let seen: Arc<std::sync::Mutex<Vec<(u32, u64)>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let mut consumers = Vec::new();
    for _ in 0..4 {
        let (addr, seen, done) = (addr.clone(), seen.clone(), done.clone());
        consumers.push(tokio::spawn(async move {
            let mut consumer = Consumer::connect(&addr, ConsumerConfig::default())
                .await
                .expect("consumer");
            consumer
                .subscribe_with(
                    "exact",
                    &["stream"],
                    GroupConfig {
                        auto_commit: false,
                        ..quick_group()
                    },
                    None,
                )
                .await
                .expect("subscribe");
            while !done.load(Ordering::Relaxed) {
                let batch =
                    match tokio::time::timeout(Duration::from_millis(200), consumer.next_batch())
                        .await
                    {
                        Ok(Some(batch)) => batch.expect("batch"),
                        Ok(None) => break,
                        Err(_) => continue,
                    };
                {
                    let mut seen = seen.lock().expect("lock");
                    for record in batch.records() {
                        seen.push((batch.partition(), record.expect("record").offset));
                    }
                }
                // Synchronous commit of what was just processed; a group
                // that moved on refuses it and the batch is not counted
                // twice only if this never happens: assert it.
                consumer
                    .commit_sync()
                    .await
                    .expect("commit of processed records");
            }
            consumer.close().await.expect("close");
        }));
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let produced = producer.await.expect("producer");
    let ends = ends(&admin, "stream", 8).await;
    assert_eq!(ends.values().sum::<u64>(), produced);
    let deadline = Instant::now() + DEADLINE;
    while (seen.lock().expect("lock").len() as u64) < produced {
        assert!(Instant::now() < deadline, "consumers catch up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done.store(true, Ordering::Relaxed);
    for consumer in consumers {
        consumer.await.expect("consumer task");
    }
    let seen = seen.lock().expect("lock").clone();
    let distinct: BTreeSet<(u32, u64)> = seen.iter().copied().collect();
    assert_eq!(distinct.len(), seen.len(), "no record processed twice");
    for (partition, end) in ends {
        assert_eq!(
            distinct.iter().filter(|(p, _)| *p == partition).count() as u64,
            end,
            "every record of partition {partition}"
        );
    }
}

/// A consumer process (`weir consume --group`) killed with SIGKILL loses
/// its partitions to the surviving member within the session timeout; the
/// survivor starts each of them exactly at the last committed offset, and
/// no record is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_consumer_process_hands_over_at_the_last_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let addr = broker.addr.to_string();
    let admin = Admin::connect(&addr).await.expect("admin");
    admin.create_topic("jobs", 4).await.expect("create");
    let stop = Arc::new(AtomicBool::new(false));
    let producer = start_producer(addr.clone(), "jobs", 4, stop.clone(), 500);

    // The process: a group member printing every record as JSON.
    let mut child = std::process::Command::new(workspace_binary("weir"))
        .args(["--broker", &addr, "consume", "jobs", "--group", "workers"])
        .args(["--from", "earliest", "--format", "json"])
        .args([
            "--commit-interval-ms",
            "200",
            "--session-timeout-ms",
            "2000",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start weir consume");
    let printed = Arc::new(std::sync::Mutex::new(Vec::<(u32, u64)>::new()));
    let reader = {
        let printed = printed.clone();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let Ok(record) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                let partition = record["partition"].as_u64().unwrap_or(u64::MAX) as u32;
                let offset = record["offset"].as_u64().unwrap_or(u64::MAX);
                printed.lock().expect("lock").push((partition, offset));
            }
        })
    };

    // The survivor, in this test.
    let mut survivor = Consumer::connect(&addr, ConsumerConfig::default())
        .await
        .expect("consumer");
    survivor
        .subscribe_with("workers", &["jobs"], quick_group(), None)
        .await
        .expect("subscribe");
    let mut received: Vec<(u32, u64)> = Vec::new();
    // Consume until the group is stable with two members and the process
    // has printed (and committed) a good part of its share.
    let deadline = Instant::now() + DEADLINE;
    loop {
        assert!(Instant::now() < deadline, "both members consume");
        if let Ok(Some(record)) =
            tokio::time::timeout(Duration::from_millis(50), survivor.next()).await
        {
            let record = record.expect("record");
            received.push((record.partition, record.offset));
        }
        let description = admin.describe_group("workers").await.expect("describe");
        let printed_count = printed.lock().expect("lock").len();
        let mine: Vec<u32> = survivor.assignment().iter().map(|(_, p)| *p).collect();
        // The process has committed progress on both of its partitions.
        let process_committed = description
            .offsets
            .iter()
            .filter(|offset| !mine.contains(&offset.partition) && offset.committed > 0)
            .count();
        if description.state == "Stable"
            && description.members.len() == 2
            && mine.len() == 2
            && printed_count >= 200
            && process_committed == 2
        {
            break;
        }
    }
    let owned_before: BTreeSet<(String, u32)> = survivor.assignment().into_iter().collect();
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    reader.join().expect("reader");
    let committed: HashMap<(String, u32), i64> = admin
        .group_offsets("workers")
        .await
        .expect("offsets")
        .into_iter()
        .map(|(topic, partition, offset)| ((topic, partition), offset))
        .collect();

    // The survivor goes on; after the session timeout it owns all four.
    let mut first_after: HashMap<u32, u64> = HashMap::new();
    let deadline = Instant::now() + DEADLINE;
    while first_after.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the dead member's partitions move"
        );
        if let Ok(Some(record)) =
            tokio::time::timeout(Duration::from_millis(100), survivor.next()).await
        {
            let record = record.expect("record");
            received.push((record.partition, record.offset));
            if !owned_before.contains(&("jobs".to_string(), record.partition)) {
                first_after.entry(record.partition).or_insert(record.offset);
            }
        }
    }
    assert_eq!(survivor.assignment().len(), 4);
    for (partition, first) in &first_after {
        let last_commit = committed
            .get(&("jobs".to_string(), *partition))
            .copied()
            .unwrap_or(0)
            .max(0) as u64;
        assert_eq!(
            *first, last_commit,
            "partition {partition} resumes at its last commit"
        );
    }
    stop.store(true, Ordering::Relaxed);
    producer.await.expect("producer");
    let ends = ends(&admin, "jobs", 4).await;
    let deadline = Instant::now() + DEADLINE;
    let mut positions_done = false;
    while !positions_done {
        assert!(Instant::now() < deadline, "the survivor catches up");
        if let Ok(Some(record)) =
            tokio::time::timeout(Duration::from_millis(100), survivor.next()).await
        {
            let record = record.expect("record");
            received.push((record.partition, record.offset));
        }
        positions_done = ends
            .iter()
            .all(|(partition, end)| survivor.position("jobs", *partition) == Some(*end));
    }
    let mut all: BTreeSet<(u32, u64)> = printed.lock().expect("lock").iter().copied().collect();
    all.extend(received.iter().copied());
    for (partition, end) in &ends {
        for offset in 0..*end {
            assert!(
                all.contains(&(*partition, offset)),
                "{partition}@{offset} delivered"
            );
        }
    }
}

/// A static member (an instance id) that restarts within its session
/// timeout gets its partitions back without a rebalance: the generation and
/// the other member's assignment stay as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_member_restarts_without_a_rebalance() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let addr = broker.addr.to_string();
    let admin = Admin::connect(&addr).await.expect("admin");
    admin.create_topic("fixed", 4).await.expect("create");
    let static_config = GroupConfig {
        instance_id: Some("billing-1".into()),
        session_timeout_ms: 30_000,
        ..quick_group()
    };
    let mut first = Consumer::connect(&addr, ConsumerConfig::default())
        .await
        .expect("consumer");
    let mut other = Consumer::connect(&addr, ConsumerConfig::default())
        .await
        .expect("consumer");
    let (joined_first, joined_other) = tokio::join!(
        first.subscribe_with("statics", &["fixed"], static_config.clone(), None),
        other.subscribe_with("statics", &["fixed"], quick_group(), None),
    );
    joined_first.expect("subscribe");
    joined_other.expect("subscribe");
    // Let both settle into one generation (a second round if they joined
    // in two).
    let deadline = Instant::now() + DEADLINE;
    let generation = loop {
        assert!(Instant::now() < deadline, "the group settles");
        let _ = tokio::time::timeout(Duration::from_millis(100), first.next()).await;
        let _ = tokio::time::timeout(Duration::from_millis(100), other.next()).await;
        let description = admin.describe_group("statics").await.expect("describe");
        if description.state == "Stable"
            && first.assignment().len() == 2
            && other.assignment().len() == 2
            && first.group_generation().map(|(_, g)| g) == Some(description.generation)
            && other.group_generation().map(|(_, g)| g) == Some(description.generation)
        {
            break description.generation;
        }
    };
    let owned = first.assignment();
    let others = other.assignment();
    // A crash-restart: no LeaveGroup (dropped), then the same instance id.
    drop(first);
    let mut restarted = Consumer::connect(&addr, ConsumerConfig::default())
        .await
        .expect("consumer");
    restarted
        .subscribe_with("statics", &["fixed"], static_config, None)
        .await
        .expect("subscribe");
    assert_eq!(restarted.assignment(), owned, "the same partitions back");
    assert_eq!(
        restarted.group_generation().map(|(_, g)| g),
        Some(generation)
    );
    // The other member is not disturbed for a while of heartbeats.
    for _ in 0..10 {
        let _ = tokio::time::timeout(Duration::from_millis(100), other.next()).await;
    }
    assert_eq!(other.assignment(), others);
    let description = admin.describe_group("statics").await.expect("describe");
    assert_eq!(
        (description.state.as_str(), description.generation),
        ("Stable", generation)
    );
}

/// `weir group list | describe | reset-offsets`: the reset is a dry run
/// without `--execute`, refused (exit 6) while the group has members, and
/// applied once it has none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_lists_describes_and_resets_groups() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let addr = broker.addr.to_string();
    let admin = Admin::connect(&addr).await.expect("admin");
    admin.create_topic("ledger", 2).await.expect("create");
    let producer = Producer::connect(&addr, ProducerConfig::default())
        .await
        .expect("producer");
    for number in 0..20u32 {
        producer
            .send(
                "ledger",
                ProducerRecord::new(number.to_string()).partition(number % 2),
            )
            .await
            .expect("send");
    }
    producer.flush().await.expect("flush");
    let mut consumer = Consumer::connect(&addr, ConsumerConfig::default())
        .await
        .expect("consumer");
    consumer
        .subscribe_with("auditors", &["ledger"], quick_group(), None)
        .await
        .expect("subscribe");
    for _ in 0..20 {
        consumer.next().await.expect("some").expect("record");
    }
    consumer.commit_sync().await.expect("commit");
    let weir = |args: &[&str]| {
        let output = std::process::Command::new(workspace_binary("weir"))
            .args(["--broker", &addr])
            .args(args)
            .output()
            .expect("run weir");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    };
    let (code, out) = weir(&["group", "list"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("auditors\tStable\t1 members"), "{out}");
    let (code, out) = weir(&["group", "describe", "auditors"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("ledger\t0\t10\t10\t0"), "{out}");
    let (code, out) = weir(&[
        "group",
        "reset-offsets",
        "auditors",
        "--topic",
        "ledger",
        "--to",
        "earliest",
    ]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("ledger\t1\t10 -> 0") && out.contains("dry run"),
        "{out}"
    );
    let (code, _) = weir(&[
        "group",
        "reset-offsets",
        "auditors",
        "--topic",
        "ledger",
        "--to",
        "earliest",
        "--execute",
    ]);
    assert_eq!(code, Some(6), "refused while the group has a member");
    let offsets = admin.group_offsets("auditors").await.expect("offsets");
    assert!(
        offsets.iter().all(|(_, _, offset)| *offset == 10),
        "unchanged: {offsets:?}"
    );
    consumer.close().await.expect("close");
    let (code, out) = weir(&[
        "group",
        "reset-offsets",
        "auditors",
        "--topic",
        "ledger",
        "--to",
        "3",
        "--execute",
    ]);
    assert_eq!(code, Some(0), "{out}");
    let offsets = admin.group_offsets("auditors").await.expect("offsets");
    assert_eq!(offsets.len(), 2);
    assert!(
        offsets.iter().all(|(_, _, offset)| *offset == 3),
        "{offsets:?}"
    );
    let (code, _) = weir(&["group", "describe", "nobody"]);
    assert_eq!(code, Some(5), "unknown group");
}

/// Partitions a consumer owns.
type Owned = Vec<(String, u32)>;

/// Records what a consumer's rebalances took and gave.
#[derive(Clone, Default)]
struct Journal {
    revoked: Arc<std::sync::Mutex<Vec<(String, u32)>>>,
}

impl weir_client::RebalanceListener for Journal {
    fn revoked(&mut self, partitions: &[(String, u32)], _: &mut Vec<(String, u32, u64)>) {
        self.revoked
            .lock()
            .expect("lock")
            .extend(partitions.iter().cloned());
    }
}

/// With `cooperative-sticky`, a second member joining takes half of the
/// partitions while the first keeps reading the other half without ever
/// giving them up (it gives up exactly what moves), and every record is
/// processed exactly once across the hand-over (sync commits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cooperative_rebalance_moves_only_what_changes_owner() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let addr = broker.addr.to_string();
    let admin = Admin::connect(&addr).await.expect("admin");
    admin.create_topic("coop", 4).await.expect("create");
    let stop = Arc::new(AtomicBool::new(false));
    let producer = start_producer(addr.clone(), "coop", 4, stop.clone(), 200);
    let config = GroupConfig {
        assignor: "cooperative-sticky".into(),
        auto_commit: false,
        ..quick_group()
    };
    let seen: Arc<std::sync::Mutex<Vec<(u32, u64)>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let journals = [Journal::default(), Journal::default()];
    let assignments: Arc<std::sync::Mutex<[Owned; 2]>> = Arc::default();
    let mut members = Vec::new();
    for (index, journal) in journals.iter().cloned().enumerate() {
        let (addr, seen, done, config) = (addr.clone(), seen.clone(), done.clone(), config.clone());
        let assignments = assignments.clone();
        members.push(tokio::spawn(async move {
            if index == 1 {
                // Join once the first member is reading.
                tokio::time::sleep(Duration::from_millis(1_500)).await;
            }
            let mut consumer = Consumer::connect(&addr, ConsumerConfig::default())
                .await
                .expect("consumer");
            consumer
                .subscribe_with("coop-group", &["coop"], config, Some(Box::new(journal)))
                .await
                .expect("subscribe");
            while !done.load(Ordering::Relaxed) {
                if let Ok(Some(batch)) =
                    tokio::time::timeout(Duration::from_millis(100), consumer.next_batch()).await
                {
                    let batch = batch.expect("batch");
                    {
                        let mut seen = seen.lock().expect("lock");
                        for record in batch.records() {
                            seen.push((batch.partition(), record.expect("record").offset));
                        }
                    }
                    consumer.commit_sync().await.expect("commit");
                }
                assignments.lock().expect("lock")[index] = consumer.assignment();
            }
            consumer.close().await.expect("close");
        }));
    }
    // Until the second member owns its half.
    let deadline = Instant::now() + DEADLINE;
    let first_initial = loop {
        assert!(Instant::now() < deadline, "the group settles on two halves");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let owned = assignments.lock().expect("lock").clone();
        if owned[0].len() == 2 && owned[1].len() == 2 {
            break owned;
        }
    };
    stop.store(true, Ordering::Relaxed);
    let produced = producer.await.expect("producer");
    let deadline = Instant::now() + DEADLINE;
    while (seen.lock().expect("lock").len() as u64) < produced {
        assert!(Instant::now() < deadline, "both catch up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done.store(true, Ordering::Relaxed);
    for member in members {
        member.await.expect("member");
    }
    let revoked: BTreeSet<(String, u32)> = journals[0]
        .revoked
        .lock()
        .expect("lock")
        .iter()
        .cloned()
        .collect();
    let moved: BTreeSet<(String, u32)> = first_initial[1].iter().cloned().collect();
    assert_eq!(
        revoked, moved,
        "the first member gave up exactly what moved"
    );
    assert!(
        journals[1].revoked.lock().expect("lock").is_empty(),
        "the newcomer gave up nothing"
    );
    let seen = seen.lock().expect("lock").clone();
    let distinct: BTreeSet<(u32, u64)> = seen.iter().copied().collect();
    assert_eq!(distinct.len(), seen.len(), "no record processed twice");
    assert_eq!(distinct.len() as u64, produced, "every record processed");
}

/// A group member rides through a kill -9 and restart of its broker (the
/// group's coordinator): it reconnects, rejoins, and reads on from the
/// group's committed offset, so that nothing after the last commit is
/// skipped (records after it come twice: at-least-once, as after any
/// rebalance), and the restarted broker's group has exactly this member.
/// Eager assignor (`range`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_member_rides_through_a_broker_restart() {
    member_rides_through_a_broker_restart("range").await;
}

/// As `a_group_member_rides_through_a_broker_restart`, cooperative-sticky.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cooperative_group_member_rides_through_a_broker_restart() {
    member_rides_through_a_broker_restart("cooperative-sticky").await;
}

async fn member_rides_through_a_broker_restart(assignor: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let listen = broker.addr;
    let addr = listen.to_string();
    let admin = Admin::connect(&addr).await.expect("admin");
    admin.create_topic("steady", 1).await.expect("create");
    let producer = Producer::connect(&addr, ProducerConfig::default())
        .await
        .expect("producer");
    let send = |numbers: std::ops::Range<u32>| {
        let producer = &producer;
        async move {
            for number in numbers {
                producer
                    .send("steady", ProducerRecord::new(number.to_string()))
                    .await
                    .expect("send");
            }
            producer.flush().await.expect("flush");
        }
    };
    send(0..300).await;
    let mut consumer = Consumer::connect(
        &addr,
        ConsumerConfig {
            request_timeout_ms: 5_000,
            reconnect_backoff_ms: 20,
            ..ConsumerConfig::default()
        },
    )
    .await
    .expect("consumer");
    let config = GroupConfig {
        auto_commit: false,
        assignor: assignor.to_string(),
        ..quick_group()
    };
    consumer
        .subscribe_with("steady-readers", &["steady"], config, None)
        .await
        .expect("subscribe");
    async fn next(consumer: &mut Consumer) -> weir_client::ConsumerRecord {
        tokio::time::timeout(DEADLINE, consumer.next())
            .await
            .expect("records keep coming")
            .expect("still a member")
            .expect("no error reaches the application")
    }
    for expected in 0..200u64 {
        assert_eq!(next(&mut consumer).await.offset, expected);
    }
    consumer.commit_sync().await.expect("commit at 200");
    for expected in 200..250u64 {
        assert_eq!(next(&mut consumer).await.offset, expected);
    }

    tokio::task::spawn_blocking(move || broker.kill())
        .await
        .expect("killed");
    let data = dir.path().to_path_buf();
    let broker = tokio::task::spawn_blocking(move || BrokerProcess::start_at(listen, &data, &[]))
        .await
        .expect("restarted");
    send(300..400).await;

    // Without auto-commit (and no listener staging commits) the rejoin
    // commits nothing: it starts from the last commit.
    assert_eq!(
        next(&mut consumer).await.offset,
        200,
        "resumes at the commit"
    );
    for expected in 201..400 {
        assert_eq!(next(&mut consumer).await.offset, expected, "no gap");
    }
    assert_eq!(consumer.assignment(), vec![("steady".to_string(), 0)]);
    let (member, generation) = consumer.group_generation().expect("in the group");
    let description = admin
        .describe_group("steady-readers")
        .await
        .expect("describe (the admin reconnected)");
    assert_eq!(description.generation, generation, "the group knows it");
    assert_eq!(
        description
            .members
            .iter()
            .map(|m| m.member_id.clone())
            .collect::<Vec<_>>(),
        vec![member],
        "the restarted broker's group has exactly this member"
    );
    drop(broker);
}

/// A group member reading through `into_stream()` takes part in rebalances
/// as `next()` does: when a second member joins, the stream's member gives
/// up a partition, and every record produced afterwards reaches exactly one
/// of the two, in order; the consumer is reachable after an abandoned call
/// (and closes cleanly: the other member then takes both partitions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_stream_takes_part_in_rebalances() {
    use futures_core::Stream;
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let addr = broker.addr.to_string();
    let admin = Admin::connect(&addr).await.expect("admin");
    admin.create_topic("streamed", 2).await.expect("create");
    // A long session: an expiry on a loaded machine would rebalance again.
    let config = GroupConfig {
        session_timeout_ms: 10_000,
        ..quick_group()
    };
    let mut first = Consumer::connect(&addr, ConsumerConfig::default())
        .await
        .expect("consumer");
    first
        .subscribe_with("streamers", &["streamed"], config.clone(), None)
        .await
        .expect("subscribe");
    assert_eq!(first.assignment().len(), 2, "alone, it owns both");
    let mut stream = first.into_stream();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (seen, stop) = (seen.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let polled = tokio::time::timeout(
                    Duration::from_millis(100),
                    std::future::poll_fn(|context| {
                        std::pin::Pin::new(&mut stream).poll_next(context)
                    }),
                )
                .await;
                if let Ok(item) = polled {
                    let record = item.expect("stream goes on").expect("record");
                    seen.lock()
                        .expect("lock")
                        .push((record.partition, record.offset));
                }
            }
            stream
        })
    };

    let mut second = Consumer::connect(&addr, ConsumerConfig::default())
        .await
        .expect("consumer");
    tokio::time::timeout(
        DEADLINE,
        second.subscribe_with("streamers", &["streamed"], config, None),
    )
    .await
    .expect("the stream's member rejoins in time")
    .expect("subscribe");
    assert_eq!(
        second.assignment().len(),
        1,
        "the joiner gets one partition"
    );

    let producer = Producer::connect(&addr, ProducerConfig::default())
        .await
        .expect("producer");
    for number in 0..100u32 {
        for partition in 0..2 {
            producer
                .send(
                    "streamed",
                    ProducerRecord::new(number.to_string()).partition(partition),
                )
                .await
                .expect("send");
        }
    }
    producer.flush().await.expect("flush");
    let deadline = Instant::now() + DEADLINE;
    let mut theirs = Vec::new();
    while seen.lock().expect("lock").len() + theirs.len() < 200 {
        assert!(Instant::now() < deadline, "all 200 records arrive");
        assert!(!reader.is_finished(), "the stream's reader goes on");
        if let Ok(item) = tokio::time::timeout(Duration::from_millis(100), second.next()).await {
            let record = item.expect("assigned").expect("record");
            theirs.push((record.partition, record.offset));
        }
    }
    stop.store(true, Ordering::Relaxed);
    // Its last poll was most likely abandoned by the timeout mid-call.
    let stream = reader.await.expect("reader");
    let description = admin.describe_group("streamers").await.expect("describe");
    let owned: Vec<usize> = description
        .members
        .iter()
        .map(|member| member.assignment.len())
        .collect();
    assert_eq!(owned, vec![1, 1], "two members, one partition each");
    let mine: Vec<(u32, u64)> = seen.lock().expect("lock").clone();
    for records in [&mine, &theirs] {
        for partition in 0..2 {
            let offsets: Vec<u64> = records
                .iter()
                .filter(|(p, _)| *p == partition)
                .map(|(_, offset)| *offset)
                .collect();
            assert!(offsets.windows(2).all(|pair| pair[0] < pair[1]), "in order");
        }
    }
    let mut all = mine;
    all.extend(theirs);
    all.sort_unstable();
    let expected: Vec<(u32, u64)> = (0..2)
        .flat_map(|partition| (0..100).map(move |offset| (partition, offset)))
        .collect();
    assert_eq!(all, expected, "each record reaches exactly one member");

    stream.into_consumer().close().await.expect("close");
    let deadline = Instant::now() + DEADLINE;
    while second.assignment().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the closed member's partition moves"
        );
        let _ = tokio::time::timeout(Duration::from_millis(100), second.next()).await;
    }
}

/// A broker of its own whose settings come from `toml` (through
/// `--config`); returns the directory holding its data and settings.
fn broker_with_settings(toml: &str) -> (tempfile::TempDir, BrokerProcess) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weir.toml");
    std::fs::write(&config, toml).expect("config");
    let data = dir.path().join("data");
    let broker = BrokerProcess::start(&data, &["--config", config.to_str().expect("utf-8 path")]);
    (dir, broker)
}

/// Starts the broker of `broker_with_settings` again: same address, data
/// and settings.
async fn restart_with_settings(
    dir: &std::path::Path,
    listen: std::net::SocketAddr,
) -> BrokerProcess {
    let (data, config) = (dir.join("data"), dir.join("weir.toml"));
    tokio::task::spawn_blocking(move || {
        BrokerProcess::start_at(
            listen,
            &data,
            &["--config", config.to_str().expect("utf-8 path")],
        )
    })
    .await
    .expect("restarted")
}

/// Commits never stop, but the offsets log does not grow with them: each
/// retention check snapshots the offsets and deletes the segments below
/// the snapshot; the last commit survives a kill -9 and restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_offsets_log_is_compacted_below_its_snapshot() {
    let (dir, broker) = broker_with_settings(
        "segment_bytes = 1048576\noffsets_topic_partitions = 1\noffsets_segment_bytes = 1048576\nretention_check_ms = 100\n",
    );
    let listen = broker.addr;
    let addr = listen.to_string();
    let admin = Admin::connect(&addr).await.expect("admin");
    admin.create_topic("ledger", 100).await.expect("create");
    // Committed once, before everything below is deleted: only the
    // snapshot remembers it after the restart.
    admin
        .set_group_offsets("early", &[("ledger".to_string(), 5, 42)])
        .await
        .expect("commit");
    // A commit of 100 partitions is about 9 KiB of records: 300 of them
    // fill about three 1 MiB segments.
    for round in 1..=300u64 {
        let offsets: Vec<(String, u32, u64)> = (0..100)
            .map(|partition| ("ledger".to_string(), partition, round))
            .collect();
        admin
            .set_group_offsets("auditors", &offsets)
            .await
            .expect("commit");
    }
    let deadline = Instant::now() + DEADLINE;
    loop {
        let start = admin
            .list_offset(
                "__consumer_offsets",
                0,
                weir_protocol::message::OFFSET_SPEC_EARLIEST,
            )
            .await
            .expect("offsets log start");
        let end = admin
            .list_offset(
                "__consumer_offsets",
                0,
                weir_protocol::message::OFFSET_SPEC_LATEST,
            )
            .await
            .expect("offsets log end");
        assert_eq!(end, 30_001, "one record per committed offset");
        // Everything below the last snapshot goes but the active segment
        // (about 11,000 records of 1 MiB).
        if start > 1 && end - start < 15_000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "compaction keeps only the last segments: {start}..{end}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    tokio::task::spawn_blocking(move || broker.kill())
        .await
        .expect("killed");
    let broker = restart_with_settings(dir.path(), listen).await;
    let mut offsets = admin.group_offsets("auditors").await.expect("offsets");
    offsets.sort();
    let expected: Vec<(String, u32, i64)> = (0..100)
        .map(|partition| ("ledger".to_string(), partition, 300))
        .collect();
    assert_eq!(offsets, expected, "the last commit survives the compaction");
    assert_eq!(
        admin.group_offsets("early").await.expect("offsets"),
        vec![("ledger".to_string(), 5, 42)],
        "a commit whose record was deleted lives on in the snapshot"
    );

    // Without its snapshot, the compacted log cannot stand for the groups:
    // the broker refuses to start rather than forget them.
    tokio::task::spawn_blocking(move || broker.terminate())
        .await
        .expect("stopped");
    let data = dir.path().join("data");
    std::fs::remove_file(
        data.join("__consumer_offsets-0")
            .join("groups-snapshot.json"),
    )
    .expect("remove the snapshot");
    let refused = std::process::Command::new(workspace_binary("weir-broker"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .arg("--config")
        .arg(dir.path().join("weir.toml"))
        .arg("--data-dir")
        .arg(&data)
        .output()
        .expect("run the broker");
    assert!(!refused.status.success(), "the broker must not start");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("no group snapshot"), "says why: {stderr}");

    // The way out OPERATIONS.md gives: remove the partition, losing its
    // groups' offsets, and the broker starts.
    std::fs::remove_dir_all(data.join("__consumer_offsets-0")).expect("remove the partition");
    let broker = restart_with_settings(dir.path(), listen).await;
    let offsets = admin.group_offsets("early").await.expect("offsets");
    assert!(
        offsets.iter().all(|(_, _, offset)| *offset < 0),
        "{offsets:?}"
    );
    drop(broker);
}

/// The offsets of a group that has had no members for
/// `offsets_retention_ms` and no commit within it expire, and stay gone
/// after a restart; a group with a member keeps its offsets however old its
/// last commit, also across the restart (which leaves every group without
/// members for a while: the clock starts there, not at the last commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_of_a_group_without_members_expire() {
    let (dir, broker) =
        broker_with_settings("offsets_retention_ms = 1000\nretention_check_ms = 100\n");
    let listen = broker.addr;
    let addr = listen.to_string();
    let admin = Admin::connect(&addr).await.expect("admin");
    admin.create_topic("aging", 1).await.expect("create");
    let mut member = Consumer::connect(&addr, ConsumerConfig::default())
        .await
        .expect("consumer");
    member
        .subscribe_with(
            "active",
            &["aging"],
            GroupConfig {
                auto_commit: false,
                // Long: an expiry on a loaded machine would empty the group.
                session_timeout_ms: 10_000,
                ..quick_group()
            },
            None,
        )
        .await
        .expect("subscribe");
    member
        .commit_offsets_sync(&[("aging".to_string(), 0, 7)])
        .await
        .expect("commit");
    admin
        .set_group_offsets("abandoned", &[("aging".to_string(), 0, 3)])
        .await
        .expect("commit");
    assert_eq!(
        admin.group_offsets("abandoned").await.expect("offsets"),
        vec![("aging".to_string(), 0, 3)]
    );

    // Gone once the retention has passed; the member's group, still
    // heartbeating (next() keeps it in), stays.
    let gone = |offsets: Vec<(String, u32, i64)>| offsets.iter().all(|(_, _, o)| *o < 0);
    let deadline = Instant::now() + DEADLINE;
    while !gone(admin.group_offsets("abandoned").await.expect("offsets")) {
        assert!(
            Instant::now() < deadline,
            "the abandoned group's offsets expire"
        );
        let _ = tokio::time::timeout(Duration::from_millis(100), member.next()).await;
    }
    for _ in 0..5 {
        let _ = tokio::time::timeout(Duration::from_millis(100), member.next()).await;
    }
    assert_eq!(
        admin.group_offsets("active").await.expect("offsets"),
        vec![("aging".to_string(), 0, 7)],
        "a group with a member keeps its offsets"
    );

    // A clean stop writes the snapshot, which leaves the expired group out.
    tokio::task::spawn_blocking(move || broker.terminate())
        .await
        .expect("stopped");
    let broker = restart_with_settings(dir.path(), listen).await;
    assert!(
        gone(admin.group_offsets("abandoned").await.expect("offsets")),
        "expired offsets stay expired"
    );
    assert_eq!(
        admin.group_offsets("active").await.expect("offsets"),
        vec![("aging".to_string(), 0, 7)],
        "the restart does not expire a group whose member is on its way back"
    );
    // The member reconnects and rejoins; its offsets stay.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let _ = tokio::time::timeout(Duration::from_millis(100), member.next()).await;
        let description = admin.describe_group("active").await.expect("describe");
        if description.members.len() == 1 && description.state == "Stable" {
            break;
        }
        assert!(Instant::now() < deadline, "the member rejoins");
    }
    for _ in 0..15 {
        let _ = tokio::time::timeout(Duration::from_millis(100), member.next()).await;
    }
    assert_eq!(
        admin.group_offsets("active").await.expect("offsets"),
        vec![("aging".to_string(), 0, 7)]
    );
    drop(broker);
}

/// How long a group had been without members survives a clean restart
/// (downtime aside): a group abandoned 4 s before a restart, with a 6 s
/// retention, expires about 2 s after it, not 6.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_neither_resets_nor_skips_a_groups_empty_time() {
    let (dir, broker) =
        broker_with_settings("offsets_retention_ms = 6000\nretention_check_ms = 100\n");
    let listen = broker.addr;
    let addr = listen.to_string();
    let admin = Admin::connect(&addr).await.expect("admin");
    admin.create_topic("paused", 1).await.expect("create");
    admin
        .set_group_offsets("left", &[("paused".to_string(), 0, 9)])
        .await
        .expect("commit");
    tokio::time::sleep(Duration::from_millis(4_000)).await;
    tokio::task::spawn_blocking(move || broker.terminate())
        .await
        .expect("stopped");
    let broker = restart_with_settings(dir.path(), listen).await;
    let restarted = Instant::now();
    assert_eq!(
        admin.group_offsets("left").await.expect("offsets"),
        vec![("paused".to_string(), 0, 9)],
        "not expired by the restart"
    );
    loop {
        let offsets = admin.group_offsets("left").await.expect("offsets");
        if offsets.iter().all(|(_, _, offset)| *offset < 0) {
            break;
        }
        assert!(
            restarted.elapsed() < Duration::from_millis(4_000),
            "expires about 2 s after the restart (6 s if the restart had reset its clock)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(broker);
}
