//! Idempotent produce: producer ids, and per partition the last batches of
//! every producer, so a retried batch is answered with its first offsets
//! instead of being appended twice.
//!
//! A batch stamped with a producer id (>= 0) carries the producer's epoch
//! and the sequence number of its first record; sequences count records per
//! partition from 0. For each producer a partition keeps the last
//! [`PRODUCER_BATCHES_KEPT`] batches (sequence range and offsets). A batch
//! whose range matches one of them is a duplicate; one that starts right
//! after the last is new; anything else is a gap (`OutOfOrderSequence`).
//!
//! The table is rebuilt on open from a snapshot (`producer-state.bin`,
//! written atomically at clean close and periodically when it changed)
//! plus a replay of the batch headers after the snapshot's offset.
//!
//! Bounded whatever the number of producers: a partition tracks at most
//! [`PRODUCERS_PER_PARTITION_MAX`] producers (the least recently active
//! go first) and the snapshot stores each in at most
//! [`SNAPSHOT_ENTRY_BYTES_MAX`] bytes, so it never exceeds about 1.1 MB
//! and loads in milliseconds. Short-lived producers (one `weir produce`
//! run each) cost 47 bytes apiece until they expire.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use weir_protocol::{Batch, Batches, ErrorCode};
use weir_storage::Log;

/// Batches remembered per producer and partition (Kafka keeps five too:
/// its producers have at most five batches in flight per partition).
pub const PRODUCER_BATCHES_KEPT: usize = 5;

/// Producers a partition tracks at most; beyond it the tenth that produced
/// least recently is forgotten at once (their next batch, if any, must
/// then start a new epoch or is refused as `UnknownProducerId`). Kafka's
/// clients keep at most five batches in flight per partition, so only a
/// producer idle while some nine thousand others produced is affected.
pub const PRODUCERS_PER_PARTITION_MAX: usize = 10_000;

/// Bytes of one producer in the snapshot at most: id, epoch, next
/// sequence, last offset, last seen, batch count, and five batches of
/// (first sequence, last sequence, base offset).
pub const SNAPSHOT_ENTRY_BYTES_MAX: usize = 8 + 2 + 4 + 8 + 8 + 1 + PRODUCER_BATCHES_KEPT * 16;
// The bound the module docs and docs/OPERATIONS.md state: ~1.1 MB a partition.
const _: () = assert!(PRODUCERS_PER_PARTITION_MAX * SNAPSHOT_ENTRY_BYTES_MAX <= 1_200_000);

/// Named producers remembered by a broker at most.
pub const NAMED_PRODUCERS_MAX: usize = 100_000;

const SNAPSHOT_FILE: &str = "producer-state.bin";
/// The JSON snapshot of earlier versions, read when no binary one exists.
const LEGACY_SNAPSHOT_FILE: &str = "producer-state.json";
const SNAPSHOT_MAGIC: &[u8; 8] = b"WEIRPST1";
const IDS_FILE: &str = "producer-ids.json";

/// One remembered batch of a producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchMeta {
    /// Sequence of its first record.
    pub first_sequence: i32,
    /// Sequence of its last record.
    pub last_sequence: i32,
    /// Offset of its first record.
    pub base_offset: u64,
}

/// What a partition knows of one producer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ProducerEntry {
    epoch: i16,
    batches: VecDeque<BatchMeta>,
    /// The sequence its next batch must start with.
    next_sequence: i32,
    /// Offset of its latest batch: the least recent producer goes first.
    last_offset: u64,
    /// Wall-clock time of its latest batch, ms: idle producers expire.
    last_seen_ms: i64,
}

/// The producer fields of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Producer id (>= 0).
    pub producer_id: i64,
    /// Producer epoch.
    pub epoch: i16,
    /// First record's sequence.
    pub first_sequence: i32,
    /// Last record's sequence.
    pub last_sequence: i32,
}

impl Stamp {
    /// The stamp of an idempotent batch; `None` for a plain one.
    ///
    /// # Errors
    /// `CorruptBatch` for a negative sequence or epoch on a stamped batch.
    pub fn of(batch: &Batch<'_>) -> Result<Option<Stamp>, ErrorCode> {
        if batch.producer_id() < 0 {
            return Ok(None);
        }
        let first_sequence = batch.base_sequence();
        if first_sequence < 0 || batch.producer_epoch() < 0 {
            return Err(ErrorCode::CorruptBatch);
        }
        Ok(Some(Stamp {
            producer_id: batch.producer_id(),
            epoch: batch.producer_epoch(),
            first_sequence,
            last_sequence: add_sequence(first_sequence, batch.last_offset_delta()),
        }))
    }
}

/// The sequence `count` records after `sequence` (wrapping from i32::MAX
/// to 0, as Kafka's do).
fn add_sequence(sequence: i32, count: i32) -> i32 {
    let next = i64::from(sequence) + i64::from(count);
    (next % (i64::from(i32::MAX) + 1)) as i32
}

/// What to do with a stamped batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// New: append it, then [`ProducerStates::record`].
    Append,
    /// Already appended at this offset: answer with it, append nothing.
    Duplicate(u64),
}

/// The producer table of one partition.
#[derive(Debug, Default)]
pub struct ProducerStates {
    producers: HashMap<i64, ProducerEntry>,
    /// One past the highest base offset remembered: a purge below it has
    /// work to do.
    high_offset: u64,
    /// Whether the table changed since the last snapshot was taken.
    changed: bool,
}

impl ProducerStates {
    /// Decides about a stamped batch.
    ///
    /// # Errors
    /// `ProducerFenced` (an older epoch), `OutOfOrderSequence` (a gap, or a
    /// new epoch not starting at 0), `UnknownProducerId` (no state, not at
    /// sequence 0).
    pub fn check(&self, stamp: &Stamp) -> Result<Check, ErrorCode> {
        let Some(entry) = self.producers.get(&stamp.producer_id) else {
            return if stamp.first_sequence == 0 {
                Ok(Check::Append)
            } else {
                Err(ErrorCode::UnknownProducerId)
            };
        };
        if stamp.epoch < entry.epoch {
            return Err(ErrorCode::ProducerFenced);
        }
        if stamp.epoch > entry.epoch {
            return if stamp.first_sequence == 0 {
                Ok(Check::Append)
            } else {
                Err(ErrorCode::OutOfOrderSequence)
            };
        }
        if let Some(duplicate) = entry.batches.iter().find(|batch| {
            batch.first_sequence == stamp.first_sequence
                && batch.last_sequence == stamp.last_sequence
        }) {
            return Ok(Check::Duplicate(duplicate.base_offset));
        }
        if stamp.first_sequence == entry.next_sequence {
            Ok(Check::Append)
        } else {
            Err(ErrorCode::OutOfOrderSequence)
        }
    }

    /// Forgets every batch at or past `offset`: a failed write took those
    /// offsets back (the log reuses them), so those batches are not in the
    /// log and their producers must send them again. Their producers keep
    /// their epoch and continue from the first forgotten sequence.
    pub fn purge_from(&mut self, offset: u64) {
        if self.high_offset <= offset {
            return;
        }
        self.changed = true;
        for entry in self.producers.values_mut() {
            if let Some(first_gone) = entry
                .batches
                .iter()
                .find(|batch| batch.base_offset >= offset)
                .map(|batch| batch.first_sequence)
            {
                entry.batches.retain(|batch| batch.base_offset < offset);
                entry.next_sequence = first_gone;
            }
        }
        self.high_offset = offset;
    }

    /// Drops producers whose latest batch is older than `idle_ms` (as
    /// Kafka's `producer.id.expiration.ms`): their retries are long over.
    pub fn expire(&mut self, now_ms: i64, idle_ms: i64) {
        let before = self.producers.len();
        self.producers
            .retain(|_, entry| entry.last_seen_ms.saturating_add(idle_ms) >= now_ms);
        self.changed |= self.producers.len() != before;
    }

    /// Forgets the tenth of the producers that produced least recently
    /// (at least one), making room under [`PRODUCERS_PER_PARTITION_MAX`]:
    /// one sort per many new producers, not a scan per new one.
    fn evict_least_recent(&mut self) {
        let mut by_recency: Vec<(u64, i64)> = self
            .producers
            .iter()
            .map(|(id, entry)| (entry.last_offset, *id))
            .collect();
        let count = (PRODUCERS_PER_PARTITION_MAX / 10).clamp(1, by_recency.len());
        by_recency.select_nth_unstable(count - 1);
        for (_, id) in &by_recency[..count] {
            self.producers.remove(id);
        }
    }

    /// Remembers an appended batch (at submit time: the next batch of the
    /// producer is checked against it even before it is durable; a write
    /// that fails is forgotten by [`ProducerStates::purge_from`]).
    pub fn record(&mut self, stamp: &Stamp, base_offset: u64, now_ms: i64) {
        if !self.producers.contains_key(&stamp.producer_id)
            && self.producers.len() >= PRODUCERS_PER_PARTITION_MAX
        {
            self.evict_least_recent();
        }
        self.changed = true;
        let entry = self.producers.entry(stamp.producer_id).or_default();
        if stamp.epoch != entry.epoch {
            entry.epoch = stamp.epoch;
            entry.batches.clear();
        }
        entry.batches.push_back(BatchMeta {
            first_sequence: stamp.first_sequence,
            last_sequence: stamp.last_sequence,
            base_offset,
        });
        while entry.batches.len() > PRODUCER_BATCHES_KEPT {
            entry.batches.pop_front();
        }
        entry.next_sequence = add_sequence(stamp.last_sequence, 1);
        entry.last_offset = base_offset;
        entry.last_seen_ms = now_ms;
        self.high_offset = self.high_offset.max(base_offset + 1);
    }

    /// Whether the table changed since the last call (a snapshot is then due).
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// Producers known.
    pub fn len(&self) -> usize {
        self.producers.len()
    }

    /// True when no producer is known.
    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    /// Rebuilds the table of `log`: the snapshot in its directory if there
    /// is a usable one, then every batch after it.
    pub fn recover(log: &Log) -> ProducerStates {
        let mut states = ProducerStates::default();
        let mut from = log.start_offset();
        // A snapshot past the end describes batches a crash took back.
        if let Some(snapshot) = Snapshot::load(log.dir())
            && snapshot.offset <= log.end_offset()
        {
            states.producers = snapshot.producers.into_iter().collect();
            states.high_offset = states
                .producers
                .values()
                .flat_map(|entry| entry.batches.iter())
                .map(|batch| batch.base_offset + 1)
                .max()
                .unwrap_or(0);
            from = from.max(snapshot.offset);
            // A snapshot of an earlier version may hold more than the bound.
            while states.producers.len() > PRODUCERS_PER_PARTITION_MAX {
                states.evict_least_recent();
            }
        }
        states.replay(log, from);
        states
    }

    /// Applies the headers of every batch from `from` to the end.
    fn replay(&mut self, log: &Log, mut from: u64) {
        let end = log.end_offset();
        while from < end {
            let Ok(read) = log.read(from, 4 << 20) else {
                // Retention raced the replay; what is gone has no duplicates.
                from = log.start_offset().max(from + 1);
                continue;
            };
            if read.is_empty() {
                break;
            }
            for chunk in read.chunks() {
                for batch in Batches::new(chunk, false).flatten() {
                    if batch.next_offset() <= from {
                        continue;
                    }
                    if let Ok(Some(stamp)) = Stamp::of(&batch) {
                        self.record(&stamp, batch.base_offset(), batch.max_timestamp());
                    }
                }
            }
            from = from.max(read.next_offset());
        }
    }

    /// The table as of `offset` (every batch below it is in the table),
    /// to be written with [`Snapshot::save`] outside the caller's lock.
    pub fn snapshot(&self, offset: u64) -> Snapshot {
        // Batches at or past `offset` are still in flight: one of them may
        // yet fail, and a snapshot must not remember a batch the log lacks.
        Snapshot {
            offset,
            producers: self
                .producers
                .iter()
                .map(|(id, entry)| {
                    let mut entry = entry.clone();
                    if let Some(first_in_flight) = entry
                        .batches
                        .iter()
                        .find(|batch| batch.base_offset >= offset)
                    {
                        entry.next_sequence = first_in_flight.first_sequence;
                    }
                    entry.batches.retain(|batch| batch.base_offset < offset);
                    (*id, entry)
                })
                .collect(),
        }
    }
}

/// A producer table as of an offset, as written to `producer-state.bin`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot {
    offset: u64,
    producers: BTreeMap<i64, ProducerEntry>,
}

impl Snapshot {
    /// The offset it describes the table at.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Writes it into `dir` atomically (and removes a legacy JSON one).
    ///
    /// # Errors
    /// Storage errors writing the file.
    pub fn save(&self, dir: &Path) -> Result<(), weir_storage::StorageError> {
        weir_storage::checkpoint::write_atomic(dir, SNAPSHOT_FILE, &self.encode())?;
        let legacy = dir.join(LEGACY_SNAPSHOT_FILE);
        if legacy.exists() {
            let _ = std::fs::remove_file(legacy);
        }
        Ok(())
    }

    /// The binary form: magic, offset, count, the producers in id order,
    /// and a CRC-32C of everything before it.
    ///
    /// ```text
    /// "WEIRPST1" offset:u64 count:u32
    /// count × (id:i64 epoch:i16 next_sequence:i32 last_offset:u64
    ///          last_seen_ms:i64 batches:u8
    ///          batches × (first_sequence:i32 last_sequence:i32 base_offset:u64))
    /// crc32c:u32                                          (all big-endian)
    /// ```
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + self.producers.len() * 47);
        out.extend_from_slice(SNAPSHOT_MAGIC);
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&(self.producers.len() as u32).to_be_bytes());
        for (id, entry) in &self.producers {
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(&entry.epoch.to_be_bytes());
            out.extend_from_slice(&entry.next_sequence.to_be_bytes());
            out.extend_from_slice(&entry.last_offset.to_be_bytes());
            out.extend_from_slice(&entry.last_seen_ms.to_be_bytes());
            // At most PRODUCER_BATCHES_KEPT (5): `record` keeps no more.
            out.push(entry.batches.len().min(PRODUCER_BATCHES_KEPT) as u8);
            for batch in entry.batches.iter().take(PRODUCER_BATCHES_KEPT) {
                out.extend_from_slice(&batch.first_sequence.to_be_bytes());
                out.extend_from_slice(&batch.last_sequence.to_be_bytes());
                out.extend_from_slice(&batch.base_offset.to_be_bytes());
            }
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    /// Reads the binary form; `None` if it is damaged in any way.
    fn decode(bytes: &[u8]) -> Option<Snapshot> {
        let (body, crc) = bytes.split_last_chunk::<4>()?;
        if crc32c::crc32c(body) != u32::from_be_bytes(*crc) {
            return None;
        }
        let mut reader = SnapshotReader { rest: body };
        if reader.take::<8>()? != *SNAPSHOT_MAGIC {
            return None;
        }
        let offset = u64::from_be_bytes(reader.take()?);
        let count = u32::from_be_bytes(reader.take()?) as usize;
        let mut producers = BTreeMap::new();
        for _ in 0..count {
            let id = i64::from_be_bytes(reader.take()?);
            let epoch = i16::from_be_bytes(reader.take()?);
            let next_sequence = i32::from_be_bytes(reader.take()?);
            let last_offset = u64::from_be_bytes(reader.take()?);
            let last_seen_ms = i64::from_be_bytes(reader.take()?);
            let [batch_count] = reader.take::<1>()?;
            if usize::from(batch_count) > PRODUCER_BATCHES_KEPT {
                return None;
            }
            let mut batches = VecDeque::with_capacity(usize::from(batch_count));
            for _ in 0..batch_count {
                batches.push_back(BatchMeta {
                    first_sequence: i32::from_be_bytes(reader.take()?),
                    last_sequence: i32::from_be_bytes(reader.take()?),
                    base_offset: u64::from_be_bytes(reader.take()?),
                });
            }
            producers.insert(
                id,
                ProducerEntry {
                    epoch,
                    batches,
                    next_sequence,
                    last_offset,
                    last_seen_ms,
                },
            );
        }
        reader
            .rest
            .is_empty()
            .then_some(Snapshot { offset, producers })
    }

    fn load(dir: &Path) -> Option<Snapshot> {
        match std::fs::read(dir.join(SNAPSHOT_FILE)) {
            Ok(bytes) => {
                let snapshot = Snapshot::decode(&bytes);
                if snapshot.is_none() {
                    tracing::warn!(dir = %dir.display(), "damaged producer snapshot; replaying the log");
                }
                return snapshot;
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(dir = %dir.display(), %error, "unreadable producer snapshot; replaying the log");
                return None;
            }
        }
        let text = std::fs::read(dir.join(LEGACY_SNAPSHOT_FILE)).ok()?;
        match serde_json::from_slice(&text) {
            Ok(snapshot) => Some(snapshot),
            Err(error) => {
                tracing::warn!(dir = %dir.display(), %error, "unreadable producer snapshot; replaying the log");
                None
            }
        }
    }
}

/// Big-endian fields from a byte slice, `None` once it runs out.
struct SnapshotReader<'a> {
    rest: &'a [u8],
}

impl SnapshotReader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (field, rest) = self.rest.split_first_chunk::<N>()?;
        self.rest = rest;
        Some(*field)
    }
}

/// Producer ids of a broker: the next fresh id and the named producers.
#[derive(Debug)]
pub struct ProducerIds {
    dir: PathBuf,
    state: Mutex<IdsFile>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct IdsFile {
    next_id: i64,
    /// End (exclusive) of the block of ids the controller allocated to
    /// this broker; `next_id` at or past it needs a new block.
    #[serde(default)]
    block_end: i64,
    /// Name → (id, epoch, last InitProducerId in ms).
    named: BTreeMap<String, (i64, i16, i64)>,
}

/// A named producer unused this long is forgotten (Kafka keeps a
/// transactional id 7 days).
pub const NAMED_PRODUCER_EXPIRATION_MS: i64 = 7 * 24 * 3600 * 1000;

impl ProducerIds {
    /// Loads `producer-ids.json` from the data directory (or starts empty).
    ///
    /// # Errors
    /// An unreadable file (a corrupt one must not hand out ids twice).
    pub fn open(dir: &Path) -> Result<ProducerIds, String> {
        let state = match std::fs::read(dir.join(IDS_FILE)) {
            Ok(text) => serde_json::from_slice(&text)
                .map_err(|error| format!("{}: {error}", dir.join(IDS_FILE).display()))?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => IdsFile::default(),
            Err(error) => return Err(format!("{}: {error}", dir.join(IDS_FILE).display())),
        };
        Ok(ProducerIds {
            dir: dir.to_path_buf(),
            state: Mutex::new(state),
        })
    }

    /// Whether the next fresh id needs a new block from the controller,
    /// and the lowest id such a block may start at.
    pub fn needs_block(&self) -> Option<i64> {
        let state = self
            .state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        (state.next_id >= state.block_end).then_some(state.next_id)
    }

    /// Takes the block `[first, end)` the controller allocated, unless a
    /// concurrent request already brought one.
    pub fn grant_block(&self, first: i64, end: i64) {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if state.next_id >= state.block_end && first >= state.next_id {
            state.next_id = first;
            state.block_end = end;
        }
    }

    /// A fresh id (epoch 0), or for a name the same id with the next epoch
    /// (which fences the previous holder). Durable before it returns.
    ///
    /// # Errors
    /// `StorageError` if the file cannot be written; `InvalidRequest` when
    /// the broker already remembers [`NAMED_PRODUCERS_MAX`] names;
    /// `NotController` (retriable) when a fresh id is needed and the block
    /// is used up.
    pub fn init(&self, name: Option<&str>) -> Result<(i64, i16), ErrorCode> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_millis() as i64);
        state.named.retain(|_, (_, _, used_ms)| {
            used_ms.saturating_add(NAMED_PRODUCER_EXPIRATION_MS) >= now_ms
        });
        let fresh_needed = name.is_none_or(|name| {
            state
                .named
                .get(name)
                .is_none_or(|(_, epoch, _)| *epoch == i16::MAX)
        });
        if fresh_needed && state.next_id >= state.block_end {
            return Err(ErrorCode::NotController);
        }
        let given = match name {
            None => {
                let id = state.next_id;
                state.next_id += 1;
                (id, 0)
            }
            Some(name) => match state.named.get(name).copied() {
                Some((id, epoch, _)) if epoch < i16::MAX => (id, epoch + 1),
                Some(_) | None => {
                    if !state.named.contains_key(name) && state.named.len() >= NAMED_PRODUCERS_MAX {
                        return Err(ErrorCode::InvalidRequest);
                    }
                    // A new name, or one whose epochs ran out: a new id.
                    let id = state.next_id;
                    state.next_id += 1;
                    (id, 0)
                }
            },
        };
        if let Some(name) = name {
            state
                .named
                .insert(name.to_string(), (given.0, given.1, now_ms));
        }
        let text = serde_json::to_vec(&*state).map_err(|_| ErrorCode::Unknown)?;
        weir_storage::checkpoint::write_atomic(&self.dir, IDS_FILE, &text)
            .map_err(|_| ErrorCode::StorageError)?;
        Ok(given)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(first: i32, last: i32, epoch: i16) -> Stamp {
        Stamp {
            producer_id: 7,
            epoch,
            first_sequence: first,
            last_sequence: last,
        }
    }

    /// Duplicates within the last five batches are recognised with their
    /// offsets; gaps, old epochs and unknown producers are refused; a
    /// forgotten (failed) batch can be appended again.
    #[test]
    fn sequences_dedupe_and_refuse_gaps() {
        let mut states = ProducerStates::default();
        assert_eq!(
            states.check(&stamp(3, 4, 0)),
            Err(ErrorCode::UnknownProducerId)
        );
        for batch in 0..7 {
            let s = stamp(batch * 10, batch * 10 + 9, 0);
            assert_eq!(states.check(&s), Ok(Check::Append));
            states.record(&s, batch as u64 * 100, 0);
        }
        assert_eq!(states.check(&stamp(60, 69, 0)), Ok(Check::Duplicate(600)));
        assert_eq!(states.check(&stamp(20, 29, 0)), Ok(Check::Duplicate(200)));
        assert_eq!(
            states.check(&stamp(10, 19, 0)),
            Err(ErrorCode::OutOfOrderSequence),
            "older than the last five: not a known duplicate"
        );
        assert_eq!(
            states.check(&stamp(71, 80, 0)),
            Err(ErrorCode::OutOfOrderSequence)
        );
        assert_eq!(states.check(&stamp(70, 79, 0)), Ok(Check::Append));
        states.record(&stamp(70, 79, 0), 700, 0);
        states.record(&stamp(80, 89, 0), 800, 0);
        states.purge_from(700);
        assert_eq!(
            states.check(&stamp(80, 89, 0)),
            Err(ErrorCode::OutOfOrderSequence),
            "after a failed write the producer continues from the first lost batch"
        );
        assert_eq!(
            states.check(&stamp(70, 79, 0)),
            Ok(Check::Append),
            "a failed batch (and those after it) can be sent again"
        );
        assert_eq!(
            states.check(&stamp(0, 5, 1)),
            Ok(Check::Append),
            "a new epoch starts at 0"
        );
        states.record(&stamp(0, 5, 1), 900, 0);
        assert_eq!(
            states.check(&stamp(70, 79, 0)),
            Err(ErrorCode::ProducerFenced)
        );
        assert_eq!(
            states.check(&stamp(6, 6, 2)),
            Err(ErrorCode::OutOfOrderSequence)
        );
    }

    /// Sequences wrap from i32::MAX to 0, as Kafka's do; a snapshot keeps
    /// an epoch without batches and leaves out batches still in flight.
    #[test]
    fn sequences_wrap() {
        let mut states = ProducerStates::default();
        let last = stamp(i32::MAX - 4, i32::MAX, 0);
        states.producers.insert(
            7,
            ProducerEntry {
                next_sequence: i32::MAX - 4,
                ..ProducerEntry::default()
            },
        );
        assert_eq!(states.check(&last), Ok(Check::Append));
        states.record(&last, 0, 0);
        assert_eq!(states.check(&stamp(0, 9, 0)), Ok(Check::Append));
        assert_eq!(add_sequence(i32::MAX, 1), 0);
        states.record(&stamp(0, 9, 0), 50, 0);
        let snapshot = states.snapshot(10);
        let entry = &snapshot.producers[&7];
        assert_eq!(entry.batches.len(), 1, "the batch at 50 is in flight");
        assert_eq!(entry.next_sequence, 0, "its sequence is still to come");
        states.expire(1_000, 999);
        assert!(states.is_empty(), "idle producers expire");
        assert_eq!(add_sequence(i32::MAX - 1, 3), 1);
    }

    /// However many producers come and go, a partition tracks at most
    /// PRODUCERS_PER_PARTITION_MAX, forgetting the least recent first, and
    /// its snapshot stays under the stated bound; short-lived producers of
    /// one batch each cost 47 bytes apiece.
    #[test]
    fn the_table_and_its_snapshot_are_bounded() {
        let mut states = ProducerStates::default();
        let producers = PRODUCERS_PER_PARTITION_MAX as i64 * 2 + 7;
        for id in 0..producers {
            let stamp = Stamp {
                producer_id: id,
                epoch: 0,
                first_sequence: 0,
                last_sequence: 0,
            };
            assert_eq!(states.check(&stamp), Ok(Check::Append));
            states.record(&stamp, id as u64, 0);
            assert!(states.len() <= PRODUCERS_PER_PARTITION_MAX);
        }
        assert!(
            states.producers.contains_key(&(producers - 1)),
            "the latest is kept"
        );
        assert!(!states.producers.contains_key(&0), "the oldest went first");
        let snapshot = states.snapshot(producers as u64);
        let bytes = snapshot.encode();
        assert_eq!(bytes.len(), 24 + states.len() * 47);
        assert!(bytes.len() <= 24 + PRODUCERS_PER_PARTITION_MAX * SNAPSHOT_ENTRY_BYTES_MAX);
    }

    /// The binary snapshot reads back exactly; a damaged one is refused
    /// (the log is replayed instead); a JSON one of earlier versions loads.
    #[test]
    fn snapshots_round_trip_and_refuse_damage() {
        let mut states = ProducerStates::default();
        for batch in 0..7 {
            states.record(
                &stamp(batch * 10, batch * 10 + 9, 2),
                batch as u64 * 100,
                55,
            );
        }
        let snapshot = states.snapshot(1_000);
        let dir = tempfile::tempdir().expect("tempdir");
        snapshot.save(dir.path()).expect("save");
        let loaded = Snapshot::load(dir.path()).expect("load");
        assert_eq!(loaded.offset, 1_000);
        let entry = &loaded.producers[&7];
        assert_eq!(entry.epoch, 2);
        assert_eq!(entry.next_sequence, 70);
        assert_eq!(entry.last_offset, 600);
        assert_eq!(entry.last_seen_ms, 55);
        assert_eq!(
            entry.batches, snapshot.producers[&7].batches,
            "the last five batches"
        );

        let mut bytes = snapshot.encode();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 1;
        assert!(Snapshot::decode(&bytes).is_none(), "a flipped bit");
        let whole = snapshot.encode();
        assert!(
            Snapshot::decode(&whole[..whole.len() - 1]).is_none(),
            "cut short"
        );

        let legacy = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            legacy.path().join(LEGACY_SNAPSHOT_FILE),
            serde_json::to_vec(&snapshot).expect("json"),
        )
        .expect("write");
        let loaded = Snapshot::load(legacy.path()).expect("legacy load");
        assert_eq!(loaded.producers[&7].next_sequence, 70);
        loaded.save(legacy.path()).expect("save");
        assert!(
            !legacy.path().join(LEGACY_SNAPSHOT_FILE).exists(),
            "replaced by the binary one"
        );
    }
}
