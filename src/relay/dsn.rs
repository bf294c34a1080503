//! Delivery status notifications (RFC 3464): `multipart/report; report-type=delivery-status`,
//! sent from the null sender to the original envelope sender, for permanent failures, expiry,
//! (optionally) long delays, and successes the sender asked for with NOTIFY=SUCCESS where no
//! DSN-capable hop takes the request on (RFC 3461 §6.2). Never sent for a message whose sender
//! is null. The sender's NOTIFY, RET, ENVID and ORCPT are honoured.

use std::time::SystemTime;

use crate::delivery::DsnRet;
use crate::delivery::trace::rfc5322_date;

pub use crate::delivery::outcome::{Kind, RcptStatus};

/// The message a DSN reports on.
#[derive(Debug, Clone, Copy)]
pub struct Original<'a> {
    pub queue_id: &'a str,
    pub sender: &'a str,
    pub arrival: SystemTime,
    /// Trace header and content (its header section is returned, or all of it for RET=FULL
    /// up to [`RETURN_FULL_LIMIT`]).
    pub message: &'a [u8],
    pub ret: Option<DsnRet>,
    /// ENVID as received (xtext).
    pub envid: Option<&'a str>,
    /// BODY=BINARYMIME: never returned whole (the DSN itself is not binary).
    pub binary: bool,
    /// Random and secret: the end of the MIME boundary. The queue id alone is shown to the
    /// client and follows the clock, so returned header lines could close a part of the
    /// report and open their own (a page of the sender's choosing, from our mailer daemon).
    pub token: u128,
}

/// The largest message a DSN returns whole (RET=FULL); a larger one is returned as headers.
pub const RETURN_FULL_LIMIT: usize = 1 << 20;

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
    let boundary = format!("{queue_id}.{:032x}", orig.token);
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
        Kind::Relayed => (
            "Relayed Mail Report",
            "relayed",
            "Your message was relayed to the recipients below, to a system that does not send\r\ndelivery notifications; you will get no further notice from there.",
        ),
        Kind::Delivered => (
            "Successful Mail Delivery Report",
            "delivered",
            "Your message was delivered to the recipients below.",
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
        match kind {
            Kind::Failed => "bounce",
            Kind::Delayed => "delay",
            Kind::Relayed | Kind::Delivered => "success",
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
    if let Some(e) = orig.envid {
        m.push_str(&format!(
            "Original-Envelope-Id: {}\r\n",
            crate::delivery::xtext_for_report(e)
        ));
    }
    m.push_str(&format!("X-Ringmx-Queue-ID: {queue_id}\r\n"));
    m.push_str(&format!("Arrival-Date: {}\r\n", rfc5322_date(arrival)));
    for r in rcpts {
        m.push('\r');
        m.push('\n');
        if let Some(o) = &r.orcpt {
            m.push_str(&format!(
                "Original-Recipient: {}\r\n",
                crate::delivery::xtext_for_report(o)
            ));
        }
        m.push_str(&format!("Final-Recipient: rfc822; {}\r\n", r.rcpt));
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
    // Whole only where asked, for failures and delays (a success notice is no reason to send a
    // message back, and inbound senders could use it to reflect content), and never binary.
    let full = orig.ret == Some(DsnRet::Full)
        && matches!(kind, Kind::Failed | Kind::Delayed)
        && !orig.binary
        && original.len() <= RETURN_FULL_LIMIT;
    m.push_str(&format!(
        "\r\n--{boundary}\r\nContent-Type: {}\r\n\r\n",
        if full {
            "message/rfc822"
        } else {
            "text/rfc822-headers"
        }
    ));
    let mut out = m.into_bytes();
    if full {
        out.extend_from_slice(original);
    } else {
        out.extend_from_slice(&headers_of(original));
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// The header section of a message as text safe to put in a DSN: found the way lenient
/// readers find it (a lone CR or LF ends a line), at most [`RETURNED_HEADERS_LIMIT`] bytes,
/// every line end CRLF, and control bytes other than tab (NUL among them) replaced by `?`.
fn headers_of(msg: &[u8]) -> Vec<u8> {
    let section = msg
        .get(..crate::aswl::detect::header_len(msg).min(RETURNED_HEADERS_LIMIT))
        .unwrap_or_default();
    let mut out = Vec::with_capacity(section.len() + 16);
    let mut i = 0;
    while let Some(&b) = section.get(i) {
        match b {
            b'\r' | b'\n' => {
                out.extend_from_slice(b"\r\n");
                if b == b'\r' && section.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b'\t' => out.push(b),
            0..=31 | 127 => out.push(b'?'),
            _ => out.push(b),
        }
        i += 1;
    }
    out
}

/// The most of a header section a DSN returns.
const RETURNED_HEADERS_LIMIT: usize = 128 * 1024;

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
            orcpt: None,
        }];
        let orig = Original {
            queue_id: "Q1",
            sender: "s@a.test",
            arrival: SystemTime::UNIX_EPOCH,
            message: b"Subject: hi\r\nMessage-ID: <1@a>\r\n\r\nsecret body\r\n",
            ret: None,
            envid: None,
            binary: false,
            token: 0x5eed,
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
        // The boundary ends in the secret token: the queue id alone could be guessed.
        assert!(
            s.ends_with("--Q1.00000000000000000000000000005eed--\r\n"),
            "{s}"
        );
        assert!(
            s.contains("boundary=\"Q1.00000000000000000000000000005eed\""),
            "{s}"
        );
        assert!(!s.contains("Original-Envelope-Id") && !s.contains("Original-Recipient"));
    }

    #[test]
    fn ret_envid_orcpt_and_success_kinds() {
        let rcpts = [RcptStatus {
            rcpt: "x@d.test".into(),
            status: "2.0.0".into(),
            diagnostic: "250 ok".into(),
            remote_mta: None,
            orcpt: Some("rfc822;X+40d.test+0D+0AInjected: 1".into()),
        }];
        let orig = Original {
            queue_id: "Q2",
            sender: "s@a.test",
            arrival: SystemTime::UNIX_EPOCH,
            message: b"Subject: hi\r\n\r\nthe body\r\n",
            ret: Some(DsnRet::Full),
            envid: Some("env+2Bid"),
            binary: false,
            token: 0x5eed,
        };
        let s = String::from_utf8(build(
            Kind::Failed,
            "e.test",
            &orig,
            &rcpts,
            SystemTime::UNIX_EPOCH,
        ))
        .unwrap();
        assert!(s.contains("Original-Envelope-Id: env+id\r\n"), "{s}");
        assert!(s.contains("Original-Recipient: rfc822;X@d.test??Injected: 1\r\nFinal-Recipient: rfc822; x@d.test\r\nAction: failed\r\nStatus: 2.0.0"), "{s}");
        assert!(
            s.contains("Content-Type: message/rfc822\r\n\r\nSubject: hi\r\n\r\nthe body\r\n"),
            "RET=FULL: {s}"
        );
        assert!(!s.contains("\r\nInjected:"), "no field from the ORCPT");
        let s = String::from_utf8(build(
            Kind::Delivered,
            "e.test",
            &orig,
            &rcpts,
            SystemTime::UNIX_EPOCH,
        ))
        .unwrap();
        assert!(
            s.contains("Action: delivered")
                && s.contains("Subject: Successful Mail Delivery Report")
        );
        assert!(
            !s.contains("the body"),
            "success notices return headers only"
        );
        let s = build(
            Kind::Relayed,
            "e.test",
            &orig,
            &rcpts,
            SystemTime::UNIX_EPOCH,
        );
        let s = String::from_utf8(s).unwrap();
        assert!(
            s.contains("Action: relayed") && !s.contains("the body"),
            "{s}"
        );
        // Binary originals: headers only, canonical, no NUL, cut where lenient readers cut.
        let bin = Original {
            message: b"Subject: b\x00in\nX: y\r\rbinary\0.\n",
            binary: true,
            ..orig
        };
        let s = build(Kind::Failed, "e.test", &bin, &rcpts, SystemTime::UNIX_EPOCH);
        let s = String::from_utf8(s).unwrap();
        assert!(
            s.contains("text/rfc822-headers\r\n\r\nSubject: b?in\r\nX: y\r\n\r\n--Q2"),
            "{s}"
        );
        assert!(!s.contains('\0') && !s.contains("binary"), "{s}");
        let big = vec![b'a'; RETURN_FULL_LIMIT + 1];
        let orig = Original {
            message: &big,
            ..orig
        };
        let s = String::from_utf8(build(
            Kind::Failed,
            "e.test",
            &orig,
            &rcpts,
            SystemTime::UNIX_EPOCH,
        ))
        .unwrap();
        assert!(s.contains("text/rfc822-headers"), "too big to return whole");
    }
}
