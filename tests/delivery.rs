//! Store-and-forward with real next hops: an aiosmtpd sink (tests/support/sink.py), Postfix's
//! smtp-sink, dnsmasq for MX records. Relaying, per-recipient results and bounces, retries after
//! 4xx and after a hop that was down, TLS towards the next hop, MX resolution, the queue CLI.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{Server, Sink, free_port, queue_cli, stderr, temp_dir};

fn relay_route(domain: &str, hops: &str, more: &str) -> String {
    format!(
        "[[route]]\ndomains = [\"{domain}\"]\naction = \"relay\"\nnext_hops = [{hops}]\n{more}\n"
    )
}

/// A route relaying `domain` to 127.0.0.1:`port` in plain text.
fn plain_relay(domain: &str, port: u16) -> String {
    relay_route(domain, &format!("\"127.0.0.1:{port}\""), "tls = \"none\"")
}

const QUEUE_FAST: &str = "[queue]\nretry = [\"1s\"]\n";

/// Wait (up to 20 s) until `ringmx queue list` has a line that is deferred and contains
/// `needle`; returns that line.
fn wait_deferred(s: &Server, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, list) = queue_cli(s, &["list"]);
        assert!(ok, "{list}");
        if let Some(l) = list
            .lines()
            .find(|l| l.contains("\tdeferred\t") && l.contains(needle))
        {
            return l.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "never deferred: {list}\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Send one message through the outbound binding with smtplib; prints the refused dict.
const SEND: &str = r#"
import os, smtplib
from email.message import EmailMessage
m = EmailMessage()
m["From"] = os.environ.get("FROM") or "alice@example.test"
m["To"] = ", ".join(os.environ["TO"].split())
m["Subject"] = "relay test"
m["Message-ID"] = os.environ["MID"]
m.set_content("Hello next hop.\n.leading dot\n")
with smtplib.SMTP("127.0.0.1", int(os.environ["PORT"]), timeout=20) as s:
    print(s.send_message(m, from_addr=os.environ.get("FROM", "alice@example.test"), to_addrs=os.environ["TO"].split()))
"#;

fn send(s: &Server, from: &str, to: &str, mid: &str) {
    let out = Command::new("python3")
        .args(["-c", SEND])
        .env("PORT", s.outbound.port().to_string())
        .env("FROM", from)
        .env("TO", to)
        .env("MID", mid)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", stderr(&out), s.log());
}

#[test]
fn relays_per_recipient_and_bounces_permanent_failures() {
    let dir = temp_dir("relay-sink");
    let sink = Sink::start(&dir, &["--reject", "bad"]);
    let extra = format!("{QUEUE_FAST}{}", plain_relay("remote.test", sink.port));
    let s = Server::start_with("relay", "auto", "", &extra);
    send(
        &s,
        "alice@example.test",
        "ok1@remote.test bad@remote.test",
        "<t1@example.test>",
    );
    // A failure for a null sender is never bounced.
    send(&s, "", "bad@remote.test", "<t2@example.test>");
    let recs = sink.wait_for(1, 20);
    s.wait_queue_empty();
    assert_eq!(recs.len(), 1, "{recs:?}");
    let r = &recs[0];
    assert_eq!(r["rcpts"], serde_json::json!(["ok1@remote.test"]));
    assert_eq!(r["from"], "alice@example.test");
    assert_eq!(r["message_id"], "<t1@example.test>");
    let data = r["data"].as_str().unwrap();
    assert!(data.starts_with("Received: from "), "{data}");
    assert!(
        data.contains("by mx.test (ringmx)") && data.contains("\tid "),
        "{data}"
    );
    assert!(
        data.contains("\n.leading dot"),
        "dot-stuffing undone by the sink: {data}"
    );
    // The DSN for bad@ went back to alice (a local domain: the catch-all drop route).
    let dropped = s.dropped();
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    let dsn = &dropped[0];
    assert!(
        dsn.starts_with("X-Sender: \r\nX-Receiver: alice@example.test\r\n"),
        "{dsn}"
    );
    assert!(
        dsn.contains("multipart/report; report-type=delivery-status"),
        "{dsn}"
    );
    assert!(
        dsn.contains("Final-Recipient: rfc822; bad@remote.test\r\nAction: failed\r\nStatus: 5.1.1"),
        "{dsn}"
    );
    assert!(dsn.contains("Remote-MTA: dns; 127.0.0.1"), "{dsn}");
    assert!(
        dsn.contains("Message-ID: <t1@example.test>"),
        "original headers: {dsn}"
    );
    assert!(!dsn.contains("ok1@remote.test\r\nAction"), "{dsn}");
    let (_, metrics) = s.admin_get("/metrics");
    assert!(
        metrics.contains("ringmx_deliveries_total{result=\"delivered\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ringmx_deliveries_total{result=\"failed\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ringmx_deliveries_total{result=\"bounces_sent\"} 1"),
        "{metrics}"
    );
}

#[test]
fn temporary_failure_waits_for_retry_and_queue_cli_controls_it() {
    let dir = temp_dir("relay-retry");
    let sink = Sink::start(&dir, &["--tempfail", "1"]);
    // Retries an hour away: only the CLI makes them happen in this test.
    let extra = format!(
        "[queue]\nretry = [\"1h\"]\n{}",
        plain_relay("remote.test", sink.port)
    );
    let mut s = Server::start_with("relay-retry", "auto", "", &extra);
    send(
        &s,
        "alice@example.test",
        "r@remote.test",
        "<retry@example.test>",
    );
    let list = wait_deferred(&s, "r@remote.test");
    assert!(list.contains("451 4.3.0 please try again later"), "{list}");
    assert!(
        list.contains("<alice@example.test>\tr@remote.test"),
        "{list}"
    );
    let id = list.split('\t').next().unwrap().to_string();
    let (ok, show) = queue_cli(&s, &["show", &id]);
    assert!(
        ok && show.contains("attempts: 1") && show.contains("rcpt: <r@remote.test> pending"),
        "{show}"
    );
    // Held messages are not flushed.
    assert!(queue_cli(&s, &["hold", &id]).0);
    assert!(queue_cli(&s, &["list"]).1.contains("\theld\t"));
    assert!(queue_cli(&s, &["flush"]).1.starts_with("0 message"));
    std::thread::sleep(Duration::from_millis(300));
    assert!(sink.records().is_empty());
    // A hold survives a crash and a restart.
    s.kill9();
    s.restart();
    let list = queue_cli(&s, &["list"]).1;
    assert!(list.starts_with(&format!("{id}\theld\t")), "{list}");
    assert!(queue_cli(&s, &["flush"]).1.starts_with("0 message"));
    // Released: delivered at once.
    assert!(queue_cli(&s, &["release", &id]).0);
    let recs = sink.wait_for(1, 20);
    assert_eq!(recs.len(), 1, "{}", s.log());
    s.wait_queue_empty();
    let (ok, out) = queue_cli(&s, &["show", &id]);
    assert!(!ok && out.contains("no such message"), "{out}");
    // Deleted: gone without a bounce (the hop is down from now on).
    drop(sink);
    send(
        &s,
        "alice@example.test",
        "gone@remote.test",
        "<del@example.test>",
    );
    let line = wait_deferred(&s, "gone@remote.test");
    let id = line.split('\t').next().unwrap().to_string();
    assert!(queue_cli(&s, &["delete", &id]).0);
    assert_eq!(queue_cli(&s, &["list"]).1, "");
    assert!(s.dropped().is_empty(), "no bounce for a deleted message");
}

#[test]
fn hop_down_then_up_and_fallback_to_the_next_hop() {
    let dir = temp_dir("relay-down");
    let (later_socket, later) = support::refusing_port();
    let up = Sink::start(&dir, &[]);
    let (_dead_socket, dead) = support::refusing_port();
    let extra = format!(
        "{QUEUE_FAST}{}{}",
        plain_relay("later.test", later),
        relay_route(
            "fallback.test",
            &format!("\"127.0.0.1:{dead}\", \"127.0.0.1:{}\"", up.port),
            "tls = \"none\""
        ),
    );
    let s = Server::start_with("relay-down", "auto", "", &extra);
    // First hop refuses connections: the second one takes the message in the same attempt.
    send(
        &s,
        "alice@example.test",
        "x@fallback.test",
        "<fb@example.test>",
    );
    assert_eq!(up.wait_for(1, 20).len(), 1, "{}", s.log());
    // Nothing listens yet: deferred with the connection error.
    send(
        &s,
        "alice@example.test",
        "y@later.test",
        "<later@example.test>",
    );
    let line = wait_deferred(&s, "y@later.test");
    assert!(line.contains("connect to 127.0.0.1"), "{line}");
    drop(later_socket);
    let sink = Sink::start_on(&dir, later, &[]);
    let recs = sink.wait_for(1, 30);
    assert_eq!(recs.len(), 1, "{}", s.log());
    assert_eq!(recs[0]["message_id"], "<later@example.test>");
    s.wait_queue_empty();
}

#[test]
fn tls_to_the_next_hop_by_policy() {
    let dir = temp_dir("relay-tls");
    support::ca_and_leaf(&dir);
    let (leaf, key, ca) = (
        dir.join("leaf.pem"),
        dir.join("leaf.key"),
        dir.join("ca.pem"),
    );
    let tls_args = ["--tls", leaf.to_str().unwrap(), key.to_str().unwrap()];
    let strict = Sink::start(&dir, &[&tls_args[..], &["--require-tls"]].concat());
    let offers = Sink::start(&dir, &tls_args);
    let plain = Sink::start(&dir, &[]);
    let extra = format!(
        "{QUEUE_FAST}{}{}{}",
        relay_route(
            "required.test",
            &format!("\"127.0.0.1:{}\"", strict.port),
            &format!("tls = \"required\"\ntls_ca_file = \"{}\"", ca.display())
        ),
        relay_route(
            "opportunistic.test",
            &format!("\"127.0.0.1:{}\"", offers.port),
            ""
        ),
        relay_route(
            "plain.test",
            &format!("\"127.0.0.1:{}\"", plain.port),
            "tls = \"required\"\ntls_verify = false"
        ),
    );
    let s = Server::start_with("relay-tls", "auto", "", &extra);
    send(
        &s,
        "alice@example.test",
        "a@required.test",
        "<req@example.test>",
    );
    send(
        &s,
        "alice@example.test",
        "b@opportunistic.test",
        "<opp@example.test>",
    );
    send(
        &s,
        "alice@example.test",
        "c@plain.test",
        "<plain@example.test>",
    );
    let r = strict.wait_for(1, 20);
    assert_eq!(r.len(), 1, "{}", s.log());
    assert_eq!(r[0]["tls"], true);
    // A message far bigger than rustls's buffer of records (64 KiB) goes over TLS whole.
    let big = r#"
import os, smtplib
body = "".join("line %06d of a message of a megabyte\r\n" % i for i in range(26000))
m = "From: alice@example.test\r\nSubject: big\r\nMessage-ID: <big@example.test>\r\n\r\n" + body
with smtplib.SMTP("127.0.0.1", int(os.environ["PORT"]), timeout=60) as s:
    s.sendmail("alice@example.test", ["big@opportunistic.test"], m)
"#;
    let out = support::python(big, s.outbound.port(), 0);
    assert!(out.status.success(), "{}", stderr(&out));
    let r = offers.wait_for(2, 20);
    assert_eq!(r.len(), 2, "{}", s.log());
    assert!(
        r.iter().all(|r| r["tls"] == true),
        "opportunistic TLS used when offered"
    );
    let big = r
        .iter()
        .find(|r| r["message_id"] == "<big@example.test>")
        .unwrap();
    let data = big["data"].as_str().unwrap();
    assert!(
        data.len() > 1_000_000 && data.contains("line 025999 of a message"),
        "{}",
        data.len()
    );
    // TLS required, the hop offers none: kept, never sent in plain text.
    let line = wait_deferred(&s, "c@plain.test");
    assert!(line.contains("TLS required"), "{line}");
    assert!(plain.records().is_empty());
}

#[test]
fn tls_verification_failure_defers() {
    let dir = temp_dir("relay-tls-verify");
    support::ca_and_leaf(&dir);
    let other = support::Certs::new();
    let (leaf, key) = (dir.join("leaf.pem"), dir.join("leaf.key"));
    let sink = Sink::start(
        &dir,
        &["--tls", leaf.to_str().unwrap(), key.to_str().unwrap()],
    );
    let extra = format!(
        "{QUEUE_FAST}{}",
        relay_route(
            "remote.test",
            &format!("\"127.0.0.1:{}\"", sink.port),
            &format!(
                "tls = \"required\"\ntls_ca_file = \"{}\"",
                other.cert.display()
            )
        ),
    );
    let s = Server::start_with("relay-tls-verify", "auto", "", &extra);
    send(
        &s,
        "alice@example.test",
        "a@remote.test",
        "<v@example.test>",
    );
    let line = wait_deferred(&s, "a@remote.test");
    assert!(line.contains("TLS handshake"), "{line}");
    assert!(sink.records().is_empty());
}

#[test]
fn mx_records_from_a_loopback_dns_server() {
    let dir = temp_dir("relay-mx");
    let (ignored_dir, used_dir) = (dir.join("ignored"), dir.join("used"));
    std::fs::create_dir_all(&ignored_dir).unwrap();
    std::fs::create_dir_all(&used_dir).unwrap();
    // The same port on two loopback addresses: MX hosts share mx_port.
    let sink = Sink::start(&used_dir, &[]);
    let skipped = Sink::start_on(&ignored_dir, sink.port, &["--host", "127.0.0.2"]);
    // many.test: ten MX hosts without an address before the one that works, which is never
    // looked up (at most ten hosts a domain).
    let many: Vec<String> = (1..=10)
        .map(|i| format!("--mx-host=many.test,none{i}.many.test,{i}"))
        .chain([
            "--mx-host=many.test,mail.many.test,11".to_string(),
            "--host-record=mail.many.test,127.0.0.1".to_string(),
        ])
        .collect();
    let mut records: Vec<&str> = many.iter().map(String::as_str).collect();
    records.extend([
        // Preference 5 has no address; 7 is in mx_ignore; 10 is the one that works.
        "--mx-host=mxdomain.test,broken.mxdomain.test,5",
        "--mx-host=mxdomain.test,inside.mxdomain.test,7",
        "--host-record=inside.mxdomain.test,127.0.0.2",
        "--mx-host=mxdomain.test,mail.mxdomain.test,10",
        "--host-record=mail.mxdomain.test,127.0.0.1",
        // An MX that points at this host (the default mx_ignore), and one at a link-local
        // address (a cloud metadata service).
        "--mx-host=self.test,localhost.self.test,10",
        "--host-record=localhost.self.test,127.0.0.1",
        "--mx-host=meta.test,metadata.meta.test,10",
        "--host-record=metadata.meta.test,169.254.169.254",
    ]);
    let dns = support::Dnsmasq::start(&records);
    let dns_port = dns.port;
    let mx = |domain: &str, more: &str| {
        relay_route(
            domain,
            "\"mx\"",
            &format!("mx_port = {}\ntls = \"none\"\n{more}", sink.port),
        )
    };
    let extra = format!(
        "{QUEUE_FAST}[dns]\nservers = [\"127.0.0.1:{dns_port}\"]\n{}{}{}{}",
        mx("mxdomain.test", "mx_ignore = [\"127.0.0.2\"]"),
        mx("self.test", ""),
        mx("meta.test", ""),
        mx("many.test", "mx_ignore = []"),
    );
    let s = Server::start_with("relay-mx", "auto", "", &extra);
    send(
        &s,
        "alice@example.test",
        "u@mxdomain.test",
        "<mx@example.test>",
    );
    let recs = sink.wait_for(1, 20);
    assert_eq!(recs.len(), 1, "{}", s.log());
    assert_eq!(recs[0]["rcpts"], serde_json::json!(["u@mxdomain.test"]));
    assert!(skipped.records().is_empty(), "{:?}", skipped.records());
    // With the default mx_ignore, mail for a domain whose MX is this host, or a link-local
    // address, is not sent there: it fails at once, and alice gets the bounce.
    send(
        &s,
        "alice@example.test",
        "u@self.test u@meta.test",
        "<self@example.test>",
    );
    s.wait_queue_empty();
    let dropped = s.dropped();
    for domain in ["self.test", "meta.test"] {
        let status =
            format!("Final-Recipient: rfc822; u@{domain}\r\nAction: failed\r\nStatus: 5.4.4");
        assert!(
            dropped.iter().any(|d| d.contains(&status)),
            "{domain}: {dropped:?}\n{}",
            s.log()
        );
    }
    assert_eq!(sink.records().len(), 1, "{}", s.log());
    assert!(
        s.log().contains("MX addresses skipped (mx_ignore)"),
        "{}",
        s.log()
    );
    send(
        &s,
        "alice@example.test",
        "u@many.test",
        "<many@example.test>",
    );
    let line = wait_deferred(&s, "u@many.test");
    assert!(
        line.contains("no address for the mail hosts of many.test"),
        "{line}"
    );
    assert_eq!(sink.records().len(), 1, "{}", s.log());
    drop(dns);
}

/// Wait (up to `secs`) for a file in the drop folder that contains `needle`; fails with `what`.
fn wait_dropped(s: &Server, needle: &str, secs: u64, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let found = std::fs::read_dir(&s.drop_dir).ok().and_then(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .find(|f| f.contains(needle))
        });
        if let Some(f) = found {
            return f;
        }
        assert!(Instant::now() < deadline, "{what}\n{}", s.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Postfix's smtp-sink on a free port, dumping every transaction (envelope arguments
/// included) into `dir/dump`: (child, port, dump folder).
fn smtp_sink(dir: &std::path::Path) -> (Child, u16, std::path::PathBuf) {
    let dump = dir.join("dump");
    std::fs::create_dir_all(&dump).unwrap();
    Command::new("chmod")
        .arg("777")
        .arg(&dump)
        .status()
        .unwrap();
    let port = free_port();
    let child = support::peer("smtp-sink")
        .args(["-u", "nobody", "-d"])
        .arg(format!("{}/%H%M%S.", dump.display()))
        .arg(format!("127.0.0.1:{port}"))
        .arg("100")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    (child, port, dump)
}

#[test]
fn relays_to_postfix_smtp_sink_over_reused_connections() {
    let dir = temp_dir("relay-smtp-sink");
    let (mut sink, port, dump) = smtp_sink(&dir);
    let extra = format!("{QUEUE_FAST}{}", plain_relay("remote.test", port));
    let s = Server::start_with("relay-smtp-sink", "auto", "", &extra);
    // The first 10 one at a time, each sent once the queue is empty again (so the connection
    // is back in the pool); the other 30 back to back.
    let script = r#"
import os, smtplib, time, urllib.request
def queued():
    m = urllib.request.urlopen("http://%s/metrics" % os.environ["ADMIN"]).read().decode()
    return sum(int(l.split()[-1]) for l in m.splitlines() if l.startswith('ringmx_queue_messages{state="active"}'))
with smtplib.SMTP("127.0.0.1", int(os.environ["PORT"]), timeout=20) as s:
    for i in range(40):
        s.sendmail("alice@example.test", ["u%d@remote.test" % i], "Message-ID: <%d@x>\r\nSubject: %d\r\n\r\nbody\r\n" % (i, i))
        deadline = time.time() + 10
        while i < 10 and queued() > 0 and time.time() < deadline:
            time.sleep(0.01)
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .env("PORT", s.outbound.port().to_string())
        .env("ADMIN", s.admin.to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    s.wait_queue_empty();
    let files: Vec<_> = std::fs::read_dir(&dump).unwrap().flatten().collect();
    let _ = sink.kill();
    let _ = sink.wait();
    assert_eq!(files.len(), 40, "{}", s.log());
    // Every message went over an opened or a reused connection; the sequential ones reused.
    let (_, metrics) = s.admin_get("/metrics");
    let count = |event: &str| -> u64 {
        let prefix = format!("ringmx_relay_connections_total{{event=\"{event}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let (opened, reused) = (count("opened"), count("reused"));
    assert_eq!(opened + reused, 40, "{metrics}");
    assert!(
        reused >= 9 && opened <= 31,
        "{opened} opened, {reused} reused"
    );
    let all: String = files
        .iter()
        .map(|f| std::fs::read_to_string(f.path()).unwrap())
        .collect();
    for i in 0..40 {
        assert!(
            all.contains(&format!("Message-ID: <{i}@x>")),
            "message {i} missing"
        );
    }
}

#[test]
fn smart_host_auth_and_source_address_per_sender_domain() {
    let dir = temp_dir("relay-auth");
    support::ca_and_leaf(&dir);
    let (leaf, key) = (dir.join("leaf.pem"), dir.join("leaf.key"));
    let sink = Sink::start(
        &dir,
        &[
            "--tls",
            leaf.to_str().unwrap(),
            key.to_str().unwrap(),
            "--auth",
            "edge:s3cret pw",
        ],
    );
    std::fs::write(dir.join("smarthost.pass"), "s3cret pw\n").unwrap();
    let extra = format!(
        "{QUEUE_FAST}{}[route.source_ip]\n\"example.test\" = \"127.0.0.2\"\n\"*\" = \"127.0.0.3\"\n",
        relay_route(
            "remote.test",
            &format!("\"127.0.0.1:{}\"", sink.port),
            &format!(
                "tls = \"required\"\ntls_verify = false\nauth_user = \"edge\"\nauth_password_file = \"{}\"",
                dir.join("smarthost.pass").display()
            )
        ),
    );
    let s = Server::start_with("relay-auth", "auto", "", &extra);
    send(
        &s,
        "alice@example.test",
        "a@remote.test",
        "<auth1@example.test>",
    );
    send(
        &s,
        "bob@elsewhere.test",
        "b@remote.test",
        "<auth2@example.test>",
    );
    let recs = sink.wait_for(2, 20);
    assert_eq!(recs.len(), 2, "{}", s.log());
    for r in &recs {
        assert_eq!(r["auth"], "edge", "{r}");
        assert_eq!(r["tls"], true);
        let want = if r["from"] == "alice@example.test" {
            "127.0.0.2"
        } else {
            "127.0.0.3"
        };
        assert_eq!(r["peer"], want, "source address by sender domain: {r}");
    }
}

#[test]
fn bdat_to_a_chunking_next_hop() {
    // ringmx itself offers CHUNKING + PIPELINING: the relay client sends BDAT.
    let hop = Server::start("relay-bdat-hop", "auto");
    let extra = relay_route(
        "remote.test",
        &format!("\"{}\"", hop.outbound),
        "tls = \"none\"",
    );
    let s = Server::start_with("relay-bdat", "auto", "", &extra);
    send(
        &s,
        "alice@example.test",
        "x@remote.test",
        "<bdat@example.test>",
    );
    s.wait_queue_empty();
    let files = hop.dropped();
    assert_eq!(files.len(), 1, "{}", s.log());
    assert!(
        files[0].contains("Message-ID: <bdat@example.test>"),
        "{}",
        files[0]
    );
    assert!(
        files[0].contains("\n.leading dot"),
        "BDAT carries the content unstuffed"
    );
    // Two Received headers: ours at the first hop, then the next hop's.
    assert_eq!(
        files[0].matches("Received: from").count(),
        2,
        "{}",
        files[0]
    );
}

#[test]
fn delay_notice_while_the_hop_stays_down() {
    let dir = temp_dir("relay-delay");
    let (later_socket, later) = support::refusing_port();
    let extra = format!(
        "[queue]\nretry = [\"1s\"]\ndelay_notice = \"1s\"\n{}",
        plain_relay("later.test", later)
    );
    let s = Server::start_with("relay-delay", "auto", "", &extra);
    send(
        &s,
        "alice@example.test",
        "y@later.test",
        "<delay@example.test>",
    );
    // One "delayed" notice, once, while it keeps being retried.
    let notice = wait_dropped(&s, "", 20, "no delay notice");
    assert!(notice.contains("Action: delayed"), "{notice}");
    assert!(notice.contains("Subject: Delayed Mail"), "{notice}");
    drop(later_socket);
    let sink = Sink::start_on(&dir, later, &[]);
    assert_eq!(sink.wait_for(1, 20).len(), 1, "{}", s.log());
    s.wait_queue_empty();
    assert_eq!(
        std::fs::read_dir(&s.drop_dir).unwrap().count(),
        1,
        "only one notice"
    );
}

/// A next hop that answers STARTTLS with 220 and, in the same packet, a forged reply.
const INJECTING_HOP: &str = r#"
import os, socket
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", int(os.environ["PORT"]))); l.listen(5)
print("ready", flush=True)
c, _ = l.accept()
f = c.makefile("rb")
c.sendall(b"220 evil ESMTP\r\n")
f.readline()
c.sendall(b"250-evil\r\n250 STARTTLS\r\n")
f.readline()
c.sendall(b"220 go ahead\r\n250 injected\r\n")
print("closed" if c.recv(10) == b"" else "kept", flush=True)
"#;

#[test]
fn bytes_after_the_starttls_reply_drop_the_connection() {
    use std::io::BufRead;
    let port = free_port();
    let mut hop = Command::new("python3")
        .args(["-c", INJECTING_HOP])
        .env("PORT", port.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(hop.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let extra = format!(
        "{QUEUE_FAST}{}",
        relay_route(
            "remote.test",
            &format!("\"127.0.0.1:{port}\""),
            "tls = \"opportunistic\""
        )
    );
    let s = Server::start_with("relay-inject", "auto", "", &extra);
    send(
        &s,
        "alice@example.test",
        "x@remote.test",
        "<inject@example.test>",
    );
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(
        line.trim(),
        "closed",
        "ringmx closed without a TLS handshake"
    );
    let _ = hop.wait();
    let list = queue_cli(&s, &["list"]).1;
    assert!(
        list.contains("data after the STARTTLS reply"),
        "{list}\n{}",
        s.log()
    );
}

/// A hop given without a port is tried on port 25 (here: refused, nothing listens on
/// 127.0.0.2:25); after `queue.max_lifetime` the message expires and the sender gets a DSN with
/// status 4.4.7 for the recipient.
#[test]
fn default_port_and_expiry_after_max_lifetime() {
    let extra = format!(
        "[queue]\nretry = [\"1s\"]\nmax_lifetime = \"3s\"\n{}",
        relay_route("expire.test", "\"127.0.0.2\"", "tls = \"none\"")
    );
    let s = Server::start_with("relay-expire", "auto", "", &extra);
    send(
        &s,
        "alice@example.test",
        "z@expire.test",
        "<expire@example.test>",
    );
    let line = wait_deferred(&s, "z@expire.test");
    assert!(line.contains("127.0.0.2:25"), "{line}");
    let bounce = wait_dropped(&s, "", 20, "no expiry bounce");
    assert!(
        bounce.contains("X-Receiver: alice@example.test"),
        "{bounce}"
    );
    assert!(
        bounce.contains("Final-Recipient: rfc822; z@expire.test"),
        "{bounce}"
    );
    assert!(bounce.contains("Action: failed"), "{bounce}");
    assert!(bounce.contains("Status: 4.4.7"), "{bounce}");
    assert!(
        bounce.contains("Message-ID: <expire@example.test>"),
        "{bounce}"
    );
    s.wait_queue_empty();
}

/// RFC 3461 end to end with smtplib as the client: RET, ENVID, NOTIFY and ORCPT go on to a hop
/// that offers DSN (Postfix's smtp-sink, which records the arguments); a hop without DSN
/// (aiosmtpd) gets plain commands and the sender a "relayed" notice where it asked for success
/// notices; NOTIFY=NEVER suppresses the bounce; a bounce carries Original-Envelope-Id,
/// Original-Recipient and, for RET=FULL, the whole message.
#[test]
fn dsn_parameters_are_honoured_and_passed_on() {
    let dir = temp_dir("relay-dsn");
    let (mut smtp_sink, port, dump) = smtp_sink(&dir);
    let plain = Sink::start(&dir, &["--reject", "bad"]);
    let extra = format!(
        "{QUEUE_FAST}{}{}",
        plain_relay("dsn.test", port),
        plain_relay("plain.test", plain.port),
    );
    let s = Server::start_with("relay-dsn", "auto", "", &extra);
    let script = r#"
import os, smtplib
with smtplib.SMTP("127.0.0.1", int(os.environ["PORT"]), timeout=20) as s:
    s.ehlo("client.test")
    print(s.mail("alice@example.test", ["RET=FULL", "ENVID=env+2B1"]))
    print(s.rcpt("a@dsn.test", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;orig-a@dsn.test"]))
    print(s.rcpt("b@plain.test", ["NOTIFY=SUCCESS", "ORCPT=rfc822;orig-b@plain.test"]))
    print(s.rcpt("bad1@plain.test", ["NOTIFY=NEVER"]))
    print(s.rcpt("bad2@plain.test", ["NOTIFY=FAILURE", "ORCPT=rfc822;orig-bad2@plain.test"]))
    print(s.data(b"Message-ID: <dsn@example.test>\r\nSubject: dsn\r\n\r\nthe whole body\r\n"))
"#;
    let out = support::python(script, s.outbound.port(), 0);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(plain.wait_for(1, 20).len(), 1, "{}", s.log());
    s.wait_queue_empty();
    // Passed on to the DSN hop.
    let dumped: String = std::fs::read_dir(&dump)
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect();
    assert!(
        dumped.contains("X-Mail-Args: <alice@example.test>"),
        "{dumped}"
    );
    assert!(dumped.contains("RET=FULL ENVID=env+2B1"), "{dumped}");
    assert!(
        dumped.contains(
            "X-Rcpt-Args: <a@dsn.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;orig-a@dsn.test"
        ),
        "{dumped}"
    );
    // Notices to alice (dropped into the folder: example.test is local).
    let notices: Vec<String> = s.dropped();
    assert_eq!(
        notices.len(),
        2,
        "a relayed notice and one bounce: {notices:?}"
    );
    let relayed = notices
        .iter()
        .find(|n| n.contains("Action: relayed"))
        .unwrap();
    assert!(
        relayed.contains(
            "Original-Recipient: rfc822;orig-b@plain.test\r\nFinal-Recipient: rfc822; b@plain.test"
        ),
        "{relayed}"
    );
    assert!(relayed.contains("Original-Envelope-Id: env+1"), "{relayed}");
    assert!(
        !relayed.contains("a@dsn.test"),
        "the DSN hop reports for a@dsn.test itself"
    );
    let bounce = notices
        .iter()
        .find(|n| n.contains("Action: failed"))
        .unwrap();
    assert!(
        bounce.contains("Final-Recipient: rfc822; bad2@plain.test"),
        "{bounce}"
    );
    assert!(
        bounce.contains("Original-Recipient: rfc822;orig-bad2@plain.test"),
        "{bounce}"
    );
    assert!(
        !bounce.contains("bad1@plain.test"),
        "NOTIFY=NEVER: {bounce}"
    );
    assert!(
        bounce.contains("Content-Type: message/rfc822"),
        "RET=FULL: {bounce}"
    );
    assert!(bounce.contains("the whole body"), "{bounce}");
    let _ = smtp_sink.kill();
    let _ = smtp_sink.wait();
}

/// Backscatter: where the inbound binding verifies senders, one that SPF did not pass for
/// (here no DNS answers at all: temperror) may ask for failure notices only, with headers
/// only, also of the next hop: Postfix's smtp-sink records NOTIFY=FAILURE (none given),
/// NOTIFY=NEVER (SUCCESS only) and RET=HDRS (FULL asked). With the binding not verifying,
/// the request goes on as made.
#[test]
fn a_sender_spf_did_not_vouch_for_asks_for_failures_only() {
    for verify in [true, false] {
        let dir = temp_dir("relay-unverified");
        let (mut smtp_sink, port, dump) = smtp_sink(&dir);
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let extra = format!(
            "{QUEUE_FAST}[dns]\nservers = [\"{}\"]\n[authentication]\nverify = {verify}\ntimeout = \"1s\"\n{}",
            silent.local_addr().unwrap(),
            plain_relay("example.test", port)
        );
        let s = Server::start_with("relay-unverified", "auto", "", &extra);
        let script = r#"
import os, smtplib
with smtplib.SMTP("127.0.0.1", int(os.environ["PORT"]), timeout=20) as s:
    s.ehlo("client.test")
    print(s.mail("bob@forged.test", ["RET=FULL"]))
    print(s.rcpt("a@example.test"))
    print(s.rcpt("b@example.test", ["NOTIFY=SUCCESS"]))
    print(s.rcpt("c@example.test", ["NOTIFY=SUCCESS,FAILURE,DELAY"]))
    print(s.data(b"Subject: reflect\r\n\r\nbody\r\n"))
"#;
        let out = support::python(script, s.inbound.port(), 0);
        assert!(out.status.success(), "{}", stderr(&out));
        s.wait_queue_empty();
        let dumped: String = std::fs::read_dir(&dump)
            .unwrap()
            .flatten()
            .map(|e| std::fs::read_to_string(e.path()).unwrap())
            .collect();
        let _ = smtp_sink.kill();
        let _ = smtp_sink.wait();
        let want: [&str; 4] = if verify {
            [
                "X-Mail-Args: <bob@forged.test> RET=HDRS",
                "X-Rcpt-Args: <a@example.test> NOTIFY=FAILURE",
                "X-Rcpt-Args: <b@example.test> NOTIFY=NEVER",
                "X-Rcpt-Args: <c@example.test> NOTIFY=FAILURE",
            ]
        } else {
            [
                "X-Mail-Args: <bob@forged.test> RET=FULL",
                "X-Rcpt-Args: <a@example.test>",
                "X-Rcpt-Args: <b@example.test> NOTIFY=SUCCESS",
                "X-Rcpt-Args: <c@example.test> NOTIFY=SUCCESS,FAILURE,DELAY",
            ]
        };
        for w in want {
            assert!(
                dumped
                    .lines()
                    .any(|l| l.trim_end() == w || l.starts_with(&format!("{w} "))),
                "verify={verify}: {w} in {dumped}"
            );
        }
    }
}

/// Copy-forward keeps what a recipient asked for: a message whose first recipient is delivered
/// and whose second waits for a hop that is down is copied into a new segment after a restart
/// (its old segment is then deleted), survives another `kill -9` from the copy, and expires
/// with a DSN for the second recipient under its own NOTIFY and ORCPT (the first one's
/// NOTIFY=NEVER must not move onto it).
#[test]
fn copy_forward_keeps_pending_recipients_and_their_dsn_across_restarts() {
    let dir = temp_dir("relay-copy-forward");
    std::fs::create_dir_all(&dir).unwrap();
    let up = Sink::start(&dir, &[]);
    let (_down_socket, down) = support::refusing_port();
    let extra = format!(
        "[queue]\nretry = [\"1s\"]\nmax_lifetime = \"12s\"\ncopy_forward_after = \"1s\"\n{}{}",
        plain_relay("up.test", up.port),
        plain_relay("later.test", down),
    );
    let mut s = Server::start_with("relay-copy-forward", "auto", "", &extra);
    let script = r#"
import os, smtplib
with smtplib.SMTP("127.0.0.1", int(os.environ["PORT"]), timeout=20) as s:
    s.ehlo("client.test")
    s.mail("alice@example.test")
    s.rcpt("a@up.test", ["NOTIFY=NEVER"])
    s.rcpt("b@later.test", ["NOTIFY=FAILURE", "ORCPT=rfc822;orig-b@later.test"])
    print(s.data(b"Message-ID: <cf@example.test>\r\nSubject: cf\r\n\r\nbody\r\n"))
"#;
    let out = support::python(script, s.outbound.port(), 0);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(up.wait_for(1, 20).len(), 1, "{}", s.log());
    let spool = s.dir.join("spool");
    let segments = || -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(&spool)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "seg"))
            .collect();
        v.sort();
        v
    };
    let first = segments();
    s.kill9();
    s.restart();
    // The recovered segment is not current: copy-forward moves the pending recipient on.
    let deadline = Instant::now() + Duration::from_secs(15);
    while first.iter().any(|p| p.exists()) {
        assert!(
            Instant::now() < deadline,
            "never copied forward: {:?}\n{}",
            segments(),
            s.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    s.kill9();
    s.restart();
    let bounce = wait_dropped(&s, "Action: failed", 30, "no expiry DSN after copy-forward");
    assert!(
        bounce.contains(
            "Original-Recipient: rfc822;orig-b@later.test\r\nFinal-Recipient: rfc822; b@later.test"
        ),
        "{bounce}"
    );
    assert!(bounce.contains("Status: 4.4.7"), "{bounce}");
    assert!(!bounce.contains("a@up.test\r\nAction"), "{bounce}");
}

/// Text a client chose reaches `ringmx queue` escaped: a HELO name with terminal escape
/// sequences (OSC retitle and CSI clear screen, as C1 controls) and a right-to-left override
/// is shown as `\u{…}`, never as the bytes a terminal would obey.
#[test]
fn queue_cli_escapes_what_clients_chose() {
    const HELO: &str = "\u{9d}0;pwned\u{9c}\u{9b}2J\u{202e}moc.knab";
    let s = Server::start_with(
        "queue-escapes",
        "auto",
        "",
        "[[route]]\ndomains = [\"remote.test\"]\naction = \"hold\"\n",
    );
    let mut c = support::Raw::connect(s.outbound);
    assert!(c.reply().starts_with("220"));
    let r = c.cmd(&format!("EHLO {HELO}\r\n"));
    assert!(r.starts_with("250"), "{r}");
    for (cmd, code) in [
        ("MAIL FROM:<alice@example.test>\r\n", "250"),
        ("RCPT TO:<r@remote.test>\r\n", "250"),
        ("DATA\r\n", "354"),
        ("Subject: x\r\n\r\nhi\r\n.\r\n", "250"),
    ] {
        let r = c.cmd(cmd);
        assert!(r.starts_with(code), "{cmd:?}: {r}");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let list = loop {
        let list = queue_cli(&s, &["list"]).1;
        if list.contains("\theld\t") || Instant::now() > deadline {
            break list;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let id = list.split('\t').next().unwrap().to_string();
    let (ok, show) = queue_cli(&s, &["show", &id]);
    assert!(
        ok && show.contains("(\\u{9d}0;pwned\\u{9c}\\u{9b}2J\\u{202e}moc.knab)\n"),
        "{show:?}"
    );
    assert!(!show.contains(['\u{9b}', '\u{9d}', '\u{202e}']), "{show:?}");
}

/// A next hop that answers up to `354` and then never reads again, with a small receive
/// buffer, so that the kernel cannot take the whole message for it.
const STALLING_HOP: &str = r#"
import os, socket, time
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
l.bind(("127.0.0.1", int(os.environ["PORT"]))); l.listen(5)
print("ready", flush=True)
held = []
while True:
    c, _ = l.accept()
    held.append(c)
    f = c.makefile("rb")
    c.sendall(b"220 stall ESMTP\r\n")
    while True:
        line = f.readline()
        if not line:
            break
        if line.upper().startswith(b"EHLO"):
            c.sendall(b"250-stall\r\n250 8BITMIME\r\n")
        elif line.upper().startswith(b"DATA"):
            c.sendall(b"354 go ahead\r\n")
            break
        else:
            c.sendall(b"250 ok\r\n")
"#;

/// Sends one message of 12 MiB through the outbound binding.
const SEND_BIG: &str = r#"
import os, smtplib
body = ("x" * 76 + "\r\n") * (12 * 1024 * 1024 // 78)
m = "From: alice@example.test\r\nTo: big@stall.test\r\nSubject: big\r\n\r\n" + body
with smtplib.SMTP("127.0.0.1", int(os.environ["PORT"]), timeout=60) as s:
    s.sendmail("alice@example.test", ["big@stall.test"], m)
"#;

/// A next hop that stops reading in the middle of a message does not hold the delivery for
/// ever: after a reply time limit without progress the attempt is deferred (`4.4.2`), and the
/// message stays queued for a retry.
#[test]
fn a_next_hop_that_stops_reading_is_given_up() {
    use std::io::BufRead;
    let port = free_port();
    /// Stopped when the test ends, passed or failed.
    struct Hop(Child);
    impl Drop for Hop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut hop = Hop(Command::new("python3")
        .args(["-c", STALLING_HOP])
        .env("PORT", port.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap());
    let mut out = std::io::BufReader::new(hop.0.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let extra = format!(
        "[queue]\nretry = [\"1h\"]\nreply_timeout = \"2s\"\n{}",
        plain_relay("stall.test", port)
    );
    let s = Server::start_with("relay-stall", "auto", "", &extra);
    let sent = Command::new("python3")
        .args(["-c", SEND_BIG])
        .env("PORT", s.outbound.port().to_string())
        .output()
        .unwrap();
    assert!(sent.status.success(), "{}", stderr(&sent));
    let line = wait_deferred(&s, "big@stall.test");
    assert!(
        // (Where the kernel buffers all 12 MiB for the hop, the wait is for its reply.)
        line.contains("sending stalled for 2s") || line.contains("no reply within 2s"),
        "{line}\n{}",
        s.log()
    );
}

/// MX lookups wait on the resolver's runtimes, not on the cores' blocking pools (2 threads a
/// core, which also write drop folders and read spooled content): with 16 messages for a
/// domain whose name server never answers (each lookup takes 2 tries of 2 s), a message for
/// the drop folder is still written at once (within 8 s; 14 s when the lookups held the pool).
#[test]
fn a_silent_name_server_does_not_hold_other_deliveries() {
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let extra = format!(
        "[dns]\nservers = [\"{}\"]\n{}",
        silent.local_addr().unwrap(),
        relay_route("silent.test", "\"mx\"", "tls = \"none\"")
    );
    let s = Server::start_with("relay-silent-dns", "auto", "", &extra);
    let script = r#"
import os, smtplib
with smtplib.SMTP("127.0.0.1", int(os.environ["PORT"]), timeout=20) as s:
    for i in range(16):
        s.sendmail("alice@example.test", ["x%d@silent.test" % i], b"Subject: slow\r\n\r\nbody\r\n")
"#;
    let out = support::python(script, s.outbound.port(), 0);
    assert!(out.status.success(), "{}", stderr(&out));
    let start = Instant::now();
    send(
        &s,
        "alice@example.test",
        "bob@example.test",
        "<meanwhile@example.test>",
    );
    wait_dropped(
        &s,
        "<meanwhile@example.test>",
        20,
        "the local message was never written",
    );
    let took = start.elapsed();
    // 1 s here; 14 s with the lookups on the blocking pool.
    assert!(took < Duration::from_secs(8), "{took:?}\n{}", s.log());
}
