//! Whitelist test helpers: mail sent with Python's smtplib, verdicts read from the delivered
//! copies, `ringmx aswl` and mode changes by reload.

use std::process::Command;

use super::*;

/// Send one message with smtplib: `PORT` is the target, headers given as Python dict text.
/// Returns smtplib's refused-recipients dict (or the exception) as printed.
pub fn send(port: u16, from: &str, to: &[&str], headers: &str, source: &str) -> String {
    let script = format!(
        r#"
import os, smtplib
from email.message import EmailMessage
m = EmailMessage()
for k, v in {headers}.items():
    m[k] = v
m.set_content("hello\n")
s = smtplib.SMTP("127.0.0.1", int(os.environ["PORT"]), source_address=("{source}", 0), timeout=20)
try:
    print(s.send_message(m, from_addr={from:?}, to_addrs={to:?}))
except Exception as e:
    print("ERROR", e)
s.quit()
"#
    );
    let out = python(&script, port, 0);
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(out.status.success(), "{text}");
    text
}

pub fn outbound(s: &Server, from: &str, to: &[&str], headers: &str) {
    let r = send(s.outbound.port(), from, to, headers, "127.0.0.1");
    assert_eq!(r.trim(), "{}", "outbound accepted: {r}");
}

pub fn inbound(s: &Server, from: &str, to: &[&str]) {
    let r = send(
        s.inbound.port(),
        from,
        to,
        "{'Subject': 'reply'}",
        "127.0.0.1",
    );
    assert_eq!(r.trim(), "{}", "inbound accepted: {r}");
}

/// The verdict header of every dropped copy addressed to `rcpt` from `sender`.
pub fn verdicts(s: &Server, sender: &str, rcpt: &str) -> Vec<String> {
    s.dropped()
        .into_iter()
        .filter(|m| {
            m.contains(&format!("X-Sender: {sender}\r\n"))
                && m.contains(&format!("X-Receiver: {rcpt}\r\n"))
        })
        .map(|m| {
            let hs: Vec<&str> = m
                .lines()
                .filter(|l| l.to_ascii_lowercase().starts_with("x-aswl:"))
                .collect();
            assert!(hs.len() <= 1, "one verdict header per copy: {m}");
            hs.first().map_or("-".to_string(), |h| h.to_string())
        })
        .collect()
}

pub fn clear_drops(s: &Server) {
    s.wait_queue_empty();
    for e in std::fs::read_dir(&s.drop_dir)
        .into_iter()
        .flatten()
        .flatten()
    {
        let _ = std::fs::remove_file(e.path());
    }
}

pub fn aswl_cli(s: &Server, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ringmx"))
        .arg("aswl")
        .args(args)
        .args(["--config", &s.dir.join("ringmx.toml").display().to_string()])
        .output()
        .unwrap();
    (
        out.status.success(),
        format!("{}{}", stdout(&out), stderr(&out)),
    )
}

pub fn set_mode(s: &Server, mode: &str) {
    let path = s.dir.join("ringmx.toml");
    let cfg = std::fs::read_to_string(&path).unwrap();
    let mut out = String::new();
    for l in cfg.lines() {
        if l.starts_with("mode = ") {
            out.push_str(&format!("mode = \"{mode}\"\n"));
        } else {
            out.push_str(l);
            out.push('\n');
        }
    }
    s.reconfigure(&out);
}
