//! Failures ringmx diagnoses itself while delivering, as opposed to a next hop's replies: one
//! typed table of the reply each stands for (code, enhanced status, text), so the queue
//! listing, DSNs and logs say the same thing, and whether it is worth retrying.

use super::reply::Reply;

/// A delivery failure found on this side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The message could not be read back from the spool.
    SpoolRead(String),
    /// Writing into a drop folder failed.
    DropFolder(String),
    /// No `[[route]]` matches the recipient (the configuration changed since acceptance).
    NoRoute,
    /// The blocking pool (drop folder writes) went away without an answer.
    WorkerLost,
    /// The DNS worker went away without an answer.
    DnsWorkerLost,
    /// The route's TLS settings cannot be loaded.
    TlsSettings(String),
    /// The route has no next hop address to try.
    NoHopAddress,
    /// Every next hop was skipped before a connection was tried.
    NoHopTried,
    /// A temporary DNS failure for the next hop.
    Dns(String),
    /// The domain publishes a null MX (RFC 7505): it takes no mail.
    NullMx(String),
    /// The domain's mail hosts have only addresses the route's `mx_ignore` excludes (this
    /// host's own networks, by default).
    MxIgnored(String),
    /// `max_connections_per_hop` stayed reached for a whole reply timeout.
    TooManyConnections,
    /// A socket error towards a hop: the host, what was being done, the error.
    Io {
        host: String,
        what: String,
        error: String,
    },
    /// The TLS handshake with a hop did not finish in time.
    TlsHandshakeTimeout(String),
    /// STARTTLS was to be used but no client TLS configuration exists.
    TlsNotConfigured,
    /// Bytes arrived after the hop's reply to STARTTLS (command injection).
    StartTlsInjection(String),
    /// The hop answered something that cannot be a reply.
    InvalidReply { host: String, error: String },
    /// The hop closed the connection.
    ClosedByHop(String),
    /// No reply within the reply timeout.
    NoReply { host: String, secs: u64 },
    /// The hop took nothing of what was sent for a reply time limit (it stopped reading).
    SendTimeout { host: String, secs: u64 },
    /// The relay client reached a state the exchange should never reach.
    Unexpected(String),
    /// `tls = "required"` and STARTTLS is refused or not offered.
    TlsRequired(String),
    /// Credentials configured, and the hop will not take them (refused, no TLS, no mechanism).
    Authentication(String),
    /// The message is larger than the hop's SIZE.
    TooBigForHop { size: u64, limit: u64 },
    /// SMTPUTF8 addresses to a hop without SMTPUTF8.
    NoSmtpUtf8,
    /// BINARYMIME content to a hop without CHUNKING and BINARYMIME.
    NoBinaryMime,
    /// BINARYMIME content to a drop folder: a pickup service reads its files as text and
    /// would pass on their bare line ends and NULs (it resends them with DATA).
    BinaryToFolder,
    /// The hop gave no reply for this recipient.
    NoRecipientReply,
}

impl Failure {
    /// The reply this failure is reported as.
    pub fn reply(&self) -> Reply {
        let (code, status, text): (u16, (u8, u16, u16), String) = match self {
            Failure::SpoolRead(e) => (451, (4, 3, 0), format!("spool read error: {e}")),
            Failure::DropFolder(e) => (451, (4, 3, 0), format!("drop folder: {e}")),
            Failure::NoRoute => (451, (4, 4, 0), "no route for this recipient".into()),
            Failure::WorkerLost => (451, (4, 3, 0), "blocking pool failed".into()),
            Failure::DnsWorkerLost => (451, (4, 4, 3), "DNS worker failed".into()),
            Failure::TlsSettings(e) => (451, (4, 3, 5), format!("relay TLS settings: {e}")),
            Failure::NoHopAddress => (451, (4, 4, 4), "no next hop address".into()),
            Failure::NoHopTried => (451, (4, 4, 1), "no next hop tried".into()),
            Failure::Dns(e) => (451, (4, 4, 3), e.clone()),
            Failure::NullMx(domain) => (
                556,
                (5, 1, 10),
                format!("{domain} accepts no mail (null MX)"),
            ),
            Failure::MxIgnored(domain) => (
                554,
                (5, 4, 4),
                format!(
                    "the mail hosts of {domain} have only addresses not used as next hops (mx_ignore)"
                ),
            ),
            Failure::TooManyConnections => (
                451,
                (4, 4, 5),
                "too many connections to the next hop".into(),
            ),
            Failure::Io { host, what, error } => {
                (451, (4, 4, 1), format!("{host}: {what}: {error}"))
            }
            Failure::TlsHandshakeTimeout(host) => {
                (451, (4, 4, 2), format!("{host}: TLS handshake timed out"))
            }
            Failure::TlsNotConfigured => (421, (4, 7, 0), "no TLS configuration".into()),
            Failure::StartTlsInjection(host) => (
                421,
                (4, 7, 0),
                format!("{host}: data after the STARTTLS reply, connection dropped"),
            ),
            Failure::InvalidReply { host, error } => (451, (4, 5, 0), format!("{host}: {error}")),
            Failure::ClosedByHop(host) => (
                451,
                (4, 4, 2),
                format!("{host}: connection closed by the next hop"),
            ),
            Failure::NoReply { host, secs } => {
                (451, (4, 4, 2), format!("{host}: no reply within {secs}s"))
            }
            Failure::SendTimeout { host, secs } => (
                451,
                (4, 4, 2),
                format!("{host}: sending stalled for {secs}s"),
            ),
            Failure::Unexpected(what) => (421, (4, 4, 2), what.clone()),
            Failure::TlsRequired(why) => (421, (4, 7, 0), format!("TLS required, {why}")),
            Failure::Authentication(why) => (454, (4, 7, 0), why.clone()),
            Failure::TooBigForHop { size, limit } => (
                552,
                (5, 3, 4),
                format!("message size {size} exceeds the next hop's limit {limit}"),
            ),
            Failure::NoSmtpUtf8 => (
                553,
                (5, 6, 7),
                "the next hop does not support SMTPUTF8 addresses".into(),
            ),
            Failure::NoBinaryMime => (
                554,
                (5, 6, 3),
                "the next hop does not take BINARYMIME content (CHUNKING, BINARYMIME)".into(),
            ),
            Failure::BinaryToFolder => (
                554,
                (5, 6, 3),
                "BINARYMIME content cannot be written to a drop folder".into(),
            ),
            Failure::NoRecipientReply => (451, (4, 4, 2), "no reply for this recipient".into()),
        };
        Reply::local(code, status, &text)
    }

    /// Worth another attempt later (a 4xx); a 5xx fails the recipients at once.
    pub fn retryable(&self) -> bool {
        (400..500).contains(&self.reply().code)
    }
}

impl From<Failure> for Reply {
    fn from(f: Failure) -> Reply {
        f.reply()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let host = || "mx.test".to_string();
        for (f, line, retry) in [
            (
                Failure::NoRoute,
                "451 4.4.0 no route for this recipient",
                true,
            ),
            (
                Failure::NullMx("x.test".into()),
                "556 5.1.10 x.test accepts no mail (null MX)",
                false,
            ),
            (
                Failure::MxIgnored("x.test".into()),
                "554 5.4.4 the mail hosts of x.test have only addresses not used as next hops (mx_ignore)",
                false,
            ),
            (
                Failure::NoReply {
                    host: host(),
                    secs: 300,
                },
                "451 4.4.2 mx.test: no reply within 300s",
                true,
            ),
            (
                Failure::StartTlsInjection(host()),
                "421 4.7.0 mx.test: data after the STARTTLS reply, connection dropped",
                true,
            ),
            (
                Failure::TooBigForHop { size: 10, limit: 5 },
                "552 5.3.4 message size 10 exceeds the next hop's limit 5",
                false,
            ),
            (
                Failure::NoBinaryMime,
                "554 5.6.3 the next hop does not take BINARYMIME content (CHUNKING, BINARYMIME)",
                false,
            ),
            (
                Failure::SendTimeout {
                    host: "mx.test".into(),
                    secs: 40,
                },
                "451 4.4.2 mx.test: sending stalled for 40s",
                true,
            ),
            (
                Failure::BinaryToFolder,
                "554 5.6.3 BINARYMIME content cannot be written to a drop folder",
                false,
            ),
            (Failure::Authentication("x".into()), "454 4.7.0 x", true),
        ] {
            assert_eq!(f.reply().one_line(), line);
            assert_eq!(f.retryable(), retry, "{line}");
        }
    }
}
