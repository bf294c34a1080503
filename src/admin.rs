//! The local admin endpoint: a deliberately small HTTP/1.1 server on its own thread (it never
//! runs on a core). `GET /metrics` (Prometheus text), `GET /healthz`, `POST /reload`, and the
//! queue API behind `ringmx queue`: `GET /queue`, `GET /queue/ID`, `POST /queue/flush[/ID]`,
//! `POST /queue/ID/delete|hold|release`, and the whitelist API behind `ringmx aswl`
//! (`/aswl/stats|check|list|export|add|remove|import`, see [`crate::aswl::admin`]).

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )
)]

use std::cell::Cell;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::aswl::Aswl;
use crate::config::AdminSection;
use crate::delivery::QueueOp;

/// The running server as the endpoint sees it: a narrow handle, implemented by the runtime
/// and handed to [`start`] by `main`.
pub trait Server: Send + Sync {
    /// The server is stopping (health checks fail, connections are refused).
    fn stopping(&self) -> bool;
    /// The endpoint's live settings and tokens (they change on reload).
    fn access(&self) -> (Arc<AdminSection>, Arc<Vec<String>>);
    /// Prometheus text for `/metrics`, without the whitelist's part.
    fn metrics(&self) -> String;
    /// The whitelist and its live settings, when it is enabled.
    fn aswl(&self) -> Option<(Arc<Aswl>, Arc<crate::aswl::Settings>)>;
    /// Reload the configuration; the new generation or why it was refused.
    fn reload(&self) -> Result<u64, String>;
    /// Ask every core's queue; one answer per core.
    fn queue(&self, op: QueueOp) -> Vec<String>;
    /// What the caches and counters hold about a client (`ringmx why`); `forget` drops the
    /// greeting test's and the DNS lists' memory of it.
    fn client(&self, ip: std::net::IpAddr, forget: bool) -> String;
}

/// Requests served at once; more are answered `503` at once (a slow client cannot hold the
/// endpoint: each request has its own thread and deadlines).
const MAX_CONCURRENT: usize = 16;
/// Request line and each header line.
const MAX_LINE: u64 = 8 * 1024;
const MAX_HEADERS: usize = 64;
/// Time to complete the TLS handshake and send the request line and headers.
const HEAD_DEADLINE: Duration = Duration::from_secs(10);
/// Time for a body, plus a second per MiB.
const BODY_DEADLINE: Duration = Duration::from_secs(30);
/// A whitelist import of 10 M records is about 500 MB.
const MAX_BODY: u64 = 1 << 30;

/// Bind the endpoint (errors name the address) and serve it on a new thread, over HTTPS when
/// `tls` is given.
pub fn start(
    addr: SocketAddr,
    shared: Arc<dyn Server>,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let listener = TcpListener::bind(addr)?;
    let busy = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("ringmx-admin".into())
        .spawn(move || {
            for stream in listener.incoming() {
                if shared.stopping() {
                    return;
                }
                let Ok(s) = stream else { continue };
                if busy.fetch_add(1, Ordering::SeqCst) >= MAX_CONCURRENT {
                    busy.fetch_sub(1, Ordering::SeqCst);
                    // Over TLS a plain answer would not be read: just close.
                    if tls.is_none() {
                        let mut s = s;
                        let busy = ("503 Service Unavailable", "text/plain", "busy\n".into());
                        let _ = respond(&mut s, busy);
                    }
                    continue;
                }
                let (shared, done, tls) = (shared.clone(), busy.clone(), tls.clone());
                let spawned = std::thread::Builder::new()
                    .name("ringmx-admin-req".into())
                    .spawn(move || {
                        let _ = accept(s, addr, &*shared, tls);
                        done.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    busy.fetch_sub(1, Ordering::SeqCst);
                }
            }
        })
}

/// What the endpoint needs to know about a request before acting on it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    pub path: String,
    pub host: Option<String>,
    pub origin: Option<String>,
    pub content_type: Option<String>,
    pub authorization: Option<String>,
    pub content_length: u64,
}

/// Who may do what: the listen address, extra Host names, bearer tokens.
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    pub listen: SocketAddr,
    pub allowed_hosts: &'a [String],
    pub tokens: &'a [String],
    pub open_metrics: bool,
}

/// One line of at most `MAX_LINE` bytes, without its line end; errors past the deadline.
fn read_line(r: &mut impl BufRead, deadline: Instant) -> Result<String, Response> {
    if Instant::now() > deadline {
        return Err(("408 Request Timeout", "text/plain", "too slow\n".into()));
    }
    let mut line = Vec::new();
    let n = r
        .by_ref()
        .take(MAX_LINE)
        .read_until(b'\n', &mut line)
        .map_err(|_| ("408 Request Timeout", "text/plain", "read failed\n".into()))?;
    if n as u64 >= MAX_LINE && !line.ends_with(b"\n") {
        return Err(bad("request line or header too long"));
    }
    while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| bad("request not UTF-8"))
}

fn bad(why: &str) -> Response {
    ("400 Bad Request", "text/plain", format!("{why}\n"))
}

/// Read the request line and headers, bounded in size and time.
pub fn read_head(r: &mut impl BufRead) -> Result<Head, Response> {
    let deadline = Instant::now() + HEAD_DEADLINE;
    let request = read_line(r, deadline)?;
    let mut parts = request.split_whitespace();
    let mut head = Head {
        method: parts.next().unwrap_or("").to_string(),
        path: parts.next().unwrap_or("").to_string(),
        ..Head::default()
    };
    for n in 0.. {
        let line = read_line(r, deadline)?;
        if line.is_empty() {
            break;
        }
        if n >= MAX_HEADERS {
            return Err(bad("too many headers"));
        }
        let Some((k, v)) = line.split_once(':') else {
            return Err(bad("malformed header"));
        };
        // Optional whitespace is SP and HTAB only (RFC 9110 §5.6.3).
        let v = v.trim_matches([' ', '\t']).to_string();
        match k.trim().to_ascii_lowercase().as_str() {
            "host" if head.host.is_some() => return Err(bad("more than one Host")),
            "host" => head.host = Some(v),
            "origin" => head.origin = Some(v),
            "content-type" => head.content_type = Some(v),
            "authorization" => head.authorization = Some(v),
            "content-length" => {
                head.content_length = v.parse().map_err(|_| bad("bad Content-Length"))?;
            }
            "transfer-encoding" => return Err(bad("Transfer-Encoding is not supported")),
            _ => {}
        }
    }
    Ok(head)
}

/// Names under which the endpoint may be addressed (checked against Host and Origin): its
/// listen address, and for a loopback listen `localhost`, `127.0.0.1` and `[::1]`, each with
/// the port; plus `allowed_hosts` with or without the port. Anything else is a DNS-rebinding
/// attempt or a misdirected request.
fn host_allowed(host: &str, p: &Policy<'_>) -> bool {
    let port = p.listen.port();
    let host = host.to_ascii_lowercase();
    let listen = match p.listen.ip() {
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
        v4 => format!("{v4}:{port}"),
    };
    if host == listen {
        return true;
    }
    if p.listen.ip().is_loopback()
        && ["localhost", "127.0.0.1", "[::1]"]
            .iter()
            .any(|n| host == format!("{n}:{port}"))
    {
        return true;
    }
    p.allowed_hosts.iter().any(|a| {
        let a = a.to_ascii_lowercase();
        host == a || host == format!("{a}:{port}")
    })
}

/// Compare without stopping at the first difference (the token is a secret).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether the request may go on. `/healthz` is always open. With tokens configured, every
/// other path (and `/metrics` unless `open_metrics`) needs `Authorization: Bearer TOKEN`.
/// Host must name this endpoint and an Origin, when sent, must be one of its names (a page
/// elsewhere in the operator's browser, or a DNS-rebinding page, is refused). A POST needs a
/// non-simple Content-Type or a token, so a cross-site form cannot send one without a CORS
/// preflight, which this endpoint never grants.
pub fn authorize(h: &Head, p: &Policy<'_>) -> Result<(), Response> {
    let path = h.path.split('?').next().unwrap_or("");
    if path == "/healthz" {
        return Ok(());
    }
    let forbidden = |why: &str| -> Response { ("403 Forbidden", "text/plain", format!("{why}\n")) };
    let token_ok = h
        .authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("Bearer "))
        .is_some_and(|t| p.tokens.iter().any(|k| same(k.as_bytes(), t.as_bytes())));
    let open = p.tokens.is_empty() || (p.open_metrics && path == "/metrics");
    if !open && !token_ok {
        return Err((
            "401 Unauthorized",
            "text/plain",
            "a bearer token is required (Authorization: Bearer …)\n".into(),
        ));
    }
    match h.host.as_deref() {
        None => return Err(bad("Host is required")),
        Some(host) if !token_ok && !host_allowed(host, p) => {
            return Err(forbidden("Host does not name this endpoint"));
        }
        _ => {}
    }
    if let Some(origin) = h.origin.as_deref() {
        let host = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        if !host.is_some_and(|o| host_allowed(o, p)) {
            return Err(forbidden("cross-origin requests are refused"));
        }
    }
    if h.method == "POST" && !token_ok {
        let simple = h.content_type.as_deref().is_none_or(|c| {
            let c = c
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            matches!(
                c.as_str(),
                "" | "application/x-www-form-urlencoded" | "multipart/form-data" | "text/plain"
            )
        });
        if simple {
            return Err(forbidden(
                "POST needs Content-Type: application/octet-stream (or a token)",
            ));
        }
    }
    Ok(())
}

fn respond(w: &mut impl Write, (status, ctype, body): Response) -> std::io::Result<()> {
    let auth = if status.starts_with("401") {
        "WWW-Authenticate: Bearer realm=\"ringmx\"\r\n"
    } else {
        ""
    };
    write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{auth}Connection: close\r\n\r\n{body}",
        body.len()
    )?;
    w.flush()
}

/// A socket whose reads may only wait until a deadline, whatever trickles in: the time left
/// becomes the read timeout before each read (a byte every few seconds cannot hold a request,
/// or the TLS handshake, open).
struct Deadline<'a> {
    tcp: TcpStream,
    until: &'a Cell<Instant>,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.until.get().saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.tcp.set_read_timeout(Some(left))?;
        self.tcp.read(buf)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tcp.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.tcp.flush()
    }
}

/// One connection: the handshake and the request head within [`HEAD_DEADLINE`], then the
/// request in plain text or inside TLS.
fn accept(
    stream: TcpStream,
    listen: SocketAddr,
    shared: &dyn Server,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> std::io::Result<()> {
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    let until = Cell::new(Instant::now() + HEAD_DEADLINE);
    let tcp = Deadline {
        tcp: stream,
        until: &until,
    };
    match tls {
        None => handle(tcp, &until, listen, shared),
        Some(cfg) => {
            let conn = rustls::ServerConnection::new(cfg).map_err(std::io::Error::other)?;
            let mut s = rustls::StreamOwned::new(conn, tcp);
            handle(&mut s, &until, listen, shared)?;
            s.conn.send_close_notify();
            s.flush()
        }
    }
}

fn handle(
    stream: impl Read + Write,
    until: &Cell<Instant>,
    listen: SocketAddr,
    shared: &dyn Server,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    let (cfg, tokens) = shared.access();
    let policy = Policy {
        listen,
        allowed_hosts: &cfg.allowed_hosts,
        tokens: &tokens,
        open_metrics: cfg.open_metrics,
    };
    let head = match read_head(&mut reader).and_then(|h| authorize(&h, &policy).map(|()| h)) {
        Ok(h) => h,
        Err(r) => return respond(reader.get_mut(), r),
    };
    if head.content_length > MAX_BODY {
        return respond(
            reader.get_mut(),
            (
                "413 Payload Too Large",
                "text/plain",
                format!("request bodies are limited to {MAX_BODY} bytes\n"),
            ),
        );
    }
    // Only a whitelist import has a body; it grows as bytes arrive (a declared length alone
    // allocates nothing), with 30 s plus a second per MiB to arrive.
    let takes_body = head.method == "POST" && head.path.split('?').next() == Some("/aswl/import");
    if head.content_length > 0 && !takes_body {
        let r = (
            "413 Payload Too Large",
            "text/plain",
            "this request takes no body\n".into(),
        );
        return respond(reader.get_mut(), r);
    }
    let mut body = Vec::new();
    if head.content_length > 0 {
        until.set(Instant::now() + BODY_DEADLINE + Duration::from_secs(head.content_length >> 20));
        reader
            .by_ref()
            .take(head.content_length)
            .read_to_end(&mut body)?;
        if (body.len() as u64) < head.content_length {
            return respond(reader.get_mut(), bad("body shorter than Content-Length"));
        }
    }
    let (method, path) = (head.method.as_str(), head.path.as_str());
    let response = match (method, path) {
        ("GET", "/metrics") => {
            let mut m = shared.metrics();
            if let Some((a, _)) = shared.aswl() {
                crate::aswl::admin::metrics(&a, &mut m);
            }
            ("200 OK", "text/plain; version=0.0.4", m)
        }
        ("GET", "/healthz") => {
            if shared.stopping() {
                (
                    "503 Service Unavailable",
                    "text/plain",
                    "stopping\n".to_string(),
                )
            } else {
                ("200 OK", "text/plain", "ok\n".to_string())
            }
        }
        ("POST", "/reload") => match shared.reload() {
            Ok(g) => (
                "200 OK",
                "text/plain",
                format!("reloaded (generation {g})\n"),
            ),
            Err(e) => ("400 Bad Request", "text/plain", format!("{e}\n")),
        },
        (m, p) if p.starts_with("/queue") => queue(shared, m, p),
        (m, p) if p.starts_with("/client/") => client(shared, m, p),
        (m, p) if p.starts_with("/aswl") => aswl(shared, m, p, &body),
        (_, "/metrics" | "/healthz" | "/reload") => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".into(),
        ),
        _ => ("404 Not Found", "text/plain", "not found\n".into()),
    };
    respond(reader.get_mut(), response)
}

pub type Response = (&'static str, &'static str, String);

fn aswl(shared: &dyn Server, method: &str, path: &str, body: &[u8]) -> Response {
    use crate::aswl::admin;
    let Some((a, s)) = shared.aswl() else {
        return (
            "404 Not Found",
            "text/plain",
            "the whitelist is not enabled ([aswl])\n".into(),
        );
    };
    let result = admin::parse_request(method, path).and_then(|op| admin::run(&a, &s, &op, body));
    match result {
        Ok(text) => ("200 OK", "text/plain; charset=utf-8", text),
        Err(f) => (
            match f {
                admin::Failure::BadRequest(_) => "400 Bad Request",
                admin::Failure::NotFound(_) => "404 Not Found",
                admin::Failure::Storage(_) => "500 Internal Server Error",
            },
            "text/plain; charset=utf-8",
            format!("{f}\n"),
        ),
    }
}

/// `GET /client/IP`, `POST /client/IP/forget`.
fn client(shared: &dyn Server, method: &str, path: &str) -> Response {
    let rest = path.strip_prefix("/client/").unwrap_or("");
    let (ip, forget) = match (method, rest.strip_suffix("/forget")) {
        ("POST", Some(ip)) => (ip, true),
        ("GET", None) => (rest, false),
        _ => {
            return (
                "404 Not Found",
                "text/plain",
                "no such client request\n".into(),
            );
        }
    };
    match ip.parse::<std::net::IpAddr>() {
        Ok(ip) => (
            "200 OK",
            "text/plain; charset=utf-8",
            shared.client(ip, forget),
        ),
        Err(_) => (
            "400 Bad Request",
            "text/plain",
            "expected an IPv4 or IPv6 address\n".into(),
        ),
    }
}

fn queue(shared: &dyn Server, method: &str, path: &str) -> Response {
    use QueueOp as Op;
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').skip(2).collect();
    let op = match (method, parts.as_slice()) {
        ("GET", []) => Op::List,
        ("POST", ["flush"]) => Op::Flush(None),
        ("POST", ["flush", id]) => Op::Flush(Some(id.to_string())),
        ("GET", [id]) => Op::Show(id.to_string()),
        ("POST", [id, "delete"]) => Op::Delete(id.to_string()),
        ("POST", [id, "hold"]) => Op::Hold(id.to_string()),
        ("POST", [id, "release"]) => Op::Release(id.to_string()),
        _ => {
            return (
                "404 Not Found",
                "text/plain",
                "no such queue request\n".into(),
            );
        }
    };
    let by_id = matches!(
        op,
        Op::Show(_) | Op::Delete(_) | Op::Hold(_) | Op::Release(_) | Op::Flush(Some(_))
    );
    let answers = shared.queue(op.clone());
    if by_id && answers.is_empty() {
        return (
            "404 Not Found",
            "text/plain",
            "no such message in the queue\n".into(),
        );
    }
    let body = match op {
        Op::Flush(_) => {
            let n: u64 = answers
                .iter()
                .filter_map(|a| a.trim().parse::<u64>().ok())
                .sum();
            format!("{n} message(s) scheduled for delivery now\n")
        }
        Op::Delete(_) | Op::Hold(_) | Op::Release(_) => "ok\n".into(),
        _ => answers.concat(),
    };
    ("200 OK", "text/plain", body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(method: &str, path: &str, headers: &[(&str, &str)]) -> Head {
        let mut text = format!("{method} {path} HTTP/1.1\r\n");
        for (k, v) in headers {
            text.push_str(&format!("{k}: {v}\r\n"));
        }
        text.push_str("\r\n");
        read_head(&mut text.as_bytes()).unwrap()
    }

    #[test]
    fn who_may_do_what() {
        let listen: SocketAddr = "127.0.0.1:8025".parse().unwrap();
        let hosts = vec!["admin.example".to_string()];
        let tokens = vec!["s3cret-token".to_string()];
        let open = Policy {
            listen,
            allowed_hosts: &hosts,
            tokens: &[],
            open_metrics: false,
        };
        let tok = Policy {
            tokens: &tokens,
            ..open
        };
        let tok_metrics = Policy {
            open_metrics: true,
            ..tok
        };
        let host = ("Host", "127.0.0.1:8025");
        let octet = ("Content-Type", "application/octet-stream");
        let bearer = ("Authorization", "Bearer s3cret-token");
        let code = |r: Result<(), Response>| r.err().map_or("ok", |e| &e.0[..3]);
        for (policy, h, want) in [
            // Loopback without tokens: Host, Origin and POST content type decide.
            (open, head("GET", "/metrics", &[host]), "ok"),
            (
                open,
                head("GET", "/metrics", &[("Host", "localhost:8025")]),
                "ok",
            ),
            (
                open,
                head("GET", "/metrics", &[("Host", "admin.example")]),
                "ok",
            ),
            (open, head("GET", "/metrics", &[]), "400"),
            (
                open,
                head("GET", "/queue", &[("Host", "evil.example:8025")]),
                "403",
            ),
            (
                open,
                head("GET", "/healthz", &[("Host", "evil.example")]),
                "ok",
            ),
            (open, head("POST", "/reload", &[host, octet]), "ok"),
            (open, head("POST", "/reload", &[host]), "403"),
            (
                open,
                head(
                    "POST",
                    "/reload",
                    &[host, ("Content-Type", "text/plain; charset=x")],
                ),
                "403",
            ),
            (
                open,
                head(
                    "POST",
                    "/aswl/add",
                    &[host, ("Content-Type", "application/x-www-form-urlencoded")],
                ),
                "403",
            ),
            (
                open,
                head(
                    "POST",
                    "/reload",
                    &[host, octet, ("Origin", "http://127.0.0.1:8025")],
                ),
                "ok",
            ),
            (
                open,
                head(
                    "POST",
                    "/reload",
                    &[host, octet, ("Origin", "https://evil.example")],
                ),
                "403",
            ),
            (
                open,
                head("POST", "/reload", &[host, octet, ("Origin", "null")]),
                "403",
            ),
            // Tokens: required everywhere but /healthz (and /metrics when open).
            (tok, head("GET", "/metrics", &[host]), "401"),
            (
                tok,
                head("GET", "/queue", &[host, ("Authorization", "Bearer wrong")]),
                "401",
            ),
            (tok, head("GET", "/queue", &[host, bearer]), "ok"),
            (
                tok,
                head("POST", "/reload", &[("Host", "10.0.0.1:8025"), bearer]),
                "ok",
            ),
            (
                tok,
                head(
                    "POST",
                    "/reload",
                    &[host, bearer, ("Origin", "http://evil.example")],
                ),
                "403",
            ),
            (tok, head("GET", "/healthz", &[]), "ok"),
            (tok_metrics, head("GET", "/metrics", &[host]), "ok"),
            (tok_metrics, head("GET", "/queue", &[host]), "401"),
        ] {
            assert_eq!(code(authorize(&h, &policy)), want, "{h:?}");
        }
    }

    #[test]
    fn heads_are_bounded() {
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_LINE as usize));
        assert_eq!(
            read_head(&mut long.as_bytes()).unwrap_err().0,
            "400 Bad Request"
        );
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: y\r\n")).collect();
        let req = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(
            read_head(&mut req.as_bytes()).unwrap_err().0,
            "400 Bad Request"
        );
        let two = "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n";
        assert!(read_head(&mut two.as_bytes()).is_err(), "two Host headers");
        let chunked = "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(read_head(&mut chunked.as_bytes()).is_err());
        let h = head("POST", "/aswl/import", &[("Content-Length", "12")]);
        assert_eq!(h.content_length, 12);
    }
}
