//! The only code that touches the async runtime: one OS thread per configured core, pinned,
//! each with its own monoio reactor (io_uring, or epoll where the kernel refuses io_uring) and
//! its own SO_REUSEPORT listener per binding. Nothing is shared on the per-command path; the
//! connection limits are lock-free counters.
//!
//! ```text
//! main thread: validate config → probe ports → bind listeners (all cores) → spawn cores → wait for signals
//! core thread: pin → build runtime → accept loop per binding → one task per connection (conn.rs)
//! ```

mod conn;
mod limits;
pub mod listener;
mod transport;

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::config::{Binding, Config, Driver};
use crate::tls;
pub use limits::ConnLimits;

/// State shared by every core.
#[derive(Debug)]
pub struct Shared {
    pub config: Arc<Config>,
    pub tls: Vec<Option<Arc<rustls::ServerConfig>>>,
    pub users: Arc<crate::auth::Users>,
    pub metrics: crate::metrics::Metrics,
    /// Open connections per binding (for the binding's `max_connections`).
    pub binding_open: Vec<std::sync::atomic::AtomicUsize>,
    pub limits: ConnLimits,
    pub shutdown: AtomicBool,
}

/// A startup failure.
#[derive(Debug)]
pub enum RunError {
    Bind(listener::BindError),
    Tls(tls::TlsError),
    Io(String, std::io::Error),
}

/// A binding with what it needs at run time.
#[derive(Debug)]
pub(crate) struct BindingRt {
    pub(crate) index: usize,
    pub(crate) b: Binding,
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
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
    listeners: Vec<(usize, std::net::TcpListener)>,
}

/// Run the server until SIGTERM/SIGINT. Returns after every core has stopped.
pub fn run(config: Config) -> Result<(), RunError> {
    let config = Arc::new(config);
    let tls_configs = load_tls(&config).map_err(RunError::Tls)?;
    let users = Arc::new(load_users(&config)?);
    for r in &config.routes {
        if let Some(folder) = &r.folder {
            std::fs::create_dir_all(folder).map_err(|e| {
                RunError::Io(format!("creating drop folder {}", folder.display()), e)
            })?;
        }
    }
    for b in &config.bindings {
        listener::probe(&b.section.name, *b.section.listen.get_ref()).map_err(RunError::Bind)?;
    }
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpus = config.server.cores.get_ref().resolve(online);
    let mut per_core = Vec::new();
    let mut fds: Vec<RawFd> = Vec::new();
    for (core, &cpu) in cpus.iter().enumerate() {
        let mut listeners = Vec::new();
        for (i, b) in config.bindings.iter().enumerate() {
            let l = listener::bind(&b.section.name, *b.section.listen.get_ref(), cpu, 1024)
                .map_err(RunError::Bind)?;
            fds.push(l.as_raw_fd());
            listeners.push((i, l));
        }
        per_core.push(CoreListeners {
            cpu,
            core,
            listeners,
        });
    }
    let shared = Arc::new(Shared {
        tls: tls_configs,
        users,
        binding_open: config
            .bindings
            .iter()
            .map(|_| std::sync::atomic::AtomicUsize::new(0))
            .collect(),
        metrics: crate::metrics::Metrics::new(
            config
                .bindings
                .iter()
                .map(|b| b.section.name.clone())
                .collect(),
            cpus.len(),
        ),
        limits: ConnLimits::new(config.limits.max_connections),
        config: config.clone(),
        shutdown: AtomicBool::new(false),
    });
    let signals = signals::block()?;
    if let Some(addr) = config.admin.listen {
        crate::admin::start(addr, shared.clone())
            .map_err(|e| RunError::Io(format!("admin.listen {addr}"), e))?;
        tracing::info!(listen = %addr, "admin endpoint");
    }
    let driver = config.server.driver;
    tracing::info!(
        cores = cpus.len(),
        driver = driver_name(driver),
        bindings = config.bindings.len(),
        "ringmx started"
    );
    for b in &config.bindings {
        tracing::info!(binding = %b.section.name, listen = %b.section.listen.get_ref(), direction = ?b.section.direction, tls = ?b.section.tls, "listening");
    }
    let mut threads = Vec::new();
    for c in per_core {
        let shared = shared.clone();
        let t = std::thread::Builder::new()
            .name(format!("ringmx-core-{}", c.core))
            .spawn(move || core_main(c, shared, driver))
            .map_err(|e| RunError::Io("spawning a core thread".into(), e))?;
        threads.push(t);
    }
    // Wait for a signal that stops us.
    let sig = signals::wait(&signals);
    tracing::info!(
        signal = sig,
        "stopping: no new connections, finishing transactions in flight"
    );
    shared.shutdown.store(true, Ordering::SeqCst);
    for fd in &fds {
        // Wakes a pending accept (it fails with EINVAL) without cancelling it.
        // SAFETY: `fd` is a listening socket owned by a core's listener, still open.
        unsafe { libc::shutdown(*fd, libc::SHUT_RD) };
    }
    let deadline = std::time::Instant::now() + config.server.shutdown_timeout.0;
    for t in threads {
        while !t.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if t.is_finished() {
            let _ = t.join();
        }
    }
    tracing::info!("stopped");
    Ok(())
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
        monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .attach_thread_pool(pool)
            .build()
    };
    let mut rt = match result {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(core = c.core, error = %e, "cannot build the runtime");
            return;
        }
    };
    rt.block_on(async move {
        let ctx = Rc::new(conn::CoreCtx::new(c.core, shared.clone()));
        let mut accepts = Vec::new();
        for (i, l) in c.listeners {
            let Some(b) = shared.config.bindings.get(i) else {
                continue;
            };
            let rt = BindingRt {
                index: i,
                b: b.clone(),
                tls: shared.tls.get(i).cloned().flatten(),
            };
            accepts.push(monoio::spawn(accept_loop(l, Rc::new(rt), ctx.clone())));
        }
        for a in accepts {
            a.await;
        }
        // Stopping: idle sessions get 421 now; those in a transaction finish it first (and
        // are woken once idle), up to the shutdown timeout enforced by the main thread.
        while ctx.open_connections() > 0 {
            ctx.wake_idle();
            monoio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

async fn accept_loop(l: std::net::TcpListener, binding: Rc<BindingRt>, ctx: Rc<conn::CoreCtx>) {
    let listener = match monoio::net::TcpListener::from_std(l) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot register listener");
            return;
        }
    };
    loop {
        let accepted = listener.accept().await;
        if ctx.shared.shutdown.load(Ordering::SeqCst) {
            return;
        }
        match accepted {
            Ok((stream, peer)) => {
                monoio::spawn(conn::handle(stream, peer, binding.clone(), ctx.clone()));
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

    /// Wait for SIGTERM or SIGINT (SIGHUP is logged; reload arrives with the admin endpoint).
    pub(super) fn wait(set: &Set) -> i32 {
        loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` was initialised by `block`; `sig` is a valid out pointer.
            let rc = unsafe { libc::sigwait(&set.0, &mut sig) };
            if rc != 0 {
                continue;
            }
            if sig == libc::SIGHUP {
                tracing::warn!("SIGHUP: configuration reload is not available yet; ignoring");
                continue;
            }
            return sig;
        }
    }
}
