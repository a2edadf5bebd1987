//! Batches built by an independent Kafka implementation (kafka-python's
//! record builder, one per codec: none, gzip, snappy in xerial framing,
//! lz4, zstd; see `fixtures/kafka-python/generate.py`) are read by the
//! client library and the `weir` command line, after a real broker has
//! checked and stored them; and `weir produce --compression` writes each
//! codec so that both read it back.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use weir_client::connection::Connection;
use weir_client::{Admin, Compression, Consumer, ConsumerConfig, Offset, Producer, ProducerConfig};
use weir_protocol::message::{
    FetchPartition, FetchRequest, ProducePartition, ProduceRequest, ProduceTopic, RecordSet,
};
use weir_protocol::{Batch, Request, Response};
use weir_testkit::{BrokerProcess, DEADLINE, workspace_binary};

/// Records in each fixture (`RECORDS` in generate.py).
const FIXTURE_RECORDS: u64 = 300;
/// Plain records produced ahead of each fixture, so that its batch starts
/// at an offset other than 0.
const LEADING_RECORDS: u64 = 257;

const CODECS: [(&str, Compression); 5] = [
    ("none", Compression::None),
    ("gzip", Compression::Gzip),
    ("snappy", Compression::Snappy),
    ("lz4", Compression::Lz4),
    ("zstd", Compression::Zstd),
];

/// One record as generate.py builds it: (timestamp, key, value, headers).
type Expected = (i64, Option<Vec<u8>>, Vec<u8>, Vec<(String, Vec<u8>)>);

/// The rule of generate.py's `record`.
fn expected(index: u64) -> Expected {
    let key = (!index.is_multiple_of(3)).then(|| format!("key-{}", index % 7).into_bytes());
    let value = format!("value-{index}-{}", "weir ".repeat(40)).into_bytes();
    let headers = vec![
        ("source".to_string(), b"kafka-python".to_vec()),
        ("index".to_string(), index.to_string().into_bytes()),
    ];
    (1_700_000_000_000 + index as i64, key, value, headers)
}

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/kafka-python")
        .join(format!("{name}.bin"));
    std::fs::read(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

/// Each fixture parses with a valid CRC, says its codec, and decompresses
/// (through the client's own path) to exactly the records generate.py wrote.
#[test]
fn kafka_python_batches_decode_with_every_codec() {
    for (name, codec) in CODECS {
        let bytes = fixture(name);
        let batch = Batch::parse_verified(&bytes).expect("a valid batch");
        assert_eq!(batch.compression(), codec, "{name}");
        assert_eq!(batch.records_count() as u64, FIXTURE_RECORDS, "{name}");
        let section = weir_client::producer::decompress(codec, batch.records_bytes())
            .unwrap_or_else(|error| panic!("{name}: {error}"));
        let mut count = 0;
        for (index, record) in batch.records_from(&section).enumerate() {
            let record = record.unwrap_or_else(|error| panic!("{name}: {error}"));
            let (timestamp, key, value, headers) = expected(index as u64);
            assert_eq!(record.offset, index as u64, "{name}");
            assert_eq!(record.timestamp_ms, timestamp, "{name}");
            assert_eq!(record.key.map(<[u8]>::to_vec), key, "{name}");
            assert_eq!(record.value.map(<[u8]>::to_vec), Some(value), "{name}");
            let read: Vec<(String, Vec<u8>)> = record
                .headers()
                .map(|header| {
                    let header = header.expect("header");
                    (
                        header.key.to_string(),
                        header.value.map(<[u8]>::to_vec).unwrap_or_default(),
                    )
                })
                .collect();
            assert_eq!(read, headers, "{name}");
            count += 1;
        }
        assert_eq!(count, FIXTURE_RECORDS, "{name}");
    }
}

/// Produces `bytes` (one batch, as sent by a Kafka client) to partition 0.
async fn produce_raw(connection: &Connection, topic: &str, bytes: Vec<u8>) {
    let response = connection
        .call(Request::Produce(ProduceRequest {
            acks: 1,
            timeout_ms: 30_000,
            topics: vec![ProduceTopic {
                name: topic.into(),
                partitions: vec![ProducePartition {
                    partition: 0,
                    records: RecordSet::single(Bytes::from(bytes)),
                }],
            }],
        }))
        .await
        .expect("produce");
    let Response::Produce(response) = response else {
        panic!("wrong response");
    };
    let partition = &response.topics[0].partitions[0];
    assert!(partition.error.is_ok(), "{topic}: {:?}", partition.error);
    assert_eq!(partition.base_offset, LEADING_RECORDS as i64, "{topic}");
}

/// Every record of partition 0 of `topic`, read by a consumer from the start.
async fn consume_all(addr: &str, topic: &str, count: u64) -> Vec<weir_client::ConsumerRecord> {
    let mut consumer = Consumer::connect(addr, ConsumerConfig::default())
        .await
        .expect("consumer");
    consumer
        .assign(topic, 0, Offset::Earliest)
        .await
        .expect("assign");
    let mut records = Vec::new();
    while (records.len() as u64) < count {
        let record = tokio::time::timeout(DEADLINE, consumer.next())
            .await
            .expect("records keep coming")
            .expect("assigned")
            .unwrap_or_else(|error| panic!("{topic}: {error}"));
        records.push(record);
    }
    records
}

/// The broker takes each fixture (checking every record inside it) behind
/// 257 plain records; a consumer and `weir consume` then read all 557 with
/// keys, values, headers and timestamps as kafka-python wrote them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_python_batches_are_read_by_consumers_and_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let process = BrokerProcess::start(dir.path(), &[]);
    let addr = process.addr.to_string();
    let admin = Admin::connect(&addr).await.expect("admin");
    let producer = Producer::connect(&addr, ProducerConfig::default())
        .await
        .expect("producer");
    let connection = Connection::connect(&addr, Duration::from_secs(30))
        .await
        .expect("connect");
    for (name, _) in CODECS {
        let topic = format!("kp-{name}");
        admin.create_topic(&topic, 1).await.expect("create");
        for index in 0..LEADING_RECORDS {
            // Acknowledged by the flush below.
            drop(
                producer
                    .send(
                        &topic,
                        weir_client::ProducerRecord::new(format!("lead-{index}")).partition(0),
                    )
                    .await
                    .expect("send"),
            );
        }
        producer.flush().await.expect("flush");
        produce_raw(&connection, &topic, fixture(name)).await;
    }
    for (name, _) in CODECS {
        let topic = format!("kp-{name}");
        let records = consume_all(&addr, &topic, LEADING_RECORDS + FIXTURE_RECORDS).await;
        for (position, record) in records.iter().enumerate() {
            assert_eq!(record.offset, position as u64, "{name}: in order");
        }
        for (index, record) in records[LEADING_RECORDS as usize..].iter().enumerate() {
            let (timestamp, key, value, headers) = expected(index as u64);
            assert_eq!(record.timestamp_ms, timestamp, "{name}");
            assert_eq!(record.key.as_deref().map(<[u8]>::to_vec), key, "{name}");
            assert_eq!(
                record.value.as_deref().map(<[u8]>::to_vec),
                Some(value),
                "{name}"
            );
            let read: Vec<(String, Vec<u8>)> = record
                .headers
                .iter()
                .map(|(header, value)| (header.clone(), value.as_deref().unwrap_or(&[]).to_vec()))
                .collect();
            assert_eq!(read, headers, "{name}");
        }

        let output = Command::new(workspace_binary("weir"))
            .args(["--broker", &addr, "consume", &topic, "--format", "json"])
            .output()
            .expect("run weir consume");
        assert!(
            output.status.success(),
            "{name}: weir consume failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| serde_json::from_str(line).expect("a JSON line"))
            .collect();
        assert_eq!(
            lines.len() as u64,
            LEADING_RECORDS + FIXTURE_RECORDS,
            "{name}: every record printed"
        );
        let last = &lines[lines.len() - 1];
        let (timestamp, key, _, _) = expected(FIXTURE_RECORDS - 1);
        assert_eq!(last["offset"], LEADING_RECORDS + FIXTURE_RECORDS - 1);
        assert_eq!(last["timestamp_ms"], timestamp);
        assert_eq!(
            last["key"].as_str().map(str::as_bytes),
            key.as_deref(),
            "{name}"
        );
        assert_eq!(last["headers"]["source"], "kafka-python", "{name}");
    }
}

/// `weir produce --compression` sends batches in each codec (as a fetch
/// of the raw batches shows), and `weir consume` prints them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_produce_writes_every_codec() {
    let dir = tempfile::tempdir().expect("tempdir");
    let process = BrokerProcess::start(dir.path(), &[]);
    let addr = process.addr.to_string();
    let admin = Admin::connect(&addr).await.expect("admin");
    let connection = Connection::connect(&addr, Duration::from_secs(30))
        .await
        .expect("connect");
    let lines: Vec<String> = (0..500)
        .map(|index| format!("line-{index}-{}", "compressible ".repeat(10)))
        .collect();
    for (name, codec) in CODECS {
        let topic = format!("cli-{name}");
        admin.create_topic(&topic, 1).await.expect("create");
        let mut child = Command::new(workspace_binary("weir"))
            .args(["--broker", &addr, "produce", &topic, "--compression", name])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("run weir produce");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin
                .write_all(lines.join("\n").as_bytes())
                .expect("write lines");
        }
        assert!(child.wait().expect("wait").success(), "{name}: produce");

        let response = connection
            .call(Request::Fetch(FetchRequest {
                max_wait_ms: 0,
                min_bytes: 1,
                max_bytes: 8 << 20,
                partitions: vec![FetchPartition {
                    topic: topic.clone(),
                    partition: 0,
                    fetch_offset: 0,
                    partition_max_bytes: 8 << 20,
                }],
            }))
            .await
            .expect("fetch");
        let Response::Fetch(response) = response else {
            panic!("wrong response");
        };
        let bytes = response.partitions[0].records.to_bytes();
        let batches: Vec<_> = weir_protocol::Batches::new(&bytes, true)
            .map(|batch| batch.expect("valid batch"))
            .collect();
        assert!(!batches.is_empty(), "{name}");
        for batch in &batches {
            assert_eq!(batch.compression(), codec, "{name}: the batch's codec");
        }

        let output = Command::new(workspace_binary("weir"))
            .args(["--broker", &addr, "consume", &topic])
            .output()
            .expect("run weir consume");
        assert!(output.status.success(), "{name}: consume");
        let printed: Vec<String> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        assert_eq!(printed, lines, "{name}: every line back, in order");
    }
}
