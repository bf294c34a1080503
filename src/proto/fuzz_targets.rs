//! Bodies of the cargo-fuzz targets, kept in the library so `cargo test` can replay the
//! committed corpus and every crash file through exactly the same code (see `fuzz/`).

use std::sync::Arc;
use std::time::Instant;

use super::data::{BareLinePolicy, Chunk, DataReader, oracle};
use super::{AuthSettings, Event, Reply, Session, SessionConfig, Settings, Stop, address, command};

/// Command parser (and the PROXY header parser, which reads the same kind of untrusted first
/// line): never panic; what they return is consistent with the input.
pub fn command(data: &[u8]) {
    if let Ok(super::proxy::Parsed::Done(_, n)) = super::proxy::parse(data) {
        assert!(n <= data.len());
    }
    // Differential: the one-pass framed parser agrees with framing, then parsing the line.
    for cap in [512, 2048, 16] {
        let slow = match super::line::frame(data, cap) {
            super::line::Frame::Line { line, consumed } => {
                command::Framed::Command(command::parse(line), consumed)
            }
            super::line::Frame::Partial => command::Framed::Partial,
            super::line::Frame::TooLong { consumed } => command::Framed::TooLong { consumed },
        };
        assert_eq!(command::parse_framed(data, cap), slow, "cap {cap}");
    }
    let line = data.split(|&b| b == b'\n').next().unwrap_or_default();
    match command::parse(line) {
        Ok(command::Command::Mail { from: Some(a), .. })
        | Ok(command::Command::Rcpt { to: a, .. }) => {
            assert!(contains(line, a.as_str().as_bytes()));
        }
        Ok(_) => {}
        Err(e) => assert!(e.reply().is_error()),
    }
}

/// Address parser: the parts of a parsed address put together give the address back, and the
/// rest is a suffix of the input.
pub fn address(data: &[u8]) {
    if let Some((a, rest)) = address::forward_path(data) {
        check_address(&a);
        assert!(data.ends_with(rest));
    }
    if let Some((a, rest)) = address::reverse_path(data) {
        if let Some(a) = a {
            check_address(&a);
        }
        assert!(data.ends_with(rest));
    }
    if let Some(a) = address::mailbox(data) {
        check_address(&a);
        assert_eq!(a.as_str().as_bytes(), data);
    }
}

fn check_address(a: &address::Address<'_>) {
    if a.is_bare_postmaster() {
        assert!(a.as_str().eq_ignore_ascii_case("postmaster"));
    } else {
        assert_eq!(format!("{}@{}", a.local_part(), a.domain()), a.as_str());
        assert!(!a.local_part().is_empty() && !a.domain().is_empty());
        assert_eq!(a.is_utf8(), !a.as_str().is_ascii());
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(hay, needle).is_some()
}

/// DATA reader, differential: the fast reader fed in chunks must agree with the byte-at-a-time
/// oracle on content, end position and the bare-line-ending verdict.
/// Byte 0: bit 0 = policy, the rest = chunk size.
pub fn data(data: &[u8]) {
    let Some((&ctl, input)) = data.split_first() else {
        return;
    };
    let policy = if ctl & 1 == 0 {
        BareLinePolicy::Reject
    } else {
        BareLinePolicy::Normalize
    };
    let step = usize::from(ctl >> 1).max(1);
    let expect = oracle::read(input, policy);
    let mut r = DataReader::new(policy);
    let mut content = Vec::new();
    let mut consumed = 0usize;
    let mut end = None;
    'outer: for chunk in input.chunks(step) {
        let mut piece = chunk;
        loop {
            let (used, out) = r.next(piece);
            consumed += used;
            piece = piece.get(used..).unwrap_or_default();
            match out {
                Chunk::Data(d) => content.extend_from_slice(d),
                Chunk::NeedMore => break,
                Chunk::End => {
                    end = Some(consumed);
                    break 'outer;
                }
            }
        }
    }
    assert_eq!(content, expect.content, "content");
    assert_eq!(end, expect.end, "end of data");
    assert_eq!(r.saw_bare_line_ending(), expect.bare, "bare verdict");
}

/// Tokens the session target maps bytes onto, so the fuzzer reaches every state quickly.
const ALPHABET: &[&[u8]] = &[
    b"EHLO x.test\r\n",
    b"HELO x\r\n",
    b"MAIL FROM:<a@b.test>",
    b"MAIL FROM:<>",
    b"RCPT TO:<c@d.test>",
    b"RCPT TO:<x@reject.test>",
    b" SIZE=100",
    b" BODY=BINARYMIME",
    b" SMTPUTF8",
    b" NOTIFY=NEVER",
    b"DATA\r\n",
    b"BDAT ",
    b" LAST",
    b"STARTTLS\r\n",
    b"AUTH PLAIN",
    b"AUTH LOGIN\r\n",
    b" AHVzZXIAcGFzcw==",
    b"dXNlcg==\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"QUIT\r\n",
    b"\r\n",
    b"\r\n.\r\n",
    b".",
    b"\r",
    b"\n",
    b" ",
    b"<",
    b">",
    b"@",
    b"*",
    b"0",
    b"1",
    b"9",
    "é".as_bytes(),
];

/// Whole session. Byte 0: bit 7 = raw mode (bytes as they are, for recorded transcripts) or
/// alphabet mode; bits 0..=3 = chunk size; bit 4 = normalize; bits 5..=6 pick limits. In
/// alphabet mode every further byte below the alphabet's length is a token, others are raw.
pub fn session(data: &[u8]) {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let input: Vec<u8> = if ctl & 0x80 != 0 {
        rest.to_vec()
    } else {
        let mut v = Vec::with_capacity(rest.len() * 4);
        for &b in rest {
            match ALPHABET.get(usize::from(b)) {
                Some(tok) => v.extend_from_slice(tok),
                None => v.push(b),
            }
        }
        v
    };
    let step = usize::from(ctl & 0x0f) * 7 + 1;
    let cfg = SessionConfig {
        hostname: "mx.test".into(),
        max_line: 512,
        max_message_size: if ctl & 0x20 != 0 { 64 } else { 4096 },
        max_recipients: if ctl & 0x40 != 0 { 2 } else { 100 },
        max_errors: 30,
        max_junk_commands: 100,
        bare_line_policy: if ctl & 0x10 != 0 {
            BareLinePolicy::Normalize
        } else {
            BareLinePolicy::Reject
        },
        auth: Some(AuthSettings {
            require_tls: false,
            ..AuthSettings::default()
        }),
        extensions: super::Extensions {
            starttls: true,
            ..super::Extensions::default()
        },
        ..SessionConfig::default()
    };
    let Ok(settings) = Settings::new(cfg) else {
        return;
    };
    run_session(Arc::new(settings), &input, step);
}

fn run_session(settings: Arc<Settings>, input: &[u8], step: usize) {
    let now = Instant::now();
    let max_line = settings.config().max_line;
    let max_size = settings.config().max_message_size;
    let mut session = Session::new(settings, now);
    let mut buf: Vec<u8> = Vec::new();
    let mut out: Vec<u8> = Vec::new();
    let mut flip = false;
    let mut body = 0u64;
    for chunk in input.chunks(step) {
        if session.is_closed() {
            break;
        }
        buf.extend_from_slice(chunk);
        let mut feed = session.feed(&buf, now);
        loop {
            match feed.next() {
                Some(ev) => {
                    flip = !flip;
                    match ev {
                        Event::Mail { .. } | Event::Rcpt { .. } if flip => feed.accept(),
                        Event::Mail { .. } | Event::Rcpt { .. } => {
                            feed.reject(&Reply::new(550, "5.7.1", "no"))
                        }
                        Event::MessageStart => body = 0,
                        Event::Body(b) => {
                            body += b.len() as u64;
                            assert!(body <= max_size, "body beyond the size limit delivered");
                        }
                        Event::MessageEnd { size } => {
                            assert_eq!(size, body);
                            feed.accept_message("Q")
                        }
                        Event::Auth(_) if flip => feed.accept(),
                        Event::Auth(_) => feed.reject(&super::reply::AUTH_FAILED),
                        _ => {}
                    }
                }
                None => {
                    out.extend_from_slice(feed.output());
                    feed.clear_output();
                    match feed.stop() {
                        Stop::Flush => continue,
                        Stop::StartTls => {
                            feed.tls_established();
                            continue;
                        }
                        Stop::Decision => unreachable!("every decision is taken"),
                        Stop::NeedInput | Stop::Close => break,
                    }
                }
            }
        }
        let consumed = feed.consumed();
        buf.drain(..consumed);
        assert!(
            buf.len() < max_line,
            "unconsumed input grew past the line cap"
        );
    }
    // Every reply line is `DDD[ -]text CRLF`.
    for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        assert!(line.ends_with(b"\r"), "reply line without CRLF");
        assert!(line.len() >= 4 && line.iter().take(3).all(u8::is_ascii_digit));
        assert!(matches!(line.get(3), Some(b' ' | b'-')));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn targets_run_on_simple_inputs() {
        super::command(b"MAIL FROM:<a@b.example> SIZE=10\r\n");
        super::address(b"<a@b.example>");
        super::data(b"\x07hello\r\n..x\r\n.\r\n");
        super::session(
            b"\x80EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n",
        );
        super::session(&[0x03, 0, 2, 4, 10, 25, 22, 20]);
    }
}
