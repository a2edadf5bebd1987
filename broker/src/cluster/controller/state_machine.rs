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

/// The serialized state inside a snapshot.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotState {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
    image: MetadataImage,
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
                let file: SnapshotFile =
                    serde_json::from_slice(&bytes).map_err(|error| read_error(&error))?;
                let state: SnapshotState =
                    serde_json::from_slice(&file.data).map_err(|error| read_error(&error))?;
                inner.last_applied = state.last_applied;
                inner.membership = state.membership;
                inner.image = state.image;
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
        let state = SnapshotStateRef {
            last_applied: self.last_applied,
            membership: &self.membership,
            image: &self.image,
        };
        serde_json::to_vec(&state).map_err(|error| write_error(&error))
    }

    fn store_snapshot(&mut self, file: SnapshotFile) -> Result<()> {
        let bytes = serde_json::to_vec(&file).map_err(|error| write_error(&error))?;
        weir_storage::checkpoint::write_atomic(&self.dir, SNAPSHOT_FILE, &bytes)
            .map_err(|error| write_error(&error))?;
        self.snapshot = Some(Arc::new(file));
        Ok(())
    }
}

/// [`SnapshotState`] by reference, so building a snapshot copies nothing.
#[derive(Serialize)]
struct SnapshotStateRef<'a> {
    last_applied: Option<LogId<NodeId>>,
    membership: &'a StoredMembership<NodeId, BasicNode>,
    image: &'a MetadataImage,
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
        let state: SnapshotState =
            serde_json::from_slice(&data).map_err(|error| read_error(&error))?;
        let mut inner = self.lock();
        let file = SnapshotFile {
            meta: meta.clone(),
            data,
        };
        blocking(|| inner.store_snapshot(file))?;
        inner.last_applied = state.last_applied;
        inner.membership = state.membership;
        inner.image = state.image;
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
