//! `weir-chaos failover` against real brokers, as a test: back-to-back
//! kill -9s of the partition leader (each killed broker restarted, so the
//! next kill hits a leader elected moments before while the previous one
//! catches up) under an idempotent `acks=all` producer lose and duplicate
//! nothing, and every kill is followed by acknowledged writes again.

use std::process::Command;

/// Three leader kills: nothing acknowledged is lost, nothing is written
/// twice (the producer's retries across each kill are recognised by the
/// new leader), no send fails, and the report is well formed.
#[test]
fn back_to_back_leader_kills_lose_and_duplicate_nothing() {
    let broker = weir_testkit::workspace_binary("weir-broker");
    let output = Command::new(env!("CARGO_BIN_EXE_weir-chaos"))
        .args(["failover", "--brokers", "3", "--kills", "3", "--json"])
        .arg("--broker-bin")
        .arg(&broker)
        .output()
        .expect("run weir-chaos");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "weir-chaos failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = stdout
        .lines()
        .find_map(|line| serde_json::from_str(line).ok())
        .expect("one JSON report");
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["duplicated"], 0, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert!(
        report["acked"].as_u64().is_some_and(|acked| acked > 0),
        "{report}"
    );
    let failovers = report["failover_ms"].as_array().expect("failover_ms");
    assert_eq!(failovers.len(), 3, "{report}");
}
