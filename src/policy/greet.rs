//! What the greeting test learnt about client addresses (postscreen's cache): a client that
//! waited for a delayed greeting is remembered as good and skips the delay; one that talked
//! before it, or pipelined without PIPELINING, is remembered as bad and refused at connect.
//!
//! A fixed table of cells shared by every core, each updated with one atomic store: 16 bits of
//! the address's hash as a tag, one bit for the verdict, and the expiry in seconds. Memory is
//! fixed at startup (8 bytes a cell); an address whose cell another address took over is
//! simply unknown again (it gets the delay once more). A stranger is taken for the cell's
//! address — good or bad — only with the tag's 1 in 65,536 chance, and the hash is keyed per
//! process so nobody can aim at a cell. Addresses are remembered one by one (not by network).

use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

const TAG_SHIFT: u32 = 48;
const BAD_BIT: u64 = 1 << 47;
const TIME_MASK: u64 = BAD_BIT - 1;

/// What is known about an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    /// Nothing (never seen, expired, or evicted).
    Unknown,
    /// Waited for the greeting, until the given Unix second.
    Good(u64),
    /// Talked early or pipelined without the offer, until the given Unix second.
    Bad(u64),
}

/// The table.
#[derive(Debug)]
pub struct Memory {
    cells: Box<[AtomicU64]>,
    hasher: std::collections::hash_map::RandomState,
}

impl Memory {
    /// `cells` is rounded up to a power of two.
    pub fn new(cells: usize) -> Memory {
        Memory {
            cells: (0..cells.max(1).next_power_of_two())
                .map(|_| AtomicU64::new(0))
                .collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// Bytes the table holds.
    pub fn bytes(&self) -> usize {
        self.cells.len() * std::mem::size_of::<AtomicU64>()
    }

    fn cell(&self, ip: IpAddr) -> Option<(&AtomicU64, u64)> {
        let ip = canonical(ip);
        let h = self.hasher.hash_one(ip);
        let cell = self
            .cells
            .get((h as usize) & self.cells.len().saturating_sub(1))?;
        Some((cell, h >> TAG_SHIFT))
    }

    /// What is known about `ip` at Unix second `now`.
    pub fn recall(&self, ip: IpAddr, now: u64) -> Known {
        let Some((cell, tag)) = self.cell(ip) else {
            return Known::Unknown;
        };
        let v = cell.load(Ordering::Relaxed);
        let until = v & TIME_MASK;
        if v >> TAG_SHIFT != tag || until <= now {
            Known::Unknown
        } else if v & BAD_BIT != 0 {
            Known::Bad(until)
        } else {
            Known::Good(until)
        }
    }

    /// Remember `ip` as good or bad until Unix second `until` (the latest word wins).
    pub fn remember(&self, ip: IpAddr, bad: bool, until: u64) {
        if let Some((cell, tag)) = self.cell(ip) {
            let v = (tag << TAG_SHIFT) | if bad { BAD_BIT } else { 0 } | (until & TIME_MASK);
            cell.store(v, Ordering::Relaxed);
        }
    }

    /// Forget `ip` (an operator's `ringmx why --forget`, or a test).
    pub fn forget(&self, ip: IpAddr) {
        if let Some((cell, tag)) = self.cell(ip) {
            let _ = cell.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                (v >> TAG_SHIFT == tag).then_some(0)
            });
        }
    }
}

/// An IPv4 address mapped into IPv6 is the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_until_expiry() {
        let m = Memory::new(1024);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(m.recall(a, 100), Known::Unknown);
        m.remember(a, false, 200);
        m.remember(b, true, 150);
        // (address, now, expected)
        let table = [
            (a, 100, Known::Good(200)),
            (a, 199, Known::Good(200)),
            (a, 200, Known::Unknown),
            (b, 149, Known::Bad(150)),
            (b, 150, Known::Unknown),
            ("192.0.2.2".parse().unwrap(), 100, Known::Unknown),
            ("::ffff:192.0.2.1".parse().unwrap(), 100, Known::Good(200)),
        ];
        for (ip, now, want) in table {
            assert_eq!(m.recall(ip, now), want, "{ip} at {now}");
        }
        // The latest word wins; forgetting clears.
        m.remember(a, true, 300);
        assert_eq!(m.recall(a, 100), Known::Bad(300));
        m.forget(a);
        assert_eq!(m.recall(a, 100), Known::Unknown);
    }

    #[test]
    fn a_full_table_forgets_but_never_confuses() {
        // One cell: every address evicts the one before; a stranger is never taken for it.
        let m = Memory::new(1);
        assert_eq!(m.bytes(), 8);
        let mut wrong = 0;
        for i in 0..10_000u32 {
            let ip = IpAddr::from(i.to_be_bytes());
            let next = IpAddr::from((i + 1).to_be_bytes());
            m.remember(ip, false, 1000);
            assert_eq!(m.recall(ip, 0), Known::Good(1000));
            if m.recall(next, 0) != Known::Unknown {
                wrong += 1;
            }
        }
        // A 16-bit tag: about 10,000 / 65,536 ≈ 0.15 expected matches; allow a few.
        assert!(
            wrong <= 3,
            "{wrong} strangers taken for a remembered address"
        );
    }
}
