//! Runtime glue for the relay client: connect (from a chosen source address), drive
//! [`relay::client::Client`] over plain TCP or TLS, and keep idle connections per next hop for
//! reuse, with a per-hop connection limit on each core.

use crate::relay::failure::Failure;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use monoio::net::TcpStream;

use super::transport::Transport;
use crate::config::{RelayTls, RouteSection};
use crate::delivery::DsnRequest;
use crate::relay::client::{Action, Client, ClientOptions};
use crate::relay::reply::Reply;

/// Which pooled connections can carry a message: same next hop, source address and route
/// settings (the configuration generation stands for the latter).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct HopKey {
    pub addr: SocketAddr,
    pub source: Option<IpAddr>,
    pub route: usize,
    pub generation: u64,
}

/// Open connections to one next hop on this core, and the deliveries waiting for one.
#[derive(Default)]
struct Hop {
    open: Cell<usize>,
    waiters: RefCell<std::collections::VecDeque<std::task::Waker>>,
}

impl Hop {
    /// A connection was freed or returned to the pool: let one waiting delivery look.
    fn wake_one(&self) {
        if let Some(w) = self.waiters.borrow_mut().pop_front() {
            w.wake();
        }
    }

    /// Wait until `wake_one` (or spuriously; callers re-check).
    async fn turn(&self) {
        let mut registered = false;
        std::future::poll_fn(|cx| {
            if registered {
                return std::task::Poll::Ready(());
            }
            registered = true;
            self.waiters.borrow_mut().push_back(cx.waker().clone());
            std::task::Poll::Pending
        })
        .await
    }
}

/// A counted connection slot for a next hop.
struct Slot(Rc<Hop>);
impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.set(self.0.open.get().saturating_sub(1));
        self.0.wake_one();
    }
}

/// One open connection to a next hop.
pub(crate) struct OutConn {
    stream: TcpStream,
    transport: Transport,
    client: Client,
    buf: Vec<u8>,
    pub host: String,
    idle_since: Instant,
    _slot: Slot,
}

/// How a delivery over one hop ended.
pub(crate) enum Outcome {
    /// The transaction ran: one reply per recipient, and whether the hop took the DSN
    /// parameters (it offered DSN).
    Replies(Vec<Reply>, bool),
    /// The hop could not be used (connect, greeting, TLS, AUTH, a 421…): try the next one.
    HopFailed(Reply),
}

/// Idle connections and open-connection counts, per core.
#[derive(Default)]
pub(crate) struct Pool {
    idle: RefCell<HashMap<HopKey, Vec<OutConn>>>,
    hops: RefCell<HashMap<SocketAddr, Rc<Hop>>>,
}

/// Everything a hop needs from the route.
pub(crate) struct HopSettings {
    pub opts: ClientOptions,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub connect_timeout: Duration,
    pub reply_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_per_hop: usize,
}

impl HopSettings {
    pub(super) fn new(
        route: &RouteSection,
        hostname: &str,
        q: &crate::config::QueueSection,
    ) -> Result<HopSettings, String> {
        let tls = match route.tls {
            RelayTls::None => None,
            RelayTls::Opportunistic => Some(crate::relay::tls::client_config(false, None)?),
            RelayTls::Required | RelayTls::Implicit => Some(crate::relay::tls::client_config(
                route.tls_verify,
                route.tls_ca_file.as_deref(),
            )?),
        };
        Ok(HopSettings {
            opts: ClientOptions {
                ehlo: route.ehlo.clone().unwrap_or_else(|| hostname.to_string()),
                tls: route.tls,
                auth: route.auth_user.clone().zip(route.auth_password.clone()),
            },
            tls,
            connect_timeout: q.connect_timeout.0,
            reply_timeout: q.reply_timeout.0,
            idle_timeout: q.idle_timeout.0,
            max_per_hop: route.max_connections_per_hop.max(1),
        })
    }
}

impl Pool {
    fn take_idle(&self, key: &HopKey, idle_timeout: Duration) -> Option<OutConn> {
        let mut idle = self.idle.borrow_mut();
        let v = idle.get_mut(key)?;
        while let Some(c) = v.pop() {
            if c.idle_since.elapsed() < idle_timeout {
                return Some(c);
            }
        }
        None
    }

    fn put_idle(&self, key: HopKey, mut c: OutConn) {
        c.idle_since = Instant::now();
        self.idle.borrow_mut().entry(key).or_default().push(c);
    }

    /// Close connections idle longer than `idle_timeout` (QUIT, then drop).
    pub(super) async fn sweep(&self, idle_timeout: Duration) {
        let mut stale = Vec::new();
        for v in self.idle.borrow_mut().values_mut() {
            let (old, keep): (Vec<_>, Vec<_>) = std::mem::take(v)
                .into_iter()
                .partition(|c| c.idle_since.elapsed() >= idle_timeout);
            *v = keep;
            stale.extend(old);
        }
        self.idle.borrow_mut().retain(|_, v| !v.is_empty());
        for mut c in stale {
            let quit = c.client.quit();
            let write = c.transport.write_all(&mut c.stream, quit);
            let _ = monoio::time::timeout(Duration::from_secs(1), write).await;
        }
    }

    fn hop(&self, addr: SocketAddr) -> Rc<Hop> {
        self.hops.borrow_mut().entry(addr).or_default().clone()
    }

    /// Deliver one transaction over `key`'s hop, reusing an idle connection when there is one.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn deliver(
        &self,
        key: &HopKey,
        host: &str,
        s: &HopSettings,
        from: &str,
        rcpts: &[String],
        dsn: &DsnRequest,
        binary: bool,
        message: &[&[u8]],
        metrics: &crate::metrics::Metrics,
    ) -> Outcome {
        let hop = self.hop(key.addr);
        let waited = Instant::now();
        loop {
            // A pooled connection the peer closed meanwhile fails before any reply: go on.
            if let Some(mut c) = self.take_idle(key, s.idle_timeout) {
                metrics.relay_connection(true);
                let first = c.client.start(from, rcpts, dsn, binary, message);
                if let Ok(Action::Done(r)) = c.run(first, s).await {
                    let passed = c.client.capabilities().dsn;
                    self.keep(key, c);
                    return Outcome::Replies(r, passed);
                }
                continue;
            }
            if hop.open.get() < s.max_per_hop {
                break;
            }
            let left = s.reply_timeout.saturating_sub(waited.elapsed());
            if left.is_zero() {
                return Outcome::HopFailed(Failure::TooManyConnections.reply());
            }
            // Woken when a connection to this hop is freed or goes back to the pool (and at
            // least every second, so a wake-up lost to a waiter that timed out costs little).
            let _ = monoio::time::timeout(left.min(Duration::from_secs(1)), hop.turn()).await;
        }
        metrics.relay_connection(false);
        hop.open.set(hop.open.get() + 1);
        let slot = Slot(hop.clone());
        let mut c = match OutConn::open(key, host, s, slot).await {
            Ok(c) => c,
            Err(r) => return Outcome::HopFailed(r),
        };
        let first = c.client.start(from, rcpts, dsn, binary, message);
        match c.run(first, s).await {
            Ok(Action::Done(r)) => {
                let passed = c.client.capabilities().dsn;
                self.keep(key, c);
                Outcome::Replies(r, passed)
            }
            Ok(Action::Failed(r)) | Err(r) => Outcome::HopFailed(r),
            Ok(other) => Outcome::HopFailed(
                Failure::Unexpected(format!("relay client stopped unexpectedly ({other:?})"))
                    .reply(),
            ),
        }
    }

    fn keep(&self, key: &HopKey, c: OutConn) {
        if c.client.is_ready() {
            self.put_idle(key.clone(), c);
            self.hop(key.addr).wake_one();
        }
    }
}

fn hop_error(host: &str, what: &str, e: &io::Error) -> Reply {
    Failure::Io {
        host: host.to_string(),
        what: what.to_string(),
        error: e.to_string(),
    }
    .reply()
}

/// Connect to `addr`, from `source` when given, with TCP_NODELAY.
async fn connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let fut = async {
        let Some(src) = source else {
            return TcpStream::connect_addr(addr).await;
        };
        let domain = socket2::Domain::for_address(addr);
        let sock =
            socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
        sock.bind(&SocketAddr::new(src, 0).into())?;
        sock.set_nonblocking(true)?;
        match sock.connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let stream = TcpStream::from_std(std::net::TcpStream::from(sock))?;
        stream.writable(false).await?;
        // SAFETY: the descriptor belongs to `stream`, which outlives this borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
        if let Some(e) = socket2::SockRef::from(&fd).take_error()? {
            return Err(e);
        }
        Ok(stream)
    };
    match monoio::time::timeout(timeout, fut).await {
        Ok(r) => {
            let s = r?;
            s.set_nodelay(true)?;
            Ok(s)
        }
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    }
}

impl OutConn {
    async fn open(key: &HopKey, host: &str, s: &HopSettings, slot: Slot) -> Result<OutConn, Reply> {
        let stream = connect(key.addr, key.source, s.connect_timeout)
            .await
            .map_err(|e| hop_error(host, &format!("connect to {}", key.addr), &e))?;
        let implicit = s.opts.tls == RelayTls::Implicit;
        let transport = match (&s.tls, implicit) {
            (Some(cfg), true) => Transport::tls_client(cfg.clone(), host)
                .map_err(|e| hop_error(host, "TLS setup", &e))?,
            _ => Transport::Plain,
        };
        let mut c = OutConn {
            stream,
            transport,
            client: Client::new(s.opts.clone(), implicit),
            buf: Vec::with_capacity(1024),
            host: host.to_string(),
            idle_since: Instant::now(),
            _slot: slot,
        };
        if implicit {
            let hs = monoio::time::timeout(s.reply_timeout, c.transport.handshake(&mut c.stream));
            match hs.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(hop_error(host, "TLS handshake", &e)),
                Err(_) => {
                    return Err(Failure::TlsHandshakeTimeout(host.to_string()).reply());
                }
            }
        }
        match c.run(Action::Wait, s).await {
            Ok(Action::Ready) => Ok(c),
            Ok(Action::Failed(r)) | Err(r) => Err(r),
            Ok(other) => Err(Failure::Unexpected(format!("{host}: unexpected {other:?}")).reply()),
        }
    }

    /// Run the client until it is ready, done or failed.
    async fn run(&mut self, mut action: Action, s: &HopSettings) -> Result<Action, Reply> {
        loop {
            action = match action {
                Action::Send(bytes) => {
                    // A hop that stops reading (its window closed) fails the attempt after
                    // a reply time limit without progress, instead of holding a delivery
                    // slot for ever.
                    let sent = self
                        .transport
                        .write_all_within(&mut self.stream, bytes, s.reply_timeout)
                        .await;
                    match sent {
                        Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                            return Err(Failure::SendTimeout {
                                host: self.host.clone(),
                                secs: s.reply_timeout.as_secs(),
                            }
                            .reply());
                        }
                        res => res.map_err(|e| hop_error(&self.host, "write", &e))?,
                    }
                    let r = self.read_reply(s.reply_timeout).await?;
                    self.client.on_reply(r)
                }
                Action::Wait => {
                    let r = self.read_reply(s.reply_timeout).await?;
                    self.client.on_reply(r)
                }
                Action::StartTls => {
                    if !self.buf.is_empty() {
                        // Bytes after the 220 were injected before the handshake (the
                        // STARTTLS command-injection attack): never trust them.
                        return Err(Failure::StartTlsInjection(self.host.clone()).reply());
                    }
                    let Some(cfg) = s.tls.clone() else {
                        return Err(Failure::TlsNotConfigured.reply());
                    };
                    self.transport = Transport::tls_client(cfg, &self.host)
                        .map_err(|e| hop_error(&self.host, "TLS setup", &e))?;
                    let hs = monoio::time::timeout(
                        s.reply_timeout,
                        self.transport.handshake(&mut self.stream),
                    );
                    match hs.await {
                        Ok(Ok(())) => self.client.tls_started(),
                        Ok(Err(e)) => return Err(hop_error(&self.host, "TLS handshake", &e)),
                        Err(_) => {
                            return Err(Failure::TlsHandshakeTimeout(self.host.clone()).reply());
                        }
                    }
                }
                done => return Ok(done),
            };
        }
    }

    async fn read_reply(&mut self, timeout: Duration) -> Result<Reply, Reply> {
        let read = self.transport.read_reply(&mut self.stream, &mut self.buf);
        match monoio::time::timeout(timeout, read).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) if e.kind() == io::ErrorKind::InvalidData => Err(Failure::InvalidReply {
                host: self.host.clone(),
                error: e.to_string(),
            }
            .reply()),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                Err(Failure::ClosedByHop(self.host.clone()).reply())
            }
            Ok(Err(e)) => Err(hop_error(&self.host, "read", &e)),
            Err(_) => Err(Failure::NoReply {
                host: self.host.clone(),
                secs: timeout.as_secs(),
            }
            .reply()),
        }
    }
}
