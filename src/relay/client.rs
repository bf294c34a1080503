//! The relay client as a sans-IO state machine: it is told every reply the next hop sends and
//! answers with what to write next. The runtime does the I/O (and the TLS handshake when told).
//!
//! Covers EHLO with HELO fallback, STARTTLS (policy: none, opportunistic, required), AUTH PLAIN
//! and LOGIN, PIPELINING (MAIL, every RCPT and DATA/BDAT in one write), SIZE, 8BITMIME,
//! SMTPUTF8, DATA with dot-stuffing or BDAT when CHUNKING is offered, and per-recipient
//! results. The end of the message always goes out in the same write as its last bytes.

use base64::Engine as _;

use super::RelayTls;
use super::failure::Failure;
use super::reply::{Capabilities, Reply};
use crate::delivery::{DsnRequest, DsnRet};

/// How to talk to the next hop.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub ehlo: String,
    pub tls: RelayTls,
    /// `(user, password)` for AUTH.
    pub auth: Option<(String, String)>,
}

/// What the runtime does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Write these bytes, then read the next reply.
    Send(Vec<u8>),
    /// Read the next reply (pipelined replies are still owed).
    Wait,
    /// The 220 to STARTTLS arrived: run the TLS handshake, then call [`Client::tls_started`].
    /// Bytes already buffered after that reply are an injection attack: drop the connection.
    StartTls,
    /// Ready for a transaction ([`Client::start`]).
    Ready,
    /// The transaction is over: one reply per recipient, in order.
    Done(Vec<Reply>),
    /// The connection is unusable; this reply stands for every recipient of the transaction.
    Failed(Reply),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Greeting,
    Ehlo,
    Helo,
    StartTls,
    AuthPlain,
    AuthLogin(u8),
    Ready,
    Txn,
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Rset,
    Mail,
    Rcpt(usize),
    Data,
    Body,
}

#[derive(Debug, Default)]
struct Txn {
    pipelined: bool,
    /// `RCPT TO:<…> [params]` CRLF, one per recipient.
    rcpts: Vec<String>,
    params: String,
    expect: std::collections::VecDeque<Expect>,
    mail: Option<Reply>,
    results: Vec<Option<Reply>>,
    /// The DATA payload (dot-stuffed, with the final dot) sent after 354.
    payload: Vec<u8>,
    next_rcpt: usize,
}

/// One connection's client side.
#[derive(Debug)]
pub struct Client {
    opts: ClientOptions,
    state: State,
    tls: bool,
    caps: Capabilities,
    needs_rset: bool,
    txn: Txn,
}

impl Client {
    /// A new connection, waiting for the greeting; `tls` when it is implicit TLS.
    pub fn new(opts: ClientOptions, tls: bool) -> Client {
        Client {
            opts,
            state: State::Greeting,
            tls,
            caps: Capabilities::default(),
            needs_rset: false,
            txn: Txn::default(),
        }
    }

    pub fn is_tls(&self) -> bool {
        self.tls
    }

    pub fn is_ready(&self) -> bool {
        self.state == State::Ready
    }

    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    fn fail(&mut self, r: Reply) -> Action {
        self.state = State::Closed;
        Action::Failed(r)
    }

    fn ehlo(&mut self) -> Action {
        self.state = State::Ehlo;
        Action::Send(format!("EHLO {}\r\n", self.opts.ehlo).into_bytes())
    }

    /// Handle one reply.
    pub fn on_reply(&mut self, r: Reply) -> Action {
        // 421 at any point: the server is closing the channel (RFC 5321 §3.8).
        if r.code == 421 && self.state != State::Txn {
            return self.fail(r);
        }
        match self.state {
            State::Greeting if r.code == 220 => self.ehlo(),
            State::Greeting => self.fail(r),
            State::Ehlo if r.is_positive() => {
                self.caps = Capabilities::from_ehlo(&r);
                self.after_hello()
            }
            State::Ehlo if r.is_permanent() => {
                self.state = State::Helo;
                Action::Send(format!("HELO {}\r\n", self.opts.ehlo).into_bytes())
            }
            State::Helo if r.is_positive() => {
                self.caps = Capabilities::default();
                self.after_hello()
            }
            State::Ehlo | State::Helo => self.fail(r),
            State::StartTls if r.code == 220 => Action::StartTls,
            State::StartTls if self.opts.tls == RelayTls::Required => self
                .fail(Failure::TlsRequired(format!("STARTTLS refused: {}", r.one_line())).reply()),
            // Opportunistic: carry on in plain text.
            State::StartTls => self.after_tls_choice(),
            State::AuthPlain | State::AuthLogin(2) if r.code == 235 => self.ready(),
            State::AuthLogin(0) if r.code == 334 => {
                self.state = State::AuthLogin(1);
                let user = self.opts.auth.as_ref().map_or("", |a| a.0.as_str());
                Action::Send(b64_line(user.as_bytes()))
            }
            State::AuthLogin(1) if r.code == 334 => {
                self.state = State::AuthLogin(2);
                let pw = self.opts.auth.as_ref().map_or("", |a| a.1.as_str());
                Action::Send(b64_line(pw.as_bytes()))
            }
            // A refused login is a configuration problem here, not the sender's: retry later.
            State::AuthPlain | State::AuthLogin(_) => self.fail(
                Failure::Authentication(format!(
                    "authentication to the next hop failed: {}",
                    r.one_line()
                ))
                .reply(),
            ),
            State::Txn => self.txn_reply(r),
            State::Ready | State::Closed => self.fail(
                Failure::Unexpected(format!(
                    "unexpected reply from the next hop: {}",
                    r.one_line()
                ))
                .reply(),
            ),
        }
    }

    /// The TLS handshake after STARTTLS succeeded: say EHLO again (RFC 3207 §4.2).
    pub fn tls_started(&mut self) -> Action {
        self.tls = true;
        self.ehlo()
    }

    fn after_hello(&mut self) -> Action {
        let want_tls = matches!(self.opts.tls, RelayTls::Opportunistic | RelayTls::Required);
        if !self.tls && want_tls && self.caps.starttls {
            self.state = State::StartTls;
            return Action::Send(b"STARTTLS\r\n".to_vec());
        }
        if !self.tls && self.opts.tls == RelayTls::Required {
            return self
                .fail(Failure::TlsRequired("the next hop does not offer STARTTLS".into()).reply());
        }
        self.after_tls_choice()
    }

    fn after_tls_choice(&mut self) -> Action {
        let Some((user, pw)) = self.opts.auth.clone() else {
            return self.ready();
        };
        if !self.tls && self.opts.tls != RelayTls::None {
            return self.fail(
                Failure::Authentication(
                    "not sending credentials to the next hop without TLS".into(),
                )
                .reply(),
            );
        }
        if self.caps.auth_plain {
            self.state = State::AuthPlain;
            let mut raw = Vec::new();
            raw.push(0);
            raw.extend_from_slice(user.as_bytes());
            raw.push(0);
            raw.extend_from_slice(pw.as_bytes());
            let mut line = b"AUTH PLAIN ".to_vec();
            line.extend_from_slice(&b64_line(&raw));
            Action::Send(line)
        } else if self.caps.auth_login {
            self.state = State::AuthLogin(0);
            Action::Send(b"AUTH LOGIN\r\n".to_vec())
        } else {
            self.fail(
                Failure::Authentication(
                    "the next hop offers neither AUTH PLAIN nor AUTH LOGIN".into(),
                )
                .reply(),
            )
        }
    }

    fn ready(&mut self) -> Action {
        self.state = State::Ready;
        Action::Ready
    }

    /// Begin a transaction (only when ready). `message` parts are sent back to back (trace
    /// header, then content as received). `dsn` (its recipients aligned with `rcpts`) goes on
    /// as RET/ENVID and NOTIFY/ORCPT when the hop offers DSN. `binary` content (BODY=BINARYMIME)
    /// goes only by BDAT to a hop that offers BINARYMIME; any other hop fails it with `554 5.6.3`
    /// (RFC 3030 §3: no conversion here).
    pub fn start(
        &mut self,
        from: &str,
        rcpts: &[String],
        dsn: &DsnRequest,
        binary: bool,
        message: &[&[u8]],
    ) -> Action {
        if self.state != State::Ready {
            return Action::Failed(Failure::Unexpected("connection not ready".into()).reply());
        }
        let size: usize = message.iter().map(|p| p.len()).sum();
        let all = |r: Reply| Action::Done(vec![r; rcpts.len()]);
        if let Some(limit) = self.caps.size
            && size as u64 > limit
        {
            return all(Failure::TooBigForHop {
                size: size as u64,
                limit,
            }
            .reply());
        }
        let utf8 = !from.is_ascii() || rcpts.iter().any(|r| !r.is_ascii());
        if utf8 && !self.caps.smtputf8 {
            return all(Failure::NoSmtpUtf8.reply());
        }
        let pipelined = self.caps.pipelining;
        if binary && !(pipelined && self.caps.chunking && self.caps.binarymime) {
            return all(Failure::NoBinaryMime.reply());
        }
        let mut params = String::new();
        // Only to a hop that offers SIZE (RFC 1870 §6: a parameter of an extension not
        // offered may be refused with 555).
        if self.caps.size_offered {
            params.push_str(&format!(" SIZE={size}"));
        }
        let eight_bit = message.iter().any(|p| p.iter().any(|&b| b >= 0x80));
        if binary {
            params.push_str(" BODY=BINARYMIME");
        } else if eight_bit && self.caps.eightbitmime {
            params.push_str(" BODY=8BITMIME");
        }
        if utf8 {
            params.push_str(" SMTPUTF8");
        }
        if self.caps.dsn {
            match dsn.ret {
                Some(DsnRet::Full) => params.push_str(" RET=FULL"),
                Some(DsnRet::Hdrs) => params.push_str(" RET=HDRS"),
                None => {}
            }
            if let Some(e) = &dsn.envid {
                params.push_str(&format!(" ENVID={e}"));
            }
        }
        let rcpt_lines = rcpts
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut line = format!("RCPT TO:<{r}>");
                let d = dsn.rcpt(i);
                if self.caps.dsn {
                    if let Some(n) = d.notify {
                        line.push_str(" NOTIFY=");
                        line.push_str(&notify_value(n));
                    }
                    if let Some(o) = &d.orcpt {
                        line.push_str(&format!(" ORCPT={o}"));
                    }
                }
                line.push_str("\r\n");
                line
            })
            .collect();
        let bdat = pipelined && self.caps.chunking;
        let mut txn = Txn {
            pipelined,
            rcpts: rcpt_lines,
            params,
            results: vec![None; rcpts.len()],
            ..Txn::default()
        };
        let mut out = Vec::with_capacity(size + 256);
        if self.needs_rset {
            out.extend_from_slice(b"RSET\r\n");
            txn.expect.push_back(Expect::Rset);
            self.needs_rset = false;
        }
        out.extend_from_slice(format!("MAIL FROM:<{from}>{}\r\n", txn.params).as_bytes());
        txn.expect.push_back(Expect::Mail);
        if pipelined {
            for (i, line) in txn.rcpts.iter().enumerate() {
                out.extend_from_slice(line.as_bytes());
                txn.expect.push_back(Expect::Rcpt(i));
            }
            txn.next_rcpt = rcpts.len();
            if bdat {
                out.extend_from_slice(format!("BDAT {size} LAST\r\n").as_bytes());
                for p in message {
                    out.extend_from_slice(p);
                }
                txn.expect.push_back(Expect::Body);
            } else {
                out.extend_from_slice(b"DATA\r\n");
                txn.expect.push_back(Expect::Data);
                txn.payload = dot_stuff(message);
            }
        } else {
            txn.payload = dot_stuff(message);
        }
        self.txn = txn;
        self.state = State::Txn;
        Action::Send(out)
    }

    fn txn_reply(&mut self, r: Reply) -> Action {
        let Some(expect) = self.txn.expect.pop_front() else {
            return self
                .fail(Failure::Unexpected("unexpected reply from the next hop".into()).reply());
        };
        if r.code == 421 {
            return self.fail(r);
        }
        match expect {
            Expect::Rset => {}
            Expect::Mail => {
                if !r.is_positive() {
                    self.txn.mail = Some(r);
                    if !self.txn.pipelined {
                        return self.finish();
                    }
                } else if !self.txn.pipelined {
                    return self.next_rcpt();
                }
            }
            Expect::Rcpt(i) => {
                if let Some(slot) = self.txn.results.get_mut(i) {
                    *slot = Some(r);
                }
                if !self.txn.pipelined {
                    return self.next_rcpt();
                }
            }
            Expect::Data => {
                if r.code == 354 {
                    let accepted = self.txn.mail.is_none() && self.any_accepted();
                    self.txn.expect.push_back(Expect::Body);
                    if accepted {
                        return Action::Send(std::mem::take(&mut self.txn.payload));
                    }
                    // Nothing to send for: end the (empty) message at once.
                    return Action::Send(b".\r\n".to_vec());
                }
                // No message was sent: the recipients keep their own replies.
                if self.any_accepted() && self.txn.mail.is_none() {
                    return self.finish_with(r);
                }
                return self.finish();
            }
            Expect::Body => {
                if self.txn.mail.is_none() && self.any_accepted() {
                    return self.finish_with(r);
                }
                return self.finish();
            }
        }
        if self.txn.expect.is_empty() {
            self.finish()
        } else {
            Action::Wait
        }
    }

    fn any_accepted(&self) -> bool {
        self.txn
            .results
            .iter()
            .any(|r| r.as_ref().is_some_and(Reply::is_positive))
    }

    fn next_rcpt(&mut self) -> Action {
        let i = self.txn.next_rcpt;
        if let Some(line) = self.txn.rcpts.get(i) {
            let line = line.clone().into_bytes();
            self.txn.next_rcpt += 1;
            self.txn.expect.push_back(Expect::Rcpt(i));
            return Action::Send(line);
        }
        if !self.any_accepted() {
            return self.finish();
        }
        self.txn.expect.push_back(Expect::Data);
        Action::Send(b"DATA\r\n".to_vec())
    }

    /// End of transaction where the final reply applies to every accepted recipient.
    fn finish_with(&mut self, fin: Reply) -> Action {
        for r in self.txn.results.iter_mut() {
            if r.as_ref().is_some_and(Reply::is_positive) {
                *r = Some(fin.clone());
            }
        }
        self.finish()
    }

    fn finish(&mut self) -> Action {
        let missing = Failure::NoRecipientReply.reply();
        let results: Vec<Reply> = match self.txn.mail.take() {
            Some(m) => vec![m; self.txn.rcpts.len()],
            None => self
                .txn
                .results
                .drain(..)
                .map(|r| r.unwrap_or_else(|| missing.clone()))
                .collect(),
        };
        // Anything but a fully delivered message leaves server state to reset.
        self.needs_rset = !results.iter().all(Reply::is_positive) || !self.txn.expect.is_empty();
        if !self.txn.expect.is_empty() {
            // Replies still owed (a non-pipelined early end never leaves any).
            self.state = State::Closed;
        } else {
            self.state = State::Ready;
        }
        self.txn = Txn::default();
        Action::Done(results)
    }

    /// `QUIT`.
    pub fn quit(&mut self) -> Vec<u8> {
        self.state = State::Closed;
        b"QUIT\r\n".to_vec()
    }
}

/// `NOTIFY=` value (RFC 3461 §4.1): `NEVER`, or the requested events.
fn notify_value(n: u8) -> String {
    use crate::proto::command::notify;
    if n & notify::NEVER != 0 {
        return "NEVER".into();
    }
    let names = [
        (notify::SUCCESS, "SUCCESS"),
        (notify::FAILURE, "FAILURE"),
        (notify::DELAY, "DELAY"),
    ];
    names
        .iter()
        .filter(|(f, _)| n & f != 0)
        .map(|(_, name)| *name)
        .collect::<Vec<_>>()
        .join(",")
}

fn b64_line(raw: &[u8]) -> Vec<u8> {
    let mut s = base64::engine::general_purpose::STANDARD.encode(raw);
    s.push_str("\r\n");
    s.into_bytes()
}

/// The DATA payload, canonical whatever the content holds: every line end (CRLF, a bare CR, a
/// bare LF) is sent as CRLF, a line starting with `.` gets another one (RFC 5321 §4.5.2), a
/// missing final CRLF is added, then `.` CRLF. Content that arrived by BDAT or as BINARYMIME may
/// hold any bytes; a next hop that reads a lone CR or LF as a line end must still see the same
/// lines and the same end of data (CVE-2023-51764 family: `\r.\r\n`, `\n.\n`, …).
pub fn dot_stuff(parts: &[&[u8]]) -> Vec<u8> {
    let size: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(size + size / 64 + 8);
    let mut line_start = true;
    // A CR that ended the previous part: one line end, with or without the LF that follows.
    let mut cr_held = false;
    for p in parts {
        let mut rest: &[u8] = p;
        if cr_held && !rest.is_empty() {
            cr_held = false;
            rest = rest.strip_prefix(b"\n").unwrap_or(rest);
        }
        while let Some(&first) = rest.first() {
            if line_start && first == b'.' {
                out.push(b'.');
            }
            let Some(i) = memchr::memchr2(b'\r', b'\n', rest) else {
                out.extend_from_slice(rest);
                line_start = false;
                break;
            };
            out.extend_from_slice(rest.get(..i).unwrap_or_default());
            out.extend_from_slice(b"\r\n");
            line_start = true;
            let tail = rest.get(i + 1..).unwrap_or_default();
            rest = match (rest.get(i), tail.first()) {
                (Some(b'\r'), Some(b'\n')) => tail.get(1..).unwrap_or_default(),
                (Some(b'\r'), None) => {
                    cr_held = true;
                    tail
                }
                _ => tail,
            };
        }
    }
    if !line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

#[cfg(test)]
mod tests;
