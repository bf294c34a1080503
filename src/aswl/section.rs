//! `[aswl]` as written in the configuration file (compiled into [`super::Settings`]).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::Mode;
use crate::units::{Cidr, Secs};

/// `[aswl]`: the Auto Sender Whitelist (see `src/aswl`). Present = on.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AswlSection<R> {
    pub enabled: bool,
    /// Which view a check uses: `global`, `per-domain` or `per-recipient`.
    pub mode: Mode,
    /// `"off"` (records kept forever, the default) or a duration such as `"30d"`.
    pub lifetime: String,
    /// How often expired records are removed.
    pub sweep_interval: Secs,
    /// How often a snapshot is written (the change logs it covers are then deleted).
    pub snapshot_interval: Secs,
    /// Default `{data_dir}/aswl`.
    pub dir: Option<PathBuf>,
    /// Outbound clients whose mail is not collected (CIDRs).
    pub ip_exceptions: Vec<Cidr>,
    /// Subject masks whose mail is not collected (besides the shipped out-of-office list).
    pub subject_exceptions: Vec<String>,
    /// A file of subject masks replacing the shipped out-of-office list.
    pub subject_exceptions_file: Option<PathBuf>,
    /// Use the shipped out-of-office list (when no file is given).
    pub default_subject_exceptions: bool,
    /// An outbound message to R this soon after an inbound one from R is an auto-response
    /// (0 = off).
    pub auto_response_window: Secs,
    pub detect_auto_submitted: bool,
    pub detect_precedence: bool,
    pub detect_list_headers: bool,
    pub detect_reports: bool,
    /// Senders (address or domain masks) never whitelisted.
    pub check_exceptions: Vec<String>,
    /// Senders in `[domains] local` are never whitelisted (forged "internal" mail).
    pub except_local_domains: bool,
    pub log_additions: bool,
    /// The header carrying the verdict on inbound mail.
    pub header: String,
    /// Sub-address delimiters of local addresses (each character is one; empty = off).
    pub local_delimiters: String,
    pub case_sensitive_local_part: bool,
    /// Also fold `+tag` on external addresses.
    pub external_plus_fold: bool,
    /// Whether a record matches only for an authenticated sender (`[authentication]`):
    /// `aligned`, `spf-or-dkim` or `off`. Default `aligned` when `[authentication] verify`
    /// is on, `off` otherwise.
    pub require_authentication: Option<RequireAuth>,
    /// `[aswl.replication]`: share the whitelist with other nodes through Redis (its section
    /// type belongs to `crate::replication`, which builds on this module).
    pub replication: Option<R>,
}

impl<R> Default for AswlSection<R> {
    fn default() -> Self {
        AswlSection {
            enabled: true,
            mode: Mode::PerRecipient,
            lifetime: "off".into(),
            sweep_interval: Secs(Duration::from_secs(3600)),
            snapshot_interval: Secs(Duration::from_secs(900)),
            dir: None,
            ip_exceptions: Vec::new(),
            subject_exceptions: Vec::new(),
            subject_exceptions_file: None,
            default_subject_exceptions: true,
            auto_response_window: Secs(Duration::from_secs(30)),
            detect_auto_submitted: true,
            detect_precedence: true,
            detect_list_headers: true,
            detect_reports: true,
            check_exceptions: Vec::new(),
            except_local_domains: true,
            log_additions: false,
            header: "X-ASWL".into(),
            local_delimiters: "+".into(),
            case_sensitive_local_part: false,
            external_plus_fold: false,
            require_authentication: None,
            replication: None,
        }
    }
}

/// `[aswl] require_authentication`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RequireAuth {
    /// SPF passed for the sender's domain, or DKIM passed for a domain with the same
    /// organizational domain (DMARC's relaxed alignment).
    #[default]
    Aligned,
    /// SPF passed for the sender's domain, or DKIM passed for exactly that domain.
    SpfOrDkim,
    /// The envelope sender alone (forgeable).
    Off,
}
