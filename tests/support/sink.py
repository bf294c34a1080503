"""A next hop for the delivery tests, built on aiosmtpd (nobody here wrote the SMTP server).

Every accepted message is appended to --out as one JSON line: sender, recipients, Message-ID,
whether the session used TLS, and the raw message. Behaviour switches:
  --tempfail N    the first N transactions get "451 4.3.0" at end of data
  --reject WORD   recipients containing WORD get "550 5.1.1"
  --defer WORD    recipients containing WORD get "451 4.3.0"
  --rcpt-log FILE every RCPT appended as "sender<TAB>recipient" (callout probes: "<>")
  --tls CERT KEY  offer STARTTLS;  --require-tls  refuse MAIL before it
  --auth USER:PASS  offer AUTH (over TLS) and require it
Prints "ready" once listening; runs until SIGTERM.
"""
import argparse, email, json, signal, ssl, sys, threading

from aiosmtpd.controller import Controller

p = argparse.ArgumentParser()
p.add_argument("--port", type=int, required=True)
p.add_argument("--host", default="127.0.0.1")
p.add_argument("--out", required=True)
p.add_argument("--tempfail", type=int, default=0)
p.add_argument("--reject", default=None)
p.add_argument("--defer", default=None)
p.add_argument("--rcpt-log", default=None)
p.add_argument("--tls", nargs=2, default=None)
p.add_argument("--require-tls", action="store_true")
p.add_argument("--auth", default=None)
a = p.parse_args()

lock = threading.Lock()
state = {"tempfail": a.tempfail}


class Handler:
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if a.rcpt_log:
            with lock, open(a.rcpt_log, "a") as f:
                f.write("%s\t%s\n" % (envelope.mail_from or "", address))
        if a.defer and a.defer in address:
            return "451 4.3.0 <%s>: try again later" % address
        if a.reject and a.reject in address:
            return "550 5.1.1 <%s>: no such user here" % address
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        with lock:
            if state["tempfail"] > 0:
                state["tempfail"] -= 1
                return "451 4.3.0 please try again later"
        raw = envelope.original_content or envelope.content
        msg = email.message_from_bytes(raw)
        rec = {
            "from": envelope.mail_from,
            "rcpts": envelope.rcpt_tos,
            "message_id": msg.get("Message-ID"),
            "tls": session.ssl is not None,
            "peer": session.peer[0],
            "auth": getattr(session, "ringmx_user", None),
            "data": raw.decode("utf-8", "replace"),
        }
        with lock, open(a.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return "250 2.0.0 OK accepted"


kw = {}
if a.tls:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(a.tls[0], a.tls[1])
    kw["tls_context"] = ctx
    kw["require_starttls"] = a.require_tls
if a.auth:
    from aiosmtpd.smtp import AuthResult
    user, pw = a.auth.split(":", 1)

    def check(server, session, envelope, mechanism, auth_data):
        ok = auth_data.login.decode() == user and auth_data.password.decode() == pw
        if ok:
            session.ringmx_user = user
        return AuthResult(success=ok)

    kw["authenticator"] = check
    kw["auth_required"] = True
c = Controller(Handler(), hostname=a.host, port=a.port, decode_data=False,
               enable_SMTPUTF8=True, **kw)
c.start()
print("ready", flush=True)
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
done.wait()
c.stop()
