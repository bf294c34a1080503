//! Command parser: one line (without CRLF) in, a `Command` borrowing that line out.
//!
//! Verbs are matched as little-endian integers with ASCII case folded (`| 0x20` per byte), the
//! way smtp-proto's token tables do, so dispatch costs one load and a compare.

use super::address::{self, Address, is_token_byte, is_value_byte, is_xtext};
use super::line::{self, Frame};
use super::reply::{self, Reply};

/// A parsed SMTP command borrowing the input line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    /// `EHLO name`.
    Ehlo { host: &'a str },
    /// `HELO name`.
    Helo { host: &'a str },
    /// `MAIL FROM:<path> params`; `from` is None for the null reverse-path `<>`.
    Mail {
        from: Option<Address<'a>>,
        params: MailParams<'a>,
    },
    /// `RCPT TO:<path> params`.
    Rcpt {
        to: Address<'a>,
        params: RcptParams<'a>,
    },
    /// `DATA`.
    Data,
    /// `BDAT size [LAST]` (RFC 3030).
    Bdat { size: u64, last: bool },
    /// `RSET`.
    Rset,
    /// `NOOP [string]`.
    Noop,
    /// `QUIT`.
    Quit,
    /// `VRFY string`.
    Vrfy,
    /// `EXPN string`.
    Expn,
    /// `HELP [string]`.
    Help,
    /// `STARTTLS` (RFC 3207).
    StartTls,
    /// `AUTH mechanism [initial-response]` (RFC 4954); the response is still base64.
    Auth {
        mechanism: Mechanism,
        initial: Option<&'a [u8]>,
    },
}

/// SASL mechanisms the core can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// RFC 4616.
    Plain,
    /// The de-facto LOGIN exchange.
    Login,
}

/// `BODY=` (RFC 6152, RFC 3030).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    SevenBit,
    EightBitMime,
    BinaryMime,
}

/// `RET=` (RFC 3461).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ret {
    Full,
    Hdrs,
}

/// MAIL FROM parameters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MailParams<'a> {
    /// `SIZE=` (RFC 1870); saturates at `u64::MAX`.
    pub size: Option<u64>,
    pub body: Option<Body>,
    pub smtputf8: bool,
    pub ret: Option<Ret>,
    /// `ENVID=` xtext, still encoded.
    pub envid: Option<&'a str>,
    /// `AUTH=` xtext mailbox or `<>` (RFC 4954 §5), still encoded.
    pub auth: Option<&'a str>,
}

/// `NOTIFY=` flags (RFC 3461 §4.1).
pub mod notify {
    pub const NEVER: u8 = 1;
    pub const SUCCESS: u8 = 2;
    pub const FAILURE: u8 = 4;
    pub const DELAY: u8 = 8;
}

/// RCPT TO parameters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RcptParams<'a> {
    /// Bit set of [`notify`] flags.
    pub notify: Option<u8>,
    /// `ORCPT=addr-type;xtext`, still encoded.
    pub orcpt: Option<&'a str>,
}

/// Why a line is not a valid command; each maps to one reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// 500 5.5.1
    UnknownCommand,
    /// 501 5.5.4
    Syntax,
    /// 501 5.5.4 (EHLO/HELO without a usable name)
    HeloSyntax,
    /// 501 5.1.7
    BadSender,
    /// 501 5.1.3
    BadRecipient,
    /// 555 5.5.4
    UnknownParameter,
    /// 504 5.5.4
    UnknownMechanism,
}

impl ParseError {
    /// The reply the session sends for this error.
    pub fn reply(self) -> &'static Reply {
        match self {
            ParseError::UnknownCommand => &reply::UNKNOWN_COMMAND,
            ParseError::Syntax => &reply::SYNTAX,
            ParseError::HeloSyntax => &reply::HELO_SYNTAX,
            ParseError::BadSender => &reply::BAD_SENDER_SYNTAX,
            ParseError::BadRecipient => &reply::BAD_RECIPIENT_SYNTAX,
            ParseError::UnknownParameter => &reply::UNKNOWN_PARAMETER,
            ParseError::UnknownMechanism => &reply::AUTH_UNKNOWN_MECHANISM,
        }
    }
}

const fn tok4(s: &[u8; 4]) -> u32 {
    u32::from_le_bytes(*s)
}
const EHLO: u32 = tok4(b"ehlo");
const HELO: u32 = tok4(b"helo");
const MAIL: u32 = tok4(b"mail");
const RCPT: u32 = tok4(b"rcpt");
const DATA: u32 = tok4(b"data");
const BDAT: u32 = tok4(b"bdat");
const RSET: u32 = tok4(b"rset");
const NOOP: u32 = tok4(b"noop");
const QUIT: u32 = tok4(b"quit");
const VRFY: u32 = tok4(b"vrfy");
const EXPN: u32 = tok4(b"expn");
const HELP: u32 = tok4(b"help");
const AUTH: u32 = tok4(b"auth");
const STARTTLS: u64 = u64::from_le_bytes(*b"starttls");

/// Parse the command at the start of `input` (everything received and not yet consumed),
/// framing and parsing in one pass: returns the frame with the parse result, equal to
/// [`line::frame`] followed by [`parse`] on the line (a property test checks that).
///
/// The common commands are parsed straight from the input, the parsers stopping at the CR or
/// LF that ends the line, which saves the separate search for the line end; anything else
/// (errors, rare verbs, partial lines) takes the framing path.
#[inline]
pub fn parse_framed(input: &[u8], max_line: usize) -> Framed<'_> {
    if let Some((cmd, consumed)) = parse_direct(input)
        && consumed <= max_line
    {
        return Framed::Command(Ok(cmd), consumed);
    }
    match line::frame(input, max_line) {
        Frame::Line { line, consumed } => Framed::Command(parse(line), consumed),
        Frame::Partial => Framed::Partial,
        Frame::TooLong { consumed } => Framed::TooLong { consumed },
    }
}

/// What [`parse_framed`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framed<'a> {
    /// A complete line of `consumed` bytes (line ending included) and what it parsed to.
    Command(Result<Command<'a>, ParseError>, usize),
    /// No complete line yet.
    Partial,
    /// The line is over the cap; see [`Frame::TooLong`].
    TooLong { consumed: usize },
}

/// The fast path of [`parse_framed`]: only a successful parse that ends exactly at the line's
/// end counts; `None` sends the caller to the framing path.
#[inline(always)]
fn parse_direct(input: &[u8]) -> Option<(Command<'_>, usize)> {
    let (v, rest) = input.split_first_chunk::<4>()?;
    let verb = u32::from_le_bytes(*v) | 0x2020_2020;
    let (cmd, rem): (Command<'_>, &[u8]) = match (verb, rest.first()) {
        (DATA, _) => (Command::Data, rest),
        (RSET, _) => (Command::Rset, rest),
        (QUIT, _) => (Command::Quit, rest),
        (NOOP, Some(b'\r' | b'\n')) => (Command::Noop, rest),
        (MAIL, Some(b' ')) => mail(rest.get(1..)?).ok()?,
        (RCPT, Some(b' ')) => rcpt(rest.get(1..)?).ok()?,
        (EHLO, Some(b' ')) => helo(rest.get(1..)?)
            .map(|(host, r)| (Command::Ehlo { host }, r))
            .ok()?,
        (HELO, Some(b' ')) => helo(rest.get(1..)?)
            .map(|(host, r)| (Command::Helo { host }, r))
            .ok()?,
        _ => return None,
    };
    // The line must end right here (after optional spaces): CRLF, or a bare LF as `frame` allows.
    let spaces = rem.iter().take_while(|&&b| b == b' ').count();
    let end = input.len() - rem.len() + spaces;
    match (input.get(end), input.get(end + 1)) {
        (Some(b'\n'), _) => Some((cmd, end + 1)),
        (Some(b'\r'), Some(b'\n')) => Some((cmd, end + 2)),
        _ => None,
    }
}

/// Parse one command line (CRLF already removed).
pub fn parse<'a>(line: &'a [u8]) -> Result<Command<'a>, ParseError> {
    // Verbs are letters only, so `| 0x20` folds case without aliasing (only 'A'..'Z' map onto
    // 'a'..'z'); any other byte in the verb makes the compare fail.
    let (verb, args) = match line.split_first_chunk::<4>() {
        Some((v, rest)) => (u32::from_le_bytes(*v) | 0x2020_2020, rest),
        None => return Err(ParseError::UnknownCommand),
    };
    // The verb ends at a space or at the end of the line.
    let args = match args.split_first() {
        None => &[][..],
        Some((b' ', rest)) => rest,
        Some(_) => {
            if let Some((v, rest)) = line.split_first_chunk::<8>()
                && u64::from_le_bytes(*v) | 0x2020_2020_2020_2020 == STARTTLS
            {
                return match rest.split_first() {
                    None => Ok(Command::StartTls),
                    Some((b' ', args)) => no_args(args, Command::StartTls),
                    Some(_) => Err(ParseError::UnknownCommand),
                };
            }
            return Err(ParseError::UnknownCommand);
        }
    };
    // Whatever MAIL/RCPT did not consume must be nothing (a stray CR or LF inside the line).
    let whole = |r: Result<(Command<'a>, &[u8]), ParseError>| match r {
        Ok((c, [])) => Ok(c),
        Ok(_) => Err(ParseError::Syntax),
        Err(e) => Err(e),
    };
    match verb {
        MAIL => whole(mail(args)),
        RCPT => whole(rcpt(args)),
        DATA => no_args(args, Command::Data),
        BDAT => bdat(args),
        // Anything after the EHLO/HELO name is ignored.
        EHLO => helo(args).map(|(host, _)| Command::Ehlo { host }),
        HELO => helo(args).map(|(host, _)| Command::Helo { host }),
        RSET => no_args(args, Command::Rset),
        NOOP => Ok(Command::Noop),
        QUIT => no_args(args, Command::Quit),
        VRFY => Ok(Command::Vrfy),
        EXPN => Ok(Command::Expn),
        HELP => Ok(Command::Help),
        AUTH => auth(args),
        _ => Err(ParseError::UnknownCommand),
    }
}

fn no_args<'a>(args: &[u8], cmd: Command<'a>) -> Result<Command<'a>, ParseError> {
    if args.iter().all(|&b| b == b' ') {
        Ok(cmd)
    } else {
        Err(ParseError::Syntax)
    }
}

fn trim_spaces(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| b != b' ').unwrap_or(s.len());
    s.get(start..).unwrap_or_default()
}

fn helo(args: &[u8]) -> Result<(&str, &[u8]), ParseError> {
    let args = trim_spaces(args);
    // One token; whatever follows it is ignored, as by most servers (Windows hosts send
    // underscores and other non-RFC names, so this is lenient by design).
    let end = args
        .iter()
        .position(|&b| !is_token_byte(b))
        .unwrap_or(args.len());
    if !matches!(args.get(end), None | Some(b' ' | b'\r' | b'\n')) {
        return Err(ParseError::HeloSyntax);
    }
    let (host, rem) = args.split_at_checked(end).unwrap_or((args, &[]));
    if host.is_empty() {
        return Err(ParseError::HeloSyntax);
    }
    Ok((address::to_str(host).ok_or(ParseError::HeloSyntax)?, rem))
}

/// Case-insensitive prefix match of `args` against lowercase `prefix` (at most 8 bytes), done
/// as one integer compare: `fold` has 0x20 in the byte positions that are letters, so only
/// those are case-folded (folding ':' would let 0x1A pass for it).
#[inline(always)]
fn strip_prefix_ci<'a>(args: &'a [u8], prefix: &[u8], fold: u64) -> Option<&'a [u8]> {
    let (head, tail) = args.split_at_checked(prefix.len())?;
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.get_mut(..head.len())?.copy_from_slice(head);
    b.get_mut(..prefix.len())?.copy_from_slice(prefix);
    (u64::from_le_bytes(a) | fold == u64::from_le_bytes(b)).then_some(tail)
}

/// A parameter keyword folded to lowercase and packed little-endian into a u64 (keywords of
/// more than 8 bytes get 0, which matches nothing we know).
#[expect(
    clippy::indexing_slicing,
    reason = "const evaluation: i < k.len() by the loop bound"
)]
const fn kw(k: &[u8]) -> u64 {
    let mut t = 0u64;
    let mut i = 0;
    while i < k.len() && i < 8 {
        t |= ((k[i] | 0x20) as u64) << (8 * i);
        i += 1;
    }
    t
}
mod keywords {
    use super::kw;
    pub(super) const SIZE: u64 = kw(b"size");
    pub(super) const BODY: u64 = kw(b"body");
    pub(super) const SMTPUTF8: u64 = kw(b"smtputf8");
    pub(super) const RET: u64 = kw(b"ret");
    pub(super) const ENVID: u64 = kw(b"envid");
    pub(super) const AUTH: u64 = kw(b"auth");
    pub(super) const NOTIFY: u64 = kw(b"notify");
    pub(super) const ORCPT: u64 = kw(b"orcpt");
}

/// Split `rest` (what follows the path) into `KEY[=VALUE]` parameters in one pass, calling `f`
/// with the keyword's token (see [`kw`]) and the value.
#[inline(always)]
fn params<'a>(
    rest: &'a [u8],
    mut f: impl FnMut(u64, Option<&'a [u8]>) -> Result<(), ParseError>,
) -> Result<&'a [u8], ParseError> {
    // The path must be followed by a space or the end of the line. CR and LF end the
    // parameters too (the framed parser reads past the line's end); what is returned is the
    // remainder from there.
    if !matches!(rest.first(), None | Some(b' ' | b'\r' | b'\n')) {
        return Err(ParseError::Syntax);
    }
    let mut i = 0;
    loop {
        while rest.get(i) == Some(&b' ') {
            i += 1;
        }
        let first = match rest.get(i) {
            None | Some(b'\r' | b'\n') => return Ok(rest.get(i..).unwrap_or_default()),
            Some(&b) => b,
        };
        // esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
        if !first.is_ascii_alphanumeric() {
            return Err(ParseError::Syntax);
        }
        let start = i;
        let mut token = 0u64;
        while let Some(&b) = rest.get(i) {
            if !(b.is_ascii_alphanumeric() || b == b'-') {
                break;
            }
            let n = i - start;
            token = if n < 8 {
                token | (u64::from(b | 0x20) << (8 * n))
            } else {
                0
            };
            i += 1;
        }
        if i - start > 8 {
            token = 0;
        }
        let value = match rest.get(i) {
            None | Some(b' ' | b'\r' | b'\n') => None,
            Some(b'=') => {
                i += 1;
                let vstart = i;
                while let Some(&b) = rest.get(i) {
                    if matches!(b, b' ' | b'\r' | b'\n') {
                        break;
                    }
                    if !is_value_byte(b) {
                        return Err(ParseError::Syntax);
                    }
                    i += 1;
                }
                if i == vstart {
                    return Err(ParseError::Syntax);
                }
                rest.get(vstart..i)
            }
            Some(_) => return Err(ParseError::Syntax),
        };
        f(token, value)?;
    }
}

fn utf8(v: &[u8]) -> Result<&str, ParseError> {
    address::to_str(v).ok_or(ParseError::Syntax)
}

fn set<T>(slot: &mut Option<T>, value: T) -> Result<(), ParseError> {
    if slot.is_some() {
        return Err(ParseError::Syntax); // duplicate parameter
    }
    *slot = Some(value);
    Ok(())
}

fn digits(v: &[u8]) -> Result<u64, ParseError> {
    if v.is_empty() || v.len() > 20 {
        return Err(ParseError::Syntax);
    }
    let mut n = 0u64;
    for &d in v {
        let digit = d.wrapping_sub(b'0');
        if digit > 9 {
            return Err(ParseError::Syntax);
        }
        n = n.saturating_mul(10).saturating_add(u64::from(digit));
    }
    Ok(n)
}

fn mail(args: &[u8]) -> Result<(Command<'_>, &[u8]), ParseError> {
    let rest = strip_prefix_ci(args, b"from:", 0x20_2020_2020).ok_or(ParseError::Syntax)?;
    let rest = trim_spaces(rest);
    let (from, rest) = address::reverse_path(rest).ok_or(ParseError::BadSender)?;
    let mut p = MailParams::default();
    let rem = params(rest, |key, value| match (key, value) {
        (keywords::SIZE, Some(v)) => set(&mut p.size, digits(v)?),
        (keywords::BODY, Some(v)) => {
            let body = match v.len() {
                4 if v.eq_ignore_ascii_case(b"7BIT") => Body::SevenBit,
                8 if v.eq_ignore_ascii_case(b"8BITMIME") => Body::EightBitMime,
                10 if v.eq_ignore_ascii_case(b"BINARYMIME") => Body::BinaryMime,
                _ => return Err(ParseError::Syntax),
            };
            set(&mut p.body, body)
        }
        (keywords::SMTPUTF8, None) => {
            if p.smtputf8 {
                return Err(ParseError::Syntax);
            }
            p.smtputf8 = true;
            Ok(())
        }
        (keywords::RET, Some(v)) => {
            let ret = if v.eq_ignore_ascii_case(b"FULL") {
                Ret::Full
            } else if v.eq_ignore_ascii_case(b"HDRS") {
                Ret::Hdrs
            } else {
                return Err(ParseError::Syntax);
            };
            set(&mut p.ret, ret)
        }
        (keywords::ENVID, Some(v)) => {
            if v.len() > 100 || !is_xtext(v) {
                return Err(ParseError::Syntax);
            }
            set(&mut p.envid, utf8(v)?)
        }
        (keywords::AUTH, Some(v)) => {
            if v != b"<>" && !is_xtext(v) {
                return Err(ParseError::Syntax);
            }
            set(&mut p.auth, utf8(v)?)
        }
        // A known keyword with its value missing or unexpected.
        (
            keywords::SIZE
            | keywords::BODY
            | keywords::SMTPUTF8
            | keywords::RET
            | keywords::ENVID
            | keywords::AUTH,
            _,
        ) => Err(ParseError::Syntax),
        _ => Err(ParseError::UnknownParameter),
    })?;
    Ok((Command::Mail { from, params: p }, rem))
}

fn rcpt(args: &[u8]) -> Result<(Command<'_>, &[u8]), ParseError> {
    let rest = strip_prefix_ci(args, b"to:", 0x2020).ok_or(ParseError::Syntax)?;
    let rest = trim_spaces(rest);
    let (to, rest) = address::forward_path(rest).ok_or(ParseError::BadRecipient)?;
    let mut p = RcptParams::default();
    let rem = params(rest, |key, value| match (key, value) {
        (keywords::NOTIFY, Some(v)) => set(&mut p.notify, notify_flags(v)?),
        // At most 500 characters (RFC 3461 §4.2).
        (keywords::ORCPT, Some(v)) if v.len() > 500 => Err(ParseError::Syntax),
        (keywords::ORCPT, Some(v)) => {
            // ORCPT=addr-type ";" xtext (RFC 3461 §4.2)
            let semi = v
                .iter()
                .position(|&b| b == b';')
                .ok_or(ParseError::Syntax)?;
            let (kind, text) = v.split_at_checked(semi).ok_or(ParseError::Syntax)?;
            let text = text.get(1..).unwrap_or_default();
            if kind.is_empty()
                || !kind.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-')
                || !is_xtext(text)
            {
                return Err(ParseError::Syntax);
            }
            set(&mut p.orcpt, utf8(v)?)
        }
        (keywords::NOTIFY | keywords::ORCPT, None) => Err(ParseError::Syntax),
        _ => Err(ParseError::UnknownParameter),
    })?;
    Ok((Command::Rcpt { to, params: p }, rem))
}

fn notify_flags(v: &[u8]) -> Result<u8, ParseError> {
    let mut flags = 0u8;
    for item in v.split(|&b| b == b',') {
        let f = if item.eq_ignore_ascii_case(b"NEVER") {
            notify::NEVER
        } else if item.eq_ignore_ascii_case(b"SUCCESS") {
            notify::SUCCESS
        } else if item.eq_ignore_ascii_case(b"FAILURE") {
            notify::FAILURE
        } else if item.eq_ignore_ascii_case(b"DELAY") {
            notify::DELAY
        } else {
            return Err(ParseError::Syntax);
        };
        if flags & f != 0 {
            return Err(ParseError::Syntax);
        }
        flags |= f;
    }
    // NEVER excludes the others.
    if flags & notify::NEVER != 0 && flags != notify::NEVER {
        return Err(ParseError::Syntax);
    }
    Ok(flags)
}

fn bdat(args: &[u8]) -> Result<Command<'_>, ParseError> {
    let mut words = args.split(|&b| b == b' ').filter(|w| !w.is_empty());
    let size = digits(words.next().ok_or(ParseError::Syntax)?)?;
    let last = match words.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case(b"LAST") => true,
        Some(_) => return Err(ParseError::Syntax),
    };
    if words.next().is_some() {
        return Err(ParseError::Syntax);
    }
    Ok(Command::Bdat { size, last })
}

fn auth(args: &[u8]) -> Result<Command<'_>, ParseError> {
    let mut words = args.split(|&b| b == b' ').filter(|w| !w.is_empty());
    let mech = words.next().ok_or(ParseError::Syntax)?;
    let mechanism = if mech.eq_ignore_ascii_case(b"PLAIN") {
        Mechanism::Plain
    } else if mech.eq_ignore_ascii_case(b"LOGIN") {
        Mechanism::Login
    } else {
        return Err(ParseError::UnknownMechanism);
    };
    let initial = words.next();
    if words.next().is_some() {
        return Err(ParseError::Syntax);
    }
    Ok(Command::Auth { mechanism, initial })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The reference: frame the line, then parse it.
    fn framed_slow(input: &[u8], max_line: usize) -> Framed<'_> {
        match line::frame(input, max_line) {
            Frame::Line { line, consumed } => Framed::Command(parse(line), consumed),
            Frame::Partial => Framed::Partial,
            Frame::TooLong { consumed } => Framed::TooLong { consumed },
        }
    }

    fn smtpish() -> impl Strategy<Value = Vec<u8>> {
        let tokens: Vec<&'static [u8]> = vec![
            b"MAIL FROM:",
            b"RCPT TO:",
            b"EHLO ",
            b"HELO ",
            b"DATA",
            b"RSET",
            b"QUIT",
            b"NOOP",
            b"<a@b.c>",
            b"<>",
            b"<Postmaster>",
            b" SIZE=10",
            b" BODY=8BITMIME",
            b" NOTIFY=NEVER",
            b" SMTPUTF8",
            b" X=1",
            b" ",
            b"\r",
            b"\n",
            b"\r\n",
            b"x",
            b"=",
            b"<",
            b">",
            b"@",
            "\u{e9}".as_bytes(),
            b"\x00",
        ];
        prop::collection::vec(prop::sample::select(tokens), 0..12).prop_map(|v| v.concat())
    }

    proptest! {
        #[test]
        fn framed_parse_matches_frame_then_parse(input in smtpish(), cap in prop_oneof![Just(512usize), Just(2048), 8usize..40]) {
            prop_assert_eq!(parse_framed(&input, cap), framed_slow(&input, cap));
        }
    }

    #[test]
    fn framed_parse_examples() {
        for input in [
            &b"DATA\r\n"[..],
            b"DATA  \r\nRSET",
            b"DATAX\r\n",
            b"DATA now\r\n",
            b"NOOP\n",
            b"NOOP x\r\n",
            b"MAIL FROM:<a@b.c> SIZE=1\r\n",
            b"MAIL FROM:<a@b.c> SIZE=1\rX\r\n",
            b"MAIL FROM:<a@b.c>\r",
            b"RCPT TO:<a@b.c> \r\n",
            b"EHLO host extra words\r\n",
            b"EHLO host\r\n",
            b"EHLO \r\n",
        ] {
            assert_eq!(
                parse_framed(input, 2048),
                framed_slow(input, 2048),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        assert!(matches!(
            parse_framed(b"MAIL FROM:<a@b.c>\r\n", 10),
            Framed::TooLong { .. }
        ));
    }

    fn p(s: &str) -> Result<Command<'_>, ParseError> {
        parse(s.as_bytes())
    }

    #[test]
    fn verbs_case_insensitive() {
        for (line, cmd) in [
            ("DATA", Command::Data),
            ("data", Command::Data),
            ("DaTa", Command::Data),
            ("RSET", Command::Rset),
            ("NOOP", Command::Noop),
            ("NOOP anything", Command::Noop),
            ("QUIT", Command::Quit),
            ("quit  ", Command::Quit),
            ("VRFY someone", Command::Vrfy),
            ("EXPN list", Command::Expn),
            ("HELP", Command::Help),
            ("HELP MAIL", Command::Help),
            ("STARTTLS", Command::StartTls),
            ("starttls", Command::StartTls),
            (
                "BDAT 0 LAST",
                Command::Bdat {
                    size: 0,
                    last: true,
                },
            ),
            (
                "bdat 1000",
                Command::Bdat {
                    size: 1000,
                    last: false,
                },
            ),
            (
                "BDAT 5 last",
                Command::Bdat {
                    size: 5,
                    last: true,
                },
            ),
        ] {
            assert_eq!(p(line), Ok(cmd), "{line}");
        }
    }

    #[test]
    fn errors_map_to_replies() {
        for (line, err, code, enh) in [
            ("", ParseError::UnknownCommand, 500, "5.5.1"),
            ("FOO", ParseError::UnknownCommand, 500, "5.5.1"),
            ("DATAX", ParseError::UnknownCommand, 500, "5.5.1"),
            ("MAILFROM:<a@b>", ParseError::UnknownCommand, 500, "5.5.1"),
            ("STARTTLSX", ParseError::UnknownCommand, 500, "5.5.1"),
            (
                "M\u{e9}IL FROM:<a@b>",
                ParseError::UnknownCommand,
                500,
                "5.5.1",
            ),
            ("DATA now", ParseError::Syntax, 501, "5.5.4"),
            ("QUIT x", ParseError::Syntax, 501, "5.5.4"),
            ("STARTTLS x", ParseError::Syntax, 501, "5.5.4"),
            ("EHLO", ParseError::HeloSyntax, 501, "5.5.4"),
            ("HELO  ", ParseError::HeloSyntax, 501, "5.5.4"),
            ("EHLO a\x01b", ParseError::HeloSyntax, 501, "5.5.4"),
            ("MAIL TO:<a@b>", ParseError::Syntax, 501, "5.5.4"),
            ("MAIL FROM:a@b", ParseError::BadSender, 501, "5.1.7"),
            ("MAIL FROM:<a@b", ParseError::BadSender, 501, "5.1.7"),
            ("MAIL FROM:<a@b>x", ParseError::Syntax, 501, "5.5.4"),
            ("MAIL FROM:<a@b> SIZE=x", ParseError::Syntax, 501, "5.5.4"),
            ("MAIL FROM:<a@b> SIZE", ParseError::Syntax, 501, "5.5.4"),
            (
                "MAIL FROM:<a@b> SIZE=1 SIZE=2",
                ParseError::Syntax,
                501,
                "5.5.4",
            ),
            (
                "MAIL FROM:<a@b> BODY=9BIT",
                ParseError::Syntax,
                501,
                "5.5.4",
            ),
            ("MAIL FROM:<a@b> RET=ALL", ParseError::Syntax, 501, "5.5.4"),
            (
                "MAIL FROM:<a@b> ENVID=a=b",
                ParseError::Syntax,
                501,
                "5.5.4",
            ),
            (
                "MAIL FROM:<a@b> SMTPUTF8=yes",
                ParseError::Syntax,
                501,
                "5.5.4",
            ),
            (
                "MAIL FROM:<a@b> X-FOO=1",
                ParseError::UnknownParameter,
                555,
                "5.5.4",
            ),
            ("MAIL FROM:<a@b> =1", ParseError::Syntax, 501, "5.5.4"),
            ("RCPT TO:<>", ParseError::BadRecipient, 501, "5.1.3"),
            ("RCPT TO:<a b@c>", ParseError::BadRecipient, 501, "5.1.3"),
            ("RCPT FROM:<a@b>", ParseError::Syntax, 501, "5.5.4"),
            (
                "RCPT TO:<a@b> NOTIFY=NEVER,DELAY",
                ParseError::Syntax,
                501,
                "5.5.4",
            ),
            (
                "RCPT TO:<a@b> NOTIFY=SOMETIMES",
                ParseError::Syntax,
                501,
                "5.5.4",
            ),
            ("RCPT TO:<a@b> ORCPT=a@b", ParseError::Syntax, 501, "5.5.4"),
            (
                // More than 500 characters (RFC 3461 §4.2).
                Box::leak(
                    format!("RCPT TO:<a@b> ORCPT=rfc822;{}@b", "a".repeat(495)).into_boxed_str(),
                ),
                ParseError::Syntax,
                501,
                "5.5.4",
            ),
            (
                "RCPT TO:<a@b> SIZE=1",
                ParseError::UnknownParameter,
                555,
                "5.5.4",
            ),
            ("BDAT", ParseError::Syntax, 501, "5.5.4"),
            ("BDAT x", ParseError::Syntax, 501, "5.5.4"),
            ("BDAT 1 FIRST", ParseError::Syntax, 501, "5.5.4"),
            ("BDAT 1 LAST x", ParseError::Syntax, 501, "5.5.4"),
            ("BDAT -1", ParseError::Syntax, 501, "5.5.4"),
            ("AUTH", ParseError::Syntax, 501, "5.5.4"),
            ("AUTH CRAM-MD5", ParseError::UnknownMechanism, 504, "5.5.4"),
            ("AUTH PLAIN a b", ParseError::Syntax, 501, "5.5.4"),
        ] {
            assert_eq!(p(line), Err(err), "{line:?}");
            let r = err.reply();
            assert_eq!((r.code, r.enhanced), (code, enh), "{line:?}");
        }
    }

    #[test]
    fn helo_and_ehlo() {
        assert_eq!(
            p("EHLO client.example"),
            Ok(Command::Ehlo {
                host: "client.example"
            })
        );
        assert_eq!(
            p("ehlo [192.0.2.1]"),
            Ok(Command::Ehlo {
                host: "[192.0.2.1]"
            })
        );
        assert_eq!(p("HELO my_pc extra"), Ok(Command::Helo { host: "my_pc" }));
    }

    #[test]
    fn mail_with_every_parameter() {
        let Ok(Command::Mail { from, params }) = p(
            "MAIL FROM:<a@b.example> SIZE=12345 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=QQ+2B1 AUTH=<>",
        ) else {
            panic!("should parse")
        };
        assert_eq!(from.map(|a| a.as_str()), Some("a@b.example"));
        assert_eq!(
            params,
            MailParams {
                size: Some(12345),
                body: Some(Body::EightBitMime),
                smtputf8: true,
                ret: Some(Ret::Hdrs),
                envid: Some("QQ+2B1"),
                auth: Some("<>"),
            }
        );
        let Ok(Command::Mail { from, params }) =
            p("mail from: <>  body=binarymime size=99999999999999999999")
        else {
            panic!("should parse")
        };
        assert!(from.is_none());
        assert_eq!(params.body, Some(Body::BinaryMime));
        assert_eq!(params.size, Some(u64::MAX));
    }

    #[test]
    fn rcpt_with_dsn_parameters() {
        let Ok(Command::Rcpt { to, params }) =
            p("RCPT TO:<r@c.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;r+40c.example")
        else {
            panic!("should parse")
        };
        assert_eq!(to.domain(), "c.example");
        assert_eq!(params.notify, Some(notify::SUCCESS | notify::FAILURE));
        assert_eq!(params.orcpt, Some("rfc822;r+40c.example"));
        assert!(matches!(
            p("RCPT TO:<Postmaster>"),
            Ok(Command::Rcpt { .. })
        ));
    }

    #[test]
    fn auth_commands() {
        assert_eq!(
            p("AUTH PLAIN AGEAYg=="),
            Ok(Command::Auth {
                mechanism: Mechanism::Plain,
                initial: Some(b"AGEAYg==")
            })
        );
        assert_eq!(
            p("auth login"),
            Ok(Command::Auth {
                mechanism: Mechanism::Login,
                initial: None
            })
        );
    }
}
