//! Support shared by the integration tests of several crates and by
//! `weir-bench --spawn-broker`: a real `weir-broker` process on free loopback
//! ports, killed when dropped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long a test waits for a broker to start or answer before failing.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A binary of the workspace, next to the running test's own directory
/// (`target/<profile>/`), which a workspace build fills.
///
/// # Panics
/// If it is missing, with the command that builds it.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let binary = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join(name))
        .expect("target directory");
    assert!(
        binary.exists(),
        "{} missing: build the workspace (cargo build --workspace)",
        binary.display()
    );
    binary
}

/// A broker process; killed on drop.
#[derive(Debug)]
pub struct BrokerProcess {
    /// The process.
    pub child: Child,
    /// Client address.
    pub addr: SocketAddr,
    /// Admin HTTP address.
    pub admin_addr: SocketAddr,
    /// Its data directory.
    pub data_dir: PathBuf,
}

impl BrokerProcess {
    /// Starts `binary` on free loopback ports with `data_dir` and `extra`
    /// flags, and waits for its "listening on" line.
    ///
    /// # Panics
    /// If the broker does not start within [`DEADLINE`].
    pub fn start_binary(binary: &Path, data_dir: &Path, extra: &[&str]) -> BrokerProcess {
        Self::spawn(binary, "127.0.0.1:0", data_dir, extra)
    }

    /// Starts the workspace's `weir-broker` listening on `listen` (a restart
    /// on the address an earlier process had, for clients that reconnect).
    ///
    /// # Panics
    /// As [`BrokerProcess::start_binary`].
    pub fn start_at(listen: SocketAddr, data_dir: &Path, extra: &[&str]) -> BrokerProcess {
        Self::spawn(
            &workspace_binary("weir-broker"),
            &listen.to_string(),
            data_dir,
            extra,
        )
    }

    fn spawn(binary: &Path, listen: &str, data_dir: &Path, extra: &[&str]) -> BrokerProcess {
        let mut child = Command::new(binary)
            .args([
                "--listen",
                listen,
                "--admin-listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(data_dir)
            .args(extra)
            // WEIR_BROKER_LOG overrides, to watch a test's brokers.
            .env(
                "RUST_LOG",
                std::env::var("WEIR_BROKER_LOG").unwrap_or_else(|_| "warn,openraft=off".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn weir-broker");
        let stdout = child.stdout.take().expect("stdout");
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = sender.send(line);
            }
            for _ in lines {}
        });
        let line = receiver
            .recv_timeout(DEADLINE)
            .expect("broker printed its address");
        let addr = line
            .split_whitespace()
            .nth(3)
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line: {line}"));
        let admin_addr = line
            .rsplit("http://")
            .next()
            .map(|rest| rest.trim_end_matches(')'))
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("no admin address in: {line}"));
        BrokerProcess {
            child,
            addr,
            admin_addr,
            data_dir: data_dir.to_path_buf(),
        }
    }

    /// Starts `binary` listening on `listen`.
    ///
    /// # Panics
    /// As [`BrokerProcess::start_binary`].
    pub fn start_binary_at(
        binary: &Path,
        listen: SocketAddr,
        data_dir: &Path,
        extra: &[&str],
    ) -> BrokerProcess {
        Self::spawn(binary, &listen.to_string(), data_dir, extra)
    }

    /// Starts the workspace's `weir-broker`.
    pub fn start(data_dir: &Path, extra: &[&str]) -> BrokerProcess {
        Self::start_binary(&workspace_binary("weir-broker"), data_dir, extra)
    }

    /// SIGKILL, and wait for it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for the exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: plain syscall on our child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        self.child.wait().expect("wait for broker")
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port for a server started a moment later (bound,
/// checked and released).
///
/// Chosen below the kernel's ephemeral range (`ip_local_port_range`): a
/// port from that range, once released, can be handed to any outgoing
/// connection or `:0` bind on the machine before the server binds it (seen
/// as "Address already in use" when many tests run at once). Ports handed
/// out by this process are not handed out again.
///
/// # Panics
/// If no port can be bound.
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const LOWEST: u16 = 10_000;
    if ephemeral_low > LOWEST + 1_000 {
        let span = u64::from(ephemeral_low - LOWEST);
        let mut seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos() as u64)
            ^ (u64::from(std::process::id()) << 32);
        let mut handed_out = HANDED_OUT
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        for _ in 0..1_000 {
            // xorshift: enough to spread concurrent test processes apart.
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let port = LOWEST + (seed % span) as u16;
            if handed_out.contains(&port) {
                continue;
            }
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                handed_out.push(port);
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("bind a free port")
}

/// Brokers `1..=n` on fixed loopback ports, all controller voters, each
/// with its own data directory under one root; any may be killed and
/// restarted on its address.
#[derive(Debug)]
pub struct Cluster {
    /// Running brokers by index (broker id - 1); `None` while stopped.
    pub brokers: Vec<Option<BrokerProcess>>,
    /// Client addresses by index.
    pub addrs: Vec<SocketAddr>,
    root: PathBuf,
    voters: String,
    extra: Vec<String>,
    binary: PathBuf,
}

impl Cluster {
    /// Starts `count` brokers under `root` with `extra` flags each.
    ///
    /// # Panics
    /// If a broker does not start within [`DEADLINE`].
    pub fn start(count: usize, root: &Path, extra: &[&str]) -> Cluster {
        Self::start_binary(&workspace_binary("weir-broker"), count, root, extra)
    }

    /// [`Cluster::start`] with the broker binary at `binary`.
    ///
    /// # Panics
    /// As [`Cluster::start`].
    pub fn start_binary(binary: &Path, count: usize, root: &Path, extra: &[&str]) -> Cluster {
        let addrs: Vec<SocketAddr> = (0..count)
            .map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())))
            .collect();
        let voters = addrs
            .iter()
            .enumerate()
            .map(|(index, addr)| format!("{}@{addr}", index + 1))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Cluster {
            brokers: (0..count).map(|_| None).collect(),
            addrs,
            root: root.to_path_buf(),
            voters,
            extra: extra.iter().map(|flag| (*flag).to_string()).collect(),
            binary: binary.to_path_buf(),
        };
        // Started together: each waits for a quorum before it is writable,
        // not before it prints its address.
        for index in 0..count {
            cluster.restart(index);
        }
        cluster
    }

    /// The data directory of broker `index`.
    pub fn data_dir(&self, index: usize) -> PathBuf {
        self.root.join(format!("broker-{}", index + 1))
    }

    /// Starts broker `index` again (on its address, with its data).
    ///
    /// # Panics
    /// If it does not start within [`DEADLINE`].
    pub fn restart(&mut self, index: usize) {
        let id = (index + 1).to_string();
        let mut flags: Vec<&str> = vec!["--broker-id", &id, "--controller-voters", &self.voters];
        flags.extend(self.extra.iter().map(String::as_str));
        let process = BrokerProcess::start_binary_at(
            &self.binary,
            self.addrs[index],
            &self.data_dir(index),
            &flags,
        );
        self.brokers[index] = Some(process);
    }

    /// Starts one more broker (id = the new count) on a free port with the
    /// cluster's voter list, which does not name it: it joins as a
    /// non-voter. Returns its index.
    ///
    /// # Panics
    /// If it does not start within [`DEADLINE`].
    pub fn add_broker(&mut self) -> usize {
        let index = self.addrs.len();
        self.addrs
            .push(SocketAddr::from(([127, 0, 0, 1], free_port())));
        self.brokers.push(None);
        self.restart(index);
        index
    }

    /// SIGTERM broker `index` (a controlled shutdown) and wait for it;
    /// `None` if it was not running.
    pub fn terminate(&mut self, index: usize) -> Option<std::process::ExitStatus> {
        self.brokers[index].take().map(BrokerProcess::terminate)
    }

    /// SIGKILL broker `index`.
    pub fn kill(&mut self, index: usize) {
        if let Some(process) = self.brokers[index].take() {
            process.kill();
        }
    }

    /// The addresses of running brokers, comma-separated (a bootstrap list).
    pub fn bootstrap(&self) -> String {
        self.addrs
            .iter()
            .enumerate()
            .filter(|(index, _)| self.brokers[*index].is_some())
            .map(|(_, addr)| addr.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A TCP proxy between clients and a broker that swallows some responses:
/// every `drop_every`-th response frame of API `api_key` never reaches the
/// client (the request did reach the broker), which makes the client time
/// out and retry. Frames are read by their u32 length prefix and header
/// (kind u8, api key u16). Runs on threads until the process ends.
#[derive(Debug)]
pub struct DroppingProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Responses swallowed so far.
    pub dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl DroppingProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    ///
    /// # Panics
    /// If no loopback port can be bound (a broken test machine).
    pub fn start(upstream: SocketAddr, api_key: u16, drop_every: u64) -> DroppingProxy {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let dropped = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(AtomicU64::new(0));
        let counter = dropped.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(broker) = std::net::TcpStream::connect(upstream) else {
                    continue;
                };
                let (Ok(mut client_read), Ok(mut broker_write)) =
                    (client.try_clone(), broker.try_clone())
                else {
                    continue;
                };
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut client_read, &mut broker_write);
                    let _ = broker_write.shutdown(std::net::Shutdown::Write);
                });
                let (mut broker_read, mut client_write) = (broker, client);
                let (seen, counter) = (seen.clone(), counter.clone());
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    loop {
                        let mut prefix = [0u8; 4];
                        if broker_read.read_exact(&mut prefix).is_err() {
                            break;
                        }
                        let length = u32::from_be_bytes(prefix) as usize;
                        let mut frame = vec![0u8; length];
                        if broker_read.read_exact(&mut frame).is_err() {
                            break;
                        }
                        let is_target = length >= 3
                            && frame[0] == 1
                            && u16::from_be_bytes([frame[1], frame[2]]) == api_key;
                        if is_target
                            && (seen.fetch_add(1, Ordering::Relaxed) + 1) % drop_every.max(1) == 0
                        {
                            counter.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        if client_write.write_all(&prefix).is_err()
                            || client_write.write_all(&frame).is_err()
                        {
                            break;
                        }
                    }
                    let _ = client_write.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        DroppingProxy { addr, dropped }
    }
}
