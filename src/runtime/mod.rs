//! The only code that touches the async runtime: one OS thread per configured core, pinned,
//! each with its own monoio reactor (io_uring, or epoll where the kernel refuses io_uring) and
//! its own SO_REUSEPORT listener per binding. Nothing is shared on the per-command path; the
//! connection limits are lock-free counters.
//!
//! ```text
//! main thread: validate config → probe ports → bind listeners (all cores) → spawn cores →
//!              wait for SIGTERM / SIGHUP / POST /reload
//! core thread: pin → build runtime → accept loop per binding → one task per connection (conn.rs)
//! ```
//!
//! Reload: the new configuration is read and validated (certificates and users included) on
//! the main thread; on any error the running one stays. Then listeners for new addresses are
//! bound and handed to the cores, the live configuration is swapped (new connections use it;
//! sessions in progress keep the one they started with), and listeners of removed addresses are
//! woken and closed. No session is dropped.

mod conn;
mod limits;
pub mod listener;
mod outbound;
pub mod queue;
pub mod transport;
mod why;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, mpsc};
use std::time::Duration;

use crate::config::{Binding, Config, Driver};
use crate::tls;
pub use limits::ConnLimits;

/// What a reload replaces.
#[derive(Debug)]
pub struct Live {
    pub generation: u64,
    pub config: Arc<Config>,
    pub tls: Vec<Option<Arc<rustls::ServerConfig>>>,
    pub users: Arc<crate::auth::Users>,
    /// Bearer tokens of the admin endpoint (`[admin] token_file`).
    pub admin_tokens: Arc<Vec<String>>,
    /// `[[recipients]]` maps.
    pub recipients: Arc<crate::policy::recipients::RecipientMaps>,
}

/// A request to the main thread.
#[derive(Debug)]
pub(crate) enum Control {
    Stop(i32),
    Reload(Option<mpsc::Sender<Result<u64, String>>>),
}

/// Client addresses whose AUTH failures are remembered (about 64 bytes each).
const AUTH_FAILURE_ADDRESSES: usize = 100_000;

/// A channel into one core: any thread sends, the core's task awaits (the receiver is taken
/// once, when the core starts).
#[derive(Debug)]
struct Inbox<T> {
    tx: tokio::sync::mpsc::UnboundedSender<T>,
    rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<T>>>,
}

impl<T> Inbox<T> {
    fn new() -> Inbox<T> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        Inbox {
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }

    fn send(&self, v: T) -> bool {
        self.tx.send(v).is_ok()
    }

    fn take(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<T>> {
        self.rx.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// State shared by every core.
#[derive(Debug)]
pub struct Shared {
    live: RwLock<Arc<Live>>,
    /// `live`'s generation, so accept loops notice a reload without taking the lock.
    generation: AtomicU64,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub limits: ConnLimits,
    pub shutdown: AtomicBool,
    /// Open connections per listen address (a binding's `max_connections`), kept over reloads.
    open_per_address: Mutex<HashMap<SocketAddr, Arc<AtomicUsize>>>,
    /// Each core's inbox: listeners bound by a reload (`None`: stop), woken, never polled.
    new_listeners: Vec<Inbox<Option<(SocketAddr, std::net::TcpListener)>>>,
    control: Mutex<mpsc::Sender<Control>>,
    /// Admin requests for each core's queue (its scheduler wakes on them).
    queue_commands: Vec<Inbox<queue::Command>>,
    /// Messages found by the startup recovery, per core.
    recovered: Vec<Mutex<Vec<crate::spool::Recovered>>>,
    spool_ids: Arc<AtomicU64>,
    /// The whitelist, when `[aswl]` was on at startup.
    pub aswl: Option<Arc<crate::aswl::Aswl>>,
    /// AUTH failures per client address, across connections and cores.
    pub auth_failures: crate::auth::Failures,
    /// The argon2 threads and their bounded queue.
    pub verifier: crate::auth::Verifier,
    /// `[rates]` as of startup, shared by every core.
    pub rates: Option<Arc<crate::policy::rates::Rates>>,
    /// `[dnsbl]` as of startup (its cache is shared by every core).
    pub dnsbl: Option<Arc<crate::policy::dnsbl::DnsLists>>,
    /// Callout answers (`[callout]` as of startup), kept over reloads and restarts.
    pub callouts: Arc<crate::policy::callout::Callouts>,
    /// What the greeting test learnt about client addresses (bindings with `greet_delay`).
    pub greet: crate::policy::greet::Memory,
    /// Policy checks that deferred (DNS, callouts, signatures): their own threads and queue.
    pub policy_workers: crate::workers::Workers,
    /// Disk taken by spill files of messages being received, all cores together.
    pub staging: Arc<crate::spool::staging::Budget>,
}

impl crate::admin::Server for Shared {
    fn stopping(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    fn access(&self) -> (Arc<crate::config::AdminSection>, Arc<Vec<String>>) {
        let live = self.live();
        (
            Arc::new(live.config.admin.clone()),
            live.admin_tokens.clone(),
        )
    }

    fn metrics(&self) -> String {
        self.metrics.render()
    }

    fn aswl(&self) -> Option<(Arc<crate::aswl::Aswl>, Arc<crate::aswl::Settings>)> {
        Some((self.aswl.clone()?, self.live().config.aswl.clone()?))
    }

    fn reload(&self) -> Result<u64, String> {
        self.request_reload()
    }

    fn queue(&self, op: queue::Op) -> Vec<String> {
        self.queue_command(op)
    }

    fn client(&self, ip: std::net::IpAddr, forget: bool) -> String {
        why::report(self, ip, forget)
    }
}

impl Shared {
    pub(crate) fn take_queue_commands(
        &self,
        core: usize,
    ) -> Option<tokio::sync::mpsc::UnboundedReceiver<queue::Command>> {
        self.queue_commands.get(core)?.take()
    }

    /// Run a queue command on every core and collect the answers (empty ones left out).
    pub fn queue_command(&self, op: queue::Op) -> Vec<String> {
        let mut waiting = Vec::new();
        for inbox in &self.queue_commands {
            let (tx, rx) = mpsc::channel();
            if inbox.send(queue::Command {
                op: op.clone(),
                reply: tx,
            }) {
                waiting.push(rx);
            }
        }
        waiting
            .into_iter()
            .filter_map(|rx| rx.recv_timeout(Duration::from_secs(10)).ok())
            .filter(|s| !s.is_empty())
            .collect()
    }

    /// The configuration in force now.
    pub fn live(&self) -> Arc<Live> {
        match self.live.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn set_live(&self, live: Live) {
        let generation = live.generation;
        let live = Arc::new(live);
        match self.live.write() {
            Ok(mut g) => *g = live,
            Err(p) => *p.into_inner() = live,
        }
        self.generation.store(generation, Ordering::Release);
    }

    fn open_counter(&self, addr: SocketAddr) -> Arc<AtomicUsize> {
        let mut m = self
            .open_per_address
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        m.entry(addr).or_default().clone()
    }

    /// Ask the main thread to reload the configuration; returns the new generation or why not.
    pub fn request_reload(&self) -> Result<u64, String> {
        let (tx, rx) = mpsc::channel();
        let sent = self
            .control
            .lock()
            .map_err(|_| "control channel poisoned".to_string())?
            .send(Control::Reload(Some(tx)));
        sent.map_err(|_| "the server is stopping".to_string())?;
        rx.recv_timeout(Duration::from_secs(60))
            .map_err(|_| "no answer from the main thread".to_string())?
    }
}

/// A startup failure.
#[derive(Debug)]
pub enum RunError {
    Bind(listener::BindError),
    Tls(tls::TlsError),
    Io(String, std::io::Error),
    /// The caller's start-up step (`main`: the admin endpoint) failed.
    Started(String),
}

/// Cells of the greeting test's memory (8 bytes each: 1 MiB).
const GREET_CELLS: usize = 1 << 17;
/// Threads for deferred policy checks, and the checks that may wait for one: a check that
/// cannot be queued answers `451 4.3.0`. (Two threads instead of four made no difference to
/// verification under load on 2 vCPUs: the jobs wait on no DNS, which runs on the resolver's
/// runtimes.)
const POLICY_THREADS: usize = 4;
const POLICY_QUEUE: usize = 4096;

/// The `[dnsbl]` check, asking through the resolver the MX routes use.
fn dns_lists(config: &Config) -> Option<Arc<crate::policy::dnsbl::DnsLists>> {
    if config.dns_lists.is_empty() {
        return None;
    }
    let timeout = config.dnsbl.timeout.0;
    let dns = crate::relay::dns::Dns::get(&config.dns.servers);
    let resolve: crate::policy::dnsbl::Resolve = Arc::new(
        move |names: Vec<String>, then: crate::policy::dnsbl::Scoring| match &dns {
            Ok(d) => {
                let d2 = d.clone();
                crate::policy::pipeline::Job::Running(
                    d.spawn(async move { then(d2.lookup_a_many(&names, timeout).await) }),
                )
            }
            Err(e) => {
                tracing::warn!(error = %e, "dnsbl: no resolver; clients count as not listed");
                let none = vec![None; names.len()];
                crate::policy::pipeline::Job::blocking(move || then(none))
            }
        },
    );
    let d = &config.dnsbl;
    Some(Arc::new(crate::policy::dnsbl::DnsLists::new(
        config.dns_lists.clone(),
        d.threshold,
        d.max_cache_ttl.0.as_secs().min(u64::from(u32::MAX)) as u32,
        d.cache_size,
        resolve,
        timeout + Duration::from_secs(1),
    )))
}

/// A binding with what it needs at run time, from one generation of the configuration.
#[derive(Debug)]
pub(crate) struct BindingRt {
    /// The configuration generation this was built from.
    pub(crate) generation: u64,
    /// Index in the metrics' binding list (`usize::MAX` for a binding added by a reload).
    pub(crate) index: usize,
    pub(crate) b: Binding,
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    pub(crate) config: Arc<Config>,
    pub(crate) users: Arc<crate::auth::Users>,
    /// The binding's policy checks, stage by stage.
    pub(crate) pipeline: crate::policy::pipeline::Pipeline,
    pub(crate) open: Arc<AtomicUsize>,
}

fn binding_rt(shared: &Shared, live: &Live, listen: SocketAddr) -> Option<BindingRt> {
    let i = live
        .config
        .bindings
        .iter()
        .position(|b| *b.section.listen.get_ref() == listen)?;
    let b = live.config.bindings.get(i)?.clone();
    let dns = if live.config.authentication.verify {
        crate::relay::dns::Dns::get(&live.config.dns.servers)
            .map_err(|e| tracing::warn!(error = %e, "authentication: no resolver; no verification"))
            .ok()
    } else {
        None
    };
    Some(BindingRt {
        generation: live.generation,
        index: shared
            .metrics
            .binding_index(&b.section.name)
            .unwrap_or(usize::MAX),
        tls: live.tls.get(i).cloned().flatten(),
        config: live.config.clone(),
        users: live.users.clone(),
        pipeline: crate::policy::checks::for_binding(crate::policy::checks::Sources {
            config: &live.config,
            binding: &b,
            recipients: &live.recipients,
            aswl: shared.aswl.as_ref(),
            rates: shared.rates.as_ref(),
            dnsbl: shared.dnsbl.as_ref(),
            callouts: Some(&shared.callouts),
            dns: dns.as_ref(),
            metrics: Some(&shared.metrics),
        }),
        open: shared.open_counter(listen),
        b,
    })
}

/// Load `[admin] token_file` when set: one token a line, blank lines and `#` comments ignored.
pub fn load_admin_tokens(config: &Config) -> Result<Vec<String>, RunError> {
    let Some(p) = &config.admin.token_file else {
        return Ok(Vec::new());
    };
    let key = || format!("admin.token_file {}", p.display());
    let text = std::fs::read_to_string(p).map_err(|e| RunError::Io(key(), e))?;
    let tokens: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    if let Some(t) = tokens.iter().find(|t| t.len() < 16) {
        let why = format!(
            "a token of {} characters is too short (at least 16)",
            t.len()
        );
        return Err(RunError::Io(key(), std::io::Error::other(why)));
    }
    if tokens.is_empty() {
        return Err(RunError::Io(
            key(),
            std::io::Error::other("no token in the file"),
        ));
    }
    Ok(tokens)
}

/// Load every `[[recipients]]` file.
pub fn load_recipients(
    config: &Config,
) -> Result<crate::policy::recipients::RecipientMaps, RunError> {
    use crate::policy::recipients::{RecipientMap, RecipientMaps};
    let mut maps = Vec::new();
    for (i, r) in config.recipients.iter().enumerate() {
        let m = match &r.file {
            Some(f) => Some(RecipientMap::load(f).map_err(|e| {
                RunError::Io(format!("recipients[{i}].file"), std::io::Error::other(e))
            })?),
            None => None,
        };
        maps.push((r.domains.clone(), m));
    }
    Ok(RecipientMaps::new(maps))
}

/// Load `[auth] users_file` when set.
pub fn load_users(config: &Config) -> Result<crate::auth::Users, RunError> {
    match &config.auth.users_file {
        Some(p) => crate::auth::Users::load(p)
            .map_err(|e| RunError::Io("auth.users_file".into(), std::io::Error::other(e))),
        None => Ok(crate::auth::Users::default()),
    }
}

/// Load every binding's certificates (what `check-config` and startup both do).
pub fn load_tls(config: &Config) -> Result<Vec<Option<Arc<rustls::ServerConfig>>>, tls::TlsError> {
    config
        .bindings
        .iter()
        .map(|b| tls::server_config(&b.section))
        .collect()
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Bind(e) => e.fmt(f),
            RunError::Tls(e) => e.fmt(f),
            RunError::Io(what, e) => write!(f, "{what}: {e}"),
            RunError::Started(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for RunError {}

/// Which driver a core runs.
pub fn driver_name(driver: Driver) -> &'static str {
    if driver == Driver::Legacy || !monoio::utils::detect_uring() {
        "legacy"
    } else {
        "io_uring"
    }
}

struct CoreListeners {
    cpu: usize,
    core: usize,
    listeners: Vec<(SocketAddr, std::net::TcpListener)>,
}

fn make_folders(config: &Config) -> Result<(), RunError> {
    for r in &config.routes {
        if let Some(folder) = &r.folder {
            std::fs::create_dir_all(folder).map_err(|e| {
                RunError::Io(format!("creating drop folder {}", folder.display()), e)
            })?;
        }
    }
    Ok(())
}

fn listen_addrs(config: &Config) -> Vec<SocketAddr> {
    config
        .bindings
        .iter()
        .map(|b| *b.section.listen.get_ref())
        .collect()
}

/// Run the server until SIGTERM/SIGINT; SIGHUP and `POST /reload` re-read `path` (or the
/// embedded default when None). Returns after every core has stopped.
pub fn run(
    config: Config,
    path: Option<PathBuf>,
    started: impl FnOnce(Arc<Shared>) -> Result<(), String>,
) -> Result<(), RunError> {
    // First, so every thread started below (cores, AUTH, whitelist, replication) inherits the
    // mask and the signals reach `wait` only.
    let signals = signals::block()?;
    let config = Arc::new(config);
    let tls_configs = load_tls(&config).map_err(RunError::Tls)?;
    let users = Arc::new(load_users(&config)?);
    let admin_tokens = Arc::new(load_admin_tokens(&config)?);
    let recipients = Arc::new(load_recipients(&config)?);
    make_folders(&config)?;
    for b in &config.bindings {
        listener::probe(&b.section.name, *b.section.listen.get_ref(), &[])
            .map_err(RunError::Bind)?;
    }
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpus = config.server.cores.get_ref().resolve(online);
    let mut per_core = Vec::new();
    let mut fds: HashMap<SocketAddr, Vec<RawFd>> = HashMap::new();
    for (core, &cpu) in cpus.iter().enumerate() {
        let mut listeners = Vec::new();
        for b in &config.bindings {
            let addr = *b.section.listen.get_ref();
            let l = listener::bind(&b.section.name, addr, cpu, 1024).map_err(RunError::Bind)?;
            fds.entry(addr).or_default().push(l.as_raw_fd());
            listeners.push((addr, l));
        }
        per_core.push(CoreListeners {
            cpu,
            core,
            listeners,
        });
    }
    let spool_dir = config
        .spool
        .dir
        .clone()
        .unwrap_or_else(|| config.server.data_dir.join("spool"));
    let spool_lock = lock_spool(&spool_dir)?;
    let recovery = crate::spool::recover(&spool_dir).map_err(|e| {
        RunError::Io(
            format!("recovering the spool in {}", spool_dir.display()),
            e,
        )
    })?;
    tracing::info!(
        spool = %spool_dir.display(),
        segments = recovery.segments_scanned,
        deleted = recovery.segments_deleted,
        messages = recovery.messages.len(),
        corrupt_ranges = recovery.corrupt_ranges,
        "spool recovered"
    );
    if recovery.corrupt_ranges > 0 {
        tracing::warn!(
            ranges = recovery.corrupt_ranges,
            "spool: torn or corrupt ranges skipped (unacknowledged writes cut by a crash, or damage)"
        );
    }
    let mut recovered: Vec<Vec<crate::spool::Recovered>> =
        cpus.iter().map(|_| Vec::new()).collect();
    let spool_ids = Arc::new(AtomicU64::new(recovery.next_id));
    for (i, m) in recovery.messages.into_iter().enumerate() {
        if let Some(v) = recovered.get_mut(i % cpus.len().max(1)) {
            v.push(m);
        }
    }
    let aswl = match &config.aswl {
        Some(s) => Some({
            crate::aswl::keep_freed_memory();
            Arc::new(
                crate::aswl::Aswl::open(s, cpus.len())
                    .map_err(|e| RunError::Io(format!("aswl.dir {}", s.dir.display()), e))?,
            )
        }),
        None => None,
    };
    let (control_tx, control_rx) = mpsc::channel();
    // `[rates] fleet`: counts go through the Redis of `[aswl.replication]` too.
    let fleet = match (&config.replication, config.rates.fleet) {
        (Some(r), true) => {
            let f = Arc::new(crate::replication::fleet::Fleet::new());
            let h = crate::replication::fleet::start(r.clone(), f.clone())
                .map_err(|e| RunError::Io("spawning the fleet rates thread".into(), e))?;
            Some((f, h))
        }
        _ => None,
    };
    let shared = Arc::new(Shared {
        aswl,
        queue_commands: cpus.iter().map(|_| Inbox::new()).collect(),
        recovered: recovered.into_iter().map(Mutex::new).collect(),
        spool_ids,
        generation: AtomicU64::new(1),
        live: RwLock::new(Arc::new(Live {
            generation: 1,
            config: config.clone(),
            tls: tls_configs,
            users,
            admin_tokens,
            recipients,
        })),
        metrics: Arc::new(crate::metrics::Metrics::new(
            config
                .bindings
                .iter()
                .map(|b| b.section.name.clone())
                .collect(),
            cpus.len(),
        )),
        limits: ConnLimits::new(config.limits.max_connections),
        shutdown: AtomicBool::new(false),
        open_per_address: Mutex::new(HashMap::new()),
        new_listeners: cpus.iter().map(|_| Inbox::new()).collect(),
        control: Mutex::new(control_tx.clone()),
        auth_failures: crate::auth::Failures::new(AUTH_FAILURE_ADDRESSES),
        staging: Arc::new(crate::spool::staging::Budget::new(
            config.spool.max_staging.0,
        )),
        dnsbl: dns_lists(&config),
        rates: crate::policy::rates::Rates::new(&config.rates)
            .map(|r| match &fleet {
                Some((f, _)) => r.with_fleet(f.clone()),
                None => r,
            })
            .map(Arc::new),
        greet: crate::policy::greet::Memory::new(GREET_CELLS),
        callouts: Arc::new(crate::policy::callout::Callouts::open(
            &config.callout,
            Some(&config.server.data_dir),
            u64::from(crate::aswl::unix_now()),
        )),
        policy_workers: crate::workers::Workers::new("policy", POLICY_THREADS, POLICY_QUEUE)
            .map_err(|e| RunError::Io("spawning the policy threads".into(), e))?,
        verifier: crate::auth::Verifier::new(config.auth.verify_threads, config.auth.max_pending)
            .map_err(|e| RunError::Io("spawning the AUTH threads".into(), e))?,
    });
    let maintenance = match &shared.aswl {
        Some(_) => Some(
            std::thread::Builder::new()
                .name("ringmx-aswl".into())
                .spawn({
                    let shared = shared.clone();
                    move || aswl_maintenance(&shared)
                })
                .map_err(|e| RunError::Io("spawning the whitelist thread".into(), e))?,
        ),
        None => None,
    };
    let replication = match (&shared.aswl, config.replication.clone()) {
        (Some(a), Some(r)) => {
            let live: crate::replication::LiveSettings = {
                let shared = shared.clone();
                Arc::new(move || shared.live().config.aswl.clone())
            };
            let h = crate::replication::start(a.clone(), r.clone(), live).map_err(|e| {
                RunError::Io(
                    format!("aswl.replication state in {}", a.disk.dir.display()),
                    e,
                )
            })?;
            tracing::info!(urls = ?r.urls, cluster = r.cluster, node = a.replica.node.get().map_or("", String::as_str), "aswl replication started");
            Some(h)
        }
        _ => None,
    };
    started(shared.clone()).map_err(RunError::Started)?;
    let driver = config.server.driver;
    tracing::info!(
        cores = cpus.len(),
        driver = driver_name(driver),
        bindings = config.bindings.len(),
        "ringmx started"
    );
    log_bindings(&config);
    let mut threads = Vec::new();
    for c in per_core {
        let shared = shared.clone();
        let t = std::thread::Builder::new()
            .name(format!("ringmx-core-{}", c.core))
            .spawn(move || core_main(c, shared, driver))
            .map_err(|e| RunError::Io("spawning a core thread".into(), e))?;
        threads.push(t);
    }
    std::thread::Builder::new()
        .name("ringmx-signals".into())
        .spawn(move || signals::forward(&signals, &control_tx))
        .map_err(|e| RunError::Io("spawning the signal thread".into(), e))?;
    let sig = loop {
        match control_rx.recv() {
            Ok(Control::Stop(sig)) => break sig,
            Ok(Control::Reload(reply)) => {
                let result = reload(&shared, path.as_deref(), &cpus, &mut fds);
                match &result {
                    Ok(g) => tracing::info!(generation = g, "configuration reloaded"),
                    Err(e) => {
                        tracing::error!(error = %e, "reload refused; the running configuration stays")
                    }
                }
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            Err(_) => break 0,
        }
    };
    tracing::info!(
        signal = sig,
        "stopping: no new connections, finishing transactions in flight"
    );
    shared.shutdown.store(true, Ordering::SeqCst);
    for inbox in &shared.new_listeners {
        inbox.send(None);
    }
    for fd in fds.values().flatten() {
        // Wakes a pending accept (it fails with EINVAL) without cancelling it.
        // SAFETY: `fd` is a listening socket owned by a core's listener, still open.
        unsafe { libc::shutdown(*fd, libc::SHUT_RD) };
    }
    let deadline = std::time::Instant::now() + shared.live().config.server.shutdown_timeout.0;
    for t in threads {
        while !t.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if t.is_finished() {
            let _ = t.join();
        }
    }
    if let Some(t) = maintenance {
        let _ = t.join();
    }
    // After the cores: what they collected is in the outbox before the state says "clean".
    if let Some(r) = replication {
        r.stop();
    }
    if let Some((_, h)) = fleet {
        h.stop();
    }
    if let (Some(a), Some(_)) = (&shared.aswl, &shared.live().config.aswl) {
        // A clean stop leaves a snapshot, so the next start replays no logs.
        if let Err(e) = a.disk.snapshot(&a.store) {
            tracing::error!(error = %e, "aswl: final snapshot failed (the change logs still hold everything)");
        }
    }
    drop(spool_lock);
    tracing::info!("stopped");
    Ok(())
}

/// The whitelist's sweep and snapshots, on their own thread (never on a core).
fn aswl_maintenance(shared: &Shared) {
    let Some(a) = &shared.aswl else {
        return;
    };
    let mut last_sweep = std::time::Instant::now();
    let mut last_prune = std::time::Instant::now();
    let mut last_snapshot = std::time::Instant::now();
    while !shared.shutdown.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
        let Some(s) = shared.live().config.aswl.clone() else {
            continue;
        };
        if last_sweep.elapsed() >= s.sweep_interval {
            a.sweep(&s, crate::aswl::unix_now());
            last_sweep = std::time::Instant::now();
            last_prune = last_sweep;
        } else if last_prune.elapsed() >= Duration::from_secs(10) {
            a.prune_recent(&s, crate::aswl::unix_now());
            last_prune = std::time::Instant::now();
        }
        if last_snapshot.elapsed() >= s.snapshot_interval {
            if let Err(e) = a.disk.snapshot(&a.store) {
                tracing::error!(error = %e, "aswl: snapshot failed (the change logs are kept)");
            }
            last_snapshot = std::time::Instant::now();
        }
    }
}

/// Hold an exclusive lock on the spool directory: two servers must never share one.
fn lock_spool(dir: &std::path::Path) -> Result<std::fs::File, RunError> {
    let what = || format!("spool directory {}", dir.display());
    std::fs::create_dir_all(dir).map_err(|e| RunError::Io(what(), e))?;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))
        .map_err(|e| RunError::Io(what(), e))?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(RunError::Io(
            what(),
            std::io::Error::other("in use by another ringmx process"),
        ));
    }
    Ok(f)
}

fn log_bindings(config: &Config) {
    for b in &config.bindings {
        tracing::info!(binding = %b.section.name, listen = %b.section.listen.get_ref(), direction = ?b.section.direction, tls = ?b.section.tls, "listening");
    }
}

/// Re-read and apply the configuration (see the module comment). Nothing changes on error.
/// `cores`, `driver` and `admin.listen` keep their startup values.
fn reload(
    shared: &Shared,
    path: Option<&std::path::Path>,
    cpus: &[usize],
    fds: &mut HashMap<SocketAddr, Vec<RawFd>>,
) -> Result<u64, String> {
    let mut config = match path {
        Some(p) => Config::load(p),
        None => Config::embedded_default(),
    }
    .map_err(|e| e.to_string())?;
    let old = shared.live();
    config.server.driver = old.config.server.driver;
    match (&config.aswl, &shared.aswl) {
        (Some(_), None) => {
            tracing::warn!("aswl: [aswl] was turned on; it starts working after a restart")
        }
        (Some(s), Some(a)) if s.dir != a.disk.dir => {
            tracing::warn!(dir = %s.dir.display(), using = %a.disk.dir.display(), "aswl: a new dir takes effect after a restart")
        }
        (Some(_), Some(a))
            if config.replication.as_deref() != old.config.replication.as_deref()
                || config.replication.is_some() != a.replica.enabled() =>
        {
            tracing::warn!("aswl: [aswl.replication] changes take effect after a restart")
        }
        _ => {}
    }
    let tls = load_tls(&config).map_err(|e| e.to_string())?;
    let users = Arc::new(load_users(&config).map_err(|e| e.to_string())?);
    let admin_tokens = Arc::new(load_admin_tokens(&config).map_err(|e| e.to_string())?);
    let recipients = Arc::new(load_recipients(&config).map_err(|e| e.to_string())?);
    make_folders(&config).map_err(|e| e.to_string())?;
    let old_addrs: HashSet<SocketAddr> = listen_addrs(&old.config).into_iter().collect();
    let new_addrs: HashSet<SocketAddr> = listen_addrs(&config).into_iter().collect();
    // Bind what is new before changing anything, so a port in use refuses the whole reload.
    let mut added = Vec::new();
    for b in config
        .bindings
        .iter()
        .filter(|b| !old_addrs.contains(b.section.listen.get_ref()))
    {
        let addr = *b.section.listen.get_ref();
        let ours: Vec<SocketAddr> = old_addrs.iter().copied().collect();
        listener::probe(&b.section.name, addr, &ours).map_err(|e| e.to_string())?;
        for (core, &cpu) in cpus.iter().enumerate() {
            let l = listener::bind(&b.section.name, addr, cpu, 1024).map_err(|e| e.to_string())?;
            added.push((core, addr, l));
        }
    }
    let generation = old.generation + 1;
    shared.limits.set_max_total(config.limits.max_connections);
    let config = Arc::new(config);
    log_bindings(&config);
    shared.set_live(Live {
        generation,
        config,
        tls,
        users,
        admin_tokens,
        recipients,
    });
    for (core, addr, l) in added {
        fds.entry(addr).or_default().push(l.as_raw_fd());
        if let Some(q) = shared.new_listeners.get(core) {
            q.send(Some((addr, l)));
        }
    }
    for addr in old_addrs.difference(&new_addrs) {
        for fd in fds.remove(addr).unwrap_or_default() {
            // The accept loop wakes, finds its address gone from the live configuration and
            // drops the listener; sessions it accepted go on.
            // SAFETY: `fd` is a listening socket still owned by its core's accept loop.
            unsafe { libc::shutdown(fd, libc::SHUT_RD) };
        }
        tracing::info!(listen = %addr, "binding removed");
    }
    Ok(generation)
}

fn core_main(c: CoreListeners, shared: Arc<Shared>, driver: Driver) {
    if let Err(e) = monoio::utils::bind_to_cpu_set([c.cpu]) {
        tracing::warn!(cpu = c.cpu, error = ?e, "cannot pin core thread");
    }
    let pool = Box::new(monoio::blocking::DefaultThreadPool::new(2));
    let result = if driver == Driver::Legacy {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .attach_thread_pool(pool)
            .build()
            .map(|rt| -> monoio::FusionRuntime<_, _> { rt.into() })
    } else {
        // Completions are run when the core enters the kernel anyway (COOP_TASKRUN) instead
        // of interrupting it with task work; only this thread submits (SINGLE_ISSUER). On the
        // loopback benchmark this cut CPU per message by a third. Kernels before 5.19 refuse
        // the flags: then the defaults.
        let mut urb = io_uring::IoUring::builder();
        urb.setup_coop_taskrun().setup_single_issuer();
        let tuned = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .uring_builder(urb)
            .attach_thread_pool(Box::new(monoio::blocking::DefaultThreadPool::new(2)))
            .build();
        match tuned {
            Ok(rt) => Ok(rt),
            Err(e) => {
                tracing::warn!(error = %e, "io_uring without COOP_TASKRUN/SINGLE_ISSUER");
                monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                    .enable_timer()
                    .attach_thread_pool(pool)
                    .build()
            }
        }
    };
    let mut rt = match result {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(core = c.core, error = %e, "cannot build the runtime");
            return;
        }
    };
    let live = shared.live();
    let sc = &live.config.spool;
    let opts = crate::spool::SpoolOptions {
        dir: sc
            .dir
            .clone()
            .unwrap_or_else(|| live.config.server.data_dir.join("spool")),
        segment_size: sc.segment_size.0.max(4096),
        commit_batch: sc.commit_batch,
        commit_delay: sc.commit_delay.0,
        staging: shared.staging.clone(),
    };
    let spool = match crate::spool::CoreSpool::new(
        c.core,
        opts,
        shared.spool_ids.clone(),
        shared.metrics.commit_stats(),
    ) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(core = c.core, error = %e, "cannot start the spool committer");
            return;
        }
    };
    drop(live);
    rt.block_on(async move {
        let queue = Rc::new(queue::CoreQueue::new(c.core, shared.clone(), spool));
        let recovered = shared
            .recovered
            .get(c.core)
            .map(|m| std::mem::take(&mut *m.lock().unwrap_or_else(|p| p.into_inner())))
            .unwrap_or_default();
        for r in recovered {
            queue.adopt(r);
        }
        if let Some(commands) = shared.take_queue_commands(c.core) {
            monoio::spawn(queue.clone().scheduler(commands));
        }
        let ctx = Rc::new(conn::CoreCtx::new(c.core, shared.clone(), queue));
        for (addr, l) in c.listeners {
            monoio::spawn(accept_loop(l, addr, ctx.clone()));
        }
        // Listeners added by a reload arrive here, until the main thread says stop.
        let mut inbox = shared.new_listeners.get(c.core).and_then(Inbox::take);
        while let Some(rx) = inbox.as_mut()
            && let Some(Some((addr, l))) = rx.recv().await
        {
            monoio::spawn(accept_loop(l, addr, ctx.clone()));
        }
        // Stopping: idle sessions get 421 now; those in a transaction finish it first (and
        // are woken once idle), as do delivery attempts in flight, up to the shutdown timeout
        // enforced by the main thread. What is still queued stays in the spool for next time.
        while ctx.open_connections() > 0 || ctx.queue.running() > 0 {
            ctx.wake_idle();
            monoio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

async fn accept_loop(l: std::net::TcpListener, listen: SocketAddr, ctx: Rc<conn::CoreCtx>) {
    let listener = match monoio::net::TcpListener::from_std(l) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot register listener");
            return;
        }
    };
    // The binding as of the configuration generation last seen.
    let mut current: Option<(u64, Rc<BindingRt>)> = None;
    loop {
        let accepted = listener.accept().await;
        if ctx.shared.shutdown.load(Ordering::SeqCst) {
            return;
        }
        // Lock-free unless a reload happened since the last connection.
        let generation = ctx.shared.generation.load(Ordering::Acquire);
        let binding = match &current {
            Some((g, b)) if *g == generation => b.clone(),
            _ => match binding_rt(&ctx.shared, &ctx.shared.live(), listen) {
                Some(b) => {
                    let b = Rc::new(b);
                    current = Some((b.generation, b.clone()));
                    b
                }
                // Removed by a reload: stop listening (sessions already accepted go on).
                None => return,
            },
        };
        match accepted {
            Ok((stream, peer)) => {
                monoio::spawn(conn::handle(stream, peer, binding, ctx.clone()));
            }
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Address a test or the CLI can connect to for a binding's listen address (`0.0.0.0` → loopback).
pub fn connect_addr(listen: SocketAddr) -> SocketAddr {
    match listen {
        SocketAddr::V4(a) if a.ip().is_unspecified() => {
            SocketAddr::from(([127, 0, 0, 1], a.port()))
        }
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()))
        }
        other => other,
    }
}

mod signals {
    use super::RunError;

    pub(super) struct Set(libc::sigset_t);

    /// Block SIGTERM/SIGINT/SIGHUP in this thread (and the threads it spawns) so `wait` gets them.
    pub(super) fn block() -> Result<Set, RunError> {
        // SAFETY: sigset_t is plain data; the libc calls initialise it before use.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGHUP);
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(RunError::Io(
                    "blocking signals".into(),
                    std::io::Error::from_raw_os_error(rc),
                ));
            }
            Ok(Set(set))
        }
    }

    /// Turn SIGHUP into reload requests and SIGTERM/SIGINT into a stop, for the main thread.
    pub(super) fn forward(set: &Set, tx: &std::sync::mpsc::Sender<super::Control>) {
        loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` was initialised by `block`; `sig` is a valid out pointer.
            let rc = unsafe { libc::sigwait(&set.0, &mut sig) };
            if rc != 0 {
                continue;
            }
            let msg = if sig == libc::SIGHUP {
                super::Control::Reload(None)
            } else {
                super::Control::Stop(sig)
            };
            let stop = matches!(msg, super::Control::Stop(_));
            if tx.send(msg).is_err() || stop {
                return;
            }
        }
    }
}
