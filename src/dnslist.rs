//! DNS list specifications in postscreen's syntax — `domain[=pattern][*weight]`, e.g.
//! `zen.example*2`, `list.example=127.0.0.[2..11]*3`, `allow.example*-5` — the names to look
//! up for a client, and the score of its answers. Pure: no DNS here (`policy::dnsbl` asks).

use std::net::{IpAddr, Ipv4Addr};
use std::ops::RangeInclusive;

/// One octet of a pattern: any value, or a set of ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Octet {
    Any,
    Set(Vec<RangeInclusive<u8>>),
}

/// One list as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct List {
    pub domain: String,
    pattern: Option<[Octet; 4]>,
    pub weight: i32,
}

impl List {
    /// `domain[=d.d.d.d][*weight]`; an octet is a number, `[a..b]`, or `[a;b;c..d]`.
    pub fn parse(spec: &str) -> Result<List, String> {
        let spec = spec.trim();
        let (rest, weight) = match spec.rsplit_once('*') {
            Some((r, w)) => (
                r,
                w.trim()
                    .parse::<i32>()
                    .map_err(|_| format!("{spec:?}: the weight after * must be an integer"))?,
            ),
            None => (spec, 1),
        };
        let (domain, pattern) = match rest.split_once('=') {
            Some((d, p)) => (
                d,
                Some(parse_pattern(p).map_err(|e| format!("{spec:?}: {e}"))?),
            ),
            None => (rest, None),
        };
        if !(-1000..=1000).contains(&weight) {
            return Err(format!("{spec:?}: the weight must be within -1000..1000"));
        }
        let domain = domain.trim().trim_end_matches('.').to_ascii_lowercase();
        // An IPv6 query adds 64 characters; DNS names have at most 253, labels 63.
        let valid = !domain.is_empty()
            && domain.len() <= 189
            && domain.split('.').all(|l| l.len() <= 63)
            && domain
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            && !domain.split('.').any(str::is_empty);
        if !valid {
            return Err(format!("{spec:?}: not a DNS list domain"));
        }
        Ok(List {
            domain,
            pattern,
            weight,
        })
    }

    /// Whether an answer of this list counts. Without a pattern: any 127.0.0.0/8 answer except
    /// 127.255.255.0/24 (lists' error codes: over quota, open resolver), so an error answer or
    /// a resolver that rewrites NXDOMAIN never lists everyone.
    pub fn matches(&self, answer: Ipv4Addr) -> bool {
        let Some(p) = &self.pattern else {
            let [a, b, c, _] = answer.octets();
            return a == 127 && !(b == 255 && c == 255);
        };
        p.iter().zip(answer.octets()).all(|(o, v)| match o {
            Octet::Any => true,
            Octet::Set(ranges) => ranges.iter().any(|r| r.contains(&v)),
        })
    }

    /// The name to look up for `ip`: reversed octets (IPv4) or nibbles (IPv6), then the list.
    pub fn query(&self, ip: IpAddr) -> String {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let mut name = String::with_capacity(80);
        match ip {
            IpAddr::V4(a) => {
                for o in a.octets().iter().rev() {
                    name.push_str(&o.to_string());
                    name.push('.');
                }
            }
            IpAddr::V6(a) => {
                for b in a.octets().iter().rev() {
                    for nibble in [b & 0xf, b >> 4] {
                        name.push(char::from_digit(u32::from(nibble), 16).unwrap_or('0'));
                        name.push('.');
                    }
                }
            }
        }
        name.push_str(&self.domain);
        name
    }
}

fn parse_pattern(p: &str) -> Result<[Octet; 4], String> {
    // Dots inside brackets belong to ranges (`[2..11]`).
    let mut parts: Vec<&str> = Vec::with_capacity(4);
    let (mut depth, mut start) = (0u32, 0);
    let p = p.trim();
    for (i, c) in p.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            '.' if depth == 0 => {
                parts.push(p.get(start..i).unwrap_or(""));
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(p.get(start..).unwrap_or(""));
    let [a, b, c, d] = parts.as_slice() else {
        return Err("a pattern has four octets".into());
    };
    Ok([
        parse_octet(a)?,
        parse_octet(b)?,
        parse_octet(c)?,
        parse_octet(d)?,
    ])
}

fn parse_octet(o: &str) -> Result<Octet, String> {
    let num = |s: &str| {
        s.trim()
            .parse::<u8>()
            .map_err(|_| format!("{s:?} is not an octet (0-255)"))
    };
    if o == "*" {
        return Ok(Octet::Any);
    }
    let Some(inner) = o.strip_prefix('[').and_then(|r| r.strip_suffix(']')) else {
        let v = num(o)?;
        return Ok(Octet::Set(vec![v..=v]));
    };
    let mut ranges = Vec::new();
    for item in inner.split(';') {
        ranges.push(match item.split_once("..") {
            Some((lo, hi)) => {
                let (lo, hi) = (num(lo)?, num(hi)?);
                if lo > hi {
                    return Err(format!("empty range {item:?}"));
                }
                lo..=hi
            }
            None => {
                let v = num(item)?;
                v..=v
            }
        });
    }
    Ok(Octet::Set(ranges))
}

/// The answers of one lookup: addresses and their TTL; `None` = timeout or failure.
pub type Answer = Option<(Vec<Ipv4Addr>, u32)>;

/// The score of a client from its answers (in list order), and the listing list that weighs
/// most; the smallest TTL among the answers that had one.
pub fn score(lists: &[List], answers: &[Answer]) -> (i32, Option<usize>, Option<u32>) {
    let mut total = 0;
    let mut top: Option<(i32, usize)> = None;
    let mut ttl: Option<u32> = None;
    for (i, (l, a)) in lists.iter().zip(answers).enumerate() {
        let Some((addrs, t)) = a else { continue };
        if addrs.iter().any(|&x| l.matches(x)) {
            total += l.weight;
            if l.weight > 0 && top.is_none_or(|(w, _)| l.weight > w) {
                top = Some((l.weight, i));
            }
        }
        ttl = Some(ttl.map_or(*t, |m| m.min(*t)));
    }
    // A list that did not answer may list the client: remember the score a minute at most.
    if answers.iter().any(Option::is_none) {
        ttl = Some(ttl.map_or(60, |t| t.min(60)));
    }
    (total, top.map(|(_, i)| i), ttl)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn postscreen_syntax() {
        let l = List::parse("zen.example*2").unwrap();
        assert_eq!((l.domain.as_str(), l.weight), ("zen.example", 2));
        assert!(l.matches(ip4("127.0.0.2")) && l.matches(ip4("127.255.0.1")));
        // Without a pattern, error answers and rewritten NXDOMAINs do not count.
        assert!(!l.matches(ip4("127.255.255.254")) && !l.matches(ip4("198.51.100.7")));
        let l = List::parse("List.Example.=127.0.0.[2..11]*3").unwrap();
        assert_eq!((l.domain.as_str(), l.weight), ("list.example", 3));
        assert!(l.matches(ip4("127.0.0.2")) && l.matches(ip4("127.0.0.11")));
        assert!(!l.matches(ip4("127.0.0.12")) && !l.matches(ip4("127.0.1.2")));
        let l = List::parse("allow.example=127.0.[0..255].[1;3;5..6]*-5").unwrap();
        assert_eq!(l.weight, -5);
        assert!(l.matches(ip4("127.0.9.3")) && l.matches(ip4("127.0.9.6")));
        assert!(!l.matches(ip4("127.0.9.4")));
        assert_eq!(List::parse("plain.example").unwrap().weight, 1);
        for bad in [
            "",
            "zen.example*x",
            "zen..example",
            "zen example",
            "l.example=127.0.0",
            "l.example=127.0.0.[9..2]",
            "l.example=127.0.0.256",
            "zen.example*5000",
        ] {
            assert!(List::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn query_names() {
        let l = List::parse("zen.example").unwrap();
        assert_eq!(
            l.query("192.0.2.99".parse().unwrap()),
            "99.2.0.192.zen.example"
        );
        assert_eq!(
            l.query("::ffff:192.0.2.99".parse().unwrap()),
            "99.2.0.192.zen.example"
        );
        assert_eq!(
            l.query("2001:db8::567:89ab".parse().unwrap()),
            "b.a.9.8.7.6.5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.zen.example"
        );
    }

    #[test]
    fn scores_weights_and_allow_lists() {
        let lists: Vec<List> = [
            "zen.example*2",
            "bl.example=127.0.0.[10..11]*3",
            "wl.example*-5",
        ]
        .iter()
        .map(|s| List::parse(s).unwrap())
        .collect();
        let hit = |a: &str, ttl: u32| Some((vec![ip4(a)], ttl));
        let miss = || Some((Vec::new(), 300));
        for (answers, want) in [
            (
                vec![hit("127.0.0.2", 300), miss(), miss()],
                (2, Some(0), Some(300)),
            ),
            (
                vec![hit("127.0.0.2", 300), hit("127.0.0.10", 60), miss()],
                (5, Some(1), Some(60)),
            ),
            (
                vec![hit("127.0.0.2", 300), hit("127.0.0.2", 60), miss()],
                (2, Some(0), Some(60)),
            ),
            (
                vec![hit("127.0.0.2", 300), miss(), hit("127.0.0.2", 90)],
                (-3, Some(0), Some(90)),
            ),
            // Timeouts count as not listed, and keep the score a minute at most.
            (vec![None, None, None], (0, None, Some(60))),
            (vec![None, miss(), miss()], (0, None, Some(60))),
        ] {
            assert_eq!(score(&lists, &answers), want);
        }
    }
}
