//! What every delivery shares: the envelope, queue ids, the trace header, the drop folder.

pub mod drop_folder;
pub mod outcome;
pub mod trace;

use std::net::IpAddr;
use std::time::SystemTime;

/// The route chosen for each recipient when the message was accepted (index into the
/// configuration's `[[route]]` list), valid for configuration `generation`: a delivery
/// attempt under the same configuration uses it as it is; after a reload (or a restart, which
/// does not keep it) the routes are chosen again from the configuration then in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    pub generation: u64,
    /// One per recipient of the envelope, in order.
    pub routes: Vec<usize>,
}

impl Routing {
    /// The route of recipient `i`, when this routing is of configuration `generation`.
    pub fn route(&self, generation: u64, i: usize) -> Option<usize> {
        (self.generation == generation)
            .then(|| self.routes.get(i).copied())
            .flatten()
    }

    /// The routing of a copy holding recipients `indexes` of this one.
    pub fn select(&self, indexes: &[usize]) -> Routing {
        Routing {
            generation: self.generation,
            routes: indexes
                .iter()
                .filter_map(|&i| self.routes.get(i).copied())
                .collect(),
        }
    }
}

/// An operator's request to the queue (`ringmx queue …`, the admin endpoint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueOp {
    List,
    Show(String),
    /// Try now: one message, or every deferred one.
    Flush(Option<String>),
    Delete(String),
    Hold(String),
    Release(String),
}

/// What routes may look at besides the addresses: decided at end of data, kept in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteFacts {
    pub direction: Direction,
    /// The whitelist verdict (`None`: not checked).
    pub aswl: Option<bool>,
    /// Failed DMARC under a quarantine (or unenforced reject) policy.
    pub dmarc_quarantine: bool,
}

impl RouteFacts {
    /// Inbound mail with this whitelist verdict that did not fail DMARC.
    pub fn inbound(aswl: Option<bool>) -> RouteFacts {
        RouteFacts {
            direction: Direction::Inbound,
            aswl,
            dmarc_quarantine: false,
        }
    }
}

/// Which way mail flows through a binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Mail from the Internet to the organisation: only local domains are accepted.
    Inbound,
    /// Mail from the organisation: relayed for `allowed_clients` or authenticated users.
    Outbound,
}

/// Everything known about a message besides its content.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub queue_id: String,
    /// Reverse-path without brackets; empty for the null sender.
    pub mail_from: String,
    pub rcpts: Vec<String>,
    pub client_ip: IpAddr,
    pub helo: String,
    /// Protocol version and cipher suite when TLS was used.
    pub tls: Option<String>,
    pub authenticated_as: Option<String>,
    pub binding: String,
    pub esmtp: bool,
    /// A DSN made here (sent from the null sender).
    pub is_bounce: bool,
    /// The direction of the binding it arrived on (bounces: the opposite of their message's).
    pub direction: Direction,
    pub received_at: SystemTime,
    /// The whitelist verdict of inbound mail (`Some(true)` = pass); `None` = not checked.
    pub aswl: Option<bool>,
    /// Failed DMARC under a quarantine (or unenforced reject) policy.
    pub dmarc_quarantine: bool,
    /// SPF passed for the MAIL FROM domain, or its binding does not verify senders: notices
    /// that only the sender asked for (success, delay, a failure with the whole message) may
    /// go back to it ([`Envelope::reflects`]).
    pub sender_verified: bool,
    /// What the sender asked of delivery status notifications (RFC 3461).
    pub dsn: DsnRequest,
    /// Declared `BODY=BINARYMIME` (RFC 3030): the content may hold any bytes and is relayed
    /// only to hops that take BINARYMIME.
    pub binary: bool,
}

impl Envelope {
    /// Whether notices that only the sender asked for go back to it: success and delay
    /// notices, and a message returned whole (RET=FULL). Mail from the organisation, yes; mail
    /// from the Internet only when SPF vouched for its MAIL FROM, else a forged sender would
    /// have ringmx send notices, and its content back, to whoever it named (backscatter).
    /// Failure notices go either way: a message accepted and then lost must be reported.
    pub fn reflects(&self) -> bool {
        self.direction == Direction::Outbound || self.sender_verified
    }

    /// What routes may look at besides the addresses.
    pub fn route_facts(&self) -> RouteFacts {
        RouteFacts {
            direction: self.direction,
            aswl: self.aswl,
            dmarc_quarantine: self.dmarc_quarantine,
        }
    }
}

/// `RET=` (RFC 3461 §4.3): what a DSN returns of the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DsnRet {
    Full,
    Hdrs,
}

/// NOTIFY and ORCPT of one recipient (RFC 3461 §4.1, §4.2).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RcptDsn {
    /// Bit set of `proto::command::notify` flags; `None` = not given.
    pub notify: Option<u8>,
    /// `addr-type;xtext`, as received (validated xtext).
    pub orcpt: Option<String>,
}

/// The DSN parameters a message came with. Empty for most mail.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DsnRequest {
    pub ret: Option<DsnRet>,
    /// `ENVID=` as received (validated xtext).
    pub envid: Option<String>,
    /// Parallel to [`Envelope::rcpts`]; empty when no recipient had a parameter.
    pub rcpts: Vec<RcptDsn>,
}

/// What kind of notice a delivery event is (RFC 3461 §4.1 NOTIFY).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    Success,
    Failure,
    Delay,
}

impl DsnRequest {
    /// Nothing was asked.
    pub fn is_empty(&self) -> bool {
        self.ret.is_none() && self.envid.is_none() && self.rcpts.is_empty()
    }

    /// What a sender that may be forged may ask for (see [`Envelope::reflects`]), of ringmx
    /// and of the next hop the request is passed on to: failure notices with the headers only,
    /// said outright so that a hop's own defaults (delays, the whole message) do not apply.
    /// For each of the `rcpts` recipients NOTIFY loses SUCCESS and DELAY (`NEVER` when nothing
    /// is left; `FAILURE` where none was given); RET is `HDRS`.
    pub fn limit_to_failures(&mut self, rcpts: usize) {
        use crate::proto::command::notify;
        self.rcpts
            .resize_with(rcpts.max(self.rcpts.len()), RcptDsn::default);
        for r in &mut self.rcpts {
            let n = r.notify.get_or_insert(notify::FAILURE);
            if *n & (notify::SUCCESS | notify::DELAY) != 0 {
                *n &= !(notify::SUCCESS | notify::DELAY);
                if *n == 0 {
                    *n = notify::NEVER;
                }
            }
        }
        self.ret = Some(DsnRet::Hdrs);
    }

    /// Recipient `i`'s parameters (none when it had none).
    pub fn rcpt(&self, i: usize) -> RcptDsn {
        self.rcpts.get(i).cloned().unwrap_or_default()
    }

    /// Whether recipient `i` wants a notice of this kind. Without NOTIFY: failures and delays
    /// yes, success no (RFC 3461 §4.1); `NOTIFY=NEVER`: none.
    pub fn wants(&self, i: usize, notice: Notice) -> bool {
        use crate::proto::command::notify;
        let flag = match notice {
            Notice::Success => notify::SUCCESS,
            Notice::Failure => notify::FAILURE,
            Notice::Delay => notify::DELAY,
        };
        match self.rcpts.get(i).and_then(|r| r.notify) {
            None => notice != Notice::Success,
            Some(n) => n & flag != 0,
        }
    }

    /// The parameters of a copy with only the recipients at `indexes`.
    pub fn select(&self, indexes: &[usize]) -> DsnRequest {
        DsnRequest {
            ret: self.ret,
            envid: self.envid.clone(),
            rcpts: if self.rcpts.is_empty() {
                Vec::new()
            } else {
                indexes.iter().map(|&i| self.rcpt(i)).collect()
            },
        }
    }
}

/// Decode xtext (RFC 3461 §4: `+XX` is the byte XX) for a report field: anything that is not
/// printable ASCII (CR, LF, …) becomes `?`, so a decoded value cannot start a new field.
pub fn xtext_for_report(x: &str) -> String {
    let b = x.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        let byte = if c == b'+' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(v) => {
                    i += 2;
                    v
                }
                None => c,
            }
        } else {
            c
        };
        out.push(if (0x20..0x7f).contains(&byte) {
            byte as char
        } else {
            '?'
        });
        i += 1;
    }
    out
}

/// A unique, sortable queue id: microseconds since the epoch, core and a per-core counter.
pub fn queue_id(now: SystemTime, core: usize, counter: u16) -> String {
    let micros = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    format!("{micros:013X}{:02X}{counter:04X}", core & 0xff)
}

#[cfg(test)]
impl Envelope {
    /// A test envelope: `a@b.test` to `rcpts`, from 127.0.0.1, inbound, received at the epoch.
    pub(crate) fn example(queue_id: &str, rcpts: &[&str]) -> Envelope {
        Envelope {
            queue_id: queue_id.into(),
            mail_from: "a@b.test".into(),
            rcpts: rcpts.iter().map(|r| r.to_string()).collect(),
            client_ip: IpAddr::from([127, 0, 0, 1]),
            helo: "client".into(),
            tls: None,
            authenticated_as: None,
            binding: "mx".into(),
            esmtp: true,
            is_bounce: false,
            direction: Direction::Inbound,
            received_at: SystemTime::UNIX_EPOCH,
            aswl: None,
            dmarc_quarantine: false,
            sender_verified: false,
            dsn: DsnRequest::default(),
            binary: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::command::notify;

    #[test]
    fn routing_holds_for_its_generation_and_selects_with_copies() {
        let r = Routing {
            generation: 3,
            routes: vec![0, 2, 1],
        };
        assert_eq!(r.route(3, 1), Some(2));
        assert_eq!(r.route(4, 1), None, "another configuration: routed again");
        assert_eq!(r.route(3, 7), None);
        let copy = r.select(&[0, 2]);
        assert_eq!(copy.routes, [0, 1]);
        assert_eq!(copy.route(3, 1), Some(1));
    }

    #[test]
    fn notify_defaults_and_selection() {
        let d = DsnRequest {
            ret: Some(DsnRet::Hdrs),
            envid: Some("e+2B1".into()),
            rcpts: vec![
                RcptDsn::default(),
                RcptDsn {
                    notify: Some(notify::NEVER),
                    orcpt: None,
                },
                RcptDsn {
                    notify: Some(notify::SUCCESS | notify::DELAY),
                    orcpt: Some("rfc822;x+40y".into()),
                },
            ],
        };
        let wants = |i, n| d.wants(i, n);
        assert!(wants(0, Notice::Failure) && wants(0, Notice::Delay) && !wants(0, Notice::Success));
        assert!(
            !wants(1, Notice::Failure) && !wants(1, Notice::Delay) && !wants(1, Notice::Success)
        );
        assert!(!wants(2, Notice::Failure) && wants(2, Notice::Delay) && wants(2, Notice::Success));
        assert!(
            wants(7, Notice::Failure),
            "an index without parameters: defaults"
        );
        let s = d.select(&[2]);
        assert_eq!(s.rcpts, vec![d.rcpts[2].clone()]);
        assert_eq!(s.envid, d.envid);
        assert!(DsnRequest::default().select(&[0, 1]).is_empty());
    }

    #[test]
    fn xtext_decoded_for_reports_cannot_break_a_field() {
        assert_eq!(xtext_for_report("rfc822;a+40b.test"), "rfc822;a@b.test");
        assert_eq!(xtext_for_report("x+0D+0AEvil: 1"), "x??Evil: 1");
        assert_eq!(xtext_for_report("bad+zz+"), "bad+zz+");
    }
}
