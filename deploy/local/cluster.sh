#!/usr/bin/env bash
# Starts, stops or shows three Weir brokers on loopback, each a controller
# voter with its own data directory: the smallest real cluster.
#
#   deploy/local/cluster.sh start   # brokers 1-3 on 127.0.0.1:9092-9094
#   deploy/local/cluster.sh status  # each broker's /readyz
#   deploy/local/cluster.sh stop    # SIGTERM, then wait for each to exit
#
# Settings (environment):
#   WEIR_BROKER_BIN        the broker binary (default: weir-broker on PATH,
#                          else target/release/weir-broker of this checkout)
#   WEIR_CLUSTER_DIR       where data and logs go (default ./weir-cluster)
#   WEIR_CLUSTER_PORTS     three client ports (default "9092 9093 9094")
#   WEIR_CLUSTER_ADMIN_PORTS  three admin HTTP ports (default "9644 9645 9646")
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="${WEIR_CLUSTER_DIR:-./weir-cluster}"
read -r -a ports <<<"${WEIR_CLUSTER_PORTS:-9092 9093 9094}"
read -r -a admin_ports <<<"${WEIR_CLUSTER_ADMIN_PORTS:-9644 9645 9646}"
if [ "${#ports[@]}" != 3 ] || [ "${#admin_ports[@]}" != 3 ]; then
    echo "WEIR_CLUSTER_PORTS and WEIR_CLUSTER_ADMIN_PORTS take three ports each" >&2
    exit 2
fi
binary="${WEIR_BROKER_BIN:-}"
if [ -z "$binary" ]; then
    if command -v weir-broker >/dev/null 2>&1; then
        binary=weir-broker
    else
        binary="$here/../../target/release/weir-broker"
    fi
fi
voters="1@127.0.0.1:${ports[0]},2@127.0.0.1:${ports[1]},3@127.0.0.1:${ports[2]}"

ready() {
    # /readyz answers 200 once the broker is registered and unfenced.
    local port=$1
    { exec 3<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null || return 1
    printf 'GET /readyz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
    local status
    read -r _ status _ <&3 || true
    exec 3>&-
    [ "$status" = 200 ]
}

case "${1:-start}" in
start)
    if [ ! -x "$binary" ] && ! command -v "$binary" >/dev/null 2>&1; then
        echo "no broker binary at $binary: cargo build --release -p weir-broker" >&2
        exit 2
    fi
    mkdir -p "$root"
    for index in 0 1 2; do
        id=$((index + 1))
        mkdir -p "$root/broker-$id"
        "$binary" --broker-id "$id" --controller-voters "$voters" \
            --listen "127.0.0.1:${ports[$index]}" \
            --admin-listen "127.0.0.1:${admin_ports[$index]}" \
            --data-dir "$root/broker-$id" >"$root/broker-$id.log" 2>&1 &
        echo $! >"$root/broker-$id.pid"
    done
    # Ready within a minute on a loaded machine, or say which is not.
    for attempt in $(seq 1 600); do
        all=1
        for index in 0 1 2; do
            ready "${admin_ports[$index]}" || all=0
        done
        if [ "$all" = 1 ]; then
            echo "three brokers ready: 127.0.0.1:${ports[0]},127.0.0.1:${ports[1]},127.0.0.1:${ports[2]}"
            exit 0
        fi
        sleep 0.1
    done
    echo "not all brokers became ready; see $root/broker-*.log" >&2
    exit 1
    ;;
status)
    for index in 0 1 2; do
        if ready "${admin_ports[$index]}"; then state=ready; else state="not ready"; fi
        echo "broker $((index + 1)) 127.0.0.1:${ports[$index]} $state"
    done
    ;;
stop)
    for id in 1 2 3; do
        pid_file="$root/broker-$id.pid"
        [ -f "$pid_file" ] || continue
        pid=$(cat "$pid_file")
        kill -TERM "$pid" 2>/dev/null || true
        # Graceful shutdown closes every log cleanly; wait for it.
        for attempt in $(seq 1 300); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        rm -f "$pid_file"
    done
    echo "stopped"
    ;;
*)
    echo "usage: $0 start|status|stop" >&2
    exit 2
    ;;
esac
