//! The server end to end, over real sockets, with clients nobody here wrote (Python's smtplib,
//! swaks), under both runtime drivers (io_uring where the kernel allows it, and epoll).

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use support::{DRIVERS, Raw, Server, python, stderr, stdout};

const SMTPLIB_SEND: &str = r#"
import os, smtplib
port = int(os.environ["PORT"])
with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
    code, msg = s.ehlo("client.test")
    assert code == 250, (code, msg)
    feats = sorted(s.esmtp_features)
    print("features", feats)
    refused = s.sendmail("sender@b.test", ["user@example.test", "other@example.test"],
                         b"Subject: hello\r\n\r\nHello from smtplib.\r\n.leading dot\r\n")
    print("refused", refused)
    # smtplib pipelines nothing by itself; send two more on the same connection
    for i in range(2):
        s.sendmail("", ["user@example.test"], f"Subject: n{i}\r\n\r\nbody {i}\r\n".encode())
    print("ok")
"#;

#[test]
fn smtplib_delivers_to_the_drop_folder() {
    for driver in DRIVERS {
        let s = Server::start("smtplib", driver);
        let out = python(SMTPLIB_SEND, s.inbound.port(), 0);
        assert!(
            out.status.success(),
            "[{driver}] {}\n{}",
            stderr(&out),
            s.log()
        );
        let text = stdout(&out);
        assert!(
            text.contains("'pipelining'") && text.contains("'chunking'") && text.contains("'size'"),
            "{text}"
        );
        assert!(text.contains("refused {}"), "{text}");
        let files = s.dropped();
        assert_eq!(files.len(), 3, "[{driver}] {files:?}");
        let first = files
            .iter()
            .find(|f| f.contains("Subject: hello"))
            .expect("first message");
        assert!(first.starts_with("X-Sender: sender@b.test\r\nX-Receiver: user@example.test\r\nX-Receiver: other@example.test\r\nReceived: from client.test ([127.0.0.1])\r\n\tby mx.test (ringmx) with ESMTP\r\n"), "{first}");
        assert!(
            first.ends_with("Subject: hello\r\n\r\nHello from smtplib.\r\n.leading dot\r\n"),
            "dot-unstuffed: {first:?}"
        );
        assert!(
            files.iter().any(|f| f.starts_with("X-Sender: \r\n")),
            "null sender recorded as empty"
        );
        assert!(s.log().contains("result=\"queued\""), "{}", s.log());
    }
}

#[test]
fn relay_rights_per_direction() {
    let script = r#"
import os, smtplib
inbound, outbound = int(os.environ["PORT"]), int(os.environ["PORT2"])
with smtplib.SMTP("127.0.0.1", inbound, timeout=10) as s:
    try:
        s.sendmail("a@b.test", ["victim@elsewhere.test"], b"Subject: relay\r\n\r\nx\r\n")
        print("inbound relayed")
    except smtplib.SMTPRecipientsRefused as e:
        code, msg = e.recipients["victim@elsewhere.test"]
        print("inbound refused", code, msg.decode())
with smtplib.SMTP("127.0.0.1", outbound, timeout=10) as s:
    print("outbound refused", s.sendmail("me@example.test", ["friend@elsewhere.test"], b"Subject: out\r\n\r\nx\r\n"))
"#;
    for driver in DRIVERS {
        let s = Server::start("relay", driver);
        let out = python(script, s.inbound.port(), s.outbound.port());
        let text = stdout(&out);
        assert!(out.status.success(), "[{driver}] {}", stderr(&out));
        assert!(
            text.contains("inbound refused 550 5.7.1 Relaying denied"),
            "{text}"
        );
        assert!(text.contains("outbound refused {}"), "{text}");
        let files = s.dropped();
        assert_eq!(files.len(), 1);
        assert!(files[0].contains("X-Receiver: friend@elsewhere.test\r\n"));
    }
}

#[test]
fn swaks_pipelined_and_relay_attempt() {
    for driver in DRIVERS {
        let s = Server::start("swaks", driver);
        let port = s.inbound.port().to_string();
        let ok = support::peer("swaks")
            .args([
                "--server",
                &format!("127.0.0.1:{port}"),
                "--to",
                "user@example.test",
                "--from",
                "s@b.test",
                "--pipeline",
            ])
            .output()
            .unwrap();
        let t = stdout(&ok);
        assert!(ok.status.success(), "[{driver}] {t}");
        assert!(t.contains("<-  250 2.0.0 Ok: queued as "), "{t}");
        let denied = support::peer("swaks")
            .args([
                "--server",
                &format!("127.0.0.1:{port}"),
                "--to",
                "user@gmail.test",
                "--from",
                "s@b.test",
            ])
            .output()
            .unwrap();
        let t = stdout(&denied);
        assert!(t.contains("<** 550 5.7.1 Relaying denied"), "{t}");
        assert_eq!(s.dropped().len(), 1);
    }
}

#[test]
fn smuggling_attempt_is_one_rejected_message() {
    for driver in DRIVERS {
        let s = Server::start("smuggle", driver);
        let mut c = Raw::connect(s.inbound);
        assert!(c.reply().starts_with("220 mx.test"));
        c.cmd("EHLO c\r\n");
        c.start_data();
        c.send(
            "hi\n.\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<v@example.test>\r\nDATA\r\nforged\r\n.\r\n",
        );
        assert!(
            c.reply().starts_with("550 5.6.0 Bare CR or LF"),
            "[{driver}]"
        );
        assert_eq!(c.cmd("QUIT\r\n"), "221 2.0.0 Bye\r\n");
        assert!(s.dropped().is_empty());
    }
}

#[test]
fn timeout_and_connection_limits() {
    for driver in DRIVERS {
        let s = Server::start_with(
            "limits",
            driver,
            "[binding.limits]\ncommand_timeout = \"1s\"\nmax_connections_per_ip = 2\n",
            "",
        );
        let mut a = Raw::connect(s.inbound);
        let mut b = Raw::connect(s.inbound);
        assert!(a.reply().starts_with("220"));
        assert!(b.reply().starts_with("220"));
        let mut c = Raw::connect(s.inbound);
        assert_eq!(
            c.rest(),
            "421 4.7.0 Too many connections, try again later\r\n",
            "[{driver}]"
        );
        // Idle past command_timeout: 421 4.4.2 and close.
        std::thread::sleep(Duration::from_millis(1300));
        assert_eq!(
            a.rest(),
            "421 4.4.2 Timeout exceeded, closing connection\r\n"
        );
        assert_eq!(
            b.rest(),
            "421 4.4.2 Timeout exceeded, closing connection\r\n"
        );
        // Slots are given back.
        let mut d = Raw::connect(s.inbound);
        assert!(d.reply().starts_with("220"));
    }
}

/// A client that sends commands and never reads the replies: once the replies fill the
/// socket buffers, the server gives it the command timeout to read them, then drops it (its
/// connection slot is not held forever).
#[test]
fn a_client_that_never_reads_is_dropped() {
    use std::io::{Read, Write};
    for driver in DRIVERS {
        let s = Server::start_with(
            "never-reads",
            driver,
            // Only the write timeout may end it: not the junk-command limit, which cuts a
            // client off after about 120 EHLOs, before its replies fill the buffers or not,
            // depending on how far the kernel grew the server's send buffer.
            "[binding.limits]\ncommand_timeout = \"1s\"\nmax_junk_commands = 1000000000\n",
            "",
        );
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        sock.connect(&s.inbound.into()).unwrap();
        let mut c: std::net::TcpStream = sock.into();
        c.set_nonblocking(true).unwrap();
        // EHLO: a reply ten times the size of the command, so the replies fill the buffers
        // long before the commands do.
        let noops = b"EHLO client.test\r\n".repeat(1024);
        let mut sent = 0usize;
        let mut pending: &[u8] = b"EHLO client.test\r\n";
        // Until the server stops taking commands (its replies are not read), at most 64 MiB.
        while sent < 64 << 20 {
            match c.write(pending) {
                Ok(n) => {
                    sent += n;
                    pending = pending.get(n..).unwrap_or_default();
                    if pending.is_empty() {
                        pending = &noops;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("[{driver}] {e}"),
            }
        }
        assert!(
            sent < 64 << 20,
            "[{driver}] the server never stopped reading"
        );
        std::thread::sleep(Duration::from_millis(2500));
        c.set_nonblocking(false).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        let end = loop {
            let mut buf = [0u8; 65536];
            match c.read(&mut buf) {
                Ok(0) => break "closed",
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break "reset",
                Err(e) => panic!("[{driver}] not dropped: {e} after {} bytes", got.len()),
            }
        };
        // Dropped with commands unanswered, not after answering them all and timing out idle.
        let text = String::from_utf8_lossy(&got);
        let answered = text.matches("\r\n250 ").count();
        assert!(
            answered < sent / 18 && !text.contains("421 4.4.2"),
            "[{driver}] {end}: {answered} replies to {} commands, ending {:?}",
            sent / 18,
            text.get(text.len().saturating_sub(200)..)
        );
        // The server goes on.
        let mut d = Raw::connect(s.inbound);
        assert!(d.reply().starts_with("220"), "[{driver}]");
    }
}

#[test]
fn port_in_use_is_a_startup_error() {
    // A foreign listener that itself sets SO_REUSEPORT (so a careless REUSEPORT bind would
    // silently share the port).
    let foreign = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    foreign.set_reuse_port(true).unwrap();
    foreign
        .bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
    foreign.listen(8).unwrap();
    let port = foreign.local_addr().unwrap().as_socket().unwrap().port();
    let dir = support::temp_dir("inuse");
    let cfg = support::config(&dir, port, support::free_port(), "", "");
    std::fs::write(dir.join("c.toml"), cfg).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ringmx"))
        .args(["run", "--config"])
        .arg(dir.join("c.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!(
            "binding \"inbound\": 127.0.0.1:{port} is already in use by another process"
        )),
        "{}",
        stderr(&out)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn check_config_names_key_and_line() {
    let dir = support::temp_dir("check");
    let good = support::config(&dir, 2525, 2587, "", "");
    std::fs::write(dir.join("good.toml"), &good).unwrap();
    let bad = good.replace(
        "direction = \"inbound\"",
        "direction = \"inbound\"\ntls = \"implicit\"",
    );
    std::fs::write(dir.join("bad.toml"), &bad).unwrap();
    let run = |f: &str| {
        Command::new(env!("CARGO_BIN_EXE_ringmx"))
            .args(["check-config"])
            .arg(dir.join(f))
            .output()
            .unwrap()
    };
    let ok = run("good.toml");
    assert!(ok.status.success(), "{}", stderr(&ok));
    let e = run("bad.toml");
    assert_eq!(e.status.code(), Some(1));
    let line = bad.lines().position(|l| l.starts_with("tls =")).unwrap() + 1;
    assert_eq!(
        stderr(&e).trim(),
        format!(
            "{}:{line}: binding[0] (inbound).certificate: TLS needs certificate + key (PEM) or pkcs12",
            dir.join("bad.toml").display()
        )
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn sigterm_finishes_transactions_and_says_421_to_idle_sessions() {
    for driver in DRIVERS {
        let mut s = Server::start("sigterm", driver);
        let mut idle = Raw::connect(s.inbound);
        assert!(idle.reply().starts_with("220"));
        let mut busy = Raw::connect(s.inbound);
        busy.reply();
        busy.cmd("EHLO c\r\n");
        busy.start_data();
        busy.send("Subject: in flight\r\n\r\nfirst half\r\n");
        std::thread::sleep(Duration::from_millis(100));
        s.sigterm();
        // The idle session is told at once.
        assert_eq!(
            idle.rest(),
            "421 4.3.2 Service shutting down, try again later\r\n",
            "[{driver}]"
        );
        // The DATA transfer in flight completes and is accepted, then the session is closed.
        busy.send("second half\r\n.\r\n");
        assert!(
            busy.reply().starts_with("250 2.0.0 Ok: queued as"),
            "[{driver}]"
        );
        assert_eq!(
            busy.rest(),
            "421 4.3.2 Service shutting down, try again later\r\n"
        );
        let st = s.wait_exit();
        assert!(st.success(), "{st:?}\n{}", s.log());
        // Accepted while stopping: it waits in the spool and is delivered after a restart.
        s.restart();
        let files = s.dropped();
        assert_eq!(files.len(), 1, "{}", s.log());
        assert!(files[0].ends_with("first half\r\nsecond half\r\n"));
    }
}

#[test]
fn admin_metrics_and_health() {
    let s = Server::start("metrics", "auto");
    let out = python(SMTPLIB_SEND, s.inbound.port(), 0);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut denied = Raw::connect(s.inbound);
    denied.reply();
    denied.cmd("EHLO c\r\n");
    denied.cmd("MAIL FROM:<a@b.test>\r\n");
    assert!(
        denied
            .cmd("RCPT TO:<x@elsewhere.test>\r\n")
            .starts_with("550")
    );
    denied.cmd("QUIT\r\n");
    denied.rest();
    assert_eq!(
        s.admin_get("/healthz"),
        ("HTTP/1.1 200 OK".into(), "ok\n".into())
    );
    assert_eq!(s.admin_get("/nope").0, "HTTP/1.1 404 Not Found");
    let (status, body) = s.admin_get("/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    // Parsed by the Prometheus client library's own parser.
    support::python_module("prometheus_client");
    let parsed = support::run_with_stdin(
        Command::new("python3").args(["-c", support::PARSE_METRICS]),
        body.as_bytes(),
    );
    assert!(parsed.status.success(), "{}", stderr(&parsed));
    let m = stdout(&parsed);
    assert!(
        m.contains("ringmx_messages_accepted_total,binding=inbound 3.0\n"),
        "{m}"
    );
    assert!(
        m.contains("ringmx_rejected_total,reason=relay_denied 1.0\n"),
        "{m}"
    );
    let conns: f64 = m
        .lines()
        .filter(|l| l.starts_with("ringmx_connections_total,binding=inbound,"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert!(conns >= 2.0, "{m}");
    assert!(m.contains("ringmx_session_duration_seconds_count "), "{m}");
}

#[test]
fn bare_lf_exempt_binding_limit_and_min_data_rate() {
    let s = Server::start_with(
        "exempt",
        "auto",
        "[binding.limits]\nmax_connections = 3\nmin_data_rate = 1000\n",
        "[smtp]\nbare_lf_exempt = [\"127.0.0.0/8\"]\n",
    );
    // Exempt client: the bare LF is normalized instead of refused.
    let mut c = Raw::connect(s.inbound);
    c.reply();
    c.cmd("EHLO c\r\n");
    c.start_data();
    assert!(c.cmd("a\nb\r\n.\r\n").starts_with("250 2.0.0 Ok"));
    let files = s.dropped();
    assert!(files[0].ends_with("a\r\nb\r\n"), "{:?}", files[0]);
    // The binding's own connection limit: c is the first, two more fit, the fourth does not.
    let mut d = Raw::connect(s.inbound);
    let mut e = Raw::connect(s.inbound);
    assert!(d.reply().starts_with("220") && e.reply().starts_with("220"));
    let mut f = Raw::connect(s.inbound);
    assert_eq!(
        f.rest(),
        "421 4.7.0 Too many connections, try again later\r\n"
    );
    drop((d, e));
    // min_data_rate: a message dribbling in far below 1000 B/s is cut off.
    c.start_data();
    // Dribble a byte every 200 ms, and stop as soon as the server answers (writing after its
    // close would reset the connection and lose the reply).
    c.w.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let start = std::time::Instant::now();
    let mut got = String::new();
    while start.elapsed() < Duration::from_secs(5) && got.is_empty() {
        c.w.write_all(b"x").unwrap();
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut c.r, &mut line).is_ok() {
            got = line;
        }
    }
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "not before one second"
    );
    assert_eq!(got, "421 4.4.2 Data rate too low, closing connection\r\n");
}

#[test]
fn ipv6_binding() {
    // The outbound binding moves to [::1]; smtplib connects over IPv6 and relays.
    let v6 = support::free_port();
    let s = Server::start_with("ipv6", "auto", "", "");
    let path = s.dir.join("ringmx.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let moved = text
        .replace(
            &format!("listen = \"{}\"", s.outbound),
            &format!("listen = \"[::1]:{v6}\""),
        )
        .replace(
            "allowed_clients = [\"127.0.0.0/8\"]",
            "allowed_clients = [\"::1\"]",
        );
    s.reconfigure(&moved);
    let script = r#"
import os, smtplib
with smtplib.SMTP("::1", int(os.environ["PORT"]), timeout=10) as s:
    print(s.sendmail("me@example.test", ["friend@elsewhere.test"], b"Subject: v6\r\n\r\nx\r\n"))
"#;
    let out = python(script, v6, 0);
    assert!(out.status.success(), "{}\n{}", stderr(&out), s.log());
    assert_eq!(stdout(&out), "{}\n");
    let files = s.dropped();
    assert!(files[0].contains("Received: from "), "{}", files[0]);
    assert!(files[0].contains("([::1])"), "{}", files[0]);
}

/// `curl` against the admin endpoint: (HTTP status, body).
fn curl(url: &str, args: &[&str]) -> (String, String) {
    let out = support::peer("curl")
        .args(["-s", "-m", "10", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .expect("curl (apt-get install curl)");
    let text = stdout(&out);
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.to_string(), body.to_string())
}

/// The admin endpoint as a web page in the operator's browser or a DNS-rebinding attacker would
/// try it (curl sending the headers a browser sends), then with bearer tokens; a non-loopback
/// listen without tokens is a configuration error; slow clients do not block `/healthz`.
#[test]
fn admin_endpoint_refuses_cross_site_requests_and_needs_tokens_off_loopback() {
    let s = Server::start("admin-safety", "auto");
    let base = format!("http://{}", s.admin);
    // A cross-site form post (simple content type, foreign Origin) and a rebinding page.
    let form = [
        "-X",
        "POST",
        "-H",
        "Content-Type: application/x-www-form-urlencoded",
    ];
    assert_eq!(curl(&format!("{base}/reload"), &form).0, "403");
    let evil_origin = [&form[..], &["-H", "Origin: http://evil.example"]].concat();
    assert_eq!(curl(&format!("{base}/queue/flush"), &evil_origin).0, "403");
    let rebind = ["-H", "Host: evil.example:8025"];
    assert_eq!(curl(&format!("{base}/queue"), &rebind).0, "403");
    assert_eq!(curl(&format!("{base}/healthz"), &rebind).0, "200");
    // The CLI (Host = the address, application/octet-stream) still works.
    assert!(s.reload().status.success(), "{}", stderr(&s.reload()));
    assert_eq!(
        curl(
            &format!("{base}/reload"),
            &["-X", "POST", "-H", "Content-Type: application/octet-stream"]
        )
        .0,
        "200"
    );
    // Slow clients holding connections open do not block /healthz.
    let slow: Vec<TcpStream> = (0..5)
        .map(|_| TcpStream::connect(s.admin).unwrap())
        .collect();
    let t = Instant::now();
    assert_eq!(s.admin_get("/healthz").0, "HTTP/1.1 200 OK");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    drop(slow);
    // A body where none is taken (even on the open /healthz) is refused unread.
    let unasked = ["-X", "POST", "-H", "Content-Length: 1000000000"];
    assert_eq!(curl(&format!("{base}/healthz"), &unasked).0, "413");
    // A byte every 500 ms does not hold a request open past its 10 s deadline.
    let mut trickle = TcpStream::connect(s.admin).unwrap();
    let started = Instant::now();
    let closed = (0..40).any(|i| {
        std::thread::sleep(Duration::from_millis(500));
        trickle
            .write_all(&[b"GET /healthz HTTP/1.1\r\nX-Slow: "[i % 20]])
            .is_err()
            || {
                let mut b = [0u8; 512];
                trickle
                    .set_read_timeout(Some(Duration::from_millis(1)))
                    .unwrap();
                std::io::Read::read(&mut trickle, &mut b).is_ok()
            }
    });
    assert!(
        closed && started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    // A declared 2 GiB body is refused before anything is read or allocated.
    let huge = [
        "-X",
        "POST",
        "-H",
        "Content-Type: application/octet-stream",
        "-H",
        "Content-Length: 2147483648",
    ];
    assert_eq!(curl(&format!("{base}/aswl/import"), &huge).0, "413");

    // Off loopback: tokens required, and a configuration without them is refused.
    let cfg = std::fs::read_to_string(s.dir.join("ringmx.toml")).unwrap();
    let open = cfg.replace(
        &format!("listen = \"{}\"", s.admin),
        &format!("listen = \"0.0.0.0:{}\"", s.admin.port()),
    );
    let bad = s.dir.join("open.toml");
    std::fs::write(&bad, &open).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ringmx"))
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let line = open.lines().position(|l| l.contains("0.0.0.0:")).unwrap() + 1;
    assert!(
        stderr(&out).contains(&format!("open.toml:{line}: admin.listen")),
        "{}",
        stderr(&out)
    );
    // Tokens (taken by a reload): every path but /healthz needs one.
    let token = "t0ken-for-the-admin-endpoint";
    std::fs::write(s.dir.join("tokens"), format!("# admins\n{token}\n")).unwrap();
    s.reconfigure(&cfg.replace(
        "[admin]\n",
        &format!(
            "[admin]\ntoken_file = \"{}\"\n",
            s.dir.join("tokens").display()
        ),
    ));
    assert_eq!(curl(&format!("{base}/metrics"), &[]).0, "401");
    assert_eq!(
        curl(
            &format!("{base}/queue"),
            &["-H", "Authorization: Bearer wrong-token-xxxxxxxx"]
        )
        .0,
        "401"
    );
    assert_eq!(curl(&format!("{base}/healthz"), &[]).0, "200");
    let bearer = format!("Authorization: Bearer {token}");
    assert_eq!(curl(&format!("{base}/metrics"), &["-H", &bearer]).0, "200");
    let cli = |env: Option<(&str, &str)>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ringmx"));
        c.args(["queue", "list", "--admin", &s.admin.to_string()]);
        c.env_remove("RINGMX_ADMIN_TOKEN")
            .env_remove("RINGMX_ADMIN_TOKEN_FILE");
        if let Some((k, v)) = env {
            c.env(k, v);
        }
        c.output().unwrap().status.success()
    };
    assert!(!cli(None), "no token, no queue");
    assert!(cli(Some(("RINGMX_ADMIN_TOKEN", token))));
    let tokens = s.dir.join("tokens").display().to_string();
    assert!(cli(Some(("RINGMX_ADMIN_TOKEN_FILE", &tokens))));
}

/// `[admin] certificate` + `key`: the endpoint speaks HTTPS (curl verifying against the test
/// CA), plain HTTP gets nothing from it, and the CLI reaches it with `--admin https://…` and
/// `$RINGMX_ADMIN_CA` (and refuses it without the CA).
#[test]
fn admin_endpoint_over_https() {
    let dir = support::temp_dir("admin-https-ca");
    std::fs::create_dir_all(&dir).unwrap();
    support::ca_and_leaf(&dir);
    let extra = format!(
        "certificate = \"{}\"\nkey = \"{}\"\n",
        dir.join("leaf.pem").display(),
        dir.join("leaf.key").display()
    );
    let s = Server::start_with("admin-https", "auto", "", &extra);
    let https = format!("https://{}", s.admin);
    let ca = dir.join("ca.pem").display().to_string();
    // The endpoint starts after the SMTP listeners; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while curl(&format!("{https}/healthz"), &["--cacert", &ca]).0 != "200" {
        assert!(Instant::now() < deadline, "{}", s.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, body) = curl(&format!("{https}/metrics"), &["--cacert", &ca]);
    assert_eq!(code, "200");
    assert!(body.contains("ringmx_connections_total"), "{body}");
    assert_ne!(curl(&format!("http://{}/healthz", s.admin), &[]).0, "200");
    let cli = |with_ca: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ringmx"));
        c.args(["queue", "list", "--admin", &https]);
        c.env_remove("RINGMX_ADMIN_CA");
        if with_ca {
            c.env("RINGMX_ADMIN_CA", &ca);
        }
        c.output().unwrap()
    };
    let ok = cli(true);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let refused = cli(false);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("cannot reach the admin endpoint"),
        "{}",
        stderr(&refused)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
