//! The DATA reader: dot-unstuffing, end of data only at CRLF.CRLF, and a policy for bare CR and
//! bare LF (CVE-2023-51764, CVE-2023-51765, CVE-2023-51766: `\n.\n`, `\n.\r\n`, `\r.\r\n`,
//! `\r\n.\r`, … must never end a message, or a relay and its next hop disagree about where the
//! message stops and the tail is read as new commands).
//!
//! The reader hands out zero-copy slices of the input. It never holds more than the three bytes
//! of a possible terminator (`CR`, `.`, `.CR`), kept as a state, not as a copy, so a read that
//! ends anywhere costs nothing extra.
//!
//! Fast path, in pseudocode, over 64-byte blocks (AVX-512BW or AVX2 when the CPU has them,
//! else a byte loop):
//! ```text
//! lf, cr, dot = bitmasks of '\n', '\r', '.' in the block
//! bad = lf  & !(cr << 1 | cr_carry)    // LF not after CR: bare LF
//!     | cr  & !(lf >> 1 | next_is_lf)  // CR not before LF: bare CR
//!     | dot &  (lf << 1 | lf_carry)    // '.' starting a line: stuffing or the terminator
//! if bad == 0: the whole block is ordinary text, emit it untouched
//! else: emit up to the first bad bit and let the byte state machine handle that byte
//! ```

/// What to do with a CR not followed by LF or an LF not preceded by CR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BareLinePolicy {
    /// Fail the transaction with a 5xx at end of data; no message is produced.
    #[default]
    Reject,
    /// Replace each bare CR and bare LF by CRLF. Line starts after a bare ending are not
    /// treated as line starts for dot-unstuffing (only a real CRLF starts a line).
    Normalize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Inside a line; everything seen has been emitted.
    Text,
    /// After a CR that is not yet known to be part of CRLF (the CR is held, not emitted).
    Cr,
    /// Right after CRLF (emitted); a '.' here is special.
    LineStart,
    /// After CRLF '.'; the dot is held.
    Dot,
    /// After CRLF '.' CR; dot and CR are held.
    DotCr,
}

/// One result of [`DataReader::next`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk<'a> {
    /// Message content (possibly a static CRLF from normalisation, or a held byte).
    Data(&'a [u8]),
    /// CRLF.CRLF seen; the message is complete.
    End,
    /// The input is used up; call again with more.
    NeedMore,
}

/// Streaming DATA reader.
#[derive(Debug, Clone)]
pub struct DataReader {
    state: State,
    policy: BareLinePolicy,
    bare: bool,
}

const CRLF: &[u8] = b"\r\n";

impl DataReader {
    /// A reader positioned just after the DATA command's CRLF (i.e. at a line start).
    pub fn new(policy: BareLinePolicy) -> Self {
        DataReader {
            state: State::LineStart,
            policy,
            bare: false,
        }
    }

    /// Whether a bare CR or LF has been seen so far.
    pub fn saw_bare_line_ending(&self) -> bool {
        self.bare
    }

    /// The policy in force.
    pub fn policy(&self) -> BareLinePolicy {
        self.policy
    }

    /// Consume from `input`; returns the number of bytes consumed and what they produced.
    /// Repeated calls with the unconsumed rest yield the message as a sequence of slices.
    #[inline]
    pub fn next<'a>(&mut self, input: &'a [u8]) -> (usize, Chunk<'a>) {
        let mut pos = 0;
        loop {
            let rest = input.get(pos..).unwrap_or_default();
            let Some(&b) = rest.first() else {
                return (pos, Chunk::NeedMore);
            };
            match self.state {
                State::Text | State::LineStart => {
                    let n = clean_prefix(rest, self.state == State::LineStart);
                    if n > 0 {
                        if rest.get(n - 1) == Some(&b'\n') {
                            self.state = State::LineStart;
                        } else {
                            self.state = State::Text;
                        }
                        return (pos + n, Chunk::Data(rest.get(..n).unwrap_or_default()));
                    }
                    // `b` is CR, LF or a line-starting '.'.
                    pos += 1;
                    match b {
                        b'\r' => self.state = State::Cr,
                        b'\n' => {
                            if let Some(out) = self.bare_ending() {
                                return (pos, Chunk::Data(out));
                            }
                        }
                        _ => self.state = State::Dot,
                    }
                }
                State::Cr => {
                    if b == b'\n' {
                        self.state = State::LineStart;
                        return (pos + 1, Chunk::Data(CRLF));
                    }
                    // The held CR is bare; `b` is handled from Text on the next turn.
                    if let Some(out) = self.bare_ending() {
                        return (pos, Chunk::Data(out));
                    }
                }
                State::Dot => {
                    if b == b'\r' {
                        pos += 1;
                        self.state = State::DotCr;
                    } else {
                        // RFC 5321 §4.5.2: a leading '.' followed by anything else is deleted.
                        self.state = State::Text;
                    }
                }
                State::DotCr => {
                    if b == b'\n' {
                        self.state = State::LineStart;
                        return (pos + 1, Chunk::End);
                    }
                    // CRLF '.' CR x: the dot is deleted, the CR is bare.
                    if let Some(out) = self.bare_ending() {
                        return (pos, Chunk::Data(out));
                    }
                }
            }
        }
    }

    /// A bare CR or LF was consumed: record it and return what to emit in its place.
    fn bare_ending(&mut self) -> Option<&'static [u8]> {
        self.bare = true;
        self.state = State::Text;
        match self.policy {
            BareLinePolicy::Normalize => Some(CRLF),
            // The transaction fails at end of data; nothing of it is delivered.
            BareLinePolicy::Reject => None,
        }
    }
}

/// Length of the longest prefix of `s` that is ordinary text: every LF preceded by CR, every CR
/// followed by LF (a CR at the very end is not known to be, so it ends the prefix), and no '.'
/// at a line start. `line_start` says the byte before `s` ended a CRLF.
#[inline]
pub(crate) fn clean_prefix(s: &[u8], line_start: bool) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        if s.len() >= 64 {
            if std::arch::is_x86_feature_detected!("avx512bw") {
                // SAFETY: the CPU supports AVX-512BW (checked just above).
                return unsafe { simd::clean_prefix_avx512(s, line_start) };
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2 (checked just above).
                return unsafe { simd::clean_prefix_avx2(s, line_start) };
            }
        }
    }
    clean_prefix_scalar(s, false, line_start)
}

/// Byte-at-a-time version; `prev_cr`/`prev_lf` describe the byte before `s`.
#[inline]
pub(crate) fn clean_prefix_scalar(s: &[u8], mut prev_cr: bool, mut prev_lf: bool) -> usize {
    for (i, &b) in s.iter().enumerate() {
        match b {
            b'\n' if !prev_cr => return i,
            b'\r' if s.get(i + 1) != Some(&b'\n') => return i,
            b'.' if prev_lf => return i,
            _ => {}
        }
        prev_cr = b == b'\r';
        prev_lf = b == b'\n';
    }
    s.len()
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::{
        __m256i, __m512i, _mm256_cmpeq_epi8, _mm256_loadu_si256, _mm256_movemask_epi8,
        _mm256_set1_epi8, _mm512_cmpeq_epi8_mask, _mm512_loadu_si512, _mm512_maskz_loadu_epi8,
        _mm512_set1_epi8,
    };

    /// The masks of one 64-byte block → the first offending byte, if any (see the module's
    /// pseudocode). `carry` bits describe the byte before the block, `next_is_lf` the one after.
    #[inline(always)]
    fn first_bad(
        lf: u64,
        cr: u64,
        dot: u64,
        cr_carry: u64,
        lf_carry: u64,
        next_is_lf: u64,
    ) -> Option<usize> {
        let bad = (lf & !((cr << 1) | cr_carry))
            | (cr & !((lf >> 1) | (next_is_lf << 63)))
            | (dot & ((lf << 1) | lf_carry));
        (bad != 0).then(|| bad.trailing_zeros() as usize)
    }

    /// AVX-512BW version of [`super::clean_prefix`]: one compare per byte class gives the
    /// 64-bit mask directly.
    ///
    /// # Safety
    /// The CPU must support AVX-512BW.
    #[target_feature(enable = "avx512bw")]
    pub(super) unsafe fn clean_prefix_avx512(s: &[u8], line_start: bool) -> usize {
        let lf_v = _mm512_set1_epi8(b'\n' as i8);
        let cr_v = _mm512_set1_epi8(b'\r' as i8);
        let dot_v = _mm512_set1_epi8(b'.' as i8);
        let mut cr_carry = 0u64;
        let mut lf_carry = u64::from(line_start);
        let mut o = 0usize;
        while let Some(block) = s.get(o..o + 64) {
            // SAFETY: `block` is 64 readable bytes; loadu has no alignment requirement.
            let v = unsafe { _mm512_loadu_si512(block.as_ptr().cast::<__m512i>()) };
            let lf = _mm512_cmpeq_epi8_mask(v, lf_v);
            let cr = _mm512_cmpeq_epi8_mask(v, cr_v);
            let dot = _mm512_cmpeq_epi8_mask(v, dot_v);
            // Fast check: every LF right after a CR and every CR right before an LF is exactly
            // `lf == cr << 1 | carry` (a CR in bit 63 is carried into the next block), and no
            // dot follows an LF.
            let x = lf ^ ((cr << 1) | cr_carry);
            let d = dot & ((lf << 1) | lf_carry);
            if (x | d) != 0 {
                if cr_carry != 0 && lf & 1 == 0 {
                    return o - 1; // the previous block's final CR is not followed by LF
                }
                let next_is_lf = u64::from(s.get(o + 64) == Some(&b'\n'));
                if let Some(i) = first_bad(lf, cr, dot, cr_carry, lf_carry, next_is_lf) {
                    return o + i;
                }
            }
            cr_carry = cr >> 63;
            lf_carry = lf >> 63;
            o += 64;
        }
        // The last partial block, with a masked load that touches only the bytes that exist.
        let rest = s.len() - o;
        let valid = if rest >= 64 {
            u64::MAX
        } else {
            (1u64 << rest) - 1
        };
        // SAFETY: `o <= s.len()`, so the pointer is in bounds or one past the end, and the mask
        // selects only the `rest` bytes that exist (masked-off lanes are never accessed).
        let v = unsafe { _mm512_maskz_loadu_epi8(valid, s.as_ptr().add(o).cast::<i8>()) };
        let lf = _mm512_cmpeq_epi8_mask(v, lf_v) & valid;
        let cr = _mm512_cmpeq_epi8_mask(v, cr_v) & valid;
        let dot = _mm512_cmpeq_epi8_mask(v, dot_v) & valid;
        if cr_carry != 0 && lf & 1 == 0 {
            return o - 1; // the previous block's final CR is not followed by LF (or not yet)
        }
        // A CR in the last valid position has no LF after it yet: `first_bad` flags it.
        match first_bad(lf, cr, dot, cr_carry, lf_carry, 0) {
            Some(i) => o + i,
            None => s.len(),
        }
    }

    /// AVX2 version of [`super::clean_prefix`].
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn clean_prefix_avx2(s: &[u8], line_start: bool) -> usize {
        let lf_v = _mm256_set1_epi8(b'\n' as i8);
        let cr_v = _mm256_set1_epi8(b'\r' as i8);
        let dot_v = _mm256_set1_epi8(b'.' as i8);
        let mut cr_carry = 0u64;
        let mut lf_carry = u64::from(line_start);
        let mut o = 0usize;
        while let Some(block) = s.get(o..o + 64) {
            let p = block.as_ptr();
            // SAFETY: `block` is 64 readable bytes, so both unaligned 32-byte loads are in
            // bounds; loadu has no alignment requirement.
            let (a, b) = unsafe {
                (
                    _mm256_loadu_si256(p.cast::<__m256i>()),
                    _mm256_loadu_si256(p.add(32).cast::<__m256i>()),
                )
            };
            let mask = |v| {
                let lo = _mm256_movemask_epi8(_mm256_cmpeq_epi8(a, v)) as u32;
                let hi = _mm256_movemask_epi8(_mm256_cmpeq_epi8(b, v)) as u32;
                u64::from(lo) | (u64::from(hi) << 32)
            };
            let (lf, cr, dot) = (mask(lf_v), mask(cr_v), mask(dot_v));
            let next_is_lf = u64::from(s.get(o + 64) == Some(&b'\n'));
            if let Some(i) = first_bad(lf, cr, dot, cr_carry, lf_carry, next_is_lf) {
                return o + i;
            }
            cr_carry = cr >> 63;
            lf_carry = lf >> 63;
            o += 64;
        }
        let tail = s.get(o..).unwrap_or_default();
        o + super::clean_prefix_scalar(tail, cr_carry != 0, lf_carry != 0)
    }
}

/// A byte-at-a-time reference reader, written independently of the fast path, used by the
/// property tests and the differential fuzz target.
/// Line-ending check for BDAT chunks (RFC 3030), which carry content without dot-stuffing:
/// the same bare CR / bare LF policy as DATA, so content that arrives by BDAT cannot carry line
/// endings that a next hop reading DATA would take differently (CVE-2023-51764 family). The
/// state survives chunk boundaries: a CR at the end of one chunk and an LF at the start of the
/// next are one CRLF. Hands out zero-copy slices like [`DataReader`].
#[derive(Debug, Clone, Default)]
pub struct ChunkLines {
    policy: BareLinePolicy,
    /// A CR ended the previous input; not yet known to be part of CRLF (held, not emitted).
    cr_held: bool,
    bare: bool,
}

impl ChunkLines {
    /// A checker at the start of the content.
    pub fn new(policy: BareLinePolicy) -> Self {
        ChunkLines {
            policy,
            cr_held: false,
            bare: false,
        }
    }

    /// Whether a bare CR or LF has been seen so far.
    pub fn saw_bare_line_ending(&self) -> bool {
        self.bare
    }

    /// Consume from `input`; returns the bytes consumed and the content they produce (possibly
    /// empty, possibly a static CRLF). Call again with the unconsumed rest.
    pub fn next<'a>(&mut self, input: &'a [u8]) -> (usize, &'a [u8]) {
        if self.cr_held {
            let Some(&first) = input.first() else {
                return (0, &[]);
            };
            self.cr_held = false;
            if first == b'\n' {
                return (1, CRLF);
            }
            return (0, self.bare_ending());
        }
        let mut from = 0;
        loop {
            let Some(i) = input
                .get(from..)
                .and_then(|r| memchr::memchr2(b'\r', b'\n', r))
                .map(|i| i + from)
            else {
                return (input.len(), input);
            };
            let is_cr = input.get(i) == Some(&b'\r');
            match (is_cr, input.get(i + 1)) {
                (true, Some(b'\n')) => from = i + 2,
                // A CR at the end: emit what precedes it and hold it.
                (true, None) if i > 0 => return (i, input.get(..i).unwrap_or_default()),
                (true, None) => {
                    self.cr_held = true;
                    return (1, &[]);
                }
                // A bare CR or LF: emit what precedes it, then handle it alone.
                _ if i > 0 => return (i, input.get(..i).unwrap_or_default()),
                _ => return (1, self.bare_ending()),
            }
        }
    }

    /// End of the content: a CR still held is bare. Returns what to emit for it.
    pub fn finish(&mut self) -> &'static [u8] {
        if std::mem::take(&mut self.cr_held) {
            self.bare_ending()
        } else {
            &[]
        }
    }

    fn bare_ending(&mut self) -> &'static [u8] {
        self.bare = true;
        match self.policy {
            BareLinePolicy::Normalize => CRLF,
            BareLinePolicy::Reject => &[],
        }
    }
}

#[cfg(any(test, fuzzing))]
pub mod oracle {
    use super::BareLinePolicy;

    /// Outcome of reading a whole input with the oracle.
    #[derive(Debug, PartialEq, Eq)]
    pub struct Outcome {
        /// Content produced (unstuffed, normalised if the policy says so).
        pub content: Vec<u8>,
        /// Bytes consumed up to and including the terminator, if one was found.
        pub end: Option<usize>,
        /// Whether a bare CR or LF was seen before the end.
        pub bare: bool,
    }

    /// Read `input` from a line start.
    pub fn read(input: &[u8], policy: BareLinePolicy) -> Outcome {
        // `line` is the current line's bytes; `at_line_start` is true when the previous line
        // ended with a real CRLF.
        let mut content = Vec::new();
        let mut line: Vec<u8> = Vec::new();
        let mut bare = false;
        let mut at_line_start = true;
        let mut i = 0;
        let bare_out = |content: &mut Vec<u8>| {
            if policy == BareLinePolicy::Normalize {
                content.extend_from_slice(b"\r\n");
            }
        };
        while i < input.len() {
            let b = input[i];
            let next = input.get(i + 1).copied();
            match b {
                b'\r' if next == Some(b'\n') => {
                    // A real line end.
                    if at_line_start && line == b"." {
                        return Outcome {
                            content,
                            end: Some(i + 2),
                            bare,
                        };
                    }
                    if at_line_start && line.first() == Some(&b'.') {
                        line.remove(0);
                    }
                    content.extend_from_slice(&line);
                    content.extend_from_slice(b"\r\n");
                    line.clear();
                    at_line_start = true;
                    i += 2;
                    continue;
                }
                b'\r' if next.is_none() => break, // undecided
                b'\r' | b'\n' => {
                    bare = true;
                    if at_line_start && line.first() == Some(&b'.') {
                        line.remove(0);
                    }
                    content.extend_from_slice(&line);
                    line.clear();
                    bare_out(&mut content);
                    at_line_start = false;
                }
                _ => line.push(b),
            }
            i += 1;
        }
        // Input ran out mid-line: flush what the fast reader would already have emitted.
        if !(at_line_start && line.first() == Some(&b'.')) {
            content.extend_from_slice(&line);
        } else {
            content.extend_from_slice(line.get(1..).unwrap_or_default());
        }
        Outcome {
            content,
            end: None,
            bare,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Run the fast reader over `input` split into `chunks`; return content, end and bare flag.
    fn run(input: &[u8], splits: &[usize], policy: BareLinePolicy) -> oracle::Outcome {
        let mut r = DataReader::new(policy);
        let mut content = Vec::new();
        let mut consumed = 0;
        let mut bounds: Vec<usize> = splits.iter().map(|&s| s.min(input.len())).collect();
        bounds.push(input.len());
        bounds.sort_unstable();
        let mut start = 0;
        for &stop in &bounds {
            let mut piece = &input[start..stop];
            loop {
                let (used, chunk) = r.next(piece);
                consumed += used;
                piece = &piece[used..];
                match chunk {
                    Chunk::Data(d) => content.extend_from_slice(d),
                    Chunk::NeedMore => break,
                    Chunk::End => {
                        return oracle::Outcome {
                            content,
                            end: Some(consumed),
                            bare: r.saw_bare_line_ending(),
                        };
                    }
                }
            }
            start = stop;
        }
        oracle::Outcome {
            content,
            end: None,
            bare: r.saw_bare_line_ending(),
        }
    }

    fn whole(input: &[u8], policy: BareLinePolicy) -> oracle::Outcome {
        run(input, &[], policy)
    }

    /// Feed whole, at every split point, and one byte at a time; all must agree with `expect`.
    fn check_all_splits(input: &[u8], policy: BareLinePolicy) -> oracle::Outcome {
        let expect = whole(input, policy);
        for split in 0..=input.len() {
            assert_eq!(
                run(input, &[split], policy),
                expect,
                "split at {split} of {input:?}"
            );
        }
        let bytes: Vec<usize> = (0..input.len()).collect();
        assert_eq!(
            run(input, &bytes, policy),
            expect,
            "byte at a time: {input:?}"
        );
        expect
    }

    #[test]
    fn terminates_only_at_crlf_dot_crlf() {
        let o = check_all_splits(
            b"Subject: x\r\n\r\nbody\r\n.\r\nMAIL FROM",
            BareLinePolicy::Reject,
        );
        assert_eq!(o.content, b"Subject: x\r\n\r\nbody\r\n");
        assert_eq!(o.end, Some(23));
        assert!(!o.bare);
        let o = check_all_splits(b".\r\n", BareLinePolicy::Reject);
        assert_eq!((o.content.as_slice(), o.end), (&b""[..], Some(3)));
    }

    #[test]
    fn unstuffs_leading_dots() {
        let o = check_all_splits(b"..leading\r\n...\r\n.x\r\n.\r\n", BareLinePolicy::Reject);
        assert_eq!(o.content, b".leading\r\n..\r\nx\r\n");
        assert!(!o.bare);
    }

    #[test]
    fn smuggling_variants_never_end_data() {
        // Each of these, followed by a fake transaction, must not terminate the message; the
        // real terminator comes last.
        let tail = b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\nDATA\r\nforged\r\n";
        for variant in [
            &b"\n.\n"[..],
            b"\n.\r\n",
            b"\r.\r\n",
            b"\r\n.\r",
            b"\r\n.\n",
            b"\r.\n",
            b"\n.\r",
            b"\r\r\n.\r\r\n",
            b"\r\n.\r\r\n",
        ] {
            for policy in [BareLinePolicy::Reject, BareLinePolicy::Normalize] {
                let mut input = b"text".to_vec();
                input.extend_from_slice(variant);
                input.extend_from_slice(tail);
                input.extend_from_slice(b".\r\n");
                let o = check_all_splits(&input, policy);
                assert_eq!(o.end, Some(input.len()), "{variant:?} {policy:?}");
                assert!(o.bare, "{variant:?} must be flagged as a bare line ending");
            }
        }
    }

    #[test]
    fn normalize_turns_bare_endings_into_crlf() {
        let o = check_all_splits(b"a\nb\rc\r\n.\r\n", BareLinePolicy::Normalize);
        assert_eq!(o.content, b"a\r\nb\r\nc\r\n");
        assert!(o.bare);
        // After a bare LF the next line is not a line start: its dot stays.
        let o = check_all_splits(b"a\n.\r\n.\r\n", BareLinePolicy::Normalize);
        assert_eq!(o.content, b"a\r\n.\r\n");
    }

    #[test]
    fn simd_and_scalar_agree_on_long_inputs() {
        let mut body = Vec::new();
        for i in 0..300 {
            body.extend_from_slice(
                format!("line {i} of some text that is long enough\r\n").as_bytes(),
            );
            if i % 37 == 0 {
                body.extend_from_slice(b"..stuffed\r\n");
            }
        }
        body.extend_from_slice(b".\r\n");
        let o = whole(&body, BareLinePolicy::Reject);
        assert_eq!(o, oracle::read(&body, BareLinePolicy::Reject));
        assert_eq!(o.end, Some(body.len()));
        for start in 0..130 {
            for line_start in [false, true] {
                let s = &body[start..];
                assert_eq!(
                    clean_prefix(s, line_start),
                    clean_prefix_scalar(s, false, line_start),
                    "start {start}"
                );
            }
        }
    }

    fn smtp_bytes() -> impl Strategy<Value = Vec<u8>> {
        // Skewed towards the bytes that matter so the interesting cases are common.
        let byte = prop_oneof![
            4 => Just(b'\r'),
            4 => Just(b'\n'),
            4 => Just(b'.'),
            6 => Just(b'a'),
            1 => any::<u8>(),
        ];
        prop::collection::vec(byte, 0..300)
    }

    proptest! {
        #[test]
        fn fast_reader_matches_oracle(
            input in smtp_bytes(),
            splits in prop::collection::vec(0usize..300, 0..6),
            normalize in any::<bool>(),
        ) {
            let policy = if normalize { BareLinePolicy::Normalize } else { BareLinePolicy::Reject };
            prop_assert_eq!(run(&input, &splits, policy), oracle::read(&input, policy));
        }

        #[test]
        fn clean_prefix_matches_scalar(input in smtp_bytes(), line_start in any::<bool>()) {
            prop_assert_eq!(
                clean_prefix(&input, line_start),
                clean_prefix_scalar(&input, false, line_start)
            );
        }
    }

    /// Byte-at-a-time oracle for [`ChunkLines`]: (content, bare seen).
    fn chunk_lines_oracle(input: &[u8], policy: BareLinePolicy) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        let mut bare = false;
        let mut i = 0;
        while i < input.len() {
            match (input[i], input.get(i + 1)) {
                (b'\r', Some(b'\n')) => {
                    out.extend_from_slice(b"\r\n");
                    i += 2;
                    continue;
                }
                (b'\r' | b'\n', _) => {
                    bare = true;
                    if policy == BareLinePolicy::Normalize {
                        out.extend_from_slice(b"\r\n");
                    }
                }
                (b, _) => out.push(b),
            }
            i += 1;
        }
        (out, bare)
    }

    /// Feed `input` as chunks cut at `splits` (like BDAT chunks or reads).
    fn chunk_lines_run(input: &[u8], splits: &[usize], policy: BareLinePolicy) -> (Vec<u8>, bool) {
        let mut cuts: Vec<usize> = splits.iter().map(|s| s % (input.len() + 1)).collect();
        cuts.push(input.len());
        cuts.sort_unstable();
        let mut c = ChunkLines::new(policy);
        let mut out = Vec::new();
        let mut start = 0;
        for stop in cuts {
            let mut piece = &input[start..stop];
            while !piece.is_empty() {
                let (used, emit) = c.next(piece);
                out.extend_from_slice(emit);
                piece = &piece[used..];
            }
            start = stop;
        }
        out.extend_from_slice(c.finish());
        (out, c.saw_bare_line_ending())
    }

    #[test]
    fn chunk_lines_table() {
        use BareLinePolicy::*;
        for (input, policy, out, bare) in [
            (&b"a\r\nb\r\n"[..], Reject, &b"a\r\nb\r\n"[..], false),
            (b"a\nb", Reject, b"ab", true),
            (b"a\rb", Reject, b"ab", true),
            (b"a\r", Reject, b"a", true),
            (b"a\n.\nb", Normalize, b"a\r\n.\r\nb", true),
            (b"\r.\r\n", Normalize, b"\r\n.\r\n", true),
            (b"\r\n.\r", Normalize, b"\r\n.\r\n", true),
            (b"\r\r\n\n", Normalize, b"\r\n\r\n\r\n", true),
            (b"", Reject, b"", false),
        ] {
            for split in 0..=input.len() {
                assert_eq!(
                    chunk_lines_run(input, &[split], policy),
                    (out.to_vec(), bare),
                    "{input:?} split at {split}"
                );
            }
            let bytes: Vec<usize> = (0..input.len()).collect();
            assert_eq!(chunk_lines_run(input, &bytes, policy), (out.to_vec(), bare));
        }
    }

    proptest! {
        #[test]
        fn chunk_lines_match_oracle(
            input in smtp_bytes(),
            splits in prop::collection::vec(0usize..300, 0..6),
            normalize in any::<bool>(),
        ) {
            let policy = if normalize { BareLinePolicy::Normalize } else { BareLinePolicy::Reject };
            prop_assert_eq!(chunk_lines_run(&input, &splits, policy), chunk_lines_oracle(&input, policy));
        }
    }
}
