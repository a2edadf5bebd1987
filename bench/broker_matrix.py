#!/usr/bin/env python3
"""Runs the broker workloads recorded in docs/BENCHMARKS.md and prints them
as a Markdown table, with the raw-hardware baseline measured in the same run
(before and after the workloads, since this machine's disk swings).

Usage: bench/broker_matrix.py [SECONDS]   (default 5 s of load per row)
Needs a release build: cargo build --release -p weir-bench -p weir-broker
"""
import json
import subprocess
import sys

SECONDS = sys.argv[1] if len(sys.argv) > 1 else "5"
BENCH = "./target/release/weir-bench"


def run(*args):
    out = subprocess.run(
        [BENCH, *args, "--json"], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def workload(kind, flags):
    return run(kind, "--spawn-broker", "--seconds", SECONDS, *flags.split())


def fmt(value, digits=0):
    return "–" if value is None else f"{value:.{digits}f}"


before = run("baseline", "--seconds", "3")
rows = []
produce_rows = [
    "",
    "--no-idempotence --in-flight 1",
    "--batch-bytes 1048576",
    "--producers 4 --partitions 4 --batch-bytes 1048576",
]
for flags in produce_rows:
    rows.append(("produce", flags, workload("produce", flags)))
consume_rows = [
    "--passes 2 --batch-bytes 1048576",
    "--passes 2 --batch-bytes 1048576 --consumer-api record",
    "--passes 2 --batch-bytes 1048576 --producers 4 --partitions 4 --consumers 4",
]
for flags in consume_rows:
    rows.append(("consume", flags, workload("consume", flags)))
# Latency at half of the default row's maximum, records sent as they come
# (no linger): the ack-latency goal.
half = int(rows[0][2]["records_s"] / 2)
for kind, flags in [
    ("produce", f"--rate {half} --linger-ms 0"),
    ("produce", f"--rate {half} --linger-ms 0 --in-flight 1"),
    ("e2e", f"--rate {half} --linger-ms 0"),
    # The path's own latency, unloaded: one record per request.
    ("produce", "--rate 1000 --linger-ms 0"),
]:
    rows.append((kind, flags, workload(kind, flags)))
after = run("baseline", "--seconds", "3")

disk = (before["disk_mb_s"] + after["disk_mb_s"]) / 2
disk_read = (before["disk_read_mb_s"] + after["disk_read_mb_s"]) / 2
loopback = (before["loopback_mb_s"] + after["loopback_mb_s"]) / 2
fsync_p99 = max(before["fsync_p99_ms"], after["fsync_p99_ms"])
print(
    f"Baseline before / after: disk (O_DIRECT) {before['disk_mb_s']:.0f} / "
    f"{after['disk_mb_s']:.0f} MB/s, disk + fdatasync per MiB "
    f"{before['disk_sync_mb_s']:.0f} / {after['disk_sync_mb_s']:.0f} MB/s, "
    f"fdatasync p99 {before['fsync_p99_ms']:.3f} / {after['fsync_p99_ms']:.3f} ms, "
    f"4 KiB append + fdatasync p50 {before['small_append_sync_p50_ms']:.3f} / "
    f"{after['small_append_sync_p50_ms']:.3f} ms, p99 "
    f"{before['small_append_sync_p99_ms']:.3f} / {after['small_append_sync_p99_ms']:.3f} ms, "
    f"loopback TCP {before['loopback_mb_s']:.0f} / {after['loopback_mb_s']:.0f} MB/s, "
    f"device read (O_DIRECT, 4 in flight) {before['disk_read_mb_s']:.0f} / "
    f"{after['disk_read_mb_s']:.0f} MB/s. "
    f"Ratios use the means: min(disk, loopback) = {min(disk, loopback):.0f} MB/s, "
    f"loopback = {loopback:.0f} MB/s, 2 × fdatasync p99 = {2 * fsync_p99:.3f} ms."
)
print()
print(
    "| workload | flags | produce MB/s | × min(disk, loopback) | consume MB/s "
    "(device pass / cache pass) | cache pass × loopback | ack p50 / p99 / p99.9 ms "
    "| broker p50 / p99 / p99.9 ms | e2e p50 / p99 ms |"
)
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for kind, flags, r in rows:
    passes = r.get("consume_passes_mb_s") or []
    consume = " / ".join(f"{p:.0f}" for p in passes) if passes else "–"
    cache_ratio = fmt(passes[-1] / loopback, 2) if len(passes) > 1 else "–"
    broker = (
        f"{fmt(r['broker_produce_p50_ms'], 2)} / {fmt(r['broker_produce_p99_ms'], 2)} / "
        f"{fmt(r['broker_produce_p999_ms'], 2)}"
    )
    e2e = (
        f"{fmt(r['e2e_p50_ms'], 2)} / {fmt(r['e2e_p99_ms'], 2)}"
        if r.get("e2e_p50_ms") is not None
        else "–"
    )
    print(
        f"| {kind} | `{flags or '(defaults)'}` | **{r['mb_s']:.0f}** | "
        f"{r['mb_s'] / min(disk, loopback):.2f} | {consume} | {cache_ratio} | "
        f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} / {r['p999_ms']:.2f} | {broker} | {e2e} |"
    )

# The issue-14 goals, as ratios of this run.
print()
print("| goal | measured | ratio | goal met |")
print("| --- | --- | --- | --- |")
for kind, flags, r in rows:
    passes = r.get("consume_passes_mb_s") or []
    if kind == "consume" and passes:
        ratio = passes[0] / disk_read
        print(
            f"| device pass ≥ 0.7 × disk read (`{flags}`) | {passes[0]:.0f} / "
            f"{disk_read:.0f} MB/s | {ratio:.2f} | {'yes' if ratio >= 0.7 else 'no'} |"
        )
for kind, flags, r in rows:
    if kind == "produce" and flags == f"--rate {half} --linger-ms 0":
        ratio = r["p99_ms"] / r["broker_produce_p99_ms"]
        print(
            f"| client p99 ≤ 2 × broker p99 at half load (`{flags}`) | "
            f"{r['p99_ms']:.2f} / {r['broker_produce_p99_ms']:.2f} ms | {ratio:.2f} | "
            f"{'yes' if ratio <= 2 else 'no'} |"
        )
