//! The `weir` command line at a broker's connection limit: a clear message
//! and its own exit code (7), after retrying with backoff.

use std::process::Command;

use weir_testkit::{BrokerProcess, workspace_binary};

/// With the broker's only connection slot held, `weir topic list` retries,
/// then says the broker refused it for too many connections and exits 7;
/// once the slot is free, the same command works.
#[test]
fn the_cli_reports_the_connection_limit_with_its_own_exit_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &["--connections-max", "1"]);
    let addr = broker.addr.to_string();
    let hog = std::net::TcpStream::connect(broker.addr).expect("hold the only slot");
    let output = Command::new(workspace_binary("weir"))
        .args(["--broker", &addr, "topic", "list"])
        .output()
        .expect("run weir");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(7), "stderr: {stderr}");
    assert!(
        stderr.contains("too many connections"),
        "says what happened: {stderr}"
    );
    drop(hog);
    let deadline = std::time::Instant::now() + weir_testkit::DEADLINE;
    loop {
        let output = Command::new(workspace_binary("weir"))
            .args(["--broker", &addr, "topic", "list"])
            .output()
            .expect("run weir");
        if output.status.success() {
            break;
        }
        // The broker may not have seen the hog's close yet.
        assert_eq!(output.status.code(), Some(7));
        assert!(std::time::Instant::now() < deadline, "the slot came back");
    }
}
