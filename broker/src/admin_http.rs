//! Admin HTTP on its own port (axum): `/metrics`, `/healthz`, `/readyz`, and
//! a JSON API for topics and the cluster.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};

use crate::broker::Broker;

/// The admin router.
pub fn router(broker: Arc<Broker>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/v1/cluster", get(cluster))
        .route("/v1/topics", get(list_topics).post(create_topic))
        .route("/v1/topics/{name}", get(get_topic).delete(delete_topic))
        .route("/v1/groups", get(list_groups))
        .route("/v1/groups/{name}", get(get_group))
        .with_state(broker)
}

async fn metrics(State(broker): State<Arc<Broker>>) -> Response {
    let text = broker.render_metrics();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn readyz(State(broker): State<Arc<Broker>>) -> Response {
    if broker.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

#[derive(Debug, Serialize)]
struct ClusterView {
    cluster_id: String,
    broker_id: u32,
    listen: String,
    connections: u64,
    io_engine: &'static str,
    /// Topics held on this broker.
    topics: usize,
    /// The controller quorum's leader as this broker knows it.
    controller_leader: Option<u32>,
    /// Every registered broker, fenced ones included.
    brokers: Vec<BrokerView>,
}

#[derive(Debug, Serialize)]
struct BrokerView {
    id: u32,
    host: String,
    port: u16,
    rack: Option<String>,
    incarnation: u64,
    /// Fenced: missed its session (or its process died); leads nothing.
    fenced: bool,
}

async fn cluster(State(broker): State<Arc<Broker>>) -> Json<ClusterView> {
    Json(ClusterView {
        cluster_id: broker.config.cluster_id.clone(),
        broker_id: broker.config.broker_id,
        listen: broker.config.listen.to_string(),
        connections: broker.connections.load(Ordering::Relaxed),
        io_engine: broker.engine.kind_name(),
        topics: broker.topics.all().len(),
        controller_leader: broker.controller.leader(),
        brokers: broker
            .controller
            .view()
            .image
            .brokers
            .values()
            .map(|registration| BrokerView {
                id: registration.id,
                host: registration.host.clone(),
                port: registration.port,
                rack: registration.rack.clone(),
                incarnation: registration.incarnation,
                fenced: registration.fenced,
            })
            .collect(),
    })
}

#[derive(Debug, Serialize)]
struct PartitionView {
    partition: u32,
    leader_epoch: i32,
    start_offset: u64,
    end_offset: u64,
    high_watermark: u64,
    size_bytes: u64,
    segments: usize,
}

#[derive(Debug, Serialize)]
struct TopicView {
    name: String,
    partitions: Vec<PartitionView>,
    configs: std::collections::BTreeMap<String, String>,
}

fn topic_view(topic: &crate::topics::Topic) -> TopicView {
    TopicView {
        name: topic.name.clone(),
        configs: topic.spec.configs.clone(),
        partitions: topic
            .partitions
            .iter()
            .map(|partition| PartitionView {
                partition: partition.index,
                leader_epoch: partition.leader_epoch(),
                start_offset: partition.log.start_offset(),
                end_offset: partition.log.end_offset(),
                high_watermark: partition.high_watermark(),
                size_bytes: partition.log.size_bytes(),
                segments: partition.log.segment_count(),
            })
            .collect(),
    }
}

async fn list_topics(State(broker): State<Arc<Broker>>) -> Json<Vec<TopicView>> {
    Json(
        broker
            .topics
            .all()
            .iter()
            .map(|topic| topic_view(topic))
            .collect(),
    )
}

async fn get_topic(State(broker): State<Arc<Broker>>, Path(name): Path<String>) -> Response {
    match broker.topics.get(&name) {
        Some(topic) => Json(topic_view(&topic)).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no topic {name}")),
    }
}

#[derive(Debug, Serialize)]
struct GroupView {
    group: String,
    state: String,
    assignor: String,
    generation: i32,
    members: Vec<GroupMemberView>,
    /// Committed offset, end and lag per partition.
    offsets: Vec<GroupOffsetView>,
    /// Sum of the partitions' lag.
    lag: u64,
}

#[derive(Debug, Serialize)]
struct GroupMemberView {
    member_id: String,
    instance_id: Option<String>,
    topics: Vec<String>,
    assignment: Vec<String>,
}

#[derive(Debug, Serialize)]
struct GroupOffsetView {
    topic: String,
    partition: u32,
    committed: i64,
    high_watermark: u64,
    lag: u64,
}

fn group_view(broker: &Broker, name: &str) -> Option<GroupView> {
    let description = broker.groups.describe(
        &broker.topics,
        &weir_protocol::message::DescribeGroupRequest {
            group: name.to_string(),
        },
    );
    if !description.error.is_ok() {
        return None;
    }
    Some(GroupView {
        lag: description.offsets.iter().map(|offset| offset.lag).sum(),
        group: description.group,
        state: description.state,
        assignor: description.assignor,
        generation: description.generation,
        members: description
            .members
            .into_iter()
            .map(|member| GroupMemberView {
                member_id: member.member_id,
                instance_id: member.group_instance_id,
                topics: member.topics,
                assignment: member
                    .assignment
                    .into_iter()
                    .map(|owned| format!("{}-{}", owned.topic, owned.partition))
                    .collect(),
            })
            .collect(),
        offsets: description
            .offsets
            .into_iter()
            .map(|offset| GroupOffsetView {
                topic: offset.topic,
                partition: offset.partition,
                committed: offset.committed,
                high_watermark: offset.high_watermark,
                lag: offset.lag,
            })
            .collect(),
    })
}

async fn list_groups(State(broker): State<Arc<Broker>>) -> Json<Vec<GroupView>> {
    Json(
        broker
            .groups
            .group_names()
            .iter()
            .filter_map(|name| group_view(&broker, name))
            .collect(),
    )
}

async fn get_group(State(broker): State<Arc<Broker>>, Path(name): Path<String>) -> Response {
    match group_view(&broker, &name) {
        Some(view) => Json(view).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no group {name}")),
    }
}

#[derive(Debug, Deserialize)]
struct CreateTopic {
    name: String,
    #[serde(default)]
    partitions: Option<u32>,
    #[serde(default)]
    configs: std::collections::BTreeMap<String, String>,
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

fn topic_error_status(error: &crate::topics::TopicError) -> StatusCode {
    use weir_protocol::ErrorCode;
    match error.code() {
        ErrorCode::TopicAlreadyExists => StatusCode::CONFLICT,
        ErrorCode::UnknownTopicOrPartition => StatusCode::NOT_FOUND,
        ErrorCode::InvalidTopic | ErrorCode::InvalidRequest => StatusCode::BAD_REQUEST,
        ErrorCode::StorageFull => StatusCode::INSUFFICIENT_STORAGE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

async fn create_topic(
    State(broker): State<Arc<Broker>>,
    Json(request): Json<CreateTopic>,
) -> Response {
    if crate::topics::is_internal(&request.name) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{} is internal", request.name),
        );
    }
    let partitions = request
        .partitions
        .unwrap_or(broker.config.default_partitions);
    match broker
        .create_topic(&request.name, partitions, 0, request.configs)
        .await
    {
        Ok(()) => match broker.topics.get(&request.name) {
            Some(topic) => (StatusCode::CREATED, Json(topic_view(&topic))).into_response(),
            None => error(StatusCode::INTERNAL_SERVER_ERROR, "topic vanished".into()),
        },
        Err(failure) => error(topic_error_status(&failure), failure.to_string()),
    }
}

async fn delete_topic(State(broker): State<Arc<Broker>>, Path(name): Path<String>) -> Response {
    if crate::topics::is_internal(&name) {
        return error(StatusCode::BAD_REQUEST, format!("{name} is internal"));
    }
    match broker.delete_topic(&name).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(failure) => error(topic_error_status(&failure), failure.to_string()),
    }
}
