//! The configuration file: one TOML document, typed, every key defaulted and documented in
//! `examples/ringmx.toml`, unknown keys refused, and every error naming the key and its line.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

pub use crate::delivery::{Direction, RouteFacts};
use crate::domain::canonical_pattern;
pub use crate::domain::{canonical_domain, domain_matches};
use crate::proto::{self, BareLinePolicy};
pub use crate::relay::RelayTls;
pub use crate::replication::ReplicationSection;
use crate::units;
pub use crate::units::{Cidr, Secs, Size};
/// `[aswl]` with its `[aswl.replication]` table.
pub type AswlSection = crate::aswl::AswlSection<ReplicationSection>;

/// The configuration used when `ringmx run` gets no `--config`: no root needed, loopback only.
pub const DEFAULT_CONFIG: &str = include_str!("default.toml");

/// A configuration error: the file, the line (when known), the key and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{}: ", self.file, l)?,
            None => write!(f, "{}: ", self.file)?,
        }
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// TLS on a binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plain SMTP only.
    #[default]
    None,
    /// STARTTLS offered (RFC 3207).
    Starttls,
    /// TLS from the first byte (port 465, RFC 8314).
    Implicit,
}

/// SMTP AUTH on a binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Not offered.
    #[default]
    Off,
    /// Offered (after TLS); clients may relay by network or by AUTH.
    Optional,
    /// MAIL is refused (`530 5.7.0`) until the client authenticates.
    Required,
}

/// Log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Which io_uring/epoll driver the cores run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    /// io_uring where the kernel allows it, epoll otherwise.
    #[default]
    Auto,
    /// epoll only.
    Legacy,
}

/// `cores = "all" | N | [list]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Cores {
    /// `"all"`: one thread per online CPU.
    All(String),
    /// The first N CPUs.
    Count(usize),
    /// These CPUs.
    List(Vec<usize>),
}

impl Default for Cores {
    fn default() -> Self {
        Cores::All("all".into())
    }
}

impl Cores {
    /// The CPU ids to run on, given how many the machine has.
    pub fn resolve(&self, online: usize) -> Vec<usize> {
        match self {
            Cores::All(_) => (0..online.max(1)).collect(),
            Cores::Count(n) => (0..(*n).max(1)).map(|i| i % online.max(1)).collect(),
            Cores::List(l) => l.clone(),
        }
    }
}

/// The CPU ids this process may be pinned to (its affinity mask).
fn pinnable_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data, zeroed then filled by sched_getaffinity for this thread;
    // CPU_ISSET only reads it, for ids below CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

fn default_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    pub hostname: String,
    pub cores: Spanned<Cores>,
    pub data_dir: PathBuf,
    pub log: LogFormat,
    pub driver: Driver,
    /// How long SIGTERM waits for transactions in flight.
    pub shutdown_timeout: Secs,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            hostname: default_hostname(),
            cores: Spanned::new(0..0, Cores::default()),
            data_dir: PathBuf::from("./ringmx-data"),
            log: LogFormat::Text,
            driver: Driver::Auto,
            shutdown_timeout: Secs(Duration::from_secs(30)),
        }
    }
}

/// `[rates]`: limits per client network and minute (`policy::rates`); 0 = no limit. Read at
/// startup (a reload keeps the running limits).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RatesSection {
    /// New connections (`421 4.7.0` instead of the greeting).
    pub connections_per_minute: u32,
    /// Transactions (`450 4.7.1` at MAIL).
    pub messages_per_minute: u32,
    /// Accepted recipients (`450 4.7.1` at RCPT).
    pub recipients_per_minute: u32,
    /// Recipients refused as unknown by `[[recipients]]` (`421 4.7.0`, and the session ends).
    pub unknown_recipients_per_minute: u32,
    /// The burst allowed at once, in percent of a minute's allowance (at least one event).
    pub burst_percent: u32,
    /// Client addresses counted together: IPv4 /32 and IPv6 /64 by default.
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    /// Networks never limited.
    pub exempt: Vec<Cidr>,
    /// Cells per limit (8 bytes each, shared by all cores; rounded up to a power of two).
    pub table_size: usize,
    /// Count through the Redis of `[aswl.replication]` too: one limit per network for the
    /// whole fleet, each host's own limit as the fallback.
    pub fleet: bool,
}

impl Default for RatesSection {
    fn default() -> Self {
        RatesSection {
            connections_per_minute: 0,
            messages_per_minute: 0,
            recipients_per_minute: 0,
            unknown_recipients_per_minute: 0,
            burst_percent: 10,
            ipv4_prefix: 32,
            ipv6_prefix: 64,
            exempt: Vec::new(),
            table_size: 1 << 16,
            fleet: false,
        }
    }
}

/// `[dnsbl]`: DNS block and allow lists asked when a client connects to an inbound binding
/// (`policy::dnsbl`). Read at startup.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsblSection {
    /// `domain[=pattern][*weight]` as in postscreen (`zen.example*2`,
    /// `list.example=127.0.0.[2..11]*3`, `allow.example*-5`).
    pub lists: Vec<Spanned<String>>,
    /// A client whose weights add up to this is refused (`554 5.7.1`).
    pub threshold: i32,
    /// How long the lookups may take together; a list that has not answered is "not listed".
    pub timeout: Secs,
    /// Scores are cached per address for the answers' TTL, at most this long.
    pub max_cache_ttl: Secs,
    /// Addresses cached at most.
    pub cache_size: usize,
}

impl Default for DnsblSection {
    fn default() -> Self {
        DnsblSection {
            lists: Vec::new(),
            threshold: 1,
            timeout: Secs(Duration::from_secs(2)),
            max_cache_ttl: Secs(Duration::from_secs(3600)),
            cache_size: 100_000,
        }
    }
}

/// `[limits]` and per-binding overrides.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_message_size: Size,
    pub max_recipients: usize,
    pub max_line: usize,
    pub max_errors: u32,
    /// Commands that move no mail between messages before each counts as an error.
    pub max_junk_commands: u32,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub command_timeout: Secs,
    pub data_timeout: Secs,
    /// Bytes per second a DATA/BDAT transfer must average (0 = off).
    pub min_data_rate: Size,
    /// Longest one transaction may take, MAIL to end of data.
    pub max_transaction_time: Secs,
    /// `Received:` fields a message may carry (more: `554 5.4.6`, a mail loop).
    pub max_hops: usize,
    /// Unknown recipients one session may try (`[[recipients]]`) before `421 4.7.0`.
    pub max_unknown_recipients: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: Size(20 * 1024 * 1024),
            max_recipients: 1000,
            max_line: 2048,
            max_errors: 20,
            max_junk_commands: 100,
            max_connections: 10_000,
            max_connections_per_ip: 50,
            command_timeout: Secs(Duration::from_secs(300)),
            data_timeout: Secs(Duration::from_secs(180)),
            // Postfix's smtpd_min_data_rate default: a byte every few seconds cannot hold a
            // session.
            min_data_rate: Size(500),
            max_transaction_time: Secs(Duration::from_secs(600)),
            max_hops: 50,
            max_unknown_recipients: 10,
        }
    }
}

/// Per-binding `[binding.limits]`: any key of `[limits]`, overriding it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsOverride {
    pub max_message_size: Option<Size>,
    pub max_recipients: Option<usize>,
    pub max_line: Option<usize>,
    pub max_errors: Option<u32>,
    pub max_junk_commands: Option<u32>,
    pub max_connections: Option<usize>,
    pub max_connections_per_ip: Option<usize>,
    pub command_timeout: Option<Secs>,
    pub data_timeout: Option<Secs>,
    pub min_data_rate: Option<Size>,
    pub max_transaction_time: Option<Secs>,
    pub max_hops: Option<usize>,
    pub max_unknown_recipients: Option<usize>,
}

impl Limits {
    /// These limits with `o`'s keys taking precedence.
    pub fn merged(&self, o: &LimitsOverride) -> Limits {
        Limits {
            max_message_size: o.max_message_size.unwrap_or(self.max_message_size),
            max_recipients: o.max_recipients.unwrap_or(self.max_recipients),
            max_line: o.max_line.unwrap_or(self.max_line),
            max_errors: o.max_errors.unwrap_or(self.max_errors),
            max_junk_commands: o.max_junk_commands.unwrap_or(self.max_junk_commands),
            max_connections: o.max_connections.unwrap_or(self.max_connections),
            max_connections_per_ip: o
                .max_connections_per_ip
                .unwrap_or(self.max_connections_per_ip),
            command_timeout: o.command_timeout.unwrap_or(self.command_timeout),
            data_timeout: o.data_timeout.unwrap_or(self.data_timeout),
            min_data_rate: o.min_data_rate.unwrap_or(self.min_data_rate),
            max_transaction_time: o.max_transaction_time.unwrap_or(self.max_transaction_time),
            max_hops: o.max_hops.unwrap_or(self.max_hops),
            max_unknown_recipients: o
                .max_unknown_recipients
                .unwrap_or(self.max_unknown_recipients),
        }
    }
}

/// `[[binding]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingSection {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub listen: Spanned<SocketAddr>,
    pub direction: Direction,
    #[serde(default)]
    pub tls: TlsMode,
    pub certificate: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub pkcs12: Option<PathBuf>,
    pub pkcs12_password_file: Option<PathBuf>,
    #[serde(default)]
    pub auth: AuthMode,
    #[serde(default)]
    pub allowed_clients: Vec<Cidr>,
    /// Only these client networks may connect (empty = any); `554 5.7.1` to the others.
    #[serde(default)]
    pub clients_allow: Vec<Cidr>,
    /// These client networks may not connect (`554 5.7.1`); checked before `clients_allow`.
    #[serde(default)]
    pub clients_deny: Vec<Cidr>,
    pub proxy_protocol: Option<Vec<Cidr>>,
    #[serde(default)]
    pub limits: LimitsOverride,
    /// The name in this binding's greeting, EHLO reply and `Received:` lines (default
    /// `server.hostname`).
    pub hostname: Option<String>,
    /// The text after `220 hostname ESMTP` (default `smtp.banner`).
    pub banner: Option<String>,
    /// Wait this long between a `220-` first greeting line and the last one; a client that
    /// talks before the end is refused and remembered (`smtp.early_talker_ttl`), one that
    /// waits is remembered as good (`smtp.greet_pass_ttl`) and skips the wait next time.
    pub greet_delay: Option<Secs>,
}

/// `[domains]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DomainsSection {
    /// Domains accepted on inbound bindings; `*.example.com` also accepts subdomains.
    pub local: Vec<Spanned<String>>,
}

/// `[smtp]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpSection {
    pub bare_lf: BareLf,
    pub bare_lf_exempt: Vec<Cidr>,
    pub banner: String,
    pub pipelining: bool,
    pub chunking: bool,
    pub binarymime: bool,
    pub eightbitmime: bool,
    pub smtputf8: bool,
    pub dsn: bool,
    pub enhanced_status_codes: bool,
    /// How long a client that waited for a delayed greeting skips the delay.
    pub greet_pass_ttl: Secs,
    /// How long a client that talked before the greeting, or pipelined without PIPELINING,
    /// is refused at connect (`554 5.5.0`).
    pub early_talker_ttl: Secs,
}

impl Default for SmtpSection {
    fn default() -> Self {
        SmtpSection {
            bare_lf: BareLf::Reject,
            bare_lf_exempt: Vec::new(),
            banner: "ringmx".into(),
            pipelining: true,
            chunking: true,
            binarymime: true,
            eightbitmime: true,
            smtputf8: true,
            dsn: true,
            enhanced_status_codes: true,
            greet_pass_ttl: Secs(Duration::from_secs(86_400)),
            early_talker_ttl: Secs(Duration::from_secs(600)),
        }
    }
}

/// `bare_lf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BareLf {
    #[default]
    Reject,
    Normalize,
}

/// `[auth]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    /// `user:argon2-hash` lines.
    pub users_file: Option<PathBuf>,
    /// Failed AUTH attempts from one client address (IPv6: its /64) within `failure_window`
    /// before its AUTH commands get `454 4.7.0` without a check (0 = no limit).
    pub max_failures: u32,
    pub failure_window: Secs,
    /// Threads that run argon2 checks (their own, apart from spool and drop-folder I/O).
    pub verify_threads: usize,
    /// Checks waiting beyond those running; more get `454 4.7.0` (try again later).
    pub max_pending: usize,
}

impl Default for AuthSection {
    fn default() -> Self {
        AuthSection {
            users_file: None,
            max_failures: 10,
            failure_window: Secs(Duration::from_secs(900)),
            verify_threads: 1,
            max_pending: 64,
        }
    }
}

/// `[admin]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    pub listen: Option<SocketAddr>,
    /// Bearer tokens, one a line; required when `listen` is not a loopback address.
    pub token_file: Option<PathBuf>,
    /// Host names (besides the listen address, and `localhost` on loopback) the endpoint
    /// answers to.
    pub allowed_hosts: Vec<String>,
    /// `/metrics` without a token (for a scraper on a trusted network).
    pub open_metrics: bool,
    /// HTTPS with this certificate chain and key (PEM), loaded at start.
    pub certificate: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 8025))),
            token_file: None,
            allowed_hosts: Vec::new(),
            open_metrics: false,
            certificate: None,
            key: None,
        }
    }
}

/// What a route does with the messages it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteAction {
    /// SMTP to the route's next hops (or the recipient domain's MX hosts).
    Relay,
    /// One `.eml` file per message into `folder` (pickup folder).
    Drop,
    /// Accept and throw away (tests and benchmarks); logged. Not spooled.
    Discard,
    /// Keep in the queue, held, until released with `ringmx queue release`.
    Hold,
}

/// `[[route]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    /// Recipient domains: exact, `*.example.com`, or `*`.
    pub domains: Vec<Spanned<String>>,
    pub direction: Option<Direction>,
    /// Sender domains (same patterns); absent = any sender.
    pub sender_domains: Option<Vec<String>>,
    pub action: RouteAction,
    pub folder: Option<PathBuf>,
    /// `relay`: `host:port` next hops tried in order, or `["mx"]` for the recipient domain's MX.
    #[serde(default)]
    pub next_hops: Vec<Spanned<String>>,
    /// Port for MX hosts. Default 25.
    #[serde(default = "default_mx_port")]
    pub mx_port: u16,
    /// `["mx"]`: addresses of MX hosts never connected to (as Exim's `ignore_target_hosts`).
    /// The DNS of a recipient (or forged sender) domain is not ours: by default an MX that
    /// points at this host (loopback, `0.0.0.0`) or at link-local addresses (a cloud metadata
    /// service) is skipped; a domain with no other address fails with `554 5.4.4`.
    #[serde(default = "default_mx_ignore")]
    pub mx_ignore: Vec<Cidr>,
    #[serde(default)]
    pub tls: RelayTls,
    /// Verify the next hop's certificate (required/implicit TLS). Default true.
    #[serde(default = "yes")]
    pub tls_verify: bool,
    /// PEM roots to verify against instead of the built-in web PKI roots.
    pub tls_ca_file: Option<PathBuf>,
    /// AUTH to a smart host (sent only over TLS, unless `tls = "none"`).
    pub auth_user: Option<String>,
    pub auth_password_file: Option<PathBuf>,
    /// Name in EHLO. Default `server.hostname`.
    pub ehlo: Option<String>,
    /// Source address per sender domain (`"*"` = every other sender).
    #[serde(default)]
    pub source_ip: std::collections::BTreeMap<String, std::net::IpAddr>,
    /// Connections per next hop on each core. Default 16.
    #[serde(default = "default_hop_connections")]
    pub max_connections_per_hop: usize,
    /// Only mail with this whitelist verdict (`pass` or `none`; inbound mail only).
    pub aswl: Option<AswlMatch>,
    /// `"quarantine"`: only mail that failed DMARC where the From domain asks for quarantine
    /// (or reject, when `[authentication] dmarc_reject` is off).
    pub dmarc: Option<DmarcMatch>,
    /// Password read from `auth_password_file` at load time.
    #[serde(skip)]
    pub auth_password: Option<String>,
}

/// A route's condition on the whitelist verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AswlMatch {
    Pass,
    None,
}

/// A route's condition on the DMARC result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DmarcMatch {
    Quarantine,
}

fn default_mx_port() -> u16 {
    25
}
fn default_mx_ignore() -> Vec<Cidr> {
    [
        "0.0.0.0/8",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "::/128",
        "::1/128",
        "fe80::/10",
        // AWS's metadata service over IPv6 (a unique local address).
        "fd00:ec2::254",
    ]
    .iter()
    .filter_map(|n| Cidr::parse(n).ok())
    .collect()
}
fn yes() -> bool {
    true
}
fn default_hop_connections() -> usize {
    16
}

impl RouteSection {
    /// Whether this route takes a recipient in `domain` from `sender_domain`.
    pub fn matches(&self, domain: &str, sender_domain: &str, facts: RouteFacts) -> bool {
        self.direction.is_none_or(|d| d == facts.direction)
            && self
                .dmarc
                .is_none_or(|DmarcMatch::Quarantine| facts.dmarc_quarantine)
            && self.aswl.is_none_or(|m| match (m, facts.aswl) {
                (AswlMatch::Pass, Some(pass)) => pass,
                (AswlMatch::None, Some(pass)) => !pass,
                (_, None) => false,
            })
            && self.domains.iter().any(|p| {
                p.get_ref() == "*" || domain_matches(std::slice::from_ref(p.get_ref()), domain)
            })
            && self
                .sender_domains
                .as_ref()
                .is_none_or(|s| s.iter().any(|p| p == "*") || domain_matches(s, sender_domain))
    }

    /// The source address for mail from `sender_domain`, if one is configured.
    pub fn source_ip_for(&self, sender_domain: &str) -> Option<std::net::IpAddr> {
        self.source_ip
            .iter()
            .find(|(d, _)| {
                d.as_str() != "*" && domain_matches(std::slice::from_ref(*d), sender_domain)
            })
            .or_else(|| self.source_ip.iter().find(|(d, _)| d.as_str() == "*"))
            .map(|(_, ip)| *ip)
    }
}

/// `[spool]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolSection {
    /// Default `{data_dir}/spool`.
    pub dir: Option<PathBuf>,
    pub segment_size: Size,
    /// Flush when this many messages wait…
    pub commit_batch: usize,
    /// …or this long after the first one.
    pub commit_delay: Secs,
    /// Disk all unfinished messages' spill files may take together.
    pub max_staging: Size,
}

impl Default for SpoolSection {
    fn default() -> Self {
        SpoolSection {
            dir: None,
            segment_size: Size(64 * 1024 * 1024),
            commit_batch: 32,
            commit_delay: Secs(Duration::from_micros(300)),
            max_staging: Size(4 << 30),
        }
    }
}

/// `[queue]`: retries, bounces and relay timeouts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueSection {
    /// Waits between attempts; the last one repeats.
    pub retry: Vec<Secs>,
    /// Give up (and bounce) after this long in the queue.
    pub max_lifetime: Secs,
    /// Send a "delayed" notice once a message has waited this long (0 = never).
    pub delay_notice: Secs,
    pub connect_timeout: Secs,
    /// Per reply from a next hop (RFC 5321 §4.5.3.2 suggests minutes).
    pub reply_timeout: Secs,
    /// How long an idle connection to a next hop is kept for reuse.
    pub idle_timeout: Secs,
    /// Messages delivered at once on each core.
    pub concurrency: usize,
    /// Copy messages deferred longer than this into the current segment so old segments go.
    pub copy_forward_after: Secs,
}

impl Default for QueueSection {
    fn default() -> Self {
        let m = |n: u64| Secs(Duration::from_secs(n * 60));
        QueueSection {
            retry: vec![m(1), m(5), m(15), m(30), m(60)],
            max_lifetime: Secs(Duration::from_secs(5 * 86400)),
            delay_notice: Secs(Duration::ZERO),
            connect_timeout: Secs(Duration::from_secs(30)),
            reply_timeout: Secs(Duration::from_secs(300)),
            idle_timeout: Secs(Duration::from_secs(10)),
            concurrency: 256,
            copy_forward_after: Secs(Duration::from_secs(3600)),
        }
    }
}

/// `[dns]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsSection {
    /// Resolvers (`ip:port`); empty = `/etc/resolv.conf`.
    pub servers: Vec<SocketAddr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: ServerSection,
    #[serde(default, rename = "binding")]
    bindings: Vec<Spanned<BindingSection>>,
    #[serde(default)]
    domains: DomainsSection,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    smtp: SmtpSection,
    #[serde(default)]
    auth: AuthSection,
    #[serde(default)]
    admin: AdminSection,
    #[serde(default, rename = "route")]
    routes: Vec<Spanned<RouteSection>>,
    #[serde(default)]
    spool: SpoolSection,
    #[serde(default)]
    queue: QueueSection,
    #[serde(default)]
    dns: DnsSection,
    #[serde(default)]
    rates: RatesSection,
    #[serde(default)]
    dnsbl: DnsblSection,
    #[serde(default)]
    callout: CalloutSection,
    #[serde(default)]
    authentication: AuthenticationSection,
    aswl: Option<AswlSection>,
    #[serde(default, rename = "recipients")]
    recipients: Vec<Spanned<RecipientsSection>>,
}

/// `[[recipients]]`: the known recipients of some local domains (see `policy::recipients`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipientsSection {
    /// Local domains (patterns as in `[domains] local`) whose recipients must be in `file`,
    /// or verified by a callout.
    pub domains: Vec<String>,
    /// Addresses, `*@domain` and `user@*`, one a line.
    pub file: Option<PathBuf>,
    /// Ask the route's next hop instead of a file (`[callout]`).
    #[serde(default)]
    pub callout: bool,
}

/// `[callout]`: recipient verification against the next hop (`policy::callout`). Read at
/// startup.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CalloutSection {
    /// How long a recipient the next hop accepted stays known.
    pub positive_ttl: Secs,
    /// How long one it refused (5xx) stays unknown.
    pub negative_ttl: Secs,
    /// Addresses cached at most (both kinds together).
    pub cache_size: usize,
    /// Each step of a probe: connecting, and every reply.
    pub timeout: Secs,
    /// When the next hop cannot answer (down, slow, 4xx): `"defer"` (`450 4.1.1`) or
    /// `"accept"`.
    pub unavailable: CalloutUnavailable,
}

/// `[authentication]`: SPF, DKIM and DMARC on inbound mail (`policy::authenticate`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthenticationSection {
    /// `verify` as written: verify every message accepted on an inbound binding and add
    /// `Authentication-Results:`. Default: on when `[aswl]` is.
    #[serde(rename = "verify")]
    pub verify_key: Option<bool>,
    /// `verify` in effect.
    #[serde(skip)]
    pub verify: bool,
    /// The authserv-id of the results (default `server.hostname`).
    pub authserv_id: Option<String>,
    /// All lookups of one message together (a failed lookup is `temperror`; past this the
    /// message gets no results and its sender counts as unauthenticated).
    pub timeout: Secs,
    /// Refuse (`550 5.7.1`) a message whose From domain's DMARC policy is `reject` and that
    /// fails DMARC.
    pub dmarc_reject: bool,
    /// Refuse (`550 5.7.23`) MAIL FROM a domain whose SPF record fails the client (`-all`).
    pub spf_reject: bool,
    /// A Public Suffix List file (publicsuffix.org format) instead of the built-in one.
    pub public_suffix_list: Option<PathBuf>,
    /// The list in use, read at load.
    #[serde(skip)]
    pub suffixes: crate::domain::Suffixes,
}

impl Default for AuthenticationSection {
    fn default() -> Self {
        AuthenticationSection {
            verify_key: None,
            verify: false,
            authserv_id: None,
            timeout: Secs(Duration::from_secs(10)),
            dmarc_reject: false,
            spf_reject: false,
            public_suffix_list: None,
            suffixes: crate::domain::Suffixes::default(),
        }
    }
}

impl Config {
    /// The authserv-id of `Authentication-Results:`.
    pub fn authserv_id(&self) -> &str {
        self.authentication
            .authserv_id
            .as_deref()
            .unwrap_or(&self.server.hostname)
    }
}

/// `[callout] unavailable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CalloutUnavailable {
    #[default]
    Defer,
    Accept,
}

impl Default for CalloutSection {
    fn default() -> Self {
        CalloutSection {
            positive_ttl: Secs(Duration::from_secs(7 * 86_400)),
            negative_ttl: Secs(Duration::from_secs(3 * 3600)),
            cache_size: 100_000,
            timeout: Secs(Duration::from_secs(10)),
            unavailable: CalloutUnavailable::Defer,
        }
    }
}

/// A binding ready to serve: its section plus the SMTP settings derived from it.
#[derive(Debug, Clone)]
pub struct Binding {
    pub section: BindingSection,
    pub limits: Limits,
    pub settings: Arc<proto::Settings>,
    /// The same with bare CR/LF normalized, for clients in `smtp.bare_lf_exempt`.
    pub settings_bare_lf_exempt: Arc<proto::Settings>,
}

impl Binding {
    /// The session settings for a client at `ip`.
    pub fn settings_for(&self, ip: std::net::IpAddr, smtp: &SmtpSection) -> &Arc<proto::Settings> {
        if units::any_contains(&smtp.bare_lf_exempt, ip) {
            &self.settings_bare_lf_exempt
        } else {
            &self.settings
        }
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: String,
    pub server: ServerSection,
    pub bindings: Vec<Binding>,
    pub domains: Vec<String>,
    pub limits: Limits,
    pub smtp: SmtpSection,
    pub auth: AuthSection,
    pub admin: AdminSection,
    pub routes: Vec<RouteSection>,
    pub recipients: Vec<RecipientsSection>,
    pub spool: SpoolSection,
    pub queue: QueueSection,
    pub dns: DnsSection,
    pub rates: RatesSection,
    pub dnsbl: DnsblSection,
    pub callout: CalloutSection,
    pub authentication: AuthenticationSection,
    /// `[dnsbl] lists`, parsed.
    pub dns_lists: Vec<crate::dnslist::List>,
    /// The whitelist settings, compiled; `None` when `[aswl]` is absent or disabled.
    pub aswl: Option<Arc<crate::aswl::Settings>>,
    /// `[aswl.replication]`, compiled (with the whitelist on only; read at startup).
    pub replication: Option<Arc<crate::replication::Settings>>,
}

fn line_of(src: &str, offset: usize) -> usize {
    src.get(..offset)
        .map_or(0, |s| s.bytes().filter(|&b| b == b'\n').count())
        + 1
}

/// The line where `key = …` is first set after `after` (a byte offset), if it is.
fn key_line(src: &str, key: &str, after: usize) -> Option<usize> {
    let mut offset = 0;
    for line in src.split_inclusive('\n') {
        let start = offset;
        offset += line.len();
        if start < after {
            continue;
        }
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix(key)
            && rest.trim_start().starts_with('=')
        {
            return Some(line_of(src, start));
        }
    }
    None
}

impl Config {
    /// Read and validate the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let source = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            line: None,
            key: String::new(),
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(&source, &file)
    }

    /// The embedded default configuration.
    pub fn embedded_default() -> Result<Config, ConfigError> {
        Config::parse(DEFAULT_CONFIG, "<embedded default>")
    }

    /// Parse and validate `source` (named `file` in errors).
    pub fn parse(source: &str, file: &str) -> Result<Config, ConfigError> {
        let err = |line: Option<usize>, key: &str, message: String| ConfigError {
            file: file.to_string(),
            line,
            key: key.to_string(),
            message,
        };
        let mut raw: RawConfig = toml::from_str(source).map_err(|e| {
            let line = e.span().map(|s| line_of(source, s.start));
            // The reader's message is multi-line with a source excerpt; keep its first sentence.
            let message = e
                .message()
                .lines()
                .next()
                .unwrap_or("invalid TOML")
                .to_string();
            // Name the key: the `key = …` text of the line the error points at.
            let key = line
                .and_then(|l| source.lines().nth(l - 1))
                .and_then(|t| t.split_once('='))
                .map(|(k, _)| k.trim().trim_matches('"').to_string())
                .filter(|k| !k.is_empty() && !k.starts_with('['))
                .unwrap_or_default();
            err(line, &key, message)
        })?;
        // Verification is on by default where the whitelist is: a whitelist pass must not rest on
        // a forgeable envelope sender.
        raw.authentication.verify = raw
            .authentication
            .verify_key
            .unwrap_or(raw.aswl.as_ref().is_some_and(|a| a.enabled));

        let server = raw.server;
        if server.hostname.is_empty() || !server.hostname.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(err(
                key_line(source, "hostname", 0),
                "server.hostname",
                "must be a host name without spaces".into(),
            ));
        }
        if let Cores::All(s) = server.cores.get_ref()
            && s != "all"
        {
            return Err(err(
                Some(line_of(source, server.cores.span().start)),
                "server.cores",
                format!("expected \"all\", a number or a list of CPU ids, got {s:?}"),
            ));
        }
        let cores_line = Some(line_of(source, server.cores.span().start));
        match server.cores.get_ref() {
            Cores::List(l) if l.is_empty() => {
                return Err(err(
                    cores_line,
                    "server.cores",
                    "an empty list runs no core and serves nothing".into(),
                ));
            }
            Cores::Count(0) => {
                return Err(err(
                    cores_line,
                    "server.cores",
                    "0 cores serve nothing".into(),
                ));
            }
            Cores::List(l) => {
                let usable = pinnable_cpus();
                if let Some(c) = l.iter().find(|c| !usable.contains(c)) {
                    return Err(err(
                        cores_line,
                        "server.cores",
                        format!("CPU {c} cannot be used by this process (usable: {usable:?})"),
                    ));
                }
            }
            _ => {}
        }
        if raw.bindings.is_empty() {
            return Err(err(
                None,
                "binding",
                "at least one [[binding]] is needed".into(),
            ));
        }
        // One spelling everywhere: U-labels become A-labels (relay rights, routes and whitelist
        // keys agree whichever form a client or the operator writes).
        let domains: Vec<String> = raw
            .domains
            .local
            .iter()
            .map(|d| canonical_pattern(d.get_ref()))
            .collect();
        for d in &raw.domains.local {
            let name = d.get_ref().strip_prefix("*.").unwrap_or(d.get_ref());
            if name.is_empty() || proto::address::mailbox(format!("x@{name}").as_bytes()).is_none()
            {
                return Err(err(
                    Some(line_of(source, d.span().start)),
                    "domains.local",
                    format!("{:?} is not a domain name", d.get_ref()),
                ));
            }
        }

        let mut names = HashSet::new();
        let mut addrs = HashSet::new();
        let mut bindings = Vec::new();
        for (i, b) in raw.bindings.iter().enumerate() {
            let at = b.span().start;
            let line = Some(line_of(source, at));
            let sec = b.get_ref().clone();
            let key = |k: &str| format!("binding[{i}] ({}).{k}", sec.name);
            let kline = |k: &str| key_line(source, k, at).or(line);
            if sec.name.is_empty() || !names.insert(sec.name.clone()) {
                return Err(err(
                    kline("name"),
                    &key("name"),
                    "must be set and unique".into(),
                ));
            }
            if !addrs.insert(*sec.listen.get_ref()) {
                return Err(err(
                    Some(line_of(source, sec.listen.span().start)),
                    &key("listen"),
                    format!("{} is used by another binding", sec.listen.get_ref()),
                ));
            }
            match sec.tls {
                TlsMode::None => {
                    if sec.certificate.is_some() || sec.pkcs12.is_some() {
                        return Err(err(
                            kline("tls"),
                            &key("tls"),
                            "a certificate is configured but tls = \"none\"".into(),
                        ));
                    }
                }
                TlsMode::Starttls | TlsMode::Implicit => {
                    let pem = sec.certificate.is_some() && sec.key.is_some();
                    let pfx = sec.pkcs12.is_some();
                    if !pem && !pfx {
                        return Err(err(
                            kline("tls"),
                            &key("certificate"),
                            "TLS needs certificate + key (PEM) or pkcs12".into(),
                        ));
                    }
                    if pem && pfx {
                        return Err(err(
                            kline("pkcs12"),
                            &key("pkcs12"),
                            "give either certificate + key or pkcs12, not both".into(),
                        ));
                    }
                }
            }
            if sec.auth != AuthMode::Off {
                if raw.auth.users_file.is_none() {
                    return Err(err(
                        kline("auth"),
                        &key("auth"),
                        "AUTH needs [auth] users_file".into(),
                    ));
                }
                if sec.tls == TlsMode::None {
                    return Err(err(
                        kline("auth"),
                        &key("auth"),
                        "AUTH is only offered over TLS: set tls = \"starttls\" or \"implicit\""
                            .into(),
                    ));
                }
            }
            match sec.direction {
                Direction::Inbound if !sec.allowed_clients.is_empty() => {
                    return Err(err(
                        kline("allowed_clients"),
                        &key("allowed_clients"),
                        "an inbound binding takes mail for [domains] local from anyone; allowed_clients (relay rights) belongs on an outbound binding".into(),
                    ));
                }
                Direction::Inbound if domains.is_empty() => {
                    return Err(err(
                        kline("direction"),
                        &key("direction"),
                        "an inbound binding needs [domains] local".into(),
                    ));
                }
                Direction::Outbound
                    if sec.allowed_clients.is_empty() && sec.auth == AuthMode::Off =>
                {
                    return Err(err(
                        kline("direction"),
                        &key("allowed_clients"),
                        "an outbound binding needs allowed_clients or auth, or it accepts no one"
                            .into(),
                    ));
                }
                _ => {}
            }
            if let Some(h) = &sec.hostname
                && (h.is_empty() || !h.bytes().all(|b| b.is_ascii_graphic()))
            {
                return Err(err(
                    kline("hostname"),
                    &key("hostname"),
                    "must be a host name without spaces".into(),
                ));
            }
            if sec
                .banner
                .as_ref()
                .is_some_and(|b| b.bytes().any(|c| c.is_ascii_control()))
            {
                return Err(err(
                    kline("banner"),
                    &key("banner"),
                    "must not contain control characters".into(),
                ));
            }
            if let Some(d) = sec.greet_delay {
                if d.0 > Duration::from_secs(60) {
                    return Err(err(
                        kline("greet_delay"),
                        &key("greet_delay"),
                        "at most 60s: clients give up on a greeting after a few minutes, and every waiting connection holds a slot".into(),
                    ));
                }
                if sec.tls == TlsMode::Implicit {
                    return Err(err(
                        kline("greet_delay"),
                        &key("greet_delay"),
                        "a client cannot talk early on tls = \"implicit\" (the greeting follows its handshake); remove greet_delay".into(),
                    ));
                }
            }
            if sec.proxy_protocol.as_ref().is_some_and(Vec::is_empty) {
                return Err(err(
                    kline("proxy_protocol"),
                    &key("proxy_protocol"),
                    "list the trusted proxy networks (omit the key to turn PROXY off)".into(),
                ));
            }
            let limits = raw.limits.merged(&sec.limits);
            let settings = session_settings(&server, &raw.smtp, &limits, &sec).map_err(|e| {
                let field = match e.field {
                    "max_line" | "max_recipients" | "max_errors" | "max_junk_commands"
                    | "max_message_size" => {
                        format!("limits.{}", e.field)
                    }
                    "extensions.binarymime" => "smtp.binarymime".into(),
                    other => other.into(),
                };
                let leaf = field.rsplit('.').next().unwrap_or(&field).to_string();
                err(key_line(source, &leaf, 0), &field, e.problem.into())
            })?;
            let mut exempt = settings.config().clone();
            exempt.bare_line_policy = BareLinePolicy::Normalize;
            let exempt = proto::Settings::new(exempt)
                .map_err(|e| err(None, "smtp.bare_lf_exempt", e.to_string()))?;
            bindings.push(Binding {
                section: sec,
                limits,
                settings: Arc::new(settings),
                settings_bare_lf_exempt: Arc::new(exempt),
            });
        }

        if raw.routes.is_empty() {
            return Err(err(
                None,
                "route",
                "at least one [[route]] is needed".into(),
            ));
        }
        let mut routes = Vec::new();
        for (i, r) in raw.routes.iter().enumerate() {
            let at = r.span().start;
            let sec = r.get_ref().clone();
            if sec.domains.is_empty() {
                return Err(err(
                    Some(line_of(source, at)),
                    &format!("route[{i}].domains"),
                    "list at least one domain or \"*\"".into(),
                ));
            }
            for d in &sec.domains {
                let pat = d.get_ref();
                let name = pat.strip_prefix("*.").unwrap_or(pat);
                if pat != "*" && proto::address::mailbox(format!("x@{name}").as_bytes()).is_none() {
                    return Err(err(
                        Some(line_of(source, d.span().start)),
                        &format!("route[{i}].domains"),
                        format!("{pat:?} is not \"*\", a domain or \"*.domain\""),
                    ));
                }
            }
            let mut sec = sec;
            for d in &mut sec.domains {
                *d.get_mut() = canonical_pattern(d.get_ref());
            }
            if let Some(s) = &mut sec.sender_domains {
                for d in s.iter_mut() {
                    *d = canonical_pattern(d);
                }
            }
            let key = |k: &str| format!("route[{i}].{k}");
            let line = Some(line_of(source, at));
            match sec.action {
                // A drop route without a folder drops into `{data_dir}/drop`.
                RouteAction::Drop if sec.folder.is_none() => {
                    sec.folder = Some(server.data_dir.join("drop"));
                }
                RouteAction::Relay => {
                    if sec.next_hops.is_empty() {
                        return Err(err(
                            line,
                            &key("next_hops"),
                            "a relay route needs next_hops (\"host:port\" entries, or [\"mx\"])"
                                .into(),
                        ));
                    }
                    for h in &sec.next_hops {
                        let v = h.get_ref();
                        if v != "mx" && crate::relay::parse_hop(v).is_none() {
                            return Err(err(
                                Some(line_of(source, h.span().start)),
                                &key("next_hops"),
                                format!(
                                    "{v:?} is not \"host[:port]\", \"[ipv6][:port]\" or \"mx\""
                                ),
                            ));
                        }
                    }
                    if sec.auth_user.is_some() != sec.auth_password_file.is_some() {
                        return Err(err(
                            line,
                            &key("auth_user"),
                            "auth_user and auth_password_file go together".into(),
                        ));
                    }
                }
                RouteAction::Drop | RouteAction::Discard | RouteAction::Hold => {}
            }
            if sec.dmarc.is_some() && !raw.authentication.verify {
                return Err(err(
                    key_line(source, "dmarc", at).or(line),
                    &key("dmarc"),
                    "DMARC results need [authentication] verify = true".into(),
                ));
            }
            if sec.action != RouteAction::Relay && !sec.next_hops.is_empty() {
                return Err(err(
                    line,
                    &key("next_hops"),
                    "only relay routes have next hops".into(),
                ));
            }
            routes.push(sec);
        }
        let mut spool = raw.spool;
        if spool.dir.is_none() {
            spool.dir = Some(server.data_dir.join("spool"));
        }
        if spool.commit_batch == 0 {
            return Err(err(
                key_line(source, "commit_batch", 0),
                "spool.commit_batch",
                "must be at least 1".into(),
            ));
        }
        if raw.queue.retry.is_empty() {
            return Err(err(
                key_line(source, "retry", 0),
                "queue.retry",
                "list at least one wait, e.g. [\"1m\", \"5m\"]".into(),
            ));
        }
        let (aswl, replication) = match raw.aswl {
            Some(a) if a.enabled => {
                let dir = a
                    .dir
                    .clone()
                    .unwrap_or_else(|| server.data_dir.join("aswl"));
                let error = |(k, m): (&str, String)| {
                    // `replication.urls` → the key `urls` after the `[aswl.replication]` header.
                    let line = match k.strip_prefix("replication.") {
                        Some(sub) => source
                            .find("[aswl.replication]")
                            .and_then(|at| key_line(source, sub, at).or(Some(line_of(source, at)))),
                        None => key_line(source, k, 0),
                    };
                    err(line, &format!("aswl.{k}"), m)
                };
                let mut s = crate::aswl::Settings::compile(&a, dir, &domains).map_err(error)?;
                // A whitelist pass needs an authenticated sender where ringmx verifies.
                let verify = raw.authentication.verify;
                s.require_authentication = match a.require_authentication {
                    None if verify => crate::aswl::RequireAuth::Aligned,
                    None => crate::aswl::RequireAuth::Off,
                    Some(r) if r != crate::aswl::RequireAuth::Off && !verify => {
                        return Err(err(
                            key_line(source, "require_authentication", 0),
                            "aswl.require_authentication",
                            "needs [authentication] verify = true (or \"off\")".into(),
                        ));
                    }
                    Some(r) => r,
                };
                let r = match &a.replication {
                    Some(r) => Some(Arc::new(
                        crate::replication::Settings::compile(r).map_err(error)?,
                    )),
                    None => None,
                };
                (Some(Arc::new(s)), r)
            }
            _ => (None, None),
        };
        // Every recipient an inbound binding accepts at RCPT must have a route, or the message
        // is refused only at end of data, after the whole transfer.
        if bindings
            .iter()
            .any(|b| b.section.direction == Direction::Inbound)
        {
            let verdicts: &[Option<bool>] = if aswl.is_some() {
                &[Some(true), Some(false)]
            } else {
                &[None]
            };
            let samples = domains
                .iter()
                .map(|d| {
                    d.strip_prefix("*.")
                        .map_or(d.clone(), |s| format!("sub.{s}"))
                })
                .chain([String::new()]);
            for domain in samples {
                let routed = verdicts.iter().all(|&v| {
                    routes
                        .iter()
                        .any(|r| r.matches(&domain, "", RouteFacts::inbound(v)))
                });
                if !routed {
                    let what = if domain.is_empty() {
                        "the bare <Postmaster> address (RFC 5321 4.5.1)".to_string()
                    } else {
                        format!("mail for {domain}")
                    };
                    return Err(err(
                        key_line(source, "local", 0),
                        "domains.local",
                        format!(
                            "{what} is accepted at RCPT on inbound bindings but no [[route]] delivers it (whatever the sender and whitelist verdict): add a route, e.g. domains = [\"*\"]"
                        ),
                    ));
                }
            }
        }
        let mut recipients = Vec::new();
        for (i, r) in raw.recipients.iter().enumerate() {
            let line = key_line(source, "domains", r.span().start)
                .or_else(|| Some(line_of(source, r.span().start)));
            let mut sec = r.get_ref().clone();
            if sec.domains.is_empty() {
                return Err(err(
                    line,
                    &format!("recipients[{i}].domains"),
                    "list the local domains whose recipients the file holds".into(),
                ));
            }
            if sec.file.is_some() == sec.callout {
                return Err(err(
                    key_line(source, "file", r.span().start).or(line),
                    &format!("recipients[{i}].file"),
                    "give either file (the known addresses) or callout = true (ask the next hop)"
                        .into(),
                ));
            }
            for d in &mut sec.domains {
                *d = canonical_pattern(d);
                if !domains.contains(d) {
                    return Err(err(
                        line,
                        &format!("recipients[{i}].domains"),
                        format!("{d:?} is not one of [domains] local"),
                    ));
                }
            }
            recipients.push(sec);
        }
        if raw.admin.certificate.is_some() != raw.admin.key.is_some() {
            let at = source.find("[admin]").unwrap_or(0);
            let k = if raw.admin.certificate.is_some() {
                "certificate"
            } else {
                "key"
            };
            return Err(err(
                key_line(source, k, at),
                &format!("admin.{k}"),
                "HTTPS needs both certificate and key (PEM)".into(),
            ));
        }
        if let Some(addr) = raw.admin.listen
            && !addr.ip().is_loopback()
            && raw.admin.token_file.is_none()
        {
            let at = source.find("[admin]").unwrap_or(0);
            return Err(err(
                key_line(source, "listen", at),
                "admin.listen",
                format!(
                    "{addr} is reachable from other hosts: set [admin] token_file (bearer tokens) or listen on loopback"
                ),
            ));
        }
        let rates_at = source.find("[rates]").unwrap_or(0);
        let rate_error = |k: &str, m: &str| {
            err(
                key_line(source, k, rates_at),
                &format!("rates.{k}"),
                m.to_string(),
            )
        };
        if !(8..=32).contains(&raw.rates.ipv4_prefix) {
            return Err(rate_error("ipv4_prefix", "between 8 and 32"));
        }
        if !(16..=128).contains(&raw.rates.ipv6_prefix) {
            return Err(rate_error("ipv6_prefix", "between 16 and 128"));
        }
        for (k, v) in [
            ("connections_per_minute", raw.rates.connections_per_minute),
            ("messages_per_minute", raw.rates.messages_per_minute),
            ("recipients_per_minute", raw.rates.recipients_per_minute),
            (
                "unknown_recipients_per_minute",
                raw.rates.unknown_recipients_per_minute,
            ),
        ] {
            if v > 60_000 {
                return Err(rate_error(k, "at most 60000 a minute (0 = no limit)"));
            }
        }
        let timeout = raw.dnsbl.timeout.0;
        if timeout < Duration::from_millis(100) || timeout > Duration::from_secs(30) {
            let at = source.find("[dnsbl]").unwrap_or(0);
            return Err(err(
                key_line(source, "timeout", at),
                "dnsbl.timeout",
                "between 100ms and 30s".into(),
            ));
        }
        let a = &raw.authentication;
        let at = source.find("[authentication]").unwrap_or(0);
        if let Some(id) = &a.authserv_id
            && (id.is_empty()
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)))
        {
            return Err(err(
                key_line(source, "authserv_id", at),
                "authentication.authserv_id",
                "a host name: letters, digits, '-', '.' and '_'".into(),
            ));
        }
        if (a.dmarc_reject || a.spf_reject) && !a.verify {
            let k = if a.dmarc_reject {
                "dmarc_reject"
            } else {
                "spf_reject"
            };
            return Err(err(
                key_line(source, k, at),
                &format!("authentication.{k}"),
                "needs verify = true".into(),
            ));
        }
        if a.timeout.0 < Duration::from_millis(100) || a.timeout.0 > Duration::from_secs(60) {
            return Err(err(
                key_line(source, "timeout", at),
                "authentication.timeout",
                "between 100ms and 60s".into(),
            ));
        }
        if let Some(path) = &a.public_suffix_list {
            let list = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))
                .and_then(|text| crate::domain::Suffixes::parse(&text));
            match list {
                Ok(l) => raw.authentication.suffixes = l,
                Err(m) => {
                    return Err(err(
                        key_line(source, "public_suffix_list", at),
                        "authentication.public_suffix_list",
                        m,
                    ));
                }
            }
        }
        let c = &raw.callout;
        let at = source.find("[callout]").unwrap_or(0);
        let callout_error = |k: &str, problem: &str| {
            err(
                key_line(source, k, at),
                &format!("callout.{k}"),
                problem.into(),
            )
        };
        if c.timeout.0 < Duration::from_millis(100) || c.timeout.0 > Duration::from_secs(60) {
            return Err(callout_error("timeout", "between 100ms and 60s"));
        }
        if c.cache_size == 0 || c.cache_size > 10_000_000 {
            return Err(callout_error(
                "cache_size",
                "between 1 and 10000000 addresses",
            ));
        }
        if c.positive_ttl.0.is_zero() || c.negative_ttl.0.is_zero() {
            let k = if c.positive_ttl.0.is_zero() {
                "positive_ttl"
            } else {
                "negative_ttl"
            };
            return Err(callout_error(k, "must be longer than 0s"));
        }
        if raw.rates.table_size == 0 || raw.rates.table_size > 1 << 26 {
            let at = source.find("[rates]").unwrap_or(0);
            return Err(err(
                key_line(source, "table_size", at),
                "rates.table_size",
                "between 1 and 67108864 cells".into(),
            ));
        }
        if raw.rates.fleet && replication.is_none() {
            let at = source.find("[rates]").unwrap_or(0);
            return Err(err(
                key_line(source, "fleet", at),
                "rates.fleet",
                "fleet-wide limits count through Redis: configure [aswl.replication]".into(),
            ));
        }
        let mut dns_lists = Vec::new();
        for l in &raw.dnsbl.lists {
            let list = crate::dnslist::List::parse(l.get_ref())
                .map_err(|e| err(Some(line_of(source, l.span().start)), "dnsbl.lists", e))?;
            dns_lists.push(list);
        }
        if !dns_lists.is_empty() && raw.dnsbl.threshold <= 0 {
            let at = source.find("[dnsbl]").unwrap_or(0);
            return Err(err(
                key_line(source, "threshold", at),
                "dnsbl.threshold",
                "must be at least 1".into(),
            ));
        }
        let mut config = Config {
            source: source.to_string(),
            aswl,
            replication,
            server,
            bindings,
            domains,
            limits: raw.limits,
            smtp: raw.smtp,
            auth: raw.auth,
            admin: raw.admin,
            routes,
            recipients,
            spool,
            queue: raw.queue,
            dns: raw.dns,
            rates: raw.rates,
            dnsbl: raw.dnsbl,
            callout: raw.callout,
            authentication: raw.authentication,
            dns_lists,
        };
        config.load_route_files(file)?;
        Ok(config)
    }

    /// The files validated routes name, read after validation: each route's password file
    /// (its first line) and CA bundle (checked to hold certificates). Errors name the key
    /// and the route's line.
    fn load_route_files(&mut self, file: &str) -> Result<(), ConfigError> {
        let source = &self.source;
        for (i, sec) in self.routes.iter_mut().enumerate() {
            let line = sec.domains.first().map(|d| line_of(source, d.span().start));
            let err = |k: &str, message: String| ConfigError {
                file: file.to_string(),
                line,
                key: format!("route[{i}].{k}"),
                message,
            };
            if let Some(f) = &sec.auth_password_file {
                let pw = std::fs::read_to_string(f)
                    .map_err(|e| err("auth_password_file", format!("{}: {e}", f.display())))?;
                sec.auth_password = Some(pw.trim_end_matches(['\r', '\n']).to_string());
            }
            if let Some(f) = &sec.tls_ca_file {
                crate::relay::tls::load_roots(f).map_err(|e| err("tls_ca_file", e))?;
            }
        }
        Ok(())
    }

    /// Whether `domain` is one of ours (`[domains] local`, with `*.` wildcards).
    pub fn is_local_domain(&self, domain: &str) -> bool {
        domain_matches(&self.domains, domain)
    }

    /// The first route for a recipient domain, sender domain and direction.
    pub fn route_for(
        &self,
        domain: &str,
        sender_domain: &str,
        facts: RouteFacts,
    ) -> Option<(usize, &RouteSection)> {
        self.routes
            .iter()
            .enumerate()
            .find(|(_, r)| r.matches(domain, sender_domain, facts))
    }
}

fn session_settings(
    server: &ServerSection,
    smtp: &SmtpSection,
    limits: &Limits,
    b: &BindingSection,
) -> Result<proto::Settings, proto::SettingsError> {
    let cfg = proto::SessionConfig {
        hostname: b
            .hostname
            .clone()
            .unwrap_or_else(|| server.hostname.clone()),
        banner: b.banner.clone().unwrap_or_else(|| smtp.banner.clone()),
        max_line: limits.max_line,
        max_message_size: limits.max_message_size.0,
        max_recipients: limits.max_recipients,
        max_errors: limits.max_errors,
        max_junk_commands: limits.max_junk_commands,
        bare_line_policy: match smtp.bare_lf {
            BareLf::Reject => BareLinePolicy::Reject,
            BareLf::Normalize => BareLinePolicy::Normalize,
        },
        extensions: proto::Extensions {
            pipelining: smtp.pipelining,
            size: true,
            eightbitmime: smtp.eightbitmime,
            smtputf8: smtp.smtputf8,
            enhanced_status_codes: smtp.enhanced_status_codes,
            chunking: smtp.chunking,
            binarymime: smtp.binarymime && smtp.chunking,
            dsn: smtp.dsn,
            starttls: b.tls == TlsMode::Starttls,
        },
        auth: (b.auth != AuthMode::Off).then(proto::AuthSettings::default),
        command_timeout: limits.command_timeout.0,
        data_timeout: limits.data_timeout.0,
        max_transaction_time: limits.max_transaction_time.0,
    };
    proto::Settings::new(cfg)
}

#[cfg(test)]
mod tests;
