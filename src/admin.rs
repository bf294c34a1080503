//! The local admin endpoint: a deliberately small HTTP/1.1 server on its own thread (it never
//! runs on a core). `GET /metrics` (Prometheus text), `GET /healthz`, `POST /reload`, and the
//! queue API behind `ringmx queue`: `GET /queue`, `GET /queue/ID`, `POST /queue/flush[/ID]`,
//! `POST /queue/ID/delete|hold|release`, and the whitelist API behind `ringmx aswl`
//! (`/aswl/stats|check|list|export|add|remove|import`, see [`crate::aswl::admin`]).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::runtime::Shared;

/// Bind the endpoint (errors name the address) and serve it on a new thread.
pub fn start(
    addr: SocketAddr,
    shared: Arc<Shared>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let listener = TcpListener::bind(addr)?;
    std::thread::Builder::new()
        .name("ringmx-admin".into())
        .spawn(move || {
            for stream in listener.incoming() {
                if shared.shutdown.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(s) = stream {
                    let _ = handle(s, &shared);
                }
            }
        })
}

fn handle(stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // Headers: only Content-Length matters (the whitelist import has a body).
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.trim().eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    const MAX_BODY: usize = 512 << 20;
    let mut body = Vec::new();
    if length > 0 && length <= MAX_BODY {
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        body.resize(length, 0);
        std::io::Read::read_exact(&mut reader, &mut body)?;
    }
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = match (method, path) {
        _ if length > MAX_BODY => (
            "413 Payload Too Large",
            "text/plain",
            format!("request bodies are limited to {MAX_BODY} bytes\n"),
        ),
        ("GET", "/metrics") => {
            let mut m = shared.metrics.render();
            if let Some(a) = &shared.aswl {
                crate::aswl::admin::metrics(a, &mut m);
            }
            ("200 OK", "text/plain; version=0.0.4", m)
        }
        ("GET", "/healthz") => {
            if shared.shutdown.load(Ordering::SeqCst) {
                (
                    "503 Service Unavailable",
                    "text/plain",
                    "stopping\n".to_string(),
                )
            } else {
                ("200 OK", "text/plain", "ok\n".to_string())
            }
        }
        ("POST", "/reload") => match shared.request_reload() {
            Ok(g) => (
                "200 OK",
                "text/plain",
                format!("reloaded (generation {g})\n"),
            ),
            Err(e) => ("400 Bad Request", "text/plain", format!("{e}\n")),
        },
        (m, p) if p.starts_with("/queue") => queue(shared, m, p),
        (m, p) if p.starts_with("/aswl") => aswl(shared, m, p, &body),
        (_, "/metrics" | "/healthz" | "/reload") => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".into(),
        ),
        _ => ("404 Not Found", "text/plain", "not found\n".into()),
    };
    let mut w = stream;
    write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    w.flush()
}

type Response = (&'static str, &'static str, String);

fn aswl(shared: &Shared, method: &str, path: &str, body: &[u8]) -> Response {
    use crate::aswl::admin;
    let (Some(a), Some(s)) = (&shared.aswl, shared.live().config.aswl.clone()) else {
        return (
            "404 Not Found",
            "text/plain",
            "the whitelist is not enabled ([aswl])\n".into(),
        );
    };
    let result = admin::parse_request(method, path).and_then(|op| admin::run(a, &s, &op, body));
    match result {
        Ok(text) => ("200 OK", "text/plain; charset=utf-8", text),
        Err((code, msg)) => (
            match code {
                400 => "400 Bad Request",
                404 => "404 Not Found",
                _ => "500 Internal Server Error",
            },
            "text/plain; charset=utf-8",
            format!("{msg}\n"),
        ),
    }
}

fn queue(shared: &Shared, method: &str, path: &str) -> Response {
    use crate::runtime::queue::Op;
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
    let answers = shared.queue_command(op.clone());
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
