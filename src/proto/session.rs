//! The session state machine: bytes in, events and queued replies out.
//!
//! ```text
//! runtime                                   Session
//!   read → buf ───── feed(&buf, now) ──────▶ Feed (iterator of Event<'buf>)
//!                   ◀── Event::Rcpt{..} ──── (waits for a decision)
//!   policy ───────── accept() / reject(r) ─▶ reply queued
//!                   ◀── None + stop() ────── NeedInput | Flush | Decision | StartTls | Close
//!   write(output()), keep buf[consumed..]
//! ```
//! Replies are queued in order and flushed where RFC 2920 §3.2 requires: after the reply to a
//! command that ends a pipelined group (EHLO, DATA, end of data, NOOP, QUIT, STARTTLS, AUTH, …) and
//! whenever the input runs out, so a pipelined MAIL/RCPT…/DATA group costs one write.

use std::sync::Arc;
use std::time::Instant;

use base64::Engine as _;

use super::address::Address;
use super::command::{self, Body, Command, MailParams, Mechanism, RcptParams};
use super::data::{BareLinePolicy, Chunk, ChunkLines, DataReader};
use super::line::{self, Frame};
use super::reply::{self, Reply, write_line};
use super::settings::Settings;

/// Something the runtime must know about or decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<'a> {
    /// EHLO/HELO answered; any open transaction was discarded (RFC 5321 §4.1.4).
    Helo { host: &'a str, extended: bool },
    /// Decision: MAIL FROM passed the protocol checks.
    Mail {
        from: Option<Address<'a>>,
        params: MailParams<'a>,
    },
    /// Decision: RCPT TO passed the protocol checks.
    Rcpt {
        to: Address<'a>,
        params: RcptParams<'a>,
    },
    /// Message content starts (354 sent, or the first BDAT chunk arrived).
    MessageStart,
    /// Message content, dot-unstuffed, borrowing the input where possible.
    Body(&'a [u8]),
    /// Decision: the whole message was received; answer after it is durable.
    MessageEnd { size: u64 },
    /// The session refused the message; its reply is queued.
    MessageAborted { reason: AbortReason },
    /// RSET: the transaction is discarded.
    Reset,
    /// STARTTLS accepted and `220` queued: flush, handshake, then call `tls_established`.
    StartTls,
    /// Decision: credentials to check.
    Auth(Credentials),
    /// QUIT answered; the session is closed.
    Quit,
}

/// Why the session refused a message on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortReason {
    /// Over `max_message_size` (`552 5.3.4`).
    TooBig,
    /// Bare CR or LF under the reject policy (`550 5.6.0`).
    BareLineEnding,
    /// A NUL byte outside BODY=BINARYMIME (`550 5.6.0`).
    Nul,
    /// The first content line starts with a space or tab (`550 5.6.0`).
    FoldedFirstLine,
}

/// Decoded SASL credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub mechanism: Mechanism,
    /// Authorization identity (PLAIN only; empty when absent).
    pub authzid: String,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("mechanism", &self.mechanism)
            .field("authzid", &self.authzid)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Why [`Feed::next`] returned `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The input is used up (a partial line may remain unconsumed): write output, read more.
    NeedInput,
    /// Output must be written now (RFC 2920); then feed the rest of the input.
    Flush,
    /// A decision event is unanswered.
    Decision,
    /// Write output, run the TLS handshake, call [`Session::tls_established`].
    StartTls,
    /// Write output and close the connection.
    Close,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum BdatMode {
    Keep,
    TooBig,
    Refuse(Reply),
}

#[derive(Debug)]
enum State {
    /// Before EHLO/HELO (also right after STARTTLS).
    Fresh,
    /// Greeted; a transaction may be open (see `Txn`).
    Ready,
    Data(DataReader),
    Bdat {
        remaining: u64,
        last: bool,
        mode: BdatMode,
    },
    AuthPlain,
    AuthLoginUser,
    AuthLoginPass(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    Mail { smtputf8: bool, body: Option<Body> },
    Rcpt,
    Message,
    Auth,
    StartTls,
}

#[derive(Debug, Default)]
struct Txn {
    active: bool,
    rcpts: usize,
    rcpt_attempts: usize,
    smtputf8: bool,
    body: Option<Body>,
    size: u64,
    chunks: u32,
    too_big: bool,
    /// BDAT line-ending check (absent for BODY=BINARYMIME, whose content is binary).
    lines: Option<ChunkLines>,
    /// The first content defect seen; the message is refused at its end.
    defect: Option<AbortReason>,
    /// When MAIL was accepted (for `max_transaction_time`).
    started: Option<Instant>,
    /// A refused RCPT of this transaction was counted as a junk command (one per
    /// transaction: a list message whose recipients meet a rate limit is not cut off).
    rcpt_refusal_counted: bool,
    /// Bytes of the recipients accepted (path and ORCPT), and of the one being decided.
    rcpt_bytes: usize,
    rcpt_pending_bytes: usize,
}

/// The most bytes of recipients (paths and ORCPTs) one transaction holds: 1,000 addresses
/// of 60 bytes with ORCPTs of the same size fit; past it, `452 4.5.3` as for too many
/// recipients (the client sends the rest in another transaction). Without it, 1,000
/// recipients of 256 bytes with 500-byte ORCPTs held 663 KiB per connection.
const MAX_RECIPIENT_BYTES: usize = 128 << 10;

/// What one recipient weighs against [`MAX_RECIPIENT_BYTES`].
fn rcpt_bytes(to: &Address<'_>, params: &RcptParams<'_>) -> usize {
    to.as_str().len() + params.orcpt.map_or(0, str::len)
}

/// One SMTP server session (one connection).
#[derive(Debug)]
pub struct Session {
    settings: Arc<Settings>,
    state: State,
    txn: Txn,
    out: Vec<u8>,
    flush: bool,
    pending: Option<Pending>,
    discarding: bool,
    closed: bool,
    tls: bool,
    esmtp: bool,
    authenticated: bool,
    errors: u32,
    /// Commands that moved no mail since the last message accepted
    /// ([`SessionConfig::max_junk_commands`](super::SessionConfig::max_junk_commands)).
    junk: u32,
    last_activity: Instant,
    stop: Stop,
    /// Closed for sending commands ahead of their replies without PIPELINING.
    unauth_pipelining: bool,
    /// When the last BDAT command was read (a refused chunk's time limit runs from it).
    chunk_started: Instant,
}

impl Session {
    /// A new session; the greeting is queued.
    pub fn new(settings: Arc<Settings>, now: Instant) -> Session {
        let mut out = Vec::with_capacity(1024);
        out.extend_from_slice(&settings.greeting);
        Session {
            settings,
            state: State::Fresh,
            txn: Txn::default(),
            out,
            flush: true,
            pending: None,
            discarding: false,
            closed: false,
            tls: false,
            esmtp: false,
            authenticated: false,
            errors: 0,
            junk: 0,
            last_activity: now,
            stop: Stop::NeedInput,
            unauth_pipelining: false,
            chunk_started: now,
        }
    }

    /// Process `input` (everything received and not yet consumed). Pull events from the
    /// returned [`Feed`]; afterwards drop `feed.consumed()` bytes from the front of the buffer.
    ///
    /// What counts as activity (the idle timeout runs from it): a complete command line, and
    /// the bytes of a message or BDAT chunk. Bytes of a line still partial or of an over-long
    /// line being skipped do not, else a byte every few minutes would hold the session for
    /// ever with no command ever counted against its limits; a refused BDAT chunk (outside any
    /// transaction) must arrive within `max_transaction_time` of its command.
    pub fn feed<'s, 'a>(&'s mut self, input: &'a [u8], now: Instant) -> Feed<'s, 'a> {
        let content = matches!(self.state, State::Data(_) | State::Bdat { .. });
        if content && !input.is_empty() {
            self.last_activity = now;
        }
        Feed {
            session: self,
            input,
            pos: 0,
            now,
        }
    }

    /// Replies queued so far.
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    /// Forget the queued replies (after writing them).
    pub fn clear_output(&mut self) {
        self.out.clear();
    }

    /// Swap the output buffer with `spare` (which should be empty): hands an owned buffer to
    /// an io_uring write without copying.
    pub fn swap_output(&mut self, spare: &mut Vec<u8>) {
        std::mem::swap(&mut self.out, spare);
    }

    /// Why the last [`Feed::next`] returned `None`.
    pub fn stop(&self) -> Stop {
        self.stop
    }

    /// The session is over; write the output and close.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// TLS is active on this session.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// AUTH succeeded on this session.
    pub fn is_authenticated(&self) -> bool {
        self.authenticated
    }

    /// A transaction (accepted MAIL) is open.
    pub fn in_transaction(&self) -> bool {
        self.txn.active
    }

    /// Bytes of the message under way received so far (kept or not).
    pub fn message_size(&self) -> u64 {
        self.txn.size
    }

    /// The message under way will be refused at its end (too big, or content refused): what
    /// was kept of it is of no more use.
    pub fn message_doomed(&self) -> bool {
        self.txn.too_big || self.txn.defect.is_some()
    }

    /// The settings this session runs with.
    pub fn settings(&self) -> &Arc<Settings> {
        &self.settings
    }

    /// When the session times out if nothing arrives (RFC 5321 §4.5.3.2), or when the open
    /// transaction has lasted `max_transaction_time`, whichever comes first.
    pub fn deadline(&self) -> Instant {
        let cfg = &self.settings.cfg;
        let t = match self.state {
            State::Data(_) | State::Bdat { .. } => cfg.data_timeout,
            _ => cfg.command_timeout,
        };
        let idle = self.last_activity + t;
        let started = match &self.state {
            State::Bdat {
                mode: BdatMode::Refuse(_),
                ..
            } => Some(self.chunk_started),
            _ => self.txn.started,
        };
        match started {
            Some(s) => idle.min(s + cfg.max_transaction_time),
            None => idle,
        }
    }

    /// If `now` is past the deadline, queue `421 4.4.2` and close. Returns whether it did.
    pub fn check_timeout(&mut self, now: Instant) -> bool {
        if self.closed || now < self.deadline() {
            return false;
        }
        self.close_with(&reply::TIMEOUT);
        true
    }

    /// Whether the session was closed because the client sent commands ahead of their replies
    /// without PIPELINING offered to it (a spam engine's shortcut, like postscreen's
    /// pipelining test).
    pub fn pipelined_unoffered(&self) -> bool {
        self.unauth_pipelining
    }

    /// Whether this client may send commands ahead of their replies: the binding offers
    /// PIPELINING and the client said EHLO (or has not greeted yet: errors before EHLO are
    /// answered, not punished). After HELO there is no PIPELINING (RFC 2920 needs EHLO).
    fn pipelining_offered(&self) -> bool {
        self.settings.cfg.extensions.pipelining
            && (self.esmtp || matches!(self.state, State::Fresh))
    }

    /// Queue `reply` and close (server policy: too many connections, shutdown, …).
    pub fn close_with(&mut self, r: &Reply) {
        if !self.closed {
            self.reply(r);
            self.closed = true;
            self.pending = None;
        }
    }

    /// The TLS handshake after STARTTLS (or on an implicit-TLS port, before any input)
    /// succeeded: back to the state before EHLO (RFC 3207 §4.2), nothing of the plaintext
    /// session is kept.
    pub fn tls_established(&mut self) {
        self.tls = true;
        self.esmtp = false;
        self.authenticated = false;
        self.state = State::Fresh;
        self.txn = Txn::default();
        if self.pending == Some(Pending::StartTls) {
            self.pending = None;
        }
    }

    /// Accept the pending decision with the standard positive reply.
    pub fn accept(&mut self) {
        match self.pending.take() {
            Some(Pending::Mail { smtputf8, body }) => {
                self.txn = Txn {
                    active: true,
                    smtputf8,
                    body,
                    started: Some(self.last_activity),
                    ..Txn::default()
                };
                self.reply(&reply::SENDER_OK);
            }
            Some(Pending::Rcpt) => {
                self.txn.rcpts += 1;
                self.txn.rcpt_bytes += self.txn.rcpt_pending_bytes;
                self.reply(&reply::RECIPIENT_OK);
            }
            Some(Pending::Message) => {
                self.txn = Txn::default();
                self.reply(&reply::MESSAGE_OK);
                self.flush = true;
            }
            Some(Pending::Auth) => {
                self.authenticated = true;
                self.reply(&reply::AUTH_OK);
                self.flush = true;
            }
            Some(Pending::StartTls) => self.pending = Some(Pending::StartTls),
            None => {}
        }
    }

    /// Accept the pending end of message, naming its queue id in the reply.
    pub fn accept_message(&mut self, queue_id: &str) {
        if self.pending != Some(Pending::Message) {
            return self.accept();
        }
        self.pending = None;
        self.txn = Txn::default();
        self.junk = 0;
        let r = &reply::MESSAGE_OK;
        let enhanced = self.enhanced();
        write_line(
            &mut self.out,
            r.code,
            r.enhanced,
            enhanced,
            &[r.text.as_bytes(), b" as ", queue_id.as_bytes()],
        );
        self.flush = true;
    }

    /// Refuse the pending decision with `r` (a 4xx or 5xx reply). A refused MAIL, RCPT (the
    /// first of a transaction) or message moved no mail: it counts towards
    /// `max_junk_commands` (else a client could hold its connection for ever with a
    /// transaction refused every few minutes).
    pub fn reject(&mut self, r: &Reply) {
        match self.pending.take() {
            Some(Pending::Mail { .. }) => {
                self.reply(r);
                self.junk_command();
            }
            Some(Pending::Rcpt) => {
                self.reply(r);
                if !std::mem::replace(&mut self.txn.rcpt_refusal_counted, true) {
                    self.junk_command();
                }
            }
            Some(Pending::Message) => {
                self.txn = Txn::default();
                self.reply(r);
                self.flush = true;
                self.junk_command();
            }
            // A failed authentication is a protocol error: guessing ends at `max_errors`.
            Some(Pending::Auth) => self.error(r),
            Some(Pending::StartTls) => self.pending = Some(Pending::StartTls),
            None => {}
        }
    }

    fn enhanced(&self) -> bool {
        self.settings.cfg.extensions.enhanced_status_codes
    }

    fn reply(&mut self, r: &Reply) {
        let enhanced = self.enhanced();
        r.write_to(&mut self.out, enhanced);
    }

    /// A protocol error: reply, count it, and close once the limit is reached.
    fn error(&mut self, r: &Reply) {
        self.reply(r);
        self.flush = true;
        self.count_error();
    }

    fn count_error(&mut self) {
        self.errors += 1;
        if self.errors >= self.settings.cfg.max_errors {
            self.close_with(&reply::TOO_MANY_ERRORS);
        }
    }

    /// A command that moves no mail (NOOP, RSET, VRFY, HELP, HELO/EHLO, a MAIL refused for
    /// its SIZE or by policy, a transaction's first refused RCPT, a message refused or
    /// aborted), answered: past `max_junk_commands`
    /// of them since the last message accepted, each counts as an error too (as Postfix's
    /// `smtpd_junk_command_limit`), so that one every few minutes cannot hold a connection
    /// forever, while a client that sends RSET between the messages it delivers goes on.
    fn junk_command(&mut self) {
        self.junk = self.junk.saturating_add(1);
        if self.junk > self.settings.cfg.max_junk_commands {
            self.count_error();
        }
    }

    fn on_line<'a>(&mut self, line: &'a [u8], more_input: bool) -> Option<Event<'a>> {
        match std::mem::replace(&mut self.state, State::Ready) {
            State::AuthPlain => return self.sasl_plain(line),
            State::AuthLoginUser => return self.sasl_login_user(line),
            State::AuthLoginPass(user) => return self.sasl_login_pass(user, line),
            other => self.state = other,
        }
        self.on_command(command::parse(line), more_input)
    }

    fn on_command<'a>(
        &mut self,
        parsed: Result<Command<'a>, command::ParseError>,
        more_input: bool,
    ) -> Option<Event<'a>> {
        let cmd = match parsed {
            Ok(cmd) => cmd,
            Err(e) => {
                self.error(e.reply());
                return None;
            }
        };
        let fresh = matches!(self.state, State::Fresh);
        match cmd {
            Command::Ehlo { host } | Command::Helo { host } => {
                let extended = matches!(cmd, Command::Ehlo { .. });
                let r = if !extended {
                    &self.settings.helo_reply
                } else if self.tls {
                    &self.settings.ehlo_tls
                } else {
                    &self.settings.ehlo_plain
                };
                self.out.extend_from_slice(r);
                self.flush = true;
                self.state = State::Ready;
                self.esmtp = extended;
                self.txn = Txn::default();
                self.junk_command();
                Some(Event::Helo { host, extended })
            }
            Command::Mail { from, params } => {
                if fresh {
                    self.error(&reply::HELO_FIRST);
                } else if self.txn.active {
                    self.error(&reply::NESTED_MAIL);
                } else if let Err(r) = self.check_mail_params(&params) {
                    self.error(r);
                } else if from.is_some_and(|a| a.is_utf8()) && !params.smtputf8 {
                    self.error(&reply::UTF8_NOT_PERMITTED);
                } else if params
                    .size
                    .is_some_and(|s| s > self.settings.cfg.max_message_size)
                {
                    self.reply(&reply::MESSAGE_TOO_BIG);
                    self.junk_command();
                } else {
                    self.pending = Some(Pending::Mail {
                        smtputf8: params.smtputf8,
                        body: params.body,
                    });
                    return Some(Event::Mail { from, params });
                }
                None
            }
            Command::Rcpt { to, params } => {
                let x = &self.settings.cfg.extensions;
                if fresh {
                    self.error(&reply::HELO_FIRST);
                } else if !self.txn.active {
                    self.error(&reply::MAIL_FIRST);
                } else if self.txn.chunks > 0 {
                    self.error(&reply::BAD_SEQUENCE);
                } else if (params.notify.is_some() || params.orcpt.is_some())
                    && !(x.dsn && self.esmtp)
                {
                    self.error(&reply::UNKNOWN_PARAMETER);
                } else if to.is_utf8() && !self.txn.smtputf8 {
                    self.error(&reply::UTF8_NOT_PERMITTED);
                } else if self.txn.rcpts >= self.settings.cfg.max_recipients
                    || self.txn.rcpt_bytes + rcpt_bytes(&to, &params) > MAX_RECIPIENT_BYTES
                {
                    self.reply(&reply::TOO_MANY_RECIPIENTS);
                } else {
                    self.txn.rcpt_pending_bytes = rcpt_bytes(&to, &params);
                    self.txn.rcpt_attempts += 1;
                    self.pending = Some(Pending::Rcpt);
                    return Some(Event::Rcpt { to, params });
                }
                None
            }
            Command::Data => {
                if let Some(r) = self.message_sequence_error(fresh) {
                    self.error(r);
                    return None;
                }
                if self.txn.chunks > 0 {
                    self.error(&reply::BAD_SEQUENCE);
                    return None;
                }
                if self.txn.body == Some(Body::BinaryMime) {
                    self.error(&reply::BINARYMIME_NEEDS_BDAT);
                    return None;
                }
                self.reply(&reply::START_DATA);
                self.flush = true;
                self.state = State::Data(DataReader::new(self.settings.cfg.bare_line_policy));
                Some(Event::MessageStart)
            }
            Command::Bdat { size, last } => self.bdat(size, last, fresh),
            Command::Rset => {
                self.txn = Txn::default();
                self.reply(&reply::OK);
                self.junk_command();
                Some(Event::Reset)
            }
            Command::Noop => {
                self.reply(&reply::OK);
                self.flush = true;
                self.junk_command();
                None
            }
            Command::Quit => {
                self.reply(&reply::CLOSING);
                self.closed = true;
                Some(Event::Quit)
            }
            Command::Vrfy => {
                self.reply(&reply::VRFY);
                self.flush = true;
                self.junk_command();
                None
            }
            Command::Expn => {
                self.error(&reply::NOT_IMPLEMENTED);
                None
            }
            Command::Help => {
                self.reply(&reply::HELP);
                self.flush = true;
                self.junk_command();
                None
            }
            Command::StartTls => self.starttls(fresh, more_input),
            Command::Auth { mechanism, initial } => self.auth(mechanism, initial, fresh),
        }
    }

    fn check_mail_params(&self, p: &MailParams<'_>) -> Result<(), &'static Reply> {
        let x = &self.settings.cfg.extensions;
        let any = p.size.is_some()
            || p.body.is_some()
            || p.smtputf8
            || p.ret.is_some()
            || p.envid.is_some()
            || p.auth.is_some();
        let refused = (any && !self.esmtp)
            || (p.size.is_some() && !x.size)
            || (p.body == Some(Body::EightBitMime) && !x.eightbitmime)
            || (p.body == Some(Body::BinaryMime) && !x.binarymime)
            || (p.smtputf8 && !x.smtputf8)
            || ((p.ret.is_some() || p.envid.is_some()) && !x.dsn)
            || (p.auth.is_some() && self.settings.auth_offered(self.tls).is_none());
        if refused {
            Err(&reply::UNKNOWN_PARAMETER)
        } else {
            Ok(())
        }
    }

    /// The reason DATA/BDAT cannot start, if any.
    fn message_sequence_error(&self, fresh: bool) -> Option<&'static Reply> {
        if fresh {
            Some(&reply::HELO_FIRST)
        } else if !self.txn.active {
            Some(&reply::MAIL_FIRST)
        } else if self.txn.rcpts == 0 {
            // RFC 2920 §3.1: after a pipelined group whose RCPTs all failed, say so.
            Some(if self.txn.rcpt_attempts > 0 {
                &reply::NO_VALID_RECIPIENTS
            } else {
                &reply::RCPT_FIRST
            })
        } else {
            None
        }
    }

    fn bdat<'a>(&mut self, size: u64, last: bool, fresh: bool) -> Option<Event<'a>> {
        if !self.settings.cfg.extensions.chunking {
            self.error(&reply::UNKNOWN_COMMAND);
            return None;
        }
        // RFC 3030 §2: the chunk is read (and discarded) even when the command is refused,
        // otherwise its bytes would be taken for commands.
        if let Some(r) = self.message_sequence_error(fresh) {
            if size > self.settings.cfg.max_message_size {
                // No message this large is taken, and its bytes would have to be read (under
                // no transaction's time limit or data rate) to find the next command: refused
                // and closed, not skipped for as long as the client trickles them.
                self.reply(r);
                self.close_with(&reply::CHUNK_NOT_READ);
                return None;
            }
            // The command was just read: its time is the last activity.
            self.chunk_started = self.last_activity;
            self.state = State::Bdat {
                remaining: size,
                last,
                mode: BdatMode::Refuse(r.clone()),
            };
            return None;
        }
        let too_big = self.txn.too_big
            || self.txn.size.saturating_add(size) > self.settings.cfg.max_message_size;
        self.txn.too_big = too_big;
        let mode = if too_big {
            BdatMode::TooBig
        } else {
            BdatMode::Keep
        };
        self.state = State::Bdat {
            remaining: size,
            last,
            mode,
        };
        self.txn.chunks += 1;
        if self.txn.chunks == 1 && self.txn.body != Some(Body::BinaryMime) {
            self.txn.lines = Some(ChunkLines::new(self.settings.cfg.bare_line_policy));
        }
        (self.txn.chunks == 1).then_some(Event::MessageStart)
    }

    fn bdat_chunk_done<'a>(&mut self, last: bool, mode: BdatMode) -> Option<Event<'a>> {
        self.state = State::Ready;
        match mode {
            BdatMode::Refuse(r) => {
                self.error(&r);
                None
            }
            BdatMode::TooBig => {
                self.txn = Txn::default();
                self.reply(&reply::MESSAGE_TOO_BIG);
                self.flush = true;
                // As for DATA (`message_complete`): a message refused moves no mail.
                self.junk_command();
                Some(Event::MessageAborted {
                    reason: AbortReason::TooBig,
                })
            }
            BdatMode::Keep if last => {
                self.flush = true;
                Some(self.message_complete())
            }
            BdatMode::Keep => {
                self.reply(&reply::CHUNK_OK);
                None
            }
        }
    }

    fn end_of_data<'a>(&mut self, bare: bool) -> Event<'a> {
        self.state = State::Ready;
        self.flush = true;
        if bare {
            self.txn.defect.get_or_insert(AbortReason::BareLineEnding);
        }
        self.message_complete()
    }

    /// The whole content is in (DATA's end or the last BDAT chunk): refuse it for the first
    /// defect seen, else ask for the decision.
    fn message_complete<'a>(&mut self) -> Event<'a> {
        let bare = self
            .txn
            .lines
            .as_ref()
            .is_some_and(|l| l.saw_bare_line_ending())
            && self.settings.cfg.bare_line_policy == BareLinePolicy::Reject;
        if bare {
            self.txn.defect.get_or_insert(AbortReason::BareLineEnding);
        }
        if self.txn.too_big {
            self.txn.defect = Some(AbortReason::TooBig);
        }
        let Some(reason) = self.txn.defect else {
            self.pending = Some(Pending::Message);
            return Event::MessageEnd {
                size: self.txn.size,
            };
        };
        self.txn = Txn::default();
        self.reply(match reason {
            AbortReason::TooBig => &reply::MESSAGE_TOO_BIG,
            AbortReason::BareLineEnding => &reply::BARE_LINE_ENDING,
            AbortReason::Nul => &reply::NUL_IN_CONTENT,
            AbortReason::FoldedFirstLine => &reply::FOLDED_FIRST_LINE,
        });
        self.junk_command();
        Event::MessageAborted { reason }
    }

    /// Content defects that are decided on the bytes as they pass: a first line that starts
    /// with a space or tab, and NUL outside BINARYMIME. `d` is content after unstuffing and
    /// line-ending policy; called before its bytes are counted.
    fn check_content(&mut self, d: &[u8]) {
        if self.txn.defect.is_some() {
            return;
        }
        if self.txn.size == 0 && matches!(d.first(), Some(b' ' | b'\t')) {
            self.txn.defect = Some(AbortReason::FoldedFirstLine);
        } else if self.txn.body != Some(Body::BinaryMime) && memchr::memchr(0, d).is_some() {
            self.txn.defect = Some(AbortReason::Nul);
        }
    }

    /// Count message bytes; return whether they are still to be delivered.
    fn body_bytes(&mut self, n: usize) -> bool {
        self.txn.size = self.txn.size.saturating_add(n as u64);
        if self.txn.size > self.settings.cfg.max_message_size {
            self.txn.too_big = true;
        }
        !self.txn.too_big && self.txn.defect.is_none()
    }

    fn starttls<'a>(&mut self, fresh: bool, more_input: bool) -> Option<Event<'a>> {
        if !self.settings.cfg.extensions.starttls {
            self.error(&reply::NOT_IMPLEMENTED);
        } else if self.tls || self.txn.active {
            self.error(&reply::BAD_SEQUENCE);
        } else if fresh {
            self.error(&reply::HELO_FIRST);
        } else if more_input {
            // CVE-2011-0411: anything pipelined after STARTTLS would be read as if it had come
            // over TLS. Refuse and close rather than guess.
            self.close_with(&reply::STARTTLS_PIPELINED);
        } else {
            self.reply(&reply::READY_TO_START_TLS);
            self.flush = true;
            self.pending = Some(Pending::StartTls);
            return Some(Event::StartTls);
        }
        None
    }

    fn auth<'a>(
        &mut self,
        mechanism: Mechanism,
        initial: Option<&[u8]>,
        fresh: bool,
    ) -> Option<Event<'a>> {
        let Some(offer) = self.settings.cfg.auth.clone() else {
            self.error(&reply::AUTH_NOT_ENABLED);
            return None;
        };
        if fresh || !self.esmtp || self.authenticated || self.txn.active {
            self.error(&reply::BAD_SEQUENCE);
            return None;
        }
        if offer.require_tls && !self.tls {
            self.error(&reply::AUTH_NEEDS_TLS);
            return None;
        }
        let enabled = match mechanism {
            Mechanism::Plain => offer.plain,
            Mechanism::Login => offer.login,
        };
        if !enabled {
            self.error(&reply::AUTH_UNKNOWN_MECHANISM);
            return None;
        }
        self.flush = true;
        match (mechanism, initial) {
            // RFC 4954 §4: "=" is an empty initial response.
            (Mechanism::Plain, Some(ir)) => self.sasl_plain(if ir == b"=" { b"" } else { ir }),
            (Mechanism::Plain, None) => {
                self.out.extend_from_slice(b"334 \r\n");
                self.state = State::AuthPlain;
                None
            }
            (Mechanism::Login, Some(ir)) => self.sasl_login_user(ir),
            (Mechanism::Login, None) => {
                self.out.extend_from_slice(b"334 VXNlcm5hbWU6\r\n"); // "Username:"
                self.state = State::AuthLoginUser;
                None
            }
        }
    }

    /// Decode one SASL response line; `None` after replying to `*` or bad base64.
    fn sasl_decode(&mut self, line: &[u8]) -> Option<Vec<u8>> {
        self.flush = true;
        if line == b"*" {
            self.error(&reply::AUTH_CANCELLED);
            return None;
        }
        match base64::engine::general_purpose::STANDARD.decode(line) {
            Ok(v) => Some(v),
            Err(_) => {
                self.error(&reply::AUTH_BAD_RESPONSE);
                None
            }
        }
    }

    fn sasl_plain<'a>(&mut self, line: &[u8]) -> Option<Event<'a>> {
        let raw = self.sasl_decode(line)?;
        // RFC 4616: [authzid] NUL authcid NUL passwd
        let mut parts = raw.split(|&b| b == 0);
        let creds = match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(z), Some(u), Some(p), None) if !u.is_empty() => {
                match (
                    String::from_utf8(z.to_vec()),
                    String::from_utf8(u.to_vec()),
                    String::from_utf8(p.to_vec()),
                ) {
                    (Ok(authzid), Ok(username), Ok(password)) => Some(Credentials {
                        mechanism: Mechanism::Plain,
                        authzid,
                        username,
                        password,
                    }),
                    _ => None,
                }
            }
            _ => None,
        };
        self.sasl_done(creds)
    }

    fn sasl_login_user<'a>(&mut self, line: &[u8]) -> Option<Event<'a>> {
        let raw = self.sasl_decode(line)?;
        match String::from_utf8(raw) {
            Ok(user) if !user.is_empty() => {
                self.out.extend_from_slice(b"334 UGFzc3dvcmQ6\r\n"); // "Password:"
                self.state = State::AuthLoginPass(user);
                None
            }
            _ => self.sasl_done(None),
        }
    }

    fn sasl_login_pass<'a>(&mut self, username: String, line: &[u8]) -> Option<Event<'a>> {
        let raw = self.sasl_decode(line)?;
        let creds = String::from_utf8(raw).ok().map(|password| Credentials {
            mechanism: Mechanism::Login,
            authzid: String::new(),
            username,
            password,
        });
        self.sasl_done(creds)
    }

    fn sasl_done<'a>(&mut self, creds: Option<Credentials>) -> Option<Event<'a>> {
        match creds {
            Some(c) => {
                self.pending = Some(Pending::Auth);
                Some(Event::Auth(c))
            }
            None => {
                self.error(&reply::AUTH_BAD_RESPONSE);
                None
            }
        }
    }

    fn line_too_long(&mut self) {
        if matches!(
            self.state,
            State::AuthPlain | State::AuthLoginUser | State::AuthLoginPass(_)
        ) {
            self.state = State::Ready;
        }
        self.error(&reply::LINE_TOO_LONG);
    }
}

/// Events from one input buffer; see [`Session::feed`].
#[derive(Debug)]
pub struct Feed<'s, 'a> {
    session: &'s mut Session,
    input: &'a [u8],
    pos: usize,
    now: Instant,
}

impl<'a> Feed<'_, 'a> {
    /// Bytes of the input consumed so far; the runtime keeps the rest for the next feed.
    pub fn consumed(&self) -> usize {
        self.pos
    }

    /// The next event, or `None` with the reason in [`Session::stop`].
    #[expect(
        clippy::should_implement_trait,
        reason = "a lending pull API: the session must be decided on between items"
    )]
    pub fn next(&mut self) -> Option<Event<'a>> {
        let s = &mut *self.session;
        loop {
            if s.closed {
                s.stop = Stop::Close;
                return None;
            }
            if let Some(p) = s.pending {
                s.stop = if p == Pending::StartTls {
                    Stop::StartTls
                } else {
                    Stop::Decision
                };
                return None;
            }
            if s.flush {
                s.flush = false;
                if !s.out.is_empty() {
                    s.stop = Stop::Flush;
                    return None;
                }
            }
            // A finished BDAT chunk is answered even when no more input is buffered.
            if let State::Bdat {
                remaining: 0,
                last,
                mode,
            } = &s.state
            {
                let (last, mode) = (*last, mode.clone());
                // A CR that ended the last chunk is bare: normalised, its CRLF goes out first.
                if last && mode == BdatMode::Keep {
                    let tail = s.txn.lines.as_mut().map_or(&[][..], |l| l.finish());
                    if !tail.is_empty() && s.body_bytes(tail.len()) {
                        return Some(Event::Body(tail));
                    }
                }
                if let Some(ev) = s.bdat_chunk_done(last, mode) {
                    return Some(ev);
                }
                continue;
            }
            let rest = self.input.get(self.pos..).unwrap_or_default();
            if rest.is_empty() {
                s.stop = Stop::NeedInput;
                return None;
            }
            match &mut s.state {
                State::Data(reader) => {
                    let (used, chunk) = reader.next(rest);
                    let bare =
                        reader.saw_bare_line_ending() && reader.policy() == BareLinePolicy::Reject;
                    self.pos += used;
                    match chunk {
                        Chunk::Data(d) => {
                            s.check_content(d);
                            if s.body_bytes(d.len()) && !bare {
                                return Some(Event::Body(d));
                            }
                        }
                        Chunk::End => return Some(s.end_of_data(bare)),
                        Chunk::NeedMore => {
                            s.stop = Stop::NeedInput;
                            return None;
                        }
                    }
                }
                State::Bdat {
                    remaining, mode, ..
                } => {
                    let take = usize::try_from(*remaining)
                        .unwrap_or(usize::MAX)
                        .min(rest.len());
                    let piece = rest.get(..take).unwrap_or_default();
                    if *mode != BdatMode::Keep {
                        if *mode == BdatMode::TooBig {
                            // Still the message's bytes (the transfer rate counts them).
                            s.txn.size = s.txn.size.saturating_add(take as u64);
                        }
                        *remaining -= take as u64;
                        self.pos += take;
                        continue;
                    }
                    let (used, out) = match s.txn.lines.as_mut() {
                        Some(lines) => lines.next(piece),
                        None => (take, piece),
                    };
                    *remaining -= used as u64;
                    self.pos += used;
                    let bare = s.txn.lines.as_ref().is_some_and(|l| {
                        l.saw_bare_line_ending()
                            && s.settings.cfg.bare_line_policy == BareLinePolicy::Reject
                    });
                    s.check_content(out);
                    if !out.is_empty() && s.body_bytes(out.len()) && !bare {
                        return Some(Event::Body(out));
                    }
                }
                _ if s.discarding => {
                    let (used, found) = line::skip_to_lf(rest);
                    self.pos += used;
                    if found {
                        s.discarding = false;
                        s.line_too_long();
                    }
                }
                State::Fresh | State::Ready => {
                    match command::parse_framed(rest, s.settings.cfg.max_line) {
                        command::Framed::Command(parsed, consumed) => {
                            self.pos += consumed;
                            s.last_activity = self.now;
                            let more = self.pos < self.input.len();
                            // A BDAT chunk follows its command; QUIT ends everything anyway.
                            let carries_data =
                                matches!(parsed, Ok(Command::Bdat { .. } | Command::Quit));
                            let ev = s.on_command(parsed, more);
                            if more && !carries_data && !s.closed && !s.pipelining_offered() {
                                // Whatever this command produced is not answered: the client
                                // did not wait for our reply, which it was never allowed not to.
                                s.unauth_pipelining = true;
                                s.pending = None;
                                s.close_with(&reply::PIPELINING_NOT_OFFERED);
                                // The loop's top says Stop::Close.
                                continue;
                            }
                            if let Some(ev) = ev {
                                return Some(ev);
                            }
                        }
                        command::Framed::TooLong { consumed } => {
                            self.pos += consumed;
                            s.discarding = true;
                        }
                        command::Framed::Partial => {
                            s.stop = Stop::NeedInput;
                            return None;
                        }
                    }
                }
                // SASL responses are lines, not commands.
                _ => match line::frame(rest, s.settings.cfg.max_line) {
                    Frame::Line { line, consumed } => {
                        self.pos += consumed;
                        s.last_activity = self.now;
                        let more = self.pos < self.input.len();
                        if let Some(ev) = s.on_line(line, more) {
                            return Some(ev);
                        }
                    }
                    Frame::TooLong { consumed } => {
                        self.pos += consumed;
                        s.discarding = true;
                    }
                    Frame::Partial => {
                        s.stop = Stop::NeedInput;
                        return None;
                    }
                },
            }
        }
    }
}

impl std::ops::Deref for Feed<'_, '_> {
    type Target = Session;
    fn deref(&self) -> &Session {
        self.session
    }
}

impl std::ops::DerefMut for Feed<'_, '_> {
    fn deref_mut(&mut self) -> &mut Session {
        self.session
    }
}
