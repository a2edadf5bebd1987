//! The client against the real `weir-broker` binary on a free loopback port.

use std::collections::HashMap;
use std::time::Duration;

use weir_client::partitioner::partition_for_key;
use weir_client::{
    Admin, ClientError, Compression, Consumer, ConsumerConfig, Offset, Producer, ProducerConfig,
    ProducerRecord,
};
use weir_testkit::{BrokerProcess, DEADLINE};

/// A broker process on free ports with its own data directory.
struct Broker {
    /// Held so the process lives as long as the test (killed on drop).
    _process: BrokerProcess,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Broker {
    fn start() -> Broker {
        let dir = tempfile::tempdir().expect("tempdir");
        let process = BrokerProcess::start(dir.path(), &[]);
        Broker {
            addr: process.addr.to_string(),
            _process: process,
            _dir: dir,
        }
    }
}

/// Admin creates, lists, describes and deletes topics, with typed errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_manages_topics() {
    let broker = Broker::start();
    let admin = Admin::connect(&broker.addr).await.expect("connect");
    admin.create_topic("orders", 3).await.expect("create");
    assert!(matches!(
        admin.create_topic("orders", 3).await,
        Err(ClientError::Broker(
            weir_protocol::ErrorCode::TopicAlreadyExists
        ))
    ));
    assert!(matches!(
        admin.create_topic("bad name!", 1).await,
        Err(ClientError::Broker(weir_protocol::ErrorCode::InvalidTopic))
    ));
    let topics = admin.list_topics().await.expect("list");
    assert_eq!(topics.len(), 1);
    assert_eq!(topics[0].partitions.len(), 3);
    let description = admin.describe_topic("orders").await.expect("describe");
    assert_eq!(description.partitions.len(), 3);
    assert!(matches!(
        admin.describe_topic("nope").await,
        Err(ClientError::UnknownTopic(_))
    ));
    admin.delete_topic("orders").await.expect("delete");
    assert!(admin.list_topics().await.expect("list").is_empty());
    assert!(matches!(
        admin.delete_topic("orders").await,
        Err(ClientError::UnknownTopic(_))
    ));
}

/// Records produced with each compression arrive once, in order per
/// partition, keyed records on Kafka's murmur2 partition, and every delivery
/// reports the offset the consumer then sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_and_consume_with_each_compression() {
    let broker = Broker::start();
    let admin = Admin::connect(&broker.addr).await.expect("connect");
    for (index, compression) in [Compression::None, Compression::Lz4, Compression::Zstd]
        .into_iter()
        .enumerate()
    {
        let topic = format!("t{index}");
        admin.create_topic(&topic, 4).await.expect("create");
        let producer = Producer::connect(
            &broker.addr,
            ProducerConfig {
                compression,
                batch_bytes: 16 * 1024,
                buffer_bytes: 256 * 1024,
                ..ProducerConfig::default()
            },
        )
        .await
        .expect("producer");
        let mut deliveries = Vec::new();
        for number in 0..3000u32 {
            let value = format!("value-{number}");
            let record = if number % 2 == 0 {
                ProducerRecord::new(value.clone()).key(format!("key-{}", number % 50))
            } else {
                ProducerRecord::new(value.clone())
            };
            deliveries.push((number, producer.send(&topic, record).await.expect("send")));
        }
        producer.flush().await.expect("flush");
        let mut placed: HashMap<(u32, u64), String> = HashMap::new();
        for (number, delivery) in deliveries {
            let delivery = delivery.await.expect("delivered");
            if number % 2 == 0 {
                assert_eq!(
                    delivery.partition,
                    partition_for_key(format!("key-{}", number % 50).as_bytes(), 4)
                );
            }
            assert!(
                placed
                    .insert(
                        (delivery.partition, delivery.offset as u64),
                        format!("value-{number}")
                    )
                    .is_none()
            );
        }
        let mut consumer = Consumer::connect(
            &broker.addr,
            ConsumerConfig {
                credit_bytes: 64 * 1024,
                ..ConsumerConfig::default()
            },
        )
        .await
        .expect("consumer");
        for partition in 0..4 {
            consumer
                .assign(&topic, partition, Offset::Earliest)
                .await
                .expect("assign");
        }
        let mut seen: HashMap<(u32, u64), String> = HashMap::new();
        let mut last_offset: HashMap<u32, u64> = HashMap::new();
        while seen.len() < 3000 {
            let record = tokio::time::timeout(Duration::from_secs(60), consumer.next())
                .await
                .expect("records keep coming")
                .expect("assigned")
                .expect("record");
            if let Some(previous) = last_offset.insert(record.partition, record.offset) {
                assert_eq!(
                    record.offset,
                    previous + 1,
                    "{compression:?}: order within a partition"
                );
            }
            let value = String::from_utf8(record.value.expect("value").to_vec()).expect("utf8");
            seen.insert((record.partition, record.offset), value);
        }
        assert_eq!(
            seen, placed,
            "{compression:?}: exactly the delivered records"
        );
    }
}

/// A consumer seeks to an offset and to a timestamp.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_seeks_by_offset_and_timestamp() {
    let broker = Broker::start();
    let admin = Admin::connect(&broker.addr).await.expect("connect");
    admin.create_topic("clock", 1).await.expect("create");
    let producer = Producer::connect(&broker.addr, ProducerConfig::default())
        .await
        .expect("producer");
    for number in 0..100i64 {
        producer
            .send(
                "clock",
                ProducerRecord::new(format!("{number}"))
                    .timestamp_ms(10_000 + number * 10)
                    .partition(0),
            )
            .await
            .expect("send");
    }
    producer.flush().await.expect("flush");
    let mut consumer = Consumer::connect(&broker.addr, ConsumerConfig::default())
        .await
        .expect("consumer");
    consumer
        .assign("clock", 0, Offset::At(42))
        .await
        .expect("assign");
    let record = consumer.next().await.expect("some").expect("record");
    assert_eq!(
        (record.offset, record.value.as_deref()),
        (42, Some(&b"42"[..]))
    );
    consumer
        .seek("clock", 0, Offset::Timestamp(10_000 + 75 * 10 - 5))
        .await
        .expect("seek");
    let record = consumer.next().await.expect("some").expect("record");
    assert_eq!(record.offset, 75);
    assert_eq!(record.timestamp_ms, 10_750);
    consumer
        .seek("clock", 0, Offset::Latest)
        .await
        .expect("seek");
    assert_eq!(consumer.position("clock", 0), Some(100));
}

/// With several batches in flight per partition, records still land in the
/// order they were sent (the broker appends a connection's batches in
/// arrival order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_batches_in_flight_keep_order() {
    let broker = Broker::start();
    Admin::connect(&broker.addr)
        .await
        .expect("connect")
        .create_topic("seq", 1)
        .await
        .expect("create");
    let producer = Producer::connect(
        &broker.addr,
        ProducerConfig {
            batch_bytes: 4 * 1024,
            in_flight_per_partition: Some(8),
            ..ProducerConfig::default()
        },
    )
    .await
    .expect("producer");
    let mut deliveries = Vec::new();
    for number in 0..5000u32 {
        deliveries.push(
            producer
                .send("seq", ProducerRecord::new(number.to_string()))
                .await
                .expect("send"),
        );
    }
    producer.flush().await.expect("flush");
    for (number, delivery) in deliveries.into_iter().enumerate() {
        let delivery = delivery.await.expect("delivered");
        assert_eq!(delivery.offset, number as i64, "offsets follow send order");
    }
    let mut consumer = Consumer::connect(&broker.addr, ConsumerConfig::default())
        .await
        .expect("consumer");
    consumer
        .assign("seq", 0, Offset::Earliest)
        .await
        .expect("assign");
    for number in 0..5000u32 {
        let record = consumer.next().await.expect("some").expect("record");
        assert_eq!(record.value.as_deref(), Some(number.to_string().as_bytes()));
    }
}

/// `next_batch` hands out checked, decompressed chunks whose borrowed
/// records continue exactly where record-at-a-time reading stopped: every
/// offset once, in order, with its value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_consumption_continues_after_single_records() {
    let broker = Broker::start();
    Admin::connect(&broker.addr)
        .await
        .expect("connect")
        .create_topic("chunks", 1)
        .await
        .expect("create");
    for compression in [Compression::None, Compression::Lz4] {
        let producer = Producer::connect(
            &broker.addr,
            ProducerConfig {
                compression,
                batch_bytes: 8 * 1024,
                ..ProducerConfig::default()
            },
        )
        .await
        .expect("producer");
        for number in 0..1000u32 {
            producer
                .send("chunks", ProducerRecord::new(format!("{number:0>100}")))
                .await
                .expect("send");
        }
        producer.flush().await.expect("flush");
    }
    let mut consumer = Consumer::connect(
        &broker.addr,
        ConsumerConfig {
            credit_bytes: 32 * 1024,
            ..ConsumerConfig::default()
        },
    )
    .await
    .expect("consumer");
    consumer
        .assign("chunks", 0, Offset::Earliest)
        .await
        .expect("assign");
    for expected in 0..7u64 {
        let record = consumer.next().await.expect("some").expect("record");
        assert_eq!(record.offset, expected);
    }
    let mut next_offset = 7u64;
    let mut chunks = 0;
    while next_offset < 2000 {
        let batch = tokio::time::timeout(Duration::from_secs(60), consumer.next_batch())
            .await
            .expect("chunks keep coming")
            .expect("assigned")
            .expect("chunk");
        assert_eq!((batch.topic(), batch.partition()), ("chunks", 0));
        chunks += 1;
        for record in batch.records() {
            let record = record.expect("record");
            assert_eq!(record.offset, next_offset, "every offset once, in order");
            let expected = format!("{:0>100}", next_offset % 1000);
            assert_eq!(record.value, Some(expected.as_bytes()));
            next_offset += 1;
        }
        assert_eq!(batch.next_offset(), next_offset);
        assert_eq!(consumer.position("chunks", 0), Some(next_offset));
    }
    assert!(
        chunks > 1,
        "credit of 32 KiB splits 2000 records into chunks"
    );
}

/// SIGTERM with acks=all produces in flight and a long poll waiting: the
/// long poll is answered at once (not after its 600 s wait), the broker
/// exits cleanly, and after a restart every acknowledged record is there
/// at the offset its delivery reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_restart_with_traffic_in_flight() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use weir_client::connection::Connection;
    use weir_protocol::message::{FetchPartition, FetchRequest};
    use weir_protocol::{Request, Response};

    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let config = dir.path().join("weir.toml");
    std::fs::write(
        &config,
        "fetch_wait_ms_max = 600000\nshutdown_grace_ms = 600000\n",
    )
    .expect("config");
    let config_arg = config.to_str().expect("utf-8 path").to_string();
    let process = BrokerProcess::start(&data, &["--config", &config_arg]);
    let addr = process.addr.to_string();
    Admin::connect(&addr)
        .await
        .expect("connect")
        .create_topic("live", 2)
        .await
        .expect("create");

    // A long poll on an empty partition, asking to wait 600 s.
    let poller = Connection::connect(&addr, Duration::from_secs(900))
        .await
        .expect("connect");
    let long_poll = tokio::spawn(async move {
        poller
            .call(Request::Fetch(FetchRequest {
                max_wait_ms: 600_000,
                min_bytes: 1,
                max_bytes: 1 << 20,
                partitions: vec![FetchPartition {
                    topic: "live".into(),
                    partition: 1,
                    fetch_offset: 0,
                    partition_max_bytes: 1 << 20,
                }],
            }))
            .await
    });

    // A producer that keeps sending until told to stop.
    let producer = Producer::connect(
        &addr,
        ProducerConfig {
            batch_bytes: 16 * 1024,
            linger_ms: 1,
            retries: 0,
            ..ProducerConfig::default()
        },
    )
    .await
    .expect("producer");
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(AtomicU64::new(0));
    let sender = {
        let stop = stop.clone();
        let acknowledged = acknowledged.clone();
        tokio::spawn(async move {
            let mut deliveries = Vec::new();
            let mut number = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let value = format!("live-{number}");
                let record = ProducerRecord::new(value.clone()).partition(0);
                let Ok(Ok(delivery)) =
                    tokio::time::timeout(Duration::from_secs(1), producer.send("live", record))
                        .await
                else {
                    break;
                };
                deliveries.push((value, delivery));
                number += 1;
                if number.is_multiple_of(64) {
                    // Count what has been acknowledged so far, without waiting.
                    let done = deliveries
                        .iter_mut()
                        .filter(|(_, delivery)| delivery.is_resolved())
                        .count();
                    acknowledged.store(done as u64, Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
            }
            deliveries
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while acknowledged.load(Ordering::Relaxed) < 2000 {
        assert!(
            std::time::Instant::now() < deadline,
            "producer makes progress"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let stopping = std::time::Instant::now();
    let status = tokio::task::spawn_blocking(move || process.terminate())
        .await
        .expect("terminate");
    let exit_took = stopping.elapsed();
    assert!(status.success(), "SIGTERM exits cleanly: {status:?}");
    assert!(
        exit_took < Duration::from_secs(120),
        "the long poll did not hold shutdown for its 600 s ({exit_took:?})"
    );
    assert!(data.join("live-0").join("clean-shutdown").exists());
    match long_poll.await.expect("poll task") {
        Ok(Response::Fetch(response)) => {
            assert!(
                response.partitions[0].records.is_empty(),
                "nothing to fetch"
            );
        }
        other => panic!("the long poll is answered, not dropped: {other:?}"),
    }
    stop.store(true, Ordering::Relaxed);
    let deliveries = sender.await.expect("sender");
    let mut acked = HashMap::new();
    for (value, delivery) in deliveries {
        if let Ok(delivery) = tokio::time::timeout(Duration::from_secs(60), delivery)
            .await
            .expect("every delivery resolves")
        {
            acked.insert(delivery.offset as u64, value);
        }
    }
    assert!(acked.len() >= 2000, "{} acknowledged", acked.len());

    let process = BrokerProcess::start(&data, &["--config", &config_arg]);
    let mut consumer = Consumer::connect(&process.addr.to_string(), ConsumerConfig::default())
        .await
        .expect("consumer");
    consumer
        .assign("live", 0, Offset::Earliest)
        .await
        .expect("assign");
    let last = *acked.keys().max().expect("some acknowledged");
    let mut found = 0;
    loop {
        let record = tokio::time::timeout(Duration::from_secs(60), consumer.next())
            .await
            .expect("acknowledged records are readable")
            .expect("assigned")
            .expect("record");
        if let Some(value) = acked.get(&record.offset) {
            assert_eq!(record.value.as_deref(), Some(value.as_bytes()));
            found += 1;
        }
        if record.offset >= last {
            break;
        }
    }
    assert_eq!(found, acked.len(), "every acknowledged record survived");
}

/// A partition whose data this client cannot read (here a batch damaged
/// on disk, in a sealed segment that a clean restart trusts) is given up
/// with an error naming where reading stopped and the batch that failed,
/// never skipped silently; deleting a topic ends its subscriptions with
/// UnknownTopic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_data_and_deleted_topics_end_the_assignment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = ["--segment-bytes", "65536"];
    let process = BrokerProcess::start(dir.path(), &args);
    let addr = process.addr;
    {
        let admin = Admin::connect(&addr.to_string()).await.expect("connect");
        admin.create_topic("flipped", 1).await.expect("create");
        let producer = Producer::connect(
            &addr.to_string(),
            ProducerConfig {
                batch_bytes: 4096,
                ..ProducerConfig::default()
            },
        )
        .await
        .expect("producer");
        for number in 0..1000u32 {
            let value = format!("value-{number}-{}", "x".repeat(200));
            // Acknowledged by the flush below.
            drop(
                producer
                    .send("flipped", ProducerRecord::new(value))
                    .await
                    .expect("send"),
            );
        }
        producer.flush().await.expect("flush");
    }
    assert!(process.terminate().success(), "a clean shutdown");
    // Flip a byte inside the records of the third batch of the first
    // (sealed) segment: its CRC no longer matches.
    let segment = dir.path().join("flipped-0").join(format!("{:020}.log", 0));
    let mut bytes = std::fs::read(&segment).expect("read segment");
    let (damaged_at, damaged_base) = {
        let batches: Vec<_> = weir_protocol::Batches::new(&bytes, false)
            .map_while(Result::ok)
            .map(|batch| (batch.len(), batch.base_offset()))
            .collect();
        assert!(batches.len() > 3, "several batches in the first segment");
        let position: usize = batches[..2].iter().map(|(len, _)| len).sum();
        (
            position + weir_protocol::batch::BATCH_HEADER_BYTES + 20,
            batches[2].1,
        )
    };
    assert!(damaged_base > 0);
    bytes[damaged_at] ^= 0x55;
    std::fs::write(&segment, &bytes).expect("write segment");
    let _process = BrokerProcess::start_at(addr, dir.path(), &args);
    let addr = addr.to_string();
    let admin = Admin::connect(&addr).await.expect("connect");
    admin.create_topic("doomed", 1).await.expect("create");

    let mut consumer = Consumer::connect(&addr, ConsumerConfig::default())
        .await
        .expect("consumer");
    consumer
        .assign("flipped", 0, Offset::Earliest)
        .await
        .expect("assign");
    let error = loop {
        let item = tokio::time::timeout(Duration::from_secs(60), consumer.next())
            .await
            .expect("answered")
            .expect("an item");
        match item {
            Ok(record) => assert!(record.offset < damaged_base, "nothing past the damage"),
            Err(error) => break error,
        }
    };
    let message = error.to_string();
    assert!(
        message.contains("flipped/0 unassigned at offset"),
        "{message}"
    );
    assert!(
        message.contains(&format!("the batch at offset {damaged_base}")),
        "names the damaged batch: {message}"
    );
    assert_eq!(consumer.position("flipped", 0), None, "given up");
    assert!(consumer.next().await.is_none(), "nothing assigned any more");

    consumer
        .assign("doomed", 0, Offset::Earliest)
        .await
        .expect("assign");
    admin.delete_topic("doomed").await.expect("delete");
    let ended = tokio::time::timeout(Duration::from_secs(60), consumer.next())
        .await
        .expect("the deletion reaches the subscription")
        .expect("an item");
    assert!(
        matches!(
            ended,
            Err(ClientError::Broker(
                weir_protocol::ErrorCode::UnknownTopicOrPartition
            ))
        ),
        "{ended:?}"
    );
}

/// Retries forced by a proxy that swallows every fifth produce response
/// (the broker did append those batches) leave no duplicate: every record
/// is in the log exactly once, at the offset its delivery reported, in the
/// order sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_batches_are_not_duplicated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let process = BrokerProcess::start(dir.path(), &[]);
    let direct = process.addr.to_string();
    Admin::connect(&direct)
        .await
        .expect("connect")
        .create_topic("once", 1)
        .await
        .expect("create");
    let proxy =
        weir_testkit::DroppingProxy::start(process.addr, weir_protocol::ApiKey::Produce.code(), 5);
    let producer = Producer::connect(
        &proxy.addr.to_string(),
        ProducerConfig {
            batch_bytes: 1024,
            linger_ms: 0,
            request_timeout_ms: 1_000,
            retries: 30,
            retry_backoff_ms: 10,
            ..ProducerConfig::default()
        },
    )
    .await
    .expect("producer");
    assert!(producer.identity().is_some(), "idempotent by default");
    let mut deliveries = Vec::new();
    for number in 0..2000u32 {
        deliveries.push(
            producer
                .send("once", ProducerRecord::new(number.to_string()))
                .await
                .expect("send"),
        );
    }
    producer.flush().await.expect("flush");
    for (number, delivery) in deliveries.into_iter().enumerate() {
        let delivery = delivery.await.expect("delivered");
        assert_eq!(delivery.offset, number as i64, "offset of record {number}");
    }
    let dropped = proxy.dropped.load(std::sync::atomic::Ordering::Relaxed);
    assert!(dropped >= 5, "responses swallowed: {dropped}");

    assert_holds_numbers_once(&direct, "once", 2000).await;
}

/// A producer rides through a broker killed with SIGKILL and restarted on
/// the same address: it reconnects, its retried batches keep their sequence
/// numbers, and every record lands exactly once, at the offset its delivery
/// reported, in the order sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_rides_through_a_broker_restart() {
    let (dir, process, addr) = killable_broker_with("restart", 1).await;
    let listen = process.addr;
    let producer = Producer::connect(
        &addr,
        ProducerConfig {
            batch_bytes: 1024,
            linger_ms: 0,
            request_timeout_ms: 5_000,
            retries: 60,
            retry_backoff_ms: 50,
            ..ProducerConfig::default()
        },
    )
    .await
    .expect("producer");
    let mut deliveries = Vec::new();
    send_numbers(&producer, "restart", 0..500u32, &mut deliveries).await;
    producer.flush().await.expect("flush before the kill");

    // Kill the broker, keep sending while it is down, then bring it back
    // on the same address with the same data.
    let killing = tokio::task::spawn_blocking(move || process.kill());
    send_numbers(&producer, "restart", 500..1000u32, &mut deliveries).await;
    killing.await.expect("killed");
    let data = dir.path().to_path_buf();
    let process = tokio::task::spawn_blocking(move || BrokerProcess::start_at(listen, &data, &[]))
        .await
        .expect("restarted");
    send_numbers(&producer, "restart", 1000..1500u32, &mut deliveries).await;
    tokio::time::timeout(Duration::from_secs(120), producer.flush())
        .await
        .expect("flush finishes")
        .expect("flush");
    for (number, delivery) in deliveries.into_iter().enumerate() {
        let delivery = delivery.await.expect("delivered despite the restart");
        assert_eq!(delivery.offset, number as i64, "offset of record {number}");
    }

    assert_holds_numbers_once(&addr, "restart", 1500).await;
    drop(process);
}

/// A consumer reading record by record, and an admin, ride through a kill -9
/// and restart of their broker: the consumer reconnects, resubscribes each
/// partition where the application left off (mid-chunk included) and goes
/// on to records produced after the restart, seeing every offset exactly
/// once and in order; a consumer waiting in `next()` when the broker dies
/// resumes the same way, and so does one reading with `next_batch()`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_and_an_admin_ride_through_a_broker_restart() {
    let (dir, process, addr) = killable_broker_with("replayed", 2).await;
    let listen = process.addr;
    let admin = Admin::connect(&addr).await.expect("connect");
    let producer = Producer::connect(
        &addr,
        ProducerConfig {
            batch_bytes: 4096,
            linger_ms: 0,
            request_timeout_ms: 5_000,
            ..ProducerConfig::default()
        },
    )
    .await
    .expect("producer");
    /// Sends each number to both partitions, its value the number.
    async fn send(producer: &Producer, numbers: std::ops::Range<u32>) {
        for number in numbers {
            for partition in 0..2 {
                producer
                    .send(
                        "replayed",
                        ProducerRecord::new(number.to_string()).partition(partition),
                    )
                    .await
                    .expect("send");
            }
        }
        tokio::time::timeout(DEADLINE * 2, producer.flush())
            .await
            .expect("flush finishes")
            .expect("flush");
    }
    send(&producer, 0..600).await;

    let config = ConsumerConfig {
        // Small pushes: the kill likely finds a chunk half handed out.
        credit_bytes: 8 * 1024,
        request_timeout_ms: 5_000,
        reconnect_backoff_ms: 20,
        ..ConsumerConfig::default()
    };
    let mut consumer = consumer_from_start(&addr, config.clone(), "replayed", 0..2).await;
    // A second consumer reads partition 1 a chunk at a time.
    let mut batches = consumer_from_start(&addr, config, "replayed", 1..2).await;
    let mut batch_next = 0u64;
    let mut read_batches_until = async |batches: &mut Consumer, end: u64| {
        while batch_next < end {
            let batch = tokio::time::timeout(DEADLINE, batches.next_batch())
                .await
                .expect("batches keep coming")
                .expect("still assigned")
                .expect("no error reaches the application");
            for record in batch.records() {
                let record = record.expect("record");
                assert_eq!(record.offset, batch_next, "every offset once, in order");
                assert_eq!(record.value, Some(batch_next.to_string().as_bytes()));
                batch_next += 1;
            }
        }
    };
    read_batches_until(&mut batches, 300).await;
    let mut next_expected = [0u64; 2];
    let take = |next_expected: &mut [u64; 2], record: weir_client::ConsumerRecord| {
        let partition = record.partition as usize;
        assert_eq!(
            record.offset, next_expected[partition],
            "partition {partition}: every offset once, in order"
        );
        assert_eq!(
            record.value.as_deref(),
            Some(record.offset.to_string().as_bytes())
        );
        next_expected[partition] += 1;
    };
    for _ in 0..500 {
        let record = tokio::time::timeout(DEADLINE, consumer.next())
            .await
            .expect("records keep coming")
            .expect("assigned")
            .expect("record");
        take(&mut next_expected, record);
    }

    let killing = tokio::task::spawn_blocking(move || process.kill());
    killing.await.expect("killed");
    let data = dir.path().to_path_buf();
    let process = tokio::task::spawn_blocking(move || BrokerProcess::start_at(listen, &data, &[]))
        .await
        .expect("restarted");
    send(&producer, 600..900).await;

    while next_expected.iter().any(|next| *next < 900) {
        let record = tokio::time::timeout(DEADLINE, consumer.next())
            .await
            .expect("records keep coming after the restart")
            .expect("still assigned")
            .expect("no error reaches the application");
        take(&mut next_expected, record);
    }
    assert_eq!(next_expected, [900, 900]);
    read_batches_until(&mut batches, 900).await;

    // Caught up and waiting in next(): the loss is noticed there.
    let restart_and_send = async {
        tokio::task::spawn_blocking(move || process.kill())
            .await
            .expect("killed again");
        let data = dir.path().to_path_buf();
        let process =
            tokio::task::spawn_blocking(move || BrokerProcess::start_at(listen, &data, &[]))
                .await
                .expect("restarted again");
        send(&producer, 900..901).await;
        process
    };
    let (waited, process) = tokio::join!(
        tokio::time::timeout(DEADLINE, consumer.next()),
        restart_and_send
    );
    let record = waited
        .expect("the waiting consumer resumes")
        .expect("still assigned")
        .expect("no error reaches the application");
    take(&mut next_expected, record);
    let record = tokio::time::timeout(DEADLINE, consumer.next())
        .await
        .expect("records keep coming")
        .expect("still assigned")
        .expect("record");
    take(&mut next_expected, record);
    assert_eq!(next_expected, [901, 901]);
    read_batches_until(&mut batches, 901).await;
    for partition in 0..2 {
        let end = admin
            .list_offset(
                "replayed",
                partition,
                weir_protocol::message::OFFSET_SPEC_LATEST,
            )
            .await
            .expect("the admin reconnected");
        assert_eq!(end, 901);
    }
    drop(process);
}

/// A restarted broker whose one connection slot another socket holds
/// refuses the consumer (answering and closing), which keeps trying,
/// reports nothing to the application meanwhile, and resumes exactly where
/// it was once the slot frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_waits_out_a_broker_that_refuses_it() {
    let (dir, process, addr) = killable_broker_with("refused", 1).await;
    let listen = process.addr;
    let producer = Producer::connect(&addr, ProducerConfig::default())
        .await
        .expect("producer");
    let mut deliveries = Vec::new();
    send_numbers(&producer, "refused", 0..100, &mut deliveries).await;
    producer.flush().await.expect("flush");
    drop(producer);
    let mut consumer = consumer_from_start(
        &addr,
        ConsumerConfig {
            reconnect_backoff_ms: 20,
            request_timeout_ms: 5_000,
            ..ConsumerConfig::default()
        },
        "refused",
        0..1,
    )
    .await;
    for expected in 0..50u64 {
        let record = tokio::time::timeout(DEADLINE, consumer.next())
            .await
            .expect("records keep coming")
            .expect("assigned")
            .expect("record");
        assert_eq!(record.offset, expected);
    }

    tokio::task::spawn_blocking(move || process.kill())
        .await
        .expect("killed");
    let data = dir.path().to_path_buf();
    let process = tokio::task::spawn_blocking(move || {
        BrokerProcess::start_at(listen, &data, &["--connections-max", "1"])
    })
    .await
    .expect("restarted");
    // Whoever connects first gets the only slot: this socket, before the
    // consumer is next polled.
    let hog = tokio::net::TcpStream::connect(listen)
        .await
        .expect("hog connects");
    let waited = tokio::time::timeout(Duration::from_millis(1_500), consumer.next()).await;
    assert!(
        waited.is_err(),
        "refused, the consumer keeps trying and reports nothing: {waited:?}"
    );
    drop(hog);
    for expected in 50..100u64 {
        let record = tokio::time::timeout(DEADLINE, consumer.next())
            .await
            .expect("records come once the slot is free")
            .expect("still assigned")
            .expect("no error reaches the application");
        assert_eq!(record.offset, expected, "resumes exactly where it was");
    }
    drop(process);
}

/// Against an address that accepts connections but never answers, each
/// reconnect attempt outlasts the application's 100 ms wait around
/// `next()`; attempts cut short still count, so the consumer still gives up
/// after `reconnect_timeout_ms` and says so; one awaited to the end gives
/// up near that timeout too (not after a request timeout per attempt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_gives_up_on_a_broker_that_never_answers() {
    let (_dir, process, addr) = killable_broker_with("silent", 1).await;
    let listen = process.addr;
    let config = ConsumerConfig {
        request_timeout_ms: 10_000,
        reconnect_timeout_ms: 1_000,
        reconnect_backoff_ms: 50,
        ..ConsumerConfig::default()
    };
    let mut consumer = consumer_from_start(&addr, config.clone(), "silent", 0..1).await;
    // And one whose next() is awaited to the end.
    let mut patient = consumer_from_start(&addr, config, "silent", 0..1).await;
    tokio::task::spawn_blocking(move || process.kill())
        .await
        .expect("killed");
    // Takes the broker's address: accepts, keeps every socket, says nothing.
    let silent = tokio::net::TcpListener::bind(listen)
        .await
        .expect("bind the broker's address");
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    assert_gives_up_under_short_waits(&mut consumer).await;
    // Attempts get what is left of the reconnect timeout (at least 1 s),
    // not a 10 s request timeout each for the connect and the Handshake.
    let started = std::time::Instant::now();
    let outcome = tokio::time::timeout(DEADLINE, patient.next())
        .await
        .expect("answers")
        .expect("reports the loss");
    assert!(
        matches!(outcome, Err(ClientError::Connect { .. })),
        "{outcome:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "gives up near its reconnect timeout: {:?}",
        started.elapsed()
    );
    holder.abort();
}

/// Calls `next()` the way applications with a poll loop do, abandoning
/// each call after 100 ms, until it answers; the answer must be the
/// connect error of a consumer that gave up, with nothing left assigned.
async fn assert_gives_up_under_short_waits(consumer: &mut Consumer) {
    let deadline = std::time::Instant::now() + DEADLINE;
    let outcome = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "gives up within the deadline"
        );
        if let Ok(outcome) = tokio::time::timeout(Duration::from_millis(100), consumer.next()).await
        {
            break outcome.expect("reports the loss");
        }
    };
    assert!(
        matches!(outcome, Err(ClientError::Connect { .. })),
        "{outcome:?}"
    );
    assert!(consumer.assignment().is_empty());
}

/// With its broker gone for good, a consumer stops trying to reconnect
/// after `reconnect_timeout_ms`, even when each `next()` is abandoned after
/// 100 ms: it reports the connection error once, then ends, since nothing
/// is assigned any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_reports_a_broker_gone_for_good() {
    let (_dir, process, addr) = killable_broker_with("abandoned", 1).await;
    let mut consumer = consumer_from_start(
        &addr,
        ConsumerConfig {
            reconnect_timeout_ms: 1_000,
            reconnect_backoff_ms: 50,
            ..ConsumerConfig::default()
        },
        "abandoned",
        0..1,
    )
    .await;
    tokio::task::spawn_blocking(move || process.kill())
        .await
        .expect("killed");
    // The reconnect clock keeps running across the abandoned calls.
    assert_gives_up_under_short_waits(&mut consumer).await;
    let after = tokio::time::timeout(DEADLINE, consumer.next())
        .await
        .expect("ends at once");
    assert!(after.is_none(), "{after:?}");
}

/// With its broker gone for good, a batch fails once its delivery timeout
/// has passed (not after minutes of retries), and the idempotent producer
/// then refuses further records; a producer without acknowledgements is
/// never idempotent (a refused batch would go unreported).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_fails_after_its_delivery_timeout() {
    let (_dir, process, addr) = killable_broker_with("gone", 1).await;
    let unacknowledged = Producer::connect(
        &addr,
        ProducerConfig {
            acks: weir_client::Acks::None,
            ..ProducerConfig::default()
        },
    )
    .await
    .expect("producer");
    assert_eq!(unacknowledged.identity(), None, "acks=0 is not idempotent");
    let producer = Producer::connect(
        &addr,
        ProducerConfig {
            linger_ms: 0,
            delivery_timeout_ms: 2_000,
            retry_backoff_ms: 50,
            ..ProducerConfig::default()
        },
    )
    .await
    .expect("producer");
    producer
        .send("gone", ProducerRecord::new("before"))
        .await
        .expect("send")
        .await
        .expect("delivered while the broker is up");
    tokio::task::spawn_blocking(move || process.kill())
        .await
        .expect("killed");
    let started = std::time::Instant::now();
    let delivery = producer
        .send("gone", ProducerRecord::new("after"))
        .await
        .expect("queued");
    let outcome = tokio::time::timeout(Duration::from_secs(60), delivery)
        .await
        .expect("the delivery timeout ends the retries");
    assert!(outcome.is_err(), "{outcome:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(1_000),
        "retried for a while first ({:?})",
        started.elapsed()
    );
    let refused = producer.send("gone", ProducerRecord::new("later")).await;
    assert!(
        matches!(refused, Err(ClientError::ProducerFailed(_))),
        "{refused:?}"
    );
}

/// Partition 0 of `topic` holds exactly the records "0" .. "count - 1", each
/// once, at the offset equal to its number.
async fn assert_holds_numbers_once(addr: &str, topic: &str, count: u32) {
    let mut consumer = Consumer::connect(addr, ConsumerConfig::default())
        .await
        .expect("consumer");
    consumer
        .assign(topic, 0, Offset::Earliest)
        .await
        .expect("assign");
    for number in 0..count {
        let record = tokio::time::timeout(Duration::from_secs(60), consumer.next())
            .await
            .expect("records keep coming")
            .expect("assigned")
            .expect("record");
        assert_eq!(record.offset, u64::from(number));
        assert_eq!(record.value.as_deref(), Some(number.to_string().as_bytes()));
    }
    let end = Admin::connect(addr)
        .await
        .expect("connect")
        .list_offset(topic, 0, weir_protocol::message::OFFSET_SPEC_LATEST)
        .await
        .expect("end offset");
    assert_eq!(end, u64::from(count), "nothing appended twice");
}

/// A broker of its own with `topic` created; its data directory is
/// returned too, so that it can be killed and restarted on the same
/// address.
async fn killable_broker_with(
    topic: &str,
    partitions: u32,
) -> (tempfile::TempDir, BrokerProcess, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let process = BrokerProcess::start(dir.path(), &[]);
    let addr = process.addr.to_string();
    Admin::connect(&addr)
        .await
        .expect("connect")
        .create_topic(topic, partitions)
        .await
        .expect("create");
    (dir, process, addr)
}

/// A consumer with `config` reading `partitions` of `topic` from the start.
async fn consumer_from_start(
    addr: &str,
    config: ConsumerConfig,
    topic: &str,
    partitions: std::ops::Range<u32>,
) -> Consumer {
    let mut consumer = Consumer::connect(addr, config).await.expect("consumer");
    for partition in partitions {
        consumer
            .assign(topic, partition, Offset::Earliest)
            .await
            .expect("assign");
    }
    consumer
}

/// Sends one record per number, its value the number, and keeps the deliveries.
async fn send_numbers(
    producer: &Producer,
    topic: &str,
    numbers: std::ops::Range<u32>,
    deliveries: &mut Vec<weir_client::DeliveryFuture>,
) {
    for number in numbers {
        deliveries.push(
            producer
                .send(topic, ProducerRecord::new(number.to_string()))
                .await
                .expect("send"),
        );
    }
}
