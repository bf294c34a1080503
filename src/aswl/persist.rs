//! The whitelist on disk: change logs and snapshots in `[aswl] dir`.
//!
//! **Change logs** `log-GGGGGGGGGGGGGGGG-WHO` (generation in hex; WHO = core number or `admin`):
//! records `"RMXL" | payload length u32 | CRC-32 u32 | payload`, payload = kind (1 add,
//! 2 remove) | time u32 | count u32 | count × (local key, local original, external key,
//! external original), each a u16-length string. A core's records are appended with the spool's
//! group commit: the outbound message's 250 waits for the `fdatasync` covering both. A removal's
//! local key may be empty (every local sender).
//!
//! **Snapshots** `snapshot` (and the one before it, `snapshot.prev`): header `"RMXASWL\0" |
//! version u32 | generation u64 | created u64 | CRC-32 of those 28 bytes`, then blocks `kind u8
//! | count u32 | length u32 | CRC-32 (of kind, count, length, payload) | payload`: 1 = local
//! names `(id u32, name)`, 2 = external names, 3 = records `(local id, external id, last_sent)`
//! as u32s, 9 = end (totals). Written to `snapshot.tmp`, fsynced, renamed, directory fsynced.
//!
//! **Ordering.** A snapshot first moves every writer to a new generation G, then walks the
//! store. A collection is applied to memory *before* its writer reads the generation (with a
//! SeqCst fence between), so anything logged in a generation below G is in the snapshot; logs
//! below the *previous* snapshot's generation are deleted once the new one is on disk.
//!
//! **Recovery** (what is trusted): the newest snapshot whose header checks out, minus any block
//! whose checksum fails (reported, counted). If anything in it is missing or bad (bad header,
//! bad block, no end block), `snapshot.prev` is loaded as well and the logs are replayed from
//! *its* generation, so a damaged snapshot loses nothing that the previous snapshot or the logs
//! since hold. Records are merged by newest `last_sent`, so loading both is harmless. Log
//! records with a bad checksum are skipped (resynchronising on the next `RMXL`); a torn tail is
//! ignored. Removals are applied after every add: a removal at time t removes records last sent
//! at or before t, whatever the order the logs are read in.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::Pair;
use super::store::{Item, Store, unpack_name};
use crate::journal::Segment;

const LOG_MAGIC: &[u8; 4] = b"RMXL";
const SNAP_MAGIC: &[u8; 8] = b"RMXASWL\0";
const VERSION: u32 = 1;
const KIND_ADD: u8 = 1;
const KIND_REMOVE: u8 = 2;
const BLOCK_LOCALS: u8 = 1;
const BLOCK_EXTERNALS: u8 = 2;
const BLOCK_PAIRS: u8 = 3;
const BLOCK_END: u8 = 9;
const BLOCK_BYTES: usize = 1 << 20;
const MAX_BLOCK: usize = 64 << 20;

/// Order the memory writes of a collection before the generation read of its log append.
pub fn publish_fence() {
    fence(Ordering::SeqCst);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    let n = b.len().min(u16::MAX as usize);
    out.extend_from_slice(&(n as u16).to_le_bytes());
    out.extend_from_slice(b.get(..n).unwrap_or_default());
}

/// A log record for `pairs` (kind add or remove) at time `t`.
pub fn encode_log(remove: bool, t: u32, pairs: &[Pair]) -> Vec<u8> {
    let mut p = Vec::with_capacity(16 + pairs.len() * 64);
    p.push(if remove { KIND_REMOVE } else { KIND_ADD });
    p.extend_from_slice(&t.to_le_bytes());
    p.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for x in pairs {
        put_str(&mut p, &x.local);
        put_str(&mut p, &x.local_original);
        put_str(&mut p, &x.external);
        put_str(&mut p, &x.external_original);
    }
    let mut r = Vec::with_capacity(12 + p.len());
    r.extend_from_slice(LOG_MAGIC);
    r.extend_from_slice(&(p.len() as u32).to_le_bytes());
    r.extend_from_slice(&crc32fast::hash(&p).to_le_bytes());
    r.extend_from_slice(&p);
    r
}

/// A bounds-checked reader over a byte slice.
struct Rd<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.buf.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }
    fn str(&mut self) -> Option<&'a str> {
        let n = u16::from_le_bytes(self.take(2)?.try_into().ok()?) as usize;
        std::str::from_utf8(self.take(n)?).ok()
    }
}

/// One decoded log record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub remove: bool,
    pub t: u32,
    pub pairs: Vec<Pair>,
}

fn decode_payload(p: &[u8]) -> Option<LogRecord> {
    let mut rd = Rd { buf: p, pos: 0 };
    let kind = rd.u8()?;
    let t = rd.u32()?;
    let n = rd.u32()? as usize;
    let mut pairs = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        pairs.push(Pair {
            local: rd.str()?.into(),
            local_original: rd.str()?.into(),
            external: rd.str()?.into(),
            external_original: rd.str()?.into(),
        });
    }
    (rd.pos == p.len() && matches!(kind, KIND_ADD | KIND_REMOVE)).then_some(LogRecord {
        remove: kind == KIND_REMOVE,
        t,
        pairs,
    })
}

/// Every intact record of a log file's bytes, and how many damaged ranges were skipped.
pub fn decode_log(buf: &[u8]) -> (Vec<LogRecord>, usize) {
    let mut out = Vec::new();
    let mut bad = 0;
    let mut at = 0;
    while at + 12 <= buf.len() {
        let ok = (|| {
            let mut rd = Rd { buf, pos: at };
            if rd.take(4)? != LOG_MAGIC {
                return None;
            }
            let len = rd.u32()? as usize;
            let crc = rd.u32()?;
            let p = rd.take(len)?;
            (crc32fast::hash(p) == crc).then_some(())?;
            Some((decode_payload(p)?, rd.pos))
        })();
        match ok {
            Some((r, next)) => {
                out.push(r);
                at = next;
            }
            None => {
                // Torn tail or damage: resynchronise on the next magic.
                let from = at + 1;
                match buf
                    .get(from..)
                    .and_then(|rest| memchr::memmem::find(rest, LOG_MAGIC))
                {
                    Some(i) => {
                        bad += 1;
                        at = from + i;
                    }
                    None => {
                        if buf.len() - at >= 12 {
                            bad += 1;
                        }
                        break;
                    }
                }
            }
        }
    }
    (out, bad)
}

fn log_name(gen_: u64, who: &str) -> String {
    format!("log-{gen_:016x}-{who}")
}

fn parse_log_name(name: &str) -> Option<u64> {
    let rest = name.strip_prefix("log-")?;
    let (g, _) = rest.split_once('-')?;
    u64::from_str_radix(g, 16).ok()
}

/// What recovery found (logged at startup, shown by `ringmx aswl stats`).
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    pub snapshot_records: u64,
    pub snapshot_generation: u64,
    pub bad_snapshot_blocks: u64,
    pub fell_back_to_previous: bool,
    pub log_records: u64,
    pub bad_log_ranges: u64,
    pub load_ms: u64,
}

/// Statistics of the last snapshot.
#[derive(Debug, Default)]
pub struct SnapshotStats {
    pub count: AtomicU64,
    pub last_unix: AtomicU64,
    pub last_ms: AtomicU64,
    pub last_records: AtomicU64,
    pub last_bytes: AtomicU64,
}

/// A writer's current log file and its generation.
type LogSlot = Mutex<Option<(u64, Arc<Segment>)>>;

/// The data directory of a running whitelist.
#[derive(Debug)]
pub struct Disk {
    pub dir: PathBuf,
    generation: AtomicU64,
    writers: Vec<LogSlot>,
    admin: LogSlot,
    snapshotting: Mutex<()>,
    _lock: File,
    pub recovered: Recovered,
    pub snapshots: SnapshotStats,
}

fn lock_dir(dir: &Path) -> io::Result<File> {
    fs::create_dir_all(dir)?;
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(io::Error::other(format!(
            "whitelist directory {} is in use by another ringmx process",
            dir.display()
        )));
    }
    Ok(f)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Disk {
    /// Lock `dir`, load it into `store`, and start a new generation for this process.
    pub fn open(dir: &Path, writers: usize, store: &Store) -> io::Result<Disk> {
        let lock = lock_dir(dir)?;
        let started = Instant::now();
        let mut rec = Recovered::default();
        let mut max_gen = 0;
        let base = match read_snapshot(&dir.join("snapshot"), store) {
            Ok(s) if s.complete => {
                rec.snapshot_records = s.records;
                rec.snapshot_generation = s.generation;
                s.generation
            }
            other => {
                let why = match &other {
                    Ok(s) => {
                        rec.bad_snapshot_blocks = s.bad_blocks;
                        rec.snapshot_records = s.records;
                        format!("{} damaged block(s) or missing end", s.bad_blocks)
                    }
                    Err(e) => e.to_string(),
                };
                let exists = dir.join("snapshot").exists();
                if exists {
                    tracing::error!(dir = %dir.display(), problem = %why, "aswl: the snapshot is damaged; loading the previous snapshot and every change log since it");
                    rec.fell_back_to_previous = true;
                }
                match read_snapshot(&dir.join("snapshot.prev"), store) {
                    Ok(p) => {
                        rec.snapshot_records += p.records;
                        p.generation
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
                    Err(e) => {
                        tracing::error!(problem = %e, "aswl: the previous snapshot is unreadable too; replaying every change log");
                        0
                    }
                }
            }
        };
        max_gen = max_gen.max(base);
        let mut logs: Vec<(u64, PathBuf)> = Vec::new();
        for e in fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name();
            if let Some(g) = name.to_str().and_then(parse_log_name) {
                max_gen = max_gen.max(g);
                if g >= base {
                    logs.push((g, e.path()));
                }
            }
        }
        logs.sort();
        let mut removals = Vec::new();
        for (_, path) in &logs {
            let buf = fs::read(path)?;
            let (records, bad) = decode_log(&buf);
            if bad > 0 {
                tracing::warn!(log = %path.display(), damaged = bad, "aswl: skipped damaged change-log records");
            }
            rec.bad_log_ranges += bad as u64;
            for r in records {
                rec.log_records += 1;
                if r.remove {
                    removals.push(r);
                    continue;
                }
                for p in &r.pairs {
                    store.record(
                        (&p.local, &p.local_original),
                        (&p.external, &p.external_original),
                        r.t,
                    );
                }
            }
        }
        for r in removals {
            for p in &r.pairs {
                let local = (!p.local.is_empty()).then_some(p.local.as_str());
                store.remove(local, &p.external, r.t);
            }
        }
        rec.load_ms = started.elapsed().as_millis() as u64;
        tracing::info!(
            records = store.len(),
            snapshot_records = rec.snapshot_records,
            log_records = rec.log_records,
            ms = rec.load_ms,
            "aswl: loaded"
        );
        Ok(Disk {
            dir: dir.to_path_buf(),
            generation: AtomicU64::new(max_gen + 1),
            writers: (0..writers).map(|_| Mutex::new(None)).collect(),
            admin: Mutex::new(None),
            snapshotting: Mutex::new(()),
            _lock: lock,
            recovered: rec,
            snapshots: SnapshotStats::default(),
        })
    }

    fn log_for(&self, slot: &LogSlot, who: &str) -> io::Result<Arc<Segment>> {
        let g = self.generation.load(Ordering::SeqCst);
        let mut cur = slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((cg, seg)) = cur.as_ref()
            && *cg == g
        {
            return Ok(seg.clone());
        }
        let seg = Segment::create_log(&self.dir.join(log_name(g, who)))?;
        *cur = Some((g, seg.clone()));
        Ok(seg)
    }

    /// The current log file of core `core` (call after applying the change to memory).
    pub fn core_log(&self, core: usize) -> io::Result<Arc<Segment>> {
        match self.writers.get(core) {
            Some(slot) => self.log_for(slot, &core.to_string()),
            None => self.log_for(&self.admin, "admin"),
        }
    }

    /// Append a record to the admin log and `fdatasync` it (operator changes, imports).
    pub fn write_admin(&self, bytes: &[u8]) -> io::Result<()> {
        self.append_admin(bytes)?;
        self.sync_admin()
    }

    /// Append to the admin log without syncing (records that can be fetched again, from
    /// replication); [`Disk::sync_admin`] makes them durable.
    pub fn append_admin(&self, bytes: &[u8]) -> io::Result<()> {
        publish_fence();
        self.log_for(&self.admin, "admin")?.append(&[bytes])?;
        Ok(())
    }

    /// `fdatasync` the current admin log. (Records appended to an older generation's log are
    /// in the snapshot that moved past it: they were in memory before they were appended.)
    pub fn sync_admin(&self) -> io::Result<()> {
        self.log_for(&self.admin, "admin")?.sync_now()
    }

    /// Write a snapshot of `store` and delete the logs it makes unnecessary.
    pub fn snapshot(&self, store: &Store) -> io::Result<u64> {
        let _one = self.snapshotting.lock().unwrap_or_else(|p| p.into_inner());
        let started = Instant::now();
        let g = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        fence(Ordering::SeqCst);
        let tmp = self.dir.join("snapshot.tmp");
        let (records, bytes) = write_snapshot(&tmp, store, g)?;
        let cur = self.dir.join("snapshot");
        let prev = self.dir.join("snapshot.prev");
        let prev_gen = read_header(&cur).ok();
        if cur.exists() {
            fs::rename(&cur, &prev)?;
        }
        fs::rename(&tmp, &cur)?;
        sync_dir(&self.dir)?;
        // Logs older than the previous snapshot's generation are covered twice over.
        if let Some(pg) = prev_gen {
            for e in fs::read_dir(&self.dir)? {
                let e = e?;
                if let Some(lg) = e.file_name().to_str().and_then(parse_log_name)
                    && lg < pg
                {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        let ms = started.elapsed().as_millis() as u64;
        let s = &self.snapshots;
        s.count.fetch_add(1, Ordering::Relaxed);
        s.last_unix
            .store(u64::from(super::unix_now()), Ordering::Relaxed);
        s.last_ms.store(ms, Ordering::Relaxed);
        s.last_records.store(records, Ordering::Relaxed);
        s.last_bytes.store(bytes, Ordering::Relaxed);
        tracing::info!(records, bytes, ms, generation = g, "aswl: snapshot written");
        Ok(records)
    }
}

struct BlockWriter<W: Write> {
    w: W,
    kind: u8,
    count: u32,
    buf: Vec<u8>,
    bytes: u64,
}

impl<W: Write> BlockWriter<W> {
    fn flush_block(&mut self) -> io::Result<()> {
        if self.count == 0 && self.kind != BLOCK_END {
            return Ok(());
        }
        let mut h = [0u8; 9];
        h[0] = self.kind;
        h[1..5].copy_from_slice(&self.count.to_le_bytes());
        h[5..9].copy_from_slice(&(self.buf.len() as u32).to_le_bytes());
        let mut c = crc32fast::Hasher::new();
        c.update(&h);
        c.update(&self.buf);
        self.w.write_all(&h)?;
        self.w.write_all(&c.finalize().to_le_bytes())?;
        self.w.write_all(&self.buf)?;
        self.bytes += 13 + self.buf.len() as u64;
        self.buf.clear();
        self.count = 0;
        Ok(())
    }

    fn entry(&mut self, kind: u8) -> io::Result<&mut Vec<u8>> {
        if kind != self.kind || self.buf.len() >= BLOCK_BYTES {
            self.flush_block()?;
            self.kind = kind;
        }
        self.count += 1;
        Ok(&mut self.buf)
    }
}

fn write_snapshot(path: &Path, store: &Store, g: u64) -> io::Result<(u64, u64)> {
    let f = File::create(path)?;
    let mut w = BufWriter::with_capacity(1 << 20, f);
    let mut head = Vec::with_capacity(32);
    head.extend_from_slice(SNAP_MAGIC);
    head.extend_from_slice(&VERSION.to_le_bytes());
    head.extend_from_slice(&g.to_le_bytes());
    head.extend_from_slice(&u64::from(super::unix_now()).to_le_bytes());
    // Sizes (taken before the walk; hints for the loader to size its tables).
    let (locals, externals, _) = store.counts();
    for v in [locals, externals, store.len()] {
        head.extend_from_slice(&(v as u64).to_le_bytes());
    }
    let crc = crc32fast::hash(&head);
    head.extend_from_slice(&crc.to_le_bytes());
    w.write_all(&head)?;
    let mut bw = BlockWriter {
        w,
        kind: BLOCK_LOCALS,
        count: 0,
        buf: Vec::with_capacity(BLOCK_BYTES + 1024),
        bytes: head.len() as u64,
    };
    let mut err: Option<io::Error> = None;
    let mut np = 0u64;
    store.walk(|item| {
        if err.is_some() {
            return;
        }
        let kind = match item {
            Item::Local(..) => BLOCK_LOCALS,
            Item::External(..) => BLOCK_EXTERNALS,
            Item::Pair(..) => BLOCK_PAIRS,
        };
        let b = match bw.entry(kind) {
            Ok(b) => b,
            Err(e) => {
                err = Some(e);
                return;
            }
        };
        match item {
            Item::Local(id, name) | Item::External(id, name) => {
                b.extend_from_slice(&id.to_le_bytes());
                put_str(b, name);
            }
            Item::Pair(l, x, t) => {
                b.extend_from_slice(&l.to_le_bytes());
                b.extend_from_slice(&x.to_le_bytes());
                b.extend_from_slice(&t.to_le_bytes());
                np += 1;
            }
        }
    });
    if let Some(e) = err {
        return Err(e);
    }
    bw.flush_block()?;
    bw.kind = BLOCK_END;
    for v in [0, 0, np] {
        bw.buf.extend_from_slice(&v.to_le_bytes());
    }
    bw.flush_block()?;
    let bytes = bw.bytes;
    let f = bw.w.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    Ok((np, bytes))
}

/// What reading a snapshot gave.
#[derive(Debug, Clone, Default)]
pub struct SnapshotRead {
    pub generation: u64,
    pub records: u64,
    pub bad_blocks: u64,
    /// Header, every block and the end block intact.
    pub complete: bool,
}

const HEAD: usize = 56;

fn read_header(path: &Path) -> io::Result<u64> {
    let mut f = File::open(path)?;
    let mut h = [0u8; HEAD];
    f.read_exact(&mut h)?;
    parse_header(&h).map(|h| h.generation)
}

struct Header {
    generation: u64,
    locals: u64,
    externals: u64,
    records: u64,
}

fn parse_header(h: &[u8; HEAD]) -> io::Result<Header> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    if h.get(..8) != Some(SNAP_MAGIC.as_slice()) {
        return Err(bad("not a ringmx whitelist snapshot (bad magic)"));
    }
    let word = |a: usize| -> u32 {
        u32::from_le_bytes(
            h.get(a..a + 4)
                .and_then(|s| s.try_into().ok())
                .unwrap_or([0; 4]),
        )
    };
    let long = |a: usize| -> u64 {
        u64::from_le_bytes(
            h.get(a..a + 8)
                .and_then(|s| s.try_into().ok())
                .unwrap_or([0; 8]),
        )
    };
    if crc32fast::hash(h.get(..HEAD - 4).unwrap_or_default()) != word(HEAD - 4) {
        return Err(bad("snapshot header checksum mismatch"));
    }
    if word(8) != VERSION {
        return Err(bad(&format!("unsupported snapshot version {}", word(8))));
    }
    Ok(Header {
        generation: long(12),
        locals: long(28),
        externals: long(36),
        records: long(44),
    })
}

/// Load a snapshot into `store`; damaged blocks are skipped and counted.
pub fn read_snapshot(path: &Path, store: &Store) -> io::Result<SnapshotRead> {
    let f = File::open(path)?;
    read_snapshot_from(BufReader::with_capacity(1 << 20, f), store)
}

/// One record ready for the store: local id, its domain id, external id and fingerprint, time.
type Loaded = (u32, u32, u32, u64, u32);

/// [`read_snapshot`] from any reader (the fuzz target reads bytes). Records are inserted by
/// this thread and a helper thread, a block each in turn (the tables' shards take both).
pub fn read_snapshot_from(mut r: impl Read, store: &Store) -> io::Result<SnapshotRead> {
    let mut h = [0u8; HEAD];
    r.read_exact(&mut h)?;
    let head = parse_header(&h)?;
    // Size the tables once (the hints are bounded: a damaged-but-checksummed header cannot
    // make us allocate more than a sane maximum).
    const MAX_HINT: u64 = 1 << 28;
    store.reserve(
        head.locals.min(MAX_HINT) as usize,
        head.externals.min(MAX_HINT) as usize,
        head.records.min(MAX_HINT) as usize,
    );
    let mut out = SnapshotRead {
        generation: head.generation,
        ..Default::default()
    };
    let mut locals: Vec<Option<(u32, u32)>> = Vec::new();
    let mut externals: Vec<Option<(u32, u64)>> = Vec::new();
    let mut payload = Vec::with_capacity(BLOCK_BYTES + 4096);
    fn set<T: Copy>(v: &mut Vec<Option<T>>, i: u32, x: T) {
        let i = i as usize;
        if i < (1 << 31) {
            if v.len() <= i {
                v.resize(i + 1, None);
            }
            if let Some(s) = v.get_mut(i) {
                *s = Some(x);
            }
        }
    }
    // The newest time per external address (by snapshot index), for the global view, which
    // is then written once per address instead of once per record.
    let mut newest: Vec<u32> = Vec::new();
    let insert = |batch: &[Loaded]| {
        // Random inserts wait on memory: start each one's cache lines a few records ahead.
        const AHEAD: usize = 8;
        for (i, &(l, d, x, f, t)) in batch.iter().enumerate() {
            if let Some(&(l, d, _, f, _)) = batch.get(i + AHEAD) {
                store.prefetch_views(l, d, f);
            }
            store.put_views(l, d, x, f, t);
        }
    };
    std::thread::scope(|scope| -> io::Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Loaded>>(4);
        let helper = scope.spawn(move || {
            for batch in rx {
                insert(&batch);
            }
        });
        let mut turn = false;
        let result = (|| -> io::Result<()> {
            loop {
                let mut bh = [0u8; 13];
                match r.read_exact(&mut bh) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                }
                let kind = bh[0];
                let count = u32::from_le_bytes([bh[1], bh[2], bh[3], bh[4]]);
                let len = u32::from_le_bytes([bh[5], bh[6], bh[7], bh[8]]) as usize;
                let crc = u32::from_le_bytes([bh[9], bh[10], bh[11], bh[12]]);
                if len > MAX_BLOCK {
                    out.bad_blocks += 1;
                    return Ok(());
                }
                payload.resize(len, 0);
                if r.read_exact(&mut payload).is_err() {
                    out.bad_blocks += 1;
                    return Ok(());
                }
                let mut c = crc32fast::Hasher::new();
                c.update(bh.get(..9).unwrap_or_default());
                c.update(&payload);
                if c.finalize() != crc {
                    out.bad_blocks += 1;
                    continue;
                }
                let mut rd = Rd {
                    buf: &payload,
                    pos: 0,
                };
                match kind {
                    BLOCK_LOCALS => {
                        for _ in 0..count {
                            let (Some(i), Some(name)) = (rd.u32(), rd.str()) else {
                                break;
                            };
                            let (key, orig) = unpack_name(name);
                            if let Some(id) = store.intern_local(key, orig)
                                && let Some(d) = store.domain_of(id)
                            {
                                set(&mut locals, i, (id, d));
                            }
                        }
                    }
                    BLOCK_EXTERNALS => {
                        let mut names = Vec::with_capacity(count.min(1 << 20) as usize);
                        for _ in 0..count {
                            let (Some(i), Some(name)) = (rd.u32(), rd.str()) else {
                                break;
                            };
                            names.push((i, name));
                        }
                        for (i, idf) in store.intern_externals(&names) {
                            set(&mut externals, i, idf);
                        }
                    }
                    BLOCK_PAIRS => {
                        let mut batch = Vec::with_capacity(count.min(1 << 20) as usize);
                        for _ in 0..count {
                            let (Some(l), Some(x), Some(t)) = (rd.u32(), rd.u32(), rd.u32()) else {
                                break;
                            };
                            let l = locals.get(l as usize).copied().flatten();
                            let xi = x as usize;
                            let x = externals.get(xi).copied().flatten();
                            if let (Some((l, d)), Some((x, f))) = (l, x) {
                                batch.push((l, d, x, f, t));
                                if newest.len() <= xi {
                                    newest.resize(externals.len().max(xi + 1), 0);
                                }
                                if let Some(n) = newest.get_mut(xi) {
                                    *n = (*n).max(t);
                                }
                            }
                        }
                        out.records += batch.len() as u64;
                        turn = !turn;
                        if turn {
                            // The helper is gone only if it panicked; then insert here.
                            if let Err(e) = tx.send(batch) {
                                insert(&e.0);
                            }
                        } else {
                            insert(&batch);
                        }
                    }
                    BLOCK_END => {
                        let _ = rd.u64();
                        let _ = rd.u64();
                        let total = rd.u64().unwrap_or(0);
                        out.complete = out.bad_blocks == 0 && total == out.records;
                        return Ok(());
                    }
                    _ => out.bad_blocks += 1,
                }
            }
        })();
        drop(tx);
        let _ = helper.join();
        result
    })?;
    for (i, t) in newest.iter().enumerate() {
        if *t > 0
            && let Some(Some((x, f))) = externals.get(i)
        {
            store.raise_global(*x, *f, *t);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(l: &str, x: &str) -> Pair {
        Pair {
            local: l.into(),
            local_original: l.into(),
            external: x.into(),
            external_original: x.into(),
        }
    }

    #[test]
    fn log_records_round_trip_and_resync() {
        let a = encode_log(
            false,
            100,
            &[pair("a@l.test", "x@e.test"), pair("b@l.test", "y@e.test")],
        );
        let b = encode_log(true, 200, &[pair("", "x@e.test")]);
        let mut buf = a.clone();
        buf.extend_from_slice(b"garbage");
        buf.extend_from_slice(&b);
        let mut torn = a.clone();
        torn.truncate(a.len() - 3);
        buf.extend_from_slice(&torn);
        let (recs, bad) = decode_log(&buf);
        assert_eq!(recs.len(), 2);
        assert!(!recs[0].remove && recs[0].t == 100 && recs[0].pairs.len() == 2);
        assert!(recs[1].remove && recs[1].pairs[0].local.is_empty());
        assert_eq!(bad, 2);
        let mut flipped = a.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(decode_log(&flipped).0.len(), 0);
    }
}
