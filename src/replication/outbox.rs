//! The durable outbox (local changes not yet in Redis) and the replication state file, in
//! `{aswl dir}/replication/`.
//!
//! `outbox`: `"RMXO" | epoch u64`, then change-log records exactly as the cores encoded them
//! (checksummed; a torn tail is ignored). Each append is `fdatasync`ed. What was sent is an
//! offset into the file *of an epoch*, kept in `state` (written lazily: sending again after a
//! crash is harmless). When everything is sent and the file has grown past 1 MiB it is
//! replaced by an empty one of a new epoch, so an old offset never skips new records.
//!
//! `state` (JSON, written to a temporary file, fsynced, renamed): node id, the Redis group it
//! belongs to, the last applied stream id, the outbox epoch and sent offset, the newest
//! `last_sent` written to the outbox, a republish owed (`since`), and whether the last stop
//! was clean.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::aswl::persist::{LogRecord, decode_log, encode_log};

const MAGIC: &[u8; 4] = b"RMXO";
const HEADER: u64 = 12;
const ROTATE_AT: u64 = 1 << 20;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct State {
    pub node: Option<String>,
    pub identity: String,
    /// The last stream id applied (`None` = bootstrap first).
    pub stream: Option<String>,
    pub epoch: u64,
    pub sent: u64,
    pub high_water: u32,
    pub republish_since: Option<u32>,
    pub clean: bool,
}

impl State {
    /// The state in `dir`, and whether there was none.
    pub fn load(dir: &Path) -> io::Result<(State, bool)> {
        match std::fs::read(dir.join("state")) {
            Ok(b) => serde_json::from_slice(&b)
                .map(|s| (s, false))
                .map_err(|e| io::Error::other(format!("{}: {e}", dir.join("state").display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok((State::default(), true)),
            Err(e) => Err(e),
        }
    }

    /// Owe a republish of the records last sent at or after `since`.
    pub fn owe_republish(&mut self, since: u32) {
        self.republish_since = Some(self.republish_since.map_or(since, |s| s.min(since)));
    }

    pub fn save(&self, dir: &Path) -> io::Result<()> {
        let tmp = dir.join("state.tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(self).map_err(io::Error::other)?)?;
        f.sync_data()?;
        std::fs::rename(&tmp, dir.join("state"))?;
        File::open(dir)?.sync_all()
    }
}

#[derive(Debug)]
struct Entry {
    rec: LogRecord,
    len: u64,
    at_ms: u64,
}

/// Local changes waiting for Redis.
#[derive(Debug)]
pub struct Outbox {
    path: PathBuf,
    file: File,
    epoch: u64,
    /// Bytes after the header.
    len: u64,
    sent: u64,
    pending: VecDeque<Entry>,
    records: usize,
    limit: usize,
}

/// What an append did.
#[derive(Debug, Default)]
pub struct Appended {
    pub high_water: u32,
    /// The outbox was full: adds since this time were dropped (republish them).
    pub overflow_since: Option<u32>,
    pub dropped: usize,
}

/// The oldest pending entries, up to a record count.
#[derive(Debug)]
pub struct Batch {
    pub records: Vec<LogRecord>,
    pub entries: usize,
    pub at_ms: u64,
}

impl Outbox {
    /// Open `dir/outbox`; records after `(epoch, sent)` are pending.
    pub fn open(dir: &Path, epoch: u64, sent: u64, limit: usize) -> io::Result<Outbox> {
        let path = dir.join("outbox");
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(mut f) => {
                f.read_to_end(&mut bytes)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let file_epoch = bytes
            .get(4..12)
            .filter(|_| bytes.starts_with(MAGIC))
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes);
        let body = bytes.get(HEADER as usize..).unwrap_or_default();
        let from = match file_epoch {
            Some(e) if e == epoch => (sent as usize).min(body.len()),
            _ => 0,
        };
        let (recs, _) = decode_log(body.get(from..).unwrap_or_default());
        let now = super::now_ms();
        let pending: VecDeque<Entry> = recs
            .into_iter()
            .map(|rec| Entry {
                len: record_len(&rec),
                rec,
                at_ms: now,
            })
            .collect();
        let epoch = file_epoch.unwrap_or(epoch).wrapping_add(1);
        let (file, len) = write_fresh(&path, epoch, &pending)?;
        Ok(Outbox {
            path,
            file,
            epoch,
            len,
            sent: 0,
            records: pending.iter().map(|e| e.rec.pairs.len()).sum(),
            pending,
            limit,
        })
    }

    /// Replace the file by one of a new epoch holding only the pending entries.
    fn rewrite(&mut self) -> io::Result<()> {
        self.epoch = self.epoch.wrapping_add(1);
        (self.file, self.len) = write_fresh(&self.path, self.epoch, &self.pending)?;
        self.sent = 0;
        Ok(())
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The sent offset in this epoch's file.
    pub fn sent_offset(&self) -> u64 {
        self.sent
    }

    pub fn records(&self) -> usize {
        self.records
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Append encoded change-log records (as the cores handed them over) durably.
    pub fn append(&mut self, items: &[Vec<u8>], at_ms: u64) -> io::Result<Appended> {
        let mut out = Appended::default();
        let mut new = Vec::new();
        for it in items {
            new.extend(decode_log(it).0);
        }
        let adding: usize = new.iter().map(|r| r.pairs.len()).sum();
        for r in new.iter().filter(|r| !r.remove) {
            out.high_water = out.high_water.max(r.t);
        }
        if self.records + adding > self.limit {
            // Full: drop every add (kept elsewhere: the whitelist itself) and remember since
            // when; removals are few and stay.
            let oldest = self
                .pending
                .iter()
                .map(|e| &e.rec)
                .chain(new.iter())
                .filter(|r| !r.remove)
                .map(|r| r.t)
                .min();
            let before = self.records + adding;
            self.pending.retain(|e| e.rec.remove);
            for rec in new.into_iter().filter(|r| r.remove) {
                self.pending.push_back(Entry {
                    len: record_len(&rec),
                    rec,
                    at_ms,
                });
            }
            self.records = self.pending.iter().map(|e| e.rec.pairs.len()).sum();
            out.dropped = before - self.records;
            out.overflow_since = oldest;
            self.rewrite()?;
            return Ok(out);
        }
        let mut buf = Vec::new();
        for it in items {
            buf.extend_from_slice(it);
        }
        self.file.write_all(&buf)?;
        self.file.sync_data()?;
        self.len += buf.len() as u64;
        for rec in new {
            self.records += rec.pairs.len();
            self.pending.push_back(Entry {
                len: record_len(&rec),
                rec,
                at_ms,
            });
        }
        Ok(out)
    }

    /// The oldest pending entries holding at most `max` records (at least one entry).
    pub fn peek(&self, max: usize) -> Batch {
        let mut b = Batch {
            records: Vec::new(),
            entries: 0,
            at_ms: u64::MAX,
        };
        let mut n = 0;
        for e in &self.pending {
            if b.entries > 0 && n + e.rec.pairs.len() > max {
                break;
            }
            n += e.rec.pairs.len();
            b.records.push(e.rec.clone());
            b.entries += 1;
            b.at_ms = b.at_ms.min(e.at_ms);
        }
        b
    }

    /// The first `entries` were sent.
    pub fn mark_sent(&mut self, entries: usize) -> io::Result<()> {
        for _ in 0..entries {
            if let Some(e) = self.pending.pop_front() {
                self.sent += e.len;
                self.records -= e.rec.pairs.len();
            }
        }
        if self.pending.is_empty() && self.len > ROTATE_AT {
            self.rewrite()?;
        }
        Ok(())
    }
}

/// Write `pending` as the outbox of `epoch` (temporary file, fsync, rename, directory fsync);
/// the file opened for appending and the length of its records.
fn write_fresh(path: &Path, epoch: u64, pending: &VecDeque<Entry>) -> io::Result<(File, u64)> {
    let tmp = path.with_extension("tmp");
    let mut buf = Vec::with_capacity(64 << 10);
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&epoch.to_le_bytes());
    for e in pending {
        buf.extend_from_slice(&encode_log(e.rec.remove, e.rec.t, &e.rec.pairs));
    }
    let mut f = File::create(&tmp)?;
    f.write_all(&buf)?;
    f.sync_data()?;
    std::fs::rename(&tmp, path)?;
    if let Some(d) = path.parent() {
        File::open(d)?.sync_all()?;
    }
    let file = OpenOptions::new().append(true).open(path)?;
    Ok((file, buf.len() as u64 - HEADER))
}

/// Encoded length of a record: the framing (12) + kind, time, count (9) + four u16-prefixed
/// strings per pair.
fn record_len(r: &LogRecord) -> u64 {
    let pairs: usize = r
        .pairs
        .iter()
        .map(|p| {
            8 + p.local.len().min(u16::MAX as usize)
                + p.local_original.len().min(u16::MAX as usize)
                + p.external.len().min(u16::MAX as usize)
                + p.external_original.len().min(u16::MAX as usize)
        })
        .sum();
    (21 + pairs) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aswl::Pair;

    fn pair(l: &str, e: &str) -> Pair {
        Pair {
            local: l.into(),
            local_original: l.into(),
            external: e.into(),
            external_original: e.into(),
        }
    }

    fn dir(name: &str) -> crate::test_dir::TestDir {
        let d = crate::test_dir::TestDir::new("outbox", name);
        std::fs::create_dir_all(&*d).unwrap();
        d
    }

    #[test]
    fn record_len_matches_the_encoding() {
        let r = encode_log(
            false,
            7,
            &[pair("a@example.test", "b@remote.test"), pair("c@x", "d@y")],
        );
        let (d, _) = decode_log(&r);
        assert_eq!(record_len(&d[0]), r.len() as u64);
    }

    #[test]
    fn pending_records_survive_a_reopen_and_sent_ones_do_not_return() {
        let d = dir("reopen");
        let mut o = Outbox::open(&d, 0, 0, 100).unwrap();
        let items: Vec<Vec<u8>> = (0..5)
            .map(|i| {
                encode_log(
                    false,
                    100 + i,
                    &[pair("a@example.test", &format!("x{i}@r.test"))],
                )
            })
            .collect();
        o.append(&items, 1).unwrap();
        let b = o.peek(2);
        assert_eq!(b.entries, 2);
        o.mark_sent(2).unwrap();
        let (epoch, sent) = (o.epoch(), o.sent_offset());
        drop(o);
        let o = Outbox::open(&d, epoch, sent, 100).unwrap();
        assert_eq!(o.records(), 3);
        let b = o.peek(100);
        let ts: Vec<u32> = b.records.iter().map(|r| r.t).collect();
        assert_eq!(ts, vec![102, 103, 104]);
        // A stale offset of another epoch sends everything again (never skips).
        let o = Outbox::open(&d, 12345, 10_000, 100).unwrap();
        assert_eq!(o.records(), 3);
    }

    #[test]
    fn a_full_outbox_drops_adds_keeps_removals_and_says_since_when() {
        let d = dir("full");
        let mut o = Outbox::open(&d, 0, 0, 3).unwrap();
        let mut items: Vec<Vec<u8>> = (0..3)
            .map(|i| {
                encode_log(
                    false,
                    50 + i,
                    &[pair("a@example.test", &format!("x{i}@r.test"))],
                )
            })
            .collect();
        items.push(encode_log(true, 60, &[pair("", "gone@r.test")]));
        let a = o.append(&items, 1).unwrap();
        assert_eq!(a.overflow_since, Some(50));
        assert_eq!(a.dropped, 3);
        assert_eq!(o.records(), 1);
        assert!(o.peek(10).records[0].remove);
        let a = o
            .append(
                &[encode_log(false, 70, &[pair("a@example.test", "y@r.test")])],
                2,
            )
            .unwrap();
        assert_eq!(a.overflow_since, None);
        assert_eq!(a.high_water, 70);
        assert_eq!(o.records(), 2);
    }
}
