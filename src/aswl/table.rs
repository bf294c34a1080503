//! A sharded open-addressing map from `u64` keys to `u64` values whose reads never lock.
//!
//! Each shard is an array of `(AtomicU64 key, AtomicU64 value)` slots probed linearly. A reader
//! loads the shard's current array (`arc-swap`, no lock), then probes with atomic loads: a key is
//! published with `Release` after its value, so a reader that sees the key sees the value.
//! Writers take the shard's mutex; growing or compacting a shard builds a new array and swaps it
//! in, and the old one is freed once the last reader lets go of it. Readers therefore never wait,
//! even while the sweep or the snapshot walks the table.
//!
//! Key `0` means empty and `u64::MAX` a removed slot: callers map their keys with [`key`].

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use std::sync::Arc;

const EMPTY: u64 = 0;
const TOMB: u64 = u64::MAX;
const MIN_CAP: usize = 16;

/// A caller key that is never one of the two reserved values.
pub fn key(k: u64) -> u64 {
    match k {
        EMPTY => 1,
        TOMB => TOMB - 1,
        k => k,
    }
}

fn mix(k: u64) -> u64 {
    // splitmix64 finaliser: keys built from small ids spread over every bit.
    let mut z = k;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

struct Slots {
    keys: Box<[AtomicU64]>,
    vals: Box<[AtomicU64]>,
    mask: usize,
}

impl Slots {
    fn new(cap: usize) -> Slots {
        let cap = cap.next_power_of_two().max(MIN_CAP);
        Slots {
            keys: (0..cap).map(|_| AtomicU64::new(EMPTY)).collect(),
            vals: (0..cap).map(|_| AtomicU64::new(0)).collect(),
            mask: cap - 1,
        }
    }

    fn cap(&self) -> usize {
        self.mask + 1
    }

    /// The slot holding `k`, or `Err(first free slot)` (empty or removed).
    fn find(&self, k: u64, h: u64) -> Result<usize, Option<usize>> {
        let mut i = (h as usize) & self.mask;
        let mut free = None;
        for _ in 0..=self.mask {
            let cur = self
                .keys
                .get(i)
                .map_or(EMPTY, |s| s.load(Ordering::Acquire));
            if cur == k {
                return Ok(i);
            }
            if cur == EMPTY {
                return Err(free.or(Some(i)));
            }
            if cur == TOMB && free.is_none() {
                free = Some(i);
            }
            i = (i + 1) & self.mask;
        }
        Err(free)
    }
}

struct Shard {
    slots: ArcSwap<Slots>,
    write: Mutex<()>,
    live: AtomicUsize,
    used: AtomicUsize,
}

/// The map. See the module documentation.
pub struct Table {
    shards: Box<[Shard]>,
    shift: u32,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table").field("len", &self.len()).finish()
    }
}

impl Table {
    /// `2^shard_bits` shards.
    pub fn new(shard_bits: u32) -> Table {
        let n = 1usize << shard_bits;
        Table {
            shards: (0..n)
                .map(|_| Shard {
                    slots: ArcSwap::from_pointee(Slots::new(MIN_CAP)),
                    write: Mutex::new(()),
                    live: AtomicUsize::new(0),
                    used: AtomicUsize::new(0),
                })
                .collect(),
            shift: 64 - shard_bits,
        }
    }

    #[expect(
        clippy::indexing_slicing,
        reason = "the shift leaves shard_bits bits: i < 2^shard_bits = shards.len()"
    )]
    fn shard(&self, h: u64) -> &Shard {
        let i = if self.shift >= 64 {
            0
        } else {
            (h >> self.shift) as usize
        };
        &self.shards[i]
    }

    /// The value of `k` (a key from [`key`]); lock-free.
    pub fn get(&self, k: u64) -> Option<u64> {
        let h = mix(k);
        let slots = self.shard(h).slots.load();
        let i = slots.find(k, h).ok()?;
        slots.vals.get(i).map(|v| v.load(Ordering::Acquire))
    }

    /// Insert or update: `f(old)` gives the new value (`old` is `None` for a new key).
    /// Returns the previous value.
    pub fn upsert(&self, k: u64, f: impl FnOnce(Option<u64>) -> u64) -> Option<u64> {
        let h = mix(k);
        let shard = self.shard(h);
        let _w = shard.write.lock().unwrap_or_else(|p| p.into_inner());
        let mut slots = shard.slots.load_full();
        match slots.find(k, h) {
            Ok(i) => {
                let v = slots.vals.get(i)?;
                let old = v.load(Ordering::Acquire);
                v.store(f(Some(old)), Ordering::Release);
                Some(old)
            }
            Err(free) => {
                let used = shard.used.load(Ordering::Relaxed);
                let reuse = free.is_some_and(|i| {
                    slots.keys.get(i).map(|s| s.load(Ordering::Relaxed)) == Some(TOMB)
                });
                if !reuse && (used + 1) * 8 > slots.cap() * 7 {
                    slots = Arc::new(Self::rebuilt(
                        &slots,
                        shard.live.load(Ordering::Relaxed) + 1,
                    ));
                    shard
                        .used
                        .store(shard.live.load(Ordering::Relaxed), Ordering::Relaxed);
                    shard.slots.store(slots.clone());
                }
                let i = match slots.find(k, h) {
                    Err(Some(i)) => i,
                    _ => return None,
                };
                let was_empty = slots.keys.get(i)?.load(Ordering::Relaxed) == EMPTY;
                slots.vals.get(i)?.store(f(None), Ordering::Relaxed);
                slots.keys.get(i)?.store(k, Ordering::Release);
                shard.live.fetch_add(1, Ordering::Relaxed);
                if was_empty {
                    shard.used.fetch_add(1, Ordering::Relaxed);
                }
                None
            }
        }
    }

    /// A copy of `old`'s live entries in an array sized for `want` of them.
    fn rebuilt(old: &Slots, want: usize) -> Slots {
        let mut cap = MIN_CAP;
        while want * 8 > cap * 5 {
            cap *= 2;
        }
        let new = Slots::new(cap);
        for (k, v) in old.keys.iter().zip(old.vals.iter()) {
            let k = k.load(Ordering::Acquire);
            if k == EMPTY || k == TOMB {
                continue;
            }
            if let Err(Some(i)) = new.find(k, mix(k))
                && let (Some(ks), Some(vs)) = (new.keys.get(i), new.vals.get(i))
            {
                vs.store(v.load(Ordering::Acquire), Ordering::Relaxed);
                ks.store(k, Ordering::Relaxed);
            }
        }
        new
    }

    /// Remove `k` if `pred(value)`; returns the removed value.
    pub fn remove_if(&self, k: u64, pred: impl FnOnce(u64) -> bool) -> Option<u64> {
        let h = mix(k);
        let shard = self.shard(h);
        let _w = shard.write.lock().unwrap_or_else(|p| p.into_inner());
        let slots = shard.slots.load();
        let i = slots.find(k, h).ok()?;
        let v = slots.vals.get(i)?.load(Ordering::Acquire);
        if !pred(v) {
            return None;
        }
        slots.keys.get(i)?.store(TOMB, Ordering::Release);
        shard.live.fetch_sub(1, Ordering::Relaxed);
        Some(v)
    }

    /// Remove every entry for which `pred(key, value)` holds, one shard at a time (readers
    /// are never blocked; writers of one shard wait for that shard only). Returns how many.
    pub fn retain(&self, mut keep: impl FnMut(u64, u64) -> bool) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            let _w = shard.write.lock().unwrap_or_else(|p| p.into_inner());
            let slots = shard.slots.load_full();
            let mut n = 0;
            for (k, v) in slots.keys.iter().zip(slots.vals.iter()) {
                let key = k.load(Ordering::Acquire);
                if key != EMPTY && key != TOMB && !keep(key, v.load(Ordering::Acquire)) {
                    k.store(TOMB, Ordering::Release);
                    n += 1;
                }
            }
            let live = shard.live.load(Ordering::Relaxed) - n;
            shard.live.store(live, Ordering::Relaxed);
            removed += n;
            // Compact a shard that is mostly removed slots or far too big.
            let used = shard.used.load(Ordering::Relaxed);
            if n > 0 && (used > 2 * live.max(1) || slots.cap() > 8 * live.max(MIN_CAP)) {
                shard.slots.store(Arc::new(Self::rebuilt(&slots, live)));
                shard.used.store(live, Ordering::Relaxed);
            }
        }
        removed
    }

    /// Visit every entry (a consistent view of each shard at the time it is visited).
    pub fn for_each(&self, mut f: impl FnMut(u64, u64)) {
        for shard in self.shards.iter() {
            let slots = shard.slots.load_full();
            for (k, v) in slots.keys.iter().zip(slots.vals.iter()) {
                let key = k.load(Ordering::Acquire);
                if key != EMPTY && key != TOMB {
                    f(key, v.load(Ordering::Acquire));
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.live.load(Ordering::Relaxed))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held by the slot arrays.
    pub fn bytes(&self) -> usize {
        self.shards.iter().map(|s| s.slots.load().cap() * 16).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_update_remove_grow() {
        let t = Table::new(2);
        for i in 1..10_000u64 {
            assert_eq!(t.upsert(key(i), |_| i * 2), None);
        }
        assert_eq!(t.len(), 9_999);
        for i in 1..10_000u64 {
            assert_eq!(t.get(key(i)), Some(i * 2));
        }
        assert_eq!(t.get(key(20_000)), None);
        assert_eq!(t.upsert(key(5), |o| o.unwrap() + 1), Some(10));
        assert_eq!(t.get(key(5)), Some(11));
        assert_eq!(t.remove_if(key(5), |v| v == 11), Some(11));
        assert_eq!(t.get(key(5)), None);
        assert_eq!(t.remove_if(key(6), |_| false), None);
        let removed = t.retain(|k, _| k % 2 == 0);
        assert_eq!(removed, 4_999);
        assert_eq!(t.len(), 4_999);
        assert!(t.get(key(7)).is_none() && t.get(key(8)) == Some(16));
        let mut n = 0;
        t.for_each(|_, _| n += 1);
        assert_eq!(n, 4_999);
        // Reserved keys are remapped.
        t.upsert(key(0), |_| 1);
        t.upsert(key(u64::MAX), |_| 2);
        assert_eq!(t.get(key(0)), Some(1));
        assert_eq!(t.get(key(u64::MAX)), Some(2));
    }

    #[test]
    fn readers_see_every_key_while_a_writer_grows_the_table() {
        let t = Arc::new(Table::new(1));
        for i in 1..=1000u64 {
            t.upsert(key(i), |_| i);
        }
        let w = {
            let t = t.clone();
            std::thread::spawn(move || {
                for i in 1001..200_000u64 {
                    t.upsert(key(i), |_| i);
                }
            })
        };
        for _ in 0..50 {
            for i in 1..=1000u64 {
                assert_eq!(t.get(key(i)), Some(i));
            }
        }
        w.join().unwrap();
        assert_eq!(t.len(), 199_999);
    }
}
