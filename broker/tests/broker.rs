//! The real `weir-broker` binary on a free loopback port, driven over TCP.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{BrokerProcess, Client, Connect, batch};
use weir_protocol::message::*;
use weir_protocol::{ApiKey, ErrorCode, FrameKind, Request, Response};

/// Produced batches come back in order with consecutive offsets, from any
/// offset, and survive a graceful restart.
#[test]
fn produce_fetch_replay_and_graceful_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut client = broker.client();
    client.create_topic("orders", 2);
    let mut next = 0u64;
    for round in 0..50 {
        let response = client.produce(
            "orders",
            1,
            batch(&format!("r{round}"), 4, 1_000 + round),
            1,
        );
        assert_eq!(response.error, ErrorCode::None);
        assert_eq!(response.base_offset, next as i64, "offsets are consecutive");
        next += 4;
    }
    let all = client.consume_all("orders", 1, 0);
    assert_eq!(all.len(), 200);
    assert!(
        all.iter()
            .enumerate()
            .all(|(index, (offset, _))| *offset == index as u64)
    );
    assert_eq!(all[0].1, b"r0-0");
    assert_eq!(all[199].1, b"r49-3");
    // Replay from the middle of a batch.
    let replay = client.consume_all("orders", 1, 101);
    assert_eq!(replay.first().map(|r| r.0), Some(101));
    assert_eq!(replay.len(), 99);
    // Graceful restart keeps everything and the next offset.
    drop(client);
    assert!(broker.terminate().success(), "SIGTERM exits cleanly");
    assert!(
        dir.path().join("orders-1").join("clean-shutdown").exists(),
        "clean marker written"
    );
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut client = broker.client();
    assert_eq!(client.consume_all("orders", 1, 0), all);
    assert_eq!(
        client
            .produce("orders", 1, batch("after", 1, 0), -1)
            .base_offset,
        200
    );
}

/// ListOffsets answers earliest, latest and by timestamp.
#[test]
fn list_offsets_by_position_and_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut client = broker.client();
    client.create_topic("t", 1);
    for index in 0..10 {
        client.produce("t", 0, batch("v", 2, 1_000 * index), 1);
    }
    let lookup = |client: &mut Client, spec: i64| {
        let Response::ListOffsets(mut response) =
            client.call(Request::ListOffsets(ListOffsetsRequest {
                partitions: vec![ListOffsetsPartition {
                    topic: "t".into(),
                    partition: 0,
                    spec,
                }],
            }))
        else {
            panic!("wrong response")
        };
        let answer = response.partitions.remove(0);
        assert_eq!(answer.error, ErrorCode::None);
        answer.offset
    };
    assert_eq!(lookup(&mut client, OFFSET_SPEC_EARLIEST), 0);
    assert_eq!(lookup(&mut client, OFFSET_SPEC_LATEST), 20);
    assert_eq!(lookup(&mut client, 5_000), 10);
    assert_eq!(lookup(&mut client, 4_500), 10);
    assert_eq!(
        lookup(&mut client, 99_000),
        20,
        "after every record: the high watermark"
    );
}

/// Garbage, a frame over the limit, an unknown API and an unsupported version
/// each get a clear error and a closed connection; a bad CRC and a missing
/// topic get per-partition errors on a connection that stays open; other
/// clients and stored data are untouched throughout.
#[test]
fn bad_input_is_refused_and_harms_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut bystander = broker.client();
    bystander.create_topic("safe", 1);
    bystander.produce("safe", 0, batch("kept", 3, 0), 1);
    let before = bystander.consume_all("safe", 0, 0);

    let expect_error_and_close = |bytes: &[u8], expected: ErrorCode| {
        let mut client = broker.client();
        client.stream.write_all(bytes).expect("send");
        let frame = client
            .read_frame()
            .expect("an error frame before the close");
        assert_eq!(frame.header.kind, FrameKind::Response);
        assert_eq!(
            frame.body.as_ref(),
            &expected.code().to_be_bytes(),
            "{expected:?}"
        );
        assert!(client.read_frame().is_none(), "then the connection closes");
    };
    // Garbage: a length that is not even a header.
    expect_error_and_close(&[0, 0, 0, 3, 1, 2, 3], ErrorCode::CorruptMessage);
    // Over the limit, refused from the prefix.
    expect_error_and_close(&(1u32 << 30).to_be_bytes(), ErrorCode::FrameTooLarge);
    // Unknown API key and unsupported version.
    let header = |api_key, api_version| weir_protocol::FrameHeader {
        kind: FrameKind::Request,
        api_key,
        api_version,
        correlation_id: 7,
    };
    expect_error_and_close(
        &weir_protocol::frame::encode(&header(999, 0), &[]),
        ErrorCode::UnsupportedApi,
    );
    expect_error_and_close(
        &weir_protocol::frame::encode(&header(ApiKey::Metadata.code(), 9), &[0, 0, 0, 0]),
        ErrorCode::UnsupportedVersion,
    );
    // A body that does not decode.
    expect_error_and_close(
        &weir_protocol::frame::encode(&header(ApiKey::Fetch.code(), 0), &[1, 2, 3]),
        ErrorCode::CorruptMessage,
    );

    // A truncated frame and then a hang-up: nothing to answer, nothing harmed.
    {
        let mut client = broker.client();
        let frame = Request::Metadata(MetadataRequest { topics: None })
            .encode(1)
            .to_vec();
        client
            .stream
            .write_all(&frame[..frame.len() - 2])
            .expect("send");
    }

    // Bad CRC and a missing topic: per-partition errors, connection stays.
    let mut client = broker.client();
    let mut corrupt = batch("bad", 2, 0).to_vec();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0x55;
    assert_eq!(
        client.produce("safe", 0, Bytes::from(corrupt), 1).error,
        ErrorCode::CorruptBatch
    );
    assert_eq!(
        client.produce("missing", 0, batch("x", 1, 0), 1).error,
        ErrorCode::UnknownTopicOrPartition
    );
    assert_eq!(
        client.produce("safe", 9, batch("x", 1, 0), 1).error,
        ErrorCode::UnknownTopicOrPartition
    );
    assert_eq!(
        client.fetch("safe", 0, 999, 0).error,
        ErrorCode::OffsetOutOfRange
    );

    assert_eq!(
        bystander.consume_all("safe", 0, 0),
        before,
        "stored data unchanged"
    );
    let mut fresh = broker.client();
    assert_eq!(
        fresh.produce("safe", 0, batch("more", 1, 0), 1).base_offset,
        3,
        "the broker keeps serving"
    );
}

/// kill -9 with acks=all traffic in flight loses no acknowledged record.
#[test]
fn kill_9_loses_no_acknowledged_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    broker.client().create_topic("events", 1);
    let addr = broker.addr;
    let (sender, receiver) = std::sync::mpsc::channel();
    let producers: Vec<_> = (0..4)
        .map(|producer| {
            let sender = sender.clone();
            std::thread::spawn(move || {
                let mut client = Client::connect(addr);
                for round in 0.. {
                    let prefix = format!("p{producer}r{round}");
                    let correlation = client.send(&Request::Produce(ProduceRequest {
                        acks: -1,
                        timeout_ms: 30_000,
                        topics: vec![ProduceTopic {
                            name: "events".into(),
                            partitions: vec![ProducePartition {
                                partition: 0,
                                records: RecordSet::single(batch(&prefix, 3, 0)),
                            }],
                        }],
                    }));
                    let Some(frame) = client.read_frame() else {
                        return;
                    };
                    assert_eq!(frame.header.correlation_id, correlation);
                    let Ok(Response::Produce(response)) =
                        Response::decode_body(frame.header.api_key, 0, frame.body)
                    else {
                        return;
                    };
                    let answer = &response.topics[0].partitions[0];
                    if answer.error == ErrorCode::None
                        && sender.send((answer.base_offset as u64, prefix)).is_err()
                    {
                        return;
                    }
                }
            })
        })
        .collect();
    drop(sender);
    let started = Instant::now();
    let mut acked = Vec::new();
    while acked.len() < 200 && started.elapsed() < Duration::from_secs(60) {
        if let Ok(ack) = receiver.recv_timeout(Duration::from_secs(1)) {
            acked.push(ack);
        }
    }
    broker.kill();
    acked.extend(receiver.try_iter());
    for producer in producers {
        let _ = producer.join();
    }
    assert!(
        acked.len() >= 200,
        "enough acknowledged traffic before the kill"
    );
    let broker = BrokerProcess::start(dir.path(), &[]);
    let stored = broker.client().consume_all("events", 0, 0);
    for (offset, prefix) in &acked {
        for index in 0..3u64 {
            let record = stored
                .get((offset + index) as usize)
                .expect("acknowledged record present");
            assert_eq!(record.0, offset + index);
            assert_eq!(record.1, format!("{prefix}-{index}").as_bytes());
        }
    }
}

/// A subscription receives pushes only while it has credit; granting more
/// resumes it exactly where it stopped.
#[test]
fn subscription_stops_without_credit_and_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut producer = broker.client();
    producer.create_topic("feed", 1);
    let one = batch("x", 10, 0);
    for _ in 0..20 {
        producer.produce("feed", 0, one.clone(), 1);
    }
    let mut consumer = broker.client();
    let credit = (one.len() * 3) as u32;
    let Response::Subscribe(response) = consumer.call(Request::Subscribe(SubscribeRequest {
        subscription_id: 5,
        topic: "feed".into(),
        partition: 0,
        offset: 0,
        credit_bytes: credit,
    })) else {
        panic!("wrong response")
    };
    assert_eq!(response.error, ErrorCode::None);
    let mut received = 0usize;
    let mut next_offset = 0u64;
    let read_push = |consumer: &mut Client| {
        let frame = consumer.read_frame().expect("push");
        assert_eq!(
            (frame.header.kind, frame.header.correlation_id),
            (FrameKind::Push, 5)
        );
        SubscriptionPush::decode(frame.body).expect("push decodes")
    };
    while received < credit as usize {
        let push = read_push(&mut consumer);
        let bytes = push.records.to_bytes();
        for batch in weir_protocol::Batches::new(&bytes, true) {
            let batch = batch.expect("valid");
            assert_eq!(batch.base_offset(), next_offset, "pushes continue exactly");
            next_offset = batch.next_offset();
        }
        received += bytes.len();
    }
    assert_eq!(
        received, credit as usize,
        "credit is honoured to the byte with whole batches"
    );
    // No credit left: nothing more arrives.
    consumer
        .stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let mut probe = [0u8; 1];
    let silent = matches!(consumer.stream.read(&mut probe), Err(ref e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut));
    assert!(silent, "a consumer without credit receives nothing");
    consumer
        .stream
        .set_read_timeout(Some(common::DEADLINE))
        .expect("timeout");
    // Grant the rest: it resumes where it stopped and receives everything.
    let correlation = consumer.send(&Request::Credit(CreditRequest {
        subscription_id: 5,
        credit_bytes: u32::MAX / 2,
    }));
    while next_offset < 200 {
        let frame = consumer.read_frame().expect("frame");
        if frame.header.kind == FrameKind::Response {
            assert_eq!(frame.header.correlation_id, correlation);
            continue;
        }
        let push = SubscriptionPush::decode(frame.body).expect("push");
        let bytes = push.records.to_bytes();
        for batch in weir_protocol::Batches::new(&bytes, true) {
            let batch = batch.expect("valid");
            assert_eq!(batch.base_offset(), next_offset);
            next_offset = batch.next_offset();
        }
    }
    assert_eq!(next_offset, 200);
}

/// Pipelined produce requests on one connection (acks = 0, no waiting) land
/// in the order they were sent.
#[test]
fn pipelined_produces_keep_their_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut client = broker.client();
    client.create_topic("ordered", 1);
    for round in 0..300 {
        client.send(&Request::Produce(ProduceRequest {
            acks: 0,
            timeout_ms: 30_000,
            topics: vec![ProduceTopic {
                name: "ordered".into(),
                partitions: vec![ProducePartition {
                    partition: 0,
                    records: RecordSet::single(batch(&format!("n{round}"), 1, 0)),
                }],
            }],
        }));
    }
    // An acknowledged produce behind them: once it is answered, all are in.
    assert_eq!(
        client
            .produce("ordered", 0, batch("last", 1, 0), 1)
            .base_offset,
        300
    );
    let values: Vec<Vec<u8>> = client
        .consume_all("ordered", 0, 0)
        .into_iter()
        .map(|record| record.1)
        .collect();
    let expected: Vec<Vec<u8>> = (0..300)
        .map(|round| format!("n{round}-0").into_bytes())
        .chain([b"last-0".to_vec()])
        .collect();
    assert_eq!(values, expected);
}

/// Metadata answers each named topic once, and refuses more than the limit
/// with one InvalidRequest entry instead of building a huge response.
#[test]
fn metadata_dedupes_and_caps_topic_lists() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut client = broker.client();
    client.create_topic("a", 1);
    let Response::Metadata(response) = client.call(Request::Metadata(MetadataRequest {
        topics: Some(vec!["a".to_string(); 50_000]),
    })) else {
        panic!("wrong response")
    };
    assert_eq!(response.topics.len(), 1);
    assert_eq!(response.topics[0].error, ErrorCode::None);
    let Response::Metadata(response) = client.call(Request::Metadata(MetadataRequest {
        topics: Some((0..10_001).map(|index| format!("t{index}")).collect()),
    })) else {
        panic!("wrong response")
    };
    assert_eq!(response.topics.len(), 1);
    assert_eq!(response.topics[0].error, ErrorCode::InvalidRequest);
}

/// A batch whose records do not carry the offset deltas of their positions
/// is refused, compressed or not, as is a compressed section that does not
/// decompress or expands too far: consumers rely on every record's offset.
#[test]
fn records_with_wrong_offset_deltas_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut client = broker.client();
    client.create_topic("strict", 1);
    let two = batch("x", 2, 0);
    let one = batch("x", 1, 0);
    // Header of a two-record batch, followed by the same record twice (delta 0 both times).
    let mut lying = two[..61].to_vec();
    lying.extend_from_slice(&one[61..]);
    lying.extend_from_slice(&one[61..]);
    let length = (lying.len() - 12) as u32;
    lying[8..12].copy_from_slice(&length.to_be_bytes());
    let crc = crc32c::crc32c(&lying[21..]);
    lying[17..21].copy_from_slice(&crc.to_be_bytes());
    let lying_records = lying[61..].to_vec();
    assert_eq!(
        client.produce("strict", 0, Bytes::from(lying), 1).error,
        ErrorCode::CorruptBatch
    );
    // The same lie inside every codec: the broker decompresses to check.
    use weir_protocol::Compression;
    for codec in [
        Compression::Gzip,
        Compression::Snappy,
        Compression::Lz4,
        Compression::Zstd,
    ] {
        let compressed = weir_protocol::codec::compress(codec, &lying_records).expect("compress");
        let compressed = weir_protocol::batch::with_compressed_records(&two, codec, &compressed);
        assert_eq!(
            client
                .produce("strict", 0, Bytes::from(compressed), 1)
                .error,
            ErrorCode::CorruptBatch,
            "{codec:?}"
        );
        // Bytes that are not this codec's at all.
        let garbage =
            weir_protocol::batch::with_compressed_records(&two, codec, b"not compressed data");
        assert_eq!(
            client.produce("strict", 0, Bytes::from(garbage), 1).error,
            ErrorCode::CorruptBatch,
            "{codec:?}"
        );
    }
    // A section that expands past the broker's 64 MiB decompression limit.
    let bomb =
        weir_protocol::codec::compress(Compression::Lz4, &vec![0u8; 65 << 20]).expect("compress");
    let bomb = weir_protocol::batch::with_compressed_records(&two, Compression::Lz4, &bomb);
    assert_eq!(
        client.produce("strict", 0, Bytes::from(bomb), 1).error,
        ErrorCode::CorruptBatch
    );
    // The 64 MiB is per request, not per partition entry: the same
    // partition named twice with 40 MiB of records each gets the second
    // refused (and one frame cannot make the broker inflate gigabytes).
    let big = {
        let mut builder = weir_protocol::BatchBuilder::new(0);
        let value = vec![0u8; 1 << 20];
        for _ in 0..40 {
            builder.push(0, None, Some(&value), &[]);
        }
        let plain = builder.finish();
        let records = &plain[weir_protocol::batch::BATCH_HEADER_BYTES..];
        let compressed =
            weir_protocol::codec::compress(Compression::Lz4, records).expect("compress");
        Bytes::from(weir_protocol::batch::with_compressed_records(
            &plain,
            Compression::Lz4,
            &compressed,
        ))
    };
    let Response::Produce(response) = client.call(Request::Produce(ProduceRequest {
        acks: 1,
        timeout_ms: 30_000,
        topics: vec![ProduceTopic {
            name: "strict".into(),
            partitions: vec![
                ProducePartition {
                    partition: 0,
                    records: RecordSet::single(big.clone()),
                },
                ProducePartition {
                    partition: 0,
                    records: RecordSet::single(big),
                },
            ],
        }],
    })) else {
        panic!("wrong response");
    };
    let outcomes: Vec<ErrorCode> = response.topics[0]
        .partitions
        .iter()
        .map(|partition| partition.error)
        .collect();
    assert_eq!(outcomes, [ErrorCode::None, ErrorCode::CorruptBatch]);
    // A whole record followed by bytes that belong to no record.
    let mut trailing = one.to_vec();
    trailing.extend_from_slice(&[0u8; 7]);
    let length = (trailing.len() - 12) as u32;
    trailing[8..12].copy_from_slice(&length.to_be_bytes());
    let crc = crc32c::crc32c(&trailing[21..]);
    trailing[17..21].copy_from_slice(&crc.to_be_bytes());
    assert_eq!(
        client.produce("strict", 0, Bytes::from(trailing), 1).error,
        ErrorCode::CorruptBatch
    );
    assert_eq!(
        client.produce("strict", 0, two, 1).base_offset,
        40,
        "nothing was appended before but the one 40-record batch"
    );
}

/// A batch of `count` records stamped by an idempotent producer.
fn stamped(producer_id: i64, epoch: i16, first_sequence: i32, count: usize) -> Bytes {
    let mut builder =
        weir_protocol::BatchBuilder::new(1_000).producer(weir_protocol::ProducerStamp {
            producer_id,
            producer_epoch: epoch,
            base_sequence: first_sequence,
        });
    for index in 0..count {
        let value = format!(
            "p{producer_id}-e{epoch}-s{}",
            first_sequence as usize + index
        );
        builder.push(1_000, None, Some(value.as_bytes()), &[]);
    }
    Bytes::from(builder.finish())
}

fn init_producer(client: &mut Client, name: Option<&str>) -> (i64, i16) {
    let Response::InitProducerId(response) =
        client.call(Request::InitProducerId(InitProducerIdRequest {
            producer_name: name.map(str::to_string),
        }))
    else {
        panic!("wrong response")
    };
    assert_eq!(response.error, ErrorCode::None);
    (response.producer_id, response.producer_epoch)
}

/// Idempotent produce over the raw protocol: a retried batch is answered
/// with its first offset and not appended again, also after a kill -9
/// (state replayed from the log) and after a graceful restart (from the
/// snapshot); a gap, an unknown producer, two stamped batches in one
/// request and an epoch older than the producer's name now holds are each
/// refused with their code, appending nothing.
#[test]
fn idempotent_batches_dedupe_and_fence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut client = broker.client();
    client.create_topic("idem", 1);
    let (id, epoch) = init_producer(&mut client, Some("app-1"));
    let fresh = init_producer(&mut client, None);
    assert_ne!(fresh.0, id, "every producer its own id");
    let first = stamped(id, epoch, 0, 3);
    let second = stamped(id, epoch, 3, 2);
    assert_eq!(client.produce("idem", 0, first.clone(), -1).base_offset, 0);
    assert_eq!(client.produce("idem", 0, second.clone(), -1).base_offset, 3);
    for (batch, offset) in [(&first, 0), (&second, 3)] {
        let retry = client.produce("idem", 0, batch.clone(), -1);
        assert_eq!(
            (retry.error, retry.base_offset),
            (ErrorCode::None, offset),
            "a retry is answered with the original offset"
        );
    }
    let refusals = [
        (stamped(id, epoch, 7, 1), ErrorCode::OutOfOrderSequence),
        (
            stamped(fresh.0 + 100, 0, 5, 1),
            ErrorCode::UnknownProducerId,
        ),
        (
            Bytes::from([stamped(id, epoch, 5, 1), stamped(id, epoch, 6, 1)].concat()),
            ErrorCode::InvalidRequest,
        ),
    ];
    for (batch, code) in &refusals {
        assert_eq!(client.produce("idem", 0, batch.clone(), -1).error, *code);
    }
    assert_eq!(client.consume_all("idem", 0, 0).len(), 5, "nothing doubled");

    // kill -9: no snapshot was written; the log is replayed.
    drop(client);
    broker.kill();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut client = broker.client();
    assert_eq!(client.produce("idem", 0, second.clone(), -1).base_offset, 3);
    let third = stamped(id, epoch, 5, 1);
    assert_eq!(client.produce("idem", 0, third.clone(), -1).base_offset, 5);

    // Graceful restart: the snapshot carries the state.
    drop(client);
    assert!(broker.terminate().success());
    assert!(
        dir.path()
            .join("idem-0")
            .join("producer-state.bin")
            .exists()
    );
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut client = broker.client();
    assert_eq!(client.produce("idem", 0, third, -1).base_offset, 5);

    // The same name again: the next epoch, and the old one is fenced.
    let (same_id, next_epoch) = init_producer(&mut client, Some("app-1"));
    assert_eq!((same_id, next_epoch), (id, epoch + 1));
    assert_eq!(
        client
            .produce("idem", 0, stamped(id, next_epoch, 0, 1), -1)
            .base_offset,
        6
    );
    assert_eq!(
        client
            .produce("idem", 0, stamped(id, epoch, 6, 1), -1)
            .error,
        ErrorCode::ProducerFenced
    );
    let values: Vec<Vec<u8>> = client
        .consume_all("idem", 0, 0)
        .into_iter()
        .map(|(_, value)| value)
        .collect();
    assert_eq!(values.len(), 7);
    assert_eq!(values[6], format!("p{id}-e{next_epoch}-s0").into_bytes());
}

/// Produce requests of every shape (one frame carrying several partitions
/// and several batches, a lone large batch read into a buffer of its own,
/// two batches in one partition) store exactly the records sent, at
/// consecutive offsets, the same in the broker's memory and on disk after a
/// kill -9.
#[test]
fn produce_requests_of_every_shape_store_exactly_what_was_sent() {
    fn joined(parts: &[Bytes]) -> Bytes {
        Bytes::from(parts.concat())
    }
    fn expected(parts: &[(&str, usize)]) -> Vec<Vec<u8>> {
        parts
            .iter()
            .flat_map(|(prefix, count)| {
                (0..*count).map(move |index| format!("{prefix}-{index}").into_bytes())
            })
            .collect()
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut client = broker.client();
    client.create_topic("shapes", 2);

    // One frame (well over 64 KiB), two partitions, two batches in the first.
    let Response::Produce(response) = client.call(Request::Produce(ProduceRequest {
        acks: -1,
        timeout_ms: 30_000,
        topics: vec![ProduceTopic {
            name: "shapes".into(),
            partitions: vec![
                ProducePartition {
                    partition: 0,
                    records: RecordSet::single(joined(&[
                        batch("p0a", 3_000, 10),
                        batch("p0b", 3_000, 11),
                    ])),
                },
                ProducePartition {
                    partition: 1,
                    records: RecordSet::single(batch("p1a", 6_000, 12)),
                },
            ],
        }],
    })) else {
        panic!("wrong response type")
    };
    let answers = &response.topics[0].partitions;
    assert!(answers.iter().all(|answer| answer.error == ErrorCode::None));
    assert_eq!(answers[0].base_offset, 0);
    assert_eq!(answers[1].base_offset, 0);
    // A lone large batch, then two batches for one partition, then a small one.
    let lone = client.produce("shapes", 0, batch("lone", 12_000, 13), -1);
    assert_eq!((lone.error, lone.base_offset), (ErrorCode::None, 6_000));
    let two = client.produce(
        "shapes",
        1,
        joined(&[batch("two-a", 5_000, 14), batch("two-b", 5_000, 15)]),
        -1,
    );
    assert_eq!((two.error, two.base_offset), (ErrorCode::None, 6_000));
    let small = client.produce("shapes", 0, batch("small", 3, 16), -1);
    assert_eq!((small.error, small.base_offset), (ErrorCode::None, 18_000));

    let want = [
        expected(&[
            ("p0a", 3_000),
            ("p0b", 3_000),
            ("lone", 12_000),
            ("small", 3),
        ]),
        expected(&[("p1a", 6_000), ("two-a", 5_000), ("two-b", 5_000)]),
    ];
    let mut served = Vec::new();
    for (partition, want) in want.iter().enumerate() {
        let all = client.consume_all("shapes", partition as u32, 0);
        assert!(
            all.iter()
                .enumerate()
                .all(|(index, (offset, _))| *offset == index as u64),
            "consecutive offsets in partition {partition}"
        );
        let values: Vec<Vec<u8>> = all.iter().map(|(_, value)| value.clone()).collect();
        assert_eq!(&values, want, "partition {partition} holds what was sent");
        served.push(all);
    }

    drop(client);
    broker.kill();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut client = broker.client();
    for (partition, before) in served.iter().enumerate() {
        assert_eq!(
            &client.consume_all("shapes", partition as u32, 0),
            before,
            "partition {partition} reads the same from disk after kill -9"
        );
    }
}
