//! What the replication thread (`crate::replication`) shares with the cores and the admin
//! endpoint: the tap local changes go out through, and the counters `ringmx aswl stats` and
//! `/metrics` show. Unused (and free) in single-host mode.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// Apply delays kept for the percentiles (the most recent ones).
const DELAYS_KEPT: usize = 1 << 16;

#[derive(Debug, Default)]
pub struct Replica {
    /// Local changes (encoded change-log records) for the replication thread.
    tap: OnceLock<tokio::sync::mpsc::UnboundedSender<Vec<u8>>>,
    pub node: OnceLock<String>,
    pub connected: AtomicBool,
    /// Records sent to Redis (adds and removals).
    pub published: AtomicU64,
    /// Records from other nodes applied here.
    pub applied: AtomicU64,
    /// Records from other nodes not applied: expired, or covered by a removal.
    pub ignored: AtomicU64,
    /// Records waiting in the outbox.
    pub outbox: AtomicU64,
    /// Changes handed over by the cores and not yet in the outbox.
    pub queued: AtomicU64,
    /// Records dropped from a full outbox (republished from the whitelist when Redis returns).
    pub overflowed: AtomicU64,
    pub republished: AtomicU64,
    pub bootstraps: AtomicU64,
    pub bootstrap_records: AtomicU64,
    pub errors: AtomicU64,
    /// `last_sent` of the newest record applied from another node.
    pub newest_applied: AtomicU64,
    /// Milliseconds from a change reaching the publishing node's replication thread to its
    /// application here, for the most recent entries.
    delays: Mutex<VecDeque<u32>>,
    pub last_error: Mutex<String>,
    pub position: Mutex<String>,
}

impl Replica {
    /// Connect the tap (once, at startup).
    pub fn connect_tap(&self, tx: tokio::sync::mpsc::UnboundedSender<Vec<u8>>) {
        let _ = self.tap.set(tx);
    }

    /// Hand a local change to the replication thread (never blocks; no-op on a single host).
    pub fn publish(&self, record: &[u8]) {
        if let Some(tx) = self.tap.get() {
            // A closed channel means replication stopped with the server: nothing to do.
            if tx.send(record.to_vec()).is_ok() {
                self.queued.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn enabled(&self) -> bool {
        self.tap.get().is_some()
    }

    /// Seconds since the `last_sent` of the newest record applied from another node.
    pub fn lag_secs(&self) -> Option<u64> {
        match self.newest_applied.load(Ordering::Relaxed) {
            0 => None,
            t => Some(u64::from(super::unix_now()).saturating_sub(t)),
        }
    }

    pub fn note_delay(&self, ms: u64) {
        if let Ok(mut d) = self.delays.lock() {
            if d.len() >= DELAYS_KEPT {
                d.pop_front();
            }
            d.push_back(ms.min(u64::from(u32::MAX)) as u32);
        }
    }

    /// (p50, p99, max, samples) of the recent apply delays in milliseconds.
    pub fn delay_percentiles(&self) -> Option<(u32, u32, u32, usize)> {
        let mut v: Vec<u32> = self.delays.lock().ok()?.iter().copied().collect();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let at = |q: f64| {
            let i = ((v.len() as f64 - 1.0) * q).round() as usize;
            v.get(i).copied().unwrap_or(0)
        };
        Some((at(0.5), at(0.99), v.last().copied().unwrap_or(0), v.len()))
    }

    /// Record whether Redis answers; a change is logged once (not every retry).
    pub fn set_connected(&self, up: bool) {
        if self.connected.swap(up, Ordering::Relaxed) != up {
            if up {
                tracing::info!("aswl replication: Redis reachable");
            } else {
                let last = self
                    .last_error
                    .lock()
                    .map(|e| e.clone())
                    .unwrap_or_default();
                tracing::warn!(error = %last, "aswl replication: Redis unreachable; changes wait in the outbox, SMTP goes on");
            }
        }
    }

    pub fn error(&self, what: &str, e: &dyn std::fmt::Display) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let msg = format!("{what}: {e}");
        if let Ok(mut l) = self.last_error.lock() {
            *l = msg;
        }
    }
}
