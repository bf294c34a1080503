//! A message parsed for DKIM the way `mail-auth` parses it, with its body hashes computed in
//! blocks. mail-auth 0.11 canonicalizes the body into its digest one byte at a time (a digest
//! call per byte: about 10 µs per KiB with ring, against 1 µs for the same bytes in one call),
//! so here it parses the header block alone and the body hashes are redone over the whole
//! body: the same canonicalization (mail-auth's own `CanonicalBody`), the same digest
//! (mail-auth's `HashAlgorithm::hash`), fed through a buffer.

use mail_auth::AuthenticatedMessage;
use mail_auth::common::crypto::HashAlgorithm;
use mail_auth::common::headers::{Writable, Writer};
use mail_auth::dkim::canonicalize::CanonicalBody;

/// The message parsed for DKIM, with its first `max_signatures` signatures and only the body
/// hashes they use: a signature costs a key lookup, a verification and maybe a pass over the
/// body, so the first few are enough.
///
/// Signatures with a body length tag (`l=`) are verified too (and judged by the caller) while
/// there are few. mail-auth hashes the body once per distinct `l=`, so a message with more
/// signature fields than that, as mail-auth counts them (whatever their spelling, such as
/// `DKIM-Signature :`), is read strictly (`l=` ones are errors). Either way no more than
/// `max_signatures` passes over the body are made.
pub fn parse_message(message: &[u8], max_signatures: usize) -> Option<AuthenticatedMessage<'_>> {
    let head = message.get(..header_block_end(message))?;
    let mut m = AuthenticatedMessage::parse_with_opts(head, None, false)?;
    if m.dkim_headers.len() + m.errors.len() > max_signatures {
        m = AuthenticatedMessage::parse_with_opts(head, None, true)?;
    }
    m.dkim_headers.truncate(max_signatures);
    let signatures = &m.dkim_headers;
    m.body_hashes
        .retain(|(canonicalization, algorithm, length, _)| {
            signatures.iter().any(|s| {
                s.header.cb == *canonicalization
                    && HashAlgorithm::from(s.header.a) == *algorithm
                    && s.header.l == *length
            })
        });
    Some(with_body(m, message))
}

/// `AuthenticatedMessage::parse_with_opts(message, None, strict)`, with the same result.
///
/// The header block ends where mail-auth's own header parser stops ([`header_block_end`]).
/// Every decision that parser makes looks at most one byte past the line it ends, and it stops
/// without looking further, so parsing only that prefix gives the same fields, the same
/// signatures and the same body offset (the tests below and the `dkim_parse` fuzz target
/// compare the two on every kind of message end and line ending).
pub fn parse_exact(message: &[u8], strict: bool) -> Option<AuthenticatedMessage<'_>> {
    let head = message.get(..header_block_end(message))?;
    let m = AuthenticatedMessage::parse_with_opts(head, None, strict)?;
    Some(with_body(m, message))
}

/// `m`, parsed from the header block of `message`, with the whole message and the body hashes
/// of its whole body.
fn with_body<'a>(mut m: AuthenticatedMessage<'a>, message: &'a [u8]) -> AuthenticatedMessage<'a> {
    m.raw_message = message;
    let body = message.get(m.body_offset as usize..).unwrap_or_default();
    for (canonicalization, algorithm, length, hash) in &mut m.body_hashes {
        *hash = algorithm
            .hash(Blocks(canonicalization.canonical_body(body, *length)))
            .as_ref()
            .to_vec();
    }
    m
}

/// Where mail-auth 0.11's header parser (`HeaderParser`, not public) ends the header block: a
/// line end seen before any colon of a field ends it when it follows a CR or starts the field
/// (an empty line); a colon-less line ended by a bare LF and not continued is a field of its
/// own; a field with a colon ends at an LF not followed by a space or tab.
fn header_block_end(message: &[u8]) -> usize {
    let (mut start, mut colon, mut last) = (0, false, 0u8);
    for (i, &ch) in message.iter().enumerate() {
        let continued = matches!(message.get(i + 1), Some(b' ' | b'\t'));
        if !colon {
            match ch {
                b':' => colon = true,
                b'\n' if last == b'\r' || start == i => return i + 1,
                b'\n' if !continued => {
                    (start, last) = (i + 1, 0);
                    continue;
                }
                _ => {}
            }
        } else if ch == b'\n' && !continued {
            (start, colon, last) = (i + 1, false, 0);
            continue;
        }
        last = ch;
    }
    message.len()
}

/// A canonical body written to a digest in blocks of up to [`BLOCK`] bytes.
struct Blocks<'a>(CanonicalBody<'a>);

const BLOCK: usize = 4096;

impl Writable for Blocks<'_> {
    fn write(self, writer: &mut impl Writer) {
        let mut buffered = Buffered {
            out: writer,
            buf: [0; BLOCK],
            len: 0,
        };
        self.0.write(&mut buffered);
        buffered.flush();
    }
}

struct Buffered<'w, W: Writer> {
    out: &'w mut W,
    buf: [u8; BLOCK],
    len: usize,
}

impl<W: Writer> Buffered<'_, W> {
    fn flush(&mut self) {
        if let Some(pending) = self.buf.get(..self.len)
            && !pending.is_empty()
        {
            self.out.write(pending);
        }
        self.len = 0;
    }
}

impl<W: Writer> Writer for Buffered<'_, W> {
    fn write(&mut self, bytes: &[u8]) {
        // The canonicalization writes one byte at a time, mostly.
        if let (&[byte], Some(slot)) = (bytes, self.buf.get_mut(self.len)) {
            *slot = byte;
            self.len += 1;
            return;
        }
        let end = self.len + bytes.len();
        match self.buf.get_mut(self.len..end) {
            Some(room) => {
                room.copy_from_slice(bytes);
                self.len = end;
            }
            None => {
                self.flush();
                match self.buf.get_mut(..bytes.len()) {
                    Some(room) => {
                        room.copy_from_slice(bytes);
                        self.len = bytes.len();
                    }
                    None => self.out.write(bytes),
                }
            }
        }
    }
}

/// The fuzz target `dkim_parse`: [`parse_exact`] gives what mail-auth's own parse of the whole
/// message gives, strict or not, and the header block ends exactly where mail-auth's parser
/// ends it (past it would only cost time; before it would lose fields). [`parse_message`] keeps
/// its bounds and takes its signatures and body hashes from the same parse.
pub(crate) fn fuzz_parse(message: &[u8]) {
    // Everything the DKIM, DMARC and From: checks read from a parsed message.
    fn summary(m: &AuthenticatedMessage<'_>) -> String {
        format!(
            "{:?} {:?} {} {} {:?} {} {:?} {}",
            m.headers,
            m.from,
            m.raw_message.len(),
            m.body_offset,
            m.body_hashes,
            m.dkim_headers.len(),
            m.errors.iter().map(|e| e.name).collect::<Vec<_>>(),
            m.has_dkim_errors,
        )
    }
    if let Some(m) = AuthenticatedMessage::parse(message) {
        assert_eq!(header_block_end(message), m.body_offset as usize);
    }
    for strict in [false, true] {
        let theirs = AuthenticatedMessage::parse_with_opts(message, None, strict);
        let ours = parse_exact(message, strict);
        assert_eq!(theirs.as_ref().map(summary), ours.as_ref().map(summary));
    }
    const MAX: usize = 3;
    let Some(bounded) = parse_message(message, MAX) else {
        return;
    };
    let lenient = AuthenticatedMessage::parse_with_opts(message, None, false);
    let strict = lenient
        .as_ref()
        .is_some_and(|m| m.dkim_headers.len() + m.errors.len() > MAX);
    let Some(theirs) = AuthenticatedMessage::parse_with_opts(message, None, strict) else {
        panic!("parsed by one and not the other");
    };
    assert_eq!(
        bounded.dkim_headers.len(),
        theirs.dkim_headers.len().min(MAX)
    );
    assert!(bounded.body_hashes.len() <= MAX);
    for hash in &bounded.body_hashes {
        assert!(theirs.body_hashes.contains(hash));
    }
    for (s, t) in bounded.dkim_headers.iter().zip(&theirs.dkim_headers) {
        assert_eq!(s.value, t.value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same(message: &[u8]) {
        fuzz_parse(message);
    }

    const SIG: &str = "DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/simple; d=a.test; s=s;\r\n \
                       h=from; bh=AAAA; b=AAAA\r\n";
    const SIG_L: &str = "DKIM-Signature: v=1; a=rsa-sha1; c=simple/relaxed; d=a.test; s=s; l=7;\r\n \
                         h=from; bh=AAAA; b=AAAA\r\n";

    #[test]
    fn the_same_parse_as_mail_auth() {
        let long = "x \t y  \r\n".repeat(2000);
        let bodies = [
            "",
            "\r\n",
            "\r\n\r\n\r\n",
            "one line",
            "one line\r\n",
            "a  b \t\r\n\r\n c\r\n\r\n\r\n",
            "bare\nlf\n\n",
            "cr\ronly\r",
            " leading space\r\n",
            long.as_str(),
        ];
        let heads = [
            format!("From: a@a.test\r\n{SIG}"),
            format!("From: a@a.test\r\n{SIG}{SIG_L}"),
            format!("{SIG_L}From: a@a.test\n"),
            // A line without a colon ends the header block early.
            format!("From: a@a.test\r\nno colon here\r\n{SIG}"),
            "From: a@a.test\nno colon, bare LF\nSubject: x\n".to_string(),
            // Folded fields, a field ending the input, white space lines.
            "Subject: a\r\n\tb\r\nFrom: a@a.test\r\n".to_string(),
            "From: a@a.test\r\n \r\n".to_string(),
            "\r\n".to_string(),
            String::new(),
        ];
        for head in &heads {
            for sep in ["\r\n", "\n", ""] {
                for body in bodies {
                    same(format!("{head}{sep}{body}").as_bytes());
                }
            }
        }
        same(b"From: a@a.test");
        same(b"From: a@a.test\r");
        same(b":\r\n\r\nbody");
    }

    #[test]
    fn many_signatures_cost_a_few_passes_over_the_body() {
        // `n` fields mail-auth takes for signatures whatever their spelling, each with its own
        // body length, and two without.
        let message = |n: usize| {
            let mut m = String::from("From: a@a.test\r\n");
            for (i, name) in ["DKIM-Signature", "DKIM-Signature ", "dkim-signature\t"]
                .iter()
                .cycle()
                .take(n)
                .enumerate()
            {
                m += &format!(
                    "{name}: v=1; a=rsa-sha256; d=a.test; s=s; h=from; bh=AA==; b=AA==; l={}\r\n",
                    1000 + i
                );
            }
            m += "DKIM-Signature: v=1; a=rsa-sha256; d=a.test; s=s; h=from; bh=AA==; b=AA==\r\n";
            m += "DKIM-Signature: v=1; a=rsa-sha1; d=a.test; s=s; h=from; bh=AA==; b=AA==\r\n";
            m + "\r\n" + &"body\r\n".repeat(10_000)
        };
        // Many: read strictly, the `l=` ones are errors, the two without remain.
        let many = message(300);
        let p = parse_message(many.as_bytes(), 8).unwrap();
        assert_eq!((p.dkim_headers.len(), p.body_hashes.len()), (2, 2));
        // Few enough: read leniently, `l=` and all.
        let few = message(5);
        let p = parse_message(few.as_bytes(), 8).unwrap();
        assert_eq!((p.dkim_headers.len(), p.body_hashes.len()), (7, 7));
        assert_eq!(p.dkim_headers.iter().filter(|s| s.header.l > 0).count(), 5);
        // One more than the bound: strict.
        let over = message(7);
        let p = parse_message(over.as_bytes(), 8).unwrap();
        assert_eq!((p.dkim_headers.len(), p.body_hashes.len()), (2, 2));
        fuzz_parse(few.as_bytes());
    }

    #[test]
    fn blocks_are_bounded_and_exact() {
        // Writes that fill the buffer exactly, cross it, and exceed it.
        let mut out = Vec::new();
        {
            let mut b = Buffered {
                out: &mut out,
                buf: [0; BLOCK],
                len: 0,
            };
            for chunk in [
                &[1u8; BLOCK - 1][..],
                &[2; 1],
                &[3; 10],
                &[4; BLOCK + 5],
                &[5; 3],
            ] {
                b.write(chunk);
            }
            b.flush();
        }
        let mut want = vec![1u8; BLOCK - 1];
        want.extend([2; 1]);
        want.extend([3; 10]);
        want.extend([4; BLOCK + 5]);
        want.extend([5; 3]);
        assert_eq!(out, want);
    }

    proptest::proptest! {
        #[test]
        fn any_message_parses_the_same(
            parts in proptest::collection::vec(
                proptest::sample::select(vec![
                    "From: a@a.test", "DKIM-Signature: v=1; a=rsa-sha256; d=a.test; s=s; \
                     h=from; bh=AAAA; b=AAAA", "l=3;", ":", "\r\n", "\n", "\r", " ", "\t",
                    "x", "Subject", "\r\n\r\n", "\n\n",
                ]),
                0..40,
            )
        ) {
            let mut m = String::from("From: a@a.test\r\n");
            m.extend(parts);
            same(m.as_bytes());
            same(&m.as_bytes()[16..]);
        }
    }
}
