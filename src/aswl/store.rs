//! The whitelist in memory: interned addresses and three views kept together.
//!
//! - `ext`: fingerprint of an external address key → (external id, newest `last_sent` from any
//!   local sender) — the **global** view;
//! - `by_domain`: (local domain id, external id) → newest `last_sent` from that domain — the
//!   **per-domain** view;
//! - `pairs`: (local address id, external id) → `last_sent` — the record itself, the
//!   **per-recipient** view.
//!
//! A newer `last_sent` only ever raises the aggregates, and a record expires exactly when its
//! `last_sent` is older than the lifetime, so the aggregates expire with the newest record under
//! them and the sweep needs no recomputation; only an operator's removal recomputes them.
//! Lookups are lock-free ([`super::table`]); every write takes one mutex (the names), which the
//! sweep and the snapshot take per shard only.
//!
//! Fingerprints are 64-bit keyed hashes of the address keys (random key per process; the
//! snapshot stores the addresses, not the fingerprints). Ids are dense `u32`s; an external id
//! freed by the sweep is reused only after the next sweep, long after any lookup that read it.

use std::hash::BuildHasher;
use std::sync::Mutex;

use super::table::{Table, key};

/// Which view a check uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Global,
    PerDomain,
    PerRecipient,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Global => "global",
            Mode::PerDomain => "per-domain",
            Mode::PerRecipient => "per-recipient",
        }
    }
}

/// An address as stored: the key, and the original when it differs.
fn pack_name(key: &str, original: &str) -> Box<str> {
    if key == original || original.is_empty() {
        key.into()
    } else {
        format!("{key}\n{original}").into()
    }
}

/// `(key, original)` of a stored name.
pub fn unpack_name(n: &str) -> (&str, &str) {
    n.split_once('\n').unwrap_or((n, n))
}

#[derive(Default)]
struct Names {
    ext: Vec<Option<Box<str>>>,
    ext_free: Vec<u32>,
    ext_freed: Vec<u32>,
    local: Vec<Box<str>>,
    local_domain: Vec<u32>,
    domains: Vec<Box<str>>,
}

/// One record as listed or exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub local: String,
    pub local_original: String,
    pub external: String,
    pub external_original: String,
    pub last_sent: u32,
}

/// What [`Store::walk`] visits.
#[derive(Debug, Clone, Copy)]
pub enum Item<'a> {
    /// A local address: id, stored name.
    Local(u32, &'a str),
    /// An external address: id, stored name.
    External(u32, &'a str),
    /// A record: local id, external id, `last_sent`.
    Pair(u32, u32, u32),
}

/// Whether a write added a record or refreshed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    Added,
    Refreshed,
    /// An older `last_sent` than the one stored (a replay): nothing changed.
    Unchanged,
}

/// The store. See the module documentation.
pub struct Store {
    hasher: foldhash::fast::RandomState,
    ext: Table,
    locals: Table,
    domains: Table,
    pairs: Table,
    by_domain: Table,
    names: Mutex<Names>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("records", &self.pairs.len())
            .finish()
    }
}

impl Default for Store {
    fn default() -> Self {
        Store::new()
    }
}

/// Local addresses and local domains are numbered below this (24 bits in a view key).
const MAX_OWNERS: usize = (1 << 24) - 2;
const TIME: u64 = 0xffff_ffff;

/// A view key: the owner (local address id or local domain id) and the top 40 bits of the
/// external address's fingerprint, so a lookup needs no external id first — its probe and the
/// probe of `ext` (which confirms the external id stored in the value) go out together.
fn view_key(owner: u32, efp: u64) -> u64 {
    key(((u64::from(owner) + 1) << 40) | (efp >> 24))
}

fn view_owner(k: u64) -> u32 {
    ((k >> 40) as u32).wrapping_sub(1)
}

/// A view value: the external id and a `last_sent`.
fn view_value(ext_id: u32, t: u64) -> u64 {
    (u64::from(ext_id) << 32) | (t & TIME)
}

fn value_ext(v: u64) -> u32 {
    (v >> 32) as u32
}

impl Store {
    pub fn new() -> Store {
        Store {
            hasher: foldhash::fast::RandomState::default(),
            ext: Table::new(6),
            locals: Table::new(4),
            domains: Table::new(0),
            pairs: Table::new(6),
            by_domain: Table::new(6),
            names: Mutex::new(Names::default()),
        }
    }

    fn fp(&self, s: &str) -> u64 {
        key(self.hasher.hash_one(s))
    }

    fn names(&self) -> std::sync::MutexGuard<'_, Names> {
        self.names.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The newest `last_sent` that whitelists `external` for `local` in `mode`. Lock-free.
    pub fn last_sent(&self, mode: Mode, local: &str, external: &str) -> Option<u32> {
        let efp = self.fp(external);
        // The external address's probe goes out first, so its memory latency overlaps the
        // owner lookup's; the view's probe then overlaps it too.
        let e = self.ext.pin(efp);
        let owner = match mode {
            Mode::Global => return e.get().map(|e| e as u32),
            Mode::PerDomain => {
                let d = self.domains.get(self.fp(super::addr::key_domain(local)))?;
                self.by_domain.pin(view_key(d as u32, efp))
            }
            Mode::PerRecipient => {
                let l = self.locals.get(self.fp(local))?;
                self.pairs.pin(view_key(l as u32, efp))
            }
        };
        // A view entry counts only if the external address it names is the one asked for.
        let v = owner.get()?;
        let e = e.get()?;
        (value_ext(v) == (e >> 32) as u32).then_some(v as u32)
    }

    /// The id of a local address, interned if new (with its domain).
    pub fn intern_local(&self, key: &str, original: &str) -> Option<u32> {
        let fp = self.fp(key);
        match self.locals.get(fp) {
            Some(id) => Some(id as u32),
            None => self.intern_local_locked(&mut self.names(), key, original),
        }
    }

    fn intern_local_locked(&self, n: &mut Names, key: &str, original: &str) -> Option<u32> {
        let fp = self.fp(key);
        if let Some(id) = self.locals.get(fp) {
            return Some(id as u32);
        }
        if n.local.len() >= MAX_OWNERS || n.domains.len() >= MAX_OWNERS {
            tracing::error!("aswl: too many local addresses; {key} is not recorded");
            return None;
        }
        let domain = super::addr::key_domain(key);
        let dfp = self.fp(domain);
        let d = match self.domains.get(dfp) {
            Some(d) => d as u32,
            None => {
                let d = n.domains.len() as u32;
                n.domains.push(domain.into());
                self.domains.upsert(dfp, |_| u64::from(d));
                d
            }
        };
        let id = n.local.len() as u32;
        n.local.push(pack_name(key, original));
        n.local_domain.push(d);
        self.locals.upsert(fp, |_| u64::from(id));
        Some(id)
    }

    fn intern_external_locked(&self, n: &mut Names, key: &str, original: &str) -> (u32, u64) {
        let fp = self.fp(key);
        // The id a new address gets; one probe finds or inserts.
        let id = n.ext_free.last().copied().unwrap_or(n.ext.len() as u32);
        let mut existing = None;
        self.ext.upsert(fp, |old| match old {
            Some(o) => {
                existing = Some((o >> 32) as u32);
                o
            }
            None => u64::from(id) << 32,
        });
        if let Some(e) = existing {
            return (e, fp);
        }
        let name = pack_name(key, original);
        if n.ext_free.pop().is_some() {
            if let Some(slot) = n.ext.get_mut(id as usize) {
                *slot = Some(name);
            }
        } else {
            n.ext.push(Some(name));
        }
        (id, fp)
    }

    /// Intern many external addresses (stored names, `key\noriginal`) under one lock: for each
    /// `(tag, name)`, `(tag, (id, fingerprint))`.
    pub fn intern_externals(&self, names: &[(u32, &str)]) -> Vec<(u32, (u32, u64))> {
        let mut n = self.names();
        n.ext.reserve(names.len());
        names
            .iter()
            .map(|&(tag, name)| {
                let (k, o) = unpack_name(name);
                (tag, self.intern_external_locked(&mut n, k, o))
            })
            .collect()
    }

    /// Size the tables for this many local and external addresses and records (a bulk load).
    pub fn reserve(&self, locals: usize, externals: usize, records: usize) {
        self.locals.reserve(locals);
        self.ext.reserve(externals);
        self.pairs.reserve(records);
        self.by_domain.reserve(records);
    }

    /// The local domain id of a local address id (for bulk loads).
    pub fn domain_of(&self, local: u32) -> Option<u32> {
        self.names().local_domain.get(local as usize).copied()
    }

    /// Raise the record of interned ids to at least `t` in all three views (only the tables'
    /// shard locks).
    fn put_ids(&self, local: u32, domain: u32, external: u32, efp: u64, t: u32) -> Write {
        self.raise_global(external, efp, t);
        self.put_views(local, domain, external, efp, t)
    }

    /// Raise the global view of an external address to `t`.
    pub fn raise_global(&self, external: u32, efp: u64, t: u32) {
        let t64 = u64::from(t);
        self.ext.upsert(efp, |old| {
            let old = old.unwrap_or(u64::from(external) << 32);
            (old & !TIME) | (old & TIME).max(t64)
        });
    }

    /// Start loading what [`Store::put_views`] of these ids will touch.
    pub fn prefetch_views(&self, local: u32, domain: u32, efp: u64) {
        self.pairs.prefetch(view_key(local, efp));
        self.by_domain.prefetch(view_key(domain, efp));
    }

    /// The per-domain and per-recipient views of one record (a bulk load raises the global
    /// view once per external address instead, with [`Store::raise_global`]).
    pub fn put_views(&self, local: u32, domain: u32, external: u32, efp: u64, t: u32) -> Write {
        let t64 = u64::from(t);
        let merge = |old: Option<u64>| match old {
            Some(o) if value_ext(o) == external => view_value(external, (o & TIME).max(t64)),
            // New, or (40-bit fingerprint collision for one owner) another address's: the
            // newer record takes the slot.
            _ => view_value(external, t64),
        };
        self.by_domain.upsert(view_key(domain, efp), merge);
        match self.pairs.upsert(view_key(local, efp), merge) {
            None => Write::Added,
            Some(old) if value_ext(old) != external => {
                tracing::warn!(
                    "aswl: fingerprint collision between two records of one local address; the older is replaced"
                );
                Write::Added
            }
            Some(old) if (old & TIME) < t64 => Write::Refreshed,
            Some(_) => Write::Unchanged,
        }
    }

    /// Record that `local` mailed `external` at `t` (keys, then originals for display).
    /// Interning and the write happen under one lock, so the sweep cannot forget the external
    /// address in between.
    pub fn record(&self, local: (&str, &str), external: (&str, &str), t: u32) -> Write {
        let mut names = self.names();
        let Some(l) = self.intern_local_locked(&mut names, local.0, local.1) else {
            return Write::Unchanged;
        };
        let (x, efp) = self.intern_external_locked(&mut names, external.0, external.1);
        let d = names.local_domain.get(l as usize).copied().unwrap_or(0);
        self.put_ids(l, d, x, efp, t)
    }

    /// Remove records of `external` (every local sender's, or only `local`'s) whose
    /// `last_sent` is at most `before`; returns how many. Recomputes that external address's
    /// aggregates from what is left (a full scan: an operator's action, not a hot path).
    pub fn remove(&self, local: Option<&str>, external: &str, before: u32) -> usize {
        let mut names = self.names();
        let efp = self.fp(external);
        let Some(e) = self.ext.get(efp) else {
            return 0;
        };
        let ext_id = (e >> 32) as u32;
        let only = local.map(|l| self.locals.get(self.fp(l)).map(|v| v as u32));
        if only == Some(None) {
            return 0;
        }
        let mut removed = 0;
        let mut left: Vec<(u32, u64)> = Vec::new();
        let mut doomed = Vec::new();
        let before = u64::from(before);
        self.pairs.for_each(|k, v| {
            if value_ext(v) != ext_id {
                return;
            }
            let l = view_owner(k);
            if (v & TIME) <= before && only.is_none_or(|o| o == Some(l)) {
                doomed.push(k);
            } else {
                left.push((l, v & TIME));
            }
        });
        for k in doomed {
            if self
                .pairs
                .remove_if(k, |v| value_ext(v) == ext_id && (v & TIME) <= before)
                .is_some()
            {
                removed += 1;
            }
        }
        if left.is_empty() {
            self.ext.remove_if(efp, |_| true);
            if let Some(slot) = names.ext.get_mut(ext_id as usize) {
                *slot = None;
            }
            names.ext_freed.push(ext_id);
        } else {
            let newest = left.iter().map(|&(_, v)| v).max().unwrap_or(0);
            self.ext.upsert(efp, |_| (u64::from(ext_id) << 32) | newest);
        }
        let mut per_domain: std::collections::HashMap<u32, u64> = Default::default();
        for (l, v) in &left {
            let d = names.local_domain.get(*l as usize).copied().unwrap_or(0);
            let e = per_domain.entry(d).or_default();
            *e = (*e).max(*v);
        }
        for d in 0..names.domains.len() as u32 {
            match per_domain.get(&d) {
                Some(&v) => {
                    self.by_domain
                        .upsert(view_key(d, efp), |_| view_value(ext_id, v));
                }
                None => {
                    self.by_domain
                        .remove_if(view_key(d, efp), |v| value_ext(v) == ext_id);
                }
            }
        }
        removed
    }

    /// Remove every record whose `last_sent` is before `cutoff`; returns how many records.
    pub fn sweep(&self, cutoff: u32) -> usize {
        let c = u64::from(cutoff);
        let removed = self.pairs.retain(|_, v| (v & TIME) >= c);
        self.by_domain.retain(|_, v| (v & TIME) >= c);
        // External addresses whose newest record expired: forget the address. Under the names
        // lock so a collection of the same address either comes before (and keeps it) or after
        // (and interns it again).
        let mut names = self.names();
        let n = &mut *names;
        let freed = std::mem::take(&mut n.ext_freed);
        n.ext_free.extend(freed);
        let mut freed = Vec::new();
        self.ext.retain(|_, v| {
            if (v & TIME) >= c {
                return true;
            }
            freed.push((v >> 32) as u32);
            false
        });
        for id in &freed {
            if let Some(slot) = n.ext.get_mut(*id as usize) {
                *slot = None;
            }
        }
        n.ext_freed = freed;
        removed
    }

    /// Every record, with its addresses (names resolved in chunks under the lock).
    pub fn records(&self) -> Vec<Record> {
        let mut raw = Vec::with_capacity(self.pairs.len());
        self.pairs
            .for_each(|k, v| raw.push(((view_owner(k), value_ext(v)), v as u32)));
        let names = self.names();
        raw.into_iter()
            .filter_map(|((l, x), t)| {
                let ln = names.local.get(l as usize)?;
                let xn = names.ext.get(x as usize)?.as_deref()?;
                let (lk, lo) = unpack_name(ln);
                let (xk, xo) = unpack_name(xn);
                Some(Record {
                    local: lk.into(),
                    local_original: lo.into(),
                    external: xk.into(),
                    external_original: xo.into(),
                    last_sent: t,
                })
            })
            .collect()
    }

    /// Visit the raw contents for a snapshot: local names by id, external names by id, then
    /// every `(local id, external id, last_sent)`. Pairs whose ids were not yet visited (added
    /// during the walk) are left out: they are in the change log.
    pub fn walk(&self, mut f: impl FnMut(Item<'_>)) {
        let (n_local, n_ext) = {
            let names = self.names();
            for (i, n) in names.local.iter().enumerate() {
                f(Item::Local(i as u32, n));
            }
            (names.local.len(), names.ext.len())
        };
        const CHUNK: usize = 1 << 16;
        let mut start = 0;
        while start < n_ext {
            let names = self.names();
            for (i, n) in names.ext.iter().enumerate().skip(start).take(CHUNK) {
                if let Some(n) = n {
                    f(Item::External(i as u32, n));
                }
            }
            start += CHUNK;
        }
        self.pairs.for_each(|k, v| {
            let (l, x) = (view_owner(k), value_ext(v));
            if (l as usize) < n_local && (x as usize) < n_ext {
                f(Item::Pair(l, x, v as u32));
            }
        });
    }

    /// Records (pairs) held.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// (local addresses, external addresses, per-domain entries).
    pub fn counts(&self) -> (usize, usize, usize) {
        (self.locals.len(), self.ext.len(), self.by_domain.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(s: &Store, l: &str, x: &str, t: u32) -> Write {
        s.record((l, l), (x, x), t)
    }

    #[test]
    fn three_views_from_one_record() {
        let s = Store::new();
        assert_eq!(rec(&s, "john@a.test", "jane@ext.test", 100), Write::Added);
        for (mode, local, want) in [
            (Mode::Global, "mary@a.test", Some(100)),
            (Mode::Global, "x@b.test", Some(100)),
            (Mode::PerDomain, "mary@a.test", Some(100)),
            (Mode::PerDomain, "x@b.test", None),
            (Mode::PerRecipient, "john@a.test", Some(100)),
            (Mode::PerRecipient, "mary@a.test", None),
        ] {
            assert_eq!(
                s.last_sent(mode, local, "jane@ext.test"),
                want,
                "{mode:?} {local}"
            );
        }
        assert_eq!(
            s.last_sent(Mode::Global, "john@a.test", "bob@ext.test"),
            None
        );
        assert_eq!(
            rec(&s, "john@a.test", "jane@ext.test", 200),
            Write::Refreshed
        );
        assert_eq!(
            rec(&s, "john@a.test", "jane@ext.test", 150),
            Write::Unchanged
        );
        assert_eq!(
            s.last_sent(Mode::PerRecipient, "john@a.test", "jane@ext.test"),
            Some(200)
        );
    }

    #[test]
    fn sweep_and_remove_keep_the_views_true() {
        let s = Store::new();
        rec(&s, "john@a.test", "jane@ext.test", 100);
        rec(&s, "mary@a.test", "jane@ext.test", 300);
        rec(&s, "bob@b.test", "jane@ext.test", 50);
        rec(&s, "john@a.test", "old@ext.test", 10);
        assert_eq!(s.sweep(99), 2);
        assert_eq!(s.len(), 2);
        assert_eq!(s.last_sent(Mode::Global, "x@a.test", "old@ext.test"), None);
        assert_eq!(
            s.last_sent(Mode::PerDomain, "x@b.test", "jane@ext.test"),
            None
        );
        assert_eq!(
            s.last_sent(Mode::PerDomain, "x@a.test", "jane@ext.test"),
            Some(300)
        );
        // Removing mary's record drops the aggregates to john's.
        assert_eq!(s.remove(Some("mary@a.test"), "jane@ext.test", u32::MAX), 1);
        assert_eq!(
            s.last_sent(Mode::Global, "x@a.test", "jane@ext.test"),
            Some(100)
        );
        assert_eq!(
            s.last_sent(Mode::PerDomain, "x@a.test", "jane@ext.test"),
            Some(100)
        );
        // A removal older than the record does not remove it.
        assert_eq!(s.remove(None, "jane@ext.test", 99), 0);
        assert_eq!(s.remove(None, "jane@ext.test", 100), 1);
        assert_eq!(s.last_sent(Mode::Global, "x@a.test", "jane@ext.test"), None);
        assert!(s.is_empty());
        // The freed external id is reused only after the next sweep.
        s.sweep(1);
        rec(&s, "john@a.test", "new@ext.test", 500);
        let all = s.records();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].external, "new@ext.test");
    }

    #[test]
    fn originals_are_kept_for_display() {
        let s = Store::new();
        s.record(
            ("john@a.test", "John@A.test"),
            ("jane@ext.test", "Jane@EXT.test"),
            7,
        );
        let r = &s.records()[0];
        assert_eq!(r.local_original, "John@A.test");
        assert_eq!(r.external_original, "Jane@EXT.test");
        assert_eq!(r.external, "jane@ext.test");
    }
}
