//! Delivery status notifications (RFC 3464): `multipart/report; report-type=delivery-status`,
//! sent from the null sender to the original envelope sender, for permanent failures, expiry
//! and (optionally) long delays. Never sent for a message whose sender is null.

use std::time::SystemTime;

use crate::delivery::trace::rfc5322_date;

/// One recipient's line in the report.
#[derive(Debug, Clone)]
pub struct RcptStatus {
    pub rcpt: String,
    /// `5.1.1`, `4.4.7`…
    pub status: String,
    /// The next hop's reply (or our own diagnosis), one line.
    pub diagnostic: String,
    pub remote_mta: Option<String>,
}

/// Failed (`failed`) or still being retried (`delayed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Failed,
    Delayed,
}

/// The message a DSN reports on.
#[derive(Debug, Clone, Copy)]
pub struct Original<'a> {
    pub queue_id: &'a str,
    pub sender: &'a str,
    pub arrival: SystemTime,
    /// Trace header and content (only its header section is returned).
    pub message: &'a [u8],
}

/// Build the DSN message (headers and body, CRLF line endings).
pub fn build(
    kind: Kind,
    hostname: &str,
    orig: &Original<'_>,
    rcpts: &[RcptStatus],
    now: SystemTime,
) -> Vec<u8> {
    let (queue_id, original_sender, arrival, original) =
        (orig.queue_id, orig.sender, orig.arrival, orig.message);
    let boundary = format!("{queue_id}.dsn/{hostname}");
    let (subject, action, intro) = match kind {
        Kind::Failed => (
            "Undelivered Mail Returned to Sender",
            "failed",
            "Your message could not be delivered to the recipients below. This is a permanent\r\nerror; the message will not be retried.",
        ),
        Kind::Delayed => (
            "Delayed Mail (still being retried)",
            "delayed",
            "Your message has not been delivered yet to the recipients below. Delivery will\r\nbe retried; you do not need to resend it.",
        ),
    };
    let mut m = String::new();
    m.push_str(&format!(
        "From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n"
    ));
    m.push_str(&format!("To: <{original_sender}>\r\n"));
    m.push_str(&format!("Subject: {subject}\r\n"));
    m.push_str(&format!("Date: {}\r\n", rfc5322_date(now)));
    m.push_str(&format!(
        "Message-ID: <{queue_id}.{}@{hostname}>\r\n",
        if kind == Kind::Failed {
            "bounce"
        } else {
            "delay"
        }
    ));
    m.push_str("Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n");
    m.push_str(&format!(
        "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\r\n"
    ));
    m.push_str("This is a MIME-encapsulated message.\r\n\r\n");
    m.push_str(&format!(
        "--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    ));
    m.push_str(&format!(
        "This is the mail system at {hostname}.\r\n\r\n{intro}\r\n\r\n"
    ));
    for r in rcpts {
        m.push_str(&format!("<{}>: {}\r\n", r.rcpt, r.diagnostic));
    }
    m.push_str(&format!(
        "\r\n--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n"
    ));
    m.push_str(&format!("Reporting-MTA: dns; {hostname}\r\n"));
    m.push_str(&format!("X-Ringmx-Queue-ID: {queue_id}\r\n"));
    m.push_str(&format!("Arrival-Date: {}\r\n", rfc5322_date(arrival)));
    for r in rcpts {
        m.push_str(&format!("\r\nFinal-Recipient: rfc822; {}\r\n", r.rcpt));
        m.push_str(&format!("Action: {action}\r\nStatus: {}\r\n", r.status));
        if let Some(mta) = &r.remote_mta {
            m.push_str(&format!("Remote-MTA: dns; {mta}\r\n"));
        }
        m.push_str(&format!(
            "Diagnostic-Code: smtp; {}\r\n",
            r.diagnostic.replace(['\r', '\n'], " ")
        ));
        m.push_str(&format!("Last-Attempt-Date: {}\r\n", rfc5322_date(now)));
    }
    m.push_str(&format!(
        "\r\n--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n"
    ));
    let mut out = m.into_bytes();
    out.extend_from_slice(headers_of(original));
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// The header section of a message (up to the first empty line).
fn headers_of(msg: &[u8]) -> &[u8] {
    match memchr::memmem::find(msg, b"\r\n\r\n") {
        Some(i) => msg.get(..i + 2).unwrap_or(msg),
        None => msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_structure() {
        let rcpts = [RcptStatus {
            rcpt: "x@d.test".into(),
            status: "5.1.1".into(),
            diagnostic: "550 5.1.1 no such user".into(),
            remote_mta: Some("mx.d.test".into()),
        }];
        let orig = Original {
            queue_id: "Q1",
            sender: "s@a.test",
            arrival: SystemTime::UNIX_EPOCH,
            message: b"Subject: hi\r\nMessage-ID: <1@a>\r\n\r\nsecret body\r\n",
        };
        let m = build(
            Kind::Failed,
            "edge.test",
            &orig,
            &rcpts,
            SystemTime::UNIX_EPOCH,
        );
        let s = String::from_utf8(m).unwrap();
        assert!(s.contains("report-type=delivery-status"));
        assert!(
            s.contains("Final-Recipient: rfc822; x@d.test\r\nAction: failed\r\nStatus: 5.1.1\r\n")
        );
        assert!(s.contains("Diagnostic-Code: smtp; 550 5.1.1 no such user"));
        assert!(s.contains("Message-ID: <1@a>"));
        assert!(!s.contains("secret body"), "only the headers are returned");
        assert!(s.ends_with("--Q1.dsn/edge.test--\r\n"));
    }
}
