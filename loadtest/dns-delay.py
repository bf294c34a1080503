#!/usr/bin/env python3
# A delaying UDP DNS proxy for load tests: it makes a fast local resolver (dnsmasq) look like
# a real one on the network, so the server's DNS waits (DNSBL, SPF, DKIM keys) cost time.
#
# Usage: python3 loadtest/dns-delay.py LISTEN_PORT UPSTREAM_PORT DELAY_MS
#
# Listens on 127.0.0.1:LISTEN_PORT (UDP), forwards every query to 127.0.0.1:UPSTREAM_PORT and
# sends each answer back to its client DELAY_MS milliseconds after the query arrived (at once
# if the upstream was slower than that). Many queries can be in flight: one thread waits on
# both sockets with a selector and keeps the pending replies in a heap ordered by due time.
# Each forwarded query gets a proxy-chosen transaction id (so ids from different clients never
# collide), put back in the answer. UDP only, no TCP: answers larger than 512 bytes that set
# TC are passed through as is. Queries the upstream never answers are forgotten when their
# 16-bit proxy id comes round again. Stdlib only; prints nothing except errors (to stderr);
# exits cleanly on SIGTERM or SIGINT.
import heapq
import selectors
import signal
import socket
import sys
import time


def main():
    if len(sys.argv) != 4:
        sys.exit("usage: dns-delay.py LISTEN_PORT UPSTREAM_PORT DELAY_MS")
    listen_port, upstream_port, delay = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) / 1000
    # Turn SIGTERM/SIGINT into SystemExit so the loop unwinds and the sockets close.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))

    front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # talks to the clients
    front.bind(("127.0.0.1", listen_port))
    back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # talks to the upstream
    back.connect(("127.0.0.1", upstream_port))
    for s in (front, back):
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sel = selectors.DefaultSelector()
    sel.register(front, selectors.EVENT_READ)
    sel.register(back, selectors.EVENT_READ)

    pending = {}  # proxy id -> (client's id bytes, client addr, time the query arrived)
    replies = []  # heap of (due time, sequence number, answer, client addr)
    next_id, seq = 0, 0
    while True:
        # Send every reply that is due, then sleep until the next one (or a datagram).
        now = time.monotonic()
        while replies and replies[0][0] <= now:
            _, _, data, addr = heapq.heappop(replies)
            try:
                front.sendto(data, addr)
            except OSError as e:
                print(f"dns-delay: send to {addr}: {e}", file=sys.stderr)
        timeout = max(0, replies[0][0] - now) if replies else None
        for key, _ in sel.select(timeout):
            while True:  # drain the socket: many datagrams may be queued
                try:
                    data, addr = key.fileobj.recvfrom(65535)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:  # e.g. ECONNREFUSED when the upstream is down
                    print(f"dns-delay: {e}", file=sys.stderr)
                    break
                if len(data) < 12:
                    continue  # not DNS
                if key.fileobj is front:  # a query: rename its id and forward it
                    pending[next_id] = (data[:2], addr, time.monotonic())
                    try:
                        back.send(next_id.to_bytes(2, "big") + data[2:])
                    except OSError as e:
                        print(f"dns-delay: forward: {e}", file=sys.stderr)
                    next_id = (next_id + 1) & 0xFFFF
                else:  # an answer: restore the client's id and schedule it
                    entry = pending.pop(int.from_bytes(data[:2], "big"), None)
                    if entry is None:
                        continue  # late or unknown answer
                    orig_id, client, arrived = entry
                    seq += 1
                    heapq.heappush(replies, (arrived + delay, seq, orig_id + data[2:], client))


if __name__ == "__main__":
    main()
