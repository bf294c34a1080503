//! Parsing a next hop's replies (RFC 5321 §4.2): `DDD-text` continuation lines ending with a
//! `DDD text` (or bare `DDD`) line, all with the same code. Untrusted input: bounds-checked,
//! capped, never panics (fuzzed by the `reply` target).

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )
)]

/// One complete reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// The enhanced status code (RFC 3463) of the first line, when there is one.
    pub enhanced: Option<(u8, u16, u16)>,
    /// The text lines, without code and separator.
    pub lines: Vec<String>,
}

/// Lines longer than this, or replies with more lines, are a protocol error.
pub const MAX_LINE: usize = 4096;
pub const MAX_LINES: usize = 256;
/// Text kept of one reply (what is logged, shown by `ringmx queue`, and put in notices): its
/// lines while they fit (the first one cut to fit); the rest of a longer reply is read and
/// dropped. RFC 5321 §4.5.3.1.5 allows 512 bytes a line.
pub const MAX_TEXT: usize = 4096;

/// Why the bytes are not a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyError {
    Malformed,
    TooLong,
}

impl Reply {
    pub fn class(&self) -> u16 {
        self.code / 100
    }
    pub fn is_positive(&self) -> bool {
        self.class() == 2
    }
    pub fn is_transient(&self) -> bool {
        self.class() == 4
    }
    pub fn is_permanent(&self) -> bool {
        self.class() == 5
    }

    /// A reply made here (connection failures, local errors), in the same shape.
    pub fn local(code: u16, enhanced: (u8, u16, u16), text: &str) -> Reply {
        Reply {
            code,
            enhanced: Some(enhanced),
            lines: vec![text.to_string()],
        }
    }

    /// `550 5.1.1 text` on one line (logs, DSN diagnostic codes).
    pub fn one_line(&self) -> String {
        let text = self.lines.join(" ");
        match self.enhanced {
            Some((a, b, c)) if !text.starts_with(&format!("{a}.{b}.{c}")) => {
                format!("{} {a}.{b}.{c} {text}", self.code)
            }
            _ => format!("{} {text}", self.code),
        }
    }

    /// The status for a DSN: the enhanced code, or one derived from the class.
    pub fn status(&self) -> String {
        match self.enhanced {
            Some((a, b, c)) => format!("{a}.{b}.{c}"),
            None => format!("{}.0.0", self.class()),
        }
    }
}

/// A reply line's text as kept: at most `room` bytes, invalid UTF-8 replaced, and control
/// characters (C0, DEL, C1: a bare CR, terminal escapes) as `?`, a tab as a space. The text
/// goes into logs, the operator's terminal and notices sent to senders, where a CR would end
/// a line (and could start a MIME part) for lenient readers.
fn text_of(text: &[u8], room: usize) -> String {
    let mut out = String::with_capacity(text.len().min(room));
    for c in String::from_utf8_lossy(text).chars() {
        let c = match c {
            '\t' => ' ',
            c if c.is_control() => '?',
            c => c,
        };
        if out.len() + c.len_utf8() > room {
            break;
        }
        out.push(c);
    }
    out
}

/// Parse one reply from the start of `buf`: `Ok(None)` when more bytes are needed, otherwise
/// the reply and how many bytes it used.
pub fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, ReplyError> {
    let mut pos = 0;
    let mut code: Option<u16> = None;
    let mut lines = Vec::new();
    let (mut count, mut kept, mut keeping) = (0, 0, true);
    loop {
        let rest = buf.get(pos..).unwrap_or_default();
        let Some(lf) = memchr::memchr(b'\n', rest) else {
            return if rest.len() > MAX_LINE {
                Err(ReplyError::TooLong)
            } else {
                Ok(None)
            };
        };
        if lf > MAX_LINE {
            return Err(ReplyError::TooLong);
        }
        let line = rest.get(..lf).unwrap_or_default();
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        pos += lf + 1;
        let digits = line.get(..3).ok_or(ReplyError::Malformed)?;
        if !digits.iter().all(u8::is_ascii_digit) {
            return Err(ReplyError::Malformed);
        }
        let c = digits
            .iter()
            .fold(0u16, |a, d| a * 10 + u16::from(d - b'0'));
        if !(200..600).contains(&c) || code.is_some_and(|k| k != c) {
            return Err(ReplyError::Malformed);
        }
        code = Some(c);
        let (last, text) = match line.get(3) {
            None => (true, &b""[..]),
            Some(b' ') => (true, line.get(4..).unwrap_or_default()),
            Some(b'-') => (false, line.get(4..).unwrap_or_default()),
            Some(_) => return Err(ReplyError::Malformed),
        };
        count += 1;
        if count > MAX_LINES {
            return Err(ReplyError::TooLong);
        }
        // Whole lines (an EHLO reply's capabilities are read from them), but for a first
        // line longer than the bound.
        if keeping {
            let line = text_of(text, MAX_TEXT);
            if lines.is_empty() || kept + line.len() <= MAX_TEXT {
                kept += line.len();
                lines.push(line);
            } else {
                keeping = false;
            }
        }
        if last {
            let enhanced = lines.first().and_then(|l| enhanced(l, c));
            return Ok(Some((
                Reply {
                    code: c,
                    enhanced,
                    lines,
                },
                pos,
            )));
        }
    }
}

/// `X.Y.Z` at the start of `text`, with X matching the reply class.
fn enhanced(text: &str, code: u16) -> Option<(u8, u16, u16)> {
    let word = text.split_ascii_whitespace().next()?;
    let mut it = word.split('.');
    let a: u8 = it.next()?.parse().ok()?;
    let b: u16 = it.next()?.parse().ok()?;
    let c: u16 = it.next()?.parse().ok()?;
    (it.next().is_none() && u16::from(a) == code / 100 && b < 1000 && c < 1000).then_some((a, b, c))
}

/// The capabilities an EHLO reply advertises.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub pipelining: bool,
    pub starttls: bool,
    pub chunking: bool,
    pub eightbitmime: bool,
    pub smtputf8: bool,
    /// SIZE was offered (RFC 1870), with `size` its limit when it named one above zero.
    pub size_offered: bool,
    pub size: Option<u64>,
    pub auth_plain: bool,
    pub auth_login: bool,
    /// RFC 3461: NOTIFY, ORCPT, RET and ENVID are taken (and DSNs sent from there on).
    pub dsn: bool,
    /// RFC 3030 BODY=BINARYMIME (with CHUNKING).
    pub binarymime: bool,
}

impl Capabilities {
    pub fn from_ehlo(r: &Reply) -> Capabilities {
        let mut c = Capabilities::default();
        for l in r.lines.iter().skip(1) {
            let mut words = l.split_ascii_whitespace();
            let Some(kw) = words.next() else { continue };
            match kw.to_ascii_uppercase().as_str() {
                "PIPELINING" => c.pipelining = true,
                "STARTTLS" => c.starttls = true,
                "CHUNKING" => c.chunking = true,
                "8BITMIME" => c.eightbitmime = true,
                "SMTPUTF8" => c.smtputf8 = true,
                "DSN" => c.dsn = true,
                "BINARYMIME" => c.binarymime = true,
                "SIZE" => {
                    c.size_offered = true;
                    c.size = words.next().and_then(|n| n.parse().ok()).filter(|&n| n > 0);
                }
                "AUTH" => {
                    for m in words {
                        match m.to_ascii_uppercase().as_str() {
                            "PLAIN" => c.auth_plain = true,
                            "LOGIN" => c.auth_login = true,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_and_multi_line() {
        let (r, n) = parse(b"250 2.1.0 Ok\r\nextra").unwrap().unwrap();
        assert_eq!((r.code, r.enhanced, n), (250, Some((2, 1, 0)), 14));
        let ehlo = b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-AUTH PLAIN LOGIN\r\n250 STARTTLS\r\n";
        let (r, n) = parse(ehlo).unwrap().unwrap();
        assert_eq!(n, ehlo.len());
        let c = Capabilities::from_ehlo(&r);
        assert!(c.pipelining && c.starttls && c.auth_plain && c.auth_login && !c.chunking);
        assert_eq!(c.size, Some(1000));
        assert_eq!(
            parse(b"250\n").unwrap().unwrap().0.lines,
            vec![String::new()]
        );
    }

    #[test]
    fn incomplete_and_malformed() {
        assert_eq!(parse(b"250-a\r\n250 b").unwrap(), None);
        assert_eq!(parse(b"250-a\r\n251 b\r\n"), Err(ReplyError::Malformed));
        assert_eq!(parse(b"25x ok\r\n"), Err(ReplyError::Malformed));
        assert_eq!(parse(b"250_ok\r\n"), Err(ReplyError::Malformed));
        assert_eq!(parse(b"099 ok\r\n"), Err(ReplyError::Malformed));
        assert_eq!(parse(&[b'2'; 5000]), Err(ReplyError::TooLong));
        // An enhanced code of the wrong class is not taken.
        assert_eq!(parse(b"550 2.0.0 x\r\n").unwrap().unwrap().0.enhanced, None);
    }

    #[test]
    fn text_is_kept_clean_and_bounded() {
        // A bare CR (a new line, or a MIME part, for lenient readers of a notice), terminal
        // escapes (C0 and C1), DEL and invalid UTF-8.
        let r = parse(
            b"550 5.1.1 x\r\r--b\rContent-Type: text/html\t\x1b]52;c;x\x07\x7f\xc2\x9b\xff\r\n",
        )
        .unwrap()
        .unwrap()
        .0;
        assert_eq!(
            r.lines,
            vec!["5.1.1 x??--b?Content-Type: text/html ?]52;c;x???\u{fffd}".to_string()]
        );
        assert_eq!(r.enhanced, Some((5, 1, 1)));
        // A long reply is read whole, and MAX_TEXT bytes of its text are kept.
        let mut long = Vec::new();
        for _ in 0..MAX_LINES - 1 {
            long.extend_from_slice(b"451-");
            long.extend(std::iter::repeat_n(b'a', MAX_LINE - 10));
            long.extend_from_slice(b"\r\n");
        }
        long.extend_from_slice(b"451 4.3.0 end\r\nnext");
        let (r, n) = parse(&long).unwrap().unwrap();
        assert_eq!(n, long.len() - 4);
        assert_eq!(r.lines.len(), 1, "whole lines only");
        assert_eq!(r.lines[0].len(), MAX_LINE - 10);
        // An EHLO reply keeps whole lines while they fit, never a capability cut short (`SIZE
        // 1` of `SIZE 157286400`).
        let mut first = b"250-".to_vec();
        first.extend(std::iter::repeat_n(b'x', 4000));
        first.extend_from_slice(b"\r\n250 SIZE 157286400\r\n");
        let r = parse(&first).unwrap().unwrap().0;
        assert_eq!(r.lines.len(), 2);
        assert_eq!(Capabilities::from_ehlo(&r).size, Some(157286400));
        first.truncate(4004);
        first.extend_from_slice(b"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n250 SIZE 157286400\r\n");
        let r = parse(&first).unwrap().unwrap().0;
        assert_eq!(
            r.lines.len(),
            1,
            "the line that does not fit is dropped whole"
        );
        assert_eq!(Capabilities::from_ehlo(&r).size, None);
        // Multi-byte characters are not split at the bound.
        assert_eq!(text_of("ééé".as_bytes(), 5), "éé");
    }

    #[test]
    fn one_line_and_status() {
        let r = parse(b"451-4.3.0 try\r\n451 later\r\n").unwrap().unwrap().0;
        assert_eq!(r.one_line(), "451 4.3.0 try later");
        assert_eq!(r.status(), "4.3.0");
        let r = parse(b"550 no\r\n").unwrap().unwrap().0;
        assert_eq!(
            (r.one_line().as_str(), r.status().as_str()),
            ("550 no", "5.0.0")
        );
    }
}
