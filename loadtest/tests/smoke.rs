//! A small bounded run against a live ringmx (the binary built by the same `cargo test`):
//! pipelined, churn, BDAT without pipelining; every message arrives with its own Message-ID.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn ringmx_bin() -> PathBuf {
    // The workspace's target directory: loadtest's own binary sits next to ringmx's.
    let me = PathBuf::from(env!("CARGO_BIN_EXE_ringmx-loadtest"));
    me.with_file_name("ringmx")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Ringmx(Child, PathBuf);
impl Drop for Ringmx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn start(port: u16) -> Ringmx {
    let dir = std::env::temp_dir().join(format!(
        "ringmx-loadtest-smoke-{}-{port}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = format!(
        r#"
[server]
hostname = "smoke.test"
data_dir = "{d}"
cores = 2
[[binding]]
name = "in"
listen = "127.0.0.1:{port}"
direction = "inbound"
[limits]
max_connections_per_ip = 1000
[domains]
local = ["example.test", "drop.test"]
[admin]
listen = "127.0.0.1:{admin}"
[[route]]
domains = ["drop.test"]
action = "drop"
folder = "{d}/drop"
[[route]]
domains = ["*"]
action = "discard"
"#,
        d = dir.display(),
        admin = free_port()
    );
    std::fs::write(dir.join("ringmx.toml"), cfg).unwrap();
    let bin = ringmx_bin();
    assert!(
        bin.exists(),
        "{} is built by cargo test --workspace",
        bin.display()
    );
    let child = Command::new(bin)
        .args(["run", "--config"])
        .arg(dir.join("ringmx.toml"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "ringmx did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ringmx(child, dir)
}

fn load(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_ringmx-loadtest"))
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{args:?}: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&text).unwrap()
}

#[test]
fn bounded_runs_against_a_live_ringmx() {
    let port = free_port();
    let server = start(port);
    let target = format!("127.0.0.1:{port}");
    let r = load(&["-n", "300", "-c", "10", &target]);
    assert_eq!(
        (r["ok"].as_u64(), r["failed"].as_u64()),
        (Some(300), Some(0)),
        "{r}"
    );
    assert_eq!(r["replies"]["354"], 300);
    assert!(r["latency_us"]["final"]["p99"].as_u64().unwrap() > 0);
    let r = load(&["-n", "200", "-c", "8", "--per-connection", "1", &target]);
    assert_eq!(r["replies"]["220"], 200, "one connection per message: {r}");
    let r = load(&[
        "-n",
        "100",
        "-c",
        "4",
        "--no-pipelining",
        "--bdat",
        "-r",
        "3",
        "-s",
        "300-3000",
        &target,
    ]);
    assert_eq!(r["ok"], 100, "{r}");
    assert_eq!(
        r["replies"]["250"].as_u64(),
        Some(4 + 100 * 5),
        "EHLO, MAIL, 3 RCPT, BDAT: {r}"
    );
    // Open loop at a rate, bounded by time.
    let r = load(&["-d", "1", "--rate", "200", "-c", "4", &target]);
    let ok = r["ok"].as_u64().unwrap();
    assert!(
        (150..=210).contains(&ok),
        "≈200 messages in 1 s at 200/s: {r}"
    );
    // Unique Message-IDs: the drop folder counts them.
    let r = load(&["-n", "120", "-c", "6", "--to-domain", "drop.test", &target]);
    assert_eq!(r["ok"], 120);
    let drop = server.1.join("drop");
    let deadline = Instant::now() + Duration::from_secs(20);
    let ids = loop {
        let ids: std::collections::HashSet<String> = std::fs::read_dir(&drop)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                    .filter_map(|t| {
                        t.lines()
                            .find(|l| l.starts_with("Message-ID:"))
                            .map(String::from)
                    })
                    .collect()
            })
            .unwrap_or_default();
        if ids.len() >= 120 || Instant::now() > deadline {
            break ids;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(ids.len(), 120);
    // Loopback only unless told otherwise.
    let out = Command::new(env!("CARGO_BIN_EXE_ringmx-loadtest"))
        .args(["-n", "1", "192.0.2.1:25"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-remote"));
}
