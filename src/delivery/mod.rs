//! Delivery of accepted messages. For now one mode: the drop (pickup) folder.

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
    pub received_at: SystemTime,
}

/// A unique, sortable queue id: microseconds since the epoch, core and a per-core counter.
pub fn queue_id(now: SystemTime, core: usize, counter: u16) -> String {
    let micros = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    format!("{micros:013X}{:02X}{counter:04X}", core & 0xff)
}
