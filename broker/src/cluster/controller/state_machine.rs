//! The controller's state machine: the metadata image, applied in log order.
//!
//! The image lives in memory and is rebuilt on start from the last snapshot
//! (`raft-snapshot`, replaced atomically) plus the committed log after it.
//! Every applied batch publishes the new image on a watch channel, which is
//! how the broker on this node follows metadata.

// openraft's storage traits return its `StorageError` (over 200 bytes);
// the helpers here return the same.
#![allow(clippy::result_large_err)]

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder,
    StorageError, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{CommandResult, TypeConfig};
use crate::blocking::blocking;
use crate::cluster::metadata::{MetadataImage, MetadataOutcome};

const SNAPSHOT_FILE: &str = "raft-snapshot";

type NodeId = u64;
type Result<T> = std::result::Result<T, StorageError<NodeId>>;

/// The metadata as of one applied log position, as brokers see it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetadataView {
    /// Index of the last applied entry (0 before any).
    pub applied_index: u64,
    /// The image.
    pub image: MetadataImage,
}

/// What a snapshot file holds.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta<NodeId, BasicNode>,
    /// The state it captures, serialized (the bytes openraft ships).
    data: Vec<u8>,
}

/// The serialized state inside a snapshot, as the first format (JSON)
/// had it; still read.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotState {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
    image: MetadataImage,
}

/// Opens a snapshot file in the current format: the openraft meta as JSON,
/// then the state's bytes as they are.
const FILE_MAGIC: &[u8; 8] = b"WEIRSNP2";
/// Opens a snapshot's state in the current format: a small JSON header
/// (applied log id, membership), then the metadata image as a validated
/// `rkyv` archive.
const STATE_MAGIC: &[u8; 8] = b"WEIRIMG2";

/// The part of a snapshot's state that is openraft's.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotHeader {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
}

/// `magic`, a little-endian u32 length, that many bytes of `head`, then
/// `tail`.
fn frame(magic: &[u8; 8], head: &[u8], tail: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let len = u32::try_from(head.len()).map_err(|_| "snapshot header over 4 GiB".to_string())?;
    let mut bytes = Vec::with_capacity(12 + head.len() + tail.len());
    bytes.extend_from_slice(magic);
    bytes.extend_from_slice(&len.to_le_bytes());
    bytes.extend_from_slice(head);
    bytes.extend_from_slice(tail);
    Ok(bytes)
}

/// A framed header and what follows it, or why the bytes are not one.
type Unframed<'a> = std::result::Result<(&'a [u8], &'a [u8]), String>;

/// What a snapshot's state restores: the applied log id, the membership
/// and the image.
pub type SnapshotContent = (
    Option<LogId<NodeId>>,
    StoredMembership<NodeId, BasicNode>,
    MetadataImage,
);

/// The head and tail of bytes [`frame`] made with `magic`, or `None` if
/// they do not start with it.
fn unframe<'a>(magic: &[u8; 8], bytes: &'a [u8]) -> Option<Unframed<'a>> {
    let rest = bytes.strip_prefix(magic.as_slice())?;
    let Some((len, rest)) = rest.split_first_chunk::<4>() else {
        return Some(Err("snapshot cut short in its header".to_string()));
    };
    let len = u32::from_le_bytes(*len) as usize;
    if rest.len() < len {
        return Some(Err("snapshot cut short in its header".to_string()));
    }
    Some(Ok(rest.split_at(len)))
}

/// A snapshot's state in the current format.
///
/// # Errors
/// An image or header that cannot be encoded.
pub fn encode_state(
    last_applied: Option<LogId<NodeId>>,
    membership: &StoredMembership<NodeId, BasicNode>,
    image: &MetadataImage,
) -> std::result::Result<Vec<u8>, String> {
    let header = serde_json::to_vec(&SnapshotHeader {
        last_applied,
        membership: membership.clone(),
    })
    .map_err(|error| error.to_string())?;
    let archive =
        rkyv::to_bytes::<rkyv::rancor::Error>(image).map_err(|error| error.to_string())?;
    frame(STATE_MAGIC, &header, &archive)
}

/// A snapshot's state, in the current format (the image archive checked
/// by `rkyv`'s validation before use) or the first (JSON).
///
/// # Errors
/// Bytes that are neither, or fail validation.
pub fn decode_state(bytes: &[u8]) -> std::result::Result<SnapshotContent, String> {
    let Some(framed) = unframe(STATE_MAGIC, bytes) else {
        let state: SnapshotState =
            serde_json::from_slice(bytes).map_err(|error| error.to_string())?;
        return Ok((state.last_applied, state.membership, state.image));
    };
    let (header, archive) = framed?;
    let header: SnapshotHeader =
        serde_json::from_slice(header).map_err(|error| error.to_string())?;
    // The archive must sit at an aligned address to be validated in place.
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(archive.len());
    aligned.extend_from_slice(archive);
    let image = rkyv::from_bytes::<MetadataImage, rkyv::rancor::Error>(&aligned)
        .map_err(|error| format!("metadata image archive invalid: {error}"))?;
    Ok((header.last_applied, header.membership, image))
}

/// A snapshot file's bytes.
fn encode_file(file: &SnapshotFile) -> std::result::Result<Vec<u8>, String> {
    let meta = serde_json::to_vec(&file.meta).map_err(|error| error.to_string())?;
    frame(FILE_MAGIC, &meta, &file.data)
}

/// A snapshot file, in the current format or the first (all JSON).
fn decode_file(bytes: &[u8]) -> std::result::Result<SnapshotFile, String> {
    let Some(framed) = unframe(FILE_MAGIC, bytes) else {
        return serde_json::from_slice(bytes).map_err(|error| error.to_string());
    };
    let (meta, data) = framed?;
    Ok(SnapshotFile {
        meta: serde_json::from_slice(meta).map_err(|error| error.to_string())?,
        data: data.to_vec(),
    })
}

/// The state machine. Clones share one state.
#[derive(Debug, Clone)]
pub struct StateMachine {
    inner: Arc<Mutex<Inner>>,
    published: Arc<watch::Sender<Arc<MetadataView>>>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
    image: MetadataImage,
    /// The newest snapshot, as stored.
    snapshot: Option<Arc<SnapshotFile>>,
    /// Counts snapshots built, for unique ids.
    snapshots_built: u64,
}

fn write_error(error: impl Into<AnyError>) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(error).into()
}

fn read_error(error: impl Into<AnyError>) -> StorageError<NodeId> {
    StorageIOError::read_state_machine(error).into()
}

impl StateMachine {
    /// Opens the state machine in `dir`, loading its snapshot if any.
    /// `initial` is the image before any entry (it carries settings such as
    /// unclean leader election).
    ///
    /// # Errors
    /// A snapshot that cannot be read.
    pub fn open(dir: &Path, initial: MetadataImage) -> Result<StateMachine> {
        std::fs::create_dir_all(dir).map_err(|error| write_error(&error))?;
        let mut inner = Inner {
            dir: dir.to_path_buf(),
            last_applied: None,
            membership: StoredMembership::default(),
            image: initial,
            snapshot: None,
            snapshots_built: 0,
        };
        match std::fs::read(dir.join(SNAPSHOT_FILE)) {
            Ok(bytes) => {
                let file =
                    decode_file(&bytes).map_err(|error| read_error(AnyError::error(error)))?;
                let (last_applied, membership, image) =
                    decode_state(&file.data).map_err(|error| read_error(AnyError::error(error)))?;
                inner.last_applied = last_applied;
                inner.membership = membership;
                inner.image = image;
                inner.snapshot = Some(Arc::new(file));
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(read_error(&error)),
        }
        let view = MetadataView {
            applied_index: inner.last_applied.map_or(0, |id| id.index),
            image: inner.image.clone(),
        };
        let (published, _) = watch::channel(Arc::new(view));
        Ok(StateMachine {
            inner: Arc::new(Mutex::new(inner)),
            published: Arc::new(published),
        })
    }

    /// Follows the applied metadata.
    pub fn subscribe(&self) -> watch::Receiver<Arc<MetadataView>> {
        self.published.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn publish(&self, inner: &Inner) {
        let view = MetadataView {
            applied_index: inner.last_applied.map_or(0, |id| id.index),
            image: inner.image.clone(),
        };
        self.published.send_replace(Arc::new(view));
    }
}

impl Inner {
    fn snapshot_state_bytes(&self) -> Result<Vec<u8>> {
        encode_state(self.last_applied, &self.membership, &self.image)
            .map_err(|error| write_error(AnyError::error(error)))
    }

    fn store_snapshot(&mut self, file: SnapshotFile) -> Result<()> {
        let bytes = encode_file(&file).map_err(|error| write_error(AnyError::error(error)))?;
        weir_storage::checkpoint::write_atomic(&self.dir, SNAPSHOT_FILE, &bytes)
            .map_err(|error| write_error(&error))?;
        self.snapshot = Some(Arc::new(file));
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>> {
        let mut inner = self.lock();
        inner.snapshots_built += 1;
        let data = inner.snapshot_state_bytes()?;
        let meta = SnapshotMeta {
            last_log_id: inner.last_applied,
            last_membership: inner.membership.clone(),
            snapshot_id: format!(
                "{}-{}",
                inner.last_applied.map_or(0, |id| id.index),
                inner.snapshots_built
            ),
        };
        let file = SnapshotFile {
            meta: meta.clone(),
            data: data.clone(),
        };
        blocking(|| inner.store_snapshot(file))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>)> {
        let inner = self.lock();
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut inner = self.lock();
        let mut results = Vec::new();
        for entry in entries {
            inner.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => results.push(Ok(MetadataOutcome::Done)),
                EntryPayload::Normal(command) => results.push(inner.image.apply(&command)),
                EntryPayload::Membership(membership) => {
                    inner.membership = StoredMembership::new(Some(entry.log_id), membership);
                    results.push(Ok(MetadataOutcome::Done));
                }
            }
        }
        self.publish(&inner);
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<()> {
        let data = snapshot.into_inner();
        let (last_applied, membership, image) =
            decode_state(&data).map_err(|error| read_error(AnyError::error(error)))?;
        let mut inner = self.lock();
        let file = SnapshotFile {
            meta: meta.clone(),
            data,
        };
        blocking(|| inner.store_snapshot(file))?;
        inner.last_applied = last_applied;
        inner.membership = membership;
        inner.image = image;
        self.publish(&inner);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>> {
        let inner = self.lock();
        Ok(inner.snapshot.as_ref().map(|file| Snapshot {
            meta: file.meta.clone(),
            snapshot: Box::new(Cursor::new(file.data.clone())),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn large_image(brokers: u32, partitions: u32) -> MetadataImage {
        MetadataImage::synthetic(brokers, partitions).expect("image")
    }

    /// The current format gives back exactly the image, applied log id and
    /// membership it was made from.
    #[test]
    fn snapshot_state_round_trips_through_the_archive() {
        let image = large_image(5, 1_000);
        let applied = Some(LogId::new(openraft::CommittedLeaderId::new(3, 1), 42));
        let membership = StoredMembership::default();
        let bytes = encode_state(applied, &membership, &image).expect("encode");
        assert!(bytes.starts_with(STATE_MAGIC));
        let (last_applied, decoded_membership, decoded) = decode_state(&bytes).expect("decode");
        assert_eq!(last_applied, applied);
        assert_eq!(decoded_membership, membership);
        assert_eq!(decoded, image);
    }

    /// A snapshot written by the first format (JSON) still loads.
    #[test]
    fn json_snapshot_state_still_loads() {
        let image = large_image(3, 10);
        let legacy = serde_json::to_vec(&SnapshotState {
            last_applied: None,
            membership: StoredMembership::default(),
            image: image.clone(),
        })
        .expect("json");
        let (_, _, decoded) = decode_state(&legacy).expect("decode");
        assert_eq!(decoded, image);
    }

    /// A damaged archive is refused by validation, never used.
    #[test]
    fn damaged_archive_is_refused() {
        let image = large_image(3, 100);
        let mut bytes = encode_state(None, &StoredMembership::default(), &image).expect("encode");
        let cut = bytes.len() - 7;
        bytes.truncate(cut);
        assert!(decode_state(&bytes).is_err(), "a cut archive");
        let mut bytes = encode_state(None, &StoredMembership::default(), &image).expect("encode");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        bytes[last - 4] ^= 0xff;
        assert!(decode_state(&bytes).is_err(), "a flipped root pointer");
    }
}
