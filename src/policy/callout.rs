//! Recipient verification by callout (`[[recipients]] callout = true`, `[callout]`): for a
//! local domain without a list of its users, ask the route's next hop whether a recipient
//! exists (`relay::probe`: EHLO, `MAIL FROM:<>`, RCPT, QUIT) before answering RCPT, like
//! Postfix's `reject_unverified_recipient`.
//!
//! Answers are cached per address: a 2xx for `positive_ttl`, a 5xx (`550 5.1.1`, counted as
//! an unknown recipient, harvest limit included) for `negative_ttl`. A hop that is down, slow
//! or answers 4xx is never cached and never a 5xx: `450 4.1.1` (or, with `unavailable =
//! "accept"`, the recipient is taken). The cache is bounded (`cache_size`; when full, expired
//! entries go, then an eighth of the rest) and survives restarts: each answer is appended to
//! a file in the data directory, read back (and compacted) at startup. Probes run on the
//! policy workers, at most [`MAX_PROBES`] at once; beyond that, or with a full worker queue,
//! the answer is "unavailable".

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::pipeline::{Check, Decision, Job, Refusal, Request, Stage};
use super::recipients::{Lookup, RecipientMaps, UnknownRecipient};
use crate::config::{CalloutSection, CalloutUnavailable, Config, RouteFacts};
use crate::metrics::Reason;
use crate::proto::reply;
use crate::relay::RelayTls;
use crate::relay::probe::{Verdict, probe};

/// The cache file in the data directory.
pub const CACHE_FILE: &str = "callout-cache.tsv";

/// Cached answers and the file they are appended to.
#[derive(Debug)]
pub struct Callouts {
    settings: CalloutSection,
    /// address (lower case) → (exists, expires at, Unix seconds)
    cache: Mutex<HashMap<String, (bool, u64)>>,
    file: Option<PathBuf>,
    /// Lines in the file (compacted when it holds twice `cache_size`); held while the file
    /// is written.
    lines: Mutex<usize>,
    /// Probes running now (at most [`MAX_PROBES`]).
    probing: Arc<AtomicUsize>,
}

/// Probes at once, so callouts never take every policy worker (signature checks need them too).
pub const MAX_PROBES: usize = 2;

/// One running probe; gives its slot back when dropped (also when its job never ran).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Callouts {
    /// The cache as of `dir/callout-cache.tsv` (expired lines dropped and the file rewritten);
    /// `dir` `None` keeps it in memory only.
    pub fn open(settings: &CalloutSection, dir: Option<&Path>, now: u64) -> Callouts {
        let file = dir.map(|d| d.join(CACHE_FILE));
        let mut cache = HashMap::new();
        let existing = file.as_ref().and_then(|f| std::fs::read_to_string(f).ok());
        let had_file = existing.is_some();
        if let Some(text) = existing {
            for line in text.lines() {
                let mut it = line.split('\t');
                let (Some(a), Some(kind), Some(exp)) = (it.next(), it.next(), it.next()) else {
                    continue;
                };
                let Ok(exp) = exp.parse::<u64>() else {
                    continue;
                };
                if exp > now && (kind == "+" || kind == "-") && !a.is_empty() {
                    cache.insert(a.to_string(), (kind == "+", exp));
                }
            }
        }
        let c = Callouts {
            settings: settings.clone(),
            cache: Mutex::new(cache),
            file,
            lines: Mutex::new(0),
            probing: Arc::new(AtomicUsize::new(0)),
        };
        c.evict_if_full(now);
        if had_file {
            c.rewrite();
        }
        c
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (bool, u64)>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the cache says of `address` at `now`: `Some(exists)`, or `None` (ask the hop).
    pub fn cached(&self, address: &str, now: u64) -> Option<bool> {
        let key = address.to_ascii_lowercase();
        self.lock()
            .get(&key)
            .filter(|(_, exp)| *exp > now)
            .map(|(known, _)| *known)
    }

    /// Addresses cached (expired ones included until evicted).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Remember the hop's answer on `address` and append it to the file.
    pub fn remember(&self, address: &str, exists: bool, now: u64) {
        let ttl = if exists {
            self.settings.positive_ttl.0
        } else {
            self.settings.negative_ttl.0
        };
        let expires = now + ttl.as_secs();
        let key = address.to_ascii_lowercase();
        self.evict_if_full(now);
        self.lock().insert(key.clone(), (exists, expires));
        let Some(file) = &self.file else {
            return;
        };
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        if *lines >= self.settings.cache_size.saturating_mul(2) {
            *lines = self.rewrite_locked();
            return;
        }
        let line = format!("{key}\t{}\t{expires}\n", if exists { '+' } else { '-' });
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(file)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        match appended {
            Ok(()) => *lines += 1,
            Err(e) => tracing::warn!(file = %file.display(), error = %e, "callout cache not saved"),
        }
    }

    /// Make room when the cache is full: expired entries first, then an eighth of the rest.
    fn evict_if_full(&self, now: u64) {
        let mut m = self.lock();
        if m.len() < self.settings.cache_size {
            return;
        }
        m.retain(|_, (_, exp)| *exp > now);
        if m.len() >= self.settings.cache_size {
            let victims: Vec<String> = m
                .keys()
                .take((self.settings.cache_size / 8).max(1))
                .cloned()
                .collect();
            for k in victims {
                m.remove(&k);
            }
        }
    }

    /// Write the whole cache to the file (a temporary file renamed over it).
    fn rewrite(&self) {
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        *lines = self.rewrite_locked();
    }

    /// [`Callouts::rewrite`] with the `lines` lock held (one writer at a time); the lines now
    /// in the file.
    fn rewrite_locked(&self) -> usize {
        let Some(file) = &self.file else {
            return 0;
        };
        let snapshot: Vec<(String, bool, u64)> = self
            .lock()
            .iter()
            .map(|(a, (known, exp))| (a.clone(), *known, *exp))
            .collect();
        let mut text = String::with_capacity(snapshot.len() * 40);
        for (a, known, exp) in &snapshot {
            text.push_str(&format!("{a}\t{}\t{exp}\n", if *known { '+' } else { '-' }));
        }
        let tmp = file.with_extension("tmp");
        match std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, file)) {
            Ok(()) => snapshot.len(),
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "callout cache not saved");
                0
            }
        }
    }

    /// A probe slot, or `None` when [`MAX_PROBES`] are running.
    fn slot(&self) -> Option<Slot> {
        let n = self.probing.fetch_add(1, Ordering::Relaxed);
        let slot = Slot(self.probing.clone());
        (n < MAX_PROBES).then_some(slot)
    }

    /// The answer when the hop cannot give one.
    fn unavailable(&self) -> Decision {
        match self.settings.unavailable {
            CalloutUnavailable::Accept => Decision::Continue,
            CalloutUnavailable::Defer => Decision::Reject(Refusal::new(
                &reply::RECIPIENT_UNVERIFIED,
                Reason::CalloutUnavailable,
                "deferred: recipient not verified (next hop unavailable)",
            )),
        }
    }
}

/// The `callout` check (RCPT, inbound bindings, domains of `[[recipients]] callout = true`).
pub struct Callout {
    pub callouts: Arc<Callouts>,
    pub maps: Arc<RecipientMaps>,
    pub config: Arc<Config>,
    /// The refusal of an unknown recipient (harvest limit and unknown-recipient rate included).
    pub unknown: UnknownRecipient,
}

impl std::fmt::Debug for Callout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Callout").finish_non_exhaustive()
    }
}

impl Check for Callout {
    fn name(&self) -> &'static str {
        "callout"
    }
    fn stage(&self) -> Stage {
        Stage::Rcpt
    }
    /// Connecting to each address of each hop, then four replies, each within `timeout`.
    fn time_limit(&self) -> Option<Duration> {
        Some(self.callouts.settings.timeout.0 * 6)
    }
    fn unavailable(&self) -> Decision {
        self.callouts.unavailable()
    }
    fn check(&self, r: &Request<'_>) -> Decision {
        if self.maps.lookup(r.rcpt) != Lookup::Callout {
            return Decision::Continue;
        }
        let now = u64::from(r.now);
        match self.callouts.cached(r.rcpt, now) {
            Some(true) => return Decision::Continue,
            Some(false) => return self.unknown.refuse(r.ip, r.clock_ms, r.unknown_rcpts),
            None => {}
        }
        let sender_domain = r.mail_from.rsplit_once('@').map_or("", |(_, d)| d);
        let route = self
            .config
            .route_for(r.rcpt_domain, sender_domain, RouteFacts::inbound(None));
        // The probe speaks plain SMTP: a route that requires TLS is not probed.
        let hops: Vec<String> = match route {
            Some((_, route))
                if !route.next_hops.iter().any(|h| h.get_ref() == "mx")
                    && matches!(route.tls, RelayTls::None | RelayTls::Opportunistic) =>
            {
                route
                    .next_hops
                    .iter()
                    .map(|h| h.get_ref().clone())
                    .collect()
            }
            _ => Vec::new(),
        };
        if hops.is_empty() {
            tracing::warn!(
                rcpt = r.rcpt,
                "callout: the recipient's route has no host:port next hop without required TLS"
            );
            return self.callouts.unavailable();
        }
        let Some(slot) = self.callouts.slot() else {
            tracing::warn!(
                rcpt = r.rcpt,
                "callout: {MAX_PROBES} probes running already"
            );
            return self.callouts.unavailable();
        };
        let unknown = self.unknown.clone();
        let (ip, clock_ms, so_far) = (r.ip, r.clock_ms, r.unknown_rcpts);
        let callouts = self.callouts.clone();
        let address = r.rcpt.to_string();
        let ehlo = self.config.server.hostname.clone();
        // A job that starts after its session stopped waiting does no work (and gives its
        // probe slot back at once).
        let deadline = std::time::Instant::now() + self.callouts.settings.timeout.0 * 6;
        Decision::Defer(Job::blocking(move || {
            let _slot = slot;
            if std::time::Instant::now() >= deadline {
                return callouts.unavailable();
            }
            let step = callouts.settings.timeout.0;
            match probe(&hops, &ehlo, &address, step) {
                Verdict::Exists => {
                    callouts.remember(&address, true, now);
                    Decision::Continue
                }
                Verdict::Unknown(said) => {
                    tracing::info!(rcpt = ?address, hop = ?said, "callout: unknown recipient");
                    callouts.remember(&address, false, now);
                    unknown.refuse(ip, clock_ms, so_far)
                }
                Verdict::Unavailable(why) => {
                    tracing::warn!(rcpt = ?address, why = ?why, "callout: next hop unavailable");
                    callouts.unavailable()
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::Secs;

    fn settings(cache_size: usize) -> CalloutSection {
        CalloutSection {
            positive_ttl: Secs(Duration::from_secs(100)),
            negative_ttl: Secs(Duration::from_secs(10)),
            cache_size,
            ..CalloutSection::default()
        }
    }

    #[test]
    fn answers_expire_and_survive_a_restart() {
        let dir = std::env::temp_dir().join(format!("ringmx-callout-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let c = Callouts::open(&settings(100), Some(&dir), 1000);
        c.remember("Alice@Example.test", true, 1000);
        c.remember("nobody@example.test", false, 1000);
        // (address, now, expected)
        let table = [
            ("alice@example.test", 1050, Some(true)),
            ("ALICE@example.TEST", 1099, Some(true)),
            ("alice@example.test", 1100, None),
            ("nobody@example.test", 1009, Some(false)),
            ("nobody@example.test", 1010, None),
            ("carol@example.test", 1000, None),
        ];
        for (a, now, want) in table {
            assert_eq!(c.cached(a, now), want, "{a} at {now}");
        }
        // A restart reads the file back; what expired meanwhile is dropped.
        let again = Callouts::open(&settings(100), Some(&dir), 1005);
        assert_eq!(again.cached("alice@example.test", 1005), Some(true));
        assert_eq!(again.cached("nobody@example.test", 1005), Some(false));
        let later = Callouts::open(&settings(100), Some(&dir), 1050);
        assert_eq!(later.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_cache_is_bounded() {
        let c = Callouts::open(&settings(64), None, 0);
        for i in 0..10_000 {
            c.remember(&format!("u{i}@example.test"), i % 2 == 0, 0);
        }
        assert!(c.len() <= 64, "{}", c.len());
        assert_eq!(c.cached("u9999@example.test", 1), Some(false));
    }
}
