//! The sans-IO SMTP server core.
//!
//! No sockets, no files, no async and no clock: bytes go in through [`Session::feed`] (with the
//! current time as a parameter), events and queued replies come out. Everything here parses
//! bytes from the network, so a panic would be a remote denial of service of a whole core:
//! `unwrap`, `expect` and unchecked indexing are denied by lint.
//!
//! - [`line`]: command-line framing with a hard cap enforced before buffering.
//! - [`command`]: the zero-copy command parser.
//! - [`address`]: RFC 5321 paths and mailboxes.
//! - [`data`]: the DATA reader (dot-unstuffing, CRLF.CRLF only, bare CR/LF policy).
//! - [`session`]: the state machine (sequencing, PIPELINING, BDAT, STARTTLS, AUTH, limits).
//! - [`reply`]: the typed reply table.
//! - [`settings`]: what a session is configured with.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )
)]

pub mod address;
pub mod command;
pub mod data;
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod fuzz_targets;
pub mod line;
pub mod proxy;
pub mod reply;
pub mod session;
pub mod settings;

pub use address::Address;
pub use command::{Body, Command, MailParams, Mechanism, ParseError, RcptParams, Ret};
pub use data::{BareLinePolicy, DataReader};
pub use reply::{Reply, ReplyClass};
pub use session::{AbortReason, Credentials, Event, Feed, Session, Stop};
pub use settings::{AuthSettings, Extensions, SessionConfig, Settings, SettingsError};

#[cfg(test)]
mod tests;
