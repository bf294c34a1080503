//! The `ringmx` command.

use std::path::PathBuf;
use std::process::ExitCode;

use ringmx::config::{Config, Driver, LogFormat};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "\
ringmx — SMTP front end for Linux edge hosts

USAGE:
    ringmx run [--config FILE] [--driver auto|legacy]
        Run in the foreground until SIGTERM or SIGINT. Without --config, an embedded default
        is used: inbound 127.0.0.1:2525 (local domain example.test), outbound 127.0.0.1:2587
        (clients from 127.0.0.0/8 may relay), messages spooled in ./ringmx-data/spool and
        then dropped into ./ringmx-data/drop.
        --driver legacy forces epoll instead of io_uring (also: [server] driver).
    ringmx check-config FILE
        Validate FILE; on error print the file, line, key and problem and exit 1.
    ringmx reload [--admin ADDR]
        Ask the running server to re-read its configuration (POST /reload on the admin
        endpoint, default 127.0.0.1:8025; SIGHUP does the same). A configuration with errors
        is refused and the running one stays; the reason is printed and the exit code is 1.
    ringmx queue [list | show ID | flush [ID] | delete ID | hold ID | release ID] [--admin ADDR]
        The delivery queue of the running server: list (id, state, age, attempts, sender,
        pending recipients, last error), one message's details, retry now, delete without a
        bounce, hold, release.
    ringmx why IP [--forget] [--admin ADDR]
        What the running server holds about a client address: connections open, access per
        binding, the greeting test's memory, the cached DNS list verdict, its rate-limit
        counts, AUTH failures. --forget drops the greeting test's and DNS lists' memory of it.
    ringmx aswl [stats | check SENDER RECIPIENT | list [--local MASK] [--external MASK] |
                add LOCAL EXTERNAL | remove EXTERNAL [LOCAL] | import FILE|- |
                export [--format csv|jsonl]] [--admin ADDR] [--config FILE] [--offline]
        The Auto Sender Whitelist: counters; why a sender passes or not for a recipient (mode,
        record, exception); records (masks as in check_exceptions); add, remove, import and
        export (CSV or JSON lines). Through the running server's admin endpoint; when none
        answers (or with --offline), directly on the data directory of --config.
    ringmx print-default-config
        Print the embedded default configuration.
    ringmx hash-password < PASSWORD
        Print an argon2id hash for a users_file line (user:HASH).
    ringmx --version | --help

--admin takes host:port, or https://host:port for an endpoint with a certificate (verified
against the PEM roots in $RINGMX_ADMIN_CA, else the web PKI).
The admin commands (reload, queue, why, aswl) send a bearer token when the admin endpoint has
[admin] token_file: from $RINGMX_ADMIN_TOKEN_FILE (a file whose first token line is used), else
$RINGMX_ADMIN_TOKEN, else (aswl with --config) the configuration's token_file. Never on the
command line, where other users could read it.

Every configuration key is documented, with its default, in examples/ringmx.toml.
";

fn main() -> ExitCode {
    // The process-wide rustls provider, for libraries that build their own configs (redis-rs
    // for `rediss://`): with both of rustls's providers compiled in (tokio-rustls asks for
    // ring), none is chosen on its own and such a config would panic.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("run") => run(&args[1..]),
        Some("check-config") => match args.get(1) {
            Some(file) => match Config::load(&PathBuf::from(file)) {
                Ok(c) if let Err(e) = ringmx::runtime::load_tls(&c) => {
                    eprintln!("{file}: {e}");
                    ExitCode::FAILURE
                }
                Ok(c) if let Err(e) = ringmx::runtime::load_users(&c) => {
                    eprintln!("{file}: {e}");
                    ExitCode::FAILURE
                }
                Ok(c) => {
                    println!(
                        "{file}: ok ({} bindings, {} routes)",
                        c.bindings.len(),
                        c.routes.len()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            },
            None => usage_error("check-config needs a FILE"),
        },
        Some("hash-password") => {
            let mut line = String::new();
            if std::io::stdin().read_line(&mut line).is_err()
                || line.trim_end_matches(['\r', '\n']).is_empty()
            {
                return usage_error("hash-password reads the password from standard input");
            }
            match ringmx::auth::hash_password(line.trim_end_matches(['\r', '\n'])) {
                Ok(h) => {
                    println!("{h}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("ringmx: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some("reload") => reload(&args[1..]),
        Some("queue") => queue(&args[1..]),
        Some("why") => why(&args[1..]),
        Some("aswl") => aswl(&args[1..]),
        Some("print-default-config") => {
            print!("{}", ringmx::config::DEFAULT_CONFIG);
            ExitCode::SUCCESS
        }
        Some("--version" | "-V") => {
            println!("ringmx {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        None | Some("--help" | "-h" | "help") => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some(other) => usage_error(&format!("unknown command {other:?}")),
    }
}

/// `[--admin ADDR]` at the end of `args`: the address and the arguments before it.
fn admin_addr(args: &[String]) -> (String, &[String]) {
    match args {
        [rest @ .., flag, a] if flag == "--admin" => (a.clone(), rest),
        _ => ("127.0.0.1:8025".to_string(), args),
    }
}

/// The admin token: `$RINGMX_ADMIN_TOKEN_FILE`, `$RINGMX_ADMIN_TOKEN`, then `file`.
fn admin_token(file: Option<&std::path::Path>) -> Option<String> {
    let from_file = |p: &std::path::Path| {
        std::fs::read_to_string(p).ok().and_then(|t| {
            t.lines()
                .map(str::trim)
                .find(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from)
        })
    };
    std::env::var_os("RINGMX_ADMIN_TOKEN_FILE")
        .and_then(|p| from_file(std::path::Path::new(&p)))
        .or_else(|| std::env::var("RINGMX_ADMIN_TOKEN").ok())
        .or_else(|| file.and_then(from_file))
}

/// One request to the admin endpoint: (status line is 200, body). `addr` is `host:port`, or
/// `https://host:port` for an endpoint with a certificate (verified against the PEM roots in
/// `$RINGMX_ADMIN_CA`, else the web PKI). Host names the endpoint as it was addressed; a POST
/// says its body is not a form (the endpoint refuses those).
fn admin_call(
    addr: &str,
    method: &str,
    path: &str,
    body: &[u8],
    token: Option<&str>,
) -> std::io::Result<(bool, String)> {
    let (tls, hostport) = match addr.strip_prefix("https://") {
        Some(h) => (true, h),
        None => (false, addr.strip_prefix("http://").unwrap_or(addr)),
    };
    let tcp = std::net::TcpStream::connect(hostport)?;
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(120)))?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {hostport}\r\n{auth}Content-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !tls {
        let host = hostport.rsplit_once(':').map_or(hostport, |(h, _)| h);
        let loopback = host == "localhost"
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if token.is_some() && !loopback {
            return Err(std::io::Error::other(format!(
                "refusing to send the admin token in clear text to {hostport}: use https://"
            )));
        }
        let mut s = tcp;
        return exchange(&mut s, &head, body);
    }
    let ca = std::env::var_os("RINGMX_ADMIN_CA").map(PathBuf::from);
    let cfg =
        ringmx::relay::tls::client_config(true, ca.as_deref()).map_err(std::io::Error::other)?;
    let host = match hostport.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => hostport,
    };
    let name =
        rustls::pki_types::ServerName::try_from(host.to_string()).map_err(std::io::Error::other)?;
    let conn = rustls::ClientConnection::new(cfg, name).map_err(std::io::Error::other)?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    exchange(&mut s, &head, body)
}

fn exchange(
    s: &mut (impl std::io::Read + std::io::Write),
    head: &str,
    body: &[u8],
) -> std::io::Result<(bool, String)> {
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    s.flush()?;
    let mut all = Vec::new();
    match s.read_to_end(&mut all) {
        Ok(_) => {}
        // A peer that closes without TLS close_notify after a complete answer.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !all.is_empty() => {}
        Err(e) => return Err(e),
    }
    let all = String::from_utf8_lossy(&all);
    let (head, body) = all.split_once("\r\n\r\n").unwrap_or((&all, ""));
    Ok((head.starts_with("HTTP/1.1 200"), body.to_string()))
}

/// One request to the admin endpoint; prints the body, fails on a non-200 answer.
fn admin_request(addr: &str, method: &str, path: &str, failure: &str) -> ExitCode {
    match admin_call(addr, method, path, &[], admin_token(None).as_deref()) {
        Ok(answer) => print_answer(answer, failure),
        Err(e) => {
            eprintln!("ringmx: cannot reach the admin endpoint at {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_answer((ok, body): (bool, String), failure: &str) -> ExitCode {
    if ok {
        print!("{body}");
        ExitCode::SUCCESS
    } else {
        eprint!("ringmx: {failure}: {body}");
        ExitCode::FAILURE
    }
}

/// `ringmx aswl …`: through the running server's admin endpoint, or offline against the data
/// directory when no server answers (or with `--offline`).
fn aswl(args: &[String]) -> ExitCode {
    use ringmx::aswl::admin::{Op, request_path, run};
    let mut admin: Option<String> = None;
    let mut config_file: Option<PathBuf> = None;
    let mut offline = false;
    let mut jsonl = false;
    let mut local = None;
    let mut external = None;
    let mut words: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--admin" => admin = it.next().cloned(),
            "--config" | "-c" => config_file = it.next().map(PathBuf::from),
            "--offline" => offline = true,
            "--format" => jsonl = it.next().map(String::as_str) == Some("jsonl"),
            "--local" => local = it.next().cloned(),
            "--external" => external = it.next().cloned(),
            w => words.push(w.to_string()),
        }
    }
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    let mut body = Vec::new();
    let op = match w.as_slice() {
        ["stats"] | [] => Op::Stats,
        ["check", sender, rcpt] => Op::Check {
            sender: sender.to_string(),
            rcpt: rcpt.to_string(),
        },
        ["list"] => Op::List { local, external },
        ["add", l, x] => Op::Add {
            local: l.to_string(),
            external: x.to_string(),
        },
        ["remove", x] => Op::Remove {
            external: x.to_string(),
            local,
        },
        ["remove", x, l] => Op::Remove {
            external: x.to_string(),
            local: Some(l.to_string()),
        },
        ["import", file] => {
            let read = if *file == "-" {
                let mut b = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut b).map(|_| b)
            } else {
                std::fs::read(file)
            };
            match read {
                Ok(b) => body = b,
                Err(e) => {
                    eprintln!("ringmx: {file}: {e}");
                    return ExitCode::FAILURE;
                }
            }
            Op::Import
        }
        ["export"] => Op::Export { jsonl },
        _ => {
            return usage_error(
                "aswl takes stats | check SENDER RECIPIENT | list [--local MASK] [--external MASK] | add LOCAL EXTERNAL | remove EXTERNAL [LOCAL] | import FILE|- | export [--format csv|jsonl]",
            );
        }
    };
    let config = match &config_file {
        Some(f) => Config::load(f),
        None => Config::embedded_default(),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ringmx: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !offline {
        let scheme = if config.admin.certificate.is_some() {
            "https://"
        } else {
            ""
        };
        let addr = admin
            .clone()
            .or_else(|| config.admin.listen.map(|a| format!("{scheme}{a}")))
            .unwrap_or_else(|| "127.0.0.1:8025".into());
        let (method, path) = request_path(&op);
        let token = admin_token(config.admin.token_file.as_deref());
        match admin_call(&addr, method, &path, &body, token.as_deref()) {
            Ok(answer) => return print_answer(answer, "whitelist request failed"),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && admin.is_none() => {
                eprintln!("ringmx: no server at {addr}; working offline on the data directory");
            }
            Err(e) => {
                eprintln!("ringmx: cannot reach the admin endpoint at {addr}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let Some(settings) = config.aswl.clone() else {
        eprintln!("ringmx: the whitelist is not enabled in this configuration ([aswl])");
        return ExitCode::FAILURE;
    };
    let a = match ringmx::aswl::Aswl::open(&settings, 0) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ringmx: {}: {e}", settings.dir.display());
            return ExitCode::FAILURE;
        }
    };
    // With replication on, offline changes wait in its outbox for the next start.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    if config.replication.is_some() {
        a.replica.connect_tap(tx);
    }
    let answer = match run(&a, &settings, &op, &body) {
        Ok(t) => (true, t),
        Err(f) => (false, format!("{f}\n")),
    };
    let mut changes = Vec::new();
    while let Ok(c) = rx.try_recv() {
        changes.push(c);
    }
    if let Some(r) = &config.replication
        && let Err(e) = ringmx::replication::queue_offline(&settings.dir, r, &changes)
    {
        eprintln!("ringmx: the replication outbox: {e} (the change is made here only)");
        return ExitCode::FAILURE;
    }
    print_answer(answer, "whitelist request failed")
}

fn reload(args: &[String]) -> ExitCode {
    match admin_addr(args) {
        (addr, []) => admin_request(&addr, "POST", "/reload", "reload refused"),
        _ => usage_error("reload takes [--admin ADDR]"),
    }
}

fn queue(args: &[String]) -> ExitCode {
    let (addr, args) = admin_addr(args);
    let strs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (method, path) = match strs.as_slice() {
        ["list"] | [] => ("GET", "/queue".to_string()),
        ["show", id] => ("GET", format!("/queue/{id}")),
        ["flush"] => ("POST", "/queue/flush".to_string()),
        ["flush", id] => ("POST", format!("/queue/flush/{id}")),
        [op @ ("delete" | "hold" | "release"), id] => ("POST", format!("/queue/{id}/{op}")),
        _ => {
            return usage_error(
                "queue takes list | show ID | flush [ID] | delete ID | hold ID | release ID",
            );
        }
    };
    admin_request(&addr, method, &path, "queue request failed")
}

fn why(args: &[String]) -> ExitCode {
    let (addr, args) = admin_addr(args);
    let strs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (method, path) = match strs.as_slice() {
        [ip] if ip.parse::<std::net::IpAddr>().is_ok() => ("GET", format!("/client/{ip}")),
        [ip, "--forget"] if ip.parse::<std::net::IpAddr>().is_ok() => {
            ("POST", format!("/client/{ip}/forget"))
        }
        _ => return usage_error("why takes an IP address, then optionally --forget"),
    };
    admin_request(&addr, method, &path, "client request failed")
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("ringmx: {msg}\n\n{USAGE}");
    ExitCode::from(2)
}

fn run(args: &[String]) -> ExitCode {
    let mut config_file = None;
    let mut driver = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--config" | "-c" => match it.next() {
                Some(f) => config_file = Some(PathBuf::from(f)),
                None => return usage_error("--config needs a FILE"),
            },
            "--driver" => match it.next().map(String::as_str) {
                Some("auto") => driver = Some(Driver::Auto),
                Some("legacy") => driver = Some(Driver::Legacy),
                _ => return usage_error("--driver takes auto or legacy"),
            },
            other => return usage_error(&format!("unknown option {other:?}")),
        }
    }
    let config = match &config_file {
        Some(f) => Config::load(f),
        None => Config::embedded_default(),
    };
    let mut config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(d) = driver {
        config.server.driver = d;
    }
    init_logging(config.server.log);
    let admin = config.admin.clone();
    let started = move |shared: std::sync::Arc<ringmx::runtime::Shared>| {
        let Some(addr) = admin.listen else {
            return Ok(());
        };
        let tls = ringmx::tls::admin_config(&admin).map_err(|e| e.to_string())?;
        if tls.is_none() && !addr.ip().is_loopback() {
            tracing::warn!(listen = %addr, "admin endpoint off loopback without [admin] certificate: tokens cross the network in clear text");
        }
        ringmx::admin::start(addr, shared, tls).map_err(|e| format!("admin.listen {addr}: {e}"))?;
        tracing::info!(listen = %addr, "admin endpoint");
        Ok(())
    };
    match ringmx::runtime::run(config, config_file, started) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("ringmx: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
