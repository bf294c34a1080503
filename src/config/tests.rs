use super::*;

fn parse(s: &str) -> Result<Config, ConfigError> {
    Config::parse(s, "test.toml")
}

const MINIMAL: &str = r#"
[[binding]]
name = "in"
listen = "127.0.0.1:2525"
direction = "inbound"

[domains]
local = ["example.test"]

[[route]]
domains = ["*"]
action = "drop"
folder = "/tmp/drop"
"#;

#[test]
fn embedded_default_is_valid() {
    let c = Config::embedded_default().unwrap();
    assert_eq!(c.bindings.len(), 2);
    assert_eq!(c.bindings[0].section.listen.get_ref().port(), 2525);
    assert_eq!(c.bindings[1].section.direction, Direction::Outbound);
    assert!(c.is_local_domain("EXAMPLE.test"));
    assert_eq!(c.admin.listen, Some("127.0.0.1:8025".parse().unwrap()));
}

#[test]
fn example_file_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/ringmx.toml");
    let src = std::fs::read_to_string(&path).unwrap();
    // The example names certificate files that exist only on a real host; check it parses.
    match Config::parse(&src, "examples/ringmx.toml") {
        Ok(_) => {}
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn minimal_config_gets_defaults() {
    let c = parse(MINIMAL).unwrap();
    let b = &c.bindings[0];
    assert_eq!(b.limits.max_message_size, Size(20 * 1024 * 1024));
    assert_eq!(b.settings.config().max_line, 2048);
    assert_eq!(b.section.tls, TlsMode::None);
    assert_eq!(c.server.data_dir, PathBuf::from("./ringmx-data"));
}

#[test]
fn unknown_key_names_key_and_line() {
    let src = MINIMAL.replace(
        "direction = \"inbound\"",
        "direction = \"inbound\"\ncolour = \"blue\"",
    );
    let e = parse(&src).unwrap_err();
    assert_eq!(e.line, Some(6), "{e}");
    assert!(e.message.contains("colour"), "{e}");
    assert!(e.to_string().starts_with("test.toml:6: "), "{e}");
}

#[test]
fn bad_values_name_their_line() {
    let src = format!("{MINIMAL}\n[limits]\nmax_message_size = \"20 parsecs\"\n");
    let e = parse(&src).unwrap_err();
    assert_eq!(e.line, Some(16), "{e}");
    assert!(e.message.contains("parsecs"), "{e}");

    let src = MINIMAL.replace("127.0.0.1:2525", "127.0.0.1:99999");
    let e = parse(&src).unwrap_err();
    assert_eq!(e.line, Some(4), "{e}");

    let src = MINIMAL.replace("\"inbound\"", "\"sideways\"");
    let e = parse(&src).unwrap_err();
    assert_eq!(e.line, Some(5), "{e}");
    assert!(e.message.contains("sideways"), "{e}");

    let src = MINIMAL.replace(
        "action = \"drop\"",
        "action = \"drop\"\nmx_ignore = [\"10.0.0.0/33\"]",
    );
    let e = parse(&src).unwrap_err();
    assert_eq!(e.line, Some(13), "{e}");
    assert!(
        e.to_string()
            .contains("mx_ignore: invalid network \"10.0.0.0/33\""),
        "{e}"
    );
}

#[test]
fn mx_ignore_defaults_to_this_hosts_own_and_link_local_addresses() {
    let c = parse(MINIMAL).unwrap();
    let ignored =
        |ip: &str| crate::units::any_contains(&c.routes[0].mx_ignore, ip.parse().unwrap());
    for ip in [
        "127.0.0.1",
        "127.1.2.3",
        "0.0.0.0",
        "::1",
        "::",
        "::ffff:127.0.0.1",
        "169.254.169.254",
        "fe80::1",
        "fd00:ec2::254",
    ] {
        assert!(ignored(ip), "{ip}");
    }
    for ip in ["10.0.0.1", "192.0.2.1", "2001:db8::1"] {
        assert!(!ignored(ip), "{ip}");
    }
    let c =
        parse(&MINIMAL.replace("action = \"drop\"", "action = \"drop\"\nmx_ignore = []")).unwrap();
    assert!(c.routes[0].mx_ignore.is_empty());
}

#[test]
fn semantic_errors_name_the_key() {
    let cases = [
        (
            MINIMAL.replace(
                "direction = \"inbound\"",
                "direction = \"inbound\"\ntls = \"starttls\"",
            ),
            "binding[0] (in).certificate",
            Some(6),
        ),
        (
            MINIMAL.replace("direction = \"inbound\"", "direction = \"outbound\""),
            "binding[0] (in).allowed_clients",
            Some(5),
        ),
        (
            MINIMAL.replace("local = [\"example.test\"]", "local = []"),
            "binding[0] (in).direction",
            Some(5),
        ),
        (
            format!("{MINIMAL}\n[limits]\nmax_line = 100\n"),
            "limits.max_line",
            Some(16),
        ),
        (
            format!("{MINIMAL}\n[limits]\nmax_junk_commands = 0\n"),
            "limits.max_junk_commands",
            Some(16),
        ),
        (
            MINIMAL.replace("domains = [\"*\"]", "domains = [\"bad domain\"]"),
            "route[0].domains",
            Some(11),
        ),
        (
            MINIMAL.replace(
                "direction = \"inbound\"",
                "direction = \"inbound\"\nauth = \"required\"",
            ),
            "binding[0] (in).auth",
            Some(6),
        ),
        (
            format!(
                "{MINIMAL}\n[[binding]]\nname = \"in2\"\nlisten = \"127.0.0.1:2525\"\ndirection = \"inbound\"\n"
            ),
            "binding[1] (in2).listen",
            Some(17),
        ),
        (
            format!("{MINIMAL}\n[rates]\nconnections_per_minute = 10\nipv4_prefix = 33\n"),
            "rates.ipv4_prefix",
            Some(17),
        ),
        (
            format!("{MINIMAL}\n[rates]\ntable_size = 0\n"),
            "rates.table_size",
            Some(16),
        ),
        (
            format!("{MINIMAL}\n[rates]\nipv6_prefix = 0\n"),
            "rates.ipv6_prefix",
            Some(16),
        ),
        (
            format!("{MINIMAL}\n[dnsbl]\nlists = [\"zen.example\"]\ntimeout = \"0s\"\n"),
            "dnsbl.timeout",
            Some(17),
        ),
        (
            format!("{MINIMAL}\n[dnsbl]\nlists = [\"zen.example\",\n \"bad list\"]\n"),
            "dnsbl.lists",
            Some(17),
        ),
    ];
    for (src, key, line) in cases {
        let e = parse(&src).unwrap_err();
        assert_eq!((e.key.as_str(), e.line), (key, line), "{e}");
    }
}

#[test]
fn drop_folder_defaults_to_the_data_dir() {
    let src = format!(
        "[server]\ndata_dir = \"/srv/mx\"\n{}",
        MINIMAL.replace("folder = \"/tmp/drop\"", "")
    );
    let c = parse(&src).unwrap();
    assert_eq!(c.routes[0].folder, Some(PathBuf::from("/srv/mx/drop")));
}

#[test]
fn binding_limits_override_globals() {
    let src = MINIMAL.replace(
        "direction = \"inbound\"",
        "direction = \"inbound\"\n[binding.limits]\nmax_message_size = \"1MiB\"\nmax_recipients = 5",
    );
    let c = parse(&format!(
        "{src}\n[limits]\nmax_errors = 7\nmax_junk_commands = 9\n"
    ))
    .unwrap();
    let l = &c.bindings[0].limits;
    assert_eq!(
        (l.max_message_size, l.max_recipients, l.max_errors),
        (Size(1 << 20), 5, 7)
    );
    let session = c.bindings[0].settings.config();
    assert_eq!((session.max_recipients, session.max_junk_commands), (5, 9));
}

#[test]
fn domain_patterns() {
    let p = vec!["example.com".to_string(), "*.corp.test".to_string()];
    assert!(domain_matches(&p, "Example.COM"));
    assert!(domain_matches(&p, "mail.corp.test"));
    assert!(domain_matches(&p, "a.b.corp.test"));
    assert!(!domain_matches(&p, "corp.test"));
    assert!(!domain_matches(&p, "xcorp.test"));
    assert!(!domain_matches(&p, "example.com.evil.test"));
}

#[test]
fn cores() {
    assert_eq!(Cores::All("all".into()).resolve(2), vec![0, 1]);
    assert_eq!(Cores::Count(3).resolve(2), vec![0, 1, 0]);
    assert_eq!(Cores::List(vec![1]).resolve(2), vec![1]);
    let e = parse(&format!("[server]\ncores = \"many\"\n{MINIMAL}")).unwrap_err();
    assert_eq!((e.key.as_str(), e.line), ("server.cores", Some(2)));
}

const RELAY: &str = r#"
[[route]]
domains = ["remote.test"]
action = "relay"
next_hops = ["10.0.0.1:25", "[2001:db8::1]:2525"]
sender_domains = ["example.test"]
tls = "required"
ehlo = "edge.test"

[route.source_ip]
"example.test" = "192.0.2.10"
"*" = "192.0.2.11"
"#;

#[test]
fn relay_routes_match_by_recipient_and_sender_domain() {
    let c = parse(&format!("{RELAY}{MINIMAL}")).unwrap();
    let (i, r) = c
        .route_for("Remote.Test", "example.test", RouteFacts::inbound(None))
        .unwrap();
    assert_eq!(
        (i, r.action, r.tls),
        (0, RouteAction::Relay, RelayTls::Required)
    );
    assert_eq!(
        r.source_ip_for("EXAMPLE.test"),
        Some("192.0.2.10".parse().unwrap())
    );
    assert_eq!(
        r.source_ip_for("other.test"),
        Some("192.0.2.11".parse().unwrap())
    );
    // Another sender domain falls through to the catch-all drop route.
    let (i, r) = c
        .route_for("remote.test", "other.test", RouteFacts::inbound(None))
        .unwrap();
    assert_eq!((i, r.action), (1, RouteAction::Drop));
    assert_eq!(c.spool.dir, Some(PathBuf::from("./ringmx-data/spool")));
    assert_eq!(c.queue.retry.len(), 5);
    assert_eq!(c.spool.commit_delay.0, Duration::from_micros(300));
}

#[test]
fn the_whitelist_verifies_senders_by_default() {
    let c = parse(&format!("{MINIMAL}\n[aswl]\n")).unwrap();
    assert!(c.authentication.verify);
    let s = c.aswl.as_ref().unwrap();
    assert_eq!(s.require_authentication, crate::aswl::RequireAuth::Aligned);
    let c = parse(&format!(
        "{MINIMAL}\n[authentication]\nverify = false\n[aswl]\n"
    ))
    .unwrap();
    assert!(!c.authentication.verify);
    let s = c.aswl.as_ref().unwrap();
    assert_eq!(s.require_authentication, crate::aswl::RequireAuth::Off);
    assert!(!parse(MINIMAL).unwrap().authentication.verify);
}

#[test]
fn quarantine_routes_take_dmarc_failures_only() {
    let src = format!(
        "[authentication]\nverify = true\n[[route]]\ndomains = [\"*\"]\ndmarc = \"quarantine\"\naction = \"hold\"\n{MINIMAL}"
    );
    let c = parse(&src).unwrap();
    let failed = RouteFacts {
        dmarc_quarantine: true,
        ..RouteFacts::inbound(None)
    };
    let (i, r) = c.route_for("example.test", "x.test", failed).unwrap();
    assert_eq!((i, r.action), (0, RouteAction::Hold));
    let (i, r) = c
        .route_for("example.test", "x.test", RouteFacts::inbound(None))
        .unwrap();
    assert_eq!((i, r.action), (1, RouteAction::Drop));
}

#[test]
fn relay_route_errors_name_key_and_line() {
    let bad_hop = RELAY.replace("\"10.0.0.1:25\"", "\"2001:db8::1\"");
    let e = parse(&format!("{bad_hop}{MINIMAL}")).unwrap_err();
    assert_eq!(
        (e.key.as_str(), e.line),
        ("route[0].next_hops", Some(5)),
        "{e}"
    );
    let no_hops = "[[route]]\ndomains = [\"*\"]\naction = \"relay\"\n";
    let e = parse(&format!("{no_hops}{MINIMAL}")).unwrap_err();
    assert_eq!(
        (e.key.as_str(), e.line),
        ("route[0].next_hops", Some(1)),
        "{e}"
    );
    // Under [route.source_ip] every key is a sender domain; a non-address value names its key.
    let e = parse(&format!("{RELAY}auth_user = \"u\"\n{MINIMAL}")).unwrap_err();
    assert_eq!((e.key.as_str(), e.line), ("auth_user", Some(13)), "{e}");
    let half = RELAY.replace("ehlo = \"edge.test\"", "auth_user = \"u\"");
    let e = parse(&format!("{half}{MINIMAL}")).unwrap_err();
    assert_eq!(e.key, "route[0].auth_user", "{e}");
    let e = parse(&format!("{MINIMAL}next_hops = [\"a:1\"]\n")).unwrap_err();
    assert_eq!(e.key, "route[0].next_hops", "{e}");
    let e = parse(&format!("{MINIMAL}[queue]\nretry = []\n")).unwrap_err();
    assert_eq!(e.key, "queue.retry", "{e}");
    let e = parse(&format!(
        "{MINIMAL}[spool]\ncommit_delay = \"5 fortnights\"\n"
    ))
    .unwrap_err();
    assert!(
        e.to_string().contains("test.toml:") && e.to_string().contains("fortnights"),
        "{e}"
    );
}

/// Configurations that would run but serve nothing, or fail only later, are refused with the
/// key and line.
#[test]
fn configuration_traps_are_errors() {
    let cases: Vec<(String, &str, Option<usize>)> = vec![
        (
            format!("[server]\ncores = []\n{MINIMAL}"),
            "server.cores",
            Some(2),
        ),
        (
            format!("[server]\ncores = 0\n{MINIMAL}"),
            "server.cores",
            Some(2),
        ),
        (
            format!("[server]\ncores = [0, 4096]\n{MINIMAL}"),
            "server.cores",
            Some(2),
        ),
        (
            MINIMAL.replace(
                "direction = \"inbound\"",
                "direction = \"inbound\"\nallowed_clients = [\"10.0.0.0/8\"]",
            ),
            "binding[0] (in).allowed_clients",
            Some(6),
        ),
        // A local domain with no route (only another domain is routed).
        (
            MINIMAL.replace("domains = [\"*\"]", "domains = [\"other.test\"]"),
            "domains.local",
            Some(8),
        ),
        // A wildcard local domain, and the bare <Postmaster>, need routes too.
        (
            MINIMAL
                .replace(
                    "local = [\"example.test\"]",
                    "local = [\"example.test\", \"*.corp.test\"]",
                )
                .replace("domains = [\"*\"]", "domains = [\"example.test\"]"),
            "domains.local",
            Some(8),
        ),
        // With the whitelist on, both verdicts need a route.
        (
            format!(
                "{}\n[aswl]\n",
                MINIMAL.replace("domains = [\"*\"]", "domains = [\"*\"]\naswl = \"pass\"")
            ),
            "domains.local",
            Some(8),
        ),
        (
            format!("{MINIMAL}\n[admin]\nlisten = \"0.0.0.0:8025\"\n"),
            "admin.listen",
            Some(16),
        ),
        (
            format!("{MINIMAL}\n[admin]\ncertificate = \"/c.pem\"\n"),
            "admin.certificate",
            Some(16),
        ),
        (
            format!("{MINIMAL}\n[[recipients]]\ndomains = [\"other.test\"]\nfile = \"/r\"\n"),
            "recipients[0].domains",
            Some(16),
        ),
        (
            format!("[limits]\nmax_message_size = \"3GiB\"\n{MINIMAL}"),
            "limits.max_message_size",
            Some(2),
        ),
        (
            format!(
                "{MINIMAL}\n[authentication]\nverify = false\n[aswl]\nrequire_authentication = \"aligned\"\n"
            ),
            "aswl.require_authentication",
            Some(18),
        ),
        (
            format!("[authentication]\npublic_suffix_list = \"/nonexistent/psl.dat\"\n{MINIMAL}"),
            "authentication.public_suffix_list",
            Some(2),
        ),
        (
            format!("{}\ndmarc = \"quarantine\"\n", MINIMAL.trim_end()),
            "route[0].dmarc",
            Some(14),
        ),
        (
            format!("[rates]\nfleet = true\n{MINIMAL}"),
            "rates.fleet",
            Some(2),
        ),
        (
            format!("{MINIMAL}\n[[recipients]]\ndomains = [\"example.test\"]\n"),
            "recipients[0].file",
            Some(16),
        ),
        (
            MINIMAL.replace(
                "direction = \"inbound\"",
                "direction = \"inbound\"\ngreet_delay = \"2m\"",
            ),
            "binding[0] (in).greet_delay",
            Some(6),
        ),
        (
            MINIMAL.replace(
                "direction = \"inbound\"",
                "direction = \"inbound\"\nhostname = \"edge one\"",
            ),
            "binding[0] (in).hostname",
            Some(6),
        ),
        (
            MINIMAL.replace(
                "direction = \"inbound\"",
                "direction = \"inbound\"\nbanner = \"a\\tb\"",
            ),
            "binding[0] (in).banner",
            Some(6),
        ),
    ];
    for (src, key, line) in cases {
        let e = parse(&src).expect_err(&src);
        assert_eq!((e.key.as_str(), e.line), (key, line), "{e}\n{src}");
    }
    // What the errors ask for is accepted.
    let fixed = format!("{MINIMAL}\n[admin]\nlisten = \"0.0.0.0:8025\"\ntoken_file = \"/t\"\n");
    assert!(parse(&fixed).is_ok());
    assert!(parse(&format!("[server]\ncores = [0]\n{MINIMAL}")).is_ok());
}

/// U-labels and A-labels are one domain: local domains, routes and sender domains match
/// whichever form the client or the operator writes.
#[test]
fn idn_forms_are_one_domain() {
    let src = MINIMAL
        .replace("local = [\"example.test\"]", "local = [\"Bücher.example\", \"*.xn--caf-dma.example\"]")
        .replace(
            "[[route]]\ndomains = [\"*\"]",
            "[[route]]\ndomains = [\"xn--bcher-kva.example\"]\nsender_domains = [\"café.example\"]\naction = \"discard\"\n\n[[route]]\ndomains = [\"*\"]",
        );
    let c = parse(&src).unwrap();
    for d in [
        "bücher.example",
        "BÜCHER.example",
        "xn--bcher-kva.example",
        "a.café.example",
        "b.xn--caf-dma.example",
    ] {
        assert!(c.is_local_domain(d), "{d}");
    }
    assert!(!c.is_local_domain("buecher.example"));
    for (rcpt, sender) in [
        ("bücher.example", "xn--caf-dma.example"),
        ("xn--bcher-kva.example", "CAFÉ.example"),
    ] {
        let (i, _) = c
            .route_for(rcpt, sender, RouteFacts::inbound(None))
            .unwrap();
        assert_eq!(i, 0, "{rcpt} from {sender}");
    }
    assert_eq!(
        c.route_for("bücher.example", "other.example", RouteFacts::inbound(None))
            .unwrap()
            .0,
        1
    );
    assert_eq!(canonical_domain("Bücher.Example"), "xn--bcher-kva.example");
}
