//! `ringmx why IP` (`GET /client/IP` on the admin endpoint): what the running server's caches
//! and counters hold about one client, and with `forget` (`POST /client/IP/forget`) the
//! greeting test's and the DNS lists' memory of it dropped.

use std::fmt::Write;
use std::net::IpAddr;
use std::time::Instant;

use super::Shared;
use crate::policy::greet::Known;
use crate::policy::rates::Event;
use crate::units::any_contains;

/// The report, one `what: value` line each.
pub(crate) fn report(shared: &Shared, ip: IpAddr, forget: bool) -> String {
    let live = shared.live();
    let config = &live.config;
    let now = crate::aswl::unix_now();
    let mut o = String::new();
    let _ = writeln!(o, "client: {ip}");
    let _ = writeln!(
        o,
        "connections open: {} (limit {} per address)",
        shared.limits.open_from(ip),
        config.limits.max_connections_per_ip
    );
    for b in &config.bindings {
        let s = &b.section;
        let access = if any_contains(&s.clients_deny, ip) {
            "refused (clients_deny)"
        } else if !s.clients_allow.is_empty() && !any_contains(&s.clients_allow, ip) {
            "refused (not in clients_allow)"
        } else {
            "may connect"
        };
        let _ = writeln!(o, "binding {}: {access}", s.name);
    }
    let greeting = if !config
        .bindings
        .iter()
        .any(|b| b.section.greet_delay.is_some())
    {
        "off (no binding has greet_delay)".to_string()
    } else {
        match shared.greet.recall(ip, u64::from(now)) {
            Known::Unknown => "nothing remembered (waits for the delayed greeting)".into(),
            Known::Good(until) => format!(
                "passed, skips the delay for {} s more",
                until.saturating_sub(now.into())
            ),
            Known::Bad(until) => format!(
                "talked early or pipelined without the offer: refused at connect (554 5.5.0) for {} s more",
                until.saturating_sub(now.into())
            ),
        }
    };
    let _ = writeln!(o, "greeting test: {greeting}");
    let dnsbl = match &shared.dnsbl {
        None => "off".to_string(),
        Some(d) => match d.cached(ip, now) {
            None => "nothing cached (the lists are asked at its next connection)".into(),
            Some((verdict, expires)) => format!(
                "{} (cached {} s more)",
                verdict.map_or("not listed".to_string(), |r| format!(
                    "listed: {} {} {}",
                    r.code, r.enhanced, r.text
                )),
                expires.saturating_sub(now)
            ),
        },
    };
    let _ = writeln!(o, "dnsbl: {dnsbl}");
    let clock = super::conn::clock_ms();
    for (event, name) in [
        (Event::Connection, "connections"),
        (Event::Message, "messages"),
        (Event::Recipient, "recipients"),
        (Event::UnknownRecipient, "unknown recipients"),
    ] {
        let line = match shared.rates.as_ref().and_then(|r| r.used(event, ip, clock)) {
            None => "not limited".to_string(),
            Some((true, _, _)) => "exempt".to_string(),
            Some((false, used, burst)) => {
                let fleet = shared
                    .rates
                    .as_ref()
                    .and_then(|r| r.fleet_total(event, ip))
                    .map_or(String::new(), |n| format!(", {n} fleet-wide this minute"));
                format!("{used} counted now, {burst} at once allowed{fleet}")
            }
        };
        let _ = writeln!(o, "rate {name}: {line}");
    }
    let auth = &config.auth;
    let _ = writeln!(
        o,
        "auth failures: {} within {} s (blocked at {})",
        shared
            .auth_failures
            .failures(ip, Instant::now(), auth.failure_window.0),
        auth.failure_window.0.as_secs(),
        auth.max_failures
    );
    if forget {
        shared.greet.forget(ip);
        if let Some(d) = &shared.dnsbl {
            d.forget(ip);
        }
        let _ = writeln!(
            o,
            "forgotten: the greeting test and the DNS lists start afresh"
        );
    }
    o
}
