//! The durable spool: per-core append-only segment files with group-committed `fdatasync`.
//!
//! * A core appends each accepted message as one checksummed record ([`record`]) to its current
//!   segment (a page-cache write on the core thread), then waits for a commit ticket. The core's
//!   committer thread issues one `fdatasync` for every record appended since its last one
//!   (flushing at `commit_batch` waiters or after `commit_delay`), then wakes every waiter.
//!   Nothing is acknowledged before the `fdatasync` that covers it has returned.
//! * When some recipients of a message are finished (delivered, bounced, abandoned) a "done"
//!   record naming them is appended to the message's own segment, so a segment is
//!   self-contained: once every message in it is finished, it is deleted. Done records are not
//!   waited for: a crash before they reach the disk means a redelivery (a duplicate SMTP allows),
//!   never a loss.
//! * Recovery ([`recover`]) scans every segment, verifies checksums, skips torn or corrupt
//!   ranges (resynchronising on the next record magic), and returns the unfinished messages.

pub mod record;
pub mod staging;

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::delivery::Envelope;
use record::{MessageRecord, Parsed};

/// One segment file.
#[derive(Debug)]
pub struct Segment {
    pub id: u64,
    pub path: PathBuf,
    file: File,
    /// The next append position.
    end: AtomicU64,
    /// Messages in this segment that are not finished.
    live: AtomicUsize,
    /// Still the current segment of its core (not deleted even when `live` is 0).
    current: AtomicBool,
    /// Created and not yet covered by a directory fsync.
    new: AtomicBool,
    dir: PathBuf,
    opened: Instant,
}

impl Segment {
    fn create(dir: &Path, id: u64) -> io::Result<Arc<Segment>> {
        let path = dir.join(segment_name(id));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(Arc::new(Segment {
            id,
            path,
            file,
            end: AtomicU64::new(0),
            live: AtomicUsize::new(0),
            current: AtomicBool::new(true),
            new: AtomicBool::new(true),
            dir: dir.to_path_buf(),
            opened: Instant::now(),
        }))
    }

    fn open_existing(dir: &Path, id: u64, len: u64, live: usize) -> io::Result<Arc<Segment>> {
        let path = dir.join(segment_name(id));
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        Ok(Arc::new(Segment {
            id,
            path,
            file,
            end: AtomicU64::new(len),
            live: AtomicUsize::new(live),
            current: AtomicBool::new(false),
            new: AtomicBool::new(false),
            dir: dir.to_path_buf(),
            opened: Instant::now(),
        }))
    }

    /// A standalone append-only file committed like a segment (the whitelist's change log).
    pub fn create_log(path: &Path) -> io::Result<Arc<Segment>> {
        let file = OpenOptions::new()
            .read(true)
            .append(false)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let len = file.metadata()?.len();
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        Ok(Arc::new(Segment {
            id: u64::MAX,
            path: path.to_path_buf(),
            file,
            end: AtomicU64::new(len),
            live: AtomicUsize::new(0),
            current: AtomicBool::new(true),
            new: AtomicBool::new(true),
            dir,
            opened: Instant::now(),
        }))
    }

    /// `fdatasync` now (and the directory if the file is new), for writers outside a core.
    pub fn sync_now(&self) -> io::Result<()> {
        self.file.sync_data()?;
        if self.new.swap(false, Ordering::AcqRel) {
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Append `parts` as one contiguous range; returns its start.
    pub fn append(&self, parts: &[&[u8]]) -> io::Result<u64> {
        self.append_with_tail(parts, None)
    }

    /// Append `parts`, then the first `len` bytes of a file, as one contiguous range.
    pub fn append_with_tail(&self, parts: &[&[u8]], tail: Option<(&File, u64)>) -> io::Result<u64> {
        let total: u64 =
            parts.iter().map(|p| p.len() as u64).sum::<u64>() + tail.map_or(0, |(_, l)| l);
        let start = self.end.fetch_add(total, Ordering::AcqRel);
        let mut at = start;
        for p in parts {
            self.file.write_all_at(p, at)?;
            at += p.len() as u64;
        }
        if let Some((f, len)) = tail {
            staging::copy_into(f, len, &self.file, at)?;
        }
        Ok(start)
    }

    /// Read `len` bytes at `offset` (a message's content for a retry).
    pub fn read_at(&self, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let mut buf = vec![0; len as usize];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    pub fn len(&self) -> u64 {
        self.end.load(Ordering::Acquire)
    }

    /// Not current, and opened at least `age` ago (a candidate for copy-forward).
    pub fn is_old(&self, age: Duration) -> bool {
        !self.current.load(Ordering::Acquire) && self.opened.elapsed() >= age
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Record that these recipients of a message in this segment are finished; when `all` is
    /// true the message is, and the segment is deleted once nothing in it is live.
    pub fn finish(&self, queue_id: &str, rcpts: &[u32], all: bool) {
        if !rcpts.is_empty()
            && let Err(e) = self.append(&[&record::encode_done(queue_id, rcpts)])
        {
            tracing::warn!(segment = %self.path.display(), error = %e, "cannot append a done record (the message may be delivered again after a crash)");
        }
        if all && self.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.delete_if_idle();
        }
    }

    /// Record an operator's hold or release, so it survives a restart (best effort, like done
    /// records: it is made durable by the next commit of this segment, if any).
    pub fn set_held(&self, queue_id: &str, held: bool) {
        if let Err(e) = self.append(&[&record::encode_hold(queue_id, held)]) {
            tracing::warn!(segment = %self.path.display(), error = %e, "cannot record a hold");
        }
    }

    fn delete_if_idle(&self) {
        if self.live.load(Ordering::Acquire) == 0 && !self.current.load(Ordering::Acquire) {
            match fs::remove_file(&self.path) {
                Ok(()) => {
                    tracing::debug!(segment = %self.path.display(), "segment finished, deleted")
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(segment = %self.path.display(), error = %e, "cannot delete a finished segment")
                }
            }
        }
    }
}

fn segment_name(id: u64) -> String {
    format!("{id:016x}.seg")
}

/// Spool settings.
#[derive(Debug, Clone)]
pub struct SpoolOptions {
    pub dir: PathBuf,
    /// Shared by every core: what spill files may take together.
    pub staging: Arc<staging::Budget>,
    pub segment_size: u64,
    pub commit_batch: usize,
    pub commit_delay: Duration,
}

/// Group-commit statistics for `/metrics`.
#[derive(Debug, Default)]
pub struct CommitStats {
    pub commits: AtomicU64,
    pub committed: AtomicU64,
    pub latency_us: AtomicU64,
    pub max_batch: AtomicU64,
    pub errors: AtomicU64,
}

struct Ticket {
    /// 0 pending, 1 durable, 2 failed.
    state: std::sync::atomic::AtomicU8,
    waker: Mutex<Option<Waker>>,
}

struct Pending {
    seg: Arc<Segment>,
    ticket: Arc<Ticket>,
}

#[derive(Default)]
struct Queue {
    pending: Vec<Pending>,
    stop: bool,
}

struct CommitShared {
    q: Mutex<Queue>,
    cv: Condvar,
}

/// A core's committer: a thread that turns waiting appends into one `fdatasync` per batch.
pub struct Committer {
    shared: Arc<CommitShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Committer {
    pub fn start(
        core: usize,
        batch: usize,
        delay: Duration,
        stats: Arc<CommitStats>,
    ) -> io::Result<Committer> {
        let shared = Arc::new(CommitShared {
            q: Mutex::new(Queue::default()),
            cv: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ringmx-commit-{core}"))
            .spawn(move || commit_loop(&s, batch.max(1), delay, &stats))?;
        Ok(Committer {
            shared,
            thread: Some(thread),
        })
    }

    /// Wait until everything appended to `seg` so far is durable.
    pub fn commit(&self, seg: Arc<Segment>) -> CommitFuture {
        let ticket = Arc::new(Ticket {
            state: std::sync::atomic::AtomicU8::new(0),
            waker: Mutex::new(None),
        });
        let mut q = self.shared.q.lock().unwrap_or_else(|p| p.into_inner());
        q.pending.push(Pending {
            seg,
            ticket: ticket.clone(),
        });
        // Wakes the committer whether it is idle or waiting for the batch to fill.
        self.shared.cv.notify_one();
        CommitFuture { ticket }
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.shared.q.lock().unwrap_or_else(|p| p.into_inner()).stop = true;
        self.shared.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn commit_loop(s: &CommitShared, batch: usize, delay: Duration, stats: &CommitStats) {
    loop {
        let mut q = s.q.lock().unwrap_or_else(|p| p.into_inner());
        while q.pending.is_empty() && !q.stop {
            q = s.cv.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        if q.pending.is_empty() && q.stop {
            return;
        }
        // Let the batch fill for up to `delay` (sessions finishing in the same window share
        // the flush).
        let deadline = Instant::now() + delay;
        while q.pending.len() < batch && !q.stop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            q =
                s.cv.wait_timeout(q, deadline - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
        }
        let pending = std::mem::take(&mut q.pending);
        drop(q);
        let started = Instant::now();
        // Keyed by the segment's address: whitelist logs share the committer.
        let mut synced: HashMap<usize, bool> = HashMap::new();
        for p in &pending {
            if synced.contains_key(&(Arc::as_ptr(&p.seg) as usize)) {
                continue;
            }
            let mut ok = p.seg.file.sync_data().is_ok();
            if ok && p.seg.new.swap(false, Ordering::AcqRel) {
                ok = File::open(&p.seg.dir).and_then(|d| d.sync_all()).is_ok();
                if !ok {
                    p.seg.new.store(true, Ordering::Release);
                }
            }
            synced.insert(Arc::as_ptr(&p.seg) as usize, ok);
        }
        let n = pending.len() as u64;
        stats.commits.fetch_add(1, Ordering::Relaxed);
        stats.committed.fetch_add(n, Ordering::Relaxed);
        stats
            .latency_us
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        stats.max_batch.fetch_max(n, Ordering::Relaxed);
        for p in pending {
            let ok = synced
                .get(&(Arc::as_ptr(&p.seg) as usize))
                .copied()
                .unwrap_or(false);
            if !ok {
                stats.errors.fetch_add(1, Ordering::Relaxed);
            }
            p.ticket
                .state
                .store(if ok { 1 } else { 2 }, Ordering::Release);
            if let Some(w) = p
                .ticket
                .waker
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
            {
                w.wake();
            }
        }
    }
}

/// Resolves to Ok once the append it was taken for is durable.
pub struct CommitFuture {
    ticket: Arc<Ticket>,
}

impl std::future::Future for CommitFuture {
    type Output = io::Result<()>;
    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let check = |t: &Ticket| match t.state.load(Ordering::Acquire) {
            0 => None,
            1 => Some(Ok(())),
            _ => Some(Err(io::Error::other("fdatasync failed"))),
        };
        if let Some(r) = check(&self.ticket) {
            return Poll::Ready(r);
        }
        *self.ticket.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(cx.waker().clone());
        match check(&self.ticket) {
            Some(r) => Poll::Ready(r),
            None => Poll::Pending,
        }
    }
}

/// The spool as seen by one core.
pub struct CoreSpool {
    opts: SpoolOptions,
    ids: Arc<AtomicU64>,
    current: std::cell::RefCell<Option<Arc<Segment>>>,
    committer: Committer,
}

/// Where a spooled message lives.
#[derive(Debug, Clone)]
pub struct Spooled {
    pub seg: Arc<Segment>,
    pub content_at: u64,
    pub content_len: u64,
}

impl CoreSpool {
    pub fn new(
        core: usize,
        opts: SpoolOptions,
        ids: Arc<AtomicU64>,
        stats: Arc<CommitStats>,
    ) -> io::Result<CoreSpool> {
        let committer = Committer::start(core, opts.commit_batch, opts.commit_delay, stats)?;
        Ok(CoreSpool {
            opts,
            ids,
            current: std::cell::RefCell::new(None),
            committer,
        })
    }

    /// The spool directory (staging files are created there, on the same file system).
    pub fn dir(&self) -> &Path {
        &self.opts.dir
    }

    /// Content staged for a new message: spilled into this spool's directory, within the
    /// process-wide budget.
    pub fn staged(&self) -> staging::Staged {
        staging::Staged::new(
            self.opts.dir.clone(),
            staging::DEFAULT_KEEP,
            self.opts.staging.clone(),
        )
    }

    fn segment(&self) -> io::Result<Arc<Segment>> {
        let mut cur = self.current.borrow_mut();
        if let Some(s) = cur.as_ref()
            && s.len() < self.opts.segment_size
        {
            return Ok(s.clone());
        }
        let seg = Segment::create(&self.opts.dir, self.ids.fetch_add(1, Ordering::AcqRel))?;
        if let Some(old) = cur.replace(seg.clone()) {
            old.current.store(false, Ordering::Release);
            old.delete_if_idle();
        }
        Ok(seg)
    }

    /// Retire the current segment (after an I/O error: never append after a failed fsync).
    fn retire(&self) {
        if let Some(old) = self.current.borrow_mut().take() {
            old.current.store(false, Ordering::Release);
            old.delete_if_idle();
        }
    }

    /// Append `bytes` to a log file and wait until it is durable (same group commit).
    pub async fn append_durable(&self, log: &Arc<Segment>, bytes: &[u8]) -> io::Result<()> {
        log.append(&[bytes])?;
        self.committer.commit(log.clone()).await
    }

    /// Append a message (and `extra` bytes to a log file, committed in the same batch) and
    /// wait until both are durable.
    pub async fn store(
        &self,
        env: &Envelope,
        trace: &str,
        content: &[u8],
        extra: Option<(&Arc<Segment>, &[u8])>,
    ) -> io::Result<Spooled> {
        let head = record::encode_message(env, trace, content);
        self.store_record(env, &head, content, None, extra).await
    }

    /// [`CoreSpool::store`] for content staged while it arrived (its file part is copied into
    /// the segment by the kernel).
    pub async fn store_staged(
        &self,
        env: &Envelope,
        trace: &str,
        content: &staging::Staged,
        extra: Option<(&Arc<Segment>, &[u8])>,
    ) -> io::Result<Spooled> {
        let mut crc = crc32fast::Hasher::new();
        crc.update(content.prefix());
        let tail = content.tail();
        if let Some((_, _, c)) = tail {
            crc.combine(c);
        }
        let head = record::encode_message_head(env, trace, content.len(), &crc);
        let tail = tail.map(|(f, len, _)| (f, len));
        self.store_record(env, &head, content.prefix(), tail, extra)
            .await
    }

    async fn store_record(
        &self,
        env: &Envelope,
        head: &[u8],
        content: &[u8],
        tail: Option<(&File, u64)>,
        extra: Option<(&Arc<Segment>, &[u8])>,
    ) -> io::Result<Spooled> {
        let content_len = content.len() as u64 + tail.map_or(0, |(_, l)| l);
        let seg = self.segment()?;
        seg.live.fetch_add(1, Ordering::AcqRel);
        let start = match seg.append_with_tail(&[head, content], tail) {
            Ok(s) => s,
            Err(e) => {
                // The torn bytes are skipped by recovery; the segment is not used again.
                seg.live.fetch_sub(1, Ordering::AcqRel);
                self.retire();
                return Err(e);
            }
        };
        let log = match extra {
            Some((log, bytes)) => match log.append(&[bytes]) {
                Ok(_) => Some(self.committer.commit(log.clone())),
                Err(e) => {
                    // Not acknowledged: the message record must not be delivered.
                    seg.finish(&env.queue_id, &all_indexes(env.rcpts.len()), true);
                    return Err(e);
                }
            },
            None => None,
        };
        let mut committed = self.committer.commit(seg.clone()).await;
        if let Some(log) = log
            && let Err(e) = log.await
        {
            committed = committed.and(Err(e));
        }
        if let Err(e) = committed {
            // Never acknowledged: mark it finished so recovery does not deliver it.
            seg.finish(&env.queue_id, &all_indexes(env.rcpts.len()), true);
            self.retire();
            return Err(e);
        }
        Ok(Spooled {
            content_at: start + head.len() as u64,
            content_len,
            seg,
        })
    }
}

/// `[0, 1, …, n-1]`.
pub fn all_indexes(n: usize) -> Vec<u32> {
    (0..n as u32).collect()
}

/// A message found by recovery, with the recipients still to deliver.
#[derive(Debug)]
pub struct Recovered {
    pub record: MessageRecord,
    pub pending: Vec<u32>,
    pub seg: Arc<Segment>,
    /// Held by the operator when the server stopped.
    pub held: bool,
}

/// What recovery found.
#[derive(Debug, Default)]
pub struct Recovery {
    pub messages: Vec<Recovered>,
    pub segments_scanned: usize,
    pub segments_deleted: usize,
    pub corrupt_ranges: usize,
    pub next_id: u64,
}

/// Scan the spool directory, re-queue what is not finished and delete segments with nothing
/// left in them.
pub fn recover(dir: &Path) -> io::Result<Recovery> {
    fs::create_dir_all(dir)?;
    let mut ids: Vec<u64> = Vec::new();
    for e in fs::read_dir(dir)? {
        let name = e?.file_name();
        let name = name.to_string_lossy();
        if let Some(hex) = name.strip_suffix(".seg")
            && let Ok(id) = u64::from_str_radix(hex, 16)
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    let mut out = Recovery {
        next_id: ids.last().map_or(1, |l| l + 1),
        ..Recovery::default()
    };
    let mut seen: HashSet<String> = HashSet::new();
    for id in ids {
        let path = dir.join(segment_name(id));
        let bytes = fs::read(&path)?;
        out.segments_scanned += 1;
        let mut messages: Vec<MessageRecord> = Vec::new();
        let mut done: HashMap<String, HashSet<u32>> = HashMap::new();
        let mut held: HashMap<String, bool> = HashMap::new();
        let mut pos = 0usize;
        while pos < bytes.len() {
            let rest = bytes.get(pos..).unwrap_or_default();
            match record::parse(rest, pos as u64) {
                Ok((p, n)) => {
                    match p {
                        Parsed::Message(m) => messages.push(*m),
                        Parsed::Done(d) => done.entry(d.queue_id).or_default().extend(d.rcpts),
                        Parsed::Hold(id, h) => {
                            held.insert(id, h);
                        }
                        Parsed::Other => {}
                    }
                    pos += n;
                }
                Err(_) => {
                    out.corrupt_ranges += 1;
                    match record::trusted_len(rest) {
                        // The header was written whole: skip what it describes. Its content
                        // (a torn append, a failed copy) is never searched for records.
                        Some(n) if n <= rest.len() => pos += n,
                        // It runs past the end: the torn tail.
                        Some(_) => break,
                        // A damaged header (disk corruption): resynchronise on the next magic.
                        None => match memchr::memmem::find(
                            rest.get(1..).unwrap_or_default(),
                            record::MAGIC,
                        ) {
                            Some(i) => pos += i + 1,
                            None => break,
                        },
                    }
                }
            }
        }
        let mut live = Vec::new();
        for m in messages {
            let finished = done.get(&m.env.queue_id);
            let pending: Vec<u32> = (0..m.env.rcpts.len() as u32)
                .filter(|i| finished.is_none_or(|f| !f.contains(i)))
                .collect();
            // A message copied forward appears twice; the first copy found wins.
            if !pending.is_empty() && seen.insert(m.env.queue_id.clone()) {
                live.push((m, pending));
            }
        }
        if live.is_empty() {
            fs::remove_file(&path)?;
            out.segments_deleted += 1;
            continue;
        }
        let seg = Segment::open_existing(dir, id, bytes.len() as u64, live.len())?;
        for (record, pending) in live {
            out.messages.push(Recovered {
                held: held.get(&record.env.queue_id).copied().unwrap_or(false),
                record,
                pending,
                seg: seg.clone(),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;

impl std::fmt::Debug for Committer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Committer").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for CommitFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommitFuture").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for CoreSpool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoreSpool").finish_non_exhaustive()
    }
}
