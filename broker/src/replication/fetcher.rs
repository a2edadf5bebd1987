//! Replica fetchers: one task per leader this broker follows, fetching all
//! of that leader's partitions it replicates in one long-polling request.
//!
//! A fetch names, per partition, the follower's durable end and the newest
//! epoch in its epoch cache; the leader answers with whole batches from
//! there (read the way consumers read), or with where the follower's log
//! diverges. Batches are appended with their offsets and epochs kept and
//! waited on until durable before the answer goes to the rules, so the next
//! fetch reports only offsets that are on this disk. Answers for a
//! partition this broker no longer follows in that epoch are dropped.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use weir_client::connection::Connection;
use weir_protocol::message::{ReplicaFetchPartition, ReplicaFetchRequest};
use weir_protocol::{Batches, ErrorCode, Request, Response};

use super::execute;
use crate::broker::Broker;
use crate::cluster::metadata::BrokerId;
use crate::cluster::replica::FetchAnswer;
use crate::partition::Partition;

/// Pause after a failed fetch (the leader may be gone; metadata will say).
pub const FETCH_RETRY_MS: u64 = 100;
/// Bound on connecting to a leader.
pub const CONNECT_TIMEOUT_MS: u64 = 2_000;
/// A fetch answer may take this much longer than the long-poll itself.
pub const FETCH_TIMEOUT_SLACK_MS: u64 = 5_000;

type Key = (String, u32);

#[derive(Debug, Clone)]
struct Followed {
    partition: Arc<Partition>,
    epoch: i32,
}

/// The partitions followed from one leader.
#[derive(Debug)]
struct LeaderFetcher {
    leader: BrokerId,
    partitions: Mutex<BTreeMap<Key, Followed>>,
    wake: Notify,
}

/// Every fetcher of this broker.
#[derive(Debug, Default)]
pub struct Fetchers {
    by_leader: Mutex<HashMap<BrokerId, Arc<LeaderFetcher>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

fn key_of(partition: &Partition) -> Key {
    (partition.topic.clone(), partition.index)
}

impl Fetchers {
    /// Fetches `partition` from `leader` in `epoch` (and from no one else).
    pub fn follow(
        &self,
        broker: &Arc<Broker>,
        partition: &Arc<Partition>,
        leader: BrokerId,
        epoch: i32,
    ) {
        let key = key_of(partition);
        let mut by_leader = lock(&self.by_leader);
        for (id, fetcher) in by_leader.iter() {
            if *id != leader {
                lock(&fetcher.partitions).remove(&key);
            }
        }
        let fetcher = by_leader.entry(leader).or_insert_with(|| {
            let fetcher = Arc::new(LeaderFetcher {
                leader,
                partitions: Mutex::new(BTreeMap::new()),
                wake: Notify::new(),
            });
            tokio::spawn(run(broker.clone(), fetcher.clone()));
            fetcher
        });
        lock(&fetcher.partitions).insert(
            key,
            Followed {
                partition: partition.clone(),
                epoch,
            },
        );
        fetcher.wake.notify_one();
    }

    /// Stops fetching `partition` from anyone.
    pub fn unfollow(&self, partition: &Partition) {
        let key = key_of(partition);
        for fetcher in lock(&self.by_leader).values() {
            lock(&fetcher.partitions).remove(&key);
        }
    }

    /// Partitions followed per leader (for metrics and tests).
    pub fn followed(&self) -> BTreeMap<BrokerId, usize> {
        lock(&self.by_leader)
            .iter()
            .map(|(id, fetcher)| (*id, lock(&fetcher.partitions).len()))
            .collect()
    }
}

/// Takes a fetcher out of the map when its task ends (shutdown, or a
/// panic: a broken invariant in the rules), so the next `follow` starts a
/// new one rather than adding partitions no task fetches.
struct Deregister {
    broker: Arc<Broker>,
    fetcher: Arc<LeaderFetcher>,
}

impl Drop for Deregister {
    fn drop(&mut self) {
        let mut by_leader = lock(&self.broker.fetchers.by_leader);
        if by_leader
            .get(&self.fetcher.leader)
            .is_some_and(|current| Arc::ptr_eq(current, &self.fetcher))
        {
            by_leader.remove(&self.fetcher.leader);
        }
        let left = lock(&self.fetcher.partitions).len();
        if left > 0 && !*self.broker.stopping.borrow() {
            tracing::error!(
                leader = self.fetcher.leader,
                partitions = left,
                "replica fetcher ended with partitions to fetch"
            );
        }
    }
}

async fn run(broker: Arc<Broker>, fetcher: Arc<LeaderFetcher>) {
    let _deregister = Deregister {
        broker: broker.clone(),
        fetcher: fetcher.clone(),
    };
    let mut connection: Option<Connection> = None;
    let retry = Duration::from_millis(FETCH_RETRY_MS);
    loop {
        if *broker.stopping.borrow() {
            return;
        }
        let followed: Vec<(Key, Followed)> = lock(&fetcher.partitions)
            .iter()
            .map(|(key, followed)| (key.clone(), followed.clone()))
            .collect();
        if followed.is_empty() {
            let _ = tokio::time::timeout(Duration::from_secs(1), fetcher.wake.notified()).await;
            continue;
        }
        let address = broker
            .controller
            .view()
            .image
            .brokers
            .get(&fetcher.leader)
            .map(|registration| format!("{}:{}", registration.host, registration.port));
        let Some(address) = address else {
            tokio::time::sleep(retry).await;
            continue;
        };
        let live = match &connection {
            Some(open) if !open.is_closed() && open.addr() == address => open.clone(),
            _ => {
                let timeout = Duration::from_millis(CONNECT_TIMEOUT_MS);
                match Connection::connect(&address, timeout).await {
                    Ok(open) => {
                        connection = Some(open.clone());
                        open
                    }
                    Err(error) => {
                        tracing::debug!(leader = fetcher.leader, %error, "fetcher: cannot connect");
                        tokio::time::sleep(retry).await;
                        continue;
                    }
                }
            }
        };
        let progressed = fetch_once(&broker, &fetcher, &live, &followed).await;
        match progressed {
            Ok(true) => {}
            Ok(false) => tokio::time::sleep(retry).await,
            Err(error) => {
                tracing::debug!(leader = fetcher.leader, %error, "fetcher: fetch failed");
                connection = None;
                tokio::time::sleep(retry).await;
            }
        }
    }
}

/// One fetch and what follows from it; whether anything moved (data or a
/// truncation), so a leader that refuses everything is not hammered.
async fn fetch_once(
    broker: &Arc<Broker>,
    fetcher: &LeaderFetcher,
    connection: &Connection,
    followed: &[(Key, Followed)],
) -> Result<bool, weir_client::ClientError> {
    let wait_ms = broker.config.replica_fetch_wait_ms;
    let mut sent = BTreeMap::new();
    let partitions = followed
        .iter()
        .map(|((topic, index), followed)| {
            let log = &followed.partition.log;
            let fetch_offset = log.end_offset();
            sent.insert((topic.clone(), *index), fetch_offset);
            ReplicaFetchPartition {
                topic: topic.clone(),
                partition: *index,
                leader_epoch: followed.epoch,
                fetch_offset,
                last_fetched_epoch: log.epochs().latest().map_or(-1, |entry| entry.epoch),
            }
        })
        .collect();
    let request = Request::ReplicaFetch(ReplicaFetchRequest {
        replica_id: broker.config.broker_id,
        max_wait_ms: wait_ms,
        max_bytes: broker.config.replica_fetch_bytes_max,
        partitions,
    });
    let timeout = Duration::from_millis(u64::from(wait_ms) + FETCH_TIMEOUT_SLACK_MS);
    let response = connection
        .start_call(request)
        .await?
        .with_timeout(timeout)
        .wait()
        .await?;
    let Response::ReplicaFetch(response) = response else {
        return Ok(false);
    };
    if !response.error.is_ok() {
        return Ok(false);
    }
    let mut progressed = false;
    for data in response.partitions {
        let key = (data.topic.clone(), data.partition);
        // Still followed, from this leader, in the epoch the fetch named?
        let current = lock(&fetcher.partitions).get(&key).cloned();
        let Some(current) = current else { continue };
        let Some(expected) = followed.iter().find(|(k, _)| *k == key) else {
            continue;
        };
        if current.epoch != expected.1.epoch {
            continue;
        }
        let partition = &current.partition;
        if data.error == ErrorCode::OffsetOutOfRange
            && data.log_start_offset > partition.log.end_offset()
        {
            // The leader's retention deleted everything past this log's
            // end while this broker was away: nothing here can be matched
            // against the leader any more, so start again at its start.
            tracing::info!(topic = %partition.topic, partition = partition.index,
                end = partition.log.end_offset(), leader_start = data.log_start_offset,
                "behind the leader's log start: starting over there");
            if let Err(error) = crate::blocking::blocking(|| {
                partition
                    .log
                    .truncate_fully_and_start_at(data.log_start_offset)
            }) {
                tracing::error!(topic = %partition.topic, partition = partition.index,
                    %error, "cannot start over at the leader's log start");
            } else {
                progressed = true;
            }
            continue;
        }
        let answer = if !data.error.is_ok() {
            FetchAnswer::Refused(data.error)
        } else if data.diverging == 1 {
            progressed = true;
            FetchAnswer::Diverging {
                epoch: data.diverging_epoch,
                end_offset: data.diverging_end_offset,
                high_watermark: data.high_watermark,
            }
        } else {
            let from = sent.get(&key).copied().unwrap_or_default();
            let records = data.records.into_bytes();
            if !records.is_empty() {
                if partition.log.end_offset() != from {
                    // The log moved since the fetch was sent (a truncation):
                    // these batches no longer fit; fetch again.
                    continue;
                }
                match append_all(partition, &records).await {
                    Ok(()) => progressed = true,
                    Err(error) => {
                        tracing::warn!(topic = %partition.topic, partition = partition.index,
                            %error, "follower append failed");
                        continue;
                    }
                }
            }
            FetchAnswer::Read {
                from,
                high_watermark: data.high_watermark,
            }
        };
        if let FetchAnswer::Refused(code) = answer {
            tracing::debug!(topic = %partition.topic, partition = partition.index, %code,
                "fetch refused by the leader");
        }
        let actions = partition.on_fetch_answer(fetcher.leader, current.epoch, &answer);
        execute(broker, partition, actions);
        if data.error.is_ok() && data.diverging == 0 {
            progressed = true;
        }
    }
    Ok(progressed)
}

/// Appends the batches in `records` and waits until they are durable.
async fn append_all(partition: &Partition, records: &Bytes) -> Result<(), ErrorCode> {
    let mut futures = Vec::new();
    let mut at = 0usize;
    let several = Batches::new(records, false).nth(1).is_some();
    for batch in Batches::new(records, false) {
        let batch = batch.map_err(|_| ErrorCode::CorruptBatch)?;
        let length = batch.len();
        // Several batches are copied apart, so that none keeps the whole
        // response frame alive in the log's cache.
        let bytes = if several {
            Bytes::copy_from_slice(&records[at..at + length])
        } else {
            records.slice(at..at + length)
        };
        at += length;
        futures.push(partition.append_replica(bytes)?);
    }
    for future in futures {
        future
            .await
            .map_err(|error| crate::partition::storage_error_code(&error))?;
    }
    // Readers and the rules learn of the new end.
    partition.wake_readers();
    Ok(())
}
