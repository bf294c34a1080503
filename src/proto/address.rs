//! RFC 5321 §4.1.2 paths and mailboxes, borrowed from the command line.
//!
//! Accepted: dot-atom and quoted-string local parts, domains, address literals (`[192.0.2.1]`,
//! `[IPv6:2001:db8::1]`, general `[tag:content]`), the null reverse-path `<>`, `<Postmaster>` as a
//! forward-path, and source routes (`<@a,@b:user@c>`, accepted and ignored per §4.1.1.3 and
//! Appendix C). UTF-8 (RFC 6531) is parsed and flagged; whether it is allowed depends on the
//! SMTPUTF8 parameter, which the session checks.

use std::net::{Ipv4Addr, Ipv6Addr};

/// A mailbox as the client sent it (`local@domain`), with the position of the `@`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address<'a> {
    raw: &'a str,
    at: usize,
    utf8: bool,
    literal: bool,
}

impl<'a> Address<'a> {
    /// `local@domain` exactly as sent (quotes kept, source route dropped).
    pub fn as_str(&self) -> &'a str {
        self.raw
    }
    /// The local part (with its quotes if it was quoted).
    pub fn local_part(&self) -> &'a str {
        self.raw.get(..self.at).unwrap_or(self.raw)
    }
    /// The domain, or an address literal with its brackets; empty for `<Postmaster>`.
    pub fn domain(&self) -> &'a str {
        self.raw.get(self.at + 1..).unwrap_or("")
    }
    /// Whether any part is non-ASCII (needs SMTPUTF8).
    pub fn is_utf8(&self) -> bool {
        self.utf8
    }
    /// Whether the domain is an address literal.
    pub fn is_literal(&self) -> bool {
        self.literal
    }
    /// `<Postmaster>` without a domain (RFC 5321 §4.5.1).
    pub fn is_bare_postmaster(&self) -> bool {
        self.at >= self.raw.len()
    }
}

impl std::fmt::Display for Address<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.raw)
    }
}

const ATEXT: u8 = 1;
const LETDIG: u8 = 2;
const QTEXT: u8 = 4;
const DCONTENT: u8 = 8;
const XCHAR: u8 = 16;
const NONASCII: u8 = 32;
const VCHAR: u8 = 64;
const VALUE: u8 = 128;
/// Letter, digit or hyphen (Ldh-str), or a UTF-8 byte: what may appear inside a domain label.
const LDH: u16 = 256;

#[expect(
    clippy::indexing_slicing,
    reason = "const evaluation: i < 256 by the loop bound"
)]
const fn build_classes() -> [u16; 256] {
    let mut t = [0u16; 256];
    let mut i = 0usize;
    while i < 256 {
        let c = i as u8;
        let mut v = 0u8;
        let alnum = c.is_ascii_alphanumeric();
        if alnum {
            v |= LETDIG;
        }
        if alnum
            || matches!(
                c,
                b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-'
            )
            || matches!(
                c,
                b'/' | b'=' | b'?' | b'^' | b'_' | b'`' | b'{' | b'|' | b'}' | b'~'
            )
        {
            v |= ATEXT;
        }
        // qtextSMTP: %d32-33 / %d35-91 / %d93-126
        if c == 32 || c == 33 || (c >= 35 && c <= 91) || (c >= 93 && c <= 126) {
            v |= QTEXT;
        }
        // dcontent: %d33-90 / %d94-126
        if (c >= 33 && c <= 90) || (c >= 94 && c <= 126) {
            v |= DCONTENT;
        }
        // xchar (RFC 3461 §4): %d33-42 / %d44-60 / %d62-126, i.e. VCHAR but "+" and "="
        if c >= 33 && c <= 126 && c != b'+' && c != b'=' {
            v |= XCHAR;
        }
        if c >= 0x80 {
            v |= NONASCII;
        }
        if c >= 33 && c <= 126 {
            v |= VCHAR;
        }
        // esmtp-value: %d33-60 / %d62-126 (RFC 6531 adds UTF-8, flagged separately)
        if c >= 33 && c <= 126 && c != b'=' {
            v |= VALUE;
        }
        let mut w = v as u16;
        if alnum || c == b'-' || c >= 0x80 {
            w |= LDH;
        }
        t[i] = w;
        i += 1;
    }
    t
}

static CLASSES: [u16; 256] = build_classes();

#[inline(always)]
fn classes(b: u8) -> u16 {
    #[expect(
        clippy::indexing_slicing,
        reason = "a u8 always indexes a 256-entry table"
    )]
    CLASSES[usize::from(b)]
}

#[inline(always)]
fn class(b: u8) -> u8 {
    classes(b) as u8
}

#[inline(always)]
fn has(b: Option<&u8>, mask: u8) -> bool {
    b.is_some_and(|&b| class(b) & mask != 0)
}

/// `bytes` as a `&str`, taking the fast path for ASCII (the common case on the wire).
#[inline(always)]
pub(crate) fn to_str(bytes: &[u8]) -> Option<&str> {
    if bytes.is_ascii() {
        // SAFETY: every byte was just checked to be below 0x80, and ASCII is valid UTF-8.
        Some(unsafe { std::str::from_utf8_unchecked(bytes) })
    } else {
        std::str::from_utf8(bytes).ok()
    }
}

/// Printable ASCII or any byte of a UTF-8 sequence (validated by the caller).
pub(crate) fn is_token_byte(b: u8) -> bool {
    class(b) & (VCHAR | NONASCII) != 0
}

/// esmtp-value byte (UTF-8 bytes included; validated by the caller).
pub(crate) fn is_value_byte(b: u8) -> bool {
    class(b) & (VALUE | NONASCII) != 0
}

/// RFC 3461 §4 xtext: xchar or `+` followed by two hex digits.
pub(crate) fn is_xtext(s: &[u8]) -> bool {
    let mut i = 0;
    while let Some(&b) = s.get(i) {
        if b == b'+' {
            let hex = |j: usize| s.get(j).is_some_and(|c| c.is_ascii_hexdigit());
            if !(hex(i + 1) && hex(i + 2)) {
                return false;
            }
            i += 3;
        } else if class(b) & XCHAR != 0 {
            i += 1;
        } else {
            return false;
        }
    }
    !s.is_empty()
}

/// A byte cursor; every access is checked so malformed input can only produce `Err`.
struct Cursor<'a> {
    s: &'a [u8],
    pos: usize,
    utf8: bool,
}

impl Cursor<'_> {
    #[inline(always)]
    fn peek(&self) -> Option<&u8> {
        self.s.get(self.pos)
    }
    #[inline(always)]
    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(&b) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    /// Advance over bytes of class `mask` (UTF-8 bytes too, flagging them); return the count.
    #[inline(always)]
    fn run(&mut self, mask: u8) -> usize {
        let start = self.pos;
        while let Some(&b) = self.peek() {
            let c = class(b);
            if c & mask != 0 {
                self.pos += 1;
            } else if c & NONASCII != 0 {
                self.utf8 = true;
                self.pos += 1;
            } else {
                break;
            }
        }
        self.pos - start
    }

    fn local_part(&mut self) -> Option<()> {
        if self.eat(b'"') {
            loop {
                let b = *self.peek()?;
                self.pos += 1;
                match b {
                    b'"' => return Some(()),
                    b'\\' => {
                        let q = *self.peek()?;
                        self.pos += 1;
                        if q >= 0x80 {
                            self.utf8 = true;
                        } else if !(32..=126).contains(&q) {
                            return None;
                        }
                    }
                    _ if class(b) & QTEXT != 0 => {}
                    _ if b >= 0x80 => self.utf8 = true,
                    _ => return None,
                }
            }
        }
        // Dot-string: 1*atext *("." 1*atext)
        loop {
            if self.run(ATEXT) == 0 {
                return None;
            }
            if !self.eat(b'.') {
                return Some(());
            }
        }
    }

    /// sub-domain *("." sub-domain); each label Let-dig [Ldh-str], at most 63 octets.
    fn domain(&mut self) -> Option<()> {
        let start = self.pos;
        loop {
            let label = self.pos;
            if !has(self.peek(), LETDIG | NONASCII) {
                return None;
            }
            // Ldh-str = *( ALPHA / DIGIT / "-" ) Let-dig
            let run_start = self.pos;
            while let Some(&b) = self.peek() {
                if classes(b) & LDH == 0 {
                    break;
                }
                self.pos += 1;
            }
            if let Some(run) = self.s.get(run_start..self.pos)
                && !run.is_ascii()
            {
                self.utf8 = true;
            }
            let len = self.pos - label;
            if len > 63 || self.s.get(self.pos.wrapping_sub(1)) == Some(&b'-') {
                return None;
            }
            if !self.eat(b'.') {
                break;
            }
        }
        (self.pos - start <= 255).then_some(())
    }

    fn address_literal(&mut self) -> Option<()> {
        // Caller saw '['.
        let start = self.pos;
        while has(self.peek(), DCONTENT) {
            self.pos += 1;
        }
        let inner = self.s.get(start..self.pos)?;
        if !self.eat(b']') {
            return None;
        }
        valid_literal(inner).then_some(())
    }

    fn mailbox(&mut self) -> Option<(usize, bool)> {
        let start = self.pos;
        self.local_part()?;
        let at = self.pos - start;
        if !self.eat(b'@') {
            return None;
        }
        if self.eat(b'[') {
            self.address_literal()?;
            Some((at, true))
        } else {
            self.domain()?;
            Some((at, false))
        }
    }

    /// `@d1,@d2:` source route, accepted and ignored (RFC 5321 §4.1.1.3, Appendix C).
    fn source_route(&mut self) -> Option<()> {
        while self.eat(b'@') {
            if self.eat(b'[') {
                self.address_literal()?;
            } else {
                self.domain()?;
            }
            if self.eat(b':') {
                return Some(());
            }
            if !self.eat(b',') {
                return None;
            }
        }
        None
    }
}

fn valid_literal(inner: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(inner) else {
        return false;
    };
    if let Some(v6) = text
        .get(..5)
        .filter(|p| p.eq_ignore_ascii_case("IPv6:"))
        .and_then(|_| text.get(5..))
    {
        return v6.parse::<Ipv6Addr>().is_ok();
    }
    if inner.iter().all(|b| b.is_ascii_digit() || *b == b'.') {
        return text.parse::<Ipv4Addr>().is_ok();
    }
    // General-address-literal = Standardized-tag ":" 1*dcontent
    match text.split_once(':') {
        Some((tag, content)) => {
            !tag.is_empty()
                && !content.is_empty()
                && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !tag.ends_with('-')
        }
        None => false,
    }
}

/// The longest mailbox in a path: RFC 5321 §4.5.3.1.3 caps a path at 256 octets with its
/// angle brackets. A session holds up to `max_recipients` of them.
pub const MAX_MAILBOX: usize = 254;

/// Parse `<path>` at the start of `s`; return the address (None for `<>` when `allow_null`) and
/// the bytes after `>`.
fn path(
    s: &[u8],
    allow_null: bool,
    allow_postmaster: bool,
) -> Option<(Option<Address<'_>>, &[u8])> {
    let mut c = Cursor {
        s,
        pos: 0,
        utf8: false,
    };
    if !c.eat(b'<') {
        return None;
    }
    if c.eat(b'>') {
        return allow_null.then(|| (None, s.get(2..).unwrap_or_default()));
    }
    if allow_postmaster
        && matches!(s.get(1), Some(b'p' | b'P'))
        && let Some(pm) = s.get(1..12)
        && pm.eq_ignore_ascii_case(b"postmaster>")
    {
        let raw = to_str(pm.get(..10)?)?;
        let addr = Address {
            raw,
            at: raw.len(),
            utf8: false,
            literal: false,
        };
        return Some((Some(addr), s.get(12..).unwrap_or_default()));
    }
    if c.peek() == Some(&b'@') {
        c.source_route()?;
        // The route is ignored, but it must still be well-formed UTF-8, and what it contains
        // says nothing about whether the mailbox itself needs SMTPUTF8 (found by fuzzing).
        std::str::from_utf8(s.get(1..c.pos)?).ok()?;
        c.utf8 = false;
    }
    let start = c.pos;
    let (at, literal) = c.mailbox()?;
    let end = c.pos;
    if !c.eat(b'>') || end - start > MAX_MAILBOX {
        return None;
    }
    let raw = to_str(s.get(start..end)?)?;
    let addr = Address {
        raw,
        at,
        utf8: c.utf8,
        literal,
    };
    Some((Some(addr), s.get(c.pos..).unwrap_or_default()))
}

/// MAIL FROM reverse-path: `<>` or `<mailbox>`; returns the rest of the line after `>`.
pub fn reverse_path(s: &[u8]) -> Option<(Option<Address<'_>>, &[u8])> {
    path(s, true, false)
}

/// RCPT TO forward-path: `<mailbox>` or `<Postmaster>`; returns the rest of the line after `>`.
pub fn forward_path(s: &[u8]) -> Option<(Address<'_>, &[u8])> {
    match path(s, false, true)? {
        (Some(a), rest) => Some((a, rest)),
        (None, _) => None,
    }
}

/// A bare mailbox (no angle brackets), e.g. the value of `ORCPT=rfc822;…` after xtext decoding.
pub fn mailbox(s: &[u8]) -> Option<Address<'_>> {
    let mut c = Cursor {
        s,
        pos: 0,
        utf8: false,
    };
    let (at, literal) = c.mailbox()?;
    if c.pos != s.len() {
        return None;
    }
    Some(Address {
        raw: to_str(s)?,
        at,
        utf8: c.utf8,
        literal,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> (String, String, String) {
        let (a, rest) = forward_path(s.as_bytes()).unwrap_or_else(|| panic!("{s} should parse"));
        (
            a.local_part().to_string(),
            a.domain().to_string(),
            String::from_utf8(rest.to_vec()).unwrap(),
        )
    }

    #[test]
    fn a_path_is_at_most_256_octets() {
        // RFC 5321 §4.5.3.1.3: 256 octets with the angle brackets.
        let at_limit = format!("<{}@example.test>", "a".repeat(MAX_MAILBOX - 13));
        assert_eq!(at_limit.len(), 256);
        assert!(forward_path(at_limit.as_bytes()).is_some());
        assert!(reverse_path(at_limit.as_bytes()).is_some());
        let over = format!("<{}@example.test>", "a".repeat(MAX_MAILBOX - 12));
        assert!(forward_path(over.as_bytes()).is_none());
        assert!(reverse_path(over.as_bytes()).is_none());
        let quoted = format!("<\"{}\"@example.test>", " ".repeat(2000));
        assert!(forward_path(quoted.as_bytes()).is_none());
    }

    #[test]
    fn accepts_rfc5321_forms() {
        let cases = [
            ("<a@b.example>", "a", "b.example"),
            (
                "<first.last@sub.example.com>",
                "first.last",
                "sub.example.com",
            ),
            ("<a+tag@x-y.example>", "a+tag", "x-y.example"),
            ("<\"john doe\"@example.com>", "\"john doe\"", "example.com"),
            ("<\"a\\\"b\"@example.com>", "\"a\\\"b\"", "example.com"),
            (
                "<!#$%&'*+-/=?^_`{|}~@example.com>",
                "!#$%&'*+-/=?^_`{|}~",
                "example.com",
            ),
            ("<u@[192.0.2.1]>", "u", "[192.0.2.1]"),
            ("<u@[IPv6:2001:db8::1]>", "u", "[IPv6:2001:db8::1]"),
            ("<u@[ipv6:::1]>", "u", "[ipv6:::1]"),
            ("<u@[x-tag:abc]>", "u", "[x-tag:abc]"),
            ("<@relay.example:u@d.example>", "u", "d.example"),
            ("<@a.example,@[192.0.2.9]:u@d.example>", "u", "d.example"),
            ("<u@localhost>", "u", "localhost"),
            ("<u@1example.com>", "u", "1example.com"),
        ];
        for (input, local, domain) in cases {
            let (l, d, rest) = ok(input);
            assert_eq!(
                (l.as_str(), d.as_str(), rest.as_str()),
                (local, domain, ""),
                "{input}"
            );
        }
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "a@b",
            "<a@b",
            "<a@>",
            "<@b>",
            "<a>",
            "<.a@b>",
            "<a.@b>",
            "<a..b@c>",
            "<a@-b.example>",
            "<a@b-.example>",
            "<a@b..example>",
            "<a@b.example.>",
            "<a b@c>",
            "<\"unterminated@c>",
            "<a@[192.0.2.256]>",
            "<a@[1.2.3]>",
            "<a@[IPv6:zz::1]>",
            "<a@[tag-:x]>",
            "<a@[notag]>",
            "<a@b\0>",
            "<@relay.example u@d>",
            "<>",
        ] {
            assert!(
                forward_path(bad.as_bytes()).is_none(),
                "{bad:?} must be refused"
            );
        }
        let long_label = format!("<a@{}.example>", "x".repeat(64));
        assert!(forward_path(long_label.as_bytes()).is_none());
        let long_domain = format!("<a@{}example>", "abcdefghi.".repeat(26));
        assert!(forward_path(long_domain.as_bytes()).is_none());
    }

    #[test]
    fn null_and_postmaster() {
        assert_eq!(reverse_path(b"<> SIZE=1"), Some((None, &b" SIZE=1"[..])));
        let (pm, rest) = forward_path(b"<postMaster> NOTIFY=NEVER").unwrap();
        assert!(pm.is_bare_postmaster());
        assert_eq!(pm.as_str(), "postMaster");
        assert_eq!(rest, b" NOTIFY=NEVER");
        assert!(reverse_path(b"<Postmaster>").is_none());
    }

    #[test]
    fn utf8_is_flagged_and_validated() {
        let (a, _) = forward_path("<jürgen@bücher.example>".as_bytes()).unwrap();
        assert!(a.is_utf8());
        assert_eq!(a.domain(), "bücher.example");
        let (a, _) = forward_path(b"<ascii@example.com>").unwrap();
        assert!(!a.is_utf8());
        assert!(forward_path(b"<a\xff@example.com>").is_none());
        // A UTF-8 source route does not make an ASCII mailbox UTF-8; an invalid one is refused.
        let (a, _) = forward_path("<@r\u{e9}.test:u@d.test>".as_bytes()).unwrap();
        assert!(!a.is_utf8());
        assert!(forward_path(b"<@\xff1.test,@r2.test:u@d.test>").is_none());
    }

    #[test]
    fn xtext() {
        assert!(is_xtext(b"rfc822;a+2Bb@example.com"));
        assert!(!is_xtext(b"a+2"));
        assert!(!is_xtext(b"a=b"));
        assert!(!is_xtext(b""));
        assert!(mailbox(b"a@b.example").is_some());
        assert!(mailbox(b"a@b.example x").is_none());
    }
}
