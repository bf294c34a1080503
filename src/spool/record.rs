//! The on-disk record format of spool segments.
//!
//! ```text
//! 0..4   magic "RMXR"
//! 4      kind: 1 = message, 2 = done (recipients finished: delivered, bounced or abandoned),
//!        3 = held / released by the operator
//! 5      header version: 1 = bytes 6..8 check the header (0 in records written before it)
//! 6..8   low 16 bits of the CRC-32 of bytes 4..6 and 8..12 (the header's own check)
//! 8..12  payload length, u32 little endian
//! 12..16 CRC-32 of bytes 4..12 and the payload
//! 16..   payload
//! ```
//! Recovery skips a damaged record by the length in its checked header ([`trusted_len`])
//! instead of scanning its bytes for the next magic: content is whatever a client sent, and
//! a record forged inside it must never be found. Only a header that fails its own check
//! (real disk corruption) makes recovery resynchronise by scanning.
//! A message payload is its envelope (length-prefixed fields), the trace header and the content,
//! in that order, so the content can be written straight from the session's buffer. Flag bit 4
//! marks a message with DSN parameters (RFC 3461), stored after the recipients: RET (0 none,
//! 1 FULL, 2 HDRS), ENVID, then per recipient NOTIFY (0 none, else the flags | 0x80) and ORCPT;
//! records without it read as before. Flag bit 5: BODY=BINARYMIME. Decoding
//! never trusts a length: every read is bounds-checked, and a record whose checksum does not
//! match is skipped by the recovery scan.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )
)]

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use crate::delivery::Direction;
use crate::delivery::{DsnRequest, DsnRet, Envelope, RcptDsn};

pub const MAGIC: &[u8; 4] = b"RMXR";
pub const HEADER: usize = 16;
pub const KIND_MESSAGE: u8 = 1;
pub const KIND_DONE: u8 = 2;
pub const KIND_HOLD: u8 = 3;

/// A decoded message record, with where its content sits in the segment.
#[derive(Debug, Clone)]
pub struct MessageRecord {
    pub env: Envelope,
    pub trace: String,
    /// Offset of the content in the segment file, and its length.
    pub content_at: u64,
    pub content_len: u64,
}

/// A decoded "done" record: these recipient indexes of `queue_id` are finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoneRecord {
    pub queue_id: String,
    pub rcpts: Vec<u32>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    let n = b.len().min(u16::MAX as usize);
    out.extend_from_slice(&(n as u16).to_le_bytes());
    out.extend_from_slice(b.get(..n).unwrap_or_default());
}

fn finish(rec: Vec<u8>, trailing: &[u8]) -> Vec<u8> {
    let mut h = crc32fast::Hasher::new();
    h.update(trailing);
    finish_with(rec, trailing.len() as u64, &h)
}

/// Fill in the length and checksum of a record whose last `trailing_len` bytes (checksummed
/// by `trailing_crc`) are written after `rec` without being in memory here.
fn finish_with(mut rec: Vec<u8>, trailing_len: u64, trailing_crc: &crc32fast::Hasher) -> Vec<u8> {
    let len = (rec.len() - HEADER) as u64 + trailing_len;
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    if let Some(l) = rec.get_mut(8..12) {
        l.copy_from_slice(&len.to_le_bytes());
    }
    let check = header_check(&rec);
    if let Some(c) = rec.get_mut(6..8) {
        c.copy_from_slice(&check.to_le_bytes());
    }
    let mut h = crc32fast::Hasher::new();
    h.update(rec.get(4..12).unwrap_or_default());
    h.update(rec.get(HEADER..).unwrap_or_default());
    h.combine(trailing_crc);
    let crc = h.finalize();
    if let Some(c) = rec.get_mut(12..16) {
        c.copy_from_slice(&crc.to_le_bytes());
    }
    rec
}

fn start(kind: u8) -> Vec<u8> {
    let mut rec = Vec::with_capacity(256);
    rec.extend_from_slice(MAGIC);
    rec.extend_from_slice(&[kind, HEADER_VERSION, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    rec
}

const HEADER_VERSION: u8 = 1;

/// The header's own check: CRC-32 of kind, version and length, low 16 bits.
fn header_check(head: &[u8]) -> u16 {
    let mut h = crc32fast::Hasher::new();
    h.update(head.get(4..6).unwrap_or_default());
    h.update(head.get(8..12).unwrap_or_default());
    (h.finalize() & 0xffff) as u16
}

/// The length of the record at the start of `buf` (header included) when its header is whole
/// and passes its own check — whether or not its payload is intact or even all there.
pub fn trusted_len(buf: &[u8]) -> Option<usize> {
    let head = buf.get(..HEADER)?;
    if head.get(..4) != Some(MAGIC.as_slice()) || head.get(5) != Some(&HEADER_VERSION) {
        return None;
    }
    let check = u16::from_le_bytes(arr(head.get(6..8)).ok()?);
    if check != header_check(head) {
        return None;
    }
    let len = u32::from_le_bytes(arr(head.get(8..12)).ok()?) as usize;
    HEADER.checked_add(len)
}

/// The bytes that precede `content` in a message record (the record is `head ++ content`).
pub fn encode_message(env: &Envelope, trace: &str, content: &[u8]) -> Vec<u8> {
    let mut h = crc32fast::Hasher::new();
    h.update(content);
    encode_message_head(env, trace, content.len() as u64, &h)
}

/// [`encode_message`] for content that is not in memory: its length and checksum.
pub fn encode_message_head(
    env: &Envelope,
    trace: &str,
    content_len: u64,
    content_crc: &crc32fast::Hasher,
) -> Vec<u8> {
    let mut r = start(KIND_MESSAGE);
    // Room for every field at once (DSN parameters aside), so the record is not copied as it
    // grows: the strings, their 2-byte lengths, and the fixed-size fields.
    let strings = [&env.queue_id, &env.mail_from, &env.helo, &env.binding]
        .into_iter()
        .chain(env.tls.as_ref())
        .chain(env.authenticated_as.as_ref())
        .chain(&env.rcpts)
        .map(|s| s.len() + 2)
        .sum::<usize>();
    r.reserve(128 + strings + trace.len());
    put_str(&mut r, &env.queue_id);
    let micros = env
        .received_at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    r.extend_from_slice(&micros.to_le_bytes());
    r.push(match env.direction {
        Direction::Inbound => 0,
        Direction::Outbound => 1,
    });
    let has_dsn = !env.dsn.is_empty();
    r.push(
        u8::from(env.esmtp)
            | (u8::from(env.is_bounce) << 1)
            | (u8::from(env.aswl.is_some()) << 2)
            | (u8::from(env.aswl == Some(true)) << 3)
            | (u8::from(has_dsn) << 4)
            | (u8::from(env.binary) << 5)
            | (u8::from(env.dmarc_quarantine) << 6)
            | (u8::from(env.sender_verified) << 7),
    );
    put_str(&mut r, &env.mail_from);
    put_str(&mut r, &env.client_ip.to_string());
    put_str(&mut r, &env.helo);
    put_str(&mut r, &env.binding);
    put_str(&mut r, env.tls.as_deref().unwrap_or(""));
    put_str(&mut r, env.authenticated_as.as_deref().unwrap_or(""));
    r.extend_from_slice(&(env.rcpts.len() as u32).to_le_bytes());
    for rc in &env.rcpts {
        put_str(&mut r, rc);
    }
    if has_dsn {
        let d = &env.dsn;
        r.push(match d.ret {
            None => 0,
            Some(DsnRet::Full) => 1,
            Some(DsnRet::Hdrs) => 2,
        });
        put_str(&mut r, d.envid.as_deref().unwrap_or(""));
        r.extend_from_slice(&(d.rcpts.len() as u32).to_le_bytes());
        for rc in &d.rcpts {
            r.push(rc.notify.map_or(0, |n| n | 0x80));
            put_str(&mut r, rc.orcpt.as_deref().unwrap_or(""));
        }
    }
    r.extend_from_slice(&(trace.len() as u32).to_le_bytes());
    r.extend_from_slice(trace.as_bytes());
    r.extend_from_slice(&content_len.to_le_bytes());
    finish_with(r, content_len, content_crc)
}

/// A "done" record for some recipients of a message.
pub fn encode_done(queue_id: &str, rcpts: &[u32]) -> Vec<u8> {
    let mut r = start(KIND_DONE);
    put_str(&mut r, queue_id);
    r.extend_from_slice(&(rcpts.len() as u32).to_le_bytes());
    for i in rcpts {
        r.extend_from_slice(&i.to_le_bytes());
    }
    finish(r, &[])
}

/// An operator's hold (`true`) or release (`false`) of a message; the last one found wins.
pub fn encode_hold(queue_id: &str, held: bool) -> Vec<u8> {
    let mut r = start(KIND_HOLD);
    put_str(&mut r, queue_id);
    r.push(u8::from(held));
    finish(r, &[])
}

/// What one position of a segment holds.
#[derive(Debug)]
pub enum Parsed {
    Message(Box<MessageRecord>),
    Done(DoneRecord),
    /// `(queue_id, held)`.
    Hold(String, bool),
    /// A valid record of a kind this version does not know (skipped).
    Other,
}

/// Why the bytes at a position are not a record.
#[derive(Debug, PartialEq, Eq)]
pub enum Invalid {
    /// Not enough bytes for the header or the payload (a torn tail).
    Truncated,
    /// Wrong magic or checksum, or a payload that does not decode.
    Corrupt,
}

/// Parse the record at the start of `buf`, which sits at `offset` in its file; returns it and
/// its total length.
pub fn parse(buf: &[u8], offset: u64) -> Result<(Parsed, usize), Invalid> {
    let head = buf.get(..HEADER).ok_or(Invalid::Truncated)?;
    if head.get(..4) != Some(MAGIC.as_slice()) {
        return Err(Invalid::Corrupt);
    }
    match head.get(5) {
        Some(&0) => {}
        Some(&HEADER_VERSION) if trusted_len(head).is_some() => {}
        _ => return Err(Invalid::Corrupt),
    }
    let len = u32::from_le_bytes(arr(head.get(8..12))?) as usize;
    let crc = u32::from_le_bytes(arr(head.get(12..16))?);
    let payload = buf.get(HEADER..HEADER + len).ok_or(Invalid::Truncated)?;
    let mut h = crc32fast::Hasher::new();
    h.update(head.get(4..12).unwrap_or_default());
    h.update(payload);
    if h.finalize() != crc {
        return Err(Invalid::Corrupt);
    }
    let kind = head.get(4).copied().unwrap_or(0);
    let mut rd = Reader {
        buf: payload,
        pos: 0,
    };
    let parsed = match kind {
        KIND_MESSAGE => Parsed::Message(Box::new(decode_message(&mut rd, offset + HEADER as u64)?)),
        KIND_DONE => {
            let queue_id = rd.str()?;
            let n = rd.u32()? as usize;
            let mut rcpts = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                rcpts.push(rd.u32()?);
            }
            Parsed::Done(DoneRecord { queue_id, rcpts })
        }
        KIND_HOLD => {
            let queue_id = rd.str()?;
            Parsed::Hold(queue_id, rd.u8()? != 0)
        }
        _ => Parsed::Other,
    };
    Ok((parsed, HEADER + len))
}

fn arr<const N: usize>(s: Option<&[u8]>) -> Result<[u8; N], Invalid> {
    s.and_then(|s| s.try_into().ok()).ok_or(Invalid::Corrupt)
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], Invalid> {
        let s = self
            .buf
            .get(self.pos..self.pos.checked_add(n).ok_or(Invalid::Corrupt)?)
            .ok_or(Invalid::Corrupt)?;
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, Invalid> {
        Ok(arr::<1>(Some(self.take(1)?))?[0])
    }
    fn u32(&mut self) -> Result<u32, Invalid> {
        Ok(u32::from_le_bytes(arr(Some(self.take(4)?))?))
    }
    fn u64(&mut self) -> Result<u64, Invalid> {
        Ok(u64::from_le_bytes(arr(Some(self.take(8)?))?))
    }
    fn str(&mut self) -> Result<String, Invalid> {
        let n = u16::from_le_bytes(arr(Some(self.take(2)?))?) as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| Invalid::Corrupt)
    }
}

fn decode_message(rd: &mut Reader<'_>, payload_at: u64) -> Result<MessageRecord, Invalid> {
    let queue_id = rd.str()?;
    let micros = rd.u64()?;
    let direction = match rd.u8()? {
        0 => Direction::Inbound,
        1 => Direction::Outbound,
        _ => return Err(Invalid::Corrupt),
    };
    let flags = rd.u8()?;
    let mail_from = rd.str()?;
    let client_ip: IpAddr = rd.str()?.parse().map_err(|_| Invalid::Corrupt)?;
    let helo = rd.str()?;
    let binding = rd.str()?;
    let tls = Some(rd.str()?).filter(|s| !s.is_empty());
    let authenticated_as = Some(rd.str()?).filter(|s| !s.is_empty());
    let n = rd.u32()? as usize;
    let mut rcpts = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        rcpts.push(rd.str()?);
    }
    let mut dsn = DsnRequest::default();
    if flags & 16 != 0 {
        dsn.ret = match rd.u8()? {
            0 => None,
            1 => Some(DsnRet::Full),
            2 => Some(DsnRet::Hdrs),
            _ => return Err(Invalid::Corrupt),
        };
        dsn.envid = Some(rd.str()?).filter(|s| !s.is_empty());
        let n = rd.u32()? as usize;
        for _ in 0..n {
            let notify = rd.u8()?;
            dsn.rcpts.push(RcptDsn {
                notify: (notify != 0).then_some(notify & 0x7f),
                orcpt: Some(rd.str()?).filter(|s| !s.is_empty()),
            });
        }
        // More DSN entries than recipients is a writer's mistake, not a reason to lose the
        // message: the extra ones are dropped.
        dsn.rcpts.truncate(rcpts.len());
    }
    let tlen = rd.u32()? as usize;
    let trace = String::from_utf8(rd.take(tlen)?.to_vec()).map_err(|_| Invalid::Corrupt)?;
    let content_len = rd.u64()?;
    let content_at = payload_at + rd.pos as u64;
    if rd.buf.len() - rd.pos != content_len as usize {
        return Err(Invalid::Corrupt);
    }
    Ok(MessageRecord {
        env: Envelope {
            queue_id,
            mail_from,
            rcpts,
            client_ip,
            helo,
            tls,
            authenticated_as,
            binding,
            esmtp: flags & 1 != 0,
            is_bounce: flags & 2 != 0,
            direction,
            received_at: SystemTime::UNIX_EPOCH + Duration::from_micros(micros),
            aswl: (flags & 4 != 0).then_some(flags & 8 != 0),
            dsn,
            binary: flags & 32 != 0,
            dmarc_quarantine: flags & 64 != 0,
            sender_verified: flags & 128 != 0,
        },
        trace,
        content_at,
        content_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn env() -> Envelope {
        Envelope {
            client_ip: "192.0.2.1".parse().unwrap(),
            tls: Some("TLSv1.3".into()),
            direction: Direction::Outbound,
            received_at: SystemTime::UNIX_EPOCH + Duration::from_micros(1_234_567),
            aswl: Some(true),
            dmarc_quarantine: true,
            sender_verified: true,
            ..Envelope::example("Q1", &["x@d.test", "y@d.test"])
        }
    }

    #[test]
    fn records_written_before_the_header_check_still_read() {
        let mut rec = encode_message(&env(), "T\r\n", b"x");
        rec.extend_from_slice(b"x");
        // As the previous format wrote it: version 0, no header check, CRC over the rest.
        rec[5] = 0;
        rec[6] = 0;
        rec[7] = 0;
        let mut h = crc32fast::Hasher::new();
        h.update(&rec[4..12]);
        h.update(&rec[HEADER..]);
        rec[12..16].copy_from_slice(&h.finalize().to_le_bytes());
        assert!(matches!(parse(&rec, 0), Ok((Parsed::Message(_), _))));
        assert_eq!(trusted_len(&rec), None, "no checked header to trust");
        let mut new = encode_message(&env(), "T\r\n", b"x");
        new.extend_from_slice(b"x");
        assert_eq!(trusted_len(&new), Some(new.len()));
        new[9] ^= 1;
        assert_eq!(trusted_len(&new), None, "a damaged length is not trusted");
    }

    #[test]
    fn dsn_parameters_round_trip() {
        let mut e = env();
        e.dsn = DsnRequest {
            ret: Some(DsnRet::Hdrs),
            envid: Some("QQ+2B1".into()),
            rcpts: vec![
                RcptDsn::default(),
                RcptDsn {
                    notify: Some(2 | 4),
                    orcpt: Some("rfc822;y+40d.test".into()),
                },
            ],
        };
        let mut rec = encode_message(&e, "T\r\n", b"x");
        rec.extend_from_slice(b"x");
        let Ok((Parsed::Message(m), _)) = parse(&rec, 0) else {
            panic!()
        };
        assert_eq!(m.env.dsn, e.dsn);
        // Without parameters the record is the same as before they existed.
        let plain = encode_message(&env(), "T\r\n", b"x");
        assert_eq!(plain[HEADER + 2 + 2 + 8 + 1] & 16, 0);
    }

    #[test]
    fn message_round_trip_and_checksum() {
        let e = env();
        let mut rec = encode_message(&e, "Received: x\r\n", b"hello\r\n");
        rec.extend_from_slice(b"hello\r\n");
        let (p, len) = parse(&rec, 100).unwrap();
        assert_eq!(len, rec.len());
        let Parsed::Message(m) = p else { panic!() };
        assert_eq!(m.env.rcpts, e.rcpts);
        assert_eq!(m.env.received_at, e.received_at);
        assert_eq!(m.env.tls.as_deref(), Some("TLSv1.3"));
        assert_eq!(m.env.direction, Direction::Outbound);
        assert_eq!(m.trace, "Received: x\r\n");
        let at = (m.content_at - 100) as usize;
        assert_eq!(&rec[at..at + m.content_len as usize], b"hello\r\n");
        // Any flipped byte is caught; any cut is a torn tail.
        for i in 0..rec.len() {
            let mut bad = rec.clone();
            bad[i] ^= 0x40;
            assert!(parse(&bad, 0).is_err(), "flip at {i}");
            assert_eq!(
                parse(&rec[..i], 0).unwrap_err(),
                Invalid::Truncated,
                "cut {i}"
            );
        }
    }

    #[test]
    fn done_round_trip() {
        let rec = encode_done("Q1", &[0, 2]);
        let (Parsed::Done(d), n) = parse(&rec, 0).unwrap() else {
            panic!()
        };
        assert_eq!(n, rec.len());
        assert_eq!(d.rcpts, vec![0, 2]);
        let rec = encode_hold("Q1", true);
        let (Parsed::Hold(id, held), _) = parse(&rec, 0).unwrap() else {
            panic!()
        };
        assert_eq!((id.as_str(), held), ("Q1", true));
    }
}
