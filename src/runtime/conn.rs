//! One connection: read into an owned buffer → `proto::Session` → write the queued replies.
//!
//! The read is never raced against anything but its timeout, and a timeout ends the session
//! (`421 4.4.2`): a cancelled io_uring read may already have consumed bytes (RUNTIME.md §1.3).

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use monoio::net::TcpStream;

use super::queue::CoreQueue;
use super::transport::Transport;
use super::{BindingRt, Shared};
use crate::aswl;
use crate::config::{Direction, RouteAction, RouteFacts, TlsMode};
use crate::delivery::{DsnRequest, DsnRet, Envelope, RcptDsn, drop_folder, trace};
use crate::metrics::Reason;
use crate::policy::greet::Known;
use crate::policy::pipeline::{Deferred, Effects, Outcome, Refusal, Request, Stage};
use crate::proto::AbortReason;
use crate::proto::command::{Body, Ret};
use crate::proto::reply;
use crate::proto::{Credentials, Event, Session, Stop, proxy};
use crate::spool::staging::Staged;
use crate::units::any_contains;

/// Read size; also the buffer's initial capacity (it grows only if a client pipelines more
/// than this in one go).
const READ_CHUNK: usize = 4096;

/// A change-log file and the record to append to it with the message.
type AswlLog = (Arc<crate::journal::Segment>, Vec<u8>);
/// The deferred check a session waited for last (stage and place) and its deadline.
type Waited = ((Stage, usize), Instant);

/// Per-core state shared by the core's connection tasks (no locks: one thread).
pub(crate) struct CoreCtx {
    pub core: usize,
    pub shared: Arc<Shared>,
    pub queue: Rc<CoreQueue>,
    open: Cell<usize>,
    /// Sockets of sessions waiting for a command outside a transaction: at shutdown they are
    /// woken (SHUT_RD makes the pending read return 0) and told `421` at once. Updated around
    /// every read between transactions: hashed with foldhash (descriptors are the kernel's
    /// small integers, not a client's choice), not SipHash.
    idle: RefCell<HashSet<RawFd, foldhash::fast::RandomState>>,
}

impl CoreCtx {
    pub(crate) fn new(core: usize, shared: Arc<Shared>, queue: Rc<CoreQueue>) -> CoreCtx {
        CoreCtx {
            core,
            shared,
            queue,
            open: Cell::new(0),
            idle: RefCell::new(HashSet::default()),
        }
    }

    /// Wake every idle session so it can say `421` and close (called once stopping).
    pub(crate) fn wake_idle(&self) {
        for fd in self.idle.borrow().iter() {
            // SAFETY: `fd` belongs to a live connection (it leaves the set before the
            // connection's stream is dropped); SHUT_RD only ends its reading side.
            unsafe { libc::shutdown(*fd, libc::SHUT_RD) };
        }
    }

    pub(crate) fn open_connections(&self) -> usize {
        self.open.get()
    }
}

struct BindingSlot(Arc<std::sync::atomic::AtomicUsize>);
impl Drop for BindingSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct OpenGuard(Rc<CoreCtx>);
impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.set(self.0.open.get().saturating_sub(1));
    }
}

/// The transaction being received.
struct Txn {
    mail_from: String,
    rcpts: Vec<String>,
    /// The whitelist verdict of each recipient (inbound bindings with `[aswl]`).
    verdicts: Vec<Option<bool>>,
    /// At most `staging::DEFAULT_KEEP` bytes in memory, the rest in a spill file.
    content: Staged,
    /// RET, ENVID, and each recipient's NOTIFY and ORCPT (RFC 3461).
    dsn: DsnRequest,
    /// BODY=BINARYMIME.
    binary: bool,
}

impl Txn {
    fn new(content: Staged) -> Txn {
        Txn {
            mail_from: String::new(),
            rcpts: Vec::new(),
            verdicts: Vec::new(),
            content,
            dsn: DsnRequest::default(),
            binary: false,
        }
    }

    /// Record an accepted recipient's DSN parameters (the list stays empty while no recipient
    /// has any).
    fn push_rcpt_dsn(&mut self, r: RcptDsn) {
        if r != RcptDsn::default() || !self.dsn.rcpts.is_empty() {
            let before = self.rcpts.len().saturating_sub(1);
            self.dsn.rcpts.resize(before, RcptDsn::default());
            self.dsn.rcpts.push(r);
        }
    }

    fn clear(&mut self) {
        self.mail_from.clear();
        self.rcpts.clear();
        self.verdicts.clear();
        self.content.clear();
        self.dsn = DsnRequest::default();
        self.binary = false;
    }
}

/// What the connection loop does after a pass over the buffered input.
enum Next {
    Read,
    Auth(Credentials),
    /// A MAIL or RCPT whose answer waits for a deferred policy check.
    Decide(Box<(Pending, Deferred)>),
    Flush,
    Deliver,
    StartTls,
    Close,
}

/// A command held while a policy check runs off the core.
enum Pending {
    Mail(MailArgs),
    Rcpt(RcptArgs),
}

/// MAIL FROM, owned.
struct MailArgs {
    from: String,
    ret: Option<DsnRet>,
    envid: Option<String>,
    binary: bool,
}

/// RCPT TO, owned.
struct RcptArgs {
    to: String,
    /// Where the domain the address parser found starts (the end for `<Postmaster>`).
    domain_at: usize,
    dsn: RcptDsn,
}

/// Milliseconds on a monotonic clock shared by every core (rate limits).
pub(crate) fn clock_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Why a connection ended (logged as `end`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The session closed it: QUIT, too many errors, a policy refusal that closes.
    Closed,
    ClientClosed,
    Shutdown,
    /// Slower than `min_data_rate`.
    TooSlow,
    Timeout,
    ReadError,
    WriteError,
    UntrustedProxyHeader,
    TlsNotConfigured,
    TlsSetupFailed,
    TlsHandshakeFailed,
    TlsHandshakeTimeout,
}

impl End {
    fn as_str(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::ClientClosed => "client closed",
            End::Shutdown => "shutdown",
            End::TooSlow => "data rate too low",
            End::Timeout => "timeout",
            End::ReadError => "read error",
            End::WriteError => "write error",
            End::UntrustedProxyHeader => "untrusted proxy header",
            End::TlsNotConfigured => "tls not configured",
            End::TlsSetupFailed => "tls setup failed",
            End::TlsHandshakeFailed => "tls handshake failed",
            End::TlsHandshakeTimeout => "tls handshake timeout",
        }
    }
}

struct Conn {
    peer: SocketAddr,
    binding: Rc<BindingRt>,
    ctx: Rc<CoreCtx>,
    transport: Transport,
    tls: Option<String>,
    helo: String,
    esmtp: bool,
    txn: Txn,
    messages: u32,
    auth_user: Option<String>,
    auth_failures: u32,
    /// Recipients refused as unknown in this session (directory harvest).
    unknown_rcpts: usize,
    refuse_proxy_header: bool,
    /// When the message being received started, for `min_data_rate`.
    message_started: Option<Instant>,
}

pub(crate) async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    binding: Rc<BindingRt>,
    ctx: Rc<CoreCtx>,
) {
    ctx.open.set(ctx.open.get() + 1);
    let _open = OpenGuard(ctx.clone());
    let started = Instant::now();
    let shared = ctx.shared.clone();
    let mut stream = stream;
    let mut peer = peer;
    let mut early: Vec<u8> = Vec::new();
    let proxy_binding = binding.b.section.proxy_protocol.is_some();
    let trusted_proxy = binding
        .b
        .section
        .proxy_protocol
        .as_deref()
        .is_some_and(|nets| any_contains(nets, peer.ip()));
    if trusted_proxy {
        let limit = binding.b.limits.command_timeout.0;
        match monoio::time::timeout(limit, read_proxy_header(&mut stream)).await {
            Ok(Ok((source, rest))) => {
                if let Some(s) = source {
                    peer = s;
                }
                early = rest;
            }
            Ok(Err(why)) => {
                tracing::warn!(proxy = %peer, error = why, "bad PROXY header, closing");
                return;
            }
            Err(_) => {
                tracing::warn!(proxy = %peer, "no PROXY header in time, closing");
                return;
            }
        }
    }
    let guard = shared
        .limits
        .acquire(peer.ip(), binding.b.limits.max_connections_per_ip);
    let settings = binding
        .b
        .settings_for(peer.ip(), &binding.config.smtp)
        .clone();
    let mut session = Session::new(settings, started);
    // The binding's own connection limit (the total and per-IP ones are in `guard`).
    let per_binding = binding.open.clone();
    let binding_count = per_binding.fetch_add(1, Ordering::Relaxed) + 1;
    let _binding_slot = BindingSlot(per_binding);
    let guard = guard.filter(|_| binding_count <= binding.b.limits.max_connections);
    let staged = ctx.queue.spool.staged();
    let mut conn = Conn {
        peer,
        binding,
        transport: Transport::Plain,
        tls: None,
        ctx,
        helo: String::new(),
        esmtp: false,
        txn: Txn::new(staged),
        messages: 0,
        auth_user: None,
        auth_failures: 0,
        unknown_rcpts: 0,
        // On a PROXY binding, a header from a source that is not a trusted proxy closes the
        // connection (checked on the first read).
        refuse_proxy_header: proxy_binding && !trusted_proxy,
        message_started: None,
    };
    let connect = Request {
        clock_ms: clock_ms(),
        ..Request::new(peer.ip(), aswl::unix_now())
    };
    let greet_delay = conn
        .binding
        .b
        .section
        .greet_delay
        .map(|d| d.0)
        .filter(|d| !d.is_zero());
    let known = match greet_delay {
        Some(_) => shared.greet.recall(peer.ip(), u64::from(connect.now)),
        None => Known::Unknown,
    };
    // Over the connection limits no check runs (no DNS work for a flood).
    let refused = if guard.is_none() {
        Some((
            &reply::TOO_MANY_CONNECTIONS,
            Reason::TooManyConnections,
            "refused: too many connections",
        ))
    } else if let Known::Bad(_) = known {
        Some((
            &reply::EARLY_TALKER,
            Reason::EarlyTalker,
            "refused: talked early or pipelined without the offer recently",
        ))
    } else {
        match conn.decide(Stage::Connect, &connect).await {
            Err(f) => Some((f.reply, f.reason, f.log)),
            Ok(_) => None,
        }
    };
    if let Some((r, reason, why)) = refused {
        shared.metrics.rejected(reason);
        conn.close_at_connect(&mut stream, &mut session, r, why)
            .await;
        return;
    }
    if let (Some(delay), Known::Unknown) = (greet_delay, known) {
        match greet_test(&mut stream, &session, delay, &early).await {
            Greet::Waited => {
                let until = u64::from(aswl::unix_now());
                let ttl = conn.binding.config.smtp.greet_pass_ttl.0.as_secs();
                shared.greet.remember(peer.ip(), false, until + ttl);
            }
            Greet::Talked => {
                conn.remember_bad();
                shared.metrics.rejected(Reason::EarlyTalker);
                // After a `220-` line: the client broke the reply, it gets the refusal as the
                // reply's last line (as postscreen does). What it sent is read and dropped
                // first: closing a socket with unread bytes resets it, and the reset would
                // overtake the refusal.
                discard_pending(&stream);
                conn.close_at_connect(
                    &mut stream,
                    &mut session,
                    &reply::EARLY_TALKER,
                    "refused: talked before the greeting",
                )
                .await;
                return;
            }
            Greet::Gone => {
                tracing::info!(client = %peer, binding = %conn.binding.b.section.name, "closed during the greeting delay");
                return;
            }
        }
    }
    shared
        .metrics
        .connection_opened(conn.binding.index, conn.ctx.core);
    let result = conn.serve(&mut stream, &mut session, early).await;
    if session.pipelined_unoffered() {
        shared.metrics.rejected(Reason::UnofferedPipelining);
        if greet_delay.is_some() {
            conn.remember_bad();
        }
    }
    shared
        .metrics
        .connection_closed(started.elapsed().as_secs_f64());
    tracing::info!(
        client = %peer,
        binding = %conn.binding.b.section.name,
        helo = ?conn.helo,
        tls = conn.tls.as_deref().unwrap_or("none"),
        messages = conn.messages,
        duration_ms = started.elapsed().as_millis() as u64,
        end = result.as_str(),
        "connection closed"
    );
    drop(guard);
}

/// How the greeting test ended.
enum Greet {
    /// The client waited for the whole greeting.
    Waited,
    /// It sent something before the greeting ended.
    Talked,
    /// It closed the connection.
    Gone,
}

/// postscreen's greeting test: send the greeting's first line as `220-`, wait `delay`, and
/// see whether the client sent anything meanwhile (RFC 5321 clients wait for the last line).
/// The socket is only peeked (no read is started and cancelled, RUNTIME.md §1.3); `early`
/// holds bytes that came with a PROXY header.
async fn greet_test(
    stream: &mut TcpStream,
    session: &Session,
    delay: std::time::Duration,
    early: &[u8],
) -> Greet {
    use monoio::io::AsyncWriteRentExt;
    let mut first = session.output().to_vec();
    if let Some(sep) = first.get_mut(3) {
        *sep = b'-';
    }
    if stream.write_all(first).await.0.is_err() {
        return Greet::Gone;
    }
    monoio::time::sleep(delay).await;
    if !early.is_empty() {
        return Greet::Talked;
    }
    let mut byte = 0u8;
    // SAFETY: `byte` is a valid one-byte buffer for the duration of the call; MSG_PEEK leaves
    // the data in the socket and MSG_DONTWAIT never blocks the core.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            (&raw mut byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => Greet::Gone,
        n if n > 0 => Greet::Talked,
        _ => match std::io::Error::last_os_error().kind() {
            std::io::ErrorKind::WouldBlock => Greet::Waited,
            _ => Greet::Gone,
        },
    }
}

/// Read and drop what the client has sent so far (at most 64 KiB, never waiting).
fn discard_pending(stream: &TcpStream) {
    let mut buf = [0u8; 4096];
    for _ in 0..16 {
        // SAFETY: `buf` is a valid writable buffer of its length for the duration of the call;
        // MSG_DONTWAIT never blocks the core.
        let n = unsafe {
            libc::recv(
                stream.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n <= 0 {
            return;
        }
    }
}

/// Read a PROXY v1/v2 header; returns the original client (None for LOCAL/UNKNOWN) and the
/// bytes that followed it.
async fn read_proxy_header(
    stream: &mut TcpStream,
) -> Result<(Option<SocketAddr>, Vec<u8>), &'static str> {
    use monoio::buf::IoBufMut;
    use monoio::io::AsyncReadRent;
    let mut buf: Vec<u8> = Vec::with_capacity(256);
    loop {
        match proxy::parse(&buf) {
            Ok(proxy::Parsed::Done(h, n)) => {
                let rest = buf.get(n..).unwrap_or_default().to_vec();
                let source = match h {
                    proxy::Header::Proxied { source, .. } => Some(source),
                    proxy::Header::Local => None,
                };
                return Ok((source, rest));
            }
            Ok(proxy::Parsed::Incomplete) => {}
            Err(proxy::Invalid(why)) => return Err(why),
        }
        if buf.len() >= 4096 {
            return Err("PROXY header too long");
        }
        buf.reserve(256);
        let len = buf.len();
        let (res, slice) = stream.read(buf.slice_mut(len..)).await;
        buf = slice.into_inner();
        match res {
            Ok(0) => return Err("closed before the PROXY header"),
            Ok(_) => {}
            Err(_) => return Err("read error"),
        }
    }
}

async fn write_out(
    transport: &mut Transport,
    stream: &mut TcpStream,
    session: &mut Session,
    spare: &mut Vec<u8>,
    limit: Duration,
) -> std::io::Result<()> {
    if session.output().is_empty() {
        return Ok(());
    }
    spare.clear();
    session.swap_output(spare);
    let buf = std::mem::take(spare);
    // A client that sends commands and never reads the replies would hold its connection
    // (and its slot) forever: the replies must be taken within the command timeout.
    let Ok((res, mut buf)) = monoio::time::timeout(limit, transport.write_all(stream, buf)).await
    else {
        return Err(std::io::ErrorKind::TimedOut.into());
    };
    buf.clear();
    *spare = buf;
    res
}

impl Conn {
    async fn serve(
        &mut self,
        stream: &mut TcpStream,
        session: &mut Session,
        early: Vec<u8>,
    ) -> End {
        let mut inbuf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
        let mut spare: Vec<u8> = Vec::with_capacity(512);
        let limit = self.binding.b.limits.command_timeout.0;
        if self.binding.b.section.tls == TlsMode::Implicit {
            // TLS from the first byte (RFC 8314): the greeting goes out after the handshake.
            if let Err(end) = self.start_tls(stream, session, &early).await {
                return end;
            }
        } else {
            inbuf.extend_from_slice(&early);
        }
        loop {
            let (consumed, next) = self.process(session, &inbuf);
            inbuf.drain(..consumed);
            // A message that will be refused keeps no content: its spill file and its share of
            // the staging budget go back now, not when its sender is done (or has trickled the
            // rest of it in for as long as the limits allow).
            if session.message_doomed() && !self.txn.content.is_empty() {
                self.txn.content.clear();
            }
            if write_out(&mut self.transport, stream, session, &mut spare, limit)
                .await
                .is_err()
            {
                return End::WriteError;
            }
            match next {
                Next::Flush => continue,
                Next::Close => return End::Closed,
                Next::Deliver => {
                    self.deliver(session).await;
                    continue;
                }
                Next::Auth(c) => {
                    self.authenticate(session, c).await;
                    continue;
                }
                Next::Decide(held) => {
                    let (pending, deferred) = *held;
                    self.decide_later(session, pending, deferred).await;
                    continue;
                }
                Next::StartTls => {
                    // The session refused STARTTLS if anything followed it in the buffer.
                    debug_assert!(inbuf.is_empty());
                    if let Err(end) = self.start_tls(stream, session, &[]).await {
                        return end;
                    }
                    continue;
                }
                Next::Read => {}
            }
            if self.ctx.shared.shutdown.load(Ordering::SeqCst) && !session.in_transaction() {
                session.close_with(&reply::SHUTTING_DOWN);
                let _ = write_out(&mut self.transport, stream, session, &mut spare, limit).await;
                return End::Shutdown;
            }
            if self.too_slow(session.message_size()) {
                self.ctx.shared.metrics.rejected(Reason::Timeout);
                session.close_with(&reply::TOO_SLOW);
                let _ = write_out(&mut self.transport, stream, session, &mut spare, limit).await;
                return End::TooSlow;
            }
            // The deadline as it is (a timeout from a duration would read the clock again).
            let until = monoio::time::Instant::from_std(session.deadline());
            let fd = stream.as_raw_fd();
            let idle = !session.in_transaction();
            if idle {
                self.ctx.idle.borrow_mut().insert(fd);
            }
            let read =
                monoio::time::timeout_at(until, self.transport.read(stream, inbuf, READ_CHUNK))
                    .await;
            if idle {
                self.ctx.idle.borrow_mut().remove(&fd);
            }
            if idle && self.ctx.shared.shutdown.load(Ordering::SeqCst) {
                session.close_with(&reply::SHUTTING_DOWN);
                let _ = write_out(&mut self.transport, stream, session, &mut spare, limit).await;
                return End::Shutdown;
            }
            match read {
                Err(_elapsed) => {
                    self.ctx.shared.metrics.rejected(Reason::Timeout);
                    session.check_timeout(Instant::now());
                    let _ =
                        write_out(&mut self.transport, stream, session, &mut spare, limit).await;
                    return End::Timeout;
                }
                Ok((Ok(0), _)) => return End::ClientClosed,
                Ok((Ok(_), b)) => {
                    inbuf = b;
                    if std::mem::take(&mut self.refuse_proxy_header)
                        && proxy::looks_like_header(&inbuf)
                    {
                        tracing::warn!(client = %self.peer, "PROXY header from an untrusted source, closing");
                        return End::UntrustedProxyHeader;
                    }
                }
                Ok((Err(_), _)) => return End::ReadError,
            }
        }
    }

    /// Answer `r` instead of (the rest of) the greeting, close, and log `why`.
    async fn close_at_connect(
        &mut self,
        stream: &mut TcpStream,
        session: &mut Session,
        r: &reply::Reply,
        why: &str,
    ) {
        session.clear_output();
        session.close_with(r);
        let _ = write_out(
            &mut self.transport,
            stream,
            session,
            &mut Vec::new(),
            self.binding.b.limits.command_timeout.0,
        )
        .await;
        tracing::info!(client = %self.peer, binding = %self.binding.b.section.name, "{why}");
    }

    /// Remember this client as one that broke the protocol (`smtp.early_talker_ttl`).
    fn remember_bad(&self) {
        let until =
            u64::from(aswl::unix_now()) + self.binding.config.smtp.early_talker_ttl.0.as_secs();
        self.ctx.shared.greet.remember(self.peer.ip(), true, until);
    }

    /// Check credentials on the AUTH threads (argon2 is slow by design). A client address
    /// with too many recent failures is turned away before any work; each failure in a session
    /// delays the answer a little more (1 s, 2 s, … up to 5 s) to slow guessing, and counts as
    /// a protocol error (`max_errors`).
    async fn authenticate(&mut self, session: &mut Session, c: Credentials) {
        let shared = &self.ctx.shared;
        let cfg = &self.binding.config.auth;
        let ip = self.peer.ip();
        let window = cfg.failure_window.0;
        if shared
            .auth_failures
            .blocked(ip, Instant::now(), cfg.max_failures, window)
        {
            shared.metrics.auth(false);
            tracing::warn!(client = %self.peer, user = ?c.username, "authentication refused: too many failures from this address");
            session.reject(&reply::AUTH_TOO_MANY_FAILURES);
            return;
        }
        let authz_ok = c.authzid.is_empty() || c.authzid == c.username;
        let user = c.username.clone();
        let ok = if authz_ok {
            match shared
                .verifier
                .verify(self.binding.users.clone(), c.username, c.password)
            {
                Some(rx) => rx.await.unwrap_or(false),
                None => {
                    tracing::warn!(client = %self.peer, "authentication deferred: the AUTH queue is full");
                    session.reject(&reply::AUTH_BUSY);
                    return;
                }
            }
        } else {
            false
        };
        shared.metrics.auth(ok);
        if ok {
            tracing::info!(client = %self.peer, user = ?user, "authenticated");
            self.auth_user = Some(user);
            session.accept();
        } else {
            self.auth_failures += 1;
            shared.auth_failures.record(ip, Instant::now(), window);
            tracing::warn!(client = %self.peer, user = ?user, failures = self.auth_failures, "authentication failed");
            let delay = std::time::Duration::from_secs(u64::from(self.auth_failures.min(5)));
            monoio::time::sleep(delay).await;
            session.reject(&reply::AUTH_FAILED);
        }
    }

    /// Handshake (bounded by the command timeout), then reset the session (RFC 3207 §4.2).
    async fn start_tls(
        &mut self,
        stream: &mut TcpStream,
        session: &mut Session,
        early: &[u8],
    ) -> Result<(), End> {
        let Some(cfg) = self.binding.tls.clone() else {
            return Err(End::TlsNotConfigured);
        };
        self.transport = Transport::tls(cfg).map_err(|_| End::TlsSetupFailed)?;
        self.transport
            .feed_ciphertext(early)
            .map_err(|_| End::TlsHandshakeFailed)?;
        let limit = self.binding.b.limits.command_timeout.0;
        let shake = monoio::time::timeout(limit, self.transport.handshake(stream)).await;
        self.ctx.shared.metrics.tls(matches!(shake, Ok(Ok(()))));
        match shake {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::info!(client = %self.peer, error = %e, "TLS handshake failed");
                return Err(End::TlsHandshakeFailed);
            }
            Err(_) => return Err(End::TlsHandshakeTimeout),
        }
        self.tls = self.transport.tls_description();
        session.tls_established();
        Ok(())
    }

    /// `min_data_rate`: the message so far arrived slower than the minimum average rate
    /// (checked from one second into the transfer).
    fn too_slow(&self, received: u64) -> bool {
        let min = self.binding.b.limits.min_data_rate.0;
        match self.message_started {
            Some(t) if min > 0 => {
                let secs = t.elapsed().as_secs_f64();
                secs >= 1.0 && (received as f64) < min as f64 * secs
            }
            _ => false,
        }
    }

    /// What the pipeline sees of this session (`rcpt` empty outside RCPT; `rcpt_domain` as
    /// the address parser found it).
    fn request<'a>(
        &'a self,
        session: &Session,
        rcpt: &'a str,
        rcpt_domain: &'a str,
    ) -> Request<'a> {
        Request {
            authenticated: session.is_authenticated(),
            helo: &self.helo,
            mail_from: &self.txn.mail_from,
            rcpt,
            rcpt_domain,
            unknown_rcpts: self.unknown_rcpts,
            clock_ms: clock_ms(),
            ..Request::new(self.peer.ip(), aswl::unix_now())
        }
    }

    /// Run a stage to its end, waiting for deferred checks (used where the session can wait
    /// in place: connect and end of data).
    async fn decide(&self, stage: Stage, r: &Request<'_>) -> Result<Effects, Refusal> {
        self.settle(self.binding.pipeline.run(stage, r), r).await
    }

    /// Wait for the deferred checks of a run, resuming it after each.
    async fn settle(&self, mut outcome: Outcome, r: &Request<'_>) -> Result<Effects, Refusal> {
        // The check waited for last and its deadline.
        let mut waited: Option<Waited> = None;
        loop {
            match outcome {
                Outcome::Accept(e) => return Ok(e),
                Outcome::Reject(f) => return Err(f),
                Outcome::Defer(d) => {
                    let deadline = self.deadline(&d.resume, waited);
                    waited = Some((d.resume.waiting_for(), deadline));
                    let answer = self.run_deferred(d.job, &d.resume, deadline).await;
                    outcome = self.binding.pipeline.resume(d.resume, answer, r);
                }
            }
        }
    }

    /// When the check a run waits for must have answered: the deadline of its earlier wait
    /// when it defers again (its work moved elsewhere), so the session waits one time limit
    /// per check; else its time limit (or the command timeout) from now.
    fn deadline(
        &self,
        resume: &crate::policy::pipeline::Resume,
        waited: Option<Waited>,
    ) -> Instant {
        match waited {
            Some((check, deadline)) if check == resume.waiting_for() => deadline,
            _ => {
                Instant::now()
                    + self
                        .binding
                        .pipeline
                        .time_limit(resume)
                        .unwrap_or(self.binding.b.limits.command_timeout.0)
            }
        }
    }

    /// A deferred check's job on the policy workers (or its work running elsewhere), until
    /// `deadline`; a full queue, a lost job or a timeout gets the check's own `unavailable`
    /// answer (`451 4.3.0` unless the check says otherwise).
    async fn run_deferred(
        &self,
        job: crate::policy::pipeline::Job,
        resume: &crate::policy::pipeline::Resume,
        deadline: Instant,
    ) -> crate::policy::pipeline::Decision {
        let pipeline = &self.binding.pipeline;
        let rx = match job {
            crate::policy::pipeline::Job::Blocking(f) => {
                match self.ctx.shared.policy_workers.submit(f) {
                    Some(rx) => rx,
                    None => return pipeline.unavailable(resume),
                }
            }
            crate::policy::pipeline::Job::Running(rx) => rx,
        };
        match monoio::time::timeout_at(monoio::time::Instant::from_std(deadline), rx).await {
            Ok(Ok(d)) => d,
            _ => pipeline.unavailable(resume),
        }
    }

    /// Count and log a refusal, answer it, and close the session when it says so.
    fn refuse(&mut self, session: &mut Session, f: Refusal) {
        self.ctx.shared.metrics.rejected(f.reason);
        if f.reason == Reason::UnknownRecipient {
            self.unknown_rcpts += 1;
        }
        tracing::debug!(client = %self.peer, reason = f.log, "policy refusal");
        session.reject(f.reply);
        if let Some((r, reason)) = f.close {
            tracing::info!(client = %self.peer, unknown = self.unknown_rcpts, reason = f.log, "closing: too many refusals");
            self.ctx.shared.metrics.rejected(reason);
            session.close_with(r);
        }
    }

    fn start_mail(&mut self, session: &mut Session, m: MailArgs) {
        self.txn.clear();
        self.txn.mail_from = m.from;
        self.txn.dsn.ret = m.ret;
        self.txn.dsn.envid = m.envid;
        self.txn.binary = m.binary;
        session.accept();
    }

    fn add_rcpt(&mut self, session: &mut Session, r: RcptArgs, whitelisted: Option<bool>) {
        self.txn.rcpts.push(r.to);
        self.txn.verdicts.push(whitelisted);
        self.txn.push_rcpt_dsn(r.dsn);
        session.accept();
    }

    /// Finish a MAIL or RCPT after its deferred check answered.
    async fn decide_later(&mut self, session: &mut Session, pending: Pending, d: Deferred) {
        let settled = {
            let r = match &pending {
                Pending::Rcpt(a) => {
                    self.request(session, &a.to, a.to.get(a.domain_at..).unwrap_or(""))
                }
                Pending::Mail(m) => Request {
                    mail_from: &m.from,
                    ..self.request(session, "", "")
                },
            };
            self.settle(Outcome::Defer(d), &r).await
        };
        match (settled, pending) {
            (Ok(_), Pending::Mail(m)) => self.start_mail(session, m),
            (Ok(e), Pending::Rcpt(r)) => self.add_rcpt(session, r, e.whitelisted()),
            (Err(f), _) => self.refuse(session, f),
        }
    }

    /// Run the session over the buffered input; return bytes consumed and what to do next.
    fn process(&mut self, session: &mut Session, input: &[u8]) -> (usize, Next) {
        let mut feed = session.feed(input, Instant::now());
        loop {
            let Some(ev) = feed.next() else {
                let next = match feed.stop() {
                    Stop::NeedInput | Stop::Decision => Next::Read,
                    Stop::Flush => Next::Flush,
                    Stop::StartTls => Next::StartTls,
                    Stop::Close => Next::Close,
                };
                return (feed.consumed(), next);
            };
            match ev {
                Event::Helo { host, extended } => {
                    self.helo.clear();
                    self.helo.push_str(host);
                    self.esmtp = extended;
                    self.txn.clear();
                }
                Event::Mail { from, params } => {
                    let m = MailArgs {
                        from: from.map_or_else(String::new, |a| a.as_str().to_string()),
                        ret: params.ret.map(|r| match r {
                            Ret::Full => DsnRet::Full,
                            Ret::Hdrs => DsnRet::Hdrs,
                        }),
                        envid: params.envid.map(String::from),
                        binary: params.body == Some(Body::BinaryMime),
                    };
                    // The sender is seen by the MAIL checks before the transaction starts.
                    let outcome = {
                        let r = Request {
                            mail_from: &m.from,
                            ..self.request(&feed, "", "")
                        };
                        self.binding.pipeline.run(Stage::Mail, &r)
                    };
                    match outcome {
                        Outcome::Accept(_) => self.start_mail(&mut feed, m),
                        Outcome::Reject(f) => self.refuse(&mut feed, f),
                        Outcome::Defer(d) => {
                            let held = Box::new((Pending::Mail(m), d));
                            return (feed.consumed(), Next::Decide(held));
                        }
                    }
                }
                Event::Rcpt { to, params } => {
                    let outcome = {
                        let r = self.request(&feed, to.as_str(), to.domain());
                        self.binding.pipeline.run(Stage::Rcpt, &r)
                    };
                    let args = RcptArgs {
                        to: to.as_str().to_string(),
                        domain_at: to.as_str().len().saturating_sub(to.domain().len()),
                        dsn: RcptDsn {
                            notify: params.notify,
                            orcpt: params.orcpt.map(String::from),
                        },
                    };
                    match outcome {
                        Outcome::Accept(e) => self.add_rcpt(&mut feed, args, e.whitelisted()),
                        Outcome::Reject(f) => self.refuse(&mut feed, f),
                        Outcome::Defer(d) => {
                            let held = Box::new((Pending::Rcpt(args), d));
                            return (feed.consumed(), Next::Decide(held));
                        }
                    }
                }
                Event::MessageStart => {
                    self.txn.content.clear();
                    self.message_started = Some(Instant::now());
                }
                Event::Body(b) => self.txn.content.push(b),
                Event::MessageEnd { .. } => {
                    self.message_started = None;
                    return (feed.consumed(), Next::Deliver);
                }
                Event::MessageAborted { reason } => {
                    self.message_started = None;
                    self.ctx.shared.metrics.rejected(match reason {
                        AbortReason::TooBig => Reason::TooBig,
                        AbortReason::BareLineEnding => Reason::BareLineEnding,
                        AbortReason::Nul => Reason::Nul,
                        AbortReason::FoldedFirstLine => Reason::FoldedFirstLine,
                    });
                    self.txn.clear();
                }
                Event::Reset => {
                    self.message_started = None;
                    self.txn.clear();
                }
                Event::StartTls | Event::Quit => {}
                Event::Auth(c) => return (feed.consumed(), Next::Auth(c)),
            }
        }
    }

    /// Outbound mail with `[aswl]`: what the message teaches, as the change-log record to
    /// commit with it. `Err` when the log cannot be written (the message is refused).
    fn collect_aswl(&self, env: &Envelope, content: &[u8]) -> std::io::Result<Option<AswlLog>> {
        match (&self.binding.config.aswl, &self.ctx.shared.aswl) {
            (Some(s), Some(a)) if env.direction == Direction::Outbound => {
                let m = aswl::Outbound {
                    queue_id: &env.queue_id,
                    client: env.client_ip,
                    sender: &env.mail_from,
                    rcpts: &env.rcpts,
                    content,
                };
                a.collect(s, self.ctx.core, &m, aswl::unix_now())
            }
            _ => Ok(None),
        }
    }

    /// Make the message durable, then answer: 250 only once it is on disk (messages whose
    /// every recipient goes to a `discard` route are not spooled). Inbound mail whose
    /// recipients got different whitelist verdicts is stored as one copy per verdict, each with
    /// a true verdict header.
    async fn deliver(&mut self, session: &mut Session) {
        let queue_id = self.ctx.queue.next_queue_id();
        let mut env = Envelope {
            queue_id: queue_id.clone(),
            mail_from: std::mem::take(&mut self.txn.mail_from),
            rcpts: std::mem::take(&mut self.txn.rcpts),
            client_ip: self.peer.ip(),
            helo: self.helo.clone(),
            tls: self.tls.clone(),
            authenticated_as: self.auth_user.clone(),
            binding: self.binding.b.section.name.clone(),
            esmtp: self.esmtp,
            is_bounce: false,
            direction: self.binding.b.section.direction,
            received_at: SystemTime::now(),
            aswl: None,
            dmarc_quarantine: false,
            sender_verified: false,
            dsn: std::mem::take(&mut self.txn.dsn),
            binary: self.txn.binary,
        };
        let mut content = std::mem::replace(&mut self.txn.content, self.ctx.queue.spool.staged());
        let size = content.len();
        if let Some(e) = content.take_error() {
            tracing::error!(queue_id = %queue_id, error = %e, "cannot stage the message content");
            self.ctx.shared.metrics.rejected(Reason::Storage);
            session.reject(if drop_folder::is_storage_full(&e) {
                &reply::STORAGE_FULL
            } else {
                &reply::STORAGE_ERROR
            });
            self.txn.clear();
            return;
        }
        // BINARYMIME content may hold lone CRs and LFs, but not in its header section: a lone
        // CR ends a line for some readers and is white space for others (mail-parser), so the
        // fields ringmx strips and those a next hop reads could differ.
        if env.binary && aswl::detect::header_has_bare_line_end(content.prefix()) {
            tracing::info!(queue_id = %queue_id, client = %self.peer.ip(), "message refused: bare CR or LF in the header section of BINARYMIME content");
            self.ctx.shared.metrics.rejected(Reason::BareLineEnding);
            session.reject(&reply::BARE_LINE_ENDING);
            self.txn.clear();
            return;
        }
        let header_len = aswl::detect::header_len(content.prefix());
        let outcome = {
            let r = Request {
                mail_from: &env.mail_from,
                header: content.prefix().get(..header_len).unwrap_or_default(),
                header_complete: content.header_fits(header_len),
                content: Some(&content),
                ..self.request(session, "", "")
            };
            self.decide(Stage::Data, &r).await
        };
        let (added, authenticated) = match outcome {
            Ok(e) => {
                let a = e.authenticated();
                (e.headers, a)
            }
            Err(f) => {
                tracing::info!(queue_id = %queue_id, client = %self.peer.ip(), reason = f.log, authentication = f.detail.as_deref().map(tracing::field::display), "message refused");
                self.refuse(session, f);
                self.txn.clear();
                return;
            }
        };
        env.dmarc_quarantine = authenticated.as_ref().is_some_and(|a| a.quarantine());
        // Where senders are verified, only SPF vouches for one; where they are not, there is
        // nothing to go by and notices go as asked.
        let verifying =
            self.binding.config.authentication.verify && env.direction == Direction::Inbound;
        env.sender_verified = !verifying || authenticated.as_ref().is_some_and(|a| a.spf.is_some());
        if !env.reflects() {
            env.dsn.limit_to_failures(env.rcpts.len());
        }
        // A whitelist pass counts only for an authenticated sender (`require_authentication`):
        // passes of an unauthenticated one become `none` before the routes are chosen.
        let mut verdicts = std::mem::take(&mut self.txn.verdicts);
        let sender_domain = env.mail_from.rsplit_once('@').map_or("", |(_, d)| d);
        let mut downgraded = vec![false; verdicts.len()];
        let mut auth_word = "";
        if let Some(s) = &self.binding.config.aswl
            && env.direction == Direction::Inbound
            && verdicts.contains(&Some(true))
        {
            match crate::policy::authenticate::whitelist_authentication(
                s.require_authentication,
                &self.binding.config.authentication.suffixes,
                authenticated.as_deref(),
                &env.mail_from,
            ) {
                Some(w) => auth_word = w,
                None => {
                    for (v, d) in verdicts.iter_mut().zip(downgraded.iter_mut()) {
                        if *v == Some(true) {
                            *v = Some(false);
                            *d = true;
                        }
                    }
                    tracing::info!(queue_id = %queue_id, sender = ?env.mail_from, "aswl: whitelisted sender not authenticated; verdict none");
                }
            }
        }
        let verdict = |i: usize| verdicts.get(i).copied().flatten();
        // Routing happens here, once: the queue uses these routes while the configuration
        // stays the same.
        let mut all_discard = true;
        let mut routing = crate::delivery::Routing {
            generation: self.binding.generation,
            routes: Vec::with_capacity(env.rcpts.len()),
        };
        for (i, r) in env.rcpts.iter().enumerate() {
            let domain = r.rsplit_once('@').map_or("", |(_, d)| d);
            match self.binding.config.route_for(
                domain,
                sender_domain,
                RouteFacts {
                    aswl: verdict(i),
                    ..env.route_facts()
                },
            ) {
                Some((ri, route)) => {
                    all_discard &= route.action == RouteAction::Discard;
                    routing.routes.push(ri);
                }
                None => {
                    self.ctx.shared.metrics.rejected(Reason::NoRoute);
                    session.reject(&reply::NO_ROUTE);
                    self.txn.clear();
                    return;
                }
            }
        }
        let mut log = match self.collect_aswl(&env, content.prefix()) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(queue_id = %queue_id, error = %e, "aswl: cannot write the change log; message refused");
                self.ctx.shared.metrics.rejected(Reason::Storage);
                session.reject(&reply::STORAGE_ERROR);
                self.txn.clear();
                return;
            }
        };
        // RFC 8601 §5: results a client wrote in our name are removed (ours are added), on
        // every inbound binding: with verification off, mail servers inside still trust them.
        if env.direction == Direction::Inbound
            && let Some(stripped) = crate::policy::authenticate::strip_ours(
                content.prefix(),
                self.binding.config.authserv_id(),
            )
        {
            content.set_prefix(stripped);
        }
        let verdict_header = match (&self.binding.config.aswl, &self.ctx.shared.aswl) {
            (Some(s), Some(a)) if env.direction == Direction::Inbound => {
                a.saw_inbound(s, &env.mail_from, &env.rcpts, aswl::unix_now());
                // A verdict header sent by the client is never passed on.
                if let Some(stripped) = s.strip_verdict(content.prefix()) {
                    content.set_prefix(stripped);
                }
                Some(s.clone())
            }
            _ => None,
        };
        let mut env = std::rc::Rc::new(env);
        let result = if all_discard {
            self.ctx
                .shared
                .metrics
                .delivery("discarded", env.rcpts.len() as u64);
            match log.take() {
                Some((seg, bytes)) => self
                    .ctx
                    .queue
                    .spool
                    .append_durable(&seg, &bytes)
                    .await
                    .map(|()| "discarded"),
                None => Ok("discarded"),
            }
        } else {
            // One copy per verdict (in recipient order of first appearance); a message whose
            // recipients all got the same one is stored as it came.
            let verdict_of = |i: usize| verdict_header.as_ref().and_then(|_| verdict(i));
            let mut kinds: Vec<Option<bool>> = Vec::with_capacity(2);
            for v in (0..env.rcpts.len()).map(verdict_of) {
                if !kinds.contains(&v) {
                    kinds.push(v);
                }
            }
            // Content that fits in memory stays there for the first attempt; a larger one is
            // read back from the spool when it is delivered.
            let memory = (!content.spilled()).then(|| Arc::new(content.take_prefix()));
            let mut result = Ok("queued");
            for (n, &v) in kinds.iter().enumerate() {
                let mut copy_routing = routing.clone();
                // One copy: the envelope as it came (shared with the queue, not copied).
                let e = if let [only] = kinds.as_slice() {
                    std::rc::Rc::make_mut(&mut env).aswl = *only;
                    std::rc::Rc::clone(&env)
                } else {
                    let mut e = Envelope::clone(&env);
                    if n > 0 {
                        e.queue_id = self.ctx.queue.next_queue_id();
                    }
                    let mine: Vec<usize> = (0..env.rcpts.len())
                        .filter(|&i| verdict_of(i) == v)
                        .collect();
                    e.rcpts = mine
                        .iter()
                        .filter_map(|&i| env.rcpts.get(i).cloned())
                        .collect();
                    e.dsn = env.dsn.select(&mine);
                    copy_routing = routing.select(&mine);
                    e.aswl = v;
                    std::rc::Rc::new(e)
                };
                let mut received = trace::received(&e, &self.binding.b.settings.config().hostname);
                for h in &added {
                    received.push_str(h);
                    received.push_str("\r\n");
                }
                if let Some(s) = &verdict_header {
                    // Why: how a pass was authenticated; `none` because authentication failed
                    // when that is so for every recipient of this copy.
                    let unauthenticated = v == Some(false)
                        && (0..verdicts.len())
                            .filter(|&i| verdict(i) == Some(false))
                            .all(|i| downgraded.get(i) == Some(&true));
                    let why = match v {
                        Some(true) if !auth_word.is_empty() => format!("auth={auth_word}"),
                        _ if unauthenticated => "reason=unauthenticated".to_string(),
                        _ => String::new(),
                    };
                    received.push_str(&s.verdict_header_why(v, &why));
                }
                let extra = log.as_ref().map(|(seg, b)| (seg, b.as_slice()));
                let spool = &self.ctx.queue.spool;
                let stored = match &memory {
                    Some(m) => spool.store(&e, &received, m, extra).await,
                    None => spool.store_staged(&e, &received, &content, extra).await,
                };
                match stored {
                    Ok(spooled) => {
                        log = None;
                        let k = e.rcpts.len();
                        self.ctx.queue.enqueue(
                            e,
                            received,
                            memory.clone(),
                            spooled,
                            crate::spool::all_indexes(k),
                            Some(copy_routing),
                        );
                    }
                    Err(err) => {
                        result = Err(err);
                        break;
                    }
                }
            }
            result
        };
        match result {
            Ok(how) => {
                self.messages += 1;
                self.ctx
                    .shared
                    .metrics
                    .message_accepted(self.binding.index, size as u64);
                session.accept_message(&queue_id);
                tracing::info!(
                    queue_id = %queue_id,
                    client = %self.peer.ip(),
                    helo = ?self.helo,
                    tls = self.tls.as_deref().unwrap_or("none"),
                    auth = ?self.auth_user.as_deref().unwrap_or("-"),
                    from = ?env.mail_from,
                    to = ?env.rcpts.join(","),
                    size,
                    result = how,
                    authentication = authenticated.as_deref().map(tracing::field::display),
                    "message"
                );
            }
            Err(e) => {
                let r = if drop_folder::is_storage_full(&e) {
                    &reply::STORAGE_FULL
                } else {
                    &reply::STORAGE_ERROR
                };
                tracing::error!(queue_id = %queue_id, error = %e, "cannot spool the message");
                self.ctx.shared.metrics.rejected(Reason::Storage);
                session.reject(r);
            }
        }
        self.txn.clear();
    }
}
