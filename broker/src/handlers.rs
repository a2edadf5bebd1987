//! One function per API: a request in, a response out (none for acks = 0).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use weir_protocol::message::*;
use weir_protocol::{ApiKey, ErrorCode, Request, Response};
use weir_storage::StorageError;

use crate::context::{ConnectionContext, PushSender, SubscriptionControl};
use crate::partition::{Partition, storage_error_code};
use crate::topics::Topic;
use crate::topics::{OFFSETS_TOPIC, TOPICS_PER_REQUEST_MAX, is_internal};

/// Subscriptions one connection may hold: each has a push task.
pub const SUBSCRIPTIONS_PER_CONNECTION_MAX: usize = 1024;

/// Distinct names, at most `TOPICS_PER_REQUEST_MAX`; `Err` with the count if more.
fn distinct_names(names: Vec<String>) -> Result<Vec<String>, usize> {
    let mut seen = std::collections::HashSet::new();
    let distinct: Vec<String> = names
        .into_iter()
        .filter(|name| seen.insert(name.clone()))
        .collect();
    if distinct.len() > TOPICS_PER_REQUEST_MAX {
        Err(distinct.len())
    } else {
        Ok(distinct)
    }
}

/// Longest producer name InitProducerId accepts.
pub const PRODUCER_NAME_BYTES_MAX: usize = 256;

/// Answers one request.
pub async fn handle(context: &Arc<ConnectionContext>, request: Request) -> Option<Response> {
    let broker = &context.broker;
    Some(match request {
        Request::Handshake(_) => Response::Handshake(HandshakeResponse {
            error: ErrorCode::None,
            broker_id: broker.config.broker_id,
            cluster_id: broker.config.cluster_id.clone(),
            api_versions: ApiKey::ALL
                .iter()
                .map(|key| ApiVersionRange {
                    api_key: key.code(),
                    min_version: key.versions().0,
                    max_version: key.versions().1,
                })
                .collect(),
            frame_bytes_max: u32::try_from(broker.config.frame_bytes_max).unwrap_or(u32::MAX),
            in_flight_bytes_max: u32::try_from(broker.config.in_flight_bytes_max)
                .unwrap_or(u32::MAX),
        }),
        Request::Metadata(request) => Response::Metadata(metadata(context, request)),
        Request::Controller(request) => {
            if request.kind == crate::cluster::controller::kind::HEARTBEAT
                && let Ok(heartbeat) = serde_json::from_slice::<crate::cluster::controller::Heartbeat>(
                    &request.payload,
                )
            {
                *context
                    .heartbeats_from
                    .lock()
                    .unwrap_or_else(|poison| poison.into_inner()) =
                    Some((heartbeat.broker, heartbeat.incarnation));
            }
            Response::Controller(broker.controller.handle(request).await)
        }
        Request::ReplicaFetch(request) => {
            Response::ReplicaFetch(replica_fetch(context, request).await)
        }
        Request::ReassignPartition(request) => {
            Response::ReassignPartition(reassign_partition(broker, request).await)
        }
        Request::CreateTopics(request) => {
            Response::CreateTopics(create_topics(context, request).await)
        }
        Request::DeleteTopics(request) => {
            Response::DeleteTopics(delete_topics(context, request).await)
        }
        Request::DescribeTopics(request) => {
            Response::DescribeTopics(describe_topics(context, request))
        }
        Request::Produce(request) => {
            let submitted = submit_produce(context, request);
            return finish_produce(context, submitted)
                .await
                .map(Response::Produce);
        }
        Request::Fetch(request) => Response::Fetch(fetch(context, request).await),
        Request::FindCoordinator(request) => {
            Response::FindCoordinator(find_coordinator(broker, &request).await)
        }
        Request::JoinGroup(request) => {
            Response::JoinGroup(broker.groups.join(&broker.topics, request).await)
        }
        Request::SyncGroup(request) => Response::SyncGroup(broker.groups.sync(&request)),
        Request::Heartbeat(request) => Response::Heartbeat(broker.groups.heartbeat(&request)),
        Request::LeaveGroup(request) => {
            Response::LeaveGroup(broker.groups.leave(&broker.topics, &request))
        }
        Request::OffsetCommit(request) => {
            Response::OffsetCommit(broker.groups.commit(&broker.topics, request).await)
        }
        Request::OffsetFetch(request) => Response::OffsetFetch(broker.groups.fetch(&request)),
        Request::ListGroups(_) => Response::ListGroups(broker.groups.list()),
        Request::DescribeGroup(request) => {
            Response::DescribeGroup(broker.groups.describe(&broker.topics, &request))
        }
        Request::InitProducerId(request) => {
            let name = request.producer_name;
            let outcome = if name
                .as_ref()
                .is_some_and(|name| name.len() > PRODUCER_NAME_BYTES_MAX)
            {
                Err(ErrorCode::InvalidRequest)
            } else {
                if let Some(at_least) = broker.producer_ids.needs_block() {
                    let command = crate::cluster::metadata::MetadataCommand::AllocateProducerIds {
                        broker: broker.config.broker_id,
                        at_least,
                    };
                    match broker.controller.propose(command).await {
                        Ok(crate::cluster::metadata::MetadataOutcome::ProducerIds(first)) => {
                            broker.producer_ids.grant_block(
                                first,
                                first + crate::cluster::metadata::PRODUCER_ID_BLOCK,
                            );
                        }
                        Ok(_) => {}
                        Err(error) => {
                            tracing::warn!(%error, "no producer id block from the controller");
                        }
                    }
                }
                // One small file written and synced: off the worker's queue.
                crate::blocking::blocking(|| broker.producer_ids.init(name.as_deref()))
            };
            Response::InitProducerId(match outcome {
                Ok((producer_id, producer_epoch)) => InitProducerIdResponse {
                    error: ErrorCode::None,
                    producer_id,
                    producer_epoch,
                },
                Err(error) => InitProducerIdResponse {
                    error,
                    producer_id: -1,
                    producer_epoch: -1,
                },
            })
        }
        Request::Subscribe(request) => Response::Subscribe(subscribe(context, request)),
        Request::Credit(request) => Response::Credit(credit(context, request)),
        Request::Unsubscribe(request) => Response::Unsubscribe(unsubscribe(context, request)),
        Request::ListOffsets(request) => Response::ListOffsets(list_offsets(context, request)),
    })
}

fn partition_metadata(
    partitions: &[crate::cluster::metadata::PartitionState],
) -> Vec<PartitionMetadata> {
    partitions
        .iter()
        .enumerate()
        .map(|(index, state)| PartitionMetadata {
            error: if state.leader.is_some() {
                ErrorCode::None
            } else {
                ErrorCode::NotLeader
            },
            partition: index as u32,
            leader: state
                .leader
                .and_then(|leader| i32::try_from(leader).ok())
                .unwrap_or(-1),
            leader_epoch: state.leader_epoch,
            replicas: state.replicas.clone(),
            in_sync_replicas: state.isr.clone(),
        })
        .collect()
}

/// ReassignPartition: proposes the move to the controller; the controller
/// completes it once the new replicas are in sync.
async fn reassign_partition(
    broker: &crate::broker::Broker,
    request: ReassignPartitionRequest,
) -> ReassignPartitionResponse {
    let command = crate::cluster::metadata::MetadataCommand::ReassignPartition {
        topic: request.topic,
        partition: request.partition,
        replicas: request.replicas,
    };
    match broker.controller.propose(command).await {
        Ok(_) => ReassignPartitionResponse {
            error: ErrorCode::None,
            message: String::new(),
        },
        Err(error) => {
            let error = crate::topics::TopicError::from_controller(error);
            ReassignPartitionResponse {
                error: error.code(),
                message: error.to_string(),
            }
        }
    }
}

/// FindCoordinator: the leader of the group's offsets partition, creating
/// the offsets topic (RF = min(3, controller voters)) on the cluster's
/// first group. `CoordinatorNotAvailable` while it has no leader.
async fn find_coordinator(
    broker: &crate::broker::Broker,
    request: &FindCoordinatorRequest,
) -> FindCoordinatorResponse {
    let refuse = |error| FindCoordinatorResponse {
        error,
        broker_id: -1,
        host: String::new(),
        port: 0,
    };
    if request.group.is_empty() || request.group.len() > crate::groups::GROUP_NAME_BYTES_MAX {
        return refuse(ErrorCode::InvalidRequest);
    }
    if !broker
        .controller
        .view()
        .image
        .topics
        .contains_key(OFFSETS_TOPIC)
        && let Err(error) = broker.create_offsets_topic().await
        && error.code() != ErrorCode::TopicAlreadyExists
    {
        tracing::warn!(%error, "cannot create {OFFSETS_TOPIC} yet");
        return refuse(ErrorCode::CoordinatorNotAvailable);
    }
    let view = broker.controller.view();
    let Some(topic) = view.image.topics.get(OFFSETS_TOPIC) else {
        return refuse(ErrorCode::CoordinatorNotAvailable);
    };
    let index = crate::groups::offsets_partition(&request.group, topic.partitions.len() as u32);
    let leader = topic
        .partitions
        .get(index as usize)
        .and_then(|partition| partition.leader);
    if leader == Some(broker.config.broker_id)
        && broker.groups.check_coordinator(&request.group).is_err()
    {
        // Led here but not loaded yet (just created, or just elected): load
        // now rather than at the reaper's next round, so the group calls
        // that follow find their coordinator ready.
        crate::blocking::blocking(|| broker.groups.follow_leadership(&broker.topics));
        if broker.groups.check_coordinator(&request.group).is_err() {
            // Still not loaded (its load failed, or a commit holds the
            // partition): not a coordinator to send anyone to yet.
            return refuse(ErrorCode::CoordinatorNotAvailable);
        }
    }
    match leader {
        Some(leader) if leader == broker.config.broker_id => FindCoordinatorResponse {
            error: ErrorCode::None,
            broker_id: i32::try_from(leader).unwrap_or(-1),
            host: broker.advertised.0.clone(),
            port: broker.advertised.1,
        },
        Some(leader) => match view.image.brokers.get(&leader) {
            Some(registration) => FindCoordinatorResponse {
                error: ErrorCode::None,
                broker_id: i32::try_from(leader).unwrap_or(-1),
                host: registration.host.clone(),
                port: registration.port,
            },
            None => refuse(ErrorCode::CoordinatorNotAvailable),
        },
        None => refuse(ErrorCode::CoordinatorNotAvailable),
    }
}

/// Answers from this broker's copy of the cluster's metadata.
fn metadata(context: &ConnectionContext, request: MetadataRequest) -> MetadataResponse {
    let broker = &context.broker;
    let view = broker.controller.view();
    let describe = |name: String| -> TopicMetadata {
        if let Some(topic) = view.image.topics.get(&name) {
            return TopicMetadata {
                error: ErrorCode::None,
                partitions: partition_metadata(&topic.partitions),
                name,
            };
        }
        TopicMetadata {
            error: ErrorCode::UnknownTopicOrPartition,
            name,
            partitions: Vec::new(),
        }
    };
    let topics = match request.topics {
        None => view.image.topics.keys().cloned().map(describe).collect(),
        Some(names) => match distinct_names(names) {
            Err(count) => vec![TopicMetadata {
                error: ErrorCode::InvalidRequest,
                name: format!("{count} topics named; at most {TOPICS_PER_REQUEST_MAX} per request"),
                partitions: Vec::new(),
            }],
            Ok(names) => names.into_iter().map(describe).collect(),
        },
    };
    MetadataResponse {
        cluster_id: broker.config.cluster_id.clone(),
        controller_id: broker
            .controller
            .leader()
            .and_then(|leader| i32::try_from(leader).ok())
            .unwrap_or(-1),
        brokers: view
            .image
            .brokers
            .values()
            .filter(|registration| !registration.fenced)
            .map(|registration| BrokerInfo {
                id: registration.id,
                host: registration.host.clone(),
                port: registration.port,
            })
            .collect(),
        topics,
        fenced_brokers: view
            .image
            .brokers
            .values()
            .filter(|registration| registration.fenced)
            .map(|registration| registration.id)
            .collect(),
    }
}

async fn create_topics(
    context: &ConnectionContext,
    request: CreateTopicsRequest,
) -> CreateTopicsResponse {
    let mut results = Vec::with_capacity(request.topics.len());
    for topic in request.topics {
        let outcome = if is_internal(&topic.name) {
            Err((
                ErrorCode::InvalidTopic,
                format!("{} is internal", topic.name),
            ))
        } else {
            let configs: BTreeMap<String, String> = topic
                .configs
                .into_iter()
                .map(|entry| (entry.key, entry.value))
                .collect();
            context
                .broker
                .create_topic(
                    &topic.name,
                    topic.partitions,
                    topic.replication_factor,
                    configs,
                )
                .await
                .map_err(|error| (error.code(), error.to_string()))
        };
        results.push(topic_result(topic.name, outcome));
    }
    CreateTopicsResponse { topics: results }
}

fn topic_result(name: String, outcome: Result<(), (ErrorCode, String)>) -> TopicResult {
    match outcome {
        Ok(()) => TopicResult {
            name,
            error: ErrorCode::None,
            message: None,
        },
        Err((error, message)) => TopicResult {
            name,
            error,
            message: Some(message),
        },
    }
}

async fn delete_topics(
    context: &ConnectionContext,
    request: DeleteTopicsRequest,
) -> DeleteTopicsResponse {
    let mut results = Vec::with_capacity(request.names.len());
    for name in request.names {
        let outcome = if is_internal(&name) {
            Err((ErrorCode::InvalidTopic, format!("{name} is internal")))
        } else {
            context
                .broker
                .delete_topic(&name)
                .await
                .map_err(|error| (error.code(), error.to_string()))
        };
        results.push(topic_result(name, outcome));
    }
    DeleteTopicsResponse { topics: results }
}

fn describe_topics(
    context: &ConnectionContext,
    request: DescribeTopicsRequest,
) -> DescribeTopicsResponse {
    let topics = &context.broker.topics;
    let selected: Vec<(String, Option<Arc<Topic>>)> = if request.names.is_empty() {
        topics
            .all()
            .into_iter()
            .map(|topic| (topic.name.clone(), Some(topic)))
            .collect()
    } else {
        match distinct_names(request.names) {
            Err(count) => {
                return DescribeTopicsResponse {
                    topics: vec![TopicDescription {
                        name: format!(
                            "{count} topics named; at most {TOPICS_PER_REQUEST_MAX} per request"
                        ),
                        error: ErrorCode::InvalidRequest,
                        configs: Vec::new(),
                        partitions: Vec::new(),
                    }],
                };
            }
            Ok(names) => names
                .into_iter()
                .map(|name| {
                    let topic = topics.get(&name);
                    (name, topic)
                })
                .collect(),
        }
    };
    DescribeTopicsResponse {
        topics: selected
            .into_iter()
            .map(|(name, topic)| match topic {
                None => TopicDescription {
                    name,
                    error: ErrorCode::UnknownTopicOrPartition,
                    configs: Vec::new(),
                    partitions: Vec::new(),
                },
                Some(topic) => TopicDescription {
                    name,
                    error: ErrorCode::None,
                    configs: topic
                        .spec
                        .configs
                        .iter()
                        .map(|(key, value)| ConfigEntry {
                            key: key.clone(),
                            value: value.clone(),
                        })
                        .collect(),
                    partitions: topic
                        .partitions
                        .iter()
                        .map(|partition| PartitionDescription {
                            partition: partition.index,
                            error: ErrorCode::None,
                            leader: partition
                                .leader()
                                .and_then(|leader| i32::try_from(leader).ok())
                                .unwrap_or(-1),
                            leader_epoch: partition.leader_epoch(),
                            start_offset: partition.log.start_offset(),
                            end_offset: partition.log.end_offset(),
                            high_watermark: partition.high_watermark(),
                            size_bytes: partition.log.size_bytes(),
                            segments: u32::try_from(partition.log.segment_count())
                                .unwrap_or(u32::MAX),
                        })
                        .collect(),
                },
            })
            .collect(),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

/// One partition of a submitted produce: its index and what the log said.
type SubmittedPartition = (u32, Result<Submitted, ErrorCode>);

/// An append handed to a partition's log, with what `acks=all` waits on.
#[derive(Debug)]
pub struct Submitted {
    pending: crate::partition::PendingAppend,
    partition: Arc<Partition>,
    leader_epoch: i32,
}

/// A produce request whose batches the log has (or has refused).
#[derive(Debug)]
pub struct SubmittedProduce {
    started: Instant,
    acks: i8,
    timeout: Duration,
    topics: Vec<(String, Vec<SubmittedPartition>)>,
}

/// Validates a produce request and hands its batches to the logs, in the
/// order the connection sent them (called on the connection's reader task).
pub fn submit_produce(context: &ConnectionContext, request: ProduceRequest) -> SubmittedProduce {
    let acks = request.acks;
    // A request for one partition hands its records to the log as they
    // are (without a copy when the frame had a buffer of its own). With
    // several, each is copied out: a slice of a shared frame buffer would
    // keep the whole frame alive in the log's cache.
    let sole = matches!(request.topics.as_slice(), [topic] if topic.partitions.len() == 1);
    // Decompression to check compressed batches is bounded per request,
    // across its partitions (one frame may name a partition many times).
    let mut decompressed_budget = crate::partition::DECOMPRESSED_BYTES_MAX;
    let topics = request
        .topics
        .into_iter()
        .map(|topic| {
            let partitions = topic
                .partitions
                .into_iter()
                .map(|partition| {
                    let outcome = if !matches!(acks, -1..=1) {
                        Err(ErrorCode::InvalidRequest)
                    } else if is_internal(&topic.name) {
                        // Only the coordinator writes committed offsets.
                        Err(ErrorCode::InvalidTopic)
                    } else {
                        match context
                            .broker
                            .topics
                            .partition(&topic.name, partition.partition)
                        {
                            None => Err(ErrorCode::UnknownTopicOrPartition),
                            Some(target) => target.check_produce(acks == -1).and_then(|epoch| {
                                let records = partition.records.into_bytes();
                                target
                                    .submit_within(
                                        if sole {
                                            records
                                        } else {
                                            Bytes::copy_from_slice(&records)
                                        },
                                        epoch,
                                        &mut decompressed_budget,
                                    )
                                    .map(|pending| Submitted {
                                        pending,
                                        partition: target.clone(),
                                        leader_epoch: epoch,
                                    })
                            }),
                        }
                    };
                    (partition.partition, outcome)
                })
                .collect();
            (topic.name, partitions)
        })
        .collect();
    SubmittedProduce {
        started: Instant::now(),
        acks,
        timeout: Duration::from_millis(u64::from(request.timeout_ms.max(1))),
        topics,
    }
}

impl Submitted {
    /// Waits until the append is durable here and, for `acks=all`, on
    /// every in-sync replica.
    async fn acks_all(self, acks_all: bool) -> Result<crate::partition::Appended, ErrorCode> {
        let appended = self.pending.wait().await?;
        if acks_all {
            self.partition
                .wait_replicated(appended.end_offset, self.leader_epoch)
                .await?;
        }
        Ok(appended)
    }
}

/// Waits for a submitted produce to meet its acks and builds the response
/// (none for acks = 0).
pub async fn finish_produce(
    context: &ConnectionContext,
    submitted: SubmittedProduce,
) -> Option<ProduceResponse> {
    let broker = &context.broker;
    let deadline = submitted.started + submitted.timeout;
    let submitted_acks = submitted.acks;
    let mut topics = Vec::with_capacity(submitted.topics.len());
    for (name, partitions) in submitted.topics {
        let mut answers = Vec::with_capacity(partitions.len());
        for (index, pending) in partitions {
            let outcome = match pending {
                Err(error) => Err(error),
                Ok(submitted) => {
                    let acks_all = submitted.acks_all(submitted_acks == -1);
                    match tokio::time::timeout_at(deadline.into(), acks_all).await {
                        Ok(result) => result,
                        Err(_) => Err(ErrorCode::Timeout),
                    }
                }
            };
            answers.push(match outcome {
                Ok(appended) => {
                    let labels = crate::metrics::Metrics::topic(&name);
                    broker
                        .metrics
                        .records_in
                        .get_or_create(&labels)
                        .inc_by(appended.records);
                    broker
                        .metrics
                        .bytes_in
                        .get_or_create(&labels)
                        .inc_by(appended.bytes);
                    ProducePartitionResponse {
                        partition: index,
                        error: ErrorCode::None,
                        base_offset: appended.base_offset as i64,
                        log_append_time_ms: now_ms(),
                        log_start_offset: appended.log_start_offset,
                    }
                }
                Err(error) => ProducePartitionResponse {
                    partition: index,
                    error,
                    base_offset: -1,
                    log_append_time_ms: -1,
                    log_start_offset: 0,
                },
            });
        }
        topics.push(ProduceTopicResponse {
            name,
            partitions: answers,
        });
    }
    broker
        .metrics
        .produce_latency
        .observe(submitted.started.elapsed().as_secs_f64());
    if submitted.acks == 0 {
        return None;
    }
    Some(ProduceResponse { topics })
}

/// Reads up to `max_bytes` from `offset`, as record chunks that borrow the
/// log's memory (no copy).
fn read_records(
    partition: &Partition,
    offset: u64,
    max_bytes: usize,
) -> Result<RecordSet, ErrorCode> {
    match partition.log.read(offset, max_bytes) {
        Ok(read) => Ok(RecordSet(
            read.into_chunks()
                .into_iter()
                .map(Bytes::from_owner)
                .collect(),
        )),
        Err(StorageError::OffsetOutOfRange { .. }) => Err(ErrorCode::OffsetOutOfRange),
        Err(error) => Err(storage_error_code(&error)),
    }
}

/// [`read_records`] for consumers: only whole batches below
/// `high_watermark` (batches below it are whole: the high watermark moves
/// at batch boundaries).
fn read_committed(
    partition: &Partition,
    offset: u64,
    max_bytes: usize,
    high_watermark: u64,
) -> Result<RecordSet, ErrorCode> {
    if offset >= high_watermark && offset <= partition.log.end_offset() {
        return Ok(RecordSet::default());
    }
    let records = read_records(partition, offset, max_bytes)?;
    if next_offset(&records).is_none_or(|next| next <= high_watermark) {
        return Ok(records);
    }
    let mut kept = Vec::with_capacity(records.0.len());
    'chunks: for chunk in records.0 {
        let mut length = 0;
        for batch in weir_protocol::Batches::new(&chunk, false) {
            let Ok(batch) = batch else { break };
            if batch.base_offset() >= high_watermark {
                kept.push(chunk.slice(..length));
                break 'chunks;
            }
            length += batch.len();
        }
        kept.push(chunk);
    }
    kept.retain(|chunk| !chunk.is_empty());
    Ok(RecordSet(kept))
}

/// A follower's fetch: the rules decide per partition (read on, or where
/// its log diverges, or refused), then whole batches are read the way
/// consumers read, up to the log's end rather than the high watermark.
/// Long-polls like Fetch while there is nothing to send.
async fn replica_fetch(
    context: &ConnectionContext,
    request: ReplicaFetchRequest,
) -> ReplicaFetchResponse {
    let broker = &context.broker;
    let wait = Duration::from_millis(u64::from(
        request.max_wait_ms.min(broker.config.fetch_wait_ms_max),
    ));
    let deadline = Instant::now() + wait;
    let max_bytes = (request.max_bytes as usize).min(
        broker
            .config
            .frame_bytes_max
            .saturating_sub(64 * 1024)
            .max(1),
    );
    loop {
        let appended = broker.appended.notified();
        tokio::pin!(appended);
        appended.as_mut().enable();
        let mut total = 0usize;
        let mut worth_answering = false;
        let mut partitions = Vec::with_capacity(request.partitions.len());
        for wanted in &request.partitions {
            let mut data = ReplicaFetchData {
                topic: wanted.topic.clone(),
                partition: wanted.partition,
                error: ErrorCode::None,
                high_watermark: 0,
                log_start_offset: 0,
                diverging: 0,
                diverging_epoch: -1,
                diverging_end_offset: 0,
                records: RecordSet::default(),
            };
            let Some(partition) = broker.topics.partition(&wanted.topic, wanted.partition) else {
                data.error = ErrorCode::UnknownTopicOrPartition;
                worth_answering = true;
                partitions.push(data);
                continue;
            };
            let fetch = crate::cluster::replica::FetchFrom {
                follower: request.replica_id,
                leader_epoch: wanted.leader_epoch,
                fetch_offset: wanted.fetch_offset,
                last_fetched_epoch: (wanted.last_fetched_epoch >= 0)
                    .then_some(wanted.last_fetched_epoch),
            };
            let (answer, actions) =
                partition.on_replica_fetch(&fetch, crate::replication::now_ms());
            crate::replication::execute(&context.broker, &partition, actions);
            data.log_start_offset = partition.log.start_offset();
            match answer {
                crate::cluster::replica::FetchAnswer::Refused(code) => {
                    data.error = code;
                    worth_answering = true;
                }
                crate::cluster::replica::FetchAnswer::Diverging {
                    epoch,
                    end_offset,
                    high_watermark,
                } => {
                    data.diverging = 1;
                    data.diverging_epoch = epoch;
                    data.diverging_end_offset = end_offset;
                    data.high_watermark = high_watermark;
                    worth_answering = true;
                }
                crate::cluster::replica::FetchAnswer::Read {
                    from,
                    high_watermark,
                } => {
                    data.high_watermark = high_watermark;
                    let remaining = max_bytes.saturating_sub(total);
                    if remaining > 0 && from < partition.log.end_offset() {
                        match read_records(&partition, from, remaining) {
                            Ok(records) => {
                                total += records.len();
                                worth_answering |= !records.is_empty();
                                data.records = records;
                            }
                            Err(error) => {
                                data.error = error;
                                worth_answering = true;
                            }
                        }
                    }
                }
            }
            partitions.push(data);
        }
        if worth_answering || *broker.stopping.borrow() || Instant::now() >= deadline {
            return ReplicaFetchResponse {
                error: ErrorCode::None,
                partitions,
            };
        }
        drop(partitions);
        wait_for_append(broker, appended.as_mut(), deadline).await;
    }
}

async fn fetch(context: &ConnectionContext, request: FetchRequest) -> FetchResponse {
    let broker = &context.broker;
    let wait = Duration::from_millis(u64::from(
        request.max_wait_ms.min(broker.config.fetch_wait_ms_max),
    ));
    let started = Instant::now();
    let deadline = started + wait;
    loop {
        // Register for wakeups before looking, so no append slips between.
        let appended = broker.appended.notified();
        tokio::pin!(appended);
        appended.as_mut().enable();
        let mut total = 0usize;
        let mut partitions = Vec::with_capacity(request.partitions.len());
        for wanted in &request.partitions {
            // A response stays within a frame, whatever max_bytes asks.
            let max_bytes = (request.max_bytes as usize).min(
                broker
                    .config
                    .frame_bytes_max
                    .saturating_sub(64 * 1024)
                    .max(1),
            );
            let remaining = max_bytes.saturating_sub(total);
            let response = match broker.topics.partition(&wanted.topic, wanted.partition) {
                None => fetch_error(wanted, ErrorCode::UnknownTopicOrPartition, 0, 0),
                Some(partition) if !partition.is_leader() => {
                    fetch_error(wanted, ErrorCode::NotLeader, 0, 0)
                }
                Some(partition) => {
                    let high_watermark = partition.high_watermark();
                    let start = partition.log.start_offset();
                    let budget = (wanted.partition_max_bytes as usize).min(remaining.max(1));
                    let records = if remaining == 0 && total > 0 {
                        Ok(RecordSet::default())
                    } else {
                        read_committed(&partition, wanted.fetch_offset, budget, high_watermark)
                    };
                    match records {
                        Ok(records) => {
                            total += records.len();
                            FetchPartitionResponse {
                                topic: wanted.topic.clone(),
                                partition: wanted.partition,
                                error: ErrorCode::None,
                                high_watermark,
                                log_start_offset: start,
                                records,
                            }
                        }
                        Err(error) => fetch_error(wanted, error, high_watermark, start),
                    }
                }
            };
            partitions.push(response);
        }
        let errors = partitions.iter().any(|partition| !partition.error.is_ok());
        let stopping = *broker.stopping.borrow();
        if total >= request.min_bytes as usize || errors || stopping || Instant::now() >= deadline {
            for partition in &partitions {
                count_out(broker, &partition.topic, &partition.records);
            }
            broker
                .metrics
                .fetch_latency
                .observe(started.elapsed().as_secs_f64());
            return FetchResponse { partitions };
        }
        drop(partitions);
        // The next turn looks once more and answers.
        wait_for_append(broker, appended, deadline).await;
    }
}

/// A long poll's wait: an append, the deadline or the start of shutdown,
/// whichever comes first.
async fn wait_for_append(
    broker: &crate::broker::Broker,
    appended: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
    deadline: Instant,
) {
    let mut stopping = broker.stopping.clone();
    tokio::select! {
        _ = appended => {}
        _ = tokio::time::sleep_until(deadline.into()) => {}
        _ = async {
            if stopping.wait_for(|stopping| *stopping).await.is_err() {
                // No one can stop the broker any more: never fires.
                std::future::pending::<()>().await;
            }
        } => {}
    }
}

fn fetch_error(
    wanted: &FetchPartition,
    error: ErrorCode,
    high_watermark: u64,
    start: u64,
) -> FetchPartitionResponse {
    FetchPartitionResponse {
        topic: wanted.topic.clone(),
        partition: wanted.partition,
        error,
        high_watermark,
        log_start_offset: start,
        records: RecordSet::default(),
    }
}

fn subscribe(context: &Arc<ConnectionContext>, request: SubscribeRequest) -> SubscribeResponse {
    let Some(partition) = context
        .broker
        .topics
        .partition(&request.topic, request.partition)
    else {
        return SubscribeResponse {
            error: ErrorCode::UnknownTopicOrPartition,
            high_watermark: 0,
            log_start_offset: 0,
        };
    };
    if !partition.is_leader() {
        return SubscribeResponse {
            error: ErrorCode::NotLeader,
            high_watermark: 0,
            log_start_offset: 0,
        };
    }
    let (high_watermark, start) = (partition.high_watermark(), partition.log.start_offset());
    // Up to the log's end, not the high watermark: a leader just elected
    // may not yet know the watermark its predecessor had reached, which a
    // consumer following the move already read up to. Nothing above the
    // watermark is pushed (the push loop waits for it).
    if request.offset < start || request.offset > partition.log.end_offset() {
        return SubscribeResponse {
            error: ErrorCode::OffsetOutOfRange,
            high_watermark,
            log_start_offset: start,
        };
    }
    let mut subscriptions = context
        .subscriptions
        .lock()
        .unwrap_or_else(|poison| poison.into_inner());
    if subscriptions.contains_key(&request.subscription_id)
        || subscriptions.len() >= SUBSCRIPTIONS_PER_CONNECTION_MAX
    {
        return SubscribeResponse {
            error: ErrorCode::InvalidRequest,
            high_watermark,
            log_start_offset: start,
        };
    }
    let control = Arc::new(SubscriptionControl {
        credit_bytes: AtomicI64::new(i64::from(request.credit_bytes)),
        credit_granted: tokio::sync::Notify::new(),
        task: std::sync::Mutex::new(None),
    });
    let task = tokio::spawn(push_loop(
        context.push_sender(),
        Arc::downgrade(context),
        partition,
        control.clone(),
        request.subscription_id,
        request.offset,
        context.broker.config.push_bytes_max,
    ));
    *control
        .task
        .lock()
        .unwrap_or_else(|poison| poison.into_inner()) = Some(task);
    subscriptions.insert(request.subscription_id, control);
    SubscribeResponse {
        error: ErrorCode::None,
        high_watermark,
        log_start_offset: start,
    }
}

/// A subscription the broker ended (its partition deleted or led
/// elsewhere) leaves its connection's table, so that one connection that
/// follows many moves does not run into the per-connection limit.
fn forget_subscription(context: &std::sync::Weak<ConnectionContext>, subscription_id: u32) {
    if let Some(context) = context.upgrade() {
        context
            .subscriptions
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .remove(&subscription_id);
    }
}

/// Pushes a subscription's batches while it has credit. Holds no memory
/// for the consumer: what it does not push stays in the log.
async fn push_loop(
    sender: PushSender,
    context: std::sync::Weak<ConnectionContext>,
    partition: Arc<Partition>,
    control: Arc<SubscriptionControl>,
    subscription_id: u32,
    mut offset: u64,
    push_bytes_max: usize,
) {
    loop {
        let credit_granted = control.credit_granted.notified();
        let data_appended = partition.partition_appended.notified();
        tokio::pin!(credit_granted);
        tokio::pin!(data_appended);
        credit_granted.as_mut().enable();
        data_appended.as_mut().enable();
        // Deleted: tell the consumer, and let go of the deleted files' maps.
        // Leadership moved: the consumer resubscribes at the new leader.
        let ended = if partition.is_deleted() {
            Some(ErrorCode::UnknownTopicOrPartition)
        } else if !partition.is_leader() {
            Some(ErrorCode::NotLeader)
        } else {
            None
        };
        if let Some(error) = ended {
            let push = SubscriptionPush {
                error,
                high_watermark: 0,
                records: RecordSet::default(),
            };
            let _ = sender.push(push.encode(subscription_id)).await;
            forget_subscription(&context, subscription_id);
            return;
        }
        let credit = control.credit_bytes.load(Ordering::Acquire);
        if credit <= 0 {
            // Appends wake this too (cheaply: one look, then back to
            // sleep), so that a deletion reaches a stalled subscription.
            tokio::select! {
                _ = credit_granted => {}
                _ = data_appended => {}
            }
            continue;
        }
        if offset >= partition.high_watermark() {
            tokio::select! {
                _ = data_appended => {}
                _ = credit_granted => {}
            }
            continue;
        }
        let budget = usize::try_from(credit)
            .unwrap_or(usize::MAX)
            .min(push_bytes_max)
            .max(1);
        let high_watermark = partition.high_watermark();
        let (error, records) = match read_committed(&partition, offset, budget, high_watermark) {
            Ok(records) => (ErrorCode::None, records),
            Err(error) => (error, RecordSet::default()),
        };
        if let Some(next) = next_offset(&records) {
            offset = next;
        }
        control
            .credit_bytes
            .fetch_sub(records.len() as i64, Ordering::AcqRel);
        if let Some(context) = context.upgrade() {
            count_out(&context.broker, &partition.topic, &records);
        }
        let push = SubscriptionPush {
            error,
            high_watermark: partition.high_watermark(),
            records,
        };
        if !sender.push(push.encode(subscription_id)).await {
            return;
        }
        if !error.is_ok() {
            forget_subscription(&context, subscription_id);
            return;
        }
    }
}

/// Counts records and bytes sent to consumers.
fn count_out(broker: &crate::broker::Broker, topic: &str, records: &RecordSet) {
    if records.is_empty() {
        return;
    }
    let count: u64 = records
        .0
        .iter()
        .flat_map(|chunk| {
            weir_protocol::Batches::new(chunk, false)
                .flatten()
                .map(|batch| batch.records_count() as u64)
        })
        .sum();
    let labels = crate::metrics::Metrics::topic(topic);
    broker
        .metrics
        .records_out
        .get_or_create(&labels)
        .inc_by(count);
    broker
        .metrics
        .bytes_out
        .get_or_create(&labels)
        .inc_by(records.len() as u64);
}

/// The offset after the last batch of `records`.
fn next_offset(records: &RecordSet) -> Option<u64> {
    let mut next = None;
    for chunk in &records.0 {
        for batch in weir_protocol::Batches::new(chunk, false).flatten() {
            next = Some(batch.next_offset());
        }
    }
    next
}

fn credit(context: &ConnectionContext, request: CreditRequest) -> SubscriptionAck {
    let subscriptions = context
        .subscriptions
        .lock()
        .unwrap_or_else(|poison| poison.into_inner());
    match subscriptions.get(&request.subscription_id) {
        Some(control) => {
            control
                .credit_bytes
                .fetch_add(i64::from(request.credit_bytes), Ordering::AcqRel);
            control.credit_granted.notify_waiters();
            SubscriptionAck {
                error: ErrorCode::None,
            }
        }
        None => SubscriptionAck {
            error: ErrorCode::UnknownSubscription,
        },
    }
}

fn unsubscribe(context: &ConnectionContext, request: UnsubscribeRequest) -> SubscriptionAck {
    let removed = context
        .subscriptions
        .lock()
        .unwrap_or_else(|poison| poison.into_inner())
        .remove(&request.subscription_id);
    match removed {
        Some(control) => {
            if let Some(task) = control
                .task
                .lock()
                .unwrap_or_else(|poison| poison.into_inner())
                .take()
            {
                task.abort();
            }
            SubscriptionAck {
                error: ErrorCode::None,
            }
        }
        None => SubscriptionAck {
            error: ErrorCode::UnknownSubscription,
        },
    }
}

fn list_offsets(context: &ConnectionContext, request: ListOffsetsRequest) -> ListOffsetsResponse {
    let partitions = request
        .partitions
        .into_iter()
        .map(|wanted| {
            let answer = match context
                .broker
                .topics
                .partition(&wanted.topic, wanted.partition)
            {
                None => Err(ErrorCode::UnknownTopicOrPartition),
                Some(partition) => match wanted.spec {
                    OFFSET_SPEC_EARLIEST => Ok(partition.log.start_offset()),
                    OFFSET_SPEC_LATEST => Ok(partition.high_watermark()),
                    timestamp if timestamp >= 0 => {
                        match partition.log.lookup_by_timestamp(timestamp) {
                            Ok(found) => Ok(found.unwrap_or_else(|| partition.high_watermark())),
                            Err(error) => Err(storage_error_code(&error)),
                        }
                    }
                    _ => Err(ErrorCode::InvalidRequest),
                },
            };
            let (error, offset) = match answer {
                Ok(offset) => (ErrorCode::None, offset as i64),
                Err(error) => (error, -1),
            };
            ListOffsetsPartitionResponse {
                topic: wanted.topic,
                partition: wanted.partition,
                error,
                offset,
                timestamp_ms: -1,
            }
        })
        .collect();
    ListOffsetsResponse { partitions }
}
