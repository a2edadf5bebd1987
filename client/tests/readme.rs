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

/// The lines of the README's three-broker section this test runs: the
/// cluster script and the `weir` commands (the build and the `export` are
/// the test's own).
fn cluster_lines() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README");
    let start = readme
        .find("<!-- cluster-quickstart")
        .expect("cluster quickstart marker");
    let end = readme
        .find("<!-- /cluster-quickstart -->")
        .expect("cluster quickstart end marker");
    readme[start..end]
        .lines()
        .map(|line| line.split(" && ").last().unwrap_or_default().to_string())
        .filter(|line| {
            line.starts_with("weir ")
                || line.contains("| weir ")
                || line.starts_with("deploy/local/cluster.sh")
        })
        .collect()
}

/// The README's three-broker section runs as written: the script starts
/// three real brokers, a topic is created with three replicas, records are
/// produced through the broker list, `describe` shows each partition's
/// leader and its three in-sync replicas, and the script stops them all.
#[test]
fn readme_three_brokers_run() {
    let target = target_dir();
    assert!(
        target.join("weir").exists() && target.join("weir-broker").exists(),
        "build the workspace first"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let ports: Vec<u16> = (0..3).map(|_| weir_testkit::free_port()).collect();
    let admin_ports: Vec<u16> = (0..3).map(|_| weir_testkit::free_port()).collect();
    let join = |ports: &[u16]| {
        ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    };
    let bootstrap = ports
        .iter()
        .map(|port| format!("127.0.0.1:{port}"))
        .collect::<Vec<_>>()
        .join(",");
    let path = format!(
        "{}:{}",
        target.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let lines = cluster_lines();
    assert_eq!(
        lines.first().map(String::as_str),
        Some("deploy/local/cluster.sh start")
    );
    assert_eq!(
        lines.last().map(String::as_str),
        Some("deploy/local/cluster.sh stop")
    );
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let run = |line: &str| {
        Command::new("bash")
            .args(["-c", line])
            .current_dir(repo)
            .env("PATH", &path)
            .env("WEIR_BROKER", &bootstrap)
            .env("WEIR_BROKER_BIN", target.join("weir-broker"))
            .env("WEIR_CLUSTER_DIR", dir.path())
            .env("WEIR_CLUSTER_PORTS", join(&ports))
            .env("WEIR_CLUSTER_ADMIN_PORTS", join(&admin_ports))
            .output()
            .expect("run command")
    };
    let mut outputs = Vec::new();
    for line in &lines {
        let output = run(line);
        if !output.status.success() {
            // Leave no broker behind before failing.
            run("deploy/local/cluster.sh stop");
        }
        assert!(
            output.status.success(),
            "{line}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        // `produce` reports on stderr (stdout stays for data).
        outputs.push(format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let described = outputs
        .iter()
        .find(|output| output.contains("in_sync"))
        .expect("describe output");
    let rows: Vec<&str> = described
        .lines()
        .filter(|line| line.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .collect();
    assert_eq!(rows.len(), 3, "{described}");
    for row in rows {
        let columns: Vec<&str> = row.split('\t').collect();
        assert!(
            columns[1]
                .parse::<u32>()
                .is_ok_and(|leader| (1..=3).contains(&leader))
        );
        assert_eq!(columns[3].split(',').count(), 3, "three in sync: {row}");
    }
    let produced: u64 = outputs
        .iter()
        .find_map(|output| {
            output
                .lines()
                .find_map(|line| line.strip_prefix("produced "))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|count| count.parse().ok())
        })
        .expect("produce output");
    assert_eq!(produced, 100);
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
