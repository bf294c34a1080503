//! Recipient verification against a next hop (a "callout", Postfix's
//! `reject_unverified_recipient`): a probe transaction — EHLO, `MAIL FROM:<>`, `RCPT TO`, then
//! QUIT — that never sends a message. Blocking, with a timeout on every step: it runs on the
//! policy worker threads, never on a core.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::reply::{self, Reply};

/// What the next hop said of a recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// RCPT answered 2xx.
    Exists,
    /// RCPT answered 5xx (the reply, one line).
    Unknown(String),
    /// No answer to trust: the hop is down, slow, answered 4xx, or broke the protocol.
    Unavailable(String),
}

/// Probe `address` at the first of `hops` (`host:port`) that answers, saying `ehlo`; each
/// step (connect, each reply) may take `step` at most.
pub fn probe(hops: &[String], ehlo: &str, address: &str, step: Duration) -> Verdict {
    // A quoted local part may hold spaces; control characters never reach here (the parser
    // refuses them) but are refused again. Non-ASCII addresses would need SMTPUTF8.
    if address.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return Verdict::Unavailable("address not probed: control characters".into());
    }
    if !address.is_ascii() {
        return Verdict::Unavailable("address not probed: not ASCII (SMTPUTF8)".into());
    }
    let mut why = String::from("no next hop");
    for hop in hops {
        // `host`, `host:port`, `[address]`, `[address]:port`, as routes write them.
        let Some((host, port)) = super::parse_hop(hop) else {
            why = format!("{hop}: not host:port");
            continue;
        };
        let addrs: Vec<SocketAddr> = match (host.as_str(), port).to_socket_addrs() {
            Ok(a) => a.collect(),
            Err(e) => {
                why = format!("{hop}: {e}");
                continue;
            }
        };
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, step) {
                Ok(s) => return transaction(s, ehlo, address, step),
                Err(e) => why = format!("{addr}: {e}"),
            }
        }
    }
    Verdict::Unavailable(why)
}

fn transaction(mut s: TcpStream, ehlo: &str, address: &str, step: Duration) -> Verdict {
    if s.set_read_timeout(Some(step)).is_err() || s.set_write_timeout(Some(step)).is_err() {
        return Verdict::Unavailable("socket setup failed".into());
    }
    let _ = s.set_nodelay(true);
    let mut buf = Vec::with_capacity(1024);
    let mut ask = |s: &mut TcpStream, cmd: Option<String>| -> Result<Reply, String> {
        if let Some(c) = cmd {
            s.write_all(c.as_bytes())
                .map_err(|e| format!("write: {e}"))?;
        }
        read_reply(s, &mut buf, step)
    };
    let steps: [(Option<String>, &str); 4] = [
        (None, "greeting"),
        (Some(format!("EHLO {ehlo}\r\n")), "EHLO"),
        (Some("MAIL FROM:<>\r\n".into()), "MAIL"),
        (Some(format!("RCPT TO:<{address}>\r\n")), "RCPT"),
    ];
    let mut verdict = Verdict::Unavailable("no reply".into());
    for (cmd, name) in steps {
        let r = match ask(&mut s, cmd) {
            Ok(r) => r,
            Err(e) => return Verdict::Unavailable(format!("{name}: {e}")),
        };
        if name == "RCPT" {
            // Only a refusal of the mailbox itself means "unknown" (550/551/553, 5.1.x when
            // an enhanced code is given); a policy or syntax 5xx is no verdict on the user.
            let mailbox = matches!(r.code, 550 | 551 | 553)
                && r.enhanced.is_none_or(|(_, subject, _)| subject == 1);
            verdict = if r.is_positive() {
                Verdict::Exists
            } else if r.is_permanent() && mailbox {
                Verdict::Unknown(r.one_line())
            } else {
                Verdict::Unavailable(format!("RCPT: {}", r.one_line()))
            };
        } else if !r.is_positive() {
            return Verdict::Unavailable(format!("{name}: {}", r.one_line()));
        }
    }
    // Polite, not waited for long: the verdict is known.
    let _ = s.write_all(b"QUIT\r\n");
    verdict
}

/// Read one reply, within `step` overall.
fn read_reply(s: &mut TcpStream, buf: &mut Vec<u8>, step: Duration) -> Result<Reply, String> {
    let deadline = Instant::now() + step;
    let mut chunk = [0u8; 1024];
    loop {
        match reply::parse(buf) {
            Ok(Some((r, used))) => {
                buf.drain(..used.min(buf.len()));
                return Ok(r);
            }
            Ok(None) => {}
            Err(e) => return Err(format!("bad reply: {e:?}")),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("timeout".into());
        }
        let _ = s.set_read_timeout(Some(left));
        match s.read(&mut chunk) {
            Ok(0) => return Err("connection closed".into()),
            Ok(n) => buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err("timeout".into());
            }
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;

    /// A scripted next hop: answers each command with the next reply of `script`.
    fn hop(script: Vec<&'static str>) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            let mut line = String::new();
            for (i, reply) in script.iter().enumerate() {
                if i > 0 {
                    line.clear();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                }
                if w.write_all(reply.as_bytes()).is_err() {
                    return;
                }
            }
        });
        addr
    }

    #[test]
    fn verdicts() {
        let step = Duration::from_secs(5);
        let ok = ["220 hop\r\n", "250-hop\r\n250 PIPELINING\r\n", "250 ok\r\n"];
        type Case = (Vec<&'static str>, fn(&Verdict) -> bool);
        let cases: [Case; 6] = [
            (vec![ok[0], ok[1], ok[2], "250 2.1.5 ok\r\n"], |v| {
                *v == Verdict::Exists
            }),
            (
                vec![ok[0], ok[1], ok[2], "550 5.1.1 no such user\r\n"],
                |v| matches!(v, Verdict::Unknown(t) if t.contains("550 5.1.1 no such user")),
            ),
            (
                vec![ok[0], ok[1], ok[2], "451 4.3.0 later\r\n"],
                |v| matches!(v, Verdict::Unavailable(t) if t.contains("451")),
            ),
            (
                vec!["554 go away\r\n"],
                |v| matches!(v, Verdict::Unavailable(t) if t.starts_with("greeting")),
            ),
            (
                vec![ok[0], ok[1], ok[2], "554 5.7.1 policy\r\n"],
                |v| matches!(v, Verdict::Unavailable(t) if t.contains("554")),
            ),
            (
                vec![ok[0], ok[1], "garbage\r\n"],
                |v| matches!(v, Verdict::Unavailable(t) if t.contains("bad reply")),
            ),
        ];
        for (script, want) in cases {
            let shown = format!("{script:?}");
            let v = probe(&[hop(script)], "edge.test", "u@example.test", step);
            assert!(want(&v), "{shown}: {v:?}");
        }
    }

    #[test]
    fn down_or_silent_hops_are_unavailable() {
        // Nothing listens on the first; the second accepts and never speaks.
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let silent_addr = silent.local_addr().unwrap().to_string();
        let v = probe(
            std::slice::from_ref(&closed),
            "e",
            "u@x.test",
            Duration::from_secs(2),
        );
        assert!(matches!(v, Verdict::Unavailable(_)), "{v:?}");
        let started = Instant::now();
        let v = probe(
            &[closed, silent_addr],
            "e",
            "u@x.test",
            Duration::from_millis(300),
        );
        assert!(
            matches!(&v, Verdict::Unavailable(t) if t.contains("timeout")),
            "{v:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(silent);
        assert!(matches!(
            probe(&[], "e", "u\r\n@x.test", Duration::from_secs(1)),
            Verdict::Unavailable(_)
        ));
        // Routes' hop forms: a bare host (port 25: nothing listens, refused) and brackets.
        let v = probe(
            &["[127.0.0.1]:1".into()],
            "e",
            "u@x.test",
            Duration::from_secs(1),
        );
        assert!(
            matches!(&v, Verdict::Unavailable(t) if t.contains("127.0.0.1:1")),
            "{v:?}"
        );
        let v = probe(
            &["2001:db8::1".into()],
            "e",
            "u@x.test",
            Duration::from_secs(1),
        );
        assert!(
            matches!(&v, Verdict::Unavailable(t) if t.contains("not host:port")),
            "{v:?}"
        );
    }
}
