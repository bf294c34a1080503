#!/usr/bin/env bash
# Inbound throughput of ringmx with a 10M-record whitelist against an empty one.
#
#   loadtest/aswl-compare.sh            (RECORDS=10000000 N=200000 RUNS=3 by default)
#
# Builds the whitelist with the scale benchmark (benches/aswl_scale.rs, KEEP_DIR), then for an
# empty and the full data directory: starts ringmx (inbound binding, [aswl] mode per-domain, a
# discard route so the disk is not what is measured), waits for the admin endpoint (the
# snapshot is loaded before it answers), runs ringmx-loadtest RUNS times with a different
# sender per message (most inbound senders are strangers: every check probes the tables),
# prints the median msg/s of each and the ratio. Loopback only; everything is stopped at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
RECORDS=${RECORDS:-10000000}
N=${N:-200000}
RUNS=${RUNS:-3}
work=$(mktemp -d /tmp/ringmx-aswl-compare.XXXXXX)
pid=""
cleanup() {
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

cargo build --release -q --bin ringmx -p ringmx -p ringmx-loadtest
KEEP_DIR="$work/full" RECORDS=$RECORDS WRITER_RATE=20000 cargo bench -q --bench aswl_scale
mkdir -p "$work/empty"

port=$((20000 + RANDOM % 20000))
admin=$((port + 1))
domains=$(printf '"dom%d.example", ' 0 1 2 3 4 5 6 7 8 9)
run_one() { # data dir → median msg/s
    local dir=$1
    cat > "$work/ringmx.toml" <<EOF
[server]
data_dir = "$dir"
cores = 2
[[binding]]
name = "in"
listen = "127.0.0.1:$port"
direction = "inbound"
[domains]
local = [${domains%, }]
[admin]
listen = "127.0.0.1:$admin"
[[route]]
domains = ["*"]
action = "discard"
[authentication]
verify = false
[aswl]
mode = "per-domain"
lifetime = "120d"
snapshot_interval = "1h"
EOF
    target/release/ringmx run --config "$work/ringmx.toml" 2>"$work/ringmx.log" &
    pid=$!
    for _ in $(seq 1 600); do
        curl -sf "http://127.0.0.1:$admin/healthz" >/dev/null 2>&1 && break
        sleep 0.1
    done
    local rates=()
    for _ in $(seq 1 "$RUNS"); do
        rates+=("$(timeout 300 target/release/ringmx-loadtest -c 50 -n "$N" \
            --from 'sender{k}@stranger{k}.example' --senders 1000000 \
            --to-domain dom1.example --json "127.0.0.1:$port" | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["msgs_per_sec"]))')")
    done
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
    printf '%s\n' "${rates[@]}" | sort -n | sed -n "$(( (RUNS + 1) / 2 ))p"
}
empty=$(run_one "$work/empty")
full=$(run_one "$work/full")
echo "inbound msg/s, 1 KiB pipelined, 50 connections, median of $RUNS:"
echo "  empty whitelist:   $empty"
echo "  $RECORDS records: $full  ($(python3 -c "print(f'{$full/$empty*100:.1f}')") % of empty)"
