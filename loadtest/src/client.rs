//! One load-generating SMTP connection at a time: connect, greet, (STARTTLS), then messages
//! until the run's budget is spent or this connection's share (`--per-connection`) is sent.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use monoio::net::TcpStream;
use ringmx::relay::reply::Reply;
use ringmx::runtime::transport::Transport;

use crate::stats::Stats;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    None,
    StartTls,
    Implicit,
}

/// The run's settings.
#[derive(Debug, Clone)]
pub struct Opts {
    pub target: std::net::SocketAddr,
    pub tls_name: String,
    pub connections: usize,
    pub messages: Option<u64>,
    pub duration: Option<Duration>,
    pub per_connection: u64,
    pub size: (usize, usize),
    pub recipients: usize,
    pub pipelining: bool,
    pub bdat: bool,
    pub tls: TlsMode,
    /// Resume TLS sessions (tickets) on reconnect.
    pub resume: bool,
    pub rate: Option<f64>,
    pub threads: usize,
    pub json: bool,
    pub from: String,
    /// `{k}` in `from` is replaced by the message number modulo this.
    pub senders: u64,
    pub to_domain: String,
    pub run_id: String,
    /// `--message FILE`: every message is this content (CRLF lines, dot-stuffed) instead of
    /// a generated one, e.g. a DKIM-signed message.
    pub message: Option<std::sync::Arc<Vec<u8>>>,
}

/// The budget all connections draw messages from.
#[derive(Debug)]
pub struct Budget {
    next: AtomicU64,
    limit: u64,
    pub start: Instant,
    deadline: Option<Instant>,
    pub stop: AtomicBool,
    pub done: AtomicU64,
    /// When the last load thread finished its connections, in µs since `start`.
    finished_us: AtomicU64,
}

impl Budget {
    pub fn new(opts: &Opts) -> Budget {
        let start = Instant::now();
        Budget {
            next: AtomicU64::new(0),
            limit: opts.messages.unwrap_or(u64::MAX),
            start,
            deadline: opts.duration.map(|d| start + d),
            stop: AtomicBool::new(false),
            done: AtomicU64::new(0),
            finished_us: AtomicU64::new(0),
        }
    }

    /// A load thread has finished all its connections.
    pub fn thread_finished(&self) {
        let us = self.start.elapsed().as_micros() as u64;
        self.finished_us.fetch_max(us, Ordering::Relaxed);
    }

    /// From the start to the end of the last thread's work (not to when the main thread,
    /// which polls for progress, noticed it).
    pub fn elapsed(&self) -> Duration {
        match self.finished_us.load(Ordering::Relaxed) {
            0 => self.start.elapsed(),
            us => Duration::from_micros(us),
        }
    }

    /// The next message number, or None when the run is over.
    fn take(&self) -> Option<u64> {
        if self.stop.load(Ordering::Relaxed) || self.deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        let k = self.next.fetch_add(1, Ordering::Relaxed);
        (k < self.limit).then_some(k)
    }
}

fn micros(since: Instant) -> u64 {
    since.elapsed().as_micros() as u64
}

struct Conn {
    stream: TcpStream,
    transport: Transport,
    buf: Vec<u8>,
}

impl Conn {
    async fn reply(&mut self) -> io::Result<Reply> {
        self.transport
            .read_reply(&mut self.stream, &mut self.buf)
            .await
    }

    /// RSET after a refused transaction; the message counts as failed.
    async fn reset(&mut self, st: &mut Stats) -> io::Result<bool> {
        self.cmd("RSET\r\n".into(), st).await?;
        Ok(false)
    }

    async fn send(&mut self, data: Vec<u8>) -> io::Result<()> {
        let (res, _) = self.transport.write_all(&mut self.stream, data).await;
        res
    }

    /// After the reply to DATA: the content and the final dot in one write when it is 354,
    /// else RSET. Whether the content went out.
    async fn content_after(
        &mut self,
        r: &Reply,
        mut body: Vec<u8>,
        st: &mut Stats,
    ) -> io::Result<bool> {
        if r.code != 354 {
            return self.reset(st).await;
        }
        body.extend_from_slice(b".\r\n");
        self.send(body).await?;
        Ok(true)
    }

    /// Send a command and read its reply.
    async fn cmd(&mut self, line: String, st: &mut Stats) -> io::Result<Reply> {
        self.send(line.into_bytes()).await?;
        self.counted_reply(st).await
    }

    /// Read one reply and count its code.
    async fn counted_reply(&mut self, st: &mut Stats) -> io::Result<Reply> {
        let r = self.reply().await?;
        st.reply(r.code);
        Ok(r)
    }
}

/// The sender of message `k` (`{k}` in `--from` varies it over `--senders` addresses).
fn sender(opts: &Opts, k: u64) -> String {
    if opts.from.contains("{k}") {
        opts.from
            .replace("{k}", &(k % opts.senders.max(1)).to_string())
    } else {
        opts.from.clone()
    }
}

/// A message body of `size` bytes (at least the headers), unique Message-ID, no line starts
/// with a dot.
fn message(opts: &Opts, k: u64, size: usize) -> Vec<u8> {
    if let Some(m) = &opts.message {
        return m.to_vec();
    }
    let mut m = format!(
        "From: <{}>\r\nTo: <rcpt0@{}>\r\nSubject: ringmx-loadtest {k}\r\nMessage-ID: <{}.{k}@loadtest.ringmx>\r\n\r\n",
        sender(opts, k),
        opts.to_domain,
        opts.run_id
    )
    .into_bytes();
    while m.len() + 2 < size {
        let n = (size - m.len() - 2).min(76);
        m.extend(std::iter::repeat_n(b'x', n));
        m.extend_from_slice(b"\r\n");
    }
    m
}

fn size_of(opts: &Opts, k: u64) -> usize {
    let (lo, hi) = opts.size;
    if hi <= lo {
        return lo;
    }
    // A cheap deterministic spread (splitmix64) over [lo, hi].
    let mut z = k.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    lo + (z % (hi - lo + 1) as u64) as usize
}

/// Run one connection slot until the budget is spent.
pub async fn run(
    opts: Arc<Opts>,
    budget: Arc<Budget>,
    tls: Arc<rustls::ClientConfig>,
    st: &mut Stats,
) {
    let mut pending = budget.take();
    while let Some(k) = pending {
        let mut c = match connect(&opts, &tls, st).await {
            Ok(c) => c,
            Err(e) => {
                st.connect_errors += 1;
                st.failed += 1;
                st.error(format!("connect: {}", e.kind()));
                budget.done.fetch_add(1, Ordering::Relaxed);
                monoio::time::sleep(Duration::from_millis(10)).await;
                pending = budget.take();
                continue;
            }
        };
        let mut on_conn = 0u64;
        let mut next = Some(k);
        let mut broken = false;
        while let Some(k) = next {
            let ok = match send_message(&opts, &budget, &mut c, k, st).await {
                Ok(ok) => ok,
                Err(e) => {
                    st.error(format!("io: {}", e.kind()));
                    broken = true;
                    false
                }
            };
            if ok {
                st.ok += 1;
            } else {
                st.failed += 1;
            }
            budget.done.fetch_add(1, Ordering::Relaxed);
            on_conn += 1;
            if broken || (opts.per_connection > 0 && on_conn >= opts.per_connection) {
                break;
            }
            next = budget.take();
        }
        if !broken && c.cmd("QUIT\r\n".into(), st).await.is_err() {
            st.error("io: QUIT".into());
        }
        pending = if broken || next.is_some() {
            budget.take()
        } else {
            None
        };
    }
}

async fn connect(opts: &Opts, tls: &Arc<rustls::ClientConfig>, st: &mut Stats) -> io::Result<Conn> {
    let t = Instant::now();
    let stream = TcpStream::connect_addr(opts.target).await?;
    stream.set_nodelay(true)?;
    st.record(0, micros(t));
    let t = Instant::now();
    let mut c = Conn {
        stream,
        transport: Transport::Plain,
        buf: Vec::with_capacity(4096),
    };
    if opts.tls == TlsMode::Implicit {
        c.transport = Transport::tls_client(tls.clone(), &opts.tls_name)?;
        c.transport.handshake(&mut c.stream).await?;
        st.tls_resumed += u64::from(c.transport.resumed());
    }
    let g = c.counted_reply(st).await?;
    st.record(1, micros(t));
    if g.code != 220 {
        return Err(io::Error::other(format!("greeting {}", g.code)));
    }
    let t = Instant::now();
    let r = c.cmd("EHLO loadtest.ringmx\r\n".into(), st).await?;
    st.record(2, micros(t));
    if r.code != 250 {
        return Err(io::Error::other(format!("EHLO {}", r.code)));
    }
    if opts.tls == TlsMode::StartTls {
        let r = c.cmd("STARTTLS\r\n".into(), st).await?;
        if r.code != 220 {
            return Err(io::Error::other(format!("STARTTLS {}", r.code)));
        }
        c.transport = Transport::tls_client(tls.clone(), &opts.tls_name)?;
        c.transport.handshake(&mut c.stream).await?;
        st.tls_resumed += u64::from(c.transport.resumed());
        let r = c.cmd("EHLO loadtest.ringmx\r\n".into(), st).await?;
        if r.code != 250 {
            return Err(io::Error::other(format!("EHLO after TLS {}", r.code)));
        }
    }
    Ok(c)
}

/// One transaction; Ok(true) when the final reply was 2xx.
async fn send_message(
    opts: &Opts,
    budget: &Budget,
    c: &mut Conn,
    k: u64,
    st: &mut Stats,
) -> io::Result<bool> {
    // Open loop: message k is due at start + k/rate, and its latency counts from then.
    let scheduled = match opts.rate {
        Some(rate) => {
            let due = budget.start + Duration::from_secs_f64(k as f64 / rate);
            let now = Instant::now();
            if due > now {
                monoio::time::sleep(due - now).await;
            }
            due
        }
        None => Instant::now(),
    };
    let size = size_of(opts, k);
    let body = message(opts, k, size);
    st.bytes += body.len() as u64;
    let mail = format!("MAIL FROM:<{}> SIZE={}\r\n", sender(opts, k), body.len());
    let rcpts: Vec<String> = (0..opts.recipients.max(1))
        .map(|i| format!("RCPT TO:<rcpt{i}@{}>\r\n", opts.to_domain))
        .collect();
    let t = Instant::now();
    let mut accepted = 0;
    if opts.pipelining {
        let mut out = mail.into_bytes();
        for r in &rcpts {
            out.extend_from_slice(r.as_bytes());
        }
        if opts.bdat {
            out.extend_from_slice(format!("BDAT {} LAST\r\n", body.len()).as_bytes());
            out.extend_from_slice(&body);
        } else {
            out.extend_from_slice(b"DATA\r\n");
        }
        c.send(out).await?;
        let r = c.counted_reply(st).await?;
        st.record(3, micros(t));
        let mail_ok = r.is_positive();
        for _ in &rcpts {
            let r = c.counted_reply(st).await?;
            st.record(4, micros(t));
            accepted += usize::from(r.is_positive());
        }
        if !opts.bdat {
            let r = c.counted_reply(st).await?;
            st.record(5, micros(t));
            if !c.content_after(&r, body, st).await? {
                return Ok(false);
            }
        }
        let r = c.counted_reply(st).await?;
        st.record(6, micros(scheduled));
        if !(mail_ok && accepted > 0 && r.is_positive()) {
            return c.reset(st).await;
        }
        return Ok(true);
    }
    let r = c.cmd(mail, st).await?;
    st.record(3, micros(t));
    if !r.is_positive() {
        return c.reset(st).await;
    }
    for rc in rcpts {
        let t = Instant::now();
        let r = c.cmd(rc, st).await?;
        st.record(4, micros(t));
        accepted += usize::from(r.is_positive());
    }
    if accepted == 0 {
        return c.reset(st).await;
    }
    let r = if opts.bdat {
        let mut out = format!("BDAT {} LAST\r\n", body.len()).into_bytes();
        out.extend_from_slice(&body);
        c.send(out).await?;
        c.counted_reply(st).await?
    } else {
        let t = Instant::now();
        let r = c.cmd("DATA\r\n".into(), st).await?;
        st.record(5, micros(t));
        if !c.content_after(&r, body, st).await? {
            return Ok(false);
        }
        c.counted_reply(st).await?
    };
    st.record(6, micros(scheduled));
    Ok(r.is_positive())
}

/// A file as message content: line ends made CRLF, lines starting with a dot stuffed.
pub fn load_message(path: &str) -> std::io::Result<Vec<u8>> {
    let raw = std::fs::read(path)?;
    let mut out = Vec::with_capacity(raw.len() + 64);
    for line in raw.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    // The split leaves one empty piece after a final line end.
    if raw.ends_with(b"\n") {
        out.truncate(out.len() - 2);
    }
    Ok(out)
}
