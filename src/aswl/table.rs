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

/// A key and its value side by side: a probe touches one cache line, not two.
struct Slot {
    key: AtomicU64,
    val: AtomicU64,
}

/// A slot array. Large ones are mapped directly, 2 MiB-aligned, with `MADV_HUGEPAGE` (the
/// kernel supplies zero pages lazily and backs them with huge pages: a lookup in a table of
/// millions of slots is a TLB miss as much as a cache miss, more so in a VM). Through malloc
/// the pages would be zeroed — touched — before the advice could apply.
struct Slots {
    ptr: std::ptr::NonNull<Slot>,
    mask: usize,
    /// How it was allocated: `Ok(layout)` from the allocator, `Err((base, len))` mapped.
    origin: Result<std::alloc::Layout, (usize, usize)>,
}

// SAFETY: `Slots` owns its allocation exclusively (like a `Box<[Slot]>`), and `Slot` holds only
// atomics, which are safe to share and send between threads.
unsafe impl Send for Slots {}
// SAFETY: as above: shared access only ever goes through the atomics.
unsafe impl Sync for Slots {}

const HUGE: usize = 2 << 20;

impl Drop for Slots {
    fn drop(&mut self) {
        match self.origin {
            // SAFETY: `ptr` was returned by `alloc_zeroed(layout)` and is freed only here.
            Ok(layout) => unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), layout) },
            // SAFETY: `base, len` is the mapping made in `Slots::new`, unmapped only here.
            Err((base, len)) => unsafe {
                libc::munmap(base as *mut libc::c_void, len);
            },
        }
    }
}

/// An anonymous mapping of at least `bytes`, 2 MiB-aligned and advised for huge pages:
/// (aligned start, (mapping base, mapping length)).
fn map_huge(bytes: usize) -> Option<(*mut u8, (usize, usize))> {
    let len = bytes.checked_add(HUGE)?;
    // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return None;
    }
    let start = (base as usize).div_ceil(HUGE) * HUGE;
    // SAFETY: [start, start + bytes) lies inside the mapping just made; the advice changes
    // neither contents nor validity.
    unsafe {
        libc::madvise(start as *mut libc::c_void, bytes, libc::MADV_HUGEPAGE);
    }
    Some((start as *mut u8, (base as usize, len)))
}

impl Slots {
    fn new(cap: usize) -> Slots {
        let cap = cap.next_power_of_two().max(MIN_CAP);
        let bytes = cap * std::mem::size_of::<Slot>();
        if bytes >= 2 * HUGE
            && let Some((start, mapping)) = map_huge(bytes)
            && let Some(ptr) = std::ptr::NonNull::new(start.cast::<Slot>())
        {
            return Slots {
                ptr,
                mask: cap - 1,
                origin: Err(mapping),
            };
        }
        let layout = std::alloc::Layout::array::<Slot>(cap)
            .unwrap_or_else(|_| std::alloc::handle_alloc_error(std::alloc::Layout::new::<Slot>()));
        // SAFETY: the layout has a non-zero size (cap >= MIN_CAP slots of 16 bytes).
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = std::ptr::NonNull::new(raw.cast::<Slot>()) else {
            std::alloc::handle_alloc_error(layout)
        };
        Slots {
            ptr,
            mask: cap - 1,
            origin: Ok(layout),
        }
    }

    fn slots(&self) -> &[Slot] {
        // SAFETY: `ptr` points to `mask + 1` slots, zero-initialised (all-zero bytes are valid
        // atomics: an empty slot) and alive as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.mask + 1) }
    }

    fn key(&self, i: usize) -> Option<&AtomicU64> {
        self.slots().get(i).map(|s| &s.key)
    }

    fn val(&self, i: usize) -> Option<&AtomicU64> {
        self.slots().get(i).map(|s| &s.val)
    }

    fn cap(&self) -> usize {
        self.mask + 1
    }

    /// The slot holding `k`, or `Err(first free slot)` (empty or removed).
    fn find(&self, k: u64, h: u64) -> Result<usize, Option<usize>> {
        let mut i = (h as usize) & self.mask;
        let mut free = None;
        for _ in 0..=self.mask {
            let cur = self.key(i).map_or(EMPTY, |s| s.load(Ordering::Acquire));
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

/// The smallest power-of-two capacity holding `n` entries at most `num/den` full.
fn cap_for(n: usize, num: usize, den: usize) -> usize {
    let mut cap = MIN_CAP;
    while n.saturating_mul(den) > cap.saturating_mul(num) {
        cap *= 2;
    }
    cap
}

/// A lookup in flight (see [`Table::pin`]).
pub struct Pinned {
    slots: arc_swap::Guard<Arc<Slots>>,
    k: u64,
    h: u64,
}

impl std::fmt::Debug for Pinned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pinned").field("k", &self.k).finish()
    }
}

impl Pinned {
    /// The value, as [`Table::get`] would give it.
    pub fn get(&self) -> Option<u64> {
        let i = self.slots.find(self.k, self.h).ok()?;
        self.slots.val(i).map(|v| v.load(Ordering::Acquire))
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
        slots.val(i).map(|v| v.load(Ordering::Acquire))
    }

    /// Start loading the cache line a lookup or insert of `k` begins at (a hint).
    pub fn prefetch(&self, k: u64) {
        drop(self.pin(k));
    }

    /// Look `k` up in two steps: this one pins the shard's array and starts loading the cache
    /// line the probe begins at, so two lookups can wait on memory together.
    pub fn pin(&self, k: u64) -> Pinned {
        let h = mix(k);
        let slots = self.shard(h).slots.load();
        if let Some(s) = slots.slots().get((h as usize) & slots.mask) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a prefetch of a valid address (a live slot) never faults or writes.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    (s as *const Slot).cast(),
                );
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = s;
        }
        Pinned { slots, k, h }
    }

    /// Insert or update: `f(old)` gives the new value (`old` is `None` for a new key).
    /// Returns the previous value.
    pub fn upsert(&self, k: u64, f: impl FnOnce(Option<u64>) -> u64) -> Option<u64> {
        let h = mix(k);
        let shard = self.shard(h);
        let _w = shard.write.lock().unwrap_or_else(|p| p.into_inner());
        // Holding the shard's write lock, nobody else replaces the array: a guard will do (no
        // reference-count traffic on the hot path of a bulk load).
        let current = shard.slots.load();
        match current.find(k, h) {
            Ok(i) => {
                let slots: &Slots = &current;
                let v = slots.val(i)?;
                let old = v.load(Ordering::Acquire);
                v.store(f(Some(old)), Ordering::Release);
                Some(old)
            }
            Err(free) => {
                let used = shard.used.load(Ordering::Relaxed);
                let reuse = free.is_some_and(|i| {
                    current.key(i).map(|s| s.load(Ordering::Relaxed)) == Some(TOMB)
                });
                // Linear probing stays short below 3/4 full (a miss — most inbound senders —
                // probes until an empty slot).
                let mut grown = None;
                if !reuse && (used + 1) * 4 > current.cap() * 3 {
                    let new = Arc::new(Self::rebuilt(
                        &current,
                        shard.live.load(Ordering::Relaxed) + 1,
                    ));
                    shard
                        .used
                        .store(shard.live.load(Ordering::Relaxed), Ordering::Relaxed);
                    shard.slots.store(new.clone());
                    grown = Some(new);
                }
                let slots: &Slots = grown.as_deref().unwrap_or(&current);
                let i = match slots.find(k, h) {
                    Err(Some(i)) => i,
                    _ => return None,
                };
                let was_empty = slots.key(i)?.load(Ordering::Relaxed) == EMPTY;
                slots.val(i)?.store(f(None), Ordering::Relaxed);
                slots.key(i)?.store(k, Ordering::Release);
                shard.live.fetch_add(1, Ordering::Relaxed);
                if was_empty {
                    shard.used.fetch_add(1, Ordering::Relaxed);
                }
                None
            }
        }
    }

    /// A copy of `old`'s live entries in an array sized for `want` of them at most half full.
    fn rebuilt(old: &Slots, want: usize) -> Slots {
        Self::rebuilt_at(old, cap_for(want, 1, 2))
    }

    fn rebuilt_at(old: &Slots, cap: usize) -> Slots {
        let new = Slots::new(cap);
        for s in old.slots().iter() {
            let k = s.key.load(Ordering::Acquire);
            if k == EMPTY || k == TOMB {
                continue;
            }
            if let Err(Some(i)) = new.find(k, mix(k))
                && let Some(n) = new.slots().get(i)
            {
                n.val
                    .store(s.val.load(Ordering::Acquire), Ordering::Relaxed);
                n.key.store(k, Ordering::Relaxed);
            }
        }
        new
    }

    /// Make room for `n` entries in all (a bulk load: no rebuilds while it runs).
    pub fn reserve(&self, n: usize) {
        let per = n / self.shards.len() + 1;
        for shard in self.shards.iter() {
            let _w = shard.write.lock().unwrap_or_else(|p| p.into_inner());
            let slots = shard.slots.load_full();
            let live = shard.live.load(Ordering::Relaxed);
            let want = per.max(live);
            if (want * 4) > slots.cap() * 3 {
                shard
                    .slots
                    .store(Arc::new(Self::rebuilt_at(&slots, cap_for(want, 7, 10))));
                shard.used.store(live, Ordering::Relaxed);
            }
        }
    }

    /// Remove `k` if `pred(value)`; returns the removed value.
    pub fn remove_if(&self, k: u64, pred: impl FnOnce(u64) -> bool) -> Option<u64> {
        let h = mix(k);
        let shard = self.shard(h);
        let _w = shard.write.lock().unwrap_or_else(|p| p.into_inner());
        let slots = shard.slots.load();
        let i = slots.find(k, h).ok()?;
        let v = slots.val(i)?.load(Ordering::Acquire);
        if !pred(v) {
            return None;
        }
        slots.key(i)?.store(TOMB, Ordering::Release);
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
            for s in slots.slots().iter() {
                let key = s.key.load(Ordering::Acquire);
                if key != EMPTY && key != TOMB && !keep(key, s.val.load(Ordering::Acquire)) {
                    s.key.store(TOMB, Ordering::Release);
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
            for s in slots.slots().iter() {
                let key = s.key.load(Ordering::Acquire);
                if key != EMPTY && key != TOMB {
                    f(key, s.val.load(Ordering::Acquire));
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
