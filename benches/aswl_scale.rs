//! The whitelist at scale: `cargo bench --bench aswl_scale` (env `RECORDS`, default 10 M;
//! `EXTERNALS`, distinct external addresses, default RECORDS / 2; `LOCALS`, default 20,000 over
//! 10 local domains; `KEEP_DIR=path` leaves the data directory with its snapshot there, for a
//! server run).
//!
//! `WRITER_RATE=N` limits the concurrent writer to N inserts per second (default: flat out).
//!
//! Measures: RSS per record (all three views, interned addresses, originals), the latency of
//! one recipient check (`Aswl::check`: normalisation, exceptions, lookup) per mode on CPU 0
//! while CPU 1 keeps inserting new records, then snapshot write and cold load times.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use ringmx::aswl::{Aswl, Mode};
use ringmx::config::Config;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it; sched_setaffinity(0)
    // applies to the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn local(i: u64) -> String {
    format!("user{i}@dom{}.example", i % 10)
}
fn external(i: u64) -> String {
    format!("contact{i}@partner{}.example", i % 50_000)
}

fn percentile(v: &mut [u64], p: f64) -> u64 {
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or(0)
}

fn settings(dir: &std::path::Path, mode: &str) -> ringmx::aswl::Settings {
    let src = format!(
        "[server]\ndata_dir = \"{}\"\n[[binding]]\nname = \"in\"\nlisten = \"127.0.0.1:2525\"\ndirection = \"inbound\"\n[domains]\nlocal = [\"dom0.example\", \"dom1.example\", \"dom2.example\", \"dom3.example\", \"dom4.example\", \"dom5.example\", \"dom6.example\", \"dom7.example\", \"dom8.example\", \"dom9.example\"]\n[[route]]\ndomains = [\"*\"]\naction = \"discard\"\n[authentication]\nverify = false\n[aswl]\nmode = \"{mode}\"\nlifetime = \"120d\"\n",
        dir.display()
    );
    (*Config::parse(&src, "bench")
        .expect("config")
        .aswl
        .expect("aswl"))
    .clone()
}

fn main() {
    let records = env("RECORDS", 10_000_000);
    let externals = env("EXTERNALS", records / 2).max(1);
    let locals = env("LOCALS", 20_000).max(1);
    let dir = match std::env::var("KEEP_DIR") {
        Ok(d) => std::path::PathBuf::from(d),
        Err(_) => std::env::temp_dir().join(format!("ringmx-aswl-scale-{}", std::process::id())),
    };
    let _ = std::fs::remove_dir_all(&dir);
    let s = settings(&dir, "per-recipient");
    pin(0);
    // As the server does when [aswl] is on.
    ringmx::aswl::keep_freed_memory();
    let now = ringmx::aswl::unix_now();
    let rss0 = rss_bytes();
    let a = Arc::new(Aswl::open(&s, 1).expect("open"));
    let started = Instant::now();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut n = 0u64;
    let mut pairs_sample: Vec<(u64, u64)> = Vec::with_capacity(100_000);
    // Every external address gets one record, then random pairs until RECORDS.
    while n < records {
        let x = if n < externals {
            n
        } else {
            rng.next() % externals
        };
        let l = rng.next() % locals;
        let (lk, xk) = (local(l), external(x));
        let t = now - (rng.next() % (86_400 * 60)) as u32;
        if a.store.record((&lk, &lk), (&xk, &xk), t) == ringmx::aswl::store::Write::Added {
            n += 1;
            if n.is_multiple_of((records / 100_000).max(1)) {
                pairs_sample.push((l, x));
            }
        }
    }
    let fill = started.elapsed();
    let rss1 = rss_bytes();
    let (nl, nx, nd) = a.store.counts();
    println!(
        "records: {} ({nl} local addresses, {nx} external addresses, {nd} per-domain entries)",
        a.store.len()
    );
    println!(
        "fill: {:.1} s ({:.0} records/s)",
        fill.as_secs_f64(),
        records as f64 / fill.as_secs_f64()
    );
    println!(
        "RSS: {:.0} MiB for the whitelist = {:.1} bytes per record (floor 160)",
        (rss1 - rss0) as f64 / 1048576.0,
        (rss1 - rss0) as f64 / records as f64
    );

    // Check latency per mode on CPU 0 while CPU 1 inserts.
    let stop = Arc::new(AtomicBool::new(false));
    let inserted = Arc::new(AtomicU64::new(0));
    let writer = {
        let (a, stop, inserted, s) = (a.clone(), stop.clone(), inserted.clone(), s.clone());
        std::thread::spawn(move || {
            pin(1);
            // WRITER_RATE=N: N inserts per second (0, the default: as fast as it can).
            let rate = env("WRITER_RATE", 0);
            let start = Instant::now();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) && std::env::var_os("NO_WRITER").is_none() {
                let l = local(i % locals);
                let x = if std::env::var_os("REFRESH_ONLY").is_some() {
                    external(i % externals)
                } else {
                    format!("new{i}@fresh.example")
                };
                let p = ringmx::aswl::Pair {
                    local: l.clone(),
                    local_original: l,
                    external: x.clone(),
                    external_original: x,
                };
                a.apply(&s, std::slice::from_ref(&p), now);
                i += 1;
                if rate > 0 {
                    let due = std::time::Duration::from_secs_f64(i as f64 / rate as f64);
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
                inserted.store(i, Ordering::Relaxed);
            }
        })
    };
    let queries: Vec<(String, String)> = pairs_sample
        .iter()
        .enumerate()
        .map(|(i, &(l, x))| {
            if i % 2 == 0 {
                (external(x), local(l))
            } else {
                // A miss: unknown sender.
                (format!("stranger{i}@nowhere{}.example", i % 97), local(l))
            }
        })
        .collect();
    // What the clock itself adds to each sample.
    let mut empty: Vec<u64> = (0..100_000)
        .map(|_| {
            let t = Instant::now();
            t.elapsed().as_nanos() as u64
        })
        .collect();
    println!(
        "timer overhead per sample: p50 {} ns",
        percentile(&mut empty, 0.5)
    );
    let ins0 = inserted.load(Ordering::Relaxed);
    let t0 = Instant::now();
    for mode in [Mode::Global, Mode::PerDomain, Mode::PerRecipient] {
        let mut sm = s.clone();
        sm.mode = mode;
        let mut lat = Vec::with_capacity(queries.len() * 10);
        let mut pass = 0u64;
        // The server checks addresses it has just parsed (in cache): copy each query into the
        // same two buffers first, outside the timed region.
        let (mut sender, mut rcpt) = (String::with_capacity(128), String::with_capacity(128));
        for _ in 0..10 {
            for (sq, rq) in &queries {
                sender.clear();
                sender.push_str(sq);
                rcpt.clear();
                rcpt.push_str(rq);
                let t = Instant::now();
                let v = a.check(&sm, &sender, &rcpt, now);
                lat.push(t.elapsed().as_nanos() as u64);
                pass += u64::from(v.pass());
            }
        }
        let total = lat.len();
        let p50 = percentile(&mut lat, 0.5);
        let p99 = percentile(&mut lat, 0.99);
        let p999 = percentile(&mut lat, 0.999);
        println!(
            "check {:<13} {total} checks, {pass} pass: p50 {p50} ns, p99 {p99} ns, p99.9 {p999} ns (floors 300 / 2000)",
            mode.as_str()
        );
    }
    let secs = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = writer.join();
    println!(
        "meanwhile CPU 1 inserted {} new records ({:.0}/s)",
        inserted.load(Ordering::Relaxed) - ins0,
        (inserted.load(Ordering::Relaxed) - ins0) as f64 / secs
    );

    // Snapshot, then a cold load in a fresh store.
    let t = Instant::now();
    let written = a.disk.snapshot(&a.store).expect("snapshot");
    let snap = t.elapsed();
    let size = std::fs::metadata(dir.join("aswl/snapshot")).map_or(0, |m| m.len());
    println!(
        "snapshot: {written} records, {:.0} MiB, {:.2} s (floor 5 s)",
        size as f64 / 1048576.0,
        snap.as_secs_f64()
    );
    drop(a);
    let t = Instant::now();
    let b = Aswl::open(&s, 1).expect("reopen");
    let load = t.elapsed();
    println!(
        "cold load: {} records in {:.2} s (floor 5 s); replayed log records: {}",
        b.store.len(),
        load.as_secs_f64(),
        b.disk.recovered.log_records
    );
    drop(b);
    if std::env::var("KEEP_DIR").is_err() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}
