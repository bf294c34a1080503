//! Who may send what where: the policy pipeline ([`pipeline`]) and its checks ([`checks`]),
//! pure functions of the configuration and the client, tested without sockets.
//!
//! - Inbound bindings accept recipients in `[domains] local` only (`550 5.7.1`), plus the bare
//!   `<Postmaster>` (RFC 5321 §4.5.1); `[[recipients]]` maps refuse unknown users (`550 5.1.1`).
//! - Outbound bindings accept any recipient from `allowed_clients` or after AUTH, nothing else
//!   (`554 5.7.1`). AUTH on an inbound binding identifies the client but grants no relay.
//! - `auth = "required"` refuses MAIL until the client authenticated (`530 5.7.0`).
//!
//! There is no combination of settings under which an unauthenticated client outside
//! `allowed_clients` can send to a domain that is not local: that is the open-relay guarantee.

pub mod authenticate;
pub mod bodyhash;
pub mod callout;
pub mod checks;
pub mod dkim_key;
pub mod dnsbl;
pub mod greet;
pub mod hops;
pub mod pipeline;
pub mod rates;
pub mod recipients;
