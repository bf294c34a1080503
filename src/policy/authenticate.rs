//! SPF (RFC 7208), DKIM (RFC 6376) and DMARC (RFC 7489) on inbound mail, with the `mail-auth`
//! crate, reported in an `Authentication-Results:` field (RFC 8601) added to every copy
//! (`[authentication] verify = true`).
//!
//! The `authenticate` check runs at end of data and defers: the job reads the message (its
//! in-memory part copied, the rest from the staging file through a duplicated descriptor)
//! on a policy worker and runs the lookups on the resolver's runtime (the MX resolver's:
//! one caching resolver, off the cores), all within `[authentication] timeout`. A lookup that
//! fails or is too slow is the mechanism's `temperror`, never a pass; with no answer at all
//! in time the message gets no results field. A field a client sent with our authserv-id is
//! removed before ours is added (RFC 8601 §5); others are kept.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use mail_auth::common::crypto::{Algorithm, CryptoError};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticationResults, DkimOutput, MessageAuthenticator, Parameters, ResolverCache, Txt,
};
use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::time::Instant;

use super::pipeline::{Authenticated, Check, Decision, Job, Mark, Refusal, Request, Stage};
use crate::domain::Suffixes;
use crate::metrics::Reason;
use crate::proto::reply;
use crate::relay::dns::Dns;

/// What verifying a message needs.
#[derive(Clone)]
pub struct Verifier {
    pub dns: Arc<Dns>,
    pub authserv_id: String,
    /// All lookups of one message together.
    pub timeout: Duration,
    pub suffixes: Suffixes,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("authserv_id", &self.authserv_id)
            .field("suffixes", &self.suffixes)
            .finish_non_exhaustive()
    }
}

/// The `authenticate` check (end of data, inbound bindings).
pub struct Authenticate {
    pub verifier: Verifier,
    /// `[authentication] dmarc_reject`.
    pub dmarc_reject: bool,
    /// DMARC decides something here (`dmarc_reject`, or a route with `dmarc`): a message that
    /// could not be verified is deferred (`451 4.3.0`), not let through unverified.
    pub enforce: bool,
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl std::fmt::Debug for Authenticate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticate")
            .field("verifier", &self.verifier)
            .finish_non_exhaustive()
    }
}

/// A record, until when it is valid, whether its DKIM key was parsed once, its [`weight`].
type Cached = (Txt, Instant, bool, usize);

/// Parsed TXT records (SPF, DKIM keys, DMARC) for their TTL, shared by every verification:
/// a record is fetched and parsed once, not per message. At most [`TXT_CACHE_SIZE`] names
/// and [`TXT_CACHE_BYTES`] of parsed records (by [`weight`]); when full, expired entries go,
/// then everything (it refills from the resolver's cache). A record heavier than
/// [`TXT_RECORD_MAX`] is used for the message that asked and not kept: a zone's SPF record
/// of 64 KB of `a a a …` parses into 2 MiB, and 20,000 such names would be 40 GiB.
/// DKIM keys newly cached are listed in `new_keys` (at most [`NEW_KEYS`]) for
/// [`upgrade_keys`].
struct TxtCache {
    map: std::sync::Mutex<HashMap<Box<str>, Cached>>,
    /// The weights of the records in `map` (changed under its lock).
    bytes: std::sync::atomic::AtomicUsize,
    new_keys: std::sync::Mutex<Vec<Box<str>>>,
    /// `new_keys` is not empty (looked at by every verification, without the lock).
    keys_waiting: std::sync::atomic::AtomicBool,
}

const TXT_CACHE_SIZE: usize = 20_000;
const TXT_CACHE_BYTES: usize = 64 << 20;
const TXT_RECORD_MAX: usize = 64 << 10;
/// What a DKIM key is counted as until it is parsed once (mail-auth keeps its bytes as they
/// came, up to the 48 KiB a 64 KiB TXT answer decodes to), and after.
const RAW_KEY_WEIGHT: usize = 48 << 10;
const PARSED_KEY_WEIGHT: usize = 2 << 10;
const NEW_KEYS: usize = 64;
const KEY_WORTH_PARSING: u64 = 60;

fn txt_cache() -> &'static TxtCache {
    static CACHE: std::sync::OnceLock<TxtCache> = std::sync::OnceLock::new();
    CACHE.get_or_init(TxtCache::new)
}

impl TxtCache {
    fn new() -> TxtCache {
        TxtCache {
            map: std::sync::Mutex::new(HashMap::new()),
            bytes: std::sync::atomic::AtomicUsize::new(0),
            new_keys: std::sync::Mutex::new(Vec::new()),
            keys_waiting: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Cached>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// About the memory a parsed record takes, in bytes: its SPF terms with their domain
/// names, DMARC's report addresses, a DKIM key; a small fixed part for the rest.
fn weight(value: &Txt) -> usize {
    use mail_auth::spf::{Directive, Macro, Mechanism};
    use std::mem::size_of;
    fn of_macro(m: &Macro) -> usize {
        size_of::<Macro>()
            + match m {
                Macro::Literal(b) => b.len(),
                Macro::List(l) => l.iter().map(of_macro).sum(),
                _ => 0,
            }
    }
    let spf_term = |d: &Directive| {
        size_of::<Directive>()
            + match &d.mechanism {
                Mechanism::Include { macro_string }
                | Mechanism::A { macro_string, .. }
                | Mechanism::Mx { macro_string, .. }
                | Mechanism::Ptr { macro_string }
                | Mechanism::Exists { macro_string } => of_macro(macro_string),
                _ => 0,
            }
    };
    256 + match value {
        Txt::Spf(spf) => {
            spf.directives.iter().map(spf_term).sum::<usize>()
                + spf.exp.as_ref().map_or(0, of_macro)
                + spf.redirect.as_ref().map_or(0, of_macro)
                + spf.ra.as_ref().map_or(0, |ra| ra.len())
        }
        Txt::SpfMacro(m) => of_macro(m),
        Txt::Dmarc(d) => d
            .rua
            .iter()
            .chain(&d.ruf)
            .map(|u| size_of::<mail_auth::dmarc::URI>() + u.uri.len())
            .sum(),
        Txt::DomainKey(_) => RAW_KEY_WEIGHT,
        _ => 1024,
    }
}

/// Replace the DKIM keys cached since the last call with keys parsed once
/// ([`super::dkim_key`]), on the resolver's runtime: no message waits for it. The record is
/// asked for again (from the resolver's cache, as a rule); a key that changed in the cache
/// meanwhile, or was parsed already, or a record that is not an RSA key, is left as it is. An
/// answer that is not the record the cached key came from (the key rotated in between) gives a
/// key that never answers alone (see [`super::dkim_key`]).
fn upgrade_keys(dns: &Arc<Dns>) {
    use std::sync::atomic::Ordering;
    let cache = txt_cache();
    if !cache.keys_waiting.load(Ordering::Acquire) {
        return;
    }
    let names = {
        let mut new = cache.new_keys.lock().unwrap_or_else(|p| p.into_inner());
        cache.keys_waiting.store(false, Ordering::Release);
        std::mem::take(&mut *new)
    };
    if !names.is_empty()
        && let Ok(runtime) = tokio::runtime::Handle::try_current()
    {
        let dns = dns.clone();
        runtime.spawn(async move { upgrade(&dns, names).await });
    }
}

async fn upgrade(dns: &Dns, names: Vec<Box<str>>) {
    let cache = txt_cache();
    for name in names {
        let Ok(fqdn) = mail_auth::hickory_resolver::proto::rr::Name::from_str_relaxed(&*name)
        else {
            continue;
        };
        let Some((Txt::DomainKey(theirs), _, false, _)) = cache.map().get(&name).cloned() else {
            continue;
        };
        let Ok(lookup) = dns.resolver().txt_lookup(fqdn).await else {
            continue;
        };
        let faster = lookup.answers().iter().find_map(|record| {
            let mail_auth::hickory_resolver::proto::rr::RData::TXT(txt) = &record.data else {
                return None;
            };
            super::dkim_key::faster(theirs.clone(), &txt.txt_data.concat())
        });
        if let Some(key) = faster {
            let mut map = cache.map();
            if let Some((Txt::DomainKey(now), _, parsed, w)) = map.get_mut(&name)
                && Arc::ptr_eq(now, &theirs)
            {
                *now = Arc::new(key);
                *parsed = true;
                // Parsed, the key takes what its modulus takes.
                cache.bytes.fetch_sub(
                    w.saturating_sub(PARSED_KEY_WEIGHT),
                    std::sync::atomic::Ordering::Relaxed,
                );
                *w = (*w).min(PARSED_KEY_WEIGHT);
            }
        }
    }
}

impl ResolverCache<Box<str>, Txt> for TxtCache {
    fn get<Q>(&self, name: &Q) -> Option<Txt>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map()
            .get(name)
            .filter(|(_, until, _, _)| *until > Instant::now())
            .map(|(t, _, _, _)| t.clone())
    }
    fn remove<Q>(&self, name: &Q) -> Option<Txt>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut m = self.map();
        m.remove(name).map(|(t, _, _, w)| {
            self.bytes
                .fetch_sub(w, std::sync::atomic::Ordering::Relaxed);
            t
        })
    }
    fn insert(&self, key: Box<str>, value: Txt, valid_until: Instant) {
        // A record that did not parse as the type asked for is not kept: the name may be
        // asked for as another type (an SPF `include:` aimed at a DKIM key), and a cached
        // error would stand in for the real record.
        // Nor are the records ringmx does not use again (ATPS, reports, MTA-STS, TLS-RPT),
        // nor one heavier than TXT_RECORD_MAX (it would take the room of hundreds).
        let w = weight(&value);
        let kept = matches!(
            value,
            Txt::Spf(_) | Txt::SpfMacro(_) | Txt::DomainKey(_) | Txt::Dmarc(_)
        );
        if !kept || w > TXT_RECORD_MAX {
            return;
        }
        // A key cached for a minute or more is worth parsing once (a TTL of 0 would have it
        // fetched again for every message).
        if matches!(value, Txt::DomainKey(_))
            && valid_until > Instant::now() + Duration::from_secs(KEY_WORTH_PARSING)
        {
            let mut new = self.new_keys.lock().unwrap_or_else(|p| p.into_inner());
            if new.len() < NEW_KEYS && !new.contains(&key) {
                new.push(key.clone());
                self.keys_waiting
                    .store(true, std::sync::atomic::Ordering::Release);
            }
        }
        use std::sync::atomic::Ordering::Relaxed;
        let mut m = self.map();
        let full = |m: &HashMap<_, _>| {
            m.len() >= TXT_CACHE_SIZE || self.bytes.load(Relaxed) + w > TXT_CACHE_BYTES
        };
        if full(&m) {
            let now = Instant::now();
            m.retain(|_, (_, until, _, w)| {
                let keep = *until > now;
                if !keep {
                    self.bytes.fetch_sub(*w, Relaxed);
                }
                keep
            });
            if full(&m) {
                m.clear();
                self.bytes.store(0, Relaxed);
            }
        }
        self.bytes.fetch_add(w, Relaxed);
        if let Some((_, _, _, old)) = m.insert(key, (value, valid_until, false, w)) {
            self.bytes.fetch_sub(old, Relaxed);
        }
    }
}

/// `content` without the `Authentication-Results:` fields that carry `authserv_id` (RFC 8601
/// §5: a client must not speak for us), or `None` when it has none.
pub fn strip_ours(content: &[u8], authserv_id: &str) -> Option<Vec<u8>> {
    crate::aswl::detect::strip_header_if(content, "Authentication-Results", |value| {
        authserv_id_of(value).eq_ignore_ascii_case(authserv_id)
    })
}

/// The authserv-id that starts a field's value, the way an RFC 5322 reader finds it: folding
/// white space and comments (nested, with `\` escapes) skipped, a quoted string unquoted,
/// up to white space, `;` or a comment.
fn authserv_id_of(value: &[u8]) -> String {
    let mut depth = 0u32;
    let mut id = String::new();
    let mut it = value.iter().copied();
    while let Some(b) = it.next() {
        if depth > 0 {
            match b {
                b'\\' => {
                    it.next();
                }
                b'(' => depth += 1,
                b')' => depth -= 1,
                _ => {}
            }
            continue;
        }
        match b {
            b'(' if id.is_empty() => depth = 1,
            b'"' => {
                while let Some(q) = it.next() {
                    match q {
                        b'\\' => {
                            if let Some(e) = it.next() {
                                id.push(char::from(e));
                            }
                        }
                        b'"' => break,
                        _ => id.push(char::from(q)),
                    }
                }
            }
            b'\\' => {
                if let Some(e) = it.next() {
                    id.push(char::from(e));
                }
            }
            b' ' | b'\t' | b'\r' | b'\n' if id.is_empty() => {}
            b' ' | b'\t' | b'\r' | b'\n' | b';' | b'(' => break,
            _ => id.push(char::from(b)),
        }
    }
    id
}

impl Check for Authenticate {
    fn name(&self) -> &'static str {
        "authenticate"
    }
    fn stage(&self) -> Stage {
        Stage::Data
    }
    fn time_limit(&self) -> Option<Duration> {
        Some(self.verifier.timeout + Duration::from_secs(1))
    }
    /// No results in time: the message goes on without the field (no verdict is a pass),
    /// or, where DMARC is enforced, is deferred.
    fn unavailable(&self) -> Decision {
        no_results(self.enforce)
    }
    fn check(&self, r: &Request<'_>) -> Decision {
        let Some(content) = r.content else {
            return Decision::Continue;
        };
        let enforce = self.enforce;
        // Memory: the verifications under way hold at most `MAX_HELD` bytes of messages; past
        // that (a flood of big messages) a message goes on unverified, as if out of time.
        let Some(held) = Held::take(content.len()) else {
            tracing::warn!("authenticate: too many messages under verification; not verified");
            return no_results(enforce);
        };
        let mut message = content.prefix().to_vec();
        let tail = match content.tail() {
            None => None,
            Some((f, len, _)) => match f.try_clone() {
                Ok(f) => Some((f, len)),
                Err(e) => {
                    tracing::warn!(error = %e, "authenticate: cannot read the staged message");
                    return no_results(enforce);
                }
            },
        };
        let (ip, helo, mail_from) = (r.ip, r.helo.to_string(), r.mail_from.to_string());
        let verifier = self.verifier.clone();
        let (dmarc_reject, metrics) = (self.dmarc_reject, self.metrics.clone());
        let (dns, timeout) = (self.verifier.dns.clone(), self.verifier.timeout);
        let task = async move {
            let _held = held;
            if let Some((f, len)) = tail {
                let read = tokio::task::spawn_blocking(move || {
                    let at = message.len();
                    message.resize(at + len as usize, 0);
                    f.read_exact_at(message.get_mut(at..).unwrap_or_default(), 0)
                        .map(|()| message)
                })
                .await;
                match read {
                    Ok(Ok(m)) => message = m,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "authenticate: cannot read the staged message");
                        return no_results(enforce);
                    }
                    Err(_) => return no_results(enforce),
                }
            }
            let Some((field, auth)) = verifier.verify(ip, &helo, &mail_from, &message).await else {
                return no_results(enforce);
            };
            if let Some(m) = &metrics {
                m.authentication("spf", auth.spf_result);
                for d in &auth.dkim_results {
                    m.authentication("dkim", d);
                }
                m.authentication("dmarc", auth.dmarc_result);
            }
            if dmarc_reject && auth.dmarc_result == "fail" && auth.dmarc_policy_reject {
                return Decision::Reject(
                    Refusal::new(
                        &reply::DMARC_REJECT,
                        Reason::DmarcReject,
                        "refused: DMARC policy reject",
                    )
                    .with_detail(&auth),
                );
            }
            // With enforcement on, a From: that gives DMARC no single domain to check is
            // refused too (RFC 7489 §6.6.1).
            if dmarc_reject && auth.ambiguous_from {
                return Decision::Reject(
                    Refusal::new(
                        &reply::DMARC_NO_DOMAIN,
                        Reason::DmarcReject,
                        "refused: no single From: domain for DMARC",
                    )
                    .with_detail(&auth),
                );
            }
            Decision::All(vec![
                Decision::AddHeader(field),
                Decision::Mark(Mark::Authenticated(Arc::new(auth))),
            ])
        };
        // A job that starts after its session stopped waiting does no work.
        let deadline = Instant::now() + timeout + Duration::from_secs(1);
        Decision::Defer(Job::blocking(move || {
            if Instant::now() >= deadline {
                return no_results(enforce);
            }
            here_or_spawn(&dns, task)
        }))
    }
}

/// Run `task` on this policy worker until it has to wait (for a DNS answer: records not in
/// the cache), then hand it to the resolver's task runtimes ([`Dns::spawn`]), where waiting
/// holds no thread, and answer with that (the session waits on). With the records cached,
/// a message is verified here in one go, with no further hand-over.
fn here_or_spawn(
    dns: &Arc<Dns>,
    task: impl std::future::Future<Output = Decision> + Send + 'static,
) -> Decision {
    let mut task = Box::pin(task);
    let polled = {
        // Timers and lookups created in this first step belong to the resolver's runtime.
        let _rt = dns.enter();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        task.as_mut().poll(&mut cx)
    };
    match polled {
        std::task::Poll::Ready(d) => d,
        std::task::Poll::Pending => Decision::Defer(Job::Running(dns.spawn(task))),
    }
}

/// The answer for a message that could not be verified (too many under way, the staged
/// content unreadable, no results in time): on without results, or `451 4.3.0` when DMARC is
/// enforced, so that a flood or a slow zone cannot carry a message past the enforcement.
fn no_results(enforce: bool) -> Decision {
    if enforce {
        Decision::Reject(Refusal::new(
            &reply::POLICY_BUSY,
            Reason::Busy,
            "deferred: the message could not be verified (DMARC is enforced)",
        ))
    } else {
        Decision::Continue
    }
}

/// Bytes of messages held by verifications under way, and how many there are.
static HELD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static RUNNING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
const MAX_HELD: usize = 256 << 20;
const MAX_RUNNING: usize = 4096;

/// One verification's share of [`MAX_HELD`] and [`MAX_RUNNING`], given back when dropped.
struct Held(usize);

impl Held {
    fn take(bytes: u64) -> Option<Held> {
        use std::sync::atomic::Ordering::Relaxed;
        let bytes = usize::try_from(bytes).ok()?;
        if RUNNING.fetch_add(1, Relaxed) >= MAX_RUNNING {
            RUNNING.fetch_sub(1, Relaxed);
            return None;
        }
        let before = HELD.fetch_add(bytes, Relaxed);
        if before.saturating_add(bytes) > MAX_HELD && before > 0 {
            HELD.fetch_sub(bytes, Relaxed);
            RUNNING.fetch_sub(1, Relaxed);
            return None;
        }
        Some(Held(bytes))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        HELD.fetch_sub(self.0, Relaxed);
        RUNNING.fetch_sub(1, Relaxed);
    }
}

/// `[authentication] spf_reject`: SPF for the MAIL FROM domain, at MAIL; a `fail` (the
/// domain's `-all` covers this client) is refused with `550 5.7.23` (RFC 7372). Anything else,
/// or no answer in time, goes on (the end of data reports it).
pub struct SpfAtMail {
    pub dns: Arc<Dns>,
    pub authserv_id: String,
    pub timeout: Duration,
}

impl std::fmt::Debug for SpfAtMail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpfAtMail").finish_non_exhaustive()
    }
}

impl Check for SpfAtMail {
    fn name(&self) -> &'static str {
        "spf_reject"
    }
    fn stage(&self) -> Stage {
        Stage::Mail
    }
    fn time_limit(&self) -> Option<Duration> {
        Some(self.timeout + Duration::from_secs(1))
    }
    fn unavailable(&self) -> Decision {
        Decision::Continue
    }
    fn check(&self, r: &Request<'_>) -> Decision {
        if r.mail_from.is_empty() {
            return Decision::Continue;
        }
        let (ip, helo, mail_from) = (r.ip, r.helo.to_string(), r.mail_from.to_string());
        let (dns, id, timeout) = (self.dns.clone(), self.authserv_id.clone(), self.timeout);
        let resolver = dns.resolver().clone();
        let task = async move {
            let auth = MessageAuthenticator(resolver);
            let helo = if helo.is_empty() {
                "unknown"
            } else {
                helo.as_str()
            };
            let result = tokio::time::timeout(
                timeout,
                auth.verify_spf(
                    Parameters::new(SpfParameters::verify_mail_from(ip, helo, &id, &mail_from))
                        .with_txt_cache(txt_cache()),
                ),
            )
            .await
            .ok();
            match result {
                Some(spf) if spf.result() == mail_auth::SpfResult::Fail => {
                    Decision::Reject(Refusal::new(
                        &reply::SPF_FAIL,
                        Reason::SpfFail,
                        "refused: SPF fail at MAIL FROM",
                    ))
                }
                _ => Decision::Continue,
            }
        };
        // A job that starts after its session stopped waiting does no work.
        let deadline = Instant::now() + timeout + Duration::from_secs(1);
        Decision::Defer(Job::blocking(move || {
            if Instant::now() >= deadline {
                return Decision::Continue;
            }
            here_or_spawn(&dns, task)
        }))
    }
}

/// The DMARC policy applied to the From domain. `record` was found walking up from it; `own` is
/// the lookup of `_dmarc.` + the From domain itself (`None`: not asked, `record`'s `p` and `sp`
/// agree). Found there: the domain's own record, and its `p`, apply; no record there: `record`
/// is a parent's, its `sp` applies (RFC 7489 §6.3); any other answer (the lookup failed just
/// after it succeeded for the walk): the stricter of the two. A failure is then sampled: with `pct=N`, a message whose `roll` (0–99, random) is
/// not below N, and any message under `t=y` (the owner is testing), gets the next-lower
/// policy (RFC 7489 §6.6.4): `p=reject; pct=0` is a domain watching its reports, not one
/// asking for refusals.
fn applied_policy(
    record: &mail_auth::dmarc::Dmarc,
    own: Option<mail_auth::Result<Arc<mail_auth::dmarc::Dmarc>>>,
    roll: u8,
) -> mail_auth::dmarc::Policy {
    use mail_auth::dmarc::Policy;
    use mail_auth::{DnsError, Error};
    let rank = |p: Policy| match p {
        Policy::Reject => 2,
        Policy::Quarantine => 1,
        _ => 0,
    };
    let (record, policy) = match &own {
        None => (record, record.p),
        Some(Ok(own)) => (own.as_ref(), own.p),
        Some(Err(
            Error::Dns(DnsError::RecordNotFound(_)) | Error::Dns(DnsError::InvalidRecordType),
        )) => (record, record.sp),
        Some(Err(_)) => (
            record,
            std::cmp::max_by_key(record.p, record.sp, |p| rank(*p)),
        ),
    };
    if roll < record.pct && !record.t {
        return policy;
    }
    match policy {
        Policy::Reject => Policy::Quarantine,
        Policy::Quarantine => Policy::None,
        p => p,
    }
}

/// A From: address as DMARC is to see it: without spaces around it, and without one final
/// dot of its domain (`ceo@bank.example.` is from bank.example). With the dot, the name of
/// the domain's record could not even be asked for: DMARC would be a `temperror`, which no
/// enforcement refuses, for a domain that any mail program shows as bank.example.
fn normalize_from(address: &mut String) {
    let t = address.trim();
    let t = match t.rsplit_once('@') {
        Some((_, d)) if d.ends_with('.') => t.strip_suffix('.').unwrap_or(t),
        _ => t,
    };
    if t.len() != address.len() {
        *address = t.to_string();
    }
}

/// DMARC can judge a From: domain whose record can be asked for: a DNS name of at least two
/// labels (1 to 63 bytes each, 253 in all, no escapes) that the resolver takes. Anything else
/// (a double dot, a 64-byte label, a single label such as what is left of `ceo@bank(x).test`
/// once a parser stops at the comment, where DMARC would look for no record at all) is treated
/// like a From: naming several domains.
fn judgeable_domain(domain: &str) -> bool {
    domain.contains('.')
        && domain.len() <= 253
        && domain.split('.').all(|l| !l.is_empty() && l.len() <= 63)
        && !domain.contains('\\')
        // The labels asked for are the ones written: IDNA maps a fullwidth or ideographic dot
        // (`bank．example`) to a dot inside one label, a name under which mail-auth's walk up
        // the tree finds no record, while a reader sees bank.example.
        && mail_auth::hickory_resolver::proto::rr::Name::from_str_relaxed(format!(
            "_dmarc.{domain}."
        ))
        .is_ok_and(|n| {
            usize::from(n.num_labels()) == domain.split('.').count() + 1
                && n.iter().all(|label| !label.contains(&b'.'))
        })
}

/// A header field's value as RFC 5322 reads its structure: each quoted string, each comment
/// (nested, with escapes) and each white-space byte becomes `None`, a gap; every other byte is
/// itself.
fn structure(value: &[u8]) -> impl Iterator<Item = Option<u8>> + '_ {
    let mut bytes = value.iter();
    std::iter::from_fn(move || {
        let &b = bytes.next()?;
        Some(match b {
            b'"' => {
                while let Some(&q) = bytes.next() {
                    match q {
                        b'\\' => {
                            bytes.next();
                        }
                        b'"' => break,
                        _ => {}
                    }
                }
                None
            }
            b'(' => {
                let mut depth = 1usize;
                while depth > 0 {
                    match bytes.next() {
                        Some(b'\\') => {
                            bytes.next();
                        }
                        Some(b'(') => depth += 1,
                        Some(b')') => depth -= 1,
                        Some(_) => {}
                        None => break,
                    }
                }
                None
            }
            b' ' | b'\t' | b'\r' | b'\n' => None,
            _ => Some(b),
        })
    })
}

/// Whether a raw From: field holds an address whose domain goes on past a comment or white
/// space, at a dot: `ceo@evil.test(x).bank.example`, `ceo@evil.test. bank.example`. RFC 5322's
/// obsolete syntax (§4.4) lets comments and spaces stand between the dotted parts of a domain,
/// so that is one domain, evil.test.bank.example, a name under bank.example; a parser that
/// stops at the gap (mail-parser does) has DMARC judge evil.test, which the sender may own.
/// Text after a gap that does not continue the domain (`bob@bank.example (Bob)`, a display
/// name) is not this.
fn domain_continues_past_a_gap(value: &[u8]) -> bool {
    // In a domain (after an `@`), a gap seen in it, its last byte before that.
    let (mut in_domain, mut gap, mut last) = (false, false, 0u8);
    for t in structure(value) {
        match t {
            None => gap |= in_domain,
            Some(b'@') => (in_domain, gap, last) = (true, false, 0),
            Some(b'<' | b'>' | b',' | b';' | b':') => (in_domain, gap) = (false, false),
            Some(b) if in_domain => {
                if gap && (b == b'.' || last == b'.') {
                    return true;
                }
                (gap, last) = (false, b);
            }
            Some(_) => {}
        }
    }
    false
}

/// The domains a From: field's raw text names: what follows each `@` outside quoted strings
/// and comments, up to a gap or a delimiter; lower case, without one final dot (as the
/// parsed addresses are).
fn raw_domains(value: &[u8]) -> Vec<String> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut in_domain = false;
    for t in structure(value) {
        match t {
            Some(b'@') => {
                out.push(Vec::new());
                in_domain = true;
            }
            None | Some(b'<' | b'>' | b',' | b';' | b':') => in_domain = false,
            Some(b) if in_domain => {
                if let Some(d) = out.last_mut() {
                    d.push(b);
                }
            }
            Some(_) => {}
        }
    }
    out.iter()
        .map(|d| {
            let d = String::from_utf8_lossy(d).to_lowercase();
            d.strip_suffix('.').map(str::to_string).unwrap_or(d)
        })
        .filter(|d| !d.is_empty())
        .collect()
}

/// Whether mail-auth's header block ended early: at a line without a colon (where RFC 5322
/// has none) instead of an empty line, with text after it, in which a lenient reader may still
/// find a From: field that DMARC never saw.
fn header_block_cut_short(raw: &[u8], body_offset: usize) -> bool {
    body_offset < raw.len()
        && !raw
            .get(..body_offset)
            .is_some_and(|h| h.ends_with(b"\n\r\n") || h.ends_with(b"\n\n"))
}

/// A header field name that mail-auth takes for `From` (it skips white space in names).
fn is_from_field(name: &[u8]) -> bool {
    name.iter()
        .filter(|b| !b.is_ascii_whitespace())
        .map(u8::to_ascii_lowercase)
        .eq(b"from".iter().copied())
}

/// Whether the From: of a message gives DMARC no single domain to check, besides what the
/// parsed domains themselves say (several, or not DNS names): text that a reader may take
/// for another address than the parser did. That is more than one From: field (RFC 5322
/// allows one; a reader may show either); an address with two `@` (mail-parser joins
/// `<ceo@bank.example> x@evil.test` into one, which DMARC reads as from evil.test); a domain
/// the raw text names that no parsed address has (`ceo@bank.example <x@evil.test>`, a group
/// named `<ceo@bank.example>:`); an `@` hidden in an encoded word (RFC 2047; readers that
/// decode first see `<ceo@bank.example>`); any `@` where the parser found no address (an
/// unclosed quote); a domain that goes on past a gap ([`domain_continues_past_a_gap`]).
fn from_fields_ambiguous(headers: &[(&[u8], &[u8])], from: &[String]) -> bool {
    let mut fields = headers
        .iter()
        .filter(|(name, _)| is_from_field(name))
        .map(|(_, value)| *value);
    let Some(first) = fields.next() else {
        return false;
    };
    let parsed: Vec<&str> = from
        .iter()
        .filter_map(|f| f.rsplit_once('@').map(|(_, d)| d))
        .collect();
    let text = String::from_utf8_lossy(first);
    let ats = |t: &str| t.bytes().filter(|&b| b == b'@').count();
    fields.next().is_some()
        || from.iter().any(|f| ats(f) > 1)
        || raw_domains(first)
            .iter()
            .any(|d| !parsed.contains(&d.as_str()))
        || (text.contains("=?") && ats(&crate::aswl::detect::decode_words(&text)) > ats(&text))
        || (from.is_empty() && first.contains(&b'@'))
        || domain_continues_past_a_gap(first)
}

/// The fuzz target `from`: a From: field's bytes through what DMARC enforcement makes of them
/// besides mail-auth's parser; nothing panics, and a field without an `@` names no domain to
/// go on.
pub(crate) fn fuzz_from(data: &[u8]) {
    let split = domain_continues_past_a_gap(data);
    assert!(!split || data.contains(&b'@'));
    assert!(raw_domains(data).len() <= data.iter().filter(|&&b| b == b'@').count());
    let _ = from_fields_ambiguous(&[(b"From", data), (data, b"x@y")], &[]);
    let mut address = String::from_utf8_lossy(data).into_owned();
    normalize_from(&mut address);
    if let Some((_, domain)) = address.rsplit_once('@') {
        let _ = judgeable_domain(domain);
    }
}

/// 0–99, for [`applied_policy`]'s sampling.
fn dmarc_roll() -> u8 {
    use std::hash::{BuildHasher, Hasher};
    (std::hash::RandomState::new().build_hasher().finish() % 100) as u8
}

/// DKIM signatures verified per message (the rest are ignored).
const MAX_SIGNATURES: usize = 8;
/// Names in a signature's `h=` beyond which it is not checked (`dkim=policy`).
const MAX_SIGNED_FIELDS: usize = 100;

impl Verifier {
    /// Verify one message: the `Authentication-Results:` field (without its line end) and what
    /// passed, or `None` when the lookups did not finish within `timeout`.
    pub async fn verify(
        &self,
        ip: std::net::IpAddr,
        helo: &str,
        mail_from: &str,
        message: &[u8],
    ) -> Option<(String, Authenticated)> {
        let (dns, authserv_id, timeout) = (&self.dns, self.authserv_id.as_str(), self.timeout);
        let suffixes = &self.suffixes;
        let auth = MessageAuthenticator(dns.resolver().clone());
        let helo = if helo.is_empty() { "unknown" } else { helo };
        // In the field, the name as in `Received:`.
        let mut helo_shown = crate::delivery::trace::shown_helo(helo);
        if helo_shown.is_empty() {
            helo_shown.push_str("unknown");
        }
        let mut parsed = super::bodyhash::parse_message(message, MAX_SIGNATURES);
        // Signatures not checked: mail-auth matches the names of `h=` against the header
        // fields in time |h=| × (names + fields), so one naming thousands of fields in a header
        // of thousands would cost seconds. No signer names more than a few dozen.
        let mut unchecked = Vec::new();
        if let Some(m) = parsed.as_mut() {
            m.errors.truncate(MAX_SIGNATURES);
            m.from.iter_mut().for_each(normalize_from);
            let (checked, over): (Vec<_>, Vec<_>) = std::mem::take(&mut m.dkim_headers)
                .into_iter()
                .partition(|s| s.header.h.len() <= MAX_SIGNED_FIELDS);
            m.dkim_headers = checked;
            unchecked = over;
        }
        tokio::time::timeout(timeout, async {
            let spf_params = || {
                if mail_from.is_empty() {
                    SpfParameters::verify_ehlo(ip, helo, authserv_id)
                } else {
                    SpfParameters::verify_mail_from(ip, helo, authserv_id, mail_from)
                }
            };
            let cache = txt_cache();
            let spf = auth
                .verify_spf(Parameters::new(spf_params()).with_txt_cache(cache))
                .await;
            let mut passed = Authenticated {
                spf: (spf.result() == mail_auth::SpfResult::Pass && !mail_from.is_empty())
                    .then(|| spf.domain().to_ascii_lowercase()),
                spf_result: spf_word(spf.result()),
                dmarc_result: "none",
                ..Authenticated::default()
            };
            let mut results = AuthenticationResults::new(authserv_id);
            let mut dmarc_field: Option<String> = None;
            let mut dkim_field = String::new();
            let spf_domain = mail_from
                .rsplit_once('@')
                .map_or(helo, |(_, d)| d)
                .trim_end_matches('.')
                .to_ascii_lowercase();
            let spf_domain = spf_domain.as_str();
            match &parsed {
                Some(m) => {
                    let mut dkim = auth
                        .verify_dkim(Parameters::new(m).with_txt_cache(cache))
                        .await;
                    upgrade_keys(dns);
                    dkim.extend(unchecked.iter().map(|s| {
                        DkimOutput::perm_err(mail_auth::Error::Crypto(
                            CryptoError::IncompatibleAlgorithms,
                        ))
                        .with_signature(&s.header)
                    }));
                    let body_len =
                        m.raw_message.len().saturating_sub(m.body_offset as usize) as u64;
                    for d in &dkim {
                        let why = match d.signature() {
                            Some(s) if unchecked.iter().any(|u| std::ptr::eq(&u.header, s)) => {
                                Some(format!(
                                    "h= names {} fields, more than {MAX_SIGNED_FIELDS}",
                                    s.h.len()
                                ))
                            }
                            _ => unacceptable(d, body_len),
                        };
                        dkim_field.push_str(&dkim_clause(d, why, body_len));
                    }
                    // A pass we do not accept (rsa-sha1, or `l=` leaving text unsigned) is
                    // as if it failed, for DMARC and the whitelist.
                    let dkim: Vec<DkimOutput> = dkim
                        .into_iter()
                        .map(|d| {
                            if unacceptable(&d, body_len).is_none() {
                                return d;
                            }
                            let out = DkimOutput::perm_err(mail_auth::Error::Crypto(
                                CryptoError::IncompatibleAlgorithms,
                            ));
                            // The same signature, borrowed from the message (not from `d`).
                            match d.signature().and_then(|s| {
                                m.dkim_headers
                                    .iter()
                                    .map(|h| &h.header)
                                    .find(|h| std::ptr::eq(*h, s))
                            }) {
                                Some(s) => out.with_signature(s),
                                None => out,
                            }
                        })
                        .collect();
                    passed.dkim = dkim
                        .iter()
                        .filter(|d| *d.result() == mail_auth::DkimResult::Pass)
                        .filter_map(|d| d.signature().map(|s| s.d.to_ascii_lowercase()))
                        .collect();
                    passed.dkim_results = dkim.iter().map(|d| dkim_word(d.result())).collect();
                    let dmarc = auth
                        .verify_dmarc(
                            Parameters::new(
                                DmarcParameters::new(m, &dkim, spf_domain, &spf)
                                    .with_domain_suffix_fn(|d| suffixes.organizational_domain(d)),
                            )
                            .with_txt_cache(cache),
                        )
                        .await;
                    results = if mail_from.is_empty() {
                        results.with_spf_ehlo_result(&spf, ip, &helo_shown)
                    } else {
                        results.with_spf_mailfrom_result(
                            &spf,
                            ip,
                            &shown_mail_from(mail_from),
                            &helo_shown,
                        )
                    };
                    passed.dmarc_result = dmarc_result(
                        dmarc.spf_result(),
                        dmarc.dkim_result(),
                        dmarc.dmarc_record().is_some(),
                    );
                    // A mechanism that could not be evaluated for the From domain's
                    // organization is no failure: a DNS hiccup must never turn into a DMARC
                    // `fail` (and a 550 with dmarc_reject). One for another domain (say, a
                    // signature the sender added for a zone that never answers) could not
                    // have aligned, and changes nothing.
                    let from_org = suffixes.organizational_domain(dmarc.domain());
                    let aligned = |d: &str| {
                        suffixes
                            .organizational_domain(d)
                            .eq_ignore_ascii_case(from_org)
                    };
                    let spf_unknown =
                        spf.result() == mail_auth::SpfResult::TempError && aligned(spf_domain);
                    let dkim_unknown = dkim.iter().any(|d| {
                        matches!(d.result(), mail_auth::DkimResult::TempError(_))
                            && d.signature().is_some_and(|s| aligned(&s.d))
                    });
                    if passed.dmarc_result == "fail" && (spf_unknown || dkim_unknown) {
                        passed.dmarc_result = "temperror";
                    }
                    // One From: address, or none for the whitelist (which one would count?).
                    if let [one] = m.from.as_slice() {
                        // (Trimmed by normalize_from, lower case from mail-auth.)
                        passed.from = one.clone();
                    }
                    // The domains of the From: addresses (an address without one, or no
                    // From: at all, names no domain to spoof: DMARC says `none`, as mail-auth
                    // does).
                    let domains: std::collections::HashSet<String> = m
                        .from
                        .iter()
                        .filter_map(|f| f.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase()))
                        .collect();
                    passed.ambiguous_from = domains.len() > 1
                        || !domains.iter().all(|d| judgeable_domain(d))
                        || from_fields_ambiguous(&m.headers, &m.from)
                        || header_block_cut_short(m.raw_message, m.body_offset as usize);
                    // The record's `p` governs the domain it was published for, its `sp`
                    // (default: `p`) the subdomains that have none of their own (RFC 7489
                    // §6.3, §6.6.3). The walk up to the record says not where it found it:
                    // where that matters (`sp` differs), asked once more (from the caches)
                    // for the From domain itself.
                    let policy = match dmarc.dmarc_record() {
                        Some(record) if record.p == record.sp => {
                            applied_policy(record, None, dmarc_roll())
                        }
                        Some(record) => {
                            let own = auth
                                .txt_lookup::<mail_auth::dmarc::Dmarc>(
                                    format!("_dmarc.{}.", dmarc.domain()),
                                    Some(cache),
                                )
                                .await;
                            applied_policy(record, Some(own), dmarc_roll())
                        }
                        None => dmarc.policy(),
                    };
                    passed.dmarc_policy_reject = policy == mail_auth::dmarc::Policy::Reject;
                    passed.dmarc_policy_quarantine = policy == mail_auth::dmarc::Policy::Quarantine;
                    dmarc_field = Some(format!(
                        ";\r\n\tdmarc={} header.from={} policy.dmarc={}",
                        passed.dmarc_result,
                        pvalue(dmarc.domain()),
                        pvalue(&policy.to_string())
                    ));
                }
                None => {
                    // No header block mail-auth can read (a line without a colon ends it):
                    // what a lenient reader takes for the From: cannot be checked.
                    passed.ambiguous_from = true;
                    results = if mail_from.is_empty() {
                        results.with_spf_ehlo_result(&spf, ip, &helo_shown)
                    } else {
                        results.with_spf_mailfrom_result(
                            &spf,
                            ip,
                            &shown_mail_from(mail_from),
                            &helo_shown,
                        )
                    };
                }
            }
            // As an added field: no line end (the caller ends each field).
            let mut field = results.to_header().trim_end().to_string();
            field.push_str(&dkim_field);
            if let Some(c) = dmarc_field {
                field.push_str(&c);
            }
            (field, passed)
        })
        .await
        .ok()
    }
}

/// The MAIL FROM address as `smtp.mailfrom=` (and the SPF comment) shows it: whole when its
/// local part is plain (letters, digits, `.`, `+`, `_`, `-`), else only its domain (RFC 8601
/// §2.7.2 allows that). A quoted local part may hold `;`, `=` and spaces, and mail-auth keeps
/// them inside quotes: `"x; dkim=pass"@evil.example` would put a `dkim=pass` in our field
/// for readers that split on `;` without honouring quotes.
/// The domain is shown only when it is a name (letters, digits, `-` and `.`): an address
/// literal may hold `;` and `=` too (`x@[a:b;dkim=pass]`); anything else is `unknown`.
fn shown_mail_from(mail_from: &str) -> std::borrow::Cow<'_, str> {
    let plain = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'_' | b'-');
    let name = |d: &str| {
        !d.is_empty()
            && d.chars()
                .all(|c| c.is_alphanumeric() || c == '.' || c == '-')
    };
    match mail_from.rsplit_once('@') {
        None if !mail_from.is_empty() && mail_from.bytes().all(plain) => mail_from.into(),
        Some((local, domain)) if name(domain) => {
            if !local.is_empty() && local.bytes().all(plain) {
                mail_from.into()
            } else {
                domain.into()
            }
        }
        _ => "unknown".into(),
    }
}

/// How the whitelist's sender is authenticated under `require`: `Some("spf")`/`Some("dkim")`
/// (the `auth=` of the verdict header), or `None` when it is not (its pass does not count).
/// `sender` is the MAIL FROM address the record matched.
///
/// SPF vouches for the envelope sender's domain. A DKIM signature vouches for the message,
/// From: included: it counts only when the signed From: is the envelope sender itself, so a
/// message signed for someone else of the same domain (or replayed) does not pass.
pub fn whitelist_authentication(
    require: crate::aswl::RequireAuth,
    suffixes: &Suffixes,
    auth: Option<&Authenticated>,
    sender: &str,
) -> Option<&'static str> {
    use crate::aswl::RequireAuth;
    if require == RequireAuth::Off {
        return Some("");
    }
    let auth = auth?;
    let sender = sender.trim().to_ascii_lowercase();
    let domain = sender
        .rsplit_once('@')
        .map_or("", |(_, d)| d)
        .trim_end_matches('.');
    if domain.is_empty() {
        return None;
    }
    if auth.spf.as_deref() == Some(domain) {
        return Some("spf");
    }
    if auth.from != sender {
        return None;
    }
    let org = suffixes.organizational_domain(domain);
    let dkim = auth.dkim.iter().any(|d| match require {
        RequireAuth::SpfOrDkim => d == domain,
        _ => suffixes.organizational_domain(d).eq_ignore_ascii_case(org),
    });
    dkim.then_some("dkim")
}

/// Why a signature that verified is not accepted: rsa-sha1 (RFC 8301 §3.1), or a body
/// length tag that leaves part of the body (`body_len` bytes) unsigned, where anyone could
/// have added text (RFC 6376 §8.2). `None` for a good pass, and for anything but a pass.
fn unacceptable(d: &DkimOutput, body_len: u64) -> Option<String> {
    let s = d.signature()?;
    if *d.result() != mail_auth::DkimResult::Pass {
        None
    } else if s.a == Algorithm::RsaSha1 {
        Some("rsa-sha1 is not accepted, RFC 8301".into())
    } else if s.l > 0 && s.l < body_len {
        Some(format!(
            "l={}: {} body bytes are not signed",
            s.l,
            body_len - s.l
        ))
    } else {
        None
    }
}

/// One signature's `dkim=` clause of the results (RFC 8601 §2.7.1): the result with
/// mail-auth's reason, `policy` with `why` a signature was not acceptable (a pass that is
/// [`unacceptable`], one not checked), a note
/// of a body length tag, and the signature's domain, selector, algorithm and first bytes.
fn dkim_clause(d: &DkimOutput, why: Option<String>, body_len: u64) -> String {
    use base64::Engine;
    use mail_auth::common::auth_results::AsAuthResult;
    let mut c = String::from(";\r\n\tdkim=");
    match why {
        Some(why) => c.push_str(&format!("policy ({why})")),
        None => d.result().as_auth_result(&mut c),
    }
    let Some(s) = d.signature() else {
        return c;
    };
    if s.l > 0 && s.l >= body_len {
        c.push_str(&format!(" (l={})", s.l));
    }
    let alg = match s.a {
        Algorithm::RsaSha1 => "rsa-sha1",
        Algorithm::RsaSha256 => "rsa-sha256",
        Algorithm::Ed25519Sha256 => "ed25519-sha256",
    };
    c.push_str(&format!(
        " header.d={} header.s={} header.a={alg}",
        pvalue(&s.d),
        pvalue(&s.s)
    ));
    if let Some(b) = s.b.get(..6) {
        c.push_str(" header.b=");
        c.push_str(&base64::engine::general_purpose::STANDARD.encode(b));
    }
    c
}

/// A value for a `ptype.property=value` of the results: only the characters a domain or
/// policy name is made of (a From domain is the sender's to choose).
fn pvalue(v: &str) -> String {
    let v: String = v
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-._".contains(*c))
        .collect();
    if v.is_empty() { "unknown".into() } else { v }
}

/// The DMARC result (RFC 7489 §11.2): `pass` when SPF or DKIM passed aligned; a lookup
/// error as such; `fail` when the From domain publishes a record and neither aligned; `none`
/// without a record. (mail-auth's own field says `none` for a failing message.)
pub fn dmarc_result(
    spf: &mail_auth::DmarcResult,
    dkim: &mail_auth::DmarcResult,
    record: bool,
) -> &'static str {
    use mail_auth::DmarcResult as R;
    let any = |f: fn(&R) -> bool| f(spf) || f(dkim);
    if any(|r| *r == R::Pass) {
        "pass"
    } else if any(|r| matches!(r, R::TempError(_))) {
        "temperror"
    } else if any(|r| matches!(r, R::PermError(_))) {
        "permerror"
    } else if record {
        "fail"
    } else {
        "none"
    }
}

fn spf_word(r: mail_auth::SpfResult) -> &'static str {
    use mail_auth::SpfResult as S;
    match r {
        S::Pass => "pass",
        S::Fail => "fail",
        S::SoftFail => "softfail",
        S::Neutral => "neutral",
        S::TempError => "temperror",
        S::PermError => "permerror",
        S::None => "none",
    }
}

fn dkim_word(r: &mail_auth::DkimResult) -> &'static str {
    use mail_auth::DkimResult as D;
    match r {
        D::Pass => "pass",
        D::Neutral(_) => "neutral",
        D::Fail(_) => "fail",
        D::PermError(_) => "permerror",
        D::TempError(_) => "temperror",
        D::None => "none",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_results_are_removed() {
        let msg = b"Authentication-Results: mx.test; spf=pass\r\n\
Authentication-Results: other.test; dkim=pass\r\n\
Authentication-Results:\r\n (folded) MX.TEST;\r\n dkim=pass\r\n\
Authentication-Results: mx.test.evil; spf=pass\r\n\
Subject: hi\r\n\r\nAuthentication-Results: mx.test; body\r\n";
        let out = strip_ours(msg, "mx.test").unwrap();
        let out = String::from_utf8(out).unwrap();
        assert_eq!(
            out,
            "Authentication-Results: other.test; dkim=pass\r\n\
Authentication-Results: mx.test.evil; spf=pass\r\n\
Subject: hi\r\n\r\nAuthentication-Results: mx.test; body\r\n"
        );
        assert_eq!(strip_ours(b"Subject: x\r\n\r\n", "mx.test"), None);
        assert_eq!(
            strip_ours(b"Authentication-Results: other; x\r\n\r\n", "mx.test"),
            None
        );
    }

    #[test]
    fn the_record_cache_is_bounded_by_weight() {
        use mail_auth::common::parse::TxtRecordParser;
        use std::sync::atomic::Ordering::Relaxed;
        let spf = |r: &str| Txt::Spf(Arc::new(mail_auth::spf::Spf::parse(r.as_bytes()).unwrap()));
        let later = Instant::now() + Duration::from_secs(3600);
        let cache = TxtCache::new();
        // An ordinary record is kept, weighed at a few hundred bytes.
        let ordinary = spf("v=spf1 ip4:192.0.2.0/24 include:_spf.example.test mx -all");
        assert!(
            (256..2048).contains(&weight(&ordinary)),
            "{}",
            weight(&ordinary)
        );
        cache.insert("a.test".into(), ordinary, later);
        assert!(matches!(cache.get("a.test"), Some(Txt::Spf(_))));
        let one = cache.bytes.load(Relaxed);
        // 64 KB of `a a a …`: used by the message that asked for it, never kept.
        let hostile = spf(&format!("v=spf1{} -all", " a".repeat(32_000)));
        assert!(weight(&hostile) > TXT_RECORD_MAX, "{}", weight(&hostile));
        cache.insert("b.test".into(), hostile, later);
        assert!(cache.get("b.test").is_none());
        assert_eq!(cache.bytes.load(Relaxed), one);
        // Records just under the limit: the total stays within the budget.
        let heavy = spf(&format!("v=spf1{} -all", " a".repeat(400)));
        let w = weight(&heavy);
        assert!(w < TXT_RECORD_MAX && w > 16 << 10, "{w}");
        for i in 0..(2 * TXT_CACHE_BYTES / w) {
            cache.insert(format!("h{i}.test").into(), heavy.clone(), later);
            assert!(cache.bytes.load(Relaxed) <= TXT_CACHE_BYTES);
        }
        let sum: usize = cache.map().values().map(|e| e.3).sum();
        assert_eq!(cache.bytes.load(Relaxed), sum);
        // A DKIM key counts as its worst case until it is parsed once; records ringmx does
        // not ask for again are not kept.
        let cache = TxtCache::new();
        let key = mail_auth::common::verify::DomainKey::parse(
            b"v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=",
        )
        .unwrap();
        cache.insert(
            "s._domainkey.a.test".into(),
            Txt::DomainKey(Arc::new(key)),
            later,
        );
        assert_eq!(cache.bytes.load(Relaxed), 256 + RAW_KEY_WEIGHT);
        let atps = mail_auth::dkim::Atps::parse(b"v=ATPS1;").unwrap();
        cache.insert("x._atps.a.test".into(), Txt::Atps(Arc::new(atps)), later);
        assert!(cache.get("x._atps.a.test").is_none());
        // Replacing and removing give the weight back.
        cache.insert("h0.test".into(), heavy.clone(), later);
        cache.remove("h0.test");
        let sum: usize = cache.map().values().map(|e| e.3).sum();
        assert_eq!(cache.bytes.load(Relaxed), sum);
    }

    #[test]
    fn mail_from_as_shown() {
        for (from, shown) in [
            ("bob@partner.test", "bob@partner.test"),
            ("b.o-b+x_1@partner.test", "b.o-b+x_1@partner.test"),
            (
                "\"x; dkim=pass header.d=bank.example\"@evil.example",
                "evil.example",
            ),
            ("dmarc=pass@evil.example", "evil.example"),
            ("a;b@evil.example", "evil.example"),
            ("\"a@b\"@evil.example", "evil.example"),
            ("@evil.example", "evil.example"),
            ("postmaster", "postmaster"),
            ("x@[a:b;dkim=pass;dmarc=pass;x]", "unknown"),
            ("x@[192.0.2.1]", "unknown"),
            ("a;b@[a:b;dkim=pass]", "unknown"),
            ("x@b\u{fc}cher.test", "x@b\u{fc}cher.test"),
            ("a;dkim=pass", "unknown"),
        ] {
            assert_eq!(shown_mail_from(from), shown, "{from}");
        }
        // In the field: no `=pass` but ours.
        let spf = mail_auth::SpfOutput::new("evil.example".into())
            .with_result(mail_auth::SpfResult::Pass);
        let from = "\"x; dkim=pass; dmarc=pass\"@evil.example";
        let field = AuthenticationResults::new("mx.test")
            .with_spf_mailfrom_result(
                &spf,
                "192.0.2.1".parse().unwrap(),
                &shown_mail_from(from),
                "h",
            )
            .to_header();
        assert_eq!(field.matches("=pass").count(), 1, "{field}");
        assert!(field.contains("smtp.mailfrom=evil.example"), "{field}");
        let field = AuthenticationResults::new("mx.test")
            .with_spf_mailfrom_result(
                &spf,
                "192.0.2.1".parse().unwrap(),
                &shown_mail_from("x@[a:b;dkim=pass;dmarc=pass;x]"),
                "h",
            )
            .to_header();
        assert_eq!(field.matches("=pass").count(), 1, "{field}");
    }

    #[test]
    fn authserv_ids() {
        for (value, id) in [
            (&b" mx.test; spf=pass"[..], "mx.test"),
            (b"mx.test 1; none", "mx.test"),
            (b" (comment) mx.test;", "mx.test"),
            (b"\r\n\tmx.test(c);", "mx.test"),
            (b"; none", ""),
            (b" \"mx.test\"; dkim=pass", "mx.test"),
            (b" (\\() mx.test; x", "mx.test"),
            (b" (\\)) mx.test;", "mx.test"),
            (b" mx\\.test;", "mx.test"),
        ] {
            assert_eq!(
                authserv_id_of(value),
                id,
                "{:?}",
                String::from_utf8_lossy(value)
            );
        }
    }

    #[test]
    fn dmarc_results() {
        use mail_auth::{DmarcResult as R, Error};
        let fail = || R::Fail(Error::NotAligned);
        // (spf, dkim, record, result)
        let table = [
            (R::Pass, R::None, true, "pass"),
            (fail(), R::Pass, true, "pass"),
            (R::None, R::None, true, "fail"),
            (fail(), fail(), true, "fail"),
            (R::None, R::None, false, "none"),
            (R::TempError(Error::ParseError), R::None, true, "temperror"),
        ];
        for (spf, dkim, record, want) in table {
            assert_eq!(dmarc_result(&spf, &dkim, record), want);
        }
        assert_eq!(pvalue("a b;\r\nX-Evil: 1"), "abX-Evil1");
    }

    #[test]
    fn the_policy_for_the_from_domain() {
        use mail_auth::common::parse::TxtRecordParser;
        use mail_auth::dmarc::{Dmarc, Policy};
        use mail_auth::hickory_resolver::proto::op::ResponseCode;
        use mail_auth::{DnsError, Error};
        let record = |t: &str| Dmarc::parse(t.as_bytes()).unwrap();
        let none_here = || Err(Error::Dns(DnsError::RecordNotFound(ResponseCode::NXDomain)));
        let own = |t: &str| Ok(Arc::new(record(t)));
        let failed = || Err(Error::Dns(DnsError::Resolver("timed out".into())));
        // (record found walking up, the From domain's own lookup, roll, policy)
        let table: Vec<(&str, mail_auth::Result<Arc<Dmarc>>, u8, Policy)> = vec![
            ("v=DMARC1; p=reject; sp=none", none_here(), 0, Policy::None),
            (
                "v=DMARC1; p=none; sp=reject",
                none_here(),
                0,
                Policy::Reject,
            ),
            (
                "v=DMARC1; p=quarantine",
                none_here(),
                99,
                Policy::Quarantine,
            ),
            (
                "v=DMARC1; p=reject; sp=none",
                own("v=DMARC1; p=reject"),
                0,
                Policy::Reject,
            ),
            // The domain's own record, as found by the second lookup, is the one that counts.
            (
                "v=DMARC1; p=none",
                own("v=DMARC1; p=quarantine"),
                0,
                Policy::Quarantine,
            ),
            (
                "v=DMARC1; p=none; sp=reject",
                Err(Error::Dns(DnsError::InvalidRecordType)),
                0,
                Policy::Reject,
            ),
            // The second lookup failed: the stricter of p and sp.
            ("v=DMARC1; p=reject; sp=none", failed(), 0, Policy::Reject),
            ("v=DMARC1; p=none; sp=reject", failed(), 0, Policy::Reject),
            (
                "v=DMARC1; p=none; sp=quarantine",
                failed(),
                0,
                Policy::Quarantine,
            ),
            // pct: below it the policy, from it on the next lower one; t=y always lower.
            (
                "v=DMARC1; p=reject; pct=0",
                none_here(),
                0,
                Policy::Quarantine,
            ),
            (
                "v=DMARC1; p=reject; pct=30",
                none_here(),
                29,
                Policy::Reject,
            ),
            (
                "v=DMARC1; p=reject; pct=30",
                none_here(),
                30,
                Policy::Quarantine,
            ),
            (
                "v=DMARC1; p=quarantine; pct=30",
                none_here(),
                99,
                Policy::None,
            ),
            ("v=DMARC1; p=none; pct=0", none_here(), 50, Policy::None),
            (
                "v=DMARC1; p=reject; t=y",
                none_here(),
                0,
                Policy::Quarantine,
            ),
            ("v=DMARC1; p=quarantine; t=y", none_here(), 0, Policy::None),
            (
                "v=DMARC1; p=none",
                own("v=DMARC1; p=reject; pct=0"),
                0,
                Policy::Quarantine,
            ),
        ];
        for (text, own, roll, want) in table {
            assert_eq!(
                applied_policy(&record(text), Some(own), roll),
                want,
                "{text} {roll}"
            );
        }
        assert!((0..1000).map(|_| dmarc_roll()).all(|r| r < 100));
        let rolls: std::collections::HashSet<u8> = (0..1000).map(|_| dmarc_roll()).collect();
        assert!(rolls.len() > 50, "{rolls:?}");
    }

    #[test]
    fn from_addresses_dmarc_can_judge() {
        for (raw, want) in [
            ("ceo@bank.test", "ceo@bank.test"),
            ("ceo@bank.test.", "ceo@bank.test"),
            (" ceo@bank.test. ", "ceo@bank.test"),
            ("ceo@bank.test..", "ceo@bank.test."),
            ("ceo.@bank.test", "ceo.@bank.test"),
            ("ceo.", "ceo."),
        ] {
            let mut a = raw.to_string();
            normalize_from(&mut a);
            assert_eq!(a, want, "{raw:?}");
        }
        let long = format!("{}.test", "a".repeat(64));
        let longest = format!("{}.test", "a".repeat(63));
        for (domain, want) in [
            ("bank.test", true),
            ("mail.bank.test", true),
            ("xn--bcher-kva.test", true),
            ("bücher.test", true),
            (longest.as_str(), true),
            ("", false),
            ("bank", false),
            ("bank.test.", false),
            ("bank..test", false),
            ("bank\u{ff0e}test", false),
            ("mail.bank\u{3002}test", false),
            (".bank.test", false),
            ("bank\\.test", false),
            (long.as_str(), false),
        ] {
            assert_eq!(judgeable_domain(domain), want, "{domain:?}");
        }
        assert!(!judgeable_domain(&format!(
            "{}test",
            "abcdefghi.".repeat(25)
        )));
        for (field, want) in [
            ("ceo@evil.test(x).bank.example", true),
            ("ceo@evil.test (x) .bank.example", true),
            ("ceo@evil.test. bank.example", true),
            ("ceo@evil.test.(x)bank.example", true),
            (" <ceo@evil.test\r\n .bank.example>", true),
            ("ceo@evil.test(a (nested \\) one) b).bank.example", true),
            ("ceo@evil.test\".bank\".example", true),
            ("Bob <bob@bank.example>", false),
            ("bob@bank.example (Bob Smith)", false),
            ("bob@bank.example (Bob), eve@evil.test", false),
            ("bob@bank.example\r\n (folded comment)\r\n", false),
            ("\"ceo@evil.test. x\" <bob@bank.example>", false),
            ("(ceo@evil.test. .x) bob@bank.example", false),
            ("bob@bank.example via List <list@lists.example>", false),
            ("ceo@evil.test(unclosed .bank", false),
            ("ceo@evil.test\\", false),
            ("Team: a@x.example, b@y.example;", false),
            ("", false),
        ] {
            assert_eq!(
                domain_continues_past_a_gap(field.as_bytes()),
                want,
                "{field:?}"
            );
        }
        for (raw, want) in [
            (&b"From: a@b.example\r\n\r\nbody\r\n"[..], false),
            (b"From: a@b.example\r\n", false),
            (
                b"Subject: x\r\nX\r\nFrom: a@b.example\r\n\r\nbody\r\n",
                true,
            ),
        ] {
            let m = mail_auth::AuthenticatedMessage::parse(raw).unwrap();
            assert_eq!(
                header_block_cut_short(m.raw_message, m.body_offset as usize),
                want,
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        let one = |v: &'static str| vec![(&b"From"[..], v.as_bytes())];
        let from = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        for (headers, parsed, want) in [
            (
                one("Bob <bob@bank.example>"),
                from(&["bob@bank.example"]),
                false,
            ),
            (one("undisclosed-recipients:;"), from(&[]), false),
            (
                one("MAILER-DAEMON@mx.example (Mail Delivery System)"),
                from(&["mailer-daemon@mx.example"]),
                false,
            ),
            (
                one("\"Smith, Bob\" <Bob@Bank.Example.>"),
                from(&["bob@bank.example"]),
                false,
            ),
            (
                one("noreply@site.example <noreply@site.example>"),
                from(&["noreply@site.example"]),
                false,
            ),
            (
                one("=?utf-8?q?J=C3=B6rg?= <jorg@bank.example>"),
                from(&["jorg@bank.example"]),
                false,
            ),
            // An address where the parser found none; another domain in the text.
            (one("\"bob@bank.example\" <>"), from(&[]), true),
            (one("\"Bank <ceo@bank.example>"), from(&[]), true),
            (
                one("ceo@bank.example <x@evil.test>"),
                from(&["x@evil.test"]),
                true,
            ),
            (
                one("<ceo@bank.example>: x@evil.test;"),
                from(&["x@evil.test"]),
                true,
            ),
            // An `@` hidden in an encoded word.
            (
                one("=?utf-8?B?PGNlb0BiYW5rLmV4YW1wbGU+?=, <x@evil.test>"),
                from(&["x@evil.test"]),
                true,
            ),
            (one("<=?utf-8?q?ceo=40bank.example?=>"), from(&[]), true),
            (vec![], from(&[]), false),
            // Parsed as an empty group, or joined into one address with two `@`.
            (one("<ceo@bank.example>:"), from(&[]), true),
            (
                one("\"CEO\" <ceo@bank.example> x@evil.test"),
                from(&["ceo@bank.examplex@evil.test"]),
                true,
            ),
            (
                one("ceo@evil.test(x).bank.example"),
                from(&["ceo@evil.test"]),
                true,
            ),
            // Two fields, however written.
            (
                vec![
                    (&b"From"[..], &b"<ceo@bank.example>:"[..]),
                    (&b"fr om "[..], &b"x@evil.test"[..]),
                ],
                from(&["x@evil.test"]),
                true,
            ),
            (
                vec![
                    (&b"Sender"[..], &b"a@b.example"[..]),
                    (&b"From"[..], &b"x@y.example"[..]),
                ],
                from(&["x@y.example"]),
                false,
            ),
        ] {
            assert_eq!(
                from_fields_ambiguous(&headers, &parsed),
                want,
                "{headers:?} {parsed:?}"
            );
        }
    }

    #[test]
    fn whitelist_authentication_modes() {
        use crate::aswl::RequireAuth::{Aligned, Off, SpfOrDkim};
        let a = |spf: Option<&str>, dkim: &[&str], from: &str| Authenticated {
            spf: spf.map(str::to_string),
            dkim: dkim.iter().map(|d| d.to_string()).collect(),
            from: from.to_string(),
            ..Authenticated::default()
        };
        let none = a(None, &[], "");
        let spf = a(Some("partner.test"), &[], "");
        let bob = "bob@partner.test";
        let dkim_parent = a(None, &["partner.test"], "bob@mail.partner.test");
        let dkim_exact = a(None, &["partner.test"], bob);
        let dkim_other = a(None, &["evil.test"], bob);
        // Signed for partner.test, but From: is someone else there (a replay).
        let dkim_replay = a(None, &["partner.test"], "eve@partner.test");
        // (require, results, envelope sender, answer)
        let table = [
            (Off, None, bob, Some("")),
            (Aligned, None, bob, None),
            (Aligned, Some(&none), bob, None),
            (Aligned, Some(&spf), bob, Some("spf")),
            (Aligned, Some(&spf), "bob@other.test", None),
            (
                Aligned,
                Some(&dkim_parent),
                "bob@mail.partner.test",
                Some("dkim"),
            ),
            (SpfOrDkim, Some(&dkim_parent), "bob@mail.partner.test", None),
            (
                SpfOrDkim,
                Some(&dkim_exact),
                "Bob@Partner.test",
                Some("dkim"),
            ),
            (Aligned, Some(&dkim_other), bob, None),
            (Aligned, Some(&dkim_replay), bob, None),
            (Aligned, Some(&spf), "<>", None),
        ];
        for (require, auth, sender, want) in table {
            assert_eq!(
                whitelist_authentication(require, &Suffixes::default(), auth, sender),
                want,
                "{require:?} {auth:?} {sender}"
            );
        }
    }
}
