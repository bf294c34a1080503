//! PROXY protocol v1/v2 from trusted proxies, with plain SMTP and implicit TLS; headers from
//! untrusted sources and malformed headers close the connection.

mod support;

use support::{DRIVERS, Raw, Server, python, stderr, stdout};

#[test]
fn v1_header_sets_the_client_address() {
    for driver in DRIVERS {
        let s = Server::start_with_tls("proxy1", driver, "proxy_protocol = [\"127.0.0.0/8\"]\n");
        let mut c = Raw::connect(s.inbound);
        c.send("PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n");
        assert!(c.reply().starts_with("220 mx.test"), "[{driver}]");
        c.cmd("EHLO proxied.test\r\n");
        c.start_data();
        assert!(
            c.cmd("Subject: p\r\n\r\nx\r\n.\r\n")
                .starts_with("250 2.0.0 Ok")
        );
        let files = s.dropped();
        assert!(
            files[0].contains("Received: from proxied.test ([192.0.2.7])"),
            "{}",
            files[0]
        );
        // A malformed header from the trusted proxy: closed, no greeting.
        let mut bad = Raw::connect(s.inbound);
        bad.send("PROXY TCP4 192.0.2.7 nonsense\r\n");
        assert_eq!(bad.rest(), "");
    }
}

#[test]
fn header_from_untrusted_source_closes() {
    for driver in DRIVERS {
        let s = Server::start_with(
            "proxy-untrusted",
            driver,
            "proxy_protocol = [\"10.0.0.0/8\"]\n",
            "",
        );
        // Not a trusted proxy: served directly…
        let mut c = Raw::connect(s.inbound);
        assert!(c.reply().starts_with("220"), "[{driver}]");
        // …but a PROXY header from it ends the connection.
        c.send("PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n");
        assert_eq!(c.rest(), "");
        assert!(
            s.log().contains("PROXY header from an untrusted source"),
            "{}",
            s.log()
        );
    }
}

const V2_IMPLICIT_TLS: &str = r#"
import os, smtplib, socket, ssl, struct
port = int(os.environ["PORT"])
sig = b"\r\n\r\n\x00\r\nQUIT\n"
body = socket.inet_aton("198.51.100.9") + socket.inet_aton("127.0.0.1") + struct.pack("!HH", 51000, port)
raw = socket.create_connection(("127.0.0.1", port), timeout=10)
raw.sendall(sig + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body)
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
tls = ctx.wrap_socket(raw)
s = smtplib.SMTP()
s.sock = tls
print(s.getreply())
s.ehlo("v2.test")
print(s.sendmail("a@b.test", ["u@example.test"], b"Subject: v2\r\n\r\nx\r\n"))
s.quit()
"#;

#[test]
fn v2_header_with_implicit_tls() {
    let certs = support::Certs::new();
    let binding = format!(
        "proxy_protocol = [\"127.0.0.1\"]\n{}",
        certs.pem_binding("implicit")
    );
    for driver in DRIVERS {
        let s = Server::start_with_tls("proxy2", driver, &binding);
        let out = python(V2_IMPLICIT_TLS, s.inbound.port(), 0);
        assert!(
            out.status.success(),
            "[{driver}] {}\n{}",
            stderr(&out),
            s.log()
        );
        assert!(
            stdout(&out).contains("(220, b'mx.test ESMTP ringmx')"),
            "{}",
            stdout(&out)
        );
        let files = s.dropped();
        assert!(
            files[0].contains("Received: from v2.test ([198.51.100.9])"),
            "{}",
            files[0]
        );
        assert!(files[0].contains("with ESMTPS (TLSv1.3"), "{}", files[0]);
    }
}
