//! The Auto Sender Whitelist end to end: Python's smtplib sends outbound and inbound mail to a
//! running ringmx; verdicts are read from the delivered copies' `X-ASWL` header, and from
//! `ringmx aswl` (online through the admin endpoint, offline on the data directory).

mod support;

use std::time::Duration;

use support::aswl::*;
use support::*;

/// These tests are about the whitelist's own logic, with senders nobody authenticates
/// (`tests/authentication.rs` has the authenticated whitelist).
const NO_VERIFY: &str = "[authentication]\nverify = false\n";

fn aswl_section(dir_extra: &str) -> String {
    format!(
        "{NO_VERIFY}[aswl]\nmode = \"per-recipient\"\nauto_response_window = \"0s\"\n{dir_extra}\n"
    )
}

#[test]
fn three_modes_split_copies_and_live_mode_switch() {
    let pass_dir = temp_dir("aswl-pass-folder");
    let extra = format!(
        "{}\n[[route]]\ndomains = [\"example.test\"]\ndirection = \"inbound\"\naswl = \"pass\"\naction = \"drop\"\nfolder = \"{}\"\n",
        aswl_section(""),
        pass_dir.display()
    );
    let s = Server::start_with("aswl-modes", "auto", "", &extra);
    outbound(
        &s,
        "John@Example.test",
        &["Jane@Ext.test", "colleague@example.org"],
        "{'Subject': 'lunch?'}",
    );
    clear_drops(&s);
    let rcpts = [
        "john+news@example.test",
        "mary@example.test",
        "x@example.org",
    ];
    // per-recipient: only john (sub-address stripped) passes; the copy to him is routed apart.
    inbound(&s, "jane@ext.test", &rcpts);
    inbound(&s, "bob@ext.test", &rcpts);
    std::thread::sleep(Duration::from_millis(300));
    let passed: Vec<String> = std::fs::read_dir(&pass_dir)
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect();
    assert_eq!(
        passed.len(),
        1,
        "one whitelisted copy, routed on the verdict"
    );
    assert!(
        passed[0].contains("X-ASWL: pass mode=per-recipient\r\n"),
        "{}",
        passed[0]
    );
    assert!(passed[0].contains("X-Receiver: john+news@example.test\r\n"));
    assert!(
        !passed[0].contains("mary@example.test"),
        "split: no other recipient on the pass copy"
    );
    assert_eq!(
        verdicts(&s, "jane@ext.test", "mary@example.test"),
        ["X-ASWL: none mode=per-recipient"]
    );
    assert_eq!(
        verdicts(&s, "jane@ext.test", "x@example.org"),
        ["X-ASWL: none mode=per-recipient"]
    );
    assert_eq!(
        verdicts(&s, "bob@ext.test", "john+news@example.test"),
        ["X-ASWL: none mode=per-recipient"]
    );
    // Internal mail (colleague@example.org) taught nothing.
    let (ok, why) = aswl_cli(&s, &["check", "colleague@example.org", "john@example.test"]);
    assert!(ok && why.contains("verdict: none"), "{why}");

    // per-domain, by reload: the whole of example.test passes, example.org does not.
    set_mode(&s, "per-domain");
    clear_drops(&s);
    inbound(&s, "Jane@EXT.test", &["mary@example.test", "x@example.org"]);
    assert_eq!(
        verdicts(&s, "Jane@EXT.test", "x@example.org"),
        ["X-ASWL: none mode=per-domain"]
    );
    let (ok, why) = aswl_cli(&s, &["check", "jane@ext.test", "mary@example.test"]);
    assert!(
        ok && why.contains("verdict: pass") && why.contains("domain example.test"),
        "{why}"
    );

    // global: every local recipient passes; an unknown sender still does not.
    set_mode(&s, "global");
    clear_drops(&s);
    inbound(&s, "jane@ext.test", &["x@example.org"]);
    inbound(&s, "bob@ext.test", &["x@example.org"]);
    assert_eq!(
        verdicts(&s, "jane@ext.test", "x@example.org"),
        ["X-ASWL: pass mode=global"]
    );
    assert_eq!(
        verdicts(&s, "bob@ext.test", "x@example.org"),
        ["X-ASWL: none mode=global"]
    );

    // A verdict header forged by the sender is removed.
    clear_drops(&s);
    let r = send(
        s.inbound.port(),
        "bob@ext.test",
        &["x@example.org"],
        "{'Subject': 'hi', 'X-ASWL': 'pass mode=global'}",
        "127.0.0.1",
    );
    assert_eq!(r.trim(), "{}");
    assert_eq!(
        verdicts(&s, "bob@ext.test", "x@example.org"),
        ["X-ASWL: none mode=global"]
    );

    let (_, metrics) = s.admin_get("/metrics");
    assert!(
        metrics.contains("ringmx_aswl_checks_total{mode=\"global\",verdict=\"pass\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("ringmx_aswl_records 1"), "{metrics}");
}

#[test]
fn lifetime_expiry_and_sliding_reset() {
    let extra = aswl_section("lifetime = \"4s\"\nsweep_interval = \"1s\"");
    let s = Server::start_with("aswl-lifetime", "auto", "", &extra);
    outbound(
        &s,
        "john@example.test",
        &["jane@ext.test"],
        "{'Subject': 'one'}",
    );
    std::thread::sleep(Duration::from_millis(2200));
    // Sending again resets the lifetime.
    outbound(
        &s,
        "john@example.test",
        &["jane@ext.test"],
        "{'Subject': 'two'}",
    );
    std::thread::sleep(Duration::from_millis(3000));
    // 5.2 s after the first message, 3 s after the second: still whitelisted.
    let (_, why) = aswl_cli(&s, &["check", "jane@ext.test", "john@example.test"]);
    assert!(why.contains("verdict: pass"), "{why}");
    std::thread::sleep(Duration::from_millis(3500));
    let (_, why) = aswl_cli(&s, &["check", "jane@ext.test", "john@example.test"]);
    assert!(why.contains("verdict: none"), "{why}");
    // And the sweep removed it.
    let (_, stats) = aswl_cli(&s, &["stats"]);
    assert!(
        stats.contains("records: 0") && stats.contains("swept: 1"),
        "{stats}"
    );
    clear_drops(&s);
    inbound(&s, "jane@ext.test", &["john@example.test"]);
    assert_eq!(
        verdicts(&s, "jane@ext.test", "john@example.test"),
        ["X-ASWL: none mode=per-recipient"]
    );
}

#[test]
fn collection_and_check_exceptions() {
    let extra = "[authentication]\nverify = false\n[aswl]\nmode = \"global\"\nauto_response_window = \"30s\"\nip_exceptions = [\"127.0.0.2\"]\ncheck_exceptions = [\"*@partner.test\", \"/^spam[0-9]+@/\"]\nlog_additions = true\n";
    let s = Server::start_with("aswl-exceptions", "auto", "", extra);
    let check = |sender: &str| aswl_cli(&s, &["check", sender, "x@example.test"]).1;
    // Client IP exception.
    let r = send(
        s.outbound.port(),
        "john@example.test",
        &["ipx@ext.test"],
        "{'Subject': 'hi'}",
        "127.0.0.2",
    );
    assert_eq!(r.trim(), "{}");
    assert!(check("ipx@ext.test").contains("verdict: none"));
    // Out-of-office subjects, RFC 2047-encoded, in several languages (smtplib encodes
    // non-ASCII subjects), and the shipped English list.
    for (i, subject) in [
        "Automatische Antwort: Termin",
        "Réponse automatique : absence",
        "自動返信: 会議",
        "Автоответ: отпуск",
        "Out of Office: back Monday",
        "Αυτόματη απάντηση",
    ]
    .iter()
    .enumerate()
    {
        outbound(
            &s,
            "john@example.test",
            &[&format!("ooo{i}@ext.test")],
            &format!("{{'Subject': {subject:?}}}"),
        );
        assert!(
            check(&format!("ooo{i}@ext.test")).contains("verdict: none"),
            "{subject}"
        );
    }
    // RFC 3834 and list headers; X-Auto-Response-Suppress alone is not a marker.
    outbound(
        &s,
        "john@example.test",
        &["auto@ext.test"],
        "{'Subject': 'x', 'Auto-Submitted': 'auto-replied (vacation)'}",
    );
    outbound(
        &s,
        "john@example.test",
        &["list@ext.test"],
        "{'Subject': 'x', 'List-Unsubscribe': '<mailto:u@x>'}",
    );
    outbound(
        &s,
        "john@example.test",
        &["suppress@ext.test"],
        "{'Subject': 'x', 'X-Auto-Response-Suppress': 'DR, RN, NRN, OOF'}",
    );
    assert!(check("auto@ext.test").contains("verdict: none"));
    assert!(check("list@ext.test").contains("verdict: none"));
    assert!(check("suppress@ext.test").contains("verdict: pass"));
    // Auto-response window: mail from fast@ext.test came in, the reply within 30 s is automatic.
    inbound(&s, "fast@ext.test", &["john@example.test"]);
    outbound(
        &s,
        "john@example.test",
        &["fast@ext.test"],
        "{'Subject': 'Re: reply'}",
    );
    assert!(check("fast@ext.test").contains("verdict: none"));
    // Check exceptions win over records.
    outbound(
        &s,
        "john@example.test",
        &["ceo@partner.test", "spam42@ext.test", "fine@ext.test"],
        "{'Subject': 'x'}",
    );
    let why = check("CEO@Partner.test");
    assert!(
        why.contains("verdict: none (exception)") && why.contains("*@partner.test"),
        "{why}"
    );
    assert!(check("spam42@ext.test").contains("exception"));
    assert!(check("fine@ext.test").contains("verdict: pass"));
    // A local domain as sender never passes, even with a record.
    let (ok, _) = aswl_cli(&s, &["add", "john@example.test", "spoof@example.org"]);
    assert!(ok);
    assert!(check("spoof@example.org").contains("local domain"));
    assert!(s.log().contains("aswl: added"), "log_additions");
}

#[test]
fn a_record_survives_kill_9_right_after_the_250() {
    let s0 = aswl_section("");
    let mut s = Server::start_with("aswl-kill9", "auto", "", &s0);
    outbound(
        &s,
        "john@example.test",
        &["jane@ext.test"],
        "{'Subject': 'x'}",
    );
    s.kill9();
    s.restart();
    let (_, why) = aswl_cli(&s, &["check", "jane@ext.test", "john@example.test"]);
    assert!(why.contains("verdict: pass"), "{why}");
    clear_drops(&s);
    inbound(&s, "jane@ext.test", &["john@example.test"]);
    assert_eq!(
        verdicts(&s, "jane@ext.test", "john@example.test"),
        ["X-ASWL: pass mode=per-recipient"]
    );
}

#[test]
fn admin_cli_online_and_offline() {
    let mut s = Server::start_with(
        "aswl-cli",
        "auto",
        "",
        &aswl_section("snapshot_interval = \"1s\""),
    );
    let (ok, out) = aswl_cli(&s, &["add", "John@Example.test", "Jane@Ext.test"]);
    assert!(ok, "{out}");
    let (ok, out) = aswl_cli(&s, &["add", "mary@example.test", "bob@ext.test"]);
    assert!(ok, "{out}");
    let (_, list) = aswl_cli(&s, &["list", "--local", "john@*"]);
    assert!(
        list.contains("John@Example.test\tJane@Ext.test") && list.contains("1 record(s)"),
        "{list}"
    );
    let (_, csv) = aswl_cli(&s, &["export"]);
    assert!(
        csv.starts_with("local,external,last_sent,local_original,external_original\n"),
        "{csv}"
    );
    assert_eq!(csv.lines().count(), 3);
    let (_, jsonl) = aswl_cli(&s, &["export", "--format", "jsonl"]);
    let first: serde_json::Value = serde_json::from_str(jsonl.lines().next().unwrap()).unwrap();
    assert_eq!(first["external"], "jane@ext.test");
    let (ok, out) = aswl_cli(&s, &["remove", "jane@ext.test"]);
    assert!(ok && out.contains("removed 1"), "{out}");
    // Import what was exported (CSV), plus a JSON line.
    let file = s.dir.join("import.csv");
    std::fs::write(
        &file,
        format!("{csv}{{\"local\":\"z@example.test\",\"external\":\"q@ext.test\"}}\n"),
    )
    .unwrap();
    let (ok, out) = aswl_cli(&s, &["import", &file.display().to_string()]);
    assert!(ok && out.contains("imported 3"), "{out}");
    let (ok, out) = aswl_cli(&s, &["import", "/dev/null/x"]);
    assert!(!ok, "{out}");
    std::fs::write(&file, "a@example.test\n").unwrap();
    let (ok, out) = aswl_cli(&s, &["import", &file.display().to_string()]);
    assert!(!ok && out.contains("line 1"), "{out}");
    let (_, stats) = aswl_cli(&s, &["stats"]);
    assert!(stats.contains("records: 3"), "{stats}");
    std::thread::sleep(Duration::from_millis(1500));
    let (_, stats) = aswl_cli(&s, &["stats"]);
    assert!(!stats.contains("snapshots: 0 written"), "{stats}");
    // Offline: the server is stopped, the CLI works on the data directory.
    s.stop();
    let (ok, out) = aswl_cli(&s, &["remove", "bob@ext.test"]);
    assert!(
        ok && out.contains("no server") && out.contains("removed 1"),
        "{out}"
    );
    let (ok, out) = aswl_cli(&s, &["add", "off@example.test", "line@ext.test"]);
    assert!(ok, "{out}");
    let (_, list) = aswl_cli(&s, &["list", "--offline"]);
    assert!(
        list.contains("3 record(s)") && list.contains("line@ext.test"),
        "{list}"
    );
    s.restart();
    let (_, why) = aswl_cli(&s, &["check", "line@ext.test", "off@example.test"]);
    assert!(why.contains("verdict: pass"), "{why}");
    let (_, why) = aswl_cli(&s, &["check", "bob@ext.test", "mary@example.test"]);
    assert!(why.contains("verdict: none"), "{why}");
    let (ok, out) = aswl_cli(&s, &["check", "a"]);
    assert!(!ok, "{out}");
}
