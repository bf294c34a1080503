//! The Auto Sender Whitelist: learned from outbound mail, checked on inbound mail.
//!
//! - **Collection** (outbound bindings, once the message is accepted): every (local sender,
//!   external recipient) pair is recorded with `last_sent = now`, unless the sender is `<>`, the
//!   recipient is in a local domain, the client is in `ip_exceptions`, the message is automatic
//!   or bulk ([`detect`]: `Auto-Submitted`, `Precedence`, list headers, reports, out-of-office
//!   subjects), or it goes to R within `auto_response_window` after mail from R came in.
//! - **Check** (inbound bindings, at RCPT, per recipient): by `mode`, is there an unexpired
//!   record — from anyone local (`global`), from the recipient's domain (`per-domain`), from
//!   this recipient (`per-recipient`)? `check_exceptions`, local-domain senders and `<>` never
//!   pass. All three views are kept ([`store`]), so `mode` changes on reload at once.
//! - **Storage**: [`store`] in memory, [`persist`] on disk (change log committed with the spool's
//!   group commit, periodic snapshots).
//!
//! Everything here reads untrusted bytes (addresses, headers, files on disk, admin requests):
//! no `unwrap`, no indexing, no panics outside tests.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )
)]

pub mod addr;
pub mod admin;
pub mod detect;
pub mod persist;
pub mod replica;
mod section;
pub mod store;
pub mod table;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

pub use store::Mode;

use detect::{Masks, Signals, Skip};
pub use section::{AswlSection, RequireAuth};

/// An outbound message as [`Aswl::collect`] reads it.
#[derive(Debug, Clone, Copy)]
pub struct Outbound<'a> {
    pub queue_id: &'a str,
    pub client: IpAddr,
    pub sender: &'a str,
    pub rcpts: &'a [String],
    /// The start of the content: at least the whole header section.
    pub content: &'a [u8],
}

/// The compiled `[aswl]` settings (part of the configuration; replaced on reload).
#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: Mode,
    /// `None` = records never expire.
    pub lifetime: Option<Duration>,
    pub sweep_interval: Duration,
    pub snapshot_interval: Duration,
    pub dir: PathBuf,
    pub ip_exceptions: Vec<crate::units::Cidr>,
    pub subjects: Option<Masks>,
    pub auto_response_window: Duration,
    pub signals: Signals,
    pub check_exceptions: Option<Masks>,
    pub except_local_domains: bool,
    /// `[domains] local`: exact names (lower case) in a set, `*.suffix` patterns in a list.
    pub local_exact: std::collections::HashSet<String, foldhash::fast::RandomState>,
    pub local_patterns: Vec<String>,
    pub log_additions: bool,
    pub header: String,
    pub normalize: addr::Normalize,
    /// Resolved against `[authentication] verify` by the configuration.
    pub require_authentication: section::RequireAuth,
}

impl Settings {
    /// Compile `[aswl]`; errors name the key (without the `aswl.` prefix).
    pub fn compile<R>(
        a: &AswlSection<R>,
        dir: PathBuf,
        local_domains: &[String],
    ) -> Result<Settings, (&'static str, String)> {
        let lifetime = match a.lifetime.trim() {
            "off" | "" => None,
            s => {
                let d = crate::units::Secs::parse(s)
                    .map_err(|e| ("lifetime", format!("\"off\" or a duration: {e}")))?
                    .0;
                if d < Duration::from_secs(1) {
                    return Err(("lifetime", "must be at least 1s (or \"off\")".into()));
                }
                Some(d)
            }
        };
        let mut subject_list: Vec<String> = match &a.subject_exceptions_file {
            Some(f) => std::fs::read_to_string(f)
                .map_err(|e| ("subject_exceptions_file", format!("{}: {e}", f.display())))?
                .lines()
                .map(str::to_string)
                .collect(),
            None if a.default_subject_exceptions => detect::DEFAULT_SUBJECTS
                .lines()
                .map(str::to_string)
                .collect(),
            None => Vec::new(),
        };
        subject_list.extend(a.subject_exceptions.iter().cloned());
        let subjects = Masks::new(&subject_list, false).map_err(|e| ("subject_exceptions", e.0))?;
        let check = Masks::new(&a.check_exceptions, true).map_err(|e| ("check_exceptions", e.0))?;
        if a.header.is_empty() || !a.header.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
            return Err(("header", "must be a header field name".into()));
        }
        for (k, v) in [
            ("sweep_interval", a.sweep_interval.0),
            ("snapshot_interval", a.snapshot_interval.0),
        ] {
            if v < Duration::from_millis(100) {
                return Err((k, "must be at least 100ms".into()));
            }
        }
        Ok(Settings {
            mode: a.mode,
            lifetime,
            sweep_interval: a.sweep_interval.0,
            snapshot_interval: a.snapshot_interval.0,
            dir,
            ip_exceptions: a.ip_exceptions.clone(),
            subjects: (!subjects.is_empty()).then_some(subjects),
            auto_response_window: a.auto_response_window.0,
            signals: Signals {
                auto_submitted: a.detect_auto_submitted,
                precedence: a.detect_precedence,
                list_headers: a.detect_list_headers,
                reports: a.detect_reports,
            },
            check_exceptions: (!check.is_empty()).then_some(check),
            except_local_domains: a.except_local_domains,
            local_exact: local_domains
                .iter()
                .filter(|d| !d.starts_with("*."))
                .map(|d| d.to_ascii_lowercase())
                .collect(),
            local_patterns: local_domains
                .iter()
                .filter(|d| d.starts_with("*."))
                .cloned()
                .collect(),
            log_additions: a.log_additions,
            header: a.header.clone(),
            require_authentication: a
                .require_authentication
                .unwrap_or(section::RequireAuth::Off),
            normalize: addr::Normalize {
                case_sensitive_local_part: a.case_sensitive_local_part,
                local_delimiters: a.local_delimiters.clone(),
                external_plus_fold: a.external_plus_fold,
            },
        })
    }

    /// The verdict header for a copy of an inbound message (`X-ASWL: pass mode=…` with its
    /// line ending); `whitelisted` is `None` for no verdict (`none`).
    pub fn verdict_header(&self, whitelisted: Option<bool>) -> String {
        self.verdict_header_why(whitelisted, "")
    }

    /// [`Settings::verdict_header`] with why, e.g. `auth=dkim` or `reason=unauthenticated`.
    pub fn verdict_header_why(&self, whitelisted: Option<bool>, why: &str) -> String {
        let word = if whitelisted == Some(true) {
            "pass"
        } else {
            "none"
        };
        let sep = if why.is_empty() { "" } else { " " };
        format!(
            "{}: {word} mode={}{sep}{why}\r\n",
            self.header,
            self.mode.as_str()
        )
    }

    /// The header section without any verdict header a client sent (`None`: there was none).
    pub fn strip_verdict(&self, content: &[u8]) -> Option<Vec<u8>> {
        detect::strip_header(content, &self.header)
    }

    /// The oldest `last_sent` still valid at `now`.
    pub fn cutoff(&self, now: u32) -> u32 {
        match self.lifetime {
            None => 0,
            Some(l) => now.saturating_sub(l.as_secs().min(u64::from(u32::MAX)) as u32),
        }
    }

    fn is_local(&self, domain: &str) -> bool {
        // Keys are lower case already; the configuration's names were lowered above.
        self.local_exact.contains(domain)
            || (!self.local_patterns.is_empty()
                && crate::domain::domain_matches(&self.local_patterns, domain))
    }
}

/// Keep freed heap memory in the process instead of handing it back to the kernel at once.
/// Every return (trim, `munmap`) of memory by one thread interrupts every other core of the
/// process (a TLB shootdown, an expensive IPI on a VM): measured, it put a 6 µs tail on 1% of
/// the whitelist lookups of one core while another core was growing the tables. Memory freed
/// by the sweep is reused by later growth.
pub fn keep_freed_memory() {
    // SAFETY: mallopt only changes allocator tuning parameters; it is called before the
    // threads that use the whitelist start.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
    }
}

/// Seconds since the epoch, as stored.
pub fn unix_now() -> u32 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs().min(u64::from(u32::MAX)) as u32)
}

/// The result of checking one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pass {
        last_sent: u32,
    },
    None,
    /// Never whitelisted, whatever the records say.
    Excepted(String),
}

impl Verdict {
    pub fn pass(&self) -> bool {
        matches!(self, Verdict::Pass { .. })
    }
}

/// See [`Aswl::decide`].
enum Decision<'a> {
    NullSender,
    Unusable(&'a str),
    LocalDomain(&'a str),
    Exception(&'a str, &'a str),
    Looked {
        ext: &'a str,
        local: &'a str,
        t: Option<u32>,
    },
}

/// Counters (exported as metrics).
#[derive(Debug, Default)]
pub struct Counters {
    /// Hits and misses per mode (global, per-domain, per-recipient).
    pub hits: [AtomicU64; 3],
    pub misses: [AtomicU64; 3],
    pub excepted: AtomicU64,
    pub added: AtomicU64,
    pub refreshed: AtomicU64,
    /// Skipped collections: ip, subject/headers, auto-response window, null sender.
    pub skipped_ip: AtomicU64,
    pub skipped_auto: AtomicU64,
    pub skipped_window: AtomicU64,
    pub swept: AtomicU64,
}

fn mode_index(m: Mode) -> usize {
    match m {
        Mode::Global => 0,
        Mode::PerDomain => 1,
        Mode::PerRecipient => 2,
    }
}

/// One pair to record (keys and originals).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub local: String,
    pub local_original: String,
    pub external: String,
    pub external_original: String,
}

/// The whitelist: the store, the recent-inbound table for auto-response detection, the disk.
#[derive(Debug)]
pub struct Aswl {
    pub store: store::Store,
    /// fingerprint(external sender, local recipient) → time of the last inbound message.
    recent: table::Table,
    hasher: foldhash::fast::RandomState,
    pub counters: Counters,
    pub disk: persist::Disk,
    /// Replication's tap and counters (idle on a single host).
    pub replica: replica::Replica,
}

impl Aswl {
    /// Open the data directory, load the snapshot and replay the change logs.
    pub fn open(settings: &Settings, writers: usize) -> std::io::Result<Aswl> {
        let store = store::Store::new();
        let disk = persist::Disk::open(&settings.dir, writers, &store)?;
        let a = Aswl {
            store,
            recent: table::Table::new(4),
            hasher: foldhash::fast::RandomState::default(),
            counters: Counters::default(),
            disk,
            replica: replica::Replica::default(),
        };
        a.sweep(settings, unix_now());
        Ok(a)
    }

    fn pair_fp(&self, external: &str, local: &str) -> u64 {
        use std::hash::BuildHasher;
        table::key(self.hasher.hash_one((external, local)))
    }

    /// How a check came out, with what an explanation needs (no text is built on the hot path).
    /// The address keys are built in `keys` (reused buffers: no allocation per check).
    fn decide<'a>(
        &self,
        s: &'a Settings,
        sender: &'a str,
        rcpt: &'a str,
        keys: &'a mut (String, String),
    ) -> Decision<'a> {
        if sender.is_empty() {
            return Decision::NullSender;
        }
        let (ext, local) = keys;
        if !s.normalize.external_into(sender, ext) {
            return Decision::Unusable(sender);
        }
        if !s.normalize.local_into(rcpt, local) {
            return Decision::Unusable(rcpt);
        }
        if s.except_local_domains && s.is_local(addr::key_domain(ext)) {
            return Decision::LocalDomain(ext);
        }
        if let Some(m) = s.check_exceptions.as_ref().and_then(|m| m.matching(ext)) {
            return Decision::Exception(ext, m);
        }
        let t = self.store.last_sent(s.mode, local, ext);
        Decision::Looked { ext, local, t }
    }

    /// Check one recipient of inbound mail (`sender` and `rcpt` as received). Lock-free.
    pub fn check(&self, s: &Settings, sender: &str, rcpt: &str, now: u32) -> Verdict {
        thread_local! {
            static KEYS: std::cell::RefCell<(String, String)> =
                const { std::cell::RefCell::new((String::new(), String::new())) };
        }
        KEYS.with(|k| match k.try_borrow_mut() {
            Ok(mut keys) => self.check_with(s, sender, rcpt, now, &mut keys),
            Err(_) => self.check_with(s, sender, rcpt, now, &mut Default::default()),
        })
    }

    fn check_with(
        &self,
        s: &Settings,
        sender: &str,
        rcpt: &str,
        now: u32,
        keys: &mut (String, String),
    ) -> Verdict {
        let v = match self.decide(s, sender, rcpt, keys) {
            Decision::Looked { t: Some(t), .. } if t >= s.cutoff(now) => {
                Verdict::Pass { last_sent: t }
            }
            Decision::Looked { .. } | Decision::Unusable(_) => Verdict::None,
            Decision::NullSender => Verdict::Excepted("null sender".into()),
            Decision::LocalDomain(_) => Verdict::Excepted("local domain".into()),
            Decision::Exception(_, m) => Verdict::Excepted(format!("check exception {m}")),
        };
        let i = mode_index(s.mode);
        let counter = match &v {
            Verdict::Pass { .. } => self.counters.hits.get(i),
            Verdict::None => self.counters.misses.get(i),
            Verdict::Excepted(_) => Some(&self.counters.excepted),
        };
        if let Some(c) = counter {
            c.fetch_add(1, Ordering::Relaxed);
        }
        v
    }

    /// The verdict and how it was reached (for `ringmx aswl check`).
    pub fn explain(&self, s: &Settings, sender: &str, rcpt: &str, now: u32) -> (Verdict, String) {
        let mode = s.mode.as_str();
        let mut keys = Default::default();
        match self.decide(s, sender, rcpt, &mut keys) {
            Decision::NullSender => (
                Verdict::Excepted("null sender".into()),
                "the null sender is never whitelisted".into(),
            ),
            Decision::Unusable(a) => (Verdict::None, format!("{a:?} has no usable address key")),
            Decision::LocalDomain(ext) => (
                Verdict::Excepted("local domain".into()),
                format!("sender {ext} is in a local domain (except_local_domains)"),
            ),
            Decision::Exception(ext, m) => (
                Verdict::Excepted(format!("check exception {m}")),
                format!("sender {ext} matches check exception \"{m}\""),
            ),
            Decision::Looked {
                ext,
                local,
                t: Some(t),
            } if t >= s.cutoff(now) => (
                Verdict::Pass { last_sent: t },
                format!(
                    "mode {mode}: {ext} was last mailed {} s ago (record for {}); lifetime {}",
                    now.saturating_sub(t),
                    scope(s.mode, local),
                    s.lifetime
                        .map_or("off".to_string(), |l| format!("{} s", l.as_secs())),
                ),
            ),
            Decision::Looked {
                ext,
                local,
                t: Some(t),
            } => (
                Verdict::None,
                format!(
                    "mode {mode}: the record for {} and {ext} expired (last mailed {} s ago)",
                    scope(s.mode, local),
                    now.saturating_sub(t)
                ),
            ),
            Decision::Looked {
                ext,
                local,
                t: None,
            } => (
                Verdict::None,
                format!(
                    "mode {mode}: no record of {} mailing {ext}",
                    scope(s.mode, local)
                ),
            ),
        }
    }

    /// Outbound mail: learn what the message teaches. The pairs are applied to the store at
    /// once, handed to replication, and returned as the change-log record to commit with the
    /// message on `core`'s log (the caller makes it durable before its 250). `Ok(None)` when
    /// nothing is learnt (the reason is logged); `Err` when the log cannot be opened.
    pub fn collect(
        &self,
        s: &Settings,
        core: usize,
        m: &Outbound<'_>,
        now: u32,
    ) -> std::io::Result<Option<(std::sync::Arc<crate::journal::Segment>, Vec<u8>)>> {
        match self.plan(s, m.client, m.sender, m.rcpts, m.content, now) {
            Ok(pairs) if !pairs.is_empty() => {
                self.apply(s, &pairs, now);
                let seg = self.disk.core_log(core)?;
                let record = persist::encode_log(false, now, &pairs);
                // To Redis from the replication thread; the 250 never waits for it.
                self.replica.publish(&record);
                Ok(Some((seg, record)))
            }
            Ok(_) => Ok(None),
            Err(why) => {
                tracing::info!(queue_id = %m.queue_id, from = ?m.sender, reason = ?why.to_string(), "aswl: not collected");
                Ok(None)
            }
        }
    }

    /// Note inbound mail from `sender` to `rcpts` (for auto-response detection).
    pub fn saw_inbound(&self, s: &Settings, sender: &str, rcpts: &[String], now: u32) {
        if s.auto_response_window.is_zero() || sender.is_empty() {
            return;
        }
        let Some(ext) = s.normalize.external(sender) else {
            return;
        };
        for r in rcpts {
            if let Some(local) = s.normalize.local(r) {
                self.recent
                    .upsert(self.pair_fp(&ext, &local), |_| u64::from(now));
            }
        }
    }

    /// The pairs an outbound message teaches, or why it teaches none. Called before the
    /// message is spooled; `client` is the submitting client.
    pub fn plan(
        &self,
        s: &Settings,
        client: IpAddr,
        sender: &str,
        rcpts: &[String],
        content: &[u8],
        now: u32,
    ) -> Result<Vec<Pair>, NotCollected> {
        if sender.is_empty() {
            return Err(NotCollected::NullSender);
        }
        let Some(local) = s.normalize.local(sender) else {
            return Err(NotCollected::NoAddressKey(sender.to_string()));
        };
        // Only our own senders teach the whitelist (a relay client sending as someone else's
        // address must not make that address's correspondents trusted).
        if !s.is_local(addr::key_domain(&local)) {
            return Err(NotCollected::NotLocal(local));
        }
        if crate::units::any_contains(&s.ip_exceptions, client) {
            self.counters.skipped_ip.fetch_add(1, Ordering::Relaxed);
            return Err(NotCollected::IpException(client));
        }
        if let Some(skip) = detect::classify(content, s.signals, s.subjects.as_ref()) {
            self.counters.skipped_auto.fetch_add(1, Ordering::Relaxed);
            return Err(NotCollected::Automatic(skip));
        }
        let window = s.auto_response_window.as_secs() as u32;
        let mut pairs = Vec::new();
        for r in rcpts {
            let Some(ext) = s.normalize.external(r) else {
                continue;
            };
            if s.is_local(addr::key_domain(&ext)) {
                continue;
            }
            if window > 0
                && let Some(t) = self.recent.get(self.pair_fp(&ext, &local))
                && now.saturating_sub(t as u32) < window
            {
                self.counters.skipped_window.fetch_add(1, Ordering::Relaxed);
                tracing::info!(local = ?local, external = ?ext, "aswl: not collected: auto-response (within auto_response_window of mail from the recipient)");
                continue;
            }
            pairs.push(Pair {
                local: local.clone(),
                local_original: sender.to_string(),
                external: ext,
                external_original: r.clone(),
            });
        }
        Ok(pairs)
    }

    /// Apply collected pairs to memory (before their log record is written: see [`persist`]).
    pub fn apply(&self, s: &Settings, pairs: &[Pair], now: u32) {
        for p in pairs {
            let w = self.store.record(
                (&p.local, &p.local_original),
                (&p.external, &p.external_original),
                now,
            );
            match w {
                store::Write::Added => {
                    self.counters.added.fetch_add(1, Ordering::Relaxed);
                    if s.log_additions {
                        tracing::info!(local = ?p.local, external = ?p.external, "aswl: added");
                    }
                }
                store::Write::Refreshed | store::Write::Unchanged => {
                    self.counters.refreshed.fetch_add(1, Ordering::Relaxed);
                    if s.log_additions {
                        tracing::info!(local = ?p.local, external = ?p.external, "aswl: refreshed");
                    }
                }
            }
        }
        persist::publish_fence();
    }

    /// An operator's change (add, import, remove): logged with its own fdatasync, then handed
    /// to replication.
    pub fn log_admin(&self, record: &[u8]) -> std::io::Result<()> {
        self.disk.write_admin(record)?;
        self.replica.publish(record);
        Ok(())
    }

    /// Apply records from another node (replication): adds merged by newest `last_sent`
    /// (expired ones skipped), removals remove what was last sent at or before their time.
    /// Nothing here is handed back to replication. Returns the records applied.
    pub fn apply_remote(&self, s: &Settings, recs: &[persist::LogRecord], now: u32) -> usize {
        let cutoff = s.cutoff(now);
        let mut n = 0;
        for r in recs {
            for p in &r.pairs {
                if r.remove {
                    let local = (!p.local.is_empty()).then_some(p.local.as_str());
                    self.store.remove(local, &p.external, r.t);
                    n += 1;
                } else if r.t >= cutoff {
                    self.store.record(
                        (&p.local, &p.local_original),
                        (&p.external, &p.external_original),
                        r.t,
                    );
                    n += 1;
                }
            }
        }
        // The records are in memory before the change log is written (see `persist`).
        persist::publish_fence();
        n
    }

    /// Forget inbound messages older than the auto-response window.
    pub fn prune_recent(&self, s: &Settings, now: u32) {
        let window = s.auto_response_window.as_secs();
        self.recent
            .retain(|_, t| u64::from(now).saturating_sub(t) <= window);
    }

    /// Remove expired records (and stale auto-response entries).
    pub fn sweep(&self, s: &Settings, now: u32) -> usize {
        self.prune_recent(s, now);
        let n = match s.lifetime {
            Some(_) => self.store.sweep(s.cutoff(now)),
            None => 0,
        };
        self.counters.swept.fetch_add(n as u64, Ordering::Relaxed);
        if n > 0 {
            tracing::info!(
                removed = n,
                left = self.store.len(),
                "aswl: sweep removed expired records"
            );
        }
        n
    }
}

fn scope(mode: Mode, local: &str) -> String {
    match mode {
        Mode::Global => "anyone local".into(),
        Mode::PerDomain => format!("domain {}", addr::key_domain(local)),
        Mode::PerRecipient => local.to_string(),
    }
}

/// Why an outbound message teaches the whitelist nothing (logged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotCollected {
    NullSender,
    /// The sender address gives no key (after normalization).
    NoAddressKey(String),
    /// The sender (its key) is not in a local domain: only our own senders teach.
    NotLocal(String),
    /// The client is in `ip_exceptions`.
    IpException(IpAddr),
    /// Automatic or bulk mail (auto-reply, list, report, an excepted subject).
    Automatic(Skip),
}

impl std::fmt::Display for NotCollected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotCollected::NullSender => f.write_str("null sender"),
            NotCollected::NoAddressKey(s) => write!(f, "sender {s:?} has no usable address key"),
            NotCollected::NotLocal(k) => write!(f, "sender {k} is not in a local domain"),
            NotCollected::IpException(ip) => write!(f, "client {ip} is in ip_exceptions"),
            NotCollected::Automatic(s) => write!(f, "automatic or bulk mail: {s}"),
        }
    }
}

#[cfg(test)]
mod tests;
