#!/usr/bin/env python3
"""Record what real SMTP clients send, as seeds for the fuzz corpus.

Runs a scripted SMTP responder on loopback, drives Python's smtplib through it (and swaks when
it is installed), and writes each client's byte stream to fuzz/corpus/session/ (prefixed with
the raw-mode control byte) and each command line to fuzz/corpus/command/.

    python3 fuzz/seeds/record_smtplib.py
"""
import hashlib
import os
import shutil
import socket
import smtplib
import subprocess
import threading
from email.message import EmailMessage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPS = [b"PIPELINING", b"SIZE 10485760", b"8BITMIME", b"SMTPUTF8", b"ENHANCEDSTATUSCODES",
        b"CHUNKING", b"DSN", b"AUTH PLAIN LOGIN"]


def respond(conn, record):
    conn.sendall(b"220 rec.test ESMTP\r\n")
    buf = b""
    in_data = False
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return
        record.append(chunk)
        buf += chunk
        while True:
            if in_data:
                end = buf.find(b"\r\n.\r\n")
                if end < 0:
                    break
                buf = buf[end + 5:]
                in_data = False
                conn.sendall(b"250 2.0.0 queued\r\n")
                continue
            if b"\r\n" not in buf:
                break
            line, buf = buf.split(b"\r\n", 1)
            verb = line[:4].upper()
            if verb == b"EHLO":
                conn.sendall(b"".join(b"250-" + c + b"\r\n" for c in [b"rec.test"] + CAPS[:-1])
                             + b"250 " + CAPS[-1] + b"\r\n")
            elif verb == b"DATA":
                in_data = True
                conn.sendall(b"354 go\r\n")
            elif verb == b"QUIT":
                conn.sendall(b"221 bye\r\n")
                return
            elif verb == b"AUTH":
                conn.sendall(b"235 2.7.0 ok\r\n")
            else:
                conn.sendall(b"250 ok\r\n")


def record(client):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    chunks = []

    def serve():
        conn, _ = srv.accept()
        with conn:
            respond(conn, chunks)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        client(port)
    finally:
        t.join(timeout=10)
        srv.close()
    return b"".join(chunks)


def msg(subject, body, to="rcpt@d.test"):
    m = EmailMessage()
    m["From"] = "sender@b.test"
    m["To"] = to
    m["Subject"] = subject
    m.set_content(body)
    return m


def plain(port):
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.send_message(msg("hello", "Hello.\n.leading dot\n..two dots\n"))


def several(port):
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.send_message(msg("one", "first"), to_addrs=["a@d.test", "b@d.test", "c@e.test"])
        s.send_message(msg("two", "second\n" * 50), from_addr="", to_addrs=["a@d.test"])


def utf8(port):
    with smtplib.SMTP("127.0.0.1", port) as s:
        m = msg("Grüße", "Schöne Grüße", to="jürgen@bücher.test")
        s.send_message(m, from_addr="sénder@b.test", to_addrs=["jürgen@bücher.test"],
                       mail_options=["SMTPUTF8"])


def dsn(port):
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.sendmail("s@b.test", ["r@d.test"], b"Subject: dsn\r\n\r\nbody\r\n",
                   mail_options=["RET=HDRS", "ENVID=abc+2B1", "BODY=8BITMIME", "SIZE=30"],
                   rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;r@d.test"])


def auth(port):
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.login("user", "pass")
        s.sendmail("user@b.test", ["r@d.test"], b"Subject: auth\r\n\r\nx\r\n")


def login(port):
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.ehlo()
        s.esmtp_features["auth"] = "LOGIN"
        s.login("user", "pass")


def rset_noop(port):
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.helo("old.client")
        s.noop()
        s.rset()
        s.verify("someone")
        s.docmd("HELP")


def swaks(port):
    subprocess.run(["swaks", "--server", f"127.0.0.1:{port}", "--from", "s@b.test",
                    "--to", "r@d.test", "--pipeline", "--silent", "2"], check=False,
                   timeout=30)


ADDRESSES = [b"<a@b.test>", b"<>", b"<Postmaster>", b'<"quoted local"@d.test>',
             b"<u@[192.0.2.1]>", b"<u@[IPv6:2001:db8::1]>", b"<@r1.test,@r2.test:u@d.test>",
             "<jürgen@bücher.test>".encode(), b"<x@[tag:content]>", b"<a.b+c@sub.d-e.test> SIZE=1"]
BODIES = [b"Subject: x\r\n\r\nbody\r\n.\r\n", b"..stuffed\r\n.\r\n", b"a\n.\nb\r\n.\r\n",
          b"a\r\n.\rb\r\n.\r\n", b"x\r.\r\n.\r\n", b"\r\r\n.\r\n"]
# Alphabet-mode session seeds: token indexes into ALPHABET in src/proto/fuzz_targets.rs.
TOKENS = [[0, 2, 6, 4, 10, 25, 22, 20], [0, 2, 7, 21, 4, 21, 11, 32, 21, 24, 11, 31, 12, 21],
          [0, 13, 0, 14, 16, 21, 15, 17, 17], [1, 3, 5, 21, 10, 18, 19, 20]]


def synthetic():
    for name, items in (("address", ADDRESSES), ("data", BODIES)):
        d = os.path.join(ROOT, "corpus", name)
        os.makedirs(d, exist_ok=True)
        for i, item in enumerate(items):
            # data: first byte = policy bit + chunk size
            payload = bytes([(i * 5) & 0xff]) + item if name == "data" else item
            with open(os.path.join(d, f"seed-{i}"), "wb") as f:
                f.write(payload)
    d = os.path.join(ROOT, "corpus", "session")
    for i, toks in enumerate(TOKENS):
        with open(os.path.join(d, f"alphabet-{i}"), "wb") as f:
            f.write(bytes([i * 3]) + bytes(toks))


def main():
    synthetic()
    session_dir = os.path.join(ROOT, "corpus", "session")
    command_dir = os.path.join(ROOT, "corpus", "command")
    os.makedirs(session_dir, exist_ok=True)
    os.makedirs(command_dir, exist_ok=True)
    clients = [plain, several, utf8, dsn, auth, login, rset_noop]
    if shutil.which("swaks"):
        clients.append(swaks)
    for client in clients:
        data = record(client)
        if not data:
            continue
        # 0x80 = raw mode; low bits vary the chunking.
        for ctl in (0x80, 0x83, 0x8f):
            with open(os.path.join(session_dir, f"{client.__name__}-{ctl:02x}"), "wb") as f:
                f.write(bytes([ctl]) + data)
        for line in data.split(b"\r\n"):
            if 0 < len(line) < 512 and line[:4].isalpha():
                name = hashlib.sha1(line).hexdigest()[:16]
                with open(os.path.join(command_dir, f"{client.__name__}-{name}"), "wb") as f:
                    f.write(line + b"\r\n")
        print(f"{client.__name__}: {len(data)} bytes")


if __name__ == "__main__":
    main()
