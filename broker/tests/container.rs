//! The container image of `deploy/Dockerfile`, built and run on this
//! machine without a registry: Debian's `debootstrap` makes a minimal
//! bookworm root, `podman import` turns it into the runtime stage's base,
//! and the build stage is replaced by the binaries this workspace built
//! (`--build-context build=...`; the registry's Rust image is out of
//! reach). Under the project's seccomp profile (`deploy/seccomp-weir.json`)
//! the broker in the container runs the io_uring engine and `unshare` is
//! refused; it runs as uid 10001, answers
//! `/readyz` (and the image's health check passes), takes a record and
//! serves it back, keeps its data on
//! `/var/lib/weir`, and exits 0 on SIGTERM (`podman stop`).
//!
//! Podman runs with `runc`, the `vfs` storage driver, cgroupfs and explicit
//! ulimits: this sandbox's hybrid cgroups make `crun` refuse to start, and
//! it may not raise rlimits. `scripts/test` installs podman, runc and
//! debootstrap.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{http, try_http};
use weir_testkit::{DEADLINE, free_port, workspace_binary};

const BASE_IMAGE: &str = "localhost/weir-test-base:bookworm";
const IMAGE: &str = "localhost/weir:test";

fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .args(["--storage-driver", "vfs", "--runtime", "runc"])
        .args(args)
        .output()
        .expect("run podman (scripts/test installs it)")
}

/// What `podman build` and `podman run` need in this sandbox: cgroupfs
/// (no systemd), ulimits within the machine's hard limits, the host's
/// network (servers on loopback, as the tests' others).
const SANDBOX_ARGS: [&str; 8] = [
    "--cgroup-manager",
    "cgroupfs",
    "--ulimit",
    "nofile=4096:4096",
    "--ulimit",
    "nproc=1000:1000",
    "--network",
    "host",
];

/// `podman SUBCOMMAND [SANDBOX_ARGS] REST...`: `args` starts with the subcommand.
fn podman_with(args: &[&str]) -> Output {
    let (subcommand, rest) = args.split_first().expect("a subcommand");
    let mut all = vec![*subcommand];
    all.extend(SANDBOX_ARGS);
    all.extend(rest);
    podman(&all)
}

fn succeeded(output: &Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The runtime stage's base: a debootstrapped bookworm, imported once and
/// kept in podman's storage for later runs.
fn ensure_base_image() {
    if podman(&["image", "exists", BASE_IMAGE]).status.success() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let rootfs = root.path().join("rootfs");
    let debootstrap = Command::new("debootstrap")
        .args(["--variant=minbase", "bookworm"])
        .arg(&rootfs)
        .arg("http://deb.debian.org/debian")
        .output()
        .expect("run debootstrap (scripts/test installs it)");
    succeeded(&debootstrap, "debootstrap");
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .args(["-cf", "-", "."])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("tar");
    let import = Command::new("podman")
        .args([
            "--storage-driver",
            "vfs",
            "--runtime",
            "runc",
            "import",
            "-",
        ])
        .arg(BASE_IMAGE)
        .stdin(tar.stdout.take().expect("tar's output"))
        .output()
        .expect("podman import");
    assert!(
        tar.wait().expect("wait for tar").success(),
        "tar of the root"
    );
    succeeded(&import, "podman import");
}

/// `path` in the repository.
fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// Removes the test container (and the image) however the test ends.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = podman(&["rm", "--force", "--volumes", &self.0]);
        let _ = podman(&["rmi", "--force", IMAGE]);
    }
}

/// The image builds from deploy/Dockerfile and runs a working broker.
#[test]
fn the_image_builds_and_runs_a_broker() {
    ensure_base_image();
    // The build stage's output: this workspace's binaries.
    let context = tempfile::tempdir().expect("tempdir");
    let bin = context.path().join("usr/local/bin");
    std::fs::create_dir_all(&bin).expect("bin directory");
    for name in ["weir-broker", "weir"] {
        std::fs::copy(workspace_binary(name), bin.join(name)).expect("copy binary");
    }
    let build = podman_with(&[
        "build",
        // Docker's image format keeps the HEALTHCHECK (OCI's has none).
        "--format",
        "docker",
        "-f",
        &repo("deploy/Dockerfile").display().to_string(),
        "--build-arg",
        "RUST_IMAGE=localhost/weir-unused:none",
        "--build-arg",
        &format!("RUNTIME_IMAGE={BASE_IMAGE}"),
        "--build-context",
        &format!("build={}", context.path().display()),
        "-t",
        IMAGE,
        &repo("").display().to_string(),
    ]);
    succeeded(&build, "podman build");

    let name = format!("weir-test-{}", std::process::id());
    let _cleanup = Cleanup(name.clone());
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let run = podman_with(&[
        "run",
        "--detach",
        "--name",
        &name,
        // The project's profile: the runtime default's restrictions, with
        // io_uring allowed.
        "--security-opt",
        &format!("seccomp={}", repo("deploy/seccomp-weir.json").display()),
        // Loopback only, as every server the tests start.
        "--env",
        &format!("WEIR_LISTEN={listen}"),
        "--env",
        &format!("WEIR_ADMIN_LISTEN={admin}"),
        IMAGE,
    ]);
    succeeded(&run, "podman run");
    let deadline = Instant::now() + DEADLINE;
    while try_http(admin, "GET", "/readyz", None).map(|(status, _)| status) != Some(200) {
        assert!(Instant::now() < deadline, "the broker never became ready");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The image's own health check agrees (it reads the admin port from
    // WEIR_ADMIN_LISTEN).
    succeeded(
        &podman(&["healthcheck", "run", &name]),
        "the image's health check",
    );
    // Under the profile the io_uring engine runs, and what the profile
    // does not allow (new namespaces here) is refused.
    let (_, cluster) = http(admin, "GET", "/v1/cluster", None);
    assert!(
        cluster.contains("\"io_engine\":\"uring\""),
        "io_uring allowed: {cluster}"
    );
    assert!(
        !podman(&["exec", &name, "unshare", "--user", "true"])
            .status
            .success(),
        "the profile refuses unshare"
    );
    let id = succeeded(&podman(&["exec", &name, "id", "-u"]), "podman exec id");
    assert_eq!(id.trim(), "10001", "runs as the weir user");

    let cli = |args: &[&str], input: Option<&str>| {
        use std::io::Write;
        let mut child = Command::new(workspace_binary("weir"))
            .arg("--broker")
            .arg(listen.to_string())
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("weir");
        let mut stdin = child.stdin.take().expect("stdin");
        if let Some(input) = input {
            stdin.write_all(input.as_bytes()).expect("write");
        }
        drop(stdin);
        succeeded(&child.wait_with_output().expect("wait"), "weir")
    };
    cli(&["topic", "create", "boxed", "--partitions", "1"], None);
    cli(&["produce", "boxed"], Some("inside a container\n"));
    assert_eq!(
        cli(&["consume", "boxed"], None).trim(),
        "inside a container"
    );
    let listing = succeeded(
        &podman(&["exec", &name, "ls", "/var/lib/weir"]),
        "list the data volume",
    );
    assert!(listing.contains("boxed-0"), "data on the volume: {listing}");

    succeeded(&podman(&["stop", "--time", "30", &name]), "podman stop");
    let exit = succeeded(
        &podman(&["inspect", &name, "--format", "{{.State.ExitCode}}"]),
        "podman inspect",
    );
    assert_eq!(exit.trim(), "0", "SIGTERM stops the broker cleanly");
}
