#!/usr/bin/env bash
# A/B throughput of two ringmx builds under the same load, runs alternating so drift and noise
# hit both: the working tree against git revision BASE, on the durable rows of compare.sh
# (spool + fdatasync + hold route), driven by Postfix's smtp-source: 1 KiB with connections
# reused, 1 KiB one message per connection, 100 KiB reused. Prints the median msg/s per build.
# Scenario `idle` (not in the default set) instead holds IDLE greeted connections and reports
# the server's RSS growth per connection in bytes (lower is better).
#
#   BASE=fe695f8 loadtest/ab.sh
#   BASE=HEAD~3 RUNS=3 N=10000 SCENARIOS="reuse big" loadtest/ab.sh
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=${BASE:?set BASE to the git revision to compare with}
RUNS=${RUNS:-5}
N=${N:-20000}
SESSIONS=${SESSIONS:-50}
SCENARIOS=${SCENARIOS:-"reuse churn big"}
WORK=${WORK:-/tmp/ringmx-ab}
TIMEOUT=${TIMEOUT:-300}
IDLE=${IDLE:-5000}
ulimit -n "$(ulimit -Hn)"  # the idle scenario holds thousands of descriptors

command -v smtp-source >/dev/null || { echo "smtp-source missing: apt-get install postfix" >&2; exit 1; }
rm -rf "$WORK"; mkdir -p "$WORK"
cleanup() {
    [ -n "${SERVER:-}" ] && kill "$SERVER" 2>/dev/null || true
    git worktree remove --force "$WORK/base-src" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

git worktree add -q --detach "$WORK/base-src" "$BASE"
(cd "$WORK/base-src" && CARGO_TARGET_DIR="$WORK/base-target" cargo build --release -q -p ringmx)
cargo build --release -q -p ringmx
declare -A BIN=([base]="$WORK/base-target/release/ringmx" [new]="$PWD/target/release/ringmx")

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 150); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }

# Start one build on a fresh data directory; sets PORT and SERVER.
start() {
    local d="$WORK/run" admin
    rm -rf "$d"; mkdir -p "$d"
    PORT=$(free_port); admin=$(free_port)
    cat > "$d/ringmx.toml" <<CONF
[server]
hostname = "bench.test"
data_dir = "$d/data"
[[binding]]
name = "bench"
listen = "127.0.0.1:$PORT"
direction = "outbound"
allowed_clients = ["127.0.0.0/8"]
[limits]
max_connections = 30000
max_connections_per_ip = 30000
[admin]
listen = "127.0.0.1:$admin"
[[route]]
domains = ["*"]
action = "hold"
CONF
    "${BIN[$1]}" run -c "$d/ringmx.toml" 2> "$d/log" &
    SERVER=$!
    wait_port "$PORT"
}

# Hold N greeted connections; print the server's RSS growth per connection (bytes).
idle_rss() {
    python3 - "$1" "$2" "$3" <<'PY'
import resource, socket, sys, time
port, pid, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
def rss():
    for line in open("/proc/%s/status" % pid):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
time.sleep(0.5)
before = rss()
socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
for s in socks:
    s.settimeout(10)
    assert s.recv(512).startswith(b"220")
time.sleep(0.5)
print("%.0f" % ((rss() - before) / n))
PY
}

declare -A RATES
for scenario in $SCENARIOS; do
    for run in $(seq "$RUNS"); do
        for build in base new; do
            start "$build"
            t0=$(date +%s.%N)
            case $scenario in
                reuse) n=$N; timeout "$TIMEOUT" smtp-source -s "$SESSIONS" -m "$n" -l 1024 -d -f load@bench.test -t rcpt@remote.test 127.0.0.1:"$PORT" >/dev/null;;
                churn) n=$N; timeout "$TIMEOUT" smtp-source -s "$SESSIONS" -m "$n" -l 1024 -f load@bench.test -t rcpt@remote.test 127.0.0.1:"$PORT" >/dev/null;;
                big) n=$((N / 10)); timeout "$TIMEOUT" smtp-source -s "$SESSIONS" -m "$n" -l 102400 -d -f load@bench.test -t rcpt@remote.test 127.0.0.1:"$PORT" >/dev/null;;
                idle) per=$(idle_rss "$PORT" "$SERVER" "$IDLE");;
            esac
            t1=$(date +%s.%N)
            kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; SERVER=
            if [ "$scenario" = idle ]; then
                RATES[$scenario.$build]+="$per "
            else
                RATES[$scenario.$build]+="$(awk -v n="$n" -v a="$t0" -v b="$t1" 'BEGIN{printf "%.0f ", n/(b-a)}')"
            fi
        done
    done
done

med() { printf '%s\n' $1 | sort -g | awk '{a[NR]=$1} END {printf "%.0f", a[int((NR+1)/2)]}'; }
printf '| scenario | %s msg/s (runs) | working tree msg/s (runs) | ratio |\n|---|---|---|---|\n' "$BASE"
for scenario in $SCENARIOS; do
    b=$(med "${RATES[$scenario.base]}"); w=$(med "${RATES[$scenario.new]}")
    printf '| %s | %s (%s) | %s (%s) | %s |\n' "$scenario" "$b" "${RATES[$scenario.base]% }" "$w" "${RATES[$scenario.new]% }" \
        "$(awk -v b="$b" -v w="$w" 'BEGIN{printf "%.2f", w/b}')"
done
