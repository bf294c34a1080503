//! Session table tests: every transcript is fed whole, at every split point and one byte at a
//! time, and must give the same replies and events each way.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

/// A runtime stand-in: feeds chunks, takes decisions, records events and writes.
struct Harness {
    session: Session,
    buf: Vec<u8>,
    out: Vec<u8>,
    writes: usize,
    events: Vec<String>,
    message: Vec<u8>,
    now: Instant,
}

fn settings(f: impl FnOnce(&mut SessionConfig)) -> Arc<Settings> {
    let mut cfg = SessionConfig {
        hostname: "mx.test".into(),
        ..SessionConfig::default()
    };
    f(&mut cfg);
    Arc::new(Settings::new(cfg).unwrap())
}

impl Harness {
    fn new(settings: Arc<Settings>) -> Harness {
        let now = Instant::now();
        let mut h = Harness {
            session: Session::new(settings, now),
            buf: Vec::new(),
            out: Vec::new(),
            writes: 0,
            events: Vec::new(),
            message: Vec::new(),
            now,
        };
        h.write();
        h
    }

    fn write(&mut self) {
        if !self.session.output().is_empty() {
            self.out.extend_from_slice(self.session.output());
            self.session.clear_output();
            self.writes += 1;
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        if self.session.is_closed() {
            return;
        }
        self.buf.extend_from_slice(chunk);
        let input = std::mem::take(&mut self.buf);
        let mut feed = self.session.feed(&input, self.now);
        let mut tls = false;
        loop {
            match feed.next() {
                Some(ev) => {
                    let s = describe(&ev, &mut self.message);
                    self.events.push(s);
                    match ev {
                        Event::Mail { from, .. }
                            if from.is_some_and(|f| f.as_str().ends_with("@reject.test")) =>
                        {
                            feed.reject(&Reply::new(550, "5.7.1", "Sender refused"))
                        }
                        Event::Mail { .. } => feed.accept(),
                        Event::Rcpt { to, .. } => {
                            if to.domain() == "reject.test" {
                                feed.reject(&Reply::new(550, "5.1.1", "No such user"));
                            } else {
                                feed.accept();
                            }
                        }
                        Event::MessageEnd { .. } if self.message.starts_with(b"REJECT") => {
                            feed.reject(&Reply::new(550, "5.7.1", "Message refused"))
                        }
                        Event::MessageEnd { .. } => feed.accept_message("Q1"),
                        Event::Auth(c) => {
                            if c.username == "user" && c.password == "pass" {
                                feed.accept();
                            } else {
                                feed.reject(&reply::AUTH_FAILED);
                            }
                        }
                        _ => {}
                    }
                }
                None => {
                    let stop = feed.stop();
                    // "write" what is queued
                    if !feed.output().is_empty() {
                        self.out.extend_from_slice(feed.output());
                        feed.clear_output();
                        self.writes += 1;
                    }
                    match stop {
                        Stop::Flush => continue,
                        Stop::StartTls => {
                            feed.tls_established();
                            tls = true;
                            continue;
                        }
                        Stop::NeedInput | Stop::Close => break,
                        Stop::Decision => panic!("harness decides everything"),
                    }
                }
            }
        }
        let consumed = feed.consumed();
        let _ = tls;
        self.buf = input[consumed..].to_vec();
        assert!(
            self.buf.len() < self.session.settings().config().max_line,
            "unconsumed input must stay under the line cap"
        );
    }

    fn output(&self) -> String {
        String::from_utf8_lossy(&self.out).into_owned()
    }
}

fn describe(ev: &Event<'_>, message: &mut Vec<u8>) -> String {
    match ev {
        Event::Helo { host, extended } => format!("helo {host} {extended}"),
        Event::Mail { from, .. } => format!("mail {}", from.map(|a| a.as_str()).unwrap_or("<>")),
        Event::Rcpt { to, .. } => format!("rcpt {to}"),
        Event::MessageStart => {
            message.clear();
            "start".into()
        }
        Event::Body(b) => {
            message.extend_from_slice(b);
            String::new()
        }
        Event::MessageEnd { size } => {
            assert_eq!(*size as usize, message.len(), "size counts delivered bytes");
            format!("end {}", String::from_utf8_lossy(message).escape_debug())
        }
        Event::MessageAborted { .. } => "aborted".into(),
        Event::Reset => "reset".into(),
        Event::StartTls => "starttls".into(),
        Event::Auth(c) => format!("auth {:?} {}", c.mechanism, c.username),
        Event::Quit => "quit".into(),
    }
}

/// Run `input` whole, at every split point and byte by byte; return (output, events).
fn run(settings: &Arc<Settings>, input: &[u8]) -> (String, Vec<String>) {
    let collect = |chunks: &[&[u8]]| {
        let mut h = Harness::new(settings.clone());
        for c in chunks {
            h.push(c);
        }
        let events: Vec<String> = h.events.into_iter().filter(|e| !e.is_empty()).collect();
        (String::from_utf8_lossy(&h.out).into_owned(), events)
    };
    let whole = collect(&[input]);
    for split in 1..input.len() {
        let (a, b) = input.split_at(split);
        assert_eq!(collect(&[a, b]), whole, "split at {split}");
    }
    let bytes: Vec<&[u8]> = input.chunks(1).collect();
    assert_eq!(collect(&bytes), whole, "byte at a time");
    whole
}

/// Feed each piece only after the replies to the one before: a client that waits.
fn lockstep(settings: &Arc<Settings>, pieces: &[&str]) -> String {
    let mut h = Harness::new(settings.clone());
    for p in pieces {
        h.push(p.as_bytes());
    }
    String::from_utf8_lossy(&h.out).into_owned()
}

fn default_settings() -> Arc<Settings> {
    settings(|_| {})
}

/// Reply lines after the greeting and EHLO reply.
fn replies(out: &str) -> Vec<&str> {
    let mut in_ehlo = false;
    let mut v = Vec::new();
    for l in out
        .split("\r\n")
        .filter(|l| !l.is_empty() && !l.starts_with("220 mx.test"))
    {
        if l.starts_with("250-") {
            in_ehlo = true;
        } else if in_ehlo {
            in_ehlo = false; // last line of a multi-line EHLO reply
        } else {
            v.push(l);
        }
    }
    v
}

const EHLO_REPLY: &str = "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 20971520\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n250-BINARYMIME\r\n250 DSN\r\n";

#[test]
fn full_transaction() {
    let (out, events) = run(
        &default_settings(),
        b"EHLO client.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\nSubject: hi\r\n\r\n..dot\r\n.\r\nQUIT\r\n",
    );
    assert_eq!(
        out,
        format!(
            "220 mx.test ESMTP ringmx\r\n{EHLO_REPLY}250 2.1.0 Sender ok\r\n250 2.1.5 Recipient ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued as Q1\r\n221 2.0.0 Bye\r\n"
        )
    );
    assert_eq!(
        events,
        [
            "helo client.test true",
            "mail a@b.test",
            "rcpt c@d.test",
            "start",
            "end Subject: hi\\r\\n\\r\\n.dot\\r\\n",
            "quit"
        ]
    );
}

#[test]
fn pipelined_group_costs_one_write() {
    let mut h = Harness::new(default_settings());
    h.push(b"EHLO c\r\n");
    let before = h.writes;
    h.push(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nRCPT TO:<e@d.test>\r\nDATA\r\n");
    assert_eq!(h.writes - before, 1, "{}", h.output());
    h.push(b"body\r\n.\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n");
    // The end-of-data reply ends a group (flushed), then MAIL/RCPT/DATA go out together.
    assert_eq!(h.writes - before, 3, "{}", h.output());
}

#[test]
fn sequencing() {
    let s = default_settings();
    let cases: &[(&str, &[&str])] = &[
        (
            "MAIL FROM:<a@b.test>\r\n",
            &["503 5.5.1 Send EHLO or HELO first"],
        ),
        (
            "EHLO c\r\nRCPT TO:<a@b.test>\r\n",
            &["503 5.5.1 Send MAIL first"],
        ),
        ("EHLO c\r\nDATA\r\n", &["503 5.5.1 Send MAIL first"]),
        (
            "EHLO c\r\nMAIL FROM:<a@b.test>\r\nDATA\r\n",
            &["250 2.1.0 Sender ok", "503 5.5.1 Send RCPT first"],
        ),
        (
            "EHLO c\r\nMAIL FROM:<a@b.test>\r\nMAIL FROM:<a@b.test>\r\n",
            &["250 2.1.0 Sender ok", "503 5.5.1 Sender already specified"],
        ),
        (
            "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@reject.test>\r\nDATA\r\n",
            &[
                "250 2.1.0 Sender ok",
                "550 5.1.1 No such user",
                "554 5.5.1 No valid recipients",
            ],
        ),
        (
            "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRSET\r\nRCPT TO:<c@d.test>\r\n",
            &[
                "250 2.1.0 Sender ok",
                "250 2.0.0 Ok",
                "503 5.5.1 Send MAIL first",
            ],
        ),
        (
            "EHLO c\r\nMAIL FROM:<a@b.test>\r\nEHLO c\r\nRCPT TO:<c@d.test>\r\n",
            &["250 2.1.0 Sender ok", "503 5.5.1 Send MAIL first"],
        ),
        (
            "NOOP\r\nHELP\r\nVRFY x\r\nEXPN y\r\nRSET\r\nFOO\r\n",
            &[
                "250 2.0.0 Ok",
                "214 2.0.0 See RFC 5321",
                "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery",
                "502 5.5.1 Command not implemented",
                "250 2.0.0 Ok",
                "500 5.5.1 Command unrecognized",
            ],
        ),
        ("STARTTLS\r\n", &["502 5.5.1 Command not implemented"]),
        ("AUTH PLAIN\r\n", &["503 5.5.1 Authentication not enabled"]),
        (
            "BDAT 3\r\nabc\r\n",
            &[
                "500 5.5.1 Command unrecognized",
                "500 5.5.1 Command unrecognized",
            ],
        ),
    ];
    for (input, expect) in cases {
        let s = if input.starts_with("BDAT") {
            settings(|c| {
                c.extensions.chunking = false;
                c.extensions.binarymime = false;
            })
        } else {
            s.clone()
        };
        let (out, _) = run(&s, input.as_bytes());
        let got = replies(&out);
        let expect: Vec<&str> = expect.to_vec();
        assert_eq!(got, expect, "{input:?}");
    }
}

#[test]
fn syntax_replies() {
    let s = default_settings();
    for (cmd, reply) in [
        ("MAIL FROM:<a@b.test", "501 5.1.7 Bad sender address syntax"),
        (
            "MAIL FROM:<a@b.test> FOO=1",
            "555 5.5.4 Unsupported parameter",
        ),
        (
            "MAIL FROM:<a@b.test> SIZE=x",
            "501 5.5.4 Syntax error in parameters or arguments",
        ),
        (
            "MAIL FROM:<a@b.test> SIZE=99999999",
            "552 5.3.4 Message size exceeds fixed limit",
        ),
        (
            "MAIL FROM:<jö@b.test>",
            "553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter",
        ),
        ("MAIL FROM:<jö@b.test> SMTPUTF8", "250 2.1.0 Sender ok"),
        (
            "MAIL FROM:<> BODY=8BITMIME RET=FULL ENVID=x",
            "250 2.1.0 Sender ok",
        ),
    ] {
        let (out, _) = run(&s, format!("EHLO c\r\n{cmd}\r\n").as_bytes());
        assert_eq!(replies(&out), [reply], "{cmd}");
    }
    for (cmd, reply) in [
        ("RCPT TO:<a b@c>", "501 5.1.3 Bad recipient address syntax"),
        (
            "RCPT TO:<ü@d.test>",
            "553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter",
        ),
        ("RCPT TO:<c@d.test> NOTIFY=NEVER", "250 2.1.5 Recipient ok"),
        ("RCPT TO:<c@d.test> FOO", "555 5.5.4 Unsupported parameter"),
    ] {
        let (out, _) = run(
            &s,
            format!("EHLO c\r\nMAIL FROM:<a@b.test>\r\n{cmd}\r\n").as_bytes(),
        );
        assert_eq!(replies(&out)[1..], [reply], "{cmd}");
    }
}

#[test]
fn extensions_that_are_off_refuse_their_parameters() {
    let off = settings(|c| {
        c.extensions = Extensions {
            pipelining: false,
            size: false,
            eightbitmime: false,
            smtputf8: false,
            enhanced_status_codes: true,
            chunking: false,
            binarymime: false,
            dsn: false,
            starttls: false,
        }
    });
    for cmd in [
        "MAIL FROM:<a@b.test> SIZE=10",
        "MAIL FROM:<a@b.test> BODY=8BITMIME",
        "MAIL FROM:<a@b.test> SMTPUTF8",
        "MAIL FROM:<a@b.test> RET=HDRS",
        "MAIL FROM:<a@b.test> AUTH=<>",
    ] {
        let out = lockstep(&off, &["EHLO c\r\n", &format!("{cmd}\r\n")]);
        assert!(
            out.ends_with("555 5.5.4 Unsupported parameter\r\n"),
            "{cmd}: {out}"
        );
    }
    // HELO (not EHLO) means no extensions at all.
    let out = lockstep(
        &default_settings(),
        &["HELO c\r\n", "MAIL FROM:<a@b.test> SIZE=10\r\n"],
    );
    assert_eq!(
        out,
        "220 mx.test ESMTP ringmx\r\n250 mx.test\r\n555 5.5.4 Unsupported parameter\r\n"
    );
    let (out, _) = run(&off, b"EHLO c\r\n");
    assert_eq!(
        out,
        "220 mx.test ESMTP ringmx\r\n250-mx.test\r\n250 ENHANCEDSTATUSCODES\r\n"
    );
}

#[test]
fn pipelining_without_the_offer_closes() {
    let off = settings(|c| c.extensions.pipelining = false);
    let refused =
        "554 5.5.0 Commands sent before their replies without PIPELINING, closing connection\r\n";
    // (settings, what was sent in one write after the greeting, replies before the refusal)
    let cases: [(&Arc<Settings>, &str, &str); 5] = [
        (
            &off,
            "EHLO c\r\nMAIL FROM:<a@b.test>\r\n",
            "250-mx.test\r\n",
        ),
        (&off, "HELO c\r\nNOOP\r\n", "250 mx.test\r\n"),
        // HELO means no PIPELINING even where the binding offers it.
        (
            &default_settings(),
            "HELO c\r\nMAIL FROM:<a@b.test>\r\n",
            "250 mx.test\r\n",
        ),
        (&default_settings(), "HELO c\r\nDATA\r\n", "250 mx.test\r\n"),
        (&off, "NOOP\r\nNOOP\r\n", "250 2.0.0 Ok\r\n"),
    ];
    for (s, sent, before) in cases {
        let mut h = Harness::new(s.clone());
        h.push(sent.as_bytes());
        let out = String::from_utf8_lossy(&h.out).into_owned();
        assert!(
            out.starts_with("220 mx.test ESMTP ringmx\r\n"),
            "{sent:?}: {out}"
        );
        assert!(out.contains(before), "{sent:?}: {out}");
        assert!(out.ends_with(refused), "{sent:?}: {out}");
        assert!(
            h.session.is_closed() && h.session.pipelined_unoffered(),
            "{sent:?}"
        );
        // The runtime is told to close, not to read on.
        assert_eq!(h.session.stop(), Stop::Close, "{sent:?}");
    }
    // The same commands one at a time, and pipelining after EHLO where it is offered, pass.
    let out = lockstep(
        &off,
        &["EHLO c\r\n", "MAIL FROM:<a@b.test>\r\n", "QUIT\r\n"],
    );
    assert!(out.contains("250 2.1.0") && !out.contains("554"), "{out}");
    let mut h = Harness::new(default_settings());
    h.push(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nQUIT\r\n");
    assert!(!h.session.pipelined_unoffered());
    // A BDAT chunk follows its command in the same write: that is not pipelining.
    let mut h = Harness::new(off.clone());
    h.push(b"EHLO c\r\n");
    h.push(b"MAIL FROM:<a@b.test>\r\n");
    h.push(b"RCPT TO:<c@d.test>\r\n");
    h.push(b"BDAT 4 LAST\r\nhi\r\n");
    let out = String::from_utf8_lossy(&h.out).into_owned();
    assert!(!h.session.pipelined_unoffered(), "{out}");
}

#[test]
fn enhanced_codes_can_be_turned_off() {
    let s = settings(|c| c.extensions.enhanced_status_codes = false);
    let (out, _) = run(&s, b"EHLO c\r\nRCPT TO:<a@b.test>\r\n");
    assert!(out.ends_with("\r\n503 Send MAIL first\r\n"), "{out}");
}

#[test]
fn recipient_limit() {
    let s = settings(|c| c.max_recipients = 2);
    let (out, events) = run(
        &s,
        b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<1@d.test>\r\nRCPT TO:<2@d.test>\r\nRCPT TO:<3@d.test>\r\n",
    );
    assert_eq!(
        replies(&out),
        [
            "250 2.1.0 Sender ok",
            "250 2.1.5 Recipient ok",
            "250 2.1.5 Recipient ok",
            "452 4.5.3 Too many recipients"
        ]
    );
    assert_eq!(events.iter().filter(|e| e.starts_with("rcpt")).count(), 2);
}

#[test]
fn recipient_bytes_limit() {
    // 427 bytes a recipient (a 210-byte path and its ORCPT): 306 fit in 128 KiB.
    let s = default_settings();
    let mut pieces = vec!["EHLO c\r\n".to_string(), "MAIL FROM:<a@b.test>\r\n".into()];
    for i in 0..400 {
        let to = format!("{i:03}{}@d.test", "x".repeat(200));
        pieces.push(format!("RCPT TO:<{to}> ORCPT=rfc822;{to}\r\n"));
    }
    pieces.push("RSET\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n".into());
    let pieces: Vec<&str> = pieces.iter().map(String::as_str).collect();
    let out = lockstep(&s, &pieces);
    let r = replies(&out);
    let count = |want: &str| r.iter().filter(|l| **l == want).count();
    assert_eq!(count("250 2.1.5 Recipient ok"), 306 + 1, "{r:?}");
    assert_eq!(count("452 4.5.3 Too many recipients"), 400 - 306);
    // The next transaction starts from nothing.
    assert_eq!(r.last().copied(), Some("250 2.1.5 Recipient ok"));
}

#[test]
fn message_size_limit() {
    let s = settings(|c| c.max_message_size = 10);
    let (out, events) = run(
        &s,
        b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n0123456789\r\n.\r\nNOOP\r\n",
    );
    assert_eq!(
        replies(&out)[3..],
        ["552 5.3.4 Message size exceeds fixed limit", "250 2.0.0 Ok"]
    );
    assert_eq!(events.last().map(String::as_str), Some("aborted"));
    // Exactly at the limit is fine.
    let (out, _) = run(
        &s,
        b"EHLO c\r\nMAIL FROM:<a@b.test> SIZE=10\r\nRCPT TO:<c@d.test>\r\nDATA\r\n01234567\r\n.\r\n",
    );
    assert!(out.ends_with("250 2.0.0 Ok: queued as Q1\r\n"), "{out}");
}

#[test]
fn too_many_errors_closes() {
    let s = settings(|c| c.max_errors = 3);
    let (out, _) = run(&s, b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n");
    assert_eq!(
        replies(&out),
        [
            "500 5.5.1 Command unrecognized",
            "500 5.5.1 Command unrecognized",
            "500 5.5.1 Command unrecognized",
            "421 4.7.0 Too many errors, closing connection"
        ]
    );
}

#[test]
fn a_refused_bdat_chunk_too_large_to_skip_closes() {
    let s = settings(|c| c.max_message_size = 1000);
    let (out, _) = run(&s, b"EHLO c\r\nBDAT 1001\r\nxyz");
    assert_eq!(
        replies(&out),
        [
            "503 5.5.1 Send MAIL first",
            "421 4.7.0 Refused BDAT chunk too large to skip, closing connection"
        ]
    );
    // One that fits is read and skipped, and the session goes on.
    let (out, _) = run(&s, b"EHLO c\r\nBDAT 3\r\nxyzNOOP\r\n");
    assert_eq!(replies(&out), ["503 5.5.1 Send MAIL first", "250 2.0.0 Ok"]);
}

#[test]
fn junk_commands_count_as_errors_past_the_limit() {
    let s = settings(|c| {
        c.max_errors = 3;
        c.max_junk_commands = 40;
    });
    let n = 40;
    // NOOP, RSET, VRFY and HELP are answered; past the limit each also counts as an error.
    let mut input = b"EHLO c\r\n".to_vec();
    for verb in ["NOOP", "RSET", "VRFY x", "HELP"]
        .iter()
        .cycle()
        .take(n + 3)
    {
        input.extend_from_slice(format!("{verb}\r\n").as_bytes());
    }
    let (out, _) = run(&s, &input);
    let r = replies(&out);
    // (EHLO counts too: the limit is passed one command earlier.)
    assert_eq!(r.len(), n + 3, "{r:?}");
    assert_eq!(
        r.last().copied(),
        Some("421 4.7.0 Too many errors, closing connection")
    );
    // Transactions refused (MAIL, RCPT, the message by policy, content aborted) move no mail
    // either: one every few minutes cannot hold the connection for ever.
    // (Refused recipients count once a transaction, RSET once: half as many rounds.)
    for (refused, rounds) in [
        ("MAIL FROM:<a@reject.test>\r\n", n + 3),
        (
            "MAIL FROM:<a@b.test>\r\nRCPT TO:<c@reject.test>\r\nRCPT TO:<e@reject.test>\r\nRSET\r\n",
            n / 2 + 3,
        ),
        (
            "MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\nREJECT\r\n.\r\n",
            n + 3,
        ),
        (
            "MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n folded\r\n.\r\n",
            n + 3,
        ),
    ] {
        let mut input = b"EHLO c\r\n".to_vec();
        for _ in 0..rounds {
            input.extend_from_slice(refused.as_bytes());
        }
        let (out, _) = run(&s, &input);
        assert!(
            out.ends_with("421 4.7.0 Too many errors, closing connection\r\n"),
            "{refused:?}: {}",
            out.get(out.len().saturating_sub(300)..).unwrap_or_default()
        );
    }
    // A message too big counts with BDAT as with DATA.
    let small = settings(|c| {
        c.max_errors = 3;
        c.max_junk_commands = 40;
        c.max_message_size = 20;
    });
    let round = format!(
        "MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nBDAT 30 LAST\r\n{}",
        "x".repeat(30)
    );
    let (out, _) = run(
        &small,
        format!("EHLO c\r\n{}", round.repeat(n + 3)).as_bytes(),
    );
    assert!(
        out.ends_with("421 4.7.0 Too many errors, closing connection\r\n"),
        "{}",
        out.get(out.len().saturating_sub(300)..).unwrap_or_default()
    );
    // But one transaction's refused recipients count once: a list message whose recipients
    // meet a rate limit still goes to those accepted.
    let mut input = b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n".to_vec();
    input.extend_from_slice(&b"RCPT TO:<c@reject.test>\r\n".repeat(n * 3));
    input.extend_from_slice(b"DATA\r\nx\r\n.\r\n");
    let (out, _) = run(&s, &input);
    assert!(
        out.ends_with("250 2.0.0 Ok: queued as Q1\r\n") && !out.contains("421"),
        "{}",
        out.get(out.len().saturating_sub(300)..).unwrap_or_default()
    );
    // A message accepted starts the count again: a client that sends RSET before each
    // message it delivers goes on.
    let mut input = b"EHLO c\r\n".to_vec();
    for _ in 0..3 {
        input.extend_from_slice(&b"RSET\r\n".repeat(n));
        input
            .extend_from_slice(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\nx\r\n.\r\n");
    }
    input.extend_from_slice(b"NOOP\r\n");
    let (out, _) = run(&s, &input);
    assert!(
        out.ends_with("250 2.0.0 Ok\r\n") && !out.contains("421"),
        "{out}"
    );
}

#[test]
fn over_long_line_is_refused_and_session_goes_on() {
    let s = settings(|c| c.max_line = 512);
    let mut input = b"EHLO c\r\nMAIL FROM:<".to_vec();
    input.extend(std::iter::repeat_n(b'a', 2000));
    input.extend_from_slice(b"@b.test>\r\nNOOP\r\n");
    let (out, _) = run(&s, &input);
    assert_eq!(replies(&out), ["500 5.5.6 Line too long", "250 2.0.0 Ok"]);
    // A line of exactly max_line bytes (CRLF included) is fine.
    let mut input = b"NOOP ".to_vec();
    input.extend(std::iter::repeat_n(b'x', 512 - 7));
    input.extend_from_slice(b"\r\n");
    let (out, _) = run(&s, &input);
    assert_eq!(replies(&out), ["250 2.0.0 Ok"]);
}

#[test]
fn bare_line_endings_rejected_by_default() {
    let (out, events) = run(
        &default_settings(),
        b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\nline\nmore\r\n.\r\nNOOP\r\n",
    );
    assert_eq!(
        replies(&out)[3..],
        [
            "550 5.6.0 Bare CR or LF in message content is not allowed, use CRLF (RFC 5321 section 2.3.8)",
            "250 2.0.0 Ok"
        ]
    );
    assert_eq!(events.last().map(String::as_str), Some("aborted"));
}

#[test]
fn bare_line_endings_normalized_when_configured() {
    let s = settings(|c| c.bare_line_policy = BareLinePolicy::Normalize);
    let (out, events) = run(
        &s,
        b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\nline\nmore\rend\r\n.\r\n",
    );
    assert!(out.ends_with("250 2.0.0 Ok: queued as Q1\r\n"));
    assert_eq!(
        events.last().map(String::as_str),
        Some("end line\\r\\nmore\\r\\nend\\r\\n")
    );
}

#[test]
fn smuggled_transaction_stays_inside_the_message() {
    for policy in [BareLinePolicy::Reject, BareLinePolicy::Normalize] {
        let s = settings(|c| c.bare_line_policy = policy);
        for smuggle in ["\n.\n", "\n.\r\n", "\r.\r\n", "\r\n.\r"] {
            let input = format!(
                "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\nhi{smuggle}MAIL FROM:<evil@x.test>\r\nRCPT TO:<v@d.test>\r\nDATA\r\nforged\r\n.\r\nQUIT\r\n"
            );
            let (_, events) = run(&s, input.as_bytes());
            assert_eq!(
                events.iter().filter(|e| e.starts_with("mail")).count(),
                1,
                "{smuggle:?} {policy:?}: {events:?}"
            );
            assert_eq!(events.last().map(String::as_str), Some("quit"));
        }
    }
}

#[test]
fn bdat() {
    let s = default_settings();
    let (out, events) = run(
        &s,
        b"EHLO c\r\nMAIL FROM:<a@b.test> BODY=BINARYMIME\r\nRCPT TO:<c@d.test>\r\nBDAT 5\r\nab\r\ncBDAT 3 LAST\r\n\n.\nQUIT\r\n",
    );
    assert_eq!(
        replies(&out)[2..],
        [
            "250 2.0.0 Chunk received",
            "250 2.0.0 Ok: queued as Q1",
            "221 2.0.0 Bye"
        ]
    );
    assert_eq!(events[3..], ["start", "end ab\\r\\nc\\n.\\n", "quit"]);

    let (out, events) = run(
        &s,
        b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nBDAT 0 LAST\r\n",
    );
    assert!(out.ends_with("250 2.0.0 Ok: queued as Q1\r\n"));
    assert_eq!(events[3..], ["start", "end "]);
}

/// The same content rules hold on both paths: bare CR/LF by the policy (BDAT chunks too, a CR
/// ending one chunk and an LF starting the next being one CRLF), NUL refused outside
/// BINARYMIME, and content that starts with a folded line refused (it would continue the
/// last header ringmx prepends).
#[test]
fn content_rules_hold_for_data_and_bdat() {
    const BARE: &str = "550 5.6.0 Bare CR or LF in message content is not allowed, use CRLF (RFC 5321 section 2.3.8)";
    const NUL: &str =
        "550 5.6.0 NUL characters in message content are not allowed (RFC 5322 section 2.3)";
    const FOLDED: &str =
        "550 5.6.0 Message content must not begin with a folded line (RFC 5322 section 2.2.3)";
    const OK: &str = "250 2.0.0 Ok: queued as Q1";
    let data = |body: &str| format!("DATA\r\n{body}\r\n.\r\n");
    let bdat = |chunks: &[&str]| {
        let mut s = String::new();
        for (i, c) in chunks.iter().enumerate() {
            let last = if i + 1 == chunks.len() { " LAST" } else { "" };
            s.push_str(&format!("BDAT {}{last}\r\n{c}", c.len()));
        }
        s
    };
    use BareLinePolicy::{Normalize, Reject};
    let cases: Vec<(BareLinePolicy, &str, String, &str, Option<&str>)> = vec![
        (Reject, "", data("a\nb"), BARE, None),
        (Reject, "", bdat(&["a\nb\r\n"]), BARE, None),
        (Reject, "", bdat(&["a\r", "b\r\n"]), BARE, None),
        (Reject, "", bdat(&["a\r\n", "b\r"]), BARE, None),
        (
            Reject,
            "",
            bdat(&["a\r", "\nb\r\n"]),
            OK,
            Some("a\\r\\nb\\r\\n"),
        ),
        (
            Normalize,
            "",
            bdat(&["a\n.\n", "b\r"]),
            OK,
            Some("a\\r\\n.\\r\\nb\\r\\n"),
        ),
        (
            Normalize,
            "",
            bdat(&["\r.\r", "\nx"]),
            OK,
            Some("\\r\\n.\\r\\nx"),
        ),
        (Reject, "", data("a\0b"), NUL, None),
        (Reject, "", bdat(&["a\r\n", "\0\r\n"]), NUL, None),
        (
            Reject,
            " BODY=BINARYMIME",
            bdat(&["a\0\nb"]),
            OK,
            Some("a\\0\\nb"),
        ),
        (Reject, "", data(" X-ASWL: pass"), FOLDED, None),
        (Reject, "", data("\tx"), FOLDED, None),
        (Reject, "", data(". x"), FOLDED, None),
        (Reject, "", bdat(&[" x\r\n"]), FOLDED, None),
        (Reject, " BODY=BINARYMIME", bdat(&["\tx"]), FOLDED, None),
        (Reject, "", data("x\r\n y"), OK, Some("x\\r\\n y\\r\\n")),
    ];
    for (policy, body, transfer, reply, content) in cases {
        let s = settings(|c| c.bare_line_policy = policy);
        let input = format!(
            "EHLO c\r\nMAIL FROM:<a@b.test>{body}\r\nRCPT TO:<c@d.test>\r\n{transfer}NOOP\r\n"
        );
        let (out, events) = run(&s, input.as_bytes());
        let r = replies(&out);
        assert_eq!(
            r.get(r.len() - 2),
            Some(&reply),
            "{policy:?} {transfer:?}: {r:?}"
        );
        assert_eq!(
            r.last(),
            Some(&"250 2.0.0 Ok"),
            "{transfer:?}: the session goes on"
        );
        match content {
            Some(c) => assert_eq!(events.last(), Some(&format!("end {c}")), "{transfer:?}"),
            None => assert_eq!(
                events.last().map(String::as_str),
                Some("aborted"),
                "{transfer:?}"
            ),
        }
    }
}

#[test]
fn bdat_refused_still_consumes_its_chunk() {
    let s = default_settings();
    let (out, events) = run(&s, b"EHLO c\r\nBDAT 10\r\nQUIT\r\nQUITNOOP\r\n");
    assert_eq!(replies(&out), ["503 5.5.1 Send MAIL first", "250 2.0.0 Ok"]);
    assert!(!events.iter().any(|e| e == "quit"));
    let (out, _) = run(
        &s,
        b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@reject.test>\r\nBDAT 4 LAST\r\nNOOPNOOP\r\n",
    );
    assert_eq!(
        replies(&out)[2..],
        ["554 5.5.1 No valid recipients", "250 2.0.0 Ok"]
    );
}

#[test]
fn bdat_size_limit_counts_every_chunk() {
    let s = settings(|c| c.max_message_size = 8);
    let (out, events) = run(
        &s,
        b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nBDAT 5\r\n12345BDAT 5 LAST\r\n67890NOOP\r\n",
    );
    assert_eq!(
        replies(&out)[2..],
        [
            "250 2.0.0 Chunk received",
            "552 5.3.4 Message size exceeds fixed limit",
            "250 2.0.0 Ok"
        ]
    );
    assert_eq!(events.last().map(String::as_str), Some("aborted"));
}

#[test]
fn data_and_bdat_do_not_mix() {
    let s = default_settings();
    let (out, _) = run(
        &s,
        b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nBDAT 1\r\nxDATA\r\n",
    );
    assert!(
        out.ends_with("503 5.5.1 Bad sequence of commands\r\n"),
        "{out}"
    );
    let (out, _) = run(
        &s,
        b"EHLO c\r\nMAIL FROM:<a@b.test> BODY=BINARYMIME\r\nRCPT TO:<c@d.test>\r\nDATA\r\n",
    );
    assert!(
        out.ends_with("503 5.5.1 BINARYMIME requires BDAT, not DATA\r\n"),
        "{out}"
    );
}

fn tls_settings() -> Arc<Settings> {
    settings(|c| {
        c.extensions.starttls = true;
        c.auth = Some(AuthSettings::default());
    })
}

#[test]
fn starttls_upgrade_resets_the_session() {
    let s = tls_settings();
    let mut h = Harness::new(s.clone());
    h.push(b"EHLO c\r\n");
    assert!(h.output().contains("250 STARTTLS\r\n"), "{}", h.output());
    assert!(
        !h.output().contains("AUTH"),
        "AUTH only after TLS by default"
    );
    h.push(b"STARTTLS\r\n");
    assert!(h.output().ends_with("220 2.0.0 Ready to start TLS\r\n"));
    assert!(h.session.is_tls());
    h.out.clear();
    h.push(b"MAIL FROM:<a@b.test>\r\nEHLO c\r\n");
    let out = h.output();
    assert!(
        out.starts_with("503 5.5.1 Send EHLO or HELO first\r\n"),
        "{out}"
    );
    assert!(
        !out.contains("STARTTLS") && out.contains("250 AUTH PLAIN LOGIN\r\n"),
        "{out}"
    );
    h.out.clear();
    h.push(b"STARTTLS\r\n");
    assert_eq!(h.output(), "503 5.5.1 Bad sequence of commands\r\n");
}

#[test]
fn starttls_with_pipelined_commands_is_refused() {
    // CVE-2011-0411: plaintext after STARTTLS in the same read.
    let s = tls_settings();
    let mut h = Harness::new(s);
    h.push(b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<a@b.test>\r\n");
    assert!(
        h.output().ends_with(
            "554 5.5.1 Commands pipelined after STARTTLS are refused, closing connection\r\n"
        ),
        "{}",
        h.output()
    );
    assert!(h.session.is_closed() && !h.session.is_tls());
    assert!(
        !h.events
            .iter()
            .any(|e| e.starts_with("mail") || e == "starttls")
    );
}

#[test]
fn auth_plain_and_login() {
    let s = settings(|c| {
        c.auth = Some(AuthSettings {
            require_tls: false,
            ..AuthSettings::default()
        })
    });
    // "\0user\0pass" and "\0user\0nope"
    let cases: &[(&str, &[&str])] = &[
        (
            "AUTH PLAIN AHVzZXIAcGFzcw==\r\n",
            &["235 2.7.0 Authentication successful"],
        ),
        (
            "AUTH PLAIN\r\nAHVzZXIAcGFzcw==\r\n",
            &["334 ", "235 2.7.0 Authentication successful"],
        ),
        (
            "AUTH PLAIN AHVzZXIAbm9wZQ==\r\n",
            &["535 5.7.8 Authentication credentials invalid"],
        ),
        (
            "AUTH PLAIN\r\n*\r\n",
            &["334 ", "501 5.7.0 Authentication cancelled"],
        ),
        ("AUTH PLAIN !!!\r\n", &["501 5.5.2 Cannot decode response"]),
        (
            "AUTH PLAIN dXNlcg==\r\n",
            &["501 5.5.2 Cannot decode response"],
        ),
        (
            "AUTH LOGIN\r\ndXNlcg==\r\ncGFzcw==\r\n",
            &[
                "334 VXNlcm5hbWU6",
                "334 UGFzc3dvcmQ6",
                "235 2.7.0 Authentication successful",
            ],
        ),
        (
            "AUTH LOGIN dXNlcg==\r\ncGFzcw==\r\n",
            &["334 UGFzc3dvcmQ6", "235 2.7.0 Authentication successful"],
        ),
        (
            "AUTH PLAIN AHVzZXIAcGFzcw==\r\nAUTH PLAIN AHVzZXIAcGFzcw==\r\n",
            &[
                "235 2.7.0 Authentication successful",
                "503 5.5.1 Bad sequence of commands",
            ],
        ),
        (
            "AUTH CRAM-MD5\r\n",
            &["504 5.5.4 Unrecognized authentication type"],
        ),
    ];
    for (input, expect) in cases {
        let (out, _) = run(&s, format!("EHLO c\r\n{input}").as_bytes());
        assert_eq!(replies(&out), *expect, "{input:?}");
    }
    // Without TLS where TLS is required:
    let (out, _) = run(
        &tls_settings(),
        b"EHLO c\r\nAUTH PLAIN AHVzZXIAcGFzcw==\r\n",
    );
    assert_eq!(
        replies(&out),
        ["538 5.7.11 Encryption required for requested authentication mechanism"]
    );
}

#[test]
fn timeout_closes_with_421() {
    let s = default_settings();
    let now = Instant::now();
    let mut session = Session::new(s, now);
    session.clear_output();
    assert!(!session.check_timeout(now + Duration::from_secs(299)));
    assert!(session.check_timeout(now + Duration::from_secs(300)));
    assert_eq!(
        session.output(),
        b"421 4.4.2 Timeout exceeded, closing connection\r\n"
    );
    assert!(session.is_closed());
}

/// The idle timeout runs from the last complete command line or the last content: bytes of
/// a partial line or of an over-long line being skipped, trickled one at a time, do not hold
/// the session open, nor those of a refused BDAT chunk past `max_transaction_time`.
#[test]
fn only_commands_and_content_hold_off_the_timeout() {
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    // Feed `input` at `t` (with what was not consumed before), answering every decision.
    fn push(session: &mut Session, held: &mut Vec<u8>, input: &[u8], t: Instant) {
        held.extend_from_slice(input);
        loop {
            let mut feed = session.feed(held, t);
            while let Some(ev) = feed.next() {
                if matches!(ev, Event::Mail { .. } | Event::Rcpt { .. }) {
                    feed.accept();
                }
                if matches!(ev, Event::MessageEnd { .. }) {
                    feed.accept_message("Q");
                }
            }
            let (used, stop) = (feed.consumed(), feed.stop());
            held.drain(..used);
            session.clear_output();
            if stop != Stop::Flush {
                return;
            }
        }
    }
    let big = "x".repeat(3000);
    // (what arrives when, after EHLO at 0; the last moment the session is still open)
    let cases: [(&[(u64, &str)], u64); 6] = [
        // A complete command moves the timeout.
        (&[(200, "NOOP\r\n")], 499),
        // A partial line does not, however it trickles.
        (&[(100, "NO"), (200, "O"), (290, "P")], 299),
        // Nor does a line too long, being skipped.
        (&[(100, &big), (200, &big), (290, "x")], 299),
        // Content does: data_timeout (180 s) runs from the last of it.
        (
            &[
                (10, "MAIL FROM:<a@b.test>\r\n"),
                (20, "RCPT TO:<u@example.test>\r\n"),
                (30, "DATA\r\n"),
                (100, "Subject: x\r\n"),
                (200, "more\r\n"),
            ],
            379,
        ),
        // A BDAT chunk of a transaction is content.
        (
            &[
                (10, "MAIL FROM:<a@b.test>\r\n"),
                (20, "RCPT TO:<u@example.test>\r\n"),
                (30, "BDAT 100\r\n"),
                (100, "Subject: x\r\n"),
                (200, "more\r\n"),
            ],
            379,
        ),
        // A refused one (no transaction) too, but it must arrive within max_transaction_time
        // (600 s) of its command, however steadily it trickles.
        (
            &[
                (10, "BDAT 100\r\n"),
                (150, "x"),
                (300, "x"),
                (450, "x"),
                (590, "x"),
            ],
            609,
        ),
    ];
    for (i, (steps, open_until)) in cases.into_iter().enumerate() {
        let mut session = Session::new(default_settings(), t0);
        let mut held = Vec::new();
        push(&mut session, &mut held, b"EHLO c\r\n", t0);
        for (t, input) in steps {
            push(&mut session, &mut held, input.as_bytes(), at(*t));
            assert!(!session.is_closed(), "case {i}: closed at {t}");
        }
        assert!(!session.check_timeout(at(open_until)), "case {i}");
        assert!(session.check_timeout(at(open_until + 1)), "case {i}");
    }
}

#[test]
fn unanswered_decision_holds_the_session() {
    let now = Instant::now();
    let mut session = Session::new(default_settings(), now);
    let input = b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nNOOP\r\n";
    let mut feed = session.feed(input, now);
    assert_eq!(feed.next(), None);
    assert_eq!(feed.stop(), Stop::Flush, "the greeting goes out first");
    feed.clear_output();
    assert!(matches!(feed.next(), Some(Event::Helo { .. })));
    assert_eq!(feed.next(), None);
    assert_eq!(feed.stop(), Stop::Flush);
    assert!(matches!(feed.next(), Some(Event::Mail { .. })));
    assert_eq!(feed.next(), None);
    assert_eq!(feed.stop(), Stop::Decision);
    let consumed = feed.consumed();
    assert_eq!(&input[consumed..], b"NOOP\r\n");
    // Decided later (as after an await), the session goes on with the rest.
    session.accept();
    let mut feed = session.feed(&input[consumed..], now);
    assert_eq!(feed.next(), None);
    assert_eq!(feed.stop(), Stop::Flush);
    assert!(
        feed.output()
            .ends_with(b"250 2.1.0 Sender ok\r\n250 2.0.0 Ok\r\n")
    );
}

#[test]
fn settings_are_validated() {
    let bad = |f: fn(&mut SessionConfig)| {
        let mut c = SessionConfig::default();
        f(&mut c);
        Settings::new(c).unwrap_err().field
    };
    assert_eq!(bad(|c| c.max_line = 100), "max_line");
    assert_eq!(bad(|c| c.hostname = "a b".into()), "hostname");
    assert_eq!(bad(|c| c.max_errors = 0), "max_errors");
    assert_eq!(
        bad(|c| c.extensions.chunking = false),
        "extensions.binarymime"
    );
}
