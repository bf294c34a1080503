//! Counters for `/metrics`, written with relaxed atomics from the cores (no locks) and rendered
//! in the Prometheus text exposition format by the admin endpoint.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Why a message or recipient was refused, for `ringmx_rejected_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    RelayDenied,
    AuthRequired,
    TooBig,
    BareLineEnding,
    Nul,
    FoldedFirstLine,
    UnknownRecipient,
    Harvest,
    AccessDenied,
    Loop,
    Storage,
    NoRoute,
    TooManyConnections,
    Timeout,
    Busy,
    RateLimited,
    Listed,
    EarlyTalker,
    UnofferedPipelining,
    CalloutUnavailable,
    DmarcReject,
    SpfFail,
}

const REASONS: [(Reason, &str); 22] = [
    (Reason::RelayDenied, "relay_denied"),
    (Reason::AuthRequired, "auth_required"),
    (Reason::TooBig, "too_big"),
    (Reason::BareLineEnding, "bare_line_ending"),
    (Reason::Nul, "nul"),
    (Reason::FoldedFirstLine, "folded_first_line"),
    (Reason::UnknownRecipient, "unknown_recipient"),
    (Reason::Harvest, "harvest"),
    (Reason::AccessDenied, "access_denied"),
    (Reason::Loop, "loop"),
    (Reason::Storage, "storage"),
    (Reason::NoRoute, "no_route"),
    (Reason::TooManyConnections, "too_many_connections"),
    (Reason::Timeout, "timeout"),
    (Reason::Busy, "busy"),
    (Reason::RateLimited, "rate_limited"),
    (Reason::Listed, "dnsbl"),
    (Reason::EarlyTalker, "early_talker"),
    (Reason::UnofferedPipelining, "unoffered_pipelining"),
    (Reason::CalloutUnavailable, "callout_unavailable"),
    (Reason::DmarcReject, "dmarc_reject"),
    (Reason::SpfFail, "spf_fail"),
];

/// Upper bounds (seconds) of the session duration histogram.
const DURATION_BUCKETS: [f64; 9] = [0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0];

/// The `# HELP` and `# TYPE` lines of a metric family.
pub(crate) fn describe(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}");
    let _ = writeln!(o, "# TYPE {name} {kind}");
}

/// All counters.
#[derive(Debug)]
pub struct Metrics {
    bindings: Vec<String>,
    cores: usize,
    connections: Vec<AtomicU64>,
    open: AtomicI64,
    accepted: Vec<AtomicU64>,
    accepted_bytes: AtomicU64,
    rejected: [AtomicU64; REASONS.len()],
    tls_handshakes: AtomicU64,
    tls_failures: AtomicU64,
    auth_successes: AtomicU64,
    auth_failures: AtomicU64,
    duration_buckets: [AtomicU64; DURATION_BUCKETS.len()],
    duration_count: AtomicU64,
    duration_sum_us: AtomicU64,
    /// Per core: active, deferred, held.
    queue: Vec<[AtomicI64; 3]>,
    deliveries: [AtomicU64; DELIVERY_RESULTS.len()],
    queue_time_count: AtomicU64,
    queue_time_sum_ms: AtomicU64,
    commit: std::sync::Arc<crate::journal::CommitStats>,
    /// Relay connections opened, and transactions sent over a reused one.
    relay_opened: AtomicU64,
    relay_reused: AtomicU64,
    /// `[authentication]` results, by method and result.
    authentication: [[AtomicU64; AUTH_RESULTS.len()]; AUTH_METHODS.len()],
}

/// `ringmx_authentication_total{method,result}` labels.
pub const AUTH_METHODS: [&str; 3] = ["spf", "dkim", "dmarc"];
pub const AUTH_RESULTS: [&str; 8] = [
    "pass",
    "fail",
    "softfail",
    "neutral",
    "none",
    "temperror",
    "permerror",
    "policy",
];

/// `ringmx_deliveries_total{result}` labels.
const DELIVERY_RESULTS: [&str; 7] = [
    "delivered",
    "deferred",
    "failed",
    "expired",
    "discarded",
    "bounces_sent",
    "dropped",
];

fn zeros(n: usize) -> Vec<AtomicU64> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

impl Metrics {
    pub fn new(bindings: Vec<String>, cores: usize) -> Metrics {
        let cores = cores.max(1);
        Metrics {
            connections: zeros(bindings.len() * cores),
            accepted: zeros(bindings.len()),
            bindings,
            cores,
            open: AtomicI64::new(0),
            accepted_bytes: AtomicU64::new(0),
            rejected: Default::default(),
            tls_handshakes: AtomicU64::new(0),
            tls_failures: AtomicU64::new(0),
            auth_successes: AtomicU64::new(0),
            auth_failures: AtomicU64::new(0),
            duration_buckets: Default::default(),
            duration_count: AtomicU64::new(0),
            duration_sum_us: AtomicU64::new(0),
            queue: (0..cores).map(|_| Default::default()).collect(),
            deliveries: Default::default(),
            queue_time_count: AtomicU64::new(0),
            queue_time_sum_ms: AtomicU64::new(0),
            commit: Default::default(),
            relay_opened: AtomicU64::new(0),
            relay_reused: AtomicU64::new(0),
            authentication: Default::default(),
        }
    }

    /// Count one result of an authentication method (names as in [`AUTH_METHODS`] and
    /// [`AUTH_RESULTS`]; others are not counted).
    pub fn authentication(&self, method: &str, result: &str) {
        let m = AUTH_METHODS.iter().position(|x| *x == method);
        let r = AUTH_RESULTS.iter().position(|x| *x == result);
        if let (Some(m), Some(r)) = (m, r) {
            Self::add(self.authentication.get(m).and_then(|a| a.get(r)), 1);
        }
    }

    /// The index of a binding present at startup (bindings added by a reload are counted in the
    /// totals only).
    pub fn binding_index(&self, name: &str) -> Option<usize> {
        self.bindings.iter().position(|b| b == name)
    }

    fn add(c: Option<&AtomicU64>, n: u64) {
        if let Some(c) = c {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn connection_opened(&self, binding: usize, core: usize) {
        if binding < self.bindings.len() {
            Self::add(self.connections.get(binding * self.cores + core), 1);
        }
        self.open.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_closed(&self, seconds: f64) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        for (i, b) in DURATION_BUCKETS.iter().enumerate() {
            if seconds <= *b {
                Self::add(self.duration_buckets.get(i), 1);
            }
        }
        self.duration_count.fetch_add(1, Ordering::Relaxed);
        self.duration_sum_us
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    pub fn message_accepted(&self, binding: usize, bytes: u64) {
        Self::add(self.accepted.get(binding), 1);
        self.accepted_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A core's queue sizes (active, deferred, held).
    pub fn queue_size(&self, core: usize, sizes: [i64; 3]) {
        if let Some(q) = self.queue.get(core) {
            for (a, v) in q.iter().zip(sizes) {
                a.store(v, Ordering::Relaxed);
            }
        }
    }

    /// Recipients by delivery result (`delivered`, `deferred`, `failed`, …).
    pub fn delivery(&self, result: &str, n: u64) {
        if let Some(i) = DELIVERY_RESULTS.iter().position(|r| *r == result) {
            Self::add(self.deliveries.get(i), n);
        }
    }

    /// A relay connection was opened (`reused == false`) or an idle one carried a message.
    pub fn relay_connection(&self, reused: bool) {
        let c = if reused {
            &self.relay_reused
        } else {
            &self.relay_opened
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// A message left the queue after `seconds`.
    pub fn time_in_queue(&self, seconds: f64) {
        self.queue_time_count.fetch_add(1, Ordering::Relaxed);
        self.queue_time_sum_ms
            .fetch_add((seconds * 1000.0) as u64, Ordering::Relaxed);
    }

    /// The spool committers' statistics (shared with every core's committer).
    pub fn commit_stats(&self) -> std::sync::Arc<crate::journal::CommitStats> {
        self.commit.clone()
    }

    pub fn rejected(&self, reason: Reason) {
        let i = REASONS.iter().position(|(r, _)| *r == reason);
        Self::add(i.and_then(|i| self.rejected.get(i)), 1);
    }

    pub fn tls(&self, ok: bool) {
        let c = if ok {
            &self.tls_handshakes
        } else {
            &self.tls_failures
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn auth(&self, ok: bool) {
        let c = if ok {
            &self.auth_successes
        } else {
            &self.auth_failures
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text format.
    pub fn render(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut o = String::new();
        describe(
            &mut o,
            "ringmx_connections_total",
            "counter",
            "Connections accepted, by binding and core.",
        );
        for (b, name) in self.bindings.iter().enumerate() {
            for core in 0..self.cores {
                let v = self.connections.get(b * self.cores + core).map_or(0, get);
                let _ = writeln!(
                    o,
                    "ringmx_connections_total{{binding=\"{name}\",core=\"{core}\"}} {v}"
                );
            }
        }
        describe(
            &mut o,
            "ringmx_connections_open",
            "gauge",
            "Connections open now.",
        );
        let _ = writeln!(
            o,
            "ringmx_connections_open {}",
            self.open.load(Ordering::Relaxed)
        );
        describe(
            &mut o,
            "ringmx_messages_accepted_total",
            "counter",
            "Messages made durable and answered 250.",
        );
        for (b, name) in self.bindings.iter().enumerate() {
            let _ = writeln!(
                o,
                "ringmx_messages_accepted_total{{binding=\"{name}\"}} {}",
                self.accepted.get(b).map_or(0, get)
            );
        }
        describe(
            &mut o,
            "ringmx_message_bytes_total",
            "counter",
            "Bytes of accepted messages.",
        );
        let _ = writeln!(
            o,
            "ringmx_message_bytes_total {}",
            get(&self.accepted_bytes)
        );
        describe(
            &mut o,
            "ringmx_rejected_total",
            "counter",
            "Refusals (recipients, messages, connections) by reason.",
        );
        for (i, (_, name)) in REASONS.iter().enumerate() {
            let _ = writeln!(
                o,
                "ringmx_rejected_total{{reason=\"{name}\"}} {}",
                self.rejected.get(i).map_or(0, get)
            );
        }
        describe(
            &mut o,
            "ringmx_tls_handshakes_total",
            "counter",
            "TLS handshakes by result.",
        );
        let _ = writeln!(
            o,
            "ringmx_tls_handshakes_total{{result=\"ok\"}} {}",
            get(&self.tls_handshakes)
        );
        let _ = writeln!(
            o,
            "ringmx_tls_handshakes_total{{result=\"failed\"}} {}",
            get(&self.tls_failures)
        );
        describe(
            &mut o,
            "ringmx_auth_total",
            "counter",
            "SMTP AUTH attempts by result.",
        );
        let _ = writeln!(
            o,
            "ringmx_auth_total{{result=\"ok\"}} {}",
            get(&self.auth_successes)
        );
        let _ = writeln!(
            o,
            "ringmx_auth_total{{result=\"failed\"}} {}",
            get(&self.auth_failures)
        );
        describe(
            &mut o,
            "ringmx_session_duration_seconds",
            "histogram",
            "Connection durations.",
        );
        for (i, b) in DURATION_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                o,
                "ringmx_session_duration_seconds_bucket{{le=\"{b}\"}} {}",
                self.duration_buckets.get(i).map_or(0, get)
            );
        }
        let count = get(&self.duration_count);
        let _ = writeln!(
            o,
            "ringmx_session_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            o,
            "ringmx_session_duration_seconds_sum {}",
            get(&self.duration_sum_us) as f64 / 1e6
        );
        let _ = writeln!(o, "ringmx_session_duration_seconds_count {count}");
        self.render_queue(&mut o);
        self.render_authentication(&mut o);
        o
    }

    fn render_authentication(&self, o: &mut String) {
        describe(
            o,
            "ringmx_authentication_total",
            "counter",
            "SPF, DKIM (per signature) and DMARC results of inbound messages.",
        );
        for (m, method) in AUTH_METHODS.iter().enumerate() {
            for (r, result) in AUTH_RESULTS.iter().enumerate() {
                let v = self
                    .authentication
                    .get(m)
                    .and_then(|a| a.get(r))
                    .map_or(0, |c| c.load(Ordering::Relaxed));
                let _ = writeln!(
                    o,
                    "ringmx_authentication_total{{method=\"{method}\",result=\"{result}\"}} {v}"
                );
            }
        }
    }

    fn render_queue(&self, o: &mut String) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        describe(
            o,
            "ringmx_queue_messages",
            "gauge",
            "Messages in the queue by state.",
        );
        for (i, state) in ["active", "deferred", "held"].iter().enumerate() {
            let v: i64 = self
                .queue
                .iter()
                .map(|q| q.get(i).map_or(0, |a| a.load(Ordering::Relaxed)))
                .sum();
            let _ = writeln!(o, "ringmx_queue_messages{{state=\"{state}\"}} {v}");
        }
        describe(
            o,
            "ringmx_deliveries_total",
            "counter",
            "Recipients by delivery attempt result.",
        );
        for (i, r) in DELIVERY_RESULTS.iter().enumerate() {
            let _ = writeln!(
                o,
                "ringmx_deliveries_total{{result=\"{r}\"}} {}",
                self.deliveries.get(i).map_or(0, get)
            );
        }
        describe(
            o,
            "ringmx_queue_time_seconds",
            "summary",
            "Time messages spent in the queue.",
        );
        let _ = writeln!(
            o,
            "ringmx_queue_time_seconds_sum {}",
            get(&self.queue_time_sum_ms) as f64 / 1e3
        );
        let _ = writeln!(
            o,
            "ringmx_queue_time_seconds_count {}",
            get(&self.queue_time_count)
        );
        describe(
            o,
            "ringmx_relay_connections_total",
            "counter",
            "Connections to next hops opened, and reuses of idle ones.",
        );
        let _ = writeln!(
            o,
            "ringmx_relay_connections_total{{event=\"opened\"}} {}",
            get(&self.relay_opened)
        );
        let _ = writeln!(
            o,
            "ringmx_relay_connections_total{{event=\"reused\"}} {}",
            get(&self.relay_reused)
        );
        let c = &self.commit;
        describe(
            o,
            "ringmx_spool_commits_total",
            "counter",
            "fdatasync batches.",
        );
        let _ = writeln!(o, "ringmx_spool_commits_total {}", get(&c.commits));
        describe(
            o,
            "ringmx_spool_committed_total",
            "counter",
            "Appends made durable (sum of batch sizes).",
        );
        let _ = writeln!(o, "ringmx_spool_committed_total {}", get(&c.committed));
        describe(
            o,
            "ringmx_spool_commit_seconds_total",
            "counter",
            "Time spent in fdatasync.",
        );
        let _ = writeln!(
            o,
            "ringmx_spool_commit_seconds_total {}",
            get(&c.latency_us) as f64 / 1e6
        );
        describe(
            o,
            "ringmx_spool_commit_batch_max",
            "gauge",
            "Largest batch so far.",
        );
        let _ = writeln!(o, "ringmx_spool_commit_batch_max {}", get(&c.max_batch));
        describe(
            o,
            "ringmx_spool_errors_total",
            "counter",
            "Failed commits (answered 451).",
        );
        let _ = writeln!(o, "ringmx_spool_errors_total {}", get(&c.errors));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters() {
        let m = Metrics::new(vec!["in".into(), "out".into()], 2);
        m.connection_opened(1, 1);
        m.message_accepted(1, 100);
        m.rejected(Reason::RelayDenied);
        m.connection_closed(0.2);
        let t = m.render();
        assert!(
            t.contains("ringmx_connections_total{binding=\"out\",core=\"1\"} 1\n"),
            "{t}"
        );
        assert!(t.contains("ringmx_connections_total{binding=\"in\",core=\"0\"} 0\n"));
        assert!(t.contains("ringmx_messages_accepted_total{binding=\"out\"} 1\n"));
        assert!(t.contains("ringmx_rejected_total{reason=\"relay_denied\"} 1\n"));
        assert!(t.contains("ringmx_session_duration_seconds_bucket{le=\"0.1\"} 0\n"));
        assert!(t.contains("ringmx_session_duration_seconds_bucket{le=\"0.5\"} 1\n"));
        assert!(t.contains("ringmx_connections_open 0\n"));
    }
}
