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
use crate::topics::{TOPICS_PER_REQUEST_MAX, is_internal};

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
        Request::Controller(request) => Response::Controller(match &broker.controller {
            Some(controller) => controller.handle(request).await,
            None => weir_protocol::message::ControllerResponse {
                error: ErrorCode::NotController,
                payload: bytes::Bytes::from_static(b"null"),
            },
        }),
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
        Request::FindCoordinator(_) => Response::FindCoordinator(FindCoordinatorResponse {
            error: ErrorCode::None,
            broker_id: broker.config.broker_id as i32,
            host: broker.advertised.0.clone(),
            port: broker.advertised.1,
        }),
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

fn partition_metadata(topic: &Topic) -> Vec<PartitionMetadata> {
    topic
        .partitions
        .iter()
        .map(|partition| PartitionMetadata {
            error: ErrorCode::None,
            partition: partition.index,
            leader: 1,
            leader_epoch: partition.leader_epoch,
            replicas: vec![1],
            in_sync_replicas: vec![1],
        })
        .collect()
}

fn metadata(context: &ConnectionContext, request: MetadataRequest) -> MetadataResponse {
    let broker = &context.broker;
    let topics = match request.topics {
        None => broker
            .topics
            .all()
            .iter()
            .map(|topic| TopicMetadata {
                error: ErrorCode::None,
                name: topic.name.clone(),
                partitions: partition_metadata(topic),
            })
            .collect(),
        Some(names) => match distinct_names(names) {
            Err(count) => vec![TopicMetadata {
                error: ErrorCode::InvalidRequest,
                name: format!("{count} topics named; at most {TOPICS_PER_REQUEST_MAX} per request"),
                partitions: Vec::new(),
            }],
            Ok(names) => names
                .into_iter()
                .map(|name| match broker.topics.get(&name) {
                    Some(topic) => TopicMetadata {
                        error: ErrorCode::None,
                        name,
                        partitions: partition_metadata(&topic),
                    },
                    None => TopicMetadata {
                        error: ErrorCode::UnknownTopicOrPartition,
                        name,
                        partitions: Vec::new(),
                    },
                })
                .collect(),
        },
    };
    MetadataResponse {
        cluster_id: broker.config.cluster_id.clone(),
        controller_id: i32::try_from(broker.config.broker_id).unwrap_or(-1),
        brokers: vec![BrokerInfo {
            id: broker.config.broker_id,
            host: broker.config.listen.ip().to_string(),
            port: broker.config.listen.port(),
        }],
        topics,
    }
}

async fn create_topics(
    context: &ConnectionContext,
    request: CreateTopicsRequest,
) -> CreateTopicsResponse {
    let mut results = Vec::with_capacity(request.topics.len());
    for topic in request.topics {
        let outcome = if topic.replication_factor > 1 {
            Err((
                ErrorCode::InvalidRequest,
                "replication factor above 1 needs a cluster".to_string(),
            ))
        } else if is_internal(&topic.name) {
            Err((
                ErrorCode::InvalidTopic,
                format!("{} is internal", topic.name),
            ))
        } else {
            let partitions = topic.partitions;
            let configs: BTreeMap<String, String> = topic
                .configs
                .into_iter()
                .map(|entry| (entry.key, entry.value))
                .collect();
            context
                .broker
                .topics
                .create(&topic.name, partitions, configs)
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
                            leader: 1,
                            leader_epoch: partition.leader_epoch,
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
type SubmittedPartition = (u32, Result<crate::partition::PendingAppend, ErrorCode>);

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
                            Some(target) => {
                                let records = partition.records.into_bytes();
                                target.submit(if sole {
                                    records
                                } else {
                                    Bytes::copy_from_slice(&records)
                                })
                            }
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

/// Waits for a submitted produce to meet its acks and builds the response
/// (none for acks = 0).
pub async fn finish_produce(
    context: &ConnectionContext,
    submitted: SubmittedProduce,
) -> Option<ProduceResponse> {
    let broker = &context.broker;
    let deadline = submitted.started + submitted.timeout;
    let mut topics = Vec::with_capacity(submitted.topics.len());
    for (name, partitions) in submitted.topics {
        let mut answers = Vec::with_capacity(partitions.len());
        for (index, pending) in partitions {
            let outcome = match pending {
                Err(error) => Err(error),
                Ok(pending) => match tokio::time::timeout_at(deadline.into(), pending.wait()).await
                {
                    Ok(result) => result,
                    Err(_) => Err(ErrorCode::Timeout),
                },
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
                Some(partition) => {
                    let high_watermark = partition.high_watermark();
                    let start = partition.log.start_offset();
                    let budget = (wanted.partition_max_bytes as usize).min(remaining.max(1));
                    let records = if remaining == 0 && total > 0 {
                        Ok(RecordSet::default())
                    } else {
                        read_records(&partition, wanted.fetch_offset, budget)
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
        // Whichever comes first; the next turn looks once more and answers
        // (by the deadline, or at once when the broker is stopping).
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
    let (high_watermark, start) = (partition.high_watermark(), partition.log.start_offset());
    if request.offset < start || request.offset > high_watermark {
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

/// Pushes a subscription's batches while it has credit. Holds no memory
/// for the consumer: what it does not push stays in the log.
async fn push_loop(
    sender: PushSender,
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
        if partition.is_deleted() {
            // Tell the consumer, and let go of the deleted files' maps.
            let push = SubscriptionPush {
                error: ErrorCode::UnknownTopicOrPartition,
                high_watermark: 0,
                records: RecordSet::default(),
            };
            let _ = sender.push(push.encode(subscription_id)).await;
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
        let (error, records) = match read_records(&partition, offset, budget) {
            Ok(records) => (ErrorCode::None, records),
            Err(error) => (error, RecordSet::default()),
        };
        if let Some(next) = next_offset(&records) {
            offset = next;
        }
        control
            .credit_bytes
            .fetch_sub(records.len() as i64, Ordering::AcqRel);
        let push = SubscriptionPush {
            error,
            high_watermark: partition.high_watermark(),
            records,
        };
        if !sender.push(push.encode(subscription_id)).await || !error.is_ok() {
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
