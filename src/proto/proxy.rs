//! PROXY protocol v1 (text) and v2 (binary) headers, as sent by HAProxy and load balancers in
//! front of the listener. Only accepted on bindings that name the proxies' networks; the
//! runtime enforces that, this module only parses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The v2 signature.
const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 header, CRLF included (spec §2.1).
const V1_MAX: usize = 107;

/// What a complete header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The original client and the address it connected to.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// `PROXY UNKNOWN` / v2 LOCAL or an unsupported family: use the connection's own address.
    Local,
}

/// Parse outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A header of `consumed` bytes.
    Done(Header, usize),
    /// Not enough bytes yet.
    Incomplete,
}

/// The bytes are not a valid PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalid(pub &'static str);

/// Whether `input` starts like a PROXY header (used to spot one from an untrusted source).
pub fn looks_like_header(input: &[u8]) -> bool {
    input.starts_with(b"PROXY ") || input.starts_with(V2_SIG)
}

/// Parse a header at the start of `input`.
pub fn parse(input: &[u8]) -> Result<Parsed, Invalid> {
    let n = input.len().min(V2_SIG.len());
    if input.get(..n) == V2_SIG.get(..n) && !input.is_empty() {
        return if input.len() < 16 {
            Ok(Parsed::Incomplete)
        } else {
            v2(input)
        };
    }
    let m = input.len().min(6);
    if input.get(..m) != b"PROXY ".get(..m) {
        return Err(Invalid("not a PROXY protocol header"));
    }
    v1(input)
}

fn v1(input: &[u8]) -> Result<Parsed, Invalid> {
    let window = input.get(..input.len().min(V1_MAX)).unwrap_or_default();
    let Some(lf) = memchr::memchr(b'\n', window) else {
        return if input.len() >= V1_MAX {
            Err(Invalid("v1 header too long"))
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    let line = window.get(..lf).unwrap_or_default();
    let line = line
        .strip_suffix(b"\r")
        .ok_or(Invalid("v1 header must end with CRLF"))?;
    let text = std::str::from_utf8(line).map_err(|_| Invalid("v1 header is not ASCII"))?;
    let mut parts = text.split(' ');
    let (_proxy, family) = (parts.next(), parts.next());
    let header = match family {
        Some("UNKNOWN") => Header::Local,
        Some(fam @ ("TCP4" | "TCP6")) => {
            let mut next = || parts.next().ok_or(Invalid("v1 header is missing a field"));
            let src: IpAddr = next()?
                .parse()
                .map_err(|_| Invalid("bad v1 source address"))?;
            let dst: IpAddr = next()?
                .parse()
                .map_err(|_| Invalid("bad v1 destination address"))?;
            let sport = port(next()?)?;
            let dport = port(next()?)?;
            if parts.next().is_some() {
                return Err(Invalid("v1 header has extra fields"));
            }
            let v4 = fam == "TCP4";
            if src.is_ipv4() != v4 || dst.is_ipv4() != v4 {
                return Err(Invalid("v1 address family mismatch"));
            }
            Header::Proxied {
                source: SocketAddr::new(src, sport),
                destination: SocketAddr::new(dst, dport),
            }
        }
        _ => return Err(Invalid("v1 family must be TCP4, TCP6 or UNKNOWN")),
    };
    Ok(Parsed::Done(header, lf + 1))
}

fn port(s: &str) -> Result<u16, Invalid> {
    // Decimal without leading zeros (spec: "0" alone is allowed).
    if s.is_empty() || (s.len() > 1 && s.starts_with('0')) || !s.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(Invalid("bad v1 port"));
    }
    s.parse().map_err(|_| Invalid("bad v1 port"))
}

fn v2(input: &[u8]) -> Result<Parsed, Invalid> {
    let (&ver_cmd, &fam) = match (input.get(12), input.get(13)) {
        (Some(a), Some(b)) => (a, b),
        _ => return Ok(Parsed::Incomplete),
    };
    let len = match input.get(14..16) {
        Some(&[hi, lo]) => usize::from(u16::from_be_bytes([hi, lo])),
        _ => return Ok(Parsed::Incomplete),
    };
    if ver_cmd >> 4 != 2 {
        return Err(Invalid("v2 version must be 2"));
    }
    let total = 16 + len;
    let Some(body) = input.get(16..total) else {
        return Ok(Parsed::Incomplete);
    };
    let header = match ver_cmd & 0x0f {
        0 => Header::Local,
        1 => match fam {
            // TCP over IPv4: 4 + 4 + 2 + 2
            0x11 => match (ip4(body, 0), ip4(body, 4), be16(body, 8), be16(body, 10)) {
                (Some(s), Some(d), Some(sp), Some(dp)) => Header::Proxied {
                    source: SocketAddr::new(s.into(), sp),
                    destination: SocketAddr::new(d.into(), dp),
                },
                _ => return Err(Invalid("v2 IPv4 block too short")),
            },
            // TCP over IPv6: 16 + 16 + 2 + 2
            0x21 => match (ip6(body, 0), ip6(body, 16), be16(body, 32), be16(body, 34)) {
                (Some(s), Some(d), Some(sp), Some(dp)) => Header::Proxied {
                    source: SocketAddr::new(s.into(), sp),
                    destination: SocketAddr::new(d.into(), dp),
                },
                _ => return Err(Invalid("v2 IPv6 block too short")),
            },
            // UNSPEC, UDP, UNIX: keep the connection's own address (spec §2.2).
            _ => Header::Local,
        },
        _ => return Err(Invalid("v2 command must be LOCAL or PROXY")),
    };
    Ok(Parsed::Done(header, total))
}

fn be16(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(o..o + 2)?.try_into().ok()?))
}

fn ip4(b: &[u8], o: usize) -> Option<Ipv4Addr> {
    let a: [u8; 4] = b.get(o..o + 4)?.try_into().ok()?;
    Some(Ipv4Addr::from(a))
}

fn ip6(b: &[u8], o: usize) -> Option<Ipv6Addr> {
    let a: [u8; 16] = b.get(o..o + 16)?.try_into().ok()?;
    Some(Ipv6Addr::from(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_headers() {
        let h = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\nEHLO x\r\n";
        assert_eq!(
            parse(h),
            Ok(Parsed::Done(
                Header::Proxied {
                    source: sa("192.0.2.1:56324"),
                    destination: sa("198.51.100.2:25")
                },
                44
            ))
        );
        let h = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 25\r\n";
        assert!(matches!(
            parse(h),
            Ok(Parsed::Done(Header::Proxied { .. }, 41))
        ));
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Ok(Parsed::Done(Header::Local, 15))
        );
        for split in 0..43 {
            assert_eq!(
                parse(&h[..split.min(h.len() - 1)]),
                Ok(Parsed::Incomplete),
                "split {split}"
            );
        }
        for bad in [
            &b"PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n"[..],
            b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 01 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1 70000\r\n",
            b"PROXY UDP4 192.0.2.1 198.51.100.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n",
            b"EHLO x\r\n",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let long = [b"PROXY ".as_slice(), &[b'x'; 200]].concat();
        assert!(parse(&long).is_err());
    }

    fn v2_header(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut v = V2_SIG.to_vec();
        v.push(0x20 | cmd);
        v.push(fam);
        v.extend_from_slice(&(body.len() as u16).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn v2_headers() {
        let mut body = vec![192, 0, 2, 1, 198, 51, 100, 2];
        body.extend_from_slice(&56324u16.to_be_bytes());
        body.extend_from_slice(&25u16.to_be_bytes());
        body.extend_from_slice(&[0x04, 0, 1, 0]); // a TLV, ignored
        let h = v2_header(1, 0x11, &body);
        assert_eq!(
            parse(&h),
            Ok(Parsed::Done(
                Header::Proxied {
                    source: sa("192.0.2.1:56324"),
                    destination: sa("198.51.100.2:25")
                },
                h.len()
            ))
        );
        for split in 1..h.len() {
            assert_eq!(parse(&h[..split]), Ok(Parsed::Incomplete), "split {split}");
        }
        assert_eq!(
            parse(&v2_header(0, 0, &[])),
            Ok(Parsed::Done(Header::Local, 16))
        );
        assert!(parse(&v2_header(1, 0x11, &[1, 2, 3])).is_err());
        assert!(parse(&v2_header(2, 0x11, &body)).is_err());
        let mut v1 = v2_header(1, 0x11, &body);
        v1[12] = 0x11;
        assert!(parse(&v1).is_err());
    }
}
