//! Connection limits without locks: a total counter and a table of per-IP counters indexed by a
//! keyed hash of the address. Two addresses that share a slot share its count, which can only
//! make the limit stricter for them; with 65,536 slots that is rare and documented. An IPv6
//! client is its /64 (as for rates and AUTH failures): a host is given a whole /64, and counted
//! by full address, one host could take every connection slot with addresses of its own.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

const SLOTS: usize = 1 << 16;

/// Total and per-IP connection counters.
pub struct ConnLimits {
    total: AtomicUsize,
    max_total: AtomicUsize,
    per_ip: Box<[AtomicU32]>,
    hasher: RandomState,
}

impl std::fmt::Debug for ConnLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnLimits")
            .field("total", &self.total)
            .finish()
    }
}

/// Releases its slots when dropped.
#[derive(Debug)]
pub struct ConnGuard<'a> {
    limits: &'a ConnLimits,
    slot: usize,
}

impl Drop for ConnGuard<'_> {
    fn drop(&mut self) {
        self.limits.total.fetch_sub(1, Ordering::Relaxed);
        if let Some(s) = self.limits.per_ip.get(self.slot) {
            s.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl ConnLimits {
    pub fn new(max_total: usize) -> ConnLimits {
        ConnLimits {
            total: AtomicUsize::new(0),
            max_total: AtomicUsize::new(max_total),
            per_ip: (0..SLOTS).map(|_| AtomicU32::new(0)).collect(),
            hasher: RandomState::new(),
        }
    }

    fn slot(&self, ip: IpAddr) -> usize {
        let ip = match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6((u128::from(v6) & (u128::MAX << 64)).into()),
            },
            v4 => v4,
        };
        (self.hasher.hash_one(ip) as usize) % SLOTS
    }

    /// Connections open from `ip` now (with any address that shares its slot).
    pub fn open_from(&self, ip: IpAddr) -> u32 {
        self.per_ip
            .get(self.slot(ip))
            .map_or(0, |s| s.load(Ordering::Relaxed))
    }

    /// Take a slot for a connection from `ip`, or None when a limit is reached.
    pub fn acquire(&self, ip: IpAddr, max_per_ip: usize) -> Option<ConnGuard<'_>> {
        let slot = self.slot(ip);
        let guard = ConnGuard { limits: self, slot };
        let total = self.total.fetch_add(1, Ordering::Relaxed) + 1;
        let per_ip = self
            .per_ip
            .get(slot)
            .map_or(0, |s| s.fetch_add(1, Ordering::Relaxed) as usize + 1);
        if total > self.max_total.load(Ordering::Relaxed) || per_ip > max_per_ip {
            return None; // `guard` drops here and gives both counts back
        }
        Some(guard)
    }

    /// Change the total limit (on reload).
    pub fn set_max_total(&self, max_total: usize) {
        self.max_total.store(max_total, Ordering::Relaxed);
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_total_and_per_ip() {
        let l = ConnLimits::new(3);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let g1 = l.acquire(a, 2).unwrap();
        let g2 = l.acquire(a, 2).unwrap();
        assert!(l.acquire(a, 2).is_none(), "third from the same IP");
        assert!(
            l.acquire("::ffff:192.0.2.1".parse().unwrap(), 2).is_none(),
            "mapped IPv6 is the same client"
        );
        // IPv6: one /64 is one client.
        let l6 = ConnLimits::new(10);
        let _h1 = l6.acquire("2001:db8:1:2::1".parse().unwrap(), 2).unwrap();
        let _h2 = l6
            .acquire("2001:db8:1:2:ffff::9".parse().unwrap(), 2)
            .unwrap();
        assert!(l6.acquire("2001:db8:1:2::3".parse().unwrap(), 2).is_none());
        assert!(l6.acquire("2001:db8:1:3::1".parse().unwrap(), 2).is_some());
        let g3 = l.acquire(b, 2).unwrap();
        assert!(
            l.acquire("192.0.2.3".parse().unwrap(), 2).is_none(),
            "total reached"
        );
        assert_eq!(l.open(), 3);
        assert_eq!(l.open_from(a), 2);
        drop((g1, g2, g3));
        assert_eq!(l.open_from(a), 0);
        assert_eq!(l.open(), 0);
        assert!(l.acquire(a, 2).is_some());
    }
}
