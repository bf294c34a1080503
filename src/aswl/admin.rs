//! `ringmx aswl …`: the operations behind the admin endpoint's `/aswl/…` and the offline CLI.
//!
//! Both call [`run`] with an open [`Aswl`]: the server with its own, the CLI with the data
//! directory opened while the server is stopped (the directory lock keeps the two apart).
//! Changes (add, remove, import) are applied to memory and written to the admin change log with
//! an `fdatasync` before the answer.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use super::detect::Masks;
use super::persist::encode_log;
use super::store::Record;
use super::{Aswl, Pair, Settings, Verdict, unix_now};
use crate::delivery::trace::for_terminal;
use crate::delivery::trace::rfc5322_date;

/// An operation and its arguments (from the query string or the command line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Stats,
    Check {
        sender: String,
        rcpt: String,
    },
    List {
        local: Option<String>,
        external: Option<String>,
    },
    Add {
        local: String,
        external: String,
    },
    Remove {
        external: String,
        local: Option<String>,
    },
    Import,
    Export {
        jsonl: bool,
    },
}

/// A failed operation: its kind (an HTTP status) and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The request is malformed (HTTP 400).
    BadRequest(String),
    /// No such request or record (HTTP 404).
    NotFound(String),
    /// The change could not be written (HTTP 500).
    Storage(String),
}

impl Failure {
    /// The HTTP status it is answered with.
    pub fn status(&self) -> u16 {
        match self {
            Failure::BadRequest(_) => 400,
            Failure::NotFound(_) => 404,
            Failure::Storage(_) => 500,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::BadRequest(m) | Failure::NotFound(m) | Failure::Storage(m) => f.write_str(m),
        }
    }
}

fn when(t: u32) -> String {
    rfc5322_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::from(t)))
}

/// Run `op`; `body` is the import data.
pub fn run(a: &Aswl, s: &Settings, op: &Op, body: &[u8]) -> Result<String, Failure> {
    match op {
        Op::Stats => Ok(stats(a, s)),
        Op::Check { sender, rcpt } => {
            let (v, why) = a.explain(s, sender, rcpt, unix_now());
            let word = match v {
                Verdict::Pass { .. } => "pass",
                Verdict::None => "none",
                Verdict::Excepted(_) => "none (exception)",
            };
            let domain = sender.rsplit_once('@').map_or("", |(_, d)| d);
            let needs = match (s.require_authentication, &v) {
                (crate::aswl::RequireAuth::Off, _) | (_, Verdict::None | Verdict::Excepted(_)) => {
                    String::new()
                }
                (crate::aswl::RequireAuth::Aligned, _) => format!(
                    "authentication: required (aligned): the pass counts only for a message with an SPF pass for {domain} or a DKIM signature passing for a domain of the same organization; otherwise: none reason=unauthenticated\n"
                ),
                (crate::aswl::RequireAuth::SpfOrDkim, _) => format!(
                    "authentication: required (spf-or-dkim): the pass counts only for a message with an SPF pass for {domain} or a DKIM signature passing for {domain}; otherwise: none reason=unauthenticated\n"
                ),
            };
            Ok(format!(
                "verdict: {word}\nmode: {}\n{why}\n{needs}",
                s.mode.as_str()
            ))
        }
        Op::List { local, external } => {
            let lm = local.as_deref().map(masks).transpose()?;
            let xm = external.as_deref().map(masks).transpose()?;
            let mut recs: Vec<Record> = a
                .store
                .records()
                .into_iter()
                .filter(|r| lm.as_ref().is_none_or(|m| m.matching(&r.local).is_some()))
                .filter(|r| {
                    xm.as_ref()
                        .is_none_or(|m| m.matching(&r.external).is_some())
                })
                .collect();
            recs.sort_by(|x, y| (&x.local, &x.external).cmp(&(&y.local, &y.external)));
            let cutoff = s.cutoff(unix_now());
            let mut out = String::new();
            for r in &recs {
                let state = if r.last_sent >= cutoff {
                    ""
                } else {
                    " (expired)"
                };
                let _ = writeln!(
                    out,
                    "{}\t{}\t{}{state}",
                    for_terminal(&r.local_original),
                    for_terminal(&r.external_original),
                    when(r.last_sent)
                );
            }
            let _ = writeln!(out, "{} record(s)", recs.len());
            Ok(out)
        }
        Op::Add { local, external } => {
            let p = pair(s, local, external)?;
            let now = unix_now();
            a.apply(s, std::slice::from_ref(&p), now);
            a.log_admin(&encode_log(false, now, std::slice::from_ref(&p)))
                .map_err(io_failure)?;
            Ok(format!("added {} -> {}\n", p.local, p.external))
        }
        Op::Remove { external, local } => {
            let ext = s
                .normalize
                .external(external)
                .ok_or(Failure::BadRequest(format!(
                    "{external:?} is not an address"
                )))?;
            let loc = match local {
                Some(l) => Some(
                    s.normalize
                        .local(l)
                        .ok_or(Failure::BadRequest(format!("{l:?} is not an address")))?,
                ),
                None => None,
            };
            let now = unix_now();
            let n = a.store.remove(loc.as_deref(), &ext, now);
            let p = Pair {
                local: loc.unwrap_or_default(),
                local_original: String::new(),
                external: ext,
                external_original: String::new(),
            };
            a.log_admin(&encode_log(true, now, &[p]))
                .map_err(io_failure)?;
            Ok(format!("removed {n} record(s)\n"))
        }
        Op::Import => import(a, s, body),
        Op::Export { jsonl } => {
            let mut recs = a.store.records();
            recs.sort_by(|x, y| (&x.local, &x.external).cmp(&(&y.local, &y.external)));
            let mut out = String::new();
            if !jsonl {
                out.push_str("local,external,last_sent,local_original,external_original\n");
            }
            for r in &recs {
                if *jsonl {
                    let v = serde_json::json!({
                        "local": r.local, "external": r.external, "last_sent": r.last_sent,
                        "local_original": r.local_original, "external_original": r.external_original,
                    });
                    let _ = writeln!(out, "{v}");
                } else {
                    let _ = writeln!(
                        out,
                        "{},{},{},{},{}",
                        csv(&r.local),
                        csv(&r.external),
                        r.last_sent,
                        csv(&r.local_original),
                        csv(&r.external_original)
                    );
                }
            }
            Ok(out)
        }
    }
}

fn io_failure(e: std::io::Error) -> Failure {
    Failure::Storage(format!("cannot write the change log: {e}"))
}

fn masks(m: &str) -> Result<Masks, Failure> {
    Masks::new(&[m], true).map_err(|e| Failure::BadRequest(format!("bad mask: {}", e.0)))
}

fn pair(s: &Settings, local: &str, external: &str) -> Result<Pair, Failure> {
    Ok(Pair {
        local: s
            .normalize
            .local(local)
            .ok_or(Failure::BadRequest(format!("{local:?} is not an address")))?,
        local_original: local.to_string(),
        external: s
            .normalize
            .external(external)
            .ok_or(Failure::BadRequest(format!(
                "{external:?} is not an address"
            )))?,
        external_original: external.to_string(),
    })
}

fn csv(v: &str) -> String {
    if v.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v.to_string()
    }
}

/// Split one CSV line (quotes with doubled `""`).
fn csv_fields(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => out.push(std::mem::take(&mut cur)),
            (c, _) => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// CSV (`local,external[,last_sent[,…]]`, header optional) or JSON lines (`{"local": …,
/// "external": …, "last_sent": …}`), as written by export. Originals are taken from the
/// `*_original` columns when present. Every line is checked before anything is applied.
fn import(a: &Aswl, s: &Settings, body: &[u8]) -> Result<String, Failure> {
    let text = std::str::from_utf8(body)
        .map_err(|_| Failure::BadRequest("import data is not UTF-8".to_string()))?;
    let now = unix_now();
    let mut rows: Vec<(u32, Pair)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with("local,") {
            continue;
        }
        let bad = |m: String| Failure::BadRequest(format!("line {}: {m}", i + 1));
        let (local, external, t, lo, xo) = if line.starts_with('{') {
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
            let get = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
            (
                get("local").ok_or_else(|| bad("no \"local\"".into()))?,
                get("external").ok_or_else(|| bad("no \"external\"".into()))?,
                v.get("last_sent")
                    .and_then(|x| x.as_u64())
                    .map(|t| t as u32),
                get("local_original"),
                get("external_original"),
            )
        } else {
            let f = csv_fields(line);
            let (Some(l), Some(x)) = (f.first(), f.get(1)) else {
                return Err(bad("expected local,external[,last_sent]".into()));
            };
            let t = match f.get(2).map(|t| t.trim()).filter(|t| !t.is_empty()) {
                Some(t) => Some(
                    t.parse::<u32>()
                        .map_err(|_| bad(format!("last_sent {t:?} is not a Unix time")))?,
                ),
                None => None,
            };
            (
                l.clone(),
                x.clone(),
                t,
                f.get(3).cloned(),
                f.get(4).cloned(),
            )
        };
        let mut p = pair(s, &local, &external).map_err(|f| bad(f.to_string()))?;
        if let Some(o) = lo.filter(|o| !o.is_empty()) {
            p.local_original = o;
        }
        if let Some(o) = xo.filter(|o| !o.is_empty()) {
            p.external_original = o;
        }
        rows.push((t.unwrap_or(now).min(now), p));
    }
    let mut added = 0;
    for chunk in rows.chunk_by(|x, y| x.0 == y.0) {
        let t = chunk.first().map_or(now, |c| c.0);
        let pairs: Vec<Pair> = chunk.iter().map(|(_, p)| p.clone()).collect();
        for part in pairs.chunks(4096) {
            a.apply(s, part, t);
            a.log_admin(&encode_log(false, t, part))
                .map_err(io_failure)?;
            added += part.len();
        }
    }
    Ok(format!("imported {added} record(s)\n"))
}

fn stats(a: &Aswl, s: &Settings) -> String {
    let (locals, externals, per_domain) = a.store.counts();
    let c = &a.counters;
    let r = &a.disk.recovered;
    let snap = &a.disk.snapshots;
    let g = |x: &std::sync::atomic::AtomicU64| x.load(Ordering::Relaxed);
    let mut o = String::new();
    let _ = writeln!(o, "mode: {}", s.mode.as_str());
    let _ = writeln!(
        o,
        "lifetime: {}",
        s.lifetime
            .map_or("off".into(), |l| format!("{} s", l.as_secs()))
    );
    let _ = writeln!(o, "records: {}", a.store.len());
    let _ = writeln!(o, "local addresses: {locals}");
    let _ = writeln!(o, "external addresses: {externals}");
    let _ = writeln!(o, "per-domain entries: {per_domain}");
    for (i, m) in ["global", "per-domain", "per-recipient"].iter().enumerate() {
        let _ = writeln!(
            o,
            "checks {m}: {} pass, {} none",
            c.hits.get(i).map_or(0, g),
            c.misses.get(i).map_or(0, g)
        );
    }
    let _ = writeln!(o, "checks excepted: {}", g(&c.excepted));
    let _ = writeln!(
        o,
        "collected: {} added, {} refreshed",
        g(&c.added),
        g(&c.refreshed)
    );
    let _ = writeln!(
        o,
        "not collected: {} ip exception, {} automatic/bulk/subject, {} auto-response window",
        g(&c.skipped_ip),
        g(&c.skipped_auto),
        g(&c.skipped_window)
    );
    let _ = writeln!(o, "swept: {}", g(&c.swept));
    let _ = writeln!(
        o,
        "snapshots: {} written, last {} records, {} bytes, {} ms",
        g(&snap.count),
        g(&snap.last_records),
        g(&snap.last_bytes),
        g(&snap.last_ms)
    );
    let _ = writeln!(
        o,
        "startup: {} records from snapshot, {} log records, {} damaged snapshot blocks, {} damaged log ranges, fell back to previous snapshot: {}, {} ms",
        r.snapshot_records,
        r.log_records,
        r.bad_snapshot_blocks,
        r.bad_log_ranges,
        r.fell_back_to_previous,
        r.load_ms
    );
    replication_stats(a, &mut o);
    o
}

fn replication_stats(a: &Aswl, o: &mut String) {
    let r = &a.replica;
    if !r.enabled() {
        let _ = writeln!(o, "replication: off (single host)");
        return;
    }
    if r.node.get().is_none() {
        let _ = writeln!(
            o,
            "replication: on; offline view (changes made here wait in the outbox for the next start)"
        );
        return;
    }
    let g = |x: &std::sync::atomic::AtomicU64| x.load(Ordering::Relaxed);
    let lock = |m: &std::sync::Mutex<String>| m.lock().map(|s| s.clone()).unwrap_or_default();
    let _ = writeln!(
        o,
        "replication: node {}, Redis {}, stream position {}",
        r.node.get().map_or("?", String::as_str),
        if r.connected.load(Ordering::Relaxed) {
            "connected"
        } else {
            "unreachable"
        },
        lock(&r.position)
    );
    let _ = writeln!(
        o,
        "replication records: {} published, {} applied, {} ignored (expired or removed), {} republished",
        g(&r.published),
        g(&r.applied),
        g(&r.ignored),
        g(&r.republished)
    );
    let _ = writeln!(
        o,
        "replication outbox: {} records waiting, {} dropped when full (republished); {} changes on their way to it",
        g(&r.outbox),
        g(&r.overflowed),
        g(&r.queued)
    );
    let _ = writeln!(
        o,
        "replication bootstraps: {} ({} records)",
        g(&r.bootstraps),
        g(&r.bootstrap_records)
    );
    let _ = writeln!(
        o,
        "replication lag: {}; {}",
        match r.lag_secs() {
            None => "nothing applied yet".to_string(),
            Some(l) => format!("newest applied record last sent {l} s ago"),
        },
        match r.delay_percentiles() {
            Some((p50, p99, max, n)) => format!(
                "publish to apply p50 {p50} ms, p99 {p99} ms, max {max} ms (last {n} entries)"
            ),
            None => "no entries from other nodes yet".into(),
        }
    );
    let _ = writeln!(
        o,
        "replication errors: {}{}",
        g(&r.errors),
        match lock(&r.last_error) {
            e if e.is_empty() => String::new(),
            e => format!(" (last: {e})"),
        }
    );
}

fn replication_metrics(a: &Aswl) -> Vec<Family> {
    let r = &a.replica;
    if !r.enabled() {
        return Vec::new();
    }
    let g = |x: &std::sync::atomic::AtomicU64| x.load(Ordering::Relaxed);
    let one = |v: u64| vec![(String::new(), v)];
    let (p50, p99) = r.delay_percentiles().map_or((0, 0), |(a, b, _, _)| (a, b));
    vec![
        (
            "ringmx_aswl_replication_connected",
            "gauge",
            "1 when the last Redis operation succeeded.",
            one(u64::from(r.connected.load(Ordering::Relaxed))),
        ),
        (
            "ringmx_aswl_replication_published_total",
            "counter",
            "Records sent to Redis (adds and removals, republished ones included).",
            one(g(&r.published)),
        ),
        (
            "ringmx_aswl_replication_applied_total",
            "counter",
            "Records from other nodes applied here.",
            one(g(&r.applied)),
        ),
        (
            "ringmx_aswl_replication_ignored_total",
            "counter",
            "Records from other nodes not applied (expired, or covered by a removal).",
            one(g(&r.ignored)),
        ),
        (
            "ringmx_aswl_replication_outbox_records",
            "gauge",
            "Local records waiting for Redis.",
            one(g(&r.outbox)),
        ),
        (
            "ringmx_aswl_replication_queued_changes",
            "gauge",
            "Changes handed over by the cores, not yet in the outbox.",
            one(g(&r.queued)),
        ),
        (
            "ringmx_aswl_replication_errors_total",
            "counter",
            "Redis and outbox errors.",
            one(g(&r.errors)),
        ),
        (
            "ringmx_aswl_replication_lag_seconds",
            "gauge",
            "Now minus last_sent of the newest record applied from another node.",
            one(r.lag_secs().unwrap_or(0)),
        ),
        (
            "ringmx_aswl_replication_apply_delay_milliseconds",
            "gauge",
            "From a change reaching the publishing node's replication thread to its application here (recent entries).",
            vec![
                ("{quantile=\"0.5\"}".into(), u64::from(p50)),
                ("{quantile=\"0.99\"}".into(), u64::from(p99)),
            ],
        ),
        (
            "ringmx_aswl_replication_bootstraps_total",
            "counter",
            "Loads of the whole record set from Redis.",
            one(g(&r.bootstraps)),
        ),
    ]
}

/// A metric family: name, type, help, (labels, value) samples.
type Family = (&'static str, &'static str, &'static str, Vec<(String, u64)>);

/// Prometheus lines for the whitelist.
pub fn metrics(a: &Aswl, o: &mut String) {
    let c = &a.counters;
    let g = |x: &std::sync::atomic::AtomicU64| x.load(Ordering::Relaxed);
    let mut checks = Vec::new();
    for (i, m) in ["global", "per-domain", "per-recipient"].iter().enumerate() {
        for (verdict, set) in [("pass", &c.hits), ("none", &c.misses)] {
            let n = set.get(i).map_or(0, g);
            checks.push((format!("{{mode=\"{m}\",verdict=\"{verdict}\"}}"), n));
        }
    }
    let one = |v: u64| vec![(String::new(), v)];
    let families: [Family; 7] = [
        (
            "ringmx_aswl_records",
            "gauge",
            "Whitelist records (local sender, external address).",
            one(a.store.len() as u64),
        ),
        (
            "ringmx_aswl_checks_total",
            "counter",
            "Inbound recipient checks by mode and verdict.",
            checks,
        ),
        (
            "ringmx_aswl_excepted_total",
            "counter",
            "Checks decided by an exception (null sender, local domain, check_exceptions).",
            one(g(&c.excepted)),
        ),
        (
            "ringmx_aswl_collected_total",
            "counter",
            "Records written by outbound mail.",
            vec![
                ("{result=\"added\"}".into(), g(&c.added)),
                ("{result=\"refreshed\"}".into(), g(&c.refreshed)),
            ],
        ),
        (
            "ringmx_aswl_not_collected_total",
            "counter",
            "Outbound mail or recipients not collected, by reason.",
            vec![
                ("{reason=\"ip\"}".into(), g(&c.skipped_ip)),
                ("{reason=\"automatic\"}".into(), g(&c.skipped_auto)),
                (
                    "{reason=\"auto_response_window\"}".into(),
                    g(&c.skipped_window),
                ),
            ],
        ),
        (
            "ringmx_aswl_swept_total",
            "counter",
            "Expired records removed by the sweep.",
            one(g(&c.swept)),
        ),
        (
            "ringmx_aswl_snapshots_total",
            "counter",
            "Snapshots written.",
            one(g(&a.disk.snapshots.count)),
        ),
    ];
    for (name, kind, help, values) in families.into_iter().chain(replication_metrics(a)) {
        crate::metrics::describe(o, name, kind, help);
        for (labels, v) in values {
            let _ = writeln!(o, "{name}{labels} {v}");
        }
    }
}

/// Percent-decoding of a query-string value (`+` is a space).
pub fn url_decode(s: &str) -> String {
    String::from_utf8_lossy(&super::detect::unescape_hex(s.as_bytes(), b'%', b'+')).into_owned()
}

/// Percent-encoding for a query-string value.
pub fn url_encode(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~@".contains(&b) {
            o.push(b as char);
        } else {
            let _ = write!(o, "%{b:02X}");
        }
    }
    o
}

/// The operation named by an admin path and query (`/aswl/check?sender=…&rcpt=…`).
pub fn parse_request(method: &str, path: &str) -> Result<Op, Failure> {
    let (p, q) = path.split_once('?').unwrap_or((path, ""));
    let params: Vec<(String, String)> = q
        .split('&')
        .filter(|x| !x.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (url_decode(k), url_decode(v))
        })
        .collect();
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let need = |k: &str| get(k).ok_or(Failure::BadRequest(format!("missing parameter {k}")));
    match (method, p.trim_end_matches('/')) {
        ("GET", "/aswl" | "/aswl/stats") => Ok(Op::Stats),
        ("GET", "/aswl/check") => Ok(Op::Check {
            sender: need("sender")?,
            rcpt: need("rcpt")?,
        }),
        ("GET", "/aswl/list") => Ok(Op::List {
            local: get("local"),
            external: get("external"),
        }),
        ("GET", "/aswl/export") => Ok(Op::Export {
            jsonl: get("format").as_deref() == Some("jsonl"),
        }),
        ("POST", "/aswl/add") => Ok(Op::Add {
            local: need("local")?,
            external: need("external")?,
        }),
        ("POST", "/aswl/remove") => Ok(Op::Remove {
            external: need("external")?,
            local: get("local"),
        }),
        ("POST", "/aswl/import") => Ok(Op::Import),
        _ => Err(Failure::NotFound("no such whitelist request".into())),
    }
}

/// The admin path and method for `op` (the inverse of [`parse_request`]).
pub fn request_path(op: &Op) -> (&'static str, String) {
    let e = |s: &str| url_encode(s);
    match op {
        Op::Stats => ("GET", "/aswl/stats".into()),
        Op::Check { sender, rcpt } => (
            "GET",
            format!("/aswl/check?sender={}&rcpt={}", e(sender), e(rcpt)),
        ),
        Op::List { local, external } => {
            let mut q = Vec::new();
            if let Some(l) = local {
                q.push(format!("local={}", e(l)));
            }
            if let Some(x) = external {
                q.push(format!("external={}", e(x)));
            }
            ("GET", format!("/aswl/list?{}", q.join("&")))
        }
        Op::Export { jsonl } => (
            "GET",
            format!(
                "/aswl/export?format={}",
                if *jsonl { "jsonl" } else { "csv" }
            ),
        ),
        Op::Add { local, external } => (
            "POST",
            format!("/aswl/add?local={}&external={}", e(local), e(external)),
        ),
        Op::Remove { external, local } => (
            "POST",
            match local {
                Some(l) => format!("/aswl/remove?external={}&local={}", e(external), e(l)),
                None => format!("/aswl/remove?external={}", e(external)),
            },
        ),
        Op::Import => ("POST", "/aswl/import".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for op in [
            Op::Stats,
            Op::Check {
                sender: "a b+c@x.test".into(),
                rcpt: "é@y.test".into(),
            },
            Op::List {
                local: Some("*@a.test".into()),
                external: None,
            },
            Op::Export { jsonl: true },
            Op::Add {
                local: "l@a.test".into(),
                external: "x&y@e.test".into(),
            },
            Op::Remove {
                external: "x@e.test".into(),
                local: Some("l@a.test".into()),
            },
            Op::Import,
        ] {
            let (m, p) = request_path(&op);
            assert_eq!(parse_request(m, &p), Ok(op));
        }
        assert!(parse_request("GET", "/aswl/check?sender=x").is_err());
    }

    #[test]
    fn csv_fields_with_quotes() {
        assert_eq!(csv_fields("a,\"b,\"\"c\"\"\",3"), vec!["a", "b,\"c\"", "3"]);
        assert_eq!(csv("x,\"y\""), "\"x,\"\"y\"\"\"");
    }
}
