//! What makes an outbound message not count: automatic replies, bulk mail, reports, and the
//! operator's masks. Pure functions over the message bytes (bounded header scan, no
//! allocation beyond the decoded subject).

use regex::{Regex, RegexSet, RegexSetBuilder};

/// The default out-of-office subject masks shipped with ringmx (overridable by file).
pub const DEFAULT_SUBJECTS: &str = include_str!("ooo-subjects.txt");

/// Headers are looked for in the first this many bytes.
const HEADER_SCAN: usize = 64 * 1024;

/// A list of ORF-style masks: `*` any characters, `?` zero or one character, `/…/` a regular
/// expression; all case-insensitive and matched against the whole text.
#[derive(Debug, Clone)]
pub struct Masks {
    set: RegexSet,
    sources: Vec<String>,
}

/// A mask list entry that does not compile (the message names it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadMask(pub String);

fn wildcard_regex(mask: &str) -> String {
    let mut r = String::from("^");
    for c in mask.chars() {
        match c {
            '*' => r.push_str(".*"),
            '?' => r.push_str(".?"),
            c => r.push_str(&regex::escape(c.encode_utf8(&mut [0; 4]))),
        }
    }
    r.push('$');
    r
}

impl Masks {
    /// Compile masks; with `domain_shorthand`, an entry without `@` (and not a regex) means
    /// every address at that domain (`example.com` = `*@example.com`).
    pub fn new<S: AsRef<str>>(entries: &[S], domain_shorthand: bool) -> Result<Masks, BadMask> {
        let mut pats = Vec::new();
        let mut sources = Vec::new();
        for e in entries {
            let e = e.as_ref().trim();
            if e.is_empty() || e.starts_with('#') {
                continue;
            }
            let pat = if e.len() >= 2 && e.starts_with('/') && e.ends_with('/') {
                let re = e.get(1..e.len() - 1).unwrap_or("");
                Regex::new(re).map_err(|err| BadMask(format!("{e}: {err}")))?;
                re.to_string()
            } else if domain_shorthand && !e.contains('@') {
                wildcard_regex(&format!("*@{e}"))
            } else {
                wildcard_regex(e)
            };
            pats.push(pat);
            sources.push(e.to_string());
        }
        let set = RegexSetBuilder::new(&pats)
            .case_insensitive(true)
            .size_limit(64 << 20)
            .build()
            .map_err(|err| BadMask(err.to_string()))?;
        Ok(Masks { set, sources })
    }

    /// The first mask matching `text`, as written.
    pub fn matching(&self, text: &str) -> Option<&str> {
        let i = self.set.matches(text).into_iter().next()?;
        self.sources.get(i).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.sources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }
}

/// The lines of `s` as lenient parsers see them (Python's `email` among them): CRLF, a lone
/// CR and a lone LF each end a line. Yields `(line without its ending, line with it)`.
fn lenient_lines(s: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    let mut rest = s;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = memchr::memchr2(b'\r', b'\n', rest);
        let (text_len, line_len) = match end {
            None => (rest.len(), rest.len()),
            Some(i) if rest.get(i) == Some(&b'\r') && rest.get(i + 1) == Some(&b'\n') => (i, i + 2),
            Some(i) => (i, i + 1),
        };
        let (line, tail) = rest.split_at(line_len);
        rest = tail;
        Some((line.get(..text_len).unwrap_or_default(), line))
    })
}

/// The header section: every line before the first empty one (line ends as lenient parsers
/// see them), within the first `limit` bytes.
fn header_block(content: &[u8], limit: usize) -> &[u8] {
    let scan = content.get(..limit).unwrap_or(content);
    let mut at = 0;
    for (text, line) in lenient_lines(scan) {
        if text.is_empty() {
            return scan.get(..at).unwrap_or(scan);
        }
        at += line.len();
    }
    scan
}

/// The lines of the header section that start a field (continuation lines left out), found
/// the way lenient readers find lines.
pub fn field_lines(content: &[u8]) -> impl Iterator<Item = &[u8]> {
    lenient_lines(header_block(content, usize::MAX))
        .map(|(text, _)| text)
        .filter(|t| !t.first().is_some_and(|b| *b == b' ' || *b == b'\t'))
}

/// Length of the header section of `content` (as lenient parsers find it), or `content.len()`
/// when no empty line ends it there.
pub fn header_len(content: &[u8]) -> usize {
    header_block(content, usize::MAX).len()
}

/// Whether the header section of `content` (up to its first CRLF CRLF) holds a CR not
/// followed by LF or an LF not after a CR.
pub fn header_has_bare_line_end(content: &[u8]) -> bool {
    let end = memchr::memmem::find(content, b"\r\n\r\n").map_or(content.len(), |e| e + 4);
    let head = content.get(..end).unwrap_or(content);
    memchr::memchr2_iter(b'\r', b'\n', head).any(|i| match head.get(i) {
        Some(b'\r') => head.get(i + 1) != Some(&b'\n'),
        _ => i == 0 || head.get(i - 1) != Some(&b'\r'),
    })
}

/// Every header field as `(name, unfolded raw value)`.
pub fn headers(content: &[u8]) -> Vec<(&str, String)> {
    let block = header_block(content, HEADER_SCAN);
    let mut out: Vec<(&str, String)> = Vec::new();
    for (line, _) in lenient_lines(block) {
        let text = String::from_utf8_lossy(line);
        if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            if let Some((_, v)) = out.last_mut() {
                v.push_str(&text);
            }
            continue;
        }
        let Some(colon) = memchr::memchr(b':', line) else {
            continue;
        };
        let (Some(name), Some(value)) = (line.get(..colon), line.get(colon + 1..)) else {
            continue;
        };
        let Ok(name) = std::str::from_utf8(name) else {
            continue;
        };
        out.push((
            name.trim(),
            String::from_utf8_lossy(value).trim().to_string(),
        ));
    }
    out
}

/// `content` without any `name:` header field (and its continuation lines), or `None` when
/// the header section has none. Lines and fields are found the way the most lenient reader
/// downstream would find them (a lone CR or LF ends a line), so no field hidden behind a bare
/// line ending survives to be read as ours.
pub fn strip_header(content: &[u8], name: &str) -> Option<Vec<u8>> {
    strip_header_if(content, name, |_| true)
}

/// [`strip_header`] for the `name:` fields whose whole value (continuation lines included,
/// as received) `drop` says to remove.
pub fn strip_header_if(
    content: &[u8],
    name: &str,
    drop: impl Fn(&[u8]) -> bool,
) -> Option<Vec<u8>> {
    let block = header_block(content, usize::MAX);
    let name = name.as_bytes();
    if !lenient_lines(block).any(|(text, _)| lenient_field(text, name).is_some()) {
        return None;
    }
    // Each field (its lines, whole) decided at once. `ours`: where the value of a field of
    // ours starts in `field`.
    let mut out = Vec::with_capacity(content.len());
    let mut field: Vec<u8> = Vec::new();
    let mut ours: Option<usize> = None;
    let mut junk = false;
    let mut dropped = false;
    let mut at = 0;
    let mut flush = |field: &mut Vec<u8>, ours: Option<usize>, out: &mut Vec<u8>| {
        if let Some(value) = ours
            && drop(field.get(value..).unwrap_or_default())
        {
            dropped = true;
            field.clear();
            return;
        }
        out.append(field);
    };
    for (_, line) in lenient_lines(block) {
        at += line.len();
        let cont = line.first().is_some_and(|b| *b == b' ' || *b == b'\t');
        // A line after one that names no field is read as a field of its own by readers that
        // drop that line, white space and all. (Continuation lines are looked at only then.)
        let mine = (!cont || junk).then(|| lenient_field(line, name)).flatten();
        if !cont || mine.is_some() {
            flush(&mut field, ours, &mut out);
            ours = mine.map(|colon| colon + 1);
            junk = !names_a_field(line);
        }
        field.extend_from_slice(line);
    }
    flush(&mut field, ours, &mut out);
    if !dropped {
        return None;
    }
    out.extend_from_slice(content.get(at..).unwrap_or_default());
    Some(out)
}

/// The field name of `line` as the most lenient readers find it (mail-parser): case aside,
/// ASCII white space and control characters anywhere around or inside it skipped (`\x0cName:`,
/// `Na me:`, `Name\x0b:`), and colons before it skipped (`:Name:`). `each` is given the name's
/// bytes in order and may stop the walk by answering false. Returns the index of the colon
/// that ends the name; `None` for a line that names no field (`junk`, `:`, `::x`), which such
/// readers drop, reading the line after it as a field even when it starts with white space.
fn lenient_name(line: &[u8], mut each: impl FnMut(u8) -> bool) -> Option<usize> {
    let mut started = false;
    for (i, &b) in line.iter().enumerate() {
        match b {
            b':' if started => return Some(i),
            b':' | 0..=0x20 | 0x7f => {}
            _ => {
                started = true;
                if !each(b) {
                    return None;
                }
            }
        }
    }
    None
}

/// Whether `line` names a field at all ([`lenient_name`]).
fn names_a_field(line: &[u8]) -> bool {
    lenient_name(line, |_| true).is_some()
}

/// Where the colon ending the field name in `line` is, when that name ([`lenient_name`]) is
/// `name`.
fn lenient_field(line: &[u8], name: &[u8]) -> Option<usize> {
    let mut want = name.iter();
    let colon = lenient_name(line, |b| {
        want.next().is_some_and(|w| w.eq_ignore_ascii_case(&b))
    })?;
    want.next().is_none().then_some(colon)
}

fn decode_b(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s.trim_end_matches('='))
        .or_else(|_| {
            base64::engine::general_purpose::STANDARD_NO_PAD.decode(s.trim_end_matches('='))
        })
        .ok()
}

fn decode_q(s: &str) -> Vec<u8> {
    unescape_hex(s.as_bytes(), b'=', b'_')
}

/// `escape` followed by two hex digits is that byte, `space` is a space, anything else stays
/// (RFC 2047 Q: `=`, `_`; URL query strings: `%`, `+`).
pub(crate) fn unescape_hex(b: &[u8], escape: u8, space: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == space {
            out.push(b' ');
        } else if c == escape {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(v) => {
                    out.push(v);
                    i += 2;
                }
                None => out.push(c),
            }
        } else {
            out.push(c);
        }
        i += 1;
    }
    out
}

fn charset_decode(charset: &str, bytes: &[u8]) -> String {
    let cs = charset.split('*').next().unwrap_or("").to_ascii_lowercase();
    match cs.as_str() {
        "iso-8859-1" | "latin1" | "windows-1252" | "cp1252" | "us-ascii" => {
            bytes.iter().map(|&b| char::from(b)).collect()
        }
        _ => String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// RFC 2047 decoding of an unstructured header value (UTF-8, Latin-1 and Windows-1252
/// charsets; others are read as UTF-8). Whitespace between adjacent encoded words is dropped.
pub fn decode_words(value: &str) -> String {
    let (mut ends, mut spaces) = (NextEnd::new(value, "?="), NextEnd::new(value, " "));
    decode_with(value, |at| ends.at(at), |at| spaces.at(at))
}

/// [`decode_words`], `end_from(i)` (`space_from(i)`) giving where the first `?=` (space) at or
/// after `value[i..]` is.
fn decode_with(
    value: &str,
    mut end_from: impl FnMut(usize) -> Option<usize>,
    mut space_from: impl FnMut(usize) -> Option<usize>,
) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    let mut pending_ws = String::new();
    let mut last_was_word = false;
    while !rest.is_empty() {
        if let Some(start) = rest.find("=?") {
            let (before, after) = rest.split_at(start);
            let offset = value.len() - after.len();
            let word = encoded_word(
                after,
                |at| end_from(offset + at).and_then(|e| e.checked_sub(offset)),
                |at| space_from(offset + at).and_then(|e| e.checked_sub(offset)),
            );
            if let Some((word, tail)) = word {
                if !before.trim().is_empty() || !last_was_word {
                    out.push_str(&pending_ws);
                    out.push_str(before);
                }
                pending_ws.clear();
                out.push_str(&word);
                last_was_word = true;
                let ws_len = tail.len() - tail.trim_start().len();
                pending_ws.push_str(tail.get(..ws_len).unwrap_or(""));
                rest = tail.get(ws_len..).unwrap_or("");
                continue;
            }
            out.push_str(&pending_ws);
            pending_ws.clear();
            out.push_str(before);
            out.push_str("=?");
            rest = after.get(2..).unwrap_or("");
            last_was_word = false;
        } else {
            out.push_str(&pending_ws);
            pending_ws.clear();
            out.push_str(rest);
            break;
        }
    }
    out.push_str(&pending_ws);
    out
}

/// The first `?=` at or after an offset of `value`. The offsets asked for never decrease (each
/// encoded word tried starts after the last), so the scans move forward only and a value full
/// of `=?` that never closes costs one pass, not one per `=?`.
struct NextEnd<'a> {
    value: &'a str,
    /// What is looked for (`?=`; a space, which no encoded word holds).
    what: &'static str,
    /// `found` is the first `what` at or after `from`.
    from: usize,
    found: Option<usize>,
}

impl<'a> NextEnd<'a> {
    fn new(value: &'a str, what: &'static str) -> NextEnd<'a> {
        NextEnd {
            value,
            what,
            from: 0,
            found: value.find(what),
        }
    }

    fn at(&mut self, offset: usize) -> Option<usize> {
        if offset > self.from && self.found.is_some_and(|f| f < offset) {
            self.from = offset;
            self.found = self
                .value
                .get(offset..)
                .and_then(|r| r.find(self.what))
                .map(|i| offset + i);
        }
        self.found
    }
}

/// `=?charset?X?text?=` at the start of `s`: the decoded text and what follows. `end_at(i)`
/// is where the first `?=` at or after `s[i..]` starts, `space_at(i)` the first space. Only
/// those two look past the word's start, so a value of many `=?` costs one pass, not one per
/// `=?` (a base64 text stops at its first `?`, which every later `=?` holds).
fn encoded_word(
    s: &str,
    end_at: impl FnOnce(usize) -> Option<usize>,
    space_at: impl FnOnce(usize) -> Option<usize>,
) -> Option<(String, &str)> {
    let inner = s.strip_prefix("=?")?;
    let (charset, r) = inner.split_once('?')?;
    let (enc, r) = r.split_once('?')?;
    if charset.is_empty() || !matches!(enc, "B" | "b" | "Q" | "q") {
        return None;
    }
    let text_at = s.len() - r.len();
    let end = end_at(text_at)?.checked_sub(text_at)?;
    if space_at(text_at).is_some_and(|sp| sp < text_at + end) {
        return None;
    }
    let text = r.get(..end)?;
    let bytes = match enc {
        "B" | "b" => decode_b(text)?,
        _ => decode_q(text),
    };
    Some((charset_decode(charset, &bytes), r.get(end + 2..)?))
}

/// Which automatic-mail signals count (from `[aswl]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signals {
    pub auto_submitted: bool,
    pub precedence: bool,
    pub list_headers: bool,
    pub reports: bool,
}

/// Why an outbound message is not collected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    AutoSubmitted(String),
    Precedence(String),
    ListHeader(&'static str),
    Report,
    ExchangeOof,
    AutoReplyHeader(&'static str),
    Subject(String),
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skip::AutoSubmitted(v) => write!(f, "Auto-Submitted: {v}"),
            Skip::Precedence(v) => write!(f, "Precedence: {v}"),
            Skip::ListHeader(h) => write!(f, "{h} header (list or bulk mail)"),
            Skip::Report => f.write_str("delivery or disposition report (multipart/report)"),
            Skip::ExchangeOof => f.write_str("Exchange out-of-office signature"),
            Skip::AutoReplyHeader(h) => write!(f, "{h} header"),
            Skip::Subject(m) => write!(f, "subject matches \"{m}\""),
        }
    }
}

const LIST_HEADERS: [&str; 9] = [
    "List-Id",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "List-Help",
    "List-Subscribe",
    "List-Post",
    "List-Owner",
    "List-Archive",
    "Feedback-ID",
];

const AUTOREPLY_HEADERS: [&str; 4] = [
    "X-Autoreply",
    "X-Autorespond",
    "X-Autoresponder",
    "X-Autogenerated",
];

/// The first reason the message is automatic or bulk, if any. `X-Auto-Response-Suppress` on
/// its own is a request not to auto-reply, not a marker of one, and is ignored.
pub fn classify(content: &[u8], signals: Signals, subjects: Option<&Masks>) -> Option<Skip> {
    let hs = headers(content);
    let get = |n: &str| {
        hs.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v)
    };
    if signals.auto_submitted
        && let Some(v) = get("Auto-Submitted")
    {
        let token = v
            .split(|c: char| c == ';' || c == '(' || c.is_whitespace())
            .next()
            .unwrap_or("");
        if !token.eq_ignore_ascii_case("no") {
            return Some(Skip::AutoSubmitted(v.clone()));
        }
    }
    if signals.auto_submitted {
        for h in AUTOREPLY_HEADERS {
            if get(h).is_some() {
                return Some(Skip::AutoReplyHeader(h));
            }
        }
        if get("X-Auto-Response-Suppress").is_some_and(|v| v.trim().eq_ignore_ascii_case("all"))
            && get("X-MS-Exchange-Inbox-Rules-Loop").is_some()
        {
            return Some(Skip::ExchangeOof);
        }
    }
    if signals.precedence {
        for h in ["Precedence", "X-Precedence"] {
            if let Some(v) = get(h) {
                let t = v.trim().to_ascii_lowercase();
                if matches!(t.as_str(), "bulk" | "junk" | "list" | "auto_reply") {
                    return Some(Skip::Precedence(v.clone()));
                }
            }
        }
    }
    if signals.list_headers {
        for h in LIST_HEADERS {
            if get(h).is_some() {
                return Some(Skip::ListHeader(h));
            }
        }
    }
    if signals.reports
        && let Some(ct) = get("Content-Type")
    {
        let ct = ct.to_ascii_lowercase();
        if ct.trim_start().starts_with("multipart/report") {
            return Some(Skip::Report);
        }
    }
    if let Some(masks) = subjects {
        let subject = get("Subject").map(|s| decode_words(s)).unwrap_or_default();
        if let Some(m) = masks.matching(subject.trim()) {
            return Some(Skip::Subject(m.to_string()));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Signals = Signals {
        auto_submitted: true,
        precedence: true,
        list_headers: true,
        reports: true,
    };

    fn msg(headers: &str) -> Vec<u8> {
        format!("{headers}\r\n\r\nbody\r\n").into_bytes()
    }

    fn defaults() -> Masks {
        Masks::new(&DEFAULT_SUBJECTS.lines().collect::<Vec<_>>(), false).unwrap()
    }

    #[test]
    fn masks_wildcards_regexes_domains() {
        let m = Masks::new(&["*@Corp.test", "/^spam[0-9]+@/", "b?b@x.test"], true).unwrap();
        assert_eq!(m.matching("JOHN@corp.TEST"), Some("*@Corp.test"));
        assert_eq!(m.matching("spam12@any.test"), Some("/^spam[0-9]+@/"));
        assert!(m.matching("bb@x.test").is_some() && m.matching("bob@x.test").is_some());
        assert!(m.matching("boob@x.test").is_none());
        assert!(m.matching("john@corp.test.evil").is_none());
        let d = Masks::new(&["corp.test"], true).unwrap();
        assert!(d.matching("a@corp.test").is_some() && d.matching("a@x.corp.test").is_none());
        assert!(Masks::new(&["/([/"], false).is_err());
    }

    #[test]
    fn verdict_headers_from_the_client_are_removed() {
        let m = b"X-ASWL: pass mode=global\r\n\tfolded\r\nSubject: hi\r\nx-aswl : pass\r\n\r\nX-ASWL: body stays\r\n";
        let out = strip_header(m, "X-ASWL").unwrap();
        assert_eq!(out, b"Subject: hi\r\n\r\nX-ASWL: body stays\r\n");
        assert_eq!(
            strip_header(b"Subject: x\r\n\r\nX-ASWL: b\r\n", "X-ASWL"),
            None
        );
        assert_eq!(strip_header(b"X-ASWLX: 1\r\n\r\n", "X-ASWL"), None);
        // Fields hidden behind a lone CR or LF, as Python's email package reads them.
        for (m, out) in [
            (
                &b"Subject: a\rX-ASWL: pass\r\n\r\nb"[..],
                &b"Subject: a\r\r\nb"[..],
            ),
            (
                b"Subject: a\nX-ASWL: pass\n\tmore\r\nTo: c\r\n\r\n",
                b"Subject: a\nTo: c\r\n\r\n",
            ),
            (b"X-ASWL: pass\r \rcont\r\n\r\n", b"cont\r\n\r\n"),
        ] {
            assert_eq!(strip_header(m, "X-ASWL").as_deref(), Some(out), "{m:?}");
        }
        // A lone CR ending the header section ends it for the stripper too.
        assert_eq!(strip_header(b"Subject: a\r\rX-ASWL: b\r\n", "X-ASWL"), None);
        // Names as lenient readers (mail-parser) find them: white space and control
        // characters anywhere in the name, colons before it, a line after a colon-less one.
        for m in [
            &b"\x0cX-ASWL: pass\r\n"[..],
            b"X-ASWL\x0c: pass\r\n",
            b"X -ASWL: pass\r\n",
            b"x-aswl : pass\r\n",
            b":X-ASWL: pass\r\n",
            b"\x0b:\x7f X-A S W L\t: pass\r\n",
            b"junk\r\n X-ASWL: pass\r\n",
            b":\r\n X-ASWL: pass\r\n",
            b"::x\r\n\tX-ASWL: pass\r\n",
        ] {
            let mut message = b"Subject: a\r\n".to_vec();
            message.extend_from_slice(m);
            message.extend_from_slice(b"To: b\r\n\r\nX-ASWL: body\r\n");
            let kept: &[u8] = if m.starts_with(b"junk") {
                b"Subject: a\r\njunk\r\nTo: b\r\n\r\nX-ASWL: body\r\n"
            } else if m.starts_with(b":\r\n") {
                b"Subject: a\r\n:\r\nTo: b\r\n\r\nX-ASWL: body\r\n"
            } else if m.starts_with(b"::x") {
                b"Subject: a\r\n::x\r\nTo: b\r\n\r\nX-ASWL: body\r\n"
            } else {
                b"Subject: a\r\nTo: b\r\n\r\nX-ASWL: body\r\n"
            };
            assert_eq!(
                strip_header(&message, "X-ASWL").as_deref(),
                Some(kept),
                "{m:?}"
            );
        }
        // Other names, and continuation lines of a field, stay.
        for m in [
            &b"X-ASWLX: 1\r\n"[..],
            b"X-ASW: 1\r\n",
            b"Subject: X-ASWL: pass\r\n",
            b"Subject: a\r\n X-ASWL: pass\r\n",
            b"X-ASWL-Other: 1\r\n",
            b"X-ASWL\r\n",
        ] {
            assert_eq!(strip_header(m, "X-ASWL"), None, "{m:?}");
        }
    }

    #[test]
    fn bare_line_ends_in_the_header_section() {
        for (m, bare) in [
            (
                &b"Subject: a\r\nTo: b\r\n\r\nbody\rwith\nbare\r\n"[..],
                false,
            ),
            (b"Subject: a\r\n\rAuthentication-Results: x\r\n\r\nb", true),
            (b"Subject: a\rTo: b\r\n\r\n", true),
            (b"Subject: a\nTo: b\r\n\r\n", true),
            (b"\nSubject: a\r\n\r\n", true),
            (b"Subject: a\r\n", false),
            (b"Subject: a\r", true),
            (b"", false),
        ] {
            assert_eq!(header_has_bare_line_end(m), bare, "{m:?}");
        }
    }

    #[test]
    fn rfc2047_subjects() {
        assert_eq!(
            decode_words("=?UTF-8?B?QXV0b21hdGlzY2hlIEFudHdvcnQ6IEhhbGxv?="),
            "Automatische Antwort: Hallo"
        );
        assert_eq!(
            decode_words("=?iso-8859-1?Q?R=E9ponse_automatique:?= test"),
            "Réponse automatique: test"
        );
        assert_eq!(decode_words("=?utf-8?q?a?= =?utf-8?q?b?="), "ab");
        assert_eq!(decode_words("plain =?x"), "plain =?x");
        assert_eq!(decode_words("=?utf-8?B?!!!?="), "=?utf-8?B?!!!?=");
        assert_eq!(decode_words("=?a?q?= =?utf-8?q?b?="), "=?a?q?= b");
        assert_eq!(decode_words("=?a?q?x y?= =?utf-8?q?b?="), "=?a?q?x y?= b");
    }

    proptest::proptest! {
        /// The `?=` found by one forward scan is the one a fresh search from each encoded
        /// word would find: the same decoding.
        #[test]
        fn one_scan_decodes_as_a_search_per_word(
            parts in proptest::collection::vec(
                proptest::sample::select(vec![
                    "=?", "?=", "?", "=", "utf-8", "q", "B", "a", " ", "=41", "QUI=", "\t",
                ]),
                0..40,
            )
        ) {
            let value = parts.concat();
            let v = value.as_str();
            let search = |what: &'static str| {
                move |at: usize| v.get(at..).and_then(|r| r.find(what)).map(|i| at + i)
            };
            let searched = decode_with(&value, search("?="), search(" "));
            proptest::prop_assert_eq!(decode_words(&value), searched);
        }
    }

    #[test]
    fn every_default_language_matches_encoded() {
        use base64::Engine;
        let m = defaults();
        let mut n = 0;
        for line in DEFAULT_SUBJECTS.lines() {
            let l = line.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let prefix = l.trim_end_matches('*');
            let subject = format!("{prefix} Meeting");
            let b = base64::engine::general_purpose::STANDARD.encode(subject.as_bytes());
            let folded = format!("Subject: =?UTF-8?B?{b}?=");
            let q: String = subject
                .bytes()
                .map(|c| {
                    if c == b' ' {
                        "_".to_string()
                    } else {
                        format!("={c:02X}")
                    }
                })
                .collect();
            let mut forms = vec![folded, format!("Subject: =?utf-8?q?{q}?=")];
            if subject.is_ascii() {
                forms.push(format!("Subject: {}", subject.to_uppercase()));
            }
            for h in forms {
                assert!(
                    matches!(classify(&msg(&h), ALL, Some(&m)), Some(Skip::Subject(_))),
                    "{h}"
                );
            }
            n += 1;
        }
        assert!(n >= 60, "{n} patterns");
        for human in [
            "Re: our office is moving",
            "RE: Automatic reply: lunch",
            "Automobile offer",
        ] {
            assert_eq!(
                classify(&msg(&format!("Subject: {human}")), ALL, Some(&m)),
                None,
                "{human}"
            );
        }
    }

    #[test]
    fn auto_response_headers() {
        let cases: &[(&str, bool)] = &[
            ("Auto-Submitted: auto-replied (vacation)", true),
            ("Auto-Submitted: auto-generated", true),
            ("Auto-Submitted: No", false),
            ("Precedence: bulk", true),
            ("Precedence: junk", true),
            ("Precedence: list", true),
            ("Precedence: first-class", false),
            ("List-Id: <news.example>", true),
            ("List-Unsubscribe: <mailto:u@x>", true),
            ("Feedback-ID: 1:2:3", true),
            (
                "Content-Type: multipart/report; report-type=delivery-status; boundary=x",
                true,
            ),
            (
                "Content-Type: Multipart/Report; report-type=disposition-notification",
                true,
            ),
            ("X-Auto-Response-Suppress: DR, RN, NRN, OOF", false),
            ("X-Auto-Response-Suppress: All", false),
            (
                "X-Auto-Response-Suppress: All\r\nX-MS-Exchange-Inbox-Rules-Loop: a@b",
                true,
            ),
            ("X-Autoreply: yes", true),
            ("Subject: hello\r\n  world", false),
        ];
        for (h, auto) in cases {
            assert_eq!(classify(&msg(h), ALL, None).is_some(), *auto, "{h}");
        }
        let off = Signals {
            auto_submitted: false,
            precedence: false,
            list_headers: false,
            reports: false,
        };
        assert_eq!(
            classify(&msg("Precedence: bulk\r\nList-Id: x"), off, None),
            None
        );
        // Folded header values are unfolded.
        assert!(classify(&msg("Auto-Submitted:\r\n auto-replied"), ALL, None).is_some());
        // Headers only: the same words in the body do not count.
        assert_eq!(
            classify(b"Subject: x\r\n\r\nPrecedence: bulk\r\n", ALL, None),
            None
        );
    }
}
