//! Content integrity over real sockets, tried as an attacker would: BDAT held to the same
//! line-ending rules as DATA, NUL and folded first lines refused, content relayed with DATA
//! canonical whatever came in (read back by aiosmtpd, a next hop nobody here wrote), and the
//! verdict header impossible to forge or extend from the content (read back by Python's
//! lenient `email` parser). Both runtime drivers.

mod support;

use support::{Raw, Server, Sink, stdout, temp_dir};

const DRIVERS: [&str; 2] = ["auto", "legacy"];

/// EHLO, then `MAIL FROM:<a@b.test>{params}` and `RCPT TO:<rcpt>`, both answered 250.
fn open_txn(c: &mut Raw, params: &str, rcpt: &str) {
    assert!(c.reply().starts_with("220"));
    assert!(c.cmd("EHLO attacker.test\r\n").starts_with("250"));
    let r = c.cmd(&format!("MAIL FROM:<a@b.test>{params}\r\n"));
    assert!(r.starts_with("250"), "{r}");
    let r = c.cmd(&format!("RCPT TO:<{rcpt}>\r\n"));
    assert!(r.starts_with("250"), "{r}");
}

/// Send the chunks with BDAT (the last one LAST); returns the reply to the last.
fn bdat(c: &mut Raw, chunks: &[&[u8]]) -> String {
    let mut last = String::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let tag = if i + 1 == chunks.len() { " LAST" } else { "" };
        c.w.write_all(format!("BDAT {}{tag}\r\n", chunk.len()).as_bytes())
            .unwrap();
        c.w.write_all(chunk).unwrap();
        last = c.reply();
    }
    last
}

use std::io::Write as _;

#[test]
fn bdat_and_data_content_rules_over_the_wire() {
    for driver in DRIVERS {
        let s = Server::start(&format!("smuggle-rules-{driver}"), driver);
        let bad: [(&str, &[&[u8]], &str); 6] = [
            (
                "",
                &[b"Subject: x\r\n\r\nhi\n.\nMAIL FROM:<e@x.test>\r\n"],
                "550 5.6.0 Bare",
            ),
            ("", &[b"Subject: x\r\n\r\nhi\r", b".\r\n"], "550 5.6.0 Bare"),
            (
                "",
                &[b"Subject: x\r\n\r\nhi\r\n", b"end\r"],
                "550 5.6.0 Bare",
            ),
            ("", &[b"Subject: x\r\n\r\n\0.\r\n"], "550 5.6.0 NUL"),
            (
                "",
                &[b" X-ASWL: pass\r\n\r\nhi\r\n"],
                "550 5.6.0 Message content must not begin",
            ),
            (
                " BODY=BINARYMIME",
                &[b"\tX: y\r\n\r\n"],
                "550 5.6.0 Message content must not begin",
            ),
        ];
        for (params, chunks, want) in bad {
            let mut c = Raw::connect(s.inbound);
            open_txn(&mut c, params, "u@example.test");
            let r = bdat(&mut c, chunks);
            assert!(r.starts_with(want), "{driver} {chunks:?}: {r}");
            // The session goes on after the refusal.
            assert!(c.cmd("NOOP\r\n").starts_with("250"), "{driver}");
            assert!(c.cmd("QUIT\r\n").starts_with("221"));
        }
        // DATA: the same refusals.
        for (body, want) in [
            ("Subject: x\r\n\r\na\0b\r\n.\r\n", "550 5.6.0 NUL"),
            (
                " folded: x\r\n\r\nb\r\n.\r\n",
                "550 5.6.0 Message content must not begin",
            ),
            (
                ". folded: x\r\n\r\nb\r\n.\r\n",
                "550 5.6.0 Message content must not begin",
            ),
        ] {
            let mut c = Raw::connect(s.inbound);
            assert!(c.reply().starts_with("220"));
            assert!(c.cmd("EHLO attacker.test\r\n").starts_with("250"));
            c.start_data();
            let r = c.cmd(body);
            assert!(r.starts_with(want), "{driver} {body:?}: {r}");
        }
        // A CRLF split over two chunks is one line end: accepted and stored as sent.
        let mut c = Raw::connect(s.inbound);
        open_txn(&mut c, "", "u@example.test");
        let r = bdat(&mut c, &[b"Subject: split\r", b"\n\r\nbody\r\n"]);
        assert!(r.starts_with("250"), "{driver}: {r}");
        assert!(c.cmd("QUIT\r\n").starts_with("221"));
        let dropped = s.dropped();
        assert_eq!(
            dropped.len(),
            1,
            "{driver}: only the clean message is stored"
        );
        assert!(
            dropped[0].ends_with("Subject: split\r\n\r\nbody\r\n"),
            "{driver}"
        );
    }
}

#[test]
fn normalize_policy_applies_to_bdat() {
    let s = Server::start_with(
        "smuggle-normalize",
        "auto",
        "",
        "[smtp]\nbare_lf = \"normalize\"\n",
    );
    let mut c = Raw::connect(s.inbound);
    open_txn(&mut c, "", "u@example.test");
    let r = bdat(&mut c, &[b"Subject: n\r\n\r\na\n.\nb\r", b"c\r"]);
    assert!(r.starts_with("250"), "{r}");
    let dropped = s.dropped();
    assert!(
        dropped[0].ends_with("Subject: n\r\n\r\na\r\n.\r\nb\r\nc\r\n"),
        "{:?}",
        dropped[0]
    );
}

/// Content relayed with DATA is canonical: BDAT content with `\r.\r\n`, `\n.\n` and a bare
/// CR (normalised on the way in) reaches aiosmtpd as one message with the would-be smuggled
/// commands inside its body. BINARYMIME content is never converted: a hop without BINARYMIME
/// gets nothing, and the sender a `5.6.3` DSN.
#[test]
fn relayed_content_is_canonical_whatever_came_in() {
    for driver in DRIVERS {
        let dir = temp_dir(&format!("smuggle-relay-sink-{driver}"));
        std::fs::create_dir_all(&dir).unwrap();
        let sink = Sink::start(&dir, &[]);
        let extra = format!(
            "[smtp]\nbare_lf = \"normalize\"\n[[route]]\ndomains = [\"relay.test\"]\naction = \"relay\"\nnext_hops = [\"127.0.0.1:{}\"]\n",
            sink.port
        );
        let s = Server::start_with(&format!("smuggle-relay-{driver}"), driver, "", &extra);
        let mut c = Raw::connect(s.outbound);
        open_txn(&mut c, "", "v@relay.test");
        let content: &[u8] = b"Message-ID: <smuggle@test>\r\nSubject: s\r\n\r\nhi\r.\r\nMAIL FROM:<evil@x.test>\nRCPT TO:<victim@relay.test>\n.\nDATA\r\n.\rforged\r\n";
        let r = bdat(&mut c, &[&content[..40], &content[40..]]);
        assert!(r.starts_with("250"), "{driver}: {r}");
        // Binary content for a hop that does not take it.
        assert!(
            c.cmd("MAIL FROM:<a@b.test> BODY=BINARYMIME\r\n")
                .starts_with("250")
        );
        assert!(c.cmd("RCPT TO:<w@relay.test>\r\n").starts_with("250"));
        let r = bdat(&mut c, &[b"Subject: bin\r\n\r\n\0\x01\n.\n"]);
        assert!(r.starts_with("250"), "{driver}: {r}");
        assert!(c.cmd("QUIT\r\n").starts_with("221"));
        let got = sink.wait_for(1, 20);
        let dsn = s.dropped();
        let got_all = sink.records();
        assert_eq!(got.len(), 1, "{driver}: {}", s.log());
        assert_eq!(got_all.len(), 1, "{driver}: one message, nothing smuggled");
        assert_eq!(got[0]["rcpts"], serde_json::json!(["v@relay.test"]));
        let data = got[0]["data"].as_str().unwrap();
        let body = data.split_once("\r\n\r\n").unwrap().1;
        assert_eq!(
            body,
            "hi\r\n.\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@relay.test>\r\n.\r\nDATA\r\n.\r\nforged\r\n",
            "{driver}"
        );
        assert_eq!(dsn.len(), 1, "{driver}: {dsn:?}");
        assert!(
            dsn[0].contains("Final-Recipient: rfc822; w@relay.test"),
            "{}",
            dsn[0]
        );
        assert!(dsn[0].contains("Status: 5.6.3"), "{}", dsn[0]);
    }
}

/// Python's `email` package reads a lone CR or LF as a line end. What it reads as the verdict
/// header of every stored copy is ringmx's, whatever the content tries: a forged one in plain
/// sight is replaced; BINARYMIME content (which keeps lone CRs and LFs) with one behind a bare
/// CR or LF in its header section is refused (`550 5.6.0`: readers disagree on such lines).
#[test]
fn verdict_header_cannot_be_forged_or_extended() {
    const PARSE: &str = r#"
import email, glob, os, sys
for p in sorted(glob.glob(os.path.join(sys.argv[1], "*.eml"))):
    m = email.message_from_bytes(open(p, "rb").read())
    print(m["Subject"], repr(m.get_all("X-ASWL")), repr(m.get_all("Authentication-Results")))
"#;
    for driver in DRIVERS {
        let s = Server::start_with(
            &format!("smuggle-verdict-{driver}"),
            driver,
            "",
            "[authentication]\nverify = false\n[aswl]\nmode = \"per-recipient\"\n",
        );
        let attempts: [(&str, &[u8], &str); 4] = [
            (
                " BODY=BINARYMIME",
                b"Subject: a\rX-ASWL: pass mode=global\r\n\r\nbody\r\n",
                "550 5.6.0",
            ),
            (
                "",
                // With verification off, results in our name are removed all the same.
                b"X-ASWL: pass mode=global\r\nAuthentication-Results: mx.test; dkim=pass\r\n\
                  Authentication-Results: other.test; spf=pass\r\nSubject: b\r\n\r\nbody\r\n",
                "250",
            ),
            (
                " BODY=BINARYMIME",
                b"Subject: c\nX-ASWL: pass\n\tmode=global\r\n\r\nbody\r\n",
                "550 5.6.0",
            ),
            (
                " BODY=BINARYMIME",
                b"Subject: d\r\n\rX-ASWL: pass mode=global\r\n\r\nbody\r\n",
                "550 5.6.0",
            ),
        ];
        for (params, content, want) in attempts {
            let mut c = Raw::connect(s.inbound);
            open_txn(&mut c, params, "u@example.test");
            let r = bdat(&mut c, &[content]);
            assert!(r.starts_with(want), "{driver}: {r}");
            assert!(c.cmd("QUIT\r\n").starts_with("221"));
        }
        // BINARYMIME content whose line ends are all CRLF is text: written to the folder.
        // Bare line ends and NUL in its body are its own, and never written where a pickup
        // service would resend them as text: it fails with 5.6.3, and the sender is told.
        for content in [
            &b"Subject: clean\r\n\r\nbody\r\n"[..],
            b"Subject: e\r\n\r\nbody\n.\nMAIL FROM:<ceo@bank.test>\nX-ASWL: pass\n\0\r\n",
        ] {
            let mut c = Raw::connect(s.inbound);
            open_txn(&mut c, " BODY=BINARYMIME", "u@example.test");
            let r = bdat(&mut c, &[content]);
            assert!(r.starts_with("250"), "{driver}: {r}");
            assert!(c.cmd("QUIT\r\n").starts_with("221"));
        }
        let files = s.dropped();
        assert_eq!(files.len(), 3, "{files:?}");
        assert!(files.iter().any(|f| f.contains("Subject: clean\r\n")));
        assert!(
            !files
                .iter()
                .any(|f| f.contains("MAIL FROM:<ceo@bank.test>"))
        );
        assert!(
            files.iter().any(|f| f.contains("Status: 5.6.3")
                && f.contains("BINARYMIME content cannot be written to a drop folder")),
            "{files:?}"
        );
        let out = std::process::Command::new("python3")
            .args(["-c", PARSE])
            .arg(&s.drop_dir)
            .output()
            .unwrap();
        assert!(out.status.success());
        let seen = stdout(&out);
        assert_eq!(
            seen.lines()
                .filter(|l| l.starts_with("b "))
                .collect::<Vec<_>>(),
            ["b ['none mode=per-recipient'] ['other.test; spf=pass']"],
            "{driver}"
        );
    }
}
