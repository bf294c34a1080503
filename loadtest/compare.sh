#!/usr/bin/env bash
# Side-by-side: ringmx and its peers under identical loads from Postfix's smtp-source, on
# loopback high ports, one markdown table at the end. Everything is started here, stopped by
# PID, and bounded in time. Needs root (private Postfix instances, cgroup CPU accounting).
#
#   loadtest/compare.sh                 # full run (a few minutes)
#   N=2000 RUNS=1 loadtest/compare.sh   # quick look
#   ONLY="pfrelay rxrelay" loadtest/compare.sh   # some rows (names: see LABEL below)
#
# Rows: smtp-sink (accept and discard); Postfix queue-only (held in its fsync'ed queue);
# Postfix relaying to a counting smtp-sink; Haraka (2 workers) discarding and forwarding to the
# same sink; ringmx discard; ringmx durable spool + hold; ringmx relaying to the same sink.
# Scenarios: 1 KiB with connection reuse and with one message per connection (churn), 100 KiB,
# all driven by Postfix's smtp-source; churn again, and 1 KiB pipelined and over STARTTLS,
# driven by ringmx-loadtest (p99 latency of the final reply). Then one ringmx holds 10,000
# idle connections while it serves a loadtest run.
# Columns: accepted msg/s, end-to-end msg/s at the sink (relaying rows), server CPU seconds per
# 1,000 messages (cgroup cpuacct of the server and all its processes), p99, median of RUNS.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-20000}            # messages per run (100 KiB runs send N/10)
SESSIONS=${SESSIONS:-50} # parallel sessions
RUNS=${RUNS:-3}          # median of
WORK=${WORK:-/tmp/ringmx-compare}
TIMEOUT=${TIMEOUT:-300}  # seconds per run, at most
IDLE=${IDLE:-10000}      # idle connections held in the last check (0 = skip)
SCENARIOS=${SCENARIOS:-"reuse churn lt-churn big pipelined starttls tls-churn tls-resume"}
ONLY=${ONLY:-}           # rows to run (e.g. "pfrelay rxrelay"); all when empty

need() { command -v "$1" >/dev/null 2>&1; }
if ! need smtp-source || ! need smtp-sink; then
    apt-get update -qq
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postfix >/dev/null
fi
HARAKA_DIR=${HARAKA_DIR:-$WORK-haraka-pkg}
if [ ! -x "$HARAKA_DIR/node_modules/.bin/haraka" ] && need npm; then
    mkdir -p "$HARAKA_DIR"
    (cd "$HARAKA_DIR" && timeout 300 npm install --no-audit --no-fund Haraka >/dev/null 2>&1) || true
fi
cargo build --release -q -p ringmx -p ringmx-loadtest
RINGMX=$PWD/target/release/ringmx
LOADTEST=$PWD/target/release/ringmx-loadtest
ulimit -n "$(ulimit -Hn)"  # the idle-connection check needs > 10,000 descriptors

rm -rf "$WORK"; mkdir -p "$WORK"
CG=/sys/fs/cgroup/cpuacct
PIDS=()
cleanup() {
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
    for d in "$WORK"/postfix-*; do [ -d "$d" ] && postfix -c "$d" stop >/dev/null 2>&1 || true; done
    sleep 0.5
    for g in "$CG"/ringmx-compare-*; do
        [ -d "$g" ] && { xargs -r kill -9 < "$g/tasks" 2>/dev/null || true; sleep 0.2; rmdir "$g" 2>/dev/null || true; }
    done
}
trap cleanup EXIT

# Each server runs in its own cpuacct cgroup (children included).
cg_new() { local g="$CG/ringmx-compare-$1"; [ -d "$g" ] || mkdir "$g"; echo 0 > "$g/cpuacct.usage"; }
cg_exec() { local g="$CG/ringmx-compare-$1"; shift; sh -c 'echo $$ > "$0/tasks"; exec "$@"' "$g" "$@"; }
cg_cpu() { awk '{printf "%.3f", $1/1e9}' "$CG/ringmx-compare-$1/cpuacct.usage"; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 150); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }
now() { date +%s.%N; }

# Certificates for the STARTTLS scenario.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=bench.test -keyout "$WORK/key.pem" -out "$WORK/cert.pem" >/dev/null 2>&1

# The counting next hop of the relaying rows.
SINK_PORT=$(free_port)
smtp-sink -u nobody -c -m 2000 127.0.0.1:"$SINK_PORT" 2048 > "$WORK/sink.out" 2>&1 &
PIDS+=($!)
wait_port "$SINK_PORT"
# smtp-sink -c rewrites its counter line (ending in \r) at every message, so the file grows by
# about 30 bytes a message: only its end is read. Reading the whole file (millions of
# messages into a full run) took seconds of CPU per poll, beside the server being measured.
sink_count() { tail -c 512 "$WORK/sink.out" | tr '\r' '\n' | sed -n 's/.*mesg=\([0-9]*\).*/\1/p' | tail -1 | awk '{print $1+0}'; }

declare -A PORT KIND TLS
ROWS=()
row() { ROWS+=("$1"); PORT[$1]=$2; KIND[$1]=$3; TLS[$1]=$4; }

start_sink() {
    local p; p=$(free_port); cg_new sink
    cg_exec sink smtp-sink -u nobody -m 2000 127.0.0.1:"$p" 2048 & PIDS+=($!)
    wait_port "$p"; row sink "$p" discard no
}

start_postfix() { # name mode(hold|relay)
    local d="$WORK/postfix-$1" p; p=$(free_port)
    mkdir -p "$d/queue" "$d/data"
    sed -e "s/^smtp .*inet .*smtpd\$/127.0.0.1:$p inet n - n - - smtpd/" /etc/postfix/master.cf > "$d/master.cf"
    cat > "$d/main.cf" <<CONF
compatibility_level = 3.6
queue_directory = $d/queue
data_directory = $d/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:$SINK_PORT
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
maillog_file = $d/maillog
maillog_file_prefixes = /tmp, /var
alias_maps =
alias_database =
smtpd_recipient_restrictions = permit_mynetworks, reject
in_flow_delay = 0s
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
default_process_limit = 200
smtpd_tls_cert_file = $WORK/cert.pem
smtpd_tls_key_file = $WORK/key.pem
smtpd_tls_security_level = may
CONF
    [ "$2" = hold ] && echo "smtpd_client_restrictions = check_client_access static:HOLD" >> "$d/main.cf"
    chown -R postfix "$d/queue" "$d/data"
    chmod 644 "$WORK/key.pem"
    postfix -c "$d" set-permissions >/dev/null 2>&1 || true
    cg_new "$1"
    cg_exec "$1" postfix -c "$d" start >/dev/null 2>&1
    wait_port "$p"
    row "$1" "$p" "$2" yes
}

start_haraka() { # name mode(discard|forward)
    local d="$WORK/haraka-$1" p; p=$(free_port)
    [ -x "$HARAKA_DIR/node_modules/.bin/haraka" ] || { echo "Haraka not installed: row skipped" >&2; return 0; }
    "$HARAKA_DIR/node_modules/.bin/haraka" -i "$d" >/dev/null 2>&1
    printf '[main]\nlisten=127.0.0.1:%s\nnodes=2\n' "$p" > "$d/config/smtp.ini"
    printf '[main]\nlevel=warn\n' > "$d/config/log.ini"
    echo remote.test > "$d/config/host_list"
    if [ "$2" = discard ]; then
        printf 'rcpt_to.in_host_list\nqueue/discard\n' > "$d/config/plugins"
    else
        printf 'rcpt_to.in_host_list\nqueue/smtp_forward\n' > "$d/config/plugins"
        printf 'host=127.0.0.1\nport=%s\nenable_tls=false\n' "$SINK_PORT" > "$d/config/smtp_forward.ini"
    fi
    cg_new "$1"
    YES_REALLY_DO_DISCARD=1 cg_exec "$1" "$HARAKA_DIR/node_modules/.bin/haraka" -c "$d" > "$d/log" 2>&1 &
    PIDS+=($!)
    wait_port "$p"
    [ "$2" = discard ] && row "$1" "$p" discard no || row "$1" "$p" relay no
}

start_ringmx() { # name action
    local d="$WORK/ringmx-$1" p admin; p=$(free_port); admin=$(free_port)
    mkdir -p "$d"
    local route="action = \"$2\""
    [ "$2" = relay ] && route="action = \"relay\"
next_hops = [\"127.0.0.1:$SINK_PORT\"]
tls = \"none\""
    cat > "$d/ringmx.toml" <<CONF
[server]
hostname = "bench.test"
data_dir = "$d/data"
[[binding]]
name = "bench"
listen = "127.0.0.1:$p"
direction = "outbound"
allowed_clients = ["127.0.0.0/8"]
tls = "starttls"
certificate = "$WORK/cert.pem"
key = "$WORK/key.pem"
[limits]
max_connections = 30000
max_connections_per_ip = 30000
[admin]
listen = "127.0.0.1:$admin"
[[route]]
domains = ["*"]
$route
CONF
    cg_new "$1"
    cg_exec "$1" "$RINGMX" run -c "$d/ringmx.toml" 2> "$d/log" &
    PIDS+=($!)
    wait_port "$p"
    local kind=$2; [ "$2" = discard ] || [ "$2" = relay ] || kind=hold
    row "$1" "$p" "$kind" yes
}

declare -A LABEL=(
    [sink]="smtp-sink (accept and discard)"
    [pfhold]="Postfix queue-only (fsync'ed queue, held)"
    [pfrelay]="Postfix relaying to smtp-sink"
    [hkdiscard]="Haraka, 2 workers, discard"
    [hkforward]="Haraka, 2 workers, forwarding to smtp-sink"
    [rxdiscard]="ringmx, discard route"
    [rxhold]="ringmx, durable spool + hold"
    [rxrelay]="ringmx, relaying to smtp-sink"
)

med() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {if (NR) printf "%.0f", a[int((NR+1)/2)]; else printf "–"}'; }
medf() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {if (NR) printf "%.3f", a[int((NR+1)/2)]; else printf "–"}'; }

# One load run; prints "accepted_seconds p99_us" (p99 "–" for smtp-source).
load() { # scenario port
    local n=$N
    case $1 in
        reuse) timeout "$TIMEOUT" smtp-source -s "$SESSIONS" -m "$n" -l 1024 -d -f load@bench.test -t rcpt@remote.test 127.0.0.1:"$2" >/dev/null; echo –;;
        churn) timeout "$TIMEOUT" smtp-source -s "$SESSIONS" -m "$n" -l 1024 -f load@bench.test -t rcpt@remote.test 127.0.0.1:"$2" >/dev/null; echo –;;
        # The same churn from the other generator: one message per connection, no pipelining.
        lt-churn) timeout "$TIMEOUT" "$LOADTEST" -c "$SESSIONS" -n "$n" -s 1024 --per-connection 1 --no-pipelining --to-domain remote.test --from load@bench.test --json 127.0.0.1:"$2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["latency_us"]["final"]["p99"])';;
        big) timeout "$TIMEOUT" smtp-source -s "$SESSIONS" -m $((n / 10)) -l 102400 -d -f load@bench.test -t rcpt@remote.test 127.0.0.1:"$2" >/dev/null; echo –;;
        pipelined) timeout "$TIMEOUT" "$LOADTEST" -c "$SESSIONS" -n "$n" -s 1024 --to-domain remote.test --from load@bench.test --json 127.0.0.1:"$2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["latency_us"]["final"]["p99"])';;
        starttls) timeout "$TIMEOUT" "$LOADTEST" -c "$SESSIONS" -n "$n" -s 1024 --starttls --to-domain remote.test --from load@bench.test --json 127.0.0.1:"$2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["latency_us"]["final"]["p99"])';;
        # One message per connection over STARTTLS: a full handshake each time, or resumed
        # (how many resumed is printed).
        tls-churn) timeout "$TIMEOUT" "$LOADTEST" -c "$SESSIONS" -n "$n" -s 1024 --starttls --per-connection 1 --no-pipelining --to-domain remote.test --from load@bench.test --json 127.0.0.1:"$2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["latency_us"]["final"]["p99"])';;
        tls-resume) timeout "$TIMEOUT" "$LOADTEST" -c "$SESSIONS" -n "$n" -s 1024 --starttls --resume --per-connection 1 --no-pipelining --to-domain remote.test --from load@bench.test --json 127.0.0.1:"$2" | python3 -c 'import json,sys; d=json.load(sys.stdin); print("  resumed %d of %d handshakes" % (d["tls_resumed"], d["ok"]), file=sys.stderr); print(d["latency_us"]["final"]["p99"])';;
    esac
}
count_of() { case $1 in big) echo $((N / 10));; *) echo "$N";; esac; }

declare -A TABLE
run_cell() { # scenario row
    local sc=$1 r=$2 n acc=() e2e=() cpu=() p99=()
    n=$(count_of "$sc")
    for i in $(seq "$RUNS"); do
        local before t0 t1 t2 p
        before=$(sink_count)
        echo 0 > "$CG/ringmx-compare-$r/cpuacct.usage"
        t0=$(now)
        if ! p=$(load "$sc" "${PORT[$r]}"); then echo "  $sc / $r run $i failed" >&2; continue; fi
        t1=$(now)
        if [ "${KIND[$r]}" = relay ]; then
            local deadline=$(( $(date +%s) + TIMEOUT ))
            while [ "$(( $(sink_count) - before ))" -lt "$n" ] && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.05; done
            t2=$(now)
            e2e+=("$(echo "$n / ($t2 - $t0)" | bc -l)")
        fi
        acc+=("$(echo "$n / ($t1 - $t0)" | bc -l)")
        cpu+=("$(echo "$(cg_cpu "$r") * 1000 / $n" | bc -l)")
        [ "$p" != – ] && p99+=("$(echo "$p / 1000" | bc -l)")
        [ "$r" = pfhold ] && postsuper -c "$WORK/postfix-pfhold" -d ALL >/dev/null 2>&1 || true
        echo "  $sc / $r run $i: $(printf %.0f "${acc[-1]}") msg/s" >&2
    done
    TABLE[$sc,$r]="| ${LABEL[$r]} | $(med "${acc[@]:-}") | $([ ${#e2e[@]} -gt 0 ] && med "${e2e[@]}" || echo –) | $(medf "${cpu[@]:-}") | $([ ${#p99[@]} -gt 0 ] && medf "${p99[@]}" || echo –) |"
}

start_sink
start_postfix pfhold hold
start_postfix pfrelay relay
start_haraka hkdiscard discard
start_haraka hkforward forward
start_ringmx rxdiscard discard
start_ringmx rxhold hold
start_ringmx rxrelay relay

for sc in $SCENARIOS; do
    for r in "${ROWS[@]}"; do
        case $sc in starttls|tls-*) [ "${TLS[$r]}" = no ] && continue;; esac
        [ -n "$ONLY" ] && [[ " $ONLY " != *" $r "* ]] && continue
        echo "== $sc: $r" >&2
        run_cell "$sc" "$r"
    done
done

# 10,000 idle connections held by one ringmx while it keeps serving new mail.
IDLE_LINE=""
if [ "$IDLE" -gt 0 ]; then
    echo "== $IDLE idle connections on ringmx" >&2
    python3 - "${PORT[rxdiscard]}" "$IDLE" "$LOADTEST" "$N" > "$WORK/idle.out" <<'PY'
import json, resource, socket, subprocess, sys, time
port, n, loadtest, msgs = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    socks.append(s)
greeted = 0
for s in socks:
    s.settimeout(10)
    if s.recv(512).startswith(b"220"):
        greeted += 1
out = subprocess.run([loadtest, "-c", "50", "-n", str(msgs), "-s", "1024", "--to-domain", "remote.test", "--json", "127.0.0.1:%d" % port], capture_output=True, text=True)
r = json.loads(out.stdout)
alive = 0
for s in socks[:: max(1, n // 100)]:
    s.sendall(b"NOOP\r\n")
    if s.recv(512).startswith(b"250"):
        alive += 1
print("%d idle connections greeted, %d/%d sampled still answer NOOP; meanwhile %d messages at %.0f msg/s (p99 %.2f ms)" % (
    greeted, alive, len(socks[:: max(1, n // 100)]), r["ok"], r["msgs_per_sec"], r["latency_us"]["final"]["p99"] / 1000))
PY
    IDLE_LINE=$(cat "$WORK/idle.out")
fi

echo
echo "$(nproc) CPUs, $(uname -r), $SESSIONS sessions, median of $RUNS; CPU = server cgroup CPU-seconds per 1,000 messages"
for sc in $SCENARIOS; do
    case $sc in
        reuse) title="1 KiB × $N, connections reused (smtp-source -d)";;
        churn) title="1 KiB × $N, one message per connection (smtp-source)";;
        lt-churn) title="1 KiB × $N, one message per connection, no pipelining (ringmx-loadtest)";;
        big) title="100 KiB × $((N / 10)), connections reused (smtp-source -d)";;
        pipelined) title="1 KiB × $N, PIPELINING (ringmx-loadtest), p99 of the final reply";;
        starttls) title="1 KiB × $N over STARTTLS, PIPELINING (ringmx-loadtest)";;
        tls-churn) title="1 KiB × $N over STARTTLS, one message per connection, full handshakes, no pipelining (ringmx-loadtest)";;
        tls-resume) title="1 KiB × $N over STARTTLS, one message per connection, sessions resumed (ringmx-loadtest --resume)";;
    esac
    echo
    echo "### $title"
    echo
    echo "| server | accepted msg/s | end-to-end msg/s | CPU-s / 1k msgs | p99 ms |"
    echo "|---|---|---|---|---|"
    for r in "${ROWS[@]}"; do [ -n "${TABLE[$sc,$r]:-}" ] && echo "${TABLE[$sc,$r]}"; done
done
if [ -n "$IDLE_LINE" ]; then echo; echo "Idle connections: $IDLE_LINE"; fi
