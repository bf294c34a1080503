//! Who may send what where: relay rights and accepted domains, per binding. Pure functions of
//! the configuration and the client, so they are tested without sockets.
//!
//! - Inbound bindings accept recipients in `[domains] local` only (`550 5.7.1`), plus the bare
//!   `<Postmaster>` (RFC 5321 §4.5.1).
//! - Outbound bindings accept any recipient from `allowed_clients` or after AUTH, nothing else
//!   (`554 5.7.1`). AUTH on an inbound binding identifies the client but grants no relay.
//! - `auth = "required"` refuses MAIL until the client authenticated (`530 5.7.0`).
//!
//! There is no combination of settings under which an unauthenticated client outside
//! `allowed_clients` can send to a domain that is not local: that is the open-relay guarantee.

pub mod hops;
pub mod recipients;

use std::net::IpAddr;

use crate::config::{AuthMode, Binding, Config, Direction};
use crate::proto::reply::{self, Reply};
use crate::units::any_contains;

/// What policy knows about the client.
#[derive(Debug, Clone, Copy)]
pub struct Client {
    pub ip: IpAddr,
    pub authenticated: bool,
}

/// A new connection from `ip` (after a PROXY header, the client it names): `clients_deny`
/// first, then `clients_allow` when it lists any network.
pub fn check_connect(binding: &Binding, ip: IpAddr) -> Result<(), &'static Reply> {
    let s = &binding.section;
    if any_contains(&s.clients_deny, ip)
        || (!s.clients_allow.is_empty() && !any_contains(&s.clients_allow, ip))
    {
        return Err(&reply::ACCESS_DENIED);
    }
    Ok(())
}

/// MAIL FROM.
pub fn check_mail(binding: &Binding, client: Client) -> Result<(), &'static Reply> {
    if binding.section.auth == AuthMode::Required && !client.authenticated {
        return Err(&reply::AUTH_REQUIRED);
    }
    Ok(())
}

/// RCPT TO, given the recipient's domain (empty for the bare `<Postmaster>`).
pub fn check_rcpt(
    cfg: &Config,
    binding: &Binding,
    client: Client,
    domain: &str,
) -> Result<(), &'static Reply> {
    // Authentication grants relay rights on outbound bindings only: an inbound binding takes
    // mail for the local domains, from anyone, authenticated or not.
    if client.authenticated && binding.section.direction == Direction::Outbound {
        return Ok(());
    }
    match binding.section.direction {
        Direction::Inbound => {
            if domain.is_empty() || cfg.is_local_domain(domain) {
                Ok(())
            } else {
                Err(&reply::RELAY_DENIED_NOT_LOCAL)
            }
        }
        Direction::Outbound => {
            if any_contains(&binding.section.allowed_clients, client.ip) {
                Ok(())
            } else {
                Err(&reply::RELAY_DENIED)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::parse(
            r#"
[[binding]]
name = "in"
listen = "127.0.0.1:2525"
direction = "inbound"
[[binding]]
name = "out"
listen = "127.0.0.1:2587"
direction = "outbound"
allowed_clients = ["10.0.0.0/8"]
[domains]
local = ["example.test", "*.corp.test"]
[[route]]
domains = ["*"]
action = "drop"
folder = "/tmp/x"
"#,
            "t",
        )
        .unwrap()
    }

    fn client(ip: &str, authenticated: bool) -> Client {
        Client {
            ip: ip.parse().unwrap(),
            authenticated,
        }
    }

    #[test]
    fn access_lists_deny_first_then_allow() {
        let mut c = cfg();
        let b = &mut c.bindings[0];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            check_connect(b, ip("203.0.113.9")),
            Ok(()),
            "no lists: anyone"
        );
        let net = |s: &str| crate::units::Cidr::parse(s).unwrap();
        b.section.clients_allow = vec![net("192.0.2.0/24")];
        b.section.clients_deny = vec![net("192.0.2.66/32")];
        assert_eq!(check_connect(b, ip("192.0.2.1")), Ok(()));
        assert_eq!(check_connect(b, ip("::ffff:192.0.2.1")), Ok(()));
        assert_eq!(
            check_connect(b, ip("192.0.2.66")),
            Err(&reply::ACCESS_DENIED)
        );
        assert_eq!(
            check_connect(b, ip("198.51.100.1")),
            Err(&reply::ACCESS_DENIED)
        );
    }

    #[test]
    fn inbound_accepts_local_domains_only() {
        let c = cfg();
        let b = &c.bindings[0];
        let anyone = client("203.0.113.9", false);
        assert_eq!(check_rcpt(&c, b, anyone, "example.test"), Ok(()));
        assert_eq!(check_rcpt(&c, b, anyone, "mx.corp.test"), Ok(()));
        assert_eq!(check_rcpt(&c, b, anyone, ""), Ok(()), "bare <Postmaster>");
        assert_eq!(
            check_rcpt(&c, b, anyone, "gmail.test"),
            Err(&reply::RELAY_DENIED_NOT_LOCAL)
        );
        // Being in some binding's allowed_clients does not make inbound relay, nor does AUTH.
        assert_eq!(
            check_rcpt(&c, b, client("10.1.1.1", false), "gmail.test"),
            Err(&reply::RELAY_DENIED_NOT_LOCAL)
        );
        assert_eq!(
            check_rcpt(&c, b, client("203.0.113.9", true), "gmail.test"),
            Err(&reply::RELAY_DENIED_NOT_LOCAL)
        );
    }

    #[test]
    fn outbound_relays_for_allowed_clients_or_auth() {
        let c = cfg();
        let b = &c.bindings[1];
        assert_eq!(
            check_rcpt(&c, b, client("10.1.2.3", false), "gmail.test"),
            Ok(())
        );
        assert_eq!(
            check_rcpt(&c, b, client("::ffff:10.1.2.3", false), "gmail.test"),
            Ok(())
        );
        assert_eq!(
            check_rcpt(&c, b, client("203.0.113.9", false), "gmail.test"),
            Err(&reply::RELAY_DENIED)
        );
        assert_eq!(
            check_rcpt(&c, b, client("203.0.113.9", false), "example.test"),
            Err(&reply::RELAY_DENIED)
        );
        assert_eq!(
            check_rcpt(&c, b, client("203.0.113.9", true), "gmail.test"),
            Ok(())
        );
    }
}
