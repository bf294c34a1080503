use super::*;
use crate::relay::reply::parse;

fn r(s: &str) -> Reply {
    parse(s.as_bytes()).unwrap().unwrap().0
}

fn opts(tls: RelayTls, auth: bool) -> ClientOptions {
    ClientOptions {
        ehlo: "edge.test".into(),
        tls,
        auth: auth.then(|| ("u".into(), "p".into())),
    }
}

fn sent(a: Action) -> String {
    match a {
        Action::Send(b) => String::from_utf8(b).unwrap(),
        other => panic!("expected Send, got {other:?}"),
    }
}

const EHLO_PIPE: &str = "250-mx\r\n250-PIPELINING\r\n250-SIZE 100000\r\n250 8BITMIME\r\n";

fn ready(c: &mut Client, ehlo: &str) {
    assert_eq!(
        sent(c.on_reply(r("220 mx ESMTP\r\n"))),
        "EHLO edge.test\r\n"
    );
    assert_eq!(c.on_reply(r(ehlo)), Action::Ready);
}

#[test]
fn pipelined_transaction_with_per_recipient_results() {
    let mut c = Client::new(opts(RelayTls::None, false), false);
    ready(&mut c, EHLO_PIPE);
    let rcpts = vec!["a@d.test".to_string(), "b@d.test".to_string()];
    let out = sent(c.start(
        "s@x.test",
        &rcpts,
        &DsnRequest::default(),
        false,
        &[b"T: 1\r\n", b".dot\r\nbody"],
    ));
    assert_eq!(
        out,
        "MAIL FROM:<s@x.test> SIZE=16\r\nRCPT TO:<a@d.test>\r\nRCPT TO:<b@d.test>\r\nDATA\r\n"
    );
    assert_eq!(c.on_reply(r("250 2.1.0 ok\r\n")), Action::Wait);
    assert_eq!(c.on_reply(r("250 2.1.5 ok\r\n")), Action::Wait);
    assert_eq!(c.on_reply(r("550 5.1.1 unknown\r\n")), Action::Wait);
    // Payload: dot-stuffed, CRLF added, final dot in the same write.
    assert_eq!(
        sent(c.on_reply(r("354 go\r\n"))),
        "T: 1\r\n..dot\r\nbody\r\n.\r\n"
    );
    let Action::Done(res) = c.on_reply(r("250 2.0.0 queued\r\n")) else {
        panic!()
    };
    assert_eq!(res[0].code, 250);
    assert_eq!(res[1].one_line(), "550 5.1.1 unknown");
    // A partly failed transaction is followed by RSET.
    assert!(c.is_ready());
    assert!(
        sent(c.start(
            "s@x.test",
            &rcpts[..1],
            &DsnRequest::default(),
            false,
            &[b"x\r\n"]
        ))
        .starts_with("RSET\r\nMAIL")
    );
}

#[test]
fn without_pipelining_one_command_per_reply_and_mail_refusal() {
    let mut c = Client::new(opts(RelayTls::None, false), false);
    ready(&mut c, "250 mx\r\n");
    let rcpts = vec!["a@d.test".to_string()];
    assert_eq!(
        sent(c.start("", &rcpts, &DsnRequest::default(), false, &[b"x\r\n"])),
        "MAIL FROM:<>\r\n"
    );
    assert_eq!(sent(c.on_reply(r("250 ok\r\n"))), "RCPT TO:<a@d.test>\r\n");
    assert_eq!(sent(c.on_reply(r("250 ok\r\n"))), "DATA\r\n");
    assert_eq!(sent(c.on_reply(r("354 go\r\n"))), "x\r\n.\r\n");
    let Action::Done(res) = c.on_reply(r("451 4.3.0 later\r\n")) else {
        panic!()
    };
    assert!(res[0].is_transient());
    assert!(
        sent(c.start("s@x", &rcpts, &DsnRequest::default(), false, &[b"x\r\n"]))
            .starts_with("RSET\r\n")
    );
    assert_eq!(c.on_reply(r("250 ok\r\n")), Action::Wait);
    let Action::Done(res) = c.on_reply(r("553 5.1.8 bad sender\r\n")) else {
        panic!()
    };
    assert_eq!(res[0].code, 553);
}

#[test]
fn bdat_when_chunking_and_pipelining() {
    let mut c = Client::new(opts(RelayTls::None, false), false);
    ready(
        &mut c,
        "250-mx\r\n250-PIPELINING\r\n250-SIZE\r\n250 CHUNKING\r\n",
    );
    let out = sent(c.start(
        "s@x",
        &["a@d".to_string()],
        &DsnRequest::default(),
        false,
        &[b".x\r\n"],
    ));
    assert_eq!(
        out,
        "MAIL FROM:<s@x> SIZE=4\r\nRCPT TO:<a@d>\r\nBDAT 4 LAST\r\n.x\r\n"
    );
    assert_eq!(c.on_reply(r("250 ok\r\n")), Action::Wait);
    assert_eq!(c.on_reply(r("250 ok\r\n")), Action::Wait);
    assert!(matches!(c.on_reply(r("250 ok\r\n")), Action::Done(v) if v[0].code == 250));
}

#[test]
fn starttls_policies_and_auth() {
    // Required, not offered: the hop fails with a temporary error.
    let mut c = Client::new(opts(RelayTls::Required, false), false);
    c.on_reply(r("220 mx\r\n"));
    assert!(matches!(c.on_reply(r("250 mx\r\n")), Action::Failed(f) if f.code == 421));
    // Opportunistic, offered, refused: plain.
    let mut c = Client::new(opts(RelayTls::Opportunistic, false), false);
    c.on_reply(r("220 mx\r\n"));
    assert_eq!(
        sent(c.on_reply(r("250-mx\r\n250 STARTTLS\r\n"))),
        "STARTTLS\r\n"
    );
    assert_eq!(c.on_reply(r("454 4.7.0 no\r\n")), Action::Ready);
    // Offered and accepted, then AUTH PLAIN over TLS.
    let mut c = Client::new(opts(RelayTls::Required, true), false);
    c.on_reply(r("220 mx\r\n"));
    c.on_reply(r("250-mx\r\n250 STARTTLS\r\n"));
    assert_eq!(c.on_reply(r("220 go\r\n")), Action::StartTls);
    assert_eq!(sent(c.tls_started()), "EHLO edge.test\r\n");
    assert_eq!(
        sent(c.on_reply(r("250-mx\r\n250 AUTH PLAIN LOGIN\r\n"))),
        "AUTH PLAIN AHUAcA==\r\n"
    );
    assert_eq!(c.on_reply(r("235 ok\r\n")), Action::Ready);
    // AUTH LOGIN; a refusal is temporary for the messages.
    let mut c = Client::new(opts(RelayTls::Implicit, true), true);
    c.on_reply(r("220 mx\r\n"));
    assert_eq!(
        sent(c.on_reply(r("250-mx\r\n250 AUTH LOGIN\r\n"))),
        "AUTH LOGIN\r\n"
    );
    assert_eq!(sent(c.on_reply(r("334 VXNlcm5hbWU6\r\n"))), "dQ==\r\n");
    assert_eq!(sent(c.on_reply(r("334 UGFzc3dvcmQ6\r\n"))), "cA==\r\n");
    assert!(matches!(c.on_reply(r("535 5.7.8 no\r\n")), Action::Failed(f) if f.code == 454));
    // Credentials are never sent in plain text unless TLS is off by configuration.
    let mut c = Client::new(opts(RelayTls::Opportunistic, true), false);
    c.on_reply(r("220 mx\r\n"));
    assert!(matches!(c.on_reply(r("250 mx\r\n")), Action::Failed(f) if f.code == 454));
}

#[test]
fn helo_fallback_size_and_utf8() {
    let mut c = Client::new(opts(RelayTls::None, false), false);
    c.on_reply(r("220 mx\r\n"));
    assert_eq!(sent(c.on_reply(r("502 no\r\n"))), "HELO edge.test\r\n");
    assert_eq!(c.on_reply(r("250 mx\r\n")), Action::Ready);
    let utf8 = vec!["é@d.test".to_string()];
    assert!(
        matches!(c.start("s@x", &utf8, &DsnRequest::default(), false, &[b"x"]), Action::Done(v) if v[0].code == 553)
    );
    let mut c = Client::new(opts(RelayTls::None, false), false);
    ready(&mut c, "250-mx\r\n250 SIZE 10\r\n");
    let big = vec![b'x'; 11];
    assert!(
        matches!(c.start("s@x", &["a@d".into()], &DsnRequest::default(), false, &[&big]), Action::Done(v) if v[0].status() == "5.3.4")
    );
}

#[test]
fn dot_stuffing() {
    assert_eq!(dot_stuff(&[b".a\r\n.\r\nb"]), b"..a\r\n..\r\nb\r\n.\r\n");
    assert_eq!(dot_stuff(&[b"a\r\n", b".b\r\n"]), b"a\r\n..b\r\n.\r\n");
    assert_eq!(dot_stuff(&[b""]), b".\r\n");
    // Every line-ending variant leaves as CRLF; a dot after any of them is stuffed.
    for (parts, out) in [
        (&[&b"a\r.\r\nb"[..]][..], &b"a\r\n..\r\nb\r\n.\r\n"[..]),
        (&[b"a\n.\nb"], b"a\r\n..\r\nb\r\n.\r\n"),
        (&[b"a\r\n.\r"], b"a\r\n..\r\n.\r\n"),
        (&[b"a\r", b"\n.b"], b"a\r\n..b\r\n.\r\n"),
        (&[b"a\r", b".b"], b"a\r\n..b\r\n.\r\n"),
        (&[b"a\r", b"", b"\n"], b"a\r\n.\r\n"),
        (&[b"\r\r\n\n"], b"\r\n\r\n\r\n.\r\n"),
        (&[b"a\n"], b"a\r\n.\r\n"),
    ] {
        assert_eq!(dot_stuff(parts), out, "{parts:?}");
    }
}

proptest::proptest! {
    /// Whatever the content and however it is cut, ringmx's own strict DATA reader reads the
    /// payload back as the content with canonical line ends, ending exactly at the payload's
    /// end, with no bare CR or LF: no next hop can find another end of data in it.
    #[test]
    fn dot_stuffed_payload_is_canonical(
        content in proptest::collection::vec(
            proptest::prop_oneof![
                proptest::strategy::Just(b'\r'),
                proptest::strategy::Just(b'\n'),
                proptest::strategy::Just(b'.'),
                proptest::strategy::Just(b'a'),
            ],
            0..200,
        ),
        cut in 0usize..200,
    ) {
        let cut = cut.min(content.len());
        let (a, b) = content.split_at(cut);
        let payload = dot_stuff(&[a, b]);
        let read = crate::proto::data::oracle::read(&payload, crate::proto::BareLinePolicy::Reject);
        proptest::prop_assert_eq!(read.end, Some(payload.len()));
        proptest::prop_assert!(!read.bare);
        let mut canonical = dot_stuff_oracle(&content);
        if !canonical.is_empty() && !canonical.ends_with(b"\r\n") {
            canonical.extend_from_slice(b"\r\n");
        }
        proptest::prop_assert_eq!(read.content, canonical);
    }
}

/// Each CRLF, lone CR or lone LF as CRLF, byte at a time.
fn dot_stuff_oracle(content: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < content.len() {
        match content[i] {
            b'\r' => {
                out.extend_from_slice(b"\r\n");
                if content.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b'\n' => out.extend_from_slice(b"\r\n"),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

#[test]
fn binarymime_goes_only_to_hops_that_take_it() {
    let rcpts = ["a@d".to_string()];
    let none = DsnRequest::default();
    // CHUNKING and BINARYMIME: BDAT with BODY=BINARYMIME, bytes untouched.
    let mut c = Client::new(opts(RelayTls::None, false), false);
    ready(
        &mut c,
        "250-mx\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 BINARYMIME\r\n",
    );
    let out = sent(c.start("s@x", &rcpts, &none, true, &[b"a\n.\n\0"]));
    // No SIZE offered: no SIZE= sent (RFC 1870 §6; a strict hop would answer 555).
    assert_eq!(
        out,
        "MAIL FROM:<s@x> BODY=BINARYMIME\r\nRCPT TO:<a@d>\r\nBDAT 5 LAST\r\na\n.\n\0"
    );
    // CHUNKING alone, or neither: refused for good (RFC 3030 §3), nothing sent.
    for ehlo in ["250-mx\r\n250-PIPELINING\r\n250 CHUNKING\r\n", EHLO_PIPE] {
        let mut c = Client::new(opts(RelayTls::None, false), false);
        ready(&mut c, ehlo);
        let a = c.start("s@x", &rcpts, &none, true, &[b"x"]);
        assert!(
            matches!(a, Action::Done(v) if v[0].status() == "5.6.3"),
            "{ehlo}"
        );
    }
}

#[test]
fn dsn_parameters_only_to_hops_that_offer_dsn() {
    use crate::delivery::{DsnRet, RcptDsn};
    let rcpts = ["a@d".to_string(), "b@d".to_string()];
    let dsn = DsnRequest {
        ret: Some(DsnRet::Hdrs),
        envid: Some("id+2B".into()),
        rcpts: vec![
            RcptDsn {
                notify: Some(1),
                orcpt: None,
            },
            RcptDsn {
                notify: Some(2 | 4 | 8),
                orcpt: Some("rfc822;b@d".into()),
            },
        ],
    };
    let mut c = Client::new(opts(RelayTls::None, false), false);
    ready(&mut c, "250-mx\r\n250-PIPELINING\r\n250 DSN\r\n");
    assert_eq!(
        sent(c.start("s@x", &rcpts, &dsn, false, &[b"x\r\n"])),
        "MAIL FROM:<s@x> RET=HDRS ENVID=id+2B\r\nRCPT TO:<a@d> NOTIFY=NEVER\r\nRCPT TO:<b@d> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;b@d\r\nDATA\r\n"
    );
    let mut c = Client::new(opts(RelayTls::None, false), false);
    ready(&mut c, EHLO_PIPE);
    assert_eq!(
        sent(c.start("s@x", &rcpts, &dsn, false, &[b"x\r\n"])),
        "MAIL FROM:<s@x> SIZE=3\r\nRCPT TO:<a@d>\r\nRCPT TO:<b@d>\r\nDATA\r\n"
    );
}
