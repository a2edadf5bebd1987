#!/usr/bin/env python3
"""Connection bursts against a fresh broker process: rounds of N connections
opened at once, held, then closed; prints the broker's anonymous memory
(RssAnon, MB) at the start, while each round is open and after it closes,
and at the end. docs/OPERATIONS.md ("Connections and memory") records runs.

    cargo build --release -p weir-broker
    python3 bench/connection_bursts.py [--binary target/release/weir-broker]
        [--rounds 12] [--connections 2000] [--end-wait-s 3]

Loopback only; the broker is killed at the end. Run an allocator variant
with e.g. LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2.
"""
import argparse
import os
import socket
import subprocess
import tempfile
import time


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_anon_mb(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("RssAnon"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default="target/release/weir-broker")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--hold-s", type=float, default=0.5)
    parser.add_argument("--end-wait-s", type=float, default=3.0)
    args = parser.parse_args()
    port, admin = free_port(), free_port()
    with tempfile.TemporaryDirectory() as data:
        broker = subprocess.Popen(
            [args.binary, "--listen", f"127.0.0.1:{port}",
             "--admin-listen", f"127.0.0.1:{admin}", "--data-dir", data],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port)).close()
                    break
                except OSError:
                    if time.time() > deadline:
                        raise
                    time.sleep(0.1)
            time.sleep(1)
            print(f"start {rss_anon_mb(broker.pid):.1f} MB")
            for round_index in range(args.rounds):
                held = [socket.create_connection(("127.0.0.1", port))
                        for _ in range(args.connections)]
                time.sleep(args.hold_s)
                open_mb = rss_anon_mb(broker.pid)
                for connection in held:
                    connection.close()
                time.sleep(args.hold_s)
                print(f"round {round_index + 1}: open {open_mb:.1f} MB, "
                      f"closed {rss_anon_mb(broker.pid):.1f} MB")
            time.sleep(args.end_wait_s)
            print(f"end {rss_anon_mb(broker.pid):.1f} MB")
        finally:
            broker.kill()
            broker.wait()


if __name__ == "__main__":
    main()
