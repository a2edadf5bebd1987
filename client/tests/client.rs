//! The client against the real `weir-broker` binary on a free loopback port.

use std::collections::HashMap;
use std::time::Duration;

use weir_client::partitioner::partition_for_key;
use weir_client::{
    Admin, ClientError, Compression, Consumer, ConsumerConfig, Offset, Producer, ProducerConfig,
    ProducerRecord,
};
use weir_testkit::BrokerProcess;

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
            let delivery = delivery.await.expect("resolved").expect("delivered");
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
            in_flight_per_partition: 8,
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
        let delivery = delivery.await.expect("resolved").expect("delivered");
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
