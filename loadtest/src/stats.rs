//! What one thread measured, merged at the end: HDR histograms per step, replies by code.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;

/// The steps whose latency is recorded (microseconds).
pub const STEPS: [&str; 7] = [
    "connect", "greeting", "ehlo", "mail", "rcpt", "data", "final",
];

#[derive(Debug)]
pub struct Stats {
    pub hist: Vec<Histogram<u64>>,
    pub replies: BTreeMap<u16, u64>,
    pub ok: u64,
    pub failed: u64,
    pub bytes: u64,
    pub connect_errors: u64,
    /// TLS handshakes that resumed a session.
    pub tls_resumed: u64,
    pub errors: BTreeMap<String, u64>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            hist: STEPS
                .iter()
                // 1 µs .. 1 hour, 3 significant digits.
                .map(|_| Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"))
                .collect(),
            replies: BTreeMap::new(),
            ok: 0,
            failed: 0,
            bytes: 0,
            connect_errors: 0,
            tls_resumed: 0,
            errors: BTreeMap::new(),
        }
    }
}

impl Stats {
    pub fn record(&mut self, step: usize, micros: u64) {
        if let Some(h) = self.hist.get_mut(step) {
            h.saturating_record(micros.max(1));
        }
    }

    pub fn reply(&mut self, code: u16) {
        *self.replies.entry(code).or_default() += 1;
    }

    pub fn error(&mut self, what: String) {
        *self.errors.entry(what).or_default() += 1;
    }

    pub fn merge(&mut self, other: &Stats) {
        for (a, b) in self.hist.iter_mut().zip(&other.hist) {
            let _ = a.add(b);
        }
        for (k, v) in &other.replies {
            *self.replies.entry(*k).or_default() += v;
        }
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
        self.ok += other.ok;
        self.failed += other.failed;
        self.bytes += other.bytes;
        self.connect_errors += other.connect_errors;
        self.tls_resumed += other.tls_resumed;
    }
}
