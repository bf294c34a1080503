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
use std::path::Path;

use foldhash::fast::RandomState;

/// The addresses of one `[[recipients]]` file.
#[derive(Debug, Default, Clone)]
pub struct RecipientMap {
    exact: HashSet<String, RandomState>,
    /// `*@domain`
    domains: HashSet<String, RandomState>,
    /// `user@*`
    users: HashSet<String, RandomState>,
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
                        .insert(crate::domain::canonical_domain(d).into_owned());
                }
                Some((u, "*")) if !u.is_empty() && u != "*" => {
                    m.users.insert(u.to_lowercase());
                }
                Some(_) => {
                    let (l, d) = key(line).ok_or_else(bad)?;
                    let odd = |c: char| c.is_whitespace() || c == '*';
                    if l.contains(odd) || d.contains(odd) {
                        return Err(bad());
                    }
                    m.exact.insert(format!("{l}@{d}"));
                }
                None => return Err(bad()),
            }
        }
        Ok(m)
    }

    /// Whether `address` (as given at RCPT) is a known recipient.
    pub fn knows(&self, address: &str) -> bool {
        let Some((local, domain)) = key(address) else {
            return false;
        };
        self.domains.contains(&domain)
            || self.users.contains(&local)
            || self.exact.contains(&format!("{local}@{domain}"))
    }

    /// Entries loaded.
    pub fn len(&self) -> usize {
        self.exact.len() + self.domains.len() + self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Every `[[recipients]]` section: which local domains each map covers.
#[derive(Debug, Default, Clone)]
pub struct RecipientMaps {
    maps: Vec<(Vec<String>, RecipientMap)>,
}

/// What RCPT validation says of one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// No map covers its domain: not validated here.
    Unchecked,
    Known,
    Unknown,
}

impl RecipientMaps {
    /// Maps with the domain patterns they cover (as in `[domains] local`).
    pub fn new(maps: Vec<(Vec<String>, RecipientMap)>) -> RecipientMaps {
        RecipientMaps { maps }
    }

    /// Look `address` up in the first map whose domains cover its domain.
    pub fn lookup(&self, address: &str) -> Lookup {
        let domain = address.rsplit_once('@').map_or("", |(_, d)| d);
        match self
            .maps
            .iter()
            .find(|(patterns, _)| crate::domain::domain_matches(patterns, domain))
        {
            None => Lookup::Unchecked,
            Some((_, m)) if m.knows(address) => Lookup::Known,
            Some(_) => Lookup::Unknown,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
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
        ] {
            assert!(m.knows(a), "{a}");
        }
        for a in [
            "carol@example.com",
            "alice@example.org",
            "+x@example.com",
            "noat",
            "@example.com",
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
        let maps = RecipientMaps::new(vec![(
            vec!["example.com".into(), "*.example.com".into()],
            RecipientMap::parse("alice@example.com\nbob@eu.example.com\n").unwrap(),
        )]);
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
