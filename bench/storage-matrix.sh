#!/usr/bin/env bash
# Runs `weir-bench storage` over the configurations recorded in
# docs/BENCHMARKS.md and prints one Markdown table row per run.
# Usage: bench/storage-matrix.sh [SECONDS]   (default 5 s per phase)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-5}"
cargo build --release -p weir-bench >&2
runs=(
    ""
    "--engine sync"
    "--write-mode buffered"
    "--write-mode buffered --engine sync"
    "--writers 16"
    "--batch-bytes 65536"
    "--batch-bytes 1048576"
    "--flush interval"
    "--flush never"
    "--logs 8"
    "--logs 8 --engine sync"
)
echo "| extra flags | engine | writes | flush | logs × writers | batch | raw sync MB/s | raw direct MB/s | raw direct+sync MB/s | Weir MB/s | × raw direct | × raw sync | append p50 / p99 µs | read MB/s (cache / first pass) |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
for flags in "${runs[@]}"; do
    # shellcheck disable=SC2086
    ./target/release/weir-bench storage --seconds "$seconds" $flags --json | python3 bench/storage_row.py "$flags"
done
