//! Live reload (POST /reload through `ringmx reload`, and SIGHUP): bindings added, removed and
//! changed without dropping a session — a DATA transfer in flight completes and is accepted —
//! and a broken configuration refused while the running one stays.

mod support;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::{DRIVERS, Raw, Server, free_port, stderr, stdout};

fn config(s: &Server, third: u16, banner: &str, with_outbound: bool) -> String {
    let outbound = if with_outbound {
        format!(
            "[[binding]]\nname = \"outbound\"\nlisten = \"{}\"\ndirection = \"outbound\"\nallowed_clients = [\"127.0.0.0/8\"]\n",
            s.outbound
        )
    } else {
        String::new()
    };
    format!(
        r#"[server]
hostname = "mx.test"
cores = 2

[[binding]]
name = "inbound"
listen = "{inbound}"
direction = "inbound"

{outbound}
[[binding]]
name = "added"
listen = "127.0.0.1:{third}"
direction = "inbound"

[domains]
local = ["example.test"]

[smtp]
banner = "{banner}"

[admin]
listen = "{admin}"

[[route]]
domains = ["*"]
action = "drop"
folder = "{dir}/drop"
"#,
        inbound = s.inbound,
        admin = s.admin,
        dir = s.dir.display()
    )
}

fn greeting(addr: SocketAddr) -> String {
    let mut c = Raw::connect(addr);
    c.reply()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn reload_adds_removes_and_changes_bindings_without_dropping_sessions() {
    for driver in DRIVERS {
        let mut s = Server::start("reload", driver);
        let path = s.dir.join("ringmx.toml");
        // A transfer in flight across the reload.
        let mut busy = Raw::connect(s.inbound);
        busy.reply();
        busy.cmd("EHLO c\r\n");
        busy.start_data();
        busy.send("Subject: across a reload\r\n\r\nbefore\r\n");

        let third = free_port();
        std::fs::write(&path, config(&s, third, "reloaded", false)).unwrap();
        let out = s.reload();
        assert!(
            out.status.success(),
            "[{driver}] {}\n{}",
            stderr(&out),
            s.log()
        );
        assert_eq!(stdout(&out), "reloaded (generation 2)\n");

        busy.send("after\r\n.\r\n");
        assert!(
            busy.reply().starts_with("250 2.0.0 Ok: queued as"),
            "[{driver}] the session survived"
        );
        assert_eq!(busy.cmd("QUIT\r\n"), "221 2.0.0 Bye\r\n");
        let files = s.dropped();
        assert!(
            files.iter().any(|f| f.ends_with("before\r\nafter\r\n")),
            "{files:?}"
        );

        // Changed binding: new connections see the new settings.
        assert_eq!(greeting(s.inbound), "220 mx.test ESMTP reloaded\r\n");
        // Added binding.
        let added = SocketAddr::from(([127, 0, 0, 1], third));
        wait_until("the added binding accepts", || {
            TcpStream::connect(added).is_ok() && greeting(added).starts_with("220 mx.test")
        });
        // Removed binding: its listeners close on every core.
        wait_until("the removed binding stops listening", || {
            TcpStream::connect(s.outbound).is_err()
        });

        // A broken configuration is refused with its key and line; the running one stays.
        std::fs::write(
            &path,
            config(&s, third, "reloaded", false).replace("[smtp]", "[smtp]\ncolour = 1"),
        )
        .unwrap();
        let out = s.reload();
        assert_eq!(out.status.code(), Some(1));
        let e = stderr(&out);
        assert!(
            e.contains(&format!("{}:", path.display())) && e.contains("colour"),
            "{e}"
        );
        assert_eq!(greeting(s.inbound), "220 mx.test ESMTP reloaded\r\n");

        // SIGHUP does the same, and can bring a removed binding back.
        std::fs::write(&path, config(&s, third, "after-hup", true)).unwrap();
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(s.child.as_ref().unwrap().id() as i32, libc::SIGHUP) };
        wait_until("SIGHUP reloads", || {
            greeting(s.inbound) == "220 mx.test ESMTP after-hup\r\n"
        });
        wait_until("the outbound binding is back", || {
            TcpStream::connect(s.outbound).is_ok() && greeting(s.outbound).starts_with("220")
        });
        assert!(s.stop().success());
        assert!(s.log().contains("configuration reloaded"), "{}", s.log());
    }
}

const PEER_CERT: &str = r#"
import hashlib, os, smtplib, ssl
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
with smtplib.SMTP("127.0.0.1", int(os.environ["PORT"]), timeout=10) as s:
    s.starttls(context=ctx)
    print(hashlib.sha256(s.sock.getpeercert(binary_form=True)).hexdigest())
"#;

#[test]
fn reload_replaces_certificates() {
    let first = support::Certs::new();
    let second = support::Certs::new();
    let s = Server::start_with("reload-cert", "auto", &first.pem_binding("starttls"), "");
    let fingerprint = || {
        let out = support::python(PEER_CERT, s.inbound.port(), 0);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    let before = fingerprint();
    let path = s.dir.join("ringmx.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let swapped = text
        .replace(
            &first.cert.display().to_string(),
            &second.cert.display().to_string(),
        )
        .replace(
            &first.key.display().to_string(),
            &second.key.display().to_string(),
        );
    assert_ne!(text, swapped);
    std::fs::write(&path, swapped).unwrap();
    let out = s.reload();
    assert!(out.status.success(), "{}", stderr(&out));
    let after = fingerprint();
    assert_ne!(before, after, "new TLS sessions use the new certificate");
    // A certificate that does not load is refused, naming the binding and the file.
    std::fs::write(&second.cert, "garbage").unwrap();
    let out = s.reload();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("binding \"inbound\": certificate"),
        "{}",
        stderr(&out)
    );
    assert_eq!(fingerprint(), after, "the running certificate stays");
}

/// Whether `RCPT TO:<x@elsewhere.test>` is accepted on `addr` (an outbound binding relays, an
/// inbound one does not).
fn relays(addr: SocketAddr) -> bool {
    let mut c = Raw::connect(addr);
    c.reply();
    c.cmd("EHLO c\r\n");
    c.cmd("MAIL FROM:<a@example.test>\r\n");
    let r = c.cmd("RCPT TO:<x@elsewhere.test>\r\n");
    c.cmd("QUIT\r\n");
    r.starts_with("250")
}

/// A reload whose new addresses overlap the server's own listeners (0.0.0.0:P beside
/// 127.0.0.1:P and back) is not refused as "in use by another process", and behaves as a
/// fresh start with the same configuration does; a restart right after `kill -9` finds its
/// ports although the dead process's io_uring listeners linger for a moment.
#[test]
fn reload_with_overlapping_addresses_matches_a_fresh_start() {
    for driver in DRIVERS {
        let mut s = Server::start("reload-overlap", driver);
        let path = s.dir.join("ringmx.toml");
        let base = std::fs::read_to_string(&path).unwrap();
        let port = s.inbound.port();
        let wildcard = base.replace(
            &format!("listen = \"{}\"", s.inbound),
            &format!("listen = \"0.0.0.0:{port}\""),
        );
        s.reconfigure(&wildcard);
        assert!(
            !relays(s.inbound),
            "[{driver}] the inbound binding, now on 0.0.0.0"
        );
        let both = wildcard.replace(
            "[domains]",
            &format!(
                "[[binding]]\nname = \"local-out\"\nlisten = \"127.0.0.1:{port}\"\ndirection = \"outbound\"\nallowed_clients = [\"127.0.0.0/8\"]\n\n[domains]"
            ),
        );
        s.reconfigure(&both);
        let after_reload = relays(s.inbound);
        s.kill9();
        s.restart();
        assert_eq!(
            relays(s.inbound),
            after_reload,
            "[{driver}] a fresh start serves 127.0.0.1:{port} as the reload did"
        );
        assert!(after_reload, "[{driver}] the more specific address wins");
        assert!(s.log().matches("ringmx started").count() >= 2);
    }
}
