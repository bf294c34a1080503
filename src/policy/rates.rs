//! Rate limits per client network (`[rates]`): new connections, messages, recipients and
//! unknown recipients per minute, like Postfix's anvil limits.
//!
//! Each limit is a fixed table of cells shared by every core and updated lock-free (one
//! compare-and-swap). A cell holds a GCRA state — the "theoretical arrival time" of the next
//! event, in milliseconds of a clock the caller passes in — tagged with 16 bits of the
//! network's hash. A network whose cell holds another network's tag takes the cell over with
//! a fresh allowance. Memory is fixed at startup (8 bytes a cell, `table_size` cells a limit),
//! whatever the number of sources: an attacker with a million addresses evicts other
//! networks' cells, which gives those networks a fresh allowance (the limits get more
//! lenient, never stricter, for anyone sharing a cell), while each of the attacker's own
//! networks is still limited as long as its cell survives.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::RatesSection;
use crate::replication::fleet::{Fleet, Net};
use crate::units::{Cidr, any_contains};

const TAG_BITS: u32 = 16;
const TIME_MASK: u64 = (1 << (64 - TAG_BITS)) - 1;

/// One limit: `per_minute` events per network and minute, with bursts of `burst`.
#[derive(Debug)]
pub struct Limit {
    cells: Box<[AtomicU64]>,
    /// Milliseconds between events at the sustained rate.
    interval: u64,
    /// How far ahead of the clock the next-event time may run (the burst).
    tolerance: u64,
}

impl Limit {
    /// `per_minute` > 0; `burst` ≥ 1 events may come at once; `cells` is rounded up to a
    /// power of two.
    pub fn new(per_minute: u32, burst: u32, cells: usize) -> Limit {
        let interval = (60_000 / u64::from(per_minute.max(1))).max(1);
        Limit {
            cells: (0..cells.max(1).next_power_of_two())
                .map(|_| AtomicU64::new(0))
                .collect(),
            interval,
            tolerance: interval * u64::from(burst.max(1) - 1),
        }
    }

    /// Count one event of the network hashed to `h` at `now_ms`; `false` when it is over the
    /// limit (the event is then not counted).
    pub fn take(&self, h: u64, now_ms: u64) -> bool {
        let Some(cell) = self
            .cells
            .get((h as usize) & (self.cells.len().saturating_sub(1)))
        else {
            return true;
        };
        let tag = h >> (64 - TAG_BITS);
        let now = now_ms & TIME_MASK;
        let mut cur = cell.load(Ordering::Relaxed);
        loop {
            let (ctag, tat) = (cur >> (64 - TAG_BITS), cur & TIME_MASK);
            // Another network's cell, or an idle one: a fresh allowance.
            let tat = if ctag != tag || tat < now { now } else { tat };
            if tat - now > self.tolerance {
                return false;
            }
            let next = (tag << (64 - TAG_BITS)) | ((tat + self.interval) & TIME_MASK);
            match cell.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }
}

impl Limit {
    /// Events of the network hashed to `h` counted in the current window at `now_ms`, and
    /// the burst a window holds (nothing is counted).
    pub fn used(&self, h: u64, now_ms: u64) -> (u64, u64) {
        let burst = self.tolerance / self.interval + 1;
        let Some(cell) = self
            .cells
            .get((h as usize) & (self.cells.len().saturating_sub(1)))
        else {
            return (0, burst);
        };
        let cur = cell.load(Ordering::Relaxed);
        let (ctag, tat) = (cur >> (64 - TAG_BITS), cur & TIME_MASK);
        let now = now_ms & TIME_MASK;
        if ctag != h >> (64 - TAG_BITS) || tat <= now {
            return (0, burst);
        }
        ((tat - now).div_ceil(self.interval), burst)
    }
}

/// What is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Connection,
    Message,
    Recipient,
    UnknownRecipient,
}

/// The limits of `[rates]`, built once at startup (a reload changes nothing here).
#[derive(Debug)]
pub struct Rates {
    connections: Option<Limit>,
    messages: Option<Limit>,
    recipients: Option<Limit>,
    unknown: Option<Limit>,
    ipv4_prefix: u8,
    ipv6_prefix: u8,
    exempt: Vec<Cidr>,
    /// SipHash keyed per process: nobody outside can aim two networks at one cell.
    hasher: std::collections::hash_map::RandomState,
    /// Fleet-wide counts (`fleet = true`), with each limit's allowance a minute.
    fleet: Option<Arc<Fleet>>,
    per_minute: [u32; 4],
}

impl Rates {
    /// `None` when no limit is set.
    pub fn new(s: &RatesSection) -> Option<Rates> {
        let limit = |per_minute: u32| {
            (per_minute > 0).then(|| {
                let burst = (u64::from(per_minute) * u64::from(s.burst_percent) / 100).max(1);
                Limit::new(
                    per_minute,
                    burst.min(u64::from(u32::MAX)) as u32,
                    s.table_size,
                )
            })
        };
        let r = Rates {
            connections: limit(s.connections_per_minute),
            messages: limit(s.messages_per_minute),
            recipients: limit(s.recipients_per_minute),
            unknown: limit(s.unknown_recipients_per_minute),
            ipv4_prefix: s.ipv4_prefix.min(32),
            ipv6_prefix: s.ipv6_prefix.min(128),
            exempt: s.exempt.clone(),
            hasher: std::collections::hash_map::RandomState::new(),
            fleet: None,
            per_minute: [
                s.connections_per_minute,
                s.messages_per_minute,
                s.recipients_per_minute,
                s.unknown_recipients_per_minute,
            ],
        };
        (r.connections.is_some()
            || r.messages.is_some()
            || r.recipients.is_some()
            || r.unknown.is_some())
        .then_some(r)
    }

    fn limit(&self, e: Event) -> Option<&Limit> {
        match e {
            Event::Connection => self.connections.as_ref(),
            Event::Message => self.messages.as_ref(),
            Event::Recipient => self.recipients.as_ref(),
            Event::UnknownRecipient => self.unknown.as_ref(),
        }
    }

    /// Whether this kind of event is limited at all.
    pub fn limits(&self, e: Event) -> bool {
        self.limit(e).is_some()
    }

    /// Count events through the fleet too (see `replication::fleet`).
    pub fn with_fleet(mut self, fleet: Arc<Fleet>) -> Rates {
        self.fleet = Some(fleet);
        self
    }

    /// Count an event from `ip` at `now_ms`; `false` when its network is over the limit —
    /// this host's, or with a fleet the fleet's count this minute as last heard from Redis.
    /// Exempt networks and unlimited events always pass.
    pub fn take(&self, e: Event, ip: IpAddr, now_ms: u64) -> bool {
        let Some(l) = self.limit(e) else {
            return true;
        };
        if any_contains(&self.exempt, ip) {
            return true;
        }
        if !l.take(self.network_hash(ip), now_ms) {
            return false;
        }
        if let Some(f) = &self.fleet {
            let (kind, net) = (e as u8, self.network(ip));
            if f.total(kind, net) >= self.allowance(e) {
                return false;
            }
            f.count(kind, net);
        }
        true
    }

    fn allowance(&self, e: Event) -> u32 {
        self.per_minute.get(e as usize).copied().unwrap_or(0)
    }

    /// The fleet's count of `e` for `ip`'s network this minute (`None` without a fleet).
    pub fn fleet_total(&self, e: Event, ip: IpAddr) -> Option<u32> {
        let f = self.fleet.as_ref()?;
        Some(f.total(e as u8, self.network(ip)))
    }

    /// For `ringmx why`: `None` when `e` is not limited, else whether `ip` is exempt, the
    /// events counted against its network now, and the burst.
    pub fn used(&self, e: Event, ip: IpAddr, now_ms: u64) -> Option<(bool, u64, u64)> {
        let l = self.limit(e)?;
        let (used, burst) = l.used(self.network_hash(ip), now_ms);
        Some((any_contains(&self.exempt, ip), used, burst))
    }

    /// A keyed hash of the client's network.
    fn network_hash(&self, ip: IpAddr) -> u64 {
        use std::hash::BuildHasher;
        let n = self.network(ip);
        self.hasher.hash_one((u64::from(n.family), n.bits))
    }

    /// The client's network: masked to its prefix (IPv4-mapped IPv6 counts as IPv4).
    fn network(&self, ip: IpAddr) -> Net {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let (bits, prefix, family): (u128, u8, u8) = match ip {
            IpAddr::V4(a) => (u128::from(u32::from(a)) << 96, self.ipv4_prefix, 4),
            IpAddr::V6(a) => (u128::from(a), self.ipv6_prefix, 6),
        };
        let mask = if prefix == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(prefix))
        };
        Net {
            family,
            bits: bits & mask,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn settings() -> RatesSection {
        RatesSection {
            connections_per_minute: 60,
            messages_per_minute: 0,
            recipients_per_minute: 0,
            unknown_recipients_per_minute: 0,
            burst_percent: 5,
            ipv4_prefix: 32,
            ipv6_prefix: 64,
            exempt: vec![Cidr::parse("192.0.2.0/24").unwrap()],
            table_size: 1024,
            fleet: false,
        }
    }

    #[test]
    fn a_burst_then_the_sustained_rate() {
        // 60 a minute (one a second), bursts of 3.
        let l = Limit::new(60, 3, 16);
        let t = 1_000_000;
        assert_eq!(l.used(7, t), (0, 3));
        assert!(l.take(7, t) && l.take(7, t));
        assert_eq!(l.used(7, t), (2, 3));
        assert_eq!(
            l.used(7, t + 1_000),
            (1, 3),
            "one has drained a second later"
        );
        assert_eq!(l.used(8, t), (0, 3), "another network");
        let l = Limit::new(60, 3, 16);
        assert!(l.take(7, t) && l.take(7, t) && l.take(7, t));
        assert!(!l.take(7, t), "the fourth at once is over");
        assert!(!l.take(7, t + 500), "half an interval later: still over");
        assert!(l.take(7, t + 1000), "one interval later: one more");
        assert!(!l.take(7, t + 1000));
        // After a quiet minute the whole burst is back, not more.
        let later = t + 61_000;
        assert!(l.take(7, later) && l.take(7, later) && l.take(7, later));
        assert!(!l.take(7, later));
    }

    #[test]
    fn networks_are_counted_apart_and_by_prefix() {
        let r = Rates::new(&settings()).unwrap();
        let t = 5_000;
        for _ in 0..3 {
            assert!(r.take(Event::Connection, ip("203.0.113.1"), t));
        }
        assert!(!r.take(Event::Connection, ip("203.0.113.1"), t));
        assert!(
            !r.take(Event::Connection, ip("::ffff:203.0.113.1"), t),
            "IPv4-mapped is the same client"
        );
        assert!(
            r.take(Event::Connection, ip("203.0.113.2"), t),
            "another /32"
        );
        // IPv6: one /64 is one client.
        for _ in 0..3 {
            assert!(r.take(Event::Connection, ip("2001:db8:1:2::1"), t));
        }
        assert!(!r.take(Event::Connection, ip("2001:db8:1:2::ffff"), t));
        assert!(r.take(Event::Connection, ip("2001:db8:1:3::1"), t));
        // Exempt networks and unlimited events are never refused.
        for _ in 0..100 {
            assert!(r.take(Event::Connection, ip("192.0.2.7"), t));
            assert!(r.take(Event::Message, ip("203.0.113.1"), t));
        }
        assert!(!r.limits(Event::Message) && r.limits(Event::Connection));
    }

    #[test]
    fn wider_prefixes_group_clients() {
        let r = Rates::new(&RatesSection {
            ipv4_prefix: 24,
            ..settings()
        })
        .unwrap();
        for last in 1..=3 {
            assert!(r.take(Event::Connection, ip(&format!("198.51.100.{last}")), 0));
        }
        assert!(!r.take(Event::Connection, ip("198.51.100.200"), 0));
        assert!(r.take(Event::Connection, ip("198.51.101.1"), 0));
    }

    #[test]
    fn no_limits_no_table() {
        let s = RatesSection {
            connections_per_minute: 0,
            ..settings()
        };
        assert!(Rates::new(&s).is_none());
    }

    #[test]
    fn memory_is_fixed_under_many_sources() {
        // A million sources through a 1,024-cell table: no growth, and a client whose cell
        // was taken over gets a fresh allowance (never a refusal it did not earn).
        let r = Rates::new(&settings()).unwrap();
        let victim = ip("203.0.113.50");
        for n in 0..1_000_000u32 {
            let a = std::net::Ipv4Addr::from(0x0a00_0000 | n);
            r.take(Event::Connection, IpAddr::V4(a), 10);
        }
        assert!(r.take(Event::Connection, victim, 10));
        assert_eq!(r.connections.as_ref().unwrap().cells.len(), 1024);
    }

    #[test]
    fn shared_by_threads() {
        let l = std::sync::Arc::new(Limit::new(60, 100, 16));
        let passed = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..100 {
                        if l.take(3, 1_000) {
                            passed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(
            passed.load(Ordering::Relaxed),
            100,
            "exactly the burst, across threads"
        );
    }
}
