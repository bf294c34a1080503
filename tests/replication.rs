//! The whitelist shared through Redis, end to end: a real `redis-server` (Debian's) on a
//! loopback port and several ringmx processes, each with its own data directory. Mail is sent
//! with Python's smtplib; verdicts are read from delivered copies and from the admin endpoint.

mod support;

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::aswl::*;
use support::*;

/// A `redis-server` with an append-only file, so a restart keeps what it had.
struct Redis {
    port: u16,
    dir: support::TempDir,
    child: Option<Child>,
    /// Extra arguments (TLS, ACL users, cluster mode, stream node size).
    args: Vec<String>,
    tls: bool,
}

impl Redis {
    fn start(name: &str) -> Redis {
        Redis::start_with(name, &[], false)
    }

    /// `tls`: the port is a TLS port (`args` name the certificates).
    fn start_with(name: &str, args: &[&str], tls: bool) -> Redis {
        let mut r = Redis {
            port: free_port(),
            dir: temp_dir(name),
            child: None,
            args: args.iter().map(|a| a.to_string()).collect(),
            tls,
        };
        std::fs::create_dir_all(&r.dir).unwrap();
        r.launch();
        r
    }

    /// Start redis-server and wait until it answers. A server that exits at once (its port
    /// taken by another process since `free_port` chose it) is started again on another port.
    fn launch(&mut self) {
        for _ in 0..3 {
            if self.try_launch() {
                return;
            }
            self.port = free_port();
        }
        panic!(
            "redis-server did not start; its log: {}",
            std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
        );
    }

    fn try_launch(&mut self) -> bool {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("redis.log"))
            .unwrap();
        let port = self.port.to_string();
        let ports: [&str; 4] = if self.tls {
            ["--port", "0", "--tls-port", &port]
        } else {
            ["--port", &port, "--bind", "127.0.0.1"]
        };
        let child = support::peer("redis-server")
            .args(ports)
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let answers = if self.tls {
                TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            } else {
                self.cli(&["PING"]).trim() == "PONG"
            };
            if answers {
                return true;
            }
            if let Some(c) = self.child.as_mut()
                && matches!(c.try_wait(), Ok(Some(_)))
            {
                self.child = None;
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("timed out waiting: redis-server answers on {}", self.port);
    }

    fn cli(&self, args: &[&str]) -> String {
        let o = support::peer("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Until the port refuses connections.
        wait_until(Duration::from_secs(10), "redis-server gone", || {
            TcpStream::connect(("127.0.0.1", self.port)).is_err()
        });
    }

    fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `--user ringmx …`: only keys under `prefix` and the commands replication needs (what the
/// README recommends).
fn acl_user(password: &str, prefix: &str) -> Vec<String> {
    [
        "--user",
        "ringmx",
        "on",
        &format!(">{password}"),
        &format!("~{prefix}*"),
        "resetchannels",
        "-@all",
        "+@stream",
        "+@sortedset",
        "+@hash",
        "+@scripting",
        "+@connection",
        "+exists",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A ringmx node in replication group `prefix` on `redis`.
fn node(name: &str, redis: &Redis, prefix: &str, mode: &str) -> Server {
    node_with(
        name,
        &format!("urls = [\"{}\"]\nprefix = \"{prefix}\"", redis.url()),
        mode,
    )
}

/// A ringmx node with `repl` as the body of `[aswl.replication]`.
fn node_with(name: &str, repl: &str, mode: &str) -> Server {
    let extra = format!(
        "[authentication]\nverify = false\n[aswl]\nmode = \"{mode}\"\nauto_response_window = \"0s\"\n\
         [aswl.replication]\nnode_id = \"{name}\"\n{repl}\n"
    );
    Server::start_with(name, "auto", "", &extra)
}

/// The admin endpoint's verdict for `sender` writing to `rcpt` on `s`.
fn verdict(s: &Server, sender: &str, rcpt: &str) -> String {
    let (status, body) = s.admin_get(&format!(
        "/aswl/check?sender={}&rcpt={}",
        sender.replace('+', "%2B"),
        rcpt.replace('+', "%2B")
    ));
    assert!(status.contains("200"), "{status} {body}");
    if body.contains("verdict: pass") {
        "pass".into()
    } else {
        "none".into()
    }
}

fn wait_verdict(s: &Server, sender: &str, rcpt: &str, want: &str) {
    wait_until(
        Duration::from_secs(30),
        &format!("{sender} -> {rcpt} {want} on {}", s.dir.display()),
        || verdict(s, sender, rcpt) == want,
    );
}

/// `local` mails `remote` (a plain message, one recipient) through `s`.
fn mail(s: &Server, local: &str, remote: &str) {
    outbound(s, local, &[remote], "{'Subject': 'x'}");
}

/// `local` mails `{tag}{i}@remote.test` for each i, one message each, through `s`.
fn learn(s: &Server, local: &str, tag: &str, range: std::ops::Range<usize>) {
    for i in range {
        mail(s, local, &format!("{tag}{i}@remote.test"));
    }
}

/// Wait until `s` says `pass` for every `{tag}{i}@remote.test` writing to `local`.
fn wait_learned(s: &Server, local: &str, tag: &str, range: std::ops::Range<usize>) {
    for i in range {
        wait_verdict(s, &format!("{tag}{i}@remote.test"), local, "pass");
    }
}

fn stats(s: &Server) -> String {
    s.admin_get("/aswl/stats").1
}

/// A gauge or counter from `/metrics`.
fn metric(s: &Server, name: &str) -> u64 {
    let (_, m) = s.admin_get("/metrics");
    m.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{m}"))
}

fn records(s: &Server) -> u64 {
    metric(s, "ringmx_aswl_records")
}

#[test]
fn a_reply_through_another_node_passes_in_every_mode() {
    let redis = Redis::start("repl-modes-redis");
    for mode in ["global", "per-domain", "per-recipient"] {
        let prefix = format!("modes-{mode}:");
        let a = node(&format!("repl-{mode}-a"), &redis, &prefix, mode);
        let b = node(&format!("repl-{mode}-b"), &redis, &prefix, mode);
        let c = node(&format!("repl-{mode}-c"), &redis, &prefix, mode);
        outbound(
            &a,
            "alice@example.test",
            &["bob@remote.test"],
            "{'Subject': 'hi'}",
        );
        for n in [&b, &c] {
            wait_verdict(n, "bob@remote.test", "alice@example.test", "pass");
            inbound(
                n,
                "bob@remote.test",
                &[
                    "alice@example.test",
                    "carol@example.test",
                    "dave@example.org",
                ],
            );
            inbound(n, "eve@remote.test", &["alice@example.test"]);
            n.wait_queue_empty();
            let want = |pass: bool| {
                vec![format!(
                    "X-ASWL: {} mode={mode}",
                    if pass { "pass" } else { "none" }
                )]
            };
            assert_eq!(
                verdicts(n, "bob@remote.test", "alice@example.test"),
                want(true)
            );
            assert_eq!(
                verdicts(n, "bob@remote.test", "carol@example.test"),
                want(mode != "per-recipient")
            );
            assert_eq!(
                verdicts(n, "bob@remote.test", "dave@example.org"),
                want(mode == "global")
            );
            assert_eq!(
                verdicts(n, "eve@remote.test", "alice@example.test"),
                want(false)
            );
        }
        // A learned it itself and does not apply its own records twice.
        assert_eq!(verdict(&a, "bob@remote.test", "alice@example.test"), "pass");
        assert_eq!(metric(&a, "ringmx_aswl_replication_applied_total"), 0);
        assert!(metric(&b, "ringmx_aswl_replication_applied_total") >= 1);
        assert!(
            stats(&b).contains("replication: node repl-"),
            "{}",
            stats(&b)
        );
        // The replication families parse with the Prometheus client library.
        support::python_module("prometheus_client");
        let parsed = run_with_stdin(
            Command::new("python3").args(["-c", PARSE_METRICS]),
            b.admin_get("/metrics").1.as_bytes(),
        );
        assert!(parsed.status.success(), "{}", stderr(&parsed));
        let m = stdout(&parsed);
        for want in [
            "ringmx_aswl_replication_connected 1.0\n",
            "ringmx_aswl_replication_applied_total 1.0\n",
            "ringmx_aswl_replication_outbox_records 0.0\n",
            "ringmx_aswl_replication_apply_delay_milliseconds,quantile=0.99 ",
        ] {
            assert!(m.contains(want), "{want} in {m}");
        }
    }
}

/// Redis stopped while mail flows, then back; a node joining later; `kill -9`; removal.
#[test]
fn every_record_reaches_every_node_through_outage_join_crash_and_removal() {
    let mut redis = Redis::start("repl-life-redis");
    let p = "life:";
    let mut a = node("repl-life-a", &redis, p, "per-recipient");
    let mut b = node("repl-life-b", &redis, p, "per-recipient");
    let mut c = node("repl-life-c", &redis, p, "per-recipient");

    // Redis goes away; both A and B keep answering 250 and keep what they learn.
    redis.stop();
    learn(&a, "alice@example.test", "r", 0..20);
    learn(&b, "bob@example.org", "s", 0..5);
    wait_until(Duration::from_secs(10), "A's outbox holds 20", || {
        metric(&a, "ringmx_aswl_replication_outbox_records") == 20
    });
    assert_eq!(metric(&a, "ringmx_aswl_replication_connected"), 0);
    assert!(stats(&a).contains("Redis unreachable"), "{}", stats(&a));

    redis.launch();
    for n in [&b, &c] {
        wait_learned(n, "alice@example.test", "r", 0..20);
    }
    for n in [&a, &c] {
        wait_learned(n, "bob@example.org", "s", 0..5);
    }
    wait_until(Duration::from_secs(10), "A's outbox empty", || {
        metric(&a, "ringmx_aswl_replication_outbox_records") == 0
    });

    // A fourth node, started empty, bootstraps every record.
    let d = node("repl-life-d", &redis, p, "per-recipient");
    wait_until(Duration::from_secs(30), "D holds all 25 records", || {
        records(&d) == 25
    });
    // The counter moves once the bootstrap's position is saved, after the last record.
    wait_until(Duration::from_secs(10), "D counted its bootstrap", || {
        metric(&d, "ringmx_aswl_replication_bootstraps_total") == 1
    });
    wait_learned(&d, "alice@example.test", "r", 0..20);
    inbound(&d, "r7@remote.test", &["alice@example.test"]);
    d.wait_queue_empty();
    assert_eq!(
        verdicts(&d, "r7@remote.test", "alice@example.test"),
        ["X-ASWL: pass mode=per-recipient"]
    );

    // B killed while A keeps learning; restarted, it resumes from its position.
    b.kill9();
    learn(&a, "alice@example.test", "r", 20..30);
    b.restart();
    wait_learned(&b, "alice@example.test", "r", 20..30);
    assert_eq!(records(&b), 35, "no gaps, no extra records");
    assert_eq!(
        metric(&b, "ringmx_aswl_replication_bootstraps_total"),
        0,
        "resumed, not bootstrapped again"
    );

    // A killed right after the 250s: what it learned still reaches the others.
    learn(&a, "alice@example.test", "r", 30..35);
    a.kill9();
    a.restart();
    for n in [&b, &c, &d] {
        wait_learned(n, "alice@example.test", "r", 30..35);
    }
    for n in [&a, &b, &c, &d] {
        wait_until(Duration::from_secs(10), "40 records everywhere", || {
            records(n) == 40
        });
    }

    // Removal on C removes everywhere; the rest stays.
    let (ok, out) = aswl_cli(
        &c,
        &["remove", "r3@remote.test", "--local", "alice@example.test"],
    );
    assert!(ok && out.contains("removed 1"), "{out}");
    let (ok, out) = aswl_cli(&c, &["remove", "s1@remote.test"]);
    assert!(ok && out.contains("removed 1"), "{out}");
    for n in [&a, &b, &d] {
        wait_verdict(n, "r3@remote.test", "alice@example.test", "none");
        wait_verdict(n, "s1@remote.test", "bob@example.org", "none");
        assert_eq!(verdict(n, "r4@remote.test", "alice@example.test"), "pass");
        assert_eq!(records(n), 38);
    }
    // A node joining now does not get the removed records back from Redis.
    let e = node("repl-life-e", &redis, p, "per-recipient");
    wait_until(Duration::from_secs(30), "E holds 38 records", || {
        records(&e) == 38
    });
    assert_eq!(verdict(&e, "r3@remote.test", "alice@example.test"), "none");
    // Mail after a removal whitelists again, everywhere. (Times are in seconds: a removal
    // covers what was last sent in its own second, so the new mail comes a second later.)
    std::thread::sleep(Duration::from_millis(1100));
    outbound(
        &b,
        "alice@example.test",
        &["r3@remote.test"],
        "{'Subject': 'again'}",
    );
    for n in [&a, &c, &d, &e] {
        wait_verdict(n, "r3@remote.test", "alice@example.test", "pass");
    }

    // A change made offline on a stopped node goes out when it starts again.
    c.stop();
    let (ok, out) = aswl_cli(
        &c,
        &[
            "remove",
            "r5@remote.test",
            "--local",
            "alice@example.test",
            "--offline",
        ],
    );
    assert!(ok && out.contains("removed 1"), "{out}");
    c.restart();
    for n in [&a, &b, &d, &e] {
        wait_verdict(n, "r5@remote.test", "alice@example.test", "none");
    }
}

/// A node that was down while the stream was trimmed past its position bootstraps again; a
/// full outbox (Redis down too long) is made good by republishing from the whitelist.
#[test]
fn trimmed_stream_and_full_outbox_lose_nothing() {
    // Small stream nodes so `MAXLEN ~` trims at this scale.
    let mut redis = Redis::start_with(
        "repl-trim-redis",
        &["--stream-node-max-entries", "2"],
        false,
    );
    let repl = format!(
        "urls = [\"{}\"]\nprefix = \"trim:\"\nstream_max_len = 4\noutbox_limit = 5",
        redis.url()
    );
    let a = node_with("repl-trim-a", &repl, "per-recipient");
    let mut b = node_with("repl-trim-b", &repl, "per-recipient");
    mail(&a, "alice@example.test", "first@remote.test");
    wait_verdict(&b, "first@remote.test", "alice@example.test", "pass");
    b.kill9();

    redis.stop();
    learn(&a, "alice@example.test", "o", 0..12);
    wait_until(Duration::from_secs(10), "A's outbox overflowed", || {
        stats(&a).contains("dropped when full")
            && metric(&a, "ringmx_aswl_replication_outbox_records") <= 5
    });
    redis.launch();
    // One entry per message from here on: the stream is trimmed well past B's position.
    for i in 0..12 {
        mail(&a, "alice@example.test", &format!("t{i}@remote.test"));
        std::thread::sleep(Duration::from_millis(30));
    }
    wait_until(Duration::from_secs(10), "A's outbox empty", || {
        metric(&a, "ringmx_aswl_replication_outbox_records") == 0
    });
    let len: u64 = redis
        .cli(&["XLEN", "trim:{stream}"])
        .trim()
        .parse()
        .unwrap();
    assert!(len < 12, "the stream is trimmed ({len} entries)");

    b.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    while records(&b) != 25 {
        assert!(
            Instant::now() < deadline,
            "B holds all 25 records:\n{}",
            stats(&b)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The bootstrap is counted after its records are applied: wait for the count too.
    wait_until(Duration::from_secs(10), "B counted its bootstrap", || {
        metric(&b, "ringmx_aswl_replication_bootstraps_total") >= 1
    });
    assert_eq!(
        metric(&b, "ringmx_aswl_replication_bootstraps_total"),
        1,
        "{}",
        stats(&b)
    );
    wait_learned(&b, "alice@example.test", "o", 0..12);
    wait_learned(&b, "alice@example.test", "t", 0..12);
    assert!(metric(&a, "ringmx_aswl_replication_published_total") >= 25);
}

/// `rediss://` with a private CA, an ACL user with a password file; a wrong password is an
/// error in the stats, not a stop.
#[test]
fn tls_and_acl_user() {
    let certs = temp_dir("repl-tls-certs");
    std::fs::create_dir_all(&certs).unwrap();
    ca_and_leaf(&certs);
    let p = |f: &str| certs.join(f).display().to_string();
    let mut args = vec![
        "--tls-cert-file".to_string(),
        p("leaf.pem"),
        "--tls-key-file".into(),
        p("leaf.key"),
        "--tls-ca-cert-file".into(),
        p("ca.pem"),
        "--tls-auth-clients".into(),
        "no".into(),
        "--user".into(),
        "default".into(),
        "off".into(),
    ];
    args.extend(acl_user("s3cret-pw", "tls:"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let redis = Redis::start_with("repl-tls-redis", &args, true);
    std::fs::write(certs.join("pw"), "s3cret-pw\n").unwrap();
    std::fs::write(certs.join("bad-pw"), "wrong\n").unwrap();
    let repl = |pw: &str| {
        format!(
            "urls = [\"{}\"]\nprefix = \"tls:\"\nusername = \"ringmx\"\npassword_file = \"{}\"\ntls_ca_file = \"{}\"",
            redis.url(),
            p(pw),
            p("ca.pem")
        )
    };
    let a = node_with("repl-tls-a", &repl("pw"), "per-recipient");
    let b = node_with("repl-tls-b", &repl("pw"), "per-recipient");
    let bad = node_with("repl-tls-bad", &repl("bad-pw"), "per-recipient");
    mail(&a, "alice@example.test", "bob@remote.test");
    wait_verdict(&b, "bob@remote.test", "alice@example.test", "pass");
    assert_eq!(metric(&b, "ringmx_aswl_replication_connected"), 1);
    wait_until(
        Duration::from_secs(10),
        "the bad password is reported",
        || {
            let s = stats(&bad);
            s.contains("Redis unreachable") && s.contains("last: connecting to Redis")
        },
    );
    // Still serving mail, still learning locally.
    mail(&bad, "carol@example.test", "dan@remote.test");
    assert_eq!(
        verdict(&bad, "dan@remote.test", "carol@example.test"),
        "pass"
    );
    assert_eq!(
        verdict(&bad, "bob@remote.test", "alice@example.test"),
        "none"
    );
    let _ = std::fs::remove_dir_all(&certs);
}

/// Redis Cluster: three masters on loopback; every command names one hash slot.
#[test]
fn redis_cluster() {
    let acl = acl_user("cl-pw", "cl:");
    let shards: Vec<Redis> = (0..3)
        .map(|i| {
            Redis::start_with(
                &format!("repl-cluster-{i}"),
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                ]
                .into_iter()
                .chain(acl.iter().map(String::as_str))
                .chain(["+cluster|slots", "+cluster|shards"])
                .collect::<Vec<_>>(),
                false,
            )
        })
        .collect();
    let addrs: Vec<String> = shards
        .iter()
        .map(|r| format!("127.0.0.1:{}", r.port))
        .collect();
    let o = support::peer("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    for r in &shards {
        wait_until(Duration::from_secs(20), "cluster_state:ok", || {
            r.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok")
        });
    }
    let urls: Vec<String> = shards.iter().map(|r| format!("\"{}\"", r.url())).collect();
    let pw = shards[0].dir.join("pw");
    std::fs::write(&pw, "cl-pw\n").unwrap();
    let repl = format!(
        "urls = [{}]\ncluster = true\nprefix = \"cl:\"\nusername = \"ringmx\"\npassword_file = \"{}\"",
        urls.join(", "),
        pw.display()
    );
    let a = node_with("repl-cluster-a", &repl, "per-domain");
    let b = node_with("repl-cluster-b", &repl, "per-domain");
    learn(&a, "alice@example.test", "c", 0..10);
    wait_learned(&b, "zed@example.test", "c", 0..10);
    let (ok, out) = aswl_cli(&b, &["remove", "c4@remote.test"]);
    assert!(ok && out.contains("removed 1"), "{out}");
    wait_verdict(&a, "c4@remote.test", "alice@example.test", "none");
    let c = node_with("repl-cluster-c", &repl, "per-domain");
    wait_until(Duration::from_secs(30), "C bootstraps 9 records", || {
        records(&c) == 9
    });
    // The per-record sets are spread over the shards.
    let holding = shards
        .iter()
        .filter(|r| r.cli(&["DBSIZE"]).trim().parse::<u64>().unwrap_or(0) > 0)
        .count();
    assert!(holding >= 2, "keys on {holding} shard(s)");
}

/// The per-record entries in Redis expire with the lifetime (every node's housekeeping), so a
/// node joining later does not bootstrap expired records.
#[test]
fn redis_entries_expire_with_the_lifetime() {
    let redis = Redis::start("repl-expiry-redis");
    let extra = |name: &str| {
        format!(
            "[authentication]\nverify = false\n[aswl]\nmode = \"per-recipient\"\nlifetime = \"3s\"\nsweep_interval = \"500ms\"\n\
             [aswl.replication]\nnode_id = \"{name}\"\nurls = [\"{}\"]\nprefix = \"exp:\"\n",
            redis.url()
        )
    };
    let a = Server::start_with("repl-expiry-a", "auto", "", &extra("a"));
    let b = Server::start_with("repl-expiry-b", "auto", "", &extra("b"));
    mail(&a, "alice@example.test", "bob@remote.test");
    wait_verdict(&b, "bob@remote.test", "alice@example.test", "pass");
    let in_redis = || -> u64 {
        redis
            .cli(&["--scan", "--pattern", "exp:*set"])
            .lines()
            .map(|k| redis.cli(&["ZCARD", k]).trim().parse::<u64>().unwrap())
            .sum()
    };
    assert_eq!(in_redis(), 1);
    wait_until(Duration::from_secs(15), "expired in Redis", || {
        in_redis() == 0
    });
    wait_verdict(&b, "bob@remote.test", "alice@example.test", "none");
    let c = Server::start_with("repl-expiry-c", "auto", "", &extra("c"));
    wait_until(Duration::from_secs(10), "C bootstrapped", || {
        metric(&c, "ringmx_aswl_replication_bootstraps_total") == 1
    });
    assert_eq!(records(&c), 0);
}

/// `[rates] fleet = true`: two nodes count one client network's connections together through
/// one `redis-server`; the node that did not see the first ones refuses once the fleet's count
/// reaches the limit. With Redis gone, each node's own limit still holds.
#[test]
fn fleet_wide_rate_limits() {
    const CONNECT: &str = r#"
import os, smtplib, sys, time
src, n = sys.argv[1], int(sys.argv[2])
for _ in range(n):
    try:
        with smtplib.SMTP("127.0.0.1", int(os.environ["PORT"]), source_address=(src, 0), timeout=10) as s:
            print(s.noop()[0])
    except smtplib.SMTPConnectError as e:
        print(e.smtp_code)
"#;
    let connect = |s: &Server, src: &str, n: usize| -> Vec<String> {
        let out = run_with_stdin(
            Command::new("python3")
                .args(["-c", CONNECT, src, &n.to_string()])
                .env("PORT", s.inbound.port().to_string()),
            b"",
        );
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out).lines().map(str::to_string).collect()
    };
    // The fleet counts per Unix minute: keep the test inside one.
    let second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        % 60;
    if second > 40 {
        std::thread::sleep(Duration::from_secs(61 - second));
    }
    let mut redis = Redis::start("fleet-redis");
    let node = |name: &str| {
        Server::start_with(
            name,
            "auto",
            "",
            &format!(
                "[rates]\nconnections_per_minute = 4\nburst_percent = 100\nfleet = true\n\
                 [authentication]\nverify = false\n[aswl]\n[aswl.replication]\nnode_id = \"{name}\"\nurls = [\"{}\"]\n\
                 prefix = \"fleet:\"\n",
                redis.url()
            ),
        )
    };
    let a = node("fleet-a");
    let b = node("fleet-b");
    let fleet_count = |redis: &Redis| -> u64 {
        let keys = redis.cli(&["--raw", "KEYS", "fleet:rate:0:127.0.0.2:*"]);
        keys.lines().next().map_or(0, |k| {
            redis.cli(&["--raw", "GET", k]).trim().parse().unwrap_or(0)
        })
    };
    assert_eq!(connect(&a, "127.0.0.2", 4), ["250", "250", "250", "250"]);
    wait_until(Duration::from_secs(10), "node a's count in Redis", || {
        fleet_count(&redis) == 4
    });
    // Node b has its own allowance of 4, but the fleet has used it: its first connection
    // tells it so, and the next is refused.
    assert_eq!(connect(&b, "127.0.0.2", 1), ["250"]);
    wait_until(Duration::from_secs(10), "node b's count in Redis", || {
        fleet_count(&redis) == 5
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(connect(&b, "127.0.0.2", 1), ["421"]);
    let why = stdout(&b.cli(&["why", "127.0.0.2"]));
    assert!(why.contains("5 fleet-wide this minute"), "{why}");
    // Redis gone: the local limit is the fallback, and nobody waits for Redis.
    redis.stop();
    let started = Instant::now();
    assert_eq!(
        connect(&b, "127.0.0.3", 5),
        ["250", "250", "250", "250", "421"]
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}
