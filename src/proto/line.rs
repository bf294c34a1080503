//! Command-line framing with a hard length cap enforced before more input is buffered.
//!
//! The runtime keeps whatever the session did not consume and appends the next read to it; the
//! framer only ever looks at `max_line` bytes, so a client that never sends LF cannot make that
//! buffer grow past the cap (nodemailer CVE-2026-38728 is the cautionary tale).

/// What the framer found at the start of the unconsumed input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A complete line, without its line ending; `consumed` counts the ending too.
    Line { line: &'a [u8], consumed: usize },
    /// No LF yet and fewer than `max_line` bytes: wait for more.
    Partial,
    /// The line is longer than the cap: the first `consumed` bytes (the whole window) may be
    /// dropped, and the caller discards input up to and including the next LF.
    TooLong { consumed: usize },
}

/// Find the next command line in `input`. Lines end in CRLF; a bare LF also ends a command line
/// (as in Postfix): the CRLF strictness that matters for smuggling is in the DATA reader.
/// `max_line` counts the line ending.
#[inline]
pub fn frame(input: &[u8], max_line: usize) -> Frame<'_> {
    let window = input.get(..max_line).unwrap_or(input);
    match find_lf(window) {
        Some(lf) => {
            let line = window.get(..lf).unwrap_or_default();
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            Frame::Line {
                line,
                consumed: lf + 1,
            }
        }
        None if input.len() >= max_line => Frame::TooLong {
            consumed: window.len(),
        },
        None => Frame::Partial,
    }
}

/// The first LF. On x86_64 the SSE2 searcher (SSE2 is part of the base ISA) is called
/// directly: command lines are short, and the generic `memchr` spends a good part of the time
/// on a short line in its run-time dispatch.
#[inline(always)]
fn find_lf(s: &[u8]) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    if let Some(one) = memchr::arch::x86_64::sse2::memchr::One::new(b'\n') {
        return one.find(s);
    }
    memchr::memchr(b'\n', s)
}

/// While discarding the tail of an over-long line: how many bytes to drop and whether the LF
/// that ends it was found.
#[inline]
pub fn skip_to_lf(input: &[u8]) -> (usize, bool) {
    match memchr::memchr(b'\n', input) {
        Some(lf) => (lf + 1, true),
        None => (input.len(), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_lines() {
        assert_eq!(
            frame(b"NOOP\r\nQUIT\r\n", 2048),
            Frame::Line {
                line: b"NOOP",
                consumed: 6
            }
        );
        assert_eq!(
            frame(b"NOOP\nQUIT", 2048),
            Frame::Line {
                line: b"NOOP",
                consumed: 5
            }
        );
        assert_eq!(frame(b"NOOP\r", 2048), Frame::Partial);
        assert_eq!(frame(b"", 2048), Frame::Partial);
    }

    #[test]
    fn cap_counts_the_line_ending() {
        // 8 bytes including CRLF fits a cap of 8; 9 does not.
        assert!(matches!(frame(b"123456\r\n", 8), Frame::Line { .. }));
        assert_eq!(
            frame(b"1234567\r\nNOOP\r\n", 8),
            Frame::TooLong { consumed: 8 }
        );
        assert_eq!(frame(b"1234567", 8), Frame::Partial);
        assert_eq!(frame(b"12345678", 8), Frame::TooLong { consumed: 8 });
    }

    #[test]
    fn skip() {
        assert_eq!(skip_to_lf(b"xx\nNOOP"), (3, true));
        assert_eq!(skip_to_lf(b"xxxx"), (4, false));
    }
}

#[cfg(test)]
mod oracle_tests {
    use super::*;
    use proptest::prelude::*;

    /// Byte-at-a-time oracle for `frame`.
    fn naive(input: &[u8], max_line: usize) -> Frame<'_> {
        for (i, &b) in input.iter().enumerate() {
            if i >= max_line {
                return Frame::TooLong { consumed: max_line };
            }
            if b == b'\n' {
                let mut line = &input[..i];
                if line.last() == Some(&b'\r') {
                    line = &line[..i - 1];
                }
                return Frame::Line {
                    line,
                    consumed: i + 1,
                };
            }
        }
        if input.len() >= max_line {
            Frame::TooLong { consumed: max_line }
        } else {
            Frame::Partial
        }
    }

    proptest! {
        #[test]
        fn frame_matches_oracle(
            input in prop::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'x')], 0..80),
            max_line in 1usize..64,
        ) {
            prop_assert_eq!(frame(&input, max_line), naive(&input, max_line));
        }
    }
}
