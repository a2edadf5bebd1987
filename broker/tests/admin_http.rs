//! The admin HTTP listener of a real broker: health, readiness, metrics and
//! the JSON topic API.

mod common;

use common::{BrokerProcess, Connect, batch, http};
use weir_protocol::ErrorCode;

/// Health and readiness answer; the JSON API creates, shows and deletes
/// topics with the right status codes; /metrics exposes traffic, latency,
/// connections, io engine and log offsets in Prometheus text.
#[test]
fn admin_http_serves_health_metrics_and_topics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let admin = broker.admin_addr;
    assert_eq!(http(admin, "GET", "/healthz", None).0, 200);
    assert_eq!(http(admin, "GET", "/readyz", None).0, 200);

    let (status, body) = http(
        admin,
        "POST",
        "/v1/topics",
        Some(r#"{"name":"web","partitions":2}"#),
    );
    assert_eq!(status, 201, "{body}");
    assert!(body.contains("\"name\":\"web\""));
    assert_eq!(
        http(
            admin,
            "POST",
            "/v1/topics",
            Some(r#"{"name":"web","partitions":2}"#)
        )
        .0,
        409
    );
    assert_eq!(
        http(
            admin,
            "POST",
            "/v1/topics",
            Some(r#"{"name":"bad name","partitions":1}"#)
        )
        .0,
        400
    );
    assert_eq!(
        http(admin, "POST", "/v1/topics", Some("not json")).0 / 100,
        4
    );

    let mut client = broker.client();
    assert_eq!(
        client.produce("web", 1, batch("hit", 5, 0), 1).error,
        ErrorCode::None
    );
    assert_eq!(client.consume_all("web", 1, 0).len(), 5);

    let (status, body) = http(admin, "GET", "/v1/topics/web", None);
    assert_eq!(status, 200);
    assert!(body.contains("\"end_offset\":5"), "{body}");
    let (status, body) = http(admin, "GET", "/v1/topics", None);
    assert_eq!(status, 200);
    assert!(body.starts_with('[') && body.contains("web"));
    let (status, body) = http(admin, "GET", "/v1/cluster", None);
    assert_eq!(status, 200);
    assert!(body.contains("\"topics\":1"), "{body}");
    // A broker alone is its own controller leader, registered and unfenced.
    assert!(body.contains("\"controller_leader\":1"), "{body}");
    assert!(body.contains("\"fenced\":false"), "{body}");
    assert_eq!(http(admin, "GET", "/v1/topics/nope", None).0, 404);

    let (status, metrics) = http(admin, "GET", "/metrics", None);
    assert_eq!(status, 200);
    for expected in [
        "weir_records_in_total{topic=\"web\"} 5",
        "weir_records_out_total{topic=\"web\"} 5",
        "weir_bytes_in_total{topic=\"web\"}",
        "weir_produce_latency_seconds_count 1",
        "weir_fetch_latency_seconds_count",
        "weir_connections 1",
        "weir_io_queue_depth",
        "weir_io_fsyncs",
        "weir_io_fsync_le_micros_bucket",
        "weir_log_end_offset{topic=\"web\",partition=\"1\"} 5",
    ] {
        let found = metrics.contains(expected)
            || (expected.ends_with("_bucket") && metrics.contains("weir_io_fsync_le_micros{"));
        assert!(found, "metrics lack {expected}:\n{metrics}");
    }

    assert_eq!(http(admin, "DELETE", "/v1/topics/web", None).0, 204);
    assert_eq!(http(admin, "DELETE", "/v1/topics/web", None).0, 404);
}

/// `GET /v1/groups` and `/metrics` report a group's members, committed
/// offsets and lag per partition.
#[test]
fn groups_and_lag_are_reported() {
    use weir_protocol::message::*;
    use weir_protocol::{ErrorCode, Request, Response};
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let admin = broker.admin_addr;
    let mut client = broker.client();
    client.create_topic("lagging", 1);
    assert_eq!(
        client
            .produce("lagging", 0, common::batch("v", 10, 1_000), 1)
            .error,
        ErrorCode::None
    );
    client.find_coordinator("readers");
    let Response::JoinGroup(member) = client.call(Request::JoinGroup(JoinGroupRequest {
        group: "readers".into(),
        member_id: String::new(),
        group_instance_id: None,
        session_timeout_ms: 30_000,
        rebalance_timeout_ms: 10_000,
        topics: vec!["lagging".into()],
        assignor: "range".into(),
    })) else {
        panic!("wrong response")
    };
    assert_eq!(member.error, ErrorCode::None);
    let Response::OffsetCommit(committed) =
        client.call(Request::OffsetCommit(OffsetCommitRequest {
            group: "readers".into(),
            generation: member.generation,
            member_id: member.member_id.clone(),
            offsets: vec![OffsetCommitPartition {
                topic: "lagging".into(),
                partition: 0,
                offset: 4,
                metadata: None,
            }],
        }))
    else {
        panic!("wrong response")
    };
    assert_eq!(committed.error, ErrorCode::None);

    let (status, body) = http(admin, "GET", "/v1/groups/readers", None);
    assert_eq!(status, 200, "{body}");
    let group: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(group["state"], "Stable");
    assert_eq!(group["members"].as_array().map(Vec::len), Some(1));
    assert_eq!(group["offsets"][0]["committed"], 4);
    assert_eq!(group["offsets"][0]["high_watermark"], 10);
    assert_eq!(group["lag"], 6);
    let (status, body) = http(admin, "GET", "/v1/groups", None);
    assert_eq!(status, 200);
    assert!(body.contains("\"readers\""), "{body}");
    assert_eq!(http(admin, "GET", "/v1/groups/nope", None).0, 404);
    let (_, metrics) = http(admin, "GET", "/metrics", None);
    for expected in [
        "weir_group_members{group=\"readers\"} 1",
        "weir_group_committed_offset{group=\"readers\",topic=\"lagging\",partition=\"0\"} 4",
        "weir_group_lag{group=\"readers\",topic=\"lagging\",partition=\"0\"} 6",
    ] {
        assert!(
            metrics.contains(expected),
            "metrics lack {expected}:\n{metrics}"
        );
    }
}
