#!/usr/bin/env bash
# Whitelist replication through one Redis, three ringmx nodes on this machine (loopback only).
#
#   loadtest/replication-bench.sh     (RATE=1000 RCPTS=1 SECS=30 RUNS=3 N=200000 PHASES=123)
#
# 1. Lag: node A takes outbound mail at RATE msg/s for SECS, a new local sender per message
#    and RCPTS recipients, so RATE x RCPTS new records/s; nodes B and C report the delay from a
#    change reaching A's replication thread to its application on disk there (every stream
#    entry of the run: p50, p99, max).
# 2. Record rate: A takes outbound mail flat out, 20 recipients per message (20 new records
#    per message), for SECS; then until A's outbox is empty and B and C have applied it all:
#    records/s through one Redis end to end.
# 3. Inbound: node B's inbound throughput (1 KiB, pipelined, 50 connections, a stranger per
#    message, as aswl-compare.sh) with replication off and on, each while A takes RATE msg/s
#    outbound (so B applies RATE records/s while it is measured); a fresh B per run, off and on
#    alternating; median of RUNS each.
# 4. Bulk, without SMTP in the way (PHASES=4, not in the default run): node A imports RECORDS
#    records offline, then starts with replication and publishes them all (a node joining a
#    group publishes what it has); B, started with it, applies them from the stream; C, started
#    after, bootstraps them from the sets. Rates, and Redis memory per record.
# Every node has its own data directory; routes discard (the disk is not what is measured).
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${RATE:-1000}
SECS=${SECS:-30}
RUNS=${RUNS:-3}
N=${N:-200000}
PHASES=${PHASES:-123}
RECORDS=${RECORDS:-1000000}
RCPTS=${RCPTS:-1}
work=$(mktemp -d /tmp/ringmx-repl-bench.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

cargo build --release -q --bin ringmx -p ringmx -p ringmx-loadtest
base=$((20000 + RANDOM % 20000))
redis_port=$base
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly yes \
    --appendfsync everysec --dir "$work" >"$work/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done

# node NAME INDEX PREFIX REPLICATION(on|off) → starts it; ports base+10*INDEX+{1,2,3}
node() {
    local name=$1 i=$2 prefix=$3 repl=$4
    local dir="$work/$prefix-$name-$repl"
    [ "$repl" = keep ] && dir="$work/$prefix-$name-off" # its configuration as it is now
    mkdir -p "$dir"
    local p=$((base + 10 * i))
    [ "$repl" = keep ] || cat >"$dir/ringmx.toml" <<EOF
[server]
data_dir = "$dir"
cores = 2
[[binding]]
name = "in"
listen = "127.0.0.1:$((p + 1))"
direction = "inbound"
[[binding]]
name = "out"
listen = "127.0.0.1:$((p + 2))"
direction = "outbound"
allowed_clients = ["127.0.0.0/8"]
[domains]
local = ["example.test"]
[admin]
listen = "127.0.0.1:$((p + 3))"
[[route]]
domains = ["*"]
action = "discard"
[authentication]
verify = false
[aswl]
mode = "per-domain"
snapshot_interval = "1h"
EOF
    if [ "$repl" = on ]; then
        printf '[aswl.replication]\nurls = ["redis://127.0.0.1:%s"]\nprefix = "%s:"\nnode_id = "%s"\n' \
            "$redis_port" "$prefix" "$name" >>"$dir/ringmx.toml"
    fi
    target/release/ringmx run --config "$dir/ringmx.toml" 2>"$dir/ringmx.log" &
    pids+=($!)
    eval "pid_$name=$!"
    for _ in $(seq 1 300); do
        curl -sf "http://127.0.0.1:$((p + 3))/healthz" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "node $name did not start:" >&2
    tail -5 "$dir/ringmx.log" >&2
    exit 1
}
stop() { local v="pid_$1"; kill "${!v}"; wait "${!v}" 2>/dev/null || true; }
port() { echo $((base + 10 * $1 + $2)); } # INDEX KIND(1 in, 2 out, 3 admin)
metric() { curl -s "http://127.0.0.1:$(port "$1" 3)/metrics" | awk -v m="$2" '$1 == m { print $2 }'; }
delays() { curl -s "http://127.0.0.1:$(port "$1" 3)/aswl/stats" | grep -o 'publish to apply.*'; }
outbound() { # INDEX ARGS… (outbound mail from a new local sender per message)
    local i=$1
    shift
    target/release/ringmx-loadtest -c 20 --from 'user{k}@example.test' --senders 100000000 \
        --to-domain remote.example --json "$@" "127.0.0.1:$(port "$i" 2)"
}
outbound_bg() { # like outbound, in the background; its pid in $bg
    local i=$1
    shift
    target/release/ringmx-loadtest -c 20 --from 'user{k}@example.test' --senders 100000000 \
        --to-domain remote.example --json "$@" "127.0.0.1:$(port "$i" 2)" >/dev/null &
    bg=$!
}
wait_applied() { # INDEX COUNT → seconds until applied_total ≥ COUNT (fails after 5 min)
    local start
    start=$(date +%s.%N)
    for _ in $(seq 1 6000); do
        if [ "$(metric "$1" ringmx_aswl_replication_applied_total)" -ge "$2" ]; then
            python3 -c "import time; print(f'{time.time() - $start:.2f}')"
            return 0
        fi
        sleep 0.05
    done
    echo "node $1 did not apply $2 records" >&2
    exit 1
}

if [[ $PHASES == *1* ]]; then
echo "== 1. lag at $((RATE * RCPTS)) new records/s for $SECS s (3 nodes, one Redis)"
node a 1 lag on; node b 2 lag on; node c 3 lag on
outbound 1 --rate "$RATE" -r "$RCPTS" -d "$SECS" >"$work/lag.json"
sent=$(metric 1 ringmx_aswl_replication_published_total)
wait_applied 2 "$sent" >/dev/null; wait_applied 3 "$sent" >/dev/null
echo "  A published $sent records ($(python3 -c "import json; print(round(json.load(open('$work/lag.json'))['msgs_per_sec']))") msg/s)"
echo "  B: $(delays 2)"
echo "  C: $(delays 3)"
stop a; stop b; stop c
fi

if [[ $PHASES == *2* ]]; then
echo "== 2. records/s through one Redis: A outbound flat out, 20 recipients per message, $SECS s"
node a 1 rate on; node b 2 rate on; node c 3 rate on
t0=$(date +%s.%N)
outbound 1 -r 20 -d "$SECS" >"$work/rate.json"
t1=$(date +%s.%N)
collected=$(($(metric 1 'ringmx_aswl_collected_total{result="added"}') + $(metric 1 'ringmx_aswl_collected_total{result="refreshed"}')))
backlog=$(($(metric 1 ringmx_aswl_replication_outbox_records) + $(metric 1 ringmx_aswl_replication_queued_changes)))
for _ in $(seq 1 6000); do
    [ "$(metric 1 ringmx_aswl_replication_published_total)" -ge "$collected" ] && break
    sleep 0.05
done
wait_applied 2 "$collected" >/dev/null; wait_applied 3 "$collected" >/dev/null
t2=$(date +%s.%N)
python3 - "$t0" "$t1" "$t2" "$collected" "$backlog" <<'EOF'
import sys
t0, t1, t2, n, backlog = (float(x) for x in sys.argv[1:6])
print(f"  A collected {n:.0f} records in {t1 - t0:.1f} s ({n / (t1 - t0):.0f}/s)")
print(f"  all of them published by A and applied by B and C {t2 - t0:.1f} s after the start: {n / (t2 - t0):.0f} records/s")
EOF
echo "  B: $(delays 2)"
stop a; stop b; stop c
fi

if [[ $PHASES == *4* ]]; then
echo "== 4. bulk: $RECORDS records published by one node, applied from the stream, bootstrapped"
python3 - "$RECORDS" >"$work/records.csv" <<'EOF'
import sys
n = int(sys.argv[1])
out = sys.stdout
for i in range(n):
    out.write(f"user{i % 20000}@example.test,ext{i}@remote{i % 1000}.example\n")
EOF
node a 1 bulk off
stop a
target/release/ringmx aswl import "$work/records.csv" --offline --config "$work/bulk-a-off/ringmx.toml" >/dev/null
printf '[aswl.replication]\nurls = ["redis://127.0.0.1:%s"]\nprefix = "bulk:"\nnode_id = "a"\n' \
    "$redis_port" >>"$work/bulk-a-off/ringmx.toml"
used0=$(redis-cli -p "$redis_port" info memory | awk -F: '/^used_memory:/ { print $2 }' | tr -d '\r')
node b 2 bulk on
t0=$(date +%s.%N)
node a 1 bulk keep # (its configuration now has replication)
secs=$(wait_applied 2 "$RECORDS")
python3 -c "print(f'  B applied {$RECORDS} records from the stream {$secs:.1f} s after A started: {$RECORDS / $secs:.0f} records/s')"
grep -o 'republished records=[0-9]* since=[0-9]* ms=[0-9]*' "$work/bulk-a-off/ringmx.log" | tail -1 |
    awk -F'[= ]' '{ printf "  A published %s records in %.1f s: %.0f records/s\n", $3, $7 / 1000, $3 / ($7 / 1000) }'
used1=$(redis-cli -p "$redis_port" info memory | awk -F: '/^used_memory:/ { print $2 }' | tr -d '\r')
echo "  Redis memory: $(((used1 - used0) / RECORDS)) bytes per record (sets, tombstones, $(redis-cli -p "$redis_port" xlen 'bulk:{stream}') stream entries)"
node c 3 bulk on
for _ in $(seq 1 1200); do grep -q 'bootstrapped from Redis' "$work/bulk-c-on/ringmx.log" && break; sleep 0.1; done
grep -o 'bootstrapped from Redis records=[0-9]* from=[0-9-]* ms=[0-9]*' "$work/bulk-c-on/ringmx.log" |
    awk -F'[= ]' '{ printf "  C bootstrapped %s records in %.1f s: %.0f records/s\n", $5, $9 / 1000, $5 / ($9 / 1000) }'
stop a; stop b; stop c
fi

[[ $PHASES == *3* ]] || exit 0
echo "== 3. node B inbound msg/s, replication off vs on, while A takes $RATE msg/s outbound"
node a 1 inbound on
measure_b() { # REPL → msg/s of one run on a fresh node B
    node b 2 inbound "$1"
    local bg
    outbound_bg 1 --rate "$RATE" -d 60
    sleep 1
    timeout 300 target/release/ringmx-loadtest -c 50 -n "$N" \
        --from 'sender{k}@stranger{k}.example' --senders 1000000 \
        --to-domain example.test --json "127.0.0.1:$(port 2 1)" |
        python3 -c 'import json,sys; print(round(json.load(sys.stdin)["msgs_per_sec"]))'
    [ "$1" = on ] && echo "  (B applied $(metric 2 ringmx_aswl_replication_applied_total) records while measured)" >&2
    kill "$bg" 2>/dev/null || true
    wait "$bg" 2>/dev/null || true
    stop b
}
# Alternating (off, on, off, on, …) so drift on a shared machine hits both alike.
offs=()
ons=()
for _ in $(seq 1 "$RUNS"); do
    offs+=("$(measure_b off)")
    ons+=("$(measure_b on)")
done
median() { printf '%s\n' "$@" | sort -n | sed -n "$((($# + 1) / 2))p"; }
off=$(median "${offs[@]}")
on=$(median "${ons[@]}")
echo "  replication off: $off msg/s (runs: ${offs[*]})"
echo "  replication on:  $on msg/s (runs: ${ons[*]}; $(python3 -c "print(f'{$on/$off*100:.1f}')") % of off)"
