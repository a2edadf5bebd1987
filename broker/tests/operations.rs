//! Procedures of docs/OPERATIONS.md, run as written: a data directory
//! copied from a stopped broker is a backup that a new broker serves from,
//! every record in place, and takes writes after.

mod common;

use common::{BrokerProcess, Connect, batch};
use weir_protocol::ErrorCode;

/// Copies `from` into `to` recursively (files, directories).
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("create backup directory");
    for entry in std::fs::read_dir(from).expect("read directory") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}

/// Backup and restore: stop the broker (SIGTERM), copy its data directory,
/// start a broker on the copy: it serves exactly what was acknowledged
/// and appends after it.
#[test]
fn a_copied_data_directory_restores_every_record() {
    let original = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(original.path(), &[]);
    let mut client = broker.client();
    client.create_topic("kept", 2);
    for partition in 0..2 {
        for round in 0..5 {
            let response = client.produce(
                "kept",
                partition,
                batch(&format!("p{partition}r{round}"), 20, 0),
                1,
            );
            assert_eq!(response.error, ErrorCode::None);
        }
    }
    let before: Vec<Vec<(u64, Vec<u8>)>> = (0..2)
        .map(|partition| client.consume_all("kept", partition, 0))
        .collect();
    drop(client);
    assert!(broker.terminate().success(), "a clean stop");

    let backup = tempfile::tempdir().expect("tempdir");
    copy_dir(original.path(), backup.path());
    drop(original);

    let restored = BrokerProcess::start(backup.path(), &[]);
    let mut client = restored.client();
    for (partition, records) in before.iter().enumerate() {
        assert_eq!(records.len(), 100);
        assert_eq!(
            &client.consume_all("kept", partition as u32, 0),
            records,
            "partition {partition} restored"
        );
    }
    let response = client.produce("kept", 0, batch("after", 1, 0), 1);
    assert_eq!(response.error, ErrorCode::None);
    assert_eq!(
        response.base_offset, 100,
        "appends continue after the restored end"
    );
}
