//! Checks of the edge on port 25, with Python's smtplib and raw sockets: recipient validation
//! against `[[recipients]]` (known, `+tag`, unknown, a directory harvest closed at
//! `max_unknown_recipients`, a reload with a changed map) and the loop limit (`max_hops`).

mod support;

use support::{Raw, Server, python, stdout};

const DRIVERS: [&str; 2] = ["auto", "legacy"];

/// A server with a recipient map file, and the folder that holds the file (removed when
/// dropped: keep it as long as the server).
fn with_map(name: &str, driver: &'static str, map: &str) -> (support::TempDir, Server) {
    let dir = support::temp_dir(&format!("{name}-map"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("recipients.txt");
    std::fs::write(&file, map).unwrap();
    let extra = format!(
        "[[recipients]]\ndomains = [\"example.test\"]\nfile = \"{}\"\n",
        file.display()
    );
    let s = Server::start_with(name, driver, "", &extra);
    (dir, s)
}

/// smtplib connecting from each loopback source in turn: `source code` (NOOP's when let in,
/// the refusal's code and text otherwise).
fn connect_from(sources: &[&str]) -> String {
    format!(
        r#"
import os, smtplib
for src in {sources:?}:
    try:
        with smtplib.SMTP("127.0.0.1", int(os.environ["PORT"]), source_address=(src, 0), timeout=10) as s:
            print(src, s.noop()[0])
    except smtplib.SMTPConnectError as e:
        print(src, e.smtp_code, e.smtp_error.decode())
"#
    )
}

const SEND: &str = r#"
import os, smtplib
with smtplib.SMTP("127.0.0.1", int(os.environ["PORT"]), timeout=20) as s:
    s.ehlo("client.test")
    s.mail("sender@remote.test")
    for r in ["alice@example.test", "alice+news@example.test", "ALICE@Example.test", "nobody@example.test", "anyone@example.org"]:
        print(r, s.rcpt(r))
"#;

#[test]
fn unknown_recipients_refused_harvest_closed_map_reloaded() {
    for driver in DRIVERS {
        // (Bound in this order, the folder is dropped after the server.)
        let (_map_dir, s) = with_map(
            &format!("rcpt-map-{driver}"),
            driver,
            "# test users\nalice@example.test\npostmaster@*\n",
        );
        let out = python(SEND, s.inbound.port(), 0);
        let text = stdout(&out);
        assert!(out.status.success(), "{text}");
        for (r, want) in [
            ("alice@example.test", "250"),
            ("alice+news@example.test", "250"),
            ("ALICE@Example.test", "250"),
            ("nobody@example.test", "550, b'5.1.1"),
            // A local domain no map covers: not validated.
            ("anyone@example.org", "250"),
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(&format!("{r} ({want}"))),
                "[{driver}] {r}: {text}"
            );
        }
        // A directory harvest: the tenth unknown recipient is answered, then 421 and close
        // (nothing is sent after it: a write to the closed socket could reset the connection
        // before the 421 is read).
        let mut c = Raw::connect(s.inbound);
        c.reply();
        c.cmd("EHLO harvester.test\r\n");
        c.cmd("MAIL FROM:<h@remote.test>\r\n");
        for i in 0..10 {
            let r = c.cmd(&format!("RCPT TO:<guess{i}@example.test>\r\n"));
            assert!(r.starts_with("550 5.1.1"), "[{driver}] guess {i}: {r}");
        }
        let r = c.reply();
        assert!(
            r.starts_with("421 4.7.0 Too many unknown recipients"),
            "[{driver}] {r}"
        );
        assert!(c.rest().is_empty(), "[{driver}] closed");
        // The map is reloaded with the configuration.
        let cfg = std::fs::read_to_string(s.dir.join("ringmx.toml")).unwrap();
        let map = cfg
            .split("file = \"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .to_string();
        std::fs::write(&map, "alice@example.test\nnobody@example.test\n").unwrap();
        s.reconfigure(&cfg);
        let text = stdout(&python(SEND, s.inbound.port(), 0));
        assert!(
            text.contains("nobody@example.test (250"),
            "[{driver}] {text}"
        );
        let metrics = s.admin_get("/metrics").1;
        assert!(
            metrics.contains("reason=\"unknown_recipient\"} 11"),
            "{metrics}"
        );
        assert!(metrics.contains("reason=\"harvest\"} 1"), "{metrics}");
    }
}

#[test]
fn loop_limit_refuses_more_than_max_hops() {
    for driver in DRIVERS {
        let s = Server::start(&format!("hops-{driver}"), driver);
        for (n, want) in [(50, "250"), (51, "554 5.4.6")] {
            let received: String = (0..n)
                .map(|i| format!("Received: from hop{i}.test by hop{}.test; Sun, 29 Nov 2026 10:00:00 +0000\r\n", i + 1))
                .collect();
            let mut c = Raw::connect(s.inbound);
            c.reply();
            c.cmd("EHLO loop.test\r\n");
            c.start_data();
            let r = c.cmd(&format!("{received}Subject: loop {n}\r\n\r\nbody\r\n.\r\n"));
            assert!(r.starts_with(want), "[{driver}] {n}: {r}");
            c.cmd("QUIT\r\n");
        }
        assert_eq!(s.dropped().len(), 1, "[{driver}]");
    }
}

/// `clients_deny` and `clients_allow` per binding: refused clients get `554 5.7.1` instead of
/// the greeting (smtplib from loopback aliases), others are served.
#[test]
fn client_access_lists_per_binding() {
    let connect = connect_from(&["127.0.0.1", "127.0.0.2", "127.0.0.3"]);
    for driver in DRIVERS {
        let s = Server::start_with(
            &format!("access-{driver}"),
            driver,
            "clients_allow = [\"127.0.0.0/30\"]\nclients_deny = [\"127.0.0.2/32\"]\n",
            "",
        );
        let text = stdout(&python(&connect, s.inbound.port(), 0));
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            [
                "127.0.0.1 250",
                "127.0.0.2 554 5.7.1 Access denied, closing connection",
                "127.0.0.3 250",
            ],
            "[{driver}]"
        );
        // Outside clients_allow.
        let out = python(
            &connect_from(&["127.0.0.1", "127.0.0.2", "127.0.0.5"]),
            s.inbound.port(),
            0,
        );
        assert!(
            stdout(&out).contains("127.0.0.5 554 5.7.1"),
            "[{driver}] {}",
            stdout(&out)
        );
        assert!(
            s.admin_get("/metrics")
                .1
                .contains("reason=\"access_denied\"} 3")
        );
    }
}

/// `[rates]`: connections, messages and recipients per client network and minute, counted
/// across connections; another address has its own allowance; exempt networks have none.
#[test]
fn rate_limits_per_network() {
    const CLIENT: &str = r#"
import os, smtplib
port = int(os.environ["PORT"])
def connect(src):
    try:
        return smtplib.SMTP("127.0.0.1", port, source_address=(src, 0), timeout=10)
    except smtplib.SMTPConnectError as e:
        print(src, "connect", e.smtp_code, e.smtp_error.decode())
        return None
s = connect("127.0.0.4")
s.ehlo("client.test")
print("mail", s.mail("a@remote.test")[0])
print("rcpts", [s.rcpt("u%d@example.test" % i)[0] for i in range(2)])
s.rset()
print("mail", s.mail("a@remote.test")[0])
print("rcpts", [s.rcpt("u%d@example.test" % i)[0] for i in range(3)])
s.rset()
code, msg = s.mail("a@remote.test")
print("mail", code, msg.decode())
s.quit()
for _ in range(3):
    c = connect("127.0.0.4")
    if c:
        print("127.0.0.4 connect", c.noop()[0])
        c.quit()
c = connect("127.0.0.2")
print("127.0.0.2 connect", c.noop()[0])
c.quit()
for _ in range(5):
    c = connect("127.0.0.3")
    print("127.0.0.3 connect", c.noop()[0])
    c.quit()
"#;
    // The client is 127.0.0.4: the harness itself connects from 127.0.0.1 to see the server up.
    for driver in DRIVERS {
        let s = Server::start_with(
            &format!("rates-{driver}"),
            driver,
            "",
            "[rates]\nconnections_per_minute = 3\nmessages_per_minute = 2\n\
             recipients_per_minute = 4\nburst_percent = 100\nexempt = [\"127.0.0.3/32\"]\n",
        );
        let text = stdout(&python(CLIENT, s.inbound.port(), 0));
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            [
                "mail 250",
                "rcpts [250, 250]",
                "mail 250",
                "rcpts [250, 250, 450]",
                "mail 450 4.7.1 Too many messages from your network, try again later",
                "127.0.0.4 connect 250",
                "127.0.0.4 connect 250",
                "127.0.0.4 connect 421 4.7.0 Too many connections from your network, try again later",
                "127.0.0.2 connect 250",
                "127.0.0.3 connect 250",
                "127.0.0.3 connect 250",
                "127.0.0.3 connect 250",
                "127.0.0.3 connect 250",
                "127.0.0.3 connect 250",
            ],
            "[{driver}]"
        );
        assert!(
            s.admin_get("/metrics")
                .1
                .contains("reason=\"rate_limited\"} 3"),
            "[{driver}]"
        );
        let why = stdout(&s.cli(&["why", "127.0.0.3"]));
        assert!(why.contains("rate connections: exempt"), "[{driver}] {why}");
        let why = stdout(&s.cli(&["why", "127.0.0.9"]));
        assert!(
            why.contains("rate connections: 0 counted now")
                && why.contains("rate unknown recipients: not limited"),
            "[{driver}] {why}"
        );
    }
}

/// dnsmasq with `args`, forwarding slow.test to a UDP socket nobody reads (kept as long as
/// the server is).
fn with_silent_list(args: &[&str]) -> (std::net::UdpSocket, support::Dnsmasq) {
    let blackhole = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let slow = format!(
        "--server=/slow.test/127.0.0.1#{}",
        blackhole.local_addr().unwrap().port()
    );
    let mut all = vec![slow.as_str()];
    all.extend_from_slice(args);
    let dns = support::Dnsmasq::start(&all);
    (blackhole, dns)
}

/// `[dnsbl]` with dnsmasq serving the lists on loopback: a client listed with enough weight
/// is refused before its first command naming the list (again from the cache); an allow
/// list's negative weight, a pattern that does not match, and no listing let clients in.
#[test]
fn dns_block_and_allow_lists() {
    // A list whose server never answers counts as "not listed" after [dnsbl] timeout.
    let (_blackhole, dns) = with_silent_list(&[
        "--local-ttl=300",
        "--local=/zen.test/",
        "--local=/wl.test/",
        "--local=/bl.test/",
        "--host-record=4.0.0.127.zen.test,127.0.0.2",
        "--host-record=5.0.0.127.zen.test,127.0.0.2",
        "--host-record=5.0.0.127.wl.test,127.0.0.2",
        "--host-record=6.0.0.127.bl.test,127.0.0.20",
    ]);
    let connect = connect_from(&[
        "127.0.0.4",
        "127.0.0.5",
        "127.0.0.6",
        "127.0.0.7",
        "127.0.0.4",
    ]);
    for driver in DRIVERS {
        let s = Server::start_with(
            &format!("dnsbl-{driver}"),
            driver,
            "",
            &format!(
                "[dns]\nservers = [\"127.0.0.1:{}\"]\n[dnsbl]\nthreshold = 2\ntimeout = \"500ms\"\n\
                 lists = [\"zen.test*2\", \"wl.test*-5\", \"bl.test=127.0.0.[2..11]*3\", \"slow.test*9\"]\n",
                dns.port
            ),
        );
        let text = stdout(&python(&connect, s.inbound.port(), 0));
        let refused = "554 5.7.1 Service unavailable; client blocked using zen.test";
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            [
                format!("127.0.0.4 {refused}"),
                "127.0.0.5 250".to_string(),
                "127.0.0.6 250".to_string(),
                "127.0.0.7 250".to_string(),
                format!("127.0.0.4 {refused}"),
            ],
            "[{driver}]"
        );
        assert!(
            s.admin_get("/metrics").1.contains("reason=\"dnsbl\"} 2"),
            "[{driver}]"
        );
        // `ringmx why` shows the cached verdicts.
        let why = stdout(&s.cli(&["why", "127.0.0.4"]));
        assert!(
            why.contains(&format!("dnsbl: listed: {refused} (cached ")),
            "[{driver}] {why}"
        );
        let why = stdout(&s.cli(&["why", "127.0.0.5"]));
        assert!(
            why.contains("dnsbl: not listed (cached "),
            "[{driver}] {why}"
        );
    }
}

/// A list that stops answering, while a crowd of new clients connects at once: every lookup
/// waits as a task on the resolver's runtime, none for one of the few policy workers, so all
/// of them end within about the list's timeout (each client's "not listed" is remembered)
/// instead of queueing behind the others, four at a time (32 clients: 8 s).
#[test]
fn a_silent_list_does_not_queue_a_crowd_of_clients() {
    let (_blackhole, dns) = with_silent_list(&[]);
    let sources: Vec<String> = (30..62).map(|i| format!("127.0.0.{i}")).collect();
    // All at once, one thread each.
    let crowd = format!(
        r#"
import os, smtplib, threading
def one(src):
    with smtplib.SMTP("127.0.0.1", int(os.environ["PORT"]), source_address=(src, 0), timeout=20) as s:
        s.noop()
ts = [threading.Thread(target=one, args=(src,)) for src in {sources:?}]
for t in ts: t.start()
for t in ts: t.join()
print("done")
"#
    );
    for driver in DRIVERS {
        let s = Server::start_with(
            &format!("dnsbl-crowd-{driver}"),
            driver,
            "",
            &format!(
                "[dns]\nservers = [\"127.0.0.1:{}\"]\n[dnsbl]\ntimeout = \"1s\"\nlists = [\"slow.test\"]\n",
                dns.port
            ),
        );
        let start = std::time::Instant::now();
        assert_eq!(stdout(&python(&crowd, s.inbound.port(), 0)).trim(), "done");
        // Timeout 1 s: 5 s leaves room for a loaded machine, not for eight rounds of four.
        let deadline = start + std::time::Duration::from_secs(5);
        for src in &sources {
            loop {
                let why = stdout(&s.cli(&["why", src]));
                if why.contains("dnsbl: not listed (cached ") {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "[{driver}] {src}: {why}\n{}",
                    s.log()
                );
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

/// `greet_delay`: a `220-` first line, a client that talks before the last one is refused and
/// remembered, one that waits is remembered as good and greeted at once next time; a HELO
/// client that pipelines is refused and remembered too. The binding's own hostname and banner.
#[test]
fn early_talkers_and_the_greeting_delay() {
    const CLIENT: &str = r#"
import os, smtplib, socket
port = int(os.environ["PORT"])
def raw(src):
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(src, 0))
    return s, s.makefile("rb")
def line(f):
    return f.readline().decode().rstrip()
s, f = raw("127.0.0.6")
print("first", line(f))
s.sendall(b"EHLO early.test\r\n")
print("talker", line(f))
print("closed", f.read() == b"")
s, f = raw("127.0.0.6")
print("again", line(f))
s, f = raw("127.0.0.7")
print("waiter0", line(f), "|", line(f))
s.close()
s, f = raw("127.0.0.7")
print("waiter1", line(f))
s.close()
with smtplib.SMTP("127.0.0.1", port, source_address=("127.0.0.9", 0), timeout=10) as c:
    print("smtplib", c.sendmail("a@remote.test", ["u@example.test"], b"Subject: waited\r\n\r\nhi\r\n"))
s, f = raw("127.0.0.8")
print("helo", line(f), line(f))
s.sendall(b"HELO pipe.test\r\nMAIL FROM:<a@remote.test>\r\n")
print("pipelined", line(f), "|", line(f))
print("pipelined closed", f.read() == b"")
s, f = raw("127.0.0.8")
print("pipelined again", line(f))
"#;
    for driver in DRIVERS {
        let s = Server::start_with(
            &format!("greet-{driver}"),
            driver,
            "greet_delay = \"1s\"\nhostname = \"edge.test\"\nbanner = \"hello\"\n",
            "",
        );
        let out = python(CLIENT, s.inbound.port(), 0);
        let text = stdout(&out);
        assert!(
            out.status.success(),
            "[{driver}] {text}\n{}",
            support::stderr(&out)
        );
        let refused = "554 5.5.0 Protocol error: talking before the greeting, closing connection";
        for want in [
            "first 220-edge.test ESMTP hello".to_string(),
            format!("talker {refused}"),
            "closed True".into(),
            format!("again {refused}"),
            // The first wait, then greeted at once.
            "waiter0 220-edge.test ESMTP hello | 220 edge.test ESMTP hello".into(),
            "waiter1 220 edge.test ESMTP hello".into(),
            "smtplib {}".into(),
            "helo 220-edge.test ESMTP hello 220 edge.test ESMTP hello".into(),
            "pipelined 250 edge.test | 554 5.5.0 Commands sent before their replies without PIPELINING, closing connection".into(),
            "pipelined closed True".into(),
            format!("pipelined again {refused}"),
        ] {
            assert!(text.lines().any(|l| l == want), "[{driver}] {want:?} in {text}");
        }
        let metrics = s.admin_get("/metrics").1;
        for want in [
            "reason=\"early_talker\"} 3",
            "reason=\"unoffered_pipelining\"} 1",
        ] {
            assert!(metrics.contains(want), "[{driver}] {want} in {metrics}");
        }
        // `ringmx why` shows the memory; --forget lets the client be greeted afresh.
        let why = |ip: &str, more: &[&str]| {
            let out = s.cli(&[&["why", ip], more].concat());
            assert!(out.status.success(), "{}", support::stderr(&out));
            stdout(&out)
        };
        let talker = why("127.0.0.6", &[]);
        assert!(
            talker.contains("greeting test: talked early or pipelined without the offer")
                && talker.contains("binding inbound: may connect")
                && talker.contains("dnsbl: off"),
            "[{driver}] {talker}"
        );
        assert!(
            why("127.0.0.7", &[]).contains("greeting test: passed"),
            "[{driver}]"
        );
        assert!(why("127.0.0.6", &["--forget"]).contains("forgotten"));
        assert!(why("127.0.0.6", &[]).contains("greeting test: nothing remembered"));
        let out = python(
            r#"
import os, socket
s = socket.create_connection(("127.0.0.1", int(os.environ["PORT"])), timeout=10, source_address=("127.0.0.6", 0))
print(s.makefile("rb").readline().decode().rstrip())
"#,
            s.inbound.port(),
            0,
        );
        assert_eq!(
            stdout(&out).trim(),
            "220-edge.test ESMTP hello",
            "[{driver}]"
        );
        assert!(
            s.dropped()
                .iter()
                .any(|m| m.contains("by edge.test") && m.contains("Subject: waited")),
            "[{driver}] the Received line names the binding's hostname"
        );
    }
}

/// `[[recipients]] callout = true`: RCPT is verified by a probe to the route's next hop (an
/// aiosmtpd hop that accepts some recipients, refuses others and answers 451 for some); the
/// answers are cached (the probes are counted at the hop), survive a restart, and a hop that
/// is down gives `450 4.1.1` — or, with `unavailable = "accept"`, a 250.
#[test]
fn callouts_verify_recipients_at_the_next_hop() {
    const CLIENT: &str = r#"
import os, smtplib, sys
with smtplib.SMTP("127.0.0.1", int(os.environ["PORT"]), timeout=30) as s:
    s.ehlo("client.test")
    s.mail("sender@remote.test")
    for r in sys.argv[1:]:
        code, text = s.rcpt(r)
        print(r, code, text.decode())
"#;
    for driver in DRIVERS {
        let dir = support::temp_dir(&format!("callout-hop-{driver}"));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("rcpts.log");
        let hop = support::Sink::start(
            &dir,
            &[
                "--reject",
                "nobody",
                "--defer",
                "later",
                "--rcpt-log",
                log.to_str().unwrap(),
            ],
        );
        let routes = format!(
            "[callout]\ntimeout = \"2s\"\n\
             [[recipients]]\ndomains = [\"example.test\"]\ncallout = true\n\
             [[route]]\ndomains = [\"example.test\"]\naction = \"relay\"\n\
             next_hops = [\"127.0.0.1:{}\"]\ntls = \"none\"\n",
            hop.port
        );
        let mut s = Server::start_with(&format!("callout-{driver}"), driver, "", &routes);
        let rcpt = |s: &Server, rcpts: &[&str]| {
            let out = support::run_with_stdin(
                std::process::Command::new("python3")
                    .args(["-c", CLIENT])
                    .args(rcpts)
                    .env("PORT", s.inbound.port().to_string()),
                b"",
            );
            assert!(out.status.success(), "{}", support::stderr(&out));
            stdout(&out)
        };
        let probes = || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.strip_prefix("<>\t"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        let text = rcpt(
            &s,
            &[
                "alice@example.test",
                "nobody@example.test",
                "later@example.test",
                "Alice@example.test",
            ],
        );
        for want in [
            "alice@example.test 250",
            "nobody@example.test 550 5.1.1",
            "later@example.test 450 4.1.1 Recipient address not verified yet",
            "Alice@example.test 250",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(want)),
                "[{driver}] {want} in {text}"
            );
        }
        // One probe each: the second alice came from the cache.
        assert_eq!(
            probes(),
            [
                "alice@example.test",
                "nobody@example.test",
                "later@example.test"
            ],
            "[{driver}]"
        );
        // After a crash the answers are still known: no new probes.
        s.restart();
        let text = rcpt(&s, &["alice@example.test", "nobody@example.test"]);
        assert!(text.contains("alice@example.test 250"), "[{driver}] {text}");
        assert!(
            text.contains("nobody@example.test 550 5.1.1"),
            "[{driver}] {text}"
        );
        assert_eq!(probes().len(), 3, "[{driver}] {:?}", probes());
        // The hop goes down: an address not cached is deferred, never refused.
        drop(hop);
        let text = rcpt(&s, &["carol@example.test"]);
        assert!(
            text.contains("carol@example.test 450 4.1.1"),
            "[{driver}] {text}"
        );
        assert!(
            s.admin_get("/metrics")
                .1
                .contains("reason=\"callout_unavailable\"} 1"),
            "[{driver}]"
        );
        // With unavailable = "accept" the same is taken.
        drop(s);
        let s = Server::start_with(
            &format!("callout-accept-{driver}"),
            driver,
            "",
            &routes.replace("[callout]\n", "[callout]\nunavailable = \"accept\"\n"),
        );
        let text = rcpt(&s, &["carol@example.test"]);
        assert!(text.contains("carol@example.test 250"), "[{driver}] {text}");
    }
}
