//! Delivery to next hops: the sans-IO client ([`client`]), reply parsing ([`reply`]), MX
//! resolution ([`dns`]), client TLS ([`tls`]) and delivery status notifications ([`dsn`]).
//! The runtime glue that drives them lives in `runtime::outbound` and `runtime::queue`.

pub mod client;
pub mod dns;
pub mod dsn;
pub mod failure;
pub mod probe;
pub mod reply;
pub mod tls;

/// TLS towards a next hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RelayTls {
    /// Never.
    None,
    /// STARTTLS when the next hop offers it; plain otherwise.
    #[default]
    Opportunistic,
    /// STARTTLS must succeed, or the hop counts as failed (temporary).
    Required,
    /// TLS from the first byte (port 465).
    Implicit,
}

/// `host:port` or `[v6]:port` → (host, port).
pub fn parse_hop(s: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        match rest.split_once(']')? {
            (h, "") => (h, None),
            (h, p) => (h, Some(p.strip_prefix(':')?)),
        }
    } else {
        match s.split_once(':') {
            // An IPv6 address needs brackets: `2001:db8::1` would be ambiguous.
            Some((_, p)) if p.contains(':') => return None,
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    // SMTP's port (RFC 5321 §4.5.4.2 is silent; every MTA defaults to 25).
    let port: u16 = match port {
        Some(p) => p.parse().ok().filter(|&p| p > 0)?,
        None => 25,
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return None;
    }
    Some((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hops() {
        assert_eq!(parse_hop("mx.test:25"), Some(("mx.test".into(), 25)));
        assert_eq!(parse_hop("[::1]:2525"), Some(("::1".into(), 2525)));
        assert_eq!(parse_hop("127.0.0.1:0"), None);
        // Without a port: 25.
        assert_eq!(parse_hop("mx.test"), Some(("mx.test".into(), 25)));
        assert_eq!(parse_hop("[2001:db8::1]"), Some(("2001:db8::1".into(), 25)));
        assert_eq!(parse_hop("2001:db8::1"), None, "IPv6 needs brackets");
        assert_eq!(parse_hop("[::1]2525"), None);
        assert_eq!(parse_hop("mx.test:"), None);
        assert_eq!(parse_hop(""), None);
    }
}
