//! ringmx: an SMTP front end for Linux edge hosts.
//!
//! See `README.md` for the layout. [`proto`] is the sans-IO SMTP core.

pub mod admin;
pub mod aswl;
pub mod auth;
pub mod config;
pub mod delivery;
pub mod dnslist;
pub mod domain;
pub mod fuzz_targets;
pub mod journal;
pub mod metrics;
pub mod policy;
pub mod proto;
pub mod relay;
pub mod replication;
pub mod runtime;
pub mod spool;
#[cfg(test)]
pub(crate) mod test_dir;
pub mod tls;
pub mod units;
pub mod workers;
