//! What every delivery shares: the envelope, queue ids, the trace header, the drop folder.

pub mod drop_folder;
pub mod trace;

use std::net::IpAddr;
use std::time::SystemTime;

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
    pub direction: crate::config::Direction,
    pub received_at: SystemTime,
    /// The whitelist verdict of inbound mail (`Some(true)` = pass); `None` = not checked.
    pub aswl: Option<bool>,
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
            direction: crate::config::Direction::Inbound,
            received_at: SystemTime::UNIX_EPOCH,
            aswl: None,
        }
    }
}
