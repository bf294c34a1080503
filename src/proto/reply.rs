//! The typed reply table: every reply the SMTP core can send is a constant here, so handlers
//! never spell reply strings inline and tests assert on the constants.
//!
//! The reply class doubles as retry semantics for the relay client: 2xx done, 4xx retry later,
//! 5xx permanent.

use std::borrow::Cow;

/// One SMTP reply: basic code (RFC 5321 §4.2), enhanced status code (RFC 3463) and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Three-digit basic reply code.
    pub code: u16,
    /// Enhanced status code (`"5.5.1"`), written only when ENHANCEDSTATUSCODES is on.
    pub enhanced: &'static str,
    /// Human-readable text; must not contain CR or LF.
    pub text: Cow<'static, str>,
}

/// How a reply code is to be understood by whoever receives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyClass {
    /// 2xx: completed.
    Positive,
    /// 3xx: go on (354, 334).
    Intermediate,
    /// 4xx: failed now, may succeed later.
    Transient,
    /// 5xx: failed for good.
    Permanent,
}

impl Reply {
    /// A reply with static text (usable in `const`).
    pub const fn new(code: u16, enhanced: &'static str, text: &'static str) -> Self {
        Reply {
            code,
            enhanced,
            text: Cow::Borrowed(text),
        }
    }

    /// A reply with text built at run time (CR and LF are replaced by spaces when written).
    pub fn owned(code: u16, enhanced: &'static str, text: String) -> Self {
        Reply {
            code,
            enhanced,
            text: Cow::Owned(text),
        }
    }

    /// The class of the reply, from its first digit.
    pub const fn class(&self) -> ReplyClass {
        match self.code / 100 {
            2 => ReplyClass::Positive,
            3 => ReplyClass::Intermediate,
            4 => ReplyClass::Transient,
            _ => ReplyClass::Permanent,
        }
    }

    /// 4xx or 5xx.
    pub const fn is_error(&self) -> bool {
        self.code >= 400
    }

    /// Append the reply as one line (`CODE SP [ENH SP] TEXT CRLF`) to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>, enhanced: bool) {
        write_line(
            out,
            self.code,
            self.enhanced,
            enhanced,
            &[self.text.as_bytes()],
        );
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {}", self.code, self.enhanced, self.text)
    }
}

/// Append `code [enh] parts… CRLF`. CR and LF inside `parts` become spaces so a reply can never
/// be split into two by text that came from elsewhere (a queue id, a host name).
pub(crate) fn write_line(
    out: &mut Vec<u8>,
    code: u16,
    enh: &str,
    with_enhanced: bool,
    parts: &[&[u8]],
) {
    write_code(out, code, b' ');
    if with_enhanced && !enh.is_empty() {
        out.extend_from_slice(enh.as_bytes());
        out.push(b' ');
    }
    for part in parts {
        let start = out.len();
        out.extend_from_slice(part);
        if let Some(tail) = out.get_mut(start..) {
            for b in tail {
                if *b == b'\r' || *b == b'\n' {
                    *b = b' ';
                }
            }
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// Append a three-digit code followed by `sep` (`b' '` or `b'-'`).
pub(crate) fn write_code(out: &mut Vec<u8>, code: u16, sep: u8) {
    let code = code.min(999);
    out.extend_from_slice(&[
        b'0' + (code / 100) as u8,
        b'0' + (code / 10 % 10) as u8,
        b'0' + (code % 10) as u8,
        sep,
    ]);
}

// --- Connection level -------------------------------------------------------------------------
/// 221 after QUIT (the host name is added by the session).
pub static CLOSING: Reply = Reply::new(221, "2.0.0", "Bye");
/// Read timeout: RFC 5321 §4.5.3.2 lets the server close an idle session.
pub static TIMEOUT: Reply = Reply::new(421, "4.4.2", "Timeout exceeded, closing connection");
/// Too many errors in one session.
pub static TOO_MANY_ERRORS: Reply = Reply::new(421, "4.7.0", "Too many errors, closing connection");

// --- Generic command replies ------------------------------------------------------------------
/// NOOP, RSET.
pub static OK: Reply = Reply::new(250, "2.0.0", "Ok");
/// RFC 5321 §3.5.3: VRFY answered without disclosing anything.
pub static VRFY: Reply = Reply::new(
    252,
    "2.5.0",
    "Cannot VRFY user, but will accept message and attempt delivery",
);
/// HELP.
pub static HELP: Reply = Reply::new(214, "2.0.0", "See RFC 5321");
/// Unknown or unimplemented verb.
pub static UNKNOWN_COMMAND: Reply = Reply::new(500, "5.5.1", "Command unrecognized");
/// A command line over the configured cap.
pub static LINE_TOO_LONG: Reply = Reply::new(500, "5.5.6", "Line too long");
/// Syntax error in the arguments of a known command.
pub static SYNTAX: Reply = Reply::new(501, "5.5.4", "Syntax error in parameters or arguments");
/// EHLO/HELO without a name.
pub static HELO_SYNTAX: Reply = Reply::new(501, "5.5.4", "EHLO/HELO requires a domain name");
/// A known command this server does not offer (EXPN).
pub static NOT_IMPLEMENTED: Reply = Reply::new(502, "5.5.1", "Command not implemented");
/// Commands out of order.
pub static BAD_SEQUENCE: Reply = Reply::new(503, "5.5.1", "Bad sequence of commands");
/// MAIL before EHLO/HELO.
pub static HELO_FIRST: Reply = Reply::new(503, "5.5.1", "Send EHLO or HELO first");
/// MAIL inside a transaction.
pub static NESTED_MAIL: Reply = Reply::new(503, "5.5.1", "Sender already specified");
/// RCPT before MAIL.
pub static MAIL_FIRST: Reply = Reply::new(503, "5.5.1", "Send MAIL first");
/// DATA/BDAT before RCPT.
pub static RCPT_FIRST: Reply = Reply::new(503, "5.5.1", "Send RCPT first");
/// DATA/BDAT after every RCPT of a pipelined group was refused (RFC 2920 §3.1).
pub static NO_VALID_RECIPIENTS: Reply = Reply::new(554, "5.5.1", "No valid recipients");
/// Unknown MAIL/RCPT parameter, or one whose extension is not offered.
pub static UNKNOWN_PARAMETER: Reply = Reply::new(555, "5.5.4", "Unsupported parameter");

// --- Envelope ---------------------------------------------------------------------------------
/// MAIL accepted.
pub static SENDER_OK: Reply = Reply::new(250, "2.1.0", "Sender ok");
/// RCPT accepted.
pub static RECIPIENT_OK: Reply = Reply::new(250, "2.1.5", "Recipient ok");
/// Malformed reverse-path.
pub static BAD_SENDER_SYNTAX: Reply = Reply::new(501, "5.1.7", "Bad sender address syntax");
/// Malformed forward-path.
pub static BAD_RECIPIENT_SYNTAX: Reply = Reply::new(501, "5.1.3", "Bad recipient address syntax");
/// UTF-8 address without SMTPUTF8 (RFC 6531 §3.5).
pub static UTF8_NOT_PERMITTED: Reply = Reply::new(
    553,
    "5.6.7",
    "Non-ASCII address requires the SMTPUTF8 parameter",
);
/// RCPT over the configured limit (RFC 5321 §4.5.3.1.8: 452 so the client retries the rest).
pub static TOO_MANY_RECIPIENTS: Reply = Reply::new(452, "4.5.3", "Too many recipients");
/// SIZE= or the message itself over the limit.
pub static MESSAGE_TOO_BIG: Reply = Reply::new(552, "5.3.4", "Message size exceeds fixed limit");
/// A client network the binding's access lists refuse (sent instead of the greeting).
pub static ACCESS_DENIED: Reply = Reply::new(554, "5.7.1", "Access denied, closing connection");
/// A message failing DMARC whose From domain asks for rejection (`[authentication]
/// dmarc_reject`).
pub static DMARC_REJECT: Reply = Reply::new(
    550,
    "5.7.1",
    "Message rejected: the sender's domain DMARC policy",
);
/// A From: that gives DMARC no single domain to check (several domains, a domain that is no
/// DNS name, a header block that cannot be read), refused under `[authentication]
/// dmarc_reject` (RFC 7489 §6.6.1).
pub static DMARC_NO_DOMAIN: Reply = Reply::new(
    550,
    "5.7.1",
    "Message rejected: its From: header names no single domain to check",
);
/// MAIL FROM a domain whose SPF record fails this client (`[authentication] spf_reject`,
/// RFC 7372).
pub static SPF_FAIL: Reply = Reply::new(550, "5.7.23", "SPF validation failed");
/// A recipient the next hop could not confirm yet (callout unavailable): try later.
pub static RECIPIENT_UNVERIFIED: Reply = Reply::new(
    450,
    "4.1.1",
    "Recipient address not verified yet, try again later",
);
/// RCPT for a local recipient not in `[[recipients]]` (or refused by the next hop).
pub static UNKNOWN_RECIPIENT: Reply =
    Reply::new(550, "5.1.1", "Recipient address rejected: user unknown");
/// After `max_unknown_recipients` (directory harvest).
pub static TOO_MANY_UNKNOWN: Reply = Reply::new(
    421,
    "4.7.0",
    "Too many unknown recipients, closing connection",
);
/// A refused BDAT chunk larger than `max_message_size`: its bytes are not read to find the
/// next command.
pub static CHUNK_NOT_READ: Reply = Reply::new(
    421,
    "4.7.0",
    "Refused BDAT chunk too large to skip, closing connection",
);
/// `[rates] connections_per_minute` reached for the client's network.
pub static RATE_CONNECTIONS: Reply = Reply::new(
    421,
    "4.7.0",
    "Too many connections from your network, try again later",
);
/// `[rates] messages_per_minute` reached.
pub static RATE_MESSAGES: Reply = Reply::new(
    450,
    "4.7.1",
    "Too many messages from your network, try again later",
);
/// `[rates] recipients_per_minute` reached.
pub static RATE_RECIPIENTS: Reply = Reply::new(
    450,
    "4.7.1",
    "Too many recipients from your network, try again later",
);
/// `[rates] unknown_recipients_per_minute` reached.
pub static RATE_UNKNOWN: Reply = Reply::new(
    421,
    "4.7.0",
    "Too many unknown recipients from your network, closing connection",
);
/// More `Received:` fields than `max_hops` (RFC 5321 §6.3).
pub static TOO_MANY_HOPS: Reply = Reply::new(
    554,
    "5.4.6",
    "Too many hops (Received: header fields), a mail loop?",
);
/// A header section longer than what ringmx keeps in memory to check and rewrite.
pub static HEADER_TOO_LONG: Reply =
    Reply::new(552, "5.3.4", "Message header section exceeds 128 KiB");
/// BODY=BINARYMIME with DATA (RFC 3030 §3).
pub static BINARYMIME_NEEDS_BDAT: Reply =
    Reply::new(503, "5.5.1", "BINARYMIME requires BDAT, not DATA");

// --- Message ------------------------------------------------------------------------------------
/// Go ahead with DATA.
pub static START_DATA: Reply = Reply::new(354, "", "End data with <CR><LF>.<CR><LF>");
/// Message accepted (the runtime normally names the queue id instead).
pub static MESSAGE_OK: Reply = Reply::new(250, "2.0.0", "Ok: queued");
/// A BDAT chunk that was not the last one was received.
pub static CHUNK_OK: Reply = Reply::new(250, "2.0.0", "Chunk received");
/// Bare CR or LF under the `reject` policy (CVE-2023-51764 and friends).
pub static BARE_LINE_ENDING: Reply = Reply::new(
    550,
    "5.6.0",
    "Bare CR or LF in message content is not allowed, use CRLF (RFC 5321 section 2.3.8)",
);
/// A NUL byte in content that is not BODY=BINARYMIME: next hops that drop NULs would read a
/// different message (a `NUL .` line becomes the end of data for them).
pub static NUL_IN_CONTENT: Reply = Reply::new(
    550,
    "5.6.0",
    "NUL characters in message content are not allowed (RFC 5322 section 2.3)",
);
/// Content whose first line starts with a space or tab: it would continue the last header
/// ringmx prepends (a forged verdict).
pub static FOLDED_FIRST_LINE: Reply = Reply::new(
    550,
    "5.6.0",
    "Message content must not begin with a folded line (RFC 5322 section 2.2.3)",
);

// --- STARTTLS -----------------------------------------------------------------------------------
/// STARTTLS accepted; the TLS handshake follows.
pub static READY_TO_START_TLS: Reply = Reply::new(220, "2.0.0", "Ready to start TLS");
/// Bytes pipelined after STARTTLS (CVE-2011-0411): refuse and close.
pub static STARTTLS_PIPELINED: Reply = Reply::new(
    554,
    "5.5.1",
    "Commands pipelined after STARTTLS are refused, closing connection",
);
/// Commands sent ahead of their replies when PIPELINING was not offered (RFC 2920 §3.1).
pub static PIPELINING_NOT_OFFERED: Reply = Reply::new(
    554,
    "5.5.0",
    "Commands sent before their replies without PIPELINING, closing connection",
);
/// A client that talked before the greeting ended (now, or recently: remembered a while).
pub static EARLY_TALKER: Reply = Reply::new(
    554,
    "5.5.0",
    "Protocol error: talking before the greeting, closing connection",
);
/// STARTTLS not offered or already active.
pub static TLS_NOT_AVAILABLE: Reply = Reply::new(454, "4.7.0", "TLS not available");

// --- AUTH ---------------------------------------------------------------------------------------
/// Credentials accepted.
pub static AUTH_OK: Reply = Reply::new(235, "2.7.0", "Authentication successful");
/// Credentials refused (the runtime's usual rejection).
pub static AUTH_FAILED: Reply = Reply::new(535, "5.7.8", "Authentication credentials invalid");
/// Too many failed attempts from this client address lately (checked before any argon2 work).
pub static AUTH_TOO_MANY_FAILURES: Reply = Reply::new(
    454,
    "4.7.0",
    "Too many failed authentication attempts from your address, try again later",
);
/// A policy check that needs work off the core could not be queued, failed or took too long.
pub static POLICY_BUSY: Reply = Reply::new(451, "4.3.0", "Policy checks busy, try again later");
/// The argon2 queue is full.
pub static AUTH_BUSY: Reply = Reply::new(
    454,
    "4.7.0",
    "Temporary authentication failure, try again later",
);
/// Client sent `*`.
pub static AUTH_CANCELLED: Reply = Reply::new(501, "5.7.0", "Authentication cancelled");
/// Response is not valid base64 or not a valid PLAIN message.
pub static AUTH_BAD_RESPONSE: Reply = Reply::new(501, "5.5.2", "Cannot decode response");
/// Mechanism not offered.
pub static AUTH_UNKNOWN_MECHANISM: Reply =
    Reply::new(504, "5.5.4", "Unrecognized authentication type");
/// AUTH on a session where it is off.
pub static AUTH_NOT_ENABLED: Reply = Reply::new(503, "5.5.1", "Authentication not enabled");
/// AUTH before STARTTLS where TLS is required (RFC 4954 §6).
pub static AUTH_NEEDS_TLS: Reply = Reply::new(
    538,
    "5.7.11",
    "Encryption required for requested authentication mechanism",
);
// --- Server policy (used by the runtime) -------------------------------------------------------
/// Inbound binding, recipient domain not one of ours.
pub static RELAY_DENIED_NOT_LOCAL: Reply = Reply::new(
    550,
    "5.7.1",
    "Relaying denied: recipient domain is not accepted here",
);
/// Outbound binding, client neither in allowed_clients nor authenticated.
pub static RELAY_DENIED: Reply = Reply::new(554, "5.7.1", "Relay access denied");
/// `auth = "required"` binding, MAIL before AUTH (RFC 4954 §6).
pub static AUTH_REQUIRED: Reply = Reply::new(530, "5.7.0", "Authentication required");
/// Connection refused at accept by the total or per-IP connection limit.
pub static TOO_MANY_CONNECTIONS: Reply =
    Reply::new(421, "4.7.0", "Too many connections, try again later");
/// The server is stopping.
pub static SHUTTING_DOWN: Reply =
    Reply::new(421, "4.3.2", "Service shutting down, try again later");
/// The message could not be made durable (disk full, I/O error): never a 250.
pub static STORAGE_FULL: Reply = Reply::new(452, "4.3.1", "Insufficient system storage");
/// Other local failure while storing the message.
pub static STORAGE_ERROR: Reply = Reply::new(451, "4.3.0", "Local error while storing the message");
/// No route matches the recipient (a configuration gap, reported as temporary).
pub static NO_ROUTE: Reply = Reply::new(451, "4.4.0", "No route for this recipient");

/// Data arrived slower than the configured minimum rate.
pub static TOO_SLOW: Reply = Reply::new(421, "4.4.2", "Data rate too low, closing connection");

/// A decision the runtime failed to take (defensive default; never seen in a correct runtime).
pub static LOCAL_ERROR: Reply = Reply::new(451, "4.3.0", "Local error in processing");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_with_and_without_enhanced_codes() {
        let mut out = Vec::new();
        BAD_SEQUENCE.write_to(&mut out, true);
        BAD_SEQUENCE.write_to(&mut out, false);
        START_DATA.write_to(&mut out, true);
        assert_eq!(
            out,
            b"503 5.5.1 Bad sequence of commands\r\n503 Bad sequence of commands\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
        );
    }

    #[test]
    fn text_cannot_split_a_reply() {
        let mut out = Vec::new();
        Reply::owned(250, "2.0.0", "a\r\n250 injected".into()).write_to(&mut out, true);
        assert_eq!(out, b"250 2.0.0 a  250 injected\r\n");
    }

    #[test]
    fn classes() {
        assert_eq!(OK.class(), ReplyClass::Positive);
        assert_eq!(START_DATA.class(), ReplyClass::Intermediate);
        assert_eq!(TOO_MANY_RECIPIENTS.class(), ReplyClass::Transient);
        assert_eq!(MESSAGE_TOO_BIG.class(), ReplyClass::Permanent);
        assert!(LOCAL_ERROR.is_error() && !OK.is_error());
    }
}
