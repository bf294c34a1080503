//! The Received trace header (RFC 5321 §4.4) and RFC 5322 dates.

use std::fmt::Write;
use std::time::SystemTime;

use super::Envelope;

/// The client's HELO name as ringmx writes it into header fields: printable ASCII only (it
/// may be UTF-8 where 8-bit headers were not announced), without the comment and clause
/// delimiters `(`, `)` and `;`.
pub fn shown_helo(helo: &str) -> String {
    helo.chars()
        .filter(|c| c.is_ascii_graphic() && !matches!(c, '(' | ')' | ';'))
        .collect()
}

/// Text a client chose (an address, a HELO name, a next hop's reply), as an operator's
/// terminal is shown it (`ringmx queue`, `ringmx aswl list`): control characters (C0, C1:
/// escape sequences retitle or clear a terminal) and the invisible format characters that
/// reorder or hide text (bidi overrides and isolates, zero-width characters, line and
/// paragraph separators) become `\u{…}`, and a backslash `\\`, so that what is printed
/// cannot pass for something else; anything else stays as it is.
pub fn for_terminal(text: &str) -> std::borrow::Cow<'_, str> {
    let hidden = |c: char| {
        c.is_control()
            || matches!(c, '\\' | '\u{ad}' | '\u{34f}' | '\u{61c}' | '\u{115f}' | '\u{1160}'
                | '\u{17b4}' | '\u{17b5}' | '\u{180e}' | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{206f}' | '\u{3164}'
                | '\u{fe00}'..='\u{fe0f}' | '\u{feff}' | '\u{ffa0}' | '\u{fff9}'..='\u{fffb}'
                | '\u{e0000}'..='\u{e007f}')
    };
    if !text.chars().any(hidden) {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if hidden(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.into()
}

/// `Received: from HELO ([IP]) by HOST (ringmx) with ESMTPS (TLS…) id ID for <rcpt>; DATE`,
/// folded, CRLF-terminated. "with" follows RFC 3848 (ESMTP, ESMTPA, ESMTPS, ESMTPSA).
pub fn received(env: &Envelope, hostname: &str) -> String {
    let mut with = String::from(if env.esmtp { "ESMTP" } else { "SMTP" });
    if env.tls.is_some() {
        with.push('S');
    }
    if env.authenticated_as.is_some() {
        with.push('A');
    }
    let helo = shown_helo(&env.helo);
    let one = match env.rcpts.as_slice() {
        [one] => one.len(),
        _ => 0,
    };
    let tls = env.tls.as_ref().map_or(0, |t| t.len() + 3);
    let mut h =
        String::with_capacity(120 + helo.len() + hostname.len() + tls + env.queue_id.len() + one);
    // Writing into a String cannot fail.
    let _ = write!(
        h,
        "Received: from {helo} ([{}])\r\n\tby {hostname} (ringmx) with {with}",
        env.client_ip
    );
    if let Some(tls) = &env.tls {
        let _ = write!(h, " ({tls})");
    }
    let _ = write!(h, "\r\n\tid {}", env.queue_id);
    if let [one] = env.rcpts.as_slice() {
        let _ = write!(h, "\r\n\tfor <{one}>");
    }
    let _ = write!(h, ";\r\n\t{}\r\n", rfc5322_date(env.received_at));
    h
}

/// `Fri, 27 Nov 2026 06:33:50 +0000`.
pub fn rfc5322_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    const WD: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MON: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} +0000",
        WD[(days.rem_euclid(7)) as usize],
        d,
        MON[(m - 1) as usize],
        y,
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn text_for_a_terminal() {
        for (text, shown) in [
            ("bob@partner.test", "bob@partner.test"),
            ("b\u{fc}cher@caf\u{e9}.test", "b\u{fc}cher@caf\u{e9}.test"),
            // OSC retitle, CSI clear screen (C1), a right-to-left override.
            (
                "\u{9d}0;pwned\u{9c}\u{9b}2J\u{202e}moc.knab",
                "\\u{9d}0;pwned\\u{9c}\\u{9b}2J\\u{202e}moc.knab",
            ),
            ("a\x1b[2Jb\tc\r\nd", "a\\u{1b}[2Jb\\u{9}c\\u{d}\\u{a}d"),
            // A backslash is doubled, so that `\u{…}` cannot be typed in to look escaped.
            ("x\\u{202e}@y", "x\\\\u{202e}@y"),
            (
                "zero\u{200b}width\u{2066}iso\u{feff}",
                "zero\\u{200b}width\\u{2066}iso\\u{feff}",
            ),
            // Soft hyphen, a Hangul filler, a variation selector, a tag character.
            (
                "a\u{ad}b\u{3164}c\u{fe0f}d\u{e0041}",
                "a\\u{ad}b\\u{3164}c\\u{fe0f}d\\u{e0041}",
            ),
        ] {
            assert_eq!(for_terminal(text), shown, "{text:?}");
        }
    }

    #[test]
    fn dates() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_761_230);
        assert_eq!(rfc5322_date(t), "Fri, 27 Nov 2026 06:33:50 +0000");
        assert_eq!(
            rfc5322_date(SystemTime::UNIX_EPOCH),
            "Thu, 01 Jan 1970 00:00:00 +0000"
        );
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc5322_date(leap), "Tue, 29 Feb 2000 00:00:00 +0000");
    }

    #[test]
    fn received_header() {
        let env = Envelope {
            client_ip: "192.0.2.7".parse().unwrap(),
            helo: "client (evil); x".into(),
            tls: Some("TLSv1.3 TLS13_AES_256_GCM_SHA384".into()),
            ..Envelope::example("Q1", &["c@d.test"])
        };
        assert_eq!(
            received(&env, "mx.test"),
            "Received: from clientevilx ([192.0.2.7])\r\n\tby mx.test (ringmx) with ESMTPS (TLSv1.3 TLS13_AES_256_GCM_SHA384)\r\n\tid Q1\r\n\tfor <c@d.test>;\r\n\tThu, 01 Jan 1970 00:00:00 +0000\r\n"
        );
    }
}
