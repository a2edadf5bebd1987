//! The alert rules and the Grafana dashboard in `deploy/` against a real
//! three-broker cluster scraped by a real Prometheus (Debian's package;
//! `scripts/test` installs it): `promtool check rules` passes, Prometheus
//! loads the rules, and every dashboard expression returns data while every
//! rule expression evaluates and every metric it names has data: no panel
//! or alert rests on a metric the broker does not export.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use weir_client::{Consumer, ConsumerConfig, GroupConfig, Offset};
use weir_testkit::{Cluster, DEADLINE, free_port};

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("deploy")
        .join(path)
}

fn tool(name: &str) -> PathBuf {
    let candidates = [format!("/usr/bin/{name}"), format!("/usr/local/bin/{name}")];
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
        .unwrap_or_else(|| {
            panic!("{name} is missing: scripts/test installs Debian's prometheus package")
        })
}

/// A Prometheus server, killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Scrapes `targets` every second as job `weir`, with the project's rules.
    fn start(targets: &[SocketAddr]) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let targets: Vec<String> = targets
            .iter()
            .map(|target| format!("\"{target}\""))
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: weir\n    static_configs:\n      - targets: [{}]\n",
            deploy("prometheus/weir-rules.yml").display(),
            targets.join(", ")
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write config");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        Prometheus {
            child,
            addr,
            _dir: dir,
        }
    }

    /// `GET path`: the body, if it answered 200.
    fn get(&self, path: &str) -> Option<String> {
        common::try_http(self.addr, "GET", path, None)
            .filter(|(status, _)| *status == 200)
            .map(|(_, body)| body)
    }

    /// The result vector of an instant query, or why there is none.
    fn query(&self, expr: &str) -> Result<Vec<serde_json::Value>, String> {
        let body = self
            .get(&format!("/api/v1/query?query={}", percent_encode(expr)))
            .ok_or_else(|| format!("query refused: {expr}"))?;
        let answer: serde_json::Value =
            serde_json::from_str(&body).map_err(|error| format!("{error}: {body}"))?;
        if answer["status"] != "success" {
            return Err(format!("{expr}: {body}"));
        }
        Ok(answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| {
            if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
                (byte as char).to_string()
            } else {
                format!("%{byte:02X}")
            }
        })
        .collect()
}

/// Every `expr` of the dashboard's panels.
fn dashboard_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(deploy("grafana/weir-dashboard.json")).expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|target| target["expr"].as_str().map(str::to_string))
        .collect()
}

/// Every `expr:` of the alert rules (each on one line).
fn rule_exprs() -> Vec<String> {
    std::fs::read_to_string(deploy("prometheus/weir-rules.yml"))
        .expect("rules")
        .lines()
        .filter_map(|line| line.trim().strip_prefix("expr:"))
        .map(|expr| expr.trim().to_string())
        .collect()
}

/// The `weir_*` metric names an expression reads.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("weir_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.push(name);
    }
    names
}

/// Rules and dashboard over a real cluster and a real Prometheus: every
/// expression is valid and rests on metrics with data.
#[test]
fn alert_rules_and_dashboard_read_real_metrics() {
    let promtool = Command::new(tool("promtool"))
        .arg("check")
        .arg("rules")
        .arg(deploy("prometheus/weir-rules.yml"))
        .output()
        .expect("run promtool");
    assert!(
        promtool.status.success(),
        "promtool check rules: {}",
        String::from_utf8_lossy(&promtool.stdout)
    );

    let root = tempfile::tempdir().expect("tempdir");
    let cluster = Cluster::start(3, root.path(), &["--segment-bytes", "8388608"]);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // Kept in the group (not closed) so that its offsets stay reported.
    let _consumer = runtime.block_on(async {
        common::create_replicated_topic(&cluster.addrs[0].to_string(), "observed", 2).await;
        common::produce_acknowledged(&cluster.bootstrap(), "observed", 400).await;
        // A group that has read and committed part of it: its lag is reported.
        let mut consumer = Consumer::connect(&cluster.bootstrap(), ConsumerConfig::default())
            .await
            .expect("consumer");
        consumer
            .subscribe_with(
                "watchers",
                &["observed"],
                GroupConfig {
                    auto_commit: false,
                    reset: Offset::Earliest,
                    ..GroupConfig::default()
                },
                None,
            )
            .await
            .expect("subscribe");
        for _ in 0..100 {
            tokio::time::timeout(DEADLINE, consumer.next())
                .await
                .expect("records come")
                .expect("assigned")
                .expect("record");
        }
        consumer.commit_sync().await.expect("commit");
        consumer
    });

    let admins: Vec<SocketAddr> = cluster
        .brokers
        .iter()
        .map(|broker| broker.as_ref().expect("running").admin_addr)
        .collect();
    let prometheus = Prometheus::start(&admins);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let up = prometheus
            .query("up{job=\"weir\"} == 1")
            .unwrap_or_default();
        if up.len() == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped all three"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Rates need two samples in their window: keep asking until each
    // dashboard expression has data (or report the ones that never did).
    let dashboard: Vec<String> = dashboard_exprs()
        .into_iter()
        .map(|expr| expr.replace("$__rate_interval", "30s"))
        .collect();
    assert!(
        dashboard.len() >= 15,
        "the dashboard's expressions were read"
    );
    let mut missing: Vec<String> = dashboard.clone();
    while !missing.is_empty() {
        missing.retain(|expr| match prometheus.query(expr) {
            Ok(result) => result.is_empty(),
            Err(error) => panic!("dashboard expression does not evaluate: {error}"),
        });
        assert!(
            Instant::now() < deadline,
            "dashboard expressions without data: {missing:#?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    let rules = rule_exprs();
    assert_eq!(rules.len(), 7, "every rule's expression was read");
    for expr in &rules {
        if let Err(error) = prometheus.query(expr) {
            panic!("rule expression does not evaluate: {error}");
        }
        for name in metric_names(expr) {
            let result = prometheus.query(&name).unwrap_or_default();
            assert!(!result.is_empty(), "{expr}: no data for {name}");
        }
    }
    // Prometheus itself loaded every rule.
    let loaded = prometheus.get("/api/v1/rules").expect("rules API");
    let loaded: serde_json::Value = serde_json::from_str(&loaded).expect("rules JSON");
    let rules_loaded: usize = loaded["data"]["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .map(|group| group["rules"].as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(rules_loaded, 7);
}
