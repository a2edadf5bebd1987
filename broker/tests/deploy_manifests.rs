//! The deployment files in `deploy/` (the Dockerfile and the Kubernetes
//! manifests) against the broker's real settings: every `WEIR_*` variable
//! they set is one `weir-broker` reads, every port is the broker's client
//! or admin port, the probes name endpoints the admin listener serves, and
//! the termination grace period covers a controlled shutdown. (Nothing
//! here claims the manifests ran on a cluster: none is available here.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|error| panic!("{path}: {error}"))
}

/// The deployment files checked, with their text.
fn deployment_files() -> Vec<(String, String)> {
    let mut files = vec![
        ("deploy/Dockerfile".to_string(), read("deploy/Dockerfile")),
        (
            "deploy/compose.yaml".to_string(),
            read("deploy/compose.yaml"),
        ),
    ];
    let mut manifests: Vec<PathBuf> = std::fs::read_dir(repo("deploy/k8s"))
        .expect("deploy/k8s")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    manifests.sort();
    assert!(manifests.len() >= 4, "the manifests are there");
    for path in manifests {
        let text = std::fs::read_to_string(&path).expect("manifest");
        files.push((path.display().to_string(), text));
    }
    files
}

/// Every `WEIR_*` variable `weir-broker` declares.
fn broker_env_vars() -> BTreeSet<String> {
    read("broker/src/main.rs")
        .split("env = \"")
        .skip(1)
        .filter_map(|rest| rest.split_once('"').map(|(var, _)| var.to_string()))
        .collect()
}

/// Every `WEIR_[A-Z_]*` token in `text`.
fn weir_vars(text: &str) -> BTreeSet<String> {
    let mut vars = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("WEIR_") {
        let var: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[at + var.len()..];
        // `WEIR_*` in prose names the family, not a variable.
        if var.len() > "WEIR_".len() {
            vars.insert(var);
        }
    }
    vars
}

/// The numbers after `key` on lines that have it (`containerPort: 9092`).
fn numbers_after(text: &str, key: &str) -> Vec<u64> {
    text.lines()
        .flat_map(|line| {
            line.split(key)
                .skip(1)
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter_map(|rest| {
            let digits: String = rest
                .trim_start_matches([' ', '"'])
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .collect()
}

/// Every variable, port and probe of the deployment files is one the
/// broker has.
#[test]
fn deployment_files_use_the_brokers_real_settings_and_ports() {
    let known = broker_env_vars();
    assert!(
        known.contains("WEIR_LISTEN"),
        "the broker's variables were read"
    );
    let defaults = weir_broker::BrokerConfig::default();
    let ports: BTreeSet<u64> = [
        u64::from(defaults.listen.port()),
        u64::from(defaults.admin_listen.port()),
    ]
    .into();
    assert_eq!(ports, [9092, 9644].into());
    for (path, text) in deployment_files() {
        for var in weir_vars(&text) {
            assert!(known.contains(&var), "{path}: weir-broker reads no {var}");
        }
        for key in ["containerPort:", "port:", "EXPOSE", "prometheus.io/port:"] {
            for port in numbers_after(&text, key) {
                assert!(
                    ports.contains(&port),
                    "{path}: port {port} is not the broker's"
                );
            }
        }
        for address in ["0.0.0.0:", "127.0.0.1/"] {
            for port in numbers_after(&text, address) {
                assert!(
                    ports.contains(&port),
                    "{path}: port {port} is not the broker's"
                );
            }
        }
    }

    // Probes and the health check name endpoints the admin listener serves.
    let admin = read("broker/src/admin_http.rs");
    let statefulset = read("deploy/k8s/statefulset.yaml");
    for endpoint in ["/readyz", "/healthz"] {
        assert!(
            admin.contains(&format!("\"{endpoint}\"")),
            "{endpoint} served"
        );
        assert!(statefulset.contains(endpoint), "{endpoint} probed");
    }
    assert!(read("deploy/Dockerfile").contains("/readyz"));

    // The grace period covers a controlled shutdown and the drain after it.
    let grace_s = numbers_after(&statefulset, "terminationGracePeriodSeconds:")
        .first()
        .copied()
        .expect("a termination grace period");
    let needed_ms = defaults.controlled_shutdown_timeout_ms + defaults.shutdown_grace_ms;
    assert!(
        grace_s * 1000 > needed_ms,
        "{grace_s} s does not cover {needed_ms} ms of shutdown"
    );
    // The voters the manifests name are as many as the pods, ids from 1.
    let voters = statefulset
        .lines()
        .find_map(|line| line.trim().strip_prefix("value: \"1@"))
        .map(|rest| rest.matches('@').count() + 1)
        .expect("the voter list");
    let replicas = numbers_after(&statefulset, "replicas:")
        .first()
        .copied()
        .expect("replicas");
    // Pods beyond the voters join as non-voters.
    assert_eq!(voters, 3, "three voters");
    assert!(replicas >= voters as u64, "every voter is a pod");
}

/// The seccomp profile refuses by default, allows io_uring, and names each
/// syscall in one rule only: libseccomp keeps the first unconditional rule
/// for a syscall and ignores later ones, so a syscall listed as allowed and
/// again as refused would be allowed (clone3 must be refused: its flags,
/// behind a pointer, cannot be filtered for new namespaces).
#[test]
fn the_seccomp_profile_allows_io_uring_and_lists_each_syscall_once() {
    let profile: serde_json::Value =
        serde_json::from_str(&read("deploy/seccomp-weir.json")).expect("profile JSON");
    assert_eq!(profile["defaultAction"], "SCMP_ACT_ERRNO");
    let rules = profile["syscalls"].as_array().expect("rules");
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for rule in rules {
        let action = rule["action"].as_str().expect("action").to_string();
        let conditional = rule.get("args").is_some();
        for name in rule["names"].as_array().expect("names") {
            let name = name.as_str().expect("name").to_string();
            let entry = seen.entry(name.clone()).or_default();
            assert!(
                entry.is_empty() || conditional,
                "{name} is in more than one unconditional rule"
            );
            entry.push(action.clone());
        }
    }
    let allowed = |name: &str| {
        seen.get(name)
            .is_some_and(|actions| actions.iter().all(|action| action == "SCMP_ACT_ALLOW"))
    };
    for name in ["io_uring_setup", "io_uring_enter", "io_uring_register"] {
        assert!(allowed(name), "{name} allowed");
    }
    assert_eq!(
        seen.get("clone3").map(Vec::as_slice),
        Some(&["SCMP_ACT_ERRNO".to_string()][..]),
        "clone3 refused"
    );
    for name in ["unshare", "setns", "mount", "ptrace", "bpf", "keyctl"] {
        assert!(!seen.contains_key(name), "{name} is not allowed");
    }
}

/// The values of `key: value` lines in `text`.
fn values_of(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix(key))
        .map(|value| value.trim().trim_matches('"').to_string())
        .collect()
}

/// The compose cluster is consistent: each broker's id and address are the
/// ones the voter list names, and Prometheus scrapes exactly the brokers'
/// admin listeners.
#[test]
fn the_compose_cluster_and_its_prometheus_agree() {
    let compose = read("deploy/compose.yaml");
    let ids = values_of(&compose, "WEIR_BROKER_ID:");
    let listens = values_of(&compose, "WEIR_LISTEN:");
    let admins = values_of(&compose, "WEIR_ADMIN_LISTEN:");
    let voters = values_of(&compose, "WEIR_CONTROLLER_VOTERS:");
    assert_eq!(ids.len(), 3, "three brokers");
    assert_eq!((listens.len(), admins.len(), voters.len()), (3, 3, 3));
    for ((id, listen), voter_list) in ids.iter().zip(&listens).zip(&voters) {
        assert_eq!(voter_list, &voters[0], "the same voters everywhere");
        assert!(
            voter_list
                .split(',')
                .any(|voter| voter == format!("{id}@{listen}")),
            "broker {id} at {listen} is a voter"
        );
        assert!(listen.starts_with("127.0.0.1:"), "loopback only");
    }
    let prometheus = read("deploy/prometheus/prometheus.yml");
    let targets: BTreeSet<String> = prometheus
        .split('"')
        .filter(|part| part.starts_with("127.0.0.1:"))
        .map(str::to_string)
        .collect();
    let admin_set: BTreeSet<String> = admins.into_iter().collect();
    assert_eq!(
        targets, admin_set,
        "Prometheus scrapes every broker's admin listener"
    );
    // Grafana finds the dashboard where compose mounts it.
    let provider = read("deploy/grafana/provisioning/dashboards/weir.yml");
    let path = values_of(&provider, "path:")
        .pop()
        .expect("a dashboard path");
    assert!(
        compose.contains(&format!("./grafana/weir-dashboard.json:{path}/")),
        "the dashboard is mounted under {path}"
    );
}
