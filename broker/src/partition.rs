//! A partition: one storage log, its replication rules, and signals for
//! readers waiting for new data.
//!
//! The rules (`cluster::replica::Replica`) decide leadership, the high
//! watermark, in-sync changes and truncation; this module carries out the
//! local part of what they decide (assigning an epoch on becoming leader,
//! truncating, publishing the high watermark) and hands the rest (fetching,
//! proposals to the controller) back to the driver in `replication`.
//! Consumers read only below the high watermark; `acks=all` answers once it
//! passes the batch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use tokio::sync::{Notify, watch};
use weir_protocol::{Batch, Batches, Compression, ErrorCode};
use weir_storage::{Log, StorageError};

use crate::cluster::metadata::{BrokerId, MetadataError, PartitionState};
use crate::cluster::replica::{Action, FetchAnswer, FetchFrom, LogView, Replica, ReplicaConfig};
use crate::producers::{Check, ProducerStates, Stamp};

/// Most bytes the compressed batches of one produce request may expand to
/// when the broker checks their records. Shared by all batches of the
/// request, so a frame full of small, highly compressed batches cannot make
/// the broker expand gigabytes.
pub use weir_protocol::codec::DECOMPRESSED_BYTES_MAX;

/// One partition of a topic.
#[derive(Debug)]
pub struct Partition {
    /// Topic name.
    pub topic: String,
    /// Partition index.
    pub index: u32,
    /// The storage log.
    pub log: Log,
    /// The replication rules for this partition on this broker.
    replica: Mutex<Replica>,
    /// The rules' high watermark, for readers that take no lock.
    high_watermark: AtomicU64,
    /// Bumped whenever the high watermark or the leadership changes:
    /// `acks=all` answers wait on it.
    replica_changes: watch::Sender<u64>,
    /// This partition, for the tasks it spawns.
    me: Weak<Partition>,
    /// Woken after every append anywhere (shared by all partitions of the
    /// broker): a Fetch over several partitions waits on it.
    pub appended: Arc<Notify>,
    /// Woken after every append to this partition: a subscription waits on
    /// it, so an append wakes only the readers of its own partition.
    pub partition_appended: Arc<Notify>,
    /// Set when its topic is deleted: subscriptions end with an error.
    deleted: std::sync::atomic::AtomicBool,
    /// Idempotent producers' last batches, and those not yet durable.
    producers: Arc<Mutex<Producers>>,
    /// Whether any idempotent batch was ever recorded: plain appends then
    /// also purge what failed writes took back.
    stamped_seen: std::sync::atomic::AtomicBool,
    /// Held while the producer snapshot is written.
    snapshot_saving: Mutex<()>,
    /// In-sync set shrinks and expansions applied while this broker led.
    isr_shrinks: AtomicU64,
    isr_expands: AtomicU64,
    /// As a follower: the leader's high watermark in its latest answer, and
    /// when this log last held everything below it (ms since the epoch).
    leader_high_watermark: AtomicU64,
    caught_up_at_ms: AtomicU64,
}

/// The producer table and the stamped appends still in flight, under one
/// lock with the append itself, so check, append and record are atomic.
#[derive(Debug, Default)]
struct Producers {
    states: ProducerStates,
    /// (producer id, first sequence) → (append id, the append's outcome
    /// once known).
    in_flight: HashMap<(i64, i32), (u64, watch::Receiver<AppendOutcome>)>,
    /// Numbers stamped appends, so a finished one removes only itself.
    next_append_id: u64,
    /// The log end of the last snapshot written: an unchanged table at
    /// the same end needs no new one.
    saved_offset: Option<u64>,
}

/// How a stamped append ended; `None` while it is in flight.
type AppendOutcome = Option<Result<(), ErrorCode>>;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// A stamped append: recorded in the producer table at submit, forgotten
/// again if it fails.
struct StampedAppend {
    producers: Arc<Mutex<Producers>>,
    stamp: Stamp,
    id: u64,
    done: watch::Sender<AppendOutcome>,
}

impl StampedAppend {
    fn finish(self, result: Result<(), ErrorCode>) {
        let mut producers = lock(&self.producers);
        let key = (self.stamp.producer_id, self.stamp.first_sequence);
        if producers
            .in_flight
            .get(&key)
            .is_some_and(|(id, _)| *id == self.id)
        {
            producers.in_flight.remove(&key);
        }
        // A failed write is forgotten when the log reuses its offsets (see
        // `purge_from`), under the log's lock: not here, later and racing.
        drop(producers);
        let _ = self.done.send(Some(result));
    }
}

/// What an append did.
#[derive(Debug, Clone, Copy)]
pub struct Appended {
    /// Offset of the first record.
    pub base_offset: u64,
    /// One past the last record's offset (`acks=all` waits for the high
    /// watermark to reach it).
    pub end_offset: u64,
    /// The partition's first stored offset when the append was submitted.
    pub log_start_offset: u64,
    /// Records appended.
    pub records: u64,
    /// Bytes appended.
    pub bytes: u64,
}

/// The storage log as the replication rules read it. Under `flush =
/// always` (required for replicated partitions) the published end is the
/// durable end.
struct LogAdapter<'a>(&'a Log);

impl LogView for LogAdapter<'_> {
    fn start_offset(&self) -> u64 {
        self.0.start_offset()
    }

    fn end_offset(&self) -> u64 {
        self.0.end_offset()
    }

    fn latest_epoch(&self) -> Option<i32> {
        self.0.epochs().latest().map(|entry| entry.epoch)
    }

    fn epoch_end(&self, epoch: i32) -> Option<(i32, u64)> {
        self.0.epochs().end_offset_for(epoch, self.0.end_offset())
    }
}

impl Partition {
    /// Wraps an open log, rebuilding its idempotent producers' state. The
    /// partition leads nothing until metadata makes it leader.
    pub fn new(
        topic: String,
        index: u32,
        log: Log,
        appended: Arc<Notify>,
        broker_id: BrokerId,
        replica_config: ReplicaConfig,
    ) -> Arc<Partition> {
        let mut states = ProducerStates::recover(&log);
        states.take_changed();
        // Replace whatever snapshot was there with one of what is now known,
        // so a stale one cannot be picked up after a later crash.
        let end = log.end_offset();
        let saved_offset = match states.snapshot(end).save(log.dir()) {
            Ok(()) => Some(end),
            Err(error) => {
                tracing::warn!(%topic, partition = index, %error, "producer snapshot failed");
                None
            }
        };
        let stamped_seen = std::sync::atomic::AtomicBool::new(!states.is_empty());
        let producers = Producers {
            states,
            in_flight: HashMap::new(),
            next_append_id: 0,
            saved_offset,
        };
        Arc::new_cyclic(|me| Partition {
            topic,
            index,
            log,
            replica: Mutex::new(Replica::new(broker_id, replica_config, 0)),
            high_watermark: AtomicU64::new(0),
            replica_changes: watch::channel(0).0,
            me: me.clone(),
            appended,
            partition_appended: Arc::new(Notify::new()),
            deleted: std::sync::atomic::AtomicBool::new(false),
            producers: Arc::new(Mutex::new(producers)),
            stamped_seen,
            snapshot_saving: Mutex::new(()),
            isr_shrinks: AtomicU64::new(0),
            isr_expands: AtomicU64::new(0),
            leader_high_watermark: AtomicU64::new(LAG_UNKNOWN),
            caught_up_at_ms: AtomicU64::new(crate::clock::now_ms()),
        })
    }

    /// Writes the producer snapshot (every batch below the log's end),
    /// so that the next open replays only what follows.
    ///
    /// # Errors
    /// Storage errors writing it.
    pub fn save_producer_state(&self) -> Result<(), StorageError> {
        if self.is_deleted() {
            return Ok(());
        }
        // One save at a time (the periodic one may still run at shutdown):
        // two would share the temporary file, and the second could skip
        // its write trusting a first that then fails.
        let _saving = lock(&self.snapshot_saving);
        // Copied under the lock, written outside it: appends go on.
        let (snapshot, end) = {
            let mut producers = lock(&self.producers);
            let end = self.log.end_offset();
            let changed = producers.states.take_changed();
            if !changed && producers.saved_offset == Some(end) {
                // Nothing new since the last one: no write, no fsync.
                return Ok(());
            }
            (producers.states.snapshot(end), end)
        };
        let saved = snapshot.save(self.log.dir());
        lock(&self.producers).saved_offset = saved.is_ok().then_some(end);
        saved
    }

    /// Forgets producers idle for `idle_ms`.
    pub fn expire_producers(&self, now_ms: i64, idle_ms: i64) {
        lock(&self.producers).states.expire(now_ms, idle_ms);
    }

    /// Idempotent producers this partition tracks.
    pub fn producer_count(&self) -> usize {
        lock(&self.producers).states.len()
    }

    /// Marks the partition's topic deleted and wakes its readers.
    pub fn mark_deleted(&self) {
        self.deleted
            .store(true, std::sync::atomic::Ordering::Release);
        self.wake_readers();
    }

    /// Whether its topic was deleted.
    pub fn is_deleted(&self) -> bool {
        self.deleted.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Wakes everyone waiting for this partition's data (an append, a
    /// close, a delete).
    pub fn wake_readers(&self) {
        self.partition_appended.notify_waiters();
        self.appended.notify_waiters();
    }

    /// Offsets below it are readable by consumers.
    pub fn high_watermark(&self) -> u64 {
        self.high_watermark.load(Ordering::Acquire)
    }

    /// The leader epoch of the metadata last applied (-1 before any).
    pub fn leader_epoch(&self) -> i32 {
        lock(&self.replica).leader_epoch()
    }

    /// Whether this broker leads the partition now.
    pub fn is_leader(&self) -> bool {
        lock(&self.replica).is_leader()
    }

    /// What every replica holds, as this broker (if it leads) knows: see
    /// [`Replica::replicas_end_floor`].
    pub fn replicas_end_floor(&self) -> u64 {
        lock(&self.replica).replicas_end_floor(self.log.end_offset())
    }

    /// The leader as this broker knows it.
    pub fn leader(&self) -> Option<BrokerId> {
        lock(&self.replica).leader()
    }

    /// The metadata last applied.
    pub fn state(&self) -> Option<PartitionState> {
        lock(&self.replica).state().cloned()
    }

    /// The in-sync set the high watermark counts (committed plus a
    /// proposed expansion).
    pub fn maximal_isr(&self) -> Vec<BrokerId> {
        lock(&self.replica).maximal_isr()
    }

    /// Changes whenever the high watermark or the leadership does.
    pub fn replica_changes(&self) -> watch::Receiver<u64> {
        self.replica_changes.subscribe()
    }

    /// Carries out the local actions (epoch, truncation, high watermark)
    /// under the rules' lock, in order, and returns the rest (for the
    /// driver: fetching, stopping, proposals). `BecomeLeader` is returned
    /// too, so the driver stops fetching.
    fn carry_out(&self, replica: &mut Replica, actions: Vec<Action>) -> Vec<Action> {
        let mut rest = Vec::new();
        let mut changed = false;
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::HighWatermark(offset) => {
                    self.high_watermark.store(offset, Ordering::Release);
                    changed = true;
                }
                Action::BecomeLeader { epoch } => {
                    // The epoch starts at the log's end, before any append
                    // in it: followers find where the previous one ended.
                    if let Err(error) = crate::blocking::blocking(|| self.log.assign_epoch(epoch)) {
                        tracing::error!(topic = %self.topic, partition = self.index, %error,
                            "cannot record the new leader epoch; not leading");
                    }
                    changed = true;
                    rest.push(action);
                    // With no follower to wait for, what is durable is committed.
                    queue.extend(replica.on_local_durable(&LogAdapter(&self.log)));
                }
                Action::Truncate { offset } => {
                    let cut = crate::blocking::blocking(|| self.log.truncate_to(offset));
                    match cut {
                        Ok(()) => lock(&self.producers).states.purge_from(offset),
                        Err(error) => tracing::error!(topic = %self.topic,
                            partition = self.index, offset, %error, "truncation failed"),
                    }
                }
                Action::Stop | Action::FollowLeader { .. } => {
                    changed = true;
                    rest.push(action);
                }
                Action::ProposeIsr { .. } => rest.push(action),
            }
        }
        if changed {
            self.replica_changes.send_modify(|version| *version += 1);
            self.wake_readers();
        }
        rest
    }

    /// Applies the controller's view of this partition (with the
    /// `min.insync.replicas` its topic calls for).
    pub fn apply_metadata(
        &self,
        state: PartitionState,
        min_insync_replicas: usize,
        now_ms: u64,
    ) -> Vec<Action> {
        let mut replica = lock(&self.replica);
        replica.set_min_insync_replicas(min_insync_replicas);
        let before = replica
            .state()
            .map(|state| (state.isr.clone(), state.leader_epoch));
        let actions = replica.apply_metadata(state, &LogAdapter(&self.log), now_ms);
        let after = replica
            .state()
            .map(|state| (state.isr.clone(), state.leader_epoch));
        if let (Some((isr_before, epoch_before)), Some((isr_after, epoch_after))) =
            (&before, &after)
        {
            // Counted by the leader only, so a cluster-wide sum counts each
            // once; a swap (one out, one in) counts as both.
            if replica.is_leader() {
                if isr_before.iter().any(|broker| !isr_after.contains(broker)) {
                    self.isr_shrinks.fetch_add(1, Ordering::Relaxed);
                }
                if isr_after.iter().any(|broker| !isr_before.contains(broker)) {
                    self.isr_expands.fetch_add(1, Ordering::Relaxed);
                }
            }
            if epoch_before != epoch_after {
                // A new leader or epoch: this follower's lag is unknown
                // until its first answer, and counts from now.
                self.leader_high_watermark
                    .store(LAG_UNKNOWN, Ordering::Relaxed);
                self.caught_up_at_ms.store(now_ms, Ordering::Relaxed);
            }
        }
        self.carry_out(&mut replica, actions)
    }

    /// (shrinks, expansions) of the in-sync set applied while this broker led.
    pub fn isr_changes(&self) -> (u64, u64) {
        (
            self.isr_shrinks.load(Ordering::Relaxed),
            self.isr_expands.load(Ordering::Relaxed),
        )
    }

    /// As a follower with a leader: (records behind the leader's high
    /// watermark, when it last held all of them in ms since the epoch).
    /// `None` when leading or with no leader.
    pub fn follower_lag(&self) -> Option<(u64, u64)> {
        let replica = lock(&self.replica);
        if replica.is_leader() || replica.leader().is_none() {
            return None;
        }
        let leader_high_watermark = self.leader_high_watermark.load(Ordering::Relaxed);
        if leader_high_watermark == LAG_UNKNOWN {
            return None;
        }
        Some((
            leader_high_watermark.saturating_sub(self.log.end_offset()),
            self.caught_up_at_ms.load(Ordering::Relaxed),
        ))
    }

    /// The leader's side of a follower's fetch.
    pub fn on_replica_fetch(&self, fetch: &FetchFrom, now_ms: u64) -> (FetchAnswer, Vec<Action>) {
        let mut replica = lock(&self.replica);
        let (answer, actions) = replica.on_fetch(fetch, &LogAdapter(&self.log), now_ms);
        let rest = self.carry_out(&mut replica, actions);
        (answer, rest)
    }

    /// A follower's side of its leader's answer (after appending what it
    /// carried, durably).
    pub fn on_fetch_answer(
        &self,
        from: BrokerId,
        leader_epoch: i32,
        answer: &FetchAnswer,
    ) -> Vec<Action> {
        let mut replica = lock(&self.replica);
        // Only an answer from the leader followed, in its epoch, says how
        // far behind this follower is.
        if let FetchAnswer::Read { high_watermark, .. } = *answer
            && replica.leader() == Some(from)
            && replica.leader_epoch() == leader_epoch
        {
            self.leader_high_watermark
                .store(high_watermark, Ordering::Relaxed);
            if self.log.end_offset() >= high_watermark {
                self.caught_up_at_ms
                    .store(crate::clock::now_ms(), Ordering::Relaxed);
            }
        }
        let actions = replica.on_fetch_answer(from, leader_epoch, answer, &LogAdapter(&self.log));
        self.carry_out(&mut replica, actions)
    }

    /// Time passed: lagging followers leave the in-sync set, unanswered
    /// proposals are retried.
    pub fn tick(&self, now_ms: u64) -> Vec<Action> {
        let mut replica = lock(&self.replica);
        let actions = replica.tick(now_ms);
        self.carry_out(&mut replica, actions)
    }

    /// The controller refused an in-sync proposal.
    pub fn on_isr_refused(&self, partition_epoch: i32, isr: &[BrokerId], error: &MetadataError) {
        lock(&self.replica).on_isr_refused(partition_epoch, isr, error);
    }

    /// Whether a produce may be appended now; the leader epoch it is
    /// appended in.
    ///
    /// # Errors
    /// `NotLeader`, or `NotEnoughReplicas` for `acks=all` with too small an
    /// in-sync set.
    pub fn check_produce(&self, acks_all: bool) -> Result<i32, ErrorCode> {
        let replica = lock(&self.replica);
        replica.check_produce(acks_all, None)?;
        let epoch = replica.leader_epoch();
        // A failed write's repair truncates an epoch no record was written
        // in yet: record it again, or appends would carry the previous one.
        if self
            .log
            .epochs()
            .latest()
            .is_none_or(|latest| latest.epoch < epoch)
            && let Err(error) = crate::blocking::blocking(|| self.log.assign_epoch(epoch))
        {
            tracing::error!(topic = %self.topic, partition = self.index, %error,
                "cannot record the leader epoch");
            return Err(ErrorCode::StorageError);
        }
        Ok(epoch)
    }

    /// Waits until an `acks=all` append ending at `end_offset`, made in
    /// `leader_epoch`, is on every in-sync replica.
    ///
    /// # Errors
    /// `NotLeader` when leadership moved first (the record may or may not
    /// survive: the producer retries), `NotEnoughReplicasAfterAppend`.
    pub async fn wait_replicated(
        &self,
        end_offset: u64,
        leader_epoch: i32,
    ) -> Result<(), ErrorCode> {
        let mut changes = self.replica_changes.subscribe();
        loop {
            if let Some(outcome) = lock(&self.replica).acks_all_outcome(end_offset, leader_epoch) {
                return outcome;
            }
            if changes.changed().await.is_err() {
                return Err(ErrorCode::ShuttingDown);
            }
        }
    }

    /// A follower appends a batch copied from its leader, offsets and epoch
    /// kept, recording an idempotent producer's batch as the leader did (so
    /// a retry after a failover is still recognised).
    ///
    /// # Errors
    /// The storage error's code.
    pub fn append_replica(&self, batch: Bytes) -> Result<weir_storage::AppendFuture, ErrorCode> {
        let stamp = Batch::parse(&batch)
            .ok()
            .and_then(|parsed| Stamp::of(&parsed).ok().flatten());
        let mut producers = lock(&self.producers);
        let future = self
            .log
            .append_replica(batch)
            .map_err(|error| storage_error_code(&error))?;
        if let Some(stamp) = stamp {
            self.stamped_seen.store(true, Ordering::Release);
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_millis() as i64);
            producers
                .states
                .record(&stamp, future.base_offset(), now_ms);
        }
        Ok(future)
    }

    /// Checks every batch in `records` (framing, CRC, size, record count)
    /// and, only if all pass, hands them to the log in order. Synchronous,
    /// so that a connection's produce requests reach a partition in the
    /// order they arrived. A storage failure while submitting can leave a
    /// prefix appended.
    ///
    /// The returned [`PendingAppend`] resolves when the flush policy is met.
    /// Waiting for that happens in a task of its own, which also wakes
    /// readers, so a produce request that times out or is dropped never
    /// leaves fetches and subscriptions unaware of data that did land.
    ///
    /// # Errors
    /// An [`ErrorCode`] for the client: CorruptBatch, BatchTooLarge,
    /// StorageFull, StorageError, ShuttingDown.
    pub fn submit(&self, records: Bytes, leader_epoch: i32) -> Result<PendingAppend, ErrorCode> {
        let mut decompressed_budget = DECOMPRESSED_BYTES_MAX;
        self.submit_within(records, leader_epoch, &mut decompressed_budget)
    }

    /// [`Partition::submit`], decompressing at most `decompressed_budget`
    /// bytes to check compressed batches, and taking what it used from it
    /// (a produce request shares one budget across its partitions).
    ///
    /// # Errors
    /// As `submit`; CorruptBatch once the budget is spent.
    pub fn submit_within(
        &self,
        records: Bytes,
        leader_epoch: i32,
        decompressed_budget: &mut usize,
    ) -> Result<PendingAppend, ErrorCode> {
        let config = self.log.config();
        let budget_before = *decompressed_budget;
        // What is left of the budget comes back with the outcome, refused
        // or not: a refused batch spent what it decompressed too.
        let check = || {
            let mut decompressed_budget = budget_before;
            let mut parsed = Vec::new();
            let mut records_total = 0u64;
            let mut check_all = || {
                for batch in Batches::new(&records, false) {
                    let batch = batch.map_err(|_| ErrorCode::CorruptBatch)?;
                    if batch.len() > config.batch_bytes_max {
                        return Err(ErrorCode::BatchTooLarge);
                    }
                    if batch.records_count() as u32 > config.batch_records_max {
                        return Err(ErrorCode::CorruptBatch);
                    }
                    check_records(&batch, &mut decompressed_budget)?;
                    records_total += batch.records_count() as u64;
                    parsed.push(batch);
                }
                Ok(())
            };
            let outcome = check_all();
            (
                outcome.map(|()| (parsed, records_total)),
                decompressed_budget,
            )
        };
        // Decompressing up to DECOMPRESSED_BYTES_MAX takes tens of
        // milliseconds: let the runtime move other tasks off this worker.
        let compressed = Batches::new(&records, false)
            .any(|batch| batch.is_ok_and(|batch| batch.compression() != Compression::None));
        let (checked, budget_left) = if compressed {
            crate::blocking::blocking(check)
        } else {
            check()
        };
        *decompressed_budget = budget_left;
        let (parsed, records_total) = checked?;
        let stamps = parsed
            .iter()
            .map(Stamp::of)
            .collect::<Result<Vec<_>, _>>()?;
        if stamps.iter().any(Option::is_some) {
            // As in Kafka: an idempotent batch travels alone, so that a
            // retry is exactly one earlier batch.
            let ([batch], [Some(stamp)]) = (&parsed[..], &stamps[..]) else {
                return Err(ErrorCode::InvalidRequest);
            };
            let (stamp, length) = (*stamp, batch.len());
            drop(parsed);
            let mut owned = records;
            owned.truncate(length);
            return self.submit_stamped(owned, stamp, records_total, leader_epoch);
        }
        // The log checks each batch's CRC as it appends. A lone batch is
        // left to that check (one pass over the bytes, not two); several
        // are checked here first, so that a bad one refuses them all rather
        // than leaving a prefix appended.
        if parsed.len() > 1 {
            for batch in &parsed {
                batch.verify_crc().map_err(|_| ErrorCode::CorruptBatch)?;
            }
        }
        if parsed.is_empty() {
            return Err(ErrorCode::CorruptBatch);
        }
        let lengths: Vec<usize> = parsed.iter().map(Batch::len).collect();
        drop(parsed);
        // A lone batch goes to the log as it is: the log patches and writes
        // it in place, without a copy when it is its buffer's only user (as
        // the reader arranges for large frames). Several are copied apart,
        // so that none keeps the others' memory alive in the log's cache.
        let batches: Vec<Bytes> = if let [length] = lengths[..] {
            let mut lone = records;
            lone.truncate(length);
            vec![lone]
        } else {
            let mut rest = &records[..];
            lengths
                .iter()
                .map(|length| {
                    let (batch, after) = rest.split_at(*length);
                    rest = after;
                    Bytes::copy_from_slice(batch)
                })
                .collect()
        };
        let bytes_total = lengths.iter().map(|length| *length as u64).sum();
        let mut futures = Vec::with_capacity(batches.len());
        let mut failure = None;
        for batch in batches {
            let appended = if self.stamped_seen.load(std::sync::atomic::Ordering::Acquire) {
                // Offsets a failed write took back may now be reused: the
                // producer table must forget the batches that had them.
                let mut producers = lock(&self.producers);
                self.log
                    .append_checked_in_epoch(batch, leader_epoch, |next_offset| {
                        producers.states.purge_from(next_offset);
                        Ok::<(), std::convert::Infallible>(())
                    })
                    .map(|checked| match checked {
                        Ok(future) => future,
                        Err(never) => match never {},
                    })
            } else {
                self.log
                    .append_checked_in_epoch(batch, leader_epoch, |_| {
                        Ok::<(), std::convert::Infallible>(())
                    })
                    .map(|checked| match checked {
                        Ok(future) => future,
                        Err(never) => match never {},
                    })
            };
            match appended {
                Ok(future) => futures.push(future),
                Err(error) => {
                    failure = Some(storage_error_code(&error));
                    break;
                }
            }
        }
        Ok(self.complete(futures, failure, records_total, bytes_total, None))
    }

    /// A stamped (idempotent) batch: a duplicate is answered with the
    /// original's offset once that is durable; a new one is appended and
    /// recorded.
    fn submit_stamped(
        &self,
        batch: Bytes,
        stamp: Stamp,
        records_total: u64,
        leader_epoch: i32,
    ) -> Result<PendingAppend, ErrorCode> {
        let batch_bytes = batch.len() as u64;
        self.stamped_seen
            .store(true, std::sync::atomic::Ordering::Release);
        let mut guard = lock(&self.producers);
        let producers = &mut *guard;
        // Decided under the log's writer lock, after it repaired any failed
        // write: batches whose offsets it took back are forgotten first.
        let appended = self
            .log
            .append_checked_in_epoch(batch, leader_epoch, |next_offset| {
                producers.states.purge_from(next_offset);
                match producers.states.check(&stamp) {
                    Ok(Check::Append) => Ok(()),
                    Ok(Check::Duplicate(base_offset)) => Err(Ok(base_offset)),
                    Err(code) => Err(Err(code)),
                }
            })
            .map_err(|error| storage_error_code(&error))?;
        match appended {
            Err(Err(code)) => Err(code),
            Err(Ok(base_offset)) => {
                let original = producers
                    .in_flight
                    .get(&(stamp.producer_id, stamp.first_sequence))
                    .map(|(_, outcome)| outcome.clone());
                drop(guard);
                let answer = Appended {
                    base_offset,
                    // The original travelled alone; the high watermark is at
                    // batch boundaries, so passing its first offset is
                    // passing it.
                    end_offset: base_offset + 1,
                    log_start_offset: self.log.start_offset(),
                    records: 0,
                    bytes: 0,
                };
                let (sender, receiver) = tokio::sync::oneshot::channel();
                match original {
                    None => {
                        let _ = sender.send(Ok(answer));
                    }
                    Some(mut original) => {
                        // Answered only once the original is durable (or
                        // with its failure, and the client retries).
                        tokio::spawn(async move {
                            let outcome = match original.wait_for(Option::is_some).await {
                                Ok(outcome) => outcome.unwrap_or(Err(ErrorCode::Unknown)),
                                Err(_) => Err(ErrorCode::ShuttingDown),
                            };
                            let _ = sender.send(outcome.map(|()| answer));
                        });
                    }
                }
                Ok(PendingAppend { receiver })
            }
            Ok(future) => {
                let bytes_total = batch_bytes;
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |elapsed| elapsed.as_millis() as i64);
                producers
                    .states
                    .record(&stamp, future.base_offset(), now_ms);
                let id = producers.next_append_id;
                producers.next_append_id += 1;
                let (done, outcome) = watch::channel(None);
                producers
                    .in_flight
                    .insert((stamp.producer_id, stamp.first_sequence), (id, outcome));
                drop(guard);
                let stamped = StampedAppend {
                    producers: self.producers.clone(),
                    stamp,
                    id,
                    done,
                };
                Ok(self.complete(
                    vec![future],
                    None,
                    records_total,
                    bytes_total,
                    Some(stamped),
                ))
            }
        }
    }

    /// Waits for `futures` in a task of its own (which also wakes readers
    /// and settles a stamped append) and returns what resolves with them.
    fn complete(
        &self,
        futures: Vec<weir_storage::AppendFuture>,
        failure: Option<ErrorCode>,
        records_total: u64,
        bytes_total: u64,
        stamped: Option<StampedAppend>,
    ) -> PendingAppend {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let appended = self.appended.clone();
        let partition_appended = self.partition_appended.clone();
        let log_start_offset = self.log.start_offset();
        let me = self.me.clone();
        tokio::spawn(async move {
            let mut first = None;
            let mut end = 0;
            let mut outcome = Ok(());
            for future in futures {
                match future.await {
                    Ok(info) => {
                        first.get_or_insert(info.base_offset);
                        end = info.last_offset + 1;
                    }
                    Err(error) => {
                        outcome = Err(storage_error_code(&error));
                        break;
                    }
                }
            }
            // The high watermark first, then the wake-ups: a woken reader
            // must find what it was woken for.
            if let Some(partition) = me.upgrade() {
                let mut replica = lock(&partition.replica);
                let actions = replica.on_local_durable(&LogAdapter(&partition.log));
                partition.carry_out(&mut replica, actions);
            }
            partition_appended.notify_waiters();
            appended.notify_waiters();
            let result = match (failure, outcome) {
                (Some(code), _) | (None, Err(code)) => Err(code),
                (None, Ok(())) => Ok(Appended {
                    base_offset: first.unwrap_or(0),
                    end_offset: end,
                    records: records_total,
                    bytes: bytes_total,
                    log_start_offset,
                }),
            };
            if let Some(stamped) = stamped {
                stamped.finish(result.map(|_| ()));
            }
            let _ = sender.send(result);
        });
        PendingAppend { receiver }
    }
}

/// Checks that every record of a batch parses, carries the offset delta of
/// its position and that nothing follows the last, so consumers can trust
/// `offset`. Compressed batches (every Kafka codec) are decompressed for
/// it, as Kafka does, within `decompressed_budget`.
fn check_records(
    batch: &weir_protocol::Batch<'_>,
    decompressed_budget: &mut usize,
) -> Result<(), ErrorCode> {
    let decompressed;
    let mut records = match batch.compression() {
        Compression::None => batch.records_from(batch.records_bytes()),
        codec => {
            // Decompressing costs far more than a CRC pass: refuse a
            // damaged batch before spending it.
            batch.verify_crc().map_err(|_| ErrorCode::CorruptBatch)?;
            decompressed = weir_protocol::codec::decompress(
                codec,
                batch.records_bytes(),
                *decompressed_budget,
            )
            .map_err(|_| {
                // How much a failed decompression spent is unknown: charge
                // all of it, so a request cannot repeat a bomb per partition.
                *decompressed_budget = 0;
                ErrorCode::CorruptBatch
            })?;
            *decompressed_budget -= decompressed.len();
            batch.records_from(&decompressed)
        }
    };
    let mut count = 0i64;
    for position in 0.. {
        let Some(record) = records.next() else {
            break;
        };
        let record = record.map_err(|_| ErrorCode::CorruptBatch)?;
        if record.offset != batch.base_offset() + position as u64 {
            return Err(ErrorCode::CorruptBatch);
        }
        count += 1;
    }
    if count != i64::from(batch.records_count()) || records.rest_bytes() != 0 {
        // Too few records, or bytes after the last one.
        return Err(ErrorCode::CorruptBatch);
    }
    Ok(())
}

/// An append handed to the log, not yet durable.
#[derive(Debug)]
pub struct PendingAppend {
    receiver: tokio::sync::oneshot::Receiver<Result<Appended, ErrorCode>>,
}

impl PendingAppend {
    /// Resolves when the flush policy is met for every batch.
    ///
    /// # Errors
    /// The append's [`ErrorCode`].
    pub async fn wait(self) -> Result<Appended, ErrorCode> {
        self.receiver.await.unwrap_or(Err(ErrorCode::ShuttingDown))
    }
}

/// The error code for a storage error.
pub fn storage_error_code(error: &StorageError) -> ErrorCode {
    match error {
        StorageError::InvalidBatch(_) | StorageError::UnexpectedOffset { .. } => {
            ErrorCode::CorruptBatch
        }
        StorageError::BatchTooLarge { .. } => ErrorCode::BatchTooLarge,
        StorageError::StaleEpoch { .. } => ErrorCode::NotLeader,
        StorageError::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
        StorageError::StorageFull { .. } => ErrorCode::StorageFull,
        StorageError::Closed => ErrorCode::ShuttingDown,
        StorageError::Corrupt { .. }
        | StorageError::Io { .. }
        | StorageError::WriteFailed
        | StorageError::SyncFailed { .. }
        | StorageError::Locked { .. }
        | StorageError::EngineStart(_) => ErrorCode::StorageError,
    }
}

/// `leader_high_watermark` before a follower's first answer in an epoch.
const LAG_UNKNOWN: u64 = u64::MAX;
