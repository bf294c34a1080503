//! The whitelist's semantics without sockets: modes, exceptions, lifetime, auto-responses,
//! and the disk (logs, snapshots, damaged snapshots, the committed fixture).

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use super::*;
use crate::config::Config;

fn settings(extra: &str, dir: &Path) -> Settings {
    let src = format!(
        r#"
[server]
data_dir = "{}"
[[binding]]
name = "in"
listen = "127.0.0.1:2525"
direction = "inbound"
[domains]
local = ["a.test", "b.test"]
[[route]]
domains = ["*"]
action = "discard"
[aswl]
{extra}
"#,
        dir.display()
    );
    let cfg = Config::parse(&src, "t").unwrap();
    (*cfg.aswl.unwrap()).clone()
}

fn tmp(name: &str) -> crate::test_dir::TestDir {
    crate::test_dir::TestDir::new("aswl", name)
}

const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 5));

fn teach(
    a: &Aswl,
    s: &Settings,
    from: &str,
    to: &[&str],
    content: &[u8],
    now: u32,
) -> Result<usize, String> {
    let rcpts: Vec<String> = to.iter().map(|r| r.to_string()).collect();
    let pairs = a
        .plan(s, CLIENT, from, &rcpts, content, now)
        .map_err(|e| e.to_string())?;
    a.apply(s, &pairs, now);
    Ok(pairs.len())
}

const PLAIN: &[u8] = b"Subject: lunch?\r\n\r\nhi\r\n";

#[test]
fn mode_matrix() {
    let d = tmp("modes");
    let mut s = settings("", &d);
    let a = Aswl::open(&s, 1).unwrap();
    assert_eq!(
        teach(
            &a,
            &s,
            "John@A.test",
            &["Jane@Ext.test", "colleague@b.test"],
            PLAIN,
            1000
        ),
        Ok(1)
    );
    let cases = [
        (Mode::Global, "mary@a.test", true),
        (Mode::Global, "x@b.test", true),
        (Mode::PerDomain, "mary@a.test", true),
        (Mode::PerDomain, "x@b.test", false),
        (Mode::PerRecipient, "john+tag@a.test", true),
        (Mode::PerRecipient, "mary@a.test", false),
    ];
    for (mode, rcpt, pass) in cases {
        s.mode = mode;
        assert_eq!(
            a.check(&s, "jane@EXT.test", rcpt, 1001).pass(),
            pass,
            "{mode:?} {rcpt}"
        );
        assert!(!a.check(&s, "other@ext.test", rcpt, 1001).pass());
    }
    // A sender outside the local domains teaches nothing.
    assert!(
        teach(&a, &s, "someone@gmail.test", &["x@ext.test"], PLAIN, 1000)
            .unwrap_err()
            .contains("not in a local domain")
    );
    // Internal mail taught nothing; the null sender never passes.
    s.mode = Mode::Global;
    assert!(!a.check(&s, "colleague@b.test", "john@a.test", 1001).pass());
    assert!(matches!(
        a.check(&s, "", "john@a.test", 1001),
        Verdict::Excepted(_)
    ));
    // BATV-tagged and IDN senders match their plain forms.
    teach(&a, &s, "john@a.test", &["jane@bücher.example"], PLAIN, 1000).unwrap();
    assert!(
        a.check(
            &s,
            "prvs=1234abcdef=jane@xn--bcher-kva.example",
            "x@a.test",
            1001
        )
        .pass()
    );
    assert!(a.counters.hits[0].load(Ordering::Relaxed) >= 2);
}

#[test]
fn lifetime_and_sliding_reset() {
    let d = tmp("lifetime");
    let s = settings("lifetime = \"100s\"", &d);
    let a = Aswl::open(&s, 1).unwrap();
    teach(&a, &s, "john@a.test", &["jane@ext.test"], PLAIN, 1000).unwrap();
    assert!(a.check(&s, "jane@ext.test", "john@a.test", 1099).pass());
    assert!(!a.check(&s, "jane@ext.test", "john@a.test", 1101).pass());
    // Sending again before expiry slides the lifetime.
    teach(&a, &s, "john@a.test", &["jane@ext.test"], PLAIN, 1090).unwrap();
    assert!(a.check(&s, "jane@ext.test", "john@a.test", 1150).pass());
    // The sweep removes only what expired.
    teach(&a, &s, "john@a.test", &["old@ext.test"], PLAIN, 900).unwrap();
    assert_eq!(a.sweep(&s, 1100), 1);
    assert_eq!(a.store.len(), 1);
    // Lifetime off: nothing expires, nothing is swept.
    let off_dir = tmp("lifetime-off");
    let off = settings("", &off_dir);
    assert!(
        a.check(&off, "jane@ext.test", "john@a.test", u32::MAX - 1)
            .pass()
    );
    assert_eq!(a.sweep(&off, u32::MAX - 1), 0);
}

#[test]
fn exceptions() {
    let d = tmp("exceptions");
    let s = settings(
        r#"mode = "global"
ip_exceptions = ["10.0.0.0/24"]
check_exceptions = ["*@spam.test", "/^bad[0-9]+@/", "Partner.test"]
subject_exceptions = ["*[newsletter]*"]
auto_response_window = "60s""#,
        &d,
    );
    let a = Aswl::open(&s, 1).unwrap();
    // IP collection exception (the test client is 10.0.0.5).
    assert!(
        teach(&a, &s, "john@a.test", &["x@ext.test"], PLAIN, 100)
            .unwrap_err()
            .contains("ip_exceptions")
    );
    let d2 = tmp("exceptions2");
    let s2 = settings(
        r#"mode = "global"
check_exceptions = ["*@spam.test", "/^bad[0-9]+@/", "Partner.test"]
subject_exceptions = ["*[newsletter]*"]
auto_response_window = "60s""#,
        &d2,
    );
    for x in [
        "x@ext.test",
        "u@spam.test",
        "bad7@ext.test",
        "p@partner.test",
    ] {
        teach(&a, &s2, "john@a.test", &[x], PLAIN, 100).unwrap();
    }
    assert!(a.check(&s2, "x@ext.test", "m@a.test", 101).pass());
    for x in ["U@SPAM.test", "BAD7@ext.test", "p@Partner.TEST"] {
        assert!(
            matches!(a.check(&s2, x, "m@a.test", 101), Verdict::Excepted(_)),
            "{x}"
        );
    }
    // Local domains as sender never pass, even with a record.
    assert!(matches!(
        a.check(&s2, "ceo@a.test", "m@a.test", 101),
        Verdict::Excepted(_)
    ));
    // Subject masks (operator's and the shipped out-of-office list, RFC 2047-encoded).
    let news = b"Subject: Our [Newsletter] #4\r\n\r\n";
    assert!(teach(&a, &s2, "john@a.test", &["y@ext.test"], news, 100).is_err());
    let ooo = "Subject: =?UTF-8?B?0JDQstGC0L7QvtGC0LLQtdGCOiDQvtGC0L/Rg9GB0Lo=?=\r\n\r\n";
    let why = teach(&a, &s2, "john@a.test", &["y@ext.test"], ooo.as_bytes(), 100).unwrap_err();
    assert!(why.contains("Автоответ"), "{why}");
    let jp = "Subject: =?ISO-2022-JP?B?GyRCPCtGMEp2GyhC?= =?UTF-8?B?6Ieq5YuV6L+U5L+hOiDkvJrorbA=?=\r\n\r\n";
    assert!(
        teach(&a, &s2, "john@a.test", &["y@ext.test"], jp.as_bytes(), 100).is_ok(),
        "undecodable charset then a non-prefix match"
    );
    let jp = "Subject: =?UTF-8?B?6Ieq5YuV6L+U5L+hOiDkvJrorbA=?=\r\n\r\n";
    assert!(teach(&a, &s2, "john@a.test", &["z@ext.test"], jp.as_bytes(), 100).is_err());
    // Auto-response window: mail from R to L, then L to R within 60 s is not collected…
    a.saw_inbound(&s2, "fast@ext.test", &["john@a.test".into()], 1000);
    assert_eq!(
        teach(&a, &s2, "john@a.test", &["fast@ext.test"], PLAIN, 1059),
        Ok(0)
    );
    // …but after it is, and another local sender is not affected.
    assert_eq!(
        teach(&a, &s2, "mary@a.test", &["fast@ext.test"], PLAIN, 1010),
        Ok(1)
    );
    assert_eq!(
        teach(&a, &s2, "john@a.test", &["fast@ext.test"], PLAIN, 1061),
        Ok(1)
    );
    // Auto-Submitted and the null sender.
    assert!(
        teach(
            &a,
            &s2,
            "john@a.test",
            &["q@ext.test"],
            b"Auto-Submitted: auto-replied\r\n\r\n",
            1
        )
        .is_err()
    );
    assert!(teach(&a, &s2, "", &["q@ext.test"], PLAIN, 1).is_err());
}

#[test]
fn explain_names_mode_record_and_exception() {
    let d = tmp("explain");
    let s = settings(
        "mode = \"per-domain\"\ncheck_exceptions = [\"evil.test\"]",
        &d,
    );
    let a = Aswl::open(&s, 1).unwrap();
    teach(&a, &s, "john@a.test", &["jane@ext.test"], PLAIN, 1000).unwrap();
    let (v, why) = a.explain(&s, "jane@ext.test", "mary@a.test", 1010);
    assert!(v.pass());
    assert!(
        why.contains("per-domain") && why.contains("domain a.test") && why.contains("10 s ago"),
        "{why}"
    );
    let (v, why) = a.explain(&s, "jane@ext.test", "x@b.test", 1010);
    assert_eq!(v, Verdict::None);
    assert!(why.contains("no record of domain b.test"), "{why}");
    let (_, why) = a.explain(&s, "x@evil.test", "x@b.test", 1010);
    assert!(why.contains("check exception \"evil.test\""), "{why}");
}

#[test]
fn logs_and_snapshots_survive_a_restart() {
    let d = tmp("disk");
    let s = settings("", &d);
    {
        let a = Aswl::open(&s, 2).unwrap();
        teach(&a, &s, "john@a.test", &["jane@ext.test"], PLAIN, 1000).unwrap();
        a.disk.snapshot(&a.store).unwrap();
        // After the snapshot: only in a change log.
        let pairs = a
            .plan(
                &s,
                CLIENT,
                "Mary@a.test",
                &["Bob@ext.test".into()],
                PLAIN,
                2000,
            )
            .unwrap();
        a.apply(&s, &pairs, 2000);
        let seg = a.disk.core_log(1).unwrap();
        seg.append(&[&persist::encode_log(false, 2000, &pairs)])
            .unwrap();
        seg.sync_now().unwrap();
        // An operator's removal is logged too.
        a.store.remove(None, "jane@ext.test", 1500);
        a.disk
            .write_admin(&persist::encode_log(
                true,
                1500,
                &[Pair {
                    local: String::new(),
                    local_original: String::new(),
                    external: "jane@ext.test".into(),
                    external_original: String::new(),
                }],
            ))
            .unwrap();
    }
    let a = Aswl::open(&s, 2).unwrap();
    assert_eq!(a.store.len(), 1);
    let r = &a.store.records()[0];
    assert_eq!(
        (r.local.as_str(), r.external.as_str(), r.last_sent),
        ("mary@a.test", "bob@ext.test", 2000)
    );
    assert_eq!(r.external_original, "Bob@ext.test");
    // A second process cannot open the same directory.
    assert!(Aswl::open(&s, 1).is_err());
}

#[test]
fn a_damaged_snapshot_falls_back_to_the_previous_one_and_the_logs() {
    let d = tmp("damaged");
    let s = settings("", &d);
    {
        let a = Aswl::open(&s, 1).unwrap();
        for i in 0..3000u32 {
            teach(
                &a,
                &s,
                "john@a.test",
                &[&format!("x{i}@ext.test")],
                PLAIN,
                1000 + i,
            )
            .unwrap();
        }
        a.disk.snapshot(&a.store).unwrap();
        // Changes after the first snapshot reach the second only through memory and its log.
        let pairs = a
            .plan(
                &s,
                CLIENT,
                "mary@a.test",
                &["late@ext.test".into()],
                PLAIN,
                9000,
            )
            .unwrap();
        a.apply(&s, &pairs, 9000);
        let seg = a.disk.core_log(0).unwrap();
        seg.append(&[&persist::encode_log(false, 9000, &pairs)])
            .unwrap();
        seg.sync_now().unwrap();
        a.disk.snapshot(&a.store).unwrap();
    }
    // Flip a byte in the middle of the newest snapshot (inside a record block).
    let path = s.dir.join("snapshot");
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let a = Aswl::open(&s, 1).unwrap();
    assert!(a.disk.recovered.fell_back_to_previous);
    assert!(a.disk.recovered.bad_snapshot_blocks >= 1);
    assert_eq!(
        a.store.len(),
        3001,
        "previous snapshot + logs since it restore everything"
    );
    // A snapshot that is not one at all: reported, and the logs still count.
    drop(a);
    std::fs::write(&path, b"garbage").unwrap();
    std::fs::remove_file(s.dir.join("snapshot.prev")).unwrap();
    let a = Aswl::open(&s, 1).unwrap();
    assert!(a.disk.recovered.fell_back_to_previous);
    assert!(!a.store.is_empty());
}

/// The committed fixture of the current snapshot format (regenerate with
/// `RINGMX_WRITE_FIXTURE=1 cargo test --lib snapshot_fixture` after a deliberate format change).
#[test]
fn snapshot_fixture_loads() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/aswl-snapshot-v1");
    if std::env::var_os("RINGMX_WRITE_FIXTURE").is_some() {
        let d = tmp("fixture-write");
        let s = settings("", &d);
        let a = Aswl::open(&s, 1).unwrap();
        a.store.record(
            ("john@a.test", "John@A.test"),
            ("jane@ext.test", "Jane@Ext.test"),
            1_700_000_000,
        );
        a.store.record(
            ("mary@b.test", "mary@b.test"),
            ("jane@ext.test", "jane@ext.test"),
            1_700_000_100,
        );
        a.store.record(
            ("john@a.test", "john@a.test"),
            ("bob@xn--bcher-kva.example", "bob@bücher.example"),
            1_700_000_200,
        );
        a.disk.snapshot(&a.store).unwrap();
        std::fs::copy(s.dir.join("snapshot"), &fixture).unwrap();
    }
    let store = store::Store::new();
    let r = persist::read_snapshot(&fixture, &store).unwrap();
    assert!(r.complete);
    assert_eq!(r.records, 3);
    let mut recs = store.records();
    recs.sort_by_key(|r| r.last_sent);
    assert_eq!(recs[0].local_original, "John@A.test");
    assert_eq!(recs[0].external, "jane@ext.test");
    assert_eq!(recs[2].external_original, "bob@bücher.example");
    assert_eq!(
        store.last_sent(Mode::PerDomain, "x@b.test", "jane@ext.test"),
        Some(1_700_000_100)
    );
    assert_eq!(
        store.last_sent(Mode::Global, "x@b.test", "bob@xn--bcher-kva.example"),
        Some(1_700_000_200)
    );
}

#[test]
fn config_errors_name_the_key() {
    let d = tmp("cfg");
    for (extra, key) in [
        ("mode = \"everyone\"", "mode"),
        ("lifetime = \"soon\"", "aswl.lifetime"),
        ("check_exceptions = [\"/(/\"]", "aswl.check_exceptions"),
        ("header = \"X Bad\"", "aswl.header"),
        ("bogus = 1", "bogus"),
    ] {
        let src = format!(
            "[[binding]]\nname = \"in\"\nlisten = \"127.0.0.1:2525\"\ndirection = \"inbound\"\n[domains]\nlocal = [\"a.test\"]\n[[route]]\ndomains = [\"*\"]\naction = \"discard\"\n[server]\ndata_dir = \"{}\"\n[aswl]\n{extra}\n",
            d.display()
        );
        let e = Config::parse(&src, "t").unwrap_err().to_string();
        assert!(e.contains(key), "{extra}: {e}");
        assert!(e.contains("line 13") || e.contains(":13"), "{extra}: {e}");
    }
    let _ = Duration::ZERO;
}
