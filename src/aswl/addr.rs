//! Address keys: the normalised form the whitelist matches on (the original is kept for display).
//!
//! Rules (reference notes, ASWL §6):
//! - Domain: UTS #46 ToASCII (A-labels), lower case, one trailing dot removed. Address literals
//!   (`[192.0.2.1]`) are kept verbatim apart from case and never merged with names.
//! - Local part: a quoted local part whose content is a valid dot-atom is unquoted
//!   (`"john.doe"@x` = `john.doe@x`); otherwise it stays quoted with only `\"` and `\\` escaped.
//!   UTF-8 local parts are put in NFC (never NFKC), then case-folded unless
//!   `case_sensitive_local_part` is set.
//! - Local (our) side: the sub-address after any of the delimiter characters is removed
//!   (`john+news@x` = `john@x`), so per-recipient mode keys on the mailbox.
//! - External side: the exact address, except a BATV `prvs=` tag, which is removed (it changes
//!   daily). Plus-folding of external addresses is an opt-in (`external_plus_fold`).
//! - SRS addresses are not decoded: the forwarder is the sender.

use unicode_normalization::UnicodeNormalization;

/// How addresses are normalised (from `[aswl]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalize {
    pub case_sensitive_local_part: bool,
    /// Sub-address delimiters for local addresses; each character is one delimiter. Empty: off.
    pub local_delimiters: String,
    /// Also remove `+tag` from external addresses.
    pub external_plus_fold: bool,
}

impl Default for Normalize {
    fn default() -> Self {
        Normalize {
            case_sensitive_local_part: false,
            local_delimiters: "+".into(),
            external_plus_fold: false,
        }
    }
}

/// `(local, domain)` split at the last `@`; `None` without one.
pub fn split(addr: &str) -> Option<(&str, &str)> {
    let at = memchr::memrchr(b'@', addr.as_bytes())?;
    let (l, d) = (addr.get(..at)?, addr.get(at + 1..)?);
    (!l.is_empty() && !d.is_empty()).then_some((l, d))
}

/// The domain key: A-labels, lower case, no trailing dot. `None` for a domain IDNA rejects.
pub fn domain_key(domain: &str) -> Option<String> {
    let d = domain.strip_suffix('.').unwrap_or(domain);
    if d.is_empty() {
        return None;
    }
    if d.starts_with('[') {
        // An address literal: exactly `[…]`, kept as it is apart from case.
        let ok = d.len() >= 3
            && d.ends_with(']')
            && d.get(1..d.len() - 1)
                .is_some_and(|inner| !inner.contains(['[', ']']))
            && d.bytes().all(|b| b.is_ascii_graphic());
        return ok.then(|| d.to_ascii_lowercase());
    }
    if d.is_ascii() {
        let lower = d.to_ascii_lowercase();
        if !lower.contains("xn--") {
            return valid_labels(&lower).then_some(lower);
        }
    }
    let ascii = idna::domain_to_ascii(d).ok()?;
    valid_labels(&ascii).then_some(ascii)
}

/// One pass over an ASCII domain: labels of 1 to 63 bytes, at most 253 in all, and no label
/// starting with the A-label prefix `xn--` (those go through IDNA).
fn plain_ascii_domain(d: &[u8]) -> bool {
    if d.is_empty() || d.len() > 253 {
        return false;
    }
    let mut start = 0;
    for (i, &b) in d.iter().enumerate() {
        if !is_ldh(b) && b != b'.' {
            return false;
        }
        if b == b'.' {
            if i == start || i - start > 63 {
                return false;
            }
            start = i + 1;
        } else if i == start
            && (b == b'x' || b == b'X')
            && d.get(i..i + 4)
                .is_some_and(|p| p.eq_ignore_ascii_case(b"xn--"))
        {
            return false;
        }
    }
    d.len() > start && d.len() - start <= 63
}

/// Labels of 1 to 63 letters, digits, hyphens (and underscores, seen in real host names), 253
/// bytes in all.
fn valid_labels(d: &str) -> bool {
    d.len() <= 253
        && d.as_bytes()
            .split(|&b| b == b'.')
            .all(|l| !l.is_empty() && l.len() <= 63 && l.iter().all(|&b| is_ldh(b)))
}

fn is_ldh(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

fn is_dot_atom(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|a| !a.is_empty() && a.chars().all(is_atext))
}

/// The content of a quoted string with its escapes resolved, or `None` if `s` is not quoted.
fn unquote(s: &str) -> Option<String> {
    let inner = s.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            out.push(chars.next()?);
        } else {
            out.push(c);
        }
    }
    Some(out)
}

/// The local-part key (before sub-address handling).
pub fn local_key(local: &str, case_sensitive: bool) -> String {
    let (content, quoted) = match unquote(local) {
        Some(c) => (c, true),
        None => (local.to_string(), false),
    };
    let mut s: String = if content.is_ascii() {
        content
    } else {
        content.nfc().collect()
    };
    if !case_sensitive {
        s = if s.is_ascii() {
            s.to_ascii_lowercase()
        } else {
            // Lower-casing can undo composition (J + caron → j + caron = ǰ): NFC again.
            s.to_lowercase().nfc().collect()
        };
    }
    if quoted && !is_dot_atom(&s) {
        let mut q = String::with_capacity(s.len() + 2);
        q.push('"');
        for c in s.chars() {
            if c == '"' || c == '\\' {
                q.push('\\');
            }
            q.push(c);
        }
        q.push('"');
        return q;
    }
    s
}

/// Remove BATV tags: `prvs=NDDDHHHHHH=local` → `local` (repeatedly, so a key is its own key).
fn strip_batv(mut local: &str) -> &str {
    loop {
        let rest = strip_one_batv(local);
        if rest.len() == local.len() {
            return local;
        }
        local = rest;
    }
}

fn strip_one_batv(local: &str) -> &str {
    let b = local.as_bytes();
    if b.len() > 16 && b.get(..5).is_some_and(|p| p.eq_ignore_ascii_case(b"prvs=")) {
        let tag = b.get(5..15).unwrap_or_default();
        let ok = tag.iter().take(4).all(u8::is_ascii_digit)
            && tag.iter().skip(4).all(u8::is_ascii_hexdigit)
            && b.get(15) == Some(&b'=');
        if ok {
            return local.get(16..).unwrap_or(local);
        }
    }
    local
}

fn strip_detail<'a>(local: &'a str, delimiters: &str) -> &'a str {
    if local.starts_with('"') || delimiters.is_empty() {
        return local;
    }
    match local.find(|c| delimiters.contains(c)) {
        Some(0) | None => local,
        Some(i) => local.get(..i).unwrap_or(local),
    }
}

/// The common case, written into `k` without another allocation: an ASCII, unquoted
/// address whose domain has no A-labels. `false` sends the caller down the general path.
fn fast_key(l: &str, d: &str, case_sensitive: bool, k: &mut String) -> bool {
    let d = d.strip_suffix('.').unwrap_or(d);
    if !l.is_ascii() || !d.is_ascii() || l.starts_with('"') || d.starts_with('[') {
        return false;
    }
    if !plain_ascii_domain(d.as_bytes()) {
        return false;
    }
    k.clear();
    k.push_str(l);
    if !case_sensitive {
        k.make_ascii_lowercase();
    }
    k.push('@');
    k.push_str(d);
    if let Some(dom) = k.get_mut(l.len() + 1..) {
        dom.make_ascii_lowercase();
    }
    true
}

/// A key into `out`: the fast path on the trimmed local part, else the general path.
fn key_into<'a>(
    addr: &'a str,
    out: &mut String,
    trim: impl FnOnce(&'a str) -> &'a str,
    case_sensitive: bool,
    slow: impl FnOnce(&str, &str) -> Option<String>,
) -> bool {
    let Some((l, d)) = split(addr) else {
        return false;
    };
    if fast_key(trim(l), d, case_sensitive, out) {
        return true;
    }
    match slow(l, d) {
        Some(k) => {
            out.clear();
            out.push_str(&k);
            true
        }
        None => false,
    }
}

impl Normalize {
    /// The key of one of our own addresses (sender of outbound mail, recipient of inbound).
    pub fn local(&self, addr: &str) -> Option<String> {
        let mut k = String::new();
        self.local_into(addr, &mut k).then_some(k)
    }

    /// [`Normalize::local`] into a reused buffer; `false` when the address has no key.
    pub fn local_into(&self, addr: &str, out: &mut String) -> bool {
        key_into(
            addr,
            out,
            |l| strip_detail(l, &self.local_delimiters),
            self.case_sensitive_local_part,
            |l, d| self.local_slow(l, d),
        )
    }

    fn local_slow(&self, l: &str, d: &str) -> Option<String> {
        let d = domain_key(d)?;
        let l = local_key(l, self.case_sensitive_local_part);
        let l = strip_detail(&l, &self.local_delimiters);
        Some(format!("{l}@{d}"))
    }

    /// The key of an external address (recipient of outbound mail, sender of inbound).
    pub fn external(&self, addr: &str) -> Option<String> {
        let mut k = String::new();
        self.external_into(addr, &mut k).then_some(k)
    }

    /// [`Normalize::external`] into a reused buffer; `false` when the address has no key.
    pub fn external_into(&self, addr: &str, out: &mut String) -> bool {
        key_into(
            addr,
            out,
            |l| {
                let tagless = strip_batv(l);
                if self.external_plus_fold {
                    strip_detail(tagless, "+")
                } else {
                    tagless
                }
            },
            self.case_sensitive_local_part,
            |l, d| self.external_slow(l, d),
        )
    }

    fn external_slow(&self, l: &str, d: &str) -> Option<String> {
        let d = domain_key(d)?;
        let l = local_key(strip_batv(l), self.case_sensitive_local_part);
        let l = if self.external_plus_fold {
            strip_detail(&l, "+")
        } else {
            &l
        };
        Some(format!("{l}@{d}"))
    }
}

/// The domain of a key.
pub fn key_domain(key: &str) -> &str {
    memchr::memrchr(b'@', key.as_bytes())
        .and_then(|at| key.get(at + 1..))
        .unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n() -> Normalize {
        Normalize::default()
    }

    #[test]
    fn case_quotes_and_domains() {
        let n = n();
        assert_eq!(
            n.external("John.Doe@Example.COM.").unwrap(),
            "john.doe@example.com"
        );
        assert_eq!(
            n.external("\"john.doe\"@x.test").unwrap(),
            "john.doe@x.test"
        );
        assert_eq!(
            n.external("\"John Doe\"@x.test").unwrap(),
            "\"john doe\"@x.test"
        );
        assert_eq!(
            n.external("\"a\\\"b\"@x.test").unwrap(),
            "\"a\\\"b\"@x.test"
        );
        assert_eq!(
            n.external("jane@bücher.example").unwrap(),
            n.external("jane@xn--bcher-kva.example").unwrap()
        );
        assert_eq!(
            n.external("jane@BÜCHER.example").unwrap(),
            "jane@xn--bcher-kva.example"
        );
        assert_eq!(n.external("u@[192.0.2.1]").unwrap(), "u@[192.0.2.1]");
        assert_ne!(n.external("u@[192.0.2.1]"), n.external("u@192.0.2.1"));
        assert!(n.external("nodomain").is_none());
        assert!(n.external("a@b..c").is_none());
    }

    #[test]
    fn utf8_local_parts_nfc_and_fold() {
        let n = n();
        let nfc = "jos\u{e9}@x.test";
        let nfd = "jose\u{301}@x.test";
        assert_eq!(n.external(nfc), n.external(nfd));
        assert_eq!(n.external("JOS\u{c9}@x.test").unwrap(), nfc);
        // Folding then composing: J + caron lower-cases to the precomposed ǰ.
        let k = n.external("J\u{30c}@x.test").unwrap();
        assert_eq!(k, "\u{1f0}@x.test");
        assert_eq!(n.external(&k).unwrap(), k);
        let cs = Normalize {
            case_sensitive_local_part: true,
            ..n.clone()
        };
        assert_eq!(cs.external("John@X.test").unwrap(), "John@x.test");
    }

    #[test]
    fn subaddress_and_batv() {
        let n = n();
        assert_eq!(n.local("Mary+News@corp.test").unwrap(), "mary@corp.test");
        assert_eq!(n.local("+only@corp.test").unwrap(), "+only@corp.test");
        assert_eq!(n.external("jane+x@ext.test").unwrap(), "jane+x@ext.test");
        let fold = Normalize {
            external_plus_fold: true,
            local_delimiters: "+-".into(),
            ..n.clone()
        };
        assert_eq!(fold.external("jane+x@ext.test").unwrap(), "jane@ext.test");
        assert_eq!(fold.local("john-list@corp.test").unwrap(), "john@corp.test");
        assert_eq!(
            n.external("prvs=1234abcdef=Jane@ext.test").unwrap(),
            "jane@ext.test"
        );
        assert_eq!(
            n.external("prvs=1234abcdef=PRVS=5678abcdef=jane@ext.test")
                .unwrap(),
            "jane@ext.test"
        );
        assert!(n.external("jane@ext\u{0}.test").is_none());
        assert_eq!(
            n.external("prvs=12x4abcdef=jane@ext.test").unwrap(),
            "prvs=12x4abcdef=jane@ext.test"
        );
        // SRS is not decoded.
        let srs = "SRS0=HHHH=TT=orig.test=user@fwd.test";
        assert_eq!(n.external(srs).unwrap(), srs.to_ascii_lowercase());
    }
}
