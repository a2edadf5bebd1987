//! Tests of the wire protocol: frames, every message's round trip, and the
//! refusal of bad input with typed errors.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use weir_protocol::api::{ApiKey, ErrorCode};
use weir_protocol::frame::{self, FRAME_BYTES_MAX_DEFAULT, HEADER_BYTES, LENGTH_BYTES};
use weir_protocol::message::*;
use weir_protocol::wire::WireError;
use weir_protocol::{
    DecodeError, FrameDecoder, FrameError, FrameHeader, FrameKind, Request, Response,
};

fn decode_one(bytes: &[u8]) -> Result<Option<weir_protocol::Frame>, FrameError> {
    let mut buffer = BytesMut::from(bytes);
    FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT).decode(&mut buffer)
}

fn batch() -> Bytes {
    let mut builder = weir_protocol::BatchBuilder::new(7);
    builder.push(7, Some(b"k"), Some(b"value"), &[]);
    Bytes::from(builder.finish())
}

fn sample_requests() -> Vec<Request> {
    vec![
        Request::Handshake(HandshakeRequest {
            client_name: "weir-test".into(),
            api_versions: vec![ApiVersionRange {
                api_key: 5,
                min_version: 0,
                max_version: 0,
            }],
        }),
        Request::Metadata(MetadataRequest { topics: None }),
        Request::Metadata(MetadataRequest {
            topics: Some(vec!["a".into(), "b".into()]),
        }),
        Request::CreateTopics(CreateTopicsRequest {
            topics: vec![NewTopic {
                name: "orders".into(),
                partitions: 12,
                replication_factor: 1,
                configs: vec![ConfigEntry {
                    key: "retention.ms".into(),
                    value: "1000".into(),
                }],
            }],
            timeout_ms: 5000,
        }),
        Request::DeleteTopics(DeleteTopicsRequest {
            names: vec!["orders".into()],
            timeout_ms: 1,
        }),
        Request::DescribeTopics(DescribeTopicsRequest { names: vec![] }),
        Request::Produce(ProduceRequest {
            acks: -1,
            timeout_ms: 30_000,
            topics: vec![ProduceTopic {
                name: "orders".into(),
                partitions: vec![ProducePartition {
                    partition: 3,
                    records: RecordSet::single(batch()),
                }],
            }],
        }),
        Request::Fetch(FetchRequest {
            max_wait_ms: 500,
            min_bytes: 1,
            max_bytes: 1 << 20,
            partitions: vec![FetchPartition {
                topic: "orders".into(),
                partition: 0,
                fetch_offset: 42,
                partition_max_bytes: 1 << 20,
            }],
        }),
        Request::Subscribe(SubscribeRequest {
            subscription_id: 9,
            topic: "orders".into(),
            partition: 1,
            offset: 0,
            credit_bytes: 4 << 20,
        }),
        Request::Credit(CreditRequest {
            subscription_id: 9,
            credit_bytes: 1 << 20,
        }),
        Request::Unsubscribe(UnsubscribeRequest { subscription_id: 9 }),
        Request::ListOffsets(ListOffsetsRequest {
            partitions: vec![ListOffsetsPartition {
                topic: "orders".into(),
                partition: 0,
                spec: OFFSET_SPEC_EARLIEST,
            }],
        }),
    ]
}

fn sample_responses() -> Vec<Response> {
    vec![
        Response::Handshake(HandshakeResponse {
            error: ErrorCode::None,
            broker_id: 1,
            cluster_id: "c".into(),
            api_versions: ApiKey::ALL
                .iter()
                .map(|key| ApiVersionRange {
                    api_key: key.code(),
                    min_version: 0,
                    max_version: 0,
                })
                .collect(),
            frame_bytes_max: 1 << 24,
            in_flight_bytes_max: 1 << 26,
        }),
        Response::Metadata(MetadataResponse {
            cluster_id: "c".into(),
            controller_id: -1,
            brokers: vec![BrokerInfo {
                id: 1,
                host: "127.0.0.1".into(),
                port: 9092,
            }],
            topics: vec![TopicMetadata {
                error: ErrorCode::None,
                name: "orders".into(),
                partitions: vec![PartitionMetadata {
                    error: ErrorCode::None,
                    partition: 0,
                    leader: 1,
                    leader_epoch: 0,
                    replicas: vec![1],
                    in_sync_replicas: vec![1],
                }],
            }],
            fenced_brokers: vec![2],
        }),
        Response::Produce(ProduceResponse {
            topics: vec![ProduceTopicResponse {
                name: "orders".into(),
                partitions: vec![ProducePartitionResponse {
                    partition: 0,
                    error: ErrorCode::NotLeader,
                    base_offset: -1,
                    log_append_time_ms: 5,
                    log_start_offset: 0,
                }],
            }],
        }),
        Response::Fetch(FetchResponse {
            partitions: vec![FetchPartitionResponse {
                topic: "orders".into(),
                partition: 0,
                error: ErrorCode::None,
                high_watermark: 10,
                log_start_offset: 0,
                records: RecordSet(vec![batch(), batch()]),
            }],
        }),
        Response::Credit(SubscriptionAck {
            error: ErrorCode::UnknownSubscription,
        }),
        Response::ListOffsets(ListOffsetsResponse {
            partitions: vec![ListOffsetsPartitionResponse {
                topic: "orders".into(),
                partition: 0,
                error: ErrorCode::None,
                offset: 17,
                timestamp_ms: -1,
            }],
        }),
    ]
}

/// Every sample request and response survives encode -> frame decode ->
/// message decode, with record bytes intact (chunked records are joined).
#[test]
fn messages_round_trip() {
    for request in sample_requests() {
        let encoded = request.encode(77).to_vec();
        let frame = decode_one(&encoded)
            .expect("valid frame")
            .expect("complete");
        assert_eq!(frame.header.kind, FrameKind::Request);
        assert_eq!(frame.header.correlation_id, 77);
        let decoded =
            Request::decode_body(frame.header.api_key, frame.header.api_version, frame.body)
                .expect("decodes");
        assert_eq!(decoded, request);
    }
    for response in sample_responses() {
        let encoded = response.encode(5).to_vec();
        let frame = decode_one(&encoded)
            .expect("valid frame")
            .expect("complete");
        let decoded = Response::decode_body(frame.header.api_key, 0, frame.body).expect("decodes");
        let expected = match response {
            Response::Fetch(mut fetch) => {
                for partition in &mut fetch.partitions {
                    partition.records = RecordSet::single(partition.records.to_bytes());
                }
                Response::Fetch(fetch)
            }
            other => other,
        };
        assert_eq!(decoded, expected);
    }
    let push = SubscriptionPush {
        error: ErrorCode::None,
        high_watermark: 3,
        records: RecordSet::single(batch()),
    };
    let encoded = push.encode(9).to_vec();
    let frame = decode_one(&encoded).expect("valid").expect("complete");
    assert_eq!(
        (frame.header.kind, frame.header.correlation_id),
        (FrameKind::Push, 9)
    );
    assert_eq!(SubscriptionPush::decode(frame.body).expect("decodes"), push);
}

/// Records are carried as separate parts, never copied into the header buffer.
#[test]
fn record_bytes_are_not_copied() {
    let records = batch();
    let response = Response::Fetch(FetchResponse {
        partitions: vec![FetchPartitionResponse {
            topic: "t".into(),
            partition: 0,
            error: ErrorCode::None,
            high_watermark: 1,
            log_start_offset: 0,
            records: RecordSet::single(records.clone()),
        }],
    });
    let encoded = response.encode(1);
    assert!(
        encoded
            .parts
            .iter()
            .any(|part| part.as_ptr() == records.as_ptr() && part.len() == records.len()),
        "the record chunk is one of the frame's parts"
    );
}

/// A stream of frames split at every byte boundary decodes the same.
#[test]
fn frames_decode_incrementally() {
    let mut stream = Vec::new();
    for (index, request) in sample_requests().iter().enumerate() {
        stream.extend(request.encode(index as u32).to_vec());
    }
    let decoder = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
    let mut buffer = BytesMut::new();
    let mut seen = Vec::new();
    for byte in stream {
        buffer.extend_from_slice(&[byte]);
        while let Some(frame) = decoder.decode(&mut buffer).expect("valid stream") {
            seen.push(frame.header.correlation_id);
        }
    }
    assert_eq!(
        seen,
        (0..sample_requests().len() as u32).collect::<Vec<_>>()
    );
    assert!(buffer.is_empty());
}

/// Each kind of bad frame gets its own typed error.
#[test]
fn bad_frames_are_refused() {
    let decoder = FrameDecoder::new(1024);
    let mut huge = BytesMut::from(&(1_000_000u32).to_be_bytes()[..]);
    assert_eq!(
        decoder.decode(&mut huge),
        Err(FrameError::TooLarge {
            length: 1_000_000,
            limit: 1024
        }),
        "refused from the prefix alone, before the bytes arrive"
    );
    let mut short = BytesMut::from(&3u32.to_be_bytes()[..]);
    assert_eq!(decoder.decode(&mut short), Err(FrameError::TooShort(3)));
    let header = FrameHeader {
        kind: FrameKind::Request,
        api_key: 1,
        api_version: 0,
        correlation_id: 1,
    };
    let mut bad_kind = frame::encode(&header, &[]);
    bad_kind[LENGTH_BYTES] = 9;
    assert_eq!(
        decoder.decode(&mut bad_kind),
        Err(FrameError::UnknownKind(9))
    );
    let mut bad_flags = frame::encode(&header, &[]);
    bad_flags[LENGTH_BYTES + HEADER_BYTES - 1] = 1;
    assert_eq!(
        decoder.decode(&mut bad_flags),
        Err(FrameError::UnsupportedFlags(1))
    );
}

/// Unknown APIs and versions, truncated and over-long bodies, and trailing
/// bytes are typed decode errors with the code the broker answers with.
#[test]
fn bad_bodies_are_refused() {
    assert_eq!(
        Request::decode_body(999, 0, Bytes::new()),
        Err(DecodeError::UnsupportedApi(999))
    );
    let unsupported = Request::decode_body(ApiKey::Produce.code(), 7, Bytes::new());
    assert!(matches!(
        unsupported,
        Err(DecodeError::UnsupportedVersion {
            api: ApiKey::Produce,
            version: 7
        })
    ));
    assert_eq!(
        unsupported.expect_err("unsupported").error_code(),
        ErrorCode::UnsupportedVersion
    );

    let request = Request::Fetch(FetchRequest {
        max_wait_ms: 1,
        min_bytes: 1,
        max_bytes: 1,
        partitions: vec![],
    });
    let body = request.encode_body().into_bytes();
    let truncated = Request::decode_body(ApiKey::Fetch.code(), 0, body.slice(..body.len() - 1));
    assert!(matches!(
        truncated,
        Err(DecodeError::Wire(WireError::Truncated { .. }))
    ));
    let mut trailing = body.to_vec();
    trailing.push(0);
    assert_eq!(
        Request::decode_body(ApiKey::Fetch.code(), 0, trailing.into()),
        Err(DecodeError::Wire(WireError::TrailingBytes { extra: 1 }))
    );
    // A count of 2^32-2 topics in a 6-byte body is refused before allocating.
    let mut lying = vec![0u8; 0];
    lying.extend_from_slice(&(u32::MAX - 1).to_be_bytes());
    lying.extend_from_slice(&[0, 0]);
    assert!(matches!(
        Request::decode_body(ApiKey::Metadata.code(), 0, lying.into()),
        Err(DecodeError::Wire(WireError::TooLong { .. }))
    ));
    // A string that is not UTF-8.
    let mut not_utf8 = vec![0, 0, 0, 1, 0, 2, 0xff, 0xfe];
    not_utf8.truncate(8);
    assert!(matches!(
        Request::decode_body(ApiKey::DescribeTopics.code(), 0, not_utf8.into()),
        Err(DecodeError::Wire(WireError::NotUtf8 { .. }))
    ));
}

proptest! {
    /// Arbitrary bytes never panic the frame decoder or any message decoder.
    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300), api in 0u16..12) {
        let _ = decode_one(&bytes);
        let _ = Request::decode_body(api, 0, Bytes::from(bytes.clone()));
        let _ = Response::decode_body(api, 0, Bytes::from(bytes.clone()));
        let _ = SubscriptionPush::decode(Bytes::from(bytes));
    }

    /// Produce requests with arbitrary topics and record bytes round-trip.
    #[test]
    fn produce_round_trips(names in proptest::collection::vec("[a-z]{1,20}", 0..5), records in proptest::collection::vec(any::<u8>(), 0..200), acks in -1i8..2) {
        let request = Request::Produce(ProduceRequest {
            acks,
            timeout_ms: 1,
            topics: names.iter().map(|name| ProduceTopic {
                name: name.clone(),
                partitions: vec![ProducePartition { partition: 0, records: RecordSet::single(Bytes::from(records.clone())) }],
            }).collect(),
        });
        let encoded = request.encode(3).to_vec();
        let frame = decode_one(&encoded).expect("valid").expect("complete");
        let decoded = Request::decode_body(frame.header.api_key, 0, frame.body).expect("decodes");
        prop_assert_eq!(decoded, request);
    }
}
