//! Recipient validation at RCPT (`[[recipients]]`): a file of the addresses that exist in some
//! local domains, so mail for unknown users is refused with `550 5.1.1` instead of accepted
//! and bounced later to a sender who is often forged (backscatter). Lines hold an address,
//! `*@domain` (every user of a domain) or `user@*` (a user in every domain of the map);
//! `#` starts a comment. Sub-addresses fold as the whitelist's keys do (`a+tag@d` is `a@d`),
//! local parts and domains compare without case, domains in their IDNA A-label form.
//!
//! Loaded into hash sets: one lookup per form, no allocation for ASCII addresses beyond the
//! lower-cased copy.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use foldhash::fast::RandomState;

use super::pipeline::{Decision, Refusal};
use super::rates::{Event, Rates};
use crate::metrics::Reason;
use crate::proto::reply;

/// How an unknown recipient is refused, whoever found it unknown (a map or a callout):
/// `550 5.1.1`; with the client's network over `[rates] unknown_recipients_per_minute`, or
/// its session at `max_unknown_recipients` (a directory harvest), also `421 4.7.0` and close.
#[derive(Debug, Clone)]
pub struct UnknownRecipient {
    pub max_unknown: usize,
    /// `[rates] unknown_recipients_per_minute`, across sessions.
    pub rates: Option<Arc<Rates>>,
}

impl UnknownRecipient {
    /// The refusal of one more unknown recipient from `ip` (`clock_ms` for the rate), after
    /// `so_far` in this session.
    pub fn refuse(&self, ip: IpAddr, clock_ms: u64, so_far: usize) -> Decision {
        let mut refusal = Refusal::new(
            &reply::UNKNOWN_RECIPIENT,
            Reason::UnknownRecipient,
            "refused: unknown recipient",
        );
        if let Some(rates) = &self.rates
            && !rates.take(Event::UnknownRecipient, ip, clock_ms)
        {
            refusal.close = Some((&reply::RATE_UNKNOWN, Reason::RateLimited));
        } else if so_far + 1 >= self.max_unknown {
            refusal.close = Some((&reply::TOO_MANY_UNKNOWN, Reason::Harvest));
        }
        Decision::Reject(refusal)
    }
}

/// The addresses of one `[[recipients]]` file.
#[derive(Debug, Default, Clone)]
pub struct RecipientMap {
    exact: HashSet<Box<[u8]>, RandomState>,
    /// `*@domain`
    domains: HashSet<Box<[u8]>, RandomState>,
    /// `user@*`
    users: HashSet<Box<[u8]>, RandomState>,
}

/// `local@domain` in the form the map compares: sub-address folded, lower case, A-labels.
fn key(address: &str) -> Option<(String, String)> {
    let (local, domain) = address.rsplit_once('@')?;
    let local = local.split_once('+').map_or(local, |(base, _)| base);
    if local.is_empty() || domain.is_empty() {
        return None;
    }
    let domain = crate::domain::canonical_domain(domain.trim_end_matches('.'));
    Some((local.to_lowercase(), domain.into_owned()))
}

/// Longest address the allocation-free path handles (RFC 5321: 64 + 1 + 255).
const ASCII_KEY_MAX: usize = 320;

/// [`key`] for an ASCII address, written into `buf` as `local@domain` without allocating:
/// the key and the position of its `@`. `None` for anything else (the general path decides).
fn ascii_key<'b>(address: &str, buf: &'b mut [u8; ASCII_KEY_MAX]) -> Option<(&'b [u8], usize)> {
    let a = address.as_bytes();
    if !a.is_ascii() {
        return None;
    }
    let at = memchr::memrchr(b'@', a)?;
    let (local, domain) = (a.get(..at)?, a.get(at + 1..)?);
    let local = memchr::memchr(b'+', local)
        .and_then(|p| local.get(..p))
        .unwrap_or(local);
    // Trailing dots go (`a@example.com.`); nothing left is no domain.
    let last = domain.iter().rposition(|&b| b != b'.')?;
    let domain = domain.get(..=last)?;
    if local.is_empty() {
        return None;
    }
    let len = local.len() + 1 + domain.len();
    let out = buf.get_mut(..len)?;
    let (l, rest) = out.split_at_mut(local.len());
    let (sign, d) = rest.split_first_mut()?;
    l.copy_from_slice(local);
    l.make_ascii_lowercase();
    *sign = b'@';
    d.copy_from_slice(domain);
    d.make_ascii_lowercase();
    Some((buf.get(..len)?, local.len()))
}

fn bytes(s: String) -> Box<[u8]> {
    s.into_bytes().into_boxed_slice()
}

impl RecipientMap {
    /// Read `path`; errors name the file and line.
    pub fn load(path: &Path) -> Result<RecipientMap, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        RecipientMap::parse(&text).map_err(|(line, e)| format!("{}:{line}: {e}", path.display()))
    }

    /// Parse the lines of a map; an error names its line (1-based).
    pub fn parse(text: &str) -> Result<RecipientMap, (usize, String)> {
        let mut m = RecipientMap::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = || {
                (
                    i + 1,
                    format!("{line:?} is not an address, *@domain or user@*"),
                )
            };
            match line.rsplit_once('@') {
                Some(("*", d)) if !d.is_empty() && d != "*" => {
                    m.domains
                        .insert(bytes(crate::domain::canonical_domain(d).into_owned()));
                }
                Some((u, "*")) if !u.is_empty() && u != "*" => {
                    m.users.insert(bytes(u.to_lowercase()));
                }
                Some(_) => {
                    let (l, d) = key(line).ok_or_else(bad)?;
                    let odd = |c: char| c.is_whitespace() || c == '*';
                    if l.contains(odd) || d.contains(odd) {
                        return Err(bad());
                    }
                    m.exact.insert(bytes(format!("{l}@{d}")));
                }
                None => return Err(bad()),
            }
        }
        Ok(m)
    }

    /// Whether `address` (as given at RCPT) is a known recipient.
    pub fn knows(&self, address: &str) -> bool {
        let mut buf = [0u8; ASCII_KEY_MAX];
        if let Some((key, at)) = ascii_key(address, &mut buf) {
            let (local, domain) = (
                key.get(..at).unwrap_or(b""),
                key.get(at + 1..).unwrap_or(b""),
            );
            return self.domains.contains(domain)
                || self.users.contains(local)
                || self.exact.contains(key);
        }
        let Some((local, domain)) = key(address) else {
            return false;
        };
        self.domains.contains(domain.as_bytes())
            || self.users.contains(local.as_bytes())
            || self.exact.contains(format!("{local}@{domain}").as_bytes())
    }

    /// Entries loaded.
    pub fn len(&self) -> usize {
        self.exact.len() + self.domains.len() + self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Every `[[recipients]]` section: which local domains each map covers (`None`: verified by a
/// callout to the next hop).
#[derive(Debug, Default, Clone)]
pub struct RecipientMaps {
    maps: Vec<(Vec<String>, Option<RecipientMap>)>,
}

/// What RCPT validation says of one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// No map covers its domain: not validated here.
    Unchecked,
    Known,
    Unknown,
    /// Its domain is verified by asking the next hop (`policy::callout`).
    Callout,
}

impl RecipientMaps {
    /// Maps with the domain patterns they cover (as in `[domains] local`); `None` for domains
    /// verified by callout.
    pub fn new(maps: Vec<(Vec<String>, Option<RecipientMap>)>) -> RecipientMaps {
        RecipientMaps { maps }
    }

    /// Look `address` up in the first map whose domains cover its domain.
    pub fn lookup(&self, address: &str) -> Lookup {
        let domain = memchr::memrchr(b'@', address.as_bytes())
            .and_then(|at| address.get(at + 1..))
            .unwrap_or("");
        match self
            .maps
            .iter()
            .find(|(patterns, _)| crate::domain::domain_matches(patterns, domain))
        {
            None => Lookup::Unchecked,
            Some((_, None)) => Lookup::Callout,
            Some((_, Some(m))) if m.knows(address) => Lookup::Known,
            Some(_) => Lookup::Unknown,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// Whether some domains are verified by callout.
    pub fn has_callouts(&self) -> bool {
        self.maps.iter().any(|(_, m)| m.is_none())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_patterns_subaddresses_case_and_idn() {
        let m = RecipientMap::parse(
            "# staff\nalice@example.com\nBob@Example.com  # sales\n*@catchall.example\npostmaster@*\n\nzoë@bücher.example\n",
        )
        .unwrap();
        for a in [
            "alice@example.com",
            "ALICE@EXAMPLE.COM",
            "alice+news@example.com",
            "bob@example.com",
            "anyone@catchall.example",
            "postmaster@example.com",
            "Postmaster@other.example",
            "zoë@xn--bcher-kva.example",
            "ZOË@Bücher.example",
            "alice@example.com.",
            "Alice+a+b@EXAMPLE.com",
        ] {
            assert!(m.knows(a), "{a}");
        }
        for a in [
            "carol@example.com",
            "alice@example.org",
            "+x@example.com",
            "noat",
            "@example.com",
            "alice@...",
            "alice@",
        ] {
            assert!(!m.knows(a), "{a}");
        }
        assert_eq!(m.len(), 5);
        for bad in ["no-at-sign", "a b@c.d", "*@*", "@x"] {
            assert_eq!(
                RecipientMap::parse(&format!("ok@x.test\n{bad}\n"))
                    .unwrap_err()
                    .0,
                2,
                "{bad}"
            );
        }
    }

    #[test]
    fn maps_cover_their_domains_only() {
        let maps = RecipientMaps::new(vec![
            (
                vec!["example.com".into(), "*.example.com".into()],
                Some(RecipientMap::parse("alice@example.com\nbob@eu.example.com\n").unwrap()),
            ),
            (vec!["callout.example".into()], None),
        ]);
        assert_eq!(maps.lookup("anyone@callout.example"), Lookup::Callout);
        assert_eq!(maps.lookup("alice@example.com"), Lookup::Known);
        assert_eq!(maps.lookup("bob@EU.example.com"), Lookup::Known);
        assert_eq!(maps.lookup("carol@example.com"), Lookup::Unknown);
        assert_eq!(maps.lookup("carol@other.example"), Lookup::Unchecked);
        assert_eq!(maps.lookup("postmaster"), Lookup::Unchecked);
    }

    #[test]
    fn a_million_entries() {
        let text: String = (0..1_000_000)
            .map(|i| format!("user{i}@example.com\n"))
            .collect();
        let m = RecipientMap::parse(&text).unwrap();
        assert_eq!(m.len(), 1_000_000);
        assert!(m.knows("user999999@example.com") && !m.knows("user1000000@example.com"));
    }
}
