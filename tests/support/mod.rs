//! Test support: start the real `ringmx` binary on free loopback ports with a generated
//! configuration, and stop it again.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod aswl;

pub const DRIVERS: [&str; 2] = ["auto", "legacy"];

/// A free loopback port (bound and released; the kernel does not hand it out again at once).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A loopback port that refuses connections while the returned socket lives: bound, not
/// listening, so no other test can take it meanwhile (a port picked by `free_port` and left
/// unbound can be, and then answers in another test's place).
pub fn refusing_port() -> (socket2::Socket, u16) {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let port = sock.local_addr().unwrap().as_socket().unwrap().port();
    (sock, port)
}

/// A new empty folder for a test, removed when the guard is dropped (kept when the test
/// panics, to be looked at).
pub fn temp_dir(name: &str) -> TempDir {
    TempDir(fresh_dir(name))
}

pub struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for TempDir {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A new empty folder (whoever holds it removes it).
fn fresh_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "ringmx-test-{name}-{}-{}",
        std::process::id(),
        free_port()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub struct Server {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    pub drop_dir: PathBuf,
    pub driver: &'static str,
}

/// A configuration with an inbound and an outbound binding; `extra` (sections such as
/// `[limits]`, or routes that take precedence over the catch-all drop route) goes after the
/// bindings, `binding_extra` into the inbound binding.
pub fn config(dir: &Path, inbound: u16, outbound: u16, binding_extra: &str, extra: &str) -> String {
    config_with_admin(dir, inbound, outbound, free_port(), binding_extra, extra)
}

pub fn config_with_admin(
    dir: &Path,
    inbound: u16,
    outbound: u16,
    admin: u16,
    binding_extra: &str,
    extra: &str,
) -> String {
    format!(
        r#"
[server]
hostname = "mx.test"
data_dir = "{dir}"
cores = 2
shutdown_timeout = "5s"

[[binding]]
name = "inbound"
listen = "127.0.0.1:{inbound}"
direction = "inbound"
{binding_extra}

[[binding]]
name = "outbound"
listen = "127.0.0.1:{outbound}"
direction = "outbound"
allowed_clients = ["127.0.0.0/8"]

[domains]
local = ["example.test", "example.org"]

[admin]
listen = "127.0.0.1:{admin}"
{extra}

# The catch-all comes last (routes match in order; `extra` may add routes before it).
[[route]]
domains = ["*"]
action = "drop"
folder = "{dir}/drop"
"#,
        dir = dir.display()
    )
}

/// Run `ringmx` on `dir/ringmx.toml`, logging (appended) to `dir/ringmx.log`.
fn spawn(dir: &Path, driver: &str) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("ringmx.log"))
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_ringmx"))
        .args(["run", "--config"])
        .arg(dir.join("ringmx.toml"))
        .args(["--driver", driver])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

impl Server {
    pub fn start(name: &str, driver: &'static str) -> Server {
        Server::start_with(name, driver, "", "")
    }

    pub fn start_with(
        name: &str,
        driver: &'static str,
        binding_extra: &str,
        extra: &str,
    ) -> Server {
        Server::launch(name, driver, binding_extra, extra, false)
    }

    fn launch(
        name: &str,
        driver: &'static str,
        binding_extra: &str,
        extra: &str,
        implicit: bool,
    ) -> Server {
        let dir = fresh_dir(name);
        // Free ports are picked by binding and releasing; a test running in parallel can take
        // one in between. Then ringmx exits at once ("in use"), and we pick again.
        for attempt in 0.. {
            // (A failed attempt's Server removed the directory when dropped.)
            std::fs::create_dir_all(&dir).unwrap();
            let (inbound, outbound, admin) = (free_port(), free_port(), free_port());
            let cfg = config_with_admin(&dir, inbound, outbound, admin, binding_extra, extra);
            std::fs::write(dir.join("ringmx.toml"), cfg).unwrap();
            let mut s = Server {
                child: Some(spawn(&dir, driver)),
                drop_dir: dir.join("drop"),
                dir: dir.clone(),
                inbound: SocketAddr::from(([127, 0, 0, 1], inbound)),
                outbound: SocketAddr::from(([127, 0, 0, 1], outbound)),
                admin: SocketAddr::from(([127, 0, 0, 1], admin)),
                driver,
            };
            // However long the start takes on a busy machine: ready, or exited.
            if s.try_wait_ready(implicit) {
                return s;
            }
            if attempt < 5 && s.log().contains("in use") {
                s.child = None;
                continue;
            }
            panic!("ringmx did not start; log:\n{}", s.log());
        }
        unreachable!()
    }

    /// Start again on the same configuration and data directory (after a stop or a kill).
    pub fn restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // A killed process's io_uring is torn down asynchronously: its listening sockets can
        // outlive it for a moment. Wait until the ports are free.
        let deadline = Instant::now() + Duration::from_secs(10);
        while [self.inbound, self.outbound]
            .iter()
            .any(|a| TcpListener::bind(a).is_err())
        {
            assert!(Instant::now() < deadline, "ports still busy after the stop");
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child = Some(spawn(&self.dir, self.driver));
        self.wait_ready(false);
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Like `start_with`, for an inbound binding that speaks TLS from the first byte: readiness
    /// is checked on the outbound binding only.
    pub fn start_with_tls(name: &str, driver: &'static str, binding_extra: &str) -> Server {
        Server::launch(name, driver, binding_extra, "", true)
    }

    fn wait_ready(&mut self, skip_inbound: bool) {
        if !self.try_wait_ready(skip_inbound) {
            panic!("ringmx did not start; log:\n{}", self.log());
        }
    }

    /// Wait until the bindings answer (true), or the process has exited or 15 s have passed
    /// (false).
    fn try_wait_ready(&mut self, skip_inbound: bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(15);
        for addr in [self.inbound, self.outbound] {
            if skip_inbound && addr == self.inbound {
                continue;
            }
            // A full exchange that ends with QUIT, retried until the greeting is 220, so no
            // probe connection is still open when the test starts.
            loop {
                let exited = self
                    .child
                    .as_mut()
                    .is_some_and(|c| c.try_wait().unwrap().is_some());
                if exited || Instant::now() > deadline {
                    return false;
                }
                if let Ok(s) = TcpStream::connect(addr) {
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let mut c = Raw {
                        r: BufReader::new(s.try_clone().unwrap()),
                        w: s,
                    };
                    if c.reply().starts_with("220") && c.cmd("QUIT\r\n").starts_with("221") {
                        c.rest();
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
        true
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("ringmx.log")).unwrap_or_default()
    }

    /// `ringmx reload` against this server's admin endpoint.
    pub fn reload(&self) -> Output {
        Command::new(env!("CARGO_BIN_EXE_ringmx"))
            .args(["reload", "--admin", &self.admin.to_string()])
            .output()
            .unwrap()
    }

    /// `ringmx ARGS… --admin ADDR` against this server's admin endpoint.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_ringmx"))
            .args(args)
            .args(["--admin", &self.admin.to_string()])
            .output()
            .unwrap()
    }

    /// Write `config` as this server's configuration and reload it; the reload must succeed.
    pub fn reconfigure(&self, config: &str) {
        std::fs::write(self.dir.join("ringmx.toml"), config).unwrap();
        let out = self.reload();
        assert!(out.status.success(), "{}", stderr(&out));
    }

    /// `GET path` on the admin endpoint: (status line, body).
    pub fn admin_get(&self, path: &str) -> (String, String) {
        let mut c = TcpStream::connect(self.admin).unwrap();
        write!(c, "GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", self.admin).unwrap();
        let mut all = String::new();
        c.read_to_string(&mut all).unwrap();
        let (head, body) = all.split_once("\r\n\r\n").unwrap_or((&all, ""));
        (
            head.lines().next().unwrap_or("").to_string(),
            body.to_string(),
        )
    }

    /// Messages in the queue that are active or deferred, from `/metrics`.
    pub fn queued(&self) -> u64 {
        let (_, body) = self.admin_get("/metrics");
        body.lines()
            .filter(|l| {
                l.starts_with("ringmx_queue_messages{state=\"active\"}")
                    || l.starts_with("ringmx_queue_messages{state=\"deferred\"}")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// Wait (up to 20 s) until nothing is active or deferred in the queue (at once when the
    /// server is not running).
    pub fn wait_queue_empty(&self) {
        if TcpStream::connect(self.admin).is_err() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.queued() > 0 {
            assert!(
                Instant::now() < deadline,
                "queue not empty; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The `.eml` files in the drop folder, sorted, once the queue has delivered everything.
    pub fn dropped(&self) -> Vec<String> {
        self.wait_queue_empty();
        let mut v: Vec<PathBuf> = std::fs::read_dir(&self.drop_dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "eml"))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v.iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect()
    }

    /// Send SIGTERM without waiting.
    pub fn sigterm(&self) {
        let child = self.child.as_ref().expect("running");
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    }

    /// SIGTERM, then wait for the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.sigterm();
        self.wait_exit()
    }

    /// Wait for the process to exit.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("ringmx did not stop after SIGTERM; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A self-signed certificate for mx.test in a temporary folder: PEM cert and key, and the same
/// as PKCS#12 with its password file. Removed on drop.
pub struct Certs {
    pub dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub pfx: PathBuf,
    pub pfx_password: PathBuf,
}

impl Certs {
    pub fn new() -> Certs {
        let dir = fresh_dir("certs");
        p256_request(&dir, true, "key.pem", "cert.pem", "/CN=mx.test");
        openssl(
            &dir,
            &[
                "pkcs12",
                "-export",
                "-in",
                "cert.pem",
                "-inkey",
                "key.pem",
                "-out",
                "cert.pfx",
                "-passout",
                "pass:s3cret",
            ],
        );
        std::fs::write(dir.join("pfx-pass"), "s3cret\n").unwrap();
        Certs {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            pfx: dir.join("cert.pfx"),
            pfx_password: dir.join("pfx-pass"),
            dir,
        }
    }

    /// Binding lines for `tls = mode` with the PEM files.
    pub fn pem_binding(&self, mode: &str) -> String {
        format!(
            "tls = \"{mode}\"\ncertificate = \"{}\"\nkey = \"{}\"\n",
            self.cert.display(),
            self.key.display()
        )
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `openssl req` in `dir`: a new P-256 key (`key`, unencrypted) and, for `subject`, either a
/// self-signed certificate valid for two days or a signing request (`out`).
fn p256_request(dir: &Path, self_signed: bool, key: &str, out: &str, subject: &str) {
    let mut args = vec!["req"];
    if self_signed {
        args.extend(["-x509", "-days", "2"]);
    }
    args.extend([
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        key,
        "-out",
        out,
        "-subj",
        subject,
    ]);
    openssl(dir, &args);
}

/// A CA (`ca.pem`) and a leaf certificate for 127.0.0.1 / mx.test signed by it (`leaf.pem`,
/// `leaf.key`) in `dir`.
pub fn ca_and_leaf(dir: &Path) {
    p256_request(dir, true, "ca.key", "ca.pem", "/CN=ringmx test CA");
    p256_request(dir, false, "leaf.key", "leaf.csr", "/CN=mx.test");
    std::fs::write(
        dir.join("ext"),
        "subjectAltName=DNS:mx.test,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "leaf.pem",
            "-days",
            "2",
            "-extfile",
            "ext",
        ],
    );
}

/// Reads Prometheus text on stdin with the Prometheus client library's parser and prints
/// `name,label=value… value` per sample, sorted.
pub const PARSE_METRICS: &str = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
seen = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        key = s.name + "".join(f",{k}={v}" for k, v in sorted(s.labels.items()))
        seen[key] = s.value
for k in sorted(seen):
    print(k, float(seen[k]))
"#;

/// Run `openssl ARGS` in `dir`; panics with its error output when it fails.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed");
    assert!(out.status.success(), "openssl {args:?}: {}", stderr(&out));
}

/// Run `cmd` with `input` on its standard input; returns its output.
pub fn run_with_stdin(cmd: &mut Command, input: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("command starts");
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

/// Run a Python script (with `PORT`, `PORT2` set in its environment); returns its output.
pub fn python(script: &str, port: u16, port2: u16) -> Output {
    Command::new("python3")
        .arg("-c")
        .arg(script)
        .env("PORT", port.to_string())
        .env("PORT2", port2.to_string())
        .output()
        .expect("python3 runs")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// How a test peer is installed (what `./test` runs when it is missing).
fn install_hint(program: &str) -> &'static str {
    match program {
        "smtp-sink" | "smtp-source" => {
            "apt-get install postfix (or run ./test, which installs every peer)"
        }
        "dnsmasq" => "apt-get install dnsmasq-base (or run ./test)",
        "redis-server" | "redis-cli" => "apt-get install redis-server (or run ./test)",
        "swaks" | "openssl" | "curl" => "apt-get install swaks openssl curl (or run ./test)",
        "aiosmtpd" | "prometheus_client" => {
            "python3 -m pip install aiosmtpd prometheus-client (or run ./test)"
        }
        _ => "run ./test, which installs every test peer",
    }
}

/// A command for the test peer `program`; a missing peer fails the test with the command that
/// installs it (never a silent skip).
pub fn peer(program: &str) -> Command {
    let found = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths)
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .any(|d| d.join(program).is_file())
    });
    assert!(
        found,
        "test peer {program:?} is missing: {}",
        install_hint(program)
    );
    Command::new(program)
}

/// Fail with the install command when a Python module the tests use is missing.
pub fn python_module(module: &str) {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "Python module {module:?} is missing: {}",
        install_hint(module)
    );
}

/// A raw SMTP conversation over TCP.
pub struct Raw {
    pub r: BufReader<TcpStream>,
    pub w: TcpStream,
}

impl Raw {
    pub fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        }
    }

    /// One reply (all its lines), e.g. "250-a\r\n250 b\r\n".
    pub fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line).unwrap_or(0) == 0 {
                return all;
            }
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    }

    pub fn send(&mut self, s: &str) {
        self.w.write_all(s.as_bytes()).unwrap();
    }

    pub fn cmd(&mut self, s: &str) -> String {
        self.send(s);
        self.reply()
    }

    /// Pipeline `MAIL FROM:<a@b.test>`, `RCPT TO:<u@example.test>` and `DATA` and check the
    /// three replies (250, 250, 354): the message content comes next.
    pub fn start_data(&mut self) {
        self.send("MAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n");
        for code in ["250", "250", "354"] {
            let r = self.reply();
            assert!(r.starts_with(code), "expected {code}, got {r:?}");
        }
    }

    /// Read until the peer closes; returns what arrived.
    pub fn rest(&mut self) -> String {
        let mut s = String::new();
        let _ = self.r.read_to_string(&mut s);
        s
    }
}

/// The aiosmtpd next hop in `sink.py`, recording every accepted message as a JSON line.
pub struct Sink {
    pub port: u16,
    pub out: PathBuf,
    child: Child,
}

impl Sink {
    /// Start on a free port; `args` are sink.py switches (`--tempfail 1`, `--reject bad`…).
    pub fn start(dir: &Path, args: &[&str]) -> Sink {
        Sink::start_on(dir, free_port(), args)
    }

    pub fn start_on(dir: &Path, port: u16, args: &[&str]) -> Sink {
        python_module("aiosmtpd");
        let out = dir.join(format!("sink-{port}.jsonl"));
        let mut child = Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/support/sink.py"
            ))
            .args(["--port", &port.to_string(), "--out"])
            .arg(&out)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 with aiosmtpd");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "sink did not start");
        Sink { port, out, child }
    }

    /// The records written so far: whole lines only (the sink may be writing the next one, and
    /// a message of a few MiB takes more than one write).
    pub fn records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Wait (up to `secs`) for at least `n` records.
    pub fn wait_for(&self, n: usize, secs: u64) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let r = self.records();
            if r.len() >= n || Instant::now() > deadline {
                return r;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ringmx queue ARGS --admin ADDR`: (success, stdout + stderr).
pub fn queue_cli(s: &Server, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ringmx"))
        .arg("queue")
        .args(args)
        .args(["--admin", &s.admin.to_string()])
        .output()
        .unwrap();
    (
        out.status.success(),
        format!("{}{}", stdout(&out), stderr(&out)),
    )
}

/// dnsmasq on 127.0.0.1 answering only the records given as its options (`--host-record=…`,
/// `--mx-host=…`, `--local=/zone/`); stopped on drop.
#[allow(dead_code)]
pub struct Dnsmasq {
    child: Child,
    pub port: u16,
}

#[allow(dead_code)]
impl Dnsmasq {
    pub fn start(records: &[&str]) -> Dnsmasq {
        let port = free_port();
        let child = peer("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--user=root",
                &format!("--port={port}"),
            ])
            .args(records)
            .stdout(Stdio::null())
            .spawn()
            .expect("dnsmasq starts");
        // Up once it answers on TCP.
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        Dnsmasq { child, port }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
