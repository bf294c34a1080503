//! Message content while it arrives: the first `keep` bytes in memory (the header section and,
//! for most mail, the whole message), the rest streamed into an unnamed temporary file in the
//! spool directory (`O_TMPFILE`: nothing to clean up after a crash) as it is read. A session
//! therefore holds at most `keep` bytes of content however large the message, and the spool
//! copies the file into its segment (`copy_file_range`, inside the kernel) when the message is
//! accepted; the 250 still waits for the group-committed `fdatasync` of the segment.
//!
//! Postfix's cleanup does the same in spirit: content goes to the queue file as it arrives.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Disk the spill files of every session may take together (`[spool] max_staging`): beyond
/// it a transfer goes on but its message is refused at the end with `452 4.3.1`, so clients
/// cannot fill the spool's file system with unfinished messages.
#[derive(Debug)]
pub struct Budget {
    used: AtomicU64,
    limit: u64,
}

impl Budget {
    pub fn new(limit: u64) -> Budget {
        Budget {
            used: AtomicU64::new(0),
            limit,
        }
    }

    fn take(&self, n: u64) -> bool {
        let before = self.used.fetch_add(n, Ordering::AcqRel);
        if before.saturating_add(n) > self.limit {
            self.used.fetch_sub(n, Ordering::AcqRel);
            return false;
        }
        true
    }

    fn give(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }

    /// Bytes in spill files now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }
}

/// Content kept in memory before the rest goes to a file. Also the largest header section
/// ringmx will parse (see [`Staged::header_fits`]).
pub const DEFAULT_KEEP: usize = 128 * 1024;

/// The content of one message being received.
#[derive(Debug)]
pub struct Staged {
    dir: PathBuf,
    keep: usize,
    budget: Arc<Budget>,
    prefix: Vec<u8>,
    file: Option<File>,
    file_len: u64,
    file_crc: crc32fast::Hasher,
    error: Option<io::Error>,
}

impl Staged {
    /// Empty content; a spill file, when needed, is created in `dir`, within `budget`.
    pub fn new(dir: PathBuf, keep: usize, budget: Arc<Budget>) -> Staged {
        Staged {
            dir,
            keep: keep.max(1),
            budget,
            prefix: Vec::new(),
            file: None,
            file_len: 0,
            file_crc: crc32fast::Hasher::new(),
            error: None,
        }
    }

    /// Append content. A write error is remembered (the message is refused at its end) and
    /// later bytes are dropped.
    pub fn push(&mut self, mut b: &[u8]) {
        if self.error.is_some() {
            return;
        }
        if self.file.is_none() {
            let room = self.keep.saturating_sub(self.prefix.len()).min(b.len());
            let (now, rest) = b.split_at(room);
            self.prefix.extend_from_slice(now);
            b = rest;
            if b.is_empty() {
                return;
            }
        }
        if let Err(e) = self.spill(b) {
            self.error = Some(e);
        }
    }

    fn spill(&mut self, b: &[u8]) -> io::Result<()> {
        if !self.budget.take(b.len() as u64) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        if let Err(e) = self.write_spill(b) {
            self.budget.give(b.len() as u64);
            return Err(e);
        }
        Ok(())
    }

    fn write_spill(&mut self, b: &[u8]) -> io::Result<()> {
        let file = match &self.file {
            Some(f) => f,
            None => self.file.insert(open_unnamed(&self.dir)?),
        };
        file.write_all_at(b, self.file_len)?;
        self.file_len += b.len() as u64;
        self.file_crc.update(b);
        Ok(())
    }

    /// Bytes received.
    pub fn len(&self) -> u64 {
        self.prefix.len() as u64 + self.file_len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The content kept in memory (all of it when [`Staged::spilled`] is false).
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// Replace the in-memory part (a header section rewritten, e.g. a forged field removed).
    pub fn set_prefix(&mut self, p: Vec<u8>) {
        self.prefix = p;
    }

    /// Move the in-memory part out (the whole content when not spilled).
    pub fn take_prefix(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.prefix)
    }

    /// Part of the content is in the file.
    pub fn spilled(&self) -> bool {
        self.file.is_some()
    }

    /// Whether the header section ends inside the in-memory part (or the message is all in
    /// memory): what ringmx checks and rewrites in the header must be all of it.
    pub fn header_fits(&self, header_len: usize) -> bool {
        !self.spilled() || header_len < self.prefix.len()
    }

    /// The write error that spoiled this content, if any.
    pub fn take_error(&mut self) -> Option<io::Error> {
        self.error.take()
    }

    /// The file part: the file, its length and checksum.
    pub fn tail(&self) -> Option<(&File, u64, &crc32fast::Hasher)> {
        self.file
            .as_ref()
            .map(|f| (f, self.file_len, &self.file_crc))
    }

    /// Forget the content (the file is closed, and with it gone).
    pub fn clear(&mut self) {
        self.prefix.clear();
        if self.prefix.capacity() > self.keep {
            self.prefix = Vec::new();
        }
        self.file = None;
        self.budget.give(self.file_len);
        self.file_len = 0;
        self.file_crc = crc32fast::Hasher::new();
        self.error = None;
    }

    /// The whole content in memory (small messages; tests).
    pub fn to_vec(&self) -> io::Result<Vec<u8>> {
        let mut out = self.prefix.clone();
        if let Some((f, len, _)) = self.tail() {
            let at = out.len();
            out.resize(at + len as usize, 0);
            f.read_exact_at(out.get_mut(at..).unwrap_or_default(), 0)?;
        }
        Ok(out)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        self.budget.give(self.file_len);
    }
}

/// An unnamed file in `dir` (`O_TMPFILE`), or a named one unlinked at once where the file
/// system does not support that.
fn open_unnamed(dir: &std::path::Path) -> io::Result<File> {
    std::fs::create_dir_all(dir)?;
    let unnamed = OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir);
    match unnamed {
        Ok(f) => Ok(f),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR)) => {
            let path = dir.join(format!(
                ".staging-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            std::fs::remove_file(&path)?;
            Ok(f)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_stays_in_memory_large_spills_and_copies_back() {
        let dir = std::env::temp_dir().join(format!("ringmx-staging-{}", std::process::id()));
        let budget = Arc::new(Budget::new(1 << 20));
        let mut s = Staged::new(dir.clone(), 10, budget.clone());
        s.push(b"Subject: x");
        assert!(!s.spilled());
        s.push(b"\r\n\r\n");
        for i in 0..1000u32 {
            s.push(format!("line {i}\r\n").as_bytes());
        }
        assert!(s.spilled());
        assert_eq!(s.prefix(), b"Subject: x");
        let all = s.to_vec().unwrap();
        assert_eq!(s.len(), all.len() as u64);
        assert!(all.starts_with(b"Subject: x\r\n\r\nline 0\r\n"));
        assert!(all.ends_with(b"line 999\r\n"));
        // The checksum of the file part matches its bytes.
        let (f, len, crc) = s.tail().unwrap();
        assert_eq!(crc.clone().finalize(), crc32fast::hash(&all[10..]));
        // Copied into another file at an offset.
        let dst = open_unnamed(&dir).unwrap();
        crate::journal::copy_into(f, len, &dst, 7).unwrap();
        let mut back = vec![0; len as usize];
        dst.read_exact_at(&mut back, 7).unwrap();
        assert_eq!(back, &all[10..]);
        // A header section that ends beyond the in-memory part does not fit.
        assert!(!s.header_fits(12) && s.header_fits(5));
        assert_eq!(budget.used(), len);
        s.clear();
        assert!(s.is_empty() && !s.spilled());
        assert_eq!(budget.used(), 0);
        // Over the budget: the content is spoiled with "no space", and the budget unchanged.
        let mut small = Staged::new(dir.clone(), 4, Arc::new(Budget::new(8)));
        small.push(b"0123456789abcdef");
        assert_eq!(
            small.take_error().unwrap().raw_os_error(),
            Some(libc::ENOSPC)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
