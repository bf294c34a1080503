#!/usr/bin/env bash
# Side-by-side: ringmx and its peers under identical loads from Postfix's smtp-source, on
# loopback high ports, one markdown table at the end. Everything is started here, stopped by
# PID, and bounded in time. Needs root (private Postfix instances, cgroup CPU accounting).
#
#   loadtest/compare.sh                 # full run (a few minutes)
#   N=2000 RUNS=1 loadtest/compare.sh   # quick look
#
# Rows: smtp-sink (accept and discard); Postfix queue-only (held in its fsync'ed queue);
# Postfix relaying to a counting smtp-sink; ringmx discard; ringmx durable spool + hold;
# ringmx relaying to the same smtp-sink.
# Columns: accepted msg/s, end-to-end msg/s at the sink (relaying rows), server CPU seconds per
# 1,000 messages (cgroup cpuacct of the server and all its processes), median of RUNS runs.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-20000}            # messages per run
SIZE=${SIZE:-1024}       # bytes per message
SESSIONS=${SESSIONS:-50} # parallel sessions
RUNS=${RUNS:-3}          # median of
REUSE=${REUSE:--d}       # "-d" reuses connections; "" = one message per connection
WORK=${WORK:-/tmp/ringmx-compare}
TIMEOUT=${TIMEOUT:-300}  # seconds per run, at most

need() { command -v "$1" >/dev/null 2>&1; }
if ! need smtp-source || ! need smtp-sink; then
    apt-get update -qq
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postfix >/dev/null
fi
[ -x target/release/ringmx ] || cargo build --release -q
RINGMX=$PWD/target/release/ringmx

rm -rf "$WORK"; mkdir -p "$WORK"
CG=/sys/fs/cgroup/cpuacct
PIDS=()
cleanup() {
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
    for d in "$WORK"/postfix-*; do [ -d "$d" ] && postfix -c "$d" stop >/dev/null 2>&1 || true; done
    sleep 0.5
    for g in "$CG"/ringmx-compare-*; do
        [ -d "$g" ] && { xargs -r kill -9 < "$g/tasks" 2>/dev/null || true; rmdir "$g" 2>/dev/null || true; }
    done
}
trap cleanup EXIT

# Run "$@" inside a fresh cpuacct cgroup named $1's row (children included).
cg_new() { local g="$CG/ringmx-compare-$1"; [ -d "$g" ] || mkdir "$g"; echo 0 > "$g/cpuacct.usage"; }
cg_exec() { local g="$CG/ringmx-compare-$1"; shift; sh -c 'echo $$ > "$0/tasks"; exec "$@"' "$g" "$@"; }
cg_cpu() { awk '{printf "%.3f", $1/1e9}' "$CG/ringmx-compare-$1/cpuacct.usage"; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }
now() { date +%s.%N; }

# A counting next hop for the relaying rows: smtp-sink with a message counter on stdout.
SINK_PORT=$(free_port)
smtp-sink -u nobody -c -m 1000 127.0.0.1:"$SINK_PORT" 1024 > "$WORK/sink.out" 2>&1 &
PIDS+=($!)
wait_port "$SINK_PORT"
sink_count() { tr '\r' '\n' < "$WORK/sink.out" | sed -n 's/.*mesg=\([0-9]*\).*/\1/p' | tail -1 | awk '{print $1+0}'; }

postfix_instance() { # name port mode(hold|relay)
    local d="$WORK/postfix-$1"
    mkdir -p "$d/queue" "$d/data"
    sed -e "s/^smtp .*inet .*smtpd\$/127.0.0.1:$2 inet n - n - - smtpd/" /etc/postfix/master.cf > "$d/master.cf"
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
CONF
    [ "$3" = hold ] && echo "smtpd_client_restrictions = check_client_access static:HOLD" >> "$d/main.cf"
    chown -R postfix "$d/queue" "$d/data"
    postfix -c "$d" set-permissions >/dev/null 2>&1 || true
    cg_new "$1"
    cg_exec "$1" postfix -c "$d" start >/dev/null 2>&1
    wait_port "$2"
}
postfix_queued() { find "$WORK/postfix-$1/queue/"{incoming,active,deferred,maildrop} -type f 2>/dev/null | wc -l; }

ringmx_instance() { # name port route-action
    local d="$WORK/ringmx-$1" admin
    admin=$(free_port)
    mkdir -p "$d"
    local route="action = \"$3\""
    [ "$3" = relay ] && route="action = \"relay\"
next_hops = [\"127.0.0.1:$SINK_PORT\"]
tls = \"none\""
    cat > "$d/ringmx.toml" <<CONF
[server]
hostname = "bench.test"
data_dir = "$d/data"
[[binding]]
name = "bench"
listen = "127.0.0.1:$2"
direction = "outbound"
allowed_clients = ["127.0.0.0/8"]
[limits]
max_connections_per_ip = 10000
[admin]
listen = "127.0.0.1:$admin"
[[route]]
domains = ["*"]
$route
CONF
    echo "$admin" > "$d/admin-port"
    cg_new "$1"
    cg_exec "$1" "$RINGMX" run -c "$d/ringmx.toml" 2> "$d/log" &
    PIDS+=($!)
    wait_port "$2"
}
ringmx_queued() {
    curl -s "127.0.0.1:$(cat "$WORK/ringmx-$1/admin-port")/metrics" |
        awk '/^ringmx_queue_messages\{state="(active|deferred)"\}/ {s+=$2} END {print s+0}'
}

# One run: load with smtp-source; for relaying rows wait until the queue is empty (end to end).
RESULTS=()
run_row() { # label name port kind(sink|hold|relay) server(ringmx|postfix|sink)
    local label=$1 name=$2 port=$3 kind=$4 server=$5 acc=() e2e=() cpu=()
    for r in $(seq "$RUNS"); do
        local c0 t0 t1 t2 c1 before
        before=$(sink_count)
        [ "$server" != sink ] && echo 0 > "$CG/ringmx-compare-$name/cpuacct.usage"
        t0=$(now)
        timeout "$TIMEOUT" smtp-source -s "$SESSIONS" -m "$N" -l "$SIZE" $REUSE \
            -f load@bench.test -t rcpt@remote.test 127.0.0.1:"$port" >/dev/null
        t1=$(now)
        if [ "$kind" = relay ]; then
            local deadline=$(( $(date +%s) + TIMEOUT ))
            while [ "$(( $(sink_count) - before ))" -lt "$N" ] && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.05; done
            t2=$(now)
            e2e+=("$(echo "$N / ($t2 - $t0)" | bc -l)")
        fi
        acc+=("$(echo "$N / ($t1 - $t0)" | bc -l)")
        if [ "$server" != sink ]; then cpu+=("$(echo "$(cg_cpu "$name") * 1000 / $N" | bc -l)"); fi
        if [ "$server" = postfix ] && [ "$kind" = hold ]; then postsuper -c "$WORK/postfix-$name" -d ALL >/dev/null 2>&1 || true; fi
        echo "  $label run $r: accepted $(printf %.0f "${acc[-1]}") msg/s" >&2
    done
    med() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {if (NR) printf "%.0f", a[int((NR+1)/2)]; else printf "–"}'; }
    medf() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {if (NR) printf "%.3f", a[int((NR+1)/2)]; else printf "–"}'; }
    RESULTS+=("| $label | $(med "${acc[@]}") | $( [ ${#e2e[@]} -gt 0 ] && med "${e2e[@]}" || echo –) | $( [ ${#cpu[@]} -gt 0 ] && medf "${cpu[@]}" || echo –) |")
}

echo "== smtp-sink" >&2
P=$(free_port); cg_new sink; cg_exec sink smtp-sink -u nobody -m 1000 127.0.0.1:"$P" 1024 & PIDS+=($!); wait_port "$P"
run_row "smtp-sink (accept and discard)" sink "$P" sink postfix
echo "== Postfix queue-only" >&2
P=$(free_port); postfix_instance pfhold "$P" hold
run_row "Postfix queue-only (fsync'ed queue, held)" pfhold "$P" hold postfix
echo "== Postfix relaying" >&2
P=$(free_port); postfix_instance pfrelay "$P" relay
run_row "Postfix relaying to smtp-sink" pfrelay "$P" relay postfix
echo "== ringmx discard" >&2
P=$(free_port); ringmx_instance rxdiscard "$P" discard
run_row "ringmx discard route" rxdiscard "$P" sink ringmx
echo "== ringmx durable + hold" >&2
P=$(free_port); ringmx_instance rxhold "$P" hold
run_row "ringmx durable spool + hold" rxhold "$P" hold ringmx
echo "== ringmx relaying" >&2
P=$(free_port); ringmx_instance rxrelay "$P" relay
run_row "ringmx relaying to smtp-sink" rxrelay "$P" relay ringmx

echo
echo "$N messages × $SIZE bytes, $SESSIONS sessions, smtp-source ${REUSE:-(one message per connection)}, median of $RUNS, $(nproc) CPUs, $(uname -r)"
echo
echo "| server | accepted msg/s | end-to-end msg/s | server CPU-s / 1k msgs |"
echo "|---|---|---|---|"
printf '%s\n' "${RESULTS[@]}"
