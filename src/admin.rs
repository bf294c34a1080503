//! The local admin endpoint: a deliberately small HTTP/1.1 server on its own thread (it never
//! runs on a core). `GET /metrics` (Prometheus text), `GET /healthz`, `POST /reload`.

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
    // Skip the headers; no request here has a body we need.
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4",
            shared.metrics.render(),
        ),
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
