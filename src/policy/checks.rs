//! The checks on the pipeline (see [`super::pipeline`]), and the order they run in per binding
//! ([`for_binding`]). Each is a pure function of its settings and the [`Request`].

use std::sync::Arc;

use super::callout::{Callout, Callouts};
use super::pipeline::{Check, Decision, Mark, Pipeline, Refusal, Request, Stage};
use super::rates::{Event, Rates};
use super::recipients::{Lookup, RecipientMaps, UnknownRecipient};
use crate::aswl::Aswl;
use crate::config::{AuthMode, Binding, Config, Direction};
use crate::metrics::Reason;
use crate::proto::reply;
use crate::units::{Cidr, any_contains};

/// What the checks of a binding are built from.
#[derive(Debug, Clone, Copy)]
pub struct Sources<'a> {
    pub config: &'a Arc<Config>,
    pub binding: &'a Binding,
    pub recipients: &'a Arc<RecipientMaps>,
    /// The running whitelist (`None` when `[aswl]` is off).
    pub aswl: Option<&'a Arc<Aswl>>,
    /// The rate limits (`None` when `[rates]` sets none).
    pub rates: Option<&'a Arc<Rates>>,
    /// The DNS lists (`None` when `[dnsbl]` lists none).
    pub dnsbl: Option<&'a Arc<super::dnsbl::DnsLists>>,
    /// The callout cache (`None` in tests without one).
    pub callouts: Option<&'a Arc<Callouts>>,
    /// The resolver for SPF, DKIM and DMARC (`None`: no verification).
    pub dns: Option<&'a Arc<crate::relay::dns::Dns>>,
    /// Where checks that count results count them.
    pub metrics: Option<&'a Arc<crate::metrics::Metrics>>,
}

/// The pipeline of a binding:
///
/// | stage   | checks, in order |
/// |---------|------------------|
/// | connect | `client_access` (`clients_deny`, `clients_allow`), `connection_rate` (`[rates]`), `dnsbl` (inbound, `[dnsbl]`) |
/// | mail    | `auth_required` (`auth = "required"`), `message_rate`, `spf_reject` (inbound, `[authentication] spf_reject`) |
/// | rcpt    | `relay_rights`, `known_recipients` (inbound, `[[recipients]]`; with the unknown-recipient rate), `recipient_rate`, `callout` (inbound, `[[recipients]] callout = true`), `whitelist` (inbound, `[aswl]`) |
/// | data    | `header_size`, `hop_limit`, `authenticate` (inbound, `[authentication] verify`) |
pub fn for_binding(s: Sources<'_>) -> Pipeline {
    let b = s.binding;
    let mut checks: Vec<Arc<dyn Check>> = Vec::new();
    if !b.section.clients_deny.is_empty() || !b.section.clients_allow.is_empty() {
        checks.push(Arc::new(ClientAccess {
            deny: b.section.clients_deny.clone(),
            allow: b.section.clients_allow.clone(),
        }));
    }
    let rate = |event: Event| {
        s.rates
            .filter(|r| r.limits(event))
            .map(|r| RateLimit::new(r.clone(), event))
    };
    if let Some(c) = rate(Event::Connection) {
        checks.push(Arc::new(c));
    }
    if b.section.direction == Direction::Inbound
        && let Some(d) = s.dnsbl
    {
        checks.push(d.clone());
    }
    if b.section.auth == AuthMode::Required {
        checks.push(Arc::new(AuthRequired));
    }
    if let Some(c) = rate(Event::Message) {
        checks.push(Arc::new(c));
    }
    let auth = &s.config.authentication;
    if b.section.direction == Direction::Inbound
        && auth.verify
        && auth.spf_reject
        && let Some(dns) = s.dns
    {
        checks.push(Arc::new(super::authenticate::SpfAtMail {
            dns: dns.clone(),
            authserv_id: s.config.authserv_id().to_string(),
            timeout: auth.timeout.0,
        }));
    }
    checks.push(Arc::new(RelayRights {
        config: s.config.clone(),
        direction: b.section.direction,
        allowed_clients: b.section.allowed_clients.clone(),
    }));
    let inbound = b.section.direction == Direction::Inbound;
    if inbound && !s.recipients.is_empty() {
        let unknown = UnknownRecipient {
            max_unknown: b.limits.max_unknown_recipients,
            rates: s
                .rates
                .filter(|r| r.limits(Event::UnknownRecipient))
                .cloned(),
        };
        checks.push(Arc::new(KnownRecipients {
            maps: s.recipients.clone(),
            unknown: unknown.clone(),
        }));
        if let Some(c) = rate(Event::Recipient) {
            checks.push(Arc::new(c));
        }
        // After the recipient rate: a client over it costs no probe.
        if let Some(c) = s.callouts
            && s.recipients.has_callouts()
        {
            checks.push(Arc::new(Callout {
                callouts: c.clone(),
                maps: s.recipients.clone(),
                config: s.config.clone(),
                unknown,
            }));
        }
    } else if let Some(c) = rate(Event::Recipient) {
        checks.push(Arc::new(c));
    }
    if inbound && let (Some(a), Some(settings)) = (s.aswl, &s.config.aswl) {
        checks.push(Arc::new(Whitelist {
            aswl: a.clone(),
            settings: settings.clone(),
        }));
    }
    checks.push(Arc::new(HeaderSize));
    checks.push(Arc::new(HopLimit {
        max: b.limits.max_hops,
    }));
    if inbound
        && s.config.authentication.verify
        && let Some(dns) = s.dns
    {
        checks.push(Arc::new(super::authenticate::Authenticate {
            verifier: super::authenticate::Verifier {
                dns: dns.clone(),
                authserv_id: s.config.authserv_id().to_string(),
                timeout: s.config.authentication.timeout.0,
                suffixes: s.config.authentication.suffixes.clone(),
            },
            dmarc_reject: s.config.authentication.dmarc_reject,
            enforce: s.config.authentication.dmarc_reject
                || s.config.routes.iter().any(|r| r.dmarc.is_some()),
            metrics: s.metrics.cloned(),
        }));
    }
    Pipeline::new(checks)
}

/// Connect: `clients_deny` first, then `clients_allow` when it lists any network
/// (`554 5.7.1` instead of the greeting).
#[derive(Debug)]
pub struct ClientAccess {
    pub deny: Vec<Cidr>,
    pub allow: Vec<Cidr>,
}

impl Check for ClientAccess {
    fn name(&self) -> &'static str {
        "client_access"
    }
    fn stage(&self) -> Stage {
        Stage::Connect
    }
    fn check(&self, r: &Request<'_>) -> Decision {
        if any_contains(&self.deny, r.ip)
            || (!self.allow.is_empty() && !any_contains(&self.allow, r.ip))
        {
            Decision::Reject(Refusal::new(
                &reply::ACCESS_DENIED,
                Reason::AccessDenied,
                "refused: access list",
            ))
        } else {
            Decision::Continue
        }
    }
}

/// MAIL: `auth = "required"` refuses it until the client authenticated (`530 5.7.0`).
#[derive(Debug)]
pub struct AuthRequired;

impl Check for AuthRequired {
    fn name(&self) -> &'static str {
        "auth_required"
    }
    fn stage(&self) -> Stage {
        Stage::Mail
    }
    fn check(&self, r: &Request<'_>) -> Decision {
        if r.authenticated {
            Decision::Continue
        } else {
            Decision::Reject(Refusal::new(
                &reply::AUTH_REQUIRED,
                Reason::AuthRequired,
                "refused: authentication required",
            ))
        }
    }
}

/// RCPT: the open-relay guarantee. Inbound bindings take recipients in `[domains] local` (and
/// the bare `<Postmaster>`), from anyone, authenticated or not (`550 5.7.1`); outbound ones
/// relay for `allowed_clients` or after AUTH, nothing else (`554 5.7.1`).
#[derive(Debug)]
pub struct RelayRights {
    pub config: Arc<Config>,
    pub direction: Direction,
    pub allowed_clients: Vec<Cidr>,
}

impl Check for RelayRights {
    fn name(&self) -> &'static str {
        "relay_rights"
    }
    fn stage(&self) -> Stage {
        Stage::Rcpt
    }
    fn check(&self, r: &Request<'_>) -> Decision {
        let allowed = match self.direction {
            // Only the bare `<Postmaster>` has no domain; an empty domain with anything else
            // is never taken for it.
            Direction::Inbound => {
                (r.rcpt_domain.is_empty() && r.rcpt.eq_ignore_ascii_case("postmaster"))
                    || (!r.rcpt_domain.is_empty() && self.config.is_local_domain(r.rcpt_domain))
            }
            Direction::Outbound => r.authenticated || any_contains(&self.allowed_clients, r.ip),
        };
        if allowed {
            return Decision::Continue;
        }
        let reply = match self.direction {
            Direction::Inbound => &reply::RELAY_DENIED_NOT_LOCAL,
            Direction::Outbound => &reply::RELAY_DENIED,
        };
        Decision::Reject(Refusal::new(reply, Reason::RelayDenied, "refused: relay"))
    }
}

/// RCPT (inbound): recipients of a domain with a `[[recipients]]` map must be in it
/// (`550 5.1.1`); the `max_unknown_recipients`-th unknown one ends the session (`421 4.7.0`).
#[derive(Debug)]
pub struct KnownRecipients {
    pub maps: Arc<RecipientMaps>,
    pub unknown: UnknownRecipient,
}

impl Check for KnownRecipients {
    fn name(&self) -> &'static str {
        "known_recipients"
    }
    fn stage(&self) -> Stage {
        Stage::Rcpt
    }
    fn check(&self, r: &Request<'_>) -> Decision {
        if self.maps.lookup(r.rcpt) != Lookup::Unknown {
            return Decision::Continue;
        }
        self.unknown.refuse(r.ip, r.clock_ms, r.unknown_rcpts)
    }
}

/// `[rates]`: one event of the client's network counted at its stage — a connection at
/// connect (`421 4.7.0`), a message at MAIL and a recipient at RCPT (`450 4.7.1`).
#[derive(Debug)]
pub struct RateLimit {
    rates: Arc<Rates>,
    event: Event,
}

impl RateLimit {
    pub fn new(rates: Arc<Rates>, event: Event) -> RateLimit {
        RateLimit { rates, event }
    }
}

impl Check for RateLimit {
    fn name(&self) -> &'static str {
        match self.event {
            Event::Connection => "connection_rate",
            Event::Message => "message_rate",
            Event::Recipient | Event::UnknownRecipient => "recipient_rate",
        }
    }
    fn stage(&self) -> Stage {
        match self.event {
            Event::Connection => Stage::Connect,
            Event::Message => Stage::Mail,
            Event::Recipient | Event::UnknownRecipient => Stage::Rcpt,
        }
    }
    fn check(&self, r: &Request<'_>) -> Decision {
        if self.rates.take(self.event, r.ip, r.clock_ms) {
            return Decision::Continue;
        }
        let reply = match self.event {
            Event::Connection => &reply::RATE_CONNECTIONS,
            Event::Message => &reply::RATE_MESSAGES,
            Event::Recipient | Event::UnknownRecipient => &reply::RATE_RECIPIENTS,
        };
        Decision::Reject(Refusal::new(
            reply,
            Reason::RateLimited,
            "refused: rate limit",
        ))
    }
}

/// RCPT (inbound, `[aswl]`): the whitelist's verdict for this sender and recipient, a mark
/// routes and the verdict header use (lock-free lookup).
#[derive(Debug)]
pub struct Whitelist {
    pub aswl: Arc<Aswl>,
    pub settings: Arc<crate::aswl::Settings>,
}

impl Check for Whitelist {
    fn name(&self) -> &'static str {
        "whitelist"
    }
    fn stage(&self) -> Stage {
        Stage::Rcpt
    }
    fn check(&self, r: &Request<'_>) -> Decision {
        let v = self.aswl.check(&self.settings, r.mail_from, r.rcpt, r.now);
        Decision::Mark(Mark::Whitelisted(v.pass()))
    }
}

/// Data: what ringmx reads and rewrites in the header section must be all of it
/// (`552 5.3.4` when it is longer than the part kept in memory).
#[derive(Debug)]
pub struct HeaderSize;

impl Check for HeaderSize {
    fn name(&self) -> &'static str {
        "header_size"
    }
    fn stage(&self) -> Stage {
        Stage::Data
    }
    fn check(&self, r: &Request<'_>) -> Decision {
        if r.header_complete {
            Decision::Continue
        } else {
            Decision::Reject(Refusal::new(
                &reply::HEADER_TOO_LONG,
                Reason::TooBig,
                "refused: header section too long",
            ))
        }
    }
}

/// Data: more than `max_hops` `Received:` fields is a mail loop (`554 5.4.6`).
#[derive(Debug)]
pub struct HopLimit {
    pub max: usize,
}

impl Check for HopLimit {
    fn name(&self) -> &'static str {
        "hop_limit"
    }
    fn stage(&self) -> Stage {
        Stage::Data
    }
    fn check(&self, r: &Request<'_>) -> Decision {
        if super::hops::received_count(r.header) > self.max {
            Decision::Reject(Refusal::new(
                &reply::TOO_MANY_HOPS,
                Reason::Loop,
                "refused: mail loop",
            ))
        } else {
            Decision::Continue
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::pipeline::Outcome;
    use crate::proto::reply::Reply;

    fn cfg() -> Arc<Config> {
        Arc::new(
            Config::parse(
                r#"
[[binding]]
name = "in"
listen = "127.0.0.1:2525"
direction = "inbound"
clients_deny = ["192.0.2.66/32"]
clients_allow = ["192.0.2.0/24", "203.0.113.0/24"]
[[binding]]
name = "out"
listen = "127.0.0.1:2587"
direction = "outbound"
allowed_clients = ["10.0.0.0/8"]
[limits]
max_unknown_recipients = 3
max_hops = 2
[domains]
local = ["example.test", "*.corp.test"]
[[route]]
domains = ["*"]
action = "drop"
folder = "/tmp/x"
"#,
                "t",
            )
            .unwrap(),
        )
    }

    fn pipeline(c: &Arc<Config>, binding: usize, known: &str) -> Pipeline {
        pipeline_of(c, &c.bindings[binding], known)
    }

    fn pipeline_of(c: &Arc<Config>, binding: &Binding, known: &str) -> Pipeline {
        let map = super::super::recipients::RecipientMap::parse(known).unwrap();
        let maps = Arc::new(RecipientMaps::new(vec![(
            vec!["example.test".into()],
            Some(map),
        )]));
        for_binding(Sources {
            config: c,
            binding,
            recipients: &maps,
            aswl: None,
            rates: None,
            dnsbl: None,
            callouts: None,
            dns: None,
            metrics: None,
        })
    }

    /// The outbound binding with `auth = "required"`.
    fn auth_required(c: &Arc<Config>) -> Pipeline {
        let mut b = c.bindings[1].clone();
        b.section.auth = AuthMode::Required;
        pipeline_of(c, &b, "")
    }

    fn req(ip: &str) -> Request<'static> {
        Request::new(ip.parse().unwrap(), 0)
    }

    fn rcpt<'a>(ip: &str, authenticated: bool, to: &'a str) -> Request<'a> {
        Request {
            authenticated,
            rcpt: to,
            rcpt_domain: to.rsplit_once('@').map_or("", |(_, d)| d),
            ..req(ip)
        }
    }

    /// The reply of a run: `None` = accepted.
    fn reply_of(p: &Pipeline, stage: Stage, r: &Request<'_>) -> Option<&'static Reply> {
        match p.run(stage, r) {
            Outcome::Accept(_) => None,
            Outcome::Reject(f) => Some(f.reply),
            Outcome::Defer(_) => panic!("nothing defers here"),
        }
    }

    #[test]
    fn order_per_binding() {
        let c = cfg();
        let p = pipeline(&c, 0, "a@example.test\n");
        assert_eq!(p.names(Stage::Connect), ["client_access"]);
        assert!(p.names(Stage::Mail).is_empty());
        assert_eq!(p.names(Stage::Rcpt), ["relay_rights", "known_recipients"]);
        assert_eq!(p.names(Stage::Data), ["header_size", "hop_limit"]);
        let p = pipeline(&c, 1, "a@example.test\n");
        assert!(p.names(Stage::Connect).is_empty());
        assert!(p.names(Stage::Mail).is_empty());
        assert_eq!(auth_required(&c).names(Stage::Mail), ["auth_required"]);
        assert_eq!(
            p.names(Stage::Rcpt),
            ["relay_rights"],
            "maps apply to inbound only"
        );
    }

    #[test]
    fn access_lists_deny_first_then_allow() {
        let c = cfg();
        let p = pipeline(&c, 0, "");
        for (ip, want) in [
            ("192.0.2.1", None),
            ("::ffff:192.0.2.1", None),
            ("203.0.113.9", None),
            ("192.0.2.66", Some(&reply::ACCESS_DENIED)),
            ("198.51.100.1", Some(&reply::ACCESS_DENIED)),
            ("2001:db8::1", Some(&reply::ACCESS_DENIED)),
        ] {
            assert_eq!(reply_of(&p, Stage::Connect, &req(ip)), want, "{ip}");
        }
    }

    #[test]
    fn auth_required_at_mail() {
        let c = cfg();
        let p = auth_required(&c);
        assert_eq!(
            reply_of(&p, Stage::Mail, &req("10.0.0.1")),
            Some(&reply::AUTH_REQUIRED)
        );
        let authed = Request {
            authenticated: true,
            ..req("10.0.0.1")
        };
        assert_eq!(reply_of(&p, Stage::Mail, &authed), None);
    }

    #[test]
    fn inbound_accepts_local_domains_only() {
        let c = cfg();
        let p = pipeline(&c, 0, "*@example.test\n");
        let not_local = Some(&reply::RELAY_DENIED_NOT_LOCAL);
        for (ip, auth, to, want) in [
            ("203.0.113.9", false, "a@example.test", None),
            ("203.0.113.9", false, "a@mx.corp.test", None),
            ("203.0.113.9", false, "Postmaster", None),
            ("203.0.113.9", false, "a@gmail.test", not_local),
            // Being in some binding's allowed_clients does not make inbound relay, nor AUTH.
            ("10.1.1.1", false, "a@gmail.test", not_local),
            ("203.0.113.9", true, "a@gmail.test", not_local),
        ] {
            assert_eq!(
                reply_of(&p, Stage::Rcpt, &rcpt(ip, auth, to)),
                want,
                "{ip} {auth} {to}"
            );
        }
    }

    #[test]
    fn an_empty_domain_is_only_the_bare_postmaster() {
        let c = cfg();
        let p = pipeline(&c, 0, "");
        for (to, want) in [
            ("Postmaster", None),
            ("postMASTER", None),
            ("a@gmail.test", Some(&reply::RELAY_DENIED_NOT_LOCAL)),
            ("", Some(&reply::RELAY_DENIED_NOT_LOCAL)),
        ] {
            // A caller that forgot the domain must not open the relay.
            let r = Request {
                rcpt: to,
                ..req("203.0.113.9")
            };
            assert_eq!(reply_of(&p, Stage::Rcpt, &r), want, "{to}");
        }
    }

    #[test]
    fn outbound_relays_for_allowed_clients_or_auth() {
        let c = cfg();
        let p = pipeline(&c, 1, "");
        let denied = Some(&reply::RELAY_DENIED);
        for (ip, auth, to, want) in [
            ("10.1.2.3", false, "a@gmail.test", None),
            ("::ffff:10.1.2.3", false, "a@gmail.test", None),
            ("203.0.113.9", false, "a@gmail.test", denied),
            ("203.0.113.9", false, "a@example.test", denied),
            ("203.0.113.9", true, "a@gmail.test", None),
        ] {
            assert_eq!(
                reply_of(&p, Stage::Rcpt, &rcpt(ip, auth, to)),
                want,
                "{ip} {auth} {to}"
            );
        }
    }

    #[test]
    fn unknown_recipients_and_the_harvest_limit() {
        let c = cfg();
        let p = pipeline(&c, 0, "alice@example.test\n");
        let ok = rcpt("203.0.113.9", false, "alice+tag@example.test");
        assert_eq!(reply_of(&p, Stage::Rcpt, &ok), None);
        // Domains without a map are not checked.
        assert_eq!(
            reply_of(
                &p,
                Stage::Rcpt,
                &rcpt("203.0.113.9", false, "x@a.corp.test")
            ),
            None
        );
        for (before, close) in [(0, None), (1, None), (2, Some(&reply::TOO_MANY_UNKNOWN))] {
            let r = Request {
                unknown_rcpts: before,
                ..rcpt("203.0.113.9", false, "bob@example.test")
            };
            match p.run(Stage::Rcpt, &r) {
                Outcome::Reject(f) => {
                    assert_eq!(f.reply, &reply::UNKNOWN_RECIPIENT);
                    assert_eq!(f.close.map(|(r, _)| r), close, "after {before}");
                }
                o => panic!("{o:?}"),
            }
        }
    }

    #[test]
    fn rate_limits_on_their_stages() {
        let c = cfg();
        let rs = crate::config::RatesSection {
            connections_per_minute: 2,
            messages_per_minute: 1,
            recipients_per_minute: 1,
            unknown_recipients_per_minute: 1,
            burst_percent: 100,
            ..Default::default()
        };
        let rates = Arc::new(Rates::new(&rs).unwrap());
        let map = super::super::recipients::RecipientMap::parse("alice@example.test\n").unwrap();
        let maps = Arc::new(RecipientMaps::new(vec![(
            vec!["example.test".into()],
            Some(map),
        )]));
        let p = for_binding(Sources {
            config: &c,
            binding: &c.bindings[0],
            recipients: &maps,
            aswl: None,
            rates: Some(&rates),
            dnsbl: None,
            callouts: None,
            dns: None,
            metrics: None,
        });
        assert_eq!(
            p.names(Stage::Connect),
            ["client_access", "connection_rate"]
        );
        assert_eq!(p.names(Stage::Mail), ["message_rate"]);
        assert_eq!(
            p.names(Stage::Rcpt),
            ["relay_rights", "known_recipients", "recipient_rate"]
        );
        let at = |ms: u64, r: Request<'static>| Request { clock_ms: ms, ..r };
        let client = "203.0.113.9";
        assert_eq!(reply_of(&p, Stage::Connect, &at(0, req(client))), None);
        assert_eq!(reply_of(&p, Stage::Connect, &at(0, req(client))), None);
        assert_eq!(
            reply_of(&p, Stage::Connect, &at(0, req(client))),
            Some(&reply::RATE_CONNECTIONS)
        );
        // 2 a minute: one more after 30 s.
        assert_eq!(reply_of(&p, Stage::Connect, &at(30_000, req(client))), None);
        assert_eq!(reply_of(&p, Stage::Mail, &at(0, req(client))), None);
        assert_eq!(
            reply_of(&p, Stage::Mail, &at(0, req(client))),
            Some(&reply::RATE_MESSAGES)
        );
        let to = |a: &'static str| at(0, rcpt(client, false, a));
        assert_eq!(reply_of(&p, Stage::Rcpt, &to("alice@example.test")), None);
        assert_eq!(
            reply_of(&p, Stage::Rcpt, &to("alice@example.test")),
            Some(&reply::RATE_RECIPIENTS)
        );
        // Unknown recipients have their own allowance; over it the session is closed.
        match p.run(Stage::Rcpt, &to("bob@example.test")) {
            Outcome::Reject(f) => assert_eq!(f.close, None),
            o => panic!("{o:?}"),
        }
        match p.run(Stage::Rcpt, &to("bob@example.test")) {
            Outcome::Reject(f) => {
                assert_eq!(f.reply, &reply::UNKNOWN_RECIPIENT);
                assert_eq!(f.close.map(|(r, _)| r), Some(&reply::RATE_UNKNOWN));
            }
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn data_checks() {
        let c = cfg();
        let p = pipeline(&c, 0, "");
        let data = |header: &'static [u8], complete: bool| Request {
            header,
            header_complete: complete,
            ..req("203.0.113.9")
        };
        let two = b"Received: a\r\nReceived: b\r\nSubject: x\r\n\r\n";
        let three = b"Received: a\r\nReceived: b\r\nReceived: c\r\n\r\n";
        for (r, want) in [
            (data(two, true), None),
            (data(three, true), Some(&reply::TOO_MANY_HOPS)),
            (data(two, false), Some(&reply::HEADER_TOO_LONG)),
        ] {
            assert_eq!(reply_of(&p, Stage::Data, &r), want);
        }
    }
}
