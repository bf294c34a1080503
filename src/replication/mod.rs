//! The whitelist shared across edge hosts through Redis (or Valkey): `[aswl.replication]`.
//!
//! One thread with its own small tokio runtime; the cores only hand it encoded change-log
//! records through an unbounded channel ([`crate::aswl::replica::Replica::publish`]), so
//! neither the SMTP service nor the 250 ever waits for Redis. Lookups stay local.
//!
//! **In Redis** (prefix `P`, 256 buckets by a CRC-32 of the external address):
//! - `P{stream}` — a stream; each entry is one batch: `n` = node, `at` = when the oldest
//!   change of the batch reached the publisher (ms), `d` = change-log records (the on-disk
//!   format of [`crate::aswl::persist`], checksummed). Trimmed with `MAXLEN ~ stream_max_len`.
//! - `P{b17}set` — a sorted set per bucket: member `external NUL local`, score `last_sent`
//!   (`ZADD GT`: the later one wins). What a joining node bootstraps from; expired members
//!   are removed by every node's housekeeping (`ZREMRANGEBYSCORE`).
//! - `P{b17}tomb` — a hash per bucket: `external NUL local` (local empty = every local
//!   sender) → time of the newest removal. A removal also deletes the set members it covers
//!   (one Lua script per removal, both keys in one hash slot, so it works on a cluster).
//!
//! **Publishing.** Local changes go to a durable outbox ([`outbox`]) first, then to Redis in
//! batches: set members, removals, then the stream entry (so anything in the stream before a
//! bootstrap's starting position is already in the sets). While Redis is unreachable the outbox
//! grows up to `outbox_limit` records; beyond that its adds are dropped and the whitelist's
//! own records since the oldest dropped one are republished when Redis returns (the local
//! change log and snapshots already hold them). A crash between a 250 and the outbox write is
//! covered the same way: after an unclean stop, records since the newest outbox entry
//! (minus a margin) are republished.
//!
//! **Consuming.** `XREAD BLOCK` from the last applied position (kept in the state file);
//! entries of this node are skipped; records are applied by newest `last_sent`, removals by
//! time, with remembered removals (tombstones) keeping older adds out, so replays and
//! reordering converge. Applied records are appended to the whitelist's admin log (replayed at
//! startup), which is synced before the position covering them is saved (every 2 s): after a
//! crash, what was not yet synced is read from the stream again.
//!
//! **Batching.** Changes are gathered for `batch_interval` per outbox fsync and stream entry,
//! and a follower that is not behind waits as long between reads: a few dozen fsyncs and
//! round trips a second per node instead of one per record, for about twice that in lag.
//!
//! **Bootstrap** (no position yet, or the stream was trimmed past it): read the stream's last
//! id, then load every set member and tombstone (`ZSCAN`, `HGETALL`), then follow the stream
//! from that id — whatever was published during the load is read again, harmlessly.

pub mod fleet;
pub mod outbox;
mod redis_io;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::aswl::persist::{LogRecord, decode_log, encode_log};
use crate::aswl::{Aswl, unix_now};
use outbox::{Outbox, State};
use redis_io::Conn;

/// Buckets of the per-record sets (fixed: every node must agree).
pub const BUCKETS: u32 = 256;
/// Republish this much before the newest outbox entry after an unclean stop (cores stamp
/// their records a little apart).
const CRASH_MARGIN: u32 = 5;
/// Records per `XREAD`.
const READ_COUNT: usize = 200;
const BLOCK: Duration = Duration::from_millis(500);
/// How often the state (stream position, outbox offset) is saved when it changed; after a
/// crash at most this much is read or sent again (harmlessly).
const STATE_EVERY: Duration = Duration::from_secs(2);

/// `[aswl.replication]`: the whitelist shared across edge hosts through Redis (or Valkey).
/// Read at startup (a change takes effect after a restart).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationSection {
    /// `redis://host:port[/db]` or `rediss://…` (TLS); several = seed nodes of a cluster.
    pub urls: Vec<String>,
    /// Redis Cluster (`urls` are seed nodes) rather than one server.
    pub cluster: bool,
    /// ACL user (`AUTH user password`); with `password_file`.
    pub username: Option<String>,
    /// A file holding the password (first line).
    pub password_file: Option<PathBuf>,
    /// PEM CA bundle for `rediss://` (default: the system's roots).
    pub tls_ca_file: Option<PathBuf>,
    /// Prefix of every Redis key (no `{` or `}`: keys carry their own hash tags).
    pub prefix: String,
    /// This node's name in the stream (default: host name + a random suffix, kept in the
    /// data directory).
    pub node_id: Option<String>,
    /// Most records per stream entry.
    pub batch: usize,
    /// How long changes are gathered before they are written to the outbox and sent, and
    /// how long a node waits between stream reads that were not full: fewer, larger batches
    /// (fewer fsyncs and wake-ups on every node) for at most about twice this in lag.
    pub batch_interval: crate::units::Secs,
    /// Most records kept for Redis while it is unreachable; beyond that the oldest are
    /// dropped from the outbox and republished from the whitelist itself when Redis returns.
    pub outbox_limit: usize,
    /// Stream entries kept (approximately; `XADD MAXLEN ~`).
    pub stream_max_len: usize,
}

impl Default for ReplicationSection {
    fn default() -> Self {
        ReplicationSection {
            urls: Vec::new(),
            cluster: false,
            username: None,
            password_file: None,
            tls_ca_file: None,
            prefix: "ringmx:aswl:".into(),
            node_id: None,
            batch: 1000,
            batch_interval: crate::units::Secs(Duration::from_millis(50)),
            outbox_limit: 1_000_000,
            stream_max_len: 100_000,
        }
    }
}

/// The compiled `[aswl.replication]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub urls: Vec<String>,
    pub cluster: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    pub tls_ca: Option<Vec<u8>>,
    pub prefix: String,
    pub node_id: Option<String>,
    pub batch: usize,
    pub batch_interval: Duration,
    pub outbox_limit: usize,
    pub stream_max_len: usize,
}

impl Settings {
    /// Compile; errors name the key (`replication.…`).
    pub fn compile(r: &ReplicationSection) -> Result<Settings, (&'static str, String)> {
        if r.urls.is_empty() {
            return Err(("replication.urls", "list at least one redis:// URL".into()));
        }
        for u in &r.urls {
            if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
                return Err((
                    "replication.urls",
                    format!("{u:?}: expected redis://host:port or rediss://host:port"),
                ));
            }
            if let Err(e) = redis::IntoConnectionInfo::into_connection_info(u.as_str()) {
                return Err(("replication.urls", format!("{u:?}: {e}")));
            }
        }
        if !r.cluster && r.urls.len() > 1 {
            return Err((
                "replication.urls",
                "several URLs are the seed nodes of a cluster: set cluster = true".into(),
            ));
        }
        if r.username.is_some() && r.password_file.is_none() {
            return Err((
                "replication.username",
                "an ACL user needs password_file".into(),
            ));
        }
        let password = match &r.password_file {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| ("replication.password_file", format!("{}: {e}", f.display())))?
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string(),
            ),
            None => None,
        };
        let tls_ca = match &r.tls_ca_file {
            Some(f) => Some(
                std::fs::read(f)
                    .map_err(|e| ("replication.tls_ca_file", format!("{}: {e}", f.display())))?,
            ),
            None => None,
        };
        if r.prefix.contains(['{', '}']) {
            return Err((
                "replication.prefix",
                "no { or } (the keys carry their own hash tags)".into(),
            ));
        }
        if let Some(n) = &r.node_id
            && (n.is_empty() || !n.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err((
                "replication.node_id",
                "printable ASCII without spaces".into(),
            ));
        }
        if r.batch_interval.0 > Duration::from_secs(1) {
            return Err((
                "replication.batch_interval",
                "at most 1s (it adds to the replication lag)".into(),
            ));
        }
        for (k, v) in [
            ("replication.batch", r.batch),
            ("replication.outbox_limit", r.outbox_limit),
            ("replication.stream_max_len", r.stream_max_len),
        ] {
            if v == 0 {
                return Err((k, "must be at least 1".into()));
            }
        }
        Ok(Settings {
            urls: r.urls.clone(),
            cluster: r.cluster,
            username: r.username.clone(),
            password,
            tls_ca,
            prefix: r.prefix.clone(),
            node_id: r.node_id.clone(),
            batch: r.batch,
            batch_interval: r.batch_interval.0,
            outbox_limit: r.outbox_limit,
            stream_max_len: r.stream_max_len,
        })
    }

    /// What identifies the replication group: a change resets position and republishes.
    fn identity(&self) -> String {
        format!("{}|{}", self.urls.join(","), self.prefix)
    }

    fn stream_key(&self) -> String {
        format!("{}{{stream}}", self.prefix)
    }

    fn set_key(&self, bucket: u32) -> String {
        format!("{}{{b{bucket}}}set", self.prefix)
    }

    fn tomb_key(&self, bucket: u32) -> String {
        format!("{}{{b{bucket}}}tomb", self.prefix)
    }
}

/// The bucket of an external address key.
pub fn bucket(external: &str) -> u32 {
    crc32fast::hash(external.as_bytes()) % BUCKETS
}

/// `external NUL local`: a set member or tombstone field.
fn member(external: &str, local: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(external.len() + local.len() + 1);
    m.extend_from_slice(external.as_bytes());
    m.push(0);
    m.extend_from_slice(local.as_bytes());
    m
}

fn split_member(m: &[u8]) -> Option<(&str, &str)> {
    let at = memchr::memchr(0, m)?;
    let (e, l) = (m.get(..at)?, m.get(at + 1..)?);
    Some((std::str::from_utf8(e).ok()?, std::str::from_utf8(l).ok()?))
}

/// The live whitelist settings (mode and lifetime may change on reload).
pub type LiveSettings = Arc<dyn Fn() -> Option<Arc<crate::aswl::Settings>> + Send + Sync>;

/// The running replication thread.
#[derive(Debug)]
pub struct Handle {
    stop: Arc<Stop>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Stop {
    flag: AtomicBool,
    notify: tokio::sync::Notify,
}

impl Stop {
    fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Resolves once stopping (no lost wake-up: registered before the flag is read).
    async fn stopped(&self) {
        loop {
            let n = self.notify.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.is_set() {
                return;
            }
            n.await;
        }
    }
}

impl Handle {
    /// Stop after the cores have stopped: what they handed over is written to the outbox
    /// (and sent, if Redis answers within two seconds), then the state is saved as clean.
    pub fn stop(mut self) {
        self.stop.flag.store(true, Ordering::SeqCst);
        self.stop.notify.notify_waiters();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A thread named `name` running `work` on a current-thread tokio runtime of its own (what the
/// Redis client needs); `what` names it in the log if the runtime cannot start.
pub(crate) fn spawn_on_runtime(
    name: &str,
    what: &'static str,
    work: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(work),
                Err(e) => tracing::error!(error = %e, "{what}: cannot start a runtime"),
            }
        })
}

/// Open the outbox and state in `{aswl dir}/replication` and start the thread.
pub fn start(
    aswl: Arc<Aswl>,
    settings: Arc<Settings>,
    live: LiveSettings,
) -> std::io::Result<Handle> {
    let first = live().ok_or_else(|| std::io::Error::other("[aswl] is off"))?;
    let dir = dir_of(&first.dir);
    std::fs::create_dir_all(&dir)?;
    let (mut state, fresh) = State::load(&dir)?;
    let node = match (&settings.node_id, &state.node) {
        (Some(n), _) => n.clone(),
        (None, Some(n)) => n.clone(),
        (None, None) => default_node_id(),
    };
    state.node = Some(node.clone());
    if fresh || state.identity != settings.identity() {
        // New to this replication group: everything known here goes out, everything there
        // comes in.
        if !fresh {
            tracing::warn!("aswl replication: Redis URLs or prefix changed; bootstrapping again");
        }
        state.identity = settings.identity();
        state.stream = None;
        state.republish_since = Some(0);
    } else if !state.clean {
        let since = state.high_water.saturating_sub(CRASH_MARGIN);
        state.owe_republish(since);
        tracing::info!(
            since,
            "aswl replication: unclean stop; republishing records since the newest outbox entry"
        );
    }
    state.clean = false;
    state.save(&dir)?;
    let outbox = Outbox::open(&dir, state.epoch, state.sent, settings.outbox_limit)?;
    state.epoch = outbox.epoch();
    state.sent = 0;
    state.save(&dir)?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    aswl.replica.connect_tap(tx);
    let _ = aswl.replica.node.set(node.clone());
    let stop = Arc::new(Stop::default());
    let ctx = Ctx {
        aswl,
        s: settings,
        live,
        dir,
        node,
        stop: stop.clone(),
        state: Mutex::new(state),
        outbox: Mutex::new(outbox),
        tombs: Mutex::new(HashMap::new()),
        unsynced: AtomicBool::new(false),
        saved: Mutex::new(None),
    };
    ctx.note_outbox();
    let thread = spawn_on_runtime("ringmx-replication", "aswl replication", async move {
        run(&ctx, rx).await;
    })?;
    Ok(Handle {
        stop,
        thread: Some(thread),
    })
}

fn default_node_id() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or
    // truncates (we stop at the first NUL or the end).
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let host = if rc == 0 {
        let end = memchr::memchr(0, &buf).unwrap_or(buf.len());
        String::from_utf8_lossy(buf.get(..end).unwrap_or_default()).into_owned()
    } else {
        "ringmx".into()
    };
    let host: String = host.chars().filter(|c| c.is_ascii_graphic()).collect();
    let rnd = std::collections::hash_map::RandomState::new();
    let suffix = std::hash::BuildHasher::hash_one(&rnd, std::process::id()) as u32;
    format!("{host}-{suffix:08x}")
}

/// Everything the tasks share (one thread: the mutexes are never contended).
struct Ctx {
    aswl: Arc<Aswl>,
    s: Arc<Settings>,
    live: LiveSettings,
    dir: PathBuf,
    node: String,
    stop: Arc<Stop>,
    state: Mutex<State>,
    outbox: Mutex<Outbox>,
    /// Removals seen: (external, local or "") → newest removal time.
    tombs: Mutex<HashMap<(String, String), u32>>,
    /// Applied records appended to the admin log and not yet synced.
    unsynced: AtomicBool,
    /// The state as last written.
    saved: Mutex<Option<State>>,
}

impl Ctx {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn outbox(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn tombs(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), u32>> {
        self.tombs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Save the state if it changed; applied records first reach the disk, so the saved
    /// stream position is never ahead of what is durable here.
    fn save_state(&self) {
        if self.unsynced.swap(false, Ordering::Relaxed)
            && let Err(e) = self.aswl.disk.sync_admin()
        {
            self.unsynced.store(true, Ordering::Relaxed);
            self.aswl.replica.error("syncing the admin log", &e);
            return;
        }
        let st = {
            let (epoch, sent) = {
                let o = self.outbox();
                (o.epoch(), o.sent_offset())
            };
            let mut st = self.state();
            st.epoch = epoch;
            st.sent = sent;
            st.clone()
        };
        let mut saved = self.saved.lock().unwrap_or_else(|p| p.into_inner());
        if saved.as_ref() == Some(&st) {
            return;
        }
        match st.save(&self.dir) {
            Ok(()) => *saved = Some(st),
            Err(e) => self.aswl.replica.error("saving the replication state", &e),
        }
    }

    /// Publish the outbox's record count as the gauge.
    fn note_outbox(&self) {
        let n = self.outbox().records() as u64;
        self.aswl.replica.outbox.store(n, Ordering::Relaxed);
    }

    /// Is an add of (external, local) at `t` covered by a removal?
    fn removed(&self, external: &str, local: &str, t: u32) -> bool {
        let tombs = self.tombs();
        if tombs.is_empty() {
            return false;
        }
        [local, ""].iter().any(|l| {
            tombs
                .get(&(external.to_string(), l.to_string()))
                .is_some_and(|&r| r >= t)
        })
    }

    fn remember_removal(&self, external: &str, local: &str, t: u32) {
        let mut tombs = self.tombs();
        let e = tombs
            .entry((external.to_string(), local.to_string()))
            .or_insert(0);
        *e = (*e).max(t);
    }

    /// Sleep up to `d`, waking early when stopping.
    async fn pause(&self, d: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.stop.stopped() => {}
        }
    }

    /// Connect (retrying with back-off until it works or we stop).
    async fn connect(&self, response_timeout: Duration) -> Option<Conn> {
        let mut wait = Duration::from_millis(100);
        loop {
            if self.stop.is_set() {
                return None;
            }
            match Conn::open(&self.s, response_timeout).await {
                Ok(c) => return Some(c),
                Err(e) => {
                    self.aswl.replica.error("connecting to Redis", &e);
                    self.aswl.replica.set_connected(false);
                }
            }
            self.pause(wait).await;
            wait = (wait * 2).min(Duration::from_secs(2));
        }
    }
}

async fn run(ctx: &Ctx, rx: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    tokio::join!(publisher(ctx, rx), consumer(ctx));
    ctx.state().clean = true;
    ctx.save_state();
    tracing::info!("aswl replication stopped");
}

/// Move what the cores handed over into the outbox (durable), then send it.
async fn publisher(ctx: &Ctx, mut rx: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    let r = &ctx.aswl.replica;
    let mut conn: Option<Conn> = None;
    let mut retry_at = Instant::now();
    let mut wait = Duration::from_millis(100);
    let mut buf = Vec::new();
    let mut saved = Instant::now();
    loop {
        let stopping = ctx.stop.is_set();
        // When the first change of this batch arrived (the lag is measured from here).
        let mut first_at = now_ms();
        if !stopping {
            let idle = ctx.outbox().is_empty() && ctx.state().republish_since.is_none();
            let sleep = if idle {
                Duration::from_secs(1)
            } else {
                retry_at.saturating_duration_since(Instant::now())
            };
            tokio::select! {
                _ = rx.recv_many(&mut buf, 4096) => {}
                _ = tokio::time::sleep(sleep) => {}
                _ = ctx.stop.stopped() => {}
            }
            first_at = now_ms();
            if !buf.is_empty() && buf.len() < ctx.s.batch {
                // Gather a batch: one outbox fsync and one stream entry for all of it.
                ctx.pause(ctx.s.batch_interval).await;
            }
        }
        while let Ok(x) = rx.try_recv() {
            buf.push(x);
        }
        if !buf.is_empty() {
            r.queued.fetch_sub(buf.len() as u64, Ordering::Relaxed);
            let appended = ctx.outbox().append(&buf, first_at);
            match appended {
                Ok(a) => {
                    let mut st = ctx.state();
                    st.high_water = st.high_water.max(a.high_water);
                    if let Some(since) = a.overflow_since {
                        r.overflowed.fetch_add(a.dropped as u64, Ordering::Relaxed);
                        st.owe_republish(since);
                        drop(st);
                        tracing::warn!(
                            dropped = a.dropped,
                            since,
                            "aswl replication: outbox full; the dropped records are republished from the whitelist when Redis is back"
                        );
                        ctx.save_state();
                    }
                }
                Err(e) => {
                    // Not durable here: the whitelist holds them; republish from it.
                    r.error("writing the outbox", &e);
                    let since = buf
                        .iter()
                        .flat_map(|b| decode_log(b).0)
                        .map(|x| x.t)
                        .min()
                        .unwrap_or(0);
                    ctx.state().owe_republish(since);
                }
            }
            buf.clear();
            ctx.note_outbox();
        }
        if stopping {
            // A last send if Redis is there; the outbox keeps the rest for the next start.
            if let Some(c) = conn.as_mut() {
                let _ = tokio::time::timeout(Duration::from_secs(2), drain(ctx, c)).await;
            }
        } else if Instant::now() >= retry_at {
            if conn.is_none() {
                match Conn::open(&ctx.s, Duration::from_secs(5)).await {
                    Ok(c) => conn = Some(c),
                    Err(e) => r.error("connecting to Redis", &e),
                }
            }
            let ok = match conn.as_mut() {
                Some(c) => drain(ctx, c).await,
                None => false,
            };
            if ok {
                wait = Duration::from_millis(100);
            } else {
                r.set_connected(false);
                retry_at = Instant::now() + wait;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
        }
        if saved.elapsed() > STATE_EVERY || stopping {
            ctx.save_state();
            saved = Instant::now();
        }
        if stopping {
            return;
        }
    }
}

/// Send the outbox, then any republishing owed. `false` on a Redis error.
async fn drain(ctx: &Ctx, c: &mut Conn) -> bool {
    let r = &ctx.aswl.replica;
    // A bounded number of batches per call, so new changes keep reaching the outbox.
    for _ in 0..64 {
        let batch = ctx.outbox().peek(ctx.s.batch);
        if batch.records.is_empty() {
            break;
        }
        let deadline = if ctx.stop.is_set() {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(30)
        };
        match tokio::time::timeout(
            deadline,
            c.publish(&ctx.s, &ctx.node, &batch.records, batch.at_ms),
        )
        .await
        {
            Ok(Ok(())) => {
                let n = batch.records.iter().map(|x| x.pairs.len()).sum::<usize>();
                r.published.fetch_add(n as u64, Ordering::Relaxed);
                r.set_connected(true);
                if let Err(e) = ctx.outbox().mark_sent(batch.entries) {
                    r.error("truncating the outbox", &e);
                }
                ctx.note_outbox();
            }
            Ok(Err(e)) => {
                r.error("publishing", &e);
                return false;
            }
            Err(_) => {
                r.error("publishing", &"timed out");
                return false;
            }
        }
        if ctx.stop.is_set() {
            return true;
        }
    }
    let since = ctx.state().republish_since;
    if let Some(since) = since
        && !ctx.stop.is_set()
        && ctx.outbox().is_empty()
    {
        if let Err(e) = republish(ctx, c, since).await {
            r.error("republishing", &e);
            return false;
        }
        ctx.state().republish_since = None;
        ctx.save_state();
    }
    true
}

/// Publish every local record last sent at or after `since` (from memory; not via the outbox).
async fn republish(ctx: &Ctx, c: &mut Conn, since: u32) -> redis::RedisResult<()> {
    let recs: Vec<LogRecord> = ctx
        .aswl
        .store
        .records()
        .into_iter()
        .filter(|x| x.last_sent >= since)
        .map(|x| LogRecord {
            remove: false,
            t: x.last_sent,
            pairs: vec![crate::aswl::Pair {
                local: x.local,
                local_original: x.local_original,
                external: x.external,
                external_original: x.external_original,
            }],
        })
        .collect();
    let started = Instant::now();
    for chunk in recs.chunks(ctx.s.batch) {
        c.publish(&ctx.s, &ctx.node, chunk, now_ms()).await?;
        ctx.aswl
            .replica
            .republished
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        ctx.aswl
            .replica
            .published
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
    tracing::info!(
        records = recs.len(),
        since,
        ms = started.elapsed().as_millis() as u64,
        "aswl replication: republished"
    );
    Ok(())
}

/// Follow the stream and apply what other nodes publish; bootstrap when needed; expire the
/// sets in Redis on the sweep interval.
async fn consumer(ctx: &Ctx) {
    let r = &ctx.aswl.replica;
    let mut conn: Option<Conn> = None;
    let mut checked = false;
    let mut housekeeping = Instant::now();
    let mut saved = Instant::now();
    loop {
        if ctx.stop.is_set() {
            return;
        }
        if (ctx.live)().is_none() {
            // `[aswl]` turned off by a reload: hold the position until it is back.
            ctx.pause(Duration::from_secs(1)).await;
            continue;
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => {
                conn = ctx.connect(BLOCK + Duration::from_secs(5)).await;
                checked = false;
                match conn.as_mut() {
                    Some(c) => c,
                    None => return,
                }
            }
        };
        let result = async {
            if !checked {
                // Is our position still in the stream?
                let pos = ctx.state().stream.clone();
                let need = match &pos {
                    None => true,
                    Some(p) => match c.stream_info(&ctx.s).await? {
                        // Nothing was ever published in this group yet.
                        None if p == "0-0" => false,
                        None => {
                            tracing::warn!("aswl replication: the stream is gone from Redis (data lost?); republishing and bootstrapping");
                            let mut st = ctx.state();
                            st.republish_since = Some(0);
                            true
                        }
                        Some(info) => info.gap_after(p),
                    },
                };
                if need {
                    bootstrap(ctx, c).await?;
                } else {
                    *ctx.tombs() = c.load_tombstones(&ctx.s).await?;
                }
                checked = true;
                r.set_connected(true);
            }
            if housekeeping.elapsed() >= sweep_interval(ctx) {
                housekeeping = Instant::now();
                expire(ctx, c).await?;
            }
            let pos = ctx.state().stream.clone().unwrap_or_else(|| "0-0".into());
            let entries = tokio::select! {
                e = c.read(&ctx.s, &pos, READ_COUNT, BLOCK) => e?,
                _ = ctx.stop.stopped() => return Ok(()),
            };
            if let Some(last) = entries.last() {
                apply_entries(ctx, &entries)?;
                ctx.state().stream = Some(last.id.clone());
                if let Ok(mut p) = r.position.lock() {
                    p.clone_from(&last.id);
                }
            }
            if !entries.is_empty() && entries.len() < READ_COUNT {
                // Not behind: let the next batch gather (one apply and one fsync for it).
                ctx.pause(ctx.s.batch_interval).await;
            }
            Ok::<(), redis::RedisError>(())
        }
        .await;
        if let Err(e) = result {
            r.error("reading the stream", &e);
            r.set_connected(false);
            conn = None;
            ctx.pause(Duration::from_millis(500)).await;
        }
        if saved.elapsed() > STATE_EVERY {
            ctx.save_state();
            saved = Instant::now();
        }
    }
}

fn sweep_interval(ctx: &Ctx) -> Duration {
    (ctx.live)().map_or(Duration::from_secs(3600), |s| s.sweep_interval)
}

/// Apply stream entries (other nodes' records), durably, before the position moves on.
fn apply_entries(ctx: &Ctx, entries: &[redis_io::Entry]) -> redis::RedisResult<()> {
    let r = &ctx.aswl.replica;
    let Some(s) = (ctx.live)() else {
        return Ok(());
    };
    let now = unix_now();
    let mut apply = Vec::new();
    let mut published_at = Vec::new();
    for e in entries {
        let (recs, bad) = decode_log(&e.data);
        if bad > 0 {
            r.error(
                "stream entry",
                &format!("{} damaged record(s) in {}", bad, e.id),
            );
        }
        // Removals first (from every node, ours too), so the adds of this read see them.
        for x in recs.iter().filter(|x| x.remove) {
            for p in &x.pairs {
                ctx.remember_removal(&p.external, &p.local, x.t);
            }
        }
        if e.node == ctx.node {
            continue;
        }
        published_at.push(e.at_ms);
        for mut x in recs {
            if !x.remove {
                let before = x.pairs.len();
                x.pairs.retain(|p| !ctx.removed(&p.external, &p.local, x.t));
                r.ignored
                    .fetch_add((before - x.pairs.len()) as u64, Ordering::Relaxed);
            }
            if !x.pairs.is_empty() {
                apply.push(x);
            }
        }
    }
    apply_durably(ctx, &s, &apply, now)?;
    // Applied and on disk here.
    let done = now_ms();
    for at in published_at {
        r.note_delay(done.saturating_sub(at));
    }
    Ok(())
}

/// Apply records to memory and write them to the admin log (fdatasync).
fn apply_durably(
    ctx: &Ctx,
    s: &crate::aswl::Settings,
    recs: &[LogRecord],
    now: u32,
) -> redis::RedisResult<()> {
    if recs.is_empty() {
        return Ok(());
    }
    let r = &ctx.aswl.replica;
    let n = ctx.aswl.apply_remote(s, recs, now);
    let cutoff = s.cutoff(now);
    let mut bytes = Vec::new();
    for x in recs.iter().filter(|x| x.remove || x.t >= cutoff) {
        bytes.extend_from_slice(&encode_log(x.remove, x.t, &x.pairs));
    }
    r.ignored.fetch_add(
        recs.iter()
            .map(|x| x.pairs.len())
            .sum::<usize>()
            .saturating_sub(n) as u64,
        Ordering::Relaxed,
    );
    if let Some(t) = recs.iter().filter(|x| !x.remove).map(|x| x.t).max() {
        r.newest_applied.fetch_max(u64::from(t), Ordering::Relaxed);
    }
    r.applied.fetch_add(n as u64, Ordering::Relaxed);
    if !bytes.is_empty() {
        // Synced before the stream position that covers them is saved ([`Ctx::save_state`]):
        // after a crash they are read from the stream again.
        ctx.aswl.disk.append_admin(&bytes).map_err(|e| {
            redis::RedisError::from(std::io::Error::other(format!(
                "writing applied records to the admin log: {e}"
            )))
        })?;
        ctx.unsynced.store(true, Ordering::Relaxed);
    }
    Ok(())
}

/// Load every record and tombstone from Redis, then follow the stream from the id read before.
async fn bootstrap(ctx: &Ctx, c: &mut Conn) -> redis::RedisResult<()> {
    let r = &ctx.aswl.replica;
    let Some(s) = (ctx.live)() else {
        return Ok(());
    };
    let started = Instant::now();
    let pos = c.last_id(&ctx.s).await?;
    let tombs = c.load_tombstones(&ctx.s).await?;
    *ctx.tombs() = tombs;
    let now = unix_now();
    let cutoff = s.cutoff(now);
    let mut total = 0usize;
    for b in 0..BUCKETS {
        let members = c.scan_set(&ctx.s, b).await?;
        let mut recs = Vec::new();
        for (m, t) in members {
            let Some((ext, local)) = split_member(&m) else {
                continue;
            };
            if t < cutoff || local.is_empty() || ctx.removed(ext, local, t) {
                continue;
            }
            recs.push(LogRecord {
                remove: false,
                t,
                pairs: vec![crate::aswl::Pair {
                    local: local.into(),
                    local_original: local.into(),
                    external: ext.into(),
                    external_original: ext.into(),
                }],
            });
        }
        total += recs.len();
        apply_durably(ctx, &s, &recs, now)?;
    }
    {
        let mut st = ctx.state();
        st.stream = Some(pos.clone());
    }
    ctx.save_state();
    r.bootstraps.fetch_add(1, Ordering::Relaxed);
    r.bootstrap_records
        .fetch_add(total as u64, Ordering::Relaxed);
    tracing::info!(
        records = total,
        from = %pos,
        ms = started.elapsed().as_millis() as u64,
        "aswl replication: bootstrapped from Redis"
    );
    Ok(())
}

/// Remove expired set members and tombstones older than the lifetime.
async fn expire(ctx: &Ctx, c: &mut Conn) -> redis::RedisResult<()> {
    let Some(s) = (ctx.live)() else {
        return Ok(());
    };
    if s.lifetime.is_none() {
        return Ok(());
    }
    let cutoff = s.cutoff(unix_now());
    c.expire(&ctx.s, cutoff).await?;
    ctx.tombs().retain(|_, t| *t >= cutoff);
    Ok(())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Put changes made offline (`ringmx aswl … --offline`) in the outbox; the next start sends
/// them.
pub fn queue_offline(aswl_dir: &Path, s: &Settings, changes: &[Vec<u8>]) -> std::io::Result<()> {
    if changes.is_empty() {
        return Ok(());
    }
    let dir = dir_of(aswl_dir);
    std::fs::create_dir_all(&dir)?;
    let (mut state, _) = State::load(&dir)?;
    let mut o = Outbox::open(&dir, state.epoch, state.sent, s.outbox_limit)?;
    let a = o.append(changes, now_ms())?;
    state.epoch = o.epoch();
    state.sent = 0;
    state.high_water = state.high_water.max(a.high_water);
    if let Some(since) = a.overflow_since {
        state.owe_republish(since);
    }
    state.save(&dir)
}

/// The replication directory of an `[aswl] dir`.
pub fn dir_of(aswl_dir: &Path) -> PathBuf {
    aswl_dir.join("replication")
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn config_errors_name_the_key_and_line() {
        let base = "[[binding]]\nname = \"in\"\nlisten = \"127.0.0.1:2525\"\ndirection = \"inbound\"\n[domains]\nlocal = [\"a.test\"]\n[[route]]\ndomains = [\"*\"]\naction = \"discard\"\n[server]\ndata_dir = \"/tmp/ringmx-repl-cfg\"\n[aswl]\nmode = \"global\"\n[aswl.replication]\n";
        for (extra, key, line) in [
            ("urls = []", "aswl.replication.urls", 15),
            ("urls = [\"http://x\"]", "aswl.replication.urls", 15),
            (
                "urls = [\"redis://a:1\", \"redis://b:2\"]",
                "aswl.replication.urls",
                15,
            ),
            (
                "urls = [\"redis://a:1\"]\nprefix = \"x{y}\"",
                "aswl.replication.prefix",
                16,
            ),
            (
                "urls = [\"redis://a:1\"]\nusername = \"u\"",
                "aswl.replication.username",
                16,
            ),
            (
                "urls = [\"redis://a:1\"]\nusername = \"u\"\npassword_file = \"/nonexistent/pw\"",
                "aswl.replication.password_file",
                17,
            ),
            (
                "urls = [\"redis://a:1\"]\nbatch = 0",
                "aswl.replication.batch",
                16,
            ),
            (
                "urls = [\"redis://a:1\"]\nnode_id = \"a b\"",
                "aswl.replication.node_id",
                16,
            ),
            ("urls = [\"redis://a:1\"]\nbogus = 1", "bogus", 16),
        ] {
            let e = Config::parse(&format!("{base}{extra}\n"), "t")
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{extra}: {e}");
            assert!(
                e.contains(&format!("t:{line}:")),
                "{extra}: line {line}: {e}"
            );
        }
        let ok = Config::parse(
            &format!("{base}urls = [\"rediss://u@h:6380/2\"]\nprefix = \"p:\"\n"),
            "t",
        )
        .unwrap();
        let r = ok.replication.clone().unwrap();
        assert_eq!(r.prefix, "p:");
        assert_eq!(r.stream_key(), "p:{stream}");
        assert_eq!(r.set_key(17), "p:{b17}set");
        assert_eq!(r.tomb_key(17), "p:{b17}tomb");
    }

    #[test]
    fn members_split_back_and_buckets_are_stable() {
        let m = super::member("bob@remote.test", "alice@example.test");
        assert_eq!(
            super::split_member(&m),
            Some(("bob@remote.test", "alice@example.test"))
        );
        assert_eq!(super::split_member(b"no-separator"), None);
        // Every node must agree on the bucket: CRC-32 (IEEE) of the key, mod 256.
        assert_eq!(
            super::bucket("bob@remote.test"),
            crc32fast::hash(b"bob@remote.test") % 256
        );
        assert!(super::redis_io::id_lt("1-5", "2-0"));
        assert!(super::redis_io::id_lt("10-1", "10-2"));
        assert!(!super::redis_io::id_lt("10-2", "9-99"));
    }
}
