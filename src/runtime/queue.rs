//! The delivery queue of one core: messages this core spooled (or recovered at startup),
//! attempted at once and then on the retry schedule; results recorded in the spool; bounces
//! for permanent failures and expiry; the admin commands behind `ringmx queue`.

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::Shared;
use super::outbound::{HopKey, HopSettings, Outcome, Pool};
use crate::config::{Config, Direction, RouteAction, RouteSection};
use crate::delivery::outcome;
use crate::delivery::trace::for_terminal;
use crate::delivery::{self, Envelope, drop_folder, trace};
use crate::relay::dns::{Dns, Targets};
use crate::relay::dsn::{self, RcptStatus};
use crate::relay::failure::Failure;
use crate::relay::reply::Reply;
use crate::spool::{CoreSpool, Recovered, Spooled};

/// Where an entry stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Being delivered now or waiting for a delivery slot.
    Active,
    /// Waiting for its next attempt.
    Deferred,
    /// Kept until released.
    Held,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Active => "active",
            State::Deferred => "deferred",
            State::Held => "held",
        }
    }
}

/// Content kept in memory per core for first attempts (beyond it, a new message is read back
/// from the spool when its turn comes): a queue that cannot drain holds no more than this.
const HOLD_BUDGET: usize = 32 << 20;
/// Content read back from the spool for attempts in flight, per core (one message larger than
/// this still goes, alone). With the payload a relay attempt builds from it, twice this is the
/// memory a core's deliveries of spooled mail take, however many are queued.
const READ_BUDGET: u64 = 8 << 20;

/// Content held in memory, counted against [`HOLD_BUDGET`] until dropped.
struct Held {
    data: Arc<Vec<u8>>,
    budget: Rc<Cell<usize>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget
            .set(self.budget.get().saturating_sub(self.data.len()));
    }
}

struct Entry {
    /// Shared with a running attempt (which reads them across awaits) without a copy.
    env: Rc<Envelope>,
    trace: Rc<str>,
    /// The content while it is in memory (until the first attempt is over).
    content: Option<Held>,
    spooled: Spooled,
    /// Recipient indexes not yet finished.
    pending: Vec<u32>,
    attempts: u32,
    next_attempt: Instant,
    state: State,
    running: bool,
    last_error: String,
    delay_notified: bool,
    /// Set by `delete`: drop without bouncing when the running attempt ends.
    deleted: bool,
    /// The routes chosen at acceptance (`None` for notices and recovered messages).
    routing: Option<delivery::Routing>,
}

/// A request from the admin endpoint, answered on `reply`.
#[derive(Debug)]
pub struct Command {
    pub op: Op,
    pub reply: std::sync::mpsc::Sender<String>,
}

pub use crate::delivery::QueueOp as Op;

/// How often idle next-hop connections are swept and old segments copied forward.
const MAINTENANCE: Duration = Duration::from_secs(1);

pub(crate) struct CoreQueue {
    pub core: usize,
    pub shared: Arc<Shared>,
    pub spool: CoreSpool,
    entries: RefCell<HashMap<String, Rc<RefCell<Entry>>>>,
    timers: RefCell<BinaryHeap<Reverse<(Instant, String)>>>,
    running: Cell<usize>,
    /// Bytes of content held in memory ([`HOLD_BUDGET`]).
    held: Rc<Cell<usize>>,
    /// Bytes being read back from the spool by attempts in flight ([`READ_BUDGET`]).
    reading: Cell<u64>,
    pool: Pool,
    hop_settings: RefCell<HashMap<(u64, usize), Rc<HopSettings>>>,
    counter: Cell<u16>,
    counts: Cell<[i64; 3]>,
}

/// What happened to one recipient in an attempt, with the reply that said so.
#[derive(Clone)]
enum Result_ {
    /// Done; the success notice it warrants when the recipient asked for one (`None`: none
    /// from here — the hop took the request on, or the route discards).
    Delivered(Option<dsn::Kind>),
    Failed(Reply, Option<String>),
    Deferred(Reply),
}

impl Result_ {
    fn attempted(self) -> outcome::Attempted {
        match self {
            Result_::Delivered(k) => outcome::Attempted::Delivered(k),
            Result_::Failed(r, remote_mta) => outcome::Attempted::Failed {
                status: r.status(),
                diagnostic: r.one_line(),
                remote_mta,
            },
            Result_::Deferred(r) => outcome::Attempted::Deferred {
                status: r.status(),
                diagnostic: r.one_line(),
            },
        }
    }
}

impl CoreQueue {
    pub(crate) fn new(core: usize, shared: Arc<Shared>, spool: CoreSpool) -> CoreQueue {
        CoreQueue {
            core,
            shared,
            spool,
            entries: RefCell::new(HashMap::new()),
            timers: RefCell::new(BinaryHeap::new()),
            running: Cell::new(0),
            held: Rc::new(Cell::new(0)),
            reading: Cell::new(0),
            pool: Pool::default(),
            hop_settings: RefCell::new(HashMap::new()),
            counter: Cell::new(0),
            counts: Cell::new([0; 3]),
        }
    }

    /// Delivery attempts in flight.
    pub(crate) fn running(&self) -> usize {
        self.running.get()
    }

    pub(crate) fn next_queue_id(&self) -> String {
        let n = self.counter.get().wrapping_add(1);
        self.counter.set(n);
        delivery::queue_id(SystemTime::now(), self.core, n)
    }

    fn count(&self, s: State, d: i64) {
        let mut c = self.counts.get();
        if let Some(x) = c.get_mut(s as usize) {
            *x += d;
        }
        self.counts.set(c);
        self.shared.metrics.queue_size(self.core, c);
    }

    fn set_state(&self, e: &mut Entry, s: State) {
        if e.state != s {
            self.count(e.state, -1);
            self.count(s, 1);
            e.state = s;
        }
    }

    /// Take a durably spooled message and start delivering it.
    pub(crate) fn enqueue(
        self: &Rc<Self>,
        env: Rc<Envelope>,
        trace: String,
        content: Option<Arc<Vec<u8>>>,
        spooled: Spooled,
        pending: Vec<u32>,
        routing: Option<delivery::Routing>,
    ) {
        let id = env.queue_id.clone();
        let e = self.insert(env, trace, content, spooled, pending);
        e.borrow_mut().routing = routing;
        self.try_start(id, e);
    }

    fn insert(
        &self,
        env: Rc<Envelope>,
        trace: String,
        content: Option<Arc<Vec<u8>>>,
        spooled: Spooled,
        pending: Vec<u32>,
    ) -> Rc<RefCell<Entry>> {
        let id = env.queue_id.clone();
        let content = content.and_then(|data| {
            let held = self.held.get() + data.len();
            (held <= HOLD_BUDGET).then(|| {
                self.held.set(held);
                Held {
                    data,
                    budget: self.held.clone(),
                }
            })
        });
        let e = Entry {
            env,
            trace: trace.into(),
            content,
            spooled,
            pending,
            attempts: 0,
            next_attempt: Instant::now(),
            state: State::Active,
            running: false,
            last_error: String::new(),
            delay_notified: false,
            deleted: false,
            routing: None,
        };
        self.count(State::Active, 1);
        let e = Rc::new(RefCell::new(e));
        self.entries.borrow_mut().insert(id, e.clone());
        e
    }

    /// Re-queue what recovery found (assigned to this core); held messages stay held.
    pub(crate) fn adopt(self: &Rc<Self>, r: Recovered) {
        let spooled = Spooled {
            seg: r.seg,
            content_at: r.record.content_at,
            content_len: r.record.content_len,
        };
        let id = r.record.env.queue_id.clone();
        let e = self.insert(
            Rc::new(r.record.env),
            r.record.trace,
            None,
            spooled,
            r.pending,
        );
        if r.held {
            let mut b = e.borrow_mut();
            self.set_state(&mut b, State::Held);
            b.last_error = "held".into();
        } else {
            self.try_start(id, e);
        }
    }

    /// Start an attempt now, or leave it to the scheduler (returns false) when the delivery
    /// slots or the read budget are used up.
    fn try_start(self: &Rc<Self>, id: String, e: Rc<RefCell<Entry>>) -> bool {
        if self
            .shared
            .shutdown
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return false;
        }
        let limit = self.shared.live().config.queue.concurrency.max(1);
        let read = {
            let b = e.borrow();
            if b.content.is_some() {
                0
            } else {
                b.spooled.content_len
            }
        };
        let reading = self.reading.get();
        // Only reads wait for the read budget; in-memory content (read = 0) never does.
        if self.running.get() >= limit || (read > 0 && reading > 0 && reading + read > READ_BUDGET)
        {
            // Picked up by the scheduler as slots free.
            self.timers.borrow_mut().push(Reverse((Instant::now(), id)));
            return false;
        }
        {
            let mut b = e.borrow_mut();
            if b.running || b.state == State::Held {
                return true;
            }
            b.running = true;
            self.set_state(&mut b, State::Active);
        }
        self.running.set(self.running.get() + 1);
        self.reading.set(reading + read);
        let q = self.clone();
        monoio::spawn(async move {
            q.attempt(&e).await;
            q.reading.set(q.reading.get().saturating_sub(read));
            q.running.set(q.running.get().saturating_sub(1));
            e.borrow_mut().running = false;
            // A slot is free: take the next message waiting for one.
            q.start_due();
        });
        true
    }

    /// Start entries whose attempt is due, while delivery slots are free.
    fn start_due(self: &Rc<Self>) {
        let now = Instant::now();
        let limit = self.shared.live().config.queue.concurrency.max(1);
        while self.running.get() < limit {
            let due = {
                let mut t = self.timers.borrow_mut();
                match t.peek() {
                    Some(Reverse((at, _))) if *at <= now => t.pop().map(|Reverse((_, id))| id),
                    _ => None,
                }
            };
            let Some(id) = due else { break };
            let e = self.entries.borrow().get(&id).cloned();
            if let Some(e) = e {
                let due_now = {
                    let b = e.borrow();
                    b.next_attempt <= now && !b.running && b.state != State::Held
                };
                if due_now && !self.try_start(id, e) {
                    break;
                }
            }
        }
    }

    /// The scheduler: retries when due, admin commands, idle connections, copy-forward.
    /// It sleeps until the next retry is due or the next maintenance (every second), and
    /// wakes at once for an admin command.
    pub(crate) async fn scheduler(
        self: Rc<Self>,
        mut commands: tokio::sync::mpsc::UnboundedReceiver<Command>,
    ) {
        let mut last_maintenance = Instant::now();
        while !self
            .shared
            .shutdown
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            self.start_due();
            if last_maintenance.elapsed() >= MAINTENANCE {
                last_maintenance = Instant::now();
                let cfg = self.shared.live().config.clone();
                self.pool.sweep(cfg.queue.idle_timeout.0).await;
                self.copy_forward(cfg.queue.copy_forward_after.0).await;
            }
            // A retry already due that start_due left waits for a slot: the attempt that
            // frees it starts it, so only future retries set the alarm.
            let now = Instant::now();
            let next_timer = self.timers.borrow().peek().map(|Reverse((at, _))| *at);
            let wake = match next_timer {
                Some(t) if t > now => t.min(last_maintenance + MAINTENANCE),
                _ => last_maintenance + MAINTENANCE,
            };
            let wait = wake.saturating_duration_since(now);
            monoio::select! {
                cmd = commands.recv() => match cmd {
                    Some(cmd) => {
                        let answer = self.command(&cmd.op);
                        let _ = cmd.reply.send(answer);
                    }
                    None => return,
                },
                () = monoio::time::sleep(wait) => {}
            }
        }
    }

    /// One delivery attempt of every pending recipient.
    async fn attempt(self: &Rc<Self>, e: &Rc<RefCell<Entry>>) {
        let live = self.shared.live();
        let cfg = live.config.clone();
        let routing = e.borrow().routing.clone();
        let (env, trace, pending, attempts) = {
            let b = e.borrow();
            (
                b.env.clone(),
                b.trace.clone(),
                b.pending.clone(),
                b.attempts,
            )
        };
        let content = match self.content(e).await {
            Ok(c) => c,
            Err(err) => {
                tracing::error!(queue_id = %env.queue_id, error = %err, "cannot read the message from the spool");
                let r = Failure::SpoolRead(err.to_string()).reply();
                let results = pending
                    .iter()
                    .map(|&i| (i, Result_::Deferred(r.clone())))
                    .collect();
                self.conclude(&cfg, e, results, &[]).await;
                return;
            }
        };
        let sender_domain = env
            .mail_from
            .rsplit_once('@')
            .map_or("", |(_, d)| d)
            .to_ascii_lowercase();
        // Group by route (and by domain for MX routes).
        let mut groups: Vec<(usize, String, Vec<u32>)> = Vec::new();
        let mut results: Vec<(u32, Result_)> = Vec::new();
        for &i in &pending {
            let Some(rcpt) = env.rcpts.get(i as usize) else {
                continue;
            };
            let domain = rcpt
                .rsplit_once('@')
                .map_or("", |(_, d)| d)
                .to_ascii_lowercase();
            // The route chosen at acceptance, unless the configuration changed since.
            let chosen = routing
                .as_ref()
                .and_then(|r| r.route(live.generation, i as usize))
                .and_then(|ri| cfg.routes.get(ri).map(|r| (ri, r)));
            match chosen.or_else(|| cfg.route_for(&domain, &sender_domain, env.route_facts())) {
                Some((ri, r)) => {
                    let key = if r.next_hops.iter().any(|h| h.get_ref() == "mx") {
                        domain
                    } else {
                        String::new()
                    };
                    match groups
                        .iter_mut()
                        .find(|(gr, gk, _)| *gr == ri && *gk == key)
                    {
                        Some((_, _, v)) => v.push(i),
                        None => groups.push((ri, key, vec![i])),
                    }
                }
                None => results.push((i, Result_::Deferred(Failure::NoRoute.reply()))),
            }
        }
        let message: [&[u8]; 2] = [trace.as_bytes(), content.as_slice()];
        for (ri, domain, idx) in groups {
            let Some(route) = cfg.routes.get(ri) else {
                continue;
            };
            // The group's addresses, for the actions that pass them on.
            let rcpts = || -> Vec<String> {
                idx.iter()
                    .filter_map(|&i| env.rcpts.get(i as usize).cloned())
                    .collect()
            };
            match route.action {
                RouteAction::Discard => {
                    results.extend(idx.iter().map(|&i| (i, Result_::Delivered(None))));
                    self.shared.metrics.delivery("discarded", idx.len() as u64);
                }
                RouteAction::Hold => {
                    let mut b = e.borrow_mut();
                    self.set_state(&mut b, State::Held);
                    b.last_error = "held by route".into();
                    // Nothing finished: the held recipients stay pending.
                }
                RouteAction::Drop if env.binary && !drop_folder::binary_is_text(&content) => {
                    let r = Failure::BinaryToFolder.reply();
                    results.extend(idx.iter().map(|&i| (i, Result_::Failed(r.clone(), None))));
                }
                RouteAction::Drop => {
                    let folder = route
                        .folder
                        .clone()
                        .unwrap_or_else(|| cfg.server.data_dir.join("drop"));
                    // Owned copies for the blocking thread.
                    let (trace2, content2) = (trace.to_string(), content.clone());
                    let mut e2 = Envelope::clone(&env);
                    if idx.len() != env.rcpts.len() || ri > 0 {
                        e2.queue_id = format!("{}-{ri}", env.queue_id);
                    }
                    let rc = rcpts();
                    let res = monoio::spawn_blocking(move || {
                        drop_folder::write(&folder, &e2, &rc, &trace2, &content2)
                    })
                    .await;
                    let outcome = match res {
                        Ok(Ok(_)) => Result_::Delivered(Some(dsn::Kind::Delivered)),
                        Ok(Err(err)) => {
                            Result_::Deferred(Failure::DropFolder(err.to_string()).reply())
                        }
                        Err(_) => Result_::Deferred(Failure::WorkerLost.reply()),
                    };
                    if let Result_::Deferred(r) = &outcome {
                        tracing::warn!(queue_id = %env.queue_id, error = %r.one_line(), "drop folder write failed");
                    }
                    for &i in &idx {
                        results.push((i, outcome.clone()));
                    }
                }
                RouteAction::Relay => {
                    let indexes: Vec<usize> = idx.iter().map(|&i| i as usize).collect();
                    let dsn = env.dsn.select(&indexes);
                    let (replies, passed_on) = self
                        .relay(
                            live.generation,
                            ri,
                            route,
                            &cfg,
                            &domain,
                            &env,
                            &rcpts(),
                            &dsn,
                            &message,
                            attempts,
                        )
                        .await;
                    for (&i, (r, mta)) in idx.iter().zip(replies) {
                        let outcome = if r.is_positive() {
                            Result_::Delivered((!passed_on).then_some(dsn::Kind::Relayed))
                        } else if r.is_permanent() {
                            Result_::Failed(r, mta)
                        } else {
                            Result_::Deferred(r)
                        };
                        results.push((i, outcome));
                    }
                }
            }
        }
        self.conclude(&cfg, e, results, &message).await;
    }

    /// The message content: in memory after acceptance, else read back from the spool.
    async fn content(&self, e: &Rc<RefCell<Entry>>) -> std::io::Result<Arc<Vec<u8>>> {
        if let Some(c) = e.borrow().content.as_ref() {
            return Ok(c.data.clone());
        }
        let sp = e.borrow().spooled.clone();
        let data = monoio::spawn_blocking(move || sp.seg.read_at(sp.content_at, sp.content_len))
            .await
            .map_err(|_| std::io::Error::other("blocking pool failed"))??;
        Ok(Arc::new(data))
    }

    fn settings(
        &self,
        generation: u64,
        ri: usize,
        route: &RouteSection,
        cfg: &Config,
    ) -> Result<Rc<HopSettings>, String> {
        if let Some(s) = self.hop_settings.borrow().get(&(generation, ri)) {
            return Ok(s.clone());
        }
        let s = Rc::new(HopSettings::new(route, &cfg.server.hostname, &cfg.queue)?);
        let mut m = self.hop_settings.borrow_mut();
        m.retain(|(g, _), _| *g == generation);
        m.insert((generation, ri), s.clone());
        Ok(s)
    }

    /// Relay one group; one (reply, remote host) per recipient.
    #[allow(clippy::too_many_arguments)]
    async fn relay(
        &self,
        generation: u64,
        ri: usize,
        route: &RouteSection,
        cfg: &Config,
        domain: &str,
        env: &Envelope,
        rcpts: &[String],
        dsn: &crate::delivery::DsnRequest,
        message: &[&[u8]],
        attempts: u32,
    ) -> (Vec<(Reply, Option<String>)>, bool) {
        let all = |r: Reply, h: Option<String>| (vec![(r, h); rcpts.len()], false);
        let s = match self.settings(generation, ri, route, cfg) {
            Ok(s) => s,
            Err(e) => {
                return all(Failure::TlsSettings(e.to_string()).reply(), None);
            }
        };
        let hops = match self.hops(route, cfg, domain).await {
            Ok(h) => h,
            Err(r) => return all(r, None),
        };
        if hops.is_empty() {
            return all(Failure::NoHopAddress.reply(), None);
        }
        let sender_domain = env.mail_from.rsplit_once('@').map_or("", |(_, d)| d);
        let source = route.source_ip_for(sender_domain);
        let n = hops.len();
        let start = attempts as usize % n;
        let mut last = Failure::NoHopTried.reply();
        let mut last_host = None;
        for k in 0..n {
            let Some((host, addr)) = hops.get((start + k) % n) else {
                continue;
            };
            let key = HopKey {
                addr: *addr,
                source,
                route: ri,
                generation,
            };
            match self
                .pool
                .deliver(
                    &key,
                    host,
                    &s,
                    &env.mail_from,
                    rcpts,
                    dsn,
                    env.binary,
                    message,
                    &self.shared.metrics,
                )
                .await
            {
                Outcome::Replies(r, passed_on) => {
                    let r = r.into_iter().map(|r| (r, Some(host.clone()))).collect();
                    return (r, passed_on);
                }
                Outcome::HopFailed(r) => {
                    tracing::info!(queue_id = %env.queue_id, hop = %addr, reply = ?r.one_line(), "next hop failed");
                    last = r;
                    last_host = Some(host.clone());
                }
            }
        }
        all(last, last_host)
    }

    /// The next hops of a route: `(name for TLS and logs, address)`.
    async fn hops(
        &self,
        route: &RouteSection,
        cfg: &Config,
        domain: &str,
    ) -> Result<Vec<(String, std::net::SocketAddr)>, Reply> {
        // Lookups run as tasks on the resolver's runtimes: a name server that never answers
        // holds no thread (the blocking pool also reads spooled content and writes drop
        // folders, and a flood of notices to such domains would stall those).
        let dns = || Dns::get(&cfg.dns.servers).map_err(|e| Failure::Dns(e).reply());
        let mut out = Vec::new();
        // A domain whose MX hosts had addresses, all of them in `mx_ignore`.
        let mut ignored = None;
        for h in &route.next_hops {
            let h = h.get_ref().clone();
            if h == "mx" {
                let (d, resolver) = (domain.to_string(), dns()?);
                let t = resolver
                    .clone()
                    .spawn(async move { resolver.resolve_mx(&d).await })
                    .await
                    .map_err(|_| Failure::DnsWorkerLost.reply())?;
                match t {
                    Ok(Targets::NullMx) => {
                        return Err(Failure::NullMx(domain.to_string()).reply());
                    }
                    Ok(Targets::Hosts(hosts)) => {
                        let (addresses, skipped) =
                            crate::relay::dns::mx_addresses(hosts, &route.mx_ignore, route.mx_port);
                        // One line, however many addresses the domain's DNS gave.
                        if let Some((host, ip)) = skipped.first() {
                            tracing::info!(domain = ?domain, host = ?host, %ip, skipped = skipped.len(), "MX addresses skipped (mx_ignore)");
                        }
                        if addresses.is_empty() {
                            ignored = Some(domain.to_string());
                        }
                        out.extend(addresses);
                    }
                    Err(e) => return Err(Failure::Dns(e).reply()),
                }
                continue;
            }
            let Some((host, port)) = crate::relay::parse_hop(&h) else {
                continue;
            };
            if let Ok(ip) = host.parse::<std::net::IpAddr>() {
                out.push((host, std::net::SocketAddr::new(ip, port)));
                continue;
            }
            let (hn, resolver) = (host.clone(), dns()?);
            let ips = resolver
                .clone()
                .spawn(async move { resolver.resolve_host(&hn).await })
                .await
                .map_err(|_| Failure::DnsWorkerLost.reply())?
                .map_err(|e| Failure::Dns(e).reply())?;
            for ip in ips {
                out.push((host.clone(), std::net::SocketAddr::new(ip, port)));
            }
        }
        match ignored {
            Some(domain) if out.is_empty() => Err(Failure::MxIgnored(domain).reply()),
            _ => Ok(out),
        }
    }

    /// Record an attempt's results: finished recipients in the spool, bounces, the next try.
    async fn conclude(
        self: &Rc<Self>,
        cfg: &Config,
        e: &Rc<RefCell<Entry>>,
        results: Vec<(u32, Result_)>,
        message: &[&[u8]],
    ) {
        let env = e.borrow().env.clone();
        let now = SystemTime::now();
        let age = now.duration_since(env.received_at).unwrap_or_default();
        let attempted = results
            .into_iter()
            .map(|(i, r)| (i, r.attempted()))
            .collect();
        let outcome::Conclusion {
            results,
            mut finished,
            succeeded,
            failed,
            deferred,
            last_error,
        } = outcome::conclude(&env, attempted, age, cfg.queue.max_lifetime.0);
        for (i, r, diagnostic) in &results {
            self.shared.metrics.delivery(r.name(), 1);
            if matches!(r, outcome::Result::Failed | outcome::Result::Expired) {
                let to = env.rcpts.get(*i as usize).map_or("", String::as_str);
                tracing::info!(queue_id = %env.queue_id, to = ?to, reply = ?diagnostic, result = r.name(), "delivery");
            }
        }
        for kind in [dsn::Kind::Relayed, dsn::Kind::Delivered] {
            let these: Vec<RcptStatus> = succeeded
                .iter()
                .filter(|(k, _)| *k == kind)
                .map(|(_, s)| s.clone())
                .collect();
            if !these.is_empty()
                && let Err(err) = self.bounce(kind, &env, &these, message).await
            {
                // Success notices are best effort: the message itself is delivered.
                tracing::error!(queue_id = %env.queue_id, error = %err, "cannot spool a success notice");
            }
        }
        if !failed.is_empty()
            && let Err(err) = self.bounce(dsn::Kind::Failed, &env, &failed, message).await
        {
            // Keep those recipients pending: they are tried (and bounced) again.
            tracing::error!(queue_id = %env.queue_id, error = %err, "cannot spool a bounce");
            let keep: Vec<String> = failed.iter().map(|f| f.rcpt.clone()).collect();
            finished.retain(|&i| env.rcpts.get(i as usize).is_none_or(|r| !keep.contains(r)));
        }
        let (held, deleted) = {
            let b = e.borrow();
            (b.state == State::Held, b.deleted)
        };
        let (seg, all_done) = {
            let mut b = e.borrow_mut();
            b.pending.retain(|i| !finished.contains(i));
            (b.spooled.seg.clone(), b.pending.is_empty())
        };
        crate::spool::finish(&seg, &env.queue_id, &finished, all_done);
        if all_done || deleted {
            if deleted && !all_done {
                let rest = e.borrow().pending.clone();
                crate::spool::finish(&seg, &env.queue_id, &rest, true);
            }
            self.remove(&env.queue_id, e);
            let secs = age.as_secs_f64();
            self.shared.metrics.time_in_queue(secs);
            tracing::info!(queue_id = %env.queue_id, seconds = secs, result = "done", "message");
            return;
        }
        let delay_due = outcome::delay_notice_due(
            age,
            cfg.queue.delay_notice.0,
            e.borrow().delay_notified,
            &deferred,
        );
        if delay_due
            && self
                .bounce(dsn::Kind::Delayed, &env, &deferred, message)
                .await
                .is_ok()
        {
            e.borrow_mut().delay_notified = true;
        }
        let mut b = e.borrow_mut();
        b.content = None;
        if held {
            return;
        }
        b.attempts += 1;
        let wait = outcome::backoff(
            &cfg.queue.retry.iter().map(|s| s.0).collect::<Vec<_>>(),
            b.attempts,
        );
        b.next_attempt = Instant::now() + wait;
        b.last_error = last_error;
        self.set_state(&mut b, State::Deferred);
        tracing::info!(queue_id = %env.queue_id, attempt = b.attempts, retry_in = wait.as_secs(), error = ?b.last_error, result = "deferred", "delivery");
        self.timers
            .borrow_mut()
            .push(Reverse((b.next_attempt, env.queue_id.clone())));
    }

    fn remove(&self, id: &str, e: &Rc<RefCell<Entry>>) {
        self.entries.borrow_mut().remove(id);
        let s = e.borrow().state;
        self.count(s, -1);
    }

    /// Spool a DSN to the original sender and queue it.
    async fn bounce(
        self: &Rc<Self>,
        kind: dsn::Kind,
        env: &Envelope,
        rcpts: &[RcptStatus],
        message: &[&[u8]],
    ) -> std::io::Result<()> {
        let cfg = self.shared.live().config.clone();
        let hostname = cfg.server.hostname.clone();
        let original: Vec<u8> = message.iter().flat_map(|p| p.iter().copied()).collect();
        let orig = dsn::Original {
            queue_id: &env.queue_id,
            sender: &env.mail_from,
            arrival: env.received_at,
            message: &original,
            ret: env.dsn.ret.filter(|_| env.reflects()),
            envid: env.dsn.envid.as_deref(),
            binary: env.binary,
            token: unguessable(),
        };
        let content = dsn::build(kind, &hostname, &orig, rcpts, SystemTime::now());
        let benv = Envelope {
            queue_id: self.next_queue_id(),
            mail_from: String::new(),
            rcpts: vec![env.mail_from.clone()],
            client_ip: std::net::IpAddr::from([127, 0, 0, 1]),
            helo: hostname.clone(),
            tls: None,
            authenticated_as: None,
            binding: "bounce".into(),
            esmtp: true,
            is_bounce: true,
            direction: match env.direction {
                Direction::Inbound => Direction::Outbound,
                Direction::Outbound => Direction::Inbound,
            },
            received_at: SystemTime::now(),
            aswl: None,
            dmarc_quarantine: false,
            sender_verified: false,
            dsn: Default::default(),
            binary: false,
        };
        let t = trace::received(&benv, &hostname);
        let spooled = self.spool.store(&benv, &t, &content, None).await?;
        tracing::info!(queue_id = %benv.queue_id, original = %env.queue_id, to = ?env.mail_from, kind = ?kind, "bounce");
        self.shared.metrics.delivery("bounces_sent", 1);
        self.enqueue(
            Rc::new(benv),
            t,
            Some(Arc::new(content)),
            spooled,
            vec![0],
            None,
        );
        Ok(())
    }

    /// Copy messages deferred for long into the current segment, so their old segment can go.
    async fn copy_forward(self: &Rc<Self>, after: Duration) {
        if after.is_zero() {
            return;
        }
        let old: Vec<Rc<RefCell<Entry>>> = self
            .entries
            .borrow()
            .values()
            .filter(|e| {
                let b = e.borrow();
                !b.running
                    && b.state != State::Active
                    && SystemTime::now()
                        .duration_since(b.env.received_at)
                        .unwrap_or_default()
                        >= after
                    && b.spooled.seg.is_old(after)
            })
            .take(64)
            .cloned()
            .collect();
        for e in old {
            let Ok(content) = self.content(&e).await else {
                continue;
            };
            let (mut env, trace, pending, old_sp) = {
                let b = e.borrow();
                (
                    Envelope::clone(&b.env),
                    b.trace.clone(),
                    b.pending.clone(),
                    b.spooled.clone(),
                )
            };
            // The copy keeps only the recipients still pending.
            let kept: Vec<String> = pending
                .iter()
                .filter_map(|&i| env.rcpts.get(i as usize).cloned())
                .collect();
            env.rcpts = kept;
            let indexes: Vec<usize> = pending.iter().map(|&i| i as usize).collect();
            env.dsn = env.dsn.select(&indexes);
            match self.spool.store(&env, &trace, &content, None).await {
                Ok(sp) => {
                    if e.borrow().state == State::Held {
                        crate::spool::set_held(&sp.seg, &env.queue_id, true);
                    }
                    crate::spool::finish(&old_sp.seg, &env.queue_id, &pending, true);
                    let mut b = e.borrow_mut();
                    b.pending = crate::spool::all_indexes(env.rcpts.len());
                    b.env = Rc::new(env);
                    b.spooled = sp;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "copy-forward failed; will try again");
                    return;
                }
            }
        }
    }

    fn command(self: &Rc<Self>, op: &Op) -> String {
        let get = |id: &str| self.entries.borrow().get(id).cloned();
        match op {
            Op::List => {
                let mut out = String::new();
                for (id, e) in self.entries.borrow().iter() {
                    let b = e.borrow();
                    let rcpts: Vec<&str> = b
                        .pending
                        .iter()
                        .filter_map(|&i| b.env.rcpts.get(i as usize).map(String::as_str))
                        .collect();
                    let age = SystemTime::now()
                        .duration_since(b.env.received_at)
                        .unwrap_or_default()
                        .as_secs();
                    out.push_str(&format!(
                        "{id}\t{}\t{age}s\t{}\t<{}>\t{}\t{}\n",
                        b.state.name(),
                        b.attempts,
                        for_terminal(&b.env.mail_from),
                        for_terminal(&rcpts.join(",")),
                        for_terminal(&b.last_error)
                    ));
                }
                out
            }
            Op::Show(id) => match get(id) {
                Some(e) => {
                    let b = e.borrow();
                    let mut s = format!(
                        "queue_id: {id}\ncore: {}\nstate: {}\nattempts: {}\nfrom: <{}>\nreceived: {}\nclient: {} ({})\nbinding: {}\nsize: {}\nsegment: {}\nlast_error: {}\n",
                        self.core,
                        b.state.name(),
                        b.attempts,
                        for_terminal(&b.env.mail_from),
                        trace::rfc5322_date(b.env.received_at),
                        b.env.client_ip,
                        for_terminal(&b.env.helo),
                        b.env.binding,
                        b.spooled.content_len,
                        b.spooled.seg.path.display(),
                        for_terminal(&b.last_error)
                    );
                    for (i, r) in b.env.rcpts.iter().enumerate() {
                        let st = if b.pending.contains(&(i as u32)) {
                            "pending"
                        } else {
                            "done"
                        };
                        s.push_str(&format!("rcpt: <{}> {st}\n", for_terminal(r)));
                    }
                    s
                }
                None => String::new(),
            },
            Op::Flush(id) => {
                let targets: Vec<(String, Rc<RefCell<Entry>>)> = match id {
                    Some(id) => get(id).map(|e| vec![(id.clone(), e)]).unwrap_or_default(),
                    None => self
                        .entries
                        .borrow()
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                };
                let mut n = 0;
                for (id, e) in targets {
                    if e.borrow().state == State::Deferred {
                        e.borrow_mut().next_attempt = Instant::now();
                        self.try_start(id, e);
                        n += 1;
                    }
                }
                format!("{n}\n")
            }
            Op::Delete(id) => match get(id) {
                Some(e) => {
                    let running = {
                        let mut b = e.borrow_mut();
                        b.deleted = true;
                        b.running
                    };
                    if !running {
                        let (seg, pending) = {
                            let b = e.borrow();
                            (b.spooled.seg.clone(), b.pending.clone())
                        };
                        crate::spool::finish(&seg, id, &pending, true);
                        self.remove(id, &e);
                    }
                    tracing::info!(queue_id = %id, result = "deleted", "message");
                    "1\n".into()
                }
                None => String::new(),
            },
            Op::Hold(id) => match get(id) {
                Some(e) => {
                    let mut b = e.borrow_mut();
                    self.set_state(&mut b, State::Held);
                    crate::spool::set_held(&b.spooled.seg, id, true);
                    "1\n".into()
                }
                None => String::new(),
            },
            Op::Release(id) => match get(id) {
                Some(e) => {
                    {
                        let mut b = e.borrow_mut();
                        if b.state == State::Held {
                            crate::spool::set_held(&b.spooled.seg, id, false);
                        }
                        self.set_state(&mut b, State::Deferred);
                        b.next_attempt = Instant::now();
                    }
                    self.try_start(id.clone(), e);
                    "1\n".into()
                }
                None => String::new(),
            },
        }
    }
}

/// 128 bits no client can guess, from the system's random source (aws-lc's generator);
/// should it fail, std's SipHash keyed with the process's random keys, hashing nothing.
fn unguessable() -> u128 {
    let mut b = [0u8; 16];
    if aws_lc_rs::rand::fill(&mut b).is_ok() {
        return u128::from_le_bytes(b);
    }
    use std::hash::{BuildHasher, Hasher};
    let half = || u128::from(std::hash::RandomState::new().build_hasher().finish());
    (half() << 64) | half()
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_differ() {
        let a = super::unguessable();
        assert_ne!(a, super::unguessable());
        assert_ne!(a, 0);
    }
}
