//! Bodies of the cargo-fuzz targets outside the SMTP core (see `proto::fuzz_targets` for
//! those): the relay client's reply parser and state machine, the spool record parser, the
//! whitelist's readers, the admin endpoint and DMARC's reading of a From: field.
//! `cargo test` replays every committed corpus file and crash file of all targets from here.

use crate::config::RelayTls;
use crate::relay::client::{Action, Client, ClientOptions};
use crate::relay::reply::{self, Capabilities};
use crate::spool::record;

/// Replies from a next hop: the parser never panics and what it returns is consistent; the
/// client state machine, fed every reply parsed from the input, never panics either.
pub fn reply(data: &[u8]) {
    let mode = data.first().copied().unwrap_or(0);
    let mut client = Client::new(
        ClientOptions {
            ehlo: "fuzz.test".into(),
            tls: match mode & 3 {
                0 => RelayTls::None,
                1 => RelayTls::Opportunistic,
                2 => RelayTls::Required,
                _ => RelayTls::Implicit,
            },
            auth: (mode & 4 != 0).then(|| ("u".into(), "p".into())),
        },
        mode & 3 == 3,
    );
    let mut rest = data.get(1..).unwrap_or_default();
    let rcpts = ["a@d.test".to_string(), "b@d.test".to_string()];
    while let Ok(Some((r, n))) = reply::parse(rest) {
        assert!(n > 0 && n <= rest.len());
        assert!((200..600).contains(&r.code));
        assert!(!r.lines.is_empty() && r.lines.len() <= reply::MAX_LINES);
        let _ = Capabilities::from_ehlo(&r);
        let _ = (r.one_line(), r.status());
        rest = rest.get(n..).unwrap_or_default();
        match client.on_reply(r) {
            Action::Ready => {
                if let Action::Done(v) = client.start(
                    "s@x.test",
                    &rcpts,
                    &crate::delivery::DsnRequest::default(),
                    false,
                    &[b"m\r\n"],
                ) {
                    assert_eq!(v.len(), rcpts.len());
                }
            }
            Action::StartTls => {
                let _ = client.tls_started();
            }
            Action::Done(v) => assert_eq!(v.len(), rcpts.len()),
            Action::Send(_) | Action::Wait | Action::Failed(_) => {}
        }
    }
}

/// A From: field as DMARC enforcement reads it besides mail-auth's parser (the domains its
/// raw text names, domains split by comments or spaces, the field-level ambiguity checks, the
/// address's normalization): never panics.
pub fn from(data: &[u8]) {
    crate::policy::authenticate::fuzz_from(data);
}

/// A message parsed for DKIM with its header block alone and its body hashed in blocks gives
/// what mail-auth's own parse of the whole message gives.
pub fn dkim_parse(data: &[u8]) {
    crate::policy::bodyhash::fuzz_parse(data);
}

/// Spool records read back at recovery: never panic; a record never claims bytes it lacks.
pub fn record(data: &[u8]) {
    let mut pos = 0usize;
    while pos < data.len() {
        let rest = data.get(pos..).unwrap_or_default();
        match record::parse(rest, pos as u64) {
            Ok((p, n)) => {
                assert!(n >= record::HEADER && n <= rest.len());
                if let record::Parsed::Message(m) = p {
                    assert!(m.content_at + m.content_len <= (pos + n) as u64);
                }
                pos += n;
            }
            Err(_) => pos += 1,
        }
    }
}

/// The whitelist's readers of untrusted bytes, chosen by the first byte: message headers
/// (classification, RFC 2047, header removal), address keys, change-log records, snapshots.
pub fn aswl(data: &[u8]) {
    use crate::aswl::{addr, detect, persist, store};
    let (Some(&sel), Some(rest)) = (data.first(), data.get(1..)) else {
        return;
    };
    match sel % 4 {
        0 => {
            let signals = detect::Signals {
                auto_submitted: true,
                precedence: true,
                list_headers: true,
                reports: true,
            };
            let _ = detect::classify(rest, signals, None);
            if let Some(out) = detect::strip_header(rest, "X-ASWL") {
                assert!(out.len() < rest.len());
                assert!(detect::strip_header(&out, "X-ASWL").is_none());
            }
            let _ = detect::decode_words(&String::from_utf8_lossy(rest));
        }
        1 => {
            let s = String::from_utf8_lossy(rest);
            let n = addr::Normalize::default();
            if let Some(k) = n.external(&s) {
                // Normalising is idempotent: a key is its own key.
                assert_eq!(n.external(&k).as_deref(), Some(k.as_str()), "{s:?}");
            }
            let _ = n.local(&s);
        }
        2 => {
            let (records, _) = persist::decode_log(rest);
            for r in records {
                let again = persist::encode_log(r.remove, r.t, &r.pairs);
                assert_eq!(persist::decode_log(&again).0, vec![r]);
            }
        }
        _ => {
            let st = store::Store::new();
            if let Ok(r) = persist::read_snapshot_from(rest, &st) {
                assert!(r.records as usize >= st.len());
            }
        }
    }
}

/// The admin endpoint's request-head reader and access decision: no panic on any bytes, a
/// request without the token never passes a policy that has tokens (but for `/healthz` and
/// open `/metrics`), and a POST without a token always carries a non-simple content type.
pub fn admin(data: &[u8]) {
    use crate::admin::{Policy, authorize, read_head};
    let Ok(head) = read_head(&mut &data[..]) else {
        return;
    };
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], 8025));
    let hosts = ["admin.example".to_string()];
    let tokens = ["t0ken-t0ken-t0ken".to_string()];
    let open = Policy {
        listen,
        allowed_hosts: &hosts,
        tokens: &[],
        open_metrics: false,
    };
    let with_tokens = Policy {
        tokens: &tokens,
        ..open
    };
    let path = head.path.split('?').next().unwrap_or("");
    let bearer = head.authorization.as_deref() == Some("Bearer t0ken-t0ken-t0ken");
    if authorize(&head, &with_tokens).is_ok() && path != "/healthz" {
        assert!(bearer, "{head:?}");
    }
    if authorize(&head, &open).is_ok() && head.method == "POST" && path != "/healthz" {
        let ct = head.content_type.as_deref().unwrap_or("");
        let essence = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let simple = [
            "",
            "text/plain",
            "multipart/form-data",
            "application/x-www-form-urlencoded",
        ];
        assert!(!simple.contains(&essence.as_str()), "{head:?}");
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Replay the committed corpus and every crash file through the fuzz target bodies.
    #[test]
    fn replay_fuzz_corpus_and_artifacts() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        type Target = fn(&[u8]);
        let targets: [(&str, Target); 10] = [
            ("command", crate::proto::fuzz_targets::command),
            ("address", crate::proto::fuzz_targets::address),
            ("data", crate::proto::fuzz_targets::data),
            ("session", crate::proto::fuzz_targets::session),
            ("reply", super::reply),
            ("record", super::record),
            ("aswl", super::aswl),
            ("admin", super::admin),
            ("from", super::from),
            ("dkim_parse", super::dkim_parse),
        ];
        for (name, f) in targets {
            let mut replayed = 0;
            for dir in ["corpus", "artifacts"] {
                let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else {
                    continue;
                };
                for entry in entries.flatten() {
                    let bytes = std::fs::read(entry.path()).unwrap();
                    f(&bytes);
                    replayed += 1;
                }
            }
            assert!(
                replayed >= 3,
                "the {name} seed corpus is committed ({replayed} files)"
            );
        }
    }

    #[test]
    fn record_target_reads_real_records() {
        let env = crate::delivery::Envelope::example("Q", &["x@d.test"]);
        let mut seg = crate::spool::record::encode_message(&env, "T\r\n", b"body");
        seg.extend_from_slice(b"body");
        seg.extend_from_slice(&crate::spool::record::encode_done("Q", &[0]));
        super::record(&seg);
        super::reply(b"\x01220 mx\r\n250-mx\r\n250 PIPELINING\r\n250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n250 done\r\n");
    }
}
