//! The `ringmx` command.

use std::path::PathBuf;
use std::process::ExitCode;

use ringmx::config::{Config, Driver, LogFormat};

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
    ringmx print-default-config
        Print the embedded default configuration.
    ringmx hash-password < PASSWORD
        Print an argon2id hash for a users_file line (user:HASH).
    ringmx --version | --help

Every configuration key is documented, with its default, in examples/ringmx.toml.
";

fn main() -> ExitCode {
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

/// One request to the admin endpoint; prints the body, fails on a non-200 answer.
fn admin_request(addr: &str, method: &str, path: &str, failure: &str) -> ExitCode {
    use std::io::{Read, Write};
    let result = (|| -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(70)))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: ringmx\r\nContent-Length: 0\r\n\r\n"
        )?;
        let mut all = String::new();
        s.read_to_string(&mut all)?;
        Ok(all)
    })();
    match result {
        Ok(all) => {
            let (head, body) = all.split_once("\r\n\r\n").unwrap_or((&all, ""));
            if head.starts_with("HTTP/1.1 200") {
                print!("{body}");
                ExitCode::SUCCESS
            } else {
                eprint!("ringmx: {failure}: {body}");
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("ringmx: cannot reach the admin endpoint at {addr}: {e}");
            ExitCode::FAILURE
        }
    }
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
    match ringmx::runtime::run(config, config_file) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("ringmx: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
