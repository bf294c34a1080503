//! The loop limit: a message that has already passed more than `max_hops` MTAs (one
//! `Received:` field each) is refused with `554 5.4.6` (RFC 5321 §6.3), Postfix's
//! `hopcount_limit` (50 by default there too).

/// `Received:` fields in a header section, found the way lenient readers find lines.
pub fn received_count(header_section: &[u8]) -> usize {
    crate::aswl::detect::field_lines(header_section)
        .filter(|line| {
            line.get(..9)
                .is_some_and(|p| p.eq_ignore_ascii_case(b"received:"))
                || line
                    .get(..8)
                    .is_some_and(|p| p.eq_ignore_ascii_case(b"received"))
                    && line.get(8..).is_some_and(|r| {
                        r.iter().find(|b| !matches!(b, b' ' | b'\t')) == Some(&b':')
                    })
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_received_fields_only() {
        let h = b"Received: from a\r\n\tby b\r\nreceived : x\r\nX-Received: no\r\nSubject: Received: no\r\nRECEIVED:y\nReceived-SPF: no\r\n\r\nReceived: body\r\n";
        assert_eq!(received_count(h), 3);
        assert_eq!(received_count(b""), 0);
    }
}
