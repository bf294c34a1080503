#!/usr/bin/env bash
# Memory under hostile sizes, on loopback, against a release build:
#  1. SESSIONS (200) concurrent transfers of SIZE_MB (19) MiB each, all unfinished at once (no
#     final dot): RSS of ringmx before, with all of them in flight, and after they hang up.
#  2. QUEUED (1,000) accepted messages of QUEUED_MB (4) MiB for a next hop that accepts TCP
#     connections and never answers: RSS before and once all are accepted.
# Prints one line per phase. Disk: phase 1 spills SESSIONS x SIZE_MB (unnamed files, freed at
# hang-up), phase 2 spools QUEUED x QUEUED_MB in WORK.
#
#   loadtest/memory.sh
#   SESSIONS=50 QUEUED=100 loadtest/memory.sh   # quick look
set -euo pipefail
cd "$(dirname "$0")/.."

SESSIONS=${SESSIONS:-200}
SIZE_MB=${SIZE_MB:-19}
QUEUED=${QUEUED:-1000}
QUEUED_MB=${QUEUED_MB:-4}
WORK=${WORK:-/tmp/ringmx-memory}
PORT=${PORT:-12525}

cargo build --release -q -p ringmx
rm -rf "$WORK"; mkdir -p "$WORK"
ulimit -n "$(ulimit -Hn)"

# A next hop that never answers: a listening socket nobody accepts on (connections complete in
# the backlog and wait).
python3 -c '
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(4096); time.sleep(3600)' $((PORT + 2)) &
SILENT=$!

cat > "$WORK/ringmx.toml" <<EOF
[server]
hostname = "mx.test"
data_dir = "$WORK/data"

[[binding]]
name = "in"
listen = "127.0.0.1:$PORT"
direction = "inbound"

[[binding]]
name = "out"
listen = "127.0.0.1:$((PORT + 1))"
direction = "outbound"
allowed_clients = ["127.0.0.0/8"]

[domains]
local = ["example.test"]

[limits]
max_connections_per_ip = 1000
min_data_rate = 0

[admin]
listen = "127.0.0.1:$((PORT + 3))"

[[route]]
domains = ["silent.test"]
action = "relay"
next_hops = ["127.0.0.1:$((PORT + 2))"]

[[route]]
domains = ["*"]
action = "drop"
folder = "$WORK/drop"
EOF
target/release/ringmx run --config "$WORK/ringmx.toml" 2> "$WORK/ringmx.log" &
RINGMX=$!
trap 'kill $RINGMX $SILENT 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT
sleep 1

python3 - "$RINGMX" "$PORT" "$SESSIONS" "$SIZE_MB" "$QUEUED" "$QUEUED_MB" <<'EOF'
import asyncio, sys, time
pid, port, sessions, size_mb, queued, queued_mb = map(int, sys.argv[1:])

def rss_mib():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

async def reply(r):
    while True:
        line = await r.readline()
        if not line or line[3:4] != b"-":
            return line

async def open_txn(p, rcpt):
    r, w = await asyncio.open_connection("127.0.0.1", p)
    await reply(r)
    for cmd in (b"EHLO load.test\r\n", b"MAIL FROM:<a@load.test>\r\n", b"RCPT TO:<%s>\r\n" % rcpt):
        w.write(cmd); await w.drain()
        line = await reply(r)
        assert line.startswith(b"250"), line
    return r, w

async def unfinished(ready, hold):
    r, w = await open_txn(port, b"u@example.test")
    w.write(b"DATA\r\n"); await w.drain()
    assert (await reply(r)).startswith(b"354")
    line = b"x" * 1022 + b"\r\n"
    block = line * 1024
    w.write(b"Subject: big\r\n\r\n")
    for _ in range(size_mb):
        w.write(block); await w.drain()
    ready.release()
    await hold.wait()
    w.close()

async def phase1():
    before = rss_mib()
    ready, hold = asyncio.Semaphore(0), asyncio.Event()
    t0 = time.time()
    tasks = [asyncio.create_task(unfinished(ready, hold)) for _ in range(sessions)]
    for _ in range(sessions):
        await ready.acquire()
    await asyncio.sleep(1)
    during = rss_mib()
    hold.set()
    await asyncio.gather(*tasks)
    await asyncio.sleep(1)
    print(f"unfinished transfers: {sessions} x {size_mb} MiB in {time.time()-t0:.1f} s: "
          f"RSS {before:.1f} -> {during:.1f} MiB (+{during-before:.1f}), after hang-up {rss_mib():.1f} MiB")

async def sender(todo, body):
    r, w = await open_txn(port + 1, b"r@silent.test")
    first = True
    while todo:
        todo.pop()
        if not first:
            for cmd in (b"MAIL FROM:<a@load.test>\r\n", b"RCPT TO:<r@silent.test>\r\n"):
                w.write(cmd); await w.drain()
                assert (await reply(r)).startswith(b"250")
        first = False
        w.write(b"DATA\r\n"); await w.drain()
        assert (await reply(r)).startswith(b"354")
        w.write(body); await w.drain()
        line = await reply(r)
        assert line.startswith(b"250"), line
    w.write(b"QUIT\r\n"); await w.drain(); w.close()

async def phase2():
    before = rss_mib()
    line = b"y" * 1022 + b"\r\n"
    body = b"Subject: queued\r\n\r\n" + line * (1024 * queued_mb) + b".\r\n"
    todo = list(range(queued))
    t0 = time.time()
    await asyncio.gather(*(sender(todo, body) for _ in range(8)))
    await asyncio.sleep(2)
    after = rss_mib()
    print(f"queued for a silent hop: {queued} x {queued_mb} MiB accepted in {time.time()-t0:.1f} s: "
          f"RSS {before:.1f} -> {after:.1f} MiB (+{after-before:.1f})")

asyncio.run(phase1())
asyncio.run(phase2())
EOF
