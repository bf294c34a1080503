#!/usr/bin/env bash
# What the gatekeeper's checks cost under load: the same build, an inbound binding with every
# check off against the same with the checks on, runs alternating (smtp-source, 1 KiB,
# connections reused and one message per connection; durable spool, fdatasync before 250).
#
#   map:     hold route; on = a [[recipients]] map of 1 M addresses, [rates] far from their
#            limits, [dnsbl] with one list (dnsmasq on loopback; the answer is cached), hop limit
#   callout: relay to smtp-sink; on = [[recipients]] callout = true (the cache warm after the
#            first probe), [rates], [dnsbl]
#
# Prints the median msg/s of each and the ratio on/off.
#
#   loadtest/checks.sh
#   RUNS=5 N=20000 SCENARIOS="map" LOADS="churn" loadtest/checks.sh
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
N=${N:-20000}
SESSIONS=${SESSIONS:-50}
SCENARIOS=${SCENARIOS:-"map callout"}
LOADS=${LOADS:-"reuse churn"}
WORK=${WORK:-/tmp/ringmx-checks}
TIMEOUT=${TIMEOUT:-300}

for p in smtp-source smtp-sink dnsmasq; do
    command -v "$p" >/dev/null || { echo "$p missing: apt-get install postfix dnsmasq-base" >&2; exit 1; }
done
rm -rf "$WORK"; mkdir -p "$WORK"
cleanup() {
    [ -n "${SERVER:-}" ] && kill "$SERVER" 2>/dev/null || true
    [ -n "${DNS:-}" ] && kill "$DNS" 2>/dev/null || true
    [ -n "${SINK:-}" ] && kill "$SINK" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
cargo build --release -q -p ringmx
BIN="$PWD/target/release/ringmx"

. loadtest/lib.sh  # (the script runs from the repository root)

DNS_PORT=$(free_port)
dnsmasq --keep-in-foreground --conf-file=/dev/null --no-resolv --no-hosts --bind-interfaces \
    --listen-address=127.0.0.1 --user=root --port="$DNS_PORT" --local=/bl.test/ &
DNS=$!
SINK_PORT=$(free_port)
smtp-sink -u nobody 127.0.0.1:"$SINK_PORT" 2048 &
SINK=$!
wait_port "$SINK_PORT"
# 1 M known recipients; the one smtp-source writes to among them.
python3 - "$WORK/recipients.txt" <<'PY'
import sys
with open(sys.argv[1], "w") as f:
    for i in range(1_000_000):
        f.write("user%07d@bench.test\n" % i)
    f.write("rcpt@bench.test\n")
PY

# Start ringmx for SCENARIO and on|off; sets PORT and SERVER.
start() {
    local d="$WORK/run" admin route checks=""
    rm -rf "$d"; mkdir -p "$d"
    PORT=$(free_port); admin=$(free_port)
    if [ "$1" = map ]; then
        route="action = \"hold\""
    else
        route=$(printf 'action = "relay"\nnext_hops = ["127.0.0.1:%s"]\ntls = "none"' "$SINK_PORT")
    fi
    if [ "$2" = on ]; then
        checks=$(printf '[rates]\nconnections_per_minute = 60000\nmessages_per_minute = 60000\nrecipients_per_minute = 60000\nunknown_recipients_per_minute = 600\nburst_percent = 100\n[dns]\nservers = ["127.0.0.1:%s"]\n[dnsbl]\nlists = ["bl.test"]\n' "$DNS_PORT")
        if [ "$1" = map ]; then
            checks+=$(printf '\n[[recipients]]\ndomains = ["bench.test"]\nfile = "%s"\n' "$WORK/recipients.txt")
        else
            checks+=$(printf '\n[[recipients]]\ndomains = ["bench.test"]\ncallout = true\n')
        fi
    fi
    cat > "$d/ringmx.toml" <<CONF
[server]
hostname = "bench.test"
data_dir = "$d/data"
[[binding]]
name = "mx"
listen = "127.0.0.1:$PORT"
direction = "inbound"
[domains]
local = ["bench.test"]
[limits]
max_connections = 30000
max_connections_per_ip = 30000
[admin]
listen = "127.0.0.1:$admin"
$checks
[[route]]
domains = ["*"]
$route
CONF
    "$BIN" run -c "$d/ringmx.toml" 2> "$d/log" &
    SERVER=$!
    wait_port "$PORT"
    # Warm the caches (DNS list answer, callout) with one message.
    smtp-source -m 1 -l 100 -f load@remote.test -t rcpt@bench.test 127.0.0.1:"$PORT" >/dev/null
}

declare -A RATES
for scenario in $SCENARIOS; do
    for load in $LOADS; do
        for run in $(seq "$RUNS"); do
            for mode in off on; do
                start "$scenario" "$mode"
                flags="-d"; [ "$load" = churn ] && flags=""
                t0=$(date +%s.%N)
                timeout "$TIMEOUT" smtp-source -s "$SESSIONS" -m "$N" -l 1024 $flags \
                    -f load@remote.test -t rcpt@bench.test 127.0.0.1:"$PORT" >/dev/null
                t1=$(date +%s.%N)
                if grep -q "rejected\|refused" "$WORK/run/log"; then
                    echo "refusals in the $scenario/$mode run:" >&2; grep -m3 "rejected\|refused" "$WORK/run/log" >&2
                fi
                kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; SERVER=
                RATES[$scenario.$load.$mode]+="$(awk -v n="$N" -v a="$t0" -v b="$t1" 'BEGIN{printf "%.0f ", n/(b-a)}')"
            done
        done
    done
done

printf '| scenario | load | checks off msg/s (runs) | checks on msg/s (runs) | on/off |\n|---|---|---|---|---|\n'
for scenario in $SCENARIOS; do
    for load in $LOADS; do
        off=$(med "${RATES[$scenario.$load.off]}"); on=$(med "${RATES[$scenario.$load.on]}")
        printf '| %s | %s | %s (%s) | %s (%s) | %s |\n' "$scenario" "$load" "$off" "${RATES[$scenario.$load.off]% }" \
            "$on" "${RATES[$scenario.$load.on]% }" "$(awk -v a="$off" -v b="$on" 'BEGIN{printf "%.2f", b/a}')"
    done
done
