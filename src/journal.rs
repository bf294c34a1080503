//! The durable log both the spool and the whitelist write: append-only segment files whose
//! appends are made durable by a per-core group committer (one `fdatasync` per batch of
//! waiters). It knows nothing of what the records mean.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

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
    /// A new segment file `{id:016x}.seg` in `dir`.
    pub fn create(dir: &Path, id: u64) -> io::Result<Arc<Segment>> {
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

    /// An existing segment found by recovery, with `live` entries still pending.
    pub fn open_existing(dir: &Path, id: u64, len: u64, live: usize) -> io::Result<Arc<Segment>> {
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
            copy_into(f, len, &self.file, at)?;
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

    /// Take a reference for an entry about to be appended (the file is kept while any is held).
    pub fn hold(&self) {
        self.live.fetch_add(1, Ordering::AcqRel);
    }

    /// Drop a reference taken by [`Segment::hold`]; the file is deleted once nothing holds it
    /// and it is no longer current.
    pub fn release(&self) {
        if self.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.delete_if_idle();
        }
    }

    /// No more appends go to this segment (rotated, or after an I/O error); deleted if idle.
    pub fn retire(&self) {
        self.current.store(false, Ordering::Release);
        self.delete_if_idle();
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

pub fn segment_name(id: u64) -> String {
    format!("{id:016x}.seg")
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
    batch: usize,
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
        let batch = batch.max(1);
        let thread = std::thread::Builder::new()
            .name(format!("ringmx-commit-{core}"))
            .spawn(move || commit_loop(&s, batch, delay, &stats))?;
        Ok(Committer {
            shared,
            batch,
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
        // The committer waits for a first append (idle) or for a full batch (filling, until
        // its delay): only those two need a wake. Waking it for every append cost a futex
        // call here and a context switch there per message.
        if wakes_committer(q.pending.len(), self.batch) {
            self.shared.cv.notify_one();
        }
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

/// Whether the append that made the queue `pending` long must wake the committer.
fn wakes_committer(pending: usize, batch: usize) -> bool {
    pending == 1 || pending == batch
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

/// Copy `len` bytes of `src` (from its start) into `dst` at `at`, inside the kernel where it
/// can (`copy_file_range`), else through a small buffer.
pub fn copy_into(src: &File, len: u64, dst: &File, at: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut off_in: libc::loff_t = 0;
    let mut off_out = at as libc::loff_t;
    let end = len as libc::loff_t;
    while off_in < end {
        let want = (end - off_in).min(1 << 30) as usize;
        // SAFETY: both descriptors are open files owned by the callers for the whole call; the
        // offsets are valid pointers to local variables the kernel updates.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                want,
                0,
            )
        };
        if n > 0 {
            continue;
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "staging file shorter than its content",
            ));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => break,
            _ => return Err(e),
        }
    }
    let mut buf = vec![0u8; 64 * 1024];
    while off_in < end {
        let n = buf.len().min((end - off_in) as usize);
        let chunk = buf.get_mut(..n).unwrap_or_default();
        src.read_exact_at(chunk, off_in as u64)?;
        dst.write_all_at(chunk, off_out as u64)?;
        off_in += n as libc::loff_t;
        off_out += n as libc::loff_t;
    }
    Ok(())
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committer_is_woken_for_a_first_append_and_a_full_batch_only() {
        // (pending after the append, batch): wake?
        for (pending, batch, wake) in [
            (1, 32, true),
            (2, 32, false),
            (31, 32, false),
            (32, 32, true),
            (33, 32, false),
            (1, 1, true),
            (2, 1, false),
        ] {
            assert_eq!(
                wakes_committer(pending, batch),
                wake,
                "{pending} of {batch}"
            );
        }
    }

    /// Poll until the committer has answered (no runtime here), for at most 5 s.
    fn wait(w: CommitFuture) -> io::Result<()> {
        let mut w = std::pin::pin!(w);
        let mut cx = Context::from_waker(Waker::noop());
        let started = Instant::now();
        loop {
            if let Poll::Ready(r) = w.as_mut().poll(&mut cx) {
                return r;
            }
            if started.elapsed() > Duration::from_secs(5) {
                return Err(io::ErrorKind::TimedOut.into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Both wakes, on a real committer: a full batch is flushed at once (its delay, 60 s, is
    /// far longer than `wait` waits), so is an append that finds the committer idle with a
    /// batch of 1, and a lone append with a batch of 4 waits for its delay (50 ms) only.
    #[test]
    fn full_batches_do_not_wait_for_the_delay() {
        let dir = std::env::temp_dir().join(format!("ringmx-journal-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let seg = Segment::create(&dir, 1).unwrap();
        let long = Duration::from_secs(60);
        for (batch, appends, delay) in [
            (4, 4, long),
            (1, 1, long),
            (4, 1, Duration::from_millis(50)),
        ] {
            let stats = Arc::new(CommitStats::default());
            let c = Committer::start(0, batch, delay, stats.clone()).unwrap();
            let waits: Vec<CommitFuture> = (0..appends)
                .map(|i| {
                    seg.append(&[format!("record {i}\n").as_bytes()]).unwrap();
                    c.commit(seg.clone())
                })
                .collect();
            for w in waits {
                wait(w).unwrap_or_else(|e| panic!("batch {batch}, {appends} appends: {e}"));
            }
            assert_eq!(
                stats.committed.load(Ordering::Relaxed),
                appends as u64,
                "batch {batch}"
            );
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
