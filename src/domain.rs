//! Domain names as ringmx compares them: canonical form (lower case, A-labels) and the
//! `name` / `*.suffix` / `*` patterns of `[domains] local`, routes and recipient maps.

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
