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
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::delivery::Envelope;
use crate::journal::segment_name;
pub use crate::journal::{CommitFuture, CommitStats, Committer, Segment};
use record::{MessageRecord, Parsed};

/// Record that these recipients of a message in this segment are finished; when `all` is
/// true the message is, and the segment is deleted once nothing in it is live.
pub fn finish(seg: &Segment, queue_id: &str, rcpts: &[u32], all: bool) {
    if !rcpts.is_empty()
        && let Err(e) = seg.append(&[&record::encode_done(queue_id, rcpts)])
    {
        tracing::warn!(segment = %seg.path.display(), error = %e, "cannot append a done record (the message may be delivered again after a crash)");
    }
    if all {
        seg.release();
    }
}

/// Record an operator's hold or release, so it survives a restart (best effort, like done
/// records: it is made durable by the next commit of this segment, if any).
pub fn set_held(seg: &Segment, queue_id: &str, held: bool) {
    if let Err(e) = seg.append(&[&record::encode_hold(queue_id, held)]) {
        tracing::warn!(segment = %seg.path.display(), error = %e, "cannot record a hold");
    }
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
            old.retire();
        }
        Ok(seg)
    }

    /// Retire the current segment (after an I/O error: never append after a failed fsync).
    fn retire(&self) {
        if let Some(old) = self.current.borrow_mut().take() {
            old.retire();
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
        seg.hold();
        let start = match seg.append_with_tail(&[head, content], tail) {
            Ok(s) => s,
            Err(e) => {
                // The torn bytes are skipped by recovery; the segment is not used again.
                seg.release();
                self.retire();
                return Err(e);
            }
        };
        let log = match extra {
            Some((log, bytes)) => match log.append(&[bytes]) {
                Ok(_) => Some(self.committer.commit(log.clone())),
                Err(e) => {
                    // Not acknowledged: the message record must not be delivered.
                    finish(&seg, &env.queue_id, &all_indexes(env.rcpts.len()), true);
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
            finish(&seg, &env.queue_id, &all_indexes(env.rcpts.len()), true);
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

impl std::fmt::Debug for CoreSpool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoreSpool").finish_non_exhaustive()
    }
}
