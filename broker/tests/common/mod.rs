//! A real `weir-broker` process on a free loopback port, and a minimal
//! blocking client speaking the wire protocol, for the integration tests.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use weir_protocol::frame::FRAME_BYTES_MAX_DEFAULT;
use weir_protocol::message::*;
use weir_protocol::{BatchBuilder, ErrorCode, Frame, FrameDecoder, Request, Response};

pub use weir_testkit::{BrokerProcess, DEADLINE};

/// A client of a test broker.
pub trait Connect {
    /// A new blocking client connection.
    fn client(&self) -> Client;
}

impl Connect for BrokerProcess {
    fn client(&self) -> Client {
        Client::connect(self.addr)
    }
}

/// One HTTP request: (status, body), or `None` if nothing answered.
/// HTTP/1.0, so that the body is never chunked (Prometheus, a Go server,
/// chunks larger HTTP/1.1 answers).
pub fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(DEADLINE)).ok()?;
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// One HTTP request to a server that must answer: (status, body).
pub fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    try_http(addr, method, path, body).unwrap_or_else(|| panic!("{method} {path} at {addr}"))
}

/// The value of one series (name and labels exactly) in the `/metrics` of
/// the broker whose admin listener is `admin`; `None` if it has none.
pub fn metric(admin: SocketAddr, series: &str) -> Option<f64> {
    let (status, body) = http(admin, "GET", "/metrics", None);
    assert_eq!(status, 200);
    body.lines()
        .filter_map(|line| line.rsplit_once(' '))
        .find(|(name, _)| *name == series)
        .and_then(|(_, value)| value.trim().parse().ok())
}

/// A blocking client: one request at a time, or pipelined by hand.
pub struct Client {
    pub stream: TcpStream,
    buffer: BytesMut,
    decoder: FrameDecoder,
    next_correlation: u32,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
        stream.set_nodelay(true).expect("nodelay");
        Client {
            stream,
            buffer: BytesMut::new(),
            decoder: FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT * 2),
            next_correlation: 1,
        }
    }

    pub fn send(&mut self, request: &Request) -> u32 {
        let correlation = self.next_correlation;
        self.next_correlation += 1;
        self.stream
            .write_all(&request.encode(correlation).to_vec())
            .expect("send");
        correlation
    }

    /// The next frame, or `None` when the broker closed the connection.
    pub fn read_frame(&mut self) -> Option<Frame> {
        self.next_frame(false)
    }

    /// The next frame, or `None` on close or when the read timeout passes.
    pub fn read_frame_or_timeout(&mut self) -> Option<Frame> {
        self.next_frame(true)
    }

    fn next_frame(&mut self, timeout_ends: bool) -> Option<Frame> {
        loop {
            if let Some(frame) = self
                .decoder
                .decode(&mut self.buffer)
                .expect("broker sends valid frames")
            {
                return Some(frame);
            }
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(read) => self.buffer.extend_from_slice(&chunk[..read]),
                Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(_) if timeout_ends => return None,
                Err(error) => panic!("read: {error}"),
            }
        }
    }

    pub fn call(&mut self, request: Request) -> Response {
        let correlation = self.send(&request);
        let frame = self.read_frame().expect("a response");
        assert_eq!(frame.header.correlation_id, correlation);
        Response::decode_body(frame.header.api_key, frame.header.api_version, frame.body)
            .expect("decodable response")
    }

    /// Waits until this broker coordinates `group` (FindCoordinator names
    /// a broker and the group's offsets are loaded), as a client does
    /// before its first group call; returns at once on a non-retriable
    /// answer (an invalid group name, say) for the call itself to show.
    pub fn find_coordinator(&mut self, group: &str) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let Response::FindCoordinator(found) =
                self.call(Request::FindCoordinator(FindCoordinatorRequest {
                    group: group.into(),
                }))
            else {
                panic!("wrong response")
            };
            if found.error == ErrorCode::None {
                let Response::OffsetFetch(fetched) =
                    self.call(Request::OffsetFetch(OffsetFetchRequest {
                        group: group.into(),
                        partitions: Some(Vec::new()),
                    }))
                else {
                    panic!("wrong response")
                };
                if fetched.error != ErrorCode::NotCoordinator {
                    return;
                }
            } else if !found.error.is_retriable() {
                return;
            }
            assert!(Instant::now() < deadline, "no coordinator for {group}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn create_topic(&mut self, name: &str, partitions: u32) {
        let Response::CreateTopics(response) =
            self.call(Request::CreateTopics(CreateTopicsRequest {
                topics: vec![NewTopic {
                    name: name.into(),
                    partitions,
                    replication_factor: 1,
                    configs: vec![],
                }],
                timeout_ms: 10_000,
            }))
        else {
            panic!("wrong response type")
        };
        assert_eq!(
            response.topics[0].error,
            ErrorCode::None,
            "{:?}",
            response.topics[0].message
        );
    }

    pub fn produce(
        &mut self,
        topic: &str,
        partition: u32,
        records: Bytes,
        acks: i8,
    ) -> ProducePartitionResponse {
        let Response::Produce(mut response) = self.call(Request::Produce(ProduceRequest {
            acks,
            timeout_ms: 30_000,
            topics: vec![ProduceTopic {
                name: topic.into(),
                partitions: vec![ProducePartition {
                    partition,
                    records: RecordSet::single(records),
                }],
            }],
        })) else {
            panic!("wrong response type")
        };
        response.topics.remove(0).partitions.remove(0)
    }

    pub fn fetch(
        &mut self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_wait_ms: u32,
    ) -> FetchPartitionResponse {
        let Response::Fetch(mut response) = self.call(Request::Fetch(FetchRequest {
            max_wait_ms,
            min_bytes: 1,
            max_bytes: 8 << 20,
            partitions: vec![FetchPartition {
                topic: topic.into(),
                partition,
                fetch_offset: offset,
                partition_max_bytes: 1 << 20,
            }],
        })) else {
            panic!("wrong response type")
        };
        response.partitions.remove(0)
    }

    /// Every record value from `from` to the high watermark, in order.
    pub fn consume_all(&mut self, topic: &str, partition: u32, from: u64) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        let mut offset = from;
        loop {
            let response = self.fetch(topic, partition, offset, 0);
            assert_eq!(response.error, ErrorCode::None);
            let bytes = response.records.to_bytes();
            if bytes.is_empty() {
                assert_eq!(
                    offset, response.high_watermark,
                    "an empty fetch means the end"
                );
                return out;
            }
            for batch in weir_protocol::Batches::new(&bytes, true) {
                let batch = batch.expect("served batches are valid");
                for record in batch.records().expect("uncompressed") {
                    let record = record.expect("record");
                    if record.offset >= offset {
                        out.push((record.offset, record.value.unwrap_or_default().to_vec()));
                    }
                }
                offset = batch.next_offset();
            }
        }
    }
}

/// A batch of `count` records whose values are `prefix-i`.
pub fn batch(prefix: &str, count: usize, timestamp_ms: i64) -> Bytes {
    let mut builder = BatchBuilder::new(timestamp_ms);
    for index in 0..count {
        builder.push(
            timestamp_ms,
            None,
            Some(format!("{prefix}-{index}").as_bytes()),
            &[],
        );
    }
    Bytes::from(builder.finish())
}

/// Creates `topic` with `partitions` partitions of three replicas on a
/// cluster once it takes writes (retrying until [`DEADLINE`]), through the
/// broker at `addr`.
pub async fn create_replicated_topic(addr: &str, topic: &str, partitions: u32) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Ok(admin) = weir_client::Admin::connect(addr).await
            && admin
                .create_topic_replicated(topic, partitions, 3)
                .await
                .is_ok()
        {
            return;
        }
        assert!(Instant::now() < deadline, "the cluster never took writes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends `count` records (`v0`, `v1`, ...) to `topic` through `bootstrap`
/// with acks=all and waits until all are acknowledged.
pub async fn produce_acknowledged(bootstrap: &str, topic: &str, count: usize) {
    let producer = weir_client::Producer::connect(
        bootstrap,
        weir_client::ProducerConfig {
            acks: weir_client::Acks::All,
            ..weir_client::ProducerConfig::default()
        },
    )
    .await
    .expect("producer");
    for number in 0..count {
        // Acknowledged by the flush below.
        drop(
            producer
                .send(
                    topic,
                    weir_client::ProducerRecord::new(format!("v{number}")),
                )
                .await
                .expect("send"),
        );
    }
    producer.flush().await.expect("flush");
}
