//! Load-shaped tests against the real broker: many connections at once, and
//! a consumer far behind a fast producer.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{BrokerProcess, Client, Connect, batch};
use weir_protocol::message::*;
use weir_protocol::{ErrorCode, FrameKind, Request, Response};

/// 1,000 concurrent connections each get answers; a connection over the
/// limit is refused with TooManyConnections while the others keep working.
#[test]
fn a_thousand_concurrent_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The admin connection stays open: with it, 1,001 connections fill the limit.
    let broker = BrokerProcess::start(
        dir.path(),
        &[
            "--connections-max",
            "1001",
            "--connections-max-per-address",
            "1001",
        ],
    );
    let mut admin = broker.client();
    admin.create_topic("busy", 4);
    let mut clients: Vec<Client> = (0..1000).map(|_| broker.client()).collect();
    for (index, client) in clients.iter_mut().enumerate() {
        let response = client.produce(
            "busy",
            (index % 4) as u32,
            batch(&format!("c{index}"), 1, 0),
            1,
        );
        assert_eq!(response.error, ErrorCode::None, "connection {index}");
    }
    let mut extra = broker.client();
    let frame = extra.read_frame().expect("refusal frame");
    assert_eq!(frame.header.kind, FrameKind::Response);
    assert_eq!(
        frame.body.as_ref(),
        &ErrorCode::TooManyConnections.code().to_be_bytes()
    );
    assert!(extra.read_frame().is_none(), "refused connection is closed");
    // Everyone else still works.
    for client in clients.iter_mut().step_by(97) {
        let Response::Metadata(metadata) =
            client.call(Request::Metadata(MetadataRequest { topics: None }))
        else {
            panic!("wrong response")
        };
        assert_eq!(metadata.topics.len(), 1);
    }
    let total: usize = (0..4)
        .map(|partition| admin.consume_all("busy", partition, 0).len())
        .sum();
    assert_eq!(total, 1000);
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib * 1024)
        .expect("VmRSS")
}

/// A subscriber that stops granting credit while a producer writes 2 GiB
/// leaves the broker's RSS flat (it buffers nothing for it), then catches up
/// by replaying the log.
#[test]
fn slow_consumer_two_gib_behind_costs_no_memory() {
    const TOTAL_BYTES: usize = 2 << 30;
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut producer = broker.client();
    producer.create_topic("firehose", 1);
    // A subscriber with 1 MiB of credit that never grants more.
    let mut slow = broker.client();
    let Response::Subscribe(subscribed) = slow.call(Request::Subscribe(SubscribeRequest {
        subscription_id: 1,
        topic: "firehose".into(),
        partition: 0,
        offset: 0,
        credit_bytes: 1 << 20,
    })) else {
        panic!("wrong response")
    };
    assert_eq!(subscribed.error, ErrorCode::None);
    // 1 MiB batches of 1 KiB records.
    let value = vec![7u8; 1000];
    let mut builder = weir_protocol::BatchBuilder::with_capacity(0, 1 << 20);
    while builder.len_bytes() + 1100 < 1 << 20 {
        builder.push(0, None, Some(&value), &[]);
    }
    let records_per_batch = builder.records_count() as u64;
    let one_batch = Bytes::from(builder.finish());
    let batches = TOTAL_BYTES / one_batch.len();
    let pid = broker.child.id();
    let mut rss_early = 0;
    for index in 0..batches {
        let response = producer.produce("firehose", 0, one_batch.clone(), 1);
        assert_eq!(response.error, ErrorCode::None);
        if index == batches / 8 {
            rss_early = rss_bytes(pid);
        }
    }
    let rss_late = rss_bytes(pid);
    eprintln!(
        "broker RSS after 256 MiB: {} MiB; after 2 GiB: {} MiB",
        rss_early >> 20,
        rss_late >> 20
    );
    assert!(
        rss_late < rss_early + (64 << 20),
        "RSS grew from {} MiB to {} MiB while the consumer was 2 GiB behind",
        rss_early >> 20,
        rss_late >> 20
    );
    // The slow consumer got about its credit, no more.
    slow.stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut pushed = 0usize;
    while let Some(frame) = slow.read_frame_or_timeout() {
        let push = SubscriptionPush::decode(frame.body).expect("push");
        pushed += push.records.len();
    }
    assert!(
        pushed <= (1 << 20) + one_batch.len(),
        "pushed {pushed} bytes on 1 MiB of credit"
    );
    // Catching up by replay reads every record.
    let mut reader = broker.client();
    let mut offset = 0u64;
    let expected = batches as u64 * records_per_batch;
    while offset < expected {
        let response = reader.fetch("firehose", 0, offset, 0);
        assert_eq!(response.error, ErrorCode::None);
        let bytes = response.records.to_bytes();
        for batch in weir_protocol::Batches::new(&bytes, true) {
            offset = batch.expect("valid batch").next_offset();
        }
    }
    assert_eq!(offset, expected);
}

/// A connection at its in-flight limit is not read: with room for four
/// requests, four long-poll fetches hold it, a fifth request waits unread,
/// and is answered as soon as the fetches complete.
#[test]
fn a_connection_at_its_in_flight_limit_is_not_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weir.toml");
    std::fs::write(&config, "in_flight_requests_max = 4\n").expect("config");
    let data = dir.path().join("data");
    let broker = BrokerProcess::start(&data, &["--config", config.to_str().expect("utf-8 path")]);
    let mut admin = broker.client();
    admin.create_topic("quiet", 1);
    let mut client = broker.client();
    let fetches: Vec<u32> = (0..4)
        .map(|_| {
            client.send(&Request::Fetch(FetchRequest {
                max_wait_ms: 30_000,
                min_bytes: 1,
                max_bytes: 1 << 20,
                partitions: vec![FetchPartition {
                    topic: "quiet".into(),
                    partition: 0,
                    fetch_offset: 0,
                    partition_max_bytes: 1 << 20,
                }],
            }))
        })
        .collect();
    let metadata = client.send(&Request::Metadata(MetadataRequest { topics: None }));
    // Nothing may come back while the fetches wait: the metadata request is unread.
    client
        .stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    assert!(
        client.read_frame_or_timeout().is_none(),
        "a request beyond the limit must not be answered"
    );
    client
        .stream
        .set_read_timeout(Some(common::DEADLINE))
        .expect("timeout");
    // Data arrives: the fetches complete, then the metadata request is read and answered.
    admin.produce("quiet", 0, batch("wake", 1, 0), 1);
    let mut answered = Vec::new();
    while answered.len() < 5 {
        let frame = client.read_frame().expect("responses");
        answered.push(frame.header.correlation_id);
    }
    assert!(fetches.iter().all(|id| answered.contains(id)));
    assert!(answered.contains(&metadata));
    assert_ne!(
        answered[0], metadata,
        "the fifth request is read only after a fetch frees a slot"
    );
}
