//! What a session needs to know about its binding: limits, policies, the extension list.
//! Built once per binding (and again on reload) and shared by every session through an `Arc`.
//! The file-facing configuration (TOML, defaults, key names) lives in the server; this is the
//! typed core of it.

use std::time::Duration;

use super::data::BareLinePolicy;
use super::reply::write_code;

/// Which ESMTP extensions are advertised (RFC 5321 §2.2); a parameter or command belonging to an
/// extension that is off is refused as if unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extensions {
    /// RFC 2920.
    pub pipelining: bool,
    /// RFC 1870 (`SIZE n` with the configured maximum).
    pub size: bool,
    /// RFC 6152.
    pub eightbitmime: bool,
    /// RFC 6531.
    pub smtputf8: bool,
    /// RFC 2034.
    pub enhanced_status_codes: bool,
    /// RFC 3030 BDAT.
    pub chunking: bool,
    /// RFC 3030 BODY=BINARYMIME (needs `chunking`).
    pub binarymime: bool,
    /// RFC 3461.
    pub dsn: bool,
    /// RFC 3207; the runtime must have a certificate.
    pub starttls: bool,
}

impl Default for Extensions {
    fn default() -> Self {
        Extensions {
            pipelining: true,
            size: true,
            eightbitmime: true,
            smtputf8: true,
            enhanced_status_codes: true,
            chunking: true,
            binarymime: true,
            dsn: true,
            starttls: false,
        }
    }
}

/// SMTP AUTH (RFC 4954) as offered on a binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthSettings {
    /// Offer PLAIN (RFC 4616).
    pub plain: bool,
    /// Offer LOGIN.
    pub login: bool,
    /// Offer AUTH only once TLS is active (default true: passwords never cross in clear).
    pub require_tls: bool,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            plain: true,
            login: true,
            require_tls: true,
        }
    }
}

/// Session settings with their defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    /// Our host name, used in the greeting and EHLO reply. Default `localhost`.
    pub hostname: String,
    /// Text after `220 hostname ESMTP`. Default `ringmx`.
    pub banner: String,
    /// Longest command line in bytes, CRLF included. Default 2048 (as Postfix); at least 512
    /// (RFC 5321 §4.5.3.1.4).
    pub max_line: usize,
    /// Largest message in bytes, counted after dot-unstuffing. Default 20 MiB.
    pub max_message_size: u64,
    /// Recipients per transaction; more get `452 4.5.3`. Default 1000.
    pub max_recipients: usize,
    /// Protocol errors before `421` and close. Default 20.
    pub max_errors: u32,
    /// Commands that move no mail (NOOP, RSET, VRFY, HELP, HELO/EHLO, a MAIL refused for its
    /// SIZE or by policy, a transaction's first refused RCPT, a message refused or aborted) a
    /// session may send between messages before each also counts as an error.
    /// Default 100 (Postfix's `smtpd_junk_command_limit`).
    pub max_junk_commands: u32,
    /// Bare CR/LF in DATA. Default `Reject`.
    pub bare_line_policy: BareLinePolicy,
    /// Advertised extensions.
    pub extensions: Extensions,
    /// SMTP AUTH; None = not offered. Default None.
    pub auth: Option<AuthSettings>,
    /// Idle time allowed while waiting for a command (RFC 5321 §4.5.3.2.7: at least 5 min).
    pub command_timeout: Duration,
    /// Idle time allowed between reads of message content (RFC 5321 §4.5.3.2.5: 3 min).
    pub data_timeout: Duration,
    /// Longest a transaction may last from MAIL to the end of its content, however steadily
    /// bytes trickle in (a slow sender cannot hold a session forever). Default 10 min.
    pub max_transaction_time: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            hostname: "localhost".into(),
            banner: "ringmx".into(),
            max_line: 2048,
            max_message_size: 20 * 1024 * 1024,
            max_recipients: 1000,
            max_errors: 20,
            max_junk_commands: 100,
            bare_line_policy: BareLinePolicy::Reject,
            extensions: Extensions::default(),
            auth: None,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
            max_transaction_time: Duration::from_secs(600),
        }
    }
}

/// A setting that cannot work, named by its field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsError {
    /// The field (`max_line`, `hostname`, …).
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: &'static str,
}

impl std::fmt::Display for SettingsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

impl std::error::Error for SettingsError {}

/// Validated settings with the replies that never change precomputed.
#[derive(Debug, Clone)]
pub struct Settings {
    pub(crate) cfg: SessionConfig,
    pub(crate) greeting: Vec<u8>,
    pub(crate) helo_reply: Vec<u8>,
    pub(crate) ehlo_plain: Vec<u8>,
    pub(crate) ehlo_tls: Vec<u8>,
}

impl Settings {
    /// Validate `cfg` and precompute the greeting and EHLO replies.
    pub fn new(cfg: SessionConfig) -> Result<Settings, SettingsError> {
        let err = |field, problem| Err(SettingsError { field, problem });
        if cfg.hostname.is_empty() || !cfg.hostname.bytes().all(|b| b.is_ascii_graphic()) {
            return err(
                "hostname",
                "must be a non-empty name of printable ASCII without spaces",
            );
        }
        if cfg.banner.bytes().any(|b| b == b'\r' || b == b'\n') {
            return err("banner", "must not contain CR or LF");
        }
        if cfg.max_line < 512 {
            return err(
                "max_line",
                "must be at least 512 bytes (RFC 5321 section 4.5.3.1.4)",
            );
        }
        if cfg.max_recipients == 0 {
            return err("max_recipients", "must be at least 1");
        }
        if cfg.max_errors == 0 {
            return err("max_errors", "must be at least 1");
        }
        if cfg.max_junk_commands == 0 {
            return err("max_junk_commands", "must be at least 1");
        }
        if cfg.max_message_size == 0 {
            return err("max_message_size", "must be at least 1 byte");
        }
        // The spool's record length is 32 bits; normalised line ends may add a little.
        if cfg.max_message_size > 1 << 31 {
            return err("max_message_size", "must be at most 2 GiB");
        }
        if cfg.extensions.binarymime && !cfg.extensions.chunking {
            return err("extensions.binarymime", "needs extensions.chunking");
        }
        if let Some(a) = &cfg.auth
            && !a.plain
            && !a.login
        {
            return err("auth", "no mechanism enabled");
        }
        let mut greeting = Vec::new();
        write_code(&mut greeting, 220, b' ');
        greeting.extend_from_slice(cfg.hostname.as_bytes());
        greeting.extend_from_slice(b" ESMTP ");
        greeting.extend_from_slice(cfg.banner.as_bytes());
        greeting.extend_from_slice(b"\r\n");
        let mut helo_reply = Vec::new();
        write_code(&mut helo_reply, 250, b' ');
        helo_reply.extend_from_slice(cfg.hostname.as_bytes());
        helo_reply.extend_from_slice(b"\r\n");
        let ehlo_plain = ehlo_reply(&cfg, false);
        let ehlo_tls = ehlo_reply(&cfg, true);
        Ok(Settings {
            cfg,
            greeting,
            helo_reply,
            ehlo_plain,
            ehlo_tls,
        })
    }

    /// The configuration these settings were built from.
    pub fn config(&self) -> &SessionConfig {
        &self.cfg
    }

    /// Whether AUTH is offered on a session with or without TLS.
    pub(crate) fn auth_offered(&self, tls: bool) -> Option<&AuthSettings> {
        self.cfg.auth.as_ref().filter(|a| tls || !a.require_tls)
    }
}

fn ehlo_reply(cfg: &SessionConfig, tls: bool) -> Vec<u8> {
    let x = &cfg.extensions;
    let mut lines: Vec<String> = vec![cfg.hostname.clone()];
    let mut add = |on: bool, s: &str| {
        if on {
            lines.push(s.to_string());
        }
    };
    add(x.pipelining, "PIPELINING");
    add(x.size, &format!("SIZE {}", cfg.max_message_size));
    add(x.eightbitmime, "8BITMIME");
    add(x.smtputf8, "SMTPUTF8");
    add(x.enhanced_status_codes, "ENHANCEDSTATUSCODES");
    add(x.chunking, "CHUNKING");
    add(x.binarymime, "BINARYMIME");
    add(x.dsn, "DSN");
    add(x.starttls && !tls, "STARTTLS");
    if let Some(a) = cfg.auth.as_ref().filter(|a| tls || !a.require_tls) {
        let mut mechs = String::from("AUTH");
        if a.plain {
            mechs.push_str(" PLAIN");
        }
        if a.login {
            mechs.push_str(" LOGIN");
        }
        add(true, &mechs);
    }
    let mut out = Vec::new();
    let last = lines.len().saturating_sub(1);
    for (i, l) in lines.iter().enumerate() {
        write_code(&mut out, 250, if i == last { b' ' } else { b'-' });
        out.extend_from_slice(l.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}
