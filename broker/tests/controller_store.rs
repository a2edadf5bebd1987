//! The controller's Raft log and state machine pass openraft's own storage
//! test suite (vote and log durability rules, truncation, purge, snapshot
//! install), and the log survives a reopen with a torn tail cut.

use openraft::storage::RaftLogStorage;
use openraft::testing::{StoreBuilder, Suite};
use openraft::{RaftLogReader, StorageError};
use weir_broker::cluster::controller::TypeConfig;
use weir_broker::cluster::controller::log_store::LogStore;
use weir_broker::cluster::controller::state_machine::StateMachine;
use weir_broker::cluster::metadata::MetadataImage;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir()
            .map_err(|error| StorageError::from(openraft::StorageIOError::write_logs(&error)))?;
        let log = LogStore::open(dir.path())?;
        let state_machine = StateMachine::open(dir.path(), MetadataImage::new(false))?;
        Ok((dir, log, state_machine))
    }
}

#[test]
fn controller_storage_passes_openraft_suite() -> Result<(), Box<dyn std::error::Error>> {
    Suite::test_all(Builder).map_err(Box::from)
}

/// Appended entries come back after a reopen, and bytes of a record cut
/// short by a crash are dropped rather than read.
#[test]
fn controller_log_reopens_and_cuts_a_torn_tail() -> Result<(), Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let dir = tempfile::tempdir()?;
        {
            let mut log = LogStore::open(dir.path())?;
            let entries: Vec<_> = (0..5u64)
                .map(|index| openraft::Entry::<TypeConfig> {
                    log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
                    payload: openraft::EntryPayload::Blank,
                })
                .collect();
            log.append_durably(entries)?;
        }
        // A torn write: half a record header.
        let path = dir.path().join("raft-log");
        let mut bytes = std::fs::read(&path)?;
        let full = bytes.len();
        bytes.extend_from_slice(&[0, 0, 0]);
        std::fs::write(&path, &bytes)?;
        let mut log = LogStore::open(dir.path())?;
        let state = log.get_log_state().await?;
        assert_eq!(state.last_log_id.map(|id| id.index), Some(4));
        let read = log.try_get_log_entries(0..10).await?;
        assert_eq!(read.len(), 5);
        assert_eq!(std::fs::metadata(&path)?.len() as usize, full);
        Ok(())
    })
}
