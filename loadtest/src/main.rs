//! `ringmx-loadtest`: an SMTP load generator. One pinned thread and monoio runtime per core
//! (io_uring, epoll where refused), connections spread over them, every run bounded by a
//! message count and/or a duration. Loopback targets only unless `--allow-remote`.

mod client;
mod stats;

use std::io::IsTerminal;
use std::net::ToSocketAddrs;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use client::{Budget, Opts, TlsMode};
use stats::{STEPS, Stats};

const USAGE: &str = "\
ringmx-loadtest — SMTP load generator (loopback and your own test hosts only)

USAGE: ringmx-loadtest [OPTIONS] HOST:PORT

  -c, --connections N      concurrent connections (default 50)
  -n, --messages N         total messages (default 10000 unless --duration is given)
  -d, --duration SECS      stop after this long (every run is bounded)
      --per-connection N   messages per connection, then reconnect (1 = churn; default 0 = reuse)
  -s, --size BYTES|MIN-MAX message size, fixed or uniform in a range (default 1024)
  -r, --recipients N       recipients per message (default 1)
      --no-pipelining      one command per round trip (default: MAIL, RCPT… and DATA in one write)
      --bdat               BDAT (CHUNKING) instead of DATA
      --starttls           STARTTLS after EHLO (certificate not verified)
      --tls                implicit TLS (port 465 style; certificate not verified)
      --resume             resume TLS sessions on reconnect (default: a full handshake each time)
      --rate MSGS_PER_SEC  open loop at this rate; latency counts from the scheduled send time
  -t, --threads N          threads (default: one per CPU)
      --from ADDR          reverse-path (default loadtest@loadtest.ringmx); {k} in it is
                           replaced by the message number modulo --senders
      --senders N          distinct senders for {k} (default 1000000)
      --to-domain DOMAIN   recipients are rcptN@DOMAIN (default example.test)
      --message FILE       send this message (e.g. DKIM-signed) instead of generated ones
      --json               one JSON object on stdout instead of the text report
      --allow-remote       allow a target that is not a loopback address
";

fn fail(msg: &str) -> ! {
    eprintln!("ringmx-loadtest: {msg}\n\n{USAGE}");
    std::process::exit(2);
}

fn parse_args() -> Opts {
    let mut args = std::env::args().skip(1);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut o = Opts {
        target: std::net::SocketAddr::from(([127, 0, 0, 1], 25)),
        tls_name: "localhost".into(),
        connections: 50,
        messages: None,
        duration: None,
        per_connection: 0,
        size: (1024, 1024),
        recipients: 1,
        pipelining: true,
        bdat: false,
        tls: TlsMode::None,
        resume: false,
        rate: None,
        threads,
        json: false,
        from: "loadtest@loadtest.ringmx".into(),
        senders: 1_000_000,
        to_domain: "example.test".into(),
        run_id: format!(
            "{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros())
        ),
        message: None,
    };
    let mut target = None;
    let mut allow_remote = false;
    let num = |v: Option<String>, what: &str| -> u64 {
        v.and_then(|s| s.parse().ok())
            .unwrap_or_else(|| fail(&format!("{what} needs a number")))
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "-c" | "--connections" => o.connections = num(args.next(), &a).max(1) as usize,
            "-n" | "--messages" => o.messages = Some(num(args.next(), &a)),
            "-d" | "--duration" => o.duration = Some(Duration::from_secs(num(args.next(), &a))),
            "--per-connection" => o.per_connection = num(args.next(), &a),
            "-s" | "--size" => {
                let v = args.next().unwrap_or_default();
                let parse = |s: &str| {
                    s.parse::<usize>()
                        .unwrap_or_else(|_| fail("--size takes BYTES or MIN-MAX"))
                };
                o.size = match v.split_once('-') {
                    Some((lo, hi)) => (parse(lo), parse(hi)),
                    None => (parse(&v), parse(&v)),
                };
            }
            "-r" | "--recipients" => o.recipients = num(args.next(), &a).max(1) as usize,
            "--no-pipelining" => o.pipelining = false,
            "--bdat" => o.bdat = true,
            "--starttls" => o.tls = TlsMode::StartTls,
            "--tls" => o.tls = TlsMode::Implicit,
            "--resume" => o.resume = true,
            "--rate" => {
                o.rate = Some(
                    args.next()
                        .and_then(|s| s.parse::<f64>().ok())
                        .filter(|r| *r > 0.0)
                        .unwrap_or_else(|| fail("--rate needs a positive number")),
                )
            }
            "-t" | "--threads" => o.threads = num(args.next(), &a).max(1) as usize,
            "--from" => {
                o.from = args
                    .next()
                    .unwrap_or_else(|| fail("--from needs an address"))
            }
            "--senders" => o.senders = num(args.next(), &a).max(1),
            "--to-domain" => {
                o.to_domain = args
                    .next()
                    .unwrap_or_else(|| fail("--to-domain needs a domain"))
            }
            "--message" => {
                let path = args
                    .next()
                    .unwrap_or_else(|| fail("--message needs a file"));
                let m = client::load_message(&path)
                    .unwrap_or_else(|e| fail(&format!("--message {path}: {e}")));
                o.size = (m.len(), m.len());
                o.message = Some(std::sync::Arc::new(m));
            }
            "--json" => o.json = true,
            "--allow-remote" => allow_remote = true,
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            t if !t.starts_with('-') && target.is_none() => target = Some(t.to_string()),
            other => fail(&format!("unknown option {other:?}")),
        }
    }
    let target = target.unwrap_or_else(|| fail("give the target HOST:PORT"));
    o.target = target
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .unwrap_or_else(|| fail(&format!("cannot resolve {target:?}")));
    if let Some((host, _)) = target.rsplit_once(':')
        && host.parse::<std::net::IpAddr>().is_err()
    {
        o.tls_name = host.trim_matches(['[', ']']).to_string();
    }
    if !o.target.ip().is_loopback() && !allow_remote {
        fail(&format!(
            "refusing to load {}: not a loopback address (pass --allow-remote for your own test hosts)",
            o.target
        ));
    }
    if o.messages.is_none() && o.duration.is_none() {
        o.messages = Some(10_000);
    }
    o
}

fn core_thread(i: usize, opts: Arc<Opts>, budget: Arc<Budget>) -> std::thread::JoinHandle<Stats> {
    std::thread::spawn(move || {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let _ = monoio::utils::bind_to_cpu_set([i % cpus]);
        let mut tls = ringmx::relay::tls::client_config(false, None).unwrap_or_else(|e| fail(&e));
        if !opts.resume {
            let mut c = (*tls).clone();
            c.resumption = rustls::client::Resumption::disabled();
            tls = Arc::new(c);
        }
        let mine: Vec<usize> = (0..opts.connections)
            .filter(|c| c % opts.threads == i)
            .collect();
        let finished = budget.clone();
        let work = async move {
            let mut handles = Vec::new();
            for _ in mine {
                let (o, b, t) = (opts.clone(), budget.clone(), tls.clone());
                handles.push(monoio::spawn(async move {
                    let mut st = Stats::default();
                    client::run(o, b, t, &mut st).await;
                    st
                }));
            }
            let mut total = Stats::default();
            for h in handles {
                total.merge(&h.await);
            }
            finished.thread_finished();
            total
        };
        if monoio::utils::detect_uring() {
            match monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                .enable_timer()
                .build()
            {
                Ok(mut rt) => return rt.block_on(work),
                Err(e) => eprintln!("io_uring runtime: {e}; using epoll"),
            }
        }
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap_or_else(|e| fail(&format!("runtime: {e}")))
            .block_on(work)
    })
}

fn main() {
    let opts = Arc::new(parse_args());
    let budget = Arc::new(Budget::new(&opts));
    let threads: Vec<_> = (0..opts.threads.min(opts.connections))
        .map(|i| {
            let mut o = (*opts).clone();
            o.threads = opts.threads.min(opts.connections);
            core_thread(i, Arc::new(o), budget.clone())
        })
        .collect();
    let tty = std::io::stderr().is_terminal() && !opts.json;
    while !threads.iter().all(|t| t.is_finished()) {
        std::thread::sleep(Duration::from_millis(200));
        if tty {
            let done = budget.done.load(Ordering::Relaxed);
            let secs = budget.start.elapsed().as_secs_f64();
            let of = opts.messages.map_or(String::new(), |m| format!("/{m}"));
            eprint!(
                "\r{done}{of} messages, {:.0} msg/s   ",
                done as f64 / secs.max(1e-9)
            );
        }
    }
    if tty {
        eprintln!();
    }
    let mut total = Stats::default();
    for t in threads {
        match t.join() {
            Ok(s) => total.merge(&s),
            Err(_) => fail("a load thread panicked"),
        }
    }
    // After the joins, which make every thread's finish time visible here. The progress loop
    // above wakes every 200 ms: timing to its wake-up would add up to that much to every run.
    let elapsed = budget.elapsed();
    report(&opts, &total, elapsed);
    if total.failed > 0 || total.ok == 0 {
        std::process::exit(1);
    }
}

fn report(o: &Opts, s: &Stats, elapsed: Duration) {
    let secs = elapsed.as_secs_f64().max(1e-9);
    let pct = [50.0, 90.0, 99.0, 99.9];
    if o.json {
        let mut lat = serde_json::Map::new();
        for (name, h) in STEPS.iter().zip(&s.hist) {
            if h.is_empty() {
                continue;
            }
            let mut m = serde_json::Map::new();
            for p in pct {
                m.insert(format!("p{p}"), h.value_at_percentile(p).into());
            }
            m.insert("max".into(), h.max().into());
            m.insert("count".into(), h.len().into());
            lat.insert((*name).into(), m.into());
        }
        let v = serde_json::json!({
            "target": o.target.to_string(),
            "connections": o.connections,
            "ok": s.ok,
            "failed": s.failed,
            "seconds": secs,
            "msgs_per_sec": s.ok as f64 / secs,
            "bytes_per_sec": s.bytes as f64 / secs,
            "replies": s.replies.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(*v))).collect::<serde_json::Map<_, _>>(),
            "errors": s.errors,
            "tls_resumed": s.tls_resumed,
            "latency_us": lat,
        });
        println!("{v}");
        return;
    }
    println!(
        "target {}, {} connections, {} threads, size {}, {} recipient(s), {}{}{}{}",
        o.target,
        o.connections,
        o.threads,
        if o.size.0 == o.size.1 {
            format!("{} B", o.size.0)
        } else {
            format!("{}-{} B", o.size.0, o.size.1)
        },
        o.recipients,
        if o.pipelining {
            "pipelining"
        } else {
            "no pipelining"
        },
        if o.bdat { ", BDAT" } else { "" },
        match o.tls {
            TlsMode::None => "",
            TlsMode::StartTls => ", STARTTLS",
            TlsMode::Implicit => ", implicit TLS",
        },
        match (o.per_connection, o.rate) {
            (0, None) => ", connections reused, closed loop".to_string(),
            (n, None) => format!(", {n} message(s) per connection, closed loop"),
            (0, Some(r)) => format!(", connections reused, open loop at {r} msg/s"),
            (n, Some(r)) => format!(", {n} message(s) per connection, open loop at {r} msg/s"),
        }
    );
    println!(
        "messages: {} ok, {} failed in {:.2} s → {:.0} msg/s, {:.1} MB/s",
        s.ok,
        s.failed,
        secs,
        s.ok as f64 / secs,
        s.bytes as f64 / secs / 1e6
    );
    let replies: Vec<String> = s.replies.iter().map(|(c, n)| format!("{c}×{n}")).collect();
    println!("replies: {}", replies.join(" "));
    if o.tls != TlsMode::None {
        println!("TLS handshakes resumed: {}", s.tls_resumed);
    }
    if !s.errors.is_empty() {
        let e: Vec<String> = s.errors.iter().map(|(k, v)| format!("{k} ×{v}")).collect();
        println!("errors: {}", e.join(", "));
    }
    println!("latency µs      p50      p90      p99    p99.9      max");
    for (name, h) in STEPS.iter().zip(&s.hist) {
        if h.is_empty() {
            continue;
        }
        print!("{name:<10}");
        for p in pct {
            print!(" {:>8}", h.value_at_percentile(p));
        }
        println!(" {:>8}", h.max());
    }
}
