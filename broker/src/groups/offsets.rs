//! Committed offsets as records of `__consumer_offsets`: the record
//! format, the per-partition snapshot, and the coordinator's load, save,
//! commit and fetch.

use super::*;

/// Java's `String.hashCode`, so groups land on the offsets partition
/// Kafka would put them on.
fn java_hash(text: &str) -> i32 {
    text.encode_utf16().fold(0i32, |hash, unit| {
        hash.wrapping_mul(31).wrapping_add(i32::from(unit))
    })
}

/// The offsets partition of a group.
pub fn offsets_partition(group: &str, partitions: u32) -> u32 {
    // Kafka's Utils.abs: i32::MIN maps to 0.
    let hash = java_hash(group);
    let positive = if hash == i32::MIN {
        0
    } else {
        hash.unsigned_abs()
    };
    positive % partitions.max(1)
}

const GROUPS_SNAPSHOT_FILE: &str = "groups-snapshot.json";

/// The committed offsets of one offsets partition's groups as of `offset`.
#[derive(Debug, Serialize, Deserialize)]
struct GroupsSnapshot {
    offset: u64,
    groups: BTreeMap<String, Vec<(String, u32, Committed)>>,
    /// How long ago each group last committed, in the broker's running
    /// time, ms (absent: as if at load).
    #[serde(default)]
    commit_age_ms: BTreeMap<String, u64>,
    /// How long each group without members had been empty, ms.
    #[serde(default)]
    empty_for_ms: BTreeMap<String, u64>,
}

impl GroupsSnapshot {
    /// Writes the snapshot atomically and durably. Segments below it are
    /// deleted afterwards, so it must never be written wrong: an encoding
    /// failure is an error, not an empty file.
    fn save(&self, dir: &std::path::Path) -> Result<(), String> {
        let text = serde_json::to_vec(self).map_err(|error| error.to_string())?;
        weir_storage::checkpoint::write_atomic(dir, GROUPS_SNAPSHOT_FILE, &text)
            .map_err(|error| error.to_string())
    }

    /// The snapshot, `Ok(None)` if there is none, `Err` if it is unreadable.
    fn load(dir: &std::path::Path) -> Result<Option<GroupsSnapshot>, String> {
        let path = dir.join(GROUPS_SNAPSHOT_FILE);
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(format!("{}: {error}", path.display())),
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|error| format!("{}: {error}", path.display()))
    }
}

/// The key of an offset record (JSON: readable with any consumer).
#[derive(Debug, Serialize, Deserialize)]
struct OffsetKey {
    group: String,
    topic: String,
    partition: u32,
}

impl Coordinator {
    /// Partitions of the offsets topic (which groups map onto).
    pub fn partition_count(&self) -> u32 {
        self.offsets_partitions.load(Ordering::Acquire).max(1)
    }

    /// `Ok` when this broker coordinates `group` now (it leads the group's
    /// offsets partition and has loaded it), else `NotCoordinator`.
    pub fn check_coordinator(&self, group: &str) -> Result<(), ErrorCode> {
        let index = offsets_partition(group, self.partition_count());
        if lock(&self.owned).contains_key(&index) {
            Ok(())
        } else {
            Err(ErrorCode::NotCoordinator)
        }
    }

    /// Takes up the offsets partitions this broker has come to lead
    /// (loading their groups) and gives up those it no longer leads, or
    /// leads in another epoch than it loaded them in (dropping their
    /// groups, whose members then find the coordinator again; a partition
    /// led anew is loaded afresh, since another leader may have taken
    /// commits in between). A partition whose commit lock is held (a commit
    /// waiting for its replicas) is left to the next call. Blocking (reads
    /// logs): call it off the runtime.
    pub fn follow_leadership(&self, topics: &Topics) {
        let Some(topic) = topics.get(OFFSETS_TOPIC) else {
            let owned: Vec<u32> = lock(&self.owned).keys().copied().collect();
            for index in owned {
                if let Ok(_ordered) = self.commit_lock(index).try_lock() {
                    self.unload(index);
                }
            }
            return;
        };
        self.offsets_partitions
            .store(topic.partitions.len().max(1) as u32, Ordering::Release);
        for partition in &topic.partitions {
            let index = partition.index;
            let epoch = partition.leader_epoch();
            let leads = partition.is_leader() && !partition.is_deleted();
            let loaded_in = lock(&self.owned).get(&index).copied();
            if leads && loaded_in == Some(epoch) {
                continue;
            }
            if !leads && loaded_in.is_none() {
                continue;
            }
            let Ok(_ordered) = self.commit_lock(index).try_lock() else {
                continue;
            };
            if loaded_in.is_some() {
                self.unload(index);
            }
            if !leads || lock(&self.load_failed).get(&index) == Some(&epoch) {
                continue;
            }
            match self.load_partition(partition) {
                Ok(()) => {
                    lock(&self.owned).insert(index, epoch);
                    lock(&self.load_failed).remove(&index);
                }
                Err(error) => {
                    // Serving the partition's groups without the offsets it
                    // failed to load would hand out wrong positions.
                    tracing::error!(partition = index, epoch, %error,
                        "cannot load the offsets partition; its groups stay uncoordinated");
                    lock(&self.load_failed).insert(index, epoch);
                }
            }
        }
    }

    /// The lock a commit to offsets partition `index` holds from append to
    /// apply.
    fn commit_lock(&self, index: u32) -> &tokio::sync::Mutex<()> {
        &self.commit_locks[index as usize % self.commit_locks.len()]
    }

    /// Stops coordinating the groups of offsets partition `index` (its
    /// commit lock held by the caller).
    fn unload(&self, index: u32) {
        let count = self.partition_count();
        let mut dropped = 0usize;
        {
            let mut groups = lock(&self.groups);
            lock(&self.owned).remove(&index);
            groups.retain(|name, _| {
                let keep = offsets_partition(name, count) != index;
                dropped += usize::from(!keep);
                keep
            });
        }
        // Joins waiting on a dropped group answer NotCoordinator.
        self.changed.notify_waiters();
        tracing::info!(
            partition = index,
            groups = dropped,
            "no longer coordinating the groups of this offsets partition"
        );
    }

    /// Loads the groups of one offsets partition this broker now leads:
    /// its snapshot, then the records after it (read without holding the
    /// groups' lock, which every group call takes), replacing whatever this
    /// broker held of those groups before.
    ///
    /// # Errors
    /// A partition whose records below its start were deleted (replaced by
    /// its snapshot) but whose snapshot is missing or unreadable: serving
    /// it anyway would silently forget the groups it held.
    fn load_partition(&self, partition: &crate::partition::Partition) -> Result<(), String> {
        let count = self.partition_count();
        let mut loaded = BTreeMap::new();
        let records = replay(partition, &mut loaded, Instant::now())?;
        let loaded_groups = loaded.len();
        {
            let mut groups = lock(&self.groups);
            groups.retain(|name, _| offsets_partition(name, count) != partition.index);
            // Only this partition's groups: its log holds no others.
            groups.extend(
                loaded
                    .into_iter()
                    .filter(|(name, _)| offsets_partition(name, count) == partition.index),
            );
        }
        tracing::info!(
            partition = partition.index,
            groups = loaded_groups,
            records,
            "coordinating the groups of this offsets partition"
        );
        Ok(())
    }

    /// Replays every local offsets partition without keeping the result,
    /// so that a broker whose offsets cannot be loaded refuses to start
    /// rather than later forget its groups when it comes to lead them.
    ///
    /// # Errors
    /// As [`replay`], naming the partition.
    pub fn verify(&self, topics: &Topics) -> Result<(), String> {
        let Some(topic) = topics.get(OFFSETS_TOPIC) else {
            return Ok(());
        };
        for partition in &topic.partitions {
            replay(partition, &mut BTreeMap::new(), Instant::now())?;
        }
        Ok(())
    }

    /// Writes the snapshot of each offsets partition this broker
    /// coordinates (the offsets of its groups, as of its end, once all of it
    /// is committed), so the next load replays only what follows. Blocking
    /// (takes the commit locks, writes files): call it off the runtime.
    pub fn save_snapshots(&self, topics: &Topics) {
        let Some(topic) = topics.get(OFFSETS_TOPIC) else {
            return;
        };
        let count = topic.partitions.len() as u32;
        for partition in &topic.partitions {
            // Holding the partition's commit lock: no commit is between its
            // append and its apply, so the end offset and the table agree.
            let _ordered = self.commit_locks[partition.index as usize % self.commit_locks.len()]
                .blocking_lock();
            // Only the coordinator's table is the partition's content, and
            // only while it leads in the epoch it loaded in (a partition led
            // elsewhere meanwhile took commits this table does not have).
            let loaded_in = lock(&self.owned).get(&partition.index).copied();
            if !partition.is_leader() || loaded_in != Some(partition.leader_epoch()) {
                continue;
            }
            // Only durable commits may be covered (a crash must not leave
            // the log below the snapshot).
            if let Err(error) = partition.log.flush() {
                tracing::warn!(partition = partition.index, %error, "offsets flush failed; no snapshot");
                continue;
            }
            let offset = partition.log.end_offset();
            if partition.high_watermark() < offset {
                // Records not yet on every in-sync replica (taken over with
                // the partition, or a commit that timed out) could still be
                // cut: the snapshot waits until they are committed.
                continue;
            }
            let mut groups = BTreeMap::new();
            let mut commit_age_ms = BTreeMap::new();
            let mut empty_for_ms = BTreeMap::new();
            let now = Instant::now();
            let millis = |age: Duration| u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
            for (name, group) in lock(&self.groups).iter().filter(|(name, group)| {
                !group.offsets.is_empty() && offsets_partition(name, count) == partition.index
            }) {
                groups.insert(
                    name.clone(),
                    group
                        .offsets
                        .iter()
                        .map(|((topic, index), committed)| {
                            (topic.clone(), *index, committed.clone())
                        })
                        .collect(),
                );
                commit_age_ms.insert(name.clone(), millis(group.since_commit.elapsed(now)));
                if let Some(empty) = group.empty {
                    empty_for_ms.insert(name.clone(), millis(empty.elapsed(now)));
                }
            }
            let snapshot = GroupsSnapshot {
                offset,
                groups,
                commit_age_ms,
                empty_for_ms,
            };
            if let Err(error) = snapshot.save(partition.log.dir()) {
                tracing::warn!(partition = partition.index, %error, "group snapshot failed");
                continue;
            }
            // The snapshot (durable) now stands for every record below its
            // offset: whole segments of them can go, which keeps the
            // offsets log from growing with every commit for ever. Only
            // below what every replica has (followers keep whole logs and
            // replay them when they come to lead), so that no replica is
            // left behind the log's start.
            let below = offset.min(partition.replicas_end_floor());
            match partition.log.delete_segments_before(below) {
                Ok(outcome) if outcome.segments_deleted > 0 => tracing::info!(
                    partition = partition.index,
                    segments = outcome.segments_deleted,
                    bytes = outcome.bytes_deleted,
                    "offsets log compacted below its snapshot"
                ),
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(partition = partition.index, %error, "offsets log compaction failed")
                }
            }
        }
    }

    /// OffsetCommit: all offsets or none, on every in-sync replica of the
    /// offsets partition before the answer.
    pub async fn commit(
        &self,
        topics: &Topics,
        request: OffsetCommitRequest,
    ) -> OffsetCommitResponse {
        let refuse = |error: ErrorCode, request: &OffsetCommitRequest| OffsetCommitResponse {
            error,
            partitions: request
                .offsets
                .iter()
                .map(|offset| OffsetCommitPartitionResponse {
                    topic: offset.topic.clone(),
                    partition: offset.partition,
                    error,
                })
                .collect(),
        };
        if !valid_name(&request.group)
            || request.offsets.len() > COMMIT_OFFSETS_MAX
            || request.offsets.iter().any(|offset| {
                offset
                    .metadata
                    .as_ref()
                    .is_some_and(|metadata| metadata.len() > COMMIT_METADATA_BYTES_MAX)
            })
        {
            return refuse(ErrorCode::InvalidRequest, &request);
        }
        if request.offsets.is_empty() {
            return OffsetCommitResponse {
                error: ErrorCode::None,
                partitions: Vec::new(),
            };
        }
        if request
            .offsets
            .iter()
            .any(|offset| topics.partition(&offset.topic, offset.partition).is_none())
        {
            return refuse(ErrorCode::UnknownTopicOrPartition, &request);
        }
        if let Err(error) = self
            .check_coordinator(&request.group)
            .and_then(|()| self.check_committer(&request))
        {
            return refuse(error, &request);
        }
        let Some(offsets_topic) = topics.get(OFFSETS_TOPIC) else {
            return refuse(ErrorCode::NotCoordinator, &request);
        };
        let index = offsets_partition(&request.group, offsets_topic.partitions.len() as u32);
        let Some(partition) = offsets_topic.partitions.get(index as usize).cloned() else {
            return refuse(ErrorCode::NotCoordinator, &request);
        };
        let _ordered = self.commit_locks[index as usize % self.commit_locks.len()]
            .lock()
            .await;
        // Checked again under the commit lock: a rebalance may have begun,
        // or leadership of the offsets partition moved.
        if let Err(error) = self
            .check_coordinator(&request.group)
            .and_then(|()| self.check_committer(&request))
        {
            return refuse(error, &request);
        }
        // A commit under way keeps its group from expiring meanwhile (the
        // apply below would otherwise bring back only these partitions).
        if let Some(group) = lock(&self.groups).get_mut(&request.group) {
            group.since_commit = RunningTime::starting(Instant::now());
        }
        let batch = offsets_batch(&request);
        // Leadership moved under the commit: the client finds the new
        // coordinator and commits there.
        let moved = |error: ErrorCode| match error {
            ErrorCode::NotLeader | ErrorCode::FencedLeaderEpoch => ErrorCode::NotCoordinator,
            error => error,
        };
        let appended = async {
            let epoch = partition.check_produce(true)?;
            let appended = partition.submit(batch, epoch)?.wait().await?;
            Ok::<_, ErrorCode>((epoch, appended))
        };
        let (epoch, appended) = match appended.await {
            Ok(appended) => appended,
            Err(error) => return refuse(moved(error), &request),
        };
        // In the log now: the table follows the log whatever the wait
        // below says (a snapshot, taken only once the whole log is
        // committed, must not cover a record the table lacks).
        self.apply_commit(&request);
        // As an acks=all produce: the next coordinator (any in-sync
        // replica) has every commit that was answered.
        let replicated = tokio::time::timeout(
            Duration::from_millis(OFFSET_COMMIT_REPLICATION_TIMEOUT_MS),
            partition.wait_replicated(appended.end_offset, epoch),
        )
        .await
        .map_err(|_| ErrorCode::Timeout)
        .and_then(|outcome| outcome);
        if let Err(error) = replicated {
            return refuse(moved(error), &request);
        }
        OffsetCommitResponse {
            error: ErrorCode::None,
            partitions: request
                .offsets
                .iter()
                .map(|offset| OffsetCommitPartitionResponse {
                    topic: offset.topic.clone(),
                    partition: offset.partition,
                    error: ErrorCode::None,
                })
                .collect(),
        }
    }

    /// Appends a tombstone for each expired offset, so that replicas
    /// replaying the log (a coordinator elected later, which has no
    /// snapshot saying they expired) do not bring them back. Offsets
    /// committed again since they expired are left alone. Failures are
    /// logged: the snapshot still forgets them here.
    pub async fn write_tombstones(
        &self,
        topics: &Topics,
        expired: Vec<(String, Vec<(String, u32)>)>,
    ) {
        let Some(offsets_topic) = topics.get(OFFSETS_TOPIC) else {
            return;
        };
        for (group, keys) in expired {
            let index = offsets_partition(&group, offsets_topic.partitions.len() as u32);
            let Some(partition) = offsets_topic.partitions.get(index as usize).cloned() else {
                continue;
            };
            let _ordered = self.commit_lock(index).lock().await;
            if self.check_coordinator(&group).is_err() {
                continue;
            }
            let keys: Vec<(String, u32)> = {
                let groups = lock(&self.groups);
                let current = groups.get(&group);
                keys.into_iter()
                    .filter(|key| current.is_none_or(|current| !current.offsets.contains_key(key)))
                    .collect()
            };
            if keys.is_empty() {
                continue;
            }
            let now_ms = wall_clock_ms();
            let mut builder = BatchBuilder::new(now_ms);
            for (topic, topic_partition) in &keys {
                let key = serde_json::to_vec(&OffsetKey {
                    group: group.clone(),
                    topic: topic.clone(),
                    partition: *topic_partition,
                })
                .unwrap_or_default();
                builder.push(now_ms, Some(&key), None, &[]);
            }
            let batch = Bytes::from(builder.finish());
            let written = async {
                let epoch = partition.check_produce(true)?;
                let appended = partition.submit(batch, epoch)?.wait().await?;
                tokio::time::timeout(
                    Duration::from_millis(OFFSET_COMMIT_REPLICATION_TIMEOUT_MS),
                    partition.wait_replicated(appended.end_offset, epoch),
                )
                .await
                .map_err(|_| ErrorCode::Timeout)?
            };
            if let Err(error) = written.await {
                tracing::warn!(group, %error, "expired offsets not tombstoned; other replicas may replay them");
            }
        }
    }

    /// Applies a commit that is in the log to the table.
    fn apply_commit(&self, request: &OffsetCommitRequest) {
        let mut groups = lock(&self.groups);
        let group = groups
            .entry(request.group.clone())
            .or_insert_with(|| Group::new(Instant::now()));
        group.since_commit = RunningTime::starting(Instant::now());
        for offset in &request.offsets {
            group.offsets.insert(
                (offset.topic.clone(), offset.partition),
                Committed {
                    offset: offset.offset,
                    metadata: offset.metadata.clone(),
                },
            );
        }
    }

    /// Whether `request`'s committer may commit these offsets now.
    fn check_committer(&self, request: &OffsetCommitRequest) -> Result<(), ErrorCode> {
        let groups = lock(&self.groups);
        if request.generation < 0 && request.member_id.is_empty() {
            // An admin (or a consumer without a group membership): only
            // while nobody consumes the group.
            return match groups.get(&request.group) {
                Some(group) if !group.members.is_empty() => Err(ErrorCode::GroupNotEmpty),
                _ => {
                    if !groups.contains_key(&request.group) && groups.len() >= GROUPS_MAX {
                        Err(ErrorCode::InvalidRequest)
                    } else {
                        Ok(())
                    }
                }
            };
        }
        let group = check_member(&groups, &request.group, &request.member_id)?;
        if group.generation != request.generation {
            return Err(ErrorCode::IllegalGeneration);
        }
        let member = group
            .members
            .get(&request.member_id)
            .ok_or(ErrorCode::UnknownMemberId)?;
        if request.offsets.iter().any(|offset| {
            !member
                .assignment
                .iter()
                .chain(member.revoking.iter())
                .any(|(topic, partition)| *topic == offset.topic && *partition == offset.partition)
        }) {
            return Err(ErrorCode::PartitionNotAssigned);
        }
        Ok(())
    }

    /// OffsetFetch: the committed offsets asked for (or all of the group).
    pub fn fetch(&self, request: &OffsetFetchRequest) -> OffsetFetchResponse {
        if let Err(error) = self.check_coordinator(&request.group) {
            return OffsetFetchResponse {
                error,
                offsets: Vec::new(),
            };
        }
        let groups = lock(&self.groups);
        let group = groups.get(&request.group);
        let offsets = match &request.partitions {
            Some(wanted) => wanted
                .iter()
                .map(|wanted| {
                    let committed = group.and_then(|group| {
                        group.offsets.get(&(wanted.topic.clone(), wanted.partition))
                    });
                    OffsetFetchPartition {
                        topic: wanted.topic.clone(),
                        partition: wanted.partition,
                        offset: committed.map_or(-1, |c| c.offset as i64),
                        metadata: committed.and_then(|c| c.metadata.clone()),
                    }
                })
                .collect(),
            None => group
                .map(|group| {
                    group
                        .offsets
                        .iter()
                        .map(|((topic, partition), committed)| OffsetFetchPartition {
                            topic: topic.clone(),
                            partition: *partition,
                            offset: committed.offset as i64,
                            metadata: committed.metadata.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        };
        OffsetFetchResponse {
            error: ErrorCode::None,
            offsets,
        }
    }
}

/// Replays one offsets partition into `groups`: its snapshot, then the
/// records after it; the number of records replayed.
///
/// # Errors
/// A partition whose records below its start were deleted (replaced by
/// its snapshot) but whose snapshot is missing or unreadable, or a record
/// below the end that cannot be read.
fn replay(
    partition: &crate::partition::Partition,
    groups: &mut BTreeMap<String, Group>,
    now: Instant,
) -> Result<u64, String> {
    let mut records = 0u64;
    let log = &partition.log;
    let mut from = log.start_offset();
    let end = log.end_offset();
    let index = partition.index;
    let snapshot = match GroupsSnapshot::load(log.dir()) {
        Ok(snapshot) => snapshot,
        Err(error) if from == 0 => {
            tracing::warn!(partition = index, %error, "unreadable group snapshot; replaying the whole log");
            None
        }
        Err(error) => {
            return Err(format!(
                "{OFFSETS_TOPIC} partition {index}: group snapshot unreadable: {error}"
            ));
        }
    };
    match &snapshot {
        None if from > 0 => {
            return Err(format!(
                "{OFFSETS_TOPIC} partition {index} starts at {from} but has no group \
                 snapshot to stand for the records before it"
            ));
        }
        Some(snapshot) if snapshot.offset < from => {
            return Err(format!(
                "{OFFSETS_TOPIC} partition {index} starts at {from}, after its group \
                 snapshot ({}): the records between are gone",
                snapshot.offset
            ));
        }
        _ => {}
    }
    if let Some(mut snapshot) = snapshot {
        if snapshot.offset > end {
            // Snapshots follow a flush, so the log lost records it
            // had on disk (a damaged tail cut at recovery): the
            // snapshot still knows their commits.
            tracing::warn!(
                partition = index,
                snapshot = snapshot.offset,
                end,
                "offsets log ends before its snapshot; using the snapshot"
            );
            // New commits will land below the snapshot's offset: it
            // must say where its content really ends, or the next
            // start would skip them.
            snapshot.offset = end;
            snapshot
                .save(log.dir())
                .map_err(|error| format!("{OFFSETS_TOPIC} partition {index}: {error}"))?;
        }
        for (name, offsets) in snapshot.groups {
            let commit_age_ms = snapshot.commit_age_ms.get(&name).copied();
            let empty_for_ms = snapshot.empty_for_ms.get(&name).copied();
            let group = groups.entry(name).or_insert_with(|| Group::new(now));
            // The running time it had already been idle counts
            // (downtime does not): restarts neither keep abandoned
            // groups for ever nor age live ones.
            group.since_commit =
                RunningTime::carrying(now, Duration::from_millis(commit_age_ms.unwrap_or(0)));
            group.empty =
                empty_for_ms.map(|ms| RunningTime::carrying(now, Duration::from_millis(ms)));
            for (topic, partition, committed) in offsets {
                group.offsets.insert((topic, partition), committed);
            }
        }
        from = from.max(snapshot.offset);
    }
    // Every record below the end is replayed or the start fails: a
    // record skipped here would be left out of the next snapshot and
    // then deleted, moving its offset back for good.
    let unreadable = |at: u64, what: &dyn std::fmt::Display| -> String {
        format!("{OFFSETS_TOPIC} partition {index}: offset {at} unreadable: {what}")
    };
    while from < end {
        let read = log
            .read(from, 4 << 20)
            .map_err(|error| unreadable(from, &error))?;
        if read.is_empty() {
            return Err(unreadable(from, &"nothing to read below the end"));
        }
        for chunk in read.chunks() {
            for batch in Batches::new(chunk, false) {
                let batch = batch.map_err(|error| unreadable(from, &error))?;
                let batch_records = batch.records().map_err(|error| unreadable(from, &error))?;
                for record in batch_records {
                    let record = record.map_err(|error| unreadable(from, &error))?;
                    if record.offset < from {
                        continue;
                    }
                    records += 1;
                    apply_record(groups, now, record.key, record.value);
                }
            }
        }
        from = from.max(read.next_offset());
    }
    Ok(records)
}

/// The wall clock, ms since the epoch (record timestamps).
fn wall_clock_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

/// One batch with a record per committed offset.
fn offsets_batch(request: &OffsetCommitRequest) -> Bytes {
    let now_ms = wall_clock_ms();
    let mut builder = BatchBuilder::new(now_ms);
    for offset in &request.offsets {
        let key = serde_json::to_vec(&OffsetKey {
            group: request.group.clone(),
            topic: offset.topic.clone(),
            partition: offset.partition,
        })
        .unwrap_or_default();
        let value = serde_json::to_vec(&Committed {
            offset: offset.offset,
            metadata: offset.metadata.clone(),
        })
        .unwrap_or_default();
        builder.push(now_ms, Some(&key), Some(&value), &[]);
    }
    Bytes::from(builder.finish())
}

fn apply_record(
    groups: &mut BTreeMap<String, Group>,
    now: Instant,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
) {
    let Some(Ok(key)) = key.map(serde_json::from_slice::<OffsetKey>) else {
        return;
    };
    let group = groups.entry(key.group).or_insert_with(|| Group::new(now));
    // Replayed commits count as made at load (their wall-clock age would
    // count downtime): expiry waits a whole retention from here.
    group.since_commit = RunningTime::starting(now);
    match value.map(serde_json::from_slice::<Committed>) {
        Some(Ok(committed)) => {
            group.offsets.insert((key.topic, key.partition), committed);
        }
        // A tombstone (or an unreadable value): no offset.
        _ => {
            group.offsets.remove(&(key.topic, key.partition));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Groups map to offsets partitions as Kafka maps them
    /// (`abs(hashCode) % n`).
    #[test]
    fn offsets_partition_follows_java_hash() {
        assert_eq!(java_hash("group"), 98_629_247);
        assert_eq!(offsets_partition("group", 50), 98_629_247 % 50);
        assert_eq!(java_hash(""), 0);
    }
}
