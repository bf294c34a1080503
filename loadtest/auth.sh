#!/usr/bin/env bash
# What SPF, DKIM and DMARC verification costs under load: the same build, an inbound binding
# with [authentication] verify off and on, runs alternating. ringmx-loadtest sends one
# DKIM-signed message (dkimpy, RSA-2048, ~1 KiB) over and over, pipelined; dnsmasq serves the
# SPF, DKIM key and DMARC records with a TTL, so after the first message the answers come
# from the resolver's cache. Prints the median msg/s and p99 of the final reply per mode.
#
# With DELAY_MS set, the records have TTL 0 (every message looks them up again: a cold cache
# each time) and reach ringmx through loadtest/dns-delay.py, which answers DELAY_MS late;
# only verification on is run, and its p99 shows what DNS costs a message while the cores
# go on (CPU use is printed too).
#
#   loadtest/auth.sh
#   RUNS=5 N=20000 loadtest/auth.sh
#   DELAY_MS=50 N=3000 loadtest/auth.sh
#   MODES=true BIN=/tmp/other-ringmx loadtest/auth.sh   (one mode, another build)
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
DELAY_MS=${DELAY_MS:-}
N=${N:-20000}
CONNS=${CONNS:-50}
WORK=${WORK:-/tmp/ringmx-auth-bench}

for p in dnsmasq openssl python3; do
    command -v "$p" >/dev/null || { echo "$p missing: apt-get install dnsmasq-base openssl" >&2; exit 1; }
done
python3 -c 'import dkim' 2>/dev/null || { echo "dkimpy missing: python3 -m pip install dkimpy" >&2; exit 1; }
rm -rf "$WORK"; mkdir -p "$WORK"
cleanup() {
    [ -n "${SERVER:-}" ] && kill "$SERVER" 2>/dev/null || true
    [ -n "${DNS:-}" ] && kill "$DNS" 2>/dev/null || true
    [ -n "${PROXY:-}" ] && kill "$PROXY" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
[ -n "${KEEP:-}" ] && trap - EXIT
# BIN: another build of ringmx to measure (an A/B comparison); the default is built here.
if [ -n "${BIN:-}" ]; then cargo build --release -q -p ringmx-loadtest; else
    cargo build --release -q -p ringmx -p ringmx-loadtest; BIN="$PWD/target/release/ringmx"; fi
LOAD="$PWD/target/release/ringmx-loadtest"

. loadtest/lib.sh  # (the script runs from the repository root)

openssl genrsa -out "$WORK/key.pem" 2048 2>/dev/null
pub=$(openssl rsa -in "$WORK/key.pem" -pubout -outform DER 2>/dev/null | base64 -w0)
python3 - "$WORK" <<'PY'
import sys, dkim
d = sys.argv[1]
body = "".join("line %02d of a message of about one kilobyte, signed.\r\n" % i for i in range(14))
m = ("From: Bob <bob@bench.test>\r\nTo: rcpt0@example.test\r\nSubject: signed\r\n"
     "Message-ID: <signed@bench.test>\r\n\r\n" + body).encode()
key = open(d + "/key.pem", "rb").read()
open(d + "/signed.eml", "wb").write(dkim.sign(m, b"sel", b"bench.test", key,
    include_headers=[b"from", b"to", b"subject", b"message-id"]) + m)
PY
DNS_PORT=$(free_port)
dnsmasq --keep-in-foreground --conf-file=/dev/null --no-resolv --no-hosts --bind-interfaces \
    --listen-address=127.0.0.1 --user=root --port="$DNS_PORT" --local=/test/ \
    --local-ttl="$([ -n "$DELAY_MS" ] && echo 0 || echo 3600)" \
    "--txt-record=bench.test,v=spf1 ip4:127.0.0.1 -all" \
    "--txt-record=_dmarc.bench.test,v=DMARC1; p=reject" \
    "--txt-record=sel._domainkey.bench.test,v=DKIM1; k=rsa; p=${pub:0:200},${pub:200}" &
DNS=$!
if [ -n "$DELAY_MS" ]; then
    UPSTREAM=$DNS_PORT; DNS_PORT=$(free_port)
    python3 loadtest/dns-delay.py "$DNS_PORT" "$UPSTREAM" "$DELAY_MS" &
    PROXY=$!
fi

start() {
    local d="$WORK/run"
    rm -rf "$d"; mkdir -p "$d"
    PORT=$(free_port); ADMIN=$(free_port)
    cat > "$d/ringmx.toml" <<CONF
[server]
hostname = "mx.test"
data_dir = "$d/data"
[[binding]]
name = "mx"
listen = "127.0.0.1:$PORT"
direction = "inbound"
[domains]
local = ["example.test"]
[limits]
max_connections = 30000
max_connections_per_ip = 30000
[admin]
listen = "127.0.0.1:$ADMIN"
[dns]
servers = ["127.0.0.1:$DNS_PORT"]
[authentication]
verify = $1
[[route]]
domains = ["*"]
action = "hold"
CONF
    "$BIN" run -c "$d/ringmx.toml" 2> "$d/log" &
    SERVER=$!
    wait_port "$PORT"
}

declare -A RATE P99 CPU
MODES=${MODES:-false true}; [ -n "$DELAY_MS" ] && MODES=true
for run in $(seq "$RUNS"); do
    for mode in $MODES; do
        start "$mode"
        out=$("$LOAD" 127.0.0.1:"$PORT" -c "$CONNS" -n "$N" --from bob@bench.test \
            --message "$WORK/signed.eml" --json)
        if [ "$mode" = true ] && ! curl -s "http://127.0.0.1:$ADMIN/metrics" | grep -q 'method="dkim",result="pass"} [1-9]'; then
            echo "no DKIM pass counted: the verification did not run" >&2
        fi
        CPU[$mode]+="$(awk '{printf "%.2f", ($14+$15)/100}' "/proc/$SERVER/stat") "
        kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; SERVER=
        RATE[$mode]+="$(python3 -c 'import json,sys; print(round(json.load(sys.stdin)["msgs_per_sec"]))' <<<"$out") "
        P99[$mode]+="$(python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.1f" % (d["latency_us"]["final"]["p99"] / 1000))' <<<"$out") "
    done
done

printf '| verification | msg/s (runs) | p99 final reply ms (runs) | server CPU-s (runs) |\n|---|---|---|---|\n'
for mode in $MODES; do
    printf '| %s | %s (%s) | %s | %s |\n' "$([ "$mode" = true ] && echo on || echo off)" \
        "$(med "${RATE[$mode]}")" "${RATE[$mode]% }" "${P99[$mode]% }" "${CPU[$mode]% }"
done
[ -n "$DELAY_MS" ] && { echo "DNS answers ${DELAY_MS} ms late, TTL 0"; exit 0; }
[ "$MODES" = "false true" ] || exit 0
off=$(med "${RATE[false]}"); on=$(med "${RATE[true]}")
awk -v a="$off" -v b="$on" 'BEGIN{printf "on/off: %.2f\n", b/a}'
