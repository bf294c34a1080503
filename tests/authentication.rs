//! SPF, DKIM and DMARC on inbound mail (`[authentication] verify = true`), end to end: dnsmasq
//! serves the SPF, DKIM key and DMARC records on loopback, Python's dkimpy (an independent
//! signer) signs with RSA-2048 and Ed25519 keys made by openssl, smtplib sends from loopback aliases
//! that SPF allows or not, and the delivered copies carry `Authentication-Results:`.

mod support;

use support::{Server, openssl};

/// The base64 public key of `key.pem` (DER SubjectPublicKeyInfo), for a DKIM record.
fn public_key(dir: &std::path::Path) -> String {
    openssl(
        dir,
        &[
            "rsa", "-in", "key.pem", "-pubout", "-outform", "DER", "-out", "pub.der",
        ],
    );
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(dir.join("pub.der")).unwrap())
}

/// A directory with a new RSA-2048 `key.pem`, and its DKIM record.
fn rsa_key(name: &str) -> (support::TempDir, String) {
    let keys = support::temp_dir(name);
    std::fs::create_dir_all(&keys).unwrap();
    openssl(&keys, &["genrsa", "-out", "key.pem", "2048"]);
    let record = format!("v=DKIM1; k=rsa; p={}", public_key(&keys));
    (keys, record)
}

/// `--txt-record` for `name`, the text cut into strings of at most 200 bytes (dnsmasq takes
/// each comma-separated part as one string; the records here hold no comma).
fn txt(name: &str, text: &str) -> String {
    assert!(!text.contains(','));
    let parts: Vec<String> = text
        .as_bytes()
        .chunks(200)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    format!("--txt-record={name},{}", parts.join(","))
}

/// The raw 32-byte Ed25519 private seed and public key of `ed.pem`, base64 (the forms dkimpy
/// and DKIM records take).
fn ed25519(dir: &std::path::Path) -> (String, String) {
    use base64::Engine;
    openssl(dir, &["genpkey", "-algorithm", "ed25519", "-out", "ed.pem"]);
    openssl(
        dir,
        &["pkey", "-in", "ed.pem", "-outform", "DER", "-out", "ed.der"],
    );
    openssl(
        dir,
        &[
            "pkey",
            "-in",
            "ed.pem",
            "-pubout",
            "-outform",
            "DER",
            "-out",
            "edpub.der",
        ],
    );
    let tail = |f: &str| {
        let der = std::fs::read(dir.join(f)).unwrap();
        base64::engine::general_purpose::STANDARD.encode(&der[der.len() - 32..])
    };
    (tail("ed.der"), tail("edpub.der"))
}

const SEND: &str = r#"
import os, smtplib, sys, dkim
key = open(os.environ["KEY"], "rb").read()
ed_key = os.environ["ED_KEY"].encode()
def message(subject, extra=""):
    return ("From: Bob <bob@partner.test>\r\nTo: alice@example.test\r\nSubject: %s\r\n"
            "Message-ID: <%s@partner.test>\r\n%s\r\nHello Alice.\r\n" % (subject, subject, extra)).encode()
def sign(m):
    return dkim.sign(m, b"sel", b"partner.test", key, include_headers=[b"from", b"to", b"subject", b"message-id"]) + m
def send(src, m):
    with smtplib.SMTP("127.0.0.1", int(os.environ["PORT"]), source_address=(src, 0), timeout=30) as s:
        s.ehlo("client.partner.test")
        s.sendmail("bob@partner.test", ["alice@example.test"], m)
# Signed, from an address SPF allows.
send("127.0.0.5", sign(message("signed")))
# The key is cached now, and parsed once by ringmx: signed again (checked under both keys,
# after which ringmx's key answers alone), then a signed field changed in transit (the body
# hash still matches: only the signature check can catch it).
import time
time.sleep(0.5)
send("127.0.0.5", sign(message("signed-again")))
send("127.0.0.5", sign(message("header-tampered")).replace(b"Subject: header-tampered", b"Subject: header-changed"))
# Signed with Ed25519 (RFC 8463).
m = message("ed25519")
send("127.0.0.5", dkim.sign(m, b"ed", b"partner.test", ed_key, signature_algorithm=b"ed25519-sha256",
                            include_headers=[b"from", b"to", b"subject", b"message-id"]) + m)
# Signed, then changed in transit.
send("127.0.0.5", sign(message("tampered")).replace(b"Hello Alice.", b"Pay Mallory."))
# Signatures naming many fields (most absent: oversigned): 96 are checked, 104 are not.
for subject, extra in [("many-fields", 92), ("too-many-fields", 100)]:
    m = message(subject)
    names = [b"from", b"to", b"subject", b"message-id"] + [b"x-%d" % i for i in range(extra)]
    send("127.0.0.5", dkim.sign(m, b"sel", b"partner.test", key, include_headers=names) + m)
# Forged: no signature, from outside the SPF record, with results written in our name.
send("127.0.0.6", message("forged",
    "Authentication-Results: mx.test; dkim=pass header.d=partner.test\r\n"
    "Authentication-Results: relay.other.test; spf=pass\r\n"))
# MAIL FROM:<sender> sent as it is (smtplib would rewrite it), from 127.0.0.6.
def send_raw(sender, m):
    with smtplib.SMTP("127.0.0.1", int(os.environ["PORT"]), source_address=("127.0.0.6", 0), timeout=30) as s:
        s.ehlo("client.partner.test")
        s.putcmd("mail", "FROM:<%s>" % sender)
        code, text = s.getreply()
        assert code == 250, (code, text)
        s.rcpt("alice@example.test")
        s.data(m)
# Forged the ways lenient readers (mail-parser) still read as fields: control characters and
# spaces in or around the name, a colon before it, a line after a colon-less one; and a MAIL
# FROM whose quoted local part reads as results to a reader that splits on ';'.
send_raw('"x; dkim=pass header.d=partner.test; dmarc=pass"@partner.test', message("forged-lenient",
    "\x0cAuthentication-Results: mx.test; dkim=pass header.d=partner.test\r\n"
    "Authentication-Results\x0b: mx.test; dkim=pass header.d=partner.test\r\n"
    ":Authentication-Results: mx.test; dmarc=pass\r\n"
    "Authentication -Results: mx.test; dkim=pass\r\n"
    "Junk\r\n Authentication-Results: mx.test; dkim=pass\r\n"))
# A MAIL FROM domain that is an address literal holding results.
send_raw("x@[a:b;dkim=pass;dmarc=pass;x]", message("literal"))
# SPF records of every kind: include, ~all, a loop, too many lookups, a zone that times out.
for domain in ["inc", "soft", "loop", "many", "slow"]:
    with smtplib.SMTP("127.0.0.1", int(os.environ["PORT"]), source_address=("127.0.0.5", 0), timeout=30) as s:
        s.ehlo("client.partner.test")
        s.sendmail("x@%s.test" % domain, ["alice@example.test"], message("spf-" + domain))
print("sent")
"#;

/// The DNS records of the tests: partner.test's SPF, DKIM keys and DMARC, SPF records of
/// every kind, and slow.test served by a silent socket (`blackhole`).
fn zone(blackhole: &std::net::UdpSocket, dkim: &[(&str, &str)], dmarc: &str) -> Vec<String> {
    let mut r = vec![
        format!(
            "--server=/slow.test/127.0.0.1#{}",
            blackhole.local_addr().unwrap().port()
        ),
        "--local=/test/".to_string(),
        // Cached answers, as real zones give: ringmx then parses DKIM keys once (after
        // checking the first signature with mail-auth's key as well), and the later messages
        // of each test are verified with those keys.
        "--local-ttl=3600".to_string(),
        txt("partner.test", "v=spf1 ip4:127.0.0.5 -all"),
        txt("_dmarc.partner.test", dmarc),
        txt("inc.test", "v=spf1 include:partner.test -all"),
        txt("soft.test", "v=spf1 ~all"),
        txt("loop.test", "v=spf1 include:loop.test -all"),
        txt("relay.test", "v=spf1 ip4:127.0.0.6 -all"),
    ];
    let many: Vec<String> = (1..=11).map(|i| format!("include:m{i}.test")).collect();
    r.push(txt("many.test", &format!("v=spf1 {} -all", many.join(" "))));
    for i in 1..=11 {
        r.push(txt(&format!("m{i}.test"), "v=spf1 ?all"));
    }
    for (selector, record) in dkim {
        r.push(txt(&format!("{selector}._domainkey.partner.test"), record));
    }
    r
}

#[test]
fn spf_dkim_and_dmarc_results_on_every_copy() {
    let (keys, dkim_record) = rsa_key("auth-keys");
    let (ed_key, ed_public) = ed25519(&keys);
    let ed_record = format!("v=DKIM1; k=ed25519; p={ed_public}");
    let blackhole = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let records = zone(
        &blackhole,
        &[("sel", &dkim_record), ("ed", &ed_record)],
        "v=DMARC1; p=reject",
    );
    let args: Vec<&str> = records.iter().map(String::as_str).collect();
    let dns = support::Dnsmasq::start(&args);
    let s = Server::start_with(
        "authentication",
        "auto",
        "",
        &format!(
            "[dns]\nservers = [\"127.0.0.1:{}\"]\n[authentication]\nverify = true\ntimeout = \"8s\"\n",
            dns.port
        ),
    );
    let out = {
        let mut cmd = std::process::Command::new("python3");
        cmd.args(["-c", SEND])
            .env("PORT", s.inbound.port().to_string())
            .env("KEY", keys.join("key.pem"))
            .env("ED_KEY", &ed_key);
        support::run_with_stdin(&mut cmd, b"")
    };
    assert!(out.status.success(), "{}", support::stderr(&out));
    let copies = s.dropped();
    let copy = |subject: &str| -> String {
        copies
            .iter()
            .find(|m| m.contains(&format!("Subject: {subject}\r\n")))
            .unwrap_or_else(|| panic!("no copy of {subject:?} in {copies:?}"))
            .clone()
    };
    // The results field, unfolded.
    let results = |m: &str| -> Vec<String> {
        let mut fields = Vec::new();
        for line in m.split("\r\n") {
            if line.is_empty() {
                break;
            }
            if line.starts_with([' ', '\t']) {
                if let Some(last) = fields.last_mut() {
                    let last: &mut String = last;
                    last.push(' ');
                    last.push_str(line.trim());
                }
            } else {
                fields.push(line.to_string());
            }
        }
        fields
            .into_iter()
            .filter(|f| f.starts_with("Authentication-Results:"))
            .collect()
    };
    // The field is part of the header section: the message's own fields follow it.
    assert!(
        copy("signed").contains("policy.dmarc=reject\r\nDKIM-Signature: "),
        "{copies:?}"
    );
    assert!(
        copy("forged").contains("policy.dmarc=reject\r\nFrom: Bob"),
        "{copies:?}"
    );
    let signed = results(&copy("signed"));
    assert_eq!(signed.len(), 1, "{signed:?}");
    for want in [
        "Authentication-Results: mx.test;",
        "dkim=pass",
        "spf=pass",
        "dmarc=pass",
    ] {
        assert!(signed[0].contains(want), "{want} in {signed:?}");
    }
    let again = results(&copy("signed-again"));
    assert!(again[0].contains("dkim=pass"), "{again:?}");
    let changed = results(&copy("header-changed"));
    assert!(
        changed[0].contains("dkim=fail") && !changed[0].contains("dkim=pass"),
        "{changed:?}"
    );
    let ed = results(&copy("ed25519"));
    assert!(
        ed[0].contains("dkim=pass")
            && ed[0].contains("header.s=ed")
            && ed[0].contains("dmarc=pass"),
        "{ed:?}"
    );
    let many = results(&copy("many-fields"));
    assert!(many[0].contains("dkim=pass"), "{many:?}");
    let too_many = results(&copy("too-many-fields"));
    assert!(
        too_many[0]
            .contains("dkim=policy (h= names 104 fields, more than 100) header.d=partner.test")
            && !too_many[0].contains("dkim=pass"),
        "{too_many:?}"
    );
    let tampered = results(&copy("tampered"));
    // mail-auth reports a body hash mismatch as `neutral`; never a pass.
    assert!(
        !tampered[0].contains("dkim=pass")
            && tampered[0].contains("body hash did not verify")
            && tampered[0].contains("spf=pass"),
        "{tampered:?}"
    );
    let forged = results(&copy("forged"));
    // Ours, and the other host's that the client sent; the one in our name is gone.
    assert_eq!(forged.len(), 2, "{forged:?}");
    let ours = forged
        .iter()
        .find(|f| f.starts_with("Authentication-Results: mx.test;"))
        .unwrap();
    assert!(
        ours.contains("spf=fail")
            && ours.contains("dmarc=fail header.from=partner.test policy.dmarc=reject")
            && !ours.contains("dkim=pass"),
        "{ours:?}"
    );
    assert!(
        forged
            .iter()
            .any(|f| f.contains("relay.other.test; spf=pass")),
        "{forged:?}"
    );
    let lenient = copy("forged-lenient");
    let head = lenient.split("\r\n\r\n").next().unwrap();
    assert!(
        !head.contains("mx.test; d") && head.ends_with("partner.test>\r\nJunk"),
        "{lenient:?}"
    );
    let ours = results(&lenient);
    assert!(
        ours.len() == 1 && ours[0].contains("spf=fail") && !ours[0].contains("=pass"),
        "{ours:?}"
    );
    assert!(ours[0].contains("smtp.mailfrom=partner.test"), "{ours:?}");
    let literal = results(&copy("literal"));
    assert!(
        literal.len() == 1
            && literal[0].contains("smtp.mailfrom=unknown")
            && !literal[0].contains("=pass"),
        "{literal:?}"
    );
    for (domain, want) in [
        ("inc", "spf=pass"),
        ("soft", "spf=softfail"),
        ("loop", "spf=permerror"),
        ("many", "spf=permerror"),
        ("slow", "spf=temperror"),
    ] {
        let r = results(&copy(&format!("spf-{domain}")));
        assert!(r[0].contains(want), "{domain}: {want} in {r:?}");
    }
    let metrics = s.admin_get("/metrics").1;
    for want in [
        "ringmx_authentication_total{method=\"dkim\",result=\"pass\"} 4",
        "ringmx_authentication_total{method=\"spf\",result=\"fail\"} 2",
        "ringmx_authentication_total{method=\"dmarc\",result=\"fail\"} ",
    ] {
        assert!(metrics.contains(want), "{want} in {metrics}");
    }
    // One log line per message, with its queue id and the results.
    let log = s.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(" message ")).collect();
    for want in [
        "authentication=spf=pass dkim=pass dmarc=pass",
        "authentication=spf=fail dkim=none dmarc=fail policy=reject",
        "authentication=spf=softfail dkim=none dmarc=fail policy=reject",
        "authentication=spf=pass dkim=neutral dmarc=pass",
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.contains(want) && l.contains("queue_id=")),
            "{want} in {lines:#?}"
        );
    }
    drop(dns);
    let _ = std::fs::remove_dir_all(&keys);
}

const WHITELIST: &str = r#"
import os, smtplib, dkim
key = open(os.environ["KEY"], "rb").read()
def message(subject):
    return ("From: Bob <bob@partner.test>\r\nTo: alice@example.test\r\nSubject: %s\r\n"
            "Message-ID: <%s@partner.test>\r\n\r\nHello Alice.\r\n" % (subject, subject)).encode()
def sign(m):
    return dkim.sign(m, b"sel", b"partner.test", key, include_headers=[b"from", b"to", b"subject", b"message-id"]) + m
def send(port, src, sender, rcpt, m):
    with smtplib.SMTP("127.0.0.1", port, source_address=(src, 0), timeout=30) as s:
        s.sendmail(sender, [rcpt], m)
# Alice writes to Bob: the whitelist learns bob@partner.test for her.
send(int(os.environ["OUT"]), "127.0.0.1", "alice@example.test", "bob@partner.test",
     b"From: alice@example.test\r\nTo: bob@partner.test\r\nSubject: hello bob\r\n\r\nhi\r\n")
# From an address outside partner.test's SPF record: only a signature can authenticate Bob.
send(int(os.environ["PORT"]), "127.0.0.6", "bob@partner.test", "alice@example.test", sign(message("signed")))
send(int(os.environ["PORT"]), "127.0.0.6", "bob@partner.test", "alice@example.test", message("forged"))
send(int(os.environ["PORT"]), "127.0.0.6", "bob@partner.test", "alice@example.test",
     sign(message("tampered")).replace(b"Hello Alice.", b"Pay Mallory."))
print("sent")
"#;

/// `[aswl] require_authentication`: bob@partner.test is whitelisted for alice; mail from him
/// passes only when it is authenticated (here by his DKIM signature, SPF failing); a forgery
/// without a signature, or with a body changed in transit, is `none reason=unauthenticated`;
/// with `"off"` the envelope alone decides (the old behaviour).
#[test]
fn the_whitelist_needs_an_authenticated_sender() {
    let (keys, dkim_record) = rsa_key("aswl-auth-keys");
    let blackhole = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let records = zone(&blackhole, &[("sel", &dkim_record)], "v=DMARC1; p=none");
    let args: Vec<&str> = records.iter().map(String::as_str).collect();
    let dns = support::Dnsmasq::start(&args);
    for (name, require, want) in [
        (
            "aswl-auth-aligned",
            "",
            [
                ("signed", "X-ASWL: pass mode=per-recipient auth=dkim\r\n"),
                (
                    "forged",
                    "X-ASWL: none mode=per-recipient reason=unauthenticated\r\n",
                ),
                (
                    "tampered",
                    "X-ASWL: none mode=per-recipient reason=unauthenticated\r\n",
                ),
            ],
        ),
        (
            "aswl-auth-off",
            "require_authentication = \"off\"\n",
            [
                ("signed", "X-ASWL: pass mode=per-recipient\r\n"),
                ("forged", "X-ASWL: pass mode=per-recipient\r\n"),
                ("tampered", "X-ASWL: pass mode=per-recipient\r\n"),
            ],
        ),
    ] {
        let s = Server::start_with(
            name,
            "auto",
            "",
            &format!(
                "[dns]\nservers = [\"127.0.0.1:{}\"]\n[authentication]\nverify = true\n\
                 [aswl]\nauto_response_window = \"0s\"\n{require}",
                dns.port
            ),
        );
        let mut cmd = std::process::Command::new("python3");
        cmd.args(["-c", WHITELIST])
            .env("PORT", s.inbound.port().to_string())
            .env("OUT", s.outbound.port().to_string())
            .env("KEY", keys.join("key.pem"));
        let out = support::run_with_stdin(&mut cmd, b"");
        assert!(out.status.success(), "{}", support::stderr(&out));
        // `ringmx aswl check` says what the pass needs.
        let check = s.cli(&["aswl", "check", "bob@partner.test", "alice@example.test"]);
        let check = support::stdout(&check);
        assert!(check.starts_with("verdict: pass"), "[{name}] {check}");
        assert_eq!(
            check.contains("authentication: required (aligned)"),
            require.is_empty(),
            "[{name}] {check}"
        );
        let copies = s.dropped();
        for (subject, header) in want {
            let copy = copies
                .iter()
                .find(|m| m.contains(&format!("Subject: {subject}\r\n")))
                .unwrap_or_else(|| panic!("[{name}] no copy of {subject}"));
            assert!(
                copy.contains(header),
                "[{name}] {subject}: {header:?} in {copy}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&keys);
}

const ENFORCE: &str = r#"
import os, smtplib
def message(subject, frm):
    head = "From: %s\r\n" % frm if frm is not None else ""
    return (head + "To: alice@example.test\r\nSubject: %s\r\n"
            "Message-ID: <%s@partner.test>\r\n\r\nHello Alice.\r\n" % (subject, subject)).encode()
def send(src, sender, subject, frm="Bob <bob@partner.test>", raw=None):
    try:
        with smtplib.SMTP("127.0.0.1", int(os.environ["PORT"]), source_address=(src, 0), timeout=30) as s:
            s.sendmail(sender, ["alice@example.test"], raw or message(subject, frm))
        print(subject, "250")
    except (smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as e:
        print(subject, e.smtp_code, e.smtp_error.decode())
# MAIL FROM partner.test from outside its SPF record (-all).
send("127.0.0.6", "bob@partner.test", "spf-fail")
# SPF passes for relay.test, but the From domain partner.test (p=reject) is not aligned.
send("127.0.0.6", "x@relay.test", "dmarc-fail")
# SPF passes for partner.test itself.
send("127.0.0.5", "bob@partner.test", "good")
# From: names two domains: DMARC has no single answer.
send("127.0.0.5", "bob@partner.test", "two-from", "bob@partner.test, ceo@bank.test")
# Not aligned either, From: domains under records with `sp=` (RFC 7489 §6.3): a subdomain
# without a record of its own gets the parent's sp (none; then reject), the parent itself its p.
send("127.0.0.6", "x@relay.test", "sub-sp-none", "bob@mail.lenient.test")
send("127.0.0.6", "x@relay.test", "sub-sp-reject", "bob@mail.tight.test")
send("127.0.0.6", "x@relay.test", "parent-p-reject", "bob@lenient.test")
# p=reject with pct=0 (the owner watches its reports), and with t=y (testing): not refused.
send("127.0.0.6", "x@relay.test", "pct-0", "bob@watching.test")
send("127.0.0.6", "x@relay.test", "testing", "bob@testing.test")
# Not aligned with partner.test (p=reject): its name with a final dot is the same domain. A
# From: DMARC cannot judge is refused as well: a domain that is no DNS name, a domain cut to one
# label by a comment, a header block that a line without a colon ends before the From:.
send("127.0.0.6", "x@relay.test", "final-dot", "Bob <bob@partner.test.>")
send("127.0.0.6", "x@relay.test", "double-dot", "Bob <bob@partner..test>")
send("127.0.0.6", "x@relay.test", "comment", "bob@partner(x).test")
# One domain in RFC 5322's obsolete syntax, relay.test.partner.test, which mail-parser cuts at
# the gap to relay.test (SPF passes for it, no DMARC record): what the reader sees is not judged.
send("127.0.0.6", "x@relay.test", "obs-domain", "ceo@relay.test(x).partner.test")
send("127.0.0.6", "x@relay.test", "obs-dot", "ceo@relay.test. partner.test")
# Read as an empty group (no address: DMARC none), joined into one address that DMARC reads as
# from relay.test, and a second From: field after such an empty group.
send("127.0.0.6", "x@relay.test", "empty-group", "<bob@partner.test>:")
send("127.0.0.6", "x@relay.test", "two-at", '"Bob" <bob@partner.test> x@relay.test')
send("127.0.0.6", "x@relay.test", "two-fields", raw=b"From: <bob@partner.test>:\r\n" + message("two-fields", "x@relay.test"))
# The address a reader may show is not the parsed one: in the display name, in an encoded word
# (<bob@partner.test>), in a From: past a line without a colon that ended the header block.
send("127.0.0.6", "x@relay.test", "display-at", "bob@partner.test <x@relay.test>")
send("127.0.0.6", "x@relay.test", "encoded", "=?utf-8?B?PGJvYkBwYXJ0bmVyLnRlc3Q+?=, <x@relay.test>")
send("127.0.0.6", "x@relay.test", "cut-short", raw=b"Subject: cut-short\r\nX\r\n" + message("cut-short", "bob@partner.test"))
send("127.0.0.6", "x@relay.test", "no-colon", raw=b"X\r\n" + message("no-colon", "bob@partner.test"))
# No From: at all names no domain (DMARC: none).
send("127.0.0.6", "x@relay.test", "no-from", None)
"#;

/// `[authentication] spf_reject` and `dmarc_reject`, each on and off; `sp=` for subdomains.
#[test]
fn enforcement_switches() {
    let blackhole = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut records = zone(&blackhole, &[], "v=DMARC1; p=reject");
    records.push(txt("_dmarc.lenient.test", "v=DMARC1; p=reject; sp=none"));
    records.push(txt("_dmarc.tight.test", "v=DMARC1; p=none; sp=reject"));
    records.push(txt("_dmarc.watching.test", "v=DMARC1; p=reject; pct=0"));
    records.push(txt("_dmarc.testing.test", "v=DMARC1; p=reject; t=y"));
    let args: Vec<&str> = records.iter().map(String::as_str).collect();
    let dns = support::Dnsmasq::start(&args);
    let dmarc = "550 5.7.1 Message rejected: the sender's domain DMARC policy";
    let no_domain = "550 5.7.1 Message rejected: its From: header names no single domain to check";
    // (subject, refused by spf_reject, dmarc_reject's reply), in the order ENFORCE sends.
    let cases = [
        ("spf-fail", true, Some(dmarc)),
        ("dmarc-fail", false, Some(dmarc)),
        ("good", false, None),
        ("two-from", false, Some(no_domain)),
        ("sub-sp-none", false, None),
        ("sub-sp-reject", false, Some(dmarc)),
        ("parent-p-reject", false, Some(dmarc)),
        ("pct-0", false, None),
        ("testing", false, None),
        ("final-dot", false, Some(dmarc)),
        ("double-dot", false, Some(no_domain)),
        ("comment", false, Some(no_domain)),
        ("obs-domain", false, Some(no_domain)),
        ("obs-dot", false, Some(no_domain)),
        ("empty-group", false, Some(no_domain)),
        ("two-at", false, Some(no_domain)),
        ("two-fields", false, Some(no_domain)),
        ("display-at", false, Some(no_domain)),
        ("encoded", false, Some(no_domain)),
        ("cut-short", false, Some(no_domain)),
        ("no-colon", false, Some(no_domain)),
        ("no-from", false, None),
    ];
    for (name, switches, spf_on, dmarc_on) in [
        ("enforce-off", "", false, false),
        ("enforce-spf", "spf_reject = true\n", true, false),
        ("enforce-dmarc", "dmarc_reject = true\n", false, true),
    ] {
        let want: Vec<String> = cases
            .iter()
            .map(
                |&(subject, by_spf, by_dmarc)| match (spf_on && by_spf, by_dmarc) {
                    (true, _) => format!("{subject} 550 5.7.23 SPF validation failed"),
                    (_, Some(reply)) if dmarc_on => format!("{subject} {reply}"),
                    _ => format!("{subject} 250"),
                },
            )
            .collect();
        let s = Server::start_with(
            name,
            "auto",
            "",
            &format!(
                "[dns]\nservers = [\"127.0.0.1:{}\"]\n[authentication]\nverify = true\n{switches}",
                dns.port
            ),
        );
        let out = support::python(ENFORCE, s.inbound.port(), 0);
        let text = support::stdout(&out);
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            want,
            "[{name}] {}",
            support::stderr(&out)
        );
        // A refusal's log line says what led to it: the results, with the queue id.
        if dmarc_on {
            let log = s.log();
            let refused: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("message refused"))
                .collect();
            for want in [
                "reason=\"refused: DMARC policy reject\" authentication=spf=pass dkim=none dmarc=fail policy=reject",
                "reason=\"refused: no single From: domain for DMARC\" authentication=spf=",
            ] {
                assert!(
                    refused
                        .iter()
                        .any(|l| l.contains(want) && l.contains("queue_id=")),
                    "{want} in {refused:#?}"
                );
            }
        }
    }
}

const ALIGNMENT: &str = r#"
import os, smtplib, dkim
key = open(os.environ["KEY"], "rb").read()
def message(subject, frm):
    return ("From: Bob <%s>\r\nTo: alice@example.test\r\nSubject: %s\r\n"
            "Message-ID: <%s@example.test>\r\n\r\nHello Alice.\r\n" % (frm, subject, subject)).encode()
def sign(m, domain, **kw):
    return dkim.sign(m, b"sel", domain.encode(), key,
                     include_headers=[b"from", b"to", b"subject", b"message-id"], **kw) + m
def send(src, sender, m):
    with smtplib.SMTP("127.0.0.1", int(os.environ["PORT"]), source_address=(src, 0), timeout=30) as s:
        s.sendmail(sender, ["alice@example.test"], m)
for kind in ["strict", "relaxed"]:
    # SPF passes for the subdomain mail.<kind>.test; From: is bob@<kind>.test.
    send("127.0.0.5", "x@mail.%s.test" % kind, message("spf-" + kind, "bob@%s.test" % kind))
    # Signed by the subdomain, sent from outside any SPF record.
    send("127.0.0.6", "bob@%s.test" % kind,
         sign(message("dkim-" + kind, "bob@%s.test" % kind), "mail.%s.test" % kind))
# rsa-sha1 (RFC 8301: not valid), signed by the From domain itself.
send("127.0.0.6", "bob@relaxed.test",
     sign(message("sha1", "bob@relaxed.test"), "relaxed.test", signature_algorithm=b"rsa-sha1"))
# A body length tag covering the whole body; then one with text added after the signed part.
send("127.0.0.6", "bob@relaxed.test",
     sign(message("length", "bob@relaxed.test"), "relaxed.test", length=True))
send("127.0.0.6", "bob@relaxed.test",
     sign(message("appended", "bob@relaxed.test"), "relaxed.test", length=True) + b"Appended.\r\n")
# From: names two domains: DMARC has no single answer.
send("127.0.0.5", "x@mail.relaxed.test", message("two-from", "bob@relaxed.test>, <ceo@bank.test"))
# A signature for a zone that never answers (its temperror) cannot have aligned: DMARC fails.
send("127.0.0.6", "bob@strict.test", sign(message("stray", "bob@strict.test"), "slow.test"))
print("sent")
"#;

/// DMARC alignment strict (`aspf=s; adkim=s`) and relaxed, an rsa-sha1 signature, body
/// length tags (covering the body, and with text added after them), and `[[route]] dmarc =
/// "quarantine"` taking what fails under `p=quarantine`.
#[test]
fn alignment_signatures_and_quarantine_routes() {
    let (keys, key) = rsa_key("align-keys");
    let quarantine = support::temp_dir("quarantine");
    let blackhole = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut records = zone(&blackhole, &[], "v=DMARC1; p=none");
    for kind in ["strict", "relaxed"] {
        records.push(txt(
            &format!("mail.{kind}.test"),
            "v=spf1 ip4:127.0.0.5 -all",
        ));
        records.push(txt(&format!("sel._domainkey.mail.{kind}.test"), &key));
    }
    records.push(txt("sel._domainkey.relaxed.test", &key));
    records.push(txt(
        "_dmarc.strict.test",
        "v=DMARC1; p=quarantine; aspf=s; adkim=s",
    ));
    records.push(txt("_dmarc.relaxed.test", "v=DMARC1; p=quarantine"));
    let args: Vec<&str> = records.iter().map(String::as_str).collect();
    let dns = support::Dnsmasq::start(&args);
    let s = Server::start_with(
        "alignment",
        "auto",
        "",
        &format!(
            "[dns]\nservers = [\"127.0.0.1:{}\"]\n[authentication]\nverify = true\n\
             [[route]]\ndomains = [\"*\"]\ndmarc = \"quarantine\"\naction = \"drop\"\nfolder = \"{}\"\n",
            dns.port,
            quarantine.display()
        ),
    );
    let mut cmd = std::process::Command::new("python3");
    cmd.args(["-c", ALIGNMENT])
        .env("PORT", s.inbound.port().to_string())
        .env("KEY", keys.join("key.pem"));
    let out = support::run_with_stdin(&mut cmd, b"");
    assert!(out.status.success(), "{}", support::stderr(&out));
    let inbox = s.dropped();
    let held: Vec<String> = std::fs::read_dir(&quarantine)
        .map(|d| {
            d.flatten()
                .map(|e| std::fs::read_to_string(e.path()).unwrap())
                .collect()
        })
        .unwrap_or_default();
    let find = |subject: &str| -> (bool, String) {
        let has = |m: &&String| m.contains(&format!("Subject: {subject}\r\n"));
        match (inbox.iter().find(has), held.iter().find(has)) {
            (Some(m), None) => (false, m.clone()),
            (None, Some(m)) => (true, m.clone()),
            other => panic!("{subject}: {other:?}"),
        }
    };
    // (subject, quarantined, what the results say)
    for (subject, quarantined, want) in [
        ("spf-strict", true, &["spf=pass", "dmarc=fail"][..]),
        ("spf-relaxed", false, &["spf=pass", "dmarc=pass"]),
        (
            "dkim-strict",
            true,
            &["dkim=pass header.d=mail.strict.test", "dmarc=fail"],
        ),
        (
            "dkim-relaxed",
            false,
            &[
                "dkim=pass header.d=mail.relaxed.test header.s=sel header.a=rsa-sha256",
                "dmarc=pass",
            ],
        ),
        (
            "sha1",
            true,
            &[
                "dkim=policy (rsa-sha1 is not accepted, RFC 8301) header.d=relaxed.test header.s=sel header.a=rsa-sha1",
                "dmarc=fail",
            ],
        ),
        (
            "length",
            false,
            &["dkim=pass (l=14) header.d=relaxed.test", "dmarc=pass"],
        ),
        (
            "appended",
            true,
            &[
                "dkim=policy (l=14: 11 body bytes are not signed) header.d=relaxed.test",
                "dmarc=fail",
            ],
        ),
        ("two-from", true, &["spf=pass"]),
        (
            "stray",
            true,
            &["dkim=temperror", "header.d=slow.test", "dmarc=fail"],
        ),
    ] {
        let (q, m) = find(subject);
        let head = m.split("\r\n\r\n").next().unwrap().replace("\r\n\t", " ");
        assert_eq!(q, quarantined, "{subject}: {head}");
        for w in want {
            assert!(head.contains(w), "{subject}: {w:?} in {head}");
        }
    }
    drop(dns);
    let _ = std::fs::remove_dir_all(&keys);
    let _ = std::fs::remove_dir_all(&quarantine);
}
