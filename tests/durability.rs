//! Nothing acknowledged is lost: `kill -9` under load, then restart, and every message that got
//! a 250 reaches the next hop; a full disk gives 452 4.3.1 (never a 250) and the server recovers
//! when space returns.

mod support;

use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{Server, Sink, queue_cli, stderr, temp_dir};

/// Four threads send `N` messages with unique Message-IDs through the outbound binding,
/// reconnecting and resending whatever did not get its 250, and append each accepted id to
/// OUT as soon as the 250 arrives.
const LOAD: &str = r#"
import os, smtplib, threading, time
port, out, n = int(os.environ["PORT"]), os.environ["OUT"], int(os.environ["N"])
deadline = time.time() + 90
lock = threading.Lock()
def worker(k):
    todo = [i for i in range(n) if i % 4 == k]
    s = None
    while todo and time.time() < deadline:
        i = todo[0]
        try:
            if s is None:
                s = smtplib.SMTP("127.0.0.1", port, timeout=10)
            s.sendmail("load@example.test", ["r%d@remote.test" % i],
                       "Message-ID: <crash-%d@t>\r\nSubject: %d\r\n\r\n%s\r\n" % (i, i, "x" * 512))
            with lock, open(out, "a") as f:
                f.write("<crash-%d@t>\n" % i)
            todo.pop(0)
        except Exception:
            try:
                s.close()
            except Exception:
                pass
            s = None
            time.sleep(0.05)
ts = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
[t.start() for t in ts]
[t.join() for t in ts]
"#;

#[test]
fn kill_9_under_load_loses_nothing_that_got_250() {
    let dir = temp_dir("crash");
    let sink = Sink::start(&dir, &[]);
    let extra = format!(
        "[queue]\nretry = [\"1s\"]\n[[route]]\ndomains = [\"remote.test\"]\naction = \"relay\"\nnext_hops = [\"127.0.0.1:{}\"]\ntls = \"none\"\n",
        sink.port
    );
    let mut s = Server::start_with("crash", "auto", "", &extra);
    let accepted = dir.join("accepted");
    let n = 600;
    let load = Command::new("python3")
        .args(["-c", LOAD])
        .env("PORT", s.outbound.port().to_string())
        .env("OUT", &accepted)
        .env("N", n.to_string())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let count = || {
        std::fs::read_to_string(&accepted)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while count() < 150 {
        assert!(
            Instant::now() < deadline,
            "load did not progress\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    s.kill9();
    let at_kill = count();
    std::thread::sleep(Duration::from_millis(300));
    s.restart();
    let out = load.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let acked: HashSet<String> = std::fs::read_to_string(&accepted)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(
        acked.len(),
        n,
        "the client got every message accepted in the end"
    );
    s.wait_queue_empty();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in sink.records() {
        *seen
            .entry(r["message_id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let lost: Vec<&String> = acked.iter().filter(|id| !seen.contains_key(*id)).collect();
    assert!(lost.is_empty(), "lost after a 250: {lost:?}\n{}", s.log());
    let duplicates: usize = seen.values().map(|c| c - 1).sum();
    eprintln!(
        "crash test: {at_kill} acknowledged before kill -9, {n} in total, all delivered; {duplicates} duplicate deliveries (in flight at the kill)"
    );
    assert!(s.log().contains("spool recovered"), "{}", s.log());
}

/// A tmpfs mounted for the test (root only), unmounted when dropped.
struct Tmpfs(std::path::PathBuf);
impl Tmpfs {
    fn mount(path: &std::path::Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(path.to_path_buf()))
    }
}
impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

const SEND_BIG: &str = r#"
import os, smtplib
body = "Subject: big\r\n\r\n" + ("y" * 998 + "\r\n") * 100
with smtplib.SMTP("127.0.0.1", int(os.environ["PORT"]), timeout=20) as s:
    for i in range(int(os.environ["N"])):
        try:
            s.sendmail("a@example.test", ["r@remote.test"], body)
            print("250")
        except smtplib.SMTPResponseException as e:
            print(e.smtp_code, e.smtp_error.decode())
"#;

fn send_big(s: &Server, n: usize) -> Vec<String> {
    let out = Command::new("python3")
        .args(["-c", SEND_BIG])
        .env("PORT", s.outbound.port().to_string())
        .env("N", n.to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    support::stdout(&out).lines().map(String::from).collect()
}

#[test]
fn full_disk_answers_452_and_recovers_when_space_returns() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let dir = temp_dir("disk-full");
    let spool = dir.join("spoolfs");
    let _fs = Tmpfs::mount(&spool, "1m").expect("mount tmpfs");
    let extra = format!(
        "[spool]\ndir = \"{}\"\nsegment_size = \"128KiB\"\n[[route]]\ndomains = [\"remote.test\"]\naction = \"hold\"\n",
        spool.display()
    );
    let mut s = Server::start_with("disk-full", "auto", "", &extra);
    // 100 KB messages into 1 MB: some fit, then 452 4.3.1 — and never a 250 after that.
    let replies = send_big(&s, 14);
    let first_full = replies
        .iter()
        .position(|r| r != "250")
        .unwrap_or_else(|| panic!("never full: {replies:?}"));
    assert!(first_full >= 3, "{replies:?}");
    assert!(
        replies[first_full..]
            .iter()
            .all(|r| r.starts_with("452 4.3.1")),
        "{replies:?}"
    );
    let held: Vec<String> = queue_cli(&s, &["list"])
        .1
        .lines()
        .map(|l| l.split('\t').next().unwrap().to_string())
        .collect();
    assert_eq!(held.len(), first_full, "every 250 is in the queue");
    // Free the space: delete the held messages; their segments go.
    for id in &held {
        assert!(queue_cli(&s, &["delete", id]).0);
    }
    let replies = send_big(&s, 2);
    assert_eq!(replies, ["250", "250"], "{}", s.log());
    // What was acknowledged survives a restart; torn appends from the full disk are skipped.
    s.kill9();
    s.restart();
    let list = queue_cli(&s, &["list"]).1;
    assert_eq!(list.lines().count(), 2, "{list}\n{}", s.log());
    assert!(list.lines().all(|l| l.contains("\theld\t")), "{list}");
    drop(s);
}
