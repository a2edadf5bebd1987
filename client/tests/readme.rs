//! Runs every command of the README's Quickstart against a real broker, so
//! the README cannot rot.

use std::path::PathBuf;
use std::process::Command;

use weir_testkit::BrokerProcess;

fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("target dir")
        .to_path_buf()
}

fn quickstart_lines() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README");
    let start = readme.find("<!-- quickstart").expect("quickstart marker");
    let end = readme
        .find("<!-- /quickstart -->")
        .expect("quickstart end marker");
    readme[start..end]
        .lines()
        .filter(|line| line.starts_with("weir ") || line.contains("| weir "))
        .map(str::to_string)
        .collect()
}

/// Every Quickstart command succeeds, and together they show the produced
/// records, in key order, with replay from an offset; a missing topic exits 4.
#[test]
fn readme_quickstart_runs() {
    let target = target_dir();
    assert!(
        target.join("weir").exists() && target.join("weir-broker").exists(),
        "build the workspace first"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let addr = broker.addr.to_string();
    let path = format!(
        "{}:{}",
        target.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let lines = quickstart_lines();
    assert!(
        lines.len() >= 6,
        "the quickstart has its commands: {lines:?}"
    );
    let mut outputs = Vec::new();
    for line in &lines {
        let output = Command::new("bash")
            .args(["-c", line])
            .env("PATH", &path)
            .env("WEIR_BROKER", &addr)
            .output()
            .expect("run command");
        assert!(
            output.status.success(),
            "{line}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        outputs.push(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let missing = Command::new(target.join("weir"))
        .args(["--broker", &addr, "consume", "no-such-topic"])
        .output()
        .expect("run weir");
    assert_eq!(
        missing.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
    broker.kill();
    // A group member read the three records and committed on close: the
    // group has no members left and nothing to catch up.
    let described = &outputs[8];
    assert!(
        described.contains("group billing state Empty"),
        "{described}"
    );
    assert_eq!(
        described
            .lines()
            .filter(|line| line.starts_with("orders\t"))
            .map(|line| line.rsplit('\t').next().unwrap_or_default().to_string())
            .collect::<Vec<_>>(),
        vec!["0", "0", "0"],
        "no lag on any of the three partitions: {described}"
    );
    // consume --from earliest: all three values; alice's two in order.
    let all = &outputs[2];
    for value in ["first order", "second order", "third order"] {
        assert!(all.contains(value), "consume printed {value}: {all}");
    }
    let first = all.find("first order").expect("first");
    let third = all.find("third order").expect("third");
    assert!(first < third, "records of one key keep their order");
    // --format json --count 1: exactly one JSON object.
    let json: Vec<&str> = outputs[3].lines().collect();
    assert_eq!(json.len(), 1);
    assert!(
        json[0].starts_with('{') && json[0].contains("\"offset\""),
        "{}",
        json[0]
    );
    // describe lists three partitions.
    assert_eq!(
        outputs[5]
            .lines()
            .filter(|line| line.chars().next().is_some_and(|c| c.is_ascii_digit()))
            .count(),
        3
    );
}

/// The CLI exits with 3 and says so when the broker is unreachable.
#[test]
fn cli_exit_codes() {
    let target = target_dir();
    let unreachable = Command::new(target.join("weir"))
        .args(["--broker", "127.0.0.1:1", "topic", "list"])
        .output()
        .expect("run weir");
    assert_eq!(
        unreachable.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&unreachable.stderr)
    );
    assert!(
        String::from_utf8_lossy(&unreachable.stderr).contains("connection"),
        "a clear message"
    );
}
