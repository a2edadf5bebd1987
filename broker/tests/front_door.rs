//! The broker's front door against careless and hostile clients, over raw
//! sockets to a real broker process: half-sent frames and idle connections
//! are closed (but not subscriptions or long polls), one address cannot
//! take every connection slot, and the memory of connection bursts comes
//! back once they close.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{BrokerProcess, Client, Connect, DEADLINE, batch, http};
use weir_protocol::message::*;
use weir_protocol::{ErrorCode, FrameKind, Request, Response};

/// A raw connection with a read timeout of [`DEADLINE`].
fn raw(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    stream
}

/// Waits until the broker closes `stream` (EOF or reset), reading and
/// dropping anything it sends first; panics if it is still open after the
/// deadline.
fn wait_closed(stream: &mut TcpStream) -> Duration {
    let started = Instant::now();
    let mut scratch = [0u8; 4096];
    loop {
        match stream.read(&mut scratch) {
            Ok(0) => return started.elapsed(),
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {
                return started.elapsed();
            }
            Err(error) => panic!("still open after {:?}: {error}", started.elapsed()),
        }
    }
}

/// The value of one series of the broker's `/metrics` (0 when absent).
fn metric(admin: SocketAddr, series: &str) -> u64 {
    common::metric(admin, series).map_or(0, |value| value as u64)
}

/// Waits until `series` reaches `at_least`.
fn wait_metric(admin: SocketAddr, series: &str, at_least: u64) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let value = metric(admin, series);
        if value >= at_least {
            return;
        }
        assert!(Instant::now() < deadline, "{series} = {value} < {at_least}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Connections that send part of a frame and hold the socket are closed
/// once the frame timeout passes, and counted; the broker serves others
/// throughout.
#[test]
fn half_sent_frames_are_closed_after_the_frame_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &["--frame-timeout-ms", "500"]);
    // Four slowloris connections: 100 bytes of a 1,004-byte frame each.
    let mut held: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut stream = raw(broker.addr);
            let mut partial = 1000u32.to_be_bytes().to_vec();
            partial.resize(100, 7);
            stream.write_all(&partial).expect("send part of a frame");
            stream
        })
        .collect();
    for stream in &mut held {
        let waited = wait_closed(stream);
        assert!(waited < DEADLINE, "closed by the frame timeout");
    }
    wait_metric(
        broker.admin_addr,
        "weir_connections_closed_total{reason=\"frame_timeout\"}",
        4,
    );
    let mut client = broker.client();
    client.create_topic("after-slowloris", 1);
    let response = client.produce("after-slowloris", 0, batch("v", 3, 0), 1);
    assert_eq!(response.error, ErrorCode::None);
}

/// An idle connection is closed after `connections_max_idle_ms`; one with
/// a subscription, or a long poll in progress, is not, however long it is
/// quiet; the idle clock of a connection starts again at its last answer.
#[test]
fn idle_connections_close_but_subscriptions_and_long_polls_stay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &["--connections-max-idle-ms", "2000"]);
    let mut admin = broker.client();
    admin.create_topic("quiet", 1);
    drop(admin);

    let mut subscriber = broker.client();
    let Response::Subscribe(subscribed) = subscriber.call(Request::Subscribe(SubscribeRequest {
        subscription_id: 7,
        topic: "quiet".into(),
        partition: 0,
        offset: 0,
        credit_bytes: 1 << 20,
    })) else {
        panic!("wrong response")
    };
    assert_eq!(subscribed.error, ErrorCode::None);

    // A long poll of two and a half idle periods on the empty partition.
    let mut poller = broker.client();
    let correlation = poller.send(&Request::Fetch(FetchRequest {
        max_wait_ms: 5_000,
        min_bytes: 1,
        max_bytes: 1 << 20,
        partitions: vec![FetchPartition {
            topic: "quiet".into(),
            partition: 0,
            fetch_offset: 0,
            partition_max_bytes: 1 << 20,
        }],
    }));
    let polled = Instant::now();

    let mut idle = raw(broker.addr);
    wait_closed(&mut idle);
    // The long poll is answered, not cut off by the idle limit.
    let frame = poller.read_frame().expect("the long poll's answer");
    let answered = Instant::now();
    assert_eq!(frame.header.correlation_id, correlation);
    assert!(
        polled.elapsed() >= Duration::from_millis(4_900),
        "it waited its full time"
    );
    // The subscriber has been quiet for longer than the idle limit too,
    // and still receives what is produced.
    let mut producer = broker.client();
    let response = producer.produce("quiet", 0, batch("late", 2, 0), 1);
    assert_eq!(response.error, ErrorCode::None);
    let push = subscriber
        .read_frame()
        .expect("a push after the quiet spell");
    assert_eq!(push.header.kind, FrameKind::Push);
    assert_eq!(push.header.correlation_id, 7);
    // Once its poll is answered, the poller is idle and goes too: one
    // idle period after the answer (not two, nor at once).
    wait_closed(&mut poller.stream);
    let quiet = answered.elapsed();
    assert!(
        quiet >= Duration::from_millis(1_900) && quiet < Duration::from_millis(3_500),
        "closed {quiet:?} after its answer"
    );
    assert!(
        metric(
            broker.admin_addr,
            "weir_connections_closed_total{reason=\"idle\"}"
        ) >= 2
    );
}

/// One address gets at most `connections_max_per_address` connections:
/// the next is refused with TooManyConnections and counted, and a slot
/// freed by a close is available again.
#[test]
fn connections_per_address_are_limited() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &["--connections-max-per-address", "2"]);
    let first = broker.client();
    let mut second = broker.client();
    second.create_topic("limited", 1);
    let mut refused = Client::connect(broker.addr);
    let frame = refused.read_frame().expect("the refusal frame");
    assert_eq!(
        frame.body.as_ref(),
        &ErrorCode::TooManyConnections.code().to_be_bytes()
    );
    assert!(refused.read_frame().is_none(), "then closed");
    assert_eq!(
        metric(
            broker.admin_addr,
            "weir_connections_refused_total{reason=\"address_limit\"}"
        ),
        1
    );
    drop(first);
    // The freed slot is taken back once the broker has seen the close.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let mut third = Client::connect(broker.addr);
        let correlation = third.send(&Request::Metadata(MetadataRequest { topics: None }));
        let frame = third.read_frame().expect("an answer");
        if frame.header.correlation_id == correlation {
            break;
        }
        assert!(Instant::now() < deadline, "the slot never came back");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Anonymous memory of the broker process, bytes.
fn rss_anon_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("RssAnon:"))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|kib| kib.parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .expect("RssAnon")
}

/// Rounds of 1,500 connections opened at once and closed again leave the
/// broker's anonymous memory near where it started (they used to leave
/// ~6.5 KB each behind, round after round), and an open idle connection
/// costs a few kilobytes, not its buffers.
#[test]
fn connection_bursts_give_their_memory_back() {
    const ROUND_CONNECTIONS: usize = 1_500;
    const ROUNDS: usize = 6;
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let pid = broker.child.id();
    // Warm up what every broker allocates once (metrics, first requests).
    let mut warm = broker.client();
    warm.create_topic("warm", 1);
    drop(warm);
    let _ = http(broker.admin_addr, "GET", "/metrics", None);
    let started = rss_anon_bytes(pid);
    let mut peak_per_connection = 0;
    for _ in 0..ROUNDS {
        let open: Vec<TcpStream> = (0..ROUND_CONNECTIONS)
            .map(|_| TcpStream::connect(broker.addr).expect("connect"))
            .collect();
        wait_metric(
            broker.admin_addr,
            "weir_connections",
            ROUND_CONNECTIONS as u64,
        );
        let held = rss_anon_bytes(pid).saturating_sub(started);
        peak_per_connection = peak_per_connection.max(held / ROUND_CONNECTIONS as u64);
        drop(open);
        let deadline = Instant::now() + DEADLINE;
        while metric(broker.admin_addr, "weir_connections") > 0 {
            assert!(Instant::now() < deadline, "connections never closed");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert!(
        peak_per_connection <= 16 * 1024,
        "an idle connection holds {peak_per_connection} bytes"
    );
    // The memory of the bursts comes back (the broker trims its heap
    // after connections go).
    let allowed = started + (4 << 20);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let now = rss_anon_bytes(pid);
        if now <= allowed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "anonymous memory {now} bytes after the bursts, {started} before"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
