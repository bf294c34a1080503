//! TLS end to end: STARTTLS and implicit TLS with Python's smtplib and `openssl s_client`,
//! PEM and PKCS#12 certificates, and the STARTTLS command-injection defence (CVE-2011-0411).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::{DRIVERS, Raw, Server, python, stderr, stdout};

const SEND_STARTTLS: &str = r#"
import os, smtplib, ssl
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
with smtplib.SMTP("127.0.0.1", int(os.environ["PORT"]), timeout=10) as s:
    s.ehlo("client.test")
    assert s.has_extn("starttls"), s.esmtp_features
    s.starttls(context=ctx)
    s.ehlo("client.test")
    assert not s.has_extn("starttls"), "STARTTLS must not be offered again"
    print("version", s.sock.version())
    print(s.sendmail("a@b.test", ["u@example.test"], b"Subject: tls\r\n\r\nsecret\r\n"))
"#;

const SEND_IMPLICIT: &str = r#"
import os, smtplib, ssl
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
with smtplib.SMTP_SSL("127.0.0.1", int(os.environ["PORT"]), timeout=10, context=ctx) as s:
    s.ehlo("client.test")
    assert not s.has_extn("starttls")
    print("version", s.sock.version())
    print(s.sendmail("a@b.test", ["u@example.test"], b"Subject: implicit\r\n\r\nsecret\r\n"))
"#;

#[test]
fn starttls_with_smtplib() {
    let certs = support::Certs::new();
    for driver in DRIVERS {
        let s = Server::start_with("starttls", driver, &certs.pem_binding("starttls"), "");
        let out = python(SEND_STARTTLS, s.inbound.port(), 0);
        assert!(
            out.status.success(),
            "[{driver}] {}\n{}",
            stderr(&out),
            s.log()
        );
        assert!(stdout(&out).contains("version TLSv1.3"), "{}", stdout(&out));
        let files = s.dropped();
        assert_eq!(files.len(), 1);
        assert!(
            files[0].contains("with ESMTPS (TLSv1.3 TLS13_"),
            "{}",
            files[0]
        );
    }
}

#[test]
fn implicit_tls_with_pem_and_pkcs12() {
    let certs = support::Certs::new();
    let pkcs12 = format!(
        "tls = \"implicit\"\npkcs12 = \"{}\"\npkcs12_password_file = \"{}\"\n",
        certs.pfx.display(),
        certs.pfx_password.display()
    );
    for (driver, binding) in [("auto", certs.pem_binding("implicit")), ("legacy", pkcs12)] {
        let s = Server::start_with_tls("implicit", driver, &binding);
        let out = python(SEND_IMPLICIT, s.inbound.port(), 0);
        assert!(
            out.status.success(),
            "[{driver}] {}\n{}",
            stderr(&out),
            s.log()
        );
        assert!(stdout(&out).contains("version TLSv1.3"), "{}", stdout(&out));
        assert_eq!(s.dropped().len(), 1);
    }
}

#[test]
fn openssl_s_client_starttls() {
    let certs = support::Certs::new();
    for driver in DRIVERS {
        let s = Server::start_with("s_client", driver, &certs.pem_binding("starttls"), "");
        let out = support::run_with_stdin(
            Command::new("openssl").args(["s_client", "-starttls", "smtp", "-quiet", "-tls1_2", "-connect"]).arg(s.inbound.to_string()),
            b"EHLO sclient.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\nSubject: s_client\r\n\r\nhi\r\n.\r\nQUIT\r\n",
        );
        let text = stdout(&out);
        assert!(
            text.contains("250 2.0.0 Ok: queued as"),
            "[{driver}] {text}\n{}",
            stderr(&out)
        );
        assert!(text.contains("221 2.0.0 Bye"), "{text}");
        let files = s.dropped();
        assert_eq!(files.len(), 1);
        assert!(
            files[0].contains("with ESMTPS (TLSv1.2 TLS_ECDHE_ECDSA_WITH"),
            "{}",
            files[0]
        );
    }
}

#[test]
fn plaintext_pipelined_after_starttls_is_refused() {
    let certs = support::Certs::new();
    for driver in DRIVERS {
        let s = Server::start_with("inject", driver, &certs.pem_binding("starttls"), "");
        let mut c = Raw::connect(s.inbound);
        assert!(c.reply().starts_with("220"));
        assert!(c.cmd("EHLO c\r\n").contains("STARTTLS\r\n"));
        c.send("STARTTLS\r\nMAIL FROM:<attacker@evil.test>\r\n");
        assert_eq!(
            c.rest(),
            "554 5.5.1 Commands pipelined after STARTTLS are refused, closing connection\r\n",
            "[{driver}]"
        );
    }
}

#[test]
fn check_config_loads_certificates() {
    let dir = support::temp_dir("badcert");
    std::fs::write(dir.join("cert.pem"), "not a certificate").unwrap();
    std::fs::write(dir.join("key.pem"), "not a key").unwrap();
    let cfg = support::config(
        &dir,
        2525,
        2587,
        &format!(
            "tls = \"starttls\"\ncertificate = \"{}\"\nkey = \"{}\"\n",
            dir.join("cert.pem").display(),
            dir.join("key.pem").display()
        ),
        "",
    );
    std::fs::write(dir.join("c.toml"), cfg).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ringmx"))
        .arg("check-config")
        .arg(dir.join("c.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(
        e.contains("binding \"inbound\": certificate") && e.contains("cert.pem"),
        "{e}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

fn users_file(dir: &Path) -> PathBuf {
    let out = support::run_with_stdin(
        Command::new(env!("CARGO_BIN_EXE_ringmx")).arg("hash-password"),
        b"pa55word\n",
    );
    assert!(out.status.success());
    let hash = stdout(&out);
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    let p = dir.join("users");
    std::fs::write(&p, format!("# test users\nalice:{}", hash.trim())).unwrap();
    p
}

const AUTH_SCRIPT: &str = r#"
import os, smtplib, ssl
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
with smtplib.SMTP("127.0.0.1", int(os.environ["PORT"]), timeout=20) as s:
    s.ehlo("client.test")
    print("auth before tls", s.has_extn("auth"))
    print("mail before auth", s.mail("a@b.test"))
    s.starttls(context=ctx)
    s.ehlo("client.test")
    print("auth after tls", s.esmtp_features.get("auth"))
    try:
        s.login("alice", "wrong")
    except smtplib.SMTPAuthenticationError as e:
        print("bad password", e.smtp_code, e.smtp_error.decode())
    print("good password", s.login("alice", "pa55word"))
    print(s.sendmail("alice@example.test", ["friend@example.test"], b"Subject: auth\r\n\r\nx\r\n"))
    try:
        s.sendmail("alice@example.test", ["friend@elsewhere.test"], b"Subject: relay\r\n\r\nx\r\n")
    except smtplib.SMTPRecipientsRefused as e:
        print("inbound relay", e.recipients["friend@elsewhere.test"][0])
"#;

#[test]
fn auth_required_submission() {
    let certs = support::Certs::new();
    let users = users_file(&certs.dir);
    let binding = format!("{}auth = \"required\"\n", certs.pem_binding("starttls"));
    let extra = format!("[auth]\nusers_file = \"{}\"\n", users.display());
    for driver in DRIVERS {
        let s = Server::start_with("auth", driver, &binding, &extra);
        let out = python(AUTH_SCRIPT, s.inbound.port(), 0);
        let text = stdout(&out);
        assert!(
            out.status.success(),
            "[{driver}] {}\n{text}\n{}",
            stderr(&out),
            s.log()
        );
        assert!(text.contains("auth before tls False"), "{text}");
        assert!(
            text.contains("mail before auth (530, b'5.7.0 Authentication required')"),
            "{text}"
        );
        assert!(text.contains("auth after tls  PLAIN LOGIN"), "{text}");
        assert!(
            text.contains("bad password 535 5.7.8 Authentication credentials invalid"),
            "{text}"
        );
        assert!(
            text.contains("good password (235, b'2.7.0 Authentication successful')"),
            "{text}"
        );
        assert!(
            text.contains("inbound relay 550"),
            "AUTH grants no relay on an inbound binding: {text}"
        );
        let files = s.dropped();
        assert_eq!(files.len(), 1, "{text}");
        assert!(files[0].contains("with ESMTPSA (TLSv1.3"), "{}", files[0]);
        // swaks with AUTH LOGIN over STARTTLS.
        let sw = support::peer("swaks")
            .args([
                "--server",
                &s.inbound.to_string(),
                "--tls",
                "--auth",
                "LOGIN",
                "--auth-user",
                "alice",
            ])
            .args([
                "--auth-password",
                "pa55word",
                "--to",
                "x@example.test",
                "--from",
                "alice@example.test",
            ])
            .output()
            .unwrap();
        assert!(
            stdout(&sw).contains("<~  235 2.7.0 Authentication successful"),
            "{}",
            stdout(&sw)
        );
        assert!(
            stdout(&sw).contains("<~  250 2.0.0 Ok: queued as"),
            "{}",
            stdout(&sw)
        );
    }
}

/// Guessing passwords, tried as an attacker would: failures count as protocol errors (the
/// session is closed at `max_errors`), and an address that failed `max_failures` times is
/// refused `454 4.7.0` on its next connection even with the right password. User names built
/// to forge log lines (CR, LF, a fake `client=`) stay inside their own line in the text and JSON
/// formats, as a fail2ban-style reader sees them.
#[test]
fn auth_failures_are_limited_across_connections_and_logged_safely() {
    const SCRIPT: &str = r#"
import os, smtplib, ssl
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
def session(attempts):
    s = smtplib.SMTP("127.0.0.1", int(os.environ["PORT"]), timeout=20)
    s.ehlo("client.test")
    s.starttls(context=ctx)
    s.ehlo("client.test")
    for user, pw in attempts:
        try:
            # One attempt each (login() would try every mechanism offered).
            s.user, s.password = user, pw
            s.auth("PLAIN", s.auth_plain)
            print("ok")
        except smtplib.SMTPAuthenticationError as e:
            print(e.smtp_code, e.smtp_error.decode())
        except smtplib.SMTPServerDisconnected:
            print("closed")
            return
    s.close()
forged = "x\n2026-01-01T00:00:00Z  WARN authentication failed client=6.6.6.6:1 user=\"y\"\r"
session([(forged, "a"), ("alice", "b"), ("alice", "c"), ("alice", "pa55word")])
session([("alice", "d")])
session([("alice", "pa55word")])
"#;
    const FAIL2BAN: &str = r#"
import json, re, sys
fmt, path = sys.argv[1], sys.argv[2]
hosts = []
for line in open(path, encoding="utf-8", errors="replace").read().split("\n"):
    if not line:
        continue
    if fmt == "json" and line.startswith("{"):
        rec = json.loads(line)
        if rec["fields"].get("message") == "authentication failed":
            hosts.append(rec["fields"]["client"].rsplit(":", 1)[0])
    else:
        assert re.match(r"^\d{4}-\d\d-\d\dT", line), repr(line)
        m = re.match(r"^\S+\s+WARN authentication failed client=([0-9.]+):\d+", line)
        if m:
            hosts.append(m.group(1))
print(" ".join(hosts))
"#;
    let certs = support::Certs::new();
    let users = users_file(&certs.dir);
    let binding = format!("{}auth = \"optional\"\n", certs.pem_binding("starttls"));
    let extra = format!(
        "[auth]\nusers_file = \"{}\"\nmax_failures = 4\n[limits]\nmax_errors = 3\n",
        users.display()
    );
    for (driver, format) in [("auto", "text"), ("legacy", "json")] {
        let mut s = Server::start_with("auth-abuse", driver, &binding, &extra);
        let cfg = std::fs::read_to_string(s.dir.join("ringmx.toml")).unwrap();
        let cfg = cfg.replacen("[server]\n", &format!("[server]\nlog = \"{format}\"\n"), 1);
        std::fs::write(s.dir.join("ringmx.toml"), cfg).unwrap();
        s.restart();
        let out = python(SCRIPT, s.inbound.port(), 0);
        let text = stdout(&out);
        assert!(out.status.success(), "{}\n{text}", stderr(&out));
        let bad = "535 5.7.8 Authentication credentials invalid";
        let refused =
            "454 4.7.0 Too many failed authentication attempts from your address, try again later";
        // The third failure is the session's third error: 421 and closed, so the fourth
        // attempt (with the right password) is never checked.
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[..3], [bad, bad, bad], "[{driver}] {text}");
        assert!(
            lines[3] == "closed" || lines[3].starts_with("421 4.7.0 Too many errors"),
            "[{driver}] {text}"
        );
        assert_eq!(lines[4..], [bad, refused], "[{driver}] {}", s.log());
        let log_path = s.dir.join("ringmx.log");
        let seen = Command::new("python3")
            .args(["-c", FAIL2BAN, format])
            .arg(&log_path)
            .output()
            .unwrap();
        assert!(seen.status.success(), "[{driver}] {}", stderr(&seen));
        assert_eq!(
            stdout(&seen).trim(),
            "127.0.0.1 127.0.0.1 127.0.0.1 127.0.0.1",
            "[{driver}] {}",
            s.log()
        );
    }
}

/// The content rules hold inside TLS too: BDAT with a bare LF, and DATA with NUL, over
/// STARTTLS (Python's ssl) are refused; a clean BDAT message is accepted. Both drivers.
#[test]
fn content_rules_over_starttls() {
    const SCRIPT: &str = r#"
import os, smtplib, ssl
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
with smtplib.SMTP("127.0.0.1", int(os.environ["PORT"]), timeout=20) as s:
    s.starttls(context=ctx)
    s.ehlo("client.test")
    for body in (b"Subject: x\r\n\r\nhi\n.\nmore\r\n", b"Subject: y\r\n\r\nclean\r\n"):
        s.mail("a@b.test"); s.rcpt("u@example.test")
        s.send(b"BDAT %d LAST\r\n" % len(body) + body)
        print(s.getreply())
    s.mail("a@b.test"); s.rcpt("u@example.test")
    code, msg = s.data(b"Subject: z\r\n\r\na\0b\r\n")
    print("data", code, msg.decode())
"#;
    let certs = support::Certs::new();
    for driver in DRIVERS {
        let s = Server::start_with("tls-content", driver, &certs.pem_binding("starttls"), "");
        let out = python(SCRIPT, s.inbound.port(), 0);
        let text = stdout(&out);
        assert!(out.status.success(), "[{driver}] {}\n{text}", stderr(&out));
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("(550, b'5.6.0 Bare CR or LF"),
            "[{driver}] {text}"
        );
        assert!(
            lines[1].starts_with("(250, b'2.0.0 Ok: queued"),
            "[{driver}] {text}"
        );
        assert!(
            lines[2].starts_with("data 550 5.6.0 NUL"),
            "[{driver}] {text}"
        );
        assert_eq!(s.dropped().len(), 1, "[{driver}]");
    }
}

/// A client that kept its session resumes it (TLS 1.3 PSK and TLS 1.2 tickets, sealed by the
/// binding's ticketer), as `openssl s_client` reports.
#[test]
fn sessions_resume_with_openssl_s_client() {
    let certs = support::Certs::new();
    let dir = support::temp_dir("tls-resume");
    std::fs::create_dir_all(&dir).unwrap();
    for driver in DRIVERS {
        let s = Server::start_with("resume", driver, &certs.pem_binding("starttls"), "");
        for version in ["-tls1_3", "-tls1_2"] {
            let session = dir.join(format!("{driver}{version}.pem"));
            let run = |sess: &[&str]| {
                let out = support::run_with_stdin(
                    Command::new("openssl")
                        .args(["s_client", "-starttls", "smtp", "-ign_eof", version])
                        .args(sess)
                        .arg("-connect")
                        .arg(s.inbound.to_string()),
                    b"EHLO sclient.test\r\nQUIT\r\n",
                );
                let text = stdout(&out);
                assert!(
                    text.contains("221 2.0.0 Bye"),
                    "[{driver} {version}] {text}"
                );
                text
            };
            let first = run(&["-sess_out", session.to_str().unwrap()]);
            assert!(
                first.contains("New, TLSv1."),
                "[{driver} {version}] {first}"
            );
            let second = run(&["-sess_in", session.to_str().unwrap()]);
            assert!(
                second.contains("Reused, TLSv1."),
                "[{driver} {version}] {second}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The server's order of suites wins (SHA-256 suites first, whatever the client lists first),
/// a client offering only AES-256 still gets it, and a TLS 1.3 handshake brings one session
/// ticket; as `openssl s_client` reports.
#[test]
fn the_server_picks_the_suite_and_sends_one_ticket() {
    let certs = support::Certs::new();
    for driver in DRIVERS {
        let s = Server::start_with("suites", driver, &certs.pem_binding("starttls"), "");
        let run = |args: &[&str]| {
            let out = support::run_with_stdin(
                Command::new("openssl")
                    .args(["s_client", "-starttls", "smtp", "-ign_eof"])
                    .args(args)
                    .arg("-connect")
                    .arg(s.inbound.to_string()),
                b"EHLO sclient.test\r\nQUIT\r\n",
            );
            let text = stdout(&out);
            assert!(text.contains("221 2.0.0 Bye"), "[{driver} {args:?}] {text}");
            text
        };
        for (args, cipher) in [
            (
                [
                    "-tls1_3",
                    "-ciphersuites",
                    "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256",
                ],
                "Cipher is TLS_AES_128_GCM_SHA256",
            ),
            (
                ["-tls1_3", "-ciphersuites", "TLS_AES_256_GCM_SHA384"],
                "Cipher is TLS_AES_256_GCM_SHA384",
            ),
            (
                [
                    "-tls1_2",
                    "-cipher",
                    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256",
                ],
                "Cipher is ECDHE-ECDSA-AES128-GCM-SHA256",
            ),
        ] {
            let text = run(&args);
            assert!(text.contains(cipher), "[{driver} {args:?}] {text}");
            if args[0] == "-tls1_3" {
                assert_eq!(
                    text.matches("Post-Handshake New Session Ticket arrived")
                        .count(),
                    1,
                    "[{driver} {args:?}] {text}"
                );
            }
        }
    }
}
