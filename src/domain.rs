//! Domain names as ringmx compares them: canonical form (lower case, A-labels) and the
//! `name` / `*.suffix` / `*` patterns of `[domains] local`, routes and recipient maps.

/// The Public Suffix List that finds a domain's organizational domain (RFC 7489 §3.2): the
/// list compiled into the `psl` crate, or one read from a file (`[authentication]
/// public_suffix_list`, for a list newer than the build).
#[derive(Clone, Default)]
pub struct Suffixes(Option<std::sync::Arc<publicsuffix::List>>);

impl std::fmt::Debug for Suffixes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "file" } else { "built-in" })
    }
}

/// The same list: both built in, or one read once (a list read again compares unequal).
impl PartialEq for Suffixes {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (None, None) => true,
            (Some(a), Some(b)) => std::sync::Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}
impl Eq for Suffixes {}

impl Suffixes {
    /// A list in the publicsuffix.org format (`public_suffix_list.dat`).
    pub fn parse(text: &str) -> Result<Suffixes, String> {
        let list: publicsuffix::List = text.parse().map_err(|e| format!("{e}"))?;
        // A list that does not know `com` is not a public suffix list (an empty or wrong
        // file would make every domain its own organization).
        if psl_types::List::suffix(&list, b"example.com").is_none_or(|s| s.as_bytes() != b"com") {
            return Err("not a public suffix list: it has no rule for \"com\"".into());
        }
        Ok(Suffixes(Some(std::sync::Arc::new(list))))
    }

    /// The organizational domain of `d`: one label below its public suffix; `d` itself when
    /// the list does not know its suffix or `d` is a public suffix.
    pub fn organizational_domain<'a>(&self, d: &'a str) -> &'a str {
        let found = match &self.0 {
            Some(list) => psl_types::List::domain(list.as_ref(), d.as_bytes()),
            None => psl_types::List::domain(&psl::List, d.as_bytes()),
        };
        // The domain found is a suffix of `d`.
        found
            .and_then(|o| d.get(d.len().saturating_sub(o.as_bytes().len())..))
            .unwrap_or(d)
    }
}

/// A domain in the one form ringmx compares: lower case, internationalized labels as
/// A-labels (`bücher.example` → `xn--bcher-kva.example`). Left as it is (lowered) when IDNA
/// refuses it; such a name matches only itself.
pub fn canonical_domain(d: &str) -> std::borrow::Cow<'_, str> {
    if d.is_ascii() {
        if d.bytes().any(|b| b.is_ascii_uppercase()) {
            std::borrow::Cow::Owned(d.to_ascii_lowercase())
        } else {
            std::borrow::Cow::Borrowed(d)
        }
    } else {
        std::borrow::Cow::Owned(idna::domain_to_ascii(d).unwrap_or_else(|_| d.to_lowercase()))
    }
}

/// [`canonical_domain`] for a pattern (`*`, `*.suffix` or a name).
pub fn canonical_pattern(p: &str) -> String {
    match p.strip_prefix("*.") {
        Some(suffix) => format!("*.{}", canonical_domain(suffix)),
        None if p == "*" => p.to_string(),
        None => canonical_domain(p).into_owned(),
    }
}

/// Case-insensitive match of `domain` against exact names and `*.suffix` patterns (patterns
/// in canonical form; `domain` in either IDNA form).
pub fn domain_matches(patterns: &[String], domain: &str) -> bool {
    let ascii;
    let domain = if domain.is_ascii() {
        domain
    } else {
        ascii = canonical_domain(domain);
        &ascii
    };
    let domain = domain.trim_end_matches('.');
    patterns.iter().any(|p| match p.strip_prefix("*.") {
        Some(suffix) => {
            domain.len() > suffix.len() + 1
                && domain
                    .get(domain.len() - suffix.len()..)
                    .is_some_and(|t| t.eq_ignore_ascii_case(suffix))
                && domain.as_bytes().get(domain.len() - suffix.len() - 1) == Some(&b'.')
        }
        None => p.eq_ignore_ascii_case(domain),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn organizational_domains_from_the_built_in_list_and_a_file() {
        let built_in = Suffixes::default();
        for (d, org) in [
            ("mail.example.com", "example.com"),
            ("a.b.example.co.uk", "example.co.uk"),
            ("example.com", "example.com"),
            ("alice.blogs.example.com", "example.com"),
            ("com", "com"),
        ] {
            assert_eq!(built_in.organizational_domain(d), org);
        }
        let file = Suffixes::parse(
            "// ===BEGIN ICANN DOMAINS===\ncom\nuk\nco.uk\n// ===END ICANN DOMAINS===\n\
             // ===BEGIN PRIVATE DOMAINS===\nblogs.example.com\n// ===END PRIVATE DOMAINS===\n",
        )
        .unwrap();
        for (d, org) in [
            ("mail.example.com", "example.com"),
            ("alice.blogs.example.com", "alice.blogs.example.com"),
            ("x.alice.blogs.example.com", "alice.blogs.example.com"),
            ("a.b.example.co.uk", "example.co.uk"),
        ] {
            assert_eq!(file.organizational_domain(d), org, "{d}");
        }
        assert!(file != built_in && file == file.clone());
        assert!(Suffixes::parse("").is_err());
        assert!(Suffixes::parse("uk\nco.uk\n").is_err());
    }
}
